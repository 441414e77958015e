"""Curriculum options for train.py, both off by default:

- sequence-length warmup (seq_warmup_iters > 0): the sequences start at seq_warmup_start tokens and grow linearly
  to block_size over the first seq_warmup_iters steps, with the batch widened so the tokens per step stay the
  same. Short sequences are cheaper per token (attention is quadratic) and give many more, noisier updates early,
  when the model learns mostly local statistics (Li et al. 2022, "The Stability-Efficiency Dilemma").
- easy-first ordering (curriculum = "unigram"): the first epoch visits the training windows from easiest to hardest,
  then batches are random again. A window's difficulty is its mean surprisal under the training text's unigram
  distribution (the loss of the smallest possible language model): windows of common tokens come first.

Both are deterministic functions of the step, so exact resume needs no extra state. Each is a batch source
(sologpt/batches.py): called once per step, it returns that step's micro-batches.
"""

import numpy as np
import torch

from sologpt.batches import Windows, windows


def check(cfg):
    if cfg.seq_warmup_iters < 0:
        raise ValueError(f"seq_warmup_iters={cfg.seq_warmup_iters} must not be negative")
    if cfg.curriculum not in ("none", "unigram"):
        raise ValueError(f"curriculum={cfg.curriculum!r} is unknown: use 'none' or 'unigram'")
    if cfg.seq_warmup_iters and not 1 <= cfg.seq_warmup_start <= cfg.block_size:
        raise ValueError(f"seq_warmup_start={cfg.seq_warmup_start} must be between 1 and block_size={cfg.block_size}")
    if (cfg.seq_warmup_iters or cfg.curriculum != "none") and cfg.task != "lm":
        raise ValueError("seq_warmup_iters and curriculum apply to task 'lm'")
    if cfg.seq_warmup_iters and cfg.curriculum != "none":
        raise ValueError("seq_warmup_iters and curriculum cannot be combined yet: use one at a time")


def batch_shape(it, cfg):
    """(sequences, sequence length) of the micro-batches at step it."""
    if cfg.seq_warmup_iters <= 0 or it >= cfg.seq_warmup_iters:
        return cfg.batch_size, cfg.block_size
    T = cfg.seq_warmup_start + (cfg.block_size - cfg.seq_warmup_start) * it / cfg.seq_warmup_iters
    step = max(8, cfg.block_size // 8)  # a few lengths only: each new shape costs a recompile under torch.compile
    T = min(cfg.block_size, max(cfg.seq_warmup_start, int(T) // step * step))
    return max(1, cfg.batch_size * cfg.block_size // T), T  # (B, T) with B * T ~ batch_size * block_size


class SeqWarmup(Windows):
    """Random windows whose length (and count) follow batch_shape(step): short and many early, then block_size."""

    def __call__(self, step):
        B, T = batch_shape(step, self.cfg)
        return [(*windows(self.data, ix.tolist(), T, self.cfg.device), {}) for ix in self.own(B, T)]


class EasyFirst:
    """The training stream cut into windows of block_size + 1 tokens, sorted by mean unigram surprisal."""

    def __init__(self, data, block_size, vocab_size, chunk=1 << 24):
        counts = np.zeros(vocab_size, dtype=np.int64)
        for i in range(0, len(data), chunk):  # the memmap in chunks: bounded memory
            counts += np.bincount(np.asarray(data[i:i + chunk]), minlength=vocab_size)
        surprisal = -np.log((counts + 1) / (counts.sum() + vocab_size))  # add-one smoothing
        n = (len(data) - 1) // block_size
        scores = np.empty(n)
        for w in range(n):
            scores[w] = surprisal[np.asarray(data[w * block_size:(w + 1) * block_size + 1])].mean()
        self.data, self.T = data, block_size
        self.order = np.argsort(scores, kind="stable")  # easiest first
        self.scores = scores[self.order]

    def batch(self, index, batch_size, device):
        """The index-th micro-batch of the first epoch, or None once the epoch is used up."""
        rows = self.order[index * batch_size:(index + 1) * batch_size]
        if len(rows) < batch_size:
            return None
        return windows(self.data, [w * self.T for w in rows], self.T, device)  # (B, T), (B, T)


class EasyFirstSource(Windows):
    """The first epoch's windows easiest first, then random windows (the batch source of curriculum="unigram")."""

    def __init__(self, data, cfg, generator, vocab_size, d):
        super().__init__(data, cfg, generator, d)
        self.easy = EasyFirst(data, cfg.block_size, vocab_size)
        self.announced = False

    def __call__(self, step):
        accum, out = self.cfg.gradient_accumulation_steps, []
        if not self.announced:  # here, not at setup: batch_size="auto" is only known after the source is made
            self.announced = True
            print(f"curriculum: {len(self.easy.order):,} windows, easiest first for "
                  f"{len(self.easy.order) // (self.cfg.batch_size * accum):,} steps")
        B, T = self.cfg.batch_size, self.cfg.block_size
        for micro in range(accum):  # every rank goes through all of the step's micro-batches, keeps its own
            ours = micro % self.d.world == self.d.rank
            if (step * accum + micro + 1) * B <= len(self.easy.order):  # still in the easy-first epoch
                xy = self.easy.batch(step * accum + micro, B, self.cfg.device) if ours else None
            else:  # random windows: every rank draws them, so the generator stays the same everywhere
                ix = torch.randint(len(self.data) - T, (B,), generator=self.generator)
                xy = windows(self.data, ix.tolist(), T, self.cfg.device) if ours else None
            if ours:
                out.append((*xy, {}))
        return out
