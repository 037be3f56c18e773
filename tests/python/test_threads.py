"""Threading: results bitwise identical for any bnorm thread count, and concurrent calls
from Python threads are safe (the GIL is released during computation)."""

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

import bnorm
import reference as ref

# ~2M elements each: big enough for every kernel to split work across threads.
BIG_LAYOUTS = [
    ((32, 16, 64, 64), 1, np.float32),      # NCHW
    ((8, 64, 64, 64), -1, np.float32),      # channels-last, C=64
    ((512, 2, 2048), 1, np.float32),        # small C, long inner
    ((2**20, 2), 1, np.float32),            # (N, C) with C=2: inner=1, huge outer
    ((3, 3, 233017), 1, np.float32),        # odd sizes, outer < threads
    ((1, 5, 400009), 1, np.float64),        # N=1: one outer row
    ((4096, 8, 64), 1, np.float16),
    ((65536, 32), -1, np.float16),
    ((16384, 64, 2, 2), 1, np.float32),     # short planes: rows of channel x inner positions
    ((64, 512, 7, 7), 1, np.float32),       # short planes in strips of whole channels, fused
    ((32, 1024, 3, 3), 1, np.float16),      # the same, float16
    ((2**19 + 7, 3), 1, np.float32),        # narrow rows side by side, rows left over
    ((2048, 33, 5, 5), 1, np.float16),      # short planes, float16, odd sizes
    ((2, 1048593), 1, np.float32),          # few rows, huge C: column strips
    ((96, 5000), 1, np.float64),            # column strips (training; the backward's two passes)
    ((96, 5000), 1, np.float32),            # column strips of 512+ columns, rows in two splits, backward too
    ((4, 7, 7, 2048), -1, np.float16),      # channels-last, column strips
    ((84, 16, 16, 256), -1, np.float32),    # 22 MiB of 1 KiB rows: reductions a row at a time
    ((55, 2048, 7, 7), 1, np.float32),      # 22 MiB of short planes: rows tiles prefetch their next rows
]

# Around the thread policy's steps (a thread per 2^15 elements), so that 1, 2 and 3 threads
# all run some of them.
THRESHOLD_LAYOUTS = [
    ((2, 3, 5461), 1, np.float32),          # 32766 elements: one thread whatever is set
    ((2, 4, 4096), 1, np.float32),          # 32768
    ((3, 5, 4369), 1, np.float64),          # 65535
    ((4096, 16), 1, np.float32),            # 65536, rows
    ((256, 16, 16), -1, np.float16),        # 65536, channels-last
    ((1, 1, 98305), 1, np.float32),         # 3 threads, one channel
    ((2048, 3, 4, 4), 1, np.float32),       # 98304, short planes
    ((32, 64, 14, 14), 1, np.float32),      # the small shapes
    ((256, 512), 1, np.float32),
    ((8, 32, 28, 28), 1, np.float32),
]


def _everything(x, dy, axis, params):
    """Every operation's outputs, as one flat list of arrays."""
    w, b, rm0, rv0 = params
    rm, rv = rm0.copy(), rv0.copy()
    y, mean, invstd = bnorm.forward_train(x, w, b, rm, rv, axis=axis, momentum=0.3)
    out = [y, mean, invstd, rm, rv]
    out.append(bnorm.forward_infer(x, rm0, rv0, w, b, axis=axis))
    out.extend(bnorm.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=True))
    out.extend(bnorm.backward(dy, x, rm0, invstd, w, axis=axis, batch_stats=False))
    count, bmean, bvar = bnorm.batch_stats(x, axis=axis)
    out.extend([bmean, bvar])
    out.append(bnorm.normalize(x, bmean, invstd, w, b, axis=axis))
    sum_dy, sum_dy_xhat = bnorm.backward_reduce(dy, x, mean, invstd, axis=axis)
    out.extend([sum_dy, sum_dy_xhat])
    out.append(bnorm.backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat, count,
                                    axis=axis))
    return out


def _data(rng, shape, axis, dtype):
    x = ref.make_x(rng, shape, axis, dtype, loc=50.0)
    dy = ref.make_dy(rng, shape, dtype)
    params = ref.make_params(rng, shape[ref.norm_axis(len(shape), axis)], dtype)
    return x, dy, params


def test_num_threads_roundtrip(restore_threads):
    for n in (1, 2, 3):
        bnorm.set_num_threads(n)
        assert bnorm.get_num_threads() == n


def test_backoff_count_is_not_moved_by_a_count_asked_for(rng, restore_threads):
    """bnorm._core._backoff_count (the benchmarks' diagnostic): a count of this process's
    passes cut to one thread by the default count's back-off (tests/cpp/test_threads.cpp
    makes one); with set_num_threads, calls never back off, so it stays put."""
    before = bnorm._core._backoff_count()
    assert isinstance(before, int) and before >= 0
    bnorm.set_num_threads(2)
    x = rng.standard_normal((64, 32, 16, 16)).astype(np.float32)
    for _ in range(5):
        bnorm.forward_train(x, None, None)
    assert bnorm._core._backoff_count() == before


@pytest.mark.parametrize("n,exc", [(0, ValueError), (-1, ValueError), (100000, ValueError), (2**31 - 1, ValueError),
                                   (2**40, ValueError), (1.5, TypeError), (True, TypeError)], ids=str)
