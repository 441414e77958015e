"""Train a GPT on a memmapped token dataset, on one GPU or the CPU.

    python train.py config/small.py                     # CPU quick start (tiny-shakespeare, characters)
    python train.py config/small.py --max_iters=500     # any field below can be set as --key=value
    python train.py config/small.py --init_from=resume  # continue from out_dir/ckpt.pt, exactly

Read top to bottom: the config, the learning rate, the optimizer, the training step, then train(), which decides
every feature once (sologpt/build.py turns each into a module swap, a wrapper or a batch source) and then runs a
loop that names none of them. The library behind it is sologpt/ (the README has the file tree).
"""

import functools
import math
import signal
import sys
import time
from dataclasses import dataclass

import torch

from sologpt import batches, build, checks, checkpoint, distributed, galore, hardware, memory
from sologpt.configurator import UserError, print_config, run_cli
from sologpt.cuda_graph import GraphedStep
from sologpt.guard import Guard
from sologpt.lean_optim import LeanAdamW
from sologpt.monitor import Monitor
from sologpt.muon import MuonWithAdamW
from sologpt.rundir import RunDir, StopOnSignal


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
    batch_size: int | str = 12  # sequences per micro-batch; "auto" (CUDA only): the largest that fits
    # (sologpt/memory.py), with gradient_accumulation_steps recomputed to keep auto_batch_sequences sequences per step
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
    vocab_pad_multiple: int | str = "auto"  # round the embedding rows up to a multiple of this; "auto": 64 on CUDA
    # (GPT-2's 50257 tokens -> 50304 rows, a faster output matmul; the padding is no token), 1 elsewhere
    # architecture options (model.py), all off so that the model is GPT-2's (docs/architecture.md)
    rope: bool = False  # rotary position embeddings instead of a learned position table
    norm: str = "layernorm"  # or "rmsnorm"
    qk_norm: bool = False  # RMS-normalise queries and keys per head
    mlp_act: str = "gelu"  # or "relu2" (squared ReLU)
    tie_embeddings: bool = True  # False: the output layer gets its own weights
    attn_backend: str = "auto"  # CUDA kernel behind sdpa: "auto" (PyTorch picks), "flash", "cudnn" or "efficient"
    # ---- curriculum (sologpt/curriculum.py); off by default
    seq_warmup_iters: int = 0  # > 0: sequences grow from seq_warmup_start to block_size over this many steps,
    seq_warmup_start: int = 64  # with the batch widened so the tokens per step stay the same
    curriculum: str = "none"  # "unigram": the first epoch visits the windows easiest first, then random batches
    # ---- fine-tuning (sologpt/build.py); all off by default
    task: str = "lm"  # "lm" (next-token prediction), "classify" (prepare/classify.py data, classification head),
    # "sft" (prepare/instruct.py conversations, loss on the responses) or "tag" (prepare/tags.py, a tag per token)
    cls_pool: str = "last"  # task "classify": the head reads the "last" token's hidden state or the "mean" of all
    sft_loss: str = "response"  # task "sft": learn the "response" tokens only (the loss mask) or "all" tokens
    freeze_layers: int = 0  # freeze the first N transformer blocks
    freeze_embeddings: bool = False  # freeze the token and position embeddings (and so the tied output layer)
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank (sologpt/lora.py) on a frozen base; ckpt.pt holds
    # only them
    lora_alpha: float = 16.0  # the adapters' output is scaled by lora_alpha / lora_rank
    lora_dropout: float = 0.0  # dropout on the adapters' input
    lora_targets: str = "attn"  # layers to adapt: c_attn, attn.c_proj, c_fc, mlp.c_proj; groups attn, mlp, all
    # ---- compression (sologpt/quantize.py, sologpt/distill.py); off by default
    qat: str = ""  # "int8" or "int4": train against fake-quantized block weights (straight-through), then export
    # with python -m tools.quantize --mode=<same>; the weights stay float, so the checkpoint is an ordinary one
    qat_group_size: int = 128  # int4 groups along the input dimension (as tools/quantize.py --group_size)
    teacher: str = ""  # a checkpoint file or GPT-2 directory: the student also learns the teacher's soft labels
    distill_alpha: float = 0.5  # share of the loss from the teacher (KL at distill_temperature); the rest is plain CE
    distill_temperature: float = 2.0  # > 1 softens both distributions (Hinton et al. 2015)
    # ---- memory (sologpt/memory.py); all off by default
    grad_checkpointing: int = 0  # k > 0: recompute every k-th block's activations in backward (1: every block)
    chunked_loss: int = 0  # N > 0: output layer + loss N tokens at a time, never all (tokens x vocab) logits
    optim_state: str = "fp32"  # AdamW moments in "fp32", "bf16" or "int8" (block-wise 8-bit; sologpt/lean_optim.py)
    weights_dtype: str = "fp32"  # "bf16": trainable weights in bf16, no fp32 copy, updates rounded stochastically
    # (sologpt/galore.py; needs dtype bfloat16)
    update_in_backward: bool = False  # run each parameter's update in backward, as soon as its gradient of the
    # step's last micro-batch is complete, and free that gradient (sologpt/galore.py; needs grad_clip=0)
    base_dtype: str = "fp32"  # frozen Linear weights (freeze_layers, LoRA base) in "fp32", "bf16", "int8" or "nf4"
    # ---- optimizer: AdamW, decoupled weight decay on matrices only
    optimizer: str = "adamw"  # "muon": Muon (orthogonalised momentum) for the blocks' matrices, AdamW for the rest;
    # "galore": AdamW whose moments live in a low-rank projection of the blocks' matrix gradients (sologpt/galore.py)
    galore_rank: int = 128  # optimizer "galore": rank of the projection (clamped to each matrix's smaller side)
    galore_gap: int = 200  # optimizer "galore": steps between SVDs that refresh the projection (update_proj_gap)
    galore_scale: float = 0.25  # optimizer "galore": the projected update's scale (the paper's alpha)
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
    sample_tokens: int = 200  # length of the sample printed at the end (and shown in TensorBoard); 0: none
    plot: bool = False  # keep out_dir/loss.png current at each evaluation (matplotlib; sologpt/plots.py)
    tensorboard: bool = False  # TensorBoard events in out_dir: every metric, a sample at each evaluation
    # ---- the guard (sologpt/guard.py): early stopping and the spike guard; off by default
    patience: int = 0  # > 0: end the run after this many evaluations in a row without a new best val loss
    spike_guard: bool = False  # a loss spike or NaN rolls back to the last good state and skips its batches
    spike_factor: float = 3.0  # a spike is a logged loss above spike_factor x the running mean of earlier ones
    spike_max_rollbacks: int = 3  # rollbacks in a row the guard makes; the next spike stops the run
    spike_lr_factor: float = 1.0  # each rollback multiplies the learning rate by this (1: unchanged)
    spike_rollback: str = "memory"  # the good state: "memory" (a host copy at each evaluation) or "disk" (ckpt file)
    # ---- system
    device: str = "auto"  # "auto" picks cuda, then mps, then cpu; or e.g. "cuda:1"
    dtype: str = "auto"  # "auto": bfloat16 on GPUs that have it, else float16 with loss scaling; float32 on CPU
    compile: bool | str = "auto"  # torch.compile the model; "auto" means on for CUDA, off elsewhere
    cuda_graphs: bool | str = "auto"  # replay each step as one CUDA graph (sologpt/cuda_graph.py); "auto": on for
    # CUDA when the run allows it (else off, with a note on CUDA); True where it cannot is an error
    fp8: bool = False  # fp8 matmuls in the transformer blocks (sologpt/fp8.py): CUDA capability 8.9+, bfloat16
    fp8_head: bool = False  # the output layer's matmuls in fp8 (with or without fp8); pays at GPT-2 124M, fp8 does not
    residual_bf16: bool = False  # under bf16 autocast, keep the residual stream in bf16 instead of float32 (faster)
    # (fp8, fp8_head and residual_bf16 stay off by default: faster, but they round what the model computes)
    parallel: str = "ddp"  # under torchrun: "ddp" (replicas) or "fsdp" (FSDP2 shards; sologpt/distributed.py)
    seed: int = 1337  # one seed for model init, batches and dropout


