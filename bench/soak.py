"""Long-run soak of train.py: evaluations and checkpoints about once a minute, one SIGTERM and a resume in the middle.

    python -m bench.soak                                    # CUDA, the GPT-2 124M shape: about 9 minutes on an H200
    python -m bench.soak --reference_device=cuda:1          # the reference on a second GPU at the same time
    python -m bench.soak --tiny --device=cpu --steps=120 --eval_interval=30 --sigterm_step=50   # the same, on a CPU

What it runs, each a train.py process (the user's command, nothing patched in):
1. the soak: --steps optimizer steps, an evaluation and a checkpoint every --eval_interval steps; when its log shows
   step --sigterm_step, SIGTERM (as a scheduler's preemption): it finishes the step, saves, exits 143;
2. the resume (--init_from=resume) to --steps;
3. the reference: the same seed and flags, uninterrupted, to the first evaluation after the step the SIGTERM saved.
Then it reports, per evaluation window: tokens/s (the mean of the log lines) and peak memory (allocated and reserved,
as each evaluation records it in metrics.jsonl); the time the SIGTERM's save took and the resume's start; and whether
the resumed run's step losses and its evaluation equal the reference's. The defaults (8000 steps of micro-batch 12 x
1024 tokens, an evaluation every 1600) fit one 9-minute call on an H200 (27.5 ms/step measured by bench.speed,
docs/performance.md). Data: tiny-shakespeare in GPT-2 BPE (--input, default ../shared/data/shakespeare/input.txt),
or random tokens when that file is not there (losses stay near ln 50257, which resume exactness does not need).
"""

import json
import math
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from sologpt.configurator import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, prepare/
STEP = re.compile(r"^step +(\d+) \| loss ([\d.]+) \| lr \S+ \| +([\d,]+) tok/s")
SAVED = re.compile(r"SIGTERM: saved \S+ at step (\d+)")


def dataset(work, args):
    """data_root and dataset name: tiny-shakespeare (BPE, or characters with --tiny), else random GPT-2 tokens."""
    root = work / "data"
    source = Path(args.input)
    if source.is_file():
        script = "prepare/shakespeare_char.py" if args.tiny else "prepare/shakespeare.py"
        subprocess.run([sys.executable, script, "--input", str(source), "--data_root", str(root), "--name", "text"],
                       cwd=ROOT, check=True, capture_output=True)
        return root, "text"
    print(f"{source} not found: random tokens instead")
    d = root / "random"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 4_000_000), ("val", 400_000)):
        rng.integers(0, 50257, n, dtype=np.uint16).tofile(d / f"{split}.bin")
    (d / "meta.json").write_text(json.dumps({"tokenizer": "gpt2", "vocab_size": 50257, "dtype": "uint16",
                                             "eot_token": 50256}))
    return root, "random"


def flags(args, data_root, name, out_dir, max_iters, device):
    shape = ["--n_layer=2", "--n_head=2", "--n_embd=64", "--block_size=64", "--batch_size=8"] if args.tiny else \
        ["--n_layer=12", "--n_head=12", "--n_embd=768", "--block_size=1024", "--batch_size=12",
         "--vocab_pad_multiple=64"]
    return [f"--data_root={data_root}", f"--dataset={name}", f"--out_dir={out_dir}", f"--device={device}", *shape,
            f"--max_iters={max_iters}", f"--eval_interval={args.eval_interval}", f"--eval_iters={args.eval_iters}",
            f"--log_interval={args.log_interval}", "--warmup_iters=100", f"--lr_decay_iters={args.steps}",
            "--progress=False", "--sample_tokens=0", "--seed=1337"]


def run(argv, log, sigterm_step=None):
    """A train.py process; its output goes to log. With sigterm_step: SIGTERM once its log passes that step.
    Returns (exit status, lines, seconds from the start to its first step line, from the SIGTERM to the exit)."""
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-u", "train.py", *argv], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines, first, sent = [], None, None
    with open(log, "a") as f:
        for line in proc.stdout:
            f.write(line)
            lines.append(line.rstrip("\n"))
            m = STEP.match(line)
            if m and first is None:
                first = time.perf_counter() - start
            if sigterm_step is not None and sent is None and m and int(m[1]) >= sigterm_step:
                proc.send_signal(signal.SIGTERM)
                sent = time.perf_counter()
    proc.wait()
    return proc.returncode, lines, first, (time.perf_counter() - sent) if sent else None


def step_losses(lines):
    return {int(m[1]): m[2] for m in map(STEP.match, lines) if m}


def windows(lines, records, eval_interval):
    """Per evaluation window: the mean tokens/s of its log lines (not the process's first, which holds the start and
    compilation) and the peak memory the evaluation that ends it recorded."""
    speed = {}
    for m in list(filter(None, map(STEP.match, lines)))[1:]:
        speed.setdefault(math.ceil(int(m[1]) / eval_interval), []).append(float(m[3].replace(",", "")))
    out = []
    for r in records:
        w = math.ceil(r["iter"] / eval_interval)
        tps = speed.get(w)
        out.append({"eval_at": r["iter"], "tokens_per_s": round(sum(tps) / len(tps)) if tps else None,
                    "peak_alloc_gib": r.get("peak_alloc_gib"), "peak_reserved_gib": r.get("peak_reserved_gib"),
                    "val_loss": r["val_loss"], "time_s": r["time_s"]})
    return out


