"""The machine: what device and dtype "auto" mean, mixed precision (autocast and the float16 loss scaler), the
CUDA settings a run makes once, and the figures the log line reports about the hardware (MFU, peak memory)."""

import resource
from contextlib import nullcontext

import torch

from sologpt.configurator import UserError


def resolve_device(device, dtype):
    """Turn "auto" into a real device and dtype and check both; returns (device, device_type, dtype).
    auto device: cuda, then mps, then cpu. auto dtype: bfloat16 on CUDA GPUs that have it, else float16
    (which needs loss scaling when training); float32 elsewhere."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    device_type, _, index = device.partition(":")
    if device_type not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise UserError(f"device={device!r} is unknown: use auto, cpu, cuda, cuda:N or mps")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={device!r} but this torch sees no CUDA GPU: use --device=cpu (or auto)")
    if device_type == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise UserError(f"device={device!r} but there are only {torch.cuda.device_count()} CUDA GPUs")
    if device_type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={device!r} but MPS (Apple GPU) is not available: use --device=cpu (or auto)")
    if dtype == "auto":
        if device_type == "cuda":
            dtype = "bfloat16" if torch.cuda.is_bf16_supported() else "float16"
        else:
            dtype = "float32"
    if dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype={dtype!r} is unknown: use auto, float32, bfloat16 or float16")
    return device, device_type, dtype


def autocast_context(device_type, dtype):
    """Mixed precision for the forward pass: autocast to bfloat16/float16, or nothing for float32."""
    if dtype == "float32":
        return nullcontext()
    return torch.autocast(device_type, dtype=getattr(torch, dtype))


def setup_cuda(device, attn_backend="auto"):
    """What a CUDA run sets once: TF32 matmuls (only float32 ones change), the attention kernel, and the current
    device (streams and CUDA graphs use it)."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    set_attention_backend(attn_backend)
    if ":" in device:
        torch.cuda.set_device(torch.device(device))


def set_attention_backend(name):
    """Allow only one fused kernel behind F.scaled_dot_product_attention on CUDA ("auto": PyTorch chooses).
    The math kernel stays allowed as the fallback for calls the fused one cannot take (masks in the KV cache)."""
    if name == "auto":
        return
    torch.backends.cuda.enable_flash_sdp(name == "flash")
    torch.backends.cuda.enable_cudnn_sdp(name == "cudnn")
    torch.backends.cuda.enable_mem_efficient_sdp(name == "efficient")
    torch.backends.cuda.enable_math_sdp(True)


class LossScaler(torch.amp.GradScaler):
    """float16 loss scaling (GradScaler: small gradients would flush to zero in float16), counting the optimizer
    steps it skipped because the scaled gradients overflowed. Disabled (every call a pass-through, nothing to
    wait for) for bfloat16 and float32, which need no scaling."""

    skipped_steps = 0

    def update(self, new_scale=None):
        if not self.is_enabled():
            return
        before = self.get_scale()  # a host sync, float16 only
        super().update(new_scale)
        if self.get_scale() < before:  # the scale drops only after an overflow, whose step was skipped
            self.skipped_steps += 1


# dense bf16 tensor-core peaks from the vendors' datasheets, for MFU (Chowdhery et al. 2022); first match wins
PEAK_FLOPS = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12), ("L40S", 362e12),
              ("L4", 121e12), ("RTX 4090", 165e12), ("RTX 3090", 71e12)]


def peak_flops(device):
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS if key in name), None)


def peak_memory_gib(device):
    """(peak allocated, peak reserved by the caching allocator) on CUDA; elsewhere the process's peak RSS twice."""
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30, torch.cuda.max_memory_reserved(device) / 2**30
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB
    return rss, rss
