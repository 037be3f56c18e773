// bnorm CUDA backend: the per-element passes and the small per-channel kernels.
//
// Two kernels, both with 16-byte vectors when every pointer involved is 16-byte aligned
// (else scalars) and kEwIlp vectors in flight per thread (all loads issued before any math):
//
// flat_elementwise_kernel (inner > 1: NCHW, ...) streams the flat array with a grid-stride
//   loop over a grid of one full wave (resident_blocks). The channel of an element, (e / inner) % C, is
//   tracked incrementally per slot (one 64-bit division per thread at start, none in the
//   loop). When inner is a multiple of the vector width a vector lies in one channel and its
//   coefficients are loaded once (a broadcast: the lanes of a warp share one or two
//   channels); otherwise (odd inner) they are reloaded only where the channel changes inside
//   the vector. The < V trailing elements are done by block 0 with scalar accesses.
//
// rows_elementwise_kernel (inner == 1: NHWC, (N, C)) maps threads like row_reduce_kernel:
//   TX lanes along one 128-byte line of a row (V channels each), TY lanes down the rows. A
//   thread's channels never change, so their coefficients are loaded once into registers;
//   a flat walk would instead look up 3-4 coefficients per element at a different channel
//   in every lane, several L1 wavefronts per element, far above what L1 serves at DRAM rate.
//
// y may alias x, dx may alias dy or x: each element is read and then written by the same
// thread.
//
// Formulas (as the CPU backend's, per-channel coefficients rounded to P once):
//   Forward        y  = ((x - center) - center_lo) * (scale [* scale2]) + shift
//   BackwardTrain  dx = (dy - dy_mean - (x - center) * xmu_scale) * scale
//   BackwardEval   dx = dy * scale
// with the fused epilogue (EwEpilogue): Forward adds the residual and applies ReLU to y;
// Backward* read g = mask > 0 ? dy : 0 in place of dy (ReLU's gradient, the mask being the
// fused forward's y) and store g to dsum, in the same pass.
#pragma once

#include <algorithm>
#include <array>
#include <atomic>

#include "common.hpp"

namespace bnorm::cuda::detail {
namespace {

enum class Ew { Forward, BackwardTrain, BackwardEval };

constexpr int kEwIlp = 4;  // vectors in flight per thread

/// Blocks of `kernel` (kThreads threads each) that one SM of the current device holds at
/// once, from its register and shared-memory use (cached per device: a process may drive GPUs
/// of different architectures). The grids below are one full wave of it: their blocks all do
/// the same work, so a grid of a fixed 8 blocks per SM on a kernel of which 5 fit (48
/// registers) ran in two rounds, the second 60% full: 82% of copy bandwidth for inference on an
/// H200, 88% with one wave. (Only the speed depends on it: every grid covers every element.)
template <auto kernel>
int64_t resident_blocks() {
    constexpr int kDevices = 64;
    static std::array<std::atomic<int>, kDevices> cached{};  // 0: not yet known
    int device = 0;
    BNORM_CUDA_CHECK(cudaGetDevice(&device));
    int blocks = device >= 0 && device < kDevices ? cached[size_t(device)].load(std::memory_order_relaxed) : 0;
    if (blocks == 0) {
        BNORM_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, kernel, kThreads, 0));
        blocks = std::max(blocks, 1);
        if (device >= 0 && device < kDevices) cached[size_t(device)].store(blocks, std::memory_order_relaxed);
    }
    return blocks;
}

/// Per-channel coefficient arrays (length C). Null optional pointers mean 0 (center_lo,
/// shift) or 1 (scale2).
template <class P>
struct EwCoefs {
    const P* center = nullptr;
    const P* center_lo = nullptr;
    const P* scale = nullptr;
    const P* scale2 = nullptr;
    const P* shift = nullptr;
    const P* dy_mean = nullptr;
    const P* xmu_scale = nullptr;
};

