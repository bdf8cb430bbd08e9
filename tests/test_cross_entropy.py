"""fastattn.cross_entropy on every available backend against the float64 specification."""

import pytest
import torch
import torch.nn.functional as F
from check import DEVICE, assert_twice_error, backends
from conftest import INTERPRETED

import fastattn
from fastattn import reference as R

REDUCTIONS = ["mean", "sum", "none"]


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _targets(shape, num_classes, probability, ignore_frac=0.2):
    """Class indices of ``shape`` with some ignored tokens, or probabilities over dim 1. The
    first token is never ignored: with a handful of tokens every one of them would otherwise be
    ignored now and then (1 run in 625 at 4 tokens), and the mean of nothing is NaN for PyTorch
    and fastattn alike, which assert_close reports as a mismatch (test_all_ignored_and_empty
    covers that case on purpose)."""
    batch = shape[:1] + shape[2:]
    if probability:
        return torch.softmax(3 * torch.randn(shape, device=DEVICE), 1)
    target = torch.randint(0, num_classes, batch, device=DEVICE)
    ignored = torch.rand(batch, device=DEVICE) < ignore_frac
    ignored.view(-1)[0] = False
    return target.masked_fill(ignored, -100)


def _compare(backend, x, target, weight=None, target_grad=False, **kw):
    """Loss, d input (and d target) of fastattn vs the float64 spec; PyTorch's error as the bar."""
    probability = target.is_floating_point()

    def args(dtype):
        t = target.to(dtype) if probability else target
        if target_grad:
            t = _leaf(t)
        return _leaf(x, dtype), t, None if weight is None else weight.to(dtype)

    x_ours, t_ours, _ = args(x.dtype)
    x_pt, t_pt, w_pt = args(x.dtype)
    x_ref, t_ref, w_ref = args(torch.float64)
    with fastattn.use_backend(backend):
        out = fastattn.cross_entropy(x_ours, t_ours, weight, **kw)
    pt = R.cross_entropy(x_pt, t_pt, w_pt, **kw)
    ref = R.cross_entropy(x_ref, t_ref, w_ref, **kw)
    assert out.dtype == x.dtype
    assert_twice_error(out, ref, pt, "loss")
    grad = torch.rand(ref.shape, dtype=torch.float64, device=DEVICE) + 0.5
    out.backward(grad.to(out.dtype))
    pt.backward(grad.to(pt.dtype))
    ref.backward(grad)
    assert_twice_error(x_ours.grad, x_ref.grad, x_pt.grad, "d input")
    if target_grad:
        assert_twice_error(t_ours.grad, t_ref.grad, t_pt.grad, "d target")
    return out


OPTIONS = {
    "plain": {},
    "weight+ignore": {"weight": True, "ignore_index": -100},
    "smoothing+weight": {"weight": True, "label_smoothing": 0.2},
    "zloss+softcap+smoothing": {"z_loss": 1e-2, "softcap": 4.0, "label_smoothing": 0.1},
    "probability+weight+smoothing": {"probability": True, "weight": True, "label_smoothing": 0.3},
}


def _run_option(backend, shape, dtype, reduction, option):
    opts = dict(OPTIONS[option])
    probability = opts.pop("probability", False)
    num_classes = shape[1]
    weight = torch.rand(num_classes, device=DEVICE) + 0.5 if opts.pop("weight", False) else None
    x = 4 * torch.randn(shape, device=DEVICE, dtype=dtype)
    target = _targets(shape, num_classes, probability)
    _compare(backend, x, target, weight, reduction=reduction, **opts)


# A vocabulary in one block, and one over several chunks with an odd remainder.
@pytest.mark.parametrize("shape", [(5, 7), (3, 5003)])
@pytest.mark.parametrize("option", list(OPTIONS))
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("backend", backends())
def test_matches_reference(backend, dtype, reduction, option, shape):
    _run_option(backend, shape, dtype, reduction, option)


# In float64 every backend is PyTorch itself to a few ulps, the specification included: a
# weighted mean once divided by a float32 sum of the weights, 1e-7 off in every float64 call,
# which the spec-based comparison above could not see since the spec did the same.
@pytest.mark.parametrize("kw", [{"weight": True}, {"weight": True, "ignore_index": 3},
                                {"weight": True, "label_smoothing": 0.1},
                                {"ignore_index": 3, "label_smoothing": 0.3}])
@pytest.mark.parametrize("backend", backends())
def test_float64_mean_is_pytorch(backend, kw):
    kw = dict(kw)
    x = torch.randn(37, 11, dtype=torch.float64, device=DEVICE)
    target = torch.randint(0, 11, (37,), device=DEVICE)
    target[0] = 0 if kw.get("ignore_index") == 3 else 3
    if kw.pop("weight", False):
        kw["weight"] = torch.rand(11, dtype=torch.float64, device=DEVICE) + 0.5
    x_ours, x_pt = _leaf(x), _leaf(x)
    with fastattn.use_backend(backend):
        out = fastattn.cross_entropy(x_ours, target, **kw)
    pt = F.cross_entropy(x_pt, target, **kw)
    torch.testing.assert_close(out, pt, rtol=1e-14, atol=0)
    out.backward()
    pt.backward()
    torch.testing.assert_close(x_ours.grad, x_pt.grad, rtol=1e-13, atol=1e-16)


