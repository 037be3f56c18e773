"""bfloat16 against float16 (the same bytes), interleaved round by round in one process.

For each shape and op, bnorm on a bfloat16 array and on a float16 array of the same shape
(and PyTorch's bfloat16 batch norm with --torch) are timed in rotating order, so machine
load hits both alike. Both dtypes read the same inputs: the bfloat16 case's x and dy are
views of the float16 case's (bits that are normal numbers of magnitude 2^-7 to 2^9 in
either dtype). Where outputs stream to memory (x of 4 MiB or more), they share the output
too, so that where the pages lie (huge pages cover some of an array, not all) is no
difference between them: with outputs of their own, one thread's (8192, 1024) inference
gave 1.0x or 1.3-1.7x from one process to the next, steady within each and whichever
dtype ran first, and 1.03-1.04x on one output. Smaller outputs stay their own: a view as
`out` takes bnorm's general argument path (a few microseconds more a call; the fast path
takes outputs that own their memory), which would weigh on calls in cache. Memory-bound
rows still swing on a shared VM: compare them over several runs, and in-cache rows for the
kernels' own cost. Prints the medians, the bf16/f16 ratio (target: <= 1.0, "as fast as
float16 per byte"), the same ratio of the minimum times (steadier on a busy VM for calls
that run in cache) and, with --torch, torch_bf16/bnorm_bf16.

    python benchmarks/bench_bf16.py --threads 2,1 [--torch] [--budget 1.5]
"""
from __future__ import annotations

import argparse
import os

import numpy as np

import bnorm
from bnorm.bench import OPS, _Case, _import_torch, parse_shapes, time_interleaved

SHAPES = "64x256x28x28:1,64x28x28x256:-1,8192x1024:1,32x64x14x14:1,128x64x56x56:1"


SHARED_OUTPUT_BYTES = 4 << 20  # outputs this large stream to memory (kStreamBytes in the kernels)


def _share_memory(f16, bf16, torch):
    """Gives both cases the same inputs, and where they stream the same outputs: bf16's x and
    dy (and y and dx) become bfloat16 views of f16's (x and dy refilled with bits that are
    normal in either dtype: sign, then 0x3c00-0x43ff, float16 +-[1, 4), bfloat16 +-[2^-7,
    2^9)); the saved statistics are recomputed."""
    rng = np.random.default_rng(1)
    for name in ("x", "dy"):
        bits = getattr(f16, name).view(np.uint16)
        bits[...] = rng.integers(0x3C00, 0x4400, size=bits.shape, dtype=np.uint16)
        bits |= rng.integers(0, 2, size=bits.shape, dtype=np.uint16) << np.uint16(15)
    shared = ("x", "dy", "y", "dx") if f16.x.nbytes >= SHARED_OUTPUT_BYTES else ("x", "dy")
    for name in shared:
        setattr(bf16, name, getattr(f16, name).view(bf16.dtype))
    for case in (f16, bf16):
        _, case.mean, case.invstd = bnorm.forward_train(case.x, case.w, case.b, axis=case.axis)
    if torch is not None:
        bf16.torch = torch
        bf16._torch_setup(torch)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default=SHAPES, help="comma list of SHAPE:AXIS (default: %(default)s)")
    p.add_argument("--threads", default="2,1", help="comma list of bnorm thread counts (default: %(default)s)")
    p.add_argument("--ops", default=",".join(OPS), help="train, infer, backward (default: all)")
    p.add_argument("--budget", type=float, default=1.0, help="seconds per row (default: %(default)s)")
    p.add_argument("--torch", action="store_true", help="also time PyTorch's bfloat16 CPU batch norm")
    args = p.parse_args(argv)
    torch = _import_torch(args.torch)
    shapes = parse_shapes(args.shapes)
    ops = args.ops.split(",")
    print(f"bnorm isa {bnorm.cpu_isa()}, load {os.getloadavg()[0]:.2f}")
    print(f"{'threads':>7} {'op':>8} {'shape':>14} {'f16 ms':>8} {'bf16 ms':>8} {'bf16/f16':>8} {'(min)':>6}"
          + (f" {'torch ms':>8} {'torch/bnorm':>11}" if torch else ""))
    for threads in (int(t) for t in args.threads.split(",")):
        bnorm.set_num_threads(threads)
        if torch is not None:
            torch.set_num_threads(threads)
        for shape, axis in shapes:
            cases = {dt: _Case(shape, axis, dt) for dt in ("float16", "bfloat16")}
            _share_memory(cases["float16"], cases["bfloat16"], torch)
            for op in ops:
                fns = {dt: case.bnorm_fn(op) for dt, case in cases.items()}
                if torch is not None:
                    fns["torch"] = cases["bfloat16"].torch_fn(op)
                r = time_interleaved(fns, None, budget=args.budget)
                f16, bf16 = r["float16"]["median_s"] * 1e3, r["bfloat16"]["median_s"] * 1e3
                by_min = r["bfloat16"]["min_s"] / r["float16"]["min_s"]
                line = (f"{threads:>7} {op:>8} {'x'.join(map(str, shape)):>14} {f16:8.3f} {bf16:8.3f} {bf16 / f16:8.2f}"
                        f" {by_min:6.2f}")
                if torch is not None:
                    tm = r["torch"]["median_s"] * 1e3
                    line += f" {tm:8.3f} {tm / bf16:11.2f}"
                print(line, flush=True)
    print(f"load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
