r"""What elbojax's estimators cost over the hand-written JAX a researcher would otherwise write.

Two measurements, both in one run so that their ratios are comparable on a noisy machine:

1. **Overhead.** `iwae_bound` against a hand-written, jitted
   `logsumexp(log_joint - log_q) - log K` on the linear Gaussian (data and latent dimension 50,
   K = 5000, 1000 data points under `jax.vmap`, a diagonal-Gaussian proposal near the
   posterior). Both draw their noise with threefry and evaluate the same log-densities; the
   contestants run alternately, several rounds, and the table gives the median time and the
   ratio to the hand-written one. Goal: at most 1.05x.

2. **Large K in bounded memory.** `iwae_bound(..., num_samples=100_000, chunk_size=c)` for
   several chunk sizes: time per data point and the compiled program's temporary memory, from
   XLA's own `memory_analysis()` (Python's tracemalloc does not see XLA's buffers). The
   unchunked program is only compiled, never run: its plan shows the memory it would need.

Usage::

    python benchmarks/estimator_speed.py            # the full measurement (a few minutes)
    python benchmarks/estimator_speed.py --quick    # small sizes, to check the script runs

Writes `estimator_speed.png` and `estimator_speed.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import statistics
import time
from pathlib import Path

import distrax
import jax
import jax.numpy as jnp

import _report
import elbojax as ej
from elbojax import exact


def hand_written_iwae(model, num_samples):
    """The IWAE bound as a researcher writes it by hand: one (K, d) draw, batched densities."""
    log_2pi = math.log(2 * math.pi)

    def bound(key, x, mean, scale):
        eps = jax.random.normal(key, (num_samples, mean.shape[0]), mean.dtype)
        z = mean + scale * eps
        log_q = -0.5 * jnp.sum(eps**2 + log_2pi, axis=-1) - jnp.sum(jnp.log(scale))
        residual = x - (z @ model.weight.T + model.bias)
        log_lik = -0.5 * jnp.sum(
            log_2pi + jnp.log(model.noise_variance) + residual**2 / model.noise_variance, axis=-1
        )
        log_prior = -0.5 * jnp.sum(log_2pi + z**2, axis=-1)
        return jax.nn.logsumexp(log_lik + log_prior - log_q) - math.log(num_samples)

    return bound


def elbojax_iwae(model, num_samples, chunk_size=None):
    def bound(key, x, mean, scale):
        q = distrax.MultivariateNormalDiag(mean, scale)
        return ej.iwae_bound(key, x, model.log_joint, q, num_samples=num_samples, chunk_size=chunk_size)

    return bound


def batched(bound):
    """Jit the per-point bound vmapped over (key, x, mean), the proposal scale shared."""
    return jax.jit(jax.vmap(bound, in_axes=(0, 0, 0, None)))


def time_alternating(contestants: dict, args, rounds: int, repeats: int) -> dict[str, float]:
    """Median seconds per call of each contestant, interleaving them round by round."""
    for fn in contestants.values():
        jax.block_until_ready(fn(*args))  # compile and warm up
    samples = {name: [] for name in contestants}
    for _ in range(rounds):
        for name, fn in contestants.items():
            start = time.perf_counter()
            for _ in range(repeats):
                jax.block_until_ready(fn(*args))
            samples[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(times) for name, times in samples.items()}


def temp_bytes(fn, *args) -> int:
    return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def problem(num_points, dim, dtype=jnp.float32):
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=dim, latent_dim=dim, dtype=dtype)
    data, _ = model.sample(jax.random.key(1), num_points)
    means = jax.vmap(model.posterior_mean)(data) + 0.1
    scale = jnp.sqrt(jnp.diag(model.posterior_covariance)) * 1.1
    keys = jax.random.split(jax.random.key(2), num_points)
    return model, (keys, data, means, scale)


def measure_overhead(num_points, dim, num_samples, rounds, repeats):
    model, args = problem(num_points, dim)
    contestants = {
        "hand-written JAX": batched(hand_written_iwae(model, num_samples)),
        "elbojax iwae_bound": batched(elbojax_iwae(model, num_samples)),
        "elbojax iwae_bound, chunk_size=500": batched(elbojax_iwae(model, num_samples, 500)),
    }
    return time_alternating(contestants, args, rounds, repeats)


def measure_large_k(num_points, dim, num_samples, chunk_sizes, rounds):
    model, args = problem(num_points, dim)
    rows = []
    unchunked = batched(elbojax_iwae(model, num_samples))
    rows.append({"chunk_size": None, "temp_bytes": temp_bytes(unchunked, *args), "seconds_per_point": None})
    for chunk in chunk_sizes:
        fn = batched(elbojax_iwae(model, num_samples, chunk))
        seconds = time_alternating({"f": fn}, args, rounds, 1)["f"]
        rows.append({"chunk_size": chunk, "temp_bytes": temp_bytes(fn, *args), "seconds_per_point": seconds / num_points})
    return rows


def plot(overhead, large_k, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    names = list(overhead)
    left.barh(names, [overhead[n] * 1e3 for n in names], color=["grey", "tab:blue", "tab:cyan"])
    left.set_xlabel("ms per call (median)")
    left.set_title("IWAE bound, 1000 points, K=5000 (lower is better)")
    chunked = [r for r in large_k if r["chunk_size"] is not None]
    right.loglog([r["chunk_size"] for r in chunked], [r["temp_bytes"] / 2**20 for r in chunked], "o-", label="chunked")
    unchunked = large_k[0]["temp_bytes"] / 2**20
    right.axhline(unchunked, color="tab:red", ls="--", label="unchunked (compiled, not run)")
    right.set_xlabel("chunk_size")
    right.set_ylabel("XLA temporary memory (MiB)")
    right.set_title("K = 100,000: memory follows chunk_size")
    right.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ELBOJAX_QUICK") == "1"
    _report.capture(args.out, "estimator_speed", "python benchmarks/estimator_speed.py " + " ".join(sys.argv[1:]), quick=quick)
    args.out.mkdir(parents=True, exist_ok=True)

    if quick:
        points, dim, k, rounds, repeats = 20, 10, 500, 2, 1
        large_points, large_k, chunk_sizes = 4, 20_000, [1000, 5000]
    else:
        points, dim, k, rounds, repeats = 1000, 50, 5000, args.rounds, 1
        large_points, large_k, chunk_sizes = 100, 100_000, [1000, 5000, 20_000]

    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; {os.cpu_count()} CPUs")
    print(f"\nIWAE bound, linear Gaussian D=d={dim}, K={k}, {points} points under vmap, float32")
    overhead = measure_overhead(points, dim, k, rounds, repeats)
    base = overhead["hand-written JAX"]
    print(f"{'contestant':<38}{'median ms':>12}{'ratio':>8}")
    for name, seconds in overhead.items():
        print(f"{name:<38}{seconds * 1e3:>12.1f}{seconds / base:>8.3f}")

    print(f"\nK={large_k}, {large_points} points, D=d={dim}: XLA temporary memory and time")
    rows = measure_large_k(large_points, dim, large_k, chunk_sizes, max(1, rounds // 2))
    print(f"{'chunk_size':<14}{'temp MiB':>12}{'ms / point':>12}")
    for row in rows:
        ms = "(not run)" if row["seconds_per_point"] is None else f"{row['seconds_per_point'] * 1e3:.1f}"
        print(f"{str(row['chunk_size'] or 'unchunked'):<14}{row['temp_bytes'] / 2**20:>12.2f}{ms:>12}")

    figure = args.out / "estimator_speed.png"
    plot(overhead, rows, figure)
    record = {"jax": jax.__version__, "quick": quick, "overhead_seconds": overhead, "large_k": rows}
    (args.out / "estimator_speed.json").write_text(json.dumps(record, indent=2))
    print(f"\nwrote {figure} and {args.out / 'estimator_speed.json'}")


if __name__ == "__main__":
    _report.run(main)
