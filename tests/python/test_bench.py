"""Smoke tests of the benchmark (python -m bnorm.bench): it runs and prints its table.

Tiny sizes and repeat counts; nothing here asserts anything about timings.
"""

import importlib.util
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import bnorm
from bnorm import bench


def _run(args, tmp_path, timeout=300):
    env = {**os.environ, "MPLBACKEND": "Agg"}
    proc = subprocess.run([sys.executable, "-m", "bnorm.bench"] + args, capture_output=True, text=True, timeout=timeout,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def test_table_is_printed(tmp_path):
    jpath = tmp_path / "r.json"
    out = _run(["--shapes", "4x3x5x5:1,3x4x4x6:-1,16x7", "--repeat", "2", "--warmup", "1",
                "--threads", "1", "--json", str(jpath)], tmp_path)
    assert "bnorm" in out and "machine:" in out and "threads: bnorm 1" in out
    assert "traffic model" in out and "> 1 means bnorm is faster" in out
    header = [line for line in out.splitlines() if line.startswith("| op")]
    assert len(header) == 1
    for col in ("bnorm ms", "GB/s", "vs copy", "numpy/bnorm", "check"):
        assert col in header[0]
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    assert len(rows) == 9  # 3 shapes x 3 ops
    for op in ("train", "infer", "backward"):
        assert sum(r.startswith(f"| {op} ") for r in rows) == 3
    assert all("| ok " in r for r in rows), "bnorm's output disagrees with the NumPy implementation"
    assert "targets met:" in out

    data = json.loads(jpath.read_text())
    assert data["meta"]["bnorm_threads"] == 1 and data["meta"]["numpy"] == np.__version__
    assert len(data["rows"]) == 9
    r = data["rows"][0]
    assert r["shape"] == [4, 3, 5, 5] and r["dtype"] == "float32"
    assert r["timings"]["bnorm"]["rounds"] == 2 and r["vs_copy"] > 0
    if data["meta"]["torch"]:
        assert "torch/bnorm" in header[0] and r["torch_speedup"] > 0
        assert data["rows"][3]["torch_layout"] == "channels_last"


def test_busy_tables(tmp_path):
    """--busy: an idle and a busy table, bnorm against bnorm on one thread (in a worker)."""
    jpath = tmp_path / "busy.json"
    out = _run(["--busy", "--shapes", "4x3x5x5:1", "--ops", "train", "--repeat", "2", "--budget", "0",
                "--no-torch", "--json", str(jpath)], tmp_path)
    assert "### idle" in out and "### busy: a process spinning on one core" in out
    rows = [line for line in out.splitlines() if line.startswith("| train")]
    assert len(rows) == 6  # 2 phases x (the shape + the 2 small shapes --busy adds)
    data = json.loads(jpath.read_text())
    assert [r["phase"] for r in data["busy"]] == ["idle"] * 3 + ["busy"] * 3
    assert all(r["bnorm_ms"] > 0 and r["one_thread_ms"] > 0 for r in data["busy"])
    assert "busy targets:" in out


def test_busy_tables_in_passes(tmp_path):
    """--busy --passes 2: each row measured in two passes (fresh arrays each), judged on the
    medians of the passes, with the passes' range printed and stored."""
    jpath = tmp_path / "busy.json"
    out = _run(["--busy", "--shapes", "4x3x5x5:1", "--ops", "infer", "--repeat", "2", "--budget", "0",
                "--passes", "2", "--json", str(jpath)], tmp_path)
    rows = [line for line in out.splitlines() if line.startswith("| infer")]
    assert len(rows) == 6 and all(re.search(r"\| \d+\.\d\d \(\d+\.\d\d-\d+\.\d\d\) \|", r) for r in rows), out
    assert all(re.search(r"\| \d+/\d+ \|", r) for r in rows), out  # cut to 1t / calls
    data = json.loads(jpath.read_text())
    for r in data["busy"]:
        assert len(r["passes"]) == 2 and 0 <= r["backoff_cuts"] and r["rounds"] >= 2
        assert r["bnorm_ms"] == pytest.approx(float(np.median([p["bnorm"] for p in r["passes"]])))
    assert "(medians of 2 passes)" in out
    proc = subprocess.run([sys.executable, "-m", "bnorm.bench", "--busy", "--passes", "0"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode != 0 and "--passes must be >= 1" in proc.stderr


@pytest.mark.parametrize("dtype", ["float64", "float16"])
def test_other_dtypes(tmp_path, dtype):
    out = _run(["--shapes", "5x4x3x3:1", "--dtype", dtype, "--repeat", "1", "--warmup", "1",
                "--no-torch", "--ops", "train,bwd"], tmp_path)
    assert f"### {dtype}" in out
    rows = [line for line in out.splitlines() if line.startswith("| train") or line.startswith("| backward")]
    assert len(rows) == 2 and all("| ok " in r for r in rows)


def test_sweep(tmp_path):
    png = tmp_path / "sweep.png"
    jpath = tmp_path / "s.json"
    args = ["--sweep", "--sweep-size", "4096", "--repeat", "1", "--no-torch", "--json", str(jpath)]
    have_mpl = importlib.util.find_spec("matplotlib") is not None
    if have_mpl:
        args += ["--plot", str(png)]
    out = _run(args, tmp_path)
    assert "### sweep" in out and "worst neighbour ratio" in out
    assert "no cliffs" in out or "cliff(s)" in out
    sw = json.loads(jpath.read_text())["sweep"]
    assert len(sw["sweeps"]) == 4 and all(len(s["points"]) >= 3 for s in sw["sweeps"])
    if have_mpl:
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        # benchmarks/plot_sweep.py redraws the chart from the JSON (run from a checkout only)
        script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "plot_sweep.py")
        if os.path.exists(script):
            redrawn = tmp_path / "redrawn.png"
            proc = subprocess.run([sys.executable, script, str(jpath), "-o", str(redrawn)], capture_output=True,
                                  text=True, timeout=120, env={**os.environ, "MPLBACKEND": "Agg"})
            assert proc.returncode == 0, proc.stderr[-3000:]
            assert redrawn.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_parse_shapes_and_errors():
    assert bench.parse_shapes("64x256x28x28:1, 8192x1024") == [((64, 256, 28, 28), 1), ((8192, 1024), 1)]
    assert bench.parse_shapes("2x3x4:-1") == [((2, 3, 4), -1)]
    for bad in ("64", "4x4:2", "0x3:1", "ax3"):
        with pytest.raises(Exception):
            bench.parse_shapes(bad)
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--ops", "sideways"])
    with pytest.raises(SystemExit):
        bench.build_parser().parse_args(["--dtype", "int8"])


def test_fused_table_is_printed(tmp_path):
    jpath = tmp_path / "fused.json"
    out = _run(["--fused", "--shapes", "4x3x5x5:1,3x4x4x6:-1", "--repeat", "2", "--warmup", "1", "--threads", "1",
                "--json", str(jpath)], tmp_path)
    assert "fused epilogue" in out and "traffic floor" in out and "fused targets met:" in out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| op")]
    assert len(rows) == 10  # 2 shapes x 5 fused ops
    if "torch ms" in out:
        assert all("| ok |" in r for r in rows), "bnorm disagrees with PyTorch's op sequence"
    data = json.loads(jpath.read_text())
    assert len(data["fused_rows"]) == 10 and data["fused_rows"][0]["vs_floor"] > 0


def test_ab_builds_script_runs():
    """benchmarks/ab_builds.py (run from a checkout only), here with one build as both A and B."""
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "ab_builds.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/ab_builds.py is in the source tree only")
    proc = subprocess.run([sys.executable, script, "bnorm", "bnorm", "4x3x5x5:1,6x16:-1", "--ops",
                           "infer,train,backward,infer_relu,backward_relu", "--dtype", "float32", "--threads", "1",
                           "--budget", "0.01", "--evict", "0.25"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if " B/A " in line]
    assert len(rows) == 10, proc.stdout


def test_cold_cache_script_runs():
    """benchmarks/bench_cold_cache.py (source tree only; needs torch), tiny sizes."""
    pytest.importorskip("torch", reason="benchmarks/bench_cold_cache.py compares with PyTorch")
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_cold_cache.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/bench_cold_cache.py is in the source tree only")
    proc = subprocess.run([sys.executable, script, "--shapes", "4x3x2x2,2x5x3x1", "--calls", "2", "--flush", "1",
                           "--threads", "1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sum(" | forward " in line or " | backward " in line for line in proc.stdout.splitlines()) == 4, proc.stdout


def _bf16_script():
    script = os.path.join(os.path.dirname(__file__), "..", "..", "benchmarks", "bench_bf16.py")
    if not os.path.exists(script):
        pytest.skip("benchmarks/bench_bf16.py is in the source tree only")
    pytest.importorskip("ml_dtypes", reason="bfloat16 needs ml_dtypes")
    return script


def test_bf16_script_runs():
    """benchmarks/bench_bf16.py (source tree only), tiny sizes; with PyTorch where importable."""
    script = _bf16_script()
    args = ["--shapes", "4x3x5x5:1,6x16:-1", "--threads", "1", "--budget", "0.01"]
    has_torch = importlib.util.find_spec("torch") is not None
    proc = subprocess.run([sys.executable, script] + args + (["--torch"] if has_torch else []), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.split()[:1] == ["1"]]
    assert len(rows) == 6 and all(float(r[5]) > 0 for r in rows), proc.stdout


@pytest.mark.parametrize("large", [False, True])
def test_bf16_script_runs_both_dtypes_on_the_same_memory(large, monkeypatch):
    """bench_bf16's bfloat16 case views the float16 case's inputs, and its outputs where they
    are large (else they own their memory: bnorm's fast argument path takes those), and its
    values are normal numbers in both dtypes (no subnormal, zero or non-finite value
    changes either's path)."""
    spec = importlib.util.spec_from_file_location("bench_bf16", _bf16_script())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if large:  # (the rule, not the size: 4 MiB arrays cost seconds to fill here)
        monkeypatch.setattr(module, "SHARED_OUTPUT_BYTES", 1)
    f16, bf16 = (bench._Case((4, 3, 5, 5), 1, dt) for dt in ("float16", "bfloat16"))
    module._share_memory(f16, bf16, None)
    for name in ("x", "dy", "y", "dx"):
        assert np.shares_memory(getattr(f16, name), getattr(bf16, name)) == (large or name in ("x", "dy")), name
        assert getattr(bf16, name).dtype.name == "bfloat16"
        owns = name in ("y", "dx") and not large
        assert getattr(f16, name).flags.owndata and getattr(bf16, name).flags.owndata == owns
    for name in ("x", "dy"):
        for case in (f16, bf16):
            v = np.abs(getattr(case, name).astype(np.float64))
            assert np.all(np.isfinite(v)) and v.min() >= 2.0**-7 and v.max() < 2.0**9, (name, case.dtype)
    _, mean, invstd = bnorm.forward_train(bf16.x, bf16.w, bf16.b, axis=1)
    np.testing.assert_array_equal(bf16.mean, mean)
    np.testing.assert_array_equal(bf16.invstd, invstd)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_interleaved_order_balances_predecessors(n):
    """Every contender follows every other equally often over whole cycles (a rotation put
    the same one before bnorm every round), and each gets the calls asked for."""
    from collections import Counter

    from bnorm.bench import interleaved_order

    names = [f"f{i}" for i in range(n)]
    for calls in (1, 2, 3, 7, 12):
        order = interleaved_order(names, calls)
        assert Counter(order) == {name: calls for name in names}
    if n > 1:
        cycle = interleaved_order(names, n - 1)
        pairs = Counter((cycle[i - 1], cycle[i]) for i in range(len(cycle)))  # (cyclic)
        assert set(pairs) == {(a, b) for a in names for b in names if a != b}
        assert set(pairs.values()) == {1}
