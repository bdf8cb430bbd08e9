"""Fused scale + mask + (log-)softmax, forward and backward, in Triton.

What it computes, per row (the reduced dim, any ``dim`` of any strided input):

    z_c   = x_c * scale (+ mask_c if the mask is additive)        masked elements: z_c = -inf
    y_c   = exp(z_c - lse)            or, for log-softmax,  y_c = z_c - lse
    lse   = log(sum_c exp(z_c))
    backward, g = dL/dy:
    dx_c  = scale * y_c (g_c - sum_j g_j y_j)                     (softmax)
    dx_c  = scale * (g_c - exp(y_c) sum_j g_j)                    (log-softmax)
    dx_c  = 0 where element c is masked

Masking (defined in ``fastattn.reference``): a bool mask masks where False, an additive mask
where it is -inf, ``causal`` where the column exceeds the row index of the second-to-last dim.
A fully masked row gives 0 (softmax) or -inf (log-softmax) and zero gradient; unmasked inf/NaN
behave as in PyTorch.

Shapes and layout: the launcher moves ``dim`` last (a view) and addresses rows through
``fastattn.triton.layout`` (three leading dims with per-tensor strides, so broadcast masks are
read through zero strides and never expanded in memory). Outputs are written densely in the
layout of ``fastattn.reference.row_output``.

Algorithm: one program per row. A row of at most ``layout.MAX_SINGLE`` elements is loaded once into
registers (one read, one write). Longer rows use the online softmax: a first sweep keeps a
running max ``m`` and a running sum ``s`` rescaled by ``exp(m_old - m_new)``, a second sweep
writes the output, so any row length works (the test suite goes beyond 64k columns). The max
used in exponents is 0 when the running max is still -inf, so a leading all-masked chunk cannot
turn ``s`` into NaN. 16-bit inputs accumulate in float32, float64 in float64 (``scale`` arrives
as float32 halves joined in float64, see ``layout.join_float``).

Bytes moved per row of C elements: forward reads C inputs (+ C mask elements for an unbroadcast
mask) and writes C outputs; backward reads y and g and writes dx. Rows longer than
``layout.MAX_SINGLE`` read their inputs twice (the second sweep from L2 only while the rows in
flight fit there; not measured yet).

Not done yet: block sizes and warp counts are fixed by row length, not autotuned on a GPU;
rows much shorter than a warp's width waste lanes (one row per program).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fastattn.reference import accumulate_dtype, row_output
from fastattn.triton.layout import (
    broadcast_to,
    join_float,
    narrow,
    row_config,
    row_indices,
    row_layout,
    row_offset,
    split_float,
    tl_accumulate,
)


@triton.jit
def _load_keep(m_row, cols, C, smc, row_i, MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr):
    """True where a column takes part; masked = out of range, bool False, additive -inf,
    or above the diagonal when causal."""
    keep = cols < C
    if MASK_KIND == 1:
        keep = keep & (tl.load(m_row + cols * smc, mask=cols < C, other=0) != 0)
    if MASK_KIND == 2:
        add = tl.load(m_row + cols * smc, mask=cols < C, other=0.0)
        keep = keep & (add != float("-inf"))
    if CAUSAL:
        keep = keep & (cols <= row_i)
    return keep


@triton.jit
def _load_scores(x_row, m_row, cols, C, sxc, smc, scale, row_i,
                 MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, ACC: tl.constexpr):
    keep = _load_keep(m_row, cols, C, smc, row_i, MASK_KIND, CAUSAL)
    x = tl.load(x_row + cols * sxc, mask=cols < C, other=0.0).to(ACC)
    z = x * scale
    if MASK_KIND == 2:
        z += tl.load(m_row + cols * smc, mask=cols < C, other=0.0).to(ACC)
    # Masked elements must not win the max nor add to the sum; -inf does both.
    z = tl.where(keep, z, float("-inf"))
    return z, keep


@triton.jit
def _softmax_fwd_kernel(
    x_ptr, out_ptr, mask_ptr, n1, n2, C,
    sx0, sx1, sx2, sxc, so0, so1, so2, soc, sm0, sm1, sm2, smc,
    scale_hi, scale_lo,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, LOG: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    scale = join_float(scale_hi, scale_lo, ACC)
    i0, i1, i2 = row_indices(n1, n2)
    x_row = x_ptr + row_offset(i0, i1, i2, sx0, sx1, sx2)
    o_row = out_ptr + row_offset(i0, i1, i2, so0, so1, so2)
    m_row = mask_ptr + row_offset(i0, i1, i2, sm0, sm1, sm2)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    if SINGLE:
        z, keep = _load_scores(x_row, m_row, cols, C, sxc, smc, scale, i2,
                               MASK_KIND, CAUSAL, ACC)
        m = tl.max(z, 0)
        any_keep = tl.max(keep.to(tl.int32), 0)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        e = tl.exp(z - m_safe)
        s = tl.sum(e, 0)
        if LOG:
            y = z - m_safe - tl.log(s)
            y = tl.where(any_keep > 0, y, float("-inf"))
        else:
            y = tl.where(any_keep > 0, e / s, 0.0)
        tl.store(o_row + cols * soc, narrow(y, out_ptr.dtype.element_ty), mask=cols < C)
    else:
        m = tl.full((), float("-inf"), ACC)
        s = tl.zeros((), ACC)
        any_keep = tl.zeros((), tl.int32)
        for start in range(0, C, BLOCK):
            c = start + cols
            z, keep = _load_scores(x_row, m_row, c, C, sxc, smc, scale, i2,
                                   MASK_KIND, CAUSAL, ACC)
            m_new = tl.maximum(m, tl.max(z, 0))
            # Exponents use 0 while the max is still -inf: exp(-inf - -inf) would be NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            s = s * tl.exp(m - m_safe) + tl.sum(tl.exp(z - m_safe), 0)
            m = m_new
            any_keep = tl.maximum(any_keep, tl.max(keep.to(tl.int32), 0))
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        log_s = tl.log(s)
        for start in range(0, C, BLOCK):
            c = start + cols
            z, keep = _load_scores(x_row, m_row, c, C, sxc, smc, scale, i2,
                                   MASK_KIND, CAUSAL, ACC)
            if LOG:
                y = tl.where(any_keep > 0, z - m_safe - log_s, float("-inf"))
            else:
                y = tl.where(any_keep > 0, tl.exp(z - m_safe) / s, 0.0)
            tl.store(o_row + c * soc, narrow(y, out_ptr.dtype.element_ty), mask=c < C)


@triton.jit
def _softmax_bwd_kernel(
    g_ptr, y_ptr, dx_ptr, mask_ptr, n1, n2, C,
    sg0, sg1, sg2, sgc, sy0, sy1, sy2, syc, sd0, sd1, sd2, sdc, sm0, sm1, sm2, smc,
    scale_hi, scale_lo,
    MASK_KIND: tl.constexpr, CAUSAL: tl.constexpr, LOG: tl.constexpr, ACC: tl.constexpr,
    BLOCK: tl.constexpr, SINGLE: tl.constexpr,
):
    scale = join_float(scale_hi, scale_lo, ACC)
    i0, i1, i2 = row_indices(n1, n2)
    g_row = g_ptr + row_offset(i0, i1, i2, sg0, sg1, sg2)
    y_row = y_ptr + row_offset(i0, i1, i2, sy0, sy1, sy2)
    d_row = dx_ptr + row_offset(i0, i1, i2, sd0, sd1, sd2)
    m_row = mask_ptr + row_offset(i0, i1, i2, sm0, sm1, sm2)
    cols = tl.arange(0, BLOCK).to(tl.int64)
    # The row sum runs over every column, masked ones included, exactly as the composition
    # masked_fill -> (log_)softmax differentiates; masked columns are zeroed afterwards.
    if SINGLE:
        g = tl.load(g_row + cols * sgc, mask=cols < C, other=0.0).to(ACC)
        y = tl.load(y_row + cols * syc, mask=cols < C, other=0.0).to(ACC)
        if LOG:
            total = tl.sum(g, 0)
        else:
            total = tl.sum(g * y, 0)
    else:
        total = tl.zeros((), ACC)
        for start in range(0, C, BLOCK):
            c = start + cols
            g = tl.load(g_row + c * sgc, mask=c < C, other=0.0).to(ACC)
            if LOG:
                total += tl.sum(g, 0)
            else:
                y = tl.load(y_row + c * syc, mask=c < C, other=0.0).to(ACC)
                total += tl.sum(g * y, 0)
    for start in range(0, C, BLOCK):
        c = start + cols
        if not SINGLE:
            g = tl.load(g_row + c * sgc, mask=c < C, other=0.0).to(ACC)
            y = tl.load(y_row + c * syc, mask=c < C, other=0.0).to(ACC)
        if LOG:
            gz = g - tl.exp(y) * total
        else:
            gz = y * (g - total)
        dx = gz * scale
        keep = _load_keep(m_row, c, C, smc, i2, MASK_KIND, CAUSAL)
        dx = tl.where(keep, dx, 0.0)
        tl.store(d_row + c * sdc, narrow(dx, dx_ptr.dtype.element_ty), mask=c < C)


def _mask_operand(mask: torch.Tensor | None, shape, dim: int):
    """(kind, tensor): 0 no mask, 1 bool (read as uint8), 2 additive; broadcast, dim moved last."""
    if mask is None:
        return 0, None
    m = broadcast_to(mask, shape).movedim(dim, -1)
    if mask.dtype == torch.bool:
        return 1, m.view(torch.uint8)
    return 2, m


def softmax_fwd(
    input: torch.Tensor, dim: int, scale: float, mask: torch.Tensor | None, causal: bool,
    log: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch the forward kernel; ``dim`` is non-negative, arguments already checked."""
    out = row_output(input.shape, dim, out_dtype, input.device)
    if input.numel() == 0:
        return out
    kind, m = _mask_operand(mask, input.shape, dim)
    x, o = input.movedim(dim, -1), out.movedim(dim, -1)  # (..., C)
    sizes, (x, o, m), strides, cols = row_layout(x.shape, [x, o, m], keep_last=causal)
    num_cols = x.shape[-1]
    acc_dtype = accumulate_dtype(torch.promote_types(input.dtype, out_dtype))
    block, single, num_warps = row_config(num_cols, acc_dtype)
    _softmax_fwd_kernel[(sizes[0] * sizes[1] * sizes[2],)](
        x, o, x if m is None else m, sizes[1], sizes[2], num_cols,
        *strides[0], cols[0], *strides[1], cols[1], *strides[2], cols[2],
        *split_float(scale),
        MASK_KIND=kind, CAUSAL=causal, LOG=log, ACC=tl_accumulate(acc_dtype), BLOCK=block,
        SINGLE=single, num_warps=num_warps,
    )
    return out


