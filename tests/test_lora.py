"""sologpt/lora.py on tiny float32 GPTs: a fresh adapter changes nothing, only adapters train, merging keeps the
outputs and restores the plain model's keys, adapter files round-trip and refuse the wrong base, target names,
dropout, and a base layer without .weight (as a weight-only int8 Linear would be); then LoRA runs in train.py
(small checkpoints, exact resume, merge, sample and export)."""

import io
import math
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import sample as sample_mod
import train as train_mod
from conftest import bpe_flags, error_of, run_train as run
from model import GPT, GPTConfig
from sologpt import checkpoint, hf_gpt2
from sologpt.checkpoint import read as read_checkpoint
from sologpt.configurator import load_config
from sologpt.freeze import count_trainable
from sologpt.lora import (LoRALinear, adapter_checkpoint, apply_lora, load_adapter, lora_config, lora_state_dict,
                          merge_lora, read_adapter, resolve_targets)
from tools import export as export_mod

V = 64
TINY = dict(n_layer=2, n_head=2, n_embd=32, block_size=16, vocab_size=V)


def make_model(seed=0, **overrides):
    """A tiny GPT with weights large enough that every layer visibly matters (GPT-2's init has c_proj ~0.007)."""
    torch.manual_seed(seed)
    model = GPT(GPTConfig(**{**TINY, **overrides}))
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 / math.sqrt(p.shape[-1]))
    return model.eval()


def ids(B=2, T=16, seed=0):
    return torch.randint(0, V, (B, T), generator=torch.Generator().manual_seed(seed))


def logits(model, idx=None):
    with torch.no_grad():
        return model(ids() if idx is None else idx)[0]


def _applied(model, **kwargs):
    """model with adapters (rank 4, alpha 8 unless kwargs say otherwise)."""
    apply_lora(model, **{"rank": 4, "alpha": 8, **kwargs})
    return model


