// CPU kernels: reductions and elementwise passes over the (outer, channels, inner) view.
//
// Two schedules cover every layout:
//  - planes (inner > 1, e.g. NCHW): a channel's values are `outer` runs of `inner`
//    contiguous elements. Tiles are pieces of those runs, so each tile streams
//    contiguous memory for a single channel.
//  - rows (inner == 1, e.g. NHWC or (N, C)): x is an (outer, channels) matrix. Tiles are
//    blocks of rows times a block of channels, vectorized along the channels.
// Planes with short runs and rows with few channels run the rows schedule on a view of
// "positions" (see Positions below). All vector code goes through Simd<T> (simd.hpp).
// A tile holds about kTileElems values, so the two passes of the shifted two-pass
// statistics read it from L1/L2, not DRAM. Tile results are merged in double (Chan's
// formula; the positions of a channel, all of equal count, by Positions::fold_channel) in
// tile order, and the tiles of a channel are split into a number of work items
// that depends only on the shape: the merge order, and therefore every bit of the result,
// is the same for any thread count.
//
// Training forward and backward are fused per channel in the planes schedule when there
// are at least as many channels as threads: a thread reduces one channel, then writes its
// output while the channel is still in its L2, so x (and dy) cross DRAM once. The rows
// schedule does the same per strip of columns when a strip over all rows fits in L2 (few
// rows), and short planes per strip of whole channels on their positions view. Large
// outputs are written with non-temporal stores (no read-for-ownership of the output;
// each thread fences its own, see parallel_writes). Channel-sized scratch comes from a
// per-thread cache (scratch.hpp). Work is handed out dynamically, in many more
// chunks than threads (results do not depend on who computes what), by parallel_writes,
// which also times how long each region waited for its team: see team_size and threads.hpp
// for the thread policy.
#include "cpu_kernels.hpp"

#ifndef BNORM_KERNEL_ISA
#define BNORM_KERNEL_ISA baseline  // CMake compiles this file once per instruction set
#endif

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <type_traits>

#include "coefficients.hpp"
#include "epilogue.hpp"
#include "scratch.hpp"
#include "simd.hpp"
#include "threads.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

using detail::Scratch;

constexpr int64_t kTileElems = 4096;        // planes tile: 16 KiB of float, both passes hit L1
constexpr int64_t kRowTileElems = 65536;    // rows tile (256 KiB of float, in L2): each ends in a merge per column
constexpr int64_t kRowTileRows = 256;       // rows tile: float sums of at most 256 values
constexpr int64_t kChannelBlock = 1024;     // channels per rows-schedule tile (RowWork arrays)
constexpr int64_t kWorkItems = 64;          // partials per call, enough for 64 threads
constexpr int64_t kStreamBytes = 4 << 20;   // outputs larger than this skip the caches

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The thread policy: a parallel region costs its caller the wake-up and the join of the
// team (a few microseconds on idle cores, a time slice of milliseconds when another process
// holds a team member's core), so each thread beyond the first needs kElemsPerThread
// elements of work to pay for itself, and calls smaller than that run on one thread, with
// no parallel region at all.
constexpr int64_t kElemsPerThread = 1 << 15;

int team_size(Shape s, int threads) {
    return int(std::clamp<int64_t>(s.size() / kElemsPerThread, 1, std::max(threads, 1)));
}

int64_t ns_since(std::chrono::steady_clock::time_point start) {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count();
}

// body(i, thread) for i in [0, n) on the team, `chunk` at a time, thread = the caller's
// index in the team. Chunks are handed out dynamically, many more than threads (every
// caller cuts its work so), so a thread that starts late finds its share taken; which
// thread computes what never changes a result (partials are merged in a fixed order). The
// caller reports how long it worked and how long it waited for the team, at the start
// (libgomp's master waits until every pooled thread is back from the previous region) and
// at the end: threads.hpp backs off from a busy machine. With `stream` each thread then
// fences its own non-temporal stores: an sfence orders only the stores of the thread that
// runs it.
template <class Body>
void parallel_writes(int team, int64_t n, int64_t chunk, bool stream, const Body& body) {
    if (team <= 1 || n <= 1) {
        for (int64_t i = 0; i < n; ++i) body(i, 0);
        stream_fence(stream);
        return;
    }
    const auto start = std::chrono::steady_clock::now();
    int64_t started_ns = 0, done_ns = 0;
#pragma omp parallel num_threads(team)
    {
        const int thread = omp_get_thread_num();
        if (thread == 0) started_ns = ns_since(start);
#pragma omp for schedule(dynamic, chunk) nowait
        for (int64_t i = 0; i < n; ++i) body(i, thread);
        stream_fence(stream);
        if (thread == 0) done_ns = ns_since(start);
    }
    detail::note_parallel_region(done_ns - started_ns, started_ns + (ns_since(start) - done_ns));
}

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

void merge(Moments& a, const Moments& b) {
    if (b.n > 0) merge_columns(&a, 1, b.n, &b.mean, &b.m2);
}

// Sums of the backward reduction: sum(dy) and sum(dy * (x - mean)).
struct Sums {
    double dy = 0, dy_xmu = 0;
};

void merge(Sums& a, const Sums& b) {
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

    // Runs op over the row tiles of split `split` for the channels [c0, c1), merging into
    // acc[c - c0]. Only the row ranges depend on the plan: c0 and c1 may cut a block.
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
//   void row_tile(c0, c1, r0, r1, Partial* acc)  merging into acc[c - c0]  (rows schedule)
template <class Partial, class Op>
void reduce(Shape s, int threads, const Op& op, Partial* result) {
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
        parallel_writes(team, C * splits, 1, false, [&](int64_t item, int) {
            out[item] = plan.split_partial<Partial>(s, op, item / splits, item % splits);
        });
        if (splits > 1)
            for (int64_t c = 0; c < C; ++c)
                for (int64_t split = 0; split < splits; ++split) merge(result[c], part[c * splits + split]);
    } else {
        const RowSplits plan(s);
        Scratch<Partial> part(plan.splits == 1 ? 0 : plan.splits * C, Partial{});
        Partial* out = plan.splits == 1 ? result : part.data();
        parallel_writes(team, plan.blocks * plan.splits, 1, false, [&](int64_t item, int) {
            const int64_t block = item / plan.splits, split = item % plan.splits;
            const int64_t c0 = block * plan.width;
            plan.split_tiles(s, op, c0, std::min(C, c0 + plan.width), split, out + split * C + c0);
        });
        if (plan.splits > 1)
            for (int64_t split = 0; split < plan.splits; ++split)
                for (int64_t c = 0; c < C; ++c) merge(result[c], part[split * C + c]);
    }
}

