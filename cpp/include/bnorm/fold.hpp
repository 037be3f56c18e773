// bnorm: folding an inference-mode batch normalization into the layer before it.
#pragma once

#include "bnorm/types.hpp"

#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

namespace bnorm {

/// Folds y = BN(layer(x)) with fixed statistics into the linear or convolution layer
/// before it: layer(x; weight_out, bias_out) == forward_infer(layer(x; weight, bias), ...)
/// up to rounding, with
///   scale[c]    = bn_weight[c] / sqrt(running_var[c] + eps)
///   weight_out  = weight * scale[c]          (every element of output channel c)
///   bias_out[c] = (bias[c] - running_mean[c]) * scale[c] + bn_bias[c]
/// `shape` views weight around its output-channel axis: (1, out, in) for a (out, in)
/// linear weight, (1, out, in * kh * kw) for an OIHW convolution, (kh * kw * in, out, 1)
/// for HWIO. bias, bn_weight and bn_bias may be null (0, 1, 0); bias and bias_out have
/// shape.channels elements of T, the statistics and bn_weight/bn_bias are param_t<T>.
/// Computed in double, rounded once to T (half and bfloat16: to float, then to T).
/// weight_out may be weight and bias_out may be bias (it is computed element by element).
/// Throws ValueError for a bad shape, eps not positive and finite, null required pointers
/// or a negative running_var (NaN passes through to that channel's outputs).
template <class T>
void fold(const T* weight, const T* bias, Shape shape, const param_t<T>* running_mean,
          const param_t<T>* running_var, const param_t<T>* bn_weight, const param_t<T>* bn_bias,
          double eps, T* weight_out, T* bias_out);

}  // namespace bnorm

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif
