"""Fast, batched generation for sample.py: prompts of different lengths in one batch, a preallocated KV cache, and
(on CUDA) the one-token decode step replayed as a CUDA graph.

Layout: the prompts are left-padded to a common length P, so every row writes its next token to the same cache
column. Row b has pad[b] empty columns first; its tokens keep their own positions (column - pad[b]), and no query
ever attends to an empty column, so each row computes exactly what it would alone. (An empty column attends only
to itself, which keeps its values finite; they are never read.)

The cache has max_len = P + max_new_tokens columns, at most block_size: this engine does not slide the window (for
that, GPT.generate re-fills its cache every step). Every decode step attends over all max_len columns with a mask,
so its shapes never change and one CUDA graph serves every step; the masked columns cost a little bandwidth.

Two decoders share that forward. Engine picks each token on the host side of the loop (sample_next, as
GPT.generate does) and replays a one-step graph. MultiStepEngine picks tokens on the device (pick: the same
filtering, and the exponential race instead of torch.multinomial, which waits for the GPU to check its input), so K
steps, sampling included, run with no host sync and are replayed as one CUDA graph: the host checks for the stop
token once per K tokens and drops what was decoded past the end.
"""

import contextlib

import torch
import torch.nn.functional as F

from model import filter_logits, sample_next


class Engine:
    def __init__(self, model, batch_size, max_len, device, dtype=None, cuda_graph=False):
        c = model.config
        self.model, self.device, self.max_len, self.B = model, torch.device(device), max_len, batch_size
        hs = c.n_embd // c.n_head
        if dtype is None:
            dtype = model.transformer.wte.weight.dtype
        shape = (batch_size, c.n_head, max_len, hs)  # (B, nh, S, hs) per layer
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layer)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(c.n_layer)]
        self.cols = torch.arange(max_len, device=device)  # (S,)
        self.cuda_graph = cuda_graph and self.device.type == "cuda"
        self.graph = None

    @torch.no_grad()
    def forward(self, idx, start, pad):
        """Run tokens idx (B, T) written at cache columns start..start+T (start: a 0-d tensor) for rows with pad (B,)
        empty columns; returns the logits of the last column (B, vocab)."""
        return self.head(self.hidden(idx, start, pad)[:, -1])

    def head(self, x):
        """Final norm and output layer: hidden states (..., C) -> logits (..., vocab)."""
        m = self.model
        return m.lm_head(m.transformer.ln_f(x))[..., :m.config.vocab_size]

    @torch.no_grad()
    def hidden(self, idx, start, pad):
        """As forward, but returns the last block's output at every column (B, T, C): the cache is written the same
        way (sologpt/speculative.py scores all T columns)."""
        m, c = self.model, self.model.config
        B, T = idx.shape
        C = c.n_embd
        # (T,) cache columns of these tokens; past the last column (MultiStepEngine's steps beyond the end, whose
        # tokens are dropped) the last one is rewritten, so positions stay below block_size
        cols = (start + torch.arange(T, device=idx.device)).clamp(max=self.max_len - 1)
        pos = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, T) each row's own positions
        x = m.residual_cast(m.embed(idx, pos))  # (B, T, C)
        rope = m.rotary(pos)  # rotary angles of each row's positions, or None
        key = self.cols[None, None, :]  # (1, 1, S)
        query = cols[None, :, None]  # (1, T, 1)
        mask = (key <= query) & ((key >= pad[:, None, None]) | (key == query))  # (B, T, S)
        t = idx.device.type
        dtype = torch.get_autocast_dtype(t) if torch.is_autocast_enabled(t) else x.dtype  # the dtype of q
        # (B, 1, T, S), the same for every head: additive, made once here (sdpa would convert a bool mask per layer)
        mask = torch.zeros(mask.shape, dtype=dtype, device=idx.device).masked_fill_(~mask, float("-inf"))[:, None]
        for i, block in enumerate(m.transformer.h):
            a = block.attn
            q, k, v = a.qkv(block.ln_1(x), rope)  # 3 x (B, nh, T, hs)
            self.k[i].index_copy_(2, cols, k.to(self.k[i].dtype))
            self.v[i].index_copy_(2, cols, v.to(self.v[i].dtype))
            y = F.scaled_dot_product_attention(q, self.k[i].to(q.dtype), self.v[i].to(q.dtype), attn_mask=mask)
            x = x + a.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
            x = x + block.mlp(block.ln_2(x))
        return x

    def _decode(self, token, col, pad):
        """One new token per row at column col: (B, 1) -> (B, vocab); replayed from a CUDA graph when enabled."""
        if not self.cuda_graph:
            return self.forward(token, col, pad)
        if self.graph is None:
            self.static = {"token": token.clone(), "col": col.clone(), "pad": pad.clone()}
            self.graph, self.static["logits"] = record(
                lambda: self.forward(self.static["token"], self.static["col"], self.static["pad"]))
        self.static["token"].copy_(token)
        self.static["col"].copy_(col)
        self.static["pad"].copy_(pad)
        self.graph.replay()
        return self.static["logits"]

    def prefill(self, prompts, max_new_tokens, ctx):
        """Checks that the prompts fit, runs them into the cache; returns B, P, pad (B,), the last logits (B, vocab)
        and ctx (autocast, or a no-op)."""
        B = len(prompts)
        P = max(len(p) for p in prompts)
        if P + max_new_tokens > self.max_len or B > self.B:
            raise ValueError(f"{B} prompts of up to {P} tokens + {max_new_tokens} new do not fit the engine "
                             f"({self.B} rows x {self.max_len} columns)")
        ctx = ctx or torch.autocast(self.device.type, enabled=False)
        pad = torch.tensor([P - len(p) for p in prompts] + [0] * (self.B - B), device=self.device)
        idx = torch.zeros(self.B, P, dtype=torch.long, device=self.device)  # (B, P) left-padded prompts
        for b, p in enumerate(prompts):
            idx[b, P - len(p):] = torch.tensor(p, dtype=torch.long)
        with ctx:
            logits = self.forward(idx, torch.tensor(0, device=self.device), pad)
        return B, P, pad, logits, ctx

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 stop_token=None, on_token=None, ctx=None):
        """prompts: lists of token ids (at most batch_size of them). Returns each row's new tokens, cut after
        stop_token. on_token(step, tokens (B,)) is called after every step (for streaming)."""
        B, P, pad, logits, ctx = self.prefill(prompts, max_new_tokens, ctx)
        out, done = [], torch.zeros(self.B, dtype=torch.bool, device=self.device)
        col = torch.tensor(P, device=self.device)  # the column the next token goes to, kept on the device
        for step in range(max_new_tokens):
            token = sample_next(logits, temperature, top_k, top_p, generator)  # (B, 1)
            out.append(token[:B, 0])
            if on_token is not None:
                on_token(step, token[:B, 0])
            if stop_token is not None:
                done |= token[:, 0] == stop_token
                if step % 8 == 7 and bool(done[:B].all()):  # a host sync every 8 steps, not every step
                    break
            if step + 1 < max_new_tokens:
                with ctx:
                    logits = self._decode(token, col, pad)
                col += 1
        return cut(torch.stack(out, dim=1).tolist(), stop_token)  # (B, new)


