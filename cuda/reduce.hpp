// bnorm CUDA backend: per-channel reductions over the (outer, channels, inner) view.
//
// Two kernels, one per layout, both parameterized by an Op (statistics in forward.cu,
// backward sums in backward.cu):
//
// plane_reduce_kernel (inner > 1: NCHW, NCL, ...). A channel's M values are `outer` runs of
//   `inner` contiguous elements. Never one block per channel (64 channels would leave most of
//   an H100 idle): the channel's items (16-byte vectors when inner is a multiple of the vector
//   width and x is 16-byte aligned, else single elements) are numbered row-major over
//   (outer, inner / V) and cut into `splits` equal contiguous chunks, one per block, with
//   grid = channels * splits ~ kTargetBlocks. Consecutive threads take consecutive items, so
//   every warp load is contiguous within a row; a thread steps by 256 items, tracking
//   (row, column) incrementally (no division in the loop).
//
// row_reduce_kernel (inner == 1: NHWC, (N, C)). x is an (outer, channels) matrix. A block is
//   TX x TY threads: TX lanes cover one 128-byte line of a row (TX * V channels, vectorized
//   along C), TY lanes walk rows. Blocks own a slice of channels and a range of rows; the
//   grid is (channel slices) x (row blocks) ~ kTargetBlocks.
//
// Numerics mirror the CPU backend. Every thread loads U items into registers (U * V values
// of one channel, issued back to back for memory-level parallelism) and reduces that register
// tile with the shifted two-pass of the CPU (sum of x - K with K the tile's first value, then
// the corrected sum of squared deviations); tiles merge with Chan's formula in float (double
// for float64 x). All values are first centered on a per-block shift (x at the block's first
// position), so float accumulation error is relative to the spread of the data, not its
// magnitude: a channel with |mean| >> std keeps a double-accurate mean, and a constant
// channel (even 1e20) gives mean == that value and var == 0 exactly. Thread results merge in a
// fixed tree inside the block (warp shuffles, or shared memory across TY), the block result
// becomes a double partial, and partials merge in double in a fixed order.
//
// Merging across blocks is deterministic and atomic-free for floating point: the
// last-block-done pattern. Each block writes its double partial to the workspace,
// __threadfence(), then takes a ticket from a per-channel (per-slice) counter with one
// integer atomicAdd; the block that draws the last ticket merges all partials of its
// channel(s) in index order (each thread a fixed strided subset, then a fixed tree) and runs
// Op::finish, which writes the per-channel outputs (statistics, running buffers, the
// coefficients of the elementwise pass). When a channel has a single block, no workspace,
// counter or atomic is involved at all. The grid depends only on the shape and on whether the
// pointers are 16-byte aligned, so results are bitwise identical run to run and across GPUs.
//
// The Op interface (StatsOp in forward.cu, GradOp in backward.cu):
//   using State = ...;  // per thread and block, in A = acc_t<T>; State{} is the empty result
//   using Final = ...;  // across blocks, in double; mergeable, load_partial-able
//   static constexpr int kInputs;          // 1: x;  2: x and dy
//   static constexpr bool kShiftFromData;  // center values on x at the block's first position,
//                                          // or on op.center_of(c)
//   A center_of(int64_t c) const;
//   template <int N> void tile(State&, const A* x, const A* dy, A center) const;  // N values
//   Final to_final(const State&, A center) const;
//   void finish(int64_t c, const Final&) const;  // once per channel, writes the outputs
#pragma once

#include <algorithm>

#include "common.hpp"

