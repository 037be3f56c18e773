"""bnorm.torch: the custom operator, the modules and convert() against PyTorch's own batch
norm (CPU). Skipped, with the reason, when torch is not installed."""

import copy
import io
import os

import pytest

torch = pytest.importorskip("torch", reason="bnorm.torch needs PyTorch (pip install torch)")
import torch.nn.functional as F  # noqa: E402

import bnorm.torch as bt  # noqa: E402

# every test on both eager paths: the C++ operator library and the Python one (conftest.py)
pytestmark = pytest.mark.usefixtures("torch_eager_path")

CL = {4: torch.channels_last, 5: torch.channels_last_3d}
# (shape, memory format): NCHW and channels_last, 1d (N, C) and (N, C, L), 3d both formats
CASES = [((8, 5), None), ((6, 4, 9), None), ((4, 3, 5, 6), None), ((4, 3, 5, 6), "cl"),
         ((2, 3, 4, 3, 5), None), ((2, 3, 4, 3, 5), "cl"), ((4, 3, 5, 6), "strided")]
CASE_IDS = ["x".join(map(str, s)) + (f"-{f}" if f else "") for s, f in CASES]
# float32 rounding: bnorm and PyTorch sum in different orders
TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12),
       torch.float16: dict(rtol=1e-2, atol=1e-2)}


def _input(shape, fmt, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 1).to(dtype)
    if fmt == "cl":
        x = x.contiguous(memory_format=CL[len(shape)])
    elif fmt == "strided":  # neither contiguous nor channels-last: copied to contiguous
        x = torch.cat([x, x], dim=-1)[..., ::2]
    return x


def _params(c, dtype, seed=1):
    g = torch.Generator().manual_seed(seed)
    w, b, rm = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    rv = torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5
    return w, b, rm, rv


def _run(fn, x, w, b, rm, rv, training, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, w, b))
    rm, rv = rm.clone(), rv.clone()
    y = fn(x, rm, rv, w, b, training=training, momentum=0.3, eps=1e-4)
    y.backward(dy)
    return y, x.grad, w.grad, b.grad, rm, rv


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16], ids=str)
@pytest.mark.parametrize("shape,fmt", CASES, ids=CASE_IDS)
def test_matches_torch(shape, fmt, dtype, training):
    x = _input(shape, fmt, dtype)
    pdtype = torch.float32 if dtype == torch.float16 else dtype
    params = _params(shape[1], pdtype)
    dy = _input(shape, fmt, dtype, seed=2)
    got = _run(bt.batch_norm, x, *params, training, dy)
    want = _run(F.batch_norm, x, *params, training, dy)
    names = ["y", "grad_input", "grad_weight", "grad_bias", "running_mean", "running_var"]
    for name, g, w in zip(names, got, want):
        assert g.dtype == w.dtype, name
        torch.testing.assert_close(g, w, **TOL[dtype if name in ("y", "grad_input") else pdtype], msg=name)
    # y and grad_input keep the input's memory format, as PyTorch's do
    if fmt == "cl":
        assert got[0].is_contiguous(memory_format=CL[len(shape)])
        assert got[1].is_contiguous(memory_format=CL[len(shape)])


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("fmt", [None, "cl"])
def test_gradcheck_float64(training, fmt):
    x = _input((3, 4, 3, 2), fmt, torch.float64).requires_grad_()
    w, b, rm, rv = _params(4, torch.float64)
    w.requires_grad_(), b.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x, w, b: bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training=training), (x, w, b))


def test_gradcheck_without_affine_or_running_stats():
    x = _input((5, 3, 4), None, torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda x: bt.batch_norm(x, None, None, training=True), (x,))


def test_opcheck():
    """torch.library's own check of the op: schema, fake (meta) function, autograd."""
    x = _input((4, 3, 5, 6), "cl", torch.float32)
    w, b, rm, rv = _params(3, torch.float32)
    for training in (True, False):
        torch.library.opcheck(torch.ops.bnorm.batch_norm.default, (x, w, b, rm, rv, training, 0.1, 1e-5))
    torch.library.opcheck(torch.ops.bnorm.batch_norm.default, (x.requires_grad_(), w, None, None, None, True, 0.1, 1e-5))


