// bnorm: the CUDA backend's public API (present when bnorm was built with CUDA;
// BNORM_HAS_CUDA is then defined to 1 by the CMake target).
//
// The same operations and semantics as the CPU API in bnorm/cpu.hpp, on device pointers,
// each enqueued on `stream` (nullptr: the legacy default stream) without host
// synchronization. T is float, double, bnorm::half or bnorm::bfloat16. Argument errors
// throw bnorm::ValueError before anything is enqueued; CUDA errors throw bnorm::CudaError
// with CUDA's error string. Results are identical run to run on one GPU architecture (no
// order-dependent atomics; compilers may contract differently for another architecture).
//
// Differences from the CPU API, all on purpose:
// - merge_stats reads counts on the device, where it cannot throw: invalid counts (negative,
//   non-finite) and negative variances give NaN statistics instead of a ValueError.
// - backward with batch_stats = true: dweight and dbias must not alias mean (they are
//   written before the elementwise pass reads mean); aliasing weight is fine.
// - Scratch memory comes from a per-device stream-ordered pool created on the first call
//   on that device: make one call before capturing a CUDA graph on a new device.
// - A CUDA error left pending by earlier, unrelated work is reported by the next launch
//   check (CUDA's last-error state is per thread), as in other CUDA libraries.
// - Kernels are built for sm_80, sm_86, sm_89 and sm_90 (+ PTX): older GPUs report
//   available() but every op throws CudaError "no kernel image".
#pragma once

#include <cstddef>

#include "bnorm/types.hpp"

struct CUstream_st;  // cudaStream_t is CUstream_st*: no CUDA header needed to use this API

// The library is built with hidden symbols: only what these headers declare is exported.
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

namespace bnorm::cuda {

using stream_t = CUstream_st*;

/// True when the CUDA runtime finds at least one usable device (false, never a throw,
/// on machines without a driver or GPU).
bool available();

/// Makes `device` the calling thread's current device (cudaSetDevice): every call below
/// runs on the current device, which must be the one that holds its pointers.
void set_device(int device);

/// Device memory on the current device (cudaMalloc), for outputs of callers that cannot
/// allocate writable device arrays themselves (JAX). Release with deallocate.
void* allocate(size_t bytes);
/// Frees memory from allocate (cudaFree); never throws.
void deallocate(void* pointer) noexcept;
/// Waits until the work enqueued on `stream` so far is done (cudaStreamSynchronize): before
/// outputs are handed to a framework that reads them on streams of its own (JAX).
void synchronize(stream_t stream);

template <class T>
void batch_stats(const T* x, Shape shape, param_t<T>* mean, param_t<T>* var,
                 stream_t stream = nullptr);

template <class P>
void merge_stats(int64_t parts, int64_t channels, const double* counts, const P* means,
                 const P* vars, double* count, P* mean, P* var, stream_t stream = nullptr);

template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, T* y,
               stream_t stream = nullptr);

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   stream_t stream = nullptr);

/// forward_train with unbiased_running_var = false: running_var is updated with the
/// biased variance (Keras 3, Flax, ONNX), as the CPU API's flag of the same name.
template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   bool unbiased_running_var, stream_t stream = nullptr);

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean,
                   const param_t<T>* running_var, const param_t<T>* weight,
                   const param_t<T>* bias, double eps, T* y, stream_t stream = nullptr);

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                     const param_t<T>* invstd, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat,
                     stream_t stream = nullptr);

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight,
                    const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    T* dx, stream_t stream = nullptr);

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
              const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats, T* dx,
              param_t<T>* dweight, param_t<T>* dbias, stream_t stream = nullptr);

/// The overloads with a fused epilogue (bnorm/types.hpp; semantics and checks as in
/// bnorm/cpu.hpp). The forward ones and backward_elemt apply it inside their elementwise
/// pass; backward and backward_reduce with ReLU first write g = dy * (y > 0) (to dsum, or to
/// scratch) in a pass of their own, then run the plain op on g.
template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, const Epilogue<T>& epilogue, T* y,
               stream_t stream = nullptr);

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, const Epilogue<T>& epilogue, T* y, param_t<T>* save_mean,
                   param_t<T>* save_invstd, stream_t stream = nullptr);

/// The fused forward_train with unbiased_running_var (false: the biased variance updates
/// running_var, as in the plain overload of the same flag).
template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, const Epilogue<T>& epilogue, T* y, param_t<T>* save_mean,
                   param_t<T>* save_invstd, bool unbiased_running_var, stream_t stream = nullptr);

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean,
                   const param_t<T>* running_var, const param_t<T>* weight,
                   const param_t<T>* bias, double eps, const Epilogue<T>& epilogue, T* y,
                   stream_t stream = nullptr);

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                     const param_t<T>* invstd, const EpilogueGrad<T>& grad, param_t<T>* sum_dy,
                     param_t<T>* sum_dy_xhat, stream_t stream = nullptr);

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight,
                    const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    const EpilogueGrad<T>& grad, T* dx, T* dsum, stream_t stream = nullptr);

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
              const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats,
              const EpilogueGrad<T>& grad, T* dx, param_t<T>* dweight, param_t<T>* dbias,
              T* dsum, stream_t stream = nullptr);

}  // namespace bnorm::cuda

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
