"""Float64 NumPy reference implementation of every bnorm operation.

Plain, obviously-correct code with PyTorch's batch-normalization semantics (see
shared DESIGN.md). Every function takes arrays of any float dtype, computes in float64
and returns float64 results; nothing is modified in place (running statistics are
returned, not updated).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = [
    "norm_axis",
    "per_channel",
    "reduce_axes",
    "batch_stats",
    "merge_stats",
    "normalize",
    "invstd_of",
    "update_running",
    "forward_train",
    "forward_infer",
    "backward",
    "backward_reduce",
    "backward_elemt",
    "RefBatchNorm",
]


def norm_axis(ndim: int, axis: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for ndim {ndim}")
    return axis % ndim


def reduce_axes(x: np.ndarray, axis: int) -> tuple[int, ...]:
    ax = norm_axis(x.ndim, axis)
    return tuple(i for i in range(x.ndim) if i != ax)


def per_channel(v, x: np.ndarray, axis: int) -> np.ndarray:
    """v (shape (C,)) as float64, shaped to broadcast against x along its channel axis."""
    ax = norm_axis(x.ndim, axis)
    shape = [1] * x.ndim
    shape[ax] = x.shape[ax]
    return np.asarray(v, dtype=np.float64).reshape(shape)


def _f64(a):
    return None if a is None else np.asarray(a, dtype=np.float64)


def _count(x: np.ndarray, axis: int) -> int:
    """M: values per channel (the product of every non-channel dimension)."""
    ax = norm_axis(x.ndim, axis)
    return int(np.prod([s for i, s in enumerate(x.shape) if i != ax], dtype=np.int64))


def batch_stats(x, axis=1):
    """(count M, mean, biased var) per channel; mean = var = 0 when M == 0."""
    x = _f64(x)
    ax = norm_axis(x.ndim, axis)
    c = x.shape[ax]
    m = _count(x, axis)
    if m == 0:
        return 0, np.zeros(c), np.zeros(c)
    red = reduce_axes(x, axis)
    mean = x.mean(axis=red)
    var = ((x - per_channel(mean, x, axis)) ** 2).mean(axis=red)
    return m, mean, var


def merge_stats(counts, means, vars_):
    """Combine per-shard (count, mean, biased var) over the leading axis.

    counts has shape (P,); means and vars (P, C). Shards with count 0 contribute nothing
    (even when their mean/var are garbage). Returns (total count, mean, var)."""
    counts = np.asarray(counts, dtype=np.float64)
    means = np.asarray(means, dtype=np.float64)
    vars_ = np.asarray(vars_, dtype=np.float64)
    keep = counts > 0
    counts, means, vars_ = counts[keep], means[keep], vars_[keep]
    total = counts.sum()
    c = means.shape[-1] if means.ndim else 0
    if total == 0:
        return 0.0, np.zeros(c), np.zeros(c)
    w = counts[:, None]
    mean = (w * means).sum(axis=0) / total
    var = (w * (vars_ + (means - mean) ** 2)).sum(axis=0) / total
    return total, mean, var


def invstd_of(var, eps=1e-5):
    return 1.0 / np.sqrt(np.asarray(var, dtype=np.float64) + eps)


def normalize(x, mean, invstd, weight=None, bias=None, axis=1):
    x = _f64(x)
    y = (x - per_channel(mean, x, axis)) * per_channel(invstd, x, axis)
    if weight is not None:
        y = y * per_channel(weight, x, axis)
    if bias is not None:
        y = y + per_channel(bias, x, axis)
    return y


def update_running(running_mean, running_var, mean, var, count, momentum):
    """New (running_mean, running_var): momentum update with the unbiased variance."""
    rm = rv = None
    if running_mean is not None:
        rm = (1.0 - momentum) * _f64(running_mean) + momentum * _f64(mean)
    if running_var is not None:
        unbiased = _f64(var) * count / (count - 1)
        rv = (1.0 - momentum) * _f64(running_var) + momentum * unbiased
    return rm, rv


def forward_train(x, weight=None, bias=None, running_mean=None, running_var=None,
                  axis=1, momentum=0.1, eps=1e-5):
    """Returns (y, save_mean, save_invstd, new_running_mean, new_running_var)."""
    m, mean, var = batch_stats(x, axis)
    if m == 1:
        raise ValueError("expected more than 1 value per channel when training")
    invstd = invstd_of(var, eps)
    y = normalize(x, mean, invstd, weight, bias, axis)
    if m == 0:
        return y, mean, invstd, _f64(running_mean), _f64(running_var)
    rm, rv = update_running(running_mean, running_var, mean, var, m, momentum)
    return y, mean, invstd, rm, rv


def forward_infer(x, running_mean, running_var, weight=None, bias=None, axis=1, eps=1e-5):
    return normalize(x, running_mean, invstd_of(running_var, eps), weight, bias, axis)


def backward_reduce(dy, x, mean, invstd, axis=1):
    """(sum_dy, sum_dy_xhat) per channel."""
    dy, x = _f64(dy), _f64(x)
    red = reduce_axes(x, axis)
    xhat = (x - per_channel(mean, x, axis)) * per_channel(invstd, x, axis)
    return dy.sum(axis=red), (dy * xhat).sum(axis=red)


def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, count, axis=1):
    """dx = weight*invstd*(dy - sum_dy/count - xhat*sum_dy_xhat/count)."""
    dy, x = _f64(dy), _f64(x)
    inv = per_channel(invstd, x, axis)
    xhat = (x - per_channel(mean, x, axis)) * inv
    w = 1.0 if weight is None else per_channel(weight, x, axis)
    return w * inv * (dy - per_channel(sum_dy, x, axis) / count
                      - xhat * per_channel(sum_dy_xhat, x, axis) / count)


def backward(dy, x, mean, invstd, weight=None, axis=1, batch_stats=True):
    """(dx, dweight, dbias). batch_stats=True: gradient through the batch statistics."""
    sum_dy, sum_dy_xhat = backward_reduce(dy, x, mean, invstd, axis)
    x64 = _f64(x)
    if batch_stats:
        m = _count(x64, axis)
        if m == 0:
            dx = np.zeros_like(x64)
        else:
            dx = backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xhat, m, axis)
    else:
        w = 1.0 if weight is None else per_channel(weight, x64, axis)
        dx = _f64(dy) * w * per_channel(invstd, x64, axis)
    return dx, sum_dy_xhat, sum_dy


class RefBatchNorm:
    """PyTorch's BatchNorm{1,2,3}d semantics in float64 (the reference for bnorm.BatchNorm)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, axis=1):
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.axis = axis
        self.training = True
        self.weight = np.ones(num_features) if affine else None
        self.bias = np.zeros(num_features) if affine else None
        if track_running_stats:
            self.running_mean = np.zeros(num_features)
            self.running_var = np.ones(num_features)
            self.num_batches_tracked = 0
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None
        self.grad_weight = self.grad_bias = None
        self._saved = None

    def train(self, mode=True):
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def __call__(self, x):
        use_batch = self.training or not self.track_running_stats
        if use_batch:
            momentum = 0.0
            if self.training and self.track_running_stats:
                self.num_batches_tracked += 1
                momentum = (1.0 / self.num_batches_tracked if self.momentum is None
                            else self.momentum)
            update = self.training and self.track_running_stats
            y, mean, invstd, rm, rv = forward_train(
                x, self.weight, self.bias,
                self.running_mean if update else None,
                self.running_var if update else None,
                self.axis, momentum, self.eps)
            if update:
                self.running_mean, self.running_var = rm, rv
        else:
            mean = self.running_mean.copy()
            invstd = invstd_of(self.running_var, self.eps)
            y = normalize(x, mean, invstd, self.weight, self.bias, self.axis)
        self._saved = (_f64(x), mean, invstd, use_batch)
        return y

    def backward(self, dy):
        x, mean, invstd, use_batch = self._saved
        dx, dw, db = backward(dy, x, mean, invstd, self.weight, self.axis, use_batch)
        if self.affine:
            self.grad_weight, self.grad_bias = dw, db
        return dx


