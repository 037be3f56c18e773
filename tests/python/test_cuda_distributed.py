"""SyncBatchNorm's GPU path: the functional collective phases on torch CUDA tensors over
torch.distributed, one process per rank (tests/python/cuda_sync_worker.py), against bnorm
on the whole batch in one process.

NCCL refuses two ranks of one communicator on the same GPU ("Duplicate GPU detected"), so
with one GPU NCCL runs with one rank (its collectives on CUDA tensors, the stream ordering)
and two ranks share the GPU over Gloo; NCCL with two ranks needs two GPUs
(BNORM_NCCL_SAME_GPU=1 tries it on one anyway, to see NCCL's answer). Skipped, with the
reason, without PyTorch, a CUDA device or the backend."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import bnorm

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "cuda_sync_worker.py")
TIMEOUT_S = float(os.environ.get("BNORM_MPI_TIMEOUT", "300"))


def _torch_dist():
    try:
        import torch
        import torch.distributed as dist
    except ImportError:
        return None, None
    if not torch.cuda.is_available() or not dist.is_available():
        return None, None
    return torch, dist


torch, dist = _torch_dist()
pytestmark = pytest.mark.skipif(torch is None or not bnorm.cuda_available(),
                                reason="needs PyTorch with CUDA and torch.distributed, and a CUDA device")


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("backend,ranks", [("nccl", 1), ("gloo", 2), ("nccl", 2)])
def test_sync_phases_on_cuda_tensors(backend, ranks, tmp_path):
    if backend == "nccl" and not dist.is_nccl_available():
        pytest.skip("this PyTorch has no NCCL backend")
    if backend == "gloo" and not dist.is_gloo_available():
        pytest.skip("this PyTorch has no Gloo backend")
    if backend == "nccl" and ranks > torch.cuda.device_count() and os.environ.get("BNORM_NCCL_SAME_GPU") != "1":
        pytest.skip(f"NCCL needs a GPU per rank ({ranks} ranks, {torch.cuda.device_count()} GPU(s))")
    env = dict(os.environ, WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
               OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (HERE, env.get("PYTHONPATH")) if p)
    # (output to files: a rank writing much to a pipe nobody reads yet would block)
    logs = [open(tmp_path / f"rank{r}.log", "w+") for r in range(ranks)]
    procs = [subprocess.Popen([sys.executable, WORKER, backend, str(tmp_path / f"rank{r}.json")],
                              env=dict(env, RANK=str(r)), stdout=logs[r], stderr=subprocess.STDOUT)
             for r in range(ranks)]
    try:
        for p in procs:
            p.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
            p.wait()
        pytest.fail(f"{backend} with {ranks} processes timed out (a hang?)")
    finally:
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    bad = [(r, p.returncode, out) for r, (p, out) in enumerate(zip(procs, outputs)) if p.returncode != 0]
    if bad:
        pytest.fail("\n".join(f"rank {r} exited with {rc}:\n{out[-3000:]}" for r, rc, out in bad))
    failures = []
    for r in range(ranks):
        with open(tmp_path / f"rank{r}.json") as f:
            failures += [f"rank {r}: {m}" for m in json.load(f)["failures"]]
    assert not failures, "\n".join(failures)
