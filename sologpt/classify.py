"""Sequence classification (train.py task="classify"): the classifier model, its data (examples written by
prepare/classify.py), its batches (right-padded token rows with their lengths and labels) and its evaluation
(loss, accuracy, macro-F1).

The classifier is a GPT with a head on the pooled hidden states: a subclass, so it keeps GPT's weights and
state-dict keys (plus cls_head.*) and a language model becomes one by a class swap (set_classifier).
"""

from collections import namedtuple
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPT
from sologpt.distributed import Dist


class ClassifyError(ValueError):
    """A classification dataset that cannot be used; the message says what and how to fix it."""


TASKS = ("lm", "classify", "sft", "tag")  # sft: sologpt/sft.py; tag: sologpt/tag.py


def check(cfg):
    if cfg.task not in TASKS:
        raise ValueError(f"task={cfg.task!r} is unknown: use one of {', '.join(TASKS)}")
    if cfg.cls_pool not in ("last", "mean"):
        raise ValueError(f"cls_pool={cfg.cls_pool!r} is unknown: use 'last' or 'mean'")


class Classifier(GPT):
    """forward(idx (B, T), targets (B,) class ids, lengths (B,) real tokens per row) -> ((B, n_classes), loss).
    The last real token sees the whole text through causal attention ("last"); "mean" averages the real
    positions instead. Right padding never reaches real tokens."""

    def add_task_head(self, config):  # GPT.__init__ calls it before initialising the weights
        self.cls_head = nn.Linear(config.n_embd, config.n_classes)

    def forward(self, idx, targets=None, lengths=None):
        x = self.hidden_states(idx)  # (B, T, C)
        B, T, _ = x.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        if self.config.cls_pool == "last":
            pooled = x[torch.arange(B, device=x.device), lengths - 1]  # (B, C)
        else:
            mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)  # (B, T)
            pooled = (x * mask[..., None]).sum(1) / lengths[:, None].to(x.dtype)  # (B, C)
        logits = self.cls_head(pooled)  # (B, n_classes)
        loss = None if targets is None else F.cross_entropy(logits.float(), targets)
        return logits, loss


def set_classifier(model, n_classes, cls_pool="last"):
    """Make a language model a classifier with a fresh head (its lm_head stays, unused, tied to the embedding)."""
    model.config.n_classes, model.config.cls_pool = n_classes, cls_pool
    model.__class__ = Classifier
    model.cls_head = nn.Linear(model.config.n_embd, n_classes, device=model.transformer.wte.weight.device)
    model._init_weights(model.cls_head)
    return model


# ---- data ----------------------------------------------------------------------------------------------------

Split = namedtuple("Split", "tokens offsets labels")  # numpy arrays; tokens as in sologpt/examples.py's Split


def load_split(data_dir, split, meta):
    """Split(tokens, offsets, labels) numpy arrays of one split, checked against each other and meta.json."""
    data_dir = Path(data_dir)
    hint = "run prepare/classify.py again"
    paths = [data_dir / f"{split}{suffix}.bin" for suffix in ("", "_offsets", "_labels")]
    for p in paths:
        if not p.is_file():
            raise ClassifyError(f"{p} is missing: {hint}")
    dtype = np.dtype(meta.get("dtype", "uint16"))
    for p, itemsize in zip(paths, (dtype.itemsize, 8, 8)):
        if p.stat().st_size == 0 or p.stat().st_size % itemsize:
            raise ClassifyError(f"{p} is empty or not a whole number of {itemsize}-byte values (truncated?): {hint}")
    tokens = np.memmap(paths[0], dtype=dtype, mode="r")
    offsets = np.fromfile(paths[1], dtype=np.int64)
    labels = np.fromfile(paths[2], dtype=np.int64)
    n = len(labels)
    if n == 0 or len(offsets) != n + 1 or offsets[-1] != len(tokens) or (np.diff(offsets) < 1).any():
        raise ClassifyError(f"{data_dir}: {split} files do not match each other ({n} labels, {len(offsets)} "
                            f"offsets, {len(tokens)} tokens): {hint}")
    if labels.min() < 0 or labels.max() >= len(meta["labels"]):
        raise ClassifyError(f"{paths[2]} has a label id outside 0..{len(meta['labels']) - 1}: {hint}")
    return Split(tokens, offsets, labels)


def make_batch(split, rows, block_size, device):
    """Rows of a split -> x (B, T) right-padded with 0, lengths (B,), y (B,) labels. Longer examples keep their
    last block_size tokens: the end marker the head reads must survive the cut."""
    tokens, offsets, labels = split
    x = np.zeros((len(rows), block_size), dtype=np.int64)  # (B, T)
    lengths = np.zeros(len(rows), dtype=np.int64)
    for b, i in enumerate(rows):
        ids = tokens[max(offsets[i], offsets[i + 1] - block_size):offsets[i + 1]]
        x[b, :len(ids)] = ids
        lengths[b] = len(ids)
    out = [torch.from_numpy(a) for a in (x, lengths, labels[rows])]
    if device.startswith("cuda"):
        return [t.pin_memory().to(device, non_blocking=True) for t in out]
    return [t.to(device) for t in out]


