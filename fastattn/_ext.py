"""Loads the compiled extension ``fastattn._C`` and remembers why it failed; the fake functions
of its ops.

The extension (``csrc/``) defines C++ ops named ``fastattn::native_*`` with
``TORCH_LIBRARY(fastattn, ...)``, beside the Python ops of ``fastattn.ops`` in the same
namespace, and registers a kernel per device (CPU today). It is loaded on first use, never at
``import fastattn``:

- normally by importing ``fastattn._C``, built by ``setup.py`` (``pip install
  --no-build-isolation -e .``);
- with ``FASTATTN_JIT=1``, by compiling ``csrc/`` of this checkout with
  ``torch.utils.cpp_extension.load`` (ninja, same sources and flags as ``setup.py``, cached in
  torch's extension directory), for working on the C++ code without reinstalling.

:func:`reason` says why the ``native`` backend cannot serve an op on a device: not built, the
import error, or no kernel registered for that device (the dispatcher is asked, so CUDA tensors
become served when CUDA kernels are registered, without a change here).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import threading
from pathlib import Path

import torch

# fastattn op -> the C++ op whose kernels decide where the native backend serves it.
NATIVE_OPS = {"softmax": "native_softmax_fwd", "cross_entropy": "native_cross_entropy_fwd",
              "attention": "native_attention_fwd"}
JIT_VAR = "FASTATTN_JIT"

_lock = threading.Lock()
_state: dict[str, object] = {}
# (op, device type) -> reason, once the extension has loaded (see reason()).
_reasons: dict[tuple[str | None, str | None], str | None] = {}


def _jit_build() -> None:
    root = Path(__file__).resolve().parents[1]
    setup_py = root / "setup.py"
    if not (root / "csrc").is_dir() or not setup_py.is_file():
        raise ImportError(f"{JIT_VAR}=1 needs a source checkout: no csrc/ in {root}")
    spec = importlib.util.spec_from_file_location("_fastattn_setup", setup_py)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)  # functions only: setup() runs under __main__ alone
    from torch.utils.cpp_extension import load

    load(name="fastattn_C", sources=[str(p) for p in build.cpp_sources(root)],
         extra_include_paths=[str(root / "csrc")], extra_cflags=build.CXX_FLAGS,
         extra_ldflags=build.LINK_FLAGS, is_python_module=False, verbose=False)


def _load() -> str | None:
    """Load the extension once; None on success, else why it is unavailable."""
    if "reason" in _state:  # written once, under the lock; every launch asks, so no lock here
        return _state["reason"]
    with _lock:
        if "reason" in _state:
            return _state["reason"]
        why = None
        try:
            if os.environ.get(JIT_VAR, "0") == "1":
                _jit_build()
            else:
                importlib.import_module("fastattn._C")
        except ModuleNotFoundError as exc:
            if exc.name != "fastattn._C":
                why = f"fastattn._C failed to import: {exc}"
            else:
                why = ("the C++ extension fastattn._C is not built (install with a C++ compiler "
                       "and torch present: pip install --no-build-isolation -e ., without "
                       f"FASTATTN_SKIP_EXT=1; or set {JIT_VAR}=1 in a source checkout)")
        except Exception as exc:  # a build or load error of any kind: report it, never crash
            why = f"the C++ extension failed to load: {type(exc).__name__}: {exc}"
        if why is None:
            _register_fakes()
        _state["reason"] = why
        return why


@torch.compiler.assume_constant_result  # fixed once loaded; dynamo runs it, never traces it
def reason(op: str | None = None, device_type: str | None = None) -> str | None:
    """Why ``native`` cannot run ``op`` (any op if None) on ``device_type`` (any if None)."""
    # Every call of a native op asks this; the dispatcher's answer is fixed once the library is
    # loaded (its kernels register at load), and asking costs microseconds, so it is kept (and
    # looked up first: this runs on every call, where each Python step counts).
    key = (op, device_type)
    if key in _reasons:
        return _reasons[key]
    why = _load()
    if why is not None:
        return why
    _reasons[key] = why = _reason_loaded(op, device_type)
    return why


def _reason_loaded(op: str | None, device_type: str | None) -> str | None:
    if op is not None and op not in NATIVE_OPS:
        return f"the native extension has no {op} kernels yet"
    if device_type is None:
        return None
    if device_type not in ("cpu", "cuda"):
        return f"the native extension does not run on {device_type} tensors"
    names = [NATIVE_OPS[op]] if op is not None else list(NATIVE_OPS.values())
    key = "CPU" if device_type == "cpu" else "CUDA"
    if not any(torch._C._dispatch_has_kernel_for_dispatch_key(f"fastattn::{n}", key)
               for n in names):
        return (f"the native extension has no {device_type.upper()} kernels yet"
                if device_type == "cuda" else "the native extension has no CPU kernels")
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    return None


def _row_output(shape, dim, dtype, device):
    from fastattn.reference import row_output

    return row_output(shape, dim, dtype, device)


def _register_fakes() -> None:
    """Fake functions of the C++ ops, for torch.compile and opcheck. They live in this module
    because the C++ library names it (set_python_module) as the home of its Python parts."""

    # The differentiable ops (native_softmax, native_cross_entropy, native_attention) return
    # what their forward kernels return.
    def softmax_fwd(input, dim, scale, mask, causal, log, out_dtype):
        shape = input.shape if input.dim() else (1,)
        out = _row_output(shape, dim % len(shape), out_dtype, input.device)
        return out if input.dim() else out.reshape(())

    torch.library.register_fake("fastattn::native_softmax_fwd")(softmax_fwd)
    torch.library.register_fake("fastattn::native_softmax")(softmax_fwd)

    @torch.library.register_fake("fastattn::native_softmax_bwd")
    def _(grad_output, output, dim, scale, mask, causal, log, input_dtype):
        shape = output.shape if output.dim() else (1,)
        out = _row_output(shape, dim % len(shape), input_dtype, output.device)
        return out if output.dim() else out.reshape(())

    @torch.library.register_fake("fastattn::native_cross_entropy")
    def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                      softcap):
        acc = torch.float64 if input.dtype == torch.float64 else torch.float32
        tokens = tuple(input.shape[:1]) + tuple(input.shape[2:])
        loss = input.new_empty(tokens if reduction == 0 else (), dtype=acc)
        return loss, input.new_empty(tokens, dtype=torch.float32)

    @torch.library.register_fake("fastattn::native_cross_entropy_fwd")
    def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, grad):
        return cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing,
                             z_loss, softcap)

    def attention_fwd(q, k, v, mask, seed, dropout_p, scale, window_left, window_right,
                      align_bottom, softcap):
        from fastattn.reference import attention_output

        out = attention_output(q, v.shape[-1], q.dtype)
        return out, q.new_empty(q.shape[:3], dtype=torch.float32)

    torch.library.register_fake("fastattn::native_attention_fwd")(attention_fwd)
    torch.library.register_fake("fastattn::native_attention")(attention_fwd)

    @torch.library.register_fake("fastattn::native_attention_bwd")
    def _(grad_out, q, k, v, out, lse, mask, seed, dropout_p, scale, window_left, window_right,
          align_bottom, softcap, mask_grad):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        B, H, L, _ = q.shape
        dmask = q.new_empty((B, H, L, k.shape[2]) if mask_grad else (0,), dtype=acc)
        return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask

    @torch.library.register_fake("fastattn::native_attention_dropout_mask")
    def _(seed, shape, dropout_p):
        return seed.new_empty(shape, dtype=torch.bool)
