// Element access and vector registers for the CPU kernels, per instruction set.
//
// The kernel sources (cpu_passes.hpp lists them) are compiled once per instruction set
// (baseline, AVX2, AVX-512, AVX-512 with BF16) and this header with them, so everything here lives in that build's namespace: functions whose body
// depends on the compiler flags must not be shared between the builds (the linker would
// keep one of the copies, possibly one the CPU cannot run).
//
// load/store convert one element to/from the accumulation type (float for half, bfloat16
// and float, double for double). Simd<T> is a vector of `width` accumulation-type lanes loaded from /
// stored to T: AVX-512 (16 floats / 8 doubles), AVX (8 / 4), SSE2 (4 / 2); half needs F16C
// (or AVX-512) for its conversions; bfloat16 widens with a shift and narrows with
// integer adds (AVX2, AVX-512), or with vcvtneps2bf16 in the avx512bf16 build (the same
// bits: docs/performance.md). Where none applies, Simd<T> is a single scalar lane, so
// kernels written on Simd<T> run everywhere. The explicit vectors give the reductions
// independent accumulator chains that the compiler's vectorizer would not keep, and give
// non-temporal stores.
#pragma once

#ifndef BNORM_KERNEL_ISA
#error "simd.hpp belongs to the kernel sources, compiled per instruction set"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>

// BNORM_SCALAR_KERNELS forces the one-lane fallback on x86 too, so that CI tests the code
// non-x86 builds run.
#if defined(__SSE2__) && defined(__GNUC__) && !defined(BNORM_SCALAR_KERNELS)
#include <immintrin.h>
#define BNORM_SIMD_X86 1
#else
#define BNORM_SIMD_X86 0
#endif

#include "bnorm/types.hpp"
#include "half.hpp"

