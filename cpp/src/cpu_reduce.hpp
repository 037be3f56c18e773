// The CPU kernels' shared machinery, part 2: the reductions. Partials (Moments, Sums) and
// their merges, the tiles of the planes and rows schedules, how their tiles are split into
// work items (a function of the shape alone), reduce(), and the inner loops that sum a
// tile (chained_sums, for_row_lanes). See cpu_passes.hpp for the design.
#pragma once

#include <cassert>

#include "cpu_passes.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

// Partial statistics of one channel: count, mean and sum of squared deviations.
struct Moments {
    double n = 0, mean = 0, m2 = 0;
};

// Chan's merge of {n, mean[j], m2[j]} (n > 0) into acc[j] for j < w (an empty acc[j] takes
// them as they are), written without branches so that it vectorizes: a rows tile ends with
// one merge per column, and as scalar code with divisions they took a quarter of the
// statistics' time on (8192, 1024). merge() is its one-column case.
inline void merge_columns(Moments* acc, int64_t w, double n, const double* mean, const double* m2) {
    for (int64_t j = 0; j < w; ++j) {
        Moments& a = acc[j];
        const bool empty = a.n == 0;
        const double total = a.n + n, f = n / total, delta = mean[j] - a.mean;
        const double merged_mean = a.mean + delta * f;
        const double merged_m2 = a.m2 + (m2[j] + delta * delta * (a.n * f));
        a.mean = empty ? mean[j] : merged_mean;
        a.m2 = empty ? m2[j] : merged_m2;
        a.n = total;
    }
}

inline void merge(Moments& a, const Moments& b) {
    if (b.n > 0) merge_columns(&a, 1, b.n, &b.mean, &b.m2);
}

// Sums of the backward reduction: sum(dy) and sum(dy * (x - mean)).
struct Sums {
    double dy = 0, dy_xmu = 0;
};

inline void merge(Sums& a, const Sums& b) {
    a.dy += b.dy;
    a.dy_xmu += b.dy_xmu;
}

// A thread's arrays in the strips schedule: a strip's partials and coefficients (A: the
// accumulation type). On the stack, with a rows tile's accumulators below them, they took
// up to ~150 KiB, more than a thread may have (musl's default is 128 KiB), so every call
// takes one per thread from the scratch cache before its parallel loop. (The tile's own
// accumulators, at most 48 KiB, stay on the stack: from the heap, where the compiler
// cannot rule out aliasing with x, the reductions ran 5-10% slower.)
template <class A, class Partial>
struct RowWork {
    Partial split[kChannelBlock], strip[kChannelBlock];  // strip_partials, a strip's total
    A coefficients[4][kChannelBlock];
    A channel_coefficients[4][kChannelBlock / 2];  // short-plane strips: per channel (inner >= 2)
};

