"""The fused epilogue's benchmark: ``python -m bnorm.bench --fused`` (see bench.py).

Each fused op against PyTorch's op sequence on the same data (ResNet's: BN, then the add
and ReLU in place; backward: threshold_backward, then native_batch_norm_backward) and
against the traffic floor at this run's copy bandwidth: the bytes the op must move (reads
plus writes, in units of S = x.nbytes) timed at the speed of ``np.copyto`` (2S). ``vs
floor`` = bnorm's time / that floor time (1.0 = at the floor); the targets of issue 13 are
printed beside the numbers. ``--record`` writes the JSON and a markdown table to
benchmarks/results/.
"""

from __future__ import annotations

import gc

import numpy as np

import bnorm

# ResNet-50's BN shapes (issue 13), NCHW (axis 1) and channels-last (NHWC, axis -1).
RESNET_SHAPES = [(64, 64, 56, 56), (64, 256, 56, 56), (64, 512, 28, 28), (64, 1024, 14, 14), (64, 2048, 7, 7)]
DEFAULT_SHAPES = [(s, 1) for s in RESNET_SHAPES] + [((n, h, w, c), -1) for n, c, h, w in RESNET_SHAPES]

FUSED_OPS = ("train_relu", "train_add_relu", "infer_relu", "infer_add_relu", "backward_relu")
# bytes that must cross memory, in units of S: forward reads x (and z) and writes y;
# backward reads dy, y, x and writes dx and dsum.
FLOOR = {"train_relu": 2, "train_add_relu": 3, "infer_relu": 2, "infer_add_relu": 3, "backward_relu": 5}
# issue 13's PyTorch targets (float32, 2 threads): (NCHW, channels-last)
TORCH_TARGET = {"train_relu": (2.5, 1.6), "train_add_relu": (2.5, 1.6), "infer_relu": (2.0, 2.0),
                "infer_add_relu": (2.0, 2.0), "backward_relu": (1.5, 1.5)}
FLOOR_TARGET = 1.25
EPS, MOMENTUM = 1e-5, 0.1


class FusedCase:
    """Inputs, preallocated outputs and both contenders of every fused op for one shape."""

    def __init__(self, shape, axis, torch=None, seed=0):
        rng = np.random.default_rng(seed)
        self.shape, self.axis = tuple(shape), axis
        c = shape[axis % len(shape)]
        self.x = (rng.standard_normal(shape, dtype=np.float32) + 0.5)
        self.z = rng.standard_normal(shape, dtype=np.float32)
        self.dy = rng.standard_normal(shape, dtype=np.float32)
        self.w = rng.uniform(0.5, 1.5, c).astype(np.float32)
        self.b = rng.normal(0.0, 0.1, c).astype(np.float32)
        self.rm, self.rv = np.zeros(c, np.float32), np.ones(c, np.float32)
        self.out, self.dx, self.copy_dst = (np.zeros_like(self.x) for _ in range(3))
        self.S = self.x.nbytes
        self.y, self.mean, self.invstd = bnorm.forward_train(self.x, self.w, self.b, axis=axis, residual=self.z,
                                                             activation="relu")
        self.torch = torch
        if torch is not None:
            nd = len(shape)
            ax = axis % nd
            others = [i for i in range(nd) if i != ax]
            self.perm = [others[0], ax] + others[1:]  # channels at dim 1, memory shared (channels-last: a view)
            self.iperm = [self.perm.index(i) for i in range(nd)]
            t = lambda a: torch.from_numpy(a).permute(self.perm)  # noqa: E731
            self.X, self.Z, self.DY, self.Y = t(self.x), t(self.z), t(self.dy), t(self.y)
            self.W, self.B = torch.from_numpy(self.w), torch.from_numpy(self.b)
            # training updates its own running buffers; inference reads the fixed ones bnorm reads
            self.RM, self.RV = torch.from_numpy(self.rm.copy()), torch.from_numpy(self.rv.copy())
            self.RM0, self.RV0 = torch.from_numpy(self.rm), torch.from_numpy(self.rv)
            self.SM, self.SI = torch.from_numpy(self.mean), torch.from_numpy(self.invstd)

    def bnorm_fn(self, op):
        x, z, w, b, axis, out = self.x, self.z, self.w, self.b, self.axis, self.out
        rm, rv = self.rm, self.rv
        if op in ("train_relu", "train_add_relu"):
            residual = z if op == "train_add_relu" else None
            brm, brv = rm.copy(), rv.copy()
            return lambda: bnorm.forward_train(x, w, b, brm, brv, axis=axis, momentum=MOMENTUM, eps=EPS,
                                               residual=residual, activation="relu", out=out)
        if op in ("infer_relu", "infer_add_relu"):
            residual = z if op == "infer_add_relu" else None
            return lambda: bnorm.forward_infer(x, rm, rv, w, b, axis=axis, eps=EPS, residual=residual,
                                               activation="relu", out=out)
        dy, y, mean, invstd, dx = self.dy, self.y, self.mean, self.invstd, self.dx
        return lambda: bnorm.backward(dy, x, mean, invstd, w, axis=axis, activation="relu", y=y, out=dx)

    def torch_fn(self, op):
        torch = self.torch
        fwd, bwd = torch.ops.aten.native_batch_norm, torch.ops.aten.native_batch_norm_backward
        X, Z, W, B = self.X, self.Z, self.W, self.B
        training = op.startswith("train")
        RM, RV = (self.RM, self.RV) if training else (self.RM0, self.RV0)
        if op.startswith(("train", "infer")):
            add = op.endswith("add_relu")

            def forward():
                y = fwd(X, W, B, RM, RV, training, MOMENTUM, EPS)[0]
                if add:
                    y.add_(Z)
                return y.relu_()
            return forward
        DY, Y, SM, SI, mask = self.DY, self.Y, self.SM, self.SI, [True, True, True]

        def backward():
            g = torch.ops.aten.threshold_backward(DY, Y, 0)
            return bwd(g, X, W, RM, RV, SM, SI, True, EPS, mask) + (g,)
        return backward

    def copy_fn(self):
        x, dst = self.x, self.copy_dst
        return lambda: np.copyto(dst, x)

    def check(self, op) -> float | None:
        """max |bnorm - torch| / max(1, max |torch|) of the main output (None without torch)."""
        if self.torch is None:
            return None
        got = self.bnorm_fn(op)()
        want = self.torch_fn(op)()
        got = got if not isinstance(got, tuple) else got[0]
        want = (want if not isinstance(want, tuple) else want[0]).permute(self.iperm).numpy()
        scale = max(1.0, float(np.max(np.abs(want))))
        return float(np.max(np.abs(got.astype(np.float64) - want))) / scale


