"""The fused epilogue in the layers: BatchNorm(activation=...), bn(x, residual=z), and
bn.backward returning (dx, dresidual); SyncBatchNorm likewise across simulated ranks."""

import numpy as np
import pytest

import bnorm
import reference as ref
from bnorm.distributed import LocalComm, SyncBatchNorm
from test_distributed import run_ranks


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["nores", "res"])
def test_layer_matches_functional(rng, training, activation, with_residual):
    x = ref.make_x(rng, (6, 4, 3, 5), 1, np.float32)
    z = rng.standard_normal(x.shape).astype(np.float32) if with_residual else None
    dy = rng.standard_normal(x.shape).astype(np.float32)
    bn = bnorm.BatchNorm(4, activation=activation)
    bn.weight[:] = [0.5, -1.0, 2.0, 1.5]
    bn.running_var[:] = [0.5, 2.0, 1.0, 3.0]
    bn.train(training)
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    y = bn(x) if z is None else bn(x, residual=z)
    if training:
        fy, mean, invstd = bnorm.forward_train(x, bn.weight, bn.bias, rm, rv, residual=z, activation=activation)
    else:
        fy = bnorm.forward_infer(x, rm, rv, bn.weight, bn.bias, residual=z, activation=activation)
        mean, invstd = rm, ref.invstd_of(rv).astype(np.float32)
    ref.assert_bitwise(y, fy, "y")
    ref.assert_bitwise(bn.running_mean, rm, "running_mean")
    got = bn.backward(dy)
    grads = bnorm.backward(dy, x, mean, invstd, bn.weight, batch_stats=training, activation=activation,
                           y=fy if activation else None)
    dsum = grads[3] if activation else dy
    if with_residual:
        dx, dres = got
        ref.assert_bitwise(dres, dsum, "dresidual")
    else:
        dx = got
    ref.assert_bitwise(dx, grads[0], "dx")
    ref.assert_bitwise(bn.grad_weight, grads[1], "grad_weight")
    ref.assert_bitwise(bn.grad_bias, grads[2], "grad_bias")


def test_layer_bad_activation_and_residual(rng):
    with pytest.raises(ValueError, match='activation must be None or "relu"'):
        bnorm.BatchNorm(3, activation="gelu")
    bn = bnorm.BatchNorm(3, activation="relu")
    x = ref.make_x(rng, (4, 3), 1, np.float32)
    before = (bn.running_mean.copy(), bn.num_batches_tracked)
    with pytest.raises(ValueError, match="residual must have x's shape"):
        bn(x, residual=np.zeros((4, 2), np.float32))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        bn(x, residual=np.zeros((4, 3), np.float64))
    ref.assert_bitwise(bn.running_mean, before[0], "running_mean")
    assert bn.num_batches_tracked == before[1]
    assert "activation='relu'" in repr(bn)
    assert "activation" not in repr(bnorm.BatchNorm(3))


def test_sync_layer_local_matches_batchnorm(rng):
    x = rng.standard_normal((16, 4, 5)) * 3 + 1
    z = rng.standard_normal(x.shape)
    dy = rng.standard_normal(x.shape)
    bn = bnorm.BatchNorm(4, dtype=np.float64, activation="relu")
    sbn = SyncBatchNorm.from_batchnorm(bn, LocalComm())
    assert sbn.activation == "relu"
    np.testing.assert_allclose(sbn(x, residual=z), bn(x, residual=z), rtol=0, atol=1e-13)
    (sdx, sdz), (dx, dz) = sbn.backward(dy), bn.backward(dy)
    np.testing.assert_allclose(sdx, dx, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(sdz, dz)
    np.testing.assert_allclose(sbn.grad_weight, bn.grad_weight, rtol=1e-12)


@pytest.mark.parametrize("size", [2, 3])
def test_sync_layer_ranks_match_whole_batch(rng, size):
    x = rng.standard_normal((6 * size, 3, 4)) * 2 - 1
    z = rng.standard_normal(x.shape)
    dy = rng.standard_normal(x.shape)
    whole = bnorm.BatchNorm(3, dtype=np.float64, activation="relu")
    y = whole(x, residual=z)
    dx, dz = whole.backward(dy)

    def fn(comm, rank, n):
        part = slice(6 * rank, 6 * (rank + 1))
        sbn = SyncBatchNorm(3, comm, dtype=np.float64, activation="relu")
        out = sbn(x[part], residual=z[part])
        return out, sbn.backward(dy[part]), sbn.grad_weight

    for rank, (out, (pdx, pdz), gw) in enumerate(run_ranks(size, fn)):
        part = slice(6 * rank, 6 * (rank + 1))
        np.testing.assert_allclose(out, y[part], rtol=0, atol=1e-12)
        np.testing.assert_allclose(pdx, dx[part], rtol=0, atol=1e-12)
        np.testing.assert_array_equal(pdz, dz[part])
        np.testing.assert_allclose(gw, whole.grad_weight, rtol=1e-12)


def test_sync_layer_bad_residual_on_one_rank_makes_every_rank_raise():
    def fn(comm, rank, size):
        sbn = SyncBatchNorm(2, comm, dtype=np.float64, activation="relu")
        x = np.ones((3, 2))
        z = np.ones((3, 3) if rank == 1 else (3, 2))
        try:
            sbn(x, residual=z)
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__, sbn.num_batches_tracked
        return None

    assert run_ranks(3, fn) == [("RuntimeError", 0), ("ValueError", 0), ("RuntimeError", 0)]
