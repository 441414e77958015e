"""Compare runs: one row per out_dir, with the settings that differ between them and what each run reached.

    python -m tools.runs out-*                          # in the order given
    python -m tools.runs out-a out-b --sort=val         # best val loss first
    python -m tools.runs search-small/trial-* --format=markdown --keys=learning_rate

Read from each run's config.json and metrics.jsonl (nothing is loaded onto a device): the config fields whose values
differ (out_dir and the switches that do not change a result left out; a resumed run's init_from="resume" matches
any), the best val loss and its step, the steps and tokens trained, the seconds, the median tokens/s of the log
lines, the spike guard's rollbacks when there are any, and how the run ended (done, early stop, SIGTERM, diverged;
"-" while it runs or after a hard kill).
"""

import argparse
import json
import statistics
import sys
from pathlib import Path

from sologpt.configurator import UserError, run_cli
from sologpt.rundir import read_metrics

# fields that do not change what a run learns, never shown as a difference (init_from: see differences)
IGNORED = ("out_dir", "overwrite", "progress", "init_from", "data_input", "sample_tokens", "plot", "tensorboard")
ENDINGS = {"max_iters": "done", "patience": "early stop", "diverged": "diverged"}


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse would print usage and exit 2; keep the one-line error convention
        raise UserError(f"{message} (see python -m tools.runs --help)")


FORMATS = {"best val": "{:.4f}", "tokens": "{:,}", "seconds": "{:.1f}", "tok/s": "{:,.0f}"}


def fmt(value, column=""):
    if column in FORMATS:
        return FORMATS[column].format(value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return '""' if value == "" else str(value)


def summary(out_dir):
    """What a run reached, from its metrics.jsonl: best val loss and its step, steps, tokens, seconds, tokens/s,
    rollbacks, how it ended."""
    records = read_metrics(out_dir, kind=None)
    evals = [r for r in records if r.get("kind", "eval") == "eval" and r.get("val_loss") is not None]
    steps = [r for r in records if r.get("kind") == "step" and r.get("tokens_per_s")]
    stops = [r for r in records if r.get("kind") == "stop"]
    best = min(evals, key=lambda r: r["val_loss"]) if evals else None
    last = records[-1] if records else {}
    timed = [r for r in records if r.get("time_s") is not None]
    seconds = timed[-1]["time_s"] if timed else None
    tokens = max((r["tokens"] for r in records if r.get("tokens") is not None), default=None)
    speed = statistics.median(r["tokens_per_s"] for r in steps) if steps else \
        (tokens / seconds if tokens and seconds else None)
    ended = stops[-1]["reason"] if stops and stops[-1] is last else None
    return {"best val": best["val_loss"] if best else None, "at step": best["iter"] if best else None,
            "steps": max((r["iter"] for r in records), default=0), "tokens": tokens, "seconds": seconds,
            "tok/s": speed, "rollbacks": sum(r.get("kind") == "rollback" for r in records),
            "ended": ENDINGS.get(ended, ended or "-")}


def differences(configs, always=()):
    """The config keys whose values differ between the runs (plus `always`), in the config's order."""
    keys = list(dict.fromkeys(k for c in configs for k in c))
    out = []
    for key in keys:
        if key in always:
            out.append(key)
            continue
        values = {json.dumps(c.get(key)) for c in configs}
        if key not in IGNORED and len(values) > 1:
            out.append(key)
    starts = {c.get("init_from") for c in configs} - {"resume"}  # a resumed run's "resume" matches any start
    if len(starts) > 1 and "init_from" not in out:
        out.append("init_from")
    return out


def table(rows, columns, style="text"):
    """rows (dicts) as a text table (aligned columns), markdown or csv."""
    cells = [[fmt(r.get(c), c) if r.get(c) is not None else "-" for c in columns] for r in rows]
    if style == "csv":
        import csv
        import io
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([columns, *cells])
        return buf.getvalue().rstrip("\n")
    if style == "markdown":
        return "\n".join("| " + " | ".join(line) + " |" for line in
                         [columns, ["---"] * len(columns), *cells])
    widths = [max(len(x) for x in col) for col in zip(columns, *cells)]
    return "\n".join("  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [columns, *cells])


def runs_table(out_dirs, sort="", style="text", keys=()):
    """The comparison table of these run folders, and the folders that are not runs."""
    found, skipped = [], []
    for d in out_dirs:
        path = Path(d)
        if (path / "config.json").is_file() and (path / "metrics.jsonl").is_file():
            found.append(path)
        else:
            skipped.append(d)
    if not found:
        raise UserError(f"no run among {', '.join(map(str, out_dirs))}: a train.py out_dir holds config.json and "
                        f"metrics.jsonl")
    configs = [json.loads((p / "config.json").read_text()) for p in found]
    diff = differences(configs, keys)
    rows = [{"run": str(p), **{k: c.get(k) for k in diff}, **summary(p)} for p, c in zip(found, configs)]
    if sort == "val":
        rows.sort(key=lambda r: r["best val"] if r["best val"] is not None else float("inf"))
    elif sort == "name":
        rows.sort(key=lambda r: r["run"])
    columns = ["run", *diff, "best val", "at step", "steps", "tokens", "seconds", "tok/s",
               *(["rollbacks"] if any(r["rollbacks"] for r in rows) else []), "ended"]
    return table(rows, columns, style), skipped


def run(argv):
    parser = _Parser(description="Compare train.py runs: the settings that differ, best val loss, steps, speed.")
    parser.add_argument("out_dirs", nargs="+", help="out_dir folders of train.py runs")
    parser.add_argument("--sort", default="", choices=["", "val", "name"],
                        help="row order: as given (default), val (best val loss first) or name")
    parser.add_argument("--format", default="text", choices=["text", "markdown", "csv"], help="table style")
    parser.add_argument("--keys", default="", help="comma-separated config keys to show even where runs agree")
    args = parser.parse_args(argv)
    keys = [k.strip() for k in args.keys.split(",") if k.strip()]
    text, skipped = runs_table(args.out_dirs, args.sort, args.format, keys)
    print(text)
    if skipped:
        print(f"(not runs, left out: {', '.join(map(str, skipped))})", file=sys.stderr)


def main(argv=None):
    run_cli(run, argv=argv)


if __name__ == "__main__":
    main()
