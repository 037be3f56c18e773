// IEEE binary16 and bfloat16 <-> float32 conversion for the CPU backend (portable: no F16C
// or AVX-512 BF16 needed).
#pragma once

#include <cstdint>
#include <cstring>

#include "bnorm/types.hpp"

namespace bnorm::detail {

inline uint32_t float_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, sizeof u);
    return u;
}

inline float bits_float(uint32_t u) {
    float f;
    std::memcpy(&f, &u, sizeof f);
    return f;
}

inline float half_to_float(half h) {
    const uint32_t sign = uint32_t(h.bits & 0x8000u) << 16;
    const uint32_t exponent = (h.bits >> 10) & 0x1fu;
    const uint32_t mantissa = h.bits & 0x3ffu;
    if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));  // inf, nan
    if (exponent != 0) return bits_float(sign | ((exponent + 112) << 23) | (mantissa << 13));
    // zero or subnormal: mantissa * 2^-24, exact in float
    const float magnitude = float(mantissa) * 5.9604644775390625e-8f;
    return sign ? -magnitude : magnitude;
}

// Round to nearest even; overflow gives inf, nan stays nan.
inline half float_to_half(float f) {
    uint32_t u = float_bits(f);
    const uint32_t sign = u & 0x80000000u;
    u ^= sign;
    uint16_t out;
    if (u >= (127u + 16u) << 23) {  // |f| >= 65536, inf or nan
        out = u > 0x7f800000u ? 0x7e00 : 0x7c00;
    } else if (u < 113u << 23) {  // below 2^-14: subnormal or zero in half
        // Adding 0.5f puts the 10 result bits at the bottom of the mantissa, and the
        // FPU's round-to-nearest-even does the rounding.
        const float aligned = bits_float(u) + 0.5f;
        out = uint16_t(float_bits(aligned) - float_bits(0.5f));
    } else {
        const uint32_t mantissa_odd = (u >> 13) & 1u;
        u += (uint32_t(15 - 127) << 23) + 0xfffu + mantissa_odd;  // rebias, round half to even
        out = uint16_t(u >> 13);  // a carry into the exponent turns 65520+ into inf
    }
    return half{uint16_t(out | (sign >> 16))};
}

// bfloat16 is the top half of a float32: widening is exact.
inline float bfloat16_to_float(bfloat16 b) { return bits_float(uint32_t(b.bits) << 16); }

// Round to nearest even (ml_dtypes', PyTorch's and CUDA's rounding); overflow gives inf
// (the carry runs into the exponent). A NaN stays a NaN: its top half with the quiet bit
// set (sign and leading payload kept; ml_dtypes gives 0x7fc0 with the sign, one operation
// more per vector). Simd<bfloat16> in simd.hpp is the same on vectors.
inline bfloat16 float_to_bfloat16(float f) {
    const uint32_t u = float_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return bfloat16{uint16_t((u >> 16) | 0x40u)};
    return bfloat16{uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16)};
}

}  // namespace bnorm::detail
