"""Attention in the SDPA layout: ``q (B, H, L, D)``, ``k, v (B, Hkv, S, D)``, causal aligned
top-left, grouped-query when ``Hkv < H``. Compute-bound: reported in TFLOPS (flash-attention's
FLOP model) against the measured matmul ceiling.

The oracle is ``fastattn.reference.attention``, the project's specification, run in float64
(grouped-query heads and windows included). Providers in the flash-attn layout
``(B, T, H, D)`` get their inputs transposed outside the timed call.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from fastattn.bench.suite import (
    Case,
    Inputs,
    OpBench,
    Provider,
    compile_provider,
    fastattn_providers,
    third_party,
)
from fastattn.bench.work import Work, attention_flops
from fastattn.reference import attention, window_keep

# Head layouts of real models: (query heads, key/value heads, head dim).
MODELS = {
    "gpt2": (12, 12, 64),
    "llama3-8b": (32, 8, 128),
    "llama3-70b": (64, 8, 128),
    "gemma-7b": (16, 16, 256),
}
# 1k-16k tokens, in an order that spreads coverage when --budget-s cuts the sweep short (plots
# sort by length).
FULL_SEQLENS = (4096, 16384, 1024, 8192, 2048)
TOKENS = 16384  # batch = TOKENS // seqlen, flash-attention's benchmark convention
QUICK_MODELS = {"tiny-gqa": (4, 2, 64)}
QUICK_SEQLENS = (128, 384)

SDPA_BACKENDS = {
    "sdpa-flash": "FLASH_ATTENTION",
    "sdpa-efficient": "EFFICIENT_ATTENTION",
    "sdpa-cudnn": "CUDNN_ATTENTION",
    "sdpa-math": "MATH",
}


def _gqa(case: Case) -> bool:
    return case.p["kv_heads"] != case.p["heads"]


def _window(case: Case) -> tuple[int, int]:
    return tuple(case.p.get("window", (-1, -1)))


def _keep_mask(case: Case, device: torch.device) -> torch.Tensor | None:
    """(L, S) bool, True where a query attends a key; None for no mask. Top-left aligned."""
    left, right = _window(case)
    if left == -1 and right == -1:
        return None
    L = S = case.p["seqlen"]
    return window_keep(L, S, left, 0 if case.p["causal"] else right, False, device)


def _sdpa(case: Case, backend: str | None) -> Callable[..., torch.Tensor]:
    causal, gqa = case.p["causal"], _gqa(case)

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        keep = _keep_mask(case, q.device)
        if backend is None:
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, is_causal=causal and keep is None, enable_gqa=gqa)
        with sdpa_kernel(getattr(SDPBackend, backend)):
            return F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, is_causal=causal and keep is None, enable_gqa=gqa)

    return fn


def _composition(case: Case) -> Callable[..., torch.Tensor]:
    """Textbook attention in PyTorch ops (what torch.compile is given to fuse)."""
    causal, heads, kv_heads = case.p["causal"], case.p["heads"], case.p["kv_heads"]

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k = k.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, S, D)
        v = v.repeat_interleave(heads // kv_heads, dim=1)  # (B, H, S, D)
        s = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5  # (B, H, L, S)
        keep = _keep_mask(case, q.device)
        if keep is None and causal:
            keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=q.device).tril()
        if keep is not None:
            s = s.masked_fill(~keep, float("-inf"))
        return torch.softmax(s, -1).to(v.dtype) @ v  # (B, H, L, D)

    return fn


def _flex(case: Case) -> Callable[..., torch.Tensor]:
    """PyTorch's FlexAttention, compiled (its only fast form), masks as a block mask."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    causal, gqa, (left, right) = case.p["causal"], _gqa(case), _window(case)
    L = S = case.p["seqlen"]

    def keep(b, h, q_idx, kv_idx):
        ok = kv_idx <= q_idx if causal else q_idx >= 0
        if left != -1:
            ok = ok & (q_idx - kv_idx <= left)
        if right != -1 and not causal:
            ok = ok & (kv_idx - q_idx <= right)
        return ok

    torch._dynamo.reset()  # a fresh compile per case, as for torch.compile
    compiled = torch.compile(flex_attention, dynamic=False)
    masks: dict[torch.device, object] = {}

    def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        block_mask = None
        if causal or (left, right) != (-1, -1):
            if q.device not in masks:  # built once, outside the timed calls
                masks[q.device] = create_block_mask(keep, None, None, L, S, device=q.device)
            block_mask = masks[q.device]
        return compiled(q, k, v, block_mask=block_mask, enable_gqa=gqa)

    return fn


def _flex_unavailable(case: Case, device: torch.device) -> str | None:
    if device.type != "cuda":
        return "flex-attention is timed on CUDA only (its CPU compile takes tens of seconds)"
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as e:
        return f"this torch has no flex_attention: {e}"
    return None


def _bthd(t: torch.Tensor) -> torch.Tensor:
    return t.transpose(1, 2)  # (B, H, T, D) <-> (B, T, H, D)


