"""The fused epilogue: y = act(BN(x) + residual) and its backward (dx, dweight, dbias, dsum).

Checked against the composition of the unfused ops in float64 (every layout, view and dtype
of the `case` fixture, the residual in another memory layout than x), bit for bit against
the plain ops where the fusion changes no rounding (ReLU alone; backward of dy * (y > 0)),
with finite differences (dx, dweight, dbias and the residual's gradient), across thread
counts, with hypothesis, and for bad input (clear errors, nothing modified).
"""

import numpy as np
import pytest

import bnorm
import reference as ref
from reference import assert_close
from test_gradcheck import _numeric_grad
from test_ops import _snapshot, _unchanged

ACTIVATIONS = [pytest.param(None, id="noact"), pytest.param("relu", id="relu")]
RESIDUALS = [pytest.param(False, id="nores"), pytest.param(True, id="res")]


def _residual(rng, case):
    """A residual in another memory layout than x's (a C-contiguous x gets a strided one,
    which is copied; any other x a C-contiguous one)."""
    view = "sliced" if case.x.flags.c_contiguous else "contiguous"
    z = ref.empty_view(case.x.shape, case.dtype, view, case.axis)
    z[...] = rng.standard_normal(case.x.shape)
    return z


def _epilogue(y, z, activation):
    """act(y + z) in float64: the unfused composition's result."""
    y = np.asarray(y, np.float64) + (0 if z is None else np.asarray(z, np.float64))
    return np.maximum(y, 0) if activation == "relu" else y


def _out_tol(case, z):
    # The fused value is rounded once where the composition rounds BN(x) first: float16
    # outputs may differ by a rounding of the sum's magnitude (x + z: up to ~2x the BN scale).
    return case.tol("out") * (2 if z is not None else 1)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", RESIDUALS)
def test_forward_train_fused(case, rng, with_residual, activation):
    z = _residual(rng, case) if with_residual else None
    rm, rv = case.running_mean.copy(), case.running_var.copy()
    before = _snapshot(case.x, case.weight, case.bias, z)
    y, mean, invstd = bnorm.forward_train(case.x, case.weight, case.bias, rm, rv, axis=case.axis, momentum=0.3,
                                          residual=z, activation=activation)
    _unchanged(before, case.x, case.weight, case.bias, z)
    ry, rmean, rinvstd, rrm, rrv = ref.forward_train(case.x, case.weight, case.bias, case.running_mean,
                                                     case.running_var, case.axis, 0.3, 1e-5)
    assert y.dtype == case.dtype and y.shape == case.x.shape
    assert_close(y, _epilogue(ry, z, activation), _out_tol(case, z), "y")
    # statistics of x alone
    assert_close(mean, rmean, case.tol("stat"), "save_mean")
    assert_close(invstd, rinvstd, case.tol("stat"), "save_invstd")
    assert_close(rm, rrm, case.tol("stat"), "running_mean")
    assert_close(rv, rrv, case.tol("stat"), "running_var")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", RESIDUALS)
def test_forward_infer_fused(case, rng, with_residual, activation):
    z = _residual(rng, case) if with_residual else None
    y = bnorm.forward_infer(case.x, case.running_mean, case.running_var, case.weight, case.bias, axis=case.axis,
                            residual=z, activation=activation)
    ry = ref.forward_infer(case.x, case.running_mean, case.running_var, case.weight, case.bias, case.axis)
    assert_close(y, _epilogue(ry, z, activation), _out_tol(case, z), "y")


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("with_residual", RESIDUALS)
def test_normalize_fused(case, rng, with_residual, activation):
    z = _residual(rng, case) if with_residual else None
    _, mean, var = ref.batch_stats(case.x, case.axis)
    mean, invstd = mean.astype(case.pdtype), ref.invstd_of(var).astype(case.pdtype)
    y = bnorm.normalize(case.x, mean, invstd, case.weight, case.bias, axis=case.axis, residual=z,
                        activation=activation)
    ry = ref.normalize(case.x, mean, invstd, case.weight, case.bias, case.axis)
    assert_close(y, _epilogue(ry, z, activation), _out_tol(case, z), "y")


