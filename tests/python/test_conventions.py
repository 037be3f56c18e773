"""unbiased_running_var=False (Keras 3, Flax, ONNX) on forward_train, BatchNorm and
SyncBatchNorm, and ONNX BatchNormalization's training-mode equations reproduced."""

import numpy as np
import pytest

import bnorm
import reference as ref
from bnorm.distributed import LocalComm, SyncBatchNorm


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("layout", [((6, 3), 1), ((2, 4, 5), 1), ((2, 3, 3, 4), -1)])
def test_forward_train_biased_running_var(rng, dtype, layout):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, dtype)
    c = shape[axis]
    _, _, rm, rv = ref.make_params(rng, c, dtype)
    rm2, rv2, rv0 = rm.copy(), rv.copy(), rv.copy()
    y, _, _ = bnorm.forward_train(x, None, None, rm, rv, axis=axis, momentum=0.3, unbiased_running_var=False)
    y2, _, _ = bnorm.forward_train(x, None, None, rm2, rv2, axis=axis, momentum=0.3)
    ref.assert_bitwise(y, y2, "y does not depend on the running-variance convention")
    np.testing.assert_array_equal(rm, rm2)
    m, _, bvar = ref.batch_stats(x, axis)
    _, want = ref.update_running(None, rv0, None, bvar, m, 0.3)
    ref.assert_close(rv2, want, ref.tol(dtype, "stat"), "unbiased running_var")
    ref.assert_close(rv, 0.7 * rv0.astype(np.float64) + 0.3 * bvar, ref.tol(dtype, "stat"), "biased running_var")


def onnx_batchnorm_training(x, scale, b, input_mean, input_var, epsilon, momentum):
    """ONNX BatchNormalization (opset 15), training_mode=1, in float64, as its spec writes it:
    current_mean = ReduceMean(X, axis=all_except_channel_index)
    current_var = ReduceVar(X, axis=all_except_channel_index)   (population variance)
    running_mean = input_mean * momentum + current_mean * (1 - momentum)
    running_var = input_var * momentum + current_var * (1 - momentum)
    Y = (X - current_mean) / sqrt(current_var + epsilon) * scale + B"""
    x = x.astype(np.float64)
    axes = tuple(i for i in range(x.ndim) if i != 1)
    current_mean = x.mean(axis=axes)
    current_var = x.var(axis=axes)
    shape = [1, -1] + [1] * (x.ndim - 2)
    y = (x - current_mean.reshape(shape)) / np.sqrt(current_var.reshape(shape) + epsilon) * scale.reshape(shape) \
        + b.reshape(shape)
    running_mean = input_mean * momentum + current_mean * (1 - momentum)
    running_var = input_var * momentum + current_var * (1 - momentum)
    return y, running_mean, running_var


def test_reproduces_onnx_training_mode(rng):
    """bnorm with momentum = 1 - m and unbiased_running_var=False is ONNX's training mode
    with momentum m (ONNX's default m = 0.9, epsilon = 1e-5)."""
    x = rng.standard_normal((4, 3, 5, 5)) * 2 + 1
    scale, b = rng.standard_normal(3), rng.standard_normal(3)
    input_mean, input_var = rng.standard_normal(3), rng.uniform(0.5, 2, 3)
    m = 0.9
    want_y, want_mean, want_var = onnx_batchnorm_training(x, scale, b, input_mean, input_var, 1e-5, m)
    rm, rv = input_mean.copy(), input_var.copy()
    y, _, _ = bnorm.forward_train(x, scale, b, rm, rv, momentum=1 - m, eps=1e-5, unbiased_running_var=False)
    ref.assert_close(y, want_y, 1e-12)
    ref.assert_close(rm, want_mean, 1e-12)
    ref.assert_close(rv, want_var, 1e-12)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_layer_biased_running_var(rng, momentum):
    x = ref.make_x(rng, (8, 3, 4), 1, np.float64)
    bn = bnorm.BatchNorm(3, dtype=np.float64, momentum=momentum, unbiased_running_var=False)
    plain = bnorm.BatchNorm(3, dtype=np.float64, momentum=momentum)
    rv = np.ones(3)
    for step in range(1, 4):
        np.testing.assert_array_equal(bn(x * step), plain(x * step))
        _, _, var = ref.batch_stats(x * step, 1)
        f = 1 / step if momentum is None else momentum
        rv = (1 - f) * rv + f * var
    ref.assert_close(bn.running_var, rv, 1e-12)
    np.testing.assert_array_equal(bn.running_mean, plain.running_mean)
    assert "unbiased_running_var=False" in repr(bn)


def test_sync_batchnorm_biased_running_var(rng):
    x = ref.make_x(rng, (8, 3, 4), 1, np.float64)
    sbn = SyncBatchNorm(3, LocalComm(), dtype=np.float64, unbiased_running_var=False)
    bn = bnorm.BatchNorm(3, dtype=np.float64, unbiased_running_var=False)
    sbn(x)
    bn(x)
    np.testing.assert_allclose(sbn.running_var, bn.running_var, rtol=1e-15)
    assert SyncBatchNorm.from_batchnorm(bn, LocalComm()).unbiased_running_var is False


@pytest.mark.parametrize("value", ["no", 1, None])
def test_bad_flag(value):
    x = np.ones((4, 2), np.float32)
    with pytest.raises(TypeError, match="unbiased_running_var must be True or False"):
        bnorm.forward_train(x, unbiased_running_var=value)
    with pytest.raises(TypeError, match="unbiased_running_var must be True or False"):
        bnorm.BatchNorm(2, unbiased_running_var=value)
