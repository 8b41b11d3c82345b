r"""How far log p̂(x) lands from the exact log p(x): naive Monte Carlo versus good proposals.

This script reproduces the classic picture: naive Monte Carlo (latents drawn from the prior)
jumps about and rarely lands where the likelihood is high, while importance sampling with a
proposal near the posterior is steady.

What it measures
----------------
On tractable models from `elbojax.exact`, whose exact $\log p(x)$ is known,

* linear Gaussian (factor analysis), $D = 30$ observed, $d = 10$ latent dimensions;
* the Gaussian toy of Rainforth et al. (2018), $D = 20$;
* a Gaussian mixture with $C = 100$ well separated components in 10 dimensions (discrete $z$),

it estimates $\log p(x)$ for several data points drawn from the model, many times each with
independent PRNG keys (`jax.vmap` over keys and points, one `jax.jit` per model and $K$), for
$K$ = 1, 10, 100, 1000 (and 10000 unless `--quick`) samples, with:

``naive MC = IS, q = prior``
    `naive_mc_log_marginal`: $z_k \sim p(z)$, $\hat p(x) = \frac1K \sum_k p(x \mid z_k)$.
    This is importance sampling with the prior as proposal, the same formula and, given the
    same key, the same number (the script checks this), so one row stands for both. For the
    mixture, $z_k$ is uniform over the components (`FiniteUniform`), which is its prior.
``IS = IWAE L_K, q = mismatched``
    `importance_log_marginal` with a deliberately imperfect proposal: a diagonal Gaussian with
    the posterior's mean shifted by half a posterior standard deviation in every coordinate
    and its standard deviations inflated 1.5 times (for the mixture, the "defensive" mixture
    $\frac12 p(z \mid x) + \frac12\,\mathrm{Uniform}$). The IWAE bound
    $\mathcal L_K = \log \frac1K \sum_k w_k$ is the same number (the script checks that
    `iwae_bound` returns it bit for bit), so this row is also the IWAE row.
``IS, q = exact posterior``
    every weight equals $p(x)$, so the error is zero for every $K$ (up to float rounding).
``ELBO, q = mismatched``
    `elbo`, the mean log-weight $\frac1K \sum_k \log w_k$ with the mismatched proposal. Its
    bias is $-\mathrm{KL}(q \,\|\, p(z \mid x))$ whatever $K$; only its spread shrinks.

How to read the table
---------------------
For each data point $x_n$ and replicate $r$, ``err = estimate - log p(x_n)`` (in nats).

``bias``  the mean error over all points and replicates. Negative for every estimator here:
          $\hat p(x)$ is unbiased for $p(x)$, so by Jensen $\mathbb E \log \hat p \le \log p$,
          and the ELBO is a lower bound.
``std``   the spread across replicates for a fixed $x$: the root-mean over points of the
          within-point variance. This is what "the estimate jumps" means.
``rmse``  $\sqrt{\text{mean err}^2}$, about $\sqrt{\text{bias}^2 + \text{std}^2}$.

Naive MC starts with a bias of tens of nats and a large spread, and only settles once $K$ is
large enough that a few samples land in the posterior's high-likelihood region (for the toy,
not even at $K = 10^4$). The mismatched proposal's bias and spread fall steadily, roughly as
$1/K$ and $1/\sqrt K$. The exact posterior gives zero error.

Figures (written to ``--out``)
------------------------------
``estimator_variance_std.png``  std (top row) and $|$bias$|$ (bottom row) against $K$,
    log-log, one panel per model, with a $1/\sqrt K$ guide.
``estimator_variance_running.png``  the running importance-sampling estimate
    $\hat p_k(x) / p(x)$ after $k$ samples, several independent runs, for naive MC and the
    mismatched proposal. Naive MC sits far below 1 for long flat stretches and then jumps
    when a rare sample hits the high-likelihood region; the good proposal hugs 1.

Usage::

    python benchmarks/estimator_variance.py             # about a minute on 2 CPU cores
    python benchmarks/estimator_variance.py --quick     # or ELBOJAX_QUICK=1; well under 30 s
    python benchmarks/estimator_variance.py --x64       # float64 instead of float32
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import numpy as np

import elbojax
from elbojax import exact

# Row keys, in table and legend order, with the colour each gets in the plots.
ESTIMATORS = ("naive", "mismatched", "posterior", "elbo")
COLOURS = {"naive": "tab:red", "mismatched": "tab:blue", "posterior": "tab:green", "elbo": "tab:orange"}

# Samples drawn at once per replicate; larger K is reduced chunk by chunk (bounded memory).
CHUNK_SIZE = 1000

SHIFT_IN_POSTERIOR_STDS = 0.5
SCALE_INFLATION = 1.5


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run of the sweep."""

    num_points: int
    num_replicates: int
    sample_counts: tuple[int, ...]
    running_samples: int
    running_runs: int


