"""Reproduce Figure 1 of the batch-normalization paper with bnorm on NumPy.

Ioffe & Szegedy (2015), "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", Figure 1: a fully connected network with 3 hidden
layers of 100 sigmoid units, trained with mini-batch SGD from small random Gaussian
weights, without and with batch normalization before each sigmoid. The figure shows

(a) test accuracy against training steps for both networks;
(b), (c) the 15th, 50th and 85th percentiles of the input to one sigmoid of the last
    hidden layer over training, without (b) and with (c) batch normalization.

Here the data are scikit-learn's bundled 8x8 digits (no download), the network is plain
NumPy (forward and backward written out by hand) and the batch-norm layers are
``bnorm.BatchNorm(100)``. Run it with::

    python -m bnorm.demo                 # writes bnorm_demo_output/bnorm_demo.png and .svg
    python -m bnorm.demo --lr-sweep      # also trains both at several learning rates

It needs the demo extras: ``pip install "bnorm[demo]"`` (scikit-learn, matplotlib, tqdm;
tqdm is optional).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np

import bnorm

HIDDEN = (100, 100, 100)  # three hidden layers of 100 sigmoid units, as in the paper
SPLIT_SEED = 0  # the train/test split is the same whatever --seed is
TEST_FRACTION = 0.3
DEFAULT_SWEEP_LRS = (0.02, 0.1, 0.5, 2.0, 8.0, 32.0)


# --------------------------------------------------------------------------------------
# data


def load_digits_split(dtype=np.float32):
    """scikit-learn's digits (1797 images of 8x8 pixels, 10 classes), pixels scaled to
    [0, 1], split 70/30 into train and test sets with a fixed seed, stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(dtype)
    y = digits.target.astype(np.int64)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y)
    return (np.ascontiguousarray(x_train), y_train, np.ascontiguousarray(x_test), y_test)


# --------------------------------------------------------------------------------------
# the network


def sigmoid(u):
    # 1 / (1 + exp(-u)) written with tanh: the same function, and no overflow for large |u|
    return np.tanh(u * 0.5) * 0.5 + 0.5


def init_weights(rng, n_in, n_out, hidden=HIDDEN, std=0.01):
    """Small random Gaussian weights (the paper's initialization), one matrix per layer."""
    sizes = (n_in, *hidden, n_out)
    return [rng.normal(0.0, std, size=(a, b)) for a, b in zip(sizes[:-1], sizes[1:])]


class MLP:
    """Fully connected sigmoid network with a softmax output, forward and backward by hand.

    With ``batch_norm=True`` every hidden layer computes ``sigmoid(BN(h @ W))``: the layer's
    bias is dropped because BN's mean subtraction cancels it; BN's own shift (``bias``)
    takes its role. Without, it computes ``sigmoid(h @ W + b)``.
    """

    def __init__(self, weights, batch_norm, dtype=np.float32):
        self.dtype = np.dtype(dtype)
        self.batch_norm = batch_norm
        self.W = [np.array(w, dtype=self.dtype) for w in weights]
        n_hidden = len(self.W) - 1
        if batch_norm:
            self.b = [None] * n_hidden
            self.bn = [bnorm.BatchNorm(w.shape[1], dtype=self.dtype) for w in self.W[:-1]]
        else:
            self.b = [np.zeros(w.shape[1], self.dtype) for w in self.W[:-1]]
            self.bn = [None] * n_hidden
        self.b.append(np.zeros(self.W[-1].shape[1], self.dtype))  # output layer's bias
        self._cache = None

    def forward(self, x, training=True):
        """Logits of x (N, features), and the sigmoid inputs of the last hidden layer."""
        for bn in self.bn:
            if bn is not None:
                bn.train(training)
        h = x
        inputs, outputs = [], []
        u = None
        for W, b, bn in zip(self.W[:-1], self.b[:-1], self.bn):
            z = h @ W
            u = bn(z) if bn is not None else z + b  # the sigmoid's input
            inputs.append(h)
            h = sigmoid(u)
            outputs.append(h)
        inputs.append(h)
        logits = h @ self.W[-1] + self.b[-1]
        self._cache = (inputs, outputs)
        return logits, u

    def backward(self, dlogits):
        """Gradients of the loss, given its gradient with respect to the logits of the last
        forward call. Returns a list of (parameter, gradient) pairs."""
        inputs, outputs = self._cache
        grads = [(self.W[-1], inputs[-1].T @ dlogits), (self.b[-1], dlogits.sum(axis=0))]
        dh = dlogits @ self.W[-1].T
        for i in reversed(range(len(self.W) - 1)):
            a = outputs[i]
            du = dh * a * (1.0 - a)  # sigmoid'(u) = s (1 - s)
            bn = self.bn[i]
            if bn is not None:
                dz = bn.backward(du)
                grads.append((bn.weight, bn.grad_weight))
                grads.append((bn.bias, bn.grad_bias))
            else:
                dz = du
                grads.append((self.b[i], du.sum(axis=0)))
            grads.append((self.W[i], inputs[i].T @ dz))
            if i > 0:
                dh = dz @ self.W[i].T
        return grads

    def loss_and_grads(self, x, y):
        """Mean softmax cross-entropy of a training batch, and its gradients."""
        logits, _ = self.forward(x, training=True)
        n = x.shape[0]
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_p = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss = -log_p[np.arange(n), y].mean()
        dlogits = np.exp(log_p)
        dlogits[np.arange(n), y] -= 1.0
        dlogits /= n
        return float(loss), self.backward(dlogits.astype(self.dtype, copy=False))

    @staticmethod
    def sgd_step(grads, lr):
        for param, grad in grads:
            param -= lr * grad  # in place: BN's weight and bias are updated where they live

    def evaluate(self, x, y):
        """Test accuracy (BN with its running statistics) and the last hidden layer's
        sigmoid inputs."""
        logits, u = self.forward(x, training=False)
        return float((logits.argmax(axis=1) == y).mean()), u


