"""sologpt/distill.py: the loss against hand-written formulas, load_teacher's checks, a toy student learning a
teacher, the Distill wrapper (the mixed loss in training, the student's own in evaluation, the teacher kept in
eval mode), and distillation in train.py runs."""

import pytest
import torch
import torch.nn.functional as F

import train as train_mod
from conftest import run_train as run
from model import GPT, GPTConfig
from sologpt import checkpoint, hf_gpt2
from sologpt.checkpoint import FORMAT_VERSION as CKPT_FORMAT_VERSION, read as read_checkpoint
from sologpt.distill import Distill, distill_loss, load_teacher


def logits_and_targets(B=3, T=5, V=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g) * 2
    t = torch.randn(B, T, V, generator=g) * 2
    y = torch.randint(0, V, (B, T), generator=g)
    return s, t, y


def manual_kl(s, t, T):
    """Mean over tokens of sum_v p_t log(p_t / p_s), written out."""
    pt = torch.softmax(t / T, -1)
    return (pt * (torch.log(pt) - torch.log_softmax(s / T, -1))).sum(-1).mean()


def test_alpha_zero_is_plain_cross_entropy():
    s, t, y = logits_and_targets()
    loss, parts = distill_loss(s, t, y, alpha=0.0, temperature=3.0)
    ce = F.cross_entropy(s.view(-1, 11), y.view(-1))
    assert torch.allclose(loss, ce) and torch.allclose(parts["ce"], ce)


def test_kl_is_zero_when_student_equals_teacher():
    s, _, y = logits_and_targets()
    loss, parts = distill_loss(s, s.clone(), y, alpha=1.0, temperature=2.0)
    assert abs(loss.item()) < 1e-6 and abs(parts["kl"].item()) < 1e-6
    loss, _ = distill_loss(s, s + 5.0, y, alpha=1.0, temperature=2.0)  # a shift per token changes no probability
    assert abs(loss.item()) < 1e-5


def test_t_squared_scaling_and_bf16_inputs():
    s, t, y = logits_and_targets()
    for T in (1.0, 2.0, 5.0):
        loss, parts = distill_loss(s, t, y, alpha=1.0, temperature=T)
        assert torch.allclose(parts["kl"], manual_kl(s, t, T), atol=1e-6)
        assert torch.allclose(loss, T**2 * manual_kl(s, t, T), atol=1e-5)
    # why T^2 (Hinton et al. 2015): at high temperature the gradient of the KL falls as 1 / T^2; scaled, it does not
    small_s, small_t = s / 10, t / 10

    def grad_norm(T):
        x = small_s.clone().requires_grad_(True)
        distill_loss(x, small_t, y, alpha=1.0, temperature=T)[0].backward()
        return x.grad.norm().item()
    assert grad_norm(20.0) == pytest.approx(grad_norm(10.0), rel=0.02)
    loss, _ = distill_loss(s.bfloat16(), t.bfloat16(), y, alpha=0.5, temperature=2.0)
    assert loss.dtype == torch.float32


def test_gradient_matches_the_formula():
    s, t, y = logits_and_targets()
    alpha, T = 0.3, 2.5
    x = s.clone().requires_grad_(True)
    distill_loss(x, t, y, alpha=alpha, temperature=T)[0].backward()
    N, V = 15, 11
    # d/ds [T^2 KL(pt || ps)] = T (ps - pt) per token; d/ds CE = softmax(s) - onehot(y); both averaged over N tokens
    want = (alpha * T * (torch.softmax(s / T, -1) - torch.softmax(t / T, -1))
            + (1 - alpha) * (torch.softmax(s, -1) - F.one_hot(y, V).float())) / N
    assert torch.allclose(x.grad, want, atol=1e-6)
    tt = t.clone().requires_grad_(True)  # the teacher is a fixed target: no gradient reaches it
    distill_loss(s.requires_grad_(True), tt, y, alpha=alpha, temperature=T)[0].backward()
    assert tt.grad is None


def test_ignored_positions_are_excluded():
    s, t, y = logits_and_targets()
    y[0, :3] = -1
    y[2, 4] = -1
    keep = (y != -1).view(-1)
    loss, parts = distill_loss(s, t, y, alpha=0.6, temperature=2.0)
    s2, t2, y2 = s.view(-1, 11)[keep][None], t.view(-1, 11)[keep][None], y.view(-1)[keep][None]  # (1, 11, V)
    want, want_parts = distill_loss(s2, t2, y2, alpha=0.6, temperature=2.0)
    assert torch.allclose(loss, want) and torch.allclose(parts["kl"], want_parts["kl"])
    assert torch.allclose(parts["kl"], manual_kl(s2, t2, 2.0))


def test_bad_arguments():
    s, t, y = logits_and_targets()
    with pytest.raises(ValueError, match="alpha=1.5"):
        distill_loss(s, t, y, alpha=1.5, temperature=1.0)
    with pytest.raises(ValueError, match="temperature=0"):
        distill_loss(s, t, y, alpha=0.5, temperature=0)
    with pytest.raises(ValueError, match="share a tokenizer"):
        distill_loss(s, t[..., :10], y, alpha=0.5, temperature=1.0)


