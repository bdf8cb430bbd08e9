"""Ceilings measured on the device itself: copy bandwidth and matmul throughput.

A result is reported as a percentage of what this device demonstrably does, not of a datasheet:

- ``bandwidth_gbs``: ``dst.copy_(src)`` of a buffer far larger than every cache (bytes read plus
  bytes written, per second);
- ``matmul_bf16_tflops`` and ``matmul_fp32_tflops``: a large square ``torch.matmul`` (fp32 under
  PyTorch's current TF32 setting, which is recorded).

Each is the throughput at the median of repeated timed calls. They are cached per device (name,
driver, torch version, thread count) in ``$FASTATTN_CACHE_DIR/ceilings.json`` (default
``~/.cache/fastattn``), since they take seconds to measure and change only with the machine.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from fastattn._cache import cache_dir
from fastattn.bench import timing
from fastattn.bench.env import device_info

NAMES = ("bandwidth_gbs", "matmul_bf16_tflops", "matmul_fp32_tflops")


def cache_path() -> Path:
    return cache_dir() / "ceilings.json"


def device_key(device: torch.device) -> str:
    info = device_info(device)
    parts = [info["type"], info["name"], torch.__version__]
    if info["type"] == "cuda":
        parts += [info.get("capability"), info.get("driver")]
    else:
        parts += [f"threads={torch.get_num_threads()}"]
    return "|".join(str(p) for p in parts)


def _time(fn, device: torch.device) -> float:
    """Median milliseconds of ``fn``."""
    if device.type == "cuda":
        t = timing.time_cuda(fn, device=device, warmup_ms=20, rep_ms=100, flush_l2=False,
                             min_reps=5)
    else:
        t = timing.time_host({"f": fn}, warmup_ms=20, rep_ms=150, min_reps=3)["f"]
    return t.median_ms


def measure(device: torch.device | str) -> dict[str, float | str | None]:
    """Measure the ceilings of ``device`` now (seconds on a GPU, about a second on a CPU)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        copy_bytes = int(min(1 << 30, free // 8))
        n_bf16, n_fp32 = 8192, 8192
    elif device.type == "cpu":
        copy_bytes = 256 << 20
        n_bf16, n_fp32 = 1024, 1024
    else:
        raise ValueError(f"device must be a cpu or cuda device, got {device}")
    out: dict[str, float | str | None] = {}
    src = torch.empty(copy_bytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = _time(lambda s=src, d=dst: d.copy_(s), device)
    out["bandwidth_gbs"] = 2 * src.nbytes / (ms * 1e-3) / 1e9
    del src, dst
    for dtype, n, name in ((torch.bfloat16, n_bf16, "matmul_bf16_tflops"),
                           (torch.float32, n_fp32, "matmul_fp32_tflops")):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        ms = _time(lambda a=a, b=b: torch.matmul(a, b), device)
        out[name] = 2 * n**3 / (ms * 1e-3) / 1e12
    out["method"] = (f"copy of {copy_bytes >> 20} MiB; matmul {n_bf16}^3 bf16, {n_fp32}^3 fp32; "
                     "median of timed calls")
    out["fp32_matmul_precision"] = torch.get_float32_matmul_precision()
    out["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return out


def get(device: torch.device | str, *, use_cache: bool = True) -> dict:
    """The ceilings of ``device``: from the cache when present (and ``use_cache``), else measured
    now and written to the cache. The returned dict says which in ``source``."""
    device = torch.device(device)
    key = device_key(device)
    path = cache_path()
    cache: dict = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
    if use_cache and key in cache and all(n in cache[key] for n in NAMES):
        return {**cache[key], "source": f"cache {path}"}
    measured = measure(device)
    cache[key] = measured
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1, sort_keys=True))
    except OSError:
        pass  # a read-only home is no reason to fail a benchmark run; the figures are still used
    return {**measured, "source": "measured now"}


def ceiling_for(unit: str, dtype: torch.dtype) -> str | None:
    """Which ceiling a result of ``unit`` ("flop"/"byte") in ``dtype`` is measured against."""
    if unit == "byte":
        return "bandwidth_gbs"
    if dtype in (torch.bfloat16, torch.float16):
        return "matmul_bf16_tflops"  # same tensor-core rate for fp16 and bf16 on Ampere/Hopper
    if dtype == torch.float32:
        return "matmul_fp32_tflops"
    return None
