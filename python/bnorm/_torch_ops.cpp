// bnorm's PyTorch operator library (optional; cmake/torch_ops.cmake builds it where
// PyTorch's headers are found): the eager path of bnorm.torch on CPU tensors, as one
// dispatcher op with its autograd formula in C++.
//
// Why C++: inside a training step, every Python-level tensor operation of an adapter runs
// with caches a convolution has just flushed: ~20-50 us each instead of ~1-3 us (measured:
// `.numpy()` 0.8 us hot, 32 us after a conv), and the Python autograd.Function path makes
// about twenty of them per layer. Here a layer costs one Python call, like
// torch.nn.functional.batch_norm. The kernels are bnorm's own, reached through _core's C
// interface (core_capi.h), which bnorm.torch hands over at load (bnorm_torch_ops_init), so
// the one copy of bnorm in _core (thread count, instruction set) serves both.
//
// torch.ops.bnorm_cpp.batch_norm(input, weight, bias, running_mean, running_var, residual,
//                                training, momentum, eps, relu) -> y
// is bnorm.torch.batch_norm's eager computation: y = act(BN(input) + residual), running
// buffers updated in place in training; backward through bnorm's fused backward, and
// through the Python operator bnorm::batch_norm_backward when a graph of the gradient is
// asked for (create_graph=True), whose own backward refuses double backward as bnorm.torch
// documents. Arguments are checked by bnorm.torch.batch_norm before; here again whatever
// would let a kernel touch memory it was not given.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <array>
#include <numeric>
#include <optional>
#include <string>

#include "core_capi.h"

namespace {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

const bnorm_core_capi* capi = nullptr;

// Whether t's memory is dense in the order of `dims`, innermost first (size-1 dimensions
// may have any stride, as in torch's own is_contiguous).
template <size_t N>
bool dense_in_order(const Tensor& t, const std::array<int64_t, N>& dims, int64_t count) {
    int64_t expected = 1;
    for (int64_t i = 0; i < count; ++i) {
        const int64_t d = dims[size_t(i)], size = t.size(d);
        if (size != 1 && t.stride(d) != expected) return false;
        expected *= size;
    }
    return true;
}

// How bnorm reads an (N, C, ...) tensor: NC... as (N, C, spatial), channels-last
// (channels_last, channels_last_3d, (N, L, C) memory of an (N, C, L) tensor) as
// (N * spatial, C, 1). Anything else is copied to contiguous first.
struct Layout {
    bool channels_last = false;
    int64_t outer = 0, channels = 0, inner = 0;

    explicit Layout(const Tensor& input) {
        const int64_t dim = input.dim();
        channels = input.size(1);
        const int64_t spatial = input.numel() == 0 ? 0 : input.numel() / (input.size(0) * channels);
        if (dim >= 3 && dim <= 8 && !input.is_contiguous()) {
            std::array<int64_t, 8> order{};  // innermost first: C, then the spatial dims, then N
            order[0] = 1;
            for (int64_t d = dim - 1, i = 1; d >= 2; --d, ++i) order[size_t(i)] = d;
            order[size_t(dim - 1)] = 0;
            channels_last = dense_in_order(input, order, dim);
        }
        if (channels_last) {
            outer = input.size(0) * spatial;
            inner = 1;
        } else {
            outer = input.size(0);
            inner = spatial;
        }
    }

