// bnorm CUDA backend: merge_stats, Chan's combination of per-shard statistics.
//
// One thread per channel walks the parts in order (p = 0, 1, ...) in double, exactly as the
// CPU backend does; the (parts, channels) row-major inputs make every step of a warp one
// coalesced load. The parts count is small in practice (shards, processes, machines), so a
// sequential merge per channel is both the simplest and the fastest choice.
//
// The CPU backend rejects negative or non-finite counts with ValueError; here the counts are
// on the device and checking them would need a host synchronization, so a channel with such
// a count gets NaN count, mean and var instead.
#include "common.hpp"

namespace bnorm::cuda {
namespace detail {
namespace {

template <class P>
__global__ void __launch_bounds__(kThreads)
merge_stats_kernel(int64_t parts, int64_t channels, const double* counts, const P* means,
                   const P* vars, double* count, P* mean, P* var) {
    const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (c >= channels) return;
    double n = 0, m = 0, m2 = 0;
    bool bad = false;
    for (int64_t p = 0; p < parts; ++p) {
        const int64_t i = p * channels + c;
        const double nb = counts[i];
        if (!(nb >= 0) || isinf(nb)) {
            bad = true;
            continue;
        }
        if (nb == 0) continue;
        if (vars[i] < P(0)) {  // a negative variance: NaN as for a bad count (the CPU raises)
            bad = true;
            continue;
        }
        const double mb = double(means[i]);
        const double m2b = double(vars[i]) * nb;
        const double total = n + nb;
        const double delta = mb - m;
        if (n == 0) {  // no delta * delta * 0 (inf * 0 for a huge first mean)
            m = mb;
            m2 = m2b;
        } else {
            m += delta * (nb / total);
            m2 += m2b + delta * delta * (n * (nb / total));
        }
        n = total;
    }
    if (bad) {
        const double nan = __longlong_as_double(0x7ff8000000000000LL);
        count[c] = nan;
        mean[c] = P(nan);
        var[c] = P(nan);
        return;
    }
    count[c] = n;
    mean[c] = P(m);
    var[c] = P(n > 0 ? m2 / n : 0.0);
}

}  // namespace
}  // namespace detail

// The public API (bnorm/cuda.hpp), exported from a shared libbnorm (see cpu_api.cpp).
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

template <class P>
void merge_stats(int64_t parts, int64_t channels, const double* counts, const P* means, const P* vars,
                 double* count, P* mean, P* var, stream_t stream) {
    using namespace detail;
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
    if (ceil_div(channels, kThreads) > INT32_MAX) throw ValueError("bnorm: merge_stats: too many channels");
    merge_stats_kernel<P><<<dim3(unsigned(ceil_div(channels, kThreads))), kThreads, 0, stream>>>(
        parts, channels, counts, means, vars, count, mean, var);
    BNORM_LAUNCH_CHECK("merge_stats_kernel");
}

template void merge_stats<float>(int64_t, int64_t, const double*, const float*, const float*, double*,
                                 float*, float*, stream_t);
template void merge_stats<double>(int64_t, int64_t, const double*, const double*, const double*, double*,
                                  double*, double*, stream_t);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm::cuda
