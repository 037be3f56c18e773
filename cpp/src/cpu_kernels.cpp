// CPU kernels: reductions and elementwise passes over the (outer, channels, inner) view.
//
// Two schedules cover every layout:
//  - planes (inner > 1, e.g. NCHW): a channel's values are `outer` runs of `inner`
//    contiguous elements. Tiles are pieces of those runs, so each tile streams
//    contiguous memory for a single channel.
//  - rows (inner == 1, e.g. NHWC or (N, C)): x is an (outer, channels) matrix. Tiles are
//    blocks of rows times a block of channels, vectorized along the channels.
// A tile holds about kTileElems values, so the two passes of the shifted two-pass
// statistics read it from L1/L2, not DRAM. Tile results are merged in double (Chan's
// formula) in tile order, and the tiles of a channel are split into a number of work items
// that depends only on the shape: the merge order, and therefore every bit of the result,
// is the same for any thread count.
//
// Training forward and backward are fused per channel in the planes schedule when there
// are at least as many channels as threads: a thread reduces one channel, then writes its
// output while the channel is still in its L2, so x (and dy) cross DRAM once. Large
// outputs are written with non-temporal stores (no read-for-ownership of the output).
// Work is handed out dynamically: on a shared machine a descheduled thread then delays a
// call by at most one work item (results do not depend on who computes what).
#include "cpu_kernels.hpp"

#ifndef BNORM_KERNEL_ISA
#define BNORM_KERNEL_ISA baseline  // CMake compiles this file once per instruction set
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#if defined(__SSE2__) && defined(__GNUC__)
#include <immintrin.h>
#define BNORM_SSE2 1
#else
#define BNORM_SSE2 0
#endif

#include "coefficients.hpp"
#include "half.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

using detail::load;
using detail::store;

constexpr int64_t kTileElems = 4096;        // planes tile: 16 KiB of float, both passes hit L1
constexpr int64_t kRowTileElems = 16384;    // rows tile: fewer per-channel merges, fits L2
constexpr int64_t kRowTileRows = 256;       // rows tile: float sums of at most 256 values
constexpr int64_t kChannelBlock = 1024;     // channels per rows-schedule tile (stack scratch)
constexpr int64_t kWorkItems = 64;          // partials per call, enough for 64 threads
constexpr int64_t kSerialBelow = 1 << 15;   // fewer elements than this: one thread is faster
constexpr int64_t kStreamBytes = 4 << 20;   // outputs larger than this skip the caches

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int team_size(Shape s, int threads) { return s.size() < kSerialBelow ? 1 : threads; }

// Partial statistics of one channel: count, mean and sum of squared deviations.
struct Moments {
    double n = 0, mean = 0, m2 = 0;
};

void merge(Moments& a, const Moments& b) {
    if (b.n == 0) return;
    if (a.n == 0) {
        a = b;
        return;
    }
    const double n = a.n + b.n;
    const double delta = b.mean - a.mean;
    a.mean += delta * (b.n / n);
    a.m2 += b.m2 + delta * delta * (a.n * (b.n / n));
    a.n = n;
}

// Sums of the backward reduction: sum(dy) and sum(dy * (x - mean)).
struct Sums {
    double dy = 0, dy_xmu = 0;
};

void merge(Sums& a, const Sums& b) {
    a.dy += b.dy;
    a.dy_xmu += b.dy_xmu;
}

// sum(d^2) - sum(d)^2 / n, the corrected second pass; clamped at 0 (NaN passes through).
double corrected_m2(double sum_sq, double sum, double n) {
    const double m2 = sum_sq - sum * sum / n;
    return m2 < 0 ? 0.0 : m2;
}

// The tiles of one channel in the planes schedule: tile t covers rows [r0, r1) and
// columns [i0, i1) of the (outer, inner) plane.
struct PlaneTiles {
    int64_t segments_per_row, rows_per_tile, count;

