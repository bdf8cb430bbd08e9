"""Row layout and small helpers shared by the Triton kernels (softmax, cross-entropy, attention).

A row-wise op reduces along one dim. The launcher moves that dim last (a view, no copy) and
describes every other dim as at most three *leading* dims: row ``r`` of the kernel's grid is
``(i0, i1, i2)`` in row-major order over sizes ``(n0, n1, n2)``, and each tensor reaches its
row through its own three strides. Adjacent leading dims are merged where every tensor allows
it, so a contiguous input, a column-major one, a mask broadcast with zero strides, or a class
dim in the middle of ``(N, C, d1, ...)`` all run without copies. Only when more than three
leading dims survive the merge are the tensors materialised contiguous.

Offsets are 64-bit: rows times columns exceeds 2**31 elements in real training.

Also shared: the block configuration by row length, ``tanh`` for softcapping (Triton has no
portable one), ``narrow`` for storing an accumulator in the output dtype, and float scalars for
float64 rows (Triton passes Python floats as float32, so a scalar travels as float32 hi + lo
halves and is joined in the accumulation dtype, about 48 bits).
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


def merge_leading(sizes, strides_list, keep_last=False):
    """Merge adjacent leading dims that every tensor can address with one stride.

    ``sizes`` are the leading sizes; ``strides_list`` holds one stride list per tensor.
    With ``keep_last`` the last leading dim is kept on its own (causal masking needs its index).
    Returns (sizes, strides_list) with size-1 dims dropped and mergeable dims merged.
    """
    dims = [d for d, n in enumerate(sizes) if n != 1]
    if keep_last and sizes and (not dims or dims[-1] != len(sizes) - 1):
        dims.append(len(sizes) - 1)
    out_sizes = []
    out_strides = [[] for _ in strides_list]
    for d in dims:
        protected = keep_last and d == len(sizes) - 1
        can_merge = out_sizes and not protected and all(
            s[-1] == st[d] * sizes[d] for s, st in zip(out_strides, strides_list, strict=True)
        )
        if can_merge:
            out_sizes[-1] *= sizes[d]
            for s, st in zip(out_strides, strides_list, strict=True):
                s[-1] = st[d]
        else:
            out_sizes.append(sizes[d])
            for s, st in zip(out_strides, strides_list, strict=True):
                s.append(st[d])
    return out_sizes, out_strides


def row_layout(shape, tensors, keep_last=False):
    """Describe tensors that share ``shape`` (reduced dim last) as 3 leading dims + columns.

    ``tensors`` may hold None (skipped, returned as None) and tensors broadcast to ``shape``
    (zero strides). Returns ``(sizes3, tensors, strides3_list, col_strides)``; the tensors may
    have been replaced by contiguous copies when the leading dims could not be merged to three.
    """
    lead = list(shape[:-1])
    present = [t for t in tensors if t is not None]
    sizes, strides = merge_leading(lead, [list(t.stride()[:-1]) for t in present], keep_last)
    if len(sizes) > 3:
        present = [t.contiguous() for t in present]
        sizes, strides = merge_leading(lead, [list(t.stride()[:-1]) for t in present], keep_last)
    pad = 3 - len(sizes)
    sizes = [1] * pad + sizes
    strides = [[0] * pad + s for s in strides]
    it = iter(zip(present, strides, strict=True))
    out_tensors, out_strides, col_strides = [], [], []
    for t in tensors:
        if t is None:
            out_tensors.append(None)
            out_strides.append((0, 0, 0))
            col_strides.append(0)
        else:
            tt, st = next(it)
            out_tensors.append(tt)
            out_strides.append(tuple(st))
            col_strides.append(tt.stride(-1))
    return sizes, out_tensors, out_strides, col_strides


MAX_SINGLE = 8192  # longest row a program keeps in registers in one piece (half for fp64)
CHUNK = 4096  # columns per sweep step of the online (multi-chunk) path


def row_config(num_cols: int, dtype: torch.dtype) -> tuple[int, bool, int]:
    """(BLOCK, SINGLE, num_warps) for rows of ``num_cols`` elements of ``dtype``.

    Picked from the row length, not tuned on a GPU yet. fp64 rows of 8192 held in registers
    spill on sm_90 (seen with ptxas); 4096 do not."""
    max_single = MAX_SINGLE // 2 if dtype == torch.float64 else MAX_SINGLE
    if num_cols <= max_single:
        block, single = max(triton.next_power_of_2(num_cols), 16), True
    else:
        block, single = CHUNK, False
    num_warps = 4 if block <= 1024 else 8 if block <= 4096 else 16
    return block, single, num_warps


def tl_accumulate(dtype: torch.dtype):
    """The Triton type of a torch accumulation dtype (see ``reference.accumulate_dtype``)."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@functools.lru_cache(maxsize=256)
def split_float(value: float) -> tuple[float, float]:
    """``value`` as float32 hi + lo halves, for a kernel to rejoin with ``join_float``."""
    hi = float(torch.tensor(value, dtype=torch.float32))
    return hi, float(torch.tensor(value - hi, dtype=torch.float32))


# Triton 3.6's interpreter narrows float32 to bfloat16 by truncation where every GPU rounds to
# nearest even: an output off by up to one ulp, and a log-softmax gradient computed from such an
# output (exp(y) times a row sum in the hundreds) several times PyTorch's error. Under the
# interpreter ``narrow`` rounds itself, so CPU tests see the numbers a GPU produces.
_ROUND_BF16 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def narrow(x, dtype: tl.constexpr):
    """``x`` in ``dtype``, rounded to nearest even (the GPU's cast; see ``_ROUND_BF16``)."""
    if _ROUND_BF16 and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        up = bits + 0x7FFF + ((bits >> 16) & 1)
        # NaN payloads stay NaN (adding could carry a low payload bit into an infinity)
        up = tl.where(x != x, bits | 0x400000, up)
        return (up >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(dtype)


@triton.jit
def join_float(hi, lo, ACC: tl.constexpr):
    # Summed after the casts: in float64 the halves add up exactly, and an inf input times the
    # joined value never meets a 0 * inf from a zero ``lo``.
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


def broadcast_to(t: torch.Tensor | None, shape) -> torch.Tensor | None:
    """``t`` expanded to ``shape`` (a view with zero strides), or None."""
    return None if t is None else t.expand(shape)


@triton.jit
def row_indices(n1, n2):
    """This program's row as (i0, i1, i2), 64-bit."""
    r = tl.program_id(0).to(tl.int64)
    i2 = r % n2
    r = r // n2
    return r // n1, r % n1, i2


@triton.jit
def row_offset(i0, i1, i2, s0, s1, s2):
    return i0 * s0 + i1 * s1 + i2 * s2


@triton.jit
def tanh(a):
    # 1 - exp(-2|a|) cancels near 0, so |a| < 0.55 uses the [7/8] Pade approximant of tanh
    # (Lambert's continued fraction; < 2 ulp in fp32 and fp64 there). Integer coefficients stay
    # exact when Triton rounds literals to fp32.
    b = tl.abs(a)
    e = tl.exp(-2.0 * b)
    x = b * b
    p = ((36.0 * x + 6930.0) * x + 270270.0) * x + 2027025.0
    q = (((x + 630.0) * x + 51975.0) * x + 945945.0) * x + 2027025.0
    small = b < 0.55
    r = tl.where(small, b * p, 1.0 - e) / tl.where(small, q, 1.0 + e)
    return tl.where(a < 0, -r, r)
