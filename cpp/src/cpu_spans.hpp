// The CPU kernels' shared machinery, part 4: write spans, for inference and normalize over
// short planes, and row runs, for the unfused write passes over short rows. See
// cpu_passes.hpp for the design.
#pragma once

#include <array>

#include "cpu_passes.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

// Planes of kSpanMin to kSpanCached elements (6x6, 7x7 maps), and up to kSpanMax (11x11)
// where the output streams and its runs are not whole cache lines (up to 1 KiB, 15x15
// float32, for 4- and 8-byte elements: below), are written as
// spans of whole rows ((channels * inner) contiguous elements of one outer index) instead
// of run by run: a 49-element run was three vectors and a one-lane tail, each run a loop
// with its own ends, and short runs cannot stream; spans are long runs, whole lines
// streamed where the output is large. The vectors' coefficients come from
// SpanCoefficients (below). Against the runs (benchmarks/ab_builds.py, 2 threads,
// inference): streamed, float32 (256, 1024, 6, 6) 0.69x the time, (256, 1024, 8, 8)
// 0.82x, (256, 512, 10, 10) 0.85x, (64, 2048, 7, 7) 0.72-1.09x (two steady states between
// processes); float16 0.78-1.00x, bfloat16 0.58-0.76x; with the residual and ReLU
// 0.68-0.87x; cached, 6x6 and 7x7 0.70-0.85x every dtype (bfloat16/float16 of (32, 256,
// 7, 7) on one thread 1.12-1.22 -> 0.94, C++ harness). Runs of 64 elements or more stay runs in cache
// (float16 and bfloat16 (32, 256, 8, 8) 1.1-1.25x the time as spans: a run of whole vectors
// has no tail to lose), and so do 2-byte runs of 128 or more (float16 14x14 streamed 1.15x;
// 4- and 8-byte runs under 1 KiB: below).
// Only inference and normalize (affine_fused without a low part) take spans: the backward's
// elementwise pass took them too (backward_elemt 0.62-0.82x the time, eval mode with ReLU
// 0.69-0.96x), but its variants (gradient masks, eval mode) made cpu_backward.cpp 50% slower
// to compile in each of CI's six builds, and CI 26 minutes; likewise the training forward's
// rare unfused pass.
// Streamed float32 and float64 runs of 512 bytes to 1 KiB (12x12 to 15x15 float32, 8x8 to
// 11x11 float64) streamed their whole lines run by run, with ordinary stores to the two
// partial lines at their ends; as spans (one process against that build, ab_builds.py,
// NumPy's arrays 16 bytes into a line), float32 inference on one thread took 0.55-0.87x
// the time ((64, 1024, 14, 14) 0.68, (64, 512, 13, 13) 0.55), with the residual and ReLU
// 0.58-0.68x; on two threads 0.78-1.00x and 0.66-1.01x; float64 0.78-1.01x but for one
// thread's (128, 512, 10, 10) inference, 1.20x. Longer float32 runs lost as spans (17x17
// to 28x28 inference on one thread 0.92-1.13x). float16's runs of 128 or more stay runs:
// as spans, 14x14 to 15x15 went from 0.8x to 1.5x the time between runs of the same A/B.
constexpr int64_t kSpanMin = 32;  // (shorter runs are written as positions; spans need inner >= a vector - 1)
constexpr int64_t kSpanMax = 128;
constexpr int64_t kSpanCached = 64;
constexpr int64_t kSpanStreamedBytes = 1024;  // (4- and 8-byte elements)

// p / d for 0 <= p < 2^32 and 2 <= d < 2^32 by a multiply (Lemire, Kaser and Kurz, "Faster
// remainder by direct computation", 2019: exact for all such p and d).
struct Divisor {
    uint64_t m;
    int64_t d;
    explicit Divisor(int64_t divisor) : m(UINT64_MAX / uint64_t(divisor) + 1), d(divisor) {}
    int64_t quotient(int64_t p) const {
#if defined(__SIZEOF_INT128__)
        return int64_t((unsigned __int128)m * uint64_t(p) >> 64);
#else
        return p / d;
#endif
    }
};


// chunk(begin, end, stream) over the elements of s in parallel, chunks of about
// chunk_elements that end on cache lines of out, so that no line is written by two threads
// and streamed chunks start whole.
template <class T, class Chunk>
void for_each_line_chunk(Shape s, int threads, const T* out, const Chunk& chunk_body) {
    const int team = team_size(s, threads);
    const bool stream = streams<T>(s);
    const int64_t total = s.size();
    constexpr int64_t line = 64 / int64_t(sizeof(T));
    const int64_t chunk = ceil_div(chunk_elements(s, team), line) * line;
    const int64_t first_end = std::min(total, elements_to_line(out) + chunk);
    parallel_writes(team, 1 + ceil_div(total - first_end, chunk), 1, stream, [&](int64_t item, int) BNORM_INLINE_LAMBDA {
        const int64_t begin = item == 0 ? 0 : first_end + (item - 1) * chunk;
        chunk_body(begin, item == 0 ? first_end : std::min(total, begin + chunk), stream);
    });
}

// span(offset, n, position, stream) over the whole of s (writes_spans) in parallel, n
// elements from `offset` that lie in one outer index, the first at `position` (offset
// modulo channels * inner).
template <class T, class Span>
void for_each_span(Shape s, int threads, const T* out, const Span& span) {
    const int64_t row = s.channels * s.inner;
    for_each_line_chunk(s, threads, out, [&](int64_t begin, int64_t end, bool stream) BNORM_INLINE_LAMBDA {
        for (int64_t o = begin / row; begin < end; ++o) {  // (a chunk may cross outer indices)
            const int64_t stop = std::min(end, (o + 1) * row);
            span(begin, stop - begin, begin - o * row, stream);
            begin = stop;
        }
    });
}

