"""Softmax and log-softmax along one dim with fused scale, mask and causal mask, in Numba.

What it computes, per row x (the elements along ``dim``), z = x * scale (+ additive mask):

    forward:   y = exp(z - m) / sum_k exp(z_k - m)        (log: y = z - m - log sum_k ...)
    backward:  dz = y * (g - sum_k g_k y_k)               (log: dz = g - exp(y) sum_k g_k)
               d(input) = scale * dz, 0 where masked

with m the row max over unmasked elements. Masked elements (bool mask False, additive -inf,
causal j > i) take part as -inf; a row with none left gives 0 (log: -inf) and gradient 0, as
``fastattn.reference`` specifies. Unmasked -inf/NaN behave as in PyTorch.

Shapes: the input is viewed as (rows, cols) with ``dim`` moved last (a view for contiguous
inputs, one copy otherwise); the output is ``reference.row_output`` (``dim`` last in memory),
written in place when its dtype is the accumulation dtype. The mask is read through its
broadcast strides (``common.strided_mask``): one int64 offset per row, never expanded.

Algorithm: one prange task per row. Without mask or causal: max of x * scale; exp into the
output and sum; scale by 1/sum (log: x * scale - m - log sum, written once). With them: scale
and mask into the output while taking the max, then exp and sum, then normalise. A row of up to
~64k float32 stays in L2 between sweeps, so the input is read once and the output written once
from memory. Work: 2 x rows x
cols elements moved forward, 3 x backward.

Dtypes: float32 and float64 kernels. 16-bit inputs are converted to float32 by the launcher
(one extra read and write of the input: Numba has no bfloat16/float16 arithmetic), and the
result converted back; so is an output dtype other than the accumulation dtype.

Not supported: running on anything but CPU tensors.
"""

from __future__ import annotations

import math

import numba
import torch
from numba import prange

from fastattn.numba.common import (
    JIT,
    LAUNCH_LOCK,
    array,
    cast,
    dot,
    exp_store_sum,
    exp_sum,
    fexp,
    last,
    row_max,
    rows,
    scalar,
    scaled_exp_store_sum,
    scaled_exp_sum,
    scaled_max,
    strided_mask,
    total,
)
from fastattn.reference import accumulate_dtype, row_output


@numba.njit(**JIT)
def _softmax_fwd_kernel(x, out, kind, mask_b, mask_f, mask_off, mask_stride, causal, L, scale,
                        log):
    n_rows, cols = x.shape
    ninf = cast(-math.inf, x)
    zero = cast(0.0, x)
    for r in prange(n_rows):
        xr = x[r]
        o = out[r]
        one = cast(1.0, x)
        if kind == 0 and not causal:  # the plain row: x read twice, the output written once
            m = scaled_max(xr, cols, scale, ninf)
            if log:
                log_s = cast(math.log(scaled_exp_sum(xr, cols, scale, m)), x)
                for j in range(cols):
                    o[j] = (xr[j] * scale - m) - log_s  # in this order, as PyTorch
            else:
                inv = one / scaled_exp_store_sum(xr, o, cols, scale, m)
                for j in range(cols):
                    o[j] = o[j] * inv
            continue
        lim = min(cols, r % L + 1) if causal else cols  # causal: keys j <= i only
        m = ninf
        kept = 0
        if kind == 0:
            for j in range(lim):
                o[j] = xr[j] * scale
            m = row_max(o, lim, m)
            kept = lim
        else:
            base = mask_off[r]
            for j in range(lim):
                z = xr[j] * scale
                if kind == 1:
                    keep = mask_b[base + j * mask_stride]
                else:
                    a = mask_f[base + j * mask_stride]
                    z = z + a
                    keep = a != ninf
                o[j] = z if keep else ninf
                kept += keep
            m = row_max(o, lim, m)
        for j in range(lim, cols):
            o[j] = ninf
        if kept == 0:  # fully masked row: 0, or -inf for log-softmax
            fill = ninf if log else zero
            for j in range(cols):
                o[j] = fill
        elif log:
            log_s = cast(math.log(exp_sum(o, lim, m)), x)
            for j in range(cols):
                o[j] = (o[j] - m) - log_s  # in this order, as PyTorch: z - m is exact
        else:
            inv = one / exp_store_sum(o, cols, m)  # masked: exp(-inf) = 0 (NaN if sum is NaN)
            for j in range(cols):
                o[j] = o[j] * inv


