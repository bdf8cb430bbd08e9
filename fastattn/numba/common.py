"""Pieces the numba kernels share: scalar math that LLVM vectorises, the dropout hash, and the
adapters from torch CPU tensors to the numpy arrays the kernels take.

Why a hand-written exp: Numba calls libm's ``exp`` one element at a time (there is no vector
math library in a pip install of llvmlite), which is several times slower than PyTorch's
vectorised Sleef exp. ``fexp`` on float32 is Cody-Waite range reduction, a degree-6 polynomial
and a scale by 2^k built from exponent bits (two factors, so subnormal results and overflow to
inf come out right): at most 0.99 ulp from float64's exp over 2 million points of [-110, 90]
(test_numba_fexp_float32_is_within_1_5_ulp), exact for -inf (0), +inf (inf) and NaN, and it
vectorises because it is straight-line arithmetic and selects. float64 uses libm (exact
enough for the float64 oracle; float64 is for checking, not for speed).

``fmax`` is LLVM's ``maxnum``, which vectorises as a reduction where a compare-and-select does
not. It ignores NaN; every max it computes is followed by a sum of ``exp(x - max)`` over the
same row, through which a NaN still reaches every output, as in PyTorch.

fastmath: only the small reduction helpers below (``exp_sum``, ``total``, ...) are compiled with
``FASTMATH`` = reassociation (so their sums vectorise) and contraction (FMA); Numba keeps those
flags on their own instructions when they are inlined into a kernel, so a kernel's element-wise
arithmetic (``(z - m) - log s``, which reassociation would turn into ``z - (m + log s)`` and
lose digits for |z| ~ 1e4) stays exactly as written. Never ``nnan``/``ninf``: -inf marks
masked elements and NaN must propagate as in PyTorch.

Specialisations: every kernel is compiled once per accumulation dtype (float32, float64);
launchers pass C-contiguous arrays, scalars already cast to that dtype (``scalar``) and flags
as Python ints/bools, so no other signature appears. Compiled code is cached on disk
(``cache=True``); Numba keys that cache on the kernel file only, so after editing this file,
delete ``fastattn/numba/__pycache__``.
"""

from __future__ import annotations

import math
import threading

import numba
import numpy as np
import torch
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

FASTMATH = {"reassoc", "contract"}
JIT = {"parallel": True, "cache": True, "nogil": True}
# Launchers hold this around every kernel call: Numba's workqueue threading layer (its fallback
# where neither OpenMP nor TBB is found) aborts the process when two Python threads launch
# parallel kernels at once. Each launch already uses every core, so nothing is lost.
LAUNCH_LOCK = threading.Lock()
_HELPER = {"fastmath": FASTMATH, "cache": True}

_F32 = np.float32
_U64 = np.uint64


# --- scalar math -----------------------------------------------------------------------------


@intrinsic
def _bits_to_f32(typingctx, i):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def fmax(typingctx, a, b):
    """``maxnum(a, b)``: the larger of two floats of the same type; ignores a NaN operand."""

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return a(a, b), codegen


@numba.njit
def _exp_f32(x):
    # Clamp so 2^k stays representable: e^-104 underflows to 0 and e^89 overflows to inf.
    xc = _F32(-104.0) if x < _F32(-104.0) else x
    xc = _F32(89.0) if xc > _F32(89.0) else xc
    kf = np.floor(xc * _F32(1.44269504088896341) + _F32(0.5))
    r = xc - kf * _F32(0.693359375)  # ln 2 split in two: r stays exact
    r = r - kf * _F32(-2.12194440e-4)
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * r * r + r + _F32(1.0)
    k = np.int32(kf)
    k1 = k >> 1
    y = p * _bits_to_f32((k1 + 127) << 23) * _bits_to_f32((k - k1 + 127) << 23)
    return y if x == x else x  # NaN in, NaN out


def fexp(x):
    """exp of a float32 or float64 scalar (see the module header)."""
    return math.exp(x)


@overload(fexp)
def _fexp(x):
    if x == types.float32:
        return lambda x: _exp_f32(x)
    return lambda x: math.exp(x)


def cast(value, like):
    """``value`` as a scalar of ``like``'s float type (``like``: a float scalar or array)."""
    return value


@overload(cast)
def _cast(value, like):
    dtype = like.dtype if isinstance(like, types.Array) else like
    if dtype == types.float32:
        return lambda value, like: np.float32(value)
    return lambda value, like: np.float64(value)


# --- row reductions (vectorised: see the header on fastmath) -------------------------------


