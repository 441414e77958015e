"""sologpt/quantize.py and tools/quantize.py: the rounding, the layers, whole models, quantized checkpoints, the
command line and QAT, on tiny CPU models."""

import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
import torch.nn as nn

from sologpt import checkpoint
from sologpt import quantize as q
from tools import quantize as quantize_cli
from conftest import REPO
from model import GPT, GPTConfig
from sologpt.checkpoint import FORMAT_VERSION as CKPT_FORMAT_VERSION

TINY = dict(n_layer=2, n_head=2, n_embd=64, block_size=16, vocab_size=64)


def tiny_gpt(seed=0, **overrides):
    torch.manual_seed(seed)
    return GPT(GPTConfig(**{**TINY, **overrides})).eval()


def float_ckpt(model):
    """What train.py writes, with a stand-in optimizer state."""
    return {"format_version": CKPT_FORMAT_VERSION, "model_config": asdict(model.config), "model": model.state_dict(),
            "optimizer": {"state": {}, "param_groups": []}, "iter_num": 10, "best_val_loss": 2.5,
            "train_config": {"dataset": "tiny", "data_root": "data"}, "rng": {"batch": torch.zeros(4)}}


def tokens(seed=1, T=16):
    return torch.randint(0, TINY["vocab_size"], (2, T), generator=torch.Generator().manual_seed(seed))


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---- the rounding ----------------------------------------------------------------------------------------

def test_int8_per_channel_error_bound():
    w = torch.randn(32, 48) * torch.logspace(-3, 1, 32)[:, None]  # rows of very different size
    w[3] = 0.0  # an all-zero row must not divide by zero
    qw, scale = q.quantize_int8(w)
    assert qw.dtype == torch.int8 and scale.shape == (32,)
    assert qw.abs().max() <= 127
    err = (w - q.dequantize_int8(qw, scale)).abs()
    assert (err <= scale[:, None] / 2 * (1 + 1e-5)).all()
    assert (qw.abs().amax(dim=1)[torch.arange(32) != 3] == 127).all()  # each row's largest weight uses the range
    assert (q.dequantize_int8(qw, scale)[3] == 0).all()


def test_int4_pack_unpack_round_trip_all_values():
    low, high = torch.meshgrid(torch.arange(16), torch.arange(16), indexing="ij")
    qv = torch.stack((low.flatten(), high.flatten()), dim=-1).reshape(8, 64).to(torch.uint8)  # every (low, high)
    packed = q.pack_int4(qv)
    assert packed.shape == (8, 32) and packed.dtype == torch.uint8
    assert sorted(packed.flatten().tolist()) == list(range(256))  # every byte value, once
    assert torch.equal(q.unpack_int4(packed), qv)


def test_int4_group_error_bound():
    torch.manual_seed(0)
    w = torch.randn(16, 128) + torch.linspace(-2, 2, 128)  # groups of different offset: asymmetric ranges
    w[0, :32] = 0.7  # a constant group is stored exactly
    qw, scale, zero = q.quantize_int4(w, group_size=32)
    assert qw.shape == (16, 128) and scale.shape == zero.shape == (16, 4)
    assert qw.max() <= 15
    deq = q.dequantize_int4(qw, scale, zero)
    bound = scale.repeat_interleave(32, dim=1) / 2  # (out, in): each weight's group scale
    assert ((w - deq).abs() <= bound * (1 + 1e-5) + 1e-7).all()
    assert torch.equal(deq[0, :32], w[0, :32])
    groups = qw.reshape(16, 4, 32)
    assert (groups[1:].amin(-1) == 0).all() and (groups[1:].amax(-1) == 15).all()  # all 16 levels are used


