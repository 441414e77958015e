"""Weight-only quantization of a GPT's Linear layers: int8 per output channel, or int4 in groups. The command line
is tools/quantize.py; sologpt/checkpoint.py writes and reads quantized checkpoints.

    python -m tools.quantize --ckpt out/ckpt.pt --mode int8                  # -> out/ckpt_int8.pt
    python -m tools.quantize --ckpt out/ckpt.pt --mode int4 --group_size 64  # -> out/ckpt_int4.pt

Only the weights are stored in few bits; activations stay float. On the CPU an int8 layer runs torch's int8
weight-only kernel (int8_matmul), which reads the int8 weight as it multiplies: faster than float32 there. Elsewhere,
and for int4, each forward rebuilds the float weight of one layer at a time (dequantize, then an ordinary matmul),
which saves memory (checkpoint, GPU, download), not time.

What is quantized: every nn.Linear inside model.transformer.h (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj),
which hold most of the weights of a GPT, and an untied output layer (tie_embeddings=False: lm_head has its own
matrix, at GPT-2 124M shape about a quarter of all the weights; --keep_head leaves it float). The token embedding stays
float, and so does a tied lm_head (one tensor is both the input embedding and the output matmul), since quantizing
it would either untie the two, storing the matrix twice, or force the embedding lookup through dequantization too.
Position embeddings, LayerNorms and biases stay float as well (they are tiny).

Also here: fake quantization for quantization-aware training (train.py qat = "int8" / "int4": enable_qat /
disable_qat), which trains the float weights through exactly the rounding that quantize_model later applies.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

MODES = ("int8", "int4")


def check(cfg):
    """qat's values (train.py)."""
    if cfg.qat and (cfg.base_dtype != "fp32" or cfg.fp8 or cfg.fp8_head or cfg.lora_rank):
        raise ValueError("qat cannot be combined with base_dtype, fp8, fp8_head or lora_rank: the fake-quantized "
                         "layers would be skipped or would not be what is exported")
    if cfg.qat not in ("", *MODES):
        raise ValueError(f"qat={cfg.qat!r} is unknown: use '', 'int8' or 'int4'")
TINY = 1e-12  # the smallest scale: an all-zero row or a constant group then quantizes to 0 without dividing by 0


# ---- the rounding (shared by the real layers and fake quantization, so both give the same numbers) ----------

