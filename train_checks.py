"""train.py's config checks: every TrainConfig value is checked before any data is read or any model built,
and a bad one (or a bad combination) stops the run with one line that names it and says what to do. Also fills in
the derived values: the "auto" device, dtype, compile and cuda_graphs, and lr_decay_iters."""

from pathlib import Path

from configurator import UserError, resolve_auto_bool, resolve_device
from model import GPTConfig

ATTN_BACKENDS = ("auto", "flash", "cudnn", "efficient")


def resolve(cfg):
    """Check values and fill in the derived ones ("auto" device, dtype, compile; lr_decay_iters)."""
    if cfg.seq_warmup_iters < 0:
        raise UserError(f"seq_warmup_iters={cfg.seq_warmup_iters} must not be negative")
    if cfg.batch_size != "auto" and (isinstance(cfg.batch_size, str) or cfg.batch_size < 1):
        raise UserError(f"batch_size={cfg.batch_size!r} must be a positive integer or 'auto'")
    for key in ("block_size", "gradient_accumulation_steps", "eval_interval", "eval_iters",
                "log_interval", "n_layer", "n_head", "n_embd", "vocab_pad_multiple"):
        if getattr(cfg, key) < 1:
            raise UserError(f"{key}={getattr(cfg, key)} must be at least 1")
    for key in ("max_iters", "warmup_iters", "lr_decay_iters", "sample_tokens", "freeze_layers", "lora_rank",
                "grad_checkpointing", "auto_batch_sequences"):
        if getattr(cfg, key) < 0:
            raise UserError(f"{key}={getattr(cfg, key)} must not be negative")
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"n_embd={cfg.n_embd} is not divisible by n_head={cfg.n_head}: pick values where it is")
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
        raise UserError(f"init_from={cfg.init_from!r} is not 'scratch', 'resume', a Hugging Face GPT-2 directory "
                        f"or a sologpt checkpoint file")
    if cfg.task not in ("lm", "classify"):
        raise UserError(f"task={cfg.task!r} is unknown: use 'lm' or 'classify'")
    if cfg.cls_pool not in ("last", "mean"):
        raise UserError(f"cls_pool={cfg.cls_pool!r} is unknown: use 'last' or 'mean'")
    for key, allowed in (("optim_state", ("fp32", "bf16", "int8")), ("base_dtype", ("fp32", "bf16", "int8"))):
        if getattr(cfg, key) not in allowed:
            raise UserError(f"{key}={getattr(cfg, key)!r} is unknown: use one of {', '.join(allowed)}")
    if cfg.base_dtype != "fp32" and not (cfg.lora_rank or cfg.freeze_layers):
        raise UserError(f"base_dtype={cfg.base_dtype!r} applies to frozen weights: set lora_rank or freeze_layers")
    if cfg.curriculum not in ("none", "unigram"):
        raise UserError(f"curriculum={cfg.curriculum!r} is unknown: use 'none' or 'unigram'")
    if cfg.seq_warmup_iters and not 1 <= cfg.seq_warmup_start <= cfg.block_size:
        raise UserError(f"seq_warmup_start={cfg.seq_warmup_start} must be between 1 and block_size={cfg.block_size}")
    if (cfg.seq_warmup_iters or cfg.curriculum != "none") and cfg.task != "lm":
        raise UserError("seq_warmup_iters and curriculum apply to task 'lm'")
    if cfg.seq_warmup_iters and cfg.curriculum != "none":
        raise UserError("seq_warmup_iters and curriculum cannot be combined yet: use one at a time")
    if cfg.qat and (cfg.base_dtype != "fp32" or cfg.fp8 or cfg.fp8_head or cfg.lora_rank):
        raise UserError("qat cannot be combined with base_dtype, fp8, fp8_head or lora_rank: the fake-quantized "
                        "layers would be skipped or would not be what is exported")
    if cfg.qat not in ("", "int8", "int4"):
        raise UserError(f"qat={cfg.qat!r} is unknown: use '', 'int8' or 'int4'")
    if cfg.teacher and (cfg.task != "lm" or not Path(cfg.teacher).exists()):
        raise UserError(f"teacher={cfg.teacher!r} must be an existing checkpoint file or GPT-2 directory, "
                        f"with task 'lm'")
    if not 0.0 <= cfg.distill_alpha <= 1.0 or cfg.distill_temperature <= 0:
        raise UserError("distill_alpha must be in [0, 1] and distill_temperature above 0")
    if cfg.lora_rank and cfg.init_from == "scratch":
        raise UserError("lora_rank > 0 adapts pretrained weights: set init_from to a GPT-2 directory or a checkpoint")
    if cfg.lora_rank:
        import lora
        try:
            lora.resolve_targets(cfg.lora_targets)
        except ValueError as e:
            raise UserError(f"lora_targets: {e}")
    if cfg.optimizer not in ("adamw", "muon"):
        raise UserError(f"optimizer={cfg.optimizer!r} is unknown: use 'adamw' or 'muon'")
    if cfg.optimizer == "muon" and (cfg.lora_rank or cfg.optim_state != "fp32"):
        raise UserError("optimizer='muon' trains whole matrices with its own fp32 momentum: it cannot be combined "
                        "with lora_rank or optim_state; use optimizer='adamw' for those")
    try:  # the model options, checked before any data is read
        GPTConfig(norm=cfg.norm, mlp_act=cfg.mlp_act, rope=cfg.rope, n_head=cfg.n_head, n_embd=cfg.n_embd)
    except ValueError as e:
        raise UserError(str(e))
    if cfg.attn_backend not in ATTN_BACKENDS:
        raise UserError(f"attn_backend={cfg.attn_backend!r} is unknown: use one of {', '.join(ATTN_BACKENDS)}")
    cfg.device, device_type, cfg.dtype = resolve_device(cfg.device, cfg.dtype)
    graphable = (device_type == "cuda" and cfg.dtype != "float16" and cfg.device in ("cuda", "cuda:0")
                 and cfg.task == "lm" and cfg.optim_state == "fp32" and cfg.batch_size != "auto" and not cfg.teacher
                 and not cfg.seq_warmup_iters and cfg.curriculum == "none")
    cfg.cuda_graphs = resolve_auto_bool("cuda_graphs", cfg.cuda_graphs, graphable)
    if cfg.cuda_graphs and not graphable:
        raise UserError(f"cuda_graphs=True needs device cuda (cuda:0; pick another card with CUDA_VISIBLE_DEVICES), "
                        f"bfloat16 or float32 (float16 loss scaling is not captured), task 'lm', optim_state 'fp32' "
                        f"and a fixed batch_size; here device={cfg.device!r}, dtype={cfg.dtype!r}, task={cfg.task!r}, "
                        f"optim_state={cfg.optim_state!r}, batch_size={cfg.batch_size!r}")
    cfg.compile = resolve_auto_bool("compile", cfg.compile, device_type == "cuda")
    if cfg.batch_size == "auto" and (device_type != "cuda" or cfg.teacher):
        raise UserError("batch_size='auto' probes for CUDA out-of-memory: it needs a CUDA GPU and no teacher; "
                        "set batch_size to a number")
    if cfg.base_dtype == "bf16" and cfg.dtype == "float32":
        raise UserError("base_dtype='bf16' needs 16-bit autocast (dtype bfloat16 or float16): use base_dtype='int8' "
                        "or another dtype")
    if cfg.chunked_loss < 0 or (cfg.chunked_loss and (cfg.teacher or cfg.fp8_head or cfg.task != "lm")):
        raise UserError("chunked_loss must be >= 0, for task 'lm', without teacher or fp8_head (they need the "
                        "whole logits or their own output layer): set chunked_loss=0")
    if cfg.fp8_head and cfg.task != "lm":
        raise UserError(f"fp8_head=True speeds up the language-model output layer, which task={cfg.task!r} does not "
                        f"use: set fp8_head=False")
    for key in ("fp8", "fp8_head"):
        if getattr(cfg, key) and (device_type != "cuda" or cfg.dtype != "bfloat16"):
            raise UserError(f"{key}=True needs a CUDA GPU and dtype bfloat16 (here device={cfg.device!r}, "
                            f"dtype={cfg.dtype!r}): set {key}=False")
    if cfg.residual_bf16 and cfg.dtype != "bfloat16":
        raise UserError(f"residual_bf16=True keeps the residual stream in bfloat16 under bfloat16 autocast, but "
                        f"dtype={cfg.dtype!r}: set residual_bf16=False")
    if cfg.lr_decay_iters == 0:
        cfg.lr_decay_iters = cfg.max_iters
    return device_type
