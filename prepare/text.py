"""Your own text -> data/NAME/{train.bin, val.bin, meta.json}, from .txt, .md and .jsonl files (or their .gz).

    python prepare/text.py notes/ "books/*.txt" chats.jsonl.gz --name mine [--tokenizer char] [--extra_tokens terms.txt]

A .txt or .md file is one document; a JSONL line is one document (its --text_field). Each document is decoded,
cleaned (prepare/clean.py), filtered, deduplicated (prepare/dedup.py), sent to train or val by a seeded hash of
its text, and tokenized; "<|endoftext|>" goes between documents. Worker processes clean, filter, hash and
tokenize batches of documents while this process reads ahead and writes their tokens in order, so the output
does not depend on --workers, and memory holds a few batches plus the dedup hashes, never the corpus.
docs/data.md explains every flag and the report printed at the end (also stored in meta.json).
"""

import argparse
import gzip
import hashlib
import json
import multiprocessing
import os
import sys
import time
import zlib
from collections import Counter, deque
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

if __package__ in (None, ""):  # run as `python prepare/text.py`: make `prepare` and `sologpt` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
from tqdm import tqdm

from sologpt import tokenizer
from sologpt.configurator import ArgumentParser
from prepare.clean import CLEAN_RULES, FILTERS, WORD, Limits, clean, quality_problem
from prepare.common import (PrepareError, TokenWriter, decode_text, find_inputs, fraction_arg, ordered_map,
                            publish_splits, token_dtype, write_problem)
from prepare.dedup import NearDuplicates, char_shingles, exact_key, minhash, minhash_params, word_shingles

CHAR_EOT = "\x03"  # ASCII "end of text" separates documents at char level; removed from the text itself
BATCH_CHARS = 1 << 20  # documents travel to the workers in batches of about this many characters
SNIFF_BYTES = 8000  # a NUL byte among a file's first 8000 bytes marks it binary (git's rule)
MAX_WARNINGS = 20  # printed and kept in the report; the rest are only counted
REPORT_KEYS = ("files_read", "binary_files", "unreadable_files", "non_utf8_files", "non_utf8_skipped",
               "invalid_jsonl_lines", "bytes_in", "documents_in", "cleaned", "removed", "documents_kept",
               "documents_train", "documents_val", "train_tokens", "val_tokens", "seconds", "tokens_per_second",
               "mb_per_second", "warnings_total", "warnings")  # meta.json's "report", in this order


@dataclass(frozen=True)
class Settings:
    """All a worker needs to process a batch; sent along with each batch."""
    clean_rules: frozenset
    limits: Limits
    tokenizer: str
    extra_tokens: tuple
    shingles: str
    shingle_size: int
    num_perm: int  # 0: no MinHash signatures (near dedup off)


@lru_cache(maxsize=None)
def encoder(kind, extra_tokens):
    """text -> uint32 ids, built once per process. At char level the ids are code points for now: the
    alphabet, hence the final ids, is known only after the whole corpus went by (see char_ids)."""
    if kind == "char":
        return lambda text: np.frombuffer(text.replace(CHAR_EOT, "").encode("utf-32-le"), dtype=np.uint32)
    tok = tokenizer.TiktokenTokenizer(kind, extra_tokens)
    return lambda text: np.array(tok.encode_ordinary(text), dtype=np.uint32)


def process_batch(job):
    """In a worker: clean, filter, hash and tokenize documents. One (problem, exact key, MinHash signature,
    ids) per document, problem naming the filter it failed (then nothing else is computed), plus how many
    documents each cleaning rule changed."""
    settings, texts = job
    encode = encoder(settings.tokenizer, settings.extra_tokens)
    params = minhash_params(settings.num_perm) if settings.num_perm else None
    results, changed = [], Counter()
    for text in texts:
        text, rules = clean(text, settings.clean_rules)
        changed.update(rules)
        by_words = params is not None and settings.shingles == "word"
        words = WORD.findall(text) if settings.limits.uses_words or by_words else []  # split once, used twice
        problem = "empty" if not text.strip() else quality_problem(text, words, settings.limits)
        if problem:
            results.append((problem, None, None, None))
            continue
        sig = None
        if params is not None:
            shingles = word_shingles(words, settings.shingle_size) if by_words \
                else char_shingles(text, settings.shingle_size)
            sig = minhash(shingles, params)
        results.append((None, exact_key(text), sig, encode(text)))
    return results, changed


