"""``fastattn::softmax_fwd`` / ``fastattn::softmax_bwd`` and the autograd that joins them.

Both ops take the backend name as their last argument: the backend is chosen per call in
``fastattn.backends`` and travels with the op, so ``torch.compile`` sees one opaque op whatever
runs inside it. Eager calls on plain tensors run the same implementations without the custom
op's dispatch, and the native backend's in its C++ autograd op (``fastattn.ops.eager``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.backends import launcher
from fastattn.ops import eager
from fastattn.reference import row_output


def _softmax_fwd(
    input: Tensor,
    dim: int,
    scale: float,
    mask: Tensor | None,
    causal: bool,
    log: bool,
    out_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    fwd = launcher(backend, "softmax", "softmax_fwd")
    return fwd(input, dim, scale, mask, causal, log, out_dtype)


softmax_fwd = torch.library.custom_op("fastattn::softmax_fwd", _softmax_fwd, mutates_args=())


@softmax_fwd.register_fake
def _(input, dim, scale, mask, causal, log, out_dtype, backend):
    return row_output(input.shape, dim, out_dtype, input.device)


def _softmax_bwd(
    grad_output: Tensor,
    output: Tensor,
    dim: int,
    scale: float,
    mask: Tensor | None,
    causal: bool,
    log: bool,
    input_dtype: torch.dtype,
    backend: str,
) -> Tensor:
    bwd = launcher(backend, "softmax", "softmax_bwd")
    return bwd(grad_output, output, dim, scale, mask, causal, log, input_dtype)


softmax_bwd = torch.library.custom_op("fastattn::softmax_bwd", _softmax_bwd, mutates_args=())


@softmax_bwd.register_fake
def _(grad_output, output, dim, scale, mask, causal, log, input_dtype, backend):
    return row_output(output.shape, dim, input_dtype, output.device)


def _setup_context(ctx, inputs, output):
    input, dim, scale, mask, causal, log, out_dtype, backend = inputs
    ctx.save_for_backward(output, mask)
    ctx.args = (dim, scale, causal, log, input.dtype, backend)


def _backward(ctx, grad):
    output, mask = ctx.saved_tensors
    dim, scale, causal, log, input_dtype, backend = ctx.args
    grad_input = grad_mask = None
    bwd = _softmax_bwd if eager.eager_backward(grad, output, mask) else softmax_bwd
    if ctx.needs_input_grad[3]:
        # An additive mask that requires grad receives d(loss)/d(scaled input), unscaled.
        grad_z = bwd(grad, output, dim, 1.0, mask, causal, log, input_dtype, backend)
        grad_mask = grad_z.sum_to_size(mask.shape).to(mask.dtype)
        if ctx.needs_input_grad[0]:
            grad_input = grad_z * scale
    elif ctx.needs_input_grad[0]:
        grad_input = bwd(grad, output, dim, scale, mask, causal, log, input_dtype, backend)
    return grad_input, None, None, grad_mask, None, None, None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)
_Softmax = eager.function("_Softmax", _softmax_fwd, _setup_context, _backward)


def softmax(input, dim, scale, mask, causal, log, out_dtype, backend):
    """Checked arguments in, (log-)softmax out; ``scale`` None means 1."""
    scale = 1.0 if scale is None else scale
    if eager.native_autograd(backend, (input, mask), no_grad=(mask,)):
        return launcher(backend, "softmax", "softmax")(input, dim, scale, mask, causal, log,
                                                       out_dtype)
    return eager.call(softmax_fwd, _softmax_fwd, _Softmax, (input, mask),
                      input, dim, scale, mask, causal, log, out_dtype, backend)
