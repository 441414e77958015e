"""Evaluate a trained model on held-out data: a language model's perplexity and bits per character, a classifier's
accuracy, macro-F1, per-class precision and recall and confusion matrix, with every prediction written to a file.

    python -m tools.evaluate --out_dir=out-small                                # the run's own dataset, val split
    python -m tools.evaluate --out_dir=out-small --input=held_out.txt           # text files (comma-separated)
    python -m tools.evaluate --out_dir=out-polarity --input=new_reviews.jsonl   # labelled rows {text, label}
    python -m tools.evaluate --out_dir=path/to/gpt2 --dataset=shakespeare_char --as_text=True  # another tokenizer

The model is a run folder, a checkpoint file or a Hugging Face GPT-2 directory (sologpt/checkpoint.py's locate).
The data is a prepared dataset's split (--dataset, --split; by default the run's own dataset and its val split), or
--input: UTF-8 text files for a language model, or for a classifier a .jsonl / .csv of rows with a text and a label
(rows without labels get predictions only; a .txt file is one text per line).

A language model scores a dataset split as train.py's evaluation reads it: the token stream, every token after the
first predicted once, in windows of block_size tokens `stride` apart (tools/score.py's). When the model's tokenizer
is not the dataset's, or with --as_text, it scores the split as text instead: each document (the text between
end-of-text tokens) is decoded, tokenized by the model, and scored on its own; bits per character then compare
models whatever their tokenizers. A classifier reads each example as prepare/classify.py wrote it (its tokens and
the end marker) and writes one JSON line per example to --predictions: text, label, predicted label, probabilities.
"""

import codecs
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from prepare.classify import read_rows
from prepare.common import PrepareError
from sologpt import checkpoint, classify, tokenizer as tok
from sologpt.configurator import UserError, run_cli
from sologpt.hardware import autocast_context, resolve_device
from tools.score import encode, read_text, score_text, scored_chars


@dataclass
class EvaluateConfig:
    out_dir: str = "out"  # the model: a run folder, a checkpoint file or a Hugging Face GPT-2 directory
    ckpt: str = ""  # another checkpoint (e.g. out/best.pt); "": out_dir's
    input: str = ""  # files instead of a dataset: text (language model), .jsonl / .csv / .txt rows (classifier)
    dataset: str = ""  # a prepared dataset under data_root (or its folder); "" (and no input): the run's own dataset
    data_root: str = "data"
    split: str = "val"  # the dataset's split: "val" or "train"
    as_text: bool = False  # language model on a dataset: score its documents as text, tokenized by the model
    # (always so when the model's tokenizer is not the dataset's)
    text_field: str = "text"  # classifier rows (.jsonl / .csv): the field with the text
    label_field: str = "label"  # ... and the one with the label
    predictions: str = ""  # classifier: the JSONL file of predictions; "": predictions-<data>.jsonl beside the model
    metrics: str = ""  # also write the metrics to this JSON file
    stride: int = 0  # language model: tokens between window starts; 0 is block_size // 2 (tools/score.py)
    batch_size: int = 8  # windows or examples per forward pass (only speed and memory change)
    progress: bool = True  # a progress bar (drawn only on a terminal)
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that have it (else float16), float32 elsewhere


# ---- the data -------------------------------------------------------------------------------------------------

def dataset_dir(cfg, ckpt):
    """The prepared dataset's folder: --dataset under data_root (or a folder path), else the one the run trained on."""
    if cfg.dataset:
        for path in (Path(cfg.data_root) / cfg.dataset, Path(cfg.dataset)):
            if (path / "meta.json").is_file():
                return path
        raise UserError(f"--dataset={cfg.dataset}: no meta.json in {Path(cfg.data_root) / cfg.dataset}: prepare it "
                        f"first (docs/data.md), or pass --data_root")
    tc = ckpt.get("train_config") or {}
    if not tc.get("dataset"):
        raise UserError("nothing to evaluate on: pass --input=FILE or --dataset=NAME (this model records no dataset)")
    path = Path(tc.get("data_root", "data")) / tc["dataset"]
    if not (path / "meta.json").is_file():
        raise UserError(f"the run's dataset {path} is not here (no meta.json): pass --dataset and --data_root, or "
                        f"--input=FILE")
    return path


def read_split(data_dir, split, meta):
    """The token memmap of a language-model split, checked against meta.json."""
    if split not in ("train", "val"):
        raise UserError(f"split={split!r} is unknown: use 'val' or 'train'")
    path = data_dir / f"{split}.bin"
    dtype = np.dtype(meta.get("dtype", "uint16"))
    if not path.is_file() or path.stat().st_size % dtype.itemsize:
        raise UserError(f"{path} is missing or not a whole number of {dtype} tokens: prepare the dataset again")
    return np.memmap(path, dtype=dtype, mode="r")


