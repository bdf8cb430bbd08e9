"""Which backend runs an op: availability, the per-call choice, and ``use_backend``.

This module is the only place a backend is chosen. The choice is made per call, from (in order)
the innermost ``use_backend`` block on this thread, the ``FASTATTN_BACKEND`` environment
variable (read at call time), or, with nothing requested, the tuned table of the tensor's device
for the call's shape class, else the fixed order for the device. An explicitly requested backend
that cannot serve the call raises :class:`BackendUnavailableError`, naming the backends that
can; nothing falls back silently. :func:`explain` says which backend a call gets and why; with
``logging.getLogger("fastattn")`` at DEBUG, each choice the tuned table makes is logged.

Tuned table: ``fastattn-bench tune`` times every backend that can serve each op (see
:func:`candidates`) on the present device, forward and backward, per shape class (dtype and row
length for softmax and cross-entropy; dtype, head dim and key length for attention; see
``fastattn._tuned``), after checking each against the float64 reference, and writes the fastest
per class to ``$FASTATTN_CACHE_DIR/tune-<device>-<name>.json`` (default
``~/.cache/fastattn``). The table is read once per process and device, on the first call that
could use it (:func:`reload_tuned` reads it again). A table measured under another device name,
torch or fastattn version, extension presence or set of backends is stale, and is ignored with
one :class:`TunedTableWarning`, like a corrupt one; a missing one is silent. A table's
``native`` pick for a CUDA attention call the native CUDA kernels cannot take (float32 or
float64; ``fastattn.native.attention.cuda_unsupported``) gives way to the fixed order
(``fastattn.ops.attention.serving_backend``).

Fixed order, used when nothing is requested and the table has no entry for the call:

- CUDA tensors: ``triton`` if Triton imports, else ``torch``.
- CPU tensors: ``native`` where the compiled extension is built (its C++ kernels are faster
  than the ``torch`` compositions for every op and shape class ``fastattn-bench tune``
  measures), else ``torch``. ``triton`` on CPU is the Triton interpreter, which exists for tests
  and is never picked by default nor by a tuned table.

``numba`` serves CPU tensors (never CUDA ones) wherever ``import numba`` works (attention also
needs scipy and threadpoolctl; ``fastattn.numba.reason`` says why not); it runs by default
only where a tuned table picked it (its first call compiles for seconds).

Availability can depend on the op as well as the device: ``native`` (the compiled extension,
loaded by ``fastattn._ext``) serves the ops and devices it has kernels for, so
:func:`available_backends` and :func:`backend_status` take an optional ``op``
(``"softmax"``, ``"cross_entropy"``, ``"attention"``).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import threading
from collections.abc import Callable
from types import ModuleType

import torch

BACKENDS = ("torch", "triton", "native", "numba")
ENV_VAR = "FASTATTN_BACKEND"


class _State(threading.local):
    """Per-thread state: the stack of ``use_backend`` requests (innermost last)."""

    def __init__(self) -> None:
        self.stack: list[str] = []


_state = _State()


class BackendUnavailableError(RuntimeError):
    """A requested backend cannot run on this machine or for this device."""


class TunedTableWarning(UserWarning):
    """A tuned-backend table was found but ignored (stale or corrupt)."""


def _triton_reason(device_type: str | None) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device_type == "cpu" and not interpret:
        return "triton runs CPU tensors only through its interpreter (set TRITON_INTERPRET=1)"
    if device_type == "cuda" and not torch.cuda.is_available():
        return "no CUDA device is available"
    if device_type == "cuda" and interpret:
        return "TRITON_INTERPRET=1 is set, so triton runs CPU tensors only"
    if device_type is None and not interpret and not torch.cuda.is_available():
        return "no CUDA device, and TRITON_INTERPRET=1 is not set"
    if device_type not in (None, "cpu", "cuda"):
        return f"triton does not run on {device_type} tensors"
    return None


OPS = ("softmax", "cross_entropy", "attention")


def _reason_unavailable(name: str, device_type: str | None, op: str | None = None) -> str | None:
    """Why ``name`` cannot serve ``op`` (every op it has if None) on tensors on ``device_type``
    (any device if None); None if it can."""
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    if name == "torch":
        return None
    if name == "triton":
        return _triton_reason(device_type)
    if name == "native":
        return _lazy("fastattn._ext").reason(op, device_type)
    if name == "numba":
        # the package only; numba itself is imported on demand
        return _lazy("fastattn.numba").reason(device_type, op)
    raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")


# (backend, device type or None, op or None) found to serve. torch's and native's answers never
# change once given (native's is fixed when the extension loads), so they are asked once; not
# numba's or triton's, which follow the environment (TRITON_INTERPRET, what imports).
_SERVES: set[tuple[str, str | None, str | None]] = set()


def _reason_checked(name: str, device_type: str | None, op: str | None = None) -> str | None:
    """:func:`_reason_unavailable` for a known ``name``, remembered where it cannot change: a
    request runs this on every call, where each Python step counts."""
    key = (name, device_type, op)
    if key in _SERVES:
        return None
    why = _reason_unavailable(name, device_type, op)
    if why is None and name in ("torch", "native"):
        _SERVES.add(key)
    return why


def backend_status(
    device: torch.device | str | None = None, op: str | None = None
) -> dict[str, str | None]:
    """Map every known backend to None (usable) or the reason it is not usable on ``device``
    (for ``op`` when given)."""
    device_type = None if device is None else torch.device(device).type
    return {name: _reason_unavailable(name, device_type, op) for name in BACKENDS}


def available_backends(device: torch.device | str | None = None, op: str | None = None
                       ) -> list[str]:
    """The backends usable on this machine, or for tensors on ``device`` when given, for ``op``
    when given."""
    return [name for name, why in backend_status(device, op).items() if why is None]


def _check_known(name: object) -> str:
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKENDS)}")
    return name


class use_backend(contextlib.ContextDecorator):
    """Force backend ``name`` for fastattn calls made on this thread inside the block (also
    usable as a decorator).

    Raises ``ValueError`` for an unknown name and :class:`BackendUnavailableError` when the
    backend cannot run on this machine at all (both when it is created, so in the ``with``
    statement). A backend that runs here but not for a given tensor's device (``triton`` with
    CPU tensors and no interpreter) raises at that call.

    A class rather than a ``contextlib.contextmanager`` generator: entering and leaving a block
    is then two list operations, where the generator's machinery cost several microseconds a
    block, more with cold caches, which a call wrapped in its own block (as the benchmark
    providers are) pays every time.
    """

    def __init__(self, name: str) -> None:
        _check_known(name)
        why = _reason_checked(name, None)
        if why is not None:
            raise BackendUnavailableError(
                f"backend {name!r} is unavailable: {why}; available: "
                f"{', '.join(available_backends())}")
        self.name = name

    def __enter__(self) -> None:
        _state.stack.append(self.name)

    def __exit__(self, *exc: object) -> None:
        _state.stack.pop()


def requested_backend() -> tuple[str | None, str]:
    """The explicitly requested backend for this thread, and where the request came from."""
    stack = _state.stack
    if stack:
        return stack[-1], "use_backend()"
    env = os.environ.get(ENV_VAR, "").strip()
    if env:
        if env not in BACKENDS:
            raise ValueError(
                f"{ENV_VAR}={env!r} names an unknown backend; known backends: {', '.join(BACKENDS)}"
            )
        return env, ENV_VAR
    return None, "default"


def fixed_order(device_type: str, op: str | None = None) -> str:
    """The backend for ``op`` on ``device_type`` ("cpu", "cuda", ...) tensors when nothing is
    requested and no tuned table decides: for CUDA tensors ``triton`` where Triton can run
    them, for CPU tensors ``native`` where the compiled extension has CPU kernels for ``op``
    (for every op if None), else ``torch``."""
    if device_type == "cuda" and _reason_unavailable("triton", "cuda") is None:
        return "triton"
    if device_type == "cpu" and _reason_unavailable("native", "cpu", op) is None:
        return "native"
    return "torch"


def candidates(device: torch.device | str, op: str) -> list[str]:
    """The backends ``fastattn-bench tune`` times for ``op`` on ``device`` and a tuned table may
    name: the available ones, less the Triton interpreter for CPU tensors."""
    device_type = torch.device(device).type
    return [name for name in available_backends(device_type, op)
            if not (name == "triton" and device_type == "cpu")]


def reload_tuned() -> None:
    """Forget the tuned tables read so far, so the next call reads them again (after
    ``fastattn-bench tune`` wrote one, or ``FASTATTN_CACHE_DIR`` changed)."""
    from fastattn import _tuned

    _tuned.forget()


def _check_request(name: str, origin: str, device: torch.device, op: str | None) -> None:
    why = _reason_checked(name, device.type, op)
    if why is not None:
        what = f"{op} on {device.type} tensors" if op else f"on {device.type} tensors"
        raise BackendUnavailableError(
            f"backend {name!r} (requested by {origin}) cannot run {what}: {why}; "
            f"backends that can: {', '.join(available_backends(device, op))}"
        )


def select(device: torch.device, op: str | None = None, *, dtype: torch.dtype | None = None,
           size: int | tuple[int, int] | None = None) -> str:
    """The backend that serves a call of ``op`` whose tensors live on ``device``.

    ``dtype`` and ``size`` place the call in a shape class of the tuned table: ``size`` is the
    row length (softmax), the class count (cross-entropy) or ``(head_dim, key_len)``
    (attention); without them the fixed order applies when nothing is requested."""
    stack = _state.stack
    if stack:  # requested_backend()'s first case, inline: this runs on every call
        name, origin = stack[-1], "use_backend()"
    else:
        name, origin = requested_backend()
        if name is None:
            tuned = _lazy("fastattn._tuned")
            return tuned.choose(device.type, device.index, op, tuned.shape_class(op, dtype, size))
    _check_request(name, origin, device, op)
    return name


def explain(device: torch.device | str, op: str | None = None, *,
            dtype: torch.dtype | None = None, size: int | tuple[int, int] | None = None
            ) -> tuple[str, str]:
    """``(backend, reason)``: the backend :func:`select` gives a call of ``op`` on ``device``
    with ``dtype`` and ``size`` (as :func:`select` takes them), and why: ``"use_backend()"``,
    ``"FASTATTN_BACKEND"``, ``"tuned table <path> for class <key>"`` or ``"default order for
    <device type> (<why the tuned table did not decide>)"``. Raises as the call would when the
    requested backend cannot serve it."""
    device = torch.device(device)
    if op is not None and op not in OPS:
        raise ValueError(f"unknown op {op!r}; known ops: {', '.join(OPS)}")
    name, origin = requested_backend()
    if name is not None:
        _check_request(name, origin, device, op)
        return name, origin
    from fastattn import _tuned

    cls = _tuned.shape_class(op, dtype, size)
    name, table = _tuned.lookup(device.type, device.index, op, cls)
    if name is not None:
        return name, f"tuned table {table.path} for class {cls}"
    if table is not None:
        note = table.note or f"class {cls} of {op} is not in the tuned table {table.path}"
    elif device.type in ("cpu", "cuda"):
        note = "no shape class: give op, dtype and size"
    else:
        note = f"no tuned tables for {device.type} tensors"
    return fixed_order(device.type, op), f"default order for {device.type} ({note})"


_modules: dict[str, ModuleType] = {}


def _lazy(name: str) -> ModuleType:
    """Module ``name``, imported on first use and then remembered: the per-call paths ask for
    their modules on every call, and an import statement costs a lookup each time. Imported
    lazily because ``fastattn._tuned`` and ``fastattn._ext`` carry compiler decorators, which
    would make importing fastattn import torch._dynamo (and Triton with it), and the backends'
    modules import their kernels."""
    module = _modules.get(name)
    if module is None:
        module = _modules[name] = importlib.import_module(name)
    return module


_op_modules: dict[tuple[str, str], ModuleType] = {}


def launcher(backend: str, op: str, fn: str) -> Callable:
    """The launcher ``fn`` of ``op`` in ``backend``: ``fastattn.reference`` for torch, else
    ``fastattn.<backend>.<op>``, imported on first use (importing fastattn stays cheap)."""
    module = _op_modules.get((backend, op))
    if module is None:
        module = _op_modules[backend, op] = _lazy(
            "fastattn.reference" if backend == "torch"
            else f"fastattn.{_check_known(backend)}.{op}")
    return getattr(module, fn)
