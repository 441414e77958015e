"""Generation speed: new tokens/s of greedy decoding with a KV cache, at batch 1 and 16, for sologpt's engine
(sologpt/inference.py: the one-step Engine with and without its CUDA graph, and MultiStepEngine, --steps tokens per
graph replay, sampled on the device) and transformers' GPT2LMHeadModel.generate on the same weights (exported to a
GPT-2 directory and loaded there), in one process.

    python -m bench.generate                      # GPT-2 124M shape, random weights, bf16, prompt 128, 256 new
    python -m bench.generate --device cpu --batch_sizes 1 8 --prompt 32 --new 32 --int8 --no_hf  # CPU, float and int8
    python -m bench.generate --check --sampled    # also: greedy tokens of every sologpt engine equal the one-step
                                                  # engine's, and each engine with temperature 0.8, top_k 200
    python -m bench.generate --device cpu --ckpt out-target --draft out-draft --text input.txt --batch_sizes 1 \
        --prompt 16 --new 96 --no_hf              # trained models: speculative decoding at batch 1, k = 2, 4, 6

--draft adds speculative decoding (sologpt/speculative.py) at batch 1: its tokens/s beside the plain engines' in
the same run, the share of draft tokens accepted and the tokens per forward of the model. A draft of random
weights ("LxE": L layers of width E) fits a random model's shape but is rarely accepted; trained checkpoints
(--ckpt, --draft, prompts from --text) give the figure that matters.

The weight-read bound: each decode step reads every weight once, so tokens/s per row cannot beat
(memory bandwidth / weight bytes); the table prints that bound from a measured device copy.
"""

import copy
import sys
import tempfile
import time

import torch

