"""4-bit NormalFloat (NF4) weights with double-quantized scales, after QLoRA (Dettmers et al. 2023, "QLoRA:
Efficient Finetuning of Quantized LLMs", sections 3 and appendix E): the frozen base of a LoRA run (train.py
base_dtype="nf4", wired in sologpt/memory.py) in about 4.127 bits per weight instead of 16 or 32.

The format of one weight matrix W (out, in), read as one flat row-major vector cut into blocks of 64:
    codes     4 bits per weight, two per byte: index into the 16 NF4 levels (nf4_levels)
    absmax    one scale per block of 64, itself quantized ("double quantization"): its logarithm, less the mean
              over the tensor, as int8 in blocks of 256 scales, one float32 step per block of 256
    W ~ level[code] * absmax[block]
Bits per weight: 4 + 8 / 64 + 32 / (64 * 256) = 4.127 (QLoRA, section 3), plus one float32 mean per tensor.
QLoRA quantizes the scales to 8-bit floats (a relative precision of a few percent); this codes their logarithms as
int8, the same relative precision for every scale, which is finer at the spread of scales of a weight matrix
(tests/test_nf4.py bounds what it adds to the error, also with outlier blocks).
A tensor whose size is not a multiple of 64 (or whose block count is not a multiple of 256) is zero-padded; the
padding is cut off again when dequantized.

Why NF4: weights of a trained network are close to normally distributed, and the NF4 levels are quantiles of
N(0, 1) scaled to [-1, 1], so each level is used about equally often (information-theoretically optimal for normal
data, QLoRA section 3), with an exact zero. A uniform 4-bit grid (quantize.quantize_int4) spends levels on the
rarely reached tails.

NF4Linear's forward dequantizes its weight to the compute dtype (autocast's, or the input's), one layer at a time,
and runs an ordinary matmul; backward dequantizes again instead of keeping the float weight for the gradient of
the input, so a model of NF4 layers holds no float copy of its base between forward and backward. The weight
gets no gradient (it is a buffer).
"""

import functools

import torch
import torch.nn as nn
import torch.nn.functional as F

BLOCK = 64  # weights per absmax scale (QLoRA, section 3)
SCALE_BLOCK = 256  # absmax scales per float32 second-level scale (QLoRA, section 3)
TINY = 1e-12  # the smallest scale: an all-zero block quantizes to the exact zero level without dividing by 0


