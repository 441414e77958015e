"""Fault injection: a run killed with SIGKILL at seeded points (mid-step, mid-evaluation, mid-write of a checkpoint
or a JSON file, around the rename, mid-line of metrics.jsonl) and resumed each time must load its checkpoint,
finish, and log the same losses and end with the same weights as a run that was never killed, leaving no temp file.
A write that fails (no space, read-only) keeps the previous checkpoint and stops with one line; a second Ctrl-C stops
at once; out_dir's lock refuses a second live run and takes over a dead one's.

Every run is a forked child of this process (torch is imported once, not once per run) in which a hook kills it at an
exact point, so the kills are deterministic: no timing, no sleeps."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
import traceback

import pytest
import torch

import model as model_mod
import train as train_mod
from conftest import error_of
from sologpt import build, checkpoint, monitor, rundir

STEPS, EVERY = 16, 4  # optimizer steps of the run, and the evaluation (and checkpoint) interval
KINDS = ("step", "eval", "write", "replace", "metrics")


def flags_for(char_data, out):
    # conftest's tiny run, with two micro-batches per step (a kill between them is mid-step) and dropout (a resume
    # needs the saved RNG state)
    return [f"--data_root={char_data}", "--dataset=tiny", f"--out_dir={out}", "--device=cpu", "--n_layer=2",
            "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--eval_iters=2", "--log_interval=1",
            "--warmup_iters=2", "--learning_rate=3e-3", "--min_lr=3e-4", "--progress=False", "--sample_tokens=0",
            "--compile=False",
        f"--max_iters={STEPS}", f"--eval_interval={EVERY}", "--gradient_accumulation_steps=2", "--dropout=0.1",
        "--lr_decay_iters=16"]


# ---- the hooks, armed inside the child ------------------------------------------------------------------------

def die():
    os.kill(os.getpid(), signal.SIGKILL)
    while True:  # with other threads in the process the kill may land a moment later: nothing more may happen here
        time.sleep(1)


def ctrl_c_twice():
    """Two SIGINTs, the second once the first was handled: signals a process sends itself may reach it a moment
    later (on another thread), and two pending ones of a kind are handled once. Returns once the second raised."""
    stopper = signal.getsignal(signal.SIGINT).__self__  # train.py's StopOnSignal
    os.kill(os.getpid(), signal.SIGINT)
    while stopper.signal is None:
        time.sleep(0.001)
    os.kill(os.getpid(), signal.SIGINT)
    while True:  # the KeyboardInterrupt comes out of here
        time.sleep(0.001)


def arm(kind, n, k):
    """Kill this process at the n-th event of `kind`: a training forward ("step"; with two micro-batches, an even n
    falls after the first one's backward), an evaluation forward ("eval"), an atomic write of ckpt.pt, config.json,
    meta.json or metrics.jsonl ("write": after k of its writes, the last one half done, or at its flush), the rename
    that publishes one ("replace": k=0 before it, k=1 after it), an append to metrics.jsonl ("metrics": half a line)."""
    count = {"n": 0}

    def hit():
        count["n"] += 1
        return count["n"] == n

    if kind in ("step", "eval"):
        forward = model_mod.GPT.forward

        def counted(self, *args, **kwargs):
            if self.training == (kind == "step") and hit():
                die()
            return forward(self, *args, **kwargs)
        model_mod.GPT.forward = counted
    elif kind == "write":
        real_open = open

        class Dying:  # a file that dies part way through
            def __init__(self, f):
                self.f, self.writes = f, 0

            def write(self, data):
                self.writes += 1
                if self.writes == k:
                    self.f.write(bytes(data)[:len(data) // 2])
                    self.f.flush()
                    die()
                return self.f.write(data)

            def flush(self):
                self.f.flush()
                die()  # every write went through: the temp file is whole, but not yet synced nor renamed

            def __getattr__(self, name):
                return getattr(self.f, name)

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        checkpoint.open = lambda path, mode="r", *a: Dying(real_open(path, mode, *a)) if hit() else \
            real_open(path, mode, *a)
    elif kind == "replace":
        real_replace = os.replace

        def replace(src, dst):
            if not hit():
                return real_replace(src, dst)
            if k:
                real_replace(src, dst)
            die()
        os.replace = replace
    elif kind == "metrics":
        real_open = open

        class HalfLine:
            def __init__(self, f):
                self.f = f

            def write(self, line):
                self.f.write(line[:len(line) // 2])
                self.f.flush()
                die()

            def __enter__(self):
                return self

            def __exit__(self, *exc):
                self.f.close()

        monitor.open = lambda path, mode="r", *a: HalfLine(real_open(path, mode, *a)) if hit() else \
            real_open(path, mode, *a)


def child(flags, log, fault=None):
    """train.py's main(flags) in a forked child, its output appended to log, the fault (kind, n, k) armed; returns
    its exit status (-9: killed)."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 2
        try:
            sys.stdout = sys.stderr = open(log, "a", buffering=1)
            if fault:
                arm(*fault)
            train_mod.main(flags)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


# ---- what a run leaves ---------------------------------------------------------------------------------------

def step_losses(text):
    """step -> the loss its log line printed."""
    return {int(m[1]): m[2] for m in re.finditer(r"^step +(\d+) \| loss ([\d.]+)", text, flags=re.M)}


RUN_FILES = ["best.pt", "ckpt.pt", "config.json", "meta.json", "metrics.jsonl"]  # a finished run's out_dir
TIMES = ("time_s", "peak_alloc_gib", "peak_reserved_gib", "tokens_per_s", "ms_per_step", "mfu")


def evaluations(out):
    """(kind, iter) -> the metrics of metrics.jsonl that the run computes (step and evaluation losses, not the
    times and memory)."""
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return {(m.get("kind", "eval"), m["iter"]): {k: v for k, v in m.items() if k not in TIMES}
            for m in map(json.loads, lines)}


def progress(out):
    """(steps done, the step of the last evaluation) of the checkpoint a resume reads, or (0, -1) without one."""
    if not (out / "ckpt.pt").exists():
        return 0, -1
    ckpt = checkpoint.read(out / "ckpt.pt")  # it always loads, whatever the kill interrupted
    checkpoint.check_resumable(ckpt, out / "ckpt.pt")
    return ckpt["iter_num"], ckpt["last_eval_iter"]


def pick(rng, kind, it, last_eval):
    """A kill point of this kind that the process reaches, resuming after step `it`, anywhere in what is left but
    after the last save (which would leave nothing to resume): (kind, n, k)."""
    evals = len([i for i in range(it, STEPS + 1) if (i % EVERY == 0 or i == STEPS) and i != last_eval])
    if not evals:
        kind = "step"
    elif it == STEPS:
        kind = "eval"

    def anywhere(count):
        return rng.randint(1, max(1, count))

    if kind == "step":
        return kind, anywhere(2 * (STEPS - it)), 0
    if kind == "eval":  # eval_iters=2 batches of each split per evaluation
        return kind, anywhere(4 * evals), 0
    if kind == "metrics":
        return kind, anywhere(evals), 0
    # config.json, meta.json and metrics.jsonl at the start, then one checkpoint per evaluation (not the last one)
    return kind, anywhere(2 + evals), rng.randint(0, 1) if kind == "replace" else rng.randint(1, 6)


@pytest.fixture(scope="module")
def reference(char_data, tmp_path_factory):
    """The uninterrupted run: its out_dir and log."""
    out = tmp_path_factory.mktemp("reference") / "out"
    log = out.parent / "log.txt"
    assert child(flags_for(char_data, out), log) == 0, log.read_text()
    return out, log.read_text()


@pytest.mark.parametrize("seed", [0, 1])
def test_sigkill_anywhere_then_resume_gives_the_uninterrupted_run(reference, char_data, tmp_path, seed):
    ref_out, ref_log = reference
    out, log = tmp_path / "out", tmp_path / "log.txt"
    rng, tried = random.Random(seed), []
    for kind in rng.sample(KINDS, len(KINDS)) + [rng.choice(KINDS) for _ in range(2)]:  # kill, resume, kill, ...
        it, last_eval = progress(out)
        if it == STEPS and last_eval == STEPS:  # killed after its last save: nothing left to interrupt
            break
        fault = pick(rng, kind, it, last_eval)
        resume = ["--init_from=resume"] if (out / "ckpt.pt").exists() else []
        status = child(flags_for(char_data, out) + resume, log, fault)
        tried.append((it, *fault, status))
        assert status == -signal.SIGKILL, (tried, log.read_text()[-3000:])
    status = child(flags_for(char_data, out) + ["--init_from=resume"], log)  # and let it finish
    print(f"kill points (step resumed from, kind, n, k, exit status): {tried}")
    text = log.read_text()
    assert status == 0, (tried, text[-3000:])
    assert {kind for _, kind, *_ in tried} >= {"step", "eval", "write", "replace"}, tried

    assert evaluations(out) == evaluations(ref_out), tried  # every evaluation, with the same numbers
    ours, theirs = step_losses(text), step_losses(ref_log)
    assert sorted(ours) == list(range(1, STEPS + 1)) and all(ours[s] == theirs[s] for s in ours), tried
    a, b = checkpoint.read(out / "ckpt.pt")["model"], checkpoint.read(ref_out / "ckpt.pt")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    assert "taking it over" in text  # a killed run's lock was stale, and the next run said so
    assert "Traceback" not in text


# ---- a write that fails ------------------------------------------------------------------------------------------

class Failing:
    """A file whose writes fail after `room` bytes, as on a full disk."""

    def __init__(self, f, room, error):
        self.f, self.room, self.error = f, room, error

    def write(self, data):
        if len(data) > self.room:
            self.f.write(bytes(data)[:self.room])
            raise self.error
        self.room -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fail_writes_from(monkeypatch, nth, error, room=20_000):
    """From the nth atomic write on, the disk is full (or read-only: error raised at open with room=None)."""
    real_open, count = open, {"n": 0}

    def opener(path, mode="r", *a):
        count["n"] += 1
        if count["n"] < nth:
            return real_open(path, mode, *a)
        if room is None:
            raise error
        return Failing(real_open(path, mode, *a), room, error)
    monkeypatch.setattr(checkpoint, "open", opener, raising=False)


@pytest.mark.parametrize("error, room", [(OSError(28, "No space left on device"), 20_000),
                                         (OSError(28, "No space left on device"), 0),
                                         (OSError(30, "Read-only file system"), None)],
                         ids=["full-disk-mid-checkpoint", "full-disk-at-once", "read-only"])
def test_a_failing_checkpoint_write_keeps_the_previous_one_and_stops_in_one_line(tiny_flags, tmp_path, monkeypatch,
                                                                                 capsys, error, room):
    flags = tiny_flags + ["--max_iters=10"]
    train_mod.main(flags + ["--max_iters=5"])
    ckpt = tmp_path / "out" / "ckpt.pt"
    before = ckpt.read_bytes()
    fail_writes_from(monkeypatch, 4, error, room)  # config.json, meta.json, metrics.jsonl, then the checkpoint
    err = error_of(train_mod.main, flags + ["--init_from=resume"], capsys)
    assert f"cannot write {ckpt}" in err and error.strerror in err and "is unchanged" in err, err
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == RUN_FILES


def test_a_failing_write_at_the_start_or_of_metrics_is_one_line(tiny_flags, tmp_path, monkeypatch, capsys):
    train_mod.main(tiny_flags + ["--max_iters=5"])
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with monkeypatch.context() as m:
        fail_writes_from(m, 1, OSError(30, "Read-only file system"), room=None)
        err = error_of(train_mod.main, tiny_flags + ["--max_iters=10", "--init_from=resume"], capsys)
    assert f"cannot write in out_dir {out}: Read-only file system" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    with monkeypatch.context() as m:
        m.setattr(monitor, "open", full, raising=False)
        err = error_of(train_mod.main, tiny_flags + ["--max_iters=10", "--init_from=resume"], capsys)
    assert f"cannot append to {out / 'metrics.jsonl'}: No space left on device" in err
    assert (out / "ckpt.pt").read_bytes() == before["ckpt.pt"] and not (out / "train.lock").exists()


def test_tools_and_prepare_stop_in_one_line_on_a_full_disk(trained, tmp_path, monkeypatch, capsys):
    """tools.quantize and tools.export write through checkpoint.save, prepare/ through its token writers: a full
    disk is one line, and the files the user had are as they were."""
    from prepare import classify as prep_classify, shakespeare_char, text as prep_text
    from tools import export as export_mod, quantize as quantize_mod
    from conftest import SHAKESPEARE
    old = tmp_path / "old.pt"
    old.write_bytes(b"the user's file")
    data = tmp_path / "data"
    text = tmp_path / "in.txt"
    text.write_text(SHAKESPEARE.read_text()[:20_000])
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"text": f"row {i} " * 3, "label": "ab"[i % 2]}) + "\n" for i in range(40)))
    shakespeare_char.main(["--input", str(text), "--data_root", str(data), "--name", "char"])
    prep_text.main([str(rows), "--name", "doc", "--data_root", str(data), "--min_split_tokens", "1", "--workers", "1"])
    prep_classify.main(["--input", str(rows), "--name", "cls", "--data_root", str(data), "--tokenizer", "char"])
    before = {p: p.read_bytes() for p in data.rglob("*") if p.is_file()}
    real_open = open

    def full(path, mode="r", *args, **kwargs):  # every write fails; reads (telling what a file is) still work
        if any(c in mode for c in "wax+"):
            raise OSError(28, "No space left on device")
        return real_open(path, mode, *args, **kwargs)

    runs = [(quantize_mod.main, ["--ckpt", str(trained / "ckpt.pt"), "--mode", "int8", "--out", str(old)], checkpoint),
            (export_mod.main, [f"--out_dir={trained}", f"--merged_ckpt={old}"], checkpoint),
            (shakespeare_char.main, ["--input", str(text), "--data_root", str(data), "--name", "char"],
             sys.modules["prepare.common"]),
            (prep_text.main, [str(rows), "--name", "doc", "--data_root", str(data), "--workers", "1"],
             sys.modules["prepare.common"]),
            (prep_classify.main, ["--input", str(rows), "--name", "cls", "--data_root", str(data), "--tokenizer",
                                  "char"], prep_classify)]
    for main, argv, module in runs:
        with monkeypatch.context() as m:
            m.setattr(module, "open", full, raising=False)
            err = error_of(main, argv, capsys)
        assert "No space left on device: free disk space" in err, err
    assert old.read_bytes() == b"the user's file"
    assert {p: p.read_bytes() for p in data.rglob("*") if p.is_file()} == before  # no temp file left either


