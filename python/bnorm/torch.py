"""bnorm inside PyTorch models: a differentiable custom operator, drop-in modules and
one-line conversion of a model.

    import bnorm.torch as bt
    y = bt.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    y = bt.batch_norm(x, ..., residual=z, activation="relu")   # fused relu(bn(x) + z)
    model = bt.convert(model)   # every torch.nn.BatchNorm1d/2d/3d now runs bnorm's kernels

``batch_norm`` has torch.nn.functional.batch_norm's signature and semantics, plus the fused
epilogue (keywords residual= and activation=). Under torch.compile (fullgraph=True),
torch.export, torch.func transforms and tensor modes it is the custom operator
``torch.ops.bnorm.batch_norm`` (torch.library): one opaque op with a shape function and a
registered backward (itself the op ``torch.ops.bnorm.batch_norm_backward``). On plain
tensors in eager mode it skips the operator's Python dispatch (which costs more than
bnorm's kernel on a ResNet's tensors) and updates the running buffers in place: on CPU
through bnorm's C++ operator ``torch.ops.bnorm_cpp.batch_norm`` (one dispatcher call, its
autograd node in C++) where bnorm was built with it against this torch (see _load_ops),
else through an autograd.Function of the same computation, with the same results.
Double backward (a gradient of the gradient) is refused with a RuntimeError.

Tensors reach bnorm without copies: CPU tensors as NumPy views of their memory, CUDA tensors
through DLPack, run by bnorm's CUDA backend on PyTorch's current stream. Contiguous and
channels_last (channels_last_3d) tensors are both read in place: a channels_last NCHW
tensor is an NHWC array in memory, normalized over its last axis. Other strides are copied
to contiguous first. Dtypes: float32, float64, float16 (statistics and parameters in
float32 for float16 input, as in PyTorch), bfloat16 on CUDA; parameters and running buffers
of another floating dtype are converted (running buffers are written back in place).

Importing this module needs PyTorch; ``import bnorm`` never imports it.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import platform
import subprocess
import tempfile
import warnings
from typing import Optional, Tuple

try:
    import torch
except ImportError as e:  # the core package stays framework-free; this module is optional
    raise ImportError(
        "bnorm.torch needs PyTorch, which is not installed (pip install torch); "
        "bnorm's NumPy API works without it"
    ) from e

from torch import Tensor

from . import _core, _functional

__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert", "build_operator_library"]

# What bnorm's CPU backend takes, as far as torch can hand it over as a NumPy view: NumPy has
# no bfloat16, so a CPU bfloat16 path needs the NumPy dtype bnorm adopts for it.
_CPU_DTYPES = tuple(getattr(torch, name) for name in _functional._CPU_DTYPES if name != "bfloat16")
_CUDA_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


# ---- the C++ operator library ------------------------------------------------------------

_HERE = os.path.dirname(os.path.abspath(__file__))


def _cache_dir() -> str:
    """Where build_operator_library puts the library: $BNORM_CACHE_DIR, else
    $XDG_CACHE_HOME/bnorm, else ~/.cache/bnorm; one folder per torch version, machine and
    source (a digest of _torch_ops.cpp and core_capi.h: a library compiled from other
    sources is never loaded with this _core)."""
    root = os.environ.get("BNORM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "bnorm")
    digest = hashlib.sha256()
    for name in ("_torch_ops.cpp", "core_capi.h"):
        try:
            with open(os.path.join(_HERE, name), "rb") as f:
                digest.update(f.read())
        except OSError:  # an install without the sources: nothing there can match
            digest.update(b"missing " + name.encode())
    return os.path.join(root, f"torch-ops-{torch.__version__}-{platform.machine()}-{digest.hexdigest()[:16]}")


def _find_library() -> Optional[str]:
    """The operator library to load: the one built with bnorm (next to this module) when it
    was built for this torch, else one build_operator_library compiled, else None. A library
    built with bnorm for another torch release (its C++ ABI differs) is left alone, with a
    warning."""
    built_with_bnorm = os.path.join(_HERE, "_torch_ops.so")
    if os.path.exists(built_with_bnorm):
        with open(os.path.join(_HERE, "_torch_ops.version")) as f:
            built_for = f.read().strip()
        if built_for == torch.__version__:
            return built_with_bnorm
        compiled = os.path.join(_cache_dir(), "_torch_ops.so")
        if os.path.exists(compiled):
            return compiled
        warnings.warn(f"bnorm.torch: bnorm's operator library was built for torch {built_for}, this is torch "
                      f"{torch.__version__}: running the slower Python path; reinstall bnorm, or call "
                      "bnorm.torch.build_operator_library()", RuntimeWarning, stacklevel=4)
        return None
    compiled = os.path.join(_cache_dir(), "_torch_ops.so")
    return compiled if os.path.exists(compiled) else None


_LOADED_LIBRARY: Optional[str] = None  # a process registers the operator library once


def _load_library(library: str):
    """Loads the operator library, hands it _core's C interface, returns its operator."""
    global _LOADED_LIBRARY
    torch.ops.load_library(library)
    _LOADED_LIBRARY = library
    get_pointer = ctypes.PYFUNCTYPE(ctypes.c_void_p, ctypes.py_object, ctypes.c_char_p)(
        ("PyCapsule_GetPointer", ctypes.pythonapi))
    table = get_pointer(_core._capi, b"bnorm._core.capi")
    if ctypes.CDLL(library).bnorm_torch_ops_init(ctypes.c_void_p(table)) != 0:
        raise RuntimeError(f"{library} does not match this bnorm's core")
    return torch.ops.bnorm_cpp.batch_norm.default


