"""The plain-call fast path (_functional._plain) against the general path.

forward_train, forward_infer and backward check plain NumPy calls in a few microseconds
and call _core at once; everything else takes the general path (_Call). The fast path must
accept only what the general path passes to _core unchanged: for every variant of
arguments below, a call gives the same result, or the same exception, with the fast path
as with it switched off, and leaves the caller's arrays in the same state.
"""

import numpy as np
import pytest

import bnorm
from bnorm import _functional

try:
    import ml_dtypes

    DTYPES = [np.float32, np.float64, np.float16, ml_dtypes.bfloat16]
except ImportError:  # bfloat16 needs ml_dtypes (test_bfloat16.py checks the error without)
    DTYPES = [np.float32, np.float64, np.float16]

SHAPE = (6, 5, 3)
C = SHAPE[1]


def _inputs(dtype=np.float32):
    rng = np.random.default_rng(7)
    param = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    return dict(
        x=rng.standard_normal(SHAPE).astype(dtype),
        dy=rng.standard_normal(SHAPE).astype(dtype),
        residual=rng.standard_normal(SHAPE).astype(dtype),
        weight=rng.uniform(0.5, 1.5, C).astype(param),
        bias=rng.normal(0, 0.1, C).astype(param),
        mean=rng.normal(0, 0.1, C).astype(param),
        var=rng.uniform(0.5, 1.5, C).astype(param),
        out=np.zeros(SHAPE, dtype),
    )


def _unowned_view(a):
    """a's values in an array that does not own its memory."""
    return np.ascontiguousarray(a).reshape(-1).reshape(a.shape)


# Each variant edits the argument dict a: the arrays of a call, built from _inputs.
VARIANTS = {
    "plain": lambda a: None,
    "out_none": lambda a: a.update(out=None),
    "out_is_x": lambda a: a.update(out=a["x"]),
    "out_view": lambda a: a.update(out=_unowned_view(a["out"])),
    "out_readonly": lambda a: a["out"].setflags(write=False),
    "out_fortran": lambda a: a.update(out=np.asfortranarray(a["out"])),
    "out_float64": lambda a: a.update(out=a["out"].astype(np.float64)),
    "out_wrong_shape": lambda a: a.update(out=np.zeros((6, 5, 4), a["out"].dtype)),
    "out_overlaps_x": lambda a: a.update(out=_unowned_view(a["x"])),
    "out_overlaps_x_partly": lambda a: _out_shifted_over_x(a),
    "x_views_out": lambda a: a.update(x=_filled_view(a["out"], a["x"])),
    "dy_views_out": lambda a: a.update(dy=_filled_view(a["out"], a["dy"])),
    "residual_views_out": lambda a: a.update(with_residual=True, residual=_filled_view(a["out"], a["residual"])),
    "x_views_weight": lambda a: _weight_inside_x(a),
    "x_view": lambda a: a.update(x=_unowned_view(a["x"])),
    "x_fortran": lambda a: a.update(x=np.asfortranarray(a["x"])),
    "x_list": lambda a: a.update(x=a["x"].tolist()),
    "x_int": lambda a: a.update(x=a["x"].astype(np.int32)),
    "x_1d": lambda a: a.update(x=a["x"].reshape(-1)),
    "x_big_endian": lambda a: a.update(x=a["x"].astype(a["x"].dtype.newbyteorder(">"))),
    "weight_view": lambda a: a.update(weight=_unowned_view(a["weight"])),
    "weight_strided": lambda a: a.update(weight=np.repeat(a["weight"], 2)[::2]),
    "weight_float64": lambda a: a.update(weight=a["weight"].astype(np.float64)),
    "weight_wrong_shape": lambda a: a.update(weight=np.ones(C + 1, a["weight"].dtype)),
    "weight_none": lambda a: a.update(weight=None, bias=None),
    "weight_list": lambda a: a.update(weight=a["weight"].tolist()),
    "mean_none": lambda a: a.update(mean=None),
    "mean_is_var": lambda a: a.update(var=a["mean"]),
    "var_readonly": lambda a: a["var"].setflags(write=False),
    "var_view": lambda a: a.update(var=_unowned_view(a["var"])),
    "out_is_weight_memory": lambda a: _weight_inside_out(a),
    "residual": lambda a: a.update(with_residual=True),
    "residual_is_out": lambda a: a.update(with_residual=True, residual=a["out"]),
    "residual_view": lambda a: a.update(with_residual=True, residual=_unowned_view(a["residual"])),
    "residual_float64": lambda a: a.update(with_residual=True, residual=a["residual"].astype(np.float64)),
    "relu": lambda a: a.update(activation="relu"),
    "activation_bad": lambda a: a.update(activation="gelu"),
    "activation_bytes": lambda a: a.update(activation=b"relu"),
    "axis_neg": lambda a: a.update(axis=-2),
    "axis_bad": lambda a: a.update(axis=3),
    "axis_bool": lambda a: a.update(axis=True),
    "axis_np_int": lambda a: a.update(axis=np.int64(1)),
    "eps_int": lambda a: a.update(eps=1),
    "eps_negative": lambda a: a.update(eps=-1.0),
    "eps_str": lambda a: a.update(eps="1e-5"),
    "momentum_bad": lambda a: a.update(momentum=1.5),
    "momentum_np": lambda a: a.update(momentum=np.float32(0.25)),
    "unbiased_false": lambda a: a.update(unbiased=False),
    "unbiased_int": lambda a: a.update(unbiased=1),
    "batch_stats_false": lambda a: a.update(batch_stats=False),
    "batch_stats_np": lambda a: a.update(batch_stats=np.bool_(True)),
    "dy_view": lambda a: a.update(dy=_unowned_view(a["dy"])),
    "dy_is_out": lambda a: a.update(out=a["dy"]),
    "dy_none": lambda a: a.update(dy=None),
    "stream": lambda a: a.update(stream=0),
}