def record(fn, ctx=None):
    """fn() as a CUDA graph: (graph, the tensors fn returned, which each replay rewrites). Warmed up twice on a side
    stream first (lazy init, autotuning), then captured, both in ctx (an autocast context) if given. Autocast caches
    the weights' bf16 copies made in the warm-up and frees them when its context ends, so the cache is cleared before
    the capture (the graph makes its own, in its memory pool) and after it (an enclosing autocast must not keep the
    capture's copies, which are not written until a replay)."""
    ctx = ctx or contextlib.nullcontext()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), ctx:
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    torch.clear_autocast_cache()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), ctx:
        out = fn()
    torch.clear_autocast_cache()
    return graph, out


def cut(tokens, stop_token):
    """Each row up to and including its first stop_token."""
    if stop_token is None:
        return tokens
    return [row[:row.index(stop_token) + 1] if stop_token in row else row for row in tokens]


def pick(logits, temperature, top_k, top_p, noise):
    """sample_next without a host sync: logits (B, vocab) -> (B, 1). noise: independent Exp(1) draws (B, vocab),
    None when temperature is 0 (greedy: the argmax, as sample_next). The token with the smallest noise / p wins
    the race: noise_i / p_i is exponential with rate p_i, and the minimum of independent exponentials is term i
    with probability p_i / sum(p), so this draws from p exactly (argmax p / noise is the same thing)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)  # (B, vocab): zero where filtered
    return (probs / noise.clamp_min(torch.finfo(noise.dtype).tiny)).argmax(dim=-1, keepdim=True)  # 0/0 never wins


class MultiStepEngine(Engine):
    """Engine that decodes `steps` tokens per call with no host sync: tokens are picked on the device (pick), and on
    CUDA (cuda_graph) the `steps` decode steps, sampling included, are recorded once per sampling setting and
    replayed as one CUDA graph. The stop token is checked once per `steps` tokens; what was decoded past the end
    (of max_new_tokens, or of every row's stop) is dropped. Greedy tokens equal Engine's; sampled ones follow the same
    distribution (tested), drawn from generator's Exp(1) noise, so the same seed gives the same text."""

    def __init__(self, model, batch_size, max_len, device, dtype=None, cuda_graph=False, steps=16):
        super().__init__(model, batch_size, max_len, device, dtype, cuda_graph)
        if steps < 1:
            raise ValueError(f"steps={steps} must be at least 1")
        self.steps = steps
        self.graphs = {}  # (temperature, top_k, top_p) -> (CUDA graph, its static tensors)

    def run_steps(self, token, col, pad, noise, sampling):
        """`steps` decode steps from token (B, 1) at column col (0-d): returns the next `steps` tokens (B, steps).
        token and col are advanced in place, so the next call continues where this one stopped."""
        out = []
        for k in range(self.steps):
            token_k = pick(self.forward(token if k == 0 else out[-1], col, pad), *sampling,
                           None if noise is None else noise[k])  # (B, 1)
            out.append(token_k)
            col += 1
        token.copy_(out[-1])
        return torch.cat(out, dim=1)  # (B, steps)

    def noise(self, sampling, generator, *shape):
        """Exp(1) draws for pick (shape + (B, vocab)), or None for greedy."""
        if sampling[0] == 0:
            return None
        shape = (*shape, self.B, self.model.config.vocab_size)
        return torch.empty(shape, device=self.device).exponential_(generator=generator)

    def recorded(self, sampling, ctx):
        """The CUDA graph of run_steps for these sampling settings and its static tensors, recorded on first use.
        The capture runs in its own autocast context, so the weights' bf16 copies are made inside the graph (once
        per replay, then cached for its `steps` steps), not taken from a warm-up's cache that is freed after it."""
        if sampling not in self.graphs:
            V = self.model.config.vocab_size
            static = {"token": torch.zeros(self.B, 1, dtype=torch.long, device=self.device),
                      "col": torch.tensor(0, device=self.device),
                      "pad": torch.zeros(self.B, dtype=torch.long, device=self.device),
                      "noise": None if sampling[0] == 0 else torch.ones(self.steps, self.B, V, device=self.device)}
            args = (static["token"], static["col"], static["pad"], static["noise"], sampling)
            graph, static["tokens"] = record(lambda: self.run_steps(*args), ctx)  # tokens: (B, steps)
            self.graphs[sampling] = graph, static
        return self.graphs[sampling]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 stop_token=None, on_token=None, ctx=None):
        """As Engine.generate; on_token(step, tokens (B,)) is called for each token, `steps` at a time."""
        ctx = ctx or torch.autocast(self.device.type, enabled=False)
        sampling = (temperature, top_k, top_p)
        if self.cuda_graph:  # recorded before the prefill: its warm-up writes cache columns
            graph, static = self.recorded(sampling, ctx)
        B, P, pad, logits, ctx = self.prefill(prompts, max_new_tokens, ctx)
        token = pick(logits, *sampling, self.noise(sampling, generator))  # (B, 1)
        col = torch.tensor(P, device=self.device)  # the column the next token goes to
        if self.cuda_graph:
            for name, value in (("token", token), ("col", col), ("pad", pad)):
                static[name].copy_(value)
        out, done = [token.clone()], torch.zeros(self.B, dtype=torch.bool, device=self.device)
        new = 0  # tokens handed to on_token so far
        while True:
            if on_token is not None:  # streaming: one host sync per `steps` tokens
                for step in range(new, min(new + out[-1].size(1), max_new_tokens)):
                    on_token(step, out[-1][:B, step - new])
            new += out[-1].size(1)
            if stop_token is not None:  # one host sync per `steps` tokens
                done |= (out[-1] == stop_token).any(dim=1)
                if bool(done[:B].all()):
                    break
            if new >= max_new_tokens:
                break
            if self.cuda_graph:
                if static["noise"] is not None:
                    static["noise"].exponential_(generator=generator)
                graph.replay()
                out.append(static["tokens"].clone())
            else:
                with ctx:
                    out.append(self.run_steps(token, col, pad, self.noise(sampling, generator, self.steps), sampling))
        tokens = torch.cat(out, dim=1)[:B, :max_new_tokens]  # (B, new)
        return cut(tokens.tolist(), stop_token)
