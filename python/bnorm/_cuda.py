"""CUDA arrays for the functional API: the array operations of PyTorch, CuPy and JAX on
CUDA devices, with the same interface as _functional._NumPy.

Arrays reach _core through DLPack without copies. Outputs are arrays of x's framework on
x's device: allocated by the framework (PyTorch, CuPy: their caching allocators), or for
JAX, whose arrays are immutable, by bnorm (cudaMalloc) and handed to JAX through DLPack.
Everything runs on ``stream`` (an integer cudaStream_t; None: the current stream of x's
framework, as its own operations would: PyTorch's current stream of x's device, CuPy's
current stream, and for JAX the legacy default stream, synchronized before JAX reads the
outputs), without host synchronization.
"""

from __future__ import annotations

import numpy as np

from . import _core

_DTYPES = ("float16", "float32", "float64", "bfloat16")


def backend(x, stream):
    """The array namespace for CUDA array x."""
    if not _core.built_with_cuda:
        raise ValueError("bnorm: x is a CUDA array but this bnorm was built without CUDA")
    framework = type(x).__module__.split(".")[0]
    namespace = {"torch": _Torch, "cupy": _CuPy, "jax": _Jax, "jaxlib": _Jax}.get(framework)
    if namespace is None:
        raise TypeError(f"bnorm: CUDA arrays of {type(x).__module__}.{type(x).__name__} are not supported "
                        "(PyTorch, CuPy and JAX are)")
    if stream is not None and (isinstance(stream, bool) or not isinstance(stream, int) or stream < 0):
        raise TypeError(f"bnorm: stream must be an integer CUDA stream handle, got {stream!r}")
    return namespace(x, stream)


class _Torch:
    dtypes = _DTYPES

    def __init__(self, x, stream):
        import torch

        self.torch, self.device = torch, x.device
        self.stream = torch.cuda.current_stream(x.device).cuda_stream if stream is None else stream

    def owns(self, a):
        return isinstance(a, self.torch.Tensor) and a.device == self.device

    @staticmethod
    def dtype_name(a):
        return str(a.dtype).removeprefix("torch.")

    def empty(self, shape, dtype_name):
        return self.torch.empty(shape, dtype=getattr(self.torch, dtype_name), device=self.device)

    @staticmethod
    def is_contiguous(a):
        return a.is_contiguous()

    @staticmethod
    def contiguous(a):
        return a.contiguous()

    @staticmethod
    def export(a):
        # DLPack refuses tensors that require grad; bnorm computes gradients itself.
        return a.detach()

    @staticmethod
    def wrap(a):
        return a

    @staticmethod
    def is_writeable(a):
        return True

    @staticmethod
    def overlaps(a, b):
        # C-contiguous arrays: their address ranges intersect
        a0, b0 = a.data_ptr(), b.data_ptr()
        return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()

    @staticmethod
    def overlaps_partly(a, b):
        # C-contiguous, same shape and dtype (see _functional._NumPy.overlaps_partly)
        return a.data_ptr() != b.data_ptr() and _Torch.overlaps(a, b)

    @staticmethod
    def copy_into(dst, src):
        dst.copy_(src)

    def counts_table(self, counts, parts, channels):
        counts = self.torch.as_tensor(counts, dtype=self.torch.float64, device=self.device)
        return counts.reshape(parts, 1 if counts.ndim == 1 else channels).expand(parts, channels).contiguous()

    def from_host(self, a):
        """A copy of NumPy array a on this device (the layer's vectors following x)."""
        return self.torch.from_numpy(a).to(self.device)

    @staticmethod
    def to_host(a):
        return a.detach().cpu().numpy()

    @staticmethod
    def clone(a):
        return a.clone()

    def invstd(self, var, eps):
        """1 / sqrt(var + eps) in double, rounded once to var's dtype (as the CPU computes it)."""
        return (1.0 / self.torch.sqrt(var.double() + eps)).to(var.dtype)