namespace bnorm::cuda::detail {
namespace {

constexpr int64_t kTargetBlocks = 2048;  // about 2 waves of 8 blocks per SM on an H100 (132 SMs)
// Fewest register tiles per thread in row_reduce_kernel's blocks, where rows allow.
constexpr int64_t kMinRowTiles = 8;
// Bound on the serial part of the last block's merge (partials per thread, before its tree).
constexpr int64_t kMaxPartialsPerThread = 32;

// ---- partial results --------------------------------------------------------------------

/// count, mean, and sum of squared deviations from the mean
template <class A> struct Moments {
    A n, mean, m2;
};

/// sum(dy) and sum(dy * (x - mean))
template <class A> struct Sums {
    A dy, dy_xmu;
};

/// Chan et al.: (a, b) -> a, in the operand order given (the order is part of the result).
template <class A>
__device__ __forceinline__ void merge(Moments<A>& a, const Moments<A>& b) {
    if (!(b.n > 0)) return;
    if (!(a.n > 0)) {
        a = b;
        return;
    }
    const A n = a.n + b.n;
    const A f = b.n / n;
    const A delta = b.mean - a.mean;
    a.mean += delta * f;
    a.m2 += b.m2 + delta * delta * (a.n * f);
    a.n = n;
}

template <class A>
__device__ __forceinline__ void merge(Sums<A>& a, const Sums<A>& b) {
    a.dy += b.dy;
    a.dy_xmu += b.dy_xmu;
}

template <class A>
__device__ __forceinline__ Moments<A> shfl_down(const Moments<A>& v, int offset) {
    return {__shfl_down_sync(0xffffffffu, v.n, offset), __shfl_down_sync(0xffffffffu, v.mean, offset),
            __shfl_down_sync(0xffffffffu, v.m2, offset)};
}

template <class A>
__device__ __forceinline__ Sums<A> shfl_down(const Sums<A>& v, int offset) {
    return {__shfl_down_sync(0xffffffffu, v.dy, offset), __shfl_down_sync(0xffffffffu, v.dy_xmu, offset)};
}

// Partials written by other blocks are read through L2 (ld.global.cg), never a stale L1 line.
__device__ __forceinline__ Moments<double> load_partial(const Moments<double>* p) {
    return {__ldcg(&p->n), __ldcg(&p->mean), __ldcg(&p->m2)};
}
__device__ __forceinline__ Sums<double> load_partial(const Sums<double>* p) {
    return {__ldcg(&p->dy), __ldcg(&p->dy_xmu)};
}

/// The CPU's tile statistics on N register values of one channel, centered on `center`:
/// shifted first pass (K = the first value), corrected second pass, m2 clamped at 0 (NaN
/// passes through).
template <int N, class A>
__device__ __forceinline__ Moments<A> tile_moments(const A* v, A center) {
    static_assert(N > 0 && (N & (N - 1)) == 0, "tiles are powers of two: 1/N is exact");
    constexpr A inv_n = A(1) / A(N);
    A d[N];
#pragma unroll
    for (int i = 0; i < N; ++i) d[i] = v[i] - center;
    const A k = d[0];
    A sum = 0;
#pragma unroll
    for (int i = 1; i < N; ++i) sum += d[i] - k;
    const A mean1 = k + sum * inv_n;
    A dev = 0, dev_sq = 0;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const A e = d[i] - mean1;
        dev += e;
        dev_sq += e * e;
    }
    const A m2 = dev_sq - dev * dev * inv_n;
    return {A(N), mean1 + dev * inv_n, m2 < 0 ? A(0) : m2};
}

// ---- block-level pieces -----------------------------------------------------------------------

/// Merges the states of a 1-D block of kThreads threads in a fixed tree; thread 0 gets the
/// result.
template <class State>
__device__ __forceinline__ State block_reduce(State st, State* warp_sm) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) merge(st, shfl_down(st, offset));
    if (lane == 0) warp_sm[warp] = st;
    __syncthreads();
    if (warp == 0) {
        st = lane < kThreads / 32 ? warp_sm[lane] : State{};
#pragma unroll
        for (int offset = kThreads / 64; offset > 0; offset >>= 1) merge(st, shfl_down(st, offset));
    }
    return st;
}

