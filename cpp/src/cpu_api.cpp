// The CPU backend's public API: argument checks up front, then kernels.
//
// Per-channel coefficients are computed here in double and rounded once to P. backward is
// exactly backward_reduce then backward_elemt; forward_train is batch_stats then normalize,
// except that it centers x on the double-precision mean (as a hi + lo pair of P), which
// keeps float32 outputs accurate when |mean| >> std.
#include <algorithm>
#include <cmath>
#include <string>

#include "bnorm/cpu.hpp"
#include "checks.hpp"
#include "coefficients.hpp"
#include "cpu_kernels.hpp"
#include "scratch.hpp"
#include "threads.hpp"

namespace bnorm {
namespace {

// The threads for a call: bnorm's own count (threads.hpp), or 1 on a busy machine; the
// kernels then use fewer where the work is too small to pay for more.
int threads(Shape) { return detail::call_threads(); }

using detail::check_batch;
using detail::check_eps;
using detail::check_momentum;
using detail::check_parts;
using detail::check_pointer;
using detail::check_shape;
using detail::Scratch;

// weight (or 1) * invstd per channel, rounded to P.
template <class P>
Scratch<P> scales(int64_t channels, const P* invstd, const P* weight) {
    Scratch<P> scale(channels);
    for (int64_t c = 0; c < channels; ++c) scale[c] = detail::scale_of(invstd[c], weight, c);
    return scale;
}

using detail::invstd_of;

// The kernels' ReLU gradient for grad, storing g to dsum (may be null).
template <class T>
kernels::ReluGrad<T> relu_grad(const EpilogueGrad<T>& grad, T* dsum) {
    return {grad.activation == Activation::relu ? grad.y : nullptr, dsum};
}

}  // namespace

// The public API (bnorm/cpu.hpp), exported from a shared libbnorm: GCC gives the explicit
// instantiations below the visibility of the definitions, not of the header's declarations.
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

int max_num_threads() { return detail::thread_limit(); }

void set_num_threads(int n) {
    const int limit = detail::thread_limit();
    if (n < 1 || n > limit)
        throw ValueError("bnorm: the number of threads must be in [1, " + std::to_string(limit) + "], got " +
                         std::to_string(n));
    if (n > 1 && detail::forked_single_threaded())
        throw ValueError("bnorm: this process was forked from inside an OpenMP parallel region, whose threads "
                         "do not survive fork(): it runs single-threaded (start workers with the spawn or "
                         "forkserver method to use threads in them)");
    detail::configure_threads(n);
}

int get_num_threads() { return detail::configured_threads(); }

int64_t backoff_count() { return detail::backoff_count(); }

const char* cpu_isa() { return kernels::isa_name(kernels::isa()); }

template <class T>
void batch_stats(const T* x, Shape shape, param_t<T>* mean, param_t<T>* var) {
    const char* op = "batch_stats";
    check_shape(op, shape);
    if (shape.channels == 0) return;
    check_pointer(op, mean, "mean");
    check_pointer(op, var, "var");
    if (shape.count() > 0) check_pointer(op, x, "x");
    if (shape.count() == 0) {
        std::fill(mean, mean + shape.channels, param_t<T>(0));
        std::fill(var, var + shape.channels, param_t<T>(0));
        return;
    }
    Scratch<double> m(shape.channels), v(shape.channels);
    kernels::moments(x, shape, threads(shape), m.data(), v.data());
    for (int64_t c = 0; c < shape.channels; ++c) mean[c] = param_t<T>(m[c]);
    for (int64_t c = 0; c < shape.channels; ++c) var[c] = param_t<T>(v[c]);
}

template <class P>
void merge_stats(int64_t parts, int64_t channels, const double* counts, const P* means,
                 const P* vars, double* count, P* mean, P* var) {
    const char* op = "merge_stats";
    check_parts(op, parts, channels);
    if (channels == 0) return;
    check_pointer(op, count, "count");
    check_pointer(op, mean, "mean");
    check_pointer(op, var, "var");
    if (parts > 0) {
        check_pointer(op, counts, "counts");
        check_pointer(op, means, "means");
        check_pointer(op, vars, "vars");
    }
    for (int64_t i = 0; i < parts * channels; ++i) {
        if (!(counts[i] >= 0) || !std::isfinite(counts[i]))
            throw ValueError(detail::message(op, "counts must be finite and >= 0, got ", counts[i]));
        if (counts[i] > 0 && vars[i] < 0)  // (a variance is never negative; NaN passes to its channel)
            throw ValueError(detail::message(op, "vars must be >= 0, got ", vars[i]) + " (part " +
                             std::to_string(i / channels) + ", channel " + std::to_string(i % channels) + ")");
    }
    // Chan et al.: combine (n, mean, M2) pairwise in part order, in double.
    for (int64_t c = 0; c < channels; ++c) {
        double n = 0, m = 0, m2 = 0;
        for (int64_t p = 0; p < parts; ++p) {
            const double nb = counts[p * channels + c];
            if (nb == 0) continue;
            const double mb = means[p * channels + c];
            const double m2b = double(vars[p * channels + c]) * nb;
            const double total = n + nb;
            const double delta = mb - m;
            if (n == 0) {  // the first part as it is: delta * delta * 0 is NaN for a mean over 1e154
                m = mb;
                m2 = m2b;
            } else {
                m += delta * (nb / total);
                m2 += m2b + delta * delta * (n * (nb / total));
            }
            n = total;
        }
        count[c] = n;
        mean[c] = P(m);
        var[c] = P(n > 0 ? m2 / n : 0.0);
    }
}

template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, const Epilogue<T>& epilogue, T* y) {
    using P = param_t<T>;
    detail::check_activation("normalize", epilogue.activation);
    if (!detail::check_normalize(shape, x, mean, invstd, y)) return;
    detail::check_epilogue("normalize", shape, epilogue, y);
    const Scratch<P> scale = scales(shape.channels, invstd, weight);
    const Scratch<P> zero(shape.channels, P(0));
    kernels::affine(x, shape, threads(shape), mean, scale.data(), bias ? bias : zero.data(), y, epilogue);
}

