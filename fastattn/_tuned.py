"""The tuned-backend table: written by ``fastattn-bench tune``, read by :mod:`fastattn.backends`.

One JSON file per device kind and name in the cache directory (:func:`fastattn._cache.cache_dir`),
``tune-cpu-<cpu model>.json`` or ``tune-cuda-<gpu name>.json`` (names lower-cased, runs of other
characters than letters and digits turned into ``-``)::

    {"format": 1,
     "identity": {"device_type": "cpu", "device_name": "AMD EPYC 7B13", "torch": "2.13.0+cpu",
                  "fastattn": "0.1.0", "extension": true,
                  "backends": {"softmax": ["torch", "native", "numba"]}},
     "created": "2025-01-31T12:00:00Z",
     "command": "fastattn-bench tune --quick",
     "ops": {"softmax": {"float32/cols<=1024": {"backend": "native",
                                                "times_ms": {"torch": 0.41, "native": 0.12,
                                                             "numba": 0.2}}}}}

``identity`` is what the times were measured under: the device, the torch and fastattn versions,
whether the compiled extension loaded, and per op the backends that could be chosen
(:func:`fastattn.backends.candidates`). The thread count is not part of it (Numba's OpenMP
layer changes PyTorch's on its first launch, so it is not a stable fact of a process): tune
with the thread settings you run with. A table whose format version or identity differs from
the present process, or that names a backend that cannot serve its op now, is stale; one that
is not valid JSON or has fields of the wrong type is corrupt. Either is ignored with one
:class:`~fastattn.backends.TunedTableWarning` when it is read; a missing table is silent.

Shape classes (:func:`shape_class`) are few and cheap to compute on every call: softmax and
cross-entropy by dtype and row length (the class count for cross-entropy), attention by dtype,
query/key head dim and key length, each length in a bucket of :data:`ROW_LIMITS`,
:data:`HEAD_DIM_LIMITS` or :data:`KEY_LEN_LIMITS` (``cols<=1024``, ..., ``cols>65536``).

Each device's table is read once per process (:func:`forget` clears what was read) and
:func:`choose` answers from it; ``torch.compile`` runs :func:`choose` while tracing and keeps
its answer as a constant. This module is imported on the first call that needs it, never by
``import fastattn``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastattn import backends
from fastattn._cache import cache_dir

FORMAT = 1
DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32",
          torch.float64: "float64"}
# Row lengths: attention-score rows fit one block (<= 1k), a few blocks (<= 8k), vocabularies up
# to 64k (GPT-2's 50257), and the largest vocabularies (Llama-3's 128256, Gemma's 256000).
ROW_LIMITS = (1024, 8192, 65536)
# Head dims of real models (64, 128, 256: every head dim fastattn takes is <= 256, so no class
# above) and key lengths from short to long context.
HEAD_DIM_LIMITS = (64, 128, 256)
KEY_LEN_LIMITS = (1024, 4096, 16384)


def _labels(name: str, limits: Sequence[int], open_end: bool = True) -> tuple[str, ...]:
    """One label per bucket: ``name<=limit`` for each limit, then ``name>last`` if
    ``open_end``."""
    return (*(f"{name}<={limit}" for limit in limits),
            *((f"{name}>{limits[-1]}",) if open_end else ()))


def _bucket(value: int, limits: Sequence[int]) -> int:
    for i, limit in enumerate(limits):
        if value <= limit:
            return i
    return len(limits)


# Every class key, looked up rather than formatted on each call.
_ROW_CLASSES = {(dtype, i): f"{name}/{label}" for dtype, name in DTYPES.items()
                for i, label in enumerate(_labels("cols", ROW_LIMITS))}
_ATTENTION_CLASSES = {(dtype, i, j): f"{name}/{d}/{s}" for dtype, name in DTYPES.items()
                      for i, d in enumerate(_labels("d", HEAD_DIM_LIMITS, open_end=False))
                      for j, s in enumerate(_labels("s", KEY_LEN_LIMITS))}


def shape_class(op: str | None, dtype: torch.dtype | None,
                size: int | tuple[int, int] | None) -> str | None:
    """The class key of a call of ``op`` on ``dtype`` inputs: ``size`` is the row length
    (softmax), the class count (cross-entropy) or ``(head_dim, key_len)`` (attention). None when
    any is None or the dtype has no class (the default order then applies)."""
    if op is None or dtype is None or size is None:
        return None
    if op == "attention":
        head_dim, key_len = size
        return _ATTENTION_CLASSES.get(
            (dtype, _bucket(head_dim, HEAD_DIM_LIMITS), _bucket(key_len, KEY_LEN_LIMITS)))
    a, b, c = ROW_LIMITS  # _bucket unrolled: this runs on every softmax and cross-entropy call
    return _ROW_CLASSES.get((dtype, 0 if size <= a else 1 if size <= b else 2 if size <= c else 3))


def classes(op: str) -> list[str]:
    """Every class key of ``op``."""
    return list((_ATTENTION_CLASSES if op == "attention" else _ROW_CLASSES).values())


def device_name(device: torch.device) -> str:
    """The CPU model or the GPU name of ``device``."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    from fastattn.bench.env import cpu_name

    return cpu_name()