namespace bnorm::kernels::BNORM_KERNEL_ISA {

inline float load(const float* p) { return *p; }
inline double load(const double* p) { return *p; }
inline void store(float* p, float v) { *p = v; }
inline void store(double* p, double v) { *p = v; }
#if defined(__F16C__) && defined(__FLT16_MAX__)
// The compiler's _Float16 converts with F16C; the same rounding (nearest even) as the
// portable conversion, so every build gives the same bits.
inline float load(const half* p) {
    _Float16 h;
    std::memcpy(&h, p, sizeof h);
    return float(h);
}
inline void store(half* p, float v) {
    const _Float16 h = static_cast<_Float16>(v);
    std::memcpy(p, &h, sizeof h);
}
#else
inline float load(const half* p) { return detail::half_to_float(*p); }
inline void store(half* p, float v) { *p = detail::float_to_half(v); }
#endif
inline float load(const bfloat16* p) { return detail::bfloat16_to_float(*p); }
inline void store(bfloat16* p, float v) { *p = detail::float_to_bfloat16(v); }

// One lane: the scalar tails of the vector loops, and the whole loop where Simd<T> has no
// vector registers. `stream` is an ordinary store.
template <class T>
struct Scalar {
    using A = param_t<T>;
    using R = A;
    static constexpr int64_t width = 1;
    static R load(const T* p) { return BNORM_KERNEL_ISA::load(p); }
    static R set(A v) { return v; }
    static void store(T* p, R v) { BNORM_KERNEL_ISA::store(p, v); }
    static void stream(T* p, R v) { BNORM_KERNEL_ISA::store(p, v); }
    static A sum(R v) { return v; }
};

template <class T>
struct Simd : Scalar<T> {};

// Horizontal sum of a vector's lanes, in lane order (a fixed order: the bits of a result
// never depend on anything but the data).
template <class A, class R>
inline A lane_sum(R v) {
    constexpr int lanes = int(sizeof(R) / sizeof(A));
    A lane[lanes];
    std::memcpy(lane, &v, sizeof v);
    A total = lane[0];
    for (int i = 1; i < lanes; ++i) total += lane[i];
    return total;
}

#if BNORM_SIMD_X86
#if defined(__AVX512F__)
template <>
struct Simd<float> {
    using A = float;
    using R = __m512;
    static constexpr int64_t width = 16;
    static R load(const float* p) { return _mm512_loadu_ps(p); }
    static R set(float v) { return _mm512_set1_ps(v); }
    static void store(float* p, R v) { _mm512_storeu_ps(p, v); }
    static void stream(float* p, R v) { _mm512_stream_ps(p, v); }
    static A sum(R v) { return lane_sum<A>(v); }
};
template <>
struct Simd<double> {
    using A = double;
    using R = __m512d;
    static constexpr int64_t width = 8;
    static R load(const double* p) { return _mm512_loadu_pd(p); }
    static R set(double v) { return _mm512_set1_pd(v); }
    static void store(double* p, R v) { _mm512_storeu_pd(p, v); }
    static void stream(double* p, R v) { _mm512_stream_pd(p, v); }
    static A sum(R v) { return lane_sum<A>(v); }
};
template <>
struct Simd<half> {
    using A = float;
    using R = __m512;
    static constexpr int64_t width = 16;
    // (the maskz forms: GCC 12 warns about the undefined source register of the others)
    static R load(const half* p) {
        return _mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    }
    static R set(float v) { return _mm512_set1_ps(v); }
    static void store(half* p, R v) {
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT));
    }
    static void stream(half* p, R v) {
        _mm256_stream_si256(reinterpret_cast<__m256i*>(p), _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT));
    }
    static A sum(R v) { return lane_sum<A>(v); }
};
template <>
struct Simd<bfloat16> {
    using A = float;
    using R = __m512;
    static constexpr int64_t width = 16;
    // (maskz forms throughout, as for half)
    // Widening puts element j in the high half of lane j, zeros in the low halves: one
    // masked vpermw (measured faster than a zero-extend and a shift; docs/performance.md).
    static R load(const bfloat16* p) {
        const __m512i to_high_halves = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0,
                                                        5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
        const __m512i packed = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
        return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xaaaaaaaau, to_high_halves, packed));
    }
    static R set(float v) { return _mm512_set1_ps(v); }
    // detail::float_to_bfloat16 on 16 lanes: each lane rounded in its 32 bits (NaN lanes
    // get the quiet bit instead), then the high halves gathered by one vpermw (measured
    // 25% faster than shifting and vpmovdw).
    static __m256i narrow_portable(R v) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i odd = _mm512_and_si512(_mm512_maskz_srli_epi32(0xffff, u, 16), _mm512_set1_epi32(1));
        __m512i rounded = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd);
        const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        rounded = _mm512_mask_or_epi32(rounded, nan, u, _mm512_set1_epi32(0x400000));
        const __m512i high_halves = _mm512_set_epi16(31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1, 31, 29, 27,
                                                     25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        return _mm512_maskz_extracti64x4_epi64(0xf, _mm512_maskz_permutexvar_epi16(~__mmask32(0), high_halves, rounded), 0);
    }
