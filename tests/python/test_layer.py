"""The bnorm.BatchNorm layer against the float64 reference layer (PyTorch semantics):
training steps with parameter updates, then eval; momentum=None, track_running_stats=False,
affine=False, channels-last; state_dict / load_state_dict with PyTorch's keys."""

import numpy as np
import pytest

import bnorm
import reference as ref
from reference import assert_close

C = 5

CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="cumulative"),
    pytest.param({"momentum": 0.5, "eps": 1e-3}, id="momentum0.5-eps1e-3"),
    pytest.param({"momentum": 1.0}, id="momentum1"),
    pytest.param({"momentum": 0.0}, id="momentum0"),
    pytest.param({"track_running_stats": False}, id="untracked"),
    pytest.param({"affine": False}, id="noaffine"),
    pytest.param({"affine": False, "track_running_stats": False}, id="noaffine-untracked"),
    pytest.param({"axis": -1}, id="channels-last"),
    pytest.param({"axis": -1, "momentum": None}, id="channels-last-cumulative"),
]

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]


def _batches(rng, axis, dtype, sizes=(8, 5, 16, 3)):
    shapes = [(n, C, 6) if axis == 1 else (n, 4, 3, C) for n in sizes]
    return [(ref.make_x(rng, s, axis, dtype, loc=3.0), ref.make_dy(rng, s, dtype))
            for s in shapes]


def _make(config, dtype):
    bn = bnorm.BatchNorm(C, dtype=dtype, **config)
    return bn, ref.RefBatchNorm(C, **config)


def _check_state(bn, rb, dtype):
    t = ref.tol(dtype, "stat")
    if rb.affine:
        assert bn.weight.dtype == dtype and bn.bias.dtype == dtype
        assert_close(bn.weight, rb.weight, t, "weight")
        assert_close(bn.bias, rb.bias, t, "bias")
    else:
        assert bn.weight is None and bn.bias is None
    if rb.track_running_stats:
        assert bn.running_mean.dtype == dtype and bn.running_var.dtype == dtype
        assert_close(bn.running_mean, rb.running_mean, t, "running_mean")
        assert_close(bn.running_var, rb.running_var, t, "running_var")
        assert int(bn.num_batches_tracked) == rb.num_batches_tracked
    else:
        assert bn.running_mean is None and bn.running_var is None
        assert bn.num_batches_tracked is None


def _step(bn, rb, x, dy, dtype, lr=0.05):
    """Forward, backward, compare, then an SGD update of the layer's own arrays in place."""
    y, ry = bn(x), rb(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y, ry, ref.tol(dtype, "out"), "y")
    dx, rdx = bn.backward(dy), rb.backward(dy)
    assert dx.shape == x.shape and dx.dtype == x.dtype
    assert_close(dx, rdx, ref.tol(dtype, "out"), "dx")
    if rb.affine:
        assert_close(bn.grad_weight, rb.grad_weight, ref.tol(dtype, "stat"), "grad_weight")
        assert_close(bn.grad_bias, rb.grad_bias, ref.tol(dtype, "stat"), "grad_bias")
        bn.weight[...] -= lr * bn.grad_weight
        bn.bias[...] -= lr * bn.grad_bias
        rb.weight, rb.bias = bn.weight.astype(np.float64), bn.bias.astype(np.float64)
    _check_state(bn, rb, dtype)
    return y


def _train(bn, rb, batches, dtype):
    return [_step(bn, rb, x, dy, dtype) for x, dy in batches]


