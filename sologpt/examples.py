"""Datasets of examples of different lengths with one value per token, as prepare/examples.py writes them: task
"sft" (the loss mask, sologpt/sft.py) and task "tag" (the tags, sologpt/tag.py). Here: loading and checking a split,
and the batch source both tasks use.

Batches are padded, not packed: each micro-batch is batch_size whole examples, right-padded to block_size (targets
-1 on the padding, which the loss ignores). No example sees another, no attention mask is needed, and the shapes
never change (compile, CUDA graphs, batch_size="auto"); the cost is the padding, which the run reports at setup
(docs/finetuning.md: why this and not packing).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sologpt.distributed import Dist


class ExampleError(ValueError):
    """A split whose files cannot be used; the message says what and how to fix it."""


@dataclass
class Split:
    tokens: np.ndarray  # every example's tokens, one after another
    offsets: np.ndarray  # (n + 1,) int64: example i is tokens[offsets[i]:offsets[i + 1]]
    values: np.ndarray  # one per token: the loss mask (sft) or the tag id, -1 for none (tag)
    tasks: np.ndarray | None  # (n,) task ids of the examples (sft rows that name tasks), else None

    def __len__(self):
        return len(self.offsets) - 1

    def example(self, i):
        a, b = self.offsets[i], self.offsets[i + 1]
        return self.tokens[a:b], self.values[a:b]


def load_split(data_dir, split, meta, values, dtype, script):
    """One split's files (tokens, offsets, values and tasks if meta.json names tasks), checked against each other."""
    data_dir = Path(data_dir)
    hint = f"run prepare/{script}.py again"
    names = ["", "_offsets", f"_{values}"] + (["_tasks"] if meta.get("tasks") else [])
    paths = [data_dir / f"{split}{suffix}.bin" for suffix in names]
    for p in paths:
        if not p.is_file():
            raise ExampleError(f"{p} is missing: {hint}")
    tokens = np.memmap(paths[0], dtype=np.dtype(meta["dtype"]), mode="r")
    offsets = np.fromfile(paths[1], dtype=np.int64)
    vals = np.memmap(paths[2], dtype=dtype, mode="r")
    tasks = np.fromfile(paths[3], dtype=np.int64) if len(paths) > 3 else None
    n = len(offsets) - 1
    if n < 1 or offsets[0] != 0 or offsets[-1] != len(tokens) or (np.diff(offsets) < 1).any() \
            or len(vals) != len(tokens) or (tasks is not None and len(tasks) != n):
        raise ExampleError(f"{data_dir}: the {split} files do not match each other ({n} examples, {len(tokens)} "
                           f"tokens, {len(vals)} {values}): {hint}")
    if tasks is not None and (tasks.min() < 0 or tasks.max() >= len(meta["tasks"])):
        raise ExampleError(f"{paths[3]} has a task id outside 0..{len(meta['tasks']) - 1}: {hint}")
    return Split(tokens, offsets, vals, tasks)


def to_device(arrays, device):
    """numpy arrays -> tensors on device (pinned first on CUDA, so the copy overlaps GPU work)."""
    out = [torch.from_numpy(a) for a in arrays]
    if device.startswith("cuda"):
        return [t.pin_memory().to(device, non_blocking=True) for t in out]
    return [t.to(device) for t in out]


class Source:
    """A batch source of examples: every micro-batch is batch_size random examples of `pool` (the example ids that
    have something to learn within block_size), made into (x, y) by make(rows). With several ranks every rank draws
    the step's micro-batches alike and keeps every world-th one, as batches.Windows does."""

    def __init__(self, pool, make, cfg, generator, d=Dist()):
        self.pool, self.make, self.cfg, self.generator, self.d = pool, make, cfg, generator, d

    def __call__(self, step):
        draws = [self.rows(self.cfg.batch_size) for _ in range(self.cfg.gradient_accumulation_steps)]
        return [(*self.make(rows), {}) for rows in draws[self.d.rank::self.d.world]]

    def rows(self, batch_size, generator=None):
        pick = torch.randint(len(self.pool), (batch_size,), generator=generator or self.generator)
        return self.pool[pick.numpy()]

    def batch(self, batch_size, generator=None):
        """One micro-batch (x, y, kw) of batch_size examples, e.g. a trial batch of the batch-size search."""
        return (*self.make(self.rows(batch_size, generator)), {})


def spread(n, k):
    """k example ids spread evenly over 0..n-1 (all of them when k >= n): no bias from the order of the file."""
    return np.arange(n) if k >= n else np.unique(np.linspace(0, n - 1, k).round().astype(np.int64))


def padding_line(lengths, block_size):
    """How much of the batches the padding takes, for the setup report."""
    real = np.minimum(lengths, block_size).mean()
    return f"{100 * (1 - real / block_size):.0f}% of each batch is padding (mean {real:.0f} of {block_size} tokens)"
