// CPU kernels on raw pointers over the (outer, channels, inner) view.
//
// Arguments are trusted here: cpu_api.cpp checks them. Every reduction cuts each
// channel's values into tiles that depend on the shape alone and merges the tile results
// in a fixed order, so results never depend on the number of threads.
#pragma once

#include "bnorm/types.hpp"

namespace bnorm::kernels {

/// Per-channel mean and biased variance, in double (length shape.channels each).
template <class T>
void moments(const T* x, Shape shape, int threads, double* mean, double* var);

/// y = ((x - center[c]) - center_lo[c]) * scale[c] + shift[c]; y may be x.
/// center_lo carries the low part of a center more precise than P (a float32 x with a
/// double mean): x - center is exact near the center, so y stays accurate for |mean| >> std.
template <class T>
void affine(const T* x, Shape shape, int threads, const param_t<T>* center,
            const param_t<T>* center_lo, const param_t<T>* scale, const param_t<T>* shift, T* y);

/// Training forward: moments (double mean and biased var) and y normalized with
/// detail::train_affine of them. Equal, bit for bit, to moments then affine; where the
/// layout allows, each channel is normalized right after its statistics, from cache.
template <class T>
void forward_train(const T* x, Shape shape, int threads, double eps, const param_t<T>* weight,
                   const param_t<T>* bias, T* y, double* mean, double* var);

/// Per-channel sum(dy) and sum(dy * (x - mean[c])), in double.
template <class T>
void backward_sums(const T* dy, const T* x, Shape shape, int threads, const param_t<T>* mean,
                   double* sum_dy, double* sum_dy_xmu);

/// dx = (dy - dy_mean[c] - (x - mean[c]) * xmu_scale[c]) * scale[c]; dx may be dy or x.
template <class T>
void backward_dx(const T* dy, const T* x, Shape shape, int threads, const param_t<T>* mean,
                 const param_t<T>* dy_mean, const param_t<T>* xmu_scale,
                 const param_t<T>* scale, T* dx);

/// Backward with batch statistics: the P-rounded sums (sum_dy, sum_dy_xhat) and dx from
/// detail::backward_coefficients of them. Equal, bit for bit, to backward_sums then
/// backward_dx; where the layout allows, each channel's dx is written from cache.
template <class T>
void backward_train(const T* dy, const T* x, Shape shape, int threads, const param_t<T>* mean,
                    const param_t<T>* invstd, const param_t<T>* weight, T* dx,
                    param_t<T>* sum_dy, param_t<T>* sum_dy_xhat);

}  // namespace bnorm::kernels
