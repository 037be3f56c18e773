"""The failure modes users of other batch-norm implementations keep hitting, one test each:
catastrophic cancellation, overflow, float16 range, the unbiased running variance, tiny
batches, empty batches, NaN propagation, aliasing, and calls that fail half-way."""

import numpy as np
import pytest

import bnorm
import reference as ref
from reference import assert_bitwise, assert_close

M1_MESSAGE = r"^expected more than 1 value per channel when training, got input of shape"


# --- large mean: no E[x^2] - E[x]^2 --------------------------------------------------------

@pytest.mark.parametrize("offset", [1e4, -3e4, 1e5])
@pytest.mark.parametrize("layout", [((200, 4, 100), 1), ((20000, 3), 1), ((50, 20, 20, 5), -1)],
                         ids=lambda l: f"{l[0]}-ax{l[1]}")
def test_large_mean_float32_stays_accurate(rng, offset, layout):
    shape, axis = layout
    x = (offset + rng.standard_normal(shape)).astype(np.float32)
    c = shape[ref.norm_axis(len(shape), axis)]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    y, mean, invstd = bnorm.forward_train(x, None, None, rm, rv, axis=axis, momentum=0.5)
    _, bmean, bvar = bnorm.batch_stats(x, axis=axis)
    ry, rmean, rinv, rrm, rrv = ref.forward_train(x, None, None, np.zeros(c), np.ones(c),
                                                  axis, 0.5)
    _, _, rvar = ref.batch_stats(x, axis)
    ulp = float(np.spacing(np.float32(abs(offset))))
    # the mean to within 2 ulps of float32 at the offset (a plain float32 sum is ~100x off)
    np.testing.assert_allclose(mean, rmean, rtol=0, atol=2 * ulp, err_msg="save_mean")
    np.testing.assert_allclose(bmean, rmean, rtol=0, atol=2 * ulp, err_msg="batch_stats mean")
    # the variance (about 1): float32's 1e-5 relative at |mean|/std = 1e4, the error bound of
    # a stable (shifted / Chan) float32 algorithm growing with that condition number; a
    # sum-of-squares formula is off by ~|mean|^2 * 6e-8, i.e. 100% and more
    rtol = 1e-5 * max(1.0, abs(offset) / 1e4)
    np.testing.assert_allclose(bvar, rvar, rtol=rtol, err_msg="batch_stats var")
    np.testing.assert_allclose(invstd, rinv, rtol=rtol, err_msg="save_invstd")
    np.testing.assert_allclose(rv, rrv, rtol=rtol, err_msg="running_var")
    np.testing.assert_allclose(rm, rrm, rtol=0, atol=2 * ulp, err_msg="running_mean")
    # y is off by at most the rounding of the mean to float32, times invstd (about 1)
    np.testing.assert_allclose(y, ry, rtol=0, atol=1.5 * ulp + 1e-5 * np.abs(ry).max(),
                               err_msg="y")


@pytest.mark.parametrize("shape", [(6, 1000, 5, 5), (6, 300, 7, 7), (64, 16, 7, 7), (20000, 3)],
                         ids=str)
def test_large_mean_float64_small_tiles_within_documented_bound(rng, shape):
    """Small maps and narrow rows merge tiles of a few values (docs/math.md, Numerics): the
    variance's relative error may grow like eps * |mean| / std, here 1e-16 * 1e7."""
    d = 1e-3 * rng.standard_normal(shape)
    x = 1e4 + d
    _, mean, var = bnorm.batch_stats(x)
    # the reference from x - 1e4, exact (Sterbenz): NumPy's own float64 sums over a
    # strided axis of values near 1e4 are off by several ulps
    _, rmean, rvar = ref.batch_stats(x - 1e4, 1)
    rmean = rmean + 1e4
    np.testing.assert_allclose(mean, rmean, rtol=0, atol=4 * np.spacing(1e4), err_msg="mean")
    np.testing.assert_allclose(var, rvar, rtol=1e-8, err_msg="var")