def softmax_bwd(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, scale: float,
    mask: torch.Tensor | None, causal: bool, log: bool, input_dtype: torch.dtype,
) -> torch.Tensor:
    """Launch the backward kernel: d(input) from d(output) and the saved output."""
    grad_input = row_output(output.shape, dim, input_dtype, output.device)
    if output.numel() == 0:
        return grad_input
    kind, m = _mask_operand(mask, output.shape, dim)
    g, y, d = (t.movedim(dim, -1) for t in (grad_output, output, grad_input))  # (..., C)
    sizes, (g, y, d, m), strides, cols = row_layout(g.shape, [g, y, d, m], keep_last=causal)
    num_cols = g.shape[-1]
    acc_dtype = accumulate_dtype(torch.promote_types(output.dtype, input_dtype))
    block, single, num_warps = row_config(num_cols, acc_dtype)
    _softmax_bwd_kernel[(sizes[0] * sizes[1] * sizes[2],)](
        g, y, d, g if m is None else m, sizes[1], sizes[2], num_cols,
        *strides[0], cols[0], *strides[1], cols[1], *strides[2], cols[2],
        *strides[3], cols[3], *split_float(scale),
        MASK_KIND=kind, CAUSAL=causal, LOG=log, ACC=tl_accumulate(acc_dtype), BLOCK=block,
        SINGLE=single, num_warps=num_warps,
    )
    return grad_input
