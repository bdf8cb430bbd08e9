"""Compile the Triton kernels ahead of time for sm_80 and sm_90 on any machine (no GPU needed).

The interpreter runs kernels as numpy and accepts code the real compiler rejects (inconsistent
types across branches, unsupported ops), so every kernel family is also lowered to PTX and
assembled with Triton's bundled ptxas, before a GPU lease is spent on it. The compilation runs
in a subprocess without ``TRITON_INTERPRET``, since under the interpreter ``triton.jit`` gives
functions that cannot be compiled."""

import itertools
import os
import subprocess
import sys

import pytest


def _compile_all(family: str) -> int:
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from fastattn.triton import cross_entropy as ce_kernels
    from fastattn.triton import softmax as softmax_kernels

    # fp16 lowers like bf16 (both load, convert, accumulate in fp32); not repeated here.
    floats = [("*bf16", tl.float32), ("*fp32", tl.float32), ("*fp64", tl.float64)]
    count = 0

    def build(kernel, constants, pointers, floats=(), archs=(80, 90), ints="i64", **options):
        nonlocal count
        def kind(name):
            if name in constants:
                return "constexpr"
            if name in pointers:
                return pointers[name]
            return "fp32" if name.endswith(("_hi", "_lo")) or name in floats else ints
        signature = {name: kind(name) for name in kernel.arg_names}
        for arch in archs:
            compiled = triton.compile(ASTSource(kernel, signature, constants),
                                      target=GPUTarget("cuda", arch, 32), options=options)
            assert compiled.asm["cubin"], (kernel, constants, arch)
            count += 1

    if family == "softmax":
        # Each dtype, each mask kind, the one-block and the online path, softmax and log.
        for (ptr, acc), (kind, mask_ptr), (single, block), log in itertools.product(
                floats, [(0, None), (1, "*u8"), (2, None)], [(True, 8192), (False, 4096)],
                [False, True]):
            mask_ptr = mask_ptr or ptr
            constants = dict(MASK_KIND=kind, CAUSAL=kind == 1, LOG=log, ACC=acc, BLOCK=block,
                             SINGLE=single)
            build(softmax_kernels._softmax_fwd_kernel, constants,
                  {"x_ptr": ptr, "out_ptr": ptr, "mask_ptr": mask_ptr})
            build(softmax_kernels._softmax_bwd_kernel, constants,
                  {"g_ptr": ptr, "y_ptr": ptr, "dx_ptr": ptr, "mask_ptr": mask_ptr})
    elif family == "attention":
        _compile_attention(build)
    else:
        # Class-index and probability targets, one block and online, every option off and on.
        for (ptr, acc), probability, single, on in itertools.product(
                floats, [False, True], [True, False], [False, True]):
            constants = dict(HAS_WEIGHT=on, PROB=probability, SMOOTH=on, SOFTCAP=on, ZLOSS=on,
                             GRAD=True, MEAN=on, SINGLE=single, BLOCK=4096, ACC=acc)
            build(ce_kernels._cross_entropy_fwd_kernel, constants,
                  {"x_ptr": ptr, "t_ptr": ptr if probability else "*i64", "w_ptr": "*fp32",
                   "g_ptr": ptr, "loss_ptr": "*fp32", "lse_ptr": "*fp32",
                   "inv_denom_ptr": "*fp32"})
    return count


def _compile_attention(build):
    from fastattn.triton import attention as at

    # Each kernel with every option off, with every option on (bool mask, softcap, dropout, a
    # two-sided window, padded head dims 64 > 59 and 128 > 111), and at head dim 256 with an
    # additive mask and causal; bf16 on both architectures (the forward through pointers on
    # sm_80 and tensor descriptors on sm_90), fp32 (IEEE dots) on sm_90. Tiles and warps are
    # the largest the autotuner may pick for that head dim.
    off = dict(HAS_MASK=False, BOOL_MASK=False, SOFTCAP=False, DROPOUT=False, HAS_LEFT=False,
               HAS_RIGHT=False, PAD_D=False, PAD_DV=False, BLOCK_D=128, BLOCK_DV=128)
    on = dict(off, HAS_MASK=True, BOOL_MASK=True, SOFTCAP=True, DROPOUT=True, HAS_LEFT=True,
              HAS_RIGHT=True, PAD_D=True, PAD_DV=True, BLOCK_D=64)
    wide = dict(off, HAS_MASK=True, HAS_RIGHT=True, BLOCK_D=256, BLOCK_DV=256)
    tiles = {"fwd": (128, 64), "dkdv": (64, 128), "dq": (128, 64)}
    kernels = {"fwd": at._attention_fwd_kernel, "dkdv": at._attention_bwd_dkdv_kernel,
               "dq": at._attention_bwd_dq_kernel}
    variants = [("*bf16", off, (80, 90)), ("*bf16", on, (80, 90)), ("*bf16", wide, (80, 90)),
                ("*fp32", off, (90,))]
    for (name, kernel), (dtype, opts, archs) in itertools.product(kernels.items(), variants):
        m, n = tiles[name] if opts["BLOCK_D"] < 256 else (64, 64) if name == "fwd" else (32, 64)
        constants = dict(opts, BLOCK_M=m, BLOCK_N=n,
                         PRECISION="ieee" if dtype == "*fp32" else "tf32")
        if name == "dkdv":
            constants.update(ATOMIC_DQ=True, WRITE_DS=opts["HAS_MASK"])
        pointers = {p: dtype for p in ("Q", "K", "V", "Out", "DO", "DK", "DV_", "DQ")}
        pointers.update(Mask="*u8" if opts["BOOL_MASK"] else dtype, Seed="*i64", Lse="*fp32",
                        Delta="*fp32", DS="*fp32")
        if name == "dkdv":
            pointers["DQ"] = "*fp32"
        paths = [(archs, None)]
        if name == "fwd":  # bf16: pointers on sm_80, tensor descriptors (TMA) on sm_90
            paths = [((80,), False), ((90,), True)] if dtype == "*bf16" else [(archs, False)]
        for path_archs, tma in paths:
            extra = {} if tma is None else {"TMA": tma}
            build(kernel.fn, dict(constants, **extra), pointers, archs=path_archs, ints="i32",
                  floats=("qk_scale", "cap2", "drop_p", "drop_scale", "sm_scale"),
                  num_warps=8 if m * n >= 8192 else 4, num_stages=2)
    build(at._attention_bwd_delta_kernel, dict(BLOCK_M=64, BLOCK_DV=128),
          {"Out": "*bf16", "DO": "*bf16", "Delta": "*fp32"}, ints="i32")
    build(at._dropout_mask_kernel, dict(BLOCK_M=32, BLOCK_N=32),
          {"Seed": "*i64", "Keep": "*i8"}, floats=("drop_p",), ints="i32")


# Every kernel family, lowered for both architectures the project targets.
@pytest.mark.parametrize("family,expected", [("softmax", 2 * 3 * 3 * 2 * 2 * 2),
                                             ("cross_entropy", 2 * 3 * 2 * 2 * 2),
                                             ("attention", 3 * (3 * 2 + 1) + 2 * 2)])
def test_kernels_compile_for_sm80_and_sm90(family, expected):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, family], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-1] == str(expected)


if __name__ == "__main__":
    print(_compile_all(sys.argv[1]))