# --- constant channels map exactly to bias ------------------------------------------------

CONSTANTS = {
    np.float32: [0.0, 1.0, 1e20, -1e20, 3e38, float(np.finfo(np.float32).max),
                 -float(np.finfo(np.float32).max), 1e-30, -7.5],
    np.float64: [0.0, 1.0, 1e20, 1e300, -1e300, float(np.finfo(np.float64).max), 1e-300],
    np.float16: [0.0, 1.0, 6e4, -6e4, 65504.0, 1e-4, -3.0],
}


@pytest.mark.parametrize("dtype", list(CONSTANTS), ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_constant_channels_map_exactly_to_bias(rng, dtype, layout):
    values = CONSTANTS[dtype]
    c = len(values) + 1  # plus one ordinary random channel
    n, length = 64, 100
    logical = np.empty((n, length, c), dtype)  # (outer, inner, C) logical
    logical[..., :-1] = np.array(values, dtype)
    logical[..., -1] = rng.standard_normal((n, length))
    if layout == "channels_first":
        x, axis = np.ascontiguousarray(np.moveaxis(logical, -1, 1)), 1
    else:
        x, axis = np.ascontiguousarray(logical), -1
    pd = ref.param_dtype(dtype)
    w, b, rm0, rv0 = ref.make_params(rng, c, dtype)
    rm, rv = rm0.copy(), rv0.copy()
    momentum, eps = 0.1, 1e-5
    with np.errstate(all="raise"):  # the test's own arithmetic must not overflow either
        y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=momentum,
                                              eps=eps)
        count, bmean, bvar = bnorm.batch_stats(x, axis=axis)
    yl = np.moveaxis(y, axis, -1)
    for k, v in enumerate(values):
        v = float(np.dtype(dtype).type(v))  # the value x actually holds
        expect = np.full(yl.shape[:-1], b[k]).astype(dtype)
        assert_bitwise(np.ascontiguousarray(yl[..., k]), expect, f"y of constant {v} != bias")
        assert mean[k] == pd.type(v) and bmean[k] == pd.type(v), f"mean of constant {v}"
        assert bvar[k] == 0, f"var of constant {v} is {bvar[k]}"
        np.testing.assert_allclose(invstd[k], 1 / np.sqrt(eps), rtol=1e-6)
        np.testing.assert_allclose(rv[k], (1 - momentum) * rv0[k], rtol=1e-6)
        np.testing.assert_allclose(rm[k], (1 - momentum) * float(rm0[k]) + momentum * v,
                                   rtol=1e-6, atol=1e-30)
    for arr in (y, mean, invstd, rm, rv, bmean, bvar):
        assert np.isfinite(arr).all()
    _, _, rinv = ref.forward_train(x[..., -1:] if axis == -1 else x[:, -1:], axis=axis)[:3]
    np.testing.assert_allclose(invstd[-1], rinv[0], rtol=ref.tol(dtype, "stat"))
    # backward through a constant channel stays finite
    dy = rng.standard_normal(x.shape).astype(dtype)
    dx, dw, db = bnorm.backward(dy, x, mean, invstd, w, axis=axis)
    assert np.isfinite(dx).all() and np.isfinite(dw).all() and np.isfinite(db).all()


# --- float16 with values up to 6e4 ----------------------------------------------------------

