"""Score a text under a model: negative log-likelihood, perplexity, bits per token and bits per character.

    python -m tools.score --out_dir=out-small --input=data/shakespeare/input.txt
    python -m tools.score --ckpt=out-small/ckpt_int4.pt --input=held_out.txt  # any checkpoint kind, quantized too
    python -m tools.score --hf_dir=gpt2 --input=held_out.txt --stride=512      # a Hugging Face GPT-2 directory

(tools/evaluate.py does this and more: a prepared dataset's split, several files, classifiers.)

The text is tokenized with the model's own tokenizer (meta.json beside the checkpoint; GPT-2's BPE for --hf_dir).
Every token after the first is scored once. A text longer than the context is read in windows of block_size tokens
that start `stride` tokens apart: each window scores only the tokens the previous windows did not, so every token
but those of the first window sees at least block_size - stride tokens of left context. stride=1 gives every token
its full context (slow); stride=block_size gives the cheapest, worst estimate. This is the usual strided
evaluation (Hugging Face's "Perplexity of fixed-length models" guide), except that a window's first target is the
token just after the previous window's last target, so no token is skipped between windows.

bits per character = total NLL / ln 2 / the characters the scored tokens cover: the text minus the characters of its
first token, which is never predicted (a character split across tokens counts as scored). Per character, unlike per
token, the numbers of models with different tokenizers can be compared.
"""

import itertools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from sologpt import checkpoint, tokenizer as tok
from sologpt.configurator import UserError, run_cli
from sologpt.hardware import autocast_context, resolve_device


@dataclass
class ScoreConfig:
    out_dir: str = "out"  # a run folder (ckpt.pt and meta.json), a checkpoint file or a Hugging Face GPT-2 directory
    ckpt: str = ""  # another checkpoint (e.g. out/ckpt_int8.pt); "": out_dir's
    hf_dir: str = ""  # a Hugging Face GPT-2 directory (GPT-2 tokenizer unless it holds a meta.json); overrides both
    input: str = ""  # the UTF-8 text file to score
    stride: int = 0  # tokens between window starts; 0 is block_size // 2
    batch_size: int = 8  # windows per forward pass (same result, only speed and memory change)
    progress: bool = True  # a progress bar over the windows (drawn only on a terminal)
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that have it (else float16), float32 elsewhere


def windows(n_tokens, block_size, stride):
    """(start, first_target, end) per window over ids[0:n_tokens]: the window reads ids[start:end-1] and predicts
    ids[start+1:end]; only targets first_target..end-1 are scored. Together the windows score 1..n_tokens-1 once."""
    out, done = [], 1  # targets before `done` are scored
    while done < n_tokens:
        end = min(n_tokens, block_size + 1 if done == 1 else done + stride)
        start = max(0, end - 1 - block_size)  # as much left context as fits in block_size inputs
        out.append((start, done, end))
        done = end
    return out


def batches(spans, batch_size):
    """Consecutive windows of one length, batch_size at a time (all windows are full but a short text's only one)."""
    out = []
    for _, group in itertools.groupby(spans, key=lambda w: w[2] - w[0] - 1):
        group = list(group)
        out += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    return out


@torch.no_grad()
def score_text(model, enc_ids, block_size, stride, device, ctx, batch_size=8, progress=None):
    """Total and mean NLL of enc_ids[1:] under model (a language model), windows as in windows().
    Returns {"tokens", "total_nll", "mean_nll", "perplexity", "bits_per_token"}; NLLs in nats. progress: a tqdm-like
    wrapper for the batches of windows, or None."""
    ids = torch.as_tensor(enc_ids, dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"the text has {ids.numel()} token(s); scoring needs at least 2 (the first is only context)")
    if not 1 <= stride <= block_size:
        raise ValueError(f"stride={stride} must be between 1 and block_size={block_size}")
    was_training = model.training
    model.eval()
    total = 0.0  # a Python float (float64): summing a million per-token NLLs in float32 would lose digits
    todo = batches(windows(ids.numel(), block_size, stride), batch_size)
    for batch in progress(todo) if progress else todo:
        x = torch.stack([ids[s:e - 1] for s, _, e in batch])  # (B, T)
        y = torch.stack([ids[s + 1:e] for s, _, e in batch])  # (B, T)
        for row, (s, first, _) in enumerate(batch):
            y[row, :first - s - 1] = -1  # targets an earlier window scored: context only
        x, y = x.to(device), y.to(device)
        with ctx:
            logits, _ = model(x)  # (B, T, vocab)
        # float32: the log-softmax of bf16 logits over a large vocabulary loses precision
        nll = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1), ignore_index=-1, reduction="sum")
        total += nll.item()
    model.train(was_training)
    n = ids.numel() - 1
    mean = total / n
    return {"tokens": n, "total_nll": total, "mean_nll": mean, "perplexity": math.exp(mean) if mean < 700 else math.inf,
            "bits_per_token": mean / math.log(2)}


