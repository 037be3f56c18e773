"""Small calls made alone: bnorm's default threads against one thread, after idle gaps.

    python benchmarks/bench_gaps.py                         # (32, 64, 14, 14), gaps 0 .. 5 ms
    python benchmarks/bench_gaps.py --shape 256x512 --gaps 0,0.002 --calls 300

A loop of back-to-back calls finds libgomp's team spinning; a call made between other work
(a NumPy pipeline, a training step's other layers) may find it asleep and pay its wake-up.
Each call here follows a busy-wait of --gap seconds (the caller's own work: the core stays
busy, as in a real pipeline); medians and minima of --calls calls, microseconds, float32.
The default thread count and one thread run in separate processes (a thread count once
set stays set, and OMP_NUM_THREADS=1 gives the one-thread run its default path), one after
the other for each gap. It measures whether a "one thread for a small call on a sleeping
team" policy would pay (docs/performance.md, Busy machines).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(shape, axis, op, gap, calls):
    import numpy as np

    import bnorm

    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    dy = rng.standard_normal(shape, dtype=np.float32)
    c = shape[axis]
    w, rm, rv = np.ones(c, np.float32), np.zeros(c, np.float32), np.ones(c, np.float32)
    out = np.empty_like(x)
    _, mean, invstd = bnorm.forward_train(x, w, None, axis=axis)
    call = {
        "train": lambda: bnorm.forward_train(x, w, None, rm, rv, axis=axis, out=out),
        "infer": lambda: bnorm.forward_infer(x, rm, rv, w, None, axis=axis, out=out),
        "backward": lambda: bnorm.backward(dy, x, mean, invstd, w, axis=axis, out=out),
    }[op]
    times = []
    for _ in range(calls + 5):
        t = time.perf_counter()
        while time.perf_counter() - t < gap:
            pass
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    times = sorted(times[5:])
    return {"threads": bnorm.get_num_threads(), "median_us": times[len(times) // 2] * 1e6, "min_us": times[0] * 1e6}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="32x64x14x14")
    p.add_argument("--axis", type=int, default=1)
    p.add_argument("--ops", default="backward,train,infer")
    p.add_argument("--gaps", default="0,0.0005,0.002,0.005", help="seconds of busy-wait before each call")
    p.add_argument("--calls", type=int, default=400)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    shape = tuple(int(v) for v in args.shape.split("x"))
    if args.worker:
        op, gap = args.worker.split(":")
        print(json.dumps(worker(shape, args.axis, op, float(gap), args.calls)))
        return
    print(f"shape {shape}, axis {args.axis}, float32, {args.calls} calls each; microseconds, median (min)")
    print("| op | gap ms | default threads | one thread | one / default |")
    print("| --- | --- | --- | --- | --- |")
    for op in args.ops.split(","):
        for gap in (float(g) for g in args.gaps.split(",")):
            rows = []
            for env in ({}, {"OMP_NUM_THREADS": "1"}):
                cmd = [sys.executable, __file__, "--shape", args.shape, "--axis", str(args.axis),
                       "--calls", str(args.calls), "--worker", f"{op}:{gap}"]
                out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True)
                rows.append(json.loads(out.stdout))
            d, o = rows
            print(f"| {op} | {gap * 1e3:g} | {d['median_us']:.1f} ({d['min_us']:.1f}), {d['threads']} threads "
                  f"| {o['median_us']:.1f} ({o['min_us']:.1f}) | {o['median_us'] / d['median_us']:.2f} |")


if __name__ == "__main__":
    main()
