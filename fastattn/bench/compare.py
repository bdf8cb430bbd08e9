"""``fastattn-bench compare BASE.json NEW.json``: the regression gate.

For every (op, case, dtype, mode, provider) timed in both files it takes the ratio of median
times ``new / base``. The gate fails when one kernel is slower than ``per_kernel`` allows, when
the geometric mean of all ratios is slower than ``geomean`` allows, or when a kernel that ran
in BASE fails or runs out of memory in NEW. By default only fastattn's own providers are gated
(PyTorch's and third-party kernels are context, not ours to regress). Files from different
devices are refused: a ratio across GPUs measures the GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

DEFAULT_PER_KERNEL = 0.10  # a kernel may be at most 10% slower
DEFAULT_GEOMEAN = 0.03  # the suite's geometric mean at most 3% slower


class DeviceMismatchError(ValueError):
    """BASE and NEW were measured on different devices."""


@dataclass
class Verdict:
    ok: bool
    geomean: float | None
    rows: list[dict] = field(default_factory=list)  # key, base_ms, new_ms, ratio, verdict
    problems: list[str] = field(default_factory=list)
    only_in_base: list[str] = field(default_factory=list)
    only_in_new: list[str] = field(default_factory=list)


def _key(r: dict) -> str:
    return f"{r['op']} | {r['case']} | {r['dtype']} | {r['mode']} | {r['provider']}"


def _device(doc: dict) -> str:
    d = doc["environment"]["device"]
    return f"{d.get('name')} ({d.get('type')}, capability {d.get('capability', '-')})"


def compare(base: dict, new: dict, *, per_kernel: float = DEFAULT_PER_KERNEL,
            geomean: float = DEFAULT_GEOMEAN, allow_different_devices: bool = False,
            all_providers: bool = False) -> Verdict:
    """Compare two validated result documents (see :func:`fastattn.bench.report.load`).

    Raises :class:`DeviceMismatchError` for different devices and ``ValueError`` when no
    kernel was timed in both."""
    for name, value in (("per_kernel", per_kernel), ("geomean", geomean)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{name} must be a fraction >= 0 (0.1 = 10% slower), got {value!r}")
    if _device(base) != _device(new) and not allow_different_devices:
        raise DeviceMismatchError(
            f"BASE was measured on {_device(base)} and NEW on {_device(new)}; timings from "
            "different devices are not comparable (pass --allow-different-devices to override)")

    def gated(r: dict) -> bool:
        return all_providers or r.get("kind") == "fastattn"

    b = {_key(r): r for r in base["results"] if gated(r)}
    n = {_key(r): r for r in new["results"] if gated(r)}
    v = Verdict(ok=True, geomean=None)
    ratios = []
    for key in sorted(b.keys() & n.keys()):
        rb, rn = b[key], n[key]
        if rb["status"] != "ok":
            continue
        if rn["status"] != "ok":
            if rn["status"] in ("failed", "oom"):
                v.problems.append(f"{key}: ran in BASE, {rn['status']} in NEW ({rn['reason']})")
                v.rows.append({"key": key, "base_ms": rb["timing"]["median_ms"], "new_ms": None,
                               "ratio": None, "verdict": rn["status"]})
            continue
        bm, nm = rb["timing"]["median_ms"], rn["timing"]["median_ms"]
        ratio = nm / bm
        ratios.append(ratio)
        slow = ratio > 1 + per_kernel
        if slow:
            v.problems.append(f"{key}: {ratio:.2f}x the BASE time ({bm:.4g} -> {nm:.4g} ms), "
                              f"limit {1 + per_kernel:.2f}x")
        v.rows.append({"key": key, "base_ms": bm, "new_ms": nm, "ratio": ratio,
                       "verdict": "slower" if slow else "ok"})
    v.only_in_base = sorted(b.keys() - n.keys())
    v.only_in_new = sorted(n.keys() - b.keys())
    if ratios:
        v.geomean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
        if v.geomean > 1 + geomean:
            v.problems.append(f"geometric mean {v.geomean:.3f}x the BASE time over {len(ratios)} "
                              f"kernels, limit {1 + geomean:.3f}x")
    elif not v.problems:
        raise ValueError("no kernel was timed in both files; nothing to compare"
                         + ("" if all_providers else " (only fastattn providers are gated; "
                            "--all-providers gates every provider)"))
    v.ok = not v.problems
    return v
