"""pytest-benchmark suites of fastattn: ``python -m pytest benchmarks`` (add
``--benchmark-disable`` for a correctness-only smoke run, ``--benchmark-json PATH`` to save).

Timing comes from ``fastattn.bench`` (CUDA events with L2 flushes on a GPU), not from
pytest-benchmark's host clock; see ``fastattn/bench/pytest_plugin.py``.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton providers are reported as skipped on CPU either way; the interpreter keeps the
    # backend list the same as in the test suite.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastattn.bench.pytest_plugin import (  # noqa: E402
    _bench_baselines,
    bench_ceilings,
    kernel_bench,
    pytest_benchmark_compare_machine_info,
    pytest_benchmark_update_machine_info,
)

__all__ = ["_bench_baselines", "bench_ceilings", "kernel_bench",
           "pytest_benchmark_compare_machine_info", "pytest_benchmark_update_machine_info"]


def pytest_collect_file(file_path, parent):
    # The suites are named bench_<op>.py, one per op like tests/test_<op>.py. A file named on
    # the command line is collected by pytest itself already.
    if (file_path.suffix == ".py" and file_path.name.startswith("bench_")
            and not parent.session.isinitpath(file_path)):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