    explicit PlaneTiles(Shape s)
        : segments_per_row(ceil_div(s.inner, kTileElems)),
          rows_per_tile(segments_per_row > 1 ? 1 : std::max<int64_t>(1, kTileElems / s.inner)),
          count(segments_per_row > 1 ? s.outer * segments_per_row
                                     : ceil_div(s.outer, rows_per_tile)) {}

    struct Tile {
        int64_t r0, r1, i0, i1;
    };

    Tile tile(Shape s, int64_t t) const {
        if (segments_per_row > 1) {
            const int64_t i0 = (t % segments_per_row) * kTileElems;
            return {t / segments_per_row, t / segments_per_row + 1, i0,
                    std::min(s.inner, i0 + kTileElems)};
        }
        const int64_t r0 = t * rows_per_tile;
        return {r0, std::min(s.outer, r0 + rows_per_tile), 0, s.inner};
    }
};

// How the tiles of each channel (planes schedule) are split into work items: a function
// of the shape alone, so the merge order never depends on the thread count.
struct PlaneSplits {
    PlaneTiles tiles;
    int64_t splits;

    explicit PlaneSplits(Shape s)
        : tiles(s),
          splits(std::clamp<int64_t>(ceil_div(kWorkItems, std::max<int64_t>(s.channels, 1)), 1,
                                     std::max<int64_t>(tiles.count, 1))) {}

    // The merged partial of split `split` of channel c: its tiles merged in order.
    template <class Partial, class Op>
    Partial split_partial(Shape s, const Op& op, int64_t c, int64_t split) const {
        Partial acc{};
        for (int64_t t = split * tiles.count / splits; t < (split + 1) * tiles.count / splits; ++t)
            merge(acc, op.plane_tile(c, tiles.tile(s, t)));
        return acc;
    }

    // The merged partial of channel c, computed by one thread: its splits merged in order,
    // exactly as reduce() merges the same splits computed by several threads.
    template <class Partial, class Op>
    Partial channel_partial(Shape s, const Op& op, int64_t c) const {
        Partial total{};
        for (int64_t split = 0; split < splits; ++split) merge(total, split_partial<Partial>(s, op, c, split));
        return total;
    }
};

// The rows schedule's blocking: channel blocks of `width`, row tiles of `rows_per_tile`,
// and `splits` row ranges per channel block.
struct RowSplits {
    int64_t width, blocks, rows_per_tile, tiles, splits;

    explicit RowSplits(Shape s)
        : width(std::clamp<int64_t>(s.channels, 1, kChannelBlock)),
          blocks(ceil_div(s.channels, width)),
          rows_per_tile(std::clamp<int64_t>(kRowTileElems / width, 1, kRowTileRows)),
          tiles(ceil_div(s.outer, rows_per_tile)),
          splits(std::clamp<int64_t>(ceil_div(kWorkItems, blocks), 1, std::max<int64_t>(tiles, 1))) {}
};

// Runs op over every tile and writes one merged Partial per channel. Op provides
//   Partial plane_tile(c, PlaneTiles::Tile)                      (planes schedule)
//   void row_tile(c0, c1, r0, r1, Partial* acc)  merging into acc[c - c0]  (rows schedule)
template <class Partial, class Op>
void reduce(Shape s, int threads, const Op& op, std::vector<Partial>& result) {
    const int64_t C = s.channels;
    result.assign(C, Partial{});
    const int team = team_size(s, threads);
    if (s.inner > 1) {
        const PlaneSplits plan(s);
        const int64_t splits = plan.splits;
        std::vector<Partial> part(C * splits);
#pragma omp parallel for num_threads(team) schedule(dynamic)
        for (int64_t item = 0; item < C * splits; ++item)
            part[item] = plan.split_partial<Partial>(s, op, item / splits, item % splits);
        for (int64_t c = 0; c < C; ++c)
            for (int64_t split = 0; split < splits; ++split) merge(result[c], part[c * splits + split]);
    } else {
        const RowSplits plan(s);
        std::vector<Partial> part(plan.splits * C);
#pragma omp parallel for num_threads(team) schedule(dynamic)
        for (int64_t item = 0; item < plan.blocks * plan.splits; ++item) {
            const int64_t block = item / plan.splits, split = item % plan.splits;
            const int64_t c0 = block * plan.width, c1 = std::min(C, c0 + plan.width);
            for (int64_t t = split * plan.tiles / plan.splits; t < (split + 1) * plan.tiles / plan.splits; ++t) {
                const int64_t r0 = t * plan.rows_per_tile;
                op.row_tile(c0, c1, r0, std::min(s.outer, r0 + plan.rows_per_tile), &part[split * C + c0]);
            }
        }
        for (int64_t split = 0; split < plan.splits; ++split)
            for (int64_t c = 0; c < C; ++c) merge(result[c], part[split * C + c]);
    }
}