def test_relu_alone_is_bitwise_relu_of_plain(case):
    """Rounding commutes with ReLU: the fused output is exactly max(plain, 0)."""
    y = bnorm.forward_train(case.x, case.weight, case.bias, axis=case.axis, activation="relu")[0]
    plain = bnorm.forward_train(case.x, case.weight, case.bias, axis=case.axis)[0]
    assert np.array_equal(y, np.maximum(plain, 0))
    y = bnorm.forward_infer(case.x, case.running_mean, case.running_var, axis=case.axis, activation="relu")
    plain = bnorm.forward_infer(case.x, case.running_mean, case.running_var, axis=case.axis)
    assert np.array_equal(y, np.maximum(plain, 0))


def _mask_source(rng, case):
    """A y with positives, negatives and exact zeros (the mask's edge), in x's layout."""
    y = rng.standard_normal(case.x.shape).astype(case.dtype)
    y[rng.random(case.x.shape) < 0.1] = 0
    return y


def _saved_stats(case):
    _, mean, var = ref.batch_stats(case.x, case.axis)
    return mean.astype(case.pdtype), ref.invstd_of(var).astype(case.pdtype)


@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "fixed"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_fused(case, rng, batch_stats, affine):
    mean, invstd = _saved_stats(case) if batch_stats else (
        case.running_mean, ref.invstd_of(case.running_var).astype(case.pdtype))
    w = case.weight if affine else None
    y = _mask_source(rng, case)
    before = _snapshot(case.dy, case.x, mean, invstd, w, y)
    dx, dw, db, dsum = bnorm.backward(case.dy, case.x, mean, invstd, w, axis=case.axis, batch_stats=batch_stats,
                                      activation="relu", y=y)
    _unchanged(before, case.dy, case.x, mean, invstd, w, y)
    g = np.where(y > 0, case.dy, 0).astype(case.dtype)
    ref.assert_bitwise(dsum, g, "dsum")
    rdx, rdw, rdb = ref.backward(g, case.x, mean, invstd, w, case.axis, batch_stats)
    assert_close(dx, rdx, case.tol("out"), "dx")
    assert_close(dw, rdw, case.tol("stat"), "dweight")
    assert_close(db, rdb, case.tol("stat"), "dbias")
    # the same kernels read g instead of dy: the plain backward of g, bit for bit
    pdx, pdw, pdb = bnorm.backward(g, case.x, mean, invstd, w, axis=case.axis, batch_stats=batch_stats)
    if batch_stats:
        ref.assert_bitwise(dx, pdx, "dx vs plain backward of g")
    else:  # plain eval dx is ((g - 0) - 0) * scale + 0: equal values (signs of zeros may differ)
        assert np.array_equal(dx, pdx)
    ref.assert_bitwise(dw, pdw, "dweight vs plain")
    ref.assert_bitwise(db, pdb, "dbias vs plain")


def test_backward_without_activation_unchanged(case):
    mean, invstd = _saved_stats(case)
    got = bnorm.backward(case.dy, case.x, mean, invstd, case.weight, axis=case.axis, activation=None)
    assert len(got) == 3


def test_backward_phases_fused(case, rng):
    mean, invstd = _saved_stats(case)
    y = _mask_source(rng, case)
    g = np.where(y > 0, case.dy, 0).astype(case.dtype)
    sum_dy, sum_dy_xhat = bnorm.backward_reduce(case.dy, case.x, mean, invstd, axis=case.axis, activation="relu", y=y)
    psum_dy, psum_dy_xhat = bnorm.backward_reduce(g, case.x, mean, invstd, axis=case.axis)
    ref.assert_bitwise(sum_dy, psum_dy, "sum_dy")
    ref.assert_bitwise(sum_dy_xhat, psum_dy_xhat, "sum_dy_xhat")
    count = ref._count(case.x, case.axis)
    dx, dsum = bnorm.backward_elemt(case.dy, case.x, mean, invstd, case.weight, sum_dy, sum_dy_xhat, count,
                                    axis=case.axis, activation="relu", y=y)
    ref.assert_bitwise(dsum, g, "dsum")
    pdx = bnorm.backward_elemt(g, case.x, mean, invstd, case.weight, sum_dy, sum_dy_xhat, count, axis=case.axis)
    ref.assert_bitwise(dx, pdx, "dx")
    # the phases are the whole backward
    wdx, wdw, wdb, wdsum = bnorm.backward(case.dy, case.x, mean, invstd, case.weight, axis=case.axis,
                                          activation="relu", y=y)
    ref.assert_bitwise(wdx, dx, "backward == phases")


