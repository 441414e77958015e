"""Data-parallel scaling: train.py under torchrun on 1..N GPUs (DDP, and FSDP2), with nanoGPT's train.py under
torchrun on the same data in the same call as the peer.

    python -m bench.scaling --gpus 1 2                                  # sologpt DDP and FSDP2 on 1 and 2 GPUs
                                                                        # (and plain python train.py on 1)
    python -m bench.scaling --gpus 1 2 --nanogpt path/to/nanoGPT        # and nanoGPT's DDP (a checkout of it)

Every row is a real training run, as a user starts it: `torchrun --standalone --nproc_per_node=N train.py ...` on
random GPT-2 token ids (the step costs the same as on text), GPT-2 124M shape (block 1024, no biases, vocabulary
padded to 50304 as nanoGPT pads it), bf16, compile, the same micro-batch per GPU and one micro-batch per GPU per
step: the global batch grows with N, as in nanoGPT's DDP. tokens/s is the median over the log windows after the
first (compile and warm-up). Weak scaling: the tokens/s on N GPUs over the tokens/s on 1 (ideal: N).
nanoGPT's files are copied into a temporary folder and run there; nothing of it is kept or committed.
"""

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from sologpt.configurator import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]  # torchrun, from this Python


def write_data(root, tokens):
    """root/rand/{train,val}.bin (random GPT-2 ids) + meta.json for train.py; root/nanogpt/data/openwebtext/ links."""
    rng = np.random.default_rng(0)
    d = root / "rand"
    d.mkdir(parents=True)
    rng.integers(0, 50257, tokens, dtype=np.uint16).tofile(d / "train.bin")
    rng.integers(0, 50257, 1 << 20, dtype=np.uint16).tofile(d / "val.bin")
    (d / "meta.json").write_text(f'{{"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16", '
                                 f'"train_tokens": {tokens}, "val_tokens": {1 << 20}, "max_token_id": 50256}}')
    return d


def median_tok_s(values):
    return statistics.median(values[1:]) if len(values) > 1 else (values[0] if values else float("nan"))


def run_sologpt(n, parallel, args, root, log):
    """parallel None: plain `python train.py` (one GPU, no distributed code); else torchrun with DDP or FSDP2."""
    launch = [sys.executable] if parallel is None else [*TORCHRUN, f"--nproc_per_node={n}"]
    cmd = [*launch, str(ROOT / "train.py"),
           f"--data_root={root}", "--dataset=rand", f"--out_dir={root / f'out-{parallel}-{n}'}", "--overwrite=True",
           f"--batch_size={args.batch_size}", f"--gradient_accumulation_steps={n}", "--block_size=1024",
           "--bias=False", "--dropout=0.0", "--vocab_pad_multiple=64", "--dtype=bfloat16", "--compile=True",
           "--cuda_graphs=False", f"--max_iters={args.steps}", f"--eval_interval={args.steps}", "--eval_iters=1",
           f"--log_interval={args.log_interval}", "--warmup_iters=10", "--progress=False", "--sample_tokens=0",
           "--always_save_checkpoint=False"]
    if parallel:
        cmd.append(f"--parallel={parallel}")
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{out.stdout}\n{out.stderr}\n")
    if out.returncode:
        return None, (out.stderr.strip().splitlines() or ["?"])[-1]
    toks = [float(m.group(1).replace(",", "")) for m in re.finditer(r"\|\s+([\d,]+) tok/s", out.stdout)]
    mems = [float(m.group(1)) for m in re.finditer(r"mem ([\d.]+) GiB", out.stdout)]
    return median_tok_s(toks), f"{mems[-1]:.1f} GiB" if mems else ""


def run_nanogpt(n, args, root, log):
    work = root / "nanogpt"
    if not work.exists():
        work.mkdir()
        for name in ("train.py", "model.py", "configurator.py"):
            shutil.copy(Path(args.nanogpt) / name, work / name)
        (work / "data" / "openwebtext").mkdir(parents=True)
        for split in ("train", "val"):
            os.symlink(root / "rand" / f"{split}.bin", work / "data" / "openwebtext" / f"{split}.bin")
    cmd = [*TORCHRUN, f"--nproc_per_node={n}", "train.py", "--dataset=openwebtext",
           f"--out_dir=out-{n}", f"--batch_size={args.batch_size}", f"--gradient_accumulation_steps={n}",
           "--block_size=1024", "--compile=True", f"--max_iters={args.steps}", "--eval_interval=100000",
           "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False", "--dtype=bfloat16"]
    out = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{out.stdout}\n{out.stderr}\n")
    if out.returncode:
        return None, (out.stderr.strip().splitlines() or ["?"])[-1]
    ms = [float(t) for t in re.findall(r"^iter \d+: loss [\d.]+, time ([\d.]+)ms", out.stdout, re.M)]
    ms = ms[args.log_interval:]  # the same warm-up as sologpt's first log window
    if not ms:
        return None, "no iteration lines"
    return args.batch_size * 1024 * n / (statistics.median(ms) / 1000), ""


def main():
    p = ArgumentParser(prog="python -m bench.scaling", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2], help="the numbers of GPUs to run on")
    p.add_argument("--parallel", nargs="+", default=["ddp", "fsdp"], choices=["ddp", "fsdp"])
    p.add_argument("--nanogpt", help="a checkout of nanoGPT (karpathy/nanoGPT): its train.py runs as the peer")
    p.add_argument("--batch_size", type=int, default=12, help="micro-batch per GPU")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--log_interval", type=int, default=10)
    p.add_argument("--log", default="scaling.log", help="every run's full output")
    args = p.parse_args()
    import torch
    if torch.cuda.device_count() < max(args.gpus):
        sys.exit(f"error: --gpus {max(args.gpus)} needs that many GPUs; this machine has {torch.cuda.device_count()}")
    print(f"{torch.cuda.get_device_name()} x{torch.cuda.device_count()}, torch {torch.__version__}, GPT-2 124M shape, "
          f"micro-batch {args.batch_size} x 1024 per GPU, bf16, compile, {args.steps} steps")
    rows = []
    with tempfile.TemporaryDirectory() as tmp, open(args.log, "w") as log:
        root = Path(tmp)
        write_data(root, tokens=20_000_000)
        runs = [(name, parallel) for name, parallel in [("sologpt ddp", "ddp"), ("sologpt fsdp", "fsdp")]
                if parallel in args.parallel] + ([("nanoGPT ddp", "nanogpt")] if args.nanogpt else [])
        if 1 in args.gpus:  # the single-process run, the reference for torchrun's own cost
            runs.insert(0, ("sologpt python", None))
        for name, parallel in runs:
            base = None
            for n in ([1] if parallel is None else args.gpus):
                tok_s, note = run_nanogpt(n, args, root, log) if parallel == "nanogpt" else \
                    run_sologpt(n, parallel, args, root, log)
                if tok_s is None:
                    print(f"{name:14s} {n:>4}  failed: {note[:100]}", flush=True)
                    continue
                base = base or (tok_s if n == args.gpus[0] else None)
                rows.append((name, n, tok_s))
                scale = f"{tok_s / base:.2f}x" if base else ""
                print(f"{name:14s} {n:>4} GPU {tok_s:>12,.0f} tok/s {scale:>7} {note}", flush=True)
    peers = {n: t for name, n, t in rows if name == "nanoGPT ddp"}
    for name, n, t in rows:
        if name != "nanoGPT ddp" and n in peers:
            print(f"{name} on {n} GPU(s): {t / peers[n]:.2f}x nanoGPT's DDP")


if __name__ == "__main__":
    main()
