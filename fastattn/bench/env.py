"""What a result was measured on: device, driver, CUDA, library versions, clocks, git commit.

Everything here is read when asked (never at import). Fields that cannot be read are recorded as
None with no guess in their place.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch


def _run(cmd: list[str], cwd: str | None = None) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def cpu_name() -> str:
    """The CPU model as /proc/cpuinfo names it, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _nvidia_smi(index: int) -> dict[str, str | None]:
    fields = ["driver_version", "clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem",
              "power.limit", "pstate", "persistence_mode"]
    out = _run(["nvidia-smi", f"--id={index}", "--format=csv,noheader,nounits",
                f"--query-gpu={','.join(fields)}"])
    if not out:
        return {}
    values = [v.strip() for v in out.splitlines()[0].split(",")]
    return {k: (v if v not in ("", "[N/A]", "N/A") else None)
            for k, v in zip(fields, values, strict=False)}


def device_info(device: torch.device | str) -> dict:
    """Identity of ``device``: the ``name`` the compare gate matches on, plus details."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        props = torch.cuda.get_device_properties(index)
        smi = _nvidia_smi(index)
        return {
            "type": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "multiprocessors": props.multi_processor_count,
            "memory_bytes": props.total_memory,
            "l2_bytes": getattr(props, "L2_cache_size", None),
            "driver": smi.get("driver_version"),
            "clocks_mhz": {k: smi.get(k) for k in
                           ("clocks.sm", "clocks.mem", "clocks.max.sm", "clocks.max.mem")},
            "power_limit_w": smi.get("power.limit"),
            "pstate": smi.get("pstate"),
        }
    if device.type == "cpu":
        return {
            "type": "cpu",
            "name": cpu_name(),
            "cores": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "memory_bytes": _total_ram(),
        }
    raise ValueError(f"device must be a cpu or cuda device, got {device}")


def _total_ram() -> int | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        return int(pages) * int(os.sysconf("SC_PAGE_SIZE"))
    except (OSError, ValueError):
        return None


def git_info(path: str | os.PathLike | None = None) -> dict[str, str | bool | None]:
    """Commit of the checkout holding ``path`` (default: this package) and whether it is dirty."""
    where = str(Path(path if path is not None else __file__).resolve().parent)
    commit = _run(["git", "rev-parse", "HEAD"], cwd=where)
    status = _run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where)
    branch = _run(["git", "rev-parse", "--abbrev-ref", "HEAD"], cwd=where)
    return {"commit": commit, "branch": branch,
            "dirty": None if status is None else bool(status)}


def library_versions() -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    import fastattn

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available()
        else None,
        "triton": triton_version,
        "fastattn": fastattn.__version__,
    }


def command_line(argv: list[str]) -> str | None:
    """The command as typed: ``fastattn-bench ...`` or ``python -m fastattn.bench ...``."""
    if not argv:
        return None
    head = Path(argv[0]).name
    if head == "__main__.py":
        return shlex.join([Path(sys.executable).name, "-m", "fastattn.bench", *argv[1:]])
    return shlex.join([head, *argv[1:]])


def environment(device: torch.device | str, argv: list[str] | None = None) -> dict:
    """Everything a result file records about where and how it was measured."""
    argv = sys.argv if argv is None else argv
    return {
        "device": device_info(device),
        "versions": library_versions(),
        "git": git_info(),
        "platform": platform.platform(),
        "command": command_line(argv),
        "env": {k: os.environ[k] for k in ("FASTATTN_BACKEND", "TRITON_INTERPRET",
                                           "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS")
                if k in os.environ},
    }
