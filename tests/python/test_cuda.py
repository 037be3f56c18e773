"""The functional API on CUDA arrays (PyTorch, CuPy) against the CPU backend.

Device tests skip, with the reason shown, where no CUDA device or framework exists. The
dispatch tests at the top (which arrays go where, and the errors for the rest) run
everywhere: they need no device.
"""

import os
import subprocess
import sys

import numpy as np
import pytest

import bnorm


# --- dispatch, no device needed ------------------------------------------------------------

def _fake_device_array(device_type, module):
    """An object of `module` that says, through DLPack, that it lives on a device."""
    cls = type("FakeDeviceArray", (), {"__module__": module, "__dlpack_device__": lambda self: (device_type, 0)})
    return cls()


def test_stream_is_for_cuda_arrays_only():
    x = np.ones((4, 3), np.float32)
    with pytest.raises(ValueError, match="stream= applies to CUDA arrays only"):
        bnorm.forward_train(x, stream=0)


def test_unsupported_device_type_is_an_error():
    with pytest.raises(ValueError, match="unsupported device"):
        bnorm.batch_stats(_fake_device_array(14, "somelib"))  # kDLOneAPI


@pytest.mark.skipif(not bnorm.built_with_cuda, reason="bnorm built without CUDA")
def test_cuda_arrays_of_unknown_frameworks_are_refused():
    with pytest.raises(TypeError, match="not supported"):
        bnorm.batch_stats(_fake_device_array(2, "somelib"))


@pytest.mark.skipif(not bnorm.built_with_cuda, reason="bnorm built without CUDA")
@pytest.mark.parametrize("stream", [-1, 1.5, "0", True])
def test_bad_stream_handles_are_refused(stream):
    with pytest.raises(TypeError, match="stream must be an integer"):
        bnorm.batch_stats(_fake_device_array(2, "torch"), stream=stream)


def test_cuda_available_is_a_bool_without_raising():
    assert isinstance(bnorm.cuda_available(), bool)
    if not bnorm.built_with_cuda:
        assert bnorm.cuda_available() is False


# --- on a device -----------------------------------------------------------------------------

def _torch_cuda():
    try:
        import torch
    except ImportError:
        return None
    return torch if torch.cuda.is_available() else None


def _cupy():
    try:
        import cupy
        cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no cupy, or no driver/device
        return None
    return cupy


torch_cuda = _torch_cuda()
cupy = _cupy()
needs_gpu = pytest.mark.skipif(not bnorm.cuda_available(), reason="no usable CUDA device (bnorm.cuda_available() is False)")
needs_torch_cuda = pytest.mark.skipif(torch_cuda is None or not bnorm.cuda_available(),
                                      reason="needs PyTorch with CUDA and a CUDA device")
needs_cupy = pytest.mark.skipif(cupy is None or not bnorm.cuda_available(), reason="needs CuPy and a CUDA device")

LAYOUTS = [((8, 6, 5, 7), 1), ((8, 5, 7, 6), -1), ((64, 33), 1), ((3, 2, 4096), 1)]
TOL = {"float32": 2e-5, "float64": 1e-12, "float16": 2e-3, "bfloat16": 1.6e-2}  # bfloat16: 2 units in the last place


