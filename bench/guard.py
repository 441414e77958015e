"""What the spike guard costs (sologpt/guard.py, docs/experiments.md): the copy of the training state it keeps in host
memory at each evaluation (spike_rollback="memory"; beside the torch.save into memory that it replaced, as the
baseline), and one rollback (the copy read back and put into the live
model, optimizer and RNG, as train.py does it), for a few model shapes on one device. Also the price of the
metrics.jsonl line every log step now writes. The weights are random; one AdamW step runs first so the optimizer
state exists.

    python -m bench.guard --device cuda --shapes 124M 350M
    python -m bench.guard --device cpu --shapes small 10M
"""

import argparse
import io
import json
import tempfile
import time
from pathlib import Path

import torch

import train
from model import GPT, GPTConfig
from sologpt import checkpoint, guard
from sologpt.hardware import LossScaler

# name -> (n_layer, n_head, n_embd, block_size, vocab_size): config/small.py, config/shakespeare_char.py (characters),
# GPT-2 124M and 350M (GPT-2's tokens, padded to 50304)
SHAPES = {"small": (2, 4, 128, 64, 65), "10M": (6, 6, 384, 256, 65), "124M": (12, 12, 768, 1024, 50304),
          "350M": (24, 16, 1024, 1024, 50304)}


def measure(shape, device, repeats):
    n_layer, n_head, n_embd, block, vocab = SHAPES[shape]
    cfg = train.TrainConfig(device=device, n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block,
                            compile=False, cuda_graphs=False, dtype="float32")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block, vocab_size=vocab)).to(device)
    optimizer = train.make_optimizer(model, cfg, device.split(":")[0])
    scaler = LossScaler(device.split(":")[0], enabled=False)
    x = torch.randint(0, vocab, (1, block), device=device)
    train.train_step(model, optimizer, scaler, [(x, x, {})], torch.autocast(device.split(":")[0], enabled=False), 1.0)
    gen, progress = torch.Generator(), checkpoint.Progress()

    def state():
        return checkpoint.training_state(model, optimizer, scaler, gen, progress, cfg, "scratch", time.time())

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    copies, saves, rollbacks, good = [], [], [], None
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        buf = io.BytesIO()
        torch.save(state(), buf)  # what Guard.evaluation kept before host_copy: the baseline
        saves.append(time.perf_counter() - t)
        t = time.perf_counter()
        good = guard.host_copy(state(), into=good)  # what Guard.evaluation keeps (the buffers reused after the first)
        copies.append(time.perf_counter() - t)
        t = time.perf_counter()
        checkpoint.rewind(guard.host_copy(good), model, optimizer, scaler, cfg)  # as Guard.roll_back does
        sync()
        rollbacks.append(time.perf_counter() - t)
    return {"shape": shape, "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
            "copy_GiB": round(buf.getbuffer().nbytes / 2**30, 3), "save_s": round(min(saves), 3),
            "copy_s": round(min(copies), 3), "rollback_s": round(min(rollbacks), 3)}


def metrics_line_us(n=2000):
    """Microseconds to append one step record to metrics.jsonl, as the monitor does at each log step."""
    record = {"kind": "step", "iter": 100, "loss": 2.5, "lr": 6e-4, "tokens_per_s": 123456.7, "ms_per_step": 12.3,
              "tokens": 1e6, "time_s": 12.345, "peak_alloc_gib": 1.23, "peak_reserved_gib": 1.5}
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "metrics.jsonl"
        t = time.perf_counter()
        for _ in range(n):
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")
        return (time.perf_counter() - t) / n * 1e6


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", nargs="+", default=["small", "10M", "124M"], choices=list(SHAPES))
    p.add_argument("--repeats", type=int, default=3, help="timings per shape; the fastest is reported")
    args = p.parse_args()
    name = torch.cuda.get_device_name(args.device) if args.device.startswith("cuda") else "CPU"
    print(f"device: {args.device} ({name}), torch {torch.__version__}")
    print(f"metrics.jsonl line per log step: {metrics_line_us():.1f} us")
    print("shape   params   state copy   torch.save to memory (before)   copy at each evaluation   one rollback")
    for shape in args.shapes:
        r = measure(shape, args.device, args.repeats)
        print(f"{r['shape']:7s} {r['params_M']:6.1f}M   {r['copy_GiB']:7.3f} GiB   {r['save_s']:16.3f} s"
              f"              {r['copy_s']:12.3f} s           {r['rollback_s']:8.3f} s", flush=True)


if __name__ == "__main__":
    main()