// Two layouts vectorize badly as they are, and run the rows schedule on a view of
// "positions" instead, each a column of its own:
// - planes with short runs (2x2 to 7x7 maps) as (outer, channels * inner, 1): position p
//   is channel p / inner. Reductions use the view for inner < kShortRunReduce and at most
//   kMaxReducePositions positions (their partials, 24 bytes each, are scratch: beyond
//   that the planes schedule needs none); writes only for inner < kShortRunWrite and at
//   most kMaxPositions positions (each costs 16 bytes of expanded coefficients; with
//   2^18, runs of 9 were written slower, runs of 16 and 25 faster: no clear gain). From
//   32 elements on, runs written with per-channel coefficients were faster ((32, 256, 7,
//   7) inference 0.043 -> 0.030 ms).
// - rows narrower than a few vectors (channels < kNarrowRow: RGB images channels-last,
//   (N, 3) features) as (outer / k, k * channels, 1), k rows side by side: position p is
//   channel p % channels; the outer % k rows left over run as they are.
// Per-channel arrays are expanded to positions, and per-position partials are folded into
// their channel (fold_channel; results still depend only on the shape).
enum class For { reduce, write };
constexpr int64_t kShortRunReduce = 64;
constexpr int64_t kShortRunWrite = 32;
constexpr int64_t kNarrowRow = 64;
constexpr int64_t kMaxPositions = 16384;
constexpr int64_t kMaxReducePositions = 1 << 18;

struct Positions {
    Shape view;          // (rows, positions, 1)
    int64_t per_channel; // position p is channel (p / per_channel) % channels
    Shape rest;          // rows left over, as (rows, channels, 1), after view.size() elements
    int64_t channels;

    // f(p, c) for every position p in order, c its channel (no divisions: they would cost
    // more than the rest of a small call).
    template <class F>
    void for_each(const F& f) const {
        for (int64_t p = 0; p < view.channels;)
            for (int64_t c = 0; c < channels; ++c)
                for (int64_t i = 0; i < per_channel; ++i, ++p) f(p, c);
    }

    // Channel c has k = view.channels / channels positions, the i-th at c * per_channel +
    // i * step: consecutive in short planes, every channels-th in narrow rows.
    int64_t step() const { return per_channel == 1 ? channels : 1; }

    // Channel c's statistics from its positions' partials: the i-th is per_position[c *
    // per_channel + i * step()] (so a strip of short planes, whose channels' positions are
    // consecutive, passes its own partials and c relative to its first channel; narrow
    // rows only fold whole arrays). Every position counts view.outer values, so the mean is
    // the average of the positions' means (shifted by the first, so that constant channels
    // stay exact) and m2 adds their spread around it: two passes without a division per
    // position (Chan's pairwise merge, one per position, cost more than the reduction
    // itself on 7x7 maps).
    Moments fold_channel(const Moments* per_position, int64_t c) const {
        const int64_t k = view.channels / channels, d = step();
        const Moments* p = per_position + c * per_channel;
        const double n = double(view.outer), first = p[0].mean;
        double sum = 0;
        for (int64_t i = 0; i < k; ++i) sum += p[i * d].mean - first;
        Moments m{n * double(k), first + sum / double(k), 0};
        for (int64_t i = 0; i < k; ++i) {
            const double dev = p[i * d].mean - m.mean;
            m.m2 += p[i * d].m2 + n * dev * dev;
        }
        return m;
    }

    // The backward sums of channel c: its positions' added in position order.
    Sums fold_channel(const Sums* per_position, int64_t c) const {
        const int64_t k = view.channels / channels, d = step();
        const Sums* p = per_position + c * per_channel;
        Sums total{};
        for (int64_t i = 0; i < k; ++i) merge(total, p[i * d]);
        return total;
    }

    // Short planes: the values of channels [c0, c1) (at c - c0) at their (consecutive)
    // positions, from the first position of c0.
    template <class P>
    void expand(int64_t c0, int64_t c1, const P* per_channel_values, P* out) const {
        for (int64_t c = c0; c < c1; ++c)
            for (int64_t i = 0; i < per_channel; ++i) *out++ = per_channel_values[c - c0];
    }

    template <class P>
    Scratch<P> expand(const P* per_channel_values) const {
        Scratch<P> out(view.channels);
        for_each([&](int64_t p, int64_t c) { out[size_t(p)] = per_channel_values[c]; });
        return out;
    }
};

// The positions view of s, or none (view.channels == 0) when s runs as it is.
Positions positions_of(Shape s, For use) {
    const int64_t C = s.channels;
    const bool short_run = use == For::reduce ? s.inner < kShortRunReduce && C * s.inner <= kMaxReducePositions
                                              : s.inner < kShortRunWrite && C * s.inner <= kMaxPositions;
    if (s.inner > 1 && short_run)
        return {{s.outer, C * s.inner, 1}, s.inner, {0, C, 1}, C};
    if (s.inner == 1 && C > 0 && C < kNarrowRow && s.outer >= 2 * (kNarrowRow / C + 1)) {
        const int64_t k = 4 * kNarrowRow / C;  // about 256 positions
        const int64_t rows = s.outer / k;
        if (rows > 0) return {{rows, k * C, 1}, 1, {s.outer - rows * k, C, 1}, C};
    }
    return {{0, 0, 0}, 1, {0, 0, 0}, std::max<int64_t>(C, 1)};
}

// Whether the fused per-channel schedule applies: planes, a channel for every thread, and
// a channel (bytes_per_element counts every input) small enough to stay cached between
// its reduction and its output: within kFuseBytes, or 4x that when its runs are long
// enough (kLongRunBytes) for the prefetchers to follow the channel from run to run. A
// larger channel goes through DRAM twice anyway, and is better read in memory order by
// the unfused passes: (10700, 2, 14, 14) backward took 1.6 ms fused, 1.2 unfused
// (AMD EPYC, 2 threads), while (128, 64, 56, 56), 3.2 MB a channel in 12 KB runs, took
// 7.7 ms fused and 10.9 unfused.
constexpr int64_t kFuseBytes = 1 << 20;
constexpr int64_t kLongRunBytes = 4096;

bool fuse_per_channel(Shape s, int team, int64_t bytes_per_element) {
    if (s.inner <= 1 || positions_of(s, For::reduce).view.channels > 0 || s.channels < team) return false;
    const int64_t channel_bytes = s.outer * s.inner * bytes_per_element;
    const bool long_runs = s.inner * bytes_per_element >= kLongRunBytes;
    return channel_bytes <= (long_runs ? 4 : 1) * kFuseBytes;
}

