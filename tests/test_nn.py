"""Drop-in layers in ``fastattn.nn`` against their ``torch.nn`` twins: constructor arguments,
outputs, gradients, ``state_dict`` keys, legacy arguments, the keyword-only extras, and
``fastattn.swap`` on real models."""

import copy
import warnings

import pytest
import torch
from check import assert_twice_error, skip_unsupported_attention

import fastattn
from fastattn import reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = fastattn.available_backends(DEVICE)
ATTENTION_BACKENDS = fastattn.available_backends(DEVICE, "attention")


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


# --- MultiheadAttention ------------------------------------------------------------------------

# Odd sizes: head dim 12 with 3 heads, L != S, none a power of two.
E, H, B, L, S = 36, 3, 2, 7, 11
F64, F32 = torch.float64, torch.float32


def _torch_mha(dtype=F64, **kwargs):
    """A torch layer with random (not zero) biases, so every bias path is exercised."""
    pt = torch.nn.MultiheadAttention(E, H, device=DEVICE, dtype=dtype, **kwargs)
    with torch.no_grad():
        for name, p in pt.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn_like(p) * 0.5)
    return pt


def _fastattn_twin(pt, dtype, **kwargs):
    fa = fastattn.nn.MultiheadAttention(E, H, device=DEVICE, dtype=dtype, **kwargs)
    fa.load_state_dict(pt.state_dict())
    return fa


def _blocked(shape, free_col=0):
    """A torch-style bool mask (True = not allowed) that leaves key ``free_col`` to every row."""
    m = torch.rand(shape, device=DEVICE) < 0.35
    m[..., free_col] = False
    return m


def _mask(kind, batched, src_len):
    """One mask of ``kind`` in float64 or bool, in torch's convention."""
    lead = (B,) if batched else ()
    heads = B * H if batched else H
    if kind == "causal":
        return torch.ones(L, src_len, dtype=torch.bool, device=DEVICE).triu(1)
    shape = {"kpm": (*lead, src_len), "attn2": (L, src_len), "attn3": (heads, L, src_len)}
    blocked = _blocked(shape[kind.split("-")[0]])
    if kind.endswith("float"):
        values = torch.randn(blocked.shape, device=DEVICE, dtype=F64)
        return values.masked_fill(blocked, float("-inf"))
    return blocked


# name: (constructor kwargs, inputs, forward kwargs). Inputs: "self" (query is key is value,
# S = L), "kv" (key is value), "general" (three tensors), "unbatched" (2-d query, key is value).
# Masks: kpm / attn2 / attn3 with -bool or -float, "causal" (bool, with the is_causal hint).
MHA_CASES = {
    "self-seq-first": ({}, "self", {}),
    "self-batch-first-sdpa": ({"batch_first": True}, "self", {"need_weights": False}),
    "unbatched-masks": ({}, "unbatched", {"key_padding_mask": "kpm-bool",
                                          "attn_mask": "attn3-bool"}),
    "unbatched-sdpa": ({"batch_first": True}, "unbatched", {"attn_mask": "attn2-float",
                                                           "need_weights": False}),
    "kdim-vdim": ({"kdim": 5, "vdim": 7}, "general", {"attn_mask": "attn2-float"}),
    "kdim-vdim-sdpa": ({"kdim": 5, "vdim": 7, "batch_first": True}, "general",
                       {"attn_mask": "attn3-bool", "need_weights": False}),
    "no-bias": ({"bias": False}, "kv", {"key_padding_mask": "kpm-bool", "need_weights": False}),
    "bias-kv": ({"add_bias_kv": True}, "kv", {"key_padding_mask": "kpm-bool",
                                             "attn_mask": "attn2-bool"}),
    "zero-attn-sdpa": ({"add_zero_attn": True, "batch_first": True}, "general",
                       {"attn_mask": "attn3-float", "need_weights": False}),
    "bias-kv-zero-attn": ({"add_bias_kv": True, "add_zero_attn": True}, "self",
                          {"key_padding_mask": "kpm-float", "attn_mask": "attn2-bool"}),
    "float-masks-sdpa": ({}, "kv", {"key_padding_mask": "kpm-float", "attn_mask": "attn3-float",
                                    "need_weights": False}),
    "float-kpm": ({"batch_first": True}, "general", {"key_padding_mask": "kpm-float"}),
    "per-head-weights": ({"batch_first": True}, "general",
                         {"attn_mask": "attn2-bool", "average_attn_weights": False}),
    "causal-hint-sdpa": ({"batch_first": True}, "self", {"attn_mask": "causal",
                                                        "is_causal": True, "need_weights": False}),
    "causal-hint-kpm": ({}, "self", {"attn_mask": "causal", "is_causal": True,
                                     "key_padding_mask": "kpm-bool", "need_weights": False}),
    "causal-hint-weights": ({"add_zero_attn": True}, "self", {"attn_mask": "causal",
                                                              "is_causal": True}),
}
# The Triton interpreter is slow: one case per attention path and mask kind.
TRITON_CASES = ["self-seq-first", "unbatched-masks", "zero-attn-sdpa", "causal-hint-sdpa"]
MHA_RUNS = (
    [(case, "torch", F64) for case in MHA_CASES]
    + [(case, "torch", F32) for case in MHA_CASES]
    + [(case, b, F32) for b in ATTENTION_BACKENDS if b != "torch" for case in TRITON_CASES]
)


