"""base_dtype="nf4" (sologpt/nf4.py): the NF4 levels against QLoRA's published list, the round-trip error against
int4 and int8, double quantization, bits per weight, the layer's gradients, and tiny LoRA / frozen-layer runs on
an NF4 base that train, resume exactly, sample and export merged."""

import pytest
import torch

import sample as sample_mod
import train as train_mod
from conftest import run_train as run
from model import GPT, GPTConfig
from sologpt import checkpoint, memory, nf4, quantize
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config
from sologpt.rundir import read_metrics

# QLoRA (Dettmers et al. 2023), appendix E, as bitsandbytes also lists them (float32 digits)
PUBLISHED_NF4 = [-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
                 -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
                 0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
                 0.7229568362236023, 1.0]


def gaussian(out=1024, inp=1024, seed=0):
    return torch.randn(out, inp, generator=torch.Generator().manual_seed(seed)) * 0.02


def rel_rms(approx, w):
    return ((approx - w).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()


def nf4_round_trip(w):
    layer = nf4.NF4Linear.from_linear(linear_of(w))
    return layer.dequantize(), layer


def linear_of(w, bias=True):
    linear = torch.nn.Linear(w.size(1), w.size(0), bias=bias)
    with torch.no_grad():
        linear.weight.copy_(w)
    return linear


def test_levels_are_the_published_nf4_values():
    levels = nf4.nf4_levels()
    assert levels.shape == (16,) and levels[7] == 0.0 and levels[0] == -1.0 and levels[-1] == 1.0
    torch.testing.assert_close(levels, torch.tensor(PUBLISHED_NF4), rtol=0, atol=1e-6)


def test_round_trip_error_against_int4_and_int8():
    """Gaussian weights, relative RMS error. Measured (1024 x 1024, seed 0): nf4 0.0920 at 4.127 bits; int4
    asymmetric (float32 scale and minimum per group, quantize.py) 0.0896 at groups of 64 (5 bits), 0.0998 at 128
    (4.5 bits), 0.1091 at 256 (4.25 bits); symmetric absmax int4 in blocks of 64 (nf4's layout, uniform levels)
    0.1077; int8 per channel 0.0079. NF4 beats every int4 grid at or below its own bit budget; int4 with groups
    of 64 and two float32s per group is 2.6% lower, for 0.87 bit more per weight."""
    w = gaussian()
    deq, layer = nf4_round_trip(w)
    e_nf4 = rel_rms(deq, w)
    e_int4 = {g: rel_rms(quantize.dequantize_int4(*quantize.quantize_int4(w, g)), w) for g in (64, 128, 256)}
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    e_sym = rel_rms(((blocks / absmax * 7).round() / 7 * absmax).view_as(w), w)  # 15 uniform levels, same blocks
    e_int8 = rel_rms(quantize.dequantize_int8(*quantize.quantize_int8(w)), w)
    assert 0.085 < e_nf4 < 0.095
    assert e_nf4 < 0.93 * e_int4[128] and e_nf4 < 0.86 * e_int4[256]  # 4.5 and 4.25 bits per weight
    assert e_nf4 < 0.87 * e_sym  # the levels alone: normal quantiles beat a uniform grid on normal data
    assert e_nf4 < 1.05 * e_int4[64]  # within 5% of int4 at 5 bits per weight
    assert e_int8 < 0.1 * e_nf4


def test_double_quantization_changes_the_error_by_little():
    """The int8 block scales add at most 0.5% to the RMS error of float32 scales (measured: 0.01%)."""
    w = gaussian(seed=1)
    deq, _ = nf4_round_trip(w)
    levels = nf4.nf4_levels()
    blocks = w.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1)
    codes = torch.bucketize(blocks / absmax[:, None], (levels[1:] + levels[:-1]) / 2)
    single = (levels[codes] * absmax[:, None]).view_as(w)  # the same codes, float32 scales
    assert abs(rel_rms(deq, w) / rel_rms(single, w) - 1) < 0.005
    packed, code, scale, mean = nf4.quantize_nf4(w)
    scales = nf4.dequantize_scales(code, scale, mean)[:absmax.numel()]
    assert ((scales - absmax).abs() / absmax).max() < 0.01  # each block scale within 1%


