// bnorm CUDA backend: batch_stats, normalize, forward_train, forward_infer.
//
// forward_train is two kernels (plus a counter memset when a channel spans several blocks):
//   1. the statistics reduction (reduce.hpp); the block that finishes a channel computes, in
//      double, mean / var / invstd, writes save_mean and save_invstd, the normalize
//      coefficients (center = P(mean), center_lo = P(mean - center), scale = invstd * weight,
//      shift = bias) into the workspace, and updates the running buffers;
//   2. the elementwise pass y = ((x - center) - center_lo) * scale + shift.
// Because step 2 reads weight and bias only through the workspace copies made in step 1
// (each channel's weight/bias read before its running buffers are written, in the same
// thread), running_mean / running_var may alias weight / bias, as on the CPU. Nothing
// synchronizes with the host; the workspace is stream-ordered (common.hpp).
#include "elementwise.hpp"
#include "reduce.hpp"

namespace bnorm::cuda {
namespace detail {
namespace {

/// The statistics reduction's Op (see reduce.hpp for the interface).
template <class T>
struct StatsOp {
    using A = acc_t<T>;
    using P = param_t<T>;
    using State = Moments<A>;
    using Final = Moments<double>;
    static constexpr int kInputs = 1;
    static constexpr bool kShiftFromData = true;  // center each block on its first value

    bool train = false;
    // batch_stats
    P* mean = nullptr;
    P* var = nullptr;
    // forward_train
    P* save_mean = nullptr;
    P* save_invstd = nullptr;
    P* center = nullptr;     // workspace: normalize coefficients
    P* center_lo = nullptr;
    P* scale = nullptr;
    P* shift = nullptr;
    const P* weight = nullptr;
    const P* bias = nullptr;
    P* running_mean = nullptr;
    P* running_var = nullptr;
    double momentum = 0, eps = 0;
    bool unbiased_running_var = true;

    __device__ A center_of(int64_t) const { return A(0); }

    template <int N>
    __device__ __forceinline__ void tile(State& st, const A* xv, const A*, A shift_value) const {
        merge(st, tile_moments<N>(xv, shift_value));
    }

    __device__ __forceinline__ Final to_final(const State& s, A shift_value) const {
        return {double(s.n), double(shift_value) + double(s.mean), double(s.m2)};
    }

