// bnorm CUDA backend: the fused epilogue's entry points that are not the kernels' own, and
// the plain entry points that are the fused ones with an empty epilogue.
//
// normalize, forward_train, forward_infer (forward.cu) and backward_elemt (backward.cu) take
// the epilogue inside their elementwise pass (elementwise.hpp: residual and ReLU on y; ReLU's
// gradient read in place of dy, dsum stored by the pass that writes dx). The reductions of
// backward_reduce and backward read two inputs (reduce.hpp), not the mask's y as a third:
// with ReLU, these two first write g = dy * (y > 0) (to dsum when given, else to scratch)
// in one elementwise pass and then run the plain op on g. That is one kernel more than the
// CPU makes (CUDA: mask, reduce, dx; CPU: reduce, dx) but not more bytes: mask (read dy, y;
// write g) + reduce (read g, x) + dx (read g, x; write dx) = 8S, the same as a reduction
// reading dy, x, y (3S) and a dx pass reading dy, x, y and writing dx, dsum (5S). Whether
// the saved launch pays for a third input in every reduction kernel is for the GPU issue to
// measure. Compiled here, not run: the build machine has no GPU.
#include "elementwise.hpp"

namespace bnorm::cuda {
namespace detail {
namespace {

/// g = dy * (y > 0) into `g`: BackwardEval's pass (dx = dy * scale) with scale 1, masked.
template <class T>
void write_masked_gradient(const T* dy, const T* y, Shape shape, T* g, cudaStream_t stream) {
    using P = param_t<T>;
    Layout layout;
    const size_t at_ones = layout.add<P>(shape.channels);
    Workspace ws(layout.bytes(), stream);
    launch_fill(region<P>(ws.data(), at_ones), shape.channels, P(1), stream);
    EwCoefs<P> k;
    k.scale = region<P>(ws.data(), at_ones);
    EwEpilogue<T> e;
    e.mask = y;
    launch_elementwise<Ew::BackwardEval>(dy, static_cast<const T*>(nullptr), g, shape, k, stream, e);
}

/// The gradient the reductions read: dy, or g = dy * (y > 0) written to dsum (or scratch).
template <class T>
class MaskedGradient {
public:
    MaskedGradient(const T* dy, const EpilogueGrad<T>& grad, Shape shape, T* dsum, cudaStream_t stream)
        : scratch_(grad.activation == Activation::relu && !dsum ? size_t(shape.size()) * sizeof(T) : 0, stream) {
        if (grad.activation != Activation::relu) {
            g_ = dy;
            if (dsum)  // no activation: the residual's gradient is dy itself
                BNORM_CUDA_CHECK(cudaMemcpyAsync(dsum, dy, size_t(shape.size()) * sizeof(T), cudaMemcpyDeviceToDevice,
                                                 stream));
            return;
        }
        T* g = dsum ? dsum : static_cast<T*>(scratch_.data());
        write_masked_gradient(dy, grad.y, shape, g, stream);
        g_ = g;
    }
    const T* get() const { return g_; }

private:
    Workspace scratch_;
    const T* g_ = nullptr;
};

}  // namespace
}  // namespace detail

// The public API (bnorm/cuda.hpp), exported from a shared libbnorm (see cpu_api.cpp).
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
                     const EpilogueGrad<T>& grad, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat, stream_t stream) {
    const char* op = "backward_reduce";
    bnorm::detail::check_activation(op, grad.activation);
    bnorm::detail::check_shape(op, shape);
    if (shape.count() > 0 && shape.channels > 0) {
        bnorm::detail::check_pointer(op, dy, "dy");
        bnorm::detail::check_pointer(op, x, "x");
        bnorm::detail::check_epilogue_grad(op, shape, grad, dy, x, static_cast<const T*>(nullptr),
                                           static_cast<const T*>(nullptr));
    }
    const detail::MaskedGradient<T> g(dy, grad, shape.channels > 0 ? shape : Shape{}, nullptr, stream);
    backward_reduce(g.get(), x, shape, mean, invstd, sum_dy, sum_dy_xhat, stream);
}

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
              const param_t<T>* weight, bool batch_stats, const EpilogueGrad<T>& grad, T* dx, param_t<T>* dweight,
              param_t<T>* dbias, T* dsum, stream_t stream) {
    const char* op = "backward";
    bnorm::detail::check_activation(op, grad.activation);
    bnorm::detail::check_shape(op, shape);
    const bool any = shape.size() > 0;
    if (any) {
        bnorm::detail::check_pointer(op, dy, "dy");
        bnorm::detail::check_pointer(op, x, "x");
        bnorm::detail::check_pointer(op, dx, "dx");
        bnorm::detail::check_epilogue_grad(op, shape, grad, dy, x, static_cast<const T*>(dx),
                                           static_cast<const T*>(dsum));
    }
    // (the plain op checks the rest before it enqueues anything; the mask pass comes first,
    // so check it can run: the plain op's per-channel pointers are checked there)
    if (any) {
        bnorm::detail::check_pointer(op, mean, "mean");
        bnorm::detail::check_pointer(op, invstd, "invstd");
        bnorm::detail::check_pointer(op, dweight, "dweight");
        bnorm::detail::check_pointer(op, dbias, "dbias");
    }
    const detail::MaskedGradient<T> g(dy, grad, any ? shape : Shape{}, dsum, stream);
    backward(g.get(), x, shape, mean, invstd, weight, batch_stats, dx, dweight, dbias, stream);
}