DEFAULT = Settings(
    num_points=8,
    num_replicates=128,
    sample_counts=(1, 10, 100, 1000, 10000),
    running_samples=100_000,
    running_runs=4,
)
QUICK = Settings(
    num_points=4,
    num_replicates=32,
    sample_counts=(1, 10, 100, 1000),
    running_samples=10_000,
    running_runs=3,
)


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a static jit argument
class ModelSetup:
    """A tractable model with the proposals this benchmark compares on it."""

    title: str
    model: Any
    naive_sampler: Any  # the distribution naive Monte Carlo draws from (prior or uniform)
    naive_label: str
    mismatched: Callable[[Any], Any]  # x -> an imperfect proposal q(z)
    mismatched_label: str

    def row_labels(self) -> dict[str, str]:
        return {
            "naive": f"naive MC = IS, q = {self.naive_label}",
            "mismatched": f"IS = IWAE L_K, q = {self.mismatched_label}",
            "posterior": "IS, q = exact posterior",
            "elbo": f"ELBO, q = {self.mismatched_label}",
        }


# --------------------------------------------------------------------------------------------
# Models and proposals
# --------------------------------------------------------------------------------------------


def shifted_inflated_gaussian(posterior) -> distrax.Distribution:
    """A diagonal Gaussian near `posterior`: mean shifted by half a std, stds inflated 1.5x."""
    mean, std = posterior.mean(), posterior.stddev()
    return distrax.MultivariateNormalDiag(
        mean + SHIFT_IN_POSTERIOR_STDS * std, SCALE_INFLATION * std
    )


def defensive_mixture(posterior: distrax.Categorical) -> distrax.Categorical:
    r"""$\frac12 p(z \mid x) + \frac12\,\mathrm{Uniform}$ over the components."""
    log_posterior = jax.nn.log_softmax(posterior.logits)
    log_uniform = -jnp.log(log_posterior.shape[-1]).astype(log_posterior.dtype)
    return distrax.Categorical(logits=jnp.logaddexp(log_posterior, log_uniform) - jnp.log(2.0))


def make_setups(key, dtype) -> list[ModelSetup]:
    """The three tractable models, each with its naive sampler and mismatched proposal."""
    key_linear, key_toy, key_mixture = jax.random.split(key, 3)
    linear = exact.LinearGaussian.random(key_linear, data_dim=30, latent_dim=10, dtype=dtype)
    toy = exact.GaussianToy.random(key_toy, dim=20, dtype=dtype)
    mixture = exact.GaussianMixture.random(key_mixture, num_components=100, dim=10, dtype=dtype)
    gaussian_label = "shifted, inflated diag N"
    return [
        ModelSetup(
            title="linear Gaussian (D=30, d=10)",
            model=linear,
            naive_sampler=linear.prior,
            naive_label="prior",
            mismatched=lambda x: shifted_inflated_gaussian(linear.posterior(x)),
            mismatched_label=gaussian_label,
        ),
        ModelSetup(
            title="Gaussian toy (Rainforth et al., D=20)",
            model=toy,
            naive_sampler=toy.prior,
            naive_label="prior",
            mismatched=lambda x: shifted_inflated_gaussian(toy.posterior(x)),
            mismatched_label=gaussian_label,
        ),
        ModelSetup(
            title="Gaussian mixture (C=100, D=10)",
            model=mixture,
            naive_sampler=elbojax.FiniteUniform(jnp.arange(mixture.num_components)),
            naive_label="uniform over C",
            mismatched=lambda x: defensive_mixture(mixture.posterior(x)),
            mismatched_label="1/2 posterior + 1/2 uniform",
        ),
    ]


# --------------------------------------------------------------------------------------------
# The sweep
# --------------------------------------------------------------------------------------------