def _load_ops():
    """torch.ops.bnorm_cpp.batch_norm from bnorm's operator library (_torch_ops.cpp), or
    None: not built (a wheel, or bnorm built without torch: cmake/torch_ops.cmake; see
    build_operator_library), built for another torch, failing to load (a warning says
    why), or turned off with the environment variable BNORM_TORCH_OPS=0. Without it the
    eager path is the autograd.Function below: the same results, slower inside a model
    (docs/frameworks.md)."""
    if os.environ.get("BNORM_TORCH_OPS", "1") == "0":
        return None
    try:
        library = _find_library()
        return None if library is None else _load_library(library)
    except (OSError, RuntimeError, ImportError) as e:
        warnings.warn(f"bnorm.torch: bnorm's operator library could not be loaded ({e}): running the slower "
                      "Python path", RuntimeWarning, stacklevel=3)
        return None


def build_operator_library(verbose: bool = False) -> str:
    """Compiles bnorm's PyTorch operator library (the C++ eager path of batch_norm and the
    modules: docs/frameworks.md) for the running torch, loads it, and returns its path.

    For installs from a wheel, which cannot carry it (it is bound to one torch release);
    bnorm built from source next to torch has it already: when a library is loaded, this
    returns its path at once.
    Needs a C++17 compiler ($CXX, else c++); about 15 s. The library goes to bnorm's cache
    ($BNORM_CACHE_DIR, else ~/.cache/bnorm), one per bnorm and torch version, where later
    imports of bnorm.torch find it. Linux and macOS.
    """
    global _OPS
    if _LOADED_LIBRARY is not None:
        return _LOADED_LIBRARY
    if os.name == "nt":
        raise RuntimeError("bnorm.torch.build_operator_library: not supported on Windows")
    source = os.path.join(_HERE, "_torch_ops.cpp")
    if not os.path.exists(source):
        raise RuntimeError(f"bnorm.torch.build_operator_library: {source} is missing from this install")
    out_dir = _cache_dir()
    os.makedirs(out_dir, exist_ok=True)
    library = os.path.join(out_dir, "_torch_ops.so")
    if not os.path.exists(library):
        torch_dir = os.path.dirname(os.path.abspath(torch.__file__))
        handle, partial = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")  # renamed when complete
        os.close(handle)
        command = [os.environ.get("CXX", "c++"), "-std=c++17", "-O2", "-fPIC", "-shared", "-fvisibility=hidden",
                   f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
                   "-isystem", os.path.join(torch_dir, "include"),
                   "-isystem", os.path.join(torch_dir, "include", "torch", "csrc", "api", "include"),
                   "-I", _HERE, source, "-o", partial, "-L" + os.path.join(torch_dir, "lib"), "-lc10", "-ltorch_cpu",
                   "-Wl,-rpath," + os.path.join(torch_dir, "lib")]
        if verbose:
            print(" ".join(command))
        try:
            try:
                done = subprocess.run(command, capture_output=not verbose, text=True)
            except OSError as e:
                raise RuntimeError(f"bnorm.torch.build_operator_library: cannot run the compiler {command[0]}: {e}") from e
            if done.returncode != 0:
                raise RuntimeError(f"bnorm.torch.build_operator_library: the compiler failed ({' '.join(command)}):\n"
                                   f"{(done.stderr or '')[-3000:]}")
            os.replace(partial, library)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
    _OPS = _load_library(library)
    return library


