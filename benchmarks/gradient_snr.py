r"""Gradient signal-to-noise ratios against K, and the variance of the discrete estimators.

**Part 1: the figure of Rainforth et al. (2018).** On the Gaussian toy (D = 20, z ~ N(mu, I),
x | z ~ N(z, I)) with their inference network q(z | x) = N(Ax + b, 2/3 I) at parameters
perturbed from the optimum, we draw the gradient of the batch-mean bound many times and report
SNR = |E g| / std g per parameter, pooled over the encoder's (A, b) and the decoder's mu
(`elbojax.diagnostics.pooled_gradient_snr`). Under plain IWAE the encoder's SNR falls like
1/sqrt(K) while the decoder's rises like sqrt(K); IWAE-STL and DReG (Tucker et al. 2019) keep
the encoder's SNR from falling.

**Part 2: discrete latents.** On a Gaussian mixture with a categorical q, the total variance of
the gradient with respect to q's logits for: score function, score with the leave-one-out
baseline, VIMCO (for IWAE), the Gumbel-softmax relaxation (biased; its relaxed objective), and
exact enumeration (zero variance).

Usage::

    python benchmarks/gradient_snr.py            # a few minutes
    python benchmarks/gradient_snr.py --quick    # small sizes, to check that it runs

Prints two tables and writes `gradient_snr.png` and `gradient_snr.json` to `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import distrax
import jax
import jax.numpy as jnp
import numpy as np

import _report
import elbojax as ej
from elbojax import diagnostics, discrete, exact

ESTIMATORS = ("reparam", "stl", "dreg")


def toy_problem(num_points, perturbation=0.01):
    toy = exact.GaussianToy.random(jax.random.key(0), dim=20)
    data, _ = toy.sample(jax.random.key(1), num_points)
    weight, bias = toy.optimal_encoder_params()
    k_w, k_b = jax.random.split(jax.random.key(2))
    encoder = (
        weight + perturbation * jax.random.normal(k_w, weight.shape),
        bias + perturbation * jax.random.normal(k_b, bias.shape),
    )
    return toy, data, encoder


def snr_by_k(toy, data, encoder, gradient, num_samples, num_draws):
    """Pooled SNR of the encoder's and the decoder's gradient over `num_draws` independent draws."""

    def batch_bound(params, key):
        encoder_params, prior_mean = params
        model = exact.GaussianToy(prior_mean)
        keys = jax.random.split(key, data.shape[0])

        def one(k, x):
            q = toy.encoder(encoder_params, x)
            return ej.iwae_bound(k, x, model.log_joint, q, num_samples=num_samples, gradient=gradient)

        return jnp.mean(jax.vmap(one)(keys, data))

    params = (encoder, toy.mean)
    draws = jax.jit(jax.vmap(lambda k: jax.grad(batch_bound)(params, k)))(
        jax.random.split(jax.random.key(3), num_draws)
    )
    encoder_draws, decoder_draws = draws
    return float(diagnostics.pooled_gradient_snr(encoder_draws)), float(diagnostics.pooled_gradient_snr(decoder_draws))


def discrete_variances(num_samples, num_draws):
    """Total variance of d(bound)/d(logits) for each discrete estimator, and its mean's error."""
    model = exact.GaussianMixture.random(jax.random.key(0), num_components=4, dim=2, separation=1.5)
    x = model.sample(jax.random.key(1), 1)[0][0]
    logits = jnp.array([0.3, -0.2, 0.1, 0.0])
    keys = jax.random.split(jax.random.key(4), num_draws)
    exact_elbo_grad = jax.grad(lambda lg: discrete.enumerated_elbo(x, model.log_joint, lg))(logits)

    def sampled(objective, **kwargs):
        grad = lambda k: jax.grad(lambda lg: objective(k, x, model.log_joint, distrax.Categorical(logits=lg), **kwargs))(logits)
        return np.asarray(jax.jit(jax.vmap(grad))(keys))

    def relaxed(temperature):
        # The relaxed ELBO: relaxed q against a relaxed prior of the same family (Maddison et al.).
        def log_joint(x, soft):
            components = jax.vmap(lambda c: model.log_likelihood(x, c))(jnp.arange(model.num_components))
            prior = discrete.RelaxedOneHotCategorical(model.logits, temperature)
            return jnp.sum(soft * components) + prior.log_prob(soft)

        grad = lambda k: jax.grad(lambda lg: ej.elbo(k, x, log_joint, discrete.RelaxedOneHotCategorical(lg, temperature), num_samples=num_samples))(logits)
        return np.asarray(jax.jit(jax.vmap(grad))(keys))

    rows = {
        "score (ELBO, no baseline)": sampled(ej.elbo, num_samples=num_samples, gradient="score", baseline=0.0),
        "score + leave-one-out (ELBO)": sampled(ej.elbo, num_samples=num_samples, gradient="score"),
        "VIMCO (IWAE)": sampled(ej.iwae_bound, num_samples=num_samples, gradient="vimco"),
        "Gumbel-softmax, tau=0.5": relaxed(0.5),
        "enumerated (ELBO)": np.repeat(np.asarray(exact_elbo_grad)[None], 2, axis=0),
    }
    return {
        name: {"total_variance": float(draws.var(0).sum()), "mean_error_vs_exact_elbo_grad": float(np.abs(draws.mean(0) - exact_elbo_grad).max())}
        for name, draws in rows.items()
    }


