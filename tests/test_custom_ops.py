"""The torch.library ops: opcheck on each op and backend, and torch.compile(fullgraph=True)
over each public function without graph breaks."""

import pytest
import torch
import torch.nn.functional as F
from check import DEVICE, backends

import fastattn

OPS = torch.ops.fastattn


def _softmax_args(backend, requires_grad):
    x = torch.randn(3, 5, 37, device=DEVICE, requires_grad=requires_grad)
    mask = torch.randn(5, 37, device=DEVICE)
    return [
        (x, 2, 0.5, None, False, False, torch.float32, backend),
        (x, 1, 1.0, None, False, True, torch.float64, backend),
        (x, 2, 0.3, mask, True, True, torch.float32, backend),
        (x, 2, 0.3, mask > 0, True, False, torch.float32, backend),
    ]


def _ce_args(backend, requires_grad):
    x = torch.randn(4, 9, 3, device=DEVICE, requires_grad=requires_grad)
    t = torch.randint(0, 9, (4, 3), device=DEVICE)
    p = torch.softmax(torch.randn(4, 9, 3, device=DEVICE), 1)
    w = torch.rand(9, device=DEVICE)
    return [
        (x, t, None, -100, 1, 0.0, 0.0, 0.0),
        (x, t, w, 2, 0, 0.1, 1e-3, 5.0),
        (x, p, w, -100, 2, 0.2, 0.0, 0.0),
    ]


@pytest.mark.parametrize("backend", backends())
def test_opcheck_softmax(backend):
    for args in _softmax_args(backend, requires_grad=True):
        torch.library.opcheck(OPS.softmax_fwd.default, args)
        y = OPS.softmax_fwd(*args).detach()
        grad = torch.randn_like(y)
        bwd_args = (grad, y, args[1], args[2], args[3], args[4], args[5], torch.float32, backend)
        torch.library.opcheck(OPS.softmax_bwd.default, bwd_args)


@pytest.mark.parametrize("backend", backends())
def test_opcheck_cross_entropy(backend):
    for args in _ce_args(backend, requires_grad=True):
        torch.library.opcheck(OPS.cross_entropy_fwd.default, (*args, True, backend))
    for args in _ce_args(backend, requires_grad=False):
        # compute_grad=False is for inputs that need no gradient (inference)
        torch.library.opcheck(OPS.cross_entropy_fwd.default, (*args, False, backend))
        x = args[0].clone()
        torch.library.opcheck(OPS.cross_entropy_fwd_inplace.default, (x, *args[1:], backend))


def _public_calls():
    """(name, function of (x, target), target kind) for each public function."""
    return [
        ("softmax", lambda x, t: fastattn.softmax(x, -1, scale=0.5, mask=x > -1, causal=True)),
        ("log_softmax", lambda x, t: fastattn.log_softmax(x, 0)),
        ("cross_entropy", lambda x, t: fastattn.cross_entropy(x, t, label_smoothing=0.1,
                                                              z_loss=1e-3)),
        ("CrossEntropyLoss", lambda x, t: fastattn.nn.CrossEntropyLoss(reduction="sum")(x, t)),
    ]


# Real inductor compilation with the torch backend (the CPU path), and the op path with the
# triton backend under aot_eager (Triton kernels are opaque to the compiler either way).
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
@pytest.mark.parametrize("name,fn", _public_calls())
def test_compile_fullgraph(name, fn, compiler):
    backend = "torch" if compiler == "inductor" else backends()[-1]
    x = torch.randn(6, 11, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 11, (6,), device=DEVICE)
    torch._dynamo.reset()

    def step(x, t):
        out = fn(x, t)
        return (out * torch.linspace(0.5, 1.5, out.numel(), device=DEVICE).view(out.shape)
                .nan_to_num(0.0)).where(torch.isfinite(out), 0.0).sum()

    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    with fastattn.use_backend(backend):
        y_c = compiled(x, t)
        (g_c,) = torch.autograd.grad(y_c, x)
        y_e = step(x, t)
        (g_e,) = torch.autograd.grad(y_e, x)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(g_c, g_e)


def test_compile_matches_pytorch_cross_entropy():
    x = torch.randn(8, 50, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 50, (8,), device=DEVICE)
    torch._dynamo.reset()
    compiled = torch.compile(lambda x, t: fastattn.cross_entropy(x, t), fullgraph=True)
    with fastattn.use_backend("torch"):
        loss = compiled(x, t)
    torch.testing.assert_close(loss, F.cross_entropy(x, t))
