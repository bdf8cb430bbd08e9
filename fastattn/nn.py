"""Drop-in layers: the constructor arguments and ``state_dict`` keys of their ``torch.nn``
twins, one call into ``fastattn.functional`` in ``forward``. fastattn's extras are
keyword-only constructor arguments."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor
from torch.nn.modules.loss import _Reduction

from fastattn import functional as F

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss"]


def _legacy_softmax_dim(name: str, ndim: int) -> int:
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                  "to include dim=X as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class _SoftmaxBase(torch.nn.Module):
    _log = False

    def __init__(self, dim: int | None = None, *, scale: float | None = None,
                 causal: bool = False) -> None:
        super().__init__()
        self.dim = None if dim is None else F.check_index("dim", dim, "an int or None")
        self.scale = scale
        self.causal = causal

    def __setstate__(self, state):  # pickles of torch.nn.Softmax may lack these
        super().__setstate__(state)
        self.__dict__.setdefault("dim", None)
        self.__dict__.setdefault("scale", None)
        self.__dict__.setdefault("causal", False)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        fn = F.log_softmax if self._log else F.softmax
        dim = self.dim
        if dim is None:
            dim = _legacy_softmax_dim("log_softmax" if self._log else "softmax", input.ndim)
        return fn(input, dim, scale=self.scale, mask=mask, causal=self.causal)

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={getattr(self, k)}" for k in ("scale", "causal")
                         if getattr(self, k) not in (None, False))
        return f"dim={self.dim}{extras}"


class Softmax(_SoftmaxBase):
    """Drop-in for ``torch.nn.Softmax(dim)``; extras ``scale`` and ``causal``, and an optional
    ``mask`` in ``forward`` (see :func:`fastattn.softmax`)."""


class LogSoftmax(_SoftmaxBase):
    """Drop-in for ``torch.nn.LogSoftmax(dim)``; extras as :class:`Softmax`."""

    _log = True


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss``: same constructor (``size_average`` and
    ``reduce`` included, with PyTorch's deprecation rules), ``weight`` kept as a buffer so the
    ``state_dict`` keys match. Extras: ``z_loss``, ``softcap``, ``inplace_backward`` (see
    :func:`fastattn.cross_entropy`)."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        F.check_reduction(reduction)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, inplace_backward=self.inplace_backward,
        )