// Whether the fused per-channel schedule applies: planes, and a channel for every thread.
bool fuse_per_channel(Shape s, int team) { return s.inner > 1 && s.channels >= team; }

// Shifted two-pass statistics of a tile. Pass 1 sums x - K with K the tile's first value
// (exact for constant data, and no overflow for any finite float); pass 2 sums the
// deviations from that mean and their squares, and corrects the mean with the first.
template <class T>
struct MomentsOp {
    using A = param_t<T>;
    const T* x;
    Shape s;

    Moments plane_tile(int64_t c, PlaneTiles::Tile t) const {
        const int64_t stride = s.channels * s.inner, len = t.i1 - t.i0;
        const T* base = x + c * s.inner + t.i0;
        const A shift = load(base + t.r0 * stride);
        A sum = 0;
        for (int64_t r = t.r0; r < t.r1; ++r) {
            const T* p = base + r * stride;
#pragma omp simd reduction(+ : sum)
            for (int64_t i = 0; i < len; ++i) sum += load(p + i) - shift;
        }
        const double n = double((t.r1 - t.r0) * len);
        const A mean1 = shift + A(sum / A(n));
        A dev = 0, dev_sq = 0;
        for (int64_t r = t.r0; r < t.r1; ++r) {
            const T* p = base + r * stride;
#pragma omp simd reduction(+ : dev, dev_sq)
            for (int64_t i = 0; i < len; ++i) {
                const A d = load(p + i) - mean1;
                dev += d;
                dev_sq += d * d;
            }
        }
        return {n, double(mean1) + double(dev) / n, corrected_m2(dev_sq, dev, n)};
    }

    void row_tile(int64_t c0, int64_t c1, int64_t r0, int64_t r1, Moments* acc) const {
        const int64_t w = c1 - c0, C = s.channels;
        A shift[kChannelBlock], sum[kChannelBlock], dev[kChannelBlock], dev_sq[kChannelBlock];
        const double n = double(r1 - r0);
        for (int64_t j = 0; j < w; ++j) {
            shift[j] = load(x + r0 * C + c0 + j);
            sum[j] = dev[j] = dev_sq[j] = 0;
        }
        for (int64_t r = r0; r < r1; ++r) {
            const T* p = x + r * C + c0;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) sum[j] += load(p + j) - shift[j];
        }
        for (int64_t j = 0; j < w; ++j) shift[j] += A(sum[j] / A(n));  // now the pass-1 mean
        for (int64_t r = r0; r < r1; ++r) {
            const T* p = x + r * C + c0;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
                const A d = load(p + j) - shift[j];
                dev[j] += d;
                dev_sq[j] += d * d;
            }
        }
        for (int64_t j = 0; j < w; ++j)
            merge(acc[j], Moments{n, double(shift[j]) + double(dev[j]) / n,
                                  corrected_m2(dev_sq[j], dev[j], n)});
    }
};

template <class T>
struct BackwardSumsOp {
    using A = param_t<T>;
    const T* dy;
    const T* x;
    const A* mean;
    Shape s;