def test_double_backward_refused():
    x = _input((4, 3, 5), None, torch.float64).requires_grad_()
    y = bt.batch_norm(x, None, None, training=True)
    (g,) = torch.autograd.grad((y ** 3).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="does not support double backward"):
        g.sum().backward()


def test_errors():
    x = _input((4, 3), None)
    with pytest.raises(ValueError, match="required when training=False"):
        bt.batch_norm(x, None, None, training=False)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        bt.batch_norm(torch.zeros(3), None, None, training=True)
    for shape in ((1, 3), (1, 3, 1, 1)):  # (the message names the input's shape, as PyTorch's)
        with pytest.raises(ValueError, match=rf"more than 1 value per channel when training, got input of shape "
                                             rf"\({shape[0]}, 3"):
            bt.batch_norm(torch.zeros(shape), None, None, training=True)
    with pytest.raises(TypeError, match="input must be one of"):
        bt.batch_norm(torch.zeros(4, 3, dtype=torch.int32), None, None, training=True)
    with pytest.raises(TypeError, match="float16, float32, float64 on cpu, got torch.bfloat16"):
        bt.batch_norm(torch.zeros(4, 3, dtype=torch.bfloat16), None, None, training=True)
    with pytest.raises(TypeError, match="torch.Tensor"):
        bt.batch_norm([[1.0, 2.0]], None, None, training=True)


def test_running_buffers_of_another_dtype_updated_in_place():
    """float16 buffers with float16 input: computed in float32, written back in place."""
    x = _input((8, 3, 4), None, torch.float16)
    rm, rv = torch.zeros(3, dtype=torch.float16), torch.ones(3, dtype=torch.float16)
    rm0, rv0 = rm.clone(), rv.clone()
    ref_m, ref_v = rm.clone(), rv.clone()
    F.batch_norm(x, ref_m, ref_v, training=True)
    address = rm.data_ptr()
    bt.batch_norm(x, rm, rv, training=True)
    assert rm.data_ptr() == address and rm.dtype == torch.float16
    assert not torch.equal(rm, rm0) and not torch.equal(rv, rv0)
    torch.testing.assert_close(rm, ref_m, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(rv, ref_v, rtol=1e-3, atol=1e-3)


def test_eager_path_updates_buffers_in_place():
    """Plain tensors in eager mode skip the custom operator: float32 running buffers are
    written in place (same memory, autograd's version counter bumped), as F.batch_norm does."""
    x = _input((8, 3, 4), None)
    rm, rv = torch.zeros(3), torch.ones(3)
    ref_m, ref_v = rm.clone(), rv.clone()
    F.batch_norm(x, ref_m, ref_v, training=True)
    addresses, versions = (rm.data_ptr(), rv.data_ptr()), (rm._version, rv._version)
    bt.batch_norm(x, rm, rv, training=True)
    assert (rm.data_ptr(), rv.data_ptr()) == addresses
    assert rm._version > versions[0] and rv._version > versions[1]
    torch.testing.assert_close(rm, ref_m, **TOL[torch.float32])
    torch.testing.assert_close(rv, ref_v, **TOL[torch.float32])


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("track", [True, False])
@pytest.mark.parametrize("cls,shape", [(torch.nn.BatchNorm1d, (6, 4, 5)), (torch.nn.BatchNorm2d, (4, 4, 3, 5)),
                                       (torch.nn.BatchNorm3d, (2, 4, 3, 2, 5))], ids=["1d", "2d", "3d"])
def test_modules_match_torch(cls, shape, track, momentum):
    bnorm_cls = getattr(bt, cls.__name__)
    stock = cls(4, momentum=momentum, track_running_stats=track)
    torch.nn.init.normal_(stock.weight)
    torch.nn.init.normal_(stock.bias)
    ours = bnorm_cls(4, momentum=momentum, track_running_stats=track)
    ours.load_state_dict(stock.state_dict())
    assert isinstance(ours, cls)
    assert list(ours.state_dict()) == list(stock.state_dict())
    for step in range(3):
        x = _input(shape, None, seed=step)
        for mod in (stock, ours):
            mod.zero_grad()
        ys = [mod(x) for mod in (stock, ours)]
        for y in ys:
            (y * y).sum().backward()
        torch.testing.assert_close(ys[1], ys[0], **TOL[torch.float32])
        torch.testing.assert_close(ours.weight.grad, stock.weight.grad, rtol=1e-4, atol=1e-4)
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, **TOL[torch.float32], msg=key)
    stock.eval(), ours.eval()
    x = _input(shape, None, seed=9)
    torch.testing.assert_close(ours(x), stock(x), **TOL[torch.float32])


