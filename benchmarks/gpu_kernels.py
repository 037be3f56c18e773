#!/usr/bin/env python3
"""Each kernel of bnorm's CUDA ops, and of PyTorch's (cuDNN and native), once per case: a
driver for Nsight Compute, which reads every kernel's time and DRAM traffic.

    ncu --clock-control none --csv --kernel-name-base function \\
        --kernel-name "regex:plane_reduce|row_reduce|flat_elementwise|rows_elementwise|prep_kernel|bn_|batch_norm|BatchNorm|nhwc" \\
        --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size \\
        python benchmarks/gpu_kernels.py [--dtypes float32,bfloat16] > kernels.csv
    python benchmarks/gpu_kernels.py --summary kernels.csv

The summary lists each kernel launch in order with its time, bytes moved and DRAM bandwidth,
so a slow op shows which of its passes is slow (bench_gpu.py times whole ops). The run prints
the ops in launch order on stderr ("## case | op"): keep that beside the summary to tell
which launches belong to which op. The cases are bench_gpu.py's.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def run(dtypes):
    import torch

    import bnorm
    from bench_gpu import DEFAULT_CASES, EPS, MOMENTUM, Case

    device = torch.device("cuda", torch.cuda.current_device())
    aten = torch.ops.aten
    for shape, layout in DEFAULT_CASES:
        for dtype in dtypes:
            c = Case(torch, shape, layout, dtype, device)
            torch.cuda.synchronize()
            label = f"{c.label()} {dtype}"
            ops = {
                "bnorm train": lambda: bnorm.forward_train(c.xb, c.w, c.b, c.rm_b, c.rv_b, axis=c.axis,
                                                           momentum=MOMENTUM, eps=EPS, out=c.y),
                "bnorm infer": lambda: bnorm.forward_infer(c.xb, c.rm_b, c.rv_b, c.w, c.b, axis=c.axis, eps=EPS,
                                                           out=c.y),
                "bnorm backward": lambda: bnorm.backward(c.dyb, c.xb, c.save_mean, c.save_invstd, c.w, axis=c.axis,
                                                         out=c.dx),
                "native train": lambda: aten.native_batch_norm(c.xt, c.w, c.b, c.rm_t, c.rv_t, True, MOMENTUM, EPS),
                "cudnn train": lambda: aten.cudnn_batch_norm(c.xt, c.w, c.b, c.rm_t, c.rv_t, True, MOMENTUM, EPS),
            }
            for name, fn in ops.items():
                # the op's kernels follow this marker line in the run's output (stderr)
                print(f"## {label} | {name}", file=sys.stderr, flush=True)
                try:
                    fn()
                    torch.cuda.synchronize()
                except Exception as e:  # noqa: BLE001 - cuDNN refuses some dtype combinations
                    print(f"   n/a: {str(e).splitlines()[0][:80]}", file=sys.stderr)
            del c
            torch.cuda.empty_cache()


def summary(path):
    """Kernel rows of ncu's CSV (one row per kernel and metric), grouped per kernel launch."""
    launches = {}
    with open(path) as f:
        lines = [line for line in f if line.startswith('"')]
    for row in csv.DictReader(lines):
        key = (int(row["ID"]), row["Kernel Name"])
        value = float(row["Metric Value"].replace(",", ""))
        unit = row["Metric Unit"]
        scale = {"byte": 1, "Kbyte": 1e3, "KB": 1e3, "Mbyte": 1e6, "MB": 1e6, "Gbyte": 1e9, "GB": 1e9,
                 "ns": 1e-3, "nsecond": 1e-3, "us": 1, "usecond": 1, "ms": 1e3, "msecond": 1e3}
        launches.setdefault(key, {})[row["Metric Name"]] = value * scale.get(unit, 1)
    print(f"{'id':>4} {'kernel':42} {'us':>8} {'MB read':>8} {'MB write':>8} {'GB/s':>7} {'grid':>7}")
    for (i, name), m in sorted(launches.items()):
        us = m.get("gpu__time_duration.sum", float("nan"))
        rd, wr = m.get("dram__bytes_read.sum", 0) / 1e6, m.get("dram__bytes_write.sum", 0) / 1e6
        gbs = (rd + wr) * 1e3 / us if us > 0 else float("nan")
        print(f"{i:>4} {name[:42]:42} {us:8.1f} {rd:8.1f} {wr:8.1f} {gbs:7.0f} "
              f"{m.get('launch__grid_size', 0):7.0f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--summary", metavar="CSV", help="summarize ncu's CSV output instead of running")
    args = ap.parse_args()
    if args.summary:
        summary(args.summary)
    else:
        run([d for d in args.dtypes.split(",") if d])


if __name__ == "__main__":
    main()
