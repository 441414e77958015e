"""Curves of one or several runs from their metrics.jsonl, drawn to a PNG (matplotlib, optional): train and val loss
against steps, tokens and seconds, the learning rate, tokens/s and peak memory against steps, and the spike
guard's rollbacks as dotted lines. python -m tools.plot draws any runs; plot=True keeps out_dir/loss.png current at
each evaluation of a run (drawn from the file itself, so what it shows is what was recorded)."""

import os
from importlib.util import find_spec
from pathlib import Path

from sologpt.rundir import read_metrics

INSTALL_HINT = "pip install matplotlib (or pip install -e '.[dev]')"
# (panel title, x key, y keys from step records, y keys from eval records, y axis label)
PANELS = [("loss against steps", "iter", ["loss"], ["val_loss"], "loss"),
          ("loss against tokens", "tokens", ["loss"], ["val_loss"], "loss"),
          ("loss against time", "time_s", ["loss"], ["val_loss"], "loss"),
          ("learning rate", "iter", ["lr"], [], "learning rate"),
          ("training speed", "iter", ["tokens_per_s"], [], "tokens/s"),
          ("peak memory", "iter", ["peak_alloc_gib"], [], "GiB")]
X_LABELS = {"iter": "step", "tokens": "tokens", "time_s": "seconds"}


def check(cfg):
    if cfg.plot and find_spec("matplotlib") is None:
        raise ValueError(f"plot=True needs matplotlib: {INSTALL_HINT}, or drop --plot")


def curves(out_dir):
    """(step records, eval records, rollback steps) of a run. Runs of earlier versions have no step records: their
    evaluations' train_loss stands in for the training curve."""
    records = read_metrics(out_dir, kind=None)
    steps = [r for r in records if r.get("kind") == "step"]
    evals = [r for r in records if r.get("kind", "eval") == "eval"]
    if not steps:
        steps = [{**r, "loss": r.get("train_loss")} for r in evals]
    return steps, evals, [r["iter"] for r in records if r.get("kind") == "rollback"]


def draw(out_dirs, path, labels=None):
    """One PNG with six panels for the runs in out_dirs (one colour each, labelled by folder name or labels); written
    atomically, so a viewer never reads half a file. Raises ValueError naming a folder without metrics."""
    try:
        from matplotlib.figure import Figure  # optional; no pyplot: no window, no global state
    except ImportError:
        raise ValueError(f"plotting needs matplotlib: {INSTALL_HINT}")
    runs = []
    for out_dir in out_dirs:
        if not (Path(out_dir) / "metrics.jsonl").is_file():
            raise ValueError(f"{out_dir} has no metrics.jsonl: give the out_dir of a train.py run")
        runs.append(curves(out_dir))
    labels = labels or [Path(d).name or str(d) for d in out_dirs]
    fig = Figure(figsize=(15, 8), layout="constrained")
    axes = fig.subplots(2, 3).flatten()
    for ax, (title, x, step_keys, eval_keys, ylabel) in zip(axes, PANELS):
        for i, ((steps, evals, rollbacks), label) in enumerate(zip(runs, labels)):
            colour = f"C{i % 10}"
            for key in step_keys:
                pts = [(r[x], r[key]) for r in steps if r.get(x) is not None and r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colour, linewidth=1, alpha=0.6 if eval_keys else 1,
                            label=f"{label} train" if eval_keys else label)
            for key in eval_keys:
                pts = [(r[x], r[key]) for r in evals if r.get(x) is not None and r.get(key) is not None]
                if pts:
                    ax.plot(*zip(*pts), color=colour, marker="o", markersize=3, linewidth=2, label=f"{label} val")
            if x == "iter" and eval_keys:
                for it in rollbacks:
                    ax.axvline(it, color=colour, linestyle=":", linewidth=1)
        ax.set_title(title)
        ax.set_xlabel(X_LABELS[x])
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.has_data():
            ax.legend(fontsize="small")
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        fig.savefig(tmp, format="png", dpi=80)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