/// The fused epilogue of one pass (null pointers: none). Forward: y = relu?(value + residual);
/// Backward*: g = mask > 0 ? dy : 0 replaces dy, and dsum = g is stored when dsum is set.
template <class T>
struct EwEpilogue {
    const T* residual = nullptr;
    bool relu = false;
    const T* mask = nullptr;
    T* dsum = nullptr;

    bool aligned() const { return aligned16(residual) && aligned16(mask) && aligned16(dsum); }
};

/// ReLU as the CPU kernels compute it (MAXPS's rule): NaN passes through, -0 stays -0.
template <class A>
__device__ __forceinline__ A relu(A v) {
    return A(0) > v ? A(0) : v;
}

/// Backward*: the V gradients at element `at` masked with ReLU's gradient, stored to dsum.
template <class T, int V>
__device__ __forceinline__ void mask_gradient(const EwEpilogue<T>& e, int64_t at, acc_t<T>* g) {
    if (!e.mask) return;
    acc_t<T> m[V];
    load_vec<T, V>(e.mask + at, m);
#pragma unroll
    for (int j = 0; j < V; ++j) g[j] = m[j] > acc_t<T>(0) ? g[j] : acc_t<T>(0);
    if (e.dsum) store_vec<T, V>(e.dsum + at, g);
}

/// Forward: the V outputs at element `at` plus the residual, then ReLU.
template <class T, int V>
__device__ __forceinline__ void forward_epilogue(const EwEpilogue<T>& e, int64_t at, acc_t<T>* r) {
    if (e.residual) {
        acc_t<T> z[V];
        load_vec<T, V>(e.residual + at, z);
#pragma unroll
        for (int j = 0; j < V; ++j) r[j] = r[j] + z[j];
    }
    if (e.relu) {
#pragma unroll
        for (int j = 0; j < V; ++j) r[j] = relu(r[j]);
    }
}

/// The kernels' form of a public forward epilogue.
template <class T>
EwEpilogue<T> forward_epilogue_of(const Epilogue<T>& e) {
    EwEpilogue<T> out;
    out.residual = e.residual;
    out.relu = e.activation == Activation::relu;
    return out;
}

struct EwIndex {
    int64_t nvec;            // whole vectors
    int64_t inner, channels;
    int64_t block_col, block_ch;  // kThreads vectors as (columns, channels) steps
    int64_t grid_col, grid_ch;    // one grid-stride iteration as (columns, channels) steps
    int64_t vstride;              // vectors per grid-stride iteration
    int tail;                     // trailing elements after nvec vectors
};

template <class P>
struct ChannelCoef {
    P center, center_lo, scale, shift, dy_mean, xmu_scale;
};

template <Ew MODE, class P>
__device__ __forceinline__ ChannelCoef<P> coef_of(const EwCoefs<P>& k, int64_t c) {
    ChannelCoef<P> r{};
    r.scale = __ldg(k.scale + c);
    if constexpr (MODE == Ew::Forward) {
        r.center = __ldg(k.center + c);
        r.center_lo = k.center_lo ? __ldg(k.center_lo + c) : P(0);
        if (k.scale2) r.scale = r.scale * __ldg(k.scale2 + c);
        r.shift = k.shift ? __ldg(k.shift + c) : P(0);
    } else if constexpr (MODE == Ew::BackwardTrain) {
        r.center = __ldg(k.center + c);
        r.dy_mean = __ldg(k.dy_mean + c);
        r.xmu_scale = __ldg(k.xmu_scale + c);
    }
    return r;
}

/// a is x (Forward) or dy (Backward*); b is x (BackwardTrain).
template <Ew MODE, class A>
__device__ __forceinline__ A apply(A a, A b, const ChannelCoef<A>& k) {
    if constexpr (MODE == Ew::Forward) return ((a - k.center) - k.center_lo) * k.scale + k.shift;
    else if constexpr (MODE == Ew::BackwardTrain) return (a - k.dy_mean - (b - k.center) * k.xmu_scale) * k.scale;
    else return a * k.scale;
}