    __device__ void finish(int64_t c, const Final& f) const {
        const double mu = f.mean;
        double v = f.n > 0 ? f.m2 / f.n : 0.0;
        if (v < 0) v = 0;  // NaN passes
        if (!train) {
            mean[c] = P(mu);
            var[c] = P(v);
            return;
        }
        const P hi = P(mu);
        const P lo = P(mu - double(hi));
        const P invstd = P(1.0 / sqrt(v + eps));
        center[c] = hi;
        center_lo[c] = lo;
        scale[c] = weight ? P(invstd * weight[c]) : invstd;
        shift[c] = bias ? bias[c] : P(0);
        save_mean[c] = hi;
        save_invstd[c] = invstd;
        // After weight[c] / bias[c] were read above: the running buffers may alias them.
        const double unbias = unbiased_running_var ? f.n / (f.n - 1) : 1.0;
        if (running_mean) running_mean[c] = P((1 - momentum) * double(running_mean[c]) + momentum * mu);
        if (running_var) running_var[c] = P((1 - momentum) * double(running_var[c]) + momentum * v * unbias);
    }
};

}  // namespace
}  // namespace detail

// The public API (bnorm/cuda.hpp), exported from a shared libbnorm (see cpu_api.cpp).
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

template <class T>
void batch_stats(const T* x, Shape shape, param_t<T>* mean, param_t<T>* var, stream_t stream) {
    using namespace detail;
    using P = param_t<T>;
    const char* op = "batch_stats";
    check_shape(op, shape);
    if (shape.channels == 0) return;
    check_pointer(op, mean, "mean");
    check_pointer(op, var, "var");
    if (shape.count() == 0) {
        BNORM_CUDA_CHECK(cudaMemsetAsync(mean, 0, size_t(shape.channels) * sizeof(P), stream));
        BNORM_CUDA_CHECK(cudaMemsetAsync(var, 0, size_t(shape.channels) * sizeof(P), stream));
        return;
    }
    check_pointer(op, x, "x");
    ReducePlan plan = plan_reduce<T>(shape, aligned16(x));

    Layout layout;
    const size_t at_partials = layout.add<Moments<double>>(plan.partials);
    const size_t at_counters = layout.add<unsigned>(plan.counters);
    Workspace ws(layout.bytes(), stream);
    plan.bind(region<void>(ws.data(), at_partials), region<unsigned>(ws.data(), at_counters));

    StatsOp<T> stats;
    stats.mean = mean;
    stats.var = var;
    launch_reduce(plan, x, static_cast<const T*>(nullptr), stats, stream);
}

template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, const Epilogue<T>& epilogue, T* y,
               stream_t stream) {
    using namespace detail;
    bnorm::detail::check_activation("normalize", epilogue.activation);
    if (!bnorm::detail::check_normalize(shape, x, mean, invstd, y)) return;
    bnorm::detail::check_epilogue("normalize", shape, epilogue, y);
    EwCoefs<param_t<T>> k;
    k.center = mean;
    k.scale = invstd;
    k.scale2 = weight;
    k.shift = bias;
    launch_elementwise<Ew::Forward>(x, static_cast<const T*>(nullptr), y, shape, k, stream, forward_epilogue_of(epilogue));
}

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum, double eps,
                   const Epilogue<T>& epilogue, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   bool unbiased_running_var, stream_t stream) {
    using namespace detail;
    using P = param_t<T>;
    const char* op = "forward_train";
    bnorm::detail::check_activation(op, epilogue.activation);
    check_shape(op, shape);
    check_eps(op, eps);
    check_momentum(op, momentum);
    check_batch(op, shape);
    const int64_t C = shape.channels;
    if (C == 0) return;
    check_pointer(op, save_mean, "save_mean");
    check_pointer(op, save_invstd, "save_invstd");
    if (shape.count() == 0) {  // empty batch: running statistics untouched
        BNORM_CUDA_CHECK(cudaMemsetAsync(save_mean, 0, size_t(C) * sizeof(P), stream));
        launch_fill(save_invstd, C, P(1.0 / std::sqrt(eps)), stream);
        return;
    }
    check_pointer(op, x, "x");
    check_pointer(op, y, "y");
    bnorm::detail::check_epilogue(op, shape, epilogue, y);
    ReducePlan plan = plan_reduce<T>(shape, aligned16(x));

    Layout layout;
    const size_t at_partials = layout.add<Moments<double>>(plan.partials);
    const size_t at_counters = layout.add<unsigned>(plan.counters);
    const size_t at_center = layout.add<P>(C);
    const size_t at_center_lo = layout.add<P>(C);
    const size_t at_scale = layout.add<P>(C);
    const size_t at_shift = layout.add<P>(C);
    Workspace ws(layout.bytes(), stream);
    plan.bind(region<void>(ws.data(), at_partials), region<unsigned>(ws.data(), at_counters));

    StatsOp<T> stats;
    stats.train = true;
    stats.save_mean = save_mean;
    stats.save_invstd = save_invstd;
    stats.center = region<P>(ws.data(), at_center);
    stats.center_lo = region<P>(ws.data(), at_center_lo);
    stats.scale = region<P>(ws.data(), at_scale);
    stats.shift = region<P>(ws.data(), at_shift);
    stats.weight = weight;
    stats.bias = bias;
    stats.running_mean = running_mean;
    stats.running_var = running_var;
    stats.momentum = momentum;
    stats.eps = eps;
    stats.unbiased_running_var = unbiased_running_var;
    launch_reduce(plan, x, static_cast<const T*>(nullptr), stats, stream);

    EwCoefs<P> k;
    k.center = stats.center;
    k.center_lo = stats.center_lo;
    k.scale = stats.scale;
    k.shift = stats.shift;
    launch_elementwise<Ew::Forward>(x, static_cast<const T*>(nullptr), y, shape, k, stream, forward_epilogue_of(epilogue));
}

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean, const param_t<T>* running_var,
                   const param_t<T>* weight, const param_t<T>* bias, double eps, const Epilogue<T>& epilogue, T* y,
                   stream_t stream) {
    using namespace detail;
    using P = param_t<T>;
    bnorm::detail::check_activation("forward_infer", epilogue.activation);
    if (!bnorm::detail::check_forward_infer(shape, eps, x, running_mean, running_var, y)) return;
    bnorm::detail::check_epilogue("forward_infer", shape, epilogue, y);
    const int64_t C = shape.channels;
    Layout layout;
    const size_t at_scale = layout.add<P>(C);
    Workspace ws(layout.bytes(), stream);
    P* scale = region<P>(ws.data(), at_scale);
    infer_prep_kernel<P><<<channel_grid(C), kThreads, 0, stream>>>(C, running_var, weight, eps, scale);
    BNORM_LAUNCH_CHECK("infer_prep_kernel");
    EwCoefs<P> k;
    k.center = running_mean;
    k.scale = scale;
    k.shift = bias;
    launch_elementwise<Ew::Forward>(x, static_cast<const T*>(nullptr), y, shape, k, stream, forward_epilogue_of(epilogue));
}

#define BNORM_CUDA_INSTANTIATE_FORWARD(T)                                                                  \
    template void batch_stats<T>(const T*, Shape, param_t<T>*, param_t<T>*, stream_t);                     \
    template void normalize<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, const param_t<T>*,   \
                               const param_t<T>*, const Epilogue<T>&, T*, stream_t);                       \
    template void forward_train<T>(const T*, Shape, const param_t<T>*, const param_t<T>*, param_t<T>*,     \
                                   param_t<T>*, double, double, const Epilogue<T>&, T*, param_t<T>*,       \
                                   param_t<T>*, bool, stream_t);                                           \
    template void forward_infer<T>(const T*, Shape, const param_t<T>*, const param_t<T>*,                  \
                                   const param_t<T>*, const param_t<T>*, double, const Epilogue<T>&, T*,   \
                                   stream_t);
BNORM_CUDA_INSTANTIATE_FORWARD(float)
BNORM_CUDA_INSTANTIATE_FORWARD(double)
BNORM_CUDA_INSTANTIATE_FORWARD(half)
BNORM_CUDA_INSTANTIATE_FORWARD(bfloat16)
#undef BNORM_CUDA_INSTANTIATE_FORWARD

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm::cuda
