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
    whose mean is the posterior's shifted by a quarter of a posterior standard deviation in
    every coordinate, with standard deviations 1.2 times the posterior's (for the mixture, the
    "defensive" mixture $\frac12 p(z \mid x) + \frac12\,\mathrm{Uniform}$). The IWAE bound
    $\mathcal L_K = \log \frac1K \sum_k w_k$ is the same number (`iwae_bound` returns it bit
    for bit, checked), so this row is also the IWAE row.
``IS, q = exact posterior``
    every weight equals $p(x)$, so the error is zero for every $K$ (up to float rounding).
``ELBO, q = mismatched``
    `elbo`, the mean log-weight $\frac1K \sum_k \log w_k$, on the same draws as the row above
    (so at $K = 1$ the two rows coincide: both are the one log-weight). Its bias is
    $-\mathrm{KL}(q \,\|\, p(z \mid x))$ whatever $K$; only its spread shrinks.

How the numbers are computed: per replicate, one `elbojax.log_weights` call draws $K_{max}$
log-weights from each proposal; the estimate at $K$ is the reduction of the first $K$ of them.
Because elbojax draws sample $k$ with `fold_in(key, k)`, that is exactly what the estimator
functions return for that key and $K$ (checked against `naive_mc_log_marginal`,
`importance_log_marginal`, `iwae_bound` and `elbo` below the table), so one jitted function
per model covers every $K$ (the estimates at different $K$ share draws, so they are
correlated across $K$, each still distributed exactly as the estimator at that $K$).
Replicates run under `jax.lax.map` inside that `jax.jit`: on CPU this compiled up to 3x
faster, and ran faster, than `jax.vmap` over keys, since each replicate is already vectorised
over its samples. Compiling is most of a `--quick` run, so the three models' functions are
compiled side by side in threads (XLA compiles outside Python's global lock).

How to read the table
---------------------
For data point $x_n$ and replicate $r$, ``err = estimate - log p(x_n)``, in nats.

``bias``  the mean error over all points and replicates. Negative in expectation for every
          estimator here: $\hat p(x)$ is unbiased for $p(x)$, so by Jensen
          $\mathbb E \log \hat p \le \log p$; the ELBO is a lower bound. (A tiny positive
          value is sampling noise.)
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
    naive MC and the mismatched proposal (the first replicates of the table's first data
    point). Naive MC sits orders of magnitude below 1 for long stretches, where the running
    mean only decays like $1/k$, and jumps when a rare sample hits the high-likelihood
    region; the mismatched proposal closes in on 1 steadily.

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
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import distrax
import jax
import jax.numpy as jnp
import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np
from tqdm.auto import tqdm

import _report
import elbojax
from elbojax import exact

# Table rows, in order, and the colour each gets in the plots.
ESTIMATORS = ("naive", "mismatched", "posterior", "elbo")
COLOURS = {
    "naive": "tab:red", "mismatched": "tab:blue", "posterior": "tab:green", "elbo": "tab:orange"
}
# The proposals that draw samples (the ELBO reuses the mismatched proposal's draws).
PROPOSALS = ("naive", "mismatched", "posterior")

# Samples drawn at once per replicate; more are reduced chunk by chunk (bounded memory).
CHUNK_SIZE = 1000

# The mismatched Gaussian proposal. Inflating the scale keeps the weights' variance finite
# (it needs q's variance above half the posterior's), so IS still converges at the usual rate.
SHIFT_IN_POSTERIOR_STDS = 0.25
SCALE_INFLATION = 1.2

CHECK_SAMPLES = 100  # K for the "same numbers" checks


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes of one run."""

    num_points: int
    num_replicates: int
    sample_counts: tuple[int, ...]
    running_runs: int  # replicates of the first data point drawn in the running-estimate figure


DEFAULT = Settings(
    num_points=8,
    num_replicates=48,
    sample_counts=(1, 10, 100, 1000, 10000),
    running_runs=4,
)
QUICK = Settings(
    num_points=4,
    num_replicates=32,
    sample_counts=(1, 10, 100, 1000),
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
    """A diagonal Gaussian near `posterior`: mean shifted by a quarter std, stds inflated 1.2x."""
    mean, std = posterior.mean(), posterior.stddev()
    shifted_mean = mean + SHIFT_IN_POSTERIOR_STDS * std
    return distrax.MultivariateNormalDiag(shifted_mean, SCALE_INFLATION * std)


def defensive_mixture(posterior: distrax.Categorical) -> distrax.Categorical:
    r"""$\frac12 p(z \mid x) + \frac12\,\mathrm{Uniform}$ over the components."""
    log_posterior = jax.nn.log_softmax(posterior.logits)
    log_uniform = -math.log(log_posterior.shape[-1])
    return distrax.Categorical(logits=jnp.logaddexp(log_posterior, log_uniform) - math.log(2.0))


@functools.partial(jax.jit, static_argnums=1)
def draw_models(key, dtype):
    """The three models' parameters (one compiled call rather than many small eager ones)."""
    key_linear, key_toy, key_mixture = jax.random.split(key, 3)
    return (
        exact.LinearGaussian.random(key_linear, data_dim=30, latent_dim=10, dtype=dtype),
        exact.GaussianToy.random(key_toy, dim=20, dtype=dtype),
        exact.GaussianMixture.random(key_mixture, num_components=50, dim=10, dtype=dtype),
    )


def make_setups(key, dtype) -> list[ModelSetup]:
    """The three tractable models, each with its naive sampler and mismatched proposal."""
    linear, toy, mixture = draw_models(key, dtype)
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


def draw_log_weights(setup: ModelSetup, key, x, num_samples: int) -> dict[str, jax.Array]:
    """`log_weights` of `num_samples` draws from each proposal: a dict of `(K,)` arrays."""
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
        for name in PROPOSALS
    }