# ---- the learning rate and the optimizer ----------------------------------------------------------------------

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


def set_lr(optimizer, lr):
    for group in optimizer.param_groups:
        if torch.is_tensor(group["lr"]):  # a CUDA graph reads it from device memory: fill it in place
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def make_optimizer(model, cfg, device_type):
    """AdamW; weight decay on matrices (matmul weights, embeddings) only, never on biases or LayerNorm gains."""
    if cfg.optimizer == "muon":  # Muon for the blocks' matrices, AdamW for the rest (sologpt/muon.py)
        return MuonWithAdamW(model, cfg.learning_rate, cfg.weight_decay, (cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda", capturable=cfg.cuda_graphs is True)
    if cfg.optimizer == "galore" or cfg.update_in_backward or cfg.weights_dtype != "fp32":
        return galore.make_optimizer(model, cfg)  # per-parameter updates, possibly inside backward
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if cfg.optim_state != "fp32":  # moments in bf16 or block-wise int8: 4 or ~2 bytes per parameter instead of 8
        return LeanAdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), state_dtype=cfg.optim_state)
    # the fused CUDA kernel updates all parameters in a few launches instead of several per tensor
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2),
                             fused=device_type == "cuda", capturable=cfg.cuda_graphs is True)


# ---- one optimizer step ---------------------------------------------------------------------------------------