def save_teacher(path, **shape):
    model = GPT(GPTConfig(**{**dict(vocab_size=65, block_size=32, n_layer=1, n_head=2, n_embd=16), **shape}))
    torch.save({"format_version": CKPT_FORMAT_VERSION, "model_config": checkpoint.model_config(model),
                "model": model.state_dict()}, path)
    return model


def test_load_teacher_checks_and_freezes(tmp_path):
    want = save_teacher(tmp_path / "t.pt", dropout=0.1)
    teacher = load_teacher(tmp_path / "t.pt", "cpu", vocab_size=65, block_size=16)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), want.state_dict().values()))
    x = torch.randint(0, 65, (2, 16))
    assert torch.equal(teacher(x)[0], teacher(x)[0])  # eval mode: no dropout
    with pytest.raises(ValueError, match="^teacher has a vocabulary of 65 tokens, the student 50257: distill between "
                                         "models that share a tokenizer$"):
        load_teacher(tmp_path / "t.pt", "cpu", vocab_size=50257, block_size=16)
    with pytest.raises(ValueError, match="teacher has block_size 32, the student 64") as exc:
        load_teacher(tmp_path / "t.pt", "cpu", vocab_size=65, block_size=64)
    assert "\n" not in str(exc.value)
    with pytest.raises(ValueError, match="does not exist"):
        load_teacher(tmp_path / "nope.pt", "cpu", vocab_size=65, block_size=16)
    hf_gpt2.save(want, tmp_path / "hf")  # a GPT-2 directory works too
    teacher = load_teacher(tmp_path / "hf", "cpu", vocab_size=65, block_size=32)
    assert not any(p.requires_grad for p in teacher.parameters())


def test_student_converges_toward_the_teacher():
    """A small student trained on the teacher's soft labels alone (alpha=1) ends up predicting like it."""
    torch.manual_seed(0)
    cfg = dict(vocab_size=8, block_size=8, n_layer=1, n_head=2, n_embd=16)
    teacher = GPT(GPTConfig(**cfg)).eval()
    with torch.no_grad():
        teacher.lm_head.weight.mul_(40)  # confident, clearly non-uniform predictions worth learning
    teacher.requires_grad_(False)
    student = GPT(GPTConfig(**cfg))
    opt = torch.optim.Adam(student.parameters(), lr=1e-2)
    held_out = torch.randint(0, 8, (64, 8))

    def kl_to_teacher():
        with torch.no_grad():
            return distill_loss(student(held_out)[0], teacher(held_out)[0], held_out, 1.0, 1.0)[1]["kl"].item()
    before = kl_to_teacher()
    for _ in range(50):
        x = torch.randint(0, 8, (32, 8))
        loss, _ = distill_loss(student(x)[0], teacher(x)[0], x, alpha=1.0, temperature=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    after = kl_to_teacher()
    assert before > 0.3 and after < 0.1 * before, (before, after)


def moved(flags, name, tmp_path):
    return [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / name}" for f in flags]


def test_distillation_changes_the_loss_and_checks_the_teacher(tiny_flags, tmp_path, capsys, char_data):
    run(tiny_flags + ["--max_iters=6"])
    teacher = tmp_path / "out" / "ckpt.pt"
    run(moved(tiny_flags, "plain", tmp_path) + ["--max_iters=4"])
    run(moved(tiny_flags, "kd", tmp_path) + ["--max_iters=4", f"--teacher={teacher}", "--distill_alpha=0.9"])
    plain = read_checkpoint(tmp_path / "plain" / "ckpt.pt")["model"]
    kd = read_checkpoint(tmp_path / "kd" / "ckpt.pt")["model"]
    assert not torch.equal(plain["transformer.h.0.mlp.c_fc.weight"], kd["transformer.h.0.mlp.c_fc.weight"])
    # a teacher with another vocabulary is refused in one line
    other = read_checkpoint(teacher)
    other["model_config"]["vocab_size"] = 70
    other["model"]["transformer.wte.weight"] = torch.zeros(70, 32)  # a bigger vocabulary than the data's
    other["model"]["lm_head.weight"] = other["model"]["transformer.wte.weight"]
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(SystemExit):
        train_mod.main(moved(tiny_flags, "x", tmp_path) + [f"--teacher={tmp_path / 'other.pt'}"])
    err = capsys.readouterr().err
    assert "teacher has a vocabulary of 70 tokens" in err and err.count("\n") == 1


def test_the_wrapper_mixes_the_loss_in_training_only():
    torch.manual_seed(0)
    student = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, dropout=0.1))
    teacher = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=8, vocab_size=11, dropout=0.1))
    teacher.requires_grad_(False)
    wrapped = Distill(student, teacher, alpha=0.5, temperature=2.0).train()
    assert student.training and not teacher.training  # the teacher never drops out
    x, y = torch.randint(0, 11, (2, 8)), torch.randint(0, 11, (2, 8))
    torch.manual_seed(1)
    logits, mixed = wrapped(x, y)
    torch.manual_seed(1)
    s_logits, _ = student(x, y)
    expected, _ = distill_loss(s_logits, teacher.eval()(x)[0], y, 0.5, 2.0)
    torch.testing.assert_close(mixed, expected)
    wrapped.eval()
    assert torch.equal(wrapped(x, y)[1], student(x, y)[1])  # evaluation: the student's own loss

