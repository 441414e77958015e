"""Muon for the transformer's matrices, AdamW for everything else: train.py's optimizer = "muon".

Muon (Jordan et al. 2024, "Muon: an optimizer for hidden layers") keeps one momentum buffer per weight matrix,
like SGD with Nesterov momentum, but before the update it replaces the momentum matrix M = U S V^T by its nearest
orthogonal matrix U V^T (a few Newton-Schulz iterations, bf16 matmuls). Every direction of the update then moves
by the same amount, instead of the few largest singular directions taking almost all of it. It applies to 2-D
weights inside the blocks only; the embedding, the output layer, biases and norm gains stay with AdamW.

The update's size: an orthogonal m x n matrix has RMS 1/sqrt(max(m, n)), far from what AdamW's updates have.
Scaling it by 0.2 * sqrt(max(m, n)) gives it the RMS of a typical AdamW update (Liu et al. 2025, "Muon is
Scalable for LLM Training"), so one learning_rate and one schedule serve both optimizers. (torch.optim.Muon, in
PyTorch 2.9+, does the same with adjust_lr_fn="match_rms_adamw"; this one is written out to be read, runs its
iterations in float32 on the CPU, where bfloat16 matmuls are slow, and can be recorded in a CUDA graph: the
learning rate may be a tensor and nothing waits for the host.)

MuonWithAdamW holds the two and looks like one optimizer to train.py: param_groups (the schedule writes lr into
each), step, zero_grad, state_dict and load_state_dict (checkpoint and resume).
"""

import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Jordan et al. 2024: a quintic that pushes singular values towards 1


def check(cfg):
    if cfg.optimizer not in ("adamw", "muon", "galore"):
        raise ValueError(f"optimizer={cfg.optimizer!r} is unknown: use 'adamw', 'muon' or 'galore'")
    if cfg.optimizer == "muon" and (cfg.lora_rank or cfg.optim_state != "fp32"):
        raise ValueError("optimizer='muon' trains whole matrices with its own fp32 momentum: it cannot be combined "
                         "with lora_rank or optim_state; use optimizer='adamw' for those")