#if defined(__AVX512BF16__)
    // The avx512bf16 build: vcvtneps2bf16 rounds to nearest even and quiets NaNs exactly
    // as narrow_portable does, but reads subnormal inputs as zero; lanes holding one (rare:
    // |v| < 2^-126) take narrow_portable's bits, so every build gives the same results.
    // The groups below test for them in two steps: the narrowed words that are +-0 (a lane
    // read as zero, or a zero: one vptestnmw per pair of vectors), then, only for a group
    // with such a word (common in ReLU's outputs and gradients: zeros), each lane's class
    // (vfpclassps, inline: out of line with the narrowing redone, as store_exact's cold body, a
    // bfloat16 ReLU gradient written by write_run took 1.1x the time). One
    // vfpclassps per vector in the loops cost 5-10% of bfloat16 inference in cache
    // ((256, 512), (1024, 512), (32, 64, 14, 14): 1.07-1.09x float16's time, now
    // 0.99-1.02x; C++ harness through the public API, one thread).
    static __mmask32 zero_words(__m512i pair) { return _mm512_testn_epi16_mask(pair, _mm512_set1_epi16(0x7fff)); }
    __attribute__((always_inline)) static inline bool any_subnormal(const R* v, int count) {
        __mmask16 subnormal = 0;
        for (int k = 0; k < count; ++k) subnormal = _kor_mask16(subnormal, _mm512_fpclass_ps_mask(v[k], 0x20));
        return subnormal != 0;
    }
    // Stores count (<= 8) vectors `step` elements apart for a group with a subnormal lane,
    // narrow() vector by vector. Out of line and cold, so that the loops inlining the groups
    // keep their registers; the vectors by value, in registers.
    __attribute__((noinline, cold)) static void store_exact(bfloat16* p, int64_t step, int count, bool stream, R v0,
                                                            R v1, R v2, R v3, R v4, R v5, R v6, R v7) {
        const R v[8] = {v0, v1, v2, v3, v4, v5, v6, v7};
        for (int k = 0; k < count; ++k) store_words(p + k * step, narrow(v[k]), stream);
    }
    // The groups' entry to it, inline: out of line, the array reference made GCC store every
    // group's vectors to the stack before the test, on the hot path (two 64-byte stores
    // beside each 64-byte store of results; bfloat16 training of (64, 256, 28, 28), 2
    // threads, took 1.2x the time, inference of (8192, 1024) on one thread 1.29x).
    template <int G>
    __attribute__((always_inline)) static inline void store_exact(bfloat16* p, int64_t step, int count, bool stream,
                                                                  const R (&v)[G]) {
        static_assert(G <= 8, "at most 8 vectors");
        R w[8];
        for (int k = 0; k < 8; ++k) w[k] = v[k < G ? k : 0];
        store_exact(p, step, count, stream, w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]);
    }
    static void store_words(bfloat16* p, __m256i words, bool stream) {
        if (stream) _mm256_stream_si256(reinterpret_cast<__m256i*>(p), words);
        else _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), words);
    }
    // One vector (store_lanes, the streamed runs' single vectors): its subnormal lanes
    // tested directly. (Inline: with the fix-up out of line too, bfloat16 inference of
    // 7x7 planes took 1.1x the time.)
    static __m256i narrow(R v) {
        const __m256i fast = (__m256i)_mm512_cvtneps_pbh(v);
        const __mmask16 subnormal = _mm512_fpclass_ps_mask(v, 0x20);  // (vfpclassps: 0x20 = denormal)
        if (__builtin_expect(subnormal != 0, 0)) return _mm256_mask_mov_epi16(fast, subnormal, narrow_portable(v));
        return fast;
    }
    // write_run narrows groups of kGroup vectors (streamed lines: then pairs; unstreamed
    // runs: then store_end below), tested once a group as above, two vectors into one
    // 64-byte register per vcvtne2ps2bf16. Inlined, and without an array of narrowed halves: GCC
    // made that a call that joined the halves through the stack (a store-forwarding stall
    // per 64-byte store; (256, 512) bfloat16 backward took 1.25x float16's time, now
    // 0.95-1.05x). Pairs after the groups: runs of 14x14 narrowed 4 single vectors each
    // (inference 1.13x float16's time, now 1.05-1.09x); pairs alone made backward slower.
    static constexpr int kGroup = 8;
    template <bool kStream, int G>
    __attribute__((always_inline)) static inline void store_group(bfloat16* p, const R (&v)[G]) {
        static_assert(G % 2 == 0, "pairs of vectors");
        __m512i pairs[G / 2];
        __mmask32 zero = 0;
        for (int k = 0; k < G; k += 2) {
            pairs[k / 2] = (__m512i)_mm512_cvtne2ps_pbh(v[k + 1], v[k]);  // v[k] in the low half
            zero = _kor_mask32(zero, zero_words(pairs[k / 2]));
        }
        if (__builtin_expect(zero != 0, 0) && any_subnormal(v, G)) return store_exact(p, width, G, kStream, v);
        for (int k = 0; k < G; k += 2) {
            __m512i* out = reinterpret_cast<__m512i*>(p + k * width);
            if (kStream) _mm512_stream_si512(out, pairs[k / 2]);
            else _mm512_storeu_si512(out, pairs[k / 2]);
        }
    }
    // G vectors for rows `stride` elements apart (write_rows, unstreamed): as store_group,
    // one test for all, two rows narrowed by one vcvtne2ps2bf16 and stored as its
    // halves. (Row by row, narrow() per vector: (256, 512) inference took 1.11x float16's
    // time, 1.2x before write_rows took bfloat16; C++ harness, one thread, in cache.)
    template <int G>
    __attribute__((always_inline)) static inline void store_rows(bfloat16* p, int64_t stride, const R (&v)[G]) {
        if constexpr (G == 1) {
            store(p, v[0]);
        } else {
            static_assert(G % 2 == 0, "pairs of rows");
            __m512i pairs[G / 2];
            __mmask32 zero = 0;
            for (int k = 0; k < G; k += 2) {
                pairs[k / 2] = (__m512i)_mm512_cvtne2ps_pbh(v[k + 1], v[k]);  // row k in the low half
                zero = _kor_mask32(zero, zero_words(pairs[k / 2]));
            }
            if (__builtin_expect(zero != 0, 0) && any_subnormal(v, G)) return store_exact(p, stride, G, false, v);
            for (int k = 0; k < G; k += 2) {
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + k * stride),
                                    _mm512_maskz_extracti64x4_epi64(0xf, pairs[k / 2], 0));
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + (k + 1) * stride),
                                    _mm512_maskz_extracti64x4_epi64(0xf, pairs[k / 2], 1));
            }
        }
    }
    // The end of a run written without streaming, held in registers by write_run after the
    // groups: `full` vectors (0 to kGroup - 1) from p and, where n (the elements from p) is
    // not a multiple of a vector, the run's last 16 elements in `tail` (overlapping what
    // precedes them, computed before any of it was stored). One test for all of it (zero
    // words, then subnormal lanes, inline: out of line, as store_exact's cold body, 7x7 planes took
    // 1.15x the time), pairs narrowed together, the tail's new lanes stored under a mask
    // (no line next to them is streamed); a subnormal lane sends each vector through
    // narrow()'s exact path.
    // Before, a 7x7 plane (49 elements) took a pair, a single vector and the tail, each
    // tested and branched on, the tail through a buffer: bfloat16 inference of (32, 256, 7,
    // 7) in cache took 1.29x float16's time, 1.04x held whole (a standalone loop over
    // write_run, one thread, medians of 15 rounds of 300 passes). (The loops over v are
    // unrolled to constant indices, so that v can stay in registers.)
    __attribute__((always_inline)) static inline void store_end(bfloat16* p, int64_t n, const R (&v)[kGroup], int full,
                                                                const R& tail) {
        const bool ragged = n % width != 0;
        const int64_t tail_stored = full * width - (n - width);  // the tail's lanes v covers
        const auto tail_mask = __mmask16(0xffffu << tail_stored);
        __m512i pairs[kGroup / 2]{};
        __mmask32 zero = 0;
#pragma GCC unroll 8
        for (int k = 0; k < kGroup; k += 2)
            if (k < full) {
                pairs[k / 2] = (__m512i)_mm512_cvtne2ps_pbh(k + 1 < full ? v[k + 1] : v[k], v[k]);
                zero = _kor_mask32(zero, zero_words(pairs[k / 2]));
            }
        const __m256i tail_words = (__m256i)_mm512_cvtneps_pbh(tail);
        if (ragged) zero = _kor_mask32(zero, _mm256_testn_epi16_mask(tail_words, _mm256_set1_epi16(0x7fff)));
        if (__builtin_expect(zero != 0, 0)) {
            __mmask16 subnormal = ragged ? _mm512_fpclass_ps_mask(tail, 0x20) : __mmask16(0);
#pragma GCC unroll 8
            for (int k = 0; k < kGroup; ++k)
                if (k < full) subnormal = _kor_mask16(subnormal, _mm512_fpclass_ps_mask(v[k], 0x20));
            if (subnormal != 0) {
#pragma GCC unroll 8
                for (int k = 0; k < kGroup; ++k)
                    if (k < full) store(p + k * width, v[k]);
                if (ragged) _mm256_mask_storeu_epi16(p + n - width, tail_mask, narrow(tail));
                return;
            }
        }
#pragma GCC unroll 8
        for (int k = 0; k < kGroup; k += 2) {
            if (k + 1 < full)
                _mm512_storeu_si512(p + k * width, pairs[k / 2]);
            else if (k < full)
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + k * width),
                                    _mm512_maskz_extracti64x4_epi64(0xf, pairs[k / 2], 0));
        }
        if (ragged) _mm256_mask_storeu_epi16(p + n - width, tail_mask, tail_words);
    }