# ---- the layers ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_layers_are_frozen_but_pass_gradients_to_their_input(mode):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    layer = q.Int8Linear.from_linear(linear) if mode == "int8" else q.Int4Linear.from_linear(linear, 32)
    assert list(layer.parameters()) == []  # no gradient or optimizer memory
    assert (layer.in_features, layer.out_features) == (64, 32)  # what a LoRA adapter needs from its base
    x = torch.randn(3, 64, requires_grad=True)
    y = layer(x)
    assert rel_err(y, linear(x)) < (0.01 if mode == "int8" else 0.1)
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = layer(x)
    assert yb.dtype == torch.bfloat16 and rel_err(yb.float(), y) < 0.02


def test_int4_layer_rejects_a_group_size_that_does_not_divide():
    with pytest.raises(ValueError, match="does not divide in_features=64"):
        q.Int4Linear.from_linear(nn.Linear(64, 8), group_size=48)
    with pytest.raises(ValueError, match="even number"):
        q.Int4Linear(64, 8, group_size=1)


# ---- whole models ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode, bound", [("int8", 0.01), ("int4", 0.15)])
def test_quantized_logits_close_to_float(mode, bound):
    model, idx = tiny_gpt(), tokens()
    ref, _ = model(idx)
    q.quantize_model(model, mode, group_size=32)
    kinds = {type(m) for m in model.transformer.h.modules()}
    assert nn.Linear not in kinds and (q.Int8Linear if mode == "int8" else q.Int4Linear) in kinds
    assert model.lm_head.weight is model.transformer.wte.weight  # the tied embedding stays float
    logits, _ = model(idx)
    assert rel_err(logits, ref) < bound
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits_bf16, _ = model(idx)
    assert rel_err(logits_bf16.float(), ref) < bound + 0.05


def test_measured_errors_int8_much_smaller_than_int4():
    model, idx = tiny_gpt(), tokens()
    ref, _ = model(idx)
    e8 = rel_err(q.quantize_model(tiny_gpt(), "int8")(idx)[0], ref)
    e4 = rel_err(q.quantize_model(tiny_gpt(), "int4", group_size=64)(idx)[0], ref)
    assert 0 < e8 < e4 / 4  # int8 has 16x finer steps than int4


def test_greedy_generate_with_a_quantized_model():
    model = q.quantize_model(tiny_gpt(), "int4", group_size=64)
    prompt = tokens(T=4)
    out = model.generate(prompt, 20, temperature=0)  # past block_size: the cache is refilled as the window slides
    assert out.shape == (2, 24) and torch.equal(out[:, :4], prompt)
    assert torch.equal(out, model.generate(prompt, 20, temperature=0, use_cache=False))


def test_quantize_model_refusals_and_skip():
    model = tiny_gpt()
    with pytest.raises(ValueError, match="group_size=48 does not divide in_features=64 of transformer.h.0.attn"):
        q.quantize_model(model, "int4", group_size=48)
    assert q.quantization_mode(model) is None  # the failed call replaced nothing
    with pytest.raises(ValueError, match="mode='int3' is unknown"):
        q.quantize_model(model, "int3")
    q.quantize_model(model, "int8", skip=("lm_head", "mlp.c_proj"))
    assert type(model.transformer.h[1].mlp.c_proj) is nn.Linear
    assert type(model.transformer.h[1].mlp.c_fc) is q.Int8Linear
    with pytest.raises(ValueError, match="already quantized"):
        q.quantize_model(model, "int4")


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_an_untied_output_layer_is_quantized_a_tied_one_is_not(mode):
    tied = q.quantize_model(tiny_gpt(), mode, group_size=32)
    assert type(tied.lm_head) is nn.Linear and tied.lm_head.weight is tied.transformer.wte.weight
    model = tiny_gpt(tie_embeddings=False)
    ref, _ = model(tokens())
    qmodel = q.quantize_model(tiny_gpt(tie_embeddings=False), mode, group_size=32)
    assert type(qmodel.lm_head) is (q.Int8Linear if mode == "int8" else q.Int4Linear)
    assert type(qmodel.transformer.wte) is nn.Embedding  # the input embedding stays float
    logits, _ = qmodel(tokens())
    assert rel_err(logits, ref) < (0.02 if mode == "int8" else 0.2)  # the rounding, not another function
    head_only = q.quantize_model(tiny_gpt(tie_embeddings=False), mode, group_size=32, skip=("c_attn", "c_proj", "c_fc"))
    assert type(head_only.lm_head) is not nn.Linear and type(head_only.transformer.h[0].mlp.c_fc) is nn.Linear
    kept = q.quantize_model(tiny_gpt(tie_embeddings=False), mode, group_size=32, skip=("lm_head",))
    assert type(kept.lm_head) is nn.Linear
    assert kept.generate(tokens()[:, :4], 3, temperature=0).shape == (2, 7)  # cached generation runs on it
    assert qmodel.generate(tokens()[:, :4], 3, temperature=0).shape == (2, 7)