def test_num_threads_out_of_range(restore_threads, n, exc):
    """Counts OpenMP cannot run (a team of 100000 threads crashed the process) are refused
    with one message, and the setting stays as it was."""
    import os

    bnorm.set_num_threads(2)
    pattern = rf"number of threads must be in \[1, {max(1024, os.cpu_count())}\], got {n}" if exc is ValueError \
        else "number of threads"
    with pytest.raises(exc, match=pattern):
        bnorm.set_num_threads(n)
    assert bnorm.get_num_threads() == 2


@pytest.mark.parametrize("layout", BIG_LAYOUTS + THRESHOLD_LAYOUTS,
                         ids=lambda l: f"{'x'.join(map(str, l[0]))}-ax{l[1]}-{np.dtype(l[2]).name}")
def test_bitwise_identical_for_any_thread_count(rng, restore_threads, layout):
    shape, axis, dtype = layout
    x, dy, params = _data(rng, shape, axis, dtype)
    results = {}
    for n in (1, 2, 3):
        bnorm.set_num_threads(n)
        results[n] = _everything(x, dy, axis, params)
    for n in (2, 3):
        for i, (a, b) in enumerate(zip(results[n], results[1])):
            ref.assert_bitwise(a, b, f"output {i} with {n} threads vs 1 thread")


def test_merge_stats_bitwise_for_any_thread_count(rng, restore_threads):
    counts = rng.integers(0, 1000, 64).astype(np.float64)
    means = rng.standard_normal((64, 10000))
    vars_ = rng.uniform(0, 3, (64, 10000))
    results = []
    for n in (1, 2, 3):
        bnorm.set_num_threads(n)
        results.append(bnorm.merge_stats(counts, means, vars_))
    for r in results[1:]:
        for a, b in zip(r[1:], results[0][1:]):
            ref.assert_bitwise(a, b, "merge_stats")


def test_concurrent_calls_from_python_threads(rng):
    layouts = [((64, 8, 1024), 1, np.float32), ((8192, 16), -1, np.float64),
               ((16, 4, 4096), 1, np.float16), ((256, 3, 17, 17), 1, np.float32)]
    jobs = [(_data(rng, s, a, d), a) for s, a, d in layouts for _ in range(3)]
    serial = [_everything(x, dy, axis, p) for (x, dy, p), axis in jobs]
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = [pool.submit(_everything, x, dy, axis, p)
                   for _ in range(2) for (x, dy, p), axis in jobs]
        concurrent = [f.result() for f in futures]
    for j, got in enumerate(concurrent):
        for i, (a, b) in enumerate(zip(got, serial[j % len(jobs)])):
            ref.assert_bitwise(a, b, f"job {j} output {i}: concurrent vs serial")


def test_concurrent_layers(rng):
    """Independent BatchNorm layers trained from several threads at once."""
    batches = [ref.make_x(rng, (32, 6, 500), 1, np.float32) for _ in range(4)]

    def train(seed):
        bn = bnorm.BatchNorm(6)
        for x in batches[seed:] + batches[:seed]:
            y = bn(x)
            bn.backward(y)
        return bn.running_mean.copy(), bn.running_var.copy(), bn.grad_weight.copy()

    serial = [train(s) for s in range(4)]
    with ThreadPoolExecutor(max_workers=4) as pool:
        concurrent = list(pool.map(train, [0, 1, 2, 3] * 2))
    for j, got in enumerate(concurrent):
        for a, b in zip(got, serial[j % 4]):
            ref.assert_bitwise(a, b, "layer trained concurrently")


@pytest.mark.parametrize("n", [1, 3])
def test_omp_num_threads_is_honoured(n):
    import os
    import subprocess
    import sys

    env = dict(os.environ, OMP_NUM_THREADS=str(n))
    out = subprocess.run([sys.executable, "-c", "import bnorm; print(bnorm.get_num_threads())"],
                         env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.strip()) == n


def test_huge_omp_num_threads_is_capped():
    """OMP_NUM_THREADS=100000 made libgomp crash the process at the first parallel call;
    the default is capped like set_num_threads (at max(1024, processors))."""
    import os
    import subprocess
    import sys

    code = ("import numpy as np, bnorm; x = np.random.rand(100, 1000).astype(np.float32); "
            "bnorm.batch_stats(x); print(bnorm.get_num_threads())")
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, OMP_NUM_THREADS="100000"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert int(out.stdout.strip()) == max(1024, os.cpu_count())


FORK_CHILD = """
import os, signal, numpy as np, bnorm
bnorm.set_num_threads(2)
x = np.random.rand(64, 64, 1024).astype(np.float32)
pid = os.fork()                         # before any parallel call
if pid == 0:
    os._exit(0 if bnorm.get_num_threads() == 2 else 4)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
y0 = bnorm.forward_train(x)[0]          # the parent's OpenMP threads are now running
pid = os.fork()
if pid == 0:
    signal.alarm(60)                    # a hung child dies (prints -14) instead of lingering
    y = bnorm.forward_train(x)[0]       # hung in libgomp before any fork handler
    bnorm.set_num_threads(2)
    os._exit(0 if bnorm.get_num_threads() == 2 and (y == y0).all() else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
"""


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs os.fork")
def test_forked_child_keeps_its_threads():
    """A child forked after bnorm ran threads gets a fresh OpenMP thread pool (its first
    call hung in libgomp before): it keeps its thread count and gives the same bits.
    test_thread_ownership.py does the same after another library ran the threads."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FORK_CHILD], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["0", "0"], (out.stdout, out.stderr[-2000:])
