"""More than 2^31 elements (float16, 4 GiB per array): 64-bit sizes and indices.

x is built from a repeating random block (cheap to fill, statistics known exactly in
float64) plus a distinctive tail that lies entirely beyond element 2^31: a kernel that
wraps its index at 32 bits misses or misplaces the tail, which shifts every statistic far
beyond the tolerance. Two layouts: (N, C) with a huge outer extent, and (1, C, L) with a
huge inner extent (channel 1 starts after 2^30 and ends after 2^31).
Needs about 8.5 GiB of memory (x and y).
"""

import numpy as np
import pytest

import bnorm
import reference as ref

TOTAL = 2**31 + 64 * 1024   # elements
BLOCK = 4096                # period of the repeating block
EPS = 1e-5


class Segments:
    """Exact float64 per-channel sums of the data, built up segment by segment."""

    def __init__(self, c):
        self.n = np.zeros(c)
        self.s1 = np.zeros(c)
        self.s2 = np.zeros(c)

    def add(self, ch, values, repeat=1):
        v = np.asarray(values, np.float64)
        self.n[ch] += repeat * v.size
        self.s1[ch] += repeat * v.sum()
        self.s2[ch] += repeat * (v * v).sum()

    def stats(self):
        mean = self.s1 / self.n
        # sum((x-mean)^2) from exact block sums: fine in float64 at these magnitudes
        var = self.s2 / self.n - mean * mean
        return mean, var


def _block(rng, shape, mu, sd=1.0):
    return (rng.standard_normal(shape) * sd + mu).astype(np.float16)


def _outer_layout(rng):
    """(N, 4): rows [0, 2^29) repeat a block, the last 16384 rows (elements >= 2^31) differ."""
    c = 4
    n = TOTAL // c
    n0 = 2**31 // c
    x = np.empty((n, c), np.float16)
    seg = Segments(c)
    block = _block(rng, (BLOCK, c), 1.0 + np.arange(c))
    x[:n0].reshape(-1, BLOCK, c)[...] = block
    tail = _block(rng, (n - n0, c), 300.0 * (1 + np.arange(c)), 10.0)
    x[n0:] = tail
    for ch in range(c):
        seg.add(ch, block[:, ch], n0 // BLOCK)
        seg.add(ch, tail[:, ch])
    samples = [np.s_[:64], np.s_[n0 - 64:], rng.integers(0, n, 512)]
    return x, 1, seg, samples


def _inner_layout(rng):
    """(1, 2, L): channel 1 spans elements [L, 2L) with 2L > 2^31; its last 65536 differ."""
    c = 2
    length = TOTAL // c
    t = 65536
    x = np.empty((1, c, length), np.float16)
    seg = Segments(c)
    b0, b1 = _block(rng, BLOCK, 1.5), _block(rng, BLOCK, 2.5)
    x[0, 0].reshape(-1, BLOCK)[...] = b0
    x[0, 1, :length - t].reshape(-1, BLOCK)[...] = b1
    tail = _block(rng, t, 400.0, 10.0)
    x[0, 1, length - t:] = tail
    seg.add(0, b0, length // BLOCK)
    seg.add(1, b1, (length - t) // BLOCK)
    seg.add(1, tail)
    idx = rng.integers(0, length, 512)
    samples = [np.s_[:, :, :64], np.s_[:, :, length - t - 64:], np.s_[:, :, idx]]
    return x, 1, seg, samples


# Each layout runs forward_train and one mode of backward (each mode runs both backward
# phases: the per-channel reduction and the elementwise pass); float16 passes over 4 GiB
# take a while on 2 cores, so the suite stays within its time budget this way.
@pytest.mark.parametrize("build,batch_stats", [(_outer_layout, True), (_inner_layout, False)],
                         ids=["outer-batch", "inner-fixed"])
def test_more_than_2_31_elements(rng, build, batch_stats):
    x, axis, seg, samples = build(rng)
    assert x.size > 2**31
    c = x.shape[axis]
    m = x.size // c
    rmean, rvar = seg.stats()
    rinv = 1 / np.sqrt(rvar + EPS)
    w = np.linspace(0.5, 1.5, c).astype(np.float32)
    b = np.linspace(-1, 1, c).astype(np.float32)
    rm, rv = np.zeros(c, np.float32), np.ones(c, np.float32)
    stat_tol = 1e-4  # far below the effect of a missed or misplaced tail

    if batch_stats:
        count, bmean, bvar = bnorm.batch_stats(x, axis=axis)
        assert count == m
        ref.assert_close(bmean, rmean, stat_tol, "batch_stats mean")
        ref.assert_close(bvar, rvar, stat_tol, "batch_stats var")

    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=0.5, eps=EPS)
    assert y.shape == x.shape and y.dtype == np.float16
    ref.assert_close(mean, rmean, stat_tol, "save_mean")
    ref.assert_close(invstd, rinv, stat_tol, "save_invstd")
    ref.assert_close(rm, 0.5 * rmean, stat_tol, "running_mean")
    ref.assert_close(rv, 0.5 + 0.5 * rvar * m / (m - 1), stat_tol, "running_var")

    def expect(sl, fn):
        xs = x[sl].astype(np.float64)
        return fn(xs, lambda v: ref.per_channel(v, xs, axis))

    for sl in samples:
        ref.assert_close(y[sl], expect(sl, lambda xs, pc: (xs - pc(rmean)) * pc(rinv) * pc(w)
                                       + pc(b)), 1e-3, f"y{sl}")

    # backward with dy = x (no room for another 4 GiB array), dx written over y
    mean64, inv64 = mean.astype(np.float64), invstd.astype(np.float64)
    dx, dw, db = bnorm.backward(x, x, mean, invstd, w, axis=axis, batch_stats=batch_stats,
                                out=y)
    assert np.shares_memory(dx, y)
    ref.assert_close(db, seg.s1, stat_tol, "dbias")
    ref.assert_close(dw, inv64 * (seg.s2 - mean64 * seg.s1), stat_tol, "dweight")
    if batch_stats:
        # dx from bnorm's own sums (their precision is checked above; this checks placement)
        db64, dw64 = db.astype(np.float64), dw.astype(np.float64)

        def rdx(xs, pc):
            return pc(w * inv64) * (xs - pc(db64 / m) - (xs - pc(mean64)) * pc(inv64)
                                    * pc(dw64 / m))
    else:
        def rdx(xs, pc):
            return xs * pc(w * inv64)
    for sl in samples:
        ref.assert_close(dx[sl], expect(sl, rdx), 1e-3, f"dx{sl}")
