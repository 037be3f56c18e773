// Why bfloat16 inference is slower than float16 in the avx512bf16 build: the cost of
// narrowing float32 to bfloat16 with vcvtneps2bf16 plus the subnormal fix-up, against
// float16's vcvtps2ph, in the loop shape of bnorm's write passes (load, (x - a) * s + b,
// narrow, store) over an L1-resident buffer, so that only the instructions count.
//
//   g++ -O3 -mavx512f -mavx512bw -mavx512vl -mavx512dq -mavx512bf16 -mf16c
//       benchmarks/cpp/bf16_narrowing.cpp -o bf16_narrowing && ./bf16_narrowing
//
// Variants (ns per 16-lane vector, best of 50 x 100 passes over 8192 values):
//   float16            vcvtph2ps / vcvtps2ph
//   bf16 fix-up branch bnorm's narrowing (simd.hpp): vcvtneps2bf16, and vfpclassps +
//                      kortestw + a branch per vector to redo subnormal lanes portably
//   bf16 no check      vcvtneps2bf16 alone (flushes subnormal inputs: not bnorm's results)
//   bf16 kor           the subnormal mask accumulated with korw, tested once at the end
//                      (what a fix-up per run instead of per vector would cost)
// Needs a CPU with AVX-512 BF16 (AMD Zen 4, Intel Sapphire Rapids and later).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <vector>

namespace {

// bnorm's widening (simd.hpp): element j into the high half of lane j, one masked vpermw.
__m512 load_bf16(const uint16_t* p) {
    const __m512i to_high_halves = _mm512_set_epi16(15, 0, 14, 0, 13, 0, 12, 0, 11, 0, 10, 0, 9, 0, 8, 0, 7, 0, 6, 0,
                                                    5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 0, 0);
    const __m512i packed = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_maskz_permutexvar_epi16(0xaaaaaaaau, to_high_halves, packed));
}

struct Coefficients {
    __m512 center = _mm512_set1_ps(0.1f), scale = _mm512_set1_ps(1.5f), shift = _mm512_set1_ps(0.2f);
    __m512 apply(__m512 v) const { return _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(v, center), scale), shift); }
};

__attribute__((noinline)) void float16(const uint16_t* x, uint16_t* y, int n, Coefficients k) {
    for (int i = 0; i < n; i += 16) {
        const __m512 v = k.apply(_mm512_maskz_cvtph_ps(0xffff, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + i))));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), _mm512_maskz_cvtps_ph(0xffff, v, _MM_FROUND_TO_NEAREST_INT));
    }
}

// kMode 0: fix-up branch per vector, 1: no check, 2: mask accumulated (returned)
template <int kMode>
__attribute__((noinline)) int bfloat16(const uint16_t* x, uint16_t* y, int n, Coefficients k) {
    __mmask16 seen = 0;
    for (int i = 0; i < n; i += 16) {
        const __m512 v = k.apply(load_bf16(x + i));
        __m256i narrow = (__m256i)_mm512_cvtneps_pbh(v);
        const __mmask16 subnormal = _mm512_fpclass_ps_mask(v, 0x20);
        if (kMode == 0 && __builtin_expect(subnormal != 0, 0)) narrow = _mm256_setzero_si256();  // (stand-in)
        if (kMode == 2) seen = _kor_mask16(seen, subnormal);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + i), narrow);
    }
    return seen;
}

template <class F>
double ns_per_vector(F pass, int n) {
    double best = 1e30;
    for (int round = 0; round < 50; ++round) {
        const auto start = std::chrono::steady_clock::now();
        for (int k = 0; k < 100; ++k) pass();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    }
    return best / 100 / (n / 16) * 1e9;
}

}  // namespace

int main() {
    const int n = 8192;
    std::vector<uint16_t> x(n, 0x3f80), y(n);  // 1.0 in both formats' neighbourhood: no subnormals
    const Coefficients k;
    std::printf("float16            %.2f ns/vector\n", ns_per_vector([&] { float16(x.data(), y.data(), n, k); }, n));
    std::printf("bf16 fix-up branch %.2f ns/vector\n", ns_per_vector([&] { bfloat16<0>(x.data(), y.data(), n, k); }, n));
    std::printf("bf16 no check      %.2f ns/vector\n", ns_per_vector([&] { bfloat16<1>(x.data(), y.data(), n, k); }, n));
    std::printf("bf16 kor           %.2f ns/vector\n", ns_per_vector([&] { bfloat16<2>(x.data(), y.data(), n, k); }, n));
}
