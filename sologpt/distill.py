"""Knowledge distillation (train.py: teacher = "out-big/ckpt.pt"): train a student GPT toward a frozen teacher's
soft labels as well as the data. The student is wrapped once at setup; the training step calls the wrapper as it
would the model:

    teacher = load_teacher("out-big/ckpt.pt", device, vocab_size=student_vocab, block_size=student_block)
    loss_model = Distill(student, teacher, alpha=0.5, temperature=2.0)
    logits, loss = loss_model(x, y)  # alpha * T^2 * KL(teacher || student) + (1 - alpha) * CE

The teacher's full next-token distribution carries more than the one observed token: which other tokens were
plausible and how much ("dark knowledge", Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a Neural
Network"). Teacher and student must share a tokenizer, since the KL term compares their probabilities token id by
token id.

Memory: the loss holds a few float32 tensors of (tokens, vocab), e.g. 2.4 GB each for 12 x 1024 tokens over
GPT-2's 50257; the teacher's forward costs no activations for backward (no_grad).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from sologpt.checkpoint import load_source, locate


def check(cfg):
    if cfg.teacher and cfg.task not in ("lm", "sft"):
        raise ValueError(f"teacher={cfg.teacher!r} teaches a language model: use it with task 'lm' or 'sft'")
    if cfg.teacher:  # a run folder resolves to its ckpt.pt
        cfg.teacher = str(locate(cfg.teacher, "teacher").path)
    if not 0.0 <= cfg.distill_alpha <= 1.0 or cfg.distill_temperature <= 0:
        raise ValueError("distill_alpha must be in [0, 1] and distill_temperature above 0")


class Distill(nn.Module):
    """The student with the distillation loss: forward(x, y) -> (student logits, mixed loss) in training. In
    evaluation (model.eval()) it is the student alone, so val loss is comparable with runs without a teacher.
    The teacher stays in eval mode (no dropout) and frozen whatever mode the wrapper is put in."""

    def __init__(self, student, teacher, alpha, temperature):
        super().__init__()
        self.student, self.teacher, self.alpha, self.temperature = student, teacher, alpha, temperature

    def forward(self, idx, targets=None):
        logits, loss = self.student(idx, targets)
        if not self.training or targets is None:
            return logits, loss
        with torch.no_grad():
            teacher_logits, _ = self.teacher(idx)
        loss, _ = distill_loss(logits, teacher_logits, targets, self.alpha, self.temperature)
        return logits, loss

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        return self


def load_teacher(source, device, vocab_size, block_size):
    """The teacher from a run folder, a sologpt checkpoint file (any kind: full, LoRA, quantized) or a Hugging Face
    GPT-2 directory: in eval mode (no dropout), every parameter frozen, on device. Raises ValueError with one line
    when it cannot teach a student of this vocab_size and block_size."""
    teacher = load_source(source, flag="teacher")  # checkpoint.locate tells the kinds apart
    c = teacher.config
    if c.n_classes > 0 or c.n_tags > 0:
        kind = "a classifier" if c.n_classes > 0 else "a tagger"
        raise ValueError(f"teacher {source} is {kind}: distillation needs a language model teacher")
    if c.vocab_size != vocab_size:
        raise ValueError(f"teacher has a vocabulary of {c.vocab_size} tokens, the student {vocab_size}: "
                         f"distill between models that share a tokenizer")
    if c.block_size < block_size:
        raise ValueError(f"teacher has block_size {c.block_size}, the student {block_size}: the teacher must see "
                         f"the student's whole context, so lower --block_size to {c.block_size} or less")
    teacher.requires_grad_(False)  # no .grad, no optimizer state, and autograd records nothing through it
    return teacher.to(device).eval()


def distill_loss(student_logits, teacher_logits, targets, alpha, temperature):
    """(loss, parts) for logits (B, T, vocab) and targets (B, T), where targets of -1 are ignored:

        loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * CE(student, targets)

    KL is summed over the vocabulary and averaged over the tokens whose target is not -1, like the CE.
    T^2: the gradient of the softened KL scales as 1 / T^2, so multiplying by T^2 keeps the two terms' relative
    weight the same whichever temperature is used (Hinton et al. 2015, section 2).
    Computed in float32 whatever the logits' dtype. parts = {"kl", "ce"}: detached tensors, so logging them
    costs a GPU sync only when the caller calls .item()."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be between 0 (data only) and 1 (teacher only)")
    if temperature <= 0:
        raise ValueError(f"temperature={temperature} must be positive")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ: the models must share a tokenizer")
    V = student_logits.size(-1)
    s = student_logits.float().reshape(-1, V)  # (N, V)
    t = teacher_logits.detach().float().reshape(-1, V)  # (N, V): the teacher is a fixed target
    y = targets.reshape(-1)  # (N,)
    keep = (y != -1).float()  # (N,)
    log_ps = F.log_softmax(s / temperature, dim=-1)  # (N, V)
    log_pt = F.log_softmax(t / temperature, dim=-1)  # (N, V)
    kl_per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)  # (N,): sum pt (log pt - log ps)
    kl = (kl_per_token * keep).sum() / keep.sum().clamp(min=1)
    ce = F.cross_entropy(s, y, ignore_index=-1)
    loss = alpha * temperature**2 * kl + (1 - alpha) * ce
    return loss, {"kl": kl.detach(), "ce": ce.detach()}
