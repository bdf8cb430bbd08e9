"""The reference decoder-only Transformer language model, in one readable file.

nanoGPT's shape with the choices a modern LM makes: pre-norm blocks of causal self-attention
(grouped-query when ``n_kv_head < n_head``) and a GELU MLP, a tied output head, and positions
that are learned, sinusoidal or rotary (a config choice). ``forward(idx, targets)`` returns
``(logits, loss)``; ``generate()`` decodes with a key/value cache.

Where the work runs is a config switch:

- ``impl="fastattn"``: attention is ``fastattn.flash_attn_func`` (layout ``(B, T, H, D)``, causal
  aligned bottom-right, which is exactly what a decoding step with a cache needs), the loss is
  ``fastattn.cross_entropy`` and sampling uses ``fastattn.softmax``. ``backend`` picks the
  fastattn backend for every call inside the model (``None``: fastattn's own choice).
- ``impl="pytorch"``: the same model through ``torch.nn.functional`` only. This path is the
  specification the tests hold the fastattn path to.

Both paths hold the same parameters, so a state dict moves between them unchanged.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import fastattn

POSITIONS = ("learned", "sinusoidal", "rope")
IMPLS = ("fastattn", "pytorch")


@dataclass
class GPTConfig:
    """Model shape and where it runs. ``n_kv_head`` None means ``n_head`` (no grouping)."""

    vocab_size: int = 8192
    block_size: int = 256
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None
    n_embd: int = 384
    mlp_ratio: int = 4
    dropout: float = 0.0
    bias: bool = False
    pos: str = "rope"
    rope_base: float = 10000.0
    impl: str = "fastattn"
    backend: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd", "mlp_ratio"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.n_kv_head is None:
            self.n_kv_head = self.n_head
        if not isinstance(self.n_kv_head, int) or not 1 <= self.n_kv_head <= self.n_head \
                or self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head must divide n_head={self.n_head}, got {self.n_kv_head!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} must be a multiple of n_head={self.n_head}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ValueError(f"rotary positions need an even head dim, got {self.head_dim}")
        if self.pos not in POSITIONS:
            raise ValueError(f"pos must be one of {', '.join(POSITIONS)}, got {self.pos!r}")
        if self.impl not in IMPLS:
            raise ValueError(f"impl must be one of {', '.join(IMPLS)}, got {self.impl!r}")
        if self.backend is not None and self.backend not in fastattn.backends.BACKENDS:
            raise ValueError(f"backend must be None or one of "
                             f"{', '.join(fastattn.backends.BACKENDS)}, got {self.backend!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    def to_dict(self) -> dict:
        return asdict(self)


class KVCache:
    """Keys and values of every layer, preallocated to ``block_size``: ``(B, T, Hkv, D)`` each.
    A decoding step writes its new positions in place and attends over the filled prefix."""

    def __init__(self, config: GPTConfig, batch: int, device, dtype) -> None:
        shape = (config.n_layer, batch, config.block_size, config.n_kv_head, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.length = 0  # positions filled, shared by all layers

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Store ``k``, ``v`` (B, T, Hkv, D) after the filled prefix; return the whole prefix."""
        start, end = self.length, self.length + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]  # (B, end, Hkv, D) views


def _rope_tables(config: GPTConfig) -> tuple[Tensor, Tensor]:
    """cos, sin (block_size, D/2) of the rotary angles pos * base^(-2i/D)."""
    half = config.head_dim // 2
    inv_freq = config.rope_base ** (-torch.arange(half, dtype=torch.float64) / half)
    angles = torch.outer(torch.arange(config.block_size, dtype=torch.float64), inv_freq)
    return angles.cos().float(), angles.sin().float()


def _apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) of ``x`` (B, T, H, D) by the angles of its
    positions; ``cos``/``sin`` are (T, D/2)."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # rotate 16-bit inputs in float32
    x1, x2 = x.to(dtype).chunk(2, dim=-1)  # (B, T, H, D/2) each
    cos, sin = cos[:, None, :].to(dtype), sin[:, None, :].to(dtype)  # (T, 1, D/2)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


def _sinusoidal_table(config: GPTConfig) -> Tensor:
    """(block_size, n_embd): sin and cos of pos / 10000^(2i/C), interleaved (Vaswani et al.)."""
    pos = torch.arange(config.block_size, dtype=torch.float64)[:, None]
    freq = 10000.0 ** (-torch.arange(0, config.n_embd, 2, dtype=torch.float64) / config.n_embd)
    table = torch.zeros(config.block_size, config.n_embd, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)[:, : config.n_embd // 2]
    return table.float()


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        qkv_heads = config.n_head + 2 * config.n_kv_head
        self.c_attn = nn.Linear(config.n_embd, qkv_heads * config.head_dim, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None,
                cache: KVCache | None, layer: int) -> Tensor:
        cfg = self.config
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(  # (B, T, (H + 2 Hkv) D) -> three pieces
            [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim,
             cfg.n_kv_head * cfg.head_dim], dim=-1)
        q = q.view(B, T, cfg.n_head, cfg.head_dim)  # (B, T, H, D)
        k = k.view(B, T, cfg.n_kv_head, cfg.head_dim)  # (B, T, Hkv, D)
        v = v.view(B, T, cfg.n_kv_head, cfg.head_dim)  # (B, T, Hkv, D)
        if rope is not None:
            q, k = _apply_rope(q, *rope), _apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, S, Hkv, D), S = cached + T
        dropout_p = cfg.dropout if self.training else 0.0
        if cfg.impl == "fastattn":
            # bottom-right causal: query i of T sees keys up to S - T + i, the cache included
            y = fastattn.flash_attn_func(q, k, v, dropout_p=dropout_p, causal=True)  # (B, T, H, D)
        else:
            y = _sdpa_bottom_right(q, k, v, dropout_p)  # (B, T, H, D)
        return self.resid_dropout(self.c_proj(y.reshape(B, T, cfg.n_embd)))


