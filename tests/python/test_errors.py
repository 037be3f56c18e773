"""Every bad input raises TypeError (wrong dtype) or ValueError (wrong shape or value), with
a message naming the offending argument."""

import re
from types import SimpleNamespace

import numpy as np
import pytest

import bnorm
import reference as ref

C = 3
SHAPE = (4, C, 5)


def _valid(dtype=np.float32):
    rng = np.random.default_rng(0)
    x = ref.make_x(rng, SHAPE, 1, dtype)
    w, b, rm, rv = ref.make_params(rng, C, dtype)
    pd = ref.param_dtype(dtype)
    return SimpleNamespace(
        x=x, dy=ref.make_dy(rng, SHAPE, dtype), weight=w, bias=b, running_mean=rm,
        running_var=rv, mean=rm.copy(), invstd=ref.invstd_of(rv).astype(pd),
        sum_dy=np.ones(C, pd), sum_dy_xhat=np.ones(C, pd), count=20, axis=1, eps=1e-5,
        momentum=0.1, batch_stats=True, out=None)


CALLS = {
    "forward_train": lambda a: bnorm.forward_train(
        a.x, a.weight, a.bias, a.running_mean, a.running_var, axis=a.axis,
        momentum=a.momentum, eps=a.eps, out=a.out),
    "forward_infer": lambda a: bnorm.forward_infer(
        a.x, a.running_mean, a.running_var, a.weight, a.bias, axis=a.axis, eps=a.eps,
        out=a.out),
    "backward": lambda a: bnorm.backward(
        a.dy, a.x, a.mean, a.invstd, a.weight, axis=a.axis, batch_stats=a.batch_stats,
        out=a.out),
    "batch_stats": lambda a: bnorm.batch_stats(a.x, axis=a.axis),
    "normalize": lambda a: bnorm.normalize(
        a.x, a.mean, a.invstd, a.weight, a.bias, axis=a.axis, out=a.out),
    "backward_reduce": lambda a: bnorm.backward_reduce(a.dy, a.x, a.mean, a.invstd,
                                                       axis=a.axis),
    "backward_elemt": lambda a: bnorm.backward_elemt(
        a.dy, a.x, a.mean, a.invstd, a.weight, a.sum_dy, a.sum_dy_xhat, a.count,
        axis=a.axis, out=a.out),
}

# which arguments each function reads
USES = {
    "forward_train": {"x", "weight", "bias", "running_mean", "running_var", "axis",
                      "momentum", "eps", "out"},
    "forward_infer": {"x", "running_mean", "running_var", "weight", "bias", "axis", "eps",
                      "out"},
    "backward": {"dy", "x", "mean", "invstd", "weight", "axis", "out"},
    "batch_stats": {"x", "axis"},
    "normalize": {"x", "mean", "invstd", "weight", "bias", "axis", "out"},
    "backward_reduce": {"dy", "x", "mean", "invstd", "axis"},
    "backward_elemt": {"dy", "x", "mean", "invstd", "weight", "sum_dy", "sum_dy_xhat",
                       "axis", "out"},
}

X_LIKE = {"x", "dy"}
PER_CHANNEL = {"weight", "bias", "running_mean", "running_var", "mean", "invstd", "sum_dy",
               "sum_dy_xhat"}