def test_out_dir_that_is_a_file(tiny_flags, tmp_path, capsys):
    (tmp_path / "out").write_text("my notes")
    assert "is a file, not a folder" in error_of(train_mod.main, tiny_flags + ["--max_iters=2"], capsys)
    assert (tmp_path / "out").read_text() == "my notes"


# ---- Ctrl-C twice -----------------------------------------------------------------------------------------------

def test_a_second_ctrl_c_stops_at_once_without_saving(tiny_flags, tmp_path, monkeypatch, capsys):
    flags = tiny_flags + ["--max_iters=10", "--eval_interval=4"]
    real_get_lr = train_mod.get_lr

    def get_lr(it, cfg):
        if it == 6:  # Ctrl-C, and another before the step could finish
            ctrl_c_twice()
        return real_get_lr(it, cfg)

    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    monkeypatch.setattr(train_mod, "get_lr", get_lr)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_mod.main(flags)
    assert exc.value.code == 130
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: a second SIGINT stopped the run at once, without saving") and "\n" not in err
    out = tmp_path / "out"
    assert checkpoint.read(out / "ckpt.pt")["iter_num"] == 4  # the evaluation's checkpoint, not step 6 or 7
    assert sorted(p.name for p in out.iterdir()) == RUN_FILES
    assert signal.getsignal(signal.SIGINT) is handler


