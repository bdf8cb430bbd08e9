"""The benchmark harness, tested on CPU with real torch ops at tiny sizes: work models against
hand-computed values, timing statistics, the correctness gate, the compare gate on synthetic
result files, the result-file schema from a real ``--quick`` run, and the pytest-benchmark
suites under ``--benchmark-disable``. No timing assertions: only that timings exist and are
consistent with the figures derived from them."""

from __future__ import annotations

import collections
import copy
import csv
import importlib
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import _tuned, backends
from fastattn.bench import cli, compare, memory, report, runner, timing, tune, work
from fastattn.bench.softmax import SoftmaxBench
from fastattn.bench.suite import Case, Provider, get_op

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def _cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _ceiling_cache(_cache_dir, monkeypatch):
    # Never read or write the user's ceiling cache from tests (measured once per module).
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(_cache_dir))


# --- work models: hand-computed values ---------------------------------------------------------


def test_attention_flops_flash_convention():
    # 4 * B * H * L * S * D forward: 4 * 2 * 12 * 1024 * 1024 * 64
    fwd = work.attention_flops(2, 12, 1024, 1024, 64)
    assert fwd == work.Work(6_442_450_944.0, "flop")
    assert work.attention_flops(2, 12, 1024, 1024, 64, causal=True).amount == 6_442_450_944 / 2
    assert work.attention_flops(2, 12, 1024, 1024, 64, mode="bwd").amount == 2.5 * fwd.amount
    assert work.attention_flops(2, 12, 1024, 1024, 64, mode="fwd_bwd").amount == 3.5 * fwd.amount
    # value head dim differs: 2 * pairs * (D + Dv) = 2 * 16 * (8 + 4)
    assert work.attention_flops(1, 1, 4, 4, 8, 4).amount == 384


def test_attention_flops_windows_and_alignment():
    # window (1, 0), L = S = 4: rows keep 1, 2, 2, 2 keys -> 7 pairs; 2 * 7 * (8 + 8) = 224
    assert work.attended_pairs(4, 4, window_size=(1, 0)) == 7
    assert work.attention_flops(1, 1, 4, 4, 8, window_size=(1, 0)).amount == 224
    # causal, L=2 < S=4: top-left keeps 1 + 2 keys; bottom-right keeps 3 + 4
    assert work.attended_pairs(2, 4, causal=True) == 3
    assert work.attended_pairs(2, 4, causal=True, bottom_right=True) == 7
    # window (2, 2) on L = S = 6: 3, 4, 5, 5, 4, 3 keys
    assert work.attended_pairs(6, 6, window_size=(2, 2)) == 24


def test_bytes_models():
    assert work.softmax_bytes(4, 1000, 2).amount == 2 * 4 * 1000 * 2
    assert work.softmax_bytes(4, 1000, 2, "bwd").amount == 3 * 4 * 1000 * 2
    assert work.softmax_bytes(4, 1000, 2, "fwd_bwd").amount == 5 * 4 * 1000 * 2
    # logits once (+ int64 targets) forward; logits read once and gradient written once
    assert work.cross_entropy_bytes(8, 32000, 2).amount == 8 * 32000 * 2 + 8 * 8
    assert work.cross_entropy_bytes(8, 32000, 2, "fwd_bwd").amount == 2 * 8 * 32000 * 2 + 64
    assert work.Work(2e12, "flop").rate(2.0) == 1.0  # TFLOPS
    assert work.Work(3e9, "byte").rate(1.5) == 2.0  # GB/s


