"""Run a benchmark suite: check every provider against the float64 reference, then time and
measure the ones that agree, and turn times into throughput against the measured ceilings.

Order per case: availability (skipped, with the reason) -> correctness on a reduced copy of the
case (failed, with the error, if it disagrees; it is then not timed) -> per mode: timing (CUDA
events, one provider after another; or host clock, all providers interleaved) -> memory.
"""

from __future__ import annotations

import fnmatch
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fastattn.bench import ceilings as _ceilings
from fastattn.bench import memory, timing
from fastattn.bench.suite import Case, Inputs, OpBench, Provider, get_op
from fastattn.bench.work import MODES

# Absolute slack of the twice-PyTorch's-error rule, per dtype, relative to the reference's
# magnitude (the same rule and slack as the test suite's tests/check.py).
SLACK = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}
# Messages PyTorch uses when a backend does not support an input: reported as skipped.
UNSUPPORTED = ("No available kernel", "not supported", "Not supported", "unsupported")


@dataclass
class Settings:
    device: torch.device
    quick: bool = True
    dtypes: Sequence[str] = ("float32",)
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    flush_l2: bool = True
    cuda_graph: bool = False
    memory: str = "all"  # "all", "largest" (fwd_bwd of each op's last case) or "off"
    budget_s: float | None = None
    providers: Sequence[str] | None = None  # fnmatch patterns; None = all
    modes: Sequence[str] | None = None
    memory_fraction: float = 0.85  # of free device memory a case may plan to use


@dataclass
class Result:
    op: str
    case: Case
    series: str
    x: float
    mode: str
    provider: str
    kind: str
    status: str  # "ok", "failed", "skipped", "oom"
    reason: str | None = None
    timing: timing.Timing | None = None
    work: dict | None = None
    throughput: float | None = None
    throughput_unit: str | None = None
    ceiling: str | None = None
    pct_of_ceiling: float | None = None
    memory: dict | None = None
    error: dict | None = None
    speedup: float | None = None
    baseline: str | None = None
    x_label: str = ""
    label: str = ""
    compile_s: float | None = None  # a JIT provider's first call: compile (or disk-cache load)

    def to_dict(self) -> dict:
        return {
            "op": self.op, "case": self.case.name, "params": self.case.to_dict()["params"],
            "dtype": self.case.dtype, "series": self.series, "x": self.x,
            "x_label": self.x_label, "label": self.label or self.case.name, "mode": self.mode,
            "provider": self.provider, "kind": self.kind, "status": self.status,
            "reason": self.reason,
            "timing": self.timing.to_dict() if self.timing is not None else None,
            "work": self.work, "throughput": self.throughput,
            "throughput_unit": self.throughput_unit, "ceiling": self.ceiling,
            "pct_of_ceiling": self.pct_of_ceiling, "memory": self.memory, "error": self.error,
            "speedup_vs_baseline": self.speedup, "baseline": self.baseline,
            "compile_s": self.compile_s,
        }


@dataclass
class _Prepared:
    """Input tensors as fresh leaves in a provider's layout; ``diff`` are the differentiated."""

    args: list[torch.Tensor]
    diff: list[torch.Tensor] = field(default_factory=list)


def _prepare(inputs: Inputs, requires_grad: bool, dtype: torch.dtype | None = None,
             to_layout: Callable[[torch.Tensor], torch.Tensor] | None = None) -> _Prepared:
    """Copies of ``inputs`` (floating-point ones cast to ``dtype`` when given and moved to
    ``to_layout``), with the differentiable ones requiring grad when ``requires_grad``."""
    args, diff = [], []
    for i, src in enumerate(inputs.args):
        t = src.detach()
        if t.is_floating_point():
            t = t.to(dtype) if dtype is not None else t
            t = to_layout(t) if to_layout is not None else t
        t = t.contiguous()
        if t.data_ptr() == src.data_ptr():
            t = t.clone()  # never share storage: some providers write into their inputs
        if requires_grad and i in inputs.differentiable:
            t.requires_grad_(True)
            diff.append(t)
        args.append(t)
    return _Prepared(args, diff)