@pytest.mark.parametrize("kind", ["wide", "offset", "max"])
def test_float16_large_values(rng, kind):
    shape = (128, 4, 64)
    if kind == "wide":
        x = rng.uniform(-6e4, 6e4, shape).astype(np.float16)
    elif kind == "offset":
        x = (6e4 - rng.uniform(0, 3000, shape)).astype(np.float16)
    else:
        x = rng.choice(np.array([-65504.0, 65504.0, 6e4, -6e4]), shape).astype(np.float16)
    w, b, rm0, rv0 = ref.make_params(rng, 4, np.float16)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv)
    count, bmean, bvar = bnorm.batch_stats(x)
    ry, rmean, rinv, rrm, rrv = ref.forward_train(x, w, b, rm0, rv0)
    _, _, rvar = ref.batch_stats(x)
    for name, got in (("y", y), ("mean", mean), ("invstd", invstd), ("running_mean", rm),
                      ("running_var", rv), ("var", bvar)):
        assert np.isfinite(got).all(), f"{name} overflowed"
    assert y.dtype == np.float16 and mean.dtype == np.float32
    # a mean is known to float32 precision relative to the spread of the data (it can be a
    # small difference of values near 6e4), plus the rounding of the mean itself
    mean_atol = 1e-5 * np.sqrt(rvar) + 2 * np.spacing(np.abs(rmean).astype(np.float32))
    np.testing.assert_array_less(np.abs(mean - rmean), mean_atol, err_msg="mean")
    np.testing.assert_array_less(np.abs(rm - rrm), mean_atol, err_msg="running_mean")
    np.testing.assert_allclose(bvar, rvar, rtol=1e-5, err_msg="var")
    np.testing.assert_allclose(invstd, rinv, rtol=1e-5, err_msg="invstd")
    np.testing.assert_allclose(rv, rrv, rtol=1e-5, err_msg="running_var")
    assert_close(y, ry, 1e-3, "y")
    yi = bnorm.forward_infer(x, mean, bvar, w, b)
    assert_close(yi, ref.forward_infer(x, mean, bvar, w, b), 1e-3, "forward_infer")
    dy = rng.standard_normal(shape).astype(np.float16)
    for batch_stats in (True, False):
        dx, dw, db = bnorm.backward(dy, x, mean, invstd, w, batch_stats=batch_stats)
        rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, 1, batch_stats)
        assert np.isfinite(dx).all() and np.isfinite(dw).all()
        assert_close(dx, rdx, 1e-3, "dx")
        assert_close(dw, rdw, 1e-5, "dweight")
        assert_close(db, rdb, 1e-5, "dbias")


# --- the [1, 2, 3, 4] example ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("momentum", [1.0, 0.1])
def test_one_two_three_four(dtype, momentum):
    x = np.array([[1.0], [2.0], [3.0], [4.0]], dtype)  # N=4, C=1
    eps = 1e-5
    rm, rv = np.zeros(1, dtype), np.ones(1, dtype)
    y, mean, invstd = bnorm.forward_train(x, None, None, rm, rv, momentum=momentum, eps=eps)
    count, bmean, bvar = bnorm.batch_stats(x)
    rt = 1e-12 if dtype == np.float64 else 1e-6
    assert count == 4
    np.testing.assert_allclose(bmean, [2.5], rtol=rt)
    np.testing.assert_allclose(bvar, [1.25], rtol=rt)  # biased: normalizes
    np.testing.assert_allclose(mean, [2.5], rtol=rt)
    np.testing.assert_allclose(invstd, [1 / np.sqrt(1.25 + eps)], rtol=rt)
    np.testing.assert_allclose(y, (x - 2.5) / np.sqrt(1.25 + eps), rtol=rt)
    # running statistics use the unbiased variance 5/3
    np.testing.assert_allclose(rm, [momentum * 2.5], rtol=rt)
    np.testing.assert_allclose(rv, [(1 - momentum) * 1.0 + momentum * 5.0 / 3.0], rtol=rt)


# --- tiny batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape", [(1, 3, 5), (1, 4, 2, 3), (1, 2)], ids=str)
def test_batch_of_one_with_spatial_size_works(rng, dtype, shape):
    """N == 1 is fine as long as M > 1 (spatial size > 1, or channels-last rows)."""
    axis = 1 if len(shape) > 2 else 0  # (1, 2) with axis 0: C=1, M=2
    x = ref.make_x(rng, shape, axis, dtype)
    c = shape[axis]
    w, b, rm0, rv0 = ref.make_params(rng, c, dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis)
    ry, rmean, rinv, rrm, rrv = ref.forward_train(x, w, b, rm0, rv0, axis)
    assert_close(y, ry, ref.tol(dtype, "out"), "y")
    assert_close(mean, rmean, ref.tol(dtype, "stat"), "mean")
    assert_close(rv, rrv, ref.tol(dtype, "stat"), "running_var")


