"""Backend availability, selection and ``use_backend``: which backend actually ran is read from
the ``backend`` argument of the registered ``fastattn::`` ops, recorded by a dispatch mode."""

import importlib.util
import itertools
import json
import logging
import os
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import fastattn
import fastattn.numba
from fastattn import _tuned
from fastattn.backends import BACKENDS, ENV_VAR

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
# What runs with no request, and a different backend to request, for tensors on DEVICE.
DEFAULT = "triton" if DEVICE == "cuda" and HAS_TRITON and not INTERPRETED else "torch"
OTHER = "torch" if DEFAULT == "triton" else "triton"
# The compiled extension serves CPU tensors when it is built (tests/test_ext.py covers it).
NATIVE_ON_CPU = fastattn.backend_status("cpu")["native"] is None
# numba serves CPU tensors wherever it imports (a core dependency, so normally everywhere).
HAS_NUMBA = fastattn.backend_status("cpu")["numba"] is None

needs_triton = pytest.mark.skipif(
    "triton" not in fastattn.available_backends(DEVICE),
    reason=f"triton cannot run {DEVICE} tensors here",
)


class RecordBackends(TorchDispatchMode):
    """Records ``(op name, backend argument)`` for every ``fastattn::`` op that runs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "fastattn":
            bound = dict(zip([a.name for a in func._schema.arguments], args, strict=False))
            bound.update(kwargs)
            self.calls.append((func.name(), bound["backend"]))
        return func(*args, **kwargs)


def ran_on(fn=None):
    """Run a softmax forward + backward (or ``fn``) and return the set of backends that ran."""
    x = torch.randn(3, 7, device=DEVICE, requires_grad=True)
    with RecordBackends() as rec:
        if fn is None:
            fastattn.softmax(x, -1).sum().backward()
        else:
            fn(x)
    assert rec.calls, "no fastattn op ran"
    return {backend for _, backend in rec.calls}


def test_recorder_sees_forward_and_backward_ops():
    x = torch.randn(3, 7, device=DEVICE, requires_grad=True)
    with RecordBackends() as rec:
        fastattn.log_softmax(x, 0).sum().backward()
    assert [name for name, _ in rec.calls] == ["fastattn::softmax_fwd", "fastattn::softmax_bwd"]


def test_status_covers_every_backend_with_reason_or_none():
    status = fastattn.backend_status()
    assert list(status) == list(BACKENDS)
    assert status["torch"] is None
    assert (status["numba"] is None) == HAS_NUMBA
    assert status["native"] is None or status["native"].strip()  # None where it is built
    for name, why in status.items():
        assert why is None or (isinstance(why, str) and why), name
    assert fastattn.available_backends() == [n for n, why in status.items() if why is None]


def test_available_backends_on_this_machine():
    available = fastattn.available_backends()
    assert "torch" in available
    assert ("numba" in available) == HAS_NUMBA
    assert ("native" in available) == NATIVE_ON_CPU
    if HAS_TRITON and (INTERPRETED or torch.cuda.is_available()):
        assert "triton" in available


def test_available_backends_per_device():
    # The interpreter serves CPU tensors only; without it triton serves CUDA tensors only.
    triton_on_cpu = HAS_TRITON and INTERPRETED
    native = ["native"] * NATIVE_ON_CPU
    numba = ["numba"] * HAS_NUMBA
    assert fastattn.available_backends("cpu") == (["torch"] + ["triton"] * triton_on_cpu + native
                                                  + numba)
    assert fastattn.available_backends(torch.device("cpu")) == fastattn.available_backends("cpu")
    assert fastattn.available_backends("meta") == ["torch"]
    assert fastattn.backend_status("meta")["triton"] is not None
    if torch.cuda.is_available():
        triton_on_cuda = HAS_TRITON and not INTERPRETED
        native_on_cuda = fastattn.backend_status("cuda")["native"] is None  # a CUDA build
        assert fastattn.available_backends("cuda") == (["torch"] + ["triton"] * triton_on_cuda
                                                       + ["native"] * native_on_cuda)


def test_default_on_cpu_is_native_where_built_never_the_interpreter():
    x = torch.randn(3, 7, requires_grad=True)
    with RecordBackends() as rec:
        fastattn.softmax(x, -1).sum().backward()
    assert {backend for _, backend in rec.calls} == {"native" if NATIVE_ON_CPU else "torch"}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@needs_triton
def test_default_on_cuda_is_triton():
    assert ran_on() == {"triton"}


@needs_triton
@pytest.mark.parametrize("name", ["torch", "triton"])
def test_use_backend_picks_the_backend_that_runs(name):
    with fastattn.use_backend(name):
        assert ran_on() == {name}


@needs_triton
def test_use_backend_routes_cross_entropy():
    # Every public op goes through the same selection, not only softmax.
    def ce(x):
        target = torch.randint(0, x.shape[1], (x.shape[0],), device=x.device)
        fastattn.cross_entropy(x, target).backward()

    with fastattn.use_backend(OTHER):
        assert ran_on(ce) == {OTHER}
    assert ran_on(ce) == {DEFAULT}


@needs_triton
def test_nested_use_backend_inner_wins_and_outer_is_restored():
    assert ran_on() == {DEFAULT}
    with fastattn.use_backend(OTHER):
        assert ran_on() == {OTHER}
        with fastattn.use_backend(DEFAULT):
            assert ran_on() == {DEFAULT}
        assert ran_on() == {OTHER}
        with pytest.raises(KeyError), fastattn.use_backend(DEFAULT):
            raise KeyError("leaves the inner block by an exception")
        assert ran_on() == {OTHER}
    assert ran_on() == {DEFAULT}
    assert fastattn.backends.requested_backend() == (None, "default")


@needs_triton
def test_use_backend_as_a_decorator_and_entered_again():
    # A ContextDecorator: a decorated function runs under the request on every call, and one
    # use_backend object may be entered again, inside itself too.
    @fastattn.use_backend(OTHER)
    def other():
        return ran_on()

    assert other() == {OTHER}
    assert other() == {OTHER}
    assert ran_on() == {DEFAULT}
    block = fastattn.use_backend(OTHER)
    with block:
        with block:
            assert ran_on() == {OTHER}
        assert ran_on() == {OTHER}
    assert fastattn.backends.requested_backend() == (None, "default")


def test_use_backend_checks_the_name_when_created():
    with pytest.raises(ValueError, match="nope"):
        fastattn.use_backend("nope")
    with pytest.raises(ValueError, match="unknown backend"):
        fastattn.use_backend(["torch"])  # not a name at all (unhashable, too)
    assert fastattn.backends.requested_backend() == (None, "default")


@needs_triton
def test_use_backend_is_thread_local():
    seen = {}

    def worker():
        try:
            seen["thread"] = ran_on()
        except BaseException as exc:  # reported by the main thread
            seen["thread"] = exc

    with fastattn.use_backend(OTHER):
        thread = threading.Thread(target=worker)
        thread.start()
        thread.join()
        seen["main"] = ran_on()
    assert seen["thread"] == {DEFAULT}
    assert seen["main"] == {OTHER}


@needs_triton
def test_env_var_is_read_at_call_time_and_use_backend_overrides_it(monkeypatch):
    monkeypatch.setenv(ENV_VAR, OTHER)
    assert fastattn.backends.requested_backend() == (OTHER, ENV_VAR)
    assert ran_on() == {OTHER}
    with fastattn.use_backend(DEFAULT):
        assert ran_on() == {DEFAULT}
    assert ran_on() == {OTHER}
    monkeypatch.delenv(ENV_VAR)
    assert ran_on() == {DEFAULT}


def test_unknown_backend_name_is_a_value_error_naming_the_known_ones():
    with pytest.raises(ValueError, match="nope") as info, fastattn.use_backend("nope"):
        pass
    for name in BACKENDS:
        assert name in str(info.value)
    assert fastattn.backends.requested_backend() == (None, "default")


def test_numba_never_serves_cuda_tensors():
    # Availability per device: numba kernels are CPU code, whatever the machine has.
    for op in (None, *fastattn.backends.OPS):
        why = fastattn.backend_status("cuda", op)["numba"]
        assert why == "numba kernels run on CPU tensors only, not on cuda tensors"
        assert "numba" not in fastattn.available_backends("cuda", op)
    if torch.cuda.is_available() and HAS_NUMBA:
        with fastattn.use_backend("numba"), pytest.raises(
                fastattn.BackendUnavailableError, match="CPU tensors only"):
            fastattn.softmax(torch.randn(2, 3, device="cuda"), -1)


def test_numba_reason_when_it_is_not_installed(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "numba" else find_spec(name, *a))
    why = fastattn.numba.import_error.__wrapped__()
    assert why == "numba is not installed (pip install numba)"
    # attention also needs scipy (the BLAS gemm of its tile products); softmax and CE do not
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "scipy" else find_spec(name, *a))
    assert "pip install scipy" in fastattn.numba._blas_error.__wrapped__()
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "threadpoolctl" else find_spec(name, *a))
    assert "pip install threadpoolctl" in fastattn.numba._blas_error.__wrapped__()
    monkeypatch.setattr(fastattn.numba, "_blas_error", lambda: "no scipy")
    assert fastattn.backend_status("cpu", "attention")["numba"] == "no scipy"
    assert fastattn.backend_status("cpu", "softmax")["numba"] == fastattn.numba.import_error()


@pytest.mark.skipif(not HAS_NUMBA, reason="numba does not import here")
def test_numba_kernels_from_several_threads():
    # Numba's workqueue threading layer (its fallback without OpenMP or TBB) aborts the process
    # on concurrent parallel launches; the launchers serialise them. A fresh process pins it.
    code = (
        "import threading, torch, fastattn\n"
        "x = torch.randn(8, 300)\n"
        "def work():\n"
        "    with fastattn.use_backend('numba'):\n"
        "        for _ in range(30):\n"
        "            torch.testing.assert_close(fastattn.softmax(x, -1), torch.softmax(x, -1))\n"
        "threads = [threading.Thread(target=work) for _ in range(4)]\n"
        "[t.start() for t in threads]\n"
        "[t.join() for t in threads]\n"
        "import numba; print(numba.threading_layer())\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "NUMBA_THREADING_LAYER": "workqueue",
           "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "workqueue"


# Numba's attention tiles call scipy's OpenBLAS from prange threads: BLAS must run on the
# calling thread during a launch, and the caller's own BLAS thread counts come back after it.
@pytest.mark.skipif(not HAS_NUMBA or fastattn.numba.reason("cpu", "attention") is not None,
                    reason="numba attention cannot run here")
def test_numba_attention_launch_holds_blas_to_one_thread():
    from fastattn.numba import attention as numba_attention

    libs = numba_attention._blas_libs()
    assert libs, "no BLAS library found for numba attention's gemm"
    original = [lib.get_num_threads() for lib in libs]
    for lib in libs:
        lib.set_num_threads(2)
    try:
        with numba_attention._launching():
            assert [lib.get_num_threads() for lib in libs] == [1] * len(libs)
        assert [lib.get_num_threads() for lib in libs] == [2] * len(libs)
    finally:
        for lib, n in zip(libs, original, strict=True):
            lib.set_num_threads(n)


# The tile product numba attention calls BLAS through: row-major, every transpose, alpha and
# beta, odd sizes, one-row and one-column results, an empty inner dimension, and operands that
# are column slices of wider arrays (rows contiguous, row stride past the row length).
@pytest.mark.skipif(not HAS_NUMBA or fastattn.numba.reason("cpu", "attention") is not None,
                    reason="numba attention cannot run here")
@pytest.mark.parametrize("dtype_name", ["float32", "float64"])
def test_numba_gemm_matches_numpy(dtype_name):
    import numba
    import numpy as np

    from fastattn.numba.attention import gemm

    @numba.njit
    def call(a, b, c, trans_a, trans_b, alpha, beta, scalars):
        gemm(a, b, c, trans_a, trans_b, alpha, beta, scalars)

    dtype = np.dtype(dtype_name).type
    rng = np.random.default_rng()
    for trans_a in (False, True):
        for trans_b in (False, True):
            for (m, n, k), pad in itertools.product(
                    [(5, 7, 3), (1, 4, 9), (6, 1, 2), (3, 3, 0), (0, 3, 2), (33, 65, 17)], (0, 5)):
                def operand(rows, cols, pad=pad):  # (rows, cols), row stride cols + pad
                    return rng.standard_normal((rows, cols + pad)).astype(dtype)[:, pad:]

                a = operand(*((k, m) if trans_a else (m, k)))
                b = operand(*((n, k) if trans_b else (k, n)))
                c = operand(m, n)
                a0, b0, c0 = a.copy(), b.copy(), c.copy()
                c_base = c.base.copy()  # the columns outside the view must stay as they are
                call(a, b, c, trans_a, trans_b, dtype(0.5), dtype(-2.0), np.empty(2, dtype))
                assert np.array_equal(c.base[:, :pad], c_base[:, :pad])
                op_a = (a0.T if trans_a else a0).astype(np.float64)
                op_b = (b0.T if trans_b else b0).astype(np.float64)
                expect = 0.5 * op_a @ op_b - 2.0 * c0
                tol = 1e-5 if dtype == np.float32 else 1e-12
                np.testing.assert_allclose(c, expect, rtol=tol, atol=tol,
                                           err_msg=f"{trans_a=} {trans_b=} {m=} {n=} {k=} {pad=}")
                assert np.array_equal(a, a0) and np.array_equal(b, b0)
    # rows that are not contiguous cannot be described to BLAS: refused, not misread
    a = np.ones((4, 6), dtype)[:, ::2]
    with pytest.raises(ValueError, match="not contiguous"):
        call(a, np.ones((3, 2), dtype), np.ones((4, 2), dtype), False, False, dtype(1.0),
             dtype(0.0), np.empty(2, dtype))


# The numba kernels' own float32 exp (fastattn.numba.common.fexp: a polynomial, since Numba has
# no vector libm) against float64's, in the loop form the kernels vectorise: within 1.5 ulp
# where the result is normal, within one step of 2^-149 where it is subnormal, and exact at
# the special values softmax relies on (exp(-inf) = 0 for masked elements, inf, NaN).
@pytest.mark.skipif(not HAS_NUMBA or fastattn.numba.reason("cpu", "softmax") is not None,
                    reason="numba cannot run here")
def test_numba_fexp_float32_is_within_1_5_ulp():
    import numba
    import numpy as np

    from fastattn.numba.common import fexp

    @numba.njit
    def run(x, out):
        for i in range(x.shape[0]):
            out[i] = fexp(x[i])

    rng = np.random.default_rng()
    specials = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 88.72, 88.73, 89.0, 1e4, -87.33,
                         -103.97, -103.98, -104.0, -150.0, -1e4, 1e-30, -1e-30], np.float32)
    x = np.concatenate([rng.uniform(-110.0, 90.0, 400_000).astype(np.float32),
                        rng.uniform(-1.0, 1.0, 100_000).astype(np.float32), specials])
    out = np.empty_like(x)
    run(x, out)
    with np.errstate(over="ignore"):
        exact = np.exp(x.astype(np.float64))
        rounded = exact.astype(np.float32)
    tiny = np.finfo(np.float32).tiny
    normal = np.isfinite(rounded) & (rounded >= tiny)
    ulps = np.abs(out[normal] - exact[normal]) / np.spacing(rounded[normal]).astype(np.float64)
    assert ulps.max() <= 1.5, f"{ulps.max():.2f} ulp at x = {x[normal][ulps.argmax()]}"
    low = np.isfinite(rounded) & (rounded < tiny)  # subnormal or 0
    assert low.sum() > 1000
    steps = np.abs(out[low] - exact[low]) / 2.0**-149
    assert steps.max() <= 1.0, f"{steps.max():.2f} x 2^-149 at x = {x[low][steps.argmax()]}"
    assert np.all(out[np.isinf(rounded)] == np.inf)
    tail = out[-len(specials):]
    assert tail[3] == 0.0 and tail[2] == np.inf and np.isnan(tail[4]) and tail[0] == 1.0
    assert np.all(tail[11:15] == 0.0)  # -103.98 and below underflow to 0


@pytest.fixture
def no_numba(monkeypatch):
    """numba made unavailable, as on a machine where it does not import."""
    monkeypatch.setattr(fastattn.numba, "import_error",
                        lambda: "numba is not installed (pip install numba)")


def test_unavailable_backend_raises_naming_the_available_ones(no_numba):
    with pytest.raises(fastattn.BackendUnavailableError, match="numba") as info:
        with fastattn.use_backend("numba"):
            pass
    message = str(info.value)
    assert "available: " + ", ".join(fastattn.available_backends()) in message
    assert fastattn.backends.requested_backend() == (None, "default")
    x = torch.randn(2, 3, device=DEVICE)
    torch.testing.assert_close(fastattn.softmax(x, -1), torch.softmax(x, -1))


def test_unknown_env_backend_raises_at_call_time(monkeypatch):
    x = torch.randn(2, 3, device=DEVICE)
    monkeypatch.setenv(ENV_VAR, "nope")
    with pytest.raises(ValueError, match=ENV_VAR) as info:
        fastattn.softmax(x, -1)
    assert "nope" in str(info.value) and "torch" in str(info.value)


def test_unavailable_env_backend_raises_at_call_time(monkeypatch, no_numba):
    monkeypatch.setenv(ENV_VAR, "numba")
    with pytest.raises(fastattn.BackendUnavailableError, match=ENV_VAR) as info:
        fastattn.softmax(torch.randn(2, 3), -1)
    assert "backends that can: " + ", ".join(fastattn.available_backends("cpu")) in str(info.value)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_without_interpreter_rejects_cpu_tensors(monkeypatch):
    # Holds on CUDA machines too: without the interpreter triton never takes CPU tensors.
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(ENV_VAR, "triton")
    can = ["torch"] + ["native"] * NATIVE_ON_CPU + ["numba"] * HAS_NUMBA
    assert fastattn.available_backends("cpu") == can
    with pytest.raises(fastattn.BackendUnavailableError, match="TRITON_INTERPRET") as info:
        fastattn.log_softmax(torch.randn(2, 3), -1)
    assert "backends that can: " + ", ".join(can) in str(info.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, triton is usable here")
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_use_backend_triton_without_interpreter_or_cuda(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    can = ["torch"] + ["native"] * NATIVE_ON_CPU + ["numba"] * HAS_NUMBA
    assert fastattn.available_backends() == can
    with pytest.raises(fastattn.BackendUnavailableError, match="triton") as info:
        with fastattn.use_backend("triton"):
            pass
    assert "available: " + ", ".join(can) in str(info.value)


def test_import_has_no_side_effects():
    # A fresh interpreter: no triton import, no CUDA initialisation, nothing printed.
    code = (
        "import sys\n"
        "import fastattn\n"
        "import torch\n"
        "loaded = [m for m in sys.modules if m.split('.')[0] == 'triton'\n"
        "          or m.startswith('fastattn.triton')]\n"
        "sys.exit(f'imported {loaded}' if loaded else\n"
        "         'initialised CUDA' if torch.cuda.is_initialized() else 0)\n"
    )
    root = Path(__file__).resolve().parents[1]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=root, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""
    assert proc.stderr == ""


# --- the tuned table (fastattn-bench tune) -----------------------------------------------------

CPU = torch.device("cpu")
DEFAULT = "native" if NATIVE_ON_CPU else "torch"  # the fixed order's CPU backend
# A backend the fixed order does not pick on CPU, so a table naming it is visible in what runs.
TUNED = "torch" if NATIVE_ON_CPU else "numba" if HAS_NUMBA else None
needs_tuned = pytest.mark.skipif(TUNED is None, reason="neither native nor numba runs here")
SMALL = "float32/cols<=1024"  # the class of the (3, 7) float32 rows below


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty cache directory that fastattn reads its tuned tables from."""
    monkeypatch.setenv("FASTATTN_CACHE_DIR", str(tmp_path))
    fastattn.backends.reload_tuned()
    yield tmp_path
    fastattn.backends.reload_tuned()


