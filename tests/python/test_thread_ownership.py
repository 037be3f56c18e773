"""bnorm's threads next to other libraries that share its OpenMP runtime (PyTorch's wheel
ships libgomp.so.1, and a process loads one runtime for all), and the default thread count.

Each case runs in a subprocess with a timeout: the failures these guard against were hangs
(a forked child waiting forever for OpenMP threads that did not survive the fork) and
process-wide settings. The torch cases run where torch is importable (CI installs it); the
same failures are also provoked without torch by calling the shared libgomp directly.
"""

import os
import subprocess
import sys
import textwrap

import pytest

TIMEOUT = 120


def _run(code, env=None, timeout=TIMEOUT):
    environ = dict(os.environ)
    environ.pop("OMP_NUM_THREADS", None)
    environ.update(env or {})
    try:
        out = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=environ, capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"timed out after {timeout} s (a hang): {e.stdout!r} {e.stderr!r}")
    assert out.returncode == 0, (out.stdout, out.stderr[-3000:])
    return out.stdout.split()


def _torch_available():
    try:
        import torch  # noqa: F401
    except Exception:
        return False
    return True


needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
needs_torch = pytest.mark.skipif(not _torch_available(), reason="needs torch")

# Runs OpenMP threads from the main thread without bnorm: torch's BatchNorm where torch is
# the runtime's other user, else a parallel region through libgomp's own entry point
# (what any GCC-built library's `#pragma omp parallel` compiles to).
PARALLEL_WORK = {
    "torch": """
        import torch
        torch.set_num_threads(2)
        with torch.no_grad():
            torch.nn.BatchNorm2d(256)(torch.randn(64, 256, 28, 28))
    """,
    "libgomp": """
        import ctypes
        gomp, libc = ctypes.CDLL("libgomp.so.1"), ctypes.CDLL(None)
        gomp.GOMP_parallel(ctypes.cast(libc.free, ctypes.c_void_p), None, 2, 0)  # free(NULL) on 2 threads
    """,
}


def _libgomp_shared():
    """Whether bnorm's OpenMP runtime is libgomp.so.1 (GCC builds on Linux)."""
    if not sys.platform.startswith("linux"):
        return False
    import bnorm  # noqa: F401  (loads its runtime)

    try:
        with open("/proc/self/maps") as f:
            return "libgomp" in f.read()
    except OSError:
        return False


def _work_params():
    params = [pytest.param("torch", marks=needs_torch)]
    params.append(pytest.param("libgomp", marks=pytest.mark.skipif(not _libgomp_shared(), reason="needs libgomp")))
    return params


FORK_AFTER_OTHER_LIBRARY = """
import os, signal, tempfile, numpy as np
{first}
{work}
{second}
bnorm.set_num_threads(2)
x = np.random.default_rng(0).random((64, 64, 1024), dtype=np.float32)
path = os.path.join(tempfile.mkdtemp(), "y.npy")
pid = os.fork()                          # bnorm has run no thread yet: only the other library
if pid == 0:
    signal.alarm(60)                     # a hung child dies (prints -14) instead of lingering
    y = bnorm.forward_train(x)[0]        # hung: libgomp's pool of the parent's threads
    bnorm.set_num_threads(2)             # the child keeps its threads
    np.save(path, y)
    os._exit(0 if bnorm.get_num_threads() == 2 and (bnorm.forward_train(x)[0] == y).all() else 3)
_, status = os.waitpid(pid, 0)
print(os.waitstatus_to_exitcode(status))
print(bool((np.load(path) == bnorm.forward_train(x)[0]).all()))
os.remove(path)
os.rmdir(os.path.dirname(path))
"""


@needs_fork
@pytest.mark.parametrize("work", _work_params())
@pytest.mark.parametrize("bnorm_first", [True, False], ids=["bnorm-first", "bnorm-last"])
def test_fork_after_another_library_ran_threads(work, bnorm_first):
    """A child forked after another library ran OpenMP threads in the parent hung in its
    first parallel bnorm call: bnorm's fork guard counted only bnorm's own threads."""
    code = FORK_AFTER_OTHER_LIBRARY.format(first="import bnorm" if bnorm_first else "",
                                           work=textwrap.dedent(PARALLEL_WORK[work]),
                                           second="" if bnorm_first else "import bnorm")
    assert _run(code) == ["0", "True"]


@needs_fork
@needs_torch
def test_fork_pool_after_torch():
    """The same through a fork-method multiprocessing Pool, the data-loader pattern."""
    code = """
        import multiprocessing as mp, signal, numpy as np, torch, bnorm
        with torch.no_grad():
            torch.nn.BatchNorm2d(256)(torch.randn(64, 256, 28, 28))
        x = np.random.default_rng(0).random((64, 64, 1024), dtype=np.float32)
        def mean_of(seed):
            return float(bnorm.forward_train(x + seed)[1].sum())
        def die_if_hung():
            signal.alarm(60)
        with mp.get_context("fork").Pool(2, initializer=die_if_hung) as pool:
            got = pool.map(mean_of, range(4), chunksize=1)
        print(all(g == mean_of(s) for s, g in enumerate(got)))
    """
    assert _run(code) == ["True"]


# Another library's thread setting (omp_set_num_threads: OpenMP's nthreads, shared by every
# user of the runtime) against bnorm's, both ways.
OWNERSHIP = {
    "torch": """
        import torch, bnorm
        def other_set(n): torch.set_num_threads(n)
        def other_get(): return torch.get_num_threads()
    """,
    "libgomp": """
        import ctypes, bnorm
        gomp = ctypes.CDLL("libgomp.so.1")
        def other_set(n): gomp.omp_set_num_threads(n)
        def other_get(): return gomp.omp_get_max_threads()
    """,
}


@pytest.mark.parametrize("other", _work_params())
def test_thread_count_is_bnorms_own(other):
    """With OMP_NUM_THREADS=2, torch.set_num_threads(1) made bnorm.get_num_threads() 1."""
    code = OWNERSHIP[other] + """
        import numpy as np
        x = np.random.default_rng(0).random((64, 64, 1024), dtype=np.float32)
        print(bnorm.get_num_threads())
        other_set(1)
        bnorm.forward_train(x)
        print(bnorm.get_num_threads())
        other_set(3)
        print(bnorm.get_num_threads())
        bnorm.set_num_threads(1)
        bnorm.forward_train(x)
        print(other_get())
        bnorm.set_num_threads(2)
        print(other_get(), bnorm.get_num_threads())
    """
    assert _run(code, env={"OMP_NUM_THREADS": "2"}) == ["2", "2", "2", "3", "3", "2"]


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="needs sched_setaffinity")
def test_default_threads_follow_the_affinity_mask():
    """The default is the CPUs this process may run on (taskset, --cpuset-cpus), unless
    OMP_NUM_THREADS says otherwise."""
    code = """
        import os
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
        import bnorm
        print(bnorm.get_num_threads())
    """
    assert _run(code) == ["1"]
    assert _run(code, env={"OMP_NUM_THREADS": "3"}) == ["3"]
    assert _run(code, env={"OMP_NUM_THREADS": "not-a-number"}) == ["1"]
