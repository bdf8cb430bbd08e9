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

    def build(kernel, constants, pointers):
        nonlocal count
        def kind(name):
            if name in constants:
                return "constexpr"
            if name in pointers:
                return pointers[name]
            return "fp32" if name.endswith(("_hi", "_lo")) else "i64"
        signature = {name: kind(name) for name in kernel.arg_names}
        for arch in (80, 90):
            compiled = triton.compile(ASTSource(kernel, signature, constants),
                                      target=GPUTarget("cuda", arch, 32))
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


# Every kernel family, lowered for both architectures the project targets.
@pytest.mark.parametrize("family,expected", [("softmax", 2 * 3 * 3 * 2 * 2 * 2),
                                             ("cross_entropy", 2 * 3 * 2 * 2 * 2)])
def test_kernels_compile_for_sm80_and_sm90(family, expected):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, __file__, family], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.split()[-1] == str(expected)


if __name__ == "__main__":
    print(_compile_all(sys.argv[1]))