def plot(ks, table, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (enc, dec) = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for name in ESTIMATORS:
        enc.loglog(ks, [table[name][k][0] for k in ks], "o-", label=name)
        dec.loglog(ks, [table[name][k][1] for k in ks], "o-", label=name)
    enc.set_title("encoder (A, b): pooled SNR")
    dec.set_title("decoder (mu): pooled SNR (the same for all three)")
    for ax in (enc, dec):
        ax.set_xlabel("K (samples per data point)")
        ax.legend()
    enc.set_ylabel("|E g| / std g")
    fig.suptitle("Gradient SNR on the Gaussian toy (Rainforth et al. 2018)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    quick = args.quick or os.environ.get("ELBOJAX_QUICK") == "1"
    _report.capture(args.out, "gradient_snr", "python benchmarks/gradient_snr.py " + " ".join(sys.argv[1:]), quick=quick)
    ks = [1, 10, 100] if quick else [1, 3, 10, 30, 100, 300, 1000]
    num_points, num_draws = (4, 100) if quick else (16, 1000)
    args.out.mkdir(parents=True, exist_ok=True)

    toy, data, encoder = toy_problem(num_points)
    table = {name: {} for name in ESTIMATORS}
    print(f"JAX {jax.__version__}; Gaussian toy D=20, {num_points} points, {num_draws} gradient draws")
    print(f"{'K':>6}" + "".join(f"{name + ' enc':>14}{name + ' dec':>14}" for name in ESTIMATORS))
    for k in ks:
        for name in ESTIMATORS:
            table[name][k] = snr_by_k(toy, data, encoder, name, k, num_draws)
        print(f"{k:>6}" + "".join(f"{table[n][k][0]:>14.3f}{table[n][k][1]:>14.3f}" for n in ESTIMATORS))

    variances = discrete_variances(num_samples=4, num_draws=num_draws * 4)
    print("\nDiscrete latents: gradient w.r.t. q's logits, Gaussian mixture C=4, K=4")
    print(f"{'estimator':<32}{'total variance':>16}{'max |mean - exact ELBO grad|':>30}")
    for name, row in variances.items():
        print(f"{name:<32}{row['total_variance']:>16.4g}{row['mean_error_vs_exact_elbo_grad']:>30.4g}")
    print("(VIMCO targets the IWAE bound and the relaxation its relaxed objective: their means differ from the ELBO's by design.)")

    figure = args.out / "gradient_snr.png"
    plot(ks, table, figure)
    record = {"jax": jax.__version__, "quick": quick, "snr": {n: {str(k): v for k, v in t.items()} for n, t in table.items()}, "discrete": variances}
    (args.out / "gradient_snr.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {figure}")


if __name__ == "__main__":
    _report.run(main)
