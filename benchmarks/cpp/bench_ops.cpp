// A small C++ harness for the CPU ops (llm.c style): validate, then time against memcpy.
//
//   bench_ops OUTERxCHANNELSxINNER[,...] [threads] [reps]
//
// For each shape it checks the training forward's mean against a double-precision sum (so
// the timings are of a call that computed the right thing), then prints the median time
// of memcpy, forward_train, forward_infer and backward (batch statistics) on float32, and
// each op's time relative to the copy. It uses only the public C++ API, so the same file
// builds against any bnorm commit: benchmarks/bench_history.sh times the optimizations
// one commit at a time with it.
#include <bnorm/bnorm.hpp>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

namespace {

double median_ms(const std::function<void()>& call, int reps) {
    call();  // warm-up: first touch, thread start
    call();
    std::vector<double> times;
    for (int r = 0; r < reps; ++r) {
        const auto t0 = std::chrono::steady_clock::now();
        call();
        times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    std::sort(times.begin(), times.end());
    return times[times.size() / 2];
}

bool bench_shape(bnorm::Shape s, int reps) {
    const size_t n = size_t(s.size());
    const size_t C = size_t(s.channels);
    std::vector<float> x(n), y(n), dy(n), dx(n);
    for (size_t i = 0; i < n; ++i) {  // deterministic, nonzero mean, no two channels alike
        x[i] = 1.0f + float((i * 2654435761u) % 1000) / 250.0f;
        dy[i] = float((i * 40503u) % 777) / 200.0f - 2.0f;
    }
    std::vector<float> mean(C), invstd(C), w(C, 1.5f), b(C, 0.25f), rm(C, 0.0f), rv(C, 1.0f), dw(C), db(C);

    // validation: the mean of every channel against a double sum
    bnorm::forward_train(x.data(), s, w.data(), b.data(), rm.data(), rv.data(), 0.1, 1e-5, y.data(), mean.data(),
                         invstd.data());
    for (int64_t c = 0; c < s.channels; ++c) {
        double sum = 0;
        for (int64_t o = 0; o < s.outer; ++o)
            for (int64_t i = 0; i < s.inner; ++i) sum += x[size_t((o * s.channels + c) * s.inner + i)];
        const double want = sum / double(s.count());
        if (std::fabs(mean[size_t(c)] - want) > 1e-5 * std::fabs(want)) {
            std::printf("validation failed: channel %lld mean %.9g, want %.9g\n", (long long)c, mean[size_t(c)], want);
            return false;
        }
    }

    const double copy = median_ms([&] { std::memcpy(y.data(), x.data(), n * sizeof(float)); }, reps);
    const double train = median_ms(
        [&] {
            bnorm::forward_train(x.data(), s, w.data(), b.data(), rm.data(), rv.data(), 0.1, 1e-5, y.data(),
                                 mean.data(), invstd.data());
        },
        reps);
    const double infer =
        median_ms([&] { bnorm::forward_infer(x.data(), s, rm.data(), rv.data(), w.data(), b.data(), 1e-5, y.data()); },
                  reps);
    const double backward = median_ms(
        [&] {
            bnorm::backward(dy.data(), x.data(), s, mean.data(), invstd.data(), w.data(), true, dx.data(), dw.data(),
                            db.data());
        },
        reps);
    const double gb = double(n * sizeof(float)) / 1e9;
    std::printf("| %lldx%lldx%lld | %7.3f | %7.3f (%4.2fx, %5.1f GB/s) | %7.3f (%4.2fx, %5.1f GB/s) | %7.3f (%4.2fx, %5.1f GB/s) |\n",
                (long long)s.outer, (long long)s.channels, (long long)s.inner, copy, train, train / copy,
                2 * gb / (train / 1e3), infer, infer / copy, 2 * gb / (infer / 1e3), backward, backward / copy,
                3 * gb / (backward / 1e3));
    return true;
}

}  // namespace

int main(int argc, char** argv) {
    if (argc < 2) {
        std::fprintf(stderr, "usage: %s OUTERxCHANNELSxINNER[,...] [threads] [reps]\n", argv[0]);
        return 2;
    }
    const int threads = argc > 2 ? std::atoi(argv[2]) : 0;
    const int reps = argc > 3 ? std::atoi(argv[3]) : 30;
    if (threads > 0) bnorm::set_num_threads(threads);
    std::printf("| shape (outer x C x inner) | memcpy ms | forward_train ms (vs copy, GB/s) | forward_infer ms | backward ms |\n");
    std::printf("|---|---:|---:|---:|---:|\n");
    std::string shapes = argv[1];
    size_t start = 0;
    while (start < shapes.size()) {
        const size_t end = std::min(shapes.find(',', start), shapes.size());
        long long o = 0, c = 0, i = 0;
        if (std::sscanf(shapes.substr(start, end - start).c_str(), "%lldx%lldx%lld", &o, &c, &i) != 3) {
            std::fprintf(stderr, "bad shape '%s'\n", shapes.substr(start, end - start).c_str());
            return 2;
        }
        if (!bench_shape(bnorm::Shape{o, c, i}, reps)) return 1;
        start = end + 1;
    }
    return 0;
}
