"""Tests for model.py on tiny float32 models: shapes and loss, causality, the two attention paths agreeing,
the KV cache matching a full forward, sampling, GPT-2 init, parameter and FLOP counts, crop_block_size,
vocabulary padding, and the two GPTConfig training options (grad_checkpointing, residual_bf16)."""

import math

import pytest
import torch

from conftest import TINY, make_model, perturb, rand_ids
from model import GPT, GPTConfig, KVCache, sample_next
from sologpt import checkpoint

V = 64  # vocabulary of the tiny models
ATOL, RTOL = 1e-5, 1e-4


def twin(model, **overrides):
    """A model with the same weights and a different config (e.g. the other attention path)."""
    other = GPT(GPTConfig(**{**vars(model.config), **overrides}))
    other.load_state_dict(model.state_dict())
    return other.train(model.training)


# ---- 1. shapes and loss -----------------------------------------------------------------------------

def test_shapes_and_initial_loss():
    model = make_model()
    idx, targets = rand_ids(3, 16), rand_ids(3, 16, seed=1)
    logits, loss = model(idx, targets)
    assert logits.shape == (3, 16, V)
    assert logits.dtype == torch.float32
    assert loss.ndim == 0
    assert abs(loss.item() - math.log(V)) < 0.3  # near-uniform predictions at init
    assert model(idx)[1] is None


def test_targets_of_minus_one_are_ignored():
    model = perturb(make_model())
    idx, targets = rand_ids(2, 16), rand_ids(2, 16, seed=1)
    masked = targets.clone()
    keep = torch.rand(2, 16, generator=torch.Generator().manual_seed(2)) < 0.5
    masked[~keep] = -1
    logits, loss = model(idx, masked)
    expected = torch.nn.functional.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    full = model(idx, targets)[1]
    assert not torch.allclose(loss, full)  # the masked positions really were left out


def test_sequence_longer_than_block_size_raises():
    model = make_model()
    with pytest.raises(ValueError, match="block_size"):
        model(rand_ids(1, 17))


# ---- 2. causality -----------------------------------------------------------------------------------

@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_causality(attn_impl):
    model = perturb(make_model(attn_impl=attn_impl))
    idx = rand_ids(2, 16)
    base = model(idx)[0]
    for t in (0, 5, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % V
        out = model(changed)[0]
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=0, rtol=0)  # the past never sees the future
        diff = (out[:, t:] - base[:, t:]).abs().amax(dim=-1)  # (B, T - t)
        assert (diff > 1e-4).all(), f"changing token {t} left some later position unchanged"


# ---- 3. the two attention paths agree ---------------------------------------------------------------

def test_math_and_sdpa_agree_on_logits_loss_and_grads():
    sdpa = perturb(make_model(attn_impl="sdpa")).train()
    math_ = twin(sdpa, attn_impl="math")
    idx, targets = rand_ids(2, 16), rand_ids(2, 16, seed=1)
    out = {}
    for name, m in (("sdpa", sdpa), ("math", math_)):
        logits, loss = m(idx, targets)
        loss.backward()
        out[name] = logits, loss, {n: p.grad.clone() for n, p in m.named_parameters()}
    torch.testing.assert_close(out["math"][0], out["sdpa"][0], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out["math"][1], out["sdpa"][1], atol=ATOL, rtol=RTOL)
    assert out["math"][2].keys() == out["sdpa"][2].keys()
    for n, g in out["sdpa"][2].items():
        assert g.abs().sum() > 0, f"{n} got no gradient"
        torch.testing.assert_close(out["math"][2][n], g, atol=ATOL, rtol=RTOL, msg=lambda m: f"{n}: {m}")


def test_math_and_sdpa_agree_with_dropout_in_eval_mode():
    sdpa = perturb(make_model(attn_impl="sdpa", dropout=0.3))
    math_ = twin(sdpa, attn_impl="math")
    idx = rand_ids(2, 16)
    torch.testing.assert_close(math_(idx)[0], sdpa(idx)[0], atol=ATOL, rtol=RTOL)
    sdpa.train()  # and dropout really is active in training mode, so eval mode is what made them agree
    torch.manual_seed(0)
    assert not torch.allclose(sdpa(idx)[0], math_(idx)[0], atol=1e-3)


# ---- 4. KV cache ------------------------------------------------------------------------------------

@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("prompt_len,new", [(5, 8), (6, 20), (16, 3)])  # within, past and at block_size (16)
def test_greedy_generation_with_and_without_cache(attn_impl, prompt_len, new):
    model = perturb(make_model(attn_impl=attn_impl))
    prompt = rand_ids(2, prompt_len)
    with_cache = model.generate(prompt, new, temperature=0, use_cache=True)
    without = model.generate(prompt, new, temperature=0, use_cache=False)
    assert with_cache.shape == (2, prompt_len + new)
    assert torch.equal(with_cache[:, :prompt_len], prompt)
    assert torch.equal(with_cache, without)
    assert not torch.equal(with_cache[0, prompt_len:], with_cache[1, prompt_len:])  # the batch rows differ


