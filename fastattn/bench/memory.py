"""Peak memory of one call.

GPU (:func:`cuda_peak`): PyTorch's caching-allocator statistics around the call: the absolute
peak of allocated memory, its increase over what was allocated just before the call (the
call's own footprint: outputs, saved tensors, workspace), and the peak reserved by the
allocator.

CPU (:func:`cpu_peak_in_subprocess`): the increase of the peak resident set size during the
call, measured in a fresh Python process that builds only this case's inputs, calls once to
warm up, resets the kernel's high-water mark (``/proc/self/clear_refs``), and calls again.
``tracemalloc`` would not see PyTorch's allocations, and the parent process's allocator holds
memory from earlier cases, hence the fresh process. The child runs with glibc's mmap threshold
fixed at 64 KiB and trims the heap before measuring, so memory freed by the warm-up call goes
back to the system instead of being silently reused by the measured call.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import torch


def cuda_peak(fn: Callable[[], object], device: torch.device) -> dict:
    """Allocator peaks around one call of ``fn``."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    reserved = torch.cuda.max_memory_reserved(device)
    del out
    return {"method": "torch.cuda.max_memory_allocated", "before_bytes": before,
            "peak_allocated_bytes": peak, "peak_increase_bytes": peak - before,
            "peak_reserved_bytes": reserved}


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _malloc_trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc: nothing to trim


def rss_peak(fn: Callable[[], object]) -> dict:
    """Peak resident-set increase of one call of ``fn`` in this process (Linux)."""
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError as e:
        raise RuntimeError(f"cannot reset the peak RSS (/proc/self/clear_refs): {e}") from e
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    del out
    if before is None or peak is None:
        raise RuntimeError("cannot read VmRSS/VmHWM from /proc/self/status")
    return {"method": "peak RSS in a fresh process (VmHWM after clear_refs)",
            "before_bytes": before * 1024, "peak_rss_bytes": peak * 1024,
            "peak_increase_bytes": (peak - before) * 1024}


def cpu_peak_in_subprocess(spec: dict, timeout_s: float = 120.0) -> dict:
    """Run ``python -m fastattn.bench.memory SPEC`` and return what it measured.

    ``spec`` names the case (``Case.to_dict()``), the provider and the mode. Raises
    ``RuntimeError`` with the child's error output when it fails."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # large blocks are mmapped and unmapped on free
    proc = subprocess.run([sys.executable, "-m", "fastattn.bench.memory", json.dumps(spec)],
                          capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError("memory subprocess failed: " + " | ".join(tail))
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _main(argv: list[str]) -> int:
    from fastattn.bench.runner import build_call
    from fastattn.bench.suite import Case, get_op

    if len(argv) != 1:
        print("usage: python -m fastattn.bench.memory SPEC_JSON", file=sys.stderr)
        return 2
    spec = json.loads(argv[0])
    case = Case.from_dict(spec["case"])
    op = get_op(case.op)
    provider = next(p for p in op.providers() if p.name == spec["provider"])
    call = build_call(op, case, provider, spec["mode"], torch.device("cpu"))
    call()  # warm-up: compilation, one-time allocations
    print(json.dumps(rss_peak(call)))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
