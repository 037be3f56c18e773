// bnorm example: a tiny regression network with batch normalization, trained with plain
// SGD on synthetic data whose features differ in scale by 10^5 and sit far from zero.
//
//   x (N, 6) -> BatchNorm (no affine: standardizes the features) -> Linear(6, 32)
//            -> BatchNorm (affine) -> ReLU -> Linear(32, 1) -> mean squared error
//
// Both batch norms train on batch statistics and track running statistics; the test set
// is evaluated in inference mode with the running ones. It also checks the split-phase
// API: statistics of two shards merged with merge_stats equal those of the whole batch.
// Exit status 0 and "bnorm example: OK" when the network learned and the checks hold.
#include <bnorm/bnorm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <random>
#include <vector>

namespace {

constexpr int64_t D = 6;    // input features
constexpr int64_t H = 32;   // hidden units
constexpr int64_t B = 64;   // batch size
constexpr float kEps = 1e-5f;
constexpr double kMomentum = 0.1;

// std::mt19937's sequence is fixed by the standard (unlike std::normal_distribution's
// output), so the data are the same with every standard library.
struct Rng {
    std::mt19937 engine{20150211};
    double uniform() { return (double(engine() >> 5) + 0.5) / 134217728.0; }  // (0, 1)
    double normal() {
        return std::sqrt(-2.0 * std::log(uniform())) * std::cos(6.283185307179586 * uniform());
    }
};

struct Dataset {
    int64_t n = 0;
    std::vector<float> x;  // (n, D): feature j is 10^(j-2) * (50 + g_j)
    std::vector<float> t;  // (n,): a smooth function of the standardized g
};

Dataset make_data(Rng& rng, int64_t n) {
    Dataset d;
    d.n = n;
    d.x.resize(n * D);
    d.t.resize(n);
    for (int64_t i = 0; i < n; ++i) {
        double g[D];
        for (int64_t j = 0; j < D; ++j) {
            g[j] = rng.normal();
            d.x[i * D + j] = float(std::pow(10.0, double(j) - 2.0) * (50.0 + g[j]));
        }
        d.t[i] = float(std::sin(g[0]) + 0.5 * g[1] - 0.3 * g[2] * g[3] + 0.4 * std::fabs(g[5]) +
                       0.05 * rng.normal());
    }
    return d;
}

struct Net {
    // BatchNorm 0: running statistics only (affine = false)
    std::vector<float> rm0 = std::vector<float>(D, 0.f), rv0 = std::vector<float>(D, 1.f);
    // Linear(D, H) without bias (the batch norm after it has one)
    std::vector<float> w1 = std::vector<float>(H * D);
    // BatchNorm 1: affine, with running statistics
    std::vector<float> g1 = std::vector<float>(H, 1.f), b1 = std::vector<float>(H, 0.f);
    std::vector<float> rm1 = std::vector<float>(H, 0.f), rv1 = std::vector<float>(H, 1.f);
    // Linear(H, 1)
    std::vector<float> v = std::vector<float>(H);
    float c = 0.f;

    explicit Net(Rng& rng) {
        for (auto& w : w1) w = float(rng.normal() / std::sqrt(double(D)));
        for (auto& w : v) w = float(rng.normal() / std::sqrt(double(H)));
    }
};

// Activations of one forward pass over n rows.
struct Pass {
    std::vector<float> z0, h1, z1, a, y;
    std::vector<float> mean0, invstd0, mean1, invstd1;  // saved batch statistics
    explicit Pass(int64_t n)
        : z0(n * D), h1(n * H), z1(n * H), a(n * H), y(n),
          mean0(D), invstd0(D), mean1(H), invstd1(H) {}
};

void linear1(const float* z0, const std::vector<float>& w1, int64_t n, float* h1) {
    for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < H; ++k) {
            float s = 0.f;
            for (int64_t j = 0; j < D; ++j) s += z0[i * D + j] * w1[k * D + j];
            h1[i * H + k] = s;
        }
}

void head(Pass& p, const Net& net, int64_t n) {
    for (int64_t i = 0; i < n * H; ++i) p.a[i] = std::max(p.z1[i], 0.f);
    for (int64_t i = 0; i < n; ++i) {
        float s = net.c;
        for (int64_t k = 0; k < H; ++k) s += p.a[i * H + k] * net.v[k];
        p.y[i] = s;
    }
}

