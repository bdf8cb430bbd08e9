"""Timing: device events on CUDA, the host clock with interleaved providers on CPU.

GPU (:func:`time_cuda`): every call is bracketed by its own pair of CUDA events, after the L2
cache is flushed by overwriting a buffer twice its size, so each sample is one cold-cache call
and nothing of the flush is timed. Warm-up and repetition are time budgets: a few calls
estimate the cost, then as many calls run as fit the budget (bounded). With ``cuda_graph`` the
call is captured once in a CUDA graph and each sample is one graph replay (no launch overhead),
still after an L2 flush. In eager mode the host enqueues the call while the GPU flushes; a call
whose host-side work (Python, dispatch, launches) outlasts the flush is timed with that work
included, which is what an eager user pays. ``cuda_graph`` shows the kernels alone.

CPU (:func:`time_host`): the providers of one case are timed in rounds, each round calling every
provider once, so slow drift of a shared, noisy machine spreads evenly over all of them. The
orders of the rounds form a balanced Latin square (:func:`balanced_orders`): over a cycle of
rounds each provider comes first equally often and follows every other provider equally often.
Which provider ran just before matters on CPU: one that sweeps large buffers leaves the caches
cold for the next call. (Rotating one fixed order, as this did before, gave every provider the
same predecessor in every round: at L128 attention, native always followed the torch
reference, which materialises the scores, and PyTorch's flash attention always followed
PyTorch's default SDPA, the same kernel.)
Best and median are both reported: the best is the least disturbed run, the median the
typical one.

Every :class:`Timing` keeps its raw samples; outliers (Tukey's fences, 1.5 interquartile ranges
beyond the quartiles) are counted and reported, never dropped.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch


@dataclass
class Timing:
    """Raw per-call samples in milliseconds and the clock that took them."""

    samples_ms: list[float]
    clock: str  # "cuda-event", "cuda-graph" or "host"
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.samples_ms:
            raise ValueError("a Timing needs at least one sample")

    def quantile(self, q: float) -> float:
        """Linear-interpolated quantile ``q`` in [0, 1] of the samples."""
        s = sorted(self.samples_ms)
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    @property
    def p10_ms(self) -> float:
        return self.quantile(0.10)

    @property
    def p90_ms(self) -> float:
        return self.quantile(0.90)

    @property
    def best_ms(self) -> float:
        return min(self.samples_ms)

    @property
    def mean_ms(self) -> float:
        return statistics.fmean(self.samples_ms)

    @property
    def outliers(self) -> tuple[int, int]:
        """(low, high): samples beyond Tukey's fences. Reported, never removed."""
        q1, q3 = self.quantile(0.25), self.quantile(0.75)
        lo, hi = q1 - 1.5 * (q3 - q1), q3 + 1.5 * (q3 - q1)
        return (sum(x < lo for x in self.samples_ms), sum(x > hi for x in self.samples_ms))

    def to_dict(self) -> dict:
        low, high = self.outliers
        return {
            "clock": self.clock,
            "n": len(self.samples_ms),
            "median_ms": self.median_ms,
            "p10_ms": self.p10_ms,
            "p90_ms": self.p90_ms,
            "best_ms": self.best_ms,
            "mean_ms": self.mean_ms,
            "outliers_low": low,
            "outliers_high": high,
            "notes": list(self.notes),
            # 0.1 us: finer than either clock resolves, and keeps result files small
            "samples_ms": [round(x, 4) for x in self.samples_ms],
        }


