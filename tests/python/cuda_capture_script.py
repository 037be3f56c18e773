"""bnorm inside PyTorch CUDA graph captures (run by test_cuda.py, and by scripts/gpu_check.sh
under cuda-gdb): `python cuda_capture_script.py replay|legacy`.

replay: forward_train captured on PyTorch's capture stream (bnorm's default stream for
PyTorch tensors), replayed after x changed; prints the error against the CPU backend.
legacy: forward_train on the legacy default stream (stream=0) while PyTorch captures on
its own stream; prints the exception (or that there was none). Both end with "done".
"""

import sys

import numpy as np
import torch

import bnorm

x = torch.randn(32, 16, 9, 9, device="cuda")
y = torch.empty_like(x)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):
    bnorm.forward_train(x, out=y)  # first call outside the capture (workspace pool)
torch.cuda.synchronize()
if sys.argv[1] == "replay":
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        bnorm.forward_train(x, out=y)
    x.copy_(torch.randn_like(x) * 3 + 1)
    graph.replay()
    torch.cuda.synchronize()
    want, _, _ = bnorm.forward_train(x.cpu().numpy())
    print("replay error", float(np.abs(y.cpu().numpy() - want).max()))
else:
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            bnorm.forward_train(x, out=y, stream=0)
        print("legacy stream in a capture: no error")
    except Exception as e:  # noqa: BLE001 - whichever error CUDA or PyTorch raises
        print("legacy stream in a capture:", type(e).__name__, str(e).splitlines()[0][:160])
print("done", flush=True)
