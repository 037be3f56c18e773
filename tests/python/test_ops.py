"""Every bnorm function against the float64 reference, for every layout, view and dtype.

The `case` fixture (conftest.py) spans 2-D..5-D shapes, channel axes 1, -1 and others,
C-contiguous / transposed / permuted / sliced / negative-stride views, and float32,
float64, float16 x.
"""

import numpy as np
import pytest

import bnorm
import reference as ref
from reference import assert_close


def _snapshot(*arrays):
    return [None if a is None else a.copy() for a in arrays]


def _unchanged(before, *arrays):
    for b, a in zip(before, arrays):
        if a is not None:
            ref.assert_bitwise(a, b, "input modified")


def _check_out(y, x):
    assert isinstance(y, np.ndarray)
    assert y.shape == x.shape
    assert y.dtype == x.dtype


def _check_stat(s, case):
    assert isinstance(s, np.ndarray)
    assert s.shape == (case.channels,)
    assert s.dtype == case.pdtype


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("track", [True, False], ids=["running", "norunning"])
def test_forward_train(case, affine, track):
    momentum = 0.3
    w, b = (case.weight, case.bias) if affine else (None, None)
    rm, rv = (case.running_mean.copy(), case.running_var.copy()) if track else (None, None)
    before = _snapshot(case.x, w, b)
    y, mean, invstd = bnorm.forward_train(case.x, w, b, rm, rv, axis=case.axis,
                                          momentum=momentum, eps=1e-5)
    _unchanged(before, case.x, w, b)
    ry, rmean, rinvstd, rrm, rrv = ref.forward_train(
        case.x, w, b, case.running_mean if track else None,
        case.running_var if track else None, case.axis, momentum, 1e-5)
    _check_out(y, case.x)
    _check_stat(mean, case)
    _check_stat(invstd, case)
    assert_close(y, ry, case.tol("out"), "y")
    assert_close(mean, rmean, case.tol("stat"), "save_mean")
    assert_close(invstd, rinvstd, case.tol("stat"), "save_invstd")
    if track:
        assert rm.dtype == case.pdtype and rv.dtype == case.pdtype
        assert_close(rm, rrm, case.tol("stat"), "running_mean")
        assert_close(rv, rrv, case.tol("stat"), "running_var")


def test_forward_train_out(case):
    out = np.full(case.x.shape, 7, case.dtype)
    y, mean, invstd = bnorm.forward_train(case.x, case.weight, case.bias, axis=case.axis,
                                          out=out)
    assert np.shares_memory(y, out)
    ry = ref.forward_train(case.x, case.weight, case.bias, axis=case.axis)[0]
    assert_close(out, ry, case.tol("out"), "out")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_forward_infer(case, affine):
    eps = 1e-3
    w, b = (case.weight, case.bias) if affine else (None, None)
    before = _snapshot(case.x, w, b, case.running_mean, case.running_var)
    y = bnorm.forward_infer(case.x, case.running_mean, case.running_var, w, b,
                            axis=case.axis, eps=eps)
    _unchanged(before, case.x, w, b, case.running_mean, case.running_var)
    _check_out(y, case.x)
    ry = ref.forward_infer(case.x, case.running_mean, case.running_var, w, b, case.axis, eps)
    assert_close(y, ry, case.tol("out"), "y")


def test_forward_infer_out(case):
    out = np.full(case.x.shape, 7, case.dtype)
    y = bnorm.forward_infer(case.x, case.running_mean, case.running_var, case.weight,
                            case.bias, axis=case.axis, out=out)
    assert np.shares_memory(y, out)
    ry = ref.forward_infer(case.x, case.running_mean, case.running_var, case.weight,
                           case.bias, case.axis)
    assert_close(out, ry, case.tol("out"), "out")


def _saved_stats(case):
    """Batch statistics of x in the parameter dtype, as forward_train would save them."""
    _, mean, var = ref.batch_stats(case.x, case.axis)
    return mean.astype(case.pdtype), ref.invstd_of(var).astype(case.pdtype)


