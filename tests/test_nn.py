"""Drop-in layers in ``fastattn.nn`` against their ``torch.nn`` twins: constructor arguments,
outputs, gradients, ``state_dict`` keys, legacy arguments, and the keyword-only extras."""

import warnings

import pytest
import torch

import fastattn
from fastattn import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = fastattn.available_backends(DEVICE)


def run_twins(fa_module, pt_module, *inputs, backend):
    """Outputs and input gradients of both modules on leaf copies of ``inputs`` (floating ones
    require grad), for one random upstream gradient; the fastattn module runs under ``backend``."""
    pt_leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    fa_leaves = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    pt_out = pt_module(*pt_leaves)
    upstream = torch.randn_like(pt_out)
    pt_grads = torch.autograd.grad(pt_out, [t for t in pt_leaves if t.requires_grad], upstream)
    with fastattn.use_backend(backend):
        fa_out = fa_module(*fa_leaves)
        fa_grads = torch.autograd.grad(fa_out, [t for t in fa_leaves if t.requires_grad], upstream)
    return (pt_out, pt_grads), (fa_out, fa_grads)


def assert_twins_match(fa_module, pt_module, *inputs, backend):
    (pt_out, pt_grads), (fa_out, fa_grads) = run_twins(
        fa_module, pt_module, *inputs, backend=backend
    )
    torch.testing.assert_close(fa_out, pt_out)
    assert len(fa_grads) == len(pt_grads)
    for fa_grad, pt_grad in zip(fa_grads, pt_grads, strict=True):
        torch.testing.assert_close(fa_grad, pt_grad)


# One row that fits in a block with an odd length; dims first, middle and last (strided rows).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dim", [0, 1, -1])
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_softmax_layers_match_torch(name, dim, backend):
    x = torch.randn(3, 4, 13, device=DEVICE)
    pt = getattr(torch.nn, name)(dim)
    for fa in (getattr(fastattn.nn, name)(dim), getattr(fastattn.nn, name)(dim=dim)):
        assert fa.dim == pt.dim
        assert repr(fa) == repr(pt)
        assert_twins_match(fa, pt, x, backend=backend)


# Each case exercises a different constructor argument of CrossEntropyLoss, positional or keyword.
CE_CASES = {
    "default": ((), {}),
    "weight-positional": (("weight",), {}),
    "weight-sum-smooth": ((), {"weight": "weight", "reduction": "sum", "label_smoothing": 0.1}),
    "ignore-index-mean": ((), {"weight": "weight", "ignore_index": 2}),
    "all-positional": (("weight", None, 2, None, "none", 0.2), {}),
    "none-reduction": ((), {"reduction": "none"}),
    "legacy-size-average": ((), {"size_average": False}),
    "legacy-reduce": ((), {"reduce": False, "ignore_index": 1}),
}


def _ce_args(args, kwargs, weight):
    args = tuple(weight if a == "weight" else a for a in args)
    kwargs = {k: weight if v == "weight" else v for k, v in kwargs.items()}
    return args, kwargs


def _make_ce(args, kwargs, weight):
    args, kwargs = _ce_args(args, kwargs, weight)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy arguments warn, tested separately
        return fastattn.nn.CrossEntropyLoss(*args, **kwargs), torch.nn.CrossEntropyLoss(
            *args, **kwargs
        )


# Every constructor case for each backend, on (N, C) and (N, C, d1) logits with index targets.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(6, 11), (3, 7, 4)], ids=["2d", "3d"])
@pytest.mark.parametrize("case", list(CE_CASES))
def test_cross_entropy_loss_matches_torch(case, shape, backend):
    weight = torch.rand(shape[1], device=DEVICE) + 0.5
    fa, pt = _make_ce(*CE_CASES[case], weight)
    assert (fa.reduction, fa.ignore_index, fa.label_smoothing) == (
        pt.reduction,
        pt.ignore_index,
        pt.label_smoothing,
    )
    torch.testing.assert_close(fa.weight, pt.weight)
    x = torch.randn(shape, device=DEVICE) * 3
    target = torch.randint(0, shape[1], shape[:1] + shape[2:], device=DEVICE)
    target.view(-1)[::3] = pt.ignore_index if 0 <= pt.ignore_index < shape[1] else -100
    assert_twins_match(fa, pt, x, target, backend=backend)