// The plain entry points: the fused ones with an empty epilogue.
template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd, const param_t<T>* weight,
               const param_t<T>* bias, T* y, stream_t stream) {
    normalize(x, shape, mean, invstd, weight, bias, Epilogue<T>{}, y, stream);
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum, double eps, T* y,
                   param_t<T>* save_mean, param_t<T>* save_invstd, stream_t stream) {
    forward_train(x, shape, weight, bias, running_mean, running_var, momentum, eps, Epilogue<T>{}, y, save_mean,
                  save_invstd, true, stream);
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum, double eps, T* y,
                   param_t<T>* save_mean, param_t<T>* save_invstd, bool unbiased_running_var, stream_t stream) {
    forward_train(x, shape, weight, bias, running_mean, running_var, momentum, eps, Epilogue<T>{}, y, save_mean,
                  save_invstd, unbiased_running_var, stream);
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum, double eps,
                   const Epilogue<T>& epilogue, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   stream_t stream) {
    forward_train(x, shape, weight, bias, running_mean, running_var, momentum, eps, epilogue, y, save_mean,
                  save_invstd, true, stream);
}

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean, const param_t<T>* running_var,
                   const param_t<T>* weight, const param_t<T>* bias, double eps, T* y, stream_t stream) {
    forward_infer(x, shape, running_mean, running_var, weight, bias, eps, Epilogue<T>{}, y, stream);
}

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
                    const param_t<T>* weight, const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    T* dx, stream_t stream) {
    backward_elemt(dy, x, shape, mean, invstd, weight, sum_dy, sum_dy_xhat, count, EpilogueGrad<T>{}, dx,
                   static_cast<T*>(nullptr), stream);
}

#define BNORM_CUDA_INSTANTIATE_EPILOGUE(T)                                                                    \
    template void backward_reduce<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,         \
                                     const EpilogueGrad<T>&, param_t<T>*, param_t<T>*, stream_t);             \
    template void backward<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,                \
                              const param_t<T>*, bool, const EpilogueGrad<T>&, T*, param_t<T>*, param_t<T>*,  \
                              T*, stream_t);                                                                  \
    template void normalize<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, const param_t<T>*,      \
                               const param_t<T>*, T*, stream_t);                                              \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, param_t<T>*,        \
                                   param_t<T>*, double, double, T*, param_t<T>*, param_t<T>*, stream_t);      \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, param_t<T>*,        \
                                   param_t<T>*, double, double, T*, param_t<T>*, param_t<T>*, bool,           \
                                   stream_t);                                                                 \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, param_t<T>*,        \
                                   param_t<T>*, double, double, const Epilogue<T>&, T*, param_t<T>*,          \
                                   param_t<T>*, stream_t);                                                    \
    template void forward_infer<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, const param_t<T>*,  \
                                   const param_t<T>*, double, T*, stream_t);                                  \
    template void backward_elemt<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,          \
                                    const param_t<T>*, const param_t<T>*, const param_t<T>*, double, T*,      \
                                    stream_t);
BNORM_CUDA_INSTANTIATE_EPILOGUE(float)
BNORM_CUDA_INSTANTIATE_EPILOGUE(double)
BNORM_CUDA_INSTANTIATE_EPILOGUE(half)
BNORM_CUDA_INSTANTIATE_EPILOGUE(bfloat16)
#undef BNORM_CUDA_INSTANTIATE_EPILOGUE

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm::cuda
