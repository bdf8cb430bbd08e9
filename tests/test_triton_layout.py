"""The Triton kernels' shared helpers that the op tests reach only indirectly."""

import pytest
import torch
from check import DEVICE

import fastattn

if "triton" not in fastattn.available_backends(DEVICE):
    pytest.skip("needs the triton backend", allow_module_level=True)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastattn.triton.layout import narrow  # noqa: E402


@triton.jit
def _store(src, dst, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    tl.store(dst + i, narrow(tl.load(src + i, mask=i < n), dst.dtype.element_ty), mask=i < n)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_narrow_rounds_like_pytorch(dtype):
    # Every output store goes through ``narrow``; under the interpreter it rounds bf16 itself.
    # Ties go to even, overflow to inf, NaN stays NaN, subnormals round too.
    tie = 1.0 + 2.0**-8  # halfway between 1 and the next bf16
    special = [tie, -tie, 1.0 + 3 * 2.0**-8, tie + 2.0**-20, 3.3895e38, -3.4e38, float("inf"),
               -float("inf"), float("nan"), 0.0, -0.0, 1e-40, -1e-40, 2.0**-133, 65520.0]
    scales = 10.0 ** torch.randint(-30, 30, (500,), dtype=torch.float64)
    src = torch.randn(500, dtype=torch.float64) * scales
    src = torch.cat([torch.tensor(special, dtype=torch.float64), src]).float().to(DEVICE)
    dst = torch.empty(src.numel(), device=DEVICE, dtype=dtype)
    _store[(1,)](src, dst, src.numel(), BLOCK=1024)
    torch.testing.assert_close(dst, src.to(dtype), rtol=0, atol=0, equal_nan=True)
