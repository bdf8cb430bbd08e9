"""The torch.library ops: opcheck on each op and backend, torch.compile(fullgraph=True) over
each public function without graph breaks, and the eager path that skips the custom ops."""

import pytest
import torch
import torch.nn.functional as F
from check import DEVICE, attention_backends, backends, skip_unsupported_attention
from torch.utils._python_dispatch import TorchDispatchMode

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


def _attention_args(backend):
    q = torch.randn(2, 4, 21, 24, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 17, 24, device=DEVICE, requires_grad=True)
    v = torch.randn(2, 2, 17, 40, device=DEVICE, requires_grad=True)
    add = torch.randn(21, 17, device=DEVICE).expand(2, 4, 21, 17).requires_grad_()
    seed = torch.tensor([7], device=DEVICE)
    #      mask, seed, dropout_p, scale, left, right, align_bottom, softcap, deterministic
    return [
        (q, k, v, None, None, 0.0, 0.2, -1, -1, False, 0.0, False, backend),
        (q, k, v, add, None, 0.0, 0.2, -1, 0, True, 0.0, True, backend),
        (q, k, v, add > 0, seed, 0.25, 0.2, 3, 5, False, 2.0, False, backend),
        (q.transpose(1, 2).contiguous().transpose(1, 2), k, v, None, None, 0.0, 0.2, 4, 0, True,
         0.0, False, backend),
    ]


@pytest.mark.parametrize("backend", backends("attention"))
def test_opcheck_attention(backend):
    skip_unsupported_attention(backend, torch.float32)
    for args in _attention_args(backend):
        torch.library.opcheck(OPS.attention_fwd.default, args)
        out, lse = OPS.attention_fwd(*args)
        q, k, v, mask, seed, p, scale, left, right, bottom, cap, det, _ = args
        mask_grad = mask is not None and mask.is_floating_point()
        bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse,
                    mask if mask is None else mask.detach(), seed, p, scale, left, right, bottom,
                    cap, det, mask_grad, backend)
        torch.library.opcheck(OPS.attention_bwd.default, bwd_args)


def _public_calls():
    """(name, function of (x, target), target kind) for each public function."""
    return [
        ("softmax", lambda x, t: fastattn.softmax(x, -1, scale=0.5, mask=x > -1, causal=True)),
        ("log_softmax", lambda x, t: fastattn.log_softmax(x, 0)),
        ("cross_entropy", lambda x, t: fastattn.cross_entropy(x, t, label_smoothing=0.1,
                                                              z_loss=1e-3)),
        ("CrossEntropyLoss", lambda x, t: fastattn.nn.CrossEntropyLoss(reduction="sum")(x, t)),
    ]


# Real inductor compilation with the torch backend (the CPU path), and the op path with each
# kernel backend (triton, native) under aot_eager (their kernels are opaque to the compiler).
@pytest.mark.parametrize("compiler,backend", [("inductor", "torch")] + [
    ("aot_eager", b) for b in backends("softmax") if b != "torch"])
@pytest.mark.parametrize("name,fn", _public_calls())
def test_compile_fullgraph(name, fn, compiler, backend):
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


# The attention entry points, captured whole: masks, GQA, dropout (the seed is drawn inside the
# graph) and flash-attn's layout.
@pytest.mark.parametrize("compiler", ["inductor", "aot_eager"])
def test_compile_fullgraph_attention(compiler):
    backend = "torch" if compiler == "inductor" else attention_backends(torch.float32)[-1]
    q = torch.randn(2, 4, 19, 16, device=DEVICE, requires_grad=True)
    k = torch.randn(2, 2, 23, 16, device=DEVICE, requires_grad=True)
    mask = torch.rand(19, 23, device=DEVICE) > 0.2
    torch._dynamo.reset()

    def step(q, k):
        a = fastattn.scaled_dot_product_attention(q, k, k, attn_mask=mask, is_causal=True,
                                                  enable_gqa=True, window_size=(6, 0))
        b = fastattn.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), k.transpose(1, 2),
                                     causal=True, softcap=3.0)
        return (a * a).sum() + (b * b).sum()

    def dropped(q, k, eye):  # value = identity: the output is the dropped probabilities
        return fastattn.scaled_dot_product_attention(q, k, eye, dropout_p=0.3, enable_gqa=True)

    with fastattn.use_backend(backend):
        y_c = torch.compile(step, fullgraph=True, backend=compiler)(q, k)
        g_c = torch.autograd.grad(y_c, (q, k))
        y_e = step(q, k)
        g_e = torch.autograd.grad(y_e, (q, k))
        eye = torch.eye(23, device=DEVICE).expand(2, 2, 23, 23)
        compiled = torch.compile(dropped, fullgraph=True, backend=compiler)
        torch.manual_seed(5)
        out = compiled(q, k, eye)
        torch.manual_seed(5)
        assert torch.equal(out, compiled(q, k, eye))
    torch.testing.assert_close(y_c, y_e)
    for a, b in zip(g_c, g_e, strict=True):
        torch.testing.assert_close(a, b)
    zeros = (out == 0).float().mean().item()
    assert 0.25 < zeros < 0.35, f"compiled dropout dropped {zeros:.3f} of the weights, not 0.3"