def log_mean_exp_of_prefixes(log_w, sample_counts):
    r"""$\log \frac1K \sum_{k \le K} e^{\ell_k}$ for each K: IS from the first K draws."""
    return jnp.stack([jax.nn.logsumexp(log_w[:k]) - math.log(k) for k in sample_counts])


def mean_of_prefixes(log_w, sample_counts):
    r"""$\frac1K \sum_{k \le K} \ell_k$ for each K: the ELBO from the first K draws."""
    return jnp.stack([jnp.mean(log_w[:k]) for k in sample_counts])


def estimates_from_draws(log_w: dict, sample_counts) -> dict[str, jax.Array]:
    """Every row's estimate at every K from one replicate's draws: `(len(Ks),)` arrays."""
    estimates = {name: log_mean_exp_of_prefixes(log_w[name], sample_counts) for name in PROPOSALS}
    estimates["elbo"] = mean_of_prefixes(log_w["mismatched"], sample_counts)
    return estimates


def running_log_mean_exp(log_w):
    r"""$\log \frac1k \sum_{j \le k} e^{\ell_j}$ for every k: the running IS estimate."""
    counts = jnp.arange(1, log_w.shape[0] + 1, dtype=log_w.dtype)
    return jax.lax.cumlogsumexp(log_w) - jnp.log(counts)


def estimator_function_errors(setup: ModelSetup, key, x, num_samples: int) -> dict:
    """`estimate - log p(x)` from elbojax's estimator functions themselves, for one key.

    With the same key and K these must reproduce the sweep's numbers (which reduce the first K of
    `log_weights`), and the pairs that are the same maths must agree exactly.
    """
    model, keys = setup.model, proposal_keys(key)
    options = dict(num_samples=num_samples)
    q_naive, q_mismatched = setup.proposal("naive", x), setup.proposal("mismatched", x)
    values = {
        "naive MC": elbojax.naive_mc_log_marginal(
            keys["naive"], x, model.log_joint, q_naive, **options
        ),
        "IS(q = naive sampler)": elbojax.importance_log_marginal(
            keys["naive"], x, model.log_joint, q_naive, **options
        ),
        "IS(q = mismatched)": elbojax.importance_log_marginal(
            keys["mismatched"], x, model.log_joint, q_mismatched, **options
        ),
        "IWAE(q = mismatched)": elbojax.iwae_bound(
            keys["mismatched"], x, model.log_joint, q_mismatched, **options
        ),
        "ELBO(q = mismatched)": elbojax.elbo(
            keys["mismatched"], x, model.log_joint, q_mismatched, **options
        ),
    }
    exact_log_marginal = model.log_marginal(x)
    return {name: value - exact_log_marginal for name, value in values.items()}


