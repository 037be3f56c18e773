"""Synchronized batch normalization across processes and machines.

When data-parallel training splits a batch over several processes (ranks), batch
normalization must use the statistics of the *global* batch. ``bnorm.distributed`` does
that with bnorm's split-phase functions and one small collective per phase; it brings no
communication layer of its own but runs on an existing engine: MPI through mpi4py,
torch.distributed, CuPy's NCCL, or anything with an all-gather and a summing all-reduce.

Protocol, per training step (C = number of channels)::

    forward   local  count, mean, var = bnorm.batch_stats(x)
              comm   allgather of a (3, C) float64 buffer [count, mean, var]     3C values
              local  count, mean, var = bnorm.merge_stats(...)   (Chan; identical on all ranks)
              local  y = bnorm.normalize(x, mean, 1/sqrt(var + eps), weight, bias)
    backward  local  sum_dy, sum_dy_xhat = bnorm.backward_reduce(dy, x, mean, invstd)
              comm   allreduce(sum) of a (2, C) float64 buffer [sum_dy, sum_dy_xhat]   2C values
              local  dx = bnorm.backward_elemt(..., global sums, global count)

Eval mode does no communication. The layer is :class:`SyncBatchNorm`; the two collective
phases are also available as functions on arrays of any framework (NumPy, CuPy, PyTorch),
:func:`sync_batch_stats` and :func:`sync_backward_reduce`, for GPU pipelines that keep
their parameters on the device. See docs/distributed.md.

The communicator
----------------
``comm`` is an mpi4py communicator (wrapped in :class:`MPIComm`) or any object with these
two collective methods (the :class:`Communicator` protocol)::

    allgather(buf)      -> every rank's buf stacked in rank order, shape (size, *buf.shape)
                           (a list or tuple of `size` arrays is accepted too)
    allreduce_sum(buf)  -> the element-wise sum of buf over ranks, buf's shape
                           (it may reduce in place and return buf)

``buf`` is a small C-contiguous float64 array of the framework and device of the
statistics: a NumPy array for NumPy input, a CuPy array or torch tensor on the GPU for CUDA
input, so engines that take device buffers (NCCL, CUDA-aware MPI) never stage through the
host. An object with only ``allreduce_sum`` and integer ``rank`` and ``size`` attributes
works too: the all-gather is then an all-reduce of a zero-padded (size, 3, C) buffer
(exact, but size times the bytes).
"""

from __future__ import annotations

import numbers
from typing import Any, Protocol, Sequence, runtime_checkable

import numpy as np

import bnorm as _bn

from ._functional import _Call
from ._layer import BatchNorm, _activation_repr

__all__ = [
    "Communicator",
    "LocalComm",
    "MPIComm",
    "SyncBatchNorm",
    "as_communicator",
    "sync_backward_reduce",
    "sync_batch_stats",
]

_FAILED = -1.0  # the count a rank contributes when its local phase failed


# --------------------------------------------------------------------------------------
# Array-framework helpers: the few operations on per-channel vectors needed beyond bnorm's
# own functions, for NumPy (CPU), CuPy and PyTorch (GPU). No framework is imported unless
# an array of it is seen.
# --------------------------------------------------------------------------------------


