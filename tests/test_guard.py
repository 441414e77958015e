"""sologpt/guard.py on tiny CPU runs: early stopping keeps the best checkpoint and says why; the spike guard rolls a
poisoned batch's spike (or NaN) back to the last good state exactly, skips the batch, lowers the learning rate,
records it, resumes with its counters, stops after too many rollbacks in a row, and works under torchrun."""

import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from conftest import REPO, error_of, run_train
from sologpt import build
from sologpt.checkpoint import read as read_checkpoint
from sologpt.rundir import read_metrics
import train as train_mod


class Poisoned(torch.nn.Module):
    """The loss model, with the loss of an all-zero batch multiplied by factor (1000: a spike; nan: a NaN)."""

    def __init__(self, inner, factor):
        super().__init__()
        self.inner, self.factor = inner, factor

    def forward(self, x, y, **kw):
        logits, loss = self.inner(x, y, **kw)
        return logits, loss * self.factor if bool((x == 0).all()) else loss


class PoisonAt:
    """A batch source whose micro-batches at the given steps are all token 0 (the poisoned batch)."""

    def __init__(self, inner, steps):
        self.inner, self.steps, self.generator, self.batch = inner, steps, inner.generator, inner.batch

    def __call__(self, step):
        out = self.inner(step)
        return [(torch.zeros_like(x), y, kw) for x, y, kw in out] if step in self.steps else out


def poison(monkeypatch, steps, factor=1000.0):
    """Poison the batches drawn at these steps (0-based: the batch of step i is logged as iter i + 1)."""
    real_source, real_loss = build.batch_source, build.loss_model
    monkeypatch.setattr(build, "batch_source", lambda *a, **k: PoisonAt(real_source(*a, **k), set(steps)))
    monkeypatch.setattr(build, "loss_model", lambda *a, **k: Poisoned(real_loss(*a, **k), factor))


def test_rewind_puts_back_weights_optimizer_scaler_and_rng_exactly():
    """checkpoint.rewind, the rollback itself: after more steps, everything a checkpoint holds is back bit for bit, in
    the same tensors (a compiled step keeps its references); the batch generator alone goes on."""
    import io
    from conftest import make_model
    from sologpt import checkpoint
    from sologpt.hardware import LossScaler
    cfg = train_mod.TrainConfig(device="cpu", dropout=0.1, cuda_graphs=False)  # as checks.resolve leaves it
    model = make_model(dropout=0.1).train()
    optimizer, scaler = train_mod.make_optimizer(model, cfg, "cpu"), LossScaler("cpu", enabled=False)
    gen, progress = torch.Generator().manual_seed(0), checkpoint.Progress()
    x = torch.randint(0, 64, (2, 16), generator=gen)

    def steps(n):
        for _ in range(n):
            train_mod.train_step(model, optimizer, scaler, [(x, x, {})], torch.autocast("cpu", enabled=False), 1.0)

    steps(2)
    buf = io.BytesIO()
    torch.save(checkpoint.training_state(model, optimizer, scaler, gen, progress, cfg, "scratch", 0.0), buf)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {i: {k: v.clone() for k, v in s.items()} for i, s in optimizer.state_dict()["state"].items()}
    rng, params = torch.get_rng_state(), [id(p) for p in model.parameters()]
    steps(3)
    torch.randint(0, 64, (5,), generator=gen)
    gen_after = gen.get_state()
    buf.seek(0)
    checkpoint.rewind(torch.load(buf, weights_only=True), model, optimizer, scaler, cfg)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    state = optimizer.state_dict()["state"]
    assert all(torch.equal(state[i][k], v) for i in moments for k, v in moments[i].items())
    assert torch.equal(torch.get_rng_state(), rng) and [id(p) for p in model.parameters()] == params
    assert torch.equal(gen.get_state(), gen_after)  # not put back: the batches since are skipped


def test_early_stopping_keeps_the_best_checkpoint_and_records_why(tiny_flags, tmp_path, capsys):
    # learning rate 0: val loss never improves on step 0's, so patience 2 ends the run at the evaluation of step 4
    run_train(tiny_flags + ["--max_iters=20", "--eval_interval=2", "--learning_rate=0", "--min_lr=0",
                            "--patience=2", "--always_save_checkpoint=False"])
    out = capsys.readouterr().out
    assert "early stopping at step 4: val loss has not improved" in out and "patience=2" in out
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 0  # the best model
    assert not (tmp_path / "out" / "last.pt").exists()
    stop = read_metrics(tmp_path / "out", "stop")
    assert [(s["iter"], s["reason"]) for s in stop] == [(4, "patience")]
    assert "early stopping" not in capsys.readouterr().out


