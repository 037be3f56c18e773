// The CPU kernels' shared machinery, part 1: the thread team and the write passes.
//
// The kernels are split by op family, each file compiled once per instruction set (CMake
// builds every kernel source with BNORM_KERNEL_ISA = baseline, avx2, avx512, avx512bf16; the headers
// below put everything into that build's namespace):
//   cpu_passes.hpp      team size, parallel_writes, write_run, row blocks (this file)
//   cpu_spans.hpp       short planes written as spans of whole rows, short rows as runs of rows
//   cpu_reduce.hpp      partials and their merges, tiles, splits, reduce()
//   cpu_strips.hpp      the positions view, and the fused schedules (per channel, strips)
//   cpu_moments.hpp     the statistics' tile op and the training coefficients
//   cpu_statistics.cpp  moments
//   cpu_forward.cpp     affine (normalize, inference) and forward_train, with the epilogue
//   cpu_backward.cpp    backward_sums, backward_dx, backward (training and eval), with ReLU's gradient
//
// The design, over the (outer, channels, inner) view:
//
// Two schedules cover every layout:
//  - planes (inner > 1, e.g. NCHW): a channel's values are `outer` runs of `inner`
//    contiguous elements. Tiles are pieces of those runs, so each tile streams
//    contiguous memory for a single channel.
//  - rows (inner == 1, e.g. NHWC or (N, C)): x is an (outer, channels) matrix. Tiles are
//    blocks of rows times a block of channels, vectorized along the channels.
// Planes with short runs and rows with few channels run the rows schedule on a view of
// "positions" (Positions, cpu_strips.hpp). All vector code goes through Simd<T> (simd.hpp).
// A tile holds about kTileElems values, so the two passes of the shifted two-pass
// statistics read it from L1/L2, not DRAM. Tile results are merged in double (Chan's
// formula) in tile order (the positions of a channel, all of equal count, are folded by
// Positions::fold_channel in a fixed order of its own), and the tiles of a channel are
// split into a number of work items that depends only on the shape: the merge order, and
// therefore every bit of the result, is the same for any thread count.
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
#pragma once

#ifndef BNORM_KERNEL_ISA
#define BNORM_KERNEL_ISA baseline  // CMake compiles the kernel sources once per instruction set
#endif

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <type_traits>

#include "cpu_kernels.hpp"
#include "scratch.hpp"
#include "simd.hpp"
#include "threads.hpp"

// The inner loops are compiled as one piece whatever else their file holds (GCC's inlining
// decisions depend on it): a tile's reduction (BNORM_FLATTEN: its loops, lambdas and the
// vector layer inlined) and the write loops of a run or a row (BNORM_INLINE: inlined into
// the loop over runs, so that their coefficients stay in registers). When the kernels were
// split into files by op family, without them, single-thread inference ran 20-35% slower
// (write_run had become a call reloading its coefficients after every store) and rows
// reductions 5-15% slower. BNORM_INLINE_LAMBDA does the same for the lambdas between the
// loop over runs and a run's write loop: GCC called the bfloat16 inference run (its
// write_run is the largest) once per run, and a 7x7 run is 49 elements: (32, 256, 7, 7)
// in cache took 100 us against float16's 75, 81 us inlined (C++ harness, one thread).
#if defined(__GNUC__)
#define BNORM_FLATTEN __attribute__((flatten))
#define BNORM_INLINE inline __attribute__((always_inline))
#define BNORM_INLINE_LAMBDA __attribute__((always_inline))
#elif defined(_MSC_VER)
#define BNORM_FLATTEN
#define BNORM_INLINE __forceinline
#define BNORM_INLINE_LAMBDA
#else
#define BNORM_FLATTEN
#define BNORM_INLINE inline
#define BNORM_INLINE_LAMBDA
#endif

// The element types every kernel entry point is instantiated for.
#define BNORM_KERNEL_TYPES(X) X(float) X(double) X(half) X(bfloat16)

