"""Quantize the Linear weights of a sologpt checkpoint to int8 or int4 (weight-only; sologpt/quantize.py).

    python -m tools.quantize --ckpt out/ckpt.pt --mode int8                  # -> out/ckpt_int8.pt
    python -m tools.quantize --ckpt out/ckpt.pt --mode int4 --group_size 64  # -> out/ckpt_int4.pt

Any float model: a run folder, a checkpoint of any kind (a LoRA run's adapters are merged into their base first) or
a Hugging Face GPT-2 directory (sologpt/checkpoint.py's locate). The optimizer state is dropped.
sample.py, tools/score.py and train.py's teacher read the result.
"""

from pathlib import Path

from sologpt import checkpoint
from sologpt.configurator import ArgumentParser, UserError, run_cli
from sologpt.quantize import MODES, state_dict_bytes


def mb(n):
    return f"{n / 1e6:.2f} MB"


def run(argv):
    parser = ArgumentParser(prog="python -m tools.quantize", description="Quantize the Linear weights of a sologpt checkpoint to int8 or int4.")
    parser.add_argument("--ckpt", required=True, help="the float model: a run folder (its ckpt.pt), a checkpoint "
                        "file (e.g. out/ckpt.pt) or a Hugging Face GPT-2 directory")
    parser.add_argument("--mode", required=True, choices=MODES)
    parser.add_argument("--group_size", type=int, default=128,
                        help="int4: inputs that share one scale and zero (default 128); int8 ignores it")
    parser.add_argument("--out", help="output file (default: ckpt_int8.pt / ckpt_int4.pt beside the checkpoint; "
                        "DIR_int8.pt beside a Hugging Face directory DIR)")
    parser.add_argument("--keep_head", action="store_true",
                        help="leave an untied output layer (tie_embeddings=False) in float; a tied one always is")
    args = parser.parse_args(argv)
    try:
        where = checkpoint.locate(args.ckpt, "--ckpt")
    except ValueError as e:
        raise UserError(str(e))
    src = where.path
    dst = Path(args.out) if args.out else src.with_name(f"{src.stem if where.kind == 'checkpoint' else src.name}_"
                                                         f"{args.mode}.pt")
    if dst.resolve() == src.resolve():
        raise UserError(f"--out {dst} is the input checkpoint: write the quantized model to another file")
    if not dst.parent.is_dir():
        raise UserError(f"the folder of --out {dst} does not exist: create it or pick another path")
    try:
        ckpt, _ = checkpoint.load_checkpoint(src, "--ckpt")
        if "quantization" in ckpt:
            raise ValueError(f"{src} is already quantized ({ckpt['quantization']['mode']}): "
                             f"quantize the float checkpoint it came from")
        qckpt = checkpoint.quantized(ckpt, args.mode, args.group_size, ("lm_head",) if args.keep_head else ())
    except ValueError as e:
        raise UserError(str(e))
    try:
        checkpoint.save(dst, qckpt)
    except OSError as e:  # the file it would replace is unchanged (checkpoint.save is atomic)
        raise UserError(f"cannot write {dst}: {e.strerror or e}: free disk space or pick another --out")
    before = sum(p.stat().st_size for p in src.iterdir()) if src.is_dir() else src.stat().st_size
    after = dst.stat().st_size
    print(f"{src}: {mb(before)} -> {dst}: {mb(after)} ({after / before:.2f}x, optimizer state dropped)")
    if not ckpt["model"] or "adapter" in ckpt:  # a LoRA run's checkpoint holds adapters: measure the merged model
        ckpt["model"] = checkpoint.load_model(ckpt).state_dict()
    w_before, w_after = state_dict_bytes(ckpt["model"]), state_dict_bytes(qckpt["model"])
    print(f"model weights: {mb(w_before)} -> {mb(w_after)} ({w_after / w_before:.2f}x)")
    return dst


def main(argv=None):
    run_cli(run, argv=argv)


if __name__ == "__main__":
    main()
