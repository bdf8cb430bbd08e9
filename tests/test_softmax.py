"""fastattn.softmax / log_softmax on every available backend against the float64 specification."""

import pytest
import torch
from check import DEVICE, assert_twice_error, backends
from conftest import INTERPRETED

import fastattn
from fastattn import reference as R

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def _leaf(t, dtype=None):
    return t.detach().to(dtype or t.dtype).requires_grad_(True)


def _compare(backend, log, x, dim=-1, dtype=None, mask=None, **kw):
    """Forward and every gradient of fastattn vs float64 spec, with PyTorch's error as the bar."""
    fn = fastattn.log_softmax if log else fastattn.softmax
    spec = R.log_softmax if log else R.softmax
    float_mask = mask is not None and mask.is_floating_point()
    x_ours, x_pt, x_ref = _leaf(x), _leaf(x), _leaf(x, torch.float64)
    if float_mask:
        m_ours, m_pt, m_ref = _leaf(mask), _leaf(mask), _leaf(mask, torch.float64)
    else:
        m_ours = m_pt = m_ref = mask
    with fastattn.use_backend(backend):
        out = fn(x_ours, dim, dtype, mask=m_ours, **kw)
    pt = spec(x_pt, dim, dtype, mask=m_pt, **kw)
    ref = spec(x_ref, dim, mask=m_ref, **kw)
    assert out.dtype == (dtype or x.dtype)
    assert_twice_error(out, ref, pt, "output")
    grad = torch.randn(ref.shape, dtype=torch.float64, device=x.device)
    out.backward(grad.to(out.dtype))
    pt.backward(grad.to(pt.dtype))
    ref.backward(grad)
    assert x_ours.grad.dtype == x.dtype
    # a gradient through a narrowing dtype cast carries that dtype's precision
    narrow = dtype if dtype is not None and dtype.itemsize < x.dtype.itemsize else None
    assert_twice_error(x_ours.grad, x_ref.grad, x_pt.grad, "d input", narrow)
    if float_mask:
        assert_twice_error(m_ours.grad, m_ref.grad, m_pt.grad, "d mask")
    return out


