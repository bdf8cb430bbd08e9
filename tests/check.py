"""Shared assertions: the twice-PyTorch's-error rule against a float64 oracle."""

from __future__ import annotations

import pytest
import torch

import fastattn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Absolute slack of the rule, per dtype, relative to the reference's magnitude.
SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def backends(op: str | None = None) -> list[str]:
    """The backends that run ``op`` (every op they have if None) on DEVICE here."""
    return fastattn.available_backends(DEVICE, op)


def attention_unsupported(backend: str, q: torch.Tensor | torch.dtype, k=None, v=None,
                          mask=None, dropout_p: float = 0.0, softcap: float = 0.0) -> str | None:
    """Why ``backend`` cannot take this attention call, where that is by design: ``native`` on
    CUDA tensors takes float16/bfloat16 only (``fastattn.native.attention.cuda_unsupported``
    decides). ``q`` may be a dtype: a tensor of it on DEVICE stands in for q, k and v."""
    if backend != "native":
        return None
    if isinstance(q, torch.dtype):
        q = torch.empty(1, 1, 1, 16, dtype=q, device=DEVICE)
    if q.device.type != "cuda":
        return None
    from fastattn.native.attention import cuda_unsupported

    why = cuda_unsupported(q, q if k is None else k, q if v is None else v, mask, dropout_p,
                           softcap)
    return None if why is None else f"native CUDA attention kernels: {why.reason}"


def skip_unsupported_attention(backend: str, q: torch.Tensor | torch.dtype, k=None, v=None,
                               mask=None, dropout_p: float = 0.0, softcap: float = 0.0) -> None:
    """Skip the calling test, with the reason, where :func:`attention_unsupported` says so (the
    error ``backend`` raises instead is tested in test_attention.py)."""
    why = attention_unsupported(backend, q, k, v, mask, dropout_p, softcap)
    if why is not None:
        pytest.skip(why)


def attention_backends(dtype: torch.dtype) -> list[str]:
    """``backends("attention")`` less those that do not take ``dtype`` on DEVICE."""
    return [b for b in backends("attention") if attention_unsupported(b, dtype) is None]


def assert_twice_error(out, ref64, pt_out, what: str, precision: torch.dtype | None = None
                       ) -> None:
    """``out`` is within twice PyTorch's own error (``pt_out``, same dtype) of ``ref64``.

    ``precision``: the dtype whose slack applies when ``out`` went through a narrower one than
    its own (a float32 gradient computed through a bfloat16 cast), else ``out.dtype``.

    Non-finite values must sit where the reference has them (same inf sign, NaN for NaN)."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out64, pt64 = out.detach().double(), pt_out.detach().double()
    ref64 = ref64.detach()
    finite = torch.isfinite(ref64)
    assert torch.equal(torch.isnan(out64), torch.isnan(ref64)), f"{what}: NaN positions differ"
    inf = torch.isinf(ref64)
    assert torch.equal(out64[inf], ref64[inf]), f"{what}: inf values differ"
    if not finite.any():
        return
    err = (out64 - ref64)[finite].abs().max().item()
    pt_err = (pt64 - ref64)[finite].abs().max().item()
    scale = max(1.0, ref64[finite].abs().max().item())
    bound = 2 * pt_err + SLACK[precision or out.dtype] * scale
    assert err <= bound, f"{what}: error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + slack"