# ---- layout: how a tensor is handed to bnorm ---------------------------------------------

def _channels_last(t: Tensor) -> bool:
    """Whether t is read as channels-last: dense with the channel dimension innermost
    (channels_last / channels_last_3d), but not plain contiguous (then it is read as NC...)."""
    return t.dim() >= 3 and not t.is_contiguous() and t.movedim(1, -1).is_contiguous()


def _new_like(t: Tensor, channels_last: bool) -> Tensor:
    """An uninitialized tensor of t's shape and dtype in the layout bnorm reads t in: the
    forward's y and the backward's dx keep the input's memory format, as PyTorch's do."""
    if channels_last:
        return torch.empty(t.movedim(1, -1).shape, dtype=t.dtype, device=t.device).movedim(-1, 1)
    return torch.empty(t.shape, dtype=t.dtype, device=t.device)


def _param_dtype(t: Tensor) -> torch.dtype:
    return torch.float32 if t.dtype in (torch.float16, torch.bfloat16) else t.dtype


class _Call:
    """One op call's layout, device and stream: `array(t)` is what bnorm's kernels get for
    tensor t of the input's shape (a NumPy view on the CPU, the tensor itself on CUDA, read
    in place when its layout allows), `vector(v)` the same for a per-channel tensor, and
    `shape` the (outer, C, inner) shape they read it as. The calls go straight to bnorm's
    compiled module (_core): the checks here and in the module (dtypes, devices, sizes,
    values) are all a tensor call needs, and _functional's NumPy-facing checks would cost
    more than the kernel on a ResNet's small layers."""

    def __init__(self, input: Tensor):
        self.channels_last = _channels_last(input)
        self.cuda = input.is_cuda
        shape = input.shape
        self.channels = shape[1]
        spatial = math.prod(shape[2:])
        # channels-last: an (N, spatial..., C) array normalized over its last axis
        self.shape = (shape[0] * spatial, shape[1], 1) if self.channels_last else (shape[0], shape[1], spatial)
        allowed = _CUDA_DTYPES if self.cuda else _CPU_DTYPES
        if input.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(
                f"bnorm.torch: input must be one of {names} on {input.device.type}, got {input.dtype}"
            )
        if not self.cuda and input.device.type != "cpu":
            raise ValueError(f"bnorm.torch: input must be on the CPU or a CUDA device, got {input.device}")
        self.param_dtype = _param_dtype(input)
        self.device = input.device
        # bnorm's CUDA kernels run on PyTorch's current stream, without synchronizing
        self.stream = torch.cuda.current_stream(input.device).cuda_stream if self.cuda else 0

    # (Each torch op below costs microseconds, and the profiler books each: the no-op ones,
    # contiguous of a contiguous tensor and to() to its own dtype, are skipped, and a tensor
    # that requires grad is read through .data, the same memory without an op.)
    def export(self, t: Tensor):
        if t.requires_grad:
            t = t.data
        return t if self.cuda else t.numpy()

    def array(self, t: Tensor):
        """t (input-shaped) as bnorm reads it; copied only if its layout is neither
        contiguous nor the input's channels-last."""
        if self.channels_last:
            t = t.movedim(1, -1)
        return self.export(t if t.is_contiguous() else t.contiguous())

    def vector(self, v: Optional[Tensor]):
        if v is None:
            return None
        if v.dtype != self.param_dtype:
            v = v.to(self.param_dtype)
        return self.export(v if v.is_contiguous() else v.contiguous())

    def new_vector(self) -> Tensor:
        """A fresh per-channel tensor of the parameter dtype (statistics, gradients)."""
        return torch.empty(self.channels, dtype=self.param_dtype, device=self.device)


# ---- the computation, shared by the operators and the eager path ---------------------------