// Training-mode forward: batch statistics; the running statistics are updated in place.
void forward_train(Net& net, const float* x, int64_t n, Pass& p) {
    bnorm::forward_train(x, bnorm::Shape{n, D, 1}, nullptr, nullptr, net.rm0.data(),
                         net.rv0.data(), kMomentum, kEps, p.z0.data(), p.mean0.data(),
                         p.invstd0.data());
    linear1(p.z0.data(), net.w1, n, p.h1.data());
    bnorm::forward_train(p.h1.data(), bnorm::Shape{n, H, 1}, net.g1.data(), net.b1.data(),
                         net.rm1.data(), net.rv1.data(), kMomentum, kEps, p.z1.data(),
                         p.mean1.data(), p.invstd1.data());
    head(p, net, n);
}

// Inference-mode forward with the running statistics.
void forward_infer(const Net& net, const float* x, int64_t n, Pass& p) {
    bnorm::forward_infer(x, bnorm::Shape{n, D, 1}, net.rm0.data(), net.rv0.data(), nullptr,
                         nullptr, kEps, p.z0.data());
    linear1(p.z0.data(), net.w1, n, p.h1.data());
    bnorm::forward_infer(p.h1.data(), bnorm::Shape{n, H, 1}, net.rm1.data(), net.rv1.data(),
                         net.g1.data(), net.b1.data(), kEps, p.z1.data());
    head(p, net, n);
}

double mse(const std::vector<float>& y, const float* t, int64_t n) {
    double s = 0.0;
    for (int64_t i = 0; i < n; ++i) s += (double(y[i]) - t[i]) * (double(y[i]) - t[i]);
    return s / double(n);
}

// One SGD step on rows [x, x + n*D); returns the batch loss before the step.
double sgd_step(Net& net, const float* x, const float* t, int64_t n, float lr, Pass& p) {
    forward_train(net, x, n, p);
    const double loss = mse(p.y, t, n);

    std::vector<float> dy(n), dz1(n * H), dh1(n * H), dg1(H), db1(H), dv(H, 0.f),
        dw1(H * D, 0.f);
    float dc = 0.f;
    for (int64_t i = 0; i < n; ++i) dy[i] = 2.f * (p.y[i] - t[i]) / float(n);
    for (int64_t i = 0; i < n; ++i) {
        dc += dy[i];
        for (int64_t k = 0; k < H; ++k) {
            dv[k] += dy[i] * p.a[i * H + k];
            dz1[i * H + k] = p.z1[i * H + k] > 0.f ? dy[i] * net.v[k] : 0.f;
        }
    }
    // Through the batch norm: the gradient flows through the batch mean and variance.
    bnorm::backward(dz1.data(), p.h1.data(), bnorm::Shape{n, H, 1}, p.mean1.data(),
                    p.invstd1.data(), net.g1.data(), /*batch_stats=*/true, dh1.data(),
                    dg1.data(), db1.data());
    for (int64_t i = 0; i < n; ++i)
        for (int64_t k = 0; k < H; ++k)
            for (int64_t j = 0; j < D; ++j) dw1[k * D + j] += dh1[i * H + k] * p.z0[i * D + j];

    for (int64_t k = 0; k < H * D; ++k) net.w1[k] -= lr * dw1[k];
    for (int64_t k = 0; k < H; ++k) {
        net.g1[k] -= lr * dg1[k];
        net.b1[k] -= lr * db1[k];
        net.v[k] -= lr * dv[k];
    }
    net.c -= lr * dc;
    return loss;
}

