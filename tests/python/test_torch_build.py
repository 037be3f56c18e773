"""bnorm.torch.build_operator_library(): the operator library compiled for the running
torch (what a wheel install needs). Not on both eager paths like test_torch_adapter.py:
this is about getting the C++ one. Skipped, with the reason, without torch, a C++
compiler or the library's source."""

import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch", reason="bnorm.torch needs PyTorch (pip install torch)")

import bnorm.torch as bt  # noqa: E402


def test_build_operator_library(tmp_path):
    """build_operator_library() (for wheel installs) compiles the library into bnorm's
    cache, and a later import finds it there. In a subprocess: a process registers the
    operator library once. Skipped without a C++ compiler or the source."""
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler ($CXX or c++)")
    if not os.path.exists(os.path.join(os.path.dirname(bt.__file__), "_torch_ops.cpp")):
        pytest.skip("this install has no _torch_ops.cpp")
    build = """
import os, torch, bnorm.torch as bt
assert bt._OPS is None  # BNORM_TORCH_OPS=0
path = bt.build_operator_library()
assert path.startswith(os.environ["BNORM_CACHE_DIR"]) and bt._OPS is not None
assert bt.build_operator_library() == path  # once per process
x = torch.randn(8, 3, 5, 5, requires_grad=True)
y = bt.batch_norm(x, None, None, training=True)
y.backward(torch.ones_like(y))
expected = torch.nn.functional.batch_norm(x.detach(), None, None, training=True)
torch.testing.assert_close(y, expected, rtol=1e-4, atol=1e-5)
"""
    env = {**os.environ, "BNORM_CACHE_DIR": str(tmp_path), "BNORM_TORCH_OPS": "0"}
    done = subprocess.run([sys.executable, "-c", build], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    # a later import: the cache's library is found (the one built with bnorm, when it
    # matches this torch, comes first)
    env.pop("BNORM_TORCH_OPS")
    find = "import bnorm.torch as bt; print(bt._find_library())"
    with_bnorm = os.path.join(os.path.dirname(bt.__file__), "_torch_ops.so")
    done = subprocess.run([sys.executable, "-c", find], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = done.stdout.strip()
    assert found == with_bnorm or found.startswith(str(tmp_path)), found
