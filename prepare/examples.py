"""Helpers shared by prepare/instruct.py and prepare/tags.py, whose datasets are examples of different lengths with
one value per token (the loss mask, the tags):

    <split>.bin            the tokens of every example, one after another (uint16 or uint32)
    <split>_offsets.bin    int64: example i is tokens[offsets[i]:offsets[i+1]]
    <split>_<values>.bin   one value per token (instruct: mask, uint8; tags: tags, int16 with -1 for "none")
    <split>_tasks.bin      instruct only, when the rows name tasks: int64 task id per example

The tokenizer is GPT-2 BPE, or characters. To fine-tune a model, give its meta.json (--vocab_from): its tokenizer is
used, and at character level characters the model has not seen are appended after its own (their ids are new, the
old ones keep their meaning; train.py grows the embedding, new rows starting at the mean).
"""

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from prepare.common import PrepareError, sha256_file, token_dtype, write_meta
from sologpt import tokenizer


def add_arguments(p):
    """The command-line options both scripts share."""
    p.add_argument("--input", required=True, metavar="PATH", help="training rows, .jsonl")
    p.add_argument("--val_input", metavar="PATH", help="validation rows; else --val_fraction of --input")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--name", required=True, help="output folder under --data_root")
    p.add_argument("--data_root", default="data")
    p.add_argument("--tokenizer", choices=("gpt2", "char"), help="default: gpt2, or that of --vocab_from")
    p.add_argument("--vocab_from", metavar="META", help="the meta.json (or the folder holding it: a run's out_dir) of "
                   "the model to fine-tune: use its tokenizer, appending new characters to a char table")
    p.add_argument("--seed", type=int, default=1337)


def read_jsonl(path):
    """[(line number, object)] of a .jsonl file; blank lines skipped."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path} does not exist (or is not a file)")
    if path.suffix != ".jsonl":
        raise PrepareError(f"{path} is not a .jsonl file (one JSON object per line)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not valid UTF-8 (byte offset {e.start}): convert it first "
                           f"(e.g. iconv -f latin1 -t utf-8)")
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append((i, json.loads(line)))
        except json.JSONDecodeError as e:
            raise PrepareError(f"{path}:{i} is not valid JSON ({e.msg}): fix or delete that line")
    if not rows:
        raise PrepareError(f"{path} has no rows")
    return rows


def split(args, parse):
    """{"train": [...], "val": [...]} of parsed rows: --val_input, or a seeded shuffle of --input whose last
    val_fraction validates. parse(path, line, row) -> an example (or raises PrepareError)."""
    if not 0.0 < args.val_fraction < 1.0:
        raise PrepareError(f"--val_fraction {args.val_fraction} is not strictly between 0 and 1")
    rows = {"train": [parse(args.input, i, r) for i, r in read_jsonl(args.input)]}
    if args.val_input:
        rows["val"] = [parse(args.val_input, i, r) for i, r in read_jsonl(args.val_input)]
    else:
        if len(rows["train"]) < 2:
            raise PrepareError(f"{args.input} has one row: give more, or --val_input")
        order = np.random.default_rng(args.seed).permutation(len(rows["train"]))
        n_val = max(1, int(len(order) * args.val_fraction))
        rows = {"train": [rows["train"][i] for i in order[:-n_val]], "val": [rows["train"][i] for i in order[-n_val:]]}
    return rows


def make_tokenizer(args, texts, extra=lambda kind: ()):
    """(tokenizer, meta fields) for the examples' texts: GPT-2 BPE, a character table of the texts, or the
    tokenizer of --vocab_from (at character level with new characters appended; it says how many). extra(kind):
    more text the table must hold for that tokenizer kind ("char" or "gpt2"), e.g. the chat template's markers."""
    if args.vocab_from:
        path = Path(args.vocab_from)
        path = path if path.is_file() and path.name == "meta.json" else (path if path.is_dir() else path.parent) \
            / "meta.json"
        try:
            base = tokenizer.load_meta(path)
        except tokenizer.TokenizerError as e:
            raise PrepareError(f"--vocab_from: {e}")
        kind = "char" if base["tokenizer"] == "char" else "gpt2"
        if args.tokenizer not in (None, kind):
            raise PrepareError(f"--tokenizer {args.tokenizer} but --vocab_from {path} uses {base['tokenizer']!r}: "
                               f"drop --tokenizer")
        if kind == "char":
            old = base["chars"]
            new = sorted(set("".join([*texts, *extra(kind)])) - set(old))
            meta = {"tokenizer": "char", "vocab_size": len(old) + len(new), "chars": old + "".join(new)}
            if new:
                print(f"{len(new)} character(s) new to {path} appended after its {len(old)} (ids {len(old)}..): "
                      f"the model's embedding grows when it fine-tunes on this data")
        else:
            meta = {k: base[k] for k in ("tokenizer", "vocab_size", "extra_tokens") if k in base}
    elif args.tokenizer == "char":  # (the default is GPT-2 BPE)
        chars = "".join(sorted(set("".join([*texts, *extra("char")]))))
        meta = {"tokenizer": "char", "vocab_size": len(chars), "chars": chars}
    else:
        meta = {"tokenizer": "gpt2", "vocab_size": 50257}
    try:
        return tokenizer.from_meta(meta), meta
    except tokenizer.TokenizerError as e:
        raise PrepareError(str(e))


