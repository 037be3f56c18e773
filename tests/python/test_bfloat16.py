"""bfloat16 x on the CPU (ml_dtypes.bfloat16): every op and layout against the float64
reference with bfloat16 rounding tolerances, round-to-nearest-even bitwise as ml_dtypes
rounds under every kernel build, bitwise for any thread count, and bad input."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

import bnorm
import reference as ref

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)

# bfloat16 keeps 8 significant bits: outputs are rounded to 2^-9 relative; statistics and
# the per-channel results are float32, from inputs that are exact in float32.
OUT, STAT = 8e-3, 1e-5
VIEWS = ("contiguous", "permuted", "sliced")


def bf16(a):
    return np.asarray(a, np.float32).astype(BF16)


@pytest.fixture(params=[(layout, view) for layout in ref.LAYOUTS for view in VIEWS],
                ids=lambda p: f"{'x'.join(map(str, p[0][0]))}-ax{p[0][1]}-{p[1]}")
def case(request, rng):
    (shape, axis), view = request.param
    x = ref.empty_view(shape, BF16, view, axis)
    x[...] = bf16(ref.make_x(rng, shape, axis, np.float32))
    dy = ref.empty_view(shape, BF16, view, axis)
    dy[...] = bf16(rng.standard_normal(shape))
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, np.float16)  # float32 parameters, as for float16
    return ref.Case(x, dy, axis, BF16, w, b, rm, rv)


def test_forward_train(case):
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    y, mean, invstd = bnorm.forward_train(case.x, case.weight, case.bias, rm, rv, axis=case.axis, momentum=0.2)
    assert y.dtype == BF16 and mean.dtype == invstd.dtype == np.float32 and y.shape == case.x.shape
    ry, rmean, rinv, rrm, rrv = ref.forward_train(case.x.astype(np.float32), case.weight, case.bias,
                                                  case.running_mean, case.running_var, case.axis, 0.2)
    ref.assert_close(y.astype(np.float32), ry, OUT, "y")
    ref.assert_close(mean, rmean, STAT, "mean")
    ref.assert_close(invstd, rinv, STAT, "invstd")
    ref.assert_close(rm, rrm, STAT, "running_mean")
    ref.assert_close(rv, rrv, STAT, "running_var")


def test_forward_infer_and_normalize(case):
    y = bnorm.forward_infer(case.x, case.running_mean, case.running_var, case.weight, case.bias, axis=case.axis)
    x32 = case.x.astype(np.float32)
    want = ref.forward_infer(x32, case.running_mean, case.running_var, case.weight, case.bias, case.axis)
    ref.assert_close(y.astype(np.float32), want, OUT, "forward_infer")
    _, mean, var = ref.batch_stats(x32, case.axis)
    invstd = ref.invstd_of(var).astype(np.float32)
    y = bnorm.normalize(case.x, mean.astype(np.float32), invstd, case.weight, case.bias, axis=case.axis)
    ref.assert_close(y.astype(np.float32), ref.normalize(x32, mean, invstd, case.weight, case.bias, case.axis), OUT)


@pytest.mark.parametrize("batch_stats", [True, False])
def test_backward(case, batch_stats):
    x32, dy32 = case.x.astype(np.float32), case.dy.astype(np.float32)
    _, mean, var = ref.batch_stats(x32, case.axis)
    mean, invstd = mean.astype(np.float32), ref.invstd_of(var).astype(np.float32)
    dx, dw, db = bnorm.backward(case.dy, case.x, mean, invstd, case.weight, axis=case.axis, batch_stats=batch_stats)
    assert dx.dtype == BF16
    rdx, rdw, rdb = ref.backward(dy32, x32, mean, invstd, case.weight, case.axis, batch_stats)
    ref.assert_close(dx.astype(np.float32), rdx, OUT, "dx")
    ref.assert_close(dw, rdw, STAT, "dweight")
    ref.assert_close(db, rdb, STAT, "dbias")


def test_split_phases(case):
    x32, dy32 = case.x.astype(np.float32), case.dy.astype(np.float32)
    count, mean, var = bnorm.batch_stats(case.x, axis=case.axis)
    rcount, rmean, rvar = ref.batch_stats(x32, case.axis)
    assert count == rcount
    ref.assert_close(mean, rmean, STAT, "mean")
    ref.assert_close(var, rvar, STAT, "var")
    invstd = (1 / np.sqrt(var.astype(np.float64) + 1e-5)).astype(np.float32)
    sum_dy, sum_dy_xhat = bnorm.backward_reduce(case.dy, case.x, mean, invstd, axis=case.axis)
    rs, rsx = ref.backward_reduce(dy32, x32, mean, invstd, case.axis)
    ref.assert_close(sum_dy, rs, STAT, "sum_dy")
    ref.assert_close(sum_dy_xhat, rsx, STAT, "sum_dy_xhat")
    dx = bnorm.backward_elemt(case.dy, case.x, mean, invstd, case.weight, sum_dy, sum_dy_xhat, count, axis=case.axis)
    want = ref.backward_elemt(dy32, x32, mean, invstd, case.weight, sum_dy, sum_dy_xhat, count, case.axis)
    ref.assert_close(dx.astype(np.float32), want, OUT, "dx")


def test_out_and_layer(rng):
    x = bf16(ref.make_x(rng, (6, 3, 5), 1, np.float32))
    out = np.empty((6, 5, 3), BF16).transpose(0, 2, 1)  # a non-contiguous out
    y = bnorm.forward_infer(x, np.zeros(3, np.float32), np.ones(3, np.float32), out=out)
    assert y is out
    ref.assert_close(out.astype(np.float32), x.astype(np.float64) / np.sqrt(1 + 1e-5), OUT)
    x2 = x.copy()
    assert bnorm.normalize(x2, np.zeros(3, np.float32), np.ones(3, np.float32), out=x2) is x2
    for dtype in (np.float32, BF16, "bfloat16"):
        bn = bnorm.BatchNorm(3, dtype=dtype)
        y = bn(x)
        dx = bn.backward(bf16(np.ones(x.shape)))
        assert y.dtype == dx.dtype == BF16 and bn.running_var.dtype == np.float32
    assert "dtype=bfloat16" in repr(bnorm.BatchNorm(3, dtype="bfloat16"))


def test_fold_bfloat16(rng):
    w = bf16(rng.standard_normal((4, 6)))
    mean, var = rng.uniform(-1, 1, 4).astype(np.float32), rng.uniform(0.5, 2, 4).astype(np.float32)
    w2, b2 = bnorm.fold(w, None, mean, var)
    assert w2.dtype == b2.dtype == BF16
    scale = 1 / np.sqrt(var.astype(np.float64) + 1e-5)
    ref.assert_close(w2.astype(np.float32), w.astype(np.float64) * scale[:, None], OUT)
    ref.assert_close(b2.astype(np.float32), -mean * scale, OUT)


# Rounding: normalize without weight and bias computes y = ((x - mean) - 0) * invstd + 0 in
# float32; the kernels' rounding to bfloat16 must be ml_dtypes' bit for bit, NaN, infinity,
# overflow, subnormals and ties included, under every kernel build (avx512bf16's
# vcvtneps2bf16 reads subnormal inputs as zero: its kernels must fix those lanes up).
ROUNDING = r"""
import json, sys
import numpy as np, ml_dtypes
import bnorm
bf16 = np.dtype(ml_dtypes.bfloat16)