class _NumpyOps:
    """NumPy, and CuPy through the same API (xp = cupy)."""

    device = False

    def __init__(self, xp: Any = np) -> None:
        self.xp = xp

    def pack(self, rows: Sequence[Any], channels: int, like: Any) -> Any:
        buf = self.xp.empty((len(rows), channels), dtype=self.xp.float64)
        for i, row in enumerate(rows):
            buf[i] = row  # broadcasts a scalar, casts a statistics vector
        return buf

    def empty(self, shape: tuple, like: Any) -> Any:
        return self.xp.empty(shape, dtype=like.dtype)

    def zeros(self, shape: tuple, like: Any) -> Any:
        return self.xp.zeros(shape, dtype=like.dtype)

    def stack(self, parts: Sequence[Any]) -> Any:
        return self.xp.stack([self.xp.asarray(p) for p in parts])

    def cast(self, a: Any, like: Any) -> Any:
        return self.xp.ascontiguousarray(a.astype(like.dtype, copy=False))

    def as_float64(self, a: Any) -> Any:
        return self.xp.asarray(a, dtype=self.xp.float64)

    def invstd(self, var: Any, eps: float) -> Any:
        return 1.0 / self.xp.sqrt(var + eps)

    def to_host(self, a: Any) -> np.ndarray:
        return np.asarray(a)

    def assign(self, dst: Any, src: Any) -> None:
        dst[...] = src

    def synchronize(self, a: Any) -> None:
        pass


class _CupyOps(_NumpyOps):
    device = True

    def __init__(self) -> None:
        import cupy

        super().__init__(cupy)

    def to_host(self, a: Any) -> np.ndarray:
        return self.xp.asnumpy(a)

    def synchronize(self, a: Any) -> None:
        # Host-driven engines (MPI) read device memory outside CuPy's stream order; the
        # current stream is per device (bnorm's default for CuPy arrays).
        with a.device:
            self.xp.cuda.get_current_stream().synchronize()


class _TorchOps:
    device = True

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def pack(self, rows: Sequence[Any], channels: int, like: Any) -> Any:
        buf = self.torch.empty((len(rows), channels), dtype=self.torch.float64, device=like.device)
        for i, row in enumerate(rows):
            buf[i] = row
        return buf

    def empty(self, shape: tuple, like: Any) -> Any:
        return self.torch.empty(shape, dtype=like.dtype, device=like.device)

    def zeros(self, shape: tuple, like: Any) -> Any:
        return self.torch.zeros(shape, dtype=like.dtype, device=like.device)

    def stack(self, parts: Sequence[Any]) -> Any:
        return self.torch.stack(list(parts))

    def cast(self, a: Any, like: Any) -> Any:
        return a.to(like.dtype).contiguous()

    def as_float64(self, a: Any) -> Any:
        return a.to(self.torch.float64)

    def invstd(self, var: Any, eps: float) -> Any:
        return 1.0 / self.torch.sqrt(var + eps)

    def to_host(self, a: Any) -> np.ndarray:
        return a.detach().cpu().numpy()

    def assign(self, dst: Any, src: Any) -> None:
        dst.copy_(src)

    def synchronize(self, a: Any) -> None:
        if a.is_cuda:
            self.torch.cuda.current_stream(a.device).synchronize()


_NUMPY_OPS = _NumpyOps()


def _ops_for(a: Any) -> Any:
    """The helpers for arrays like a (bnorm's results: NumPy on the CPU, else the input's
    CUDA framework)."""
    if isinstance(a, (np.ndarray, np.generic)):
        return _NUMPY_OPS
    module = type(a).__module__.split(".")[0]
    if module == "cupy":
        return _CupyOps()
    if module == "torch":
        return _TorchOps()
    raise TypeError(
        "bnorm.distributed: statistics must be NumPy arrays, CuPy arrays or torch tensors, "
        f"got {type(a).__module__}.{type(a).__qualname__}"
    )


def _ops_for_input(x: Any) -> Any:
    """The helpers for the statistics bnorm computes from x, without computing them."""
    dlpack_device = getattr(x, "__dlpack_device__", None)
    if not isinstance(x, np.ndarray) and callable(dlpack_device):
        try:
            if dlpack_device()[0] == 2:  # kDLCUDA: results in x's framework
                return _ops_for(x)
        except Exception:
            pass
    return _NUMPY_OPS


def _assign(dst: Any, src: Any) -> None:
    """dst[...] = src in place (running buffers keep their identity), across frameworks."""
    if isinstance(dst, np.ndarray):
        dst[...] = src if isinstance(src, np.ndarray) else _ops_for(src).to_host(src)
    else:
        _ops_for(dst).assign(dst, src)


