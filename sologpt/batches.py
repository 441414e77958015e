"""The data a run trains on: a prepared dataset (train.bin / val.bin memmaps and meta.json), the micro-batches of
each optimizer step, and the language model's evaluation.

A batch source is called once per step and returns that step's micro-batches, each (x, y, kw): inputs, targets
and the keyword arguments the model's forward takes besides them (a classifier's row lengths). Its generator draws
the random windows; its state goes into the checkpoint, so a resumed run sees the same batches. Windows (here) is
the plain one; classification rows (classify.py), examples (examples.py: sft.py, tag.py) and the curriculum's
sources (curriculum.py) are the others, and sologpt/build.py picks one per run.
"""

import math
import subprocess
import sys
from dataclasses import dataclass
from importlib.util import find_spec
from pathlib import Path

import numpy as np
import torch

from sologpt import classify, examples, sft, tag, tokenizer as tok
from sologpt.configurator import UserError
from sologpt.distributed import Dist

# prepare/ modules that are not one dataset
PREPARE_HELPERS = ("__init__", "common", "clean", "dedup", "text", "classify", "examples", "instruct", "tags",
                   "demo_tasks")
# the tasks whose data are examples rather than one token stream: their split loader and prepare script
EXAMPLE_TASKS = {"classify": (classify.load_split, "classify"), "sft": (sft.load_split, "instruct"),
                 "tag": (tag.load_split, "tags")}


@dataclass
class Dataset:
    splits: dict  # "train", "val": token memmaps (language model) or (tokens, offsets, labels) (classifier)
    meta: dict  # meta.json: the tokenizer and what the prepare script recorded
    enc: object  # the tokenizer, rebuilt from meta.json
    max_id: int  # the largest token id in the data: it needs a row in the embedding


def load_dataset(cfg, d=Dist()):
    """Open data_root/dataset's splits and read meta.json, preparing the dataset first if a prepare/ script of that
    name exists and nothing is there yet (rank 0 prepares, the others wait). Every problem is one UserError line
    that says how to fix it."""
    data_dir = Path(cfg.data_root) / cfg.dataset
    files = [data_dir / name for name in ("train.bin", "val.bin", "meta.json")]
    script = None if cfg.dataset in PREPARE_HELPERS or not cfg.dataset.isidentifier() else \
        find_spec(f"prepare.{cfg.dataset}")
    hint = f"run python prepare/{cfg.dataset}.py" if script else "prepare it first (docs/data.md)"
    if not any(f.exists() for f in files) and script and d.main:
        print(f"{data_dir} is not prepared yet: running prepare/{cfg.dataset}.py")
        # absolute paths: the script runs where the prepare package lives, not in the user's folder
        cmd = [sys.executable, "-m", f"prepare.{cfg.dataset}", "--data_root", str(Path(cfg.data_root).resolve())]
        if cfg.data_input:
            cmd += ["--input", str(Path(cfg.data_input).resolve())]
        root = Path(script.origin).parents[1]  # where the prepare package lives: run it from there
        if subprocess.run(cmd, cwd=root).returncode != 0:
            raise UserError(f"preparing {data_dir} failed (see above); offline, pass --data_input=path/to/input.txt")
    d.barrier()
    # several nodes: rank 0 prepared it on its own machine
    nodes = "; every node reads it at this path (a shared filesystem, or a copy on each)" if d.nodes > 1 else ""
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is missing: {hint}{nodes}")
    try:
        meta = tok.load_meta(data_dir / "meta.json")
        enc = tok.from_meta(meta)  # now, not after training: a broken meta.json should fail before step 0
    except tok.TokenizerError as e:
        raise UserError(str(e))
    if meta.get("dtype", "uint16") not in ("uint16", "uint32"):
        raise UserError(f"{data_dir}/meta.json has dtype={meta['dtype']!r}; token files are uint16 or uint32: "
                        f"{hint} again")
    if meta.get("task", "lm") != cfg.task:
        fix = f"task={meta.get('task', 'lm')!r}" if meta.get("task", "lm") in ("lm", *EXAMPLE_TASKS) else "other data"
        if cfg.task in EXAMPLE_TASKS:
            fix += f", or a dataset from prepare/{EXAMPLE_TASKS[cfg.task][1]}.py"
        raise UserError(f"{data_dir} holds {meta.get('task', 'lm')!r} data but task={cfg.task!r}: use {fix}")
    if cfg.task in EXAMPLE_TASKS:  # labelled examples instead of one token stream
        if cfg.task == "classify":
            labels = meta.get("labels")
            if not (isinstance(labels, list) and len(labels) >= 2 and all(isinstance(x, str) for x in labels)):
                raise UserError(f"{data_dir}/meta.json has no list of at least two label names: run python "
                                f"prepare/classify.py again")
        load_split = EXAMPLE_TASKS[cfg.task][0]
        try:
            splits = {split: load_split(data_dir, split, meta) for split in ("train", "val")}
        except (classify.ClassifyError, examples.ExampleError) as e:
            raise UserError(str(e))
        max_id = max(int(s.tokens.max()) for s in splits.values())  # from the data, as below
        if max_id >= meta["vocab_size"]:
            raise UserError(f"{data_dir} holds token id {max_id} but {data_dir / 'meta.json'} says vocab_size="
                            f"{meta['vocab_size']}: {hint} again")
        return Dataset(splits, meta, enc, max_id)
    dtype = np.dtype(meta.get("dtype", "uint16"))
    splits = {}
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        size = path.stat().st_size
        if size % dtype.itemsize:
            raise UserError(f"{path} is not a whole number of {dtype} tokens (truncated?): {hint} again")
        # np.memmap refuses an empty file
        splits[split] = np.memmap(path, dtype=dtype, mode="r") if size else np.zeros(0, dtype=dtype)
        if len(splits[split]) < cfg.block_size + 1:
            raise UserError(f"{path} has {len(splits[split])} tokens, fewer than block_size + 1 = "
                            f"{cfg.block_size + 1}: lower --block_size or use more text")
        expected = meta.get(f"{split}_tokens")
        if expected is not None and expected != len(splits[split]):
            raise UserError(f"{path} has {len(splits[split])} tokens but meta.json says {expected}: {hint} again")
    # the largest id must have a row in the embedding: read from the data itself (meta.json's max_token_id may be
    # stale or edited), in chunks of 16M tokens: 0.1 s per GB of uint16 tokens in the page cache (measured on a 2-core
    # CPU), else as fast as the disk reads
    max_id = max(int(d[i:i + (1 << 24)].max()) for d in splits.values() for i in range(0, len(d), 1 << 24))
    if max_id >= meta["vocab_size"]:
        raise UserError(f"{data_dir} holds token id {max_id} but {data_dir / 'meta.json'} says vocab_size="
                        f"{meta['vocab_size']}: {hint} again")
    return Dataset(splits, meta, enc, max_id)