def _forward(call: "_Call", input: Tensor, weight, bias, stats, training: bool, momentum: float, eps: float,
             residual: Optional[Tensor], relu: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """(y, mean, invstd) for y = act(BN(input) + residual). stats: (running_mean,
    running_var) as tensors bnorm may write (training: updated in place, either may be None;
    eval: read). mean, invstd: the batch statistics (training) or the constants of eval's
    backward (running_mean, 1/sqrt(running_var + eps))."""
    y = _new_like(input, call.channels_last)
    residual = None if residual is None else call.array(residual)
    if training:
        mean, invstd = call.new_vector(), call.new_vector()
        _core.forward_train(
            call.array(input), call.shape, call.vector(weight), call.vector(bias),
            *(None if b is None or not b.numel() else call.export(b) for b in stats), momentum, eps,
            call.array(y), call.export(mean), call.export(invstd), call.stream, residual, relu)
        return y, mean, invstd
    running_mean, running_var = stats
    _core.forward_infer(
        call.array(input), call.shape, call.vector(running_mean), call.vector(running_var), call.vector(weight),
        call.vector(bias), eps, call.array(y), call.stream, residual, relu)
    mean = running_mean.to(call.param_dtype, copy=True)
    return y, mean, torch.rsqrt(running_var.to(call.param_dtype) + eps)


def _backward_impl(grad_out: Tensor, input: Tensor, weight, mean: Tensor, invstd: Tensor, batch_stats: bool,
                   y: Optional[Tensor], relu: bool, residual: bool) -> Tuple[Tensor, Tensor, Tensor, Optional[Tensor]]:
    """(grad_input, grad_weight, grad_bias, grad_sum): grad_sum = grad_out * (y > 0), the
    gradient at BN(input) + residual, with relu and a residual (else None: without a
    residual nobody needs it, and writing it costs a tensor's worth of memory traffic);
    the parameter gradients in the parameter dtype of input, whether weight is given or not."""
    call = _Call(input)
    grad_input = _new_like(input, call.channels_last)
    grad_weight, grad_bias = call.new_vector(), call.new_vector()
    grad_sum = _new_like(input, call.channels_last) if relu and residual else None
    _core.backward(
        call.array(grad_out if grad_out.dtype == input.dtype else grad_out.to(input.dtype)), call.array(input),
        call.shape, call.vector(mean), call.vector(invstd), call.vector(weight), batch_stats, call.array(grad_input),
        call.export(grad_weight), call.export(grad_bias), call.stream, call.array(y) if relu else None, relu,
        None if grad_sum is None else call.array(grad_sum))
    return grad_input, grad_weight, grad_bias, grad_sum


# ---- the custom operators: what torch.compile, torch.export and torch.func see ---------

# torch.library refuses an autograd formula for an operator that mutates its arguments, so
# the differentiable op is functional: it returns the updated running statistics (computed
# by bnorm's kernel into fresh per-channel copies) and batch_norm() copies them into the
# buffers, which is what torch.compile's functionalization makes of an in-place op anyway.
@torch.library.custom_op("bnorm::batch_norm", mutates_args=())
def _batch_norm_op(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], training: bool, momentum: float, eps: float,
    residual: Optional[Tensor] = None, relu: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, new_running_mean, new_running_var), y = act(BN(input) + residual).
    training: mean and invstd are the batch statistics, and the new running statistics are
    the updated buffers (empty when none are given); eval: mean and invstd are running_mean
    and 1/sqrt(running_var + eps), the constants of backward, and the new running
    statistics are empty."""
    call = _Call(input)
    none = input.new_empty((0,), dtype=call.param_dtype)
    if training:
        stats = [torch.empty_like(none) if b is None
                 else b.to(call.param_dtype, memory_format=torch.contiguous_format, copy=True)
                 for b in (running_mean, running_var)]
        y, mean, invstd = _forward(call, input, weight, bias, stats, True, momentum, eps, residual, relu)
        return y, mean, invstd, stats[0], stats[1]
    y, mean, invstd = _forward(call, input, weight, bias, (running_mean, running_var), False, momentum, eps,
                               residual, relu)
    return y, mean, invstd, none, torch.empty_like(none)


@_batch_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps, residual=None, relu=False):
    vector = input.new_empty((input.shape[1],), dtype=_param_dtype(input))
    updated = [input.new_empty((input.shape[1] if training and b is not None else 0,), dtype=_param_dtype(input))
               for b in (running_mean, running_var)]
    return _new_like(input, _channels_last(input)), vector, torch.empty_like(vector), updated[0], updated[1]


@torch.library.custom_op("bnorm::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(
    grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor, batch_stats: bool,
    y: Optional[Tensor] = None, relu: bool = False, residual: bool = False,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias, grad_sum); grad_sum (relu with a residual:
    grad_out * (y > 0)) is empty otherwise."""
    grad_input, grad_weight, grad_bias, grad_sum = _backward_impl(
        grad_out, input, weight, mean, invstd, batch_stats, y, relu, residual)
    return grad_input, grad_weight, grad_bias, input.new_empty((0,)) if grad_sum is None else grad_sum


