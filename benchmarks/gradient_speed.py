r"""What each gradient estimator costs in a real training step (goal: DReG at most 1.15x plain IWAE).

The workload is W2 of `../shared/PERFORMANCE.md`: the IWAE paper's MNIST architecture (encoder
784-200-200-(2x50) tanh, diagonal Gaussian q; prior N(0, I); decoder 50-200-200-784 tanh,
Bernoulli logits with the fused `-softplus(where(x, -l, l))` likelihood), batch 100, K = 50, one
Adam step: forward, gradients, update, all jitted. Each estimator is `elbojax.iwae_bound(...,
gradient=g)` vmapped over the batch; a hand-written IWAE step (one batched draw, no library)
runs in the same rounds for reference. The contestants run alternately for several rounds; the
table gives the median step time and the ratio to `gradient="reparam"`.

The networks here are plain JAX so that this script measures only the estimators; the Flax
models come with the training issue.

Usage::

    python benchmarks/gradient_speed.py           # a few minutes
    python benchmarks/gradient_speed.py --quick   # tiny sizes, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time
from pathlib import Path

import distrax
import jax
import jax.numpy as jnp
import optax

import _report
import elbojax as ej


def init_mlp(key, sizes):
    keys = jax.random.split(key, len(sizes) - 1)
    return [
        (jax.random.normal(k, (m, n)) * jnp.sqrt(1.0 / m), jnp.zeros(n))
        for k, m, n in zip(keys, sizes[:-1], sizes[1:])
    ]


def mlp(layers, h):
    for weight, bias in layers[:-1]:
        h = jnp.tanh(h @ weight + bias)
    weight, bias = layers[-1]
    return h @ weight + bias


def bernoulli_log_likelihood(x, logits):
    """Fused form: log sigmoid(+l) where x = 1, log sigmoid(-l) where x = 0."""
    s = jnp.where(x > 0.5, -logits, logits)  # softplus(s) written with selects, as elbojax's likelihood is
    positive = s > 0
    return -jnp.sum(jnp.where(positive, s, 0.0) + jnp.log1p(jnp.exp(jnp.where(positive, -s, s))), axis=-1)


def adam_step(loss, optimizer):
    """One jitted optimizer step on `loss(params, key, batch)`."""

    @jax.jit
    def step(params, opt_state, key, batch):
        value, grads = jax.value_and_grad(loss)(params, key, batch)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    return step


def make_step(gradient, num_samples, latent_dim, optimizer):
    def per_point(params, key, x):
        stats = mlp(params["encoder"], x)
        q = distrax.MultivariateNormalDiag(stats[:latent_dim], jnp.exp(stats[latent_dim:]))

        def log_joint(x, z):
            prior = -0.5 * jnp.sum(z**2 + jnp.log(2 * jnp.pi))
            return bernoulli_log_likelihood(x, mlp(params["decoder"], z)) + prior

        return ej.iwae_bound(key, x, log_joint, q, num_samples=num_samples, gradient=gradient)

    def loss(params, key, batch):
        keys = jax.random.split(key, batch.shape[0])
        return -jnp.mean(jax.vmap(per_point, in_axes=(None, 0, 0))(params, keys, batch))

    return adam_step(loss, optimizer)


def make_hand_written_step(num_samples, latent_dim, optimizer):
    """The same IWAE step written by hand: one (B, K, d) draw, batched matrix products."""

    def loss(params, key, batch):
        stats = mlp(params["encoder"], batch)
        mean, log_scale = stats[:, :latent_dim], stats[:, latent_dim:]
        eps = jax.random.normal(key, (batch.shape[0], num_samples, latent_dim))
        z = mean[:, None] + jnp.exp(log_scale)[:, None] * eps
        log_q = jnp.sum(-0.5 * eps**2 - 0.5 * jnp.log(2 * jnp.pi) - log_scale[:, None], axis=-1)
        log_prior = jnp.sum(-0.5 * z**2 - 0.5 * jnp.log(2 * jnp.pi), axis=-1)
        log_lik = bernoulli_log_likelihood(batch[:, None], mlp(params["decoder"], z))
        bound = jax.nn.logsumexp(log_lik + log_prior - log_q, axis=1) - jnp.log(num_samples)
        return -jnp.mean(bound)

    return adam_step(loss, optimizer)


def time_steps(steps, params, opt_state, batch, rounds, repeats):
    key = jax.random.key(0)
    # The keys are made before any timing: an eager `fold_in` in the loop was timed with the steps
    # (and compiled inside the first round, which the median of --quick's two rounds kept).
    keys = jax.block_until_ready([jax.random.fold_in(key, i) for i in range(repeats)])
    for step in steps.values():
        jax.block_until_ready(step(params, opt_state, key, batch))
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            state = (params, opt_state)
            for step_key in keys:  # chained, as in training: each call waits for the one before
                *state, _ = step(*state, step_key, batch)
            jax.block_until_ready(state)
            times[name].append((time.perf_counter() - start) / repeats)
    return {name: statistics.median(t) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ELBOJAX_QUICK") == "1"
    _report.capture(args.out, "gradient_speed", "python benchmarks/gradient_speed.py " + " ".join(sys.argv[1:]), quick=quick)
    data_dim, hidden, latent, batch_size, k = (784, 200, 50, 100, 50) if not quick else (32, 16, 4, 8, 5)
    rounds, repeats = (args.rounds, 10) if not quick else (2, 2)

    key_enc, key_dec, key_data = jax.random.split(jax.random.key(1), 3)
    params = {
        "encoder": init_mlp(key_enc, [data_dim, hidden, hidden, 2 * latent]),
        "decoder": init_mlp(key_dec, [latent, hidden, hidden, data_dim]),
    }
    batch = jax.random.bernoulli(key_data, 0.13, (batch_size, data_dim)).astype(jnp.float32)
    optimizer = optax.adam(1e-3)
    opt_state = optimizer.init(params)
    steps = {"hand-written": make_hand_written_step(k, latent, optimizer)}
    steps.update({g: make_step(g, k, latent, optimizer) for g in ("reparam", "dreg", "stl")})
    medians = time_steps(steps, params, opt_state, batch, rounds, repeats)

    print(f"JAX {jax.__version__} on {jax.devices()[0].platform}; {os.cpu_count()} CPUs")
    print(f"IWAE training step: MLP {data_dim}-{hidden}-{hidden}-{latent}, batch {batch_size}, K={k}, Adam")
    print(f"{'gradient':<12}{'median ms':>12}{'vs reparam':>12}")
    for name, seconds in medians.items():
        print(f"{name:<12}{seconds * 1e3:>12.2f}{seconds / medians['reparam']:>12.3f}")
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "gradient_speed.json"
    path.write_text(json.dumps({"jax": jax.__version__, "quick": quick, "median_seconds": medians}, indent=2))
    print(f"wrote {path}")


if __name__ == "__main__":
    _report.run(main)