    // t (input-shaped) in this layout: itself when it already is, else a copy.
    Tensor array(const Tensor& t) const {
        if (channels_last) {
            const Tensor moved = t.movedim(1, -1);
            return moved.is_contiguous() ? t : moved.contiguous().movedim(-1, 1);
        }
        return t.contiguous();
    }
};

int dtype_code(at::ScalarType t) {
    switch (t) {
        case at::kFloat: return BNORM_CAPI_FLOAT32;
        case at::kDouble: return BNORM_CAPI_FLOAT64;
        case at::kHalf: return BNORM_CAPI_FLOAT16;
        default:
            TORCH_CHECK_TYPE(false, "bnorm.torch: CPU input must be float32, float64 or float16, got ", t);
    }
    return -1;
}

at::ScalarType param_dtype(at::ScalarType t) { return t == at::kHalf || t == at::kBFloat16 ? at::kFloat : t; }

void check(int status, const char* message) {
    if (status == BNORM_CAPI_OK) return;
    TORCH_CHECK_VALUE(status != BNORM_CAPI_VALUE_ERROR, message);
    TORCH_CHECK_TYPE(status != BNORM_CAPI_TYPE_ERROR, message);
    TORCH_CHECK(false, message);
}

void run(bnorm_capi_fn fn, const bnorm_capi_params& p) {
    TORCH_CHECK(capi != nullptr, "bnorm.torch: the operator library was loaded without bnorm's core (bnorm_torch_ops_init)");
    char message[512];
    check(fn(&p, message, sizeof message), message);
}

// A per-channel vector as the kernels read it: C contiguous values of the parameter dtype,
// on the CPU (converted when it is not; an undefined tensor when absent).
Tensor vector(const OptTensor& v, at::ScalarType dtype, int64_t channels, const char* name) {
    if (!v || !v->defined()) return Tensor();
    TORCH_CHECK_VALUE(v->device().is_cpu(), "bnorm.torch: ", name, " must be on the CPU like input, got ", v->device());
    TORCH_CHECK_VALUE(v->numel() == channels, "bnorm.torch: ", name, " has ", v->numel(),
                      " elements, expected the number of channels ", channels);
    const Tensor t = v->scalar_type() == dtype ? *v : v->to(dtype);
    return t.is_contiguous() ? t : t.contiguous();
}

const void* data(const Tensor& t) { return t.defined() ? t.const_data_ptr() : nullptr; }
void* mutable_data(const Tensor& t) { return t.defined() ? t.mutable_data_ptr() : nullptr; }

// The Python operator bnorm::batch_norm_backward (bnorm.torch), for a backward that must
// itself be differentiable: its registered backward refuses double backward clearly.
variable_list backward_op(const Tensor& grad_y, const Tensor& input, const Tensor& weight, const Tensor& mean,
                          const Tensor& invstd, bool batch_stats, const Tensor& y, bool relu, bool residual) {
    static const c10::OperatorHandle op =
        c10::Dispatcher::singleton().findSchemaOrThrow("bnorm::batch_norm_backward", "");
    std::vector<c10::IValue> stack{grad_y, input, weight.defined() ? c10::IValue(weight) : c10::IValue(),
                                   mean, invstd, batch_stats, y.defined() ? c10::IValue(y) : c10::IValue(),
                                   relu, residual};
    op.callBoxed(&stack);
    variable_list out;
    for (const auto& v : stack) out.push_back(v.toTensor());
    return out;  // grad_input, grad_weight, grad_bias, grad_sum (empty without relu and residual)
}

}  // namespace

