"""Tests for lean_optim.py: fp32 mode equals torch.optim.AdamW, bf16 and int8 modes track it on a tiny GPT,
the block-wise code's error bounds, stochastic rounding, state memory, save/load with bit-exact resume,
weight-decay groups, zero and None gradients, and the errors."""

import io

import pytest
import torch

from sologpt.lean_optim import LeanAdamW, dequantize_blockwise, quantize_blockwise, state_bytes, to_bf16_stochastic
from model import GPT, GPTConfig

MODES = ("fp32", "bf16", "int8")


def make_mlp(seed=0):
    """First weight 128x64 = 8192 values (compact in bf16/int8 modes); the rest stay float32 (< 4096)."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 8))


def groups(model, weight_decay=0.1):
    """The trainer's two groups: decay on matrices, none on biases and gains."""
    params = list(model.parameters())
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]


def mlp_step(model, opt, step, lr=None):
    gen = torch.Generator().manual_seed(100 + step)  # the batch depends only on the step
    x, y = torch.randn(16, 64, generator=gen), torch.randn(16, 8, generator=gen)
    if lr is not None:  # the trainer sets every group's lr before each step
        for group in opt.param_groups:
            group["lr"] = lr
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def test_fp32_mode_equals_torch_adamw_bit_for_bit():
    models = [make_mlp(), make_mlp()]
    unused = [torch.nn.Parameter(torch.ones(3)) for _ in models]  # never gets a gradient
    opts = [torch.optim.AdamW(groups(models[0]) + [{"params": [unused[0]]}], lr=1e-2, betas=(0.9, 0.95)),
            LeanAdamW(groups(models[1]) + [{"params": [unused[1]]}], lr=1e-2, betas=(0.9, 0.95), state_dtype="fp32")]
    for step in range(10):
        for model, opt in zip(models, opts):
            mlp_step(model, opt, step, lr=1e-2 * (1 - step / 10))
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
    assert torch.equal(unused[1], torch.ones(3)) and unused[1] not in opts[1].state


# ---- tracking float32 AdamW on a tiny GPT ----------------------------------------------------------------------