def _stream_kw(stream: Any) -> dict:
    return {} if stream is None else {"stream": stream}


def _shape_of(a: Any) -> tuple:
    return tuple(int(n) for n in a.shape)


# --------------------------------------------------------------------------------------
# Communicators
# --------------------------------------------------------------------------------------


@runtime_checkable
class Communicator(Protocol):
    """What bnorm.distributed needs from a communication engine.

    Both methods are collective: every rank calls them in the same order with buffers of
    the same shape. ``buf`` is a C-contiguous float64 array of the statistics' framework
    and device (NumPy on the CPU; CuPy or torch on the GPU); it is scratch owned by the
    caller and may be overwritten.
    """

    def allgather(self, buf: Any) -> Any:
        """Every rank's ``buf`` stacked in rank order: shape ``(size, *buf.shape)``.
        A list or tuple of ``size`` arrays is accepted too."""
        ...

    def allreduce_sum(self, buf: Any) -> Any:
        """The element-wise sum of ``buf`` over ranks, same shape (may be ``buf`` itself)."""
        ...


class LocalComm:
    """The trivial communicator of a single process (size 1): SyncBatchNorm then computes
    what BatchNorm computes. Useful for tests and for code that runs both ways."""

    rank = 0
    size = 1

    def allgather(self, buf: Any) -> Any:
        return buf[None]

    def allreduce_sum(self, buf: Any) -> Any:
        return buf

    def __repr__(self) -> str:
        return "LocalComm()"


class MPIComm:
    """Adapter for an mpi4py communicator (``MPI.COMM_WORLD`` or any intra-communicator).

    Uses the buffer-based collectives ``Allgather`` and ``Allreduce`` (no pickling).
    mpi4py also takes CUDA buffers (CuPy arrays, torch tensors, through DLPack or
    ``__cuda_array_interface__``); with a CUDA-aware MPI build they are passed to MPI as
    device pointers. The current CUDA stream is synchronized first, as mpi4py requires.
    """

    def __init__(self, comm: Any) -> None:
        if not (hasattr(comm, "Allgather") and hasattr(comm, "Allreduce")):
            raise TypeError(
                "bnorm.distributed.MPIComm: expected an mpi4py communicator, got "
                f"{type(comm).__module__}.{type(comm).__qualname__}"
            )
        self.comm = comm

    @property
    def rank(self) -> int:
        return self.comm.Get_rank()

    @property
    def size(self) -> int:
        return self.comm.Get_size()

    def allgather(self, buf: Any) -> Any:
        ops = _ops_for(buf)
        ops.synchronize(buf)
        out = ops.empty((self.comm.Get_size(),) + _shape_of(buf), buf)
        self.comm.Allgather(buf, out)
        return out

    def allreduce_sum(self, buf: Any) -> Any:
        from mpi4py import MPI

        ops = _ops_for(buf)
        ops.synchronize(buf)
        out = ops.empty(_shape_of(buf), buf)
        self.comm.Allreduce(buf, out, op=MPI.SUM)
        return out

    def __repr__(self) -> str:
        return f"MPIComm(rank={self.rank}, size={self.size})"


def _is_mpi4py_comm(comm: Any) -> bool:
    return type(comm).__module__.split(".")[0] == "mpi4py" and hasattr(comm, "Allgather")