template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, T* y) {
    normalize(x, shape, mean, invstd, weight, bias, Epilogue<T>{}, y);
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, const Epilogue<T>& epilogue, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   bool unbiased_running_var) {
    using P = param_t<T>;
    const char* op = "forward_train";
    detail::check_activation(op, epilogue.activation);
    check_shape(op, shape);
    check_eps(op, eps);
    check_momentum(op, momentum);
    check_batch(op, shape);
    if (shape.channels == 0) return;
    check_pointer(op, save_mean, "save_mean");
    check_pointer(op, save_invstd, "save_invstd");
    if (running_var) detail::check_running_var(op, running_var, shape.channels);
    if (shape.count() == 0) {  // empty batch: nothing to learn from, running stats untouched
        for (int64_t c = 0; c < shape.channels; ++c) {
            save_mean[c] = 0;
            save_invstd[c] = invstd_of<P>(0.0, eps);
        }
        return;
    }
    check_pointer(op, x, "x");
    check_pointer(op, y, "y");
    detail::check_epilogue(op, shape, epilogue, y);
    const int64_t C = shape.channels;
    Scratch<double> mean(C), var(C);
    Scratch<P> invstd(C);
    kernels::forward_train(x, shape, threads(shape), eps, weight, bias, y, mean.data(), var.data(), invstd.data(),
                           epilogue);
    // Written last, so that running buffers may alias weight or bias. One loop per output,
    // so that each vectorizes.
    const double unbias = unbiased_running_var ? double(shape.count()) / double(shape.count() - 1) : 1.0;
    for (int64_t c = 0; c < C; ++c) save_mean[c] = P(mean[c]);
    std::copy(invstd.begin(), invstd.end(), save_invstd);
    if (running_mean)
        for (int64_t c = 0; c < C; ++c) running_mean[c] = P((1 - momentum) * running_mean[c] + momentum * mean[c]);
    if (running_var)
        for (int64_t c = 0; c < C; ++c) running_var[c] = P((1 - momentum) * running_var[c] + momentum * var[c] * unbias);
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   bool unbiased_running_var) {
    forward_train(x, shape, weight, bias, running_mean, running_var, momentum, eps, Epilogue<T>{}, y, save_mean,
                  save_invstd, unbiased_running_var);
}

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean,
                   const param_t<T>* running_var, const param_t<T>* weight,
                   const param_t<T>* bias, double eps, const Epilogue<T>& epilogue, T* y) {
    using P = param_t<T>;
    detail::check_activation("forward_infer", epilogue.activation);
    if (!detail::check_forward_infer(shape, eps, x, running_mean, running_var, y)) return;
    detail::check_running_var("forward_infer", running_var, shape.channels);
    detail::check_epilogue("forward_infer", shape, epilogue, y);
    Scratch<P> invstd(shape.channels);
    for (int64_t c = 0; c < shape.channels; ++c) invstd[c] = invstd_of<P>(running_var[c], eps);
    normalize(x, shape, running_mean, invstd.data(), weight, bias, epilogue, y);
}

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean,
                   const param_t<T>* running_var, const param_t<T>* weight,
                   const param_t<T>* bias, double eps, T* y) {
    forward_infer(x, shape, running_mean, running_var, weight, bias, eps, Epilogue<T>{}, y);
}

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                     const param_t<T>* invstd, const EpilogueGrad<T>& grad, param_t<T>* sum_dy,
                     param_t<T>* sum_dy_xhat) {
    const char* op = "backward_reduce";
    detail::check_activation(op, grad.activation);
    check_shape(op, shape);
    if (shape.channels == 0) return;
    check_pointer(op, mean, "mean");
    check_pointer(op, invstd, "invstd");
    check_pointer(op, sum_dy, "sum_dy");
    check_pointer(op, sum_dy_xhat, "sum_dy_xhat");
    Scratch<double> s_dy(shape.channels, 0.0), s_dy_xmu(shape.channels, 0.0);
    if (shape.count() > 0) {
        check_pointer(op, dy, "dy");
        check_pointer(op, x, "x");
        detail::check_epilogue_grad(op, shape, grad, dy, x, static_cast<const T*>(nullptr), static_cast<T*>(nullptr));
        kernels::backward_sums(dy, x, shape, threads(shape), mean, s_dy.data(), s_dy_xmu.data(), relu_grad(grad, static_cast<T*>(nullptr)));
    }
    for (int64_t c = 0; c < shape.channels; ++c)
        detail::round_backward_sums(s_dy[c], s_dy_xmu[c], invstd[c], sum_dy[c], sum_dy_xhat[c]);
}

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                     const param_t<T>* invstd, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat) {
    backward_reduce(dy, x, shape, mean, invstd, EpilogueGrad<T>{}, sum_dy, sum_dy_xhat);
}

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight,
                    const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    const EpilogueGrad<T>& grad, T* dx, T* dsum) {
    using P = param_t<T>;
    detail::check_activation("backward_elemt", grad.activation);
    if (!detail::check_backward_elemt(shape, count, dy, x, mean, invstd, sum_dy, sum_dy_xhat, dx)) return;
    detail::check_epilogue_grad("backward_elemt", shape, grad, dy, x, dx, dsum);
    const int64_t C = shape.channels;
    Scratch<P> dy_mean(C), xmu_scale(C), scale(C);
    for (int64_t c = 0; c < C; ++c) {
        const auto k = detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count, true);
        dy_mean[c] = k.dy_mean, xmu_scale[c] = k.xmu_scale, scale[c] = k.scale;
    }
    kernels::backward_dx(dy, x, shape, threads(shape), mean, dy_mean.data(), xmu_scale.data(),
                         scale.data(), dx, relu_grad(grad, dsum));
}

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight,
                    const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    T* dx) {
    backward_elemt(dy, x, shape, mean, invstd, weight, sum_dy, sum_dy_xhat, count, EpilogueGrad<T>{}, dx,
                   static_cast<T*>(nullptr));
}

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
              const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats,
              const EpilogueGrad<T>& grad, T* dx, param_t<T>* dweight, param_t<T>* dbias, T* dsum) {
    using P = param_t<T>;
    const char* op = "backward";
    detail::check_activation(op, grad.activation);
    check_shape(op, shape);
    if (shape.channels == 0) return;
    check_pointer(op, dweight, "dweight");
    check_pointer(op, dbias, "dbias");
    // Sums go to scratch first: dweight and dbias are written last, so they may alias weight.
    Scratch<P> sum_dy(shape.channels, P(0)), sum_dy_xhat(shape.channels, P(0));
    if (shape.size() > 0) {
        check_pointer(op, dy, "dy");
        check_pointer(op, x, "x");
        check_pointer(op, mean, "mean");
        check_pointer(op, invstd, "invstd");
        check_pointer(op, dx, "dx");
        detail::check_epilogue_grad(op, shape, grad, dy, x, dx, dsum);
        kernels::backward(dy, x, shape, threads(shape), mean, invstd, weight, batch_stats, dx, sum_dy.data(),
                          sum_dy_xhat.data(), relu_grad(grad, dsum));
    }
    std::copy(sum_dy.begin(), sum_dy.end(), dbias);
    std::copy(sum_dy_xhat.begin(), sum_dy_xhat.end(), dweight);
}

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
              const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats, T* dx,
              param_t<T>* dweight, param_t<T>* dbias) {
    backward(dy, x, shape, mean, invstd, weight, batch_stats, EpilogueGrad<T>{}, dx, dweight, dbias,
             static_cast<T*>(nullptr));
}

