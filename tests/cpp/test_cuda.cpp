// C++ tests of the CUDA API (bnorm::cuda) against a double-precision host reference.
//
// Every op, both layouts (NCHW-like planes, inner > 1; NHWC-like rows, inner == 1), float,
// double, half and bfloat16, vector and scalar (misaligned) paths, single- and multi-block
// channels, in-place calls, determinism (bitwise, run twice), streams, CUDA graph capture,
// argument errors (ValueError before anything is enqueued), NaN/constant/large-mean data,
// and a > 2^31-element tensor when the GPU has the memory. Exits 77 (ctest: skipped) when
// no CUDA device is usable, non-zero on failure.
#include <bnorm/bnorm.hpp>
#include <bnorm/cuda.hpp>  // also when built outside the CMake target (no BNORM_HAS_CUDA)
#include <cuda_runtime.h>

#include <algorithm>
#include <cinttypes>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "../../cpp/src/half.hpp"
#include "check.hpp"

namespace {

using bnorm::Shape;

#define CUDA_OK(expr)                                                                          \
    do {                                                                                       \
        const cudaError_t err_ = (expr);                                                       \
        if (err_ != cudaSuccess) {                                                             \
            std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #expr,                  \
                         cudaGetErrorString(err_));                                            \
            std::exit(1);                                                                      \
        }                                                                                      \
    } while (0)

// ---- host element conversions (the CPU backend's, cpp/src/half.hpp) ------------------------

template <class T> T from_double(double v) {
    if constexpr (std::is_same_v<T, bnorm::half>) return bnorm::detail::float_to_half(float(v));
    else if constexpr (std::is_same_v<T, bnorm::bfloat16>) return bnorm::detail::float_to_bfloat16(float(v));
    else return T(v);
}
template <class T> double to_double(T v) {
    if constexpr (std::is_same_v<T, bnorm::half>) return bnorm::detail::half_to_float(v);
    else if constexpr (std::is_same_v<T, bnorm::bfloat16>) return bnorm::detail::bfloat16_to_float(v);
    else return double(v);
}
template <class T> const char* type_name() {
    if constexpr (std::is_same_v<T, float>) return "float32";
    else if constexpr (std::is_same_v<T, double>) return "float64";
    else if constexpr (std::is_same_v<T, bnorm::half>) return "float16";
    else return "bfloat16";
}
/// Tolerance of values stored as T (outputs y, dx).
template <class T> double out_tol() {
    if constexpr (std::is_same_v<T, double>) return 1e-12;
    else if constexpr (std::is_same_v<T, float>) return 2e-5;
    else if constexpr (std::is_same_v<T, bnorm::half>) return 2e-3;
    else return 1.6e-2;  // bfloat16: 8 significant bits
}
/// Tolerance of statistics (P: float accumulation, or double).
template <class T> double stat_tol() { return std::is_same_v<T, double> ? 1e-12 : 2e-5; }

// ---- device buffers ------------------------------------------------------------------------

/// cudaMalloc'ed; `offset` elements of slack in front (a misaligned view when offset is odd).
template <class U>
struct Dev {
    U* base = nullptr;
    U* p = nullptr;
    size_t n = 0;
    explicit Dev(size_t count, size_t offset = 0) : n(count) {
        CUDA_OK(cudaMalloc(&base, (count + offset + 1) * sizeof(U)));
        p = base + offset;
    }
    Dev(const std::vector<U>& host, size_t offset = 0) : Dev(host.size(), offset) { upload(host); }
    ~Dev() { cudaFree(base); }
    Dev(const Dev&) = delete;
    Dev& operator=(const Dev&) = delete;
    void upload(const std::vector<U>& host) {
        if (n) CUDA_OK(cudaMemcpy(p, host.data(), n * sizeof(U), cudaMemcpyHostToDevice));
    }
    std::vector<U> get() const {
        std::vector<U> host(n);
        CUDA_OK(cudaDeviceSynchronize());
        if (n) CUDA_OK(cudaMemcpy(host.data(), p, n * sizeof(U), cudaMemcpyDeviceToHost));
        return host;
    }
};

template <class U>
bool same_bits(const std::vector<U>& a, const std::vector<U>& b) {
    return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(U)) == 0);
}

/// One failure line per mismatching array (count and first index), not one per element.
template <class G>
void compare(const char* file, int line, const std::string& what, int64_t n, G got_want, double rtol,
             double atol) {
    int64_t bad = 0, first = -1;
    double first_got = 0, first_want = 0;
    for (int64_t i = 0; i < n; ++i) {
        const auto [got, want] = got_want(i);
        if (!check::close(got, want, rtol, atol)) {
            if (bad++ == 0) {
                first = i;
                first_got = got;
                first_want = want;
            }
        }
    }
    if (bad)
        check::fail(file, line,
                    what + ": " + std::to_string(bad) + " of " + std::to_string(n) + " differ; first at " +
                        std::to_string(first) + ": got " + std::to_string(first_got) + ", want " +
                        std::to_string(first_want));
}
// COMPARE(what, n, [&](int64_t i) { return std::pair{got, want}; }, rtol, atol)
#define COMPARE(what, n, ...) compare(__FILE__, __LINE__, what, n, __VA_ARGS__)

// ---- reference ---------------------------------------------------------------------------------

int64_t index(Shape s, int64_t o, int64_t c, int64_t i) { return (o * s.channels + c) * s.inner + i; }
int64_t channel_of(Shape s, int64_t k) { return (k / s.inner) % s.channels; }

struct Moments {
    std::vector<double> mean, var;
};