@pytest.mark.parametrize(("call", "match"), [
    (lambda: work.attention_flops(0, 1, 4, 4, 8), "batch"),
    (lambda: work.attention_flops(1, 1, 4, 4, 8, mode="forward"), "mode"),
    (lambda: work.attended_pairs(4, 4, window_size=(-2, 0)), "window_size"),
    (lambda: work.softmax_bytes(4, 1.5, 2), "cols"),
    (lambda: work.cross_entropy_bytes(4, 10, 2, "bwd"), "fwd_bwd"),
    (lambda: work.Work(1.0, "flop").rate(0), "seconds"),
])
def test_work_models_reject_bad_arguments(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --- timing ------------------------------------------------------------------------------------


def test_timing_statistics_keep_and_report_outliers():
    t = timing.Timing([float(x) for x in range(1, 11)] + [100.0], "host")
    assert t.median_ms == 6.0
    assert t.best_ms == 1.0
    assert t.quantile(0.5) == 6.0
    assert t.p10_ms == pytest.approx(2.0)
    assert t.outliers == (0, 1)
    assert len(t.to_dict()["samples_ms"]) == 11  # the outlier is kept
    with pytest.raises(ValueError, match="sample"):
        timing.Timing([], "host")


def test_time_host_interleaves_providers_in_balanced_orders():
    order: list[str] = []
    x = torch.randn(64, 256)
    fns = {name: (lambda name=name: (order.append(name), torch.softmax(x, -1)))
           for name in ("a", "b", "c")}
    out = timing.time_host(fns, warmup_ms=1, rep_ms=2, min_reps=6)
    assert set(out) == {"a", "b", "c"}
    assert all(t.clock == "host" and len(t.samples_ms) >= 6 for t in out.values())
    rounds = [order[i:i + 3] for i in range(0, len(order), 3)]
    assert all(sorted(r) == ["a", "b", "c"] for r in rounds)  # each round calls each once
    assert {r[0] for r in rounds} == {"a", "b", "c"}  # every provider leads some rounds
    # within rounds, each provider directly follows each other one
    assert {(r[i], r[i + 1]) for r in rounds for i in range(2)} == {
        (p, q) for p in "abc" for q in "abc" if p != q}


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7])
def test_balanced_orders(n):
    orders = timing.balanced_orders(n)
    assert all(sorted(o) == list(range(n)) for o in orders)
    firsts = collections.Counter(o[0] for o in orders)
    assert set(firsts) == set(range(n)) and len(set(firsts.values())) == 1
    follows = collections.Counter((o[i], o[i + 1]) for o in orders for i in range(n - 1))
    assert set(follows) == {(i, j) for i in range(n) for j in range(n) if i != j}
    assert len(set(follows.values())) <= 1  # every ordered pair equally often


def test_balanced_orders_rejects_zero():
    with pytest.raises(ValueError, match="n must be"):
        timing.balanced_orders(0)


@pytest.mark.parametrize("kwargs", [{"warmup_ms": 0}, {"rep_ms": -1}, {"min_reps": 0},
                                    {"min_reps": 5, "max_reps": 2}])
