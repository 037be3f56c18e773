// bnorm CUDA backend: the entry points with a fused epilogue (bnorm::Epilogue,
// bnorm::EpilogueGrad). The kernels do not implement the epilogue yet (the elementwise
// passes would take the residual / the mask's y and dsum as extra streams, and the backward
// reduction a third input: reduce.hpp's Ops load two). Until then an empty epilogue takes
// the plain path and any other is refused with ValueError, after the same argument checks
// as the CPU backend and before anything is enqueued.
#include <string>

#include "bnorm/cuda.hpp"
#include "checks.hpp"

namespace bnorm::cuda {
namespace {

template <class T>
bool empty_epilogue(const char* op, const Epilogue<T>& e) {
    detail::check_activation(op, e.activation);
    return e.residual == nullptr && e.activation == Activation::none;
}

template <class T>
bool empty_grad(const char* op, const EpilogueGrad<T>& g, const T* dsum) {
    detail::check_activation(op, g.activation);
    return g.activation == Activation::none && dsum == nullptr;
}

[[noreturn]] void not_implemented(const char* op) {
    throw ValueError(std::string("bnorm: ") + op +
                     ": the fused epilogue (residual, activation, dsum) is not implemented by the CUDA backend yet; "
                     "use the CPU backend, or the plain op followed by the add and ReLU");
}

}  // namespace

// The public API (bnorm/cuda.hpp), exported from a shared libbnorm (see cpu_api.cpp).
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd, const param_t<T>* weight,
               const param_t<T>* bias, const Epilogue<T>& epilogue, T* y, stream_t stream) {
    if (!empty_epilogue("normalize", epilogue)) not_implemented("normalize");
    normalize(x, shape, mean, invstd, weight, bias, y, stream);
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum, double eps,
                   const Epilogue<T>& epilogue, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   stream_t stream) {
    if (!empty_epilogue("forward_train", epilogue)) not_implemented("forward_train");
    forward_train(x, shape, weight, bias, running_mean, running_var, momentum, eps, y, save_mean, save_invstd, stream);
}

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean, const param_t<T>* running_var,
                   const param_t<T>* weight, const param_t<T>* bias, double eps, const Epilogue<T>& epilogue, T* y,
                   stream_t stream) {
    if (!empty_epilogue("forward_infer", epilogue)) not_implemented("forward_infer");
    forward_infer(x, shape, running_mean, running_var, weight, bias, eps, y, stream);
}

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
                     const EpilogueGrad<T>& grad, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat, stream_t stream) {
    if (!empty_grad("backward_reduce", grad, static_cast<const T*>(nullptr))) not_implemented("backward_reduce");
    backward_reduce(dy, x, shape, mean, invstd, sum_dy, sum_dy_xhat, stream);
}

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
                    const param_t<T>* weight, const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    const EpilogueGrad<T>& grad, T* dx, T* dsum, stream_t stream) {
    if (!empty_grad("backward_elemt", grad, static_cast<const T*>(dsum))) not_implemented("backward_elemt");
    backward_elemt(dy, x, shape, mean, invstd, weight, sum_dy, sum_dy_xhat, count, dx, stream);
}

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
              const param_t<T>* weight, bool batch_stats, const EpilogueGrad<T>& grad, T* dx, param_t<T>* dweight,
              param_t<T>* dbias, T* dsum, stream_t stream) {
    if (!empty_grad("backward", grad, static_cast<const T*>(dsum))) not_implemented("backward");
    backward(dy, x, shape, mean, invstd, weight, batch_stats, dx, dweight, dbias, stream);
}

#define BNORM_CUDA_INSTANTIATE_EPILOGUE(T)                                                                    \
    template void normalize<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, const param_t<T>*,      \
                               const param_t<T>*, const Epilogue<T>&, T*, stream_t);                          \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, param_t<T>*,        \
                                   param_t<T>*, double, double, const Epilogue<T>&, T*, param_t<T>*,          \
                                   param_t<T>*, stream_t);                                                    \
    template void forward_infer<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, const param_t<T>*,  \
                                   const param_t<T>*, double, const Epilogue<T>&, T*, stream_t);              \
    template void backward_reduce<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,         \
                                     const EpilogueGrad<T>&, param_t<T>*, param_t<T>*, stream_t);             \
    template void backward_elemt<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,          \
                                    const param_t<T>*, const param_t<T>*, const param_t<T>*, double,          \
                                    const EpilogueGrad<T>&, T*, T*, stream_t);                                \
    template void backward<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,                \
                              const param_t<T>*, bool, const EpilogueGrad<T>&, T*, param_t<T>*, param_t<T>*,  \
                              T*, stream_t);
BNORM_CUDA_INSTANTIATE_EPILOGUE(float)
BNORM_CUDA_INSTANTIATE_EPILOGUE(double)
BNORM_CUDA_INSTANTIATE_EPILOGUE(half)
BNORM_CUDA_INSTANTIATE_EPILOGUE(bfloat16)
#undef BNORM_CUDA_INSTANTIATE_EPILOGUE

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm::cuda
