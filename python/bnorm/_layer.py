"""BatchNorm: a batch-normalization layer for NumPy pipelines, with PyTorch's semantics."""

from __future__ import annotations

import math
import numbers

import numpy as np

from . import _ghost
from ._functional import _DTYPE_NAMES, _NumPy, _as_numpy, _backend, _bfloat16, _flag, _is_bfloat16, _param_dtype, _real, backward, forward_infer, forward_train
from ._functional import _check_running_var, _relu

__all__ = ["BatchNorm"]

_DTYPES = ("float16", "bfloat16", "float32", "float64")
_VECTOR_NAMES = ("weight", "bias", "running_mean", "running_var")  # the per-channel arrays a layer holds


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
        dtype: float16, bfloat16 (ml_dtypes.bfloat16, or the string "bfloat16" with
            ml_dtypes installed), float32 or float64. Parameters and running statistics
            are float32 for 16-bit dtypes, else this dtype; x may have any dtype with
            those parameters (float16, bfloat16 or float32 x for a 16-bit or float32 layer).
        unbiased_running_var: False updates running_var with the biased batch variance
            (Keras 3, Flax, ONNX); True (default) with the unbiased one (PyTorch).
        virtual_batch_size: None, or v > 0 for ghost batch normalization: wherever batch
            statistics are used, each consecutive group of v samples along axis 0 is
            normalized with its own statistics (x.shape[0] must be a multiple of v, and
            the channel axis must not be 0). The running statistics are updated once per
            call with the statistics of the whole batch (the groups' merged with Chan's
            formula): what eval mode will see is the population of all groups, as without
            groups. (Keras averages the groups' means and variances instead, which leaves
            out the spread between the groups' means.)
        activation: None or "relu": the layer computes activation(BN(x) + residual) in
            one pass (fused epilogue; ``bn(x, residual=z)`` adds z, of x's shape and dtype).
            With ReLU the layer keeps a reference to its output for backward's mask: do not
            modify the output in place before ``backward``.

    Attributes:
        weight, bias: the affine parameters (None when affine is False).
        running_mean, running_var: running statistics (None when not tracked).
        num_batches_tracked: training batches seen (None when not tracked).
        training: True after ``train()``, False after ``eval()``.
        grad_weight, grad_bias: gradients set by ``backward`` (None when not affine).
    """

    def __init__(self, num_features, *, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, axis=1,
                 dtype=np.float32, unbiased_running_var=True, virtual_batch_size=None, activation=None):
        if isinstance(num_features, bool) or not isinstance(num_features, numbers.Integral):
            raise TypeError(f"bnorm: num_features must be an integer, got {num_features!r}")
        if num_features <= 0:
            raise ValueError(f"bnorm: num_features must be positive, got {num_features}")
        if not (np.isfinite(_real(eps, "eps")) and eps > 0):
            raise ValueError(f"bnorm: eps must be positive and finite, got {eps!r}")
        if momentum is not None and not 0 <= _real(momentum, "momentum") <= 1:
            raise ValueError(f"bnorm: momentum must be in [0, 1] or None, got {momentum!r}")
        dtype = np.dtype(np.float32 if dtype is None else _bfloat16() if dtype == "bfloat16" else dtype)  # None: the default, as in PyTorch
        if dtype not in _DTYPE_NAMES and not _is_bfloat16(dtype):  # native float16, float32, float64, bfloat16 only
            got = dtype.name if dtype.isnative else f"{dtype.name} of non-native byte order ({dtype.str})"
            raise TypeError(f"bnorm: dtype must be one of {', '.join(_DTYPES)}, got {got}")
        if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
            raise TypeError(f"bnorm: axis must be an integer, got {axis!r}")
        if virtual_batch_size is not None:
            if isinstance(virtual_batch_size, bool) or not isinstance(virtual_batch_size, numbers.Integral):
                raise TypeError(f"bnorm: virtual_batch_size must be an integer or None, got {virtual_batch_size!r}")
            if virtual_batch_size <= 0:
                raise ValueError(f"bnorm: virtual_batch_size must be positive, got {virtual_batch_size}")
        self.unbiased_running_var = _flag(unbiased_running_var, "unbiased_running_var")
        self.virtual_batch_size = None if virtual_batch_size is None else int(virtual_batch_size)
        _relu(activation)  # ValueError unless None or "relu"
        self.activation = activation
        self.num_features = int(num_features)
        self.eps = float(eps)
        self.momentum = None if momentum is None else float(momentum)
        self.affine = bool(affine)
        self.track_running_stats = bool(track_running_stats)
        self.axis = int(axis)
        self.dtype = dtype
        self.param_dtype = np.dtype(_param_dtype(_DTYPE_NAMES.get(dtype, "bfloat16")))
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
        self._saved_groups = None  # (x, means, invstds) of the last ghost call, for backward
        self._fused = (None, False)  # (y for ReLU's mask or None, whether it had a residual)

    def train(self, mode: bool = True) -> "BatchNorm":
        """Training mode (batch statistics, running statistics updated); returns self."""
        self.training = bool(mode)
        return self

    def eval(self) -> "BatchNorm":
        """Evaluation mode (running statistics, when tracked); returns self."""
        return self.train(False)

    def __call__(self, x, residual=None):
        """Normalize x: batch statistics when training or not tracking running
        statistics, else the running ones; then add residual (None, or an array of x's
        shape and dtype) and apply the layer's activation, fused. Remembers x for
        ``backward``."""
        # A call that raises leaves the parameters and running statistics where they were
        # (the very arrays: a move to x's device is undone; their values are only written by
        # a call that succeeds). (try/except here, not a context manager: 1 us less a call)
        kept = tuple(getattr(self, name) for name in _VECTOR_NAMES)
        try:
            return self._call(x, residual)
        except BaseException:
            for name, a in zip(_VECTOR_NAMES, kept):
                setattr(self, name, a)
            self._saved = self._saved_groups = None  # backward has no call to differentiate
            raise

    forward = __call__

    def _call(self, x, residual):
        x = self._input(x)
        self._saved_groups = None
        fused = {"residual": residual, "activation": self.activation}
        if self.virtual_batch_size is not None and (self.training or not self.track_running_stats):
            return self._ghost_call(x, **fused)
        if self.training or not self.track_running_stats:
            update = self.training and self.track_running_stats
            batches = self.num_batches_tracked + 1 if update else None
            factor = 0.0
            if update:
                factor = 1.0 / batches if self.momentum is None else self.momentum
            y, mean, invstd = forward_train(
                x, self.weight, self.bias,
                self.running_mean if update else None, self.running_var if update else None,
                axis=self.axis, momentum=factor, eps=self.eps, unbiased_running_var=self.unbiased_running_var,
                **fused,
            )
            if update and math.prod(x.shape) > 0:
                self.num_batches_tracked = batches
            self._saved = (x, mean, invstd, True)
        else:
            y = forward_infer(x, self.running_mean, self.running_var, self.weight, self.bias, axis=self.axis,
                              eps=self.eps, **fused)
            xp = _backend(self.running_var, None)  # (NumPy, or x's framework after a call on a GPU)
            self._saved = (x, xp.clone(self.running_mean), xp.invstd(self.running_var, self.eps), False)
        self._fused = (y if self.activation == "relu" else None, residual is not None)
        return y

    def _ghost_call(self, x, residual, activation):
        """Ghost batch normalization (virtual_batch_size): groups normalized one by one (each
        with the fused epilogue on its slice of the residual), then the running statistics
        updated once from the whole batch's merged statistics."""
        _ghost.check_groups(x, self.virtual_batch_size, self.axis)
        if x.size == 0:  # nothing to learn from: as BatchNorm, no buffer changes
            y, mean, invstd = forward_train(x, self.weight, self.bias, axis=self.axis, eps=self.eps,
                                            residual=residual, activation=activation)
            self._saved = (x, mean, invstd, True)
            self._fused = (y if activation == "relu" else None, residual is not None)
            return y
        if self.training and self.track_running_stats:
            self._check_running_buffers(x)
        y, means, invstds, vars_ = _ghost.forward(x, self.virtual_batch_size, self.weight, self.bias,
                                                  axis=self.axis, eps=self.eps, residual=residual,
                                                  activation=activation)
        self._fused = (y if activation == "relu" else None, residual is not None)
        if self.training and self.track_running_stats:
            count, mean, var = _ghost.merged_stats(x, self.axis, means, vars_)
            batches = self.num_batches_tracked + 1
            factor = 1.0 / batches if self.momentum is None else self.momentum
            unbias = count / (count - 1) if self.unbiased_running_var else 1.0
            new_mean = (1 - factor) * self.running_mean.astype(np.float64) + factor * mean
            new_var = (1 - factor) * self.running_var.astype(np.float64) + factor * var * unbias
            self.running_mean[...] = new_mean
            self.running_var[...] = new_var
            self.num_batches_tracked = batches
        self._saved = None
        self._saved_groups = (np.ascontiguousarray(x), means, invstds)
        return y

    def _check_running_buffers(self, x) -> None:
        """forward_train's checks of the running buffers (dtype, shape, writeable,
        contiguous, not overlapping, no negative variance), for the paths that update them
        in Python (ghost batch norm, BatchRenorm, SyncBatchNorm), before anything is computed: a call that
        raises changes nothing. Made by forward_train itself, on none of x's samples (an
        empty x checks its arguments and updates no buffer)."""
        first = next(i for i in range(x.ndim) if i != self.axis % x.ndim)
        none = x[(slice(None),) * first + (slice(0, 0),)]
        forward_train(none, self.weight, self.bias, self.running_mean, self.running_var, axis=self.axis,
                      momentum=0.0, eps=self.eps)

    def _input(self, x):
        """x as a NumPy array (CPU arrays of other frameworks and lists converted, a float
        list to float64; CUDA arrays pass as they are), checked against the layer's channel
        count and, where the layer has parameters or buffers, their dtype, before anything is
        computed or updated. Then the layer's vectors follow x (see _follow)."""
        xp = _backend(x, None)
        if xp is _NumPy:
            if type(x) is not np.ndarray:
                x = _as_numpy(x, "x")
            name = _DTYPE_NAMES.get(x.dtype)  # (None: not a native float dtype, for the functions to refuse)
            self._check_dtype(name if name is not None or not _is_bfloat16(x.dtype) else "bfloat16")
        else:
            name = xp.dtype_name(x)
            self._check_dtype(name if name in _DTYPES else None)
        self._check_shape(tuple(int(n) for n in x.shape))
        if xp is not _NumPy:
            if self.virtual_batch_size is not None and (self.training or not self.track_running_stats):
                raise TypeError(f"bnorm: virtual_batch_size takes NumPy arrays, got {type(x).__module__}.{type(x).__name__}")
            if not hasattr(xp, "from_host") and any(v is not None for v in self._vectors().values()):
                raise TypeError(
                    f"bnorm: {type(self).__name__} updates its running statistics in place and keeps its parameters "
                    f"in arrays of x's framework, but JAX arrays are immutable: use bnorm.jax.batch_norm, or a layer "
                    f"with affine=False and track_running_stats=False")
        self._follow(xp)
        return x

    def _vectors(self) -> dict:
        return {name: getattr(self, name) for name in _VECTOR_NAMES}

    def _follow(self, xp) -> None:
        """Moves the parameters and running statistics to where x is (namespace xp): NumPy
        arrays for a NumPy x, arrays of x's framework on x's device for a CUDA x, as
        ``module.to(device)`` would in PyTorch. A copy of C values per vector, made only when
        x's placement differs from the vectors' (so once, for a layer used on one device)."""
        moved = {}
        for name in _VECTOR_NAMES:
            a = getattr(self, name)
            if a is None or xp.owns(a):
                continue
            where = _backend(a, None, name)
            if where is _NumPy:  # a CPU array of another framework, or a list, that the user assigned
                if xp is _NumPy:
                    continue  # (the functions take or refuse it as they always did)
                host = _as_numpy(a, name)
            else:
                host = where.to_host(a)
            moved[name] = host if xp is _NumPy else xp.from_host(np.ascontiguousarray(host))
        for name, a in moved.items():  # (all copies made first: a failing one moves nothing)
            setattr(self, name, a)

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

    def _check_dtype(self, name) -> None:
        """TypeError for a float x (dtype name: float16, bfloat16, float32 or float64; None
        for any other) whose parameter dtype is not this layer's (where the layer has
        parameters or buffers); other dtypes are left to the functions' checks."""
        if name is None or not (self.affine or self.track_running_stats):
            return
        if _param_dtype(name) != _DTYPE_NAMES[self.param_dtype]:
            param = _DTYPE_NAMES[self.param_dtype]
            takes = "float16, bfloat16 or float32" if param == "float32" else param
            raise TypeError(f"bnorm: this layer's parameters are {param}, which takes x of dtype {takes}, got {name}")

    def backward(self, dy):
        """Gradient of the loss with respect to the last call's input, given dy (shaped like
        its output). Sets grad_weight and grad_bias (when affine); returns dx, or
        (dx, dresidual) when the last call had a residual (dresidual = dy * (y > 0) with
        ReLU, computed in the pass that computes dx; dy itself without an activation)."""
        if self._saved_groups is not None:
            x, means, invstds = self._saved_groups
            dx, dweight, dbias, dsum = _ghost.backward_groups(dy, x, self.virtual_batch_size, means, invstds,
                                                              self.weight, axis=self.axis, y=self._fused[0])
            if self.affine:
                self.grad_weight, self.grad_bias = dweight, dbias
            return (dx, dsum) if self._fused[1] else dx
        if self._saved is None:
            raise RuntimeError("bnorm: BatchNorm.backward called before a successful forward call")
        x, mean, invstd, batch_stats = self._saved
        dx, dweight, dbias, dsum = self._backward(dy, x, mean, invstd, batch_stats)
        if self.affine:
            self.grad_weight, self.grad_bias = dweight, dbias
        return (dx, dsum) if self._fused[1] else dx

    def _backward(self, dy, x, mean, invstd, batch_stats):
        """(dx, dweight, dbias, dsum) of the last call, dsum being dy without an activation."""
        mask = self._fused[0]
        if mask is not None:
            return backward(dy, x, mean, invstd, self.weight, axis=self.axis, batch_stats=batch_stats,
                            activation="relu", y=mask)
        return (*backward(dy, x, mean, invstd, self.weight, axis=self.axis, batch_stats=batch_stats), dy)

    def state_dict(self) -> dict:
        """Copies of the parameters and buffers, under PyTorch's keys, where they are
        (arrays of x's framework on its device after a call on CUDA arrays);
        num_batches_tracked is a NumPy int64 scalar."""
        state = {}
        for name, a in self._vectors().items():
            if a is not None:
                state[name] = _backend(a, None).clone(a)
        if self.track_running_stats:
            state["num_batches_tracked"] = np.array(self.num_batches_tracked, dtype=np.int64)
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """Load parameters and buffers from a dict with PyTorch's keys (values: NumPy or
        CUDA arrays, or anything np.asarray takes, such as CPU torch tensors), copied into
        the layer's vectors wherever they are (NumPy, or a GPU after a call on CUDA arrays).
        With strict, missing or unexpected keys raise KeyError. Nothing is changed when it
        raises."""
        if not hasattr(state, "keys"):
            raise TypeError(f"bnorm: state must be a dict (as state_dict() returns), got {type(state).__name__}")
        expected = {name for name, a in self._vectors().items() if a is not None}
        if self.track_running_stats:
            expected.add("num_batches_tracked")
        keys = set(state)
        if strict and keys != expected:
            missing, unexpected = sorted(expected - keys), sorted(keys - expected)
            raise KeyError(f"bnorm: state_dict mismatch: missing {missing}, unexpected {unexpected}")
        values = {}
        for key in expected & keys:
            value = state[key]
            where = _backend(value, None, key)
            if where is not _NumPy:  # a CUDA array (a state_dict of this layer on a GPU)
                value = where.to_host(value)
            if key == "num_batches_tracked":
                values[key] = _batches_tracked(value)
                continue
            value = _as_numpy(value, key)
            if value.shape != (self.num_features,):
                raise ValueError(f"bnorm: {key} must have shape ({self.num_features},), got {value.shape}")
            if not np.can_cast(value.dtype, self.param_dtype, casting="same_kind"):
                raise TypeError(f"bnorm: {key} must be {self.param_dtype}, got {value.dtype}")
            if key == "running_var":
                _check_running_var(value)
            values[key] = value
        for key in values.keys() - {"num_batches_tracked"}:  # every destination before any write
            dst = getattr(self, key)
            if isinstance(dst, np.ndarray) and not dst.flags.writeable:
                raise ValueError(f"bnorm: the layer's {key} is read-only (load_state_dict copies into it)")
            if isinstance(dst, np.ndarray) and dst.shape != (self.num_features,):
                raise ValueError(f"bnorm: the layer's {key} has shape {dst.shape}, not ({self.num_features},)")
        for key, value in values.items():
            if key == "num_batches_tracked":
                self.num_batches_tracked = value
                continue
            dst = getattr(self, key)
            xp = _backend(dst, None, key)
            if isinstance(dst, np.ndarray):
                np.copyto(dst, value, casting="same_kind")
            elif xp is not _NumPy:  # the layer's vectors are on a GPU: in place there
                xp.copy_into(dst, xp.from_host(np.ascontiguousarray(value, dtype=self.param_dtype)))
            else:  # a CPU array of another framework that the user assigned: replaced by a NumPy copy
                setattr(self, key, np.array(value, dtype=self.param_dtype))

    def __repr__(self) -> str:
        return (f"BatchNorm({self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"track_running_stats={self.track_running_stats}, axis={self.axis}, dtype={self.dtype.name}"
                + ("" if self.unbiased_running_var else ", unbiased_running_var=False")
                + ("" if self.virtual_batch_size is None else f", virtual_batch_size={self.virtual_batch_size}")
                + f"{_activation_repr(self.activation)})")


def _batches_tracked(value) -> int:
    """A state dict's num_batches_tracked: an integer scalar in [0, 2**63) (a Python or
    NumPy integer, or a 0-d integer array of any CPU framework), else ValueError (TypeError
    for what converts to no array of numbers)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        valid = 0 <= value < 2**63  # (not through NumPy: a huge int would be an object array)
    else:
        value = _as_numpy(value, "num_batches_tracked")
        valid = value.shape == () and value.dtype.kind in "iu" and 0 <= int(value) < 2**63
    if not valid:
        raise ValueError(f"bnorm: num_batches_tracked must be an integer scalar in [0, 2**63), got {value!r}")
    return int(value)


def _activation_repr(activation) -> str:
    """The activation= part of a layer's repr (none for no activation, as before it existed)."""
    return "" if activation is None else f", activation={activation!r}"