def test_time_host_rejects_bad_budgets(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        timing.time_host({"f": lambda: None}, **kwargs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA events need a GPU")
@pytest.mark.parametrize("graph", [False, True])
def test_time_cuda_and_memory_on_gpu(graph):
    a = torch.randn(1024, 1024, device="cuda")
    t = timing.time_cuda(lambda: a @ a, warmup_ms=2, rep_ms=5, cuda_graph=graph)
    assert t.clock == ("cuda-graph" if graph else "cuda-event") and t.best_ms > 0
    m = memory.cuda_peak(lambda: a @ a, torch.device("cuda"))
    assert m["peak_increase_bytes"] >= a.nbytes  # the output at least


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("graph", [False, True])
def test_quick_run_on_cuda_end_to_end(tmp_path, graph):
    out = tmp_path / "r.json"
    argv = ["--device", "cuda", "--quick", "--ops", "softmax,attention", "--providers",
            "fastattn-*,torch,sdpa-flash,flex-attention", "--warmup-ms", "1", "--rep-ms", "3",
            "--json", str(out), "--no-progress", *(["--cuda-graph"] if graph else [])]
    assert cli.main(argv) == 0
    doc = report.load(out)
    assert doc["environment"]["device"]["type"] == "cuda"
    ok = [r for r in doc["results"] if r["status"] == "ok"]
    first = {}  # op -> its first case: where a JIT provider's compile time is reported
    for r in doc["results"]:
        first.setdefault(r["op"], r["case"])
    # (a provider whose call cannot be captured in a graph is reported skipped, not timed)
    assert {r["provider"] for r in ok} >= ({"torch"} if graph else {"torch", "fastattn-triton"})
    for r in ok:
        assert r["timing"]["clock"] == ("cuda-graph" if graph else "cuda-event")
        assert r["memory"]["peak_allocated_bytes"] >= r["memory"]["peak_increase_bytes"] >= 0
        assert r["pct_of_ceiling"] > 0


# --- cases, providers and the correctness gate -------------------------------------------------


def test_case_round_trips_and_sweeps_are_model_shaped():
    case = Case.make("attention", "bfloat16", model="x", batch=2, window=[3, 0], causal=True)
    assert Case.from_dict(json.loads(json.dumps(case.to_dict()))) == case
    full = get_op("attention").sweep(torch.device("cuda"), quick=False, dtypes=["bfloat16"])
    assert {c.p["batch"] * c.p["seqlen"] for c in full} == {16384}
    assert {(c.p["heads"], c.p["kv_heads"], c.p["head_dim"]) for c in full} >= {(32, 8, 128)}
    vocabs = {c.p["vocab"] for c in get_op("cross_entropy").sweep(
        torch.device("cuda"), quick=False, dtypes=["bfloat16"])}
    assert {32000, 50257, 128256, 256000} <= vocabs
    with pytest.raises(ValueError, match="unknown op"):
        get_op("matmul")
    with pytest.raises(ValueError, match="dtype"):
        Case.make("softmax", "int8", rows=1, cols=1)


# A timed backward starts from 1 for a loss (what loss.backward() passes), from a random
# gradient otherwise; the cross-entropy sweeps add one case whose loss is scaled before
# backward (gradient accumulation), and every provider of it returns the scaled loss.
def test_upstream_gradient_and_the_scaled_loss_case():
    assert torch.equal(runner.upstream_grad(torch.tensor(3.0)), torch.tensor(1.0))
    g = runner.upstream_grad(torch.zeros(4, 5))
    assert g.shape == (4, 5) and bool((g != 0).all())
    op = get_op("cross_entropy")
    for quick in (True, False):
        cases = op.sweep(torch.device("cpu"), quick, dtypes=["float32"])
        scaled = [c for c in cases if "loss_scale" in c.p]
        assert len(scaled) == 1 and "loss*0.25" in op.label(scaled[0])
    case = scaled[0].replace(tokens=3, vocab=11)
    logits, target = op.inputs(case, torch.device("cpu")).args
    expected = 0.25 * torch.nn.functional.cross_entropy(logits, target)
    providers = {p.name: p for p in op.providers()}
    for name in ("torch", "fastattn-torch", "fastattn-native"):
        if name == "fastattn-native" and "native" not in fastattn.available_backends("cpu"):
            continue
        torch.testing.assert_close(providers[name].make(case)(logits, target), expected)
    torch.testing.assert_close(op.reference(case, logits.double(), target),
                               expected.double())


class _WithWrongProvider(SoftmaxBench):
    """The real softmax benchmark plus a provider that computes something else."""

    def providers(self):
        wrong = Provider("off-by-1%", lambda case: (lambda x: torch.softmax(x * 1.01, -1)))
        return [p for p in super().providers() if p.name == "torch"] + [wrong]


def test_provider_that_disagrees_is_failed_not_timed():
    op = _WithWrongProvider()
    case = Case.make("softmax", "float32", rows=8, cols=300)
    s = runner.Settings(device=torch.device("cpu"), warmup_ms=1, rep_ms=2, memory="off")
    results = runner.Runner(s, ceilings={}).run_case(op, case)
    by = {(r.provider, r.mode): r for r in results}
    for mode in ("fwd", "bwd", "fwd_bwd"):
        bad, good = by[("off-by-1%", mode)], by[("torch", mode)]
        assert bad.status == "failed" and "disagrees" in bad.reason and bad.timing is None
        assert good.status == "ok" and good.timing is not None and good.speedup == 1.0


class _WithJitProvider(SoftmaxBench):
    """torch, and a provider marked ``jit`` whose first call sleeps (a stand-in compile)."""

    def providers(self):
        calls = []

        def make(case):
            def fn(x):
                if not calls:
                    time.sleep(0.2)
                calls.append(1)
                return torch.softmax(x, -1)
            return fn

        torch_ = [p for p in super().providers() if p.name == "torch"]
        return torch_ + [Provider("jit", make, jit=True)]


def test_jit_provider_first_call_is_reported_as_compile_s_not_timed():
    op = _WithJitProvider()
    s = runner.Settings(device=torch.device("cpu"), warmup_ms=1, rep_ms=2, memory="off",
                        modes=["fwd"])
    run = runner.Runner(s, ceilings={})
    first = run.run_case(op, Case.make("softmax", "float32", rows=8, cols=300))
    later = run.run_case(op, Case.make("softmax", "float32", rows=8, cols=600))
    by = {r.provider: r for r in first}
    assert by["jit"].compile_s >= 0.2 and by["jit"].to_dict()["compile_s"] == by["jit"].compile_s
    assert by["jit"].timing.median_ms < 200  # the slow first call is not in the timings
    assert by["torch"].compile_s is None
    assert all(r.compile_s is None for r in later)  # compiled once per op and dtype
    _, notes = report.tables([r.to_dict() for r in first], host_clock=True)
    assert any("jit float32: first call" in n for n in notes)


def _sdpa_in_bthd(case):
    # A provider in flash-attn's (B, T, H, D) layout, built from SDPA.
    def fn(q, k, v):
        out = torch.nn.functional.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),  # (B, H, T, D)
            is_causal=case.p["causal"], enable_gqa=True)
        return out.transpose(1, 2)  # (B, T, H, D)
    return fn


