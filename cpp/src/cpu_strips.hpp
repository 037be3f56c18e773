// The CPU kernels' shared machinery, part 3: the layouts that run on a view of positions
// (short planes, narrow rows), and the fused schedules of the training forward and
// backward (per channel in planes, column strips in rows and short planes). See
// cpu_passes.hpp for the design.
#pragma once

#include "cpu_reduce.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

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
    // itself on 7x7 maps). Both passes add in four chains (position i into chain i % 4): one
    // chain's add latency made the fold a third of (8, 2048, 7, 7)'s statistics.
    Moments fold_channel(const Moments* per_position, int64_t c) const {
        const int64_t k = view.channels / channels, d = step();
        const Moments* p = per_position + c * per_channel;
        const double n = double(view.outer), first = p[0].mean;
        const double sum = chains4(k, [&](int64_t i) { return p[i * d].mean - first; });
        Moments m{n * double(k), first + sum / double(k), 0};
        m.m2 = chains4(k, [&](int64_t i) {
            const double dev = p[i * d].mean - m.mean;
            return p[i * d].m2 + n * dev * dev;
        });
        return m;
    }

    // The backward sums of channel c: its positions' added in four chains, as above.
    Sums fold_channel(const Sums* per_position, int64_t c) const {
        const int64_t k = view.channels / channels, d = step();
        const Sums* p = per_position + c * per_channel;
        return {chains4(k, [&](int64_t i) { return p[i * d].dy; }),
                chains4(k, [&](int64_t i) { return p[i * d].dy_xmu; })};
    }

    // The sum of term(i) for i < k: term i added to chain i % 4, the chains added pairwise.
    template <class Term>
    static double chains4(int64_t k, const Term& term) {
        double s[4] = {0, 0, 0, 0};
        int64_t i = 0;
        for (; i + 4 <= k; i += 4)
            for (int64_t j = 0; j < 4; ++j) s[j] += term(i + j);
        for (int64_t j = 0; i < k; ++i, ++j) s[j] += term(i);
        return (s[0] + s[1]) + (s[2] + s[3]);
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
inline Positions positions_of(Shape s, For use) {
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

// The fused per-channel passes read a channel as `outer` runs a plane apart, each too short
// for the hardware prefetchers to get going: where a run is at most kPrefetchRunBytes and
// the data is too large to be cached (the output streams), the write loop over channel c's
// runs (inputs in L2 by then) prefetches channel c + 1's into L2 (the next run in memory,
// and usually the thread's next channel: channel blocks). Cached inputs gain nothing from
// it: (8, 32, 28, 28) backward took 1.11x the time, (32, 64, 14, 14) 1.03-1.05x.
// benchmarks/ab_builds.py against the build without, float32, 2 threads, B/A time:
// training 0.84-0.89 (8x8 to 28x28 planes), backward 0.70-0.93 (14x14 0.70-0.73, 1 thread
// 0.61), with ReLU 0.87-0.97. Into L1 too (_MM_HINT_T0) it evicted the lines the write
// loop was reading: 10x10 backward 1.07x, 28x28 1.10x. Runs of 12.5 KB (56x56) gained
// 0-7% and lost 3-4% with ReLU: left to the hardware.
constexpr int64_t kPrefetchRunBytes = 4096;

// Whether the fused per-channel passes over s, streaming their output or not, prefetch the
// next channel's runs (above).
template <class T>
bool prefetches_next_channel(Shape s, bool stream) {
    return stream && s.inner * int64_t(sizeof(T)) <= kPrefetchRunBytes;
}

inline bool fuse_per_channel(Shape s, int team, int64_t bytes_per_element) {
    if (s.inner <= 1 || positions_of(s, For::reduce).view.channels > 0 || s.channels < team) return false;
    const int64_t channel_bytes = s.outer * s.inner * bytes_per_element;
    const bool long_runs = s.inner * bytes_per_element >= kLongRunBytes;
    return channel_bytes <= (long_runs ? 4 : 1) * kFuseBytes;
}

// The rows schedule's counterpart of fusing per channel: a thread owns a strip of columns
// over all rows, reduces it tile by tile in reduce()'s order (same bits), then writes its
// outputs while the strip is still in L2. Without it, (N, C) inputs with few rows spend
// more on C-sized scratch (partials, then coefficients) than on x: (2, 2^21) took 100x a
// copy. Strips are at least kMinStrip columns wide: a narrower strip's rows are segments
// of a few lines, and each costs more than the second read of x it saves, in cache or
// not (strips of 128 and 256 columns against the unfused passes, float32: (256, 512) and
// (1024, 1024) training 1.1-1.7x their time, (512, 2048) backward 1.4-1.6x,
// channels-last (8, 7, 7, 2048) 1.1-1.7x; one exception seen, (256, 4096) backward on 2
// threads, 0.85x; benchmarks/results/2026-12-06-wider-strips-epyc-2cpu.txt). A strip is
// at most a rows-schedule block wide, sized so that the strip of every input fits in
// kStripBytes (half an L2; larger strips, counting on L3, measured slower) and there are
// a few strips per thread. Returns the strip width, or 0 where the schedule does not
// apply (too many rows for a strip of kMinStrip columns to fit).
constexpr int64_t kStripBytes = 512 << 10;
constexpr int64_t kMinStrip = 512;

inline int64_t strip_width(Shape s, int team, int64_t bytes_per_element) {
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

inline int64_t short_plane_strip(Shape s, int team, int64_t bytes_per_element) {
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

inline ColumnStrips column_strips(Shape s, int team, int64_t bytes_per_element) {
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
inline int64_t channel_block(Shape s, int team) { return std::max<int64_t>(1, s.channels / (4 * int64_t(team))); }

}  // namespace
}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