@numba.njit(**JIT)
def _softmax_bwd_kernel(g, y, gx, kind, mask_b, mask_f, mask_off, mask_stride, causal, L, scale,
                        log):
    n_rows, cols = y.shape
    ninf = cast(-math.inf, y)
    zero = cast(0.0, y)
    for r in prange(n_rows):
        gr = g[r]
        yr = y[r]
        o = gx[r]
        lim = min(cols, r % L + 1) if causal else cols
        if log:
            gs = total(gr, cols)
            for j in range(cols):
                o[j] = (gr[j] - fexp(yr[j]) * gs) * scale
        else:
            gy = dot(gr, yr, cols)
            for j in range(cols):
                o[j] = yr[j] * (gr[j] - gy) * scale
        # Masked elements get exactly 0 (log-softmax's -inf outputs would otherwise pass g on).
        for j in range(lim, cols):
            o[j] = zero
        if kind != 0:
            base = mask_off[r]
            for j in range(lim):
                if kind == 1:
                    keep = mask_b[base + j * mask_stride]
                else:
                    keep = mask_f[base + j * mask_stride] != ninf
                o[j] = o[j] if keep else zero


def _launch(kernel, tensors, shape, dim, scale, mask, causal, log, out_dtype, acc):
    """Run ``kernel`` on ``tensors`` viewed as (rows, cols) rows of ``acc`` and return a
    ``row_output`` of ``out_dtype``."""
    out = row_output(shape, dim, out_dtype, tensors[0].device)
    if out.numel() == 0:
        return out
    moved = last(out, dim)  # (..., cols): contiguous
    buf = moved if out_dtype == acc else torch.empty(moved.shape, dtype=acc)
    views = [rows(last(t, dim), acc) for t in tensors]
    kind, mask_b, mask_f, mask_off, mask_stride = strided_mask(mask, shape, acc, dim)
    L = shape[-2] if len(shape) >= 2 else 1
    with LAUNCH_LOCK:
        kernel(*(array(v) for v in views), array(buf.view(-1, buf.shape[-1])), kind, mask_b,
               mask_f, mask_off, mask_stride, bool(causal), L, scalar(scale, acc), bool(log))
    if buf is not moved:
        moved.copy_(buf)
    return out


def softmax_fwd(input: torch.Tensor, dim: int, scale: float, mask: torch.Tensor | None,
                causal: bool, log: bool, out_dtype: torch.dtype) -> torch.Tensor:
    """(log-)softmax of ``input`` along ``dim``; see ``fastattn.reference.softmax_fwd``."""
    acc = accumulate_dtype(torch.promote_types(input.dtype, out_dtype))
    return _launch(_softmax_fwd_kernel, [input], input.shape, dim, scale, mask, causal,
                   log, out_dtype, acc)


def softmax_bwd(grad_output: torch.Tensor, output: torch.Tensor, dim: int, scale: float,
                mask: torch.Tensor | None, causal: bool, log: bool,
                input_dtype: torch.dtype) -> torch.Tensor:
    """d(input) from d(output) and the saved output; see ``fastattn.reference.softmax_bwd``."""
    acc = accumulate_dtype(torch.promote_types(output.dtype, input_dtype))
    return _launch(_softmax_bwd_kernel, [grad_output, output], output.shape, dim, scale,
                   mask, causal, log, input_dtype, acc)
