"""The functional API: argument checks, the (outer, C, inner) view, outputs, then _core.

Every user-facing check and message lives here; _core checks dtypes and sizes again only so
that nothing can ever touch memory it was not given. Arrays are checked and outputs
allocated before anything is computed, so a call that raises has modified nothing.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Tuple, Union

import numpy as np

from . import _core

__all__ = [
    "forward_train",
    "forward_infer",
    "backward",
    "batch_stats",
    "merge_stats",
    "normalize",
    "backward_reduce",
    "backward_elemt",
    "set_num_threads",
    "get_num_threads",
    "cpu_isa",
    "cuda_available",
]

#: A NumPy array, or a CUDA array of PyTorch, CuPy or JAX (anything with __dlpack__).
Array = Any

_CPU_DTYPES = ("float16", "bfloat16", "float32", "float64")
_DTYPE_NAMES = {np.dtype(name): name for name in ("float16", "float32", "float64")}  # dtype.name is slow to compute


_BFLOAT16: Optional[np.dtype] = None  # ml_dtypes' bfloat16, once _bfloat16() has imported it
_UINT16 = np.dtype(np.uint16)  # what _core gets bfloat16 memory as (a view with a dtype object: 0.05 us less)


def _is_bfloat16(dtype: np.dtype) -> bool:
    """Whether dtype is ml_dtypes' bfloat16 (an array of it means ml_dtypes is imported;
    bnorm itself imports ml_dtypes only to allocate bfloat16 arrays). The known dtype
    object first: dtype.name costs a microsecond, a bfloat16 call makes several tests."""
    return dtype is _BFLOAT16 or (dtype.kind == "V" and dtype.itemsize == 2 and dtype.name == "bfloat16")


def _bfloat16() -> np.dtype:
    """NumPy's bfloat16 dtype, from ml_dtypes (an optional dependency: bfloat16 needs it)."""
    global _BFLOAT16
    if _BFLOAT16 is None:
        try:
            import ml_dtypes
        except ImportError:
            raise ImportError("bnorm: bfloat16 on the CPU needs the ml_dtypes package (pip install ml_dtypes)") from None
        _BFLOAT16 = np.dtype(ml_dtypes.bfloat16)
        _DTYPE_NAMES[_BFLOAT16] = "bfloat16"  # dtype_name's fast path from now on
        _PLAIN_PARAM_DTYPES[_BFLOAT16] = _PARAM_DTYPES[_param_dtype("bfloat16")]
    return _BFLOAT16


def _numpy_dtype(name: str) -> np.dtype:
    return _bfloat16() if name == "bfloat16" else np.dtype(name)


class _NumPy:
    """Array operations for NumPy arrays on the CPU (the CUDA counterpart is in _cuda.py)."""

    stream = 0
    dtypes = _CPU_DTYPES

    @staticmethod
    def owns(a) -> bool:
        return isinstance(a, np.ndarray)

    @staticmethod
    def dtype_name(a) -> str:
        name = _DTYPE_NAMES.get(a.dtype)
        if name is None:
            if _is_bfloat16(a.dtype):  # (a "V" kind to NumPy)
                _bfloat16()  # (its dtype object known from now on)
                name = "bfloat16"
            elif a.dtype.kind == "V" and not a.dtype.name.startswith("void"):  # ml_dtypes' float8_e4m3fn, int4, ...
                name = a.dtype.name
            elif a.dtype.kind in "USV":  # (their names, such as str96, say the size in bits)
                name = f"{a.dtype.str} ({dict(U='str', S='bytes', V='void')[a.dtype.kind]})"
            elif a.dtype.isnative:
                name = a.dtype.name
            else:
                name = f"{a.dtype.name} of non-native byte order ({a.dtype.str})"
        return name

    # bfloat16 arrays reach _core as uint16 views of their memory (NumPy exports no buffer
    # or DLPack capsule for them): empty() allocates them so, wrap() views them back.
    @staticmethod
    def empty(shape, dtype_name: str):
        if dtype_name == "bfloat16":
            return np.empty(shape, dtype=_bfloat16()).view(_UINT16)
        return np.empty(shape, dtype=dtype_name)

    @staticmethod
    def is_contiguous(a) -> bool:
        return a.flags.c_contiguous

    @staticmethod
    def contiguous(a):
        return np.ascontiguousarray(a)

    @staticmethod
    def is_writeable(a) -> bool:
        return a.flags.writeable

    @staticmethod
    def overlaps(a, b) -> bool:
        """Whether arrays a and b may share memory (their address ranges intersect). Two
        arrays that own their memory share none unless they are one array: that test is
        cheap, and most calls need no other (np.may_share_memory costs ~0.2 us)."""
        if a.flags.owndata and b.flags.owndata:
            return a is b
        if not np.may_share_memory(a, b):
            return False
        if a.flags.c_contiguous and b.flags.c_contiguous:
            return True  # the address ranges are the elements
        try:  # a strided array's range has gaps: a real overlap only if an element is shared
            return np.shares_memory(a, b, max_work=1 << 20)
        except RuntimeError:  # numpy.exceptions.TooHardError: assume the worst
            return True

    @staticmethod
    def overlaps_partly(a, b) -> bool:
        """Whether C-contiguous arrays a and b of one shape and dtype share memory without
        being the same memory (then a kernel writing a would overwrite b's unread values)."""
        if a.flags.owndata and b.flags.owndata:
            return False
        return np.may_share_memory(a, b) and a.__array_interface__["data"][0] != b.__array_interface__["data"][0]

    @staticmethod
    def export(a):
        """The object handed to _core for array a."""
        # bfloat16 (its dtype checked by the caller); itemsize first: it is the cheaper test
        return a if a.itemsize != 2 or a.dtype.kind != "V" else a.view(_UINT16)

    @staticmethod
    def wrap(a):
        """The array returned to the user for an output _core wrote."""
        return a if a.itemsize != 2 or a.dtype.kind != "u" else a.view(_bfloat16())

    @staticmethod
    def copy_into(dst, src) -> None:
        np.copyto(dst, src if src.dtype.kind != "u" else src.view(dst.dtype))

    @staticmethod
    def clone(a):
        return a.copy()

    @staticmethod
    def invstd(var, eps: float):
        """1 / sqrt(var + eps) in double, rounded once to var's dtype."""
        return (1.0 / np.sqrt(var.astype(np.float64) + eps)).astype(var.dtype)

    @staticmethod
    def counts_table(counts, parts: int, channels: int):
        """counts of shape (P,) or (P, C) as a C-contiguous float64 (P, C) table."""
        return np.ascontiguousarray(np.broadcast_to(counts.astype(np.float64).reshape(parts, 1 if counts.ndim == 1 else channels), (parts, channels)))