def metrics(out_dir):
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def main():
    p = ArgumentParser(prog="python -m bench.soak", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="cuda (default), cuda:N or cpu")
    p.add_argument("--reference_device", default="", help="run the reference there, beside the soak (e.g. cuda:1)")
    p.add_argument("--tiny", action="store_true", help="a tiny model (2 layers, 64 wide) on characters, for a CPU")
    p.add_argument("--steps", type=int, default=8000, help="optimizer steps of the soak (default: %(default)s)")
    p.add_argument("--eval_interval", type=int, default=1600, help="steps between evaluations and checkpoints")
    p.add_argument("--eval_iters", type=int, default=20, help="batches per split in an evaluation")
    p.add_argument("--sigterm_step", type=int, default=4000, help="SIGTERM once the log passes this step")
    p.add_argument("--log_interval", type=int, default=50)
    p.add_argument("--input", default=str(ROOT.parent / "shared" / "data" / "shakespeare" / "input.txt"),
                   help="text to train on (random tokens when missing)")
    p.add_argument("--report", default="soak.json", help="the summary, as JSON")
    p.add_argument("--keep", action="store_true", help="keep the run folders (checkpoints of 1.5 GB at GPT-2 size)")
    args = p.parse_args()
    if not 0 < args.sigterm_step < args.steps or args.eval_interval < 1 or args.log_interval < 1:
        p.error("need 0 < --sigterm_step < --steps, and --eval_interval, --log_interval >= 1")
    if args.device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            sys.exit("error: --device cuda but this torch sees no CUDA GPU: use --device cpu --tiny")

    work = Path(tempfile.mkdtemp(prefix="soak-"))
    try:
        data_root, name = dataset(work, args)
        soak, ref, log = work / "soak", work / "reference", work / "log.txt"
        t0 = time.perf_counter()
        reference = None
        # the first evaluation after the SIGTERM's step; the SIGTERM lands within a log interval of sigterm_step
        ref_steps = min(args.steps, (args.sigterm_step + args.log_interval) // args.eval_interval * args.eval_interval
                        + args.eval_interval)
        ref_argv = flags(args, data_root, name, ref, ref_steps, args.reference_device or args.device)
        if args.reference_device:  # beside the soak, on its own GPU
            reference = subprocess.Popen([sys.executable, "train.py", *ref_argv], cwd=ROOT, stdout=open(work / "ref.txt", "w"),
                                         stderr=subprocess.STDOUT)
        code, first, _, save_s = run(flags(args, data_root, name, soak, args.steps, args.device), log,
                                     args.sigterm_step)
        saved = next((int(m[1]) for m in map(SAVED.search, first) if m), None)
        assert code == 128 + signal.SIGTERM and saved is not None, f"the SIGTERM did not save (exit {code}): see {log}"
        code, second, resume_start, _ = run(flags(args, data_root, name, soak, args.steps, args.device)
                                            + ["--init_from=resume"], log)
        assert code == 0, f"the resume failed (exit {code}): see {log}"
        t_soak = time.perf_counter() - t0
        if reference is None:
            code, ref_lines, _, _ = run(ref_argv, work / "ref.txt")
        else:
            code, ref_lines = reference.wait(), (work / "ref.txt").read_text().splitlines()
        assert code == 0, f"the reference failed (exit {code}): see {work / 'ref.txt'}"

        records, ref_records = metrics(soak), {r["iter"]: r for r in metrics(ref)}
        ours, theirs = step_losses(second), step_losses(ref_lines)
        common = sorted(s for s in ours if s in theirs and s > saved)
        evals = [(r["iter"], r["train_loss"], ref_records[r["iter"]]["train_loss"], r["val_loss"],
                  ref_records[r["iter"]]["val_loss"]) for r in records if r["iter"] > saved and r["iter"] in ref_records]
        report = {
            "device": args.device, "shape": "tiny" if args.tiny else "GPT-2 124M (12 x 768, block 1024, batch 12)",
            "data": name, "steps": args.steps, "eval_interval": args.eval_interval, "sigterm_step": args.sigterm_step,
            "saved_at_step": saved, "sigterm_to_exit_s": round(save_s, 1),
            "soak_wall_s": round(t_soak, 1), "first_run": windows(first, [r for r in records if r["iter"] <= saved],
                                                                  args.eval_interval),
            "resumed_run": windows(second, [r for r in records if r["iter"] > saved], args.eval_interval),
            "resume_to_first_step_s": None if resume_start is None else round(resume_start, 1),
            "resume_exact": {
                "step_losses_compared": len(common), "steps": [common[0], common[-1]] if common else None,
                "step_losses_equal": all(ours[s] == theirs[s] for s in common),
                "evaluations": [{"iter": it, "train_loss": [a, b], "val_loss": [c, d], "equal": a == b and c == d}
                                for it, a, b, c, d in evals]},
        }
        Path(args.report).write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        print(f"wrote {args.report}; logs in {work}" if args.keep else f"wrote {args.report}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