/// The last-block-done handshake: every thread calls it after this block's partials are
/// stored; returns true in every thread of the one block that arrives last for `counter`.
__device__ __forceinline__ bool arrive_last(unsigned* counter, unsigned blocks, bool* flag_sm) {
    __threadfence();  // this block's partials are visible device-wide before its ticket
    __syncthreads();
    if (threadIdx.x == 0 && threadIdx.y == 0) *flag_sm = atomicAdd(counter, 1u) == blocks - 1;
    __syncthreads();
    const bool last = *flag_sm;
    if (last) __threadfence();  // and the partial loads below are ordered after the ticket
    return last;
}

/// In the last block: merges `parts` partials of each of `nch` channels c_begin + k (nch a
/// power of two dividing kThreads; the first `nvalid` exist). Partial i of channel k is
/// partials[(c_begin + k) * ch_stride + i * part_stride]. Thread t takes channel t % nch and
/// the partials g, g + G, ... (g = t / nch, G = kThreads / nch) in order, then a fixed tree
/// over g; group 0 calls op.finish.
template <class Op>
__device__ void merge_partials(const Op& op, const typename Op::Final* partials, int64_t c_begin,
                               int nch, int nvalid, int64_t ch_stride, int64_t part_stride,
                               int64_t parts, typename Op::Final* sm) {
    using Final = typename Op::Final;
    const int t = threadIdx.y * blockDim.x + threadIdx.x;
    const int k = t % nch, g = t / nch, groups = kThreads / nch;
    Final acc{};
    if (k < nvalid) {
        const Final* p = partials + (c_begin + k) * ch_stride;
        for (int64_t i = g; i < parts; i += groups) merge(acc, load_partial(p + i * part_stride));
    }
    sm[t] = acc;
    __syncthreads();
    for (int stride = groups / 2; stride > 0; stride >>= 1) {
        if (g < stride) {
            merge(acc, sm[t + stride * nch]);
            sm[t] = acc;
        }
        __syncthreads();
    }
    if (g == 0 && k < nvalid) op.finish(c_begin + k, acc);
}

// ---- plans ----------------------------------------------------------------------------------

struct PlanePlan {
    int64_t channels, inner;
    int64_t width;   // items per row: inner / V
    int64_t items;   // items per channel: outer * width
    int64_t chunk;   // items per block
    int64_t splits;  // blocks per channel
    int64_t drow, dcol;  // kThreads items = drow rows + dcol items
    void* partials;      // Op::Final[channels * splits] (splits > 1)
    unsigned* counters;  // [channels] (splits > 1), zeroed before the launch
};

struct RowPlan {
    int64_t outer, channels;
    int64_t cvecs;           // channels / V
    int64_t rows_per_block;
    void* partials;          // Op::Final[row_blocks * channels] (row_blocks > 1)
    unsigned* counters;      // [channel slices] (row_blocks > 1), zeroed before the launch
};

/// Items per thread per register tile.
template <class T, int V> constexpr int plane_unroll() { return V == 1 ? 8 : 4; }
template <class T, int V> constexpr int row_unroll() {
    return V == 1 ? 8 : (sizeof(T) == 2 ? 4 : (sizeof(T) == 4 ? 8 : 4));
}

struct ReducePlan {
    bool rows = false;     // row_reduce_kernel (inner == 1) or plane_reduce_kernel
    bool vec = false;      // 16-byte vectors (V = Elem<T>::kVec) or scalars
    dim3 grid, block;
    int64_t partials = 0;  // Final entries needed in the workspace
    int64_t counters = 0;  // unsigned entries needed in the workspace
    PlanePlan plane{};
    RowPlan row{};

    void bind(void* partials_ptr, unsigned* counters_ptr) {
        plane.partials = row.partials = partials_ptr;
        plane.counters = row.counters = counters_ptr;
    }
};

