"""How fast bnorm is on this machine: ``python -m bnorm.bench``.

For each operation (training forward, inference forward, backward with batch statistics)
and each shape, it times bnorm against

- the memory-copy floor: ``np.copyto(y, x)`` into a preallocated array of x's size;
- PyTorch CPU (when ``import torch`` works): ``torch.ops.aten.native_batch_norm`` and
  ``native_batch_norm_backward`` on tensors sharing x's memory (channels-last for
  ``axis=-1``), with ``torch.set_num_threads`` equal to bnorm's thread count;
- a straightforward NumPy implementation (``x.mean``/``x.var`` over the reduced axes, then
  ``(x - mean) * invstd * w + b``; the backward likewise vectorized);

all in one process, interleaved round by round so that every contender sees the same
machine state. ``--busy`` runs bnorm, bnorm on one thread and PyTorch on an idle machine
and then with one core kept busy by another process. ``--sweep`` instead measures ns per element over a sweep of N, C and
spatial size at a fixed total size, and flags "cliffs" (over 2x between neighbours).
``--fused`` times the fused epilogue (BN + add + ReLU, _bench_fused.py) on ResNet's shapes
(recorded with ``python benchmarks/bench_cpu.py --record --only fused --threads 2``).
Run ``python -m bnorm.bench --help`` for the options. PyTorch and matplotlib are optional.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time

import numpy as np

import bnorm
from bnorm._functional import _numpy_dtype

__all__ = ["main", "parse_shapes", "run_table", "run_sweep", "plot_sweep", "machine_info"]

DEFAULT_SHAPES = [
    ((64, 256, 28, 28), 1),
    ((64, 28, 28, 256), -1),
    ((8192, 1024), 1),
    ((32, 64, 14, 14), 1),
    ((128, 64, 56, 56), 1),
]
OPS = ("train", "infer", "backward")
_OP_ALIASES = {
    "train": "train", "forward_train": "train", "fwd_train": "train",
    "infer": "infer", "forward_infer": "infer", "fwd_infer": "infer", "eval": "infer",
    "backward": "backward", "bwd": "backward",
}
_OP_CALL = {"train": "forward_train", "infer": "forward_infer", "backward": "backward"}
# minimal DRAM traffic of each op in units of S = x.nbytes (the GB/s column's model)
TRAFFIC = {"train": 2, "infer": 2, "backward": 3, "copy": 2}
# issue 3's targets for float32: bnorm time / copy time, and PyTorch time / bnorm time
COPY_TARGET = {"infer": 1.0, "train": 1.2, "backward": 1.9}
OTHER_DTYPE_SLACK = 1.3  # float64 / 16-bit: copy ratio within 1.3x of float32's target
EPS = 1e-5
MOMENTUM = 0.1
_TOL = {"float64": 1e-9, "float32": 1e-3, "float16": 2e-2, "bfloat16": 2e-2}
_DEFAULT_BUDGET = 4.0  # seconds of timed rounds per table row, when --repeat is not given
_MAX_ROUNDS = 30
_MIN_ROUNDS = 5


# ----------------------------------------------------------------------------- machine

def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def _lscpu() -> dict:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return {}
    info = {}
    for line in out.splitlines():
        if ":" in line:
            k, v = line.split(":", 1)
            info[k.strip()] = v.strip()
    return info


def _git_commit() -> str | None:
    """The short commit of the git checkout in the current directory, if it is bnorm's."""
    try:
        root = subprocess.run(["git", "rev-parse", "--show-toplevel"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        if not root or not os.path.isdir(os.path.join(root, "python", "bnorm")):
            return None
        sha = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "") if sha else None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(torch=None) -> dict:
    """CPU model, cores, memory, caches, versions and threads, for the header and the JSON."""
    ls = _lscpu()
    model = ls.get("Model name")
    if not model:
        for line in _read("/proc/cpuinfo").splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    model = model or platform.processor() or platform.machine()
    mem = None
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) * 1024
    flags = set(ls.get("Flags", "").split())
    isa = [f for f in ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_fp16") if f in flags]
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    core_so = getattr(bnorm._core, "__file__", None)
    info = {
        "cpu_model": model,
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "cores_per_socket": ls.get("Core(s) per socket"),
        "sockets": ls.get("Socket(s)"),
        "threads_per_core": ls.get("Thread(s) per core"),
        "hypervisor": ls.get("Hypervisor vendor"),
        "caches": {k: ls[k] for k in ("L1d cache", "L2 cache", "L3 cache") if k in ls},
        "isa_flags": isa,
        "memory_bytes": mem,
        "os": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": getattr(torch, "__version__", None),
        "bnorm": bnorm.__version__,
        "bnorm_file": core_so,
        "bnorm_build_mtime": (datetime.datetime.fromtimestamp(os.path.getmtime(core_so), datetime.timezone.utc)
                              .strftime("%Y-%m-%d %H:%M:%S UTC") if core_so and os.path.exists(core_so) else None),
        "git_commit": _git_commit(),
        "bnorm_threads": bnorm.get_num_threads(),
        "torch_threads": torch.get_num_threads() if torch is not None else None,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
    maps = _read("/proc/self/maps")
    info["openmp_runtimes"] = sorted({ln.split()[-1] for ln in maps.splitlines()
                                      if "/" in ln and any(k in ln.rsplit("/", 1)[-1] for k in ("gomp", "iomp", "libomp"))})
    for name in ("cpu_isa", "simd_isa", "isa"):  # whatever the library reports about its dispatch
        attr = getattr(bnorm, name, None) or getattr(bnorm._core, name, None)
        if attr is not None:
            info["bnorm_isa"] = str(attr() if callable(attr) else attr)
            break
    return info


def _cpu_ticks():
    """(busy, total) jiffies of the whole machine from /proc/stat, or None."""
    line = _read("/proc/stat").split("\n", 1)[0].split()
    if not line or line[0] != "cpu":
        return None
    v = [int(t) for t in line[1:]]
    idle = v[3] + (v[4] if len(v) > 4 else 0)
    return sum(v[:8]) - idle, sum(v[:8])


class _OthersMeter:
    """CPU time used by *other* processes during a measurement, as % of the whole machine.

    The busy jiffies of the machine minus this process's own CPU time, over the wall time
    times the number of CPUs: 0% on a quiet machine, 50% when another process keeps one
    of two cores busy (and then the timings of a 2-thread run are not to be trusted)."""

    def __init__(self):
        self.t0 = _cpu_ticks()
        self.self0 = sum(os.times()[:2])
        self.w0 = time.perf_counter()

    def percent(self) -> float | None:
        t1 = _cpu_ticks()
        if self.t0 is None or t1 is None:
            return None
        hz = os.sysconf("SC_CLK_TCK")
        wall = time.perf_counter() - self.w0
        ncpu = os.cpu_count() or 1
        busy = (t1[0] - self.t0[0]) / hz - (sum(os.times()[:2]) - self.self0)
        return max(0.0, min(100.0, 100.0 * busy / (wall * ncpu))) if wall > 0 else None


def _wait_quiet(max_wait: float, threshold: float = 15.0) -> float | None:
    """Wait (up to max_wait seconds) until other processes use under threshold % of the machine."""
    deadline = time.perf_counter() + max_wait
    while True:
        m = _OthersMeter()
        time.sleep(0.3)
        p = m.percent()
        if p is None or p < threshold or time.perf_counter() >= deadline:
            return p
        time.sleep(0.7)


def _malloc_reuse() -> bool:
    """Make glibc keep and reuse freed large blocks instead of unmapping them.

    PyTorch's functional ops and the NumPy implementation allocate fresh outputs and
    temporaries on every call. glibc serves large blocks with mmap and unmaps them on free,
    so every call would pay page faults and kernel zeroing of its outputs (as much as the
    op itself). bnorm is timed into preallocated outputs, so for a like-for-like comparison
    the others get the behaviour of a caching allocator (what PyTorch's performance guide
    recommends jemalloc/tcmalloc for): M_MMAP_MAX=0 and a huge M_TRIM_THRESHOLD."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        ok1 = libc.mallopt(-4, 0)            # M_MMAP_MAX
        ok2 = libc.mallopt(-1, 2**31 - 1)    # M_TRIM_THRESHOLD
        return bool(ok1 and ok2)
    except (OSError, AttributeError):
        return False


def _import_torch(enabled: bool):
    if not enabled:
        return None
    # hugepage-backed allocations, as NumPy does for its large arrays
    os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        import torch
    except Exception:  # noqa: BLE001 - any broken torch install means "no torch"
        return None
    return torch


# ----------------------------------------------------------------------------- parsing

def parse_shapes(text: str):
    """'64x256x28x28:1,8192x1024' -> [((64, 256, 28, 28), 1), ((8192, 1024), 1)]."""
    shapes = []
    for item in text.replace(" ", "").split(","):
        if not item:
            continue
        dims, _, axis = item.partition(":")
        try:
            shape = tuple(int(d) for d in dims.lower().split("x"))
            ax = int(axis) if axis else 1
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: expected e.g. 64x256x28x28:1") from None
        if len(shape) < 2 or min(shape) < 1 or not -len(shape) <= ax < len(shape):
            raise argparse.ArgumentTypeError(f"bad shape {item!r}: need >= 2 positive dims and a valid axis")
        shapes.append((shape, ax))
    if not shapes:
        raise argparse.ArgumentTypeError("no shapes given")
    return shapes


def _parse_ops(text: str):
    ops = []
    for item in text.replace(" ", "").split(","):
        if item == "all":
            ops.extend(OPS)
        elif item:
            if item not in _OP_ALIASES:
                raise argparse.ArgumentTypeError(f"unknown op {item!r}: choose from {', '.join(OPS)}")
            ops.append(_OP_ALIASES[item])
    return [o for o in OPS if o in ops]


def _parse_dtypes(text: str):
    out = []
    for item in text.replace(" ", "").split(","):
        if item:
            try:
                dt = _numpy_dtype(item).name  # bfloat16 needs ml_dtypes
            except (TypeError, ImportError) as e:
                raise argparse.ArgumentTypeError(str(e)) from None
            if dt not in ("float16", "bfloat16", "float32", "float64"):
                raise argparse.ArgumentTypeError(f"dtype must be float16, bfloat16, float32 or float64, got {item}")
            out.append(dt)
    return out


def _shape_str(shape) -> str:
    return "x".join(map(str, shape))


# ----------------------------------------------------------------------------- one case

class _Case:
    """Inputs, preallocated outputs and the contenders for one (shape, axis, dtype)."""

    def __init__(self, shape, axis, dtype, torch=None, seed=0):
        rng = np.random.default_rng(seed)
        nd = len(shape)
        self.shape, self.dtype = tuple(shape), _numpy_dtype(str(dtype))
        self.ax = axis % nd
        self.axis = axis
        self.C = shape[self.ax]
        self.M = math.prod(shape) // self.C
        self.red = tuple(i for i in range(nd) if i != self.ax)
        self.bshape = tuple(self.C if i == self.ax else 1 for i in range(nd))
        sdt = np.float32 if self.dtype.itemsize == 2 else self.dtype  # float16, bfloat16
        self.sdt = np.dtype(sdt)
        gen_dt = np.float64 if self.dtype == np.float64 else np.float32

        def randn(mean=0.0):
            a = rng.standard_normal(self.shape, dtype=gen_dt)
            if mean:
                a += mean
            return a.astype(self.dtype, copy=False)

        self.x = randn(0.5)
        self.dy = randn()
        self.w = rng.uniform(0.5, 1.5, self.C).astype(sdt)
        self.b = rng.normal(0.0, 0.1, self.C).astype(sdt)
        self.rm = rng.normal(0.5, 0.1, self.C).astype(sdt)
        self.rv = rng.uniform(0.8, 1.2, self.C).astype(sdt)
        self.S = self.x.nbytes
        # preallocated and first-touched outputs
        self.y = np.zeros_like(self.x)
        self.dx = np.zeros_like(self.x)
        self.ycopy = np.zeros_like(self.x)
        self.rm_b, self.rv_b = self.rm.copy(), self.rv.copy()
        _, self.mean, self.invstd = bnorm.forward_train(self.x, self.w, self.b, axis=axis)
        self.torch = torch
        if torch is not None:
            self._torch_setup(torch)

    # -- PyTorch: tensors sharing x's memory, with the channel axis at dim 1
    def _torch_setup(self, torch):
        nd = len(self.shape)
        others = [i for i in range(nd) if i != self.ax]
        self.perm = [others[0], self.ax] + others[1:]
        self.iperm = [self.perm.index(i) for i in range(nd)]
        def t(a):  # a tensor on a's memory (bfloat16: through an int16 view, NumPy has none)
            if a.dtype.name == "bfloat16":
                return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            return torch.from_numpy(a)

        self.X = t(self.x).permute(self.perm)
        self.DY = t(self.dy).permute(self.perm)
        self.W, self.B = t(self.w), t(self.b)
        self.RM, self.RV = t(self.rm.copy()), t(self.rv.copy())
        self.RM0, self.RV0 = t(self.rm), t(self.rv)
        self.SM, self.SI = t(self.mean), t(self.invstd)
        if nd == 4 and self.ax == 3:
            assert self.X.is_contiguous(memory_format=torch.channels_last)
        self.layout_torch = ("channels_last" if nd == 4 and self.ax == 3 else
                             "contiguous" if self.X.is_contiguous() else "strided")

    def torch_fn(self, op):
        torch = self.torch
        fwd = torch.ops.aten.native_batch_norm
        bwd = torch.ops.aten.native_batch_norm_backward
        X, W, B, DY = self.X, self.W, self.B, self.DY
        if op == "train":
            RM, RV = self.RM, self.RV
            return lambda: fwd(X, W, B, RM, RV, True, MOMENTUM, EPS)
        if op == "infer":
            RM, RV = self.RM0, self.RV0
            return lambda: fwd(X, W, B, RM, RV, False, MOMENTUM, EPS)
        RM, RV, SM, SI = self.RM0, self.RV0, self.SM, self.SI
        mask = [True, True, True]
        return lambda: bwd(DY, X, W, RM, RV, SM, SI, True, EPS, mask)

    def torch_result(self, op):
        out = self.torch_fn(op)()
        return out[0].permute(self.iperm).float().numpy()

    # -- bnorm, into preallocated outputs
    def bnorm_fn(self, op):
        x, w, b, axis = self.x, self.w, self.b, self.axis
        if op == "train":
            rm, rv, y = self.rm_b, self.rv_b, self.y
            return lambda: bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=MOMENTUM, eps=EPS, out=y)
        if op == "infer":
            rm, rv, y = self.rm, self.rv, self.y
            return lambda: bnorm.forward_infer(x, rm, rv, w, b, axis=axis, eps=EPS, out=y)
        dy, mean, invstd, dx = self.dy, self.mean, self.invstd, self.dx
        return lambda: bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=True, out=dx)

    def copy_fn(self):
        x, y = self.x, self.ycopy
        return lambda: np.copyto(y, x)

    # -- the straightforward NumPy implementation
    def numpy_fn(self, op):
        x, dy, red, bs, dt, sdt = self.x, self.dy, self.red, self.bshape, self.dtype, self.sdt
        if dt.name == "bfloat16":  # (NumPy computes on bfloat16 through float32 only)
            x, dy = x.astype(np.float32), dy.astype(np.float32)
        w, b = self.w.reshape(bs), self.b.reshape(bs)
        m = self.M
        if op == "train":
            rm, rv = self.rm.copy(), self.rv.copy()

            def train():
                mean = x.mean(axis=red, dtype=sdt)
                var = x.var(axis=red, dtype=sdt)
                invstd = 1.0 / np.sqrt(var + EPS)
                y = (x - mean.reshape(bs)) * invstd.reshape(bs) * w + b
                rm[...] = (1 - MOMENTUM) * rm + MOMENTUM * mean
                rv[...] = (1 - MOMENTUM) * rv + MOMENTUM * var * (m / (m - 1))
                return y.astype(dt, copy=False), mean, invstd
            return train
        if op == "infer":
            rm, rv = self.rm.reshape(bs), self.rv.reshape(bs)

            def infer():
                y = (x - rm) / np.sqrt(rv + EPS) * w + b
                return y.astype(dt, copy=False)
            return infer
        mean, invstd = self.mean.reshape(bs), self.invstd.reshape(bs)

        def backward():
            xhat = (x - mean) * invstd
            dbias = dy.sum(axis=red, dtype=sdt)
            dweight = (dy * xhat).sum(axis=red, dtype=sdt)
            dx = (w * invstd) * (dy - (dbias / m).reshape(bs) - xhat * (dweight / m).reshape(bs))
            return dx.astype(dt, copy=False), dweight, dbias
        return backward

    def check(self, op) -> dict:
        """bnorm's output against the NumPy implementation's (and PyTorch's): max error
        relative to the largest output value."""
        fb = self.bnorm_fn(op)
        r = fb()
        got = (r[0] if isinstance(r, tuple) else r).astype(np.float64)
        if op == "train":  # the running statistics must not drift through repeated checks
            self.rm_b[...], self.rv_b[...] = self.rm, self.rv
        ref = self.numpy_fn(op)()
        ref = (ref[0] if isinstance(ref, tuple) else ref).astype(np.float64)
        scale = max(1.0, float(np.max(np.abs(ref))))
        res = {"numpy_err": float(np.max(np.abs(got - ref))) / scale}
        if self.torch is not None:
            tref = self.torch_result(op).astype(np.float64)
            res["torch_err"] = float(np.max(np.abs(got - tref))) / scale
            if op == "train":
                self.RM.copy_(self.RM0)
                self.RV.copy_(self.RV0)
        tol = _TOL[self.dtype.name]
        res["ok"] = all(v <= tol for k, v in res.items() if k.endswith("_err"))
        return res


# ----------------------------------------------------------------------------- timing

def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved_order(names: list, calls: int) -> list:
    """The order of `calls` calls of each name, in which every name follows every other name
    equally often: cycles of an Eulerian circuit of the complete directed graph on the
    names, each n (n - 1) calls, n - 1 of each name (the last cycle cut short where calls
    is not a multiple of n - 1). A fixed rotation
    (a b c, b c a, c a b) puts the same name before a given one every time (in the tables
    NumPy's reference or the one-thread worker before bnorm, the copy or bnorm before
    PyTorch), so whatever a predecessor leaves in the caches favours one contender
    throughout. Measured against the rotation on the AMD EPYC VM (3 runs each, same
    build), the difference stayed within the run-to-run noise: (64, 1024, 14, 14)
    inference PyTorch/bnorm 1.04-1.13 rotated, 1.08-1.17 balanced; (256, 512, 10, 10)
    0.99-1.00 and 0.98-1.02; (256, 512) and (8, 32, 28, 28) alike. The balance is kept
    as the design with no bias to argue about."""
    n = len(names)
    if n <= 1:
        return list(names) * calls
    # Hierholzer on the edges i -> j, i != j
    remaining = {i: [j for j in range(n) if j != i] for i in range(n)}
    stack, circuit = [0], []
    while stack:
        v = stack[-1]
        if remaining[v]:
            stack.append(remaining[v].pop())
        else:
            circuit.append(stack.pop())
    cycle = [names[i] for i in reversed(circuit[1:])]  # the closing vertex repeats the first
    order, counts = [], dict.fromkeys(names, 0)
    for name in cycle * -(-calls // (n - 1)):  # whole cycles, less what exceeds `calls` each
        if counts[name] < calls:
            order.append(name)
            counts[name] += 1
    return order


def time_interleaved(fns: dict, rounds: int | None, warmup: int = 2, budget: float = _DEFAULT_BUDGET,
                     min_rounds: int = _MIN_ROUNDS, max_rounds: int = _MAX_ROUNDS) -> dict:
    """Time each callable in fns, interleaved (interleaved_order: each follows each other
    equally often). After `warmup` untimed calls each (first touch of outputs, allocator and
    thread pool warm-up), `rounds` calls each, or
    as many as fit in `budget` seconds (clamped to [min_rounds, max_rounds]) when rounds is
    None. Returns per name: median, min, the times, and the minor page faults per timed
    call (0 when outputs are reused)."""
    names = list(fns)
    est = {}
    for n in names:
        for _ in range(warmup):
            t0 = time.perf_counter()
            fns[n]()
            est[n] = time.perf_counter() - t0
    if rounds is None:
        per_round = sum(est.values()) or 1e-9
        rounds = int(max(min_rounds, min(max_rounds, budget // per_round)))
    times = {n: [] for n in names}
    faults = {n: 0 for n in names}
    gc_was = gc.isenabled()
    gc.disable()
    try:
        for n in interleaved_order(names, rounds):
            f = fns[n]
            f0 = _faults()
            t0 = time.perf_counter()
            f()
            t1 = time.perf_counter()
            faults[n] += _faults() - f0
            times[n].append(t1 - t0)
    finally:
        if gc_was:
            gc.enable()
    return {n: {"median_s": float(np.median(times[n])), "min_s": float(np.min(times[n])),
                "times_s": [float(t) for t in times[n]], "faults_per_call": faults[n] / len(times[n]),
                "rounds": len(times[n])}
            for n in names}


def _targets(op, dtype, shape, axis, copy_x, torch_x):
    """Issue 3's targets for this row: (copy target, torch target or None, missed list)."""
    ct = COPY_TARGET[op] * (1.0 if dtype == "float32" else OTHER_DTYPE_SLACK)
    nchw = len(shape) >= 3 and axis % len(shape) == 1
    tt = (3.0 if nchw else 2.0) if dtype == "float32" else None
    missed = []
    if copy_x is not None and copy_x > ct:
        missed.append("copy")
    if tt is not None and torch_x is not None and torch_x < tt:
        missed.append("torch")
    return ct, tt, missed


def run_table(shapes, dtypes, ops, torch=None, numpy_ref=True, rounds=None, warmup=2,
              budget=_DEFAULT_BUDGET, wait_quiet=0.0, out=print) -> list[dict]:
    """Time every (dtype, shape, op) and print a markdown table per dtype; returns the rows."""
    rows = []
    for dtype in dtypes:
        out("")
        out(f"### {dtype}" + ("" if dtype == "float32" else
                              f"  (copy targets x{OTHER_DTYPE_SLACK}; torch targets apply to float32 only)"))
        out("")
        hdr = ["op", "shape", "axis", "MB", "bnorm ms", "(min)", "GB/s", "copy ms", "vs copy", "(min)", "(target)"]
        if torch is not None:
            hdr += ["torch ms", "torch/bnorm", "(min)", "(target)"]
        if numpy_ref:
            hdr += ["numpy ms", "numpy/bnorm"]
        hdr += ["others %", "check", "targets"]
        minw = {"op": 8, "MB": 6, "bnorm ms": 8, "(min)": 6, "GB/s": 5, "copy ms": 7, "vs copy": 7,
                "(target)": 8, "torch ms": 8, "torch/bnorm": 11, "numpy ms": 8, "check": 5, "targets": 15}
        widths = [max(len(h), minw.get(h, 0)) for h in hdr]
        widths[1] = max(widths[1], max(len(_shape_str(s)) for s, _ in shapes))
        left = {0, 1, len(hdr) - 2, len(hdr) - 1}  # op, shape, check, targets
        fmt_row = lambda cells: "| " + " | ".join(str(c).ljust(w) if i in left else str(c).rjust(w)  # noqa: E731
                                                   for i, (c, w) in enumerate(zip(cells, widths))) + " |"
        out(fmt_row(hdr))
        out("|" + "|".join(("-" * (w + 2)) if i in left else ("-" * (w + 1) + ":")
                           for i, w in enumerate(widths)) + "|")
        for shape, axis in shapes:
            case = _Case(shape, axis, dtype, torch=torch)
            for op in ops:
                if wait_quiet:
                    _wait_quiet(wait_quiet)
                chk = case.check(op)
                fns = {"bnorm": case.bnorm_fn(op), "copy": case.copy_fn()}
                if torch is not None:
                    fns["torch"] = case.torch_fn(op)
                if numpy_ref:
                    fns["numpy"] = case.numpy_fn(op)
                meter = _OthersMeter()
                la0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
                res = time_interleaved(fns, rounds, warmup=warmup, budget=budget)
                others = meter.percent()
                tb, tc = res["bnorm"]["median_s"], res["copy"]["median_s"]
                copy_x = tb / tc
                torch_x = res["torch"]["median_s"] / tb if "torch" in res else None
                numpy_x = res["numpy"]["median_s"] / tb if "numpy" in res else None
                ct, tt, missed = _targets(op, dtype, shape, axis, copy_x, torch_x)
                gbs = TRAFFIC[op] * case.S / tb / 1e9
                row = {
                    "op": op, "call": f"bnorm.{_OP_CALL[op]}", "shape": list(shape), "axis": axis,
                    "dtype": dtype, "S_bytes": case.S, "traffic_bytes": TRAFFIC[op] * case.S,
                    "gb_per_s": gbs, "copy_gb_per_s": TRAFFIC["copy"] * case.S / tc / 1e9,
                    "vs_copy": copy_x, "vs_copy_min": res["bnorm"]["min_s"] / res["copy"]["min_s"],
                    "torch_speedup": torch_x,
                    "torch_speedup_min": (res["torch"]["min_s"] / res["bnorm"]["min_s"]) if "torch" in res else None,
                    "numpy_speedup": numpy_x,
                    "copy_target": ct, "torch_target": tt, "missed": missed,
                    "check": chk, "others_cpu_percent": others, "loadavg_1min": la0,
                    "torch_layout": getattr(case, "layout_torch", None) if torch is not None else None,
                    "timings": res,
                }
                rows.append(row)
                cells = [op, _shape_str(shape), axis, f"{case.S / 1e6:.3g}", f"{tb * 1e3:.3f}",
                         f"({res['bnorm']['min_s'] * 1e3:.3f})", f"{gbs:.1f}", f"{tc * 1e3:.3f}",
                         f"{copy_x:.2f}", f"({row['vs_copy_min']:.2f})", f"(<={ct:.2f})"]
                if torch is not None:
                    cells += [f"{res['torch']['median_s'] * 1e3:.3f}", f"{torch_x:.2f}",
                              f"({row['torch_speedup_min']:.2f})", f"(>={tt:.0f})" if tt else ""]
                if numpy_ref:
                    cells += [f"{res['numpy']['median_s'] * 1e3:.2f}", f"{numpy_x:.1f}"]
                cells += ["?" if others is None else f"{others:.0f}",
                          "ok" if chk["ok"] else "DIFF %.1e" % max(v for k, v in chk.items() if k.endswith("_err")),
                          "met" if not missed else "miss " + "+".join(missed)]
                out(fmt_row(cells))
                bad = [n for n in ("bnorm", "copy") if res[n]["faults_per_call"] >= 1]
                if bad:
                    out(f"  note: page faults during timed calls of {', '.join(bad)} "
                        f"({', '.join('%s %.0f/call' % (n, res[n]['faults_per_call']) for n in bad)}): "
                        "outputs are not being reused")
            del case
            gc.collect()
    return rows


# ----------------------------------------------------------------------------- sweep

def _fib_upto(hi, lo=1):
    a, b, out = 1, 2, []
    while a <= hi:
        if a >= lo:
            out.append(a)
        a, b = b, a + b
    return out


def sweep_specs(total: int):
    """The sweeps: (name, varied dimension, [(value, shape, axis)]), each at about `total`
    elements. The varied size goes through Fibonacci numbers (ratio ~1.6 between
    neighbours, odd and even sizes, so SIMD tails are exercised) while another dimension
    compensates to keep the total size about constant."""
    sweeps = []
    pts = []
    for c in _fib_upto(total // (2 * 196)):
        pts.append((c, (max(2, round(total / (c * 196))), c, 14, 14), 1))
    sweeps.append(("C (NCHW, N*C*14*14 ~ T)", "C", pts))
    pts = []
    for s in _fib_upto(int(math.sqrt(total / 128))):
        pts.append((s * s, (max(2, round(total / (64 * s * s))), 64, s, s), 1))
    sweeps.append(("H*W (NCHW, N*64*H*W ~ T, H=W)", "H*W", pts))
    pts = []
    for c in _fib_upto(total // (2 * 196)):
        pts.append((c, (max(2, round(total / (c * 196))), 14, 14, c), -1))
    sweeps.append(("C (NHWC axis=-1, N*14*14*C ~ T)", "C", pts))
    pts = []
    for n in _fib_upto(total // 2, lo=2):
        pts.append((n, (n, max(1, round(total / n))), 1))
    sweeps.append(("N ((N, C) 2-D, N*C ~ T)", "N", pts))
    return sweeps


def _jump(a, b, op, key="ns_per_element_min"):
    qa, qb = a[key][op], b[key][op]
    return max(qa / qb, qb / qa)


def _retime_point(pt, op, dtype, torch=None, rounds=9):
    """Time one sweep point's op again (bnorm and copy) and keep the better min."""
    case = _Case(tuple(pt["shape"]), pt["axis"], dtype, torch=torch)
    res = time_interleaved({op: case.bnorm_fn(op), "copy": case.copy_fn()}, rounds, warmup=1)
    n = pt["elements"]
    for k in (op, "copy"):
        pt["ns_per_element_min"][k] = min(pt["ns_per_element_min"][k], res[k]["min_s"] * 1e9 / n)
    pt.setdefault("retimed", []).append(op)
    del case


def run_sweep(dtype="float32", total=1 << 22, ops=OPS, torch=None, rounds=None, warmup=1,
              budget=0.25, wait_quiet=0.0, out=print) -> dict:
    """ns per element of bnorm (and the copy, and PyTorch) over sweep_specs(total); flags
    cliffs: a jump of over 2x in ns/element between neighbouring sizes."""
    result = {"dtype": dtype, "total_elements": total, "ops": list(ops), "sweeps": [], "cliffs": [], "unconfirmed": []}
    out("")
    out(f"### sweep: ns per element at ~{total:,} elements ({dtype}); bnorm"
        + (" | torch" if torch is not None else "") + " | copy")
    for name, var, pts in sweep_specs(total):
        out("")
        out(f"#### {name}")
        out("")
        cols = [var, "shape"] + [f"{o}" for o in ops]
        if torch is not None:
            cols += [f"torch {o}" for o in ops]
        cols += ["copy", "others %"]
        widths = [max(len(c), 7) for c in cols]
        widths[1] = max(12, max(len(_shape_str(s)) for _, s, _ in pts))
        fmt = lambda cells: "| " + " | ".join(str(c).rjust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
        out(fmt(cols))
        out("|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|")
        srows = []
        for val, shape, axis in pts:
            case = _Case(shape, axis, dtype, torch=torch)
            n = math.prod(shape)
            fns = {"copy": case.copy_fn()}
            for o in ops:
                fns[o] = case.bnorm_fn(o)
                if torch is not None:
                    fns["torch " + o] = case.torch_fn(o)
            if wait_quiet:
                _wait_quiet(wait_quiet)
            meter = _OthersMeter()
            res = time_interleaved(fns, rounds, warmup=warmup, budget=budget, min_rounds=5, max_rounds=15)
            others = meter.percent()
            r = {"value": val, "shape": list(shape), "axis": axis, "elements": n, "others_cpu_percent": others,
                 "ns_per_element": {k: v["median_s"] * 1e9 / n for k, v in res.items()},
                 "ns_per_element_min": {k: v["min_s"] * 1e9 / n for k, v in res.items()}}
            srows.append(r)
            cells = [val, _shape_str(shape)] + [f"{r['ns_per_element'][k]:.3f}" for k in cols[2:-1]]
            cells.append("?" if others is None else f"{others:.0f}")
            out(fmt(cells))
            del case
        gc.collect()
        worst = {}
        for o in ops:
            for a, b in zip(srows, srows[1:]):
                jump = _jump(a, b, o)
                if jump > 2.0:  # re-measure both points (up to 3 times) before calling it a cliff
                    jump2 = jump
                    for _ in range(3):
                        if wait_quiet:
                            _wait_quiet(wait_quiet)
                        for pt in (a, b):
                            _retime_point(pt, o, dtype, torch=None, rounds=max(9, rounds or 0))
                        jump2 = _jump(a, b, o)
                        if jump2 <= 2.0:
                            break
                    cl = {"sweep": name, "op": o, "from": a["shape"], "to": b["shape"],
                          "ratio_min_first": jump, "ratio_min": jump2,
                          "ratio_median": _jump(a, b, o, "ns_per_element"), "confirmed": jump2 > 2.0}
                    (result["cliffs"] if jump2 > 2.0 else result["unconfirmed"]).append(cl)
                    out(f"  {'CLIFF' if jump2 > 2.0 else 'not a cliff (noise: not reproduced)'}: {o} "
                        f"{_shape_str(a['shape'])} -> {_shape_str(b['shape'])}: {jump:.2f}x ns/element, "
                        f"{jump2:.2f}x after re-measuring (min times)")
                    jump = jump2
                worst[o] = max(worst.get(o, 0.0), jump)
        out("")
        out("worst neighbour ratio (min times): "
            + ", ".join(f"{o} {worst[o]:.2f}x" for o in ops if o in worst))
        result["sweeps"].append({"name": name, "varied": var, "points": srows, "worst_neighbour_ratio": worst})
    out("")
    out("no cliffs (no jump over 2x in ns/element between neighbouring sizes)" if not result["cliffs"]
        else f"{len(result['cliffs'])} cliff(s) over 2x between neighbouring sizes (see CLIFF lines)")
    return result


def plot_sweep(sweep: dict, path: str, title: str | None = None) -> bool:
    """The sweep chart (PNG): ns/element against the varied size, one panel per sweep."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("bench: matplotlib is not installed; no chart written", file=sys.stderr)
        return False
    sweeps = sweep["sweeps"]
    ncol = 2
    nrow = (len(sweeps) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(12, 4.2 * nrow), squeeze=False)
    colors = {"train": "tab:blue", "infer": "tab:green", "backward": "tab:red"}
    for ax, sw in zip(axes.flat, sweeps):
        xs = [p["value"] for p in sw["points"]]
        keys = sw["points"][0]["ns_per_element"].keys()
        for k in keys:
            ys = [p["ns_per_element_min"][k] for p in sw["points"]]
            if k == "copy":
                ax.plot(xs, ys, color="0.4", lw=1.5, ls=":", marker=".", label="np.copyto (floor ref.)")
            elif k.startswith("torch "):
                o = k.split(" ", 1)[1]
                ax.plot(xs, ys, color=colors.get(o), lw=1, ls="--", alpha=0.6, label=f"PyTorch {o}")
            else:
                ax.plot(xs, ys, color=colors.get(k), lw=2, marker="o", ms=3, label=f"bnorm {k}")
        for cl in sweep.get("cliffs", []):
            if cl["sweep"] == sw["name"]:
                for p in sw["points"]:
                    if p["shape"] in (cl["from"], cl["to"]):
                        ax.plot([p["value"]], [p["ns_per_element_min"][cl["op"]]], "x", color="k", ms=9, mew=2)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(sw["varied"])
        ax.set_ylabel("ns per element (best of rounds)")
        ax.set_title(sw["name"], fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    for ax in list(axes.flat)[len(sweeps):]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=9, frameon=False)
    worst = {}
    for sw in sweeps:
        for o, v in sw.get("worst_neighbour_ratio", {}).items():
            worst[o] = max(worst.get(o, 0.0), v)
    verdict = ("no cliffs" if not sweep.get("cliffs") else f"{len(sweep['cliffs'])} cliff(s) (x marks)")
    verdict += "; worst jump between neighbours: " + ", ".join(f"{o} {v:.2f}x" for o, v in worst.items())
    fig.suptitle((title or f"bnorm CPU sweep, {sweep['dtype']}, ~{sweep['total_elements']:,} elements")
                 + "\n" + verdict, fontsize=11)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------- main

def _header(info, args, malloc_reuse, out=print):
    gib = (info["memory_bytes"] or 0) / 2**30
    cores = info.get("cores_per_socket")
    sockets = info.get("sockets")
    out(f"bnorm {info['bnorm']} CPU benchmark  ({info['date']})")
    out("")
    out(f"- machine: {info['cpu_model']}; {info['logical_cpus']} logical CPUs"
        + (f" ({sockets} socket x {cores} cores x {info['threads_per_core']} thread/core)" if cores else "")
        + (f", {info['hypervisor']} guest" if info.get("hypervisor") else "")
        + f"; {gib:.1f} GiB RAM; " + ", ".join(f"{k.split()[0]} {v}" for k, v in info["caches"].items())
        + f"; ISA: {' '.join(info['isa_flags']) or '?'}")
    out(f"- versions: bnorm {info['bnorm']} (build {info['bnorm_build_mtime']}"
        + (f", git {info['git_commit']}" if info.get("git_commit") else "")
        + (f", isa {info['bnorm_isa']}" if info.get("bnorm_isa") else "")
        + f"), numpy {info['numpy']}, torch {info['torch'] or 'not installed'}, python {info['python']}")
    out(f"- threads: bnorm {info['bnorm_threads']}"
        + (f", torch {info['torch_threads']} (set equal)" if info["torch"] else "")
        + "; the NumPy reference runs NumPy's own (single-threaded) loops"
        + (f"; OpenMP runtime(s) loaded: {', '.join(os.path.basename(r) for r in info['openmp_runtimes'])}"
           if info.get("openmp_runtimes") else ""))
    la = info.get("loadavg_start")
    if la:
        out(f"- load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}"
            " ('others %' below = CPU used by other processes during each row, % of the machine)")
    if args.note:
        out(f"- note: {args.note}")
    out("- timing: time.perf_counter; each row interleaves bnorm, the copy, PyTorch and NumPy "
        f"round by round after {args.warmup} warm-up calls each; median over the rounds (min in parentheses); "
        "bnorm writes into preallocated, first-touched outputs (out=)"
        + ("; PyTorch/NumPy allocate their outputs, with glibc set to reuse freed blocks "
           "(no page faults per call, like a caching allocator)" if malloc_reuse else ""))
    out("- traffic model (GB/s column): forward (train, infer) = read x + write y = 2S; "
        "backward = read x, dy + write dx = 3S; S = x.nbytes; GB = 1e9 bytes")
    out("- vs copy = bnorm time / time of np.copyto(y, x) into a preallocated x-sized y "
        "(lower is better; issue 3 targets: infer <= 1.0, train <= 1.2, backward <= 1.9); "
        "ratios use medians, (min) = the same ratio of the minimum times; targets are judged on medians")
    out("- torch/bnorm, numpy/bnorm = their time / bnorm's time: > 1 means bnorm is faster "
        "(torch target: >= 3 on NCHW, >= 2 otherwise); check = bnorm's output against NumPy's and PyTorch's")


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bnorm.bench",
        description="Time bnorm's CPU batch norm against a memory copy, PyTorch CPU and NumPy.")
    p.add_argument("--threads", type=int, default=None, help="bnorm (and torch) threads (default: bnorm's current)")
    p.add_argument("--dtype", type=_parse_dtypes, default=["float32"],
                   help="float32 (default), float64, float16, bfloat16 (needs ml_dtypes), or a comma list")
    p.add_argument("--shapes", type=parse_shapes, default=DEFAULT_SHAPES,
                   help="comma list of NxCxHxW:axis (default: the five shapes of issue 3)")
    p.add_argument("--ops", type=_parse_ops, default=list(OPS), help="comma list of train, infer, backward")
    p.add_argument("--repeat", type=int, default=None,
                   help=f"timed rounds per row (default: as many as fit in --budget, {_MIN_ROUNDS}..{_MAX_ROUNDS})")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls of each contender first (default 2)")
    p.add_argument("--budget", type=float, default=None,
                   help=f"seconds of timed rounds per row when --repeat is not given (default {_DEFAULT_BUDGET}; "
                        "0.25 per sweep point)")
    p.add_argument("--sweep", action="store_true",
                   help="run the size sweep (ns/element over N, C, spatial size; cliff check) instead of the table")
    p.add_argument("--busy", action="store_true",
                   help="time bnorm (default threads), bnorm on 1 thread and PyTorch on an idle machine, then with "
                        "a process spinning on one core (issue 12's targets)")
    p.add_argument("--passes", type=int, default=1,
                   help="with --busy: measure each phase's rows that many times, a pass over them at a time on "
                        "fresh arrays, and judge the medians of the passes (default 1)")
    p.add_argument("--sweep-size", type=int, default=1 << 22, help="elements per sweep point (default 2**22)")
    p.add_argument("--plot", metavar="PATH", default=None, help="write the sweep chart PNG (implies --sweep)")
    p.add_argument("--json", metavar="PATH", default=None, help="write machine-readable results")
    p.add_argument("--no-torch", action="store_true", help="do not compare with PyTorch even if installed")
    p.add_argument("--no-numpy", action="store_true", help="skip the NumPy implementation (it is slow)")
    p.add_argument("--no-malloc-reuse", action="store_true",
                   help="leave glibc malloc as is (PyTorch/NumPy then pay page faults on fresh outputs)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="before each row, wait up to SECONDS for other processes to go under 15%% CPU")
    p.add_argument("--note", default=None, help="a label printed in the header and stored in the JSON")
    p.add_argument("--fused", action="store_true",
                   help="time the fused epilogue (BN + add + ReLU, forward and backward) against PyTorch's op "
                        "sequence on ResNet's shapes, NCHW and channels-last (--shapes overrides them)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.plot:
        args.sweep = True
    if args.repeat is not None and args.repeat < 1:
        raise SystemExit("bench: --repeat must be >= 1")
    if args.passes < 1:
        raise SystemExit("bench: --passes must be >= 1")
    malloc_reuse = False if args.no_malloc_reuse else _malloc_reuse()
    torch = _import_torch(not args.no_torch)
    if args.threads is not None:
        bnorm.set_num_threads(args.threads)
    threads = bnorm.get_num_threads()
    if torch is not None:
        torch.set_num_threads(threads)
    info = machine_info(torch)
    info["malloc_reuse"] = malloc_reuse
    info["note"] = args.note
    _header(info, args, malloc_reuse)
    results = {"meta": info, "argv": sys.argv[1:] if argv is None else list(argv)}
    t0 = time.perf_counter()
    if args.fused:
        from . import _bench_fused

        shapes = args.shapes if args.shapes is not DEFAULT_SHAPES else _bench_fused.DEFAULT_SHAPES
        results["fused_rows"] = _bench_fused.run_fused(
            shapes, _bench_fused.FUSED_OPS, torch=torch, rounds=args.repeat, warmup=args.warmup,
            budget=args.budget if args.budget is not None else _DEFAULT_BUDGET)
    elif args.sweep:
        sw = run_sweep(args.dtype[0], args.sweep_size, args.ops, torch=torch, rounds=args.repeat,
                       warmup=max(1, args.warmup - 1), budget=args.budget if args.budget is not None else 0.25,
                       wait_quiet=args.wait_quiet)
        results["sweep"] = sw
        if args.plot:
            title = (f"bnorm {info['bnorm']} CPU: ns/element at ~{args.sweep_size:,} elements, {args.dtype[0]}, "
                     f"{threads} threads, {info['cpu_model']}")
            if plot_sweep(sw, args.plot, title):
                print(f"\nwrote {args.plot}")
    elif args.busy:
        from bnorm._bench_busy import run_busy

        results["busy"] = run_busy(args.shapes, args.ops, torch=torch, rounds=args.repeat or 15,
                                   budget=args.budget if args.budget is not None else 1.0, passes=args.passes)
    else:
        rows = run_table(args.shapes, args.dtype, args.ops, torch=torch, numpy_ref=not args.no_numpy,
                         rounds=args.repeat, warmup=args.warmup,
                         budget=args.budget if args.budget is not None else _DEFAULT_BUDGET,
                         wait_quiet=args.wait_quiet)
        results["rows"] = rows
        met = sum(1 for r in rows if not r["missed"])
        print("")
        print(f"targets met: {met}/{len(rows)} rows; checks ok: {sum(r['check']['ok'] for r in rows)}/{len(rows)}")
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    info["elapsed_s"] = time.perf_counter() - t0
    if info["loadavg_end"]:
        la = info["loadavg_end"]
        print(f"load average at end: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}; elapsed {info['elapsed_s']:.0f} s")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
