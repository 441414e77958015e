"""A run's folder and its life: out_dir/ckpt.pt (saved at evaluations: where a resume continues), best.pt (the
evaluation with the best val loss), last.pt (an interrupt's resume point when ckpt.pt must stay the best model),
config.json, meta.json and metrics.jsonl; which checkpoint a resume reads; the line that ends a run; and the
Ctrl-C / SIGTERM handling that lets the current step finish and saves before exiting."""

import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

from sologpt import checkpoint
from sologpt.configurator import UserError


class RunDir:
    def __init__(self, cfg, main=True):
        self.main = main  # several ranks: rank 0 alone writes
        self.path = Path(cfg.out_dir)
        self.ckpt = self.path / "ckpt.pt"
        # the best evaluation so far: a hard link to ckpt.pt when that is the best (no second write), kept when a
        # later, worse evaluation replaces ckpt.pt (always_save_checkpoint=True)
        self.best = self.path / "best.pt"
        # with always_save_checkpoint=False ckpt.pt must stay the best model, so an interrupt saves here
        self.last = self.path / "last.pt"
        self.metrics = self.path / "metrics.jsonl"
        self.always_save = cfg.always_save_checkpoint
        if cfg.init_from != "resume" and self.ckpt.exists() and not cfg.overwrite:
            raise UserError(f"{self.ckpt} already exists: continue it with --init_from=resume, choose another "
                            f"--out_dir, or pass --overwrite=True to replace it")
        for source in (cfg.init_from, cfg.teacher):  # a new run in out_dir would overwrite its own start point
            if source not in ("", "scratch", "resume") and Path(source).resolve() in (
                    self.ckpt.resolve(), self.best.resolve(), self.last.resolve()):
                raise UserError(f"{source} is this run's own checkpoint, which the run would overwrite: copy it "
                                f"elsewhere or pick another --out_dir")

    def resume_checkpoint(self, cfg):
        """(checkpoint dict, its path) to resume: last.pt if an interrupt left one, else ckpt.pt; checked against
        the switches that must not change. batch_size="auto" keeps the batches the run had, not a new search."""
        path = self.last if self.last.exists() else self.ckpt
        try:
            ckpt = checkpoint.read(path)
            checkpoint.check_resume(ckpt, cfg, path)
        except ValueError as e:
            raise UserError(str(e))
        if cfg.batch_size == "auto":
            saved = ckpt["train_config"]
            cfg.batch_size, cfg.gradient_accumulation_steps = saved["batch_size"], saved["gradient_accumulation_steps"]
        return ckpt, path

    def start(self, cfg, meta, iter_num):
        """Write config.json and meta.json (sample.py finds the tokenizer beside the checkpoint), and cut from
        metrics.jsonl the evaluations a resumed run will make again."""
        if not self.main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        checkpoint.write_json(self.path / "config.json", dataclasses.asdict(cfg))
        checkpoint.write_json(self.path / "meta.json", meta)
        kept = []
        if cfg.init_from == "resume" and self.metrics.exists():
            kept = [line for line in self.metrics.read_text().splitlines() if json.loads(line)["iter"] <= iter_num]
        self.metrics.write_text("".join(line + "\n" for line in kept))

    def save(self, state, improved=False, last=False):
        """ckpt.pt (and best.pt when this is the best evaluation so far), or with last=True last.pt: a resume point
        that is not the best model; ckpt.pt supersedes last.pt. Returns the path written."""
        path = self.last if last else self.ckpt
        if self.main:
            checkpoint.save(path, state)
            if not last:
                self.last.unlink(missing_ok=True)
            if improved and not last:
                self._link_best()
        return path

    def _link_best(self):
        """best.pt = ckpt.pt: a hard link (the same file on disk), a copy where the filesystem has no links."""
        tmp = self.best.with_name("best.pt.tmp")
        tmp.unlink(missing_ok=True)
        try:
            os.link(self.ckpt, tmp)
        except OSError:
            shutil.copyfile(self.ckpt, tmp)
        os.replace(tmp, self.best)

    def finish(self):
        if self.main:
            self.last.unlink(missing_ok=True)  # the run is complete: a later resume starts from ckpt.pt

    def summary(self, progress):
        """What the end-of-run line says: the best val loss, its step, and which file holds it and the last step."""
        at = f" (step {progress.best_iter})" if progress.best_iter >= 0 else ""
        best = f"best val loss {progress.best_val_loss:.4f}{at}"
        same = self.best.is_file() and self.ckpt.is_file() and os.path.samefile(self.best, self.ckpt)
        if progress.best_iter == progress.iter_num or (same and self.always_save):
            return f"{best} = the last step: {self.ckpt} (also {self.best.name})"
        if not self.always_save:
            return (f"{best}: {self.ckpt} (also {self.best.name}); the last step ({progress.iter_num}) was not "
                    f"saved (always_save_checkpoint=False)")
        where = self.best if self.best.is_file() else "in no file (that evaluation predates best.pt)"
        return f"{best}: {where}; the last step ({progress.iter_num}): {self.ckpt}"


def read_metrics(path, kind="eval"):
    """The records of one kind ("eval", "step", "rollback", "stop"; None: all) of a metrics.jsonl file or the out_dir
    holding one (sologpt/monitor.py writes them), in the order they were written. Lines without a kind (runs of
    earlier versions) are evaluations."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if kind is None or r.get("kind", "eval") == kind]


class StopOnSignal:
    """Ctrl-C (SIGINT) or SIGTERM sets .signal; the loop finishes its step, saves and exits. A second Ctrl-C stops
    at once. The previous handlers come back on exit. With several ranks the stop is agreed at log steps (every
    rank asks the others then), so all stop after the same step and none waits in a collective."""

    def __init__(self, d, log_interval):
        self.d, self.log_interval = d, log_interval

    def now(self, it):
        """Whether to save and exit after step it."""
        if self.d.world == 1:
            return self.signal is not None
        if it % self.log_interval or not self.d.any(self.signal is not None):
            return False
        self.signal = self.signal or signal.SIGTERM  # another rank was signalled: stop as it does
        return True

    def __enter__(self):
        self.signal = None
        self.old = {s: signal.signal(s, self.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def on_signal(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
