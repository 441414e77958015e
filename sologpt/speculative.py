"""Speculative decoding (Leviathan et al. 2023, "Fast Inference from Transformers via Speculative Decoding"; Chen et
al. 2023, "Accelerating Large Language Model Decoding with Speculative Sampling"): a small draft model proposes k
tokens one at a time, the target model scores all of them in one forward, and a rejection rule keeps a prefix of
them, so the text follows the target's own distribution while the target runs once per accepted run of tokens.

One round, with q_i and p_i the draft's and the target's distributions for the i-th new position (both after the
same temperature, top_k and top_p filtering, so the output follows the target's filtered distribution):

    draft:  d_i ~ q_i for i = 1..k              (k steps over the draft's own KV cache)
    target: p_1..p_k+1 from one forward of [last token, d_1..d_k] over the target's KV cache
    accept d_i while u_i < p_i(d_i) / q_i(d_i), u_i ~ U(0, 1)
    at the first rejected i: draw from normalize(max(p_i - q_i, 0)); if all k are accepted: draw from p_k+1

Each round yields 1..k+1 tokens. Greedy (temperature 0) is the same rule with one-hot distributions: the draft's
argmax is kept while it equals the target's, so the tokens are exactly the target's greedy tokens.

Both models run through sologpt/inference.py's Engine (its KV cache and masked forward). A cache is "rolled back"
by its length alone: columns past the accepted tokens hold rejected drafts, which no query attends to until the
next round writes over them. Every round has the same shapes, so on CUDA it can be recorded once and replayed as
one CUDA graph (cuda_graph), with one host sync per round to read the tokens: the draft's first step always reads
the last two tokens (the one before the last is rewritten with the same values, or is the last draft of a round
that kept all k), the target always reads k + 1, and near max_new_tokens the steps past the end rewrite the
cache's last column (as in MultiStepEngine) and their tokens are dropped. Rows are generated one after another
(batch 1): per-row acceptance with a shared cache column would need per-row positions.
"""

import torch

from model import filter_logits
from sologpt.inference import Engine, cut, record


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
    """The distribution tokens are drawn from, (N, vocab) in float32: one-hot on the argmax for temperature 0."""
    if temperature == 0:  # (scatter, not one_hot, which checks its input on the host for some devices)
        return torch.zeros_like(logits, dtype=torch.float).scatter_(-1, logits.argmax(-1, keepdim=True), 1.0)
    return filter_logits(logits, temperature, top_k, top_p).softmax(-1)


