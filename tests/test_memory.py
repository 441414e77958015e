"""Memory savers on the CPU: gradient checkpointing computes the same function, lean optimizer states and
low-precision frozen bases train and resume exactly, the micro-batch search, the out-of-memory message, and the
memory estimate and report."""


import numpy as np
import pytest
import torch

from sologpt import build, checks, memory, quantize
from sologpt.batches import Windows
import train as train_mod
from sologpt.configurator import load_config
from conftest import assert_resume_is_exact
from model import GPT, GPTConfig
from sologpt.checkpoint import read as read_checkpoint
from sologpt.rundir import read_metrics


def run(flags):
    return train_mod.train(load_config(train_mod.TrainConfig, flags))


@pytest.mark.parametrize("every, checkpointed", [(1, 3), (2, 2)])
def test_grad_checkpointing_same_loss_and_gradients(every, checkpointed, monkeypatch):
    shape = dict(n_layer=3, n_head=2, n_embd=32, block_size=16, vocab_size=64, dropout=0.0)
    torch.manual_seed(0)
    model = GPT(GPTConfig(**shape))
    ckpt_model = GPT(GPTConfig(**shape, grad_checkpointing=every))  # GPTConfig decides the blocks' class
    ckpt_model.load_state_dict(model.state_dict())
    real, calls = torch.utils.checkpoint.checkpoint, []
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, y = torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))
    _, loss0 = model(x, y)
    loss0.backward()
    assert calls == []
    _, loss1 = ckpt_model(x, y)
    loss1.backward()
    assert len(calls) == checkpointed  # blocks 0, 1, 2 (every=1) or 0 and 2 (every=2) recompute in backward
    assert torch.equal(loss0, loss1)
    for p0, p in zip(model.parameters(), ckpt_model.parameters()):
        torch.testing.assert_close(p.grad, p0.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation keeps nothing for backward: no recomputation set up
        ckpt_model(x, y)
    assert len(calls) == checkpointed


def test_checkpointed_run_matches_plain_run(tiny_flags, tmp_path):
    run(tiny_flags + ["--max_iters=4"])
    plain = read_checkpoint(tmp_path / "out" / "ckpt.pt")["model"]
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'ck'}" for f in tiny_flags]
    run(flags + ["--max_iters=4", "--grad_checkpointing=1"])
    ck = read_checkpoint(tmp_path / "ck" / "ckpt.pt")["model"]
    for k in plain:
        torch.testing.assert_close(ck[k], plain[k], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("state", ["bf16", "int8"])
def test_lean_optimizer_states_train_and_resume_exactly(tiny_flags, tmp_path, state):
    assert_resume_is_exact(tiny_flags + [f"--optim_state={state}", "--lr_decay_iters=8"], tmp_path)


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory, char_data):
    """A tiny random GPT-2 with a 65-token vocabulary, saved as our own checkpoint file (a start point)."""
    root = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    flags = [f"--data_root={char_data}", "--dataset=tiny", f"--out_dir={root}", "--device=cpu", "--n_layer=2",
             "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=10", "--eval_iters=1",
             "--progress=False", "--sample_tokens=0", "--learning_rate=3e-3"]
    run(flags)
    return root / "ckpt.pt"


@pytest.mark.parametrize("base_dtype, dtype", [("int8", "float32"), ("bf16", "bfloat16")])
def test_lora_on_a_low_precision_base(tiny_flags, tmp_path, gpt2_dir, base_dtype, dtype):
    flags = tiny_flags + [f"--init_from={gpt2_dir}", "--lora_rank=4", "--lora_targets=all", f"--dtype={dtype}",
                          f"--base_dtype={base_dtype}", "--lr_decay_iters=6"]
    run(flags + ["--max_iters=6"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["train_config"]["base_dtype"] == base_dtype
    first, last = read_metrics(tmp_path / "out")[::2]
    assert last["val_loss"] < first["val_loss"]
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'r'}" for f in flags]
    run(other + ["--max_iters=3"])
    run(other + ["--max_iters=6", "--init_from=resume"])
    resumed = read_checkpoint(tmp_path / "r" / "ckpt.pt")
    for k, v in ckpt["adapter"]["adapter"].items():
        assert torch.equal(resumed["adapter"]["adapter"][k], v), k


def test_lower_frozen_weights_bytes_and_outputs():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    ref = model(x)[0]
    model.transformer.h[0].requires_grad_(False)
    assert memory.lower_frozen_weights(model, "int8") == 4  # the 4 Linear layers of the frozen block
    assert isinstance(model.transformer.h[0].mlp.c_fc, quantize.Int8Linear)
    assert type(model.transformer.h[1].mlp.c_fc) is torch.nn.Linear  # trainable: untouched
    torch.testing.assert_close(model(x)[0], ref, rtol=0.05, atol=0.05)


def test_find_micro_batch_backs_off_on_out_of_memory():
    tried = []

    def try_step(b):
        tried.append(b)
        if b > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")

    assert memory.find_micro_batch(try_step, limit=1024) == 37
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64]
    assert memory.find_micro_batch(lambda b: None, limit=24) == 24
    assert memory.find_micro_batch(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError()), limit=8) == 0


