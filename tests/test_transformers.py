"""attn_implementation="fastattn" in Hugging Face transformers, against the model's own SDPA
(or eager) attention with the same weights.

Tiny randomly initialised models, nothing downloaded. The torch backend runs in float64 and
must match PyTorch's SDPA to float64 precision; other backends (the Triton interpreter on CPU)
run in float32 and must stay within twice the error of SDPA in float32, both measured against
SDPA in float64. Logits and the gradient of every parameter are compared on the positions that
hold real tokens only: a padded query row that sees no key (left padding) is 0 in fastattn,
where SDPA may give something else, and no real token ever reads it (the padding mask keeps it
out of every real row), so only those positions carry the model's meaning.
"""

import copy
import os
import subprocess
import sys

import pytest
import torch
from check import DEVICE, assert_twice_error, backends, skip_unsupported_attention

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tiny configs only: nothing is downloaded
# The first release with AttentionMaskInterface; older ones make register() raise ImportError.
transformers = pytest.importorskip("transformers", minversion="4.53")

import fastattn  # noqa: E402
from fastattn import functional  # noqa: E402
from fastattn.integrations import transformers as fa_hf  # noqa: E402

fa_hf.register()

VOCAB, T = 100, 12


def _llama():
    # GQA: 4 query heads share 2 key/value heads.
    return transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _gpt2():
    return transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=0,
        eos_token_id=0)


def _gemma2():
    # One sliding-window layer (window 4 < T, so it binds) and one global layer, a softcap
    # small enough to bend the scores, GQA.
    return transformers.Gemma2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
        attn_logit_softcapping=0.5, final_logit_softcapping=None, max_position_embeddings=64)


MODELS = {"llama": _llama, "gpt2": _gpt2, "gemma2": _gemma2}


def _models(name, impls, dtypes):
    """One model per (implementation, dtype), all with the same weights, built the documented
    way (``from_config(..., attn_implementation=...)``). Each gets its own copy of the config:
    the implementation is stored in the config object."""
    config = MODELS[name]()
    models = []
    for impl, dtype in zip(impls, dtypes, strict=True):
        model = transformers.AutoModelForCausalLM.from_config(
            copy.deepcopy(config), attn_implementation=impl)
        if models:
            model.load_state_dict(models[0].state_dict())
        models.append(model.to(device=DEVICE, dtype=dtype).eval())
    return models


def _batch(padding):
    ids = torch.randint(1, VOCAB, (2, T), device=DEVICE)
    mask = torch.ones(2, T, dtype=torch.long, device=DEVICE)
    if padding == "left":
        mask[0, :5] = 0
    elif padding == "right":
        mask[1, 9:] = 0  # fewer pads than Gemma's window: each row still sees a key
    return ids, mask


def _run(model, ids, mask, weight):
    """Logits and every parameter's gradient of a loss over the real tokens only."""
    model.zero_grad()
    logits = model(ids, attention_mask=mask).logits  # (B, T, V)
    real = mask.bool()
    (logits[real] * weight.to(logits.dtype)).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach()[real], grads


def _compare(backend, name, padding, ref_impl="sdpa"):
    dtype = torch.float64 if backend == "torch" else torch.float32
    skip_unsupported_attention(backend, dtype)
    ref, pt, ours = _models(name, [ref_impl, ref_impl, "fastattn"],
                            [torch.float64, dtype, dtype])
    ids, mask = _batch(padding)
    weight = torch.randn(int(mask.sum()), VOCAB, device=DEVICE)
    ref_out, ref_grads = _run(ref, ids, mask, weight)
    pt_out, pt_grads = _run(pt, ids, mask, weight)
    with fastattn.use_backend(backend):
        out, grads = _run(ours, ids, mask, weight)
    assert_twice_error(out, ref_out, pt_out, "logits")
    assert grads.keys() == ref_grads.keys()
    for n in ref_grads:
        assert_twice_error(grads[n], ref_grads[n], pt_grads[n], f"grad {n}")


# Every padding layout on the reference backend; the interpreter (slow) gets the hardest one.
@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("padding", ["none", "left", "right"])
def test_logits_and_grads_torch(name, padding):
    _compare("torch", name, padding)


@pytest.mark.parametrize("backend", [b for b in backends("attention") if b != "torch"])
def test_logits_and_grads_other_backends(backend):
    _compare(backend, "llama", "left")


