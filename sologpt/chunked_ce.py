"""The output layer and the cross-entropy loss, a chunk of tokens at a time: train.py's chunked_loss = N, which
wraps the model once at setup (ChunkedLoss); the training step calls the wrapper as it would the model.

The plain path computes logits = x @ W^T for every token at once: a (tokens, vocab) tensor, kept for backward,
then its float32 log-softmax and, in backward, a gradient of the same size. With GPT-2's 50257 tokens that is
the largest thing in memory for a small model: 12 x 1024 tokens x 50257 x 4 bytes = 2.5 GB per float32 copy.

Here the tokens go through in chunks of N rows. For each chunk: its logits (N, vocab), their log-sum-exp, the
loss of the right tokens, and at once the gradient of the loss with respect to the logits,
    dloss/dlogits = softmax(logits) - onehot(target)      (divided by the number of counted tokens),
which gives the chunk's share of both gradients: dx = dlogits @ W and dW += dlogits^T @ x. The logits are then
dropped. Backward has nothing left to do but scale the two stored gradients by the incoming one. The matmuls are
the same as the plain path's, so no work is repeated; memory for the loss goes from a few (tokens, vocab) tensors
to a few (N, vocab) ones. Targets of -1 are ignored, as in F.cross_entropy(ignore_index=-1).

When no gradient is wanted (evaluation, or a frozen output layer), that part is skipped. Targets of -1 are
ignored; other negative ids are not checked here (a check would make the GPU wait). Under torch.compile the loop
is unrolled into the graph: each sequence length compiles its own graph, and a small chunk makes a long one.
"""

import torch
import torch.nn as nn
from torch.autograd.function import once_differentiable


def check(cfg):
    if cfg.chunked_loss < 0 or (cfg.chunked_loss and (cfg.teacher or cfg.fp8_head or cfg.task not in ("lm", "sft"))):
        raise ValueError("chunked_loss must be >= 0, for task 'lm' or 'sft', without teacher or fp8_head (they need "
                         "the whole logits or their own output layer): set chunked_loss=0")


class ChunkedLoss(nn.Module):
    """A language model whose forward(x, y) returns (None, loss) computed chunk by chunk from its hidden states and
    output layer; without targets it is the model itself. The output layer must be a plain nn.Linear: the loss
    reads its float weight, so a fake-quantized (qat) or lowered (base_dtype) head would be bypassed."""

    def __init__(self, model, chunk):
        super().__init__()
        if type(model.lm_head) is not nn.Linear:
            raise ValueError(f"chunked_loss computes the output layer from its float weight, but this untied output "
                             f"layer is a {type(model.lm_head).__name__} (qat or base_dtype): set chunked_loss=0")
        self.model, self.chunk = model, chunk

    def forward(self, idx, targets=None):
        if targets is None:
            return self.model(idx)
        x = self.model.hidden_states(idx)  # (B, T, C)
        w = self.model.lm_head.weight[:self.model.config.vocab_size]  # (vocab, C): padding rows are not tokens
        return None, chunked_cross_entropy(x.reshape(-1, x.size(-1)), w, targets.reshape(-1), self.chunk)


class ChunkedCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, targets, chunk, grad_enabled):
        """x (tokens, C), w (vocab, C), targets (tokens,) -> mean cross-entropy of softmax(x @ w.T).
        grad_enabled: whether gradients are on outside (inside forward they never are)."""
        want_x = grad_enabled and ctx.needs_input_grad[0]
        want_w = grad_enabled and ctx.needs_input_grad[1]  # False for a frozen output layer
        counted = targets != -1  # (tokens,)
        n = counted.sum()  # no clamp: with every target ignored the loss is 0/0 = nan, as F.cross_entropy's
        total = torch.zeros((), dtype=torch.float32, device=x.device)
        grad_x = torch.empty_like(x) if want_x else None
        grad_w = torch.zeros(w.shape, dtype=torch.float32, device=w.device) if want_w else None
        for s in range(0, x.size(0), chunk):
            xc, tc, kc = x[s:s + chunk], targets[s:s + chunk].clamp(min=0), counted[s:s + chunk]
            logits = (xc @ w.t()).float()  # (chunk, vocab); under autocast the matmul runs in 16 bits
            lse = torch.logsumexp(logits, dim=-1)  # (chunk,)
            total += ((lse - logits.gather(1, tc[:, None])[:, 0]) * kc).sum()
            if want_x or want_w:
                d = torch.exp(logits - lse[:, None])  # softmax, (chunk, vocab)
                d[torch.arange(len(tc), device=d.device), tc] -= 1.0
                d *= kc[:, None]  # ignored tokens add nothing
                if want_x:
                    grad_x[s:s + chunk] = (d.to(w.dtype) @ w).to(x.dtype)  # (chunk, C)
                if want_w:
                    grad_w += (d.to(xc.dtype).t() @ xc).float()  # (vocab, C)
        ctx.save_for_backward(grad_x, grad_w, n)
        ctx.w_dtype = w.dtype
        return total / n

    @staticmethod
    @once_differentiable  # the stored gradients are constants: no gradient of the gradient
    def backward(ctx, grad_loss):
        grad_x, grad_w, n = ctx.saved_tensors
        scale = grad_loss / n
        grad_x = None if grad_x is None else grad_x * scale.to(grad_x.dtype)
        grad_w = None if grad_w is None else (grad_w * scale).to(ctx.w_dtype)
        return grad_x, grad_w, None, None, None


def chunked_cross_entropy(x, w, targets, chunk):
    """Mean cross-entropy of the logits x @ w.T against targets (-1: ignored), never holding all the logits."""
    if chunk < 1:
        raise ValueError(f"chunk={chunk} must be at least 1")
    return ChunkedCrossEntropy.apply(x, w, targets, chunk, torch.is_grad_enabled())