def write_table(backend=TUNED, cls=SMALL, **identity):
    """A CPU table choosing ``backend`` for softmax class ``cls``, its identity that of this
    process updated with ``identity``; returns its path."""
    table = _tuned.make(CPU, {"softmax": {cls: {"backend": backend,
                                                "times_ms": {backend: 1.0, "torch": 2.0}}}},
                        "written by a test")
    table["identity"].update(identity)
    return _tuned.write(table, _tuned.path_for(CPU))


def cpu_ran_on(fn):
    """The backends of the fastattn ops ``fn`` runs."""
    with RecordBackends() as rec:
        fn()
    assert rec.calls, "no fastattn op ran"
    return {backend for _, backend in rec.calls}


def softmax_on(x):
    """Softmax forward and backward of ``x``: the backends that ran, checked against PyTorch."""
    x = x.requires_grad_()
    backends_run = cpu_ran_on(lambda: torch.autograd.grad(fastattn.softmax(x, -1).pow(2).sum(), x))
    y = fastattn.softmax(x, -1)
    torch.testing.assert_close(y, torch.softmax(x, -1))
    return backends_run


@pytest.mark.parametrize(("op", "dtype", "size", "key"), [
    ("softmax", torch.float32, 1024, "float32/cols<=1024"),
    ("softmax", torch.bfloat16, 1025, "bfloat16/cols<=8192"),
    ("cross_entropy", torch.float16, 65536, "float16/cols<=65536"),
    ("cross_entropy", torch.float64, 65537, "float64/cols>65536"),
    ("attention", torch.float32, (64, 1024), "float32/d<=64/s<=1024"),
    ("attention", torch.bfloat16, (65, 16385), "bfloat16/d<=128/s>16384"),
    ("softmax", torch.int64, 7, None),  # no class: the fixed order decides
    ("softmax", torch.float32, None, None),
])
def test_shape_classes_bucket_dtype_and_lengths(op, dtype, size, key):
    assert _tuned.shape_class(op, dtype, size) == key
    assert key is None or key in _tuned.classes(op)


