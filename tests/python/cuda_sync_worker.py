"""One rank of SyncBatchNorm's GPU path over torch.distributed (run by test_cuda_distributed.py).

    RANK=r WORLD_SIZE=n MASTER_ADDR=... MASTER_PORT=... python cuda_sync_worker.py BACKEND OUT_FILE

Every rank draws the same global batch (one seed), takes its uneven slice of it as torch
CUDA tensors on GPU rank % device_count, and runs the functional collective phases
(sync_batch_stats, normalize, sync_backward_reduce, backward_elemt) over the adapter of
docs/distributed.md. It compares them with bnorm on the whole batch in this one process, on
the same GPU, and writes {"rank", "failures"} as JSON to OUT_FILE. Mismatches are collected,
never raised, so that every rank makes the same collective calls.
"""

from __future__ import annotations

import datetime
import json
import sys

import numpy as np
import torch
import torch.distributed as dist

import bnorm
from bnorm.distributed import sync_backward_reduce, sync_batch_stats
from mpi_worker import load_torch_adapter

EPS = 1e-5
TOL = {torch.float32: 2e-5, torch.float64: 1e-12}
CASES = [  # (dtype, shape of the global batch, axis, fused residual + ReLU)
    (torch.float32, (10, 6, 5, 7), 1, False),
    (torch.float64, (10, 5, 7, 6), -1, False),
    (torch.float32, (10, 6, 9, 9), 1, True),
    (torch.float32, (11, 33), 1, True),
]


def _slices(n, size):
    """Uneven contiguous slices of range(n), one per rank (rank 0 the largest)."""
    bounds = np.linspace(0, n, size + 1).round().astype(int)
    bounds[1:-1] += 1
    return [slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def run_case(comm, rank, size, device, dtype, shape, axis, fused):
    failures = []

    def check(name, got, want):
        got, want = got.double().cpu(), want.double().cpu()
        scale = max(1.0, float(want.abs().max())) if want.numel() else 1.0
        err = float((got - want).abs().max()) if want.numel() else 0.0
        if not err <= TOL[dtype] * scale:
            failures.append(f"{dtype} {shape} axis={axis} fused={fused}: {name} off by {err:.3g}")

    g = torch.Generator(device="cpu").manual_seed(7)
    x_all = (torch.randn(shape, generator=g, dtype=torch.float64) * 2 + 3).to(dtype).to(device)
    dy_all = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    z_all = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype).to(device)
    c = shape[axis]
    w = torch.linspace(0.5, 2.0, c, dtype=dtype, device=device)
    b = torch.linspace(-1.0, 1.0, c, dtype=dtype, device=device)
    sl = _slices(shape[0], size)[rank]
    x, dy, z = x_all[sl].contiguous(), dy_all[sl].contiguous(), z_all[sl].contiguous()
    fuse = {"residual": z_all, "activation": "relu"} if fused else {}

    # the reference: the whole batch in one process
    y_ref, mean_ref, invstd_ref = bnorm.forward_train(x_all, w, b, axis=axis, eps=EPS, **fuse)
    grads_ref = bnorm.backward(dy_all, x_all, mean_ref, invstd_ref, w, axis=axis,
                               **({"activation": "relu", "y": y_ref} if fused else {}))

    count, mean, var = sync_batch_stats(x, comm, axis=axis)
    if count != x_all.numel() // c:
        failures.append(f"count {count}, expected {x_all.numel() // c}")
    invstd = torch.rsqrt(var + EPS)
    y = bnorm.normalize(x, mean, invstd, w, b, axis=axis, **({"residual": z, "activation": "relu"} if fused else {}))
    check("mean", mean, mean_ref)
    check("invstd", invstd, invstd_ref)
    check("y", y, y_ref[sl])
    sum_dy, sum_dy_xhat = sync_backward_reduce(dy, x, mean, invstd, comm, axis=axis,
                                               **({"activation": "relu", "y": y} if fused else {}))
    out = bnorm.backward_elemt(dy, x, mean, invstd, w, sum_dy, sum_dy_xhat, count, axis=axis,
                               **({"activation": "relu", "y": y} if fused else {}))
    dx = out[0] if fused else out
    check("dx", dx, grads_ref[0][sl])
    check("grad_weight", sum_dy_xhat, grads_ref[1])
    check("grad_bias", sum_dy, grads_ref[2])
    if fused:
        check("dsum", out[1], grads_ref[3][sl])
    return failures


def main(backend, out_file):
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=120))
    rank, size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", rank % torch.cuda.device_count())
    torch.cuda.set_device(device)
    comm = load_torch_adapter()()
    failures = []
    for case in CASES:
        failures += run_case(comm, rank, size, device, *case)
    torch.cuda.synchronize()
    dist.barrier()
    dist.destroy_process_group()
    with open(out_file, "w") as f:
        json.dump({"rank": rank, "size": size, "backend": backend, "failures": failures}, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
