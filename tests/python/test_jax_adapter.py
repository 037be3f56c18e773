"""bnorm.jax: the XLA FFI custom calls against a jax.numpy reference, gradients, jit, and a
small network trained with it. Skipped, with the reason, when jax is not installed."""

import numpy as np
import pytest

jax = pytest.importorskip("jax", reason="bnorm.jax needs JAX (pip install jax)")
import jax.numpy as jnp  # noqa: E402
from jax.test_util import check_grads  # noqa: E402

bj = pytest.importorskip("bnorm.jax", reason="this bnorm was built without its XLA FFI handlers")

# (shape, axis): NCHW, channels-last NHWC, (N, C), (N, C, L), NCDHW
LAYOUTS = [((4, 3, 5, 6), 1), ((4, 5, 6, 3), -1), ((8, 5), 1), ((6, 4, 9), 1), ((2, 3, 4, 3, 5), 1)]
LAYOUT_IDS = [f"{'x'.join(map(str, s))}-ax{a}" for s, a in LAYOUTS]


@pytest.fixture
def x64():
    with jax.enable_x64(True):
        yield


def reference(x, weight, bias, running_mean, running_var, training, axis=1, momentum=0.1, eps=1e-5):
    """Batch norm in jax.numpy (PyTorch's semantics), in float64 where jax_enable_x64 is on."""
    axis = axis % x.ndim
    axes = tuple(i for i in range(x.ndim) if i != axis)
    shape = [1] * x.ndim
    shape[axis] = -1
    x64 = x.astype(jax.dtypes.canonicalize_dtype(jnp.float64))
    if training:
        mean, var = x64.mean(axes), x64.var(axes)
        n = x.size // x.shape[axis]
        new_mean = (1 - momentum) * running_mean + momentum * mean
        new_var = (1 - momentum) * running_var + momentum * var * n / (n - 1)
    else:
        mean, var, new_mean, new_var = running_mean, running_var, running_mean, running_var
    y = (x64 - mean.reshape(shape)) / jnp.sqrt(var.reshape(shape) + eps) * weight.reshape(shape) + bias.reshape(shape)
    return y, new_mean, new_var


def _data(shape, axis, dtype, seed=0):
    c = shape[axis]
    rng = np.random.default_rng(seed)
    x = jnp.asarray(rng.normal(1.0, 2.0, shape), dtype)
    pdtype = "float32" if dtype == "float16" else dtype
    weight, bias, running_mean = (jnp.asarray(rng.normal(size=c), pdtype) for _ in range(3))
    running_var = jnp.asarray(rng.uniform(0.5, 1.5, c), pdtype)
    return x, weight, bias, running_mean, running_var


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("shape,axis", LAYOUTS, ids=LAYOUT_IDS)
def test_matches_reference_and_jit(x64, shape, axis, dtype, training):
    args = _data(shape, axis, dtype)
    got = bj.batch_norm(*args, training=training, axis=axis, momentum=0.3, eps=1e-4)
    want = reference(*args, training, axis=axis, momentum=0.3, eps=1e-4)
    tol = {"float16": 1e-2, "float32": 1e-5, "float64": 1e-12}[dtype]
    for name, g, w in zip(("y", "running_mean", "running_var"), got, want):
        assert g.dtype == (args[0].dtype if name == "y" else args[1].dtype), name
        np.testing.assert_allclose(np.asarray(g, np.float64), np.asarray(w), rtol=tol, atol=tol, err_msg=name)
    jitted = jax.jit(lambda *a: bj.batch_norm(*a, training=training, axis=axis, momentum=0.3, eps=1e-4))(*args)
    for g, j in zip(got, jitted):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(j))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_gradients(x64, shape, axis, training):
    x, weight, bias, running_mean, running_var = _data(shape, axis, "float64")

    def f(x, weight, bias):
        return bj.batch_norm(x, weight, bias, running_mean, running_var, training=training, axis=axis)[0]

    check_grads(f, (x, weight, bias), order=1, modes=("rev",))
    # and equal to the reference's gradients, under jit
    dy = jnp.asarray(np.random.default_rng(3).normal(size=shape))
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) * dy)  # noqa: E731
    ref = lambda x, w, b: reference(x, w, b, running_mean, running_var, training, axis=axis)[0]  # noqa: E731
    got = jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(x, weight, bias)
    want = jax.grad(loss(ref), argnums=(0, 1, 2))(x, weight, bias)
    for g, w in zip(got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12)


