"""The GPT model: config, hand-written causal self-attention, blocks, and generation with a KV cache.

Shapes use B = batch, T = time (sequence), C = channels (n_embd), nh = heads, hs = head size.
This file does no I/O and imports nothing else of the project: checkpoints live in sologpt/checkpoint.py,
Hugging Face GPT-2 weights in sologpt/hf_gpt2.py, task heads in sologpt/classify.py and sologpt/tag.py.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint


@dataclass
class GPTConfig:
    block_size: int = 1024  # longest sequence (learned position embeddings)
    vocab_size: int = 50257  # GPT-2's BPE vocabulary
    vocab_pad_multiple: int = 1  # round the embedding rows up to a multiple of this: 64 makes the output matmul
    # a shape the GPU runs fast (docs/performance.md); the extra rows are never read or predicted
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
    # how the model trains (same weights, same function up to rounding)
    grad_checkpointing: int = 0  # k > 0: every k-th block keeps only its input and recomputes the rest in backward
    residual_bf16: bool = False  # under bf16 autocast the residual stream is bf16, not float32 (faster, less memory)
    # a task head (sologpt/classify.py and sologpt/tag.py build the model with it; plain GPT ignores these)
    n_classes: int = 0  # > 0: a classifier with this many classes (task "classify")
    cls_pool: str = "last"  # what the head reads: the "last" real token's hidden state, or the "mean" over tokens
    n_tags: int = 0  # > 0: a tagger with this many tags, one per token (task "tag")

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
        if self.grad_checkpointing < 0:
            raise ValueError(f"grad_checkpointing={self.grad_checkpointing} must not be negative")

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


class CheckpointedBlock(Block):
    """A Block that keeps only its input for backward and recomputes its activations there (Chen et al. 2016):
    less memory for one more forward of the block. GPTConfig.grad_checkpointing = k makes every k-th block one."""

    def forward(self, x, kv_cache=None, rope=None):
        if self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(super().forward, x, None, rope, use_reentrant=False)
        return super().forward(x, kv_cache, rope)


class ResidualBF16(nn.Module):
    """Under bf16 autocast, cast the residual stream to bf16 (GPTConfig.residual_bf16). The embeddings are float32
    parameters, so x + block(x) would stay float32; in bf16 every residual add and norm input moves half the bytes
    (as Megatron-LM does by default). Without bf16 autocast it changes nothing."""

    def forward(self, x):
        t = x.device.type
        if torch.is_autocast_enabled(t) and torch.get_autocast_dtype(t) == torch.bfloat16:
            return x.to(torch.bfloat16)
        return x


class GPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(config.padded_vocab_size, config.n_embd)))
        if not config.rope:  # learned absolute positions (GPT-2); rotary ones have no weights
            self.transformer.wpe = nn.Embedding(config.block_size, config.n_embd)
        k = config.grad_checkpointing
        self.transformer.update(dict(
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([(CheckpointedBlock if k and i % k == 0 else Block)(config, i)
                             for i in range(config.n_layer)]),
            ln_f=make_norm(config),
        ))
        self.residual_cast = ResidualBF16() if config.residual_bf16 else nn.Identity()  # no weights: not in checkpoints
        hs = config.n_embd // config.n_head
        inv_freq = config.rope_base ** -(torch.arange(0, hs, 2, dtype=torch.float32) / hs)  # (hs/2,)
        self.register_buffer("inv_freq", inv_freq, persistent=False)  # derived, so not in the checkpoint
        self.lm_head = nn.Linear(config.n_embd, config.padded_vocab_size, bias=False)
        if config.tie_embeddings:  # tied input and output embeddings (GPT-2, Press & Wolf 2017)
            self.lm_head.weight = self.transformer.wte.weight
        self.add_task_head(config)  # none for a language model; a task's subclass adds its head (classify.py)
        self.apply(self._init_weights)
        # GPT-2 paper, section 2.3: scale the residual projections by 1/sqrt(number of residual layers),
        # so the residual stream's variance does not grow with depth (two residual adds per block)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def add_task_head(self, config):
        pass

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

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits (B, T, vocab), loss or None). targets of -1 are ignored.
        With a kv_cache, idx holds only the new tokens and positions continue from the cache."""
        x = self.hidden_states(idx, kv_cache)  # (B, T, C)
        logits = self.lm_head(x)[..., :self.config.vocab_size]  # (B, T, vocab): vocabulary padding is no token
        loss = None
        if targets is not None:
            # the loss in float32 even under autocast: log-softmax over 50k classes in bf16 loses precision
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def hidden_states(self, idx, kv_cache=None):
        """The final (normed) hidden state of every position: (B, T) -> (B, T, C)."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        if past + T > self.config.block_size:
            raise ValueError(f"sequence of {past + T} tokens is longer than block_size={self.config.block_size}")
        pos = torch.arange(past, past + T, dtype=torch.long, device=idx.device)  # (T,)
        x = self.residual_cast(self.transformer.drop(self.embed(idx, pos)))  # (B, T, C)
        rope = self.rotary(pos)  # rotary angles, or None
        for block in self.transformer.h:
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


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """Pick the next token from logits (B, vocab) -> (B, 1)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = F.softmax(filter_logits(logits, temperature, top_k, top_p), dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def filter_logits(logits, temperature, top_k=None, top_p=None):
    """logits (B, vocab) divided by temperature (> 0), in float32, with the tokens top_k and top_p leave out set to
    -inf. Only tensor operations, no host sync: sologpt/inference.py runs it inside a CUDA graph."""
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum - sorted_logits.softmax(dim=-1) >= top_p  # mass before this token already reaches p
        drop[:, 0] = False  # the most likely token always stays, even for top_p <= 0
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))  # the top token is never dropped
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits
