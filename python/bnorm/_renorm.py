"""BatchRenorm: batch renormalization (Ioffe 2017, arXiv 1702.03275) on bnorm's split-phase
kernels.

Training normalizes with the batch statistics, then corrects toward the running ones:
    sigma_B = sqrt(var_B + eps),  sigma = sqrt(running_var + eps)
    r = clip(sigma_B / sigma, 1/r_max, r_max),  d = clip((mean_B - running_mean) / sigma, -d_max, d_max)
    y = weight * ((x - mean_B) / sigma_B * r + d) + bias
with r and d constants for the gradient. That is normalize(x, mean_B, r / sigma_B,
weight, bias + weight * d) after batch_stats: the two passes over memory of training
without fusion. Backward is BatchNorm's backward with the weight weight * r:
dweight = r * sum(dy * xhat_B) + d * sum(dy).
"""

from __future__ import annotations

import math

import numpy as np

from ._functional import _NumPy, _backend, _real, backward, batch_stats, normalize
from ._layer import BatchNorm

__all__ = ["BatchRenorm"]


class BatchRenorm(BatchNorm):
    """Batch renormalization (Ioffe 2017): BatchNorm whose training output is corrected
    toward the running statistics by r and d, so that training and inference normalize
    alike even with small or non-i.i.d. batches.

    Args:
        num_features, eps, momentum, axis, dtype, unbiased_running_var: as BatchNorm (the
            layer is affine and tracks running statistics). momentum=0.01 by default: r
            and d use the running statistics, which must move slowly (the paper's alpha).
        r_max: >= 1, the bound of r to [1/r_max, r_max]. r_max = 1 and d_max = 0 is
            BatchNorm.
        d_max: >= 0, the bound of d to [-d_max, d_max].

    ``r_max`` and ``d_max`` may be set between steps (the paper starts at 1 and 0 and
    raises them: that schedule is the caller's loop). In eval mode the running statistics
    are used, as in BatchNorm. The running statistics are updated as BatchNorm's (mean
    and variance; the paper's moving sigma is sqrt(running_var + eps) here).

    Attributes: BatchNorm's, plus ``r`` and ``d``, the last training step's corrections
    (float64 arrays of shape (C,), None before one).

    ``state_dict()`` has BatchNorm's keys plus ``r_max`` and ``d_max`` (0-d float64
    arrays), so a checkpoint resumes the warm-up schedule where it was.
    """

    def __init__(self, num_features, *, r_max=3.0, d_max=5.0, eps=1e-5, momentum=0.01, axis=1, dtype=np.float32,
                 unbiased_running_var=True):
        super().__init__(num_features, eps=eps, momentum=momentum, axis=axis, dtype=dtype,
                         unbiased_running_var=unbiased_running_var)
        self.r_max = r_max
        self.d_max = d_max
        self.r = None
        self.d = None
        self._renorm_saved = None  # (x, mean_B, invstd_B, r, d) of the last training call

    @property
    def r_max(self) -> float:
        return self._r_max

    @r_max.setter
    def r_max(self, value) -> None:
        value = _real(value, "r_max")
        if not (math.isfinite(value) and value >= 1):
            raise ValueError(f"bnorm: r_max must be >= 1 and finite, got {value!r}")
        self._r_max = value

    @property
    def d_max(self) -> float:
        return self._d_max

    @d_max.setter
    def d_max(self, value) -> None:
        value = _real(value, "d_max")
        if not (math.isfinite(value) and value >= 0):
            raise ValueError(f"bnorm: d_max must be >= 0 and finite, got {value!r}")
        self._d_max = value

    def __call__(self, x):
        """Training: batch renormalization, running statistics updated. Eval: as BatchNorm."""
        self._renorm_saved = None
        if not self.training:
            return super().__call__(x)
        self._saved = None  # (an earlier eval call's: backward is for this call, or none if it raises)
        if _backend(x, None) is not _NumPy:  # (before _input, which would move the vectors to x's device)
            raise TypeError(f"bnorm: BatchRenorm takes NumPy arrays, got {type(x).__module__}.{type(x).__name__}")
        x = self._input(x)
        if x.size == 0:  # nothing to learn from: as BatchNorm, no buffer changes
            return super().__call__(x)
        self._check_running_buffers(x)  # (sigma below: a negative running_var would make NaN r and d)
        x = np.ascontiguousarray(x)  # (read twice: convert once)
        count, mean_b, var_b = batch_stats(x, axis=self.axis)
        if count == 1:
            raise ValueError(f"expected more than 1 value per channel when training, got input of shape {x.shape}")
        p = self.param_dtype
        var64 = var_b.astype(np.float64)
        invstd64 = 1.0 / np.sqrt(var64 + self.eps)
        sigma = np.sqrt(self.running_var.astype(np.float64) + self.eps)
        r = np.clip(1.0 / (invstd64 * sigma), 1.0 / self.r_max, self.r_max)
        d = np.clip((mean_b.astype(np.float64) - self.running_mean) / sigma, -self.d_max, self.d_max)
        weight64 = self.weight.astype(np.float64)
        y = normalize(x, mean_b, (invstd64 * r).astype(p), self.weight, (self.bias + weight64 * d).astype(p),
                      axis=self.axis)
        # running statistics last, as BatchNorm (after everything that can raise)
        batches = self.num_batches_tracked + 1
        factor = 1.0 / batches if self.momentum is None else self.momentum
        unbias = count / (count - 1) if self.unbiased_running_var else 1.0
        self.running_mean[...] = (1 - factor) * self.running_mean.astype(np.float64) + factor * mean_b
        self.running_var[...] = (1 - factor) * self.running_var.astype(np.float64) + factor * var64 * unbias
        self.num_batches_tracked = batches
        self.r, self.d = r, d
        self._saved = None
        self._renorm_saved = (x, mean_b, invstd64.astype(p), r, d)
        return y

    forward = __call__

    def backward(self, dy):
        """dx of the last call; sets grad_weight and grad_bias. Training: r and d are
        constants (as in the paper), the gradient flows through the batch statistics."""
        if self._renorm_saved is None:
            return super().backward(dy)
        x, mean_b, invstd_b, r, d = self._renorm_saved
        scale = (self.weight.astype(np.float64) * r).astype(self.param_dtype)
        dx, sum_dy_xhat, sum_dy = backward(dy, x, mean_b, invstd_b, scale, axis=self.axis, batch_stats=True)
        self.grad_weight = (r * sum_dy_xhat + d * sum_dy).astype(self.param_dtype)
        self.grad_bias = sum_dy
        return dx

    def state_dict(self) -> dict:
        """BatchNorm's keys, plus r_max and d_max (0-d float64 arrays)."""
        state = super().state_dict()
        state["r_max"] = np.array(self.r_max)
        state["d_max"] = np.array(self.d_max)
        return state

    def load_state_dict(self, state, strict: bool = True) -> None:
        """As BatchNorm's, with r_max and d_max (checked like the constructor's)."""
        if not hasattr(state, "keys"):
            raise TypeError(f"bnorm: state must be a dict (as state_dict() returns), got {type(state).__name__}")
        state = dict(state)
        extras = {key: state.pop(key) for key in ("r_max", "d_max") if key in state}
        if strict:
            expected, keys = set(self.state_dict()), set(state) | set(extras)
            if keys != expected:
                missing, unexpected = sorted(expected - keys), sorted(keys - expected)
                raise KeyError(f"bnorm: state_dict mismatch: missing {missing}, unexpected {unexpected}")
        check = BatchRenorm.__new__(BatchRenorm)  # the setters' checks, before anything is loaded
        for key, value in extras.items():
            setattr(check, key, np.asarray(value)[()] if np.ndim(value) == 0 else value)
        super().load_state_dict(state, strict=False)
        for key in extras:
            setattr(self, key, getattr(check, key))

    def __repr__(self) -> str:
        return (f"BatchRenorm({self.num_features}, r_max={self.r_max}, d_max={self.d_max}, eps={self.eps}, "
                f"momentum={self.momentum}, axis={self.axis}, dtype={self.dtype.name}"
                + ("" if self.unbiased_running_var else ", unbiased_running_var=False") + ")")
