"""Fast, batched generation for sample.py: prompts of different lengths in one batch, a preallocated KV cache, and
(on CUDA) the one-token decode step replayed as a CUDA graph.

Layout: the prompts are left-padded to a common length P, so every row writes its next token to the same cache
column. Row b has pad[b] empty columns first; its tokens keep their own positions (column - pad[b]), and no query
ever attends to an empty column, so each row computes exactly what it would alone. (An empty column attends only
to itself, which keeps its values finite; they are never read.)

The cache has max_len = P + max_new_tokens columns, at most block_size: this engine does not slide the window (for
that, GPT.generate re-fills its cache every step). Every decode step attends over all max_len columns with a mask,
so its shapes never change and one CUDA graph serves every step; the masked columns cost a little bandwidth.
"""

import torch
import torch.nn.functional as F

from model import sample_next


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
        m, c = self.model, self.model.config
        B, T = idx.shape
        C = c.n_embd
        cols = start + torch.arange(T, device=idx.device)  # (T,) cache columns of these tokens
        pos = (cols[None, :] - pad[:, None]).clamp(min=0)  # (B, T) each row's own positions
        x = m.residual_cast(m.embed(idx, pos))  # (B, T, C)
        rope = m.rotary(pos)  # rotary angles of each row's positions, or None
        key = self.cols[None, None, :]  # (1, 1, S)
        query = cols[None, :, None]  # (1, T, 1)
        mask = (key <= query) & ((key >= pad[:, None, None]) | (key == query))  # (B, T, S)
        mask = mask[:, None]  # (B, 1, T, S): the same for every head
        for i, block in enumerate(m.transformer.h):
            a = block.attn
            q, k, v = a.qkv(block.ln_1(x), rope)  # 3 x (B, nh, T, hs)
            self.k[i].index_copy_(2, cols, k.to(self.k[i].dtype))
            self.v[i].index_copy_(2, cols, v.to(self.v[i].dtype))
            y = F.scaled_dot_product_attention(q, self.k[i].to(q.dtype), self.v[i].to(q.dtype), attn_mask=mask)
            x = x + a.c_proj(y.transpose(1, 2).reshape(B, T, C))  # (B, T, C)
            x = x + block.mlp(block.ln_2(x))
        logits = m.lm_head(m.transformer.ln_f(x[:, -1]))  # (B, padded vocab): only the last column is needed
        return logits[:, :c.vocab_size]

    def _decode(self, token, col, pad):
        """One new token per row at column col: (B, 1) -> (B, vocab); replayed from a CUDA graph when enabled."""
        if not self.cuda_graph:
            return self.forward(token, col, pad)
        if self.graph is None:
            self.static = {"token": token.clone(), "col": col.clone(), "pad": pad.clone()}
            s = torch.cuda.Stream()
            s.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(s):  # warm up outside the graph (lazy init, autotuning)
                for _ in range(2):
                    self.forward(self.static["token"], self.static["col"], self.static["pad"])
            torch.cuda.current_stream().wait_stream(s)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self.static["logits"] = self.forward(self.static["token"], self.static["col"], self.static["pad"])
        self.static["token"].copy_(token)
        self.static["col"].copy_(col)
        self.static["pad"].copy_(pad)
        self.graph.replay()
        return self.static["logits"]

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None, generator=None,
                 stop_token=None, on_token=None, ctx=None):
        """prompts: lists of token ids (at most batch_size of them). Returns each row's new tokens, cut after
        stop_token. on_token(step, tokens (B,)) is called after every step (for streaming)."""
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
            logits = self.forward(idx, torch.tensor(0, device=self.device), pad)  # prefill
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
        tokens = torch.stack(out, dim=1).tolist()  # (B, new)
        if stop_token is not None:
            tokens = [row[:row.index(stop_token) + 1] if stop_token in row else row for row in tokens]
        return tokens
