#!/usr/bin/env python3
"""bnorm's GPU benchmark (issue 4): bnorm vs PyTorch's batch norm vs a device-to-device copy.

    python benchmarks/bench_gpu.py                       # float32 and bfloat16, issue 4's shapes
    python benchmarks/bench_gpu.py --dtypes float32 --ops train --shapes 64x256x56x56:nchw
    python benchmarks/bench_gpu.py --graphs              # each call replayed from a CUDA graph
    python benchmarks/bench_gpu.py --no-record           # print only, write no results file

For every op (training forward, inference forward, backward with batch statistics), shape,
layout and dtype it times, on one CUDA stream with CUDA events:

- bnorm: ``bnorm.forward_train`` / ``forward_infer`` / ``backward`` on the PyTorch tensors
  (zero-copy through DLPack), preallocated ``out=``, on PyTorch's current stream (bnorm's default);
- PyTorch native: ``torch.ops.aten.native_batch_norm`` / ``native_batch_norm_backward``;
- cuDNN (when PyTorch has it): ``torch.ops.aten.cudnn_batch_norm`` / ``_backward``
  (what ``torch.nn.functional.batch_norm`` picks for most CUDA inputs);
- copy: ``y.copy_(x)``, a device-to-device copy of x's bytes (read S + write S).

Contenders run interleaved, one call each per round in a rotating order, with L2 flushed
(a write of 2x the L2 size) before every timed call unless ``--no-flush``; the median and
the minimum over the rounds are reported. Before timing, each case checks bnorm against
PyTorch native in float64 (outputs, saved statistics, running statistics, gradients; PyTorch
native's own errors printed beside bnorm's).

Columns: bnorm's effective bandwidth counts the transfers of issue 4's model (training
forward 3S: x twice and y; inference 2S; backward 5S: dy and x twice, and dx), and
"% copy" is that bandwidth over the copy's (2S / copy time). "x native", "x cudnn":
their time / bnorm's (> 1: bnorm is faster). Targets (issue 4): >= 1.0x the faster of
native/cuDNN on every case, >= 1.5x on NCHW, >= 85% of copy bandwidth for large cases
(S >= 32 MiB).

Results go to ``benchmarks/results/<date>-gpu-<device>.{md,json}`` (device, versions, date,
every timing). Exit status 77 (and a message) when there is no usable CUDA device.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# issue 4's shapes: (shape as N, C, ... , layout)
DEFAULT_CASES = [
    ((64, 256, 56, 56), "nchw"),
    ((64, 256, 56, 56), "nhwc"),
    ((256, 2048, 7, 7), "nchw"),
    ((8192, 4096), "nc"),
    ((32, 64, 112, 112), "nchw"),
]
DEFAULT_DTYPES = ("float32", "bfloat16")
OPS = ("train", "infer", "backward")
TRANSFERS = {"train": 3, "infer": 2, "backward": 5}  # in units of S = x.nbytes
MOMENTUM, EPS = 0.1, 1e-5
LARGE_BYTES = 32 << 20
TARGET_SPEEDUP, TARGET_SPEEDUP_NCHW, TARGET_COPY_FRACTION = 1.0, 1.5, 0.85


def parse_cases(text):
    """'64x256x56x56:nchw,8192x4096:nc' -> [((64, 256, 56, 56), 'nchw'), ((8192, 4096), 'nc')]"""
    cases = []
    for item in text.split(","):
        dims, _, layout = item.strip().partition(":")
        shape = tuple(int(d) for d in dims.lower().split("x"))
        layout = layout or ("nc" if len(shape) == 2 else "nchw")
        if layout not in ("nchw", "nhwc", "nc") or (layout == "nhwc" and len(shape) != 4):
            raise SystemExit(f"bad case {item!r}: layout must be nchw, nhwc (4-D) or nc")
        cases.append((shape, layout))
    return cases


def skip(message):
    print(f"bench_gpu: SKIPPED: {message}", file=sys.stderr)
    sys.exit(77)


# ---- one case: tensors for bnorm and PyTorch sharing memory ------------------------------------


class Case:
    """x for PyTorch (NCHW-shaped; channels_last strides for 'nhwc') and the same memory for
    bnorm (contiguous, channel axis 1, or -1 for 'nhwc'), plus parameters and outputs."""

    def __init__(self, torch, shape, layout, dtype, device):
        self.shape, self.layout, self.dtype_name = shape, layout, dtype
        dt = getattr(torch, dtype)
        pdt = torch.float32 if dtype in ("float16", "bfloat16") else dt
        gen = torch.Generator(device=device).manual_seed(0)
        C = shape[1]
        if layout == "nhwc":
            n, c, h, w = shape
            self.xb = (torch.randn((n, h, w, c), generator=gen, device=device) * 2 + 3).to(dt)
            self.dyb = torch.randn((n, h, w, c), generator=gen, device=device).to(dt)
            self.xt, self.dyt = self.xb.permute(0, 3, 1, 2), self.dyb.permute(0, 3, 1, 2)
            self.axis = -1
        else:
            self.xb = (torch.randn(shape, generator=gen, device=device) * 2 + 3).to(dt)
            self.dyb = torch.randn(shape, generator=gen, device=device).to(dt)
            self.xt, self.dyt = self.xb, self.dyb
            self.axis = 1
        self.w = (torch.rand(C, generator=gen, device=device) + 0.5).to(pdt)
        self.b = (torch.randn(C, generator=gen, device=device) * 0.1).to(pdt)
        self.rm_b, self.rv_b = torch.zeros(C, device=device, dtype=pdt), torch.ones(C, device=device, dtype=pdt)
        self.rm_t, self.rv_t = self.rm_b.clone(), self.rv_b.clone()
        self.y = torch.empty_like(self.xb)
        self.dx = torch.empty_like(self.xb)
        self.copy_dst = torch.empty_like(self.xb)
        self.nbytes = self.xb.numel() * self.xb.element_size()
        # saved statistics for the backward calls (PyTorch's, so both backwards get the same)
        _, self.save_mean, self.save_invstd = torch.ops.aten.native_batch_norm(
            self.xt, self.w, self.b, self.rm_t.clone(), self.rv_t.clone(), True, MOMENTUM, EPS)

    def label(self):
        return "x".join(str(d) for d in self.shape) + " " + self.layout


def contenders(torch, bnorm, case, op):
    """name -> zero-argument callable for this op (None where unavailable)."""
    aten = torch.ops.aten
    c = case
    fns = {}
    if op == "train":
        fns["bnorm"] = lambda: bnorm.forward_train(c.xb, c.w, c.b, c.rm_b, c.rv_b, axis=c.axis, momentum=MOMENTUM,
                                                   eps=EPS, out=c.y)
        fns["native"] = lambda: aten.native_batch_norm(c.xt, c.w, c.b, c.rm_t, c.rv_t, True, MOMENTUM, EPS)
        fns["cudnn"] = lambda: aten.cudnn_batch_norm(c.xt, c.w, c.b, c.rm_t, c.rv_t, True, MOMENTUM, EPS)
    elif op == "infer":
        fns["bnorm"] = lambda: bnorm.forward_infer(c.xb, c.rm_b, c.rv_b, c.w, c.b, axis=c.axis, eps=EPS, out=c.y)
        fns["native"] = lambda: aten.native_batch_norm(c.xt, c.w, c.b, c.rm_t, c.rv_t, False, MOMENTUM, EPS)
        fns["cudnn"] = lambda: aten.cudnn_batch_norm(c.xt, c.w, c.b, c.rm_t, c.rv_t, False, MOMENTUM, EPS)
    else:
        fns["bnorm"] = lambda: bnorm.backward(c.dyb, c.xb, c.save_mean, c.save_invstd, c.w, axis=c.axis,
                                              batch_stats=True, out=c.dx)
        fns["native"] = lambda: aten.native_batch_norm_backward(
            c.dyt, c.xt, c.w, c.rm_t, c.rv_t, c.save_mean, c.save_invstd, True, EPS, [True, True, True])
        cudnn_fwd = {}
        dy_cudnn = c.dyt.contiguous(memory_format=_format(torch, c.xt))  # no copy: already in x's layout

        def cudnn_backward():
            if not cudnn_fwd:  # cuDNN's backward wants its own forward's saved values and reserve
                _, sm, sv, reserve = aten.cudnn_batch_norm(c.xt, c.w, c.b, c.rm_t.clone(), c.rv_t.clone(), True,
                                                           MOMENTUM, EPS)
                cudnn_fwd.update(sm=sm, sv=sv, reserve=reserve)
            return aten.cudnn_batch_norm_backward(c.xt, dy_cudnn, c.w,
                                                  c.rm_t, c.rv_t, cudnn_fwd["sm"], cudnn_fwd["sv"], EPS,
                                                  cudnn_fwd["reserve"])

        fns["cudnn"] = cudnn_backward
    fns["copy"] = lambda: c.copy_dst.copy_(c.xb)
    if not (torch.backends.cudnn.is_available() and torch.backends.cudnn.enabled):
        fns["cudnn"] = None
    else:
        try:
            fns["cudnn"]()
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 - cuDNN refuses some dtype/layout combinations
            print(f"    cudnn n/a for {op} {case.label()} {case.dtype_name}: {str(e).splitlines()[0][:100]}")
            fns["cudnn"] = None
    return fns


def _format(torch, t):
    return torch.channels_last if (t.dim() == 4 and not t.is_contiguous()) else torch.contiguous_format


# ---- correctness check against a float64 reference ------------------------------------------


def check_case(torch, bnorm, case):
    """Max error of bnorm, and of PyTorch native, against PyTorch native in float64 on the
    same (rounded) inputs, relative to the largest reference value, per output. bnorm's
    decide the check; native's are reported beside them (a low-precision reduction of either
    shows here, not as a difference between the two)."""
    c = case
    aten = torch.ops.aten
    out_tol = 2e-2 if c.dtype_name in ("float16", "bfloat16") else 1e-4
    rm_b, rv_b, rm_t, rv_t = c.rm_b.clone(), c.rv_b.clone(), c.rm_t.clone(), c.rv_t.clone()
    y, mean, invstd = bnorm.forward_train(c.xb, c.w, c.b, rm_b, rv_b, axis=c.axis, momentum=MOMENTUM, eps=EPS)
    yt, mt, it = aten.native_batch_norm(c.xt, c.w, c.b, rm_t, rv_t, True, MOMENTUM, EPS)
    yi = bnorm.forward_infer(c.xb, rm_b, rv_b, c.w, c.b, axis=c.axis, eps=EPS)
    yit, _, _ = aten.native_batch_norm(c.xt, c.w, c.b, rm_t, rv_t, False, MOMENTUM, EPS)
    # both backwards from the same saved statistics (native's)
    dx, dw, db = bnorm.backward(c.dyb, c.xb, mt, it, c.w, axis=c.axis, batch_stats=True)
    dxt, dwt, dbt = aten.native_batch_norm_backward(c.dyt, c.xt, c.w, rm_t, rv_t, mt, it, True, EPS, [True] * 3)
    torch.cuda.synchronize()

    d = lambda t: t.double()  # noqa: E731
    rm64, rv64 = d(c.rm_t), d(c.rv_t)
    y64, m64, i64 = aten.native_batch_norm(d(c.xt), d(c.w), d(c.b), rm64, rv64, True, MOMENTUM, EPS)
    yi64, _, _ = aten.native_batch_norm(d(c.xt), d(c.w), d(c.b), rm64, rv64, False, MOMENTUM, EPS)
    dx64, dw64, db64 = aten.native_batch_norm_backward(d(c.dyt), d(c.xt), d(c.w), rm64, rv64, d(mt), d(it), True,
                                                       EPS, [True] * 3)
    as_t = (lambda a: a.permute(0, 3, 1, 2)) if c.layout == "nhwc" else (lambda a: a)  # noqa: E731

    def err(a, b):
        a, b = a.double(), b.double()
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))

    # (name, bnorm's result, native's, the float64 reference, tolerance)
    outputs = [
        ("y", as_t(y), yt, y64, out_tol), ("mean", mean, mt, m64, 1e-4), ("invstd", invstd, it, i64, 1e-4),
        ("running_mean", rm_b, rm_t, rm64, 1e-4), ("running_var", rv_b, rv_t, rv64, 1e-4),
        ("y_infer", as_t(yi), yit, yi64, out_tol), ("dx", as_t(dx), dxt, dx64, out_tol * 5),
        ("dweight", dw, dwt, dw64, 1e-3), ("dbias", db, dbt, db64, 1e-3),
    ]
    errors = {name: err(ours, ref) for name, ours, _, ref, _ in outputs}
    native_errors = {name: err(theirs, ref) for name, _, theirs, ref, _ in outputs}
    bad = [f"{name} {errors[name]:.1e}" for name, _, _, _, tol in outputs if not errors[name] <= tol]
    return ("ok" if not bad else "DIFF " + ", ".join(bad)), errors, native_errors


# ---- timing ------------------------------------------------------------------------------------


def time_row(torch, fns, rounds, warmup, flush, graphs):
    """Interleaved CUDA-event timing: {name: [ms per round]}."""
    names = [n for n, f in fns.items() if f is not None]
    calls = dict(fns)
    if graphs:
        for n in names:
            calls[n] = _graphed(torch, fns[n])
    for _ in range(warmup):
        for n in names:
            calls[n]()
    torch.cuda.synchronize()
    events = {n: [] for n in names}
    from bnorm.bench import interleaved_order  # each contender follows each other equally often

    for n in interleaved_order(names, rounds):
        if flush is not None:
            flush.zero_()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        calls[n]()
        end.record()
        events[n].append((start, end))
    torch.cuda.synchronize()
    return {n: [s.elapsed_time(e) for s, e in ev] for n, ev in events.items()}


def _graphed(torch, fn):
    """The call captured once in a CUDA graph (side stream, as torch.cuda.graph requires)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm up outside capture: first-call initialization (pools, cuDNN plans)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


