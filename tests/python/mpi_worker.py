"""Scenarios for bnorm.distributed.SyncBatchNorm, run on every rank of a communicator.

Each scenario compares SyncBatchNorm on this rank's slice of a global batch with
single-process bnorm.BatchNorm on the whole (concatenated) batch, which every rank
computes too (the data comes from a generator seeded identically on every rank).

Two drivers use it:
- test_distributed.py runs the scenarios in-process, one thread per simulated rank, over a
  fake communicator (no MPI needed);
- ``mpiexec -n N python mpi_worker.py CASE...`` runs them over mpi4py's COMM_WORLD and
  writes one JSON line per case and rank: {"case", "rank", "size", "failures"};
  ``--engine torch`` runs them over torch.distributed (Gloo) with the documented adapter.

Scenarios never raise on a mismatch: they collect failure messages and carry on, so that
every rank always makes the same sequence of collective calls (an assertion on one rank
must not leave the others waiting). An unexpected exception under MPI aborts the job.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import numpy as np

import bnorm
from bnorm.distributed import SyncBatchNorm, as_communicator

# Tolerances (relative to max(1, max|reference|)): x-shaped outputs and per-channel results.
TOL = {
    "float64": {"out": 1e-12, "stat": 1e-12},
    "float32": {"out": 1e-5, "stat": 1e-5},
    "float16": {"out": 1e-3, "stat": 1e-5},
}


class _CountingReduceOnly:
    """Wraps a communicator and counts its collective calls (all-reduce only)."""

    def __init__(self, comm):
        self.inner = as_communicator(comm)
        self.calls = 0
        self.rank, self.size = comm.rank, comm.size

    def allreduce_sum(self, buf):
        self.calls += 1
        return self.inner.allreduce_sum(buf)


class _CountingGather(_CountingReduceOnly):
    def __init__(self, comm):
        self.inner = as_communicator(comm)
        self.calls = 0

    def allgather(self, buf):
        self.calls += 1
        out = self.inner.allgather(buf)
        return np.stack(out) if isinstance(out, (list, tuple)) else out


def CountingComm(comm):  # noqa: N802 -- a factory standing for a class
    """comm, counting its collective calls, with the same methods (no allgather if comm
    has none)."""
    inner = as_communicator(comm)
    return _CountingGather(inner) if callable(getattr(inner, "allgather", None)) else _CountingReduceOnly(inner)


def gather_all(comm, buf):
    """Every rank's buf (numpy, float64), stacked; over any supported communicator."""
    if callable(getattr(comm, "allgather", None)):
        out = comm.allgather(buf)
        return np.stack(out) if isinstance(out, (list, tuple)) else np.asarray(out)
    padded = np.zeros((comm.size,) + buf.shape)
    padded[comm.rank] = buf
    return np.asarray(comm.allreduce_sum(padded))


def param_dtype(dtype):
    return np.dtype(np.float32) if np.dtype(dtype).itemsize == 2 else np.dtype(dtype)


def splits_for(mode, size, step=0):
    """Per-rank batch sizes (along axis 0). 'uneven': all different; 'empty': uneven with
    one empty rank, a different one at each step."""
    if mode == "uneven":
        return [3 + 2 * r for r in range(size)]
    if mode == "empty":
        base = [3 + 2 * r for r in range(size)]
        if size == 1:
            return base
        base[step % size] = 0
        return base
    raise ValueError(mode)


class Checker:
    def __init__(self, rank):
        self.rank = rank
        self.failures = []

    def close(self, got, ref, tol, what):
        got = np.asarray(got, dtype=np.float64)
        ref = np.asarray(ref, dtype=np.float64)
        if got.shape != ref.shape:
            self.failures.append(f"{what}: shape {got.shape} != {ref.shape}")
            return
        if got.size == 0:
            return
        if not np.array_equal(np.isnan(got), np.isnan(ref)):
            self.failures.append(f"{what}: NaN positions differ")
            return
        finite = np.isfinite(ref)
        scale = max(1.0, float(np.max(np.abs(ref[finite])))) if finite.any() else 1.0
        err = float(np.max(np.abs(got[finite] - ref[finite]))) if finite.any() else 0.0
        if not err <= tol * scale:
            self.failures.append(f"{what}: max error {err:.3g} > {tol:g} * {scale:.3g}")

    def equal(self, got, ref, what):
        if got != ref:
            self.failures.append(f"{what}: {got!r} != {ref!r}")

    def true(self, cond, what):
        if not cond:
            self.failures.append(what)


def _make(rng, shape, axis, dtype, loc):
    """Random x with a different mean and std per channel, and dy."""
    ax = axis % len(shape)
    c = shape[ax]
    bshape = [1] * len(shape)
    bshape[ax] = c
    mu = rng.uniform(-1, 1, c).reshape(bshape) * loc
    sd = rng.uniform(0.5, 2.0, c).reshape(bshape)
    x = (rng.standard_normal(shape) * sd + mu).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    return x, dy


