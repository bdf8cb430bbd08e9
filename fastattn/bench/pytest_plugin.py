"""pytest-benchmark integration: the ``kernel_bench`` fixture and machine-info hooks used by the
suites in ``benchmarks/`` (``benchmarks/conftest.py`` imports them).

``kernel_bench(op, case, provider, mode)`` checks the provider against the float64 reference
(a fastattn provider that disagrees fails the test; another library's is skipped with the
error), then times it with CUDA events (L2 flushed per call) on a GPU or the host clock on a
CPU, and hands those samples to pytest-benchmark in place of its own host-clock loop. It fills
``benchmark.extra_info`` with throughput, percentage of the measured ceiling, peak memory, the
provider and its speedup over PyTorch's provider in the same case and mode. Under
``--benchmark-disable`` it checks correctness and runs the call once, untimed.

The machine info gets the GPU's identity, and comparing against a saved run from another
device is refused (pytest-benchmark only warns).
"""

from __future__ import annotations

import os

import pytest
import torch

from fastattn.bench import ceilings as _ceilings
from fastattn.bench import memory, timing
from fastattn.bench.env import device_info
from fastattn.bench.runner import build_call, check
from fastattn.bench.suite import Case, OpBench, get_op

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def quick() -> bool:
    """Suites use the quick sweep on CPU, or when FASTATTN_BENCH_QUICK=1."""
    return DEVICE.type == "cpu" or os.environ.get("FASTATTN_BENCH_QUICK") == "1"


def params(op_name: str) -> list:
    """``pytest.param(case, provider_name, mode)`` for every case, provider and mode of an op,
    with readable ids."""
    op = get_op(op_name)
    dtypes = ["bfloat16"] if DEVICE.type == "cuda" else ["float32"]
    out = []
    for case in op.sweep(DEVICE, quick(), dtypes):
        for provider in op.providers():
            for mode in op.modes:
                if mode in provider.modes:
                    ident = f"{op.label(case)}-{mode}-{provider.name}".replace(" ", "_")
                    out.append(pytest.param(case, provider.name, mode, id=ident))
    return out


def _timed(call, device: torch.device, warmup_ms: float, rep_ms: float) -> timing.Timing:
    if device.type == "cuda":
        return timing.time_cuda(call, device=device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    return timing.time_host({"call": call}, warmup_ms=warmup_ms, rep_ms=rep_ms)["call"]


class KernelBench:
    """What the ``kernel_bench`` fixture returns; call it once per test."""

    def __init__(self, benchmark, ceilings: dict, baselines: dict) -> None:
        self.benchmark = benchmark
        self.ceilings = ceilings
        self.baselines = baselines  # (case, mode) -> median ms of the op's baseline provider
        self.warmup_ms = float(os.environ.get("FASTATTN_BENCH_WARMUP_MS", 25))
        self.rep_ms = float(os.environ.get("FASTATTN_BENCH_REP_MS", 100))

    def _baseline_ms(self, op: OpBench, case: Case, mode: str) -> float | None:
        key = (case, mode)
        if key not in self.baselines:
            base = next((p for p in op.providers() if p.name == op.baseline), None)
            ms = None
            if base is not None and base.unavailable(case, DEVICE) is None:
                call = build_call(op, case, base, mode, DEVICE)
                ms = _timed(call, DEVICE, self.warmup_ms, self.rep_ms).median_ms
                del call
            self.baselines[key] = ms
        return self.baselines[key]

    def __call__(self, op_name: str, case: Case, provider_name: str, mode: str) -> None:
        op = get_op(op_name)
        provider = next(p for p in op.providers() if p.name == provider_name)
        why = provider.unavailable(case, DEVICE)
        if why is not None:
            pytest.skip(why)
        verdict = check(op, case, provider, DEVICE, backward=mode != "fwd")
        if not verdict["ok"]:
            message = f"{provider.name} disagrees with the reference: {verdict['reason']}"
            if provider.kind == "fastattn":
                pytest.fail(message)
            pytest.skip(message)
        call = build_call(op, case, provider, mode, DEVICE)
        info = self.benchmark.extra_info
        info.update({"op": op.name, "case": case.name, "dtype": case.dtype, "mode": mode,
                     "provider": provider.name, "kind": provider.kind,
                     "max_err": verdict["tensors"]["out"]["err"],
                     "pytorch_err": verdict["tensors"]["out"]["pytorch_err"]})
        if self.benchmark.disabled:
            call()
            return
        t = _timed(call, DEVICE, self.warmup_ms, self.rep_ms)
        # pytest-benchmark has no public way to take samples timed elsewhere: fill the stats
        # object its own loop would fill (the same one ``benchmark.pedantic`` uses).
        if not hasattr(self.benchmark, "_make_stats"):
            raise RuntimeError("this pytest-benchmark version has no BenchmarkFixture."
                               "_make_stats; kernel_bench cannot hand it device timings")
        self.benchmark._mode = "fastattn kernel_bench"
        stats = self.benchmark._make_stats(1)
        for ms in t.samples_ms:
            stats.update(ms * 1e-3)
        work = op.work(case, mode)
        info["clock"] = t.clock
        info["throughput"] = work.rate(t.median_ms * 1e-3)
        info["throughput_unit"] = work.rate_unit
        ceiling = _ceilings.ceiling_for(work.unit, case.torch_dtype)
        value = self.ceilings.get(ceiling) if ceiling else None
        if isinstance(value, (int, float)) and value > 0:
            info["ceiling"] = ceiling
            info["pct_of_ceiling"] = 100 * info["throughput"] / value
        low, high = t.outliers
        info["outliers"] = low + high
        if DEVICE.type == "cuda":
            info.update(memory.cuda_peak(call, DEVICE))
        del call
        if DEVICE.type == "cpu":
            spec = {"case": case.to_dict(), "provider": provider.name, "mode": mode}
            info.update(memory.cpu_peak_in_subprocess(spec))
        base_ms = self._baseline_ms(op, case, mode)
        if base_ms is not None:
            info["baseline"] = op.baseline
            info["speedup_vs_baseline"] = base_ms / t.median_ms


@pytest.fixture(scope="session")
def bench_ceilings() -> dict:
    return _ceilings.get(DEVICE)


@pytest.fixture(scope="session")
def _bench_baselines() -> dict:
    return {}


@pytest.fixture
def kernel_bench(benchmark, bench_ceilings, _bench_baselines) -> KernelBench:
    return KernelBench(benchmark, bench_ceilings, _bench_baselines)


def pytest_benchmark_update_machine_info(config, machine_info: dict) -> None:
    info = device_info(DEVICE)
    machine_info["fastattn_device"] = {k: info.get(k) for k in
                                       ("type", "name", "capability", "driver", "memory_bytes")}
    machine_info["torch"] = torch.__version__
    machine_info["cuda"] = torch.version.cuda


def device_name(machine_info: dict) -> str | None:
    return (machine_info.get("fastattn_device") or {}).get("name")


def pytest_benchmark_compare_machine_info(config, benchmarksession, machine_info: dict,
                                          compared_benchmark: dict) -> None:
    ours, theirs = device_name(machine_info), device_name(compared_benchmark["machine_info"])
    if ours != theirs:
        raise pytest.UsageError(
            f"refusing to compare benchmarks from different devices: this run is on {ours!r}, "
            f"the saved one on {theirs!r}")
