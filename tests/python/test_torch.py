"""Cross-checks against PyTorch (CPU), run only when torch is importable."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import bnorm  # noqa: E402
import reference as ref  # noqa: E402
from reference import assert_close  # noqa: E402

DTYPES = [pytest.param(np.float32, id="float32"), pytest.param(np.float64, id="float64")]
LAYOUTS = [((8, 5), 1), ((6, 4, 9), 1), ((4, 3, 5, 6), 1), ((2, 3, 4, 3, 5), 1),
           ((4, 5, 6, 3), -1), ((3, 7, 4), -2)]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in LAYOUTS]


def _t(a, grad=False):
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.requires_grad_(True) if grad else t


def _to_torch_layout(x, axis):
    """torch wants channels at dim 1."""
    return np.moveaxis(x, axis, 1)


def _np(t):
    return t.detach().numpy()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("momentum", [0.1, 0.6])
def test_forward_train_vs_torch(rng, dtype, layout, momentum):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, dtype)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm0, rv0 = ref.make_params(rng, c, dtype)
    rm, rv = rm0.copy(), rv0.copy()
    eps = 1e-4
    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=momentum,
                                          eps=eps)
    trm, trv = _t(rm0.copy()), _t(rv0.copy())
    ty = F.batch_norm(_t(_to_torch_layout(x, axis)), trm, trv, _t(w), _t(b), training=True,
                      momentum=momentum, eps=eps)
    t = ref.TOL[np.dtype(dtype)]
    assert_close(y, np.moveaxis(_np(ty), 1, axis).astype(np.float64), t["out"], "y")
    assert_close(rm, _np(trm).astype(np.float64), t["stat"], "running_mean")
    assert_close(rv, _np(trv).astype(np.float64), t["stat"], "running_var")
    out, smean, sinvstd = torch.ops.aten.native_batch_norm(
        _t(_to_torch_layout(x, axis)), _t(w), _t(b), _t(rm0.copy()), _t(rv0.copy()), True,
        momentum, eps)
    assert_close(mean, _np(smean).astype(np.float64), t["stat"], "save_mean")
    assert_close(invstd, _np(sinvstd).astype(np.float64), t["stat"], "save_invstd")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
def test_forward_infer_vs_torch(rng, dtype, layout):
    shape, axis = layout
    x = ref.make_x(rng, shape, axis, dtype)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, dtype)
    y = bnorm.forward_infer(x, rm, rv, w, b, axis=axis, eps=1e-3)
    ty = F.batch_norm(_t(_to_torch_layout(x, axis)), _t(rm), _t(rv), _t(w), _t(b),
                      training=False, eps=1e-3)
    assert_close(y, np.moveaxis(_np(ty), 1, axis).astype(np.float64),
                 ref.tol(dtype, "out"), "y")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=LAYOUT_IDS)
@pytest.mark.parametrize("training", [True, False], ids=["batch", "fixed"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_backward_vs_autograd(rng, dtype, layout, training, affine):
    shape, axis = layout
    eps = 1e-5
    x = ref.make_x(rng, shape, axis, dtype)
    dy = ref.make_dy(rng, shape, dtype)
    c = shape[ref.norm_axis(len(shape), axis)]
    w, b, rm, rv = ref.make_params(rng, c, dtype)
    if not affine:  # autograd of the parameters at weight=1, bias=0
        w, b = np.ones(c, dtype), np.zeros(c, dtype)
    tx, tw, tb = _t(_to_torch_layout(x, axis), True), _t(w, True), _t(b, True)
    ty = F.batch_norm(tx, _t(rm.copy()), _t(rv.copy()), tw, tb, training=training, eps=eps)
    ty.backward(_t(_to_torch_layout(dy, axis)))
    if training:
        _, mean, invstd = bnorm.forward_train(x, axis=axis, eps=eps)
    else:
        mean, invstd = rm, (1 / np.sqrt(rv.astype(np.float64) + eps)).astype(dtype)
    dx, dw, db = bnorm.backward(dy, x, mean, invstd, w if affine else None, axis=axis,
                                batch_stats=training)
    t = ref.TOL[np.dtype(dtype)]
    assert_close(dx, np.moveaxis(_np(tx.grad), 1, axis).astype(np.float64), t["out"], "dx")
    assert_close(dw, _np(tw.grad).astype(np.float64), t["stat"], "dweight")
    assert_close(db, _np(tb.grad).astype(np.float64), t["stat"], "dbias")


def _torch_module(ndim, c, config, dtype):
    cls = {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
           5: torch.nn.BatchNorm3d}[ndim]
    kw = {k: v for k, v in config.items() if k != "axis"}
    return cls(c, **kw).to(torch.float64 if dtype == np.float64 else torch.float32)


LAYER_CONFIGS = [
    pytest.param({}, id="default"),
    pytest.param({"momentum": None}, id="cumulative"),
    pytest.param({"momentum": 0.3, "eps": 1e-3}, id="momentum0.3"),
    pytest.param({"track_running_stats": False}, id="untracked"),
    pytest.param({"affine": False}, id="noaffine"),
]
LAYER_SHAPES = [pytest.param((6, 4), id="1d-NC"), pytest.param((6, 4, 7), id="1d-NCL"),
                pytest.param((3, 4, 5, 6), id="2d"), pytest.param((2, 4, 3, 3, 4), id="3d")]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", LAYER_SHAPES)
@pytest.mark.parametrize("config", LAYER_CONFIGS)
def test_layer_vs_torch_module(rng, dtype, shape, config):
    c = shape[1]
    bn = bnorm.BatchNorm(c, dtype=dtype, **config)
    tm = _torch_module(len(shape), c, config, dtype)
    t = ref.TOL[np.dtype(dtype)]
    lr = 0.1

    def step(n):
        s = (n,) + shape[1:]
        x, dy = ref.make_x(rng, s, 1, dtype, loc=3.0), ref.make_dy(rng, s, dtype)
        tx = _t(x, True)
        ty = tm(tx)
        ty.backward(_t(dy))
        y = bn(x)
        dx = bn.backward(dy)
        assert_close(y, _np(ty).astype(np.float64), t["out"], "y")
        assert_close(dx, _np(tx.grad).astype(np.float64), t["out"], "dx")
        if tm.affine:
            assert_close(bn.grad_weight, _np(tm.weight.grad).astype(np.float64), t["stat"],
                         "grad_weight")
            assert_close(bn.grad_bias, _np(tm.bias.grad).astype(np.float64), t["stat"],
                         "grad_bias")
            bn.weight[...] -= lr * bn.grad_weight
            bn.bias[...] -= lr * bn.grad_bias
            with torch.no_grad():  # keep the two exactly in sync
                tm.weight.copy_(torch.from_numpy(bn.weight.copy()))
                tm.bias.copy_(torch.from_numpy(bn.bias.copy()))
                tm.weight.grad = tm.bias.grad = None
        if tm.track_running_stats:
            assert_close(bn.running_mean, _np(tm.running_mean).astype(np.float64), t["stat"],
                         "running_mean")
            assert_close(bn.running_var, _np(tm.running_var).astype(np.float64), t["stat"],
                         "running_var")
            assert int(bn.num_batches_tracked) == int(tm.num_batches_tracked)

    for n in (5, 8, 3):
        step(n)
    bn.eval()
    tm.eval()
    for n in (4, 2):
        step(n)

    # state_dict round trip, both ways
    sd = bn.state_dict()
    tsd = tm.state_dict()
    assert set(sd) == set(tsd)
    tm2 = _torch_module(len(shape), c, config, dtype)
    tm2.load_state_dict({k: torch.as_tensor(np.array(v)) for k, v in sd.items()})
    bn2 = bnorm.BatchNorm(c, dtype=dtype, **config)
    bn2.load_state_dict({k: v.numpy() for k, v in tsd.items()})
    for k in sd:
        np.testing.assert_array_equal(np.asarray(sd[k]), tm2.state_dict()[k].numpy(),
                                      err_msg=f"torch loaded {k}")
        np.testing.assert_array_equal(np.asarray(getattr(bn2, k)), tsd[k].numpy(),
                                      err_msg=f"bnorm loaded {k}")
    tm2.eval()
    bn2.eval()
    x = ref.make_x(rng, shape, 1, dtype)
    assert_close(bn2(x), _np(tm2(_t(x))).astype(np.float64), t["out"], "eval after load")


def test_channels_last_layer_vs_torch_2d(rng):
    """bnorm on NHWC arrays with axis=-1 equals torch's BatchNorm2d on the NCHW view."""
    c = 6
    bn = bnorm.BatchNorm(c, axis=-1)
    tm = torch.nn.BatchNorm2d(c)
    for n in (4, 2, 7):
        x = ref.make_x(rng, (n, 5, 5, c), -1, np.float32)
        y = bn(x)
        ty = tm(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))))
        assert_close(y, _np(ty).transpose(0, 2, 3, 1).astype(np.float64), 1e-5, "y")
    assert_close(bn.running_mean, _np(tm.running_mean).astype(np.float64), 1e-5, "rm")
    assert_close(bn.running_var, _np(tm.running_var).astype(np.float64), 1e-5, "rv")


def test_torch_scalars_for_eps_momentum_and_batch_stats():
    """0-d tensors work where numbers do, as they did through float() and bool()."""
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    expected = bnorm.forward_train(x, eps=1e-3, momentum=0.5)
    got = bnorm.forward_train(x, eps=torch.tensor(1e-3, dtype=torch.float64), momentum=torch.tensor(0.5))
    for g, e in zip(got, expected):
        ref.assert_bitwise(g, e, "0-d tensor scalars")
    _, mean, invstd = expected
    for flag in (True, False):
        want = bnorm.backward(x, x, mean, invstd, batch_stats=flag)
        for given in (np.array(flag), torch.tensor(flag), np.bool_(flag)):
            for g, e in zip(bnorm.backward(x, x, mean, invstd, batch_stats=given), want):
                ref.assert_bitwise(g, e, f"batch_stats={given!r}")