// The coefficients (K per-channel arrays) of the vectors of a span, in lanes L: each vector
// blends the broadcasts of its channel and of the next, held from vector to vector, at the
// lane where the next channel starts (split_lanes; none for a vector within one channel).
// write_run asks for its vectors in order but for the ends' (computed first), so the
// channel steps forward by one where it can and is found by a Divisor where not. The
// channel and six broadcasts computed for every vector made float16 spans of 10x10 to 14x14
// 1.1-1.35x the time of the runs; a branch on whether a vector crosses made GCC keep
// bfloat16's groups of 8 in memory (1.3x the time of these blends).
template <class T, int K>
struct SpanCoefficients {
    using P = param_t<T>;
    using V = Simd<P>;  // (spans are only written with vectors: a span shorter than one is scalar)
    std::array<const P*, K> arrays;
    Divisor inner;
    int64_t last;      // the last channel
    int64_t c, begin;  // the channel held, and its first position
    typename V::R current[K]{}, next[K]{};

    SpanCoefficients(std::array<const P*, K> a, Divisor d, int64_t channels, int64_t position)
        : arrays(a), inner(d), last(channels - 1), c(0), begin(-3 * d.d) {  // (no channel held: seek finds it)
        seek(position);
    }

    void seek(int64_t p) {
        if (p >= begin + inner.d && p < begin + 2 * inner.d) {
            ++c, begin += inner.d;
            for (int k = 0; k < K; ++k) current[k] = next[k];
        } else {
            c = inner.quotient(p), begin = c * inner.d;
            for (int k = 0; k < K; ++k) current[k] = V::set(arrays[k][c]);
        }
        const int64_t n = std::min(c + 1, last);
        for (int k = 0; k < K; ++k) next[k] = V::set(arrays[k][n]);
    }

    template <class L>
    BNORM_INLINE auto at(int64_t p) {
        if constexpr (L::width == 1) {
            const int64_t channel = inner.quotient(p);
            std::array<P, K> k;
            for (int j = 0; j < K; ++j) k[j] = arrays[j][channel];
            return k;
        } else {
            static_assert(L::width == V::width, "x and coefficient vectors have the same lanes");
            if (uint64_t(p - begin) >= uint64_t(inner.d)) seek(p);
            const int64_t first = begin + inner.d - p;  // lanes in channel c
            struct Lanes {
                typename V::R k[K];
                const typename V::R& operator[](int j) const { return k[j]; }
            } lanes;
            for (int j = 0; j < K; ++j) lanes.k[j] = split_lanes(current[j], next[j], std::min<int64_t>(first, L::width));
            return lanes;
        }
    }
};

// Whether the unfused pass writing out streams it as spans (for_each_span, above).
template <class T>
bool writes_spans(Shape s, const T* out) {
    if (s.inner < kSpanMin || s.channels < 2 || s.channels * s.inner >= (int64_t(1) << 32)) return false;
    if (!streams<T>(s)) return s.inner < kSpanCached;
    const int64_t longest = sizeof(T) >= 4 ? kSpanStreamedBytes / int64_t(sizeof(T)) : kSpanMax;
    return !whole_lines(out, s.inner) && s.inner < longest;
}

// Rows (inner == 1) shorter than kRowRunBytes whose output streams and are not whole cache
// lines are written as runs of whole rows per chunk (for_each_line_chunk) instead of
// row by row: the rows of (64, 56, 56, 64) float32 channels-last are 256 bytes, five lines
// from NumPy's 16-byte offset, two of them partial, with ordinary stores (write_run); the
// pass ran at 0.78x the bandwidth of the same bytes as 56x56 planes. A vector's lanes may
// wrap into the next row: its coefficients are loaded from RowCycle's arrays, each channel's
// coefficient array followed by its first lanes again. Rows of 2 KiB or more gain nothing
// as runs (0.87-1.11x the time; docs/performance.md, "What each step bought").
constexpr int64_t kRowRunBytes = 1536;

template <class T>
bool writes_row_runs(Shape s, const T* out) {
    return s.inner == 1 && s.channels >= 2 && s.channels * int64_t(sizeof(T)) < kRowRunBytes && streams<T>(s) &&
           !whole_lines(out, s.channels);
}

// K per-channel coefficient arrays, each repeated for a vector's lanes past its end
// (channels + kLanes elements), and the channel of a run's elements from its position in
// its row (at(position), for affine_row and backward_row: position + i modulo channels).
template <class P, int K>
struct RowCycle {
    static constexpr int64_t kLanes = 64;  // (at least any Simd's width)
    Scratch<P> storage;
    int64_t stride;
    Divisor channels;

    RowCycle(std::array<const P*, K> arrays, int64_t C) : storage(K * (C + kLanes)), stride(C + kLanes), channels(C) {
        for (int k = 0; k < K; ++k)
            for (int64_t i = 0; i < stride; ++i) storage[size_t(k * stride + i)] = arrays[k][i % C];
    }
    const P* array(int k) const { return storage.data() + k * stride; }

    struct Channel {
        int64_t position;
        Divisor channels;
        int64_t operator()(int64_t i) const {
            const int64_t p = position + i;
            return p - channels.quotient(p) * channels.d;
        }
    };
    Channel at(int64_t position) const { return {position, channels}; }
};

}  // namespace
}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
