"""The main job's demo (python -m bnorm.demo): its hand-written backprop, and a short run."""

import csv
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("sklearn", reason="bnorm.demo needs scikit-learn (pip install 'bnorm[demo]')")
pytest.importorskip("matplotlib", reason="bnorm.demo needs matplotlib (pip install 'bnorm[demo]')")

from bnorm import demo  # noqa: E402


def _finite_difference_check(batch_norm, seed=0):
    rng = np.random.default_rng(seed)
    n, n_in, n_out, hidden = 8, 5, 4, (6, 7, 6)
    # larger weights than the demo's, so that every gradient is well above rounding
    weights = demo.init_weights(rng, n_in, n_out, hidden=hidden, std=0.7)
    net = demo.MLP(weights, batch_norm=batch_norm, dtype=np.float64)
    if batch_norm:  # move BN's affine parameters off their identity initialization
        for bn in net.bn:
            bn.weight[...] = rng.uniform(0.5, 1.5, bn.weight.shape)
            bn.bias[...] = rng.normal(0, 0.5, bn.bias.shape)
    for b in net.b:
        if b is not None:
            b[...] = rng.normal(0, 0.5, b.shape)
    x = rng.normal(size=(n, n_in))
    y = rng.integers(0, n_out, size=n)

    _, grads = net.loss_and_grads(x, y)
    grads = [(p, g.copy()) for p, g in grads]
    assert len(grads) == (3 * 3 + 2 if batch_norm else 2 * 4)  # per layer: W, b or W, gamma, beta
    h = 1e-6
    for param, grad in grads:
        assert grad.shape == param.shape
        numeric = np.empty_like(grad)
        for i in np.ndindex(param.shape):
            old = param[i]
            param[i] = old + h
            lp, _ = net.loss_and_grads(x, y)
            param[i] = old - h
            lm, _ = net.loss_and_grads(x, y)
            param[i] = old
            numeric[i] = (lp - lm) / (2 * h)
        np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_plain_backprop_matches_finite_differences():
    _finite_difference_check(batch_norm=False)


def test_batchnorm_backprop_matches_finite_differences():
    _finite_difference_check(batch_norm=True)


def test_demo_short_run(tmp_path):
    res = demo.main(["--steps", "400", "--out", str(tmp_path), "--no-progress"])
    png, svg = tmp_path / "bnorm_demo.png", tmp_path / "bnorm_demo.svg"
    assert png.is_file() and png.stat().st_size > 10_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert svg.is_file() and b"<svg" in svg.read_bytes()[:2000]
    plain, bn = res["plain"], res["batch_norm"]
    assert len(plain.steps) == len(bn.steps) >= 2 and plain.steps[-1] == 400
    assert plain.percentiles.shape == (len(plain.steps), 3)
    assert np.all(np.diff(bn.percentiles, axis=1) >= 0)  # 15th <= 50th <= 85th
    assert bn.final_accuracy >= plain.final_accuracy
    assert bn.final_accuracy > 0.5  # batch norm learns within a few hundred steps


def test_demo_is_deterministic(tmp_path):
    a = demo.main(["--steps", "50", "--out", str(tmp_path / "a"), "--no-progress"])
    b = demo.main(["--steps", "50", "--out", str(tmp_path / "b"), "--no-progress"])
    for key in ("plain", "batch_norm"):
        assert a[key].accuracy == b[key].accuracy
        np.testing.assert_array_equal(a[key].percentiles, b[key].percentiles)


def test_lr_sweep_writes_table(tmp_path):
    res = demo.main(["--steps", "60", "--out", str(tmp_path), "--no-progress",
                     "--lr-sweep", "0.5,8"])
    assert [r["lr"] for r in res["sweep"]] == [0.5, 8.0]
    assert (tmp_path / "bnorm_lr_sweep.png").is_file()
    with open(tmp_path / "bnorm_lr_sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [float(r["lr"]) for r in rows] == [0.5, 8.0]
    assert all(0.0 <= float(r[k]) <= 1.0 for r in rows for k in ("plain", "batch norm"))


def test_bad_arguments():
    with pytest.raises(SystemExit):
        demo.main(["--batch-size", "1"])
    with pytest.raises(SystemExit):
        demo.main(["--lr-sweep", "0.1,abc"])


def test_python_dash_m(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "bnorm.demo", "--steps", "20", "--out", str(tmp_path),
         "--no-progress"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    assert "bnorm demo: 20 steps" in proc.stdout
    assert (tmp_path / "bnorm_demo.png").is_file()


def test_default_output_folder_and_every_file_named(tmp_path):
    """Without --out the files go to ./bnorm_demo_output, not loose into the current folder,
    and the summary lines name every file written (issue 15, item 7)."""
    proc = subprocess.run(
        [sys.executable, "-m", "bnorm.demo", "--steps", "20", "--no-progress", "--lr-sweep", "0.5"],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**os.environ, "MPLBACKEND": "Agg"})
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in tmp_path.iterdir()] == ["bnorm_demo_output"]
    written = sorted(p.name for p in (tmp_path / "bnorm_demo_output").iterdir())
    assert written == ["bnorm_demo.png", "bnorm_demo.svg", "bnorm_lr_sweep.csv", "bnorm_lr_sweep.png",
                       "bnorm_lr_sweep.svg"]
    for name in written:
        assert os.path.join("bnorm_demo_output", name) in proc.stdout, name
