"""What weight-only quantization (sologpt/quantize.py) costs and saves, for one checkpoint: float vs int8 vs int4.

    python -m bench.quantize --out_dir=out-small                          # its dataset's val.bin, auto device
    python -m bench.quantize --out_dir=out-gpt2 --input=held_out.txt --device=cuda --both

For each kind it prints: the checkpoint file size (saved as python -m tools.quantize saves it: weights and config,
no optimizer state, so the float row is the fair baseline), the bytes of the model's state dict, greedy generation
speed at batch 1 (model.generate with its KV cache, new_tokens after a prompt_tokens prompt), and the perplexity of
the evaluation text (tools/score.py's strided evaluation) with its change against float.
Expect smaller files and memory, a small perplexity change, and slower generation: these layers dequantize their
weight on every forward instead of running a fused low-bit kernel (sologpt/quantize.py says why).
"""

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sologpt import checkpoint, quantize, tokenizer as tok
from sologpt.configurator import ArgumentParser, UserError
from sologpt.hardware import autocast_context, resolve_device
from tools import score


def parse_args(argv):
    p = ArgumentParser(prog="python -m bench.quantize", description=__doc__.splitlines()[0])
    p.add_argument("--out_dir", default="out", help="folder with ckpt.pt and meta.json")
    p.add_argument("--ckpt", default="", help="a float checkpoint file (default: out_dir/ckpt.pt)")
    p.add_argument("--input", default="", help="UTF-8 text to score (default: val.bin of the checkpoint's dataset)")
    p.add_argument("--max_tokens", type=int, default=0, help="score only the first N tokens (0: all)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--both", action="store_true", help="time generation on the CPU too when the device is a GPU")
    p.add_argument("--group_size", type=int, default=128,
                   help="int4 group size; lowered to the largest even divisor of n_embd when it does not divide it")
    p.add_argument("--new_tokens", type=int, default=128, help="tokens generated for the speed measurement")
    p.add_argument("--repeats", type=int, default=3, help="timed generation runs; the fastest counts")
    p.add_argument("--prompt_tokens", type=int, default=16, help="prompt length for the speed measurement")
    p.add_argument("--threads", type=int, default=0,
                   help="CPU threads for torch (0: its default; on a busy machine 1 can be far faster)")
    p.add_argument("--stride", type=int, default=0, help="scoring stride (0: block_size // 2)")
    return p.parse_args(argv)


def eval_tokens(args, ckpt, ckpt_path, vocab_size):
    """The token ids to score: --input tokenized with the checkpoint's tokenizer, else its dataset's val.bin."""
    if args.input:
        enc = tok.from_meta(tok.load_meta(tok.find_meta(ckpt_path, ckpt)))
        ids = score.encode(enc, score.read_text(args.input), vocab_size)
    else:
        train_cfg = ckpt.get("train_config") or {}
        data_dir = Path(train_cfg.get("data_root", "?")) / train_cfg.get("dataset", "?")
        if not (data_dir / "val.bin").is_file():
            raise UserError(f"{data_dir}/val.bin (the checkpoint's dataset) is missing: pass --input=FILE to score")
        meta = tok.load_meta(data_dir / "meta.json")
        ids = np.memmap(data_dir / "val.bin", dtype=meta["dtype"], mode="r").astype(np.int64).tolist()
    ids = ids[:args.max_tokens] if args.max_tokens else ids
    if len(ids) < max(2, args.prompt_tokens):
        raise UserError(f"the evaluation text has only {len(ids)} tokens: give a longer --input")
    return ids


def int4_group_size(n_embd, wanted):
    """wanted, or the largest even number below it that divides n_embd (and so 4 * n_embd, the MLP's width)."""
    for g in range(min(wanted, n_embd), 1, -1):
        if g % 2 == 0 and n_embd % g == 0:
            return g
    raise UserError(f"n_embd={n_embd} has no even divisor: int4 needs groups of an even size")