def same_tokenizer(a, b):
    return all(a.get(key) == b.get(key) for key in ("tokenizer", "chars", "extra_tokens"))


def documents(ids, meta, enc):
    """The texts of a split: the runs of ids between end-of-text tokens (prepare/text.py puts one between
    documents), decoded. meta.json's val_documents, where the prepare script wrote it, must count as many."""
    eot = meta.get("eot_token")
    cuts = np.flatnonzero(np.asarray(ids) == eot) if eot is not None else np.zeros(0, dtype=np.int64)
    bounds = [-1, *cuts.tolist(), len(ids)]
    return [enc.decode(np.asarray(ids[a + 1:b]).tolist()) for a, b in zip(bounds, bounds[1:]) if b > a + 1]


def count_chars(enc, ids):
    """Characters the ids decode to, a million tokens at a time (a character may span two chunks)."""
    if isinstance(enc, tok.CharTokenizer):
        return len(ids)
    decoder, n = codecs.getincrementaldecoder("utf-8")(errors="replace"), 0
    for i in range(0, len(ids), 1 << 20):
        n += len(decoder.decode(enc.enc.decode_bytes(np.asarray(ids[i:i + (1 << 20)]).tolist())))
    return n + len(decoder.decode(b"", final=True))


# ---- language models ------------------------------------------------------------------------------------------

def lm_result(total_nll, tokens, chars):
    mean = total_nll / max(1, tokens)
    return {"tokens": tokens, "characters": chars, "total_nll": total_nll, "mean_nll": mean,
            "perplexity": math.exp(mean) if mean < 700 else math.inf, "bits_per_token": mean / math.log(2),
            "bits_per_char": total_nll / math.log(2) / max(1, chars)}


def score_texts(model, enc, texts, cfg, run, ctx, bar):
    """Each text on its own (its first token is context only), summed into one result; texts shorter than 2 tokens
    are skipped and counted."""
    total, tokens, chars, skipped = 0.0, 0, 0, 0
    for text in bar(texts):
        try:
            ids = enc.encode_ordinary(text) if hasattr(enc, "encode_ordinary") else enc.encode(text)
        except tok.TokenizerError as e:
            raise UserError(f"the model's tokenizer cannot read the dataset's text: {e}")
        if len(ids) < 2:
            skipped += 1
            continue
        check_ids(ids, model)
        r = score_text(model, ids, run["block_size"], run["stride"], cfg.device, ctx, cfg.batch_size)
        total, tokens, chars = total + r["total_nll"], tokens + r["tokens"], chars + scored_chars(enc, text, ids)
    if tokens == 0:
        raise UserError("no document of 2 tokens or more to score")
    return {**lm_result(total, tokens, chars), "documents": len(texts) - skipped, "skipped_documents": skipped}


def check_ids(ids, model):
    if max(ids) >= model.config.vocab_size:  # e.g. a GPT-2 directory with a smaller vocabulary than GPT-2's tokenizer
        raise UserError(f"the text has token id {max(ids)} but the model knows only {model.config.vocab_size} "
                        f"tokens: score it with the tokenizer the model was trained with")


def evaluate_lm(cfg, model, enc, meta, ckpt, run, ctx, bar):
    if cfg.input:
        results = {}
        for path in dict.fromkeys(cfg.input.split(",")):  # each file once
            text = read_text(path)
            ids = encode(enc, text, model.config.vocab_size)
            r = score_text(model, ids, run["block_size"], run["stride"], cfg.device, ctx, cfg.batch_size, bar)
            results[path] = lm_result(r["total_nll"], r["tokens"], scored_chars(enc, text, ids))
        if len(results) > 1:
            results["all"] = lm_result(sum(r["total_nll"] for r in results.values()),
                                       sum(r["tokens"] for r in results.values()),
                                       sum(r["characters"] for r in results.values()))
        return results
    data_dir = dataset_dir(cfg, ckpt)
    data_meta = load_meta(data_dir)
    if data_meta.get("task", "lm") != "lm":
        raise UserError(f"{data_dir} holds classification data, but {run['name']} is a language model: evaluate it "
                        f"on language-model data or on text files (--input)")
    ids = read_split(data_dir, cfg.split, data_meta)
    name = f"{data_dir} {cfg.split}"
    if cfg.as_text or not same_tokenizer(meta, data_meta):
        try:
            texts = documents(ids, data_meta, tok.from_meta(data_meta))
        except tok.TokenizerError as e:
            raise UserError(f"{data_dir}/meta.json: {e}")
        listed = data_meta.get(f"{cfg.split}_documents")
        if listed is not None and len(listed) != len(texts):
            raise UserError(f"{data_dir}: {cfg.split}.bin holds {len(texts)} documents but meta.json lists "
                            f"{len(listed)}: prepare the dataset again")
        return {f"{name} (as text)": score_texts(model, enc, texts, cfg, run, ctx, bar)}
    ids = np.asarray(ids, dtype=np.int64)
    check_ids(ids, model)
    r = score_text(model, ids, run["block_size"], run["stride"], cfg.device, ctx, cfg.batch_size, bar)
    scored, eot = ids[1:], data_meta.get("eot_token")
    # an end-of-text token between documents counts as one character, whatever its decoded spelling
    n_eot = int((scored == eot).sum()) if eot is not None else 0
    chars = count_chars(enc, scored[scored != eot] if n_eot else scored) + n_eot
    return {name: lm_result(r["total_nll"], r["tokens"], chars)}


