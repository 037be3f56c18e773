"""BatchRenorm against a float64 NumPy reference of Ioffe 2017's equations (Algorithm 1),
and equal to BatchNorm when r_max = 1 and d_max = 0."""

import numpy as np
import pytest

import bnorm
import reference as ref


class RefBatchRenorm:
    """Algorithm 1 of arXiv 1702.03275 in float64, with r and d constants in backward
    (stop_gradient), and bnorm's running statistics (mean and variance; sigma =
    sqrt(running_var + eps))."""

    def __init__(self, c, r_max, d_max, eps, momentum, axis):
        self.r_max, self.d_max, self.eps, self.momentum, self.axis = r_max, d_max, eps, momentum, axis
        self.weight, self.bias = np.ones(c), np.zeros(c)
        self.running_mean, self.running_var = np.zeros(c), np.ones(c)

    def __call__(self, x):
        x = x.astype(np.float64)
        m, mu_b, var_b = ref.batch_stats(x, self.axis)
        sigma_b = np.sqrt(var_b + self.eps)
        sigma = np.sqrt(self.running_var + self.eps)
        r = np.clip(sigma_b / sigma, 1 / self.r_max, self.r_max)
        d = np.clip((mu_b - self.running_mean) / sigma, -self.d_max, self.d_max)
        pc = lambda v: ref.per_channel(v, x, self.axis)  # noqa: E731
        xhat = (x - pc(mu_b)) / pc(sigma_b) * pc(r) + pc(d)
        y = pc(self.weight) * xhat + pc(self.bias)
        self.running_mean = self.running_mean + self.momentum * (mu_b - self.running_mean)
        self.running_var = self.running_var + self.momentum * (var_b * m / (m - 1) - self.running_var)
        self.saved = (x, m, mu_b, sigma_b, r, d, xhat)
        return y

    def backward(self, dy):
        """The paper's gradients with r, d constant: dL/dxhat_B = dy * weight * r."""
        x, m, mu_b, sigma_b, r, d, xhat = self.saved
        red = ref.reduce_axes(x, self.axis)
        pc = lambda v: ref.per_channel(v, x, self.axis)  # noqa: E731
        dy = dy.astype(np.float64)
        dxhat = dy * pc(self.weight)
        dxhat_b = dxhat * pc(r)  # xhat = xhat_B * r + d
        xhat_b = (x - pc(mu_b)) / pc(sigma_b)
        dsigma = -(dxhat_b * xhat_b).sum(axis=red) / sigma_b
        dmu = -dxhat_b.sum(axis=red) / sigma_b
        dx = dxhat_b / pc(sigma_b) + pc(dsigma) * xhat_b / m + pc(dmu) / m
        return dx, (dy * xhat).sum(axis=red), dy.sum(axis=red)


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("layout", [((16, 3), 1), ((4, 3, 6), 1), ((2, 3, 4, 5), -1)])
def test_against_paper(rng, dtype, layout):
    shape, axis = layout
    c = shape[axis]
    layer_dtype = np.float32 if dtype == np.float16 else dtype
    bn = bnorm.BatchRenorm(c, r_max=1.5, d_max=0.5, momentum=0.2, axis=axis, dtype=layer_dtype)
    want = RefBatchRenorm(c, 1.5, 0.5, 1e-5, 0.2, axis)
    w, b, _, _ = ref.make_params(rng, c, dtype)
    bn.weight[...], bn.bias[...] = w, b
    want.weight, want.bias = w.astype(np.float64), b.astype(np.float64)
    tol_out = {np.float64: 1e-12, np.float32: 2e-5, np.float16: 2e-3}[dtype]
    tol_stat = 1e-12 if dtype == np.float64 else 2e-5
    clipped = 0
    for step in range(4):  # the running statistics start far from the batch's: r and d clip
        x = ref.make_x(rng, shape, axis, dtype, loc=2.0, scale=3.0)
        dy = ref.make_dy(rng, shape, dtype)
        ref.assert_close(bn(x), want(x), tol_out, f"y, step {step}")
        clipped += int(np.sum(np.abs(want.saved[5]) == 0.5) + np.sum(np.isin(want.saved[4], (1.5, 1 / 1.5))))
        np.testing.assert_allclose(bn.r, want.saved[4], rtol=tol_stat)
        np.testing.assert_allclose(bn.d, want.saved[5], rtol=tol_stat, atol=tol_stat)
        dx, dw, db = want.backward(dy)
        ref.assert_close(bn.backward(dy), dx, tol_out * 5, f"dx, step {step}")
        ref.assert_close(bn.grad_weight, dw, tol_stat * 10, "grad_weight")
        ref.assert_close(bn.grad_bias, db, tol_stat * 10, "grad_bias")
        ref.assert_close(bn.running_mean, want.running_mean, tol_stat, "running_mean")
        ref.assert_close(bn.running_var, want.running_var, tol_stat, "running_var")
    assert clipped > 0  # the test covered clipping
    bn.eval()
    x = ref.make_x(rng, shape, axis, dtype)
    ref.assert_close(bn(x), ref.forward_infer(x, want.running_mean, want.running_var, w, b, axis), tol_out * 5)


