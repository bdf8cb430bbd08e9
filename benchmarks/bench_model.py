"""pytest-benchmark suite of the reference model's training step: every case of the harness's
sweep (quick on CPU) x every provider x every mode, timed by ``fastattn.bench`` and checked
against the reference first."""

import pytest

from fastattn.bench.pytest_plugin import params


@pytest.mark.parametrize(("case", "provider", "mode"), params("model"))
def test_model(kernel_bench, case, provider, mode):
    kernel_bench("model", case, provider, mode)
