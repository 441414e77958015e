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


def orthogonalize(m, steps=5, eps=1e-7):
    """The nearest orthogonal matrix U V^T to m = U S V^T, approximately: Newton-Schulz iterations of the odd
    polynomial X <- aX + b(XX^T)X + c(XX^T)^2 X, which drive every singular value of X towards 1 (to about
    0.7-1.2, which is enough) without an SVD. bfloat16 on a GPU, float32 elsewhere."""
    a, b, c = NS_COEFFICIENTS
    x = m.to(torch.bfloat16 if m.is_cuda else torch.float32)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the wide orientation: X X^T is then the smaller square
        x = x.t()
    x = x / (x.norm() + eps)  # singular values <= 1, where the iteration converges
    for _ in range(steps):
        g = x @ x.t()
        x = a * x + (b * g + c * g @ g) @ x
    return (x.t() if tall else x).to(m.dtype)


class Muon(torch.optim.Optimizer):
    """Muon for 2-D weights: Nesterov momentum, orthogonalised, scaled to AdamW's update RMS, decoupled decay."""

    def __init__(self, params, lr=0.02, weight_decay=0.0, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, ns_steps=ns_steps))
        for group in self.param_groups:
            for p in group["params"]:
                if p.dim() != 2:
                    raise ValueError(f"Muon takes 2-D weights only, got a tensor of shape {tuple(p.shape)}")

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]  # lr may be a 0-d tensor (CUDA graphs)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.mul_(mu).add_(p.grad)  # B = mu B + g
                update = orthogonalize(p.grad + mu * buf, group["ns_steps"])  # Nesterov: look one step ahead
                p.mul_(1 - lr * group["weight_decay"])  # decoupled weight decay, as AdamW
                p.sub_(update * (0.2 * max(p.shape) ** 0.5 * lr))  # RMS of an AdamW update (Liu et al. 2025)


class MuonWithAdamW:
    def __init__(self, model, lr, weight_decay, betas, fused=False, capturable=False, momentum=0.95):
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        matrices = [p for n, p in params if p.dim() == 2 and n.startswith("transformer.h.")]
        ids = {id(p) for p in matrices}
        rest = [p for _, p in params if id(p) not in ids]
        if not matrices:
            raise ValueError("optimizer='muon' found no trainable weight matrices in the blocks (all frozen?): "
                             "use optimizer='adamw'")
        self.muon = Muon(matrices, lr=lr, weight_decay=weight_decay, momentum=momentum)
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
