"""LoRA adapters (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") for sologpt's GPT.

A LoRA layer keeps a pretrained Linear frozen and learns a low-rank update beside it:

    y = base(x) + dropout(x) @ A^T @ B^T * alpha / rank        A: (rank, in), B: (out, rank)

B starts at zero, so a freshly wrapped model computes exactly what the base computed. Only A and B train: no
gradients or optimizer state for the base, and the result is a file of a few MB instead of a whole model.

    names = apply_lora(model, rank=8, alpha=16, targets="attn,mlp")    # before torch.compile
    ... train as usual: only the adapters require grad ...
    torch.save(adapter_checkpoint(model), "adapter.pt")
    load_adapter(fresh_base, read_adapter("adapter.pt"))              # later, onto the same base
    merge_lora(model)                                                  # -> a plain GPT, adapters folded in

Targets name the Linear layers of every block (model.transformer.h[i]):

    "c_attn"        attn.c_attn   q, k, v in one matmul (the paper adapts q and v; c_attn holds all three)
    "attn.c_proj"   attn.c_proj   attention output
    "c_fc"          mlp.c_fc      MLP up-projection
    "mlp.c_proj"    mlp.c_proj    MLP down-projection
    groups: "attn" = c_attn + attn.c_proj, "mlp" = c_fc + mlp.c_proj, "all" = all four

A bare "c_proj" is refused: attn and mlp both have one, so say which. A string may list several: "attn,c_fc".

Adapter file: {"format": "sologpt-lora", "version": 1, "lora": {rank, alpha, dropout, targets},
"base": {"model_config", "fingerprint"[, "info"]}, "adapter": {"transformer.h.0.attn.c_attn.lora_A": ...}},
tensors and plain values only, so torch.load(weights_only=True) reads it. A base of another shape is refused
(ValueError naming the field). Base weights that differ from the fingerprint only warn by default (strict=True
refuses): the same base cast to bf16 still matches, but a deliberately further-trained base is the user's call.
"""

import dataclasses
import math
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import GPTConfig

FORMAT, VERSION = "sologpt-lora", 1  # bump VERSION when the adapter file's layout changes

TARGETS = {"c_attn": "attn.c_attn", "attn.c_proj": "attn.c_proj", "c_fc": "mlp.c_fc", "mlp.c_proj": "mlp.c_proj"}
GROUPS = {"attn": ("c_attn", "attn.c_proj"), "mlp": ("c_fc", "mlp.c_proj"), "all": tuple(TARGETS)}
# GPTConfig fields that fix the base's shapes and what its layers compute: an adapter means nothing on a base where
# one differs. block_size is not among them: crop_block_size drops positions but leaves every adapted layer as it was.
SHAPE_FIELDS = ("n_layer", "n_head", "n_embd", "vocab_size", "bias", "rope", "norm", "qk_norm", "mlp_act",
                "tie_embeddings")
FINGERPRINT_SAMPLES = 8  # values kept per base tensor: a different base is caught with near certainty


class LoRALinear(nn.Module):
    """base(x) plus a trainable low-rank update. base is an nn.Linear or anything with in_features, out_features
    and forward(x) (e.g. a weight-only int8 Linear): the forward pass never touches base.weight."""

    def __init__(self, base, rank, alpha, dropout=0.0):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.rank, self.alpha, self.dropout_p = rank, alpha, dropout
        # the paper's alpha / rank: with alpha fixed, trying another rank needs no new learning rate (section 4.1)
        self.scale = alpha / rank
        for p in base.parameters():
            p.requires_grad_(False)
        device, dtype = _device_and_dtype(base)
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device, dtype=dtype))
        # A as nn.Linear initializes its weight (Kaiming-uniform, a=sqrt(5)), which peft does too; B = 0 makes the
        # update B @ A zero, so training starts from exactly the base model (paper, section 4.1)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        # nn.Identity when off, so an adapter without dropout costs no extra kernel
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # a new module starts in train mode; follow the model instead

    def forward(self, x):
        h = F.linear(self.lora_dropout(x), self.lora_A)  # (..., rank): the narrow middle of the update
        return self.base(x) + F.linear(h, self.lora_B) * self.scale  # (..., out)

    def extra_repr(self):
        return f"rank={self.rank}, alpha={self.alpha}, scale={self.scale:g}"