class _Recorder(TorchDispatchMode):
    """Records the name of every op dispatched while active. Any dispatch mode, this one included,
    makes fastattn go through its custom ops, as tracers and fake tensors need."""

    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name)
        return func(*args, **(kwargs or {}))


def _gqa_qkv():
    """q (2, 4, 19, 24), k (2, 2, 23, 24), v (2, 2, 23, 40), requiring grad: GQA, L != S, and
    head dims that are not multiples of the vector size."""
    return (torch.randn(2, 4, 19, 24, device=DEVICE, requires_grad=True),
            torch.randn(2, 2, 23, 24, device=DEVICE, requires_grad=True),
            torch.randn(2, 2, 23, 40, device=DEVICE, requires_grad=True))


def _eager_cases():
    """(op, backend, call) where call() returns (outputs, differentiable inputs) for fresh
    random inputs drawn from a fixed seed: the same numbers on every call."""

    def softmax():
        x = torch.randn(5, 7, 33, device=DEVICE, requires_grad=True)
        mask = torch.randn(7, 33, device=DEVICE, requires_grad=True)
        return [fastattn.log_softmax(x, -1, scale=0.7, mask=mask, causal=True)], (x, mask)

    def cross_entropy(inplace):
        def call():
            x = torch.randn(6, 50, 3, device=DEVICE, requires_grad=True)
            t = torch.randint(0, 50, (6, 3), device=DEVICE)
            xi = x * 1.0 if inplace else x  # the in-place gradient overwrites its input
            loss, lse = fastattn.cross_entropy(xi, t, label_smoothing=0.1, z_loss=1e-3,
                                               reduction="sum", return_lse=True,
                                               inplace_backward=inplace)
            return [loss, lse], (x,)
        return call

    def attention():
        q, k, v = _gqa_qkv()
        mask = torch.randn(19, 23, device=DEVICE, requires_grad=True)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                    softcap=4.0, window_size=(5, 3))
        return [out], (q, k, v, mask)

    cases = [("softmax", b, softmax) for b in backends("softmax")]
    cases += [("cross_entropy", b, cross_entropy(inplace)) for b in backends("cross_entropy")
              for inplace in (False, True)]
    return cases + [("attention", b, attention) for b in backends("attention")]


def _run(call, backend):
    torch.manual_seed(0)
    with fastattn.use_backend(backend):
        outs, leaves = call()
        grads = torch.autograd.grad(
            [o for o in outs if o.requires_grad],
            leaves, [torch.linspace(-1, 1, o.numel(), device=DEVICE).view(o.shape)
                     for o in outs if o.requires_grad])
    return outs, grads