# --------------------------------------------------------------------------------------
# training


@dataclass
class History:
    name: str
    steps: list = field(default_factory=list)
    accuracy: list = field(default_factory=list)
    percentiles: list = field(default_factory=list)  # (15th, 50th, 85th) per record
    final_loss: float = float("nan")

    @property
    def final_accuracy(self):
        return self.accuracy[-1]


class _TextProgress:
    """The fallback when tqdm is not installed: a line on stderr every 10 %."""

    def __init__(self, total, desc, disable):
        self.total, self.desc, self.disable, self.n, self.shown = total, desc, disable, 0, -1

    def update(self, k=1):
        self.n += k
        tenth = self.n * 10 // max(self.total, 1)
        if not self.disable and tenth != self.shown:
            self.shown = tenth
            print(f"{self.desc}: {self.n}/{self.total}", file=sys.stderr, flush=True)

    def close(self):
        pass


def _progress(total, desc, disable):
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextProgress(total, desc, disable)
    return tqdm(total=total, desc=desc, disable=disable, leave=False, unit="step")


@contextlib.contextmanager
def single_threaded():
    """Run bnorm and NumPy's BLAS on one thread. The demo's arrays are tiny (60 x 100):
    threads only add synchronization, and busy-waiting thread pools slow down badly when
    other processes share the cores."""
    old = bnorm.get_num_threads()
    bnorm.set_num_threads(1)
    try:
        try:
            from threadpoolctl import threadpool_limits  # installed with scikit-learn
        except ImportError:
            limits = contextlib.nullcontext()
        else:
            limits = threadpool_limits(limits=1)
        with limits:
            yield
    finally:
        bnorm.set_num_threads(old)


def train_pair(data, steps, batch_size, lr, seed, unit=0, eval_every=None, init_std=0.01,
               progress=True, desc="training"):
    """Train the plain and the batch-norm network from the same initialization on the same
    mini-batches; return their two Histories."""
    x_train, y_train, x_test, y_test = data
    rng = np.random.default_rng(seed)
    weights = init_weights(rng, x_train.shape[1], int(y_train.max()) + 1, std=init_std)
    nets = {"plain": MLP(weights, batch_norm=False), "batch norm": MLP(weights, batch_norm=True)}
    hist = {name: History(name) for name in nets}
    if eval_every is None:
        eval_every = max(1, steps // 200)

    def record(step):
        for name, net in nets.items():
            acc, u = net.evaluate(x_test, y_test)
            h = hist[name]
            h.steps.append(step)
            h.accuracy.append(acc)
            h.percentiles.append(np.percentile(u[:, unit], [15, 50, 85]))

    n = x_train.shape[0]
    order, pos = rng.permutation(n), 0
    bar = _progress(steps, desc, disable=not progress)
    with single_threaded():
        record(0)
        try:
            for step in range(1, steps + 1):
                if pos + batch_size > n:  # a new epoch: reshuffle
                    order, pos = rng.permutation(n), 0
                idx = order[pos:pos + batch_size]
                pos += batch_size
                xb, yb = x_train[idx], y_train[idx]
                for name, net in nets.items():
                    loss, grads = net.loss_and_grads(xb, yb)
                    net.sgd_step(grads, lr)
                    hist[name].final_loss = loss
                if step % eval_every == 0 or step == steps:
                    record(step)
                bar.update(1)
        finally:
            bar.close()
    for h in hist.values():
        h.percentiles = np.asarray(h.percentiles)
    return hist["plain"], hist["batch norm"]


# --------------------------------------------------------------------------------------
# figures


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no window: works headless
    import matplotlib.pyplot as plt

    return plt


def plot_figure1(plain, bn, path_stem, title=""):
    """The paper's Figure 1 for our two runs; writes path_stem + '.png' and '.svg'."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    ax = axes[0]
    ax.plot(plain.steps, plain.accuracy, color="tab:blue", ls="--", label="Without BN")
    ax.plot(bn.steps, bn.accuracy, color="tab:red", label="With BN (bnorm)")
    ax.set_xlabel("training steps")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax.set_title("(a) test accuracy")
    lo = min(plain.percentiles.min(), bn.percentiles.min())
    hi = max(plain.percentiles.max(), bn.percentiles.max())
    pad = 0.05 * (hi - lo + 1e-12)
    for ax, h, tag, color in ((axes[1], plain, "(b) without BN", "tab:blue"),
                              (axes[2], bn, "(c) with BN", "tab:red")):
        p = h.percentiles
        ax.fill_between(h.steps, p[:, 0], p[:, 2], color=color, alpha=0.15)
        for k, ls in zip(range(3), (":", "-", ":")):
            ax.plot(h.steps, p[:, k], color=color, ls=ls, lw=1.5 if k == 1 else 1.0,
                    label=("15th / 85th percentile" if k == 0 else
                           "median" if k == 1 else None))
        ax.set_ylim(lo - pad, hi + pad)
        ax.set_xlabel("training steps")
        ax.set_ylabel("input to a last-layer sigmoid")
        ax.grid(alpha=0.3)
        ax.legend(loc="best", fontsize="small")
        ax.set_title(tag)
    if title:
        fig.suptitle(title, fontsize="medium")
    fig.tight_layout()
    paths = [path_stem + ".png", path_stem + ".svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


def plot_sweep(rows, path_stem, steps):
    plt = _pyplot()
    lrs = [r["lr"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    ax.semilogx(lrs, [r["plain"] for r in rows], "o--", color="tab:blue", label="Without BN")
    ax.semilogx(lrs, [r["batch norm"] for r in rows], "s-", color="tab:red",
                label="With BN (bnorm)")
    ax.axhline(0.1, color="gray", ls=":", lw=1, label="chance (10 classes)")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(f"test accuracy after {steps} steps")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="best")
    ax.set_title("learning-rate sweep")
    fig.tight_layout()
    paths = [path_stem + ".png", path_stem + ".svg"]
    fig.savefig(paths[0], dpi=120)
    fig.savefig(paths[1])
    plt.close(fig)
    return paths


# --------------------------------------------------------------------------------------
# command line


def _parse_lrs(text):
    try:
        lrs = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}")
    if not lrs or any(not (lr > 0) for lr in lrs):
        raise argparse.ArgumentTypeError(f"learning rates must be > 0, got {text!r}")
    return lrs


def _positive_int(text):
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return v


def build_parser():
    p = argparse.ArgumentParser(
        prog="python -m bnorm.demo",
        description="Reproduce Figure 1 of Ioffe & Szegedy (2015) with bnorm.BatchNorm: a "
                    "3x100 sigmoid MLP on scikit-learn's digits, trained with and without "
                    "batch normalization.")
    p.add_argument("--steps", type=_positive_int, default=20000,
                   help="training steps (mini-batches) per network (default: 20000)")
    p.add_argument("--batch-size", type=_positive_int, default=60,
                   help="mini-batch size, as in the paper (default: 60)")
    p.add_argument("--lr", type=float, default=0.5,
                   help="SGD learning rate for both networks (default: 0.5)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial weights and the batch order (default: 0)")
    p.add_argument("--init-std", type=float, default=0.01,
                   help="standard deviation of the initial Gaussian weights (default: 0.01)")
    p.add_argument("--unit", type=int, default=0,
                   help="which sigmoid of the last hidden layer panels (b), (c) follow "
                        "(default: 0)")
    p.add_argument("--out", default=DEFAULT_OUT,
                   help="output folder, created if missing (default: %(default)s, in the current folder)")
    p.add_argument("--lr-sweep", nargs="?", const=",".join(map(str, DEFAULT_SWEEP_LRS)),
                   default=None, type=_parse_lrs, metavar="LR,LR,...",
                   help="also train both networks at each of these learning rates "
                        "(default list: %(const)s) and write bnorm_lr_sweep.png/.svg/.csv")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# The default output folder: the figures of a run stay together, and none is left loose in
# the folder the demo runs from (a repository checkout ignores it: .gitignore).
DEFAULT_OUT = "bnorm_demo_output"


def main(argv=None):
    """Run the demo; returns a dict with the histories, the sweep rows and the files."""
    args = build_parser().parse_args(argv)
    if args.batch_size < 2:
        raise SystemExit("--batch-size must be at least 2 (batch norm needs more than "
                         "1 value per channel)")
    if not args.lr > 0:
        raise SystemExit("--lr must be > 0")
    if not 0 <= args.unit < HIDDEN[-1]:
        raise SystemExit(f"--unit must be in [0, {HIDDEN[-1]})")
    try:
        import matplotlib  # noqa: F401  (checked now rather than after training)

        data = load_digits_split()
    except ImportError as e:
        raise SystemExit(f"bnorm.demo needs scikit-learn and matplotlib ({e}); "
                         f"install them with: pip install \"bnorm[demo]\"")
    os.makedirs(args.out, exist_ok=True)
    progress = not args.no_progress

    t0 = time.perf_counter()
    plain, bn = train_pair(data, args.steps, args.batch_size, args.lr, args.seed,
                           unit=args.unit, init_std=args.init_std, progress=progress)
    elapsed = time.perf_counter() - t0
    files = plot_figure1(
        plain, bn, os.path.join(args.out, "bnorm_demo"),
        title=f"3x100 sigmoid MLP on digits, batch {args.batch_size}, lr {args.lr:g}, "
              f"init N(0, {args.init_std:g}^2), seed {args.seed}")
    result = {"plain": plain, "batch_norm": bn, "time_s": elapsed, "files": files,
              "sweep": None}
    print(f"bnorm demo: {args.steps} steps, batch {args.batch_size}, lr {args.lr:g}: "
          f"test accuracy without BN {plain.final_accuracy:.3f}, "
          f"with BN {bn.final_accuracy:.3f}, trained in {elapsed:.1f} s -> {', '.join(files)}", flush=True)

    if args.lr_sweep:
        rows = []
        t1 = time.perf_counter()
        for lr in args.lr_sweep:
            p, b = train_pair(data, args.steps, args.batch_size, lr, args.seed,
                              unit=args.unit, init_std=args.init_std, progress=progress,
                              eval_every=args.steps, desc=f"lr {lr:g}")
            rows.append({"lr": lr, "plain": p.final_accuracy, "batch norm": b.final_accuracy})
        stem = os.path.join(args.out, "bnorm_lr_sweep")
        with open(stem + ".csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["lr", "plain", "batch norm"])
            w.writeheader()
            w.writerows(rows)
        files += plot_sweep(rows, stem, args.steps) + [stem + ".csv"]
        result["sweep"] = rows
        print(f"learning-rate sweep, test accuracy after {args.steps} steps "
              f"(batch {args.batch_size}, seed {args.seed}):")
        print(f"  {'lr':>8}  {'without BN':>10}  {'with BN':>8}")
        for r in rows:
            print(f"  {r['lr']:>8g}  {r['plain']:>10.3f}  {r['batch norm']:>8.3f}")
        print(f"  ({time.perf_counter() - t1:.1f} s) -> {', '.join(files[2:])}", flush=True)
    return result


if __name__ == "__main__":
    main()
