"""Ghost batch normalization: BatchNorm(..., virtual_batch_size=v)."""

import numpy as np
import pytest

import bnorm
import bnorm.distributed
import reference as ref


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("layout", [((12, 3), 1), ((6, 4, 5), 1), ((6, 3, 2, 4), -1), ((4, 5, 3, 2), 2)])
def test_groups_equal_separate_batchnorm_calls(rng, dtype, layout):
    shape, axis = layout
    v = 2 if shape[0] % 3 else 3
    c = shape[axis]
    x = ref.make_x(rng, shape, axis, dtype)
    dy = ref.make_dy(rng, shape, dtype)
    layer_dtype = np.float32 if dtype == np.float16 else dtype
    ghost = bnorm.BatchNorm(c, axis=axis, dtype=layer_dtype, virtual_batch_size=v)
    w, b, _, _ = ref.make_params(rng, c, dtype)
    ghost.weight[...], ghost.bias[...] = w, b
    y = ghost(x)
    dx = ghost.backward(dy)
    dw, db = np.zeros(c), np.zeros(c)
    for g in range(shape[0] // v):
        part = slice(g * v, (g + 1) * v)
        single = bnorm.BatchNorm(c, axis=axis, dtype=layer_dtype)
        single.weight[...], single.bias[...] = w, b
        ref.assert_bitwise(y[part], single(x[part]), f"y of group {g}")
        ref.assert_bitwise(dx[part], single.backward(dy[part]), f"dx of group {g}")
        dw += single.grad_weight
        db += single.grad_bias
    ref.assert_close(ghost.grad_weight, dw, 1e-6 if layer_dtype == np.float32 else 1e-13)
    ref.assert_close(ghost.grad_bias, db, 1e-6 if layer_dtype == np.float32 else 1e-13)


@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("layout", [((8, 3, 5), 1), ((6, 2, 3, 4), -1)])
def test_groups_with_fused_epilogue(rng, activation, layout):
    """virtual_batch_size with residual= and activation=: each group is the fused call of
    a BatchNorm on the group and its slice of the residual; backward returns (dx, dresidual)
    group by group (the residual given as a non-contiguous view)."""
    shape, axis = layout
    v, c = 2, shape[axis]
    x = ref.make_x(rng, shape, axis, np.float32)
    z = np.asfortranarray(ref.make_dy(rng, shape, np.float32))
    dy = ref.make_dy(rng, shape, np.float32)
    ghost = bnorm.BatchNorm(c, axis=axis, virtual_batch_size=v, activation=activation)
    y = ghost(x, residual=z)
    dx, dz = ghost.backward(dy)
    for g in range(shape[0] // v):
        part = slice(g * v, (g + 1) * v)
        single = bnorm.BatchNorm(c, axis=axis, activation=activation)
        ref.assert_bitwise(y[part], single(x[part], residual=z[part]), f"y of group {g}")
        sdx, sdz = single.backward(dy[part])
        ref.assert_bitwise(dx[part], sdx, f"dx of group {g}")
        ref.assert_bitwise(dz[part], sdz, f"dresidual of group {g}")
    with pytest.raises(ValueError, match="residual"):
        ghost(x, residual=z[:, :1])


def test_running_stats_are_the_whole_batch(rng):
    """Running statistics: updated once per call with the whole batch's mean and unbiased
    variance, as BatchNorm without groups (the rule documented on BatchNorm)."""
    x = ref.make_x(rng, (12, 3, 5), 1, np.float64)
    ghost = bnorm.BatchNorm(3, dtype=np.float64, virtual_batch_size=4)
    plain = bnorm.BatchNorm(3, dtype=np.float64)
    for _ in range(3):
        ghost(x)
        plain(x)
    ref.assert_close(ghost.running_mean, plain.running_mean, 1e-13)
    ref.assert_close(ghost.running_var, plain.running_var, 1e-13)
    assert ghost.num_batches_tracked == 3
    ghost.eval()
    ref.assert_close(ghost(x), plain.eval()(x), 1e-13)  # eval: the running statistics, no groups


def test_running_stats_biased_and_cumulative(rng):
    x = ref.make_x(rng, (8, 3), 1, np.float64)
    ghost = bnorm.BatchNorm(3, dtype=np.float64, virtual_batch_size=2, momentum=None, unbiased_running_var=False)
    ghost(x)
    _, mean, var = ref.batch_stats(x, 1)
    ref.assert_close(ghost.running_mean, mean, 1e-13)  # momentum None, first batch: factor 1
    ref.assert_close(ghost.running_var, var, 1e-13)


def test_gradients_by_finite_differences(rng):
    x = rng.standard_normal((6, 2, 3))
    dy = rng.standard_normal(x.shape)
    bn = bnorm.BatchNorm(2, dtype=np.float64, virtual_batch_size=3)
    bn.weight[...] = [1.5, -0.5]
    bn.bias[...] = [0.2, 0.1]

    def loss():
        return float(np.sum(bn(x) * dy))

    bn(x)
    dx = bn.backward(dy)
    gw, gb = bn.grad_weight.copy(), bn.grad_bias.copy()
    np.testing.assert_allclose(dx, ref.numeric_grad(loss, x), atol=1e-6)
    np.testing.assert_allclose(gw, ref.numeric_grad(loss, bn.weight), atol=1e-6)
    np.testing.assert_allclose(gb, ref.numeric_grad(loss, bn.bias), atol=1e-6)


def test_not_tracking_uses_groups_in_eval(rng):
    x = ref.make_x(rng, (4, 3), 1, np.float64)
    bn = bnorm.BatchNorm(3, dtype=np.float64, virtual_batch_size=2, track_running_stats=False).eval()
    np.testing.assert_array_equal(bn(x)[:2], bnorm.BatchNorm(3, dtype=np.float64)(x[:2]))


def test_empty_batch_changes_nothing():
    bn = bnorm.BatchNorm(3, virtual_batch_size=2)
    y = bn(np.empty((0, 3), np.float32))
    assert y.shape == (0, 3) and bn.num_batches_tracked == 0
    np.testing.assert_array_equal(bn.running_var, np.ones(3, np.float32))


def test_errors():
    with pytest.raises(ValueError, match="virtual_batch_size=4 must divide the batch size"):
        bnorm.BatchNorm(3, virtual_batch_size=4)(np.ones((6, 3), np.float32))
    with pytest.raises(ValueError, match="virtual_batch_size must be positive"):
        bnorm.BatchNorm(3, virtual_batch_size=0)
    with pytest.raises(TypeError, match="virtual_batch_size must be an integer"):
        bnorm.BatchNorm(3, virtual_batch_size=2.0)
    with pytest.raises(ValueError, match="channel axis"):
        bnorm.BatchNorm(6, axis=0, virtual_batch_size=2)(np.ones((6, 3), np.float32))
    with pytest.raises(ValueError, match="expected more than 1 value per channel"):
        bnorm.BatchNorm(3, virtual_batch_size=1)(np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="no virtual_batch_size"):
        bnorm.distributed.SyncBatchNorm(3, bnorm.distributed.LocalComm(), virtual_batch_size=2)
    bn = bnorm.BatchNorm(3, virtual_batch_size=2)
    bn(np.ones((4, 3), np.float32) + np.arange(4, dtype=np.float32)[:, None])
    with pytest.raises(ValueError, match="dy must have x's shape"):
        bn.backward(np.ones((2, 3), np.float32))


# Running buffers that forward_train refuses: the ghost, renorm and SyncBatchNorm paths
# update them in Python, so they check them the same way first; a refused call changes
# nothing.
BAD_BUFFERS = {
    "read-only": (lambda bn: setattr(bn.running_var.flags, "writeable", False), ValueError, "read-only"),
    "aliased": (lambda bn: setattr(bn, "running_var", bn.running_mean), ValueError, "overlap"),
    "float64": (lambda bn: setattr(bn, "running_var", np.ones(3)), TypeError, "running_var must be float32"),
    "length": (lambda bn: setattr(bn, "running_var", np.ones(4, np.float32)), ValueError, r"shape \(3,\)"),
    "strided": (lambda bn: setattr(bn, "running_var", np.ones(6, np.float32)[::2]), ValueError, "contiguous"),
    "negative": (lambda bn: setattr(bn, "running_var", -np.ones(3, np.float32)), ValueError, ">= 0"),
}


@pytest.mark.parametrize("bad", BAD_BUFFERS, ids=str)
@pytest.mark.parametrize("layer", [lambda: bnorm.BatchNorm(3, virtual_batch_size=2), lambda: bnorm.BatchRenorm(3),
                                   lambda: bnorm.distributed.SyncBatchNorm(3, bnorm.distributed.LocalComm())],
                         ids=["ghost", "renorm", "sync"])
def test_bad_running_buffers_change_nothing(rng, layer, bad):
    mutate, exc, pattern = BAD_BUFFERS[bad]
    bn = layer()
    bn.running_mean[:] = 0.25
    mutate(bn)
    before = bn.running_mean.copy(), bn.running_var.copy(), bn.num_batches_tracked
    with pytest.raises(exc, match=pattern):
        bn(rng.standard_normal((4, 3, 5)).astype(np.float32))
    assert np.array_equal(bn.running_mean, before[0]) and np.array_equal(bn.running_var, before[1])
    assert bn.num_batches_tracked == before[2]