def test_module_input_dim_checked():
    with pytest.raises(ValueError, match="expected 4D input"):
        bt.BatchNorm2d(3)(torch.zeros(2, 3, 4))


def _cnn(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Conv2d(8, 8, 3, padding=1, stride=2), torch.nn.BatchNorm2d(8), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 16), torch.nn.BatchNorm1d(16), torch.nn.ReLU(),
        torch.nn.Linear(16, 4))


def _train(model, steps, memory_format=torch.contiguous_format):
    g = torch.Generator().manual_seed(123)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 3, 8, 8, generator=g).contiguous(memory_format=memory_format)
        target = torch.randint(0, 4, (16,), generator=g)
        opt.zero_grad()
        loss = F.cross_entropy(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _assert_same_state(a, b, rtol, atol):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], rtol=rtol, atol=atol, msg=key)


def test_convert_keeps_state_and_mode():
    model = _cnn()
    model.train()
    model[4].eval()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    params = [id(p) for p in model.parameters()]
    state = copy.deepcopy(model.state_dict())
    assert bt.convert(model) is model
    assert [type(m) for m in bns] == [bt.BatchNorm2d, bt.BatchNorm2d, bt.BatchNorm1d]
    assert [id(p) for p in model.parameters()] == params
    assert not model[4].training and model[1].training
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_convert_leaves_other_modules():
    class MyBN(torch.nn.BatchNorm2d):
        pass

    sync = torch.nn.SyncBatchNorm(4)
    model = torch.nn.Sequential(torch.nn.BatchNorm2d(4), MyBN(4), sync, torch.nn.LayerNorm(4))
    bt.convert(model)
    assert [type(m) for m in model] == [bt.BatchNorm2d, MyBN, torch.nn.SyncBatchNorm, torch.nn.LayerNorm]
    lone = torch.nn.BatchNorm3d(2)
    assert bt.convert(lone) is lone and type(lone) is bt.BatchNorm3d
    with pytest.raises(TypeError, match="torch.nn.Module"):
        bt.convert("model")


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_cnn_training_matches_stock(memory_format):
    stock, ours = _cnn(), bt.convert(_cnn())
    stock, ours = stock.to(memory_format=memory_format), ours.to(memory_format=memory_format)
    got, want = _train(ours, 30, memory_format), _train(stock, 30, memory_format)
    for step, (g, w) in enumerate(zip(got, want)):
        assert abs(g - w) <= 1e-3 * max(1.0, abs(w)), (step, g, w)
    _assert_same_state(ours, stock, rtol=2e-3, atol=2e-4)
    stock.eval(), ours.eval()
    x = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(ours(x), stock(x), rtol=2e-3, atol=2e-4)


