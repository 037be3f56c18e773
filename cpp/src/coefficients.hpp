// Per-channel coefficients shared by the dispatch layer and the fused kernels, so that the
// fused and the phase-by-phase paths round the same way and give the same bits.
#pragma once

#include <cmath>

#include "bnorm/types.hpp"

namespace bnorm::detail {

// y = ((x - center) - center_lo) * scale + shift
template <class P>
struct Affine {
    P center, center_lo, scale, shift;
};

template <class P>
P invstd_of(double var, double eps) {
    return P(1.0 / std::sqrt(var + eps));
}

template <class P>
P scale_of(P invstd, const P* weight, int64_t c) {
    return weight ? P(invstd * weight[c]) : invstd;
}

// Training forward: center on the double mean, kept as a hi + lo pair of P (x - hi is exact
// near the mean, so float32 outputs stay accurate when |mean| >> std).
template <class P>
Affine<P> train_affine(double mean, P invstd, const P* weight, const P* bias, int64_t c) {
    const P hi = P(mean);
    return {hi, P(mean - double(hi)), scale_of(invstd, weight, c), bias ? bias[c] : P(0)};
}

// dx = (dy - dy_mean - (x - mean) * xmu_scale) * scale
template <class P>
struct BackwardCoefficients {
    P dy_mean, xmu_scale, scale;
};

// (batch_stats false, eval mode: the statistics are constants, dx = dy * scale)
template <class P>
BackwardCoefficients<P> backward_coefficients(P sum_dy, P sum_dy_xhat, P invstd, const P* weight, int64_t c,
                                              double count, bool batch_stats) {
    if (!batch_stats) return {P(0), P(0), scale_of(invstd, weight, c)};
    return {P(double(sum_dy) / count), P(double(invstd) * double(sum_dy_xhat) / count), scale_of(invstd, weight, c)};
}

// The P-rounded sums of the backward reduction from the double ones.
template <class P>
void round_backward_sums(double sum_dy, double sum_dy_xmu, P invstd, P& out_sum_dy, P& out_sum_dy_xhat) {
    out_sum_dy = P(sum_dy);
    out_sum_dy_xhat = P(sum_dy_xmu * double(invstd));
}

}  // namespace bnorm::detail