def run_training(comm, rank, size, *, tail=(5,), axis=1, dtype="float64", mode="uneven", steps=3,
                 kwargs=None, loc=2.0, eval_steps=1, seed=1234, tol_scale=1.0):
    """Several training steps (forward, backward, SGD update), then eval steps, comparing
    SyncBatchNorm on each rank with BatchNorm on the concatenated batch."""
    kwargs = dict(kwargs or {})
    chk = Checker(rank)
    tol = {k: v * tol_scale for k, v in TOL[dtype].items()}
    rng = np.random.default_rng(seed)  # identical stream on every rank
    shape0 = (1,) + tuple(tail)
    C = shape0[axis % len(shape0)]
    p = param_dtype(dtype)
    ref = bnorm.BatchNorm(C, axis=axis, dtype=dtype, **kwargs)
    counting = CountingComm(comm)
    sbn = SyncBatchNorm(C, counting, axis=axis, dtype=dtype, **kwargs)
    if ref.affine:
        w = rng.uniform(0.5, 1.5, C).astype(p) * rng.choice([-1, 1], C).astype(p)
        b = rng.uniform(-1, 1, C).astype(p)
        ref.weight[...] = w
        ref.bias[...] = b
        sbn.weight[...] = w
        sbn.bias[...] = b
    if ref.track_running_stats:
        rm = rng.uniform(-1, 1, C).astype(p)
        rv = rng.uniform(0.5, 2, C).astype(p)
        ref.running_mean[...] = rm
        ref.running_var[...] = rv
        sbn.running_mean[...] = rm
        sbn.running_var[...] = rv
    for step in range(steps):
        splits = splits_for(mode, size, step)
        lo, hi = sum(splits[:rank]), sum(splits[: rank + 1])
        x, dy = _make(rng, (sum(splits),) + tuple(tail), axis, dtype, loc)
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        y = sbn(x[lo:hi])
        dx = sbn.backward(dy[lo:hi])
        tag = f"step {step} (splits {splits})"
        chk.close(y, y_ref[lo:hi], tol["out"], f"{tag} y")
        chk.close(dx, dx_ref[lo:hi], tol["out"], f"{tag} dx")
        chk.true(y.dtype == y_ref.dtype and dx.dtype == dx_ref.dtype, f"{tag}: output dtypes")
        if ref.affine:
            chk.close(sbn.grad_weight, ref.grad_weight, tol["stat"], f"{tag} grad_weight")
            chk.close(sbn.grad_bias, ref.grad_bias, tol["stat"], f"{tag} grad_bias")
            chk.true(sbn.grad_weight.dtype == p and sbn.grad_bias.dtype == p, f"{tag}: grad dtypes")
        else:
            chk.true(sbn.grad_weight is None and sbn.grad_bias is None, f"{tag}: grads must be None")
        if ref.track_running_stats:
            chk.close(sbn.running_mean, ref.running_mean, tol["stat"], f"{tag} running_mean")
            chk.close(sbn.running_var, ref.running_var, tol["stat"], f"{tag} running_var")
            chk.equal(sbn.num_batches_tracked, ref.num_batches_tracked, f"{tag} num_batches_tracked")
            chk.true(sbn.running_mean.dtype == p, f"{tag}: running_mean dtype")
        if ref.affine:  # SGD, each layer with its own gradients
            for layer in (ref, sbn):
                layer.weight -= (0.1 * layer.grad_weight).astype(p)
                layer.bias -= (0.1 * layer.grad_bias).astype(p)
        chk.equal(counting.calls, 2 * (step + 1), f"{tag}: collective calls")

    if ref.track_running_stats:  # identical bits on every rank
        mine = np.concatenate([sbn.running_mean, sbn.running_var]).astype(np.float64)
        every = gather_all(counting.inner, mine.copy())
        chk.true(all(np.array_equal(row, mine) for row in every), "running stats differ across ranks")
    if ref.affine:
        mine = np.concatenate([sbn.weight, sbn.bias]).astype(np.float64)
        every = gather_all(counting.inner, mine.copy())
        chk.true(all(np.array_equal(row, mine) for row in every), "parameters differ across ranks")

    ref.eval()
    sbn.eval()
    for step in range(eval_steps):
        splits = splits_for(mode, size, step)
        lo, hi = sum(splits[:rank]), sum(splits[: rank + 1])
        x, dy = _make(rng, (sum(splits),) + tuple(tail), axis, dtype, loc)
        before = counting.calls
        if not ref.track_running_stats:  # eval uses batch statistics, local ones: compare locally
            ref_local = bnorm.BatchNorm(C, axis=axis, dtype=dtype, **kwargs).eval()
            if ref.affine:
                ref_local.weight[...] = ref.weight
                ref_local.bias[...] = ref.bias
            if hi - lo > 0 and np.prod(x[lo:hi].shape) // C > 1:
                y_ref = ref_local(x[lo:hi])
                dx_ref = ref_local.backward(dy[lo:hi])
                y, dx = sbn(x[lo:hi]), sbn.backward(dy[lo:hi])
                chk.close(y, y_ref, tol["out"], f"eval {step} y (local stats)")
                chk.close(dx, dx_ref, tol["out"], f"eval {step} dx (local stats)")
            chk.equal(counting.calls, before, f"eval {step}: collective calls in eval mode")
            continue
        y_ref = ref(x)
        dx_ref = ref.backward(dy)
        rm, rv, nbt = sbn.running_mean.copy(), sbn.running_var.copy(), sbn.num_batches_tracked
        y = sbn(x[lo:hi])
        dx = sbn.backward(dy[lo:hi])
        chk.equal(counting.calls, before, f"eval {step}: collective calls in eval mode")
        chk.close(y, y_ref[lo:hi], tol["out"], f"eval {step} y")
        chk.close(dx, dx_ref[lo:hi], tol["out"], f"eval {step} dx")
        chk.true(np.array_equal(rm, sbn.running_mean) and np.array_equal(rv, sbn.running_var)
                 and nbt == sbn.num_batches_tracked, f"eval {step}: running statistics changed")
        if ref.affine:  # local sums in eval mode: their sum over ranks is the global one
            local = np.stack([sbn.grad_weight, sbn.grad_bias]).astype(np.float64)
            total = np.asarray(counting.inner.allreduce_sum(local.copy()))
            chk.close(total[0], ref.grad_weight, tol["stat"], f"eval {step} sum of grad_weight")
            chk.close(total[1], ref.grad_bias, tol["stat"], f"eval {step} sum of grad_bias")
    return chk.failures