def randomize_adapters(model, seed=3):
    """Non-zero B (and A), as after training, so that the adapters change the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in lora_state_dict(model).values():
            t.copy_(torch.randn(t.shape, generator=g) * 0.3)
    return model


def base_state(model):
    """The base tensors under their plain-model names, cloned."""
    return {k.replace(".base.", "."): v.clone() for k, v in model.state_dict().items() if "lora_" not in k}


def train_steps(model, steps=30):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x, y = ids(4, 16, seed=1), ids(4, 16, seed=2)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return model.eval(), losses


# ---- a fresh adapter, what trains ------------------------------------------------------------------------

def test_fresh_adapters_give_the_base_logits_exactly():
    model = make_model()
    before = logits(model)
    names = apply_lora(model, rank=4, alpha=8, targets="all")
    assert len(names) == 2 * 4
    assert torch.equal(logits(model), before)  # B = 0: the update is exactly zero


def test_only_adapters_are_trainable_and_get_gradients():
    model = make_model()
    apply_lora(model, rank=4, alpha=8, targets=("c_attn",))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"transformer.h.{i}.attn.c_attn.lora_{ab}" for i in range(2) for ab in "AB"}
    n_adapter = 2 * (4 * 32 + 96 * 4)  # per layer A (rank, in) + B (out, rank)
    assert count_trainable(model) == (n_adapter, sum(p.numel() for p in model.parameters()))

    model(ids(), ids(seed=1))[1].backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), n
    for i in range(2):  # B gets a gradient at once; A's is zero until B moves (dL/dA = B^T ...)
        assert model.transformer.h[i].attn.c_attn.lora_B.grad.abs().sum() > 0


def test_training_moves_only_the_adapters_and_lowers_the_loss():
    model = make_model()
    apply_lora(model, rank=4, alpha=8, targets="all")
    frozen = base_state(model)
    model, losses = train_steps(model)
    assert losses[-1] < losses[0] - 0.5
    for k, v in base_state(model).items():
        assert torch.equal(v, frozen[k]), k  # bit-identical base


# ---- merging ---------------------------------------------------------------------------------------------

def test_merge_keeps_the_outputs_and_gives_a_plain_gpt():
    model = make_model()
    original_keys = list(model.state_dict())
    apply_lora(model, rank=4, alpha=8, targets="all")
    model, _ = train_steps(model, steps=5)
    adapted = logits(model)
    assert not torch.allclose(adapted, logits(make_model()), atol=1e-3)  # the adapters do something

    assert len(merge_lora(model)) == 8
    torch.testing.assert_close(logits(model), adapted, atol=1e-5, rtol=1e-5)
    assert list(model.state_dict()) == original_keys
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert all(p.requires_grad for p in model.parameters())  # ordinary GPT again: fully trainable
    plain = GPT(GPTConfig(**TINY))
    plain.load_state_dict(model.state_dict())  # strict: a normal sologpt checkpoint
    torch.testing.assert_close(logits(plain.eval()), adapted, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(model)


def test_merged_model_exports_to_hugging_face_format(tmp_path):
    model = randomize_adapters(_applied(make_model(), targets="all"))
    adapted = logits(model)
    merge_lora(model)
    hf_gpt2.save(model, tmp_path)
    torch.testing.assert_close(logits(hf_gpt2.load(tmp_path).eval()), adapted, atol=1e-5, rtol=1e-5)


# ---- adapter files ---------------------------------------------------------------------------------------

def _save(ckpt, path=None):
    buf = io.BytesIO() if path is None else path
    torch.save(ckpt, buf)
    return buf


def test_adapter_file_is_small_and_round_trips_onto_a_fresh_base(tmp_path):
    model = randomize_adapters(_applied(make_model(), targets="attn"))
    adapted = logits(model)
    ckpt = adapter_checkpoint(model, dict(rank=4, alpha=8, dropout=0.0, targets=["attn"]), {"init_from": "test"})
    assert set(ckpt["adapter"]) == set(lora_state_dict(model))
    assert ckpt["lora"] == dict(rank=4, alpha=8, dropout=0.0, targets=["c_attn", "attn.c_proj"])
    path = tmp_path / "adapter.pt"
    _save(ckpt, path)
    full = _save(make_model().state_dict()).getbuffer().nbytes
    assert path.stat().st_size < full / 4

    loaded = read_adapter(path)  # weights_only=True
    assert loaded["base"]["info"] == {"init_from": "test"}
    fresh = make_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base: no fingerprint warning
        names = load_adapter(fresh, loaded)
    assert names == [f"transformer.h.{i}.attn.{n}" for i in range(2) for n in ("c_attn", "c_proj")]
    assert torch.equal(logits(fresh), adapted)
    assert lora_config(fresh) == ckpt["lora"]


def test_adapter_onto_a_base_of_another_shape_names_the_field():
    ckpt = adapter_checkpoint(_applied(make_model()))
    other = make_model(n_embd=48)
    with pytest.raises(ValueError, match="adapter was trained on n_embd=32, base has n_embd=48"):
        load_adapter(other, ckpt)
    assert not any(isinstance(m, LoRALinear) for m in other.modules())  # left untouched
    cropped = make_model()
    cropped.crop_block_size(8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(cropped, ckpt, strict=True)  # a shorter context is the same base


def test_adapter_onto_other_weights_warns_or_refuses_when_strict():
    ckpt = adapter_checkpoint(_applied(make_model(seed=0)))
    with pytest.warns(UserWarning, match="base weights differ"):
        load_adapter(make_model(seed=1), ckpt)
    with pytest.raises(ValueError, match="base weights differ"):
        load_adapter(make_model(seed=1), ckpt, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same base in bf16 still matches
        load_adapter(make_model(seed=0).to(torch.bfloat16), ckpt, strict=True)


def test_bad_adapter_files_are_refused(tmp_path):
    model = _applied(make_model())
    with pytest.raises(ValueError, match="not a sologpt-lora adapter"):
        load_adapter(make_model(), {"format_version": 1, "model": {}})
    with pytest.raises(ValueError, match="version 2 is not supported"):
        load_adapter(make_model(), {**adapter_checkpoint(model), "version": 2})
    broken = adapter_checkpoint(model)
    del broken["adapter"]["transformer.h.1.attn.c_attn.lora_B"]
    with pytest.raises(ValueError, match="inconsistent at transformer.h.1.attn.c_attn.lora_B"):
        load_adapter(make_model(), broken)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        load_adapter(model, adapter_checkpoint(model))
    with pytest.raises(ValueError, match="lora_cfg says rank=8"):
        adapter_checkpoint(model, dict(rank=8, alpha=8, targets="c_attn"))
    with pytest.raises(ValueError, match="does not exist"):
        read_adapter(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="not a readable adapter file"):
        read_adapter(tmp_path / "junk.pt")


# ---- targets and settings --------------------------------------------------------------------------------

@pytest.mark.parametrize("targets, per_block", [
    (("c_attn",), ["attn.c_attn"]),
    ("attn", ["attn.c_attn", "attn.c_proj"]),
    (["mlp"], ["mlp.c_fc", "mlp.c_proj"]),
    ("all", ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]),
    ("mlp.c_proj, c_attn", ["attn.c_attn", "mlp.c_proj"]),  # a CLI string; block order, whatever the given order
    (("attn", "c_attn", "attn.c_proj"), ["attn.c_attn", "attn.c_proj"]),  # each layer once
])
def test_target_names_and_groups(targets, per_block):
    model = make_model()
    names = apply_lora(model, rank=2, alpha=2, targets=targets)
    assert names == [f"transformer.h.{i}.{p}" for i in range(2) for p in per_block]
    assert [n for n, m in model.named_modules() if isinstance(m, LoRALinear)] == names


def test_bad_settings_are_refused_before_anything_changes():
    model = make_model()
    with pytest.raises(ValueError, match=r"unknown LoRA target 'q_proj': valid targets are c_attn, attn.c_proj"):
        apply_lora(model, rank=4, alpha=8, targets=("c_attn", "q_proj"))
    with pytest.raises(ValueError, match="'c_proj' is ambiguous"):
        resolve_targets("c_proj")
    with pytest.raises(ValueError, match="no LoRA targets"):
        resolve_targets([])
    for rank in (0, -1, 2.0, True):
        with pytest.raises(ValueError, match=f"rank={rank!r} must be an integer"):
            apply_lora(model, rank=rank, alpha=8)
    with pytest.raises(ValueError, match="alpha=0 must be positive"):
        apply_lora(model, rank=4, alpha=0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        apply_lora(model, rank=4, alpha=8, dropout=1.0)
    assert all(p.requires_grad for p in model.parameters())  # nothing was frozen or wrapped
    apply_lora(model, rank=4, alpha=8)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_lora(model, rank=4, alpha=8)


def test_scale_is_alpha_over_rank():
    layer = LoRALinear(nn.Linear(8, 6), rank=2, alpha=6)
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(3, 8)
    expected = layer.base(x) + x @ layer.lora_A.T @ layer.lora_B.T * 3.0
    torch.testing.assert_close(layer(x), expected)


def test_dropout_only_in_train_mode():
    model = make_model()  # in eval mode: new adapters must follow it, not start in train mode
    randomize_adapters(_applied(model, dropout=0.5, targets="all"))
    assert torch.equal(logits(model), logits(model))
    model.train()
    assert not torch.allclose(logits(model), logits(model))
    no_dropout = randomize_adapters(_applied(make_model().train(), targets="all"))
    assert torch.equal(logits(no_dropout), logits(no_dropout))  # dropout=0: train mode is deterministic too
    assert isinstance(no_dropout.transformer.h[0].attn.c_attn.lora_dropout, nn.Identity)


# ---- a base layer that is not an nn.Linear ---------------------------------------------------------------

class WeightlessLinear(nn.Module):
    """Stands in for a weight-only int8 Linear: in_features, out_features and forward(x), but no .weight."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", linear.weight.detach().clone())
        self.bias = nn.Parameter(linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.packed, self.bias)


def test_base_without_weight_trains_but_does_not_merge():
    model = make_model()
    for block in model.transformer.h:
        block.attn.c_attn = WeightlessLinear(block.attn.c_attn)
    before = logits(model)
    apply_lora(model, rank=4, alpha=8, targets="attn")
    assert torch.equal(logits(model), before)
    assert not model.transformer.h[0].attn.c_attn.base.bias.requires_grad
    model, losses = train_steps(model, steps=10)
    assert losses[-1] < losses[0]

    with pytest.raises(ValueError, match=r"h.0.attn.c_attn wraps WeightlessLinear, which is not a floating-point"):
        merge_lora(model)
    assert len([m for m in model.modules() if isinstance(m, LoRALinear)]) == 4  # nothing merged halfway

    ckpt = adapter_checkpoint(model)  # its buffer is named differently from .weight: compared where names match
    fresh = make_model()
    for block in fresh.transformer.h:
        block.attn.c_attn = WeightlessLinear(block.attn.c_attn)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_adapter(fresh, ckpt, strict=True)
    assert torch.equal(logits(fresh), logits(model))


class Int8WeightLinear(nn.Module):
    """Like a weight-only int8 Linear: an int8 buffer named weight (as the float one is) plus a per-row scale."""

    def __init__(self, linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scale = linear.weight.detach().abs().amax(dim=1) / 127  # (out,)
        self.register_buffer("weight", (linear.weight.detach() / scale[:, None]).round().to(torch.int8))
        self.register_buffer("scale", scale)
        self.register_buffer("bias", linear.bias.detach().clone())

    def forward(self, x):
        return F.linear(x, self.weight.float() * self.scale[:, None], self.bias)


def test_adapter_from_a_float_base_loads_onto_its_int8_version():
    model = randomize_adapters(_applied(make_model(), targets="all"))
    quantized = make_model()
    for block in quantized.transformer.h:
        for parent, attr in ((block.attn, "c_attn"), (block.attn, "c_proj"), (block.mlp, "c_fc"),
                             (block.mlp, "c_proj")):
            setattr(parent, attr, Int8WeightLinear(getattr(parent, attr)))
    base_logits = logits(quantized)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # int8 weights are not compared with float ones; the rest matches
        load_adapter(quantized, adapter_checkpoint(model), strict=True)
    assert all(torch.equal(v, lora_state_dict(model)[k]) for k, v in lora_state_dict(quantized).items())
    assert not torch.allclose(logits(quantized), base_logits, atol=1e-3)
    torch.testing.assert_close(logits(quantized), logits(model), atol=0.2, rtol=0)  # up to int8 rounding


# ---- LoRA runs in train.py: small checkpoints, exact resume, merge, sample, export ----------------------------

def test_lora_run_small_checkpoint_exact_resume_merge_sample_export(gpt2_setup, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    root = gpt2_setup
    lora_flags = ["--lora_rank=4", "--lora_alpha=8", "--lora_targets=attn,c_fc", "--lr_decay_iters=6", "--max_iters=6"]
    run(bpe_flags(root, tmp_path / "a", *lora_flags))
    ckpt_a = read_checkpoint(tmp_path / "a" / "ckpt.pt")
    assert set(ckpt_a["model"]) == set()  # nothing but adapters trains in an LM LoRA run
    adapter = ckpt_a["adapter"]["adapter"]
    assert adapter and all(".lora_" in k for k in adapter)
    full_bytes = sum(v.numel() * 4 for v in hf_gpt2.load(root / "gpt2").state_dict().values())
    assert (tmp_path / "a" / "ckpt.pt").stat().st_size < full_bytes / 5  # adapters + their AdamW state only

    # exact resume: 3 steps, stop, resume to 6 == 6 straight
    run(bpe_flags(root, tmp_path / "b", *lora_flags[:-1], "--max_iters=3"))
    run(bpe_flags(root, tmp_path / "b", *lora_flags, init="resume"))
    ckpt_b = read_checkpoint(tmp_path / "b" / "ckpt.pt")
    for k, v in adapter.items():
        assert torch.equal(ckpt_b["adapter"]["adapter"][k], v), k

    # merged model == base + adapters; sample.py and export.py load the adapter checkpoint
    merged = checkpoint.load_model(ckpt_a)
    unmerged = checkpoint.load_model(ckpt_a, merge=False)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(merged.eval()(idx)[0], unmerged.eval()(idx)[0], rtol=1e-5, atol=1e-5)
    base = hf_gpt2.load(root / "gpt2")
    assert not torch.allclose(base.eval()(idx)[0], merged(idx)[0])  # the adapters did change the model
    texts = sample_mod.sample(load_config(sample_mod.SampleConfig, [f"--out_dir={tmp_path / 'a'}", "--device=cpu",
                                                                    "--num_samples=1", "--max_new_tokens=5"]))
    assert len(texts) == 1
    export_mod.export(load_config(export_mod.ExportConfig, [f"--out_dir={tmp_path / 'a'}",
                                                            f"--hf_dir={tmp_path / 'hf'}",
                                                            f"--merged_ckpt={tmp_path / 'm.pt'}"]))
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        ours = merged(idx)[0]
        torch.testing.assert_close(hf(idx).logits[..., :50257], ours, rtol=1e-4, atol=1e-4)
    m = checkpoint.load_model(read_checkpoint(tmp_path / "m.pt")).eval()
    torch.testing.assert_close(m(idx)[0], ours, rtol=1e-5, atol=1e-5)


def test_lora_bad_input(gpt2_setup, tiny_flags, tmp_path, capsys):
    root = gpt2_setup
    err = error_of(train_mod.main, bpe_flags(root, tmp_path / "x", "--lora_rank=4", "--lora_targets=q_proj"), capsys)
    assert "unknown LoRA target 'q_proj'" in err
    err = error_of(train_mod.main, tiny_flags + ["--lora_rank=4"], capsys)
    assert "adapts pretrained weights" in err


def test_adapter_onto_a_base_of_another_shape_is_refused(gpt2_setup, tmp_path):
    transformers = pytest.importorskip("transformers")
    root = gpt2_setup
    run(bpe_flags(root, tmp_path / "a", "--lora_rank=2", "--max_iters=1"))
    ckpt = read_checkpoint(tmp_path / "a" / "ckpt.pt")
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=48, n_positions=64,
                                                                 vocab_size=50257))
    other.save_pretrained(tmp_path / "other")
    ckpt["init_source"] = str(tmp_path / "other")  # as if the base directory had been replaced
    with pytest.raises(ValueError, match="n_embd=32, base has n_embd=48"):
        checkpoint.load_model(ckpt)
