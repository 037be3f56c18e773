"""fold: an inference-mode batch normalization folded into the linear/conv layer before it."""

from __future__ import annotations

import math
import numbers
from typing import Optional, Tuple

import numpy as np

from . import _core
from ._functional import _NumPy, _as_numpy, _param_dtype, _real

__all__ = ["fold"]


def fold(
    weight, bias, running_mean, running_var, bn_weight=None, bn_bias=None, *, eps: float = 1e-5, axis: int = 0
) -> Tuple[np.ndarray, np.ndarray]:
    """Fold ``forward_infer`` after a linear or convolution layer into that layer's weights.

    Returns (weight2, bias2) such that layer(x; weight2, bias2) equals
    forward_infer(layer(x; weight, bias), running_mean, running_var, bn_weight, bn_bias,
    eps=eps) up to rounding: with scale = bn_weight / sqrt(running_var + eps) per output
    channel c, weight2 = weight * scale[c] and bias2 = (bias - running_mean) * scale + bn_bias.

    Args:
        weight: the layer's weight (float16, bfloat16, float32 or float64, ndim >= 1), with its
            output channels on ``axis``: 0 for a (out, in) linear weight and for OIHW
            convolutions (PyTorch), -1 for HWIO (TensorFlow/Keras, Flax).
        bias: the layer's bias of shape (C,) and weight's dtype, or None (0).
        running_mean, running_var: the batch norm's statistics, shape (C,), float32 for
            16-bit weight, else weight's dtype.
        bn_weight, bn_bias: the batch norm's affine parameters (None: 1 and 0), as the
            statistics.
        eps: the batch norm's eps, > 0.

    Computed in float64 and rounded once to weight's dtype (16-bit types via float32). New
    arrays are returned (bias2 even when bias is None); nothing passed is modified.
    NumPy (CPU) arrays; arrays of other frameworks are converted with np.asarray.

    Raises:
        TypeError: a wrong dtype. ValueError: a wrong shape, axis or eps, or a negative
        running_var.
    """
    weight = _as_numpy(weight, "weight")
    dtype = _NumPy.dtype_name(weight)
    if dtype not in _NumPy.dtypes:
        raise TypeError(f"bnorm: weight must be one of {', '.join(_NumPy.dtypes)}, got {dtype}")
    if weight.ndim < 1:
        raise ValueError("bnorm: weight must have at least 1 dimension, got a 0-d array")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"bnorm: axis must be an integer, got {axis!r}")
    if not -weight.ndim <= axis < weight.ndim:
        raise ValueError(f"bnorm: axis {axis} is out of range for weight of shape {weight.shape}")
    axis = int(axis) % weight.ndim
    channels = weight.shape[axis]
    shape = (math.prod(weight.shape[:axis]), channels, math.prod(weight.shape[axis + 1 :]))
    param = _param_dtype(dtype)

    def vector(a, name, dtype_name, required=True):
        if a is None:
            if required:
                raise ValueError(f"bnorm: {name} is required")
            return None
        a = _as_numpy(a, name)
        if _NumPy.dtype_name(a) != dtype_name:
            raise TypeError(f"bnorm: {name} must be {dtype_name} for {dtype} weight, got {_NumPy.dtype_name(a)}")
        if a.shape != (channels,):
            raise ValueError(
                f"bnorm: {name} must have shape ({channels},) (weight's axis {axis}), got {a.shape}"
            )
        return _NumPy.export(np.ascontiguousarray(a))

    bias = vector(bias, "bias", dtype, required=False)
    running_mean = vector(running_mean, "running_mean", param)
    running_var = vector(running_var, "running_var", param)
    bn_weight = vector(bn_weight, "bn_weight", param, required=False)
    bn_bias = vector(bn_bias, "bn_bias", param, required=False)
    eps = _real(eps, "eps")
    weight2 = _NumPy.empty(weight.shape, dtype)
    bias2 = _NumPy.empty((channels,), dtype)
    _core.fold(
        _NumPy.export(np.ascontiguousarray(weight)), bias, shape, running_mean, running_var, bn_weight, bn_bias,
        eps, weight2, bias2,
    )
    return _NumPy.wrap(weight2), _NumPy.wrap(bias2)
