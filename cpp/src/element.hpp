// Any element type of the CPU backend to and from double, for the host-side loops that are
// not kernels (fold): 16-bit types go through float, with the kernels' rounding.
#pragma once

#include <type_traits>

#include "bnorm/types.hpp"
#include "half.hpp"

namespace bnorm::detail {

template <class T>
double to_double(T v) {
    if constexpr (std::is_same_v<T, half>) return double(half_to_float(v));
    else if constexpr (std::is_same_v<T, bfloat16>) return double(bfloat16_to_float(v));
    else return double(v);
}

template <class T>
T from_double(double v) {
    if constexpr (std::is_same_v<T, half>) return float_to_half(float(v));
    else if constexpr (std::is_same_v<T, bfloat16>) return float_to_bfloat16(float(v));
    else return T(v);
}

}  // namespace bnorm::detail
