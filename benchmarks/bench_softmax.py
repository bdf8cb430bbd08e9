"""pytest-benchmark suite of softmax: every case of the harness's sweep (quick on CPU) x every
provider x every mode, timed by ``fastattn.bench`` and checked against the reference first."""

import pytest

from fastattn.bench.pytest_plugin import params


@pytest.mark.parametrize(("case", "provider", "mode"), params("softmax"))
def test_softmax(kernel_bench, case, provider, mode):
    kernel_bench("softmax", case, provider, mode)