// sum(d^2) - sum(d)^2 / n, the corrected second pass, given mean_dev = sum(d) / n; clamped
// at 0 (NaN passes through).
inline double corrected_m2(double sum_sq, double sum, double mean_dev) {
    const double m2 = sum_sq - sum * mean_dev;
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

// Asks for the runs of the tile after t in channel c of `a` (the rows after it, where a
// tile is whole rows), for the statistics to call between their two passes over t: a
// tile's runs are a plane apart, too short for the hardware prefetchers to run ahead
// of (a 28x28 run is 49 lines), so its first pass waited for memory run after run, while
// its second reads t from L1 and leaves memory idle. benchmarks/ab_builds.py against the
// build without, batch_stats, float32, 2 threads, 64 MiB copied before each call:
// (64, 512, 28, 28) 0.79x the time, (64, 1024, 14, 14) 0.88x, (128, 64, 56, 56) 0.65x.
// Issued before the first pass instead, they competed with its loads: 1.04-1.19x that.
// Inputs too small to stream (kStreamBytes) are read from the caches, where the
// prefetches only cost instructions (1.01-1.03x on (32, 64, 14, 14) and (8, 32, 28, 28)).
// The backward's sums (one pass, over two inputs) gained nothing from the same prefetch
// (backward_reduce 0.97-1.05x), nor the fused backward, which prefetches the next channel.
template <class T>
BNORM_INLINE void prefetch_next_tile(const T* a, Shape s, int64_t c, PlaneTiles::Tile t) {
    // (segments of long rows: the hardware prefetchers follow them)
    if (t.i1 - t.i0 != s.inner || !streams<T>(s)) return;
    const int64_t stride = s.channels * s.inner, end = std::min(s.outer, 2 * t.r1 - t.r0);
    for (int64_t r = t.r1; r < end; ++r) prefetch_range(a + c * s.inner + r * stride, s.inner * int64_t(sizeof(T)));
}

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

    // Runs op over the row tiles of split `split` for the channels [c0, c1), merging into
    // acc[c - c0] (all empty, or all merged from the same tiles: see reduce()). Only the
    // row ranges depend on the plan: c0 and c1 may cut a block.
    template <class Op, class Partial>
    void split_tiles(Shape s, const Op& op, int64_t c0, int64_t c1, int64_t split, Partial* acc) const {
        for (int64_t t = split * tiles / splits; t < (split + 1) * tiles / splits; ++t) {
            const int64_t r0 = t * rows_per_tile;
            op.row_tile(c0, c1, r0, std::min(s.outer, r0 + rows_per_tile), acc);
        }
    }

    // The merged partials of the channels [c0, c1) (at most kChannelBlock), computed by one
    // thread in exactly the order reduce() merges them, into work.strip.
    template <class Op>
    void strip_partials(Shape s, const Op& op, int64_t c0, int64_t c1, typename Op::Work& work) const {
        using Partial = typename Op::Partial;
        const int64_t w = c1 - c0;
        Partial* total = work.strip;
        std::fill(total, total + w, Partial{});
        if (splits == 1) return split_tiles(s, op, c0, c1, 0, total);
        for (int64_t split = 0; split < splits; ++split) {
            std::fill(work.split, work.split + w, Partial{});
            split_tiles(s, op, c0, c1, split, work.split);
            for (int64_t j = 0; j < w; ++j) merge(total[j], work.split[j]);
        }
    }
};

// Runs op over every tile and writes one merged Partial per channel. Op provides
//   Partial plane_tile(c, PlaneTiles::Tile)                      (planes schedule)
//   void row_tile(c0, c1, r0, r1, Partial* acc)  merging into acc[c - c0]  (rows schedule;
//       acc's columns start empty and see the same tiles: MomentsOp stores its tile into
//       an empty acc without merging, judging by acc[0] alone)
// `stream`: the op streams stores of its own (each thread fences them).
template <class Partial, class Op>
void reduce(Shape s, int threads, const Op& op, Partial* result, bool stream = false) {
    const int64_t C = s.channels;
    std::fill(result, result + C, Partial{});
    const int team = team_size(s, threads);
    // Partials of the splits, merged in split order; with one split per channel (the
    // common case for many channels) they are the result, with no copy.
    if (s.inner > 1) {
        const PlaneSplits plan(s);
        const int64_t splits = plan.splits;
        Scratch<Partial> part(splits == 1 ? 0 : C * splits);
        Partial* out = splits == 1 ? result : part.data();
        parallel_writes(team, C * splits, 1, stream, [&](int64_t item, int) {
            out[item] = plan.split_partial<Partial>(s, op, item / splits, item % splits);
        });
        if (splits > 1)
            for (int64_t c = 0; c < C; ++c)
                for (int64_t split = 0; split < splits; ++split) merge(result[c], part[c * splits + split]);
    } else {
        const RowSplits plan(s);
        Scratch<Partial> part(plan.splits == 1 ? 0 : plan.splits * C, Partial{});
        Partial* out = plan.splits == 1 ? result : part.data();
        parallel_writes(team, plan.blocks * plan.splits, 1, stream, [&](int64_t item, int) {
            const int64_t block = item / plan.splits, split = item % plan.splits;
            const int64_t c0 = block * plan.width;
            plan.split_tiles(s, op, c0, std::min(C, c0 + plan.width), split, out + split * C + c0);
        });
        if (plan.splits > 1)
            for (int64_t split = 0; split < plan.splits; ++split)
                for (int64_t c = 0; c < C; ++c) merge(result[c], part[split * C + c]);
    }
}

