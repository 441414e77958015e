"""How fast does prepare/text.py turn text into tokens, and how does it scale with cores?

    python -m bench.tokenizer_speed [--mb 200] [--seed 0] [--max_workers N | --workers 1 2 4 8 16]

Writes a seeded synthetic corpus (JSONL, documents of a few KB made of words drawn from tiny-shakespeare's
word frequencies, or from a built-in list when that file is missing) into a temporary folder, then prints
MB/s of input text for:
  - a plain single-process loop of tiktoken's enc.encode_ordinary over the documents (already in memory),
  - tiktoken's enc.encode_ordinary_batch with one thread per core (the threaded alternative to processes),
  - prepare/text.py's whole path (read, parse, clean, filter, dedup, tokenize, write) at 1, 2, ..., N workers,
    once with every cleaning rule, filter and dedup off ("tokenize only") and once with the defaults.
docs/data.md records a run. Offline, set TIKTOKEN_CACHE_DIR to a tiktoken cache.
"""

import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import tiktoken

from prepare import text as prep

from sologpt.configurator import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]  # the repository; the shared data lie beside it
SHAKESPEARE = ROOT.parent / "shared" / "data" / "shakespeare" / "input.txt"
FALLBACK_WORDS = ("the of and to a in is that it was for on are as with his they at be this from have or by one "
                  "had not but what all were when we there can an your which their said if do will each about how "
                  "up out them then she many some so these would other into has more her two like him see time "
                  "could no make than first been its who now people my made over did down only way find use may "
                  "water long little very after words called just where most know").split()


def make_corpus(path, mb, seed):
    """Write about `mb` MB of JSONL documents to path; return the documents' total UTF-8 size in bytes."""
    rng = np.random.default_rng(seed)
    source = os.environ.get("SOLOGPT_SHARED")
    src = Path(source) / "data" / "shakespeare" / "input.txt" if source else SHAKESPEARE
    words = src.read_text(encoding="utf-8").split() if src.is_file() else FALLBACK_WORDS
    vocab = np.array(words, dtype=object)  # repeats kept: drawing from it follows the words' frequencies
    target, written = mb * 1_000_000, 0
    with open(path, "w", encoding="utf-8") as f:
        while written < target:
            n = int(rng.integers(200, 1500))  # words per document: a few KB, like web pages or chats
            picked = vocab[rng.integers(0, len(vocab), n)]
            breaks = np.where(rng.random(n) < 1 / 12, "\n", " ")  # a line every ~12 words
            doc = "".join(w + s for w, s in zip(picked, breaks)).strip()
            f.write(json.dumps({"text": doc}) + "\n")
            written += len(doc.encode("utf-8"))
    return written


def cpu_seconds():
    """CPU time of this process and of its finished children (the worker processes, once reaped)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, repeat):
    """Best wall seconds of `repeat` runs of fn(), the CPU seconds of that run, and the 1-minute load
    average before it: on a shared machine other jobs take cores too, and the table should say so."""
    best = None
    for _ in range(repeat):
        load, cpu, t = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
        fn()
        run = (time.perf_counter() - t, cpu_seconds() - cpu, load)
        best = run if best is None or run[0] < best[0] else best
    return best


def main():
    p = ArgumentParser(prog="python -m bench.tokenizer_speed", description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=int, default=200, help="corpus size in MB (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seeds the corpus (default: %(default)s)")
    p.add_argument("--max_workers", type=int, default=os.cpu_count(), help="default: all cores (%(default)s)")
    p.add_argument("--workers", type=int, nargs="+", help="worker counts to time (default: 1 to max_workers)")
    p.add_argument("--repeat", type=int, default=1, help="runs per row, the fastest counts (default: %(default)s)")
    args = p.parse_args()
    enc = tiktoken.get_encoding("gpt2")
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.jsonl"
        n_bytes = make_corpus(corpus, args.mb, args.seed)
        print(f"corpus: {n_bytes / 1e6:.1f} MB of text in {corpus}, {os.cpu_count()} cores")
        rows = []

        with open(corpus, encoding="utf-8") as f:
            docs = [json.loads(line)["text"] for line in f]
        base = timed(lambda: [enc.encode_ordinary(d) for d in docs], args.repeat)
        rows.append(("plain loop: enc.encode_ordinary", 1, base))
        base = base[0]
        threads = max(args.workers) if args.workers else args.max_workers
        rows.append(("tiktoken encode_ordinary_batch (threads)", threads,
                     timed(lambda: enc.encode_ordinary_batch(docs, num_threads=threads), args.repeat)))
        del docs

        off = ["--no-nfc", "--no-control", "--no-html", "--no-emails", "--no-whitespace", "--no-dedup",
               "--near_dedup", "0", "--min_words", "0", "--max_symbol_ratio", "0", "--max_digit_ratio", "0",
               "--max_repeated_lines", "0", "--max_repeated_ngrams", "0", "--min_mean_word_length", "0",
               "--max_mean_word_length", "0"]
        for label, flags in (("prepare/text.py, tokenize only", off), ("prepare/text.py, defaults", [])):
            for workers in args.workers or range(1, args.max_workers + 1):
                argv = [str(corpus), "--name", "bench", "--data_root", tmp, "--workers", str(workers), *flags]
                rows.append((label, workers, timed(lambda: prep.write_dataset(prep.parse_args(argv)), args.repeat)))

    print("\n| path | processes | seconds | MB/s | vs plain loop | CPU seconds | load before |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, workers, (seconds, cpu, load) in rows:
        print(f"| {label} | {workers} | {seconds:.1f} | {n_bytes / seconds / 1e6:.2f} | {base / seconds:.2f}x "
              f"| {cpu:.1f} | {load:.2f} |")

if __name__ == "__main__":
    main()