from model import GPT, GPTConfig
from sologpt import checkpoint, hf_gpt2, quantize, tokenizer
from sologpt.inference import Engine, MultiStepEngine
from sologpt.speculative import SpeculativeEngine, check_pair

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
    p.add_argument("--steps", type=int, default=16, help="MultiStepEngine's decode steps per call / graph replay")
    p.add_argument("--check", action="store_true",
                   help="compare every engine's greedy tokens with the one-step engine's, in float32 (2 calls each); "
                        "exit 1 if any differ")
    p.add_argument("--sampled", action="store_true", help="also time sampling (temperature 0.8, top_k 200)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads for torch (0: its default)")
    p.add_argument("--reps", type=int, default=3, help="timed calls per row after a warm-up; the fastest counts")
    p.add_argument("--ckpt", default="", help="measure this model (run folder, checkpoint file or GPT-2 directory) "
                                              "instead of random weights of the --n_layer/--n_head/--n_embd shape")
    p.add_argument("--draft", default="",
                   help="also speculative decoding at batch 1 with this draft model: a checkpoint as --ckpt, or LxE "
                        "for random weights of L layers of width E (e.g. 2x256)")
    p.add_argument("--draft_tokens", type=int, nargs="+", default=[2, 4, 6], help="the draft's tokens per round (k)")
    p.add_argument("--text", default="",
                   help="a text file: each row's prompt is --prompt tokens of it (--ckpt's tokenizer), not random ids")
    args = p.parse_args()
    dev = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if dev.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but this torch sees no CUDA GPU: use --device cpu")
    torch.manual_seed(0)
    model, meta = load(args.ckpt, "--ckpt") if args.ckpt else (
        GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, block_size=1024,
                      vocab_size=50257)).eval(), None)
    c, V = model.config, model.config.vocab_size
    if args.prompt + args.new > c.block_size:
        sys.exit(f"error: --prompt {args.prompt} + --new {args.new} exceed the model's block_size={c.block_size}")
    if args.draft and 1 not in args.batch_sizes:
        sys.exit("error: --draft measures speculative decoding at batch 1: add 1 to --batch_sizes")
    draft = make_draft(args.draft, model, meta) if args.draft else None
    text_ids = encode_text(args.text, meta) if args.text else None
    bf16 = dev == "cuda"
    ctx = torch.autocast("cuda", dtype=torch.bfloat16) if bf16 else torch.autocast("cpu", enabled=False)
    weight_bytes = sum(t.numel() * 2 for t in model.parameters())  # as bf16
    bw = copy_bandwidth(dev)
    name = torch.cuda.get_device_name() if dev == "cuda" else "CPU"
    print(f"{name}, torch {torch.__version__}, {args.ckpt or 'GPT-2'} {c.n_layer}x{c.n_embd}, prompt {args.prompt}, "
          f"{args.new} new tokens, {'bf16' if bf16 else 'float32'}, {torch.get_num_threads()} CPU threads")
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
    graph = dev == "cuda"
    int8 = quantize.quantize_model(copy.deepcopy(model), "int8") if args.int8 else None
    variants = [  # (label, model, engine class, keyword arguments); the first is the reference of --check
        ("engine + CUDA graph" if graph else "engine", model, Engine, {"cuda_graph": graph}),
        (f"multi-step engine ({args.steps})" + (" + graph" if graph else ""), model, MultiStepEngine,
         {"cuda_graph": graph, "steps": args.steps}),
    ]
    if graph:
        variants.append(("engine, eager", model, Engine, {}))
    if args.int8:
        variants += [("int8 engine" + (" + CUDA graph" if graph else ""), int8, Engine, {"cuda_graph": graph}),
                     (f"int8 multi-step ({args.steps})" + (" + graph" if graph else ""), int8, MultiStepEngine,
                      {"cuda_graph": graph, "steps": args.steps})]
    settings = [("greedy", dict(temperature=0))]
    if args.sampled:
        settings.append(("T=0.8 top_k=200", dict(temperature=0.8, top_k=200)))
    print(f"{'generator':36s} {'sampling':16s} {'batch':>5} {'new tok/s':>10} {'ms/step':>8}")
    mismatches = 0
    for B in args.batch_sizes:
        gen = torch.Generator().manual_seed(B)
        if text_ids is None:
            prompts = torch.randint(V, (B, args.prompt), generator=gen).tolist()
        else:  # B prompts from evenly spaced places in the text
            stride = (len(text_ids) - args.prompt) // B
            prompts = [text_ids[b * stride:b * stride + args.prompt] for b in range(B)]
        reference, best = None, {}
        for label, m, cls, kw in variants:
            m.to(dev)
            engine = cls(m, B, args.prompt + args.new, dev, torch.bfloat16 if bf16 else None, **kw)
            for what, sampling in settings:
                rng = torch.Generator(device=dev).manual_seed(0)
                dt = timed(lambda: engine.generate(prompts, args.new, generator=rng, ctx=ctx, **sampling), dev,
                           args.reps)
                best[what] = max(best.get(what, (0, "")), (B * args.new / dt, label))  # the fastest plain engine
                print(f"{label:36s} {what:16s} {B:>5} {B * args.new / dt:>10,.0f} {1000 * dt / args.new:>8.2f}",
                      flush=True)
            if args.check:  # a fresh engine, two calls: the second replays graphs recorded by the first. In float32:
                # under bf16 even two eager calls part at a near-tie of random weights (an H200 run: token 120 of 256)
                engine = cls(m, B, args.prompt + args.new, dev, None, **kw)
                off = torch.autocast(dev.split(":")[0], enabled=False)
                calls = [engine.generate(prompts, args.new, temperature=0, ctx=off) for _ in range(2)]
                reference = reference or calls[0]
                same = [sum(a == b for a, b in zip(row, ref)) for call in calls for row, ref in zip(call, reference)]
                ok = min(same) == args.new
                mismatches += not ok and m is model  # int8 is compared for information only
                print(f"check: {label}, batch {B}: greedy tokens equal to the first engine's: "
                      f"{'yes' if ok else 'NO'} ({sum(same)} of {len(same) * args.new})", flush=True)
        if draft is not None and B == 1:
            mismatches += speculate(args, model, draft, prompts, settings, best, reference, ctx, bf16)
        if hf is not None:
            x = torch.tensor(prompts, device=dev)
            mask = torch.ones_like(x)

            def run_hf():
                with ctx:
                    hf.generate(x, attention_mask=mask, max_new_tokens=args.new, min_new_tokens=args.new,
                                do_sample=False, pad_token_id=0)
            dt = timed(run_hf, dev, reps=2)
            print(f"{'transformers generate':36s} {'greedy':16s} {B:>5} {B * args.new / dt:>10,.0f} "
                  f"{1000 * dt / args.new:>8.2f}", flush=True)
    if args.check:
        print("check: " + ("all greedy tokens equal" if not mismatches else f"{mismatches} float engines differ"))
        sys.exit(1 if mismatches else 0)