#else
    static __m256i narrow(R v) { return narrow_portable(v); }
#endif
    static void store(bfloat16* p, R v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
    static void stream(bfloat16* p, R v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), narrow(v)); }
    static A sum(R v) { return lane_sum<A>(v); }
};
#elif defined(__AVX__)
template <>
struct Simd<float> {
    using A = float;
    using R = __m256;
    static constexpr int64_t width = 8;
    static R load(const float* p) { return _mm256_loadu_ps(p); }
    static R set(float v) { return _mm256_set1_ps(v); }
    static void store(float* p, R v) { _mm256_storeu_ps(p, v); }
    static void stream(float* p, R v) { _mm256_stream_ps(p, v); }
    static A sum(R v) { return lane_sum<A>(v); }
};
template <>
struct Simd<double> {
    using A = double;
    using R = __m256d;
    static constexpr int64_t width = 4;
    static R load(const double* p) { return _mm256_loadu_pd(p); }
    static R set(double v) { return _mm256_set1_pd(v); }
    static void store(double* p, R v) { _mm256_storeu_pd(p, v); }
    static void stream(double* p, R v) { _mm256_stream_pd(p, v); }
    static A sum(R v) { return lane_sum<A>(v); }
};
#if defined(__F16C__)
template <>
struct Simd<half> {
    using A = float;
    using R = __m256;
    static constexpr int64_t width = 8;
    static R load(const half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
    static R set(float v) { return _mm256_set1_ps(v); }
    static void store(half* p, R v) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    static void stream(half* p, R v) {
        _mm_stream_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    static A sum(R v) { return lane_sum<A>(v); }
};
#endif
#if defined(__AVX2__)
template <>
struct Simd<bfloat16> {
    using A = float;
    using R = __m256;
    static constexpr int64_t width = 8;
    static R load(const bfloat16* p) {
        const __m256i wide = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
        return _mm256_castsi256_ps(_mm256_slli_epi32(wide, 16));
    }
    static R set(float v) { return _mm256_set1_ps(v); }
    // detail::float_to_bfloat16 on 8 lanes: each lane rounded in its 32 bits (NaN lanes
    // get the quiet bit instead), then the high halves gathered (vpshufb, vpermq).
    static __m128i narrow(R v) {
        const __m256i u = _mm256_castps_si256(v);
        const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i rounded = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), odd);
        const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        rounded = _mm256_blendv_epi8(rounded, _mm256_or_si256(u, _mm256_set1_epi32(0x400000)), nan);
        const __m256i high_halves = _mm256_setr_epi8(2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1,
                                                     2, 3, 6, 7, 10, 11, 14, 15, -1, -1, -1, -1, -1, -1, -1, -1);
        const __m256i packed = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(rounded, high_halves), 0x08);
        return _mm256_castsi256_si128(packed);
    }
    static void store(bfloat16* p, R v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
    static void stream(bfloat16* p, R v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), narrow(v)); }
    static A sum(R v) { return lane_sum<A>(v); }
};
#endif
#else
template <>
struct Simd<float> {
    using A = float;
    using R = __m128;
    static constexpr int64_t width = 4;
    static R load(const float* p) { return _mm_loadu_ps(p); }
    static R set(float v) { return _mm_set1_ps(v); }
    static void store(float* p, R v) { _mm_storeu_ps(p, v); }
    static void stream(float* p, R v) { _mm_stream_ps(p, v); }
    static A sum(R v) { return lane_sum<A>(v); }
};
template <>
struct Simd<double> {
    using A = double;
    using R = __m128d;
    static constexpr int64_t width = 2;
    static R load(const double* p) { return _mm_loadu_pd(p); }
    static R set(double v) { return _mm_set1_pd(v); }
    static void store(double* p, R v) { _mm_storeu_pd(p, v); }
    static void stream(double* p, R v) { _mm_stream_pd(p, v); }
    static A sum(R v) { return lane_sum<A>(v); }
};
#endif
#endif

