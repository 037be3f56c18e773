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
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <mutex>
#include <optional>
#include <string>
#include <vector>

#include "core_capi.h"

namespace {

using at::Tensor;
using torch::autograd::variable_list;
using OptTensor = std::optional<Tensor>;

const bnorm_core_capi* capi = nullptr;
std::atomic<uint64_t> reused_gradients{0};  // backward outputs written over grad_y (tests read it)

// Whether t (at least 3-D) is dense with its channel dimension innermost: channels 1,
// then the spatial dimensions from the last, then the batch 0 (size-1 dimensions may have
// any stride, as in torch's own is_contiguous).
bool channels_innermost(const Tensor& t) {
    int64_t expected = 1;
    const auto dense = [&](int64_t d) {
        const int64_t size = t.size(d);
        if (size != 1 && t.stride(d) != expected) return false;
        expected *= size;
        return true;
    };
    if (!dense(1)) return false;
    for (int64_t d = t.dim() - 1; d >= 2; --d)
        if (!dense(d)) return false;
    return dense(0);
}

// t as the kernels may read its memory: strided, with no lazy negation or conjugation
// bit and not a ZeroTensor (no memory), else materialized.
Tensor plain(const Tensor& t) {
    if (t._is_zerotensor()) return at::zeros(t.sizes(), t.options());
    return t.is_neg() || t.is_conj() ? t.resolve_conj().resolve_neg() : t;
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
        if (dim >= 3 && !input.is_contiguous()) channels_last = channels_innermost(input);
        if (channels_last) {
            outer = input.size(0) * spatial;
            inner = 1;
        } else {
            outer = input.size(0);
            inner = spatial;
        }
    }

    // t (input-shaped) in this layout: itself when it already is, else a copy.
    Tensor array(const Tensor& t_) const {
        const Tensor t = plain(t_);
        if (channels_last) {
            // (the same test as is_contiguous() of t.movedim(1, -1), without making that view)
            if (t.numel() == 0 || channels_innermost(t)) return t;
            return t.movedim(1, -1).contiguous().movedim(-1, 1);
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
    const Tensor t = plain(v->scalar_type() == dtype ? *v : v->to(dtype));
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

// The forward's results: y, and what its backward needs besides input.
struct Forward {
    Tensor y, mean, invstd;  // mean, invstd: batch statistics, or eval's constants
};

Forward forward(const Tensor& input_, const OptTensor& weight_, const OptTensor& bias_, const OptTensor& running_mean,
                const OptTensor& running_var, const OptTensor& residual_, bool training, double momentum, double eps,
                bool relu) {
    TORCH_CHECK_VALUE(input_.device().is_cpu(), "bnorm.torch: bnorm_cpp.batch_norm takes CPU tensors");
    TORCH_CHECK_VALUE(input_.dim() >= 2, "bnorm.torch: input must have at least 2 dimensions (N, C, ...)");
    const Layout layout(input_);
    Forward f;
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
    f.y = at::empty_like(input);  // input is dense: y gets its strides
    p.x = input.const_data_ptr(), p.weight = data(weight), p.bias = data(bias);
    p.residual = data(residual), p.relu = relu, p.eps = eps, p.y = f.y.mutable_data_ptr();
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
        f.mean = at::empty({C}, input.options().dtype(pdt));
        f.invstd = at::empty({C}, input.options().dtype(pdt));
        p.running_mean = mutable_data(written[0]), p.running_var = mutable_data(written[1]);
        p.momentum = momentum, p.mean = f.mean.mutable_data_ptr(), p.invstd = f.invstd.mutable_data_ptr();
        run(capi->forward_train, p);
        for (size_t i = 0; i < 2; ++i) {
            if (!buffers[i].defined()) continue;
            if (!written[i].is_same(buffers[i])) buffers[i].copy_(written[i]);
            else if (!buffers[i].is_inference()) buffers[i].unsafeGetTensorImpl()->bump_version();
        }
    } else {
        TORCH_CHECK_VALUE(running_mean && running_var && running_mean->defined() && running_var->defined(),
                          "bnorm.torch: running_mean and running_var are required when training=False");
        const Tensor rm = vector(running_mean, pdt, C, "running_mean");
        const Tensor rv = vector(running_var, pdt, C, "running_var");
        p.running_mean = const_cast<void*>(rm.const_data_ptr());  // read only by forward_infer
        p.running_var = const_cast<void*>(rv.const_data_ptr());
        run(capi->forward_infer, p);
        f.mean = rm.clone();
        f.invstd = at::rsqrt(rv + eps);
    }
    return f;
}

}  // namespace

// Named (not anonymous): the profiler and autograd errors show the backward node as
// bnorm_torch::BatchNormBackward.
namespace bnorm_torch {

// The backward node of bnorm_cpp::batch_norm, as PyTorch's generated nodes are (e.g.
// NativeBatchNormBackward0): a torch::autograd::Function would do the same with generic
// bookkeeping (inputs and outputs wrapped and recorded, saved values in an IValue map)
// that costs ~30 us a layer inside a training step, where it runs with cold caches.
// Gradients for (input, weight, bias, residual).
struct BatchNormBackward : public torch::autograd::Node {
    torch::autograd::SavedVariable input, weight, mean, invstd, y;
    bool batch_stats = false, relu = false, residual = false;
    std::optional<at::ScalarType> bias_dtype;

