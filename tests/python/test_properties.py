"""Hypothesis property tests over random shapes, channel axes, memory layouts and dtypes."""

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import bnorm  # noqa: E402
import reference as ref  # noqa: E402
from reference import assert_close  # noqa: E402


@st.composite
def layouts(draw, min_count=2, dtypes=(np.float32, np.float64)):
    """(x, axis, rng) with 2..5 dims, any axis (negative too), any view, M >= min_count."""
    ndim = draw(st.integers(2, 5))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    ax = axis % ndim
    count = int(np.prod([s for i, s in enumerate(shape) if i != ax]))
    if count < min_count:  # make one non-channel dim big enough
        i = (ax + 1) % ndim
        shape = shape[:i] + (shape[i] * min_count,) + shape[i + 1:]
    view = draw(st.sampled_from(ref.VIEWS))
    dtype = draw(st.sampled_from(dtypes))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = np.random.default_rng(seed)
    loc = draw(st.sampled_from([0.0, 3.0, 100.0]))
    x = ref.make_x(rng, shape, axis, dtype, view, loc=loc)
    return x, axis, rng


def _channels(x, axis):
    return x.shape[ref.norm_axis(x.ndim, axis)]


@given(layouts(), st.floats(0.0, 1.0), st.sampled_from([1e-5, 1e-3, 0.5]))
def test_forward_train_matches_reference(data, momentum, eps):
    x, axis, rng = data
    w, b, rm0, rv0 = ref.make_params(rng, _channels(x, axis), x.dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=momentum,
                                          eps=eps)
    ry, rmean, rinv, rrm, rrv = ref.forward_train(x, w, b, rm0, rv0, axis, momentum, eps)
    t = ref.TOL[x.dtype]
    assert_close(y, ry, t["out"], "y")
    assert_close(mean, rmean, t["stat"], "mean")
    assert_close(invstd, rinv, t["stat"], "invstd")
    assert_close(rm, rrm, t["stat"], "running_mean")
    assert_close(rv, rrv, t["stat"], "running_var")


@given(layouts(), st.booleans(), st.booleans())
def test_backward_matches_reference(data, batch_stats, affine):
    x, axis, rng = data
    dy = rng.standard_normal(x.shape).astype(x.dtype)
    w, _, rm, rv = ref.make_params(rng, _channels(x, axis), x.dtype)
    w = w if affine else None
    if batch_stats:
        _, mean, var = ref.batch_stats(x, axis)
        mean, invstd = mean.astype(x.dtype), ref.invstd_of(var).astype(x.dtype)
    else:
        mean, invstd = rm, ref.invstd_of(rv).astype(x.dtype)
    dx, dw, db = bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=batch_stats)
    rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, axis, batch_stats)
    t = ref.TOL[x.dtype]
    assert_close(dx, rdx, t["out"], "dx")
    assert_close(dw, rdw, t["stat"], "dweight")
    assert_close(db, rdb, t["stat"], "dbias")


@given(layouts(dtypes=(np.float64,)))
def test_output_is_normalized(data):
    """Per channel, y has mean bias and biased variance weight^2 * var / (var + eps)."""
    x, axis, rng = data
    w, b, _, _ = ref.make_params(rng, _channels(x, axis), x.dtype)
    eps = 1e-5
    y, _, _ = bnorm.forward_train(x, w, b, axis=axis, eps=eps)
    _, ymean, yvar = ref.batch_stats(y, axis)
    _, _, xvar = ref.batch_stats(x, axis)
    assert_close(ymean, b, 1e-9, "mean of y")
    assert_close(yvar, w.astype(np.float64) ** 2 * xvar / (xvar + eps), 1e-9, "var of y")


@given(layouts())
def test_layout_invariance(data):
    """The same logical data in any memory layout, or with the channel axis moved to the
    end (channels-last, axis=-1), gives the same results."""
    x, axis, rng = data
    w, b, _, _ = ref.make_params(rng, _channels(x, axis), x.dtype)
    t = ref.TOL[x.dtype]
    y, mean, invstd = bnorm.forward_train(x, w, b, axis=axis)
    yc, meanc, invstdc = bnorm.forward_train(np.ascontiguousarray(x), w, b, axis=axis)
    assert_close(y, yc, t["out"], "contiguous copy")
    assert_close(mean, meanc, t["stat"], "contiguous copy mean")
    xl = np.ascontiguousarray(np.moveaxis(x, axis, -1))
    yl, meanl, invstdl = bnorm.forward_train(xl, w, b, axis=-1)
    assert_close(np.moveaxis(yl, -1, axis), y.astype(np.float64), t["out"], "channels-last y")
    assert_close(meanl, mean.astype(np.float64), t["stat"], "channels-last mean")
    assert_close(invstdl, invstd.astype(np.float64), t["stat"], "channels-last invstd")


