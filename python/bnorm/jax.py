"""bnorm inside JAX programs: a pure, differentiable batch norm that jitted code runs with
bnorm's kernels.

    import bnorm.jax as bj
    y, new_mean, new_var = bj.batch_norm(x, weight, bias, running_mean, running_var, training=True)

The kernels are XLA custom calls (jax.ffi): bnorm._core carries XLA FFI handlers
(python/bnorm/_jax_ffi.cpp) registered here as FFI targets, so a jitted program calls them
directly, with no Python or host callback in between. Gradients come from bnorm's own
backward kernel through jax.custom_vjp. CPU arrays; float32, float64 (with jax_enable_x64)
and float16.

Importing this module needs jax, and a bnorm built with the FFI handlers (built where jax
is installed in the build Python: docs/frameworks.md); ``import bnorm`` never imports jax.
"""

from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Optional, Tuple

try:
    import jax
    import jax.numpy as jnp
    from jax.custom_derivatives import SymbolicZero
except ImportError as e:  # the core package stays framework-free; this module is optional
    raise ImportError(
        "bnorm.jax needs JAX, which is not installed (pip install jax); bnorm's NumPy API works without it"
    ) from e

import numpy as np

from . import _core

__all__ = ["batch_norm"]

if not hasattr(_core, "jax_ffi_targets"):
    raise ImportError(
        "bnorm.jax needs bnorm built with its XLA FFI handlers, and this bnorm was built without them "
        "(BNORM_JAX_FFI=OFF, or no jax in the build Python): reinstall with jax installed, e.g. "
        "pip install jax && pip install --no-build-isolation bnorm (docs/frameworks.md)"
    )

for _name, _capsule in _core.jax_ffi_targets().items():
    jax.ffi.register_ffi_target(_name, _capsule, platform="cpu")

_DTYPES = ("float16", "float32", "float64")


def _param_dtype(dtype) -> np.dtype:
    return np.dtype("float32") if np.dtype(dtype) == np.float16 else np.dtype(dtype)


# ---- the custom calls -----------------------------------------------------------------
# vmap_method="sequential": a vmapped batch norm normalizes each mapped slice on its own.

def _forward_train(x, weight, bias, running_mean, running_var, axis, momentum, eps):
    vector = jax.ShapeDtypeStruct((x.shape[axis],), _param_dtype(x.dtype))
    call = jax.ffi.ffi_call(
        "bnorm_forward_train", (jax.ShapeDtypeStruct(x.shape, x.dtype),) + (vector,) * 4,
        vmap_method="sequential",
        # the running statistics are updated in place in the outputs' buffers: XLA copies
        # the inputs first where they are still needed
        input_output_aliases={3: 3, 4: 4})
    return call(x, weight, bias, running_mean, running_var,
                axis=np.int64(axis), momentum=np.float64(momentum), eps=np.float64(eps))


def _forward_infer(x, running_mean, running_var, weight, bias, axis, eps):
    call = jax.ffi.ffi_call("bnorm_forward_infer", jax.ShapeDtypeStruct(x.shape, x.dtype), vmap_method="sequential")
    return call(x, running_mean, running_var, weight, bias, axis=np.int64(axis), eps=np.float64(eps))


def _backward(dy, x, mean, invstd, weight, axis, batch_stats):
    vector = jax.ShapeDtypeStruct((x.shape[axis],), _param_dtype(x.dtype))
    call = jax.ffi.ffi_call(
        "bnorm_backward", (jax.ShapeDtypeStruct(x.shape, x.dtype), vector, vector), vmap_method="sequential")
    return call(dy, x, mean, invstd, weight, axis=np.int64(axis), batch_stats=bool(batch_stats))


# ---- differentiation ------------------------------------------------------------------
# Every input gets its exact gradient, the running statistics included (a loss may depend
# on them: through y in eval mode, through the returned updates in training), computed
# from the backward kernel's per-channel sums at the cost of per-channel arithmetic, plus
# one elementwise term on dx where the updates' cotangents are nonzero.

@partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _batch_norm(x, weight, bias, running_mean, running_var, training, axis, momentum, eps):
    return _batch_norm_fwd(x, weight, bias, running_mean, running_var, training, axis, momentum, eps)[0]


def _batch_norm_fwd(x, weight, bias, running_mean, running_var, training, axis, momentum, eps):
    x, weight, bias, running_mean, running_var = (
        getattr(a, "value", a) for a in (x, weight, bias, running_mean, running_var))  # (symbolic_zeros)
    if training:
        y, mean, invstd, new_mean, new_var = _forward_train(
            x, weight, bias, running_mean, running_var, axis, momentum, eps)
    else:
        y = _forward_infer(x, running_mean, running_var, weight, bias, axis, eps)
        mean, invstd = running_mean, jax.lax.rsqrt(running_var + jnp.asarray(eps, running_var.dtype))
        new_mean, new_var = running_mean, running_var
    return (y, new_mean, new_var), (x, weight, mean, invstd, running_mean, running_var)