def draw(weights, noise):
    """One token from each row of weights (N, vocab), which need not sum to 1 -> (N,), with no host sync: the
    exponential race of sologpt/inference.py's pick (argmax of w / E, E ~ Exp(1): token i wins with probability
    w_i / sum(w)); the argmax when noise is None (greedy)."""
    if noise is None:
        return weights.argmax(-1)
    return (weights / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(-1)


class SpeculativeEngine:
    """Generates with `model`, proposing `draft_tokens` tokens per round with `draft` (same vocabulary). The same
    generate() as Engine's; stats counts the draft tokens proposed and accepted, the target's forwards (prefills
    included) and the tokens returned."""

    def __init__(self, model, draft, max_len, device, dtype=None, draft_tokens=4, cuda_graph=False):
        check_pair(model, draft)
        if draft_tokens < 1:
            raise ValueError(f"draft_tokens={draft_tokens} must be at least 1")
        for m, name in ((model, "model"), (draft, "draft model")):
            if max_len > m.config.block_size:
                raise ValueError(f"prompt + new tokens ({max_len}) exceed the {name}'s block_size="
                                 f"{m.config.block_size} (speculative decoding does not slide the window): lower "
                                 f"max_new_tokens or shorten the prompt")
        self.k, self.device, self.vocab_size = draft_tokens, torch.device(device), model.config.vocab_size
        self.target = Engine(model, 1, max_len, device, dtype)
        self.draft = Engine(draft, 1, max_len, device, dtype)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.graphs = {}  # (temperature, top_k, top_p) -> (CUDA graph, its inputs and output)
        self.stats = {"proposed": 0, "accepted": 0, "target_forwards": 0, "tokens": 0}

    def acceptance(self):
        """The share of proposed draft tokens the target kept."""
        return self.stats["accepted"] / max(self.stats["proposed"], 1)

    def inputs(self, greedy):
        """The tensors one round reads, filled before each: the last two tokens (1, 2), the last one's column n
        (0-d), the rows' padding (none), and the round's random draws (None for greedy): Exp(1) noise for the k
        draft tokens and the k + 1 candidate last tokens (2k + 1, vocab), U(0, 1) for the k acceptance tests."""
        d = self.device
        return {"last2": torch.zeros(1, 2, dtype=torch.long, device=d), "n": torch.tensor(1, device=d),
                "pad": torch.zeros(1, dtype=torch.long, device=d),
                "noise": None if greedy else torch.ones(2 * self.k + 1, self.vocab_size, device=d),
                "u": None if greedy else torch.zeros(self.k, device=d)}

    def round(self, b, sampling):
        """One round from the inputs b, with no host sync: returns (k + 2,) = the number a of drafts kept, then
        the round's tokens d_1..d_a and the drawn one (the entries after them are filler)."""
        k, noise = self.k, b["noise"]
        n, pad = b["n"], b["pad"]
        logits = self.draft.forward(b["last2"], n - 1, pad)  # (1, vocab) after the last token, at column n
        q, d = [], []
        for i in range(k):  # the draft's k proposals, each fed back in (the last one is not needed)
            if i:
                logits = self.draft.forward(d[-1][None], n + i, pad)
            q.append(probs_of(logits, *sampling))  # (1, vocab)
            d.append(draw(q[-1], None if noise is None else noise[i:i + 1]))  # (1,)
        q, d = torch.cat(q), torch.cat(d)  # (k, vocab), (k,)
        proposal = torch.cat([b["last2"][0, 1:], d])  # (k + 1,) the last token and the drafts
        h = self.target.hidden(proposal[None], n, pad)  # (1, k + 1, C)
        p = probs_of(self.target.head(h)[0], *sampling)  # (k + 1, vocab)
        rows = torch.arange(k, device=d.device)
        ratio = p[rows, d] / q[rows, d]  # q(d) > 0: d was drawn from q
        u = torch.zeros(k, device=d.device) if b["u"] is None else b["u"]
        a = (u < ratio).long().cumprod(0).sum()  # (0-d) the leading run of accepted drafts
        rest = (p[:k] - q).clamp_min(0)  # (k, vocab) where p exceeds q: what a rejection at i draws from
        rest = torch.where(rest.sum(-1, keepdim=True) > 0, rest, p[:k])  # p == q up to rounding: a fluke
        final = draw(torch.cat([rest, p[k:]]), None if noise is None else noise[k:])  # (k + 1,) one per place
        place = torch.arange(k + 1, device=d.device)
        tokens = torch.where(place < a, torch.cat([d, d[:1]]), final.gather(0, a[None]))  # (k + 1,)
        return torch.cat([a[None], tokens])  # (k + 2,)

    def recorded(self, sampling, ctx):
        """The CUDA graph of round() for these sampling settings and its tensors, recorded on first use (as
        MultiStepEngine.recorded: warm-up on a side stream, the capture in its own autocast context)."""
        if sampling not in self.graphs:
            b = self.inputs(sampling[0] == 0)
            graph, b["out"] = record(lambda: self.round(b, sampling), ctx)
            self.graphs[sampling] = graph, b
        return self.graphs[sampling]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 stop_token=None, on_token=None, ctx=None):
        """As Engine.generate, one prompt after another; on_token(step, tokens (1,)) is called for each token."""
        ctx = ctx or torch.autocast(self.device.type, enabled=False)
        sampling = (temperature, top_k, top_p)
        graph, b = self.recorded(sampling, ctx) if self.cuda_graph else (None, self.inputs(temperature == 0))
        return [self.generate_one(p, max_new_tokens, sampling, generator, stop_token, on_token, ctx, graph, b)
                for p in prompts]

    def generate_one(self, prompt, max_new_tokens, sampling, generator, stop_token, on_token, ctx, graph, b):
        _, P, _, logits, ctx = self.target.prefill([prompt], max_new_tokens, ctx)  # after recorded(): its warm-up
        self.draft.prefill([prompt], max_new_tokens, ctx)  # writes cache columns
        noise = None if b["noise"] is None else torch.empty_like(logits, dtype=torch.float).exponential_(
            generator=generator)
        seq = list(prompt) + draw(probs_of(logits, *sampling), noise).tolist()  # (P + 1) tokens
        if on_token is not None:
            on_token(0, torch.tensor(seq[-1:]))
        while len(seq) - P < max_new_tokens and not (stop_token is not None and stop_token in seq[P:]):
            b["last2"].copy_(torch.tensor([seq[-2:]]))
            b["n"].fill_(len(seq) - 1)  # the column of the last token, which neither model has read yet
            if b["noise"] is not None:
                b["noise"].exponential_(generator=generator)
                b["u"].uniform_(generator=generator)
            if graph is not None:
                graph.replay()
                out = b["out"]
            else:
                with ctx:
                    out = self.round(b, sampling)
            accepted, *tokens = out.tolist()  # the round's one host sync
            new, room = tokens[:accepted + 1], P + max_new_tokens - len(seq)
            if on_token is not None:
                for step, t in enumerate(new[:room], len(seq) - P):
                    on_token(step, torch.tensor([t]))
            seq += new
            s = self.stats  # drafts past max_new_tokens count neither as proposed nor as accepted
            s["proposed"], s["accepted"] = s["proposed"] + min(self.k, room), s["accepted"] + min(accepted, room)
            s["target_forwards"] += 1
        out = cut([seq[P:P + max_new_tokens]], stop_token)[0]
        self.stats["tokens"] += len(out)  # the tokens returned (none after a stop token)
        self.stats["target_forwards"] += 1  # the prefill, which gave the first token
        return out
