"""Does a curriculum help? config/small.py on tiny-shakespeare (characters), three runs of the same steps and
tokens: plain, sequence-length warmup, and easy-first ordering of the first epoch. Prints val loss against wall
time at every evaluation (docs/training.md, Curriculum).

    python -m bench.curriculum [--shared ../shared] [--device cpu] [--iters 3000]
"""

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sologpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, config/

RUNS = {
    "plain": [],
    "sequence-length warmup 16 -> 64 over 1000 steps": ["--seq_warmup_iters=1000", "--seq_warmup_start=16"],
    "easy-first first epoch (unigram surprisal)": ["--curriculum=unigram"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default="../shared")
    p.add_argument("--device", default="cpu")
    p.add_argument("--iters", type=int, default=3000)
    p.add_argument("--eval_interval", type=int, default=500)
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench_curriculum_"))
    text = (Path(args.shared) / "data" / "shakespeare" / "input.txt").resolve()  # train.py runs in ROOT
    print(f"config/small.py, {args.iters} steps, device {args.device}; val loss at each evaluation (wall s)")
    for i, (name, flags) in enumerate(RUNS.items()):
        out = work / f"run{i}"
        cmd = [sys.executable, str(ROOT / "train.py"), "config/small.py", f"--out_dir={out}",
               f"--data_root={work / 'data'}", f"--data_input={text}", f"--device={args.device}",
               f"--max_iters={args.iters}", f"--eval_interval={args.eval_interval}", "--progress=False",
               "--sample_tokens=0", *flags]
        t = time.perf_counter()
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
        if res.returncode:
            sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
        wall = time.perf_counter() - t
        curve = read_metrics(out)
        points = ", ".join(f"{m['val_loss']:.3f} ({m['time_s']:.0f})" for m in curve[1:])
        print(f"  {name:48s} {points}; whole run {wall:.0f} s", flush=True)


if __name__ == "__main__":
    main()