def _batch_norm_bwd(training, axis, momentum, eps, residuals, cotangents):
    x, weight, mean, invstd, running_mean, running_var = residuals
    # (symbolic_zeros: a cotangent is a SymbolicZero where nothing downstream depends on
    # that output, the running statistics' in most losses; None here)
    dy, d_new_mean, d_new_var = (None if isinstance(c, SymbolicZero) else c for c in cotangents)
    dx, dweight, dbias = _backward(jnp.zeros_like(x) if dy is None else dy, x, mean, invstd, weight, axis, training)
    if not training:
        # y = (x - running_mean) * invstd * weight + bias, invstd = (running_var + eps)^-1/2,
        # and the returned statistics are the inputs: dbias = sum(dy), dweight = sum(dy * xhat)
        d_running_mean = -dbias * weight * invstd
        d_running_var = -0.5 * dweight * weight * invstd * invstd
        if d_new_mean is not None:
            d_running_mean = d_running_mean + d_new_mean
        if d_new_var is not None:
            d_running_var = d_running_var + d_new_var
        return dx, dweight, dbias, d_running_mean, d_running_var
    # new_mean = (1 - m) running_mean + m mean(x), new_var = (1 - m) running_var + m var(x)
    # with var unbiased: d new_mean / dx = m / M, d new_var / dx = m * 2 (x - mean) / (M - 1)
    # per channel; an elementwise pass over dx only for a cotangent that is not zero
    count = x.size // x.shape[axis]
    per_channel = [1] * x.ndim
    per_channel[axis] = x.shape[axis]
    extra = None
    if d_new_mean is not None:
        extra = ((momentum / count) * d_new_mean).reshape(per_channel)
    if d_new_var is not None:
        centred = x.astype(d_new_var.dtype) - mean.reshape(per_channel)
        term = ((2.0 * momentum / (count - 1)) * d_new_var).reshape(per_channel) * centred
        extra = term if extra is None else extra + term
    if extra is not None:
        dx = (dx.astype(extra.dtype) + extra).astype(x.dtype)
    zero = jnp.zeros_like(running_mean)
    return (dx, dweight, dbias, zero if d_new_mean is None else (1.0 - momentum) * d_new_mean,
            zero if d_new_var is None else (1.0 - momentum) * d_new_var)


_batch_norm.defvjp(_batch_norm_fwd, _batch_norm_bwd, symbolic_zeros=True)


# ---- the public function ----------------------------------------------------------------

def _vector(v, name, channels, dtype, default):
    if v is None:
        return jnp.full((channels,), default, dtype)
    v = jnp.asarray(v)
    if v.dtype != dtype:
        raise TypeError(f"bnorm: {name} must be {dtype.name} for this x, got {v.dtype.name}")
    if v.shape != (channels,):
        raise ValueError(f"bnorm: {name} must have shape ({channels},), got {tuple(v.shape)}")
    return v


def _real(value, name) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"bnorm: {name} must be a real number (static under jit), got {value!r}")
    return float(value)


def batch_norm(
    x, weight, bias, running_mean, running_var, *, training: bool, axis: int = 1, momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tuple[jax.Array, Optional[jax.Array], Optional[jax.Array]]:
    """Batch normalization of a JAX array with bnorm's kernels, pure and differentiable.

    Args:
        x: float16, float32 or float64 array, ndim >= 2, channel axis `axis`.
        weight, bias: per-channel scale and shift of shape (C,), or None (1 and 0).
            Parameter dtype: float32 for float16 x, else x's dtype.
        running_mean, running_var: per-channel running statistics, or None (both) when
            training without them. Never modified: the updated values are returned.
        training: (static) True normalizes with the batch statistics and returns the
            updated running statistics (running_var with the unbiased variance); False
            normalizes with running_mean and running_var, returned unchanged.
        axis, momentum, eps: static Python numbers, as in bnorm.forward_train.

    Returns:
        (y, new_running_mean, new_running_var); the running statistics are None when
        none were given. Gradients (jax.grad, jax.vjp) are exact for every input: x,
        weight and bias, and the running statistics (through y in eval mode, through the
        returned updates in training).
    """
    x = jnp.asarray(x)
    if x.dtype.name not in _DTYPES:
        raise TypeError(f"bnorm: x must be one of {', '.join(_DTYPES)}, got {x.dtype.name}")
    if x.ndim < 2:
        raise ValueError(f"bnorm: x must have at least 2 dimensions, got shape {tuple(x.shape)}")
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"bnorm: axis must be an integer, got {axis!r}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"bnorm: axis {axis} is out of range for x of shape {tuple(x.shape)}")
    axis = int(axis) % x.ndim
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"bnorm: training must be True or False (static under jit), got {training!r}")
    momentum, eps = _real(momentum, "momentum"), _real(eps, "eps")
    if not (0.0 < eps < math.inf):
        raise ValueError(f"bnorm: eps must be positive and finite, got {eps!r}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"bnorm: momentum must be in [0, 1], got {momentum!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("bnorm: pass running_mean and running_var both, or neither")
    tracked = running_mean is not None
    if not training and not tracked:
        raise ValueError("bnorm: running_mean and running_var are required when training=False")
    channels = x.shape[axis]
    if training and x.size // max(channels, 1) == 1 and channels > 0:
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of shape {tuple(x.shape)}")
    dtype = _param_dtype(x.dtype)
    weight = _vector(weight, "weight", channels, dtype, 1.0)
    bias = _vector(bias, "bias", channels, dtype, 0.0)
    running_mean = _vector(running_mean, "running_mean", channels, dtype, 0.0)
    running_var = _vector(running_var, "running_var", channels, dtype, 1.0)
    if x.size == 0:  # nothing to normalize; running statistics untouched (bnorm's rule)
        return x, (running_mean if tracked else None), (running_var if tracked else None)
    y, new_mean, new_var = _batch_norm(x, weight, bias, running_mean, running_var, bool(training), axis, momentum, eps)
    return y, (new_mean if tracked else None), (new_var if tracked else None)