/// Chooses the kernel, vector width and grid from the shape and the pointer alignment only.
/// Throws ValueError (before anything is enqueued) when the grid cannot be expressed.
template <class T>
ReducePlan plan_reduce(Shape s, bool pointers_aligned) {
    constexpr int V = Elem<T>::kVec;
    ReducePlan p;
    const int64_t C = s.channels;
    if (s.inner == 1) {
        p.rows = true;
        p.vec = pointers_aligned && C % V == 0;
        const int v = p.vec ? V : 1;
        const int unroll = p.vec ? row_unroll<T, V>() : row_unroll<T, 1>();
        const int64_t cvecs = C / v;
        const int64_t tx = std::min<int64_t>(128 / (v * int64_t(sizeof(T))), next_pow2(cvecs));
        const int64_t ty = kThreads / tx;
        const int64_t slices = ceil_div(cvecs, tx);
        const int64_t nch = tx * v;
        // (at least kMinRowTiles register tiles per thread: a block's tree and partial cost
        // about as much as that. On an H200 the statistics of (8192, 4096) bfloat16 read at
        // 0.74 TB/s in 2048 blocks of 2 tiles per thread, at 1.37 TB/s in 512 blocks of 8)
        int64_t blocks = std::clamp<int64_t>(ceil_div(kTargetBlocks, slices), 1,
                                             std::max<int64_t>(1, ceil_div(s.outer, ty * unroll * kMinRowTiles)));
        blocks = std::min<int64_t>(blocks, std::max<int64_t>(1, kMaxPartialsPerThread * kThreads / nch));
        blocks = std::min<int64_t>(blocks, 65535);
        const int64_t rows_per_block = ceil_div(s.outer, blocks);
        blocks = ceil_div(s.outer, rows_per_block);
        if (slices > INT32_MAX)
            throw ValueError("bnorm: too many channels for the CUDA backend: " + shape_string(s));
        p.grid = dim3(unsigned(slices), unsigned(blocks), 1);
        p.block = dim3(unsigned(tx), unsigned(ty), 1);
        p.row = RowPlan{s.outer, C, cvecs, rows_per_block, nullptr, nullptr};
        if (blocks > 1) {
            p.partials = blocks * C;
            p.counters = slices;
        }
    } else {
        p.vec = pointers_aligned && s.inner % V == 0;
        const int v = p.vec ? V : 1;
        const int unroll = p.vec ? plane_unroll<T, V>() : plane_unroll<T, 1>();
        const int64_t width = s.inner / v;
        const int64_t items = s.outer * width;
        int64_t splits = std::clamp<int64_t>(ceil_div(kTargetBlocks, C), 1,
                                             std::max<int64_t>(1, ceil_div(items, kThreads * unroll)));
        const int64_t chunk = ceil_div(items, splits);
        splits = ceil_div(items, chunk);
        if (C > INT32_MAX / splits)
            throw ValueError("bnorm: too many channels for the CUDA backend: " + shape_string(s));
        p.grid = dim3(unsigned(C * splits), 1, 1);
        p.block = dim3(kThreads, 1, 1);
        p.plane = PlanePlan{C, s.inner, width, items, chunk, splits,
                            kThreads / width, kThreads % width, nullptr, nullptr};
        if (splits > 1) {
            p.partials = C * splits;
            p.counters = C;
        }
    }
    return p;
}

// ---- kernels -------------------------------------------------------------------------------