def test_missing_table_is_silent_and_the_fixed_order_applies(cache, recwarn):
    assert softmax_on(torch.randn(3, 7)) == {DEFAULT}
    backend, reason = fastattn.explain("cpu", "softmax", dtype=torch.float32, size=7)
    assert backend == DEFAULT
    assert reason == f"default order for cpu (no tuned table at {_tuned.path_for(CPU)})"
    assert not recwarn.list


@needs_tuned
def test_a_table_written_after_calls_is_honoured_after_reload(cache):
    # choose() keeps the fixed order's CPU answer for a class the table lacks; reload_tuned()
    # must drop it along with the tables, or a table written later would never be seen.
    assert softmax_on(torch.randn(3, 7)) == {DEFAULT}
    assert softmax_on(torch.randn(3, 7)) == {DEFAULT}  # the kept answer
    write_table()
    fastattn.backends.reload_tuned()
    assert softmax_on(torch.randn(3, 7)) == {TUNED}


@needs_tuned
def test_tuned_table_is_honoured_for_its_class(cache, caplog):
    path = write_table()
    with caplog.at_level(logging.DEBUG, logger="fastattn"):
        assert softmax_on(torch.randn(3, 7)) == {TUNED}
    assert f"{TUNED}, from the tuned table {path} for class {SMALL}" in caplog.text
    assert fastattn.explain("cpu", "softmax", dtype=torch.float32, size=7) == (
        TUNED, f"tuned table {path} for class {SMALL}")
    # log_softmax is the same op; a 1-d input is one row
    x = torch.randn(5)
    assert cpu_ran_on(lambda: fastattn.log_softmax(x, 0)) == {TUNED}


