"""Shared assertions: the twice-PyTorch's-error rule against a float64 oracle."""

from __future__ import annotations

import torch

import fastattn

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# Absolute slack of the rule, per dtype, relative to the reference's magnitude.
SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def backends(op: str | None = None) -> list[str]:
    """The backends that run ``op`` (every op they have if None) on DEVICE here."""
    return fastattn.available_backends(DEVICE, op)


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
