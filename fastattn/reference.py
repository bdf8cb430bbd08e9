"""The ``torch`` backend: compositions of PyTorch ops that define what every op computes.

Two kinds of function live here:

- The specification (``softmax``, ``log_softmax``, ``cross_entropy``): plain differentiable
  compositions, in the dtype they are given. Run in float64 they are the oracle the tests and
  the benchmark harness compare every backend against; run in a low precision they are
  "PyTorch's error" in the twice-PyTorch's-error rule.
- The launchers of the ``torch`` backend (``softmax_fwd``, ``softmax_bwd``,
  ``cross_entropy_fwd``), with the same signatures as the Triton launchers. They accumulate in
  float32 for 16-bit inputs, as every backend must.

Masking, defined once for every backend: an element is *masked* when a boolean ``mask`` is False
there, an additive ``mask`` is -inf there, or ``causal`` is set and its column index exceeds its
row index (last two dims, aligned top-left). Masked elements get probability 0 and gradient 0.
A row whose elements are all masked gives 0 from ``softmax`` and -inf (the log of those zeros)
from ``log_softmax``. Rows that are not fully masked behave exactly like ``torch.softmax`` on the
unmasked values, NaN and inf included.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "mean", "sum")  # index = the code passed to the registered ops


def accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; every other float type accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def row_output(shape, dim: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The output buffer of a row-wise op reducing along ``dim``: contiguous with ``dim`` moved
    last, viewed back in the input's dim order (plain contiguous when ``dim`` is the last dim),
    so every backend and the fake function agree on strides and kernels write rows densely.
    ``dim`` may be negative."""
    dim = dim % len(shape) if len(shape) else 0
    if dim == len(shape) - 1 or len(shape) == 0:  # the common case, without movedim's cost
        return torch.empty(shape, dtype=dtype, device=device)
    moved = list(shape[:dim]) + list(shape[dim + 1 :]) + [shape[dim]]
    return torch.empty(moved, dtype=dtype, device=device).movedim(-1, dim)


def keep_mask(
    shape: torch.Size, mask: torch.Tensor | None, causal: bool, device: torch.device
) -> torch.Tensor | None:
    """Boolean tensor broadcastable to ``shape``: True where an element takes part."""
    keep = None
    if mask is not None:
        keep = mask if mask.dtype == torch.bool else mask != float("-inf")
    if causal:
        rows, cols = shape[-2], shape[-1]
        tri = torch.ones(rows, cols, dtype=torch.bool, device=device).tril()  # (L, S)
        keep = tri if keep is None else keep & tri
    return keep


def _softmax_spec(input, dim, dtype, scale, mask, causal, log):
    out_dtype = input.dtype if dtype is None else dtype
    z = input if dtype is None else input.to(dtype)
    if scale is not None:
        z = z * scale
    if mask is not None and mask.dtype != torch.bool:
        z = z + mask
    keep = keep_mask(z.shape, mask, causal, z.device)
    if keep is None:
        y = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
        return y.to(out_dtype)
    z = z.masked_fill(~keep, float("-inf"))
    y = torch.log_softmax(z, dim) if log else torch.softmax(z, dim)
    dead = ~keep.expand(z.shape).any(dim, keepdim=True)
    y = y.masked_fill(dead, float("-inf") if log else 0.0)
    return y.to(out_dtype)


def softmax(input, dim=-1, dtype=None, *, scale=None, mask=None, causal=False):
    """Specification of :func:`fastattn.softmax`: softmax(mask(input * scale)) along ``dim``."""
    return _softmax_spec(input, dim, dtype, scale, mask, causal, log=False)


def log_softmax(input, dim=-1, dtype=None, *, scale=None, mask=None, causal=False):
    """Specification of :func:`fastattn.log_softmax`."""
    return _softmax_spec(input, dim, dtype, scale, mask, causal, log=True)


def softmax_fwd(input, dim, scale, mask, causal, log, out_dtype):
    """torch-backend launcher: the specification run in the accumulation dtype."""
    acc = accumulate_dtype(torch.promote_types(input.dtype, out_dtype))
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(acc)
    y = _softmax_spec(input.to(acc), dim, None, scale, mask, causal, log)
    return row_output(y.shape, dim, out_dtype, y.device).copy_(y)


