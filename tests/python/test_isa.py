"""Every CPU kernel build (baseline, AVX2, AVX-512, AVX-512 BF16) against the float64 reference: each
instruction set the machine runs is forced with BNORM_CPU_ISA in a subprocess."""

import os
import subprocess
import sys

import pytest

import bnorm
from isa_runs import ORDER, run_check

CHECK = r"""
import json, sys
import numpy as np
import bnorm
sys.path.insert(0, sys.argv[1])
import reference as ref
rng = np.random.default_rng(0)
worst = 0.0
cases = [((64, 3, 3000), 1), ((20000, 17), 1), ((16, 4, 20001), 1), ((9, 5, 7, 33), -1), ((70001, 5), 1)]
for dtype, tol in ((np.float32, 2e-5), (np.float64, 1e-12), (np.float16, 2e-3)):
    for shape, axis in cases:
        x = (3 + 2 * rng.standard_normal(shape)).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y, mean, invstd = bnorm.forward_train(x, axis=axis)
        ry, rmean, rinv, _, _ = ref.forward_train(x, None, None, None, None, axis, 0.1)
        dx, dw, db = bnorm.backward(dy, x, mean, invstd, axis=axis)
        rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, None, axis, True)
        for got, want in ((y, ry), (mean, rmean), (invstd, rinv), (dx, rdx), (dw, rdw), (db, rdb)):
            err = float(np.max(np.abs(got.astype(np.float64) - want)) / max(1.0, float(np.max(np.abs(want)))))
            worst = max(worst, err / tol)
print(json.dumps({"isa": bnorm.cpu_isa(), "worst": worst}))
"""


@pytest.mark.parametrize("isa", ORDER)
def test_each_instruction_set_matches_reference(isa):
    result = run_check(isa, CHECK)
    assert result["worst"] <= 1.0, f"{isa}: error {result['worst']:.2f}x the tolerance"


def test_unknown_isa_falls_back_to_best():
    env = dict(os.environ, BNORM_CPU_ISA="no-such-isa")
    out = subprocess.run([sys.executable, "-c", "import bnorm; print(bnorm.cpu_isa())"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == bnorm.cpu_isa()
