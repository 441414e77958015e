"""How big a model trains on one GPU within a memory budget, and how fast: for each model shape and each set of
memory switches, the largest micro-batch that fits (block 1024), its tokens/s, peak memory and trainable parameters.

    python -m bench.memory --cap_gib 24                                   # the memory table (docs/memory.md)
    python -m bench.memory --cap_gib 79 --shapes 350M --modes full freeze_half lora8 lora64   # docs/finetuning.md
    python -m bench.memory --cap_gib 24 --nproc 2 --modes full full_ckpt      # FSDP2 over 2 GPUs, each capped
    python -m bench.memory --cap_gib 24 --shapes 6.7B 13B 33B --modes lora_int8 lora_nf4 --max_batch 8  # 4-bit base
    python -m bench.memory --cap_gib 24 --shapes 1.5B 2.7B 6.7B --modes full_lean full_bwd full_galore  # all weights

The budget is simulated with torch.cuda.set_per_process_memory_fraction. Each (shape, mode) runs in its own
process so nothing carries over. Weights are random (speed and memory do not depend on their values); the model is
built on the GPU before the cap is set (loading real weights would not need more than the weights themselves); a
low-precision base is built in bf16 and lowered (int8, nf4) layer by layer there too, so a 33B shape needs ~70 GB
of the card before the cap.
Steps run eagerly (no torch.compile), so each row costs seconds, not a compile. Each step is train.py's train_step.
With --nproc N every attempt is a torchrun job of N ranks, the model sharded with FSDP2 as train.py --parallel=fsdp
shards it (sologpt/distributed.py) and every GPU capped; the micro-batch (per GPU) is searched over whole jobs,
since an out-of-memory error on one rank would leave the others waiting in a collective. tokens/s counts all ranks.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from sologpt.configurator import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]  # the repository: the children run python -m bench.memory there

# name -> (n_layer, n_head, n_embd): the GPT-2 family, then GPT-3-style 2.7B and 6.7B shapes (Brown et al. 2020), and
# the 13B and 33B classes at LLaMA's depths and widths (Touvron et al. 2023; a 4x GELU MLP: 12.6B and 31.9B weights)
SHAPES = {"124M": (12, 12, 768), "350M": (24, 16, 1024), "774M": (36, 20, 1280), "1.5B": (48, 25, 1600),
          "2.7B": (32, 32, 2560), "6.7B": (32, 32, 4096), "13B": (40, 40, 5120), "33B": (60, 52, 6656)}
# name -> train.py switches
MODES = {
    "full": {},
    "full_lean": {"grad_checkpointing": 1, "optim_state": "int8"},
    "full_ckpt": {"grad_checkpointing": 1},
    "freeze_half": {"freeze_half": True},
    "lora8": {"lora_rank": 8},
    "lora64": {"lora_rank": 64},
    "lora_bf16": {"lora_rank": 8, "base_dtype": "bf16", "grad_checkpointing": 1},
    "lora_int8": {"lora_rank": 8, "base_dtype": "int8", "grad_checkpointing": 1},
    "lora_nf4": {"lora_rank": 8, "base_dtype": "nf4", "grad_checkpointing": 1},  # QLoRA's base (sologpt/nf4.py)
    # all parameters (sologpt/galore.py): bf16 weights (stochastic rounding), updates in backward, int8 moments;
    # full_galore's moments only for a rank --galore_rank projection of the blocks' matrices (GaLore's 7B recipe)
    "full_bwd": {"grad_checkpointing": 1, "optim_state": "int8", "weights_dtype": "bf16", "update_in_backward": True},
    "full_galore": {"grad_checkpointing": 1, "optim_state": "int8", "weights_dtype": "bf16", "update_in_backward": True,
                    "optimizer": "galore"},
}


def mode_config(mode, n_layer, args, device="cuda"):
    """train.py's config for a mode: the switches, bf16 autocast, eager steps, micro-batch 1 (searched later)."""
    import train
    sw = MODES[mode]
    return train.TrainConfig(device=device, dtype="bfloat16", block_size=args.block_size, compile=False,
                             cuda_graphs=False,
                             optim_state=sw.get("optim_state", "fp32"), lora_rank=sw.get("lora_rank", 0),
                             base_dtype=sw.get("base_dtype", "fp32"),
                             grad_checkpointing=sw.get("grad_checkpointing", 0),
                             lora_targets="all", freeze_layers=n_layer // 2 if sw.get("freeze_half") else 0,
                             parallel="fsdp" if args.nproc else "ddp", batch_size=1,
                             gradient_accumulation_steps=int(os.environ.get("WORLD_SIZE", 1)),
                             optimizer=sw.get("optimizer", "adamw"), weights_dtype=sw.get("weights_dtype", "fp32"),
                             update_in_backward=sw.get("update_in_backward", False), galore_rank=args.galore_rank,
                             grad_clip=0.0 if sw.get("update_in_backward") else 1.0)


