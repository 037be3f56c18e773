"""The write spans (cpu_spans.hpp) of inference and normalize: planes of 32 to 63 elements,
and of up to 127 whose output is large enough to stream (runs under 1 KiB for 4- and 8-byte
elements: 255 float32), unless the runs are whole cache lines, are written as spans of whole
rows, a vector's coefficients split where it crosses into the next channel. Elementwise,
so every element must have the bits of the same call on the channels-last copy of x (rows:
no spans, the same operations per element). Each instruction set's build runs in a
subprocess (BNORM_CPU_ISA), on every dtype, with the fused epilogue, outputs at odd element
offsets, cached and streamed sizes, 1 to 3 threads, in place. The backward's elementwise
pass on these shapes (eval mode, backward_elemt, with ReLU's dsum; written run by run:
spans there cost compile time, see cpu_spans.hpp) is compared the same way, and the
training forward's unfused pass against the float64 reference.
"""

import pytest

from isa_runs import ELEMENTWISE_PRELUDE, ORDER, run_check

CHECK = ELEMENTWISE_PRELUDE + r"""
def channels_last(a):
    return np.ascontiguousarray(a.transpose(0, 2, 1))

for dtype in dtypes:
    size = np.dtype(dtype).itemsize
    cases = [(32, 130, None), (36, 257, None), (49, 2050, None), (64, 129, None), (100, 67, None), (127, 33, None),
             (196, 20, None), (225, 9, None), (255, 9, None), (256, 9, None),
             (49, 70, 3), (33, 64, 2), (32, 2, 1), (63, 5, 4)]  # (inner, channels, samples: None = streamed)
    for inner, channels, n in cases:
        n = n or STREAM // (channels * inner * size) + 2
        x = (1.5 + 2 * rng.standard_normal((n, channels, inner))).astype(dtype)
        z = rng.standard_normal(x.shape).astype(dtype)
        rm = rng.standard_normal(channels).astype(np.float32 if size <= 4 else np.float64)
        rv = (0.5 + rng.random(channels)).astype(rm.dtype)
        w = rng.standard_normal(channels).astype(rm.dtype)
        b = rng.standard_normal(channels).astype(rm.dtype)
        for offset in (0, 1, 3):
            for kw in ({}, {"activation": "relu"}, {"residual": z, "activation": "relu"}):
                out = offset_empty(x.shape, dtype, offset)
                bnorm.forward_infer(x, rm, rv, w, b, axis=1, out=out, **kw)
                rows = {k: (channels_last(v) if isinstance(v, np.ndarray) else v) for k, v in kw.items()}
                want = bnorm.forward_infer(channels_last(x), rm, rv, w, b, axis=-1, **rows).transpose(0, 2, 1)
                if not np.array_equal(bits(out), bits(want)):
                    raise SystemExit(f"{np.dtype(dtype).name} {x.shape} offset {offset} {list(kw)}: differs")
                checked += 1
        # any thread count: the same bits (spans are cut into chunks by the team's size)
        if n > 3:
            want = bnorm.forward_infer(x, rm, rv, w, b, axis=1)
            for threads in (1, 3):
                bnorm.set_num_threads(threads)
                got = bnorm.forward_infer(x, rm, rv, w, b, axis=1)
                bnorm.set_num_threads(2)
                if not np.array_equal(bits(got), bits(want)):
                    raise SystemExit(f"{np.dtype(dtype).name} {x.shape} on {threads} threads: differs")
            checked += 1
        # in place: out is x (each vector computed before anything it overlaps is written)
        want = bnorm.forward_infer(x, rm, rv, w, b, axis=1)
        inplace = x.copy()
        bnorm.forward_infer(inplace, rm, rv, w, b, axis=1, out=inplace)
        if not np.array_equal(bits(inplace), bits(want)):
            raise SystemExit(f"{np.dtype(dtype).name} {x.shape} in place: differs")
        checked += 1
        # the backward's elementwise pass: eval mode (dx = g * scale), backward_elemt with and
        # without ReLU (which writes dsum beside dx)
        dy, y = z, x
        mean, invstd = rm, 1 / np.sqrt(rv)
        sum_dy = rng.standard_normal(channels).astype(rm.dtype)
        sum_dy_xhat = rng.standard_normal(channels).astype(rm.dtype)
        checked += check_backward_elementwise(f"{np.dtype(dtype).name} {x.shape}", dy, x, y, mean, invstd, w,
                                              sum_dy, sum_dy_xhat, (channels_last, -1, lambda r: r.transpose(0, 2, 1)))
    # the training forward's unfused pass (a channel too large to stay cached: > 1 MiB)
    x = (3 + rng.standard_normal(((2 << 20) // (49 * size) + 3, 2, 49))).astype(dtype)
    y, mean, invstd = bnorm.forward_train(x, axis=1)
    ry, rmean, rinv, _, _ = ref.forward_train(x, None, None, None, None, 1, 0.1)
    tol = {2: 2e-2, 4: 2e-5, 8: 1e-12}[size]
    err = float(np.max(np.abs(y.astype(np.float64) - ry)))
    if err > tol * 4:
        raise SystemExit(f"{np.dtype(dtype).name} training: error {err}")
    checked += 1
print(json.dumps({"isa": bnorm.cpu_isa(), "checked": checked}))
"""


@pytest.mark.parametrize("isa", ORDER)
def test_spans_have_the_bits_of_runs(isa):
    result = run_check(isa, CHECK, timeout=600)
    assert result["checked"] >= 3 * 14 * (9 + 1 + 4) + 3
