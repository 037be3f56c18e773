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
#include "cpu_kernels.hpp"

#include <algorithm>
#include <vector>

#include "half.hpp"

namespace bnorm::kernels {
namespace {

using detail::load;
using detail::store;

constexpr int64_t kTileElems = 4096;      // 16 KiB of float per tile: both passes hit L1
constexpr int64_t kChannelBlock = 1024;   // channels per rows-schedule tile (stack scratch)
constexpr int64_t kWorkItems = 64;        // partials per call, enough for 64 threads
constexpr int64_t kSerialBelow = 1 << 15; // fewer elements than this: one thread is faster

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

// Runs op over every tile and writes one merged Partial per channel. Op provides
//   Partial plane_tile(c, PlaneTiles::Tile)                      (planes schedule)
//   void row_tile(c0, c1, r0, r1, Partial* acc)  merging into acc[c - c0]  (rows schedule)
template <class Partial, class Op>
void reduce(Shape s, int threads, const Op& op, std::vector<Partial>& result) {
    const int64_t C = s.channels;
    result.assign(C, Partial{});
    const int team = team_size(s, threads);
    if (s.inner > 1) {
        const PlaneTiles tiles(s);
        const int64_t splits = std::clamp<int64_t>(ceil_div(kWorkItems, C), 1,
                                                   std::max<int64_t>(tiles.count, 1));
        std::vector<Partial> part(C * splits);
#pragma omp parallel for num_threads(team) schedule(static)
        for (int64_t item = 0; item < C * splits; ++item) {
            const int64_t c = item / splits, split = item % splits;
            const int64_t t0 = split * tiles.count / splits;
            const int64_t t1 = (split + 1) * tiles.count / splits;
            Partial acc{};
            for (int64_t t = t0; t < t1; ++t) merge(acc, op.plane_tile(c, tiles.tile(s, t)));
            part[item] = acc;
        }
        for (int64_t c = 0; c < C; ++c)
            for (int64_t split = 0; split < splits; ++split)
                merge(result[c], part[c * splits + split]);
    } else {
        const int64_t width = std::min(C, kChannelBlock);
        const int64_t blocks = ceil_div(C, width);
        const int64_t rows_per_tile = std::max<int64_t>(1, kTileElems / width);
        const int64_t tiles = ceil_div(s.outer, rows_per_tile);
        const int64_t splits = std::clamp<int64_t>(ceil_div(kWorkItems, blocks), 1,
                                                   std::max<int64_t>(tiles, 1));
        std::vector<Partial> part(splits * C);
#pragma omp parallel for num_threads(team) schedule(static)
        for (int64_t item = 0; item < blocks * splits; ++item) {
            const int64_t block = item / splits, split = item % splits;
            const int64_t c0 = block * width, c1 = std::min(C, c0 + width);
            for (int64_t t = split * tiles / splits; t < (split + 1) * tiles / splits; ++t) {
                const int64_t r0 = t * rows_per_tile;
                op.row_tile(c0, c1, r0, std::min(s.outer, r0 + rows_per_tile),
                            &part[split * C + c0]);
            }
        }
        for (int64_t split = 0; split < splits; ++split)
            for (int64_t c = 0; c < C; ++c) merge(result[c], part[split * C + c]);
    }
}

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

// Calls op(c, i) for every element i (flat index) of channel c, in parallel.
template <class Op>
void for_each_element(Shape s, int threads, const Op& op) {
    const int team = team_size(s, threads);
    const int64_t C = s.channels;
    if (s.inner > 1) {
#pragma omp parallel for num_threads(team) schedule(static)
        for (int64_t row = 0; row < s.outer * C; ++row) {
            const int64_t c = row % C, begin = row * s.inner;
#pragma omp simd
            for (int64_t i = begin; i < begin + s.inner; ++i) op(c, i);
        }
    } else {
#pragma omp parallel for num_threads(team) schedule(static)
        for (int64_t r = 0; r < s.outer; ++r) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) op(c, r * C + c);
        }
    }
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
void affine(const T* x, Shape shape, int threads, const param_t<T>* center,
            const param_t<T>* center_lo, const param_t<T>* scale, const param_t<T>* shift, T* y) {
    for_each_element(shape, threads, [=](int64_t c, int64_t i) {
        store(y + i, ((load(x + i) - center[c]) - center_lo[c]) * scale[c] + shift[c]);
    });
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
void backward_dx(const T* dy, const T* x, Shape shape, int threads, const param_t<T>* mean,
                 const param_t<T>* dy_mean, const param_t<T>* xmu_scale,
                 const param_t<T>* scale, T* dx) {
    for_each_element(shape, threads, [=](int64_t c, int64_t i) {
        store(dx + i, (load(dy + i) - dy_mean[c] - (load(x + i) - mean[c]) * xmu_scale[c]) * scale[c]);
    });
}

#define BNORM_INSTANTIATE(T)                                                                  \
    template void moments<T>(const T*, Shape, int, double*, double*);                         \
    template void affine<T>(const T*, Shape, int, const param_t<T>*, const param_t<T>*,       \
                            const param_t<T>*, const param_t<T>*, T*);                        \
    template void backward_sums<T>(const T*, const T*, Shape, int, const param_t<T>*, double*, \
                                   double*);                                                  \
    template void backward_dx<T>(const T*, const T*, Shape, int, const param_t<T>*,           \
                                 const param_t<T>*, const param_t<T>*, const param_t<T>*, T*);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
BNORM_INSTANTIATE(half)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::kernels
