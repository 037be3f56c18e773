// The CPU backend's public API: argument checks up front, then kernels.
//
// Per-channel coefficients are computed here in double and rounded once to P. backward is
// exactly backward_reduce then backward_elemt; forward_train is batch_stats then normalize,
// except that it centers x on the double-precision mean (as a hi + lo pair of P), which
// keeps float32 outputs accurate when |mean| >> std.
#include <omp.h>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <string>

#include "bnorm/cpu.hpp"
#include "checks.hpp"
#include "coefficients.hpp"
#include "cpu_kernels.hpp"
#include "scratch.hpp"

namespace bnorm {
namespace {

std::atomic<int> g_threads{0};  // 0: not set, use OpenMP's default
constexpr int kMaxThreads = 1024;  // the bound on threads, or the processor count if larger

// libgomp crashes or aborts on teams of tens of thousands of threads, and each thread gets
// its own workspace: set_num_threads refuses more, and OpenMP's default (OMP_NUM_THREADS)
// is capped at the same bound.
int thread_limit() {
    static const int limit = std::max(kMaxThreads, omp_get_num_procs());  // a syscall: once (0.35 us a call)
    return limit;
}

// A process forked after bnorm ran OpenMP threads cannot use them: libgomp's thread pool
// does not survive fork(), and the child's first parallel region hangs (multiprocessing
// workers, data loaders). Such a child runs single-threaded, as PyTorch's does, and refuses
// more threads.
std::atomic<bool> g_threads_ran{false};   // a call here asked OpenMP for more than one thread
std::atomic<bool> g_forked_after{false};  // this process was forked after that

int configured_threads() {
    const int set = g_threads.load(std::memory_order_relaxed);
    return set > 0 ? set : std::min(omp_get_max_threads(), thread_limit());
}

// The threads for a call on `shape`, noting when OpenMP will start threads for it.
int threads(Shape shape) {
    const int n = configured_threads();
    if (n > 1 && shape.size() >= kernels::kSerialBelow && !g_threads_ran.load(std::memory_order_relaxed))
        g_threads_ran.store(true, std::memory_order_relaxed);
    return n;
}

#if defined(__unix__) || defined(__APPLE__)
void single_threaded_after_fork() {
    if (!g_threads_ran.load(std::memory_order_relaxed)) return;
    g_forked_after.store(true, std::memory_order_relaxed);
    g_threads.store(1, std::memory_order_relaxed);
}
const int g_fork_handler = pthread_atfork(nullptr, nullptr, single_threaded_after_fork);
#endif

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

}  // namespace

// The public API (bnorm/cpu.hpp), exported from a shared libbnorm: GCC gives the explicit
// instantiations below the visibility of the definitions, not of the header's declarations.
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

int max_num_threads() { return thread_limit(); }

void set_num_threads(int n) {
    const int limit = thread_limit();
    if (n < 1 || n > limit)
        throw ValueError("bnorm: the number of threads must be in [1, " + std::to_string(limit) + "], got " +
                         std::to_string(n));
    if (n > 1 && g_forked_after.load(std::memory_order_relaxed))
        throw ValueError("bnorm: this process was forked after bnorm ran OpenMP threads, which do not survive "
                         "fork(): it runs single-threaded (start workers with the spawn or forkserver method "
                         "to use threads in them)");
    g_threads.store(n, std::memory_order_relaxed);
}

int get_num_threads() { return configured_threads(); }

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
    for (int64_t i = 0; i < parts * channels; ++i)
        if (!(counts[i] >= 0) || !std::isfinite(counts[i]))
            throw ValueError(detail::message(op, "counts must be finite and >= 0, got ", counts[i]));
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
            m += delta * (nb / total);
            m2 += m2b + delta * delta * (n * (nb / total));
            n = total;
        }
        count[c] = n;
        mean[c] = P(m);
        var[c] = P(n > 0 ? m2 / n : 0.0);
    }
}

