"""The native CUDA kernels (attention, softmax, cross-entropy), run unchanged on the CPU in an
emulation of the CUDA model (tests/cuda_emulation/: a thread per CUDA thread, barriers, the warp
collectives ldmatrix, mma.sync and shuffles, and Hopper's warpgroup wgmma, computed from the PTX
ISA's fragment and shared-memory layouts), through the same launch logic as on a GPU (the *_impl
templates of csrc/<op>/<op>_cuda.cuh). Both sets of attention kernels (forward, dQ, dK/dV)
run: sm_80's and Hopper's.

What this checks before any GPU sees the code: fragment layouts and every index expression,
tile loops with remainders, causal/window tile skipping, masks, dropout (the CPU generator's
mask, bit for bit), softcap, GQA, padded and copied head dims, rows that see no key, the mask
gradient. Outputs and every gradient must meet test_attention's rule (twice PyTorch's error
against the float64 reference). cp.async and TMA box loads are asynchronous in the emulation
(the destination is NaN from the issue until the wait that covers it, a cp.async wait_group or
a wait on the load's mbarrier; a thread or CTA that leaves copies no wait covered fails the
launch), so a missing wait shows in the numbers. Races: a few cases run again
with the emulation built under ThreadSanitizer, which reports a missing __syncthreads or wait,
or a stage refilled while another warp still reads it, as a data race between CUDA threads;
there each TMA copy of the Hopper TMA kernels is a fiber of its own, ordered only before the
waits on its mbarrier, so a missing or wrong mbarrier wait or an early release is one too.
The emulation's reading of wgmma and the Hopper kernel's operand layouts are held against
CuTe's description of the instructions (test_wgmma_layouts_match_cute). What it cannot check:
races between CTAs (they run one after another), timing, hardware limits and speed;
compute-sanitizer covers the first on a GPU. Emulation is slow (one OS thread per
CUDA thread, TSan about 20x slower again): sizes are small.
"""

import importlib.util
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from check import assert_twice_error

from fastattn import _ext, reference

HERE = Path(__file__).resolve().parent
OPS = torch.ops.fastattn


def _build(name: str, source: str, flags: tuple[str, ...] = ()):
    from torch.utils import cpp_extension

    return cpp_extension.load(
        name=name, sources=[str(HERE / "cuda_emulation" / source)],
        extra_include_paths=[str(HERE / "cuda_emulation"), str(HERE.parent / "csrc")],
        extra_cflags=["-O1", "-std=c++20", "-Wno-unknown-pragmas", *flags],
        extra_ldflags=list(flags), verbose=False)


def _why_no_emulation() -> str | None:
    from torch.utils import cpp_extension

    if torch.cuda.is_available():  # and its build would cost a GPU lease a minute
        return "a GPU is here: the op tests run the native CUDA kernels themselves"
    if sys.platform != "linux":
        return "the emulation's barriers sleep on Linux futexes"
    if not cpp_extension.is_ninja_available() or shutil.which("c++") is None:
        return "building the emulation needs ninja and a C++ compiler"
    if _ext.reason() is not None:
        return f"extension not loaded: {_ext.reason()}"
    return None


@pytest.fixture(scope="module")
def emulated():
    why = _why_no_emulation()
    if why is not None:
        pytest.skip(why)
    return _build("fastattn_cuda_emulation", "attention.cpp")


@pytest.fixture(scope="module")
def emulated_rows():
    why = _why_no_emulation()
    if why is not None:
        pytest.skip(why)
    return _build("fastattn_cuda_emulation_rows", "rows.cpp")


def _inputs(dtype, B, Hq, Hk, L, S, D, Dv, flash):
    def make(H, N, E):
        if flash:  # flash-attn's (B, N, H, E) memory, viewed as (B, H, N, E)
            return torch.randn(B, N, H, E, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, N, E, dtype=dtype)
    return make(Hq, L, D), make(Hk, S, D), make(Hk, S, Dv)


