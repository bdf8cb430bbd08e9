"""``native`` launchers of attention: ``torch.ops.fastattn.native_attention_fwd`` / ``_bwd``
(kernels in ``csrc/attention/``), with the signatures of ``fastattn.reference.attention_fwd``
and ``attention_bwd``. The backward is always deterministic (no atomics, on either device).

CPU tensors (``attention_cpu.cpp``): every option runs in C++: strided q, k, v, GQA by index,
bool or additive masks read through broadcast strides, windows in both alignments, softcap,
dropout (a counter-based generator keyed by the seed; :func:`dropout_mask` shows the mask it
draws), and float64 end to end.

CUDA tensors (``attention_cuda*.cu``, tensor cores through mma.sync, sm_80 and newer; written and
compiled, not yet run on a GPU): float16 and bfloat16 only, head dims 1 to 256 (``D`` and ``Dv``
may differ), batch and query heads up to 65535 each, and every option above: strided q, k, v
(a tensor whose last dim is not contiguous or whose rows are not 16-byte aligned is copied into
an aligned buffer first), GQA, bool or additive masks of any float dtype, windows, softcap,
dropout with the CPU's generator (the same mask bit for bit), and the additive mask's gradient
(float32). What it does not take is decided in one place, :func:`cuda_unsupported`, and raised
here before any launch: float32 and float64 raise ``TypeError`` (the ``triton`` backend serves
float32, ``torch`` both), sizes past the limits ``ValueError``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastattn import _ext

CUDA_DTYPES = (torch.float16, torch.bfloat16)
CUDA_MAX_HEAD_DIM = 256
CUDA_MAX_GRID = 65535  # batch and query heads each: the y and z dims of the CUDA grid


class Unsupported(NamedTuple):
    """Why the CUDA kernels cannot serve a call, and the exception the launcher raises."""

    error: type[Exception]
    reason: str


def cuda_unsupported(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     mask: torch.Tensor | None = None, dropout_p: float = 0.0,
                     softcap: float | None = 0.0) -> Unsupported | None:
    """None when the native CUDA attention kernels serve this call (normalised arguments:
    q (B, Hq, L, D), k (B, Hk, S, D), v (B, Hk, S, Dv)), else what they lack. Only shapes and
    dtypes are read, so it answers for tensors on any device (meta and CPU included). Masks of
    any dtype the public functions accept, dropout and softcap are all served; they are
    parameters so that this stays the one place that would say otherwise."""
    del mask, dropout_p, softcap  # every mask kind, dropout rate and softcap is served
    if q.dtype not in CUDA_DTYPES:
        return Unsupported(TypeError, (
            f"native CUDA attention takes float16 or bfloat16 (tensor cores), got {q.dtype}; "
            "backend 'triton' (float32) or 'torch' (float32, float64) serves it on CUDA"))
    D, Dv = q.shape[-1], v.shape[-1]
    if not (1 <= D <= CUDA_MAX_HEAD_DIM and 1 <= Dv <= CUDA_MAX_HEAD_DIM):
        return Unsupported(ValueError, (
            f"native CUDA attention takes head dims from 1 to {CUDA_MAX_HEAD_DIM}, got q/k "
            f"{D} and v {Dv}"))
    B, Hq = q.shape[0], q.shape[1]
    if B > CUDA_MAX_GRID or Hq > CUDA_MAX_GRID:
        return Unsupported(ValueError, (
            f"native CUDA attention takes batch and query heads up to {CUDA_MAX_GRID} each "
            f"(CUDA grid limit), got batch {B} and {Hq} heads"))
    return None


def _check_cuda(q, k, v, mask, dropout_p, softcap) -> None:
    why = cuda_unsupported(q, k, v, mask, dropout_p, softcap)
    if why is not None:
        raise why.error(why.reason)


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    seed: torch.Tensor | None, dropout_p: float, scale: float, left: int, right: int,
    align_bottom: bool, softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _ext._load()
    if q.is_cuda:
        _check_cuda(q, k, v, mask, dropout_p, softcap)
    return torch.ops.fastattn.native_attention_fwd(q, k, v, mask, seed, dropout_p, scale, left,
                                                   right, align_bottom, softcap or 0.0)


def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor | None,
    dropout_p: float, scale: float, left: int, right: int, align_bottom: bool,
    softcap: float | None, deterministic: bool, mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    del deterministic  # one owner writes each gradient element: always deterministic
    _ext._load()
    if q.is_cuda:
        _check_cuda(q, k, v, mask, dropout_p, softcap)
    return torch.ops.fastattn.native_attention_bwd(grad_out, q, k, v, out, lse, mask, seed,
                                                   dropout_p, scale, left, right, align_bottom,
                                                   softcap or 0.0, mask_grad)


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    seed: torch.Tensor | None, dropout_p: float, scale: float, left: int, right: int,
    align_bottom: bool, softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attention_fwd`, differentiable in q, k and v with :func:`attention_bwd` as its
    backward, both joined in C++ (``csrc/attention/attention_autograd.cpp``); ``mask`` must not
    require grad."""
    _ext._load()
    if q.is_cuda:
        _check_cuda(q, k, v, mask, dropout_p, softcap)
    return torch.ops.fastattn.native_attention(q, k, v, mask, seed, dropout_p, scale, left, right,
                                               align_bottom, softcap or 0.0)


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep mask (bool ``shape`` = (B, Hq, L, S)) the kernels draw for ``seed``, on CPU and
    CUDA alike: for tests and for anyone who needs to see exactly which probabilities were
    dropped."""
    _ext._load()
    keep = torch.ops.fastattn.native_attention_dropout_mask(seed.cpu(), list(shape),
                                                            float(dropout_p))
    return keep.to(device)