# A dynamic cache with left padding (a mask on every step), and a static cache without padding
# (prefill: no mask, is_causal over a key cache longer than the queries, whose empty slots lie
# past every query). The interpreter gets the first only.
@pytest.mark.parametrize("backend,cache,padding", [
    *((b, "dynamic", "left") for b in backends("attention")), ("torch", "static", "none")])
def test_generate_matches_sdpa(backend, cache, padding):
    # Greedy decoding: prefill, then one query row against a longer, growing key cache
    # (bottom-right causal alignment comes from the mask). Tokens must be equal, and the
    # logits of every step within the twice-error rule.
    dtype = torch.float64 if backend == "torch" else torch.float32
    skip_unsupported_attention(backend, dtype)
    ref, pt, ours = _models("llama", ["sdpa"] * 2 + ["fastattn"], [torch.float64, dtype, dtype])
    ids, mask = _batch(padding)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0,
                  cache_implementation=cache, return_dict_in_generate=True, output_logits=True)
    expected, pt_run = ref.generate(ids, **kwargs), pt.generate(ids, **kwargs)
    with fastattn.use_backend(backend):
        got = ours.generate(ids, **kwargs)
    assert got.sequences.shape == (2, T + 3)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (g, e, p) in enumerate(zip(got.logits, expected.logits, pt_run.logits,
                                         strict=True)):
        assert_twice_error(g, e, p, f"logits of step {step}")


@pytest.fixture
def calls(monkeypatch):
    """Records the arguments of every fastattn attention call the integration makes."""
    seen = []
    original = functional.scaled_dot_product_attention

    def spy(q, k, v, **kwargs):
        mask = kwargs["attn_mask"]
        seen.append(dict(kwargs, q=tuple(q.shape), k=tuple(k.shape),
                         attn_mask=None if mask is None else tuple(mask.shape)))
        return original(q, k, v, **kwargs)

    monkeypatch.setattr(functional, "scaled_dot_product_attention", spy)
    return seen


def test_gqa_masks_and_causal_flag(calls):
    (model,) = _models("llama", ["sdpa"], [torch.float64])
    ids, mask = _batch("none")
    expected = model(ids, attention_mask=mask).logits
    assert not calls
    if not hasattr(model, "set_attn_implementation"):
        pytest.skip("this transformers has no set_attn_implementation")
    model.set_attn_implementation("fastattn")  # switching a built model works too
    with fastattn.use_backend("torch"):
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    # No padding, L == S: no mask, is_causal; K/V keep their 2 heads (never repeated).
    assert [c["attn_mask"] for c in calls] == [None, None]
    assert all(c["is_causal"] and c["enable_gqa"] and c["k"] == (2, 2, T, 16) for c in calls)
    calls.clear()
    ids, mask = _batch("left")
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)
    # Prefill with padding, then one decode step: always transformers' mask, never is_causal.
    assert [c["attn_mask"] for c in calls] == [(2, 1, T, T)] * 2 + [(2, 1, 1, T + 1)] * 2
    assert [c["k"][2] for c in calls] == [T, T, T + 1, T + 1]
    assert not any(c["is_causal"] for c in calls)


@pytest.mark.parametrize("padding", ["none", "right"])
def test_sliding_window_and_softcap_match_eager(padding, calls):
    # SDPA refuses softcap, so Gemma 2 is compared with its eager attention, which computes the
    # softmax in float32 even for float64 models: hence float32-sized tolerances. A wrong window
    # or softcap changes the logits by orders of magnitude more. (Left padding is left out:
    # eager float64 overflows finfo.min + score to -inf in fully padded rows and returns NaN.)
    ref, ours = _models("gemma2", ["eager", "fastattn"], [torch.float64, torch.float64])
    ids, mask = _batch(padding)
    real = mask.bool()
    with fastattn.use_backend("torch"):
        got = ours(ids, attention_mask=mask).logits[real]
    torch.testing.assert_close(got, ref(ids, attention_mask=mask).logits[real],
                               atol=1e-5, rtol=1e-5)
    # The sliding layer passes its window as a tile-skipping bound, the global one does not.
    assert [c["window_size"] for c in calls] == [(4, 4), (-1, -1)]
    assert all(c["softcap"] == 0.5 for c in calls)
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    if padding == "none":  # decode steps: the cache outgrows the window
        assert torch.equal(ours.generate(ids, **kwargs), ref.generate(ids, **kwargs))


