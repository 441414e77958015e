"""Classification data for train.py (task="classify"): examples written by prepare/classify.py, batches of
right-padded token rows with their lengths and labels, and evaluation by loss, accuracy and macro-F1."""

from pathlib import Path

import numpy as np
import torch


class ClassifyError(ValueError):
    """A classification dataset that cannot be used; the message says what and how to fix it."""


def load_split(data_dir, split, meta):
    """(tokens, offsets, labels) numpy arrays of one split, checked against each other and meta.json."""
    data_dir = Path(data_dir)
    hint = "run prepare/classify.py again"
    paths = [data_dir / f"{split}{suffix}.bin" for suffix in ("", "_offsets", "_labels")]
    for p in paths:
        if not p.is_file():
            raise ClassifyError(f"{p} is missing: {hint}")
    tokens = np.memmap(paths[0], dtype=np.dtype(meta["dtype"]), mode="r")
    offsets = np.fromfile(paths[1], dtype=np.int64)
    labels = np.fromfile(paths[2], dtype=np.int64)
    n = len(labels)
    if n == 0 or len(offsets) != n + 1 or offsets[-1] != len(tokens) or (np.diff(offsets) < 1).any():
        raise ClassifyError(f"{data_dir}: {split} files do not match each other ({n} labels, {len(offsets)} "
                            f"offsets, {len(tokens)} tokens): {hint}")
    if labels.min() < 0 or labels.max() >= len(meta["labels"]):
        raise ClassifyError(f"{paths[2]} has a label id outside 0..{len(meta['labels']) - 1}: {hint}")
    return tokens, offsets, labels


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


def get_batch(split, batch_size, block_size, generator, device):
    rows = torch.randint(len(split[2]), (batch_size,), generator=generator).numpy()
    return make_batch(split, rows, block_size, device)


def macro_f1(pred, true, n_classes):
    """The mean over classes of F1 = 2 TP / (2 TP + FP + FN); a class never predicted nor present counts 0."""
    f1 = []
    for c in range(n_classes):
        tp = int(((pred == c) & (true == c)).sum())
        fp = int(((pred == c) & (true != c)).sum())
        fn = int(((pred != c) & (true == c)).sum())
        f1.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(f1) / n_classes


@torch.no_grad()
def evaluate(model, split, cfg, ctx, n_classes, max_examples=None):
    """Loss, accuracy and macro-F1 over the first max_examples examples of a split (all of them by default)."""
    model.eval()
    n = len(split[2]) if max_examples is None else min(max_examples, len(split[2]))
    total_loss, preds = 0.0, []
    for start in range(0, n, cfg.batch_size):
        rows = np.arange(start, min(start + cfg.batch_size, n))
        x, lengths, y = make_batch(split, rows, cfg.block_size, cfg.device)
        with ctx:
            logits, loss = model(x, y, lengths=lengths)
        total_loss += loss.item() * len(rows)
        preds.append(logits.argmax(-1).cpu())
    model.train()
    pred, true = torch.cat(preds).numpy(), split[2][:n]
    return {"loss": total_loss / n, "accuracy": float((pred == true).mean()), "macro_f1": macro_f1(pred, true, n_classes)}