def _layout(shape, axis) -> str:
    return "NCHW" if axis % len(shape) == 1 else "NHWC"


def run_fused(shapes, ops, torch=None, rounds=None, warmup=2, budget=4.0, out=print) -> list[dict]:
    """Time every (shape, fused op); print a markdown table; return the rows."""
    from .bench import _shape_str, time_interleaved

    out("")
    out("### fused epilogue, float32: bnorm's one pass vs PyTorch's op sequence"
        " (forward: native_batch_norm, add_, relu_; backward: threshold_backward, native_batch_norm_backward)")
    out("")
    out("traffic floor = bytes that must move (forward: read x [and z], write y = 2S [3S]; "
        "backward: read dy, y, x, write dx, dsum = 5S) at this run's copy bandwidth (copy = 2S); "
        f"vs floor = bnorm time / floor time (target <= {FLOOR_TARGET}); torch/bnorm > 1: bnorm faster")
    out("")
    hdr = ["op", "shape", "layout", "MB", "bnorm ms", "floor", "floor ms", "vs floor", "copy GB/s"]
    if torch is not None:
        hdr += ["torch ms", "torch/bnorm", "(target)", "check"]
    hdr += ["targets"]
    out("| " + " | ".join(hdr) + " |")
    out("|" + "|".join("---" for _ in hdr) + "|")
    rows = []
    for shape, axis in shapes:
        case = FusedCase(shape, axis, torch=torch)
        layout = _layout(shape, axis)
        for op in ops:
            err = case.check(op)
            fns = {"bnorm": case.bnorm_fn(op), "copy": case.copy_fn()}
            if torch is not None:
                fns["torch"] = case.torch_fn(op)
            res = time_interleaved(fns, rounds, warmup=warmup, budget=budget)
            tb, tc = res["bnorm"]["median_s"], res["copy"]["median_s"]
            floor_s = FLOOR[op] / 2 * tc
            vs_floor = tb / floor_s
            missed = ["floor"] if vs_floor > FLOOR_TARGET else []
            row = {"op": op, "shape": list(shape), "axis": axis, "layout": layout, "S_bytes": case.S,
                   "floor_units_S": FLOOR[op], "bnorm_s": tb, "copy_s": tc, "floor_s": floor_s,
                   "vs_floor": vs_floor, "copy_gb_per_s": 2 * case.S / tc / 1e9, "timings": res}
            cells = [op, _shape_str(shape), layout, f"{case.S / 1e6:.3g}", f"{tb * 1e3:.3f}", f"{FLOOR[op]}S",
                     f"{floor_s * 1e3:.3f}", f"{vs_floor:.2f}", f"{row['copy_gb_per_s']:.1f}"]
            if torch is not None:
                tt = res["torch"]["median_s"]
                target = TORCH_TARGET[op][0 if layout == "NCHW" else 1]
                if tt / tb < target:
                    missed.append("torch")
                row.update(torch_s=tt, torch_speedup=tt / tb, torch_target=target, check_err=err)
                cells += [f"{tt * 1e3:.3f}", f"{tt / tb:.2f}", f"(>={target})",
                          "ok" if err is not None and err <= 1e-3 else f"DIFF {err:.1e}"]
            row["missed"] = missed
            cells += ["met" if not missed else "miss " + "+".join(missed)]
            out("| " + " | ".join(cells) + " |")
            rows.append(row)
        del case
        gc.collect()
    met = sum(1 for r in rows if not r["missed"])
    out("")
    out(f"fused targets met: {met}/{len(rows)} rows")
    return rows