def windows(data, starts, block_size, device):
    """The windows of the token stream that begin at starts: x = tokens[i:i+T], y = tokens[i+1:i+1+T]."""
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in starts]).astype(np.int64))  # (B, T+1)
    if device.startswith("cuda"):  # pinned memory lets the copy overlap GPU work
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # (B, T), (B, T)


def get_batch(data, batch_size, block_size, generator, device):
    """batch_size random windows of the token stream (x, y), y being x shifted one token ahead."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    return windows(data, ix.tolist(), block_size, device)


class Windows:
    """The plain language-model source: every micro-batch is batch_size random windows of block_size tokens.
    With several ranks (sologpt/distributed.py) every rank draws the step's gradient_accumulation_steps micro-batches
    from the same generator and keeps every world-th one: the step trains on the same windows whatever their number."""

    def __init__(self, data, cfg, generator, d=Dist()):
        self.data, self.cfg, self.generator, self.d = data, cfg, generator, d

    def __call__(self, step):
        T = self.cfg.block_size
        return [(*windows(self.data, ix.tolist(), T, self.cfg.device), {}) for ix in self.own(self.cfg.batch_size, T)]

    def own(self, B, T):
        """The start positions of this rank's micro-batches: all of the step's are drawn, every world-th kept."""
        draws = [torch.randint(len(self.data) - T, (B,), generator=self.generator)
                 for _ in range(self.cfg.gradient_accumulation_steps)]
        return draws[self.d.rank::self.d.world]

    def batch(self, batch_size, generator=None):
        """One micro-batch (x, y, kw) of batch_size windows, e.g. a trial batch of the batch-size search."""
        x, y = get_batch(self.data, batch_size, self.cfg.block_size, generator or self.generator, self.cfg.device)
        return x, y, {}


@torch.no_grad()
def estimate_loss(model, splits, cfg, ctx, d=Dist()):
    """Mean loss over eval_iters batches per split, and its perplexity. The batches come from a generator seeded the
    same way every time, so evaluations are comparable across steps and do not disturb the training batches. With
    several ranks each takes every world-th batch and the sums are added up."""
    model.eval()
    out = {}
    for i, (split, data) in enumerate(splits.items()):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + i)
        total = 0.0
        for k in range(cfg.eval_iters):
            ix = torch.randint(len(data) - cfg.block_size, (cfg.batch_size,), generator=gen)
            if k % d.world == d.rank:
                x, y = windows(data, ix.tolist(), cfg.block_size, cfg.device)
                with ctx:
                    _, loss = model(x, y)
                total += loss.item()
        out[f"{split}_loss"] = d.mean(total) * d.world / cfg.eval_iters
        out[f"{split}_ppl"] = math.exp(min(out[f"{split}_loss"], 700.0))
    model.train()
    return out