class _CuPy:
    dtypes = _DTYPES

    def __init__(self, x, stream):
        import cupy

        self.cupy, self.device = cupy, x.device
        if stream is None:
            with x.device:
                stream = cupy.cuda.get_current_stream().ptr
        self.stream = stream

    def owns(self, a):
        return isinstance(a, self.cupy.ndarray) and a.device == self.device

    @staticmethod
    def dtype_name(a):
        return a.dtype.name

    def empty(self, shape, dtype_name):
        with self.device:
            return self.cupy.empty(shape, dtype=dtype_name)

    @staticmethod
    def is_contiguous(a):
        return a.flags.c_contiguous

    def contiguous(self, a):
        with self.device:
            return self.cupy.ascontiguousarray(a)

    @staticmethod
    def export(a):
        return a

    @staticmethod
    def wrap(a):
        return a

    @staticmethod
    def is_writeable(a):
        return True

    @staticmethod
    def overlaps(a, b):
        # C-contiguous arrays: their address ranges intersect
        a0, b0 = a.data.ptr, b.data.ptr
        return a0 < b0 + b.nbytes and b0 < a0 + a.nbytes

    @staticmethod
    def overlaps_partly(a, b):
        # C-contiguous, same shape and dtype (see _functional._NumPy.overlaps_partly)
        return a.data.ptr != b.data.ptr and _CuPy.overlaps(a, b)

    @staticmethod
    def copy_into(dst, src):
        with dst.device:  # (CuPy copies on the current device otherwise)
            dst[...] = src

    def counts_table(self, counts, parts, channels):
        with self.device:
            counts = self.cupy.asarray(counts, dtype="float64")
            return self.cupy.ascontiguousarray(
                self.cupy.broadcast_to(counts.reshape(parts, 1 if counts.ndim == 1 else channels), (parts, channels)))

    def from_host(self, a):
        """A copy of NumPy array a on this device (the layer's vectors following x)."""
        with self.device:
            return self.cupy.asarray(a)

    @staticmethod
    def to_host(a):
        return a.get()

    @staticmethod
    def clone(a):
        with a.device:  # (CuPy allocates on the current device otherwise)
            return a.copy()

    def invstd(self, var, eps):
        """1 / sqrt(var + eps) in double, rounded once to var's dtype (as the CPU computes it)."""
        with self.device:
            return (1.0 / self.cupy.sqrt(var.astype("float64") + eps)).astype(var.dtype)


class _Jax:
    """JAX arrays are immutable: outputs are fresh device buffers from bnorm, wrapped as JAX
    arrays through DLPack; running statistics cannot be updated in place (pass None and
    update them functionally from save_mean / batch_stats)."""

    dtypes = _DTYPES

    def __init__(self, x, stream):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp, self.stream = jax, jnp, 0 if stream is None else stream
        (self.device,) = x.devices()
        # the CUDA ordinal in this process (JAX's id is global across processes)
        self.cuda_device = getattr(self.device, "local_hardware_id", None)
        if self.cuda_device is None:
            self.cuda_device = self.device.id

    def owns(self, a):
        return isinstance(a, self.jax.Array) and a.devices() == {self.device}

    @staticmethod
    def dtype_name(a):
        return a.dtype.name

    def empty(self, shape, dtype_name):
        # a bnorm-owned device buffer (DLPack-capable), turned into a JAX array by wrap()
        return _DLPackBuffer(_core.cuda_empty(tuple(shape), dtype_name, self.cuda_device), self.cuda_device)

    @staticmethod
    def is_contiguous(a):
        return True  # JAX arrays are always row-major and dense

    @staticmethod
    def contiguous(a):
        return a

    @staticmethod
    def export(a):
        return a

    def wrap(self, a):
        # A fresh bnorm buffer (empty) becomes a JAX array without a copy. JAX reads it on
        # streams of its own, which do not wait for bnorm's: the stream is synchronized first.
        if isinstance(a, self.jax.Array):
            return a
        _core.cuda_synchronize(self.stream, self.cuda_device)
        return self.jax.dlpack.from_dlpack(a)

    @staticmethod
    def is_writeable(a):
        return False

    @staticmethod
    def copy_into(dst, src):
        raise ValueError("bnorm: JAX arrays are immutable: out= cannot be a JAX array")

    @staticmethod
    def to_host(a):
        return np.asarray(a)

    def counts_table(self, counts, parts, channels):
        counts = self.jnp.asarray(counts, dtype="float64")
        table = self.jnp.broadcast_to(counts.reshape(parts, 1 if counts.ndim == 1 else channels), (parts, channels))
        return self.jax.device_put(table, self.device)


class _DLPackBuffer:
    """A bnorm device buffer (_core.DeviceBuffer) offered through the DLPack protocol, as
    often as asked: to bnorm's ops, which write it, then to JAX's from_dlpack (which takes no
    bare capsules). Each __dlpack__ is a fresh view that keeps the buffer alive. The work on
    it is synchronized before JAX gets it (_Jax.wrap), so any consumer stream may read it."""

    def __init__(self, buffer, device_id):
        self.buffer, self.device_id = buffer, device_id

    def __dlpack_device__(self):
        return (2, self.device_id)  # kDLCUDA

    def __dlpack__(self, *, stream=None, max_version=None, dl_device=None, copy=None):
        view = self.buffer.export()  # a capsule, or (newer nanobind) an object with __dlpack__
        return view.__dlpack__() if hasattr(view, "__dlpack__") else view
