"""Memory savers and reports for train.py: what a run will need (estimated before step 0), frozen weights kept
in bf16, int8 or nf4, the automatic micro-batch search, and the message for running out of memory.

Bytes per parameter during training with AdamW (fp32 master weights, as train.py keeps them):
    weights 4 + gradients 4 + two moments 8 (optim_state "fp32"), 4 ("bf16") or ~2 ("int8")
A frozen parameter costs only its weight: 4 bytes, 2 in bf16, ~1 in int8, ~0.52 in nf4 (base_dtype). Activations
come on top, per token: about 34 * n_embd bytes per layer under 16-bit autocast with a fused attention kernel
(Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models", section 4, without the
attention-score term that flash attention never stores), plus the logits: 2 bytes (bf16) + 4 (fp32 copy for the
loss) + 4 (their gradient) per vocabulary entry. Gradient checkpointing keeps only each checkpointed block's input
(4 * n_embd). All-parameter training in less (galore.py): weights_dtype "bf16" makes weights and gradients 2 bytes,
update_in_backward frees each gradient as it is used (about one block's gradients at a time), and GaLore keeps
moments only for a rank-r projection of each block matrix.
"""

import gc

import torch
import torch.nn as nn

from sologpt.nf4 import NF4Linear
from sologpt.quantize import Int8Linear

MOMENT_BYTES = {"fp32": 8, "bf16": 4, "int8": 2}  # both AdamW moments together, per trainable parameter
# a frozen Linear weight; nf4: 4 bits + an 8-bit scale per 64 + a float32 per 256 scales = 4.127 bits (nf4.py)
BASE_BYTES = {"fp32": 4, "bf16": 2, "int8": 1, "nf4": 4.127 / 8}
LOWERED = (Int8Linear, NF4Linear)  # the layers lower_frozen_weights swaps in


def check(cfg):
    """The memory switches' values, after the device and dtype are resolved."""
    for key, allowed in (("optim_state", MOMENT_BYTES), ("base_dtype", BASE_BYTES)):
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"{key}={getattr(cfg, key)!r} is unknown: use one of {', '.join(allowed)}")
    if cfg.base_dtype != "fp32" and not (cfg.lora_rank or cfg.freeze_layers):
        raise ValueError(f"base_dtype={cfg.base_dtype!r} applies to frozen weights: set lora_rank or freeze_layers")
    if cfg.batch_size == "auto" and not cfg.device.startswith("cuda"):
        raise ValueError("batch_size='auto' probes for CUDA out-of-memory: it needs a CUDA GPU; set batch_size to a "
                         "number")
    if cfg.base_dtype == "bf16" and cfg.dtype == "float32":
        raise ValueError("base_dtype='bf16' needs 16-bit autocast (dtype bfloat16 or float16): use base_dtype='int8' "
                         "or another dtype")