def softmax_bwd(grad_output, output, dim, scale, mask, causal, log, input_dtype):
    """torch-backend launcher: d(input) from d(output) and the saved output."""
    acc = accumulate_dtype(torch.promote_types(output.dtype, input_dtype))
    y, g = output.to(acc), grad_output.to(acc)
    # PyTorch's own backward kernels (g - exp(y) sum(g), y (g - sum(g y))): the torch backend
    # is PyTorch to the last bit, sums included. A torch.sum here is more accurate than
    # PyTorch's row sum, but at 70001 columns PyTorch's rounding now and then cancels the
    # forward's error in lse, and the twice-PyTorch's-error rule then fails a better sum.
    if log:
        gz = torch._log_softmax_backward_data(g, y, dim, acc)
    else:
        gz = torch._softmax_backward_data(g, y, dim, acc)
    keep = keep_mask(y.shape, mask, causal, y.device)
    if keep is not None:
        gz = gz.masked_fill(~keep, 0.0)
    return row_output(gz.shape, dim, input_dtype, gz.device).copy_(gz * scale)


def apply_softcap(logits: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """``softcap * tanh(logits / softcap)``; the identity when softcap is None or 0."""
    if not softcap:
        return logits
    return softcap * torch.tanh(logits / softcap)


def _valid_tokens(target: torch.Tensor, ignore_index: int, probability: bool) -> torch.Tensor:
    if probability:
        batch = target.shape[:1] + target.shape[2:]
        return torch.ones(batch, dtype=torch.bool, device=target.device)
    return target != ignore_index


def class_index_error(value: int, num_classes: int, ignore_index: int) -> IndexError:
    """The error for a class index outside [0, C) that is not ``ignore_index``."""
    return IndexError(f"target holds class index {value}, outside [0, {num_classes}) and not "
                      f"ignore_index={ignore_index}")


def cross_entropy_denominator(target, weight, ignore_index, num_classes, probability, dtype):
    """What ``reduction="mean"`` divides the summed loss by, as a 0-dim tensor of ``dtype``
    (the accumulation dtype: float64 for float64 logits, as PyTorch's total weight, else float32).

    Class indices: the sum of the target classes' weights over non-ignored tokens (their count
    without ``weight``). Probability targets: the number of tokens. 0 gives NaN, as in PyTorch.
    """
    if probability:
        return torch.tensor(float(target.numel() // max(num_classes, 1)), dtype=dtype,
                            device=target.device)
    valid = target != ignore_index
    if weight is None:
        return valid.sum().to(dtype)
    picked = weight.to(dtype)[target.clamp(0, num_classes - 1).long()]
    return torch.where(valid, picked, 0.0).sum()


def cross_entropy(
    input,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    *,
    z_loss=0.0,
    softcap=None,
    return_lse=False,
):
    """Specification of :func:`fastattn.cross_entropy`.

    ``F.cross_entropy`` on the soft-capped logits, plus ``z_loss * lse**2`` for every
    non-ignored token, reduced as PyTorch reduces (``mean`` divides by the target weights).
    """
    class_dim = 1 if input.ndim > 1 else 0
    probability = target.is_floating_point()
    logits = apply_softcap(input, softcap)
    loss = F.cross_entropy(
        logits, target, weight, ignore_index=ignore_index, reduction="none",
        label_smoothing=label_smoothing,
    )
    lse = torch.logsumexp(logits, dim=class_dim)
    if z_loss:
        if input.ndim == 1:
            valid = torch.tensor(probability or int(target) != ignore_index, device=input.device)
        else:
            valid = _valid_tokens(target, ignore_index, probability)
        loss = loss + torch.where(valid, z_loss * lse * lse, 0.0)
    if reduction == "sum":
        loss = loss.sum()
    elif reduction == "mean":
        num_classes = input.shape[class_dim]
        tgt = target.reshape(1, *target.shape) if input.ndim == 1 else target
        denom = cross_entropy_denominator(tgt, weight, ignore_index, num_classes, probability,
                                          accumulate_dtype(input.dtype))
        loss = loss.sum() / denom.to(loss.dtype)
    return (loss, lse) if return_lse else loss


def _class_view(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A ``(C,)`` vector shaped to broadcast along dim 1 of an ``ndim``-d input."""
    return v.view([1, -1] + [1] * (ndim - 2))


def cross_entropy_fwd(
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, grad
):
    """torch-backend launcher: (loss, lse) and, when ``grad`` is a tensor, d(loss)/d(input) for
    a unit upstream gradient written into it (which may be ``input`` itself).

    ``input`` is ``(N, C, d1, ...)``, ``reduction`` an index into ``REDUCTIONS``. The gradient
    is written out by formula rather than by autograd, so the Triton kernel and this launcher
    are both checked against autograd of the specification. With ``u`` the soft-capped logits,
    ``p = softmax(u)``, ``w`` the class weights and ``eps`` the smoothing, per token:

    - class index ``y``: ``loss = (1-eps) w_y (lse - u_y) + eps/C sum_c w_c (lse - u_c)``,
      ``dloss/du_c = p_c ((1-eps) w_y + eps/C sum(w)) - (1-eps) w_y [c=y] - eps/C w_c``;
    - probabilities ``t``, ``t' = (1-eps) t + eps/C``: ``loss = sum_c w_c t'_c (lse - u_c)``,
      ``dloss/du_c = p_c sum(w t') - w_c t'_c``;

    plus ``z lse^2`` in the loss and ``2 z lse p_c`` in the gradient, then the soft-cap chain
    rule ``1 - (u / softcap)^2``; ignored tokens give 0 for both.
    """
    acc = accumulate_dtype(input.dtype)
    ndim, num_classes = input.ndim, input.shape[1]
    u = apply_softcap(input.to(acc), softcap)
    lse = torch.logsumexp(u, 1)  # (N, d1, ...)
    logp = torch.log_softmax(u, 1)  # max-shifted: u - lse would cancel digits when |u| is large
    if weight is None:
        w = torch.ones(num_classes, dtype=acc, device=input.device)
    else:
        w = weight.to(acc)
    wb = _class_view(w, ndim)
    eps = label_smoothing
    if target.is_floating_point():
        valid = torch.ones_like(lse, dtype=torch.bool)
        wt = (target.to(acc) * (1.0 - eps) + eps / num_classes) * wb
        loss = -(logp * wt).sum(1)
        coef = wt.sum(1)
    else:
        valid = target != ignore_index
        safe = torch.where(valid, target, 0).long().unsqueeze(1)  # (N, 1, d1, ...)
        wy = w[safe.squeeze(1)]
        loss = -(1.0 - eps) * wy * logp.gather(1, safe).squeeze(1)
        if eps:
            loss = loss - eps / num_classes * (logp * wb).sum(1)
        coef = (1.0 - eps) * wy + eps / num_classes * w.sum()
    if z_loss:
        loss = loss + z_loss * lse * lse
    loss = torch.where(valid, loss, 0.0)
    denom = None
    if reduction == 1:
        denom = cross_entropy_denominator(target, weight, ignore_index, num_classes,
                                          target.is_floating_point(), acc)
        loss_out = loss.sum() / denom
    else:
        loss_out = loss.sum() if reduction == 2 else loss
    if grad is not None:
        g = logp.exp() * (coef + 2.0 * z_loss * lse).unsqueeze(1)
        if target.is_floating_point():
            g = g - wt
        else:
            onehot = torch.zeros_like(g).scatter_(1, safe, 1.0)
            g = g - (1.0 - eps) * wy.unsqueeze(1) * onehot - eps / num_classes * wb
        if softcap:
            g = g * (1.0 - (u / softcap) ** 2)
        if denom is not None:
            g = g / denom
        grad.copy_(torch.where(valid.unsqueeze(1), g, 0.0))
    return loss_out, lse.float()


def cross_entropy_target_grad(input, weight, label_smoothing, softcap):
    """d(per-token loss)/d(target) for probability targets: ``-(1 - eps) * w_c * log p_c``."""
    class_dim = 1 if input.ndim > 1 else 0
    acc = accumulate_dtype(input.dtype)
    logp = torch.log_softmax(apply_softcap(input.to(acc), softcap), class_dim)
    g = -(1.0 - label_smoothing) * logp
    if weight is not None:
        shape = [1] * input.ndim
        shape[class_dim] = -1
        g = g * weight.to(acc).view(shape)
    return g


# --- attention -------------------------------------------------------------------------------
#
# Every backend sees attention in one normalised form: q (B, Hq, L, D), k (B, Hk, S, D),
# v (B, Hk, S, Dv) with any strides, Hq a multiple of Hk (query head h reads key/value head
# h // (Hq // Hk)), an optional mask already broadcast (as a view) to (B, Hq, L, S), and the
# positional masking as a window: query i sees key j when
#     i + offset - left <= j <= i + offset + right,
# where offset is 0 (aligned top-left, SDPA's causal) or S - L (aligned bottom-right,
# flash-attn's causal) and -1 leaves a side unbounded. Causal attention is right = 0.


def window_keep(
    L: int, S: int, left: int, right: int, align_bottom: bool, device: torch.device
) -> torch.Tensor | None:
    """(L, S) bool: True where query i may see key j under the window; None when unbounded."""
    if left < 0 and right < 0:
        return None
    offset = S - L if align_bottom else 0
    i = torch.arange(L, device=device).unsqueeze(1)  # (L, 1)
    j = torch.arange(S, device=device).unsqueeze(0)  # (1, S)
    keep = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i + offset - left
    if right >= 0:
        keep &= j <= i + offset + right
    return keep


def attention_output(q: torch.Tensor, value_dim: int, dtype: torch.dtype) -> torch.Tensor:
    """The output buffer (B, Hq, L, Dv) for a normalised ``q``: laid out (B, L, Hq, Dv) in
    memory when ``q`` is (flash-attn's layout, heads inside tokens), else contiguous, so that
    ``flash_attn_func`` returns a contiguous (B, L, H, Dv) tensor with no copy."""
    B, H, L, _ = q.shape
    if H > 1 and L > 1 and q.stride(1) < q.stride(2):
        return torch.empty(B, L, H, value_dim, dtype=dtype, device=q.device).transpose(1, 2)
    return torch.empty(B, H, L, value_dim, dtype=dtype, device=q.device)


def attention(
    q,
    k,
    v,
    attn_mask=None,
    dropout_keep=None,
    dropout_p=0.0,
    scale=None,
    window=(-1, -1),
    align_bottom=False,
    softcap=0.0,
):
    """Specification of attention in the normalised form (see above), differentiable.

    ``scores = q k^T * scale`` (``scale`` defaults to 1/sqrt(D)), soft-capped to
    ``softcap * tanh(scores / softcap)`` when ``softcap`` > 0, plus an additive ``attn_mask``
    (or masked where a bool ``attn_mask`` is False, or outside the window); softmax over keys;
    a query row with every key masked gives probabilities 0 (so output 0, gradients 0). With
    ``dropout_keep`` (bool, broadcastable to (B, Hq, L, S)) the probabilities are multiplied by
    ``dropout_keep / (1 - dropout_p)`` before they weight the values.
    """
    s = attention_scores(q, k, attn_mask, scale, window, align_bottom, softcap)
    return _attend(s, v, dropout_keep, dropout_p)


def attention_scores(q, k, attn_mask, scale, window, align_bottom, softcap):
    """(B, Hq, L, S) scores of the specification: scaled, soft-capped, masked (-inf)."""
    k = _repeat_heads(k, q.shape[-3])  # GQA/MQA: (B, Hq, S, D)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = apply_softcap(q @ k.transpose(-2, -1) * scale, softcap)  # (B, Hq, L, S)
    keep = window_keep(s.shape[-2], s.shape[-1], window[0], window[1], align_bottom, s.device)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        keep = attn_mask if keep is None else keep & attn_mask
    elif attn_mask is not None:
        s = s + attn_mask
    return s if keep is None else s.masked_fill(~keep, float("-inf"))


def _repeat_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hk, N, E) -> (B, heads, N, E): each key/value head serves heads // Hk query heads."""
    return t if t.shape[-3] == heads else t.repeat_interleave(heads // t.shape[-3], dim=-3)


def _probs(s: torch.Tensor) -> torch.Tensor:
    """Softmax over keys of masked scores; rows with every key masked give 0, not NaN."""
    dead = (s == float("-inf")).all(-1, keepdim=True)  # (B, Hq, L, 1): no key left to attend
    return torch.softmax(s.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)


def _attend(s, v, dropout_keep, dropout_p):
    p = _probs(s)
    if dropout_keep is not None:
        p = p * dropout_keep / (1.0 - dropout_p)
    return p @ _repeat_heads(v, s.shape[-3])  # (B, Hq, L, Dv)


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """torch backend's dropout mask: bool ``shape``, True with probability 1 - dropout_p, drawn
    from a generator seeded with ``seed`` (forward and backward draw the same mask)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed.item()))
    return torch.rand(shape, generator=gen, device=device) >= dropout_p


def _attention_spec_args(q, k, mask, seed, dropout_p, acc):
    keep = None
    if dropout_p > 0:
        keep = dropout_mask(seed, (q.shape[0], q.shape[1], q.shape[2], k.shape[2]), dropout_p,
                            q.device)
    if mask is not None and mask.dtype != torch.bool:
        mask = mask.to(acc)
    return keep, mask


def attention_fwd(q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom, softcap):
    """torch-backend launcher: (out (B, Hq, L, Dv) in q's dtype, lse (B, Hq, L) float32).

    ``lse`` is the log-sum-exp of each row's scores after masking (before dropout); -inf for a
    fully masked row."""
    acc = accumulate_dtype(q.dtype)
    keep, mask = _attention_spec_args(q, k, mask, seed, dropout_p, acc)
    s = attention_scores(q.to(acc), k.to(acc), mask, scale, (left, right), align_bottom, softcap)
    o = _attend(s, v.to(acc), keep, dropout_p)
    lse = torch.logsumexp(s, -1).float()  # (B, Hq, L)
    return attention_output(q, v.shape[-1], q.dtype).copy_(o), lse


def _sum_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, Hq, N, E) -> (B, heads, N, E): the sum over the query heads sharing a K/V head."""
    B, Hq, N, E = t.shape
    return t.view(B, heads, Hq // heads, N, E).sum(2)


def attention_bwd(grad_out, q, k, v, out, lse, mask, seed, dropout_p, scale, left, right,
                  align_bottom, softcap, deterministic, mask_grad):
    """torch-backend launcher: (dq, dk, dv, dmask) in the accumulation dtype, by formula (the
    one the kernels implement, checked against autograd of the specification by the tests).
    With p the probabilities, P = p * keep / (1 - dropout_p) and g = grad_out:
    dv = P^T g, dP = (g v^T) * keep / (1 - dropout_p), ds = p (dP - rowsum(p dP)) (the
    additive mask's gradient), dq = scale (ds c) k, dk = scale (ds c)^T q, with
    c = 1 - tanh^2 under softcap. ``dmask`` is (B, Hq, L, S) in the accumulation dtype
    when ``mask_grad``."""
    acc = accumulate_dtype(q.dtype)
    keep, mask = _attention_spec_args(q, k, mask, seed, dropout_p, acc)
    Hq, Hk = q.shape[1], k.shape[1]
    qa, g = q.to(acc), grad_out.to(acc)
    ka, va = _repeat_heads(k.to(acc), Hq), _repeat_heads(v.to(acc), Hq)  # (B, Hq, S, E)
    s = attention_scores(qa, ka, mask, scale, (left, right), align_bottom, softcap)
    p = _probs(s)  # (B, Hq, L, S)
    dp = g @ va.transpose(-2, -1)
    if keep is not None:
        dp = dp * keep / (1.0 - dropout_p)
        dv = (p * keep / (1.0 - dropout_p)).transpose(-2, -1) @ g
    else:
        dv = p.transpose(-2, -1) @ g
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dmask = ds if mask_grad else q.new_empty(0, dtype=acc)  # float64 stays float64
    if softcap:
        ds = ds * (1.0 - torch.tanh(qa @ ka.transpose(-2, -1) * (scale / softcap)) ** 2)
    dq = ds @ ka * scale
    dk = _sum_heads(ds.transpose(-2, -1) @ qa * scale, Hk)
    dv = _sum_heads(dv, Hk)
    dq, dk, dv = (torch.empty_like(t).copy_(d) for t, d in ((q, dq), (k, dk), (v, dv)))
    return dq, dk, dv, dmask