# Probability targets: the gradient flows to the logits and to the targets.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.15])
def test_cross_entropy_loss_probability_targets_match_torch(label_smoothing, backend):
    weight = torch.rand(9, device=DEVICE) + 0.5
    fa = fastattn.nn.CrossEntropyLoss(weight, label_smoothing=label_smoothing)
    pt = torch.nn.CrossEntropyLoss(weight, label_smoothing=label_smoothing)
    x = torch.randn(5, 9, device=DEVICE) * 2
    target = torch.softmax(torch.randn(5, 9, device=DEVICE), 1)
    assert_twins_match(fa, pt, x, target, backend=backend)


def test_state_dict_keys_match_torch():
    weight = torch.rand(5) + 0.5
    pairs = [
        (fastattn.nn.Softmax(1), torch.nn.Softmax(1)),
        (fastattn.nn.LogSoftmax(-1), torch.nn.LogSoftmax(-1)),
        (fastattn.nn.CrossEntropyLoss(), torch.nn.CrossEntropyLoss()),
        (fastattn.nn.CrossEntropyLoss(weight), torch.nn.CrossEntropyLoss(weight)),
    ]
    for fa, pt in pairs:
        assert list(fa.state_dict()) == list(pt.state_dict()), type(fa).__name__
    assert list(pairs[-1][0].state_dict()) == ["weight"]
    assert dict(pairs[-1][0].named_buffers()).keys() == dict(pairs[-1][1].named_buffers()).keys()


def test_load_state_dict_from_torch_twin():
    pt = torch.nn.CrossEntropyLoss(torch.rand(7, device=DEVICE) + 0.5)
    fa = fastattn.nn.CrossEntropyLoss(torch.ones(7, device=DEVICE))
    fa.load_state_dict(pt.state_dict())
    torch.testing.assert_close(fa.weight, pt.weight)
    x = torch.randn(4, 7, device=DEVICE)
    target = torch.randint(0, 7, (4,), device=DEVICE)
    torch.testing.assert_close(fa(x, target), pt(x, target))
    back = torch.nn.CrossEntropyLoss(torch.ones(7, device=DEVICE))
    back.load_state_dict(fa.state_dict())
    torch.testing.assert_close(back.weight, pt.weight)
    fastattn.nn.Softmax(1).load_state_dict(torch.nn.Softmax(1).state_dict())


