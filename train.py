"""Train a GPT on a memmapped token dataset, on one GPU or the CPU.

    python train.py config/small.py                     # CPU quick start (tiny-shakespeare, characters)
    python train.py config/small.py --max_iters=500     # any field below can be set as --key=value
    python train.py config/small.py --init_from=resume  # continue from out_dir/ckpt.pt, exactly

Read top to bottom: the config, small helpers (batches, learning rate, evaluation, checkpoints), then train().
The checks of the config values live in train_checks.py.
"""

import dataclasses
import json
import math
import os
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from configurator import UserError, autocast_context, print_config, run_cli
from model import CKPT_FORMAT_VERSION, read_checkpoint, save_checkpoint  # atomic: temp file, fsync, rename
from train_checks import resolve  # every value checked up front, one line per bad one
import curriculum
import finetune
import memory
import tokenizer as tok

ROOT = Path(__file__).resolve().parent


@dataclass
class TrainConfig:
    # ---- output and start point
    out_dir: str = "out"  # ckpt.pt, config.json, meta.json and metrics.jsonl are written here
    init_from: str = "scratch"  # "scratch", "resume" (out_dir/ckpt.pt), a Hugging Face GPT-2 directory, or a
    # sologpt checkpoint file (e.g. out/ckpt.pt) to fine-tune from with a fresh optimizer and schedule
    overwrite: bool = False  # let a new run replace an existing out_dir/ckpt.pt (else that is an error)
    always_save_checkpoint: bool = True  # save at every evaluation; False saves only when val loss improves
    # ---- data
    dataset: str = "shakespeare_char"  # folder under data_root with train.bin, val.bin and meta.json
    data_root: str = "data"
    data_input: str = ""  # local text file used when the dataset must be prepared first (for offline machines)
    batch_size: int | str = 12  # sequences per micro-batch; "auto" (CUDA only): the largest that fits (memory.py),
    # with gradient_accumulation_steps recomputed to keep auto_batch_sequences sequences per step
    auto_batch_sequences: int = 0  # with batch_size="auto": sequences per optimizer step to keep (0: one micro-batch)
    block_size: int = 1024  # tokens per sequence (the model's context length)
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    # ---- model (ignored when init_from is a GPT-2 directory, whose config.json fixes the shape)
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm layers, as GPT-2
    attn_impl: str = "sdpa"  # "sdpa" (fused kernels) or "math" (the explicit formula)
    vocab_pad_multiple: int = 1  # round the embedding up to a multiple of this (64: faster on GPUs; README)
    # modern architecture options (model.py), all off so that the model is GPT-2's; README, "Modern options"
    rope: bool = False  # rotary position embeddings instead of a learned position table
    norm: str = "layernorm"  # or "rmsnorm"
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    mlp_act: str = "gelu"  # or "relu2" (squared ReLU)
    tie_embeddings: bool = True  # False: the output layer gets its own weights
    attn_backend: str = "auto"  # CUDA kernel behind sdpa: "auto" (PyTorch picks), "flash", "cudnn" or "efficient"
    # ---- curriculum (curriculum.py); off by default
    seq_warmup_iters: int = 0  # > 0: sequences grow from seq_warmup_start to block_size over this many steps,
    seq_warmup_start: int = 64  # with the batch widened so the tokens per step stay the same
    curriculum: str = "none"  # "unigram": the first epoch visits the windows easiest first, then random batches
    # ---- fine-tuning (finetune.py); all off by default
    task: str = "lm"  # "lm" (next-token prediction) or "classify" (prepare/classify.py data, classification head)
    cls_pool: str = "last"  # task "classify": the head reads the "last" token's hidden state or the "mean" of all
    freeze_layers: int = 0  # freeze the first N transformer blocks
    freeze_embeddings: bool = False  # freeze the token and position embeddings (and so the tied output layer)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (lora.py) on a frozen base; ckpt.pt holds only them
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "attn"  # layers to adapt: c_attn, attn.c_proj, c_fc, mlp.c_proj; groups attn, mlp, all
    # ---- compression (quantize.py, distill.py); off by default
    qat: str = ""  # "int8" or "int4": train against fake-quantized block weights (straight-through), then export
    # with python quantize.py --mode=<same>; the weights stay float, so the checkpoint is an ordinary one
    qat_group_size: int = 128  # int4 groups along the input dimension (as quantize.py --group_size)
    teacher: str = ""  # a checkpoint file or GPT-2 directory: the student also learns the teacher's soft labels
    distill_alpha: float = 0.5  # share of the loss from the teacher (KL at distill_temperature); the rest is plain CE
    distill_temperature: float = 2.0  # > 1 softens both distributions (Hinton et al. 2015)
    # ---- memory (memory.py); all off by default
    grad_checkpointing: int = 0  # k > 0: recompute every k-th block's activations in backward (1: every block)
    chunked_loss: int = 0  # N > 0: output layer + loss N tokens at a time, never all (tokens x vocab) logits
    optim_state: str = "fp32"  # AdamW moments in "fp32", "bf16" or "int8" (block-wise 8-bit; lean_optim.py)
    base_dtype: str = "fp32"  # frozen Linear weights (freeze_layers, LoRA base) in "fp32", "bf16" or "int8"
    # ---- optimizer: AdamW, decoupled weight decay on matrices only
    optimizer: str = "adamw"  # "muon": Muon (orthogonalised momentum) for the blocks' matrices, AdamW for the rest
    learning_rate: float = 6e-4  # peak learning rate
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # clip the global gradient norm to this; 0 turns clipping off
    # ---- schedule: linear warmup, then cosine decay to min_lr
    max_iters: int = 5000  # optimizer steps
    decay_lr: bool = True  # False keeps learning_rate constant after warmup
    warmup_iters: int = 100
    lr_decay_iters: int = 0  # step where the cosine reaches min_lr; 0 means max_iters
    min_lr: float = 6e-5  # about learning_rate / 10 (Chinchilla, Hoffmann et al. 2022)
    # ---- evaluation and logging
    eval_interval: int = 250  # evaluate (and checkpoint) every this many steps, and at the end
    eval_iters: int = 50  # batches per split in one evaluation
    log_interval: int = 10  # steps between log lines (each one waits for the GPU once)
    progress: bool = True  # tqdm progress bar (drawn only when the output is a terminal)
    sample_tokens: int = 200  # length of the sample printed at the end; 0 prints none
    # ---- system
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu; or e.g. "cuda:1"
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that have it, else float16 with loss scaling; float32 on CPU
    compile: bool | str = "auto"  # torch.compile the model; "auto" means on for CUDA, off elsewhere
    cuda_graphs: bool | str = False  # replay each step as one CUDA graph (cuda_graph.py); "auto": on if possible
    fp8: bool = False  # fp8 matmuls in the transformer blocks (fp8.py): CUDA compute capability 8.9+, bfloat16
    fp8_head: bool = False  # the output layer's matmuls in fp8 (with or without fp8); pays at GPT-2 124M, fp8 does not
    residual_bf16: bool = False  # under bf16 autocast, keep the residual stream in bf16 instead of float32 (faster)
    seed: int = 1337  # one seed for model init, batches and dropout