def _mha_inputs(ctor, kind, call):
    """float64 inputs by name (query, key, value and the masks of ``call``), and a function
    that turns a dict of such inputs into ``(query, key, value, forward kwargs)``."""
    batched = kind != "unbatched"
    src_len = L if kind == "self" else S
    seq_first = batched and not ctor.get("batch_first", False)

    def make(n, features):
        shape = (n, features) if not batched else (n, B, features) if seq_first else (
            B, n, features)
        return torch.randn(shape, device=DEVICE, dtype=F64)

    inputs = {"query": make(L, E)}
    if kind == "general":
        inputs["key"] = make(S, ctor.get("kdim", E))
        inputs["value"] = make(S, ctor.get("vdim", E))
    elif kind != "self":
        inputs["key"] = make(S, E)
    names = {}
    for arg, spec in call.items():
        if isinstance(spec, str):
            inputs[arg] = _mask(spec, batched, src_len)
            names[arg] = arg

    def build(t):
        q = t["query"]
        k = t.get("key", q)
        v = t.get("value", k)
        kwargs = {arg: t[names[arg]] if arg in names else spec for arg, spec in call.items()}
        return q, k, v, kwargs

    return inputs, build


def _mha_run(module, inputs, build, upstream, backend):
    """Outputs (attn_output[, weights]), the gradients of every floating input and every
    parameter, and the warnings raised; all inputs are fresh leaves."""
    leaves = {n: t.detach().clone().requires_grad_(t.is_floating_point())
              for n, t in inputs.items()}
    q, k, v, kwargs = build(leaves)
    with warnings.catch_warnings(record=True) as caught, fastattn.use_backend(backend):
        warnings.simplefilter("always")
        out, weights = module(q, k, v, **kwargs)
        outs = [out] if weights is None else [out, weights]
        names = [n for n, t in leaves.items() if t.requires_grad]
        names += [n for n, _ in module.named_parameters()]
        targets = [leaves[n] for n in names if n in leaves] + list(module.parameters())
        grads = torch.autograd.grad(outs, targets, upstream[: len(outs)])
    user_warnings = [str(w.message) for w in caught if w.category is UserWarning]
    return outs, dict(zip(names, grads, strict=True)), user_warnings


def _cast(inputs, dtype):
    return {n: t.to(dtype) if t.is_floating_point() else t for n, t in inputs.items()}


# Every case in float64 (exact agreement) and float32 (twice PyTorch's float32 error against
# the float64 run) on the torch backend, and the Triton cases through the other backends.
@pytest.mark.parametrize(("case", "backend", "dtype"), MHA_RUNS,
                         ids=[f"{c}-{b}-{str(d)[6:]}" for c, b, d in MHA_RUNS])