// The rows schedule's counterpart of fusing per channel: a thread owns a strip of columns
// over all rows, reduces it tile by tile in reduce()'s order (same bits), then writes its
// outputs while the strip is still in L2. Without it, (N, C) inputs with few rows spend
// more on C-sized scratch (partials, then coefficients) than on x: (2, 2^21) took 100x a
// copy. Strips are at least kMinStrip columns (narrower ones cost more per row than the
// second read of x they save: (1024, 1024) backward in 64-column strips took 1.7x the
// unfused time), at most a rows-schedule block wide, sized so that the strip of every
// input fits in kStripBytes (half an L2; larger strips, counting on L3, measured slower)
// and there are a few strips per thread. Returns the strip width, or 0 where the
// schedule does not apply (too many rows for a strip of kMinStrip columns to fit).
constexpr int64_t kStripBytes = 512 << 10;
constexpr int64_t kMinStrip = 128;

int64_t strip_width(Shape s, int team, int64_t bytes_per_element) {
    const int64_t C = s.channels;
    if (s.inner != 1 || C == 0 || s.outer == 0 || positions_of(s, For::reduce).view.channels > 0) return 0;
    const int64_t fits = kStripBytes / (s.outer * bytes_per_element) / kMinStrip * kMinStrip;
    const int64_t shared = ceil_div(ceil_div(C, 4 * int64_t(team)), kMinStrip) * kMinStrip;
    const int64_t width = std::min({fits, shared, RowSplits(s).width});
    if (width < std::min(kMinStrip, C)) return 0;
    return ceil_div(C, width) >= team ? width : 0;
}

// The column strips of short planes, run on their positions view: strips of whole
// channels (their positions are consecutive), so that each strip's channels are reduced,
// folded and written while the strip is in L2 (2 threads, AMD EPYC: (32, 256, 5, 5)
// training 0.062 -> 0.043 ms, backward 0.065 -> 0.044; (32, 2048, 7, 7) 0.79 -> 0.68 and
// 1.05 -> 0.88 ms). Strips of fewer than kMinShortPlaneStrip positions cost more per row
// than the second read they save ((512, 64, 4, 4) in 128-position strips: training 1.8x
// slower). A strip spans at most kChannelBlock positions, the length of RowWork's arrays
// and of row_tile's accumulators (`fits`), and its rows of every input fit in
// kStripBytes; returns the channels per strip, or 0 where the schedule does not apply.
// The fused and unfused paths give the same bits: a position's partials do not depend on
// where its strip starts (row_tile works column by column, vector lanes and scalar tails
// alike), both fold with fold_channel, and affine_row / backward_row compute what
// affine_run / backward_run do, operation for operation.
constexpr int64_t kMinShortPlaneStrip = 512;

int64_t short_plane_strip(Shape s, int team, int64_t bytes_per_element) {
    const Positions pos = positions_of(s, For::reduce);
    if (pos.view.channels == 0 || pos.per_channel == 1 || s.outer == 0) return 0;
    const int64_t fits = std::min(kChannelBlock, kStripBytes / (s.outer * bytes_per_element)) / s.inner;
    const int64_t shared = std::max(ceil_div(s.channels, 4 * int64_t(team)), ceil_div(kMinShortPlaneStrip, s.inner));
    const int64_t width = std::min(fits, shared);
    if (width * s.inner < std::min(kMinShortPlaneStrip, pos.view.channels)) return 0;
    return ceil_div(s.channels, width) >= team ? width : 0;
}

// body(c0, c1, work) for each strip of `width` channels, in parallel, work being the
// thread's Work.
template <class Work, class Body>
void for_each_strip(Shape s, int team, int64_t width, bool stream, const Body& body) {
    Scratch<Work> work(team);
    parallel_writes(team, ceil_div(s.channels, width), 1, stream, [&](int64_t i, int thread) {
        body(i * width, std::min(s.channels, (i + 1) * width), work[size_t(thread)]);
    });
}

// The fused training forward and backward of both strip schedules, which differ only in
// their columns: a channel is one column of s (rows, strip_width) or per_channel
// consecutive columns of the positions view (short planes, short_plane_strip).
// `channels` channels a strip; none (false) where neither schedule applies.
struct ColumnStrips {
    Shape view;               // the rows-schedule shape the strips cut: (rows, columns, 1)
    int64_t per_channel = 1;  // columns per channel
    int64_t channels = 0;
    Positions pos{};          // short planes: folds columns into channels

    explicit operator bool() const { return channels > 0; }

    // body(c0, c1, work, channel) for each strip of channels [c0, c1) in parallel (see
    // for_each_strip), with channel(work.strip, j) channel c0 + j's partial from the strip's
    // column partials. The layout is chosen once per call, not per channel: a branch per
    // channel kept the per-channel loops from vectorizing, and with few rows they are most
    // of the work ((2, 2^21) training took 9.7 ms instead of 8.5).
    template <class Work, class Body>
    void run(Shape s, int team, bool stream, const Body& body) const {
        const auto strips = [&](const auto& channel) {
            for_each_strip<Work>(s, team, channels, stream,
                                 [&](int64_t c0, int64_t c1, Work& work) { body(c0, c1, work, channel); });
        };
        if (per_channel == 1)
            strips([](const auto* strip, int64_t j) { return strip[j]; });
        else
            strips([this](const auto* strip, int64_t j) { return pos.fold_channel(strip, j); });
    }

    // Per-channel coefficient arrays k[q] for the channels [c0, c1), spread over their
    // columns into work.coefficients (rows: k[q] are those arrays already).
    template <class Work, class P>
    void coefficient_arrays(Work& work, int n, P** k) const {
        for (int q = 0; q < n; ++q) k[q] = per_channel == 1 ? work.coefficients[q] : work.channel_coefficients[q];
    }
    template <class Work>
    void spread(Work& work, int n, int64_t c0, int64_t c1) const {
        if (per_channel > 1)
            for (int q = 0; q < n; ++q) pos.expand(c0, c1, work.channel_coefficients[q], work.coefficients[q]);
    }
};

ColumnStrips column_strips(Shape s, int team, int64_t bytes_per_element) {
    if (const int64_t width = strip_width(s, team, bytes_per_element)) return {s, 1, width};
    if (const int64_t width = short_plane_strip(s, team, bytes_per_element)) {
        const Positions pos = positions_of(s, For::reduce);
        return {pos.view, s.inner, width, pos};
    }
    return {};
}

// Channels handed out at a time by the fused loops. Neighbouring channels' runs share a
// cache line wherever a run does not end on a line boundary, so two threads writing
// neighbouring channels at the same time bounce those lines between their caches (a 14x14
// plane has 32 such lines per channel pair). Blocks of consecutive channels cut that by
// the block size; four blocks per thread keep the hand-out dynamic.
int64_t channel_block(Shape s, int team) { return std::max<int64_t>(1, s.channels / (4 * int64_t(team))); }

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
// of G = 4 rows (then single rows), and its columns j in [0, w), a vector of columns at a
// time: L = Simd<T> loads x, P = Simd<A> loads and stores the tile's per-column
// accumulators (arrays of the accumulation type A, in L1), with the same lanes; the columns
// past the last whole vector with Scalar. The body adds a group's terms in registers
// (rows_sum) and touches the accumulators once per group instead of once per row: fewer
// L1 loads and stores ((50176, 256) training 4.7 -> 4.1 ms).
template <int64_t G>
using Rows = std::integral_constant<int64_t, G>;

