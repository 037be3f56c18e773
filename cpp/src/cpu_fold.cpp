// bnorm::fold: a batch normalization with fixed statistics folded into the layer before it.
// A one-off deployment step on weights, not a hot path: plain loops in double, one thread.
#include <cmath>
#include <vector>

#include "bnorm/fold.hpp"
#include "checks.hpp"
#include "element.hpp"

namespace bnorm {

#if defined(__GNUC__)
#pragma GCC visibility push(default)
#endif

template <class T>
void fold(const T* weight, const T* bias, Shape shape, const param_t<T>* running_mean,
          const param_t<T>* running_var, const param_t<T>* bn_weight, const param_t<T>* bn_bias,
          double eps, T* weight_out, T* bias_out) {
    const char* op = "fold";
    detail::check_shape(op, shape);
    detail::check_eps(op, eps);
    const int64_t C = shape.channels;
    if (C == 0) return;
    detail::check_pointer(op, running_mean, "running_mean");
    detail::check_pointer(op, running_var, "running_var");
    detail::check_pointer(op, bias_out, "bias_out");
    if (shape.size() > 0) {
        detail::check_pointer(op, weight, "weight");
        detail::check_pointer(op, weight_out, "weight_out");
    }
    detail::check_running_var(op, running_var, C);
    std::vector<double> scale(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c)
        scale[c] = (bn_weight ? double(bn_weight[c]) : 1.0) / std::sqrt(double(running_var[c]) + eps);
    for (int64_t o = 0; o < shape.outer; ++o)
        for (int64_t c = 0; c < C; ++c) {
            const int64_t offset = (o * C + c) * shape.inner;
            for (int64_t i = 0; i < shape.inner; ++i)
                weight_out[offset + i] = detail::from_double<T>(detail::to_double(weight[offset + i]) * scale[c]);
        }
    for (int64_t c = 0; c < C; ++c) {
        const double b = bias ? detail::to_double(bias[c]) : 0.0;
        const double shift = bn_bias ? double(bn_bias[c]) : 0.0;
        bias_out[c] = detail::from_double<T>((b - double(running_mean[c])) * scale[c] + shift);
    }
}

template void fold<float>(const float*, const float*, Shape, const float*, const float*, const float*,
                          const float*, double, float*, float*);
template void fold<double>(const double*, const double*, Shape, const double*, const double*, const double*,
                           const double*, double, double*, double*);
template void fold<half>(const half*, const half*, Shape, const float*, const float*, const float*,
                         const float*, double, half*, half*);
template void fold<bfloat16>(const bfloat16*, const bfloat16*, Shape, const float*, const float*, const float*,
                             const float*, double, bfloat16*, bfloat16*);

#if defined(__GNUC__)
#pragma GCC visibility pop
#endif

}  // namespace bnorm