def test_multihead_attention_matches_torch(case, backend, dtype):
    skip_unsupported_attention(backend, dtype)
    ctor, kind, call = MHA_CASES[case]
    pt64 = _torch_mha(F64, **ctor)
    inputs, build = _mha_inputs(ctor, kind, call)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compared below
        q, k, v, kwargs = build(inputs)
        shapes = [t.shape for t in pt64(q, k, v, **kwargs) if t is not None]
    upstream = [torch.randn(s, device=DEVICE, dtype=F64) for s in shapes]
    ref_outs, ref_grads, ref_warnings = _mha_run(pt64, inputs, build, upstream, "torch")
    assert len(ref_outs) == (1 if call.get("need_weights") is False else 2)
    fa = _fastattn_twin(pt64, dtype, **ctor)
    typed = _cast(inputs, dtype)
    fa_outs, fa_grads, fa_warnings = _mha_run(fa, typed, build, [u.to(dtype) for u in upstream],
                                              backend)
    assert fa_warnings == ref_warnings  # e.g. mixed bool and float masks
    assert list(fa_grads) == list(ref_grads)
    assert all(torch.isfinite(t).all() for t in ref_outs + list(ref_grads.values()))
    if dtype == F64:
        for fa_out, ref_out in zip(fa_outs, ref_outs, strict=True):
            torch.testing.assert_close(fa_out, ref_out)
        for name, grad in fa_grads.items():
            torch.testing.assert_close(grad, ref_grads[name], msg=name)
        return
    pt = copy.deepcopy(pt64).to(dtype)
    pt_outs, pt_grads, _ = _mha_run(pt, typed, build, [u.to(dtype) for u in upstream], "torch")
    for what, fa_out, ref_out, pt_out in zip(("out", "weights"), fa_outs, ref_outs, pt_outs,
                                             strict=False):
        assert_twice_error(fa_out, ref_out, pt_out, what)
    for name, grad in fa_grads.items():
        assert_twice_error(grad, ref_grads[name], pt_grads[name], f"grad {name}")


