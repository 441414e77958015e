"""Does pretraining help, and how much of it does each fine-tuning method keep? Pretrain a small GPT on one text
(the web text in ../shared/data/webtext, GPT-2 tokens), then fine-tune it on tiny-shakespeare for the same number
of steps in four ways (all weights, half the layers frozen, LoRA rank 8 and 64) and train the same model from
scratch for those steps. Prints the best val loss of each (docs/finetuning.md).

    python -m bench.finetune [--shared ../shared] [--pretrain_iters 1000] [--iters 300] [--device cuda]
"""

import argparse
import codecs
import subprocess
import sys
import tempfile
from pathlib import Path

from sologpt.rundir import read_metrics

ROOT = Path(__file__).resolve().parents[1]  # the repository: train.py, prepare/

MODEL = ["--n_layer=6", "--n_head=6", "--n_embd=384", "--block_size=256", "--batch_size=32", "--dropout=0.1",
         "--progress=False", "--sample_tokens=0", "--overwrite=True", "--compile=False"]


def read_any(path):
    """The web text files mix UTF-8 and Latin-1; decode each file by the first that works."""
    data = Path(path).read_bytes()
    for enc in ("utf-8", "latin-1"):
        try:
            return codecs.decode(data, enc).replace("\r\n", "\n")
        except UnicodeDecodeError:
            continue


def train(args, out, *flags):
    cmd = [sys.executable, str(ROOT / "train.py"), *MODEL, f"--eval_iters={args.eval_iters}", f"--device={args.device}",
           f"--data_root={args.data_root}", f"--out_dir={out}", *flags]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{res.stderr[-2000:]}")
    lines = read_metrics(out)
    return min(m["val_loss"] for m in lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shared", default="../shared")
    p.add_argument("--work", default=None, help="folder for data and runs (default: a temporary one)")
    p.add_argument("--pretrain_iters", type=int, default=1000)
    p.add_argument("--iters", type=int, default=300)
    p.add_argument("--device", default="auto")
    p.add_argument("--eval_iters", type=int, default=20)
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench_finetune_")).resolve()  # the runs' cwd is ROOT
    work.mkdir(parents=True, exist_ok=True)
    args.data_root = work / "data"
    shared = (Path(args.shared) / "data").resolve()
    web = work / "webtext.txt"
    web.write_text("\n\n".join(read_any(f) for f in sorted((shared / "webtext").glob("*.txt"))), encoding="utf-8")
    for name, src in (("webtext_bpe", web), ("shakespeare_bpe", shared / "shakespeare" / "input.txt")):
        subprocess.run([sys.executable, str(ROOT / "prepare" / "shakespeare.py"), f"--input={src}",
                        f"--name={name}", f"--data_root={args.data_root}"], check=True, capture_output=True, cwd=ROOT)

    every = max(args.iters // 6, 1)
    pre = train(args, work / "pre", "--dataset=webtext_bpe", f"--max_iters={args.pretrain_iters}",
                "--learning_rate=1e-3", "--min_lr=1e-4", "--warmup_iters=100", f"--eval_interval={args.pretrain_iters}")
    print(f"pretrained on web text for {args.pretrain_iters} steps: val loss {pre:.4f}")
    base = str(work / "pre" / "ckpt.pt")
    ft = ["--dataset=shakespeare_bpe", f"--max_iters={args.iters}", f"--eval_interval={every}", "--warmup_iters=20"]
    runs = {
        "from scratch": ["--learning_rate=1e-3", "--min_lr=1e-4"],
        "full fine-tune": [f"--init_from={base}", "--learning_rate=3e-4", "--min_lr=3e-5"],
        "freeze first 3 of 6 layers": [f"--init_from={base}", "--freeze_layers=3", "--learning_rate=3e-4",
                                       "--min_lr=3e-5"],
        "LoRA rank 8 (all linears)": [f"--init_from={base}", "--lora_rank=8", "--lora_alpha=16",
                                      "--lora_targets=all", "--learning_rate=1e-3", "--min_lr=1e-4"],
        "LoRA rank 64 (all linears)": [f"--init_from={base}", "--lora_rank=64", "--lora_alpha=128",
                                       "--lora_targets=all", "--learning_rate=1e-3", "--min_lr=1e-4"],
    }
    print(f"tiny-shakespeare (GPT-2 tokens), {args.iters} steps of 32 x 256 tokens each, best val loss:")
    for i, (name, flags) in enumerate(runs.items()):
        loss = train(args, work / f"ft{i}", *ft, *flags)
        print(f"  {name:30s} {loss:.4f}", flush=True)


if __name__ == "__main__":
    main()