@pytest.mark.parametrize("shape,axis", [((1, 3), 1), ((1, 3, 1), 1), ((1, 1, 1, 5), -1),
                                        ((3, 1), 0)], ids=str)
def test_single_value_per_channel_raises_in_training(rng, shape, axis):
    x = ref.make_x(rng, shape, axis, np.float32)
    c = shape[ref.norm_axis(len(shape), axis)]
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    with pytest.raises(ValueError, match=M1_MESSAGE) as info:
        bnorm.forward_train(x, None, None, rm, rv, axis=axis)
    assert str(tuple(shape)).replace(" ", "") in str(info.value).replace(" ", "") or \
        str(list(shape)).replace(" ", "") in str(info.value).replace(" ", ""), \
        f"the message names the shape {shape}: {info.value}"
    assert (rm == 0).all() and (rv == 1).all()
    with pytest.raises(ValueError, match=M1_MESSAGE):
        bnorm.forward_train(x, axis=axis)
    # inference on a single sample is fine
    y = bnorm.forward_infer(x, rm, rv, axis=axis)
    assert_close(y, ref.forward_infer(x, rm, rv, axis=axis), 1e-5, "forward_infer")


# --- empty batches ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("shape,axis", [((0, 3, 4), 1), ((0, 3), 1), ((2, 3, 0), 1),
                                        ((0, 4, 4, 3), -1), ((1, 0), 1), ((1, 0, 1), 1)], ids=str)
