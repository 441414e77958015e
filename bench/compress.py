"""Compression experiments on tiny-shakespeare (characters): does a teacher help a small student, and does
quantization-aware training make the int4 model better than post-training int4? Prints val loss / perplexity
(docs/inference.md).

    python -m bench.compress [--shared ../shared] [--device cuda] [--only distill|qat]

1. Distillation: a teacher (config/shakespeare_char.py, 6 layers x 384) and two students of config/small.py's
   shape (2 x 128), trained for the same steps on the same batches, one with the teacher's soft labels.
2. QAT: from the small model, (a) int8 / int4 post-training quantization; (b) --qat_steps more steps of plain
   training, then int4; (c) the same steps with qat=int4, then int4. (b) and (c) see the same data.
"""

import subprocess
import sys
import tempfile
from pathlib import Path

from sologpt.configurator import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, config/, tools/


def sh(*cmd):
    """Run python with these arguments in the repository root (so config/ and -m tools.* resolve); its stdout."""
    res = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"failed: {' '.join(map(str, cmd))}\n{res.stderr[-3000:]}")
    return res.stdout


def train(args, out, *flags):
    extra = [f"--eval_iters={args.eval_iters}"] if args.eval_iters else []
    sh(ROOT / "train.py", *flags, *extra, f"--device={args.device}", f"--data_root={args.work / 'data'}",
       f"--data_input={args.text}", f"--out_dir={out}", "--progress=False", "--sample_tokens=0", "--overwrite=True")


def val_loss(args, ckpt):
    """Mean NLL per character of the val text (python -m tools.score, stride half a block)."""
    out = sh("-m", "tools.score", f"--ckpt={ckpt}", f"--input={args.val_text}", f"--device={args.device}")
    line = next(x for x in out.splitlines() if "nats" in x or "NLL" in x or "nll" in x)
    return float(line.replace("=", " ").replace(":", " ").split("nats")[0].split()[-1]) if "nats" in line else line


def main():
    p = ArgumentParser(prog="python -m bench.compress", description=__doc__.splitlines()[0])
    p.add_argument("--shared", default="../shared")
    p.add_argument("--device", default="auto")
    p.add_argument("--iters", type=int, default=3000, help="student steps (config/small.py: 3000)")
    p.add_argument("--teacher_iters", type=int, default=2500)
    p.add_argument("--qat_steps", type=int, default=500)
    p.add_argument("--work", default=None)
    p.add_argument("--eval_iters", type=int, default=0, help="override the configs' (for a quick check)")
    p.add_argument("--only", choices=("distill", "qat"), help="run one of the two experiments")
    args = p.parse_args()
    args.work = Path(args.work or tempfile.mkdtemp(prefix="bench_compress_")).resolve()  # the runs' cwd is ROOT
    args.work.mkdir(parents=True, exist_ok=True)
    args.text = (Path(args.shared) / "data" / "shakespeare" / "input.txt").resolve()
    text = args.text.read_text(encoding="utf-8")
    args.val_text = args.work / "val.txt"
    args.val_text.write_text(text[int(len(text) * 0.9):], encoding="utf-8")  # the char dataset's val split
    w = args.work

    small = ["config/small.py", f"--max_iters={args.iters}", f"--eval_interval={args.iters}"]
    if args.only == "qat":
        train(args, w / "student", *small)
        return qat(args, w)
    train(args, w / "teacher", "config/shakespeare_char.py", f"--max_iters={args.teacher_iters}",
          f"--eval_interval={args.teacher_iters}")
    train(args, w / "student", *small)
    train(args, w / "distilled", *small, f"--teacher={w / 'teacher' / 'ckpt.pt'}", "--distill_alpha=0.5",
          "--distill_temperature=2.0")
    print(f"distillation, val NLL per character (python -m tools.score), {args.iters} student steps:")
    for name in ("teacher", "student", "distilled"):
        print(f"  {name:10s} {val_loss(args, w / name / 'ckpt.pt')}", flush=True)
    if args.only != "distill":
        qat(args, w)


def qat(args, w):
    print("quantization of the student (val NLL per character):")
    base = w / "student" / "ckpt.pt"
    print(f"  float                          {val_loss(args, base)}")
    for mode in ("int8", "int4"):
        sh("-m", "tools.quantize", "--ckpt", base, "--mode", mode)
        print(f"  post-training {mode}              {val_loss(args, w / 'student' / f'ckpt_{mode}.pt')}", flush=True)
    more = ["config/small.py", f"--init_from={base}", f"--max_iters={args.qat_steps}",
            f"--eval_interval={args.qat_steps}", "--learning_rate=5e-4", "--min_lr=5e-5", "--warmup_iters=0"]
    train(args, w / "more", *more)
    train(args, w / "qat", *more, "--qat=int4")
    for name in ("more", "qat"):
        sh("-m", "tools.quantize", "--ckpt", w / name / "ckpt.pt", "--mode", "int4")
    print(f"  +{args.qat_steps} plain steps, float         {val_loss(args, w / 'more' / 'ckpt.pt')}")
    print(f"  +{args.qat_steps} plain steps, then int4     {val_loss(args, w / 'more' / 'ckpt_int4.pt')}")
    print(f"  +{args.qat_steps} QAT int4 steps, float      {val_loss(args, w / 'qat' / 'ckpt.pt')}")
    print(f"  +{args.qat_steps} QAT int4 steps, then int4  {val_loss(args, w / 'qat' / 'ckpt_int4.pt')}", flush=True)


if __name__ == "__main__":
    main()