@needs_tuned
def test_tuned_table_is_ignored_for_other_classes_and_ops(cache):
    path = write_table()
    assert softmax_on(torch.randn(3, 2000)) == {DEFAULT}  # float32/cols<=8192
    assert softmax_on(torch.randn(3, 7, dtype=torch.float64)) == {DEFAULT}
    logits, target = torch.randn(3, 7, requires_grad=True), torch.randint(0, 7, (3,))
    assert cpu_ran_on(lambda: fastattn.cross_entropy(logits, target).backward()) == {DEFAULT}
    assert fastattn.explain("cpu", "softmax", dtype=torch.float32, size=2000) == (
        DEFAULT, f"default order for cpu (class float32/cols<=8192 of softmax is not in the "
                 f"tuned table {path})")


@needs_tuned
def test_table_is_read_once_until_reload(cache):
    path = write_table()
    assert softmax_on(torch.randn(3, 7)) == {TUNED}
    path.unlink()  # no file access per call: the table read first still decides
    assert softmax_on(torch.randn(3, 7)) == {TUNED}
    fastattn.backends.reload_tuned()
    assert softmax_on(torch.randn(3, 7)) == {DEFAULT}


@needs_tuned
def test_explicit_requests_win_over_the_table(cache, monkeypatch):
    write_table()
    with fastattn.use_backend(DEFAULT):
        assert softmax_on(torch.randn(3, 7)) == {DEFAULT}
        assert fastattn.explain("cpu", "softmax", dtype=torch.float32, size=7) == (
            DEFAULT, "use_backend()")
    monkeypatch.setenv(ENV_VAR, DEFAULT)
    assert softmax_on(torch.randn(3, 7)) == {DEFAULT}
    assert fastattn.explain("cpu", "softmax", dtype=torch.float32, size=7) == (
        DEFAULT, ENV_VAR)
    monkeypatch.delenv(ENV_VAR)
    assert softmax_on(torch.randn(3, 7)) == {TUNED}


