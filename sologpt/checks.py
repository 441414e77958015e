"""train.py's config checks, before any data is read or any model built: a bad value (or a bad combination) stops
the run with one line that names it and says what to do. The generic rules live here; each feature module checks
its own values (check(cfg)). Also fills in the derived values: the "auto" device, dtype, vocab_pad_multiple, compile
and cuda_graphs, and lr_decay_iters."""

import dataclasses
import math
from pathlib import Path

from model import GPTConfig
from sologpt import (board, checkpoint, chunked_ce, classify, cuda_graph, curriculum, distill, distributed, fp8, freeze,
                     galore, guard, lora, memory, muon, plots, quantize, sft)
from sologpt.configurator import UserError, resolve_auto_bool
from sologpt.hardware import resolve_device

ATTN_BACKENDS = ("auto", "flash", "cudnn", "efficient")
# each feature's own checks, in this order; they run after the device and dtype are resolved
FEATURE_CHECKS = (classify.check, sft.check, freeze.check, memory.check, curriculum.check, quantize.check,
                  distill.check, lora.check, muon.check, galore.check, chunked_ce.check, fp8.check, distributed.check,
                  guard.check, plots.check, board.check, cuda_graph.resolve)


def resolve(cfg):
    """Check every value, fill in the derived ones; returns the device type ("cpu", "cuda" or "mps")."""
    if cfg.batch_size != "auto" and (isinstance(cfg.batch_size, str) or cfg.batch_size < 1):
        raise UserError(f"batch_size={cfg.batch_size!r} must be a positive integer or 'auto'")
    for key in ("block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval", "n_layer", "n_head", "n_embd"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be at least 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "grad_checkpointing",
                "auto_batch_sequences"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key}={getattr(cfg, key)} must not be negative")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: pick values where it is")
    for field in dataclasses.fields(cfg):  # a config built in code skips the parser's check: NaN passes every range
        value = getattr(cfg, field.name)  # check below, and no setting means anything at infinity
        if isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"{field.name}={value} must be a finite number")
    for key in ("learning_rate", "min_lr", "weight_decay", "grad_clip"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key}={getattr(cfg, key)} must not be negative")
    for key in ("beta1", "beta2"):
        if not 0.0 <= getattr(cfg, key) < 1.0:
            raise UserError(f"{key}={getattr(cfg, key)} must be in [0, 1)")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"dropout={cfg.dropout} must be in [0, 1)")
    if cfg.attn_impl not in ("sdpa", "math"):
        raise UserError(f"attn_impl={cfg.attn_impl!r} is unknown: use 'sdpa' or 'math'")
    if cfg.init_from not in ("scratch", "resume") and not Path(cfg.init_from).exists():
        raise UserError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume' or an existing path: give a run "
                        f"folder (out_dir), a checkpoint file or a Hugging Face GPT-2 directory")
    if cfg.init_from not in ("scratch", "resume"):  # a run folder resolves to its ckpt.pt, logged with the config
        try:
            cfg.init_from = str(checkpoint.locate(cfg.init_from, "init_from").path)
        except ValueError as e:
            raise UserError(str(e))
    try:  # the model options, checked before any data is read
        GPTConfig(norm=cfg.norm, mlp_act=cfg.mlp_act, rope=cfg.rope, n_head=cfg.n_head, n_embd=cfg.n_embd)
    except ValueError as e:
        raise UserError(str(e))
    if cfg.attn_backend not in ATTN_BACKENDS:
        raise UserError(f"attn_backend={cfg.attn_backend!r} is unknown: use one of {', '.join(ATTN_BACKENDS)}")
    cfg.device, device_type, cfg.dtype = resolve_device(cfg.device, cfg.dtype)
    cfg.vocab_pad_multiple = resolve_vocab_pad(cfg.vocab_pad_multiple, device_type)
    if cfg.residual_bf16 and cfg.dtype != "bfloat16":
        raise UserError(f"residual_bf16=True keeps the residual stream in bfloat16 under bfloat16 autocast, but "
                        f"dtype={cfg.dtype!r}: set residual_bf16=False")
    for check in FEATURE_CHECKS:
        try:
            check(cfg)
        except ValueError as e:
            raise UserError(str(e))
    cfg.compile = resolve_auto_bool("compile", cfg.compile, device_type == "cuda")
    if cfg.lr_decay_iters == 0:
        cfg.lr_decay_iters = cfg.max_iters
    return device_type


def resolve_vocab_pad(value, device_type):
    """vocab_pad_multiple: "auto" -> 64 on CUDA, 1 elsewhere. The padding rows are sliced off before the loss and
    never sampled, so the model computes the same function; on a GPU the output matmul of 50304 rows is faster than
    of GPT-2's 50257 (H200, micro-batch 12: 1.45x eager; compiled 1.02x and 2.2 GiB less memory;
    docs/performance.md). On the CPU nothing was measured to
    gain, so it stays 1 there, as before."""
    if value == "auto":
        return 64 if device_type == "cuda" else 1
    if isinstance(value, str):
        raise UserError(f"vocab_pad_multiple={value!r} is unknown: use a positive integer or 'auto'")
    if value < 1:
        raise UserError(f"vocab_pad_multiple={value} must be at least 1")
    return value