def write(args, arrays, meta):
    """Write every array into --data_root/--name as <name>.tmp, then move them into place and write meta.json last
    (as prepare/common.publish: a folder without meta.json reads as unfinished); meta.json names --input and
    --val_input with their checksums. Returns (the folder, meta.json's dict, the train examples' lengths)."""
    sources = [args.input] + ([args.val_input] if args.val_input else [])
    data_dir = Path(args.data_root) / args.name
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        for name, arr in arrays.items():
            with open(data_dir / f"{name}.tmp", "wb") as f:
                arr.tofile(f)
                f.flush()
                os.fsync(f.fileno())
    except BaseException:
        for name in arrays:
            (data_dir / f"{name}.tmp").unlink(missing_ok=True)
        raise
    meta = {**meta, "source": ", ".join(str(s) for s in sources),
            "source_sha256": ", ".join(sha256_file(s) for s in sources)}
    (data_dir / "meta.json").unlink(missing_ok=True)
    for name in arrays:
        os.replace(data_dir / f"{name}.tmp", data_dir / name)
    write_meta(data_dir, meta)
    return data_dir, meta, np.diff(arrays["train_offsets.bin"])


def main(write_dataset, description, argv=None):
    """prepare/instruct.py's and prepare/tags.py's main(): the shared options, write_dataset(args), and a
    PrepareError as one line and exit status 1."""
    p = argparse.ArgumentParser(description=description)
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        write_dataset(args)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def token_arrays(split, examples, vocab_size, values_name, values_dtype):
    """{file name: array} of one split from [(ids, values)], and its stats."""
    lengths = np.array([len(ids) for ids, _ in examples], dtype=np.int64)
    offsets = np.zeros(len(examples) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    tokens = np.concatenate([np.asarray(ids, dtype=np.int64) for ids, _ in examples])
    values = np.concatenate([np.asarray(v, dtype=values_dtype) for _, v in examples])
    arrays = {f"{split}.bin": tokens.astype(token_dtype(vocab_size)), f"{split}_offsets.bin": offsets,
              f"{split}_{values_name}.bin": values}
    stats = {f"{split}_examples": len(examples), f"{split}_tokens": int(len(tokens)),
             f"{split}_max_len": int(lengths.max())}
    return arrays, stats, lengths, int(tokens.max())


def length_line(lengths):
    """Example lengths in tokens: median, 99th percentile, longest."""
    return (f"lengths in tokens: median {int(np.median(lengths))}, 99th percentile "
            f"{int(np.percentile(lengths, 99))}, longest {int(lengths.max())}")
