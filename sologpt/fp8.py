"""FP8 matmuls for training on Hopper-class GPUs (compute capability 8.9+): an option, `fp8 = True` in train.py.

Every nn.Linear inside the transformer blocks becomes an FP8Linear: same parameters (fp32 master weights, the
same state_dict keys, so checkpoints are unchanged), but its three matmuls (forward, grad of input, grad of
weight) run in 8-bit floating point through torch._scaled_mm, which on an H100/H200 has twice the bf16 peak.

Scaling is per tensor and dynamic: each operand is multiplied by (largest finite fp8 value / its absmax) before
the cast, so it uses the format's whole range, and _scaled_mm multiplies the result back. Activations and weights
use e4m3 (more mantissa), gradients e5m2 (more range), the usual split (Micikevicius et al. 2022, "FP8 Formats
for Deep Learning"). The forward saves the fp8 copies for backward, which also halves what the layer keeps.

`fp8_head = True` runs the output layer (at GPT-2 124M its matmuls are about a third of the model's matmul
FLOPs) in fp8, with or without `fp8` for the blocks; with tied weights the embedding lookup of the same tensor stays
an ordinary float lookup. At 768 wide only the head pays: its matmuls are large (tokens x 768 x 50304), while the
blocks' are small enough that measuring and casting each operand costs what fp8 saves (docs/performance.md).

The numbers differ from bf16 (3 mantissa bits instead of 7), so this is not the same function: tests check it
stays close to the plain path, and docs/performance.md reports the speed it reaches.
"""

import torch
import torch.nn as nn

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def check(cfg):
    """After the device and dtype are resolved: fp8 needs bf16 on a CUDA GPU (the card is checked at build time)."""
    if cfg.fp8_head and cfg.task not in ("lm", "sft"):
        raise ValueError(f"fp8_head=True speeds up the language-model output layer, which task={cfg.task!r} does not "
                         f"use: set fp8_head=False")
    for key in ("fp8", "fp8_head"):
        if getattr(cfg, key) and (not cfg.device.startswith("cuda") or cfg.dtype != "bfloat16"):
            raise ValueError(f"{key}=True needs a CUDA GPU and dtype bfloat16 (here device={cfg.device!r}, "
                             f"dtype={cfg.dtype!r}): set {key}=False")


def fp8_scale(x, dtype):
    """The per-tensor scale that maps x's absmax onto the largest finite value of the fp8 dtype."""
    return torch.finfo(dtype).max / x.detach().abs().amax().float().clamp(min=1e-12)


def to_fp8(x, dtype, scale=None, transposed=False):
    """x -> (fp8 tensor, inverse scale): x ~= fp8.float() * inverse scale. transposed=True casts x.t() instead,
    written row-major. scale defaults to fp8_scale(x, dtype)."""
    scale = fp8_scale(x, dtype) if scale is None else scale
    x = x.t() if transposed else x
    return (x.float() * scale).to(dtype, memory_format=torch.contiguous_format), scale.reciprocal()


def column_major(t):
    """The same matrix with column-major memory layout, which _scaled_mm needs for its second operand."""
    return t.t().contiguous().t()


class _FP8Matmul(torch.autograd.Function):
    """y = x @ w.T with x (M, K) and w (N, K), all three matmuls in fp8."""

    @staticmethod
    def forward(ctx, x, w, out_dtype):
        x8, x_inv = to_fp8(x, E4M3)
        w8, w_inv = to_fp8(w, E4M3)
        ctx.save_for_backward(x8, x_inv, w8, w_inv)
        ctx.out_dtype, ctx.w_dtype = out_dtype, w.dtype
        # w8 is (N, K) row-major, so w8.t() is the column-major (K, N) operand _scaled_mm wants
        return torch._scaled_mm(x8, w8.t(), scale_a=x_inv, scale_b=w_inv, out_dtype=out_dtype)  # (M, N)

    @staticmethod
    def backward(ctx, grad_y):
        x8, x_inv, w8, w_inv = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[:2]  # a frozen weight (LoRA, freeze_embeddings) needs no dL/dw
        g_scale = fp8_scale(grad_y, E5M2)
        grad_x = grad_w = None
        if need_x:  # dL/dx = grad_y @ w: (M, N) @ (N, K)
            g8, g_inv = to_fp8(grad_y, E5M2, g_scale)  # (M, N)
            grad_x = torch._scaled_mm(g8, column_major(w8), scale_a=g_inv, scale_b=w_inv, out_dtype=ctx.out_dtype)
            del g8
        if need_w:  # dL/dw = grad_y.T @ x: (N, M) @ (M, K), in the master weights' dtype
            # the row-major (N, M) operand is cast from grad_y again with the same scale (the same bits as
            # g8.t()) rather than copied from g8, so under torch.compile g8 is freed first: for the output layer
            # each copy is tokens x vocabulary bytes (0.6 GB at GPT-2 124M, micro-batch 12)
            g8_t, g_inv = to_fp8(grad_y, E5M2, g_scale, transposed=True)  # (N, M)
            grad_w = torch._scaled_mm(g8_t, column_major(x8), scale_a=g_inv, scale_b=x_inv, out_dtype=ctx.w_dtype)
        return grad_x, grad_w, None


class FP8Linear(nn.Linear):
    """nn.Linear whose matmuls run in fp8; out_dtype is what autocast would have produced (bf16 on the GPU)."""

    out_dtype = torch.bfloat16

    def forward(self, x):
        shape = x.shape
        y = _FP8Matmul.apply(x.reshape(-1, shape[-1]), self.weight, self.out_dtype)  # (B*T, out)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.view(*shape[:-1], -1)  # (B, T, out)


def convert_to_fp8(model, out_dtype=torch.bfloat16, head=False, blocks=True):
    """Make every nn.Linear in the transformer blocks (blocks=True) an FP8Linear, in place; with head=True the
    output layer too (when tied, its weight is also the token embedding, whose lookup stays as it was). Returns
    the number of layers converted."""
    layers = [m for m in model.transformer.h.modules() if type(m) is nn.Linear] if blocks else []
    if head:
        layers.append(model.lm_head)
    for module in layers:
        if module.in_features % 16 or module.out_features % 16:  # _scaled_mm needs multiples of 16
            raise ValueError(f"fp8 needs layer widths that are multiples of 16, got {module.in_features} x "
                             f"{module.out_features}: pick n_embd (and, with fp8_head, vocab_pad_multiple) "
                             f"as a multiple of 16")
        module.__class__ = FP8Linear  # same parameters and state_dict keys, new forward
        module.out_dtype = out_dtype
    return len(layers)


def check_fp8_device(device, key="fp8"):
    """One clear line, naming the config key, when this card or build cannot run fp8 matmuls."""
    if not str(device).startswith("cuda"):
        raise ValueError(f"{key}=True needs a CUDA GPU (device={device}): set {key}=False")
    major, minor = torch.cuda.get_device_capability(device)
    if (major, minor) < (8, 9):
        raise ValueError(f"{key}=True needs compute capability 8.9+ (Ada, Hopper); "
                         f"{torch.cuda.get_device_name(device)} is {major}.{minor}: set {key}=False")


def reference_linear(x, w, b=None):
    """What FP8Linear computes, written out in float32 (for tests): round both operands to e4m3 with the same
    per-tensor scales, then an ordinary matmul."""
    x8, x_inv = to_fp8(x, E4M3)
    w8, w_inv = to_fp8(w, E4M3)
    y = (x8.float() * x_inv) @ (w8.float() * w_inv).t()
    return y if b is None else y + b