def test_out_may_be_residual_or_y(rng):
    x = ref.make_x(rng, (4, 3, 5, 6), 1, np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32)
    expect = bnorm.forward_train(x, residual=z, activation="relu")[0]
    y = bnorm.forward_train(x, residual=z, activation="relu", out=z)[0]
    assert y is z
    ref.assert_bitwise(y, expect, "out=residual")
    mean, invstd = _saved_stats(ref.Case(x, x, 1, np.dtype(np.float32), *ref.make_params(rng, 3, np.float32)))
    dy = rng.standard_normal(x.shape).astype(np.float32)
    expect = bnorm.backward(dy, x, mean, invstd, activation="relu", y=y)
    got = bnorm.backward(dy, x, mean, invstd, activation="relu", y=y.copy(), out=dy.copy())
    for a, b in zip(expect, got):
        ref.assert_bitwise(a, b, "out=dy")
    yy = y.copy()
    got = bnorm.backward(dy, x, mean, invstd, activation="relu", y=yy, out=yy)
    assert got[0] is yy
    for a, b in zip(expect, got):
        ref.assert_bitwise(a, b, "out=y")


# Shapes that take each schedule of the kernels on several threads: planes fused per
# channel and unfused, rows in strips and blocks, short planes (positions), narrow rows.
THREAD_SHAPES = [((8, 64, 16, 16), 1), ((4, 3, 64, 64), 1), ((2048, 96), 1), ((64, 2048), 1),
                 ((16, 2, 2048), 1), ((32, 256, 5, 5), 1), ((64, 4, 8, 8), -1), ((8192, 3), 1),
                 ((256, 16, 7, 7), 1)]


@pytest.mark.parametrize("layout", THREAD_SHAPES, ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}")
def test_fused_bitwise_for_any_thread_count(rng, restore_threads, layout):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, np.float32)
    z = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, np.float32)
    results = []
    for n in (1, 2, 3):
        bnorm.set_num_threads(n)
        y, mean, invstd = bnorm.forward_train(x, w, b, axis=axis, residual=z, activation="relu")
        yi = bnorm.forward_infer(x, rm, rv, w, b, axis=axis, residual=z, activation="relu")
        grads = bnorm.backward(dy, x, mean, invstd, w, axis=axis, activation="relu", y=y)
        egrads = bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=False, activation="relu", y=y)
        results.append((y, mean, invstd, yi, *grads, *egrads))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            ref.assert_bitwise(a, b_, "thread counts differ")


# -- finite differences: L = sum(relu(BN(x) + z) * g) in float64 ----------------------

@pytest.mark.parametrize("layout", [((5, 3), 1), ((3, 2, 4), 1), ((2, 3, 2, 2), -1)],
                         ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}")
@pytest.mark.parametrize("batch_stats", [True, False], ids=["batch", "fixed"])
def test_fused_gradients_match_finite_differences(rng, layout, batch_stats):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, np.float64)
    z = rng.standard_normal(shape)
    g = rng.standard_normal(shape)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, np.float64)

    def forward():
        if batch_stats:
            return bnorm.forward_train(x, w, b, axis=axis, residual=z, activation="relu")
        return bnorm.forward_infer(x, rm, rv, w, b, axis=axis, residual=z, activation="relu"), None, None

    def loss():
        return float(np.sum(forward()[0] * g))

    y, mean, invstd = forward()
    if not batch_stats:
        mean, invstd = rm, ref.invstd_of(rv)
    # the data keep every pre-activation value away from ReLU's kink (not differentiable)
    pre = bnorm.forward_train(x, w, b, axis=axis, residual=z)[0] if batch_stats else bnorm.forward_infer(
        x, rm, rv, w, b, axis=axis, residual=z)
    assert np.min(np.abs(pre)) > 1e-4
    assert (y == 0).any() and (y > 0).any()
    dx, dw, db, dsum = bnorm.backward(g, x, mean, invstd, w, axis=axis, batch_stats=batch_stats,
                                      activation="relu", y=y)
    assert_close(dx, _numeric_grad(loss, x), 1e-6, "dx")
    assert_close(dw, _numeric_grad(loss, w), 1e-6, "dweight")
    assert_close(db, _numeric_grad(loss, b), 1e-6, "dbias")
    assert_close(dsum, _numeric_grad(loss, z), 1e-6, "dresidual (dsum)")