@functools.partial(jax.jit, static_argnums=(0, 2, 3, 4))
def study_model(
    setup: ModelSetup, key, num_points: int, num_replicates: int, sample_counts: tuple[int, ...]
):
    r"""Everything measured on one model, in one compiled function.

    Draws `num_points` data points from the model and, for each, `num_replicates` independent
    replicates of every estimator at every K in `sample_counts` (which must include
    `CHECK_SAMPLES`).

    Returns:
      `(errors, running, check_errors)`: `errors[row]` of shape `(N, R, len(sample_counts))`
      holds `estimate - log p(x)`; `running[name]` of shape `(R, K_max)` holds
      $\log(\hat p_k(x_0)/p(x_0))$ after each sample k for the first data point's replicates
      ("naive" and "mismatched"); `check_errors` holds the estimator functions' errors for the
      first replicate at K = `CHECK_SAMPLES` (see `estimator_function_errors`).
    """
    key_points, key_replicates = jax.random.split(key)
    xs, _ = setup.model.sample(key_points, num_points)
    keys = jax.random.split(key_replicates, (num_points, num_replicates))
    max_samples = max(sample_counts)

    def one_replicate(key_and_x):
        key, x = key_and_x
        log_w = draw_log_weights(setup, key, x, max_samples)
        exact_log_marginal = setup.model.log_marginal(x)
        errors = {
            name: value - exact_log_marginal
            for name, value in estimates_from_draws(log_w, sample_counts).items()
        }
        running = {
            name: running_log_mean_exp(log_w[name]) - exact_log_marginal
            for name in ("naive", "mismatched")
        }
        return errors, running

    flat_xs = jnp.repeat(xs, num_replicates, axis=0)
    errors, running = jax.lax.map(one_replicate, (keys.reshape(-1), flat_xs))
    errors = {name: value.reshape(num_points, num_replicates, -1) for name, value in errors.items()}
    running = {name: value[:num_replicates] for name, value in running.items()}
    check_errors = estimator_function_errors(setup, keys[0, 0], xs[0], CHECK_SAMPLES)
    return errors, running, check_errors


def summarize_errors(errors) -> dict[str, float]:
    """bias, std (root-mean within-point variance) and RMSE of an `(N, R)` array of errors."""
    errors = np.asarray(errors, dtype=np.float64)
    return {
        "bias": float(errors.mean()),
        "std": float(np.sqrt(errors.var(axis=1, ddof=1).mean())),
        "rmse": float(np.sqrt(np.mean(errors**2))),
    }


def check_gaps(errors, check_errors, sample_counts) -> dict[str, float]:
    """|differences| that must be 0: same-maths pairs, and estimator functions vs the sweep."""
    at_check = sample_counts.index(CHECK_SAMPLES)
    swept = {name: float(errors[name][0, 0, at_check]) for name in ESTIMATORS}
    direct = {name: float(value) for name, value in check_errors.items()}
    pairs = {
        "naive MC vs IS(q = naive sampler)": (direct["naive MC"], direct["IS(q = naive sampler)"]),
        "IWAE vs IS(q = mismatched)": (
            direct["IWAE(q = mismatched)"], direct["IS(q = mismatched)"]
        ),
        "naive MC vs table": (direct["naive MC"], swept["naive"]),
        "IS(q = mismatched) vs table": (direct["IS(q = mismatched)"], swept["mismatched"]),
        "ELBO vs table": (direct["ELBO(q = mismatched)"], swept["elbo"]),
    }
    return {name: abs(a - b) for name, (a, b) in pairs.items()}


@dataclasses.dataclass
class ModelStudy:
    """What `study_model` measured on one model, summarised on the host."""

    stats: dict  # {row: {K: {"bias", "std", "rmse"}}}
    running: dict  # {"naive" | "mismatched": (runs, K_max) numpy log-ratios}
    gaps: dict  # {check: |difference|}


def compile_studies(setups, keys, settings: Settings, on_done: Callable[[], None]):
    """`study_model` compiled for every model, the compilations running side by side.

    XLA compiles outside Python's global lock, and compiling, not running, is most of a
    `--quick` run, so overlapping the three compilations saves time on a multi-core machine.
    """

    def compile_one(setup, key):
        shape_args = (settings.num_points, settings.num_replicates, settings.sample_counts)
        compiled = study_model.lower(setup, key, *shape_args).compile()
        on_done()
        return compiled

    with ThreadPoolExecutor(max_workers=len(setups)) as pool:
        futures = [pool.submit(compile_one, setup, key) for setup, key in zip(setups, keys)]
        return [future.result() for future in futures]


def summarize_study(errors, running, check_errors, settings: Settings) -> ModelStudy:
    """Host-side summary of one model's `study_model` outputs."""
    errors = {name: np.asarray(value) for name, value in errors.items()}
    stats = {
        name: {
            k: summarize_errors(errors[name][:, :, i]) for i, k in enumerate(settings.sample_counts)
        }
        for name in ESTIMATORS
    }
    first_runs = {
        name: np.asarray(value[: settings.running_runs], np.float64)
        for name, value in running.items()
    }
    gaps = check_gaps(errors, check_errors, settings.sample_counts)
    return ModelStudy(stats=stats, running=first_runs, gaps=gaps)


