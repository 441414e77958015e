"""train.py on tiny CPU runs: batches, learning rate, learning, gradient accumulation, exact resume,
interrupts, atomic checkpoints, and the one-line errors for bad input."""

import contextlib
import json
import math
import re
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

import train as train_mod
from sologpt.configurator import UserError, load_config
from conftest import REPO
from model import GPT, GPTConfig
from sologpt.checkpoint import read as read_checkpoint
from sologpt.rundir import read_metrics
from sologpt import batches, checkpoint, checks, hardware
from sologpt.batches import get_batch
from train import TrainConfig, get_lr


def run(flags):
    return train_mod.train(load_config(TrainConfig, flags))


def metrics(out_dir):
    """iter -> evaluation record; a resumed run evaluates its first step again, with the same numbers."""
    return {m["iter"]: m for m in read_metrics(out_dir)}


def weights(out_dir):
    return read_checkpoint(out_dir / "ckpt.pt")["model"]


def run_main_error(argv, capsys):
    """Run train.main, expect exit 1 and return the single stderr line."""
    capsys.readouterr()  # drop what earlier steps of the test printed
    with pytest.raises(SystemExit) as exc:
        train_mod.main(argv)
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


# ---- batches and schedule ---------------------------------------------------------------------------------

def test_batch_windows_are_shifted_by_one():
    data = np.arange(1000, dtype=np.uint16)
    x, y = get_batch(data, 4, 16, torch.Generator().manual_seed(0), "cpu")
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.long
    assert torch.equal(y[:, :-1], x[:, 1:])  # y is x moved one token ahead
    assert torch.equal(y[:, -1], x[:, -1] + 1)
    assert torch.equal(x[:, 1:] - x[:, :-1], torch.ones(4, 15, dtype=torch.long))  # contiguous windows
    # the last window may end exactly at the last token, never past it
    x, y = get_batch(np.arange(17, dtype=np.uint16), 8, 16, torch.Generator().manual_seed(0), "cpu")
    assert torch.equal(x[0], torch.arange(16)) and int(y.max()) == 16


def test_lr_warmup_then_cosine_to_min():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_iters=10, lr_decay_iters=110)
    lrs = [get_lr(i, cfg) for i in range(130)]
    assert lrs[0] == pytest.approx(1.0 / 11)  # the first step already learns: warmup does not start at 0
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11]))  # rises during warmup
    assert lrs[10] == pytest.approx(1.0)
    assert lrs[60] == pytest.approx(0.55)  # halfway down the cosine
    assert all(a >= b for a, b in zip(lrs[10:110], lrs[11:111]))  # then only falls
    assert lrs[110] == lrs[129] == 0.1
    cfg.decay_lr = False
    assert get_lr(100, cfg) == 1.0


# ---- training ---------------------------------------------------------------------------------------------

def test_short_run_lowers_loss_and_writes_outputs(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=40", "--eval_interval=20", "--sample_tokens=20"])
    out = tmp_path / "out"
    m = metrics(out)
    assert sorted(m) == [0, 20, 40]
    assert m[40]["val_loss"] < m[0]["val_loss"] - 0.5  # learned something: starts near ln(65) = 4.17
    assert m[40]["val_ppl"] == pytest.approx(math.exp(m[40]["val_loss"]))
    for key in ("iter", "train_loss", "val_loss", "lr", "time_s"):
        assert key in m[40]
    saved = json.loads((out / "config.json").read_text())
    assert saved["device"] == "cpu" and saved["dtype"] == "float32" and saved["compile"] is False  # resolved
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "char"
    ckpt = read_checkpoint(out / "ckpt.pt")
    assert ckpt["iter_num"] == 40 and ckpt["train_config"]["max_iters"] == 40
    assert set(ckpt["rng"]) == {"torch", "cuda", "batches"}


def test_gradient_accumulation_matches_bigger_batch(tiny_flags, tmp_path):
    common = tiny_flags + ["--max_iters=3", "--eval_interval=100"]
    run(common + ["--batch_size=8", "--gradient_accumulation_steps=1", f"--out_dir={tmp_path / 'a'}"])
    run(common + ["--batch_size=4", "--gradient_accumulation_steps=2", f"--out_dir={tmp_path / 'b'}"])
    run(common + ["--batch_size=4", "--gradient_accumulation_steps=1", f"--out_dir={tmp_path / 'c'}"])
    a, b, c = weights(tmp_path / "a"), weights(tmp_path / "b"), weights(tmp_path / "c")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=2e-6, rtol=1e-5)
    assert any(not torch.allclose(a[k], c[k]) for k in a)  # half the batch without accumulation differs


