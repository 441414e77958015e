"""Does supervised fine-tuning make a pretrained model follow instructions, and does the loss mask matter? Builds the
demo sets of prepare/demo_tasks.py from the shared data, pretrains a small character model on their pretraining text,
then fine-tunes it on the instructions for the same steps with the loss mask (task "sft") and without it
(sft_loss="all": the prompts are learned too), and from scratch with the mask; and trains a tagger on the tagged
lines from the same base. Prints exact match on the held-out instructions (the "no fine-tuning" row is the masked
run's evaluation at step 0: the pretrained weights), and the share of answers in the task's form (a sentiment, a
language name, one word) from sample.py's chat mode on the same prompts, whose exact match must be train.py's; then
the tagger's per-class scores (docs/finetuning.md). A finished run in --work is read, not repeated.

    python -m bench.sft [--shared ../shared] [--work DIR] [--pretrain_iters 800] [--iters 450] [--device cpu]
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from prepare.demo_tasks import LANGUAGES

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, prepare/

MODEL = ["--n_layer=3", "--n_head=4", "--n_embd=128", "--block_size=192", "--dropout=0.0", "--progress=False",
         "--sample_tokens=0", "--overwrite=True", "--compile=False", "--log_interval=50"]
TASKS = ("sentiment", "language", "first_word", "last_word")


def run(cmd, what):
    t0 = time.time()
    res = subprocess.run([sys.executable, *map(str, cmd)], capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"{what} failed: {' '.join(map(str, cmd))}\n{res.stderr[-2000:]}")
    print(f"{what}: {time.time() - t0:.0f} s", file=sys.stderr)
    return res.stdout


def train(args, out, what, *flags):
    """A run's metrics; a finished run of an earlier call with the same --work is read, not repeated."""
    metrics = Path(out) / "metrics.jsonl"
    steps = next(int(f.split("=")[1]) for f in flags if f.startswith("--max_iters="))
    evals = lambda: [m for m in map(json.loads, metrics.read_text().splitlines()) if m.get("kind", "eval") == "eval"]
    if not (metrics.is_file() and (Path(out) / "ckpt.pt").is_file() and evals() and evals()[-1]["iter"] == steps):
        run([ROOT / "train.py", *MODEL, f"--device={args.device}", f"--data_root={args.work / 'data'}",
             f"--out_dir={out}", *flags], what)
    return evals()  # lines without a "kind" are evaluations


FORM = {"sentiment": lambda a: a in ("positive", "negative"), "language": lambda a: a in LANGUAGES.values(),
        "first_word": str.isalpha, "last_word": str.isalpha}  # what an answer of each task looks like


def answers(args, out):
    """(exact match, share of answers in their task's form) over the val instructions, from sample.py's chat mode."""
    rows = [json.loads(x) for x in (args.work / "demo" / "instruct_val.jsonl").read_text(encoding="utf-8").splitlines()]
    text = run([ROOT / "sample.py", f"--out_dir={out}", f"--prompts={args.work / 'demo' / 'instruct_val.jsonl'}",
                "--temperature=0", "--max_new_tokens=16", "--batch_size=64", f"--device={args.device}"],
               f"sample.py {Path(out).name}")
    said = text.split("\n" + "-" * 40 + "\n")[:-1]
    assert len(said) == len(rows), (len(said), len(rows))
    hits = sum(a == r["response"] for a, r in zip(said, rows)) / len(rows)
    return hits, sum(FORM[r["task"]](a) for a, r in zip(said, rows)) / len(rows)


