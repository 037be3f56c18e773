// bnorm CUDA backend: shared host and device helpers.
//
// Layout of the backend (ggml / llm.c style: kernels, their launchers, then the op entry):
//   common.hpp       errors, argument checks, element types, 16-byte loads/stores, workspace
//   reduce.hpp       the per-channel reductions (statistics; backward sums) for both layouts
//   elementwise.hpp  the per-element passes (normalize; backward dx) and per-channel prep
//   runtime.cu       available(), error strings, device attributes, workspace pool, merge_stats
//   forward.cu       batch_stats, normalize, forward_train, forward_infer
//   backward.cu      backward_reduce, backward_elemt, backward
//
// Kernels live in an anonymous namespace inside each header, so every .cu file gets its own
// copies of the templates it uses (no cross-TU device linking, no -rdc).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>

#include "bnorm/cuda.hpp"
#include "bnorm/types.hpp"
#include "checks.hpp"

namespace bnorm::cuda::detail {

// ---- errors --------------------------------------------------------------------------------

/// Clears the (non-sticky) error state and throws bnorm::CudaError with CUDA's error string.
[[noreturn]] void throw_cuda_error(cudaError_t err, const char* what, const char* file, int line);

inline void check_cuda(cudaError_t err, const char* what, const char* file, int line) {
    if (err != cudaSuccess) throw_cuda_error(err, what, file, line);
}

}  // namespace bnorm::cuda::detail

/// Every CUDA runtime call goes through this.
#define BNORM_CUDA_CHECK(expr) ::bnorm::cuda::detail::check_cuda((expr), #expr, __FILE__, __LINE__)
/// After every <<<...>>> launch: configuration errors (bad grid, no kernel image for this GPU).
#define BNORM_LAUNCH_CHECK(kernel_name) \
    ::bnorm::cuda::detail::check_cuda(cudaGetLastError(), "launch of " kernel_name, __FILE__, __LINE__)

namespace bnorm::cuda::detail {

constexpr int kThreads = 256;  // every kernel runs 256-thread blocks

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline int64_t next_pow2(int64_t v) {
    int64_t p = 1;
    while (p < v) p <<= 1;
    return p;
}

// ---- argument checks (host, before anything is enqueued): the CPU backend's -------------

using bnorm::detail::check_batch;
using bnorm::detail::check_eps;
using bnorm::detail::check_momentum;
using bnorm::detail::check_parts;
using bnorm::detail::check_pointer;
using bnorm::detail::check_shape;
using bnorm::detail::shape_string;

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// ---- device attributes and workspace (runtime.cu) ------------------------------------------

/// Number of SMs of the current device (cached per device).
int sm_count();

/// Scratch memory for one op call, stream-ordered: cudaMallocFromPoolAsync from a bnorm-owned
/// memory pool of the current device (release threshold 64 MiB, so small workspaces are reused
/// across calls without going back to the driver), freed with cudaFreeAsync on the same stream
/// when the op returns. No host synchronization, and capturable in CUDA graphs (the
/// allocation becomes a graph memory node). On devices without memory-pool support it falls
/// back to cudaMalloc/cudaFree (which synchronize). A cached buffer was rejected because calls
/// on different streams may run concurrently and would have to share it.
class Workspace {
public:
    Workspace(size_t bytes, cudaStream_t stream);
    ~Workspace();
    Workspace(const Workspace&) = delete;
    Workspace& operator=(const Workspace&) = delete;
    void* data() const { return ptr_; }

private:
    void* ptr_ = nullptr;
    cudaStream_t stream_;
    bool async_ = true;
};

/// Carves one allocation into 256-byte aligned regions.
class Layout {
public:
    template <class U>
    size_t add(int64_t count) {
        const size_t at = bytes_;
        bytes_ += (static_cast<size_t>(count) * sizeof(U) + 255) & ~size_t(255);
        return at;
    }
    size_t bytes() const { return bytes_; }

private:
    size_t bytes_ = 0;
};

template <class U>
U* region(void* base, size_t offset) {
    return reinterpret_cast<U*>(static_cast<char*>(base) + offset);
}

// ---- element types ---------------------------------------------------------------------------

/// Per element type: the accumulation type A (float, or double for double; it equals
/// param_t<T>) and kVec, the elements in one 16-byte load.
template <class T> struct Elem;
template <> struct Elem<float> { using A = float; static constexpr int kVec = 4; };
template <> struct Elem<double> { using A = double; static constexpr int kVec = 2; };
template <> struct Elem<half> { using A = float; static constexpr int kVec = 8; };
template <> struct Elem<bfloat16> { using A = float; static constexpr int kVec = 8; };
template <class T> using acc_t = typename Elem<T>::A;

__device__ __forceinline__ float to_acc(float v) { return v; }
__device__ __forceinline__ double to_acc(double v) { return v; }
__device__ __forceinline__ float to_acc(half v) { return __half2float(__ushort_as_half(v.bits)); }
__device__ __forceinline__ float to_acc(bfloat16 v) {
    return __bfloat162float(__ushort_as_bfloat16(v.bits));
}

template <class T> __device__ __forceinline__ T from_acc(acc_t<T> v);
template <> __device__ __forceinline__ float from_acc<float>(float v) { return v; }
template <> __device__ __forceinline__ double from_acc<double>(double v) { return v; }
template <> __device__ __forceinline__ half from_acc<half>(float v) {
    return half{__half_as_ushort(__float2half_rn(v))};
}
template <> __device__ __forceinline__ bfloat16 from_acc<bfloat16>(float v) {
    return bfloat16{__bfloat16_as_ushort(__float2bfloat16_rn(v))};
}

/// V consecutive elements, loaded as one 16-byte transaction when V * sizeof(T) == 16
/// (the caller guarantees 16-byte alignment then), or as one scalar when V == 1.
template <class T, int V>
__device__ __forceinline__ void load_vec(const T* p, acc_t<T>* out) {
    static_assert(V == 1 || V * sizeof(T) == 16, "vector loads are 16 bytes");
    if constexpr (V == 1) {
        out[0] = to_acc(*p);
    } else {
        const uint4 raw = *reinterpret_cast<const uint4*>(p);
        T v[V];
        memcpy(v, &raw, sizeof raw);
#pragma unroll
        for (int k = 0; k < V; ++k) out[k] = to_acc(v[k]);
    }
}

template <class T, int V>
__device__ __forceinline__ void store_vec(T* p, const acc_t<T>* in) {
    static_assert(V == 1 || V * sizeof(T) == 16, "vector stores are 16 bytes");
    if constexpr (V == 1) {
        *p = from_acc<T>(in[0]);
    } else {
        T v[V];
#pragma unroll
        for (int k = 0; k < V; ++k) v[k] = from_acc<T>(in[k]);
        uint4 raw;
        memcpy(&raw, v, sizeof raw);
        *reinterpret_cast<uint4*>(p) = raw;
    }
}

}  // namespace bnorm::cuda::detail
