"""All-parameter training in little memory: GaLore-projected AdamW, updates applied during backward, and bf16
weights with stochastic rounding (train.py: optimizer = "galore", update_in_backward, weights_dtype = "bf16").

GaLore (Zhao et al. 2024, "GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection"): a weight
matrix's gradient G (m x n) is projected onto a rank-r subspace, and AdamW's moments live there, r x max(m, n)
values instead of m x n. The subspace is the top-r singular vectors of G on the shorter side, recomputed by an SVD
every galore_gap steps (the paper's update_proj_gap; computed from the smaller Gram matrix, see projection) and kept
fixed in between:
    m >= n:  Q (n, r) = the first r right singular vectors;  R = G Q (m, r);  update = scale * U(R) Q^T
    m <  n:  P (m, r) = the first r left singular vectors;   R = P^T G (r, n); update = scale * P U(R)
U(R) is AdamW's normalised step (bias-corrected m / (sqrt(v) + eps)) computed on R; scale is the paper's alpha.
As in the paper, the moments are kept (not re-projected) when the subspace changes, and weight decay stays
AdamW's decoupled one on the full weight. Which tensors are projected: the 2-D weights inside the transformer
blocks (attention and MLP matrices), as the paper projects those; the embedding (the tied output layer), norm
gains and biases take plain AdamW steps (rank 0 here), their moments stored like the others (optim_state). GPT-2's
fused q, k, v weight (3C x C) is one matrix here, projected on its input side, which q, k and v share.

Full rank is not AdamW: with r = min(m, n) the projection loses nothing (Q Q^T = I), but AdamW's element-wise
normalisation does not commute with a rotation, so GaLore at full rank is AdamW in the rotated coordinates R, not
in the weight's own. It equals AdamW exactly when there is no projection (rank 0, tested bit for bit against
torch.optim.AdamW) and equals "AdamW on G Q, rotated back" at full rank (tested).

Moments: optim_state "fp32", "bf16" or "int8", stored with sologpt/lean_optim.py's codes (the same math in float32,
compact storage). The projection matrices are float32 with fp32 moments and bf16 otherwise (GaLore keeps them in
the weights' dtype).

bf16 weights (weights_dtype = "bf16"): the parameters themselves are bfloat16, with no float32 master copy. Each
update is computed in float32 and rounded to bf16 stochastically (lean_optim.to_bf16_stochastic): a small update
that round-to-nearest would lose (below half a bf16 step, 0.4% of the weight) is kept on average. The noise is a
function of (step, parameter index), so a resumed run rounds alike without saving any random state.

Updates in backward (update_in_backward = True; UpdateInBackward): each parameter gets a hook that runs its own
update as soon as its gradient of the step's last micro-batch is accumulated, then drops the gradient, so with one
micro-batch per step the full set of gradients never exists at once (the peak holds about one layer's). Earlier
micro-batches only accumulate, so with gradient_accumulation_steps > 1 every gradient is kept from the first
micro-batch to the last one's backward, and the saving is gone (a note says so at setup).
The update is the one step() would make from the same gradient: tested bit for bit on the CPU.
"""

import math
import os

import torch

from sologpt.lean_optim import MIN_COMPACT_NUMEL, LeanAdamW, adam_moments, quantize_blockwise, to_bf16_stochastic

WEIGHTS_DTYPES = ("fp32", "bf16")
# an unprojected tensor above this many values (a GPT-2 sized embedding: 38M, 6.7B's: 206M) is updated a few rows
# at a time, so its float32 temporaries (gradient, moments, weight, noise: ~6 copies) stay ~0.4 GB, not ~5 GB
CHUNK_NUMEL = 1 << 24