def _backend(x, stream, name="x"):
    """The array namespace of x: NumPy on the CPU, or the CUDA backend for DLPack arrays."""
    if not isinstance(x, np.ndarray) and hasattr(x, "__dlpack_device__"):
        device_type, _ = x.__dlpack_device__()
        if device_type == 2:  # kDLCUDA
            from . import _cuda

            return _cuda.backend(x, stream)
        if device_type != 1:  # kDLCPU arrays of other frameworks go through NumPy below
            raise ValueError(f"bnorm: {name} is on an unsupported device (DLPack device type {device_type})")
    if stream is not None:
        raise ValueError("bnorm: stream= applies to CUDA arrays only")
    return _NumPy


def _as_numpy(a, name: str) -> np.ndarray:
    """a as a NumPy array (CPU arrays of other frameworks, lists), or TypeError naming it.
    Masked arrays are refused: converting them would silently drop the mask."""
    if isinstance(a, np.ma.MaskedArray):
        raise TypeError(f"bnorm: {name} is a masked array; pass {name}.filled(value) or {name}.data")
    try:
        converted = np.asarray(a)
    except (TypeError, RuntimeError) as e:  # e.g. a torch tensor that requires grad, or of bfloat16
        raise TypeError(f"bnorm: {name} cannot be converted to a NumPy array ({type(e).__name__}: {e})") from None
    except ValueError as e:  # a ragged list: NumPy's message names neither the argument nor bnorm
        raise ValueError(f"bnorm: {name} cannot be converted to a NumPy array ({e})") from None
    if converted.dtype.kind in "OUSV" and not _is_bfloat16(converted.dtype):  # None, a str, bytes, any object
        of = f" of {converted.dtype}" if isinstance(a, (list, tuple)) else ""
        raise TypeError(f"bnorm: {name} must be an array of numbers, got {type(a).__name__}{of}")
    return converted


def _exported(xp, a):
    """What _core gets for array a: a itself when C-contiguous, else a C-contiguous copy."""
    return xp.export(a if xp.is_contiguous(a) else xp.contiguous(a))


def _kind(a) -> str:
    """The NumPy dtype kind of an array or scalar of any framework ("f", "i", "u", "b", ...;
    "?"); "f" for ml_dtypes' bfloat16 (a "V" kind to NumPy)."""
    try:
        dtype = np.dtype(str(a.dtype).removeprefix("torch."))
    except TypeError:
        return "?"
    return "f" if _is_bfloat16(dtype) else dtype.kind


def _real(value, name: str) -> float:
    """A scalar argument (momentum, eps, count) as a float: a real number, or a 0-d array
    (of any framework) of a real dtype; TypeError naming it otherwise."""
    if type(value) is not float and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
        if not (tuple(getattr(value, "shape", (1,))) == () and _kind(value) in "iuf"):
            raise TypeError(f"bnorm: {name} must be a real number, got {value!r}")
    try:
        return float(value)
    except OverflowError:
        raise ValueError(f"bnorm: {name} is too large for a float (an integer of {len(str(value))} digits)") from None


def _flag(value, name: str) -> bool:
    """A boolean keyword (True/False, NumPy bools, 0-d boolean arrays), or TypeError naming it."""
    if isinstance(value, (bool, np.bool_)) or (tuple(getattr(value, "shape", (1,))) == () and _kind(value) == "b"):
        return bool(value)
    raise TypeError(f"bnorm: {name} must be True or False, got {value!r}")


def _check_running_var(running_var: np.ndarray) -> None:
    """A variance is never negative (-0.0 is zero, NaN passes to its channel as in the
    kernels): for the layers' Python-side running updates, which the kernels' own check
    does not see. Raises before anything is written."""
    negative = running_var < 0
    if negative.any():
        channel = int(np.argmax(negative))
        raise ValueError(f"bnorm: running_var must be >= 0, got {running_var[channel]} for channel {channel}")


