"""Fused attention (FlashAttention-2) in Triton: forward, and backward by recomputation.

What it computes, per batch b and query head h (key/value head hk = h // GROUP):

    s_ij = softcap * tanh(scale * q_i.k_j / softcap)     (scale * q_i.k_j without softcap)
           + mask_ij                                     (additive mask; -inf masks)
    s_ij = -inf  where a bool mask is False or key j lies outside query i's window
    p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
    o_i  = sum_j p_ij z_ij / (1 - dropout_p) v_j         (z: the dropout keep mask)

    backward, with P the dropped-and-rescaled probabilities and delta_i = sum_d do_id o_id:
    dv_j = sum_i P_ij do_i,  dP_ij = do_i.v_j z_ij / (1 - dropout_p),
    ds_ij = p_ij (dP_ij - delta_i),  dq_i = scale sum_j ds'_ij k_j,  dk_j = scale sum_i ds'_ij q_i
    with ds' = ds (1 - tanh^2) under softcap; ds itself is the additive mask's gradient.

Shapes: the normalised form of ``fastattn.reference`` -- q (B, Hq, L, D), k (B, Hk, S, D),
v (B, Hk, S, Dv), any strides (SDPA's (B, H, L, D) and flash-attn's (B, T, H, D) are both views
of it); mask broadcast to (B, Hq, L, S) as a view, so broadcast dims have stride 0 and are
never expanded in memory; lse (B, Hq, L) float32. The window (causal is right = 0) is
``i + offset - left <= j <= i + offset + right`` with offset 0 (top-left) or S - L
(bottom-right); -1 leaves a side unbounded.

Algorithm. Forward: one program per (BLOCK_M query rows, head, batch) keeps its q tile, running
max, running sum and output accumulator on chip and streams key/value tiles (online softmax,
base-2 exponentials with log2(e) folded into the scale). Only key tiles that some row of the
program can see are visited (causal and window block skipping); tiles every row sees in full
run without any position masking, and only the tiles on a window's edge pay for it. Backward:
a delta = rowsum(do * o) pre-pass; then one program per (BLOCK_N keys, key/value head, batch)
holds k, v and accumulates dk, dv over the query tiles (and over the GROUP query heads sharing
this key/value head, so GQA needs neither repeated K/V nor atomics for dk, dv). dq is either
added with fp32 atomics from that same pass (default: each score tile is recomputed once), or,
with ``deterministic=True``, computed by a separate pass with one program per query tile that
loops over keys (each score tile recomputed twice, bitwise reproducible).

Dropout uses Philox keyed by a seed drawn from PyTorch's generator, counter (j, i, b*Hq + h),
so forward and backward regenerate the same mask with no storage.

Work: forward 4*L*S*D flops per head (2 for q k^T, 2 for p v; with Dv != D, 2*L*S*(D + Dv)),
backward 2.5x that (5 matmuls); bytes: q, k, v, o once each forward (plus the mask tiles).

Padding: head dims are padded on chip to a power of two >= 16 (loads masked, never a copy).
Low-precision inputs feed the tensor cores in their dtype and accumulate in float32; float32
inputs use full-precision (IEEE) dots, not TF32, so they match PyTorch's float32 matmul.

On Hopper the forward moves q, k, v and out with tensor descriptors (TMA) when their layout
allows (see ``_use_tma``); the compiler picks wgmma for ``tl.dot`` on sm_90 by itself.

Not supported here: float64 (the torch backend serves it), head dims above 256, variable-length
(packed) batches, key/value caches, TMA in the backward passes, warp specialisation.
"""

from __future__ import annotations

import math
import os

import torch
import triton
import triton.language as tl

from fastattn.reference import attention_output
from fastattn.triton.layout import narrow, tanh

LOG2E = math.log2(math.e)


# --- configurations ---------------------------------------------------------------------------


def _interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(kind: str) -> list[triton.Config]:
    """Candidate (BLOCK_M, BLOCK_N, num_warps, num_stages); the autotuner times those that fit.

    Forward and dq programs own a query tile (tall BLOCK_M); the dk/dv program owns a key tile
    (wide BLOCK_N). The interpreter gets one small config so tests stay fast and still cross
    several tiles with sizes that are not multiples of them."""
    if _interpreted():
        small = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind]
        return [triton.Config({"BLOCK_M": small[0], "BLOCK_N": small[1]}, num_warps=4)]
    shapes = {
        "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 4, 4),
                (64, 64, 4, 4), (64, 128, 4, 3), (64, 32, 4, 3), (128, 128, 8, 2)],
        "dkdv": [(32, 128, 4, 2), (64, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 3),
                 (16, 128, 4, 2), (16, 64, 4, 3), (32, 32, 4, 3)],
        "dq": [(128, 32, 4, 2), (128, 64, 8, 2), (64, 64, 4, 3), (64, 32, 4, 3),
               (32, 64, 4, 3), (32, 32, 4, 3)],
    }[kind]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


def _shared_memory_limit(device_index: int) -> int:
    props = triton.runtime.driver.active.utils.get_device_properties(device_index)
    return props["max_shared_mem"]


