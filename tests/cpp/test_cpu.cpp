// C++ tests of the CPU API against a double-precision reference written as plain loops.
#include <bnorm/bnorm.hpp>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <thread>
#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#endif
#include <vector>

#include "../../cpp/src/cpu_limits.hpp"
#include "../../cpp/src/half.hpp"
#include "check.hpp"

namespace {

using bnorm::Shape;

template <class T> T from_double(double v) {
    if constexpr (std::is_same_v<T, bnorm::half>) return bnorm::detail::float_to_half(float(v));
    else return T(v);
}
template <class T> double to_double(T v) {
    if constexpr (std::is_same_v<T, bnorm::half>) return bnorm::detail::half_to_float(v);
    else return double(v);
}
template <class T> double tolerance() {
    if constexpr (std::is_same_v<T, double>) return 1e-12;
    else if constexpr (std::is_same_v<T, float>) return 2e-5;
    else return 2e-3;  // the output is rounded to half
}

int64_t index(Shape s, int64_t o, int64_t c, int64_t i) { return (o * s.channels + c) * s.inner + i; }

struct Reference {
    std::vector<double> mean, var;
};

template <class T>
Reference reference_moments(const std::vector<T>& x, Shape s) {
    Reference r{std::vector<double>(s.channels, 0.0), std::vector<double>(s.channels, 0.0)};
    for (int64_t c = 0; c < s.channels; ++c) {
        for (int64_t o = 0; o < s.outer; ++o)
            for (int64_t i = 0; i < s.inner; ++i) r.mean[c] += to_double(x[index(s, o, c, i)]);
        r.mean[c] /= double(s.count());
        for (int64_t o = 0; o < s.outer; ++o)
            for (int64_t i = 0; i < s.inner; ++i) {
                const double d = to_double(x[index(s, o, c, i)]) - r.mean[c];
                r.var[c] += d * d;
            }
        r.var[c] /= double(s.count());
    }
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

template <class T>
void test_forward_backward(Shape s) {
    using P = bnorm::param_t<T>;
    const double tol = tolerance<T>();
    const int64_t C = s.channels;
    const auto x = random_data<T>(s, 3.0, 1);
    const auto dy = random_data<T>(s, 0.0, 2);
    std::vector<P> weight(C), bias(C), running_mean(C, P(0.5)), running_var(C, P(2));
    for (int64_t c = 0; c < C; ++c) {
        weight[c] = P(0.5 + 0.1 * double(c % 7));
        bias[c] = P(-1.0 + 0.3 * double(c % 5));
    }
    std::vector<T> y(x.size());
    std::vector<P> save_mean(C), save_invstd(C);
    const double momentum = 0.25, eps = 1e-5;
    bnorm::forward_train(x.data(), s, weight.data(), bias.data(), running_mean.data(), running_var.data(),
                         momentum, eps, y.data(), save_mean.data(), save_invstd.data());
    const Reference r = reference_moments(x, s);
    const double M = double(s.count());
    for (int64_t c = 0; c < C; ++c) {
        const double invstd = 1.0 / std::sqrt(r.var[c] + eps);
        CHECK_CLOSE(save_mean[c], r.mean[c], tol, tol);
        CHECK_CLOSE(save_invstd[c], invstd, tol, 0);
        CHECK_CLOSE(running_mean[c], 0.75 * 0.5 + 0.25 * r.mean[c], tol, tol);
        CHECK_CLOSE(running_var[c], 0.75 * 2 + 0.25 * r.var[c] * M / (M - 1), tol, tol);
        for (int64_t o = 0; o < s.outer; ++o)
            for (int64_t i = 0; i < s.inner; ++i) {
                const int64_t k = index(s, o, c, i);
                const double want = (to_double(x[k]) - r.mean[c]) * invstd * double(weight[c]) + double(bias[c]);
                CHECK_CLOSE(to_double(y[k]), want, tol, tol);
            }
    }

    // Backward with batch statistics, against the closed form; and its split phases.
    std::vector<T> dx(x.size()), dx_split(x.size());
    std::vector<P> dweight(C), dbias(C), sum_dy(C), sum_dy_xhat(C);
    bnorm::backward(dy.data(), x.data(), s, save_mean.data(), save_invstd.data(), weight.data(), true, dx.data(),
                    dweight.data(), dbias.data());
    bnorm::backward_reduce(dy.data(), x.data(), s, save_mean.data(), save_invstd.data(), sum_dy.data(),
                           sum_dy_xhat.data());
    bnorm::backward_elemt(dy.data(), x.data(), s, save_mean.data(), save_invstd.data(), weight.data(),
                          sum_dy.data(), sum_dy_xhat.data(), M, dx_split.data());
    CHECK(std::memcmp(dx.data(), dx_split.data(), dx.size() * sizeof(T)) == 0);
    for (int64_t c = 0; c < C; ++c) {
        double sdy = 0, sdyx = 0, scale_dy = 0;
        const double m = save_mean[c], is = save_invstd[c];
        for (int64_t o = 0; o < s.outer; ++o)
            for (int64_t i = 0; i < s.inner; ++i) {
                const int64_t k = index(s, o, c, i);
                sdy += to_double(dy[k]);
                sdyx += to_double(dy[k]) * (to_double(x[k]) - m) * is;
                scale_dy += std::fabs(to_double(dy[k]));
            }
        CHECK_CLOSE(dbias[c], sdy, tol, tol * scale_dy);
        CHECK_CLOSE(dweight[c], sdyx, tol, tol * scale_dy);
        CHECK(dbias[c] == sum_dy[c] && dweight[c] == sum_dy_xhat[c]);
        for (int64_t o = 0; o < s.outer; ++o)
            for (int64_t i = 0; i < s.inner; ++i) {
                const int64_t k = index(s, o, c, i);
                const double xhat = (to_double(x[k]) - m) * is;
                const double want = double(weight[c]) * is * (to_double(dy[k]) - sdy / M - xhat * sdyx / M);
                CHECK_CLOSE(to_double(dx[k]), want, tol, tol * 10);
            }
    }

    // Backward with fixed statistics: dx = dy * weight * invstd (written in the training
    // backward's schedules, or after the sums where cached), and the same sums.
    bnorm::backward(dy.data(), x.data(), s, save_mean.data(), save_invstd.data(), weight.data(), false, dx.data(),
                    dweight.data(), dbias.data());
    for (int64_t k = 0; k < s.size(); ++k) {
        const int64_t c = (k / s.inner) % C;
        CHECK_CLOSE(to_double(dx[k]), to_double(dy[k]) * double(weight[c]) * double(save_invstd[c]), tol, tol);
    }
    for (int64_t c = 0; c < C; ++c) CHECK(dbias[c] == sum_dy[c] && dweight[c] == sum_dy_xhat[c]);

    // Inference equals the reference with the running statistics.
    bnorm::forward_infer(x.data(), s, running_mean.data(), running_var.data(), weight.data(), bias.data(), eps,
                         y.data());
    for (int64_t k = 0; k < s.size(); ++k) {
        const int64_t c = (k / s.inner) % C;
        const double want = (to_double(x[k]) - running_mean[c]) / std::sqrt(double(running_var[c]) + eps) *
                                double(weight[c]) + double(bias[c]);
        CHECK_CLOSE(to_double(y[k]), want, tol, tol);
    }
}

template <class T>
void test_thread_determinism(Shape s) {
    using P = bnorm::param_t<T>;
    const auto x = random_data<T>(s, 1.0, 3);
    const auto dy = random_data<T>(s, 0.0, 4);
    std::vector<std::vector<T>> ys, dxs;
    std::vector<std::vector<P>> stats;
    for (int threads : {1, 2, 3}) {
        bnorm::set_num_threads(threads);
        std::vector<T> y(x.size()), dx(x.size());
        std::vector<P> mean(s.channels), invstd(s.channels), dw(s.channels), db(s.channels);
        bnorm::forward_train(x.data(), s, (const P*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y.data(),
                             mean.data(), invstd.data());
        bnorm::backward(dy.data(), x.data(), s, mean.data(), invstd.data(), nullptr, true, dx.data(), dw.data(),
                        db.data());
        ys.push_back(y);
        dxs.push_back(dx);
        mean.insert(mean.end(), dw.begin(), dw.end());
        stats.push_back(mean);
    }
    bnorm::set_num_threads(2);
    for (size_t k = 1; k < ys.size(); ++k) {
        CHECK(std::memcmp(ys[0].data(), ys[k].data(), ys[0].size() * sizeof(T)) == 0);
        CHECK(std::memcmp(dxs[0].data(), dxs[k].data(), dxs[0].size() * sizeof(T)) == 0);
        CHECK(std::memcmp(stats[0].data(), stats[k].data(), stats[0].size() * sizeof(P)) == 0);
    }
}

// Outputs large enough for non-temporal stores, written at every alignment, and in place
// (the output is the input, at every alignment): the same bits.
template <class T>
void test_streaming_alignment(Shape s) {
    using P = bnorm::param_t<T>;
    const auto x = random_data<T>(s, 1.0, 9);
    std::vector<T> reference(x.size()), shifted(x.size() + 32);
    std::vector<P> mean(s.channels), invstd(s.channels);
    bnorm::forward_train(x.data(), s, (const P*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, reference.data(),
                         mean.data(), invstd.data());
    for (int offset : {1, 2, 3, 5, 8, 16}) {
        bnorm::forward_train(x.data(), s, (const P*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5,
                             shifted.data() + offset, mean.data(), invstd.data());
        CHECK(std::memcmp(reference.data(), shifted.data() + offset, x.size() * sizeof(T)) == 0);
        T* in_place = shifted.data() + offset;
        std::memcpy(in_place, x.data(), x.size() * sizeof(T));
        bnorm::forward_train(in_place, s, (const P*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, in_place,
                             mean.data(), invstd.data());
        CHECK(std::memcmp(reference.data(), in_place, x.size() * sizeof(T)) == 0);
    }
}

void test_errors_leave_buffers_untouched() {
    const Shape s{4, 2, 3};
    std::vector<float> x(24, 1.0f), y(24, -7.0f), mean(2, 9.0f), invstd(2, 9.0f), rm(2, 5.0f), rv(2, 6.0f);
    auto train = [&](Shape shape, double momentum, double eps) {
        bnorm::forward_train(x.data(), shape, (const float*)nullptr, nullptr, rm.data(), rv.data(), momentum, eps,
                             y.data(), mean.data(), invstd.data());
    };
    CHECK_THROWS(train(s, 1.5, 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(s, -0.1, 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(s, std::nan(""), 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(s, 0.1, 0.0), bnorm::ValueError);
    CHECK_THROWS(train(s, 0.1, -1.0), bnorm::ValueError);
    CHECK_THROWS(train(Shape{1, 2, 1}, 0.1, 1e-5), bnorm::ValueError);
    CHECK_THROWS(train(Shape{-1, 2, 3}, 0.1, 1e-5), bnorm::ValueError);
    CHECK(y == std::vector<float>(24, -7.0f));
    CHECK(mean == std::vector<float>(2, 9.0f) && invstd == std::vector<float>(2, 9.0f));
    CHECK(rm == std::vector<float>(2, 5.0f) && rv == std::vector<float>(2, 6.0f));
    CHECK_THROWS(bnorm::batch_stats<float>(x.data(), s, nullptr, invstd.data()), bnorm::ValueError);
    CHECK_THROWS(bnorm::forward_infer<float>(x.data(), s, nullptr, rv.data(), nullptr, nullptr, 1e-5, y.data()),
                 bnorm::ValueError);
    CHECK_THROWS(bnorm::backward_elemt<float>(x.data(), x.data(), s, mean.data(), invstd.data(), nullptr,
                                              mean.data(), mean.data(), 0.0, y.data()),
                 bnorm::ValueError);
    CHECK(y == std::vector<float>(24, -7.0f));
    CHECK_THROWS(bnorm::set_num_threads(0), bnorm::ValueError);
    try {
        train(Shape{1, 2, 1}, 0.1, 1e-5);
    } catch (const std::exception& e) {
        CHECK(std::string(e.what()) ==
              "bnorm: forward_train: expected more than 1 value per channel when training, got input of shape "
              "(outer, channels, inner) = (1, 2, 1)");
    }
}

// The message of what expr throws (empty if it throws nothing).
template <class F>
std::string message_of(F&& expr) {
    try {
        expr();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "";
}

bool contains(const std::string& text, const char* part) { return text.find(part) != std::string::npos; }

// A negative running_var is refused before anything is written (forward_infer reads it,
// forward_train updates it); -0 and NaN pass (NaN propagates to its channel only).
void test_negative_running_var() {
    const Shape s{4, 2, 3};
    std::vector<float> x(24, 1.0f), y(24, -7.0f), rm(2, 0.0f), rv{1.0f, -0.5f}, mean(2, 9.0f), invstd(2, 9.0f);
    const std::string infer = message_of([&] {
        bnorm::forward_infer(x.data(), s, rm.data(), rv.data(), (const float*)nullptr, nullptr, 1e-5, y.data());
    });
    CHECK(infer.find("bnorm: forward_infer: running_var must be >= 0, got -0.5 for channel 1") == 0);
    const std::string train = message_of([&] {
        bnorm::forward_train(x.data(), s, (const float*)nullptr, nullptr, rm.data(), rv.data(), 0.1, 1e-5, y.data(),
                             mean.data(), invstd.data());
    });
    CHECK(train.find("bnorm: forward_train: running_var must be >= 0, got -0.5 for channel 1") == 0);
    CHECK(y == std::vector<float>(24, -7.0f) && rm == std::vector<float>(2, 0.0f));
    CHECK(rv == (std::vector<float>{1.0f, -0.5f}) && mean == std::vector<float>(2, 9.0f));
    rv = {-0.0f, std::nanf("")};
    bnorm::forward_infer(x.data(), s, rm.data(), rv.data(), (const float*)nullptr, nullptr, 1e-5, y.data());
    CHECK(std::isfinite(y[0]) && std::isnan(y[3]));
}

void test_argument_messages() {
    const Shape s{4, 2, 3};
    std::vector<float> x(24, 1.0f), y(24, -7.0f), m(2, 9.0f), is(2, 9.0f);
    // Shapes whose element count overflows int64 are refused, not wrapped to a small or empty array.
    for (const Shape big : {Shape{int64_t(1) << 32, 3, int64_t(1) << 32}, Shape{int64_t(1) << 62, 4, 1},
                            Shape{INT64_MAX, 3, 2}, Shape{3, INT64_MAX, 1}}) {
        const std::string what = message_of([&] {
            bnorm::forward_train(x.data(), big, (const float*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y.data(),
                                 m.data(), is.data());
        });
        CHECK(contains(what, "forward_train") && contains(what, "more than 2^63 - 1 elements"));
        CHECK_THROWS(bnorm::normalize(x.data(), big, m.data(), is.data(), nullptr, nullptr, y.data()), bnorm::ValueError);
        CHECK_THROWS(bnorm::backward(x.data(), x.data(), big, m.data(), is.data(), nullptr, false, y.data(), m.data(),
                                     is.data()),
                     bnorm::ValueError);
    }
    CHECK(y == std::vector<float>(24, -7.0f) && m == std::vector<float>(2, 9.0f));
    std::vector<double> counts(4, 1.0), dm(4);
    CHECK(contains(message_of([&] {
              bnorm::merge_stats<double>(int64_t(1) << 32, int64_t(1) << 32, counts.data(), dm.data(), dm.data(),
                                         dm.data(), dm.data(), dm.data());
          }),
          "parts and channels must be >= 0 with a product below 2^63"));
    // Null pointers are named one by one.
    const auto null_in_backward = [&](int which) {
        const float* in[4] = {x.data(), x.data(), m.data(), is.data()};
        in[which] = nullptr;
        return message_of(
            [&] { bnorm::backward(in[0], in[1], s, in[2], in[3], nullptr, true, y.data(), m.data(), is.data()); });
    };
    const char* names[4] = {"dy must not be null", "x must not be null", "mean must not be null",
                            "invstd must not be null"};
    for (int which = 0; which < 4; ++which) CHECK(contains(null_in_backward(which), names[which]));
    CHECK(contains(message_of([&] {
              bnorm::backward(x.data(), x.data(), s, m.data(), is.data(), nullptr, true, (float*)nullptr, m.data(),
                              is.data());
          }),
          "backward: dx must not be null"));
    CHECK(contains(message_of([&] {
              bnorm::backward_elemt(x.data(), x.data(), s, m.data(), is.data(), nullptr, nullptr, m.data(), 4.0,
                                    y.data());
          }),
          "backward_elemt: sum_dy must not be null"));
    // Numbers as written, not in fixed notation ("got -0.000000").
    CHECK(contains(message_of([&] {
              bnorm::backward_elemt(x.data(), x.data(), s, m.data(), is.data(), nullptr, m.data(), m.data(), -1e-9,
                                    y.data());
          }),
          "count must be positive and finite, got -1e-09"));
    CHECK(contains(message_of([&] {
              bnorm::forward_train(x.data(), s, (const float*)nullptr, nullptr, nullptr, nullptr, 1.0000001, 1e-5,
                                   y.data(), m.data(), is.data());
          }),
          "momentum must be in [0, 1], got 1.0000001"));
    // An empty x returns before count is checked: its M is 0 (backward_reduce + backward_elemt
    // with count = M equals backward, which returns empty results).
    bnorm::backward_elemt<float>(nullptr, nullptr, Shape{0, 3, 4}, nullptr, nullptr, nullptr, nullptr, nullptr, 0.0,
                                 nullptr);
    // An x with no elements is no batch of one, even with one value per (absent) channel:
    // returns without an error (and writes nothing: there are no channels).
    bnorm::forward_train<float>(nullptr, Shape{1, 0, 1}, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, nullptr,
                                nullptr, nullptr);
    // count() overflows even with no channels.
    CHECK(contains(message_of([&] {
              bnorm::forward_train<float>(nullptr, Shape{int64_t(1) << 40, 0, int64_t(1) << 40}, nullptr, nullptr,
                                          nullptr, nullptr, 0.1, 1e-5, nullptr, nullptr, nullptr);
          }),
          "more than 2^63 - 1 elements"));
    // Thread counts libgomp cannot run are refused; the setting is unchanged.
    const int before = bnorm::get_num_threads();
    CHECK(contains(message_of([] { bnorm::set_num_threads(100000); }),
                   ("number of threads must be in [1, " + std::to_string(bnorm::max_num_threads()) + "]").c_str()));
    CHECK(bnorm::max_num_threads() >= 1024);
    CHECK_THROWS(bnorm::set_num_threads(INT32_MAX), bnorm::ValueError);
    CHECK(bnorm::get_num_threads() == before);
}

void test_numerics() {
    // Large mean: two-pass accuracy from float32 data.
    const Shape s{64, 2, 100};
    auto x = random_data<float>(s, 1e4, 5);
    std::vector<float> mean(2), var(2);
    bnorm::batch_stats(x.data(), s, mean.data(), var.data());
    const Reference r = reference_moments(x, s);
    for (int c = 0; c < 2; ++c) {
        CHECK_CLOSE(mean[c], r.mean[c], 1e-7, 0);
        CHECK_CLOSE(var[c], r.var[c], 1e-5, 0);
    }
    // Constant channels of any magnitude map exactly to bias.
    for (float v : {1.0f, 1e20f, 3e38f, -3e38f, 1e-30f}) {
        const Shape k{3, 1, 7};
        std::vector<float> xc(21, v), y(21), m(1), is(1);
        const float bias = 0.25f;
        bnorm::forward_train(xc.data(), k, (const float*)nullptr, &bias, nullptr, nullptr, 0.1, 1e-5, y.data(),
                             m.data(), is.data());
        CHECK(m[0] == v);
        for (float yi : y) CHECK(yi == bias);
    }
    // NaN stays in its channel.
    {
        const Shape k{4, 2, 3};
        std::vector<double> xn(24, 1.0), y(24), m(2), is(2);
        for (int64_t i = 0; i < 24; ++i) xn[i] = double(i % 5);
        xn[index(k, 2, 1, 1)] = std::nan("");
        bnorm::forward_train(xn.data(), k, (const double*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y.data(),
                             m.data(), is.data());
        for (int64_t o = 0; o < 4; ++o)
            for (int64_t i = 0; i < 3; ++i) {
                CHECK(std::isfinite(y[index(k, o, 0, i)]));
                CHECK(std::isnan(y[index(k, o, 1, i)]));
            }
    }
    // The [1, 2, 3, 4] example: normalizing variance 1.25, running variance 5/3.
    {
        const double x4[4] = {1, 2, 3, 4};
        double y[4], m, is, rm = 0, rv = 0;
        bnorm::forward_train(x4, Shape{4, 1, 1}, (const double*)nullptr, nullptr, &rm, &rv, 1.0, 1e-5, y, &m, &is);
        CHECK_CLOSE(1.0 / (is * is) - 1e-5, 1.25, 1e-12, 0);
        CHECK_CLOSE(rv, 5.0 / 3.0, 1e-15, 0);
        CHECK_CLOSE(rm, 2.5, 0, 0);
    }
    // Empty batch: running statistics untouched.
    {
        float rm = 3, rv = 4, m, is;
        bnorm::forward_train<float>(nullptr, Shape{0, 1, 5}, nullptr, nullptr, &rm, &rv, 0.5, 1e-5, nullptr,
                             &m, &is);
        CHECK(rm == 3 && rv == 4);
    }
}

void test_merge_stats() {
    // Two shards of one channel: {1, 2} and {3, 4, 5}, plus an empty shard.
    const double counts[3] = {2, 0, 3};
    const double means[3] = {1.5, 99, 4}, vars[3] = {0.25, 99, 2.0 / 3.0};
    double count, mean, var;
    bnorm::merge_stats<double>(3, 1, counts, means, vars, &count, &mean, &var);
    CHECK(count == 5);
    CHECK_CLOSE(mean, 3.0, 1e-15, 0);
    CHECK_CLOSE(var, 2.0, 1e-15, 0);
    const double bad[3] = {2, -1, 3};
    CHECK_THROWS(bnorm::merge_stats<double>(3, 1, bad, means, vars, &count, &mean, &var), bnorm::ValueError);
    // A negative variance is refused where its count is not 0, and ignored where it is;
    // nothing is written by the refused call.
    const double negative[3] = {0.25, -1, -2};
    count = mean = var = 7;
    CHECK_THROWS(bnorm::merge_stats<double>(3, 1, counts, means, negative, &count, &mean, &var), bnorm::ValueError);
    CHECK(count == 7 && mean == 7 && var == 7);
    const double empty_negative[3] = {0.25, -1, 2.0 / 3.0};
    bnorm::merge_stats<double>(3, 1, counts, means, empty_negative, &count, &mean, &var);
    CHECK_CLOSE(var, 2.0, 1e-15, 0);
    // Means over 1e154 (their square overflows): the first part is taken as it is, not
    // merged into nothing (delta * delta * 0 = inf * 0 = NaN).
    const double huge[3] = {1e200, 99, 1e200}, zero[3] = {0, 0, 0};
    bnorm::merge_stats<double>(3, 1, counts, huge, zero, &count, &mean, &var);
    CHECK(mean == 1e200 && var == 0);
}

void test_half_conversion() {
    using bnorm::detail::float_to_half;
    using bnorm::detail::half_to_float;
    for (uint32_t bits = 0; bits < 65536; ++bits) {
        const bnorm::half h{uint16_t(bits)};
        const float f = half_to_float(h);
        if (std::isnan(f)) {
            CHECK(((bits >> 10) & 0x1f) == 0x1f && (bits & 0x3ff) != 0);
            CHECK(std::isnan(half_to_float(float_to_half(f))));
        } else {
            CHECK(float_to_half(f).bits == bits);
        }
    }
#ifdef __FLT16_MAX__
    // Rounding of arbitrary floats agrees with the compiler's _Float16.
    std::mt19937 rng(7);
    for (int k = 0; k < 1000000; ++k) {
        const uint32_t u = rng();
        float f;
        std::memcpy(&f, &u, sizeof f);
        if (std::isnan(f)) continue;
        const _Float16 want = static_cast<_Float16>(f);
        uint16_t want_bits;
        std::memcpy(&want_bits, &want, sizeof want_bits);
        if (float_to_half(f).bits != want_bits) {
            CHECK(float_to_half(f).bits == want_bits);
            break;
        }
    }
#endif
}

// bnorm called from destructors that run after the calling thread's scratch cache is gone
// (a thread_local constructed before the thread's first bnorm call, a global at exit).
struct CallsBnormWhenDestroyed {
    ~CallsBnormWhenDestroyed() {
        std::vector<float> x(4 * 300, 1.5f), mean(300), var(300);
        bnorm::batch_stats(x.data(), Shape{4, 300, 1}, mean.data(), var.data());
        if (mean[0] != 1.5f || var[0] != 0.0f) std::abort();
    }
};
CallsBnormWhenDestroyed g_calls_bnorm_at_exit;

void test_calls_after_thread_exit_began() {
    std::thread([] {
        thread_local CallsBnormWhenDestroyed guard;  // constructed first, destroyed last
        (void)&guard;
        std::vector<float> x(4 * 300, 2.0f), mean(300), var(300);
        bnorm::batch_stats(x.data(), Shape{4, 300, 1}, mean.data(), var.data());
        CHECK(mean[0] == 2.0f);
    }).join();
}

// Every op on a thread with a 96 KiB stack (musl's default thread stack is 128 KiB): the kernels'
// per-thread arrays must not live on the stack. Rows shapes, which have the largest ones.
void test_small_thread_stack() {
#if defined(__unix__) || defined(__APPLE__)
    const auto run = [](void*) -> void* {
        for (Shape s : {Shape{2, 1024, 1}, Shape{96, 1500, 1}, Shape{300, 700, 1}}) {
            test_forward_backward<double>(s);
            test_forward_backward<float>(s);
        }
        return nullptr;
    };
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    CHECK(pthread_attr_setstacksize(&attr, 96 * 1024) == 0);
    pthread_t thread;
    CHECK(pthread_create(&thread, &attr, +run, nullptr) == 0);
    pthread_join(thread, nullptr);
    pthread_attr_destroy(&attr);
#endif
}

// The default thread count's inputs, parsed from the contents of the files that hold them:
// containers' settings, not this machine's.
void test_cpu_limits() {
    using namespace bnorm::detail;
    CHECK(cgroup_v2_cpus("max 100000\n") == std::nullopt);
    CHECK(cgroup_v2_cpus("150000 100000\n") == 1.5);
    CHECK(cgroup_v2_cpus("200000 100000") == 2.0);
    CHECK(cgroup_v2_cpus("50000 100000\n") == 0.5);
    CHECK(cgroup_v2_cpus("") == std::nullopt);
    CHECK(cgroup_v2_cpus("0 100000") == std::nullopt);
    CHECK(cgroup_v2_cpus("100000 0") == std::nullopt);
    CHECK(cgroup_v2_cpus("garbage") == std::nullopt);
    CHECK(cgroup_v1_cpus("-1\n", "100000\n") == std::nullopt);
    CHECK(cgroup_v1_cpus("300000\n", "100000\n") == 3.0);
    CHECK(cgroup_v1_cpus("", "") == std::nullopt);

    CHECK(cgroup_path("0::/user.slice/job-1\n", true) == std::optional<std::string>("/user.slice/job-1"));
    CHECK(cgroup_path("0::/\n", true) == std::optional<std::string>("/"));
    const char* v1 = "12:pids:/docker/abc\n4:cpu,cpuacct:/docker/abc\n2:cpuset:/docker/abc\n1:name=systemd:/x\n";
    CHECK(cgroup_path(v1, false) == std::optional<std::string>("/docker/abc"));
    CHECK(cgroup_path(v1, true) == std::nullopt);
    CHECK(cgroup_path("3:cpuacct:/a\n5:cpu:/b\n", false) == std::optional<std::string>("/b"));  // not cpuacct
    CHECK(cgroup_path("", true) == std::nullopt);
    CHECK(cgroup_parent("/a/b") == "/a");
    CHECK(cgroup_parent("/a") == "/");
    CHECK(cgroup_parent("/").empty());

    CHECK(omp_num_threads_value(nullptr) == 0);
    CHECK(omp_num_threads_value("4") == 4);
    CHECK(omp_num_threads_value(" 3") == 3);
    CHECK(omp_num_threads_value("4,2") == 4);
    CHECK(omp_num_threads_value("0") == 0);
    CHECK(omp_num_threads_value("-2") == 0);
    CHECK(omp_num_threads_value("two") == 0);
    CHECK(omp_num_threads_value("2x") == 0);
    CHECK(omp_num_threads_value("") == 0);
    CHECK(omp_num_threads_value("99999999999999999999") == 0);

    CHECK(default_threads(8, std::nullopt) == 8);   // the affinity mask alone
    CHECK(default_threads(8, 1.5) == 2);            // a quota of 1.5 CPUs: 2 threads
    CHECK(default_threads(8, 0.5) == 1);
    CHECK(default_threads(2, 16.0) == 2);           // a quota above the mask: the mask
    CHECK(default_threads(0, std::nullopt) == 1);
}

}  // namespace

int main() {
    bnorm::set_num_threads(2);
    const Shape shapes[] = {
        {4, 3, 5},      // planes, tiny
        {7, 5, 1},      // rows
        {3, 2, 5000},   // planes, a row cut into several tiles
        {1000, 3, 1},   // rows, many row tiles
        {2, 1500, 1},   // rows, more than one channel block
        {40, 4, 130},   // planes, several rows per tile
        {1, 3, 9},      // N == 1 with spatial size > 1
        {16, 4, 20000}, // large enough for non-temporal stores
        {70000, 5, 1},  // the same, rows schedule
        {300, 5, 9},    // short planes (3x3) as rows of channel x inner positions
        {5, 333, 49},   // short planes over the write position limit: reduced as positions, written as spans
        {2, 5400, 49},  // over the reduce position limit too: planes schedule, written as spans
        {6, 700, 25},   // the same with runs short enough to be written as positions below the limit
        {40, 40, 40},   // short planes reduced as positions, 40-element runs written as spans
        {32, 256, 9},   // short planes in strips of whole channels, fused
        {17, 130, 7},   // the same on one thread, odd sizes
        {2, 3, 17},     // short planes, runs longer than a vector (head and tail vectors)
        {1001, 63, 1},  // narrow rows, 4 side by side, 1 row left over
        {2, 3000, 1},   // few rows: column strips, reduced and written from cache
        {96, 1500, 1},  // column strips, each channel's rows in several splits
        {40, 5000, 1},  // rows wider than a write block: written a block of columns at a time
        {12, 2050, 49}, // streamed spans (float, double), crossing outer indices within a chunk
        {9, 700, 100},  // 10x10: streamed spans (float, double), runs (half: not streamed)
        {8, 700, 196},  // 14x14: streamed spans (float), runs (double: over 1 KiB; half: not streamed)
        {16400, 100, 1}, // streamed rows under 1.5 KiB: runs of whole rows (float, double)
    };
    for (const Shape& s : shapes) {
        test_forward_backward<float>(s);
        test_forward_backward<double>(s);
        test_forward_backward<bnorm::half>(s);
    }
    test_thread_determinism<float>({64, 3, 3000});
    test_thread_determinism<float>({40000, 17, 1});
    test_thread_determinism<bnorm::half>({8, 64, 700});
    test_thread_determinism<double>({3, 2, 70000});
    test_thread_determinism<float>({16, 4, 20000});    // streaming stores, fused and not
    test_thread_determinism<float>({5000, 64, 4});     // short planes as positions
    test_thread_determinism<float>({64, 16, 49});      // short-plane strips on 1 and 2 threads, unfused on 3
    test_thread_determinism<double>({32, 1000, 25});   // short planes over the position limit, fused
    test_thread_determinism<float>({50000, 3, 1});     // narrow rows side by side, rows left over
    test_thread_determinism<double>({70000, 16, 1});   // streaming stores, rows schedule
    test_thread_determinism<float>({2, 200003, 1});    // column strips
    test_thread_determinism<float>({3000, 3, 196});    // channels too large to fuse: unfused with C >= threads
    test_thread_determinism<double>({96, 5000, 1});    // column strips, several splits
    test_thread_determinism<bnorm::half>({196, 2048, 1});
    // Around the thread policy's steps (a thread per 2^15 elements): 1, 2 and 3 threads.
    test_thread_determinism<float>({2, 3, 5461});      // 32766 elements: one thread
    test_thread_determinism<float>({2, 4, 4096});      // 32768
    test_thread_determinism<float>({3, 5, 4369});      // 65535
    test_thread_determinism<float>({4096, 16, 1});     // 65536, rows
    test_thread_determinism<double>({1, 1, 98305});    // 3 threads, one channel
    test_thread_determinism<float>({2048, 3, 16});     // 98304, short planes
    test_streaming_alignment<float>({16, 4, 20001});
    test_streaming_alignment<float>({70001, 17, 1});
    test_streaming_alignment<double>({8, 3, 30001});
    test_streaming_alignment<bnorm::half>({8, 3, 100001});
    test_streaming_alignment<bnorm::half>({150001, 17, 1});
    test_streaming_alignment<float>({3, 600001, 1});   // column strips
    test_streaming_alignment<float>({48, 512, 49});    // short-plane strips
    test_streaming_alignment<float>({20001, 64, 1});   // runs of whole rows
    test_streaming_alignment<bnorm::half>({33001, 64, 1});
    test_cpu_limits();
    test_errors_leave_buffers_untouched();
    test_argument_messages();
    test_negative_running_var();
    test_calls_after_thread_exit_began();
    test_small_thread_stack();
    test_numerics();
    test_merge_stats();
    test_half_conversion();
    std::printf("test_cpu: %d failure(s)\n", check::failures());
    return check::failures() == 0 ? 0 : 1;
}
