"""bnorm inside PyTorch models: a differentiable custom operator, drop-in modules and
one-line conversion of a model.

    import bnorm.torch as bt
    y = bt.batch_norm(x, running_mean, running_var, weight, bias, training=True)
    model = bt.convert(model)   # every torch.nn.BatchNorm1d/2d/3d now runs bnorm's kernels

``batch_norm`` has torch.nn.functional.batch_norm's signature and semantics. It is the
custom operator ``torch.ops.bnorm.batch_norm`` (torch.library), so autograd,
torch.compile(fullgraph=True) and torch.export see one opaque op with a shape function and
a registered backward (itself the op ``torch.ops.bnorm.batch_norm_backward``). Double
backward (a gradient of the gradient) is refused with a RuntimeError.

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

from typing import Optional, Tuple

try:
    import torch
except ImportError as e:  # the core package stays framework-free; this module is optional
    raise ImportError(
        "bnorm.torch needs PyTorch, which is not installed (pip install torch); "
        "bnorm's NumPy API works without it"
    ) from e

from torch import Tensor

from . import _functional

__all__ = ["batch_norm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "convert"]

# What bnorm's CPU backend takes, as far as torch can hand it over as a NumPy view: NumPy has
# no bfloat16, so a CPU bfloat16 path needs the NumPy dtype bnorm adopts for it.
_CPU_DTYPES = tuple(getattr(torch, name) for name in _functional._CPU_DTYPES if name != "bfloat16")
_CUDA_DTYPES = (torch.float16, torch.float32, torch.float64, torch.bfloat16)


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
    """One op call's layout, device and stream: `array(t)` is what bnorm gets for tensor t
    of the input's shape (a NumPy view on the CPU, the tensor itself on CUDA, read in place
    when its layout allows), `vector(v)` the same for a per-channel tensor."""

    def __init__(self, input: Tensor):
        self.channels_last = _channels_last(input)
        self.axis = -1 if self.channels_last else 1
        self.cuda = input.is_cuda
        allowed = _CUDA_DTYPES if self.cuda else _CPU_DTYPES
        if input.dtype not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise TypeError(
                f"bnorm.torch: input must be one of {names} on {input.device.type}, got {input.dtype}"
            )
        if not self.cuda and input.device.type != "cpu":
            raise ValueError(f"bnorm.torch: input must be on the CPU or a CUDA device, got {input.device}")
        self.param_dtype = _param_dtype(input)
        # bnorm's CUDA kernels run on PyTorch's current stream, without synchronizing
        self.stream = torch.cuda.current_stream(input.device).cuda_stream if self.cuda else None

    def export(self, t: Tensor):
        t = t.detach()
        return t if self.cuda else t.numpy()

    def array(self, t: Tensor):
        """t (input-shaped) as bnorm reads it; copied only if its layout is neither
        contiguous nor the input's channels-last."""
        if self.channels_last:
            t = t.movedim(1, -1)
        return self.export(t.contiguous())

    def vector(self, v: Optional[Tensor]):
        if v is None:
            return None
        return self.export(v.to(self.param_dtype).contiguous())


# ---- the custom operators -------------------------------------------------------------

# torch.library refuses an autograd formula for an operator that mutates its arguments, so
# the differentiable op is functional: it returns the updated running statistics (computed
# by bnorm's kernel into fresh per-channel copies) and batch_norm() copies them into the
# buffers, which is what torch.compile's functionalization makes of an in-place op anyway.
@torch.library.custom_op("bnorm::batch_norm", mutates_args=())
def _batch_norm_op(
    input: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], running_mean: Optional[Tensor],
    running_var: Optional[Tensor], training: bool, momentum: float, eps: float,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """(y, mean, invstd, new_running_mean, new_running_var). training: mean and invstd are
    the batch statistics, and the new running statistics are the updated buffers (empty
    when none are given); eval: mean and invstd are running_mean and
    1/sqrt(running_var + eps), the constants of backward, and the new running statistics
    are empty."""
    call = _Call(input)
    y = _new_like(input, call.channels_last)
    if training:
        updated = [input.new_empty((0,), dtype=call.param_dtype) if b is None
                   else b.to(call.param_dtype, memory_format=torch.contiguous_format, copy=True)
                   for b in (running_mean, running_var)]
        _, mean, invstd = _functional.forward_train(
            call.array(input), call.vector(weight), call.vector(bias),
            *(call.export(b) if b is not None and b.numel() else None for b in updated),
            axis=call.axis, momentum=momentum, eps=eps, out=call.array(y), stream=call.stream)
        return y, torch.as_tensor(mean), torch.as_tensor(invstd), updated[0], updated[1]
    _functional.forward_infer(
        call.array(input), call.vector(running_mean), call.vector(running_var), call.vector(weight),
        call.vector(bias), axis=call.axis, eps=eps, out=call.array(y), stream=call.stream)
    mean = running_mean.to(call.param_dtype, copy=True)
    invstd = torch.rsqrt(running_var.to(call.param_dtype) + eps)
    none = input.new_empty((0,), dtype=call.param_dtype)
    return y, mean, invstd, none, torch.empty_like(none)


