"""Test set-up: run the Triton backend through its interpreter on machines without a GPU.

``TRITON_INTERPRET`` must be set before Triton is imported; importing torch and fastattn does
not import Triton, so setting it here is early enough."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

import fastattn  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_report_header(config):
    return (f"fastattn: device={DEVICE}, backends={fastattn.available_backends(DEVICE)}, "
            f"triton interpreter={'on' if INTERPRETED else 'off'}")


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    # A different seed per test and per run (fresh inputs), printed on failure to reproduce.
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    request.node.user_properties.append(("seed", seed))
    yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # The seed goes into the failure report itself: a CI log is often all there is of a failure.
    report = (yield).get_result()
    if report.failed:
        seeds = [value for name, value in item.user_properties if name == "seed"]
        if seeds:
            report.sections.append(("seed", f"torch.manual_seed({seeds[0]}) reproduces the inputs"))


@pytest.fixture(autouse=True, scope="session")
def _no_tuned_table(tmp_path_factory):
    # Tests see the fixed backend order, never a table `fastattn-bench tune` wrote on this
    # machine (tests of the table point FASTATTN_CACHE_DIR at their own directory).
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FASTATTN_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        fastattn.backends.reload_tuned()
        yield
    fastattn.backends.reload_tuned()