template <class T, class Body>
inline void for_row_lanes(int64_t r0, int64_t r1, int64_t w, const Body& body) {
    using A = param_t<T>;
    using S = Simd<T>;
    using P = std::conditional_t<S::width == 1, Scalar<A>, Simd<A>>;
    static_assert(P::width == S::width, "x and accumulator vectors have the same lanes");
    const auto row_group = [&](auto group, int64_t r) {
        int64_t j = 0;
        for (; j + S::width <= w; j += S::width) body(S{}, P{}, group, r, j);
        for (; j < w; ++j) body(Scalar<T>{}, Scalar<A>{}, group, r, j);
    };
    int64_t r = r0;
    for (; r + 4 <= r1; r += 4) row_group(Rows<4>{}, r);
    for (; r < r1; ++r) row_group(Rows<1>{}, r);
}

// The sum of term(k) over the k < G rows of a group, pairwise in a fixed order.
template <int64_t G, class Term>
inline auto rows_sum(const Term& term) {
    if constexpr (G == 1) {
        return term(0);
    } else {
        static_assert(G == 4, "groups of 1 or 4 rows");
        return (term(0) + term(1)) + (term(2) + term(3));
    }
}

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

    Moments plane_tile(int64_t c, PlaneTiles::Tile t) const {
        const int64_t stride = s.channels * s.inner, len = t.i1 - t.i0, rows = t.r1 - t.r0;
        const T* base = x + c * s.inner + t.i0 + t.r0 * stride;
        const A shift = load(base);
        const A sum = chained_sums<T>(rows, stride, len, [&](auto lanes, int64_t k, auto& a, auto&) {
            using L = decltype(lanes);
            a += L::load(base + k) - L::set(shift);
        }).a;
        const double n = double(rows * len);
        const A mean1 = shift + A(sum / A(n));
        const Pair<A> dev = chained_sums<T>(rows, stride, len, [&](auto lanes, int64_t k, auto& a, auto& b) {
            using L = decltype(lanes);
            const auto d = L::load(base + k) - L::set(mean1);
            a += d;
            b += d * d;
        });
        return {n, double(mean1) + double(dev.a) / n, corrected_m2(dev.b, dev.a, n)};
    }

    void row_tile(int64_t c0, int64_t c1, int64_t r0, int64_t r1, Moments* acc) const {
        const int64_t w = c1 - c0, C = s.channels;
        A shift[kChannelBlock], sum[kChannelBlock], dev[kChannelBlock], dev_sq[kChannelBlock];
        const double n = double(r1 - r0);
        for (int64_t j = 0; j < w; ++j) {
            shift[j] = load(x + r0 * C + c0 + j);
            sum[j] = dev[j] = dev_sq[j] = 0;
        }
        for_row_lanes<T>(r0, r1, w, [&](auto lanes, auto acc_lanes, auto group, int64_t r, int64_t j) {
            using L = decltype(lanes);
            using P = decltype(acc_lanes);
            const auto k0 = P::load(shift + j);
            const T* p = x + r * C + c0 + j;
            P::store(sum + j, P::load(sum + j) + rows_sum<group()>([&](int64_t k) { return L::load(p + k * C) - k0; }));
        });
        for (int64_t j = 0; j < w; ++j) shift[j] += A(sum[j] / A(n));  // now the pass-1 mean
        for_row_lanes<T>(r0, r1, w, [&](auto lanes, auto acc_lanes, auto group, int64_t r, int64_t j) {
            using L = decltype(lanes);
            using P = decltype(acc_lanes);
            const auto m = P::load(shift + j);
            const T* p = x + r * C + c0 + j;
            // Both sums before either store, so that each x is loaded once per group.
            const auto d = rows_sum<group()>([&](int64_t k) { return L::load(p + k * C) - m; });
            const auto d2 = rows_sum<group()>([&](int64_t k) {
                const auto dk = L::load(p + k * C) - m;
                return dk * dk;
            });
            P::store(dev + j, P::load(dev + j) + d);
            P::store(dev_sq + j, P::load(dev_sq + j) + d2);
        });
        double tile_mean[kChannelBlock], tile_m2[kChannelBlock];
        for (int64_t j = 0; j < w; ++j) {
            tile_mean[j] = double(shift[j]) + double(dev[j]) / n;
            tile_m2[j] = corrected_m2(dev_sq[j], dev[j], n);
        }
        merge_columns(acc, w, n, tile_mean, tile_m2);
    }
};

template <class T, class Mask = GradientMask<T, false, false>>
struct BackwardSumsOp {
    using A = param_t<T>;
    using Partial = Sums;
    using Work = RowWork<A, Sums>;
    const T* dy;
    const T* x;
    const A* mean;
    Shape s;
    Mask mask{};  // the gradient read in place of dy (epilogue.hpp)

    Sums plane_tile(int64_t c, PlaneTiles::Tile t) const {
        const int64_t stride = s.channels * s.inner, len = t.i1 - t.i0;
        const int64_t offset = c * s.inner + t.i0 + t.r0 * stride;
        const T* g = dy + offset;
        const T* p = x + offset;
        const A m = mean[c];
        const Mask tile_mask = mask.at(offset);
        const Pair<A> sums = chained_sums<T>(t.r1 - t.r0, stride, len, [&](auto lanes, int64_t k, auto& a, auto& b) {
            using L = decltype(lanes);
            const auto d = tile_mask.load(L{}, g, k);
            a += d;
            b += d * (L::load(p + k) - L::set(m));
        });
        return {double(sums.a), double(sums.b)};
    }

    void row_tile(int64_t c0, int64_t c1, int64_t r0, int64_t r1, Sums* acc) const {
        const int64_t w = c1 - c0, C = s.channels;
        A sum_dy[kChannelBlock], sum_dy_xmu[kChannelBlock];
        for (int64_t j = 0; j < w; ++j) sum_dy[j] = sum_dy_xmu[j] = 0;
        for_row_lanes<T>(r0, r1, w, [&](auto lanes, auto acc_lanes, auto group, int64_t r, int64_t j) {
            using L = decltype(lanes);
            using P = decltype(acc_lanes);
            const auto m = P::load(mean + c0 + j);
            const int64_t offset = r * C + c0 + j;
            // Both sums before either store (see MomentsOp::row_tile).
            const auto g = rows_sum<group()>([&](int64_t k) { return mask.load(L{}, dy, offset + k * C); });
            const auto gx = rows_sum<group()>([&](int64_t k) {
                return mask.load(L{}, dy, offset + k * C) * (L::load(x + offset + k * C) - m);
            });
            P::store(sum_dy + j, P::load(sum_dy + j) + g);
            P::store(sum_dy_xmu + j, P::load(sum_dy_xmu + j) + gx);
        });
        for (int64_t j = 0; j < w; ++j) merge(acc[j], Sums{double(sum_dy[j]), double(sum_dy_xmu[j])});
    }
};