@given(layouts(min_count=1), st.data())
def test_merge_of_random_split_equals_whole(data, draw):
    """batch_stats of shards split along any non-channel axis, merged, equal batch_stats."""
    x, axis, _ = data
    ax = ref.norm_axis(x.ndim, axis)
    split_axis = draw.draw(st.sampled_from([i for i in range(x.ndim) if i != ax]))
    n = x.shape[split_axis]
    cuts = sorted(draw.draw(st.lists(st.integers(0, n), max_size=4)))
    shards = np.split(x, cuts, axis=split_axis)
    stats = [bnorm.batch_stats(s, axis=axis) for s in shards]
    counts = np.array([s[0] for s in stats], dtype=np.float64)
    means = np.stack([s[1] for s in stats])
    vars_ = np.stack([s[2] for s in stats])
    count, mean, var = bnorm.merge_stats(counts, means, vars_)
    rcount, rmean, rvar = ref.batch_stats(x, axis)
    t = ref.TOL[x.dtype]["stat"]
    assert float(count) == rcount
    assert_close(mean, rmean, t, "merged mean")
    assert_close(var, rvar, t, "merged var")


@given(layouts())
def test_stats_invariant_under_shuffling(data):
    """Statistics do not depend on the order of the values within a channel."""
    x, axis, rng = data
    xl = np.moveaxis(x, axis, 0)
    flat = xl.reshape(xl.shape[0], -1)
    shuffled = np.ascontiguousarray(flat[:, rng.permutation(flat.shape[1])].T)  # (M, C)
    _, mean, var = bnorm.batch_stats(x, axis=axis)
    _, smean, svar = bnorm.batch_stats(shuffled, axis=1)
    t = ref.TOL[x.dtype]["stat"]
    assert_close(smean, mean.astype(np.float64), t, "mean")
    assert_close(svar, var.astype(np.float64), t, "var")


@st.composite
def wide_layouts(draw):
    """(x, axis, rng): few rows of many channels, channels last (2-D (N, C) or 3-D
    (N, L, C) with axis=-1), where the CPU reduces and writes column strips."""
    rows = draw(st.integers(2, 64))
    channels = draw(st.integers(1, 3000))
    shape = (rows, channels) if draw(st.booleans()) else (max(1, rows // 4), min(rows, 4), channels)
    if int(np.prod(shape[:-1])) < 2:
        shape = (2,) + shape[1:]
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return ref.make_x(rng, shape, -1, dtype, loc=draw(st.sampled_from([0.0, 100.0]))), -1, rng


@st.composite
def short_plane_layouts(draw):
    """(x, axis, rng): NCHW with small maps (H*W < 64), which the CPU reduces as rows of
    channel x position columns, in strips of whole channels when a strip fits in L2."""
    n = draw(st.integers(2, 40))
    c = draw(st.integers(1, 700))
    h, w = draw(st.integers(1, 7)), draw(st.integers(1, 9))
    if h * w < 2:
        w = 2
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    return ref.make_x(rng, (n, c, h, w), 1, dtype, loc=draw(st.sampled_from([0.0, 100.0]))), 1, rng


_thread_settings = hypothesis.settings(
    max_examples=40, deadline=None, suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])


@_thread_settings
@given(data=wide_layouts(), threads=st.sampled_from([1, 2, 3]))
def test_wide_inputs_match_reference_for_any_thread_count(restore_threads, data, threads):
    _check_against_reference_and_one_thread(data, threads)


@_thread_settings
@given(data=short_plane_layouts(), threads=st.sampled_from([1, 2, 3]))
def test_short_planes_match_reference_for_any_thread_count(restore_threads, data, threads):
    _check_against_reference_and_one_thread(data, threads)


def _check_against_reference_and_one_thread(data, threads):
    """Training forward and backward of x on `threads` threads against the float64
    reference, and bitwise against the same calls on one thread."""
    x, axis, rng = data
    bnorm.set_num_threads(threads)
    dy = ref.make_dy(rng, x.shape, x.dtype)
    w, b, rm0, rv0 = ref.make_params(rng, _channels(x, axis), x.dtype)
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=0.3)
    ry, rmean, rinv, rrm, rrv = ref.forward_train(x, w, b, rm0, rv0, axis, 0.3, 1e-5)
    t = ref.TOL[x.dtype]
    assert_close(y, ry, t["out"], "y")
    assert_close(mean, rmean, t["stat"], "mean")
    assert_close(invstd, rinv, t["stat"], "invstd")
    assert_close(rv, rrv, t["stat"], "running_var")
    dx, dw, db = bnorm.backward(dy, x, mean, invstd, w, axis=axis)
    rdx, rdw, rdb = ref.backward(dy, x, mean, invstd, w, axis, True)
    assert_close(dx, rdx, t["out"], "dx")
    assert_close(dw, rdw, t["stat"], "dweight")
    assert_close(db, rdb, t["stat"], "dbias")
    bnorm.set_num_threads(1)
    ref.assert_bitwise(bnorm.forward_train(x, w, b, axis=axis)[0], y, "y with 1 thread")
    ref.assert_bitwise(bnorm.backward(dy, x, mean, invstd, w, axis=axis)[0], dx, "dx with 1 thread")
