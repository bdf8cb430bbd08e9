"""pytest-benchmark suite of cross_entropy: every case of the harness's sweep (quick on CPU) x every
provider x every mode, timed by ``fastattn.bench`` and checked against the reference first."""

import pytest

from fastattn.bench.pytest_plugin import params


@pytest.mark.parametrize(("case", "provider", "mode"), params("cross_entropy"))
def test_cross_entropy(kernel_bench, case, provider, mode):
    kernel_bench("cross_entropy", case, provider, mode)
