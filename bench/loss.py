"""What chunked_loss saves: peak memory and time of a training step, plain against chunked (sologpt/chunked_ce.py).

On the CPU or a GPU:
    python -m bench.loss                                   # CPU: 2 x 128 model, GPT-2's vocabulary, 8 x 256 tokens
    python -m bench.loss --device cuda --n_layer 12 --n_head 12 --n_embd 768 --block_size 1024 --batch_size 12 --compile

Each variant runs in its own process, so the peak (CUDA: max allocated; CPU: the process's peak RSS, which
includes Python and torch themselves, about 0.3-0.4 GB, printed as the "no step" row) belongs to it alone.
A step is train.py's train_step (forward, backward and an AdamW update), without gradient clipping.
"""

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

from sologpt.configurator import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]  # the repository: the children run python -m bench.loss there


def child(args):  # torch and the project are imported here only: the parent process stays bare
    import torch

    import train
    from model import GPT, GPTConfig
    from sologpt.chunked_ce import ChunkedLoss
    from sologpt.hardware import LossScaler
    torch.manual_seed(0)
    cuda = args.device.startswith("cuda")
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=args.block_size,
                          vocab_size=args.vocab_size, vocab_pad_multiple=64)).to(args.device)
    loss_model = ChunkedLoss(model, args.chunk) if args.chunk > 0 else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=cuda)
    fwd = torch.compile(loss_model) if args.compile else loss_model
    scaler = LossScaler(args.device.partition(":")[0], enabled=False)  # bf16 / float32: no loss scaling
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else torch.autocast("cpu", enabled=False)
    x = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=args.device)
    y = torch.randint(0, args.vocab_size, (args.batch_size, args.block_size), device=args.device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    times = []
    for i in range(args.steps + 2 if args.chunk >= 0 else 0):
        t = time.perf_counter()
        loss = train.train_step(fwd, opt, scaler, [(x, y, {})], ctx, grad_clip=0.0)
        sync()
        if i >= 2:  # the first steps allocate optimizer state (and compile)
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"ms": 1000 * sorted(times)[len(times) // 2] if times else None, "peak": peak,
                      "loss": loss.item() if times else None}))


def main():
    p = ArgumentParser(prog="python -m bench.loss", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--device", default="cpu")
    p.add_argument("--n_layer", type=int, default=2)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--n_embd", type=int, default=128)
    p.add_argument("--block_size", type=int, default=256)
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--chunks", type=int, nargs="+", default=[0, 2048, 512], help="0: the plain path")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--child_chunk", dest="chunk", type=int, help=argparse.SUPPRESS)  # set for the child processes
    args = p.parse_args()
    if args.chunk is not None:
        return child(args)
    tokens = args.batch_size * args.block_size
    print(f"{args.device}: {args.n_layer} x {args.n_embd}, vocab {args.vocab_size}, {args.batch_size} x "
          f"{args.block_size} = {tokens:,} tokens per step; one float32 (tokens, vocab) tensor is "
          f"{tokens * args.vocab_size * 4 / 2**30:.2f} GiB")
    print(f"| {'loss path':24s} | ms/step | peak GiB | loss |")
    print("| --- | ---: | ---: | ---: |")
    for chunk in ([-1] if not args.device.startswith("cuda") else []) + args.chunks:
        argv = [a for a in sys.argv[1:]] + [f"--child_chunk={chunk}"]
        out = subprocess.run([sys.executable, "-m", "bench.loss", *argv], capture_output=True, text=True, cwd=ROOT)
        if out.returncode:
            print(f"| chunk {chunk} | failed: {out.stderr.strip().splitlines()[-1]} |")
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        name = "no step (start-up)" if chunk < 0 else "plain" if chunk == 0 else f"chunked_loss={chunk}"
        ms = f"{r['ms']:.0f}" if r["ms"] else ""
        loss = f"{r['loss']:.4f}" if r["loss"] else ""
        print(f"| {name:24s} | {ms} | {r['peak'] / 2**30:.2f} | {loss} |", flush=True)


if __name__ == "__main__":
    main()
