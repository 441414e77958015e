"""LeanAdamW: AdamW whose two moment buffers are stored compactly, so the optimizer state of a model costs
4 (bf16) or about 2 (int8) bytes per parameter instead of torch.optim.AdamW's 8.

Every step decodes a parameter's moments to float32, does exactly torch.optim.AdamW's update in float32
(decoupled weight decay, bias correction) and encodes the moments back. Only storage changes, not the math:
state_dtype="fp32" stores plain float32 and matches torch.optim.AdamW bit for bit on CPU.

bf16: bfloat16 keeps float32's exponent range (no underflow), but only 8 mantissa bits: with beta2=0.999
one step changes exp_avg_sq by 0.1%, less than half a bf16 step (0.2-0.4%), so round-to-nearest freezes it.
Measured: after the gradient scale dropped 10x, a round-to-nearest exp_avg_sq was 2.8x too large 1000 steps
later and 16x after 3000 (within 0.3% at beta2=0.95 and 0.99). Stochastic rounding (round up with probability equal
to the dropped fraction) is unbiased and stayed within 0.2%, so bf16 mode always uses it; at beta2=0.95 it
costs nothing measurable (tiny GPT test: loss within 0.05% of float32 either way).

int8: block-wise quantization after Dettmers et al. 2021, "8-bit Optimizers via Block-wise Quantization"
(our own code, not bitsandbytes). The flattened state is cut into blocks of block_size values; each block
keeps one float32 absmax and one 8-bit code per value. A linear code rounds every value below absmax/254 to
zero, and a second moment of zero turns the update into exp_avg / eps: a linear int8 exp_avg_sq sent the
tiny GPT's loss to NaN within 150 steps. So the code is non-linear, a cube-root code: value = absmax * (q/L)^3,
fine near zero (smallest nonzero value absmax / L^3) and about 1.2% per step near absmax.
  exp_avg:     signed int8 code, L = 127 (q in -127..127).
  exp_avg_sq:  its square root goes through an unsigned uint8 code, L = 255: the update divides by sqrt(v),
               so that is the quantity worth keeping accurate, and the square root halves the dynamic range.
               A nonzero value never gets code 0, so the denominator never collapses to eps.
On a stress test (per-value gradient scales spread over ~5 decades inside each block, beta2=0.95) the
relative update error was 0.24 with cube-root codes, 0.65 with square-root and 0.85 with linear codes.
block_size=256: an outlier coarsens only its 255 neighbours. Dettmers et al. use 2048, a size that suits their
CUDA kernel; our torch ops do not care. 2048 had 45% more update error on the stress test (0.34) and 10% more
on tiny-GPT gradients, for 1.4% less memory (one 4-byte scale per 256 codes instead of per 2048).
Limitation: a value that shrinks relative to its block's absmax moves by less than half a code step per step
when 1 - beta2 is small, and stays put: in a worst case (half of each block's gradients 30x smaller) such
values of exp_avg_sq stayed 13x too large with beta2=0.999 (0.99: 13%, 0.95: 1%). The trainer's default
beta2=0.95 is fine; for 0.999 prefer bf16 (stochastic rounding here too added noise that blew up tiny values).
Tensors under 4096 values (biases, LayerNorm) keep float32 moments in both compact modes: a tiny share of
the memory, and the layers most sensitive to noise (common practice, as in bitsandbytes).
"""

import torch
import torch.nn.functional as F

STATE_DTYPES = ("fp32", "bf16", "int8")
MIN_COMPACT_NUMEL = 4096  # smaller tensors keep float32 moments (see above)
CODE_POWER = 3  # value = absmax * (code / levels) ** CODE_POWER


def quantize_blockwise(x, block_size, signed):
    """x (float32, any shape) -> (codes (nblocks, block_size) int8 or uint8, absmax (nblocks,) float32).
    The last block is zero-padded, so its codes take a few bytes more than x has values."""
    flat = x.reshape(-1)
    blocks = F.pad(flat, (0, -flat.numel() % block_size)).view(-1, block_size)  # (nblocks, block_size)
    absmax = blocks.abs().amax(dim=1)  # (nblocks,)
    ratio = blocks / absmax.clamp_min(torch.finfo(torch.float32).tiny)[:, None]  # in [-1, 1]; an all-zero block stays 0
    levels = 127 if signed else 255
    codes = ratio.abs().pow_(1 / CODE_POWER).mul_(levels).round_()  # in place: large tensors, fewer temporaries
    if signed:
        return (codes * ratio.sign()).to(torch.int8), absmax
    # a nonzero second moment must not decode to 0: the update would become exp_avg / eps
    return torch.where(ratio > 0, codes.clamp_min(1), codes).to(torch.uint8), absmax


def dequantize_blockwise(codes, absmax, shape):
    """Inverse of quantize_blockwise: codes (nblocks, block_size), absmax (nblocks,) -> float32 of shape."""
    levels = 127 if codes.dtype == torch.int8 else 255
    # (nblocks, block_size); the odd power keeps the sign
    values = codes.float().div_(levels).pow_(CODE_POWER).mul_(absmax[:, None])
    numel = torch.Size(shape).numel()
    return values.view(-1)[:numel].view(shape)