def run_single_value(comm, rank, size, *, dtype="float64"):
    """A global batch of one value per channel: every rank raises BatchNorm's ValueError and
    nothing changes; then a normal step works (ranks are still in step)."""
    chk = Checker(rank)
    C = 3
    sbn = SyncBatchNorm(C, comm, dtype=dtype)
    rm, rv = sbn.running_mean.copy(), sbn.running_var.copy()
    x = np.full((1 if rank == 0 else 0, C), 2.0, dtype=dtype)
    try:
        sbn(x)
        chk.failures.append("no ValueError for a global batch of 1 value per channel")
    except ValueError as exc:
        chk.true("expected more than 1 value per channel when training" in str(exc), f"message: {exc}")
    chk.true(np.array_equal(rm, sbn.running_mean) and np.array_equal(rv, sbn.running_var)
             and sbn.num_batches_tracked == 0, "running statistics changed by a failed step")
    try:
        sbn.backward(np.zeros_like(x))
        chk.failures.append("backward after a failed forward did not raise")
    except RuntimeError:
        pass
    x = np.arange(2 * C, dtype=dtype).reshape(2, C) + rank
    y = sbn(x)
    chk.true(np.all(np.isfinite(y)), "the step after the error")
    chk.equal(sbn.num_batches_tracked, 1, "num_batches_tracked after the good step")
    return chk.failures


def run_all_empty(comm, rank, size, *, dtype="float32"):
    """Every rank empty: empty results, running statistics untouched (as BatchNorm)."""
    chk = Checker(rank)
    C = 4
    ref = bnorm.BatchNorm(C, dtype=dtype)
    sbn = SyncBatchNorm(C, comm, dtype=dtype)
    x = np.empty((0, C, 3), dtype=dtype)
    y_ref, y = ref(x), sbn(x)
    chk.equal(y.shape, y_ref.shape, "y shape")
    chk.equal(sbn.num_batches_tracked, ref.num_batches_tracked, "num_batches_tracked")
    chk.true(np.array_equal(sbn.running_mean, ref.running_mean)
             and np.array_equal(sbn.running_var, ref.running_var), "running statistics")
    dx_ref, dx = ref.backward(x), sbn.backward(x)
    chk.equal(dx.shape, dx_ref.shape, "dx shape")
    chk.close(sbn.grad_weight, ref.grad_weight, 0, "grad_weight")
    chk.close(sbn.grad_bias, ref.grad_bias, 0, "grad_bias")
    return chk.failures


