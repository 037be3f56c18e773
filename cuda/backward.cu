// bnorm CUDA backend: backward_reduce, backward_elemt, backward.
//
// backward is two kernels (plus a counter memset when a channel spans several blocks):
//   1. the reduction of sum(dy) and sum(dy * (x - mean)) (reduce.hpp; float per thread and
//      block, double across blocks); the block that finishes a channel rounds the sums to P
//      (dbias = sum_dy, dweight = sum_dy_xhat = sum_dy_xmu * invstd, as backward_reduce
//      returns them) and derives from those rounded values, in double, the coefficients
//      of the elementwise pass, exactly as the CPU's backward = backward_reduce +
//      backward_elemt does;
//   2. dx = (dy - dy_mean - (x - mean) * xmu_scale) * scale (batch statistics), or
//      dx = dy * scale (fixed statistics, which reads dy only).
// The elementwise pass runs after the reduction on the same stream, so dx may alias dy or x;
// dweight / dbias are written after weight is read (same thread, same channel), so they may
// alias it.
#include "elementwise.hpp"
#include "reduce.hpp"

namespace bnorm::cuda {
namespace detail {
namespace {

enum class GradMode { Reduce, Train, Eval };

/// The backward reduction's Op (see reduce.hpp for the interface).
template <class T>
struct GradOp {
    using A = acc_t<T>;
    using P = param_t<T>;
    using State = Sums<A>;
    using Final = Sums<double>;
    static constexpr int kInputs = 2;             // xv = x, gv = dy
    static constexpr bool kShiftFromData = false; // values are centered on mean[c]

    GradMode mode = GradMode::Reduce;
    const P* mean = nullptr;
    const P* invstd = nullptr;
    const P* weight = nullptr;
    double count = 0;      // M
    P* sum_dy = nullptr;   // backward_reduce: sum_dy; backward: dbias
    P* sum_dy_xhat = nullptr;  // backward_reduce: sum_dy_xhat; backward: dweight
    P* dy_mean = nullptr;  // workspace: coefficients of the elementwise pass
    P* xmu_scale = nullptr;
    P* scale = nullptr;

    __device__ A center_of(int64_t c) const { return A(mean[c]); }

    // The tile's sums first, in K interleaved partial sums (independent chains), then one
    // addition to the thread's running sums: a thread rounds once per tile, not once per
    // value. (Adding each value to the running sums left a relative error of 1.8e-5 in
    // sum(dy * (x - mean)) over a 2^30-value channel of float16 on an H200, test_cuda's
    // >2^31 case: ~4096 serial float additions per thread.)
    template <int N>
    __device__ __forceinline__ void tile(State& st, const A* xv, const A* gv, A m) const {
        constexpr int K = N < 4 ? N : 4;
        A dy[K], dyx[K];
#pragma unroll
        for (int k = 0; k < K; ++k) {
            dy[k] = gv[k];
            dyx[k] = gv[k] * (xv[k] - m);
        }
#pragma unroll
        for (int i = K; i < N; ++i) {
            dy[i % K] += gv[i];
            dyx[i % K] += gv[i] * (xv[i] - m);
        }
#pragma unroll
        for (int k = 1; k < K; ++k) {
            dy[0] += dy[k];
            dyx[0] += dyx[k];
        }
        st.dy += dy[0];
        st.dy_xmu += dyx[0];
    }

    __device__ __forceinline__ Final to_final(const State& s, A) const { return {double(s.dy), double(s.dy_xmu)}; }