def optimizer_bytes(model, cfg):
    """The optimizer's state: AdamW keeps two moments per trainable parameter (MOMENT_BYTES); Muon one fp32
    momentum per weight matrix in the blocks, and AdamW's two for the rest; GaLore (galore.py) AdamW's two moments
    of the projected r x max(m, n) gradient of each block matrix plus its min(m, n) x r projection (fp32 with fp32
    moments, else bf16), and AdamW's two for the rest."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if getattr(cfg, "optimizer", "adamw") == "galore":
        total = 0
        for n, p in params:
            if p.dim() == 2 and n.startswith("transformer.h."):
                r = min(cfg.galore_rank, *p.shape)
                total += MOMENT_BYTES[cfg.optim_state] * r * max(p.shape)
                total += (4 if cfg.optim_state == "fp32" else 2) * r * min(p.shape)
            else:
                total += MOMENT_BYTES[cfg.optim_state] * p.numel()
        return total
    if getattr(cfg, "optimizer", "adamw") != "muon":
        return MOMENT_BYTES[cfg.optim_state] * sum(p.numel() for _, p in params)
    muon = sum(p.numel() for n, p in params if p.dim() == 2 and n.startswith("transformer.h."))
    return 4 * muon + 8 * (sum(p.numel() for _, p in params) - muon)


def loss_bytes(c, tokens, chunk=0):
    """The output layer and loss: a few (tokens, vocab) tensors; chunked (chunked_ce.py), a few (chunk, vocab)
    ones plus the two gradients it holds until backward, (vocab, C) and (tokens, C) in float32."""
    if not chunk:
        return 10 * c.vocab_size * tokens
    return 10 * c.vocab_size * min(chunk, tokens) + 4 * c.n_embd * (c.vocab_size + tokens)


def estimate(model, cfg):
    """Bytes for weights, gradients, optimizer state and activations of one micro-batch: a dict, and a log line."""
    c = model.config
    frozen_linear = sum(m.weight.numel() for m in model.transformer.h.modules()
                        if isinstance(m, nn.Linear) and not m.weight.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    other_frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad) - frozen_linear
    weight_bytes = 2 if getattr(cfg, "weights_dtype", "fp32") == "bf16" else 4  # galore.py's bf16 weights
    weights = weight_bytes * (trainable + other_frozen) + BASE_BYTES[cfg.base_dtype] * frozen_linear
    weights += sum(b.numel() * b.element_size() for m in model.transformer.h.modules()  # int8 / nf4: the stored
                   if isinstance(m, LOWERED) for b in m.state_dict().values())  # buffers (nf4's 2 KB table aside)
    weights = int(weights)
    tokens = cfg.batch_size * cfg.block_size if isinstance(cfg.batch_size, int) else cfg.block_size
    per_layer = 34 * c.n_embd  # bytes per token, 16-bit autocast (see above)
    if cfg.dtype == "float32":
        per_layer *= 2
    k = cfg.grad_checkpointing
    if k:  # checkpointed blocks keep their input; the others, and one recomputed block, keep everything
        n_ckpt = len(range(0, c.n_layer, k))
        layers = n_ckpt * 4 * c.n_embd + (c.n_layer - n_ckpt + 1) * per_layer
    else:
        layers = c.n_layer * per_layer
    grads = trainable
    if getattr(cfg, "update_in_backward", False) and getattr(cfg, "gradient_accumulation_steps", 1) == 1:
        # gradients freed as they are used: about one block's at a time, and the largest tensor (a tied embedding's
        # gradient waits from the output layer to the input lookup). With accumulation every gradient is kept from
        # the first micro-batch to the last one's backward: all of them
        grads = max((p.numel() for p in model.parameters() if p.requires_grad), default=0) + \
            sum(p.numel() for p in model.transformer.h[0].parameters() if p.requires_grad)
    out = {"weights": weights, "gradients": weight_bytes * grads, "optimizer": optimizer_bytes(model, cfg),
           "activations": tokens * layers + loss_bytes(c, tokens, getattr(cfg, "chunked_loss", 0))}
    gib = {k: v / 2**30 for k, v in out.items()}
    line = (f"memory estimate: weights {gib['weights']:.2f} + gradients {gib['gradients']:.2f} + optimizer "
            f"{gib['optimizer']:.2f} + activations {gib['activations']:.2f} (micro-batch of {tokens:,} tokens) = "
            f"{sum(gib.values()):.2f} GiB")
    return out, line


def lower_frozen_weights(model, base_dtype):
    """Keep the frozen Linear weights of the blocks (freeze_layers, or a LoRA layer's base) in bf16, in int8
    (weight-only, per output channel: quantize.Int8Linear) or in 4-bit NormalFloat (nf4.NF4Linear, QLoRA's base
    format), so they need 2, ~1 or ~0.52 bytes instead of 4. bf16 relies on autocast to bring the activations to
    16 bits. Returns the number of layers changed."""
    if base_dtype == "fp32":
        return 0
    swaps = [(parent, name, child) for parent in model.transformer.h.modules()
             for name, child in parent.named_children()
             if type(child) is nn.Linear and not child.weight.requires_grad]
    for parent, name, linear in swaps:
        if base_dtype == "bf16":
            linear.to(torch.bfloat16)
        else:
            setattr(parent, name, (Int8Linear if base_dtype == "int8" else NF4Linear).from_linear(linear))
    return len(swaps)


def restore_float(model):
    """Undo lower_frozen_weights: every bf16 / int8 / nf4 block Linear back to a float32 nn.Linear, all trainable."""
    for parent in model.transformer.h.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, LOWERED):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                with torch.no_grad():
                    linear.weight.copy_(child.dequantize())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(parent, name, linear)
            elif type(child) is nn.Linear:
                child.float()
    model.requires_grad_(True)
    return model


def free_memory(model=None):
    if model is not None:
        for p in model.parameters():
            p.grad = None
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def find_micro_batch(try_step, start=1, limit=1024):
    """The largest micro-batch b <= limit for which try_step(b) runs without running out of memory: doubling from
    `start`, then bisecting between the last size that fit and the first that did not. try_step must clean up
    after itself; every failure is followed by free_memory() so no half-built activations stay behind."""
    def fits(b):
        try:
            try_step(b)
            return True
        except torch.cuda.OutOfMemoryError:  # torch.OutOfMemoryError in newer releases
            free_memory()
            return False

    if not fits(start):
        return 0
    good, bad = start, None
    while bad is None and good < limit:
        b = min(good * 2, limit)
        if fits(b):
            good = b
        else:
            bad = b
    if bad is None:
        return good
    while bad - good > 1:
        mid = (good + bad) // 2
        if fits(mid):
            good = mid
        else:
            bad = mid
    return good


def oom_message(cfg, device):
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if str(device).startswith("cuda") else float("nan")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if str(device).startswith("cuda") else 0
    tips = []
    if not cfg.grad_checkpointing:
        tips.append("grad_checkpointing=1")
    if cfg.optim_state == "fp32":
        tips.append("optim_state='int8'")
    if (cfg.lora_rank or cfg.freeze_layers) and cfg.base_dtype == "fp32":
        tips.append("base_dtype='bf16', 'int8' or 'nf4'")
    tips.append("batch_size='auto'" if cfg.batch_size != "auto" else "a smaller block_size")
    return (f"out of memory at micro-batch {cfg.batch_size} x block_size {cfg.block_size} (peak {peak:.2f} GiB "
            f"allocated of {total:.1f} GiB): try {', '.join(tips)}; the last checkpoint is untouched")


def auto_batch_size(model, loss_model, source, cfg, ctx):
    """batch_size="auto": the largest micro-batch whose forward and backward fit next to the optimizer state (held
    as a placeholder of its size, so the real optimizer is untouched), then the gradient accumulation that keeps
    auto_batch_sequences sequences per step; sets both in cfg. loss_model is what the training step calls (with a
    teacher or the chunked loss, those count too), source the run's batch source, which draws the trial batches
    from its own generator. Runs before torch.compile; compiled steps need no more memory."""
    rng = torch.get_rng_state(), (torch.cuda.get_rng_state_all() if cfg.device.startswith("cuda") else None)
    state_bytes = optimizer_bytes(model, cfg)
    gen = torch.Generator().manual_seed(cfg.seed)  # trial batches: the run's own batches stay untouched

    def try_step(b):
        reserve = torch.empty(state_bytes, dtype=torch.uint8, device=cfg.device)  # the optimizer's moments
        x, y, kw = source.batch(b, gen)
        try:
            with ctx:
                _, loss = loss_model(x, y, **kw)
            loss.backward()
        finally:
            del reserve, x, y, kw
            free_memory(loss_model)

    limit = cfg.auto_batch_sequences or 1024
    micro = find_micro_batch(try_step, limit=limit)
    torch.set_rng_state(rng[0])
    if rng[1] is not None:
        torch.cuda.set_rng_state_all(rng[1])
    torch.cuda.reset_peak_memory_stats() if cfg.device.startswith("cuda") else None
    if micro == 0:
        raise ValueError(f"not even one sequence of block_size={cfg.block_size} fits in memory: "
                         f"{oom_message(cfg, cfg.device).split(': try ')[1]}")
    fit, target = micro, cfg.auto_batch_sequences or micro
    accum = -(-target // micro)
    micro = -(-target // accum)  # spread the sequences evenly over the micro-batches
    print(f"batch_size auto: the largest micro-batch that fits is {fit} sequences "
          f"(searched up to {limit}); batch_size={micro}, gradient_accumulation_steps={accum}, "
          f"{micro * accum} sequences per step")
    cfg.batch_size, cfg.gradient_accumulation_steps = micro, accum
    return micro, accum
