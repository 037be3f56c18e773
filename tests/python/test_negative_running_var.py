"""A negative running_var is never a variance: refused with a ValueError naming it, before
anything is written (issue 15, item 5). The classic cause is forward_infer called with
forward_train's argument order, which used to give all-NaN output silently. NaN in
running_var is passed through to its channel, as NaN in x is."""

import numpy as np
import pytest

import bnorm

C = 4


def _arrays(dtype=np.float32):
    rng = np.random.default_rng(0)
    pd = np.float32 if dtype == np.float16 else dtype
    x = rng.standard_normal((8, C, 5)).astype(dtype)
    weight = rng.uniform(0.5, 1.5, C).astype(pd)
    bias = np.array([0.3, -0.2, 0.1, -0.4], pd)  # a trained bias: some entries negative
    return x, weight, bias, rng.standard_normal(C).astype(pd), rng.uniform(0.5, 2, C).astype(pd)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_forward_infer_in_forward_train_order_raises(dtype):
    x, weight, bias, running_mean, running_var = _arrays(dtype)
    out = np.full_like(x, 7)
    with pytest.raises(ValueError, match=r"^bnorm: forward_infer: running_var must be >= 0, got -0.2 for channel 1 "
                                         r"\(forward_infer takes x, running_mean, running_var, weight, bias"):
        bnorm.forward_infer(x, weight, bias, running_mean, running_var, out=out)  # forward_train's order
    assert (out == 7).all()
    y = bnorm.forward_infer(x, running_mean, running_var, weight, bias)
    assert np.isfinite(y).all()


@pytest.mark.parametrize("bad", [-1e-30, -1.0, -np.inf])
def test_forward_train_refuses_a_negative_running_var(bad):
    x, weight, bias, running_mean, running_var = _arrays()
    running_var[2] = bad
    before = [a.copy() for a in (running_mean, running_var)]
    out = np.full_like(x, 7)
    with pytest.raises(ValueError, match=r"^bnorm: forward_train: running_var must be >= 0, got .* for channel 2$"):
        bnorm.forward_train(x, weight, bias, running_mean, running_var, out=out)
    assert (out == 7).all()
    np.testing.assert_array_equal(running_mean, before[0])
    np.testing.assert_array_equal(running_var, before[1])


def test_negative_zero_is_a_variance():
    x, weight, bias, running_mean, running_var = _arrays()
    running_var[0] = -0.0
    assert np.isfinite(bnorm.forward_infer(x, running_mean, running_var, weight, bias)).all()
    bnorm.forward_train(x, weight, bias, running_mean, running_var)


def test_nan_running_var_propagates_to_its_channel_only():
    x, weight, bias, running_mean, running_var = _arrays()
    running_var[1] = np.nan
    y = bnorm.forward_infer(x, running_mean, running_var, weight, bias)
    assert np.isnan(y[:, 1]).all()
    assert np.isfinite(np.delete(y, 1, axis=1)).all()


def test_layer_eval_and_load_state_dict_refuse_a_negative_running_var():
    x = _arrays()[0]
    bn = bnorm.BatchNorm(C).eval()
    bn.running_var[3] = -2.0
    with pytest.raises(ValueError, match=r"running_var must be >= 0, got -2(\.0)? for channel 3"):
        bn(x)
    bn = bnorm.BatchNorm(C)
    state = bn.state_dict()
    state["running_var"] = np.array([1, 1, -3, 1], np.float32)
    with pytest.raises(ValueError, match=r"^bnorm: running_var must be >= 0, got -3.0 for channel 2$"):
        bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.running_var, np.ones(C, np.float32))


def _layers():
    """The training paths that update running_var in Python rather than in the kernels."""
    from bnorm.distributed import LocalComm, SyncBatchNorm

    return {
        "ghost": bnorm.BatchNorm(C, virtual_batch_size=4),
        "renorm": bnorm.BatchRenorm(C),
        "sync": SyncBatchNorm(C, LocalComm()),
    }


@pytest.mark.parametrize("name", ["ghost", "renorm", "sync"])
def test_python_side_running_updates_refuse_a_negative_running_var(name):
    x = _arrays()[0]
    bn = _layers()[name]
    bn.running_var[1] = -0.5
    state = {k: np.array(v, copy=True) for k, v in bn.state_dict().items()}
    with pytest.raises(ValueError, match=r"^bnorm: (forward_train: )?running_var must be >= 0, got -0.5 for channel 1$"):
        bn(x)
    for key, value in bn.state_dict().items():  # nothing written
        np.testing.assert_array_equal(value, state[key])
    bn.running_var[1] = np.nan  # NaN passes (to its channel), as in the kernels
    bn(x)
