"""Time per training step of bnorm.distributed.SyncBatchNorm, and its communication share.

    python benchmarks/bench_distributed.py [--shape 32,64,28,28] [--dtype float32]
        [--ranks 1,2] [--steps 50] [--warmup 5] [--threads 1] [--strong]

Launches ``mpiexec -n R`` for each R in --ranks (mpi4py and an MPI runtime needed:
``pip install mpi4py mpich``; MPIEXEC=/path picks the launcher) and prints one table row per
R, after a row for single-process ``bnorm.BatchNorm`` on the same per-rank batch.

A step is forward + backward (``y = bn(x); dx = bn.backward(dy)``) in training mode. Ranks
are aligned with a barrier before every step; a step's time is the slowest rank's, and the
table gives the median over --steps. "comm" is the time spent inside the two collectives
(the all-gather of 3C and the all-reduce of 2C float64 values), including any wait for a
slower rank, and "compute" the rest of the step; "collectives alone" times the same two
calls back to back with nothing else (their pure latency). By default every rank holds a --shape batch (weak scaling: the global
batch grows with R, the ideal step time stays flat); --strong splits one --shape batch over
the ranks instead. --threads is bnorm's CPU threads per rank (default 1, so that R ranks use
R cores).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

import numpy as np


def find_mpiexec():
    env = os.environ.get("MPIEXEC")
    if env:
        return shutil.which(env) or env
    for d in (sysconfig.get_path("scripts"), os.path.join(sys.prefix, "bin")):
        for name in ("mpiexec", "mpirun"):
            path = os.path.join(d, name)
            if os.path.isfile(path) and os.access(path, os.X_OK):
                return path
    return shutil.which("mpiexec") or shutil.which("mpirun")


def local_shape(shape, ranks, rank, strong):
    if not strong:
        return shape
    n = shape[0]
    lo, hi = rank * n // ranks, (rank + 1) * n // ranks
    return (hi - lo,) + tuple(shape[1:])


class TimedComm:
    """Wraps a communicator; accumulates the seconds spent in its collectives."""

    def __init__(self, comm):
        from bnorm.distributed import as_communicator

        self.inner = as_communicator(comm)
        self.seconds = 0.0

    def allgather(self, buf):
        t = time.perf_counter()
        out = self.inner.allgather(buf)
        self.seconds += time.perf_counter() - t
        return out

    def allreduce_sum(self, buf):
        t = time.perf_counter()
        out = self.inner.allreduce_sum(buf)
        self.seconds += time.perf_counter() - t
        return out


def baseline(args):
    """Single-process bnorm.BatchNorm on one rank's batch: (median step s)."""
    import bnorm

    bnorm.set_num_threads(args.threads)
    shape = tuple(args.shape)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    bn = bnorm.BatchNorm(shape[1], dtype=args.dtype)
    times = []
    for i in range(args.warmup + args.steps):
        t = time.perf_counter()
        bn(x)
        bn.backward(dy)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return float(np.median(times))