def build_call(op: OpBench, case: Case, provider: Provider, mode: str,
               device: torch.device) -> Callable[[], object]:
    """The zero-argument function timed for ``mode``:

    - ``fwd``: the forward under ``torch.no_grad`` (inference);
    - ``bwd``: the backward alone, through a forward graph built once (``retain_graph``);
    - ``fwd_bwd``: forward then backward, as in a training step.
    Gradients are returned by ``torch.autograd.grad``, never accumulated into ``.grad``. The
    upstream gradient is random, except for a scalar output (a loss), which gets 1: what
    ``loss.backward()`` passes. (A loss scaled before backward, for gradient accumulation or
    by a loss scaler, is a case of its own: ``loss_scale`` of the cross-entropy suite.)
    """
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is not allowed; use one of {MODES}")
    fn = provider.make(case)
    prep = _prepare(op.inputs(case, device), mode != "fwd", to_layout=provider.to_layout)
    if mode == "fwd":
        def fwd() -> object:
            with torch.no_grad():
                return fn(*prep.args)

        return fwd
    if mode == "bwd":
        out = fn(*prep.args)
        grad = upstream_grad(out)
        return lambda: torch.autograd.grad(out, prep.diff, grad, retain_graph=True)
    with torch.no_grad():
        grad = upstream_grad(fn(*prep.args))
    return lambda: torch.autograd.grad(fn(*prep.args), prep.diff, grad)


def upstream_grad(out: torch.Tensor) -> torch.Tensor:
    """The gradient a timed backward starts from: 1 for a scalar (a loss, as
    ``loss.backward()``), random otherwise."""
    return torch.ones_like(out) if out.dim() == 0 else torch.randn_like(out)


def _max_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.detach().double() - ref.detach()).abs()
    return float(diff.nan_to_num(float("inf")).max()) if diff.numel() else 0.0


def check(op: OpBench, case: Case, provider: Provider, device: torch.device,
          backward: bool) -> dict:
    """Compare ``provider`` with the float64 reference on ``op.check_case(case)``.

    Passes when the output (and, with ``backward``, the gradient of every differentiable input
    for a random output gradient) is within twice PyTorch's own error at the same precision --
    the reference composition run in ``case.dtype`` -- plus a small slack. Returns
    ``{"ok", "reason", "checked_on", "tensors": {name: {err, pytorch_err, bound}}}``."""
    small = op.check_case(case)
    inputs = op.inputs(small, device)
    ref64 = _prepare(inputs, backward, dtype=torch.float64)
    low = _prepare(inputs, backward)
    got = _prepare(inputs, backward, to_layout=provider.to_layout)
    ref_out = op.reference(small, *ref64.args)
    pt_out = op.reference(small, *low.args)
    out = provider.make(small)(*got.args)
    back = provider.from_layout or (lambda t: t)
    # name -> (reference in float64, PyTorch in case.dtype, provider in canonical layout)
    triples = {"out": (ref_out, pt_out, back(out))}
    if backward:
        grad = torch.randn_like(ref_out)
        g_ref = torch.autograd.grad(ref_out, ref64.diff, grad)
        g_pt = torch.autograd.grad(pt_out, low.diff, grad.to(pt_out.dtype))
        g_got = torch.autograd.grad(out, got.diff, (provider.to_layout or (lambda t: t))(
            grad.to(out.dtype)))
        for i, r, p, g in zip(inputs.differentiable, g_ref, g_pt, g_got, strict=True):
            triples[f"grad{i}"] = (r, p, back(g))
    tensors, reasons = {}, []
    for name, (ref, pt, val) in triples.items():
        ref, pt, val = ref.detach(), pt.detach(), val.detach()
        if val.shape != ref.shape:
            reasons.append(f"{name}: shape {tuple(val.shape)} != {tuple(ref.shape)}")
            continue
        err, pt_err = _max_err(val, ref), _max_err(pt, ref)
        scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
        bound = 2 * pt_err + SLACK[case.torch_dtype] * scale
        tensors[name] = {"err": err, "pytorch_err": pt_err, "bound": bound}
        if not err <= bound:
            reasons.append(f"{name}: error {err:.3g} > 2 x PyTorch's {pt_err:.3g} + slack")
    return {"ok": not reasons, "reason": "; ".join(reasons) or None,
            "checked_on": small.name, "tensors": tensors}


def _selected(name: str, patterns: Sequence[str] | None) -> bool:
    return patterns is None or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "out of memory" in str(e)


def _describe(e: BaseException) -> str:
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first}"[:300]


def _status_of(e: BaseException) -> str:
    if _is_oom(e):
        return "oom"
    if isinstance(e, timing.GraphCaptureError):
        return "skipped"  # a limit of --cuda-graph timing, not a wrong kernel
    if isinstance(e, NotImplementedError) or any(s in str(e) for s in UNSUPPORTED):
        return "skipped"
    return "failed"


