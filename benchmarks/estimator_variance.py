r"""How far log p̂(x) lands from the exact log p(x): naive Monte Carlo versus good proposals.

Reproduces the classic picture: naive Monte Carlo (latents drawn from the prior) jumps about
and rarely lands where the likelihood is high; importance sampling with a proposal near the
posterior is steady; the exact posterior is exact.

What it measures
----------------
On tractable models from `elbojax.exact`, whose exact $\log p(x)$ is known,

* a linear Gaussian (factor analysis) with $D = 30$ observed and $d = 10$ latent dimensions,
* the Gaussian toy of Rainforth et al. (2018), $D = 20$,
* a Gaussian mixture with $C = 50$ well separated components in 10 dimensions (discrete $z$),

it estimates $\log p(x)$ for several data points drawn from the model, many times each with
independent PRNG keys, for $K$ = 1, 10, 100, 1000 (and 10000 unless `--quick`) samples:

``naive MC = IS, q = prior``
    `naive_mc_log_marginal`: $z_k \sim p(z)$, $\hat p(x) = \frac1K \sum_k p(x \mid z_k)$.
    This *is* importance sampling with the prior as proposal: the same formula and, with the
    same key, the same number (checked below the table), so one row stands for both. For the
    mixture the samples are uniform over the components (`FiniteUniform`), which is its prior.
``IS = IWAE L_K, q = mismatched``
    `importance_log_marginal` with a deliberately imperfect proposal: a diagonal Gaussian
    whose mean is the posterior's shifted by half a posterior standard deviation in every
    coordinate, with standard deviations 1.5 times the posterior's (for the mixture, the
    "defensive" mixture $\frac12 p(z \mid x) + \frac12\,\mathrm{Uniform}$). The IWAE bound
    $\mathcal L_K = \log \frac1K \sum_k w_k$ is the same number (`iwae_bound` returns it bit
    for bit, checked), so this row is also the IWAE row.
``IS, q = exact posterior``
    every weight equals $p(x)$, so the error is zero for every $K$ (up to float rounding).
``ELBO, q = mismatched``
    `elbo`, the mean log-weight $\frac1K \sum_k \log w_k$, on the same draws as the row above.
    Its bias is $-\mathrm{KL}(q \,\|\, p(z \mid x))$ whatever $K$; only its spread shrinks.

How the numbers are computed: per replicate, one `elbojax.log_weights` call draws $K_{max}$
log-weights from each proposal; the estimate at $K$ is the reduction of the first $K$ of them.
Because elbojax draws sample $k$ with `fold_in(key, k)`, that is exactly what the estimator
functions return for that key and $K$ (checked against `naive_mc_log_marginal`,
`importance_log_marginal`, `iwae_bound` and `elbo` below the table), so one jitted function
per model covers every $K$. Replicates run under `jax.lax.map` inside that `jax.jit`: on CPU
this compiled 2-3x faster and ran faster than `jax.vmap` over keys, since each replicate is
already vectorised over its samples.

How to read the table
---------------------
For data point $x_n$ and replicate $r$, ``err = estimate - log p(x_n)``, in nats.

``bias``  the mean error over all points and replicates. Negative for every estimator here:
          $\hat p(x)$ is unbiased for $p(x)$, so by Jensen $\mathbb E \log \hat p \le \log p$;
          the ELBO is a lower bound.
``std``   the spread across replicates for a fixed $x$: the root-mean over points of the
          within-point variance. This is what "the estimate jumps" means.
``rmse``  $\sqrt{\text{mean of err}^2}$, about $\sqrt{\text{bias}^2 + \text{std}^2}$.

Naive MC starts tens of nats low with a large spread, and settles only once $K$ is large
enough for a few samples to land where the posterior has its mass. The mismatched proposal's
bias and spread fall steadily, roughly as $1/K$ and $1/\sqrt K$ once $K$ is past the weights'
variance. The ELBO's bias stays put. The exact posterior gives zero error.

Figures (written to ``--out``)
------------------------------
``estimator_variance_std.png``  std (top row) and $|$bias$|$ (bottom row) of each estimator
    against $K$, log-log, one column per model, with a $1/\sqrt K$ guide.
``estimator_variance_running.png``  the running importance-sampling estimate
    $\hat p_k(x) / p(x)$ after $k$ samples, several independent runs on one data point, for
    naive MC and the mismatched proposal. Naive MC sits orders of magnitude below 1 for long
    flat stretches and jumps when a rare sample hits the high-likelihood region; the
    mismatched proposal closes in on 1 steadily.

Usage::

    python benchmarks/estimator_variance.py           # about a minute on 2 CPU cores
    python benchmarks/estimator_variance.py --quick   # or ELBOJAX_QUICK=1; well under 30 s
    python benchmarks/estimator_variance.py --x64     # float64 instead of float32
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

# Table rows, in order, and the colour each gets in the plots.
ESTIMATORS = ("naive", "mismatched", "posterior", "elbo")
COLOURS = {"naive": "tab:red", "mismatched": "tab:blue", "posterior": "tab:green", "elbo": "tab:orange"}
# The proposals that draw samples (the ELBO reuses the mismatched proposal's draws).
PROPOSALS = ("naive", "mismatched", "posterior")

# Samples drawn at once per replicate; more are reduced chunk by chunk (bounded memory).
CHUNK_SIZE = 1000

SHIFT_IN_POSTERIOR_STDS = 0.5
SCALE_INFLATION = 1.5

CHECK_SAMPLES = 100  # K for the "same numbers" checks


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    num_points: int
    num_replicates: int
    sample_counts: tuple[int, ...]
    running_samples: int
    running_runs: int


DEFAULT = Settings(
    num_points=8,
    num_replicates=48,
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


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: used as a static jit argument
class ModelSetup:
    """A tractable model with the proposals this benchmark compares on it."""

    title: str
    model: Any
    naive_sampler: Any  # what naive Monte Carlo draws from: the prior, or uniform over a finite set
    naive_label: str
    mismatched: Callable[[Any], Any]  # x -> an imperfect proposal q(z)
    mismatched_label: str

    def proposal(self, name: str, x):
        """The distribution the samples of row `name` come from, for data point `x`."""
        if name == "naive":
            return self.naive_sampler
        if name == "mismatched":
            return self.mismatched(x)
        return self.model.posterior(x)

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
    return distrax.MultivariateNormalDiag(mean + SHIFT_IN_POSTERIOR_STDS * std, SCALE_INFLATION * std)


def defensive_mixture(posterior: distrax.Categorical) -> distrax.Categorical:
    r"""$\frac12 p(z \mid x) + \frac12\,\mathrm{Uniform}$ over the components."""
    log_posterior = jax.nn.log_softmax(posterior.logits)
    log_uniform = -math.log(log_posterior.shape[-1])
    return distrax.Categorical(logits=jnp.logaddexp(log_posterior, log_uniform) - math.log(2.0))


def make_setups(key, dtype) -> list[ModelSetup]:
    """The three tractable models, each with its naive sampler and mismatched proposal."""
    key_linear, key_toy, key_mixture = jax.random.split(key, 3)
    linear = exact.LinearGaussian.random(key_linear, data_dim=30, latent_dim=10, dtype=dtype)
    toy = exact.GaussianToy.random(key_toy, dim=20, dtype=dtype)
    mixture = exact.GaussianMixture.random(key_mixture, num_components=50, dim=10, dtype=dtype)
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
            title="Gaussian mixture (C=50, D=10)",
            model=mixture,
            naive_sampler=elbojax.FiniteUniform(jnp.arange(mixture.num_components)),
            naive_label="uniform over C",
            mismatched=lambda x: defensive_mixture(mixture.posterior(x)),
            mismatched_label="1/2 posterior + 1/2 uniform",
        ),
    ]


# --------------------------------------------------------------------------------------------
# Drawing log-weights and reducing them
# --------------------------------------------------------------------------------------------


def proposal_keys(key) -> dict[str, jax.Array]:
    """One key per proposal, derived from a replicate's key."""
    return dict(zip(PROPOSALS, jax.random.split(key, len(PROPOSALS))))