def test_empty_batch(rng, dtype, shape, axis):
    c = shape[ref.norm_axis(len(shape), axis)]
    pd = ref.param_dtype(dtype)
    x = np.zeros(shape, dtype)
    dy = np.zeros(shape, dtype)
    w, b, rm, rv = ref.make_params(rng, c, dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=0.5)
    assert y.shape == shape and y.dtype == np.dtype(dtype)
    assert mean.shape == (c,) and invstd.shape == (c,) and mean.dtype == pd
    assert_bitwise(rm, rm0, "running_mean changed by an empty batch")
    assert_bitwise(rv, rv0, "running_var changed by an empty batch")
    out = np.empty(shape, dtype)
    assert bnorm.forward_train(x, w, b, axis=axis, out=out)[0].shape == shape
    assert bnorm.forward_infer(x, rm, rv, w, b, axis=axis).shape == shape
    assert bnorm.normalize(x, rm, rv, w, b, axis=axis).shape == shape
    count, bmean, bvar = bnorm.batch_stats(x, axis=axis)
    assert count == (x.size // c if c else 1) and bmean.shape == (c,) and bvar.shape == (c,)
    for batch_stats in (True, False):
        dx, dw, db = bnorm.backward(dy, x, rm, rv, w, axis=axis, batch_stats=batch_stats)
        assert dx.shape == shape and dw.shape == (c,) and db.shape == (c,)
        assert (dw == 0).all() and (db == 0).all()
    sum_dy, sum_dy_xhat = bnorm.backward_reduce(dy, x, rm, rv, axis=axis)
    assert (sum_dy == 0).all() and (sum_dy_xhat == 0).all() and sum_dy.shape == (c,)
    assert bnorm.backward_elemt(dy, x, rm, rv, w, sum_dy, sum_dy_xhat, 1,
                                axis=axis).shape == shape


# --- NaN / Inf stay in their channel -------------------------------------------------------------

@pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
@pytest.mark.parametrize("layout", [((16, 5, 40), 1), ((64, 7, 7, 5), -1)],
                         ids=lambda l: f"{l[0]}-ax{l[1]}")
def test_nonfinite_stays_in_its_channel(rng, dtype, bad, layout):
    shape, axis = layout
    ax = ref.norm_axis(len(shape), axis)
    c, k = shape[ax], 2
    clean = ref.make_x(rng, shape, axis, dtype)
    dirty = clean.copy()
    idx = [s // 2 for s in shape]
    idx[ax] = k
    dirty[tuple(idx)] = bad
    dy = ref.make_dy(rng, shape, dtype)
    w, b, rm0, rv0 = ref.make_params(rng, c, dtype)
    other = [i for i in range(c) if i != k]

    def run(x):
        rm, rv = rm0.copy(), rv0.copy()
        y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis)
        dx, dw, db = bnorm.backward(dy, x, mean, invstd, w, axis=axis)
        dxf, _, _ = bnorm.backward(dy, x, rm0, 1 / np.sqrt(rv0 + 1e-5), w, axis=axis,
                                   batch_stats=False)
        _, bmean, bvar = bnorm.batch_stats(x, axis=axis)
        return dict(y=y, mean=mean, invstd=invstd, rm=rm, rv=rv, dx=dx, dw=dw, bmean=bmean,
                    bvar=bvar, dxf=dxf)

    with np.errstate(invalid="ignore", over="ignore"):
        got, want = run(dirty), run(clean)
    # fixed statistics: dx = dy * weight * invstd does not read x at all
    assert_bitwise(got.pop("dxf"), want.pop("dxf"), "dx with fixed statistics")
    # invstd of an Inf channel may legitimately be 0 (var = Inf); y is still not finite
    must_be_bad = {"y", "dx", "mean", "bmean", "rm", "dw", "rv", "bvar"}
    if np.isnan(bad):
        must_be_bad |= {"invstd"}
    for name, arr in got.items():
        a, e = np.moveaxis(arr, ax if arr.ndim > 1 else 0, 0), \
            np.moveaxis(want[name], ax if arr.ndim > 1 else 0, 0)
        assert_bitwise(np.ascontiguousarray(a[other]), np.ascontiguousarray(e[other]),
                       f"{name}: other channels changed")
        if name in must_be_bad:
            assert not np.isfinite(a[k]).any(), f"{name}: finite values in the bad channel"
    if np.isnan(bad):
        for name in ("y", "dx", "mean", "invstd", "bvar"):
            assert np.isnan(got[name].take(k, axis=ax if got[name].ndim > 1 else 0)).all(), \
                f"{name}: NaN did not propagate as NaN"


# --- aliasing -------------------------------------------------------------------------------------

# The last four are streamed (over 4 MB in float32), their runs starting anywhere in a cache
# line, so that write_run's overlapping head and tail vectors meet the aliased input: runs
# of 20001 and rows of 600 (the unfused passes compute their tail late), rows of 100, and
# runs of 17 (the head's vector overlaps the tail's).
ALIAS_LAYOUTS = [((16, 5, 33), 1), ((50, 7), 1), ((256, 3, 1024), 1), ((4096, 3, 2, 64), -1),
                 ((8, 7, 20001), 1), ((2000, 600), 1), ((12000, 100), 1), ((80, 1000, 17), 1)]


def _alias_ops():
    """(name, fn(x, dy, p, out) -> outputs tuple, which input `out` aliases)."""

    def fwd_train(x, dy, p, out):
        rm, rv = p["rm"].copy(), p["rv"].copy()
        r = bnorm.forward_train(x, p["w"], p["b"], rm, rv, axis=p["axis"], out=out)
        return r + (rm, rv)

    def fwd_infer(x, dy, p, out):
        return (bnorm.forward_infer(x, p["rm"], p["rv"], p["w"], p["b"], axis=p["axis"],
                                    out=out),)

    def normalize(x, dy, p, out):
        return (bnorm.normalize(x, p["rm"], p["inv"], p["w"], p["b"], axis=p["axis"], out=out),)

    def backward(batch_stats):
        def f(x, dy, p, out):
            return bnorm.backward(dy, x, p["mean"], p["inv"], p["w"], axis=p["axis"],
                                  batch_stats=batch_stats, out=out)
        return f

    def elemt(x, dy, p, out):
        return (bnorm.backward_elemt(dy, x, p["mean"], p["inv"], p["w"], p["sdy"], p["sdyx"],
                                     p["count"], axis=p["axis"], out=out),)

    return [("forward_train", fwd_train, "x"), ("forward_infer", fwd_infer, "x"),
            ("normalize", normalize, "x"), ("backward-batch-dy", backward(True), "dy"),
            ("backward-batch-x", backward(True), "x"), ("backward-fixed-dy", backward(False), "dy"),
            ("backward-fixed-x", backward(False), "x"), ("backward_elemt-dy", elemt, "dy"),
            ("backward_elemt-x", elemt, "x")]


@pytest.mark.parametrize("op", _alias_ops(), ids=lambda o: o[0])
@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", ALIAS_LAYOUTS, ids=lambda l: f"{l[0]}-ax{l[1]}")
def test_out_aliasing_input_gives_same_result(rng, op, dtype, layout):
    name, fn, aliased = op
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, dtype)
    dy = ref.make_dy(rng, shape, dtype)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, dtype)
    _, mean, var = ref.batch_stats(x, axis)
    pd = ref.param_dtype(dtype)
    p = dict(w=w, b=b, rm=rm, rv=rv, axis=axis, mean=mean.astype(pd),
             inv=ref.invstd_of(var).astype(pd), sdy=rng.standard_normal(c).astype(pd),
             sdyx=rng.standard_normal(c).astype(pd), count=x.size // c)
    expected = fn(x.copy(), dy.copy(), p, None)
    xa, dya = x.copy(), dy.copy()
    target = xa if aliased == "x" else dya
    got = fn(xa, dya, p, target)
    assert np.shares_memory(got[0], target)
    for i, (g, e) in enumerate(zip(got, expected)):
        assert_bitwise(g, e, f"{name} output {i} with out aliasing {aliased}")


@pytest.mark.parametrize("vector", ["weight", "bias", "mean", "invstd", "running_mean"])
def test_out_over_a_per_channel_vector_raises(rng, vector):
    """The kernels read weight, bias and the statistics while they write out: an out over
    one of them gave silently wrong results (29 off for a weight in out's first bytes)."""
    x = ref.make_x(rng, (64, 16, 1000), 1, np.float32)
    out = np.zeros_like(x)
    vec = out.reshape(-1)[100:116]
    vec[:] = 2.0
    snapshot = out.copy()
    ones = np.ones(16, np.float32)
    calls = {
        "weight": lambda: bnorm.forward_train(x, vec, out=out),
        "bias": lambda: bnorm.normalize(x, ones * 0, ones, None, vec, out=out),
        "mean": lambda: bnorm.backward(x, x, vec, ones, out=out),
        "invstd": lambda: bnorm.normalize(x, ones * 0, vec, out=out),
        "running_mean": lambda: bnorm.forward_train(x, None, None, vec, ones.copy(), out=out),
    }
    with pytest.raises(ValueError, match=f"out overlaps {vector}"):
        calls[vector]()
    assert_bitwise(out, snapshot, "out after the refused call")


def test_non_contiguous_out_over_a_running_buffer_raises(rng):
    """A non-contiguous out is filled after the call, over the running buffer the call had
    just updated in place."""
    x = ref.make_x(rng, (4, 3), 1, np.float32)
    buf = np.zeros(24, np.float32)
    out, running_mean = buf.reshape(4, 6)[:, ::2], buf[1:4]
    with pytest.raises(ValueError, match="out overlaps running_mean"):
        bnorm.forward_train(x, None, None, running_mean, np.ones(3, np.float32), momentum=1.0, out=out)
    assert (buf == 0).all()


def test_strided_out_with_a_vector_in_its_gaps_is_fine(rng):
    """One arena: y in columns 0-2, running_mean in row 0's columns 3-5. The strided out's
    address range covers running_mean, but no element is shared."""
    x = ref.make_x(rng, (4, 3), 1, np.float32)
    arena = np.zeros((4, 6), np.float32)
    out, running_mean, running_var = arena[:, :3], arena[0, 3:], np.ones(3, np.float32)
    separate_mean = np.zeros(3, np.float32)
    expected = bnorm.forward_train(x, None, None, separate_mean, np.ones(3, np.float32))
    got = bnorm.forward_train(x, None, None, running_mean, running_var, out=out)
    assert_bitwise(got[0], expected[0], "y in the arena")
    assert_bitwise(running_mean, separate_mean, "running_mean in the arena")


def test_running_buffers_overlapping_each_other_raise(rng):
    x = ref.make_x(rng, (8, 4, 5), 1, np.float32)
    buf = np.zeros(6, np.float32)
    with pytest.raises(ValueError, match="running_mean and running_var overlap"):
        bnorm.forward_train(x, None, None, buf[:4], buf[2:])
    assert (buf == 0).all()


def test_out_overlapping_a_copied_input_is_computed_from_the_copy(rng):
    """A non-contiguous x is copied before the kernel runs, so an out over part of its
    memory cannot corrupt it: the result is exact, not an overlap error."""
    buf = ref.make_x(rng, (9, 8), 1, np.float64)
    x = buf[:-1, ::2]  # non-contiguous
    expected = bnorm.forward_train(x.copy())[0]
    out = buf.reshape(-1)[8:40].reshape(8, 4)  # contiguous, over x's memory
    assert np.shares_memory(out, x) and out.flags.c_contiguous
    got = bnorm.forward_train(x, out=out)[0]
    assert got is out
    assert_bitwise(got, expected, "contiguous out over a non-contiguous x")


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.float64],
                         ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("pairing", ["rm=w,rv=b", "rm=b,rv=w"])
