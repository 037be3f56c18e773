// C++ tests of the fused epilogue's entry points (bnorm::Epilogue, bnorm::EpilogueGrad) on
// the CPU: against the plain ops they fuse, across thread counts, and their argument checks.
#include <bnorm/bnorm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <random>
#include <string>
#include <vector>

#include "../../cpp/src/half.hpp"
#include "check.hpp"

namespace {

using bnorm::Activation;
using bnorm::Epilogue;
using bnorm::EpilogueGrad;
using bnorm::Shape;

template <class T> T from_double(double v) {
    if constexpr (std::is_same_v<T, bnorm::half>) return bnorm::detail::float_to_half(float(v));
    else return T(v);
}
template <class T> double to_double(T v) {
    if constexpr (std::is_same_v<T, bnorm::half>) return bnorm::detail::half_to_float(v);
    else return double(v);
}
// The fused sum is rounded once where the composition rounds twice: one rounding of |y + z|.
template <class T> double tolerance() {
    if constexpr (std::is_same_v<T, double>) return 1e-12;
    else if constexpr (std::is_same_v<T, float>) return 1e-5;
    else return 4e-3;
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
bool same_bits(const std::vector<T>& a, const std::vector<T>& b) {
    return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(T)) == 0;
}

// Forward: y = relu(BN(x) + z) against plain BN then add and ReLU in double; ReLU alone is
// exactly max(plain, 0) (rounding commutes with it). Backward: dsum = dy * (y > 0) bit for
// bit, and dx, dweight, dbias are the plain backward of dsum, bit for bit (the same kernels
// read the masked gradient); the phases (backward_reduce, backward_elemt) likewise.
template <class T>
void test_against_plain(Shape s) {
    using P = bnorm::param_t<T>;
    const int64_t C = s.channels;
    const auto x = random_data<T>(s, 1.0, 11), z = random_data<T>(s, 0.0, 12), dy = random_data<T>(s, 0.0, 13);
    std::vector<P> w(C), b(C), rm(C, P(0.2)), rv(C, P(1.5)), mean(C), invstd(C);
    for (int64_t c = 0; c < C; ++c) w[c] = P(0.5 + 0.1 * double(c % 7)), b[c] = P(-0.5 + 0.2 * double(c % 5));
    std::vector<T> plain(x.size()), fused(x.size()), relu_only(x.size());
    bnorm::forward_train(x.data(), s, w.data(), b.data(), nullptr, nullptr, 0.1, 1e-5, plain.data(), mean.data(),
                         invstd.data());
    bnorm::forward_train(x.data(), s, w.data(), b.data(), nullptr, nullptr, 0.1, 1e-5,
                         Epilogue<T>{z.data(), Activation::relu}, fused.data(), mean.data(), invstd.data());
    bnorm::forward_train(x.data(), s, w.data(), b.data(), nullptr, nullptr, 0.1, 1e-5,
                         Epilogue<T>{nullptr, Activation::relu}, relu_only.data(), mean.data(), invstd.data());
    double worst = 0;
    bool relu_exact = true;
    for (size_t i = 0; i < x.size(); ++i) {
        const double expect = std::max(0.0, to_double(plain[i]) + to_double(z[i]));
        worst = std::max(worst, std::abs(to_double(fused[i]) - expect) / std::max(1.0, std::abs(expect)));
        relu_exact &= to_double(relu_only[i]) == std::max(0.0, to_double(plain[i]));
    }
    CHECK(worst <= 2 * tolerance<T>());
    CHECK(relu_exact);
    // inference and normalize with the residual alone (no activation)
    std::vector<T> infer(x.size()), infer_plain(x.size());
    bnorm::forward_infer(x.data(), s, rm.data(), rv.data(), w.data(), b.data(), 1e-5, infer_plain.data());
    bnorm::forward_infer(x.data(), s, rm.data(), rv.data(), w.data(), b.data(), 1e-5, Epilogue<T>{z.data()},
                         infer.data());
    worst = 0;
    for (size_t i = 0; i < x.size(); ++i) {
        const double expect = to_double(infer_plain[i]) + to_double(z[i]);
        worst = std::max(worst, std::abs(to_double(infer[i]) - expect) / std::max(1.0, std::abs(expect)));
    }
    CHECK(worst <= 2 * tolerance<T>());

    // backward
    std::vector<T> g(x.size());
    for (size_t i = 0; i < x.size(); ++i) g[i] = to_double(fused[i]) > 0 ? dy[i] : from_double<T>(0.0);
    for (bool batch : {true, false}) {
        std::vector<T> dx(x.size()), dsum(x.size()), pdx(x.size());
        std::vector<P> dw(C), db(C), pdw(C), pdb(C);
        bnorm::backward(dy.data(), x.data(), s, mean.data(), invstd.data(), w.data(), batch,
                        EpilogueGrad<T>{Activation::relu, fused.data()}, dx.data(), dw.data(), db.data(), dsum.data());
        bnorm::backward(g.data(), x.data(), s, mean.data(), invstd.data(), w.data(), batch, pdx.data(), pdw.data(),
                        pdb.data());
        CHECK(same_bits(dsum, g));
        CHECK(same_bits(dw, pdw) && same_bits(db, pdb));
        bool dx_equal = true;
        for (size_t i = 0; i < x.size(); ++i) dx_equal &= to_double(dx[i]) == to_double(pdx[i]);
        CHECK(dx_equal);
        if (batch) CHECK(same_bits(dx, pdx));
    }
    std::vector<P> sum_dy(C), sum_dy_xhat(C), psum_dy(C), psum_dy_xhat(C);
    bnorm::backward_reduce(dy.data(), x.data(), s, mean.data(), invstd.data(),
                           EpilogueGrad<T>{Activation::relu, fused.data()}, sum_dy.data(), sum_dy_xhat.data());
    bnorm::backward_reduce(g.data(), x.data(), s, mean.data(), invstd.data(), psum_dy.data(), psum_dy_xhat.data());
    CHECK(same_bits(sum_dy, psum_dy) && same_bits(sum_dy_xhat, psum_dy_xhat));
    std::vector<T> dx(x.size()), dsum(x.size()), pdx(x.size());
    bnorm::backward_elemt(dy.data(), x.data(), s, mean.data(), invstd.data(), w.data(), sum_dy.data(),
                          sum_dy_xhat.data(), double(s.count()), EpilogueGrad<T>{Activation::relu, fused.data()},
                          dx.data(), dsum.data());
    bnorm::backward_elemt(g.data(), x.data(), s, mean.data(), invstd.data(), w.data(), sum_dy.data(),
                          sum_dy_xhat.data(), double(s.count()), pdx.data());
    CHECK(same_bits(dx, pdx) && same_bits(dsum, g));
    // dsum may be dy itself (where the reduction writes dsum, too: it reads each element first)
    std::vector<T> in_place = dy;
    bnorm::backward(in_place.data(), x.data(), s, mean.data(), invstd.data(), w.data(), true,
                    EpilogueGrad<T>{Activation::relu, fused.data()}, dx.data(), sum_dy.data(), sum_dy_xhat.data(),
                    in_place.data());
    CHECK(same_bits(in_place, g));
    bnorm::backward(g.data(), x.data(), s, mean.data(), invstd.data(), w.data(), true, pdx.data(), psum_dy.data(),
                    psum_dy_xhat.data());
    CHECK(same_bits(dx, pdx));
}

// Every output of the fused ops is the same, bit for bit, on 1, 2 and 3 threads.
void test_thread_determinism(Shape s) {
    const int64_t C = s.channels;
    const auto x = random_data<float>(s, 2.0, 21), z = random_data<float>(s, 0.0, 22), dy = random_data<float>(s, 0.0, 23);
    std::vector<std::vector<float>> results;
    const int before = bnorm::get_num_threads();
    for (int n : {1, 2, 3}) {
        bnorm::set_num_threads(n);
        std::vector<float> y(x.size()), dx(x.size()), dsum(x.size()), mean(C), invstd(C), dw(C), db(C);
        bnorm::forward_train(x.data(), s, (const float*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5,
                             Epilogue<float>{z.data(), Activation::relu}, y.data(), mean.data(), invstd.data());
        bnorm::backward(dy.data(), x.data(), s, mean.data(), invstd.data(), nullptr, true,
                        EpilogueGrad<float>{Activation::relu, y.data()}, dx.data(), dw.data(), db.data(), dsum.data());
        for (auto* v : {&y, &mean, &invstd, &dx, &dsum, &dw, &db}) results.push_back(*v);
    }
    bnorm::set_num_threads(before);
    for (size_t i = 7; i < results.size(); ++i) CHECK(same_bits(results[i], results[i % 7]));
}

// Outputs large enough for non-temporal stores: dx and dsum at every relative alignment give
// the same bits (dsum's vectors are streamed only where aligned, stored elsewhere).
void test_streaming_alignment(Shape s) {
    const int64_t C = s.channels;
    const auto x = random_data<float>(s, 1.0, 31), dy = random_data<float>(s, 0.0, 32), y = random_data<float>(s, 0.0, 33);
    std::vector<float> mean(C), invstd(C), dw(C), db(C), dx(x.size()), dsum(x.size());
    std::vector<float> plain(x.size());
    bnorm::forward_train(x.data(), s, (const float*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, plain.data(),
                         mean.data(), invstd.data());
    bnorm::backward(dy.data(), x.data(), s, mean.data(), invstd.data(), nullptr, true,
                    EpilogueGrad<float>{Activation::relu, y.data()}, dx.data(), dw.data(), db.data(), dsum.data());
    std::vector<float> shifted_dx(x.size() + 32), shifted_dsum(x.size() + 32);
    for (int offset : {1, 3, 8, 16}) {
        for (int dsum_offset : {0, 5, 16}) {
            bnorm::backward(dy.data(), x.data(), s, mean.data(), invstd.data(), nullptr, true,
                            EpilogueGrad<float>{Activation::relu, y.data()}, shifted_dx.data() + offset, dw.data(),
                            db.data(), shifted_dsum.data() + dsum_offset);
            CHECK(std::memcmp(dx.data(), shifted_dx.data() + offset, dx.size() * sizeof(float)) == 0);
            CHECK(std::memcmp(dsum.data(), shifted_dsum.data() + dsum_offset, dsum.size() * sizeof(float)) == 0);
        }
    }
}

std::string message_of(const std::function<void()>& expr) {
    try {
        expr();
    } catch (const std::exception& e) {
        return e.what();
    }
    return "";
}

bool contains(const std::string& text, const char* part) { return text.find(part) != std::string::npos; }

// Bad arguments throw ValueError naming the op and the argument; nothing is written.
void test_checks() {
    const Shape s{4, 2, 3};
    std::vector<float> x(24, 1.0f), buffer(25, -7.0f), m(2, 0.5f), is(2, 2.0f), dw(2, 9.0f), db(2, 9.0f);
    std::vector<float> y(24, -7.0f), dsum(24, -7.0f), mean(2, 9.0f), invstd(2, 9.0f);
    const auto untouched = [&] {
        return y == std::vector<float>(24, -7.0f) && dsum == std::vector<float>(24, -7.0f) &&
               buffer == std::vector<float>(25, -7.0f) && dw == std::vector<float>(2, 9.0f) &&
               mean == std::vector<float>(2, 9.0f);
    };
    const auto bad = static_cast<Activation>(7);
    CHECK(contains(message_of([&] {
              bnorm::normalize(x.data(), s, m.data(), is.data(), nullptr, nullptr, Epilogue<float>{nullptr, bad}, y.data());
          }),
          "normalize: activation must be Activation::none or Activation::relu, got 7"));
    CHECK(contains(message_of([&] {
              bnorm::forward_train(x.data(), s, (const float*)nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5,
                                   Epilogue<float>{nullptr, bad}, y.data(), mean.data(), invstd.data());
          }),
          "forward_train: activation must be"));
    CHECK(contains(message_of([&] {
              bnorm::backward(x.data(), x.data(), s, m.data(), is.data(), nullptr, true, EpilogueGrad<float>{bad, x.data()},
                              y.data(), dw.data(), db.data(), dsum.data());
          }),
          "backward: activation must be"));
    // ReLU needs the forward's y
    CHECK(contains(message_of([&] {
              bnorm::backward(x.data(), x.data(), s, m.data(), is.data(), nullptr, true,
                              EpilogueGrad<float>{Activation::relu, nullptr}, y.data(), dw.data(), db.data(), dsum.data());
          }),
          "backward: y (the fused forward's output, for ReLU's mask) must not be null"));
    CHECK(contains(message_of([&] {
              bnorm::backward_reduce(x.data(), x.data(), s, m.data(), is.data(),
                                     EpilogueGrad<float>{Activation::relu, nullptr}, dw.data(), db.data());
          }),
          "backward_reduce: y"));
    // the residual may be y itself, not overlap it otherwise
    CHECK(contains(message_of([&] {
              bnorm::forward_infer(x.data(), s, m.data(), is.data(), nullptr, nullptr, 1e-5,
                                   Epilogue<float>{buffer.data(), Activation::relu}, buffer.data() + 1);
          }),
          "forward_infer: y overlaps residual partly"));
    // dsum may be dy itself, not overlap x, y or dx
    std::vector<float> relu_y(24, 1.0f);
    const auto with_dsum = [&](float* dx, float* out_dsum) {
        return message_of([&] {
            bnorm::backward(x.data(), buffer.data(), s, m.data(), is.data(), nullptr, true,
                            EpilogueGrad<float>{Activation::relu, relu_y.data()}, dx, dw.data(), db.data(), out_dsum);
        });
    };
    CHECK(contains(with_dsum(y.data(), buffer.data() + 1), "backward: dsum overlaps x"));
    CHECK(contains(with_dsum(y.data(), relu_y.data()), "backward: dsum overlaps y"));
    CHECK(contains(with_dsum(y.data(), y.data()), "backward: dsum overlaps dx"));
    CHECK(contains(with_dsum(y.data(), x.data() + 1), "backward: dsum overlaps dy partly"));
    CHECK(untouched());
    // allowed: residual == y (in place), the plain overloads unchanged
    std::vector<float> z(24, 0.25f);
    bnorm::forward_infer(x.data(), s, m.data(), is.data(), nullptr, nullptr, 1e-5,
                         Epilogue<float>{z.data(), Activation::relu}, z.data());
    CHECK(std::abs(z[0] - float((1.0 - 0.5) / std::sqrt(2.0 + 1e-5) + 0.25)) < 1e-6f);
}

}  // namespace

int main() {
    for (const Shape s : {Shape{8, 16, 64}, Shape{2048, 40, 1}, Shape{64, 32, 5}, Shape{5000, 3, 1}, Shape{16, 300, 7},
                          Shape{4, 64, 4096}, Shape{3, 5, 7}}) {
        test_against_plain<float>(s);
        test_against_plain<double>(s);
        test_against_plain<bnorm::half>(s);
    }
    // the streamed two-pass backward (the reduction writes dsum): rows, planes (float only:
    // tests/python/test_fused.py's test_backward_streamed takes every dtype)
    for (const Shape s : {Shape{24000, 100, 1}, Shape{4, 2, 262144}}) test_against_plain<float>(s);
    for (const Shape s : {Shape{8, 64, 256}, Shape{4096, 96, 1}, Shape{32, 256, 25}, Shape{16, 2, 4096}})
        test_thread_determinism(s);
    test_streaming_alignment({8, 16, 16384});    // planes, fused per channel
    test_streaming_alignment({20000, 100, 1});   // rows
    test_checks();
    std::printf("test_fused: %d failure(s)\n", check::failures());
    return check::failures() == 0 ? 0 : 1;
}
