"""Ghost batch normalization (Hoffer et al. 2017, Keras' virtual_batch_size): each
consecutive group of v samples along axis 0 is normalized with its own statistics.

The BatchNorm layer calls these for virtual_batch_size=v. Each group is one forward_train
call on a view of x (so its output is bitwise that of a BatchNorm call on the group alone),
with throw-away running buffers at momentum 1 that return the group's mean and biased
variance from the same pass over memory. The layer's running statistics are then updated
once per call, from the groups' statistics merged with Chan's formula: the statistics of
the whole batch, exactly what BatchNorm without groups would have used.
"""

from __future__ import annotations

import numpy as np

from ._functional import _as_numpy, backward, forward_train, merge_stats

__all__ = ["check_groups", "forward", "merged_stats", "backward_groups"]


def check_groups(x: np.ndarray, v: int, axis: int) -> int:
    """The number of groups of x, or ValueError (channel axis 0, N not a multiple of v)."""
    if axis % x.ndim == 0:
        raise ValueError("bnorm: virtual_batch_size groups samples along axis 0, which is this layer's channel axis")
    n = x.shape[0]
    if n % v:
        raise ValueError(
            f"bnorm: virtual_batch_size={v} must divide the batch size (x.shape[0] = {n}, shape {x.shape})"
        )
    return n // v


def forward(x, v, weight, bias, *, axis, eps, residual=None, activation=None):
    """y of x normalized group by group (with the fused epilogue: activation(BN(x) +
    residual), each group on its slice of residual), and the groups' (means, invstds,
    vars), each of shape (groups, C), in the parameter dtype."""
    groups = check_groups(x, v, axis)
    x = np.ascontiguousarray(x)  # (each group is then a C-contiguous view)
    if residual is not None:
        residual = _as_numpy(residual, "residual")
        if residual.shape != x.shape:
            raise ValueError(f"bnorm: residual must have x's shape {x.shape}, got {residual.shape}")
    y = np.empty_like(x)
    channels = x.shape[axis]
    p = np.float32 if x.dtype.itemsize < 4 else x.dtype
    means, invstds, vars_ = (np.empty((groups, channels), p) for _ in range(3))
    for g in range(groups):
        part = slice(g * v, (g + 1) * v)
        mean, var = np.zeros(channels, p), np.zeros(channels, p)  # momentum 1: the batch values
        _, _, invstds[g] = forward_train(
            x[part], weight, bias, mean, var, axis=axis, momentum=1.0, eps=eps, out=y[part],
            unbiased_running_var=False, residual=None if residual is None else residual[part], activation=activation,
        )
        means[g], vars_[g] = mean, var
    return y, means, invstds, vars_


def merged_stats(x, axis, means, vars_):
    """(count, mean, biased var) of the whole batch x from its groups' statistics, in float64."""
    per_group = x.size // x.shape[axis] // means.shape[0]
    counts = np.full(means.shape[0], per_group, np.int64)
    return merge_stats(counts, means.astype(np.float64), vars_.astype(np.float64))


def backward_groups(dy, x, v, means, invstds, weight, *, axis, y=None):
    """(dx, dweight, dbias, dsum): each group's backward with its own batch statistics;
    dweight and dbias summed over the groups in order, in float64, rounded once. With y (the
    output of a forward with ReLU), each group's backward takes ReLU's mask from its slice of
    y and dsum = dy * (y > 0); without, dsum is dy."""
    dy = np.ascontiguousarray(dy)
    if dy.shape != x.shape:
        raise ValueError(f"bnorm: dy must have x's shape {x.shape}, got {dy.shape}")
    dx = np.empty_like(x)
    dsum = dy if y is None else np.empty_like(dy)
    dweight = np.zeros(means.shape[1])
    dbias = np.zeros(means.shape[1])
    for g in range(means.shape[0]):
        part = slice(g * v, (g + 1) * v)
        if y is None:
            _, dw, db = backward(dy[part], x[part], means[g], invstds[g], weight, axis=axis, out=dx[part])
        else:
            _, dw, db, dsum[part] = backward(dy[part], x[part], means[g], invstds[g], weight, axis=axis,
                                             activation="relu", y=y[part], out=dx[part])
        dweight += dw
        dbias += db
    return dx, dweight.astype(means.dtype), dbias.astype(means.dtype), dsum