def _bad_inputs():
    """(id, function, x dtype, overrides(a) -> dict, exception, message pattern or None)."""
    cases = []

    def add(fn, ident, dtype, over, exc, pattern):
        cases.append(pytest.param(fn, dtype, over, exc, pattern, id=f"{fn}-{ident}"))

    for fn, uses in USES.items():
        # wrong dtypes of x (TypeError)
        for bad in (np.int32, np.int64, np.complex64, np.bool_):
            add(fn, f"x-{np.dtype(bad).name}", np.float32,
                lambda a, bad=bad: {k: getattr(a, k).astype(bad) for k in uses & X_LIKE},
                TypeError, None)
        if "dy" in uses:
            add(fn, "dy-float64-for-float32", np.float32,
                lambda a: {"dy": a.dy.astype(np.float64)}, TypeError, "dy")
        # non-native byte order: named, not nanobind's signature dump (TypeError)
        for name in sorted(uses & (X_LIKE | PER_CHANNEL)):
            add(fn, f"{name}-big-endian", np.float32,
                lambda a, name=name: {name: getattr(a, name).astype(">f4")}, TypeError,
                rf"{name} .*non-native byte order")
        # per-channel arrays of the wrong dtype (TypeError); float16 x needs float32 ones
        for name in sorted(uses & PER_CHANNEL):
            for xdt, pdt in ((np.float64, np.float32), (np.float32, np.float64),
                             (np.float16, np.float16), (np.float16, np.float64)):
                add(fn, f"{name}-{np.dtype(pdt).name}-for-{np.dtype(xdt).name}", xdt,
                    lambda a, name=name, pdt=pdt: {name: getattr(a, name).astype(pdt)},
                    TypeError, name)
            # wrong shapes (ValueError)
            for shp in ((C + 1,), (C - 1,), (1, C), ()):
                add(fn, f"{name}-shape{shp}", np.float32,
                    lambda a, name=name, shp=shp: {name: np.ones(shp, np.float32)},
                    ValueError, name)
        # ndim < 2
        add(fn, "x-1d", np.float32,
            lambda a, uses=uses: {k: getattr(a, k)[0, 0].copy() for k in uses & X_LIKE},
            ValueError, None)
        add(fn, "x-0d", np.float32,
            lambda a, uses=uses: {k: np.float32(1.0) * np.ones((), np.float32)
                                  for k in uses & X_LIKE}, ValueError, None)
        # axis out of range
        for axis in (3, -4, 100):
            add(fn, f"axis{axis}", np.float32, lambda a, axis=axis: {"axis": axis},
                ValueError, "axis")
        if "dy" in uses:
            add(fn, "dy-shape", np.float32, lambda a: {"dy": a.dy[:, :, :4].copy()},
                ValueError, "dy")
            add(fn, "dy-transposed-shape", np.float32,
                lambda a: {"dy": np.ascontiguousarray(a.dy.transpose(0, 2, 1))},
                ValueError, "dy")
        if "out" in uses:
            add(fn, "out-shape", np.float32,
                lambda a: {"out": np.empty((4, C, 6), np.float32)}, ValueError, "out")
            add(fn, "out-dtype", np.float32,
                lambda a: {"out": np.empty(SHAPE, np.float64)}, TypeError, "out")
            add(fn, "out-readonly", np.float32,
                lambda a: {"out": _readonly(np.empty(SHAPE, np.float32))}, ValueError, "out")
            add(fn, "out-big-endian", np.float32,
                lambda a: {"out": np.empty(SHAPE, ">f4")}, TypeError, "out")
            # out over part of an input: the kernel would overwrite values it has yet to read
            for name in sorted(uses & X_LIKE):
                add(fn, f"out-overlaps-{name}-partly", np.float32,
                    lambda a, name=name: _shifted_alias(a, name), ValueError,
                    f"out overlaps {name} partly")
        if "eps" in uses:
            for eps in (0.0, -1e-5):
                add(fn, f"eps{eps}", np.float32, lambda a, eps=eps: {"eps": eps},
                    ValueError, "eps")
            for eps in (None, "0.5", np.ones(1)):
                add(fn, f"eps-{type(eps).__name__}", np.float32, lambda a, eps=eps: {"eps": eps},
                    TypeError, "eps")
        if "momentum" in uses:
            for m in (-0.1, 1.0001, 2.0, float("nan")):
                add(fn, f"momentum{m}", np.float32, lambda a, m=m: {"momentum": m},
                    ValueError, "momentum")
            for m in (None, "0.1", True):
                add(fn, f"momentum-{type(m).__name__}", np.float32, lambda a, m=m: {"momentum": m},
                    TypeError, "momentum")
    for name in ("running_mean", "running_var"):
        add("forward_train", f"{name}-readonly", np.float32,
            lambda a, name=name: {name: _readonly(getattr(a, name))}, ValueError, name)
        add("forward_train", f"{name}-broadcast", np.float32,
            lambda a, name=name: {name: np.broadcast_to(np.float32(0), (C,))}, ValueError,
            f"{name} is read-only")
        add("forward_train", f"{name}-strided", np.float32,
            lambda a, name=name: {name: np.zeros(2 * C, np.float32)[::2]}, ValueError,
            f"{name} must be C-contiguous")
    # scalars too large for a float
    for name in ("eps", "momentum"):
        add("forward_train", f"{name}-huge-int", np.float32, lambda a, name=name: {name: 10**400}, ValueError, name)
    add("backward_elemt", "count-huge-int", np.float32, lambda a: {"count": 10**400}, ValueError, "count")
    # batch_stats is a bool, not anything truthy
    for bad in ("no", None, np.ones(2, bool)):
        add("backward", f"batch_stats-{type(bad).__name__}", np.float32, lambda a, bad=bad: {"batch_stats": bad},
            TypeError, "batch_stats")
    # inputs NumPy cannot take as they are: a masked array (its mask would be dropped)
    add("forward_train", "x-masked", np.float32, lambda a: {"x": np.ma.masked_array(a.x)}, TypeError, "masked")
    add("forward_train", "weight-masked", np.float32, lambda a: {"weight": np.ma.masked_array(a.weight)}, TypeError,
        "weight is a masked array")
    # and arrays written to: the results would be written under the mask
    add("forward_train", "out-masked", np.float32,
        lambda a: {"out": np.ma.masked_array(np.zeros_like(a.x), mask=True)}, TypeError, "out is a masked array")
    add("forward_train", "running_mean-masked", np.float32,
        lambda a: {"running_mean": np.ma.masked_array(a.running_mean)}, TypeError, "running_mean is a masked array")
    # backward_elemt's count: a number, a 0-d array or a (C,) array of one value
    for ident, count, exc in (("None", None, TypeError), ("str", "20", TypeError),
                              ("bool", True, TypeError), ("bool-array", np.ones(C, bool), TypeError),
                              ("zero", 0, ValueError), ("nan", float("nan"), ValueError),
                              ("per-channel-differ", np.array([20, 20, 21]), ValueError),
                              ("per-channel-nan", np.full(C, np.nan), ValueError),
                              ("structured", np.zeros(C, "i4,i4"), TypeError),
                              ("shape", np.full(C + 1, 20), ValueError), ("2d", np.full((1, C), 20), ValueError)):
        add("backward_elemt", f"count-{ident}", np.float32, lambda a, count=count: {"count": count}, exc, "count")
    add("forward_train", "M==1", np.float32,
        lambda a: {"x": a.x[:1, :, :1].copy()}, ValueError,
        r"^expected more than 1 value per channel when training, got input of shape")
    return cases