def run_studies(setups, key, settings: Settings, progress: bool) -> dict[str, ModelStudy]:
    """Compile and run `study_model` on every model, with a progress bar."""
    keys = jax.random.split(key, len(setups))
    total = 2 * len(setups)
    with tqdm(total=total, desc="compile, run", disable=not progress, dynamic_ncols=True) as bar:
        bar.set_postfix_str("compiling all models")
        compiled = compile_studies(setups, keys, settings, on_done=lambda: bar.update())
        studies = {}
        for setup, study, model_key in zip(setups, compiled, keys):
            bar.set_postfix_str(f"running {setup.title}")
            studies[setup.title] = summarize_study(*study(model_key), settings)
            bar.update()
    return studies


# What "zero up to float rounding" may be, in nats, for log p(x) of the size of these models' (tens of nats).
ROUNDING = {"float32": 1e-3, "float64": 1e-9}


def check_results(setups, studies, worst_posterior_rmse: float, tolerance: float) -> None:
    """Fail (exit status 1, after the tables) where a check that must be 0 is not."""
    failed = [f"{setup.title}: {name} {gap:.3g}" for setup in setups
              for name, gap in studies[setup.title].gaps.items() if not gap <= tolerance]
    if not worst_posterior_rmse <= tolerance:
        failed.append(f"exact posterior: largest RMSE {worst_posterior_rmse:.3g}")
    if failed:
        raise SystemExit(f"FAILED: above float rounding ({tolerance:g} nats): " + "; ".join(failed))