def load(spec, flag):
    """(model in eval mode, its meta.json dict) of a run folder, checkpoint file or GPT-2 directory, or exit with one
    line."""
    try:
        model, meta, _ = checkpoint.load_with_meta(spec, flag=flag)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return model.eval(), meta


def make_draft(spec, model, meta):
    """The draft model: a checkpoint, or random weights of shape LxE with the model's vocabulary."""
    if "x" in spec and all(part.isdigit() for part in spec.split("x", 1)):
        n_layer, n_embd = (int(part) for part in spec.split("x", 1))
        if n_layer < 1 or n_embd < 1 or (n_embd >= 64 and n_embd % 64):
            sys.exit(f"error: --draft {spec}: give layers x width with a width below 64 or a multiple of 64 "
                     f"(heads of 64), e.g. 2x256")
        draft = GPT(GPTConfig(n_layer=n_layer, n_head=max(1, n_embd // 64), n_embd=n_embd,
                              block_size=model.config.block_size, vocab_size=model.config.vocab_size)).eval()
        draft_meta = meta
    else:
        draft, draft_meta = load(spec, "--draft")
    try:
        check_pair(model, draft, meta, draft_meta)
    except ValueError as e:
        sys.exit(f"error: {e}")
    return draft


def encode_text(path, meta):
    """The token ids of a text file, with the tokenizer of --ckpt (GPT-2's for random weights)."""
    try:
        return tokenizer.from_meta(meta or tokenizer.gpt2_meta()).encode(open(path, encoding="utf-8").read())
    except (OSError, ValueError) as e:
        sys.exit(f"error: --text {path}: {e}")


def speculate(args, model, draft, prompts, settings, best, reference, ctx, bf16):
    """Rows of speculative decoding at batch 1, one per k and sampling setting, with its speed over the fastest plain
    engine's (best); with --check, whether its greedy tokens (float32) equal the first engine's. Returns 1 if they
    differ."""
    dev = args.device
    model.to(dev)
    draft.to(dev)
    n_draft = sum(p.numel() for p in draft.parameters()) / 1e6
    bad = 0
    for k in args.draft_tokens:
        graph = dev == "cuda"
        label = f"speculative, k={k} ({n_draft:.1f}M draft)" + (" + graph" if graph else "")
        for what, sampling in settings:
            engine = SpeculativeEngine(model, draft, args.prompt + args.new, dev, torch.bfloat16 if bf16 else None, k,
                                       cuda_graph=graph)
            rng = torch.Generator(device=dev).manual_seed(0)
            dt = timed(lambda: engine.generate(prompts, args.new, generator=rng, ctx=ctx, **sampling), dev, args.reps)
            s = engine.stats
            base, base_label = best[what]
            print(f"{label:36s} {what:16s} {1:>5} {args.new / dt:>10,.0f} {1000 * dt / args.new:>8.2f}   "
                  f"{args.new / dt / base:.2f}x the {base_label}; accepted {engine.acceptance():.1%} of drafts, "
                  f"{s['tokens'] / s['target_forwards']:.2f} tokens per forward of the model", flush=True)
        if args.check:  # two calls: the second replays the graph recorded by the first
            engine = SpeculativeEngine(model, draft, args.prompt + args.new, dev, None, k, cuda_graph=graph)
            off = torch.autocast(dev.split(":")[0], enabled=False)
            calls = [engine.generate(prompts, args.new, temperature=0, ctx=off)[0] for _ in range(2)]
            same = min(sum(a == b for a, b in zip(got, reference[0])) for got in calls)
            bad |= same != args.new
            print(f"check: {label}: greedy tokens equal to the first engine's: "
                  f"{'yes' if same == args.new else 'NO'} ({same} of {args.new})", flush=True)
    return bad


if __name__ == "__main__":
    main()