__device__ __forceinline__ void advance(int64_t& col, int64_t& ch, int64_t dcol, int64_t dch,
                                        const EwIndex& ix) {
    col += dcol;
    int64_t carry = 0;
    if (col >= ix.inner) {
        col -= ix.inner;
        carry = 1;
    }
    ch += dch + carry;
    if (ch >= ix.channels) ch -= ix.channels;
}

struct EwRows {
    int64_t outer, channels;
    int64_t cvecs;  // channels / V
    int64_t rows_per_block;
};

template <class T, int V, bool kSameChannel, Ew MODE>
__global__ void __launch_bounds__(kThreads)
flat_elementwise_kernel(const T* a, const T* b, T* out, EwCoefs<acc_t<T>> k, EwIndex ix, EwEpilogue<T> ep) {
    using A = acc_t<T>;
    constexpr bool kTwo = MODE == Ew::BackwardTrain;
    int64_t base = int64_t(blockIdx.x) * (kThreads * kEwIlp) + threadIdx.x;  // slot 0's vector
    int64_t col[kEwIlp], ch[kEwIlp];
    {
        const int64_t e = base * V;
        const int64_t row = e / ix.inner;
        col[0] = e - row * ix.inner;
        ch[0] = row % ix.channels;
    }
#pragma unroll
    for (int i = 1; i < kEwIlp; ++i) {
        col[i] = col[i - 1];
        ch[i] = ch[i - 1];
        advance(col[i], ch[i], ix.block_col, ix.block_ch, ix);
    }

    for (; base < ix.nvec; base += ix.vstride) {
        A va[kEwIlp][V], vb[kEwIlp][V];
#pragma unroll
        for (int i = 0; i < kEwIlp; ++i) {
            const int64_t v = base + int64_t(i) * kThreads;
            if (v < ix.nvec) {
                load_vec<T, V>(a + v * V, va[i]);
                if constexpr (kTwo) load_vec<T, V>(b + v * V, vb[i]);
                if constexpr (MODE != Ew::Forward) mask_gradient<T, V>(ep, v * V, va[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < kEwIlp; ++i) {
            const int64_t v = base + int64_t(i) * kThreads;
            if (v < ix.nvec) {
                A r[V];
                if constexpr (kSameChannel) {
                    const ChannelCoef<A> kc = coef_of<MODE>(k, ch[i]);
#pragma unroll
                    for (int j = 0; j < V; ++j) r[j] = apply<MODE>(va[i][j], kTwo ? vb[i][j] : A(0), kc);
                } else {
                    int64_t cc = col[i], c = ch[i], loaded = ch[i];
                    ChannelCoef<A> kc = coef_of<MODE>(k, c);
#pragma unroll
                    for (int j = 0; j < V; ++j) {
                        if (c != loaded) {
                            kc = coef_of<MODE>(k, c);
                            loaded = c;
                        }
                        r[j] = apply<MODE>(va[i][j], kTwo ? vb[i][j] : A(0), kc);
                        if (++cc == ix.inner) {
                            cc = 0;
                            if (++c == ix.channels) c = 0;
                        }
                    }
                }
                if constexpr (MODE == Ew::Forward) forward_epilogue<T, V>(ep, v * V, r);
                store_vec<T, V>(out + v * V, r);
            }
        }
#pragma unroll
        for (int i = 0; i < kEwIlp; ++i) advance(col[i], ch[i], ix.grid_col, ix.grid_ch, ix);
    }

    if (blockIdx.x == 0 && int(threadIdx.x) < ix.tail) {
        const int64_t e = ix.nvec * V + threadIdx.x;
        const int64_t c = (e / ix.inner) % ix.channels;
        A va0 = to_acc(a[e]);
        const A vb0 = kTwo ? to_acc(b[e]) : A(0);
        if constexpr (MODE != Ew::Forward) mask_gradient<T, 1>(ep, e, &va0);
        A r0 = apply<MODE>(va0, vb0, coef_of<MODE>(k, c));
        if constexpr (MODE == Ew::Forward) forward_epilogue<T, 1>(ep, e, &r0);
        out[e] = from_acc<T>(r0);
    }
}

template <class T, int V, Ew MODE>
__global__ void __launch_bounds__(kThreads)
rows_elementwise_kernel(const T* a, const T* b, T* out, EwCoefs<acc_t<T>> k, EwRows p, EwEpilogue<T> e) {
    using A = acc_t<T>;
    constexpr bool kTwo = MODE == Ew::BackwardTrain;
    const int64_t cv = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (cv >= p.cvecs) return;  // no barriers in this kernel
    const int64_t C = p.channels, c0 = cv * V, TY = blockDim.y;
    ChannelCoef<A> kc[V];
#pragma unroll
    for (int j = 0; j < V; ++j) kc[j] = coef_of<MODE>(k, c0 + j);
    const int64_t r0 = int64_t(blockIdx.y) * p.rows_per_block;
    const int64_t r1 = min(p.outer, r0 + p.rows_per_block);
    for (int64_t r = r0 + threadIdx.y; r < r1; r += TY * kEwIlp) {
        A va[kEwIlp][V], vb[kEwIlp][V];
#pragma unroll
        for (int i = 0; i < kEwIlp; ++i) {
            const int64_t row = r + i * TY;
            if (row < r1) {
                load_vec<T, V>(a + row * C + c0, va[i]);
                if constexpr (kTwo) load_vec<T, V>(b + row * C + c0, vb[i]);
                if constexpr (MODE != Ew::Forward) mask_gradient<T, V>(e, row * C + c0, va[i]);
            }
        }
#pragma unroll
        for (int i = 0; i < kEwIlp; ++i) {
            const int64_t row = r + i * TY;
            if (row < r1) {
                A res[V];
#pragma unroll
                for (int j = 0; j < V; ++j) res[j] = apply<MODE>(va[i][j], kTwo ? vb[i][j] : A(0), kc[j]);
                if constexpr (MODE == Ew::Forward) forward_epilogue<T, V>(e, row * C + c0, res);
                store_vec<T, V>(out + row * C + c0, res);
            }
        }
    }
}

/// Enqueues one elementwise pass over the whole array (nothing when it is empty), with the
/// fused epilogue e (none by default).
template <Ew MODE, class T>
void launch_elementwise(const T* a, const T* b, T* out, Shape s, const EwCoefs<acc_t<T>>& k,
                        cudaStream_t stream, const EwEpilogue<T>& e = {}) {
    constexpr int V = Elem<T>::kVec;
    const int64_t n = s.size();
    if (n == 0) return;
    const bool aligned =
        aligned16(a) && aligned16(out) && (MODE != Ew::BackwardTrain || aligned16(b)) && e.aligned();
    if (s.inner == 1) {
        const bool vec = aligned && s.channels % V == 0;
        const int v = vec ? V : 1;
        EwRows p{s.outer, s.channels, s.channels / v, 0};
        const int64_t tx = std::min<int64_t>(128 / (v * int64_t(sizeof(T))), next_pow2(p.cvecs));
        const int64_t ty = kThreads / tx;
        const int64_t slices = ceil_div(p.cvecs, tx);
        if (slices > INT32_MAX) throw ValueError("bnorm: too many channels for the CUDA backend: " + shape_string(s));
        const int64_t wave = int64_t(sm_count()) * (vec ? resident_blocks<rows_elementwise_kernel<T, V, MODE>>()
                                                        : resident_blocks<rows_elementwise_kernel<T, 1, MODE>>());
        // (rounded down: one block past the wave would take a whole second round)
        int64_t blocks = std::clamp<int64_t>(wave / slices, 1, std::min<int64_t>(65535, ceil_div(s.outer, ty * kEwIlp)));
        p.rows_per_block = ceil_div(s.outer, blocks);
        blocks = ceil_div(s.outer, p.rows_per_block);
        const dim3 g{unsigned(slices), unsigned(blocks), 1u}, blk{unsigned(tx), unsigned(ty), 1u};
        if (vec)
            rows_elementwise_kernel<T, V, MODE><<<g, blk, 0, stream>>>(a, b, out, k, p, e);
        else
            rows_elementwise_kernel<T, 1, MODE><<<g, blk, 0, stream>>>(a, b, out, k, p, e);
        BNORM_LAUNCH_CHECK("rows_elementwise_kernel");
        return;
    }
    const bool vec = n >= V && aligned;
    const int v = vec ? V : 1;
    EwIndex ix{};
    ix.nvec = n / v;
    ix.tail = int(n - ix.nvec * v);
    ix.inner = s.inner;
    ix.channels = s.channels;
    using Kernel = void (*)(const T*, const T*, T*, EwCoefs<acc_t<T>>, EwIndex, EwEpilogue<T>);
    Kernel kernel;
    int64_t per_sm;
    if (!vec) {
        kernel = flat_elementwise_kernel<T, 1, true, MODE>;
        per_sm = resident_blocks<flat_elementwise_kernel<T, 1, true, MODE>>();
    } else if (s.inner % V == 0) {
        kernel = flat_elementwise_kernel<T, V, true, MODE>;
        per_sm = resident_blocks<flat_elementwise_kernel<T, V, true, MODE>>();
    } else {
        kernel = flat_elementwise_kernel<T, V, false, MODE>;
        per_sm = resident_blocks<flat_elementwise_kernel<T, V, false, MODE>>();
    }
    const int64_t needed = ceil_div(ix.nvec, int64_t(kThreads) * kEwIlp);
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sm_count()) * per_sm));
    ix.vstride = grid * kThreads * kEwIlp;
    const int64_t block_elems = int64_t(kThreads) * v, grid_elems = ix.vstride * v;
    ix.block_col = block_elems % s.inner;
    ix.block_ch = (block_elems / s.inner) % s.channels;
    ix.grid_col = grid_elems % s.inner;
    ix.grid_ch = (grid_elems / s.inner) % s.channels;
    kernel<<<dim3(unsigned(grid)), dim3(unsigned(kThreads)), 0, stream>>>(a, b, out, k, ix, e);
    BNORM_LAUNCH_CHECK("flat_elementwise_kernel");
}

