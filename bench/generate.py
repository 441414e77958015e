"""Generation speed: new tokens/s of greedy decoding with a KV cache, at batch 1 and 16, for sologpt's engine
(sologpt/inference.py, with and without the CUDA graph) and transformers' GPT2LMHeadModel.generate on the same
weights (exported to a GPT-2 directory and loaded there), in one process.

    python -m bench.generate                      # GPT-2 124M shape, random weights, bf16, prompt 128, 256 new
    python -m bench.generate --device cpu --batch_sizes 1 --new 64 --int8   # the CPU path, float and int8

The weight-read bound: each decode step reads every weight once, so tokens/s per row cannot beat
(memory bandwidth / weight bytes); the table prints that bound from a measured device copy.
"""

import copy
import sys
import tempfile
import time

import torch

from model import GPT, GPTConfig
from sologpt import hf_gpt2, quantize
from sologpt.inference import Engine

from sologpt.configurator import ArgumentParser


def timed(fn, device, reps=3):
    fn()  # warm up (CUDA graph capture, lazy init)
    best = float("inf")
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def copy_bandwidth(device):
    if device != "cuda":
        return None
    x = torch.empty(1 << 28, dtype=torch.uint8, device=device)  # 256 MiB
    y = torch.empty_like(x)
    dt = timed(lambda: [y.copy_(x) for _ in range(10)], device)
    return 2 * x.numel() * 10 / dt  # read + write


def main():
    p = ArgumentParser(prog="python -m bench.generate", description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=256)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--no_hf", action="store_true", help="skip transformers")
    p.add_argument("--int8", action="store_true", help="also the int8 weight-only model (sologpt/quantize.py)")
    args = p.parse_args()
    dev = args.device
    if dev.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but this torch sees no CUDA GPU: use --device cpu")
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=1024,
                          vocab_size=50257)).eval()
    bf16 = dev == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    weight_bytes = sum(t.numel() * 2 for t in model.parameters())  # as bf16
    bw = copy_bandwidth(dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, GPT-2 {args.n_layer}x{args.n_embd}, prompt {args.prompt}, "
          f"{args.new} new tokens, greedy, {'bf16' if bf16 else 'float32'}")
    if bw:
        print(f"copy bandwidth {bw / 1e12:.2f} TB/s; bf16 weights {weight_bytes / 1e6:.0f} MB: weight-read bound "
              f"{bw / weight_bytes:,.0f} decode steps/s")
    hf = None
    if not args.no_hf:
        try:
            import transformers
            with tempfile.TemporaryDirectory() as d:
                hf_gpt2.save(model, d)
                hf = transformers.GPT2LMHeadModel.from_pretrained(d).eval().to(dev)
        except ImportError:
            print("(transformers not installed: its rows are skipped)")
    variants = [("sologpt engine + CUDA graph", model, True), ("sologpt engine, eager", model, False)]
    if args.int8:
        variants.append(("sologpt int8 engine", quantize.quantize_model(copy.deepcopy(model), "int8"), dev == "cuda"))
    print(f"{'generator':32s} {'batch':>5} {'new tok/s':>10} {'ms/step':>8}")
    for B in args.batch_sizes:
        gen = torch.Generator().manual_seed(B)
        prompts = torch.randint(50257, (B, args.prompt), generator=gen)
        for label, m, graph in variants:
            if graph and dev != "cuda":
                continue
            m.to(dev)
            engine = Engine(m, B, args.prompt + args.new, dev, torch.bfloat16 if bf16 else None, cuda_graph=graph)
            dt = timed(lambda: engine.generate(prompts.tolist(), args.new, temperature=0, ctx=ctx), dev)
            print(f"{label:32s} {B:>5} {B * args.new / dt:>10,.0f} {1000 * dt / args.new:>8.2f}", flush=True)
        if hf is not None:
            x = prompts.to(dev)
            mask = torch.ones_like(x)

            def run_hf():
                with ctx:
                    hf.generate(x, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                                do_sample=False, pad_token_id=0)
            dt = timed(run_hf, dev, reps=2)
            print(f"{'transformers generate':32s} {B:>5} {B * args.new / dt:>10,.0f} {1000 * dt / args.new:>8.2f}",
                  flush=True)


if __name__ == "__main__":
    main()