    Sums plane_tile(int64_t c, PlaneTiles::Tile t) const {
        const int64_t stride = s.channels * s.inner, len = t.i1 - t.i0;
        const int64_t offset = c * s.inner + t.i0;
        const A m = mean[c];
        A sum_dy = 0, sum_dy_xmu = 0;
        for (int64_t r = t.r0; r < t.r1; ++r) {
            const T* g = dy + offset + r * stride;
            const T* p = x + offset + r * stride;
#pragma omp simd reduction(+ : sum_dy, sum_dy_xmu)
            for (int64_t i = 0; i < len; ++i) {
                const A d = load(g + i);
                sum_dy += d;
                sum_dy_xmu += d * (load(p + i) - m);
            }
        }
        return {double(sum_dy), double(sum_dy_xmu)};
    }

    void row_tile(int64_t c0, int64_t c1, int64_t r0, int64_t r1, Sums* acc) const {
        const int64_t w = c1 - c0, C = s.channels;
        A sum_dy[kChannelBlock], sum_dy_xmu[kChannelBlock];
        for (int64_t j = 0; j < w; ++j) sum_dy[j] = sum_dy_xmu[j] = 0;
        for (int64_t r = r0; r < r1; ++r) {
            const T* g = dy + r * C + c0;
            const T* p = x + r * C + c0;
#pragma omp simd
            for (int64_t j = 0; j < w; ++j) {
                const A d = load(g + j);
                sum_dy[j] += d;
                sum_dy_xmu[j] += d * (load(p + j) - mean[c0 + j]);
            }
        }
        for (int64_t j = 0; j < w; ++j) merge(acc[j], Sums{double(sum_dy[j]), double(sum_dy_xmu[j])});
    }
};

#if BNORM_SSE2
// The widest registers of float and double this build may use (GCC and Clang give them
// arithmetic operators). Used for the non-temporal stores, which need aligned vectors.
template <class T> struct Vec;
#if defined(__AVX512F__)
template <> struct Vec<float> {
    using R = __m512;
    static constexpr int64_t width = 16;
    static R load(const float* p) { return _mm512_loadu_ps(p); }
    static R set(float v) { return _mm512_set1_ps(v); }
    static void stream(float* p, R v) { _mm512_stream_ps(p, v); }
};
template <> struct Vec<double> {
    using R = __m512d;
    static constexpr int64_t width = 8;
    static R load(const double* p) { return _mm512_loadu_pd(p); }
    static R set(double v) { return _mm512_set1_pd(v); }
    static void stream(double* p, R v) { _mm512_stream_pd(p, v); }
};
#elif defined(__AVX__)
template <> struct Vec<float> {
    using R = __m256;
    static constexpr int64_t width = 8;
    static R load(const float* p) { return _mm256_loadu_ps(p); }
    static R set(float v) { return _mm256_set1_ps(v); }
    static void stream(float* p, R v) { _mm256_stream_ps(p, v); }
};
template <> struct Vec<double> {
    using R = __m256d;
    static constexpr int64_t width = 4;
    static R load(const double* p) { return _mm256_loadu_pd(p); }
    static R set(double v) { return _mm256_set1_pd(v); }
    static void stream(double* p, R v) { _mm256_stream_pd(p, v); }
};
#else
template <> struct Vec<float> {
    using R = __m128;
    static constexpr int64_t width = 4;
    static R load(const float* p) { return _mm_loadu_ps(p); }
    static R set(float v) { return _mm_set1_ps(v); }
    static void stream(float* p, R v) { _mm_stream_ps(p, v); }
};
template <> struct Vec<double> {
    using R = __m128d;
    static constexpr int64_t width = 2;
    static R load(const double* p) { return _mm_loadu_pd(p); }
    static R set(double v) { return _mm_set1_pd(v); }
    static void stream(double* p, R v) { _mm_stream_pd(p, v); }
};
#endif
#else
template <class T> struct Vec {};
#endif

