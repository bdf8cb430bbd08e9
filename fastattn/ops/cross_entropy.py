"""``fastattn::cross_entropy_fwd`` (functional) and ``fastattn::cross_entropy_fwd_inplace``
(writes the gradient into the logits), with their autograd.

The forward op returns the loss, the per-token log-sum-exp and, when asked, the gradient of the
loss for a unit upstream gradient; backward only scales that gradient by the upstream one (in
place unless the graph is retained), and skips even that when the upstream gradient is exactly
1 (``loss.backward()``), so a training step reads the logits in forward and writes their
gradient once. Inputs reach these ops with
classes on dim 1 and at least 2 dims (``fastattn.functional`` turns ``(C,)`` into ``(1, C)``).

Mutable custom ops cannot carry registered autograd, so the in-place variant is wrapped in a
``torch.autograd.Function``; the functional op uses ``register_autograd``. Eager calls on plain
tensors run the same implementations without the custom ops' dispatch, and the native
backend's in its C++ autograd op (``fastattn.ops.eager``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn import reference
from fastattn.backends import launcher
from fastattn.ops import eager


def _check_class_indices(input: Tensor, target: Tensor, ignore_index: int, backend: str
                         ) -> None:
    """Raise IndexError for a class index outside [0, C) that is not ``ignore_index``.

    Runs inside the op (so also under ``torch.compile``), on the host side of the launch, so a
    bad index can never become a device-side assert or an out-of-bounds read. The native CPU
    kernel checks each index as it reads it (and raises IndexError itself), and the numba
    launcher in one compiled loop before its kernel, so it is skipped for both: on small inputs
    these five tensor ops cost as much as the kernel."""
    if target.is_floating_point() or target.numel() == 0:
        return
    if backend == "numba" or (backend == "native" and input.device.type == "cpu"):
        return
    num_classes = input.shape[1]
    bad = (target != ignore_index) & ((target < 0) | (target >= num_classes))
    if bool(bad.any()):
        raise reference.class_index_error(int(target[bad][0]), num_classes, ignore_index)


def _loss_shape(input: Tensor, reduction: int) -> tuple[int, ...]:
    return tuple(input.shape[:1] + input.shape[2:]) if reduction == 0 else ()


def _cross_entropy_fwd(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    compute_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    _check_class_indices(input, target, ignore_index, backend)
    grad = None
    if compute_grad:
        grad = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    fwd = launcher(backend, "cross_entropy", "cross_entropy_fwd")
    loss, lse = fwd(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                    softcap, grad)
    return loss, lse, input.new_empty(0) if grad is None else grad


cross_entropy_fwd = torch.library.custom_op("fastattn::cross_entropy_fwd", _cross_entropy_fwd,
                                            mutates_args=())


@cross_entropy_fwd.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
      compute_grad, backend):
    acc = reference.accumulate_dtype(input.dtype)
    loss = input.new_empty(_loss_shape(input, reduction), dtype=acc)
    lse = input.new_empty(_loss_shape(input, 0), dtype=torch.float32)
    grad = input.new_empty(input.shape if compute_grad else (0,))
    return loss, lse, grad


def _cross_entropy_fwd_inplace(
    input: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    reduction: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float,
    backend: str,
) -> tuple[Tensor, Tensor]:
    _check_class_indices(input, target, ignore_index, backend)
    fwd = launcher(backend, "cross_entropy", "cross_entropy_fwd")
    return fwd(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
               input)


cross_entropy_fwd_inplace = torch.library.custom_op(
    "fastattn::cross_entropy_fwd_inplace", _cross_entropy_fwd_inplace, mutates_args=("input",))


@cross_entropy_fwd_inplace.register_fake
def _(input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, backend):
    acc = reference.accumulate_dtype(input.dtype)
    loss = input.new_empty(_loss_shape(input, reduction), dtype=acc)
    return loss, input.new_empty(_loss_shape(input, 0), dtype=torch.float32)


def _is_one(grad_loss: Tensor) -> bool:
    """True when the upstream gradient is the scalar 1. Eager only: while tracing (dynamo, or
    AOT autograd's fake/functional tensors) the data-dependent check would break the graph, so
    the scale is always applied there."""
    if eager.tracing() or type(grad_loss) is not torch.Tensor or grad_loss.numel() != 1:
        return False
    return grad_loss.item() == 1


def _upstream(grad_loss: Tensor, reduction: int) -> Tensor:
    """The upstream gradient shaped to broadcast against ``(N, C, d1, ...)``."""
    return grad_loss.unsqueeze(1) if reduction == 0 else grad_loss


# True while a backward runs with retain_graph (absent from older torch: then never in place).
_keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)


def _scaled(grad: Tensor, grad_loss: Tensor, reduction: int) -> Tensor:
    """The saved gradient ``grad`` (for a unit upstream gradient) times ``grad_loss``.

    In place when nothing can read the unscaled buffer again: an eager backward that frees the
    graph (no ``retain_graph``; with it, a second backward must find the buffer unscaled). Then
    backward allocates nothing logits-sized whatever the upstream gradient (a loss divided for
    gradient accumulation, or scaled by a GradScaler)."""
    if _is_one(grad_loss):
        return grad
    upstream = _upstream(grad_loss, reduction)
    if _keep_graph is not None and not _keep_graph() and eager.eager_backward(grad, upstream):
        return grad.mul_(upstream)
    return grad * upstream


def _setup_context(ctx, inputs, output):
    input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap, \
        compute_grad, backend = inputs
    loss, lse, grad = output
    ctx.mark_non_differentiable(lse, grad)
    ctx.set_materialize_grads(False)  # else backward gets a zero-filled (N, C) for `grad`
    target_grad = target.is_floating_point() and target.requires_grad
    ctx.save_for_backward(grad, input if target_grad else None, weight)
    ctx.args = (reduction, label_smoothing, softcap, compute_grad, target.dtype)


NO_DOUBLE_BACKWARD = (
    "fastattn.cross_entropy has no second derivative: its backward scales the gradient "
    "computed in forward, so backward with create_graph=True (double backward, Hessians) is "
    "not supported; use torch.nn.functional.cross_entropy there")  # as the C++ autograd's


def _check_not_create_graph() -> None:
    """Raise for an eager backward with ``create_graph=True``: the gradient it returns would
    not depend on the logits, so its own derivative would silently miss the Hessian. (Traced
    backward graphs, under AOT autograd, run with grad mode on and are not differentiated.)"""
    if torch.is_grad_enabled() and not eager.tracing():
        raise RuntimeError(NO_DOUBLE_BACKWARD)


def _backward(ctx, grad_loss, grad_lse, grad_grad):
    _check_not_create_graph()
    grad, input, weight = ctx.saved_tensors
    reduction, label_smoothing, softcap, compute_grad, target_dtype = ctx.args
    grad_input = grad_target = None
    if ctx.needs_input_grad[0]:
        if not compute_grad:
            raise RuntimeError("fastattn::cross_entropy_fwd ran with compute_grad=False, so it "
                               "has no gradient for input")
        grad_input = _scaled(grad, grad_loss, reduction)
    if ctx.needs_input_grad[1]:
        per_token = reference.cross_entropy_target_grad(input, weight, label_smoothing, softcap)
        upstream = _upstream(grad_loss, reduction)
        if reduction == 1:
            upstream = upstream * (input.shape[1] / max(input.numel(), 1))
        grad_target = (per_token * upstream).to(target_dtype)
    return grad_input, grad_target, None, None, None, None, None, None, None, None


cross_entropy_fwd.register_autograd(_backward, setup_context=_setup_context)
_CrossEntropy = eager.function("_CrossEntropy", _cross_entropy_fwd, _setup_context, _backward)


class _CrossEntropyInplace(torch.autograd.Function):
    """Autograd for ``cross_entropy_fwd_inplace``: the gradient lives in the input's memory."""

    @staticmethod
    def forward(ctx, input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                softcap, backend):
        args = (input, target, weight, ignore_index, reduction, label_smoothing, z_loss, softcap,
                backend)
        if eager.eager(input, target, weight):
            loss, lse = _cross_entropy_fwd_inplace(*args)
            torch.autograd.graph.increment_version(input)  # as the mutating op would
        else:
            loss, lse = cross_entropy_fwd_inplace(*args)
        ctx.save_for_backward(input)
        ctx.reduction = reduction
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)
        return loss, lse

    @staticmethod
    def backward(ctx, grad_loss, grad_lse):
        _check_not_create_graph()
        (grad,) = ctx.saved_tensors
        return (_scaled(grad, grad_loss, ctx.reduction),) + (None,) * 8


def cross_entropy(input, target, weight, ignore_index, reduction, label_smoothing, z_loss,
                  softcap, inplace_backward, backend):
    """Checked arguments in, ``(loss, lse)`` out; ``input`` is ``(N, C, d1, ...)``."""
    compute_grad = input.requires_grad and torch.is_grad_enabled()
    args = (ignore_index, reduction, label_smoothing, z_loss, softcap)
    if inplace_backward and compute_grad:
        return _CrossEntropyInplace.apply(input, target, weight, *args, backend)
    if eager.native_autograd(backend, (input, target, weight), no_grad=(target,)):
        _check_class_indices(input, target, ignore_index, backend)
        return launcher(backend, "cross_entropy", "cross_entropy")(input, target, weight, *args)
    loss, lse, _ = eager.call(cross_entropy_fwd, _cross_entropy_fwd, _CrossEntropy,
                              (input, target, weight), input, target, weight, *args, compute_grad,
                              backend)
    return loss, lse