template <class T, int V, int U, class Op>
__global__ void __launch_bounds__(kThreads)
plane_reduce_kernel(const T* __restrict__ x, const T* __restrict__ dy, Op op, PlanePlan pl) {
    using A = acc_t<T>;
    using State = typename Op::State;
    using Final = typename Op::Final;
    __shared__ State warp_sm[kThreads / 32];
    __shared__ Final final_sm[kThreads];
    __shared__ bool last_sm;

    const int64_t c = blockIdx.x / pl.splits;
    const int64_t split = blockIdx.x - c * pl.splits;
    const int64_t j0 = split * pl.chunk;
    const int64_t j1 = min(pl.items, j0 + pl.chunk);
    const int64_t row_stride = pl.channels * pl.inner;
    const T* xc = x + c * pl.inner;
    const T* gc = Op::kInputs == 2 ? dy + c * pl.inner : nullptr;

    A center;
    if constexpr (Op::kShiftFromData) {
        const int64_t r = j0 / pl.width;
        center = to_acc(xc[r * row_stride + (j0 - r * pl.width) * V]);
    } else {
        center = op.center_of(c);
    }

    State st{};
    const int64_t j = j0 + threadIdx.x;
    const int64_t nt = j < j1 ? (j1 - 1 - j) / kThreads + 1 : 0;
    int64_t row = j / pl.width, col = j - row * pl.width;
    // Loads this thread's next item (V values of x, and of dy) into xv, gv and steps on by
    // kThreads items.
    const auto load_next = [&](A* xv, A* gv) {
        const int64_t off = row * row_stride + col * V;
        load_vec<T, V>(xc + off, xv);
        if constexpr (Op::kInputs == 2) load_vec<T, V>(gc + off, gv);
        col += pl.dcol;
        row += pl.drow;
        if (col >= pl.width) {
            col -= pl.width;
            ++row;
        }
    };
    int64_t k = 0;
    for (; k + U <= nt; k += U) {
        A xv[U * V], gv[U * V];
#pragma unroll
        for (int u = 0; u < U; ++u) load_next(xv + u * V, gv + u * V);
        op.template tile<U * V>(st, xv, gv, center);
    }
    for (; k < nt; ++k) {
        A xv[V], gv[V];
        load_next(xv, gv);
        op.template tile<V>(st, xv, gv, center);
    }

    st = block_reduce(st, warp_sm);
    if (pl.splits == 1) {
        if (threadIdx.x == 0) op.finish(c, op.to_final(st, center));
        return;
    }
    Final* partials = static_cast<Final*>(pl.partials);
    if (threadIdx.x == 0) partials[c * pl.splits + split] = op.to_final(st, center);
    if (!arrive_last(pl.counters + c, unsigned(pl.splits), &last_sm)) return;
    merge_partials(op, partials, c, 1, 1, pl.splits, 1, pl.splits, final_sm);
}

template <class T, int V, int U, class Op>
__global__ void __launch_bounds__(kThreads)
row_reduce_kernel(const T* __restrict__ x, const T* __restrict__ dy, Op op, RowPlan pl) {
    using A = acc_t<T>;
    using State = typename Op::State;
    using Final = typename Op::Final;
    __shared__ State state_sm[kThreads * V];
    __shared__ Final final_sm[kThreads];
    __shared__ bool last_sm;

    const int tx = threadIdx.x, ty = threadIdx.y;
    const int TX = blockDim.x, TY = blockDim.y;
    const int tid = ty * TX + tx;
    const int64_t C = pl.channels;
    const int64_t cv = int64_t(blockIdx.x) * TX + tx;
    const bool valid = cv < pl.cvecs;
    const int64_t c0 = cv * V;
    const int64_t r0 = int64_t(blockIdx.y) * pl.rows_per_block;
    const int64_t r1 = min(pl.outer, r0 + pl.rows_per_block);

    A center[V];
#pragma unroll
    for (int ch = 0; ch < V; ++ch) center[ch] = A(0);
    if (valid) {
        if constexpr (Op::kShiftFromData) {
            load_vec<T, V>(x + r0 * C + c0, center);
        } else {
#pragma unroll
            for (int ch = 0; ch < V; ++ch) center[ch] = op.center_of(c0 + ch);
        }
    }

    State st[V];
#pragma unroll
    for (int ch = 0; ch < V; ++ch) st[ch] = State{};
    const int64_t r = r0 + ty;
    const int64_t nt = (valid && r < r1) ? (r1 - 1 - r) / TY + 1 : 0;
    const int64_t step = int64_t(TY) * C;
    int64_t off = r * C + c0;
    int64_t k = 0;
    for (; k + U <= nt; k += U) {
        A xv[U][V], gv[U][V];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            load_vec<T, V>(x + off, xv[u]);
            if constexpr (Op::kInputs == 2) load_vec<T, V>(dy + off, gv[u]);
            off += step;
        }
#pragma unroll
        for (int ch = 0; ch < V; ++ch) {
            A cx[U], cg[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                cx[u] = xv[u][ch];
                cg[u] = gv[u][ch];
            }
            op.template tile<U>(st[ch], cx, cg, center[ch]);
        }
    }
    for (; k < nt; ++k) {
        A xv[V], gv[V];
        load_vec<T, V>(x + off, xv);
        if constexpr (Op::kInputs == 2) load_vec<T, V>(dy + off, gv);
        off += step;
#pragma unroll
        for (int ch = 0; ch < V; ++ch) op.template tile<1>(st[ch], xv + ch, gv + ch, center[ch]);
    }

    // Fixed tree over the TY threads sharing this thread's channels.