// Named (not anonymous): the profiler and autograd errors show the backward node as
// torch::autograd::CppNode<bnorm_torch::BatchNormFunction>.
namespace bnorm_torch {

struct BatchNormFunction : public torch::autograd::Function<BatchNormFunction> {
    static Tensor forward(AutogradContext* ctx, const Tensor& input_, const OptTensor& weight_, const OptTensor& bias_,
                          const OptTensor& running_mean, const OptTensor& running_var, const OptTensor& residual_,
                          bool training, double momentum, double eps, bool relu) {
        TORCH_CHECK_VALUE(input_.device().is_cpu(), "bnorm.torch: bnorm_cpp.batch_norm takes CPU tensors");
        TORCH_CHECK_VALUE(input_.dim() >= 2, "bnorm.torch: input must have at least 2 dimensions (N, C, ...)");
        const Layout layout(input_);
        const Tensor input = layout.array(input_);
        const int64_t C = layout.channels;
        const at::ScalarType pdt = param_dtype(input.scalar_type());
        bnorm_capi_params p{};
        p.dtype = dtype_code(input.scalar_type());
        p.outer = layout.outer, p.channels = C, p.inner = layout.inner;
        const Tensor weight = vector(weight_, pdt, C, "weight"), bias = vector(bias_, pdt, C, "bias");
        Tensor residual;
        if (residual_ && residual_->defined()) {
            TORCH_CHECK_VALUE(residual_->sizes() == input.sizes() && residual_->scalar_type() == input.scalar_type() &&
                                  residual_->device().is_cpu(),
                              "bnorm.torch: residual must have input's shape, dtype and device");
            residual = layout.array(*residual_);
        }
        const Tensor y = at::empty_like(input);  // input is dense: y gets its strides
        p.x = input.const_data_ptr(), p.weight = data(weight), p.bias = data(bias);
        p.residual = data(residual), p.relu = relu, p.eps = eps, p.y = y.mutable_data_ptr();
        Tensor mean, invstd;
        if (training) {
            // buffers bnorm cannot write in place: a converted copy, written back below
            std::array<Tensor, 2> buffers, written;
            const std::array<const OptTensor*, 2> given{&running_mean, &running_var};
            for (size_t i = 0; i < 2; ++i) {
                const OptTensor& b = *given[i];
                if (!b || !b->defined() || b->numel() == 0) continue;
                TORCH_CHECK_VALUE(b->device().is_cpu() && b->numel() == C,
                                  "bnorm.torch: running statistics must be CPU tensors of C elements");
                buffers[i] = *b;
                written[i] = b->scalar_type() == pdt && b->is_contiguous()
                                 ? *b : b->to(pdt, /*non_blocking=*/false, /*copy=*/true, at::MemoryFormat::Contiguous);
            }
            mean = at::empty({C}, input.options().dtype(pdt));
            invstd = at::empty({C}, input.options().dtype(pdt));
            p.running_mean = mutable_data(written[0]), p.running_var = mutable_data(written[1]);
            p.momentum = momentum, p.mean = mean.mutable_data_ptr(), p.invstd = invstd.mutable_data_ptr();
            run(capi->forward_train, p);
            for (size_t i = 0; i < 2; ++i) {
                if (!buffers[i].defined()) continue;
                if (written[i].is_same(buffers[i])) buffers[i].unsafeGetTensorImpl()->bump_version();
                else buffers[i].copy_(written[i]);
            }
        } else {
            TORCH_CHECK_VALUE(running_mean && running_var && running_mean->defined() && running_var->defined(),
                              "bnorm.torch: running_mean and running_var are required when training=False");
            const Tensor rm = vector(running_mean, pdt, C, "running_mean");
            const Tensor rv = vector(running_var, pdt, C, "running_var");
            p.running_mean = const_cast<void*>(rm.const_data_ptr());  // read only by forward_infer
            p.running_var = const_cast<void*>(rv.const_data_ptr());
            run(capi->forward_infer, p);
            mean = rm.clone();
            invstd = at::rsqrt(rv + eps);
        }
        ctx->save_for_backward({input, weight_ ? *weight_ : Tensor(), mean, invstd, relu ? y : Tensor()});
        ctx->saved_data["batch_stats"] = training;
        ctx->saved_data["relu"] = relu;
        ctx->saved_data["residual"] = residual.defined();
        ctx->saved_data["bias_dtype"] = bias_ && bias_->defined() ? c10::IValue(bias_->scalar_type()) : c10::IValue();
        return y;
    }