// Vec<T>, named through the index type of a generic lambda so that the vector code of
// types without one (half) is never instantiated.
template <class T, class Index> struct VecFor {
    using type = Vec<T>;
};

// out[i] = scalar(i) for i < n. With `stream` (float, double on x86), whole aligned vectors
// are computed by vector(i) and written with non-temporal stores; both compute the same
// IEEE operations in the same order, so the bits do not depend on the path.
template <class T, class Scalar, class Vector>
inline void write_run(T* out, int64_t n, bool stream, const Scalar& scalar, const Vector& vector) {
    int64_t i = 0;
#if BNORM_SSE2
    if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
        if (stream) {
            constexpr uintptr_t alignment = sizeof(typename Vec<T>::R);
            for (; i < n && reinterpret_cast<uintptr_t>(out + i) % alignment != 0; ++i) store(out + i, scalar(i));
            for (; i + Vec<T>::width <= n; i += Vec<T>::width) Vec<T>::stream(out + i, vector(i));
        }
    }
#else
    (void)stream;
    (void)vector;
#endif
#pragma omp simd
    for (int64_t j = i; j < n; ++j) store(out + j, scalar(j));
}

// Non-temporal stores are weakly ordered: fence before the results are used elsewhere.
inline void stream_fence(bool stream) {
#if BNORM_SSE2
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
}

// Rows handed out at a time by the elementwise loops: about kTileElems elements.
int64_t rows_per_chunk(int64_t row_length) { return std::max<int64_t>(1, kTileElems / std::max<int64_t>(row_length, 1)); }

template <class T>
bool streams(Shape s) {
    return s.size() * int64_t(sizeof(T)) >= kStreamBytes;
}

// y = ((x - center) - lo) * scale + shift over one run of a single channel.
template <class T>
void affine_run(const T* x, T* y, int64_t n, const detail::Affine<param_t<T>>& k, bool stream) {
    write_run(
        y, n, stream, [&](int64_t i) { return ((load(x + i) - k.center) - k.center_lo) * k.scale + k.shift; },
        [&](auto i) {
            using V = typename VecFor<T, decltype(i)>::type;
            return ((V::load(x + i) - V::set(k.center)) - V::set(k.center_lo)) * V::set(k.scale) + V::set(k.shift);
        });
}

// The same over one row of the rows schedule, coefficients varying along it.
template <class T>
void affine_row(const T* x, T* y, int64_t n, const param_t<T>* center, const param_t<T>* lo,
                const param_t<T>* scale, const param_t<T>* shift, bool stream) {
    write_run(
        y, n, stream, [&](int64_t c) { return ((load(x + c) - center[c]) - lo[c]) * scale[c] + shift[c]; },
        [&](auto c) {
            using V = typename VecFor<T, decltype(c)>::type;
            return ((V::load(x + c) - V::load(center + c)) - V::load(lo + c)) * V::load(scale + c) +
                   V::load(shift + c);
        });
}

// dx = (dy - dy_mean - (x - mean) * xmu_scale) * scale over one run of a single channel.
template <class T>
void backward_run(const T* dy, const T* x, T* dx, int64_t n, param_t<T> mean,
                  const detail::BackwardCoefficients<param_t<T>>& k, bool stream) {
    write_run(
        dx, n, stream,
        [&](int64_t i) { return (load(dy + i) - k.dy_mean - (load(x + i) - mean) * k.xmu_scale) * k.scale; },
        [&](auto i) {
            using V = typename VecFor<T, decltype(i)>::type;
            return (V::load(dy + i) - V::set(k.dy_mean) - (V::load(x + i) - V::set(mean)) * V::set(k.xmu_scale)) *
                   V::set(k.scale);
        });
}