// The lanes [0, first) of a and the rest of b (1 <= first <= the width): the coefficients of
// a vector that crosses from one channel into the next (write spans, cpu_passes.hpp).
#if BNORM_SIMD_X86
#if defined(__AVX512F__)
inline __m512 split_lanes(__m512 a, __m512 b, int64_t first) {
    return _mm512_mask_blend_ps(__mmask16(0xffffu << first), a, b);
}
inline __m512d split_lanes(__m512d a, __m512d b, int64_t first) {
    return _mm512_mask_blend_pd(__mmask8(0xffu << first), a, b);
}
#elif defined(__AVX__)
inline __m256 split_lanes(__m256 a, __m256 b, int64_t first) {
    const __m256 later = _mm256_cmp_ps(_mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_ps(float(first)), _CMP_GE_OQ);
    return _mm256_blendv_ps(a, b, later);
}
inline __m256d split_lanes(__m256d a, __m256d b, int64_t first) {
    const __m256d later = _mm256_cmp_pd(_mm256_setr_pd(0, 1, 2, 3), _mm256_set1_pd(double(first)), _CMP_GE_OQ);
    return _mm256_blendv_pd(a, b, later);
}
#else
inline __m128 split_lanes(__m128 a, __m128 b, int64_t first) {
    const __m128 later = _mm_cmpge_ps(_mm_setr_ps(0, 1, 2, 3), _mm_set1_ps(float(first)));
    return _mm_or_ps(_mm_and_ps(later, b), _mm_andnot_ps(later, a));
}
inline __m128d split_lanes(__m128d a, __m128d b, int64_t first) {
    const __m128d later = _mm_cmpge_pd(_mm_setr_pd(0, 1), _mm_set1_pd(double(first)));
    return _mm_or_pd(_mm_and_pd(later, b), _mm_andnot_pd(later, a));
}
#endif
#endif