def as_communicator(comm: Any) -> Any:
    """The communicator bnorm.distributed uses for ``comm``:

    - an mpi4py communicator: ``MPIComm(comm)``;
    - an object with ``allgather`` and ``allreduce_sum`` (:class:`Communicator`): itself;
    - an object with ``allreduce_sum`` and integer ``rank`` and ``size``: itself (the
      all-gather is emulated by an all-reduce of a zero-padded buffer).

    Raises TypeError for anything else.
    """
    if isinstance(comm, (MPIComm, LocalComm)):
        return comm
    if _is_mpi4py_comm(comm):
        return MPIComm(comm)
    if callable(getattr(comm, "allreduce_sum", None)):
        if callable(getattr(comm, "allgather", None)):
            return comm
        rank, size = getattr(comm, "rank", None), getattr(comm, "size", None)
        if isinstance(rank, numbers.Integral) and isinstance(size, numbers.Integral):
            return comm
    raise TypeError(
        "bnorm.distributed: comm must be an mpi4py communicator or an object with methods "
        "allgather(buf) and allreduce_sum(buf) (or allreduce_sum(buf) and integer rank and "
        f"size attributes); got {type(comm).__module__}.{type(comm).__qualname__}"
    )


def _allgather(comm: Any, buf: Any, ops: Any) -> Any:
    gather = getattr(comm, "allgather", None)
    if callable(gather):
        out = gather(buf)
        if isinstance(out, (list, tuple)):
            out = ops.stack(out)
        return out
    # Emulation over all-reduce: every rank writes its buf into its own row of zeros;
    # adding zeros is exact, so this is bitwise an all-gather.
    rank, size = int(comm.rank), int(comm.size)
    padded = ops.zeros((size,) + _shape_of(buf), buf)
    padded[rank] = buf
    return comm.allreduce_sum(padded)


# --------------------------------------------------------------------------------------
# The two collective phases
# --------------------------------------------------------------------------------------


class _GlobalStats:
    """The merged statistics of one forward: the count (a float, exact below 2**53), the
    mean and biased variance in float64, and `like`, an array of the statistics dtype."""

    __slots__ = ("count", "mean", "var", "like", "ops", "ranks", "x")

    def __init__(self, count, mean, var, like, ops, ranks, x):
        self.count, self.mean, self.var, self.like, self.ops, self.ranks = count, mean, var, like, ops, ranks
        self.x = x  # the input as checked (and possibly converted) by `check`


def _global_stats(x: Any, comm: Any, axis: int, channels: int | None, check: Any = None,
                  stream: Any = None) -> _GlobalStats:
    """Phase 1: local batch_stats, one all-gather of (3, C) float64, Chan's merge.

    A rank whose local part fails (bad input) still takes part in the all-gather with a
    count of -1 and then raises its error; every other rank raises RuntimeError, so a bad
    input on one rank never leaves the others waiting in a collective.
    """
    error: BaseException | None = None
    ops = _ops_for_input(x)
    like = None
    local = None
    try:
        if check is not None:
            x = check(x)
        count, mean, var = _bn.batch_stats(x, axis=axis, **_stream_kw(stream))
        ops, like = _ops_for(mean), mean
        channels = int(mean.shape[0])
        local = ops.pack([float(count), mean, var], channels, mean)
    except Exception as exc:  # still take part in the collective: nobody hangs
        error = exc
        if channels is None:  # C unknown (x has no usable shape): cannot join, raise now
            raise
        local = ops.pack([_FAILED, np.nan, np.nan], channels, x)

    gathered = _allgather(comm, local, ops)
    if error is not None:
        raise error

    shape = _shape_of(gathered)
    if len(shape) != 3 or shape[1:] != (3, channels) or shape[0] < 1:
        raise ValueError(
            f"bnorm.distributed: the communicator's allgather returned shape {shape}, "
            f"expected (size, 3, {channels})"
        )
    counts = ops.to_host(gathered[:, 0, 0])  # size values; the only read-back on a GPU
    failed = [r for r, n in enumerate(counts.tolist()) if not n >= 0]
    if failed:
        raise RuntimeError(
            f"bnorm.distributed: the forward failed on rank(s) {failed} (see the error raised "
            "there); nothing was updated"
        )
    total = float(np.sum(counts, dtype=np.float64))
    _, mean, var = _bn.merge_stats(gathered[:, 0, 0], gathered[:, 1, :], gathered[:, 2, :])
    return _GlobalStats(total, ops.as_float64(mean), ops.as_float64(var), like, ops, shape[0], x)