def train_tiny_gpt(make_opt, steps=100):
    """100 steps of a 2-layer GPT on 64 fixed random sequences (it memorizes them); returns the final loss on
    all 64, the flat parameters before and after."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=64))
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gen = torch.Generator().manual_seed(1)
    data = torch.randint(0, 64, (64, 17), generator=gen)
    opt = make_opt(groups(model))
    for _ in range(steps):
        rows = torch.randint(0, 64, (8,), generator=gen)
        _, loss = model(data[rows, :-1], data[rows, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    with torch.no_grad():
        _, loss = model(data[:, :-1], data[:, 1:])
    return loss.item(), start, torch.cat([p.detach().reshape(-1) for p in model.parameters()])


@pytest.fixture(scope="module")
def fp32_run():
    return train_tiny_gpt(lambda g: torch.optim.AdamW(g, lr=3e-3, betas=(0.9, 0.95)))


# measured (5 seeds): loss 4.2 -> 2.663 (fp32); the final loss differed by <= 0.05% (bf16) and <= 0.07% (int8);
# the distance to fp32's parameters was 0.008 (bf16) and 0.034 (int8) of the distance fp32's moved
@pytest.mark.parametrize("state_dtype,max_drift", [("bf16", 0.03), ("int8", 0.1)])
def test_compact_modes_track_fp32_adamw_on_tiny_gpt(fp32_run, state_dtype, max_drift):
    ref_loss, start, ref_params = fp32_run
    loss, _, params = train_tiny_gpt(lambda g: LeanAdamW(g, lr=3e-3, betas=(0.9, 0.95), state_dtype=state_dtype))
    assert ref_loss < 3.0  # the problem is learned at all (it starts at ln 64 = 4.16)
    assert abs(loss - ref_loss) / ref_loss < 0.01
    assert (params - ref_params).norm() / (ref_params - start).norm() < max_drift


# ---- the codes ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("signed", [True, False])
def test_blockwise_code_round_trip_error(signed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1000, generator=gen) * torch.exp(3 * torch.randn(1000, generator=gen))  # wide range of sizes
    x = x if signed else x.abs()
    x[:256:7] = 0.0
    codes, absmax = quantize_blockwise(x, 256, signed)
    assert codes.dtype == (torch.int8 if signed else torch.uint8)
    assert codes.shape == (4, 256) and absmax.shape == (4,)  # 1000 values -> 4 blocks, the last zero-padded
    y = dequantize_blockwise(codes, absmax, x.shape)
    blocks = torch.nn.functional.pad(x, (0, 24)).view(4, 256)  # (nblocks, block_size)
    err = torch.nn.functional.pad((y - x).abs(), (0, 24)).view(4, 256)  # (nblocks, block_size)
    # with c = L * (|x| / absmax)^(1/3) <= L and |code - c| <= 1/2:
    # |error| <= absmax * ((c + 1/2)^3 - c^3) / L^3 <= absmax * (1.5/L + 0.75/L^2 + 0.125/L^3)
    levels = 127 if signed else 255
    bound = 1.5 / levels + 0.75 / levels ** 2 + 0.125 / levels ** 3
    assert (err.amax(dim=1) <= absmax * bound * (1 + 1e-5)).all()
    big = blocks.abs() >= 0.01 * absmax[:, None]  # values above 1% of their block's absmax: relative error <= 5.6%
    assert (err[big] <= 0.056 * blocks.abs()[big]).all()
    assert torch.equal(y[x == 0], torch.zeros_like(y[x == 0]))
    for b in range(4):  # each block's largest value comes back exactly
        i = blocks[b].abs().argmax()
        assert torch.equal(y[b * 256 + i], x[b * 256 + i])
    again, _ = quantize_blockwise(y, 256, signed)  # decoding then encoding with the same scales changes nothing
    assert torch.equal(again, codes)


def test_unsigned_code_keeps_tiny_second_moments_nonzero():
    """A linear code rounds everything below absmax/510 to zero; then the update would be exp_avg / eps."""
    v = torch.logspace(-14, 0, 256)  # sqrt(v) spans 7 decades inside one block
    codes, absmax = quantize_blockwise(v.sqrt(), 256, signed=False)
    assert (dequantize_blockwise(codes, absmax, v.shape) > 0).all()


def test_bf16_stochastic_rounding_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    x = torch.full((1 << 16,), 1 + 2 ** -10)  # 1/8 of the way from bf16's 1 to its next value 1 + 2^-7
    y = to_bf16_stochastic(x, gen).float()
    assert set(y.unique().tolist()) == {1.0, 1 + 2 ** -7}
    assert abs(y.mean().item() - x[0].item()) < 5e-5  # 5 standard deviations of the mean
    exact = torch.tensor([0.0, -2.0, 1.5, 3e-39]).bfloat16().float()  # values bf16 holds (a subnormal too) stay
    assert torch.equal(to_bf16_stochastic(exact, gen).float(), exact)


def test_bf16_second_moment_decays_with_beta2_0999():
    """A 0.1% change per step is below bf16's resolution: round-to-nearest would keep exp_avg_sq at its peak."""
    out = {}
    for state_dtype in ("fp32", "bf16"):
        p = torch.nn.Parameter(torch.zeros(4096))
        opt = LeanAdamW([p], lr=1e-3, betas=(0.9, 0.999), weight_decay=0.0, state_dtype=state_dtype)
        for step in range(700):  # one large gradient, then zeros: exp_avg_sq should fall to 0.999^699 ~ 0.5 of it
            p.grad = torch.full_like(p, 1.0 if step == 0 else 0.0)
            opt.step()
        out[state_dtype] = opt.state[p]["exp_avg_sq"].float().mean().item()
    assert abs(out["bf16"] / out["fp32"] - 1) < 0.01


# ---- memory, save/load, groups, errors ------------------------------------------------------------------------

@pytest.mark.parametrize("state_dtype,bytes_per_param", [("fp32", 8.0), ("bf16", 4.0), ("int8", 2 + 8 / 256)])
def test_state_bytes(state_dtype, bytes_per_param):
    """Both moments together: 8 bytes/param in fp32, 2+2 in bf16, 1+1 plus a 4-byte scale per 256 in int8."""
    w = torch.nn.Parameter(torch.zeros(64, 256))  # compact
    b = torch.nn.Parameter(torch.zeros(256))  # small: float32 moments in every mode
    opt = LeanAdamW([w, b], state_dtype=state_dtype)
    w.grad, b.grad = torch.ones_like(w), torch.ones_like(b)
    opt.step()
    assert state_bytes(opt) == bytes_per_param * w.numel() + 8 * b.numel()


def test_state_bytes_of_tiny_gpt_against_torch_adamw():
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=64))
    n = sum(p.numel() for p in model.parameters())
    _, loss = model(torch.zeros(1, 16, dtype=torch.long), torch.zeros(1, 16, dtype=torch.long))
    loss.backward()
    per_param = {}
    for name, opt in [("torch", torch.optim.AdamW(model.parameters()))] + [
            (m, LeanAdamW(model.parameters(), state_dtype=m)) for m in MODES]:
        opt.step()
        per_param[name] = state_bytes(opt) / n
    assert per_param["fp32"] == 8.0 and abs(per_param["torch"] - 8.0) < 0.01  # torch adds a 4-byte step per tensor
    assert 4.0 < per_param["bf16"] < 4.2 and 2.0 < per_param["int8"] < 2.3  # biases, LayerNorm and wpe stay fp32