def test_a_second_ctrl_c_during_the_save_keeps_the_previous_checkpoint(tiny_flags, tmp_path, monkeypatch, capsys):
    flags = tiny_flags + ["--max_iters=10", "--eval_interval=4"]
    train_mod.main(flags + ["--max_iters=4"])
    ckpt = tmp_path / "out" / "ckpt.pt"
    before = ckpt.read_bytes()
    real_open, count = open, {"n": 0}

    class Interrupted:  # the user presses Ctrl-C twice while the checkpoint of step 8 is written
        def __init__(self, f):
            self.f = f

        def write(self, data):
            ctrl_c_twice()

        def __getattr__(self, name):
            return getattr(self.f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()

    def opener(path, mode="r", *a):
        count["n"] += 1
        return Interrupted(real_open(path, mode, *a)) if count["n"] == 4 else real_open(path, mode, *a)

    monkeypatch.setattr(checkpoint, "open", opener, raising=False)
    with pytest.raises(SystemExit) as exc:
        train_mod.main(flags + ["--init_from=resume"])
    assert exc.value.code == 130
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in ckpt.parent.iterdir()) == RUN_FILES


# ---- the out_dir lock ----------------------------------------------------------------------------------------

HOLD = """import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)
fcntl.flock(fd, fcntl.LOCK_EX)
os.write(fd, f"{os.getpid()} somehost\\n".encode())
print("locked", flush=True)
time.sleep(120)
"""


