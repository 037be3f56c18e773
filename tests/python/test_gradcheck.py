"""Finite-difference gradient checks of bnorm.backward in both modes (float64).

The scalar loss is L = sum(y * g) with y from bnorm's own forward (forward_train for
batch statistics, forward_infer for fixed statistics); central differences of L with
respect to every element of x, weight and bias must match backward's dx, dweight, dbias.
"""

import numpy as np
import pytest

import bnorm
import reference as ref

EPS = 1e-5
H = 1e-6
RTOL = 1e-6

GRAD_LAYOUTS = [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1), ((2, 4, 3), 2),
                ((2, 2, 3, 2, 2), 1)]


def _numeric_grad(loss, arr):
    return ref.numeric_grad(loss, arr, H)


def _check(analytic, numeric, what):
    ref.assert_close(analytic, numeric, RTOL, what)


@pytest.mark.parametrize("view", ["contiguous", "sliced"])
@pytest.mark.parametrize("layout", GRAD_LAYOUTS, ids=lambda l: f"{l[0]}-ax{l[1]}")
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "fixed"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "noweight"])
def test_backward_matches_finite_differences(rng, layout, view, batch_stats, affine):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, np.float64, view)
    g = ref.make_dy(rng, shape, np.float64, view, axis)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, np.float64)
    if not affine:
        w = b = None

    def loss():
        if batch_stats:
            y = bnorm.forward_train(x, w, b, axis=axis, eps=EPS)[0]
        else:
            y = bnorm.forward_infer(x, rm, rv, w, b, axis=axis, eps=EPS)
        return float(np.sum(y * g))

    if batch_stats:
        _, mean, invstd = bnorm.forward_train(x, w, b, axis=axis, eps=EPS)
    else:
        mean, invstd = rm, 1.0 / np.sqrt(rv + EPS)
    dx, dw, db = bnorm.backward(g, x, mean, invstd, w, axis=axis, batch_stats=batch_stats)

    _check(dx, _numeric_grad(loss, x), "dx")
    if affine:
        _check(dw, _numeric_grad(loss, w), "dweight")
        _check(db, _numeric_grad(loss, b), "dbias")
    else:
        # Without weight/bias, dweight and dbias are still the gradients the parameters
        # would get at weight=1, bias=0.
        w, b = np.ones(c), np.zeros(c)
        _check(dw, _numeric_grad(loss, w), "dweight (weight=None)")
        _check(db, _numeric_grad(loss, b), "dbias (bias=None)")


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "fixed"])
def test_reference_backward_matches_finite_differences(rng, batch_stats):
    """The reference itself is checked the same way (its backward is used everywhere)."""
    shape, axis = (4, 3, 2), 1
    x = ref.make_x(rng, shape, axis, np.float64)
    g = ref.make_dy(rng, shape, np.float64)
    w, b, rm, rv = ref.make_params(rng, 3, np.float64)

    def loss():
        if batch_stats:
            y = ref.forward_train(x, w, b, axis=axis, eps=EPS)[0]
        else:
            y = ref.forward_infer(x, rm, rv, w, b, axis, EPS)
        return float(np.sum(y * g))

    if batch_stats:
        _, mean, invstd, _, _ = ref.forward_train(x, w, b, axis=axis, eps=EPS)
    else:
        mean, invstd = rm, ref.invstd_of(rv, EPS)
    dx, dw, db = ref.backward(g, x, mean, invstd, w, axis, batch_stats)
    _check(dx, _numeric_grad(loss, x), "dx")
    _check(dw, _numeric_grad(loss, w), "dweight")
    _check(db, _numeric_grad(loss, b), "dbias")