def test_initial_state():
    bn = bnorm.BatchNorm(4)
    assert bn.training
    assert bn.weight.dtype == np.float32 and bn.weight.shape == (4,)
    np.testing.assert_array_equal(bn.weight, 1)
    np.testing.assert_array_equal(bn.bias, 0)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    assert int(bn.num_batches_tracked) == 0
    bn.eval()
    assert not bn.training
    bn.train()
    assert bn.training
    bn.train(mode=False)
    assert not bn.training
    bn.train(True)
    assert bn.training


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_training_then_eval(rng, config, dtype):
    axis = config.get("axis", 1)
    bn, rb = _make(config, dtype)
    _check_state(bn, rb, dtype)
    _train(bn, rb, _batches(rng, axis, dtype), dtype)
    bn.eval()
    rb.eval()
    assert not bn.training
    frozen = (None if bn.running_mean is None
              else (bn.running_mean.copy(), bn.running_var.copy(), int(bn.num_batches_tracked)))
    _train(bn, rb, _batches(rng, axis, dtype, sizes=(4, 1, 7)), dtype)  # N=1 fine in eval
    if frozen is not None:  # eval never touches the running statistics
        ref.assert_bitwise(bn.running_mean, frozen[0], "running_mean changed in eval")
        ref.assert_bitwise(bn.running_var, frozen[1], "running_var changed in eval")
        assert int(bn.num_batches_tracked) == frozen[2]
    bn.train()
    rb.train()
    _train(bn, rb, _batches(rng, axis, dtype, sizes=(6,)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cumulative_average_momentum_none(rng, dtype):
    """momentum=None: running_mean is the plain average of the batch means so far."""
    bn = bnorm.BatchNorm(C, momentum=None, dtype=dtype)
    means, unbiased = [], []
    for x, _ in _batches(rng, 1, dtype, sizes=(4, 9, 2, 6, 3)):
        bn(x)
        m, mean, var = ref.batch_stats(x, 1)
        means.append(mean)
        unbiased.append(var * m / (m - 1))
        assert int(bn.num_batches_tracked) == len(means)
        t = ref.tol(dtype, "stat") * 4
        assert_close(bn.running_mean, np.mean(means, axis=0), t, "running_mean")
        # running_var starts at 1 but the first factor is 1/1: it is forgotten at once
        assert_close(bn.running_var, np.mean(unbiased, axis=0), t, "running_var")


def test_untracked_uses_batch_stats_in_eval(rng):
    bn = bnorm.BatchNorm(C, track_running_stats=False)
    bn.eval()
    x = ref.make_x(rng, (10, C, 4), 1, np.float32)
    y = bn(x)
    assert_close(y, ref.forward_train(x)[0], 1e-5, "eval output with batch statistics")


def test_layer_one_two_three_four():
    bn = bnorm.BatchNorm(1, momentum=1.0, dtype=np.float64)
    x = np.array([[1.0], [2.0], [3.0], [4.0]])
    y = bn(x)
    np.testing.assert_allclose(y, (x - 2.5) / np.sqrt(1.25 + 1e-5), rtol=1e-12)
    np.testing.assert_allclose(bn.running_mean, [2.5], rtol=1e-12)
    np.testing.assert_allclose(bn.running_var, [5.0 / 3.0], rtol=1e-12)


def test_layer_single_value_per_channel(rng):
    bn = bnorm.BatchNorm(3)
    x = np.ones((1, 3), np.float32)
    with pytest.raises(ValueError, match="^expected more than 1 value per channel when "
                                         "training, got input of shape"):
        bn(x)
    np.testing.assert_array_equal(bn.running_mean, 0)
    np.testing.assert_array_equal(bn.running_var, 1)
    bn.eval()
    np.testing.assert_allclose(bn(x), x / np.sqrt(1 + 1e-5), rtol=1e-6)
    # N == 1 with a spatial size is fine in training
    bn.train()
    x = ref.make_x(rng, (1, 3, 7), 1, np.float32)
    assert_close(bn(x), ref.forward_train(x)[0], 1e-5, "N=1, L=7")


def _expected_keys(config):
    keys = set()
    if config.get("affine", True):
        keys |= {"weight", "bias"}
    if config.get("track_running_stats", True):
        keys |= {"running_mean", "running_var", "num_batches_tracked"}
    return keys


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("config", CONFIGS)
def test_state_dict_roundtrip(rng, config, dtype):
    axis = config.get("axis", 1)
    bn, rb = _make(config, dtype)
    batches = _batches(rng, axis, dtype)
    _train(bn, rb, batches[:3], dtype)
    sd = bn.state_dict()
    assert set(sd) == _expected_keys(config)
    if "num_batches_tracked" in sd:
        assert int(np.asarray(sd["num_batches_tracked"])) == 3
    for k in ("weight", "bias", "running_mean", "running_var"):
        if k in sd:
            ref.assert_bitwise(np.asarray(sd[k]), getattr(bn, k), f"state_dict[{k!r}]")
    bn2 = bnorm.BatchNorm(C, dtype=dtype, **config)
    bn2.load_state_dict(sd)
    _check_state(bn2, rb, dtype)
    for k in sd:
        ref.assert_bitwise(np.asarray(getattr(bn2, k)), np.asarray(getattr(bn, k)),
                           f"loaded {k}")
    # both layers behave identically afterwards, in eval and in further training
    x, dy = batches[3]
    for mode in (False, True):
        bn.train(mode)
        bn2.train(mode)
        ref.assert_bitwise(bn2(x), bn(x), f"output after load, training={mode}")
        ref.assert_bitwise(bn2.backward(dy), bn.backward(dy), f"dx after load, training={mode}")
    for k in sd:
        ref.assert_bitwise(np.asarray(getattr(bn2, k)), np.asarray(getattr(bn, k)),
                           f"{k} after further training")


def test_load_state_dict_from_plain_arrays():
    """A state dict of NumPy arrays in PyTorch's form (num_batches_tracked a 0-d int64
    array, as torch's tensor.numpy() gives) loads."""
    sd = {"weight": np.arange(3, dtype=np.float32), "bias": np.full(3, 0.5, np.float32),
          "running_mean": np.array([1.0, 2.0, 3.0], np.float32),
          "running_var": np.array([4.0, 5.0, 6.0], np.float32),
          "num_batches_tracked": np.array(7, np.int64)}
    bn = bnorm.BatchNorm(3)
    bn.load_state_dict(sd)
    for k in ("weight", "bias", "running_mean", "running_var"):
        np.testing.assert_array_equal(getattr(bn, k), sd[k])
    assert int(bn.num_batches_tracked) == 7
    # the layer keeps its own copies
    sd["running_mean"][:] = 0
    np.testing.assert_array_equal(bn.running_mean, [1.0, 2.0, 3.0])
    bn.eval()
    x = np.ones((2, 3), np.float32)
    expect = ref.forward_infer(x, [1.0, 2.0, 3.0], [4.0, 5.0, 6.0], np.arange(3.0),
                               np.full(3, 0.5))
    assert_close(bn(x), expect, 1e-6, "eval output after load")


def test_layer_takes_lists_like_arrays():
    """A list goes through np.asarray before anything is computed or updated."""
    x = [[1.0, 2.0], [3.0, 5.0], [0.0, -1.0]]
    bn, expected = bnorm.BatchNorm(2, dtype=np.float64), bnorm.BatchNorm(2, dtype=np.float64)
    ref.assert_bitwise(bn(x), expected(np.array(x)), "y from a list")
    assert bn.num_batches_tracked == expected.num_batches_tracked == 1
    ref.assert_bitwise(bn.running_mean, expected.running_mean, "running_mean")
    ref.assert_bitwise(bn.backward(x), expected.backward(np.array(x)), "dx from a list")


@pytest.mark.parametrize("config", [{}, {"affine": False}, {"track_running_stats": False}],
                         ids=["default", "noaffine", "untracked"])
def test_layer_wrong_dtype_names_x_and_changes_nothing(config):
    bn = bnorm.BatchNorm(2, **config)  # float32 parameters: takes float32 and float16 x
    with pytest.raises(TypeError, match="x of dtype float16, bfloat16 or float32, got float64"):
        bn([[1.0, 2.0], [3.0, 5.0]])  # a float list is float64
    assert bn.num_batches_tracked in (0, None) and bn._saved is None
    assert bn(np.ones((3, 2), np.float16)).dtype == np.float16


def test_layer_without_parameters_takes_any_float_dtype():
    """As torch's: with neither affine parameters nor running buffers there is nothing
    the dtype of x must match."""
    bn = bnorm.BatchNorm(2, affine=False, track_running_stats=False)
    x = np.array([[1.0, 2.0], [3.0, 5.0]])
    assert_close(bn(x), ref.forward_train(x)[0], 1e-12, "float64 x, float32 layer")


@pytest.mark.parametrize("momentum", [0.1, None], ids=["momentum0.1", "cumulative"])
def test_layer_empty_batch_changes_no_buffer(rng, momentum):
    bn = bnorm.BatchNorm(3, momentum=momentum)
    bn(ref.make_x(rng, (4, 3, 2), 1, np.float32))
    before = bn.state_dict()
    y = bn(np.zeros((0, 3, 2), np.float32))
    assert y.shape == (0, 3, 2)
    for key, value in bn.state_dict().items():
        ref.assert_bitwise(np.asarray(value), np.asarray(before[key]), f"{key} after an empty batch")


@pytest.mark.parametrize("config", [{}, {"affine": False, "track_running_stats": False}],
                         ids=["default", "no-parameters"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_wrong_channel_count_names_x(config, training):
    """Even a layer without parameters is for num_features channels (PyTorch would run it)."""
    bn = bnorm.BatchNorm(4, **config).train(training)
    with pytest.raises(ValueError, match=r"x has 5 channels \(axis 1, shape \(2, 5\)\), expected num_features=4"):
        bn(np.ones((2, 5), np.float32))
    assert bn._saved is None


def test_layer_dtype_none_is_the_default():
    assert bnorm.BatchNorm(3, dtype=None).dtype == np.float32


@pytest.mark.parametrize("value,exc", [(-1, ValueError), (np.uint64(2**64 - 1), ValueError), (1.5, ValueError),
                                       (2**64, ValueError), (2**63, ValueError)],
                         ids=["negative", "uint64-max", "float", "int-2**64", "int-2**63"])
def test_load_state_dict_refuses_bad_num_batches_tracked(value, exc):
    bn = bnorm.BatchNorm(2, momentum=None)
    state = bn.state_dict()
    state["num_batches_tracked"] = value
    with pytest.raises(exc, match="num_batches_tracked"):
        bn.load_state_dict(state)
    assert bn.num_batches_tracked == 0


@pytest.mark.parametrize("key", ["weight", "bias", "running_mean", "running_var"])
def test_load_state_dict_into_a_read_only_vector_changes_nothing(key):
    """Every destination is checked before the first is written: no half-loaded state."""
    bn = bnorm.BatchNorm(3)
    getattr(bn, key).flags.writeable = False
    before = {k: np.array(v) for k, v in bn.state_dict().items()}
    state = {k: np.full(3, 7, np.float32) for k in ("weight", "bias", "running_mean", "running_var")}
    state["num_batches_tracked"] = 9
    with pytest.raises(ValueError, match=f"the layer's {key} is read-only"):
        bn.load_state_dict(state)
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_load_state_dict_needs_a_dict():
    with pytest.raises(TypeError, match="state must be a dict"):
        bnorm.BatchNorm(2).load_state_dict([1, 2])


def test_vectors_of_other_cpu_types_are_left_to_the_functions():
    """A parameter the user replaced by a CPU array of another framework or a list: NumPy
    calls pass it to the functions as before (taken, or refused with their TypeError)."""
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).random((4, 3)).astype(np.float32)
    bn = bnorm.BatchNorm(3)
    bn.weight = torch.ones(3)
    np.testing.assert_allclose(bn(x), bnorm.BatchNorm(3)(x), rtol=1e-6, atol=1e-6)
    assert isinstance(bn.weight, torch.Tensor)
    bn.weight = [1.0, 1.0, 1.0]
    with pytest.raises(TypeError, match="weight"):
        bn(x)


@pytest.mark.parametrize("layer", [lambda: bnorm.BatchNorm(3), lambda: bnorm.BatchNorm(3, virtual_batch_size=2),
                                   lambda: bnorm.BatchRenorm(3)], ids=["plain", "ghost", "renorm"])
def test_backward_after_a_failed_call_raises(rng, layer):
    """A call that raises leaves backward nothing to differentiate: never the gradient of
    an earlier call's input (silently the wrong shape or values)."""
    bn = layer()
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    bn(x)
    bn.eval()
    bn(x)  # (renorm: an eval call's saved state, then a failed training call)
    bn.train()
    with pytest.raises(ValueError):
        bn(x[:1, :, :1])  # one value per channel
    with pytest.raises(RuntimeError, match="before a successful forward call"):
        bn.backward(np.ones_like(x))