// out[k] = value(L{}, k) for k < n: vectors with L = Simd<T>, scalars with L = Scalar<T>
// where a run is shorter than a vector. Both compute the same IEEE operations lane by
// lane, so the bits do not depend on the path. With `stream`, the whole cache lines of
// out are written with non-temporal stores (no read-for-ownership); the partial lines at
// either end get ordinary stores. (A non-temporal store to part of a line that also gets
// ordinary stores forces a partial write-combining flush: 32-byte float16 vectors
// streamed from a 32-byte boundary made channels-last float16 4x slower.) The ends are
// vectors too, the last one of each overlapping its neighbour: a scalar loop would cost
// more than the vector loop on short runs (a 256-channel row, a 14x14 plane). The
// overlapping vectors are computed before anything is written, as out may be an input
// (in-place calls).
template <class T, class Value>
inline void write_run(T* out, int64_t n, bool stream, const Value& value) {
    using S = Simd<T>;
    constexpr int64_t W = S::width;
    constexpr int64_t line = 64 / int64_t(sizeof(T));  // elements per cache line
    static_assert(line % W == 0, "vectors tile a cache line");
    if (W == 1 || n < W) {
        for (int64_t i = 0; i < n; ++i) Scalar<T>::store(out + i, value(Scalar<T>{}, i));
        return;
    }
    const uintptr_t address = reinterpret_cast<uintptr_t>(out);
    const bool lines = stream && address % sizeof(T) == 0;
    const int64_t start = lines ? std::min<int64_t>(n, int64_t((64 - address % 64) % 64 / sizeof(T))) : 0;
    const int64_t head_at = std::max<int64_t>(start - W, 0);
    const auto head_end = value(S{}, head_at);
    const auto tail = value(S{}, n - W);
    int64_t i = 0;
    for (; i + W <= start; i += W) S::store(out + i, value(S{}, i));
    const int64_t head_done = i;
    i = start;
    if (lines)
        for (; i + line <= n; i += line)
            for (int64_t v = 0; v < line; v += W) S::stream(out + i + v, value(S{}, i + v));
    for (; i + W <= n; i += W) S::store(out + i, value(S{}, i));
    store_lanes<T>(out + head_at, head_end, head_done - head_at, start - head_at);
    store_lanes<T>(out + n - W, tail, i - (n - W), W);
}

// Rows (runs of row_length elements) handed out at a time by the elementwise loops of s:
// about kChunkElems elements, fewer when that would leave fewer than 8 chunks per thread.
// Small chunks, alternating between threads, keep restarting the hardware prefetchers:
// with 4096-element chunks (64, 256, 28, 28) float32 inference took 2.1 ms instead of
// 1.1 ms, float16 1.5 ms instead of 0.5 ms (2 threads, AMD EPYC).
constexpr int64_t kChunkElems = 65536;

int64_t rows_per_chunk(Shape s, int team, int64_t row_length) {
    const int64_t elements = std::clamp<int64_t>(s.size() / (8 * int64_t(team)), kTileElems, kChunkElems);
    return std::max<int64_t>(1, elements / std::max<int64_t>(row_length, 1));
}

// body(r, c0, c1) for the columns [c0, c1) of every row r of the rows schedule, in
// parallel. Rows wider than kWriteColumns are handed out as chunks of rows times a block
// of columns, so that the block's coefficient arrays (up to four per column) stay in L1
// while its rows are written: read across whole rows from L2 they took four loads per
// value and made (64, 16384) inference 1.7x a copy.
constexpr int64_t kWriteColumns = 2048;

template <class Body>
void for_row_blocks(Shape s, int team, bool stream, const Body& body) {
    const int64_t C = s.channels;
    if (C <= kWriteColumns) {
        parallel_writes(team, s.outer, rows_per_chunk(s, team, C), stream, [&](int64_t r, int) { body(r, 0, C); });
        return;
    }
    const int64_t blocks = ceil_div(C, kWriteColumns), rows = rows_per_chunk(s, team, kWriteColumns);
    parallel_writes(team, ceil_div(s.outer, rows) * blocks, 1, stream, [&](int64_t item, int) {
        const int64_t r0 = item / blocks * rows, c0 = item % blocks * kWriteColumns;
        for (int64_t r = r0; r < std::min(s.outer, r0 + rows); ++r) body(r, c0, std::min(C, c0 + kWriteColumns));
    });
}

template <class T>
bool streams(Shape s) {
    return s.size() * int64_t(sizeof(T)) >= kStreamBytes;
}

// y = epilogue(((x - center) - lo) * scale + shift) over one run of a single channel.
template <class T, class E>
void affine_run(const T* x, T* y, int64_t n, const detail::Affine<param_t<T>>& k, bool stream, const E& epilogue) {
    write_run(y, n, stream, [&](auto lanes, int64_t i) {
        using L = decltype(lanes);
        return epilogue(
            L{}, ((L::load(x + i) - L::set(k.center)) - L::set(k.center_lo)) * L::set(k.scale) + L::set(k.shift), i);
    });
}

// The same over one row of the rows schedule, coefficients varying along it.
template <class T, class E>
void affine_row(const T* x, T* y, int64_t n, const param_t<T>* center, const param_t<T>* lo,
                const param_t<T>* scale, const param_t<T>* shift, bool stream, const E& epilogue) {
    using P = Simd<param_t<T>>;  // the coefficients are arrays of the accumulation type
    write_run(y, n, stream, [&](auto lanes, int64_t c) {
        using L = decltype(lanes);
        using C = std::conditional_t<L::width == 1, Scalar<param_t<T>>, P>;
        static_assert(C::width == L::width, "x and coefficient vectors have the same lanes");
        return epilogue(
            L{}, ((L::load(x + c) - C::load(center + c)) - C::load(lo + c)) * C::load(scale + c) + C::load(shift + c), c);
    });
}

