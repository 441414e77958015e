"""A run's folder and its life: out_dir/ckpt.pt (saved at evaluations: where a resume continues), best.pt (the
evaluation with the best val loss), last.pt (an interrupt's resume point when ckpt.pt must stay the best model),
config.json, meta.json and metrics.jsonl; which checkpoint a resume reads; the line that ends a run; the lock that
keeps a second run out of a folder a live run writes (train.lock); and the Ctrl-C / SIGTERM handling that lets the
current step finish and saves before exiting. A write that fails (a full disk, a read-only folder) stops the run
with one line and leaves the previous checkpoint as it was."""

import dataclasses
import fcntl
import json
import os
import signal
import socket
from pathlib import Path

from sologpt import checkpoint
from sologpt.configurator import UserError


FILES = ("ckpt.pt", "best.pt", "last.pt", "config.json", "meta.json", "metrics.jsonl")  # what a run writes in out_dir


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
        self.lock = OutDirLock(self.path / "train.lock")
        if self.path.exists() and not self.path.is_dir():
            raise UserError(f"out_dir {self.path} is a file, not a folder: choose another --out_dir")
        if main:
            self.lock.check()  # a live run writes here: refuse before any work
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
            checkpoint.check_resumable(ckpt, path)
            checkpoint.check_resume(ckpt, cfg, path)
        except ValueError as e:
            raise UserError(str(e))
        if cfg.batch_size == "auto":
            saved = ckpt["train_config"]
            cfg.batch_size, cfg.gradient_accumulation_steps = saved["batch_size"], saved["gradient_accumulation_steps"]
        return ckpt, path

    def start(self, cfg, meta, iter_num):
        """Take the folder's lock, then write config.json and meta.json (sample.py finds the tokenizer beside the
        checkpoint), and cut from metrics.jsonl the evaluations a resumed run will make again."""
        if not self.main:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            self.lock.acquire()
            for name in FILES:  # temp files of a run that was killed mid-write
                checkpoint.remove_stale_temps(self.path / name)
            checkpoint.write_json(self.path / "config.json", dataclasses.asdict(cfg))
            checkpoint.write_json(self.path / "meta.json", meta)
            kept = []
            if cfg.init_from == "resume" and self.metrics.exists():
                kept = metrics_until(self.metrics, iter_num)
            checkpoint.write_text(self.metrics, "".join(line + "\n" for line in kept))
        except OSError as e:
            self.close()
            raise UserError(f"cannot write in out_dir {self.path}: {write_problem(e)}")
        except BaseException:
            self.close()
            raise

    def save(self, state, improved=False, last=False):
        """ckpt.pt (and best.pt when this is the best evaluation so far), or with last=True last.pt: a resume point
        that is not the best model; ckpt.pt supersedes last.pt. Returns the path written. A failed write stops the
        run with one line; the file it would have replaced is unchanged."""
        path = self.last if last else self.ckpt
        if self.main:
            try:
                checkpoint.save(path, state)
                if not last:
                    self.last.unlink(missing_ok=True)
                if improved and not last:
                    self._link_best()
            except OSError as e:
                kept = (f"the previous {path} is unchanged: continue from it with --init_from=resume"
                        if path.exists() else "nothing was saved")
                raise UserError(f"cannot write {path}: {write_problem(e)}; {kept}")
        return path

    def _link_best(self):
        checkpoint.link(self.ckpt, self.best)  # best.pt = ckpt.pt: the same file on disk

    def finish(self):
        if self.main:
            self.last.unlink(missing_ok=True)  # the run is complete: a later resume starts from ckpt.pt
        self.close()

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

    def close(self):
        """Give up the folder's lock (at the end of the run, however it ends)."""
        self.lock.release()


def metrics_until(path, iter_num):
    """metrics.jsonl's lines up to step iter_num. A line a kill cut short mid-write is dropped (with a note)."""
    kept, damaged = [], 0
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            damaged += 1
            continue
        if isinstance(record, dict) and isinstance(record.get("iter"), int) and record["iter"] <= iter_num:
            kept.append(line)
    if damaged:
        print(f"note: dropped {damaged} damaged line(s) of {path} (a run killed while writing it)")
    return kept


def write_problem(e):
    """An OSError of a write as the rest of a one-line message: what went wrong and what to do."""
    reason = e.strerror or str(e)
    where = f" ({e.filename})" if e.filename else ""
    return f"{reason}{where}: free disk space, or check that the folder is writable, or choose another --out_dir"


class OutDirLock:
    """out_dir/train.lock: an exclusive flock held by the one run that writes the folder, with its pid and host
    inside for the message a second run gets. The kernel drops a flock when its process dies (even by SIGKILL), so
    a lock file left by a killed run is stale: the next run takes it over, with a warning."""

    def __init__(self, path):
        self.path, self.fd = path, None

    def holder(self, fd):
        """The 'pid host' written in the lock file (read through fd), or ''."""
        return os.pread(fd, 200, 0).decode("utf-8", "replace").strip()

    def refuse(self, holder):
        pid, _, host = holder.partition(" ")
        raise UserError(f"out_dir {self.path.parent} is in use by another run (pid {pid or '?'}"
                        f"{' on ' + host if host else ''}, which holds {self.path}): wait for it to finish or stop "
                        f"it, or choose another --out_dir")

    def check(self):
        """Refuse if a live run holds the lock; change nothing."""
        try:
            fd = os.open(self.path, os.O_RDONLY)
        except OSError:  # no lock file (or no folder yet): nobody holds it
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.refuse(self.holder(fd))
        finally:
            os.close(fd)  # closing drops the flock this check took

    def acquire(self):
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = self.holder(fd)
                os.close(fd)
                self.refuse(holder)
            if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                self.fd = fd
            else:  # the holder removed the file as we opened it: lock the new one
                os.close(fd)
        old = self.holder(self.fd)
        if old and old.split(" ")[0] != str(os.getpid()):
            print(f"warning: {self.path} was left by pid {old.split(' ')[0]}, which holds it no more (the run was "
                  f"killed?): taking it over")
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)

    def release(self):
        if self.fd is not None:
            try:
                self.path.unlink(missing_ok=True)  # while still holding it, so nobody takes a file about to vanish
            except OSError:
                pass
            os.close(self.fd)
            self.fd = None


def read_metrics(path, kind="eval"):
    """The records of one kind ("eval", "step", "rollback", "stop"; None: all) of a metrics.jsonl file or the out_dir
    holding one (sologpt/monitor.py writes them), in the order they were written. Lines without a kind (runs of
    earlier versions) are evaluations; a line a kill cut short is left out."""
    path = Path(path)
    path = path / "metrics.jsonl" if path.is_dir() else path
    records = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in records if isinstance(r, dict) and (kind is None or r.get("kind", "eval") == kind)]


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
        if self.signal is not None:  # a half-written checkpoint is deleted on the way out: the last one stays
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name} stopped the run at once, without saving; "
                                    f"the last checkpoint saved is unchanged: continue it with --init_from=resume")
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)
