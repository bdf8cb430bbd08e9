"""Build script: the optional C++/CUDA extension ``fastattn._C``; everything else is in
pyproject.toml.

The extension (``csrc/``) builds with ninja through ``torch.utils.cpp_extension`` against the
torch already installed, so install with ``pip install --no-build-isolation`` after installing
torch: in pip's default isolated build environment torch is not importable, and this script then
builds the pure-Python package only (it never asks pip for torch, which would fetch a CUDA build
of several GB). Switches, read at build time:

- ``FASTATTN_SKIP_EXT=1``: build no extension.
- ``FASTATTN_CUDA_ARCHS``: CUDA architectures, default ``"80;90a"`` (``90a`` enables Hopper-only
  instructions, and with them the Hopper attention kernel on compute capability 9.x). The CUDA
  part builds only where nvcc and a CUDA build of torch are present and ``csrc/`` holds ``.cu``
  files.
- ``MAX_JOBS``: parallel compile jobs (read by torch's ninja builder).

No downloads and no look at the build machine's hardware: the CPU kernels are compiled once per
x86 capability (baseline, AVX2, AVX-512; see ``csrc/common/cpu_target.h``) and the copy is chosen
at run time. ``fastattn/_ext.py`` imports this file to JIT-build the same sources with the same
flags (``FASTATTN_JIT=1``).
"""

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# -fopenmp: at::parallel_for is OpenMP in PyTorch's CPU builds. The warnings silenced come from
# ATen's vector headers (CUDA's #pragma unroll, the AVX-512 ABI note).
CXX_FLAGS = ["-O3", "-fopenmp", "-Wno-unknown-pragmas", "-Wno-psabi"]
LINK_FLAGS = ["-fopenmp"]
DEFAULT_CUDA_ARCHS = "80;90a"


def _capability_rank(path: Path) -> int:
    # Link order: baseline files, then the AVX2 copies, then the AVX-512 copies, so the linker
    # keeps the baseline copy of any inline function several of them emit.
    return 2 if path.stem.endswith("_avx512") else 1 if path.stem.endswith("_avx2") else 0


def cpp_sources(root: Path = ROOT) -> list[Path]:
    """``csrc/**/*.cpp`` in link order."""
    files = (root / "csrc").rglob("*.cpp")
    return sorted(files, key=lambda p: (_capability_rank(p), p.relative_to(root).as_posix()))


def cuda_sources(root: Path = ROOT) -> list[Path]:
    return sorted((root / "csrc").rglob("*.cu"))


def nvcc_flags() -> list[str]:
    archs = [a.strip() for a in
             os.environ.get("FASTATTN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).replace(",", ";").split(";")
             if a.strip()]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    # No --use_fast_math: its approximate expf/logf and flush-to-zero would move results past
    # the twice-PyTorch's-error bound and change inf/NaN handling the tests check.
    # FASTATTN_SM90A: the build holds sm_90a code, so the Hopper kernels may be launched on
    # compute capability 9.x (csrc/attention/attention_cuda_launcher.cuh).
    sm90a = ["-DFASTATTN_SM90A"] if "90a" in archs else []
    return ["-O3", "--expt-relaxed-constexpr", *gencode, *sm90a]


def _say(message: str) -> None:
    print(f"fastattn setup.py: {message}", file=sys.stderr)


def ext_modules() -> list:
    if os.environ.get("FASTATTN_SKIP_EXT", "0") == "1":
        _say("FASTATTN_SKIP_EXT=1: building without the C++ extension")
        return []
    sources = cpp_sources()
    if not sources:
        return []
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        _say("torch is not importable here, so the C++ extension is not built. Install torch "
             "first, then this package with `pip install --no-build-isolation`.")
        return []
    rel = [p.relative_to(ROOT).as_posix() for p in sources]
    cu = [p.relative_to(ROOT).as_posix() for p in cuda_sources()]
    include = [str(ROOT / "csrc")]
    if cu and cpp_extension.CUDA_HOME is not None and torch.version.cuda is not None:
        return [cpp_extension.CUDAExtension(
            "fastattn._C", rel + cu, include_dirs=include, extra_link_args=LINK_FLAGS,
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": nvcc_flags()})]
    if cu:
        _say("no nvcc or no CUDA build of torch: building the CPU part of the extension only")
    return [cpp_extension.CppExtension("fastattn._C", rel, include_dirs=include,
                                       extra_compile_args={"cxx": CXX_FLAGS},
                                       extra_link_args=LINK_FLAGS)]


def _build_ext() -> type:
    from torch.utils.cpp_extension import BuildExtension

    class BuildExt(BuildExtension):
        """torch's ninja builder, linking the objects in capability order: setuptools sorts the
        sources by name, which would put csrc/cross_entropy/*_avx512 before csrc/softmax/."""

        def build_extension(self, ext):
            link = self.compiler.link

            def link_in_order(target_desc, objects, *args, **kwargs):
                objects = sorted(objects, key=lambda o: _capability_rank(Path(o)))
                return link(target_desc, objects, *args, **kwargs)

            self.compiler.link = link_in_order
            try:
                super().build_extension(ext)
            finally:
                self.compiler.link = link

    return BuildExt.with_options(use_ninja=True)


def main() -> None:
    from setuptools import setup

    modules = ext_modules()
    setup(ext_modules=modules, cmdclass={"build_ext": _build_ext()} if modules else {})


if __name__ == "__main__":
    main()