@pytest.mark.parametrize("layout", [((16, 5, 33), 1), ((256, 3, 1024), 1)],
                         ids=lambda l: f"{l[0]}-ax{l[1]}")
def test_running_buffers_aliasing_weight_bias(rng, dtype, pairing, layout):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, dtype)
    c = shape[axis]
    w, b, _, _ = ref.make_params(rng, c, dtype)
    w, b = np.abs(w), np.abs(b)  # either becomes running_var: a variance, never negative
    momentum = 0.25
    # unaliased: running buffers are copies holding the same values
    rm_u, rv_u = (w.copy(), b.copy()) if pairing == "rm=w,rv=b" else (b.copy(), w.copy())
    y_u, mean_u, inv_u = bnorm.forward_train(x, w.copy(), b.copy(), rm_u, rv_u, axis=axis,
                                             momentum=momentum)
    wa, ba = w.copy(), b.copy()
    rm_a, rv_a = (wa, ba) if pairing == "rm=w,rv=b" else (ba, wa)
    y_a, mean_a, inv_a = bnorm.forward_train(x, wa, ba, rm_a, rv_a, axis=axis,
                                             momentum=momentum)
    assert_bitwise(y_a, y_u, "y with running buffers aliasing weight/bias")
    assert_bitwise(mean_a, mean_u, "save_mean")
    assert_bitwise(inv_a, inv_u, "save_invstd")
    assert_bitwise(rm_a, rm_u, "running_mean update")
    assert_bitwise(rv_a, rv_u, "running_var update")