def path_for(device: torch.device) -> Path:
    """Where the table of ``device`` lives."""
    slug = re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-") or "unknown"
    return cache_dir() / f"tune-{device.type}-{slug}.json"


def identity(device: torch.device, ops: Sequence[str]) -> dict:
    """What a table measured on ``device`` for ``ops`` now would record as its identity."""
    from fastattn import __version__, _ext

    return {"device_type": device.type, "device_name": device_name(device),
            "torch": torch.__version__, "fastattn": __version__,
            "extension": _ext.reason() is None,
            "backends": {op: backends.candidates(device, op) for op in ops}}


def make(device: torch.device, ops: Mapping[str, Mapping[str, dict]], command: str | None
         ) -> dict:
    """A table for ``device`` holding ``ops`` (op -> class -> ``{"backend", "times_ms"}``)."""
    return {"format": FORMAT, "identity": identity(device, list(ops)),
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "command": command or "", "ops": {op: dict(c) for op, c in ops.items()}}


def write(table: dict, path: str | os.PathLike) -> Path:
    """Write ``table`` to ``path`` atomically (a temporary file, then ``os.replace``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


@dataclass(frozen=True)
class Table:
    """A table as read for one device: ``choices`` (op -> class -> backend) when it is used,
    else empty with ``note`` saying why (missing, stale, corrupt)."""

    path: Path
    choices: dict[str, dict[str, str]] = field(default_factory=dict)
    note: str | None = None


def _corrupt(doc: object) -> str | None:
    """Why ``doc`` (format version already checked) is not a table; None if it is one."""
    for key, kind in (("identity", dict), ("created", str), ("command", str), ("ops", dict)):
        if not isinstance(doc.get(key), kind):
            return f"field {key!r} is missing or not a {kind.__name__}"
    ident = doc["identity"]
    for key in ("device_type", "device_name", "torch", "fastattn"):
        if not isinstance(ident.get(key), str):
            return f"identity.{key} is missing or not a string"
    if not isinstance(ident.get("extension"), bool):
        return "identity.extension is missing or not a bool"
    listed = ident.get("backends")
    if not isinstance(listed, dict) or set(listed) != set(doc["ops"]) or not all(
            isinstance(v, list) and all(isinstance(b, str) for b in v) for v in listed.values()):
        return "identity.backends is not a list of backend names for each op of the table"
    for op, entries in doc["ops"].items():
        if op not in backends.OPS:
            return f"unknown op {op!r} (known: {', '.join(backends.OPS)})"
        if not isinstance(entries, dict):
            return f"ops.{op} is not an object"
        known = set(classes(op))
        for key, entry in entries.items():
            if key not in known:
                return f"unknown shape class {key!r} for {op}"
            if not (isinstance(entry, dict) and isinstance(entry.get("backend"), str)
                    and isinstance(entry.get("times_ms"), dict)
                    and all(isinstance(v, (int, float)) and not isinstance(v, bool)
                            for v in entry["times_ms"].values())):
                return (f"ops.{op}[{key!r}] is not {{'backend': name, 'times_ms': "
                        "{name: milliseconds}}")
    return None


def _stale(doc: dict, device: torch.device) -> str | None:
    """How ``doc`` (a valid table) differs from what this process would measure on
    ``device``; None if it does not."""
    now = identity(device, list(doc["ops"]))
    then = doc["identity"]
    for key in ("device_type", "device_name", "torch", "fastattn", "extension"):
        if then.get(key) != now.get(key):
            return (f"it was measured with {key} {then.get(key)!r}, this process has "
                    f"{now.get(key)!r}")
    for op, listed in then["backends"].items():
        if listed != now["backends"][op]:
            return (f"it measured {', '.join(listed)} for {op}; the backends that can serve "
                    f"{op} now are {', '.join(now['backends'][op])}")
    for op, entries in doc["ops"].items():
        for key, entry in entries.items():
            if entry["backend"] not in now["backends"][op]:
                why = backends.backend_status(device, op).get(entry["backend"])
                return (f"it names {entry['backend']!r} for {op} {key}, which cannot be chosen "
                        f"for {op} on {device.type} now"
                        + (f" ({why})" if why else " (not one of the measured backends)"))
    return None


def _ignored(path: Path, kind: str, why: str) -> Table:
    note = f"{kind} tuned table {path} ignored: {why}"
    warnings.warn(f"fastattn: {note}; the default backend order applies. Run "
                  "`fastattn-bench tune` to measure this machine again.",
                  backends.TunedTableWarning,
                  stacklevel=2)
    return Table(path, note=note)


def load(device: torch.device) -> Table:
    """The table of ``device`` checked against this process. Stale and corrupt tables give an
    empty :class:`Table` and one ``TunedTableWarning``; a missing one an empty table, silently.
    """
    path = path_for(device)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return Table(path, note=f"no tuned table at {path}")
    except (OSError, UnicodeDecodeError) as e:
        return _ignored(path, "unreadable", f"{type(e).__name__}: {e}")
    try:
        doc = json.loads(text)
    except ValueError as e:
        return _ignored(path, "corrupt", f"not valid JSON ({e})")
    if not isinstance(doc, dict) or isinstance(doc.get("format"), bool) or not isinstance(
            doc.get("format"), int):
        return _ignored(path, "corrupt", "not an object with an integer 'format'")
    if doc["format"] != FORMAT:
        return _ignored(path, "stale", f"format version {doc['format']}, this fastattn reads "
                                       f"version {FORMAT}")
    why = _corrupt(doc)
    if why is not None:
        return _ignored(path, "corrupt", why)
    why = _stale(doc, device)
    if why is not None:
        return _ignored(path, "stale", why)
    choices = {op: {key: entry["backend"] for key, entry in entries.items()}
               for op, entries in doc["ops"].items()}
    return Table(path, choices)


# (device type, device index) -> its table as read, once per process (forget() clears it).
_tables: dict[tuple[str, int | None], Table] = {}
_tables_lock = threading.Lock()
_log = logging.getLogger("fastattn")


# (device index, op, class) -> the fixed order's backend for CPU tensors, kept for classes the
# CPU table has no entry for (see choose; forget() clears it with the tables).
_cpu_fixed: dict[tuple[int | None, str | None, str | None], str] = {}


def forget() -> None:
    """Forget the tables read so far: the next lookup reads them again."""
    with _tables_lock:
        _tables.clear()
        _cpu_fixed.clear()


def _table(device_type: str, index: int | None) -> Table:
    """The table of the device, read on first use and kept (see :func:`forget`)."""
    if device_type == "cuda" and index is None:
        index = torch.cuda.current_device()
    table = _tables.get((device_type, index))
    if table is None:
        with _tables_lock:
            table = _tables.get((device_type, index))
            if table is None:
                table = _tables[(device_type, index)] = load(torch.device(device_type, index))
    return table


def lookup(device_type: str, index: int | None, op: str | None, cls: str | None
           ) -> tuple[str | None, Table | None]:
    """The table's backend for shape class ``cls`` of ``op`` (None if it has none), and the
    table (None where no table applies: no class, or a device other than cpu and cuda)."""
    if cls is None or device_type not in ("cpu", "cuda"):
        return None, None
    table = _table(device_type, index)
    return table.choices.get(op, {}).get(cls), table


@torch.compiler.assume_constant_result  # fixed per process: dynamo runs it, never traces it
def choose(device_type: str, index: int | None, op: str | None, cls: str | None) -> str:
    """The backend of a call nobody requested one for: the table's for its class, else the
    fixed order's. Logged at DEBUG on the ``fastattn`` logger when the table decides.

    For CPU tensors a class the table has no entry for keeps the fixed order's answer until
    :func:`forget`: that answer depends only on the native extension's CPU kernels, fixed once
    it is loaded, and this runs on every such call. (The CUDA order also depends on Triton's
    environment, so it is asked every time.)"""
    if device_type == "cpu":
        name = _cpu_fixed.get((index, op, cls))
        if name is not None:
            return name
    name, table = lookup(device_type, index, op, cls)
    if name is None:
        name = backends.fixed_order(device_type, op)
        if device_type == "cpu" and table is not None and _tables.get(("cpu", index)) is table:
            _cpu_fixed[index, op, cls] = name  # (not if forget() ran meanwhile)
        return name
    if _log.isEnabledFor(logging.DEBUG):
        _log.debug("%s on %s: %s, from the tuned table %s for class %s", op, device_type, name,
                   table.path, cls)
    return name
