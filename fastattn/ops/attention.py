"""``fastattn::attention_fwd`` / ``fastattn::attention_bwd`` and the autograd that joins them.

Both ops take attention in the normalised form of ``fastattn.reference`` (q (B, Hq, L, D),
k (B, Hk, S, D), v (B, Hk, S, Dv), mask broadcast to (B, Hq, L, S) as a view, positional
masking as a window) and the backend name last. Forward returns the output and the per-row
log-sum-exp, which backward uses to recompute the probabilities tile by tile. Dropout travels
as a seed tensor drawn from PyTorch's generator (``dropout_seed``), so backward regenerates the
forward's mask and ``torch.manual_seed`` reproduces both. Eager calls on plain tensors run the
same implementations without the custom ops' dispatch, and the native backend's in its C++
autograd op (``fastattn.ops.eager``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastattn.backends import fixed_order, launcher, requested_backend
from fastattn.ops import eager
from fastattn.reference import accumulate_dtype, attention_output


def dropout_seed(device: torch.device) -> Tensor:
    """A fresh dropout seed (int64, shape (1,)) from PyTorch's generator for ``device``."""
    return torch.randint(0, 2**62, (1,), dtype=torch.int64, device=device)


def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    scale: float,
    window_left: int,
    window_right: int,
    align_bottom: bool,
    softcap: float,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor]:
    fwd = launcher(backend, "attention", "attention_fwd")
    return fwd(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
               softcap)


attention_fwd = torch.library.custom_op("fastattn::attention_fwd", _attention_fwd,
                                        mutates_args=())


@attention_fwd.register_fake
def _(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom, softcap,
      deterministic, backend):
    out = attention_output(q, v.shape[-1], q.dtype)
    return out, q.new_empty(q.shape[:3], dtype=torch.float32)


def _attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    mask: Tensor | None,
    seed: Tensor | None,
    dropout_p: float,
    scale: float,
    window_left: int,
    window_right: int,
    align_bottom: bool,
    softcap: float,
    deterministic: bool,
    mask_grad: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    bwd = launcher(backend, "attention", "attention_bwd")
    return bwd(grad_out, q, k, v, out, lse, mask, seed, dropout_p, scale, window_left,
               window_right, align_bottom, softcap, deterministic, mask_grad)


attention_bwd = torch.library.custom_op("fastattn::attention_bwd", _attention_bwd,
                                        mutates_args=())


@attention_bwd.register_fake
def _(grad_out, q, k, v, out, lse, mask, seed, dropout_p, scale, window_left, window_right,
      align_bottom, softcap, deterministic, mask_grad, backend):
    B, H, L, _ = q.shape
    shape = (B, H, L, k.shape[2]) if mask_grad else (0,)
    dmask = q.new_empty(shape, dtype=accumulate_dtype(q.dtype))
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), dmask


def _setup_context(ctx, inputs, output):
    q, k, v, mask, seed, *args = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.set_materialize_grads(False)  # no zero-filled gradient for lse
    ctx.save_for_backward(q, k, v, out, lse, mask, seed)
    ctx.args = args  # dropout_p, scale, left, right, align_bottom, softcap, deterministic, backend


def _delta_wants_float32(out: Tensor, q: Tensor, backend: str) -> bool:
    """Whether backward should recompute a 16-bit ``out`` in float32 for the mask's gradient.

    The fused backward forms ds_ij = p_ij (dp_ij - delta_i) with delta_i = do_i . o_i from the
    saved output. Summed over the keys, which is what a mask broadcast along them gets as its
    gradient, that is delta_i(exact) - delta_i(used): 0 up to the output's rounding. With a
    16-bit output that rounding alone was past twice PyTorch's error for about 1 in 100 (L, 1)
    masks. So when the mask wants a gradient, the fused backends get the output again in
    float32 (one more forward, only then). The torch backend takes delta as rowsum(p dP) in
    the accumulation dtype, never from the output; the native CUDA kernels take 16-bit inputs
    only, and keep the saved output."""
    if out.dtype not in (torch.float16, torch.bfloat16):
        return False
    return backend in ("numba", "triton") or (backend == "native" and q.device.type == "cpu")


def _backward(ctx, grad_out, _grad_lse):
    q, k, v, out, lse, mask, seed = ctx.saved_tensors
    dropout_p, scale, left, right, align_bottom, softcap, deterministic, backend = ctx.args
    mask_grad = ctx.needs_input_grad[3]
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    run_eager = eager.eager_backward(grad_out, q, k, v, mask)
    if mask_grad and _delta_wants_float32(out, q, backend):
        fwd = _attention_fwd if run_eager else attention_fwd
        out = fwd(q.float(), k.float(), v.float(), mask, seed, dropout_p, scale, left, right,
                  align_bottom, softcap, deterministic, backend)[0]
    bwd = _attention_bwd if run_eager else attention_bwd
    dq, dk, dv, dmask = bwd(grad_out, q, k, v, out, lse, mask, seed, dropout_p, scale, left,
                            right, align_bottom, softcap, deterministic, mask_grad, backend)
    grad_mask = dmask.to(mask.dtype) if mask_grad else None
    return (dq, dk, dv, grad_mask) + (None,) * 9


attention_fwd.register_autograd(_backward, setup_context=_setup_context)
_Attention = eager.function("_Attention", _attention_fwd, _setup_context, _backward)


def serving_backend(backend: str, device_type: str, q: Tensor, k: Tensor, v: Tensor,
                    mask: Tensor | None, dropout_p: float, softcap: float) -> str:
    """``backend``, unless a tuned table picked ``native`` for tensors on ``device_type`` "cuda"
    and its CUDA kernels cannot serve this call (``fastattn.native.attention.cuda_unsupported``,
    which reads shapes and dtypes only: a float32 call, say): then the fixed order's backend.
    A table is the only way ``native`` is chosen for CUDA tensors without a request (the fixed
    order never names it there); an explicit request is left alone, to raise."""
    if backend != "native" or device_type != "cuda" or requested_backend()[0] is not None:
        return backend
    from fastattn.native.attention import cuda_unsupported

    if cuda_unsupported(q, k, v, mask, dropout_p, softcap) is None:
        return backend
    return fixed_order(device_type, "attention")


def attention(q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
              softcap, deterministic, backend):
    """Checked, normalised arguments in, ``(out, lse)`` out."""
    if backend == "native" and q.is_cuda:
        backend = serving_backend(backend, "cuda", q, k, v, mask, dropout_p, softcap)
    if eager.native_autograd(backend, (q, k, v, mask, seed), no_grad=(mask,)):
        return launcher(backend, "attention", "attention")(
            q, k, v, mask, seed, dropout_p, scale, window_left, window_right, align_bottom,
            softcap)
    return eager.call(attention_fwd, _attention_fwd, _Attention, (q, k, v, mask, seed),
                      q, k, v, mask, seed, dropout_p, scale, window_left, window_right,
                      align_bottom, softcap, deterministic, backend)