def test_auto_batch_keeps_sequences_per_step(monkeypatch, capsys):
    real = memory.find_micro_batch
    monkeypatch.setattr(memory, "find_micro_batch", lambda try_step, limit: min(real(try_step, limit=limit), 3))
    cfg = train_mod.TrainConfig(device="cpu", block_size=16, batch_size="auto", auto_batch_sequences=8)
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32))
    source = Windows(np.arange(200, dtype=np.uint16) % 32, cfg, torch.Generator().manual_seed(0))
    micro, accum = memory.auto_batch_size(model, model, source, cfg, torch.autocast("cpu", enabled=False))
    assert (micro, accum) == (3, 3) == (cfg.batch_size, cfg.gradient_accumulation_steps)  # 8 sequences: 3 x 3
    assert "largest micro-batch that fits is 3" in capsys.readouterr().out
    assert all(p.grad is None for p in model.parameters())  # the probes leave nothing behind


def test_auto_batch_needs_cuda(tiny_flags, capsys):
    with pytest.raises(SystemExit):
        train_mod.main([f for f in tiny_flags if not f.startswith("--batch_size")] + ["--batch_size=auto"])
    assert "needs a CUDA GPU" in capsys.readouterr().err


def test_out_of_memory_is_one_clear_line_and_keeps_the_checkpoint(tiny_flags, tmp_path, monkeypatch, capsys):
    run(tiny_flags + ["--max_iters=2"])
    before = (tmp_path / "out" / "ckpt.pt").read_bytes()

    def oom(self, *args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(GPT, "forward", oom)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        train_mod.main(tiny_flags + ["--max_iters=4", "--init_from=resume", "--eval_interval=100"])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "out of memory at micro-batch 8 x block_size 32" in err
    assert "grad_checkpointing=1" in err and "optim_state='int8'" in err
    assert (tmp_path / "out" / "ckpt.pt").read_bytes() == before


def test_memory_estimate_and_report(tiny_flags, tmp_path, capsys):
    run(tiny_flags + ["--max_iters=2", "--optim_state=int8"])
    out = capsys.readouterr().out
    assert "memory estimate: weights" in out and "optimizer" in out
    m = read_metrics(tmp_path / "out")[-1]
    assert m["peak_alloc_gib"] > 0 and m["peak_reserved_gib"] >= m["peak_alloc_gib"]
    cfg = load_config(train_mod.TrainConfig, ["--n_layer=2", "--n_embd=32", "--n_head=2", "--block_size=16",
                                              "--batch_size=2", "--device=cpu"])
    checks.resolve(cfg)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=64))
    full, _ = memory.estimate(model, cfg)
    cfg.optim_state, cfg.grad_checkpointing = "int8", 1
    lean, _ = memory.estimate(model, cfg)
    assert lean["optimizer"] == full["optimizer"] / 4 and lean["activations"] < full["activations"]


@pytest.mark.parametrize("flags, message", [
    (["--optim_state=fp16"], "optim_state='fp16' is unknown"),
    (["--base_dtype=bf16"], "applies to frozen weights"),
    (["--freeze_layers=1", "--base_dtype=bf16"], "needs 16-bit autocast"),
    (["--grad_checkpointing=-1"], "must not be negative"),
])
def test_memory_switch_errors(tiny_flags, capsys, flags, message):
    with pytest.raises(SystemExit):
        train_mod.main(tiny_flags + flags)
    assert message in capsys.readouterr().err


def test_float16_skipped_steps_are_counted_and_logged(tiny_flags, tmp_path, monkeypatch, capsys):
    real_freeze = build.freeze
    calls = {"n": 0}

    def freeze_and_poison(model, *args):  # the 3rd backward overflows, as a too-large loss scale would
        def hook(grad):
            calls["n"] += 1
            return grad * float("inf") if calls["n"] == 3 else grad
        model.transformer.ln_f.weight.register_hook(hook)
        return real_freeze(model, *args)

    monkeypatch.setattr(build, "freeze", freeze_and_poison)
    run(tiny_flags + ["--max_iters=5", "--dtype=float16", "--eval_interval=5"])
    out = capsys.readouterr().out
    assert "1 skipped steps" in out
    last = read_metrics(tmp_path / "out")[-1]
    assert last["skipped_steps"] == 1 and last["loss_scale"] == 65536.0 / 2
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["scaler"]["scale"] == 65536.0 / 2  # the scaler's state is in the checkpoint
    assert ckpt["skipped_steps"] == 1
    run(tiny_flags + ["--max_iters=10", "--dtype=float16", "--eval_interval=5", "--init_from=resume"])
    last = read_metrics(tmp_path / "out")[-1]
    assert last["skipped_steps"] == 1  # counted across the resume, not restarted
