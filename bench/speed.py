"""Training-speed benchmark on one GPU: tokens/s, ms/step, model TFLOP/s, MFU and peak memory.

    python -m bench.speed                            # train.py's defaults, GPT-2 124M shape, micro-batches 12, 16, 32
    python -m bench.speed --batch_sizes 12 --hf      # also transformers' GPT2LMHeadModel, same shape, same process
    python -m bench.speed --attn_backend cudnn       # any lever below, to compare against the default
    python -m bench.speed --recipe config/shakespeare_char.py --target 1.47   # time a recipe to a val loss
    torchrun --standalone --nproc_per_node=2 -m bench.speed --batch_sizes 12 [--parallel fsdp]   # N GPUs, DDP/FSDP2

Synthetic data (random token ids): the step costs the same as on real text. Each step is train.py's train_step
(autocast forward, backward, clip, fused AdamW step). Without switches every setting is train.py's default, resolved
by train.py's own checks (sologpt/checks.py) for a CUDA run: compile on, each step replayed as one CUDA graph
(cuda_graphs "auto"), the vocabulary of GPT-2's 50257 tokens padded to 50304 rows (vocab_pad_multiple "auto"),
biases as GPT-2 (--no_bias for nanoGPT's benchmark model). MFU counts 6 FLOPs per parameter per token plus attention
(model.flops_per_token) against the card's dense bf16 peak: a known card's datasheet figure, else a measured
8192^3 bf16 matmul.
"""

import argparse
import dataclasses
import functools
import os
import subprocess
import sys
import time

import torch

import train
from model import GPT, GPTConfig
from sologpt import checks, distributed, fp8, hardware
from sologpt.chunked_ce import ChunkedLoss
from sologpt.cuda_graph import GraphedStep

from sologpt.configurator import ArgumentParser, UserError


def measured_matmul_peak(device, n=8192, reps=20):
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def time_steps(step, warmup, steps):
    """Median-free simple timing: warmup (compile, autotune), then `steps` steps between two syncs."""
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / steps


class HFLoss(torch.nn.Module):
    """transformers' GPT2LMHeadModel behind train_step's interface: forward(x, y) -> (logits, loss)."""

    def __init__(self, hf):
        super().__init__()
        self.hf = hf

    def forward(self, x, y):
        logits = self.hf(input_ids=x).logits
        return logits, torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.reshape(-1))


def bench_model(name, model, flops_per_token, args, batch_size, loss_model=None):
    device, d = args.cfg.device, args.dist
    T = args.block_size
    if args.compile_blocks:  # each block compiled on its own (torchtitan's way with FSDP), not the whole model
        for block in model.transformer.h:
            block.compile()
    # under torchrun: FSDP2 or DDP, exactly as train.py does it (sologpt/distributed.py); else unchanged
    distributed.shard(model, args.cfg, d)
    model.to(device).train()
    loss_model = distributed.wrap(loss_model or model, args.cfg, d)
    # fused AdamW, as train.py makes it (capturable: it reads the step count and lr from GPU memory in a graph)
    opt = train.make_optimizer(model, dataclasses.replace(args.cfg, cuda_graphs=args.cuda_graphs), "cuda")
    fwd = torch.compile(loss_model, mode=args.compile_mode) if args.compile and not args.compile_blocks else loss_model
    scaler = hardware.LossScaler("cuda", enabled=False)  # bf16: no loss scaling
    step_fn = functools.partial(train.train_step, fwd, opt, scaler, ctx=torch.autocast("cuda", dtype=torch.bfloat16),
                                grad_clip=1.0)
    step_fn = distributed.sync_on_last(step_fn, loss_model)
    if args.cuda_graphs:  # the whole step (forward, backward, clip, AdamW) replayed as one CUDA graph, as train.py does
        step_fn = GraphedStep(step_fn, opt, device)
    gen = torch.Generator(device=device).manual_seed(d.rank)  # each rank its own tokens
    vocab = 50257  # real token ids only, also when the embedding is padded
    batches = [torch.randint(vocab, (batch_size, T + 1), device=device, generator=gen) for _ in range(4)]
    state = {"i": 0}

    def step():
        xy = batches[state["i"] % len(batches)]
        state["i"] += 1
        step_fn([(xy[:, :-1], xy[:, 1:], {})])  # one micro-batch (x, y, kw)

    torch.cuda.reset_peak_memory_stats()
    if args.profile:  # where the time goes: the kernels that take most of 5 steps, after warmup
        time_steps(step, args.warmup, 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            time_steps(step, 0, 5)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=25, max_name_column_width=70))
    try:
        dt = time_steps(step, args.warmup, args.steps)
    except torch.OutOfMemoryError:
        print(f"{name:28s} {batch_size:>4}   out of memory")
        return
    tok_s = batch_size * T * d.world / dt  # all ranks together; the micro-batch is per GPU
    tflops = flops_per_token * tok_s / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30
    print(f"{name:28s} {batch_size:>4} {tok_s:>12,.0f} {dt * 1000:>9.1f} {tflops:>9.1f} "
          f"{100 * tflops * 1e12 / args.peak:>6.1f}% {mem:>9.2f}", flush=True)