def _close(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    scale = max(1.0, float(np.max(np.abs(want)))) if want.size else 1.0
    assert float(np.max(np.abs(got - want), initial=0.0)) <= TOL[dtype] * scale


def _inputs(rng, dtype, shape, axis, loc):
    """x (mean about loc), dy, weight, bias, running_mean, running_var (host arrays) and the
    (to device, to host) copies for torch CUDA tensors."""
    npdtype = _ml_bfloat16() if dtype == "bfloat16" else dtype
    x = (loc + 2 * rng.standard_normal(shape)).astype(npdtype)
    dy = rng.standard_normal(shape).astype(npdtype)
    c = shape[axis]
    pdtype = _pdtype(dtype)
    w, b = rng.standard_normal(c).astype(pdtype), rng.standard_normal(c).astype(pdtype)
    rm, rv = np.zeros(c, pdtype), np.ones(c, pdtype)

    def dev(a):
        if a.dtype == npdtype and dtype == "bfloat16":  # (exact: every bfloat16 is a float32)
            return torch_cuda.from_numpy(a.astype(np.float32)).cuda().to(torch_cuda.bfloat16)
        return torch_cuda.from_numpy(a.copy()).cuda()

    def host(t):
        return (t.float() if t.dtype == torch_cuda.bfloat16 else t).cpu().numpy()

    return x, dy, w, b, rm, rv, dev, host


def _pdtype(dtype):
    return "float32" if dtype in ("float16", "bfloat16") else dtype


def _ml_bfloat16():
    return pytest.importorskip("ml_dtypes").bfloat16


@needs_torch_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_torch_cuda_matches_cpu(dtype, shape, axis):
    torch = torch_cuda
    x, dy, w, b, rm, rv, dev, host = _inputs(np.random.default_rng(0), dtype, shape, axis, 3.0)
    c = shape[axis]
    pdtype = _pdtype(dtype)

    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis)
    grm, grv = dev(np.zeros(c, pdtype)), dev(np.ones(c, pdtype))
    gy, gmean, ginvstd = bnorm.forward_train(dev(x), dev(w), dev(b), grm, grv, axis=axis)
    assert gy.is_cuda and gy.dtype == getattr(torch, dtype) and gmean.is_cuda
    for got, want in ((gy, y), (gmean, mean), (ginvstd, invstd), (grm, rm), (grv, rv)):
        _close(host(got), want, dtype)

    _close(host(bnorm.forward_infer(dev(x), dev(rm), dev(rv), dev(w), dev(b), axis=axis)),
           bnorm.forward_infer(x, rm, rv, w, b, axis=axis), dtype)
    for batch_stats in (True, False):
        want = bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=batch_stats)
        got = bnorm.backward(dev(dy), dev(x), dev(mean), dev(invstd), dev(w), axis=axis, batch_stats=batch_stats)
        for g, e in zip(got, want):
            _close(host(g), e, dtype)


@needs_torch_cuda
@pytest.mark.parametrize("dtype", ["float32", "float64", "float16", "bfloat16"])
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_torch_cuda_fused_epilogue_matches_cpu(dtype, shape, axis):
    """residual= and activation="relu" on CUDA arrays against the CPU backend: forward
    (training, inference, normalize), backward with dsum, and the split phases."""
    rng = np.random.default_rng(1)
    x, dy, w, b, rm, rv, dev, host = _inputs(rng, dtype, shape, axis, 1.0)
    z = rng.standard_normal(shape).astype(x.dtype)
    c = shape[axis]

    y, mean, invstd = bnorm.forward_train(x, w, b, axis=axis, residual=z, activation="relu")
    gy, gmean, ginvstd = bnorm.forward_train(dev(x), dev(w), dev(b), axis=axis, residual=dev(z), activation="relu")
    _close(host(gy), y, dtype)
    yi = bnorm.forward_infer(x, rm, rv, w, b, axis=axis, residual=z, activation="relu")
    _close(host(bnorm.forward_infer(dev(x), dev(rm), dev(rv), dev(w), dev(b), axis=axis, residual=dev(z),
                                    activation="relu")), yi, dtype)
    for batch_stats in (True, False):
        want = bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=batch_stats, activation="relu", y=y)
        got = bnorm.backward(dev(dy), dev(x), dev(mean), dev(invstd), dev(w), axis=axis, batch_stats=batch_stats,
                             activation="relu", y=dev(y))
        assert len(got) == 4
        for g, e in zip(got, want):
            _close(host(g), e, dtype)
    sums = bnorm.backward_reduce(dev(dy), dev(x), dev(mean), dev(invstd), axis=axis, activation="relu", y=dev(y))
    want = bnorm.backward_reduce(dy, x, mean, invstd, axis=axis, activation="relu", y=y)
    for g, e in zip(sums, want):
        _close(host(g), e, dtype)
    count = x.size // c
    gdx, gdsum = bnorm.backward_elemt(dev(dy), dev(x), dev(mean), dev(invstd), dev(w), *sums, count, axis=axis,
                                      activation="relu", y=dev(y))
    dx, dsum = bnorm.backward_elemt(dy, x, mean, invstd, w, *want, count, axis=axis, activation="relu", y=y)
    _close(host(gdx), dx, dtype)
    _close(host(gdsum), dsum, dtype)


