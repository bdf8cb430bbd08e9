"""Drop-in layers: the constructor arguments and ``state_dict`` keys of their ``torch.nn``
twins, one call into ``fastattn.functional`` in ``forward``. fastattn's extras are
keyword-only constructor arguments. :func:`swap` puts them into an existing model."""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as TF
from torch import Tensor
from torch.nn.init import constant_, xavier_normal_, xavier_uniform_
from torch.nn.modules.linear import NonDynamicallyQuantizableLinear
from torch.nn.modules.loss import _Reduction
from torch.nn.parameter import Parameter

from fastattn import functional as F

__all__ = ["Softmax", "LogSoftmax", "CrossEntropyLoss", "MultiheadAttention", "swap"]


def _legacy_softmax_dim(name: str, ndim: int) -> int:
    warnings.warn(f"Implicit dimension choice for {name} has been deprecated. Change the call "
                  "to include dim=X as an argument.", stacklevel=3)
    return 0 if ndim in (0, 1, 3) else 1


class _SoftmaxBase(torch.nn.Module):
    _log = False

    def __init__(self, dim: int | None = None, *, scale: float | None = None,
                 causal: bool = False) -> None:
        super().__init__()
        self.dim = None if dim is None else F.check_index("dim", dim, "an int or None")
        self.scale = scale
        self.causal = causal

    def __setstate__(self, state):  # pickles of torch.nn.Softmax may lack these
        super().__setstate__(state)
        self.__dict__.setdefault("dim", None)
        self.__dict__.setdefault("scale", None)
        self.__dict__.setdefault("causal", False)

    def forward(self, input: Tensor, mask: Tensor | None = None) -> Tensor:
        fn = F.log_softmax if self._log else F.softmax
        dim = self.dim
        if dim is None:
            dim = _legacy_softmax_dim("log_softmax" if self._log else "softmax", input.ndim)
        return fn(input, dim, scale=self.scale, mask=mask, causal=self.causal)

    def extra_repr(self) -> str:
        extras = "".join(f", {k}={getattr(self, k)}" for k in ("scale", "causal")
                         if getattr(self, k) not in (None, False))
        return f"dim={self.dim}{extras}"


class Softmax(_SoftmaxBase):
    """Drop-in for ``torch.nn.Softmax(dim)``; extras ``scale`` and ``causal``, and an optional
    ``mask`` in ``forward`` (see :func:`fastattn.softmax`)."""


class LogSoftmax(_SoftmaxBase):
    """Drop-in for ``torch.nn.LogSoftmax(dim)``; extras as :class:`Softmax`."""

    _log = True


