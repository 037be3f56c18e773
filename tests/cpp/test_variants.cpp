// C++ tests of the batch-norm variants beyond PyTorch's: bnorm::fold, the biased running
// variance of forward_train (Keras 3, Flax, ONNX), bfloat16 on the CPU, against plain
// double loops.
#include <bnorm/bnorm.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#include "../../cpp/src/half.hpp"
#include "check.hpp"

namespace {

using bnorm::Shape;

// A linear layer (out = 3, in = 4) followed by forward_infer equals the folded layer.
void test_fold_linear() {
    const int64_t out = 3, in = 4, n = 5;
    std::vector<float> w(out * in), b(out), x(n * in);
    for (size_t i = 0; i < w.size(); ++i) w[i] = float(std::sin(1.0 + double(i)));
    for (size_t i = 0; i < b.size(); ++i) b[i] = float(0.5 - 0.25 * double(i));
    for (size_t i = 0; i < x.size(); ++i) x[i] = float(std::cos(0.3 * double(i)));
    const std::vector<float> mean{0.1f, -0.2f, 0.3f}, var{0.5f, 1.5f, 2.0f}, g{1.5f, -0.5f, 2.0f}, beta{0.f, 1.f, -1.f};
    const double eps = 1e-3;
    // layer then BN
    std::vector<float> h(n * out), y(n * out);
    for (int64_t s = 0; s < n; ++s)
        for (int64_t o = 0; o < out; ++o) {
            double acc = b[o];
            for (int64_t i = 0; i < in; ++i) acc += double(w[o * in + i]) * double(x[s * in + i]);
            h[s * out + o] = float(acc);
        }
    bnorm::forward_infer(h.data(), {n, out, 1}, mean.data(), var.data(), g.data(), beta.data(), eps, y.data());
    // folded layer, in place
    std::vector<float> w2 = w, b2 = b;
    bnorm::fold<float>(w2.data(), b2.data(), {1, out, in}, mean.data(), var.data(), g.data(), beta.data(), eps,
                       w2.data(), b2.data());
    for (int64_t s = 0; s < n; ++s)
        for (int64_t o = 0; o < out; ++o) {
            double acc = b2[o];
            for (int64_t i = 0; i < in; ++i) acc += double(w2[o * in + i]) * double(x[s * in + i]);
            CHECK_CLOSE(acc, y[s * out + o], 1e-5, 1e-5);
        }
    // no bias, no affine: bias_out = -mean / sqrt(var + eps)
    std::vector<double> wd(out * in, 1.0), bd(out);
    const std::vector<double> md{0.1, -0.2, 0.3}, vd{0.5, 1.5, 2.0};
    bnorm::fold<double>(wd.data(), nullptr, {1, out, in}, md.data(), vd.data(), nullptr, nullptr, eps, wd.data(),
                        bd.data());
    for (int64_t o = 0; o < out; ++o) {
        CHECK_CLOSE(bd[o], -md[o] / std::sqrt(vd[o] + eps), 1e-15, 0);
        CHECK_CLOSE(wd[o * in], 1.0 / std::sqrt(vd[o] + eps), 1e-15, 0);
    }
}

void test_fold_errors() {
    std::vector<float> w(6, 1.f), b(3), mean(3, 0.f), var(3, 1.f), neg{1.f, -1.f, 1.f};
    const Shape s{1, 3, 2};
    CHECK_THROWS(bnorm::fold<float>(w.data(), nullptr, s, mean.data(), var.data(), nullptr, nullptr, 0.0, w.data(),
                                    b.data()), bnorm::ValueError);
    CHECK_THROWS(bnorm::fold<float>(w.data(), nullptr, s, mean.data(), nullptr, nullptr, nullptr, 1e-5, w.data(),
                                    b.data()), bnorm::ValueError);
    CHECK_THROWS(bnorm::fold<float>(w.data(), nullptr, s, mean.data(), neg.data(), nullptr, nullptr, 1e-5, w.data(),
                                    b.data()), bnorm::ValueError);
    CHECK_THROWS(bnorm::fold<float>(w.data(), nullptr, {-1, 3, 2}, mean.data(), var.data(), nullptr, nullptr, 1e-5,
                                    w.data(), b.data()), bnorm::ValueError);
    CHECK(w[0] == 1.f);  // nothing written by a call that threw
}

// unbiased_running_var = false: running_var moves toward the biased variance.
void test_biased_running_var() {
    const Shape s{4, 2, 1};
    const std::vector<double> x{1, 10, 2, 20, 3, 30, 6, 40};
    std::vector<double> y(8), mean(2), invstd(2), rm{0, 0}, rv{1, 1}, rm2{0, 0}, rv2{1, 1};
    bnorm::forward_train<double>(x.data(), s, nullptr, nullptr, rm.data(), rv.data(), 0.25, 1e-5, y.data(),
                                 mean.data(), invstd.data(), false);
    bnorm::forward_train<double>(x.data(), s, nullptr, nullptr, rm2.data(), rv2.data(), 0.25, 1e-5, y.data(),
                                 mean.data(), invstd.data());  // the default: unbiased
    const double var0 = ((1 - 3.0) * (1 - 3.0) + 1 + 0 + 9) / 4.0;
    CHECK_CLOSE(rv[0], 0.75 + 0.25 * var0, 1e-14, 0);
    CHECK_CLOSE(rv2[0], 0.75 + 0.25 * var0 * 4.0 / 3.0, 1e-14, 0);
    CHECK_CLOSE(rm[0], 0.25 * 3.0, 1e-14, 0);
    CHECK(rm[1] == rm2[1]);
}

// bfloat16: the scalar conversion rounds to nearest even, and forward_train/backward on
// bfloat16 agree with the float path on the same (exactly representable) values.
void test_bfloat16() {
    using bnorm::bfloat16;
    using bnorm::detail::bfloat16_to_float;
    using bnorm::detail::float_to_bfloat16;
    CHECK(float_to_bfloat16(1.0f).bits == 0x3f80);
    CHECK(float_to_bfloat16(bnorm::detail::bits_float(0x3f808000u)).bits == 0x3f80);  // tie to even
    CHECK(float_to_bfloat16(bnorm::detail::bits_float(0x3f818000u)).bits == 0x3f82);  // tie to even (up)
    CHECK(float_to_bfloat16(bnorm::detail::bits_float(0x3f808001u)).bits == 0x3f81);
    CHECK(float_to_bfloat16(3.4e38f).bits == 0x7f80);                                 // overflow: inf
    CHECK(float_to_bfloat16(bnorm::detail::bits_float(0x7f800001u)).bits == 0x7fc0);  // NaN stays NaN (quiet)
    CHECK(float_to_bfloat16(bnorm::detail::bits_float(0xff812345u)).bits == 0xffc1);  // sign and payload kept
    CHECK(bfloat16_to_float(bfloat16{0xc040}) == -3.0f);

    const Shape s{64, 3, 100};
    std::vector<bfloat16> x(size_t(s.size())), dy(size_t(s.size())), y(x.size()), dx(x.size());
    std::vector<float> xf(x.size()), dyf(x.size()), yf(x.size()), dxf(x.size());
    for (size_t i = 0; i < x.size(); ++i) {
        x[i] = float_to_bfloat16(float(2.0 + std::sin(0.7 * double(i)) * double(1 + i % 3)));
        dy[i] = float_to_bfloat16(float(std::cos(0.3 * double(i))));
        xf[i] = bfloat16_to_float(x[i]);
        dyf[i] = bfloat16_to_float(dy[i]);
    }
    std::vector<float> mean(3), invstd(3), meanf(3), invstdf(3), dw(3), db(3), dwf(3), dbf(3);
    bnorm::forward_train<bfloat16>(x.data(), s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, y.data(), mean.data(),
                                   invstd.data());
    bnorm::forward_train<float>(xf.data(), s, nullptr, nullptr, nullptr, nullptr, 0.1, 1e-5, yf.data(), meanf.data(),
                                invstdf.data());
    bnorm::backward<bfloat16>(dy.data(), x.data(), s, mean.data(), invstd.data(), nullptr, true, dx.data(), dw.data(),
                              db.data());
    bnorm::backward<float>(dyf.data(), xf.data(), s, meanf.data(), invstdf.data(), nullptr, true, dxf.data(),
                           dwf.data(), dbf.data());
    // The same bits where the bfloat16 and float kernels have the same lanes, and so sum
    // in the same order: AVX2, AVX-512 and the one-lane kernels. SSE2 (the x86-64
    // baseline) has no vector conversions for 16-bit types: they run one lane at a time
    // there, float four, and agree to float rounding.
#ifdef BNORM_SCALAR_KERNELS
    const bool same_lanes = true;
#else
    const bool same_lanes = std::strcmp(bnorm::cpu_isa(), "baseline") != 0;
#endif
    for (int c = 0; c < 3; ++c) {
        if (same_lanes) {
            CHECK(mean[c] == meanf[c]);
            CHECK(invstd[c] == invstdf[c]);
            CHECK(dw[c] == dwf[c]);
            CHECK(db[c] == dbf[c]);
        } else {
            CHECK_CLOSE(mean[c], meanf[c], 1e-6, 1e-6);
            CHECK_CLOSE(invstd[c], invstdf[c], 1e-6, 0);
            CHECK_CLOSE(dw[c], dwf[c], 1e-5, 1e-4);  // sums of 6400 terms of up to ~3
            CHECK_CLOSE(db[c], dbf[c], 1e-5, 1e-4);
        }
    }
    for (size_t i = 0; i < x.size(); ++i) {
        if (same_lanes)
            CHECK(y[i].bits == float_to_bfloat16(yf[i]).bits);  // the same float, rounded once
        else
            CHECK_CLOSE(bfloat16_to_float(y[i]), yf[i], 8e-3, 8e-3);
        CHECK_CLOSE(bfloat16_to_float(dx[i]), dxf[i], 8e-3, 8e-3);
    }
}

}  // namespace

int main() {
    test_bfloat16();
    test_biased_running_var();
    test_fold_linear();
    test_fold_errors();
    std::printf("test_variants: %d failure(s)\n", check::failures());
    return check::failures() == 0 ? 0 : 1;
}
