"""Split-phase API: merge_stats over shards, and consistency of the split phases
(batch_stats + normalize, backward_reduce + backward_elemt) with the whole operations."""

import numpy as np
import pytest

import bnorm
import reference as ref
from reference import assert_close


def _shard_stats(shards, axis):
    stats = [bnorm.batch_stats(s, axis=axis) for s in shards]
    counts = np.array([s[0] for s in stats], dtype=np.float64)
    return counts, np.stack([s[1] for s in stats]), np.stack([s[2] for s in stats])


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("sizes", [(5, 5, 5), (1, 7, 2, 30), (0, 9, 0, 4), (40,)],
                         ids=lambda s: "-".join(map(str, s)))
def test_merge_stats_equals_batch_stats_of_concatenation(rng, dtype, sizes):
    c = 6
    shards = [ref.make_x(rng, (n, c, 3), 1, dtype, loc=5.0) for n in sizes]
    counts, means, vars_ = _shard_stats(shards, 1)
    assert counts.tolist() == [3 * n for n in sizes]
    count, mean, var = bnorm.merge_stats(counts, means, vars_)
    whole = np.concatenate(shards, axis=0)
    wcount, wmean, wvar = bnorm.batch_stats(whole, axis=1)
    rcount, rmean, rvar = ref.batch_stats(whole, 1)
    assert np.ndim(count) == 0, "1-D counts give a scalar total count"
    assert float(count) == wcount == rcount
    pd = ref.param_dtype(dtype)
    assert mean.dtype == pd and var.dtype == pd
    t = ref.tol(dtype, "stat")
    assert_close(mean, rmean, t, "merged mean")
    assert_close(var, rvar, t, "merged var")
    assert_close(mean, wmean.astype(np.float64), t, "merged mean vs batch_stats")
    assert_close(var, wvar.astype(np.float64), t, "merged var vs batch_stats")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=lambda d: np.dtype(d).name)
def test_merge_stats_reference_formula(rng, dtype):
    """Arbitrary per-shard statistics merge as Chan's formula says (counts as floats)."""
    p, c = 5, 4
    counts = rng.integers(1, 100, p).astype(np.float64)
    means = rng.uniform(-10, 10, (p, c)).astype(dtype)
    vars_ = rng.uniform(0, 5, (p, c)).astype(dtype)
    count, mean, var = bnorm.merge_stats(counts, means, vars_)
    rcount, rmean, rvar = ref.merge_stats(counts, means, vars_)
    assert float(count) == rcount
    assert_close(mean, rmean, ref.tol(dtype, "stat"), "mean")
    assert_close(var, rvar, ref.tol(dtype, "stat"), "var")


@pytest.mark.parametrize("garbage", [(0.0, 0.0), (1e3, 7.0), (np.nan, np.nan)],
                         ids=["zeros", "finite", "nan"])
def test_merge_stats_empty_shard_contributes_nothing(rng, garbage):
    c = 3
    counts = np.array([10.0, 0.0, 6.0])
    means = rng.standard_normal((3, c))
    vars_ = rng.uniform(0.5, 2, (3, c))
    means[1], vars_[1] = garbage
    count, mean, var = bnorm.merge_stats(counts, means, vars_)
    rcount, rmean, rvar = ref.merge_stats(counts[[0, 2]], means[[0, 2]], vars_[[0, 2]])
    assert float(count) == 16
    assert_close(mean, rmean, 1e-12, "mean")
    assert_close(var, rvar, 1e-12, "var")


def test_merge_stats_integer_counts(rng):
    counts = np.array([3, 4], dtype=np.int64)
    means = rng.standard_normal((2, 2))
    vars_ = rng.uniform(0.5, 2, (2, 2))
    count, mean, var = bnorm.merge_stats(counts, means, vars_)
    rcount, rmean, rvar = ref.merge_stats(counts, means, vars_)
    assert float(count) == 7
    assert_close(mean, rmean, 1e-12)
    assert_close(var, rvar, 1e-12)