// batch_stats on two shards + merge_stats == batch_stats on the whole; returns the largest
// difference relative to the per-channel standard deviation.
double check_split_stats(const Dataset& d) {
    const int64_t n0 = d.n / 3, n1 = d.n - n0;
    std::vector<double> counts(2 * D);  // (parts, channels), like means and vars
    std::fill(counts.begin(), counts.begin() + D, double(n0));
    std::fill(counts.begin() + D, counts.end(), double(n1));
    std::vector<float> means(2 * D), vars(2 * D), mean(D), var(D), mean_all(D), var_all(D);
    std::vector<double> count(D);
    bnorm::batch_stats(d.x.data(), bnorm::Shape{n0, D, 1}, &means[0], &vars[0]);
    bnorm::batch_stats(d.x.data() + n0 * D, bnorm::Shape{n1, D, 1}, &means[D], &vars[D]);
    bnorm::merge_stats<float>(2, D, counts.data(), means.data(), vars.data(), count.data(),
                              mean.data(), var.data());
    bnorm::batch_stats(d.x.data(), bnorm::Shape{d.n, D, 1}, mean_all.data(), var_all.data());
    double worst = 0.0;
    for (int64_t j = 0; j < D; ++j) {
        worst = std::max(worst, std::fabs(count[j] - double(d.n)));
        const double sd = std::sqrt(double(var_all[j]));
        worst = std::max(worst, std::fabs(double(mean[j]) - mean_all[j]) / sd);
        worst = std::max(worst, std::fabs(double(var[j]) - var_all[j]) / (sd * sd));
    }
    return worst;
}

}  // namespace

int main() try {
    std::printf("bnorm %s (CUDA backend: %s), %d CPU threads\n", BNORM_VERSION_STRING,
#if defined(BNORM_HAS_CUDA) && BNORM_HAS_CUDA
                "built",
#else
                "not built",
#endif
                bnorm::get_num_threads());

    Rng rng;
    const Dataset train = make_data(rng, 1024), test = make_data(rng, 512);
    Net net(rng);

    const double split_err = check_split_stats(train);
    std::printf("merge_stats of 2 shards vs whole batch: max relative difference %.2e\n",
                split_err);

    double target_mean = 0.0, target_var = 0.0;
    for (float t : test.t) target_mean += t;
    target_mean /= double(test.n);
    for (float t : test.t) target_var += (t - target_mean) * (t - target_mean);
    target_var /= double(test.n);

    std::printf("variance of the test target %.4f (the MSE of predicting its mean)\n",
                target_var);

    Pass batch(B), whole(test.n);

    const int epochs = 40;
    for (int epoch = 1; epoch <= epochs; ++epoch) {
        double loss = 0.0;
        int steps = 0;
        for (int64_t start = 0; start + B <= train.n; start += B, ++steps)
            loss += sgd_step(net, train.x.data() + start * D, train.t.data() + start, B,
                             0.05f, batch);
        if (epoch % 10 == 0) {
            forward_infer(net, test.x.data(), test.n, whole);
            std::printf("epoch %2d  train loss %.4f  test MSE %.4f\n", epoch, loss / steps,
                        mse(whole.y, test.t.data(), test.n));
        }
    }
    forward_infer(net, test.x.data(), test.n, whole);
    const double final_mse = mse(whole.y, test.t.data(), test.n);
    const double explained = 1.0 - final_mse / target_var;
    std::printf("test MSE after training %.4f: R^2 = %.3f\n", final_mse, explained);

    // The input batch norm learned the features' scales (10^-2 .. 10^3) as running stats.
    std::printf("running std of the inputs:");
    for (int64_t j = 0; j < D; ++j) std::printf(" %.3g", std::sqrt(double(net.rv0[j])));
    std::printf("\n");

    // Bad arguments throw (a std::exception) and write nothing.
    bool threw = false;
    try {
        float one = 1.f, out = 0.f, m = 0.f, s = 0.f;
        bnorm::forward_train(&one, bnorm::Shape{1, 1, 1}, nullptr, nullptr, nullptr, nullptr,
                             kMomentum, kEps, &out, &m, &s);
    } catch (const bnorm::ValueError& e) {
        threw = true;
        std::printf("a batch of one value is rejected: %s\n", e.what());
    }

    const bool ok = split_err < 1e-4 && explained > 0.8 && threw && std::isfinite(final_mse);
    std::printf("bnorm example: %s\n", ok ? "OK" : "FAILED");
    return ok ? 0 : 1;
} catch (const std::exception& e) {
    std::fprintf(stderr, "bnorm example: error: %s\n", e.what());
    return 2;
}
