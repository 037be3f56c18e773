"""Arguments that are no arrays of numbers (None, str, bytes, objects, ragged lists) get a
message naming the argument and what was passed, in every public function and the layer
(issue 15, item 4): not NumPy's dtype names ("got object", "got str96") nor its raw
"setting an array element with a sequence"."""

import re

import numpy as np
import pytest

import bnorm

C = 3


def _arrays():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, C, 5)).astype(np.float32)
    vec = lambda v: np.full(C, v, np.float32)  # noqa: E731
    return dict(x=x, dy=np.ones_like(x), weight=vec(1), bias=vec(0), running_mean=vec(0), running_var=vec(1),
                mean=vec(0), invstd=vec(1), sum_dy=vec(1), sum_dy_xhat=vec(1))


# (function, the array arguments it takes by name, in order; keyword-only ones after "*")
CALLS = {
    "forward_train": (bnorm.forward_train, ["x", "weight", "bias", "running_mean", "running_var"]),
    "forward_infer": (bnorm.forward_infer, ["x", "running_mean", "running_var", "weight", "bias"]),
    "backward": (bnorm.backward, ["dy", "x", "mean", "invstd", "weight"]),
    "batch_stats": (bnorm.batch_stats, ["x"]),
    "normalize": (bnorm.normalize, ["x", "mean", "invstd", "weight", "bias"]),
    "backward_reduce": (bnorm.backward_reduce, ["dy", "x", "mean", "invstd"]),
    "backward_elemt": (bnorm.backward_elemt, ["dy", "x", "mean", "invstd", "weight", "sum_dy", "sum_dy_xhat"]),
}
OPTIONAL = {"weight", "bias"}  # None is valid for these (and forward_train's running buffers)
BUFFERS = {"running_mean", "running_var"}  # forward_train updates them in place: NumPy arrays only

NOT_ARRAYS = [
    pytest.param(None, "NoneType", id="None"),
    pytest.param("abc", "str", id="str"),
    pytest.param(b"abcd", "bytes", id="bytes"),
    pytest.param(object(), "object", id="object"),
    pytest.param({"a": 1}, "dict", id="dict"),
    pytest.param(["a", "b", "c"], "list of <U1", id="list-of-str"),
]


def _call(fn, names, **over):
    a = _arrays()
    args = [over.get(n, a[n]) for n in names]
    extra = {"count": 20} if fn is bnorm.backward_elemt else {}
    return fn(*args, **extra)


def _cases():
    return [pytest.param(fn, names, name, id=f"{fname}-{name}")
            for fname, (fn, names) in CALLS.items() for name in names]


@pytest.mark.parametrize("fn, names, name", _cases())
@pytest.mark.parametrize("value, described", NOT_ARRAYS)
def test_non_array_argument_is_named_with_its_type(fn, names, name, value, described):
    buffer = fn is bnorm.forward_train and name in BUFFERS
    if value is None and (name in OPTIONAL or buffer):
        return  # a valid call: covered by the other tests
    if value is None and name not in ("x", "dy"):  # a required per-channel array
        exc, message = ValueError, f"{name} is required"
    elif buffer:
        exc, message = TypeError, f"{name} must be a NumPy array (it is updated in place), got {type(value).__name__}"
    else:
        exc, message = TypeError, f"{name} must be an array of numbers, got {described}"
    with pytest.raises(exc, match=f"^bnorm: {re.escape(message)}$"):
        _call(fn, names, **{name: value})


@pytest.mark.parametrize("fn, names, name", _cases())
def test_ragged_list_is_named(fn, names, name):
    if fn is bnorm.forward_train and name in BUFFERS:
        return  # refused as no NumPy array, above
    ragged = [[1.0, 2.0], [3.0]] if name in ("x", "dy") else [1.0, [2.0, 3.0], 4.0]
    with pytest.raises(ValueError, match=rf"^bnorm: {name} cannot be converted to a NumPy array \(.*sequence"):
        _call(fn, names, **{name: ragged})


@pytest.mark.parametrize("value, described", NOT_ARRAYS)
def test_merge_stats_non_arrays(value, described):
    parts = dict(counts=np.array([2, 3]), means=np.zeros((2, C)), vars=np.ones((2, C)))
    for name in parts:
        with pytest.raises(TypeError, match=rf"^bnorm: {name} must be an array of numbers, got {re.escape(described)}$"):
            bnorm.merge_stats(**dict(parts, **{name: value}))


def test_merge_stats_ragged():
    with pytest.raises(ValueError, match=r"^bnorm: means cannot be converted to a NumPy array"):
        bnorm.merge_stats([2, 3], [[0.0, 0.0], [0.0]], np.ones((2, 2)))


def test_string_arrays_are_described_by_their_dtype():
    with pytest.raises(TypeError, match=r"^bnorm: x must be one of float16, bfloat16, float32, float64, got <U3 \(str\)$"):
        bnorm.forward_train(np.array([["abc", "def"]]))
    with pytest.raises(TypeError, match=r"got \|S4 \(bytes\)$"):
        bnorm.forward_train(np.array([[b"abcd", b"efgh"]]))


@pytest.mark.parametrize("value, described", NOT_ARRAYS)
def test_layer_non_array_input(value, described):
    bn = bnorm.BatchNorm(C)
    with pytest.raises(TypeError, match=rf"^bnorm: x must be an array of numbers, got {re.escape(described)}$"):
        bn(value)
    bn(_arrays()["x"])
    with pytest.raises(TypeError, match=rf"^bnorm: dy must be an array of numbers, got {re.escape(described)}$"):
        bn.backward(value)


def test_layer_ragged_input():
    with pytest.raises(ValueError, match=r"^bnorm: x cannot be converted to a NumPy array"):
        bnorm.BatchNorm(2)([[1.0, 2.0], [3.0]])


@pytest.mark.parametrize("key", ["weight", "running_var", "num_batches_tracked"])
@pytest.mark.parametrize("value, described", NOT_ARRAYS)
def test_load_state_dict_non_arrays(key, value, described):
    bn = bnorm.BatchNorm(C)
    before = bn.state_dict()
    with pytest.raises(TypeError, match=rf"^bnorm: {key} must be an array of numbers, got {re.escape(described)}$"):
        bn.load_state_dict(dict(before, **{key: value}))
    for k, v in bn.state_dict().items():
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_parameter_that_requires_grad():
    torch = pytest.importorskip("torch")
    bn = bnorm.BatchNorm(C)
    state = dict(bn.state_dict(), weight=torch.nn.Parameter(torch.full((C,), 2.0)))
    with pytest.raises(TypeError, match=r"^bnorm: weight cannot be converted to a NumPy array \(RuntimeError: .*grad"):
        bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.weight, np.ones(C, np.float32))
    state["weight"] = state["weight"].detach()  # what the message's torch error suggests
    bn.load_state_dict(state)
    np.testing.assert_array_equal(bn.weight, np.full(C, 2.0, np.float32))