@pytest.mark.parametrize("dtype,value", [(np.float64, 1e200), (np.float32, 3e38)], ids=["float64", "float32"])
def test_merge_stats_huge_means(dtype, value):
    """Means whose square overflows double (float64 over 1e154): the first part is taken as
    it is, not merged into nothing (delta * delta * 0 was inf * 0 = NaN)."""
    means = np.full((3, 2), value, dtype)
    count, mean, var = bnorm.merge_stats(np.array([2, 0, 3]), means, np.zeros((3, 2), dtype))
    assert count == 5
    assert np.array_equal(mean, np.full(2, value, dtype)) and np.array_equal(var, np.zeros(2, dtype))


def test_merge_stats_single_shard_is_identity(rng):
    means = rng.standard_normal((1, 5))
    vars_ = rng.uniform(0.5, 2, (1, 5))
    count, mean, var = bnorm.merge_stats(np.array([12.0]), means, vars_)
    assert float(count) == 12
    assert_close(mean, means[0], 1e-15)
    assert_close(var, vars_[0], 1e-15)


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", [((8, 5, 6), 1), ((4, 6, 7, 5), -1), ((9, 4), 0)],
                         ids=lambda l: f"{l[0]}-ax{l[1]}")
def test_batch_stats_plus_normalize_equals_forward_train(rng, dtype, layout):
    shape, axis = layout
    eps = 1e-5
    x = ref.make_x(rng, shape, axis, dtype)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, dtype)
    y, save_mean, save_invstd = bnorm.forward_train(x, w, b, axis=axis, eps=eps)
    count, mean, var = bnorm.batch_stats(x, axis=axis)
    assert count == x.size // c
    invstd = (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(var.dtype)
    t = ref.tol(dtype, "stat")
    assert_close(mean, save_mean.astype(np.float64), t, "batch_stats mean vs save_mean")
    assert_close(invstd, save_invstd.astype(np.float64), t, "invstd vs save_invstd")
    y2 = bnorm.normalize(x, mean, invstd, w, b, axis=axis)
    assert_close(y2, y.astype(np.float64), ref.tol(dtype, "out"), "normalize vs forward_train")
    # normalize with the statistics forward_train saved gives forward_train's y
    y3 = bnorm.normalize(x, save_mean, save_invstd, w, b, axis=axis)
    assert_close(y3, y.astype(np.float64), ref.tol(dtype, "out"), "normalize(saved) vs y")


@pytest.mark.parametrize("dtype", ref.DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", [((8, 5, 6), 1), ((4, 6, 7, 5), -1), ((9, 4), 0)],
                         ids=lambda l: f"{l[0]}-ax{l[1]}")
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_reduce_plus_elemt_equals_backward(rng, dtype, layout, affine):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, dtype)
    dy = ref.make_dy(rng, shape, dtype)
    c = shape[ref.norm_axis(len(shape), axis)]
    w = ref.make_params(rng, c, dtype)[0] if affine else None
    _, mean, invstd = bnorm.forward_train(x, w, axis=axis)
    dx, dw, db = bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=True)
    sum_dy, sum_dy_xhat = bnorm.backward_reduce(dy, x, mean, invstd, axis=axis)
    t = ref.tol(dtype, "stat")
    assert_close(sum_dy, db.astype(np.float64), t, "sum_dy vs dbias")
    assert_close(sum_dy_xhat, dw.astype(np.float64), t, "sum_dy_xhat vs dweight")
    dx2 = bnorm.backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat, x.size // c,
                               axis=axis)
    assert_close(dx2, dx.astype(np.float64), ref.tol(dtype, "out"), "split dx vs backward dx")