def test_output_attentions():
    # Weights are computed beside the fused call; they must be eager's on real query rows.
    # (Right padding: eager float64 gives NaN in fully padded rows, see the Gemma test.)
    ref, ours = _models("llama", ["eager", "fastattn"], [torch.float64, torch.float64])
    ids, mask = _batch("right")
    with fastattn.use_backend("torch"):
        got = ours(ids, attention_mask=mask, output_attentions=True).attentions
    expected = ref(ids, attention_mask=mask, output_attentions=True).attentions
    assert len(got) == len(expected) == 2
    real = mask.bool()  # (B, T) query rows holding real tokens
    for g, e in zip(got, expected, strict=True):
        assert g.shape == e.shape == (2, 4, T, T)
        torch.testing.assert_close(g.permute(0, 2, 1, 3)[real], e.permute(0, 2, 1, 3)[real],
                                   atol=1e-6, rtol=1e-6)  # eager's softmax runs in float32
    ours.train()
    ours.config.attention_dropout = 0.5
    for layer in ours.model.layers:
        layer.self_attn.attention_dropout = 0.5
    with pytest.raises(ValueError, match="output_attentions"):
        ours(ids, attention_mask=mask, output_attentions=True)


def test_dropout_in_training(calls):
    (model,) = _models("llama", ["fastattn"], [torch.float64])
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.3
    ids, mask = _batch("right")
    model.train()
    torch.manual_seed(1)
    a = model(ids, attention_mask=mask).logits
    torch.manual_seed(1)
    b = model(ids, attention_mask=mask).logits
    assert all(c["dropout_p"] == 0.3 for c in calls) and len(calls) == 4
    torch.testing.assert_close(a, b, atol=0, rtol=0)  # torch.manual_seed reproduces it
    model.eval()
    c = model(ids, attention_mask=mask).logits
    assert calls[-1]["dropout_p"] == 0.0
    assert (a - c).abs().max() > 1e-3  # dropout changed something in training mode
    a.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_register_is_idempotent_and_import_is_lazy():
    fa_hf.register()
    assert transformers.AttentionInterface._global_mapping["fastattn"] is fa_hf.attention_forward
    masks = transformers.masking_utils.AttentionMaskInterface._global_mapping
    assert masks["fastattn"] is fa_hf.attention_mask
    code = ("import sys, fastattn, fastattn.integrations.transformers; "
            "assert 'transformers' not in sys.modules, 'imported transformers'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_register_names_minimum_version_on_old_transformers(monkeypatch):
    # A transformers without masking_utils (before 4.53) cannot register a mask function.
    monkeypatch.setitem(sys.modules, "transformers.masking_utils", None)
    with pytest.raises(ImportError, match=r"transformers>=4\.53"):
        fa_hf.register()


def test_register_names_minimum_version_by_version_number(monkeypatch):
    monkeypatch.setattr(fa_hf.importlib.metadata, "version", lambda name: "4.46.0")
    with pytest.raises(ImportError, match=r"transformers>=4\.53; found transformers 4\.46\.0"):
        fa_hf.register()


@pytest.mark.parametrize("kind", ["none", "bool", "additive"])
def test_position_bias_against_sdpa_function(kind):
    # T5-style learned bias, straight through the attention functions: fastattn's becomes an
    # additive mask that receives its gradient. transformers masks with finfo.min where fastattn
    # uses -inf; they differ only in rows that see no key, and every row here sees one.
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = torch.nn.Module()
    module.is_causal = False
    q, k, v = (torch.randn(2, 3, n, 8, dtype=torch.float64, device=DEVICE) for n in (5, 7, 7))
    bias = torch.randn(1, 3, 5, 7, dtype=torch.float64, device=DEVICE, requires_grad=True)
    mask = None
    if kind != "none":
        mask = torch.rand(2, 1, 5, 7, device=DEVICE) > 0.3
        mask[..., 0] = True
        if kind == "additive":
            mask = torch.zeros(mask.shape, dtype=torch.float64, device=DEVICE).masked_fill(
                ~mask, torch.finfo(torch.float64).min)
    with fastattn.use_backend("torch"):
        out, weights = fa_hf.attention_forward(module, q, k, v, mask, position_bias=bias)
    (grad,) = torch.autograd.grad(out.sum(), bias)
    expected, _ = sdpa_attention_forward(module, q, k, v, mask, position_bias=bias)
    (expected_grad,) = torch.autograd.grad(expected.sum(), bias)
    assert weights is None and out.shape == (2, 5, 3, 8)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(grad, expected_grad, atol=1e-12, rtol=1e-12)