def quantize_int8(w):
    """Symmetric per-output-channel int8: w (out, in) -> q int8 (out, in), scale (out,) with w ~ q * scale.
    Symmetric absmax (zero maps to 0, range [-127, 127]; -128 is left out so that q and -q both exist), as in
    LLM.int8 (Dettmers et al. 2022). One scale per row keeps a row with large weights from crushing the others."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=TINY)  # (out,)
    q = (w / scale[:, None]).round().clamp(-127, 127).to(torch.int8)  # (out, in)
    return q, scale


def dequantize_int8(q, scale):
    return q.to(scale.dtype) * scale[:, None]  # (out, in)


def int8_matmul(x, q, scale, bias=None):
    """F.linear(x, dequantize_int8(q, scale), bias): x (..., in) -> (..., out), in the dtype F.linear would give
    (x's, or autocast's). On the CPU, under no_grad (inference; the kernel has no gradient), torch's int8 weight-only
    kernel (aten._weight_int8pack_mm) with bf16 activations: it never builds the float weight, where dequantizing
    writes and reads 4 bytes per weight on every call (5x slower than float32 at batch 1). Its float32 input path
    is not vectorised (10x slower than bf16 on a 2-core AVX-512 CPU), hence bf16; it accumulates in float32, so the
    output differs from float only by bf16 rounding of the activations and of the result (tests/test_quantize.py
    bounds it)."""
    if x.device.type == "cpu" and not torch.is_grad_enabled():  # inference only: training keeps one numerics
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, x.size(-1)).bfloat16(), q, scale.bfloat16())
        y = y.to(dtype).view(*x.shape[:-1], q.size(0))  # (..., out)
        return y if bias is None else y + bias.to(dtype)
    return F.linear(x, dequantize_int8(q, scale).to(x.dtype), None if bias is None else bias.to(x.dtype))


def quantize_int4(w, group_size):
    """Asymmetric group-wise 4-bit: w (out, in) -> q uint8 in [0, 15] (out, in), scale and zero (out, in // gs),
    with w ~ q * scale + zero in each group of group_size consecutive inputs.
    Asymmetric because 16 levels are few: spanning each group's [min, max] uses all of them, where a symmetric
    grid spans [-absmax, absmax] and wastes levels on whichever side the group does not reach. zero is the group
    minimum in float (like llama.cpp's Q4_1) rather than an integer zero point, so the error bound is exactly
    scale / 2. It costs a second float per group: 8 bytes per group_size weights, 0.5 bit per weight at 128."""
    out_features, in_features = w.shape
    groups = w.float().reshape(out_features, in_features // group_size, group_size)  # (out, in // gs, gs)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)  # (out, in // gs)
    scale = ((hi - lo) / 15).clamp(min=TINY)
    q = ((groups - lo[..., None]) / scale[..., None]).round().clamp(0, 15).to(torch.uint8)  # (out, in // gs, gs)
    return q.reshape(out_features, in_features), scale, lo  # (out, in), (out, in // gs), (out, in // gs)


def dequantize_int4(q, scale, zero):
    out_features, in_features = q.shape
    groups = q.reshape(out_features, scale.size(1), -1).to(scale.dtype)  # (out, in // gs, gs)
    return (groups * scale[..., None] + zero[..., None]).reshape(out_features, in_features)  # (out, in)


def pack_int4(q):
    """Two 4-bit values per byte: q uint8 (out, in) in [0, 15] -> (out, in // 2); even columns in the low nibble."""
    pairs = q.reshape(q.size(0), -1, 2)  # (out, in // 2, 2)
    return pairs[..., 0] | (pairs[..., 1] << 4)  # (out, in // 2)


def unpack_int4(packed):
    """The inverse of pack_int4: (out, in // 2) uint8 -> (out, in) uint8 in [0, 15]."""
    pairs = torch.stack((packed & 0xF, packed >> 4), dim=-1)  # (out, in // 2, 2)
    return pairs.reshape(packed.size(0), -1)  # (out, in)


# ---- the layers ------------------------------------------------------------------------------------------

class Int8Linear(nn.Module):
    """A frozen Linear with int8 weights. Everything is a buffer, bias included: the layer has no parameters,
    so it costs no gradient or optimizer memory, and .to(device) / state_dict work as usual (keys: weight,
    scale, bias). Gradients still flow to its input, so it can serve as the frozen base under a LoRA adapter
    (QLoRA-style): an adapter needs only in_features, out_features and forward(x) from the module it wraps."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear):
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        with torch.no_grad():
            layer.weight, layer.scale = quantize_int8(linear.weight)
            if linear.bias is not None:
                layer.bias = linear.bias.detach().clone()
        return layer  # every buffer now lives on the Linear's device

    def dequantize(self):
        return dequantize_int8(self.weight, self.scale)  # (out, in)

    def forward(self, x):
        # in x's dtype: float32 on a CPU, bfloat16 inside attention under autocast (which would cast it anyway)
        return int8_matmul(x, self.weight, self.scale, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Int4Linear(nn.Module):
    """A frozen Linear with 4-bit weights in groups of group_size inputs, two per byte; buffers only, like
    Int8Linear (keys: weight (out, in // 2) uint8, scale and zero (out, in // group_size), bias).
    in_features must be a multiple of group_size: GPT widths (n_embd, 4 * n_embd) are multiples of 64 or 128,
    so a clear error is simpler than padding every row and carrying the padding through packing."""

    def __init__(self, in_features, out_features, bias=True, group_size=128):
        super().__init__()
        check_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.register_buffer("weight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // group_size))
        self.register_buffer("zero", torch.zeros(out_features, in_features // group_size))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_linear(cls, linear, group_size=128):
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, group_size=group_size)
        with torch.no_grad():
            q, layer.scale, layer.zero = quantize_int4(linear.weight, group_size)
            layer.weight = pack_int4(q)
            if linear.bias is not None:
                layer.bias = linear.bias.detach().clone()
        return layer

    def dequantize(self):
        return dequantize_int4(unpack_int4(self.weight), self.scale, self.zero)  # (out, in)

    def forward(self, x):
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize().to(x.dtype), bias)

    def extra_repr(self):
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"group_size={self.group_size}")


def check_group_size(in_features, group_size, where="a layer"):
    if group_size < 2 or group_size % 2:
        raise ValueError(f"group_size={group_size} must be an even number >= 2 (two 4-bit values share a byte)")
    if in_features % group_size:
        raise ValueError(f"group_size={group_size} does not divide in_features={in_features} of {where}: "
                         f"use a divisor such as {math.gcd(in_features, group_size)}")


# ---- whole models ----------------------------------------------------------------------------------------

def _checked_targets(model, mode, group_size, skip):
    """(parent module, attribute, Linear) for each nn.Linear inside model.transformer.h that skip does not name,
    and for lm_head when it is untied and not skipped, after checking mode and group size for all of them, so an
    error leaves the model as it was. A skip entry matches a full name or its ending, e.g. "attn.c_proj",
    "h.0.mlp.c_fc" or "lm_head"."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use 'int8' or 'int4'")
    candidates = [(f"{parent_name}.{attr}", parent, attr, child)
                  for parent_name, parent in model.transformer.h.named_modules(prefix="transformer.h")
                  for attr, child in parent.named_children()]
    if model.lm_head.weight is not model.transformer.wte.weight:  # untied: its own matrix (tied: it is wte)
        candidates.append(("lm_head", model, "lm_head", model.lm_head))
    found = []
    for name, parent, attr, child in candidates:
        if isinstance(child, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
            if mode == "int4":
                check_group_size(child.in_features, group_size, name)
            found.append((parent, attr, child))
    return found


def quantization_mode(model):
    """The mode of the model's quantized layers ("int8" or "int4"), or None for a float model."""
    for m in model.modules():
        if isinstance(m, Int8Linear):
            return "int8"
        if isinstance(m, Int4Linear):
            return "int4"
    return None


def quantize_model(model, mode, group_size=128, skip=()):
    """Replace the Linear layers in model.transformer.h, and an untied lm_head, by Int8Linear or Int4Linear, in
    place; return model. group_size is used by int4 only. A tied lm_head is never touched (it is the float
    embedding); skip may name layers to leave in float ("lm_head" keeps an untied one float). A model under QAT
    is quantized from its float weights, which gives exactly the values its fake quantization trained with."""
    if quantization_mode(model) is not None:
        raise ValueError(f"the model is already quantized ({quantization_mode(model)}): start from a float model")
    for parent, attr, linear in _checked_targets(model, mode, group_size, skip):
        if mode == "int8":
            setattr(parent, attr, Int8Linear.from_linear(linear))
        else:
            setattr(parent, attr, Int4Linear.from_linear(linear, group_size))
    return model


# ---- measuring -----------------------------------------------------------------------------------------

def state_dict_bytes(state_dict):
    """Bytes of a state dict's tensors, each storage once (lm_head.weight and wte share one)."""
    seen = {}
    for t in state_dict.values():
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


# ---- quantization-aware training -------------------------------------------------------------------------

class _FakeQuantize(torch.autograd.Function):
    """Forward: quantize then dequantize, with the real layers' functions. Backward: the gradient passes
    unchanged (straight-through estimator, Bengio et al. 2013), since rounding has zero gradient almost
    everywhere. The usual one-liner w + (q - w).detach() rounds in float and can differ from q by one ulp;
    a Function returns q exactly."""

    @staticmethod
    def forward(ctx, w, mode, group_size):
        if mode == "int8":
            return dequantize_int8(*quantize_int8(w)).to(w.dtype)
        return dequantize_int4(*quantize_int4(w, group_size)).to(w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def fake_quantize_weight(w, mode, group_size=128):
    """w (out, in) -> the weight Int8Linear / Int4Linear would compute from it, with an identity gradient."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is unknown: use 'int8' or 'int4'")
    if mode == "int4":
        check_group_size(w.size(1), group_size)
    return _FakeQuantize.apply(w, mode, group_size)


class QATLinear(nn.Linear):
    """An nn.Linear whose forward uses its weight fake-quantized. It holds the very same weight and bias
    Parameters as the Linear it replaced, so state_dict keys, checkpoints and an optimizer built before
    enable_qat are all unchanged (torch.nn.utils.parametrize would rename weight to parametrizations.weight...)."""

    def __init__(self, linear, mode, group_size):
        super().__init__(linear.in_features, linear.out_features, bias=False, device="meta")  # no new storage
        self.weight, self.bias = linear.weight, linear.bias
        self.mode, self.group_size = mode, group_size

    def forward(self, x):
        return F.linear(x, fake_quantize_weight(self.weight, self.mode, self.group_size), self.bias)

    def extra_repr(self):
        return super().extra_repr() + f", mode={self.mode}, group_size={self.group_size}"


def enable_qat(model, mode, group_size=128, skip=()):
    """Make the Linear layers that quantize_model would replace train through fake quantization, in place.
    Calling it again changes the mode. Return model."""
    if quantization_mode(model) is not None:
        raise ValueError("QAT needs the float weights, but the model is already quantized")
    for parent, attr, linear in _checked_targets(model, mode, group_size, skip):
        setattr(parent, attr, QATLinear(linear, mode, group_size))
    return model


def disable_qat(model):
    """Back to plain nn.Linear layers (holding the same Parameters); return model."""
    for parent in list(model.modules()):
        for attr, child in list(parent.named_children()):
            if isinstance(child, QATLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=False, device="meta")
                plain.weight, plain.bias = child.weight, child.bias
                setattr(parent, attr, plain)
    return model
