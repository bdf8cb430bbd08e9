"""Result files (JSON, CSV), the terminal table, and plots.

The JSON file is the record: environment, settings, ceilings and every result with its raw
samples. CSV flattens the results for spreadsheets; the table and plots are views of the same
results.
"""

from __future__ import annotations

import csv
import json
import math
import re
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

SCHEMA = "fastattn-bench/1"
CSV_FIELDS = ("op", "case", "dtype", "mode", "provider", "kind", "status", "reason", "median_ms",
              "p10_ms", "p90_ms", "best_ms", "n", "outliers_low", "outliers_high", "clock",
              "throughput", "throughput_unit", "pct_of_ceiling", "ceiling",
              "peak_increase_bytes", "peak_allocated_bytes", "peak_reserved_bytes",
              "speedup_vs_baseline", "baseline", "compile_s")


def document(environment: dict, settings: dict, ceilings: dict | None, results: list[dict],
             argv: Sequence[str]) -> dict:
    return {
        "schema": SCHEMA,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "argv": list(argv),
        "environment": environment,
        "settings": settings,
        "ceilings": ceilings,
        "results": results,
    }


def validate(doc: object, where: str = "result file") -> dict:
    """``doc`` as a result document, or ``ValueError`` naming what is missing."""
    if not isinstance(doc, dict):
        raise ValueError(f"{where}: not a JSON object")
    if doc.get("schema") != SCHEMA:
        raise ValueError(f"{where}: schema is {doc.get('schema')!r}, expected {SCHEMA!r}")
    for key in ("environment", "settings", "results"):
        if key not in doc:
            raise ValueError(f"{where}: missing {key!r}")
    if not isinstance(doc["results"], list):
        raise ValueError(f"{where}: 'results' must be a list")
    device = doc["environment"].get("device") if isinstance(doc["environment"], dict) else None
    if not isinstance(device, dict) or "name" not in device:
        raise ValueError(f"{where}: environment.device.name is missing")
    for i, r in enumerate(doc["results"]):
        missing = [k for k in ("op", "case", "dtype", "mode", "provider", "status", "timing")
                   if k not in r]
        if missing:
            raise ValueError(f"{where}: results[{i}] lacks {', '.join(missing)}")
    return doc


def load(path: str | Path) -> dict:
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON: {e}") from e
    return validate(doc, str(path))


def write_json(doc: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1, allow_nan=False, default=str) + "\n")
    return path


def _row(r: dict) -> dict:
    t = r.get("timing") or {}
    m = r.get("memory") or {}
    return {
        **{k: r.get(k) for k in ("op", "case", "dtype", "mode", "provider", "kind", "status",
                                 "reason", "throughput", "throughput_unit", "pct_of_ceiling",
                                 "ceiling", "speedup_vs_baseline", "baseline",
                                 "compile_s")},
        **{k: t.get(k) for k in ("median_ms", "p10_ms", "p90_ms", "best_ms", "n",
                                 "outliers_low", "outliers_high", "clock")},
        "peak_increase_bytes": m.get("peak_increase_bytes"),
        "peak_allocated_bytes": m.get("peak_allocated_bytes", m.get("peak_rss_bytes")),
        "peak_reserved_bytes": m.get("peak_reserved_bytes"),
    }