def test_outlier_blocks_do_not_cost_the_small_blocks_their_precision():
    """Rows of tiny weights (x 1e-3) beside rows of outliers (x 20) in one group of 256 scales: every block scale
    stays within 3% though they span four decades (they are coded by their logarithm; a linear int8 code rounded
    the tiny ones to one value, some below zero), every row keeps about the error of Gaussian weights, and an
    all-zero row comes back as zeros."""
    w = gaussian(256, 256, seed=2)
    w[:4] *= 1e-3
    w[4:8] *= 20
    w[8] = 0
    deq, _ = nf4_round_trip(w)
    absmax = w.reshape(-1, 64).abs().amax(dim=1)
    _, code, step, mean = nf4.quantize_nf4(w)
    scales = nf4.dequantize_scales(code, step, mean)[:absmax.numel()]
    real = absmax > 0
    assert ((scales[real] - absmax[real]).abs() / absmax[real]).max() < 0.03
    assert torch.equal(scales[~real], torch.zeros_like(scales[~real])) and torch.equal(deq[8], w[8])
    rows = [i for i in range(256) if i != 8]
    errors = torch.tensor([rel_rms(deq[i], w[i]) for i in rows])
    assert errors.max() < 0.13, errors.max()  # Gaussian weights: about 0.092 (the table in docs/memory.md)


def test_bits_per_weight_and_format():
    w = gaussian()
    _, layer = nf4_round_trip(w)
    assert abs(nf4.bits_per_weight(layer) - 4.127) < 0.001  # 4 + 8/64 + 32/(64*256), QLoRA section 3
    assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == w.numel() // 2  # two codes per byte
    assert layer.absmax_code.dtype == torch.int8 and layer.absmax_code.numel() == w.numel() // 64
    assert layer.absmax_scale.numel() == w.numel() // 64 // 256
    assert "table" not in layer.state_dict()  # rebuilt, not saved
    assert list(layer.parameters()) == []


def test_odd_sizes_pad_and_exact_zero():
    w = gaussian(7, 13)  # 91 weights: not a multiple of 64, blocks not a multiple of 256
    w[0] = 0.0
    deq, layer = nf4_round_trip(w)
    assert deq.shape == w.shape and torch.equal(deq[0], torch.zeros(13))
    assert rel_rms(deq, w) < 0.12
    zero = nf4.NF4Linear.from_linear(linear_of(torch.zeros(4, 64)))
    assert torch.equal(zero.dequantize(), torch.zeros(4, 64))


def test_input_gradient_matches_a_float_linear_and_weight_gets_none():
    w = gaussian(48, 64, seed=2)
    layer = nf4.NF4Linear.from_linear(linear_of(w))
    ref = linear_of(layer.dequantize())
    with torch.no_grad():
        ref.bias.copy_(layer.bias)
    x = torch.randn(3, 5, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = layer(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-6)
    assert all(b.grad is None for b in layer.buffers())
    with torch.autocast("cpu", dtype=torch.bfloat16):  # under autocast the weight is built in bf16
        assert layer(x).dtype == torch.bfloat16


def test_lower_frozen_weights_and_the_estimate():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=64))
    x = torch.randint(0, 64, (2, 16))
    ref = model(x)[0]
    model.transformer.h[0].requires_grad_(False)
    cfg = train_mod.TrainConfig(base_dtype="nf4", freeze_layers=1, batch_size=1, block_size=16)
    before, _ = memory.estimate(model, cfg)
    assert memory.lower_frozen_weights(model, "nf4") == 4
    assert isinstance(model.transformer.h[0].mlp.c_fc, nf4.NF4Linear)
    after, _ = memory.estimate(model, cfg)
    assert abs(after["weights"] - before["weights"]) < 0.01 * before["weights"]  # the estimate knew the format
    torch.testing.assert_close(model(x)[0], ref, rtol=0.1, atol=0.1)
    memory.restore_float(model)
    assert type(model.transformer.h[0].mlp.c_fc) is torch.nn.Linear


