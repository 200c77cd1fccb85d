import os

# Without a GPU the Triton kernels run in the interpreter; this must happen before anything imports triton.
# On a GPU machine they run compiled (set TRITON_INTERPRET yourself to force the interpreter there).
if not os.path.exists("/proc/driver/nvidia/version"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

import sys
import zlib

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))  # so test modules can `import oracle`

import appo_kernels
from appo_kernels.backends import BackendUnsupported


def _backends():
    return list(appo_kernels.available_backends())


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: runs a big subprocess (memory probes); deselect with -m 'not slow'")
    # keep the suite's CPU use predictable on small CI machines
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    # A backend that does not implement an op (or dtype) raises BackendUnsupported when named explicitly. For
    # the backend-parametrised tests that means "not applicable" only where docs/api.md's support table says
    # so; anywhere else the backend broke a documented promise, and the test fails.
    try:
        return (yield)
    except BackendUnsupported as err:
        from helpers import documented_unsupported
        topk = int(err.features.get("topk", 0))
        if all(not documented_unsupported(err.backend, op, err.device.type, err.dtype, topk) for op in err.ops):
            raise
        pytest.skip(f"documented as unsupported: {err}")


@pytest.fixture(params=_backends())
def backend(request):
    return request.param


@pytest.fixture
def seed(request):
    """A seed derived from the test id: fresh data per test, reproducible run to run.  Set APPO_TEST_SEED to
    draw a different (still reproducible) data set everywhere, e.g. to fuzz the suite."""
    salt = os.environ.get("APPO_TEST_SEED", "")
    return zlib.crc32((request.node.nodeid + salt).encode())


@pytest.fixture
def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def value_checks_restored():
    """Restore appo_kernels' value checks after a test that switches them off."""
    yield
    appo_kernels.set_value_checks(True)
