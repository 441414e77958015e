"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et
al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"): a small draft model proposes k
tokens one at a time, the target model scores all of them in one forward, and a rejection rule keeps a prefix of
them, so the text follows the target's own distribution while the target runs once per accepted run of tokens.

One round, with q_i and p_i the draft's and the target's distributions for the i-th new position (both after the
same temperature, top_k and top_p filtering, so the output follows the target's filtered distribution):

    draft:  d_i ~ q_i for i = 1..k              (k one-token steps over the draft's own KV cache)
    target: p_1..p_k+1 from one forward of [last token, d_1..d_k] over the target's KV cache
    accept d_i while u_i < p_i(d_i) / q_i(d_i), u_i ~ U(0, 1)
    at the first rejected i: draw from normalize(max(p_i - q_i, 0)); if all k are accepted: draw from p_k+1

Each round yields 1..k+1 tokens. Greedy (temperature 0) is the same rule with one-hot distributions: the draft's
argmax is kept while it equals the target's, so the tokens are exactly the target's greedy tokens.

Both models run through sologpt/inference.py's Engine (its KV cache and masked forward). A cache is "rolled back"
by its length alone: columns past the accepted tokens hold rejected drafts, which no query attends to until the
next round writes over them. Rows are generated one after another (batch 1): per-row acceptance with a shared cache
column would need per-row positions.
"""

import torch

from model import filter_logits
from sologpt.inference import Engine, cut


def tokenizer_of(meta):
    """What must match for two models to share token ids: the tokenizer kind, a char table, extra tokens."""
    return meta.get("tokenizer"), meta.get("chars"), tuple(meta.get("extra_tokens", []))


def check_pair(target, draft, target_meta=None, draft_meta=None):
    """Raise ValueError (one line) unless the draft can propose tokens for the target."""
    tv, dv = target.config.vocab_size, draft.config.vocab_size
    if tv != dv:
        raise ValueError(f"the draft model's vocab_size={dv} differs from the model's {tv}: the draft must use "
                         "the same tokenizer (train it on the same dataset)")
    if target_meta is not None and draft_meta is not None and tokenizer_of(target_meta) != tokenizer_of(draft_meta):
        raise ValueError(f"the draft model's tokenizer ({draft_meta.get('tokenizer')}) differs from the model's "
                         f"({target_meta.get('tokenizer')}): the draft must be trained on the same dataset")


def probs_of(logits, temperature, top_k, top_p):
    """The distribution tokens are drawn from, (..., vocab) in float32: one-hot on the argmax for temperature 0."""
    if temperature == 0:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.size(-1)).float()
    shape = logits.shape
    return filter_logits(logits.reshape(-1, shape[-1]), temperature, top_k, top_p).softmax(-1).view(shape)


def draw(probs, generator, greedy):
    """One token from each row of probs (N, vocab) -> (N, 1), with no host sync: the exponential race of
    sologpt/inference.py's pick (argmax of p / E, E ~ Exp(1)); the argmax when greedy."""
    if greedy:
        return probs.argmax(-1, keepdim=True)
    noise = torch.empty_like(probs).exponential_(generator=generator)
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1, keepdim=True)


class SpeculativeEngine:
    """Generates with `model`, proposing `draft_tokens` tokens per round with `draft` (same vocabulary). The same
    generate() as Engine's; stats counts the draft tokens proposed and accepted, the target's forwards (prefills
    included) and the tokens returned."""

    def __init__(self, model, draft, max_len, device, dtype=None, draft_tokens=4):
        check_pair(model, draft)
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens={draft_tokens} must be at least 1")
        for m, name in ((model, "model"), (draft, "draft model")):
            if max_len > m.config.block_size:
                raise ValueError(f"prompt + new tokens ({max_len}) exceed the {name}'s block_size="
                                 f"{m.config.block_size}")
        self.k, self.device = draft_tokens, torch.device(device)
        self.target = Engine(model, 1, max_len, device, dtype)
        self.draft = Engine(draft, 1, max_len, device, dtype)
        self.stats = {"proposed": 0, "accepted": 0, "target_forwards": 0, "tokens": 0}

    def acceptance(self):
        """The share of proposed draft tokens the target kept."""
        return self.stats["accepted"] / max(self.stats["proposed"], 1)

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 stop_token=None, on_token=None, ctx=None):
        """As Engine.generate, one prompt after another; on_token(step, tokens (1,)) is called for each token."""
        return [self.generate_one(p, max_new_tokens, (temperature, top_k, top_p), generator, stop_token, on_token,
                                  ctx) for p in prompts]

    def generate_one(self, prompt, max_new_tokens, sampling, generator, stop_token, on_token, ctx):
        greedy = sampling[0] == 0
        _, P, pad, logits, ctx = self.target.prefill([prompt], max_new_tokens, ctx)
        self.draft.prefill([prompt], max_new_tokens, ctx)
        seq = list(prompt) + draw(probs_of(logits, *sampling), generator, greedy)[0].tolist()  # (P + 1) tokens
        if on_token is not None:
            on_token(0, torch.tensor(seq[-1:]))
        drafted = P  # columns of the draft's cache that hold seq's tokens; the target's hold len(seq) - 1
        while len(seq) - P < max_new_tokens and not (stop_token is not None and stop_token in seq[P:]):
            n = len(seq) - 1  # the column of the last token, which neither model has read yet
            k = min(self.k, max_new_tokens - (len(seq) - P) - 1)  # no more than the tokens still wanted
            tokens, q = [], []
            with ctx:
                x = torch.tensor([seq[drafted:]], device=self.device)  # (1, 1), or (1, 2) after a full accept
                for i in range(k):  # the draft's k proposals, each fed back in (the last one is not needed)
                    step_logits = self.draft.forward(x, torch.tensor(drafted if i == 0 else n + i, device=self.device),
                                                     pad)
                    q.append(probs_of(step_logits, *sampling)[0])  # (vocab,)
                    x = draw(q[-1][None], generator, greedy)  # (1, 1)
                    tokens.append(x[0])
                proposal = torch.cat([torch.tensor(seq[-1:], device=self.device)] + tokens)  # (k + 1,)
                h = self.target.hidden(proposal[None], torch.tensor(n, device=self.device), pad)  # (1, k + 1, C)
                p = probs_of(self.target.head(h)[0], *sampling)  # (k + 1, vocab)
            d = proposal[1:]  # (k,)
            if k:
                q = torch.stack(q)  # (k, vocab)
                rows = torch.arange(k, device=self.device)
                ratio = p[rows, d] / q[rows, d]  # q(d) > 0: d was drawn from q
                u = torch.zeros(k, device=self.device) if greedy else torch.rand(k, device=self.device,
                                                                                 generator=generator)
                accepted = int((u < ratio).long().cumprod(0).sum())  # the leading run of accepted drafts
            else:
                accepted = 0
            if accepted < k:  # the first rejection: draw from the part of p that q under-covers
                rest = (p[accepted] - q[accepted]).clamp_min(0)
                rest = rest if rest.sum() > 0 else p[accepted]  # p == q up to rounding: rejection was a fluke
                last = draw(rest[None] / rest.sum(), generator, greedy)[0]
            else:  # all kept: a bonus token from the target's next distribution
                last = draw(p[k][None], generator, greedy)[0]
            new = d[:accepted].tolist() + last.tolist()
            if on_token is not None:
                for step, t in enumerate(new[:P + max_new_tokens - len(seq)], len(seq) - P):
                    on_token(step, torch.tensor([t]))
            seq += new
            drafted = n + min(accepted, k - 1) + 1 if k else drafted  # the draft read seq[-1], d_1..d_k-1
            s = self.stats
            s["proposed"], s["accepted"] = s["proposed"] + k, s["accepted"] + accepted
            s["target_forwards"] += 1
        out = seq[P:P + max_new_tokens]
        self.stats["tokens"] += len(out)
        self.stats["target_forwards"] += 1  # the prefill, which gave the first token
        return cut([out], stop_token)[0]
