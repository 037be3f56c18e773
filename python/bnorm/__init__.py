"""bnorm: batch normalization outside deep-learning frameworks, and faster than them.

Functions on NumPy arrays (CPU, OpenMP + SIMD) and on CUDA arrays of any DLPack framework,
with PyTorch's semantics. See ``help(bnorm.forward_train)``, and:

Documentation: https://bnorm-dev.github.io/bnorm/
Source: https://github.com/bnorm-dev/bnorm
"""

from ._core import __version__, built_with_cuda
from ._functional import (
    backward,
    backward_elemt,
    backward_reduce,
    batch_stats,
    cpu_isa,
    cuda_available,
    forward_infer,
    forward_train,
    get_num_threads,
    merge_stats,
    normalize,
    set_num_threads,
)
from ._fold import fold
from ._layer import BatchNorm
from ._renorm import BatchRenorm

__all__ = [
    "BatchNorm",
    "BatchRenorm",
    "__version__",
    "backward",
    "backward_elemt",
    "backward_reduce",
    "batch_stats",
    "built_with_cuda",
    "cpu_isa",
    "cuda_available",
    "fold",
    "forward_infer",
    "forward_train",
    "get_num_threads",
    "merge_stats",
    "normalize",
    "set_num_threads",
]