def _graph_names(t, key=lambda node: type(node).__name__):
    """``key(node)`` (the class name) of every node in ``t``'s autograd graph."""
    names, todo, seen = set(), [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        names.add(key(node))
        todo.extend(n for n, _ in node.next_functions)
    return names


# Eager calls skip the custom ops; under a dispatch mode (what fake tensors, AOT autograd and
# FlopCounterMode use) the same call goes through them. Both run the same implementation, so
# the results must agree bit for bit.
@pytest.mark.parametrize("op,backend,call", _eager_cases())
def test_eager_path_matches_custom_op(op, backend, call):
    if op == "attention":
        skip_unsupported_attention(backend, torch.float32)
    generated = f"GeneratedBackwardFor_fastattn_{op}_fwd_defaultBackward"
    outs, grads = _run(call, backend)
    assert generated not in _graph_names(outs[0]), "the eager call went through the custom op"
    with _Recorder() as seen:
        outs_op, grads_op = _run(call, backend)
    assert any(name.startswith(f"fastattn::{op}_fwd") for name in seen.ops), seen.ops
    if op != "cross_entropy":  # its backward is a scale, not an op
        assert f"fastattn::{op}_bwd" in seen.ops, seen.ops
    if "fastattn::cross_entropy_fwd_inplace" not in seen.ops:  # that one has no generated node
        assert generated in _graph_names(outs_op[0])
    for a, b in zip((*outs, *grads), (*outs_op, *grads_op), strict=True):
        assert torch.equal(a, b)


# The backward ops have no autograd: a second derivative must raise, never come back silently
# without the backward's own dependence on its inputs. With and without a mask, so that the
# native backend's C++ autograd (no mask gradient) and its Python autograd are both tried.
@pytest.mark.parametrize("backend", backends("softmax"))
@pytest.mark.parametrize("mask_grad", [False, True])
def test_eager_path_refuses_double_backward(backend, mask_grad):
    x = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    mask = torch.randn(9, device=DEVICE, requires_grad=mask_grad)
    with fastattn.use_backend(backend):
        y = fastattn.softmax(x, -1, mask=mask)
        (g,) = torch.autograd.grad(y, x, torch.randn_like(y), create_graph=True)
        with pytest.raises(RuntimeError, match="softmax_bwd"):
            torch.autograd.grad(g.sum(), x)


@pytest.mark.parametrize("backend", attention_backends(torch.float32))
def test_attention_refuses_double_backward(backend):
    skip_unsupported_attention(backend, torch.float32)
    q, k, v = (torch.randn(1, 2, 7, 8, device=DEVICE, requires_grad=True) for _ in range(3))
    with fastattn.use_backend(backend):
        out = fastattn.scaled_dot_product_attention(q, k, v, is_causal=True)
        (g,) = torch.autograd.grad(out, q, torch.randn_like(out), create_graph=True)
        with pytest.raises(RuntimeError, match="attention_bwd"):
            torch.autograd.grad(g.sum(), q)


# Cross-entropy's backward scales the gradient made in forward: it has no second derivative
# (a Hessian through it would silently come back without the logits' part), so a backward
# with create_graph=True raises.
@pytest.mark.parametrize("backend", backends("cross_entropy"))
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_refuses_create_graph(backend, inplace):
    x = torch.randn(4, 9, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 9, (4,), device=DEVICE)
    with fastattn.use_backend(backend):
        loss = fastattn.cross_entropy(x * 1.0, t, inplace_backward=inplace)
        with pytest.raises(RuntimeError, match="no second derivative"):
            torch.autograd.grad(loss, x, create_graph=True)


# The native backend's eager calls run its differentiable C++ ops (autograd in C++, no Python
# between the kernels) when no mask or target needs a gradient; under a dispatch mode the same
# call goes through the custom ops and their Python autograd. Same kernels: the same bits.
def _cpp_autograd_cases():
    def softmax():
        x = torch.randn(5, 7, 33, device=DEVICE, requires_grad=True)
        mask = torch.randn(7, 33, device=DEVICE) > -1
        return [fastattn.log_softmax(x, -1, scale=0.7, mask=mask, causal=True)], (x,)

    def cross_entropy(reduction):
        def call():
            x = torch.randn(6, 50, 3, device=DEVICE, requires_grad=True)
            t = torch.randint(0, 50, (6, 3), device=DEVICE)
            t[0, 0] = -100
            w = torch.rand(50, device=DEVICE)
            loss, lse = fastattn.cross_entropy(x, t, w, label_smoothing=0.1, z_loss=1e-3,
                                               reduction=reduction, return_lse=True)
            return [loss, lse], (x,)
        return call

    def attention():
        q, k, v = _gqa_qkv()
        mask = torch.randn(19, 23, device=DEVICE)
        out = fastattn.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True,
                                                    dropout_p=0.2, softcap=4.0,
                                                    window_size=(5, 3))
        return [out], (q, k, v)

    cases = [("softmax", softmax)]
    cases += [("cross_entropy", cross_entropy(r)) for r in ("mean", "none")]
    return cases + [("attention", attention)]


@pytest.mark.parametrize("op,call", _cpp_autograd_cases())
def test_native_cpp_autograd_matches_custom_op(op, call):
    if "native" not in backends(op):
        pytest.skip(f"the native backend does not serve {op} on {DEVICE}")
    if op == "attention":
        skip_unsupported_attention("native", torch.float32)
    outs, grads = _run(call, "native")
    names = _graph_names(outs[0], key=lambda node: node.name())
    assert any(n.startswith("torch::autograd::CppNode<fastattn::") for n in names), names
    with _Recorder() as seen:
        outs_op, grads_op = _run(call, "native")
    assert any(name.startswith(f"fastattn::{op}_fwd") for name in seen.ops), seen.ops
    for a, b in zip((*outs, *grads), (*outs_op, *grads_op), strict=True):
        assert torch.equal(a, b)


