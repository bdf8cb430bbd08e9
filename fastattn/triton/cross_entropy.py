"""Fused cross-entropy forward (+ gradient) in Triton: loss, log-sum-exp and d(loss)/d(logits).

What it computes, per token (a row of ``C`` class logits ``x``; ``w`` the class weights, 1
without ``weight``, ``W = sum_c w_c``; ``eps`` the label smoothing; ``z`` the z-loss coefficient):

    u_c   = softcap * tanh(x_c / softcap)                  (u = x when softcap is off)
    m     = max_c u_c,  s = sum_c exp(u_c - m),  lse = m + log(s),  -log p_c = (m - u_c) + log(s)
    class index y:
      loss  = (1-eps) w_y (-log p_y) + eps/C sum_c w_c (-log p_c) + z lse^2
      dl/du = p_c ((1-eps) w_y + eps/C W + 2 z lse) - (1-eps) w_y [c=y] - eps/C w_c
    probabilities t, t'_c = (1-eps) t_c + eps/C:
      loss  = sum_c w_c t'_c (-log p_c) + z lse^2
      dl/du = p_c (sum_c w_c t'_c + 2 z lse) - w_c t'_c
    grad_c = dl/du_c * (1 - (u_c / softcap)^2 if softcap) * (1 / denominator if mean)

Tokens whose class index equals ``ignore_index`` get loss 0 and gradient 0 (selected, never
multiplied by 0, so inf/NaN in an ignored row cannot leak). The semantics are exactly those of
``fastattn.reference.cross_entropy_fwd``, the oracle this kernel is tested against: ``lse`` as
``torch.logsumexp`` (-inf for a row of -inf, +inf with a +inf logit), loss and gradient as
``torch.log_softmax`` (NaN for a row holding NaN or +inf, or of only -inf), ``mean`` over
nothing NaN.

Shapes and layout: ``input`` is ``(N, C, d1, ...)`` with any strides and dtype fp16 / bf16 / fp32
/ fp64. The launcher moves the class dim last (a view) and addresses tokens through
``fastattn.triton.layout`` (three leading dims with per-tensor strides), so neither a class dim in
the middle nor a transposed input is copied. Class-index targets ``(N, d1, ...)`` get a trailing
size-1 dim; probability targets and ``grad`` are laid out like ``input``; ``grad`` may be
``input`` itself (in-place backward). Per-token ``loss`` (accumulation dtype: fp64 for fp64,
else fp32) and ``lse`` (fp32) are written densely, one element per program; ``mean`` and ``sum``
are reduced on the host side with torch ops afterwards.

Algorithm: one program per token. Pass 1 sweeps the row in chunks of ``BLOCK`` columns with the
online log-sum-exp (running max ``m``, running sum ``s`` rescaled by ``exp(m_old - m_new)``), so
any vocabulary size runs at the same per-element cost. Log-probabilities stay max-shifted as in
``torch.log_softmax`` (``u - lse`` would cancel digits when ``|u|`` is large): alongside ``s`` pass
1 accumulates ``sum v`` and ``sum v (m - u)`` with ``v = w`` (smoothing) or ``v = w t'``
(probability targets), every term >= 0, adding ``sum v * (m_new - m_old)`` when the max moves.
The target logit is one scalar load. The max used in exponents is 0 while the running max is not
finite, so a leading all -inf chunk cannot make NaN. Pass 2 (only when a gradient is wanted)
re-reads the row chunk by chunk and writes the gradient. Rows of at most ``layout.MAX_SINGLE``
columns are held in registers and both the loss and the gradient come from one load. Accumulation is
fp32 for 16-bit and fp32 inputs and fp64 for fp64; float scalars reach the kernel as fp32 hi + lo
pairs so fp64 keeps (nearly) full precision. ``tanh`` is written with ``exp`` (a Pade approximant
near 0, < 2 ulp) because libdevice is not available in the interpreter the CPU tests use.

Bytes moved per token of C classes (``b`` bytes per logit): rows of at most ``layout.MAX_SINGLE``
columns read the logits once (``C b``) and write the gradient once (``C b``); longer rows read the
logits twice, the second sweep served from L2 only while the rows in flight fit there (short
rows), otherwise from memory. Probability targets are read like the logits; the weight vector is
shared by all rows and read from L2. Plus 4 or 8 bytes of loss, 4 of lse, one target index.

Not done yet: ``BLOCK`` and ``num_warps`` are picked from the row length, not tuned on a GPU;
rows shorter than a warp waste lanes (one row per program); the softcap ``tanh`` costs about a
dozen FLOPs per element and is not tuned either. Not supported: ``C == 0`` (rejected by
``fastattn.functional``); a gradient for probability targets (computed by the autograd layer).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from fastattn.reference import accumulate_dtype, cross_entropy_denominator
from fastattn.triton.layout import (
    join_float,
    narrow,
    row_config,
    row_indices,
    row_layout,
    row_offset,
    split_float,
    tanh,
    tl_accumulate,
)


@triton.jit
def _load_chunk(x_row, t_row, w_ptr, c, C, sxc, stc, swc, one_m_eps, eps_c, cap,
                HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr, SMOOTH: tl.constexpr,
                SOFTCAP: tl.constexpr, ACC: tl.constexpr):
    """Soft-capped logits ``u``, weights ``w`` and, for probability targets, ``w t'``."""
    inb = c < C
    u = tl.load(x_row + c * sxc, mask=inb, other=0.0).to(ACC)
    if SOFTCAP:
        u = cap * tanh(u / cap)
    # -inf past the row end: it neither wins the max nor adds to the sum (softcap would have
    # turned a -inf fill value into -cap, hence the select after capping).
    u = tl.where(inb, u, float("-inf"))
    if HAS_WEIGHT:
        w = tl.load(w_ptr + c * swc, mask=inb, other=0.0).to(ACC)
    else:
        w = tl.where(inb, 1.0, 0.0).to(ACC)
    wt = w
    if PROB:
        t = tl.load(t_row + c * stc, mask=inb, other=0.0).to(ACC)
        if SMOOTH:
            t = t * one_m_eps + eps_c
        if HAS_WEIGHT:
            t = w * t
        wt = tl.where(inb, t, 0.0)
    return u, w, wt