def _sdpa_bottom_right(q: Tensor, k: Tensor, v: Tensor, dropout_p: float) -> Tensor:
    """The plain-PyTorch attention: (B, T, H, D) in and out, causal aligned bottom-right."""
    T, S = q.shape[1], k.shape[1]
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H or Hkv, T or S, D)
    if T == S:
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True,
                                           enable_gqa=True)
    else:
        keep = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)  # (T, S)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p,
                                           enable_gqa=True)
    return y.transpose(1, 2)  # (B, T, H, D)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        hidden = config.mlp_ratio * config.n_embd
        self.c_fc = nn.Linear(config.n_embd, hidden, bias=config.bias)
        self.c_proj = nn.Linear(hidden, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.dropout(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: Tensor, rope, cache: KVCache | None, layer: int) -> Tensor:
        x = x + self.attn(self.ln_1(x), rope, cache, layer)
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    """Decoder-only LM: ``forward(idx (B, T) int64, targets (B, T) or None) -> (logits
    (B, T, vocab), loss or None)``. Targets equal to -100 are ignored by the loss."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        if config.pos == "learned":
            self.wpe = nn.Embedding(config.block_size, config.n_embd)
        elif config.pos == "sinusoidal":
            self.register_buffer("sinusoid", _sinusoidal_table(config), persistent=False)
        else:
            cos, sin = _rope_tables(config)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied: one matrix embeds and unembeds
        self.apply(self._init_weights)
        # GPT-2's scaled init of the projections into the residual stream
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def num_params(self) -> int:
        """Parameters, counting the tied embedding once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 per matmul weight, plus attention's
        QK^T and PV, 12 * layers * heads * head_dim * seq_len / 2 with the causal half
        (PaLM's appendix B count). Position embeddings and norms are ignored."""
        cfg = self.config
        matmul = self.num_params() - (cfg.block_size * cfg.n_embd if cfg.pos == "learned" else 0)
        attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len / 2
        return 6 * matmul + attention

    @contextlib.contextmanager
    def _backend(self) -> Iterator[None]:
        if self.config.impl == "fastattn" and self.config.backend is not None:
            with fastattn.use_backend(self.config.backend):
                yield
        else:
            yield

    def forward(self, idx: Tensor, targets: Tensor | None = None,
                cache: KVCache | None = None) -> tuple[Tensor, Tensor | None]:
        cfg = self.config
        B, T = idx.shape
        start = 0 if cache is None else cache.length
        if start + T > cfg.block_size:
            raise ValueError(f"sequence of {start + T} tokens is longer than block_size="
                             f"{cfg.block_size}")
        with self._backend():
            x = self.wte(idx)  # (B, T, C)
            rope = None
            if cfg.pos == "learned":
                x = x + self.wpe.weight[start:start + T]
            elif cfg.pos == "sinusoidal":
                x = x + self.sinusoid[start:start + T]
            else:
                rope = (self.rope_cos[start:start + T], self.rope_sin[start:start + T])
            x = self.drop(x)
            for layer, block in enumerate(self.blocks):
                x = block(x, rope, cache, layer)
            if cache is not None:
                cache.length += T
            logits = self.lm_head(self.ln_f(x))  # (B, T, V)
            loss = None
            if targets is not None:
                loss = self._loss(logits.view(B * T, -1), targets.reshape(B * T))
        return logits, loss

    def _loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        if self.config.impl == "fastattn":
            return fastattn.cross_entropy(logits, targets)
        return F.cross_entropy(logits, targets)

    def _probs(self, logits: Tensor) -> Tensor:
        if self.config.impl == "fastattn":
            with self._backend():
                return fastattn.softmax(logits, -1)
        return torch.softmax(logits, -1)

    @torch.no_grad()
    def generate(self, idx: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; ``temperature=0`` is
        greedy. Decodes with a key/value cache; when the sequence reaches ``block_size`` the
        context is cropped to its last ``block_size // 2`` tokens and the cache refilled."""
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        cfg = self.config
        cache, fresh = None, idx[:, -cfg.block_size:]
        for _ in range(max_new_tokens):
            if cache is None or cache.length + fresh.shape[1] > cfg.block_size:
                context = idx[:, -(cfg.block_size // 2 if cache is not None else cfg.block_size):]
                cache = KVCache(cfg, idx.shape[0], idx.device, self.lm_head.weight.dtype)
                fresh = context
            logits, _ = self(fresh, cache=cache)
            logits = logits[:, -1, :].float()  # (B, V)
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                nxt = torch.multinomial(self._probs(logits), 1, generator=generator)
            idx = torch.cat((idx, nxt), dim=1)
            fresh = nxt
        return idx
