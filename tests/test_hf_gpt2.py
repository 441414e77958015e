"""sologpt/hf_gpt2.py: Hugging Face GPT-2 directories load with transformers' logits (safetensors and
pytorch_model.bin, with and without the "transformer." prefix), export loads back in transformers, vocabulary
padding is dropped on export, and damaged directories give one clear error."""

import pytest
import torch

from conftest import make_model, perturb, rand_ids
from sologpt import hf_gpt2

V = 64  # vocabulary of the tiny models


@pytest.fixture
def hf_model():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=100)
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # HF init leaves biases and LayerNorms at 0 and 1: make every tensor matter
        for p in hf.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return hf


def hf_logits(hf, idx):
    with torch.no_grad():
        return hf(idx).logits


def test_from_pretrained_safetensors(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    model = hf_gpt2.load(tmp_path).eval()
    assert (model.config.block_size, model.config.vocab_size, model.config.n_layer) == (32, 100, 2)
    idx = rand_ids(2, 32, vocab=100)
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(ours, hf_logits(hf_model, idx), atol=1e-5, rtol=0)
    # overrides change non-shape fields
    assert hf_gpt2.load(tmp_path, attn_impl="math").config.attn_impl == "math"


@pytest.mark.parametrize("names", ["GPT2LMHeadModel", "GPT2Model"])  # with and without the "transformer." prefix
def test_from_pretrained_pytorch_bin(hf_model, tmp_path, names):
    try:
        hf_model.save_pretrained(tmp_path, safe_serialization=False)  # transformers 5 ignores the flag
    except TypeError:  # a transformers that dropped the option
        hf_model.config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink(missing_ok=True)
    sd = hf_model.state_dict() if names == "GPT2LMHeadModel" else hf_model.transformer.state_dict()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    model = hf_gpt2.load(tmp_path).eval()
    idx = rand_ids(2, 20, vocab=100)
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(ours, hf_logits(hf_model, idx), atol=1e-5, rtol=0)


def test_save_pretrained_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = perturb(make_model(vocab_size=100, block_size=32))
    hf_gpt2.save(model, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    idx = rand_ids(2, 32, vocab=100)
    with torch.no_grad():
        ours = model(idx)[0]
    torch.testing.assert_close(hf_logits(hf, idx), ours, atol=1e-5, rtol=0)
    # and the round trip through our own loader is exact
    again = hf_gpt2.load(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(again(idx)[0], ours)


def test_save_pretrained_refuses_no_bias(tmp_path):
    with pytest.raises(ValueError, match="bias"):
        hf_gpt2.save(make_model(bias=False), tmp_path)


def _edit_safetensors(path, edit):
    from safetensors.torch import load_file, save_file
    f = path / "model.safetensors"
    tensors = load_file(f)
    edit(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def test_from_pretrained_missing_tensor(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    _edit_safetensors(tmp_path, lambda t: t.pop("transformer.h.1.mlp.c_fc.weight"))
    with pytest.raises(ValueError, match=r"h\.1\.mlp\.c_fc\.weight is missing"):
        hf_gpt2.load(tmp_path)


def test_from_pretrained_misshaped_tensor(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)

    def shrink(t):
        t["transformer.h.0.attn.c_proj.bias"] = t["transformer.h.0.attn.c_proj.bias"][:16].clone()

    _edit_safetensors(tmp_path, shrink)
    with pytest.raises(ValueError, match=r"h\.0\.attn\.c_proj\.bias has shape \(16,\), expected \(32,\)"):
        hf_gpt2.load(tmp_path)


def test_from_pretrained_needs_config_and_weights(hf_model, tmp_path):
    hf_model.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ValueError, match="config.json"):
        hf_gpt2.load(tmp_path)
    hf_model.config.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors or pytorch_model.bin"):
        hf_gpt2.load(tmp_path)


def test_vocab_padding_with_gpt2_import_and_export(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=32,
                                                              vocab_size=100)).eval()
    hf.save_pretrained(tmp_path / "hf")
    ours = hf_gpt2.load(tmp_path / "hf", vocab_pad_multiple=64).eval()
    assert ours.transformer.wte.weight.shape == (128, 32)
    idx = torch.randint(100, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-4)
    hf_gpt2.save(ours, tmp_path / "out")  # exported without the padding rows
    back = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out").eval()
    assert back.transformer.wte.weight.shape == (100, 32)
    with torch.no_grad():
        torch.testing.assert_close(back(idx).logits, hf(idx).logits, atol=1e-5, rtol=1e-4)
