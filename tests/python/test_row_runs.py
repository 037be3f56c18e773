"""Row runs (cpu_spans.hpp, writes_row_runs): the unfused write pass of channels-last and
(N, C) inputs with rows under 1.5 KiB that are not whole cache lines, large enough to stream,
is written a chunk of whole rows at a time, a vector's coefficients loaded from arrays that
repeat past the last channel (its lanes may wrap into the next row). Elementwise, so every
element must have the bits of the same call on the transposed copy (one channel per run of
a plane: no row runs, the same operations per element). Each instruction set's build runs
in a subprocess (BNORM_CPU_ISA), on every dtype, with the fused epilogue, outputs at odd
element offsets, 1 to 3 threads, in place; the training forward (whose unfused pass writes
the same way, with a low part in its center) against the float64 reference, across
thread counts and, for whole-line rows, bitwise against the row-by-row pass (a 64-byte
aligned output); the backward's elementwise pass (backward_elemt, eval mode, with ReLU's
dsum) against the transposed call, the training backward across thread counts.
"""

import pytest

from isa_runs import ELEMENTWISE_PRELUDE, ORDER, run_check

CHECK = ELEMENTWISE_PRELUDE + r"""
def planes(a):  # (n, C) -> (C, n): the same values as one run per channel
    return np.ascontiguousarray(a.T)

for dtype in dtypes:
    size = np.dtype(dtype).itemsize
    for channels in (64, 100, 127, 300, 1536 // size - 1, 1536 // size, 17):
        n = STREAM // (channels * size) + 5
        x = (1.5 + 2 * rng.standard_normal((n, channels))).astype(dtype)
        z = rng.standard_normal(x.shape).astype(dtype)
        pdt = np.float32 if size <= 4 else np.float64
        rm = rng.standard_normal(channels).astype(pdt)
        rv = (0.5 + rng.random(channels)).astype(pdt)
        w = rng.standard_normal(channels).astype(pdt)
        b = rng.standard_normal(channels).astype(pdt)
        for offset in (0, 1, 3):
            for kw in ({}, {"activation": "relu"}, {"residual": z, "activation": "relu"}):
                out = offset_empty(x.shape, dtype, offset)
                bnorm.forward_infer(x, rm, rv, w, b, axis=1, out=out, **kw)
                cols = {k: (planes(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
                want = bnorm.forward_infer(planes(x), rm, rv, w, b, axis=0, **cols).T
                if not np.array_equal(bits(out), bits(want)):
                    raise SystemExit(f"{np.dtype(dtype).name} {x.shape} offset {offset} {list(kw)}: differs")
                checked += 1
        want = bnorm.forward_infer(x, rm, rv, w, b, axis=1)
        for threads in (1, 3):
            bnorm.set_num_threads(threads)
            got = bnorm.forward_infer(x, rm, rv, w, b, axis=1)
            bnorm.set_num_threads(2)
            if not np.array_equal(bits(got), bits(want)):
                raise SystemExit(f"{np.dtype(dtype).name} {x.shape} on {threads} threads: differs")
        inplace = x.copy()
        bnorm.forward_infer(inplace, rm, rv, w, b, axis=1, out=inplace)
        if not np.array_equal(bits(inplace), bits(want)):
            raise SystemExit(f"{np.dtype(dtype).name} {x.shape} in place: differs")
        checked += 1
        # the training forward: against float64, and the same bits on any thread count
        xs = x[1:]  # (odd offset into x's buffer)
        for kw in ({}, {"residual": z[1:], "activation": "relu"}):
            y, mean, invstd = bnorm.forward_train(xs, w, b, axis=1, **kw)
            ry, _, _, _, _ = ref.forward_train(xs, w, b, None, None, 1, 0.1)
            if kw:
                ry = np.maximum(ry + z[1:].astype(np.float64), 0)
            tol = {2: 3e-2, 4: 1e-4, 8: 1e-12}[size]
            err = float(np.max(np.abs(y.astype(np.float64) - ry)))
            if not err <= tol * 8:
                raise SystemExit(f"{np.dtype(dtype).name} {xs.shape} training {list(kw)}: error {err}")
            bnorm.set_num_threads(1)
            y1, _, _ = bnorm.forward_train(xs, w, b, axis=1, **kw)
            bnorm.set_num_threads(2)
            if not np.array_equal(bits(y1), bits(y)):
                raise SystemExit(f"{np.dtype(dtype).name} {xs.shape} training on 1 thread: differs")
            if channels * size % 64 == 0:
                # whole-line rows into a 64-byte aligned output are written row by row, from
                # the same statistics: the bits of the row runs (the center's low part included)
                buf = np.empty(xs.size + 64, dtype)
                start = (-buf.ctypes.data % 64) // size
                rows = buf[start:start + xs.size].reshape(xs.shape)
                bnorm.forward_train(xs, w, b, axis=1, out=rows, **kw)
                runs = offset_empty(xs.shape, dtype, 1)  # (never on a line: row runs)
                bnorm.forward_train(xs, w, b, axis=1, out=runs, **kw)
                if not np.array_equal(bits(rows), bits(runs)):
                    raise SystemExit(f"{np.dtype(dtype).name} {xs.shape} training {list(kw)}: row runs differ")
            checked += 1
        # the backward's elementwise pass (backward_elemt, eval mode; with ReLU's dsum beside
        # dx): the bits of the planes' runs; the training backward on any thread count
        dy, y = z, x
        mean, invstd = rm, 1 / np.sqrt(rv)
        sum_dy = rng.standard_normal(channels).astype(pdt)
        sum_dy_xhat = rng.standard_normal(channels).astype(pdt)
        checked += check_backward_elementwise(f"{np.dtype(dtype).name} {x.shape}", dy[1:], x[1:], y[1:], mean,
                                              invstd, w, sum_dy, sum_dy_xhat, (planes, 0, lambda r: r.T))
        dx = bnorm.backward(dy[1:], x[1:], mean, invstd, w, axis=1)[0]
        rdx = ref.backward(dy[1:], x[1:], mean, invstd, w, axis=1)[0]
        err = float(np.max(np.abs(dx.astype(np.float64) - rdx)) / max(1.0, float(np.max(np.abs(rdx)))))
        if not err <= {2: 2e-2, 4: 1e-4, 8: 1e-10}[size]:
            raise SystemExit(f"{np.dtype(dtype).name} {x.shape} backward: error {err}")
        for kw in ({}, {"activation": "relu", "y": y[1:]}):
            want = bnorm.backward(dy[1:], x[1:], mean, invstd, w, axis=1, **kw)
            bnorm.set_num_threads(1)
            got = bnorm.backward(dy[1:], x[1:], mean, invstd, w, axis=1, **kw)
            bnorm.set_num_threads(2)
            for g, r in zip(got, want):
                if not np.array_equal(bits(g), bits(r)):
                    raise SystemExit(f"{np.dtype(dtype).name} {x.shape} backward {list(kw)} on 1 thread: differs")
            checked += 1
print(json.dumps({"isa": bnorm.cpu_isa(), "checked": checked}))
"""


@pytest.mark.parametrize("isa", ORDER)
def test_row_runs_have_the_bits_of_runs(isa):
    result = run_check(isa, CHECK, timeout=600)
    assert result["checked"] >= 3 * 7 * (9 + 1 + 2 + 4 + 2)