def test_state_dict_round_trip():
    stock = _cnn()
    _train(stock, 3)
    ours = bt.convert(_cnn(seed=5))
    buffer = io.BytesIO()
    torch.save(stock.state_dict(), buffer)
    buffer.seek(0)
    ours.load_state_dict(torch.load(buffer))
    _assert_same_state(ours, stock, 0, 0)
    back = _cnn(seed=9)
    back.load_state_dict(ours.state_dict())
    _assert_same_state(back, stock, 0, 0)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_torch_compile_fullgraph(memory_format):
    """The converted CNN under torch.compile(fullgraph=True): no graph break, same losses
    and running statistics as eager bnorm (channels_last: the fake op's strides match)."""
    eager = bt.convert(_cnn()).to(memory_format=memory_format)
    compiled = bt.convert(_cnn()).to(memory_format=memory_format)
    torch._dynamo.reset()
    compiled_fn = torch.compile(compiled, fullgraph=True)
    want = _train(eager, 3, memory_format)
    got = _train(compiled_fn, 3, memory_format)
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-4 * max(1.0, abs(w)), (g, w)
    _assert_same_state(compiled, eager, rtol=1e-4, atol=1e-5)
    explanation = torch._dynamo.explain(compiled)(torch.randn(4, 3, 8, 8))
    assert explanation.graph_break_count == 0


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_export_keeps_the_op(mode):
    model = bt.convert(_cnn())
    getattr(model, mode)()
    program = torch.export.export(copy.deepcopy(model), (torch.randn(4, 3, 8, 8),))
    targets = [str(node.target) for node in program.graph.nodes]
    assert targets.count("bnorm.batch_norm.default") == 3
    x = torch.randn(4, 3, 8, 8)
    torch.testing.assert_close(program.module()(x), copy.deepcopy(model)(x))


# ---- the C++ operator library (python/bnorm/_torch_ops.cpp) --------------------------------