// ---- per-channel kernels (one thread per channel) -------------------------------------------

inline dim3 channel_grid(int64_t channels) { return dim3(unsigned(ceil_div(channels, kThreads))); }

/// value -> a[0, C)
template <class P>
__global__ void __launch_bounds__(kThreads) fill_kernel(int64_t channels, P* a, P value) {
    const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (c < channels) a[c] = value;
}

template <class P>
void launch_fill(P* a, int64_t channels, P value, cudaStream_t stream) {
    if (channels == 0) return;
    fill_kernel<P><<<channel_grid(channels), kThreads, 0, stream>>>(channels, a, value);
    BNORM_LAUNCH_CHECK("fill_kernel");
}

/// Inference: scale = P(1 / sqrt(running_var + eps)) [* weight], as the CPU rounds it.
template <class P>
__global__ void __launch_bounds__(kThreads)
infer_prep_kernel(int64_t channels, const P* running_var, const P* weight, double eps, P* scale) {
    const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (c >= channels) return;
    const P invstd = P(1.0 / sqrt(double(running_var[c]) + eps));
    scale[c] = weight ? P(invstd * weight[c]) : invstd;
}

/// backward_elemt's coefficients from the reduced sums (CPU: cpu_api.cpp backward_elemt).
template <class P>
__global__ void __launch_bounds__(kThreads)
elemt_prep_kernel(int64_t channels, const P* invstd, const P* weight, const P* sum_dy,
                  const P* sum_dy_xhat, double count, P* dy_mean, P* xmu_scale, P* scale) {
    const int64_t c = int64_t(blockIdx.x) * kThreads + threadIdx.x;
    if (c >= channels) return;
    const P is = invstd[c];
    dy_mean[c] = P(double(sum_dy[c]) / count);
    xmu_scale[c] = P(double(is) * double(sum_dy_xhat[c]) / count);
    scale[c] = weight ? P(is * weight[c]) : is;
}

}  // namespace
}  // namespace bnorm::cuda::detail
