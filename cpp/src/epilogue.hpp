// The fused epilogue of the CPU kernels' passes (included by cpu_forward.cpp and
// cpu_backward.cpp, compiled per instruction set, so everything lives in that build's
// namespace, as in simd.hpp):
//  - forward write loops: y = act(value + residual), value being the normalized x;
//  - backward reductions and write loops: g = y > 0 ? dy : 0 (ReLU's gradient, the mask
//    taken from the fused forward's output y) in place of dy, and dsum = g written by the
//    same loop that writes dx (or, with two passes through memory, by the reduction's
//    tiles: BackwardSumsOp, cpu_backward.cpp).
// The variants are types chosen once per call (ForwardEpilogue, GradientMask), so the
// loops of the plain ops compile exactly as before and the fused ones carry no per-element
// branch on the variant.
#pragma once

#ifndef BNORM_KERNEL_ISA
#error "epilogue.hpp belongs to the kernel sources (cpu_passes.hpp), compiled per instruction set"
#endif

#include <cstdint>

#include "cpu_kernels.hpp"
#include "simd.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {

// relu(v) = max(0, v) with x86's MAXPS rule (the second operand where they compare equal
// or either is NaN): NaN passes through, -0 stays -0. The scalar and vector forms give the
// same bits, so a result does not depend on whether it came from a vector or a tail lane.
inline float relu(float v) { return 0.0f > v ? 0.0f : v; }
inline double relu(double v) { return 0.0 > v ? 0.0 : v; }
// ReLU's gradient: dy where y > 0, else 0 (y NaN: 0).
inline float relu_grad(float dy, float y) { return y > 0.0f ? dy : 0.0f; }
inline double relu_grad(double dy, double y) { return y > 0.0 ? dy : 0.0; }

#if BNORM_SIMD_X86
inline __m128 relu(__m128 v) { return _mm_max_ps(_mm_setzero_ps(), v); }
inline __m128d relu(__m128d v) { return _mm_max_pd(_mm_setzero_pd(), v); }
inline __m128 relu_grad(__m128 dy, __m128 y) { return _mm_and_ps(_mm_cmpgt_ps(y, _mm_setzero_ps()), dy); }
inline __m128d relu_grad(__m128d dy, __m128d y) { return _mm_and_pd(_mm_cmpgt_pd(y, _mm_setzero_pd()), dy); }
#if defined(__AVX__)
inline __m256 relu(__m256 v) { return _mm256_max_ps(_mm256_setzero_ps(), v); }
inline __m256d relu(__m256d v) { return _mm256_max_pd(_mm256_setzero_pd(), v); }
inline __m256 relu_grad(__m256 dy, __m256 y) {
    return _mm256_and_ps(_mm256_cmp_ps(y, _mm256_setzero_ps(), _CMP_GT_OQ), dy);
}
inline __m256d relu_grad(__m256d dy, __m256d y) {
    return _mm256_and_pd(_mm256_cmp_pd(y, _mm256_setzero_pd(), _CMP_GT_OQ), dy);
}
#endif
#if defined(__AVX512F__)
inline __m512 relu(__m512 v) { return _mm512_maskz_max_ps(0xffff, _mm512_setzero_ps(), v); }  // (maskz: see simd.hpp)
inline __m512d relu(__m512d v) { return _mm512_maskz_max_pd(0xff, _mm512_setzero_pd(), v); }
inline __m512 relu_grad(__m512 dy, __m512 y) {
    return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(y, _mm512_setzero_ps(), _CMP_GT_OQ), dy);
}
inline __m512d relu_grad(__m512d dy, __m512d y) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(y, _mm512_setzero_pd(), _CMP_GT_OQ), dy);
}
#endif
#endif

// y = act(value + residual) at element offset i of a run; at(offset) is the same epilogue
// for the run starting `offset` elements further (residual has x's layout).
template <class T, bool kAdd, bool kRelu>
struct ForwardEpilogue {
    static constexpr bool adds = kAdd;
    const T* residual;

    ForwardEpilogue at(int64_t offset) const { return {kAdd ? residual + offset : residual}; }

    // Asks for the residual's run at `offset` (prefetch_range), where there is a residual.
    void prefetch(int64_t offset, int64_t bytes) const {
        if constexpr (kAdd) prefetch_range(residual + offset, bytes);
    }

    template <class L, class V>
    V operator()(L, V value, int64_t i) const {
        if constexpr (kAdd) value = value + L::load(residual + i);
        if constexpr (kRelu) value = relu(value);
        return value;
    }
};

// The gradient a backward pass reads in place of dy: dy itself (kRelu false), or the masked
// g = y > 0 ? dy : 0. With kStore, unstreamed write loops also store g to dsum (write(),
// called by the loop computing element i's dx), so dsum may be dy itself: each element is
// read before it is overwritten with a value that masks to itself. Streamed runs write
// dsum by a write_run of its own instead (store_dsum_first, cpu_backward.cpp).
template <class T, bool kRelu, bool kStore>
struct GradientMask {
    static constexpr bool relu = kRelu, stores = kStore;
    const T* y;
    T* dsum;

    GradientMask at(int64_t offset) const {
        return {kRelu ? y + offset : y, kStore ? dsum + offset : dsum};
    }
    // The same mask without the store (a pass that reads g but must not write dsum).
    GradientMask<T, kRelu, false> reading() const { return {y, nullptr}; }

    template <class L>
    auto load(L, const T* dy, int64_t i) const {
        if constexpr (kRelu) return relu_grad(L::load(dy + i), L::load(y + i));
        else return L::load(dy + i);
    }

    template <class L, class V>
    void write(L, V g, int64_t i) const {
        if constexpr (kStore) L::store(dsum + i, g);
    }
};

// Calls body(epilogue) with the ForwardEpilogue variant of e.
template <class T, class Body>
void with_forward_epilogue(const Epilogue<T>& e, const Body& body) {
    if (e.residual && e.activation == Activation::relu) return body(ForwardEpilogue<T, true, true>{e.residual});
    if (e.residual) return body(ForwardEpilogue<T, true, false>{e.residual});
    if (e.activation == Activation::relu) return body(ForwardEpilogue<T, false, true>{nullptr});
    body(ForwardEpilogue<T, false, false>{nullptr});
}

// Calls body(mask) with the GradientMask variant of g (a reduction ignores g.dsum).
template <class T, class Body>
void with_gradient_mask(const ReluGrad<T>& g, bool store, const Body& body) {
    if (g.y && store && g.dsum) return body(GradientMask<T, true, true>{g.y, g.dsum});
    if (g.y) return body(GradientMask<T, true, false>{g.y, nullptr});
    if (store && g.dsum) return body(GradientMask<T, false, true>{nullptr, g.dsum});
    body(GradientMask<T, false, false>{nullptr, nullptr});
}

}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