@pytest.mark.parametrize("state_dtype", MODES)
def test_save_load_round_trip_and_bit_exact_resume(state_dtype):
    model_a = make_mlp()
    opt_a = LeanAdamW(groups(model_a), lr=1e-2, state_dtype=state_dtype)
    for step in range(5):
        mlp_step(model_a, opt_a, step)
    buf = io.BytesIO()
    torch.save({"model": model_a.state_dict(), "optimizer": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)  # plain tensors and numbers only

    model_b = make_mlp(seed=1)
    model_b.load_state_dict(ckpt["model"])
    opt_b = LeanAdamW(groups(model_b), lr=1e-2, state_dtype=state_dtype)
    opt_b.load_state_dict(ckpt["optimizer"])
    for sa, sb in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
        assert sa.keys() == sb.keys()
        assert sa["step"] == sb["step"] == 5
        for key in sa.keys() - {"step"}:  # same values and dtypes: codes stay int8/uint8, bf16 stays bf16
            assert sa[key].dtype == sb[key].dtype and torch.equal(sa[key], sb[key])

    for step in range(5, 10):
        mlp_step(model_a, opt_a, step)
        mlp_step(model_b, opt_b, step)
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)


def test_load_refuses_other_state_dtype():
    model = make_mlp()
    opt = LeanAdamW(groups(model), state_dtype="int8")
    mlp_step(model, opt, 0)
    with pytest.raises(ValueError, match="state_dtype='int8' but this optimizer has state_dtype='bf16'"):
        LeanAdamW(groups(model), state_dtype="bf16").load_state_dict(opt.state_dict())


@pytest.mark.parametrize("state_dtype", MODES)
def test_weight_decay_groups_zero_and_none_grads(state_dtype):
    """With zero gradients AdamW's step is 0 / (0 + eps) = 0: only decoupled decay moves a parameter."""
    w = torch.nn.Parameter(torch.randn(64, 128))  # decay group, compact
    b = torch.nn.Parameter(torch.randn(128))  # no-decay group
    skipped = torch.nn.Parameter(torch.randn(64, 128))  # grad None: untouched, no state
    w0, b0, s0 = w.detach().clone(), b.detach().clone(), skipped.detach().clone()
    opt = LeanAdamW([{"params": [w, skipped], "weight_decay": 0.1}, {"params": [b], "weight_decay": 0.0}],
                    lr=0.1, state_dtype=state_dtype)
    w.grad, b.grad = torch.zeros_like(w), torch.zeros_like(b)
    opt.step()
    assert torch.equal(w, w0 * (1 - 0.1 * 0.1))
    assert torch.equal(b, b0) and torch.equal(skipped, s0)
    assert skipped not in opt.state and opt.state[w]["step"] == 1


def test_errors():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="state_dtype='fp8' is unknown"):
        LeanAdamW([p], state_dtype="fp8")
    with pytest.raises(ValueError, match="state_dtype='int4' is unknown"):
        LeanAdamW([{"params": [p], "state_dtype": "int4"}])
    with pytest.raises(ValueError, match="block_size=0"):
        LeanAdamW([p], block_size=0)
    emb = torch.nn.Embedding(10, 4, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse gradients"):
        LeanAdamW(emb.parameters()).step()


@pytest.mark.parametrize("state_dtype", MODES)
def test_bf16_params(state_dtype):
    """Pure-bf16 models: the moments are still computed in float32, the update is rounded into the bf16 param."""
    p = torch.nn.Parameter(torch.zeros(64, 128, dtype=torch.bfloat16))
    opt = LeanAdamW([p], lr=1e-2, weight_decay=0.0, state_dtype=state_dtype)
    p.grad = torch.ones_like(p)
    opt.step()
    assert p.dtype == torch.bfloat16 and torch.allclose(p.float(), torch.full((64, 128), -1e-2), rtol=1e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("state_dtype", MODES)
def test_cuda_step_and_resume(state_dtype):
    model_a, model_b = make_mlp().cuda(), make_mlp().cuda()
    opt_a = LeanAdamW(groups(model_a), lr=1e-2, state_dtype=state_dtype)
    for step in range(3):
        x = torch.randn(16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        model_a(x).square().mean().backward()
        opt_a.step()
        opt_a.zero_grad(set_to_none=True)
    opt_b = LeanAdamW(groups(model_b), lr=1e-2, state_dtype=state_dtype)
    model_b.load_state_dict(model_a.state_dict())
    opt_b.load_state_dict(opt_a.state_dict())
    for model, opt in [(model_a, opt_a), (model_b, opt_b)]:
        x = torch.randn(16, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(9))
        model(x).square().mean().backward()
        opt.step()
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