class CrossEntropyLoss(torch.nn.Module):
    """Drop-in for ``torch.nn.CrossEntropyLoss``: same constructor (``size_average`` and
    ``reduce`` included, with PyTorch's deprecation rules), ``weight`` kept as a buffer so the
    ``state_dict`` keys match. Extras: ``z_loss``, ``softcap``, ``inplace_backward`` (see
    :func:`fastattn.cross_entropy`)."""

    def __init__(
        self,
        weight: Tensor | None = None,
        size_average=None,
        ignore_index: int = -100,
        reduce=None,
        reduction: str = "mean",
        label_smoothing: float = 0.0,
        *,
        z_loss: float = 0.0,
        softcap: float | None = None,
        inplace_backward: bool = False,
    ) -> None:
        super().__init__()
        if size_average is not None or reduce is not None:
            reduction = _Reduction.legacy_get_string(size_average, reduce)
        F.check_reduction(reduction)
        self.register_buffer("weight", weight)
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.label_smoothing = label_smoothing
        self.z_loss = z_loss
        self.softcap = softcap
        self.inplace_backward = inplace_backward

    def forward(self, input: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(
            input, target, self.weight, self.ignore_index, self.reduction, self.label_smoothing,
            z_loss=self.z_loss, softcap=self.softcap, inplace_backward=self.inplace_backward,
        )


# --- multi-head attention ----------------------------------------------------------------------


class _InputError(ValueError, AssertionError):
    """Bad input: a ``ValueError`` naming the argument (fastattn's rule) that is also the
    ``AssertionError`` ``torch.nn.MultiheadAttention`` raises for the same input."""


class _InputRuntimeError(ValueError, RuntimeError):
    """As :class:`_InputError`, where ``torch.nn.MultiheadAttention`` raises ``RuntimeError``."""


def _keep_own_forward(module: torch.nn.Module, args: tuple) -> None:
    """No-op forward pre-hook on every fastattn ``MultiheadAttention``.

    ``nn.TransformerEncoderLayer`` in eval mode without grad takes an inference fast path,
    ``torch._transformer_encoder_layer_fwd``, that reads ``self_attn``'s weights and never calls
    its ``forward``; it skips that path when a submodule has hooks. This hook is how a swapped
    encoder layer keeps running fastattn's attention."""
    return None


def _same_views(fn, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``fn`` applied to each input, keeping ``query is key`` / ``key is value`` identities (they
    choose the fused input projection, as in PyTorch)."""
    q = fn(query)
    k = q if key is query else fn(key)
    v = q if value is query else k if value is key else fn(value)
    return q, k, v


def _append_keys(mask: Tensor, n: int, allowed: bool | float) -> Tensor:
    """``mask`` with ``n`` more key columns (last dim) set to ``allowed``: bias_k/v, zero_attn."""
    if n == 0:
        return mask
    extra = mask.new_full((*mask.shape[:-1], n), allowed)
    return torch.cat([mask, extra], -1)


class MultiheadAttention(torch.nn.Module):
    """Drop-in for ``torch.nn.MultiheadAttention``: the same constructor, attributes,
    parameters and ``state_dict`` keys (``in_proj_weight``, or ``q_proj_weight``,
    ``k_proj_weight`` and ``v_proj_weight`` when ``kdim``/``vdim`` differ from ``embed_dim``;
    ``in_proj_bias``; ``out_proj.weight``/``.bias`` on a ``NonDynamicallyQuantizableLinear``;
    ``bias_k``, ``bias_v``), the same initialisation (one seed gives the same weights), and the
    same ``forward`` with PyTorch's semantics: unbatched 2-d inputs, ``batch_first``,
    ``key_padding_mask`` ``(N, S)`` bool (**True = ignore**) or float (added), ``attn_mask``
    ``(L, S)`` or ``(N * num_heads, L, S)`` bool (**True = not allowed**, the inverse of
    :func:`fastattn.scaled_dot_product_attention`'s keep-mask) or float (added), the two masks
    merged (a float mask in either makes the merged mask additive), ``is_causal`` as a hint
    that ``attn_mask`` is causal (it requires ``attn_mask``, as in PyTorch, and is used instead
    of it only when there is no ``key_padding_mask`` and ``need_weights=False``),
    ``add_bias_kv``, ``add_zero_attn``, and dropout on the attention probabilities only in
    training mode. It is not a subclass of the torch module (so ``isinstance(m,
    torch.nn.MultiheadAttention)`` is False) and has no inference fast path or nested-tensor
    input.

    ``need_weights=False``: the attention is one call to
    :func:`fastattn.scaled_dot_product_attention` (backend chosen by fastattn's rules), dropout
    included. ``need_weights=True`` (PyTorch's default) asks for the probabilities, which a fused
    kernel never materialises, so that path computes them explicitly: ``softmax((q / sqrt(d))
    k^T + mask)`` with :func:`fastattn.softmax`, dropout with ``torch.nn.functional.dropout``,
    then ``probs @ v``; the returned weights are those probabilities (after dropout, as in
    PyTorch), averaged over heads when ``average_attn_weights``. Pass ``need_weights=False`` for
    speed. Dropout draws different random numbers from PyTorch's layer.

    A query row that sees no key (every key masked) gives attention 0 on both paths, so its
    output is ``out_proj.bias`` (or 0), its weights are 0 and its gradients finite. PyTorch gives
    that too with ``need_weights=False``, but NaN (output and weights) with ``need_weights=True``
    and on its inference fast path.

    Bad arguments raise ``ValueError``/``TypeError`` naming them. Where PyTorch raises
    ``AssertionError`` (e.g. ``embed_dim`` not divisible by ``num_heads``, masks of the wrong
    rank) or ``RuntimeError`` (``is_causal`` without ``attn_mask``, masks of the wrong shape),
    the ``ValueError`` raised is also an instance of that class. ``dropout`` must be in [0, 1)
    (PyTorch also accepts 1).
    """

    __constants__ = ["batch_first"]
    bias_k: Tensor | None
    bias_v: Tensor | None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        dropout: float = 0.0,
        bias: bool = True,
        add_bias_kv: bool = False,
        add_zero_attn: bool = False,
        kdim: int | None = None,
        vdim: int | None = None,
        batch_first: bool = False,
        device=None,
        dtype=None,
    ) -> None:
        embed_dim = F.check_index("embed_dim", embed_dim)
        num_heads = F.check_index("num_heads", num_heads)
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got "
                             f"embed_dim={embed_dim} and num_heads={num_heads}")
        if embed_dim % num_heads:
            raise _InputError(f"embed_dim={embed_dim} must be divisible by num_heads={num_heads} "
                              "(each head gets embed_dim // num_heads features)")
        kdim = embed_dim if kdim is None else F.check_index("kdim", kdim, "an int or None")
        vdim = embed_dim if vdim is None else F.check_index("vdim", vdim, "an int or None")
        if kdim <= 0 or vdim <= 0:
            raise ValueError(f"kdim and vdim must be greater than 0, got kdim={kdim} and "
                             f"vdim={vdim}")
        p = F._check_scale("dropout", dropout)
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout={dropout} is not allowed; it must be in [0, 1)")
        factory_kwargs = {"device": device, "dtype": dtype}
        super().__init__()
        self.embed_dim = embed_dim
        self.kdim = kdim
        self.vdim = vdim
        self._qkv_same_embed_dim = kdim == embed_dim and vdim == embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.batch_first = batch_first
        self.head_dim = embed_dim // num_heads
        # Parameters in PyTorch's order, so state_dict keys and seeded initialisation match.
        if self._qkv_same_embed_dim:
            self.in_proj_weight = Parameter(torch.empty((3 * embed_dim, embed_dim),
                                                        **factory_kwargs))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.q_proj_weight = Parameter(torch.empty((embed_dim, embed_dim), **factory_kwargs))
            self.k_proj_weight = Parameter(torch.empty((embed_dim, kdim), **factory_kwargs))
            self.v_proj_weight = Parameter(torch.empty((embed_dim, vdim), **factory_kwargs))
            self.register_parameter("in_proj_weight", None)
        if bias:
            self.in_proj_bias = Parameter(torch.empty(3 * embed_dim, **factory_kwargs))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias,
                                                        **factory_kwargs)
        if add_bias_kv:
            self.bias_k = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
            self.bias_v = Parameter(torch.empty((1, 1, embed_dim), **factory_kwargs))
        else:
            self.bias_k = self.bias_v = None
        self.add_zero_attn = add_zero_attn
        self._reset_parameters()
        self.register_forward_pre_hook(_keep_own_forward)

    def _reset_parameters(self) -> None:
        if self._qkv_same_embed_dim:
            xavier_uniform_(self.in_proj_weight)
        else:
            xavier_uniform_(self.q_proj_weight)
            xavier_uniform_(self.k_proj_weight)
            xavier_uniform_(self.v_proj_weight)
        if self.in_proj_bias is not None:
            constant_(self.in_proj_bias, 0.0)
            constant_(self.out_proj.bias, 0.0)
        if self.bias_k is not None:
            xavier_normal_(self.bias_k)
        if self.bias_v is not None:
            xavier_normal_(self.bias_v)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``(attn_output, attn_weights)`` as ``torch.nn.MultiheadAttention.forward``: the output
        is ``(L, E)`` unbatched, ``(L, N, E)`` or ``(N, L, E)`` with ``batch_first``; the weights
        are None unless ``need_weights``, else ``(N, L, S)`` averaged over heads or ``(N,
        num_heads, L, S)`` (without ``N`` when unbatched)."""
        batched = self._check_inputs(query, key, value, key_padding_mask, attn_mask, is_causal)
        if not batched:
            query, key, value = _same_views(lambda t: t.unsqueeze(0), query, key, value)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)  # (1, S)
        elif not self.batch_first:
            query, key, value = _same_views(lambda t: t.transpose(0, 1), query, key, value)
        # query (B, L, Eq), key (B, S, Ek), value (B, S, Ev)
        B, L, E = query.shape
        S, H = key.shape[1], self.num_heads
        self._check_masks(key_padding_mask, attn_mask, B, L, S)
        q, k, v = self._project(query, key, value)  # (B, L, E), (B, S, E), (B, S, E)
        extra = 0
        if self.bias_k is not None and self.bias_v is not None:
            k = torch.cat([k, self.bias_k.expand(B, 1, E)], 1)  # (B, S + 1, E)
            v = torch.cat([v, self.bias_v.expand(B, 1, E)], 1)
            extra += 1
        if self.add_zero_attn:  # a zero key and value (zero in every head)
            k = torch.cat([k, k.new_zeros(B, 1, E)], 1)
            v = torch.cat([v, v.new_zeros(B, 1, E)], 1)
            extra += 1
        q = q.unflatten(-1, (H, self.head_dim)).transpose(1, 2)  # (B, H, L, Dh)
        k = k.unflatten(-1, (H, self.head_dim)).transpose(1, 2)  # (B, H, S', Dh)
        v = v.unflatten(-1, (H, self.head_dim)).transpose(1, 2)  # (B, H, S', Dh)
        # PyTorch uses the is_causal hint instead of attn_mask only on its SDPA path without a
        # padding mask; everywhere else attn_mask itself is applied.
        causal = bool(is_causal) and key_padding_mask is None and not need_weights
        mask = None if causal else self._merged_mask(
            attn_mask, key_padding_mask, B, L, S, extra, query.dtype)
        dropout_p = float(self.dropout) if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * math.sqrt(1.0 / self.head_dim)) @ k.transpose(-2, -1)  # (B, H, L, S')
            weights = F.softmax(scores, -1, mask=mask)
            if dropout_p > 0:
                weights = TF.dropout(weights, dropout_p)
            out = weights @ v  # (B, H, L, Dh)
        else:
            out = F.scaled_dot_product_attention(q, k, v, mask, dropout_p, causal)  # (B,H,L,Dh)
        if batched and not self.batch_first:
            out = out.permute(2, 0, 1, 3).reshape(L, B, E)  # (L, B, E)
        else:
            out = out.permute(0, 2, 1, 3).reshape(B, L, E)  # (B, L, E)
        out = TF.linear(out, self.out_proj.weight, self.out_proj.bias)
        if weights is not None and average_attn_weights:
            weights = weights.mean(1)  # (B, L, S')
        if not batched:
            out = out.squeeze(0)  # (L, E)
            weights = None if weights is None else weights.squeeze(0)
        return out, weights

    def _check_inputs(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> bool:
        """PyTorch's checks on ranks, dtypes and embedding dims; True for batched input."""
        for name, t in (("query", query), ("key", key), ("value", value)):
            F._check_float_tensor(name, t)
            if t.is_nested:
                raise _InputError(
                    f"{name} is a nested tensor; fastattn.nn.MultiheadAttention takes padded "
                    "tensors and a key_padding_mask (PyTorch takes nested tensors only on its "
                    "inference fast path). In nn.TransformerEncoder set use_nested_tensor=False "
                    "(fastattn.swap does)")
        if query.ndim not in (2, 3):
            raise _InputError(f"query must be 2-d (L, E) unbatched or 3-d batched, got a "
                              f"{query.ndim}-d tensor")
        batched = query.ndim == 3
        for name, t in (("key", key), ("value", value)):
            if t.ndim != query.ndim:
                raise _InputError(f"{name} must be {query.ndim}-d like query, got {t.ndim}-d")
        kpm_ndim = 2 if batched else 1
        for name, m, ndims in (("key_padding_mask", key_padding_mask, (kpm_ndim,)),
                               ("attn_mask", attn_mask, (2, 3))):
            if m is None:
                continue
            F._check_tensor(name, m)
            if m.dtype != torch.bool and not m.is_floating_point():
                raise _InputError(f"{name} must be bool (True = masked out) or floating "
                                  f"(added to the scores), got {m.dtype}")
            F._check_same_device(name, m, query, "query")
            if m.ndim not in ndims:
                raise _InputError(f"{name} must be {' or '.join(f'{n}-d' for n in ndims)} for a "
                                  f"{query.ndim}-d query, got a {m.ndim}-d tensor")
        if (key_padding_mask is not None and attn_mask is not None
                and key_padding_mask.dtype != attn_mask.dtype):
            warnings.warn("Support for mismatched key_padding_mask and attn_mask is deprecated. "
                          "Use same type for both instead.", stacklevel=3)
        if is_causal and attn_mask is None:
            raise _InputRuntimeError(
                "Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                "module method `generate_square_subsequent_mask` to create this mask.")
        dims = (("query", query, self.embed_dim, "embed_dim"), ("key", key, self.kdim, "kdim"),
                ("value", value, self.vdim, "vdim"))
        for name, t, want, what in dims:
            if t.shape[-1] != want:
                error = _InputError if name == "query" else _InputRuntimeError
                raise error(f"{name} has {t.shape[-1]} features (its last dim) but {what} is "
                            f"{want}")
        if key.shape[:-1] != value.shape[:-1]:
            raise _InputError(f"key {tuple(key.shape)} and value {tuple(value.shape)} must agree "
                              "on every dim but the last (sequence and batch)")
        batch_dim = 0 if self.batch_first else 1
        if batched and key.shape[batch_dim] != query.shape[batch_dim]:
            raise _InputRuntimeError(f"key has batch size {key.shape[batch_dim]} but query has "
                                     f"{query.shape[batch_dim]} (dim {batch_dim})")
        return batched

    def _check_masks(self, key_padding_mask, attn_mask, B, L, S) -> None:
        if key_padding_mask is not None and key_padding_mask.shape != (B, S):
            raise _InputError(f"key_padding_mask must have shape (batch, source length) = "
                              f"{(B, S)} (or ({S},) unbatched), got "
                              f"{tuple(key_padding_mask.shape)}")
        if attn_mask is not None:
            want = (L, S) if attn_mask.ndim == 2 else (B * self.num_heads, L, S)
            if attn_mask.shape != want:
                raise _InputRuntimeError(f"the {attn_mask.ndim}-d attn_mask must have shape "
                                         f"{want}, got {tuple(attn_mask.shape)}")

    def _project(self, query: Tensor, key: Tensor, value: Tensor):
        """The input projections; one GEMM for self-attention, two when key is value."""
        E = self.embed_dim
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.chunk(3)
        if not self._qkv_same_embed_dim:
            return (TF.linear(query, self.q_proj_weight, bq),
                    TF.linear(key, self.k_proj_weight, bk),
                    TF.linear(value, self.v_proj_weight, bv))
        w = self.in_proj_weight
        if query is key and key is value:
            return TF.linear(query, w, b).unflatten(-1, (3, E)).unbind(-2)  # 3 x (B, L, E)
        wq, wk, wv = w.chunk(3)
        if key is value:
            kv = TF.linear(key, w[E:], None if b is None else b[E:])  # (B, S, 2E)
            return (TF.linear(query, wq, bq), *kv.unflatten(-1, (2, E)).unbind(-2))
        return TF.linear(query, wq, bq), TF.linear(key, wk, bk), TF.linear(value, wv, bv)

    def _merged_mask(self, attn_mask, key_padding_mask, B, L, S, extra, dtype):
        """The two masks as one fastattn mask broadcastable to (B, H, L, S + extra): a bool
        keep-mask when both are bool, else additive (bool ones become -inf in ``dtype``, as in
        PyTorch); the ``extra`` bias/zero keys are never masked."""
        masks = []
        if attn_mask is not None:
            if attn_mask.ndim == 3:
                attn_mask = attn_mask.reshape(B, self.num_heads, L, S)  # (B, H, L, S)
            masks.append(attn_mask)  # (L, S) or (B, H, L, S)
        if key_padding_mask is not None:
            masks.append(key_padding_mask.reshape(B, 1, 1, S))  # (B, 1, 1, S)
        if not masks:
            return None
        if all(m.dtype == torch.bool for m in masks):
            blocked = masks[0] if len(masks) == 1 else masks[0] | masks[1]
            return _append_keys(~blocked, extra, True)
        additive = [m if m.is_floating_point()
                    else torch.zeros_like(m, dtype=dtype).masked_fill_(m, float("-inf"))
                    for m in masks]
        merged = additive[0] if len(additive) == 1 else additive[0] + additive[1]
        return _append_keys(merged, extra, 0.0)


# --- swap --------------------------------------------------------------------------------------


def _mha_from_torch(old: torch.nn.MultiheadAttention) -> MultiheadAttention:
    new = MultiheadAttention(
        old.embed_dim, old.num_heads, old.dropout, bias=old.in_proj_bias is not None,
        add_bias_kv=old.bias_k is not None, add_zero_attn=old.add_zero_attn, kdim=old.kdim,
        vdim=old.vdim, batch_first=old.batch_first, device="meta",
    )
    for name in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight",
                 "in_proj_bias", "bias_k", "bias_v"):
        setattr(new, name, getattr(old, name))  # the same Parameter objects
    new.out_proj = old.out_proj
    return new


def _softmax_from_torch(cls):
    return lambda old: cls(old.dim)


def _cross_entropy_from_torch(old: torch.nn.CrossEntropyLoss) -> CrossEntropyLoss:
    return CrossEntropyLoss(old.weight, ignore_index=old.ignore_index, reduction=old.reduction,
                            label_smoothing=old.label_smoothing)


# Exact types only: a subclass of a torch layer may behave differently, so it is left alone.
_SWAPS = {
    torch.nn.MultiheadAttention: _mha_from_torch,
    torch.nn.Softmax: _softmax_from_torch(Softmax),
    torch.nn.LogSoftmax: _softmax_from_torch(LogSoftmax),
    torch.nn.CrossEntropyLoss: _cross_entropy_from_torch,
}


def swap(model: torch.nn.Module) -> int:
    """Replace, in place, every submodule of ``model`` whose type is exactly
    ``torch.nn.MultiheadAttention``, ``torch.nn.Softmax``, ``torch.nn.LogSoftmax`` or
    ``torch.nn.CrossEntropyLoss`` by its ``fastattn.nn`` twin, and return how many modules were
    replaced (a module reachable from several places counts once and is replaced by one twin).

    The twins take over the very same parameter and buffer objects (so device, dtype,
    ``requires_grad`` and optimizer references are kept) and the training mode. Subclasses of
    those torch layers are not replaced (their behaviour may differ), nor are modules that are
    already fastattn's; hooks registered on a replaced module are not carried over. ``model``
    itself cannot be replaced in place, so passing one of those layers raises ``ValueError``.

    ``nn.TransformerEncoder``/``Decoder``/``Transformer`` models work in train and eval mode:
    every ``nn.TransformerEncoder`` whose layers now hold fastattn attention gets
    ``use_nested_tensor = False`` (its nested-tensor inference path would bypass the layers'
    attention; ``enable_nested_tensor`` keeps its constructed value), and fastattn's
    ``MultiheadAttention`` keeps ``nn.TransformerEncoderLayer`` off its fused inference fast
    path (see its ``_keep_own_forward`` hook), so fastattn's attention runs in every mode.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if type(model) in _SWAPS:
        raise ValueError(f"model is itself a {type(model).__name__}; swap replaces submodules "
                         "in place, so build the fastattn.nn twin directly instead")
    replaced: dict[int, torch.nn.Module] = {}
    for parent in list(model.modules()):
        for name, child in list(parent._modules.items()):
            make = _SWAPS.get(type(child))
            if make is None:
                continue
            if id(child) not in replaced:
                replaced[id(child)] = make(child).train(child.training)
            setattr(parent, name, replaced[id(child)])
    for module in model.modules():
        if isinstance(module, torch.nn.TransformerEncoder) and any(
            isinstance(getattr(layer, "self_attn", None), MultiheadAttention)
            for layer in module.layers
        ):
            module.use_nested_tensor = False
    return len(replaced)