template <class T>
void backward_row(const T* dy, const T* x, T* dx, int64_t n, const param_t<T>* mean, const param_t<T>* dy_mean,
                  const param_t<T>* xmu_scale, const param_t<T>* scale, bool stream) {
    write_run(
        dx, n, stream,
        [&](int64_t c) { return (load(dy + c) - dy_mean[c] - (load(x + c) - mean[c]) * xmu_scale[c]) * scale[c]; },
        [&](auto c) {
            using V = typename VecFor<T, decltype(c)>::type;
            return (V::load(dy + c) - V::load(dy_mean + c) - (V::load(x + c) - V::load(mean + c)) * V::load(xmu_scale + c)) *
                   V::load(scale + c);
        });
}

}  // namespace

template <class T>
void moments(const T* x, Shape shape, int threads, double* mean, double* var) {
    std::vector<Moments> result;
    reduce(shape, threads, MomentsOp<T>{x, shape}, result);
    for (int64_t c = 0; c < shape.channels; ++c) {
        mean[c] = result[c].mean;
        var[c] = result[c].n > 0 ? result[c].m2 / result[c].n : 0.0;
    }
}

template <class T>
void affine(const T* x, Shape s, int threads, const param_t<T>* center, const param_t<T>* center_lo,
            const param_t<T>* scale, const param_t<T>* shift, T* y) {
    const int team = team_size(s, threads);
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    if (s.inner > 1) {
#pragma omp parallel for num_threads(team) schedule(dynamic, rows_per_chunk(s.inner))
        for (int64_t row = 0; row < s.outer * C; ++row) {
            const int64_t c = row % C;
            affine_run(x + row * s.inner, y + row * s.inner, s.inner, {center[c], center_lo[c], scale[c], shift[c]},
                       stream);
        }
    } else {
#pragma omp parallel for num_threads(team) schedule(dynamic, rows_per_chunk(C))
        for (int64_t r = 0; r < s.outer; ++r)
            affine_row(x + r * C, y + r * C, C, center, center_lo, scale, shift, stream);
    }
    stream_fence(stream);
}

template <class T>
void forward_train(const T* x, Shape s, int threads, double eps, const param_t<T>* weight, const param_t<T>* bias,
                   T* y, double* mean, double* var) {
    using P = param_t<T>;
    const int team = team_size(s, threads);
    if (!fuse_per_channel(s, team)) {
        moments(x, s, threads, mean, var);
        std::vector<P> center(s.channels), lo(s.channels), scale(s.channels), shift(s.channels);
        for (int64_t c = 0; c < s.channels; ++c) {
            const auto k = detail::train_affine(mean[c], var[c], eps, weight, bias, c);
            center[c] = k.center, lo[c] = k.center_lo, scale[c] = k.scale, shift[c] = k.shift;
        }
        affine(x, s, threads, center.data(), lo.data(), scale.data(), shift.data(), y);
        return;
    }
    const PlaneSplits plan(s);
    const MomentsOp<T> op{x, s};
    const bool stream = streams<T>(s);
    const int64_t stride = s.channels * s.inner;
#pragma omp parallel for num_threads(team) schedule(dynamic)
    for (int64_t c = 0; c < s.channels; ++c) {
        const Moments m = plan.channel_partial<Moments>(s, op, c);
        mean[c] = m.mean;
        var[c] = m.n > 0 ? m.m2 / m.n : 0.0;
        const auto k = detail::train_affine(mean[c], var[c], eps, weight, bias, c);
        for (int64_t o = 0; o < s.outer; ++o)
            affine_run(x + o * stride + c * s.inner, y + o * stride + c * s.inner, s.inner, k, stream);
    }
    stream_fence(stream);
}

template <class T>
void backward_sums(const T* dy, const T* x, Shape shape, int threads, const param_t<T>* mean,
                   double* sum_dy, double* sum_dy_xmu) {
    std::vector<Sums> result;
    reduce(shape, threads, BackwardSumsOp<T>{dy, x, mean, shape}, result);
    for (int64_t c = 0; c < shape.channels; ++c) {
        sum_dy[c] = result[c].dy;
        sum_dy_xmu[c] = result[c].dy_xmu;
    }
}