def check(cfg):
    """optimizer="galore", update_in_backward and weights_dtype: their values, and what they cannot combine with."""
    if cfg.weights_dtype not in WEIGHTS_DTYPES:
        raise ValueError(f"weights_dtype={cfg.weights_dtype!r} is unknown: use 'fp32' or 'bf16'")
    if cfg.optimizer == "galore":
        if cfg.galore_rank < 1 or cfg.galore_gap < 1:
            raise ValueError(f"galore_rank={cfg.galore_rank} and galore_gap={cfg.galore_gap} must be at least 1")
        if not cfg.galore_scale > 0:
            raise ValueError(f"galore_scale={cfg.galore_scale} must be positive (the paper uses 0.25)")
    lean = cfg.optimizer == "galore" or cfg.update_in_backward or cfg.weights_dtype != "fp32"
    if lean and cfg.optimizer == "muon":
        raise ValueError("update_in_backward and weights_dtype='bf16' need a per-parameter optimizer: use "
                         "optimizer='adamw' or 'galore' with them, not 'muon'")
    if lean and cfg.lora_rank:
        raise ValueError(f"{describe(cfg)} is for all-parameter training; LoRA trains a few adapters, which "
                         f"need none of it: drop lora_rank or those settings")
    if lean and "RANK" in os.environ and (cfg.update_in_backward or cfg.parallel == "fsdp"):
        raise ValueError(f"{describe(cfg)} runs in one process (updates in backward would run before the ranks "
                         f"average the gradients; GaLore's SVD needs whole matrices): start with plain python")
    if cfg.weights_dtype == "bf16":
        if cfg.dtype != "bfloat16":
            raise ValueError(f"weights_dtype='bf16' computes under bfloat16 autocast, but dtype={cfg.dtype!r}: set "
                             f"dtype=bfloat16")
        for key in ("qat", "fp8", "fp8_head"):
            if getattr(cfg, key):
                raise ValueError(f"weights_dtype='bf16' is not combined with {key} (untested): drop --{key}")
        if cfg.base_dtype != "fp32":
            raise ValueError("weights_dtype='bf16' stores every weight in bf16 already: drop base_dtype")
    if not cfg.update_in_backward:
        return
    if cfg.grad_clip > 0:
        raise ValueError(f"update_in_backward applies each update before the global gradient norm is known, so it "
                         f"cannot clip it (grad_clip={cfg.grad_clip}): set grad_clip=0")
    if cfg.dtype == "float16":
        raise ValueError("update_in_backward cannot skip a step after a float16 overflow (the loss scaler decides "
                         "only once backward has ended): use dtype=bfloat16")
    if cfg.compile is True:
        raise ValueError("update_in_backward with compile=True: a compiled backward hands over all gradients at "
                         "once, which is what update_in_backward avoids: set compile=False")
    if cfg.compile == "auto":  # the default: off here, for the reason above
        cfg.compile = False
    if cfg.gradient_accumulation_steps > 1:
        print(f"note: update_in_backward with gradient_accumulation_steps={cfg.gradient_accumulation_steps} keeps "
              f"every gradient from the first micro-batch to the last, so it saves no gradient memory; one larger "
              f"micro-batch per step does")


def describe(cfg):
    on = [f"optimizer={cfg.optimizer!r}"] if cfg.optimizer == "galore" else []
    on += ["update_in_backward"] if cfg.update_in_backward else []
    on += [f"weights_dtype={cfg.weights_dtype!r}"] if cfg.weights_dtype != "fp32" else []
    return " and ".join(on)


# ---- the projection ---------------------------------------------------------------------------------------------

def projection(grad, rank):
    """The first `rank` singular vectors of grad (m, n) on its shorter side: right ones (n, rank) when m >= n,
    left ones (m, rank) otherwise; float32. They are the top eigenvectors of the smaller Gram matrix (G^T G or
    G G^T, min(m, n) square): one symmetric eigendecomposition instead of an SVD of G, several times faster on a
    GPU; squaring the singular values costs precision only in the small ones, which are not kept. None for a
    gradient that is not finite or whose decompositions fail."""
    g = grad.float()
    right = g.shape[0] >= g.shape[1]
    gram = g.mT @ g if right else g @ g.mT  # (k, k), k = min(m, n)
    if not torch.isfinite(gram).all():  # a NaN or inf gradient has no subspace: None keeps the last projection, and
        return None  # the non-finite update reaches the loss, where the spike guard (if on) rolls the step back
    try:
        _, vectors = torch.linalg.eigh(gram)  # eigenvalues in ascending order
    except torch.linalg.LinAlgError:  # did not converge (rare): the SVD of the gradient itself
        try:
            u, _, vh = torch.linalg.svd(g, full_matrices=False)
        except torch.linalg.LinAlgError:
            return None
        return (vh[:rank].mT if right else u[:, :rank]).contiguous()
    return vectors[:, -rank:].flip(1).contiguous()  # the largest first


def project(grad, proj):
    """(m, n) -> (m, r) when m >= n, else (r, n)."""
    proj = proj.float()
    return grad @ proj if grad.shape[0] >= grad.shape[1] else proj.mT @ grad


def project_back(low, proj, shape):
    """The inverse map into the weight's (m, n) space."""
    proj = proj.float()
    return low @ proj.mT if shape[0] >= shape[1] else proj @ low


# ---- the optimizer ----------------------------------------------------------------------------------------------

