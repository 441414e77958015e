"""sologpt/fp8.py on the CPU (torch._scaled_mm has a CPU kernel): FP8Linear computes what its float32 write-up says,
stays close to the plain model, keeps the checkpoint keys, and train.py refuses fp8 where it cannot run."""

import pytest
import torch

from sologpt import fp8
from model import GPT, GPTConfig
from sologpt.checks import resolve
from train import TrainConfig
from sologpt.configurator import UserError


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, vocab_size=128))


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (4, 32), generator=g), torch.randint(0, 128, (4, 32), generator=g)


def test_forward_equals_float32_write_up():
    torch.manual_seed(0)
    lin = torch.nn.Linear(64, 48)
    x = torch.randn(5, 7, 64)
    expected = fp8.reference_linear(x.reshape(-1, 64), lin.weight, lin.bias).view(5, 7, 48)
    lin.__class__, lin.out_dtype = fp8.FP8Linear, torch.float32
    torch.testing.assert_close(lin(x), expected, rtol=1e-5, atol=1e-5)


def test_operands_have_the_layouts_cuda_needs(monkeypatch):
    """The CPU kernel takes any layout; CUDA's wants the first operand row-major and the second column-major.
    Check every call of a model's forward and backward for that."""
    real, calls = torch._scaled_mm, []

    def checked(a, b, **kw):
        assert a.stride(1) == 1 and b.stride(0) == 1, (a.shape, a.stride(), b.shape, b.stride())
        calls.append(1)
        return real(a, b, **kw)

    monkeypatch.setattr(torch, "_scaled_mm", checked)
    model = tiny_model()
    fp8.convert_to_fp8(model, torch.float32, head=True)
    x, y = batch()
    model(x, y)[1].backward()
    assert len(calls) == 9 * 3  # 8 block layers and the head, 3 matmuls each
    calls.clear()
    model.zero_grad(set_to_none=True)
    model.lm_head.weight.requires_grad_(False)  # a frozen (tied) head: its weight gradient is not computed
    model(x, y)[1].backward()
    assert len(calls) == 9 * 3 - 1 and model.lm_head.weight.grad is None


def test_transposed_cast_is_the_transpose_of_the_cast():
    """backward casts grad_y a second time, transposed, instead of copying the first cast: the same bits."""
    g = torch.randn(24, 40) * 3
    scale = fp8.fp8_scale(g, fp8.E5M2)
    g8, inv = fp8.to_fp8(g, fp8.E5M2, scale)
    g8_t, inv_t = fp8.to_fp8(g, fp8.E5M2, scale, transposed=True)
    assert g8_t.is_contiguous() and g8_t.shape == (40, 24)
    assert torch.equal(g8_t.view(torch.uint8), g8.t().contiguous().view(torch.uint8)) and torch.equal(inv, inv_t)


def test_scaling_uses_the_whole_range():
    x = torch.randn(100) * 1e-4  # tiny values would underflow e4m3 without the scale
    x8, inv = fp8.to_fp8(x, fp8.E4M3)
    assert x8.float().abs().max() == torch.finfo(fp8.E4M3).max
    rel = ((x8.float() * inv - x).abs() / x.abs()).max()
    assert rel < 2 ** -3  # e4m3 keeps 3 mantissa bits: rounding error below 1/16 (1/8 with subnormals' margin)


@pytest.mark.parametrize("blocks,head", [(True, False), (True, True), (False, True)],
                         ids=["blocks", "blocks+head", "head"])
def test_model_stays_close_to_plain_path_and_keeps_keys(blocks, head):
    plain, low = tiny_model(), tiny_model()
    keys = list(plain.state_dict())
    # 4 Linear layers per block, 2 blocks, and the output layer with head=True
    assert fp8.convert_to_fp8(low, torch.float32, head=head, blocks=blocks) == 8 * blocks + head
    assert type(low.transformer.h[0].mlp.c_fc) is (fp8.FP8Linear if blocks else torch.nn.Linear)
    assert low.lm_head.weight is low.transformer.wte.weight  # still tied
    assert list(low.state_dict()) == keys
    x, y = batch()
    _, l0 = plain(x, y)
    _, l1 = low(x, y)
    l0.backward()
    l1.backward()
    assert abs(l1.item() - l0.item()) < 0.01 * l0.item()
    g0 = torch.cat([p.grad.flatten() for p in plain.parameters()])
    g1 = torch.cat([p.grad.flatten() for p in low.parameters()])
    assert (g1 - g0).norm() / g0.norm() < 0.15  # fp8 rounding noise, not a different function
    assert torch.nn.functional.cosine_similarity(g0, g1, dim=0) > 0.99


def test_fp8_training_lowers_the_loss():
    """Blocks and head in fp8 learn: one layer, 32 wide and 2 x 16 tokens, as the CPU's fp8 matmul is slow at any
    size (2 x 64 wide at 4 x 32 tokens took 34-150 s for these 30 steps; this takes about 1.5 s)."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=128))
    assert fp8.convert_to_fp8(model, torch.float32, head=True) == 5  # four block layers and the head
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    x, y = (t[:2, :16] for t in batch())
    losses = []
    for _ in range(30):
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_widths_must_be_multiples_of_16():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=40, block_size=8, vocab_size=32))
    with pytest.raises(ValueError, match="multiples of 16"):
        fp8.convert_to_fp8(model)


def test_train_refuses_fp8_on_cpu():
    cfg = TrainConfig(device="cpu", fp8=True)
    with pytest.raises(UserError, match="fp8=True needs a CUDA GPU"):
        resolve(cfg)


def test_train_checks_fp8_head_and_residual_values():
    with pytest.raises(UserError, match="fp8_head=True needs a CUDA GPU and dtype bfloat16"):
        resolve(TrainConfig(device="cpu", fp8_head=True))  # fp8_head alone is allowed, but not on a CPU
    with pytest.raises(UserError, match="residual_bf16=True .* dtype='float32': set residual_bf16=False"):
        resolve(TrainConfig(device="cpu", residual_bf16=True))
    with pytest.raises(UserError, match="qat cannot be combined"):
        resolve(TrainConfig(device="cpu", qat="int8", fp8_head=True))
    with pytest.raises(UserError, match="task='classify' does not use: set fp8_head=False"):
        resolve(TrainConfig(device="cpu", task="classify", fp8_head=True))
    with pytest.raises(ValueError, match=r"fp8_head=True needs a CUDA GPU \(device=cpu\): set fp8_head=False"):
        fp8.check_fp8_device("cpu", "fp8_head")
