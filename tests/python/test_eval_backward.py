"""Eval-mode backward (batch_stats=False): dx = g * (invstd * weight), g being dy or, with
activation="relu", dy * (y > 0); dweight and dbias are backward_reduce's sums. The kernels
write this dx in the training backward's schedules (each channel's dx from cache after its
sums, column strips for short rows and channels-last, two passes over planes too large
for cache, with dsum written by the first pass where it streams), or, without ReLU on
cached data, by the inference pass after the sums; every schedule is compared here bit for
bit with that definition (a zero's sign aside), on every dtype, and for 1 to 3 threads
(same bits), in place over each input.
"""

import numpy as np
import pytest

import bnorm
import reference as ref

try:
    import ml_dtypes

    DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
except ImportError:
    DTYPES = [np.float32, np.float64, np.float16]

# (shape, axis): rows (N, C); short and long planes, cached and streamed (> 4 MiB), whose
# channels fit in cache or not; channels-last. Streamed for every dtype of 2 bytes or
# more: (8, 262144) and (16, 5243, 5, 5) in column strips (of rows; of short planes'
# channels), (128, 335, 7, 7) and (40, 256, 14, 14) per channel, (65536, 64) and
# (16, 64, 64, 64) channels-last in two passes, (65537, 17) too as a view of narrow rows
# and a rest of two rows (eval mode without ReLU: one pass, the reduction writing dx);
# (2, 3, 700, 700) per channel or in two passes by dtype.
LAYOUTS = [
    ((300, 7), 1),
    ((64, 96), 1),
    ((4, 8, 5, 5), 1),
    ((16, 64, 7, 7), 1),
    ((3, 5, 1000), 1),
    ((8, 262144), 1),
    ((16, 5243, 5, 5), 1),
    ((128, 335, 7, 7), 1),
    ((40, 256, 14, 14), 1),
    ((2, 3, 700, 700), 1),
    ((65536, 64), 1),
    ((65537, 17), 1),
    ((8, 6, 6, 40), -1),
    ((64, 14, 14, 96), -1),
    ((16, 64, 64, 64), -1),
]
# A shape whose schedule depends on the thread count (per channel on 1 or 2 threads, two
# passes on 3), and some of the above.
THREAD_LAYOUTS = [((8, 2, 256, 256), 1), ((16, 5243, 5, 5), 1), ((65536, 64), 1), ((128, 335, 7, 7), 1)]


def _bits(a):
    return a.view(np.uint16 if a.itemsize == 2 else np.uint32 if a.itemsize == 4 else np.uint64)


def _case(shape, axis, dtype, seed=0):
    rng = np.random.default_rng(seed)
    c = shape[axis]
    p = np.float64 if dtype == np.float64 else np.float32
    x = (1.0 + 2.0 * rng.standard_normal(shape)).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    mean = rng.standard_normal(c).astype(p)
    invstd = (0.5 + rng.random(c)).astype(p)
    weight = rng.standard_normal(c).astype(p)
    return x, dy, mean, invstd, weight


def _per_channel(a, shape, axis):
    view = [1] * len(shape)
    view[axis] = shape[axis]
    return a.reshape(view)


# (float64 on the largest shapes left out: it streams from half their size, on the others)
CASES = [(layout, dtype) for layout in LAYOUTS for dtype in DTYPES
         if np.dtype(dtype).itemsize < 8 or np.prod(layout[0]) <= 1 << 20]


@pytest.mark.parametrize("layout,dtype", CASES,
                         ids=[f"{'x'.join(map(str, l[0]))}-ax{l[1]}-{np.dtype(d).name}" for l, d in CASES])
@pytest.mark.parametrize("relu", [False, True], ids=["plain", "relu"])
def test_eval_backward_is_its_definition(layout, dtype, relu):
    shape, axis = layout
    x, dy, mean, invstd, weight = _case(shape, axis, dtype)
    p = invstd.dtype
    scale = _per_channel((invstd * weight).astype(p), shape, axis)
    if relu:
        running_var = (1.0 / invstd.astype(np.float64) ** 2 - 1e-5).astype(p)
        y = bnorm.forward_infer(x, mean, running_var, weight, None, axis=axis,
                                activation="relu")
        dx, dweight, dbias, dsum = bnorm.backward(dy, x, mean, invstd, weight, axis=axis, batch_stats=False,
                                                  activation="relu", y=y)
        g = np.where(y > 0, dy, np.zeros_like(dy))
        ref.assert_bitwise(dsum, g, "dsum")
        sums = bnorm.backward_reduce(dy, x, mean, invstd, axis=axis, activation="relu", y=y)
    else:
        dx, dweight, dbias = bnorm.backward(dy, x, mean, invstd, weight, axis=axis, batch_stats=False)
        g = dy
        sums = bnorm.backward_reduce(dy, x, mean, invstd, axis=axis)
    want = (g.astype(p) * scale).astype(dtype)
    # equal values; a zero's sign may differ only where g is zero (0 * scale)
    assert np.array_equal(_bits(dx) == _bits(want), (_bits(dx) == _bits(want)) | (want.astype(p) == 0))
    assert np.array_equal(dx.astype(p), want.astype(p))
    ref.assert_bitwise(dbias, sums[0], "dbias")
    ref.assert_bitwise(dweight, sums[1], "dweight")


