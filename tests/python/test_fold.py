"""bnorm.fold: an inference-mode batch norm folded into the linear/conv layer before it,
checked against forward_infer after a NumPy matmul and a NumPy 2-D convolution."""

import numpy as np
import pytest

import bnorm
import reference as ref


def conv2d(x, w, b):
    """NCHW x, OIHW w, stride 1, no padding, in float64."""
    n, ci, h, wd = x.shape
    co, _, kh, kw = w.shape
    windows = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), (kh, kw), axis=(2, 3))
    y = np.einsum("nihwkl,oikl->nohw", windows, w.astype(np.float64))
    return y if b is None else y + b.astype(np.float64).reshape(1, co, 1, 1)


def linear(x, w, b):
    y = x.astype(np.float64) @ w.astype(np.float64).T
    return y if b is None else y + b.astype(np.float64)


def bn_params(rng, c, dtype, affine):
    p = ref.param_dtype(dtype)
    mean = rng.uniform(-1, 1, c).astype(p)
    var = rng.uniform(0.2, 3, c).astype(p)
    if not affine:
        return mean, var, None, None
    return mean, var, rng.uniform(-2, 2, c).astype(p), rng.uniform(-1, 1, c).astype(p)


TOL = {np.dtype(np.float32): 2e-6, np.dtype(np.float64): 1e-13}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_linear(rng, dtype, with_bias, affine):
    w = rng.standard_normal((6, 5)).astype(dtype)
    b = rng.standard_normal(6).astype(dtype) if with_bias else None
    x = rng.standard_normal((9, 5)).astype(dtype)
    mean, var, g, beta = bn_params(rng, 6, dtype, affine)
    w_before, b_before = w.copy(), None if b is None else b.copy()
    w2, b2 = bnorm.fold(w, b, mean, var, g, beta, eps=1e-3)
    assert w2.dtype == np.dtype(dtype) and b2.dtype == np.dtype(dtype) and w2.shape == w.shape
    np.testing.assert_array_equal(w, w_before)
    if b is not None:
        np.testing.assert_array_equal(b, b_before)
    want = ref.forward_infer(linear(x, w, b), mean, var, g, beta, axis=1, eps=1e-3)
    ref.assert_close(linear(x, w2, b2), want, TOL[np.dtype(dtype)])
    # and equal to bnorm's own forward_infer on the layer's output
    got = bnorm.forward_infer(linear(x, w, b).astype(dtype), mean, var, g, beta, eps=1e-3)
    ref.assert_close(linear(x, w2, b2), got, 10 * TOL[np.dtype(dtype)])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("affine", [True, False])
def test_fold_conv2d(rng, dtype, with_bias, affine):
    w = rng.standard_normal((4, 3, 3, 2)).astype(dtype)  # OIHW
    b = rng.standard_normal(4).astype(dtype) if with_bias else None
    x = rng.standard_normal((2, 3, 6, 5)).astype(dtype)
    mean, var, g, beta = bn_params(rng, 4, dtype, affine)
    w2, b2 = bnorm.fold(w, b, mean, var, g, beta)
    want = ref.forward_infer(conv2d(x, w, b), mean, var, g, beta, axis=1)
    ref.assert_close(conv2d(x, w2, b2), want, TOL[np.dtype(dtype)])


def test_fold_hwio_axis(rng):
    """HWIO weights (TensorFlow/Keras, Flax) fold with axis=-1, equal to OIHW's fold."""
    w = rng.standard_normal((5, 3, 3, 3))
    mean, var, g, beta = bn_params(rng, 5, np.float64, True)
    b = rng.standard_normal(5)
    w2, b2 = bnorm.fold(w, b, mean, var, g, beta)
    hwio2, hb2 = bnorm.fold(np.ascontiguousarray(w.transpose(2, 3, 1, 0)), b, mean, var, g, beta, axis=-1)
    np.testing.assert_array_equal(hwio2, w2.transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(hb2, b2)


def test_fold_float32_in_double(rng):
    """float32 is computed in float64 and rounded once: the exact products, rounded."""
    w = rng.standard_normal((8, 16)).astype(np.float32)
    mean, var, g, beta = bn_params(rng, 8, np.float32, True)
    w2, _ = bnorm.fold(w, None, mean, var, g, beta)
    scale = g.astype(np.float64) / np.sqrt(var.astype(np.float64) + 1e-5)
    np.testing.assert_array_equal(w2, (w.astype(np.float64) * scale[:, None]).astype(np.float32))


def test_fold_float16(rng):
    w = rng.standard_normal((4, 6)).astype(np.float16)
    mean, var, g, beta = bn_params(rng, 4, np.float16, True)
    w2, b2 = bnorm.fold(w, None, mean, var, g, beta)
    assert w2.dtype == b2.dtype == np.float16
    scale = g / np.sqrt(var.astype(np.float64) + 1e-5)
    ref.assert_close(w2, w.astype(np.float64) * scale[:, None], 1e-3)
    ref.assert_close(b2, -mean * scale + beta, 1e-3)


def test_fold_noncontiguous_weight(rng):
    w = rng.standard_normal((6, 8))
    mean, var, g, beta = bn_params(rng, 3, np.float64, True)
    w2, _ = bnorm.fold(w[::2], None, mean, var, g, beta)
    w2c, _ = bnorm.fold(np.ascontiguousarray(w[::2]), None, mean, var, g, beta)
    np.testing.assert_array_equal(w2, w2c)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(weight=np.ones((3, 2), np.int32)), TypeError, "weight must be one of"),
        (dict(weight=np.ones(())), ValueError, "at least 1 dimension"),
        (dict(bias=np.ones(3, np.float32)), TypeError, "bias must be float64"),
        (dict(bias=np.ones(4)), ValueError, r"bias must have shape \(3,\)"),
        (dict(running_mean=np.ones(3, np.float32)), TypeError, "running_mean must be float64"),
        (dict(running_var=np.ones(2)), ValueError, r"running_var must have shape \(3,\)"),
        (dict(running_var=None), ValueError, "running_var is required"),
        (dict(running_var=-np.ones(3)), ValueError, "running_var must be >= 0"),
        (dict(bn_weight=np.ones(3, np.float16)), TypeError, "bn_weight must be float64"),
        (dict(eps=0.0), ValueError, "eps must be positive"),
        (dict(eps="1"), TypeError, "eps must be a real number"),
        (dict(axis=2), ValueError, "axis 2 is out of range"),
        (dict(axis=1.0), TypeError, "axis must be an integer"),
    ],
)
def test_fold_errors(kwargs, error, match):
    args = dict(weight=np.ones((3, 2)), bias=np.zeros(3), running_mean=np.zeros(3), running_var=np.ones(3))
    args.update(kwargs)
    with pytest.raises(error, match=match):
        bnorm.fold(args.pop("weight"), args.pop("bias"), args.pop("running_mean"), args.pop("running_var"), **args)
