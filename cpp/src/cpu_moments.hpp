// The statistics' tile op (MomentsOp, for reduce() and the fused schedules) and the
// training coefficients: shared by moments (cpu_statistics.cpp) and forward_train
// (cpu_forward.cpp), compiled per instruction set.
#pragma once

#include "coefficients.hpp"
#include "cpu_reduce.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

// Shifted two-pass statistics of a tile. Pass 1 sums x - K with K the tile's first value
// (exact for constant data, and no overflow for any finite float); pass 2 sums the
// deviations from that mean and their squares, and corrects the mean with the first.
template <class T>
struct MomentsOp {
    using A = param_t<T>;
    using Partial = Moments;
    using Work = RowWork<A, Moments>;
    const T* x;
    Shape s;

    BNORM_FLATTEN Moments plane_tile(int64_t c, PlaneTiles::Tile t) const {
        const int64_t stride = s.channels * s.inner, len = t.i1 - t.i0, rows = t.r1 - t.r0;
        const T* base = x + c * s.inner + t.i0 + t.r0 * stride;
        const A shift = load(base);
        const A sum = chained_sums<T>(rows, stride, len, [&](auto lanes, int64_t k, auto& a, auto&) {
            using L = decltype(lanes);
            a += L::load(base + k) - L::set(shift);
        }).a;
        const double n = double(rows * len);
        const A mean1 = shift + A(sum / A(n));
        prefetch_next_tile(x, s, c, t);
        const Pair<A> dev = chained_sums<T>(rows, stride, len, [&](auto lanes, int64_t k, auto& a, auto& b) {
            using L = decltype(lanes);
            const auto d = L::load(base + k) - L::set(mean1);
            a += d;
            b += d * d;
        });
        const double dev_mean = double(dev.a) / n;
        return {n, double(mean1) + dev_mean, corrected_m2(dev.b, dev.a, dev_mean)};
    }

    BNORM_FLATTEN void row_tile(int64_t c0, int64_t c1, int64_t r0, int64_t r1, Moments* acc) const {
        const int64_t w = c1 - c0, C = s.channels;
        A shift[kChannelBlock], sum[kChannelBlock], dev[kChannelBlock], dev_sq[kChannelBlock];
        // (multiplications by 1 / n: with short planes' few rows, the divisions per column,
        // with the empty-column merge below and the fold's one chain, took (8, 2048, 7, 7)'s
        // statistics to 1.35x the time they take now, one thread)
        const double n = double(r1 - r0), inv_n = 1 / n;
        for (int64_t j = 0; j < w; ++j) {
            shift[j] = load(x + r0 * C + c0 + j);
            sum[j] = dev[j] = dev_sq[j] = 0;
        }
        // (pass 1 reads the tile from memory, or from L2 where the tile before asked for it
        // (prefetches_next_row_tile); pass 2 finds it in L2, where groups pay)
        const auto pass1 = [&](auto lanes, auto acc_lanes, auto group, int64_t r, int64_t j) {
            using L = decltype(lanes);
            using P = decltype(acc_lanes);
            const auto k0 = P::load(shift + j);
            const T* p = x + r * C + c0 + j;
            P::store(sum + j, P::load(sum + j) + rows_sum<group()>([&](int64_t k) { return L::load(p + k * C) - k0; }));
        };
        // (x from memory in segments a row apart: the next rows asked for ahead, see
        // prefetches_rows; statistics of (64, 2048, 7, 7) 0.91-0.96x the time, 1 and 2
        // threads, (256, 2048, 7, 7) and (64, 7, 7, 2048) 0.88-1.01x)
        const bool grouped = grouped_rows<T>(s, 1);
        if (prefetches_rows<T>(s, w)) {
            const auto next_rows = [&](int64_t g0, int64_t g1) {
                for (int64_t r = g1; r < std::min(r1, g1 + (g1 - g0)); ++r)
                    prefetch_range(x + r * C + c0, w * int64_t(sizeof(T)));
            };
            for_row_chunks<T>(r0, r1, kSumRows, w, grouped, next_rows, pass1, kNoChunkHook);
        } else {
            for_row_lanes<T>(r0, r1, w, grouped, pass1);
        }
        for (int64_t j = 0; j < w; ++j) shift[j] += sum[j] * A(inv_n);  // now the pass-1 mean
        // (pass 2 reads the tile from L2, where memory would idle: see
        // prefetches_next_row_tile)
        const int64_t rows = r1 - r0;
        const auto pass2 = [&](auto next_tile) {
            for_row_lanes<T>(r0, r1, w, true, [&](auto lanes, auto acc_lanes, auto group, int64_t r, int64_t j) {
                using L = decltype(lanes);
                using P = decltype(acc_lanes);
                const auto m = P::load(shift + j);
                const T* p = x + r * C + c0 + j;
                if constexpr (std::decay_t<decltype(next_tile)>::value && L::width > 1)
                    for (int64_t k = 0; k < group(); ++k) prefetch_range(p + (rows + k) * C, 1);
                // Both sums before either store, so that each x is loaded once per group.
                const auto d = rows_sum<group()>([&](int64_t k) { return L::load(p + k * C) - m; });
                const auto d2 = rows_sum<group()>([&](int64_t k) {
                    const auto dk = L::load(p + k * C) - m;
                    return dk * dk;
                });
                P::store(dev + j, P::load(dev + j) + d);
                P::store(dev_sq + j, P::load(dev_sq + j) + d2);
            });
        };
        if (prefetches_next_row_tile<T>(s) && r1 + rows <= s.outer)
            pass2(std::true_type{});
        else
            pass2(std::false_type{});
        double tile_mean[kChannelBlock], tile_m2[kChannelBlock];
        for (int64_t j = 0; j < w; ++j) {
            const double dev_mean = double(dev[j]) * inv_n;
            tile_mean[j] = double(shift[j]) + dev_mean;
            tile_m2[j] = corrected_m2(dev_sq[j], dev[j], dev_mean);
        }
        // Every column of acc has seen the same tiles: the first tile is stored as it is
        // (what merge_columns gives an empty column, without its division).
        if (w > 0 && acc[0].n > 0) {
            merge_columns(acc, w, n, tile_mean, tile_m2);
        } else {
            for (int64_t j = 0; j < w; ++j) acc[j] = {n, tile_mean[j], tile_m2[j]};
        }
    }
};

inline void store(const Moments& m, double& mean, double& var) {
    mean = m.mean;
    var = m.n > 0 ? m.m2 / m.n : 0.0;
}

// invstd[c] of the channels [c0, c1) from their variances, and their training affine
// coefficients at index c - c0 (the whole-tensor and the strip paths: the same bits).
template <class P>
void train_coefficients(int64_t c0, int64_t c1, const double* mean, const double* var, double eps, const P* weight,
                        const P* bias, P* __restrict invstd, P* __restrict center, P* __restrict lo,
                        P* __restrict scale, P* __restrict shift) {
    // Loops of their own, so that the square roots and divisions vectorize.
    for (int64_t c = c0; c < c1; ++c) invstd[c] = detail::invstd_of<P>(var[c], eps);
    for (int64_t c = c0; c < c1; ++c) {
        const auto k = detail::train_affine(mean[c], invstd[c], weight, bias, c);
        center[c - c0] = k.center, lo[c - c0] = k.center_lo, scale[c - c0] = k.scale, shift[c - c0] = k.shift;
    }
}

}  // namespace
}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
