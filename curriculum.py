"""Curriculum options for train.py, both off by default:

- sequence-length warmup (seq_warmup_iters > 0): the sequences start at seq_warmup_start tokens and grow linearly
  to block_size over the first seq_warmup_iters steps, with the batch widened so the tokens per step stay the
  same. Short sequences are cheaper per token (attention is quadratic) and give many more, noisier updates early,
  when the model learns mostly local statistics (Li et al. 2022, "The Stability-Efficiency Dilemma").
- easy-first ordering (curriculum = "unigram"): the first epoch visits the training windows from easiest to hardest,
  then batches are random again. A window's difficulty is its mean surprisal under the training text's unigram
  distribution (the loss of the smallest possible language model): windows of common tokens come first.

Both are deterministic functions of the step, so exact resume needs no extra state.
"""

import numpy as np
import torch


def batch_shape(it, cfg):
    """(sequences, sequence length) of the micro-batches at step it."""
    if cfg.seq_warmup_iters <= 0 or it >= cfg.seq_warmup_iters:
        return cfg.batch_size, cfg.block_size
    T = cfg.seq_warmup_start + (cfg.block_size - cfg.seq_warmup_start) * it / cfg.seq_warmup_iters
    step = max(8, cfg.block_size // 8)  # a few lengths only: each new shape costs a recompile under torch.compile
    T = min(cfg.block_size, max(cfg.seq_warmup_start, int(T) // step * step))
    return max(1, cfg.batch_size * cfg.block_size // T), T  # (B, T) with B * T ~ batch_size * block_size


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
        xy = np.stack([self.data[w * self.T:w * self.T + self.T + 1] for w in rows]).astype(np.int64)  # (B, T+1)
        xy = torch.from_numpy(xy).to(device)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # (B, T), (B, T)
