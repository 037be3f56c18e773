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