def test_check_converts_provider_layouts_outside_the_call():
    op = get_op("attention")
    case = Case.make("attention", "float32", model="t", batch=2, heads=4, kv_heads=2,
                     head_dim=16, seqlen=33, causal=True)
    def bthd(t):
        return t.transpose(1, 2)  # (B, H, T, D) <-> (B, T, H, D)

    good = Provider("bthd", _sdpa_in_bthd, to_layout=bthd, from_layout=bthd)
    verdict = runner.check(op, case, good, torch.device("cpu"), backward=True)
    assert verdict["ok"], verdict
    assert set(verdict["tensors"]) == {"out", "grad0", "grad1", "grad2"}
    # the same kernel declared in the wrong layout is caught, not timed
    wrong = Provider("bthd-undeclared", _sdpa_in_bthd)
    verdict = runner.check(op, case, wrong, torch.device("cpu"), backward=False)
    assert not verdict["ok"]
    call = runner.build_call(op, case, good, "fwd_bwd", torch.device("cpu"))
    grads = call()
    assert [tuple(g.shape) for g in grads] == [(2, 33, 4, 16), (2, 33, 2, 16), (2, 33, 2, 16)]


def test_check_passes_pytorch_itself_for_every_op():
    for name in ("softmax", "cross_entropy", "attention", "model"):
        op = get_op(name)
        case = op.sweep(torch.device("cpu"), quick=True, dtypes=["float32"])[0]
        torch_provider = next(p for p in op.providers() if p.name == "torch")
        verdict = runner.check(op, case, torch_provider, torch.device("cpu"), backward=True)
        assert verdict["ok"], verdict
        assert set(verdict["tensors"]) >= {"out", "grad0"}


def test_model_work_is_palm_training_flops():
    # L2 H4/2 C128 V4099 T128, no biases, tied head: embedding 4099*128; per layer qkv
    # 128*(4+2*2)*32, out 128*128, MLP 2*128*512, two norms 2*128; final norm 128.
    case = Case.make("model", "float32", layers=2, heads=4, kv_heads=2, embd=128, vocab=4099,
                     batch=4, seq=128)
    params = 4099 * 128 + 2 * (128 * 256 + 128 * 128 + 2 * 128 * 512 + 2 * 128) + 128
    per_token = 6 * params + 12 * 2 * 4 * 32 * 128 / 2  # weights, then causal attention
    op = get_op("model")
    assert op.work(case, "fwd_bwd").amount == per_token * 4 * 128
    assert op.work(case, "fwd").amount == per_token * 4 * 128 / 3