    std::string name() const override { return "bnorm_torch::BatchNormBackward"; }

    void release_variables() override {
        std::lock_guard<std::mutex> lock(mutex_);
        input.reset_data(), weight.reset_data(), mean.reset_data(), invstd.reset_data(), y.reset_data();
    }

    variable_list apply(variable_list&& grads) override {
        std::lock_guard<std::mutex> lock(mutex_);  // (as generated nodes: retain_graph backwards may race)
        variable_list result(4);
        const Tensor& grad_y_ = grads[0];
        if (!grad_y_.defined()) return result;  // y did not reach the loss
        // (saved tensors come back through any saved_tensors_hooks: their layouts and dtypes
        // are checked and normalized below as the forward's were)
        const Tensor x_ = input.unpack(), w_ = weight.unpack(), mean_ = mean.unpack(), invstd_ = invstd.unpack();
        const Tensor y_ = y.unpack(getptr());
        Tensor grad_input, grad_weight, grad_bias, grad_sum;
        if (at::GradMode::is_enabled()) {  // create_graph=True
            const variable_list g = backward_op(grad_y_, x_, w_, mean_, invstd_, batch_stats, y_, relu, residual);
            grad_input = g[0], grad_weight = g[1], grad_bias = g[2], grad_sum = g[3];
        } else {
            const Layout layout(x_);
            const Tensor x = layout.array(x_);
            const int64_t C = layout.channels;
            const at::ScalarType pdt = param_dtype(x.scalar_type());
            TORCH_CHECK_TYPE(!relu || y_.scalar_type() == x.scalar_type(), "bnorm.torch: the saved output's dtype changed");
            const Tensor y = relu ? layout.array(y_) : Tensor();
            TORCH_CHECK_VALUE(!y.defined() || y.sizes() == x.sizes(), "bnorm.torch: the saved output's shape changed");
            const Tensor mean_v = vector(mean_, pdt, C, "saved mean"), invstd_v = vector(invstd_, pdt, C, "saved invstd");
            // An output in grad_y's memory (bnorm's backward may write dx, or dsum, over dy)
            // when grad_y is this node's alone (no other reference to it or its storage: not
            // kept by a hook, retain_grad or the caller; the engine moved it here) and laid
            // out as input: no fresh tensor to fault in, and the lines just read are the ones
            // written. dx, unless grad_y is also the residual's gradient (a residual without
            // relu); dsum with relu.
            const bool exclusive = grad_y_.use_count() == 1 && grad_y_.layout() == at::kStrided &&
                                   grad_y_.storage().use_count() == 1 && !grad_y_.is_view() &&
                                   !grad_y_._is_zerotensor() && !grad_y_.is_neg() && !grad_y_.is_conj() &&
                                   grad_y_.scalar_type() == x.scalar_type() && grad_y_.sizes() == x.sizes() &&
                                   grad_y_.strides() == x.strides();
            const Tensor grad_y = layout.array(grad_y_.scalar_type() == x.scalar_type() ? grad_y_
                                                                                    : grad_y_.to(x.scalar_type()));
            const Tensor w = vector(w_.defined() ? OptTensor(w_) : std::nullopt, pdt, C, "weight");
            grad_input = exclusive && !residual ? grad_y : at::empty_like(x);
            grad_weight = at::empty({C}, x.options().dtype(pdt));
            grad_bias = at::empty({C}, x.options().dtype(pdt));
            if (relu && residual) grad_sum = exclusive ? grad_y : at::empty_like(x);
            if (exclusive) reused_gradients.fetch_add(1, std::memory_order_relaxed);
            bnorm_capi_params p{};
            p.dtype = dtype_code(x.scalar_type());
            p.outer = layout.outer, p.channels = C, p.inner = layout.inner;
            p.dy = grad_y.const_data_ptr(), p.x = x.const_data_ptr(), p.mean = const_cast<void*>(data(mean_v));
            p.invstd = const_cast<void*>(data(invstd_v)), p.weight = data(w), p.batch_stats = batch_stats;
            p.relu = relu, p.y = relu ? const_cast<void*>(data(y)) : nullptr;
            p.dx = grad_input.mutable_data_ptr(), p.dweight = grad_weight.mutable_data_ptr();
            p.dbias = grad_bias.mutable_data_ptr(), p.dsum = mutable_data(grad_sum);
            run(capi->backward, p);
        }
        // the parameters' gradients in their dtypes (a no-op .to() is still a dispatched op)
        const auto as = [](const Tensor& t, at::ScalarType dtype) { return t.scalar_type() == dtype ? t : t.to(dtype); };
        if (task_should_compute_output(0)) result[0] = grad_input;
        if (w_.defined() && task_should_compute_output(1)) result[1] = as(grad_weight, w_.scalar_type());
        if (bias_dtype && task_should_compute_output(2)) result[2] = as(grad_bias, *bias_dtype);
        if (residual && task_should_compute_output(3)) result[3] = relu ? grad_sum : grad_y_;
        return result;
    }
};

}  // namespace bnorm_torch

namespace {

Tensor batch_norm(const Tensor& input, const OptTensor& weight, const OptTensor& bias, const OptTensor& running_mean,
                  const OptTensor& running_var, const OptTensor& residual, bool training, double momentum, double eps,
                  bool relu) {
    using namespace torch::autograd;
    // forward-mode AD (dual tensors): the kernels would drop the tangents silently
    TORCH_CHECK_NOT_IMPLEMENTED(!(isFwGradDefined(input) || isFwGradDefined(weight) || isFwGradDefined(bias) ||
                                  isFwGradDefined(residual)),
                                "bnorm.torch.batch_norm does not support forward-mode AD: use "
                                "torch.nn.functional.batch_norm there");
    c10::intrusive_ptr<bnorm_torch::BatchNormBackward> node;
    if (compute_requires_grad(input, weight, bias, residual)) {
        node = c10::make_intrusive<bnorm_torch::BatchNormBackward>();
        node->set_next_edges(collect_next_edges(input, weight, bias, residual));
    }
    Forward f;
    {
        at::NoGradGuard no_grad;  // the forward's own tensor ops (buffer updates, conversions) record nothing
        f = forward(input, weight, bias, running_mean, running_var, residual, training, momentum, eps, relu);
    }
    if (node) {
        set_history(f.y, node);
        node->input = SavedVariable(input, false);  // the original: create_graph differentiates through it
        node->weight = SavedVariable(weight, false);
        node->mean = SavedVariable(f.mean, false);
        node->invstd = SavedVariable(f.invstd, false);
        node->y = SavedVariable(relu ? f.y : Tensor(), relu);
        node->batch_stats = training, node->relu = relu, node->residual = residual && residual->defined();
        if (bias && bias->defined()) node->bias_dtype = bias->scalar_type();
    }
    return f.y;
}

}  // namespace

// How many backward calls wrote an output over their incoming gradient (for the tests).
extern "C" __attribute__((visibility("default"))) uint64_t bnorm_torch_ops_reused_gradients() {
    return reused_gradients.load(std::memory_order_relaxed);
}

// Called once by bnorm.torch (ctypes) with _core's table; 0 when accepted.
extern "C" __attribute__((visibility("default"))) int bnorm_torch_ops_init(const bnorm_core_capi* table) {
    if (table == nullptr || table->version != BNORM_CORE_CAPI_VERSION || table->params_size != sizeof(bnorm_capi_params))
        return 1;
    capi = table;
    return 0;
}

TORCH_LIBRARY(bnorm_cpp, m) {
    m.def("batch_norm(Tensor input, Tensor? weight, Tensor? bias, Tensor(a!)? running_mean, "
          "Tensor(b!)? running_var, Tensor? residual, bool training, float momentum, float eps, bool relu) -> Tensor");
}

// CompositeImplicitAutograd: the kernel records its own autograd node (BatchNormBackward),
// and serves inference_mode too, where the autograd keys are skipped.
TORCH_LIBRARY_IMPL(bnorm_cpp, CompositeImplicitAutograd, m) {
    m.impl("batch_norm", &batch_norm);
}