# A query row that sees no key (all keys padded for batch 1; row 2 blocked by attn_mask for
# batch 0): fastattn gives attention 0 on both paths (output = out_proj.bias, weights 0, finite
# gradients). torch agrees with need_weights=False and gives NaN with need_weights=True.
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_fully_masked_rows(need_weights, backend):
    dtype = F64 if backend == "torch" else F32
    skip_unsupported_attention(backend, dtype)
    pt = _torch_mha(dtype, batch_first=True)
    fa = _fastattn_twin(pt, dtype, batch_first=True)
    x = torch.randn(B, L, E, device=DEVICE, dtype=dtype, requires_grad=True)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[1] = True
    attn_mask = torch.zeros(B * H, L, L, dtype=torch.bool, device=DEVICE)
    attn_mask[:H, 2] = True
    dead = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    dead[1], dead[0, 2] = True, True
    with fastattn.use_backend(backend):
        out, weights = fa(x, x, x, kpm, need_weights, attn_mask)
        (grad,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(out[dead], pt.out_proj.bias.expand(int(dead.sum()), E))
    expected, _ = pt(x, x, x, kpm, False, attn_mask)
    torch.testing.assert_close(out, expected)
    pt_out, pt_weights = pt(x, x, x, kpm, need_weights, attn_mask)
    if need_weights:
        assert (weights[dead] == 0).all()
        assert torch.isnan(pt_out[dead]).all() and torch.isnan(pt_weights[dead]).all()
        torch.testing.assert_close(weights[~dead], pt_weights[~dead])
    else:
        assert weights is None and pt_weights is None


# Dropout only in training: eval is deterministic and equals torch's layer; training drops
# (need_weights=True: the returned weights are eval's, dropped or rescaled by 1 / (1 - p)),
# is reproducible from torch.manual_seed, finite, and differs from eval.
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_dropout(need_weights, backend):
    skip_unsupported_attention(backend, F32)
    p = 0.4
    pt = _torch_mha(F32, dropout=p)
    fa = _fastattn_twin(pt, F32, dropout=p)
    x = torch.randn(L, B, E, device=DEVICE)
    kw = {"need_weights": need_weights, "average_attn_weights": False}
    with fastattn.use_backend(backend):
        fa.eval()
        pt.eval()
        eval_out, eval_w = fa(x, x, x, **kw)
        again, _ = fa(x, x, x, **kw)
        assert torch.equal(eval_out, again)
        torch.testing.assert_close(eval_out, pt(x, x, x, **kw)[0])
        fa.train()
        torch.manual_seed(1234)
        train_out, train_w = fa(x, x, x, **kw)
        torch.manual_seed(1234)
        repeat, _ = fa(x, x, x, **kw)
        leaf = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(fa(leaf, leaf, leaf, **kw)[0].sum(), leaf)
    assert torch.isfinite(train_out).all() and torch.isfinite(grad).all()
    assert torch.equal(train_out, repeat)
    assert not torch.allclose(train_out, eval_out)
    if need_weights:
        kept = train_w != 0
        assert 0.3 < 1 - kept.float().mean().item() < 0.5  # about p of them dropped
        torch.testing.assert_close(train_w[kept] * (1 - p), eval_w[kept])


MHA_CONFIGS = [
    {},
    {"kdim": 5, "vdim": 7},
    {"bias": False},
    {"add_bias_kv": True, "add_zero_attn": True, "batch_first": True, "dropout": 0.25},
]
MHA_ATTRIBUTES = ["embed_dim", "kdim", "vdim", "_qkv_same_embed_dim", "num_heads", "dropout",
                  "batch_first", "head_dim", "add_zero_attn"]


# Attributes, parameter names/shapes, seeded initialisation, repr and state_dict both ways.
@pytest.mark.parametrize("config", MHA_CONFIGS, ids=["default", "kdim-vdim", "no-bias", "extras"])
def test_multihead_attention_state_dict_round_trip(config):
    torch.manual_seed(7)
    pt = torch.nn.MultiheadAttention(E, H, dtype=F64, **config)
    torch.manual_seed(7)
    fa = fastattn.nn.MultiheadAttention(E, H, dtype=F64, **config)
    for attr in MHA_ATTRIBUTES + ["in_proj_weight", "q_proj_weight", "in_proj_bias", "bias_k"]:
        pt_value, fa_value = getattr(pt, attr), getattr(fa, attr)
        if isinstance(pt_value, torch.Tensor):
            assert torch.equal(fa_value, pt_value), attr  # same seed, same initialisation
        else:
            assert fa_value == pt_value, attr
    assert isinstance(fa.out_proj, torch.nn.modules.linear.NonDynamicallyQuantizableLinear)
    assert repr(fa) == repr(pt)
    assert [(n, p.shape) for n, p in fa.named_parameters()] == [
        (n, p.shape) for n, p in pt.named_parameters()]
    assert list(fa.state_dict()) == list(pt.state_dict())
    with torch.no_grad():
        for param in pt.parameters():
            param.normal_()
    fa.load_state_dict(pt.state_dict())
    back = torch.nn.MultiheadAttention(E, H, dtype=F64, **config)
    back.load_state_dict(fa.state_dict())
    for (name, a), b, c in zip(pt.state_dict().items(), fa.state_dict().values(),
                               back.state_dict().values(), strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), name
    x = torch.randn(4, 2, E, dtype=F64)
    key = torch.randn(3, 2, config.get("kdim", E), dtype=F64)
    value = torch.randn(3, 2, config.get("vdim", E), dtype=F64)
    pt.eval(), fa.eval()
    if config.get("batch_first"):
        x, key, value = (t.transpose(0, 1) for t in (x, key, value))
    torch.testing.assert_close(fa(x, key, value)[0], pt(x, key, value)[0])


def _bad_mha_calls():
    q = torch.randn(L, B, E)
    kv = torch.randn(S, B, E)
    bad_2d = torch.zeros(L, L, dtype=torch.bool)
    return {
        "is-causal-without-mask": (RuntimeError, (q, kv, kv), {"is_causal": True}),
        "attn-mask-2d-shape": (RuntimeError, (q, kv, kv), {"attn_mask": bad_2d}),
        "attn-mask-3d-shape": (RuntimeError, (q, kv, kv), {"attn_mask": bad_2d[None]}),
        "attn-mask-4d": (AssertionError, (q, kv, kv), {"attn_mask": bad_2d[None, None]}),
        "kpm-shape": (AssertionError, (q, kv, kv),
                      {"key_padding_mask": torch.zeros(B, S + 1, dtype=torch.bool)}),
        "kpm-rank": (AssertionError, (q, kv, kv),
                     {"key_padding_mask": torch.zeros(S, dtype=torch.bool)}),
        "int-mask": (AssertionError, (q, kv, kv),
                     {"attn_mask": torch.zeros(L, S, dtype=torch.int64)}),
        "key-rank": (AssertionError, (q, kv[:, 0], kv), {}),
        "query-rank": (AssertionError, (q[None], kv[None], kv[None]), {}),
        "query-features": (AssertionError, (q[..., :-1], kv, kv), {}),
        "key-value-length": (AssertionError, (q, kv, kv[:-1]), {}),
    }


# Bad arguments raise what torch raises; fastattn's error is also a ValueError naming them.
@pytest.mark.parametrize("case", list(_bad_mha_calls()))
def test_multihead_attention_bad_input_raises_like_torch(case):
    error, args, kwargs = _bad_mha_calls()[case]
    pt = torch.nn.MultiheadAttention(E, H)
    fa = fastattn.nn.MultiheadAttention(E, H)
    with pytest.raises(error):
        pt(*args, **kwargs)
    with pytest.raises(error) as info:
        fa(*args, **kwargs)
    assert isinstance(info.value, ValueError), type(info.value)


def test_multihead_attention_bad_constructor_arguments():
    for cls in (torch.nn.MultiheadAttention, fastattn.nn.MultiheadAttention):
        with pytest.raises(AssertionError):
            cls(E, 5)
        with pytest.raises(ValueError, match="greater than 0"):
            cls(0, 3)
    with pytest.raises(ValueError, match="embed_dim=36 must be divisible by num_heads=5"):
        fastattn.nn.MultiheadAttention(E, 5)
    with pytest.raises(ValueError, match="dropout"):
        fastattn.nn.MultiheadAttention(E, H, dropout=1.5)
    with pytest.raises(TypeError, match="num_heads"):
        fastattn.nn.MultiheadAttention(E, 3.0)


# Masks, inputs and parameters are read, never written, on both attention paths.
@pytest.mark.parametrize("need_weights", [False, True])
def test_multihead_attention_does_not_modify_inputs(need_weights):
    fa = fastattn.nn.MultiheadAttention(E, H, add_bias_kv=True, add_zero_attn=True)
    q = torch.randn(L, B, E, requires_grad=True)
    kv = torch.randn(S, B, E, requires_grad=True)
    kpm = _blocked((B, S))
    attn_mask = _mask("attn3-float", True, S).float().requires_grad_()
    tensors = [q, kv, kpm, attn_mask] + list(fa.parameters())
    before = [t.detach().clone() for t in tensors]
    versions = [t._version for t in tensors]
    with pytest.warns(UserWarning, match="mismatched key_padding_mask and attn_mask"):
        out, _ = fa(q, kv, kv, kpm, need_weights, attn_mask)  # bool and float, as torch warns
    out.sum().backward()
    assert q.grad is not None and attn_mask.grad is not None
    for old, new in zip(before, tensors, strict=True):
        assert torch.equal(new.detach(), old)
    assert [t._version for t in tensors] == versions



# torch.compile captures the layer whole (the pre-hook, the checks and the fastattn op) and
# computes what eager does, forward and backward.
def test_multihead_attention_compiles_fullgraph():
    fa = fastattn.nn.MultiheadAttention(E, H, batch_first=True, device=DEVICE)
    x = torch.randn(B, L, E, device=DEVICE)
    kpm = _blocked((B, L))
    eager_x, compiled_x = x.clone().requires_grad_(), x.clone().requires_grad_()
    eager, _ = fa(eager_x, eager_x, eager_x, kpm, False)
    compiled, _ = torch.compile(fa, fullgraph=True)(compiled_x, compiled_x, compiled_x, kpm, False)
    upstream = torch.randn_like(eager)
    eager.backward(upstream)
    compiled.backward(upstream)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)