# ---------------------------------------------------------------------------------------
# Test data and comparison helpers shared by the test modules (kept here, beside the
# reference, so that every test module can `import reference` under any import mode).
# ---------------------------------------------------------------------------------------

DTYPES = (np.float32, np.float64, np.float16)

# Relative tolerances: "out" for x-shaped outputs (y, dx), "stat" for per-channel results
# (mean, invstd, running stats, dweight, dbias). float16 outputs are rounded to float16
# (2^-11 relative); its statistics are float32.
TOL = {
    np.dtype(np.float64): {"out": 1e-12, "stat": 1e-12},
    np.dtype(np.float32): {"out": 1e-5, "stat": 1e-5},
    np.dtype(np.float16): {"out": 1e-3, "stat": 1e-5},
}


def param_dtype(dtype):
    """dtype of statistics, weight, bias and running buffers for x of `dtype`."""
    return np.dtype(np.float32) if np.dtype(dtype).itemsize < 4 else np.dtype(dtype)


def tol(dtype, kind):
    return TOL[np.dtype(dtype)][kind]


def assert_close(got, ref, rtol, what=""):
    """max|got - ref| <= rtol * max(1, max|ref|) (NaNs must match position for position)."""
    got = np.asarray(got)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{what}: shape {got.shape} != {ref.shape}"
    finite = ref[np.isfinite(ref)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(got.astype(np.float64), ref, rtol=0, atol=rtol * scale,
                               err_msg=what)


def numeric_grad(loss, arr, h=1e-6):
    """Central differences of loss() with respect to every element of arr (changed in
    place, restored)."""
    grad = np.zeros(arr.shape)
    for idx in np.ndindex(arr.shape):
        orig = arr[idx]
        arr[idx] = orig + h
        lp = loss()
        arr[idx] = orig - h
        lm = loss()
        arr[idx] = orig
        grad[idx] = (lp - lm) / (2 * h)
    return grad


def assert_bitwise(a, b, what=""):
    a, b = np.asarray(a), np.asarray(b)
    assert a.dtype == b.dtype and a.shape == b.shape, what
    assert a.tobytes() == b.tobytes(), f"{what}: not bitwise identical"


# Layouts: (shape, channel axis). 2-D to 5-D, axis=1, axis=-1 and other axes.
LAYOUTS = (
    ((7, 5), 1),
    ((7, 5), 0),
    ((4, 3, 7), 1),
    ((4, 3, 7), -1),
    ((4, 3, 7), -2),
    ((3, 4, 5, 6), 1),
    ((3, 4, 5, 6), -1),
    ((3, 4, 5, 6), 2),
    ((2, 3, 2, 3, 4), 1),
    ((2, 3, 2, 3, 4), -1),
    ((2, 3, 2, 3, 4), 3),
)

# How x sits in memory: C-contiguous, fully transposed (F-order), channels-last memory
# viewed channels-first (or channels-first viewed channels-last), strided every other
# element in each dimension, and negative strides.
VIEWS = ("contiguous", "transposed", "permuted", "sliced", "reversed")


def empty_view(shape, dtype, view, axis=1):
    """An uninitialised array of logical `shape` whose memory is laid out as `view`."""
    shape = tuple(shape)
    ndim = len(shape)
    if view == "contiguous":
        return np.empty(shape, dtype)
    if view == "transposed":
        return np.empty(shape[::-1], dtype).T
    if view == "permuted":
        ax = norm_axis(ndim, axis)
        rest = shape[:ax] + shape[ax + 1:]
        if ax == ndim - 1:  # channels-last logical: store channels first
            return np.moveaxis(np.empty((shape[ax],) + rest, dtype), 0, ax)
        return np.moveaxis(np.empty(rest + (shape[ax],), dtype), -1, ax)
    if view == "sliced":
        big = np.empty(tuple(2 * s + 1 for s in shape), dtype)
        return big[tuple(slice(1, 2 * s + 1, 2) for s in shape)]
    if view == "reversed":
        return np.empty(shape, dtype)[(slice(None, None, -1),) * ndim]
    raise ValueError(view)


def make_x(rng, shape, axis=1, dtype=np.float32, view="contiguous", loc=2.0, scale=2.0):
    """Random x with a different mean (|.| <= loc) and std (in [0.5, scale]) per channel."""
    ax = norm_axis(len(shape), axis)
    c = shape[ax]
    bshape = [1] * len(shape)
    bshape[ax] = c
    mu = rng.uniform(-loc, loc, c).reshape(bshape)
    sd = rng.uniform(0.5, scale, c).reshape(bshape)
    x = empty_view(shape, dtype, view, axis)
    x[...] = rng.standard_normal(shape) * sd + mu
    return x


def make_dy(rng, shape, dtype=np.float32, view="contiguous", axis=1):
    dy = empty_view(shape, dtype, view, axis)
    dy[...] = rng.standard_normal(shape)
    return dy


def make_params(rng, c, dtype):
    """weight, bias, running_mean, running_var of the parameter dtype for x of `dtype`."""
    p = param_dtype(dtype)
    weight = (rng.uniform(0.5, 1.5, c) * rng.choice([-1.0, 1.0], c)).astype(p)
    bias = rng.uniform(-1, 1, c).astype(p)
    running_mean = rng.uniform(-1, 1, c).astype(p)
    running_var = rng.uniform(0.5, 2.0, c).astype(p)
    return weight, bias, running_mean, running_var


@dataclass
class Case:
    """One layout x view x dtype test case with its arrays."""

    x: np.ndarray
    dy: np.ndarray
    axis: int
    dtype: np.dtype
    weight: np.ndarray
    bias: np.ndarray
    running_mean: np.ndarray
    running_var: np.ndarray

    @property
    def channels(self):
        return self.x.shape[norm_axis(self.x.ndim, self.axis)]

    @property
    def pdtype(self):
        return param_dtype(self.dtype)

    def tol(self, kind):
        return tol(self.dtype, kind)