def _out_shifted_over_x(a):
    buffer = np.zeros(a["x"].size + 1, a["x"].dtype)
    buffer[: a["x"].size] = a["x"].reshape(-1)
    a["x"] = buffer[: a["x"].size].reshape(SHAPE)
    a["out"] = buffer[1:].reshape(SHAPE)


def _filled_view(out, values):
    """A view of all of out's memory (not out itself), holding values."""
    out[...] = values
    return out.reshape(-1).reshape(out.shape)


def _weight_inside_x(a):
    a["weight"] = a["x"].reshape(-1)[:C]


def _weight_inside_out(a):
    a["weight"] = a["out"].reshape(-1)[:C]


def _call(op, a):
    """op on the arguments a (after a variant edited them)."""
    kw = dict(axis=a.get("axis", 1), out=a["out"])
    if "stream" in a:
        kw["stream"] = a["stream"]
    if op == "forward_infer":
        return bnorm.forward_infer(
            a["x"], a["mean"], a["var"], a["weight"], a["bias"], eps=a.get("eps", 1e-5),
            residual=a["residual"] if a.get("with_residual") else None, activation=a.get("activation"), **kw,
        )
    if op == "forward_train":
        return bnorm.forward_train(
            a["x"], a["weight"], a["bias"], a["mean"], a["var"], eps=a.get("eps", 1e-5),
            momentum=a.get("momentum", 0.1), unbiased_running_var=a.get("unbiased", True),
            residual=a["residual"] if a.get("with_residual") else None, activation=a.get("activation"), **kw,
        )
    activation = a.get("activation")
    y = a["residual"] if activation is not None else None  # (any x-shaped array masks)
    invstd = a["var"]
    return bnorm.backward(
        a["dy"], a["x"], a["mean"], invstd, a["weight"], batch_stats=a.get("batch_stats", True),
        activation=activation, y=y, **kw,
    )


def _snapshot(a):
    return {k: (v.copy() if isinstance(v, np.ndarray) else v) for k, v in a.items()}


def _outcome(op, variant, dtype, monkeypatch, fast):
    a = _inputs(dtype)
    VARIANTS[variant](a)
    with monkeypatch.context() as m:
        if not fast:
            m.setattr(_functional, "_plain", lambda *args, **kwargs: None)
        try:
            result = _call(op, a)
        except Exception as e:  # noqa: BLE001 - the exception is the outcome compared
            return ("raised", type(e), str(e)), _snapshot(a)
    result = result if isinstance(result, tuple) else (result,)
    return ("returned", [np.asarray(r).copy() if r is not None else None for r in result]), _snapshot(a)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("op", ["forward_infer", "forward_train", "backward"])
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_fast_path_is_the_general_path(op, variant, dtype, monkeypatch):
    fast, fast_state = _outcome(op, variant, dtype, monkeypatch, fast=True)
    general, general_state = _outcome(op, variant, dtype, monkeypatch, fast=False)
    assert fast[0] == general[0], (fast, general)
    if fast[0] == "raised":
        assert fast[1:] == general[1:]
    else:
        assert len(fast[1]) == len(general[1])
        for f, g in zip(fast[1], general[1]):
            assert (f is None) == (g is None)
            if f is not None:
                assert f.dtype == g.dtype and f.shape == g.shape
                np.testing.assert_array_equal(f, g)  # bitwise: the same kernels
    assert fast_state.keys() == general_state.keys()
    for k in fast_state:
        f, g = fast_state[k], general_state[k]
        if isinstance(f, np.ndarray):
            np.testing.assert_array_equal(f, g, err_msg=f"{k} differs after the call")
        else:
            assert f == g or (f is g)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_plain_calls_take_the_fast_path(dtype, monkeypatch):
    """The calls a training loop makes (NumPy arrays, preallocated outputs) are plain
    (bfloat16 once bnorm has seen it: its dtype object comes from ml_dtypes)."""
    if np.dtype(dtype).name == "bfloat16":
        _functional._bfloat16()
    a = _inputs(dtype)
    taken = []
    plain = _functional._plain
    monkeypatch.setattr(_functional, "_plain", lambda *args, **kw: taken.append(plain(*args, **kw)) or taken[-1])
    monkeypatch.setattr(_functional, "_Call", None)  # the general path would fail
    y, mean, invstd = bnorm.forward_train(a["x"], a["weight"], a["bias"], a["mean"], a["var"], out=a["out"])
    bnorm.forward_infer(a["x"], a["mean"], a["var"], a["weight"], a["bias"])
    bnorm.backward(a["dy"], a["x"], mean, invstd, a["weight"], out=a["dy"])
    bnorm.backward(a["dy"], a["x"], mean, invstd, a["weight"], activation="relu", y=y)
    assert taken == [(6, 5, 3)] * 4