def sync_batch_stats(x: Any, comm: Any, *, axis: int = 1, stream: Any = None) -> tuple:
    """``bnorm.batch_stats`` of the global batch: every rank passes its slice x.

    Collective (one all-gather of 3C float64 values). Returns ``(count, mean, var)``:
    the total number of values per channel over all ranks (an int) and the per-channel
    mean and biased variance in the statistics dtype (float32 for 16-bit x, else x's),
    arrays of x's framework and device, bitwise identical on every rank. A rank may pass
    an empty slice. Works for CUDA arrays (CuPy, PyTorch): the buffer handed to the
    communicator is then a device array; ``stream`` is passed to bnorm's CUDA calls (the
    communicator should order its work after them, e.g. on the same stream). On the GPU the
    `size` gathered counts are read back to the host (one small synchronizing copy).
    """
    comm = as_communicator(comm)
    try:  # known C lets a rank with a bad x still join the all-gather (see _global_stats)
        channels = int(x.shape[axis])
    except Exception:  # noqa: BLE001 -- batch_stats will raise the proper error
        channels = None
    g = _global_stats(x, comm, axis, channels, stream=stream)
    return int(g.count), g.ops.cast(g.mean, g.like), g.ops.cast(g.var, g.like)


def sync_backward_reduce(dy: Any, x: Any, mean: Any, invstd: Any, comm: Any, *, axis: int = 1,
                         activation: Any = None, y: Any = None, stream: Any = None) -> tuple:
    """``bnorm.backward_reduce`` summed over all ranks: ``(sum_dy, sum_dy_xhat)`` of the
    global batch, for ``bnorm.backward_elemt`` with the global count. activation and y as
    in ``bnorm.backward_reduce`` (the fused epilogue's ReLU: dy * (y > 0) is summed).

    Collective (one all-reduce of 2C float64 values). mean and invstd are the global
    statistics (from :func:`sync_batch_stats`). If the local reduction fails on this rank,
    it still contributes NaNs to the all-reduce before raising, so no rank hangs.
    """
    comm = as_communicator(comm)
    return _global_sums(dy, x, mean, invstd, comm, axis, stream, activation=activation, y=y)


def _global_sums(dy: Any, x: Any, mean: Any, invstd: Any, comm: Any, axis: int, stream: Any = None,
                 **fused: Any) -> tuple:
    ops = _ops_for(mean)
    channels = int(mean.shape[0])
    error: BaseException | None = None
    try:
        sum_dy, sum_dy_xhat = _bn.backward_reduce(dy, x, mean, invstd, axis=axis, **fused, **_stream_kw(stream))
        local = ops.pack([sum_dy, sum_dy_xhat], channels, mean)
    except Exception as exc:
        error = exc
        local = ops.pack([np.nan, np.nan], channels, mean)
    reduced = comm.allreduce_sum(local)
    if error is not None:
        raise error
    if _shape_of(reduced) != (2, channels):
        raise ValueError(
            f"bnorm.distributed: the communicator's allreduce_sum returned shape "
            f"{_shape_of(reduced)}, expected (2, {channels})"
        )
    return ops.cast(reduced[0], mean), ops.cast(reduced[1], mean)


# --------------------------------------------------------------------------------------
# The layer
# --------------------------------------------------------------------------------------