def print_lm(results, run):
    print(f"{run['name']}: block_size {run['block_size']}, stride {run['stride']}, {run['device']}")
    print(f"{'data':<40} {'tokens':>12} {'characters':>12} {'mean NLL':>9} {'perplexity':>11} {'bits/token':>10} "
          f"{'bits/char':>9}")
    for name, r in results.items():
        print(f"{name[-40:]:<40} {r['tokens']:>12,} {r['characters']:>12,} {r['mean_nll']:>9.4f} "
              f"{r['perplexity']:>11.4f} {r['bits_per_token']:>10.4f} {r['bits_per_char']:>9.4f}")


# ---- classifiers ----------------------------------------------------------------------------------------------

def classifier_rows(cfg, enc, labels, ckpt):
    """(name, texts, label ids or None, split arrays) of the data: --input rows or a prepared dataset's split."""
    if cfg.input:
        path = Path(cfg.input)
        if path.suffix == ".txt":
            rows = [(line, None) for line in read_text(cfg.input).splitlines() if line.strip()]
        else:
            try:
                rows = read_rows(path, cfg.text_field, cfg.label_field, unlabelled=True)
            except PrepareError as e:
                raise UserError(str(e))
        given = [label for _, label in rows if label is not None]
        if given and len(given) != len(rows):
            raise UserError(f"{path}: {len(rows) - len(given)} of {len(rows)} rows have no {cfg.label_field!r}: "
                            f"label every row, or none (predictions only)")
        unknown = sorted(set(given) - set(labels))
        if unknown:
            raise UserError(f"{path} has labels the model does not know: {unknown[:3]} (its labels: {labels})")
        dropped = set()
        ids = []
        for text, _ in rows:
            if isinstance(enc, tok.CharTokenizer):
                dropped.update(ch for ch in text if ch not in enc.stoi)
            ids.append(tok.example_ids(enc, text, drop_unknown=True))
        if dropped:
            print(f"warning: {len(dropped)} characters the model's vocabulary lacks were left out: "
                  + " ".join(repr(ch) for ch in sorted(dropped)[:10]))
        y = [labels.index(label) for _, label in rows] if given else None
        return path.stem, [t for t, _ in rows], y, classify.rows_split(ids, y)
    data_dir = dataset_dir(cfg, ckpt)
    data_meta = load_meta(data_dir)
    if data_meta.get("task") != "classify":
        raise UserError(f"{data_dir} holds language-model data, but the model is a classifier: give labelled rows "
                        f"(--input=rows.jsonl) or a dataset from prepare/classify.py")
    if data_meta["labels"] != labels:
        raise UserError(f"{data_dir} has the labels {data_meta['labels']}, the model {labels}: evaluate on data with "
                        f"the model's labels")
    try:
        split = classify.load_split(data_dir, cfg.split, data_meta)
    except classify.ClassifyError as e:
        raise UserError(str(e))
    tokens, offsets, y = split
    texts = [enc.decode(tokens[offsets[i]:offsets[i + 1] - 1].tolist()) for i in range(len(y))]  # no end marker
    return f"{data_dir.name}-{cfg.split}", texts, y.tolist(), split