@triton.jit
def _safe_max(m):
    # exp(u - m) is NaN when m is +-inf and u == m; 0 keeps -inf rows at s = 0 (lse = -inf)
    # and makes a +inf logit give s = inf (lse = +inf, as torch.logsumexp).
    return tl.where(tl.abs(m) == float("inf"), 0.0, m)


@triton.jit
def _grad_chunk(u, w, wt, c, C, y, m_safe, log_s, coef, wy_hard, eps_c, cap, scale, valid,
                PROB: tl.constexpr, SMOOTH: tl.constexpr, SOFTCAP: tl.constexpr):
    g = tl.exp((u - m_safe) - log_s) * coef
    if PROB:
        g = g - wt
    else:
        g = g - tl.where(c == y, wy_hard, 0.0)
        if SMOOTH:
            g = g - eps_c * w
    if SOFTCAP:
        # Past the row end u is the -inf fill (never stored); keep it out of 0 * inf.
        r = tl.where(c < C, u / cap, 0.0)
        g = g * (1.0 - r * r)
    # Selected, not multiplied: an ignored row may hold inf/NaN.
    return tl.where(valid, g * scale, 0.0)


@triton.jit
def _cross_entropy_fwd_kernel(
    x_ptr, t_ptr, w_ptr, g_ptr, loss_ptr, lse_ptr, inv_denom_ptr,
    n1, n2, C,
    sx0, sx1, sx2, sxc, st0, st1, st2, stc, sg0, sg1, sg2, sgc, swc,
    ignore_index,
    one_m_eps_hi, one_m_eps_lo, eps_c_hi, eps_c_lo, z_hi, z_lo, cap_hi, cap_lo,
    HAS_WEIGHT: tl.constexpr, PROB: tl.constexpr, SMOOTH: tl.constexpr,
    SOFTCAP: tl.constexpr, ZLOSS: tl.constexpr, GRAD: tl.constexpr, MEAN: tl.constexpr,
    SINGLE: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr,
):
    i0, i1, i2 = row_indices(n1, n2)
    x_row = x_ptr + row_offset(i0, i1, i2, sx0, sx1, sx2)
    t_row = t_ptr + row_offset(i0, i1, i2, st0, st1, st2)
    g_row = g_ptr + row_offset(i0, i1, i2, sg0, sg1, sg2)
    one_m_eps = join_float(one_m_eps_hi, one_m_eps_lo, ACC)
    eps_c = join_float(eps_c_hi, eps_c_lo, ACC)
    cap = join_float(cap_hi, cap_lo, ACC)
    # 64-bit column offsets: rows * C exceeds 2**31 elements in real training.
    cols = tl.arange(0, BLOCK).to(tl.int64)

    if PROB:
        valid = tl.full((), 1, tl.int1)
        y = tl.full((), -1, tl.int64)
        u_y = tl.zeros((), ACC)
        w_y = tl.zeros((), ACC)
    else:
        y = tl.load(t_row).to(tl.int64)
        valid = y != ignore_index
        # An ignored token may hold any value: read class 0 instead, never out of bounds.
        y = tl.where(valid, y, 0)
        u_y = tl.load(x_row + y * sxc, mask=valid, other=0.0).to(ACC)
        if SOFTCAP:
            u_y = cap * tanh(u_y / cap)
        if HAS_WEIGHT:
            w_y = tl.load(w_ptr + y * swc, mask=valid, other=0.0).to(ACC)
        else:
            w_y = tl.full((), 1.0, ACC)

    # Every log-probability is kept max-shifted, log p_c = (u_c - m) - log(s), as
    # torch.log_softmax does: u - lse would cancel digits when |u| is large. With v = w (class
    # targets, smoothing) or v = w t' (probabilities) pass 1 sums sum_v = sum v and
    # sum_vd = sum v (m - u), terms >= 0 for weights >= 0; a new running max adds
    # sum_v * (m_new - m_old).
    if SINGLE:
        u, w, wt = _load_chunk(x_row, t_row, w_ptr, cols, C, sxc, stc, swc, one_m_eps, eps_c,
                               cap, HAS_WEIGHT, PROB, SMOOTH, SOFTCAP, ACC)
        m = tl.max(u, 0)
        m_safe = _safe_max(m)
        s = tl.sum(tl.exp(u - m_safe), 0)
        sum_v = tl.zeros((), ACC)
        sum_vd = tl.zeros((), ACC)
        if PROB or SMOOTH:
            v = wt if PROB else w
            sum_v = tl.sum(v, 0)
            # v = 0 past the row end; select the -inf fill away rather than multiply it by 0.
            sum_vd = tl.sum(v * tl.where(cols < C, m_safe - u, 0.0), 0)
    else:
        m = tl.full((), float("-inf"), ACC)
        m_safe = tl.zeros((), ACC)
        s = tl.zeros((), ACC)
        sum_v = tl.zeros((), ACC)
        sum_vd = tl.zeros((), ACC)
        for start in range(0, C, BLOCK):
            c = start + cols
            u, w, wt = _load_chunk(x_row, t_row, w_ptr, c, C, sxc, stc, swc, one_m_eps, eps_c,
                                   cap, HAS_WEIGHT, PROB, SMOOTH, SOFTCAP, ACC)
            m_new = tl.maximum(m, tl.max(u, 0))
            m_safe_new = _safe_max(m_new)
            s = s * tl.exp(m - m_safe_new) + tl.sum(tl.exp(u - m_safe_new), 0)
            if PROB or SMOOTH:
                v = wt if PROB else w
                sum_vd += sum_v * (m_safe_new - m_safe)
                sum_vd += tl.sum(v * tl.where(c < C, m_safe_new - u, 0.0), 0)
                sum_v += tl.sum(v, 0)
            m = m_new
            m_safe = m_safe_new
    log_s = tl.log(s)
    # torch.logsumexp semantics for lse (-inf for an all -inf row, +inf with a +inf logit), but
    # torch.log_softmax semantics for loss and gradient: NaN when the max is not finite.
    lse = m_safe + log_s
    log_s = tl.where(tl.abs(m) == float("inf"), float("nan"), log_s)

    z = join_float(z_hi, z_lo, ACC)
    if PROB:
        loss = sum_vd + sum_v * log_s
        coef = sum_v
        wy_hard = tl.zeros((), ACC)
    else:
        wy_hard = one_m_eps * w_y
        loss = wy_hard * ((m_safe - u_y) + log_s)
        coef = wy_hard
        if SMOOTH:
            loss += eps_c * (sum_vd + sum_v * log_s)
            coef += eps_c * sum_v
    if ZLOSS:
        loss += z * lse * lse
        coef += 2.0 * z * lse
    pid = tl.program_id(0).to(tl.int64)
    tl.store(loss_ptr + pid, tl.where(valid, loss, 0.0))
    tl.store(lse_ptr + pid, lse.to(tl.float32))

    if GRAD:
        if MEAN:
            scale = tl.load(inv_denom_ptr).to(ACC)
        else:
            scale = tl.full((), 1.0, ACC)
        if SINGLE:
            g = _grad_chunk(u, w, wt, cols, C, y, m_safe, log_s, coef, wy_hard, eps_c, cap, scale,
                            valid, PROB, SMOOTH, SOFTCAP)
            tl.store(g_row + cols * sgc, narrow(g, g_ptr.dtype.element_ty), mask=cols < C)
        else:
            # In-place mode (g_row == x_row) is safe: pass 1 has read the whole row, and each
            # chunk below is read before it is overwritten.
            for start in range(0, C, BLOCK):
                c = start + cols
                u, w, wt = _load_chunk(x_row, t_row, w_ptr, c, C, sxc, stc, swc, one_m_eps,
                                       eps_c, cap, HAS_WEIGHT, PROB, SMOOTH, SOFTCAP, ACC)
                g = _grad_chunk(u, w, wt, c, C, y, m_safe, log_s, coef, wy_hard, eps_c, cap, scale,
                                valid, PROB, SMOOTH, SOFTCAP)
                tl.store(g_row + c * sgc, narrow(g, g_ptr.dtype.element_ty), mask=c < C)


