"""chunked_ce.py: the chunked output layer + loss computes the same loss and gradients as the plain path (float32
on the CPU), with ignored targets, padded vocabularies, chunks that do not divide the tokens, evaluation without
gradients, and through train.py; and it never holds a (tokens, vocab) tensor."""

import pytest
import torch
import torch.nn.functional as F

from sologpt import checks
import train as train_mod
from sologpt.chunked_ce import ChunkedLoss, chunked_cross_entropy
from sologpt.configurator import UserError, load_config
from model import GPT, GPTConfig
from sologpt.checkpoint import read as read_checkpoint


@pytest.mark.parametrize("chunk", [1, 7, 16, 100])
def test_same_loss_and_gradients_as_plain_cross_entropy(chunk):
    torch.manual_seed(0)
    x = torch.randn(30, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (30,))
    t[[3, 11, 29]] = -1  # ignored
    ref = F.cross_entropy(x @ w.t(), t, ignore_index=-1)
    gx, gw = torch.autograd.grad(ref * 3.0, (x, w))  # an incoming gradient other than 1
    loss = chunked_cross_entropy(x, w, t, chunk)
    cx, cw = torch.autograd.grad(loss * 3.0, (x, w))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cx, gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(cw, gw, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: the loss alone
        torch.testing.assert_close(chunked_cross_entropy(x, w, t, chunk), ref)


@pytest.mark.parametrize("pad", [1, 64])
def test_model_loss_and_every_gradient_match_the_plain_model(pad):
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61, vocab_pad_multiple=pad))
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=61, vocab_pad_multiple=pad))
    model.load_state_dict(plain.state_dict())
    chunked = ChunkedLoss(model, 10)  # the wrapper train.py puts around the model for chunked_loss
    x, y = torch.randint(0, 61, (3, 16)), torch.randint(0, 61, (3, 16))
    logits, l0 = plain(x, y)
    none, l1 = chunked(x, y)
    assert none is None
    l0.backward()
    l1.backward()
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), chunked.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_nothing_of_tokens_times_vocab_is_kept_for_backward():
    """Every tensor autograd keeps between forward and backward is smaller than the logits would be."""
    torch.manual_seed(0)
    x = torch.randn(256, 16, requires_grad=True)
    w = torch.randn(1000, 16, requires_grad=True)
    t = torch.randint(0, 1000, (256,))
    kept = []
    with torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s.numel()) or s, lambda s: s):
        plain = F.cross_entropy(x @ w.t(), t)
    assert max(kept) >= 256 * 1000  # the plain path keeps the logits
    kept.clear()
    with torch.autograd.graph.saved_tensors_hooks(lambda s: kept.append(s.numel()) or s, lambda s: s):
        loss = chunked_cross_entropy(x, w, t, 32)
    assert max(kept) <= 1000 * 16  # the two gradients, (vocab, C) and (tokens, C), nothing (tokens, vocab)
    torch.testing.assert_close(loss, plain)


def test_train_run_matches_the_plain_run_and_bad_combinations_are_refused(tiny_flags, tmp_path):
    run = lambda flags: train_mod.train(load_config(train_mod.TrainConfig, flags))
    run(tiny_flags + ["--max_iters=4"])
    plain = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    flags = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'ch'}" for f in tiny_flags]
    run(flags + ["--max_iters=4", "--chunked_loss=50"])
    chunked = read_checkpoint(tmp_path / "ch" / "ckpt.pt")
    assert chunked["best_val_loss"] == pytest.approx(plain["best_val_loss"], rel=1e-5)
    for k, v in plain["model"].items():
        torch.testing.assert_close(chunked["model"][k], v, rtol=1e-4, atol=1e-5)
    for bad in (dict(chunked_loss=-1), dict(chunked_loss=64, task="classify")):
        with pytest.raises(UserError, match="chunked_loss"):
            checks.resolve(train_mod.TrainConfig(device="cpu", **bad))


def count_matmuls(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::mm")


def test_only_the_wanted_gradients_are_computed():
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(50, 16, requires_grad=True)
    t = torch.randint(0, 50, (40,))  # 6 chunks of 7
    with torch.no_grad():  # evaluation: the logits' matmul only
        assert count_matmuls(lambda: chunked_cross_entropy(x, w, t, 7)) == 6
    assert count_matmuls(lambda: chunked_cross_entropy(x, w, t, 7)) == 18  # logits, grad of x, grad of w
    frozen = w.detach()  # a frozen output layer (LoRA, freeze_embeddings): no grad of w
    assert count_matmuls(lambda: chunked_cross_entropy(x, frozen, t, 7)) == 12
    loss = chunked_cross_entropy(x, frozen, t, 7)
    loss.backward()
    ref = torch.autograd.grad(F.cross_entropy(x @ frozen.t(), t), x)[0]
    torch.testing.assert_close(x.grad, ref, rtol=1e-5, atol=1e-6)


def test_every_target_ignored_gives_nan_like_the_plain_loss():
    x, w = torch.randn(5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    t = torch.full((5,), -1)
    assert chunked_cross_entropy(x, w, t, 2).isnan() and F.cross_entropy(x @ w.t(), t, ignore_index=-1).isnan()