# Each padded head dim the kernels are built for (32, 64, 96, 128, 192, 256; odd dims take the
# padded-copy path), each option, lengths that cross tiles with remainders, single rows.
#  name, dtype, (B, Hq, Hk, L, S, D, Dv), mask, dropout_p, window, bottom, softcap, flash layout
CASES = [
    ("d32 causal gqa", torch.bfloat16, (2, 4, 2, 70, 90, 32, 32), None, 0.0, (-1, 0), False, 0.0,
     False),
    ("d59/111 bottom-right, rows that see no key", torch.float16, (1, 2, 2, 100, 45, 59, 111),
     None, 0.0, (10, 0), True, 0.0, False),
    # (three key tiles of the Hopper TMA forward's 128 at head dim 96: its stages refilled)
    ("d96 additive mask + grad, softcap", torch.bfloat16, (1, 2, 1, 66, 260, 96, 96), "additive",
     0.0, (-1, -1), False, 3.0, False),
    # (the Hopper TMA forward's kernel with dropout at head dim 128: 64-key tiles)
    ("d128 bool mask, window, dropout", torch.float16, (1, 2, 2, 65, 70, 128, 128), "bool", 0.1,
     (5, 7), False, 0.0, False),
    # Hopper: two 128-row tiles, whose warpgroups see different key ranges; three key tiles of
    # the TMA forward's 128 without dropout (its stages refilled)
    ("d128 causal bottom-right, L 150", torch.float16, (1, 1, 1, 150, 290, 128, 128), None, 0.0,
     (-1, 0), True, 0.0, False),
    ("d160 causal", torch.bfloat16, (1, 2, 1, 40, 75, 160, 160), None, 0.0, (-1, 0), False, 0.0,
     False),
    # (three of the Hopper TMA forward's 64-key tiles at head dim 256 without dropout)
    ("d256/64 flash layout, bottom-right", torch.bfloat16, (1, 2, 2, 17, 140, 256, 64), None,
     0.0, (-1, 0), True, 0.0, True),
    ("d200/256 dropout", torch.float16, (1, 2, 2, 33, 40, 200, 256), None, 0.2, (-1, -1), False,
     0.0, False),
    ("L = S = 1", torch.bfloat16, (1, 3, 3, 1, 1, 64, 32), None, 0.0, (-1, -1), False, 0.0, False),
    ("L = 1", torch.float16, (1, 2, 2, 1, 77, 40, 40), None, 0.0, (-1, -1), False, 0.0, True),
    # Hopper: the TMA forward at head dim 64, two 128-row tiles, three 128-key tiles
    ("d64 bool mask, L 140", torch.bfloat16, (1, 2, 1, 140, 270, 64, 64), "bool", 0.0, (-1, -1),
     False, 0.0, False),
]


# The kernels: sm_80's (mma.sync) or Hopper's (wgmma: the kWgmma forward, from head dim 64 up
# its TMA version, dQ and dK/dV kernels), as the launch logic picks them on an A100 or an H100.
KERNELS = ["sm80", "sm90"]


@pytest.fixture(params=KERNELS)
def emulated_kernels(emulated, request):
    """The emulation, its launch logic picking the kernels of the parameter."""
    emulated.use_wgmma(request.param == "sm90")
    yield emulated
    emulated.use_wgmma(False)


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_emulated_cuda_attention_matches_reference(emulated_kernels, case):
    _check_case(emulated_kernels, case)