def to_bf16_stochastic(x, generator):
    """float32 -> bfloat16, rounding up or down at random so that the expected result is x. bfloat16 is the top
    16 bits of a float32: adding 16 random bits below them and truncating rounds up with probability equal
    to the dropped fraction."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return (x.view(torch.int32) + noise).bitwise_and_(-65536).view(torch.float32).to(torch.bfloat16)


def adam_moments(exp_avg, exp_avg_sq, grad, step, lr, beta1, beta2, eps):
    """AdamW's moments updated in place with grad (float32), and (step_size, denom) of step number `step`: the update
    is -step_size * exp_avg / denom, op for op torch.optim.AdamW's single-tensor math."""
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step = float(step)
    bias_correction2_sqrt = (1 - beta2 ** step) ** 0.5
    return lr / (1 - beta1 ** step), (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)


def state_bytes(optimizer):
    """Bytes held in tensors of optimizer.state (moments, codes, scales, step counters); any torch optimizer."""
    return sum(v.nbytes for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))


class LeanAdamW(torch.optim.Optimizer):
    """torch.optim.AdamW (same arguments and defaults) with moments stored as state_dtype: "fp32" (reference),
    "bf16" (stochastic rounding) or "int8" (block-wise cube-root codes of block_size values).
    Not supported: amsgrad, maximize, sparse gradients, fused/foreach/capturable (CUDA graphs)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 state_dtype="bf16", block_size=256):
        defaults = {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay,
                    "state_dtype": state_dtype, "block_size": block_size}
        super().__init__(params, defaults)

    def add_param_group(self, param_group):
        """Check state_dtype and block_size per group (a group may choose its own)."""
        dtype = param_group.get("state_dtype", self.defaults["state_dtype"])
        block = param_group.get("block_size", self.defaults["block_size"])
        if dtype not in STATE_DTYPES:
            raise ValueError(f"state_dtype={dtype!r} is unknown: use one of {', '.join(STATE_DTYPES)}")
        if not isinstance(block, int) or isinstance(block, bool) or block < 1:
            raise ValueError(f"block_size={block!r} must be a positive int (256 is the default)")
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        index = -1  # position of the parameter in the optimizer, seeds its rounding noise
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            lr, eps = group["lr"], group["eps"]
            for param in group["params"]:
                index += 1
                if param.grad is None:
                    continue
                if param.grad.is_sparse:
                    raise ValueError("LeanAdamW does not support sparse gradients: use dense ones (sparse=False)")
                grad = param.grad.float()  # the math is float32 even for bf16 params (a no-op for float32 grads)
                state = self.state[param]
                if not state:
                    self._init_state(state, param, group)
                state["step"] += 1
                exp_avg, exp_avg_sq = self._read_moments(state, param.shape)  # float32
                # from here to addcdiv_: torch.optim.AdamW's single-tensor update, op for op
                param.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay (Loshchilov & Hutter 2019)
                step_size, denom = adam_moments(exp_avg, exp_avg_sq, grad, state["step"], lr, beta1, beta2, eps)
                param.addcdiv_(exp_avg, denom, value=-step_size)
                self._write_moments(state, exp_avg, exp_avg_sq, seed=state["step"] * 1_000_003 + index)
        return loss

    def _init_state(self, state, param, group):
        state["step"] = 0
        fmt = group["state_dtype"] if param.numel() >= MIN_COMPACT_NUMEL else "fp32"
        if fmt == "int8":
            zeros, block = torch.zeros(param.shape, device=param.device), group["block_size"]
            state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(zeros, block, True)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(zeros, block, False)
        else:
            dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
            state["exp_avg"] = torch.zeros(param.shape, dtype=dtype, device=param.device)
            state["exp_avg_sq"] = torch.zeros(param.shape, dtype=dtype, device=param.device)

    @staticmethod
    def _read_moments(state, shape):
        """float32 exp_avg, exp_avg_sq to update in place (the state tensors themselves when stored as float32)."""
        if "exp_avg_codes" in state:
            sqrt_v = dequantize_blockwise(state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"], shape)
            return dequantize_blockwise(state["exp_avg_codes"], state["exp_avg_absmax"], shape), sqrt_v.square()
        return state["exp_avg"].float(), state["exp_avg_sq"].float()  # .float() of float32 is the tensor itself

    @staticmethod
    def _write_moments(state, exp_avg, exp_avg_sq, seed):
        if "exp_avg_codes" in state:
            block = state["exp_avg_codes"].shape[1]
            state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(exp_avg, block, True)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(exp_avg_sq.sqrt(), block, False)
        elif state["exp_avg"].dtype == torch.bfloat16:
            # the noise is a function of (step, parameter index): a resumed run draws the same noise, no RNG to save
            gen = torch.Generator(device=exp_avg.device).manual_seed(seed)
            state["exp_avg"] = to_bf16_stochastic(exp_avg, gen)
            state["exp_avg_sq"] = to_bf16_stochastic(exp_avg_sq, gen)

    def load_state_dict(self, state_dict):
        """torch's loader casts every floating-point state tensor to its parameter's dtype: bf16 moments would come
        back as float32 (with 8 bytes/param of GPU memory at once). Load the groups through it and the state
        here, each tensor copied to its parameter's device in its own dtype."""
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            for key in ("state_dtype", "block_size"):
                if saved.get(key) != group[key]:
                    raise ValueError(f"the optimizer state was saved with {key}={saved.get(key)!r} but this optimizer "
                                     f"has {key}={group[key]!r}: resume with the same {key}")
        super().load_state_dict({**state_dict, "state": {}})
        saved_ids = [i for g in state_dict["param_groups"] for i in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for i, param in zip(saved_ids, params):
            if i in state_dict["state"]:
                self.state[param] = {k: v.to(param.device, copy=True) if torch.is_tensor(v) else v
                                     for k, v in state_dict["state"][i].items()}
