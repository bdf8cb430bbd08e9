"""Every native CUDA kernel once, at small sizes, for NVIDIA's compute-sanitizer.

    compute-sanitizer --tool memcheck --error-exitcode 1 python benchmarks/sanitize_cuda.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python benchmarks/sanitize_cuda.py

(``benchmarks/gpu_session.sh`` runs both with ``STEPS=sanitize``.) memcheck finds out-of-bounds
and misaligned global and shared accesses, racecheck shared-memory hazards (a missing
``__syncthreads`` between the cp.async pipeline stages, the staged P/dS tiles, the epilogues).
The cases cover each kernel family and the paths that index differently: every attention
kernel template's shared-memory layout at some head dim (each attention case three times:
with the kernels the launcher picks, Hopper's wgmma ones, by TMA from head dim 64 up, on an
H100, with the sm_80 ones, and with Hopper's cp.async ones), the
padded-copy path for unaligned head dims, sequence lengths that are not multiples of any tile,
L = S = 1, rows that see no key, GQA, masks, windows, softcap, dropout with a CPU and a CUDA
seed, the mask gradient, flash-attn's strided layout; softmax and cross-entropy with masks,
causal rows and odd lengths, on both row layouts (16-byte vectors with a warp or a block per
row, and the strided one).

Each result is also compared, on the CPU, with the float64 reference under a loose bound, so a
kernel that computes garbage without touching bad memory fails here too (the tests hold the
kernels to the real rule). Prints one line per case; exit status 1 if any case failed.

The attention kernel sets run in the order sm80, no-tma, no-pingpong, default (the newest
kernels last; no-pingpong runs only the cases it changes, head dims 64 to 128 padded), each
set's cases closed by a line ``kernels <set>: all ok`` or ``kernels <set>: N of M failed``, also
appended to the file ``--summary PATH`` names as soon as the set is done: a set that hangs (a
TMA kernel waiting on an mbarrier that never completes) or faults (which spoils the CUDA context
for every later case) leaves the earlier sets' verdicts written. ``gpu_session.sh`` reads them
to run its later steps with the newest kernel set that passed.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from fastattn import _ext, reference
from fastattn.bench.attention import native_kernels, takes_turns

OPS = torch.ops.fastattn
DEV = "cuda"


def _close(name: str, got: torch.Tensor, ref: torch.Tensor, rel: float = 0.1) -> None:
    got, ref = got.detach().cpu().double(), ref.detach().cpu().double()
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    finite = torch.isfinite(ref)
    assert torch.equal(torch.isfinite(got), finite), f"{name}: non-finite values differ"
    if finite.any():
        err = (got - ref)[finite].abs().max().item()
        bound = rel * max(1.0, ref[finite].abs().max().item())
        assert err <= bound, f"{name}: error {err:.3g} > {bound:.3g}"


# --- attention ------------------------------------------------------------------------------

# (name, dtype, B, Hq, Hk, L, S, D, Dv, mask, dropout_p, seed device, window, bottom, softcap,
#  flash layout)
ATTENTION = [
    ("plain d64", torch.bfloat16, 2, 2, 2, 70, 90, 64, 64, None, 0.0, None, (-1, -1), False, 0.0,
     False),
    ("unaligned d59/111 causal bottom-right, L > S", torch.float16, 1, 2, 2, 100, 45, 59, 111,
     None, 0.0, None, (10, 0), True, 0.0, False),
    # (on Hopper the TMA forward's kernel with dropout: 64-key tiles at head dim 128)
    ("d128 GQA additive mask + grad, softcap, dropout (cuda seed)", torch.bfloat16, 2, 4, 2, 65,
     129, 128, 128, "additive", 0.1, "cuda", (-1, -1), False, 3.0, False),
    ("d256 bool mask, dropout (cuda seed), window", torch.bfloat16, 1, 2, 1, 80, 75, 256, 256,
     "bool", 0.2, "cuda", (5, 7), False, 0.0, False),
    # (on Hopper the TMA forward's kernel without dropout at head dim 256: three 64-key tiles)
    ("d256 causal bottom-right, GQA", torch.float16, 1, 4, 2, 70, 150, 256, 256, None, 0.0, None,
     (-1, 0), True, 0.0, False),
    ("d192/32 L = S = 1", torch.float16, 1, 3, 3, 1, 1, 192, 32, None, 0.0, None, (-1, -1),
     False, 0.0, False),
    ("d32 causal, flash layout, dropout (cpu seed)", torch.bfloat16, 2, 3, 1, 130, 257, 32, 32,
     None, 0.1, "cpu", (-1, 0), False, 0.0, True),
    ("d96/80 fp16 additive fp16 mask, odd window", torch.float16, 1, 2, 2, 33, 200, 96, 80,
     "additive", 0.0, None, (40, 3), True, 0.0, False),
    # Hopper: three 128-row query tiles, each of two warpgroups sharing K/V stages that refill,
    # the last one's second warpgroup past L
    ("d128 causal, L 300", torch.float16, 1, 2, 1, 300, 300, 128, 128, None, 0.0, None, (-1, 0),
     False, 0.0, False),
]


def _attention_case(dtype, B, Hq, Hk, L, S, D, Dv, mask_kind, p, seed_dev, window, bottom,
                    softcap, flash):
    def make(H, N, E):
        if flash:  # (B, N, H, E) in memory, viewed as (B, H, N, E)
            return torch.randn(B, N, H, E, device=DEV, dtype=dtype).transpose(1, 2)
        return torch.randn(B, H, N, E, device=DEV, dtype=dtype)

    q, k, v = make(Hq, L, D), make(Hk, S, D), make(Hk, S, Dv)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(B, 1, L, S, device=DEV) > 0.2
    elif mask_kind == "additive":
        mask = torch.randn(1, 1, L, S, device=DEV, dtype=dtype)
        mask = mask.masked_fill(torch.rand(1, 1, L, S, device=DEV) < 0.1, float("-inf"))
    seed = None if p == 0 else torch.tensor([20240917], device=seed_dev)
    scale = D**-0.5
    left, right = window
    out, lse = OPS.native_attention_fwd(q, k, v, mask, seed, p, scale, left, right, bottom,
                                        softcap)
    g = torch.randn_like(out)
    mask_grad = mask_kind == "additive"
    dq, dk, dv, dmask = OPS.native_attention_bwd(g, q, k, v, out, lse, mask, seed, p, scale,
                                                 left, right, bottom, softcap, mask_grad)
    torch.cuda.synchronize()

    # float64 oracle on the CPU, on the kernels' own dropout mask
    keep = None if p == 0 else OPS.native_attention_dropout_mask(seed.cpu(), [B, Hq, L, S], p)
    leaves = [t.detach().cpu().double().requires_grad_() for t in (q, k, v)]
    m64 = None
    if mask is not None:
        m64 = mask.cpu() if mask.dtype == torch.bool else mask.cpu().double().requires_grad_()
    ref = reference.attention(*leaves, m64, keep, p, scale, window, bottom, softcap)
    wrt = leaves + ([m64] if mask_grad else [])
    ref_grads = torch.autograd.grad(ref, wrt, g.cpu().double())
    _close("out", out, ref)
    s = reference.attention_scores(leaves[0].detach(), leaves[1].detach(), m64, scale, window,
                                   bottom, softcap)
    _close("lse", lse, torch.logsumexp(s, -1), rel=0.01)
    for name, got, want in zip(("dq", "dk", "dv", "dmask"), (dq, dk, dv, dmask), ref_grads,
                               strict=False):
        # dmask is (B, Hq, L, S); the broadcast mask's gradient is its sum over broadcast dims
        _close(name, got.double().sum_to_size(want.shape) if name == "dmask" else got, want)


# --- softmax and cross-entropy ----------------------------------------------------------------


def _softmax_case(dtype, shape, dim, mask_kind, causal, log):
    x = torch.randn(shape, device=DEV, dtype=dtype)
    mask = None
    if mask_kind == "bool":
        mask = torch.rand(shape[-2:], device=DEV) > 0.3
    elif mask_kind == "additive":
        mask = torch.randn(shape[-1], device=DEV)
    y = OPS.native_softmax_fwd(x, dim, 0.7, mask, causal, log, dtype)
    g = torch.randn_like(y)
    dx = OPS.native_softmax_bwd(g, y, dim, 0.7, mask, causal, log, dtype)
    torch.cuda.synchronize()
    x64 = x.detach().cpu().double().requires_grad_()
    m64 = None if mask is None else mask.cpu() if mask.dtype == torch.bool else mask.cpu().double()
    fn = reference.log_softmax if log else reference.softmax
    ref = fn(x64, dim, scale=0.7, mask=m64, causal=causal)
    (ref_dx,) = torch.autograd.grad(ref, x64, g.cpu().double())
    _close("y", y, ref)
    _close("dx", dx, ref_dx)


def _cross_entropy_case(dtype, N, C, smoothing, softcap):
    x = torch.randn(N, C, device=DEV, dtype=dtype)
    t = torch.randint(0, C, (N,), device=DEV)
    t[::5] = -100
    grad = torch.empty_like(x)
    loss, lse = OPS.native_cross_entropy_fwd(x, t, None, -100, 1, smoothing, 0.0, softcap, grad)
    torch.cuda.synchronize()
    x64 = x.detach().cpu().double().requires_grad_()
    ref = F.cross_entropy(reference.apply_softcap(x64, softcap or None), t.cpu(),
                          label_smoothing=smoothing)
    (ref_grad,) = torch.autograd.grad(ref, x64)
    _close("loss", loss, ref)
    _close("grad", grad, ref_grad)


def _attention_with(kernel: str, args) -> None:
    with native_kernels(kernel):
        _attention_case(*args)


# Attention kernel sets, the newest last: "default" is what the launcher picks (on an H100
# built with sm_90a: Hopper's wgmma kernels, by TMA from head dim 64 up, the TMA forward's
# warpgroups taking turns on the tensor cores at head dims 64 to 128), "no-pingpong" the same
# without those turns, "no-tma" Hopper's cp.async ones (the same as the default below compute
# capability 9), "sm80" mma.sync's.
KERNEL_SETS = ("sm80", "no-tma", "no-pingpong", "default")


def set_cases(kernel: str) -> list[tuple]:
    """The ATTENTION cases kernel set ``kernel`` runs: all of them, but for "no-pingpong" only
    those it changes, whose larger head dim pads to 64, 96 or 128."""
    if kernel != "no-pingpong":
        return ATTENTION
    return [case for case in ATTENTION if takes_turns(max(case[7], case[8]))]


def cases() -> Iterator[tuple[str, str | None, Callable[[], None]]]:
    """(name, attention kernel set or None, run) per case: softmax and cross-entropy first, then
    every attention case with each kernel set in KERNEL_SETS' order."""
    for dtype, shape, dim, mask, causal, log in [
        (torch.float32, (4, 37), -1, None, False, False),
        (torch.bfloat16, (3, 33, 1025), -1, "bool", True, True),
        (torch.float16, (2, 300, 7), 1, None, False, False),
        (torch.float32, (5, 4099), -1, "additive", False, True),
        (torch.bfloat16, (3, 5001), -1, None, True, False),  # 16-byte vectors, rows misaligned
        (torch.float16, (40, 250), -1, None, False, True),  # vectors, a warp per row
    ]:
        yield (f"softmax {dtype} {shape} dim={dim} mask={mask} causal={causal} log={log}", None,
               lambda a=(dtype, shape, dim, mask, causal, log): _softmax_case(*a))
    for dtype, N, C, smoothing, softcap in [(torch.float32, 8, 1000, 0.0, 0.0),
                                            (torch.bfloat16, 5, 50257, 0.1, 30.0),
                                            (torch.float16, 40, 101, 0.0, 0.0)]:
        yield (f"cross_entropy {dtype} {N}x{C} smoothing={smoothing} softcap={softcap}", None,
               lambda a=(dtype, N, C, smoothing, softcap): _cross_entropy_case(*a))
    for kernel in KERNEL_SETS:
        for name, *args in set_cases(kernel):
            yield (f"attention {name} (kernels: {kernel})", kernel,
                   lambda args=args, kernel=kernel: _attention_with(kernel, args))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--summary", type=Path, help="append each attention kernel set's "
                        "verdict line to this file as soon as the set is done")
    args = parser.parse_args(argv)
    why = _ext.reason(None, "cuda")
    if why is not None:
        print(f"sanitize_cuda: the native CUDA kernels cannot run here: {why}")
        return 1
    torch.manual_seed(0)
    failed = 0
    per_set: dict[str, list[int]] = {}  # kernel set -> [cases, failed]
    for name, kernel, run in cases():
        ok = True
        try:
            run()
            print(f"ok      {name}", flush=True)
        except Exception:  # noqa: BLE001 - report every case, then fail
            ok = False
            failed += 1
            print(f"FAILED  {name}\n{traceback.format_exc()}", flush=True)
        if kernel is None:
            continue
        counts = per_set.setdefault(kernel, [0, 0])
        counts[0] += 1
        counts[1] += not ok
        if counts[0] == len(set_cases(kernel)):
            verdict = "all ok" if counts[1] == 0 else f"{counts[1]} of {counts[0]} failed"
            line = f"kernels {kernel}: {verdict}"
            print(line, flush=True)
            if args.summary is not None:
                with args.summary.open("a") as f:
                    f.write(line + "\n")
    print(f"sanitize_cuda: {failed} of the cases failed" if failed else "sanitize_cuda: all ok")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