namespace bnorm::kernels::BNORM_KERNEL_ISA {
namespace {

using detail::Scratch;

constexpr int64_t kTileElems = 4096;        // planes tile: 16 KiB of float, both passes hit L1
constexpr int64_t kRowTileElems = 65536;    // rows tile (256 KiB of float, in L2): each ends in a merge per column
constexpr int64_t kRowTileRows = 256;       // rows tile: float sums of at most 256 values
constexpr int64_t kChannelBlock = 1024;     // channels per rows-schedule tile (RowWork arrays)
constexpr int64_t kWorkItems = 64;          // partials per call, enough for 64 threads
constexpr int64_t kStreamBytes = 4 << 20;   // outputs larger than this skip the caches

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The thread policy: a parallel region costs its caller the wake-up and the join of the
// team (a few microseconds on idle cores, a time slice of milliseconds when another process
// holds a team member's core), so each thread beyond the first needs kElemsPerThread
// elements of work to pay for itself, and calls smaller than that run on one thread, with
// no parallel region at all.
constexpr int64_t kElemsPerThread = 1 << 15;

inline int team_size(Shape s, int threads) {
    return int(std::clamp<int64_t>(s.size() / kElemsPerThread, 1, std::max(threads, 1)));
}

inline int64_t ns_since(std::chrono::steady_clock::time_point start) {
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

// The elements of T from p to the next 64-byte line (0 where p is on one, or where p is not
// aligned to T, whose elements then never reach a line boundary).
template <class T>
int64_t elements_to_line(const T* p) {
    const uintptr_t address = reinterpret_cast<uintptr_t>(p);
    return address % sizeof(T) == 0 ? int64_t((64 - address % 64) % 64 / sizeof(T)) : 0;
}

// Whether Simd S stores groups of S::kGroup vectors at once (store_group), and the end of
// a run that is not streamed whole (store_end).
template <class S, class = void>
struct StoresGroups : std::false_type {};
template <class S>
struct StoresGroups<S, std::void_t<decltype(S::kGroup)>> : std::true_type {};

// out[k] = value(L{}, k) for k < n: vectors with L = Simd<T>, scalars with L = Scalar<T>
// where a run is shorter than a vector. Both compute the same IEEE operations lane by
// lane, so the bits do not depend on the path. With `stream`, the whole cache lines of
// out are written with non-temporal stores (no read-for-ownership); the partial lines at
// either end get ordinary stores. (A non-temporal store to part of a line that also gets
// ordinary stores forces a partial write-combining flush: 32-byte float16 vectors
// streamed from a 32-byte boundary made channels-last float16 4x slower.) The ends are
// vectors too, the last one of each overlapping its neighbour: a scalar loop would cost
// more than the vector loop on short runs (a 14x14 plane, a 100-channel row). As out may be
// an input (in-place calls), an overlapping vector is computed before anything it overlaps
// is written: the head's first, the tail's first too, except in the unfused passes
// (kInputsFromMemory) over streamed runs of kLateTailBytes or more: there the tail's
// inputs, read first, lay a run ahead of the hardware prefetchers (a miss to memory per
// input and run that stalls the loop), so the loops stop short of it and the last line and
// vector get ordinary stores after it. (In one process against the tail-first build,
// benchmarks/ab_builds.py, 2 threads: (8192, 1024) float32 inference 0.80-0.86x the time,
// training 0.92-0.95x, backward 0.87-0.89x; channels-last (64, 28, 28, 512) backward
// 0.85-0.96x; where the inputs are cached, the fused per-channel passes of 28x28 planes,
// the ordinary stores made training and backward 3-8% slower, and runs of 256 B 20-30%.)
// Runs that the loops cover whole (a multiple of a vector from the first whole line) have
// no tail.
constexpr int64_t kLateTailBytes = 2048;

// kUnrollGroups: the groups' loops are unrolled whatever value holds (the write spans' value
// keeps coefficients from vector to vector, cpu_spans.hpp: left to GCC, it kept bfloat16's
// group of vectors in memory, 1.5-1.8x the time of inference of 6x6 to 8x8 planes). Only
// there: forced everywhere, it made the kernel sources 15-20% slower to compile.
template <bool kInputsFromMemory = false, bool kUnrollGroups = false, class T, class Value>
BNORM_INLINE void write_run(T* out, int64_t n, bool stream, const Value& value) {
    using S = Simd<T>;
    constexpr int64_t W = S::width;
    constexpr int64_t line = 64 / int64_t(sizeof(T));  // elements per cache line
    static_assert(line % W == 0, "vectors tile a cache line");
    if (W == 1 || n < W) {
        for (int64_t i = 0; i < n; ++i) Scalar<T>::store(out + i, value(Scalar<T>{}, i));
        return;
    }
    if constexpr (StoresGroups<S>::value) {  // (Simd<bfloat16> in the avx512bf16 build)
        if (!stream) {  // groups, then the rest held whole (store_end)
            constexpr int G = S::kGroup;
            const typename S::R tail = n % W != 0 ? value(S{}, n - W) : S::set(0);  // before what it overlaps
            typename S::R v[G];
            int64_t i = 0;
            for (; i + G * W <= n; i += G * W) {
                if constexpr (kUnrollGroups) {
                    _Pragma("GCC unroll 8") for (int64_t k = 0; k < G; ++k) v[k] = value(S{}, i + k * W);
                } else {
                    for (int64_t k = 0; k < G; ++k) v[k] = value(S{}, i + k * W);
                }
                S::template store_group<false, G>(out + i, v);
            }
            // A rest of whole pairs (runs of 64 elements: 8x8 planes) goes pair by pair, each
            // tested on its own; held whole as below, bfloat16 inference and training of (32,
            // 256, 8, 8) took 1.15-1.2x float16's time, now 1.0-1.1x (C++ harness through the
            // public API, one thread, in cache). The rest held whole is in an array of its
            // own, indexed by constants only: v (indexed at run time above) kept it in memory.
            if (n % (2 * W) == 0) {
                for (; i < n; i += 2 * W) {
                    typename S::R pair[2] = {value(S{}, i), value(S{}, i + W)};
                    S::template store_group<false, 2>(out + i, pair);
                }
                return;
            }
            const int full = int((n - i) / W);
            typename S::R end[G]{};
#pragma GCC unroll 8
            for (int k = 0; k < G; ++k)
                if (k < full) end[k] = value(S{}, i + k * W);
            S::store_end(out + i, n - i, end, full, tail);
            return;
        }
    }
    const bool lines = stream && reinterpret_cast<uintptr_t>(out) % sizeof(T) == 0;
    const int64_t start = lines ? std::min<int64_t>(n, elements_to_line(out)) : 0;
    const int64_t head_at = std::max<int64_t>(start - W, 0);
    typename S::R head_end{};  // (none without streaming: start is 0)
    if (start > 0) head_end = value(S{}, head_at);
    const bool ragged = (n - start) % W != 0;  // the loops leave a partial vector at the end
    // (streaming, the tail is computed when the loops reach it, see above)
    const bool late_tail = kInputsFromMemory && ragged && lines && n * int64_t(sizeof(T)) >= kLateTailBytes;
    const int64_t end = late_tail ? n - W : n;  // where the groups and lines stop
    typename S::R tail{};
    if (ragged && !late_tail) tail = value(S{}, n - W);
    int64_t i = 0;
    for (; i + W <= start; i += W) S::store(out + i, value(S{}, i));
    const int64_t head_done = i;
    i = start;
    if constexpr (StoresGroups<S>::value) {  // streamed lines in groups, then pairs (unstreamed: above)
        static_assert(2 * W % line == 0, "groups of whole cache lines");
        const auto groups = [&](auto size) {
            constexpr int G = decltype(size)::value;
            typename S::R group[G];
            for (; i + G * W <= end; i += G * W) {
                if constexpr (kUnrollGroups) {
                    _Pragma("GCC unroll 8") for (int64_t k = 0; k < G; ++k) group[k] = value(S{}, i + k * W);
                } else {
                    for (int64_t k = 0; k < G; ++k) group[k] = value(S{}, i + k * W);
                }
                S::template store_group<true, G>(out + i, group);
            }
        };
        if (lines) groups(std::integral_constant<int, S::kGroup>{}), groups(std::integral_constant<int, 2>{});
    }
    if (lines)
        for (; i + line <= end; i += line)
            for (int64_t v = 0; v < line; v += W) S::stream(out + i + v, value(S{}, i + v));
    if (late_tail) tail = value(S{}, n - W);
    for (; i + W <= n; i += W) S::store(out + i, value(S{}, i));  // (after a late tail: up to a line and a vector)
    if (start > head_done) store_lanes<T>(out + head_at, head_end, head_done - head_at, start - head_at);
    if (ragged) {  // (no line of an unstreamed run is streamed: one masked store)
        if (lines) store_lanes<T>(out + n - W, tail, i - (n - W), W);
        else store_lanes_cached<T>(out + n - W, tail, i - (n - W), W);
    }
}

// The unstreamed write of `rows` rows of n elements, `stride` elements apart:
// out[at] = value(L{}, coefficients(L{}, k), at) for at = r * stride + k, k < n, with
// coefficients(L, k) the per-column values at column k (L's lanes of them) and value the
// output from them (its inputs at `at`). Rows go kGroup at a time, so that each column
// vector's coefficients are loaded once for the group: the rows of inference load three
// coefficient vectors beside each vector of x (training four, backward four beside x and
// dy), and row by row, (256, 512) float32 inference in L2 took 2x a copy, in groups of
// four 1.45x (one thread, C++ harness; (1024, 512), 2 MB in L3: 1.85x -> 1.4x). The same
// IEEE operations lane by lane as write_run, so the same bits; as there, a ragged row's
// last vector overlaps the one before and is computed before anything it overlaps is
// written (in-place calls). A column's values are computed for every row of the group
// before any is stored, so that no load follows a store to the same address modulo 4096
// (rows of 2 KB in arrays at equal page offsets, as large NumPy arrays are, would put row
// r + 2's load there; the CPU can take such a load for dependent on the store). A
// precaution, not measured on its own: it was added while looking for the fused strips'
// slowdown (cpu_forward.cpp), which it did not remove.
constexpr int kRowGroup = 4;

// The lanes of per-column coefficient arrays (of param_t<T>, the accumulation type) beside
// lanes L of T in the rows writes: a vector of as many lanes, or a scalar where L is one.
template <class T, class L>
using CoefficientLanes = std::conditional_t<L::width == 1, Scalar<param_t<T>>, Simd<param_t<T>>>;

// The channel of element i of a row segment whose first element is channel 0 (the rows
// schedule; RowCycle::Channel where a run of whole rows wraps, cpu_spans.hpp).
struct SameChannel {
    int64_t operator()(int64_t i) const { return i; }
};

template <int kGroup = kRowGroup, class T, class Coefficients, class Value>
BNORM_INLINE void write_rows(T* out, int64_t stride, int64_t rows, int64_t n, const Coefficients& coefficients,
                             const Value& value) {
    using S = Simd<T>;
    constexpr int64_t W = S::width;
    if (W == 1 || n < W) {
        for (int64_t r = 0; r < rows; ++r)
            for (int64_t k = 0; k < n; ++k)
                Scalar<T>::store(out + r * stride + k, value(Scalar<T>{}, coefficients(Scalar<T>{}, k), r * stride + k));
        return;
    }
    const bool ragged = n % W != 0;
    const auto group = [&](int64_t r, auto size) BNORM_INLINE_LAMBDA {
        constexpr int G = decltype(size)::value;
        typename S::R tail[G]{};  // (set where ragged)
        if (ragged) {
            const auto k = coefficients(S{}, n - W);
            for (int g = 0; g < G; ++g) tail[g] = value(S{}, k, (r + g) * stride + n - W);
        }
        int64_t i = 0;
        for (; i + W <= n; i += W) {  // (every row's value before any store: see above)
            const auto k = coefficients(S{}, i);
            typename S::R v[G];
            for (int g = 0; g < G; ++g) v[g] = value(S{}, k, (r + g) * stride + i);
            if constexpr (StoresGroups<S>::value)  // (Simd<bfloat16>: narrowed in pairs of rows)
                S::template store_rows<G>(out + r * stride + i, stride, v);
            else
                for (int g = 0; g < G; ++g) S::store(out + (r + g) * stride + i, v[g]);
        }
        if (ragged)
            for (int g = 0; g < G; ++g) store_lanes_cached<T>(out + (r + g) * stride + n - W, tail[g], i - (n - W), W);
    };
    int64_t r = 0;
    for (; r + kGroup <= rows; r += kGroup) group(r, std::integral_constant<int, kGroup>{});
    for (; r < rows; ++r) group(r, std::integral_constant<int, 1>{});
}

// The elements (chunk_elements; rows_per_chunk: whole rows of row_length elements) handed
// out at a time by the elementwise loops of s: about kChunkElems, fewer when that would
// leave fewer than 8 chunks per thread.
// Small chunks, alternating between threads, keep restarting the hardware prefetchers:
// with 4096-element chunks (64, 256, 28, 28) float32 inference took 2.1 ms instead of
// 1.1 ms, float16 1.5 ms instead of 0.5 ms (2 threads, AMD EPYC).
constexpr int64_t kChunkElems = 65536;

inline int64_t chunk_elements(Shape s, int team) {
    return std::clamp<int64_t>(s.size() / (8 * int64_t(team)), kTileElems, kChunkElems);
}

inline int64_t rows_per_chunk(Shape s, int team, int64_t row_length) {
    return std::max<int64_t>(1, chunk_elements(s, team) / std::max<int64_t>(row_length, 1));
}

// body(r0, rows, c0, c1) for the columns [c0, c1) of the rows [r0, r0 + rows) of the rows
// schedule, in parallel. Rows wider than kWriteColumns are handed out as chunks of rows
// times a block of columns, so that the block's coefficient arrays (up to four per column)
// stay in L1 while its rows are written: read across whole rows from L2 they took four
// loads per value and made (64, 16384) inference 1.7x a copy.
constexpr int64_t kWriteColumns = 2048;

template <class Body>
void for_row_blocks(Shape s, int team, bool stream, const Body& body) {
    const int64_t C = s.channels, width = std::min(C, kWriteColumns);
    const int64_t blocks = ceil_div(C, width), rows = rows_per_chunk(s, team, width);
    parallel_writes(team, ceil_div(s.outer, rows) * blocks, 1, stream, [&](int64_t item, int) {
        const int64_t r0 = item / blocks * rows, c0 = item % blocks * width;
        body(r0, std::min(s.outer, r0 + rows) - r0, c0, std::min(C, c0 + width));
    });
}

template <class T>
bool streams(Shape s) {
    return s.size() * int64_t(sizeof(T)) >= kStreamBytes;
}

// The schedule of the unfused write passes (out, of T, written from per-channel
// coefficients), in parallel: planes (s.inner > 1) call run(c, offset, stream) for each
// run of s.inner elements (channel c, at offset), rows call row(offset, rows, c0, c1,
// stream) for the columns [c0, c1) of blocks of rows (the first at offset). They stream
// when the output is large, planes only when their runs are at least kStreamRunBytes long
// or whole cache lines: a
// short run is mostly the partial lines at its ends, which get ordinary stores and a copy
// through a buffer (write_run), and streaming the line or two between them cost more than
// it saved. Measured in one process against the build that streamed every run
// (benchmarks/ab_builds.py, AMD EPYC, 2 threads unless said; NumPy's large arrays start
// 16 bytes into a line), inference: float32 (256, 1024, 6, 6) 0.32x the time, (256, 2048,
// 7, 7) 0.53-0.70x (1 thread 0.44x), (256, 512, 10, 10) 0.60-0.85x; float16 (256, 1024,
// 8, 8) 0.69x, (64, 1024, 14, 14) 0.77x; the unfused passes of (256, 2048, 7, 7) training
// and backward 0.80x and 0.87x. Slower unstreamed: runs of 784 bytes (14x14 float32),
// 1.10-1.14x, and float32 8x8 planes (256 bytes) on 2 threads, 1.04-1.30x (on 1 thread
// 0.78-1.23x), which still stream when they are whole lines. Rows keep streaming:
// unstreamed, the 256-byte rows of (64, 56, 56, 64) channels-last (51 MB) took 1.2x the
// time. So do the fused per-channel passes, whose threads write a channel's runs a plane
// apart: unstreamed, (128, 1024, 8, 8) training took 1.26x the time.
constexpr int64_t kStreamRunBytes = 512;

// Whether runs of `run` elements of T laid end to end from `out` are whole cache lines each.
template <class T>
bool whole_lines(const T* out, int64_t run) {
    return reinterpret_cast<uintptr_t>(out) % 64 == 0 && run * int64_t(sizeof(T)) % 64 == 0;
}

// Whether a pass writing `out` (of shape s) streams it, by the rule above.
template <class T>
bool streams_output(Shape s, const T* out) {
    return streams<T>(s) &&
           (s.inner == 1 || s.inner * int64_t(sizeof(T)) >= kStreamRunBytes || whole_lines(out, s.inner));
}

template <class T, class Run, class Row>
void for_each_write(Shape s, int threads, const T* out, const Run& run, const Row& row) {
    const int team = team_size(s, threads);
    const int64_t C = s.channels;
    const bool stream = streams_output(s, out);
    if (s.inner > 1)
        parallel_writes(team, s.outer * C, rows_per_chunk(s, team, s.inner), stream,
                        [&](int64_t r, int) BNORM_INLINE_LAMBDA { run(r % C, r * s.inner, stream); });
    else
        for_row_blocks(s, team, stream,
                       [&](int64_t r0, int64_t rows, int64_t c0, int64_t c1) { row(r0 * C + c0, rows, c0, c1, stream); });
}

}  // namespace
}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