def worker(args):
    from mpi4py import MPI

    import bnorm
    from bnorm.distributed import MPIComm, SyncBatchNorm

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    bnorm.set_num_threads(args.threads)
    shape = local_shape(tuple(args.shape), size, rank, args.strong)
    C = shape[1]
    rng = np.random.default_rng(rank)
    x = rng.standard_normal(shape).astype(args.dtype)
    dy = rng.standard_normal(shape).astype(args.dtype)
    timed = TimedComm(comm)
    bn = SyncBatchNorm(C, timed, dtype=args.dtype)

    step, comm_s = [], []
    for i in range(args.warmup + args.steps):
        comm.Barrier()
        timed.seconds = 0.0
        t = time.perf_counter()
        bn(x)
        bn.backward(dy)
        dt = time.perf_counter() - t
        if i >= args.warmup:
            step.append(dt)
            comm_s.append(timed.seconds)
    # the slowest rank's step, and that rank's communication time
    steps = np.array(comm.allgather(step))  # (size, steps)
    comms = np.array(comm.allgather(comm_s))
    slowest = steps.argmax(axis=0)
    step_t = steps[slowest, np.arange(steps.shape[1])]
    comm_t = comms[slowest, np.arange(steps.shape[1])]

    # the two collectives alone, back to back
    mpi = MPIComm(comm)
    buf3, buf2 = np.zeros((3, C)), np.zeros((2, C))
    alone = []
    for i in range(args.warmup + 200):
        comm.Barrier()
        t = time.perf_counter()
        mpi.allgather(buf3)
        mpi.allreduce_sum(buf2)
        if i >= args.warmup:
            alone.append(time.perf_counter() - t)
    alone = float(np.median(comm.allgather(float(np.median(alone)))))

    if rank == 0:
        result = {
            "ranks": size,
            "local": list(local_shape(tuple(args.shape), size, 0, args.strong)),
            "global_n": int(sum(local_shape(tuple(args.shape), size, r, args.strong)[0] for r in range(size))),
            "step": float(np.median(step_t)),
            "comm": float(np.median(comm_t)),
            "compute": float(np.median(step_t - comm_t)),
            "share": float(np.median(comm_t / step_t)),
            "alone": alone,
            "bytes": 8 * 5 * C,
            "mpi": MPI.Get_library_version().splitlines()[0].strip(),
        }
        with open(args.out, "w") as f:
            json.dump(result, f)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="32,64,28,28", type=lambda s: tuple(int(v) for v in s.split(",")))
    p.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    p.add_argument("--ranks", default="1,2", type=lambda s: [int(v) for v in s.split(",")])
    p.add_argument("--steps", default=50, type=int)
    p.add_argument("--warmup", default=5, type=int)
    p.add_argument("--threads", default=1, type=int)
    p.add_argument("--strong", action="store_true", help="split one --shape batch over the ranks")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return 0

    try:
        import mpi4py  # noqa: F401
    except ImportError:
        print("bench_distributed: mpi4py is not installed (pip install mpi4py mpich)", file=sys.stderr)
        return 1
    mpiexec = find_mpiexec()
    if mpiexec is None:
        print("bench_distributed: no mpiexec found (pip install mpich, or set MPIEXEC)", file=sys.stderr)
        return 1
    import bnorm

    shape = tuple(args.shape)
    print(f"bnorm {bnorm.__version__}: SyncBatchNorm training step (forward + backward), {args.dtype}, "
          f"{'strong' if args.strong else 'weak'} scaling, {args.threads} thread(s) per rank, "
          f"{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at start), median of {args.steps} steps")
    base = baseline(args)
    rows = []
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), OMPI_ALLOW_RUN_AS_ROOT="1",
               OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMPI_MCA_rmaps_base_oversubscribe="1")
    for r in args.ranks:
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "result.json")
            cmd = [mpiexec, "-n", str(r), sys.executable, os.path.abspath(__file__), "--worker", "--out", out,
                   "--shape", ",".join(map(str, shape)), "--dtype", args.dtype, "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--threads", str(args.threads)] + (["--strong"] if args.strong else [])
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                print(proc.stdout, proc.stderr, file=sys.stderr)
                return proc.returncode
            with open(out) as f:
                rows.append(json.load(f))
    if rows:
        print(f"MPI: {rows[0]['mpi']}; per step {rows[0]['bytes']} bytes reduced "
              f"(3C + 2C float64 values, C = {shape[1]})")
    head = (f"| {'setup':<22} | {'per-rank batch':<16} | {'global N':>8} | {'step ms':>8} | {'compute ms':>10} "
            f"| {'comm ms':>8} "
            f"| {'comm share':>10} | {'collectives alone us':>20} |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    print(f"| {'BatchNorm, 1 process':<22} | {'x'.join(map(str, shape)):<16} | {shape[0]:>8} | {base * 1e3:>8.2f} "
          f"| {base * 1e3:>10.2f} | {'-':>8} | {'-':>10} | {'-':>20} |")
    for row in rows:
        print(f"| {'SyncBatchNorm, ' + str(row['ranks']) + ' rank' + ('s' if row['ranks'] > 1 else ''):<22} "
              f"| {'x'.join(map(str, row['local'])):<16} | {row['global_n']:>8} | {row['step'] * 1e3:>8.2f} "
              f"| {row['compute'] * 1e3:>10.2f} | {row['comm'] * 1e3:>8.3f} | {row['share'] * 100:>9.1f}% "
              f"| {row['alone'] * 1e6:>20.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