# --- swap --------------------------------------------------------------------------------------


def _params_and_grads(model):
    return {n: p.grad for n, p in model.named_parameters()}


def _assert_models_match(fa_model, pt_model, fa_out, pt_out, dtype=F64):
    if dtype == F64:
        torch.testing.assert_close(fa_out, pt_out)
    fa_grads = _params_and_grads(fa_model)
    pt_grads = _params_and_grads(pt_model)
    assert list(fa_grads) == list(pt_grads)
    for name, grad in fa_grads.items():
        assert grad is not None, name
        torch.testing.assert_close(grad, pt_grads[name], msg=name)


def _encoder(dtype):
    layer = torch.nn.TransformerEncoderLayer(E, 4, 16, dropout=0.0, batch_first=True,
                                             device=DEVICE, dtype=dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nested-tensor notes
        return torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)


# A 2-layer encoder in training with a causal float mask (detected as causal, so the layers
# pass is_causal=True): same output and gradients (input and every parameter) as unswapped.
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_swap_transformer_encoder_train(backend):
    dtype = F64 if backend == "torch" else F32
    skip_unsupported_attention(backend, dtype)
    pt = _encoder(F64)
    fa = copy.deepcopy(pt)
    assert fastattn.swap(fa) == 2
    assert fastattn.swap(fa) == 0  # already fastattn's
    assert all(type(layer.self_attn) is fastattn.nn.MultiheadAttention for layer in fa.layers)
    assert fa.use_nested_tensor is False and fa.enable_nested_tensor is True
    fa.to(dtype)
    mask = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE, dtype=F64)
    src = torch.randn(B, L, E, device=DEVICE, dtype=F64)
    pt_src, fa_src = src.clone().requires_grad_(), src.to(dtype).requires_grad_()
    upstream = torch.randn(B, L, E, device=DEVICE, dtype=F64)
    pt_out = pt(pt_src, mask)
    pt_out.backward(upstream)
    with fastattn.use_backend(backend):
        fa_out = fa(fa_src, mask.to(dtype))
        fa_out.backward(upstream.to(dtype))
    if dtype == F64:
        _assert_models_match(fa, pt, fa_out, pt_out)
        torch.testing.assert_close(fa_src.grad, pt_src.grad)
        return
    pt32 = copy.deepcopy(pt).to(dtype)
    pt32_src = src.to(dtype).requires_grad_()
    pt32_out = pt32(pt32_src, mask.to(dtype))
    pt32_out.backward(upstream.to(dtype))
    assert_twice_error(fa_out, pt_out, pt32_out, "out")
    assert_twice_error(fa_src.grad, pt_src.grad, pt32_src.grad, "grad src")
    pt32_grads = _params_and_grads(pt32)
    for name, grad in _params_and_grads(pt).items():
        assert_twice_error(_params_and_grads(fa)[name], grad, pt32_grads[name], name)