def test_cpu_peak_memory_in_a_fresh_process():
    case = Case.make("softmax", "float32", rows=256, cols=4096)
    m = memory.cpu_peak_in_subprocess({"case": case.to_dict(), "provider": "torch",
                                       "mode": "fwd"})
    out_bytes = 256 * 4096 * 4
    assert out_bytes <= m["peak_increase_bytes"] < 8 * out_bytes


# --- compare gate on synthetic result files ----------------------------------------------------


def _doc(device: str, medians: dict[str, float], status: dict[str, str] | None = None) -> dict:
    results = []
    for provider, ms in medians.items():
        st = (status or {}).get(provider, "ok")
        results.append({
            "op": "softmax", "case": "rows=8 cols=8", "dtype": "bfloat16", "mode": "fwd",
            "provider": provider, "kind": "fastattn" if provider.startswith("fastattn")
            else "pytorch", "status": st, "reason": None if st == "ok" else "boom",
            "timing": {"median_ms": ms} if st == "ok" else None})
    return report.validate(report.document(
        {"device": {"type": "cuda", "name": device, "capability": "9.0"}}, {}, None, results,
        ["fastattn-bench"]))


BASE = {"fastattn-triton": 1.0, "fastattn-torch": 2.0, "torch": 3.0}


def test_compare_passes_identical_results():
    v = compare.compare(_doc("H100", BASE), _doc("H100", BASE))
    assert v.ok and v.geomean == 1.0 and not v.problems


def test_compare_fails_a_30_percent_slowdown():
    v = compare.compare(_doc("H100", BASE), _doc("H100", {**BASE, "fastattn-triton": 1.3}))
    assert not v.ok
    assert any("fastattn-triton" in p and "1.30x" in p for p in v.problems)


def test_compare_geomean_gate_and_provider_scope():
    # 8% slower on both kernels: within the 10% per-kernel limit, beyond the 3% geomean limit
    slower = {**BASE, "fastattn-triton": 1.08, "fastattn-torch": 2.16}
    v = compare.compare(_doc("H100", BASE), _doc("H100", slower))
    assert not v.ok and any("geometric mean" in p for p in v.problems)
    # PyTorch's own provider is not gated unless asked
    torch_slower = {**BASE, "torch": 6.0}
    assert compare.compare(_doc("H100", BASE), _doc("H100", torch_slower)).ok
    assert not compare.compare(_doc("H100", BASE), _doc("H100", torch_slower),
                               all_providers=True).ok


def test_compare_fails_a_kernel_that_stopped_working():
    v = compare.compare(_doc("H100", BASE),
                        _doc("H100", BASE, status={"fastattn-triton": "failed"}))
    assert not v.ok and any("failed in NEW" in p for p in v.problems)


def test_compare_refuses_different_devices(tmp_path, capsys):
    with pytest.raises(compare.DeviceMismatchError, match="H100.*H200"):
        compare.compare(_doc("H100", BASE), _doc("H200", BASE))
    assert compare.compare(_doc("H100", BASE), _doc("H200", BASE),
                           allow_different_devices=True).ok
    base, new = tmp_path / "base.json", tmp_path / "new.json"
    report.write_json(_doc("H100", BASE), base)
    report.write_json(_doc("H200", BASE), new)
    assert cli.main(["compare", str(base), str(new)]) == 2
    assert "different devices" in capsys.readouterr().out
    assert cli.main(["compare", str(base), str(new), "--allow-different-devices"]) == 0
    report.write_json(_doc("H200", {**BASE, "fastattn-torch": 2.6}), new)
    assert cli.main(["compare", str(base), str(new), "--allow-different-devices"]) == 1