def _fixed_stats(case):
    return case.running_mean, ref.invstd_of(case.running_var).astype(case.pdtype)


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "fixed"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward(case, batch_stats, affine):
    mean, invstd = _saved_stats(case) if batch_stats else _fixed_stats(case)
    w = case.weight if affine else None
    before = _snapshot(case.dy, case.x, mean, invstd, w)
    dx, dw, db = bnorm.backward(case.dy, case.x, mean, invstd, w, axis=case.axis,
                                batch_stats=batch_stats)
    _unchanged(before, case.dy, case.x, mean, invstd, w)
    rdx, rdw, rdb = ref.backward(case.dy, case.x, mean, invstd, w, case.axis, batch_stats)
    _check_out(dx, case.x)
    _check_stat(dw, case)
    _check_stat(db, case)
    assert_close(dx, rdx, case.tol("out"), "dx")
    assert_close(dw, rdw, case.tol("stat"), "dweight")
    assert_close(db, rdb, case.tol("stat"), "dbias")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "fixed"])
def test_backward_out(case, batch_stats):
    mean, invstd = _saved_stats(case) if batch_stats else _fixed_stats(case)
    out = np.full(case.x.shape, 7, case.dtype)
    dx, _, _ = bnorm.backward(case.dy, case.x, mean, invstd, case.weight, axis=case.axis,
                              batch_stats=batch_stats, out=out)
    assert np.shares_memory(dx, out)
    rdx = ref.backward(case.dy, case.x, mean, invstd, case.weight, case.axis, batch_stats)[0]
    assert_close(out, rdx, case.tol("out"), "dx")


def test_batch_stats(case):
    before = _snapshot(case.x)
    count, mean, var = bnorm.batch_stats(case.x, axis=case.axis)
    _unchanged(before, case.x)
    rcount, rmean, rvar = ref.batch_stats(case.x, case.axis)
    assert count == rcount
    _check_stat(mean, case)
    _check_stat(var, case)
    assert_close(mean, rmean, case.tol("stat"), "mean")
    assert_close(var, rvar, case.tol("stat"), "var")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("use_out", [False, True], ids=["ret", "out"])
def test_normalize(case, affine, use_out):
    mean, invstd = _fixed_stats(case)
    w, b = (case.weight, case.bias) if affine else (None, None)
    out = np.full(case.x.shape, 7, case.dtype) if use_out else None
    before = _snapshot(case.x, mean, invstd, w, b)
    y = bnorm.normalize(case.x, mean, invstd, w, b, axis=case.axis, out=out)
    _unchanged(before, case.x, mean, invstd, w, b)
    _check_out(y, case.x)
    if use_out:
        assert np.shares_memory(y, out)
    assert_close(y, ref.normalize(case.x, mean, invstd, w, b, case.axis), case.tol("out"), "y")


def test_backward_reduce(case):
    mean, invstd = _saved_stats(case)
    before = _snapshot(case.dy, case.x, mean, invstd)
    sum_dy, sum_dy_xhat = bnorm.backward_reduce(case.dy, case.x, mean, invstd, axis=case.axis)
    _unchanged(before, case.dy, case.x, mean, invstd)
    r_sum_dy, r_sum_dy_xhat = ref.backward_reduce(case.dy, case.x, mean, invstd, case.axis)
    _check_stat(sum_dy, case)
    _check_stat(sum_dy_xhat, case)
    assert_close(sum_dy, r_sum_dy, case.tol("stat"), "sum_dy")
    assert_close(sum_dy_xhat, r_sum_dy_xhat, case.tol("stat"), "sum_dy_xhat")


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("use_out", [False, True], ids=["ret", "out"])
def test_backward_elemt(case, rng, affine, use_out):
    mean, invstd = _saved_stats(case)
    w = case.weight if affine else None
    sum_dy = rng.standard_normal(case.channels).astype(case.pdtype)
    sum_dy_xhat = rng.standard_normal(case.channels).astype(case.pdtype)
    count = 3 * case.x.size // case.channels  # e.g. statistics merged over 3 shards
    out = np.full(case.x.shape, 7, case.dtype) if use_out else None
    before = _snapshot(case.dy, case.x, mean, invstd, w, sum_dy, sum_dy_xhat)
    dx = bnorm.backward_elemt(case.dy, case.x, mean, invstd, w, sum_dy, sum_dy_xhat, count,
                              axis=case.axis, out=out)
    _unchanged(before, case.dy, case.x, mean, invstd, w, sum_dy, sum_dy_xhat)
    _check_out(dx, case.x)
    if use_out:
        assert np.shares_memory(dx, out)
    rdx = ref.backward_elemt(case.dy, case.x, mean, invstd, w, sum_dy, sum_dy_xhat, count,
                             case.axis)
    assert_close(dx, rdx, case.tol("out"), "dx")