def test_patience_counts_across_a_resume(tiny_flags, tmp_path, monkeypatch):
    """Ctrl-C after the evaluations of steps 0 (best) and 2 saves last.pt with one evaluation counted; the resumed run
    counts on (4, 6) and stops at 6, not at 8 as a count started afresh would."""
    flags = tiny_flags + ["--max_iters=20", "--eval_interval=2", "--learning_rate=0", "--min_lr=0", "--patience=3",
                          "--always_save_checkpoint=False"]
    real_get_lr = train_mod.get_lr

    def interrupt_in_step_3(it, cfg):
        if it == 3:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_lr(it, cfg)

    monkeypatch.setattr(train_mod, "get_lr", interrupt_in_step_3)
    with pytest.raises(SystemExit):
        run_train(flags)
    monkeypatch.undo()
    assert read_checkpoint(tmp_path / "out" / "last.pt")["guard"]["evals_since_best"] == 1
    run_train(flags + ["--init_from=resume"])
    assert [(s["iter"], s["reason"]) for s in read_metrics(tmp_path / "out", "stop")] == [(4, "SIGINT"),
                                                                                          (6, "patience")]


def test_guard_settings_are_checked(tiny_flags, capsys):
    main = train_mod.main
    assert "add --always_save_checkpoint=False" in error_of(main, tiny_flags + ["--patience=3"], capsys)
    assert "patience=-1 must not be negative" in error_of(main, tiny_flags + ["--patience=-1"], capsys)
    spike = tiny_flags + ["--spike_guard=True"]
    assert "spike_factor=1.0 must be a number above 1" in error_of(main, spike + ["--spike_factor=1"], capsys)
    assert "spike_max_rollbacks=0" in error_of(main, spike + ["--spike_max_rollbacks=0"], capsys)
    assert "spike_lr_factor=0.0 must be in (0, 1]" in error_of(main, spike + ["--spike_lr_factor=0"], capsys)
    assert "'tape' is unknown" in error_of(main, spike + ["--spike_rollback=tape"], capsys)
    assert "multiple of log_interval=2" in error_of(main, spike + ["--log_interval=2", "--eval_interval=5"], capsys)
    assert "no spike_guard" in error_of(main, spike + ["--cuda_graphs=True"], capsys)


def test_spike_rolls_back_exactly_skips_the_batch_and_finishes(tiny_flags, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, steps={9})  # logged at step 10, an evaluation step
    flags = tiny_flags + ["--max_iters=20", "--spike_guard=True", "--spike_lr_factor=0.5"]
    run_train(flags)
    out = capsys.readouterr().out
    assert "spike guard: loss" in out and "rolled back to the state of step 5 (memory)" in out
    assert "skipping the batches of steps 6-10" in out and "learning rate x0.5" in out
    evals = {m["iter"]: m for m in read_metrics(tmp_path / "out")}
    # the evaluation of step 10 sees step 5's weights, put back exactly: the same loss to the last bit
    assert evals[10]["val_loss"] == evals[5]["val_loss"]
    assert evals[20]["val_loss"] < evals[5]["val_loss"]  # and it learns on
    (rollback,) = read_metrics(tmp_path / "out", "rollback")
    assert rollback["iter"] == 10 and rollback["to_iter"] == 5 and rollback["loss"] > 3 * rollback["mean"]
    assert rollback["lr_scale"] == 0.5 and rollback["from"] == "memory"
    steps = {m["iter"]: m for m in read_metrics(tmp_path / "out", "step")}
    assert steps[12]["lr"] == pytest.approx(0.5 * train_mod.get_lr(11, train_mod.TrainConfig(
        learning_rate=3e-3, min_lr=3e-4, warmup_iters=2, max_iters=20, lr_decay_iters=20)))
    assert read_metrics(tmp_path / "out", "stop")[-1]["reason"] == "max_iters"
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 20 and ckpt["guard"]["rollbacks"] == 1 and ckpt["guard"]["lr_scale"] == 0.5

    # a resumed run goes on with the guard's counters: the halved learning rate, the running mean
    monkeypatch.undo()
    run_train(flags + ["--max_iters=24", "--init_from=resume"])
    steps = {m["iter"]: m for m in read_metrics(tmp_path / "out", "step")}
    assert steps[22]["lr"] == pytest.approx(0.5 * train_mod.get_lr(21, train_mod.TrainConfig(
        learning_rate=3e-3, min_lr=3e-4, warmup_iters=2, max_iters=24, lr_decay_iters=24)))
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["guard"]["rollbacks"] == 1


