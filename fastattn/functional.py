"""The public functions: argument checks, docstrings, and one call into ``fastattn.ops``.

Each function takes the arguments of the PyTorch function it replaces, in the same order and
with the same meaning; fastattn's extras are keyword-only and come after them. Every check here
runs before any kernel launches and raises ``TypeError``/``ValueError`` naming the argument.
"""

from __future__ import annotations

import math
import operator

import torch

from fastattn import backends
from fastattn.ops import attention as _attention_ops
from fastattn.ops import cross_entropy as _ce_ops
from fastattn.ops import softmax as _softmax_ops
from fastattn.reference import REDUCTIONS

__all__ = [
    "softmax", "log_softmax", "cross_entropy", "scaled_dot_product_attention", "flash_attn_func",
]

MAX_HEAD_DIM = 256


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float_tensor(name: str, value: object) -> torch.Tensor:
    _check_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def _check_same_device(name: str, value: torch.Tensor, input: torch.Tensor,
                       input_name: str = "input") -> None:
    if value.device != input.device:
        raise ValueError(f"{name} is on {value.device} but {input_name} is on {input.device}; "
                         "they must be on the same device")


def _check_mask(name: str, mask: object, shape: torch.Size | tuple, target: str,
                input: torch.Tensor, input_name: str = "input") -> None:
    """A bool (True = keep) or additive float mask on ``input``'s device that broadcasts to
    ``shape`` (described as ``target`` in the error)."""
    _check_tensor(name, mask)
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise TypeError(f"{name} must be a bool tensor (True = keep) or a floating-point "
                        f"additive tensor, got {mask.dtype}")
    _check_same_device(name, mask, input, input_name)
    try:
        broadcast = torch.broadcast_shapes(mask.shape, shape)
    except RuntimeError:
        broadcast = None
    if broadcast != torch.Size(shape):
        raise ValueError(f"{name} of shape {tuple(mask.shape)} does not broadcast to {target} "
                         f"{tuple(shape)}")


def check_index(name: str, value: object, allowed: str = "an int") -> int:
    """``value`` as a Python int; anything with ``__index__`` but bool is accepted."""
    if isinstance(value, bool) or not hasattr(value, "__index__"):
        raise TypeError(f"{name} must be {allowed}, got {type(value).__name__}")
    return operator.index(value)


def check_reduction(reduction: object) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r} is not allowed; use one of {REDUCTIONS}")
    return reduction


def _check_dim(dim: object, ndim: int) -> int:
    dim = check_index("dim", dim)
    lo, hi = (-1, 0) if ndim == 0 else (-ndim, ndim - 1)
    if not lo <= dim <= hi:
        raise IndexError(f"dim={dim} is out of range for a {ndim}-d input; allowed: [{lo}, {hi}]")
    return dim % max(ndim, 1)


def _check_scale(name: str, value: object, *, positive: bool = False) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float or None, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or (positive and value < 0):
        allowed = "a finite float >= 0" if positive else "a finite float"
        raise ValueError(f"{name}={value} is not allowed; {name} must be {allowed} or None")
    return value


def _softmax(input, dim, dtype, scale, mask, causal, log):
    name = "log_softmax" if log else "softmax"
    _check_float_tensor("input", input)
    dim = _check_dim(dim, input.ndim)
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating-point torch.dtype or None, got {dtype!r}")
    scale = _check_scale("scale", scale)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and (input.ndim < 2 or dim != input.ndim - 1):
        raise ValueError(f"{name}(causal=True) masks the last two dims, so input must have at "
                         f"least 2 dims and dim must be the last one; got a {input.ndim}-d input "
                         f"and dim={dim}")
    if mask is not None:
        _check_mask("mask", mask, input.shape, "the input shape", input)
    out_dtype = input.dtype if dtype is None else dtype
    # PyTorch casts the input to ``dtype`` first. A widening cast is exact, so the kernels read
    # the input as it is and write ``dtype`` (no extra copy); narrowing casts are done here.
    widening = dtype in (torch.float32, torch.float64) and (
        torch.finfo(input.dtype).bits <= torch.finfo(dtype).bits)
    x = input if dtype is None or widening else input.to(dtype)
    backend = backends.select(x.device, "softmax", dtype=x.dtype,
                              size=x.shape[dim] if x.ndim else 1)
    if x.ndim == 0:  # a 0-d tensor is one row of one element
        y = _softmax_ops.softmax(x.reshape(1), 0, scale, mask, causal, log, out_dtype, backend)
        return y.reshape(())
    return _softmax_ops.softmax(x, dim, scale, mask, causal, log, out_dtype, backend)