def test_a_live_run_holds_out_dir_and_a_dead_ones_lock_is_taken_over(tiny_flags, tmp_path, monkeypatch, capsys):
    train_mod.main(tiny_flags + ["--max_iters=2"])
    out = tmp_path / "out"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(out / "train.lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for extra in (["--init_from=resume", "--max_iters=4"], ["--overwrite=True"]):  # a resume, or a new run
            with monkeypatch.context() as m:  # refused before any work: no model is built
                m.setattr(build, "build_model", lambda *a, **k: pytest.fail("built a model"))
                err = error_of(train_mod.main, tiny_flags + extra, capsys)
            assert f"out_dir {out} is in use by another run (pid {holder.pid} on somehost" in err, err
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.name != "train.lock"} == before
    finally:
        holder.kill()
        holder.wait()
    capsys.readouterr()
    train_mod.main(tiny_flags + ["--init_from=resume", "--max_iters=4"])  # its lock is stale now
    assert f"was left by pid {holder.pid}, which holds it no more" in capsys.readouterr().out
    assert checkpoint.read(out / "ckpt.pt")["iter_num"] == 4 and not (out / "train.lock").exists()


def test_temp_files_of_a_killed_writer_go_at_the_next_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = [tmp_path / f"ckpt.pt.{dead.stdout.strip()}.tmp", tmp_path / "ckpt.pt.tmp"]  # a dead pid's, an old name
    alive = tmp_path / f"ckpt.pt.{os.getppid()}.tmp"  # a writer that still runs
    other = tmp_path / "notes.tmp"  # not ours
    for p in (*stale, alive, other):
        p.write_bytes(b"half")
    checkpoint.save(path, {"x": torch.ones(2)})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, alive.name, other.name])