def _shifted_alias(a, name):
    """name and out as two overlapping views of one buffer, one row apart along axis 0."""
    buf = np.concatenate([getattr(a, name), getattr(a, name)[:1]])
    return {name: buf[:-1], "out": buf[1:]}


def _readonly(arr):
    arr = arr.copy()
    arr.flags.writeable = False
    return arr


@pytest.mark.parametrize("fn,dtype,over,exc,pattern", _bad_inputs())
def test_bad_input_raises(fn, dtype, over, exc, pattern):
    a = _valid(dtype)
    updates = over(a)
    for k, v in updates.items():
        setattr(a, k, v)
    snapshot = {k: v.copy() for k, v in vars(a).items() if isinstance(v, np.ndarray)}
    with pytest.raises(exc) as info:
        CALLS[fn](a)
    if pattern is not None:
        assert re.search(pattern, str(info.value), re.IGNORECASE), \
            f"message does not name {pattern!r}: {info.value!r}"
    for k, v in snapshot.items():
        ref.assert_bitwise(getattr(a, k), v, f"{k} modified by a failed call")


def test_all_valid_calls_succeed():
    """The baseline every bad-input case perturbs is itself valid."""
    for dtype in ref.DTYPES:
        for fn, call in CALLS.items():
            call(_valid(dtype))


@pytest.mark.parametrize("counts,means,vars_", [
    (np.ones(3), np.zeros((2, 4)), np.zeros((2, 4))),      # counts vs shards
    (np.ones(2), np.zeros((2, 4)), np.zeros((2, 5))),      # means vs vars
    (np.ones(2), np.zeros(4), np.zeros(4)),                # means not 2-D
    (np.array([1.0, -1.0]), np.zeros((2, 4)), np.zeros((2, 4))),  # negative count
], ids=["counts-len", "vars-shape", "means-1d", "negative-count"])
def test_merge_stats_bad_input(counts, means, vars_):
    with pytest.raises(ValueError):
        bnorm.merge_stats(counts, means, vars_)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_merge_stats_negative_variance(dtype):
    """A negative variance is refused where its count is not 0 (an empty part's values are
    ignored, whatever they hold), and nothing is returned half-computed."""
    means, vars_ = np.zeros((2, 3), dtype), np.ones((2, 3), dtype)
    vars_[1, 2] = -0.5
    with pytest.raises(ValueError, match=r"vars must be >= 0, got -0.5 \(part 1, channel 2\)"):
        bnorm.merge_stats(np.array([4, 5]), means, vars_)
    count, mean, var = bnorm.merge_stats(np.array([4, 0]), means, vars_)
    assert count == 4 and np.array_equal(var, np.ones(3, dtype))
    vars_[1, 2] = np.nan  # NaN passes to its channel, as in every op
    assert np.isnan(bnorm.merge_stats(np.array([4, 5]), means, vars_)[2][2])