def case(run, rows, relu):
  rng = np.random.default_rng(1)
  C = run if rows else 8  # rows: (N, run) with run channels; planes: (N, 8, run)
  shape = (max(8, 120000 // run), run) if rows else (max(3, 120000 // run), 8, run)
  bits = rng.integers(0, 1 << 16, shape, dtype=np.uint16)   # every kind of bfloat16 input
  x = bits.view(bf16)
  mean = rng.standard_normal(C).astype(np.float32)
  invstd = np.exp(rng.uniform(-3, 3, C)).astype(np.float32)
  invstd[0] = 1.0
  mean[:2] = 0.0  # channels 0 and 1 pass subnormal inputs on: exact (0), to be rounded (1)
  invstd[1] = 0.7
  y = bnorm.normalize(x, mean, invstd, activation="relu" if relu else None)
  per_channel = (slice(None),) if rows else (slice(None), None)
  f = (x.astype(np.float32) - mean[per_channel]) - np.float32(0)
  f = f * invstd[per_channel] + np.float32(0)
  if relu:
      f = np.where(np.isnan(f) | (f > 0), f, np.float32(0))
  want = f.astype(bf16)
  ties = int(np.sum((f.view(np.uint32) & 0xffff) == 0x8000))
  same = (y.view(np.uint16) == want.view(np.uint16)) | (np.isnan(f) & np.isnan(y.astype(np.float32)))
  return {"mismatches": int(np.sum(~same)), "ties": ties, "nan": int(np.isnan(f).sum()),
          "inf": int(np.isinf(f).sum()),
          "subnormal": int(np.sum((f != 0) & (np.abs(f) < np.finfo(np.float32).tiny)))}

# every case in one process per kernel build: the cases' arrays are small, the start-up is not
cases = json.loads(sys.argv[1])
print(json.dumps({"isa": bnorm.cpu_isa(),
                  "results": [case(int(run), layout == "rows", relu == "relu") for run, layout, relu in cases]}))
"""
ORDER = ["baseline", "avx2", "avx512", "avx512bf16"]


# (runs of 40001 and 40017 are written with ordinary stores, of 200001 (9.6 MB) with
# non-temporal ones: in the avx512bf16 build each path narrows groups of 8 vectors, then
# the streamed one pairs, the other the rest of the run held whole (store_end: 0 to 7
# vectors and a tail; runs of 16 to 64 elements are all rest; a rest of whole pairs, as in
# runs of 64 and 160, is narrowed pair by pair), each vector through the exact narrowing
# where a lane is subnormal; runs of 40017 leave a single vector as well.
# Rows of 100, 512 and 1000 channels: write_rows narrows pairs of rows at once
# (store_rows), rows of 16 a positions view of 256-element rows, and 1000 leaves a tail)
# With ReLU, zeros beside subnormal lanes in the same group (the narrowing tests a group's
# zero words first, then its subnormal lanes): the run ends, streamed lines, pairs of rows.
ROUNDING_RUNS = [(run, None) for run in (16, 20, 33, 49, 64, 160, 40001, 40017, 200001, "rows16", "rows100",
                                         "rows512", "rows1000")] + [(run, "relu") for run in (49, 64, 40017, 200001,
                                                                                              "rows100", "rows512")]


_ROUNDING_RESULTS = {}


def rounding_results(isa):
    """Every case of ROUNDING_RUNS under kernel build isa, in one subprocess (run once)."""
    if isa not in _ROUNDING_RESULTS:
        cases = [(str(run).removeprefix("rows"), "rows" if str(run).startswith("rows") else "planes",
                  str(activation)) for run, activation in ROUNDING_RUNS]
        out = subprocess.run([sys.executable, "-c", ROUNDING, json.dumps(cases)],
                             env=dict(os.environ, BNORM_CPU_ISA=isa), capture_output=True, text=True,
                             timeout=600)
        assert out.returncode == 0, out.stderr
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["isa"] == isa
        _ROUNDING_RESULTS[isa] = dict(zip(ROUNDING_RUNS, result["results"]))
    return _ROUNDING_RESULTS[isa]


@pytest.mark.parametrize("run,activation", ROUNDING_RUNS)
@pytest.mark.parametrize("isa", ORDER)
def test_rounding_is_ml_dtypes_bitwise(isa, run, activation):
    if isa not in ORDER[: ORDER.index(bnorm.cpu_isa()) + 1]:
        pytest.skip(f"this CPU runs up to {bnorm.cpu_isa()}, not {isa}")
    result = rounding_results(isa)[run, activation]
    assert result["ties"] > 0 and result["nan"] > 0 and result["inf"] > 0 and result["subnormal"] > 0, result
    assert result["mismatches"] == 0, result


@pytest.mark.parametrize("layout", [((64, 16, 49), 1), ((40000, 17), 1), ((2, 200003), 1), ((8, 7, 7, 64), -1)])
def test_bitwise_for_any_thread_count(rng, restore_threads, layout):
    shape, axis = layout
    x = bf16(ref.make_x(rng, shape, axis, np.float32))
    dy = bf16(rng.standard_normal(shape))
    results = []
    for n in (1, 2, 3):
        bnorm.set_num_threads(n)
        y, mean, invstd = bnorm.forward_train(x, axis=axis)
        dx, dw, db = bnorm.backward(dy, x, mean, invstd, axis=axis)
        results.append([a.view(np.uint8) for a in (y, mean, invstd, dx, dw, db)])
    for other in results[1:]:
        for a, b in zip(results[0], other):
            np.testing.assert_array_equal(a, b)


def test_bad_input():
    x = bf16(np.ones((4, 3)))
    with pytest.raises(TypeError, match="weight must be float32 for bfloat16 x, got float64"):
        bnorm.forward_train(x, np.ones(3))
    with pytest.raises(TypeError, match="dy must have x's dtype bfloat16, got float32"):
        bnorm.backward(np.ones((4, 3), np.float32), x, np.zeros(3, np.float32), np.ones(3, np.float32))
    with pytest.raises(TypeError, match="out must have x's dtype bfloat16, got float16"):
        bnorm.normalize(x, np.zeros(3, np.float32), np.ones(3, np.float32), out=np.empty((4, 3), np.float16))
    with pytest.raises(TypeError, match="x must be one of .*bfloat16.*, got uint16"):  # raw bits are not bfloat16
        bnorm.forward_train(x.view(np.uint16))
    with pytest.raises(TypeError, match="this layer's parameters are float64"):
        bnorm.BatchNorm(3, dtype=np.float64)(x)


def test_ml_dtypes_missing(monkeypatch):
    """Without ml_dtypes, naming bfloat16 gives an ImportError that says what to install."""
    from bnorm import _functional

    monkeypatch.setitem(sys.modules, "ml_dtypes", None)  # import ml_dtypes now fails
    monkeypatch.setattr(_functional, "_BFLOAT16", None)  # and bnorm has not imported it yet
    with pytest.raises(ImportError, match=r"bfloat16 on the CPU needs the ml_dtypes package \(pip install ml_dtypes\)"):
        bnorm.BatchNorm(3, dtype="bfloat16")
    with pytest.raises(ImportError, match="needs the ml_dtypes package"):
        _functional._NumPy.empty((2, 3), "bfloat16")


def test_bench_rows(tmp_path):
    """python -m bnorm.bench --dtype bfloat16 runs, its outputs agree with NumPy's (and
    PyTorch's bfloat16 CPU batch norm, when installed)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bnorm.bench", "--shapes", "5x4x3x3:1,3x4x4x6:-1", "--dtype", "bfloat16",
         "--repeat", "1", "--warmup", "1", "--threads", "1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "### bfloat16" in proc.stdout
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    assert len(rows) == 6 and all("| ok " in r for r in rows), proc.stdout


@pytest.mark.parametrize("shape", [(8, 4, 5, 5), (64, 6)])
def test_against_torch_bfloat16(rng, shape):
    """PyTorch's bfloat16 CPU batch norm, through a zero-copy int16 view of the tensor."""
    torch = pytest.importorskip("torch")
    t = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32) * 2 + 1).to(torch.bfloat16)
    x = t.view(torch.int16).numpy().view(BF16)
    assert np.shares_memory(x, t.view(torch.int16).numpy())
    w = torch.from_numpy(rng.uniform(0.5, 1.5, shape[1]).astype(np.float32))
    b = torch.from_numpy(rng.uniform(-1, 1, shape[1]).astype(np.float32))
    rm, rv = torch.zeros(shape[1]), torch.ones(shape[1])
    want = torch.nn.functional.batch_norm(t, rm, rv, w, b, training=True, momentum=0.1, eps=1e-5)
    rm2, rv2 = np.zeros(shape[1], np.float32), np.ones(shape[1], np.float32)
    y, _, _ = bnorm.forward_train(x, w.numpy(), b.numpy(), rm2, rv2, momentum=0.1)
    ref.assert_close(y.astype(np.float32), want.float().numpy(), 2 * OUT)
    ref.assert_close(rm2, rm.numpy(), 1e-5)
    ref.assert_close(rv2, rv.numpy(), 1e-5)