@pytest.mark.parametrize("fmt", [None, "cl", "strided"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_cpp_and_python_paths_agree_bitwise(torch_eager_path, monkeypatch, dtype, relu, fmt):
    """The C++ operator runs the same kernels as the Python path: outputs, all gradients
    and the running buffers are bitwise equal (plain and fused, each layout)."""
    if torch_eager_path == "python":
        pytest.skip("compares the C++ path with the Python path")
    x = _input((4, 3, 5, 6), fmt, dtype)
    z = _input((4, 3, 5, 6), fmt, dtype, seed=2) if relu else None
    w, b, rm, rv = _params(3, torch.float32)
    dy = _input((4, 3, 5, 6), None, dtype, seed=3)

    def run():
        xs, ws, bs = (t.detach().clone().requires_grad_() for t in (x, w, b))
        zs = None if z is None else z.detach().clone().requires_grad_()
        m, v = rm.clone(), rv.clone()
        y = bt.batch_norm(xs, m, v, ws, bs, training=True, momentum=0.2, residual=zs,
                          activation="relu" if relu else None)
        y.backward(dy)
        return [y, xs.grad, ws.grad, bs.grad, m, v] + ([] if zs is None else [zs.grad])

    cpp = run()
    monkeypatch.setattr(bt, "_OPS", None)
    python = run()
    for a, e in zip(cpp, python):
        assert a.dtype == e.dtype and a.stride() == e.stride()
        assert torch.equal(a, e)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_inference_mode(training):
    """Under torch.inference_mode (no autograd keys), as F.batch_norm."""
    x = _input((4, 3, 5, 6), "cl")
    w, b, rm, rv = _params(3, torch.float32)
    m1, v1, m2, v2 = rm.clone(), rv.clone(), rm.clone(), rv.clone()
    with torch.inference_mode():
        y = bt.batch_norm(x, m1, v1, w, b, training=training)
        expected = F.batch_norm(x, m2, v2, w, b, training=training)
    torch.testing.assert_close(y, expected, **TOL[torch.float32])
    torch.testing.assert_close(m1, m2, **TOL[torch.float32])
    torch.testing.assert_close(v1, v2, **TOL[torch.float32])


def test_operator_library_of_another_torch_is_not_loaded(torch_eager_path, monkeypatch):
    """A library built for another torch release (its C++ ABI differs) is left alone, with a
    warning; BNORM_TORCH_OPS=0 turns it off."""
    if torch_eager_path == "python":
        pytest.skip("needs the operator library")
    if not os.path.exists(os.path.join(os.path.dirname(bt.__file__), "_torch_ops.so")):
        pytest.skip("the operator library was not built with bnorm (build_operator_library's cache)")
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    with pytest.warns(RuntimeWarning, match="built for torch .* this is torch 0.0.0"):
        assert bt._load_ops() is None
    monkeypatch.undo()
    monkeypatch.setenv("BNORM_TORCH_OPS", "0")
    assert bt._load_ops() is None


@pytest.mark.parametrize("epilogue", ["none", "residual", "residual+relu"])
@pytest.mark.parametrize("fmt", [None, "cl"])
def test_gradient_memory_reused_only_when_unshared(torch_eager_path, monkeypatch, fmt, epilogue):
    """The C++ backward writes grad_input (or, with relu and a residual, the residual's
    gradient) over grad_y when nothing else holds grad_y (here the fresh gradient of y * 3):
    results bitwise those of the Python path, and a gradient that someone kept
    (retain_grad, a hook, the caller's own tensor) is left intact."""
    if torch_eager_path == "python":
        pytest.skip("compares the C++ path with the Python path")
    x = _input((4, 3, 5, 6), fmt)
    z = _input((4, 3, 5, 6), fmt, seed=4) if epilogue != "none" else None
    w, b, rm, rv = _params(3, torch.float32)

    def run(keep):
        xs = x.detach().clone().requires_grad_()
        zs = None if z is None else z.detach().clone().requires_grad_()
        y = bt.batch_norm(xs, rm.clone(), rv.clone(), w, b, training=True, residual=zs,
                          activation="relu" if epilogue == "residual+relu" else None)
        kept = []
        if keep == "retain_grad":
            y.retain_grad()
        elif keep == "hook":
            y.register_hook(lambda g: kept.append(g))
        (y * 3).sum().backward()
        if keep == "retain_grad":
            kept.append(y.grad)
        return [xs.grad] + ([] if zs is None else [zs.grad]), kept

    for keep in (None, "retain_grad", "hook"):
        cpp_grads, kept = run(keep)
        for g in kept:  # the gradient at y: 3 everywhere, not grad_input
            assert torch.equal(g, torch.full_like(g, 3.0))
        with monkeypatch.context() as m:
            m.setattr(bt, "_OPS", None)
            python_grads, _ = run(keep)
        for a, e in zip(cpp_grads, python_grads):
            assert a.stride() == e.stride() and torch.equal(a, e)
    # the caller's gradient tensor
    xs = x.detach().clone().requires_grad_()
    dy = torch.randn(x.shape).contiguous(memory_format=x.dim() == 4 and fmt and torch.channels_last or torch.contiguous_format)
    dy0 = dy.clone()
    bt.batch_norm(xs, None, None, w, b, training=True).backward(dy)
    assert torch.equal(dy, dy0)


def test_bad_sizes_raise_and_modify_nothing():
    """Per-channel tensors of the wrong size, and batch statistics of one value per channel:
    ValueError on both eager paths, with the running buffers untouched."""
    x = _input((4, 3, 5), None)
    w, b, rm, rv = _params(3, torch.float32)
    rm0, rv0 = rm.clone(), rv.clone()
    for args in ((x, rm, rv, torch.ones(4), b), (x, rm, rv, w, torch.zeros(2)),
                 (x, torch.zeros(4), rv, w, b), (x[:1, :, :1], rm, rv, w, b)):
        with pytest.raises(ValueError):
            bt.batch_norm(*args, training=True)
        assert torch.equal(rm, rm0) and torch.equal(rv, rv0)
    with pytest.raises(ValueError):
        bt.batch_norm(x, rm, torch.ones(5), w, b, training=False)


def test_forward_mode_ad_refused():
    """Dual tensors (forward-mode AD): an error, never outputs without their tangents."""
    import torch.autograd.forward_ad as fwAD

    x = _input((4, 3, 5), None)
    with fwAD.dual_level():
        dual = fwAD.make_dual(x, torch.ones_like(x))
        with pytest.raises(RuntimeError):
            bt.batch_norm(dual, None, None, training=True)


@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "grad", "vjp", "jacrev", "mode-dual"])
def test_unsupported_transforms_refused(transform):
    """torch.func's gradient and forward-mode transforms, and dual tensors under a tensor
    mode (the operator path): a clear error, never zero or missing tangents (what torch
    2.13 gives for an operator without a forward rule) nor torch's internal message."""
    import torch.autograd.forward_ad as fwAD
    from torch.overrides import TorchFunctionMode

    x, t = _input((4, 3, 2, 2), None), _input((4, 3, 2, 2), None, seed=3)

    def f(x):
        return bt.batch_norm(x, None, None, training=True)

    class Passthrough(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    def mode_dual():
        with fwAD.dual_level(), Passthrough():
            return f(fwAD.make_dual(x, t))

    calls = {"jvp": lambda: torch.func.jvp(f, (x,), (t,)), "jacfwd": lambda: torch.func.jacfwd(f)(x),
             "grad": lambda: torch.func.grad(lambda x: f(x).pow(3).sum())(x),
             "vjp": lambda: torch.func.vjp(f, x), "jacrev": lambda: torch.func.jacrev(f)(x), "mode-dual": mode_dual}
    with pytest.raises(RuntimeError, match="bnorm.torch.batch_norm does not support"):
        calls[transform]()


def test_vmap_matches_a_loop():
    x = _input((2, 4, 3, 5), None)
    y = torch.func.vmap(lambda x: bt.batch_norm(x, None, None, training=True))(x)
    for i in range(2):
        torch.testing.assert_close(y[i], F.batch_norm(x[i], None, None, training=True))


def test_half_given_running_stats_refused():
    x = _input((4, 3, 5), None)
    for rm, rv in ((torch.zeros(3), None), (None, torch.ones(3))):
        with pytest.raises(ValueError, match="both be None or neither"):
            bt.batch_norm(x, rm, rv, training=True)


def test_saved_tensors_hooks_changing_layout():
    """The backward reads its saved tensors as they come back from saved_tensors_hooks
    (here re-laid out channels-last, and the weight as float64): same gradients."""
    x = _input((4, 3, 5, 6), None)
    w, b, _, _ = _params(3, torch.float32)
    dy = _input((4, 3, 5, 6), None, seed=5)

    def grads(hooked):
        xs, ws = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()

        def pack(t):
            if t.dim() == 4:
                return t.detach().contiguous(memory_format=torch.channels_last)
            return t.detach().double() if t.shape == ws.shape and t.dtype == torch.float32 and hooked == 2 else t
        if hooked:
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                y = bt.batch_norm(xs, None, None, ws, b, training=True, activation="relu")
        else:
            y = bt.batch_norm(xs, None, None, ws, b, training=True, activation="relu")
        y.backward(dy)
        return xs.grad, ws.grad

    expected = grads(0)
    for hooked in (1, 2):
        for a, e in zip(grads(hooked), expected):
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)


def test_gradient_reuse_happens(torch_eager_path):
    """On the C++ path the backward of a layer whose incoming gradient nobody else holds
    (here ReLU's) writes grad_input in that gradient's memory: the optimization is
    counted, not assumed; a gradient the caller holds is not reused."""
    if torch_eager_path == "python":
        pytest.skip("a C++ path optimization")
    import ctypes

    counter = ctypes.CDLL(bt._LOADED_LIBRARY).bnorm_torch_ops_reused_gradients
    counter.restype = ctypes.c_uint64
    xs = _input((4, 3, 5, 6), None).requires_grad_()
    before = counter()
    torch.relu(bt.batch_norm(xs, None, None, training=True)).sum().backward()
    assert counter() == before + 1
    y = bt.batch_norm(xs, None, None, training=True)
    dy = torch.ones_like(y)
    y.backward(dy)
    assert counter() == before + 1 and torch.equal(dy, torch.ones_like(y))