class SyncBatchNorm(BatchNorm):
    """``bnorm.BatchNorm`` whose training statistics are those of the global batch.

    ``SyncBatchNorm(num_features, comm, *, eps=1e-5, momentum=0.1, affine=True,
    track_running_stats=True, axis=1, dtype=numpy.float32, unbiased_running_var=True, activation=None)``

    ``activation`` and ``layer(x, residual=z)`` are BatchNorm's fused epilogue; ``backward``
    then returns ``(dx, dresidual)`` as BatchNorm's does.

    ``comm``: an mpi4py communicator or a :class:`Communicator` (see
    :func:`as_communicator`). Same attributes and methods as BatchNorm (like it, on NumPy
    arrays or on CUDA arrays of PyTorch or CuPy, its vectors following x's device). Every
    rank calls it, and ``backward``, in the same order, each with its own slice of the
    global batch; slices may differ in size and may be empty. In training mode:

    - forward normalizes with the mean and biased variance of the global batch (one
      all-gather of 3C values) and updates the running statistics with the global mean and
      unbiased variance (count/(count-1) of the global count; the biased one with
      ``unbiased_running_var=False``): they stay bitwise identical on every rank;
    - backward all-reduces (sum dy, sum dy*xhat) (2C values) and returns this rank's slice
      of the gradient of the global batch. ``grad_weight`` and ``grad_bias`` are the sums
      over the global batch, identical on every rank: do not all-reduce them again.

    In eval mode there is no communication: the running statistics are used (or this
    rank's batch statistics when ``track_running_stats=False``), and ``grad_weight`` and
    ``grad_bias`` are this rank's local sums, to be reduced like any other gradient.

    A call that raises, a communicator error included, leaves the running statistics and
    ``num_batches_tracked`` as they were: they are written last, after every collective.
    A bad input on one rank makes every rank raise (that rank's ValueError/TypeError,
    RuntimeError elsewhere) instead of hanging. A global batch of one value per channel
    raises BatchNorm's ValueError on every rank.
    """

    def __init__(self, num_features: int, comm: Any, **kwargs: Any) -> None:
        if kwargs.get("virtual_batch_size") is not None:
            raise ValueError("bnorm: SyncBatchNorm normalizes with the global batch's statistics: no virtual_batch_size")
        super().__init__(num_features, **kwargs)
        self.comm = as_communicator(comm)
        self._sync_saved: tuple | None = None
        self._last: str | None = None  # "sync", "local" or None (no successful forward)

    @classmethod
    def from_batchnorm(cls, bn: BatchNorm, comm: Any) -> "SyncBatchNorm":
        """A SyncBatchNorm with bn's settings, parameters, buffers and mode (copied)."""
        sbn = cls(
            bn.num_features,
            comm,
            eps=bn.eps,
            momentum=bn.momentum,
            affine=bn.affine,
            track_running_stats=bn.track_running_stats,
            axis=bn.axis,
            dtype=bn.dtype,
            unbiased_running_var=bn.unbiased_running_var,
            activation=bn.activation,
        )
        sbn.load_state_dict(bn.state_dict())
        sbn.train(bn.training)
        return sbn

    # -- forward ------------------------------------------------------------------------

    # (__call__ is BatchNorm's: it undoes a move of the vectors when the call raises, then
    # runs _call below)

    def _call(self, x: Any, residual: Any) -> Any:
        """Normalize this rank's slice x (then add residual and apply the activation, fused).
        Training: global batch statistics (collective). Eval: as BatchNorm, without
        communication."""
        self._last = None
        self._sync_saved = None
        if not self.training:
            y = super()._call(x, residual)
            self._last = "local"
            return y
        checked = {}

        def check(x):  # the residual and running_var too are checked before the collective
            x = self._check_input(x)
            if self.track_running_stats and isinstance(x, np.ndarray):  # (device buffers: a host sync)
                self._check_running_buffers(x)  # as forward_train checks them: the update below cannot fail
            if residual is not None:
                checked["residual"] = _Call(x, self.axis, None).input(residual, "residual")
            return x

        g = _global_stats(x, self.comm, self.axis, self.num_features, check=check)
        x = g.x
        if g.count == 1:
            raise ValueError(
                "expected more than 1 value per channel when training, got input of shape "
                f"{_shape_of(x)} (1 value per channel over all {g.ranks} ranks)"
            )
        ops, like = g.ops, g.like
        mean = ops.cast(g.mean, like)
        invstd = ops.cast(ops.invstd(g.var, self.eps), like)
        y = _bn.normalize(x, mean, invstd, self.weight, self.bias, axis=self.axis, activation=self.activation,
                          **checked)
        updates = self._running_updates(g)
        # Commit last: every collective and computation of this step has succeeded.
        for dst, src in updates:
            if dst is None:
                self.num_batches_tracked = src
            else:
                _assign(dst, src)
        self._sync_saved = (x, mean, invstd, g.count)
        self._fused = (y if self.activation == "relu" else None, residual is not None)
        self._last = "sync"
        return y

    def _check_input(self, x: Any) -> Any:
        """x as a C-contiguous NumPy array (CPU arrays of other frameworks are converted, as
        BatchNorm does), or x itself when it is a CUDA array (the layer's vectors then moved
        to x's device, as BatchNorm moves them). Raises as BatchNorm would for an x this
        layer cannot take. Runs before the collective (a bad input on one rank then makes
        every rank raise)."""
        x = self._input(x)  # as BatchNorm: CPU arrays converted, checked, the vectors moved to x's device
        if isinstance(x, np.ndarray) and not x.flags.c_contiguous:
            x = np.ascontiguousarray(x)  # once, rather than in each of the three phases
        return x

    def _running_updates(self, g: _GlobalStats) -> list:
        """(buffer, new value) pairs, computed before anything is written."""
        if not self.track_running_stats or g.count == 0:  # empty global batch: as BatchNorm
            return []
        nbt = int(self.num_batches_tracked) + 1
        factor = (1.0 / nbt) if self.momentum is None else float(self.momentum)
        unbias = g.count / (g.count - 1) if self.unbiased_running_var else 1.0
        ops, mean, var = g.ops, g.mean, g.var
        rm, rv = self.running_mean, self.running_var
        if isinstance(rm, np.ndarray) and ops.device:
            ops, mean, var = _NUMPY_OPS, ops.to_host(mean), ops.to_host(var)
        # The single-process formula and precision: double, rounded once to the buffer dtype.
        new_rm = (1 - factor) * ops.as_float64(rm) + factor * mean
        new_rv = (1 - factor) * ops.as_float64(rv) + factor * var * unbias
        return [(rm, ops.cast(new_rm, rm)), (rv, ops.cast(new_rv, rv)), (None, nbt)]

    # -- backward -----------------------------------------------------------------------

    def backward(self, dy: Any) -> Any:
        """dx for this rank's slice. Training: collective (global sums); sets grad_weight
        and grad_bias to the global sums. Eval: as BatchNorm (local sums)."""
        if self._last is None:
            raise RuntimeError("bnorm: SyncBatchNorm.backward called before a successful forward call")
        if self._last == "local":
            return super().backward(dy)
        x, mean, invstd, count = self._sync_saved
        if isinstance(dy, np.ndarray) and not dy.flags.c_contiguous:
            dy = np.ascontiguousarray(dy)
        mask = self._fused[0]
        fused = {} if mask is None else {"activation": "relu", "y": mask}
        sum_dy, sum_dy_xhat = _global_sums(dy, x, mean, invstd, self.comm, self.axis, **fused)
        # An empty global batch (count 0) means an empty x here: dx is empty whatever count.
        dx = _bn.backward_elemt(
            dy, x, mean, invstd, self.weight, sum_dy, sum_dy_xhat, max(count, 1.0), axis=self.axis, **fused
        )
        dx, dsum = dx if mask is not None else (dx, dy)
        if self.affine:
            self.grad_weight, self.grad_bias = sum_dy_xhat, sum_dy
        return (dx, dsum) if self._fused[1] else dx

    def __repr__(self) -> str:
        return (
            f"SyncBatchNorm({self.num_features}, comm={self.comm!r}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, axis={self.axis}, "
            f"dtype={self.dtype.name}" + ("" if self.unbiased_running_var else ", unbiased_running_var=False")
            + f"{_activation_repr(self.activation)})"
        )