def _device_and_dtype(base):
    """Where and in what precision the adapter lives: beside the base's first floating-point tensor (a bf16 base
    gets bf16 adapters, so a plain forward without autocast matches dtypes); float32 for a base without one."""
    tensors = [*base.parameters(), *base.buffers()]
    device = tensors[0].device if tensors else torch.device("cpu")
    floats = [t.dtype for t in tensors if t.is_floating_point()]
    return device, floats[0] if floats else torch.get_default_dtype()


def check(cfg):
    if cfg.lora_rank < 0:
        raise ValueError(f"lora_rank={cfg.lora_rank} must not be negative")
    if cfg.lora_rank and cfg.init_from == "scratch":
        raise ValueError("lora_rank > 0 adapts pretrained weights: set init_from to a GPT-2 directory or a checkpoint")
    if cfg.lora_rank:
        try:
            resolve_targets(cfg.lora_targets)
        except ValueError as e:
            raise ValueError(f"lora_targets: {e}")


def resolve_targets(targets):
    """Target names and groups (a list, or one comma-separated string as a CLI flag gives) -> names of TARGETS,
    each once, in block order."""
    if isinstance(targets, str):
        targets = targets.split(",")
    wanted = set()
    for t in targets:
        t = t.strip()
        if t in GROUPS:
            wanted.update(GROUPS[t])
        elif t in TARGETS:
            wanted.add(t)
        elif t == "c_proj":
            raise ValueError("LoRA target 'c_proj' is ambiguous (attn and mlp both have one): "
                             "use 'attn.c_proj', 'mlp.c_proj' or both")
        else:
            raise ValueError(f"unknown LoRA target {t!r}: valid targets are {', '.join([*TARGETS, *GROUPS])}")
    if not wanted:
        raise ValueError(f"no LoRA targets given: pick from {', '.join([*TARGETS, *GROUPS])}")
    return [t for t in TARGETS if t in wanted]


def _find_targets(model, targets):
    """(name, parent module, attribute, module) for each targeted layer of each block."""
    found = []
    for i, block in enumerate(model.transformer.h):
        for t in resolve_targets(targets):
            parent_path, attr = TARGETS[t].split(".")
            parent = block.get_submodule(parent_path)
            found.append((f"transformer.h.{i}.{TARGETS[t]}", parent, attr, getattr(parent, attr)))
    return found


def _lora_modules(model):
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRALinear)]


def apply_lora(model, rank, alpha, dropout=0.0, targets=("c_attn",)):
    """Wrap the targeted layers of every block in LoRALinear and freeze every other parameter of the model
    (embeddings and LayerNorms too): the adapters are all that trains. Returns the wrapped module names.
    Apply before torch.compile, so the compiled graph includes the adapters."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"LoRA rank={rank!r} must be an integer of at least 1 (4 to 64 is typical)")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha={alpha!r} must be positive (commonly rank or 2 * rank)")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout={dropout!r} must be in [0, 1)")
    if _lora_modules(model):
        raise ValueError("the model already has LoRA adapters: apply them once to a fresh model, "
                         "or merge_lora(model) first")
    found = _find_targets(model, targets)
    for name, _, _, module in found:  # check everything before changing anything
        if not (hasattr(module, "in_features") and hasattr(module, "out_features")):
            raise ValueError(f"{name} is a {type(module).__name__} without in_features/out_features: "
                             f"LoRA wraps Linear-like layers only")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, parent, attr, module in found:
        setattr(parent, attr, LoRALinear(module, rank, alpha, dropout))
    return [name for name, *_ in found]


def lora_state_dict(model):
    """Only the adapter tensors, keyed like 'transformer.h.0.attn.c_attn.lora_A'."""
    return {k: v for k, v in model.state_dict().items() if k.endswith((".lora_A", ".lora_B"))}


def lora_config(model):
    """The settings apply_lora was given, read back from the model's adapters."""
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters: call apply_lora(model, ...) first")
    m = mods[0][1]
    paths = {name.split(".", 3)[3] for name, _ in mods}  # "transformer.h.0.attn.c_attn" -> "attn.c_attn"
    return dict(rank=m.rank, alpha=m.alpha, dropout=m.dropout_p, targets=[t for t in TARGETS if TARGETS[t] in paths])