def test_a_lora_run_rolls_back_its_adapters(tiny_flags, trained, tmp_path, monkeypatch):
    """A LoRA run's checkpoint holds the adapters apart from the rest: the rollback puts them back exactly too."""
    poison(monkeypatch, steps={9})
    run_train(tiny_flags + ["--max_iters=12", "--spike_guard=True", f"--init_from={trained / 'ckpt.pt'}",
                            "--lora_rank=4"])
    evals = {m["iter"]: m for m in read_metrics(tmp_path / "out")}
    assert [r["to_iter"] for r in read_metrics(tmp_path / "out", "rollback")] == [5]
    assert evals[10]["val_loss"] == evals[5]["val_loss"] and evals[12]["val_loss"] != evals[5]["val_loss"]


def test_nan_rolls_back_from_the_checkpoint_on_disk(tiny_flags, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, steps={7}, factor=math.nan)
    run_train(tiny_flags + ["--max_iters=12", "--spike_guard=True", "--spike_rollback=disk"])
    out = capsys.readouterr().out
    assert "spike guard: loss is nan at step 8" in out and f"{tmp_path / 'out' / 'ckpt.pt'}" in out
    (rollback,) = read_metrics(tmp_path / "out", "rollback")
    assert rollback["to_iter"] == 5 and rollback["loss"] is None  # NaN is written as null: the file stays JSON
    evals = {m["iter"]: m for m in read_metrics(tmp_path / "out")}
    assert math.isfinite(evals[12]["val_loss"]) and evals[12]["val_loss"] < evals[5]["val_loss"]


def test_too_many_rollbacks_in_a_row_stop_in_one_line(tiny_flags, tmp_path, monkeypatch, capsys):
    poison(monkeypatch, steps=set(range(6, 100)))  # every batch after step 6 is poisoned: the run cannot recover
    flags = tiny_flags + ["--max_iters=20", "--spike_guard=True", "--spike_max_rollbacks=2"]
    err = error_of(train_mod.main, flags, capsys)
    assert "at step 9, after 2 rollbacks in a row (spike_max_rollbacks=2)" in err and "was not overwritten" in err
    assert [r["iter"] for r in read_metrics(tmp_path / "out", "rollback")] == [7, 8]
    assert read_metrics(tmp_path / "out", "stop")[-1]["reason"] == "diverged"
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 5


def test_spike_guard_under_torchrun_rolls_back_every_rank(char_data, tmp_path):
    """2 gloo ranks, the poisoned batch on rank 1 only: the loss is averaged over the ranks, so both roll back at
    the same step, and the run finishes."""
    script = tmp_path / "poisoned.py"
    script.write_text(f"""import os, sys
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(REPO / 'tests')!r})
import torch, train
from sologpt import build
from test_guard import Poisoned, PoisonAt
real_source, real_loss = build.batch_source, build.loss_model
build.batch_source = lambda *a, **k: PoisonAt(real_source(*a, **k), {{5}} if os.environ["RANK"] == "1" else set())
build.loss_model = lambda *a, **k: Poisoned(real_loss(*a, **k), 1000.0)
train.main()
""")
    flags = [f"--data_root={char_data}", "--dataset=tiny", "--device=cpu", "--n_layer=2", "--n_head=2",
             "--n_embd=32", "--block_size=32", "--batch_size=4", "--gradient_accumulation_steps=2", "--eval_iters=2",
             "--eval_interval=4", "--log_interval=2", "--progress=False", "--sample_tokens=0", "--warmup_iters=2",
             "--learning_rate=3e-3", "--max_iters=10", "--spike_guard=True", f"--out_dir={tmp_path / 'out'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          str(script), *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.count("rolled back to the state of step 4") == 1  # rank 0 prints for both
    (rollback,) = read_metrics(tmp_path / "out", "rollback")
    assert rollback["iter"] == 6 and rollback["to_iter"] == 4
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 10


def test_spike_guard_refuses_fsdp(char_data, tmp_path, capsys):
    err = error_of(train_mod.main, [f"--data_root={char_data}", "--dataset=tiny", "--device=cpu",
                                    "--spike_guard=True", "--parallel=fsdp"], capsys)
    assert "FSDP shards" in err


def test_a_host_copy_keeps_tied_weights_tied_and_reuses_its_buffers():
    from model import GPT, GPTConfig
    from sologpt import guard
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=32))
    state = {"model": model.state_dict(), "iter_num": 3}
    copy = guard.host_copy(state)
    m = copy["model"]
    assert m["lm_head.weight"] is m["transformer.wte.weight"]  # one copy of the tied embedding, not two
    assert all(torch.equal(m[k], v) and m[k].data_ptr() != v.data_ptr() for k, v in state["model"].items())
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    again = guard.host_copy({"model": model.state_dict(), "iter_num": 4}, into=copy)
    assert again["model"]["lm_head.weight"] is m["lm_head.weight"] and again["iter_num"] == 4  # the same buffers
    assert torch.equal(again["model"]["transformer.wte.weight"], model.transformer.wte.weight)
    model.load_state_dict(again["model"])  # a rollback restores from it as from any state dict