# --- a failed call leaves every buffer untouched --------------------------------------------------

def _failing_calls():
    """(id, kwargs overrides of a forward_train call, expected exception)."""
    return [
        ("momentum>1", dict(momentum=1.5), ValueError),
        ("momentum<0", dict(momentum=-0.1), ValueError),
        ("eps=0", dict(eps=0.0), ValueError),
        ("eps<0", dict(eps=-1e-5), ValueError),
        ("out-shape", dict(out="bad-shape"), ValueError),
        ("out-dtype", dict(out="bad-dtype"), TypeError),
        ("M==1", dict(x="one-row"), ValueError),
        ("running_var-readonly", dict(rv="readonly"), ValueError),
        ("running_mean-readonly", dict(rm="readonly"), ValueError),
        ("running_var-shape", dict(rv="bad-shape"), ValueError),
        ("running_var-dtype", dict(rv="bad-dtype"), TypeError),
        ("weight-shape", dict(w="bad-shape"), ValueError),
        ("bias-dtype", dict(b="bad-dtype"), TypeError),
    ]


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("failure", _failing_calls(), ids=lambda f: f[0])
def test_failed_forward_train_touches_nothing(rng, dtype, failure):
    _, over, exc = failure
    shape = (1, 4) if over.get("x") == "one-row" else (32, 4, 50)
    c = 4
    x = ref.make_x(rng, shape, 1, dtype)
    w, b, rm, rv = ref.make_params(rng, c, dtype)
    out = np.full(shape, 7, dtype)

    def variant(arr, how):
        if how == "readonly":
            arr.flags.writeable = False
            return arr
        if how == "bad-shape":
            return np.full(arr.shape[:-1] + (arr.shape[-1] + 1,), 7, arr.dtype)
        if how == "bad-dtype":
            return np.full(arr.shape, 7, np.float64 if arr.dtype != np.float64 else np.float32)
        return arr

    w, b, rm, rv = (variant(a, over.get(k)) for a, k in ((w, "w"), (b, "b"), (rm, "rm"),
                                                          (rv, "rv")))
    out = variant(out, over.get("out"))
    buffers = dict(x=x, w=w, b=b, rm=rm, rv=rv, out=out)
    before = {k: v.copy() for k, v in buffers.items()}
    with pytest.raises(exc):
        bnorm.forward_train(x, w, b, rm, rv, axis=1, momentum=over.get("momentum", 0.1),
                            eps=over.get("eps", 1e-5), out=out)
    for k, v in buffers.items():
        assert_bitwise(v, before[k], f"{k} modified by a failed call")


