"""The ``numba`` backend: CPU kernels compiled by Numba at first use (no build step), one module
per op as in ``fastattn.triton`` so ``fastattn.backends.launcher`` finds them by name;
``common`` holds the pieces they share (a vectorisable exp, NaN-safe max, the dropout hash,
torch <-> numpy adapters). This package file only says whether the backend can run; it does
not import numba until asked."""

from __future__ import annotations

import functools
import importlib
import importlib.util

import torch


@functools.cache
def import_error() -> str | None:
    """Why ``import numba`` fails here (None if it works); tried once per process."""
    if importlib.util.find_spec("numba") is None:
        return "numba is not installed (pip install numba)"
    try:
        importlib.import_module("numba")
    except Exception as e:  # noqa: BLE001 - any import failure (e.g. a numpy it rejects)
        return f"numba does not import: {type(e).__name__}: {e}"
    return None


@functools.cache
def _blas_error() -> str | None:
    """Why the attention kernels cannot use BLAS here; None if they can. Their tile products
    call scipy's BLAS gemm (through Numba's helper, as its ``np.dot`` does), and threadpoolctl
    must hold it to one thread inside the parallel kernels (OpenBLAS called from Numba's OpenMP
    threads otherwise warns that it may hang and runs tens of times slower)."""
    for module in ("scipy", "threadpoolctl"):
        if importlib.util.find_spec(module) is None:
            return (f"numba's attention kernels multiply tiles with scipy's BLAS gemm, held "
                    f"to one thread by threadpoolctl: pip install {module}")
    return None


@torch.compiler.assume_constant_result  # fixed per process: dynamo runs it, never traces it
def reason(device_type: str | None = None, op: str | None = None) -> str | None:
    """Why the numba backend cannot run ``op`` (any op if None) on ``device_type`` tensors (any
    device if None); None if it can: CPU tensors, wherever numba imports (and, for attention,
    scipy and threadpoolctl are installed: see ``_blas_error``)."""
    if device_type not in (None, "cpu"):
        return f"numba kernels run on CPU tensors only, not on {device_type} tensors"
    why = import_error()
    if why is None and op == "attention":
        why = _blas_error()
    return why