// dx = (g - dy_mean - (x - mean) * xmu_scale) * scale over one run of a single channel, g
// being dy or ReLU's gradient of it (mask, which also stores dsum = g); with x null (eval
// mode), dx = g * scale.
template <class T, class Mask>
void backward_run(const T* dy, const T* x, T* dx, int64_t n, param_t<T> mean,
                  const detail::BackwardCoefficients<param_t<T>>& k, bool stream, const Mask& mask) {
    if (!x) {
        write_run(dx, n, stream, [&](auto lanes, int64_t i) {
            const auto g = mask.load(lanes, dy, i);
            mask.write(lanes, g, i, stream);
            return g * decltype(lanes)::set(k.scale);
        });
        return;
    }
    write_run(dx, n, stream, [&](auto lanes, int64_t i) {
        using L = decltype(lanes);
        const auto g = mask.load(L{}, dy, i);
        mask.write(L{}, g, i, stream);
        return (g - L::set(k.dy_mean) - (L::load(x + i) - L::set(mean)) * L::set(k.xmu_scale)) * L::set(k.scale);
    });
}

template <class T, class Mask>
void backward_row(const T* dy, const T* x, T* dx, int64_t n, const param_t<T>* mean, const param_t<T>* dy_mean,
                  const param_t<T>* xmu_scale, const param_t<T>* scale, bool stream, const Mask& mask) {
    using P = Simd<param_t<T>>;
    if (!x) {
        write_run(dx, n, stream, [&](auto lanes, int64_t c) {
            using L = decltype(lanes);
            using C = std::conditional_t<L::width == 1, Scalar<param_t<T>>, P>;
            const auto g = mask.load(L{}, dy, c);
            mask.write(L{}, g, c, stream);
            return g * C::load(scale + c);
        });
        return;
    }
    write_run(dx, n, stream, [&](auto lanes, int64_t c) {
        using L = decltype(lanes);
        using C = std::conditional_t<L::width == 1, Scalar<param_t<T>>, P>;
        static_assert(C::width == L::width, "x and coefficient vectors have the same lanes");
        const auto g = mask.load(L{}, dy, c);
        mask.write(L{}, g, c, stream);
        return (g - C::load(dy_mean + c) - (L::load(x + c) - C::load(mean + c)) * C::load(xmu_scale + c)) *
               C::load(scale + c);
    });
}

void store(const Moments& m, double& mean, double& var) {
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

// The P-rounded sums of the channels [c0, c1) (sums(c): their double Sums) and their dx
// coefficients at index c - c0. The outputs are distinct scratch arrays (cpu_api.cpp gives
// the sums scratch of their own): __restrict lets the loop vectorize where the caller picks
// the arrays at run time (ColumnStrips).
template <class P, class SumsOf>
void dx_coefficients(int64_t c0, int64_t c1, const SumsOf& sums, const P* invstd, const P* weight, double count,
                     P* __restrict sum_dy, P* __restrict sum_dy_xhat, P* __restrict dy_mean,
                     P* __restrict xmu_scale, P* __restrict scale) {
    for (int64_t c = c0; c < c1; ++c) {
        const Sums s = sums(c);
        detail::round_backward_sums(s.dy, s.dy_xmu, invstd[c], sum_dy[c], sum_dy_xhat[c]);
        const auto k = detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count);
        dy_mean[c - c0] = k.dy_mean, xmu_scale[c - c0] = k.xmu_scale, scale[c - c0] = k.scale;
    }
}

}  // namespace

template <class T>
void moments(const T* x, Shape shape, int threads, double* mean, double* var) {
    const int team = team_size(shape, threads);
    if (const int64_t strip = strip_width(shape, team, sizeof(T))) {
        const RowSplits plan(shape);
        const MomentsOp<T> op{x, shape};
        using Work = typename MomentsOp<T>::Work;
        for_each_strip<Work>(shape, team, strip, false, [&](int64_t c0, int64_t c1, Work& work) {
            plan.strip_partials(shape, op, c0, c1, work);
            for (int64_t c = c0; c < c1; ++c) store(work.strip[c - c0], mean[c], var[c]);
        });
        return;
    }
    Scratch<Moments> result(shape.channels, Moments{});
    const Positions pos = positions_of(shape, For::reduce);
    if (pos.view.channels > 0) {
        Scratch<Moments> per_position(pos.view.channels), rest(pos.rest.outer > 0 ? shape.channels : 0);
        reduce(pos.view, threads, MomentsOp<T>{x, pos.view}, per_position.data());
        for (int64_t c = 0; c < shape.channels; ++c) result[c] = pos.fold_channel(per_position.data(), c);
        if (pos.rest.outer > 0) {
            reduce(pos.rest, threads, MomentsOp<T>{x + pos.view.size(), pos.rest}, rest.data());
            for (int64_t c = 0; c < shape.channels; ++c) merge(result[c], rest[c]);
        }
    } else {
        reduce(shape, threads, MomentsOp<T>{x, shape}, result.data());
    }
    for (int64_t c = 0; c < shape.channels; ++c) store(result[c], mean[c], var[c]);
}

