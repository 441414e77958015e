"""The GPT model: config, hand-written causal self-attention, blocks, generation with a KV cache,
and import/export of Hugging Face GPT-2 checkpoint directories.

Shapes use B = batch, T = time (sequence), C = channels (n_embd), nh = heads, hs = head size.
This file does no I/O beyond reading and writing weights.
"""

import json
import os
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned position embeddings)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    vocab_pad_multiple: int = 1  # round the embedding rows up to a multiple of this: 64 makes the output matmul
    # a shape the GPU runs fast (measured in README, Performance); the extra rows are never read or predicted
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0
    bias: bool = True  # biases in Linear and LayerNorm, as GPT-2 has
    attn_impl: str = "sdpa"  # "sdpa" (F.scaled_dot_product_attention) or "math" (explicit, for reading)
    # modern options (off by default, so GPT-2 weights load; each on makes a model GPT-2 tools cannot read)
    rope: bool = False  # rotary position embeddings on q and k (Su et al. 2021) instead of a learned position table
    rope_base: float = 10000.0  # rotary frequencies: base^(-2i/head_size)
    norm: str = "layernorm"  # "layernorm" or "rmsnorm" (Zhang & Sennrich 2019: no mean, no bias)
    qk_norm: bool = False  # RMS-normalise each head's q and k before attention (keeps attention logits bounded)
    mlp_act: str = "gelu"  # "gelu" (GPT-2's tanh approximation) or "relu2" (squared ReLU, So et al. 2021)
    tie_embeddings: bool = True  # the output layer shares the token embedding's weights (GPT-2); False: its own
    n_classes: int = 0  # > 0 adds a classification head: forward then returns (B, n_classes) logits (task "classify")
    cls_pool: str = "last"  # what the head reads: the "last" real token's hidden state, or the "mean" over tokens

    @property
    def padded_vocab_size(self):
        return -(-self.vocab_size // self.vocab_pad_multiple) * self.vocab_pad_multiple

    def __post_init__(self):
        if self.vocab_pad_multiple < 1:
            raise ValueError(f"vocab_pad_multiple={self.vocab_pad_multiple} must be at least 1")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}: pick values where it is")
        if self.attn_impl not in ("sdpa", "math"):
            raise ValueError(f"attn_impl={self.attn_impl!r} is unknown: use 'sdpa' or 'math'")
        if self.cls_pool not in ("last", "mean"):
            raise ValueError(f"cls_pool={self.cls_pool!r} is unknown: use 'last' or 'mean'")
        if self.norm not in ("layernorm", "rmsnorm"):
            raise ValueError(f"norm={self.norm!r} is unknown: use 'layernorm' or 'rmsnorm'")
        if self.mlp_act not in ("gelu", "relu2"):
            raise ValueError(f"mlp_act={self.mlp_act!r} is unknown: use 'gelu' or 'relu2'")
        if self.rope and (self.n_embd // self.n_head) % 2:
            raise ValueError(f"rope needs an even head size, got n_embd / n_head = {self.n_embd // self.n_head}")

    def modern_options(self):
        """The options set away from GPT-2's architecture that Hugging Face's GPT2LMHeadModel cannot express,
        e.g. ['rope', 'norm=rmsnorm']: empty for a GPT-2 (an untied output layer it can: tie_word_embeddings)."""
        default = GPTConfig()
        out = [f for f in ("rope", "qk_norm") if getattr(self, f)]
        return out + [f"{f}={getattr(self, f)}" for f in ("norm", "mlp_act") if getattr(self, f) != getattr(default, f)]


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.n_embd, eps=1e-5)
    return nn.LayerNorm(config.n_embd, bias=config.bias)