def draw_log_weights(setup: ModelSetup, key, x, num_samples: int, names=PROPOSALS):
    """`log_weights` of `num_samples` draws from each named proposal: a dict of `(K,)` arrays."""
    keys = proposal_keys(key)
    return {
        name: elbojax.log_weights(
            keys[name],
            x,
            setup.model.log_joint,
            setup.proposal(name, x),
            num_samples=num_samples,
            chunk_size=min(num_samples, CHUNK_SIZE),
        )
        for name in names
    }


def log_mean_exp_of_prefixes(log_w, sample_counts):
    """$\\log \\frac1K \\sum_{k \\le K} e^{\\ell_k}$ for each K: the IS estimate from the first K draws."""
    return jnp.stack([jax.nn.logsumexp(log_w[:k]) - math.log(k) for k in sample_counts])


def mean_of_prefixes(log_w, sample_counts):
    """$\\frac1K \\sum_{k \\le K} \\ell_k$ for each K: the ELBO estimate from the first K draws."""
    return jnp.stack([jnp.mean(log_w[:k]) for k in sample_counts])


def estimates_from_draws(log_w: dict, sample_counts) -> dict[str, jax.Array]:
    """Every row's estimate at every K, from one replicate's draws: a dict of `(len(Ks),)` arrays."""
    estimates = {name: log_mean_exp_of_prefixes(log_w[name], sample_counts) for name in PROPOSALS}
    estimates["elbo"] = mean_of_prefixes(log_w["mismatched"], sample_counts)
    return estimates


