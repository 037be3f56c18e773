// bnorm: shared types of the public C++ API.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

// The library is built with hidden symbols: only what these headers declare is exported.
#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

namespace bnorm {

/// An array viewed around its channel axis. A C-contiguous array of any rank with
/// channel axis `a` is exactly the 3-D block (outer, channels, inner):
/// outer = prod(shape[:a]), channels = shape[a], inner = prod(shape[a+1:]).
/// NCHW with axis 1 is (N, C, H*W); NHWC with axis -1 is (N*H*W, C, 1).
struct Shape {
    int64_t outer = 0;
    int64_t channels = 0;
    int64_t inner = 0;

    /// Values per channel, the M that statistics reduce over.
    int64_t count() const { return outer * inner; }
    /// Elements in the whole array.
    int64_t size() const { return outer * channels * inner; }
};

/// A bad argument value or shape. Python sees it as ValueError.
class ValueError : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

/// An argument of the wrong element type. Python sees it as TypeError.
class TypeError : public std::invalid_argument {
public:
    using std::invalid_argument::invalid_argument;
};

/// A failure reported by the CUDA runtime; the message carries CUDA's error string.
class CudaError : public std::runtime_error {
public:
    using std::runtime_error::runtime_error;
};

/// IEEE 754 binary16, as stored (bit-compatible with numpy.float16 and CUDA's __half).
struct half {
    uint16_t bits;
};

/// bfloat16, as stored (bit-compatible with CUDA's __nv_bfloat16 and ml_dtypes.bfloat16).
struct bfloat16 {
    uint16_t bits;
};

/// The type of statistics, weight, bias and running buffers for elements of type T:
/// float for 16-bit elements, else T itself. Accumulation is at least float32.
template <class T> struct param_type { using type = T; };
template <> struct param_type<half> { using type = float; };
template <> struct param_type<bfloat16> { using type = float; };
template <class T> using param_t = typename param_type<T>::type;

/// The activation of the fused epilogue.
enum class Activation { none, relu };

/// The fused epilogue of normalize, forward_train and forward_infer:
/// y = activation(BN(x) + residual), rounded to T once. residual (null: no add) has x's
/// shape and layout; y may be residual itself, but not overlap it otherwise. The
/// statistics are those of x alone.
template <class T>
struct Epilogue {
    const T* residual = nullptr;
    Activation activation = Activation::none;
};

/// The backward entry points' view of a fused forward's activation: with Activation::relu
/// they take g = dy * (y > 0) (ReLU's gradient; 0 where y is NaN) in place of dy, y being
/// the fused forward's output (required then; x's shape and layout). g is the gradient at
/// BN(x) + residual, so also the residual's gradient: the write passes can store it (dsum).
template <class T>
struct EpilogueGrad {
    Activation activation = Activation::none;
    const T* y = nullptr;
};

}  // namespace bnorm

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
