// bnorm: the CPU backend's public API.
//
// Every function works on raw pointers to C-contiguous data viewed as a Shape
// (outer, channels, inner). T is float, double, bnorm::half or bnorm::bfloat16; P = param_t<T> is the
// type of every per-channel vector (length shape.channels): statistics, weight, bias,
// running buffers, gradients of weight and bias.
//
// Arguments are checked before anything is written: a call that throws (bnorm::ValueError
// for a bad value or size, with a message naming the operation and the argument) has
// modified nothing. Shapes must have no negative size and at most 2^63 - 1 elements.
// Pointers may be null only where marked ("may be null"), and the data pointers of an
// array with no elements. Outputs may alias inputs of the same shape (y may be x, dx may be
// dy or x); an output that overlaps an input only in part, or any per-channel input, gives
// undefined results, and so do running_mean and running_var that overlap each other.
// Results are bitwise identical for any thread count.
#pragma once

#include "bnorm/types.hpp"

// The library is built with hidden symbols: only what these headers declare is exported.
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

namespace bnorm {

/// Per-channel mean and biased variance of x (M = shape.count() values per channel),
/// computed with shifted two-pass sums per cache-sized tile merged with Chan's formula
/// (docs/math.md, Numerics), never as E[x^2] - E[x]^2. With M == 0, mean and var are 0.
template <class T>
void batch_stats(const T* x, Shape shape, param_t<T>* mean, param_t<T>* var);

/// Chan's parallel combination of `parts` partial statistics of `channels` channels.
/// counts, means, vars are row-major (parts, channels); vars are biased. Parts with a
/// count of 0 contribute nothing. Writes the per-channel total count, mean and biased
/// variance (0 and 0 where the total count is 0). Counts must be finite and >= 0, and
/// variances >= 0 where their count is not 0 (else ValueError; NaN passes to its channel).
template <class P>
void merge_stats(int64_t parts, int64_t channels, const double* counts, const P* means,
                 const P* vars, double* count, P* mean, P* var);

/// y = (x - mean) * invstd * weight + bias. weight and bias may be null (1 and 0).
template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, T* y);

/// Training forward: batch statistics, y = normalize(x), save_mean and
/// save_invstd = 1/sqrt(var + eps). weight and bias may be null (1 and 0); so may
/// running_mean / running_var: when not null they are updated in place with `momentum`
/// (running_var with the unbiased variance), after y is written, so they may alias weight
/// or bias. Throws ValueError when M == 1 (and x has elements), eps is not positive and
/// finite, momentum is outside [0, 1], or running_var holds a negative value. With M == 0, nothing is computed and running
/// buffers are left untouched (save_mean and save_invstd are set to 0 and 1/sqrt(eps)).
/// unbiased_running_var = false updates running_var with the biased variance instead
/// (the convention of Keras 3, Flax and ONNX; PyTorch and cuDNN use the unbiased one).
template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, T* y, param_t<T>* save_mean, param_t<T>* save_invstd,
                   bool unbiased_running_var = true);

/// Inference forward: y = (x - running_mean) / sqrt(running_var + eps) * weight + bias.
/// weight and bias may be null (1 and 0); eps must be positive and finite.
template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean,
                   const param_t<T>* running_var, const param_t<T>* weight,
                   const param_t<T>* bias, double eps, T* y);

/// The reduction phase of backward: sum_dy = sum(dy), sum_dy_xhat = sum(dy * xhat) per
/// channel, with xhat = (x - mean) * invstd.
template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                     const param_t<T>* invstd, param_t<T>* sum_dy, param_t<T>* sum_dy_xhat);

/// The elementwise phase of backward with batch statistics:
/// dx = weight * invstd * (dy - sum_dy / count - xhat * sum_dy_xhat / count).
/// `count` (> 0 and finite) is the number of values per channel the statistics were taken
/// over (across all shards when they were merged). weight may be null (1).
template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight,
                    const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    T* dx);

/// Whole backward. batch_stats = true: mean/invstd are the saved batch statistics and the
/// gradient flows through them; false: they are constants (eval mode), dx = dy * weight *
/// invstd. dweight = sum(dy * xhat), dbias = sum(dy) in both modes. weight may be null.
template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
              const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats, T* dx,
              param_t<T>* dweight, param_t<T>* dbias);

