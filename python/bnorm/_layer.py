"""BatchNorm: a batch-normalization layer for NumPy pipelines, with PyTorch's semantics."""

from __future__ import annotations

import math
import numbers

import numpy as np

from ._functional import _DTYPE_NAMES, _NumPy, _as_numpy, _backend, _param_dtype, _real, backward, forward_infer, forward_train

__all__ = ["BatchNorm"]

_DTYPES = ("float16", "float32", "float64")


class BatchNorm:
    """Batch normalization over the channel axis ``axis`` of inputs with ndim >= 2.

    Like ``torch.nn.BatchNorm1d/2d/3d`` (all of them: any ndim >= 2), on NumPy arrays.

    Args:
        num_features: C, the number of channels (x.shape[axis]).
        eps: added to the variance, > 0.
        momentum: factor of the running averages, in [0, 1]; None means a cumulative
            moving average (factor 1 / num_batches_tracked).
        affine: learn a per-channel weight (initialized to 1) and bias (0).
        track_running_stats: keep running_mean / running_var (initialized to 0 / 1)
            and use them in eval mode; when False, batch statistics are always used.
        axis: the channel axis.
        dtype: float16, float32 or float64. Parameters and running statistics are
            float32 for float16, else this dtype; x may have any dtype with those
            parameters (float16 or float32 x for a float16 or float32 layer).

    Attributes:
        weight, bias: the affine parameters (None when affine is False).
        running_mean, running_var: running statistics (None when not tracked).
        num_batches_tracked: training batches seen (None when not tracked).
        training: True after ``train()``, False after ``eval()``.
        grad_weight, grad_bias: gradients set by ``backward`` (None when not affine).
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, axis=1,
                 dtype=np.float32):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"bnorm: num_features must be an integer, got {num_features!r}")
        if num_features <= 0:
            raise ValueError(f"bnorm: num_features must be positive, got {num_features}")
        if not (np.isfinite(_real(eps, "eps")) and eps > 0):
            raise ValueError(f"bnorm: eps must be positive and finite, got {eps!r}")
        if momentum is not None and not 0 <= _real(momentum, "momentum") <= 1:
            raise ValueError(f"bnorm: momentum must be in [0, 1] or None, got {momentum!r}")
        dtype = np.dtype(np.float32 if dtype is None else dtype)  # None: the default, as in PyTorch
        if dtype not in _DTYPE_NAMES:  # native float16, float32, float64 only
            got = dtype.name if dtype.isnative else f"{dtype.name} of non-native byte order ({dtype.str})"
            raise TypeError(f"bnorm: dtype must be one of {', '.join(_DTYPES)}, got {got}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"bnorm: axis must be an integer, got {axis!r}")
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        self.param_dtype = np.dtype(_param_dtype(_DTYPE_NAMES[dtype]))
        c, p = self.num_features, self.param_dtype
        self.weight = np.ones(c, p) if self.affine else None
        self.bias = np.zeros(c, p) if self.affine else None
        self.running_mean = np.zeros(c, p) if self.track_running_stats else None
        self.running_var = np.ones(c, p) if self.track_running_stats else None
        self.num_batches_tracked = 0 if self.track_running_stats else None
        self.training = True
        self.grad_weight = None
        self.grad_bias = None
        self._saved = None  # (x, mean, invstd, batch_stats) of the last call, for backward

    def train(self, mode: bool = True) -> "BatchNorm":
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Evaluation mode (running statistics, when tracked); returns self."""
        return self.train(False)

    def __call__(self, x):
        """Normalize x: batch statistics when training or not tracking running
        statistics, else the running ones. Remembers x for ``backward``."""
        x = self._input(x)
        if self.training or not self.track_running_stats:
            update = self.training and self.track_running_stats
            batches = self.num_batches_tracked + 1 if update else None
            factor = 0.0
            if update:
                factor = 1.0 / batches if self.momentum is None else self.momentum
            y, mean, invstd = forward_train(
                x, self.weight, self.bias,
                self.running_mean if update else None, self.running_var if update else None,
                axis=self.axis, momentum=factor, eps=self.eps,
            )
            if update and math.prod(x.shape) > 0:
                self.num_batches_tracked = batches
            self._saved = (x, mean, invstd, True)
        else:
            y = forward_infer(x, self.running_mean, self.running_var, self.weight, self.bias, axis=self.axis,
                              eps=self.eps)
            invstd = (1.0 / np.sqrt(self.running_var.astype(np.float64) + self.eps)).astype(self.param_dtype)
            self._saved = (x, self.running_mean.copy(), invstd, False)
        return y

    forward = __call__

    def _input(self, x):
        """x as a NumPy array (CPU arrays of other frameworks and lists converted, a float
        list to float64; CUDA arrays pass as they are), checked against the layer's channel
        count and, where the layer has parameters or buffers, their dtype, before anything is
        computed or updated."""
        if _backend(x, None) is _NumPy:
            if type(x) is not np.ndarray:
                x = _as_numpy(x, "x")
            self._check_dtype(x.dtype)
        self._check_shape(tuple(int(n) for n in x.shape))
        return x

    def _check_shape(self, shape: tuple) -> None:
        """ValueError unless x of this shape has num_features channels on the layer's axis
        (checked here even without parameters: the layer is for num_features channels)."""
        ndim = len(shape)
        if ndim < 2:
            raise ValueError(f"bnorm: x must have at least 2 dimensions, got shape {shape}")
        if not -ndim <= self.axis < ndim:
            raise ValueError(f"bnorm: axis {self.axis} is out of range for x of shape {shape}")
        channels = shape[self.axis % ndim]
        if channels != self.num_features:
            raise ValueError(
                f"bnorm: x has {channels} channels (axis {self.axis}, shape {shape}), "
                f"expected num_features={self.num_features}"
            )

    def _check_dtype(self, dtype: np.dtype) -> None:
        """TypeError for a float x whose parameter dtype is not this layer's (where the
        layer has parameters or buffers); other dtypes are left to the functions' checks."""
        name = _DTYPE_NAMES.get(dtype)  # (None: not a native float dtype, for the functions to refuse)
        if name is None or not (self.affine or self.track_running_stats):
            return
        if _param_dtype(name) != _DTYPE_NAMES[self.param_dtype]:
            param = _DTYPE_NAMES[self.param_dtype]
            takes = "float16 or float32" if param == "float32" else param
            raise TypeError(f"bnorm: this layer's parameters are {param}, which takes x of dtype {takes}, got {name}")

    def backward(self, dy):
        """Gradient of the loss with respect to the last call's input, given dy (shaped like
        its output). Sets grad_weight and grad_bias (when affine); returns dx."""
        if self._saved is None:
            raise RuntimeError("bnorm: BatchNorm.backward called before a forward call")
        x, mean, invstd, batch_stats = self._saved
        dx, dweight, dbias = backward(dy, x, mean, invstd, self.weight, axis=self.axis, batch_stats=batch_stats)
        if self.affine:
            self.grad_weight, self.grad_bias = dweight, dbias
        return dx

    def state_dict(self) -> dict:
        """Copies of the parameters and buffers, under PyTorch's keys."""
        state = {}
        if self.affine:
            state["weight"] = self.weight.copy()
            state["bias"] = self.bias.copy()
        if self.track_running_stats:
            state["running_mean"] = self.running_mean.copy()
            state["running_var"] = self.running_var.copy()
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Load parameters and buffers from a dict with PyTorch's keys (values: arrays, or
        anything np.asarray takes, such as CPU torch tensors). With strict, missing or
        unexpected keys raise KeyError. Nothing is changed when it raises."""
        if not hasattr(state, "keys"):
            raise TypeError(f"bnorm: state must be a dict (as state_dict() returns), got {type(state).__name__}")
        expected = set(self.state_dict())
        keys = set(state)
        if strict and keys != expected:
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            raise KeyError(f"bnorm: state_dict mismatch: missing {missing}, unexpected {unexpected}")
        values = {}
        for key in expected & keys:
            value = _as_numpy(state[key], key)
            if key == "num_batches_tracked":
                if value.shape != () or value.dtype.kind not in "iu" or not 0 <= int(value) < 2**63:
                    raise ValueError(f"bnorm: num_batches_tracked must be an integer scalar in [0, 2**63), got {value!r}")
                values[key] = int(value)
                continue
            if value.shape != (self.num_features,):
                raise ValueError(f"bnorm: {key} must have shape ({self.num_features},), got {value.shape}")
            if not np.can_cast(value.dtype, self.param_dtype, casting="same_kind"):
                raise TypeError(f"bnorm: {key} must be {self.param_dtype}, got {value.dtype}")
            if key == "running_var" and (value < 0).any():  # (NaN passes, as in forward_infer)
                channel = int(np.argmax(value < 0))
                raise ValueError(f"bnorm: running_var must be >= 0, got {value[channel]} for channel {channel}")
            values[key] = value
        for key, value in values.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
            else:
                np.copyto(getattr(self, key), value, casting="same_kind")

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype={self.dtype.name})")