// Two sums over the runs of a plane tile (`rows` runs of `len` elements, `stride` apart,
// element offsets relative to the tile's first). terms(L{}, k, a, b) adds the terms of the
// L::width elements at offset k into a and b, for L = Simd<T> (vector lanes) and Scalar<T>
// (the tails). Four independent vector accumulators per sum: one accumulator's add
// latency (4 cycles) would cap an L1-resident pass at a quarter of the core's throughput,
// below DRAM speed. Lanes and chains are added in a fixed order, so the result depends on
// the tile alone (not on the thread count).
template <class A>
struct Pair {
    A a, b;
};

template <class T, class Terms>
inline Pair<param_t<T>> chained_sums(int64_t rows, int64_t stride, int64_t len, const Terms& terms) {
    using S = Simd<T>;
    using R = typename S::R;
    constexpr int64_t W = S::width;
    R a0 = S::set(0), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    param_t<T> tail_a = 0, tail_b = 0;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * stride;
        int64_t i = 0;
        for (; i + 4 * W <= len; i += 4 * W) {
            terms(S{}, o + i, a0, b0);
            terms(S{}, o + i + W, a1, b1);
            terms(S{}, o + i + 2 * W, a2, b2);
            terms(S{}, o + i + 3 * W, a3, b3);
        }
        for (; i + W <= len; i += W) terms(S{}, o + i, a0, b0);
        for (; i < len; ++i) terms(Scalar<T>{}, o + i, tail_a, tail_b);
    }
    return {S::sum((a0 + a1) + (a2 + a3)) + tail_a, S::sum((b0 + b1) + (b2 + b3)) + tail_b};
}

// Calls body(L{}, P{}, G{}, r, j) for the rows of a rows-schedule tile, [r0, r1), in groups
// of G = 4 rows (then single rows) when `grouped`, else one row at a time, and its columns
// j in [0, w), a vector of columns at a time: L = Simd<T> loads x, P = Simd<A> loads and
// stores the tile's per-column accumulators (arrays of the accumulation type A, in L1),
// with the same lanes; the columns past the last whole vector with Scalar. The body adds
// a group's terms in registers (rows_sum) and touches the accumulators once per group
// instead of once per row: fewer L1 loads and stores ((50176, 256) training 4.7 -> 4.1 ms
// on an Intel Xeon). grouped_rows() says where groups do not pay.
template <int64_t G>
using Rows = std::integral_constant<int64_t, G>;
constexpr int64_t kSumRows = 4;  // rows a group of for_row_lanes sums in registers

template <class T, class Body>
inline void for_row_lanes(int64_t r0, int64_t r1, int64_t w, bool grouped, const Body& body) {
    using A = param_t<T>;
    using S = Simd<T>;
    using P = std::conditional_t<S::width == 1, Scalar<A>, Simd<A>>;
    static_assert(P::width == S::width, "x and accumulator vectors have the same lanes");
    const auto row_group = [&](auto group, int64_t r) {
        int64_t j = 0;
        for (; j + S::width <= w; j += S::width) body(S{}, P{}, group, r, j);
        for (; j < w; ++j) body(Scalar<T>{}, Scalar<A>{}, group, r, j);
    };
    // (a loop of its own: sharing the tail loop below slowed the grouped path, (64, 56, 56,
    // 64) statistics 1.6 -> 1.8 ms)
    if (!grouped) {
        for (int64_t r = r0; r < r1; ++r) row_group(Rows<1>{}, r);
        return;
    }
    int64_t r = r0;
    for (; r + kSumRows <= r1; r += kSumRows) row_group(Rows<kSumRows>{}, r);
    for (; r < r1; ++r) row_group(Rows<1>{}, r);
}

// Whether a rows reduction reading `arrays` arrays of shape s (rows of s.channels) runs in
// groups of rows. A group reads its 4 rows interleaved, a line of each in turn; where the
// rows come from memory and those runs share 4 KiB pages (rows of 512 B to 2 KiB), the
// hardware prefetchers of an AMD Zen 4 lose track: (50176, 256) backward sums read 12 GB/s
// in groups and 19 GB/s a row at a time on one thread (benchmarks/cpp/row_reduction.cpp;
// rows of 256 B, whose group is one nearly sequential KiB, and of a page or more read
// faster in groups). Data that may be in the last-level cache (under kCachedBytes read;
// an EPYC's CCD has 32 MiB) keeps the groups: one row at a time, (256, 512) statistics
// took 0.020 ms instead of 0.016 and (4096, 512) backward sums 0.18 instead of 0.16;
// (64, 14, 14, 256) sums (25 MiB read) 0.33-0.40 instead of 0.43-0.52. The grouping changes
// the order of the additions and is a function of the shape alone, as results must be.
constexpr int64_t kCachedBytes = int64_t(20) << 20;