def test_untied_head_checkpoints_old_and_new(tmp_path):
    """A new file quantizes the untied head and rebuilds it; a file written before heads were quantized (its
    skip says lm_head) still rebuilds with a float head; QAT fake-quantizes the head that quantize_model rounds."""
    model = tiny_gpt(tie_embeddings=False)
    qckpt = checkpoint.quantized(float_ckpt(model), "int8")
    assert qckpt["quantization"]["skip"] == [] and "lm_head.scale" in qckpt["model"]
    torch.save(qckpt, tmp_path / "q.pt")
    loaded = checkpoint.load_model(torch.load(tmp_path / "q.pt", weights_only=True)).eval()
    assert torch.equal(loaded(tokens())[0], q.quantize_model(tiny_gpt(tie_embeddings=False), "int8")(tokens())[0])
    old = checkpoint.quantized(float_ckpt(model), "int8", skip=("lm_head",))
    assert type(checkpoint.load_model(old).lm_head) is nn.Linear
    # an older file, written before heads were quantized: no "head" marker, any skip list, a float head
    older = checkpoint.quantized(float_ckpt(model), "int8", skip=("lm_head", "c_proj"))
    older["quantization"] = {"mode": "int8", "group_size": None, "skip": ["c_proj"]}
    rebuilt = checkpoint.load_model(older)
    assert type(rebuilt.lm_head) is nn.Linear and type(rebuilt.transformer.h[0].attn.c_proj) is nn.Linear
    saved = q.state_dict_bytes(old["model"]) - q.state_dict_bytes(qckpt["model"])
    assert saved == 64 * 64 * (4 - 1) - 64 * 4  # the head's float32 weight -> int8 plus one float32 scale per row
    qat = q.enable_qat(tiny_gpt(tie_embeddings=False), "int8")
    assert type(qat.lm_head) is q.QATLinear
    torch.testing.assert_close(qat(tokens())[0], loaded(tokens())[0], rtol=1e-6, atol=1e-6)


# ---- checkpoints -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_checkpoint_round_trip_weights_only(mode, tmp_path):
    model = tiny_gpt()
    qckpt = checkpoint.quantized(float_ckpt(model), mode, group_size=32, skip=("lm_head", "h.0.mlp.c_fc"))
    assert "optimizer" not in qckpt and "rng" not in qckpt and qckpt["iter_num"] == 10
    assert qckpt["quantization"]["mode"] == mode and "quantization" in qckpt
    torch.save(qckpt, tmp_path / "q.pt")
    loaded = torch.load(tmp_path / "q.pt", weights_only=True)
    qmodel = checkpoint.load_model(loaded).eval()
    assert type(qmodel.transformer.h[0].mlp.c_fc) is nn.Linear  # skip is restored too
    expected = q.quantize_model(model, mode, group_size=32, skip=("lm_head", "h.0.mlp.c_fc"))
    idx = tokens()
    assert torch.equal(qmodel(idx)[0], expected(idx)[0])
    assert set(qmodel.state_dict()) == set(qckpt["model"])
    assert type(checkpoint.load_model(float_ckpt(tiny_gpt())).lm_head) is nn.Linear  # one loader for every kind
    with pytest.raises(ValueError, match="already quantized"):
        checkpoint.quantized(qckpt, "int4", group_size=32)


