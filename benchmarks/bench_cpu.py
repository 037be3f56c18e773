#!/usr/bin/env python3
"""bnorm's CPU benchmark: a thin entry point to ``python -m bnorm.bench``, and the recorder.

    python benchmarks/bench_cpu.py [bnorm.bench options]      # same as python -m bnorm.bench
    python benchmarks/bench_cpu.py --record [--label TEXT] [--wait-quiet S] [bench options]

``--record`` runs the default table for float32, float64 and float16 and the float32 size
sweep, in one process (``--only fused`` runs the fused-epilogue table of ``bnorm.bench
--fused`` instead: ``python benchmarks/bench_cpu.py --record --only fused --threads 2``),
and writes

- ``benchmarks/results/<date>-cpu-<machine>.md``: machine details and every table verbatim;
- ``benchmarks/results/<date>-cpu-<machine>.json``: all the numbers (``bnorm.bench --json``);
- ``docs/images/bench_sweep.png``: the sweep chart the docs show.

Run it on a quiet machine: the tables report, per row, how much CPU other processes used.
It runs the installed bnorm (``pip install .`` first, so that the numbers are this
checkout's).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Tee(io.TextIOBase):
    def __init__(self, *streams):
        self.streams = streams

    def write(self, s):
        for st in self.streams:
            st.write(s)
            st.flush()
        return len(s)


def _git(*args) -> str:
    try:
        return subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def _slug(model: str, ncpu) -> str:
    s = re.sub(r"\((r|tm|c)\)", "", model.lower())
    s = re.sub(r"\b(processor|cpu|with|radeon graphics|\d+-core)\b", "", s)
    s = re.sub(r"@.*", "", s)
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return f"{s or 'cpu'}-{ncpu}cpu"


def record(args, bench) -> None:
    date = args.date or datetime.date.today().isoformat()
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = bool(_git("status", "--porcelain", "--untracked-files=no"))
    commit_label = commit + (" (uncommitted changes in the tree)" if dirty else "")
    common = (["--threads", str(args.threads)] if args.threads else []) + list(getattr(args, "extra", []))
    if args.wait_quiet:
        common += ["--wait-quiet", str(args.wait_quiet)]
    note = f"{args.label}; git {commit_label}" if args.label else f"git {commit_label}"
    runs = [
        ("float32", ["--dtype", "float32"]),
        ("float64", ["--dtype", "float64"]),
        ("float16", ["--dtype", "float16"]),
        ("sweep", ["--sweep", "--plot", args.png]),
    ]
    if args.only:  # the fused-epilogue table runs only when asked for
        runs = [r for r in runs + [("fused", ["--fused"])] if r[0] in args.only.split(",")]
    outputs, results = {}, {}
    png_before = os.path.getmtime(args.png) if os.path.exists(args.png) else None
    for name, extra in runs:
        argv = common + extra + ["--note", note]
        print(f"\n=== python -m bnorm.bench {' '.join(argv)}\n", flush=True)
        buf = io.StringIO()
        with contextlib.redirect_stdout(_Tee(sys.__stdout__, buf)):
            results[name] = bench.main(argv)
        outputs[name] = (argv, buf.getvalue())

    meta = next(iter(results.values()))["meta"]
    fused_only = args.only == "fused"  # its own file: the default record of the day stays
    stem = f"{date}-cpu-{'fused-' if fused_only else ''}{_slug(meta['cpu_model'], meta['logical_cpus'])}"
    os.makedirs(args.out_dir, exist_ok=True)
    jpath = os.path.join(args.out_dir, stem + ".json")
    mpath = os.path.join(args.out_dir, stem + ".md")
    with open(jpath, "w") as f:
        json.dump({"date": date, "git_commit": commit, "dirty": dirty, "label": args.label,
                   "runs": results}, f, indent=1)

    lscpu = ""
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        pass
    keep = ("Architecture", "Vendor ID", "Model name", "CPU family", "Model", "Stepping", "CPU(s)", "Thread(s) per core", "Core(s) per socket",
            "Socket(s)", "Hypervisor vendor", "L1d cache", "L2 cache", "L3 cache", "NUMA node(s)")
    lscpu = "\n".join(line for line in lscpu.splitlines() if line.split(":")[0].strip() in keep)
    gib = (meta.get("memory_bytes") or 0) / 2**30
    loads = {k: (v["meta"].get("loadavg_start"), v["meta"].get("loadavg_end")) for k, v in results.items()}
    rel_png = os.path.relpath(os.path.abspath(args.png), os.path.abspath(args.out_dir))
    # The chart is this run's only if the sweep wrote it (it needs matplotlib).
    png_written = "sweep" in outputs and os.path.exists(args.png) and os.path.getmtime(args.png) != png_before
    if "sweep" in outputs and not png_written:
        print(f"bench_cpu: the sweep chart was not written (pip install matplotlib); {args.png} is not this run's",
              file=sys.stderr)
    with open(mpath, "w") as f:
        f.write(f"# bnorm CPU benchmark, {date}: {meta['cpu_model']}, {meta['logical_cpus']} CPUs\n\n")
        if args.label:
            f.write(f"**{args.label}**\n\n")
        f.write(f"- bnorm {meta['bnorm']}, git {commit_label}, library built {meta['bnorm_build_mtime']}\n")
        f.write(f"- numpy {meta['numpy']}, torch {meta['torch'] or 'not installed'}, python {meta['python']}\n")
        f.write(f"- threads: bnorm {meta['bnorm_threads']}, torch {meta['torch_threads']}\n")
        f.write(f"- memory: {gib:.1f} GiB; OS: {meta['os']}\n")
        f.write(f"- ISA flags: {' '.join(meta['isa_flags'])}\n")
        f.write("- load average (1, 5, 15 min) at start / end of each run: "
                + "; ".join(f"{k}: {' '.join('%.2f' % x for x in (a or []))} / {' '.join('%.2f' % x for x in (b or []))}"
                            for k, (a, b) in loads.items()) + "\n")
        f.write(f"- numbers: `{os.path.basename(jpath)}`"
                + (f"; chart: `{rel_png}`" if png_written else "; no chart (matplotlib missing)") + "\n\n")
        f.write("```\n$ lscpu   # excerpt\n" + lscpu + "\n```\n\n")
        f.write("Reproduce: `python benchmarks/bench_cpu.py --record`"
                " (or `python -m bnorm.bench` with the options shown per run).\n")
        for name, (argv, text) in outputs.items():
            f.write(f"\n## {name}\n\n`python -m bnorm.bench {' '.join(argv)}`\n\n")
            f.write(text.strip() + "\n")
            if name == "sweep" and png_written:
                f.write(f"\n![sweep chart]({rel_png})\n")
    print(f"\nrecorded {mpath}\n         {jpath}" + (f"\n         {args.png}" if png_written else ""))


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    from bnorm import bench
    if "--record" not in argv:
        return bench.main(argv)
    p = argparse.ArgumentParser(prog="bench_cpu.py --record",
                                description="Run and record the float32/float64/float16 tables and the sweep.")
    p.add_argument("--record", action="store_true")
    p.add_argument("--label", default=None, help='e.g. "before optimization"')
    p.add_argument("--date", default=None, help="date in the file name (default today)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--wait-quiet", type=float, default=0.0)
    p.add_argument("--only", default=None, help="comma list of float32,float64,float16,sweep,fused")
    p.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    p.add_argument("--png", default=os.path.join(ROOT, "docs", "images", "bench_sweep.png"))
    args, extra = p.parse_known_args(argv)
    args.extra = extra  # passed on to every bnorm.bench run (e.g. --shapes, --repeat, --budget)
    record(args, bench)


if __name__ == "__main__":
    main()
