"""``native`` launchers of softmax: ``torch.ops.fastattn.native_softmax_fwd`` / ``_bwd``
(kernels in ``csrc/softmax/``), with the signatures of ``fastattn.reference.softmax_fwd`` and
``softmax_bwd``. The C++ ops take every option themselves (any dim and strides, scale, bool or
additive mask read through broadcast strides, causal, output dtype). :func:`softmax` is the
differentiable op whose autograd runs in C++ (eager calls)."""

from __future__ import annotations

import torch

from fastattn import _ext


def softmax_fwd(
    input: torch.Tensor, dim: int, scale: float, mask: torch.Tensor | None, causal: bool,
    log: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    _ext._load()
    return torch.ops.fastattn.native_softmax_fwd(input, dim, scale, mask, causal, log, out_dtype)


def softmax_bwd(
    grad_output: torch.Tensor, output: torch.Tensor, dim: int, scale: float,
    mask: torch.Tensor | None, causal: bool, log: bool, input_dtype: torch.dtype,
) -> torch.Tensor:
    _ext._load()
    return torch.ops.fastattn.native_softmax_bwd(grad_output, output, dim, scale, mask, causal,
                                                 log, input_dtype)


def softmax(
    input: torch.Tensor, dim: int, scale: float, mask: torch.Tensor | None, causal: bool,
    log: bool, out_dtype: torch.dtype,
) -> torch.Tensor:
    """:func:`softmax_fwd`, differentiable in ``input`` with :func:`softmax_bwd` as its backward,
    both joined in C++ (``csrc/softmax/softmax_autograd.cpp``); ``mask`` must not require grad."""
    _ext._load()
    return torch.ops.fastattn.native_softmax(input, dim, scale, mask, causal, log, out_dtype)