def test_checkpoint_sizes(tmp_path):
    # n_embd=128 with 64 tokens: the Linear weights are 97% of the model, so file sizes show their compression
    model = tiny_gpt(n_embd=128)
    ckpt = {k: v for k, v in float_ckpt(model).items() if k != "optimizer"}  # compare the weights, not Adam's state
    sizes = {}
    for name, c in [("fp32", ckpt), ("int8", checkpoint.quantized(ckpt, "int8")),
                    ("int4", checkpoint.quantized(ckpt, "int4", group_size=128))]:
        torch.save(c, tmp_path / f"{name}.pt")
        sizes[name] = (tmp_path / f"{name}.pt").stat().st_size
    assert sizes["int8"] < 0.4 * sizes["fp32"]
    assert sizes["int4"] < 0.25 * sizes["fp32"]


# ---- command line ----------------------------------------------------------------------------------------

def run_cli(*args):
    res = subprocess.run([sys.executable, "-m", "tools.quantize", *map(str, args)], cwd=REPO, capture_output=True,
                         text=True, timeout=120)
    return res.returncode, res.stdout, res.stderr.strip()


def test_cli_writes_a_loadable_file_and_refuses_bad_input(tmp_path):
    src = tmp_path / "ckpt.pt"
    torch.save(float_ckpt(tiny_gpt()), src)
    rc, out, err = run_cli("--ckpt", src, "--mode", "int4", "--group_size", "32")
    assert rc == 0, err
    dst = tmp_path / "ckpt_int4.pt"
    assert "MB ->" in out and "model weights" in out and not (tmp_path / "ckpt_int4.pt.tmp").exists()
    model = checkpoint.load_model(torch.load(dst, weights_only=True))
    assert q.quantization_mode(model) == "int4"

    rc, out, err = run_cli("--ckpt", dst, "--mode", "int8")  # already quantized
    assert rc == 1 and err.startswith("error: ") and "\n" not in err and "already quantized (int4)" in err
    assert not (tmp_path / "ckpt_int4_int8.pt").exists()

    before = dst.read_bytes()
    rc, out, err = run_cli("--ckpt", src, "--mode", "int4", "--group_size", "48")
    assert rc == 1 and "\n" not in err and "error: group_size=48 does not divide in_features=64" in err
    assert dst.read_bytes() == before  # the earlier output is untouched


