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
from fastattn.ops import cross_entropy as _ce_ops
from fastattn.ops import softmax as _softmax_ops
from fastattn.reference import REDUCTIONS

__all__ = ["softmax", "log_softmax", "cross_entropy"]


def _check_tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float_tensor(name: str, value: object) -> torch.Tensor:
    _check_tensor(name, value)
    if not value.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {value.dtype}")
    return value


def _check_same_device(name: str, value: torch.Tensor, input: torch.Tensor) -> None:
    if value.device != input.device:
        raise ValueError(f"{name} is on {value.device} but input is on {input.device}; "
                         "they must be on the same device")


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
        _check_tensor("mask", mask)
        if mask.dtype != torch.bool and not mask.is_floating_point():
            raise TypeError(f"mask must be a bool tensor (True = keep) or a floating-point "
                            f"additive tensor, got {mask.dtype}")
        _check_same_device("mask", mask, input)
        try:
            shape = torch.broadcast_shapes(mask.shape, input.shape)
        except RuntimeError:
            shape = None
        if shape != input.shape:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the input "
                             f"shape {tuple(input.shape)}")
    out_dtype = input.dtype if dtype is None else dtype
    # PyTorch casts the input to ``dtype`` first. A widening cast is exact, so the kernels read
    # the input as it is and write ``dtype`` (no extra copy); narrowing casts are done here.
    widening = dtype in (torch.float32, torch.float64) and (
        torch.finfo(input.dtype).bits <= torch.finfo(dtype).bits)
    x = input if dtype is None or widening else input.to(dtype)
    backend = backends.select(x.device)
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
    backend = backends.select(input.device)
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