def _no_numba_now(monkeypatch):
    monkeypatch.setattr(fastattn.numba, "import_error",
                        lambda: "numba is not installed (pip install numba)")


# Each way a table can go stale, and the words its warning uses for it.
@pytest.mark.parametrize(("change", "match"), [
    ({"device_name": "Another CPU"}, "device_name 'Another CPU'"),
    ({"torch": "2.6.0"}, "torch '2.6.0'"),
    ({"fastattn": "0.0.1"}, "fastattn '0.0.1'"),
    ({"extension": not NATIVE_ON_CPU}, "extension"),
    ({"format": 0}, "format version 0"),
    ({"unavailable": "numba"}, "numba"),
])
def test_stale_table_is_ignored_with_one_warning(cache, monkeypatch, change, match):
    if "format" in change:
        path = write_table(backend="torch")
        table = json.loads(path.read_text())
        table["format"] = change["format"]
        path.write_text(json.dumps(table))
    elif "unavailable" in change:
        if not HAS_NUMBA:
            pytest.skip("numba does not import here")
        write_table(backend="numba")
        _no_numba_now(monkeypatch)
    else:
        write_table(backend=TUNED or "torch", **change)
    with pytest.warns(fastattn.TunedTableWarning, match=match) as record:
        assert softmax_on(torch.randn(3, 7)) == {DEFAULT}
    assert len(record) == 1
    assert "stale" in str(record[0].message) and "fastattn-bench tune" in str(record[0].message)
    backend, reason = fastattn.explain("cpu", "softmax", dtype=torch.float32, size=7)
    assert backend == DEFAULT and reason.startswith("default order for cpu (stale tuned table")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read once: no second warning
        assert softmax_on(torch.randn(3, 7)) == {DEFAULT}