# One row that fits a single block, and rows that need the online path with an odd remainder.
@pytest.mark.parametrize("shape", [(3, 37), (4, 9001)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_matches_reference(backend, log, dtype, shape):
    x = 3 * torch.randn(shape, device=DEVICE, dtype=dtype)
    _compare(backend, log, x)


# Beyond 64k columns (the online path over many chunks); larger rows only on a GPU.
@pytest.mark.parametrize("shape", [(2, 70001)] + ([] if INTERPRETED else [(64, 262147)]))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_long_rows(backend, log, dtype, shape):
    x = 4 * torch.randn(shape, device=DEVICE, dtype=dtype)
    _compare(backend, log, x)


# Every dim of a 3-d input, a transposed (non-contiguous) input, and a 5-d input whose
# leading dims cannot be merged into three (the copy fallback of the row layout).
@pytest.mark.parametrize("case", ["dim0", "dim1", "dim2", "transposed", "5d"])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_any_dim_and_strides(backend, log, case):
    if case.startswith("dim"):
        x, dim = torch.randn(5, 6, 7, device=DEVICE), int(case[-1])
    elif case == "transposed":
        x, dim = torch.randn(9, 13, device=DEVICE).t(), -1
    else:
        x, dim = torch.randn(2, 3, 4, 5, 6, device=DEVICE).permute(4, 0, 3, 1, 2), 2
    _compare(backend, log, x, dim=dim)


# Bool masks of each broadcast shape against (B, H, L, S) scores, with and without causal,
# for L < S and L > S.
@pytest.mark.parametrize("mask_shape", [None, (7,), (5, 7), (2, 1, 1, 7), (1, 3, 5, 7)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("lengths", [(5, 7), (7, 5)])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_scale_mask_causal(backend, log, lengths, causal, mask_shape):
    L, S = lengths
    x = 2 * torch.randn(2, 3, L, S, device=DEVICE)
    mask = None
    if mask_shape is not None:
        mask_shape = tuple(L if n == 5 else S if n == 7 else n for n in mask_shape)
        mask = torch.rand(mask_shape, device=DEVICE) > 0.3
    _compare(backend, log, x, scale=0.7, mask=mask, causal=causal)


# Additive masks: finite values and -inf; the mask requires grad and receives it.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_additive_mask_with_grad(backend, log, dtype):
    x = torch.randn(2, 3, 6, 11, device=DEVICE, dtype=dtype)
    mask = torch.randn(1, 3, 6, 11, device=DEVICE, dtype=dtype)
    mask[..., 4] = float("-inf")
    _compare(backend, log, x, scale=0.5, mask=mask, causal=True)


@pytest.mark.parametrize("backend", backends())
def test_fully_masked_rows(backend):
    x = torch.randn(4, 9001, device=DEVICE, requires_grad=True)
    mask = torch.rand(4, 9001, device=DEVICE) > 0.5
    mask[1] = False
    with fastattn.use_backend(backend):
        y = fastattn.softmax(x, mask=mask)
        logy = fastattn.log_softmax(x, mask=mask)
    assert torch.equal(y[1], torch.zeros_like(y[1]))
    assert torch.isneginf(logy[1]).all()
    assert torch.isfinite(y).all()
    (gx,) = torch.autograd.grad((y * torch.randn_like(y)).sum() + logy[0].sum(), x)
    assert torch.isfinite(gx).all()
    assert torch.equal(gx[1], torch.zeros_like(gx[1]))
    assert torch.equal(gx[~mask], torch.zeros_like(gx[~mask]))


@pytest.mark.parametrize("backend", backends())
def test_properties(backend):
    x = 5 * torch.randn(6, 4099, device=DEVICE, dtype=torch.float64)
    with fastattn.use_backend(backend):
        y = fastattn.softmax(x)
        shifted = fastattn.softmax(x + 100 * torch.randn(6, 1, device=DEVICE, dtype=x.dtype))
        logy = fastattn.log_softmax(x)
    # Rows sum to one, softmax is invariant to a per-row shift, log_softmax is its log.
    torch.testing.assert_close(y.sum(-1), torch.ones(6, device=DEVICE, dtype=x.dtype))
    torch.testing.assert_close(shifted, y)
    torch.testing.assert_close(logy.exp(), y)


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_bfloat16_output_is_rounded_to_nearest(backend, log):
    # Accumulating in float32, every backend's bf16 output is the exact result rounded to
    # nearest but for the rare value within float32's error of a tie. A cast that truncates (as
    # Triton's interpreter does unless ``narrow`` rounds) is off by one ulp in about half of them,
    # and a log-softmax gradient computed from that output exceeds twice PyTorch's error.
    x = 3 * torch.randn(8, 3001, device=DEVICE, dtype=torch.bfloat16)
    with fastattn.use_backend(backend):
        out = (fastattn.log_softmax if log else fastattn.softmax)(x)
    exact = (R.log_softmax if log else R.softmax)(x.double(), -1)
    rounded = exact.float().to(torch.bfloat16)  # float64 -> float32 is far below bf16's ulp
    off = out != rounded
    assert off.float().mean().item() < 1e-3, f"{off.sum().item()} of {off.numel()} not rounded"
    ulp = torch.finfo(torch.bfloat16).eps * rounded.double().abs().clamp_min(1e-30)
    assert ((out.double() - rounded.double()).abs() <= ulp).all()


@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends())
def test_extreme_values_follow_pytorch(backend, log):
    x = torch.randn(6, 40, device=DEVICE)
    x[0, 3] = 1e4  # dominates its row
    x[1, :5] = float("-inf")  # some -inf entries
    x[2] = float("-inf")  # all -inf: NaN row, as in PyTorch
    x[3, 7] = float("nan")  # NaN spreads over its row, as in PyTorch
    x[4, 1] = float("inf")
    x[5] = -1e4
    with fastattn.use_backend(backend):
        out = (fastattn.log_softmax if log else fastattn.softmax)(x)
    expected = (torch.log_softmax if log else torch.softmax)(x, -1)
    torch.testing.assert_close(out, expected, equal_nan=True)


@pytest.mark.parametrize("backend", backends())
def test_empty_and_scalar_inputs(backend):
    with fastattn.use_backend(backend):
        for shape, dim in [((0, 5), -1), ((3, 0), -1), ((0, 4, 3), 1), ((), 0)]:
            x = torch.randn(shape, device=DEVICE, requires_grad=True)
            y = fastattn.softmax(x, dim)
            torch.testing.assert_close(y, torch.softmax(x, dim))
            y.sum().backward()
            assert x.grad.shape == x.shape


@pytest.mark.parametrize("backend", backends())
def test_dtype_argument_and_inputs_untouched(backend):
    x = torch.randn(3, 50, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    mask = torch.randn(3, 50, device=DEVICE)
    x_before, mask_before = x.detach().clone(), mask.clone()
    with fastattn.use_backend(backend):
        y = fastattn.softmax(x, -1, torch.float32, mask=mask)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, R.softmax(x.float(), -1, mask=mask))
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16
    assert torch.equal(x.detach(), x_before) and torch.equal(mask, mask_before)


def test_bad_input():
    x = torch.randn(2, 3, 4, device=DEVICE)
    with pytest.raises(TypeError, match="input must have a floating-point dtype"):
        fastattn.softmax(torch.ones(3, dtype=torch.long))
    with pytest.raises(TypeError, match="input must be a torch.Tensor"):
        fastattn.softmax([1.0, 2.0])
    with pytest.raises(IndexError, match=r"dim=3 is out of range .* \[-3, 2\]"):
        fastattn.softmax(x, 3)
    with pytest.raises(TypeError, match="dim must be an int"):
        fastattn.softmax(x, 1.0)
    with pytest.raises(ValueError, match=r"mask of shape \(5,\) does not broadcast"):
        fastattn.softmax(x, mask=torch.ones(5, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 3, 4, 1\) does not broadcast"):
        fastattn.softmax(x, mask=torch.ones(2, 3, 4, 1, dtype=torch.bool, device=DEVICE))
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        fastattn.softmax(x, mask=torch.ones(4, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="dim must be the last one"):
        fastattn.softmax(x, 1, causal=True)
    with pytest.raises(ValueError, match="at least 2 dims"):
        fastattn.softmax(x[0, 0], causal=True)
    with pytest.raises(TypeError, match="dtype must be a floating-point"):
        fastattn.softmax(x, -1, torch.int64)
    with pytest.raises(ValueError, match="scale=inf is not allowed"):
        fastattn.softmax(x, scale=float("inf"))
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="mask is on cpu but input is on cuda"):
            fastattn.softmax(x, mask=torch.ones(4, dtype=torch.bool))


# Widening (read 16-bit, write float32/64 directly) and narrowing (cast first, as PyTorch) dtypes.
@pytest.mark.parametrize("dtypes", [
    (torch.bfloat16, torch.float32), (torch.float16, torch.float64),
    (torch.float32, torch.float64), (torch.float32, torch.bfloat16),
])
@pytest.mark.parametrize("backend", backends())
def test_dtype_argument_matches_pytorch(backend, dtypes):
    src, dst = dtypes
    x = (4 * torch.randn(5, 301, device=DEVICE)).to(src)
    if torch.finfo(dst).bits >= torch.finfo(src).bits:  # exact cast: same numbers as PyTorch
        with fastattn.use_backend(backend):
            y = fastattn.log_softmax(x, -1, dst)
        torch.testing.assert_close(y, torch.log_softmax(x, -1, dtype=dst))
    # Forward and the gradient (in the input's dtype) by the twice-PyTorch's-error rule.
    _compare(backend, True, x, dtype=dst)


# Rows broadcast along the reduced dim (column stride 0, as expand() gives), in the input and in
# the upstream gradient: the kernels must not take them for contiguous rows.
@pytest.mark.parametrize("log", [False, True])
@pytest.mark.parametrize("backend", backends("softmax"))
def test_broadcast_rows(backend, log):
    _compare(backend, log, (3 * torch.randn(4, 1, device=DEVICE)).expand(4, 37))
    fn = fastattn.log_softmax if log else fastattn.softmax
    spec = R.log_softmax if log else R.softmax
    x = 3 * torch.randn(4, 37, device=DEVICE)
    x_ours, x_pt, x_ref = _leaf(x), _leaf(x), _leaf(x, torch.float64)
    grad = torch.randn(4, 1, device=DEVICE, dtype=torch.float64).expand(4, 37)
    with fastattn.use_backend(backend):
        fn(x_ours, -1).backward(grad.float())
    spec(x_pt, -1).backward(grad.float())
    spec(x_ref, -1).backward(grad)
    assert_twice_error(x_ours.grad, x_ref.grad, x_pt.grad, "d input")


# The launchers' output buffer: a negative dim is the same dim counted from the end.
@pytest.mark.parametrize("dim", [0, 1, 2])
def test_row_output_negative_dim(dim):
    shape = torch.Size((3, 4, 5))
    pos = R.row_output(shape, dim, torch.float32, "cpu")
    neg = R.row_output(shape, dim - 3, torch.float32, "cpu")
    assert pos.shape == neg.shape == shape and pos.stride() == neg.stride()
