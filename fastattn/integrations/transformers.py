"""``attn_implementation="fastattn"`` for Hugging Face transformers.

    import fastattn.integrations.transformers as fa_hf
    fa_hf.register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fastattn")
    # or, on a loaded model: model.set_attn_implementation("fastattn")

``register()`` adds two functions under the name ``"fastattn"``: an attention function to
``AttentionInterface`` and a mask function to ``AttentionMaskInterface``. Both are needed: a
model whose implementation has no mask function gets no mask at all, so padding is silently
ignored. Nothing is registered until ``register()`` runs; importing this module does not import
transformers. Needs transformers >= 4.53 (the first release with ``AttentionMaskInterface``).

What the attention function does with what the model passes (``(B, H, L, D)`` query,
``(B, Hk, S, D)`` key/value, S > L with a KV cache):

- Masks: the mask function is transformers' own ``sdpa_mask`` (boolean, True = attend, shape
  ``(B, 1, L, S)``, built with the cache's offsets), because fastattn reads exactly SDPA's
  masks. Where transformers can tell that no mask is needed (no padding, and L == S or L == 1,
  or a prefill into an empty static cache) it returns None, and the attention function then
  uses ``is_causal`` (top-left, as SDPA: right for L == S, for L == 1 where it is not set, and
  for an empty static cache whose later slots lie past every query) instead of a mask, which
  lets the kernels skip whole tiles. With a cache and L < S the mask itself carries the
  bottom-right causal alignment, so nothing here has to guess offsets. A 4-d mask longer than
  the keys (older releases build it for a whole static cache) is cut to the keys, as SDPA's
  integration there does.
- GQA/MQA (``num_key_value_heads < num_attention_heads``): ``enable_gqa=True``; key and value are
  never repeated.
- ``sliding_window`` (Mistral, Qwen2, Gemma 2/3): transformers puts the window into the mask
  (or leaves the mask out only where the window does not bind), so the result never depends on
  fastattn's ``window_size``. When L == S (no cache offset between queries and keys) it is also
  passed as ``window_size=(w, w)``, a bound no tighter than either of transformers' window
  conventions (causal: ``j > i - w``; bidirectional: ``|i - j| <= w``), only so the kernels
  skip tiles outside it. With L != S it is not passed: fastattn's window is aligned top-left
  and the cache offset is not known here.
- ``softcap`` (Gemma 2) -> ``softcap``; ``scaling`` -> ``scale``; ``dropout`` -> ``dropout_p``
  (fastattn's seeded dropout, reproducible with ``torch.manual_seed``).
- ``position_bias`` (T5-style learned biases) becomes an additive mask (-inf where the boolean
  mask is False) that receives its gradient.
- Output ``(B, L, H, Dv)`` contiguous, as every transformers attention function returns.
- ``output_attentions=True`` (as a call argument or in the config): a fused kernel never forms
  the probabilities, so they are computed separately from the same inputs with PyTorch ops
  (``fastattn.softmax`` for the masked softmax) and returned beside the fused output; this
  costs the ``(B, H, L, S)`` tensor a fused kernel avoids. With dropout active it raises
  ``ValueError``: fastattn's dropout mask is drawn inside the kernel, so no separately computed
  weights would match the output.
- A query row that sees no key (a left-padding position) gives 0, where PyTorch's SDPA may give
  something else; transformers never reads those positions for real tokens.

The backend that runs is chosen by fastattn's usual rules (``fastattn.use_backend``,
``FASTATTN_BACKEND``, the device default); this module never chooses one.
"""

from __future__ import annotations

import importlib.metadata

import torch
from packaging.version import Version

from fastattn import functional

__all__ = ["NAME", "MIN_TRANSFORMERS", "register", "attention_forward", "attention_mask"]

NAME = "fastattn"
MIN_TRANSFORMERS = "4.53"


def attention_mask(*args, **kwargs) -> torch.Tensor | None:
    """The mask function: transformers' ``sdpa_mask`` with the same arguments (boolean masks,
    True = attend, or None where ``is_causal`` serves), since fastattn reads SDPA's masks."""
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(*args, **kwargs)