class GaLoreAdamW(LeanAdamW):
    """AdamW (torch.optim.AdamW's math, lean_optim's moment storage), with GaLore's projection for the parameters
    of groups whose "rank" is > 0 (2-D ones only; see the module docstring). Group keys: rank (0: plain AdamW),
    gap (steps between SVDs), scale (alpha), state_dtype, block_size. Parameters may be float32 or bfloat16 (then
    rounded stochastically). update(p) does one parameter's step from p.grad; step() does it for all of them."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *, rank=0, gap=200,
                 scale=0.25, state_dtype="fp32", block_size=256):
        torch.optim.Optimizer.__init__(self, params, {
            "lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "rank": rank, "gap": gap,
            "scale": scale, "state_dtype": state_dtype, "block_size": block_size})
        # param -> (group number, position in the optimizer); groups are looked up by number, as load_state_dict
        # replaces the group dicts
        self.where = {}  # id(param) -> ...
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                self.where[id(p)] = (gi, len(self.where))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self.update(p)
        return loss

    @torch.no_grad()
    def update(self, param):
        """One AdamW / GaLore step of one parameter from its .grad (left in place)."""
        gi, index = self.where[id(param)]
        group = self.param_groups[gi]
        if param.grad.is_sparse:
            raise ValueError("GaLoreAdamW does not support sparse gradients: use dense ones (sparse=False)")
        state = self.state[param]
        rank = min(group["rank"], *param.shape) if group["rank"] and param.dim() == 2 else 0
        if not state:
            self._init_galore(state, param, group, rank)
        state["step"] += 1
        seed = state["step"] * 1_000_003 + index  # the rounding noise of this (step, parameter)
        if rank:
            grad = param.grad.float()
            if (state["step"] - 1) % group["gap"] == 0:  # a new subspace every gap steps, from this gradient
                new = projection(grad, rank)
                if new is not None:
                    state["projection"] = new.to(state["projection"].dtype)
            self._adamw(param, project(grad, state["projection"]), state, group, seed, state["projection"])
            return
        rows = chunk_rows(param, group["block_size"])
        if rows >= len(param):
            self._adamw(param, param.grad.float(), state, group, seed)
            return
        # a large tensor (the embedding) a few rows at a time: its float32 temporaries stay small
        for c, r in enumerate(range(0, len(param), rows)):
            part = moment_rows(state, r, min(r + rows, len(param)), param.shape[1:])
            views = dict(part)
            self._adamw(param[r:r + rows], param.grad[r:r + rows].float(), part, group, seed * 4099 + c)
            for key, v in part.items():  # a compact moment comes back as a new tensor: into the state's rows
                if v is not views[key]:
                    views[key].copy_(v)

    def _adamw(self, param, grad, state, group, seed, proj=None):
        """AdamW's update of param (or a few of its rows) from grad, float32; with proj, grad is the projected
        gradient and the update is projected back. Moments read from and written to state (lean_optim's codes)."""
        beta1, beta2 = group["betas"]
        lr, eps = group["lr"], group["eps"]
        exp_avg, exp_avg_sq = self._read_moments(state, grad.shape)  # float32
        # torch.optim.AdamW's single-tensor update, op for op (as LeanAdamW), on the weight in float32
        weight = param if param.dtype == torch.float32 else param.float()
        weight.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay (Loshchilov & Hutter 2019)
        step_size, denom = adam_moments(exp_avg, exp_avg_sq, grad, state["step"], lr, beta1, beta2, eps)
        if proj is not None:
            weight.sub_(project_back(exp_avg / denom, proj, param.shape), alpha=step_size * group["scale"])
        else:
            weight.addcdiv_(exp_avg, denom, value=-step_size)
        if weight is not param:  # bf16 weights: round the float32 result stochastically
            gen = torch.Generator(device=param.device).manual_seed(seed * 2 + 1)  # not the moments' noise
            param.copy_(to_bf16_stochastic(weight, gen) if param.dtype == torch.bfloat16 else weight)
        self._write_moments(state, exp_avg, exp_avg_sq, seed=seed)

    def _init_galore(self, state, param, group, rank):
        state["step"] = 0
        shape = param.shape
        if rank:
            m, n = shape
            shape = (m, rank) if m >= n else (rank, n)
            dtype = torch.float32 if group["state_dtype"] == "fp32" else torch.bfloat16
            state["projection"] = torch.zeros((min(m, n), rank), dtype=dtype, device=param.device)
        fmt = group["state_dtype"] if torch.Size(shape).numel() >= MIN_COMPACT_NUMEL else "fp32"
        if fmt == "int8":
            zeros, block = torch.zeros(shape, device=param.device), group["block_size"]
            state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_blockwise(zeros, block, True)
            state["exp_avg_sq_codes"], state["exp_avg_sq_absmax"] = quantize_blockwise(zeros, block, False)
        else:
            dtype = torch.bfloat16 if fmt == "bf16" else torch.float32
            state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=param.device)
            state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=param.device)

    def load_state_dict(self, state_dict):
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            if saved.get("rank") != group["rank"]:
                raise ValueError(f"the optimizer state was saved with galore_rank={saved.get('rank')!r} but this "
                                 f"run has {group['rank']!r}: resume with the same galore_rank")
        mine = [{k: g[k] for k in ("gap", "scale")} for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, keep in zip(self.param_groups, mine):  # galore_gap and galore_scale: this run's values
            group.update(keep)


def chunk_rows(param, block_size):
    """Rows of a large unprojected tensor updated together: about CHUNK_NUMEL values, a whole number of int8 code
    blocks (so the chunks' codes are the whole tensor's, bit for bit); every row for tensors up to CHUNK_NUMEL."""
    if param.dim() < 2 or param.numel() <= CHUNK_NUMEL:
        return len(param)
    row = param[0].numel()
    unit = block_size // math.gcd(row, block_size)  # rows per whole number of blocks
    return max(unit, CHUNK_NUMEL // row // unit * unit)


def moment_rows(state, start, stop, row_shape):
    """The moments of rows start:stop, as views into the state tensors (int8: their code blocks)."""
    if "exp_avg_codes" not in state:
        return {"step": state["step"], "exp_avg": state["exp_avg"][start:stop],
                "exp_avg_sq": state["exp_avg_sq"][start:stop]}
    row, block = torch.Size(row_shape).numel(), state["exp_avg_codes"].shape[1]
    b0, b1 = start * row // block, -(-stop * row // block)
    return {"step": state["step"], **{k: state[k][b0:b1] for k in (
        "exp_avg_codes", "exp_avg_absmax", "exp_avg_sq_codes", "exp_avg_sq_absmax")}}


def galore_groups(model, weight_decay, rank, gap, scale):
    """GaLore for the blocks' 2-D weights; plain AdamW (rank 0) for the embeddings (decayed) and for biases and
    norm gains (not decayed), as train.py's AdamW groups them."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    blocks = [p for n, p in params if p.dim() == 2 and n.startswith("transformer.h.")]
    ids = {id(p) for p in blocks}
    rest = [p for _, p in params if id(p) not in ids]
    groups = [{"params": blocks, "weight_decay": weight_decay, "rank": rank, "gap": gap, "scale": scale},
              {"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "rank": 0},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "rank": 0}]
    return [g for g in groups if g["params"]]


# ---- updates during backward ------------------------------------------------------------------------------------

class UpdateInBackward:
    """The optimizer, with each parameter's update run inside backward: a post-accumulate-grad hook counts the
    micro-batches whose gradient the parameter has received and, at the step's last (micro_batches of them), runs
    optimizer.update(p) and sets p.grad = None. To train.py it is the optimizer: param_groups (the schedule writes
    lr before the step's backward), step() (updates any parameter whose gradient did not arrive in every
    micro-batch, as an ordinary step would, and resets the counts), zero_grad(), state_dict(), load_state_dict()."""

    def __init__(self, optimizer, micro_batches):
        self.optimizer, self.micro_batches = optimizer, micro_batches
        self.seen = {}  # id(param) -> micro-batches of this step whose gradient it has
        self.handles = [p.register_post_accumulate_grad_hook(self._hook)
                        for group in optimizer.param_groups for p in group["params"]]

    def _hook(self, param):
        n = self.seen.get(id(param), 0) + 1
        if n < self.micro_batches:  # an earlier micro-batch: only accumulate
            self.seen[id(param)] = n
            return
        self.seen.pop(id(param), None)
        self.optimizer.update(param)
        param.grad = None  # its memory goes back before the next layer's gradient arrives

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @property
    def state(self):
        return self.optimizer.state

    def step(self, closure=None):
        for group in self.param_groups:  # normally none: every gradient was used and dropped in backward
            for p in group["params"]:
                if p.grad is not None:
                    self.optimizer.update(p)
                    p.grad = None
        self.seen.clear()

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)
        self.seen.clear()

    def state_dict(self):
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict):
        self.seen.clear()
        self.optimizer.load_state_dict(state_dict)

    def remove(self):
        """Take the hooks off (tests, benchmarks)."""
        for h in self.handles:
            h.remove()


def make_optimizer(model, cfg):
    """train.py's optimizer for optimizer="galore", update_in_backward or weights_dtype="bf16": GaLoreAdamW (rank 0
    everywhere for optimizer="adamw": AdamW with lean moments), wrapped in UpdateInBackward when asked."""
    if cfg.optimizer == "galore":
        groups = galore_groups(model, cfg.weight_decay, cfg.galore_rank, cfg.galore_gap, cfg.galore_scale)
    else:
        params = [p for p in model.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    opt = GaLoreAdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), state_dtype=cfg.optim_state)
    return UpdateInBackward(opt, cfg.gradient_accumulation_steps) if cfg.update_in_backward else opt


def lower_weights(model, weights_dtype):
    """weights_dtype="bf16": every parameter in bfloat16 (buffers, e.g. rotary frequencies, stay float32); a tied
    weight stays one tensor. Returns the model."""
    if weights_dtype == "bf16":
        for p in model.parameters():
            p.data = p.data.to(torch.bfloat16)
    return model