def _check_case(ext, case, tensors=None) -> None:
    """Forward and backward of `case` against the float64 reference; `tensors` (q, k, v and
    the output's gradient) replace its random inputs when given."""
    _, dtype, shape, mask_kind, p, window, bottom, softcap, flash = case
    B, Hq, Hk, L, S, D, Dv = shape
    if tensors is None:
        q, k, v = _inputs(dtype, B, Hq, Hk, L, S, D, Dv, flash)
    else:
        q, k, v, _ = tensors
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, L, S) > 0.2
    elif mask_kind == "additive":
        mask = torch.randn(1, 1, L, S, dtype=dtype)
        mask = mask.masked_fill(torch.rand(1, 1, L, S) < 0.1, float("-inf"))
    seed = torch.tensor([20241124]) if p > 0 else None
    scale = D**-0.5
    args = (mask, seed, p, scale, window[0], window[1], bottom, softcap)
    out, lse = ext.attention_fwd(q, k, v, *args)
    grad = torch.randn_like(out) if tensors is None else tensors[3]
    mask_grad = mask_kind == "additive"
    grads = ext.attention_bwd(grad, q, k, v, out, lse, *args, mask_grad)

    keep = OPS.native_attention_dropout_mask(seed, [B, Hq, L, S], p) if p > 0 else None

    def spec(precision):
        leaves = [t.detach().to(precision).requires_grad_() for t in (q, k, v)]
        m = mask
        if mask_grad:
            m = mask.to(precision).requires_grad_()
            leaves.append(m)
        o = reference.attention(*leaves[:3], m, keep, p, scale, window, bottom, softcap)
        return o, torch.autograd.grad(o, leaves, grad.to(precision))

    ref, ref_grads = spec(torch.float64)
    pt, pt_grads = spec(dtype)
    assert_twice_error(out, ref, pt, "out")
    for name, g, rg, pg in zip(("dq", "dk", "dv", "dmask"), grads, ref_grads, pt_grads,
                               strict=False):
        if name == "dmask":  # (B, Hq, L, S) float32; the broadcast mask's gradient is its sum
            g = g.sum_to_size(rg.shape)
        assert_twice_error(g, rg, pg, name, precision=dtype)
    s = reference.attention_scores(q.double(), k.double(), None if mask is None else (
        mask if mask.dtype == torch.bool else mask.double()), scale, window, bottom, softcap)
    torch.testing.assert_close(lse.double(), torch.logsumexp(s, -1), atol=1e-4, rtol=1e-4)


# The Hopper kernels with one of the launcher's switches off, where it changes them:
# - "no-tma": the forward, dQ and dK/dV by cp.async (FASTATTN_CUDA_TMA=0, or inputs no tensor
#   map can describe) where the TMA kernels would serve (the forward from head dim 64 up, dQ and
#   dK/dV from 96): two-warpgroup CTAs with softcap and an additive mask, two query tiles,
#   dropout at head dim 256, the one-warpgroup forward at 64;
# - "no-pingpong": the TMA forward without its warpgroups' turns on the tensor cores
#   (FASTATTN_CUDA_PINGPONG=0, for comparing the two on a GPU; the turns run at head dims 64
#   to 128): an additive mask at head dim 96, two 128-row tiles whose warpgroups see different
#   key ranges.
SWITCHED_CASES = [("no-tma", CASES[2]), ("no-tma", CASES[4]), ("no-tma", CASES[7]),
                  ("no-tma", CASES[10]), ("no-pingpong", CASES[2]), ("no-pingpong", CASES[4])]


@pytest.mark.parametrize("switch,case", SWITCHED_CASES,
                         ids=[f"{k}-{c[0]}" for k, c in SWITCHED_CASES])
def test_emulated_cuda_hopper_kernels_with_a_switch_off(emulated, switch, case):
    use = {"no-tma": emulated.use_tma, "no-pingpong": emulated.use_turns}[switch]
    emulated.use_wgmma(True)
    use(False)
    try:
        _check_case(emulated, case)
    finally:
        use(True)
        emulated.use_wgmma(False)


def test_emulated_cuda_attention_takes_pitched_and_broadcast_inputs(emulated_kernels):
    # q and the output's gradient with a row pitch past their head dim (a tensor map's row
    # stride), then K and V broadcast over the batch (stride 0: no tensor map can step by it, so
    # the launch logic must take the cp.async kernels). Forward and every gradient
    # against the float64 reference, every kernel set; head dim 96 (two-warpgroup Hopper CTAs,
    # by TMA where the strides allow).
    B, H, L, S, D = 2, 2, 70, 80, 96
    case = ("pitched", torch.bfloat16, (B, H, H, L, S, D, D), None, 0.0, (-1, -1), False, 0.0,
            False)
    q = torch.randn(B, H, L, D + 8, dtype=torch.bfloat16)[..., :D]  # (B, H, L, D), pitch D + 8
    grad = torch.randn(B, H, L, D + 16, dtype=torch.bfloat16)[..., 8:D + 8]
    k1 = torch.randn(1, H, S, D, dtype=torch.bfloat16)
    v1 = torch.randn(1, H, S, D, dtype=torch.bfloat16)
    for k, v in ((k1.repeat(B, 1, 1, 1), v1.repeat(B, 1, 1, 1)),
                 (k1.expand(B, H, S, D), v1.expand(B, H, S, D))):  # (B, H, S, D)
        _check_case(emulated_kernels, case, (q, k, v, grad))