@_batch_norm_backward_op.register_fake
def _(grad_out, input, weight, mean, invstd, batch_stats, y=None, relu=False, residual=False):
    vector = input.new_empty((input.shape[1],), dtype=_param_dtype(input))
    grad_sum = _new_like(input, _channels_last(input)) if relu and residual else input.new_empty((0,))
    return _new_like(input, _channels_last(input)), vector, torch.empty_like(vector), grad_sum


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, training, _, _, residual, relu = inputs
    y, mean, invstd, new_running_mean, new_running_var = output
    ctx.save_for_backward(input, weight, mean, invstd, y if relu else None)
    ctx.batch_stats, ctx.relu, ctx.residual = training, relu, residual is not None
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, new_running_mean, new_running_var)
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) gradients


def _parameter_grads(ctx, weight, grad_weight, grad_bias):
    return (None if weight is None else grad_weight.to(weight.dtype),
            None if ctx.bias_dtype is None else grad_bias.to(ctx.bias_dtype))


def _backward(ctx, grad_y, *grad_statistics):
    if grad_y is None:  # y did not reach the loss
        return (None,) * 10
    input, weight, mean, invstd, y = ctx.saved_tensors
    grad_input, grad_weight, grad_bias, grad_sum = torch.ops.bnorm.batch_norm_backward(
        grad_y, input, weight, mean, invstd, ctx.batch_stats, y, ctx.relu, ctx.residual)
    grad_residual = (grad_sum if ctx.relu else grad_y) if ctx.residual else None
    return (grad_input, *_parameter_grads(ctx, weight, grad_weight, grad_bias), None, None, None, None, None,
            grad_residual, None)


_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "bnorm.torch.batch_norm does not support double backward (a gradient of its gradient, "
        "e.g. a gradient penalty or Hessian-vector product): use torch.nn.functional.batch_norm there"
    )


_batch_norm_backward_op.register_autograd(_refuse_double_backward, setup_context=lambda ctx, inputs, output: None)

# After the operators above: the C++ backward calls bnorm::batch_norm_backward for create_graph.
_OPS = _load_ops()


# ---- the eager path: plain tensors, no tracing --------------------------------------------

def _eager(input: Tensor, residual: Optional[Tensor]) -> bool:
    """Whether this call may skip the custom operator (whose Python dispatch and autograd
    wrapper cost more than the kernel on the tensors of a ResNet): plain tensors, outside
    torch.compile / torch.export tracing, torch.func transforms and tensor modes. The
    result is the operator's, and so is the backward (for double backward too)."""
    return (type(input) is Tensor and (residual is None or type(residual) is Tensor)
            and not torch.compiler.is_compiling() and not torch._C._are_functorch_transforms_active()
            and torch._C._len_torch_dispatch_stack() == 0 and not torch._C._is_torch_function_mode_enabled())


def _refuse_unsupported_transforms(*tensors) -> None:
    """RuntimeError where the custom operator would give a wrong or an unclear result:
    forward-mode AD (torch.func.jvp / jacfwd, dual tensors of torch.autograd.forward_ad
    under a tensor mode), for which torch 2.13 silently returns zero or no tangents for an
    operator without a forward rule, and torch.func.grad / vjp / jacrev, which torch 2.13
    refuses for operators with a registered autograd formula with an internal message. The
    eager path refuses dual tensors itself; torch.func.vmap works."""
    if torch._C._are_functorch_transforms_active():
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        keys = {i.key() for i in retrieve_all_functorch_interpreters()}
        if TransformType.Jvp in keys or TransformType.Grad in keys:
            raise RuntimeError(
                "bnorm.torch.batch_norm does not support torch.func.grad, vjp, jacrev, jvp or jacfwd (its custom "
                "operator has no forward-mode rule, and torch 2.13 cannot take its backward formula into "
                "these transforms): use torch.nn.functional.batch_norm there; torch.func.vmap is supported")
    if torch.autograd.forward_ad._current_level >= 0:  # inside a dual level: any dual tensor?
        import torch.autograd.forward_ad as fwAD

        if any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors):
            raise RuntimeError(
                "bnorm.torch.batch_norm does not support forward-mode AD (dual tensors): use "
                "torch.nn.functional.batch_norm there")