def run_one(shape, mode, args):
    """In a fresh process: build, cap, search the micro-batch, time it. Prints one JSON line."""
    import torch  # the project is imported in the child only: the parent just starts processes

    import train
    from model import GPT, GPTConfig
    from sologpt import distributed, galore, memory
    from sologpt.build import add_lora
    from sologpt.freeze import freeze
    from sologpt.hardware import LossScaler

    n_layer, n_head, n_embd = SHAPES[shape]
    cfg = mode_config(mode, n_layer, args)
    d = distributed.setup(cfg)  # --nproc: the process group; this rank's GPU is cfg.device, cuda:LOCAL_RANK
    torch.backends.cuda.matmul.allow_tf32 = True
    low = cfg.base_dtype != "fp32"
    with torch.device(cfg.device):
        if low or cfg.weights_dtype == "bf16":  # a frozen base (or bf16 weights) never needs fp32: build in bf16
            torch.set_default_dtype(torch.bfloat16)
        model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=args.block_size,
                              vocab_size=50257, vocab_pad_multiple=64, grad_checkpointing=cfg.grad_checkpointing))
        torch.set_default_dtype(torch.float32)
    freeze(model, cfg.freeze_layers)
    if cfg.lora_rank:
        add_lora(model, cfg.lora_rank, cfg.lora_alpha, 0.0, cfg.lora_targets)
        for name, p in model.named_parameters():  # adapters train in fp32, whatever the base was built in
            if p.requires_grad:
                p.data = p.data.float()
    memory.lower_frozen_weights(model, cfg.base_dtype)
    galore.lower_weights(model, cfg.weights_dtype)  # bf16 weights: built so already
    distributed.shard(model, cfg, d)  # --nproc: FSDP2, as train.py shards
    if low:  # embeddings and LayerNorms stay in fp32, as train.py keeps them
        for m in model.modules():
            if isinstance(m, (torch.nn.Embedding, torch.nn.LayerNorm)):
                m.float()
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(cfg.device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, args.cap_gib * 2**30 / total))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optimizer = train.make_optimizer(model, cfg, "cuda")
    ctx = torch.autocast("cuda", dtype=torch.bfloat16)
    scaler = LossScaler("cuda", enabled=False)  # bf16: no loss scaling

    def step(b):
        x = torch.randint(50257, (b, args.block_size), device=cfg.device)
        train.train_step(model, optimizer, scaler, [(x, x, {})], ctx, grad_clip=cfg.grad_clip)

    def try_step(b):  # a real step, optimizer state included; lr 0 leaves the weights as they are
        for g in optimizer.param_groups:
            g["lr"] = 0.0
        try:
            step(b)
        finally:
            optimizer.zero_grad(set_to_none=True)

    result = {"shape": shape, "mode": mode, "trainable": trainable, "micro_batch": 0}
    if args.micro_batch:  # --nproc: the parent searches, one job per size; an out-of-memory error ends this one
        time_it(step, args.micro_batch, optimizer, args, result, d.world)
        if d.main:
            print("RESULT " + json.dumps(result), flush=True)
        distributed.close(d)
        return
    try:
        mb = memory.find_micro_batch(try_step, limit=args.max_batch)
    except Exception as e:  # e.g. the weights alone do not fit
        result["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        mb = 0
    while mb:  # time it; an edge case that fit in the search but not now (fragmentation) backs off by a quarter
        try:
            time_it(step, mb, optimizer, args, result)
            break
        except torch.cuda.OutOfMemoryError:
            optimizer.zero_grad(set_to_none=True)
            memory.free_memory()
            mb = mb * 3 // 4
            result["error"] = "out of memory when timed, even at micro-batch 1"
    print("RESULT " + json.dumps(result), flush=True)


def time_it(step, mb, optimizer, args, result, world=1):
    """Two warm-up steps, then args.steps timed ones at micro-batch mb (per GPU); fills result. GaLore: the timed
    steps refresh no projection (train.py does every galore_gap steps, 200 by default); one more step that
    refreshes them all counts towards the peak, and its extra time is refresh_s."""
    import torch
    galore = any(g.get("rank") for g in optimizer.param_groups)
    for g in optimizer.param_groups:
        g["lr"] = 1e-5
        if galore:
            g["gap"] = 1 << 30
    torch.cuda.reset_peak_memory_stats()
    for _ in range(2):
        step(mb)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(args.steps):
        step(mb)
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / args.steps
    if galore:  # the peak of a step that refreshes every projection, and its extra time
        for g in optimizer.param_groups:
            g["gap"] = 1
        t = time.perf_counter()
        step(mb)
        torch.cuda.synchronize()
        result["refresh_s"] = time.perf_counter() - t - dt
    result.update(micro_batch=mb, tok_s=mb * args.block_size * world / dt, ms=dt * 1000,
                  peak_gib=torch.cuda.max_memory_allocated() / 2**30)


def fsdp_search(shape, mode, args, env):
    """--nproc: the largest micro-batch per GPU, one torchrun job per size tried (memory.find_micro_batch's search);
    returns the result of the largest that ran."""
    import torch

    from sologpt import memory
    results = {}

    def try_job(b):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               "-m", "bench.memory", "--one", shape, mode, "--micro_batch", str(b)] + sys.argv[1:]
        out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            if "OutOfMemoryError" in out.stdout + out.stderr:
                raise torch.cuda.OutOfMemoryError(f"micro-batch {b}")
            raise RuntimeError((out.stderr.strip().splitlines() or ["?"])[-1][:100])
        results[b] = json.loads(line[len("RESULT "):])

    try:
        mb = memory.find_micro_batch(try_job, limit=args.max_batch)
    except RuntimeError as e:
        return {"shape": shape, "mode": mode, "trainable": 0, "micro_batch": 0, "error": str(e)}
    return results.get(mb) or {"shape": shape, "mode": mode, "trainable": 0, "micro_batch": 0,
                               "error": "out of memory at micro-batch 1"}