# The legacy (size_average, reduce) pairs map to reductions exactly as in torch, warning alike.
@pytest.mark.parametrize(
    "legacy",
    [
        {"size_average": False},
        {"size_average": True},
        {"reduce": False},
        {"reduce": True},
        {"size_average": False, "reduction": "none"},
    ],
)
def test_legacy_arguments_map_like_torch(legacy):
    caught = []
    for cls in (torch.nn.CrossEntropyLoss, fastattn.nn.CrossEntropyLoss):
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            module = cls(**legacy)
        caught.append((module.reduction, [str(w.message) for w in record]))
    assert caught[0] == caught[1]
    if legacy == {"size_average": False}:
        assert caught[1][0] == "sum"
    x = torch.randn(4, 6, device=DEVICE)
    target = torch.randint(0, 6, (4,), device=DEVICE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fa, pt = fastattn.nn.CrossEntropyLoss(**legacy), torch.nn.CrossEntropyLoss(**legacy)
    torch.testing.assert_close(fa(x, target), pt(x, target))


# torch's legacy rule: dim 0 for 1-d and 3-d inputs, dim 1 for 2-d and 4-d ones.
@pytest.mark.parametrize("shape", [(7,), (3, 5), (3, 4, 5), (2, 3, 4, 5)], ids=len)
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_implicit_dim_warns_and_picks_torchs_dim(name, shape):
    x = torch.randn(shape, device=DEVICE)
    expected_dim = 0 if len(shape) in (1, 3) else 1
    outputs = []
    for module in (getattr(torch.nn, name)(), getattr(fastattn.nn, name)()):
        assert module.dim is None
        with pytest.warns(UserWarning, match="Implicit dimension choice") as record:
            outputs.append(module(x))
        messages = [str(w.message) for w in record]
        assert any(
            m.endswith("Change the call to include dim=X as an argument.") for m in messages
        ), messages
    pt_out, fa_out = outputs
    torch.testing.assert_close(fa_out, pt_out)
    fn = torch.log_softmax if name == "LogSoftmax" else torch.softmax
    torch.testing.assert_close(fa_out, fn(x, expected_dim))


# The fused extras on both layers, for each backend.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["Softmax", "LogSoftmax"])
def test_softmax_layer_extras_match_reference(name, backend):
    x = torch.randn(2, 6, 9, device=DEVICE, requires_grad=True)
    mask = torch.rand(6, 9, device=DEVICE) > 0.3
    mask.diagonal().fill_(True)  # no fully masked row
    layer = getattr(fastattn.nn, name)(-1, scale=0.5, causal=True)
    spec = reference.log_softmax if name == "LogSoftmax" else reference.softmax
    with fastattn.use_backend(backend):
        out = layer(x, mask)
        upstream = torch.randn_like(out)
        (grad,) = torch.autograd.grad(out, x, upstream)
    expected = spec(x, -1, scale=0.5, mask=mask, causal=True)
    torch.testing.assert_close(out, expected)
    assert (out == (float("-inf") if name == "LogSoftmax" else 0.0)).any()  # the mask applied
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    torch.testing.assert_close(grad, expected_grad)


# z_loss and softcap, for each backend; logits large enough that the soft cap bends them.
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_loss_extras_match_reference(reduction, backend):
    x = (torch.randn(6, 13, device=DEVICE) * 25).requires_grad_()
    target = torch.randint(0, 13, (6,), device=DEVICE)
    target[1] = -100
    layer = fastattn.nn.CrossEntropyLoss(reduction=reduction, z_loss=1e-3, softcap=30.0)
    with fastattn.use_backend(backend):
        loss = layer(x, target)
        upstream = torch.randn_like(loss)
        (grad,) = torch.autograd.grad(loss, x, upstream)
    expected = reference.cross_entropy(x, target, reduction=reduction, z_loss=1e-3, softcap=30.0)
    torch.testing.assert_close(loss, expected)
    (expected_grad,) = torch.autograd.grad(expected, x, upstream)
    torch.testing.assert_close(grad, expected_grad)
    plain = torch.nn.functional.cross_entropy(x, target, reduction=reduction)
    assert not torch.allclose(loss, plain)  # the extras changed the loss


# A real model with its LogSoftmax swapped: same output and same parameter gradients.
@pytest.mark.parametrize("backend", BACKENDS)
def test_swapped_log_softmax_in_a_model(backend):
    pt_model = torch.nn.Sequential(torch.nn.Linear(16, 10), torch.nn.LogSoftmax(dim=-1))
    fa_model = torch.nn.Sequential(torch.nn.Linear(16, 10), fastattn.nn.LogSoftmax(dim=-1))
    pt_model.to(DEVICE)
    fa_model.to(DEVICE)
    fa_model.load_state_dict(pt_model.state_dict())
    x = torch.randn(8, 16, device=DEVICE)
    target = torch.randint(0, 10, (8,), device=DEVICE)
    pt_out = pt_model(x)
    torch.nn.functional.nll_loss(pt_out, target).backward()
    with fastattn.use_backend(backend):
        fa_out = fa_model(x)
        torch.nn.functional.nll_loss(fa_out, target).backward()
    torch.testing.assert_close(fa_out, pt_out)
    pt_params = dict(pt_model.named_parameters())
    for name, fa_param in fa_model.named_parameters():
        assert fa_param.grad is not None, name
        torch.testing.assert_close(fa_param.grad, pt_params[name].grad)


def _layer_and_inputs(case):
    x = torch.randn(4, 6, 10, device=DEVICE, requires_grad=True)
    if case == "softmax-mask":
        return fastattn.nn.Softmax(-1, scale=0.7, causal=True), (
            x,
            torch.randn(6, 10, device=DEVICE),
        )
    if case == "log-softmax":
        return fastattn.nn.LogSoftmax(1), (x,)
    if case == "ce-index":
        target = torch.randint(0, 6, (4, 10), device=DEVICE)
        target[0, 0] = -100
        weight = torch.rand(6, device=DEVICE) + 0.5
        return fastattn.nn.CrossEntropyLoss(weight, label_smoothing=0.1, z_loss=1e-3), (x, target)
    target = torch.softmax(torch.randn(4, 6, 10, device=DEVICE), 1)
    return fastattn.nn.CrossEntropyLoss(softcap=5.0), (x, target)


# Each layer with the arguments most likely to tempt an in-place shortcut (mask, weight, softcap).
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["softmax-mask", "log-softmax", "ce-index", "ce-probability"])
def test_layers_do_not_modify_inputs(case, backend):
    module, inputs = _layer_and_inputs(case)
    tensors = list(inputs) + [b for b in module.buffers()]
    before = [t.detach().clone() for t in tensors]
    versions = [t._version for t in tensors]
    with fastattn.use_backend(backend):
        module(*inputs).sum().backward()
    assert inputs[0].grad is not None
    for old, new in zip(before, tensors, strict=True):
        torch.testing.assert_close(new.detach(), old, rtol=0, atol=0)
    assert [t._version for t in tensors] == versions