def load(cfg):
    """(model on the CPU, tokenizer, a name for printing) for the configured source: --hf_dir, else --ckpt, else
    --out_dir, each a run folder, a checkpoint file or a Hugging Face GPT-2 directory (checkpoint.locate)."""
    flag, spec = next((f, v) for f, v in (("--hf_dir", cfg.hf_dir), ("--ckpt", cfg.ckpt), ("--out_dir", cfg.out_dir))
                      if v or f == "--out_dir")
    try:
        model, meta, where = checkpoint.load_with_meta(spec, flag=flag)
        enc = tok.from_meta(meta)
    except ValueError as e:  # tok.TokenizerError is a ValueError too
        raise UserError(str(e))
    return model, enc, str(where.path)


def read_text(path):
    if not path:
        raise UserError("no text to score: pass --input=FILE (UTF-8 text)")
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise UserError(f"cannot read --input {path}: {e.strerror or e}")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x}): convert it to UTF-8")


def encode(enc, text, vocab_size):
    try:
        ids = enc.encode(text)
    except tok.TokenizerError as e:
        raise UserError(f"input: {e}")
    if len(ids) < 2:
        raise UserError(f"the input is {len(ids)} token(s) long: scoring needs at least 2 (the first is only context)")
    if max(ids) >= vocab_size:  # e.g. a GPT-2 directory with a smaller vocabulary than GPT-2's tokenizer
        raise UserError(f"the input has token id {max(ids)} but the model knows only {vocab_size} tokens: "
                        f"score it with the tokenizer the model was trained with")
    return ids


def scored_chars(enc, text, ids):
    """Characters covered by ids[1:]: all of the text but its first token's (which may be a partial character)."""
    first = enc.decode(ids[:1])
    return len(text) - (len(first) if text.startswith(first) else 0)


def score(cfg):
    cfg.device, device_type, cfg.dtype = resolve_device(cfg.device, cfg.dtype)
    if cfg.batch_size < 1:
        raise UserError(f"batch_size={cfg.batch_size} must be at least 1")
    text = read_text(cfg.input)
    model, enc, name = load(cfg)
    if model.config.n_classes > 0 or model.config.n_tags > 0:
        kind = "a classifier" if model.config.n_classes > 0 else "a tagger"
        raise UserError(f"{name} is {kind}: scoring needs a language model")
    block_size = model.config.block_size
    stride = cfg.stride or max(1, block_size // 2)
    if not 1 <= stride <= block_size:
        raise UserError(f"stride={stride} must be between 1 and the model's block_size={block_size} (0: half of it)")
    ids = encode(enc, text, model.config.vocab_size)
    model.to(cfg.device)
    bar = (lambda items: tqdm(items, disable=None if cfg.progress else True, leave=False, unit="batch"))
    result = score_text(model, ids, block_size, stride, cfg.device, autocast_context(device_type, cfg.dtype),
                        cfg.batch_size, bar)
    result["characters"] = scored_chars(enc, text, ids)
    result["bits_per_char"] = result["total_nll"] / math.log(2) / max(1, result["characters"])
    print(f"{name} on {cfg.input}: block_size {block_size}, stride {stride}, {cfg.device} {cfg.dtype}")
    print(f"tokens       {result['tokens']:,} (scored; the first token is context only)")
    print(f"characters   {result['characters']:,}")
    print(f"mean NLL     {result['mean_nll']:.4f} nats/token")
    print(f"perplexity   {result['perplexity']:.4f}")
    print(f"bits/token   {result['bits_per_token']:.4f}")
    print(f"bits/char    {result['bits_per_char']:.4f}")
    return result


def main(argv=None):
    run_cli(score, ScoreConfig, argv)


if __name__ == "__main__":
    main()