# --- reading ---------------------------------------------------------------------------------

def read_documents(files, args, report):
    """Yield every document as ((file index, line number: 0 for a whole file), text), in order. Binary and
    unreadable files, invalid JSONL lines and (with --non_utf8 skip) non-UTF-8 text are counted in the report and
    skipped, or refused with --strict."""
    def skip(where, what, counter):
        report[counter] += 1
        if args.strict:
            raise PrepareError(f"{where}: {what} (without --strict it would be skipped)")
        warn(report, f"{where}: {what}; skipped")

    for index, path in enumerate(files):
        bad_bytes = 0
        try:
            with (gzip.open if str(path).lower().endswith(".gz") else open)(path, "rb") as f:
                if b"\0" in f.read(SNIFF_BYTES):
                    skip(path, "has NUL bytes, so it is binary (or UTF-16: convert it to UTF-8)", "binary_files")
                    continue
                f.seek(0)
                report["files_read"] += 1
                jsonl = str(path).lower().removesuffix(".gz").endswith(".jsonl")
                for lineno, data in enumerate(f, 1) if jsonl else [(0, f.read())]:  # lines, or the whole file
                    where = f"{path}:{lineno}" if jsonl else path
                    report["bytes_in"] += len(data)
                    text, bad = decode_text(data, args.non_utf8)
                    bad_bytes += bad
                    if text is None:
                        skip(where, "is not valid UTF-8", "non_utf8_skipped")
                        continue
                    if jsonl:
                        text = json_text(text, where, args.text_field, skip) if text.strip() else None
                    if text is not None:
                        yield (index, lineno), text
        except (OSError, EOFError, zlib.error) as e:  # a corrupt or truncated .gz, a permission problem
            skip(path, f"cannot be read ({e})", "unreadable_files")
        finally:
            if bad_bytes:
                report["non_utf8_files"] += 1
                how = "replaced by U+FFFD" if args.non_utf8 == "replace" else "decoded as cp1252"
                warn(report, f"{path}: {bad_bytes} non-UTF-8 byte(s) {how}")