def tiny_step_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10))


def test_train_step_gives_the_mean_loss_and_gradient_of_its_micro_batches():
    """Two micro-batches of 4 are one batch of 8: the same loss and the same gradients. Without the division by the
    number of micro-batches both would double; Adam and clipping hide that from the weights, not from this."""
    model = tiny_step_model()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 10, (8, 8), generator=g), torch.randint(0, 10, (8, 8), generator=g)
    _, whole = model(x, y)
    whole.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    seen = {}

    class Capture(torch.optim.SGD):  # the gradients the optimizer is given
        def step(self, closure=None):
            seen.update({n: p.grad.clone() for n, p in model.named_parameters()})

    loss = train_mod.train_step(model, Capture(model.parameters(), lr=0.1), hardware.LossScaler("cpu", enabled=False),
                                [(x[:4], y[:4], {}), (x[4:], y[4:], {})], contextlib.nullcontext(), grad_clip=0.0)
    assert loss.item() == pytest.approx(whole.item(), rel=1e-6)
    for n in want:
        torch.testing.assert_close(seen[n], want[n], rtol=1e-5, atol=1e-7)


def test_float16_loss_scaling_clips_the_true_gradients():
    """With the float16 loss scaler (2^16) the clip must act on the unscaled gradients: the step is then the same as
    without scaling. Clipping the scaled ones and unscaling after would make every step 65536 times too small."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randint(0, 10, (4, 8), generator=g), torch.randint(0, 10, (4, 8), generator=g)
    steps = []
    for scaled in (False, True):
        model = tiny_step_model()
        before = [p.detach().clone() for p in model.parameters()]
        scaler = hardware.LossScaler("cpu", enabled=scaled)
        train_mod.train_step(model, torch.optim.SGD(model.parameters(), lr=1.0), scaler, [(x, y, {})],
                             contextlib.nullcontext(), grad_clip=0.01)
        steps.append(torch.cat([(p.detach() - b).flatten() for p, b in zip(model.parameters(), before)]))
    assert steps[0].norm().item() == pytest.approx(0.01, rel=1e-3)  # clipped: the true norm is far above 0.01
    torch.testing.assert_close(steps[1], steps[0], rtol=1e-4, atol=1e-8)


def test_exact_resume_is_bit_for_bit(tiny_flags, tmp_path):
    # dropout on, so the resumed run also needs the saved RNG state to draw the same masks
    common = tiny_flags + ["--dropout=0.1", "--eval_interval=2", "--lr_decay_iters=10"]
    run(common + ["--max_iters=10", f"--out_dir={tmp_path / 'full'}"])
    run(common + ["--max_iters=4", f"--out_dir={tmp_path / 'split'}"])
    run(common + ["--max_iters=10", f"--out_dir={tmp_path / 'split'}", "--init_from=resume"])
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    for it in (4, 6, 8, 10):
        assert split[it]["train_loss"] == full[it]["train_loss"]
        assert split[it]["val_loss"] == full[it]["val_loss"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_signal_mid_run_saves_and_resumes_exactly(tiny_flags, tmp_path, monkeypatch, capsys):
    common = tiny_flags + ["--dropout=0.1", "--eval_interval=4", "--max_iters=9"]
    run(common + [f"--out_dir={tmp_path / 'full'}"])

    real_get_lr = train_mod.get_lr

    def get_lr_then_interrupt(it, cfg):  # Ctrl-C arrives while step 5 runs
        if it == 5:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_lr(it, cfg)

    handler = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN in a background job
    monkeypatch.setattr(train_mod, "get_lr", get_lr_then_interrupt)
    with pytest.raises(SystemExit) as exc:
        run(common + [f"--out_dir={tmp_path / 'split'}"])
    assert exc.value.code == 128 + signal.SIGINT
    assert "--init_from=resume" in capsys.readouterr().out
    assert read_checkpoint(tmp_path / "split" / "ckpt.pt")["iter_num"] == 6  # the step finished, then saved
    monkeypatch.setattr(train_mod, "get_lr", real_get_lr)
    assert signal.getsignal(signal.SIGINT) is handler  # handlers restored

    run(common + [f"--out_dir={tmp_path / 'split'}", "--init_from=resume"])
    full, split = metrics(tmp_path / "full"), metrics(tmp_path / "split")
    assert split[8]["val_loss"] == full[8]["val_loss"] and split[9]["val_loss"] == full[9]["val_loss"]
    a, b = weights(tmp_path / "full"), weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigint_subprocess_exits_cleanly_with_resume_hint(tiny_flags, tmp_path):
    proc = subprocess.Popen([sys.executable, "train.py", *tiny_flags, "--max_iters=100000", "--eval_interval=1000"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in proc.stdout:  # wait until training steps are running
        if line.startswith("step"):
            break
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert "SIGINT: saved" in out and "--init_from=resume" in out
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] >= 1


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tiny_flags, tmp_path, monkeypatch, capsys):
    run(tiny_flags + ["--max_iters=5"])
    good = (tmp_path / "out" / "ckpt.pt").read_bytes()
    real_forward = GPT.forward

    def nan_forward(self, idx, targets=None, kv_cache=None):
        logits, loss = real_forward(self, idx, targets, kv_cache)
        return logits, (loss * float("nan") if self.training and loss is not None else loss)

    monkeypatch.setattr(GPT, "forward", nan_forward)
    err = run_main_error(tiny_flags + ["--max_iters=10", "--init_from=resume"], capsys)
    assert "loss is nan at step 6" in err and "diverged" in err
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == good


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "ckpt.pt"
    checkpoint.save(path, {"format_version": 1, "x": torch.ones(3)})

    def dies_halfway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(Exception, match="No space left"):
        checkpoint.save(path, {"format_version": 1, "x": torch.zeros(3)})
    monkeypatch.undo()
    assert torch.equal(torch.load(path, weights_only=True)["x"], torch.ones(3))
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


# ---- bad input: one line, exit 1, nothing overwritten --------------------------------------------------------

def test_unknown_key_and_wrong_type(capsys, tmp_path):
    assert "did you mean 'n_layer'" in run_main_error(["--n_layr=4"], capsys)
    assert "expected int" in run_main_error(["--n_layer=1.5"], capsys)
    assert "must be a positive integer or 'auto'" in run_main_error(["--batch_size=1.5"], capsys)
    assert "expected bool" in run_main_error(["--progress=1"], capsys)
    assert "use True, False or 'auto'" in run_main_error(["--compile=1"], capsys)
    cfg_file = tmp_path / "bad.py"
    cfg_file.write_text("learning_rate = 1e-3\nmax_itres = 10\n")
    err = run_main_error([str(cfg_file)], capsys)
    assert "max_itres" in err and "did you mean 'max_iters'" in err
    assert "does not exist" in run_main_error([str(tmp_path / "missing.py")], capsys)


def test_missing_dataset_names_the_prepare_script(tmp_path, capsys):
    (tmp_path / "shakespeare_char").mkdir()
    (tmp_path / "shakespeare_char" / "train.bin").write_bytes(b"\0\0" * 100)
    err = run_main_error([f"--data_root={tmp_path}", f"--out_dir={tmp_path / 'o'}"], capsys)
    assert "val.bin is missing" in err and "python prepare/shakespeare_char.py" in err
    err = run_main_error([f"--data_root={tmp_path}", "--dataset=nothing_here"], capsys)
    assert "nothing_here/train.bin is missing" in err


def make_dataset(root, name, ids, vocab_size):
    d = root / name
    d.mkdir(parents=True)
    np.asarray(ids, dtype=np.uint16).tofile(d / "train.bin")
    np.asarray(ids, dtype=np.uint16).tofile(d / "val.bin")
    chars = "".join(chr(65 + i) for i in range(vocab_size))
    (d / "meta.json").write_text(json.dumps({"tokenizer": "char", "vocab_size": vocab_size, "chars": chars,
                                             "dtype": "uint16"}))


def test_dataset_too_short_and_token_beyond_vocab(tmp_path, capsys):
    make_dataset(tmp_path, "short", list(range(10)) * 3, 10)
    err = run_main_error([f"--data_root={tmp_path}", "--dataset=short", "--block_size=64"], capsys)
    assert "fewer than block_size + 1 = 65" in err
    make_dataset(tmp_path, "badvocab", [0, 1, 2, 12] * 50, 10)
    err = run_main_error([f"--data_root={tmp_path}", "--dataset=badvocab", "--block_size=8"], capsys)
    assert "token id 12" in err and "vocab_size=10" in err


def test_resume_with_other_shape_is_refused(tiny_flags, tmp_path, capsys):
    run(tiny_flags + ["--max_iters=2"])
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()
    err = run_main_error(tiny_flags + ["--init_from=resume", "--n_layer=3"], capsys)
    assert "n_layer=2" in err and "n_layer=3" in err
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_corrupt_checkpoint_and_no_overwrite(tiny_flags, tmp_path, capsys):
    run(tiny_flags + ["--max_iters=2"])
    ckpt = tmp_path / "out" / "ckpt.pt"
    before = ckpt.read_bytes()
    assert "already exists" in run_main_error(tiny_flags + ["--max_iters=2"], capsys)  # a new run would clobber it
    assert ckpt.read_bytes() == before
    ckpt.write_bytes(before[: len(before) // 2])
    assert "corrupt or truncated" in run_main_error(tiny_flags + ["--init_from=resume"], capsys)


def test_finetune_from_gpt2_directory_then_resume(gpt2_setup, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    root = gpt2_setup  # root/gpt2: a tiny random GPT-2 directory; root/data/bpe: tiny-shakespeare in GPT-2 BPE
    hf = transformers.GPT2LMHeadModel.from_pretrained(root / "gpt2")
    flags = [f"--data_root={root / 'data'}", "--dataset=bpe", f"--out_dir={tmp_path / 'out'}", "--device=cpu",
             "--block_size=32", "--batch_size=4", "--eval_interval=2", "--eval_iters=2", "--progress=False",
             "--sample_tokens=5", "--learning_rate=1e-3", "--warmup_iters=0", "--lr_decay_iters=6"]
    run(flags + [f"--init_from={root / 'gpt2'}", "--max_iters=4"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["model_config"]["n_embd"] == 32 and ckpt["model_config"]["block_size"] == 32  # cropped from 64
    assert ckpt["init_source"] == str(root / "gpt2")
    # the step-0 evaluation scored the GPT-2 weights themselves: recompute it with transformers
    first = metrics(tmp_path / "out")[0]
    val = np.memmap(root / "data" / "bpe" / "val.bin", dtype=np.uint16, mode="r")
    gen = torch.Generator().manual_seed(1337 + 2)  # estimate_loss's generator for the val split
    hf.eval()
    with torch.no_grad():
        losses = []
        for _ in range(2):
            x, y = get_batch(val, 4, 32, gen, "cpu")
            losses.append(hf(x, labels=None).logits.flatten(0, 1).log_softmax(-1).gather(1, y.reshape(-1, 1))
                          .mean().neg().item())
    assert first["val_loss"] == pytest.approx(sum(losses) / 2, abs=1e-4)
    # resuming needs no shape flags: the checkpoint says it came from GPT-2 weights (TrainConfig says n_layer=12)
    run(flags + ["--init_from=resume", "--max_iters=6"])
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 6
    # a longer context than the weights have, and a start point that does not exist: refused
    err = run_main_error([f"--init_from={root / 'gpt2'}", f"--data_root={root / 'data'}", "--dataset=bpe",
                          f"--out_dir={tmp_path / 'o2'}", "--block_size=128", "--device=cpu"], capsys)
    assert "block_size=128 is longer than the 64 positions" in err
    assert "is not 'scratch', 'resume' or an existing path" in run_main_error(["--init_from=scratc"], capsys)


def test_attention_backend_switch(capsys):
    assert "attn_backend='fast' is unknown" in run_main_error(["--attn_backend=fast"], capsys)
    b = torch.backends.cuda
    flags = lambda: (b.flash_sdp_enabled(), b.cudnn_sdp_enabled(), b.mem_efficient_sdp_enabled(),  # noqa: E731
                     b.math_sdp_enabled())
    before = flags()
    try:
        hardware.set_attention_backend("cudnn")
        assert flags() == (False, True, False, True)  # only cuDNN, with math as the fallback for masked calls
        hardware.set_attention_backend("flash")
        assert flags() == (True, False, False, True)
        hardware.set_attention_backend("auto")  # leaves PyTorch's choice alone
        assert flags() == (True, False, False, True)
    finally:
        b.enable_flash_sdp(before[0]), b.enable_cudnn_sdp(before[1]), b.enable_mem_efficient_sdp(before[2])


# ---- review follow-ups: resume bookkeeping, best-only interrupts, auto-prepare, optimizer groups ---------------

def interrupt_at(monkeypatch, step):
    real_get_lr = train_mod.get_lr

    def get_lr_then_interrupt(it, cfg):
        if it == step:
            os.kill(os.getpid(), signal.SIGINT)
        return real_get_lr(it, cfg)

    monkeypatch.setattr(train_mod, "get_lr", get_lr_then_interrupt)


def test_interrupt_in_last_step_still_gets_final_eval(tiny_flags, tmp_path, monkeypatch):
    common = tiny_flags + ["--eval_interval=4", "--max_iters=6"]
    interrupt_at(monkeypatch, 5)
    with pytest.raises(SystemExit):
        run(common)
    monkeypatch.undo()
    run(common + ["--init_from=resume"])
    assert sorted(metrics(tmp_path / "out")) == [0, 4, 6]  # no repeat of 4, and the final evaluation happened


def test_best_only_interrupt_keeps_best_checkpoint(tiny_flags, tmp_path, monkeypatch):
    common = tiny_flags + ["--always_save_checkpoint=False", "--eval_interval=4", "--max_iters=9", "--dropout=0.1"]
    run(common + [f"--out_dir={tmp_path / 'full'}"])
    interrupt_at(monkeypatch, 6)
    with pytest.raises(SystemExit):
        run(common)
    monkeypatch.undo()
    out = tmp_path / "out"
    assert read_checkpoint(out / "ckpt.pt")["iter_num"] == 4  # the best model (step 4) is untouched
    assert read_checkpoint(out / "last.pt")["iter_num"] == 7  # the resume point
    run(common + ["--init_from=resume"])
    assert not (out / "last.pt").exists()
    a, b = weights(tmp_path / "full"), weights(out)  # both hold their best checkpoint: the same one
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert metrics(out)[9]["val_loss"] == metrics(tmp_path / "full")[9]["val_loss"]


def test_best_only_saves_on_improvement_and_metrics_are_cut_on_resume(tiny_flags, tmp_path, monkeypatch):
    vals = iter([3.0, 2.0, 2.5, 1.5, 9.9])  # val losses of the evaluations at steps 0, 2, 4, 6, then resumed 4

    def fake_estimate_loss(model, splits, cfg, ctx, d=None):
        return {"train_loss": 1.0, "val_loss": next(vals)}

    monkeypatch.setattr(batches, "estimate_loss", fake_estimate_loss)
    saved = []
    real_save = checkpoint.save
    monkeypatch.setattr(checkpoint, "save", lambda p, s: (saved.append(s["iter_num"]), real_save(p, s)))
    flags = tiny_flags + ["--always_save_checkpoint=False", "--eval_interval=2", "--max_iters=6"]
    run(flags)
    assert saved == [0, 2, 6]  # not 4, where val got worse
    # a run resumed from an older best checkpoint drops the evaluations made after it
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    ckpt["iter_num"] = ckpt["last_eval_iter"] = 2
    real_save(tmp_path / "out" / "ckpt.pt", ckpt)
    run(flags + ["--init_from=resume", "--max_iters=4"])
    assert sorted(metrics(tmp_path / "out")) == [0, 2, 4]
    assert metrics(tmp_path / "out")[4]["val_loss"] == 9.9


@pytest.mark.parametrize("always_save", [True, False])
def test_the_last_line_names_the_best_and_the_last_checkpoint(tiny_flags, tmp_path, monkeypatch, capsys, always_save):
    vals = iter([3.0, 2.0, 2.5])  # val losses at steps 0, 2, 4: the best is not the last
    monkeypatch.setattr(batches, "estimate_loss", lambda *a, **k: {"train_loss": 1.0, "val_loss": next(vals)})
    run(tiny_flags + [f"--always_save_checkpoint={always_save}", "--eval_interval=2", "--max_iters=4"])
    out = tmp_path / "out"
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert read_checkpoint(out / "best.pt")["iter_num"] == 2 and read_checkpoint(out / "best.pt")["best_iter"] == 2
    if always_save:  # ckpt.pt is the last step (where a resume continues); best.pt the best evaluation
        assert read_checkpoint(out / "ckpt.pt")["iter_num"] == 4
        assert last_line.endswith(f"best val loss 2.0000 (step 2): {out / 'best.pt'}; the last step (4): "
                                  f"{out / 'ckpt.pt'}")
    else:  # ckpt.pt is the best, and best.pt the same file on disk (a hard link: no second write)
        assert os.path.samefile(out / "ckpt.pt", out / "best.pt")
        assert last_line.endswith(f"best val loss 2.0000 (step 2): {out / 'ckpt.pt'} (also best.pt); the last "
                                  f"step (4) was not saved (always_save_checkpoint=False)")
    # a start point named best.pt in its own out_dir would be overwritten: refused
    err = run_main_error(tiny_flags + [f"--init_from={out / 'best.pt'}", "--overwrite=True"], capsys)
    assert "is this run's own checkpoint" in err


def test_logged_loss_is_a_plain_mean_across_evaluations(tiny_flags, capsys):
    run(tiny_flags + ["--learning_rate=0", "--min_lr=0", "--eval_interval=5", "--log_interval=4", "--max_iters=12"])
    losses = [float(line.split("| loss ")[1].split()[0]) for line in capsys.readouterr().out.splitlines()
              if line.startswith("step")]
    assert len(losses) == 3 and max(losses) - min(losses) < 0.2  # lr 0: the loss cannot move


def test_resume_float32_checkpoint_in_float16(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=2"])
    run(tiny_flags + ["--max_iters=3", "--init_from=resume", "--dtype=float16"])  # the scaler starts fresh
    assert read_checkpoint(tmp_path / "out" / "ckpt.pt")["iter_num"] == 3


def test_auto_prepare_from_local_input(tmp_path):
    from conftest import SHAKESPEARE
    run([f"--data_root={tmp_path / 'data'}", f"--data_input={SHAKESPEARE}", f"--out_dir={tmp_path / 'out'}",
         "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2", "--max_iters=1",
         "--eval_iters=1", "--progress=False", "--sample_tokens=0", "--device=cpu"])
    meta = json.loads((tmp_path / "data" / "shakespeare_char" / "meta.json").read_text())
    assert meta["vocab_size"] == 65 and meta["train_tokens"] == 1_003_854


def test_auto_prepare_with_paths_relative_to_the_users_folder(tmp_path):
    """The prepare script runs from the repository, but --data_root and --data_input mean the user's folder."""
    from conftest import SHAKESPEARE
    (tmp_path / "in.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:50_000], encoding="utf-8")
    res = subprocess.run([sys.executable, str(REPO / "train.py"), "--data_root=d", "--data_input=in.txt",
                          "--out_dir=o", "--n_layer=1", "--n_head=2", "--n_embd=16", "--block_size=16", "--batch_size=2",
                          "--max_iters=1", "--eval_iters=1", "--progress=False", "--sample_tokens=0", "--device=cpu"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert (tmp_path / "d" / "shakespeare_char" / "train.bin").is_file() and (tmp_path / "o" / "ckpt.pt").is_file()


def test_optimizer_groups_and_grad_clip(tiny_flags, tmp_path):
    cfg = TrainConfig(weight_decay=0.1)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=10))
    decay, no_decay = train_mod.make_optimizer(model, cfg, "cpu").param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decay["params"]) and all(p.dim() == 1 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    run(tiny_flags + ["--max_iters=2", "--grad_clip=0", f"--out_dir={tmp_path / 'a'}"])
    run(tiny_flags + ["--max_iters=2", "--grad_clip=1e-4", f"--out_dir={tmp_path / 'b'}"])
    a, b = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert any(not torch.allclose(a[k], b[k]) for k in a)


@pytest.mark.parametrize("flags, message", [
    (["--n_head=3", "--n_embd=32"], "not divisible by n_head=3"),
    (["--learning_rate=-1"], "learning_rate=-1.0 must not be negative"),
    (["--beta2=1.5"], "beta2=1.5 must be in [0, 1)"),
    (["--device=mps"], "MPS (Apple GPU) is not available"),
    (["--device=cuda:0"], "sees no CUDA GPU"),
    (["--device=tpu"], "device='tpu' is unknown"),
    (["--dtype=fp16"], "dtype='fp16' is unknown"),
    (["--dataset=common"], "common/train.bin is missing: prepare it first"),
])
def test_bad_values_one_line(tiny_flags, tmp_path, capsys, flags, message):
    assert message in run_main_error(tiny_flags + flags, capsys)


def test_broken_meta_fails_before_training(char_data, tmp_path, capsys):
    import shutil
    shutil.copytree(char_data / "tiny", tmp_path / "d")
    meta = json.loads((tmp_path / "d" / "meta.json").read_text())
    for change, message in [({"chars": None}, "needs 'chars'"), ({"dtype": "uint8"}, "dtype='uint8'"),
                            ({"vocab_size": "65"}, "not a positive integer")]:
        (tmp_path / "d" / "meta.json").write_text(json.dumps({**meta, **change}))
        assert message in run_main_error([f"--data_root={tmp_path}", "--dataset=d", "--device=cpu",
                                          f"--out_dir={tmp_path / 'o'}"], capsys)
    assert not (tmp_path / "o").exists()


def test_config_file_that_fails(tmp_path, capsys):
    bad = tmp_path / "bad.py"
    bad.write_text("n_layer = 1 +\n")
    err = run_main_error([str(bad)], capsys)
    assert err.startswith(f"error: config file {bad} failed: SyntaxError")
    bad.write_text("n_layer = 1 / 0\n")
    assert "ZeroDivisionError" in run_main_error([str(bad)], capsys)


def test_cuda_graphs_need_cuda(tiny_flags, capsys):
    assert "cuda_graphs=True needs device cuda" in run_main_error(tiny_flags + ["--cuda_graphs=True"], capsys)
    assert "cuda_graphs='yes' is unknown" in run_main_error(tiny_flags + ["--cuda_graphs=yes"], capsys)
    cfg = load_config(TrainConfig, tiny_flags + ["--cuda_graphs=auto"])
    checks.resolve(cfg)
    assert cfg.cuda_graphs is False  # auto on a CPU: off


def test_vocab_padding_run_and_resume(tiny_flags, tmp_path, capsys):
    """A run padded on a GPU ("auto") resumes on the CPU (auto: 1): the checkpoint's padding rows are kept, since they
    are no token; quietly when the setting was left at "auto", with one warning line when it was set."""
    run(tiny_flags + ["--max_iters=2", "--vocab_pad_multiple=64"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    rows, vocab = ckpt["model"]["transformer.wte.weight"].shape[0], ckpt["model_config"]["vocab_size"]
    assert rows % 64 == 0 and vocab < rows < vocab + 64
    capsys.readouterr()
    run(tiny_flags + ["--max_iters=3", "--init_from=resume"])
    assert "vocab_pad_multiple=1 is ignored" not in capsys.readouterr().out  # "auto" resolved to 1: nothing was asked
    run(tiny_flags + ["--max_iters=4", "--init_from=resume", "--vocab_pad_multiple=8"])
    assert "warning: vocab_pad_multiple=8 is ignored" in capsys.readouterr().out
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["iter_num"] == 4 and ckpt["model"]["transformer.wte.weight"].shape[0] == rows
    assert ckpt["train_config"]["vocab_pad_multiple"] == 64


def resolved(flags, device_type="cpu", env=None):
    """A config resolved by train.py's checks as on device_type: a CUDA device is pretended (resolve_device
    replaced), so what "auto" becomes there is tested without a GPU."""
    import unittest.mock as mock
    cfg = load_config(TrainConfig, flags)
    device = "cuda" if device_type == "cuda" else "cpu"
    dtype = "bfloat16" if cfg.dtype == "auto" and device == "cuda" else "float32" if cfg.dtype == "auto" else cfg.dtype
    fake = mock.patch.object(checks, "resolve_device", lambda d, t: (device if d == "auto" else d, device_type, dtype))
    with fake, mock.patch.dict("os.environ", env or {}):
        checks.resolve(cfg)
    return cfg


def test_auto_defaults_per_device(tiny_flags, capsys):
    """The CUDA defaults: compile, a CUDA graph per step and vocabulary padding; on the CPU the old values."""
    flags = [f for f in tiny_flags if not f.startswith(("--device", "--compile"))]
    cpu = resolved(flags + ["--device=cpu"])
    assert (cpu.compile, cpu.cuda_graphs, cpu.vocab_pad_multiple) == (False, False, 1)
    assert capsys.readouterr().out == ""  # no note on the CPU
    cuda = resolved(flags, "cuda")
    assert (cuda.device, cuda.dtype, cuda.compile, cuda.cuda_graphs, cuda.vocab_pad_multiple) == \
        ("cuda", "bfloat16", True, True, 64)
    assert capsys.readouterr().out == ""
    explicit = resolved(flags + ["--vocab_pad_multiple=8", "--compile=False", "--cuda_graphs=False"], "cuda")
    assert (explicit.compile, explicit.cuda_graphs, explicit.vocab_pad_multiple) == (False, False, 8)
    assert resolved(flags + ["--compile=False"], "cuda").cuda_graphs is True  # graphs pay without compile too


@pytest.mark.parametrize("switch, need", [
    (["--dtype=float16"], "bfloat16 or float32"), (["--optim_state=int8"], "optim_state 'fp32'"),
    (["--seq_warmup_iters=10", "--block_size=64"], "no seq_warmup_iters"), (["--spike_guard=True"], "no spike_guard"),
    (["--device=cuda:1"], "device cuda or cuda:0"), ([], "not torchrun")])
def test_cuda_graphs_auto_steps_aside_but_true_is_an_error(tiny_flags, capsys, switch, need):
    """Where a graph cannot record the step, the default ("auto") turns it off with one note line; an explicit
    True stops the run with one error line."""
    flags = [f for f in tiny_flags if not f.startswith(("--device", "--compile"))] + switch
    env = {"RANK": "0"} if not switch else None
    cfg = resolved(flags, "cuda", env)
    assert cfg.cuda_graphs is False
    note = capsys.readouterr().out.strip()
    assert note.startswith("note: cuda_graphs='auto' is off") and need in note and "\n" not in note
    with pytest.raises(UserError, match=f"cuda_graphs=True needs .*{re.escape(need)}"):
        resolved(flags + ["--cuda_graphs=True"], "cuda", env)