@needs_torch_cuda
def test_torch_cuda_out_is_written_in_place_and_streams_are_used():
    torch = torch_cuda
    x = torch.randn(16, 8, 9, 9, device="cuda")
    out = torch.empty_like(x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        y, _, _ = bnorm.forward_train(x, out=out, stream=s.cuda_stream)
    s.synchronize()
    assert y.data_ptr() == out.data_ptr()  # no copy: bnorm wrote the caller's tensor
    ref, _, _ = bnorm.forward_train(x.cpu().numpy())
    _close(out.cpu().numpy(), ref, "float32")


@needs_torch_cuda
def test_torch_cuda_bfloat16():
    torch = torch_cuda
    x = torch.randn(32, 4, 7, 7, device="cuda").to(torch.bfloat16)
    y, mean, invstd = bnorm.forward_train(x)
    assert y.dtype == torch.bfloat16 and mean.dtype == torch.float32
    ref, _, _ = bnorm.forward_train(x.float().cpu().numpy())
    assert float((y.float().cpu() - torch.from_numpy(ref)).abs().max()) < 0.05


@needs_torch_cuda
def test_host_and_device_arrays_do_not_mix():
    torch = torch_cuda
    x = torch.randn(8, 3, device="cuda")
    with pytest.raises(ValueError, match="same framework and device"):
        bnorm.forward_train(x, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="same framework and device"):
        bnorm.forward_train(x, out=np.empty((8, 3), np.float32))


@needs_torch_cuda
def test_torch_cuda_errors_are_exceptions():
    torch = torch_cuda
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        bnorm.forward_train(torch.randn(1, 3, device="cuda"))
    with pytest.raises(TypeError):
        bnorm.forward_train(torch.ones(4, 3, dtype=torch.int32, device="cuda"))


@needs_torch_cuda
def test_torch_cuda_results_repeat_bitwise():
    torch = torch_cuda
    x = torch.randn(64, 32, 17, 17, device="cuda")
    a = bnorm.forward_train(x)
    b = bnorm.forward_train(x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@needs_cupy
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_cupy_matches_cpu(shape, axis):
    x = (3 + 2 * np.random.default_rng(1).standard_normal(shape)).astype(np.float32)
    y, mean, invstd = bnorm.forward_train(x, axis=axis)
    gy, gmean, ginvstd = bnorm.forward_train(cupy.asarray(x), axis=axis)
    assert isinstance(gy, cupy.ndarray)
    for got, want in ((gy, y), (gmean, mean), (ginvstd, invstd)):
        _close(cupy.asnumpy(got), want, "float32")
    n, m, v = bnorm.batch_stats(cupy.asarray(x), axis=axis)
    n2, m2, v2 = bnorm.batch_stats(x, axis=axis)
    assert n == n2
    _close(cupy.asnumpy(m), m2, "float32")
    _close(cupy.asnumpy(v), v2, "float32")


@needs_gpu
def test_more_than_2_31_elements_on_the_gpu():
    torch = torch_cuda
    if torch is None:
        pytest.skip("needs PyTorch with CUDA")
    free, _ = torch.cuda.mem_get_info()
    if free < 12 * 2**30:
        pytest.skip("needs 12 GiB of free GPU memory")
    x = torch.ones((2**31 + 2**20) // 2, 2, dtype=torch.float16, device="cuda")
    x[:, 1] = 3
    _, mean, var = bnorm.batch_stats(x)
    assert mean.cpu().tolist() == [1.0, 3.0] and var.cpu().tolist() == [0.0, 0.0]


def test_torch_backend_overlap_check_on_cpu_tensors():
    """The CUDA backends' partial-overlap test on raw addresses, checked where it can run
    here: _Torch's on CPU tensors (the same data_ptr arithmetic as on a GPU)."""
    torch = pytest.importorskip("torch")
    from bnorm._cuda import _Torch

    buf = torch.zeros(9, 4)
    a, b = buf[:-1], buf[1:]
    assert _Torch.overlaps_partly(a, b) and _Torch.overlaps_partly(b, a)
    assert not _Torch.overlaps_partly(a, buf[:-1])  # the same memory: out=x is allowed
    assert not _Torch.overlaps_partly(buf[:4], buf[4:8])  # adjacent, disjoint


@needs_torch_cuda
def test_torch_cuda_partial_overlap_and_array_counts():
    torch = torch_cuda
    buf = torch.randn(9, 4, device="cuda")
    with pytest.raises(ValueError, match="out overlaps x partly"):
        bnorm.forward_train(buf[:-1], out=buf[1:])
    x, dy = torch.randn(8, 4, 5, device="cuda"), torch.randn(8, 4, 5, device="cuda")
    _, mean, invstd = bnorm.forward_train(x)
    sums = bnorm.backward_reduce(dy, x, mean, invstd)
    want = bnorm.backward_elemt(dy, x, mean, invstd, None, *sums, 40)
    for count in (torch.tensor(40, device="cuda"), torch.full((4,), 40.0, dtype=torch.float64, device="cuda")):
        got = bnorm.backward_elemt(dy, x, mean, invstd, None, *sums, count)
        assert torch.equal(got, want)


def _jax_gpu():
    try:
        import jax

        return jax if jax.devices("gpu") else None
    except Exception:  # no jax, or no GPU platform
        return None


jax_gpu = _jax_gpu()
needs_jax_gpu = pytest.mark.skipif(jax_gpu is None or not bnorm.cuda_available(),
                                   reason="needs JAX with a GPU platform and a CUDA device")


@needs_jax_gpu
@pytest.mark.parametrize("shape,axis", LAYOUTS)
def test_jax_cuda_matches_cpu(shape, axis):
    """JAX arrays on the GPU in, JAX arrays on the same GPU out (bnorm allocates them and
    hands them over through DLPack: JAX arrays are immutable)."""
    jax = jax_gpu
    gpu = jax.devices("gpu")[0]
    rng = np.random.default_rng(2)
    x = (1 + rng.standard_normal(shape)).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    c = shape[axis]
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    put = lambda a: jax.device_put(a, gpu)  # noqa: E731
    y, mean, invstd = bnorm.forward_train(x, w, b, axis=axis)
    gy, gmean, ginvstd = bnorm.forward_train(put(x), put(w), put(b), axis=axis)
    for got, want in ((gy, y), (gmean, mean), (ginvstd, invstd)):
        assert isinstance(got, jax.Array) and got.devices() == {gpu}
        _close(np.asarray(got), want, "float32")
    want = bnorm.backward(dy, x, mean, invstd, w, axis=axis)
    got = bnorm.backward(put(dy), put(x), put(mean), put(invstd), put(w), axis=axis)
    for g, e in zip(got, want):
        assert isinstance(g, jax.Array)
        _close(np.asarray(g), e, "float32")
    rm, rv = np.zeros(c, np.float32), np.full(c, 2.0, np.float32)
    _close(np.asarray(bnorm.forward_infer(put(x), put(rm), put(rv), put(w), put(b), axis=axis)),
           bnorm.forward_infer(x, rm, rv, w, b, axis=axis), "float32")
    # the results stay valid after the inputs are gone (bnorm's buffers belong to JAX now)
    del gy
    assert np.isfinite(np.asarray(gmean)).all()


@needs_cupy
def test_cupy_on_a_non_default_stream():
    x = cupy.asarray((2 + np.random.default_rng(3).standard_normal((32, 8, 13, 13))).astype(np.float32))
    out = cupy.empty_like(x)
    cupy.cuda.Stream.null.synchronize()  # x's copy ran on the null stream
    s = cupy.cuda.Stream(non_blocking=True)
    with s:
        y, mean, invstd = bnorm.forward_train(x, out=out, stream=s.ptr)
        dx, dw, db = bnorm.backward(x, x, mean, invstd, stream=s.ptr)
        y2, _, _ = bnorm.forward_train(x)  # no stream=: CuPy's current stream, s
    s.synchronize()
    assert y.data.ptr == out.data.ptr
    ref, rmean, rinvstd = bnorm.forward_train(cupy.asnumpy(x))
    _close(cupy.asnumpy(out), ref, "float32")
    _close(cupy.asnumpy(y2), ref, "float32")
    for g, e in zip((dx, dw, db), bnorm.backward(cupy.asnumpy(x), cupy.asnumpy(x), rmean, rinvstd)):
        _close(cupy.asnumpy(g), e, "float32")


@needs_torch_cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_every_op_repeats_bitwise(dtype):
    """Each CUDA op twice on the same input: identical bits (no atomics in the reductions)."""
    torch = torch_cuda
    g = torch.Generator(device="cuda").manual_seed(4)
    dt = getattr(torch, dtype)
    x = (torch.randn(64, 48, 15, 15, device="cuda", generator=g) + 3).to(dt)
    z = torch.randn(64, 48, 15, 15, device="cuda", generator=g).to(dt)
    dy = torch.randn(64, 48, 15, 15, device="cuda", generator=g).to(dt)
    w = torch.randn(48, device="cuda", generator=g)
    b = torch.randn(48, device="cuda", generator=g)

    def run():
        y, mean, invstd = bnorm.forward_train(x, w, b, residual=z, activation="relu")
        grads = bnorm.backward(dy, x, mean, invstd, w, activation="relu", y=y)
        stats = bnorm.batch_stats(x.to(memory_format=torch.channels_last).permute(0, 2, 3, 1), axis=-1)
        return (y, mean, invstd, *grads, *stats[1:])

    for u, v in zip(run(), run()):
        assert torch.equal(u, v)


@needs_torch_cuda
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_torch_adapter_on_cuda_matches_torch(channels_last, dtype):
    """bnorm.torch.BatchNorm2d on CUDA tensors (DLPack, current stream) against
    torch.nn.BatchNorm2d: outputs, gradients and running statistics over three steps."""
    torch = torch_cuda
    import bnorm.torch as bt

    dt = getattr(torch, dtype)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    ours = bt.BatchNorm2d(24).cuda()
    ref = torch.nn.BatchNorm2d(24).cuda()
    with torch.no_grad():
        for m in (ours, ref):
            m.weight.copy_(torch.linspace(0.5, 2, 24))
            m.bias.copy_(torch.linspace(-1, 1, 24))
    tol = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 5e-2}[dtype]
    g = torch.Generator(device="cuda").manual_seed(5)
    for _ in range(3):
        x = (torch.randn(16, 24, 10, 10, device="cuda", generator=g) * 2 + 1).to(dt).to(memory_format=fmt)
        dy = torch.randn(16, 24, 10, 10, device="cuda", generator=g).to(dt)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = ours(xa)
        # (the reference in float32, as both compute 16-bit inputs)
        yb = torch.nn.functional.batch_norm(xb.float(), ref.running_mean, ref.running_var, ref.weight, ref.bias,
                                            True, 0.1, 1e-5).to(dt)
        assert ya.is_cuda and ya.dtype == dt
        ya.backward(dy)
        yb.backward(dy)
        assert float((ya.float() - yb.float()).abs().max()) <= tol * 4
        assert float((xa.grad.float() - xb.grad.float()).abs().max()) <= tol * 8
        torch.testing.assert_close(ours.running_mean, ref.running_mean, rtol=tol, atol=tol)
        torch.testing.assert_close(ours.running_var, ref.running_var, rtol=tol, atol=tol)
        torch.testing.assert_close(ours.weight.grad, ref.weight.grad, rtol=tol * 10, atol=tol * 10)
        torch.testing.assert_close(ours.bias.grad, ref.bias.grad, rtol=tol * 10, atol=tol * 10)


CAPTURE_SCRIPT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "cuda_capture_script.py")


def _run_capture_script(case):
    return subprocess.run([sys.executable, "-X", "faulthandler", CAPTURE_SCRIPT, case], capture_output=True,
                          text=True, timeout=300)


@needs_torch_cuda
def test_torch_cuda_graph_capture_and_replay():
    """bnorm's calls captured in a CUDA graph with PyTorch (on the capture stream, bnorm's
    default for PyTorch tensors) replay with the new input. In a subprocess: a crash would
    end pytest."""
    r = _run_capture_script("replay")
    assert r.returncode == 0 and "done" in r.stdout, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"
    error = float(r.stdout.split("replay error")[1].split()[0])
    assert error < 1e-4, r.stdout


@needs_torch_cuda
def test_legacy_stream_during_a_capture_is_an_error_not_a_crash():
    """This segfaulted on an H200 inside the ostringstream that formatted the CUDA error
    (cuda-gdb's backtrace); the messages are formatted with snprintf/std::to_string since."""
    r = _run_capture_script("legacy")
    assert r.returncode == 0 and "done" in r.stdout, f"exit {r.returncode}\n{r.stdout}\n{r.stderr[-4000:]}"


# --- the layers on CUDA arrays --------------------------------------------------------------

def _framework(name):
    """(to device, to host, array type) for CUDA arrays of `name`, or a skip."""
    if name == "torch":
        if torch_cuda is None or not bnorm.cuda_available():
            pytest.skip("needs PyTorch with CUDA and a CUDA device")
        return (lambda a: torch_cuda.from_numpy(np.ascontiguousarray(a)).cuda(),
                lambda t: t.cpu().numpy(), torch_cuda.Tensor)
    if cupy is None or not bnorm.cuda_available():
        pytest.skip("needs CuPy and a CUDA device")
    return cupy.asarray, cupy.asnumpy, cupy.ndarray


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("activation", [None, "relu"])
@pytest.mark.parametrize("shape,axis", [((8, 6, 5, 7), 1), ((8, 5, 7, 6), -1), ((40, 6), 1)])
def test_batchnorm_layer_on_cuda_arrays_matches_numpy(framework, activation, shape, axis):
    """bnorm.BatchNorm on CUDA arrays against the same layer on NumPy arrays: outputs
    (arrays of x's framework on its device), gradients, running statistics over training
    steps, then eval mode, state_dict / load_state_dict, and back to NumPy."""
    dev, host, array_type = _framework(framework)
    rng = np.random.default_rng(11)
    c = shape[axis]
    ref = bnorm.BatchNorm(c, axis=axis, activation=activation, momentum=None)
    gpu = bnorm.BatchNorm(c, axis=axis, activation=activation, momentum=None)
    w, b = rng.standard_normal(c).astype(np.float32), rng.standard_normal(c).astype(np.float32)
    for layer in (ref, gpu):
        layer.load_state_dict({**layer.state_dict(), "weight": w, "bias": b})

    def step(train):
        ref.train(train), gpu.train(train)
        x = (3 + 2 * rng.standard_normal(shape)).astype(np.float32)
        z, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
        res = {"residual": z} if activation else {}
        y_ref = ref(x, **res)
        y = gpu(dev(x), **({"residual": dev(z)} if activation else {}))
        assert isinstance(y, array_type) and isinstance(gpu.running_mean, array_type)
        _close(host(y), y_ref, "float32")
        g_ref, g = ref.backward(dy), gpu.backward(dev(dy))
        g_ref, g = (g_ref, g) if activation else ((g_ref,), (g,))
        for got, want in zip(g, g_ref):
            assert isinstance(got, array_type)
            _close(host(got), want, "float32")
        _close(host(gpu.grad_weight), ref.grad_weight, "float32")
        _close(host(gpu.grad_bias), ref.grad_bias, "float32")

    for _ in range(3):
        step(True)
    assert gpu.num_batches_tracked == ref.num_batches_tracked == 3
    _close(host(gpu.running_mean), ref.running_mean, "float32")
    _close(host(gpu.running_var), ref.running_var, "float32")
    step(False)

    state = gpu.state_dict()
    assert isinstance(state["running_var"], array_type)
    assert state["running_var"] is not gpu.running_var
    fresh = bnorm.BatchNorm(c, axis=axis)
    fresh.load_state_dict(state)  # device arrays into a NumPy layer
    _close(fresh.running_var, ref.running_var, "float32")
    running_var = gpu.running_var
    gpu.load_state_dict(ref.state_dict())  # NumPy arrays into a layer on the GPU: in place there
    assert gpu.running_var is running_var
    _close(host(gpu.running_var), ref.running_var, "float32")

    gpu.train(), ref.train()
    x = (1 + rng.standard_normal(shape)).astype(np.float32)
    _close(gpu(x), ref(x), "float32")  # a NumPy x: the vectors come back to the host
    assert isinstance(gpu.weight, np.ndarray) and isinstance(gpu.running_mean, np.ndarray)
    _close(gpu.running_mean, ref.running_mean, "float32")


@needs_torch_cuda
def test_batchnorm_layer_on_cuda_half_precision():
    """A float16 layer (float32 vectors) on float16 and bfloat16 torch CUDA tensors."""
    torch = torch_cuda
    rng = np.random.default_rng(5)
    x32 = (2 + rng.standard_normal((16, 4, 9, 9))).astype(np.float32)
    ref = bnorm.BatchNorm(4, dtype=np.float16)
    ref_y = ref(x32.astype(np.float16))
    for dtype, tol in ((torch.float16, "float16"), (torch.bfloat16, "bfloat16")):
        gpu = bnorm.BatchNorm(4, dtype=np.float16)
        y = gpu(torch.from_numpy(x32).cuda().to(dtype))
        assert y.dtype == dtype and gpu.running_mean.dtype == torch.float32
        _close(y.float().cpu().numpy(), ref_y.astype(np.float32), tol)
        # (statistics of x rounded to float16 on one side, to bfloat16 on the other)
        _close(gpu.running_var.cpu().numpy(), ref.running_var, tol)


@needs_torch_cuda
def test_batchnorm_layer_errors_on_cuda_leave_it_unchanged():
    torch = torch_cuda
    gpu = bnorm.BatchNorm(4)
    gpu(torch.randn(8, 4, device="cuda") + 2)
    mean_before = gpu.running_mean.clone()
    with pytest.raises(ValueError, match="channels"):
        gpu(torch.randn(8, 5, device="cuda"))
    with pytest.raises(ValueError):
        gpu(torch.randn(1, 4, device="cuda"))  # one value per channel in training
    assert torch.equal(gpu.running_mean, mean_before) and gpu.num_batches_tracked == 1
    fresh = bnorm.BatchNorm(4)  # float32 vectors, still NumPy: a float64 x is refused before they move
    with pytest.raises(TypeError, match="float32"):
        fresh(torch.randn(8, 4, device="cuda", dtype=torch.float64))
    assert isinstance(fresh.weight, np.ndarray) and isinstance(fresh.running_mean, np.ndarray)
    with pytest.raises(ValueError):  # a residual of the wrong shape fails after the move: undone
        fresh(torch.randn(8, 4, device="cuda") + 2, residual=torch.zeros(8, 5, device="cuda"))
    assert isinstance(fresh.weight, np.ndarray) and isinstance(fresh.running_var, np.ndarray)
    assert fresh.num_batches_tracked == 0
    ghost = bnorm.BatchNorm(4, virtual_batch_size=4)
    with pytest.raises(TypeError, match="NumPy"):
        ghost(torch.randn(8, 4, device="cuda"))
    assert isinstance(ghost.weight, np.ndarray)  # refused before the vectors moved
    renorm = bnorm.BatchRenorm(4)
    with pytest.raises(TypeError, match="NumPy"):
        renorm(torch.randn(8, 4, device="cuda"))
    assert isinstance(renorm.weight, np.ndarray)


@needs_jax_gpu
def test_batchnorm_layer_refuses_jax_cuda_arrays_when_it_has_vectors():
    jax = jax_gpu
    x = jax.numpy.ones((8, 4)) + jax.random.normal(jax.random.PRNGKey(0), (8, 4))
    with pytest.raises(TypeError, match="immutable"):
        bnorm.BatchNorm(4)(x)
    y = bnorm.BatchNorm(4, affine=False, track_running_stats=False)(x)  # nothing to update in place
    ref, _, _ = bnorm.forward_train(np.asarray(x))
    _close(np.asarray(y), ref, "float32")


@pytest.mark.parametrize("framework", ["torch", "cupy"])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_sync_batchnorm_layer_on_cuda_arrays(framework, activation):
    """SyncBatchNorm on CUDA arrays, one rank (LocalComm): the global batch is this rank's,
    so it matches BatchNorm on NumPy (the collective phases run on the device)."""
    from bnorm.distributed import LocalComm, SyncBatchNorm

    dev, host, array_type = _framework(framework)
    rng = np.random.default_rng(2)
    ref = bnorm.BatchNorm(6, activation=activation)
    sbn = SyncBatchNorm(6, LocalComm(), activation=activation)
    for _ in range(2):
        x = (1 + 3 * rng.standard_normal((10, 6, 4, 5))).astype(np.float32)
        dy, z = (rng.standard_normal(x.shape).astype(np.float32) for _ in range(2))
        res_ref, res = ({"residual": z}, {"residual": dev(z)}) if activation else ({}, {})
        y = sbn(dev(x), **res)
        assert isinstance(y, array_type)
        _close(host(y), ref(x, **res_ref), "float32")
        g, g_ref = sbn.backward(dev(dy)), ref.backward(dy)
        for got, want in zip(g if activation else (g,), g_ref if activation else (g_ref,)):
            _close(host(got), want, "float32")
        _close(host(sbn.grad_weight), ref.grad_weight, "float32")
    assert isinstance(sbn.running_var, array_type)
    _close(host(sbn.running_mean), ref.running_mean, "float32")
    _close(host(sbn.running_var), ref.running_var, "float32")
    assert sbn.num_batches_tracked == 2


@needs_torch_cuda
def test_batchnorm_layer_follows_x_to_a_second_gpu():
    """x on cuda:1: the vectors move there (and back to cuda:0 with x), state_dict's copies too."""
    torch = torch_cuda
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 CUDA devices")
    x = torch.randn(16, 5, 3, 3) + 1
    bn, ref = bnorm.BatchNorm(5), bnorm.BatchNorm(5)
    for device in ("cuda:1", "cuda:0", "cuda:1"):
        y = bn(x.to(device))
        assert y.device == torch.device(device) and bn.running_var.device == torch.device(device)
        assert all(v.device == torch.device(device) for v in bn.state_dict().values() if isinstance(v, torch.Tensor))
        _close(y.cpu().numpy(), ref(x.numpy()), "float32")
        _close(bn.backward(torch.ones_like(y)).cpu().numpy(), ref.backward(np.ones(x.shape, np.float32)), "float32")
    _close(bn.running_var.cpu().numpy(), ref.running_var, "float32")