template <class T>
void backward_dx(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* dy_mean,
                 const param_t<T>* xmu_scale, const param_t<T>* scale, T* dx) {
    const int team = team_size(s, threads);
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    if (s.inner > 1) {
#pragma omp parallel for num_threads(team) schedule(dynamic, rows_per_chunk(s.inner))
        for (int64_t row = 0; row < s.outer * C; ++row) {
            const int64_t c = row % C, offset = row * s.inner;
            backward_run(dy + offset, x + offset, dx + offset, s.inner, mean[c], {dy_mean[c], xmu_scale[c], scale[c]},
                         stream);
        }
    } else {
#pragma omp parallel for num_threads(team) schedule(dynamic, rows_per_chunk(C))
        for (int64_t r = 0; r < s.outer; ++r)
            backward_row(dy + r * C, x + r * C, dx + r * C, C, mean, dy_mean, xmu_scale, scale, stream);
    }
    stream_fence(stream);
}

template <class T>
void backward_train(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* invstd,
                    const param_t<T>* weight, T* dx, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat) {
    using P = param_t<T>;
    const int team = team_size(s, threads);
    const double count = double(s.count());
    if (!fuse_per_channel(s, team)) {
        std::vector<double> s_dy(s.channels), s_dy_xmu(s.channels);
        backward_sums(dy, x, s, threads, mean, s_dy.data(), s_dy_xmu.data());
        std::vector<P> dy_mean(s.channels), xmu_scale(s.channels), scale(s.channels);
        for (int64_t c = 0; c < s.channels; ++c) {
            detail::round_backward_sums(s_dy[c], s_dy_xmu[c], invstd[c], sum_dy[c], sum_dy_xhat[c]);
            const auto k = detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count);
            dy_mean[c] = k.dy_mean, xmu_scale[c] = k.xmu_scale, scale[c] = k.scale;
        }
        backward_dx(dy, x, s, threads, mean, dy_mean.data(), xmu_scale.data(), scale.data(), dx);
        return;
    }
    const PlaneSplits plan(s);
    const BackwardSumsOp<T> op{dy, x, mean, s};
    const bool stream = streams<T>(s);
    const int64_t stride = s.channels * s.inner;
#pragma omp parallel for num_threads(team) schedule(dynamic)
    for (int64_t c = 0; c < s.channels; ++c) {
        const Sums sums = plan.channel_partial<Sums>(s, op, c);
        detail::round_backward_sums(sums.dy, sums.dy_xmu, invstd[c], sum_dy[c], sum_dy_xhat[c]);
        const auto k = detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count);
        for (int64_t o = 0; o < s.outer; ++o) {
            const int64_t offset = o * stride + c * s.inner;
            backward_run(dy + offset, x + offset, dx + offset, s.inner, mean[c], k, stream);
        }
    }
    stream_fence(stream);
}

#define BNORM_INSTANTIATE(T)                                                                  \
    template void moments<T>(const T*, Shape, int, double*, double*);                         \
    template void affine<T>(const T*, Shape, int, const param_t<T>*, const param_t<T>*,       \
                            const param_t<T>*, const param_t<T>*, T*);                        \
    template void backward_sums<T>(const T*, const T*, Shape, int, const param_t<T>*, double*, \
                                   double*);                                                  \
    template void backward_dx<T>(const T*, const T*, Shape, int, const param_t<T>*,           \
                                 const param_t<T>*, const param_t<T>*, const param_t<T>*, T*); \
    template void forward_train<T>(const T*, Shape, int, double, const param_t<T>*,           \
                                   const param_t<T>*, T*, double*, double*);                  \
    template void backward_train<T>(const T*, const T*, Shape, int, const param_t<T>*,        \
                                    const param_t<T>*, const param_t<T>*, T*, param_t<T>*,    \
                                    param_t<T>*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
BNORM_INSTANTIATE(half)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