def base_fingerprint(model):
    """A few values at fixed positions of every base tensor, keyed by the names the plain model uses, to notice an
    adapter loaded onto other weights than it was trained on. Left out: the position embedding (crop_block_size
    shortens it), a tied lm_head (the same tensor as wte) and vocabulary padding rows (never trained)."""
    fingerprint = {}
    for name, t in model.state_dict().items():
        tied_head = name == "lm_head.weight" and model.config.tie_embeddings
        if name.endswith((".lora_A", ".lora_B")) or name == "transformer.wpe.weight" or tied_head \
                or name.startswith(("cls_head.", "tag_head.")):  # a task head trains beside the adapters
            continue
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[:model.config.vocab_size]
        t = t.detach().flatten()
        if t.numel() == 0 or not t.is_floating_point():  # a quantized layer's int8 weight says nothing about
            continue  # the float weight it came from, and may even share its name
        # evenly spaced positions in integer arithmetic, so a GPU and a CPU pick the same ones
        idx = torch.arange(FINGERPRINT_SAMPLES) * (t.numel() - 1) // (FINGERPRINT_SAMPLES - 1)
        name = name.replace(".base.", ".")  # a wrapped layer's "...c_attn.base.weight" -> "...c_attn.weight"
        fingerprint[name] = t[idx.to(t.device)].float().cpu()
    return fingerprint


def adapter_checkpoint(model, lora_cfg=None, base_info=None):
    """The adapter file's contents (see the module docstring). lora_cfg, when given (rank, alpha, dropout,
    targets), must agree with the model's adapters, so the file cannot describe other settings than it holds.
    base_info: optional plain values saying where the base came from (e.g. {"init_from": "gpt2"})."""
    cfg = lora_config(model)
    if lora_cfg is not None:
        given = dict(rank=lora_cfg["rank"], alpha=lora_cfg["alpha"], dropout=lora_cfg.get("dropout", 0.0),
                     targets=resolve_targets(lora_cfg["targets"]))
        for key, value in cfg.items():
            if given[key] != value:
                raise ValueError(f"lora_cfg says {key}={given[key]!r}, but the model's adapters have {key}={value!r}")
    base = {"model_config": dataclasses.asdict(model.config), "fingerprint": base_fingerprint(model)}
    if base_info:
        base["info"] = dict(base_info)
    adapter = {k: v.detach().to("cpu", copy=True) for k, v in lora_state_dict(model).items()}  # a snapshot
    return {"format": FORMAT, "version": VERSION, "lora": cfg, "base": base, "adapter": adapter}