@functools.partial(jax.jit, static_argnums=(0, 3))
def sweep_errors(setup: ModelSetup, keys, xs, sample_counts: tuple[int, ...]):
    """`estimate - log p(x)` for replicate keys `(N, R)` and points `(N, ...)`.

    Returns a dict of `(N, R, len(sample_counts))` arrays, one per row of the table.
    """
    num_points, num_replicates = keys.shape
    flat_keys = keys.reshape(-1)
    flat_xs = jnp.repeat(xs, num_replicates, axis=0)

    def one_replicate(key_and_x):
        key, x = key_and_x
        log_w = draw_log_weights(setup, key, x, max(sample_counts))
        exact_log_marginal = setup.model.log_marginal(x)
        estimates = estimates_from_draws(log_w, sample_counts)
        return {name: value - exact_log_marginal for name, value in estimates.items()}

    errors = jax.lax.map(one_replicate, (flat_keys, flat_xs))
    return {name: value.reshape(num_points, num_replicates, -1) for name, value in errors.items()}


def summarize_errors(errors) -> dict[str, float]:
    """bias, std (root-mean within-point variance) and RMSE of an `(N, R)` array of errors."""
    errors = np.asarray(errors, dtype=np.float64)
    return {
        "bias": float(errors.mean()),
        "std": float(np.sqrt(errors.var(axis=1, ddof=1).mean())),
        "rmse": float(np.sqrt(np.mean(errors**2))),
    }


def run_sweep(setups, key, settings: Settings, progress: bool):
    """{model title: {row: {K: stats}}}, and the data points used for each model."""
    from tqdm.auto import tqdm

    results, points = {}, {}
    with tqdm(setups, desc="sweep", unit="model", disable=not progress, dynamic_ncols=True) as bar:
        for model_index, setup in enumerate(bar):
            bar.set_postfix_str(setup.title)
            model_key = jax.random.fold_in(key, model_index)
            xs, _ = setup.model.sample(jax.random.fold_in(model_key, 0), settings.num_points)
            keys = jax.random.split(
                jax.random.fold_in(model_key, 1), (settings.num_points, settings.num_replicates)
            )
            errors = sweep_errors(setup, keys, xs, settings.sample_counts)
            results[setup.title] = {
                name: {
                    k: summarize_errors(errors[name][:, :, i])
                    for i, k in enumerate(settings.sample_counts)
                }
                for name in ESTIMATORS
            }
            points[setup.title] = xs
    return results, points


