"""The compiled extension (``csrc/``, loaded by ``fastattn._ext``): build switches, the reasons
the ``native`` backend gives when it cannot run, opcheck on each C++ op, the TORCH_CHECKs of its
entry points, and the x86 capability copies of the CPU kernels."""

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastattn
from fastattn import _ext, reference
from fastattn.native import attention as native_attention

ROOT = Path(__file__).resolve().parents[1]
BUILT = _ext.reason() is None
needs_ext = pytest.mark.skipif(not BUILT, reason=f"extension not loaded: {_ext.reason()}")
OPS = torch.ops.fastattn


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh interpreter importing fastattn from this checkout."""
    environ = {**os.environ, **env,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, cwd=ROOT, timeout=120)


def _setup_module():
    spec = importlib.util.spec_from_file_location("_fastattn_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_skip_switch_builds_no_extension(monkeypatch):
    setup = _setup_module()
    monkeypatch.setenv("FASTATTN_SKIP_EXT", "1")
    assert setup.ext_modules() == []
    monkeypatch.delenv("FASTATTN_SKIP_EXT")
    (ext,) = setup.ext_modules()
    assert ext.name == "fastattn._C"
    # Link order: the baseline objects first, then the AVX2 and AVX-512 copies.
    ranks = [setup._capability_rank(Path(s)) for s in setup.cpp_sources()]
    assert ranks == sorted(ranks) and ranks[-1] == 2


def test_cuda_arch_switch(monkeypatch):
    setup = _setup_module()
    monkeypatch.delenv("FASTATTN_CUDA_ARCHS", raising=False)
    flags = setup.nvcc_flags()
    # sm_90a code in the build lets the launcher pick the Hopper attention kernel
    assert "-gencode=arch=compute_90a,code=sm_90a" in flags and "-DFASTATTN_SM90A" in flags
    monkeypatch.setenv("FASTATTN_CUDA_ARCHS", "80")
    flags = setup.nvcc_flags()
    assert [f for f in flags if "gencode" in f] == ["-gencode=arch=compute_80,code=sm_80"]
    assert "-DFASTATTN_SM90A" not in flags
    monkeypatch.setenv("FASTATTN_CUDA_ARCHS", "80;90")  # sm_90 without the a: no wgmma
    assert "-DFASTATTN_SM90A" not in setup.nvcc_flags()


def test_unbuilt_extension_gives_its_reason_and_native_is_not_available():
    # sys.modules[name] = None makes `import fastattn._C` fail as an unbuilt extension does.
    code = (
        "import sys\n"
        "sys.modules['fastattn._C'] = None\n"
        "import fastattn, torch\n"
        "why = fastattn.backend_status('cpu')['native']\n"
        "assert 'fastattn._C' in why, why\n"
        "assert 'native' not in fastattn.available_backends()\n"
        "try:\n"
        "    with fastattn.use_backend('native'):\n"
        "        pass\n"
        "except fastattn.BackendUnavailableError as e:\n"
        "    print(e)\n"
        "print(', '.join(fastattn.available_backends()))\n"
    )
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr
    message, available = proc.stdout.strip().splitlines()
    assert message.startswith("backend 'native' is unavailable: ")
    assert "fastattn._C" in message and message.endswith(f"available: {available}")


@needs_ext
def test_native_reasons_per_op_and_device():
    assert fastattn.backend_status("cpu", "softmax")["native"] is None
    assert fastattn.backend_status("cpu", "cross_entropy")["native"] is None
    assert fastattn.backend_status("cpu", "attention")["native"] is None
    assert "native" in fastattn.available_backends("cpu", "attention")
    # CUDA kernels exist where the extension was built with nvcc against a CUDA build of torch
    for op in ("softmax", "attention"):
        registered = torch._C._dispatch_has_kernel_for_dispatch_key(
            f"fastattn::{_ext.NATIVE_OPS[op]}", "CUDA")
        why = fastattn.backend_status("cuda", op)["native"]
        if not registered:
            assert "no CUDA kernels" in why
        elif torch.cuda.is_available():
            assert why is None
        else:
            assert why == "no CUDA device is available"
    assert "does not run on meta" in fastattn.backend_status("meta")["native"]
    q = torch.randn(1, 1, 3, 4, device="meta")
    with fastattn.use_backend("native"), pytest.raises(
            fastattn.BackendUnavailableError, match="does not run on meta tensors; backends"):
        fastattn.scaled_dot_product_attention(q, q, q)


@needs_ext
@pytest.mark.parametrize("first", ["fastattn", "_C"])
def test_cpp_library_and_python_fragment_coexist_in_either_import_order(first):
    imports = ["import fastattn.ops.softmax, fastattn.ops.cross_entropy", "import fastattn._C"]
    if first == "_C":
        imports.reverse()
    code = "\n".join(imports + [
        "import torch, fastattn",
        "x = torch.randn(3, 5)",
        "y = torch.ops.fastattn.native_softmax_fwd(x, 1, 1.0, None, False, False, x.dtype)",
        "z = torch.ops.fastattn.softmax_fwd(x, 1, 1.0, None, False, False, x.dtype, 'native')",
        "torch.testing.assert_close(y, torch.softmax(x, 1))",
        "torch.testing.assert_close(z, y)",
    ])
    proc = _run(code)
    assert proc.returncode == 0, proc.stderr


def _softmax_args():
    x = torch.randn(3, 5, 37)
    add = torch.randn(5, 37)
    add[1, 4] = float("-inf")
    return [
        (x, 2, 0.5, None, False, False, torch.float32),
        (x, 1, 1.0, None, False, True, torch.float64),
        (x.bfloat16(), 2, 0.3, add, True, True, torch.float32),
        (x.transpose(1, 2), 1, 0.3, torch.rand(37, 1) > 0.3, False, False, torch.bfloat16),
    ]


@needs_ext
def test_opcheck_native_softmax():
    for args in _softmax_args():
        torch.library.opcheck(OPS.native_softmax_fwd.default, args)
        y = OPS.native_softmax_fwd(*args)
        input_dtype = args[0].dtype
        bwd = (torch.randn_like(y), y, *args[1:6], input_dtype)
        torch.library.opcheck(OPS.native_softmax_bwd.default, bwd)


@needs_ext
def test_opcheck_native_cross_entropy():
    x = torch.randn(4, 9, 3)
    t = torch.randint(0, 9, (4, 3))
    p = torch.softmax(torch.randn(4, 9, 3), 1)
    w = torch.rand(9)
    for args in [(x, t, None, -100, 1, 0.0, 0.0, 0.0), (x, t, w, 2, 0, 0.1, 1e-3, 5.0),
                 (x.double(), p.double(), w, -100, 2, 0.2, 0.0, 0.0),
                 (x.bfloat16(), t.int(), None, -100, 1, 0.0, 0.0, 0.0)]:
        torch.library.opcheck(OPS.native_cross_entropy_fwd.default, (*args, None))
        grad = torch.empty_like(args[0])
        torch.library.opcheck(OPS.native_cross_entropy_fwd.default, (*args, grad))


def _attention_args():
    q = torch.randn(2, 4, 21, 24)
    k = torch.randn(2, 2, 17, 24)
    v = torch.randn(2, 2, 17, 40)
    add = torch.randn(21, 17).expand(2, 4, 21, 17)
    add64 = torch.randn(1, 4, 21, 17, dtype=torch.float64).masked_fill(add[:1] > 1.5, -torch.inf)
    seed = torch.tensor([7])
    qt = torch.randn(2, 21, 4, 24).transpose(1, 2)  # flash-attn's layout: a strided view
    #  q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom, softcap, mask_grad
    return [
        (q, k, v, None, None, 0.0, 0.2, -1, -1, False, 0.0, False),
        (q, k, v, add, None, 0.0, 0.2, -1, 0, True, 0.0, True),
        (q.bfloat16(), k.bfloat16(), v.bfloat16(), add > 0, seed, 0.25, 0.2, 3, 5, False, 2.0,
         False),
        (qt.half(), k.half()[..., ::2, :], v.half()[..., ::2, :], None, None, 0.0, 0.3, 4, 0,
         True, 0.0, False),
        (q.double(), k.double(), v.double(), add64, seed, 0.1, 0.2, -1, -1, False, 3.0, True),
    ]


@needs_ext
def test_opcheck_native_attention():
    for *fwd, mask_grad in _attention_args():
        torch.library.opcheck(OPS.native_attention_fwd.default, tuple(fwd))
        out, lse = OPS.native_attention_fwd(*fwd)
        bwd = (torch.randn_like(out), *fwd[:3], out, lse, *fwd[3:], mask_grad)
        torch.library.opcheck(OPS.native_attention_bwd.default, bwd)
    torch.library.opcheck(OPS.native_attention_dropout_mask.default,
                          (torch.tensor([3]), [2, 3, 5, 7], 0.4))


# The differentiable C++ ops (autograd in C++ around the kernels above), with inputs that
# require grad: opcheck also runs their backward, eagerly and under AOT autograd.
@needs_ext
def test_opcheck_native_differentiable_ops():
    for input, *rest in _softmax_args():
        x = input.detach().requires_grad_()
        torch.library.opcheck(OPS.native_softmax.default, (x, *rest))
    x = torch.randn(4, 9, 3, requires_grad=True)
    t = torch.randint(0, 9, (4, 3))
    w = torch.rand(9)
    for args in [(x, t, None, -100, 1, 0.0, 0.0, 0.0), (x, t, w, 2, 0, 0.1, 1e-3, 5.0),
                 (x.detach().bfloat16().requires_grad_(), t, w, -100, 2, 0.0, 0.0, 2.0)]:
        torch.library.opcheck(OPS.native_cross_entropy.default, args)
    for q, k, v, *rest, _ in _attention_args():
        if rest[0] is not None and rest[0].is_floating_point():
            rest[0] = rest[0].detach()  # this op gives no mask gradient
        qkv = [a.detach().requires_grad_() for a in (q, k, v)]
        torch.library.opcheck(OPS.native_attention.default, (*qkv, *rest))


# The CUDA kernels of the native ops, where the extension was built with them and a GPU is here.
CUDA_ATTENTION = BUILT and torch.cuda.is_available() and fastattn.backend_status(
    "cuda", "attention")["native"] is None
needs_cuda_attention = pytest.mark.skipif(
    not CUDA_ATTENTION, reason="needs a CUDA device and the native CUDA attention kernels")


def _cuda_attention_args():
    dev = "cuda"
    q = torch.randn(2, 4, 21, 24, device=dev, dtype=torch.bfloat16)
    k = torch.randn(2, 2, 17, 24, device=dev, dtype=torch.bfloat16)
    v = torch.randn(2, 2, 17, 40, device=dev, dtype=torch.bfloat16)
    add = torch.randn(21, 17, device=dev).expand(2, 4, 21, 17)  # float32 mask, bf16 inputs
    add16 = torch.randn(1, 4, 21, 17, device=dev, dtype=torch.float16)
    add16 = add16.masked_fill(add[:1] > 1.5, -torch.inf)
    seed, seed_cuda = torch.tensor([7]), torch.tensor([9], device=dev)
    qt = torch.randn(2, 21, 4, 24, device=dev, dtype=torch.float16).transpose(1, 2)
    kh, vh = k.half()[..., ::2, :], v.half()[..., ::2, :]
    #  q, k, v, mask, seed, dropout_p, scale, left, right, align_bottom, softcap, mask_grad
    return [
        (q, k, v, None, None, 0.0, 0.2, -1, -1, False, 0.0, False),
        (q, k, v, add, None, 0.0, 0.2, -1, 0, True, 0.0, True),
        (q, k, v, add > 0, seed, 0.25, 0.2, 3, 5, False, 2.0, False),
        (qt, kh, vh, None, seed_cuda, 0.1, 0.3, 4, 0, True, 0.0, False),
        (q.half(), k.half(), v.half()[..., :37], add16, None, 0.0, 0.2, -1, -1, False, 3.0,
         True),
    ]


@needs_cuda_attention
def test_opcheck_native_attention_cuda():
    for *fwd, mask_grad in _cuda_attention_args():
        torch.library.opcheck(OPS.native_attention_fwd.default, tuple(fwd))
        out, lse = OPS.native_attention_fwd(*fwd)
        bwd = (torch.randn_like(out), *fwd[:3], out, lse, *fwd[3:], mask_grad)
        torch.library.opcheck(OPS.native_attention_bwd.default, bwd)


@needs_cuda_attention
def test_native_attention_cuda_matches_cpu():
    # Same op, both devices: the CUDA kernels (bf16 tensor cores) against the CPU kernels fed
    # the same bf16 values, with the options that index differently (GQA, mask, window,
    # softcap, dropout on the shared generator, the mask gradient).
    for *fwd, mask_grad in _cuda_attention_args():
        cpu = [t.cpu() if isinstance(t, torch.Tensor) else t for t in fwd]
        out, lse = OPS.native_attention_fwd(*fwd)
        out_c, lse_c = OPS.native_attention_fwd(*cpu)
        torch.testing.assert_close(out.cpu(), out_c, atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(lse.cpu(), lse_c, atol=1e-3, rtol=1e-3)
        g = torch.randn_like(out)
        grads = OPS.native_attention_bwd(g, *fwd[:3], out, lse, *fwd[3:], mask_grad)
        grads_c = OPS.native_attention_bwd(g.cpu(), *cpu[:3], out_c, lse_c, *cpu[3:],
                                           mask_grad)
        for a, c in zip(grads, grads_c, strict=True):
            assert a.dtype == c.dtype and a.shape == c.shape
            torch.testing.assert_close(a.cpu(), c, atol=5e-2, rtol=5e-2)


@needs_cuda_attention
def test_attention_cuda_checks_name_the_tensor():
    dev = "cuda"
    q = torch.randn(1, 2, 5, 8, device=dev, dtype=torch.bfloat16)
    fwd = OPS.native_attention_fwd

    def f(q=q, k=q, v=q, mask=None, seed=None, p=0.0):
        return fwd(q, k, v, mask, seed, p, 1.0, -1, -1, False, 0.0)

    cases = [
        (TypeError, "native CUDA attention takes float16 or bfloat16", lambda: f(
            q=q.float(), k=q.float(), v=q.float())),
        (RuntimeError, "k must be on cuda", lambda: f(k=q.cpu())),
        (RuntimeError, "mask must be on cuda", lambda: f(mask=torch.ones(5, 5, dtype=torch.bool))),
        (RuntimeError, "head dims from 1 to 256", lambda: f(
            v=torch.randn(1, 2, 5, 300, device=dev, dtype=torch.bfloat16))),
        (RuntimeError, "seed must be an int64 tensor", lambda: f(
            p=0.5, seed=torch.tensor([1.0], device=dev))),
        (RuntimeError, "seed must be given when dropout_p > 0", lambda: f(p=0.5)),
    ]
    for error, message, call in cases:
        with pytest.raises(error, match=message):
            call()


@needs_ext
def test_native_attention_dropout_mask_is_the_kernels():
    # With v = identity, the output row is the dropped, rescaled probability row, so its zeros
    # are exactly the mask's drops.
    q, k = torch.randn(2, 3, 50, 8), torch.randn(2, 3, 70, 8)
    v = torch.eye(70).expand(2, 3, 70, 70)
    seed = torch.tensor([123456789])
    out, _ = OPS.native_attention_fwd(q, k, v, None, seed, 0.3, 0.5, -1, -1, False, 0.0)
    keep = native_attention.dropout_mask(seed, (2, 3, 50, 70), 0.3, "cpu")
    assert torch.equal(out != 0, keep)
    assert abs(1 - keep.float().mean().item() - 0.3) < 0.02


@needs_ext
def test_native_attention_backward_split_over_keys():
    # One key/value head and more threads than heads: the backward splits each head's keys
    # into ranges whose dq parts are added in range order. Same gradients as a single range
    # (one thread), bitwise reproducible, and equal to the torch launcher's formula.
    q, k, v = torch.randn(1, 3, 150, 40), torch.randn(1, 1, 300, 40), torch.randn(1, 1, 300, 24)
    mask = torch.randn(150, 300).expand(1, 3, 150, 300)
    args = (mask, None, 0.0, 0.3, 20, 0, True, 2.0)
    out, lse = OPS.native_attention_fwd(q, k, v, *args)
    g = torch.randn_like(out)
    threads = torch.get_num_threads()
    try:
        grads = {}
        for n in (1, 4, 4):
            torch.set_num_threads(n)
            grads.setdefault(n, []).append(OPS.native_attention_bwd(g, q, k, v, out, lse, *args,
                                                                    True))
    finally:
        torch.set_num_threads(threads)
    (one,), (split, again) = grads[1], grads[4]
    assert all(torch.equal(a, b) for a, b in zip(split, again, strict=True))
    ref = reference.attention_bwd(g, q, k, v, out, lse, mask, None, 0.0, 0.3, 20, 0, True, 2.0,
                                  False, True)
    for a, b, r in zip(split, one, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a, r, atol=1e-5, rtol=1e-5)


@needs_ext
def test_native_ce_grad_in_place_and_class_index_check():
    x = torch.randn(5, 11)
    t = torch.randint(0, 11, (5,))
    expected = torch.empty_like(x)
    loss, _ = OPS.native_cross_entropy_fwd(x, t, None, -100, 1, 0.0, 0.0, 0.0, expected)
    inplace = x.clone()
    loss2, _ = OPS.native_cross_entropy_fwd(inplace, t, None, -100, 1, 0.0, 0.0, 0.0, inplace)
    assert torch.equal(inplace, expected) and torch.equal(loss, loss2)
    bad = t.clone()
    bad[2] = 11
    # IndexError (TORCH_CHECK_INDEX): fastattn.ops leaves this check to the CPU kernel
    with pytest.raises(IndexError, match=r"target holds class index 11, outside \[0, 11\)"):
        OPS.native_cross_entropy_fwd(x, bad, None, -100, 1, 0.0, 0.0, 0.0, None)


@needs_ext
def test_torch_checks_name_the_tensor():
    x = torch.randn(4, 6)
    t = torch.randint(0, 6, (4,))
    sm, ce = OPS.native_softmax_fwd, OPS.native_cross_entropy_fwd
    cases = [
        ("input must be float32, float64", lambda: sm(x.long(), 1, 1.0, None, False, False,
                                                      torch.float32)),
        ("dim=2 is out of range for input", lambda: sm(x, 2, 1.0, None, False, False, x.dtype)),
        (r"mask of shape \[5\] does not broadcast", lambda: sm(
            x, 1, 1.0, torch.ones(5, dtype=torch.bool), False, False, x.dtype)),
        ("mask must be bool or float", lambda: sm(
            x, 1, 1.0, torch.ones(6, dtype=torch.int32), False, False, x.dtype)),
        ("causal=True needs input with at least 2 dims", lambda: sm(
            x, 0, 1.0, None, True, False, x.dtype)),
        ("out_dtype must be float32", lambda: sm(x, 1, 1.0, None, False, False, torch.int64)),
        ("grad_output of shape", lambda: OPS.native_softmax_bwd(
            x[:2], x, 1, 1.0, None, False, False, x.dtype)),
        ("input must be \\(N, C, d1, ...\\)", lambda: ce(
            x[0], t[0], None, -100, 1, 0.0, 0.0, 0.0, None)),
        (r"class-index target must have shape \[4\]", lambda: ce(
            x, t[:3], None, -100, 1, 0.0, 0.0, 0.0, None)),
        ("target must hold integer class indices", lambda: ce(
            x, t > 2, None, -100, 1, 0.0, 0.0, 0.0, None)),
        ("probability target must have the input's shape", lambda: ce(
            x, x[:, :3], None, -100, 1, 0.0, 0.0, 0.0, None)),
        (r"weight must have shape \(6,\)", lambda: ce(
            x, t, torch.ones(5), -100, 1, 0.0, 0.0, 0.0, None)),
        ("weight must be float32", lambda: ce(
            x, t, torch.ones(6, dtype=torch.long), -100, 1, 0.0, 0.0, 0.0, None)),
        ("reduction must be 0", lambda: ce(x, t, None, -100, 3, 0.0, 0.0, 0.0, None)),
        ("label_smoothing must be in", lambda: ce(x, t, None, -100, 1, 1.5, 0.0, 0.0, None)),
        ("softcap must be finite", lambda: ce(x, t, None, -100, 1, 0.0, 0.0, -1.0, None)),
        ("grad must have the input's shape", lambda: ce(
            x, t, None, -100, 1, 0.0, 0.0, 0.0, torch.empty(4, 6, dtype=torch.float64))),
    ]
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_ext
def test_attention_torch_checks_name_the_tensor():
    q, k, v = torch.randn(2, 4, 5, 8), torch.randn(2, 2, 7, 8), torch.randn(2, 2, 7, 6)
    fwd, bwd = OPS.native_attention_fwd, OPS.native_attention_bwd
    out, lse = fwd(q, k, v, None, None, 0.0, 1.0, -1, -1, False, 0.0)

    def f(q=q, k=k, v=v, mask=None, seed=None, p=0.0, scale=1.0, left=-1, right=-1, cap=0.0):
        return fwd(q, k, v, mask, seed, p, scale, left, right, False, cap)

    def b(g=out, out=out, lse=lse, mask=None, mask_grad=False):
        return bwd(g, q, k, v, out, lse, mask, None, 0.0, 1.0, -1, -1, False, 0.0, mask_grad)

    cases = [
        ("q must be float32, float64", lambda: f(q=q.long())),
        (r"q must be 4-d \(B, Hq, L, D\)", lambda: f(q=q[0])),
        ("q, k and v must have the same dtype", lambda: f(k=k.double())),
        ("k and v must have q's batch size 2", lambda: f(k=k[:1], v=v[:1])),
        ("v must have k's number of heads 2", lambda: f(v=v[:, :1])),
        (r"q's heads \(4\) must be a multiple of k's heads \(3\)", lambda: f(
            k=torch.randn(2, 3, 7, 8), v=torch.randn(2, 3, 7, 6))),
        ("k must have q's head dim 8", lambda: f(k=k[..., :4])),
        ("v must have k's number of positions 7", lambda: f(v=v[:, :, :6])),
        ("scale must be finite", lambda: f(scale=float("nan"))),
        ("softcap must be finite and >= 0", lambda: f(cap=-1.0)),
        ("window_left and window_right must be >= -1", lambda: f(left=-2)),
        (r"dropout_p must be in \[0, 1\)", lambda: f(p=1.0)),
        ("seed must be given when dropout_p > 0", lambda: f(p=0.5)),
        ("seed must be a CPU int64 tensor", lambda: f(p=0.5, seed=torch.tensor([1.0]))),
        (r"mask of shape \[5, 6\] does not broadcast", lambda: f(mask=torch.ones(5, 6) > 0)),
        ("mask must be bool or float", lambda: f(mask=torch.ones(5, 7, dtype=torch.int32))),
        ("grad_out must have shape", lambda: b(g=out[:, :, :4])),
        ("out must have shape", lambda: b(out=out[..., :5])),
        ("lse must be a CPU float32 tensor", lambda: b(lse=lse.double())),
        ("lse must have shape", lambda: b(lse=lse[:1])),
        ("mask_grad=True needs an additive", lambda: b(mask=torch.ones(5, 7) > 0,
                                                       mask_grad=True)),
        ("shape must be \\(B, Hq, L, S\\)", lambda: OPS.native_attention_dropout_mask(
            torch.tensor([1]), [2, 3], 0.1)),
    ]
    for message, call in cases:
        with pytest.raises(RuntimeError, match=message):
            call()


@needs_ext
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_only_the_capability_copies_use_avx():
    # Code outside the AVX2 / AVX-512 copies runs on any x86-64 CPU, so it must hold no VEX or
    # EVEX instruction (mnemonics starting with "v"): this fails when the linker keeps an
    # inline function's copy from an AVX file (see csrc/common/cpu_target.h).
    if sys.platform != "linux" or os.uname().machine != "x86_64":
        pytest.skip("x86-64 Linux only")
    library = Path(fastattn._C.__file__) if hasattr(fastattn, "_C") else None
    if library is None:
        pytest.skip("the extension was JIT-built")
    out = subprocess.run(["objdump", "-d", "-C", "--no-show-raw-insn", str(library)],
                         capture_output=True, text=True, check=True).stdout
    offenders, name = {}, None
    for line in out.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if header:
            name = header.group(1)
            continue
        fields = line.split("\t")
        if name and "AVX2" not in name and "AVX512" not in name and len(fields) > 1:
            if fields[1].strip().startswith("v"):
                offenders.setdefault(name, fields[1].strip())
    assert not offenders, f"baseline code uses AVX: {list(offenders.items())[:5]}"
    # and the AVX-512 copy is really there
    assert "fastattn::cpu::AVX512::softmax_fwd_rows" in out
    assert "fastattn::cpu::AVX512::attention_fwd_tiles" in out