@numba.njit(**_HELPER)
def row_max(v, n, init):
    """max(init, v[0], ..., v[n-1]), ignoring NaN (see ``fmax``)."""
    m = init
    for j in range(n):
        m = fmax(m, v[j])
    return m


@numba.njit(**_HELPER)
def scaled_max(v, n, scale, init):
    """max(init, v[0] * scale, ..., v[n-1] * scale), ignoring NaN (see ``fmax``)."""
    m = init
    for j in range(n):
        m = fmax(m, v[j] * scale)
    return m


# Sums run in chunks of _CHUNK elements: each chunk in the row's dtype (vectorised), the chunk
# sums added in float64. A float32 row of 70001 summed in one vectorised pass (each lane adding
# ~1000 terms one after another) is off by ~1e-5 relative, which at 70001 columns put the
# log-softmax gradient past twice PyTorch's error; chunks keep each lane's run short. LLVM
# vectorises a chunk only when it is its own function called on a slice (an inner loop over
# range(c, c + k) stays scalar, 10x slower), hence the _run_* helpers.
_CHUNK = 4096


@numba.njit(**_HELPER)
def _run_scaled_exp_store_sum(v, out, n, scale, m):
    s = cast(0.0, v)
    for j in range(n):
        e = fexp(v[j] * scale - m)
        out[j] = e
        s += e
    return s


@numba.njit(**_HELPER)
def _run_scaled_exp_sum(v, n, scale, m):
    s = cast(0.0, v)
    for j in range(n):
        s += fexp(v[j] * scale - m)
    return s


@numba.njit(**_HELPER)
def _run_scaled_exp_in_place(v, n, scale, m):
    s = cast(0.0, v)
    for j in range(n):
        e = fexp(v[j] * scale - m)
        v[j] = e
        s += e
    return s


@numba.njit(**_HELPER)
def _run_total(v, n):
    s = cast(0.0, v)
    for j in range(n):
        s += v[j]
    return s


@numba.njit(**_HELPER)
def _run_dot(a, b, n):
    s = cast(0.0, a)
    for j in range(n):
        s += a[j] * b[j]
    return s


@numba.njit(**_HELPER)
def scaled_exp_store_sum(v, out, n, scale, m):
    """out[j] <- exp(v[j] * scale - m) for j < n; returns their sum. ``out`` may be ``v``."""
    if out.ctypes.data == v.ctypes.data:
        return scaled_exp_in_place(v, n, scale, m)
    s = 0.0
    for c in range(0, n, _CHUNK):
        s += _run_scaled_exp_store_sum(v[c:], out[c:], min(_CHUNK, n - c), scale, m)
    return cast(s, v)


@numba.njit(**_HELPER)
def scaled_exp_sum(v, n, scale, m):
    """sum_j exp(v[j] * scale - m) over j < n."""
    s = 0.0
    for c in range(0, n, _CHUNK):
        s += _run_scaled_exp_sum(v[c:], min(_CHUNK, n - c), scale, m)
    return cast(s, v)


@numba.njit(**_HELPER)
def exp_sum(v, n, m):
    """sum_j exp(v[j] - m) over j < n."""
    return scaled_exp_sum(v, n, cast(1.0, v), m)


@numba.njit(**_HELPER)
def scaled_exp_in_place(v, n, scale, m):
    """v[j] <- exp(v[j] * scale - m) for j < n; returns their sum. (``scaled_exp_store_sum``'s
    own loop with ``out`` = ``v`` would run scalar: LLVM's runtime overlap check sends
    identical pointers down the unvectorised loop; it calls this instead.)"""
    s = 0.0
    for c in range(0, n, _CHUNK):
        s += _run_scaled_exp_in_place(v[c:], min(_CHUNK, n - c), scale, m)
    return cast(s, v)


@numba.njit(**_HELPER)
def exp_store_sum(v, n, m):
    """v[j] <- exp(v[j] - m) for j < n; returns their sum."""
    return scaled_exp_in_place(v, n, cast(1.0, v), m)


@numba.njit(**_HELPER)
def dot(a, b, n):
    """sum_j a[j] b[j] over j < n."""
    s = 0.0
    for c in range(0, n, _CHUNK):
        s += _run_dot(a[c:], b[c:], min(_CHUNK, n - c))
    return cast(s, a)


@numba.njit(**_HELPER)
def total(v, n):
    """sum_j v[j] over j < n."""
    s = 0.0
    for c in range(0, n, _CHUNK):
        s += _run_total(v[c:], min(_CHUNK, n - c))
    return cast(s, v)


