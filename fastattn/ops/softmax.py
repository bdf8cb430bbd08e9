"""``fastattn::softmax_fwd`` / ``fastattn::softmax_bwd`` and the autograd that joins them.

Both ops take the backend name as their last argument: the backend is chosen per call in
``fastattn.backends`` and travels with the op, so ``torch.compile`` sees one opaque op whatever
runs inside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.backends import launcher
from fastattn.reference import row_output


@torch.library.custom_op("fastattn::softmax_fwd", mutates_args=())
def softmax_fwd(
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


@softmax_fwd.register_fake
def _(input, dim, scale, mask, causal, log, out_dtype, backend):
    return row_output(input.shape, dim, out_dtype, input.device)


@torch.library.custom_op("fastattn::softmax_bwd", mutates_args=())
def softmax_bwd(
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
    if ctx.needs_input_grad[3]:
        # An additive mask that requires grad receives d(loss)/d(scaled input), unscaled.
        grad_z = softmax_bwd(grad, output, dim, 1.0, mask, causal, log, input_dtype, backend)
        grad_mask = grad_z.sum_to_size(mask.shape).to(mask.dtype)
        if ctx.needs_input_grad[0]:
            grad_input = grad_z * scale
    elif ctx.needs_input_grad[0]:
        grad_input = softmax_bwd(grad, output, dim, scale, mask, causal, log, input_dtype, backend)
    return grad_input, None, None, grad_mask, None, None, None, None


softmax_fwd.register_autograd(_backward, setup_context=_setup_context)


def softmax(input, dim, scale, mask, causal, log, out_dtype, backend):
    """Checked arguments in, (log-)softmax out; ``scale`` None means 1."""
    scale = 1.0 if scale is None else scale
    return softmax_fwd(input, dim, scale, mask, causal, log, out_dtype, backend)