def train_config(args):
    """The TrainConfig of a CUDA run with the benchmark's switches, resolved by train.py's checks (every "auto" as
    train.py fills it in); the switches not given keep TrainConfig's defaults. Its values go back into args."""
    cfg = train.TrainConfig(
        device="cuda", block_size=args.block_size, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
        bias=args.bias, vocab_pad_multiple=args.vocab_pad_multiple, rope=args.rope, norm=args.norm,
        qk_norm=args.qk_norm, mlp_act=args.mlp_act, tie_embeddings=not args.untied, attn_backend=args.attn_backend,
        optimizer=args.optimizer, residual_bf16=args.residual_bf16, fp8=args.fp8, fp8_head=args.fp8_head,
        chunked_loss=args.chunked_loss, compile=args.compile, cuda_graphs=args.cuda_graphs, parallel=args.parallel,
        gradient_accumulation_steps=int(os.environ.get("WORLD_SIZE", 1)), batch_size=1, dtype="bfloat16")
    try:
        checks.resolve(cfg)
    except UserError as e:  # e.g. --cuda_graphs under torchrun, --residual_bf16 on a card without bf16
        raise SystemExit(f"error: {e}")
    args.vocab_pad_multiple, args.compile, args.cuda_graphs = cfg.vocab_pad_multiple, cfg.compile, cfg.cuda_graphs
    return cfg