def test_gradient_finite_differences_with_r_d_constant(rng):
    """With r and d held at the step's values, the loss is smooth in x: finite differences
    of the reference's forward with r, d frozen match bnorm's dx."""
    x = rng.standard_normal((5, 2, 3)) * 2 + 1
    dy = rng.standard_normal(x.shape)
    bn = bnorm.BatchRenorm(2, r_max=1.2, d_max=0.1, dtype=np.float64)
    bn.weight[...] = [1.3, -0.7]
    bn(x)
    dx = bn.backward(dy)
    r, d = bn.r, bn.d

    def loss():
        _, mu, var = ref.batch_stats(x, 1)
        xhat = (x - mu[None, :, None]) / np.sqrt(var[None, :, None] + 1e-5) * r[None, :, None] + d[None, :, None]
        return float(np.sum((bn.weight[None, :, None] * xhat) * dy))

    np.testing.assert_allclose(dx, ref.numeric_grad(loss, x), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_equals_batchnorm_without_correction(rng, dtype):
    bn = bnorm.BatchNorm(3, momentum=0.1, dtype=dtype)
    rn = bnorm.BatchRenorm(3, r_max=1.0, d_max=0.0, momentum=0.1, dtype=dtype)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    for _ in range(3):
        x = ref.make_x(rng, (8, 3, 5), 1, dtype)
        dy = ref.make_dy(rng, x.shape, dtype)
        ref.assert_close(rn(x), bn(x), tol)
        ref.assert_close(rn.backward(dy), bn.backward(dy), tol)
        ref.assert_close(rn.grad_weight, bn.grad_weight, tol)
        ref.assert_close(rn.running_var, bn.running_var, tol)
        np.testing.assert_array_equal(rn.r, 1.0)
        np.testing.assert_array_equal(rn.d, 0.0)
    rn.eval()
    bn.eval()
    x = ref.make_x(rng, (8, 3, 5), 1, dtype)
    ref.assert_close(rn(x), bn(x), tol)


def test_bounds_settable_between_steps(rng):
    rn = bnorm.BatchRenorm(3, r_max=1.0, d_max=0.0, dtype=np.float64)
    x = ref.make_x(rng, (8, 3), 1, np.float64, loc=3.0)
    rn(x)
    np.testing.assert_array_equal(rn.d, 0.0)
    rn.r_max, rn.d_max = 2.0, 1.0
    rn(x)
    assert np.all(np.abs(rn.d) <= 1.0) and np.any(rn.d != 0)
    assert np.all((rn.r >= 0.5) & (rn.r <= 2.0))


def test_state_dict_round_trip():
    rn = bnorm.BatchRenorm(3, r_max=2.0, d_max=1.5)
    rn(np.arange(12, dtype=np.float32).reshape(4, 3))
    state = rn.state_dict()
    assert set(state) == {"weight", "bias", "running_mean", "running_var", "num_batches_tracked", "r_max", "d_max"}
    other = bnorm.BatchRenorm(3)
    other.load_state_dict(state)
    assert other.r_max == 2.0 and other.d_max == 1.5 and other.num_batches_tracked == 1
    np.testing.assert_array_equal(other.running_var, rn.running_var)
    bad = dict(state, r_max=np.array(0.5))
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        other.load_state_dict(bad)
    assert other.r_max == 2.0
    with pytest.raises(KeyError, match="missing \\['d_max'\\]"):
        other.load_state_dict({k: v for k, v in state.items() if k != "d_max"})
    other.load_state_dict({k: v for k, v in state.items() if k != "d_max"}, strict=False)


def test_errors_and_eval_backward(rng):
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        bnorm.BatchRenorm(3, r_max=0.5)
    with pytest.raises(ValueError, match="d_max must be >= 0"):
        bnorm.BatchRenorm(3, d_max=-1)
    with pytest.raises(TypeError, match="r_max must be a real number"):
        bnorm.BatchRenorm(3, r_max="3")
    rn = bnorm.BatchRenorm(3)
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        rn(np.ones((1, 3), np.float32))
    assert rn.num_batches_tracked == 0
    x = ref.make_x(rng, (4, 3), 1, np.float32)
    rn.eval()
    y = rn(x)
    dx = rn.backward(np.ones_like(y))
    ref.assert_close(dx, np.ones_like(y) / np.sqrt(rn.running_var + 1e-5), 1e-6)
    assert "BatchRenorm(3, r_max=3.0, d_max=5.0" in repr(rn)