def _count_of(count, channels: int) -> float:
    """backward_elemt's count: a number, a 0-d array, or a (C,) array holding one value for
    every channel (what merge_stats returns for (P, C) counts), on any device."""
    if isinstance(count, bool) or isinstance(count, numbers.Real) or tuple(getattr(count, "shape", ())) == ():
        return _real(count, "count")
    if _kind(count) not in "iuf":
        raise TypeError(f"bnorm: count must hold integers or floats, got dtype {count.dtype}")
    shape = tuple(count.shape)
    if shape != (channels,):
        raise ValueError(f"bnorm: count must be a number or have shape () or ({channels},), got {shape}")
    if channels == 0:
        return 1.0  # nothing to compute
    lo, hi = float(count.min()), float(count.max())
    if math.isnan(lo) or math.isnan(hi):
        return math.nan  # refused, as not finite, with the other bad numbers
    if lo != hi:
        raise ValueError(
            f"bnorm: count must be the same for every channel, got values from {lo:g} to {hi:g} "
            "(backward_elemt normalizes all channels by one count)"
        )
    return hi


def _relu(activation) -> bool:
    """The fused epilogue's activation= as a flag: None (no activation) or "relu"."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":
        return True
    raise ValueError(f'bnorm: activation must be None or "relu", got {activation!r}')


def _residual(call, residual):
    """The residual of a fused forward, as exported (x's shape and dtype; a C-contiguous copy
    only when it is not C-contiguous, as x's), or None."""
    if residual is None:
        return None
    if call.xp is _NumPy and not isinstance(residual, np.ndarray) and hasattr(residual, "__dlpack_device__"):
        if residual.__dlpack_device__()[0] != 1:  # kDLCPU: other frameworks' CPU arrays convert
            raise ValueError("bnorm: residual is on another device than x (a NumPy array)")
    return call.input(residual, "residual")


def _mask_source(call, relu: bool, y):
    """The fused forward's output y that ReLU's gradient is masked with, as exported; None
    without activation (where y must not be given: it would be silently ignored)."""
    if not relu:
        if y is not None:
            raise ValueError('bnorm: y is the fused forward\'s output for activation="relu"; pass activation="relu" or no y')
        return None
    if y is None:
        raise ValueError('bnorm: y (the output of the fused forward) is required with activation="relu"')
    return call.input(y, "y")


def _given(*inputs):
    """The (array, name) pairs whose array is not None (for _Call.output)."""
    return [pair for pair in inputs if pair[0] is not None]  # (a list: a generator costs 0.3 us more)


_PARAM_DTYPES = {name: np.dtype(name) for name in ("float32", "float64")}


def _param_dtype(dtype_name: str) -> str:
    return "float32" if dtype_name in ("float16", "bfloat16") else dtype_name


# The plain call: NumPy arrays that need no conversion, copy or overlap analysis. Most calls
# in a loop are such, and the general path (_Call) spends about 6 us on them in Python,
# more than the kernels of a (256, 512) inference take; _plain checks them in about 2 us
# and the op calls _core at once. Anything else (other frameworks, CUDA, strided or
# foreign memory, a bfloat16 dtype bnorm has not seen yet, any bad argument) returns None
# and takes the general path, which converts, checks and raises: _plain never raises, and
# accepts only what that path would pass to _core unchanged. _core checks dtypes and sizes
# again.

# x's dtype -> the parameter dtype (bfloat16 added when _bfloat16() has imported it)
_PLAIN_PARAM_DTYPES = {dtype: _PARAM_DTYPES[_param_dtype(name)] for dtype, name in _DTYPE_NAMES.items()}


def _plain(x, axis, stream, out, inputs=(), vectors=(), buffers=()):
    """The (outer, C, inner) shape of a plain call, or None. Plain: x a C-contiguous NumPy
    array of float16, float32, float64 or bfloat16 (_core gets _raw(x)) with ndim >= 2 and
    an int axis in range, no stream; the x-shaped inputs (arrays) and out (None or a
    writeable array) alike in type, dtype, shape and layout; the per-channel vectors (None
    or arrays) C-contiguous of the parameter dtype and shape (C,), and the buffers (arrays
    updated in place) too, writeable and owning their memory, so that they overlap
    neither each other nor out. With out given, out and the vectors own their memory: two
    arrays that do are one array or disjoint, so no vector overlaps out, and an x-shaped
    C-contiguous array that overlaps out lies within out's memory, which it fills: it is
    out's memory itself (an in-place call), never a partial overlap."""
    if type(x) is not np.ndarray or stream is not None or type(axis) is not int:
        return None
    dtype = x.dtype
    param = _PLAIN_PARAM_DTYPES.get(dtype)
    shape = x.shape
    ndim = len(shape)
    if param is None or ndim < 2 or not -ndim <= axis < ndim or not x.flags.c_contiguous:
        return None
    owned = out is None  # whether overlaps need no look (a fresh output)
    if not owned:
        flags = out.flags if type(out) is np.ndarray else None
        if flags is None or out.dtype is not dtype or out.shape != shape or not (flags.c_contiguous and flags.writeable and flags.owndata):
            return None
    for a in inputs:
        if type(a) is not np.ndarray or a.dtype is not dtype or a.shape != shape or not a.flags.c_contiguous:
            return None
    channels = shape[axis]
    for a in vectors:
        if a is not None:
            if type(a) is not np.ndarray or a.dtype is not param or a.shape != (channels,) or not a.flags.c_contiguous:
                return None
            if not owned and not a.flags.owndata:
                return None
    for a in buffers:
        if type(a) is not np.ndarray or a.dtype is not param or a.shape != (channels,):
            return None
        flags = a.flags
        if not (flags.c_contiguous and flags.writeable and flags.owndata):
            return None
    axis %= ndim
    return (math.prod(shape[:axis]), channels, math.prod(shape[axis + 1 :]))


def _empty_aligned_with(target: np.ndarray, shape, empty) -> Optional[np.ndarray]:
    """A fresh array of shape (from empty(n), a flat array of n elements of target's dtype)
    at target's address modulo 64 bytes, or None where the itemsize makes that impossible. A
    pass writing both streams whole cache lines of each with non-temporal stores, where it
    streams: at another alignment the second output took ordinary stores, each line read
    before it was written (the ReLU backward's dsum beside dx: 0.85-0.91x the time on NCHW
    planes of 14x14 to 56x56 with it, unchanged on 7x7 planes and channels-last;
    benchmarks/ab_builds.py)."""
    size = math.prod(shape)
    flat = empty(size + 64 // target.itemsize)
    shift = (target.ctypes.data - flat.ctypes.data) % 64
    if shift % flat.itemsize:
        return None
    first = shift // flat.itemsize
    return flat[first : first + size].reshape(shape)


def _raw(a):
    """What _core gets for an array of a plain call, or None: a bfloat16 array as uint16 (its
    dtype has no buffer or DLPack export), any other as it is."""
    return a.view(_UINT16) if a is not None and a.dtype is _BFLOAT16 else a


def _plain_relu(activation):
    """activation= as a flag for a plain call (None and "relu"), or None for anything else."""
    if activation is None:
        return False
    return True if type(activation) is str and activation == "relu" else None


class _Call:
    """One call's input x: its backend, dtype and (outer, C, inner) view around `axis`."""

    def __init__(self, x, axis, stream, name="x"):
        self.xp = _backend(x, stream)
        if self.xp is _NumPy:
            if type(x) is not np.ndarray:
                x = _as_numpy(x, name)
        self.input_shape = tuple(x.shape)
        self.dtype = self.xp.dtype_name(x)
        if self.dtype not in self.xp.dtypes:
            raise TypeError(f"bnorm: {name} must be one of {', '.join(self.xp.dtypes)}, got {self.dtype}")
        self.param_dtype = _param_dtype(self.dtype)
        ndim = len(self.input_shape)
        if ndim < 2:
            raise ValueError(f"bnorm: {name} must have at least 2 dimensions, got shape {self.input_shape}")
        # (a plain int first: the numbers.Integral check costs 0.2 us a call)
        if type(axis) is not int and (not isinstance(axis, numbers.Integral) or isinstance(axis, bool)):
            raise TypeError(f"bnorm: axis must be an integer, got {axis!r}")
        if not -ndim <= axis < ndim:
            raise ValueError(f"bnorm: axis {axis} is out of range for {name} of shape {self.input_shape}")
        axis = int(axis) % ndim
        self.channels = self.input_shape[axis]
        outer = math.prod(self.input_shape[:axis])
        inner = math.prod(self.input_shape[axis + 1 :])
        self.shape = (outer, self.channels, inner)
        self.count = outer * inner
        # x's dtype and shape are the call's by definition: only its layout needs a look
        self.x = _exported(self.xp, x)
        self.vectors = []  # the per-channel inputs, as exported: out must not overlap them

    def input(self, a, name):
        """An array shaped like x, as a C-contiguous array (copied only if it is not one)."""
        if self.xp is _NumPy:
            if type(a) is not np.ndarray:  # (inline: a call per vector costs 0.1 us)
                a = _as_numpy(a, name)
        elif not self.xp.owns(a):
            raise ValueError(f"bnorm: {name} must be an array of the same framework and device as x")
        if self.xp.dtype_name(a) != self.dtype:
            raise TypeError(f"bnorm: {name} must have x's dtype {self.dtype}, got {self.xp.dtype_name(a)}")
        if tuple(a.shape) != self.input_shape:
            raise ValueError(f"bnorm: {name} must have x's shape {self.input_shape}, got {tuple(a.shape)}")
        return _exported(self.xp, a)

    def vector(self, a, name, *, required=True):
        """A per-channel input vector (weight, bias, statistics) of the parameter dtype."""
        if a is None:
            if required:
                raise ValueError(f"bnorm: {name} is required")
            return None
        if self.xp is _NumPy:
            if type(a) is not np.ndarray:  # (inline: a call per vector costs 0.1 us)
                a = _as_numpy(a, name)
        elif not self.xp.owns(a):
            raise ValueError(f"bnorm: {name} must be an array of the same framework and device as x")
        if self.xp.dtype_name(a) != self.param_dtype:
            raise TypeError(
                f"bnorm: {name} must be {self.param_dtype} for {self.dtype} x, got {self.xp.dtype_name(a)}"
            )
        if tuple(a.shape) != (self.channels,):
            raise ValueError(f"bnorm: {name} must have shape ({self.channels},), got {tuple(a.shape)}")
        a = _exported(self.xp, a)
        self.vectors.append((a, name))
        return a

    def buffer(self, a, name):
        """A per-channel vector updated in place (running statistics)."""
        if a is None:
            return None
        if self.xp is _NumPy and not isinstance(a, np.ndarray):
            raise TypeError(f"bnorm: {name} must be a NumPy array (it is updated in place), got {type(a).__name__}")
        if isinstance(a, np.ma.MaskedArray):
            raise TypeError(f"bnorm: {name} is a masked array; pass {name}.data (it is updated in place)")
        self.vector(a, name)
        if not self.xp.is_writeable(a):
            raise ValueError(f"bnorm: {name} is read-only (it is updated in place)")
        if not self.xp.is_contiguous(a):
            raise ValueError(f"bnorm: {name} must be C-contiguous (it is updated in place)")
        return self.xp.export(a)

    def new_vector(self):
        if self.xp is _NumPy:  # (the parameter dtype is never bfloat16; direct: 0.3 us less a vector)
            return np.empty(self.channels, _PARAM_DTYPES[self.param_dtype])
        return self.xp.empty((self.channels,), self.param_dtype)

    def output(self, out, *inputs):
        """(the array _core writes, the array returned): out itself when it is C-contiguous,
        else a fresh array copied into out after the call. out may be x or one of the
        x-shaped `inputs` (exported) itself, but not overlap one partly."""
        if out is None:
            return _Output(self.xp, self.xp.empty(self.input_shape, self.dtype))
        if self.xp is _NumPy and not isinstance(out, np.ndarray):
            raise TypeError(f"bnorm: out must be a NumPy array, got {type(out).__name__}")
        if isinstance(out, np.ma.MaskedArray):  # (the results would be written under its mask)
            raise TypeError("bnorm: out is a masked array; pass out.data")
        if self.xp is not _NumPy and not self.xp.owns(out):
            raise ValueError("bnorm: out must be an array of the same framework and device as x")
        if self.xp.dtype_name(out) != self.dtype:
            raise TypeError(f"bnorm: out must have x's dtype {self.dtype}, got {self.xp.dtype_name(out)}")
        if tuple(out.shape) != self.input_shape:
            raise ValueError(f"bnorm: out must have x's shape {self.input_shape}, got {tuple(out.shape)}")
        if not self.xp.is_writeable(out):
            raise ValueError("bnorm: out is read-only")
        # The kernels read the per-channel vectors while they write out, and update running
        # buffers in place: a non-contiguous out, filled after the call, would overwrite them.
        for a, name in self.vectors:
            if self.xp.overlaps(out, a):
                raise ValueError(f"bnorm: out overlaps {name}")
        if self.xp.is_contiguous(out):
            target = self.xp.export(out)
            for a, name in ((self.x, "x"), *inputs):
                if self.xp.overlaps_partly(target, a):
                    raise ValueError(f"bnorm: out overlaps {name} partly (it may be {name} itself, or separate memory)")
            return _Output(self.xp, target, out)
        return _Output(self.xp, self.xp.empty(self.input_shape, self.dtype), out, copy_back=True)

    def output_aligned_with(self, other: "_Output") -> "_Output":
        """A fresh output at the address of other's target modulo 64 bytes (NumPy; elsewhere,
        or where no such address exists, a plain fresh output): _empty_aligned_with."""
        if self.xp is _NumPy:
            a = _empty_aligned_with(other.target, self.input_shape, lambda n: self.xp.empty((n,), self.dtype))
            if a is not None:
                return _Output(self.xp, a)
        return self.output(None)

    def require_batch(self):
        if self.count == 1 and self.channels > 0:  # an empty x is no batch of one
            raise ValueError(
                "expected more than 1 value per channel when training, "
                f"got input of shape {self.input_shape}"
            )


    def result(self, a):
        """A new vector or array _core wrote, as the user's array type."""
        return self.xp.wrap(a)


class _Output:
    """Where _core writes an output (target), and what the user gets: a fresh array, out
    itself, or out filled from a fresh C-contiguous target when out is not contiguous."""

    def __init__(self, xp, target, out=None, copy_back=False):
        self.xp, self.target, self.out, self.copy_back = xp, target, out, copy_back

    def done(self):
        if self.out is None:
            return self.xp.wrap(self.target)
        if self.copy_back:
            self.xp.copy_into(self.out, self.target)
        return self.out


def forward_train(
    x: Array, weight: Optional[Array] = None, bias: Optional[Array] = None, running_mean: Optional[Array] = None,
    running_var: Optional[Array] = None, *, axis: int = 1, momentum: float = 0.1, eps: float = 1e-5,
    residual: Optional[Array] = None, activation: Optional[str] = None, out: Optional[Array] = None,
    stream: Optional[int] = None, unbiased_running_var: bool = True,
) -> Tuple[Array, Array, Array]:
    """Batch normalization in training mode.

    Normalizes x with the mean and biased variance of each channel (C = x.shape[axis],
    statistics over every other axis): y = (x - mean) / sqrt(var + eps) * weight + bias.

    Args:
        x: float16, bfloat16, float32 or float64 array, ndim >= 2 (bfloat16 on the CPU:
            ml_dtypes.bfloat16, what JAX and NumPy users hold).
        weight, bias: per-channel scale and shift of shape (C,), or None (1 and 0).
            Parameter dtype: float32 for 16-bit x, else x's dtype.
        running_mean, running_var: per-channel buffers updated in place when given:
            r = (1 - momentum) * r + momentum * batch value, with the unbiased
            variance (var * M / (M - 1)) for running_var. Left untouched for an empty x.
        axis: the channel axis (negative counts from the end).
        momentum: in [0, 1].
        eps: > 0, added to the variance.
        residual: optional array of x's shape and dtype added after normalization (fused
            epilogue: y = activation(BN(x) + residual), one pass; statistics of x alone). A
            residual that is not C-contiguous is copied first (as x is).
        activation: None or "relu", applied last.
        out: optional preallocated output of x's shape and dtype (may be x or residual itself).
        stream: CUDA stream handle (int) for CUDA arrays; None is the current stream of x's
            framework (PyTorch's or CuPy's; the legacy default stream for JAX arrays).
        unbiased_running_var: False updates running_var with the biased variance var
            instead of var * M / (M - 1): the convention of Keras 3, Flax and ONNX
            (docs/variants.md); True (default) is PyTorch's and cuDNN's.

    Returns:
        (y, save_mean, save_invstd): the output and the batch mean and 1/sqrt(var + eps)
        per channel, as needed by ``backward``.

    Raises:
        TypeError: a wrong dtype. ValueError: a wrong shape or value, or a single value
        per channel (M == 1).
    """
    relu = _plain_relu(activation)
    if (
        relu is not None and type(momentum) is float and type(eps) is float and type(unbiased_running_var) is bool
        and (running_mean is None) == (running_var is None) and (running_mean is None or running_mean is not running_var)
    ):
        buffers = () if running_mean is None else (running_mean, running_var)
        shape = _plain(x, axis, stream, out, () if residual is None else (residual,), (weight, bias), buffers)
        if shape is not None and (shape[0] * shape[2] != 1 or shape[1] == 0):  # (else: require_batch raises)
            y = np.empty(x.shape, x.dtype) if out is None else out
            save_mean, save_invstd = (np.empty(shape[1], _PLAIN_PARAM_DTYPES[x.dtype]) for _ in range(2))
            _core.forward_train(_raw(x), shape, weight, bias, running_mean, running_var, momentum, eps, _raw(y),
                                save_mean, save_invstd, 0, _raw(residual), relu,
                                unbiased_running_var=unbiased_running_var)
            return y, save_mean, save_invstd
    call = _Call(x, axis, stream)
    weight = call.vector(weight, "weight", required=False)
    bias = call.vector(bias, "bias", required=False)
    running_mean = call.buffer(running_mean, "running_mean")
    running_var = call.buffer(running_var, "running_var")
    if running_mean is not None and running_var is not None and call.xp.overlaps(running_mean, running_var):
        raise ValueError("bnorm: running_mean and running_var overlap (each is updated from its own old value)")
    call.require_batch()
    relu = _relu(activation)
    residual = _residual(call, residual)
    y = call.output(out, *_given((residual, "residual")))
    save_mean, save_invstd = call.new_vector(), call.new_vector()
    _core.forward_train(
        call.x, call.shape, weight, bias, running_mean, running_var, _real(momentum, "momentum"), _real(eps, "eps"),
        y.target, save_mean, save_invstd, call.xp.stream, residual, relu,
        unbiased_running_var=_flag(unbiased_running_var, "unbiased_running_var"),
    )
    return y.done(), call.result(save_mean), call.result(save_invstd)


def forward_infer(
    x: Array, running_mean: Array, running_var: Array, weight: Optional[Array] = None, bias: Optional[Array] = None,
    *, axis: int = 1, eps: float = 1e-5, residual: Optional[Array] = None, activation: Optional[str] = None,
    out: Optional[Array] = None, stream: Optional[int] = None,
) -> Array:
    """Batch normalization in inference mode, with fixed statistics:
    y = (x - running_mean) / sqrt(running_var + eps) * weight + bias, then + residual and
    the activation when given (fused, one pass).

    Arguments as in ``forward_train``; running_mean and running_var are required and only
    read. Returns y.
    """
    relu = _plain_relu(activation)
    if relu is not None and type(eps) is float and running_mean is not None and running_var is not None:
        shape = _plain(x, axis, stream, out, () if residual is None else (residual,),
                       (running_mean, running_var, weight, bias))
        if shape is not None:
            y = np.empty(x.shape, x.dtype) if out is None else out
            _core.forward_infer(_raw(x), shape, running_mean, running_var, weight, bias, eps, _raw(y), 0, _raw(residual),
                                relu)
            return y
    call = _Call(x, axis, stream)
    running_mean = call.vector(running_mean, "running_mean")
    running_var = call.vector(running_var, "running_var")
    weight = call.vector(weight, "weight", required=False)
    bias = call.vector(bias, "bias", required=False)
    relu = _relu(activation)
    residual = _residual(call, residual)
    y = call.output(out, *_given((residual, "residual")))
    _core.forward_infer(
        call.x, call.shape, running_mean, running_var, weight, bias, _real(eps, "eps"), y.target, call.xp.stream,
        residual, relu,
    )
    return y.done()


def backward(
    dy: Array, x: Array, mean: Array, invstd: Array, weight: Optional[Array] = None, *, axis: int = 1,
    batch_stats: bool = True, activation: Optional[str] = None, y: Optional[Array] = None,
    out: Optional[Array] = None, stream: Optional[int] = None,
) -> Union[Tuple[Array, Array, Array], Tuple[Array, Array, Array, Array]]:
    """Gradients of batch normalization.

    Args:
        dy: gradient of the loss with respect to y, shaped like x.
        x: the forward input.
        mean, invstd: batch_stats=True: the save_mean and save_invstd of ``forward_train``
            (training mode: the gradient flows through the batch mean and variance);
            batch_stats=False: constants (eval mode: running_mean and
            1/sqrt(running_var + eps)), so dx = dy * weight * invstd.
        weight: the per-channel scale, or None (1).
        activation: "relu" for the backward of a fused forward with activation="relu"
            (then y, that forward's output, is required), or None.
        out: optional preallocated dx (may be dy, x or y itself).

    Returns:
        (dx, dweight, dbias) with dweight = sum(dy * xhat) and dbias = sum(dy) per channel,
        xhat = (x - mean) * invstd; dweight and dbias are returned even when weight is None.
        With activation="relu": (dx, dweight, dbias, dsum), dsum = dy * (y > 0) being the
        gradient at BN(x) + residual (so also the residual's), and dx, dweight, dbias BN's
        gradients for dsum in place of dy; one reduction and one elementwise pass, as without.
    """
    relu = _plain_relu(activation)
    if relu is not None and type(batch_stats) is bool and mean is not None and invstd is not None and (y is not None) == relu:
        shape = _plain(x, axis, stream, out, (dy, y) if relu else (dy,), (mean, invstd, weight))
        if shape is not None:
            dx = np.empty(x.shape, x.dtype) if out is None else out
            dweight, dbias = (np.empty(shape[1], _PLAIN_PARAM_DTYPES[x.dtype]) for _ in range(2))
            dsum = None
            if relu:
                dsum = _empty_aligned_with(dx, x.shape, lambda n: np.empty(n, x.dtype))
                if dsum is None:
                    dsum = np.empty(x.shape, x.dtype)
            _core.backward(_raw(dy), _raw(x), shape, mean, invstd, weight, batch_stats, _raw(dx), dweight, dbias, 0,
                           _raw(y), relu, _raw(dsum))
            return (dx, dweight, dbias, dsum) if relu else (dx, dweight, dbias)
    call = _Call(x, axis, stream)
    dy = call.input(dy, "dy")
    mean = call.vector(mean, "mean")
    invstd = call.vector(invstd, "invstd")
    weight = call.vector(weight, "weight", required=False)
    relu = _relu(activation)
    y = _mask_source(call, relu, y)
    dx = call.output(out, *_given((dy, "dy"), (y, "y")))
    dweight, dbias = call.new_vector(), call.new_vector()
    dsum = call.output_aligned_with(dx) if relu else None
    if not isinstance(batch_stats, (bool, np.bool_)) and not (
        tuple(getattr(batch_stats, "shape", (1,))) == () and _kind(batch_stats) == "b"
    ):
        raise TypeError(f"bnorm: batch_stats must be True or False, got {batch_stats!r}")
    _core.backward(
        dy, call.x, call.shape, mean, invstd, weight, bool(batch_stats), dx.target, dweight, dbias, call.xp.stream,
        y, relu, dsum.target if relu else None,
    )
    if relu:
        return dx.done(), call.result(dweight), call.result(dbias), dsum.done()
    return dx.done(), call.result(dweight), call.result(dbias)


def batch_stats(x: Array, *, axis: int = 1, stream: Optional[int] = None) -> Tuple[int, Array, Array]:
    """Per-channel statistics of x: (count, mean, var) with count = M, the number of values
    per channel (an int), and var the biased variance. Computed with shifted two-pass sums
    per tile, merged with Chan's formula (accurate for |mean| >> std; docs/math.md,
    Numerics). For an empty x, mean and var are 0."""
    call = _Call(x, axis, stream)
    mean, var = call.new_vector(), call.new_vector()
    _core.batch_stats(call.x, call.shape, mean, var, call.xp.stream)
    return call.count, call.result(mean), call.result(var)


def merge_stats(
    counts: Array, means: Array, vars: Array, *, stream: Optional[int] = None
) -> Tuple[Union[int, float, Array], Array, Array]:
    """Chan's combination of partial statistics over a leading axis.

    Args:
        counts: values per part, shape (P,) or (P, C); parts with count 0 contribute nothing.
        means, vars: shape (P, C), float32 or float64; vars are biased.

    Returns:
        (count, mean, var): the total count (a scalar when counts is 1-D, an int when counts
        are integers; else float64 of shape (C,)), and the mean and biased variance of the
        union, shape (C,). Where the total count is 0, mean and var are 0.
    """
    xp = _backend(means, stream, "means")
    if xp is _NumPy:
        means, vars = _as_numpy(means, "means"), _as_numpy(vars, "vars")
    if xp is _NumPy or not xp.owns(counts):
        counts = _as_numpy(counts, "counts")  # counts may live on the host for device statistics
    for a, name in ((means, "means"), (vars, "vars")):
        if xp is not _NumPy and not xp.owns(a):
            raise ValueError(f"bnorm: {name} must be an array of the same framework and device as means")
    if means.ndim != 2:
        raise ValueError(f"bnorm: means must have shape (parts, channels), got {tuple(means.shape)}")
    dtype = xp.dtype_name(means)
    if dtype not in ("float32", "float64"):
        raise TypeError(f"bnorm: means must be float32 or float64, got {dtype}")
    if xp.dtype_name(vars) != dtype:
        raise TypeError(f"bnorm: vars must have means' dtype {dtype}, got {xp.dtype_name(vars)}")
    if tuple(vars.shape) != tuple(means.shape):
        raise ValueError(f"bnorm: vars must have means' shape {tuple(means.shape)}, got {tuple(vars.shape)}")
    parts, channels = means.shape
    if tuple(counts.shape) not in ((parts,), (parts, channels)):
        raise ValueError(
            f"bnorm: counts must have shape ({parts},) or ({parts}, {channels}), got {tuple(counts.shape)}"
        )
    counts_dtype = xp.dtype_name(counts)
    if counts_dtype[:1] not in ("i", "u", "f") and counts_dtype != "bfloat16":
        raise TypeError(f"bnorm: counts must be integers or floats, got {counts_dtype}")
    table = xp.counts_table(counts, parts, channels)
    means = _exported(xp, means)
    vars = _exported(xp, vars)
    count = xp.empty((channels,), "float64")
    mean, var = xp.empty((channels,), dtype), xp.empty((channels,), dtype)
    _core.merge_stats(xp.export(table), means, vars, count, mean, var, xp.stream)
    if counts.ndim == 1:  # summed in Python: exact for integers, double for floats (not counts' own dtype)
        values = counts.tolist()
        count = sum(values) if xp.dtype_name(counts)[:1] in ("i", "u") else math.fsum(values)
    else:
        count = xp.wrap(count)
    return count, xp.wrap(mean), xp.wrap(var)


def normalize(
    x: Array, mean: Array, invstd: Array, weight: Optional[Array] = None, bias: Optional[Array] = None, *,
    axis: int = 1, residual: Optional[Array] = None, activation: Optional[str] = None, out: Optional[Array] = None,
    stream: Optional[int] = None,
) -> Array:
    """y = (x - mean) * invstd * weight + bias per channel (weight and bias may be None),
    then + residual and the activation when given (fused, as in ``forward_train``).
    The elementwise phase of ``forward_train``, for statistics computed elsewhere
    (e.g. merged across shards with ``merge_stats``)."""
    call = _Call(x, axis, stream)
    mean = call.vector(mean, "mean")
    invstd = call.vector(invstd, "invstd")
    weight = call.vector(weight, "weight", required=False)
    bias = call.vector(bias, "bias", required=False)
    relu = _relu(activation)
    residual = _residual(call, residual)
    y = call.output(out, *_given((residual, "residual")))
    _core.normalize(call.x, call.shape, mean, invstd, weight, bias, y.target, call.xp.stream, residual, relu)
    return y.done()


def backward_reduce(
    dy: Array, x: Array, mean: Array, invstd: Array, *, axis: int = 1, activation: Optional[str] = None,
    y: Optional[Array] = None, stream: Optional[int] = None,
) -> Tuple[Array, Array]:
    """The reduction phase of ``backward``: (sum_dy, sum_dy_xhat) per channel, with
    xhat = (x - mean) * invstd. Sum these over shards before ``backward_elemt``.
    With activation="relu" (y required, as in ``backward``), dy * (y > 0) is summed."""
    call = _Call(x, axis, stream)
    dy = call.input(dy, "dy")
    mean = call.vector(mean, "mean")
    invstd = call.vector(invstd, "invstd")
    relu = _relu(activation)
    y = _mask_source(call, relu, y)
    sum_dy, sum_dy_xhat = call.new_vector(), call.new_vector()
    _core.backward_reduce(dy, call.x, call.shape, mean, invstd, sum_dy, sum_dy_xhat, call.xp.stream, y, relu)
    return call.result(sum_dy), call.result(sum_dy_xhat)


def backward_elemt(
    dy: Array, x: Array, mean: Array, invstd: Array, weight: Optional[Array], sum_dy: Array, sum_dy_xhat: Array,
    count: Union[int, float, Array], *, axis: int = 1, activation: Optional[str] = None, y: Optional[Array] = None,
    out: Optional[Array] = None, stream: Optional[int] = None,
) -> Union[Array, Tuple[Array, Array]]:
    """The elementwise phase of ``backward`` with batch statistics:
    dx = weight * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count),
    where count is the number of values per channel over all shards (> 0): a number, a 0-d
    array, or the (C,) count of ``merge_stats`` when every channel has the same count.
    With activation="relu" (y required, as in ``backward``), dy * (y > 0) replaces dy and
    (dx, dsum) is returned, dsum = dy * (y > 0) written by the same pass."""
    call = _Call(x, axis, stream)
    dy = call.input(dy, "dy")
    mean = call.vector(mean, "mean")
    invstd = call.vector(invstd, "invstd")
    weight = call.vector(weight, "weight", required=False)
    sum_dy = call.vector(sum_dy, "sum_dy")
    sum_dy_xhat = call.vector(sum_dy_xhat, "sum_dy_xhat")
    count = _count_of(count, call.channels)
    relu = _relu(activation)
    y = _mask_source(call, relu, y)
    dx = call.output(out, *_given((dy, "dy"), (y, "y")))
    dsum = call.output_aligned_with(dx) if relu else None
    _core.backward_elemt(
        dy, call.x, call.shape, mean, invstd, weight, sum_dy, sum_dy_xhat, count, dx.target, call.xp.stream,
        y, relu, dsum.target if relu else None,
    )
    return (dx.done(), dsum.done()) if relu else dx.done()


def set_num_threads(n: int) -> None:
    """Set the number of CPU threads bnorm uses, at most 1024 or the number of processors
    if larger. The default is OMP_NUM_THREADS where set, else the CPUs this process may
    use (its affinity mask and cgroup CPU quota), and while the machine is busy it backs
    off to one thread for a while (docs/performance.md); a count set here is used as is.
    bnorm's count is its own: other libraries' settings (torch.set_num_threads,
    omp_set_num_threads) do not change it. Results are bitwise identical for any number
    of threads."""
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"bnorm: the number of threads must be an integer, got {n!r}")
    limit = _core.max_num_threads()
    if not 1 <= n <= limit:  # (C++ checks it too, with the same message, but takes an int)
        raise ValueError(f"bnorm: the number of threads must be in [1, {limit}], got {n}")
    _core.set_num_threads(int(n))


def get_num_threads() -> int:
    """The number of CPU threads bnorm uses."""
    return _core.get_num_threads()


def cpu_isa() -> str:
    """The instruction set of the CPU kernels in use: "baseline", "avx2" or "avx512" (the
    widest this CPU runs, unless the environment variable BNORM_CPU_ISA names another)."""
    return _core.cpu_isa()


def cuda_available() -> bool:
    """True when bnorm was built with CUDA and a usable CUDA device exists."""
    return _core.cuda_available()
