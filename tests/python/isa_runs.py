"""Runs a check script under each CPU kernel build: BNORM_CPU_ISA forces one in a subprocess."""

import json
import os
import subprocess
import sys

import pytest

import bnorm

ORDER = ["baseline", "avx2", "avx512", "avx512bf16"]
SUPPORTED = ORDER[: ORDER.index(bnorm.cpu_isa()) + 1]


def run_check(isa, script, timeout=300):
    """The JSON object the script prints last, run under `isa` with this folder as argv[1]
    (skips where this CPU cannot run that build; fails on a nonzero exit, with its output)."""
    if isa not in SUPPORTED:
        pytest.skip(f"this CPU runs up to {bnorm.cpu_isa()}, not {isa}")
    env = dict(os.environ, BNORM_CPU_ISA=isa)
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script, here], env=env, capture_output=True, text=True,
                         timeout=timeout)
    assert out.returncode == 0, out.stderr + out.stdout
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["isa"] == isa
    return result


# The start of a check script comparing the bits of elementwise outputs (test_spans,
# test_row_runs): the dtypes, the reference module, `bits`, `offset_empty` and
# `check_backward_elementwise`.
ELEMENTWISE_PRELUDE = r"""import json, sys
import numpy as np
import bnorm
sys.path.insert(0, sys.argv[1])
import reference as ref
try:
    import ml_dtypes
    dtypes = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
except ImportError:
    dtypes = [np.float32, np.float64, np.float16]
STREAM = 4 << 20  # bytes from which outputs stream (kStreamBytes)
rng = np.random.default_rng(0)
checked = 0

def bits(a):
    return a.view(np.uint16 if a.itemsize == 2 else np.uint32 if a.itemsize == 4 else np.uint64)

def offset_empty(shape, dtype, offset):
    # a C-contiguous array `offset` elements into its buffer (not 64-byte aligned)
    n = int(np.prod(shape))
    return np.empty(n + offset, dtype)[offset:].reshape(shape)

def check_backward_elementwise(what, dy, x, y, mean, invstd, w, sum_dy, sum_dy_xhat, other):
    # the backward's elementwise pass (eval mode, backward_elemt; with ReLU's dsum beside
    # dx) on axis 1 against the same call on other = (relayout, its axis, back): one bit pattern
    relayout, axis, back = other
    calls = (
        ("eval", lambda a: bnorm.backward(a["dy"], a["x"], mean, invstd, w, axis=a["axis"], batch_stats=False)),
        ("eval relu", lambda a: bnorm.backward(a["dy"], a["x"], mean, invstd, w, axis=a["axis"],
                                               batch_stats=False, activation="relu", y=a["y"])),
        ("elemt", lambda a: bnorm.backward_elemt(a["dy"], a["x"], mean, invstd, w, sum_dy, sum_dy_xhat, 1000,
                                                 axis=a["axis"])),
        ("elemt relu", lambda a: bnorm.backward_elemt(a["dy"], a["x"], mean, invstd, w, sum_dy, sum_dy_xhat, 1000,
                                                      axis=a["axis"], activation="relu", y=a["y"])),
    )
    for name, call in calls:
        got = call({"dy": dy, "x": x, "y": y, "axis": 1})
        if name == "elemt":  # in place: dx written over dy
            inplace = dy.copy()
            bnorm.backward_elemt(inplace, x, mean, invstd, w, sum_dy, sum_dy_xhat, 1000, axis=1, out=inplace)
            if not np.array_equal(bits(inplace), bits(got)):
                raise SystemExit(f"{what} backward_elemt in place: differs")
        want = call({"dy": relayout(dy), "x": relayout(x), "y": relayout(y), "axis": axis})
        got = got if isinstance(got, tuple) else (got,)
        want = want if isinstance(want, tuple) else (want,)
        for g, r in zip(got, want):
            if g.ndim == x.ndim and not np.array_equal(bits(g), bits(back(r))):
                raise SystemExit(f"{what} backward {name}: differs")
    return len(calls)
"""