def _prune(kind: str):
    """Drop configs whose tiles cannot fit in shared memory (a rough count of the tiles each
    stage keeps resident), keeping at least the smallest."""

    def prune(configs, named_args, **kwargs):
        q = named_args["Q"]
        size = q.element_size()
        d, dv = named_args["BLOCK_D"], named_args["BLOCK_DV"]
        limit = _shared_memory_limit(q.device.index or 0)
        fits = []
        for c in configs:
            m, n, stages = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], max(c.num_stages, 1)
            if kind == "dkdv":  # k, v resident; q, do streamed; ds staged for two dots
                need = n * (d + dv) + stages * m * (d + dv) + m * n
            else:  # q (and do) resident; k, v streamed
                need = m * (d + dv) + stages * n * (d + dv) + m * n
            if need * size <= limit:
                fits.append(c)
        return fits or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"])]

    return prune


# Tuning key: head dims, positional masking, dropout and sequence lengths rounded to powers of
# two, the GPU generation (ARCH), and (added by Triton) the dtypes of the tensor arguments.
_KEY = ["BLOCK_D", "BLOCK_DV", "HAS_LEFT", "HAS_RIGHT", "HAS_MASK", "SOFTCAP", "DROPOUT",
        "TMA", "L_BUCKET", "S_BUCKET", "ARCH"]


def _autotune(kind: str, **kwargs):
    return triton.autotune(configs=_configs(kind), key=_KEY, cache_results=True,
                           prune_configs_by={"early_config_prune": _prune(kind)}, **kwargs)


# --- tile helpers -------------------------------------------------------------------------------


@triton.jit
def _load_tile(ptrs, rows, n_rows, cols, n_cols, CHECK_ROWS: tl.constexpr,
               CHECK_COLS: tl.constexpr):
    # Out-of-range rows and padded head-dim columns read as 0: zero columns leave dot products
    # unchanged, zero rows are never stored (queries) or get zero probability (keys).
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < n_cols), other=0.0)
    elif CHECK_ROWS:
        return tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        return tl.load(ptrs, mask=cols[None, :] < n_cols, other=0.0)
    else:
        return tl.load(ptrs)


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr):
    # "upcast": Triton 3.6's interpreter multiplies bfloat16 bit patterns as integers, so under
    # the interpreter bf16 tiles are widened first (exact: fp32 holds every bf16 product).
    if PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _operand(x, like, PRECISION: tl.constexpr):
    # fp32 probabilities / score gradients become the second dot's input in the inputs' dtype
    # (tensor-core operands). The interpreter's bf16 cast truncates where GPUs round, so under
    # "upcast" they stay fp32; the rounding itself is exercised on the GPU.
    if PRECISION == "upcast":
        return x
    else:
        return x.to(like.dtype)


@triton.jit
def _scores(q, k, rows, cols, M_bh, smm, smn, L, S, offset, left, right, qk_scale, cap2,
            HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
            HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr, MASKED: tl.constexpr,
            PRECISION: tl.constexpr):
    """(BLOCK_M, BLOCK_N) scores in base 2 (natural scores times log2 e), -inf where masked,
    and the tanh values the softcap gradient needs (the raw q.k when softcap is off)."""
    qk = _dot(q, tl.trans(k), PRECISION)
    if SOFTCAP:
        t = tanh(qk * qk_scale)  # qk_scale = scale / softcap, cap2 = softcap * log2 e
        s = t * cap2
    else:
        t = qk
        s = qk * qk_scale  # qk_scale = scale * log2 e
    if HAS_MASK:
        # The mask tile is always bounds-checked: the last query tile can run past L.
        inside = (rows[:, None] < L) & (cols[None, :] < S)
        m_ptrs = M_bh + rows[:, None].to(tl.int64) * smm + cols[None, :].to(tl.int64) * smn
        if BOOL_MASK:
            keep = tl.load(m_ptrs, mask=inside, other=1)
            s = tl.where(keep != 0, s, float("-inf"))
        else:
            # Scaling to base 2 must not turn a finite large negative (finfo.min, as Hugging
            # Face pads) into -inf: such a row stays a uniform softmax, as in PyTorch.
            add = tl.load(m_ptrs, mask=inside, other=0.0).to(tl.float32)
            add2 = tl.maximum(add * 1.4426950408889634, -3.4028234663852886e38)
            s = s + tl.where(add == float("-inf"), add, add2)
    if MASKED:
        valid = cols[None, :] < S
        if HAS_LEFT:
            valid = valid & (cols[None, :] >= rows[:, None] + offset - left)
        if HAS_RIGHT:
            valid = valid & (cols[None, :] <= rows[:, None] + offset + right)
        s = tl.where(valid, s, float("-inf"))
    return s, t


@triton.jit
def _dropout_keep(seed, bh, rows, cols, drop_p):
    """True where an element survives dropout; Philox counter (key j, query i, b*Hq + h)."""
    c0 = (cols[None, :] + rows[:, None] * 0).to(tl.uint32)
    c1 = (rows[:, None] + cols[None, :] * 0).to(tl.uint32)
    c2 = c0 * 0 + bh.to(tl.uint32)
    r, _, _, _ = tl.philox(seed, c0, c1, c2, c0 * 0)
    return tl.uint_to_uniform_float(r) >= drop_p


