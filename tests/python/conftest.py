"""Shared pytest configuration and fixtures for the bnorm Python tests.

The data makers, tolerances and comparison helpers live in reference.py beside the
float64 reference implementation (import them with `import reference as ref`).
"""

import os
import sys
import zlib

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import reference as ref  # noqa: E402

try:
    from hypothesis import HealthCheck, settings

    settings.register_profile(
        "bnorm",
        max_examples=int(os.environ.get("BNORM_HYPOTHESIS_EXAMPLES", "30")),
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        derandomize=os.environ.get("CI") is not None,
    )
    settings.load_profile("bnorm")
except ImportError:  # hypothesis is optional: test_properties.py skips itself then
    pass


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: a test that takes over a minute (still run by default)")


@pytest.fixture
def rng(request):
    """A NumPy Generator seeded from the test's node id: reproducible, distinct per test.
    BNORM_TEST_SEED=n draws different (still reproducible) data."""
    extra = os.environ.get("BNORM_TEST_SEED", "")
    return np.random.default_rng(zlib.crc32((request.node.nodeid + extra).encode()))


@pytest.fixture
def restore_threads():
    """Restore bnorm's thread count after a test that changes it."""
    import bnorm

    n = bnorm.get_num_threads()
    yield n
    bnorm.set_num_threads(n)


def _case_id(p):
    (shape, axis), view, dtype = p
    return f"{'x'.join(map(str, shape))}-ax{axis}-{view}-{np.dtype(dtype).name}"


_CASE_PARAMS = [(layout, view, dtype)
                for layout in ref.LAYOUTS for view in ref.VIEWS for dtype in ref.DTYPES]


@pytest.fixture(params=_CASE_PARAMS, ids=[_case_id(p) for p in _CASE_PARAMS])
def case(request, rng):
    """Every layout (2-D..5-D, several axes) x memory view x dtype, with random data."""
    (shape, axis), view, dtype = request.param
    x = ref.make_x(rng, shape, axis, dtype, view)
    dy = ref.make_dy(rng, shape, dtype, view, axis)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, dtype)
    return ref.Case(x, dy, axis, np.dtype(dtype), w, b, rm, rv)


@pytest.fixture(params=["cpp", "python"])
def torch_eager_path(request, monkeypatch):
    """Runs a bnorm.torch test on each eager path: the C++ operator library (skipped, with
    the reason, where bnorm was built without it; BNORM_REQUIRE_TORCH_OPS=1 fails instead)
    and the Python autograd.Function that serves when it is absent."""
    import bnorm.torch as bt

    if request.param == "cpp" and bt._OPS is None:
        reason = "bnorm was built without its PyTorch operator library (cmake/torch_ops.cmake)"
        if os.environ.get("BNORM_REQUIRE_TORCH_OPS") == "1":
            pytest.fail(f"BNORM_REQUIRE_TORCH_OPS=1 but {reason}")
        pytest.skip(reason)
    if request.param == "python":
        monkeypatch.setattr(bt, "_OPS", None)
    return request.param