@_batch_norm_op.register_fake
def _(input, weight, bias, running_mean, running_var, training, momentum, eps):
    vector = input.new_empty((input.shape[1],), dtype=_param_dtype(input))
    updated = [input.new_empty((input.shape[1] if training and b is not None else 0,), dtype=_param_dtype(input))
               for b in (running_mean, running_var)]
    return _new_like(input, _channels_last(input)), vector, torch.empty_like(vector), updated[0], updated[1]


@torch.library.custom_op("bnorm::batch_norm_backward", mutates_args=())
def _batch_norm_backward_op(
    grad_out: Tensor, input: Tensor, weight: Optional[Tensor], mean: Tensor, invstd: Tensor, batch_stats: bool,
) -> Tuple[Tensor, Tensor, Tensor]:
    """(grad_input, grad_weight, grad_bias); the parameter gradients in the parameter dtype
    of input (float32 for 16-bit input), whether weight is given or not."""
    call = _Call(input)
    grad_input = _new_like(input, call.channels_last)
    _, grad_weight, grad_bias = _functional.backward(
        call.array(grad_out.to(input.dtype)), call.array(input), call.vector(mean), call.vector(invstd),
        call.vector(weight), axis=call.axis, batch_stats=batch_stats, out=call.array(grad_input),
        stream=call.stream)
    return grad_input, torch.as_tensor(grad_weight), torch.as_tensor(grad_bias)


@_batch_norm_backward_op.register_fake
def _(grad_out, input, weight, mean, invstd, batch_stats):
    vector = input.new_empty((input.shape[1],), dtype=_param_dtype(input))
    return _new_like(input, _channels_last(input)), vector, torch.empty_like(vector)


def _setup_context(ctx, inputs, output):
    input, weight, bias, _, _, training, _, _ = inputs
    _, mean, invstd, new_running_mean, new_running_var = output
    ctx.save_for_backward(input, weight, mean, invstd)
    ctx.batch_stats = training
    ctx.bias_dtype = None if bias is None else bias.dtype
    ctx.mark_non_differentiable(mean, invstd, new_running_mean, new_running_var)
    ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (unused) gradients


def _backward(ctx, grad_y, *grad_statistics):
    if grad_y is None:  # y did not reach the loss
        return (None,) * 8
    input, weight, mean, invstd = ctx.saved_tensors
    grad_input, grad_weight, grad_bias = torch.ops.bnorm.batch_norm_backward(
        grad_y, input, weight, mean, invstd, ctx.batch_stats)
    grad_weight = None if weight is None else grad_weight.to(weight.dtype)
    grad_bias = None if ctx.bias_dtype is None else grad_bias.to(ctx.bias_dtype)
    return grad_input, grad_weight, grad_bias, None, None, None, None, None


_batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def _refuse_double_backward(ctx, *grads):
    raise RuntimeError(
        "bnorm.torch.batch_norm does not support double backward (a gradient of its gradient, "
        "e.g. a gradient penalty or Hessian-vector product): use torch.nn.functional.batch_norm there"
    )


_batch_norm_backward_op.register_autograd(_refuse_double_backward, setup_context=lambda ctx, inputs, output: None)


# ---- the public function ----------------------------------------------------------------

def batch_norm(
    input: Tensor, running_mean: Optional[Tensor], running_var: Optional[Tensor], weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None, training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
) -> Tensor:
    """torch.nn.functional.batch_norm computed by bnorm, differentiable.

    input: (N, C, ...) of float32, float64 or float16 (bfloat16 on CUDA), contiguous or
    channels_last. training=True normalizes with the batch statistics and updates
    running_mean / running_var in place when given (running_var with the unbiased
    variance); training=False normalizes with running_mean / running_var (required then).
    Gradients flow to input, weight and bias; double backward raises RuntimeError.
    """
    if not isinstance(input, Tensor):
        raise TypeError(f"bnorm.torch: input must be a torch.Tensor, got {type(input).__name__}")
    if input.dim() < 2:
        raise ValueError(f"bnorm.torch: input must have at least 2 dimensions (N, C, ...), got shape {tuple(input.shape)}")
    if not training and (running_mean is None or running_var is None):
        raise ValueError("bnorm.torch: running_mean and running_var are required when training=False")
    y, _, _, new_running_mean, new_running_var = torch.ops.bnorm.batch_norm(
        input, weight, bias, running_mean, running_var, bool(training), float(momentum), float(eps))
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
    average) and num_batches_tracked behaviour."""

    def forward(self, input: Tensor) -> Tensor:
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
            self.weight, self.bias, use_batch, momentum, self.eps)


class BatchNorm1d(_BnormForward, torch.nn.BatchNorm1d):
    """torch.nn.BatchNorm1d computed by bnorm: same constructor, parameters, buffers and
    state_dict keys. Input (N, C) or (N, C, L)."""


class BatchNorm2d(_BnormForward, torch.nn.BatchNorm2d):
    """torch.nn.BatchNorm2d computed by bnorm: same constructor, parameters, buffers and
    state_dict keys. Input (N, C, H, W), contiguous or channels_last."""


class BatchNorm3d(_BnormForward, torch.nn.BatchNorm3d):
    """torch.nn.BatchNorm3d computed by bnorm: same constructor, parameters, buffers and
    state_dict keys. Input (N, C, D, H, W), contiguous or channels_last_3d."""


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