def estimate_once(setup: ModelSetup, key, x, num_samples: int) -> dict[str, jax.Array]:
    """Every estimator's value for one data point and one key (one scalar each)."""
    model = setup.model
    options = dict(num_samples=num_samples, chunk_size=min(num_samples, CHUNK_SIZE))
    key_naive, key_mismatched, key_posterior, key_elbo = jax.random.split(key, 4)
    return {
        "naive": elbojax.naive_mc_log_marginal(
            key_naive, x, model.log_joint, setup.naive_sampler, **options
        ),
        "mismatched": elbojax.importance_log_marginal(
            key_mismatched, x, model.log_joint, setup.mismatched(x), **options
        ),
        "posterior": elbojax.importance_log_marginal(
            key_posterior, x, model.log_joint, model.posterior(x), **options
        ),
        "elbo": elbojax.elbo(key_elbo, x, model.log_joint, setup.mismatched(x), **options),
    }


@functools.partial(jax.jit, static_argnums=(0, 3))
def errors_for_sample_count(setup: ModelSetup, keys, xs, num_samples: int):
    """`estimate - log p(x)` for keys `(N, R)` and points `(N, ...)`: a dict of `(N, R)` arrays."""

    def replicates_for_point(point_keys, x):
        return jax.vmap(lambda key: estimate_once(setup, key, x, num_samples))(point_keys)

    estimates = jax.vmap(replicates_for_point)(keys, xs)
    exact_log_marginal = jax.vmap(setup.model.log_marginal)(xs)
    return {name: value - exact_log_marginal[:, None] for name, value in estimates.items()}


def summarize_errors(errors) -> dict[str, float]:
    """bias, std (root-mean within-point variance) and RMSE of an `(N, R)` array of errors."""
    errors = np.asarray(errors, dtype=np.float64)
    return {
        "bias": float(errors.mean()),
        "std": float(np.sqrt(errors.var(axis=1, ddof=1).mean())),
        "rmse": float(np.sqrt(np.mean(errors**2))),
    }


def run_sweep(setups, key, settings: Settings, progress: bool):
    """{model title: {estimator: {K: stats}}}, and the data points used for each model."""
    from tqdm.auto import tqdm

    results = {setup.title: {name: {} for name in ESTIMATORS} for setup in setups}
    points = {}
    steps = [(setup, k) for setup in setups for k in settings.sample_counts]
    bar = tqdm(steps, desc="sweep", unit="step", disable=not progress, dynamic_ncols=True)
    for model_index, setup in enumerate(setups):
        model_key = jax.random.fold_in(key, model_index)
        xs, _ = setup.model.sample(jax.random.fold_in(model_key, 0), settings.num_points)
        points[setup.title] = xs
        shape = (settings.num_points, settings.num_replicates)
        for num_samples in settings.sample_counts:
            bar.set_postfix_str(f"{setup.title.split(' (')[0]}, K={num_samples}")
            keys = jax.random.split(jax.random.fold_in(model_key, num_samples), shape)
            errors = errors_for_sample_count(setup, keys, xs, num_samples)
            for name, value in errors.items():
                results[setup.title][name][num_samples] = summarize_errors(value)
            bar.update()
    bar.close()
    return results, points


# --------------------------------------------------------------------------------------------
# Consistency checks: "same maths" rows really are the same numbers
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3))
def identity_gaps(setup: ModelSetup, key, xs, num_samples: int):
    """Largest |difference| of naive MC vs IS(q = its sampler), and IWAE vs IS(q = mismatched).

    Both pairs share keys, so they should agree exactly (one reduction computes both).
    """
    model = setup.model

    def gaps_for_point(point_key, x):
        options = dict(num_samples=num_samples)
        q = setup.mismatched(x)
        naive = elbojax.naive_mc_log_marginal(point_key, x, model.log_joint, setup.naive_sampler, **options)
        prior_is = elbojax.importance_log_marginal(
            point_key, x, model.log_joint, setup.naive_sampler, **options
        )
        iwae = elbojax.iwae_bound(point_key, x, model.log_joint, q, **options)
        mismatched_is = elbojax.importance_log_marginal(point_key, x, model.log_joint, q, **options)
        return jnp.abs(naive - prior_is), jnp.abs(iwae - mismatched_is)

    keys = jax.random.split(key, xs.shape[0])
    naive_gap, iwae_gap = jax.vmap(gaps_for_point)(keys, xs)
    return jnp.max(naive_gap), jnp.max(iwae_gap)