def test_generate_restores_training_mode():
    model = make_model().train()
    model.generate(rand_ids(1, 3), 2, temperature=0)
    assert model.training


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_cached_prefill_then_single_steps_match_full_forward(attn_impl):
    model = perturb(make_model(attn_impl=attn_impl))
    idx = rand_ids(2, 16)
    full = model(idx)[0]
    k = 5
    cache = KVCache(model.config.n_layer, model.config.block_size)
    pre = model(idx[:, :k], kv_cache=cache)[0]
    assert cache.pos == k
    torch.testing.assert_close(pre, full[:, :k], atol=ATOL, rtol=RTOL)
    for t in range(k, 16):
        step = model(idx[:, t:t + 1], kv_cache=cache)[0]
        assert step.shape == (2, 1, V)
        torch.testing.assert_close(step[:, 0], full[:, t], atol=ATOL, rtol=RTOL)
    assert cache.pos == 16
    with pytest.raises(ValueError, match="block_size"):  # the cache is full
        model(idx[:, :1], kv_cache=cache)


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_cached_multi_token_chunk_matches_full_forward(attn_impl):
    model = perturb(make_model(attn_impl=attn_impl))
    idx = rand_ids(2, 16)
    full = model(idx)[0]
    cache = KVCache(model.config.n_layer, model.config.block_size)
    chunks = [(0, 4), (4, 5), (5, 11), (11, 16)]  # prefill, one step, then chunks with T > 1 and past > 0
    for a, b in chunks:
        out = model(idx[:, a:b], kv_cache=cache)[0]
        torch.testing.assert_close(out, full[:, a:b], atol=ATOL, rtol=RTOL)
    assert cache.pos == 16


# ---- 5. sampling ------------------------------------------------------------------------------------

def test_top_k_1_and_tiny_top_p_equal_greedy():
    model = perturb(make_model())
    prompt = rand_ids(2, 4)
    greedy = model.generate(prompt, 10, temperature=0)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_p=1e-6, generator=g), greedy)
    assert torch.equal(model.generate(prompt, 10, temperature=2.0, top_k=1, top_p=0.5, generator=g), greedy)


def test_sample_next_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)  # probs ~ .64 .23 .09 .03 .01
    g = torch.Generator().manual_seed(0)
    top2 = sample_next(logits, 1.0, top_k=2, generator=g)
    assert set(top2.unique().tolist()) == {0, 1}
    top_p = sample_next(logits, 1.0, top_p=0.8, generator=g)  # .64 < .8, .64 + .23 >= .8: keeps two
    assert set(top_p.unique().tolist()) == {0, 1}
    unfiltered = sample_next(logits, 1.0, generator=g)
    assert len(unfiltered.unique()) >= 4
    assert torch.equal(sample_next(logits[:3], 0), torch.zeros(3, 1, dtype=torch.long))
    cold = sample_next(logits, 0.05, generator=g)  # temperature sharpens: the runner-up has p ~ e^-20
    assert (cold == 0).all()
    hot = sample_next(logits, 100.0, generator=g)  # and flattens: near-uniform over the 5 tokens
    assert abs((hot == 4).float().mean().item() - 0.2) < 0.05


def test_same_generator_seed_same_samples():
    model = perturb(make_model())
    prompt = rand_ids(2, 4)

    def sample(seed):
        return model.generate(prompt, 12, temperature=1.0, generator=torch.Generator().manual_seed(seed))

    a, b, c = sample(123), sample(123), sample(7)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # the seed really drives the samples


def test_unfiltered_sampling_returns_valid_ids():
    model = make_model()
    out = model.generate(rand_ids(4, 2), 30, temperature=1.5, top_k=None,
                         generator=torch.Generator().manual_seed(0))
    assert out.dtype == torch.long
    assert out.min() >= 0 and out.max() < V
    assert len(out[:, 2:].unique()) > 10  # near-uniform at init: many different tokens


# ---- 6. GPT-2 init ----------------------------------------------------------------------------------

def test_gpt2_init():
    torch.manual_seed(0)
    n_layer = 4
    model = GPT(GPTConfig(n_layer=n_layer, n_head=4, n_embd=256, block_size=16, vocab_size=V))
    expected = 0.02 / math.sqrt(2 * n_layer)  # 0.0071
    proj = [(n, p) for n, p in model.named_parameters() if n.endswith("c_proj.weight")]
    assert len(proj) == 2 * n_layer
    for n, p in proj:
        assert abs(p.std().item() - expected) < 0.05 * expected, n
    fc = model.transformer.h[0].mlp.c_fc.weight
    assert abs(fc.std().item() - 0.02) < 0.001
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all((p == 0).all() for n, p in model.named_parameters() if n.endswith(".bias") and "ln" not in n)


def test_no_bias_builds_and_runs():
    model = make_model(bias=False)
    assert not [n for n, _ in model.named_parameters() if n.endswith("bias")]
    for m in model.modules():
        if isinstance(m, (torch.nn.Linear, torch.nn.LayerNorm)):
            assert m.bias is None
    idx = rand_ids(2, 8)
    logits, loss = model(idx, idx)
    loss.backward()
    assert logits.shape == (2, 8, V) and torch.isfinite(loss)
    assert torch.equal(model.generate(idx, 3, temperature=0), model.generate(idx, 3, temperature=0, use_cache=False))