# -- bad input: clear errors, nothing modified -----------------------------------------

def _bad_setup(rng):
    x = ref.make_x(rng, (4, 3, 5), 1, np.float32)
    w, b, rm, rv = ref.make_params(rng, 3, np.float32)
    return x, w, b, rm, rv


@pytest.mark.parametrize("residual, exc, match", [
    (np.zeros((4, 3, 6), np.float32), ValueError, "residual must have x's shape"),
    (np.zeros((4, 3, 5), np.float64), TypeError, "residual must have x's dtype"),
    ("text", TypeError, "residual"),
    (type("CudaArray", (), {"__dlpack_device__": lambda self: (2, 0)})(), ValueError, "residual is on another device"),
])
def test_bad_residual(rng, residual, exc, match):
    x, w, b, rm, rv = _bad_setup(rng)
    out = np.full(x.shape, 7, np.float32)
    before = _snapshot(x, w, b, rm, rv, out)
    with pytest.raises(exc, match=match):
        bnorm.forward_train(x, w, b, rm, rv, residual=residual, out=out)
    with pytest.raises(exc, match=match):
        bnorm.forward_infer(x, rm, rv, w, b, residual=residual, out=out)
    with pytest.raises(exc, match=match):
        bnorm.normalize(x, rm, rv, w, b, residual=residual, out=out)
    _unchanged(before, x, w, b, rm, rv, out)


@pytest.mark.parametrize("activation", ["gelu", "ReLU", True, 1, np.str_("tanh")])
def test_bad_activation(rng, activation):
    x, w, b, rm, rv = _bad_setup(rng)
    before = _snapshot(x, w, b, rm, rv)
    with pytest.raises(ValueError, match='activation must be None or "relu"'):
        bnorm.forward_train(x, w, b, rm, rv, activation=activation)
    with pytest.raises(ValueError, match='activation must be None or "relu"'):
        bnorm.forward_infer(x, rm, rv, activation=activation)
    with pytest.raises(ValueError, match='activation must be None or "relu"'):
        bnorm.backward(x, x, rm, rv, activation=activation, y=x)
    _unchanged(before, x, w, b, rm, rv)


def test_bad_mask_source(rng):
    x, w, b, rm, rv = _bad_setup(rng)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = np.full(x.shape, 7, np.float32)
    before = _snapshot(x, dy, rm, rv, out)
    with pytest.raises(ValueError, match="y .* is required"):
        bnorm.backward(dy, x, rm, rv, activation="relu", out=out)
    with pytest.raises(ValueError, match="y must have x's shape"):
        bnorm.backward(dy, x, rm, rv, activation="relu", y=x[:, :, :4], out=out)
    with pytest.raises(TypeError, match="y must have x's dtype"):
        bnorm.backward(dy, x, rm, rv, activation="relu", y=x.astype(np.float64), out=out)
    with pytest.raises(ValueError, match='pass activation="relu" or no y'):
        bnorm.backward(dy, x, rm, rv, y=x, out=out)
    with pytest.raises(ValueError, match="y .* is required"):
        bnorm.backward_reduce(dy, x, rm, rv, activation="relu")
    with pytest.raises(ValueError, match="y .* is required"):
        bnorm.backward_elemt(dy, x, rm, rv, None, rm, rv, 20, activation="relu", out=out)
    _unchanged(before, x, dy, rm, rv, out)


def test_out_overlapping_residual_partly(rng):
    x = ref.make_x(rng, (4, 3, 5), 1, np.float32)
    buf = rng.standard_normal(x.size + 1).astype(np.float32)
    z, out = buf[:-1].reshape(x.shape), buf[1:].reshape(x.shape)
    before = buf.copy()
    with pytest.raises(ValueError, match="out overlaps residual partly"):
        bnorm.forward_train(x, residual=z, out=out)
    ref.assert_bitwise(buf, before, "modified")


def test_out_overlapping_y_partly(rng):
    x = ref.make_x(rng, (4, 3, 5), 1, np.float32)
    _, mean, var = ref.batch_stats(x, 1)
    buf = rng.standard_normal(x.size + 1).astype(np.float32)
    y, out = buf[:-1].reshape(x.shape), buf[1:].reshape(x.shape)
    before = buf.copy()
    with pytest.raises(ValueError, match="out overlaps y partly"):
        bnorm.backward(x.copy(), x, mean.astype(np.float32), ref.invstd_of(var).astype(np.float32),
                       activation="relu", y=y, out=out)
    ref.assert_bitwise(buf, before, "modified")