# --------------------------------------------------------------------------------------------
# Running estimates
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3))
def running_log_ratios(setup: ModelSetup, keys, x, num_samples: int):
    r"""$\log(\hat p_k(x) / p(x))$ for $k = 1..K$, naive MC and mismatched IS, one row per key.

    Returns a dict of `(runs, K)` arrays, keys "naive" and "mismatched".
    """
    model = setup.model
    counts = jnp.arange(1, num_samples + 1, dtype=x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else float)
    chunk_size = min(num_samples, CHUNK_SIZE)

    def running(key, proposal):
        log_w = elbojax.log_weights(
            key, x, model.log_joint, proposal, num_samples=num_samples, chunk_size=chunk_size
        )
        return jax.lax.cumlogsumexp(log_w) - jnp.log(counts) - model.log_marginal(x)

    return {
        "naive": jax.vmap(lambda key: running(key, setup.naive_sampler))(keys),
        "mismatched": jax.vmap(lambda key: running(key, setup.mismatched(x)))(keys),
    }


def compute_running_estimates(setups, key, points, settings: Settings):
    """{model title: dict of `(runs, K)` numpy log-ratios}, for each model's first data point."""
    traces = {}
    for model_index, setup in enumerate(setups):
        keys = jax.random.split(jax.random.fold_in(key, model_index), settings.running_runs)
        ratios = running_log_ratios(setup, keys, points[setup.title][0], settings.running_samples)
        traces[setup.title] = {name: np.asarray(value, np.float64) for name, value in ratios.items()}
    return traces


# --------------------------------------------------------------------------------------------
# Output: table and figures
# --------------------------------------------------------------------------------------------


def format_table(setups, results, sample_counts) -> str:
    """An aligned text table: one block per model, one line per (estimator, K)."""
    label_width = max(len(label) for setup in setups for label in setup.row_labels().values())
    header = f"{'estimator':<{label_width}}  {'K':>6}  {'bias':>10}  {'std':>10}  {'rmse':>10}"
    lines = []
    for setup in setups:
        lines += ["", setup.title, header, "-" * len(header)]
        for name, label in setup.row_labels().items():
            for i, k in enumerate(sample_counts):
                stats = results[setup.title][name][k]
                shown = label if i == 0 else ""
                lines.append(
                    f"{shown:<{label_width}}  {k:>6}  {stats['bias']:>+10.3g}  "
                    f"{stats['std']:>10.3g}  {stats['rmse']:>10.3g}"
                )
    return "\n".join(lines)


def plottable(values, floor):
    """Values for a log axis: exact zeros (e.g. the posterior's error) drawn at `floor`."""
    return np.maximum(np.asarray(values, dtype=np.float64), floor)