# ---- machine info and report ------------------------------------------------------------------


def machine_info(torch, bnorm):
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "bnorm": getattr(bnorm, "__version__", "?"),
        "python": platform.python_version(),
        "host": platform.node(),
    }
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20)
        if smi.returncode == 0:
            info["nvidia_smi"] = smi.stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", type=parse_cases, default=DEFAULT_CASES,
                    help="comma list of NxCx...:layout, layout nchw|nhwc|nc (default: issue 4's five)")
    ap.add_argument("--dtypes", default=",".join(DEFAULT_DTYPES), help="comma list (default float32,bfloat16)")
    ap.add_argument("--ops", default=",".join(OPS), help="comma list of train, infer, backward")
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per row (default 30)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-flush", action="store_true", help="do not flush L2 before each timed call")
    ap.add_argument("--graphs", action="store_true", help="replay every call from a CUDA graph (no host overhead)")
    ap.add_argument("--no-record", action="store_true", help="write no results files")
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--label", default="", help="text added to the report's title")
    args = ap.parse_args(argv)

    try:
        import torch
    except ImportError:
        skip("PyTorch is not installed (pip install torch)")
    import bnorm

    if not torch.cuda.is_available():
        skip("torch.cuda.is_available() is false")
    if not (getattr(bnorm, "built_with_cuda", False) and bnorm.cuda_available()):
        skip("bnorm was built without CUDA or sees no CUDA device (bnorm.cuda_available() is false)")

    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    ops = [o.strip() for o in args.ops.split(",") if o.strip()]
    device = torch.device("cuda", torch.cuda.current_device())
    info = machine_info(torch, bnorm)
    flush = None
    if not args.no_flush:
        l2 = max(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0), 8 << 20)
        flush = torch.empty(2 * l2 // 4, dtype=torch.float32, device=device)

    print(f"bnorm GPU benchmark {args.label}".rstrip())
    print("  " + ", ".join(f"{k}: {v}" for k, v in info.items()))
    print(f"  rounds {args.rounds}, warmup {args.warmup}, L2 flush {'off' if flush is None else 'on'}, "
          f"graphs {'on' if args.graphs else 'off'}")
    header = ("| op | shape | dtype | MiB | bnorm ms (min) | GB/s | % copy | copy ms | native ms | x native "
              "| cudnn ms | x cudnn | check | targets |")
    rows, lines = [], [header, "|" + " --- |" * 14]
    print(header)
    print(lines[1])
    for shape, layout in args.shapes:
        for dtype in dtypes:
            case = Case(torch, shape, layout, dtype, device)
            status, errors, native_errors = check_case(torch, bnorm, case)
            print(f"    {case.label()} {dtype}: max error vs float64, bnorm/native: "
                  + ", ".join(f"{k} {errors[k]:.0e}/{native_errors[k]:.0e}" for k in errors))
            for op in ops:
                fns = contenders(torch, bnorm, case, op)
                times = time_row(torch, fns, args.rounds, args.warmup, flush, args.graphs)
                med = {n: statistics.median(t) for n, t in times.items()}
                low = {n: min(t) for n, t in times.items()}
                S = case.nbytes
                b = med["bnorm"]
                gbs = TRANSFERS[op] * S / (b * 1e-3) / 1e9
                copy_fraction = TRANSFERS[op] * med["copy"] / (2 * b)
                x_native = med["native"] / b if "native" in med else None
                x_cudnn = med["cudnn"] / b if "cudnn" in med else None
                torch_best = min(v for v in (x_native, x_cudnn) if v is not None)
                missed = []
                if torch_best < TARGET_SPEEDUP:
                    missed.append("<1.0x torch")
                if layout == "nchw" and torch_best < TARGET_SPEEDUP_NCHW:
                    missed.append("<1.5x torch (NCHW)")
                if S >= LARGE_BYTES and copy_fraction < TARGET_COPY_FRACTION:
                    missed.append("<85% copy BW")
                row = {
                    "op": op, "shape": list(shape), "layout": layout, "dtype": dtype, "bytes": S,
                    "ms": {n: {"median": med[n], "min": low[n], "all": times[n]} for n in times},
                    "bnorm_gbs": gbs, "copy_fraction": copy_fraction, "x_native": x_native, "x_cudnn": x_cudnn,
                    "check": status, "errors": errors, "native_errors": native_errors, "targets_missed": missed,
                }
                rows.append(row)
                line = (f"| {op} | {case.label()} | {dtype} | {S / 2**20:.0f} | {b:.3f} ({low['bnorm']:.3f}) | "
                        f"{gbs:.0f} | {100 * copy_fraction:.0f}% | {med['copy']:.3f} | "
                        f"{med.get('native', float('nan')):.3f} | {fmt_ratio(x_native)} | "
                        + (f"{med['cudnn']:.3f}" if "cudnn" in med else "-")
                        + f" | {fmt_ratio(x_cudnn)} | {status} | {'met' if not missed else ', '.join(missed)} |")
                lines.append(line)
                print(line, flush=True)
            del case
            torch.cuda.empty_cache()

    met = sum(not r["targets_missed"] for r in rows)
    bad = sum(r["check"] != "ok" for r in rows)
    summary = f"{met} of {len(rows)} rows meet every target; {bad} rows with a correctness DIFF"
    print(summary)
    if not args.no_record:
        os.makedirs(args.out_dir, exist_ok=True)
        slug = re.sub(r"[^a-z0-9]+", "-", info["device"].lower()).strip("-")
        stem = os.path.join(args.out_dir, f"{datetime.date.today().isoformat()}-gpu-{slug}")
        with open(stem + ".md", "w") as f:
            f.write(f"# bnorm GPU benchmark: {info['device']} {args.label}\n\n".replace(" \n", "\n"))
            f.write("Run with `python benchmarks/bench_gpu.py " + " ".join(argv or sys.argv[1:]) + "`\n\n")
            for k, v in info.items():
                f.write(f"- {k}: {v}\n")
            f.write(f"- rounds {args.rounds}, warmup {args.warmup}, L2 flush {'off' if flush is None else 'on'}, "
                    f"graphs {'on' if args.graphs else 'off'}\n\n")
            f.write("\n".join(lines) + "\n\n" + summary + "\n")
        with open(stem + ".json", "w") as f:
            json.dump({"machine": info, "args": vars(args) | {"shapes": [list(s) + [l] for s, l in args.shapes]},
                       "rows": rows}, f, indent=1)
        print(f"wrote {stem}.md and {stem}.json")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