def row(name, m, checked=None):
    cells = [f"{m['val_exact_match']:.3f}", *(f"{m[f'val_exact_match_{t}']:.3f}" for t in TASKS),
             f"{m['val_loss']:.3f}"]
    if checked is not None:
        hits, form = checked
        if hits != m["val_exact_match"]:  # other batches: float rounding may flip a near tie, never much more
            print(f"note: {name}: sample.py's exact match {hits:.4f}, train.py's {m['val_exact_match']:.4f}",
                  file=sys.stderr)
            assert abs(hits - m["val_exact_match"]) < 0.01, name
        cells.append(f"{form:.3f}")
    return f"| {name} | " + " | ".join(cells) + " |"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default="../shared")
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    p.add_argument("--pretrain_iters", type=int, default=800)
    p.add_argument("--iters", type=int, default=450)
    p.add_argument("--tag_iters", type=int, default=300)
    p.add_argument("--eval_iters", type=int, default=10, help="batches of training examples for the train loss")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    args.work = Path(args.work or tempfile.mkdtemp(prefix="bench_sft_")).resolve()  # the runs' cwd is ROOT
    data, demo = args.work / "data", args.work / "demo"
    run([ROOT / "prepare" / "demo_tasks.py", f"--shared={(Path(args.shared) / 'data').resolve()}", f"--out={demo}"],
        "demo sets")
    run([ROOT / "prepare" / "shakespeare_char.py", f"--input={demo / 'pretrain.txt'}", "--name=demo_base",
         f"--data_root={data}"], "pretraining data")
    for script, name, stem in (("instruct.py", "demo_sft", "instruct"), ("tags.py", "demo_tags", "tags")):
        run([ROOT / "prepare" / script, f"--input={demo / f'{stem}_train.jsonl'}",
             f"--val_input={demo / f'{stem}_val.jsonl'}", f"--name={name}", f"--data_root={data}",
             f"--vocab_from={data / 'demo_base'}"], name)
    base = args.work / "base"
    train(args, base, "pretraining", "--dataset=demo_base", f"--max_iters={args.pretrain_iters}", "--batch_size=8",
          "--learning_rate=5e-3", "--min_lr=5e-4", "--warmup_iters=50", f"--eval_interval={args.pretrain_iters}",
          "--eval_iters=20")
    sft = ["--dataset=demo_sft", "--task=sft", f"--max_iters={args.iters}", "--batch_size=16", "--learning_rate=3e-3",
           "--min_lr=3e-4", "--warmup_iters=20", f"--eval_interval={args.iters}", f"--eval_iters={args.eval_iters}"]
    runs = {"SFT with the loss mask": ("sft_mask", f"--init_from={base / 'ckpt.pt'}"),
            "SFT without the mask (sft_loss=all)": ("sft_all", f"--init_from={base / 'ckpt.pt'}", "--sft_loss=all"),
            "SFT with the mask, no pretraining": ("sft_scratch",)}
    results = {name: train(args, args.work / out, name, *sft, *flags) for name, (out, *flags) in runs.items()}
    checked = {name: answers(args, args.work / out) for name, (out, *_) in runs.items()}
    print("| run | exact match | " + " | ".join(TASKS) + " | val loss (responses) | answers in the task's form |")
    print("| --- |" + " --- |" * (len(TASKS) + 3))
    print(row("no fine-tuning (the pretrained model)", results["SFT with the loss mask"][0]) + " - |")
    for name, lines in results.items():
        print(row(name, lines[-1], checked[name]))
    tags = ["--dataset=demo_tags", "--task=tag", f"--max_iters={args.tag_iters}", "--batch_size=32",
            "--block_size=128", "--learning_rate=3e-3", "--min_lr=3e-4", "--warmup_iters=20",
            f"--eval_interval={args.tag_iters}", "--eval_iters=10"]
    tagged = {name: train(args, args.work / out, name, *tags, *flags)[-1] for name, out, *flags in
              (("tagger from the pretrained model", "tag_base", f"--init_from={base / 'ckpt.pt'}"),
               ("tagger from scratch", "tag_scratch"))}
    classes = sorted(k.removeprefix("val_f1_") for k in next(iter(tagged.values())) if k.startswith("val_f1_"))
    print("\n| run | word accuracy | macro F1 | " + " | ".join(f"F1 {c}" for c in classes) + " |")
    print("| --- |" + " --- |" * (len(classes) + 2))
    for name, m in tagged.items():
        print(f"| {name} | {m['val_accuracy']:.3f} | {m['val_macro_f1']:.3f} | "
              + " | ".join(f"{m[f'val_f1_{c}']:.3f}" for c in classes) + " |")
    m = tagged["tagger from the pretrained model"]
    print("\n| class (pretrained tagger) | precision | recall | F1 |\n| --- | --- | --- | --- |")
    for c in classes:
        print(f"| {c} | {m[f'val_precision_{c}']:.3f} | {m[f'val_recall_{c}']:.3f} | {m[f'val_f1_{c}']:.3f} |")
    print(f"\nruns in {args.work}")


if __name__ == "__main__":
    main()