_SOFTMAX_DOC = """{summary}

    Drop-in for ``torch.{name}(input, dim, dtype)``: same arguments, same results (NaN and inf
    included) when no extra is used. ``dtype`` casts the input before the operation, as in
    PyTorch. 16-bit inputs accumulate in float32; the output has the input's dtype (or ``dtype``).

    Keyword-only extras, fused into the same kernel (Megatron's scale-mask-softmax, for every
    float dtype and any row length):

    - ``scale``: multiply the input by this float first.
    - ``mask``: a bool tensor (True = keep, as in ``scaled_dot_product_attention``) or a float
      tensor added after scaling, broadcastable to the input. An additive -inf masks the element.
      A float mask that requires grad receives its gradient.
    - ``causal``: mask the elements whose column index (last dim) exceeds their row index
      (second-to-last dim), aligned top-left; needs ``dim`` to be the last dim.

    Masked elements get probability 0 and gradient 0. A row whose elements are all masked gives
    {dead}. Unmasked -inf/NaN inputs behave as in PyTorch (an all -inf row gives NaN).
    """

def softmax(
    input: torch.Tensor,
    dim: int = -1,
    dtype: torch.dtype | None = None,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    return _softmax(input, dim, dtype, scale, mask, causal, log=False)


def log_softmax(
    input: torch.Tensor,
    dim: int = -1,
    dtype: torch.dtype | None = None,
    *,
    scale: float | None = None,
    mask: torch.Tensor | None = None,
    causal: bool = False,
) -> torch.Tensor:
    return _softmax(input, dim, dtype, scale, mask, causal, log=True)


softmax.__doc__ = _SOFTMAX_DOC.format(
    summary="Softmax along ``dim``, with optional fused scale, mask and causal mask.",
    name="softmax", dead="zeros")
log_softmax.__doc__ = _SOFTMAX_DOC.format(
    summary="Log-softmax along ``dim``, with optional fused scale, mask and causal mask.",
    name="log_softmax", dead="-inf (the log of softmax's zeros)")


def _check_ce_target(input: torch.Tensor, target: object) -> bool:
    """Check ``target`` against ``input``; return True for probability targets."""
    _check_tensor("target", target)
    _check_same_device("target", target, input)
    if target.is_floating_point():
        if target.shape != input.shape:
            raise ValueError(f"probability target must have the input's shape "
                             f"{tuple(input.shape)}, got {tuple(target.shape)}")
        return True
    if target.dtype == torch.bool or target.is_complex():
        raise TypeError(f"target must hold integer class indices or floating-point "
                        f"probabilities, got {target.dtype}")
    expected = input.shape[:1] + input.shape[2:] if input.ndim > 1 else torch.Size([])
    if target.shape != expected:
        raise ValueError(f"class-index target must have shape {tuple(expected)} for an input of "
                         f"shape {tuple(input.shape)} (the input without its class dim 1), got "
                         f"{tuple(target.shape)}")
    return False


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    *,
    z_loss: float = 0.0,
    softcap: float | None = None,
    return_lse: bool = False,
    inplace_backward: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Cross-entropy between logits and targets, fused: one kernel computes the loss and, when
    the input requires grad, its gradient, so backward is only a scale.

    Drop-in for ``torch.nn.functional.cross_entropy``: the same arguments and results. ``input``
    is ``(C,)``, ``(N, C)`` or ``(N, C, d1, ...)`` with classes on dim 1; ``target`` is class
    indices of the input's shape without dim 1 (any integer dtype), or probabilities of the
    input's shape. ``weight`` (``(C,)``) rescales classes; ``ignore_index`` marks tokens that
    contribute neither loss nor gradient; ``reduction`` is ``"none"``, ``"mean"`` (divided by
    the summed weights of the non-ignored targets, or by the token count for probability
    targets; NaN when that is 0, as in PyTorch) or ``"sum"``; ``label_smoothing`` in [0, 1]
    mixes in the uniform distribution. Class indices outside [0, C) that are not
    ``ignore_index`` raise ``IndexError`` before any kernel runs. 16-bit logits accumulate in
    float32; the loss has the input's dtype.

    Keyword-only extras:

    - ``z_loss``: add ``z_loss * lse**2`` to each non-ignored token's loss (PaLM), where
      ``lse = logsumexp(logits)``; reduced with the rest of the loss.
    - ``softcap``: replace the logits by ``softcap * tanh(logits / softcap)`` first (Gemma 2).
    - ``return_lse``: also return the per-token ``lse`` (float32, the input's shape without the
      class dim; no gradient flows through it).
    - ``inplace_backward``: write the gradient into ``input``'s memory instead of a new buffer,
      so the loss costs only O(tokens) extra memory. This **overwrites input** (and bumps its
      version, so autograd complains if something else saved it), and backward may run once.

    The gradient with respect to probability targets, when they require grad, is computed with
    PyTorch ops from the logits (not supported with ``inplace_backward``).
    """
    _check_float_tensor("input", input)
    if input.ndim == 0:
        raise ValueError("input must have a class dim: shape (C,), (N, C) or (N, C, d1, ...); "
                         "got a 0-d tensor")
    class_dim = 1 if input.ndim > 1 else 0
    if input.shape[class_dim] == 0:
        raise ValueError(f"input must have at least one class along dim {class_dim}, "
                         f"got shape {tuple(input.shape)}")
    probability = _check_ce_target(input, target)
    if weight is not None:
        _check_float_tensor("weight", weight)
        _check_same_device("weight", weight, input)
        if weight.shape != (input.shape[class_dim],):
            raise ValueError(f"weight must have shape ({input.shape[class_dim]},), one value per "
                             f"class, got {tuple(weight.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_reduction(reduction)
    label_smoothing = _check_scale("label_smoothing", label_smoothing)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing={label_smoothing} is not allowed; it must be in [0, 1]")
    z_loss = _check_scale("z_loss", z_loss, positive=True)
    softcap = _check_scale("softcap", softcap, positive=True) or 0.0
    for name, flag in (("return_lse", return_lse), ("inplace_backward", inplace_backward)):
        if not isinstance(flag, bool):
            raise TypeError(f"{name} must be a bool, got {type(flag).__name__}")
    target_grad = probability and target.requires_grad and torch.is_grad_enabled()
    if inplace_backward and target_grad:
        raise ValueError("inplace_backward=True overwrites the logits, so it cannot also give the "
                         "gradient for a probability target that requires grad; detach target")

    x, t = input, target
    if input.ndim == 1:  # one token: (C,) -> (1, C)
        x, t = input.unsqueeze(0), target.unsqueeze(0)
    out_dtype = torch.promote_types(input.dtype, target.dtype) if probability else input.dtype
    backend = backends.select(input.device, "cross_entropy", dtype=input.dtype, size=x.shape[1])
    loss, lse = _ce_ops.cross_entropy(
        x, t, weight, ignore_index, REDUCTIONS.index(reduction), label_smoothing, z_loss,
        softcap, inplace_backward, backend,
    )
    if input.ndim == 1:
        lse = lse.squeeze(0)
        if reduction == "none":
            loss = loss.squeeze(0)
    loss = loss.to(out_dtype)
    return (loss, lse) if return_lse else loss


# --- attention ---------------------------------------------------------------------------------


def _check_bool(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def _check_qkv(names: tuple[str, str, str], q, k, v) -> None:
    """Types, dtypes, devices and the dims every layout shares: same rank, at least 2 dims,
    head dims in [1, 256], query and key head dims equal.

    The first test passes every valid call in one expression (it runs on every attention call,
    where each separate check costs Python time); a call it does not pass goes through the
    checks one by one, which raise for what is wrong."""
    T = torch.Tensor
    if (isinstance(q, T) and isinstance(k, T) and isinstance(v, T)
            and q.dtype.is_floating_point and q.dtype == k.dtype == v.dtype
            and 2 <= q.ndim == k.ndim == v.ndim and q.device == k.device == v.device
            and 1 <= q.shape[-1] <= MAX_HEAD_DIM and 1 <= v.shape[-1] <= MAX_HEAD_DIM
            and k.shape[-1] == q.shape[-1]):
        return
    for name, t in zip(names, (q, k, v), strict=True):
        _check_float_tensor(name, t)
    qn, kn, vn = names
    if not q.ndim == k.ndim == v.ndim:
        raise ValueError(f"{qn}, {kn} and {vn} must have the same number of dims, got "
                         f"{q.ndim}, {k.ndim} and {v.ndim}")
    if q.ndim < 2:
        raise ValueError(f"{qn}, {kn} and {vn} must have at least 2 dims (..., seqlen, "
                         f"head_dim), got {q.ndim}-d tensors")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"{qn}, {kn} and {vn} must have the same dtype, got {q.dtype}, "
                        f"{k.dtype} and {v.dtype}")
    _check_same_device(kn, k, q, qn)
    _check_same_device(vn, v, q, qn)
    for name, t in ((qn, q), (vn, v)):
        if not 1 <= t.shape[-1] <= MAX_HEAD_DIM:
            raise ValueError(f"{name} has head dim {t.shape[-1]} (its last dim); head dims from "
                             f"1 to {MAX_HEAD_DIM} are supported")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"{kn} has head dim {k.shape[-1]} but {qn} has {q.shape[-1]}; they "
                         "must match (the value head dim may differ)")


# The default window: no bound on either side (the fast test below also takes an equal tuple).
NO_WINDOW = (-1, -1)


def _check_attention_extras(dropout_p, scale, window_size, softcap, deterministic, head_dim):
    """The options both attention entry points share; returns (dropout_p, scale, left, right,
    softcap). As in :func:`_check_qkv`, the first test passes the common calls (no dropout,
    window or softcap; any valid scale) at once."""
    if ((window_size is NO_WINDOW or (type(window_size) is tuple and window_size == NO_WINDOW
                                      and type(window_size[0]) is int
                                      and type(window_size[1]) is int))
            and type(dropout_p) is float and dropout_p == 0.0
            and type(softcap) is float and softcap == 0.0 and deterministic is False
            and (scale is None or (type(scale) is float and math.isfinite(scale)))):
        return 0.0, head_dim**-0.5 if scale is None else scale, -1, -1, 0.0
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise TypeError(f"dropout_p must be a float, got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p={dropout_p} is not allowed; it must be in [0, 1)")
    scale = _check_scale("scale", scale)
    scale = head_dim**-0.5 if scale is None else scale
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or any(isinstance(w, bool) or not isinstance(w, int) for w in window_size)):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ValueError(f"window_size={tuple(window_size)} is not allowed; each side must be "
                         ">= 0 (keys that far from the query) or -1 (unbounded)")
    softcap = _check_scale("softcap", softcap, positive=True) or 0.0
    _check_bool("deterministic", deterministic)
    return float(dropout_p), scale, left, right, softcap


def _attention_backend(q: torch.Tensor, key_len: int) -> str:
    backend = backends.select(q.device, "attention", dtype=q.dtype, size=(q.shape[-1], key_len))
    if backend == "triton" and q.dtype == torch.float64:
        raise TypeError("the triton attention kernel has no float64 path; run float64 attention "
                        "with fastattn.use_backend('torch')")
    return backend


def _to_bhnd(t: torch.Tensor, batch: torch.Size, heads: int) -> torch.Tensor:
    """``t`` (..., H or 1, N, E) broadcast to (*batch, heads, N, E), then viewed as
    (B, heads, N, E); only the broadcast batch dims of a >4-d input can force a copy."""
    if t.ndim == 4 and t.shape[:2] == (*batch, heads):
        return t  # already (B, heads, N, E): the common case, no Python view work
    if t.ndim == 2:
        t = t.unsqueeze(0)  # (1, N, E)
    t = t.expand(*batch, heads, *t.shape[-2:])  # (*batch, heads, N, E), stride 0 where broadcast
    return t.reshape(math.prod(batch), heads, *t.shape[-2:])  # (B, heads, N, E)


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    deterministic: bool = False,
) -> torch.Tensor:
    """Fused attention, drop-in for ``torch.nn.functional.scaled_dot_product_attention``.

    ``query`` is ``(..., Hq, L, D)``, ``key`` ``(..., Hk, S, D)``, ``value`` ``(..., Hk, S,
    Dv)`` (the same rank, at least 2; leading batch dims broadcast; ``Dv`` may differ from
    ``D``; head dims up to 256); the output is ``(..., Hq, L, Dv)`` in the query's dtype.
    ``attn_mask`` is bool (True = take part) or floating (added to the scores), broadcastable to
    ``(..., Hq, L, S)``; it is read tile by tile with its broadcast strides, never expanded in
    memory, and a floating mask that requires grad gets its gradient. ``is_causal`` lets query
    ``i`` see keys ``j <= i``, aligned top-left (row 0 sees key 0 even when L != S).
    ``enable_gqa`` lets ``Hq`` be a multiple of ``Hk`` (query head ``h`` reads key/value head
    ``h // (Hq // Hk)``); without it ``Hk`` must equal ``Hq`` or be 1. ``scale`` defaults to
    ``1 / sqrt(D)``. ``dropout_p`` drops probabilities after the softmax and rescales the rest
    by ``1 / (1 - dropout_p)``; its mask comes from a seed drawn from PyTorch's generator for
    the device, so ``torch.manual_seed`` reproduces it, and backward regenerates it.

    A query row whose keys are all masked out gives output 0 and zero gradients (PyTorch's math
    backend gives NaN there). Low-precision inputs accumulate in float32.

    Keyword-only extras:

    - ``window_size=(left, right)``: query ``i`` sees only keys ``i - left <= j <= i + right``
      (-1 leaves a side unbounded; with ``is_causal`` the right side is 0). Tiles outside the
      window are skipped, not masked.
    - ``softcap``: scores become ``softcap * tanh(scores / softcap)`` before masking (Gemma 2).
    - ``deterministic``: a backward without atomics, bitwise reproducible (a little slower).
    """
    _check_qkv(("query", "key", "value"), query, key, value)
    q, k, v = query, key, value
    qs, ks, vs = q.shape, k.shape, v.shape
    if ks[-2] != vs[-2]:
        raise ValueError(f"key has {ks[-2]} positions (dim -2) but value has {vs[-2]}; they "
                         "must match")
    if is_causal is not True and is_causal is not False:
        _check_bool("is_causal", is_causal)
    if enable_gqa is not True and enable_gqa is not False:
        _check_bool("enable_gqa", enable_gqa)
    dropout_p, scale, left, right, softcap = _check_attention_extras(
        dropout_p, scale, window_size, softcap, deterministic, qs[-1])
    if is_causal:
        right = 0
    ndim = len(qs)
    hq, hk, hv = (qs[-3], ks[-3], vs[-3]) if ndim > 2 else (1, 1, 1)
    if hk != hv:
        raise ValueError(f"key has {hk} heads (dim -3) but value has {hv}; they must match")
    if enable_gqa and hq % hk:
        raise ValueError(f"query has {hq} heads (dim -3), not a multiple of key/value's {hk}; "
                         "enable_gqa needs query heads = a multiple of key/value heads")
    if not enable_gqa and hq != hk and hk != 1 and hq != 1:
        raise ValueError(f"query has {hq} heads (dim -3) but key/value have {hk}; they must "
                         "match or be 1 (or pass enable_gqa=True with query heads a multiple "
                         "of key/value heads)")
    plain = ndim == 4 and qs[0] == ks[0] == vs[0]  # (B, H, N, E) each, the common case
    if plain:
        batch = qs[:1]  # without broadcast_shapes' Python
    else:
        try:
            batch = torch.broadcast_shapes(qs[:-3], ks[:-3], vs[:-3])
        except RuntimeError:
            raise ValueError(f"the batch dims (all but the last 3) of query {tuple(qs)}, key "
                             f"{tuple(ks)} and value {tuple(vs)} do not broadcast") from None
    heads_out = max(hq, hk)
    L, S = qs[-2], ks[-2]
    mask = attn_mask
    if mask is not None:
        full = (*batch, heads_out, L, S)
        _check_mask("attn_mask", mask, full, "(batch..., heads, L, S) =", q, "query")
        mask = mask.expand(full).reshape(math.prod(batch), heads_out, L, S)  # (B, Hq, L, S)
    backend = _attention_backend(q, S)
    if plain and hq >= hk:
        qn, kn, vn = q, k, v  # (B, Hq, L, D), (B, Hk, S, D), (B, Hk, S, Dv) already
    else:
        qn = _to_bhnd(q, batch, heads_out)  # (B, Hq, L, D)
        kn = _to_bhnd(k, batch, hk)  # (B, Hk, S, D)
        vn = _to_bhnd(v, batch, hk)  # (B, Hk, S, Dv)
    seed = _attention_ops.dropout_seed(q.device) if dropout_p > 0 else None
    out, _ = _attention_ops.attention(qn, kn, vn, mask, seed, dropout_p, scale, left, right,
                                      False, softcap, deterministic, backend)
    if ndim == 4:
        return out  # (B, Hq, L, Dv) already
    if ndim == 2:
        return out.reshape(L, vs[-1])  # (L, Dv)
    return out.reshape(*batch, heads_out, L, vs[-1])  # (..., Hq, L, Dv)


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: tuple[int, int] = NO_WINDOW,
    softcap: float = 0.0,
    deterministic: bool = False,
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fused attention with flash-attn's ``flash_attn_func`` convention.

    ``q`` is ``(B, T, Hq, D)``, ``k`` ``(B, S, Hk, D)``, ``v`` ``(B, S, Hk, Dv)`` with ``Hq`` a
    multiple of ``Hk`` (GQA/MQA: query head ``h`` reads key/value head ``h // (Hq // Hk)``),
    head dims up to 256; the output is ``(B, T, Hq, Dv)``, contiguous, in q's dtype.
    ``softmax_scale`` defaults to ``1 / sqrt(D)``. ``causal`` is aligned bottom-right: query
    ``i`` sees keys ``j <= i + S - T`` (so with T > S the first T - S rows see nothing and give
    0). ``window_size=(left, right)`` keeps keys ``i + S - T - left <= j <= i + S - T + right``
    (-1 = unbounded; ``causal`` sets right to 0). ``softcap`` > 0 caps the scores with
    ``softcap * tanh(scores / softcap)``. ``dropout_p`` drops probabilities after the softmax
    (seeded from PyTorch's generator; backward regenerates the mask). ``deterministic`` selects
    a backward without atomics. ``return_lse`` also returns the per-row log-sum-exp of the
    scores, ``(B, Hq, T)`` float32 (-inf for a row that sees no key; no gradient).

    A query row that sees no key gives output 0 and zero gradients.
    """
    _check_qkv(("q", "k", "v"), q, k, v)
    if q.ndim != 4:
        raise ValueError(f"q, k and v must be 4-d (batch, seqlen, heads, head_dim), got "
                         f"{q.ndim}-d tensors")
    if k.shape[:3] != v.shape[:3]:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must agree on batch, "
                         "seqlen and heads")
    if k.shape[0] != q.shape[0]:
        raise ValueError(f"q has batch {q.shape[0]} but k and v have {k.shape[0]}; they must "
                         "match")
    hq, hk = q.shape[2], k.shape[2]
    if hq % hk:
        raise ValueError(f"q has {hq} heads, not a multiple of k/v's {hk}")
    _check_bool("causal", causal)
    _check_bool("return_lse", return_lse)
    dropout_p, scale, left, right, softcap = _check_attention_extras(
        dropout_p, softmax_scale, window_size, softcap, deterministic, q.shape[-1])
    if causal:
        right = 0
    backend = _attention_backend(q, k.shape[1])
    seed = _attention_ops.dropout_seed(q.device) if dropout_p > 0 else None
    out, lse = _attention_ops.attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D) views
        None, seed, dropout_p, scale, left, right, True, softcap, deterministic, backend)
    out = out.transpose(1, 2)  # (B, T, Hq, Dv)
    return (out, lse) if return_lse else out