def write_csv(results: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        w.writeheader()
        for r in results:
            w.writerow(_row(r))
    return path


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def _fmt_ms(x: float | None) -> str:
    if x is None:
        return "-"
    return f"{x * 1e3:.1f}us" if x < 0.1 else f"{x:.3g}ms" if x < 100 else f"{x:.0f}ms"


def tables(results: list[dict], host_clock: bool) -> tuple[list, list[str]]:
    """rich Tables, one per op, of every result that is not skipped; and the skip reasons."""
    from rich.table import Table

    by_op: dict[str, list[dict]] = defaultdict(list)
    skipped: dict[str, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
    for r in results:
        if r["status"] == "skipped":
            skipped[r["op"]][r["provider"]].add(r["reason"])
        else:
            by_op[r["op"]].append(r)
    out = []
    for op, rows in by_op.items():
        unit = next((r["throughput_unit"] for r in rows if r.get("throughput_unit")), "rate")
        t = Table(title=op, title_justify="left")
        cols = ["case", "mode", "provider", "median (p10-p90)", *(["best"] if host_clock else []),
                unit, "% ceiling", "peak mem +", "vs torch", "max err (PyTorch's)", "status"]
        for col in cols:
            left = col in ("case", "mode", "provider", "status")
            t.add_column(col, justify="left" if left else "right", overflow="fold")
        previous = None
        for r in rows:
            label = r.get("label") or r["case"]
            if previous is not None and label != previous:
                t.add_section()
            tm = r.get("timing") or {}
            err = (r.get("error") or {}).get("tensors", {}).get("out")
            outl = (tm.get("outliers_low") or 0) + (tm.get("outliers_high") or 0)
            med = "-" if not tm else (f"{_fmt_ms(tm['median_ms'])} ({_fmt_ms(tm['p10_ms'])}-"
                                      f"{_fmt_ms(tm['p90_ms'])})"
                                      + (f" {outl} outl." if outl else ""))
            t.add_row(
                label if label != previous else "", r["mode"], r["provider"], med,
                *([_fmt_ms(tm.get("best_ms"))] if host_clock else []),
                "-" if r.get("throughput") is None else f"{r['throughput']:.3g}",
                "-" if r.get("pct_of_ceiling") is None else f"{r['pct_of_ceiling']:.0f}%",
                fmt_bytes((r.get("memory") or {}).get("peak_increase_bytes")),
                "-" if r.get("speedup_vs_baseline") is None
                else f"{r['speedup_vs_baseline']:.2f}x",
                "-" if err is None else f"{err['err']:.1e} ({err['pytorch_err']:.1e})",
                r["status"] if r["status"] == "ok" else f"{r['status']}: {r['reason']}",
            )
            previous = label
        out.append(t)
    notes = [f"{op}: {prov} skipped: {'; '.join(sorted(reasons))}"
             for op, provs in skipped.items() for prov, reasons in provs.items()]
    compiled = {(r["op"], r["provider"], r["dtype"]): r["compile_s"] for r in results
                if r.get("compile_s") is not None}
    notes += [f"{op}: {prov} {dtype}: first call (JIT compile, or load from its disk cache) "
              f"{seconds:.2f} s, not part of the timings" for (op, prov, dtype), seconds
              in compiled.items()]
    return out, notes


def plot(results: list[dict], ceilings: dict | None, out_dir: str | Path) -> list[Path]:
    """One PNG per op: throughput against size, one line per provider, one panel per series
    and mode, the measured ceiling drawn. Raises ``ImportError`` without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    ops: dict[str, list[dict]] = defaultdict(list)
    for r in results:
        if r["status"] == "ok" and r.get("throughput") is not None:
            ops[r["op"]].append(r)
    for op, rows in ops.items():
        panels: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
        for r in rows:
            panels[(r["series"], r["dtype"], r["mode"])].append(r)
        keys = sorted(panels)
        ncols = min(3, len(keys))
        nrows = math.ceil(len(keys) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.5 * ncols, 4 * nrows), squeeze=False)
        for ax, key in zip(axes.flat, keys, strict=False):
            lines: dict[str, list[tuple[float, float]]] = defaultdict(list)
            for r in panels[key]:
                lines[r["provider"]].append((r["x"], r["throughput"]))
            for provider, pts in sorted(lines.items()):
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=provider)
            ceiling = panels[key][0].get("ceiling")
            value = (ceilings or {}).get(ceiling) if ceiling else None
            if isinstance(value, (int, float)):
                ax.axhline(value, color="k", linestyle="--", linewidth=1,
                           label=f"measured {ceiling}")
            ax.set_xscale("log", base=2)
            ax.set_title(" ".join(key), fontsize=9)
            ax.set_xlabel(panels[key][0].get("x_label") or "size")
            ax.set_ylabel(panels[key][0]["throughput_unit"])
            ax.grid(True, alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(keys):]:
            ax.set_visible(False)
        fig.suptitle(op)
        fig.tight_layout()
        path = out_dir / f"{re.sub(r'[^A-Za-z0-9_.-]', '_', op)}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written