def test_compare_rejects_bad_files_and_thresholds(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema": "something-else"}))
    good = tmp_path / "good.json"
    report.write_json(_doc("H100", BASE), good)
    assert cli.main(["compare", str(bad), str(good)]) == 2
    assert "schema" in capsys.readouterr().out
    assert cli.main(["compare", str(tmp_path / "missing.json"), str(good)]) == 2
    with pytest.raises(SystemExit):
        cli.main(["compare", str(good), str(good), "--threshold", "-0.1"])
    assert "--threshold" in capsys.readouterr().err
    with pytest.raises(ValueError, match="per_kernel"):
        compare.compare(_doc("H100", BASE), _doc("H100", BASE), per_kernel=-1)


# --- tune: the fastest backend per shape class ---------------------------------------------------

CPU = torch.device("cpu")
SMALL_ROWS = "float32/cols<=1024"


@pytest.fixture
def tuned_cache(tmp_path, monkeypatch):
    """A cache directory of this test's own; no table read in it outlives the test."""
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path))
    backends.reload_tuned()
    yield tmp_path
    backends.reload_tuned()


@pytest.mark.parametrize("quick", [True, False])
def test_tune_measures_each_class_once(quick):
    for op in tune.TUNED_OPS:
        got = [tune.class_of(c) for c in tune.cases(op, quick, ["float32", "bfloat16"])]
        want = [k for k in _tuned.classes(op) if k.split("/")[0] in ("float32", "bfloat16")]
        if quick and op == "attention":  # long keys are too slow for a quick CPU run
            want = [k for k in want if k.endswith(("/s<=1024", "/s<=4096"))]
        assert sorted(got) == sorted(want)