def test_merge_stats_dtype_mismatch():
    with pytest.raises(TypeError):
        bnorm.merge_stats(np.ones(2), np.zeros((2, 4), np.float32), np.zeros((2, 4)))


@pytest.mark.parametrize("num_features,kwargs,exc,pattern", [
    pytest.param(0, {}, ValueError, "num_features", id="num_features=0"),
    pytest.param(-2, {}, ValueError, "num_features", id="num_features=-2"),
    pytest.param(3, {"eps": 0.0}, ValueError, "eps", id="eps=0"),
    pytest.param(3, {"eps": -1.0}, ValueError, "eps", id="eps=-1"),
    pytest.param(3, {"momentum": 1.5}, ValueError, "momentum", id="momentum=1.5"),
    pytest.param(3, {"momentum": -0.5}, ValueError, "momentum", id="momentum=-0.5"),
    pytest.param(3, {"dtype": np.int32}, TypeError, "dtype", id="dtype=int32"),
    pytest.param(3, {"momentum": "0.1"}, TypeError, "momentum", id="momentum=str"),
    pytest.param(3, {"momentum": True}, TypeError, "momentum", id="momentum=True"),
    pytest.param(3, {"eps": None}, TypeError, "eps", id="eps=None"),
    pytest.param(3, {"eps": 10**400}, ValueError, "eps", id="eps=huge-int"),
    pytest.param(3, {"dtype": ">f4"}, TypeError, "native byte order", id="dtype=big-endian"),
])
def test_layer_bad_construction(num_features, kwargs, exc, pattern):
    with pytest.raises(exc, match=f"(?i){pattern}"):
        bnorm.BatchNorm(num_features, **kwargs)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_bad_input(training):
    bn = bnorm.BatchNorm(3)
    bn.train(training)
    with pytest.raises(ValueError):
        bn(np.ones((4, 5), np.float32))  # 5 channels, layer has 3
    with pytest.raises(ValueError):
        bn(np.ones(3, np.float32))  # 1-D
    with pytest.raises(TypeError):
        bn(np.ones((4, 3), np.float64))  # layer is float32
    assert bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    if training:
        with pytest.raises(ValueError, match="^expected more than 1 value per channel"):
            bn(np.ones((1, 3), np.float32))
    else:
        bn(np.ones((1, 3), np.float32))  # one sample is fine in eval mode


def test_tensor_that_requires_grad_is_named():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match="x cannot be converted to a NumPy array"):
        bnorm.forward_train(torch.ones(4, 3, requires_grad=True))


def test_scalars_may_be_0d_arrays():
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    expected = bnorm.forward_train(x, eps=1e-3, momentum=0.5)
    got = bnorm.forward_train(x, eps=np.array(1e-3), momentum=np.float32(0.5) * np.ones(()))
    for g, e in zip(got, expected):
        ref.assert_bitwise(g, e, "0-d array scalars")


def test_bfloat16_scalars_are_real_numbers():
    """eps, momentum and count may be ml_dtypes bfloat16 scalars or 0-d arrays, as float16 ones."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    x = np.random.default_rng(0).random((4, 3, 5)).astype(np.float32)
    want = bnorm.forward_train(x, eps=float(bf16(1e-3)), momentum=0.5)
    for eps in (bf16(1e-3), np.array(1e-3, bf16)):
        got = bnorm.forward_train(x, eps=eps, momentum=np.array(0.5, bf16))
        for a, b in zip(want, got):
            np.testing.assert_array_equal(a, b)
    count, _, _ = bnorm.merge_stats(np.array([2, 3], bf16), np.zeros((2, 3)), np.ones((2, 3)))
    assert count == 5


def test_ml_dtypes_names_in_dtype_errors():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    with pytest.raises(TypeError, match=r"got float8_e4m3fn$"):
        bnorm.forward_train(np.zeros((4, 3), ml_dtypes.float8_e4m3fn))


def test_masked_arrays_are_refused_everywhere():
    masked = np.ma.masked_array(np.ones((4, 3), np.float32), mask=np.eye(4, 3, dtype=bool))
    with pytest.raises(TypeError, match="x is a masked array"):
        bnorm.BatchNorm(3)(masked)
    with pytest.raises(TypeError, match="means is a masked array"):
        bnorm.merge_stats(np.ones(4), masked, np.ones((4, 3), np.float32))


def test_layer_big_endian_x_gets_the_byte_order_message():
    with pytest.raises(TypeError, match="non-native byte order"):
        bnorm.BatchNorm(3)(np.ones((4, 3), ">f4"))