class _EagerBatchNorm(torch.autograd.Function):
    """bnorm's batch norm as a plain autograd.Function: running buffers updated in place
    (no copies when they are contiguous in the parameter dtype), no operator dispatch."""

    @staticmethod
    def forward(ctx, input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu):
        call = _Call(input)
        stats = [running_mean, running_var]
        if training:  # buffers bnorm cannot write in place: a converted copy, written back below
            stats = [b if b is None or (b.dtype == call.param_dtype and b.is_contiguous())
                     else b.to(call.param_dtype, memory_format=torch.contiguous_format, copy=True)
                     for b in stats]
        y, mean, invstd = _forward(call, input, weight, bias, stats, training, momentum, eps, residual, relu)
        if training:
            for buffer, new in ((running_mean, stats[0]), (running_var, stats[1])):
                if buffer is None:
                    continue
                if new is buffer:  # written through a NumPy view: autograd's version counter is told
                    torch.autograd.graph.increment_version(buffer)
                else:
                    buffer.copy_(new)
        ctx.save_for_backward(input, weight, mean, invstd, y if relu else None)
        ctx.batch_stats, ctx.relu, ctx.residual = training, relu, residual is not None
        ctx.bias_dtype = None if bias is None else bias.dtype
        return y

    @staticmethod
    def backward(ctx, grad_y):
        input, weight, mean, invstd, y = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: the operator's backward refuses double backward
            grad_input, grad_weight, grad_bias, grad_sum = torch.ops.bnorm.batch_norm_backward(
                grad_y, input, weight, mean, invstd, ctx.batch_stats, y, ctx.relu, ctx.residual)
        else:
            grad_input, grad_weight, grad_bias, grad_sum = _backward_impl(
                grad_y, input, weight, mean, invstd, ctx.batch_stats, y, ctx.relu, ctx.residual)
        grad_residual = (grad_sum if ctx.relu else grad_y) if ctx.residual else None
        return (grad_input, *_parameter_grads(ctx, weight, grad_weight, grad_bias), None, None, grad_residual,
                None, None, None, None)


# ---- the public function ----------------------------------------------------------------