def test_table_naming_a_backend_it_did_not_measure_is_stale(cache):
    write_table(backend="triton")  # the interpreter is never a candidate for CPU tensors
    with pytest.warns(fastattn.TunedTableWarning, match="names 'triton' for softmax"):
        assert softmax_on(torch.randn(3, 7)) == {DEFAULT}


# Corrupt tables: not JSON, and JSON of the wrong shape.
@pytest.mark.parametrize(("edit", "match"), [
    (lambda text: text[: len(text) // 2], "not valid JSON"),
    (lambda text: "[1, 2]", "integer 'format'"),
    (lambda text: text.replace('"backend": "torch"', '"backend": 3'), "is not {'backend'"),
    (lambda text: text.replace(SMALL, "float32/cols<=1000"), "unknown shape class"),
    (lambda text: text.replace('"softmax": {', '"softmax": ["x"], "y": {', 1),
     "identity.backends"),
])
def test_corrupt_table_is_ignored_with_a_warning(cache, edit, match):
    path = write_table(backend="torch")
    path.write_text(edit(path.read_text()))
    with pytest.warns(fastattn.TunedTableWarning, match=match) as record:
        assert softmax_on(torch.randn(3, 7)) == {DEFAULT}
    assert len(record) == 1 and "corrupt" in str(record[0].message)


@needs_tuned
def test_compiled_call_uses_the_tuned_backend(cache):
    # The backend is a constant argument of the op in the captured graph (fullgraph: no break).
    write_table()
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    compiled = torch.compile(lambda x: fastattn.softmax(x, -1), fullgraph=True, backend=capture)
    x = torch.randn(3, 7)
    torch.testing.assert_close(compiled(x), torch.softmax(x, -1))
    (gm,) = graphs
    chosen = [node.args[-1] for node in gm.graph.nodes
              if node.op == "call_function" and "fastattn" in str(node.target)]
    assert chosen == [TUNED]