# fields a resumed run must share with its checkpoint: they decide which tensors exist, train, or how they are stored
RESUME_FIXED = ("task", "cls_pool", "freeze_layers", "freeze_embeddings", "lora_rank", "lora_alpha", "lora_targets",
                "optim_state", "base_dtype", "qat", "qat_group_size", "fp8", "fp8_head", "optimizer")


def set_attention_backend(name):
    """Allow only one fused kernel behind F.scaled_dot_product_attention on CUDA ("auto": PyTorch chooses).
    The math kernel stays allowed as the fallback for calls the fused one cannot take (masks in the KV cache)."""
    if name == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(True)


# ---- data ------------------------------------------------------------------------------------------

def load_dataset(cfg):
    """Open train.bin / val.bin as memmaps and read meta.json, preparing the dataset first if it is absent."""
    data_dir = Path(cfg.data_root) / cfg.dataset
    files = [data_dir / name for name in ("train.bin", "val.bin", "meta.json")]
    script = ROOT / "prepare" / f"{cfg.dataset}.py"
    if cfg.dataset in ("common", "__init__"):  # prepare/'s helpers, not dataset scripts
        script = ROOT / "prepare" / "no such script"
    if not any(f.exists() for f in files) and script.is_file():
        print(f"{data_dir} is not prepared yet: running prepare/{script.name}")
        cmd = [sys.executable, str(script), "--data_root", cfg.data_root]
        if cfg.data_input:
            cmd += ["--input", cfg.data_input]
        if subprocess.run(cmd).returncode != 0:
            raise UserError(f"preparing {data_dir} failed (see above); offline, pass --data_input=path/to/input.txt")
    hint = f"run python prepare/{script.name}" if script.is_file() else "prepare it first (README: 'Your own text')"
    for f in files:
        if not f.is_file():
            raise UserError(f"{f} is missing: {hint}")
    try:
        meta = tok.load_meta(data_dir / "meta.json")
        enc = tok.from_meta(meta)  # now, not after training: a broken meta.json should fail before step 0
    except tok.TokenizerError as e:
        raise UserError(str(e))
    if meta.get("dtype", "uint16") not in ("uint16", "uint32"):
        raise UserError(f"{data_dir}/meta.json has dtype={meta['dtype']!r}; token files are uint16 or uint32: "
                        f"{hint} again")
    if (meta.get("task", "lm") == "classify") != (cfg.task == "classify"):
        fix = "task='classify'" if cfg.task == "lm" else "a dataset from prepare/classify.py"
        raise UserError(f"{data_dir} holds {meta.get('task', 'lm')!r} data but task={cfg.task!r}: use {fix}")
    if cfg.task == "classify":  # labelled examples instead of one token stream (classify.py)
        import classify
        try:
            splits = {split: classify.load_split(data_dir, split, meta) for split in ("train", "val")}
        except classify.ClassifyError as e:
            raise UserError(str(e))
        return splits, meta, enc, meta["max_token_id"]
    dtype = np.dtype(meta.get("dtype", "uint16"))
    splits = {}
    for split in ("train", "val"):
        path = data_dir / f"{split}.bin"
        if path.stat().st_size % dtype.itemsize:
            raise UserError(f"{path} is not a whole number of {dtype} tokens (truncated?): {hint} again")
        splits[split] = np.memmap(path, dtype=dtype, mode="r")
        if len(splits[split]) < cfg.block_size + 1:
            raise UserError(f"{path} has {len(splits[split])} tokens, fewer than block_size + 1 = "
                            f"{cfg.block_size + 1}: lower --block_size or use more text")
        expected = meta.get(f"{split}_tokens")
        if expected is not None and expected != len(splits[split]):
            raise UserError(f"{path} has {len(splits[split])} tokens but meta.json says {expected}: {hint} again")
    # the largest id must have a row in the embedding; meta.json records it (else scan once, in chunks)
    if "max_token_id" in meta:
        max_id = meta["max_token_id"]
    else:
        max_id = max(int(d[i:i + (1 << 24)].max()) for d in splits.values() for i in range(0, len(d), 1 << 24))
    if max_id >= meta["vocab_size"]:
        raise UserError(f"{data_dir} holds token id {max_id} but meta.json says vocab_size={meta['vocab_size']}: "
                        f"{hint} again")
    return splits, meta, enc, max_id