namespace {

// The kernels with their epilogue (E: a ForwardEpilogue) or gradient mask (Mask: a
// GradientMask) as a type; the entry points below pick it once per call.
template <class T, class E>
void affine_fused(const T* x, Shape s, int threads, const param_t<T>* center, const param_t<T>* center_lo,
                  const param_t<T>* scale, const param_t<T>* shift, T* y, const E& epilogue) {
    const Positions pos = positions_of(s, For::write);
    if (pos.view.channels > 0) {
        affine_fused(x, pos.view, threads, pos.expand(center).data(), pos.expand(center_lo).data(),
                     pos.expand(scale).data(), pos.expand(shift).data(), y, epilogue);
        if (pos.rest.outer > 0)
            affine_fused(x + pos.view.size(), pos.rest, threads, center, center_lo, scale, shift, y + pos.view.size(),
                         epilogue.at(pos.view.size()));
        return;
    }
    const int team = team_size(s, threads);
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    if (s.inner > 1) {
        parallel_writes(team, s.outer * C, rows_per_chunk(s, team, s.inner), stream, [&](int64_t row, int) {
            const int64_t c = row % C;
            affine_run(x + row * s.inner, y + row * s.inner, s.inner, {center[c], center_lo[c], scale[c], shift[c]},
                       stream, epilogue.at(row * s.inner));
        });
    } else {
        for_row_blocks(s, team, stream, [&](int64_t r, int64_t c0, int64_t c1) {
            const int64_t offset = r * C + c0;
            affine_row(x + offset, y + offset, c1 - c0, center + c0, center_lo + c0, scale + c0, shift + c0, stream,
                       epilogue.at(offset));
        });
    }
}

template <class T, class E>
void forward_train_fused(const T* x, Shape s, int threads, double eps, const param_t<T>* weight, const param_t<T>* bias,
                         T* y, double* mean, double* var, param_t<T>* invstd, const E& epilogue) {
    using P = param_t<T>;
    const int team = team_size(s, threads);
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    if (const ColumnStrips strips = column_strips(s, team, sizeof(T))) {
        const Shape view = strips.view;
        const RowSplits plan(view);
        const MomentsOp<T> op{x, view};
        using Work = typename MomentsOp<T>::Work;
        strips.run<Work>(s, team, stream, [&](int64_t c0, int64_t c1, Work& work, const auto& channel) {
            const int64_t p0 = c0 * strips.per_channel, width = (c1 - c0) * strips.per_channel;
            plan.strip_partials(view, op, p0, p0 + width, work);
            for (int64_t c = c0; c < c1; ++c) store(channel(work.strip, c - c0), mean[c], var[c]);
            P* k[4];
            strips.coefficient_arrays(work, 4, k);
            train_coefficients(c0, c1, mean, var, eps, weight, bias, invstd, k[0], k[1], k[2], k[3]);
            strips.spread(work, 4, c0, c1);
            for (int64_t r = 0; r < s.outer; ++r)
                affine_row(x + r * view.channels + p0, y + r * view.channels + p0, width, work.coefficients[0],
                           work.coefficients[1], work.coefficients[2], work.coefficients[3], stream,
                           epilogue.at(r * view.channels + p0));
        });
        return;
    }
    if (!fuse_per_channel(s, team, sizeof(T))) {
        moments(x, s, threads, mean, var);
        Scratch<P> center(C), lo(C), scale(C), shift(C);
        train_coefficients(int64_t(0), C, mean, var, eps, weight, bias, invstd, center.data(), lo.data(), scale.data(),
                           shift.data());
        affine_fused(x, s, threads, center.data(), lo.data(), scale.data(), shift.data(), y, epilogue);
        return;
    }
    const PlaneSplits plan(s);
    const MomentsOp<T> op{x, s};
    const int64_t stride = C * s.inner;
    parallel_writes(team, C, channel_block(s, team), stream, [&](int64_t c, int) {
        store(plan.channel_partial<Moments>(s, op, c), mean[c], var[c]);
        invstd[c] = detail::invstd_of<P>(var[c], eps);
        const auto k = detail::train_affine(mean[c], invstd[c], weight, bias, c);
        for (int64_t o = 0; o < s.outer; ++o)
            affine_run(x + o * stride + c * s.inner, y + o * stride + c * s.inner, s.inner, k, stream,
                       epilogue.at(o * stride + c * s.inner));
    });
}

template <class T, class Mask>
void backward_sums_fused(const T* dy, const T* x, Shape shape, int threads, const param_t<T>* mean,
                         double* sum_dy, double* sum_dy_xmu, const Mask& mask) {
    using Op = BackwardSumsOp<T, Mask>;
    const int team = team_size(shape, threads);
    if (const int64_t strip = strip_width(shape, team, 2 * sizeof(T))) {
        const RowSplits plan(shape);
        const Op op{dy, x, mean, shape, mask};
        using Work = typename Op::Work;
        for_each_strip<Work>(shape, team, strip, false, [&](int64_t c0, int64_t c1, Work& work) {
            plan.strip_partials(shape, op, c0, c1, work);
            for (int64_t c = c0; c < c1; ++c) sum_dy[c] = work.strip[c - c0].dy, sum_dy_xmu[c] = work.strip[c - c0].dy_xmu;
        });
        return;
    }
    Scratch<Sums> result(shape.channels, Sums{});
    const Positions pos = positions_of(shape, For::reduce);
    if (pos.view.channels > 0) {
        const auto mean_at = pos.expand(mean);
        Scratch<Sums> per_position(pos.view.channels), rest(pos.rest.outer > 0 ? shape.channels : 0);
        reduce(pos.view, threads, Op{dy, x, mean_at.data(), pos.view, mask}, per_position.data());
        for (int64_t c = 0; c < shape.channels; ++c) result[c] = pos.fold_channel(per_position.data(), c);
        if (pos.rest.outer > 0) {
            const int64_t offset = pos.view.size();
            reduce(pos.rest, threads, Op{dy + offset, x + offset, mean, pos.rest, mask.at(offset)}, rest.data());
            for (int64_t c = 0; c < shape.channels; ++c) merge(result[c], rest[c]);
        }
    } else {
        reduce(shape, threads, Op{dy, x, mean, shape, mask}, result.data());
    }
    for (int64_t c = 0; c < shape.channels; ++c) {
        sum_dy[c] = result[c].dy;
        sum_dy_xmu[c] = result[c].dy_xmu;
    }
}

template <class T, class Mask>
void backward_dx_fused(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean,
                       const param_t<T>* dy_mean, const param_t<T>* xmu_scale, const param_t<T>* scale, T* dx,
                       const Mask& mask) {
    const Positions pos = positions_of(s, For::write);
    if (pos.view.channels > 0) {
        if (x) {
            backward_dx_fused(dy, x, pos.view, threads, pos.expand(mean).data(), pos.expand(dy_mean).data(),
                              pos.expand(xmu_scale).data(), pos.expand(scale).data(), dx, mask);
        } else {  // eval mode: scale alone
            backward_dx_fused(dy, x, pos.view, threads, mean, dy_mean, xmu_scale, pos.expand(scale).data(), dx, mask);
        }
        if (pos.rest.outer > 0) {
            const int64_t offset = pos.view.size();
            backward_dx_fused(dy + offset, x ? x + offset : x, pos.rest, threads, mean, dy_mean, xmu_scale, scale,
                              dx + offset, mask.at(offset));
        }
        return;
    }
    const int team = team_size(s, threads);
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    if (s.inner > 1) {
        parallel_writes(team, s.outer * C, rows_per_chunk(s, team, s.inner), stream, [&](int64_t row, int) {
            const int64_t c = row % C, offset = row * s.inner;
            if (x)
                backward_run(dy + offset, x + offset, dx + offset, s.inner, mean[c],
                             {dy_mean[c], xmu_scale[c], scale[c]}, stream, mask.at(offset));
            else
                backward_run(dy + offset, x, dx + offset, s.inner, param_t<T>(0), {0, 0, scale[c]}, stream,
                             mask.at(offset));
        });
    } else {
        for_row_blocks(s, team, stream, [&](int64_t r, int64_t c0, int64_t c1) {
            const int64_t offset = r * C + c0;
            if (x)
                backward_row(dy + offset, x + offset, dx + offset, c1 - c0, mean + c0, dy_mean + c0, xmu_scale + c0,
                             scale + c0, stream, mask.at(offset));
            else
                backward_row(dy + offset, x, dx + offset, c1 - c0, mean, dy_mean, xmu_scale, scale + c0, stream,
                             mask.at(offset));
        });
    }
}

template <class T, class Mask>
void backward_train_fused(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean,
                          const param_t<T>* invstd, const param_t<T>* weight, T* dx, param_t<T>* sum_dy,
                          param_t<T>* sum_dy_xhat, const Mask& mask) {
    using P = param_t<T>;
    using Op = BackwardSumsOp<T, Mask>;
    const int team = team_size(s, threads);
    const double count = double(s.count());
    const bool stream = streams<T>(s);
    const int64_t C = s.channels;
    if (const ColumnStrips strips = column_strips(s, team, 2 * sizeof(T))) {
        const Shape view = strips.view;
        const RowSplits plan(view);
        const auto expanded_mean = strips.pos.expand(mean);  // short planes: the mean of each column
        const P* column_mean = strips.per_channel == 1 ? mean : expanded_mean.data();
        const Op op{dy, x, column_mean, view, mask};
        using Work = typename Op::Work;
        strips.run<Work>(s, team, stream, [&](int64_t c0, int64_t c1, Work& work, const auto& channel) {
            const int64_t p0 = c0 * strips.per_channel, width = (c1 - c0) * strips.per_channel;
            plan.strip_partials(view, op, p0, p0 + width, work);
            P* k[3];
            strips.coefficient_arrays(work, 3, k);
            dx_coefficients(
                c0, c1, [&](int64_t c) { return channel(work.strip, c - c0); }, invstd, weight, count, sum_dy,
                sum_dy_xhat, k[0], k[1], k[2]);
            strips.spread(work, 3, c0, c1);
            for (int64_t r = 0; r < s.outer; ++r) {
                const int64_t offset = r * view.channels + p0;
                backward_row(dy + offset, x + offset, dx + offset, width, column_mean + p0, work.coefficients[0],
                             work.coefficients[1], work.coefficients[2], stream, mask.at(offset));
            }
        });
        return;
    }
    if (!fuse_per_channel(s, team, 2 * sizeof(T))) {
        Scratch<double> s_dy(s.channels), s_dy_xmu(s.channels);
        backward_sums_fused(dy, x, s, threads, mean, s_dy.data(), s_dy_xmu.data(), mask);
        Scratch<P> dy_mean(C), xmu_scale(C), scale(C);
        dx_coefficients(
            int64_t(0), C, [&](int64_t c) { return Sums{s_dy[c], s_dy_xmu[c]}; }, invstd, weight, count, sum_dy,
            sum_dy_xhat, dy_mean.data(), xmu_scale.data(), scale.data());
        backward_dx_fused(dy, x, s, threads, mean, dy_mean.data(), xmu_scale.data(), scale.data(), dx, mask);
        return;
    }
    const PlaneSplits plan(s);
    const Op op{dy, x, mean, s, mask};
    const int64_t stride = C * s.inner;
    parallel_writes(team, C, channel_block(s, team), stream, [&](int64_t c, int) {
        const Sums sums = plan.channel_partial<Sums>(s, op, c);
        detail::round_backward_sums(sums.dy, sums.dy_xmu, invstd[c], sum_dy[c], sum_dy_xhat[c]);
        const auto k = detail::backward_coefficients(sum_dy[c], sum_dy_xhat[c], invstd[c], weight, c, count);
        for (int64_t o = 0; o < s.outer; ++o) {
            const int64_t offset = o * stride + c * s.inner;
            backward_run(dy + offset, x + offset, dx + offset, s.inner, mean[c], k, stream, mask.at(offset));
        }
    });
}

}  // namespace