    // grads by reference: CppNode passes the gradients it moved out of the engine's buffer,
    // so a use count of 1 below means nothing else holds grad_y.
    static variable_list backward(AutogradContext* ctx, variable_list& grads) {
        variable_list result(10);
        const Tensor& grad_y_ = grads[0];
        if (!grad_y_.defined()) return result;  // y did not reach the loss
        const variable_list saved = ctx->get_saved_variables();
        const Tensor &input = saved[0], &weight = saved[1], &mean = saved[2], &invstd = saved[3], &y = saved[4];
        const bool batch_stats = ctx->saved_data["batch_stats"].toBool();
        const bool relu = ctx->saved_data["relu"].toBool(), residual = ctx->saved_data["residual"].toBool();
        Tensor grad_input, grad_weight, grad_bias, grad_sum;
        if (at::GradMode::is_enabled()) {  // create_graph=True
            const variable_list g = backward_op(grad_y_, input, weight, mean, invstd, batch_stats, y, relu, residual);
            grad_input = g[0], grad_weight = g[1], grad_bias = g[2], grad_sum = g[3];
        } else {
            const Layout layout(input);
            const int64_t C = layout.channels;
            const at::ScalarType pdt = param_dtype(input.scalar_type());
            // An output in grad_y's memory (bnorm's backward may write dx, or dsum, over dy)
            // when grad_y is this node's alone (no other reference to it or its storage: not
            // kept by a hook, retain_grad or the caller) and laid out as input: no fresh
            // tensor to fault in, and the lines just read are the ones written. dx, unless
            // grad_y is also the residual's gradient (a residual without relu); dsum with relu.
            const bool exclusive = grad_y_.use_count() == 1 && grad_y_.storage().use_count() == 1 &&
                                   !grad_y_.is_view() && grad_y_.scalar_type() == input.scalar_type() &&
                                   grad_y_.sizes() == input.sizes() && grad_y_.strides() == input.strides();
            const Tensor grad_y = layout.array(grad_y_.scalar_type() == input.scalar_type() ? grad_y_
                                                                                          : grad_y_.to(input.scalar_type()));
            const Tensor w = vector(weight.defined() ? OptTensor(weight) : std::nullopt, pdt, C, "weight");
            grad_input = exclusive && !residual ? grad_y : at::empty_like(input);
            grad_weight = at::empty({C}, input.options().dtype(pdt));
            grad_bias = at::empty({C}, input.options().dtype(pdt));
            if (relu && residual) grad_sum = exclusive ? grad_y : at::empty_like(input);
            bnorm_capi_params p{};
            p.dtype = dtype_code(input.scalar_type());
            p.outer = layout.outer, p.channels = C, p.inner = layout.inner;
            p.dy = grad_y.const_data_ptr(), p.x = input.const_data_ptr(), p.mean = const_cast<void*>(data(mean));
            p.invstd = const_cast<void*>(data(invstd)), p.weight = data(w), p.batch_stats = batch_stats;
            p.relu = relu, p.y = relu ? const_cast<void*>(data(y)) : nullptr;
            p.dx = grad_input.mutable_data_ptr(), p.dweight = grad_weight.mutable_data_ptr();
            p.dbias = grad_bias.mutable_data_ptr(), p.dsum = mutable_data(grad_sum);
            run(capi->backward, p);
        }
        // the parameters' gradients in their dtypes (a no-op .to() is still a dispatched op)
        const auto as = [](const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); };
        result[0] = grad_input;
        if (weight.defined()) result[1] = as(grad_weight, weight.scalar_type());
        const c10::IValue& bias_dtype = ctx->saved_data["bias_dtype"];
        if (!bias_dtype.isNone()) result[2] = as(grad_bias, bias_dtype.toScalarType());
        if (residual) result[5] = relu ? grad_sum : grad_y_;
        return result;
    }
};

}  // namespace bnorm_torch

namespace {

Tensor batch_norm(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                  const OptTensor& running_var, const OptTensor& residual, bool training, double momentum, double eps,
                  bool relu) {
    return bnorm_torch::BatchNormFunction::apply(input, weight, bias, running_mean, running_var, residual, training, momentum,
                                    eps, relu);
}

}  // namespace

// Called once by bnorm.torch (ctypes) with _core's table; 0 when accepted.
extern "C" __attribute__((visibility("default"))) int bnorm_torch_ops_init(const bnorm_core_capi* table) {
    if (table == nullptr || table->version != BNORM_CORE_CAPI_VERSION) return 1;
    capi = table;
    return 0;
}

TORCH_LIBRARY(bnorm_cpp, m) {
    m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
          "Tensor(b!)? running_var, Tensor? residual, bool training, float momentum, float eps, bool relu) -> Tensor");
}

// CompositeImplicitAutograd: the kernel records its own autograd node (BatchNormFunction),
// and serves inference_mode too, where the autograd keys are skipped.
TORCH_LIBRARY_IMPL(bnorm_cpp, CompositeImplicitAutograd, m) {
    m.impl("batch_norm", &batch_norm);
}