class Rows:
    """The batch source of task "classify": every micro-batch is batch_size random examples (x, y, {lengths}).
    With several ranks each keeps every world-th of the step's micro-batches (as batches.Windows)."""

    def __init__(self, split, cfg, generator, d=Dist()):
        self.split, self.cfg, self.generator, self.d = split, cfg, generator, d

    def __call__(self, step):
        batches = [self.batch(self.cfg.batch_size, rows_only=True) for _ in range(self.cfg.gradient_accumulation_steps)]
        return [self.make(rows) for rows in batches[self.d.rank::self.d.world]]

    def make(self, rows):
        x, lengths, y = make_batch(self.split, rows, self.cfg.block_size, self.cfg.device)
        return x, y, {"lengths": lengths}

    def batch(self, batch_size, generator=None, rows_only=False):
        rows = torch.randint(len(self.split[2]), (batch_size,), generator=generator or self.generator).numpy()
        return rows if rows_only else self.make(rows)


# ---- evaluation --------------------------------------------------------------------------------------------

def confusion(pred, true, n_classes):
    """counts[t, p]: how many examples of class t were predicted as p."""
    return np.bincount(np.asarray(true) * n_classes + np.asarray(pred), minlength=n_classes ** 2).reshape(
        n_classes, n_classes)


def macro_f1(pred, true, n_classes):
    """The mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class never predicted nor present counts 0."""
    return macro_f1_of(confusion(pred, true, n_classes))


def macro_f1_of(counts):
    tp = np.diag(counts)
    fp, fn = counts.sum(0) - tp, counts.sum(1) - tp
    f1 = [2 * t / (2 * t + p + n) if t + p + n else 0.0 for t, p, n in zip(tp, fp, fn)]
    return float(sum(f1) / len(f1))


@torch.no_grad()
def evaluate(model, split, cfg, ctx, n_classes, max_examples=None, d=Dist()):
    """Loss, accuracy and macro-F1 over the first max_examples examples of a split (all of them by default). With
    several ranks each takes every world-th batch; the loss sums and the confusion counts are added up."""
    model.eval()
    n = len(split[2]) if max_examples is None else min(max_examples, len(split[2]))
    total_loss, counts = 0.0, np.zeros((n_classes, n_classes), dtype=np.int64)
    for k, start in enumerate(range(0, n, cfg.batch_size)):
        if k % d.world != d.rank:
            continue
        rows = np.arange(start, min(start + cfg.batch_size, n))
        x, lengths, y = make_batch(split, rows, cfg.block_size, cfg.device)
        with ctx:
            logits, loss = model(x, y, lengths=lengths)
        total_loss += loss.item() * len(rows)
        counts += confusion(logits.argmax(-1).cpu().numpy(), split[2][rows], n_classes)
    model.train()
    counts = d.sum(torch.from_numpy(counts)).cpu().numpy()
    return {"loss": d.mean(total_loss) * d.world / n, "accuracy": float(np.trace(counts) / n),
            "macro_f1": macro_f1_of(counts)}


def evaluate_splits(model, splits, cfg, ctx, n_classes, d=Dist()):
    """The whole val split, and as many train examples as eval_iters batches: {train_loss, train_accuracy, ...}."""
    out = {}
    for split, data in splits.items():
        limit = None if split == "val" else cfg.eval_iters * cfg.batch_size
        out.update({f"{split}_{k}": v for k, v in evaluate(model, data, cfg, ctx, n_classes, limit, d).items()})
    return out


# ---- evaluating a trained classifier on any labelled rows (tools/evaluate.py) ---------------------------------------

def rows_split(ids, labels=None):
    """Split(tokens, offsets, labels) arrays, as load_split returns them, of examples given as lists of ids (labels -1
    when unknown)."""
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(x) for x in ids])
    tokens = np.concatenate([np.asarray(x, dtype=np.int64) for x in ids]) if ids else np.zeros(0, dtype=np.int64)
    labels = np.full(len(ids), -1, dtype=np.int64) if labels is None else np.asarray(labels, dtype=np.int64)
    return Split(tokens, offsets, labels)


@torch.no_grad()
def predict(model, split, block_size, batch_size, device, ctx, progress=None):
    """Class probabilities (N, n_classes) of every example of a split, batch_size at a time. Each batch is cut to
    its longest row: right padding is never seen by a real token, so that changes no output, only the time.
    progress: a tqdm-like wrapper for the batches, or None."""
    model.eval()
    n = len(split[2])
    starts = range(0, n, batch_size)
    out = []
    for start in progress(starts) if progress else starts:
        rows = np.arange(start, min(start + batch_size, n))
        x, lengths, _ = make_batch((split[0], split[1], np.zeros(n, dtype=np.int64)), rows, block_size, device)
        x = x[:, :int(lengths.max())]  # (B, longest)
        with ctx:
            logits, _ = model(x, lengths=lengths)
        out.append(logits.float().softmax(-1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.config.n_classes), dtype=np.float32)


def per_class(counts):
    """[(precision, recall, f1, support)] per class of a confusion matrix (counts[true, predicted]); a ratio whose
    denominator is 0 is 0."""
    tp = np.diag(counts)
    predicted, support = counts.sum(0), counts.sum(1)
    out = []
    for t, p, s in zip(tp, predicted, support):
        precision, recall = (t / p if p else 0.0), (t / s if s else 0.0)
        f1 = 2 * t / (p + s) if p + s else 0.0
        out.append((float(precision), float(recall), float(f1), int(s)))
    return out
