"""Fused attention (FlashAttention-2 style) on the CPU in Numba: forward, and backward by
recomputation.

What it computes, per batch b and query head h (key/value head hk = h // (Hq // Hk)):

    s_ij = softcap * tanh(scale * q_i.k_j / softcap)     (scale * q_i.k_j without softcap)
           + mask_ij                                     (additive mask; -inf masks)
    s_ij = -inf  where a bool mask is False or key j lies outside query i's window
    p_ij = exp(s_ij - lse_i),  lse_i = log sum_j exp(s_ij)
    o_i  = sum_j p_ij z_ij / (1 - dropout_p) v_j         (z: the dropout keep mask)

    backward, with P the dropped-and-rescaled probabilities and delta_i = sum_e do_ie o_ie:
    dv_j = sum_i P_ij do_i,  dP_ij = do_i.v_j z_ij / (1 - dropout_p),
    ds_ij = p_ij (dP_ij - delta_i),  dq_i = scale sum_j ds'_ij k_j,  dk_j = scale sum_i ds'_ij q_i
    with ds' = ds (1 - tanh^2) under softcap; ds itself is the additive mask's gradient.

A query row whose keys are all masked gives output 0, lse -inf and gradients 0.

Shapes: the normalised form of ``fastattn.reference``: q (B, Hq, L, D), k (B, Hk, S, D),
v (B, Hk, S, Dv) with any strides, the mask broadcast to (B, Hq, L, S) as a view (read through
its strides, ``common.strided_mask``: one offset per query row, never expanded), the window
``i + offset - left <= j <= i + offset + right`` (offset 0 or S - L, -1 unbounded).

Algorithm. The launchers make q, k, v contiguous in the accumulation dtype. Tile products are
BLAS gemm calls (``gemm``: scipy's BLAS, the one Numba's np.dot binds, about 10x what
hand-written loops reach here) with alpha, beta and transposed operands, so scores come out
scaled and every accumulator (the output, dk, dv, dq) is summed into in place with no
temporary; BLAS is held to one thread since prange already uses every core. The score
products (q k^T, and do v^T in backward) read K^T and V^T, made once per call
(``_transpose_heads``), so that no operand goes to BLAS transposed (for head dims up to 122,
see ``SMALL_GEMM``). Forward: one prange
task per (b, h, BLOCK_M query rows) accumulates its output rows in place, keeps its running max
and sum in local arrays and streams key tiles of BLOCK_N (online softmax); only key tiles the
window lets some row see are visited, and within a tile the window is a column range per row
(no per-element test; only a mask or softcap takes an element-wise pass of its own). The row
loops run on slices from index 0 so that LLVM vectorises them (see the row helpers). Backward:
one task per (b, hk, chunk of key tiles) -- key tiles dealt out round-robin over as many chunks
as threads, so causal work stays balanced -- recomputes each score tile once and accumulates
dk, dv for its keys over the query tiles of every query head sharing hk (GQA without atomics),
and dq into that chunk's own (L, D) buffer per head; the chunks' dq are then summed in a fixed
order (one chunk's buffer is dq itself). delta_i = do_i . o_i comes from a prange pass of
the backward kernel before its tiles. Five tile products per tile, as FlashAttention-2, every
result with one writer in a fixed order: backward is always deterministic (the
``deterministic`` flag changes nothing here), for a given thread count. Extra memory: K^T (and
V^T in backward; head dims up to 122), one dq per chunk (threads x |dq|) and three
BLOCK_M x BLOCK_N tiles per task, never L x S.

Dropout: a counter hash (``common.dropout_keep``) of the seed and the flat (b, h, i, j) index,
regenerated in backward; ``dropout_mask`` returns the same mask for tests.

Dtypes: float32 and float64 (float64 end to end: backward recomputes lse in float64 rather
than reading the float32 lse of forward). 16-bit inputs are converted to float32 by the
launchers (one extra read and write of q, k, v; Numba has no bfloat16/float16 arithmetic).
Work: forward 2 L S (D + Dv) flops per head, backward 2.5x that (recomputing the scores once).

Not supported: anything but CPU tensors; head dims are not limited here (the public functions
limit them to 256).
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import math

import numba
import numpy as np
import torch
from numba import prange, types
from numba.extending import overload

from fastattn.numba.common import (
    JIT,
    LAUNCH_LOCK,
    array,
    cast,
    dropout_keep,
    dropout_threshold,
    exp_store_sum,
    fexp,
    np_dtype,
    row_max,
    scalar,
    strided_mask,
)
from fastattn.reference import accumulate_dtype, attention_output

BLOCK_M = 64
BLOCK_N = 128
# backward tiles: narrower key tiles skip more of a causal mask, taller query tiles make fewer,
# larger products (measured at L128 and L384, D64, one thread)
BWD_BLOCK_M = 128
BWD_BLOCK_N = 64
_JIT = {**JIT, "fastmath": {"contract"}}
# Score products take the key side transposed beforehand (_transpose_heads) while a tile's
# product is at most this many multiply-adds: OpenBLAS's small-matrix kernels, which take
# untransposed operands faster, stop there. Past it (head dims over 122 with these tiles) the
# copy buys nothing: at D128 it cost 4% of an L128 forward.
SMALL_GEMM = 100**3


# --- tile products: BLAS gemm with alpha, beta and transposes ---------------------------------
#
# np.dot in Numba allocates its result and has neither alpha, beta nor transposed operands
# without a copy; the kernels call the BLAS Numba binds (scipy's, through its helper
# ``numba_xxgemm``, resolved by symbol name, so the kernels stay cacheable) directly: scores
# come out scaled, and dk, dv, dq and the output accumulate in place with beta = 1.


def _xxgemm(dtype):
    ptr = types.CPointer(dtype)
    return types.ExternalFunction("numba_xxgemm", types.intc(
        types.char, types.char, types.char, types.intp, types.intp, types.intp,
        ptr, ptr, types.intp, ptr, types.intp, ptr, ptr, types.intp))


_XXGEMM = {types.float32: (_xxgemm(types.float32), ord("s")),
           types.float64: (_xxgemm(types.float64), ord("d"))}
_N, _T = ord("n"), ord("t")


def gemm(a, b, c, trans_a, trans_b, alpha, beta, scalars):
    """c <- alpha op(a) op(b) + beta c for 2-d arrays of one float dtype whose rows are
    contiguous (C-contiguous, or column slices of such arrays: the row stride is passed to BLAS
    as the leading dimension); op is the transpose where ``trans_*``; ``scalars`` is a writable
    array of 2 of that dtype (BLAS takes alpha and beta by pointer)."""
    raise NotImplementedError("gemm is called from Numba-compiled code only")


def _ld(x):
    raise NotImplementedError("_ld is called from Numba-compiled code only")


@overload(_ld)
def _ld_impl(x):
    """The leading dimension BLAS takes for row-major ``x`` (its row stride in elements), after
    checking that its rows are contiguous."""
    def impl(x):
        size = x.itemsize
        if x.shape[0] > 0 and x.shape[1] > 1 and x.strides[1] != size:  # (empty: any strides)
            raise ValueError("fastattn numba gemm: rows of an operand are not contiguous")
        # one row: its stride is never used, and BLAS asks only for ld >= the row length
        return max(1, x.shape[1], x.strides[0] // size if x.shape[0] > 1 else 1)

    return impl


@overload(gemm)
def _gemm(a, b, c, trans_a, trans_b, alpha, beta, scalars):
    if (any(getattr(x, "layout", None) not in ("C", "A") or getattr(x, "ndim", 0) != 2
            for x in (a, b, c)) or a.dtype not in _XXGEMM):
        return None
    fn, kind = _XXGEMM[a.dtype]

    def impl(a, b, c, trans_a, trans_b, alpha, beta, scalars):
        m, n = c.shape
        k = a.shape[0] if trans_a else a.shape[1]
        if m == 0 or n == 0:
            return
        scalars[0] = alpha
        scalars[1] = beta
        # Row-major c = op(a) op(b) is column-major c^T = op(b)^T op(a)^T: b first, flags as
        # given, leading dimensions the row strides.
        status = fn(kind, _T if trans_b else _N, _T if trans_a else _N, n, m, k,
                    scalars[0:].ctypes, b.ctypes, _ld(b), a.ctypes, _ld(a),
                    scalars[1:].ctypes, c.ctypes, _ld(c))
        if status != 0:
            raise RuntimeError("fastattn numba attention: no BLAS sgemm/dgemm from scipy")

    return impl


@numba.njit(cache=True)
def _transpose(src, dst):
    """dst (E, N) = src (N, E)^T, row by row of dst: the strided side is the read, which
    measured about 2x faster here than strided writes (0.29 against 0.61 ns an element at
    128 x 64 float32)."""
    N, E = src.shape
    for e in range(E):
        row = dst[e]
        for j in range(N):
            row[j] = src[j, e]


@numba.njit(cache=True)
def _window_cols(ii, n0, bn, left, right, offset):
    """Columns [lo, hi) of a key tile starting at ``n0`` (width ``bn``) that query ``ii`` sees
    under the window; the rest of its row is masked."""
    lo = max(0, ii + offset - left - n0) if left >= 0 else 0
    hi = min(bn, ii + offset + right + 1 - n0) if right >= 0 else bn
    return lo, max(lo, hi)


# Row helpers. Each loops over range(n) from 0 on a slice of the row: an inner loop over
# range(lo, hi) with lo not known to be >= 0 keeps Numba's negative-index wraparound on every
# access, which stops LLVM from vectorising it (before these, the backward's probability loop
# ran scalar and took a third of backward's time).


@numba.njit(cache=True)
def _fill(v, n, value):
    for j in range(n):
        v[j] = value


@numba.njit(cache=True)
def _softcap(v, n, softcap):
    """v[j] <- softcap tanh(v[j] / softcap) for j < n."""
    for j in range(n):
        v[j] = softcap * cast(math.tanh(v[j] / softcap), v)


@numba.njit(cache=True)
def _mask_value(val, kind, mask_b, mask_f, at, ninf):
    """``val`` after the mask element at ``at``: -inf where a bool mask is False, plus an
    additive mask."""
    if kind == 1:
        return val if mask_b[at] else ninf
    return val + mask_f[at]


@numba.njit(cache=True)
def _mask_row(v, n, kind, mask_b, mask_f, start, stride):
    """v[j] <- v[j] after the mask of its key, for j < n: the mask elements are ``stride`` apart
    from ``start`` (contiguous and broadcast rows get loops that vectorise)."""
    ninf = cast(-math.inf, v)
    if stride == 1 and kind == 1:
        mb = mask_b[start:start + n]
        for j in range(n):
            v[j] = v[j] if mb[j] else ninf
    elif stride == 1:
        mf = mask_f[start:start + n]
        for j in range(n):
            v[j] = v[j] + mf[j]
    elif stride == 0 and kind == 1:  # one element for the whole row
        if not mask_b[start]:
            _fill(v, n, ninf)
    elif stride == 0:
        a = mask_f[start]
        for j in range(n):
            v[j] = v[j] + a
    else:
        for j in range(n):
            v[j] = _mask_value(v[j], kind, mask_b, mask_f, start + j * stride, ninf)


@numba.njit(cache=True)
def _key_range(i0, i1, S, left, right, offset):
    """Keys [lo, hi) that some query in [i0, i1) may see under the window."""
    lo = max(0, i0 + offset - left) if left >= 0 else 0
    hi = min(S, i1 - 1 + offset + right + 1) if right >= 0 else S
    return lo, max(lo, hi)


@numba.njit(cache=True)
def _query_range(n0, n1, L, left, right, offset):
    """Queries [lo, hi) that may see some key in [n0, n1) under the window."""
    lo = max(0, n0 - offset - right) if right >= 0 else 0
    hi = min(L, n1 - 1 - offset + left + 1) if left >= 0 else L
    return lo, max(lo, hi)


@numba.njit(**_JIT)
def _transpose_heads(x, tile_rows, tile_cols, depth):
    """x[b, h]^T for every head of (B, H, N, E) ``x``, as (B, H, E, N), one task per head, when
    a score tile of ``tile_rows`` x ``tile_cols`` x ``depth`` stays within ``SMALL_GEMM``; else
    an empty (B, H, 0, 0) array, and ``_times_t`` transposes in BLAS instead. The kernels take
    the score products q k^T (and do v^T) with the key side transposed beforehand, so that both
    operands go to BLAS untransposed: OpenBLAS runs such a tile (64 x 128 x 64 float32) in its
    small-matrix kernel, 9.3 us against 13.1 for the transposed form, which it packs first."""
    B, H, N, E = x.shape
    if tile_rows * tile_cols * depth > SMALL_GEMM:
        return np.empty((B, H, 0, 0), x.dtype)
    xt = np.empty((B, H, E, N), x.dtype)
    for bh in prange(B * H):
        _transpose(x[bh // H, bh % H], xt[bh // H, bh % H])
    return xt


@numba.njit(cache=True)
def _times_t(a, x, xt, n0, n1, alpha, out, scalars):
    """out <- alpha a x[n0:n1]^T for one head's (N, E) ``x``: from ``xt`` (its (E, N)
    transpose, see ``_transpose_heads``) when it was made, else with BLAS transposing."""
    zero = cast(0.0, out)
    if xt.shape[0] > 0:
        gemm(a, xt[:, n0:n1], out, False, False, alpha, zero, scalars)
    else:
        gemm(a, x[n0:n1], out, False, True, alpha, zero, scalars)


@numba.njit(**_JIT)
def _attention_fwd_kernel(q, k, v, kind, mask_b, mask_f, mask_off, mask_stride, seed,
                          threshold, drop_scale, scale, softcap, left, right, offset, out, lse):
    B, H, L, D = q.shape
    Hk, S, Dv = k.shape[1], k.shape[2], v.shape[3]
    group = H // Hk
    n_mt = (L + BLOCK_M - 1) // BLOCK_M
    ninf = cast(-math.inf, q)
    zero = cast(0.0, q)
    one = cast(1.0, q)
    kt = _transpose_heads(k, BLOCK_M, BLOCK_N, D)  # K^T, or empty
    for task in prange(B * H * n_mt):
        b = task // (H * n_mt)
        h = (task // n_mt) % H
        hk = h // group
        i0 = (task % n_mt) * BLOCK_M
        i1 = min(L, i0 + BLOCK_M)
        bm = i1 - i0
        q_tile = q[b, h][i0:i1]  # (bm, D)
        acc = out[b, h][i0:i1]  # (bm, Dv): accumulated in place, normalised at the end
        acc[:] = zero
        m_i = np.full(bm, ninf, q.dtype)
        l_i = np.zeros(bm, q.dtype)
        s_buf = np.empty(BLOCK_M * BLOCK_N, q.dtype)
        scalars = np.empty(2, q.dtype)
        lo, hi = _key_range(i0, i1, S, left, right, offset)
        for n0 in range(lo, hi, BLOCK_N):
            n1 = min(hi, n0 + BLOCK_N)
            bn = n1 - n0
            s = s_buf[:bm * bn].reshape((bm, bn))
            _times_t(q_tile, k[b, hk], kt[b, hk], n0, n1, scale, s, scalars)  # scale q.k
            for i in range(bm):
                srow = s[i]
                ii = i0 + i
                row = (b * H + h) * L + ii
                lo_j, hi_j = _window_cols(ii, n0, bn, left, right, offset)
                n = hi_j - lo_j
                seg = srow[lo_j:hi_j]  # the keys row i sees; the rest get p = 0
                m_old = m_i[i]
                if softcap > zero:
                    _softcap(seg, n, softcap)
                if kind != 0:
                    _mask_row(seg, n, kind, mask_b, mask_f,
                              mask_off[row] + (n0 + lo_j) * mask_stride, mask_stride)
                m_new = row_max(seg, n, m_old)
                _fill(srow, lo_j, zero)
                _fill(srow[hi_j:], bn - hi_j, zero)
                if m_new == ninf:  # nothing visible yet in this row: p = 0
                    _fill(seg, n, zero)
                    continue
                alpha = fexp(m_old - m_new)
                l_i[i] = l_i[i] * alpha + exp_store_sum(seg, n, m_new)
                m_i[i] = m_new
                if alpha != one:
                    arow = acc[i]
                    for e in range(Dv):
                        arow[e] *= alpha
                if threshold > 0:  # dropout after the sum: lse and l are of the undropped p
                    base = row * S + n0
                    for j in range(bn):
                        keep = dropout_keep(seed, base + j, threshold)
                        srow[j] = srow[j] * drop_scale if keep else zero
            gemm(s, v[b, hk][n0:n1], acc, False, False, one, one, scalars)  # acc += p v
        for i in range(bm):
            ii = i0 + i
            o = acc[i]
            if l_i[i] > zero:
                inv = one / l_i[i]
                for e in range(Dv):
                    o[e] = o[e] * inv
                lse[b, h, ii] = m_i[i] + cast(math.log(l_i[i]), q)
            else:  # fully masked row
                _fill(o, Dv, zero)
                lse[b, h, ii] = ninf


@numba.njit(cache=True)
def _dscores_plain(s, dp, p, n, lse_i, delta_i):
    """One row of ``_probs_and_dscores`` without mask, softcap, dropout or dmask."""
    for j in range(n):
        pj = fexp(s[j] - lse_i)
        p[j] = pj
        s[j] = pj * (dp[j] - delta_i)


@numba.njit(cache=True)
def _dscores(s, dp, p, n, lse_i, delta_i, kind, mask_b, mask_f, mask_start, mask_stride,
             seed, first, threshold, drop_scale, softcap, dmask, write_dmask):
    """One row of ``_probs_and_dscores``, every option: element j's mask element is at
    ``mask_start + j * mask_stride``, its dropout index ``first + j``."""
    ninf = cast(-math.inf, s)
    zero = cast(0.0, s)
    one = cast(1.0, s)
    for j in range(n):
        val = s[j]
        t = zero
        if softcap > zero:
            t = cast(math.tanh(val / softcap), s)
            val = softcap * t
        if kind != 0:
            val = _mask_value(val, kind, mask_b, mask_f, mask_start + j * mask_stride, ninf)
        if val == ninf:
            s[j] = zero
            p[j] = zero
            if write_dmask:
                dmask[j] = zero
            continue
        pj = fexp(val - lse_i)
        d = dp[j]
        pd = pj
        if threshold > 0:
            if dropout_keep(seed, first + j, threshold):
                pd = pj * drop_scale
                d = d * drop_scale
            else:
                pd = zero
                d = zero
        ds = pj * (d - delta_i)
        if write_dmask:
            dmask[j] = ds
        if softcap > zero:
            ds = ds * (one - t * t)
        s[j] = ds
        p[j] = pd


@numba.njit(cache=True)
def _probs_and_dscores(s, dp, p_drop, b, h, H, L, S, i0, n0, lse, delta, kind, mask_b, mask_f,
                       mask_off, mask_stride, seed, threshold, drop_scale, softcap, left,
                       right, offset, dmask, write_dmask):
    """Turn a (queries i0.., keys n0..) tile of q.k (``s``) and do.v (``dp``) into score
    gradients, in place: on return ``s`` holds ds' (ds times the softcap factor), ``p_drop``
    the dropped probabilities P, and ``dmask`` (when written) ds."""
    ninf = cast(-math.inf, s)
    zero = cast(0.0, s)
    bm, bn = s.shape
    plain = kind == 0 and softcap == zero and threshold == 0 and not write_dmask
    for i in range(bm):
        srow, dprow, prow = s[i], dp[i], p_drop[i]
        ii = i0 + i
        row = (b * H + h) * L + ii
        lse_i = lse[b, h, ii]
        delta_i = delta[b, h, ii]
        lo_j, hi_j = _window_cols(ii, n0, bn, left, right, offset)
        if lse_i == ninf:  # fully masked row: no probability, no gradient
            lo_j = hi_j = 0
        n = hi_j - lo_j
        # outside the window: no probability, no gradient (dmask is zeros already)
        _fill(srow, lo_j, zero)
        _fill(prow, lo_j, zero)
        _fill(srow[hi_j:], bn - hi_j, zero)
        _fill(prow[hi_j:], bn - hi_j, zero)
        seg, dseg, pseg = srow[lo_j:hi_j], dprow[lo_j:hi_j], prow[lo_j:hi_j]
        if plain:
            _dscores_plain(seg, dseg, pseg, n, lse_i, delta_i)
        else:
            jj0 = n0 + lo_j
            mask_start = mask_off[row] + jj0 * mask_stride if kind != 0 else 0
            dmask_row = dmask[b, h, ii, jj0:jj0 + n] if write_dmask else dmask[0, 0, 0, :0]
            _dscores(seg, dseg, pseg, n, lse_i, delta_i, kind, mask_b, mask_f,
                     mask_start, mask_stride, seed, row * S + jj0,
                     threshold, drop_scale, softcap, dmask_row, write_dmask)


@numba.njit(**_JIT)
def _attention_bwd_kernel(q, k, v, g, out, lse, delta, kind, mask_b, mask_f, mask_off,
                          mask_stride, seed, threshold, drop_scale, scale, softcap, left, right,
                          offset, n_chunks, dq_part, dk, dv, dmask, write_dmask):
    B, H, L, _ = q.shape
    Hk, S = k.shape[1], k.shape[2]
    group = H // Hk
    n_nt = (S + BWD_BLOCK_N - 1) // BWD_BLOCK_N
    zero = cast(0.0, q)
    one = cast(1.0, q)
    for row in prange(B * H * L):  # delta_i = do_i . o_i (B, Hq, L)
        b, h, i = row // (H * L), (row // L) % H, row % L
        delta[b, h, i] = np.dot(g[b, h, i], out[b, h, i])
    depth = max(k.shape[3], v.shape[3])  # both made, or neither
    kt = _transpose_heads(k, BWD_BLOCK_M, BWD_BLOCK_N, depth)  # K^T and V^T, or empty
    vt = _transpose_heads(v, BWD_BLOCK_M, BWD_BLOCK_N, depth)
    for task in prange(B * Hk * n_chunks):
        b = task // (Hk * n_chunks)
        hk = (task // n_chunks) % Hk
        chunk = task % n_chunks
        dq_part[chunk, b, hk * group:(hk + 1) * group] = zero  # this task's share, summed in
        s_buf = np.empty(BWD_BLOCK_M * BWD_BLOCK_N, q.dtype)
        dp_buf = np.empty(BWD_BLOCK_M * BWD_BLOCK_N, q.dtype)
        p_buf = np.empty(BWD_BLOCK_M * BWD_BLOCK_N, q.dtype)
        scalars = np.empty(2, q.dtype)
        for nt in range(chunk, n_nt, n_chunks):  # interleaved: causal work stays balanced
            n0 = nt * BWD_BLOCK_N
            n1 = min(S, n0 + BWD_BLOCK_N)
            k_tile = k[b, hk][n0:n1]  # (bn, D)
            bn = n1 - n0
            dk_acc, dv_acc = dk[b, hk][n0:n1], dv[b, hk][n0:n1]  # accumulated in place
            dk_acc[:] = zero
            dv_acc[:] = zero
            lo, hi = _query_range(n0, n1, L, left, right, offset)
            for h in range(hk * group, (hk + 1) * group):
                dq_h = dq_part[chunk, b, h]  # (L, D): this chunk's share of dq
                for m0 in range(lo, hi, BWD_BLOCK_M):
                    m1 = min(hi, m0 + BWD_BLOCK_M)
                    bm = m1 - m0
                    q_tile, g_tile = q[b, h][m0:m1], g[b, h][m0:m1]  # (bm, D), (bm, Dv)
                    s = s_buf[:bm * bn].reshape((bm, bn))
                    dp = dp_buf[:bm * bn].reshape((bm, bn))
                    p = p_buf[:bm * bn].reshape((bm, bn))
                    _times_t(q_tile, k[b, hk], kt[b, hk], n0, n1, scale, s, scalars)  # scores
                    _times_t(g_tile, v[b, hk], vt[b, hk], n0, n1, one, dp, scalars)  # do v^T
                    _probs_and_dscores(s, dp, p, b, h, H, L, S, m0, n0, lse, delta, kind,
                                       mask_b, mask_f, mask_off, mask_stride, seed, threshold,
                                       drop_scale, softcap, left, right, offset, dmask,
                                       write_dmask)
                    gemm(p, g_tile, dv_acc, True, False, one, one, scalars)  # dv += P^T do
                    gemm(s, q_tile, dk_acc, True, False, scale, one, scalars)  # dk += c ds'^T q
                    gemm(s, k_tile, dq_h[m0:m1], False, False, scale, one, scalars)


@numba.njit(**_JIT)
def _dropout_mask_kernel(seed, threshold, keep):
    B, H, L, S = keep.shape
    for bhi in prange(B * H * L):
        row = keep[bhi // (H * L), (bhi // L) % H, bhi % L]
        for j in range(S):
            row[j] = dropout_keep(seed, bhi * S + j, threshold)


# --- launchers -------------------------------------------------------------------------------


@functools.cache
def _blas_libs():
    """threadpoolctl's controllers of the BLAS libraries loaded here, scipy's included (the one
    the tile products call); found once, as the libraries stay loaded."""
    importlib.import_module("scipy.linalg.cython_blas")  # load it before looking for it
    from threadpoolctl import ThreadpoolController

    return tuple(ThreadpoolController().select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def _launching():
    """Around kernel calls: ``LAUNCH_LOCK``, and BLAS on the calling thread only: prange
    already keeps every core busy, and OpenBLAS called from Numba's OpenMP threads would
    otherwise start threads of its own for each tile product (it warns that it may hang, and
    runs tens of times slower). The thread counts are set and restored through the cached
    controllers (what ``ThreadpoolController.limit`` does, without finding the libraries again
    on every call: 14 -> 4 us)."""
    with LAUNCH_LOCK:
        libs = _blas_libs()
        before = [lib.get_num_threads() for lib in libs]
        for lib, n in zip(libs, before, strict=True):
            if n != 1:
                lib.set_num_threads(1)
        try:
            yield
        finally:
            for lib, n in zip(libs, before, strict=True):
                if n != 1:
                    lib.set_num_threads(n)


def _contiguous(t: torch.Tensor, acc: torch.dtype) -> np.ndarray:
    """``t`` as a C-contiguous array of ``acc``: its own memory when it is one already (the
    checks cost less than the no-op conversions, which matters at small sizes)."""
    if t.dtype != acc or not t.is_contiguous():
        t = t.to(acc).contiguous()
    return array(t)


# The dmask argument when no mask gradient is asked (never written; writable, like real ones)
_NO_DMASK = {t: np.zeros((1, 1, 1, 1), t) for t in (np.float32, np.float64)}


def _common_args(q, k, mask, seed, dropout_p, scale, softcap, acc):
    B, H, L, _ = q.shape
    S = k.shape[2]
    kind, mask_b, mask_f, mask_off, mask_stride = strided_mask(mask, (B, H, L, S), acc)
    threshold = dropout_threshold(dropout_p) if dropout_p > 0 else 0
    seed_value = int(seed.item()) if threshold else 0
    drop_scale = 1.0 / (1.0 - dropout_p) if threshold else 1.0
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return (kind, mask_b, mask_f, mask_off, mask_stride, seed_value, threshold,
            scalar(drop_scale, acc), scalar(scale, acc), scalar(softcap or 0.0, acc))


def _forward(q, k, v, common, left, right, offset, acc, out=None):
    """(out (B, Hq, L, Dv), lse (B, Hq, L)) in ``acc``, lse contiguous; ``out`` is written in
    place when given (contiguous, in ``acc``)."""
    B, H, L, _ = q.shape
    if out is None:
        out = torch.empty(B, H, L, v.shape[3], dtype=acc)
    lse = torch.empty(B, H, L, dtype=acc)
    qa, ka, va = _contiguous(q, acc), _contiguous(k, acc), _contiguous(v, acc)
    with _launching():
        _attention_fwd_kernel(qa, ka, va, *common, left, right, offset, array(out), array(lse))
    return out, lse


def _trivial(q, k) -> bool:
    return q.numel() == 0 or k.shape[2] == 0


def attention_fwd(q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom, softcap):
    """(out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L) float32); see the module header and
    ``fastattn.reference.attention_fwd``."""
    acc = accumulate_dtype(q.dtype)
    out = attention_output(q, v.shape[3], q.dtype)
    if _trivial(q, k):  # no keys (or nothing to compute): every row is fully masked
        return out.zero_(), torch.full(q.shape[:3], float("-inf"))
    offset = k.shape[2] - q.shape[2] if align_bottom else 0
    common = _common_args(q, k, mask, seed, dropout_p, scale, softcap, acc)
    direct = out.dtype == acc and out.is_contiguous()
    o, lse = _forward(q, k, v, common, left, right, offset, acc, out if direct else None)
    return out if direct else out.copy_(o), lse.float()


def attention_bwd(grad_out, q, k, v, out, lse, mask, seed, dropout_p, scale, left, right,
                  align_bottom, softcap, deterministic, mask_grad):
    """(dq, dk, dv, dmask): dmask is (B, Hq, L, S) in the accumulation dtype when
    ``mask_grad``, else empty. Always deterministic (see the module header)."""
    acc = accumulate_dtype(q.dtype)
    B, H, L, D = q.shape
    S = k.shape[2]
    dmask = torch.zeros((B, H, L, S) if mask_grad else (0,), dtype=acc)
    if _trivial(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), dmask
    offset = S - L if align_bottom else 0
    scale = D**-0.5 if scale is None else scale
    common = _common_args(q, k, mask, seed, dropout_p, scale, softcap, acc)
    if acc == torch.float64:  # lse and out again in float64: the saved lse is float32
        out, lse = _forward(q, k, v, common, left, right, offset, acc)
    lse = _contiguous(lse, acc)
    dk = torch.empty(k.shape, dtype=acc)
    dv = torch.empty(v.shape, dtype=acc)
    # dq: one partial sum per chunk of key tiles, added here in a fixed order (deterministic)
    n_chunks = max(1, min(numba.get_num_threads(), -(-S // BWD_BLOCK_N)))
    dq_part = torch.empty((n_chunks, *q.shape), dtype=acc)
    delta = np.empty((B, H, L), np_dtype(acc))
    tensors = (q, k, v, grad_out, out)
    qa, ka, va, ga, oa = (_contiguous(t, acc) for t in tensors)
    dmask_np = array(dmask) if mask_grad else _NO_DMASK[np_dtype(acc)]
    with _launching():
        _attention_bwd_kernel(qa, ka, va, ga, oa, lse, delta, *common, left, right, offset,
                              n_chunks, array(dq_part), array(dk), array(dv), dmask_np,
                              bool(mask_grad))
    dq = dq_part[0] if n_chunks == 1 else dq_part.sum(0)
    return _like(q, dq), _like(k, dk), _like(v, dv), dmask


def _like(t: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """The gradient ``d`` (contiguous, accumulation dtype) in ``t``'s dtype and layout."""
    if d.dtype == t.dtype and t.is_contiguous():
        return d
    return torch.empty_like(t).copy_(d)


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep mask (bool ``shape`` = (B, Hq, L, S)) the kernels draw for ``seed``: for tests
    and for anyone who needs to see exactly which probabilities were dropped."""
    keep = torch.empty(shape, dtype=torch.bool)
    if keep.numel():
        with LAUNCH_LOCK:
            _dropout_mask_kernel(int(seed.item()), dropout_threshold(dropout_p), array(keep))
    return keep.to(device)