def test_config_validation():
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="attn_impl"):
        GPTConfig(attn_impl="flash")


# ---- 7. parameter and FLOP counts -------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_num_params_and_flops(bias):
    model = make_model(bias=bias)
    c = model.config
    unique = {id(p): p for p in model.parameters()}
    total = sum(p.numel() for p in unique.values())
    wpe = c.block_size * c.n_embd
    assert model.num_params() == total - wpe
    assert model.num_params(non_embedding=False) == total
    # hand count: wte + per block (ln_1, c_attn, c_proj, ln_2, c_fc, c_proj) + ln_f; lm_head is tied
    C, b = c.n_embd, int(bias)
    block = 2 * (C + b * C) + (3 * C * C + b * 3 * C) + (C * C + b * C) + (4 * C * C + b * 4 * C) + (4 * C * C + b * C)
    assert model.num_params() == V * C + c.n_layer * block + (C + b * C)
    for T in (1, 8, 16):
        assert model.flops_per_token(T) == 6 * model.num_params() + 12 * c.n_layer * T * c.n_embd
    assert model.flops_per_token() == model.flops_per_token(c.block_size)


# ---- 8. crop_block_size -----------------------------------------------------------------------------

def test_crop_block_size():
    model = perturb(make_model())
    idx = rand_ids(2, 8)
    before = model(idx)[0]
    n_before = model.num_params(non_embedding=False)
    model.crop_block_size(8)
    assert model.config.block_size == 8
    assert model.transformer.wpe.weight.shape == (8, 32)
    assert model.num_params(non_embedding=False) == n_before - 8 * 32
    torch.testing.assert_close(model(idx)[0], before, atol=0, rtol=0)
    with pytest.raises(ValueError, match="block_size"):
        model(rand_ids(2, 9))
    # generation respects the cropped window, with and without the cache
    out = model.generate(rand_ids(2, 6), 6, temperature=0)
    assert torch.equal(out, model.generate(rand_ids(2, 6), 6, temperature=0, use_cache=False))


# ---- vocabulary padding ------------------------------------------------------------------------------------

def test_vocab_padding_computes_the_same_function():
    torch.manual_seed(0)
    plain = GPT(GPTConfig(**{**TINY, "vocab_size": 50}))
    padded = GPT(GPTConfig(**{**TINY, "vocab_size": 50, "vocab_pad_multiple": 64}))
    assert padded.transformer.wte.weight.shape == (64, 32) and padded.lm_head.weight is padded.transformer.wte.weight
    with torch.no_grad():
        for (name, p), q in zip(plain.named_parameters(), padded.parameters()):
            (q[:50] if name == "transformer.wte.weight" else q).copy_(p)
    idx = torch.randint(50, (2, 16))
    targets = torch.randint(50, (2, 16))
    la, loss_a = plain(idx, targets)
    lb, loss_b = padded(idx, targets)
    assert lb.shape == (2, 16, 50)  # padding columns are never shown to the loss or the sampler
    torch.testing.assert_close(la, lb)
    torch.testing.assert_close(loss_a, loss_b)
    loss_a.backward()
    loss_b.backward()
    for (name, p), q in zip(plain.named_parameters(), padded.parameters()):
        g = q.grad[:50] if name == "transformer.wte.weight" else q.grad
        torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)
    assert torch.all(padded.transformer.wte.weight.grad[50:] == 0)  # padding rows learn nothing
    out_a = plain.generate(idx[:, :4], 8, temperature=0)
    assert torch.equal(out_a, padded.generate(idx[:, :4], 8, temperature=0))


def test_residual_bf16_makes_the_stream_bf16_under_bf16_autocast_only():
    """residual_bf16 changes the dtype of what flows between blocks (float32 -> bf16 under bf16 autocast) and
    nothing else: loss and gradients stay within bf16 rounding of the float32 stream; without autocast it does
    nothing."""
    torch.manual_seed(0)
    plain = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128))
    models = {False: plain, True: twin(plain, residual_bf16=True)}
    x, y = torch.randint(0, 128, (4, 32)), torch.randint(0, 128, (4, 32))
    seen = []
    results = {}
    for flag in (False, True):
        model = models[flag]
        model.transformer.h[1].register_forward_pre_hook(lambda m, args: seen.append(args[0].dtype))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(x, y)
        loss.backward()
        results[flag] = (loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert seen == [torch.float32, torch.bfloat16]
    assert results[True][0] == pytest.approx(results[False][0], rel=1e-2)
    g0, g1 = results[False][1], results[True][1]
    assert torch.nn.functional.cosine_similarity(g0, g1, dim=0) > 0.99
    assert models[True].transformer.wte.weight.grad.dtype == torch.float32  # parameters and grads stay float32
    assert torch.equal(models[True](x, y)[1], plain(x, y)[1])  # no autocast: float32 throughout, the same loss
    assert "residual_bf16" not in checkpoint.model_config(plain)  # off: left out of checkpoints, as before
    assert checkpoint.model_config(models[True])["residual_bf16"] is True