def batch_norm(
    input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
    *, residual: Optional[Tensor] = None, activation: Optional[str] = None,
) -> Tensor:
    """torch.nn.functional.batch_norm computed by bnorm, differentiable; with residual and
    activation, the fused activation(batch_norm(input) + residual).

    input: (N, C, ...) of float32, float64 or float16 (bfloat16 on CUDA), contiguous or
    channels_last. training=True normalizes with the batch statistics and updates
    running_mean / running_var in place when given (running_var with the unbiased
    variance); training=False normalizes with running_mean / running_var (required then).
    residual: None or a tensor of input's shape and dtype added after the normalization
    (any layout; the statistics are input's alone). activation: None or "relu", applied
    last. One pass over the data forward and one backward, where the separate ops take
    three. Gradients flow to input, weight, bias and residual; double backward raises
    RuntimeError.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"bnorm.torch: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"bnorm.torch: input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    if (running_mean is None) != (running_var is None):  # (as F.batch_norm)
        raise ValueError("bnorm.torch: running_mean and running_var must either both be None or neither be None")
    if not training and running_mean is None:  # (and so running_var: both or neither, above)
        raise ValueError("bnorm.torch: running_mean and running_var are required when training=False")
    if activation not in (None, "relu"):
        raise ValueError(f'bnorm.torch: activation must be None or "relu", got {activation!r}')
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"bnorm.torch: residual must be a torch.Tensor, got {type(residual).__name__}")
        if residual.shape != input.shape or residual.dtype != input.dtype or residual.device != input.device:
            raise ValueError(
                f"bnorm.torch: residual must have input's shape {tuple(input.shape)}, dtype {input.dtype} and "
                f"device {input.device}, got {tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    training, momentum, eps, relu = bool(training), float(momentum), float(eps), activation == "relu"
    if training and input.numel() == input.shape[1] > 0:  # (here: the kernels' message names their 3-D view)
        raise ValueError(
            f"expected more than 1 value per channel when training, got input of shape {tuple(input.shape)}")
    if _eager(input, residual):
        if _OPS is not None and input.device.type == "cpu" and input.dtype in _CPU_DTYPES:
            return _OPS(input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu)
        return _EagerBatchNorm.apply(
            input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu)
    if not torch.compiler.is_compiling():
        _refuse_unsupported_transforms(input, weight, bias, residual)
    y, _, _, new_running_mean, new_running_var = torch.ops.bnorm.batch_norm(
        input, weight, bias, running_mean, running_var, training, momentum, eps, residual, relu)
    if training:
        with torch.no_grad():  # buffers, as F.batch_norm updates them: outside autograd
            for buffer, new in ((running_mean, new_running_mean), (running_var, new_running_var)):
                if buffer is not None:
                    buffer.copy_(new)
    return y


# ---- modules ---------------------------------------------------------------------------

class _BnormForward:
    """torch.nn.modules.batchnorm._BatchNorm.forward with bnorm's op in place of
    F.batch_norm: the same train/eval, track_running_stats, momentum=None (cumulative
    average) and num_batches_tracked behaviour; plus the fused epilogue:
    activation(bn(input) + residual) with the module's activation (None or "relu") and
    forward's optional residual."""

    activation: Optional[str] = None  # (class default: a converted stock module has none)

    def __init__(self, *args, activation: Optional[str] = None, **kwargs):
        if activation not in (None, "relu"):
            raise ValueError(f'bnorm.torch: activation must be None or "relu", got {activation!r}')
        super().__init__(*args, **kwargs)
        self.activation = activation

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"

    def forward(self, input: Tensor, residual: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        # batch statistics in training, and in eval when no running statistics are kept
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        # running buffers are passed when they are updated (training, tracked) or read (eval)
        keep = not self.training or self.track_running_stats
        return batch_norm(
            input, self.running_mean if keep else None, self.running_var if keep else None,
            self.weight, self.bias, use_batch, momentum, self.eps, residual=residual, activation=self.activation)


class BatchNorm1d(_BnormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by bnorm: same constructor (plus activation=None or
    "relu"), parameters, buffers and state_dict keys. Input (N, C) or (N, C, L);
    forward(input, residual=None)."""


class BatchNorm2d(_BnormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by bnorm: same constructor (plus activation=None or
    "relu"), parameters, buffers and state_dict keys. Input (N, C, H, W), contiguous or
    channels_last; forward(input, residual=None) returns activation(bn(input) + residual),
    fused: a ResNet BasicBlock's last `relu(bn2(conv2(out)) + identity)` is
    `bn2(conv2(out), identity)` with activation="relu"."""


class BatchNorm3d(_BnormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by bnorm: same constructor (plus activation=None or
    "relu"), parameters, buffers and state_dict keys. Input (N, C, D, H, W), contiguous or
    channels_last_3d; forward(input, residual=None)."""


_CONVERSIONS = {torch.nn.BatchNorm1d: BatchNorm1d, torch.nn.BatchNorm2d: BatchNorm2d,
                torch.nn.BatchNorm3d: BatchNorm3d}


def convert(model: torch.nn.Module) -> torch.nn.Module:
    """Makes every torch.nn.BatchNorm1d/2d/3d in `model` (model itself included) run bnorm,
    in place, and returns model.

    Each module keeps its identity, parameters, buffers, hooks and train/eval mode: only
    its class changes to bnorm.torch's subclass, which adds no state (optimizers holding
    its parameters keep working, state_dicts keep their keys). Modules of exactly those
    three classes are converted; subclasses (which may override forward), SyncBatchNorm
    and other norms are left untouched.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"bnorm.torch.convert: model must be a torch.nn.Module, got {type(model).__name__}")
    for module in model.modules():
        replacement = _CONVERSIONS.get(type(module))
        if replacement is not None:
            module.__class__ = replacement
    return model
