"""bnorm with NumPy: the C++ example's network (examples/cpp/main.cpp), in Python.

    x (N, 6) -> BatchNorm(6, affine=False) -> Linear(6, 32) -> BatchNorm(32) -> ReLU
             -> Linear(32, 1) -> mean squared error,   trained with plain SGD

The six input features differ in scale by 10^5 and sit far from zero; the input batch
norm learns their scales as running statistics. The test set is evaluated in eval mode
(running statistics). First, the statistics of the training set are gathered in chunks
with bnorm.batch_stats and combined with bnorm.merge_stats, as a dataset too large for
memory (or split over processes) would be, and compared with NumPy's.

    python examples/python/numpy_mlp.py        # prints "bnorm example: OK" at the end
"""

import sys

import numpy as np

import bnorm

D, H, BATCH, EPOCHS, LR = 6, 32, 64, 40, 0.05


def make_data(rng, n):
    g = rng.standard_normal((n, D))
    x = (10.0 ** (np.arange(D) - 2.0)) * (50.0 + g)
    t = np.sin(g[:, 0]) + 0.5 * g[:, 1] - 0.3 * g[:, 2] * g[:, 3] + 0.4 * np.abs(g[:, 5])
    t += 0.05 * rng.standard_normal(n)
    return x.astype(np.float32), t.astype(np.float32)


def chunked_stats(x, chunk=100):
    """Mean and variance of every feature, from chunks: batch_stats, then merge_stats."""
    parts = [bnorm.batch_stats(x[i:i + chunk]) for i in range(0, len(x), chunk)]
    counts, means, variances = (np.stack(v) for v in zip(*parts))
    return bnorm.merge_stats(counts, means, variances)


class Net:
    def __init__(self, rng):
        self.bn0 = bnorm.BatchNorm(D, affine=False)   # standardizes the features
        self.w1 = (rng.standard_normal((D, H)) / np.sqrt(D)).astype(np.float32)
        self.bn1 = bnorm.BatchNorm(H)
        self.v = (rng.standard_normal(H) / np.sqrt(H)).astype(np.float32)
        self.c = np.float32(0)

    def train(self, mode=True):
        self.bn0.train(mode)
        self.bn1.train(mode)

    def __call__(self, x):
        self.z0 = self.bn0(x)
        self.z1 = self.bn1(self.z0 @ self.w1)   # Linear(6, 32) without bias: bn1 has one
        self.a = np.maximum(self.z1, 0)
        return self.a @ self.v + self.c

    def sgd_step(self, x, t):
        y = self(x)
        dy = 2 * (y - t) / len(t)
        dz1 = np.outer(dy, self.v) * (self.z1 > 0)
        dh1 = self.bn1.backward(dz1)           # through the batch mean and variance
        self.w1 -= LR * (self.z0.T @ dh1)
        self.bn1.weight -= LR * self.bn1.grad_weight
        self.bn1.bias -= LR * self.bn1.grad_bias
        self.v -= LR * (self.a.T @ dy)
        self.c -= LR * dy.sum()
        return float(np.mean((y - t) ** 2))


def main():
    rng = np.random.default_rng(20150211)
    x_train, t_train = make_data(rng, 1024)
    x_test, t_test = make_data(rng, 512)
    print(f"bnorm {bnorm.__version__}, {bnorm.get_num_threads()} CPU threads")

    count, mean, var = chunked_stats(x_train)
    x64 = x_train.astype(np.float64)
    err = max(np.max(np.abs(mean - x64.mean(0)) / x64.std(0)), np.max(np.abs(var / x64.var(0) - 1)))
    print(f"chunked statistics of {count} rows vs NumPy: max relative difference {err:.1e}")

    net = Net(rng)
    for epoch in range(1, EPOCHS + 1):
        net.train()
        order = rng.permutation(len(x_train))
        losses = [net.sgd_step(x_train[i], t_train[i])
                  for i in np.split(order, len(order) // BATCH)]
        if epoch % 10 == 0:
            net.train(False)
            mse = float(np.mean((net(x_test) - t_test) ** 2))
            print(f"epoch {epoch:2d}  train loss {np.mean(losses):.4f}  test MSE {mse:.4f}")

    net.train(False)
    mse = float(np.mean((net(x_test) - t_test) ** 2))
    r2 = 1 - mse / float(np.var(t_test))
    print(f"test MSE {mse:.4f}: R^2 = {r2:.3f}")
    print("running std of the inputs:", np.array2string(np.sqrt(net.bn0.running_var), precision=3))

    ok = err < 1e-4 and r2 > 0.8 and count == len(x_train)
    print(f"bnorm example: {'OK' if ok else 'FAILED'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