def main():
    p = ArgumentParser(prog="python -m bench.memory", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--cap_gib", type=float, default=24.0)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["full", "full_lean", "lora_bf16", "lora_int8"], choices=list(MODES))
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--max_batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--galore_rank", type=int, default=1024, help="full_galore's rank (1024: GaLore's 7B runs)")
    p.add_argument("--nproc", type=int, default=0, help="FSDP2 over this many GPUs (torchrun), each capped")
    p.add_argument("--one", nargs=2, metavar=("SHAPE", "MODE"), help=argparse.SUPPRESS)
    p.add_argument("--micro_batch", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--skip_after_fail", action="store_true", help="once a mode fails at a shape, skip larger shapes")
    args = p.parse_args()
    if args.one:
        return run_one(*args.one, args)
    one_process = [m for m in args.modes if m in ("full_bwd", "full_galore")]
    if args.nproc and one_process:  # as train.py refuses them under torchrun (sologpt/galore.py)
        sys.exit(f"error: --modes {' '.join(one_process)} run in one process (updates in backward, whole matrices "
                 f"for GaLore): drop --nproc for them")
    import torch
    if not torch.cuda.is_available():
        sys.exit("error: python -m bench.memory measures CUDA memory: this torch sees no CUDA GPU")
    if args.nproc > torch.cuda.device_count():
        sys.exit(f"error: --nproc {args.nproc} needs that many GPUs; this machine has {torch.cuda.device_count()}")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, budget {args.cap_gib:g} GiB"
          f"{f' per GPU, FSDP2 over {args.nproc} GPUs' if args.nproc else ''}, block "
          f"{args.block_size}, bf16 autocast, eager, PYTORCH_CUDA_ALLOC_CONF="
          f"{os.environ.get('PYTORCH_CUDA_ALLOC_CONF', 'expandable_segments:True')}")
    print(f"{'shape':>6} {'mode':>12} {'trainable':>14} {'micro-batch':>11} {'tokens/s':>10} {'peak GiB':>9}")
    failed = set()
    for shape in args.shapes:
        for mode in args.modes:
            if mode in failed:
                print(f"{shape:>6} {mode:>12} {'':>14} {'skipped (a smaller shape did not fit)':>30}", flush=True)
                continue
            cmd = [sys.executable, "-m", "bench.memory", "--one", shape, mode] + [a for a in sys.argv[1:]]
            # expandable segments let freed blocks be reused for other sizes: less fragmentation near the cap
            env = {**os.environ, "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF",
                                                                           "expandable_segments:True")}
            if args.nproc:
                r = fsdp_search(shape, mode, args, env)
            else:
                out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{shape:>6} {mode:>12} crashed: {(out.stderr.strip().splitlines() or ['?'])[-1][:100]}",
                          flush=True)
                    continue
                r = json.loads(line[len("RESULT "):])
            if r["micro_batch"]:
                refresh = f"  (projection refresh: +{r['refresh_s']:.1f} s)" if "refresh_s" in r else ""
                print(f"{shape:>6} {mode:>12} {r['trainable']:>14,} {r['micro_batch']:>11} {r['tok_s']:>10,.0f} "
                      f"{r['peak_gib']:>9.2f}{refresh}", flush=True)
            else:
                print(f"{shape:>6} {mode:>12} {r['trainable']:>14,} {'does not fit':>11} {r.get('error', '')[:60]}",
                      flush=True)
                if args.skip_after_fail:
                    failed.add(mode)


if __name__ == "__main__":
    main()