def variants(ckpt, ckpt_path, group_size):
    """(name, checkpoint dict) for float, int8 and int4; the float one holds the weights without training state.
    A LoRA checkpoint is merged first, so every row is the same plain GPT."""
    model = checkpoint.load_model(ckpt, ckpt_path)
    kept = {k: v for k, v in ckpt.items() if k not in (*checkpoint.RESUME_ONLY_KEYS, "adapter", "init_source")}
    if "train_config" in kept:  # a bf16 / int8 frozen base is float32 again here: load_model must not lower it
        kept["train_config"] = {**kept["train_config"], "base_dtype": "fp32"}
    float_ckpt = {**kept, "model_config": checkpoint.model_config(model), "model": model.state_dict()}
    yield "float", float_ckpt
    yield "int8", checkpoint.quantized(float_ckpt, "int8")
    yield "int4", checkpoint.quantized(float_ckpt, "int4", group_size)


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def tokens_per_s(model, prompt, new_tokens, device, ctx, repeats):
    """Greedy generation at batch 1: the best of `repeats` runs, after a short warm-up run (CUDA context, kernel
    selection, allocator). The best, not the mean: other work on the machine only ever slows a run down."""
    idx = torch.tensor([prompt], dtype=torch.long, device=device)  # (1, T)
    best = float("inf")
    with ctx:
        model.generate(idx, 8, temperature=0)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            model.generate(idx, new_tokens, temperature=0)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return new_tokens / best


def measure(name, variant, folder, ids, devices, args):
    """One table row: file size, weight bytes, perplexity (on the first device) and generation speed per device."""
    file = Path(folder) / f"{name}.pt"
    checkpoint.save(file, variant)  # as python -m tools.quantize writes it: the file a user would ship
    model = checkpoint.load_model(variant, file)
    row = {"name": name, "file": file.stat().st_size, "weights": quantize.state_dict_bytes(variant["model"])}
    for i, (device, device_type, dtype) in enumerate(devices):
        model.to(device).eval()
        ctx = autocast_context(device_type, dtype)
        if i == 0:
            bs = model.config.block_size
            row["ppl"] = score.score_text(model, ids, bs, args.stride or max(1, bs // 2), device, ctx)["perplexity"]
        row[device] = tokens_per_s(model, ids[:args.prompt_tokens], args.new_tokens, device, ctx, args.repeats)
    print(f"  {name} done", file=sys.stderr)
    return row


def print_table(rows, path, c, ids, devices, group_size, args):
    print(f"{path}: {c['n_layer']} layers, n_embd {c['n_embd']}, vocab {c['vocab_size']}, block_size "
          f"{c['block_size']}; original file {path.stat().st_size / 1e6:.2f} MB (with optimizer state)")
    print(f"perplexity of {len(ids):,} tokens of {args.input or 'val.bin'} on {devices[0][0]} {devices[0][2]} "
          f"({torch.get_num_threads()} CPU threads); greedy generation of {args.new_tokens} tokens after "
          f"{args.prompt_tokens} at batch 1, best of {args.repeats}")
    if args.prompt_tokens + args.new_tokens > c["block_size"]:
        print(f"(generation runs past block_size={c['block_size']}: from there each token re-reads the window)")
    header = f"{'kind':<6} {'group':>5} {'file MB':>9} {'weights MB':>11} {'val ppl':>9} {'vs float':>9}"
    print(header + "".join(f" {'tok/s ' + d:>12}" for d, _, _ in devices))
    base = rows[0]["ppl"]
    for row in rows:
        group = str(group_size) if row["name"] == "int4" else "-"
        change = "-" if row is rows[0] else f"{100 * (row['ppl'] / base - 1):+.2f}%"
        line = (f"{row['name']:<6} {group:>5} {row['file'] / 1e6:>9.3f} {row['weights'] / 1e6:>11.3f} "
                f"{row['ppl']:>9.4f} {change:>9}")
        print(line + "".join(f" {row[d]:>12.1f}" for d, _, _ in devices))


def run(args):
    path = Path(args.ckpt) if args.ckpt else Path(args.out_dir) / "ckpt.pt"
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = [resolve_device(args.device, "auto")]  # (device, device_type, dtype): perplexity uses the first
    if args.both and devices[0][1] != "cpu":
        devices.append(resolve_device("cpu", "auto"))
    try:
        ckpt = checkpoint.read(path)
        if "quantization" in ckpt:
            raise UserError(f"{path} is already quantized: benchmark the float checkpoint it came from")
        config = ckpt["model_config"]
        if config.get("n_classes", 0) > 0:
            raise UserError(f"{path} is a classifier: this benchmark scores a language model")
        group_size = int4_group_size(config["n_embd"], args.group_size)
        ids = eval_tokens(args, ckpt, path, config["vocab_size"])
        with tempfile.TemporaryDirectory() as tmp:
            rows = [measure(name, variant, tmp, ids, devices, args)
                    for name, variant in variants(ckpt, path, group_size)]
    except ValueError as e:  # bad checkpoint, meta.json or text (TokenizerError is a ValueError)
        raise UserError(str(e))
    print_table(rows, path, config, ids, devices, group_size, args)
    return rows


def main(argv=None):
    try:
        run(parse_args(sys.argv[1:] if argv is None else argv))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