@functools.cache
def nf4_levels():
    """The 16 NF4 levels (float32, ascending), computed from their definition (QLoRA, section 3 and appendix E):
    quantiles of N(0, 1), 8 for the non-negative half and 7 for the negative half so that 0 is a level exactly,
    then divided by the largest so that they span [-1, 1]. The outermost quantiles are taken at probability
    offset = 1 - (1/32 + 1/30) / 2, halfway between the end points 1 - 1/(2*16) and 1 - 1/(2*15) of the two
    halves' grids (the value bitsandbytes' create_normal_map uses, 0.9677083), since the quantile at 1 is
    infinite. Computed in float64, once per process (cached), never at import."""
    offset = 1 - (1 / 32 + 1 / 30) / 2
    positive = torch.special.ndtri(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    negative = -torch.special.ndtri(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    levels = torch.cat((positive, negative, torch.zeros(1, dtype=torch.float64))).sort().values
    return (levels / levels.abs().max()).float()


def _byte_table():
    """(256, 2) float32: the two levels a packed byte holds, low nibble first, so one lookup per byte decodes
    two weights (an index tensor per byte is half the size of one per weight)."""
    levels, byte = nf4_levels(), torch.arange(256)
    return torch.stack((levels[byte & 0xF], levels[byte >> 4]), dim=1)  # (256, 2)


def _pad_to(x, multiple):
    return F.pad(x, (0, -x.numel() % multiple))


def quantize_nf4(w):
    """w (any shape, float) -> (packed uint8 (ceil(numel / 64) * 32,), absmax_code int8 (nblocks padded to 256),
    absmax_scale float32 (nblocks / 256,), absmax_mean float32 ()). Each weight is divided by its block's absmax
    and rounded to the nearest NF4 level (bucketize against the midpoints: no (numel, 16) distance matrix)."""
    levels = nf4_levels().to(w.device)
    blocks = _pad_to(w.detach().float().reshape(-1), BLOCK).view(-1, BLOCK)  # (nblocks, 64)
    absmax = blocks.abs().amax(dim=1)  # (nblocks,)
    normed = blocks / absmax.clamp(min=TINY)[:, None]  # in [-1, 1]
    codes = torch.bucketize(normed, (levels[1:] + levels[:-1]) / 2).to(torch.uint8)  # (nblocks, 64) in [0, 15]
    pairs = codes.view(-1, 2)  # (numel / 2, 2)
    packed = pairs[:, 0] | (pairs[:, 1] << 4)  # (numel / 2,), even positions in the low nibble
    return (packed, *quantize_scales(absmax))


def quantize_scales(absmax):
    """Double quantization (QLoRA, section 3): the block scales as int8 in blocks of 256, each block with one
    float32 step. The scales are coded by their logarithm, centred on its mean over the tensor, so every scale
    keeps the same relative precision: a block of tiny weights beside blocks of outliers (which a linear code
    would round to one value, or below zero) is as exact as the rest. An all-zero block (absmax 0) has code -128
    and scale 0."""
    zero = absmax <= TINY
    logs = absmax.clamp(min=TINY).log()
    mean = logs[~zero].mean() if bool((~zero).any()) else logs.new_zeros(())
    centred = _pad_to(torch.where(zero, 0.0, logs - mean), SCALE_BLOCK).view(-1, SCALE_BLOCK)  # (nblocks / 256, 256)
    step = (centred.abs().amax(dim=1) / 127).clamp(min=TINY)  # (nblocks / 256,)
    code = (centred / step[:, None]).round().clamp(-127, 127).to(torch.int8).view(-1)
    code[:absmax.numel()][zero] = -128
    return code, step, mean


def dequantize_scales(code, step, mean):
    """The block scales (float32, padded length) back from quantize_scales."""
    scales = torch.exp((code.view(-1, SCALE_BLOCK).float() * step[:, None]).view(-1) + mean)  # (nblocks padded,)
    return torch.where(code == -128, 0.0, scales)


def dequantize_nf4(packed, absmax_code, absmax_scale, absmax_mean, shape, dtype=torch.float32, table=None):
    """The weight of shape `shape` in `dtype` from quantize_nf4's tensors. table: _byte_table() on packed's device
    (NF4Linear keeps one), else built here."""
    table = (_byte_table().to(packed.device) if table is None else table).to(dtype)
    absmax = dequantize_scales(absmax_code, absmax_scale, absmax_mean).to(dtype)
    values = F.embedding(packed.int(), table)  # (numel / 2, 2): both weights of each byte
    blocks = values.view(-1, BLOCK) * absmax[:values.numel() // BLOCK, None]  # (nblocks, 64)
    return blocks.view(-1)[:torch.Size(shape).numel()].view(shape)


def bits_per_weight(layer):
    """Stored bits per weight of an NF4Linear, scales included (bias excluded)."""
    tensors = (layer.weight, layer.absmax_code, layer.absmax_scale, layer.absmax_mean)
    return 8 * sum(t.numel() * t.element_size() for t in tensors) / (layer.in_features * layer.out_features)


class _NF4Matmul(torch.autograd.Function):
    """x @ W.T with W dequantized in forward and again in backward: only the 4-bit tensors are kept for backward,
    never the float weight (which autograd would keep for F.linear's input gradient). No gradient for W."""

    @staticmethod
    def forward(ctx, x, packed, absmax_code, absmax_scale, absmax_mean, table, shape):
        ctx.save_for_backward(packed, absmax_code, absmax_scale, absmax_mean, table)
        ctx.shape = shape
        return F.linear(x, dequantize_nf4(packed, absmax_code, absmax_scale, absmax_mean, shape, x.dtype, table))

    @staticmethod
    def backward(ctx, grad):
        w = dequantize_nf4(*ctx.saved_tensors[:4], ctx.shape, grad.dtype, ctx.saved_tensors[4])  # (out, in)
        return grad @ w, None, None, None, None, None, None


class NF4Linear(nn.Module):
    """A frozen Linear with NF4 weights; buffers only, like quantize.Int8Linear, so it has no gradient or optimizer
    state and serves as the base under a LoRA adapter. State dict keys: weight (packed uint8), absmax_code,
    absmax_scale, absmax_mean, bias. Gradients flow to the input, not to the weight."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        nblocks = -(-in_features * out_features // BLOCK)
        nscale = -(-nblocks // SCALE_BLOCK)
        self.register_buffer("weight", torch.zeros(nblocks * BLOCK // 2, dtype=torch.uint8))
        self.register_buffer("absmax_code", torch.zeros(nscale * SCALE_BLOCK, dtype=torch.int8))
        self.register_buffer("absmax_scale", torch.ones(nscale))
        self.register_buffer("absmax_mean", torch.zeros(()))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.register_buffer("table", _byte_table(), persistent=False)  # follows .to(device); not saved

    @classmethod
    def from_linear(cls, linear):
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None).to(linear.weight.device)
        with torch.no_grad():
            layer.weight, layer.absmax_code, layer.absmax_scale, layer.absmax_mean = quantize_nf4(linear.weight)
            if linear.bias is not None:
                layer.bias = linear.bias.detach().float().clone()
        return layer

    def dequantize(self, dtype=torch.float32):
        return dequantize_nf4(self.weight, self.absmax_code, self.absmax_scale, self.absmax_mean,
                              (self.out_features, self.in_features), dtype, self.table)  # (out, in)

    def forward(self, x):
        # the compute dtype: autocast's when it is on (bf16 on a GPU: the weight is built in 16 bits), else x's
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        y = _NF4Matmul.apply(x.to(dtype), self.weight, self.absmax_code, self.absmax_scale, self.absmax_mean,
                             self.table, (self.out_features, self.in_features))
        return y if self.bias is None else y + self.bias.to(dtype)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