def _check_budget(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number > 0 (milliseconds), got {value!r}")
    return float(value)


def _check_reps(min_reps: int, max_reps: int) -> None:
    if not (isinstance(min_reps, int) and isinstance(max_reps, int) and 1 <= min_reps <= max_reps):
        raise ValueError(f"need 1 <= min_reps <= max_reps, got min_reps={min_reps!r}, "
                         f"max_reps={max_reps!r}")


def l2_flush_buffer(device: torch.device) -> torch.Tensor:
    """A buffer twice the size of ``device``'s L2 cache (at least 64 MiB); zeroing it evicts
    everything a timed call could otherwise find in L2."""
    props = torch.cuda.get_device_properties(device)
    l2 = getattr(props, "L2_cache_size", 0) or 0
    size = max(2 * l2, 64 << 20)
    return torch.empty(size, dtype=torch.int8, device=device)


class GraphCaptureError(RuntimeError):
    """The call cannot be captured in a CUDA graph (host synchronisation, CPU work, ...)."""


def _capture_graph(fn: Callable[[], object], device: torch.device) -> Callable[[], None]:
    try:
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(3):  # warm-up on a side stream, as capture requires
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
    except Exception as e:  # noqa: BLE001 - any capture failure means "not graph-capturable"
        raise GraphCaptureError(f"cannot be captured in a CUDA graph: {e}") from e
    return graph.replay


def time_cuda(
    fn: Callable[[], object],
    *,
    device: torch.device | str | None = None,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    flush_l2: bool = True,
    cuda_graph: bool = False,
    min_reps: int = 10,
    max_reps: int = 1000,
) -> Timing:
    """Time ``fn`` on the current CUDA stream with one event pair per call.

    ``fn`` runs once before anything is measured (compilation, autotuning). Raises
    ``RuntimeError`` when CUDA is unavailable; a graph capture failure propagates.
    """
    warmup_ms = _check_budget("warmup_ms", warmup_ms)
    rep_ms = _check_budget("rep_ms", rep_ms)
    _check_reps(min_reps, max_reps)
    if not torch.cuda.is_available():
        raise RuntimeError("time_cuda needs a CUDA device; use time_host on CPU")
    device = torch.device("cuda", torch.cuda.current_device()) if device is None else (
        torch.device(device))
    flush = l2_flush_buffer(device) if flush_l2 else None
    fn()
    step = _capture_graph(fn, device) if cuda_graph else fn
    torch.cuda.synchronize(device)

    def run(n: int) -> list[float]:
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
        for start, end in zip(starts, ends, strict=True):
            if flush is not None:
                flush.zero_()
            start.record()
            step()
            end.record()
        torch.cuda.synchronize(device)
        return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]

    estimate = statistics.median(run(5))
    per_call = max(estimate, 1e-3)
    run(max(1, min(max_reps, math.ceil(warmup_ms / per_call))))
    n = max(min_reps, min(max_reps, math.ceil(rep_ms / per_call)))
    notes = [] if flush is not None else ["L2 not flushed"]
    return Timing(run(n), "cuda-graph" if cuda_graph else "cuda-event", notes)


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of ``range(n)`` in which every ``i`` comes first equally often and directly
    follows every other ``j`` equally often (Williams' balanced Latin square: ``n`` orders for
    even ``n``; for odd ``n`` those and their reverses, ``2 n``)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    first, lo, hi = [0], 1, n - 1  # 0, 1, n-1, 2, n-2, ...
    while len(first) < n:
        first.append(lo)
        lo += 1
        if len(first) < n:
            first.append(hi)
            hi -= 1
    orders = [[(x + r) % n for x in first] for r in range(n)]
    return orders if n % 2 == 0 or n == 1 else orders + [o[::-1] for o in orders]


def time_host(
    fns: Mapping[str, Callable[[], object]],
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    min_reps: int = 5,
    max_reps: int = 10_000,
) -> dict[str, Timing]:
    """Time each of ``fns`` with the host clock, interleaved, round ``r`` in the order
    ``balanced_orders(len(fns))[r % ...]``.

    ``rep_ms`` is the budget per provider: rounds = budget x providers / (sum of their
    per-call estimates), between ``min_reps`` and ``max_reps``. The garbage collector is paused
    while timing, so a collection triggered by one provider is not charged to another.
    """
    warmup_ms = _check_budget("warmup_ms", warmup_ms)
    rep_ms = _check_budget("rep_ms", rep_ms)
    _check_reps(min_reps, max_reps)
    if not fns:
        raise ValueError("fns must name at least one callable")
    names = list(fns)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        samples: dict[str, list[float]] = {name: [] for name in names}

        orders = [[names[i] for i in order] for order in balanced_orders(len(names))]

        def one_round(r: int, record: dict[str, list[float]]) -> None:
            for name in orders[r % len(orders)]:
                t0 = time.perf_counter_ns()
                fns[name]()
                record[name].append((time.perf_counter_ns() - t0) / 1e6)

        warm: dict[str, list[float]] = {name: [] for name in names}
        one_round(0, warm)  # first calls: compilation, allocation
        r = 1
        while r == 1 or min(sum(v) for v in warm.values()) < warmup_ms:
            one_round(r, warm)
            r += 1
            if r > max_reps:
                break
        per_round = sum(statistics.median(v[1:]) for v in warm.values())
        rounds = max(min_reps, min(max_reps, math.ceil(rep_ms * len(names) / max(per_round, 1e-6))))
        for i in range(rounds):
            one_round(r + i, samples)
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: Timing(samples[name], "host") for name in names}