// Whether a pass reading `arrays` arrays of shape s reads them from memory rather than
// from the last-level cache (kCachedBytes): the test of the rows reductions' choices below.
template <class T>
inline bool reads_from_memory(Shape s, int arrays) {
    return s.size() * int64_t(sizeof(T)) * arrays >= kCachedBytes;
}

template <class T>
inline bool grouped_rows(Shape s, int arrays) {
    const int64_t row = s.channels * int64_t(sizeof(T));
    return !(reads_from_memory<T>(s, arrays) && row >= 512 && row < 4096);
}

// Whether the statistics' rows tile of w columns of s asks for its next rows ahead
// (for_row_chunks): where its rows are segments of wider rows (column strips, short
// planes' positions, channels-last past a tile's columns), each a page or two that the
// hardware prefetchers barely start on before it ends, and x is too large for the
// last-level cache to hold it (kCachedBytes; in L3, (64, 512, 7, 7)'s statistics took
// 1.04-1.07x the time with the prefetches). The backward's sums, over two or three inputs,
// gained nothing from the same (0.99-1.06x: (64, 2048, 7, 7), (64, 7, 7, 2048), (4096,
// 2048), with and without ReLU).
template <class T>
inline bool prefetches_rows(Shape s, int64_t w) {
    return w < s.channels && reads_from_memory<T>(s, 1);
}

// Whether the statistics' rows tile, in its second pass (over the tile in L2), asks for
// the next tile's lines, each vector for the lines of the next tile's rows at its column
// (the next tile's first pass then reads from L2): x too large for the last-level cache,
// as for prefetches_rows, and rows read in groups (grouped_rows). Where the first pass
// reads a row at a time ((64, 28, 28, 256): rows of 1 KiB), the same took 1.35x the time
// of the statistics on one thread (and in the rows' order, as one run, 1.38x). Measured
// on a Zen 4 (1 MiB of L2 a core), where a tile (kRowTileElems, 256 KiB of float) and
// the next one fit together; with half that L2 the next tile's lines would evict the
// tile being read. The last tile of a work item asks for the next item's first tile,
// which another thread may read.
template <class T>
inline bool prefetches_next_row_tile(Shape s) {
    return reads_from_memory<T>(s, 1) && grouped_rows<T>(s, 1);
}

// for_row_lanes over [r0, r1) in chunks of `chunk` rows from r0, with before(g0, g1) and
// after(g0, g1) around each chunk [g0, g1): the statistics' rows tile asks for the next
// chunk's rows ahead (prefetches_rows), the backward's sums store the rows they summed
// (dsum, eval mode's dx). The same sums in the same order as one for_row_lanes over
// [r0, r1) where chunks do not cut its groups: any chunk ungrouped, a multiple of
// kSumRows grouped.
constexpr auto kNoChunkHook = [](int64_t, int64_t) {};  // for_row_chunks' before or after: nothing

template <class T, class Before, class Body, class After>
inline void for_row_chunks(int64_t r0, int64_t r1, int64_t chunk, int64_t w, bool grouped, const Before& before,
                           const Body& body, const After& after) {
    assert(chunk > 0 && (!grouped || chunk % kSumRows == 0));  // (the callers' constants: a debug check)
    for (int64_t g0 = r0; g0 < r1; g0 += chunk) {
        const int64_t g1 = std::min(r1, g0 + chunk);
        before(g0, g1);
        for_row_lanes<T>(g0, g1, w, grouped, body);
        after(g0, g1);
    }
}

// The sum of term(k) over the k < G rows of a group, pairwise in a fixed order.
template <int64_t G, class Term>
inline auto rows_sum(const Term& term) {
    if constexpr (G == 1) {
        return term(0);
    } else {
        static_assert(G == kSumRows, "groups of 1 or kSumRows rows");
        return (term(0) + term(1)) + (term(2) + term(3));
    }
}

}  // namespace
}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