def get_batch(data, batch_size, block_size, generator, device):
    """Random windows of the token stream: x = tokens[i:i+T], y = tokens[i+1:i+1+T] (the next token)."""
    ix = torch.randint(len(data) - block_size, (batch_size,), generator=generator)
    xy = torch.from_numpy(np.stack([data[i:i + block_size + 1] for i in ix.tolist()]).astype(np.int64))  # (B, T+1)
    if device.startswith("cuda"):  # pinned memory lets the copy overlap GPU work
        xy = xy.pin_memory().to(device, non_blocking=True)
    else:
        xy = xy.to(device)
    return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()  # (B, T), (B, T)


# ---- optimization ------------------------------------------------------------------------------------

def get_lr(it, cfg):
    """Linear warmup for warmup_iters steps, then cosine decay to min_lr at lr_decay_iters."""
    if it < cfg.warmup_iters:
        return cfg.learning_rate * (it + 1) / (cfg.warmup_iters + 1)
    if not cfg.decay_lr:
        return cfg.learning_rate
    if it >= cfg.lr_decay_iters:
        return cfg.min_lr
    progress = (it - cfg.warmup_iters) / max(1, cfg.lr_decay_iters - cfg.warmup_iters)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay on matrices (matmul weights, embeddings) only, never on biases or LayerNorm gains."""
    if cfg.optimizer == "muon":  # Muon for the blocks' matrices, AdamW for the rest (muon.py)
        from muon import MuonWithAdamW
        return MuonWithAdamW(model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda", capturable=cfg.cuda_graphs)
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optim_state != "fp32":  # moments in bf16 or block-wise int8: 4 or ~2 bytes per parameter instead of 8
        from lean_optim import LeanAdamW
        return LeanAdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), state_dtype=cfg.optim_state)
    # the fused CUDA kernel updates all parameters in a few launches instead of several per tensor
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda", capturable=cfg.cuda_graphs)


# ---- evaluation and monitoring ------------------------------------------------------------------------

@torch.no_grad()
def estimate_loss(model, splits, cfg, ctx):
    """Mean loss over eval_iters batches per split. The batches come from a generator seeded the same way
    every time, so evaluations are comparable across steps and do not disturb the training batches."""
    model.eval()
    out = {}
    for i, (split, data) in enumerate(splits.items()):
        gen = torch.Generator().manual_seed(cfg.seed + 1 + i)
        total = 0.0
        for _ in range(cfg.eval_iters):
            x, y = get_batch(data, cfg.batch_size, cfg.block_size, gen, cfg.device)
            with ctx:
                _, loss = model(x, y)
            total += loss.item()
        out[split] = total / cfg.eval_iters
    model.train()
    return out


# dense bf16 tensor-core peaks from the vendors' datasheets, for MFU (Chowdhery et al. 2022); first match wins
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def peak_memory_gib(device):
    """(peak allocated, peak reserved by the caching allocator) on CUDA; elsewhere the process's peak RSS twice."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return rss, rss