def test_tune_quick_writes_the_table_that_select_then_uses(tuned_cache, capsys):
    argv = ["tune", "--device", "cpu", "--quick", "--ops", "softmax,cross_entropy",
            "--classes", SMALL_ROWS, "--dtypes", "float32", "--warmup-ms", "1", "--rep-ms", "3"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    path = _tuned.path_for(CPU)
    assert f"wrote {path}" in printed.replace("\n", "")
    table = json.loads(path.read_text())
    assert table["format"] == _tuned.FORMAT and table["command"].endswith(shlex.join(argv))
    assert table["identity"] == _tuned.identity(CPU, ["softmax", "cross_entropy"])
    for op in ("softmax", "cross_entropy"):
        (key, entry), = table["ops"][op].items()
        times = entry["times_ms"]
        # every candidate passed the float64 check and was timed; the fastest won
        assert key == SMALL_ROWS and set(times) == set(backends.candidates(CPU, op))
        assert all(t > 0 for t in times.values()) and entry["backend"] == min(times, key=times.get)
    winner = table["ops"]["softmax"][SMALL_ROWS]["backend"]
    assert fastattn.explain(CPU, "softmax", dtype=torch.float32, size=1000) == (
        winner, f"tuned table {path} for class {SMALL_ROWS}")
    x = torch.randn(4, 1000)
    torch.testing.assert_close(fastattn.softmax(x, -1), torch.softmax(x, -1))
    assert fastattn.explain(CPU, "softmax", dtype=torch.float32, size=5000)[0] == (
        backends.fixed_order("cpu", "softmax"))  # a class it did not measure


def test_tune_never_chooses_a_backend_that_fails_the_check(tuned_cache, monkeypatch, capsys):
    candidates = backends.candidates(CPU, "softmax")
    broken = next((b for b in ("native", "numba") if b in candidates), None)
    if broken is None:
        pytest.skip("neither native nor numba runs here")
    module = importlib.import_module(f"fastattn.{broken}.softmax")
    # softmax_fwd, and native's differentiable op (its eager calls run that one)
    for name in ("softmax_fwd", "softmax"):
        if hasattr(module, name):
            real = getattr(module, name)
            monkeypatch.setattr(module, name, lambda *a, real=real, **k: real(*a, **k) * 1.01)
    argv = ["tune", "--device", "cpu", "--quick", "--ops", "softmax", "--classes", SMALL_ROWS,
            "--warmup-ms", "1", "--rep-ms", "3"]
    assert cli.main(argv) == 1
    assert "disagrees with the reference" in capsys.readouterr().out
    entry = json.loads(_tuned.path_for(CPU).read_text())["ops"]["softmax"][SMALL_ROWS]
    assert broken not in entry["times_ms"] and entry["backend"] != broken
    assert set(entry["times_ms"]) == set(candidates) - {broken}


# --- the CLI end to end ------------------------------------------------------------------------


@pytest.mark.parametrize(("argv", "name"), [
    (["--device", "tpu"], "--device"),
    (["--ops", "softmax,matmul"], "--ops"),
    (["--warmup-ms", "-5"], "--warmup-ms"),
    (["--rep-ms", "nan"], "--rep-ms"),
    (["--dtypes", "int8"], "--dtypes"),
    (["--modes", "forward"], "--modes"),
    (["--memory", "some"], "--memory"),
    (["--providers", "fastattn-*,cublas"], "--providers"),
    (["tune", "--device", "cpu", "--ops", "model"], "--ops"),
    (["tune", "--device", "cpu", "--classes", "float32/cols<=7"], "--classes"),
    (["tune", "--device", "cpu", "--classes", ","], "--classes"),
    (["tune", "--device", "cpu", "--rep-ms", "0"], "--rep-ms"),
])
def test_cli_rejects_bad_arguments_naming_them(argv, name, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert name in capsys.readouterr().err


def test_cli_lists_providers_and_why_they_cannot_run(capsys):
    assert cli.main(["--list", "--device", "cpu", "--ops", "attention"]) == 0
    rows = {r[1]: r[3] for r in cli.list_providers(["attention"], torch.device("cpu"), True,
                                                    ["float32"])}
    assert rows["sdpa-math"] == "available" and rows["torch"] == "available"
    assert "CUDA only" in rows["sdpa-cudnn"] and "CUDA only" in rows["xformers"]
    assert "sdpa-cudnn" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CUDA message differs")
def test_cli_rejects_cuda_without_a_gpu(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_quick_run_end_to_end_writes_valid_result_files(tmp_path, capsys):
    out_json, out_csv, plots = tmp_path / "r.json", tmp_path / "r.csv", tmp_path / "plots"
    argv = ["--device", "cpu", "--quick", "--ops", "softmax,cross_entropy",
            "--providers", "fastattn-*,torch", "--dtypes", "float32", "--memory", "off",
            "--warmup-ms", "1", "--rep-ms", "3",
            "--json", str(out_json), "--csv", str(out_csv), "--plot", str(plots),
            "--no-progress"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "softmax" in printed and "GB/s" in printed and "fastattn-torch" in printed

    doc = report.load(out_json)
    env = doc["environment"]
    assert env["device"]["type"] == "cpu" and env["device"]["name"]
    assert env["versions"]["torch"] == torch.__version__ and "triton" in env["versions"]
    assert len(env["git"]["commit"]) == 40
    assert env["command"].endswith(" ".join(argv[-3:]))
    assert doc["argv"][1:] == argv
    ceilings = doc["ceilings"]
    assert ceilings["bandwidth_gbs"] > 0 and ceilings["matmul_fp32_tflops"] > 0

    ok = [r for r in doc["results"] if r["status"] == "ok"]
    first = {}  # op -> its first case: where a JIT provider's compile time is reported
    for r in doc["results"]:
        first.setdefault(r["op"], r["case"])
    # every CPU kernel backend built or installed here (native, numba), never the interpreter
    kernels = {f"fastattn-{b}" for op in ("softmax", "cross_entropy")
               for b in fastattn.available_backends("cpu", op) if b != "triton"}
    assert {r["provider"] for r in ok} == {"torch"} | kernels
    assert all((r["compile_s"] is not None) == (r["provider"] == "fastattn-numba" and
                                                r["case"] == first[r["op"]]) for r in ok)
    assert {(r["op"], r["mode"]) for r in ok} == {
        ("softmax", "fwd"), ("softmax", "bwd"), ("softmax", "fwd_bwd"),
        ("cross_entropy", "fwd"), ("cross_entropy", "fwd_bwd")}
    for r in ok:
        t = r["timing"]
        assert t["n"] == len(t["samples_ms"]) >= 5 and t["p10_ms"] <= t["median_ms"] <= t["p90_ms"]
        case = Case.make(r["op"], r["dtype"], **r["params"])
        expected = get_op(r["op"]).work(case, r["mode"]).rate(t["median_ms"] * 1e-3)
        assert r["throughput"] == pytest.approx(expected) and r["throughput_unit"] == "GB/s"
        assert r["pct_of_ceiling"] == pytest.approx(
            100 * r["throughput"] / ceilings["bandwidth_gbs"])
        assert r["error"]["ok"] and r["speedup_vs_baseline"] > 0
    skipped = {r["provider"]: r["reason"] for r in doc["results"] if r["status"] == "skipped"}
    assert "not timed" in skipped["fastattn-triton"] or "interpreter" in skipped["fastattn-triton"]

    with out_csv.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(doc["results"]) and set(rows[0]) == set(report.CSV_FIELDS)
    assert {p.name for p in plots.iterdir()} == {"softmax.png", "cross_entropy.png"}
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in plots.iterdir())

    # the same file compared with itself passes the gate
    assert cli.main(["compare", str(out_json), str(out_json)]) == 0
    slower = copy.deepcopy(doc)
    for r in slower["results"]:
        if r["provider"] == "fastattn-torch" and r["status"] == "ok":
            r["timing"]["median_ms"] *= 1.3
    report.write_json(slower, tmp_path / "slower.json")
    assert cli.main(["compare", str(out_json), str(tmp_path / "slower.json")]) == 1


def test_cpu_memory_auto_measures_fwd_bwd_of_the_largest_case():
    s = runner.Settings(device=torch.device("cpu"), warmup_ms=1, rep_ms=2, memory="largest",
                        providers=["torch"])
    r = runner.Runner(s, ceilings={})
    results = [x for x in r.run(r.plan(["softmax"])) if x.status == "ok"]
    measured = [x for x in results if x.memory]
    largest = get_op("softmax").sweep(torch.device("cpu"), True, ["float32"])[-1]
    assert [(x.case, x.mode) for x in measured] == [(largest, "fwd_bwd")]
    # the input gradient at least (float32); page-granular RSS, so no exact figure
    size = largest.p["rows"] * largest.p["cols"] * 4
    assert size <= measured[0].memory["peak_increase_bytes"] < 8 * size


def test_case_too_large_for_free_memory_is_skipped_before_allocating():
    huge = Case.make("softmax", "float32", rows=2**20, cols=2**20)  # 4 TiB per tensor
    s = runner.Settings(device=torch.device("cpu"), memory="off", providers=["torch"])
    results = runner.Runner(s, ceilings={}).run_case(get_op("softmax"), huge)
    assert results and all(r.status == "skipped" and "GiB free" in r.reason for r in results)


def test_time_budget_skips_remaining_cases(capsys):
    s = runner.Settings(device=torch.device("cpu"), warmup_ms=1, rep_ms=2, memory="off",
                        budget_s=1e-9, providers=["torch"])
    r = runner.Runner(s, ceilings={})
    results = r.run(r.plan(["softmax"]))
    assert results and all(x.status == "skipped" and "budget" in x.reason for x in results)


# --- the pytest-benchmark suites ---------------------------------------------------------------


def test_benchmark_suites_run_under_benchmark_disable(tmp_path):
    env = {**os.environ, "FASTATTN_BENCH_QUICK": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks", "-q", "--benchmark-disable",
         "-p", "no:cacheprovider",
         # one case per op (the smallest), fastattn's torch backend and PyTorch
         "-k", "(64x4096 or 32x4099 or B1_L128) and not causal and (fastattn-torch or -torch])"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and " failed" not in proc.stdout


def test_benchmark_machine_info_refuses_other_gpus():
    from fastattn.bench import pytest_plugin

    info: dict = {}
    pytest_plugin.pytest_benchmark_update_machine_info(None, info)
    assert info["fastattn_device"]["name"]
    pytest_plugin.pytest_benchmark_compare_machine_info(None, None, info,
                                                        {"machine_info": info})
    other = {"machine_info": {"fastattn_device": {"name": "NVIDIA H200"}}}
    with pytest.raises(pytest.UsageError, match="different devices"):
        pytest_plugin.pytest_benchmark_compare_machine_info(None, None, info, other)