def test_native_cpp_autograd_refuses_grad_less_arguments():
    if "native" not in backends("softmax"):
        pytest.skip(f"the native backend does not serve softmax on {DEVICE}")
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    mask = torch.randn(8, device=DEVICE, requires_grad=True)
    with pytest.raises(RuntimeError, match="mask must not require grad"):
        OPS.native_softmax(x, 1, 1.0, mask, False, False, torch.float32)
    target = torch.softmax(torch.randn(3, 8, device=DEVICE), 1).requires_grad_()
    with pytest.raises(RuntimeError, match="target must not require grad"):
        OPS.native_cross_entropy(x, target, None, -100, 1, 0.0, 0.0, 0.0)


def test_eager_inplace_cross_entropy_bumps_version():
    x = torch.randn(6, 11, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 11, (6,), device=DEVICE)
    logits = x * 1.0
    before = logits._version
    loss = fastattn.cross_entropy(logits, t, inplace_backward=True)
    assert logits._version > before  # autograd knows the logits were overwritten
    loss.backward()
    torch.testing.assert_close(x.grad, torch.autograd.grad(F.cross_entropy(x, t), x)[0])


def test_fake_tensors_reach_the_fake_functions():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(3, 4, 50, device=DEVICE, requires_grad=True)
        y = fastattn.log_softmax(x, 1, dtype=torch.float64)
        loss = fastattn.cross_entropy(x, torch.zeros(3, 50, dtype=torch.long, device=DEVICE))
    assert y.shape == (3, 4, 50) and y.dtype == torch.float64
    assert loss.shape == () and loss.requires_grad


# The memory contract: cross-entropy's backward makes no logits-sized tensor of its own (the
# gradient was written in forward, and a non-unit upstream gradient scales it in place). Autograd
# would zero-fill one for the non-differentiable gradient output unless the op turns gradient
# materialisation off. With retain_graph the buffer must stay unscaled: one new tensor then.
@pytest.mark.parametrize("upstream", [1.0, 0.5])
@pytest.mark.parametrize("inplace", [False, True])
def test_cross_entropy_backward_allocates_no_logits(upstream, inplace):
    from torch.profiler import ProfilerActivity, profile

    x = torch.randn(5, 301, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 301, (5,), device=DEVICE)
    expected = upstream * torch.autograd.grad(F.cross_entropy(x, t), x)[0]
    cuda = DEVICE == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    logits_bytes = x.numel() * x.element_size()
    logits = x * 1.0  # the in-place variant overwrites its input
    loss = fastattn.cross_entropy(logits, t, inplace_backward=inplace)
    for retain in (True, True, False):  # three backward passes over one graph
        with profile(activities=activities, profile_memory=True) as prof:
            (g,) = torch.autograd.grad(loss, logits, torch.tensor(upstream, device=DEVICE),
                                       retain_graph=retain)
        big = [e.name for e in prof.events() if e.name.startswith("aten::") and (
            e.self_device_memory_usage if cuda else e.self_cpu_memory_usage) >= logits_bytes]
        assert big == (["aten::mul"] if retain and upstream != 1.0 else []), (retain, big)
        torch.testing.assert_close(g, expected)


# Activation checkpointing recomputes the forward inside backward: the eager path must give the
# same gradients as without it, dropout included (checkpoint restores the RNG state, so the
# recomputed forward draws the same seed).
@pytest.mark.parametrize("backend", backends("attention"))
@pytest.mark.parametrize("reentrant", [False, True])
def test_activation_checkpointing_matches(backend, reentrant):
    skip_unsupported_attention(backend, torch.float32)
    from torch.utils.checkpoint import checkpoint

    q = torch.randn(2, 4, 13, 16, device=DEVICE, requires_grad=True)
    kv = torch.randn(2, 2, 13, 16, device=DEVICE, requires_grad=True)
    t = torch.randint(0, 16, (2 * 4 * 13,), device=DEVICE)

    def block(q, kv):
        a = fastattn.scaled_dot_product_attention(q, kv, kv, dropout_p=0.3, is_causal=True,
                                                  enable_gqa=True)
        p = fastattn.log_softmax(a, -1, scale=0.5)
        return fastattn.cross_entropy(p.reshape(-1, 16), t)

    grads = []
    for wrap in (False, True):
        torch.manual_seed(3)
        with fastattn.use_backend(backend):
            loss = checkpoint(block, q, kv, use_reentrant=reentrant) if wrap else block(q, kv)
            q.grad = kv.grad = None
            loss.backward()  # the reentrant checkpoint refuses autograd.grad
        grads.append((loss.detach(), q.grad, kv.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