# --- dropout ---------------------------------------------------------------------------------

_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)
_S30, _S27, _S31, _S40 = _U64(30), _U64(27), _U64(31), _U64(40)


@numba.njit
def dropout_keep(seed, index, threshold):
    """True when element ``index`` (its flat position in (B, Hq, L, S)) is kept for ``seed``:
    splitmix64 of (seed, index), top 24 bits compared with ``threshold`` = p * 2^24. A counter
    hash, so forward, backward and ``dropout_mask`` regenerate the same bits with no storage."""
    z = _U64(seed) + (_U64(index) + _U64(1)) * _GOLDEN
    z = (z ^ (z >> _S30)) * _MIX1
    z = (z ^ (z >> _S27)) * _MIX2
    z = z ^ (z >> _S31)
    return (z >> _S40) >= _U64(threshold)


def dropout_threshold(dropout_p: float) -> int:
    """The 24-bit threshold of ``dropout_keep``: P(drop) = threshold / 2^24 ~ dropout_p."""
    return round(dropout_p * (1 << 24))


# --- torch <-> numpy -------------------------------------------------------------------------


def np_dtype(dtype: torch.dtype):
    return np.float64 if dtype == torch.float64 else np.float32


def scalar(value: float, dtype: torch.dtype):
    """``value`` as a numpy scalar of the accumulation dtype, so kernels see one type."""
    return np_dtype(dtype)(value)


def array(t: torch.Tensor) -> np.ndarray:
    """The numpy view of a CPU tensor (no copy); detached only when it requires grad (a
    detach per argument is a measurable share of a small call)."""
    return (t.detach() if t.requires_grad else t).numpy()


def last(t: torch.Tensor, dim: int) -> torch.Tensor:
    """``t`` with ``dim`` moved last (``t`` itself when it is last already)."""
    return t if dim in (-1, t.ndim - 1) else t.movedim(dim, -1)


def rows(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` (..., n) as a C-contiguous (rows, n) tensor of ``dtype``: a view when it is one
    already, else one copy (16-bit inputs, strided rows)."""
    if t.dtype != dtype or not t.is_contiguous():
        t = t.to(dtype).contiguous()
    return t.view(-1, t.shape[-1]) if t.ndim != 2 else t


def _compact(t: torch.Tensor) -> torch.Tensor:
    """``t`` without its broadcast (stride-0) dims expanded: index 0 of each."""
    index = tuple(slice(0, 1) if st == 0 and n > 1 else slice(None)
                  for n, st in zip(t.shape, t.stride(), strict=True))
    return t[index]


# Placeholders the kernels never read (kind 0, or the other kind's values), made once: a new
# array per call costs Python time on small inputs. (Writable, as the real ones: a read-only
# array is another Numba type, so another compiled specialisation.)
_NO_MASK = {t: np.zeros(1, t) for t in (np.bool_, np.float32, np.float64, np.int64)}


def strided_mask(mask: torch.Tensor | None, shape, dtype: torch.dtype, dim: int = -1):
    """A mask broadcastable to ``shape``, as the kernels read it without expanding it:
    ``(kind, bool values, float values, row offsets, column stride)``. ``kind`` is 0 (none),
    1 (bool: keep where True) or 2 (additive, in ``dtype``); the values are the 1-d storage the
    mask spans, row r (all dims of ``shape`` but ``dim``, row-major) starts at ``offsets[r]``
    and its elements are ``stride`` apart (0 when broadcast along ``dim``)."""
    no_bool, no_float = _NO_MASK[np.bool_], _NO_MASK[np_dtype(dtype)]
    if mask is None:
        return 0, no_bool, no_float, _NO_MASK[np.int64], 0
    kind = 1 if mask.dtype == torch.bool else 2
    if kind == 2 and mask.dtype != dtype:
        mask = _compact(mask).to(dtype).expand(mask.shape)  # convert without expanding
    m = last(mask.expand(shape), dim)
    offsets = torch.zeros((), dtype=torch.int64)
    for n, st in zip(m.shape[:-1], m.stride()[:-1], strict=True):
        offsets = offsets.unsqueeze(-1) + torch.arange(n, dtype=torch.int64) * st  # row-major
    span = 1 + sum((n - 1) * st for n, st in zip(m.shape, m.stride(), strict=True))
    values = array(m.as_strided((span,), (1,)))
    offsets = array(offsets.reshape(-1))
    if kind == 1:
        return 1, values, no_float, offsets, m.stride(-1)
    return 2, no_bool, values, offsets, m.stride(-1)