def train_step(model, optimizer, scaler, micro_batches, ctx, grad_clip):
    """Forward and backward on each micro-batch (x, y, kw), then clip and step; returns the step's mean loss (a
    device tensor: reading it would make the CPU wait). A CUDA graph records this same function
    (sologpt/cuda_graph.py)."""
    total = 0.0
    for x, y, kw in micro_batches:  # gradient_accumulation_steps of them
        with ctx:  # autocast: matmuls in bf16 / fp16, the loss in float32
            _, loss = model(x, y, **kw)
            loss = loss / len(micro_batches)  # gradients add up over the micro-batches: scale each to their mean
        scaler.scale(loss).backward()  # float16: the loss scaled up so small gradients survive; else unchanged
        total = total + loss.detach()
    if grad_clip > 0:
        scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    scaler.step(optimizer)  # float16: skipped when the scaled gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total


# ---- the run ----------------------------------------------------------------------------------------------------

def train(cfg):
    """Train as cfg says; returns the best val loss. Every feature is decided before the loop."""
    t0 = time.time()
    device_type = checks.resolve(cfg)  # every value checked and "auto" filled in, before any work
    d = distributed.setup(cfg)  # under torchrun: the process group and this rank's GPU; else one process
    torch.manual_seed(cfg.seed)  # the same on every rank: the same initial weights
    if device_type == "cuda":
        hardware.setup_cuda(cfg.device, cfg.attn_backend)
    ctx = hardware.autocast_context(device_type, cfg.dtype)  # mixed precision for the forward pass
    data = batches.load_dataset(cfg, d)  # train.bin / val.bin as memmaps, meta.json and its tokenizer
    run = RunDir(cfg, d.main)  # out_dir: ckpt.pt, best.pt, last.pt, config.json, meta.json, metrics.jsonl (rank 0)
    ckpt, ckpt_path = run.resume_checkpoint(cfg) if cfg.init_from == "resume" else (None, None)

    # ---- setup: the model, what the step calls, the batches, the optimizer (each switch decided here, once)
    try:
        model, init_source = build.build_model(cfg, data.meta, data.max_id, ckpt, ckpt_path)
        distributed.shard(model, cfg, d)  # FSDP2: each block's weights split over the ranks; else nothing
        model.to(cfg.device)
        loss_model = build.loss_model(model, cfg)  # the model, or a wrapper adding the chunked loss or a teacher
        loss_model = distributed.wrap(loss_model, cfg, d)  # DDP: gradients averaged over the ranks; else unchanged
        source = build.batch_source(cfg, data, d)  # each step's micro-batches (x, y, kw): this rank's share
        if cfg.batch_size == "auto":  # the largest micro-batch that fits (CUDA)
            memory.auto_batch_size(model, loss_model, source, cfg, ctx)
        print(memory.estimate(model, cfg)[1])
        optimizer = make_optimizer(model, cfg, device_type)
        scaler = hardware.LossScaler(device_type, enabled=cfg.dtype == "float16")  # float16 only
        progress = checkpoint.Progress()
        if ckpt is not None:
            progress = checkpoint.restore(ckpt, model, optimizer, scaler, source.generator, cfg, d, ckpt_path)
            print(f"resuming from {ckpt_path} at step {progress.iter_num} (best val loss {progress.best_val_loss:.4f})")
            del ckpt  # free the CPU copy of the weights and optimizer state
    except ValueError as e:
        raise UserError(str(e))
    evaluate = build.evaluator(cfg, data, d, model)  # evaluate(model, ctx) -> {"train_loss": ..., "val_loss": ...}
    step_model = torch.compile(loss_model) if cfg.compile else loss_model  # `model` stays uncompiled for saving
    step = functools.partial(train_step, step_model, optimizer, scaler, ctx=ctx, grad_clip=cfg.grad_clip)
    step = distributed.sync_on_last(step, loss_model)  # DDP: exchange gradients after the last micro-batch only
    if cfg.cuda_graphs:  # the same step, recorded once and replayed as one CUDA graph
        step = GraphedStep(step, optimizer, cfg.device)

    print_config(cfg, "config (resolved)")
    run.start(cfg, data.meta, progress.iter_num)
    t_start = t0 - progress.elapsed_s  # time_s in metrics.jsonl continues across resumes

    def state():  # what a resumed run needs to continue exactly
        return checkpoint.training_state(model, optimizer, scaler, source.generator, progress, cfg, init_source,
                                         t_start, d)

    # early stopping and the spike guard, which rolls a run back in place (off: a NaN loss stops the run)
    guard = Guard(cfg, progress, run, state, functools.partial(checkpoint.rewind, model=model, optimizer=optimizer,
                                                               scaler=scaler, cfg=cfg, d=d))
    monitor = Monitor(cfg, model, scaler, run, guard, iter_num=progress.iter_num, t_start=t_start, d=d,
                      sample=functools.partial(sample_text, model, data, cfg, ctx))  # logs, metrics, plots
    print(f"model: {model.num_params() / 1e6:.2f}M parameters (position embeddings not counted); "
          f"{monitor.tokens_per_step:,} tokens per step on {cfg.device} in {cfg.dtype}")

    it = progress.iter_num
    try:
        with StopOnSignal(d, cfg.log_interval) as stop:  # Ctrl-C / SIGTERM: finish the step, save, exit
            while True:
                # ---- evaluate and checkpoint
                if (it % cfg.eval_interval == 0 or it == cfg.max_iters) and it != progress.last_eval_iter:
                    metrics = evaluate(step_model, ctx)
                    improved = metrics["val_loss"] < progress.best_val_loss
                    if improved:
                        progress.best_val_loss, progress.best_iter = metrics["val_loss"], it
                    progress.last_eval_iter = it
                    monitor.evaluation(it, metrics, improved, lr=get_lr(max(it - 1, 0), cfg) * progress.lr_scale)
                    if improved or cfg.always_save_checkpoint:
                        run.save(state(), improved)  # ckpt.pt; best.pt too when improved
                    monitor.restart()  # the evaluation and the save are not step time
                if it >= cfg.max_iters or guard.stop:  # guard.stop: early stopping's reason, else ""
                    break

                # ---- one optimizer step on this step's micro-batches
                lr = get_lr(it, cfg) * progress.lr_scale  # lr_scale: 1 unless the spike guard lowered it
                set_lr(optimizer, lr)
                loss = step(source(it))
                it += 1
                progress.iter_num = it
                monitor.step(it, loss, lr)

                if stop.now(it):  # save where a resume continues, then exit
                    monitor.report(it, lr)
                    path = run.save(state(), last=not cfg.always_save_checkpoint)
                    args = [a for a in sys.argv if not a.startswith("--init_from=")]
                    name = signal.Signals(stop.signal).name
                    monitor.end(it, name, f"{name}: saved {path} at step {it}. Resume with:\n"
                                          f"  {distributed.resume_command(d, args)} --init_from=resume")
                    raise SystemExit(128 + stop.signal)
        monitor.end(it, guard.stop or "max_iters", best_val_loss=progress.best_val_loss)
        monitor.close()
        run.finish()
        print(f"done in {time.time() - t_start:.1f} s: {run.summary(progress)}")
        if cfg.sample_tokens > 0 and cfg.task == "lm":
            print_sample(model, data, cfg, ctx)
    except torch.cuda.OutOfMemoryError:
        raise UserError(memory.oom_message(cfg, cfg.device))
    finally:
        monitor.close()
        run.close()  # out_dir's lock
        distributed.close(d)
    return progress.best_val_loss


def sample_text(model, data, cfg, ctx):
    """sample_tokens of text, starting from a newline (characters) or the end-of-text token; its own generator, so
    the run's random state is untouched."""
    meta, enc = data.meta, data.enc
    start = enc.encode("\n") if meta["tokenizer"] == "char" and "\n" in meta["chars"] else [enc.eot_token or 0]
    gen = torch.Generator(device=cfg.device).manual_seed(cfg.seed)
    idx = torch.tensor([start], dtype=torch.long, device=cfg.device)
    with ctx:
        out = model.generate(idx, cfg.sample_tokens, temperature=0.8, top_k=200, generator=gen)
    return enc.decode(out[0, len(start):].tolist())


def print_sample(model, data, cfg, ctx):
    """A short sample at the end."""
    print("---- sample ----")
    print(sample_text(model, data, cfg, ctx))


def main(argv=None):
    run_cli(train, TrainConfig, argv)


if __name__ == "__main__":
    main()