# Vocabularies of real tokenizers (Llama 2, GPT-2, Llama 3) at a few rows; more rows on a GPU.
@pytest.mark.parametrize("vocab", [32000, 50257, 128256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("backend", backends())
def test_real_vocab_sizes(backend, dtype, vocab):
    rows = 2 if INTERPRETED else 512
    _run_option(backend, (rows, vocab), dtype, "mean", "zloss+softcap+smoothing")


# Classes on dim 1 of (N, C, d1, d2), a single token (C,), and a non-contiguous (N, C) input.
@pytest.mark.parametrize("probability", [False, True])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", backends())
def test_layouts(backend, reduction, probability):
    weight = torch.rand(6, device=DEVICE) + 0.5
    for x in (torch.randn(3, 6, 4, 5, device=DEVICE), torch.randn(6, device=DEVICE),
              torch.randn(6, 11, device=DEVICE).t()):
        target = _targets(x.unsqueeze(0).shape if x.ndim == 1 else x.shape, 6, probability)
        if x.ndim == 1:
            target = target[0]
            if not probability:
                target = target.clamp(min=0)
        _compare(backend, x, target, weight, reduction=reduction, label_smoothing=0.1)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", backends())
def test_probability_target_gradient(backend, reduction):
    x = torch.randn(4, 9, device=DEVICE)
    _compare(backend, x, _targets(x.shape, 9, True), torch.rand(9, device=DEVICE),
             target_grad=True, reduction=reduction, label_smoothing=0.2, z_loss=0.1)


@pytest.mark.parametrize("backend", backends())
def test_all_ignored_and_empty(backend):
    x = torch.randn(4, 10, device=DEVICE, requires_grad=True)
    target = torch.full((4,), -100, device=DEVICE)
    with fastattn.use_backend(backend):
        for reduction in REDUCTIONS:
            ours = fastattn.cross_entropy(x, target, reduction=reduction, z_loss=0.1)
            expected = F.cross_entropy(x, target, reduction=reduction)
            torch.testing.assert_close(ours, expected, equal_nan=True)
            (gx,) = torch.autograd.grad(ours.sum(), x)
            assert torch.equal(gx, torch.zeros_like(gx))
        empty = torch.randn(0, 10, device=DEVICE, requires_grad=True)
        for target in (torch.zeros(0, dtype=torch.long, device=DEVICE), torch.rand(0, 10)):
            for reduction in REDUCTIONS:
                ours = fastattn.cross_entropy(empty, target.to(DEVICE), reduction=reduction)
                expected = F.cross_entropy(empty, target.to(DEVICE), reduction=reduction)
                torch.testing.assert_close(ours, expected, equal_nan=True)


@pytest.mark.parametrize("backend", backends())
def test_extreme_logits_follow_pytorch(backend):
    x = torch.randn(5, 4099, device=DEVICE)
    x[0, :4098] = float("-inf")  # one finite logit, after chunks that are all -inf
    x[1, 17] = float("nan")
    x[2] = float("-inf")
    x[3, 5] = 1e4
    x[4] = -1e4
    target = torch.tensor([4098, 3, 0, 5, 9], device=DEVICE)
    with fastattn.use_backend(backend):
        ours = fastattn.cross_entropy(x, target, reduction="none")
    torch.testing.assert_close(ours, F.cross_entropy(x, target, reduction="none"), equal_nan=True)


@pytest.mark.parametrize("backend", backends())
def test_return_lse(backend):
    # 210 rows: the Triton interpreter runs a program per row
    x = torch.randn(3, 4, 70, device=DEVICE, dtype=torch.bfloat16)
    target = _targets(x.shape, 4, False)
    with fastattn.use_backend(backend):
        loss, lse = fastattn.cross_entropy(x, target, softcap=2.0, return_lse=True)
    assert lse.dtype == torch.float32 and lse.shape == (3, 70)
    expected = torch.logsumexp(R.apply_softcap(x.double(), 2.0), 1)
    torch.testing.assert_close(lse.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("backend", backends())
def test_inplace_backward(backend, reduction):
    # Logits produced by a matmul, as in a language model head: their buffer is reused.
    hidden = torch.randn(6, 16, device=DEVICE, requires_grad=True)
    head = torch.randn(16, 5001, device=DEVICE, requires_grad=True)
    target = _targets((6, 5001), 5001, False)
    upstream = torch.rand(6 if reduction == "none" else (), device=DEVICE) + 0.5
    grads = []
    with fastattn.use_backend(backend):
        for inplace in (False, True):
            logits = hidden @ head
            loss = fastattn.cross_entropy(logits, target, reduction=reduction,
                                          label_smoothing=0.1, inplace_backward=inplace)
            before = logits.detach().clone()
            loss.backward(upstream)
            changed = not torch.equal(logits.detach(), before)
            assert changed == inplace  # the gradient lives in the logits' memory only if asked
            grads.append((hidden.grad.clone(), head.grad.clone()))
            hidden.grad = head.grad = None
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", backends())
def test_input_not_modified_and_no_grad(backend):
    x = torch.randn(4, 33, device=DEVICE)
    target = _targets(x.shape, 33, False)
    before = x.clone()
    with fastattn.use_backend(backend), torch.no_grad():
        loss = fastattn.cross_entropy(x, target)
    assert torch.equal(x, before)
    torch.testing.assert_close(loss, F.cross_entropy(x, target))


@pytest.mark.parametrize("backend", backends())
def test_out_of_range_target(backend):
    x = torch.randn(3, 8, device=DEVICE, requires_grad=True)
    for bad in (8, -1, 1000):
        target = torch.tensor([0, bad, 2], device=DEVICE)
        with fastattn.use_backend(backend), pytest.raises(IndexError, match=f"class index {bad}"):
            fastattn.cross_entropy(x, target)
        # the gradient written over the logits: refused before anything is written
        logits = x.detach().clone()
        leaf = logits.clone().requires_grad_()
        with fastattn.use_backend(backend), pytest.raises(IndexError, match=f"class index {bad}"):
            fastattn.cross_entropy(leaf, target, inplace_backward=True)
        assert torch.equal(leaf.detach(), logits)
    # ignore_index may be any value, in range or not
    target = torch.tensor([0, 5, 2], device=DEVICE)
    with fastattn.use_backend(backend):
        ours = fastattn.cross_entropy(x, target, ignore_index=5)
    torch.testing.assert_close(ours, F.cross_entropy(x, target, ignore_index=5))


def test_bad_input():
    x = torch.randn(4, 6, device=DEVICE)
    t = torch.randint(0, 6, (4,), device=DEVICE)
    ce = fastattn.cross_entropy
    cases = [
        (TypeError, "input must have a floating-point dtype", (x.long(), t), {}),
        (ValueError, "input must have a class dim", (x[0, 0], t[0]), {}),
        (ValueError, "at least one class", (torch.randn(4, 0), t), {}),
        (ValueError, r"class-index target must have shape \(4,\)", (x, t[:3]), {}),
        (ValueError, "probability target must have the input's shape", (x, x[:, :3]), {}),
        (TypeError, "target must hold integer class indices", (x, t > 2), {}),
        (ValueError, r"weight must have shape \(6,\)", (x, t, torch.ones(5)), {}),
        (TypeError, "weight must have a floating-point dtype", (x, t, torch.ones(6).long()), {}),
        (ValueError, "reduction='avg' is not allowed", (x, t), {"reduction": "avg"}),
        (ValueError, r"label_smoothing=1.5 is not allowed; it must be in \[0, 1\]", (x, t),
         {"label_smoothing": 1.5}),
        (ValueError, "z_loss=-1.0 is not allowed", (x, t), {"z_loss": -1.0}),
        (ValueError, "softcap=nan is not allowed", (x, t), {"softcap": float("nan")}),
        (TypeError, "ignore_index must be an int", (x, t), {"ignore_index": 1.5}),
        (TypeError, "target must be a torch.Tensor", (x, [1, 2, 3, 4]), {}),
    ]
    for exc, message, args, kwargs in cases:
        with pytest.raises(exc, match=message):
            ce(*(a.to(DEVICE) if isinstance(a, torch.Tensor) else a for a in args), **kwargs)
    soft = torch.rand(4, 6, device=DEVICE, requires_grad=True)
    with pytest.raises(ValueError, match="inplace_backward=True .* probability target"):
        ce(x.clone().requires_grad_(), soft, inplace_backward=True)
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="target is on cpu but input is on cuda"):
            ce(x, t.cpu())


@pytest.mark.parametrize("backend", backends())
def test_mixed_dtype_probability_target(backend):
    # As in PyTorch: the loss takes the promoted dtype, each gradient its tensor's dtype.
    x = torch.randn(3, 7, device=DEVICE, requires_grad=True)
    target = torch.softmax(torch.randn(3, 7, device=DEVICE, dtype=torch.float64), 1)
    target.requires_grad_(True)
    with fastattn.use_backend(backend):
        ours = fastattn.cross_entropy(x, target)
    expected = F.cross_entropy(x, target)
    assert ours.dtype == expected.dtype == torch.float64
    # Both compute log-probabilities from the float32 logits: float32-level agreement.
    torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)
    got = torch.autograd.grad(ours, (x, target))
    want = torch.autograd.grad(expected, (x, target))
    for a, b in zip(got, want, strict=True):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


# Logits broadcast along the classes (column stride 0, as expand() gives): the kernels must not
# take them for contiguous rows.
@pytest.mark.parametrize("softcap", [None, 5.0])
@pytest.mark.parametrize("backend", backends("cross_entropy"))
def test_broadcast_logits(backend, softcap):
    x = (3 * torch.randn(6, 1, device=DEVICE)).expand(6, 33)
    target = torch.randint(0, 33, (6,), device=DEVICE)
    _compare(backend, x, target, softcap=softcap, reduction="none")