# Larger arrays: the multi-threaded, vectorised paths (the `case` arrays are tiny).
# (84, 16, 16, 256) channels-last: rows of 512 B to 2 KiB from over 20 MiB, which the rows
# reductions read one row at a time (cpu_reduce.hpp, grouped_rows)
LARGE = [((32, 16, 40, 40), 1), ((8, 48, 48, 24), -1), ((3, 5, 65537), 1),
         ((100003, 3), 1), ((84, 16, 16, 256), -1)]


@pytest.fixture(params=[(lay, dt) for lay in LARGE for dt in ref.DTYPES],
                ids=lambda p: f"{'x'.join(map(str, p[0][0]))}-ax{p[0][1]}-{np.dtype(p[1]).name}")
def large(request, rng):
    (shape, axis), dtype = request.param
    x = ref.make_x(rng, shape, axis, dtype)
    dy = ref.make_dy(rng, shape, dtype)
    w, b, rm, rv = ref.make_params(rng, shape[ref.norm_axis(len(shape), axis)], dtype)
    return ref.Case(x, dy, axis, np.dtype(dtype), w, b, rm, rv)


def test_large_forward_backward(large):
    c = large
    rm, rv = c.running_mean.copy(), c.running_var.copy()
    y, mean, invstd = bnorm.forward_train(c.x, c.weight, c.bias, rm, rv, axis=c.axis)
    ry, rmean, rinv, rrm, rrv = ref.forward_train(c.x, c.weight, c.bias, c.running_mean,
                                                  c.running_var, c.axis)
    assert_close(y, ry, c.tol("out"), "y")
    assert_close(mean, rmean, c.tol("stat"), "mean")
    assert_close(invstd, rinv, c.tol("stat"), "invstd")
    assert_close(rm, rrm, c.tol("stat"), "running_mean")
    assert_close(rv, rrv, c.tol("stat"), "running_var")
    for batch_stats in (True, False):
        dx, dw, db = bnorm.backward(c.dy, c.x, mean, invstd, c.weight, axis=c.axis,
                                    batch_stats=batch_stats)
        rdx, rdw, rdb = ref.backward(c.dy, c.x, mean, invstd, c.weight, c.axis, batch_stats)
        assert_close(dx, rdx, c.tol("out"), f"dx batch_stats={batch_stats}")
        assert_close(dw, rdw, c.tol("stat"), "dweight")
        assert_close(db, rdb, c.tol("stat"), "dbias")
    yi = bnorm.forward_infer(c.x, c.running_mean, c.running_var, c.weight, c.bias, axis=c.axis)
    assert_close(yi, ref.forward_infer(c.x, c.running_mean, c.running_var, c.weight, c.bias,
                                       c.axis), c.tol("out"), "forward_infer")


@pytest.mark.parametrize("what", ["weight", "bias", "mean", "invstd"])
def test_noncontiguous_parameters(rng, what):
    """Per-channel inputs given as strided views are read correctly."""
    x = ref.make_x(rng, (6, 5, 4), 1, np.float64)
    dy = ref.make_dy(rng, x.shape, np.float64)
    w, b, rm, rv = ref.make_params(rng, 5, np.float64)
    mean, invstd = rm, ref.invstd_of(rv)
    args = {"weight": w, "bias": b, "mean": mean, "invstd": invstd}
    big = np.zeros(10)
    big[::2] = args[what]
    args[what] = big[::2]
    y = bnorm.normalize(x, args["mean"], args["invstd"], args["weight"], args["bias"])
    assert_close(y, ref.normalize(x, mean, invstd, w, b), 1e-12, "normalize")
    dx, dw, db = bnorm.backward(dy, x, args["mean"], args["invstd"], args["weight"])
    for g, r in zip((dx, dw, db), ref.backward(dy, x, mean, invstd, w)):
        assert_close(g, r, 1e-12, "backward")