@pytest.mark.parametrize("layout", [((16, 64, 7, 7), 1), ((64, 96), 1), ((2, 3, 700, 700), 1), ((8, 262144), 1),
                                    ((16, 5243, 5, 5), 1), ((128, 335, 7, 7), 1), ((16, 64, 64, 64), -1)],
                         ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}")
def test_eval_backward_reads_no_x_for_dx(layout):
    # dx = dy * scale does not depend on x: an infinite x changes dweight, never dx
    shape, axis = layout
    x, dy, mean, invstd, weight = _case(shape, axis, np.float32, seed=1)
    x_inf = x.copy()
    x_inf.reshape(-1)[:: 7] = np.inf
    for kw in ({}, {"activation": "relu", "y": dy[::-1].copy()}):
        got = bnorm.backward(dy, x, mean, invstd, weight, axis=axis, batch_stats=False, **kw)
        got_inf = bnorm.backward(dy, x_inf, mean, invstd, weight, axis=axis, batch_stats=False, **kw)
        ref.assert_bitwise(got[0], got_inf[0], "dx")


def _all_outputs(shape, axis, dtype, seed):
    x, dy, mean, invstd, weight = _case(shape, axis, dtype, seed=seed)
    y = (dy[::-1] + 0.25).astype(dtype)
    plain = bnorm.backward(dy, x, mean, invstd, weight, axis=axis, batch_stats=False)
    relu = bnorm.backward(dy, x, mean, invstd, weight, axis=axis, batch_stats=False, activation="relu", y=y)
    return (*plain, *relu)


@pytest.mark.parametrize("dtype", [np.float32, np.float16], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("layout", THREAD_LAYOUTS, ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}")
def test_eval_backward_same_bits_for_any_thread_count(layout, dtype, restore_threads):
    shape, axis = layout
    results = []
    for threads in (1, 2, 3):
        bnorm.set_num_threads(threads)
        results.append(_all_outputs(shape, axis, dtype, seed=3))
    for other in results[1:]:
        for a, b in zip(results[0], other):
            ref.assert_bitwise(a, b, "thread counts differ")


@pytest.mark.parametrize("layout", [((16, 64, 7, 7), 1), ((2, 3, 700, 700), 1), ((64, 14, 14, 96), -1),
                                    ((8, 262144), 1), ((128, 335, 7, 7), 1), ((65536, 64), 1)],
                         ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}")
def test_eval_backward_in_place(layout):
    shape, axis = layout
    x, dy, mean, invstd, weight = _case(shape, axis, np.float32, seed=2)
    y = (dy[::-1] + 0.25).astype(np.float32)
    want = bnorm.backward(dy, x, mean, invstd, weight, axis=axis, batch_stats=False)
    want_relu = bnorm.backward(dy, x, mean, invstd, weight, axis=axis, batch_stats=False, activation="relu", y=y)
    for name in ("dy", "x"):
        args = {"dy": dy.copy(), "x": x.copy()}
        got = bnorm.backward(args["dy"], args["x"], mean, invstd, weight, axis=axis, batch_stats=False,
                             out=args[name])
        assert got[0] is args[name]
        for a, b in zip(got, want):
            ref.assert_bitwise(a, b, f"dx over {name}")
    for name in ("dy", "x", "y"):
        args = {"dy": dy.copy(), "x": x.copy(), "y": y.copy()}
        got = bnorm.backward(args["dy"], args["x"], mean, invstd, weight, axis=axis, batch_stats=False,
                             activation="relu", y=args["y"], out=args[name])
        assert got[0] is args[name]
        for a, b in zip(got, want_relu):
            ref.assert_bitwise(a, b, f"dx over {name}, with ReLU")