def rotate(x, cos, sin):
    """Rotary embedding: each pair (x[i], x[i + hs/2]) of x (B, nh, T, hs) turned by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)  # 2 x (B, nh, T, hs/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(x.dtype)


class KVCache:
    """Keys and values of past positions, one preallocated buffer per layer, so decoding a new token
    costs one position of work instead of re-running the whole prefix."""

    def __init__(self, n_layer, max_len):
        self.max_len = max_len
        self.pos = 0  # how many positions are filled
        self.k = [None] * n_layer
        self.v = [None] * n_layer

    def update(self, layer, k, v):
        """Store k, v (B, nh, T, hs) at positions pos..pos+T; return all keys and values so far."""
        B, nh, T, hs = k.shape
        if self.k[layer] is None:  # allocate on first use, in the dtype autocast produced
            self.k[layer] = k.new_empty(B, nh, self.max_len, hs)
            self.v[layer] = v.new_empty(B, nh, self.max_len, hs)
        end = self.pos + T
        if end > self.max_len:
            raise ValueError(f"KV cache of {self.max_len} positions cannot take {end}")
        self.k[layer][:, :, self.pos:end] = k
        self.v[layer][:, :, self.pos:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]  # (B, nh, pos+T, hs)


class CausalSelfAttention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.n_head = config.n_head
        self.layer_idx = layer_idx
        self.attn_impl = config.attn_impl
        self.dropout = config.dropout
        self.qk_norm = config.qk_norm
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.attn_dropout = nn.Dropout(config.dropout)
        self.resid_dropout = nn.Dropout(config.dropout)

    def qkv(self, x, rope=None):
        """x (B, T, C) -> q, k, v (B, nh, T, hs), with qk_norm and the rotary angles rope = (cos, sin) applied."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # 3 x (B, T, C)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # (B, nh, T, hs)
        if self.qk_norm:
            q, k = F.rms_norm(q, (q.size(-1),)), F.rms_norm(k, (k.size(-1),))
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        return q, k, v

    def forward(self, x, kv_cache=None, rope=None):
        B, T, C = x.shape
        q, k, v = self.qkv(x, rope)  # 3 x (B, nh, T, hs)

        past = 0
        if kv_cache is not None:
            past = kv_cache.pos
            k, v = kv_cache.update(self.layer_idx, k, v)  # (B, nh, past+T, hs)
        S = k.size(2)

        if self.attn_impl == "math":
            # the textbook formula: softmax(q k^T / sqrt(hs)) v, with future positions masked out
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, nh, T, S)
            mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)  # query t sees keys <= past+t
            att = att.masked_fill(~mask, float("-inf"))
            att = F.softmax(att, dim=-1)
            att = self.attn_dropout(att)
            y = att @ v  # (B, nh, T, hs)
        else:
            dropout_p = self.dropout if self.training else 0.0
            if past == 0:  # no cache or prefill: plain causal mask, which enables the fused kernels
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
            elif T == 1:  # one new token attends to every cached position: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
            else:  # several new tokens after a filled cache: explicit offset causal mask
                mask = torch.ones(T, S, dtype=torch.bool, device=x.device).tril(diagonal=past)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C): heads side by side again
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)
        self.act = config.mlp_act

    def forward(self, x):
        h = self.c_fc(x)  # (B, T, 4C)
        if self.act == "relu2":
            h = F.relu(h).square()
        else:  # GPT-2 uses the tanh approximation of GELU ("gelu_new"); using it too keeps GPT-2 logits exact
            h = F.gelu(h, approximate="tanh")
        return self.dropout(self.c_proj(h))


class Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config, layer_idx):
        super().__init__()
        self.ln_1 = make_norm(config)
        self.attn = CausalSelfAttention(config, layer_idx)
        self.ln_2 = make_norm(config)
        self.mlp = MLP(config)

    def forward(self, x, kv_cache=None, rope=None):
        x = x + self.attn(self.ln_1(x), kv_cache, rope)
        x = x + self.mlp(self.ln_2(x))
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd)))
        if not config.rope:  # learned absolute positions (GPT-2); rotary ones have no weights
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.transformer.update(dict(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        hs = config.n_embd // config.n_head
        inv_freq = config.rope_base ** -(torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, so not in the checkpoint
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:  # tied input and output embeddings (GPT-2, Press & Wolf 2017)
            self.lm_head.weight = self.transformer.wte.weight
        if config.n_classes > 0:
            self.cls_head = nn.Linear(config.n_embd, config.n_classes)
        self.grad_checkpointing = 0  # k > 0: recompute every k-th block's activations in backward (train.py sets it)
        self.loss_chunk = 0  # N > 0: with targets, the output layer and loss N tokens at a time; logits are None
        self.residual_bf16 = False  # under bf16 autocast: the residual stream in bf16, not float32 (train config)
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: scale the residual projections by 1/sqrt(number of residual layers),
        # so the residual stream's variance does not grow with depth (two residual adds per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)  # GPT-2's initializer_range
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self, non_embedding=True):
        """Parameter count. The tied token embedding counts once, without vocabulary padding rows; position
        embeddings are left out by default because they cost no matmul FLOPs."""
        c = self.config
        n = sum(p.numel() for p in self.parameters())
        pad_rows = (c.padded_vocab_size - c.vocab_size) * c.n_embd
        n -= pad_rows if c.tie_embeddings else 2 * pad_rows  # padding rows, of the output layer too when untied
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def crop_block_size(self, block_size):
        """Keep only the first block_size positions, e.g. to fine-tune GPT-2 (1024) on shorter sequences."""
        if block_size > self.config.block_size:
            raise ValueError(f"cannot crop to {block_size} positions: the model has only {self.config.block_size}")
        self.config.block_size = block_size
        if "wpe" in self.transformer:  # rotary positions have no table to crop
            self.transformer.wpe.weight = nn.Parameter(self.transformer.wpe.weight[:block_size].detach().clone())

    def flops_per_token(self, seq_len=None):
        """Training FLOPs per token (forward + backward): 6 per weight in a matmul, plus attention's
        q k^T and att v, 6 * 2 * n_layer * T * C (PaLM, Chowdhery et al. 2022, appendix B)."""
        c = self.config
        T = seq_len or c.block_size
        matmul = self.num_params()
        if not c.tie_embeddings:  # an untied token embedding is a lookup, not a matmul
            matmul -= c.vocab_size * c.n_embd
        return 6 * matmul + 12 * c.n_layer * T * c.n_embd

    def forward(self, idx, targets=None, kv_cache=None, lengths=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None). targets of -1 are ignored.
        With a kv_cache, idx holds only the new tokens and positions continue from the cache.
        A classifier (n_classes > 0) returns (B, n_classes) logits instead; lengths (B,) counts each row's real
        tokens (the rest is right padding) and targets (B,) are class ids."""
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        if self.config.n_classes > 0:
            return self.classify(x, targets, lengths)
        if targets is not None and self.loss_chunk:  # the loss without ever holding all logits (chunked_ce.py)
            from chunked_ce import chunked_cross_entropy
            w = self.lm_head.weight[:self.config.vocab_size]  # (vocab, C): padding rows are not tokens
            return None, chunked_cross_entropy(x.reshape(-1, x.size(-1)), w, targets.reshape(-1), self.loss_chunk)
        logits = self.lm_head(x)  # (B, T, padded vocab)
        if self.config.padded_vocab_size != self.config.vocab_size:
            logits = logits[..., :self.config.vocab_size]  # (B, T, vocab): padding rows are not tokens
        loss = None
        if targets is not None:
            # the loss in float32 even under autocast: log-softmax over 50k classes in bf16 loses precision
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, kv_cache=None):
        """The final (layer-normed) hidden state of every position: (B, T) -> (B, T, C)."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.transformer.drop(self.embed(idx, pos))  # (B, T, C)
        if self.residual_bf16 and torch.is_autocast_enabled(x.device.type) \
                and torch.get_autocast_dtype(x.device.type) == torch.bfloat16:
            # the embeddings are float32 parameters, so x + block(x) stays float32 under autocast; made bf16
            # here, every residual add and norm input moves half the bytes (as Megatron-LM does by default)
            x = x.to(torch.bfloat16)
        rope = self.rotary(pos)
        k = self.grad_checkpointing
        for i, block in enumerate(self.transformer.h):
            if k and self.training and i % k == 0 and torch.is_grad_enabled():
                # keep only this block's input; its activations are recomputed in backward (Chen et al. 2016)
                x = torch.utils.checkpoint.checkpoint(block, x, None, rope, use_reentrant=False)
            else:
                x = block(x, kv_cache, rope)
        if kv_cache is not None:
            kv_cache.pos += T
        return self.transformer.ln_f(x)

    def embed(self, idx, pos):
        """Token embeddings, plus learned position embeddings unless rope: idx (B, T), pos (T,) or (B, T)."""
        x = self.transformer.wte(idx)  # (B, T, C)
        return x if self.config.rope else x + self.transformer.wpe(pos)

    def rotary(self, pos):
        """The rotary angles for positions pos (T,) or (B, T): (cos, sin), each broadcastable to (B, nh, T, hs/2);
        None without rope."""
        if not self.config.rope:
            return None
        angles = pos.float()[..., None] * self.inv_freq  # (T, hs/2) or (B, T, hs/2)
        if angles.dim() == 3:
            angles = angles[:, None]  # (B, 1, T, hs/2): the same for every head
        return angles.cos(), angles.sin()

    def classify(self, x, targets=None, lengths=None):
        """Class logits from hidden states x (B, T, C): the last real token sees the whole text through causal
        attention; "mean" averages the real positions instead. Right padding never reaches real tokens."""
        B, T, _ = x.shape
        if lengths is None:
            lengths = torch.full((B,), T, dtype=torch.long, device=x.device)
        if self.config.cls_pool == "last":
            pooled = x[torch.arange(B, device=x.device), lengths - 1]  # (B, C)
        else:
            mask = (torch.arange(T, device=x.device)[None, :] < lengths[:, None]).to(x.dtype)  # (B, T)
            pooled = (x * mask[..., None]).sum(1) / lengths[:, None].to(x.dtype)  # (B, C)
        logits = self.cls_head(pooled)  # (B, n_classes)
        loss = None if targets is None else F.cross_entropy(logits.float(), targets)
        return logits, loss

    def resize_vocab(self, vocab_size):
        """Grow the token embedding (and the tied output head) to vocab_size tokens, e.g. for domain tokens added
        to GPT-2's tokenizer. New rows start at the mean of the existing ones: an 'average token' whose logit is
        average too, instead of random rows that would take probability mass at random (Hewitt 2021)."""
        old = self.config.vocab_size
        if vocab_size < old:
            raise ValueError(f"cannot shrink the vocabulary from {old} to {vocab_size} tokens")
        self.config.vocab_size = vocab_size
        w = self.transformer.wte.weight
        new = torch.empty(self.config.padded_vocab_size, w.size(1), dtype=w.dtype, device=w.device)  # (V', C)
        with torch.no_grad():
            new[:old] = w[:old]
            new[old:] = w[:old].mean(dim=0)
        self.transformer.wte.weight = nn.Parameter(new)
        if self.config.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight  # keep them tied
        else:  # the output layer's new rows at its mean too
            h = self.lm_head.weight
            new = torch.empty(self.config.padded_vocab_size, h.size(1), dtype=h.dtype, device=h.device)
            with torch.no_grad():
                new[:old] = h[:old]
                new[old:] = h[:old].mean(dim=0)
            self.lm_head.weight = nn.Parameter(new)

    @torch.no_grad()
    def generate(self, idx, max_new_tokens, temperature=1.0, top_k=None, top_p=None, use_cache=True,
                 generator=None):
        """Extend idx (B, T) by max_new_tokens tokens (language models only). temperature 0 picks the most likely token (greedy).
        top_k keeps the k most likely tokens; top_p keeps the smallest set whose probability reaches p.
        With use_cache the prompt runs once (prefill) and each new token costs one position. Past block_size
        the model only sees the last block_size tokens, exactly as without the cache (the cache is then refilled
        every step, because learned positions shift with the window)."""
        was_training = self.training
        self.eval()
        bs = self.config.block_size
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache:
                logits, _ = self(idx[:, -bs:])
            elif cache is not None and cache.pos < bs:
                logits, _ = self(idx[:, -1:], kv_cache=cache)  # one new token
            else:  # first step, or the window slid: (re)fill the cache from the visible context
                cache = KVCache(self.config.n_layer, bs)
                logits, _ = self(idx[:, -bs:], kv_cache=cache)
            idx_next = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)  # (B, 1)
            idx = torch.cat((idx, idx_next), dim=1)
        self.train(was_training)
        return idx

    # ---- Hugging Face GPT-2 checkpoints ----------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path, **overrides):
        """Load a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin), any size.
        overrides set other GPTConfig fields: dropout, attn_impl, vocab_pad_multiple (which adds embedding rows);
        not the shape or tie_embeddings, which config.json decides."""
        path = Path(path)
        hf_config = _read_hf_config(path)
        config = GPTConfig(block_size=hf_config["n_positions"], vocab_size=hf_config["vocab_size"],
                           n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
                           bias=True, tie_embeddings=hf_config.get("tie_word_embeddings", True), **overrides)
        model = cls(config)
        hf = _read_hf_weights(path)
        hf = {k.removeprefix("transformer."): v for k, v in hf.items()}  # GPT2LMHeadModel vs GPT2Model names
        sd = model.state_dict()
        problems = []
        for name, param in sd.items():
            if (name == "lm_head.weight" and config.tie_embeddings) or name.startswith("cls_head."):
                continue  # lm_head tied to wte; a new classification head starts at its init
            hf_name = name.removeprefix("transformer.")
            if hf_name not in hf:
                problems.append(f"{hf_name} is missing")
                continue
            w = hf[hf_name]
            if hf_name.endswith(_CONV1D):  # GPT-2 stores these as Conv1D: (in, out), the transpose of nn.Linear
                w = w.t()
            if hf_name in ("wte.weight", "lm_head.weight"):
                param = param[:config.vocab_size]  # the real tokens; padding rows keep their init
            if w.shape != param.shape:
                problems.append(f"{hf_name} has shape {tuple(w.shape)}, expected {tuple(param.shape)}")
                continue
            with torch.no_grad():
                param.copy_(w)
        if problems:
            raise ValueError(f"{path} does not hold a GPT-2 of the shape its config.json says: " + "; ".join(problems))
        return model

    def save_pretrained(self, path):
        """Write a Hugging Face GPT-2 directory that transformers.GPT2LMHeadModel.from_pretrained loads.
        Uses safetensors when installed (it comes with transformers), else pytorch_model.bin."""
        c = self.config
        if c.bias is False:
            raise ValueError("a model with bias=False cannot be exported as GPT-2, which has biases")
        if c.modern_options():
            raise ValueError(f"a model with {', '.join(c.modern_options())} cannot be exported as GPT-2, which has "
                             f"none of these: keep the sologpt checkpoint (sample.py and score.py read it)")
        if c.n_classes > 0:
            raise ValueError("a classifier (n_classes > 0) cannot be exported as GPT2LMHeadModel")
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        hf_config = dict(architectures=["GPT2LMHeadModel"], model_type="gpt2", vocab_size=c.vocab_size,
                         n_positions=c.block_size, n_ctx=c.block_size, n_embd=c.n_embd, n_layer=c.n_layer,
                         n_head=c.n_head, n_inner=None, activation_function="gelu_new", resid_pdrop=c.dropout,
                         embd_pdrop=c.dropout, attn_pdrop=c.dropout, layer_norm_epsilon=1e-5,
                         initializer_range=0.02, tie_word_embeddings=c.tie_embeddings)
        if c.vocab_size > 50256:  # GPT-2's <|endoftext|>, where the vocabulary has it
            hf_config.update(bos_token_id=50256, eos_token_id=50256)
        else:  # a smaller vocabulary (characters) has no such token: say so, or transformers assumes 50256
            hf_config.update(bos_token_id=None, eos_token_id=None)
        (path / "config.json").write_text(json.dumps(hf_config, indent=2))
        tensors = {}
        for name, t in self.state_dict().items():
            if name == "lm_head.weight" and c.tie_embeddings:  # the same tensor as wte
                continue
            t = t.detach().float().cpu()
            if name in ("transformer.wte.weight", "lm_head.weight"):
                t = t[:c.vocab_size]  # without vocab padding
            tensors[name] = (t.t() if name.endswith(_CONV1D) else t).contiguous()
        try:
            from safetensors.torch import save_file
        except ImportError:
            torch.save(tensors, path / "pytorch_model.bin")
        else:
            save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})

    @classmethod
    def from_checkpoint(cls, ckpt):
        """Rebuild a model from a sologpt checkpoint dict (see train.py: save_checkpoint)."""
        model = cls(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
        return model

    def config_dict(self):
        """The config for a checkpoint. Architecture options at their GPT-2 defaults are left out, so a plain
        model's checkpoint stays readable by versions that predate them (GPTConfig fills them back in)."""
        d, default = asdict(self.config), GPTConfig()
        for key in ("rope", "rope_base", "norm", "qk_norm", "mlp_act", "tie_embeddings"):
            if d[key] == getattr(default, key):
                del d[key]
        return d


CKPT_FORMAT_VERSION = 1  # bump when the checkpoint layout changes


def save_checkpoint(path, state):
    """Write to a temporary file in the same folder, fsync, then rename over the old file: a crash or a full
    disk mid-write leaves the previous checkpoint untouched."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_checkpoint(path):
    """Read a sologpt checkpoint (train.py writes it) with weights_only=True: tensors and plain values, no code."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path} does not exist: train first (python train.py ...) or check --out_dir")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, bad pickle opcode, ...: all mean the file is damaged
        reason = (str(e).splitlines() or [""])[0][:120]
        raise ValueError(f"{path} is corrupt or truncated ({type(e).__name__}: {reason}): "
                         f"restore it from a backup or start a new run")
    if not isinstance(ckpt, dict) or ckpt.get("format_version") != CKPT_FORMAT_VERSION:
        raise ValueError(f"{path} is not a sologpt checkpoint of format {CKPT_FORMAT_VERSION}")
    return ckpt


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, vocab) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, [-1]]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches p
        drop[:, 0] = False  # the most likely token always stays, even for top_p <= 0
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # the top token is never dropped
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def _read_hf_config(path):
    f = path / "config.json"
    if not f.is_file():
        raise ValueError(f"{f} is missing: point init_from at a Hugging Face GPT-2 directory (config.json + weights)")
    cfg = json.loads(f.read_text())
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise ValueError(f"{f} describes a {cfg.get('model_type')!r} model; only GPT-2 directories load here")
    if cfg.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"{f}: activation_function={cfg['activation_function']!r} is not GPT-2's tanh GELU")
    defaults = dict(layer_norm_epsilon=1e-5, scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
                    reorder_and_upcast_attn=False)
    for key, value in defaults.items():  # fields that would change the outputs of this implementation
        if cfg.get(key, value) != value:
            raise ValueError(f"{f}: {key}={cfg[key]!r} is not supported (only GPT-2's {value!r})")
    if cfg.get("n_inner") not in (None, 4 * cfg["n_embd"]):
        raise ValueError(f"{f}: n_inner={cfg['n_inner']} differs from 4 * n_embd; this GPT only has 4x MLPs")
    return cfg


def _read_hf_weights(path):
    if (path / "model.safetensors").is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise ValueError(f"{path}/model.safetensors needs the safetensors package: pip install safetensors")
        return load_file(path / "model.safetensors")
    if (path / "pytorch_model.bin").is_file():
        return torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"{path} has no model.safetensors or pytorch_model.bin")