@pytest.mark.parametrize("call", ["forward_infer-eps", "backward-dy-shape", "backward-out-dtype",
                                  "normalize-invstd-shape", "backward_elemt-sum_dy-shape"])
def test_failed_calls_leave_out_untouched(rng, call):
    x = ref.make_x(rng, (8, 3, 20), 1, np.float32)
    dy = ref.make_dy(rng, x.shape, np.float32)
    w, b, rm, rv = ref.make_params(rng, 3, np.float32)
    inv = ref.invstd_of(rv).astype(np.float32)
    out = np.full(x.shape, 7, np.float32)
    bad4 = np.ones(4, np.float32)
    before = [a.copy() for a in (x, dy, w, b, rm, rv, out)]
    with pytest.raises((ValueError, TypeError)):
        if call == "forward_infer-eps":
            bnorm.forward_infer(x, rm, rv, w, b, eps=-1.0, out=out)
        elif call == "backward-dy-shape":
            bnorm.backward(dy[:4], x, rm, inv, w, out=out)
        elif call == "backward-out-dtype":
            out = out.astype(np.float64)
            before[-1] = out.copy()
            bnorm.backward(dy, x, rm, inv, w, out=out)
        elif call == "normalize-invstd-shape":
            bnorm.normalize(x, rm, bad4, w, b, out=out)
        else:
            bnorm.backward_elemt(dy, x, rm, inv, w, bad4, bad4, 160, out=out)
    for a, e in zip((x, dy, w, b, rm, rv, out), before):
        assert_bitwise(a, e, f"{call}: buffer modified by a failed call")