@triton.jit
def _key_blocks(m0, L, S, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Key tiles for query rows [m0, m0 + BLOCK_M), as tile indices lo <= fl <= fh <= hi:
    [lo, hi) holds every key some row may see; inside it, [fl, fh) are the tiles every row
    sees in full (no position masking needed). All divisions see non-negative numbers (the
    interpreter floors, compiled Triton truncates)."""
    lo = m0 * 0
    hi = m0 * 0 + S
    full_lo = m0 * 0
    full_hi = S // BLOCK_N
    if HAS_LEFT:
        lo = tl.maximum(m0 + offset - left, 0)
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M - 1 + offset - left, 0), BLOCK_N)
    if HAS_RIGHT:
        hi = tl.minimum(tl.maximum(m0 + BLOCK_M + offset + right, 0), S)
        full_hi = tl.minimum(full_hi, tl.maximum(m0 + offset + right + 1, 0) // BLOCK_N)
    lo_blk = lo // BLOCK_N
    hi_blk = tl.maximum(tl.cdiv(hi, BLOCK_N), lo_blk)
    hi_blk = tl.where(hi > lo, hi_blk, lo_blk)
    fl = tl.minimum(tl.maximum(full_lo, lo_blk), hi_blk)
    fh = tl.minimum(tl.maximum(full_hi, fl), hi_blk)
    return lo_blk, fl, fh, hi_blk


@triton.jit
def _query_blocks(n0, L, S, offset, left, right, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr):
    """Query tiles for keys [n0, n0 + BLOCK_N), as in ``_key_blocks`` but seen from the keys;
    full tiles also lie wholly inside L, and a key tile running past S has none."""
    lo = n0 * 0
    hi = n0 * 0 + L
    full_lo = n0 * 0
    full_hi = L // BLOCK_M
    if HAS_RIGHT:
        lo = tl.maximum(n0 - offset - right, 0)
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - offset - right, 0), BLOCK_M)
    if HAS_LEFT:
        hi = tl.minimum(tl.maximum(n0 + BLOCK_N - offset + left, 0), L)
        full_hi = tl.minimum(full_hi, tl.maximum(n0 - offset + left + 1, 0) // BLOCK_M)
    full_hi = tl.where(n0 + BLOCK_N <= S, full_hi, 0)
    lo_blk = lo // BLOCK_M
    hi_blk = tl.maximum(tl.cdiv(hi, BLOCK_M), lo_blk)
    hi_blk = tl.where(hi > lo, hi_blk, lo_blk)
    fl = tl.minimum(tl.maximum(full_lo, lo_blk), hi_blk)
    fh = tl.minimum(tl.maximum(full_hi, fl), hi_blk)
    return lo_blk, fl, fh, hi_blk


@triton.jit
def _phase_bounds(phase: tl.constexpr, lo, fl, fh, hi):
    """Tile range of loop phase 0, 1, 2 over [lo, fl), [fl, fh), [fh, hi) (see
    ``_key_blocks``); only phase 1, the full tiles, runs without position masking."""
    start = lo
    end = fl
    if phase == 1:
        start = fl
        end = fh
    if phase == 2:
        start = fh
        end = hi
    return start, end


# --- forward ----------------------------------------------------------------------------------


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, K_bh, V_bh, M_bh, seed, bh, rows, n0,
              offs_n, offs_d, offs_dv, skn, skd, svn, svd, smm, smn,
              L, S, D, DV, offset, left, right, qk_scale, cap2, drop_p,
              HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
              DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
              MASKED: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
              PRECISION: tl.constexpr, TMA: tl.constexpr):
    cols = n0 + offs_n
    cols64 = cols.to(tl.int64)
    if TMA:  # K_bh, V_bh are tensor descriptors: out-of-range rows and columns read as 0
        k = K_bh.load([n0, 0])
    else:
        k = _load_tile(K_bh + cols64[:, None] * skn + offs_d[None, :] * skd, cols, S, offs_d, D,
                       MASKED, PAD_D)
    s, _ = _scores(q, k, rows, cols, M_bh, smm, smn, L, S, offset, left, right, qk_scale, cap2,
                   HAS_MASK, BOOL_MASK, SOFTCAP, HAS_LEFT, HAS_RIGHT, MASKED, PRECISION)
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row with nothing visible yet has max -inf: subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed, bh, rows, cols, drop_p), p, 0.0)
    if TMA:
        v = V_bh.load([n0, 0])
    else:
        v = _load_tile(V_bh + cols64[:, None] * svn + offs_dv[None, :] * svd, cols, S, offs_dv,
                       DV, MASKED, PAD_DV)
    acc = acc * alpha[:, None] + _dot(_operand(p, v, PRECISION), v, PRECISION)
    return acc, l_i, m_new


@_autotune("fwd")
@triton.jit
def _attention_fwd_kernel(
    Q, K, V, Mask, Seed, Out, Lse,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd,
    smb, smh, smm, smn, sob, soh, som, sod,
    H, L, S, D, DV, GROUP, offset, left, right, qk_scale, cap2, drop_p, drop_scale,
    L_BUCKET, S_BUCKET, ARCH,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    # 64-bit bases: batch * heads * tokens * dim exceeds 2**31 elements in real runs.
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)
    Q_bh = Q + b64 * sqb + h64 * sqh
    K_bh = K + b64 * skb + hk64 * skh
    V_bh = V + b64 * svb + hk64 * svh
    M_bh = Mask + b64 * smb + h64 * smh
    rows = m0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    O_bh = Out + b64 * sob + h64 * soh
    if TMA:
        # Hopper's tensor memory accelerator: one descriptor per (batch, head) matrix, whole
        # tiles moved by hardware, bounds handled by it (zeros in, clipped out).
        q = tl.make_tensor_descriptor(Q_bh, shape=[L, D], strides=[sqm, 1],
                                      block_shape=[BLOCK_M, BLOCK_D]).load([m0, 0])
        K_bh = tl.make_tensor_descriptor(K_bh, shape=[S, D], strides=[skn, 1],
                                         block_shape=[BLOCK_N, BLOCK_D])
        V_bh = tl.make_tensor_descriptor(V_bh, shape=[S, DV], strides=[svn, 1],
                                         block_shape=[BLOCK_N, BLOCK_DV])
    else:
        q = _load_tile(Q_bh + rows64[:, None] * sqm + offs_d[None, :] * sqd, rows, L, offs_d, D,
                       True, PAD_D)
    seed = tl.load(Seed) if DROPOUT else 0
    bh = b * H + h
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    lo, fl, fh, hi = _key_blocks(m0, L, S, offset, left, right, BLOCK_M, BLOCK_N,
                                 HAS_LEFT, HAS_RIGHT)
    for phase in tl.static_range(3):  # edge tiles, full tiles, edge tiles
        start, end = _phase_bounds(phase, lo, fl, fh, hi)
        for nb in range(start, end):
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, K_bh, V_bh, M_bh, seed, bh, rows, nb * BLOCK_N, offs_n, offs_d,
                offs_dv, skn, skd, svn, svd, smm, smn, L, S, D, DV, offset, left, right, qk_scale,
                cap2, drop_p, HAS_MASK, BOOL_MASK, SOFTCAP, DROPOUT, HAS_LEFT, HAS_RIGHT,
                phase != 1, PAD_D, PAD_DV, PRECISION, TMA)
    # A fully masked row has l = 0: output 0 and lse = -inf (log of an empty sum).
    out = narrow(acc * (drop_scale / tl.where(l_i == 0.0, 1.0, l_i))[:, None], Out.dtype.element_ty)
    if TMA:
        tl.make_tensor_descriptor(O_bh, shape=[L, DV], strides=[som, 1],
                                  block_shape=[BLOCK_M, BLOCK_DV]).store([m0, 0], out)
    else:
        tl.store(O_bh + rows64[:, None] * som + offs_dv[None, :] * sod, out,
                 mask=(rows[:, None] < L) & (offs_dv[None, :] < DV))
    lse = (m_i + tl.log2(l_i)) * 0.6931471805599453
    tl.store(Lse + (b64 * H + h64) * L + rows64, lse, mask=rows < L)


# --- backward ---------------------------------------------------------------------------------


@triton.jit
def _attention_bwd_delta_kernel(Out, DO, Delta, sob, soh, som, sod, sdb, sdh, sdm, sdd,
                                H, L, DV, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows64 = rows.to(tl.int64)
    cols = tl.arange(0, BLOCK_DV)
    inside = (rows[:, None] < L) & (cols[None, :] < DV)
    o = tl.load(Out + b * sob + h * soh + rows64[:, None] * som + cols[None, :] * sod,
                mask=inside, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + rows64[:, None] * sdm + cols[None, :] * sdd,
                 mask=inside, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + (b * H + h) * L + rows64, delta, mask=rows < L)


@triton.jit
def _load_row_stats(Lse_bh, Delta_bh, rows, L, MASKED: tl.constexpr):
    # Rows past L read lse = +inf (probabilities 0); a fully masked row stored lse = -inf and
    # is read as +inf too, so exp2(s - lse) is 0 there instead of NaN.
    if MASKED:
        lse = tl.load(Lse_bh + rows, mask=rows < L, other=float("inf"))
        delta = tl.load(Delta_bh + rows, mask=rows < L, other=0.0)
    else:
        lse = tl.load(Lse_bh + rows)
        delta = tl.load(Delta_bh + rows)
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    return lse, delta


@triton.jit
def _dscores(q, k, v, do, lse2, delta, seed, bh, rows, cols, M_bh, smm, smn, L, S, offset,
             left, right, qk_scale, cap2, drop_p, drop_scale,
             HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
             DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
             MASKED: tl.constexpr, PRECISION: tl.constexpr):
    """Recompute one tile: (dropped probabilities P, ds = dL/d(score), ds times the softcap
    factor 1 - tanh^2, i.e. dL/d(scale * q.k))."""
    s, t = _scores(q, k, rows, cols, M_bh, smm, smn, L, S, offset, left, right, qk_scale, cap2,
                   HAS_MASK, BOOL_MASK, SOFTCAP, HAS_LEFT, HAS_RIGHT, MASKED, PRECISION)
    p = tl.exp2(s - lse2[:, None])
    dp = _dot(do, tl.trans(v), PRECISION)
    if DROPOUT:
        keep = _dropout_keep(seed, bh, rows, cols, drop_p)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    else:
        pd = p
    ds = p * (dp - delta[:, None])
    if SOFTCAP:
        ds_qk = ds * (1.0 - t * t)
    else:
        ds_qk = ds
    return pd, ds, ds_qk


@triton.jit
def _bwd_kv_tile(dk, dv, k, v, Q_bh, DO_bh, Lse_bh, Delta_bh, M_bh, DQ_bh, DS_bh, seed, bh,
                 m0, cols, offs_m, offs_d, offs_dv, sqm, sqd, sdom, sdod, smm, smn,
                 sdqm, sdqd, sdsm, sdsn, L, S, D, DV, offset, left, right, qk_scale, cap2,
                 sm_scale, drop_p, drop_scale,
                 HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                 DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                 MASKED: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                 ATOMIC_DQ: tl.constexpr, WRITE_DS: tl.constexpr, PRECISION: tl.constexpr):
    rows = m0 + offs_m
    rows64 = rows.to(tl.int64)
    q = _load_tile(Q_bh + rows64[:, None] * sqm + offs_d[None, :] * sqd, rows, L, offs_d, D,
                   MASKED, PAD_D)
    do = _load_tile(DO_bh + rows64[:, None] * sdom + offs_dv[None, :] * sdod, rows, L, offs_dv,
                    DV, MASKED, PAD_DV)
    lse2, delta = _load_row_stats(Lse_bh, Delta_bh, rows, L, MASKED)
    pd, ds, ds_qk = _dscores(q, k, v, do, lse2, delta, seed, bh, rows, cols, M_bh, smm, smn, L,
                             S, offset, left, right, qk_scale, cap2, drop_p, drop_scale,
                             HAS_MASK, BOOL_MASK, SOFTCAP, DROPOUT, HAS_LEFT, HAS_RIGHT, MASKED,
                             PRECISION)
    dv += _dot(tl.trans(_operand(pd, do, PRECISION)), do, PRECISION)
    if WRITE_DS:  # the additive mask's gradient, d(loss)/d(score), before the softcap factor
        tl.store(DS_bh + rows64[:, None] * sdsm + cols[None, :].to(tl.int64) * sdsn,
                 narrow(ds, DS_bh.dtype.element_ty),
                 mask=(rows[:, None] < L) & (cols[None, :] < S))
    ds_op = _operand(ds_qk, q, PRECISION)
    dk += _dot(tl.trans(ds_op), q, PRECISION)
    if ATOMIC_DQ:
        dq = _dot(ds_op, k, PRECISION) * sm_scale
        tl.atomic_add(DQ_bh + rows64[:, None] * sdqm + offs_d[None, :] * sdqd, dq,
                      mask=(rows[:, None] < L) & (offs_d[None, :] < D), sem="relaxed")
    return dk, dv


@_autotune("dkdv", reset_to_zero=["DQ"])
@triton.jit
def _attention_bwd_dkdv_kernel(
    Q, K, V, Mask, Seed, DO, Lse, Delta, DQ, DS, DK, DV_,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd, sdsb, sdsh, sdsm, sdsn,
    sdkb, sdkh, sdkn, sdkd, sdvb, sdvh, sdvn, sdvd,
    H, L, S, D, DV, GROUP, offset, left, right, qk_scale, cap2, sm_scale, drop_p, drop_scale,
    L_BUCKET, S_BUCKET, ARCH,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, ATOMIC_DQ: tl.constexpr, WRITE_DS: tl.constexpr,
    PRECISION: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    n0 = tl.program_id(0) * BLOCK_N
    hk = tl.program_id(1)
    b = tl.program_id(2)
    b64, hk64 = b.to(tl.int64), hk.to(tl.int64)
    cols = n0 + tl.arange(0, BLOCK_N)
    cols64 = cols.to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b64 * skb + hk64 * skh + cols64[:, None] * skn + offs_d[None, :] * skd,
                   cols, S, offs_d, D, True, PAD_D)
    v = _load_tile(V + b64 * svb + hk64 * svh + cols64[:, None] * svn + offs_dv[None, :] * svd,
                   cols, S, offs_dv, DV, True, PAD_DV)
    seed = tl.load(Seed) if DROPOUT else 0
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, fl, fh, hi = _query_blocks(n0, L, S, offset, left, right, BLOCK_M, BLOCK_N,
                                   HAS_LEFT, HAS_RIGHT)
    for g in range(0, GROUP):  # the query heads that share this key/value head
        h = hk * GROUP + g
        h64 = h.to(tl.int64)
        bh = b * H + h
        Q_bh = Q + b64 * sqb + h64 * sqh
        DO_bh = DO + b64 * sdob + h64 * sdoh
        Lse_bh = Lse + (b64 * H + h64) * L
        Delta_bh = Delta + (b64 * H + h64) * L
        M_bh = Mask + b64 * smb + h64 * smh
        DQ_bh = DQ + b64 * sdqb + h64 * sdqh
        DS_bh = DS + b64 * sdsb + h64 * sdsh
        for phase in tl.static_range(3):  # edge tiles, full tiles, edge tiles
            start, end = _phase_bounds(phase, lo, fl, fh, hi)
            for mb in range(start, end):
                dk, dv = _bwd_kv_tile(
                    dk, dv, k, v, Q_bh, DO_bh, Lse_bh, Delta_bh, M_bh, DQ_bh, DS_bh, seed, bh,
                    mb * BLOCK_M, cols, offs_m, offs_d, offs_dv, sqm, sqd, sdom, sdod, smm, smn,
                    sdqm, sdqd, sdsm, sdsn, L, S, D, DV, offset, left, right, qk_scale, cap2,
                    sm_scale, drop_p, drop_scale, HAS_MASK, BOOL_MASK, SOFTCAP, DROPOUT, HAS_LEFT,
                    HAS_RIGHT, phase != 1, PAD_D, PAD_DV, ATOMIC_DQ, WRITE_DS, PRECISION)
    inside = cols[:, None] < S
    tl.store(DK + b64 * sdkb + hk64 * sdkh + cols64[:, None] * sdkn + offs_d[None, :] * sdkd,
             narrow(dk * sm_scale, DK.dtype.element_ty), mask=inside & (offs_d[None, :] < D))
    tl.store(DV_ + b64 * sdvb + hk64 * sdvh + cols64[:, None] * sdvn + offs_dv[None, :] * sdvd,
             narrow(dv, DV_.dtype.element_ty), mask=inside & (offs_dv[None, :] < DV))


@triton.jit
def _bwd_q_tile(dq, q, do, lse2, delta, K_bh, V_bh, M_bh, seed, bh, rows, n0, offs_n,
                offs_d, offs_dv, skn, skd, svn, svd, smm, smn, L, S, D, DV, offset, left,
                right, qk_scale, cap2, drop_p, drop_scale,
                HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
                MASKED: tl.constexpr, PAD_D: tl.constexpr, PAD_DV: tl.constexpr,
                PRECISION: tl.constexpr):
    cols = n0 + offs_n
    cols64 = cols.to(tl.int64)
    k = _load_tile(K_bh + cols64[:, None] * skn + offs_d[None, :] * skd, cols, S, offs_d, D,
                   MASKED, PAD_D)
    v = _load_tile(V_bh + cols64[:, None] * svn + offs_dv[None, :] * svd, cols, S, offs_dv, DV,
                   MASKED, PAD_DV)
    _, _, ds_qk = _dscores(q, k, v, do, lse2, delta, seed, bh, rows, cols, M_bh, smm, smn, L, S,
                            offset, left, right, qk_scale, cap2, drop_p, drop_scale, HAS_MASK,
                            BOOL_MASK, SOFTCAP, DROPOUT, HAS_LEFT, HAS_RIGHT, MASKED, PRECISION)
    return dq + _dot(_operand(ds_qk, k, PRECISION), k, PRECISION)


@_autotune("dq")
@triton.jit
def _attention_bwd_dq_kernel(
    Q, K, V, Mask, Seed, DO, Lse, Delta, DQ,
    sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, smb, smh, smm, smn,
    sdob, sdoh, sdom, sdod, sdqb, sdqh, sdqm, sdqd,
    H, L, S, D, DV, GROUP, offset, left, right, qk_scale, cap2, sm_scale, drop_p, drop_scale,
    L_BUCKET, S_BUCKET, ARCH,
    HAS_MASK: tl.constexpr, BOOL_MASK: tl.constexpr, SOFTCAP: tl.constexpr,
    DROPOUT: tl.constexpr, HAS_LEFT: tl.constexpr, HAS_RIGHT: tl.constexpr,
    PAD_D: tl.constexpr, PAD_DV: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    m0 = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1)
    b = tl.program_id(2)
    b64, h64, hk64 = b.to(tl.int64), h.to(tl.int64), (h // GROUP).to(tl.int64)
    rows = m0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b64 * sqb + h64 * sqh + rows64[:, None] * sqm + offs_d[None, :] * sqd,
                   rows, L, offs_d, D, True, PAD_D)
    do = _load_tile(DO + b64 * sdob + h64 * sdoh + rows64[:, None] * sdom
                    + offs_dv[None, :] * sdod, rows, L, offs_dv, DV, True, PAD_DV)
    lse2, delta = _load_row_stats(Lse + (b64 * H + h64) * L, Delta + (b64 * H + h64) * L, rows,
                                  L, True)
    K_bh = K + b64 * skb + hk64 * skh
    V_bh = V + b64 * svb + hk64 * svh
    M_bh = Mask + b64 * smb + h64 * smh
    seed = tl.load(Seed) if DROPOUT else 0
    bh = b * H + h
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    lo, fl, fh, hi = _key_blocks(m0, L, S, offset, left, right, BLOCK_M, BLOCK_N,
                                 HAS_LEFT, HAS_RIGHT)
    for phase in tl.static_range(3):  # edge tiles, full tiles, edge tiles
        start, end = _phase_bounds(phase, lo, fl, fh, hi)
        for nb in range(start, end):
            dq = _bwd_q_tile(dq, q, do, lse2, delta, K_bh, V_bh, M_bh, seed, bh, rows, nb * BLOCK_N,
                             offs_n, offs_d, offs_dv, skn, skd, svn, svd, smm, smn, L, S, D, DV,
                             offset, left, right, qk_scale, cap2, drop_p, drop_scale, HAS_MASK,
                             BOOL_MASK, SOFTCAP, DROPOUT, HAS_LEFT, HAS_RIGHT, phase != 1, PAD_D,
                             PAD_DV, PRECISION)
    tl.store(DQ + b64 * sdqb + h64 * sdqh + rows64[:, None] * sdqm + offs_d[None, :] * sdqd,
             narrow(dq * sm_scale, DQ.dtype.element_ty),
             mask=(rows[:, None] < L) & (offs_d[None, :] < D))


@triton.jit
def _dropout_mask_kernel(Seed, Keep, H, L, S, drop_p, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _dropout_keep(tl.load(Seed), bh, rows, cols, drop_p)
    ptrs = Keep + (bh.to(tl.int64) * L + rows[:, None].to(tl.int64)) * S + cols[None, :]
    tl.store(ptrs, keep.to(tl.int8), mask=(rows[:, None] < L) & (cols[None, :] < S))


# --- launchers --------------------------------------------------------------------------------


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return "ieee"  # full float32 products, as PyTorch's float32 matmul (no TF32)
    return "upcast" if dtype == torch.bfloat16 and _interpreted() else "tf32"


class _Problem:
    """Everything the three kernels share, derived once per call from the normalised inputs."""

    def __init__(self, q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom,
                 softcap):
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"the triton attention kernel takes float16, bfloat16 or float32, "
                            f"got {q.dtype}; use the torch backend for {q.dtype}")
        self.B, self.H, self.L, self.D = q.shape
        self.S, self.DV = k.shape[2], v.shape[3]
        self.group = self.H // k.shape[1]
        if max(self.B, self.H) > 65535:
            raise ValueError(f"batch {self.B} and query heads {self.H} must each be <= 65535 "
                             "(CUDA grid limit)")
        self.offset = self.S - self.L if align_bottom else 0
        self.left, self.right = left, right
        self.has_mask = mask is not None
        self.bool_mask = self.has_mask and mask.dtype == torch.bool
        if mask is None:
            self.mask, self.mask_strides = q, (0, 0, 0, 0)  # never read: HAS_MASK is off
        else:
            self.mask = mask.view(torch.uint8) if self.bool_mask else mask
            self.mask_strides = mask.stride()
        self.dropout = dropout_p > 0
        self.seed = seed if self.dropout else q
        self.drop_p = float(dropout_p)
        self.drop_scale = 1.0 / (1.0 - dropout_p) if self.dropout else 1.0
        self.scale = scale
        self.softcap = softcap > 0
        self.qk_scale = scale / softcap if self.softcap else scale * LOG2E
        self.cap2 = softcap * LOG2E
        self.block_d = max(16, triton.next_power_of_2(self.D))
        self.block_dv = max(16, triton.next_power_of_2(self.DV))
        major, minor = (torch.cuda.get_device_capability(q.device) if q.is_cuda else (0, 0))
        self.arch = 10 * major + minor

    def scalars(self):
        return (self.H, self.L, self.S, self.D, self.DV, self.group, self.offset, self.left,
                self.right, self.qk_scale, self.cap2)

    def keys(self):
        return (triton.next_power_of_2(self.L), triton.next_power_of_2(self.S), self.arch)

    def flags(self, q):
        return dict(HAS_MASK=self.has_mask, BOOL_MASK=self.bool_mask, SOFTCAP=self.softcap,
                    DROPOUT=self.dropout, HAS_LEFT=self.left >= 0, HAS_RIGHT=self.right >= 0,
                    PAD_D=self.block_d != self.D, PAD_DV=self.block_dv != self.DV,
                    PRECISION=_precision(q.dtype),
                    BLOCK_D=self.block_d, BLOCK_DV=self.block_dv)


TMA_ENV = "FASTATTN_TRITON_TMA"


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _allocator_ready() -> bool:
    """Device-side tensor descriptors need Triton's scratch allocator: install one backed by
    PyTorch's caching allocator unless the program set its own. False if that cannot be told."""
    try:
        from triton.runtime import _allocation
        current = _allocation._allocator.get()
        null = isinstance(current, _allocation.NullAllocator)
    except (ImportError, AttributeError):
        return False
    if null:
        triton.set_allocator(_scratch)
    return True


def _use_tma(arch: int, tensors) -> bool:
    """Whether the forward kernel moves q, k, v and out with tensor descriptors (TMA).

    ``FASTATTN_TRITON_TMA`` (read per call): ``auto`` (default) on Hopper and newer, ``0``
    never, ``1`` also under the interpreter (for tests). Needs what TMA needs: unit stride
    along the head dim and 16-byte aligned bases and strides; other layouts take the pointer
    path of the same kernel."""
    policy = os.environ.get(TMA_ENV, "auto").strip() or "auto"
    if policy not in ("auto", "0", "1"):
        raise ValueError(f"{TMA_ENV}={policy!r} is not allowed; use auto, 0 or 1")
    if policy == "0" or not hasattr(tl, "make_tensor_descriptor"):
        return False
    if not (arch >= 90 or (policy == "1" and _interpreted())):
        return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st * size % 16 for st in t.stride()[:-1]):
            return False
    return not tensors[0].is_cuda or _allocator_ready()