def _flash_attn(module: str) -> Callable[[Case], Callable[..., torch.Tensor]]:
    def make(case: Case) -> Callable[..., torch.Tensor]:
        import importlib

        flash_attn_func = importlib.import_module(module).flash_attn_func
        causal, window = case.p["causal"], _window(case)

        def fn(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            out = flash_attn_func(q, k, v, causal=causal, window_size=window)
            return out[0] if isinstance(out, tuple) else out  # some versions also return lse

        return fn

    return make


def _xformers(case: Case) -> Callable[..., torch.Tensor]:
    import xformers.ops as xops

    bias = xops.LowerTriangularMask() if case.p["causal"] else None
    return lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias)


def _xformers_check(case: Case) -> str | None:
    if _gqa(case):
        return "xformers takes grouped-query attention only in its 5-d layout; not wired here"
    if _window(case) != (-1, -1):
        return "sliding windows are not wired for xformers"
    return None


def _materialized_scores(case: Case) -> int:
    p = case.p
    return 3 * p["batch"] * p["heads"] * p["seqlen"] ** 2 * 4  # fp32 scores, probs, grad


class AttentionBench(OpBench):
    name = "attention"
    baseline = "torch"
    x_param = "seqlen"

    def sweep(self, device: torch.device, quick: bool, dtypes: Sequence[str]) -> list[Case]:
        models, seqlens = (QUICK_MODELS, QUICK_SEQLENS) if quick else (MODELS, FULL_SEQLENS)
        cases = []
        for seqlen in seqlens:
            for model, (heads, kv_heads, head_dim) in models.items():
                for causal in (False, True):
                    for d in dtypes:
                        cases.append(Case.make(
                            "attention", d, model=model, batch=max(1, TOKENS // seqlen)
                            if not quick else 1, heads=heads, kv_heads=kv_heads,
                            head_dim=head_dim, seqlen=seqlen, causal=causal))
        return cases

    def series(self, case: Case) -> str:
        return f"{case.p['model']} causal={case.p['causal']}"

    def label(self, case: Case) -> str:
        p = case.p
        return (f"{p['model']} B{p['batch']} L{p['seqlen']}{' causal' if p['causal'] else ''} "
                f"{case.dtype}")

    def inputs(self, case: Case, device: torch.device) -> Inputs:
        p = case.p
        dt = case.torch_dtype
        q = torch.randn(p["batch"], p["heads"], p["seqlen"], p["head_dim"], device=device)
        k = torch.randn(p["batch"], p["kv_heads"], p["seqlen"], p["head_dim"], device=device)
        v = torch.randn(p["batch"], p["kv_heads"], p["seqlen"], p["head_dim"], device=device)
        return Inputs([q.to(dt), k.to(dt), v.to(dt)], differentiable=(0, 1, 2))

    def reference(self, case: Case, *args: torch.Tensor) -> torch.Tensor:
        left, right = _window(case)
        return attention(*args, window=(left, 0 if case.p["causal"] else right))

    def work(self, case: Case, mode: str) -> Work:
        p = case.p
        return attention_flops(p["batch"], p["heads"], p["seqlen"], p["seqlen"], p["head_dim"],
                               causal=p["causal"], window_size=_window(case), mode=mode)

    def check_case(self, case: Case) -> Case:
        return case.replace(batch=1, seqlen=min(case.p["seqlen"], 1024))

    def input_bytes(self, case: Case) -> int:
        p = case.p
        per = p["batch"] * p["seqlen"] * p["head_dim"] * case.torch_dtype.itemsize
        return 2 * (2 * p["heads"] + 2 * p["kv_heads"]) * per  # q, k, v, out and their grads

    def providers(self) -> list[Provider]:
        def sdpa_provider(name: str, backend: str | None) -> Provider:
            def unavailable(case: Case, device: torch.device) -> str | None:
                if backend is not None and not hasattr(SDPBackend, backend):
                    return f"this torch has no SDPBackend.{backend}"
                if backend in ("EFFICIENT_ATTENTION", "CUDNN_ATTENTION") and (
                        device.type != "cuda"):
                    return f"SDPBackend.{backend} runs on CUDA only"
                return None

            scratch = _materialized_scores if backend == "MATH" else (lambda case: 0)
            return Provider(name, lambda case: _sdpa(case, backend), unavailable,
                            scratch_bytes=scratch)

        ours = list(map(_native_cuda_limits, fastattn_providers(
            lambda f, case, q, k, v: f.scaled_dot_product_attention(
                q, k, v, is_causal=case.p["causal"], enable_gqa=_gqa(case),
                window_size=_window(case)),
            needs="scaled_dot_product_attention", op="attention")))
        native = next(p for p in ours if p.name == "fastattn-native")
        return [
            *ours,
            _native_variant(native, "sm80"),
            _native_variant(native, "no-tma"),
            _native_variant(native, "no-pingpong"),
            sdpa_provider("torch", None),
            *[sdpa_provider(name, backend) for name, backend in SDPA_BACKENDS.items()],
            compile_provider(_composition, scratch_bytes=_materialized_scores),
            Provider("flex-attention", _flex, _flex_unavailable),
            third_party("flash-attn", "flash_attn", _flash_attn("flash_attn"),
                        to_layout=_bthd, from_layout=_bthd),
            third_party("flash-attn-3", "flash_attn_interface",
                        _flash_attn("flash_attn_interface"),
                        to_layout=_bthd, from_layout=_bthd),
            third_party("xformers", "xformers.ops", _xformers, check=_xformers_check,
                        to_layout=_bthd, from_layout=_bthd),
        ]


def _native_cuda_limits(provider: Provider) -> Provider:
    """The native provider, skipping on CUDA the cases its CUDA kernels do not take (float32,
    say: ``fastattn.native.attention.cuda_unsupported``, asked with meta tensors of the case's
    shapes), so the sweep and ``fastattn-bench tune`` report a skip, not a failure."""
    if provider.name != "fastattn-native":
        return provider
    unavailable = provider.unavailable

    def unavailable_here(case: Case, device: torch.device) -> str | None:
        why = unavailable(case, device)
        if why is None and device.type == "cuda":
            from fastattn.native.attention import cuda_unsupported

            p = case.p

            def meta(heads: int) -> torch.Tensor:
                return torch.empty(p["batch"], heads, 1, p["head_dim"], dtype=case.torch_dtype,
                                   device="meta")

            limit = cuda_unsupported(meta(p["heads"]), meta(p["kv_heads"]), meta(p["kv_heads"]))
            why = None if limit is None else limit.reason
        return why

    return dataclasses.replace(provider, unavailable=unavailable_here)


# The native CUDA attention kernels a variable forces, read at each launch: the sm_80 ones
# (mma.sync) where the launcher would pick Hopper's (wgmma), Hopper's kernels with cp.async
# loads where it would pick the TMA ones (the forward from head dim 64 up, dQ and dK/dV from 96
# up, padded: 33 up), and the TMA forward without its two consumer warpgroups taking turns on
# the tensor cores (FA3's ping-pong; head dims 64 to 128 take turns, padded: 33 to 128).
KERNEL_VARS = {"sm80": ("FASTATTN_CUDA_WGMMA", "0"), "no-tma": ("FASTATTN_CUDA_TMA", "0"),
               "no-pingpong": ("FASTATTN_CUDA_PINGPONG", "0")}


def takes_turns(head_dim: int) -> bool:
    """Whether the Hopper TMA forward's warpgroups take turns on the tensor cores (what
    ``"no-pingpong"`` switches off) at ``head_dim``, the larger of D and Dv: those padded to 64,
    96 or 128 (attention_cuda.cuh, TensorCoreTurns)."""
    return 32 < head_dim <= 128


@contextlib.contextmanager
def native_kernels(kind: str) -> Iterator[None]:
    """Native CUDA attention runs the kernels ``kind`` names inside: ``"default"`` (what the
    launcher picks), ``"sm80"`` (``FASTATTN_CUDA_WGMMA=0``), ``"no-tma"``
    (``FASTATTN_CUDA_TMA=0``) or ``"no-pingpong"`` (``FASTATTN_CUDA_PINGPONG=0``); the variable
    is restored on exit."""
    if kind == "default":
        yield
        return
    if kind not in KERNEL_VARS:
        raise ValueError(f"kind must be 'default' or one of {sorted(KERNEL_VARS)}, got {kind!r}")
    var, value = KERNEL_VARS[kind]
    old = os.environ.get(var)
    os.environ[var] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[var]
        else:
            os.environ[var] = old


def _native_variant(native: Provider, kind: str) -> Provider:
    """``fastattn-native`` with the kernels ``kind`` forces (``native_kernels``), beside those
    the launcher picks; only on a Hopper GPU do they differ (for ``"no-tma"``, only from head
    dim 33 up; for ``"no-pingpong"``, only at head dims 33 to 128), so elsewhere it is
    skipped."""

    def make(case: Case) -> Callable[..., torch.Tensor]:
        fn = native.make(case)

        def run(*args: torch.Tensor) -> torch.Tensor:
            with native_kernels(kind):
                return fn(*args)
        return run

    def unavailable(case: Case, device: torch.device) -> str | None:
        why = native.unavailable(case, device)
        if why is None and (device.type != "cuda"
                            or torch.cuda.get_device_capability(device)[0] != 9):
            why = f"the {kind} kernels differ from fastattn-native's only on a Hopper GPU"
        if why is None and kind == "no-tma" and case.p["head_dim"] <= 32:
            why = "the TMA kernels serve head dims 64 up (padded)"
        if why is None and kind == "no-pingpong" and not takes_turns(case.p["head_dim"]):
            why = "the TMA forward's warpgroups take turns at head dims 64 to 128 (padded)"
        return why

    return dataclasses.replace(native, name=f"fastattn-native-{kind}", make=make,
                               unavailable=unavailable)


BENCH = AttentionBench()