@pytest.fixture(scope="module")
def base_ckpt(tmp_path_factory, char_data):
    root = tmp_path_factory.mktemp("nf4base")
    torch.manual_seed(0)
    run([f"--data_root={char_data}", "--dataset=tiny", f"--out_dir={root}", "--device=cpu", "--n_layer=2",
         "--n_head=2", "--n_embd=32", "--block_size=32", "--batch_size=8", "--max_iters=10", "--eval_iters=1",
         "--progress=False", "--sample_tokens=0", "--learning_rate=3e-3", "--compile=False"])
    return root / "ckpt.pt"


def step_losses(out_dir):
    return [r["loss"] for r in read_metrics(out_dir, "step")]


def test_lora_on_an_nf4_base_trains_resumes_and_samples(tiny_flags, tmp_path, base_ckpt):
    flags = tiny_flags + [f"--init_from={base_ckpt}", "--lora_rank=4", "--lora_targets=all", "--base_dtype=nf4",
                          "--lr_decay_iters=6", "--eval_interval=3"]
    run(flags + ["--max_iters=6"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["train_config"]["base_dtype"] == "nf4"
    first, last = read_metrics(tmp_path / "out")[0], read_metrics(tmp_path / "out")[-1]
    assert last["val_loss"] < first["val_loss"]
    other = [f if not f.startswith("--out_dir") else f"--out_dir={tmp_path / 'r'}" for f in flags]
    run(other + ["--max_iters=3"])
    run(other + ["--max_iters=6", "--init_from=resume"])
    resumed = read_checkpoint(tmp_path / "r" / "ckpt.pt")
    for k, v in ckpt["adapter"]["adapter"].items():
        assert torch.equal(resumed["adapter"]["adapter"][k], v), k
    straight, split = step_losses(tmp_path / "out"), step_losses(tmp_path / "r")
    assert len(straight) == 6 and split[-6:] == straight  # the same loss at every step
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'r'}", "--device=cpu",
                                                                    "--num_samples=1", "--max_new_tokens=5",
                                                                    "--stream=False"]))
    assert len(texts) == 1
    # the tools see the model that was trained: the base rounded to nf4 under the adapters, then merged
    from sologpt import lora
    trained = checkpoint.load_source(str(base_ckpt))
    lora.load_adapter(trained, resumed["adapter"])
    memory.lower_frozen_weights(trained, "nf4")
    loaded = checkpoint.load_model(resumed).eval()
    idx = torch.randint(0, 65, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want, got = trained.eval()(idx)[0], loaded(idx)[0]
        unrounded = checkpoint.load_source(str(base_ckpt))
        lora.load_adapter(unrounded, resumed["adapter"])
        float_base = unrounded.eval()(idx)[0]
    assert torch.allclose(got, want, atol=1e-4), (got - want).abs().max()
    assert not torch.allclose(float_base, want, atol=1e-3)  # the float base is another model: the check can fail


def test_frozen_nf4_layers_save_load_and_export_merged(tiny_flags, tmp_path, base_ckpt):
    from tools import export as export_mod
    run(tiny_flags + [f"--init_from={base_ckpt}", "--max_iters=2", "--freeze_layers=1", "--base_dtype=nf4"])
    ckpt = read_checkpoint(tmp_path / "out" / "ckpt.pt")
    assert ckpt["model"]["transformer.h.0.attn.c_attn.weight"].dtype == torch.uint8  # stored as trained
    model = checkpoint.load_model(ckpt).eval()
    assert model.transformer.h[0].attn.c_attn.weight.dtype == torch.float32  # back to an ordinary model
    export_mod.main([f"--out_dir={tmp_path / 'out'}", f"--merged_ckpt={tmp_path / 'm.pt'}"])
    merged = checkpoint.load_model(read_checkpoint(tmp_path / "m.pt")).eval()
    idx = torch.randint(0, 65, (1, 8))
    assert torch.equal(merged(idx)[0], model(idx)[0])
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'out'}", "--device=cpu",
                                                                    "--num_samples=1", "--max_new_tokens=5",
                                                                    "--stream=False"]))
    assert len(texts) == 1