def test_emulated_cuda_attention_without_keys(emulated_kernels):
    # S = 0 at head dim 128, where the Hopper kernels load by TMA: an empty tensor's data pointer
    # is null, which the emulated tensor map encoding refuses (the driver does not promise to
    # take one), so the launch logic must take the cp.async kernels. Every row sees no key: the
    # output and dq are zeros, lse is -inf, dk and dv are empty.
    q = torch.randn(1, 2, 70, 128, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 0, 128, dtype=torch.bfloat16)
    assert k.data_ptr() == 0
    args = (None, None, 0.0, 128**-0.5, -1, -1, False, 0.0)
    out, lse = emulated_kernels.attention_fwd(q, k, k, *args)
    assert torch.equal(out, torch.zeros_like(q)) and torch.all(lse == float("-inf"))
    dq, dk, dv, _ = emulated_kernels.attention_bwd(torch.randn_like(q), q, k, k, out, lse, *args,
                                                   False)
    assert torch.equal(dq, torch.zeros_like(q)) and dk.shape == dv.shape == k.shape


def test_emulated_cuda_dropout_is_the_cpu_mask(emulated_kernels):
    # v = identity: the output row is the dropped, rescaled probability row, so its zeros are
    # exactly the drops, which must be native_attention_dropout_mask's.
    B, H, L, S, p = 1, 2, 20, 24, 0.3
    q = torch.randn(B, H, L, 16, dtype=torch.bfloat16)
    k = torch.randn(B, H, S, 16, dtype=torch.bfloat16)
    v = torch.eye(S, dtype=torch.bfloat16).expand(B, H, S, S)
    seed = torch.tensor([987654321])
    out, _ = emulated_kernels.attention_fwd(q, k, v, None, seed, p, 0.2, -1, -1, False, 0.0)
    assert torch.equal(out != 0, OPS.native_attention_dropout_mask(seed, [B, H, L, S], p))


def _cute_include() -> Path | None:
    """The CuTe headers of the nvidia-cutlass wheel (the test extra installs it), or None."""
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    include = Path(spec.submodule_search_locations[0]) / "source" / "include"
    return include if (include / "cute" / "tensor.hpp").is_file() else None


def test_wgmma_layouts_match_cute(tmp_path):
    # The emulation computes wgmma from its own reading of the PTX ISA (wgmma_isa.h), and the
    # Hopper kernel was written from the same reading: cute_check.cu holds both (fragments,
    # the kernel's tile layout, descriptors and every element's address) against CuTe's
    # description of the instructions, so a shared misreading cannot pass here unseen. Host
    # code only; needs nvcc and CuTe, not a GPU.
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc") or (cpp_extension.CUDA_HOME and
                                    shutil.which(str(Path(cpp_extension.CUDA_HOME) / "bin/nvcc")))
    include = _cute_include()
    if not nvcc:
        pytest.skip("nvcc not found")
    if include is None:
        pytest.skip("CuTe headers not found (pip install nvidia-cutlass)")
    exe = tmp_path / "cute_check"
    build = subprocess.run(
        [nvcc, "-std=c++17", "--expt-relaxed-constexpr", f"-I{include}",
         f"-I{HERE.parent / 'csrc'}", str(HERE / "cuda_emulation" / "cute_check.cu"), "-o",
         str(exe)], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    # CuTe says once per descriptor that it cannot convert a shared-memory pointer on the host
    # (cute_check.cu checks the start address another way).
    report = [line for line in run.stdout.splitlines() if "cast_smem_ptr_to_uint" not in line]
    assert run.returncode == 0, "\n".join(report[-25:]) + run.stderr[-2000:]
    done = re.fullmatch(r"(\d+) checks, 0 mismatches", report[-1])
    assert done is not None and int(done[1]) > 0, report[-5:]


# Under ThreadSanitizer (about 20x slower) a few of CASES, shrunk but still taking every
# pipelined loop round its ring: three key tiles per forward and dQ CTA (a stage is refilled),
# up to three query tiles or heads per dK/dV CTA (likewise), and a query tile that sees no key
# (the forward's and dQ's loops do not run).
RACE_CASES = [
    ("d32 causal gqa, bottom-right", torch.bfloat16, (1, 3, 1, 40, 150, 32, 32), None, 0.0,
     (-1, 0), True, 0.0, False),
    ("d96 additive mask + grad, softcap", torch.bfloat16, (1, 1, 1, 40, 150, 96, 96), "additive",
     0.0, (-1, -1), False, 3.0, False),
    ("d256/64 flash layout, gqa, bottom-right", torch.bfloat16, (1, 2, 1, 17, 65, 256, 64), None,
     0.0, (-1, 0), True, 0.0, True),
    ("d59/111 dropout, window, a query tile that sees no key", torch.float16,
     (1, 1, 1, 90, 20, 59, 111), None, 0.2, (10, 0), True, 0.0, False),
]


# The Hopper kernels under ThreadSanitizer: a forward and a dQ K/V stage refilled (three key
# tiles; of 128 keys in d96's TMA forward and dQ) with one warpgroup (d32) and with two sharing
# it (d96, by TMA, the forward's warpgroups taking turns on the tensor cores), a dK/dV Q/dO stage
# refilled (three query heads: d32 by cp.async, d96 by TMA, where P's two buffers are each used
# again) and P handed between its two warpgroups, and a query tile that sees no key. wgmma reads
# shared memory at the wait that covers it (emulation.h), so a stage refilled before that wait
# is a race.
RACE_CASES_SM90 = [
    RACE_CASES[0],
    ("d96 additive mask + grad, softcap, 260 keys", torch.bfloat16, (1, 1, 1, 40, 260, 96, 96),
     "additive", 0.0, (-1, -1), False, 3.0, False),
    RACE_CASES[3],
    ("d96 gqa, three query heads a K/V tile", torch.float16, (1, 3, 1, 24, 40, 96, 96), None,
     0.0, (-1, -1), False, 0.0, False),
]


def _race_child(seed: int) -> None:
    """The ThreadSanitizer process of test_emulated_cuda_kernels_are_race_free (libtsan
    preloaded): RACE_CASES and RACE_ROW_CASES through the emulations built with
    -fsanitize=thread, numbers checked as in the tests above."""
    os.environ.pop("LD_PRELOAD")  # ninja and the compiler it starts run unsanitized
    assert _why_no_emulation() is None  # which also loads fastattn._C (the dropout mask op)
    torch.set_num_threads(1)  # torch's OpenMP pool synchronises where TSan cannot see it
    # -g1: file and line of both accesses in a report
    flags = ("-fsanitize=thread", "-g1")
    ext = _build("fastattn_cuda_emulation_tsan", "attention.cpp", flags)
    for case in RACE_CASES:
        print(case[0], flush=True)
        torch.manual_seed(seed)
        _check_case(ext, case)
    ext.use_wgmma(True)
    for case in RACE_CASES_SM90:
        print(f"{case[0]} (sm90 kernels)", flush=True)
        torch.manual_seed(seed)
        _check_case(ext, case)
    ext.use_wgmma(False)
    rows = _build("fastattn_cuda_emulation_rows_tsan", "rows.cpp", flags)
    for check, case in RACE_ROW_CASES:
        print(case[0], flush=True)
        torch.manual_seed(seed)
        check(rows, case)


def test_emulated_cuda_kernels_are_race_free():
    # Every shared and global memory access of the kernels under ThreadSanitizer, in a child
    # process with its runtime preloaded (torch is not built for it). __syncthreads and the warp
    # collectives are barriers it sees, and cp.async writes its destination at issue and at the
    # wait (emulation.h): a missing barrier or wait, or a stage refilled while another warp still
    # reads it, is a data race it reports.
    why = _why_no_emulation()
    if why is not None:
        pytest.skip(why)
    cxx = os.environ.get("CXX", "c++")  # the compiler torch.utils.cpp_extension builds with
    libtsan = subprocess.run([cxx, "-print-file-name=libtsan.so"], capture_output=True,
                             text=True).stdout.strip()
    if not os.path.isabs(libtsan):
        pytest.skip(f"ThreadSanitizer's runtime libtsan.so is not installed beside {cxx}")
    env = {**os.environ, "LD_PRELOAD": libtsan, "TSAN_OPTIONS": "halt_on_error=1",
           "OMP_NUM_THREADS": "1"}
    # GCC's TSan runtime stops at start where the kernel randomises more address bits than it
    # expects ("unexpected memory mapping"); without randomisation (setarch -R) it runs.
    for prefix in ([], ["setarch", platform.machine(), "-R"]):
        if prefix and shutil.which("setarch") is None:
            continue
        probe = subprocess.run([*prefix, sys.executable, "-c", "pass"], env=env,
                               capture_output=True, text=True)
        if probe.returncode == 0:
            break
    else:
        pytest.skip(f"ThreadSanitizer does not start here: {probe.stderr.strip()[-500:]}")
    code = (f"import sys; sys.path.insert(1, {str(HERE)!r}); import test_cuda_emulation as t; "
            f"t._race_child({torch.initial_seed()})")
    run = subprocess.run([*prefix, sys.executable, "-c", code], cwd=HERE.parent, env=env,
                         capture_output=True, text=True, timeout=900)
    if run.returncode != 0:
        case = (run.stdout.strip().splitlines() or ["building the sanitized emulation"])[-1]
        out = (_race_report(run.stderr) if "WARNING: ThreadSanitizer" in run.stderr
               else "\n".join(run.stderr.splitlines()[-30:]))
        pytest.fail(f"under ThreadSanitizer, {case}:\n{out}", pytrace=False)


def _race_report(stderr: str) -> str:
    """ThreadSanitizer's first report, short: both accesses with their frames in csrc/ and
    tests/cuda_emulation/ (function, file:line) and the memory they touched."""
    report = stderr[stderr.find("WARNING: ThreadSanitizer"):].split("\n  Thread ")[0]
    lines = []
    for line in report.splitlines():
        frame = re.match(r"\s*(#\d+) ([^(]*).* \S*?((?:csrc|tests/cuda_emulation)/\S+:\d+) \(",
                         line)
        if frame:
            lines.append(f"    {frame[1]} {frame[2]} {frame[3]}")
        elif not line.lstrip().startswith("#"):  # std::thread's frames
            lines.append(line)
    return "\n".join(lines)


# The row kernels (softmax_cuda.cuh, cross_entropy_cuda.cuh) on every layout: 16-byte vectors
# (contiguous rows of one dtype; rows of odd length start misaligned, so the element-wise head
# and tail run too) with a warp or a block per row, the row held in registers or, past them,
# streamed twice; and the strided path (masks, strided or mixed-dtype tensors) with every
# block size threads_for picks; rows left over by the grid-stride loop (3 blocks); every float
# dtype.
#  name, dtype, shape, dim, log, mask shape (bool / additive), causal, scale, out dtype
SOFTMAX_CASES = [
    ("vec: a warp per row, grid-stride", torch.float32, (30, 37), -1, False, None, False, 1.0,
     None),
    ("vec: bf16 log, a warp per row", torch.bfloat16, (4, 300), -1, True, None, False, 0.5,
     None),
    ("vec: float64", torch.float64, (5, 41), -1, True, None, False, 1.0, None),
    ("vec: fp16 causal", torch.float16, (2, 3, 9, 9), -1, False, None, True, 1.0, None),
    ("vec: bf16 misaligned rows, 256 threads", torch.bfloat16, (3, 3001), -1, False, None,
     False, 1.0, None),
    ("vec: long rows, forward in registers, backward streamed", torch.float32, (2, 9001), -1,
     True, None, True, 1.0, None),
    ("vec: bf16 long rows in registers both ways", torch.bfloat16, (2, 12001), -1, True, None,
     False, 1.0, None),
    ("vec: past the registers, streamed", torch.float32, (1, 40000), -1, False, None, False,
     1.0, None),
    ("bool mask broadcast, a fully masked row", torch.float32, (2, 3, 5, 7), -1, True,
     ("bool", (1, 3, 1, 7)), False, 1.0, None),
    ("additive mask with -inf, 256 threads", torch.bfloat16, (2, 3, 2500), -1, False,
     ("additive", (3, 2500)), False, 2.0, None),
    ("dim 0 of a transposed float64", torch.float64, (6, 40), 0, True, None, False, 1.0, None),
    ("fp16 in, float32 out, 64 threads", torch.float16, (3, 70), 1, False, None, False, 1.0,
     torch.float32),
]


@pytest.mark.parametrize("case", SOFTMAX_CASES, ids=[c[0] for c in SOFTMAX_CASES])
def test_emulated_cuda_softmax_matches_reference(emulated_rows, case):
    _check_softmax(emulated_rows, case)


def _check_softmax(ext, case) -> None:
    _, dtype, shape, dim, log, mask_spec, causal, scale, out_dtype = case
    x = 3 * torch.randn(shape, dtype=dtype)
    if dim == 0:
        x = x.t()  # the reduced dim is then strided
    mask = None
    if mask_spec is not None and mask_spec[0] == "bool":
        mask = torch.rand(mask_spec[1]) > 0.3
        mask[..., 0, :] = False  # one row masked throughout
    elif mask_spec is not None:
        mask = torch.randn(mask_spec[1], dtype=dtype)
        mask = mask.masked_fill(torch.rand(mask_spec[1]) < 0.2, float("-inf"))
    dim = dim % x.ndim
    out = ext.softmax_fwd(x, dim, scale, mask, causal, log, out_dtype or dtype)
    spec = reference.log_softmax if log else reference.softmax

    def run(precision):
        leaf = x.detach().to(precision).requires_grad_()
        m = mask if mask is None or mask.dtype == torch.bool else mask.to(precision)
        return leaf, spec(leaf, dim, out_dtype if precision == dtype else None, scale=scale,
                          mask=m, causal=causal)

    x64, ref = run(torch.float64)
    x_pt, pt = run(dtype)
    assert out.dtype == (out_dtype or dtype)
    assert_twice_error(out, ref, pt, "output")
    grad = torch.randn(ref.shape, dtype=torch.float64)
    dx = ext.softmax_bwd(grad.to(out.dtype), out, dim, scale, mask, causal, log, dtype)
    ref.backward(grad)
    pt.backward(grad.to(pt.dtype))
    assert dx.dtype == dtype
    assert_twice_error(dx, x64.grad, x_pt.grad, "d input",
                       out_dtype if out_dtype is not None and out_dtype.itemsize < dtype.itemsize
                       else None)


#  name, dtype, (tokens, classes) or (N, C, d1), options, reduction
CROSS_ENTROPY_CASES = [
    ("vec: a warp per row", torch.float32, (6, 37), {}, "mean"),
    ("vec: bf16 weight + ignore + smoothing", torch.bfloat16, (9, 300),
     {"weight": True, "ignore": True, "label_smoothing": 0.1}, "mean"),
    ("vec: fp16 z-loss + softcap, 128 threads", torch.float16, (4, 2000),
     {"z_loss": 1e-2, "softcap": 5.0}, "sum"),
    ("vec: float64 weighted mean", torch.float64, (7, 19), {"weight": True, "ignore": True},
     "mean"),
    ("vec: no gradient asked, smoothing", torch.bfloat16, (3, 500),
     {"label_smoothing": 0.1, "no_grad": True}, "mean"),
    ("vec: long vocab in registers, gradient in place", torch.float32, (2, 9001),
     {"inplace": True}, "mean"),
    ("vec: past the registers, streamed, gradient in place", torch.float32, (1, 40000),
     {"inplace": True, "label_smoothing": 0.1}, "mean"),
    ("probability targets + weight + smoothing", torch.float32, (4, 50),
     {"probability": True, "weight": True, "label_smoothing": 0.2}, "none"),
    ("(N, C, d1): strided classes", torch.bfloat16, (2, 11, 3), {"ignore": True}, "mean"),
]


@pytest.mark.parametrize("case", CROSS_ENTROPY_CASES, ids=[c[0] for c in CROSS_ENTROPY_CASES])
def test_emulated_cuda_cross_entropy_matches_reference(emulated_rows, case):
    _check_cross_entropy(emulated_rows, case)


# A class index out of range is refused on the host before any launch, as IndexError (the CPU
# kernel's error type): never an out-of-bounds read on the device.
def test_emulated_cuda_cross_entropy_rejects_bad_class_index(emulated_rows):
    x = torch.randn(3, 7)
    for bad in (7, -2):
        target = torch.tensor([1, bad, -100])
        with pytest.raises(IndexError, match=r"outside \[0, 7\)"):
            emulated_rows.cross_entropy_fwd(x, target, None, -100, 1, 0.0, 0.0, 0.0, None)


def _check_cross_entropy(ext, case) -> None:
    _, dtype, shape, opts, reduction = case
    opts = dict(opts)
    C = shape[1]
    x = 4 * torch.randn(shape, dtype=dtype)
    batch = shape[:1] + shape[2:]
    if opts.pop("probability", False):
        target = torch.softmax(3 * torch.randn(shape), 1)
    else:
        target = torch.randint(0, C, batch)
        if opts.pop("ignore", False):
            target = target.masked_fill(torch.rand(batch) < 0.3, -100)
            target.view(-1)[0] = 1  # never every token ignored
    weight = torch.rand(C, dtype=torch.float64) + 0.5 if opts.pop("weight", False) else None
    inplace = opts.pop("inplace", False)
    no_grad = opts.pop("no_grad", False)
    eps, z_loss, softcap = (opts.get("label_smoothing", 0.0), opts.get("z_loss", 0.0),
                            opts.get("softcap", 0.0))
    grad = x.clone() if inplace else torch.empty_like(x)
    x_in = grad if inplace else x  # the gradient overwrites the logits it is computed from
    loss, lse = ext.cross_entropy_fwd(
        x_in, target, None if weight is None else weight.to(dtype), -100,
        reference.REDUCTIONS.index(reduction), eps, z_loss, softcap, None if no_grad else grad)

    def run(precision):
        leaf = x.detach().to(precision).requires_grad_()
        t = target.to(precision) if target.is_floating_point() else target
        w = None if weight is None else weight.to(precision)
        out = reference.cross_entropy(leaf, t, w, -100, reduction, eps, z_loss=z_loss,
                                      softcap=softcap or None)
        out.backward(torch.ones_like(out))
        return out, leaf.grad

    ref, ref_grad = run(torch.float64)
    pt, pt_grad = run(dtype)
    # The op returns a 16-bit input's loss in float32 (the public API rounds it to the input's
    # dtype); PyTorch's is rounded to 16 bits, so its error says little about the float32 one:
    # the input dtype's slack applies (a 15.0 loss in float16 is 0.0078 wide).
    assert_twice_error(loss, ref, pt, "loss", precision=dtype)
    if not no_grad:  # the gradient written: d(loss)/d(logits) for an upstream gradient of ones
        assert_twice_error(grad, ref_grad, pt_grad, "d input")
    logits = reference.apply_softcap(x.double(), softcap or None)
    torch.testing.assert_close(lse.double(), torch.logsumexp(logits, 1), atol=1e-4, rtol=1e-4)


# The row kernels under ThreadSanitizer: a block per row, several rows per block (the block
# reductions' shared scratch is reused within a row and across rows), resident and streamed.
RACE_ROW_CASES = [
    (_check_softmax, ("bf16 log, 256 threads, 2 rows a block", torch.bfloat16, (5, 3001), -1,
                      True, None, False, 1.0, None)),
    (_check_softmax, ("additive mask, 256 threads", torch.float32, (4, 2100), -1, False,
                      ("additive", (2100,)), False, 1.0, None)),
    (_check_cross_entropy, ("smoothing + weight, 128 threads, gradient in place", torch.float16,
                            (5, 2000), {"weight": True, "label_smoothing": 0.1,
                                        "inplace": True}, "mean")),
]