    __device__ void finish(int64_t c, const Final& f) const {
        const P is = invstd[c];
        const P sdy = P(f.dy);
        const P sdyx = P(f.dy_xmu * double(is));
        if (mode != GradMode::Reduce) {
            const P w = weight ? weight[c] : P(1);
            scale[c] = weight ? P(is * w) : is;
            if (mode == GradMode::Train) {
                dy_mean[c] = P(double(sdy) / count);
                xmu_scale[c] = P(double(is) * double(sdyx) / count);
            }
        }
        sum_dy[c] = sdy;
        sum_dy_xhat[c] = sdyx;
    }
};

}  // namespace
}  // namespace detail

// The public API (bnorm/cuda.hpp), exported from a shared libbnorm (see cpu_api.cpp).
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
                     param_t<T>* sum_dy, param_t<T>* sum_dy_xhat, stream_t stream) {
    using namespace detail;
    using P = param_t<T>;
    const char* op = "backward_reduce";
    check_shape(op, shape);
    if (shape.channels == 0) return;
    check_pointer(op, mean, "mean");
    check_pointer(op, invstd, "invstd");
    check_pointer(op, sum_dy, "sum_dy");
    check_pointer(op, sum_dy_xhat, "sum_dy_xhat");
    if (shape.count() == 0) {
        BNORM_CUDA_CHECK(cudaMemsetAsync(sum_dy, 0, size_t(shape.channels) * sizeof(P), stream));
        BNORM_CUDA_CHECK(cudaMemsetAsync(sum_dy_xhat, 0, size_t(shape.channels) * sizeof(P), stream));
        return;
    }
    check_pointer(op, dy, "dy");
    check_pointer(op, x, "x");
    ReducePlan plan = plan_reduce<T>(shape, aligned16(x) && aligned16(dy));

    Layout layout;
    const size_t at_partials = layout.add<Sums<double>>(plan.partials);
    const size_t at_counters = layout.add<unsigned>(plan.counters);
    Workspace ws(layout.bytes(), stream);
    plan.bind(region<void>(ws.data(), at_partials), region<unsigned>(ws.data(), at_counters));

    GradOp<T> grad;
    grad.mode = GradMode::Reduce;
    grad.mean = mean;
    grad.invstd = invstd;
    grad.count = double(shape.count());
    grad.sum_dy = sum_dy;
    grad.sum_dy_xhat = sum_dy_xhat;
    launch_reduce(plan, x, dy, grad, stream);
}

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
                    const param_t<T>* weight, const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat,
                    double count, const EpilogueGrad<T>& grad, T* dx, T* dsum, stream_t stream) {
    using namespace detail;
    using P = param_t<T>;
    bnorm::detail::check_activation("backward_elemt", grad.activation);
    if (!bnorm::detail::check_backward_elemt(shape, count, dy, x, mean, invstd, sum_dy, sum_dy_xhat, dx)) return;
    bnorm::detail::check_epilogue_grad("backward_elemt", shape, grad, dy, x, static_cast<const T*>(dx),
                                       static_cast<const T*>(dsum));
    const int64_t C = shape.channels;
    Layout layout;
    const size_t at_dy_mean = layout.add<P>(C);
    const size_t at_xmu_scale = layout.add<P>(C);
    const size_t at_scale = layout.add<P>(C);
    Workspace ws(layout.bytes(), stream);
    EwCoefs<P> k;
    k.center = mean;
    k.dy_mean = region<P>(ws.data(), at_dy_mean);
    k.xmu_scale = region<P>(ws.data(), at_xmu_scale);
    k.scale = region<P>(ws.data(), at_scale);
    elemt_prep_kernel<P><<<channel_grid(C), kThreads, 0, stream>>>(
        C, invstd, weight, sum_dy, sum_dy_xhat, count, region<P>(ws.data(), at_dy_mean),
        region<P>(ws.data(), at_xmu_scale), region<P>(ws.data(), at_scale));
    BNORM_LAUNCH_CHECK("elemt_prep_kernel");
    EwEpilogue<T> e;  // ReLU's gradient: g = dy * (y > 0) read in place of dy, stored to dsum
    e.mask = grad.activation == Activation::relu ? grad.y : nullptr;
    e.dsum = e.mask ? dsum : nullptr;
    if (dsum && !e.mask)  // no activation: g is dy itself
        BNORM_CUDA_CHECK(cudaMemcpyAsync(dsum, dy, size_t(shape.size()) * sizeof(T), cudaMemcpyDeviceToDevice, stream));
    launch_elementwise<Ew::BackwardTrain>(dy, x, dx, shape, k, stream, e);
}

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
              const param_t<T>* weight, bool batch_stats, T* dx, param_t<T>* dweight, param_t<T>* dbias,
              stream_t stream) {
    using namespace detail;
    using P = param_t<T>;
    const char* op = "backward";
    check_shape(op, shape);
    const int64_t C = shape.channels;
    if (C == 0) return;
    check_pointer(op, dweight, "dweight");
    check_pointer(op, dbias, "dbias");
    if (shape.count() == 0) {  // as on the CPU: mean and invstd are not needed (nor checked)
        BNORM_CUDA_CHECK(cudaMemsetAsync(dweight, 0, size_t(C) * sizeof(P), stream));
        BNORM_CUDA_CHECK(cudaMemsetAsync(dbias, 0, size_t(C) * sizeof(P), stream));
        return;
    }
    check_pointer(op, mean, "mean");
    check_pointer(op, invstd, "invstd");
    check_pointer(op, dy, "dy");
    check_pointer(op, x, "x");
    check_pointer(op, dx, "dx");
    ReducePlan plan = plan_reduce<T>(shape, aligned16(x) && aligned16(dy));

    Layout layout;
    const size_t at_partials = layout.add<Sums<double>>(plan.partials);
    const size_t at_counters = layout.add<unsigned>(plan.counters);
    const size_t at_dy_mean = layout.add<P>(C);
    const size_t at_xmu_scale = layout.add<P>(C);
    const size_t at_scale = layout.add<P>(C);
    Workspace ws(layout.bytes(), stream);
    plan.bind(region<void>(ws.data(), at_partials), region<unsigned>(ws.data(), at_counters));

    GradOp<T> grad;
    grad.mode = batch_stats ? GradMode::Train : GradMode::Eval;
    grad.mean = mean;
    grad.invstd = invstd;
    grad.weight = weight;
    grad.count = double(shape.count());
    grad.sum_dy = dbias;
    grad.sum_dy_xhat = dweight;
    grad.dy_mean = region<P>(ws.data(), at_dy_mean);
    grad.xmu_scale = region<P>(ws.data(), at_xmu_scale);
    grad.scale = region<P>(ws.data(), at_scale);
    launch_reduce(plan, x, dy, grad, stream);

    EwCoefs<P> k;
    k.scale = grad.scale;
    if (batch_stats) {
        k.center = mean;
        k.dy_mean = grad.dy_mean;
        k.xmu_scale = grad.xmu_scale;
        launch_elementwise<Ew::BackwardTrain>(dy, x, dx, shape, k, stream);
    } else {
        launch_elementwise<Ew::BackwardEval>(dy, static_cast<const T*>(nullptr), dx, shape, k, stream);
    }
}

#define BNORM_CUDA_INSTANTIATE_BACKWARD(T)                                                                  \
    template void backward_reduce<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,      \
                                     param_t<T>*, param_t<T>*, stream_t);                                   \
    template void backward_elemt<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,       \
                                    const param_t<T>*, const param_t<T>*, const param_t<T>*, double,       \
                                    const EpilogueGrad<T>&, T*, T*, stream_t);                              \
    template void backward<T>(const T*, const T*, Shape, const param_t<T>*, const param_t<T>*,             \
                              const param_t<T>*, bool, T*, param_t<T>*, param_t<T>*, stream_t);
BNORM_CUDA_INSTANTIATE_BACKWARD(float)
BNORM_CUDA_INSTANTIATE_BACKWARD(double)
BNORM_CUDA_INSTANTIATE_BACKWARD(half)
BNORM_CUDA_INSTANTIATE_BACKWARD(bfloat16)
#undef BNORM_CUDA_INSTANTIATE_BACKWARD

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm::cuda