template <class T>
Moments reference_moments(const std::vector<T>& x, Shape s) {
    Moments r{std::vector<double>(s.channels, 0.0), std::vector<double>(s.channels, 0.0)};
    for (int64_t k = 0; k < s.size(); ++k) r.mean[channel_of(s, k)] += to_double(x[k]);
    for (auto& m : r.mean) m /= double(s.count());
    for (int64_t k = 0; k < s.size(); ++k) {
        const double d = to_double(x[k]) - r.mean[channel_of(s, k)];
        r.var[channel_of(s, k)] += d * d;
    }
    for (auto& v : r.var) v /= double(s.count());
    return r;
}

template <class T>
std::vector<T> random_data(Shape s, double offset, unsigned seed) {
    std::mt19937_64 rng(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    std::vector<T> x(static_cast<size_t>(s.size()));
    for (auto& v : x) v = from_double<T>(offset + 2.0 * normal(rng));
    return x;
}

std::string describe(Shape s) {
    return "(" + std::to_string(s.outer) + ", " + std::to_string(s.channels) + ", " + std::to_string(s.inner) + ")";
}

// ---- every op on one shape and type ------------------------------------------------------

template <class T>
void test_ops(Shape s, bool misaligned, cudaStream_t stream) {
    using P = bnorm::param_t<T>;
    namespace bc = bnorm::cuda;
    const std::string tag = std::string(type_name<T>()) + " " + describe(s) + (misaligned ? " misaligned" : "");
    std::printf("  ops %s\n", tag.c_str());
    const double tol = out_tol<T>(), stol = stat_tol<T>();
    const int64_t C = s.channels, n = s.size();
    const double M = double(s.count());
    const size_t off = misaligned ? 1 : 0;
    const auto x = random_data<T>(s, 3.0, 1);
    const auto dy = random_data<T>(s, 0.0, 2);
    std::vector<P> weight(C), bias(C);
    for (int64_t c = 0; c < C; ++c) {
        weight[c] = P(0.5 + 0.1 * double(c % 7));
        bias[c] = P(-1.0 + 0.3 * double(c % 5));
    }
    const double momentum = 0.25, eps = 1e-5;
    Dev<T> xd(x, off), dyd(dy, off), yd(n, off), y2d(n, off), dxd(n, off), dx2d(n, off);
    Dev<P> wd(weight), bd(bias), rm(std::vector<P>(C, P(0.5))), rv(std::vector<P>(C, P(2)));
    Dev<P> sm(C), si(C), mean(C), var(C), dw(C), db(C), sdy(C), sdyx(C);

    // forward_train against the reference
    bc::forward_train(xd.p, s, wd.p, bd.p, rm.p, rv.p, momentum, eps, yd.p, sm.p, si.p, stream);
    const Moments r = reference_moments(x, s);
    const auto y = yd.get();
    const auto save_mean = sm.get(), save_invstd = si.get(), run_mean = rm.get(), run_var = rv.get();
    COMPARE(tag + " save_mean", C, [&](int64_t c) { return std::pair{double(save_mean[c]), r.mean[c]}; }, stol, stol);
    COMPARE(tag + " save_invstd", C,
            [&](int64_t c) { return std::pair{double(save_invstd[c]), 1.0 / std::sqrt(r.var[c] + eps)}; }, stol, 0);
    COMPARE(tag + " running_mean", C,
            [&](int64_t c) { return std::pair{double(run_mean[c]), 0.75 * 0.5 + 0.25 * r.mean[c]}; }, stol, stol);
    COMPARE(tag + " running_var", C,
            [&](int64_t c) { return std::pair{double(run_var[c]), 0.75 * 2 + 0.25 * r.var[c] * M / (M - 1)}; },
            stol, stol);
    COMPARE(tag + " forward_train y", n, [&](int64_t k) {
        const int64_t c = channel_of(s, k);
        const double want = (to_double(x[k]) - r.mean[c]) / std::sqrt(r.var[c] + eps) * double(weight[c]) + double(bias[c]);
        return std::pair{to_double(y[k]), want};
    }, tol, tol);

    // batch_stats
    bc::batch_stats(xd.p, s, mean.p, var.p, stream);
    const auto bm = mean.get(), bv = var.get();
    COMPARE(tag + " batch_stats mean", C, [&](int64_t c) { return std::pair{double(bm[c]), r.mean[c]}; }, stol, stol);
    COMPARE(tag + " batch_stats var", C, [&](int64_t c) { return std::pair{double(bv[c]), r.var[c]}; }, stol, stol);

    // normalize with the saved statistics, with and without affine parameters
    bc::normalize(xd.p, s, sm.p, si.p, wd.p, bd.p, y2d.p, stream);
    const auto yn = y2d.get();
    COMPARE(tag + " normalize", n, [&](int64_t k) {
        const int64_t c = channel_of(s, k);
        return std::pair{to_double(yn[k]), (to_double(x[k]) - double(save_mean[c])) * double(save_invstd[c]) *
                                               double(weight[c]) + double(bias[c])};
    }, tol, tol);
    bc::normalize<T>(xd.p, s, sm.p, si.p, nullptr, nullptr, y2d.p, stream);
    const auto yn0 = y2d.get();
    COMPARE(tag + " normalize (no affine)", n, [&](int64_t k) {
        const int64_t c = channel_of(s, k);
        return std::pair{to_double(yn0[k]), (to_double(x[k]) - double(save_mean[c])) * double(save_invstd[c])};
    }, tol, tol);

    // forward_infer with the updated running statistics
    bc::forward_infer(xd.p, s, rm.p, rv.p, wd.p, bd.p, eps, y2d.p, stream);
    const auto yi = y2d.get();
    COMPARE(tag + " forward_infer", n, [&](int64_t k) {
        const int64_t c = channel_of(s, k);
        return std::pair{to_double(yi[k]), (to_double(x[k]) - double(run_mean[c])) /
                                               std::sqrt(double(run_var[c]) + eps) * double(weight[c]) +
                                               double(bias[c])};
    }, tol, tol);

    // backward with batch statistics against the closed form, and its split phases
    bc::backward(dyd.p, xd.p, s, sm.p, si.p, wd.p, true, dxd.p, dw.p, db.p, stream);
    bc::backward_reduce(dyd.p, xd.p, s, sm.p, si.p, sdy.p, sdyx.p, stream);
    bc::backward_elemt(dyd.p, xd.p, s, sm.p, si.p, wd.p, sdy.p, sdyx.p, M, dx2d.p, stream);
    const auto dx = dxd.get(), dx_split = dx2d.get();
    const auto dweight = dw.get(), dbias = db.get(), sum_dy = sdy.get(), sum_dy_xhat = sdyx.get();
    CHECK(same_bits(dx, dx_split));
    CHECK(same_bits(dweight, sum_dy_xhat) && same_bits(dbias, sum_dy));
    std::vector<double> rsdy(C, 0.0), rsdyx(C, 0.0), rscale(C, 0.0);
    for (int64_t k = 0; k < n; ++k) {
        const int64_t c = channel_of(s, k);
        rsdy[c] += to_double(dy[k]);
        rsdyx[c] += to_double(dy[k]) * (to_double(x[k]) - double(save_mean[c])) * double(save_invstd[c]);
        rscale[c] += std::fabs(to_double(dy[k]));
    }
    const double dy_scale = *std::max_element(rscale.begin(), rscale.end());  // sum |dy| of a channel
    COMPARE(tag + " dbias", C, [&](int64_t c) { return std::pair{double(dbias[c]), rsdy[c]}; }, 0,
            stol * dy_scale + stol);
    COMPARE(tag + " dweight", C, [&](int64_t c) { return std::pair{double(dweight[c]), rsdyx[c]}; }, 0,
            stol * 4 * dy_scale + stol);
    COMPARE(tag + " backward dx", n, [&](int64_t k) {
        const int64_t c = channel_of(s, k);
        const double m = save_mean[c], is = save_invstd[c];
        const double xhat = (to_double(x[k]) - m) * is;
        return std::pair{to_double(dx[k]),
                         double(weight[c]) * is * (to_double(dy[k]) - rsdy[c] / M - xhat * rsdyx[c] / M)};
    }, tol, tol * 10);

    // backward with fixed statistics: dx = dy * weight * invstd, same dweight and dbias
    bc::backward(dyd.p, xd.p, s, sm.p, si.p, wd.p, false, dxd.p, dw.p, db.p, stream);
    const auto dx_eval = dxd.get();
    CHECK(same_bits(dw.get(), dweight) && same_bits(db.get(), dbias));
    COMPARE(tag + " backward (fixed stats) dx", n, [&](int64_t k) {
        const int64_t c = channel_of(s, k);
        return std::pair{to_double(dx_eval[k]), to_double(dy[k]) * double(weight[c]) * double(save_invstd[c])};
    }, tol, tol);

    // determinism: a second forward_train and backward give the same bits
    Dev<P> rm2(std::vector<P>(C, P(0.5))), rv2(std::vector<P>(C, P(2)));
    bc::forward_train(xd.p, s, wd.p, bd.p, rm2.p, rv2.p, momentum, eps, y2d.p, mean.p, var.p, stream);
    CHECK(same_bits(y2d.get(), y));
    CHECK(same_bits(mean.get(), save_mean) && same_bits(var.get(), save_invstd));
    CHECK(same_bits(rm2.get(), run_mean) && same_bits(rv2.get(), run_var));
    bc::backward(dyd.p, xd.p, s, sm.p, si.p, wd.p, true, dx2d.p, dw.p, db.p, stream);
    CHECK(same_bits(dx2d.get(), dx) && same_bits(dw.get(), dweight) && same_bits(db.get(), dbias));

    // in place: y = x, and dx = dy
    {
        Dev<T> inplace(x, off);
        Dev<P> m3(C), i3(C);
        bc::forward_train<T>(inplace.p, s, wd.p, bd.p, nullptr, nullptr, momentum, eps, inplace.p, m3.p, i3.p, stream);
        CHECK(same_bits(inplace.get(), y));
        Dev<T> g(dy, off);
        bc::backward(g.p, xd.p, s, sm.p, si.p, wd.p, true, g.p, dw.p, db.p, stream);
        CHECK(same_bits(g.get(), dx));
    }

    // affine = None, and running buffers aliasing weight and bias (read before written)
    {
        bc::forward_train<T>(xd.p, s, nullptr, nullptr, nullptr, nullptr, momentum, eps, y2d.p, mean.p, var.p, stream);
        const auto y0 = y2d.get();
        COMPARE(tag + " forward_train (no affine)", n, [&](int64_t k) {
            const int64_t c = channel_of(s, k);
            return std::pair{to_double(y0[k]), (to_double(x[k]) - r.mean[c]) / std::sqrt(r.var[c] + eps)};
        }, tol, tol);
        Dev<P> w_alias(weight), b_alias(bias);
        bc::forward_train(xd.p, s, w_alias.p, b_alias.p, w_alias.p, b_alias.p, momentum, eps, y2d.p, mean.p, var.p,
                          stream);
        CHECK(same_bits(y2d.get(), y));
        const auto wa = w_alias.get(), ba = b_alias.get();
        COMPARE(tag + " running_mean aliasing weight", C, [&](int64_t c) {
            return std::pair{double(wa[c]), 0.75 * double(weight[c]) + 0.25 * r.mean[c]};
        }, stol, stol);
        COMPARE(tag + " running_var aliasing bias", C, [&](int64_t c) {
            return std::pair{double(ba[c]), 0.75 * double(bias[c]) + 0.25 * r.var[c] * M / (M - 1)};
        }, stol, stol);
    }
}

// ---- numerics ----------------------------------------------------------------------------------

void test_numerics(cudaStream_t stream) {
    namespace bc = bnorm::cuda;
    std::printf("  numerics: large mean, constant channels, NaN, [1, 2, 3, 4], empty batch\n");
    // Large mean: float32 data with |mean| >> std keeps mean and var accurate.
    for (const Shape s : {Shape{64, 2, 100}, Shape{40000, 2, 1}, Shape{64, 2, 128}}) {  // (40000 rows: 5 row blocks)
        const auto x = random_data<float>(s, 1e4, 5);
        Dev<float> xd(x), mean(2), var(2);
        bc::batch_stats(xd.p, s, mean.p, var.p, stream);
        const Moments r = reference_moments(x, s);
        const auto m = mean.get(), v = var.get();
        for (int c = 0; c < 2; ++c) {
            CHECK_CLOSE(m[c], r.mean[c], 1e-7, 0);
            CHECK_CLOSE(v[c], r.var[c], 1e-5, 0);
        }
    }
    // Constant channels of any magnitude map exactly to bias, with mean == the constant.
    for (const float v : {1.0f, 1e20f, 3e38f, -3e38f, 1e-30f}) {
        for (const Shape k : {Shape{3, 1, 7}, Shape{21, 1, 1}, Shape{300, 1, 1024}, Shape{5000, 8, 1}}) {
            const std::vector<float> xc(size_t(k.size()), v);
            const std::vector<float> bias(size_t(k.channels), 0.25f);
            Dev<float> xd(xc), y(size_t(k.size())), m(k.channels), is(k.channels), b(bias);
            bc::forward_train<float>(xd.p, k, nullptr, b.p, nullptr, nullptr, 0.1, 1e-5, y.p, m.p, is.p, stream);
            for (float mi : m.get()) CHECK(mi == v);
            bool exact = true;
            for (float yi : y.get()) exact = exact && yi == 0.25f;
            CHECK(exact);
        }
    }
    // NaN stays in its channel.
    for (const Shape k : {Shape{4, 2, 3}, Shape{12, 2, 1}}) {
        std::vector<double> xn(size_t(k.size()));
        for (int64_t i = 0; i < k.size(); ++i) xn[i] = double(i % 5);
        xn[index(k, 2, 1, 0)] = std::nan("");
        Dev<double> xd(xn), y(size_t(k.size())), m(2), is(2);
        bc::forward_train<double>(xd.p, k, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y.p, m.p, is.p, stream);
        const auto yh = y.get();
        for (int64_t i = 0; i < k.size(); ++i) {
            if (channel_of(k, i) == 0) CHECK(std::isfinite(yh[i]));
            else CHECK(std::isnan(yh[i]));
        }
    }
    // The [1, 2, 3, 4] example: normalizing variance 1.25, running variance 5/3.
    {
        Dev<double> x4(std::vector<double>{1, 2, 3, 4}), y(4), m(1), is(1), rm(std::vector<double>{0}),
            rv(std::vector<double>{0});
        bc::forward_train<double>(x4.p, Shape{4, 1, 1}, nullptr, nullptr, rm.p, rv.p, 1.0, 1e-5, y.p, m.p, is.p, stream);
        const double isv = is.get()[0];
        CHECK_CLOSE(1.0 / (isv * isv) - 1e-5, 1.25, 1e-12, 0);
        CHECK_CLOSE(rv.get()[0], 5.0 / 3.0, 1e-15, 0);
        CHECK_CLOSE(rm.get()[0], 2.5, 0, 0);
        // unbiased_running_var = false (Keras 3, Flax, ONNX): the biased variance 1.25
        Dev<double> rm2(std::vector<double>{0}), rv2(std::vector<double>{0});
        bc::forward_train<double>(x4.p, Shape{4, 1, 1}, nullptr, nullptr, rm2.p, rv2.p, 1.0, 1e-5, y.p, m.p, is.p,
                                  false, stream);
        CHECK_CLOSE(rv2.get()[0], 1.25, 1e-15, 0);
        CHECK_CLOSE(rm2.get()[0], 2.5, 0, 0);
    }
    // Empty batch: running statistics untouched, save_invstd = 1/sqrt(eps); null x/y allowed.
    {
        Dev<float> rm(std::vector<float>{3}), rv(std::vector<float>{4}), m(1), is(1);
        bc::forward_train<float>(nullptr, Shape{0, 1, 5}, nullptr, nullptr, rm.p, rv.p, 0.5, 1e-5, nullptr, m.p, is.p,
                                 stream);
        CHECK(rm.get()[0] == 3 && rv.get()[0] == 4);
        CHECK(m.get()[0] == 0);
        CHECK(is.get()[0] == float(1.0 / std::sqrt(1e-5)));
        Dev<float> dw(std::vector<float>{7}), db(std::vector<float>{7});
        bc::backward<float>(nullptr, nullptr, Shape{3, 1, 0}, m.p, is.p, nullptr, true, nullptr, dw.p, db.p, stream);
        CHECK(dw.get()[0] == 0 && db.get()[0] == 0);
        bc::normalize<float>(nullptr, Shape{0, 1, 5}, nullptr, nullptr, nullptr, nullptr, nullptr, stream);
    }
}

// ---- merge_stats ------------------------------------------------------------------------------

void test_merge_stats(cudaStream_t stream) {
    namespace bc = bnorm::cuda;
    std::printf("  merge_stats: shards, empty shard, against batch_stats of the whole\n");
    {
        // Two shards of one channel: {1, 2} and {3, 4, 5}, plus an empty shard.
        Dev<double> counts(std::vector<double>{2, 0, 3}), means(std::vector<double>{1.5, 99, 4}),
            vars(std::vector<double>{0.25, 99, 2.0 / 3.0}), count(1), mean(1), var(1);
        bc::merge_stats<double>(3, 1, counts.p, means.p, vars.p, count.p, mean.p, var.p, stream);
        CHECK(count.get()[0] == 5);
        CHECK_CLOSE(mean.get()[0], 3.0, 1e-15, 0);
        CHECK_CLOSE(var.get()[0], 2.0, 1e-15, 0);
        // A negative count cannot be rejected without a host sync: that channel becomes NaN.
        Dev<double> bad(std::vector<double>{2, -1, 3});
        bc::merge_stats<double>(3, 1, bad.p, means.p, vars.p, count.p, mean.p, var.p, stream);
        CHECK(std::isnan(count.get()[0]) && std::isnan(mean.get()[0]) && std::isnan(var.get()[0]));
        // Nor a negative variance (where its count is not 0; the empty shard's is ignored).
        Dev<double> negative(std::vector<double>{0.25, -1, -2});
        bc::merge_stats<double>(3, 1, counts.p, means.p, negative.p, count.p, mean.p, var.p, stream);
        CHECK(std::isnan(var.get()[0]));
        Dev<double> empty_negative(std::vector<double>{0.25, -1, 2.0 / 3.0});
        bc::merge_stats<double>(3, 1, counts.p, means.p, empty_negative.p, count.p, mean.p, var.p, stream);
        CHECK_CLOSE(var.get()[0], 2.0, 1e-15, 0);
    }
    // Shards of a float tensor along `outer`: merging their batch_stats = batch_stats of the whole.
    {
        const Shape whole{60, 5, 33};
        const int64_t parts = 4, C = whole.channels;
        const auto x = random_data<float>(whole, 100.0, 9);
        Dev<float> xd(x), wm(C), wv(C);
        bc::batch_stats(xd.p, whole, wm.p, wv.p, stream);
        const int64_t rows[parts] = {10, 0, 30, 20};
        std::vector<double> counts(parts * C);
        Dev<float> means(parts * C), vars(parts * C);
        int64_t row0 = 0;
        for (int64_t p = 0; p < parts; ++p) {
            const Shape sh{rows[p], C, whole.inner};
            bc::batch_stats(xd.p + row0 * C * whole.inner, sh, means.p + p * C, vars.p + p * C, stream);
            for (int64_t c = 0; c < C; ++c) counts[p * C + c] = double(sh.count());
            row0 += rows[p];
        }
        Dev<double> cd(counts), count(C);
        Dev<float> mean(C), var(C);
        bc::merge_stats<float>(parts, C, cd.p, means.p, vars.p, count.p, mean.p, var.p, stream);
        const auto cn = count.get();
        const auto mn = mean.get(), vn = var.get(), mw = wm.get(), vw = wv.get();
        for (int64_t c = 0; c < C; ++c) {
            CHECK(cn[c] == double(whole.count()));
            CHECK_CLOSE(mn[c], mw[c], 1e-6, 0);
            CHECK_CLOSE(vn[c], vw[c], 1e-5, 0);
        }
    }
}

// ---- argument errors -------------------------------------------------------------------------

void test_errors(cudaStream_t stream) {
    namespace bc = bnorm::cuda;
    std::printf("  argument errors: ValueError before anything is enqueued\n");
    const Shape s{4, 2, 3};
    Dev<float> x(std::vector<float>(24, 1.0f)), y(std::vector<float>(24, -7.0f)), mean(std::vector<float>(2, 9.0f)),
        invstd(std::vector<float>(2, 9.0f)), rm(std::vector<float>(2, 5.0f)), rv(std::vector<float>(2, 6.0f));
    auto train = [&](Shape shape, double momentum, double eps) {
        bc::forward_train<float>(x.p, shape, nullptr, nullptr, rm.p, rv.p, momentum, eps, y.p, mean.p, invstd.p, stream);
    };
    CHECK_THROWS(train(s, 1.5, 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(s, -0.1, 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(s, std::nan(""), 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(s, 0.1, 0.0), bnorm::ValueError);
    CHECK_THROWS(train(s, 0.1, -1.0), bnorm::ValueError);
    CHECK_THROWS(train(s, 0.1, std::nan("")), bnorm::ValueError);
    CHECK_THROWS(train(Shape{1, 2, 1}, 0.1, 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(Shape{-1, 2, 3}, 0.1, 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(Shape{INT64_MAX, 2, 3}, 0.1, 1e-5), bnorm::ValueError);
    CHECK_THROWS(bc::forward_train<float>(nullptr, s, nullptr, nullptr, rm.p, rv.p, 0.1, 1e-5, y.p, mean.p, invstd.p,
                                          stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::forward_train<float>(x.p, s, nullptr, nullptr, rm.p, rv.p, 0.1, 1e-5, y.p, nullptr, invstd.p,
                                          stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::batch_stats<float>(x.p, s, nullptr, invstd.p, stream), bnorm::ValueError);
    CHECK_THROWS(bc::batch_stats<float>(nullptr, s, mean.p, invstd.p, stream), bnorm::ValueError);
    CHECK_THROWS(bc::normalize<float>(x.p, s, mean.p, nullptr, nullptr, nullptr, y.p, stream), bnorm::ValueError);
    CHECK_THROWS(bc::forward_infer<float>(x.p, s, nullptr, rv.p, nullptr, nullptr, 1e-5, y.p, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::forward_infer<float>(x.p, s, rm.p, rv.p, nullptr, nullptr, 0.0, y.p, stream), bnorm::ValueError);
    CHECK_THROWS(bc::backward_elemt<float>(x.p, x.p, s, mean.p, invstd.p, nullptr, mean.p, mean.p, 0.0, y.p, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::backward_elemt<float>(x.p, x.p, s, mean.p, invstd.p, nullptr, mean.p, mean.p,
                                           std::numeric_limits<double>::infinity(), y.p, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::backward_reduce<float>(x.p, nullptr, s, mean.p, invstd.p, mean.p, mean.p, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::backward<float>(x.p, x.p, s, mean.p, invstd.p, nullptr, true, y.p, nullptr, mean.p, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::backward<float>(x.p, x.p, s, mean.p, invstd.p, nullptr, true, nullptr, mean.p, mean.p, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::merge_stats<float>(-1, 2, nullptr, nullptr, nullptr, nullptr, nullptr, nullptr, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::merge_stats<float>(2, 2, nullptr, mean.p, mean.p, nullptr, mean.p, mean.p, stream),
                 bnorm::ValueError);
    // Nothing was written by any of the calls above.
    CHECK(y.get() == std::vector<float>(24, -7.0f));
    CHECK(mean.get() == std::vector<float>(2, 9.0f) && invstd.get() == std::vector<float>(2, 9.0f));
    CHECK(rm.get() == std::vector<float>(2, 5.0f) && rv.get() == std::vector<float>(2, 6.0f));
    try {
        train(Shape{1, 2, 1}, 0.1, 1e-5);
    } catch (const std::exception& e) {
        CHECK(std::string(e.what()) ==
              "bnorm: forward_train: expected more than 1 value per channel when training, got input of shape "
              "(outer, channels, inner) = (1, 2, 1)");
    }
    CHECK(cudaGetLastError() == cudaSuccess);  // no CUDA error left behind
}

// ---- streams and graphs ----------------------------------------------------------------------

void test_streams_and_graphs() {
    namespace bc = bnorm::cuda;
    std::printf("  streams: concurrent calls on two streams; CUDA graph capture of forward_train + backward\n");
    const Shape s{16, 24, 784};
    const int64_t C = s.channels, n = s.size();
    const auto x = random_data<float>(s, 1.0, 11);
    const auto dy = random_data<float>(s, 0.0, 12);
    Dev<float> xd(x), dyd(dy), y(n), m(C), is(C), dx(n), dw(C), db(C);
    // Reference results on the legacy default stream.
    bc::forward_train<float>(xd.p, s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y.p, m.p, is.p);
    bc::backward<float>(dyd.p, xd.p, s, m.p, is.p, nullptr, true, dx.p, dw.p, db.p);
    const auto y_ref = y.get(), m_ref = m.get(), dx_ref = dx.get(), dw_ref = dw.get();

    cudaStream_t a, b;
    CUDA_OK(cudaStreamCreateWithFlags(&a, cudaStreamNonBlocking));
    CUDA_OK(cudaStreamCreateWithFlags(&b, cudaStreamNonBlocking));
    {
        Dev<float> y1(n), y2(n), m1(C), m2(C), i1(C), i2(C);
        for (int rep = 0; rep < 3; ++rep) {
            bc::forward_train<float>(xd.p, s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y1.p, m1.p, i1.p, a);
            bc::forward_train<float>(xd.p, s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y2.p, m2.p, i2.p, b);
        }
        CUDA_OK(cudaStreamSynchronize(a));
        CUDA_OK(cudaStreamSynchronize(b));
        CHECK(same_bits(y1.get(), y_ref) && same_bits(y2.get(), y_ref));
        CHECK(same_bits(m1.get(), m_ref) && same_bits(m2.get(), m_ref));
    }
    {
        Dev<float> yg(n), mg(C), ig(C), dxg(n), dwg(C), dbg(C);
        cudaGraph_t graph;
        cudaGraphExec_t exec;
        CUDA_OK(cudaStreamBeginCapture(a, cudaStreamCaptureModeGlobal));
        bc::forward_train<float>(xd.p, s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, yg.p, mg.p, ig.p, a);
        bc::backward<float>(dyd.p, xd.p, s, mg.p, ig.p, nullptr, true, dxg.p, dwg.p, dbg.p, a);
        CUDA_OK(cudaStreamEndCapture(a, &graph));
        CUDA_OK(cudaGraphInstantiate(&exec, graph, 0));
        for (int rep = 0; rep < 2; ++rep) CUDA_OK(cudaGraphLaunch(exec, a));
        CUDA_OK(cudaStreamSynchronize(a));
        CHECK(same_bits(yg.get(), y_ref) && same_bits(mg.get(), m_ref));
        CHECK(same_bits(dxg.get(), dx_ref) && same_bits(dwg.get(), dw_ref));
        CUDA_OK(cudaGraphExecDestroy(exec));
        CUDA_OK(cudaGraphDestroy(graph));
    }
    CUDA_OK(cudaStreamDestroy(a));
    CUDA_OK(cudaStreamDestroy(b));
}

// ---- more than 2^31 elements -----------------------------------------------------------------

// x[g] = pattern[g % L] for the flat index g: exact in half, so the reference is analytic.
constexpr int64_t kPeriod = int64_t(1) << 20;
double pattern(int64_t p) { return double((p * 7919) % 1024) / 64.0 - 8.0; }

/// Sums of f(x) over the channel whose flat indices are start + k * step, k < count.
template <class F>
double periodic_sum(int64_t start, int64_t step, int64_t count, F f) {
    const int64_t period = kPeriod / std::gcd(step, kPeriod);  // of k -> (start + k * step) % L
    double sum = 0;
    const int64_t full = count / period, rest = count % period;
    for (int64_t k = 0; k < std::min(count, period); ++k) {
        const double v = pattern((start + k * step) % kPeriod);
        sum += f(v) * double(full + (k < rest ? 1 : 0));
    }
    return sum;
}

void test_huge() {
    namespace bc = bnorm::cuda;
    using T = bnorm::half;
    const int64_t n = (int64_t(1) << 31) + 24688;  // n / 2 % 8 == 0: the planes case is vectorized
    if (std::getenv("BNORM_TEST_SKIP_HUGE")) {  // (under compute-sanitizer: minutes for 4 GiB)
        std::printf("  > 2^31 elements: skipped, BNORM_TEST_SKIP_HUGE is set\n");
        return;
    }
    size_t free_bytes = 0, total = 0;
    CUDA_OK(cudaMemGetInfo(&free_bytes, &total));
    const size_t need = size_t(n) * sizeof(T) + (size_t(1) << 30);
    if (free_bytes < need) {
        std::printf("  > 2^31 elements: skipped, %zu MiB free, %zu MiB needed\n", free_bytes >> 20, need >> 20);
        return;
    }
    std::printf("  > 2^31 elements: float16, %" PRId64 " elements, planes and rows\n", n);
    T* x = nullptr;
    CUDA_OK(cudaMalloc(&x, size_t(n) * sizeof(T)));
    std::vector<T> chunk(kPeriod);
    for (int64_t p = 0; p < kPeriod; ++p) chunk[p] = from_double<T>(pattern(p));
    auto fill = [&] {
        for (int64_t g = 0; g < n; g += kPeriod)
            CUDA_OK(cudaMemcpy(x + g, chunk.data(), size_t(std::min(kPeriod, n - g)) * sizeof(T),
                               cudaMemcpyHostToDevice));
    };
    auto at = [&](int64_t g) {
        T v;
        CUDA_OK(cudaMemcpy(&v, x + g, sizeof v, cudaMemcpyDeviceToHost));
        return to_double(v);
    };
    const Shape shapes[] = {{1, 2, n / 2}, {n / 2, 2, 1}};  // planes; rows
    for (const Shape s : shapes) {
        fill();
        const int64_t C = 2, M = s.count();
        double mean_ref[2], var_ref[2], sdyx_ref[2];
        for (int64_t c = 0; c < C; ++c) {
            const int64_t start = s.inner > 1 ? c * s.inner : c, step = s.inner > 1 ? 1 : C;
            mean_ref[c] = periodic_sum(start, step, M, [](double v) { return v; }) / double(M);
            const double mu = mean_ref[c];
            var_ref[c] = periodic_sum(start, step, M, [mu](double v) { return (v - mu) * (v - mu); }) / double(M);
            sdyx_ref[c] = periodic_sum(start, step, M, [mu](double v) { return v * (v - mu); });
        }
        // backward_reduce with dy = x and the reference mean, invstd = 1
        std::vector<float> mref = {float(mean_ref[0]), float(mean_ref[1])};
        Dev<float> md(mref), ones(std::vector<float>{1, 1}), sdy(2), sdyx(2), sm(2), si(2);
        bc::backward_reduce<T>(x, x, s, md.p, ones.p, sdy.p, sdyx.p, nullptr);
        const auto g1 = sdy.get(), g2 = sdyx.get();
        for (int64_t c = 0; c < C; ++c) {
            CHECK_CLOSE(g1[c], mean_ref[c] * double(M), 1e-5, 1e-6 * double(M));
            // sum(x (x - m_f)) with the float mean m_f = sum((x - mu)^2) + (mu - m_f) * sum(x)
            CHECK_CLOSE(g2[c], sdyx_ref[c] + (mean_ref[c] - double(mref[c])) * mean_ref[c] * double(M), 1e-5, 0);
        }
        // forward_train in place
        bc::forward_train<T>(x, s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, x, sm.p, si.p, nullptr);
        const auto m = sm.get(), is = si.get();
        for (int64_t c = 0; c < C; ++c) {
            CHECK_CLOSE(m[c], mean_ref[c], 1e-6, 1e-6);
            CHECK_CLOSE(is[c], 1.0 / std::sqrt(var_ref[c] + 1e-5), 1e-5, 0);
        }
        const int64_t probes[] = {0, 1, 12345, (int64_t(1) << 31) - 1, int64_t(1) << 31, (int64_t(1) << 31) + 1,
                                  n - 9, n - 2, n - 1};
        for (const int64_t g : probes) {
            const int64_t c = s.inner > 1 ? g / s.inner : g % C;
            const double want = (pattern(g % kPeriod) - double(m[c])) * double(is[c]);
            CHECK_CLOSE(at(g), want, 2e-3, 2e-3);
        }
    }
    CUDA_OK(cudaFree(x));
}

// The fused-epilogue overloads against the CPU backend's (same formulas and roundings up to
// the last bits: float tolerance), and their argument checks (ValueError, nothing written).
void test_fused_epilogue(Shape s, cudaStream_t stream) {
    namespace bc = bnorm::cuda;
    using bnorm::Activation;
    using bnorm::Epilogue;
    using bnorm::EpilogueGrad;
    std::printf("  fused epilogue %s\n", describe(s).c_str());
    const size_t n = size_t(s.size()), C = size_t(s.channels);
    const auto x = random_data<float>(s, 1.0, 11), z = random_data<float>(s, 0.0, 12), dy = random_data<float>(s, 0.0, 13);
    const std::vector<float> w(C, 1.5f), b(C, -0.25f);
    std::vector<float> y(n), mean(C), invstd(C), dx(n), dsum(n), dw(C), db(C);
    bnorm::forward_train(x.data(), s, w.data(), b.data(), nullptr, nullptr, 0.1, 1e-5,
                         Epilogue<float>{z.data(), Activation::relu}, y.data(), mean.data(), invstd.data());
    bnorm::backward(dy.data(), x.data(), s, mean.data(), invstd.data(), w.data(), true,
                    EpilogueGrad<float>{Activation::relu, y.data()}, dx.data(), dw.data(), db.data(), dsum.data());
    Dev<float> gx(x), gz(z), gdy(dy), gw(w), gb(b), gy(n), gmean(C), ginvstd(C), gdx(n), gdsum(n), gdw(C), gdb(C);
    bc::forward_train<float>(gx.p, s, gw.p, gb.p, nullptr, nullptr, 0.1, 1e-5, Epilogue<float>{gz.p, Activation::relu},
                             gy.p, gmean.p, ginvstd.p, stream);
    const auto got_y = gy.get();
    double worst = 0;
    for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(double(got_y[i]) - double(y[i])));
    CHECK(worst <= 1e-4);
    gy.upload(y);  // the mask from the CPU's y, so both backwards mask the same elements
    gmean.upload(mean);
    ginvstd.upload(invstd);
    bc::backward<float>(gdy.p, gx.p, s, gmean.p, ginvstd.p, gw.p, true, EpilogueGrad<float>{Activation::relu, gy.p},
                        gdx.p, gdw.p, gdb.p, gdsum.p, stream);
    CHECK(same_bits(gdsum.get(), dsum));
    const auto got_dx = gdx.get(), got_dw = gdw.get();
    worst = 0;
    for (size_t i = 0; i < n; ++i) worst = std::max(worst, std::fabs(double(got_dx[i]) - double(dx[i])));
    for (size_t c = 0; c < C; ++c) worst = std::max(worst, std::fabs(double(got_dw[c]) - double(dw[c])) / double(n / C));
    CHECK(worst <= 1e-4);
    // checks: a bad activation, a null y with ReLU; nothing written
    Dev<float> untouched(std::vector<float>(n, -7.0f));
    CHECK_THROWS(bc::normalize<float>(gx.p, s, gmean.p, ginvstd.p, nullptr, nullptr,
                                      Epilogue<float>{nullptr, static_cast<Activation>(7)}, untouched.p, stream),
                 bnorm::ValueError);
    CHECK_THROWS(bc::backward<float>(gdy.p, gx.p, s, gmean.p, ginvstd.p, gw.p, true,
                                     EpilogueGrad<float>{Activation::relu, nullptr}, gdx.p, gdw.p, gdb.p, untouched.p,
                                     stream),
                 bnorm::ValueError);
    CHECK(same_bits(untouched.get(), std::vector<float>(n, -7.0f)));
}

}  // namespace

int main() {
    if (!bnorm::cuda::available()) {
        std::printf("test_cuda: SKIP: no usable CUDA device (bnorm::cuda::available() is false)\n");
        return 77;
    }
    int device = 0;
    cudaDeviceProp prop{};
    CUDA_OK(cudaGetDevice(&device));
    CUDA_OK(cudaGetDeviceProperties(&prop, device));
    std::printf("test_cuda: device %d: %s (sm_%d%d, %d SMs, %.1f GiB)\n", device, prop.name, prop.major, prop.minor,
                prop.multiProcessorCount, double(prop.totalGlobalMem) / double(1 << 30));
    cudaStream_t stream;
    CUDA_OK(cudaStreamCreate(&stream));

    const Shape shapes[] = {
        {4, 3, 5},       // planes, tiny, odd inner (scalar)
        {7, 5, 1},       // rows, tiny
        {3, 2, 5000},    // planes, one row split across blocks
        {1000, 3, 1},    // rows, one row block, C not a multiple of the vector width
        {20000, 3, 1},   // rows, several row blocks (a block takes >= 8 tiles per thread: 4096 rows here)
        {2, 1500, 1},    // rows, many channel slices
        {40, 4, 130},    // planes, several rows per block
        {1, 3, 9},       // N == 1 with spatial size > 1
        {2, 5, 2},       // inner == 2
        {8, 16, 64},     // planes, vectorized
        {64, 32, 49},    // planes like (N, C, 7, 7): odd inner, two blocks per channel
        {16, 8, 3136},   // planes like (N, C, 56, 56): vectorized, 13 blocks per channel
        {4096, 64, 1},   // rows like NHWC: vectorized, several row blocks
        {3000, 20, 1},   // rows: C % 8 != 0 (16-bit types scalar), C % 4 == 0 (float vectorized)
        {2, 7, 1},       // M == 2
    };
    std::printf("every op against the float64 reference, per dtype and shape:\n");
    for (const Shape& s : shapes) {
        test_ops<float>(s, false, stream);
        test_ops<double>(s, false, stream);
        test_ops<bnorm::half>(s, false, stream);
        test_ops<bnorm::bfloat16>(s, false, stream);
    }
    std::printf("scalar fallbacks (pointers not 16-byte aligned):\n");
    for (const Shape& s : {Shape{8, 16, 64}, Shape{4096, 64, 1}, Shape{16, 8, 3136}}) {
        test_ops<float>(s, true, stream);
        test_ops<bnorm::bfloat16>(s, true, stream);
    }
    std::printf("moderate sizes:\n");
    test_ops<float>(Shape{32, 64, 1024}, false, stream);
    test_ops<bnorm::bfloat16>(Shape{8192, 256, 1}, false, stream);
    std::printf("other checks:\n");
    test_numerics(stream);
    test_merge_stats(stream);
    test_errors(stream);
    for (const Shape& s : {Shape{8, 3, 5}, Shape{16, 8, 3136}, Shape{4096, 64, 1}, Shape{20000, 3, 1}})
        test_fused_epilogue(s, stream);
    test_streams_and_graphs();
    test_huge();
    CUDA_OK(cudaStreamDestroy(stream));
    CUDA_OK(cudaDeviceSynchronize());
    std::printf("test_cuda: %d failure(s)\n", check::failures());
    return check::failures() == 0 ? 0 : 1;
}