def _free_bytes(device: torch.device) -> int | None:
    """Free device memory; on a CPU the kernel's MemAvailable (None where unreadable)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _release(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


class Runner:
    """Runs ops for one device with one :class:`Settings`; ``on_case`` reports progress."""

    def __init__(self, settings: Settings, ceilings: dict | None,
                 on_case: Callable[[str], None] | None = None) -> None:
        self.s = settings
        self.ceilings = ceilings or {}
        self.on_case = on_case or (lambda text: None)
        self.log: list[str] = []
        self.interrupted = False
        self._compiled: set[tuple[str, str, str]] = set()  # (provider, op, dtype) already run

    def plan(self, ops: Sequence[str]) -> list[tuple[OpBench, list[Case]]]:
        return [(op, op.sweep(self.s.device, self.s.quick, self.s.dtypes))
                for op in (get_op(name) for name in ops)]

    def run(self, plan: list[tuple[OpBench, list[Case]]]) -> list[Result]:
        """Every case of ``plan``. With a budget, each op gets an equal share of what is left
        when it starts; cases past its share are reported as skipped. A KeyboardInterrupt
        (or SIGTERM, which the CLI turns into one) stops the run and keeps what was measured;
        ``self.interrupted`` tells."""
        results: list[Result] = []
        start = time.monotonic()
        self.interrupted = False
        try:
            for i, (op, cases) in enumerate(plan):
                deadline = None
                if self.s.budget_s is not None:
                    left = self.s.budget_s - (time.monotonic() - start)
                    deadline = time.monotonic() + max(0.0, left) / (len(plan) - i)
                for case in cases:
                    self.on_case(f"{op.name} {case.name} {case.dtype}")
                    if deadline is not None and time.monotonic() > deadline:
                        results += self._skip_all(op, case, "time budget (--budget-s) used up")
                        continue
                    results += self.run_case(op, case, largest=case is cases[-1])
        except KeyboardInterrupt:
            self.interrupted = True
        return results

    def _result(self, op: OpBench, case: Case, mode: str, provider: Provider, status: str,
                reason: str | None = None) -> Result:
        return Result(op.name, case, op.series(case), float(case.p[op.x_param]), mode,
                      provider.name, provider.kind, status, reason, x_label=op.x_param,
                      label=op.label(case))

    def _modes(self, op: OpBench, provider: Provider) -> list[str]:
        return [m for m in op.modes if m in provider.modes and
                (self.s.modes is None or m in self.s.modes)]

    def _skip_all(self, op: OpBench, case: Case, reason: str) -> list[Result]:
        return [self._result(op, case, mode, p, "skipped", reason)
                for p in op.providers() if _selected(p.name, self.s.providers)
                for mode in self._modes(op, p)]

    def run_case(self, op: OpBench, case: Case, largest: bool = True) -> list[Result]:
        device = self.s.device
        results: list[Result] = []
        ready: list[tuple[Provider, dict]] = []
        compile_times: dict[str, float | None] = {}
        free = _free_bytes(device)
        for provider in op.providers():
            if not _selected(provider.name, self.s.providers):
                continue
            modes = self._modes(op, provider)
            if not modes:
                continue
            why = provider.unavailable(case, device)
            if why is None and free is not None:
                need = op.input_bytes(case) + provider.scratch_bytes(case)
                if need > self.s.memory_fraction * free:
                    why = (f"needs about {need / 2**30:.1f} GiB; {free / 2**30:.1f} GiB free on "
                           f"{device.type}")
            if why is not None:
                results += [self._result(op, case, m, provider, "skipped", why) for m in modes]
                continue
            compile_s = self._first_call(op, case, provider, modes)
            try:
                verdict = check(op, case, provider, device, backward=modes != ["fwd"])
            except Exception as e:  # noqa: BLE001 - a provider's failure is a result
                self.log.append(f"{provider.name} {case.name}: {traceback.format_exc()}")
                results += [self._result(op, case, m, provider, _status_of(e), _describe(e))
                            for m in modes]
                _release(device)
                continue
            if not verdict["ok"]:
                for m in modes:
                    r = self._result(op, case, m, provider, "failed",
                                     f"disagrees with the reference: {verdict['reason']}")
                    r.error = verdict
                    results.append(r)
                continue
            ready.append((provider, verdict))
            compile_times[provider.name] = compile_s
        for mode in op.modes:
            if self.s.modes is not None and mode not in self.s.modes:
                continue
            group = [(p, v) for p, v in ready if mode in self._modes(op, p)]
            measure = self.s.memory == "all" or (
                self.s.memory == "largest" and largest and mode == op.modes[-1])
            results += self._time_mode(op, case, mode, group, measure)
        for r in results:
            r.compile_s = compile_times.get(r.provider)
        self._speedups(op, results)
        return results

    def _first_call(self, op: OpBench, case: Case, provider: Provider,
                    modes: list[str]) -> float | None:
        """Seconds of a JIT provider's first call for this op and dtype in this process
        (forward, and backward when a timed mode has one, on the reduced check case): its
        compile time, or the time to load its compiled code from disk. None for providers
        that do not compile, and for later cases (already compiled)."""
        key = (provider.name, op.name, case.dtype)
        if not provider.jit or key in self._compiled:
            return None
        self._compiled.add(key)
        mode = "fwd" if modes == ["fwd"] else "fwd_bwd"
        start = time.perf_counter()
        try:
            build_call(op, op.check_case(case), provider, mode, self.s.device)()
        except Exception:  # noqa: BLE001 - the check that follows reports the failure
            return None
        return time.perf_counter() - start

    def _time_mode(self, op: OpBench, case: Case, mode: str,
                   group: list[tuple[Provider, dict]], measure_memory: bool) -> list[Result]:
        out = []
        for provider, verdict in group:
            r = self._result(op, case, mode, provider, "ok")
            r.error = verdict
            out.append(r)
        if self.s.device.type == "cuda":
            self._time_cuda(op, case, mode, group, out, measure_memory)
        else:
            self._time_host(op, case, mode, group, out, measure_memory)
        for r in out:
            if r.timing is not None:
                self._rate(op, r)
        return out

    def _time_cuda(self, op: OpBench, case: Case, mode: str, group: list[tuple[Provider, dict]],
                   out: list[Result], measure_memory: bool) -> None:
        """One provider at a time: only its tensors are alive while it is timed and measured,
        so its memory peak is its own."""
        device = self.s.device
        for (provider, _), r in zip(group, out, strict=True):
            try:
                call = build_call(op, case, provider, mode, device)
                r.timing = timing.time_cuda(
                    call, device=device, warmup_ms=self.s.warmup_ms, rep_ms=self.s.rep_ms,
                    flush_l2=self.s.flush_l2, cuda_graph=self.s.cuda_graph)
                if measure_memory:
                    r.memory = memory.cuda_peak(call, device)
            except Exception as e:  # noqa: BLE001 - a provider's failure is a result
                self.log.append(f"{provider.name} {case.name} {mode}: {traceback.format_exc()}")
                r.status, r.reason, r.timing = _status_of(e), _describe(e), None
            call = None
            _release(device)

    def _time_host(self, op: OpBench, case: Case, mode: str, group: list[tuple[Provider, dict]],
                   out: list[Result], measure_memory: bool) -> None:
        """All providers interleaved; each called once alone first (compilation, or failing on
        its own), then timed together. Memory is measured in fresh subprocesses."""
        calls: dict[str, Callable[[], object]] = {}
        by_name = {r.provider: r for r in out}
        for provider, _ in group:
            try:
                call = build_call(op, case, provider, mode, self.s.device)
                call()
                calls[provider.name] = call
            except Exception as e:  # noqa: BLE001
                self.log.append(f"{provider.name} {case.name} {mode}: {traceback.format_exc()}")
                r = by_name[provider.name]
                r.status, r.reason = _status_of(e), _describe(e)
        if not calls:
            return
        try:
            timings = timing.time_host(calls, warmup_ms=self.s.warmup_ms, rep_ms=self.s.rep_ms)
        except Exception as e:  # noqa: BLE001 - interleaved: which provider failed is unknown
            for name in calls:
                by_name[name].status, by_name[name].reason = _status_of(e), _describe(e)
            return
        calls.clear()
        for name, t in timings.items():
            by_name[name].timing = t
            if measure_memory:
                spec = {"case": case.to_dict(), "provider": name, "mode": mode}
                try:
                    by_name[name].memory = memory.cpu_peak_in_subprocess(spec)
                except Exception as e:  # noqa: BLE001 - memory is reported as missing
                    by_name[name].memory = {"error": _describe(e)}

    def _rate(self, op: OpBench, r: Result) -> None:
        work = op.work(r.case, r.mode)
        seconds = r.timing.median_ms * 1e-3
        r.work = {"amount": work.amount, "unit": work.unit}
        r.throughput, r.throughput_unit = work.rate(seconds), work.rate_unit
        r.ceiling = _ceilings.ceiling_for(work.unit, r.case.torch_dtype)
        ceiling = self.ceilings.get(r.ceiling) if r.ceiling else None
        if isinstance(ceiling, (int, float)) and ceiling > 0:
            r.pct_of_ceiling = 100.0 * r.throughput / ceiling

    def _speedups(self, op: OpBench, results: list[Result]) -> None:
        base = {r.mode: r for r in results if r.provider == op.baseline and r.timing is not None}
        for r in results:
            b = base.get(r.mode)
            if r.timing is not None and b is not None:
                r.speedup, r.baseline = b.timing.median_ms / r.timing.median_ms, op.baseline