def run_bad_input(comm, rank, size):
    """Rank 0 passes x with the wrong number of channels: every rank raises (rank 0 its
    ValueError, the others RuntimeError), nobody hangs, nothing changes; the next step works."""
    chk = Checker(rank)
    C = 3
    sbn = SyncBatchNorm(C, comm, dtype=np.float64)
    rm = sbn.running_mean.copy()
    x = np.ones((4, C + 1 if rank == 0 else C), dtype=np.float64)
    expected = ValueError if rank == 0 else RuntimeError
    try:
        sbn(x)
        chk.failures.append("no error for a bad input")
    except expected:
        pass
    except Exception as exc:  # noqa: BLE001
        chk.failures.append(f"expected {expected.__name__}, got {type(exc).__name__}: {exc}")
    chk.true(np.array_equal(rm, sbn.running_mean) and sbn.num_batches_tracked == 0, "state changed")
    x = np.arange(4 * C, dtype=np.float64).reshape(4, C) * (rank + 1)
    sbn(x)
    sbn.backward(np.ones_like(x))
    chk.equal(sbn.num_batches_tracked, 1, "the step after the error")
    return chk.failures


def _training(**kw):
    return lambda comm, rank, size: run_training(comm, rank, size, **kw)


SCENARIOS = {
    "f64-2d-uneven": _training(tail=(5,), dtype="float64", mode="uneven"),
    "f64-2d-empty": _training(tail=(5,), dtype="float64", mode="empty", steps=4),
    "f32-4d-uneven": _training(tail=(3, 4, 5), dtype="float32", mode="uneven"),
    "f32-4d-empty": _training(tail=(3, 4, 5), dtype="float32", mode="empty", steps=4),
    "f64-3d-empty": _training(tail=(4, 7), dtype="float64", mode="empty"),
    "f64-channels-last": _training(tail=(4, 5, 3), axis=-1, dtype="float64", mode="empty"),
    "f32-channels-last": _training(tail=(2, 3, 6), axis=-1, dtype="float32", mode="uneven"),
    "f16-4d": _training(tail=(3, 2, 5), dtype="float16", mode="empty"),
    "f32-large-mean": _training(tail=(3, 4), dtype="float32", mode="uneven", loc=1e3, tol_scale=20),
    "momentum-none": _training(tail=(4,), dtype="float64", mode="empty", steps=5,
                               kwargs={"momentum": None}),
    "no-affine": _training(tail=(3, 4), dtype="float32", mode="uneven", kwargs={"affine": False}),
    "no-running-stats": _training(tail=(3, 4), dtype="float64", mode="uneven",
                                  kwargs={"track_running_stats": False}),
    "single-value": run_single_value,
    "all-empty": run_all_empty,
    "bad-input": run_bad_input,
}


DOCS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "docs", "distributed.md")


def load_torch_adapter(path=DOCS):
    """TorchDistComm, from the code block after '<!-- torch-adapter -->' in
    docs/distributed.md (so that the documented adapter is the tested one)."""
    with open(path) as f:
        text = f.read()
    start = text.index("```python", text.index("<!-- torch-adapter -->")) + len("```python")
    namespace = {}
    exec(compile(text[start:text.index("```", start)], path, "exec"), namespace)  # noqa: S102
    return namespace["TorchDistComm"]


def main(argv):
    """mpi_worker.py [--out DIR] [--engine mpi|torch] [CASE ...]: runs the scenarios (all by
    default) on every rank. mpi: over mpi4py's COMM_WORLD (launch with mpiexec). torch: over
    torch.distributed with Gloo and the adapter of docs/distributed.md (one process per rank,
    with RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set). Each rank writes one JSON line
    per case to DIR/rank<r>.jsonl (default: stdout, where ranks' lines may interleave)."""
    out_dir, engine = None, "mpi"
    while argv[:1] in (["--out"], ["--engine"]):
        if argv[0] == "--out":
            out_dir = argv[1]
        else:
            engine = argv[1]
        argv = argv[2:]
    if engine == "mpi":
        from mpi4py import MPI

        comm = MPI.COMM_WORLD
        rank, size = comm.Get_rank(), comm.Get_size()
        abort = comm.Abort
        barrier = comm.Barrier
    else:
        import datetime

        import torch.distributed as dist

        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
        comm = load_torch_adapter()()
        rank, size = comm.rank, comm.size
        abort = sys.exit
        barrier = dist.barrier
    bnorm.set_num_threads(1)
    names = argv or list(SCENARIOS)
    sink = open(f"{out_dir}/rank{rank}.jsonl", "w") if out_dir else sys.stdout

    def report(name, failures):
        sink.write(json.dumps({"case": name, "rank": rank, "size": size, "failures": failures}) + "\n")
        sink.flush()

    for name in names:
        try:
            failures = SCENARIOS[name](comm, rank, size)
        except Exception:  # noqa: BLE001 -- a crash desynchronizes ranks: abort the job
            report(name, ["exception: " + traceback.format_exc()])
            sys.stderr.write(f"rank {rank}, case {name}:\n{traceback.format_exc()}")
            sys.stderr.flush()
            abort(3)
        report(name, failures)
    barrier()
    if out_dir:
        sink.close()
    if engine == "torch":
        import torch.distributed as dist

        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