# --------------------------------------------------------------------------------------------
# Checks: the table's numbers are the estimator functions' numbers
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3))
def estimator_function_gaps(setup: ModelSetup, key, x, num_samples: int) -> dict[str, jax.Array]:
    """|difference| between elbojax's estimator functions and what the sweep computes, one key.

    Pairs that are the same reduction of the same draws should agree exactly; a prefix reduction
    against the chunked estimator may differ by float rounding.
    """
    model, keys = setup.model, proposal_keys(key)
    options = dict(num_samples=num_samples)
    q_naive, q_mismatched = setup.proposal("naive", x), setup.proposal("mismatched", x)
    naive = elbojax.naive_mc_log_marginal(keys["naive"], x, model.log_joint, q_naive, **options)
    prior_is = elbojax.importance_log_marginal(keys["naive"], x, model.log_joint, q_naive, **options)
    mismatched_is = elbojax.importance_log_marginal(
        keys["mismatched"], x, model.log_joint, q_mismatched, **options
    )
    iwae = elbojax.iwae_bound(keys["mismatched"], x, model.log_joint, q_mismatched, **options)
    elbo = elbojax.elbo(keys["mismatched"], x, model.log_joint, q_mismatched, **options)
    swept = estimates_from_draws(draw_log_weights(setup, key, x, num_samples), (num_samples,))
    return {
        "naive MC vs IS(q = sampler)": jnp.abs(naive - prior_is),
        "IWAE vs IS(q = mismatched)": jnp.abs(iwae - mismatched_is),
        "naive MC vs sweep": jnp.abs(naive - swept["naive"][0]),
        "IS(q = mismatched) vs sweep": jnp.abs(mismatched_is - swept["mismatched"][0]),
        "ELBO vs sweep": jnp.abs(elbo - swept["elbo"][0]),
    }


