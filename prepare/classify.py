"""Labelled text for a classification head (train.py task="classify"): JSONL or CSV rows of {text, label}.

    python prepare/classify.py --input train.jsonl --val_input val.jsonl --name polarity
    python prepare/classify.py --input reviews.csv --val_fraction 0.1 --name reviews --tokenizer char
    python prepare/classify.py --input train.jsonl --val_input val.jsonl --name pc --tokenizer_from data/polarity_chars

writes data/NAME/{train,val}.bin (the tokens of every example, one after another), {train,val}_offsets.bin
(int64: example i is tokens[offsets[i]:offsets[i+1]]), {train,val}_labels.bin (int64 class ids) and meta.json
(task, label names in id order, tokenizer). For GPT-2 tokens each example ends with <|endoftext|>, for
characters with "\\n" (or, with --tokenizer_from, that tokenizer's end-of-text token if it has one): one fixed last
token, which is where the head reads the text by default.
"""

import csv
import json
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python prepare/classify.py`: make `prepare` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

from prepare.common import PrepareError, sha256_file, token_dtype, write_meta, write_problem
from sologpt import tokenizer
from sologpt.configurator import ArgumentParser


def read_rows(path, text_field, label_field, unlabelled=False):
    """[(text, label string)] from a .jsonl or .csv file, with the line number of any bad row. unlabelled: a row
    without a label gets None instead of an error (tools/evaluate.py predicts those)."""
    path = Path(path)
    if not path.is_file():
        raise PrepareError(f"{path} does not exist (or is not a file)")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise PrepareError(f"{path} is not valid UTF-8 (byte offset {e.start}): convert it first "
                           f"(e.g. iconv -f latin1 -t utf-8)")
    if path.suffix == ".csv":
        reader = csv.DictReader(lines)
        missing = {text_field, *(() if unlabelled else (label_field,))} - set(reader.fieldnames or [])
        if missing:
            raise PrepareError(f"{path}: the header has no column {sorted(missing)[0]!r} "
                               f"(columns: {reader.fieldnames}); set --text_field / --label_field")
        records = [(i + 2, r) for i, r in enumerate(reader)]  # line 1 is the header
    elif path.suffix == ".jsonl":
        records = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise PrepareError(f"{path}:{i} is not valid JSON ({e.msg}): fix or delete that line")
            if not isinstance(r, dict):
                raise PrepareError(f"{path}:{i} is not a JSON object with {text_field!r} and {label_field!r}")
            records.append((i, r))
    else:
        raise PrepareError(f"{path} is neither .jsonl nor .csv")
    rows = []
    for line_no, r in records:
        text, label = r.get(text_field), r.get(label_field)
        if not isinstance(text, str) or not text.strip():
            raise PrepareError(f"{path}:{line_no} has no text in {text_field!r}: fix the row or set --text_field")
        if label is None or (isinstance(label, str) and not label.strip()):
            if unlabelled:
                rows.append((text, None))
                continue
            raise PrepareError(f"{path}:{line_no} has no label in {label_field!r}: every row needs one")
        rows.append((text, str(label)))
    if not rows:
        raise PrepareError(f"{path} has no rows")
    return rows


def make_encoder(kind, texts, like=None):
    """(encode(text) -> ids ending in the end marker, meta fields) for GPT-2 BPE or characters, or with like (the
    meta.json of a prepared dataset or a run folder) that tokenizer, so the classifier can start from a model
    trained with it; characters it lacks are dropped (and counted in encode.dropped)."""
    if like is not None:
        fields = {k: like[k] for k in ("tokenizer", "vocab_size", "chars", "extra_tokens", "eot_token") if k in like}
        try:
            enc = tokenizer.from_meta(fields)
        except tokenizer.TokenizerError as e:
            raise PrepareError(f"--tokenizer_from: {e}")
        known = set(fields.get("chars") or "")

        def encode(text):
            if fields["tokenizer"] == "char":
                encode.dropped.update(ch for ch in text if ch not in known)
            return tokenizer.example_ids(enc, text, drop_unknown=True)

        encode.dropped = set()
        return encode, fields
    if kind == "gpt2":
        import tiktoken
        enc = tiktoken.get_encoding("gpt2")
        return (lambda t: enc.encode_ordinary(t) + [enc.eot_token]), {"tokenizer": "gpt2", "vocab_size": enc.n_vocab}
    chars = "".join(sorted(set("".join(texts)) | {"\n"}))
    stoi = {c: i for i, c in enumerate(chars)}
    return (lambda t: [stoi[c] for c in t] + [stoi["\n"]]), {"tokenizer": "char", "vocab_size": len(chars),
                                                            "chars": chars}


def read_like(path):
    """The meta.json of --tokenizer_from: a prepared dataset's folder, a run folder (train.py copies it there) or
    the file itself."""
    path = Path(path)
    meta = path / "meta.json" if path.is_dir() else path
    if not meta.is_file():
        raise PrepareError(f"--tokenizer_from {path} has no meta.json: give a prepared dataset's folder or a run "
                           f"folder")
    try:
        return tokenizer.load_meta(meta)
    except tokenizer.TokenizerError as e:
        raise PrepareError(str(e))


def write_split(data_dir, split, rows, encode, label_ids, dtype):
    """Write <split>.bin, <split>_offsets.bin and <split>_labels.bin as .tmp files; return their paths and stats."""
    ids = [encode(text) for text, _ in rows]
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    tokens = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids])
    labels = np.array([label_ids[label] for _, label in rows], dtype=np.int64)
    arrays = {f"{split}.bin": tokens.astype(dtype), f"{split}_offsets.bin": offsets, f"{split}_labels.bin": labels}
    for name, arr in arrays.items():
        with open(data_dir / f"{name}.tmp", "wb") as f:
            arr.tofile(f)
            f.flush()
            os.fsync(f.fileno())
    lengths = np.diff(offsets)
    return list(arrays), {f"{split}_examples": len(rows), f"{split}_tokens": int(len(tokens)),
                          f"{split}_max_len": int(lengths.max()), "max_id": int(tokens.max())}


def write_dataset(args):
    rows = {"train": read_rows(args.input, args.text_field, args.label_field)}
    if args.val_input:
        rows["val"] = read_rows(args.val_input, args.text_field, args.label_field)
    else:  # a seeded shuffle, then the last val_fraction of it validates
        order = np.random.default_rng(args.seed).permutation(len(rows["train"]))
        n_val = max(1, int(len(order) * args.val_fraction))
        rows = {"train": [rows["train"][i] for i in order[:-n_val]], "val": [rows["train"][i] for i in order[-n_val:]]}
    names = sorted({label for _, label in rows["train"]})
    if len(names) < 2:
        raise PrepareError(f"{args.input} has only one class ({names[0]!r}): a classifier needs at least two labels")
    unseen = sorted({label for _, label in rows["val"]} - set(names))
    if unseen:
        raise PrepareError(f"the validation rows have labels the training rows lack: {unseen[:3]}")
    label_ids = {name: i for i, name in enumerate(names)}
    like = read_like(args.tokenizer_from) if args.tokenizer_from else None
    encode, meta = make_encoder(args.tokenizer, [t for split in rows.values() for t, _ in split], like)
    dtype = token_dtype(meta["vocab_size"])
    data_dir = Path(args.data_root) / args.name
    data_dir.mkdir(parents=True, exist_ok=True)
    files, max_id = [], 0
    try:
        for split in ("train", "val"):
            written, stats = write_split(data_dir, split, rows[split], encode, label_ids, dtype)
            files += written
            max_id = max(max_id, stats.pop("max_id"))
            meta.update(stats)
    except BaseException:  # a full disk mid-way: no temp files left; the dataset that was there is untouched
        for split in ("train", "val"):
            for name in (f"{split}.bin", f"{split}_offsets.bin", f"{split}_labels.bin"):
                (data_dir / f"{name}.tmp").unlink(missing_ok=True)
        raise
    meta.update(task="classify", labels=names, dtype=np.dtype(dtype).name, max_token_id=max_id,
                source=str(args.input), source_sha256=sha256_file(args.input))
    dropped = sorted(getattr(encode, "dropped", ()))
    if dropped:
        print(f"warning: {len(dropped)} characters the tokenizer of {args.tokenizer_from} lacks were left out: "
              + " ".join(repr(ch) for ch in dropped[:10]), file=sys.stderr)
    (data_dir / "meta.json").unlink(missing_ok=True)  # as prepare/common.publish: meta.json last
    for name in files:
        os.replace(data_dir / f"{name}.tmp", data_dir / name)
    write_meta(data_dir, meta)
    return data_dir, meta


def main(argv=None):
    p = ArgumentParser(prog="python prepare/classify.py", description=__doc__.splitlines()[0])
    p.add_argument("--input", required=True, metavar="PATH", help="training rows, .jsonl or .csv")
    p.add_argument("--val_input", metavar="PATH", help="validation rows; else --val_fraction of --input")
    p.add_argument("--val_fraction", type=float, default=0.1)
    p.add_argument("--name", required=True, help="output folder under --data_root")
    p.add_argument("--data_root", default="data")
    p.add_argument("--tokenizer", choices=("gpt2", "char"), default="gpt2")
    p.add_argument("--tokenizer_from", metavar="DIR", help="use the tokenizer of this prepared dataset or run folder "
                   "(its meta.json), e.g. the data of the model the classifier starts from; overrides --tokenizer")
    p.add_argument("--text_field", default="text")
    p.add_argument("--label_field", default="label")
    p.add_argument("--seed", type=int, default=1337)
    args = p.parse_args(argv)
    try:
        if not 0.0 < args.val_fraction < 1.0:
            raise PrepareError(f"--val_fraction {args.val_fraction} is not strictly between 0 and 1")
        try:
            data_dir, meta = write_dataset(args)
        except OSError as e:
            raise write_problem(e, Path(args.data_root) / args.name)
    except PrepareError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    counts = ", ".join(f"{meta[f'{s}_examples']:,} {s}" for s in ("train", "val"))
    print(f"{counts} examples, {len(meta['labels'])} classes {meta['labels']}, tokenizer {meta['tokenizer']}, "
          f"longest {max(meta['train_max_len'], meta['val_max_len'])} tokens -> {data_dir}")


if __name__ == "__main__":
    main()
