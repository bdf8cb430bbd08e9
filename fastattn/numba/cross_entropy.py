"""Cross-entropy with its gradient written in the same pass, in Numba.

What it computes, per token (row of C logits x), with u = softcap * tanh(x / softcap) (u = x
without softcap), lse = log sum_c exp(u_c), p = exp(u - lse), w the class weights (1 without),
eps the label smoothing (``fastattn.reference.cross_entropy_fwd`` derives these):

    class index y:   loss = (1-eps) w_y (lse - u_y) + eps/C sum_c w_c (lse - u_c) + z lse^2
                     dloss/du_c = p_c ((1-eps) w_y + eps/C sum(w) + 2 z lse)
                                  - (1-eps) w_y [c = y] - eps/C w_c
    probabilities t: t' = (1-eps) t + eps/C,  loss = sum_c w_c t'_c (lse - u_c) + z lse^2
                     dloss/du_c = p_c (sum(w t') + 2 z lse) - w_c t'_c

then dloss/dx = dloss/du (1 - (u / softcap)^2) under softcap, divided by the ``mean``
denominator (the summed target weights) when reducing by mean; ignored tokens give 0 loss and
0 gradient. (lse - u_c) is computed as log(s) - (u_c - m) with m the row max: u_c - m is
exact, so logits of 1e4 keep their digits.

Shapes: input (N, C, d1, ...) is viewed as (rows, C) with classes last (a view for (N, C)
inputs, one copy otherwise); loss (rows,) is reduced by torch (O(rows)); lse (rows,) float32;
the gradient goes straight into ``grad`` when it is laid out as those rows in the accumulation
dtype -- including ``grad is input``, the in-place backward: each row reads its logits before
it overwrites them -- else through one buffer.

Algorithm: one prange task per row, three sweeps: max, sum of exp (and the smoothing and
probability-target sums), gradient. In the plain case (class indices, no weight, smoothing or
softcap) the sum sweep also stores exp(x - m) in the gradient row and the gradient sweep only
scales it, so a logit costs one exp, not two. The logits are read from memory once (a row of a 128k
vocabulary is 512 KB of float32, which stays in L2 between sweeps) and the gradient written
once. 16-bit logits are converted to float32 by the launcher (one extra read and write).

Not supported: anything but CPU tensors.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch
from numba import prange

from fastattn.numba.common import (
    JIT,
    LAUNCH_LOCK,
    array,
    cast,
    exp_sum,
    fexp,
    last,
    np_dtype,
    row_max,
    rows,
    scaled_exp_store_sum,
)
from fastattn.reference import accumulate_dtype, class_index_error


@numba.njit(**JIT)
def _cross_entropy_fwd_kernel(x, target, probs, weight, prob_target, has_weight, ignore_index,
                              eps, z_loss, softcap, weight_sum, denom, loss, lse, grad,
                              write_grad):
    n_rows, C = x.shape
    ninf = cast(-math.inf, x)
    zero = cast(0.0, x)
    one = cast(1.0, x)
    smooth = eps / cast(C, x)
    for r in prange(n_rows):
        xr = x[r]
        y = 0
        valid = True
        if not prob_target:
            y = target[r]
            valid = y != ignore_index
        m = row_max(xr, C, ninf)
        if softcap > zero:  # tanh is increasing: the max of u is u of the max
            m = softcap * cast(math.tanh(m / softcap), x)
        # read before a gradient written in place (grad is x) overwrites the row
        x_y = xr[y] if valid and not prob_target else zero
        # the plain case stores exp(x - m) in the gradient row while summing it, and the
        # gradient sweep scales it: one exp per logit instead of two
        stored = (write_grad and valid and softcap == zero and not prob_target and not has_weight
                  and eps == zero)
        # sum exp(u - m); with smoothing or probabilities also sum_c w'_c (u_c - m), sum_c w'_c
        s = zero
        wz = zero
        wsum = weight_sum
        if stored:
            s = scaled_exp_store_sum(xr, grad[r], C, one, m)
        elif softcap == zero and not prob_target and (eps == zero or not valid):
            s = exp_sum(xr, C, m)
        else:  # a scalar loop: float64 sums keep float32 rows of 100k classes accurate
            s64 = wz64 = wsum64 = 0.0
            for c in range(C):
                u = xr[c]
                if softcap > zero:
                    u = softcap * cast(math.tanh(u / softcap), x)
                s64 += fexp(u - m)
                w = weight[c] if has_weight else one
                if prob_target:
                    w = w * ((one - eps) * probs[r, c] + smooth)
                wz64 += w * (u - m)
                wsum64 += w
            s, wz = cast(s64, x), cast(wz64, x)
            if prob_target:
                wsum = cast(wsum64, x)
        log_s = cast(math.log(s), x)
        row_lse = m + log_s
        lse[r] = row_lse
        if not valid:
            loss[r] = zero
            if write_grad:
                g = grad[r]
                for c in range(C):
                    g[c] = zero
            continue
        if prob_target:
            row_loss = wsum * log_s - wz
            coef = wsum
            w_y = zero
        else:
            u_y = x_y
            if softcap > zero:
                u_y = softcap * cast(math.tanh(u_y / softcap), x)
            w_y = weight[y] if has_weight else one
            row_loss = (one - eps) * w_y * (log_s - (u_y - m))
            if eps > zero:
                row_loss += smooth * (weight_sum * log_s - wz)
            coef = (one - eps) * w_y + smooth * weight_sum
        if z_loss > zero:
            row_loss += z_loss * row_lse * row_lse
        loss[r] = row_loss
        if write_grad:
            g = grad[r]
            k = coef + cast(2.0, x) * z_loss * row_lse
            if stored:  # g holds exp(x - m); eps is 0 here
                k_s = k / (denom * s)
                for c in range(C):
                    g[c] = g[c] * k_s
                g[y] = g[y] - w_y / denom
            elif softcap == zero and not prob_target and not has_weight:
                k_d, smooth_d = k / denom, smooth / denom  # one division per row, not per class
                for c in range(C):
                    g[c] = fexp((xr[c] - m) - log_s) * k_d - smooth_d
                g[y] = g[y] - (one - eps) * w_y / denom
            else:
                for c in range(C):
                    u = xr[c]
                    if softcap > zero:
                        u = softcap * cast(math.tanh(u / softcap), x)
                    gc = fexp((u - m) - log_s) * k
                    w = weight[c] if has_weight else one
                    if prob_target:
                        gc -= w * ((one - eps) * probs[r, c] + smooth)
                    else:
                        gc -= smooth * w
                        if c == y:
                            gc -= (one - eps) * w_y
                    if softcap > zero:
                        t = u / softcap
                        gc *= one - t * t
                    g[c] = gc / denom


@numba.njit(cache=True)
def _first_bad_class(target, num_classes, ignore_index):
    """The position of the first class index outside [0, C) that is not ``ignore_index``, or
    -1 (the op's check, ``fastattn.ops.cross_entropy._check_class_indices``, in one loop)."""
    for i in range(target.shape[0]):
        y = target[i]
        if y != ignore_index and (y < 0 or y >= num_classes):
            return i
    return -1


@numba.njit(cache=True)
def _denominator(target, weight, has_weight, ignore_index):
    """The mean's denominator for class indices (``reference.cross_entropy_denominator``): the
    non-ignored tokens' class weights summed in float64 (their count without weight). Indices
    are clamped to the weight's range, as the reference does (the op checked them already)."""
    total = 0.0
    last_class = weight.shape[0] - 1
    for i in range(target.shape[0]):
        y = target[i]
        if y != ignore_index:
            total += weight[min(max(y, 0), last_class)] if has_weight else 1.0
    return total


# Placeholders for the arguments a call does not use (read-only in the kernel).
_EMPTY_ROWS = {t: np.zeros((1, 1), t) for t in (np.float32, np.float64)}
_NO_TARGET = np.zeros(1, np.int64)


def cross_entropy_fwd(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, lse) and, when ``grad`` is a tensor, the gradient written into it; see
    ``fastattn.reference.cross_entropy_fwd`` (same signature and results)."""
    acc = accumulate_dtype(input.dtype)
    np_acc = np_dtype(acc)
    C = input.shape[1]
    batch = input.shape[:1] + input.shape[2:]
    probability = target.is_floating_point()
    x = rows(last(input, 1), acc)  # (rows, C)
    n = x.shape[0]
    loss = np.empty(n, np_acc)
    lse = np.empty(n, np_acc)
    g_moved = None if grad is None else last(grad, 1)  # (N, d1, ..., C)
    direct = g_moved is not None and g_moved.is_contiguous() and grad.dtype == acc
    g_rows = _EMPTY_ROWS[np_acc]
    if g_moved is not None:
        g_rows = array(g_moved.view(n, C)) if direct else np.empty((n, C), np_acc)
    w = None if weight is None else array(weight.to(acc).contiguous())  # (C,)
    if probability:
        probs = array(rows(last(target, 1), acc))  # (rows, C)
        idx = _NO_TARGET
    else:
        probs = _EMPTY_ROWS[np_acc]
        idx = array(target.reshape(-1).long())  # (rows,)
        bad = _first_bad_class(idx, C, ignore_index)
        if bad >= 0:  # before the kernel, which may be about to overwrite the logits
            raise class_index_error(int(idx[bad]), C, ignore_index)
    denom = 1.0
    if reduction == 1:
        no_weight = _EMPTY_ROWS[np_acc][0]
        denom = float(n) if probability else _denominator(
            idx, no_weight if w is None else w, w is not None, ignore_index)
        denom = float(np_acc(denom))  # summed in the accumulation dtype's precision, as torch
    if n:
        weight_sum = float(C) if w is None else float(w.sum(dtype=np.float64))
        with LAUNCH_LOCK:
            _cross_entropy_fwd_kernel(
                array(x), idx, probs, _EMPTY_ROWS[np_acc][0] if w is None else w, probability,
                w is not None, int(ignore_index), np_acc(label_smoothing), np_acc(z_loss),
                np_acc(softcap or 0.0), np_acc(weight_sum), np_acc(denom), loss, lse, g_rows,
                grad is not None)
    if grad is not None and not direct:
        g_moved.copy_(torch.from_numpy(g_rows).view(g_moved.shape))
    loss_t = torch.from_numpy(loss).view(batch)
    if reduction == 2:
        loss_t = loss_t.sum()
    elif reduction == 1:
        loss_t = loss_t.sum() / denom  # a value of acc: the same division as by a tensor
    return loss_t, torch.from_numpy(lse).view(batch).float()
