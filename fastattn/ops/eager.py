"""The eager fast path: run an op's implementation directly, under a ``torch.autograd.Function``
that shares the op's ``setup_context`` and ``backward``, instead of through its custom op.

A ``torch.library.custom_op`` call costs about 0.1 ms of Python per forward+backward on top of
the kernels (the dispatcher round trip, the generated autograd wrapper, pytree handling), which
is more than the kernels themselves take on small and mid-sized inputs. In plain eager mode on
plain tensors that machinery buys nothing, so :func:`call` skips it. Whenever something else may
be watching the call — ``torch.compile``/dynamo, FX tracing, a dispatch mode (fake tensors,
``FlopCounterMode``, AOT autograd's functionalization), a functorch transform (``vmap``,
``grad``), or a tensor subclass — the call goes through the registered custom op, so
``torch.compile``, ``opcheck`` and fake tensors see exactly one opaque op as before.

Both paths run the same implementation function with the same arguments, so they give bitwise
the same results.

The ``native`` backend goes one step further (:func:`native_autograd`): its C++ extension has a
differentiable op per fastattn op (``torch.ops.fastattn.native_softmax``, ...) whose autograd
is a C++ ``torch::autograd::Function`` around the same forward and backward kernels, so an eager
forward+backward runs no Python between the kernels (about 20 us less per call on CPU). Those
ops take gradients for the main inputs only: a mask or target that requires grad keeps the
Python autograd.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# torch >= 2.10 splits symbolic tracing out of is_fx_tracing (which now logs a warning).
fx_tracing = getattr(torch.fx._symbolic_trace, "is_fx_symbolic_tracing",
                     torch.fx._symbolic_trace.is_fx_tracing)

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_peek_functorch = torch._C._functorch.peek_interpreter_stack


def tracing() -> bool:
    """True under torch.compile/dynamo, FX symbolic tracing, a dispatch mode or a functorch
    transform: anything that must see the registered op rather than its implementation."""
    return (torch.compiler.is_compiling() or fx_tracing()
            or torch._C._len_torch_dispatch_stack() > 0 or _peek_functorch() is not None)


def eager(*tensors: torch.Tensor | None) -> bool:
    """True when a call on ``tensors`` (None entries ignored) may skip its custom op: eager mode
    (see :func:`tracing`) and every tensor a plain ``torch.Tensor`` or ``nn.Parameter``."""
    if tracing():
        return False
    for t in tensors:  # a loop, not all() over a generator: this runs on every call
        if t is not None and type(t) not in _PLAIN:
            return False
    return True


def eager_backward(*tensors: torch.Tensor | None) -> bool:
    """:func:`eager` for a backward pass: also needs grad mode off (no ``create_graph``), because
    the backward ops have no autograd of their own. With ``create_graph=True`` the backward goes
    through the custom op, which refuses to be differentiated instead of returning a gradient
    that silently ignores the second derivative."""
    return not torch.is_grad_enabled() and eager(*tensors)


def native_autograd(backend: str, tensors: tuple[torch.Tensor | None, ...],
                    no_grad: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """True when a call may run the ``native`` backend's differentiable C++ op: the backend is
    ``native``, :func:`eager` holds for ``tensors`` (every tensor argument), and none of
    ``no_grad`` (arguments the C++ autograd gives no gradient) requires grad."""
    if backend != "native" or not eager(*tensors):
        return False
    for t in no_grad:
        if t is not None and t.requires_grad:
            return False
    return True


def function(name: str, impl: Callable, setup_context: Callable,
             backward: Callable) -> type[torch.autograd.Function]:
    """A ``torch.autograd.Function`` named ``name`` that runs ``impl`` and then the
    ``setup_context``/``backward`` registered with the custom op.

    Forward takes ``ctx`` itself and calls ``setup_context`` (the old-style form): with a
    separate ``setup_context`` staticmethod, ``Function.apply`` binds the arguments through
    ``inspect.signature`` on every call, which costs more than the dispatch this path avoids."""

    def forward(ctx, *args):
        output = impl(*args)
        setup_context(ctx, args, output)
        return output

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Eager autograd of {name}: the custom op's setup_context and backward.",
        "forward": staticmethod(forward),
        "backward": staticmethod(backward),
    })


def call(op: Callable, impl: Callable, autograd: type[torch.autograd.Function],
         tensors: tuple[torch.Tensor | None, ...], *args: object) -> object:
    """Run ``op(*args)`` (the custom op), or the same computation without the dispatcher when
    :func:`eager` allows: ``autograd.apply(*args)`` when a gradient may be needed, else
    ``impl(*args)``. ``tensors`` are the tensor arguments among ``args``."""
    if not eager(*tensors):
        return op(*args)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return autograd.apply(*args)
    return impl(*args)