def test_sharded_training_step_equals_whole_batch(rng):
    """The distributed recipe on one process: shard stats -> merge -> normalize each shard
    -> backward_reduce per shard -> sum -> backward_elemt with the global count."""
    c, eps = 4, 1e-5
    shards = [ref.make_x(rng, (n, c, 5), 1, np.float64) for n in (3, 6, 1)]
    dys = [ref.make_dy(rng, s.shape, np.float64) for s in shards]
    w, b, _, _ = ref.make_params(rng, c, np.float64)
    counts, means, vars_ = _shard_stats(shards, 1)
    count, mean, var = bnorm.merge_stats(counts, means, vars_)
    invstd = 1.0 / np.sqrt(var + eps)
    ys = [bnorm.normalize(s, mean, invstd, w, b) for s in shards]
    red = [bnorm.backward_reduce(dy, s, mean, invstd) for dy, s in zip(dys, shards)]
    sum_dy = sum(r[0] for r in red)
    sum_dy_xhat = sum(r[1] for r in red)
    dxs = [bnorm.backward_elemt(dy, s, mean, invstd, w, sum_dy, sum_dy_xhat, count)
           for dy, s in zip(dys, shards)]
    x, dy = np.concatenate(shards), np.concatenate(dys)
    ry, rmean, rinv, _, _ = ref.forward_train(x, w, b, eps=eps)
    rdx, rdw, rdb = ref.backward(dy, x, rmean, rinv, w)
    assert_close(np.concatenate(ys), ry, 1e-12, "y")
    assert_close(np.concatenate(dxs), rdx, 1e-12, "dx")
    assert_close(sum_dy_xhat, rdw, 1e-12, "dweight")
    assert_close(sum_dy, rdb, 1e-12, "dbias")


def test_backward_elemt_takes_the_count_of_merge_stats(rng):
    """merge_stats returns a (C,) count for (P, C) counts; backward_elemt takes it (and a 0-d
    array) when every channel has the same count, with the same bits as the number."""
    c = 4
    shards = [ref.make_x(rng, (n, c, 5), 1, np.float32) for n in (3, 6)]
    counts, means, vars_ = _shard_stats(shards, 1)
    per_channel = np.repeat(np.asarray(counts)[:, None], c, axis=1)
    count, mean, var = bnorm.merge_stats(per_channel, means, vars_)
    assert count.shape == (c,)
    x = np.concatenate(shards)
    dy = ref.make_dy(rng, x.shape, np.float32)
    invstd = (1.0 / np.sqrt(var + 1e-5)).astype(np.float32)
    sums = bnorm.backward_reduce(dy, x, mean, invstd)
    expected = bnorm.backward_elemt(dy, x, mean, invstd, None, *sums, 45)
    for form in (count, np.array(45), np.int64(45), np.full(c, 45, np.int32)):
        ref.assert_bitwise(bnorm.backward_elemt(dy, x, mean, invstd, None, *sums, form), expected,
                           f"count given as {type(form).__name__} {getattr(form, 'shape', '')}")


@pytest.mark.parametrize("counts,total", [
    (np.array([60000, 60000], np.float16), 120000.0),       # overflowed float16 (inf)
    (np.array([2**24, 1], np.float32), 16777217.0),         # rounded in float32
    (np.array([2**62, 2**62], np.int64), 2**63),            # wrapped in int64
], ids=["float16", "float32", "int64"])
def test_merge_stats_total_count_is_exact(counts, total):
    count, mean, var = bnorm.merge_stats(counts, np.zeros((2, 1)), np.ones((2, 1)))
    assert count == total and type(count) is type(total)
    assert mean[0] == 0 and var[0] == 1


def test_backward_elemt_of_an_empty_x_takes_its_count_of_zero(rng):
    """backward_reduce + backward_elemt with count = M equals backward, also for M = 0."""
    x = np.zeros((0, 3, 4), np.float32)
    count, mean, var = bnorm.batch_stats(x)
    sums = bnorm.backward_reduce(x, x, mean, var)
    assert count == 0 and bnorm.backward_elemt(x, x, mean, var, None, *sums, count).shape == x.shape


def test_merge_stats_of_no_parts_keeps_the_count_type():
    assert type(bnorm.merge_stats(np.zeros(0), np.zeros((0, 2)), np.zeros((0, 2)))[0]) is float
    assert type(bnorm.merge_stats(np.zeros(0, int), np.zeros((0, 2)), np.zeros((0, 2)))[0]) is int