#pragma unroll
    for (int ch = 0; ch < V; ++ch) state_sm[tid * V + ch] = st[ch];
    __syncthreads();
    for (int stride = TY / 2; stride > 0; stride >>= 1) {
        if (ty < stride) {
#pragma unroll
            for (int ch = 0; ch < V; ++ch) {
                merge(st[ch], state_sm[(tid + stride * TX) * V + ch]);
                state_sm[tid * V + ch] = st[ch];
            }
        }
        __syncthreads();
    }

    const bool single = gridDim.y == 1;
    Final* partials = static_cast<Final*>(pl.partials);
    if (ty == 0 && valid) {
#pragma unroll
        for (int ch = 0; ch < V; ++ch) {
            const Final f = op.to_final(st[ch], center[ch]);
            if (single)
                op.finish(c0 + ch, f);
            else
                partials[int64_t(blockIdx.y) * C + c0 + ch] = f;
        }
    }
    if (single) return;
    if (!arrive_last(pl.counters + blockIdx.x, gridDim.y, &last_sm)) return;
    const int nch = TX * V;
    const int64_t c_begin = int64_t(blockIdx.x) * nch;
    const int nvalid = int(min(int64_t(nch), C - c_begin));
    merge_partials(op, partials, c_begin, nch, nvalid, 1, C, gridDim.y, final_sm);
}

// ---- launcher ------------------------------------------------------------------------------

/// Enqueues the reduction: zeroes the counters (when the plan has any), then one kernel.
/// `dy` is used only by two-input ops.
template <class T, class Op>
void launch_reduce(const ReducePlan& p, const T* x, const T* dy, const Op& op, cudaStream_t stream) {
    constexpr int V = Elem<T>::kVec;
    if (p.counters > 0)
        BNORM_CUDA_CHECK(cudaMemsetAsync(p.plane.counters, 0, size_t(p.counters) * sizeof(unsigned), stream));
    if (p.rows) {
        if (p.vec)
            row_reduce_kernel<T, V, row_unroll<T, V>(), Op><<<p.grid, p.block, 0, stream>>>(x, dy, op, p.row);
        else
            row_reduce_kernel<T, 1, row_unroll<T, 1>(), Op><<<p.grid, p.block, 0, stream>>>(x, dy, op, p.row);
        BNORM_LAUNCH_CHECK("row_reduce_kernel");
    } else {
        if (p.vec)
            plane_reduce_kernel<T, V, plane_unroll<T, V>(), Op><<<p.grid, p.block, 0, stream>>>(x, dy, op, p.plane);
        else
            plane_reduce_kernel<T, 1, plane_unroll<T, 1>(), Op><<<p.grid, p.block, 0, stream>>>(x, dy, op, p.plane);
        BNORM_LAUNCH_CHECK("plane_reduce_kernel");
    }
}

}  // namespace
}  // namespace bnorm::cuda::detail