def evaluate_classifier(cfg, model, enc, meta, ckpt, run, ctx, bar):
    labels = meta.get("labels")
    if not labels or len(labels) != model.config.n_classes:
        raise UserError(f"the meta.json of {run['name']} names no {model.config.n_classes} labels: it is not the "
                        f"classifier's (copy the classification dataset's meta.json beside the checkpoint)")
    name, texts, y, split = classifier_rows(cfg, enc, labels, ckpt)
    out = Path(cfg.predictions) if cfg.predictions else run["folder"] / f"predictions-{name}.jsonl"
    if cfg.input and out.resolve() == Path(cfg.input).resolve():
        raise UserError(f"--predictions={out} is the input file: pick another")
    probs = classify.predict(model, split, run["block_size"], cfg.batch_size, cfg.device, ctx, bar)
    pred = probs.argmax(-1)
    try:
        with open(out, "w", encoding="utf-8") as f:
            for i, text in enumerate(texts):
                f.write(json.dumps({"text": text, "label": labels[y[i]] if y is not None else None,
                                    "pred": labels[pred[i]],
                                    "probs": {c: round(float(p), 6) for c, p in zip(labels, probs[i])}},
                                   ensure_ascii=False) + "\n")
    except OSError as e:
        raise UserError(f"cannot write the predictions to {out}: {e.strerror or e}")
    result = {"examples": len(texts), "predictions": str(out), "labels": labels}
    if y is not None:
        counts = classify.confusion(pred, y, len(labels))
        result.update(accuracy=float(np.trace(counts) / len(y)), macro_f1=classify.macro_f1_of(counts),
                      per_class={c: dict(zip(("precision", "recall", "f1", "support"), v))
                                 for c, v in zip(labels, classify.per_class(counts))},
                      confusion=counts.tolist())
    return {name: result}


def print_classifier(results, run):
    (name, r), = results.items()
    print(f"{run['name']} on {name}: {r['examples']:,} examples, {len(r['labels'])} classes, block_size "
          f"{run['block_size']}, {run['device']}")
    if "accuracy" in r:
        print(f"accuracy  {r['accuracy']:.4f}\nmacro-F1  {r['macro_f1']:.4f}")
        width = max(8, *(len(c) for c in r["labels"]))
        print(f"{'class':<{width}} {'precision':>9} {'recall':>7} {'f1':>7} {'support':>8}")
        for c, v in r["per_class"].items():
            print(f"{c:<{width}} {v['precision']:>9.4f} {v['recall']:>7.4f} {v['f1']:>7.4f} {v['support']:>8,}")
        print("confusion matrix (rows: true label, columns: predicted)")
        print(" " * width + "".join(f" {c:>{width}}" for c in r["labels"]))
        for c, row in zip(r["labels"], r["confusion"]):
            print(f"{c:<{width}}" + "".join(f" {n:>{width},}" for n in row))
    else:
        print("no labels in the input: predictions only")
    print(f"predictions -> {r['predictions']}")


# ---- the tool -------------------------------------------------------------------------------------------------

def load_meta(data_dir):
    try:
        return tok.load_meta(data_dir / "meta.json")
    except tok.TokenizerError as e:
        raise UserError(str(e))


def evaluate(cfg):
    cfg.device, device_type, cfg.dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1")
    if cfg.input and cfg.dataset:
        raise UserError("pass --input or --dataset, not both")
    try:
        ckpt, where = checkpoint.load_checkpoint(cfg.ckpt or cfg.out_dir, "--ckpt" if cfg.ckpt else "--out_dir")
        model = checkpoint.load_model(ckpt, where.path)
        meta = checkpoint.find_tokenizer(ckpt, where, [cfg.out_dir])
        enc = tok.from_meta(meta)
    except ValueError as e:  # tok.TokenizerError is one too
        raise UserError(str(e))
    block_size = model.config.block_size
    stride = cfg.stride or max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise UserError(f"stride={stride} must be between 1 and the model's block_size={block_size} (0: half of it)")
    model.to(cfg.device).eval()
    run = {"name": str(where.path), "folder": where.path if where.kind == "hf" else where.path.parent,
           "block_size": block_size, "stride": stride, "device": f"{cfg.device} {cfg.dtype}"}
    ctx = autocast_context(device_type, cfg.dtype)

    def bar(items):  # tqdm draws only on a terminal (disable=None); the tool's output stays plain text
        return tqdm(items, disable=None if cfg.progress else True, leave=False, unit="batch")

    if model.config.n_classes > 0:
        results = evaluate_classifier(cfg, model, enc, meta, ckpt, run, ctx, bar)
        print_classifier(results, run)
    else:
        results = evaluate_lm(cfg, model, enc, meta, ckpt, run, ctx, bar)
        print_lm(results, run)
    if cfg.metrics:
        try:
            checkpoint.write_json(cfg.metrics, {"model": run["name"], **results})
        except OSError as e:
            raise UserError(f"cannot write --metrics={cfg.metrics}: {e.strerror or e}")
    return results


def main(argv=None):
    run_cli(evaluate, EvaluateConfig, argv)


if __name__ == "__main__":
    main()