# Eval without grad, where the unswapped encoder takes torch's nested-tensor and fused-layer
# inference paths: the swapped one runs fastattn's attention in every layer instead, and equals
# the module-by-module computation (torch's fast path disabled) everywhere (so not the nested
# path, which writes 0 at padding), and the fast path on the positions that are not padding.
def test_swap_transformer_encoder_eval_runs_fastattn(monkeypatch):
    pt = _encoder(F64).eval()
    fa = copy.deepcopy(pt)
    assert fastattn.swap(fa) == 2 and not fa.training
    src = torch.randn(B, L, E, device=DEVICE, dtype=F64)
    kpm = torch.zeros(B, L, dtype=torch.bool, device=DEVICE)
    kpm[1, 4:] = True  # left-aligned padding, as the nested path wants
    with torch.no_grad():
        fast = pt(src, src_key_padding_mask=kpm)
        with _fastpath(False):
            slow = pt(src, src_key_padding_mask=kpm)
        assert not torch.equal(fast, slow)  # the fast path ran (padding rows differ)

        calls = []
        sdpa = fastattn.functional.scaled_dot_product_attention

        def counting_sdpa(*args, **kwargs):
            calls.append(1)
            return sdpa(*args, **kwargs)

        # Every layer's attention goes through fastattn (torch's fused layer would skip it).
        monkeypatch.setattr(fastattn.functional, "scaled_dot_product_attention", counting_sdpa)
        out = fa(src, src_key_padding_mask=kpm)
        out_no_mask = fa(src)
    assert len(calls) == 4
    torch.testing.assert_close(out, slow)
    torch.testing.assert_close(out[~kpm], fast[~kpm])
    with torch.no_grad():
        torch.testing.assert_close(out_no_mask, pt(src))


def _fastpath(enabled):
    class Toggle:
        def __enter__(self):
            self.before = torch.backends.mha.get_fastpath_enabled()
            torch.backends.mha.set_fastpath_enabled(enabled)

        def __exit__(self, *exc):
            torch.backends.mha.set_fastpath_enabled(self.before)

    return Toggle()


# nn.Transformer (sequence first) with causal target mask and padding on both sides: one
# encoder self-attention and the decoder's self- and cross-attention are replaced.
def test_swap_transformer():
    pt = torch.nn.Transformer(E, 4, 1, 1, 16, dropout=0.0, device=DEVICE, dtype=F64)
    fa = copy.deepcopy(pt)
    assert fastattn.swap(fa) == 3
    src = torch.randn(S, B, E, device=DEVICE, dtype=F64)
    tgt = torch.randn(L, B, E, device=DEVICE, dtype=F64)
    tgt_mask = torch.nn.Transformer.generate_square_subsequent_mask(L, device=DEVICE, dtype=F64)
    src_kpm = _blocked((B, S)).to(F64).masked_fill(_blocked((B, S)), float("-inf"))
    outs = []
    for model in (pt, fa):
        out = model(src, tgt, tgt_mask=tgt_mask, src_key_padding_mask=src_kpm,
                    memory_key_padding_mask=src_kpm)
        out.backward(torch.ones_like(out))
        outs.append(out)
    _assert_models_match(fa, pt, outs[1], outs[0])


class _MySoftmax(torch.nn.Softmax):
    """A user subclass: swap leaves it alone."""


class _Head(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(12, 10)
        self.log_probs = torch.nn.Sequential(torch.nn.LogSoftmax(dim=-1))
        self.probs = torch.nn.Softmax(dim=-1)
        self.same_probs = self.probs  # one module reachable twice
        self.custom = _MySoftmax(dim=-1)
        self.loss = torch.nn.CrossEntropyLoss(torch.rand(10) + 0.5, ignore_index=3,
                                              label_smoothing=0.1)

    def forward(self, x, target):
        logits = self.proj(x)
        return (self.loss(logits, target) + self.log_probs(logits).mean()
                + (self.same_probs(logits) * self.custom(logits)).sum())


def test_swap_softmax_log_softmax_cross_entropy():
    pt = _Head().double()
    pt.probs.eval()
    pt.proj.bias.requires_grad_(False)
    fa = copy.deepcopy(pt)
    assert fastattn.swap(fa) == 3
    assert type(fa.log_probs[0]) is fastattn.nn.LogSoftmax and fa.log_probs[0].dim == -1
    assert type(fa.probs) is fastattn.nn.Softmax and fa.same_probs is fa.probs
    assert not fa.probs.training and fa.log_probs[0].training
    assert type(fa.custom) is _MySoftmax
    loss = fa.loss
    assert type(loss) is fastattn.nn.CrossEntropyLoss
    assert (loss.ignore_index, loss.reduction, loss.label_smoothing) == (3, "mean", 0.1)
    assert loss.weight.dtype == F64 and list(fa.state_dict()) == list(pt.state_dict())
    x = torch.randn(6, 12, dtype=F64)
    target = torch.randint(0, 10, (6,))
    target[0] = 3
    pt_out, fa_out = pt(x, target), fa(x, target)
    pt_out.backward()
    fa_out.backward()
    torch.testing.assert_close(fa_out, pt_out)
    assert fa.proj.bias.grad is None
    torch.testing.assert_close(fa.proj.weight.grad, pt.proj.weight.grad)


# The twins take over the very parameter objects (device, dtype, requires_grad, optimizer
# state all kept) and the training mode; the root itself cannot be swapped in place.
def test_swap_keeps_parameters_and_modes():
    model = torch.nn.Sequential(
        torch.nn.MultiheadAttention(E, H, kdim=5, add_bias_kv=True, dtype=F64),
        torch.nn.MultiheadAttention(E, H, bias=False),
    )
    model[1].eval()
    model[1].in_proj_weight.requires_grad_(False)
    params = dict(model.named_parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert fastattn.swap(model) == 2
    assert dict(model.named_parameters()) == params  # same objects, same names
    assert model[0].training and not model[1].training
    assert model[0].in_proj_weight is None and model[0].k_proj_weight.dtype == F64
    assert not model[1].in_proj_weight.requires_grad and model[1].in_proj_bias is None
    assert optimizer.param_groups[0]["params"][0] is model[0].q_proj_weight
    with pytest.raises(ValueError, match="itself a Softmax"):
        fastattn.swap(torch.nn.Softmax(-1))