def throughput(args):
    # torchrun: a process group and this rank's GPU (rank 0 alone prints); the global batch has one micro-batch per rank
    args.cfg = train_config(args)
    args.dist = distributed.setup(args.cfg)
    torch.backends.cuda.matmul.allow_tf32 = True
    name = torch.cuda.get_device_name()
    args.peak = (hardware.peak_flops(args.cfg.device) or measured_matmul_peak(args.cfg.device)) * args.dist.world
    print(f"{name}, torch {torch.__version__}, peak {args.peak / 1e12:.0f} TFLOP/s (bf16 dense), "
          f"block {args.block_size}, vocab {args.vocab_size} (pad multiple {args.vocab_pad_multiple}), "
          f"compile {args.compile}{'' if args.compile_mode == 'default' else ' ' + args.compile_mode}, "
          f"cuda_graphs {args.cuda_graphs}, attn_backend {args.attn_backend}, "
          f"bias {args.bias}, fp8 blocks {args.fp8}, fp8 head {args.fp8_head}, optimizer {args.optimizer}"
          + (f", {args.dist.world} ranks ({args.parallel}), micro-batch per GPU" if args.dist.launched else ""))
    arch = dict(rope=args.rope, norm=args.norm, qk_norm=args.qk_norm, mlp_act=args.mlp_act,
                tie_embeddings=not args.untied)
    changed = GPTConfig(**arch).modern_options() + (["untied output layer"] if args.untied else [])
    if changed:
        print("architecture: " + ", ".join(changed))
    hardware.set_attention_backend(args.attn_backend)
    print(f"{'model':28s} {'mb':>4} {'tokens/s':>12} {'ms/step':>9} {'TFLOP/s':>9} {'MFU':>7} {'peak GiB':>9}")
    cfg = dict(block_size=args.block_size, vocab_size=args.vocab_size, n_layer=args.n_layer, n_head=args.n_head,
               n_embd=args.n_embd, vocab_pad_multiple=args.vocab_pad_multiple, bias=args.bias,
               residual_bf16=args.residual_bf16, **arch)
    for bs in args.batch_sizes:
        torch.manual_seed(0)
        model = GPT(GPTConfig(**cfg))
        name = "sologpt" + (f" chunked_loss={args.chunked_loss}" if args.chunked_loss else "") + \
            (" residual_bf16" if args.residual_bf16 else "")
        if args.fp8 or args.fp8_head:
            fp8.convert_to_fp8(model, head=args.fp8_head, blocks=args.fp8)
            name += (" fp8" if args.fp8 else "") + (" fp8 head" if args.fp8_head else "")
        loss_model = ChunkedLoss(model, args.chunked_loss) if args.chunked_loss else model
        bench_model(name, model, model.flops_per_token(args.block_size), args, bs, loss_model)
        del model, loss_model
        torch.cuda.empty_cache()
        if args.hf:
            from transformers import GPT2Config, GPT2LMHeadModel
            hf = GPT2LMHeadModel(GPT2Config(n_positions=args.block_size, vocab_size=args.vocab_size,
                                            n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                                            attn_implementation="sdpa"))
            ours = GPT(GPTConfig(**cfg))  # same shape, so the same FLOP count
            graphs, args.cuda_graphs = args.cuda_graphs, False  # transformers' model is timed eagerly
            bench_model("transformers GPT2LMHeadModel", hf, ours.flops_per_token(args.block_size), args, bs,
                        HFLoss(hf))
            args.cuda_graphs = graphs
            del hf, ours
            torch.cuda.empty_cache()
    distributed.close(args.dist)


