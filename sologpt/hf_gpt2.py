"""Hugging Face GPT-2 checkpoint directories in and out: load(path) builds a GPT from config.json plus
model.safetensors or pytorch_model.bin (any of the four sizes, or a small one made with transformers), and
save(model, path) writes a directory that transformers.GPT2LMHeadModel.from_pretrained loads with the same logits.

GPT-2 stores its four block matrices as Conv1D, (in, out): the transpose of nn.Linear's (out, in).
"""

import json
import os
from pathlib import Path

import torch

from model import GPT, GPTConfig

_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def load(path, **overrides):
    """Load a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin), any size.
    overrides set other GPTConfig fields: dropout, attn_impl, vocab_pad_multiple (which adds embedding rows);
    not the shape or tie_embeddings, which config.json decides."""
    path = Path(path)
    hf_config = _read_hf_config(path)
    config = GPTConfig(block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"],
                       n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
                       bias=True, tie_embeddings=hf_config.get("tie_word_embeddings", True), **overrides)
    model = GPT(config)
    hf = _read_hf_weights(path)
    hf = {k.removeprefix("transformer."): v for k, v in hf.items()}  # GPT2LMHeadModel vs GPT2Model names
    sd = model.state_dict()
    problems = []
    for name, param in sd.items():
        if name == "lm_head.weight" and config.tie_embeddings:
            continue  # the same tensor as wte
        hf_name = name.removeprefix("transformer.")
        if hf_name not in hf:
            problems.append(f"{hf_name} is missing")
            continue
        w = hf[hf_name]
        if hf_name.endswith(_CONV1D):  # GPT-2 stores these as Conv1D: (in, out), the transpose of nn.Linear
            w = w.t()
        if hf_name in ("wte.weight", "lm_head.weight"):
            param = param[:config.vocab_size]  # the real tokens; padding rows keep their init
        if w.shape != param.shape:
            problems.append(f"{hf_name} has shape {tuple(w.shape)}, expected {tuple(param.shape)}")
            continue
        with torch.no_grad():
            param.copy_(w)
    if problems:
        raise ValueError(f"{path} does not hold a GPT-2 of the shape its config.json says: " + "; ".join(problems))
    return model


def check_exportable(model):
    """ValueError unless the model has GPT-2's architecture (what GPT2LMHeadModel can hold)."""
    c = model.config
    if c.bias is False:
        raise ValueError("a model with bias=False cannot be exported as GPT-2, which has biases")
    if c.modern_options():
        raise ValueError(f"a model with {', '.join(c.modern_options())} cannot be exported as GPT-2, which has "
                         f"none of these: keep the sologpt checkpoint (sample.py and tools/score.py read it)")
    if c.n_classes > 0:
        raise ValueError("a classifier (n_classes > 0) cannot be exported as GPT2LMHeadModel")
    if c.n_tags > 0:
        raise ValueError("a tagger (n_tags > 0) cannot be exported as GPT2LMHeadModel")


def save(model, path):
    """Write a Hugging Face GPT-2 directory that transformers.GPT2LMHeadModel.from_pretrained loads (the tokenizer
    files are sologpt/hf_tokenizer.py's). Uses safetensors when installed (it comes with transformers), else
    pytorch_model.bin; the files get the permissions of the user's umask."""
    check_exportable(model)
    c = model.config
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    hf_config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                     n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                     n_head=c.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=c.dropout,
                     embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=1e-5,
                     initializer_range=0.02, tie_word_embeddings=c.tie_embeddings)
    if c.vocab_size > 50256:  # GPT-2's <|endoftext|>, where the vocabulary has it
        hf_config.update(bos_token_id=50256, eos_token_id=50256)
    else:  # a smaller vocabulary (characters) has no such token: say so, or transformers assumes 50256
        hf_config.update(bos_token_id=None, eos_token_id=None)
    (path / "config.json").write_text(json.dumps(hf_config, indent=2))
    tensors = {}
    for name, t in model.state_dict().items():
        if name == "lm_head.weight" and c.tie_embeddings:  # the same tensor as wte
            continue
        t = t.detach().float().cpu()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:c.vocab_size]  # without vocab padding
        tensors[name] = (t.t() if name.endswith(_CONV1D) else t).contiguous()
    try:
        from safetensors.torch import save_file
    except ImportError:
        torch.save(tensors, path / "pytorch_model.bin")
    else:
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
        os.chmod(path / "model.safetensors", 0o666 & ~current_umask())  # safetensors creates it 0600


def current_umask():
    """The process's umask (os.umask can only be read by setting it, so it is set back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _read_hf_config(path):
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"{f} is missing: point init_from at a Hugging Face GPT-2 directory (config.json + weights)")
    try:
        cfg = json.loads(f.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}): download or export the directory again")
    if not isinstance(cfg, dict):
        raise ValueError(f"{f} is not a JSON object: download or export the directory again")
    for key in ("n_positions", "vocab_size", "n_layer", "n_head", "n_embd"):
        if type(cfg.get(key)) is not int or cfg[key] < 1:
            raise ValueError(f"{f}: {key}={cfg.get(key)!r} is not a positive integer: download or export it again")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{f} describes a {cfg.get('model_type')!r} model; only GPT-2 directories load here")
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{f}: activation_function={cfg['activation_function']!r} is not GPT-2's tanh GELU")
    defaults = dict(layer_norm_epsilon=1e-5, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False)
    for key, value in defaults.items():  # fields that would change the outputs of this implementation
        if cfg.get(key, value) != value:
            raise ValueError(f"{f}: {key}={cfg[key]!r} is not supported (only GPT-2's {value!r})")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise ValueError(f"{f}: n_inner={cfg['n_inner']} differs from 4 * n_embd; this GPT only has 4x MLPs")
    return cfg


def _read_hf_weights(path):
    if (path / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}/model.safetensors needs the safetensors package: pip install safetensors")
        try:
            return load_file(path / "model.safetensors")
        except Exception as e:  # safetensors' own error type for a truncated or foreign file
            raise ValueError(f"{path}/model.safetensors cannot be read ({type(e).__name__}: {str(e)[:100]}): "
                             f"download or export it again")
    if (path / "pytorch_model.bin").is_file():
        try:
            return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:  # weights_only refuses pickled code; a damaged file fails too
            raise ValueError(f"{path}/pytorch_model.bin cannot be read as tensors only ({type(e).__name__}: "
                             f"{(str(e).splitlines() or [''])[0][:100]}): it is damaged, or holds pickled code, which "
                             f"is never run; use model.safetensors or download it again")
    raise ValueError(f"{path} has no model.safetensors or pytorch_model.bin")