def cross_entropy_fwd(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) and, when ``grad`` is a tensor, d(loss)/d(input) for a unit upstream gradient
    written into it (``grad`` may be ``input`` itself). Same contract as
    ``fastattn.reference.cross_entropy_fwd``; arguments already checked, ``reduction`` an index
    into ``fastattn.reference.REDUCTIONS``, ``softcap`` 0.0 when off."""
    acc = accumulate_dtype(input.dtype)
    num_classes = input.shape[1]
    token_shape = input.shape[:1] + input.shape[2:]  # (N, d1, ...)
    num_rows = math.prod(token_shape)
    probability = target.is_floating_point()
    loss = torch.empty(num_rows, dtype=acc, device=input.device)
    lse = torch.empty(num_rows, dtype=torch.float32, device=input.device)
    denom = None
    if reduction == 1 and probability:
        # The token count, filled on the device: a host scalar copied over would sync.
        denom = torch.full((), float(num_rows), dtype=acc, device=input.device)
    elif reduction == 1:
        # Before the launch, on the device: the gradient is divided by it too. No host sync.
        denom = cross_entropy_denominator(target, weight, ignore_index, num_classes,
                                          probability, acc)
    if num_rows > 0:
        x = input.movedim(1, -1)  # (N, d1, ..., C)
        t = target.movedim(1, -1) if probability else target.unsqueeze(-1)  # (N, d1, ..., C | 1)
        g = None if grad is None else grad.movedim(1, -1)  # (N, d1, ..., C)
        sizes, (xk, tk, gk), strides, cols = row_layout(x.shape, [x, t, g])
        block, single, num_warps = row_config(num_classes, input.dtype)
        inv_denom = None if denom is None else (1.0 / denom).reshape(1)
        w = weight
        _cross_entropy_fwd_kernel[(num_rows,)](
            xk, tk, xk if w is None else w, xk if gk is None else gk, loss, lse,
            loss if inv_denom is None else inv_denom,
            sizes[1], sizes[2], num_classes,
            *strides[0], cols[0], *strides[1], cols[1], *strides[2], cols[2],
            0 if w is None else w.stride(0),
            ignore_index,
            *split_float(1.0 - label_smoothing), *split_float(label_smoothing / num_classes),
            *split_float(z_loss), *split_float(softcap or 1.0),
            HAS_WEIGHT=w is not None, PROB=probability, SMOOTH=label_smoothing > 0,
            SOFTCAP=bool(softcap), ZLOSS=z_loss > 0, GRAD=grad is not None,
            MEAN=denom is not None, SINGLE=single, BLOCK=block,
            ACC=tl_accumulate(acc), num_warps=num_warps,
        )
        if gk is not None and gk is not g:
            g.copy_(gk)  # row_layout had to materialise a contiguous copy
    if reduction == 0:
        loss_out = loss.view(token_shape)
    elif reduction == 2:
        loss_out = loss.sum()
    else:
        loss_out = loss.sum() / denom
    return loss_out, lse.view(token_shape)