# Every input's gradient, the running statistics' included, for losses on y and on the
# returned statistics in any combination (a loss on y alone leaves the statistics'
# cotangents symbolic zeros, which skip their terms), against the reference, under jit.
@pytest.mark.parametrize("uses", [(1, 0, 0), (1, 1, 1), (0, 1, 0), (0, 0, 1)], ids=["y", "all", "mean", "var"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape,axis", LAYOUTS[:2], ids=LAYOUT_IDS[:2])
def test_gradients_of_every_input(x64, shape, axis, training, uses):
    args = _data(shape, axis, "float64")
    rng = np.random.default_rng(4)
    dy, dmean, dvar = (jnp.asarray(rng.normal(size=s)) for s in (shape, args[3].shape, args[3].shape))

    def loss(fn):
        def value(*a):
            y, new_mean, new_var = fn(*a)
            return uses[0] * jnp.sum(y * dy) + uses[1] * jnp.sum(new_mean * dmean) + uses[2] * jnp.sum(new_var * dvar)
        return value

    ours = lambda *a: bj.batch_norm(*a, training=training, axis=axis, momentum=0.3)  # noqa: E731
    ref = lambda *a: reference(*a, training, axis=axis, momentum=0.3)  # noqa: E731
    got = jax.jit(jax.grad(loss(ours), argnums=range(5)))(*args)
    want = jax.grad(loss(ref), argnums=range(5))(*args)
    for name, g, w in zip(("x", "weight", "bias", "running_mean", "running_var"), got, want):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-10, atol=1e-12, err_msg=name)
    check_grads(lambda *a: loss(ours)(*a), args, order=1, modes=("rev",))


def test_inputs_never_modified():
    x, weight, bias, running_mean, running_var = _data((4, 3, 5), 1, "float32")
    before = [np.array(a) for a in (x, running_mean, running_var)]
    for fn in (bj.batch_norm, jax.jit(bj.batch_norm, static_argnames=("training",))):
        fn(x, weight, bias, running_mean, running_var, training=True)
    for b, a in zip(before, (x, running_mean, running_var)):
        np.testing.assert_array_equal(b, np.asarray(a))


def test_no_affine_no_running_stats():
    x = _data((6, 4), 1, "float32")[0]
    y, rm, rv = bj.batch_norm(x, None, None, None, None, training=True)
    assert rm is None and rv is None
    ones, zeros = jnp.ones(4), jnp.zeros(4)
    want = reference(x, ones, zeros, zeros, ones, True)[0]
    np.testing.assert_allclose(np.asarray(y), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_calls_are_ffi_custom_calls():
    """Jitted code calls bnorm's handlers as XLA custom calls, not through a host callback."""
    args = _data((4, 3, 5), 1, "float32")
    step = jax.jit(jax.grad(lambda x, w, b, m, v: jnp.sum(bj.batch_norm(x, w, b, m, v, training=True)[0] ** 2),
                            argnums=(0, 1, 2)))
    text = step.lower(*args).as_text()
    assert "custom_call @bnorm_forward_train" in text and "custom_call @bnorm_backward" in text
    assert "callback" not in text


def test_errors():
    x, weight, bias, running_mean, running_var = _data((4, 3), 1, "float32")
    with pytest.raises(ValueError, match="required when training=False"):
        bj.batch_norm(x, weight, bias, None, None, training=False)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bj.batch_norm(x[:1], weight, bias, None, None, training=True)
    with pytest.raises(TypeError, match="weight must be float32"):
        bj.batch_norm(x, weight.astype(jnp.float16), bias, None, None, training=True)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        bj.batch_norm(x, weight[:2], bias, None, None, training=True)
    with pytest.raises(TypeError, match="x must be one of"):
        bj.batch_norm(x.astype(jnp.int32), None, None, None, None, training=True)
    with pytest.raises(ValueError, match="axis 2 is out of range"):
        bj.batch_norm(x, None, None, None, None, training=True, axis=2)
    with pytest.raises(ValueError, match="eps must be positive"):
        bj.batch_norm(x, None, None, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="both, or neither"):
        bj.batch_norm(x, None, None, running_mean, None, training=True)


def test_cnn_trains():
    """A plain-JAX CNN with bnorm's batch norm, trained a few jitted SGD steps: the loss falls,
    and it follows the same network with the jax.numpy reference batch norm step for step."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 3, 8, 8)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 4, 16))

    def init():
        r = np.random.default_rng(1)
        return {"conv": jnp.asarray(r.normal(0, 0.3, (8, 3, 3, 3)), jnp.float32),
                "gamma": jnp.ones(8), "beta": jnp.zeros(8),
                "dense": jnp.asarray(r.normal(0, 0.1, (8 * 8 * 8, 4)), jnp.float32)}

    def make_step(norm):
        def loss_fn(params, stats, x, labels):
            h = jax.lax.conv_general_dilated(x, params["conv"], (1, 1), "SAME")
            h, mean, var = norm(h, params["gamma"], params["beta"], *stats)
            logits = jax.nn.relu(h).reshape(x.shape[0], -1) @ params["dense"]
            loss = -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels])
            return loss, (mean, var)

        @jax.jit
        def step(params, stats, x, labels):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, labels)
            return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads), stats, loss
        return step

    def ref_norm(h, w, b, m, v):
        y, m, v = reference(h, w, b, m, v, True)
        return y.astype(h.dtype), m.astype(h.dtype), v.astype(h.dtype)

    runs = []
    for norm in (lambda *a: bj.batch_norm(*a, training=True), ref_norm):
        step, params, stats, losses = make_step(norm), init(), (jnp.zeros(8), jnp.ones(8)), []
        for _ in range(5):
            params, stats, loss = step(params, stats, x, labels)
            losses.append(float(loss))
        runs.append((losses, stats))
    (losses, stats), (ref_losses, ref_stats) = runs
    assert losses[-1] < losses[0]
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    for s, r in zip(stats, ref_stats):
        np.testing.assert_allclose(np.asarray(s), np.asarray(r), rtol=1e-4, atol=1e-5)


def test_vmap_normalizes_each_slice():
    x, weight, bias, running_mean, running_var = _data((3, 4, 2, 5), 1, "float32")
    f = lambda x: bj.batch_norm(x, weight[:2], bias[:2], running_mean[:2], running_var[:2], training=True)  # noqa: E731
    mapped = jax.vmap(f)(x)
    for i in range(x.shape[0]):
        for got, want in zip(mapped, f(x[i])):
            np.testing.assert_allclose(np.asarray(got[i]), np.asarray(want), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transform", ["hessian", "jvp", "jacfwd"])
def test_second_order_and_forward_mode_raise(transform):
    """First-order reverse mode only: the documented errors, never a wrong derivative."""
    x = jnp.arange(12.0, dtype=jnp.float32).reshape(4, 3)

    def f(x):
        return (bj.batch_norm(x, None, None, None, None, training=True)[0] ** 3).sum()

    calls = {"hessian": lambda: jax.hessian(f)(x), "jvp": lambda: jax.jvp(f, (x,), (x,)),
             "jacfwd": lambda: jax.jacfwd(f)(x)}
    with pytest.raises((ValueError, TypeError), match="cannot be differentiated|forward-mode autodiff"):
        calls[transform]()