def json_text(line, where, field, skip):
    """The text field of one JSONL line, or None (reported through skip) if there is none."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        return skip(where, f"is not valid JSON ({e.msg})", "invalid_jsonl_lines")
    value = record.get(field) if isinstance(record, dict) else None
    if not isinstance(value, str):
        return skip(where, f"has no string field {field!r}", "invalid_jsonl_lines")
    return value


def warn(report, message):
    report["warnings_total"] += 1
    if len(report["warnings"]) < MAX_WARNINGS:
        report["warnings"].append(message)
        print(f"warning: {message}", file=sys.stderr)


def batches(docs):
    """(where, text) documents -> (wheres, texts) batches of about BATCH_CHARS characters."""
    wheres, batch, size = [], [], 0
    for where, doc in docs:
        wheres.append(where)
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARS:
            yield wheres, batch
            wheres, batch, size = [], [], 0
    if batch:
        yield wheres, batch


def in_val(key, seed, val_fraction):
    """A document goes to val when a seeded hash of its exact key falls below val_fraction: the same text
    always lands on the same side (copies never straddle the split), whatever the order of the files."""
    h = hashlib.blake2b(key.to_bytes(8, "little"), digest_size=8, key=seed.to_bytes(8, "little", signed=True))
    return int.from_bytes(h.digest(), "little") / 2**64 < val_fraction


# --- writing ---------------------------------------------------------------------------------

def route_documents(args, files, settings, train, val, eot, report, alphabet):
    """Read the documents, have the workers process them, drop duplicates, and append each kept document to
    train or val, eot first unless it is the split's first. At char level, mark the characters in alphabet.
    Returns where the val documents came from: [file index, line number (0: the whole file)] each, in order."""
    pool = multiprocessing.Pool(args.workers) if args.workers > 1 else None
    near = NearDuplicates(args.near_dedup, args.num_perm) if args.near_dedup else None
    seen, removed, cleaned = set(), Counter(), Counter()  # seen: exact keys of the kept documents
    pending, val_documents = deque(), []  # the wheres of the batches sent out, and of the val documents

    def jobs():
        for wheres, batch in batches(read_documents(files, args, report)):
            pending.append(wheres)  # results come back in order, so the first pending batch is the next result's
            yield settings, batch

    try:
        for results, changed in tqdm(ordered_map(pool, process_batch, jobs(), window=2 * args.workers),
                                     unit="batch", disable=None):
            cleaned.update(changed)
            for where, (problem, key, sig, ids) in zip(pending.popleft(), results):
                report["documents_in"] += 1
                if problem is None and args.dedup and key in seen:
                    problem = "exact_duplicate"
                if problem is None and near is not None and near.is_duplicate(sig):
                    problem = "near_duplicate"
                if problem:
                    removed[problem] += 1
                    continue
                seen.add(key)
                split = "val" if in_val(key, args.seed, args.val_fraction) else "train"
                out = val if split == "val" else train
                if out.n_tokens:
                    out.write([eot])  # between documents, not after the last
                out.write(ids)
                report[f"documents_{split}"] += 1
                if split == "val":
                    val_documents.append(list(where))
                if alphabet is not None:
                    alphabet[ids] = True
    finally:
        if pool is not None:
            pool.terminate()
    report.update(cleaned={r: cleaned[r] for r in CLEAN_RULES if r in settings.clean_rules},
                  removed={r: removed[r] for r in ("empty", *FILTERS, "exact_duplicate", "near_duplicate")},
                  documents_kept=report["documents_train"] + report["documents_val"],
                  train_tokens=train.n_tokens, val_tokens=val.n_tokens)
    return val_documents


def char_ids(cp_writer, path, code_points, dtype):
    """Pass 2 at char level: the code points written in pass 1 -> their rank in the sorted alphabet."""
    with TokenWriter(path, dtype) as out:
        if cp_writer.n_tokens:
            src = np.memmap(cp_writer.tmp, dtype=np.uint32, mode="r")
            for i in range(0, len(src), 1 << 24):  # 64 MB at a time
                out.write(np.searchsorted(code_points, src[i:i + (1 << 24)]))
    return out


def write_dataset(args):
    """Read, clean, filter, dedup, split and tokenize args.inputs into data_root/name; return the meta dict."""
    start = time.time()
    files = find_inputs(args.inputs, (".txt", ".md", ".jsonl"))
    extra = load_extra_tokens(args)
    meta = {"tokenizer": args.tokenizer}
    if args.tokenizer == "char":  # pass 1 writes code points; the ids come once the alphabet is known
        eot, dtype, suffix, alphabet = ord(CHAR_EOT), np.uint32, "codepoints", np.zeros(0x110000, dtype=bool)
    else:
        tok = load_tokenizer(args.tokenizer, extra)
        eot, dtype, suffix, alphabet = tok.eot_token, token_dtype(tok.vocab_size), "bin", None
        meta.update(vocab_size=tok.vocab_size, dtype=np.dtype(dtype).name, eot_token=eot)
        if extra:
            meta["extra_tokens"] = extra  # ids 50257, 50258, ... in this order
    settings = Settings(frozenset(r for r in CLEAN_RULES if getattr(args, r)), limits_from(args), args.tokenizer,
                        tuple(extra), args.shingles, args.shingle_size, args.num_perm if args.near_dedup else 0)
    report = dict.fromkeys(REPORT_KEYS, 0)
    report["warnings"] = []  # the first MAX_WARNINGS
    data_dir = Path(args.data_root) / args.name
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with TokenWriter(data_dir / f"train.{suffix}", dtype) as train, \
                TokenWriter(data_dir / f"val.{suffix}", dtype) as val:
            val_documents = route_documents(args, files, settings, train, val, eot, report, alphabet)
            check_sizes(report, args, len(files))
        if alphabet is not None:
            alphabet[ord(CHAR_EOT)] = True
            code_points = np.flatnonzero(alphabet).astype(np.uint32)
            chars = "".join(map(chr, code_points))
            dtype = token_dtype(len(chars))
            meta.update(vocab_size=len(chars), dtype=np.dtype(dtype).name, eot_token=chars.index(CHAR_EOT),
                        chars=chars)
            train, val = (char_ids(w, data_dir / f"{w.path.stem}.bin", code_points, dtype) for w in (train, val))
    finally:
        for name in ("train", "val"):
            (data_dir / f"{name}.codepoints.tmp").unlink(missing_ok=True)
    seconds = time.time() - start
    report.update(seconds=round(seconds, 3), tokens_per_second=round((train.n_tokens + val.n_tokens) / seconds),
                  mb_per_second=round(report["bytes_in"] / seconds / 1e6, 3))
    # which documents went to val, as [index into source, line number (0: the whole file)]: tools/evaluate.py
    # checks val.bin against it; with the sources it says which texts a model never trained on
    meta.update(source=[str(f) for f in files], val_documents=val_documents, report=report, settings=vars(args))
    return publish_splits(data_dir, train, val, meta)


def load_tokenizer(name, extra):
    try:
        return tokenizer.TiktokenTokenizer(name, extra)
    except Exception as e:  # offline without a cache, tiktoken fails inside its downloader
        raise PrepareError(f"could not load tiktoken's {name} encoding ({e}): set TIKTOKEN_CACHE_DIR to a folder "
                           "holding its cached files, or connect to the internet once") from None


def load_extra_tokens(args):
    if args.extra_tokens is None:
        return []
    if args.tokenizer == "char":
        raise PrepareError("--extra_tokens extends GPT-2's vocabulary: use it with --tokenizer gpt2")
    try:
        terms, warnings = tokenizer.read_extra_tokens(args.extra_tokens, args.tokenizer)
    except tokenizer.TokenizerError as e:
        raise PrepareError(str(e)) from None
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    return terms


def limits_from(args):
    return Limits(args.min_chars, args.min_words, args.max_symbol_ratio, args.max_digit_ratio,
                  args.max_repeated_lines, args.max_repeated_ngrams, args.ngram_size,
                  args.min_mean_word_length, args.max_mean_word_length)


def check_sizes(report, args, n_files):
    """Refuse a dataset train.py cannot use: no documents, or a split shorter than one block."""
    if report["documents_in"] == 0:
        raise PrepareError(f"no documents in the {n_files} input files ({report['binary_files']} binary, "
                           f"{report['unreadable_files']} unreadable, {report['invalid_jsonl_lines']} invalid "
                           f"JSONL lines, {report['non_utf8_skipped']} not UTF-8): give files with text")
    small = [split for split in ("train", "val") if report[f"{split}_tokens"] < args.min_split_tokens]
    if not small:
        return
    print_report(report)  # the counts say where the documents went
    if report["documents_kept"] == 0:
        raise PrepareError(f"all {report['documents_in']} documents were removed (counts above): loosen the "
                           "filters (0 switches one off) or check the input")
    raise PrepareError(f"{small[0]}.bin would hold {report[f'{small[0]}_tokens']} tokens, fewer than "
                       f"--min_split_tokens={args.min_split_tokens}, from {report['documents_kept']} kept documents "
                       f"({report['documents_train']} train, {report['documents_val']} val): add text, change "
                       "--val_fraction, or for a smaller block_size lower --min_split_tokens")


def print_report(r):
    rows = [("documents read", r["documents_in"])] + [(f"removed: {k}", n) for k, n in r["removed"].items()]
    rows += [("documents kept", r["documents_kept"]), ("  in train / val", f"{r['documents_train']:,} / "
             f"{r['documents_val']:,}"), ("tokens train / val", f"{r['train_tokens']:,} / {r['val_tokens']:,}")]
    print("\n".join(f"  {label:<26}{value:>20,}" if isinstance(value, int) else f"  {label:<26}{value:>20}"
                    for label, value in rows))
    print(f"  files: {r['files_read']} read, {r['binary_files']} binary, {r['unreadable_files']} unreadable, "
          f"{r['non_utf8_files']} with non-UTF-8 bytes, {r['non_utf8_skipped']} skipped as not UTF-8; "
          f"{r['invalid_jsonl_lines']} invalid JSONL lines")
    print("  cleaning changed (documents): " + ", ".join(f"{k} {n:,}" for k, n in r["cleaned"].items()))
    if r["seconds"]:
        print(f"  {r['seconds']:.1f} s: {r['tokens_per_second']:,} tokens/s, {r['mb_per_second']:.2f} MB/s of input")


# --- command line ----------------------------------------------------------------------------

def _ratio(s):
    x = float(s)
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"{s} is not between 0 and 1")
    return x


def _length(s):
    x = float(s)
    if not 0.0 <= x < float("inf"):  # NaN fails too
        raise argparse.ArgumentTypeError(f"{s} is not a finite number >= 0")
    return x


def _count(s):
    n = int(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{s} is negative")
    return n


def parse_args(argv):
    p = ArgumentParser(prog="python prepare/text.py", description=__doc__.splitlines()[0],
                                epilog="0 switches a filter off. docs/data.md explains each flag.")
    on = argparse.BooleanOptionalAction
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="files, folders or quoted globs")
    p.add_argument("--name", required=True, help="output folder under --data_root")
    p.add_argument("--data_root", default="data", metavar="DIR", help="default: %(default)s")
    p.add_argument("--tokenizer", default="gpt2", choices=["gpt2", "char"], help="default: %(default)s")
    p.add_argument("--extra_tokens", metavar="FILE", help="domain terms, one a line, each a new whole token")
    p.add_argument("--text_field", default="text", help="JSONL field with the text (default: %(default)s)")
    p.add_argument("--val_fraction", type=fraction_arg, default=0.1, help="documents' share in val (default: %(default)s)")
    p.add_argument("--seed", type=int, default=1337, help="seeds the train/val split (default: %(default)s)")
    p.add_argument("--strict", action="store_true", help="stop at a bad file or line instead of skipping it")
    p.add_argument("--non_utf8", default="cp1252", choices=["cp1252", "replace", "skip"],
                   help="bytes that are not UTF-8: decode as Windows-1252, replace by U+FFFD, or skip the document")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="processes (default: all cores)")
    p.add_argument("--min_split_tokens", type=_count, default=1025,
                   help="fewest tokens in train.bin and in val.bin: block_size + 1 for train.py (default: %(default)s)")
    g = p.add_argument_group("cleaning (each on or off)")
    for rule, default, what in [("nfc", True, "Unicode NFC normalisation"), ("control", True, "line ends to \\n, "
                                "control characters out (\\n and \\t stay)"), ("html", True, "HTML tags out, "
                                "entities decoded"), ("urls", False, "URLs out"), ("emails", True, "e-mail addresses "
                                "out"), ("whitespace", True, "space runs, trailing spaces, blank line runs")]:
        g.add_argument(f"--{rule}", action=on, default=default, help=what)
    g = p.add_argument_group("quality filters (0 = off)")
    g.add_argument("--min_chars", type=_count, default=0, help="default: %(default)s")
    g.add_argument("--min_words", type=_count, default=5, help="CJK characters count as words (default: %(default)s)")
    g.add_argument("--max_symbol_ratio", type=_ratio, default=0.3, help="punctuation, symbols (default: %(default)s)")
    g.add_argument("--max_digit_ratio", type=_ratio, default=0.3, help="default: %(default)s")
    g.add_argument("--max_repeated_lines", type=_ratio, default=0.2, help="share of characters (default: %(default)s)")
    g.add_argument("--max_repeated_ngrams", type=_ratio, default=0.3, help="default: %(default)s")
    g.add_argument("--ngram_size", type=int, default=5, help="words per n-gram (default: %(default)s)")
    g.add_argument("--min_mean_word_length", type=_length, default=2.0, help="default: %(default)s")
    g.add_argument("--max_mean_word_length", type=_length, default=12.0, help="default: %(default)s")
    g = p.add_argument_group("deduplication")
    g.add_argument("--dedup", action=on, default=True, help="drop exact duplicates (case and spacing ignored)")
    g.add_argument("--near_dedup", type=_ratio, default=0.8, metavar="JACCARD",
                   help="drop near duplicates at this estimated similarity; 0 = off (default: %(default)s)")
    g.add_argument("--shingles", default="word", choices=["word", "char"], help="default: %(default)s")
    g.add_argument("--shingle_size", type=int, default=5, help="default: %(default)s")
    g.add_argument("--num_perm", type=int, default=128, help="MinHash functions (default: %(default)s)")
    args = p.parse_args(argv)
    for name in ("workers", "ngram_size", "shingle_size", "num_perm"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        try:
            meta = write_dataset(args)
        except OSError as e:
            raise write_problem(e, Path(args.data_root) / args.name)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    print_report(meta["report"])
    data_dir = Path(args.data_root) / args.name
    print(f"vocab size {meta['vocab_size']} ({meta['dtype']}) -> {data_dir / 'train.bin'}, {data_dir / 'val.bin'}, "
          f"{data_dir / 'meta.json'}")
    return meta


if __name__ == "__main__":
    main()