def test_empty_and_single_channel(rng):
    x = np.zeros((0, 3, 4), np.float32)
    y, mean, invstd = bnorm.forward_train(x, residual=x, activation="relu")
    assert y.shape == x.shape
    dx, dw, db, dsum = bnorm.backward(x, x, mean, invstd, activation="relu", y=y)
    assert dsum.shape == x.shape and dx.shape == x.shape


# -- hypothesis -------------------------------------------------------------------------

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@settings(deadline=None, max_examples=60)
@given(ndim=st.integers(2, 4), data=st.data())
def test_fused_properties(ndim, data):
    shape = tuple(data.draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = data.draw(st.integers(-ndim, ndim - 1))
    ax = axis % ndim
    if int(np.prod(shape)) // shape[ax] < 2:  # training needs 2 values per channel
        i = (ax + 1) % ndim
        shape = shape[:i] + (2 * shape[i],) + shape[i + 1:]
    dtype = data.draw(st.sampled_from([np.float16, np.float32, np.float64]))
    x_view, z_view = data.draw(st.sampled_from(ref.VIEWS)), data.draw(st.sampled_from(ref.VIEWS))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = ref.make_x(rng, shape, axis, dtype, x_view)
    z = ref.make_dy(rng, shape, dtype, z_view, axis)
    dy = ref.make_dy(rng, shape, dtype, x_view, axis)
    y, mean, invstd = bnorm.forward_train(x, axis=axis, residual=z, activation="relu")
    ry = ref.forward_train(x, axis=axis)[0]
    assert_close(y, _epilogue(ry, z, "relu"), 2 * ref.tol(dtype, "out"), "y")
    # properties of the fused output: ReLU's range, and exactly 0 where the sum is negative
    assert (y >= 0).all()
    dx, dw, db, dsum = bnorm.backward(dy, x, mean, invstd, axis=axis, activation="relu", y=y)
    ref.assert_bitwise(dsum, np.where(y > 0, dy, 0).astype(dtype), "dsum")
    pdx, pdw, pdb = bnorm.backward(dsum, x, mean, invstd, axis=axis)
    ref.assert_bitwise(dx, pdx, "dx")
    ref.assert_bitwise(dw, pdw, "dweight")


# -- PyTorch: relu(batch_norm(x) + z) and its autograd gradients ------------------------

@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("layout", [((8, 5), 1), ((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((2, 3, 4, 3, 5), 1)],
                         ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fused_vs_torch(rng, dtype, layout, training):
    torch = pytest.importorskip("torch")
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, dtype)
    z = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, dtype)

    def t(a, grad=False):  # channels at dim 1, as torch wants
        return torch.from_numpy(np.ascontiguousarray(np.moveaxis(a, axis, 1))).requires_grad_(grad)

    tx, tz, tw, tb = t(x, True), t(z, True), torch.from_numpy(w.copy()).requires_grad_(), \
        torch.from_numpy(b.copy()).requires_grad_()
    trm, trv = torch.from_numpy(rm.copy()), torch.from_numpy(rv.copy())
    ty = torch.relu(torch.nn.functional.batch_norm(tx, trm, trv, tw, tb, training=training, momentum=0.1,
                                                   eps=1e-5) + tz)
    ty.backward(t(dy))

    def back(a):
        return np.moveaxis(a.detach().numpy(), 1, axis)

    brm, brv = rm.copy(), rv.copy()
    if training:
        y, mean, invstd = bnorm.forward_train(x, w, b, brm, brv, axis=axis, residual=z, activation="relu")
    else:
        y = bnorm.forward_infer(x, rm, rv, w, b, axis=axis, residual=z, activation="relu")
        mean, invstd = rm, ref.invstd_of(rv).astype(dtype)
    dx, dw, db, dz = bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=training, activation="relu", y=y)
    tol = ref.tol(dtype, "out") * 10
    assert_close(y, back(ty), tol, "y")
    assert_close(dx, back(tx.grad), tol, "dx")
    assert_close(dz, back(tz.grad), tol, "dresidual")
    assert_close(dw, tw.grad.numpy(), tol, "dweight")
    assert_close(db, tb.grad.numpy(), tol, "dbias")
    if training:
        assert_close(brm, trm.numpy(), tol, "running_mean")
        assert_close(brv, trv.numpy(), tol, "running_var")


@pytest.mark.parametrize("shift", [0, 1, 3])
def test_dsum_shares_dx_alignment(rng, shift):
    """dsum is allocated at dx's address modulo 64 bytes, so that the pass writing both can
    stream whole cache lines of each; its values are those of a plain allocation."""
    shape = (4, 6, 9, 9)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    y, mean, invstd = bnorm.forward_train(x, activation="relu")
    buf = np.zeros(x.size + 16, np.float32)
    out = buf[shift:shift + x.size].reshape(shape)
    dx, _, _, dsum = bnorm.backward(dy, x, mean, invstd, activation="relu", y=y, out=out)
    assert dx is out and (dsum.ctypes.data - dx.ctypes.data) % 64 == 0
    np.testing.assert_array_equal(dsum, dy * (y > 0))
    sdy, sdyx = bnorm.backward_reduce(dy, x, mean, invstd, activation="relu", y=y)
    dx2, dsum2 = bnorm.backward_elemt(dy, x, mean, invstd, None, sdy, sdyx, x.size // 6, activation="relu", y=y,
                                      out=out)
    assert (dsum2.ctypes.data - dx2.ctypes.data) % 64 == 0 and dsum2.flags.c_contiguous
    np.testing.assert_array_equal(dsum2, dy * (y > 0))


def _dtype(name):
    if name == "bfloat16":
        return pytest.importorskip("ml_dtypes").bfloat16
    return np.dtype(name)


# The backward's streamed outputs (over 4 MiB an array). In two passes (too large for a
# channel or strip to stay cached between the reduction and dx: rows, channels-last, planes
# of 8 MiB) the reduction writes dsum and the second pass reads it back in place of dy and
# y; fused per channel (14x14 planes), dsum gets a write loop of its own before each run's
# dx. Every dtype, dx (hence dsum) at two alignments; results bit for bit those of the
# plain backward of g = dy * (y > 0).
@pytest.mark.parametrize("shift", [0, 1])
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("layout", [((24000, 100), 1), ((32, 28, 28, 96), -1), ((8, 2, 512, 512), 1),
                                    ((128, 128, 14, 14), 1)],
                         ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}")
def test_backward_streamed(rng, layout, dtype, shift):
    shape, axis = layout
    dtype = _dtype(dtype)
    pdtype = np.float64 if dtype == np.float64 else np.float32
    c = shape[axis]
    x = (rng.standard_normal(shape) + 0.5).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    w = rng.uniform(0.5, 1.5, c).astype(pdtype)
    b = rng.uniform(-0.5, 0.5, c).astype(pdtype)
    y, mean, invstd = bnorm.forward_train(x, w, b, axis=axis, activation="relu")
    before = _snapshot(dy, x, y)
    buf = np.zeros(x.size + 32, dtype)
    out = buf[shift:shift + x.size].reshape(shape)
    dx, dw, db, dsum = bnorm.backward(dy, x, mean, invstd, w, axis=axis, activation="relu", y=y, out=out)
    _unchanged(before, dy, x, y)
    g = np.where(y > 0, dy, np.zeros((), dtype)).astype(dtype)
    ref.assert_bitwise(dsum, g, "dsum")
    pdx, pdw, pdb = bnorm.backward(g, x, mean, invstd, w, axis=axis)
    ref.assert_bitwise(dx, pdx, "dx vs plain backward of g")
    ref.assert_bitwise(dw, pdw, "dweight")
    ref.assert_bitwise(db, pdb, "dbias")
    # the phases (their dx pass writes dsum beside dx on every schedule)
    sdy, sdyx = bnorm.backward_reduce(dy, x, mean, invstd, axis=axis, activation="relu", y=y)
    count = x.size // c
    edx, edsum = bnorm.backward_elemt(dy, x, mean, invstd, w, sdy, sdyx, count, axis=axis, activation="relu", y=y,
                                      out=out)
    ref.assert_bitwise(edsum, g, "backward_elemt's dsum")
    ref.assert_bitwise(edx, bnorm.backward_elemt(g, x, mean, invstd, w, sdy, sdyx, count, axis=axis), "elemt dx")