def cli_error(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        quantize_cli.main([str(a) for a in argv])
    assert exc.value.code == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    return err


def test_cli_errors_in_process(tmp_path, capsys):
    src = tmp_path / "ckpt.pt"
    assert "does not exist" in cli_error(["--ckpt", src, "--mode", "int8"], capsys)
    src.write_bytes(b"not a checkpoint")
    assert "is a text file, not a checkpoint" in cli_error(["--ckpt", src, "--mode", "int8"], capsys)
    src.write_bytes(b"PK\x03\x04 a damaged zip")
    assert "corrupt or truncated" in cli_error(["--ckpt", src, "--mode", "int8"], capsys)
    torch.save(float_ckpt(tiny_gpt()), src)
    before = src.read_bytes()
    assert "is the input checkpoint" in cli_error(["--ckpt", src, "--mode", "int8", "--out", src], capsys)
    assert src.read_bytes() == before
    assert "invalid choice: 'int3'" in cli_error(["--ckpt", src, "--mode", "int3"], capsys)
    assert "folder of --out" in cli_error(["--ckpt", src, "--mode", "int8", "--out", tmp_path / "no" / "x.pt"],
                                          capsys)
    quantize_cli.main(["--ckpt", str(src), "--mode", "int8", "--out", str(tmp_path / "small.pt")])
    assert "quantization" in torch.load(tmp_path / "small.pt", weights_only=True)


# ---- quantization-aware training -------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_qat_forward_equals_the_quantized_model(mode):
    model, idx = tiny_gpt(), tokens()
    keys = list(model.state_dict())
    params = list(model.parameters())
    float_logits, _ = model(idx)
    q.enable_qat(model, mode, group_size=32)
    assert list(model.state_dict()) == keys  # checkpoints stay compatible
    assert all(a is b for a, b in zip(model.parameters(), params))  # an existing optimizer keeps working
    qat_logits, _ = model(idx)
    real_logits, _ = q.quantize_model(tiny_gpt(), mode, group_size=32)(idx)
    torch.testing.assert_close(qat_logits, real_logits, rtol=1e-6, atol=1e-6)
    assert not torch.equal(qat_logits, float_logits)
    # after QAT, quantizing uses the float weights: the same numbers the fake quantization trained with
    after_qat = q.quantize_model(model, mode, group_size=32)
    torch.testing.assert_close(after_qat(idx)[0], real_logits, rtol=1e-6, atol=1e-6)


def test_qat_gradients_reach_the_float_weights_and_disable_restores():
    model, idx = tiny_gpt(), tokens()
    float_logits, _ = model(idx)
    q.enable_qat(model, "int8")
    q.enable_qat(model, "int4", group_size=32)  # a second call switches the mode
    assert model.transformer.h[0].attn.c_attn.mode == "int4"
    assert "QATLinear" in repr(model.transformer.h[0].attn.c_attn)
    _, loss = model(idx, targets=idx)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    q.disable_qat(model)
    assert all(type(m) is not q.QATLinear for m in model.modules())
    assert torch.equal(model(idx)[0], float_logits)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_fake_quantize_is_exact_with_identity_gradient(mode):
    torch.manual_seed(0)
    linear = nn.Linear(64, 8)
    w = linear.weight.detach().clone().requires_grad_()
    fq = q.fake_quantize_weight(w, mode, group_size=32)
    real = q.Int8Linear.from_linear(linear) if mode == "int8" else q.Int4Linear.from_linear(linear, group_size=32)
    assert torch.equal(fq, real.dequantize())  # the same rounding, bit for bit
    g = torch.randn(8, 64)
    fq.backward(g)
    assert torch.equal(w.grad, g)  # straight through: the rounding is invisible to the gradient


def test_int8_cpu_kernel_matches_the_dequantized_weight():
    """On the CPU, without gradients, Int8Linear runs torch's int8 weight-only kernel with bf16 activations: its
    logits stay within bf16 rounding of the same int8 weights dequantized to float32."""
    import copy
    from conftest import perturbed_model
    from sologpt.quantize import Int8Linear, dequantize_int8
    model = q.quantize_model(perturbed_model(n_embd=64), "int8")
    reference = copy.deepcopy(model)
    for parent in list(reference.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Int8Linear):
                plain = torch.nn.Linear(child.in_features, child.out_features)
                plain.weight.data, plain.bias.data = dequantize_int8(child.weight, child.scale), child.bias
                setattr(parent, name, plain)
    idx = torch.randint(64, (3, 20))
    with torch.no_grad():
        fast, ref = model(idx)[0], reference(idx)[0]
    assert (fast - ref).abs().max() < 0.02 * ref.abs().max()
    assert (fast.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9
    x = torch.randn(2, 64, requires_grad=True)  # with a gradient: the dequantizing path, float32 exactly
    layer = model.transformer.h[0].mlp.c_fc
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias))
    x = torch.randn(2, 64)  # training (grad on) before the first trainable layer: the same path, not the kernel
    assert torch.allclose(layer(x), torch.nn.functional.linear(x, layer.dequantize(), layer.bias))
