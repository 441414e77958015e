"""A long run as a user leaves it overnight, shortened: train.py with evaluations and checkpoints at a steady
interval, one SIGTERM in the middle (what a scheduler sends), a resume, and an uninterrupted reference run of the
same seed up to the first evaluation after the stop. Prints, per evaluation, the val loss, the peak GPU memory
(allocated and reserved) and the tokens/s of the log windows since the last one; then whether the resumed run's
val loss there equals the reference's exactly.

    python -m bench.soak --data_input ../shared/data/shakespeare/input.txt             # GPU: GPT-2 124M shape
    python -m bench.soak --data_input ../shared/data/shakespeare/input.txt --cpu       # a tiny model, a minute

The data is tiny-shakespeare in GPT-2 tokens (prepared into a temporary folder): the model overfits it, which
does not matter here. Every run's full output goes to --log.
"""

import argparse
import re
import signal
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from sologpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]


def train_cmd(args, root, out, max_iters):
    shape = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8", "--device=cpu"] \
        if args.cpu else ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024",
                          f"--batch_size={args.batch_size}", "--bias=False", "--vocab_pad_multiple=64",
                          "--dtype=bfloat16", "--compile=True"]
    return [sys.executable, str(ROOT / "train.py"), f"--data_root={root}", "--dataset=shakespeare",
            f"--out_dir={out}", *shape, f"--max_iters={max_iters}", f"--lr_decay_iters={args.steps}",
            f"--eval_interval={args.eval_interval}", f"--eval_iters={args.eval_iters}",
            f"--log_interval={args.log_interval}", "--warmup_iters=100", "--learning_rate=3e-4", "--dropout=0.1",
            "--progress=False", "--sample_tokens=0"]


def run(cmd, log, kill_at=None):
    """Run to the end, or send SIGTERM once the log line of step kill_at is printed; returns the output."""
    log.write(f"$ {' '.join(cmd)}\n")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**__import__("os").environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    for line in proc.stdout:
        lines.append(line)
        log.write(line)
        if kill_at is not None and re.match(rf"step\s+{kill_at} \|", line):
            proc.send_signal(signal.SIGTERM)
            kill_at = None
    proc.wait()
    log.flush()
    return "".join(lines), proc.returncode


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], allow_abbrev=False)
    p.add_argument("--data_input", required=True, help="tiny-shakespeare's input.txt")
    p.add_argument("--cpu", action="store_true", help="a tiny model on the CPU (a check of the script)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--eval_interval", type=int, default=1000)
    p.add_argument("--eval_iters", type=int, default=20)
    p.add_argument("--log_interval", type=int, default=100)
    p.add_argument("--stop_at", type=int, default=1200, help="the log step after which SIGTERM is sent")
    p.add_argument("--batch_size", type=int, default=12)
    p.add_argument("--log", default="soak.log")
    args = p.parse_args()
    if args.cpu:
        args.steps, args.eval_interval, args.log_interval, args.stop_at, args.eval_iters = 60, 20, 5, 25, 4
    first_eval_after = (args.stop_at // args.eval_interval + 1) * args.eval_interval
    with tempfile.TemporaryDirectory() as tmp, open(args.log, "w") as log:
        root = Path(tmp)
        subprocess.run([sys.executable, "-m", "prepare.shakespeare", "--input", args.data_input, "--data_root",
                        str(root)], cwd=ROOT, check=True, capture_output=True)
        out = root / "soak"
        text1, rc1 = run(train_cmd(args, root, out, args.steps), log, kill_at=args.stop_at)
        stopped = re.search(r"SIGTERM: saved \S+ at step (\d+)", text1)
        text2, rc2 = run(train_cmd(args, root, out, args.steps) + ["--init_from=resume"], log)
        text3, rc3 = run(train_cmd(args, root, root / "reference", first_eval_after), log)
        evals = read_metrics(out)
        ref = {m["iter"]: m for m in read_metrics(root / "reference")}
    print(f"exit codes: first part {rc1} (143 = stopped by SIGTERM), resumed {rc2}, reference {rc3}; stopped after "
          f"step {stopped.group(1) if stopped else '?'}")
    windows = {}  # eval step -> tokens/s of the log windows before it
    for text in (text1, text2):
        for step, tok in re.findall(r"^step\s+(\d+) \|.*?\|\s+([\d,]+) tok/s", text, re.M):
            windows.setdefault(-(-int(step) // args.eval_interval) * args.eval_interval, []).append(
                float(tok.replace(",", "")))
    print(f"{'eval':>6} {'val loss':>9} {'peak alloc GiB':>15} {'reserved GiB':>13} {'median tok/s':>13}")
    for m in evals:
        w = windows.get(m["iter"], [])
        print(f"{m['iter']:>6} {m['val_loss']:>9.4f} {m['peak_alloc_gib']:>15.3f} {m['peak_reserved_gib']:>13.3f} "
              f"{statistics.median(w) if w else float('nan'):>13,.0f}")
    resumed = next((m for m in evals if m["iter"] == first_eval_after), None)
    if resumed and first_eval_after in ref:
        same = resumed["val_loss"] == ref[first_eval_after]["val_loss"]
        print(f"val loss at step {first_eval_after}: resumed {resumed['val_loss']!r}, uninterrupted "
              f"{ref[first_eval_after]['val_loss']!r}: {'equal' if same else 'DIFFERENT'}")


if __name__ == "__main__":
    main()
