"""``native`` launcher of cross-entropy: ``torch.ops.fastattn.native_cross_entropy_fwd``
(kernels in ``csrc/cross_entropy/``), with the signature of
``fastattn.reference.cross_entropy_fwd``. Every option runs in C++: class-index and
probability targets, weight, ignore_index, the three reductions, label smoothing, z-loss,
softcap, and the gradient written in the same pass (into ``grad``, which may be ``input``).
:func:`cross_entropy` is the differentiable op whose autograd runs in C++ (eager calls)."""

from __future__ import annotations

import torch

from fastattn import _ext


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
    _ext._load()
    return torch.ops.fastattn.native_cross_entropy_fwd(
        input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap or 0.0,
        grad)


def cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None,
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(loss, lse)``, differentiable in ``input`` in C++
    (``csrc/cross_entropy/cross_entropy_autograd.cpp``): forward writes the gradient when
    ``input`` requires grad, backward scales it by the upstream gradient (not when that is
    exactly 1; in place unless the graph is retained). ``target`` must not require grad."""
    _ext._load()
    return torch.ops.fastattn.native_cross_entropy(input, target, weight, ignore_index,
                                                   reduction, label_smoothing, z_loss,
                                                   softcap or 0.0)
