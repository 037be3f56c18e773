// Why the rows reductions read some shapes one row at a time: the two sums of the backward
// reduction (sum(dy), sum(dy * (x - mean)) per column) over a (rows, C) float32 array of
// 50 MB, one thread, in the loop shape of bnorm's for_row_lanes (cpu_reduce.hpp): G rows at
// a time, a vector of 16 columns at a time, per-column accumulators in L1 arrays, touched
// once per group. A group reads its G rows interleaved, a line of each in turn.
//
//   g++ -O3 -march=native benchmarks/cpp/row_reduction.cpp -o row_reduction && ./row_reduction
//
// Prints GB/s (x and dy read) for each row length C and group size G, and a plain
// sequential read of the same bytes. On a 2-core AMD EPYC (Zen 4) KVM guest (sequential
// 26 GB/s), rows of 512 B to 2 KiB (C = 128, 256, 512) read 12-16 GB/s in groups of 4 and
// 20-24 GB/s a row at a time; rows of 4 KiB or more read faster in groups (21 against
// 14-21); rows of 256 B (C = 64) about the same either way (25-27 against 23-27, runs vary).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

namespace {

constexpr long kBytes = 50176L * 256 * 4;  // per array: a (64, 28, 28, 256) float32 tensor

template <int G>
__attribute__((noinline)) void sums(const float* x, const float* dy, const float* mean, float* sum_dy,
                                    float* sum_dy_xmu, long rows, int C) {
    for (long r = 0; r + G <= rows; r += G)
        for (int j = 0; j < C; j += 16) {
            const __m512 m = _mm512_loadu_ps(mean + j);
            __m512 g = _mm512_setzero_ps(), gx = _mm512_setzero_ps();
            for (int k = 0; k < G; ++k) {
                const __m512 d = _mm512_loadu_ps(dy + (r + k) * C + j);
                g = _mm512_add_ps(g, d);
                gx = _mm512_add_ps(gx, _mm512_mul_ps(d, _mm512_sub_ps(_mm512_loadu_ps(x + (r + k) * C + j), m)));
            }
            _mm512_storeu_ps(sum_dy + j, _mm512_add_ps(_mm512_loadu_ps(sum_dy + j), g));
            _mm512_storeu_ps(sum_dy_xmu + j, _mm512_add_ps(_mm512_loadu_ps(sum_dy_xmu + j), gx));
        }
}

__attribute__((noinline)) float sequential(const float* x, const float* dy, long n) {
    __m512 s = _mm512_setzero_ps(), t = s;
    for (long i = 0; i < n; i += 16) {
        s = _mm512_add_ps(s, _mm512_loadu_ps(x + i));
        t = _mm512_add_ps(t, _mm512_loadu_ps(dy + i));
    }
    return _mm512_reduce_add_ps(_mm512_add_ps(s, t));
}

template <class F>
double best_seconds(const F& f) {
    double best = 1e9;
    for (int i = 0; i < 15; ++i) {
        const auto t0 = std::chrono::steady_clock::now();
        f();
        best = std::min(best, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    }
    return best;
}

}  // namespace

int main() {
    const long n = kBytes / 4;
    std::vector<float> x(n), dy(n), mean(4096, 0.1f), a(4096), b(4096);
    for (long i = 0; i < n; ++i) {
        x[i] = float(i % 97) * 0.01f;
        dy[i] = float(i % 89) * 0.01f;
    }
    float sink = 0;
    const double gb = 2.0 * kBytes / 1e9;
    std::printf("sequential read: %.1f GB/s\n", gb / best_seconds([&] { sink += sequential(x.data(), dy.data(), n); }));
    std::printf("%6s %10s %10s %10s\n", "C", "G=1 GB/s", "G=4 GB/s", "G=8 GB/s");
    for (int C : {64, 128, 256, 512, 1024, 2048}) {
        const long rows = n / C;
        const auto rate = [&](auto run) { return gb / best_seconds([&] { run(); sink += a[3] + b[5]; }); };
        std::printf("%6d %10.1f %10.1f %10.1f\n", C,
                    rate([&] { sums<1>(x.data(), dy.data(), mean.data(), a.data(), b.data(), rows, C); }),
                    rate([&] { sums<4>(x.data(), dy.data(), mean.data(), a.data(), b.data(), rows, C); }),
                    rate([&] { sums<8>(x.data(), dy.data(), mean.data(), a.data(), b.data(), rows, C); }));
    }
    return sink == 12345.f;  // (keeps the sums alive)
}