def _empty_case(q, k, v):
    return q.numel() == 0 or k.shape[2] == 0 or v.shape[3] == 0


def attention_fwd(q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom, softcap):
    """(out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L) float32); see the module header."""
    out = attention_output(q, v.shape[3], q.dtype)
    lse = torch.empty(q.shape[:3], dtype=torch.float32, device=q.device)
    if _empty_case(q, k, v):  # no keys (or nothing to compute): every row is fully masked
        return out.zero_(), lse.fill_(float("-inf"))
    pr = _Problem(q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom, softcap)

    def grid(meta):
        return (triton.cdiv(pr.L, meta["BLOCK_M"]), pr.H, pr.B)

    _attention_fwd_kernel[grid](
        q, k, v, pr.mask, pr.seed, out, lse, *q.stride(), *k.stride(), *v.stride(),
        *pr.mask_strides, *out.stride(), *pr.scalars(), pr.drop_p, pr.drop_scale, *pr.keys(),
        TMA=_use_tma(pr.arch, (q, k, v, out)), **pr.flags(q))
    return out, lse


def attention_bwd(grad_out, q, k, v, out, lse, mask, seed, dropout_p, scale, left, right,
                  align_bottom, softcap, deterministic, mask_grad):
    """(dq, dk, dv, dmask): dmask is (B, Hq, L, S) float32 when ``mask_grad``, else empty."""
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    B, H, L, _ = q.shape
    S = k.shape[2]
    dmask = torch.zeros((B, H, L, S) if mask_grad else (0,), dtype=torch.float32,
                        device=q.device)
    if _empty_case(q, k, v):
        return dq.zero_(), dk.zero_(), dv.zero_(), dmask
    pr = _Problem(q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom, softcap)
    delta = torch.empty((B, H, L), dtype=torch.float32, device=q.device)
    _attention_bwd_delta_kernel[(triton.cdiv(L, 64), H, B)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), H, L, pr.DV,
        BLOCK_M=64, BLOCK_DV=pr.block_dv)
    # The atomic path accumulates dq in float32 and casts once at the end.
    dq_acc = q.new_zeros(q.shape, dtype=torch.float32) if not deterministic else dq
    ds = dmask if mask_grad else dq_acc
    Hk = k.shape[1]

    def grid_kv(meta):
        return (triton.cdiv(S, meta["BLOCK_N"]), Hk, B)

    _attention_bwd_dkdv_kernel[grid_kv](
        q, k, v, pr.mask, pr.seed, grad_out, lse, delta, dq_acc, ds, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *pr.mask_strides, *grad_out.stride(),
        *dq_acc.stride(), *(ds.stride() if mask_grad else (0, 0, 0, 0)), *dk.stride(),
        *dv.stride(), *pr.scalars(), scale, pr.drop_p, pr.drop_scale, *pr.keys(),
        ATOMIC_DQ=not deterministic, WRITE_DS=mask_grad, **pr.flags(q))
    if deterministic:

        def grid_q(meta):
            return (triton.cdiv(L, meta["BLOCK_M"]), H, B)

        _attention_bwd_dq_kernel[grid_q](
            q, k, v, pr.mask, pr.seed, grad_out, lse, delta, dq,
            *q.stride(), *k.stride(), *v.stride(), *pr.mask_strides, *grad_out.stride(),
            *dq.stride(), *pr.scalars(), scale, pr.drop_p, pr.drop_scale, *pr.keys(),
            **pr.flags(q))
    else:
        dq.copy_(dq_acc)
    return dq, dk, dv, dmask


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep mask (bool ``shape`` = (B, Hq, L, S)) the kernels draw for ``seed``: for tests
    and for anyone who needs to see exactly which probabilities were dropped."""
    B, H, L, S = shape
    keep = torch.empty(shape, dtype=torch.int8, device=device)
    if keep.numel():
        grid = (triton.cdiv(L, 32), triton.cdiv(S, 32), B * H)
        _dropout_mask_kernel[grid](seed, keep, H, L, S, float(dropout_p), BLOCK_M=32,
                                   BLOCK_N=32)
    return keep.bool()


def autotuned_configs() -> dict[str, dict[str, str]]:
    """The configs the autotuner picked in this process, per kernel and tuning key."""
    kernels = {"fwd": _attention_fwd_kernel, "bwd_dkdv": _attention_bwd_dkdv_kernel,
               "bwd_dq": _attention_bwd_dq_kernel}
    picked = {}
    for name, kernel in kernels.items():
        picked[name] = {str(key): str(cfg) for key, cfg in kernel.cache.items()}
        if not picked[name] and getattr(kernel, "best_config", None) is not None:
            picked[name]["only config"] = str(kernel.best_config)  # nothing to tune between
    return picked