def read_adapter(path):
    """torch.load an adapter file with weights_only=True (tensors and plain values, no code)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"adapter file {path} does not exist: check the path")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, ...: the file is damaged or not ours
        raise ValueError(f"{path} is not a readable adapter file ({type(e).__name__}): save it again")


def load_adapter(model, adapter_ckpt, strict=False):
    """Apply LoRA to a plain base model with the file's settings and load its tensors; returns the wrapped names.
    A base of another shape raises ValueError naming the field. Base weights unlike the fingerprint warn, or raise
    with strict=True. Nothing is changed unless everything checks out."""
    if not isinstance(adapter_ckpt, dict) or adapter_ckpt.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} adapter file (a full model checkpoint loads with GPT.from_checkpoint)")
    if adapter_ckpt.get("version") != VERSION:
        raise ValueError(f"adapter file version {adapter_ckpt.get('version')!r} is not supported: "
                         f"this code reads version {VERSION}")
    settings, base, tensors = (adapter_ckpt.get(k) for k in ("lora", "base", "adapter"))
    if not (isinstance(settings, dict) and {"rank", "alpha", "dropout", "targets"} <= set(settings)
            and isinstance(settings["targets"], (str, list, tuple)) and isinstance(base, dict)
            and isinstance(base.get("model_config"), dict) and isinstance(base.get("fingerprint", {}), dict)
            and isinstance(tensors, dict) and all(torch.is_tensor(t) for t in tensors.values())):
        raise ValueError("the adapter is damaged (its settings, base description or tensors are missing or of the "
                         "wrong type): save it again")
    default = dataclasses.asdict(GPTConfig())  # a field the file predates had its default value
    saved = {**default, **adapter_ckpt["base"]["model_config"]}
    have = dataclasses.asdict(model.config)
    diffs = [f"{f}={saved[f]!r}, base has {f}={have[f]!r}" for f in SHAPE_FIELDS if saved[f] != have[f]]
    if diffs:
        raise ValueError(f"adapter was trained on {'; '.join(diffs)}: load the base model it was trained on")

    # tensors only one side has (e.g. the scale of an int8 layer) cannot be compared and are skipped
    ours = base_fingerprint(model)
    for name, values in adapter_ckpt["base"].get("fingerprint", {}).items():
        # rtol 1e-2: the same base cast to bf16 (8 bits of mantissa) still matches; another base does not
        if name in ours and (not torch.is_tensor(values) or values.shape != ours[name].shape
                             or not torch.allclose(values, ours[name], rtol=1e-2, atol=1e-6)):
            msg = f"base weights differ from those the adapter was trained on (first at {name}): outputs may be off"
            if strict:
                raise ValueError(msg)
            warnings.warn(msg, stacklevel=2)
            break

    lora, tensors = adapter_ckpt["lora"], adapter_ckpt["adapter"]
    expected = {}
    for name, _, _, module in _find_targets(model, lora["targets"]):
        expected[f"{name}.lora_A"] = (lora["rank"], module.in_features)
        expected[f"{name}.lora_B"] = (module.out_features, lora["rank"])
    for key in sorted(expected.keys() | tensors.keys()):
        if key not in tensors or key not in expected or tuple(tensors[key].shape) != expected[key]:
            raise ValueError(f"adapter file is inconsistent at {key}: it does not match its own settings "
                             f"(rank={lora['rank']}, targets={lora['targets']}); save it again")
    names = apply_lora(model, lora["rank"], lora["alpha"], lora["dropout"], lora["targets"])
    with torch.no_grad():
        for key, t in lora_state_dict(model).items():
            t.copy_(tensors[key])  # state_dict tensors share storage with the parameters
    return names


def merge_lora(model):
    """Fold each adapter into its base weight (W += B @ A * scale) and put the plain nn.Linear back, so the model is
    an ordinary GPT again: the original state_dict keys, every parameter trainable, no extra cost per forward.
    Returns the merged names. Refused (and nothing changed) where a base is not a floating-point nn.Linear."""
    mods = _lora_modules(model)
    if not mods:
        raise ValueError("the model has no LoRA adapters to merge")
    for name, m in mods:
        if not (isinstance(m.base, nn.Linear) and m.base.weight.is_floating_point()):
            raise ValueError(f"{name} wraps {type(m.base).__name__}, which is not a floating-point nn.Linear, so the "
                             f"adapter cannot be folded into it: merge before quantizing, or keep the adapter separate")
    with torch.no_grad():
        for name, m in mods:
            w = m.base.weight  # (out, in)
            delta = (m.lora_B.float() @ m.lora_A.float()) * m.scale  # (out, in), in float32: one rounding at most
            w.copy_(w.float() + delta)
            parent_path, attr = name.rsplit(".", 1)
            setattr(model.get_submodule(parent_path), attr, m.base)
    for p in model.parameters():
        p.requires_grad_(True)
    return [name for name, _ in mods]