def _wants_attentions(module: torch.nn.Module, kwargs: dict) -> bool:
    requested = kwargs.get("output_attentions")
    if requested is None:
        requested = getattr(getattr(module, "config", None), "output_attentions", False)
    return bool(requested)


def _attention_weights(query, key, mask, is_causal, scale, softcap):
    """Softmax probabilities ``(B, Hq, L, S)`` for ``output_attentions``, from the same inputs
    and masks as the fused call; rows that see no key are 0, as in the fused output."""
    B, Hq, L, D = query.shape
    Hk, S = key.shape[1], key.shape[2]
    q = query.reshape(B, Hk, Hq // Hk, L, D)  # (B, Hk, G, L, D): groups share a K/V head
    scores = q @ key.unsqueeze(2).transpose(-1, -2)  # (B, Hk, G, L, S)
    scores = scores.reshape(B, Hq, L, S) * scale  # (B, Hq, L, S)
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    return functional.softmax(scores, -1, mask=mask, causal=is_causal)


def attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    position_bias: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The attention function registered as ``"fastattn"``: transformers' attention-interface
    signature in, ``(output (B, L, Hq, Dv), weights or None)`` out. See the module docstring."""
    L, S = query.shape[2], key.shape[2]
    hq, hk = query.shape[1], key.shape[1]
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    # As transformers' SDPA path: a missing mask means plain causal (or none); one query needs none.
    causal = bool(is_causal) and attention_mask is None and L > 1
    mask = attention_mask
    if mask is not None and mask.ndim == 4 and mask.shape[-1] > S:
        mask = mask[..., :S]  # older transformers may build it for the whole static cache
    if position_bias is not None:
        bias = position_bias.to(query.dtype)
        if mask is not None and mask.dtype == torch.bool:
            mask = bias.masked_fill(~mask, float("-inf"))  # (B, H, L, S) additive
        else:
            mask = bias if mask is None else bias + mask
    window = functional.NO_WINDOW
    if sliding_window is not None and L == S:
        window = (int(sliding_window), int(sliding_window))  # a tile-skipping bound, see above
    scale = query.shape[-1] ** -0.5 if scaling is None else float(scaling)
    softcap = float(softcap) if softcap else 0.0
    weights = None
    if _wants_attentions(module, kwargs):
        if dropout > 0:
            raise ValueError("attn_implementation='fastattn' cannot return attention weights "
                             "(output_attentions=True) with dropout active: the dropout mask "
                             "is drawn inside the fused kernel; call model.eval() or use "
                             "attn_implementation='eager'")
        weights = _attention_weights(query, key, mask, causal, scale, softcap)
    out = functional.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, dropout_p=float(dropout), is_causal=causal,
        scale=scale, enable_gqa=hq != hk, window_size=window, softcap=softcap,
    )  # (B, Hq, L, Dv)
    return out.transpose(1, 2).contiguous(), weights  # (B, L, Hq, Dv)


def register() -> None:
    """Register ``"fastattn"`` with transformers' ``AttentionInterface`` and
    ``AttentionMaskInterface``. Idempotent. Raises ``ImportError`` naming the minimum version
    when transformers is missing or too old to have both interfaces."""
    need = f"fastattn's transformers integration needs transformers>={MIN_TRANSFORMERS}"
    try:
        version = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        raise ImportError(f"{need}; transformers is not installed "
                          f"(pip install 'transformers>={MIN_TRANSFORMERS}')") from None
    if Version(version) < Version(MIN_TRANSFORMERS):
        raise ImportError(f"{need}; found transformers {version}")
    try:
        from transformers.masking_utils import AttentionMaskInterface
        from transformers.modeling_utils import AttentionInterface
    except ImportError as err:
        raise ImportError(f"{need} (AttentionInterface and AttentionMaskInterface); found "
                          f"transformers {version}") from err
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, attention_mask)