def recipe(args):
    """Run train.py on a recipe and report the wall time from process start to the first val loss <= target."""
    cmd = [sys.executable, "-u", train.__file__, args.recipe, "--progress=False", "--overwrite=True", *args.extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    reached, best = None, float("inf")
    for line in proc.stdout:
        print(line, end="")
        if line.startswith("eval"):
            val = float(line.split("val loss")[1].split()[0])
            best = min(best, val)
            if reached is None and val <= args.target:
                reached = time.perf_counter() - t0
                if args.stop_at_target:
                    proc.terminate()
    proc.wait()
    total = time.perf_counter() - t0
    print(f"\nrecipe {args.recipe} {' '.join(args.extra)}")
    print(f"val <= {args.target}: " + (f"reached {reached:.1f} s after process start" if reached else "not reached"))
    print(f"best val loss {best:.4f}; process wall time {total:.1f} s")


def main():
    p = ArgumentParser(prog="python -m bench.speed", description=__doc__.splitlines()[0], allow_abbrev=False)
    D = train.TrainConfig()  # every default is train.py's
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[12, 16, 32])
    p.add_argument("--block_size", type=int, default=D.block_size)
    p.add_argument("--vocab_size", type=int, default=50257,
                   help="real tokens: GPT-2's 50257 (as train.py on GPT-2 data); 50304 is nanoGPT's way (47 unused)")
    p.add_argument("--vocab_pad_multiple", type=pad_multiple, default=D.vocab_pad_multiple,
                   help="pad the embedding rows to a multiple of this (model.py); 'auto' as train.py: 64 on CUDA")
    p.add_argument("--n_layer", type=int, default=D.n_layer)
    p.add_argument("--n_head", type=int, default=D.n_head)
    p.add_argument("--n_embd", type=int, default=D.n_embd)
    p.add_argument("--eager", dest="compile", action="store_false", default=D.compile, help="skip torch.compile")
    p.add_argument("--compile_blocks", action="store_true", help="compile each block on its own, not the model")
    p.add_argument("--compile_mode", default="default", choices=["default", "max-autotune-no-cudagraphs"],
                   help="torch.compile mode; max-autotune tries Triton matmul kernels, minutes to compile "
                        "(train.py uses the default)")
    p.add_argument("--attn_backend", default=D.attn_backend)
    p.add_argument("--fp8", action="store_true", default=D.fp8,
                   help="fp8 matmuls in the blocks (sologpt/fp8.py), Hopper-class GPUs")
    p.add_argument("--fp8_head", action="store_true", default=D.fp8_head,
                   help="the output layer in fp8 (alone, or with --fp8 too)")
    p.add_argument("--cuda_graphs", action="store_true", default=D.cuda_graphs,
                   help="replay each step as one CUDA graph (sologpt/cuda_graph.py); default 'auto', as train.py: on "
                        "where a graph can record the step (one process), so this flag only insists")
    p.add_argument("--no_cuda_graphs", dest="cuda_graphs", action="store_false", help="time the steps eagerly")
    p.add_argument("--no_bias", dest="bias", action="store_false", default=D.bias,
                   help="no biases in Linear and LayerNorm (GPTConfig bias=False; GPT-2 weights then do not load)")
    p.add_argument("--rope", action="store_true", default=D.rope, help="rotary positions (model.py's modern options)")
    p.add_argument("--norm", default=D.norm, choices=["layernorm", "rmsnorm"])
    p.add_argument("--qk_norm", action="store_true", default=D.qk_norm)
    p.add_argument("--mlp_act", default=D.mlp_act, choices=["gelu", "relu2"])
    p.add_argument("--untied", action="store_true", default=not D.tie_embeddings,
                   help="an output layer with its own weights")
    p.add_argument("--optimizer", default=D.optimizer, choices=["adamw", "muon"])
    p.add_argument("--residual_bf16", action="store_true", default=D.residual_bf16,
                   help="the residual stream in bf16 (GPTConfig.residual_bf16)")
    p.add_argument("--chunked_loss", type=int, default=D.chunked_loss,
                   help="output layer + loss this many tokens at a time")
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--hf", action="store_true", help="also time transformers' GPT2LMHeadModel")
    p.add_argument("--parallel", default=D.parallel, choices=["ddp", "fsdp"], help="under torchrun: DDP or FSDP2")
    p.add_argument("--profile", action="store_true", help="print the CUDA kernels that take the most time")
    p.add_argument("--recipe", help="a train.py config file: time it to --target instead")
    p.add_argument("--target", type=float, default=1.47)
    p.add_argument("--stop_at_target", action="store_true")
    r = ArgumentParser(prog="python -m bench.speed", add_help=False, allow_abbrev=False)  # the recipe mode's flags
    r.add_argument("--recipe")
    r.add_argument("--target", type=float, default=1.47)
    r.add_argument("--stop_at_target", action="store_true")
    args, extra = r.parse_known_args()
    if args.recipe:  # every other flag goes to train.py untouched, e.g. --max_iters=2000 or --rope=True
        args.extra = extra
        recipe(args)
        return
    args = p.parse_args()
    if args.chunked_loss < 0 or (args.chunked_loss and args.fp8_head):
        p.error("--chunked_loss must be >= 0, and it computes the output layer itself: not with --fp8_head")
    throughput(args)


def pad_multiple(text):
    """--vocab_pad_multiple: a positive integer or 'auto' (train.py resolves it)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer or 'auto'")


if __name__ == "__main__":
    main()
