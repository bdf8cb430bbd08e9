"""Work models: how many FLOPs or bytes one call must do, so timings become TFLOPS and GB/s.

Attention counts FLOPs with the flash-attention convention, so figures compare with published
ones: the two matmuls ``Q K^T`` and ``P V`` cost ``2·L·S·D`` and ``2·L·S·Dv`` multiply-adds'
worth of FLOPs per (batch, query head), softmax and masking are not counted, causal masking
halves the work, and backward counts 2.5 times the forward (five matmuls instead of two).
Query heads count, not key/value heads: grouped-query attention does the same arithmetic as
multi-head attention with the key/value heads repeated. With a sliding window the count uses
the exact number of (query, key) pairs the window keeps.

Softmax and cross-entropy are memory-bound; they count the bytes that must cross the memory bus
at least once (a perfectly fused kernel's traffic), so GB/s against the copy bandwidth says how
close a kernel is to the limit.
"""

from __future__ import annotations

from dataclasses import dataclass

MODES = ("fwd", "bwd", "fwd_bwd")
BACKWARD_FACTOR = 2.5  # flash-attention's convention: backward = 2.5 x forward FLOPs


@dataclass(frozen=True)
class Work:
    """The work of one call: ``amount`` of ``unit`` ("flop" or "byte")."""

    amount: float
    unit: str

    def rate(self, seconds: float) -> float:
        """TFLOPS for FLOPs, GB/s for bytes (both 1e12 / 1e9, decimal units)."""
        if seconds <= 0:
            raise ValueError(f"seconds must be > 0, got {seconds}")
        return self.amount / seconds / (1e12 if self.unit == "flop" else 1e9)

    @property
    def rate_unit(self) -> str:
        return "TFLOPS" if self.unit == "flop" else "GB/s"


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; use one of {MODES}")
    return mode


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def attended_pairs(
    seqlen_q: int,
    seqlen_k: int,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
) -> float:
    """How many (query, key) pairs one head computes.

    No mask: ``L·S``. Causal alone with ``L == S``: ``L·S/2`` (the flash-attention convention,
    which published TFLOPS figures use). Otherwise the exact count: a sliding window
    ``(left, right)`` (-1 = unbounded) keeps key ``j`` for query ``i`` when
    ``i' - left <= j <= i' + right``, where ``i' = i`` (causal aligned top-left, as SDPA) or
    ``i + S - L`` (bottom-right, as flash-attn); causal sets ``right = 0``.
    """
    _check_positive(seqlen_q=seqlen_q, seqlen_k=seqlen_k)
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size entries must be >= -1 (-1 = unbounded), got {window_size}")
    if causal:
        right = 0
    if left == -1 and right == -1:
        return float(seqlen_q * seqlen_k)
    if left == -1 and right == 0 and seqlen_q == seqlen_k:
        return seqlen_q * seqlen_k / 2  # the convention for plain causal attention
    shift = seqlen_k - seqlen_q if bottom_right else 0
    total = 0
    for i in range(seqlen_q):
        row = i + shift
        lo = 0 if left == -1 else max(0, row - left)
        hi = seqlen_k - 1 if right == -1 else min(seqlen_k - 1, row + right)
        total += max(0, hi - lo + 1)
    return float(total)


def attention_flops(
    batch: int,
    heads: int,
    seqlen_q: int,
    seqlen_k: int,
    head_dim: int,
    head_dim_v: int | None = None,
    *,
    causal: bool = False,
    window_size: tuple[int, int] = (-1, -1),
    bottom_right: bool = False,
    mode: str = "fwd",
) -> Work:
    """FLOPs of attention over ``heads`` query heads: ``2·pairs·(D + Dv)`` per (batch, head)
    forward, times 2.5 for backward and 3.5 for forward+backward."""
    head_dim_v = head_dim if head_dim_v is None else head_dim_v
    _check_positive(batch=batch, heads=heads, head_dim=head_dim, head_dim_v=head_dim_v)
    pairs = attended_pairs(seqlen_q, seqlen_k, causal, window_size, bottom_right)
    fwd = 2.0 * batch * heads * pairs * (head_dim + head_dim_v)
    factor = {"fwd": 1.0, "bwd": BACKWARD_FACTOR, "fwd_bwd": 1.0 + BACKWARD_FACTOR}
    return Work(fwd * factor[_check_mode(mode)], "flop")


def softmax_bytes(rows: int, cols: int, elem_bytes: int, mode: str = "fwd") -> Work:
    """Bytes softmax must move: forward reads x and writes y; backward reads y and dy and
    writes dx; forward+backward is both (y is re-read by backward)."""
    _check_positive(rows=rows, cols=cols, elem_bytes=elem_bytes)
    tensors = {"fwd": 2, "bwd": 3, "fwd_bwd": 5}[_check_mode(mode)]
    return Work(float(tensors * rows * cols * elem_bytes), "byte")


def cross_entropy_bytes(
    tokens: int, vocab: int, elem_bytes: int, mode: str = "fwd", target_bytes: int = 8
) -> Work:
    """Bytes cross-entropy must move: forward reads the logits and the targets; forward+backward
    (the fused kernel's case) reads the logits once and writes their gradient once. A backward
    alone cannot do better than forward+backward (it needs the logits again), so it is not
    modelled separately. The scalar loss and per-token statistics are O(tokens) and counted as
    the targets only."""
    _check_positive(tokens=tokens, vocab=vocab, elem_bytes=elem_bytes)
    if _check_mode(mode) == "bwd":
        raise ValueError("cross-entropy has no separate backward model; use mode='fwd_bwd'")
    logits = tokens * vocab * elem_bytes
    total = (logits if mode == "fwd" else 2 * logits) + tokens * target_bytes
    return Work(float(total), "byte")
