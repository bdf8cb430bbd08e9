"""``native`` launchers of attention: ``torch.ops.fastattn.native_attention_fwd`` / ``_bwd``
(kernels in ``csrc/attention/``), with the signatures of ``fastattn.reference.attention_fwd``
and ``attention_bwd``. Every option runs in C++: strided q, k, v, GQA by index, bool or
additive masks read through broadcast strides, windows in both alignments, softcap, dropout
(a counter-based generator keyed by the seed; :func:`dropout_mask` shows the mask it draws), and
float64 end to end. The backward is always deterministic."""

from __future__ import annotations

import torch

from fastattn import _ext


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
    seed: torch.Tensor | None, dropout_p: float, scale: float, left: int, right: int,
    align_bottom: bool, softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    _ext._load()
    return torch.ops.fastattn.native_attention_fwd(q, k, v, mask, seed, dropout_p, scale, left,
                                                   right, align_bottom, softcap or 0.0)


def attention_bwd(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, mask: torch.Tensor | None, seed: torch.Tensor | None,
    dropout_p: float, scale: float, left: int, right: int, align_bottom: bool,
    softcap: float | None, deterministic: bool, mask_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    del deterministic  # one task owns each gradient: always deterministic
    _ext._load()
    return torch.ops.fastattn.native_attention_bwd(grad_out, q, k, v, out, lse, mask, seed,
                                                   dropout_p, scale, left, right, align_bottom,
                                                   softcap or 0.0, mask_grad)


def dropout_mask(seed: torch.Tensor, shape, dropout_p: float, device) -> torch.Tensor:
    """The keep mask (bool ``shape`` = (B, Hq, L, S)) the kernels draw for ``seed``: for tests
    and for anyone who needs to see exactly which probabilities were dropped."""
    _ext._load()
    keep = torch.ops.fastattn.native_attention_dropout_mask(seed.cpu(), list(shape),
                                                            float(dropout_p))
    return keep.to(device)