def orthogonalize(m, steps=5, eps=1e-7):
    """The nearest orthogonal matrix U V^T to m = U S V^T, approximately: Newton-Schulz iterations of the odd
    polynomial X <- aX + b(XX^T)X + c(XX^T)^2 X, which drive every singular value of X towards 1 (to about
    0.7-1.2, which is enough) without an SVD. bfloat16 on a GPU, float32 elsewhere. m is one matrix (rows, cols)
    or a stack of them (k, rows, cols), each done on its own in one batched matmul per product."""
    a, b, c = NS_COEFFICIENTS
    x = m.to(torch.bfloat16 if m.is_cuda else torch.float32)
    x = x if x.dim() == 3 else x[None]  # (k, rows, cols)
    tall = x.size(-2) > x.size(-1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller square
        x = x.mT
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + eps)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        g = x @ x.mT  # (k, rows, rows)
        p = torch.baddbmm(g, g, g, beta=b, alpha=c)  # b G + c G G, the scaling folded into the matmul
        x = torch.baddbmm(x, p, x, beta=a)  # a X + (b G + c G G) X
    x = x.mT if tall else x
    return (x if m.dim() == 3 else x[0]).to(m.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised, scaled to AdamW's update RMS, decoupled decay.

    splits maps a weight to the number of equal row blocks it holds, each orthogonalised on its own: GPT-2's
    fused attn.c_attn is q, k and v stacked (3 x n_embd rows), three matrices that act on their own, so it is
    done as three (as modded-nanogpt does), not as one 2304 x 768 matrix whose blocks would share one spectrum.
    For speed, every matrix of one shape goes through the Newton-Schulz iterations together (a stack, batched
    matmuls): at GPT-2 124M that is 2 stacks (48 of 768 x 768, 24 of 768 x 3072 after turning the tall ones)
    instead of 48 separate small iterations, several times fewer kernels."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, ns_steps=5, splits=None):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        self.splits = splits or {}  # structure, not state: rebuilt with the model, so not in state_dict
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got a tensor of shape {tuple(p.shape)}")
                k = self.splits.get(p, 1)
                if not isinstance(k, int) or k < 1 or p.size(0) % k:
                    raise ValueError(f"a weight of shape {tuple(p.shape)} does not split into "
                                     f"{self.splits[p]} equal row blocks")

    def __getstate__(self):  # torch.optim.Optimizer pickles only defaults, state and param_groups
        return {**super().__getstate__(), "splits": self.splits}

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu, wd = group["lr"], group["momentum"], group["weight_decay"]  # lr may be a 0-d tensor (graphs)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            for p in params:
                if not self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            bufs = [self.state[p]["momentum_buffer"] for p in params]
            torch._foreach_mul_(bufs, mu)
            torch._foreach_add_(bufs, grads)  # B = mu B + g
            ahead = torch._foreach_add(grads, bufs, alpha=mu)  # Nesterov: look one step ahead, g + mu B
            # each weight as a stack of wide matrices (k, rows, cols), rows <= cols; equal shapes go together
            stacks = {}
            for i, (p, m) in enumerate(zip(params, ahead)):
                k = self.splits.get(p, 1)
                mats = m.view(k, p.size(0) // k, p.size(1))  # (k, rows, cols)
                tall = mats.size(1) > mats.size(2)
                mats = mats.mT if tall else mats  # wide: rows <= cols
                stacks.setdefault(tuple(mats.shape[1:]), []).append((i, tall, mats))
            updates = [None] * len(params)
            for (rows, cols), items in stacks.items():
                wide = torch.cat([mats for _, _, mats in items])  # (sum of k, rows, cols)
                # RMS of an AdamW update (Liu et al. 2025): an orthogonal matrix has RMS 1 / sqrt(max(rows, cols))
                ortho = orthogonalize(wide, group["ns_steps"]) * (0.2 * max(rows, cols) ** 0.5 * lr)
                for (i, tall, mats), o in zip(items, ortho.split([mats.size(0) for _, _, mats in items])):
                    updates[i] = (o.mT if tall else o).reshape(params[i].shape)  # (k, r, c) -> the weight's shape
            if wd:
                torch._foreach_mul_(params, 1 - lr * wd)  # decoupled weight decay, as AdamW
            torch._foreach_sub_(params, updates)


class MuonWithAdamW:
    def __init__(self, model, lr, weight_decay, betas, fused=False, capturable=False, momentum=0.95):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        matrices = [p for n, p in params if p.dim() == 2 and n.startswith("transformer.h.")]
        ids = {id(p) for p in matrices}
        rest = [p for _, p in params if id(p) not in ids]
        if not matrices:
            raise ValueError("optimizer='muon' found no trainable weight matrices in the blocks (all frozen?): "
                             "use optimizer='adamw'")
        # GPT-2's fused q, k, v projection: three matrices for Muon (see Muon's docstring)
        splits = {p: 3 for n, p in params if n.endswith(".attn.c_attn.weight") and p.size(0) == 3 * p.size(1)}
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum, splits=splits)
        groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},  # embeddings
                  {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}]  # biases, norm gains
        self.adamw = torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, capturable=capturable)

    @property
    def param_groups(self):  # the two optimizers' own group dicts (load_state_dict replaces them), so lr set here
        return self.muon.param_groups + self.adamw.param_groups  # reaches the optimizer that uses it

    @property
    def state(self):
        return {**self.muon.state, **self.adamw.state}

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none=set_to_none)
        self.adamw.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        if set(state) != {"muon", "adamw"}:
            raise ValueError("the checkpoint's optimizer state is not Muon + AdamW: resume with --optimizer=adamw")
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])