template <class T>
void affine(const T* x, Shape s, int threads, const param_t<T>* center, const param_t<T>* center_lo,
            const param_t<T>* scale, const param_t<T>* shift, T* y, const Epilogue<T>& epilogue) {
    with_forward_epilogue(epilogue, [&](const auto& e) { affine_fused(x, s, threads, center, center_lo, scale, shift, y, e); });
}

template <class T>
void forward_train(const T* x, Shape s, int threads, double eps, const param_t<T>* weight, const param_t<T>* bias,
                   T* y, double* mean, double* var, param_t<T>* invstd, const Epilogue<T>& epilogue) {
    with_forward_epilogue(epilogue, [&](const auto& e) {
        forward_train_fused(x, s, threads, eps, weight, bias, y, mean, var, invstd, e);
    });
}

template <class T>
void backward_sums(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, double* sum_dy,
                   double* sum_dy_xmu, const ReluGrad<T>& relu) {
    with_gradient_mask(relu, false, [&](const auto& mask) {
        backward_sums_fused(dy, x, s, threads, mean, sum_dy, sum_dy_xmu, mask);
    });
}

template <class T>
void backward_dx(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* dy_mean,
                 const param_t<T>* xmu_scale, const param_t<T>* scale, T* dx, const ReluGrad<T>& relu) {
    with_gradient_mask(relu, true, [&](const auto& mask) {
        backward_dx_fused(dy, x, s, threads, mean, dy_mean, xmu_scale, scale, dx, mask);
    });
}

template <class T>
void backward_train(const T* dy, const T* x, Shape s, int threads, const param_t<T>* mean, const param_t<T>* invstd,
                    const param_t<T>* weight, T* dx, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat,
                    const ReluGrad<T>& relu) {
    with_gradient_mask(relu, true, [&](const auto& mask) {
        backward_train_fused(dy, x, s, threads, mean, invstd, weight, dx, sum_dy, sum_dy_xhat, mask);
    });
}

#define BNORM_INSTANTIATE(T)                                                                  \
    template void moments<T>(const T*, Shape, int, double*, double*);                         \
    template void affine<T>(const T*, Shape, int, const param_t<T>*, const param_t<T>*,       \
                            const param_t<T>*, const param_t<T>*, T*, const Epilogue<T>&);    \
    template void backward_sums<T>(const T*, const T*, Shape, int, const param_t<T>*, double*, \
                                   double*, const ReluGrad<T>&);                              \
    template void backward_dx<T>(const T*, const T*, Shape, int, const param_t<T>*,           \
                                 const param_t<T>*, const param_t<T>*, const param_t<T>*, T*, \
                                 const ReluGrad<T>&);                                         \
    template void forward_train<T>(const T*, Shape, int, double, const param_t<T>*,           \
                                   const param_t<T>*, T*, double*, double*, param_t<T>*,      \
                                   const Epilogue<T>&);                                       \
    template void backward_train<T>(const T*, const T*, Shape, int, const param_t<T>*,        \
                                    const param_t<T>*, const param_t<T>*, T*, param_t<T>*,    \
                                    param_t<T>*, const ReluGrad<T>&);
BNORM_INSTANTIATE(float)
BNORM_INSTANTIATE(double)
BNORM_INSTANTIATE(half)
BNORM_INSTANTIATE(bfloat16)
#undef BNORM_INSTANTIATE

}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