template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, T* y) {
    using P = param_t<T>;
    if (!detail::check_normalize(shape, x, mean, invstd, y)) return;
    const Scratch<P> scale = scales(shape.channels, invstd, weight);
    const Scratch<P> zero(shape.channels, P(0));
    kernels::affine(x, shape, threads(shape), mean, zero.data(), scale.data(), bias ? bias : zero.data(), y);
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, T* y, param_t<T>* save_mean, param_t<T>* save_invstd) {
    using P = param_t<T>;
    const char* op = "forward_train";
    check_shape(op, shape);
    check_eps(op, eps);
    check_momentum(op, momentum);
    check_batch(shape);
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
    const int64_t C = shape.channels;
    Scratch<double> mean(C), var(C);
    Scratch<P> invstd(C);
    kernels::forward_train(x, shape, threads(shape), eps, weight, bias, y, mean.data(), var.data(), invstd.data());
    // Written last, so that running buffers may alias weight or bias. One loop per output,
    // so that each vectorizes.
    const double unbias = double(shape.count()) / double(shape.count() - 1);
    for (int64_t c = 0; c < C; ++c) save_mean[c] = P(mean[c]);
    std::copy(invstd.begin(), invstd.end(), save_invstd);
    if (running_mean)
        for (int64_t c = 0; c < C; ++c) running_mean[c] = P((1 - momentum) * running_mean[c] + momentum * mean[c]);
    if (running_var)
        for (int64_t c = 0; c < C; ++c) running_var[c] = P((1 - momentum) * running_var[c] + momentum * var[c] * unbias);
}

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean,
                   const param_t<T>* running_var, const param_t<T>* weight,
                   const param_t<T>* bias, double eps, T* y) {
    using P = param_t<T>;
    if (!detail::check_forward_infer(shape, eps, x, running_mean, running_var, y)) return;
    detail::check_running_var("forward_infer", running_var, shape.channels);
    Scratch<P> invstd(shape.channels);
    for (int64_t c = 0; c < shape.channels; ++c) invstd[c] = invstd_of<P>(running_var[c], eps);
    normalize(x, shape, running_mean, invstd.data(), weight, bias, y);
}

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                     const param_t<T>* invstd, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat) {
    const char* op = "backward_reduce";
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
        kernels::backward_sums(dy, x, shape, threads(shape), mean, s_dy.data(), s_dy_xmu.data());
    }
    for (int64_t c = 0; c < shape.channels; ++c)
        detail::round_backward_sums(s_dy[c], s_dy_xmu[c], invstd[c], sum_dy[c], sum_dy_xhat[c]);
}

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight,
                    const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    T* dx) {
    using P = param_t<T>;
    if (!detail::check_backward_elemt(shape, count, dy, x, mean, invstd, sum_dy, sum_dy_xhat, dx)) return;
    const int64_t C = shape.channels;
    Scratch<P> dy_mean(C), xmu_scale(C), scale(C);
    for (int64_t c = 0; c < C; ++c) {
        const auto k = detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count);
        dy_mean[c] = k.dy_mean, xmu_scale[c] = k.xmu_scale, scale[c] = k.scale;
    }
    kernels::backward_dx(dy, x, shape, threads(shape), mean, dy_mean.data(), xmu_scale.data(),
                         scale.data(), dx);
}

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
              const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats, T* dx,
              param_t<T>* dweight, param_t<T>* dbias) {
    using P = param_t<T>;
    const char* op = "backward";
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
        if (batch_stats) {
            kernels::backward_train(dy, x, shape, threads(shape), mean, invstd, weight, dx, sum_dy.data(), sum_dy_xhat.data());
        } else {
            backward_reduce(dy, x, shape, mean, invstd, sum_dy.data(), sum_dy_xhat.data());
            const Scratch<P> scale = scales(shape.channels, invstd, weight);
            const Scratch<P> zero(shape.channels, P(0));
            kernels::affine(dy, shape, threads(shape), zero.data(), zero.data(), scale.data(), zero.data(), dx);
        }
    }
    std::copy(sum_dy.begin(), sum_dy.end(), dbias);
    std::copy(sum_dy_xhat.begin(), sum_dy_xhat.end(), dweight);
}

#define BNORM_INSTANTIATE(T)                                                                   \
    template void batch_stats<T>(const T*, Shape, param_t<T>*, param_t<T>*);                   \
    template void normalize<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,          \
                               const param_t<T>*, const param_t<T>*, T*);                      \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,      \
                                   param_t<T>*, param_t<T>*, double, double, T*, param_t<T>*,  \
                                   param_t<T>*);                                               \
    template void forward_infer<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,      \
                                   const param_t<T>*, const param_t<T>*, double, T*);          \
    template void backward_reduce<T>(const T*, const T*, Shape, const param_t<T>*,             \
                                     const param_t<T>*, param_t<T>*, param_t<T>*);             \
    template void backward_elemt<T>(const T*, const T*, Shape, const param_t<T>*,              \
                                    const param_t<T>*, const param_t<T>*, const param_t<T>*,   \
                                    const param_t<T>*, double, T*);                            \
    template void backward<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*, \
                              const param_t<T>*, bool, T*, param_t<T>*, param_t<T>*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
BNORM_INSTANTIATE(half)
#undef BNORM_INSTANTIATE

template void merge_stats<float>(int64_t, int64_t, const double*, const float*, const float*,
                                 double*, float*, float*);
template void merge_stats<double>(int64_t, int64_t, const double*, const double*,
                                  const double*, double*, double*, double*);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm
