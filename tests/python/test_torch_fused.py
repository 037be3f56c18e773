"""bnorm.torch's fused batch norm + residual add + ReLU (function, module, operator) against
relu(F.batch_norm(x) + z) computed by PyTorch, with autograd. Skipped when torch is missing."""

import pytest

torch = pytest.importorskip("torch", reason="bnorm.torch needs PyTorch (pip install torch)")
import torch.nn.functional as F  # noqa: E402

import bnorm.torch as bt  # noqa: E402

# every test on both eager paths: the C++ operator library and the Python one (conftest.py)
pytestmark = pytest.mark.usefixtures("torch_eager_path")

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-12)}


def _tensor(shape, seed, dtype=torch.float32, channels_last=False):
    t = torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)
    return t.contiguous(memory_format=torch.channels_last) if channels_last else t


def _params(c, dtype):
    g = torch.Generator().manual_seed(9)
    w, b, rm = (torch.randn(c, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    return w, b, rm, torch.rand(c, generator=g, dtype=torch.float64).to(dtype) + 0.5


def _reference(x, rm, rv, w, b, training, momentum, eps, residual, activation):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    y = y if residual is None else y + residual
    return torch.relu(y) if activation == "relu" else y


def _run(fn, x, z, params, training, activation, dy):
    x, w, b = (t.detach().clone().requires_grad_() for t in (x, *params[:2]))
    z = None if z is None else z.detach().clone().requires_grad_()
    rm, rv = params[2].clone(), params[3].clone()
    if fn is _reference:
        y = fn(x, rm, rv, w, b, training, 0.3, 1e-4, z, activation)
    else:
        y = fn(x, rm, rv, w, b, training, 0.3, 1e-4, residual=z, activation=activation)
    y.backward(dy)
    return {"y": y, "x.grad": x.grad, "w.grad": w.grad, "b.grad": b.grad,
            "z.grad": None if z is None else z.grad, "running_mean": rm, "running_var": rv}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "cl", "cl-x-nchw-z"])
@pytest.mark.parametrize("residual,activation", [(True, "relu"), (True, None), (False, "relu")],
                         ids=["add-relu", "add", "relu"])
def test_matches_torch_ops(residual, activation, layout, dtype, training):
    shape = (4, 5, 6, 3)
    x = _tensor(shape, 0, dtype, channels_last=layout != "nchw")
    z = _tensor(shape, 1, dtype, channels_last=layout == "cl") if residual else None
    dy = _tensor(shape, 2, dtype, channels_last=layout != "nchw")
    params = _params(shape[1], dtype)
    got = _run(bt.batch_norm, x, z, params, training, activation, dy)
    want = _run(_reference, x, z, params, training, activation, dy)
    for name in want:
        if want[name] is None:
            assert got[name] is None, name
            continue
        torch.testing.assert_close(got[name], want[name], **TOL[dtype], msg=name)
    if layout != "nchw":  # the output and the input gradient keep x's memory format
        assert got["y"].is_contiguous(memory_format=torch.channels_last)
        assert got["x.grad"].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("channels_last", [False, True], ids=["nchw", "cl"])
def test_gradcheck_float64(training, channels_last):
    # values away from 0 after the add: relu's kink makes finite differences meaningless there
    x = _tensor((3, 4, 3, 2), 0, torch.float64, channels_last).requires_grad_()
    z = (_tensor((3, 4, 3, 2), 1, torch.float64, channels_last) * 2).requires_grad_()
    w, b, rm, rv = _params(4, torch.float64)
    w.requires_grad_(), b.requires_grad_()

    def fn(x, w, b, z):
        return bt.batch_norm(x, rm.clone(), rv.clone(), w, b, training, residual=z, activation="relu")

    assert torch.autograd.gradcheck(fn, (x, w, b, z), eps=1e-7, atol=1e-6)


def test_op_path_matches_eager_path_and_opcheck():
    """The custom operator (what torch.compile and torch.export see) gives what the eager
    path gives, and passes torch.library's own checks with the fused arguments."""
    shape = (4, 3, 5, 6)
    x, z = _tensor(shape, 0, channels_last=True), _tensor(shape, 1)
    w, b, rm, rv = _params(3, torch.float32)
    eager = bt.batch_norm(x, rm.clone(), rv.clone(), w, b, True, residual=z, activation="relu")
    y, *_ = torch.ops.bnorm.batch_norm(x, w, b, rm, rv, True, 0.1, 1e-5, z, True)
    torch.testing.assert_close(y, eager, rtol=0, atol=0)
    for training in (True, False):
        torch.library.opcheck(torch.ops.bnorm.batch_norm.default, (x, w, b, rm, rv, training, 0.1, 1e-5, z, True))
    torch.library.opcheck(torch.ops.bnorm.batch_norm.default,
                          (x.requires_grad_(), w, b, None, None, True, 0.1, 1e-5, z.requires_grad_(), True))


class _Block(torch.nn.Module):
    """A ResNet BasicBlock; fused: bn2 with activation="relu" takes the identity."""

    def __init__(self, c, fused):
        super().__init__()
        self.fused = fused
        self.conv1, self.conv2 = (torch.nn.Conv2d(c, c, 3, padding=1, bias=False) for _ in range(2))
        self.bn1 = torch.nn.BatchNorm2d(c)
        self.bn2 = bt.BatchNorm2d(c, activation="relu") if fused else torch.nn.BatchNorm2d(c)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        if self.fused:
            return self.bn2(self.conv2(out), x)
        return torch.relu(self.bn2(self.conv2(out)) + x)


def _train(model, steps, memory_format):
    g = torch.Generator().manual_seed(3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 6, 8, 8, generator=g).contiguous(memory_format=memory_format)
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def _blocks(memory_format):
    torch.manual_seed(0)
    stock = _Block(6, fused=False)
    fused = _Block(6, fused=True)
    fused.load_state_dict(stock.state_dict())  # same keys: activation is no state
    return stock.to(memory_format=memory_format), fused.to(memory_format=memory_format)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_module_block_trains_like_stock(memory_format):
    stock, fused = _blocks(memory_format)
    want, got = _train(stock, 10, memory_format), _train(fused, 10, memory_format)
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-4 * max(1.0, abs(w)), (g, w)
    for key, value in stock.state_dict().items():
        torch.testing.assert_close(fused.state_dict()[key], value, rtol=1e-3, atol=1e-4, msg=key)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_torch_compile_fullgraph(memory_format):
    _, eager = _blocks(memory_format)
    _, compiled = _blocks(memory_format)
    torch._dynamo.reset()
    want = _train(eager, 3, memory_format)
    got = _train(torch.compile(compiled, fullgraph=True), 3, memory_format)
    for g, w in zip(got, want):
        assert abs(g - w) <= 1e-4 * max(1.0, abs(w)), (g, w)
    for key, value in eager.state_dict().items():
        torch.testing.assert_close(compiled.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
    assert torch._dynamo.explain(compiled)(torch.randn(2, 6, 8, 8)).graph_break_count == 0


def test_module_activation_and_convert():
    bn = bt.BatchNorm2d(3, activation="relu")
    assert "activation='relu'" in repr(bn)
    assert list(bn.state_dict()) == list(torch.nn.BatchNorm2d(3).state_dict())
    converted = bt.convert(torch.nn.Sequential(torch.nn.BatchNorm2d(3)))[0]
    assert converted.activation is None  # a converted module stays plain batch norm
    x = _tensor((4, 3, 2, 2), 0)
    assert (bn(x) >= 0).all() and (converted(x) < 0).any()
    with pytest.raises(ValueError, match="activation must be None or"):
        bt.BatchNorm2d(3, activation="gelu")


def test_errors():
    x = _tensor((4, 3, 2, 2), 0)
    with pytest.raises(ValueError, match="activation must be None or"):
        bt.batch_norm(x, None, None, training=True, activation="sigmoid")
    with pytest.raises(ValueError, match="residual must have input's shape"):
        bt.batch_norm(x, None, None, training=True, residual=x[:2])
    with pytest.raises(ValueError, match="residual must have input's shape"):
        bt.batch_norm(x, None, None, training=True, residual=x.double())
    with pytest.raises(TypeError, match="residual must be a torch.Tensor"):
        bt.batch_norm(x, None, None, training=True, residual=x.numpy())