#define BNORM_INSTANTIATE(T)                                                                   \
    template void batch_stats<T>(const T*, Shape, param_t<T>*, param_t<T>*);                   \
    template void normalize<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,          \
                               const param_t<T>*, const param_t<T>*, T*);                      \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,      \
                                   param_t<T>*, param_t<T>*, double, double, T*, param_t<T>*,  \
                                   param_t<T>*, bool);                                         \
    template void forward_infer<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,      \
                                   const param_t<T>*, const param_t<T>*, double, T*);          \
    template void backward_reduce<T>(const T*, const T*, Shape, const param_t<T>*,             \
                                     const param_t<T>*, param_t<T>*, param_t<T>*);             \
    template void backward_elemt<T>(const T*, const T*, Shape, const param_t<T>*,              \
                                    const param_t<T>*, const param_t<T>*, const param_t<T>*,   \
                                    const param_t<T>*, double, T*);                            \
    template void backward<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*, \
                              const param_t<T>*, bool, T*, param_t<T>*, param_t<T>*);          \
    BNORM_INSTANTIATE_EPILOGUE(T)
// The entry points with a fused epilogue (bnorm::Epilogue, bnorm::EpilogueGrad).
#define BNORM_INSTANTIATE_EPILOGUE(T)                                                          \
    template void normalize<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,          \
                               const param_t<T>*, const param_t<T>*, const Epilogue<T>&, T*);  \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,      \
                                   param_t<T>*, param_t<T>*, double, double, const Epilogue<T>&, \
                                   T*, param_t<T>*, param_t<T>*, bool);                        \
    template void forward_infer<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,      \
                                   const param_t<T>*, const param_t<T>*, double,               \
                                   const Epilogue<T>&, T*);                                    \
    template void backward_reduce<T>(const T*, const T*, Shape, const param_t<T>*,             \
                                     const param_t<T>*, const EpilogueGrad<T>&, param_t<T>*,   \
                                     param_t<T>*);                                             \
    template void backward_elemt<T>(const T*, const T*, Shape, const param_t<T>*,              \
                                    const param_t<T>*, const param_t<T>*, const param_t<T>*,   \
                                    const param_t<T>*, double, const EpilogueGrad<T>&, T*, T*); \
    template void backward<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*, \
                              const param_t<T>*, bool, const EpilogueGrad<T>&, T*, param_t<T>*, \
                              param_t<T>*, T*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
BNORM_INSTANTIATE(half)
BNORM_INSTANTIATE(bfloat16)
#undef BNORM_INSTANTIATE
#undef BNORM_INSTANTIATE_EPILOGUE

template void merge_stats<float>(int64_t, int64_t, const double*, const float*, const float*,
                                 double*, float*, float*);
template void merge_stats<double>(int64_t, int64_t, const double*, const double*,
                                  const double*, double*, double*, double*);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm
