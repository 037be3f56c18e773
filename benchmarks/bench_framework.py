"""bnorm inside framework training steps: PyTorch (stock vs bnorm.torch.convert) and JAX
(bnorm.jax vs batch norm in jax.numpy), CPU.

    python benchmarks/bench_framework.py                       # ResNet-18, 64x64, batch 32, 2 threads
    python benchmarks/bench_framework.py --batch 8 --size 32 --steps 5   # a quick look
    python benchmarks/bench_framework.py --record              # also writes results/<date>-framework-<cpu>.{md,json}

PyTorch: a ResNet-18-shaped network (BasicBlocks [2, 2, 2, 2], widths 64-512, 10 classes),
one SGD training step (forward, cross-entropy, backward, update) timed for the stock model,
for a copy converted with bnorm.torch.convert, and for a copy whose blocks call bnorm's
fused BN + add + ReLU (bnorm.torch.BatchNorm2d(activation="relu") with the identity as
residual), interleaved step by step, median over the steps. Batch norm's own time in each
step comes from torch.profiler: the inclusive CPU time of the forward op (aten::batch_norm,
or bnorm.torch's bnorm_cpp::batch_norm, which includes the running-buffer update) plus the
backward node (NativeBatchNormBackward0, or bnorm_torch::BatchNormBackward),
summed over the step's batch-norm layers; the median of 15 profiled steps per model,
interleaved like the timed ones; where bnorm was built without its PyTorch
operator library, bnorm.torch's Python path (_EagerBatchNorm and its backward node).

JAX: a jitted SGD step of a small CNN (conv-BN-ReLU x3, global pool, dense) with
bnorm.jax.batch_norm vs the same network with batch norm written in jax.numpy (what XLA
fuses itself), both jitted, median over the steps. Flax is not needed.

torch and jax are optional: a part whose framework is missing is skipped with a note.
The machine's load matters: the header prints the load average; numbers from a busy
machine are indicative only.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time

import numpy as np

import bnorm
from bnorm.bench import machine_info

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---- PyTorch ------------------------------------------------------------------------------

def _resnet18(torch, num_classes=10, fused=None):
    """fused: bnorm.torch, whose BatchNorm2d(activation="relu") then computes each block's
    relu(bn1(.)) and relu(bn2(.) + identity), and the stem's relu(bn(.)), in one op."""
    nn = torch.nn

    def norm(c):
        return fused.BatchNorm2d(c, activation="relu") if fused else nn.BatchNorm2d(c)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = norm(cout)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = norm(cout)
            self.down = None
            if stride != 1 or cin != cout:
                self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.down is None else self.down(x)
            if fused:
                return self.bn2(self.conv2(self.bn1(self.conv1(x))), identity)
            out = torch.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            return torch.relu(out + identity)

    # (fused: the stem's ReLU is in its batch norm; nn.Identity keeps the state_dict keys)
    layers = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), norm(64), nn.Identity() if fused else nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    cin = 64
    for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        layers += [Block(cin, cout, stride), Block(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes)]
    model = nn.Sequential(*layers)
    return fused.convert(model) if fused else model


_BN_EVENTS = {
    "stock": ("aten::batch_norm", "NativeBatchNormBackward0"),
    # eager: bnorm.torch's C++ operator (its forward includes the running-buffer update)
    "bnorm": ("bnorm_cpp::batch_norm", "bnorm_torch::BatchNormBackward"),
    "fused": ("bnorm_cpp::batch_norm", "bnorm_torch::BatchNormBackward"),
}
# without it (bnorm built without torch, BNORM_TORCH_OPS=0): its Python autograd.Function
_BN_EVENTS_PYTHON = ("_EagerBatchNorm", "_EagerBatchNormBackward")


def bench_torch(args) -> dict:
    import torch
    import bnorm.torch as bt
    from torch.profiler import ProfilerActivity, profile

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    stock = _resnet18(torch)
    models = {"stock": stock, "bnorm": bt.convert(_resnet18(torch)), "fused": _resnet18(torch, fused=bt)}
    for name in ("bnorm", "fused"):
        models[name].load_state_dict(stock.state_dict())
    g = torch.Generator().manual_seed(1)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g)
    labels = torch.randint(0, 10, (args.batch,), generator=g)
    opts = {k: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for k, m in models.items()}

    def step(name):
        opts[name].zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(models[name](x), labels)
        loss.backward()
        opts[name].step()
        return loss.item()

    for _ in range(args.warmup):
        for name in models:
            step(name)
    times = {name: [] for name in models}
    for _ in range(args.steps):  # interleaved: both see the same machine state
        for name in models:
            t0 = time.perf_counter()
            step(name)
            times[name].append(time.perf_counter() - t0)

    # Batch norm's own time, per profiled step, the models interleaved as above (bursts of
    # load on a shared machine then hit all of them alike); medians over the steps.
    samples = {name: [] for name in models}
    for _ in range(args.profile_steps):
        for name in models:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(name)
            events = {e.key: e for e in prof.key_averages()}
            keys = _BN_EVENTS[name] if name == "stock" or bt._OPS is not None else _BN_EVENTS_PYTHON
            fwd, bwd = (events[k].cpu_time_total / 1e3 if k in events else float("nan") for k in keys)
            # the profiled step's own total: the sum of the top-level events' inclusive times
            total = sum(e.cpu_time_total for e in prof.events() if e.cpu_parent is None) / 1e3
            samples[name].append((fwd, bwd, total))
    shares = {}
    for name, rows in samples.items():
        fwd, bwd, total = (statistics.median(column) for column in zip(*rows))
        bn = statistics.median(f + b for f, b, _ in rows)
        shares[name] = {"bn_forward_ms": fwd, "bn_backward_ms": bwd, "bn_ms": bn,
                        "profiled_step_ms": total, "bn_share": bn / total}
    result = {"model": "resnet18", "batch": args.batch, "size": args.size, "threads": args.threads,
              "bn_layers": sum(isinstance(m, torch.nn.BatchNorm2d) for m in stock.modules()),
              "profile_steps": args.profile_steps,
              "bnorm_eager_path": "C++ operator library" if bt._OPS is not None else "Python autograd.Function"}
    for name in models:
        result[name] = {"step_ms_median": 1e3 * statistics.median(times[name]),
                        "step_ms_min": 1e3 * min(times[name]), **shares[name]}
    for name in ("bnorm", "fused"):
        result[name]["step_speedup"] = result["stock"]["step_ms_median"] / result[name]["step_ms_median"]
        result[name]["bn_speedup"] = result["stock"]["bn_ms"] / result[name]["bn_ms"]
    return result


# ---- JAX ----------------------------------------------------------------------------------

def bench_jax(args) -> dict:
    import jax
    import jax.numpy as jnp
    import bnorm.jax as bj

    def jnp_batch_norm(x, w, b, m, v, momentum=0.1, eps=1e-5):
        mean, var = x.mean((0, 2, 3)), x.var((0, 2, 3))
        n = x.size // x.shape[1]
        y = (x - mean[:, None, None]) * jax.lax.rsqrt(var + eps)[:, None, None] * w[:, None, None] + b[:, None, None]
        return y, (1 - momentum) * m + momentum * mean, (1 - momentum) * v + momentum * var * n / (n - 1)

    norms = {"jnp": jnp_batch_norm, "bnorm": lambda *a: bj.batch_norm(*a, training=True)}
    widths = (3, 32, 64, 128)
    rng = np.random.default_rng(0)
    params = {"convs": [jnp.asarray(rng.normal(0, 0.1, (co, ci, 3, 3)), jnp.float32)
                        for ci, co in zip(widths, widths[1:])],
              "gammas": [jnp.ones(c) for c in widths[1:]], "betas": [jnp.zeros(c) for c in widths[1:]],
              "dense": jnp.asarray(rng.normal(0, 0.1, (widths[-1], 10)), jnp.float32)}
    stats = [(jnp.zeros(c), jnp.ones(c)) for c in widths[1:]]
    x = jnp.asarray(rng.normal(size=(args.batch, 3, args.size, args.size)), jnp.float32)
    labels = jnp.asarray(rng.integers(0, 10, args.batch))

    def make_step(norm):
        def loss_fn(params, stats, x):
            h, new_stats = x, []
            for k, (conv, gamma, beta) in enumerate(zip(params["convs"], params["gammas"], params["betas"])):
                h = jax.lax.conv_general_dilated(h, conv, (2, 2) if k else (1, 1), "SAME")
                h, m, v = norm(h, gamma, beta, *stats[k])
                h = jax.nn.relu(h)
                new_stats.append((m, v))
            logits = h.mean((2, 3)) @ params["dense"]
            return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(x.shape[0]), labels]), new_stats

        @jax.jit
        def step(params, stats, x):
            (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x)
            return jax.tree.map(lambda p, g: p - 0.01 * g, params, grads), stats, loss
        return step

    steps = {name: make_step(norm) for name, norm in norms.items()}
    state = {name: (params, stats) for name in norms}

    def run(name):
        p, s, loss = steps[name](*state[name], x)
        loss.block_until_ready()
        state[name] = (p, s)

    for _ in range(args.warmup):
        for name in norms:
            run(name)
    times = {name: [] for name in norms}
    for _ in range(args.steps):
        for name in norms:
            t0 = time.perf_counter()
            run(name)
            times[name].append(time.perf_counter() - t0)
    result = {"model": "cnn conv-bn-relu x3 (widths 32, 64, 128)", "batch": args.batch, "size": args.size}
    for name in norms:
        result[name] = {"step_ms_median": 1e3 * statistics.median(times[name]), "step_ms_min": 1e3 * min(times[name])}
    result["step_speedup"] = result["jnp"]["step_ms_median"] / result["bnorm"]["step_ms_median"]
    return result


# ---- report -------------------------------------------------------------------------------

def report(results: dict) -> str:
    lines = []
    t = results.get("torch")
    if t:
        lines += [f"### PyTorch: {t['model']}, batch {t['batch']}, {t['size']}x{t['size']}, "
                  f"{t['threads']} threads, {t['bn_layers']} BatchNorm2d layers", "",
                  "| model | step ms (median) | (min) | BN ms in step (fwd + bwd) | BN share |",
                  "|---|---:|---:|---:|---:|"]
        labels = (("stock", "stock torch"), ("bnorm", "bnorm.torch.convert"),
                  ("fused", "bnorm.torch, fused BN+add+ReLU blocks"))
        for name, label in labels:
            r = t[name]
            lines.append(f"| {label} | {r['step_ms_median']:.1f} | ({r['step_ms_min']:.1f}) | "
                         f"{r['bn_ms']:.1f} ({r['bn_forward_ms']:.1f} + {r['bn_backward_ms']:.1f}) | "
                         f"{100 * r['bn_share']:.0f}% |")
        lines.append("")
        for name, label in labels[1:]:
            lines.append(f"{label}: step speedup {t[name]['step_speedup']:.2f}x; batch norm's own time "
                         f"{t[name]['bn_speedup']:.2f}x lower.")
        lines += ["", f"bnorm.torch's eager path: {t.get('bnorm_eager_path', 'Python autograd.Function')}. "
                  "Batch norm's own time: torch.profiler, inclusive CPU time of the forward op and backward "
                  f"node, median of {t.get('profile_steps', 2)} profiled steps per model (interleaved); the fused rows' include the residual adds and ReLUs they absorb, which the others "
                  "count outside batch norm.", ""]
    j = results.get("jax")
    if j:
        lines += [f"### JAX: {j['model']}, batch {j['batch']}, {j['size']}x{j['size']}, jitted SGD step", "",
                  "| batch norm | step ms (median) | (min) |", "|---|---:|---:|"]
        for name, label in (("jnp", "jax.numpy (XLA-fused)"), ("bnorm", "bnorm.jax (FFI custom calls)")):
            lines.append(f"| {label} | {j[name]['step_ms_median']:.1f} | ({j[name]['step_ms_min']:.1f}) |")
        lines += ["", f"Step speedup {j['step_speedup']:.2f}x.", ""]
    for note in results["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2, help="torch and bnorm threads (default 2)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--size", type=int, default=64, help="input height and width (default 64)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per model (default 10)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--profile-steps", type=int, default=15, help="steps per model under torch.profiler (default 15)")
    p.add_argument("--only", choices=("torch", "jax"), default=None)
    p.add_argument("--record", action="store_true", help="write results/<date>-framework-<cpu>.{md,json}")
    args = p.parse_args(argv)
    bnorm.set_num_threads(args.threads)
    results = {"command": "python benchmarks/bench_framework.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
               "load_average": list(os.getloadavg()), "notes": []}
    for part, fn in (("torch", bench_torch), ("jax", bench_jax)):
        if args.only not in (None, part):
            continue
        try:
            results[part] = fn(args)
        except ImportError as e:
            results["notes"].append(f"{part} part skipped: {e}")
    results["notes"].append(f"load average at start {results['load_average']}: on a busy machine the numbers "
                            "are indicative only")
    try:
        import torch
    except ImportError:
        torch = None
    results["machine"] = machine_info(torch)
    text = report(results)
    print(f"bnorm {bnorm.__version__} framework benchmark ({results['date']})\n\n{text}")
    if args.record:
        cpu = "".join(c if c.isalnum() else "-" for c in str(results["machine"].get("cpu_model", "cpu")).lower())
        stem = os.path.join(RESULTS, f"{results['date'][:10]}-framework-{cpu[:40].strip('-')}-{os.cpu_count()}cpu")
        with open(stem + ".json", "w") as f:
            json.dump(results, f, indent=1, default=str)
        with open(stem + ".md", "w") as f:
            f.write(f"# bnorm in framework training steps, {results['date']}\n\n"
                    f"Command: `{results['command']}`\n\n{text}\n")
        print(f"\nwrote {stem}.md and .json")
    return results


if __name__ == "__main__":
    main()