def format_checks(setups, key, points) -> str:
    lines = [f"Checks at K={CHECK_SAMPLES}, one key, first data point (|difference|, nats):"]
    for setup in setups:
        gaps = estimator_function_gaps(setup, key, points[setup.title][0], CHECK_SAMPLES)
        shown = ", ".join(f"{name} {float(gap):.2g}" for name, gap in gaps.items())
        lines.append(f"  {setup.title}: {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Running estimates
# --------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnums=(0, 3))
def running_log_ratios(setup: ModelSetup, keys, x, num_samples: int):
    r"""$\log(\hat p_k(x) / p(x))$ for $k = 1..K$, naive MC and mismatched IS, one row per key.

    Returns a dict of `(runs, K)` arrays, keys "naive" and "mismatched".
    """
    log_counts = jnp.log(jnp.arange(1, num_samples + 1, dtype=jnp.float32))

    def one_run(key):
        log_w = draw_log_weights(setup, key, x, num_samples, names=("naive", "mismatched"))
        shift = setup.model.log_marginal(x)
        return {name: jax.lax.cumlogsumexp(lw) - log_counts.astype(lw.dtype) - shift
                for name, lw in log_w.items()}

    return jax.lax.map(one_run, keys)


def compute_running_estimates(setups, key, points, settings: Settings):
    """{model title: dict of `(runs, K)` numpy log-ratios}, on each model's first data point."""
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
    """An aligned text table: one block per model, one line per (row, K)."""
    label_width = max(len(label) for setup in setups for label in setup.row_labels().values())
    header = f"{'estimator':<{label_width}}  {'K':>6}  {'bias':>10}  {'std':>10}  {'rmse':>10}"
    lines = []
    for setup in setups:
        lines += ["", setup.title, header, "-" * len(header)]
        for name, label in setup.row_labels().items():
            for i, k in enumerate(sample_counts):
                stats = results[setup.title][name][k]
                lines.append(
                    f"{label if i == 0 else '':<{label_width}}  {k:>6}  {stats['bias']:>+10.3g}  "
                    f"{stats['std']:>10.3g}  {stats['rmse']:>10.3g}"
                )
    return "\n".join(lines)


def plot_std_and_bias(setups, results, sample_counts, path: Path, floor: float):
    """Std (top) and |bias| (bottom) of each row against K, log-log, one column per model."""
    import matplotlib.pyplot as plt

    ks = np.asarray(sample_counts, dtype=np.float64)
    fig, axes = plt.subplots(2, len(setups), figsize=(5.4 * len(setups), 8.6), sharex=True)
    for column, setup in enumerate(setups):
        stats_by_row = results[setup.title]
        for row, (stat, ylabel) in enumerate([("std", "std of estimate (nats)"), ("bias", "|bias| (nats)")]):
            ax = axes[row, column]
            for name, label in setup.row_labels().items():
                values = np.array([abs(stats_by_row[name][k][stat]) for k in sample_counts])
                if name == "posterior":
                    label += " (0 up to rounding)"
                ax.plot(ks, np.maximum(values, floor), "o-", color=COLOURS[name], label=label, lw=1.8, ms=4)
            if stat == "std":
                start = stats_by_row["mismatched"][sample_counts[-1]]["std"] * math.sqrt(ks[-1])
                ax.plot(ks, start / np.sqrt(ks), "k:", lw=1, label=r"$\propto 1/\sqrt{K}$")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor / 3)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(setup.title, fontsize=11)
                ax.legend(fontsize=7.5, loc="lower left")
            else:
                ax.set_xlabel("number of samples K")
    fig.suptitle(
        r"Error of $\log\hat p(x)$ (ELBO: of the bound) against the exact $\log p(x)$"
        f"  (exact zeros drawn at {floor:g})",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def log_spaced_indices(length: int, count: int = 4000) -> np.ndarray:
    """About `count` distinct indices into `range(length)`, evenly spaced on a log scale."""
    return np.unique(np.geomspace(1, length, count).astype(int) - 1)


def plot_running_estimates(setups, traces, path: Path, lowest_log10: float = -12.0):
    """Running $\\hat p_k(x)/p(x)$ against k: naive MC (red) versus the mismatched proposal (blue)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(setups), figsize=(5.4 * len(setups), 4.6), sharey=True)
    for ax, setup in zip(axes, setups):
        labels = setup.row_labels()
        for name in ("naive", "mismatched"):
            runs = traces[setup.title][name]
            index = log_spaced_indices(runs.shape[1])
            for run_index, log_ratio in enumerate(runs):
                log10_ratio = np.maximum(log_ratio[index] / math.log(10.0), lowest_log10 - 1)
                ax.step(index + 1, 10.0**log10_ratio, where="post", color=COLOURS[name], alpha=0.8,
                        lw=1.3, label=labels[name] if run_index == 0 else None)
        ax.axhline(1.0, color="k", lw=0.9, ls="--", label="exact p(x)")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_ylim(10.0**lowest_log10, 1e2)
        ax.set_title(setup.title, fontsize=11)
        ax.set_xlabel("samples so far, k")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7.5, loc="lower right")
    axes[0].set_ylabel(r"running estimate $\hat p_k(x)\,/\,p(x)$")
    fig.suptitle(
        f"Running importance-sampling estimate, {len(runs)} independent runs on one data point "
        "per model: naive MC sits far below 1, then jumps",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Bias, std and RMSE of log p(x) estimators (naive MC, IS, IWAE, ELBO) on "
        "tractable models, with plots.",
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"),
                        help="directory for the PNG figures, created if needed (default: %(default)s)")
    parser.add_argument("--quick", action="store_true",
                        help="fewer replicates, K up to 1000; the same as ELBOJAX_QUICK=1")
    parser.add_argument("--x64", action="store_true", help="compute in float64 (default float32)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default: %(default)s)")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = parser.parse_args(argv)
    args.quick = args.quick or os.environ.get("ELBOJAX_QUICK", "").strip() not in ("", "0")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    # Before any array is created, so that every model and sample has the chosen precision.
    jax.config.update("jax_enable_x64", args.x64)
    dtype = jnp.float64 if args.x64 else jnp.float32

    import matplotlib

    matplotlib.use("Agg")

    started = time.perf_counter()
    settings = QUICK if args.quick else DEFAULT
    key_models, key_sweep, key_checks, key_running = jax.random.split(jax.random.key(args.seed), 4)
    setups = make_setups(key_models, dtype)

    print(
        f"{'quick' if args.quick else 'default'} run, {jnp.dtype(dtype).name} on "
        f"{jax.default_backend()}: {settings.num_points} data points x {settings.num_replicates} "
        f"replicates per model; err = estimate - exact log p(x), nats"
    )
    results, points = run_sweep(setups, key_sweep, settings, progress=not args.no_progress)
    print(format_table(setups, results, settings.sample_counts))
    print()
    print(format_checks(setups, key_checks, points))
    worst = max(results[s.title]["posterior"][k]["rmse"] for s in setups for k in settings.sample_counts)
    print(f"Exact posterior: largest RMSE {worst:.2g} nats, i.e. zero up to float rounding.")

    traces = compute_running_estimates(setups, key_running, points, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    std_path = args.out / "estimator_variance_std.png"
    running_path = args.out / "estimator_variance_running.png"
    plot_std_and_bias(setups, results, settings.sample_counts, std_path, floor=1e-13 if args.x64 else 1e-7)
    plot_running_estimates(setups, traces, running_path)
    print("\nWrote:")
    print(f"  {std_path}")
    print(f"  {running_path}")
    print(f"Total {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    main()