def format_checks(setups, studies) -> str:
    lines = [
        f"Checks, first replicate at K={CHECK_SAMPLES}: |difference| of estimator functions that "
        "are the same maths, and of each function against its table entry (0, or float "
        "rounding where the sum is ordered differently):"
    ]
    for setup in setups:
        shown = ", ".join(f"{name} {gap:.2g}" for name, gap in studies[setup.title].gaps.items())
        lines.append(f"  {setup.title}: {shown}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Output: table and figures
# --------------------------------------------------------------------------------------------


def format_table(setups, studies, sample_counts) -> str:
    """An aligned text table: one block per model, one line per (row, K)."""
    label_width = max(len(label) for setup in setups for label in setup.row_labels().values())
    header = f"{'estimator':<{label_width}}  {'K':>6}  {'bias':>10}  {'std':>10}  {'rmse':>10}"
    lines = []
    for setup in setups:
        lines += ["", setup.title, header, "-" * len(header)]
        for name, label in setup.row_labels().items():
            for i, k in enumerate(sample_counts):
                stats = studies[setup.title].stats[name][k]
                lines.append(
                    f"{label if i == 0 else '':<{label_width}}  {k:>6}  {stats['bias']:>+10.3g}  "
                    f"{stats['std']:>10.3g}  {stats['rmse']:>10.3g}"
                )
    return "\n".join(lines)


def panel_floor(values) -> float:
    """A power of ten one decade below the smallest positive value: where zeros are drawn."""
    positive = [v for v in values if v > 0]
    return 10.0 ** (math.floor(math.log10(min(positive))) - 1) if positive else 1e-3


def plot_std_and_bias(setups, studies, sample_counts, path: Path):
    """Std (top) and |bias| (bottom) of each row against K, log-log, one column per model.

    The exact posterior's error is zero up to float rounding; it is drawn along the bottom edge
    of each panel (its largest value in the legend) so that it does not squash the other lines.
    """
    ks = np.asarray(sample_counts, dtype=np.float64)
    fig, axes = plt.subplots(2, len(setups), figsize=(5.4 * len(setups), 8.6), sharex=True)
    for column, setup in enumerate(setups):
        stats_by_row = studies[setup.title].stats
        panels = [("std", "std of estimate (nats)"), ("bias", "|bias| (nats)")]
        for row, (stat, ylabel) in enumerate(panels):
            ax = axes[row, column]
            curves = {
                name: np.array([abs(stats_by_row[name][k][stat]) for k in sample_counts])
                for name in ESTIMATORS
            }
            floor = panel_floor(np.concatenate([v for n, v in curves.items() if n != "posterior"]))
            for name, label in setup.row_labels().items():
                if name == "posterior":
                    largest = curves[name].max()
                    label += (f": at most {largest:.0e}, i.e. 0" if largest > 0 else ": exactly 0")
                    label += " (drawn at the bottom)"
                    ax.plot(ks, np.full_like(ks, floor), "v--", color=COLOURS[name], label=label)
                else:
                    ax.plot(ks, curves[name], "o-", color=COLOURS[name], label=label, lw=1.8, ms=4)
            if stat == "std":
                anchor = stats_by_row["mismatched"][sample_counts[-1]]["std"] * math.sqrt(ks[-1])
                ax.plot(ks, anchor / np.sqrt(ks), "k:", lw=1, label=r"$\propto 1/\sqrt{K}$")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(bottom=floor / 1.5)
            ax.grid(True, which="major", alpha=0.3)
            ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(setup.title, fontsize=11)
            else:
                ax.set_xlabel("number of samples K")
                handles, labels = axes[0, column].get_legend_handles_labels()
                ax.legend(
                    handles, labels, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16)
                )
    fig.suptitle(
        r"Error of $\log\hat p(x)$ against the exact $\log p(x)$ (for the ELBO: the gap to "
        r"$\log p(x)$), over data points and replicates",
        fontsize=12,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def log_spaced_indices(length: int, count: int = 4000) -> np.ndarray:
    """About `count` distinct indices into `range(length)`, evenly spaced on a log scale."""
    return np.unique(np.geomspace(1, length, count).astype(int) - 1)


def plot_running_estimates(setups, studies, path: Path, lowest_log10: float = -12.0):
    r"""Running $\hat p_k(x)/p(x)$ against k: naive MC (red) vs the mismatched proposal (blue)."""
    fig, axes = plt.subplots(1, len(setups), figsize=(5.4 * len(setups), 4.6), sharey=True)
    for ax, setup in zip(axes, setups):
        labels = {
            "naive": f"naive MC, z ~ {setup.naive_label}",
            "mismatched": f"IS, q = {setup.mismatched_label}",
        }
        for name in ("naive", "mismatched"):
            runs = studies[setup.title].running[name]
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
        f"Running importance-sampling estimate, {len(runs)} independent runs on one data point per "
        "model. Naive MC sits far below 1 and jumps when a rare sample\nlands where the likelihood "
        "is high (in between, the running mean decays like 1/k); a proposal near the posterior "
        "stays close to 1",
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
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the PNG figures, created if needed (default: %(default)s)",
    )
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
    given = list(sys.argv[1:] if argv is None else argv)
    given += ["--quick"] if args.quick and "--quick" not in given else []  # also when set by ELBOJAX_QUICK
    _report.capture(args.out, "estimator_variance", " ".join(["python benchmarks/estimator_variance.py", *given]), quick=args.quick)
    # Before any array is created, so that every model and sample has the chosen precision.
    jax.config.update("jax_enable_x64", args.x64)
    dtype = jnp.float64 if args.x64 else jnp.float32
    started = time.perf_counter()
    settings = QUICK if args.quick else DEFAULT
    key_models, key_studies = jax.random.split(jax.random.key(args.seed))
    setups = make_setups(key_models, dtype)

    print(
        f"{'quick' if args.quick else 'default'} run, {jnp.dtype(dtype).name} on "
        f"{jax.default_backend()}: {settings.num_points} data points x {settings.num_replicates} "
        f"replicates per model; err = estimate - exact log p(x), nats"
    )
    studies = run_studies(setups, key_studies, settings, progress=not args.no_progress)
    print(format_table(setups, studies, settings.sample_counts))
    print()
    print(format_checks(setups, studies))
    worst = max(
        studies[setup.title].stats["posterior"][k]["rmse"]
        for setup in setups
        for k in settings.sample_counts
    )
    print(f"Exact posterior: largest RMSE {worst:.2g} nats, i.e. zero up to float rounding.")
    check_results(setups, studies, worst, tolerance=ROUNDING[jnp.dtype(dtype).name])

    args.out.mkdir(parents=True, exist_ok=True)
    std_path = args.out / "estimator_variance_std.png"
    running_path = args.out / "estimator_variance_running.png"
    plot_std_and_bias(setups, studies, settings.sample_counts, std_path)
    plot_running_estimates(setups, studies, running_path)
    print("\nWrote:")
    print(f"  {std_path}")
    print(f"  {running_path}")
    print(f"Total {time.perf_counter() - started:.1f} s.")


if __name__ == "__main__":
    _report.run(main)