/// The same entry points with a fused epilogue (bnorm/types.hpp: Epilogue, EpilogueGrad),
/// one pass over memory where the plain op makes one: the forward ones write
/// y = activation(BN(x) + residual) (statistics of x alone); the backward ones take
/// g = dy * (y > 0) in place of dy when grad.activation is relu (grad.y required), and
/// backward_elemt and backward also write dsum = g, the gradient at BN(x) + residual (so
/// the residual's gradient) when dsum is not null, with no pass of their own (backward
/// writes it from its reduction where the data goes through memory twice). dx,
/// dweight and dbias are BN's gradients for g. dsum may be dy itself, and must not overlap
/// x, grad.y or dx otherwise; dx may be dy, x or grad.y. ValueError for an activation other
/// than none or relu, a null grad.y with relu, or outputs overlapping as excluded above.
template <class T>
void normalize(const T* x, Shape shape, const param_t<T>* mean, const param_t<T>* invstd,
               const param_t<T>* weight, const param_t<T>* bias, const Epilogue<T>& epilogue, T* y);

template <class T>
void forward_train(const T* x, Shape shape, const param_t<T>* weight, const param_t<T>* bias,
                   param_t<T>* running_mean, param_t<T>* running_var, double momentum,
                   double eps, const Epilogue<T>& epilogue, T* y, param_t<T>* save_mean,
                   param_t<T>* save_invstd, bool unbiased_running_var = true);

template <class T>
void forward_infer(const T* x, Shape shape, const param_t<T>* running_mean,
                   const param_t<T>* running_var, const param_t<T>* weight,
                   const param_t<T>* bias, double eps, const Epilogue<T>& epilogue, T* y);

template <class T>
void backward_reduce(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                     const param_t<T>* invstd, const EpilogueGrad<T>& grad, param_t<T>* sum_dy,
                     param_t<T>* sum_dy_xhat);

template <class T>
void backward_elemt(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight,
                    const param_t<T>* sum_dy, const param_t<T>* sum_dy_xhat, double count,
                    const EpilogueGrad<T>& grad, T* dx, T* dsum);

template <class T>
void backward(const T* dy, const T* x, Shape shape, const param_t<T>* mean,
              const param_t<T>* invstd, const param_t<T>* weight, bool batch_stats,
              const EpilogueGrad<T>& grad, T* dx, param_t<T>* dweight, param_t<T>* dbias,
              T* dsum);

/// Threads used by CPU calls: bnorm's own count, which other libraries' settings
/// (omp_set_num_threads, torch.set_num_threads) do not change, nor does it change theirs.
/// The default is OMP_NUM_THREADS, else the CPUs the affinity mask and a cgroup CPU quota
/// allow, capped at max_num_threads(); with it, calls run on one thread for a while after a
/// parallel call waited for a preempted thread (a busy machine). set_num_threads(n) fixes the
/// count at n. Calls too small to gain from threads run on fewer, down to one. n must be in
/// [1, max_num_threads()]: OpenMP runtimes crash on far larger teams. Results do not depend
/// on it. A process forked (POSIX fork()) keeps its threads (bnorm releases OpenMP's thread
/// pool before fork()); only one forked from inside an OpenMP parallel region runs
/// single-threaded, and set_num_threads(n > 1) throws ValueError there.
void set_num_threads(int n);
int get_num_threads();
/// max(1024, the number of processors): the largest n set_num_threads accepts.
int max_num_threads();
/// How many times, since the process started, a pass of a call ran on one thread because
/// the default thread count was backing off from a busy machine (never after
/// set_num_threads). A diagnostic: timings beside it tell whether they were one thread's.
int64_t backoff_count();

/// The instruction set of the CPU kernels in use: "baseline" (SSE2 on x86-64), "avx2",
/// "avx512" or "avx512bf16" (AVX-512 with its bfloat16 conversion): the widest this CPU runs
/// among those the library was built with (CMake option BNORM_KERNEL_ISAS, all by default),
/// unless the environment variable BNORM_CPU_ISA names a narrower one. Results are deterministic for a given instruction set; reductions may
/// differ in the last bits between instruction sets (vector widths change the sum order).
const char* cpu_isa();

}  // namespace bnorm

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