# ---- checkpoints ---------------------------------------------------------------------------------------

def load_checkpoint(path):
    try:
        return read_checkpoint(path)
    except ValueError as e:
        raise UserError(str(e))


def write_json(path, obj):
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


# ---- the training loop ---------------------------------------------------------------------------------

def train(cfg):
    t0 = time.time()
    device_type = resolve(cfg)
    torch.manual_seed(cfg.seed)
    if device_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # float32 matmuls on tensor cores (only matters for fp32)
        torch.backends.cudnn.allow_tf32 = True
        set_attention_backend(cfg.attn_backend)
        if ":" in cfg.device:  # streams and CUDA graphs use the current device: make it this one
            torch.cuda.set_device(torch.device(cfg.device))
    ctx = autocast_context(device_type, cfg.dtype)
    if cfg.task == "classify":
        import classify

    splits, meta, enc, max_id = load_dataset(cfg)
    out_dir = Path(cfg.out_dir)
    ckpt_path = out_dir / "ckpt.pt"  # saved at evaluations (every one, or only improvements)
    # With always_save_checkpoint=False ckpt.pt must stay the best model, so Ctrl-C saves its resume point here
    last_path = out_dir / "last.pt"
    if cfg.init_from != "resume" and ckpt_path.exists() and not cfg.overwrite:
        raise UserError(f"{ckpt_path} already exists: continue it with --init_from=resume, choose another "
                        f"--out_dir, or pass --overwrite=True to replace it")

    # ---- the model: from scratch, a checkpoint to resume, or pretrained weights to fine-tune (finetune.py)
    ckpt, resume_path = None, None
    for source in (cfg.init_from, cfg.teacher):  # a new run in out_dir would overwrite its own start point
        if source not in ("", "scratch", "resume") and Path(source).resolve() in (ckpt_path.resolve(),
                                                                                  last_path.resolve()):
            raise UserError(f"{source} is this run's own checkpoint, which the run would overwrite: copy it "
                            f"elsewhere or pick another --out_dir")
    if cfg.init_from == "resume":
        resume_path = last_path if last_path.exists() else ckpt_path
        ckpt = load_checkpoint(resume_path)
        saved = ckpt["train_config"]
        for key in RESUME_FIXED:  # these change which tensors exist or train: they must match the run's
            was = saved.get(key, getattr(TrainConfig(), key))
            if was != getattr(cfg, key):
                raise UserError(f"{resume_path} was trained with {key}={was!r}, not {getattr(cfg, key)!r}: "
                                f"resume with --{key}={was!r}")
        if cfg.batch_size == "auto":  # keep the batches the run had, not a new search
            cfg.batch_size, cfg.gradient_accumulation_steps = saved["batch_size"], saved["gradient_accumulation_steps"]
    try:
        model, init_source = finetune.build_model(cfg, meta, max_id, ckpt, resume_path)
    except ValueError as e:
        raise UserError(str(e))
    model.to(cfg.device)
    teacher = None
    if cfg.teacher:
        import distill
        try:
            teacher = distill.load_teacher(cfg.teacher, cfg.device, model.config.vocab_size, cfg.block_size)
        except ValueError as e:
            raise UserError(str(e))

    if cfg.fp8 or cfg.fp8_head:  # before the batch-size search, which must see fp8's memory
        import fp8
        try:
            fp8.check_fp8_device(cfg.device, "fp8" if cfg.fp8 else "fp8_head")
            fp8.convert_to_fp8(model, head=cfg.fp8_head, blocks=cfg.fp8)  # same parameters and checkpoint keys
        except ValueError as e:
            raise UserError(str(e))
    if cfg.batch_size == "auto":
        try:
            cfg.batch_size, cfg.gradient_accumulation_steps = memory.auto_batch_size(model, cfg, ctx)
        except ValueError as e:
            raise UserError(str(e))
    print(memory.estimate(model, cfg)[1])
    try:
        optimizer = make_optimizer(model, cfg, device_type)
    except ValueError as e:
        raise UserError(str(e))
    # loss scaling keeps small float16 gradients from flushing to zero; bfloat16 and float32 need none
    scaler = torch.amp.GradScaler(device_type, enabled=cfg.dtype == "float16")
    batch_gen = torch.Generator().manual_seed(cfg.seed)  # draws the training batches; saved in checkpoints
    iter_num, best_val_loss = 0, float("inf")
    last_eval_iter = -1  # the step of the last evaluation, so a resumed run does not repeat or skip one
    elapsed = 0.0  # seconds of training before this process (time_s in metrics.jsonl continues across resumes)
    skipped_steps = 0  # float16: optimizer steps the loss scaler skipped because gradients overflowed
    if ckpt is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
        for group in optimizer.param_groups:  # the saved groups may come from a run with or without CUDA graphs
            group["lr"] = float(group["lr"])
            group["capturable"] = cfg.cuda_graphs
        if ckpt["scaler"]:  # empty when the checkpoint's run did not use float16
            scaler.load_state_dict(ckpt["scaler"])
        iter_num, best_val_loss = ckpt["iter_num"], ckpt["best_val_loss"]
        last_eval_iter, elapsed = ckpt["last_eval_iter"], ckpt["elapsed_s"]
        skipped_steps = ckpt.get("skipped_steps", 0)  # absent in checkpoints of earlier versions
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device_type == "cuda" and ckpt["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        batch_gen.set_state(ckpt["rng"]["batches"])
        print(f"resuming from {resume_path} at step {iter_num} (best val loss {best_val_loss:.4f})")
        del ckpt  # free the CPU copy of the weights and optimizer state

    print_config(cfg, "config (resolved)")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "config.json", dataclasses.asdict(cfg))
    write_json(out_dir / "meta.json", meta)  # sample.py finds the tokenizer next to the checkpoint
    metrics_path = out_dir / "metrics.jsonl"
    kept = []
    if cfg.init_from == "resume" and metrics_path.exists():  # drop evaluations made after the resume point
        kept = [line for line in metrics_path.read_text().splitlines() if json.loads(line)["iter"] <= iter_num]
    metrics_path.write_text("".join(line + "\n" for line in kept))
    t_start = t0 - elapsed
    n_params = model.num_params()
    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.gradient_accumulation_steps
    print(f"model: {n_params / 1e6:.2f}M parameters (position embeddings not counted); {tokens_per_step:,} "
          f"tokens per step on {cfg.device} in {cfg.dtype}")
    flops_per_step = model.flops_per_token(cfg.block_size) * tokens_per_step
    peak = peak_flops(cfg.device)

    easy = None
    if cfg.curriculum == "unigram":
        easy = curriculum.EasyFirst(splits["train"], cfg.block_size, model.config.vocab_size)
        print(f"curriculum: {len(easy.order):,} windows, easiest first for "
              f"{len(easy.order) // (cfg.batch_size * cfg.gradient_accumulation_steps):,} steps")
    train_model = torch.compile(model) if cfg.compile else model  # `model` stays uncompiled for saving
    graphed = None
    if cfg.cuda_graphs:
        from cuda_graph import GraphedStep
        graphed = GraphedStep(train_model, optimizer, cfg.grad_clip, ctx)

    def checkpoint_state(iter_num, best_val_loss, last_eval_iter):
        """Everything a resumed run needs to continue exactly: tensors and plain values only. A LoRA run saves
        its adapters and other trainable tensors; the frozen base is rebuilt from init_source."""
        extra = {}
        if cfg.lora_rank:
            import lora
            extra["adapter"] = lora.adapter_checkpoint(model, base_info={"init_source": init_source})
        return {
            **extra,
            "format_version": CKPT_FORMAT_VERSION,
            "model_config": model.config_dict(),
            "model": finetune.trainable_state(model) if cfg.lora_rank else model.state_dict(),
            "optimizer": optimizer.state_dict(),
            "scaler": scaler.state_dict(),
            "iter_num": iter_num,
            "init_source": init_source,  # "scratch", or the GPT-2 directory or checkpoint the run started from
            "best_val_loss": best_val_loss,
            "last_eval_iter": last_eval_iter,
            "skipped_steps": skipped_steps,
            "elapsed_s": time.time() - t_start,
            "train_config": dataclasses.asdict(cfg),
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if device_type == "cuda" else [],
                "batches": batch_gen.get_state(),
            },
        }

    # Ctrl-C (SIGINT) or SIGTERM: finish the current step, save, and exit; a second Ctrl-C stops at once
    stop = {"signal": None}

    def on_signal(signum, frame):
        if stop["signal"] is not None:
            raise KeyboardInterrupt
        stop["signal"] = signum

    old_handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    # disable=None: tqdm draws the bar only on a terminal, so logs written to files stay one line per event
    bar = tqdm(total=cfg.max_iters, initial=iter_num, disable=None if cfg.progress else True, dynamic_ncols=True,
               unit="step", file=sys.stdout)
    log = bar.write
    loss_sum = torch.zeros((), device=cfg.device)  # summed on the device; read only at log steps
    steps_since_log, t_log = 0, time.perf_counter()
    try:
        while True:
            # ---- evaluate and checkpoint
            if (iter_num % cfg.eval_interval == 0 or iter_num == cfg.max_iters) and iter_num != last_eval_iter:
                if cfg.task == "classify":  # the whole val set; train on as many examples as eval_iters batches
                    scores = {split: classify.evaluate(train_model, data, cfg, ctx, model.config.n_classes,
                                                       None if split == "val" else cfg.eval_iters * cfg.batch_size)
                              for split, data in splits.items()}
                    losses = {split: sc["loss"] for split, sc in scores.items()}
                else:
                    losses = estimate_loss(train_model, splits, cfg, ctx)
                if not all(math.isfinite(v) for v in losses.values()):
                    raise UserError(f"evaluation loss is {losses} at step {iter_num}: training diverged; lower "
                                    f"learning_rate or raise warmup_iters. {ckpt_path} was not overwritten")
                improved = losses["val"] < best_val_loss
                best_val_loss = min(best_val_loss, losses["val"])
                last_eval_iter = iter_num
                log(f"eval {iter_num:>6} | train loss {losses['train']:.4f} (ppl {math.exp(losses['train']):.2f})"
                    f" | val loss {losses['val']:.4f} (ppl {math.exp(losses['val']):.2f})"
                    + (f" | val accuracy {scores['val']['accuracy']:.4f} macro-F1 {scores['val']['macro_f1']:.4f}"
                       if cfg.task == "classify" else "") + f"{' | best' if improved else ''}")
                record = {"iter": iter_num, "train_loss": losses["train"], "val_loss": losses["val"],
                          "train_ppl": math.exp(losses["train"]), "val_ppl": math.exp(losses["val"])}
                if cfg.task == "classify":
                    record.update({f"{split}_{k}": sc[k] for split, sc in scores.items()
                                   for k in ("accuracy", "macro_f1")})
                alloc, reserved = peak_memory_gib(cfg.device)
                record.update(lr=get_lr(max(iter_num - 1, 0), cfg), tokens=iter_num * tokens_per_step,
                              time_s=round(time.time() - t_start, 3), peak_alloc_gib=round(alloc, 3),
                              peak_reserved_gib=round(reserved, 3))
                if scaler.is_enabled():
                    record.update(loss_scale=scaler.get_scale(), skipped_steps=skipped_steps)
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                if improved or cfg.always_save_checkpoint:
                    save_checkpoint(ckpt_path, checkpoint_state(iter_num, best_val_loss, last_eval_iter))
                    last_path.unlink(missing_ok=True)  # older than ckpt.pt now
                steps_since_log, t_log = 0, time.perf_counter()  # keep evaluation out of the step timing
                loss_sum.zero_()
            if iter_num >= cfg.max_iters:
                break

            # ---- one optimizer step: forward/backward on each micro-batch, then clip and step
            lr = get_lr(iter_num, cfg)
            if graphed is not None:  # the same step, replayed as one CUDA graph (cuda_graph.py)
                graphed.set_lr(lr)
                xy = [get_batch(splits["train"], cfg.batch_size, cfg.block_size, batch_gen, cfg.device)
                      for _ in range(cfg.gradient_accumulation_steps)]
                loss_sum += graphed(torch.stack([x for x, _ in xy]), torch.stack([y for _, y in xy]))
            else:
                for group in optimizer.param_groups:
                    group["lr"] = lr
                B, T = curriculum.batch_shape(iter_num, cfg)  # (batch_size, block_size) unless warming up
                for micro in range(cfg.gradient_accumulation_steps):
                    if cfg.task == "classify":  # right-padded examples, their lengths and labels
                        x, lengths, y = classify.get_batch(splits["train"], cfg.batch_size, cfg.block_size,
                                                           batch_gen, cfg.device)
                        extra = {"lengths": lengths}
                    else:
                        xy = easy.batch(iter_num * cfg.gradient_accumulation_steps + micro, B, cfg.device) if easy \
                            else None  # easy-first windows, until the first epoch is used up
                        x, y = xy if xy is not None else get_batch(splits["train"], B, T, batch_gen, cfg.device)
                        extra = {}
                    with ctx:
                        logits, loss = train_model(x, y, **extra)
                        if teacher is not None:  # the student learns the teacher's soft labels too (distill.py)
                            with torch.no_grad():
                                teacher_logits, _ = teacher(x)
                            loss, _ = distill.distill_loss(logits, teacher_logits, y, cfg.distill_alpha,
                                                           cfg.distill_temperature)
                        loss = loss / cfg.gradient_accumulation_steps  # gradients add up over micro-batches
                    scaler.scale(loss).backward()
                    loss_sum += loss.detach()
                if cfg.grad_clip > 0:
                    scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                scale = scaler.get_scale() if scaler.is_enabled() else None  # float16 only (a host sync)
                scaler.step(optimizer)  # skipped when the scaled gradients overflowed
                scaler.update()
                if scale is not None and scaler.get_scale() < scale:  # the scale drops only after an overflow
                    skipped_steps += 1
                optimizer.zero_grad(set_to_none=True)
            iter_num += 1
            steps_since_log += 1
            bar.update(1)

            # ---- log (the .item() here is the only wait for the GPU outside evaluation)
            if iter_num % cfg.log_interval == 0 or stop["signal"] is not None:
                loss_val = loss_sum.item() / steps_since_log
                loss_sum.zero_()
                if not math.isfinite(loss_val):
                    raise UserError(f"loss is {loss_val} at step {iter_num}: training diverged; lower "
                                    f"learning_rate, raise warmup_iters or use dtype=bfloat16. "
                                    f"{ckpt_path} was not overwritten")
                dt = (time.perf_counter() - t_log) / steps_since_log
                line = (f"step {iter_num:>6} | loss {loss_val:.4f} | lr {lr:.2e} | "
                        f"{tokens_per_step / dt:>9,.0f} tok/s | {dt * 1000:7.1f} ms/step")
                if scaler.is_enabled():
                    line += f" | scale {scaler.get_scale():.0f}, {skipped_steps} skipped steps"
                if peak:
                    line += f" | mfu {100 * flops_per_step / dt / peak:4.1f}%"
                alloc, reserved = peak_memory_gib(cfg.device)
                log(line + (f" | mem {alloc:.2f} GiB (reserved {reserved:.2f})" if device_type == "cuda"
                            else f" | mem {alloc:.2f} GiB"))
                steps_since_log, t_log = 0, time.perf_counter()

            if stop["signal"] is not None:
                path = ckpt_path if cfg.always_save_checkpoint else last_path
                save_checkpoint(path, checkpoint_state(iter_num, best_val_loss, last_eval_iter))
                name = signal.Signals(stop["signal"]).name
                args = [a for a in sys.argv if not a.startswith("--init_from=")]
                log(f"{name}: saved {path} at step {iter_num}. Resume with:\n"
                    f"  python {' '.join(args)} --init_from=resume")
                raise SystemExit(128 + stop["signal"])
    except torch.cuda.OutOfMemoryError:
        raise UserError(memory.oom_message(cfg, cfg.device))
    finally:
        bar.close()
        for s, h in old_handlers.items():
            signal.signal(s, h)

    last_path.unlink(missing_ok=True)  # the run is complete: a later resume starts from ckpt.pt
    print(f"done in {time.time() - t_start:.1f} s: best val loss {best_val_loss:.4f}; checkpoint {ckpt_path}")
    if cfg.sample_tokens > 0 and cfg.task == "lm":
        start = enc.encode("\n") if meta["tokenizer"] == "char" and "\n" in meta["chars"] else [enc.eot_token or 0]
        gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
        idx = torch.tensor([start], dtype=torch.long, device=cfg.device)
        with ctx:
            out = model.generate(idx, cfg.sample_tokens, temperature=0.8, top_k=200, generator=gen)
        print("---- sample ----")
        print(enc.decode(out[0, len(start):].tolist()))
    return best_val_loss


def main(argv=None):
    run_cli(train, TrainConfig, argv)


if __name__ == "__main__":
    main()