// Stores lanes [first, last) of the vector v to p[first, last): the whole vector is
// converted and stored to a buffer, then those elements copied one by one. (An AVX-512
// masked store is one instruction, but its masked-off lanes still touch the neighbouring
// cache line; where that line is being written with non-temporal stores, that cost more
// than the whole row: measured 2x slower on 256-channel rows.)
template <class T>
inline void store_lanes(T* p, typename Simd<T>::R v, int64_t first, int64_t last) {
    T lane[Simd<T>::width];
    Simd<T>::store(lane, v);
    for (int64_t j = first; j < last; ++j) p[j] = lane[j];
}

// The same where no neighbouring line is streamed (write_rows, unstreamed runs): one
// masked store where the instruction set has them (AVX-512BW for the 16-bit types), no
// buffer. In cache, one thread (C++ harness through the public API): (256, 100) float32
// inference 3.4 -> 2.6 us, (32, 256, 7, 7) float16 68 -> 60 us.
template <class T>
inline void store_lanes_cached(T* p, typename Simd<T>::R v, int64_t first, int64_t last) {
#if BNORM_SIMD_X86 && defined(__AVX512F__) && defined(__AVX512BW__)
    const auto mask = (~0u << first) & ~(~0u << last);  // lanes [first, last) of at most 16
    if constexpr (std::is_same_v<T, float>) {
        _mm512_mask_storeu_ps(p, __mmask16(mask), v);
    } else if constexpr (std::is_same_v<T, double>) {
        _mm512_mask_storeu_pd(p, __mmask8(mask), v);
    } else if constexpr (std::is_same_v<T, half>) {
        _mm256_mask_storeu_epi16(p, __mmask16(mask), _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT));
    } else {
        static_assert(std::is_same_v<T, bfloat16>, "float, double, half or bfloat16");
        _mm256_mask_storeu_epi16(p, __mmask16(mask), Simd<bfloat16>::narrow(v));
    }
#else
    store_lanes(p, v, first, last);
#endif
}

// Asks for the lines of [p, p + bytes) to be brought into L2 (not L1: see
// kPrefetchRunBytes): a hint, no effect on any result (a prefetch never faults, past an
// array's end included).
inline void prefetch_range(const void* p, int64_t bytes) {
#if BNORM_SIMD_X86
    const char* c = static_cast<const char*>(p);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(c + b, _MM_HINT_T1);
#else
    (void)p, (void)bytes;
#endif
}

// Asks for the line at p to be brought into L1, for loops that read their input from memory
// kRowPrefetchBytes ahead of where they load (affine_row).
inline void prefetch_line(const void* p) {
#if BNORM_SIMD_X86
    _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T0);
#else
    (void)p;
#endif
}

// Non-temporal stores are weakly ordered: fence before the results are used elsewhere.
inline void stream_fence(bool stream) {
#if BNORM_SIMD_X86
    if (stream) _mm_sfence();
#else
    (void)stream;
#endif
}

}  // namespace bnorm::kernels::BNORM_KERNEL_ISA