def plot_std_and_bias(setups, results, sample_counts, path: Path, floor: float):
    """Std (top) and |bias| (bottom) of each estimator against K, log-log, one column per model."""
    import matplotlib.pyplot as plt

    ks = np.asarray(sample_counts, dtype=np.float64)
    fig, axes = plt.subplots(2, len(setups), figsize=(5.2 * len(setups), 8.4), sharex=True)
    for column, setup in enumerate(setups):
        for row, (stat, ylabel) in enumerate([("std", "std of estimate (nats)"), ("bias", "|bias| (nats)")]):
            ax = axes[row, column]
            for name, label in setup.row_labels().items():
                values = [abs(results[setup.title][name][k][stat]) for k in sample_counts]
                ax.plot(ks, plottable(values, floor), "o-", color=COLOURS[name], label=label, lw=1.8, ms=4)
            if stat == "std":
                start = results[setup.title]["mismatched"][sample_counts[0]]["std"]
                ax.plot(ks, start / np.sqrt(ks), "k:", lw=1, label=r"$\propto 1/\sqrt{K}$")
            ax.axhline(floor, color="0.6", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.grid(True, which="major", alpha=0.3)
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(setup.title, fontsize=11)
                ax.legend(fontsize=7.5, loc="lower left")
            else:
                ax.set_xlabel("number of samples K")
    fig.suptitle(
        r"Error of $\log\hat p(x)$ (ELBO: of the bound) against the exact $\log p(x)$; "
        f"grey line: {floor:g} = exact zero",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def log_spaced_indices(length: int, count: int = 4000) -> np.ndarray:
    """About `count` indices into `range(length)`, dense at the start, every one near jumps kept."""
    return np.unique(np.geomspace(1, length, count).astype(int) - 1)


def plot_running_estimates(setups, traces, path: Path):
    """Running $\\hat p_k(x)/p(x)$ against k: naive MC (red) vs the mismatched proposal (blue)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(setups), figsize=(5.2 * len(setups), 4.4), sharey=True)
    lowest = -12.0  # plot floor, in log10 of the ratio
    for ax, setup in zip(axes, setups):
        labels = setup.row_labels()
        for name in ("naive", "mismatched"):
            runs = traces[setup.title][name]
            index = log_spaced_indices(runs.shape[1])
            for run_index, log_ratio in enumerate(runs):
                log10_ratio = np.maximum(log_ratio[index] / math.log(10.0), lowest - 1)
                ax.step(
                    index + 1,
                    10.0**log10_ratio,
                    where="post",
                    color=COLOURS[name],
                    alpha=0.85,
                    lw=1.3,
                    label=labels[name] if run_index == 0 else None,
                )
        ax.axhline(1.0, color="k", lw=0.8, ls="--", label="exact p(x)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(10.0**lowest, 1e2)
        ax.set_title(setup.title, fontsize=11)
        ax.set_xlabel("samples so far, k")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    axes[0].set_ylabel(r"running estimate $\hat p_k(x)\,/\,p(x)$")
    fig.suptitle(
        "Running importance-sampling estimate, several independent runs on one data point: "
        "naive MC sits far below 1, then jumps",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bias, std and RMSE of log p(x) estimators (naive MC, IS, ELBO, IWAE) "
        "on tractable models, with plots.",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="directory for the PNG figures (created if needed)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer replicates, K up to 1000 (also: ELBOJAX_QUICK=1)")
    parser.add_argument("--x64", action="store_true", help="compute in float64 (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    args.quick = args.quick or os.environ.get("ELBOJAX_QUICK", "").strip() not in ("", "0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Before any array is created: every model and sample then has the chosen precision.
    jax.config.update("jax_enable_x64", args.x64)
    dtype = jnp.float64 if args.x64 else jnp.float32

    import matplotlib

    matplotlib.use("Agg")

    started = time.perf_counter()
    settings = QUICK if args.quick else DEFAULT
    key = jax.random.key(args.seed)
    key_models, key_sweep, key_checks, key_running = jax.random.split(key, 4)
    setups = make_setups(key_models, dtype)

    print(
        f"{'quick' if args.quick else 'default'} run, {jnp.dtype(dtype).name}, "
        f"backend {jax.default_backend()}: {settings.num_points} data points x "
        f"{settings.num_replicates} replicates per model and K"
    )
    results, points = run_sweep(setups, key_sweep, settings, progress=not args.no_progress)
    print(format_table(setups, results, settings.sample_counts))

    print("\nSame-maths checks (shared keys, K=100), max |difference| over data points:")
    for setup in setups:
        naive_gap, iwae_gap = identity_gaps(setup, key_checks, points[setup.title], 100)
        print(f"  {setup.title:<40} naive MC vs IS(q = {setup.naive_label}): {float(naive_gap):.3g}"
              f"   IWAE vs IS(q = mismatched): {float(iwae_gap):.3g}")

    worst_posterior_error = max(
        results[setup.title]["posterior"][k]["rmse"] for setup in setups for k in settings.sample_counts
    )
    print(f"Exact posterior: largest RMSE {worst_posterior_error:.3g} nats (zero up to float rounding).")

    traces = compute_running_estimates(setups, key_running, points, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    std_path = args.out / "estimator_variance_std.png"
    running_path = args.out / "estimator_variance_running.png"
    floor = 1e-12 if args.x64 else 1e-7
    plot_std_and_bias(setups, results, settings.sample_counts, std_path, floor)
    plot_running_estimates(setups, traces, running_path)
    print("\nWrote:")
    print(f"  {std_path}")
    print(f"  {running_path}")
    print(f"Total time {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    main()
