#!/usr/bin/env python3
"""Redraw the sweep chart from recorded results, without re-measuring.

    python benchmarks/plot_sweep.py benchmarks/results/2026-11-25-cpu-intel-xeon-2cpu.json \
        [-o docs/images/bench_sweep.png]

Takes the JSON of ``python -m bnorm.bench --sweep --json PATH`` or of
``benchmarks/bench_cpu.py --record``. To measure and draw in one go:
``python -m bnorm.bench --sweep --plot docs/images/bench_sweep.png``.
"""

import argparse
import json
import os
import sys

from bnorm import bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("json", help="results JSON holding a sweep")
    p.add_argument("-o", "--out", default=os.path.join(ROOT, "docs", "images", "bench_sweep.png"))
    args = p.parse_args(argv)
    with open(args.json) as f:
        data = json.load(f)
    res = data["runs"]["sweep"] if "runs" in data else data
    if "sweep" not in res:
        raise SystemExit(f"{args.json} holds no sweep (run python -m bnorm.bench --sweep --json PATH)")
    meta = res["meta"]
    sw = res["sweep"]
    title = (f"bnorm {meta['bnorm']} CPU: ns/element at ~{sw['total_elements']:,} elements, {sw['dtype']}, "
             f"{meta['bnorm_threads']} threads, {meta['cpu_model']}")
    if bench.plot_sweep(sw, args.out, title):
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
