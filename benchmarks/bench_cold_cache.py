"""Batch norm with hot and with cold caches: bnorm's kernels against PyTorch's, per call.

    python benchmarks/bench_cold_cache.py              # ResNet-18's layer shapes at batch 32, 64x64
    python benchmarks/bench_cold_cache.py --shapes 32x128x8x8 --calls 100

Inside a training step a batch norm's inputs come from DRAM: the backward's saved input
was written during the forward, many layers before, and the convolutions in between evict
the caches. A loop over one tensor measures the hot case only. Here each call is timed
twice: in a loop (hot) and after a memset of --flush MB (cold); medians of --calls calls,
microseconds. bnorm through its compiled module (no Python checks), PyTorch through
aten::native_batch_norm / native_batch_norm_backward; float32, training statistics.
Needs torch.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from bnorm import _core

RESNET18 = ["32x64x32x32", "32x64x16x16", "32x128x8x8", "32x256x4x4", "32x512x2x2"]


def median_us(fn, flush, calls):
    times = []
    for _ in range(calls):
        if flush is not None:
            flush.fill(1)
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default=",".join(RESNET18), help="NxCxHxW,... (default: ResNet-18's)")
    p.add_argument("--calls", type=int, default=60)
    p.add_argument("--flush", type=int, default=64, help="MB written between cold calls (default 64)")
    p.add_argument("--threads", type=int, default=2, help="bnorm and torch threads (default 2)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    import bnorm
    bnorm.set_num_threads(args.threads)
    flush = np.empty(args.flush << 20, np.uint8)
    print(f"us per call, median of {args.calls}; cold: after a {args.flush} MB memset")
    print(f"{'shape':>16} | {'op':8} | {'torch hot':>9} {'bnorm hot':>9} | {'torch cold':>10} {'bnorm cold':>10} | cold ratio")
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        C = shape[1]
        x, dy = torch.randn(shape), torch.randn(shape)
        w, b = torch.ones(C), torch.zeros(C)
        _, mean, invstd = torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5)
        out, v1, v2 = torch.empty_like(x), torch.empty(C), torch.empty(C)
        sh = (shape[0], C, x[0, 0].numel())
        xn, dyn, mn, isn, wn, bn, on, v1n, v2n = (t.numpy() for t in (x, dy, mean, invstd, w, b, out, v1, v2))
        ops = {
            "forward": (lambda: torch.ops.aten.native_batch_norm(x, w, b, None, None, True, 0.1, 1e-5),
                        lambda: _core.forward_train(xn, sh, wn, bn, None, None, 0.1, 1e-5, on, v1n, v2n)),
            "backward": (lambda: torch.ops.aten.native_batch_norm_backward(dy, x, w, None, None, mean, invstd, True,
                                                                            1e-5, [True, True, True]),
                         lambda: _core.backward(dyn, xn, sh, mn, isn, wn, True, on, v1n, v2n)),
        }
        for name, (torch_fn, bnorm_fn) in ops.items():
            t_hot, b_hot = median_us(torch_fn, None, args.calls), median_us(bnorm_fn, None, args.calls)
            t_cold, b_cold = median_us(torch_fn, flush, args.calls), median_us(bnorm_fn, flush, args.calls)
            print(f"{text:>16} | {name:8} | {t_hot:9.0f} {b_hot:9.0f} | {t_cold:10.0f} {b_cold:10.0f} | "
                  f"{t_cold / b_cold:.2f}x")


if __name__ == "__main__":
    main()
