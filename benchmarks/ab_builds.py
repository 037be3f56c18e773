"""Two builds of bnorm in one process, their calls alternated one by one (A B, then B A).

On a shared VM, timings drift by 10-50% over seconds (other tenants' memory traffic, page
placement); builds compared in separate processes, even alternating process by process,
then differ by more than most kernel changes do. Here both builds run on the same arrays,
in the same process and thread pool, a call of each in turn, so a drift hits both alike.
An A/A run on the 2-CPU AMD EPYC VM gave ratios of 0.92-1.04 on DRAM-sized inputs (a build
against a copy of itself) and 0.99-1.00 on cached ones (one build as both A and B).

Setup: install each build, then copy its package under a name of its own, e.g.

    pip install . && cp -r $(python -c "import bnorm, os; print(os.path.dirname(bnorm.__file__))") /tmp/ab/bnorm_a
    (change, rebuild, install) && cp -r ... /tmp/ab/bnorm_b
    PYTHONPATH=/tmp/ab python benchmarks/ab_builds.py bnorm_a bnorm_b 64x256x28x28:1,256x512:1 \\
        --ops infer,train,backward --dtype float32 --threads 1

(the compiled module's name is `_core` in either package, so both load side by side).
Back to back, a call finds the previous call's data in L1/L2; `--evict 8` copies 8 MiB
before every timed call, as the ops between two batch norms of a network would, so that a
change for data coming from L3 or memory is measured where it applies.
Prints, per op and shape, the median time of each build and B/A (< 1: B is faster).
"""
from __future__ import annotations

import argparse
import importlib
import time

import numpy as np


def _calls(m, a, axis):
    """The timed calls of module m on the arrays a (one dict per shape, shared by both builds)."""
    x, dy, y, dx, w, b, rm, rv, mean, invstd = (a[k] for k in "x dy y dx w b rm rv mean invstd".split())
    return {
        "infer": lambda: m.forward_infer(x, rm, rv, w, b, axis=axis, out=y),
        "train": lambda: m.forward_train(x, w, b, rm, rv, axis=axis, out=y),
        "backward": lambda: m.backward(dy, x, mean, invstd, w, axis=axis, out=dx),
        "infer_relu": lambda: m.forward_infer(x, rm, rv, w, b, axis=axis, out=y, activation="relu"),
        # (dy serves as the residual z: an array of x's shape and dtype)
        "train_add_relu": lambda: m.forward_train(x, w, b, rm, rv, axis=axis, out=y, residual=dy, activation="relu"),
        "infer_add_relu": lambda: m.forward_infer(x, rm, rv, w, b, axis=axis, out=y, residual=dy,
                                                  activation="relu"),
        "backward_relu": lambda: m.backward(dy, x, mean, invstd, w, axis=axis, out=dx, activation="relu", y=y),
        "stats": lambda: m.batch_stats(x, axis=axis),
        "backward_reduce": lambda: m.backward_reduce(dy, x, mean, invstd, axis=axis),
        "backward_elemt": lambda: m.backward_elemt(dy, x, mean, invstd, w, w, b, 1000, axis=axis, out=dx),
        "backward_eval": lambda: m.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=False, out=dx),
        "backward_eval_relu": lambda: m.backward(dy, x, mean, invstd, w, axis=axis, batch_stats=False, out=dx,
                                                 activation="relu", y=y),
    }


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", help="module name of build A (the baseline)")
    p.add_argument("b", help="module name of build B (the change)")
    p.add_argument("shapes", help="comma list of SHAPE:AXIS, e.g. 64x256x28x28:1,64x28x28x256:-1")
    p.add_argument("--ops", default="infer,train,backward",
                   help="comma list of infer, train, backward, infer_relu, backward_relu, train_add_relu, "
                        "infer_add_relu, stats (batch_stats), backward_reduce, backward_elemt (sums given), "
                        "backward_eval, backward_eval_relu (batch_stats=False) (default: %(default)s)")
    p.add_argument("--dtype", default="float32", help="float32 (default), float64, float16 or bfloat16")
    p.add_argument("--threads", type=int, default=0, help="threads of both builds (default: their default)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds per op and shape (default: %(default)s)")
    p.add_argument("--evict", type=float, default=0.0,
                   help="MiB copied (np.copyto) before every timed call, as the ops between two batch norms "
                        "would: the inputs start in L3 or memory, not in L1/L2 (default: 0, back to back)")
    args = p.parse_args(argv)
    evict_src = np.ones(int(args.evict * (1 << 20)) // 4, np.float32)
    evict_dst = np.zeros_like(evict_src)
    A, B = importlib.import_module(args.a), importlib.import_module(args.b)
    # backward_relu allocates dsum on every call: glibc is made to reuse freed blocks, as in
    # python -m bnorm.bench, so that page faults do not swamp the kernels' difference
    from bnorm.bench import _malloc_reuse

    _malloc_reuse()
    if args.dtype == "bfloat16":
        import ml_dtypes

        dtype = np.dtype(ml_dtypes.bfloat16)
    else:
        dtype = np.dtype(args.dtype)
    if args.threads:
        A.set_num_threads(args.threads)
        B.set_num_threads(args.threads)
    pdt = np.float64 if dtype == np.float64 else np.float32
    rng = np.random.default_rng(0)
    evicting = f", {args.evict:g} MiB copied before each call" if args.evict else ""
    print(f"A = {args.a} ({A.__file__}), B = {args.b} ({B.__file__}); {dtype.name}, "
          f"threads {args.threads or 'default'}{evicting}")
    for spec in args.shapes.split(","):
        dims, _, ax = spec.partition(":")
        shape, axis = tuple(int(v) for v in dims.split("x")), int(ax or 1)
        C = shape[axis]
        a = {"x": rng.standard_normal(shape, dtype=np.float32).astype(dtype),
             "dy": rng.standard_normal(shape, dtype=np.float32).astype(dtype),
             "w": np.ones(C, pdt), "b": np.zeros(C, pdt), "rm": np.zeros(C, pdt), "rv": np.ones(C, pdt)}
        a["y"], a["dx"] = np.zeros_like(a["x"]), np.zeros_like(a["x"])
        A.forward_train(a["x"], a["w"], a["b"], axis=axis, out=a["y"])
        _, a["mean"], a["invstd"] = A.forward_train(a["x"], a["w"], a["b"], axis=axis)
        fa, fb = _calls(A, a, axis), _calls(B, a, axis)
        for op in args.ops.split(","):
            ta, tb = [], []
            for f in (fa[op], fb[op], fa[op], fb[op]):  # warm-up: outputs touched, both pools started
                f()
            end = time.perf_counter() + args.budget
            while time.perf_counter() < end or len(ta) < 10:
                for first, second, t_first, t_second in ((fa, fb, ta, tb), (fb, fa, tb, ta)):
                    for f, t in ((first, t_first), (second, t_second)):
                        if evict_src.size:
                            np.copyto(evict_dst, evict_src)
                        t0 = time.perf_counter()
                        f[op]()
                        t.append(time.perf_counter() - t0)
            ma, mb = float(np.median(ta)), float(np.median(tb))
            print(f"{op:15s} {spec:18s} A {ma * 1e3:8.3f} ms  B {mb * 1e3:8.3f} ms  B/A {mb / ma:5.2f}  "
                  f"({len(ta)} calls each)", flush=True)


if __name__ == "__main__":
    main()