@pytest.mark.parametrize("fn", ["forward_train", "forward_infer", "normalize", "backward",
                                "backward_elemt"])
def test_noncontiguous_out(rng, fn):
    """A strided `out` is either rejected (ValueError) or filled with the right values."""
    x = ref.make_x(rng, (4, 3, 5), 1, np.float32)
    dy = ref.make_dy(rng, x.shape, np.float32)
    w, b, rm, rv = ref.make_params(rng, 3, np.float32)
    inv = ref.invstd_of(rv).astype(np.float32)
    big = np.full((4, 3, 10), 7, np.float32)
    out = big[:, :, ::2]
    calls = {
        "forward_train": lambda o: bnorm.forward_train(x, w, b, out=o)[0],
        "forward_infer": lambda o: bnorm.forward_infer(x, rm, rv, w, b, out=o),
        "normalize": lambda o: bnorm.normalize(x, rm, inv, w, b, out=o),
        "backward": lambda o: bnorm.backward(dy, x, rm, inv, w, out=o)[0],
        "backward_elemt": lambda o: bnorm.backward_elemt(dy, x, rm, inv, w, b, rv, 20, out=o),
    }
    expected = calls[fn](None)
    try:
        got = calls[fn](out)
    except ValueError:
        np.testing.assert_array_equal(big, 7)  # rejected before anything was written
        return
    assert np.shares_memory(got, out)
    ref.assert_bitwise(np.ascontiguousarray(out), expected, "strided out")
    np.testing.assert_array_equal(big[:, :, 1::2], 7)  # nothing written between


# In place (out=x): the write loops compute a run's overlapping end vectors before storing
# what they overlap, so the result is the out-of-place one, bit for bit. Runs around the
# vector, pair and group lengths of every dtype, short planes, long runs and rows (rows in
# groups of two and four, with the rows left over, and rows shorter than a vector).
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("shape", [(3, 5, 7), (3, 4, 16), (2, 6, 49), (2, 3, 100), (2, 3, 129), (2, 2, 196),
                                   (2, 2, 1025), (40, 100), (8, 300), (7, 33), (9, 100), (5, 17), (11, 6)])
def test_inplace_is_bitwise_out_of_place(rng, dtype, shape):
    if dtype == "bfloat16":
        ml_dtypes = pytest.importorskip("ml_dtypes")
        dt = np.dtype(ml_dtypes.bfloat16)
    else:
        dt = np.dtype(dtype)
    x = rng.standard_normal(shape).astype(dt)
    C = shape[1]
    p = np.float32 if dt.itemsize <= 2 else dt
    rm, rv = rng.standard_normal(C).astype(p), rng.uniform(0.5, 2, C).astype(p)
    w, b = rng.standard_normal(C).astype(p), rng.standard_normal(C).astype(p)
    calls = {
        "forward_infer": lambda a, **k: bnorm.forward_infer(a, rm, rv, w, b, **k),
        "normalize": lambda a, **k: bnorm.normalize(a, rm, rv, w, b, **k),
        "forward_infer_relu": lambda a, **k: bnorm.forward_infer(a, rm, rv, w, b, activation="relu", **k),
        "forward_train": lambda a, **k: bnorm.forward_train(a, w, b, **k)[0],
    }
    for name, call in calls.items():
        want = call(x)
        got = x.copy()
        assert call(got, out=got) is got, name
        ref.assert_bitwise(got, want, f"{name} in place")
    # backward's dx over dy (and over x), with batch statistics and without, and with ReLU
    dy = rng.standard_normal(shape).astype(dt)
    y = rng.standard_normal(shape).astype(dt)
    _, mean, invstd = bnorm.forward_train(x, w, b)
    for batch_stats in (True, False):
        for relu in (False, True):
            kw = dict(batch_stats=batch_stats, activation="relu", y=y) if relu else dict(batch_stats=batch_stats)
            want = bnorm.backward(dy, x, mean, invstd, w, **kw)[0]
            for target in ("dy", "x"):
                d, xx = dy.copy(), x.copy()
                out = d if target == "dy" else xx
                assert bnorm.backward(d, xx, mean, invstd, w, out=out, **kw)[0] is out
                ref.assert_bitwise(out, want, f"backward (batch_stats={batch_stats}, relu={relu}) over {target}")