def test_a_taken_over_lock_holds_the_new_holder_only_and_is_the_file_at_its_path(tmp_path, monkeypatch):
    import fcntl
    import socket
    path = tmp_path / "train.lock"
    path.write_text("99999999 a-long-host-name-of-a-machine-that-is-gone\n")  # longer than what replaces it
    lock = rundir.OutDirLock(path)
    lock.acquire()
    assert path.read_text() == f"{os.getpid()} {socket.gethostname()}\n"
    lock.release()
    assert not path.exists()

    real_flock, calls = fcntl.flock, []

    def flock(fd, op):  # the holder removes its file between our open and our flock, another run creates a new one
        calls.append(fd)
        if len(calls) == 1:
            path.unlink()
            path.write_text("")
        return real_flock(fd, op)

    monkeypatch.setattr(rundir.fcntl, "flock", flock)
    lock.acquire()
    assert len(calls) == 2 and os.fstat(lock.fd).st_ino == os.stat(path).st_ino  # it holds the file at the path
    lock.release()


def test_a_run_removes_the_temp_files_a_killed_run_left(tiny_flags, tmp_path, monkeypatch):
    train_mod.main(tiny_flags + ["--max_iters=2"])
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f"last.pt.{dead.stdout.strip()}.tmp"  # last.pt: a file this run never writes
    stale.write_bytes(b"half")
    train_mod.main(tiny_flags + ["--max_iters=3", "--init_from=resume"])
    assert not stale.exists()
    other_user = out / "ckpt.pt.4242.tmp"  # a writer os.kill may not signal: it runs, under another user
    other_user.write_bytes(b"half")
    real_kill = os.kill

    def kill(pid, sig):
        if pid == 4242:
            raise PermissionError(1, "Operation not permitted")
        return real_kill(pid, sig)

    monkeypatch.setattr(os, "kill", kill)
    checkpoint.save(out / "ckpt.pt", {"x": torch.ones(1)})
    assert other_user.exists()
