"""Build script: everything but the optional C++/CUDA extension lives in pyproject.toml.

The extension in ``csrc/`` is not written yet (see the native-backend issue); until it is, this
file builds nothing beyond the pure-Python package. When ``csrc/`` gains sources, they are
compiled here through ``torch.utils.cpp_extension`` with ninja, controlled by:

- ``FASTATTN_SKIP_EXT=1``: skip the extension entirely.
- ``FASTATTN_CUDA_ARCHS``: e.g. ``"80;90a"``; the CUDA part builds only where nvcc is present.
- ``MAX_JOBS``: parallel compile jobs (read by torch's ninja builder).
"""

import os
from pathlib import Path

from setuptools import setup


def _ext_modules() -> list:
    if os.environ.get("FASTATTN_SKIP_EXT", "0") == "1":
        return []
    sources = sorted(str(p) for p in Path("csrc").rglob("*.cpp"))
    if not sources:
        return []
    from torch.utils.cpp_extension import CppExtension

    return [CppExtension("fastattn._C", sources, extra_compile_args={"cxx": ["-O3"]})]


def _cmdclass() -> dict:
    if not _ext_modules():
        return {}
    from torch.utils.cpp_extension import BuildExtension

    return {"build_ext": BuildExtension.with_options(use_ninja=True)}


setup(ext_modules=_ext_modules(), cmdclass=_cmdclass())
