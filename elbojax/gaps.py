r"""The inference gaps of a trained model (Cremer, Li & Duvenaud 2018): approximation and amortisation.

For one data point $x$, a model $p_\theta(x, z)$ and its encoder $q_\psi(z \mid x)$ in a family
$\mathcal{Q}$ (e.g. diagonal Gaussians), the distance from the encoder's bound to the evidence
splits into two non-negative parts:

$$\log p(x) - \mathrm{ELBO}(q_\psi) =
  \underbrace{\log p(x) - \mathrm{ELBO}(q^*)}_{\text{approximation gap}} +
  \underbrace{\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\psi)}_{\text{amortisation gap}},
  \qquad q^* = \arg\max_{q \in \mathcal{Q}} \mathrm{ELBO}(q),$$

the approximation gap $= \mathrm{KL}(q^* \,\|\, p(z \mid x))$ is the price of the family, the
amortisation gap the price of predicting $q$ with one network instead of fitting it per point. A
richer family (`flows.local_flow_family`) shrinks the first; its own locally optimal $q^*_{\text{flow}}$
gives the flow's approximation gap.

`inference_gaps` estimates, for each point:

* $\log p(x)$: importance sampling with $K$ samples (`num_samples`, default 5000) from
  `marginal_proposal` (default: the best fitted $q^*$), with a delta-method standard error
  $\sqrt{\widehat{\mathrm{Var}}(w)/K}\,/\,\bar w$. It is biased downward by Jensen's
  inequality (about $\mathrm{Var}(w)/(2K\bar w^2)$), which the standard error does not include.
* $q^*$: `elbojax.local.optimize_local` started at the encoder's $q_\psi(z \mid x)$
  (`Family.init_from`), `num_steps` optax steps with the model fixed.
* $\mathrm{ELBO}(q^*)$, $\mathrm{ELBO}(q_\psi)$ (and $\mathrm{ELBO}(q^*_{\text{flow}})$): Monte Carlo
  means of `elbo_samples` log-weights, drawn with the SAME key for every $q$ (common random
  numbers: the same base noise $\varepsilon$), so their differences are much more precise than
  each level. Per-point Monte Carlo standard errors come from the paired draws.

Means over points come with their standard error over points (which includes the Monte Carlo noise).

Keys: point $i$ (its position in `data`) uses `fold_in(key, i)`, then `fold_in(., 0)` for the
local fit, `1` for the flow's fit, `2` for the ELBOs and `3` for importance sampling.

References:
  Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, ICML 2018,
  https://arxiv.org/abs/1801.03558
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from elbojax import _checks
from elbojax import local as local_lib
from elbojax.estimators import log_weights
from elbojax.reductions import logmeanexp

MARGINAL_PROPOSALS = ("best", "local", "flow", "amortized")

# Rows of the summary: (name in `means`, label).
_ROWS = (
    ("log_marginal", "log p(x)"),
    ("elbo_local", "ELBO(q*), locally optimal"),
    ("elbo_flow", "ELBO(q*_flow), locally optimal flow"),
    ("elbo_amortized", "ELBO(q), amortized (encoder)"),
    ("approximation_gap", "approximation gap  log p(x) - ELBO(q*)"),
    ("amortization_gap", "amortization gap   ELBO(q*) - ELBO(q)"),
    ("flow_approximation_gap", "approximation gap with the flow  log p(x) - ELBO(q*_flow)"),
)


class Gaps(NamedTuple):
    r"""The gaps of `inference_gaps`, per point (numpy arrays `(N,)`, nats) and summarised.

    Attributes:
      log_marginal: $\log \hat p(x)$, importance sampling with `settings["num_samples"]` samples.
      elbo_local: $\mathrm{ELBO}(q^*)$, $q^*$ the local optimum in the encoder's family.
      elbo_amortized: $\mathrm{ELBO}(q_\psi)$ of the encoder's own $q$.
      approximation_gap: $\log \hat p(x) - \mathrm{ELBO}(q^*)$.
      amortization_gap: $\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\psi)$.
      elbo_flow: $\mathrm{ELBO}(q^*_{\text{flow}})$, or `None` without a flow family.
      flow_approximation_gap: $\log \hat p(x) - \mathrm{ELBO}(q^*_{\text{flow}})$, or `None`.
      monte_carlo_se: name $\to$ `(N,)`, each point's Monte Carlo standard error of the quantity
        of that name (for a fixed $q^*$; the bias of $\log \hat p$ is not included).
      means: name $\to$ the mean over points.
      standard_errors: name $\to$ the standard error of that mean over points.
      local_objective: `(num_steps,)`, the inner loop's objective averaged over points, step by
        step (the convergence of the local fits); `flow_objective` likewise, or `None`.
      settings: the numbers behind the estimates (`num_points`, `num_samples`, `elbo_samples`,
        `num_steps`, `marginal_proposal`).
    """

    log_marginal: np.ndarray
    elbo_local: np.ndarray
    elbo_amortized: np.ndarray
    approximation_gap: np.ndarray
    amortization_gap: np.ndarray
    elbo_flow: np.ndarray | None
    flow_approximation_gap: np.ndarray | None
    monte_carlo_se: dict
    means: dict
    standard_errors: dict
    local_objective: np.ndarray
    flow_objective: np.ndarray | None
    settings: dict


def _default_optimizer(num_steps: int):
    return optax.adam(optax.cosine_decay_schedule(3e-2, num_steps, alpha=0.01))


def _log_marginal_and_se(weights):
    r"""$\log \frac1K \sum_k w_k$ and its delta-method standard error $\sqrt{\widehat{\mathrm{Var}}(w)/K}/\bar w$."""
    num = weights.shape[0]
    estimate = logmeanexp(weights)
    ratios = jnp.exp(weights - jnp.max(weights))  # w / max w, in (0, 1]
    relative_variance = jnp.var(ratios, ddof=1) / jnp.mean(ratios) ** 2 if num > 1 else jnp.nan
    return estimate, jnp.sqrt(relative_variance / num)


def _as_argument(model):
    """`(graphdef, state, rebuild)`: the model travels into the jitted functions as an argument, not as baked-in constants.

    An NNX module is split; a pytree of arrays (an `exact` model) passes as it is; any other
    object is closed over.
    """
    if isinstance(model, nnx.Module):
        graphdef, state = nnx.split(model)
        return graphdef, state, lambda s: nnx.merge(graphdef, s)
    if all(isinstance(leaf, (jax.Array, np.ndarray)) for leaf in jax.tree.leaves(model)):
        return None, model, lambda s: s
    return None, None, lambda s: model


def inference_gaps(
    key,
    model,
    data,
    *,
    num_steps: int = 300,
    optimizer: optax.GradientTransformation | None = None,
    family: local_lib.Family = local_lib.GAUSSIAN,
    objective: local_lib.LocalObjective | None = None,
    flow_family: local_lib.Family | None = None,
    flow_objective: local_lib.LocalObjective | None = None,
    flow_optimizer: optax.GradientTransformation | None = None,
    num_samples: int = 5000,
    chunk_size: int | None = 500,
    elbo_samples: int = 1000,
    marginal_proposal: str = "best",
    batch_size: int = 100,
) -> Gaps:
    r"""Estimate $\log p(x)$, $\mathrm{ELBO}(q^*)$, $\mathrm{ELBO}(q_\psi)$ and the two gaps for every point of `data`.

    Args:
      key: one PRNG key.
      model: a trained model with `log_joint(x, z)` and `proposal(x)` (its encoder's
        $q_\psi(z \mid x)$), e.g. an `elbojax.models.VAE`; it is held fixed.
      data: `(N, ...)`, the points.
      num_steps: inner optax steps of each local fit ($\ge 1$).
      optimizer: the inner optax optimizer; default Adam with a cosine decay from 0.03 over
        `num_steps` (the decay lets Monte Carlo fits settle).
      family: the encoder's family, whose `init_from(model.proposal(x))` starts the fit (default:
        the diagonal Gaussian, `local.GAUSSIAN`).
      objective: the inner objective `(key, model, x, phi) -> scalar`; default
        `local.objective("elbo", make_proposal=family.make_proposal, num_samples=8, gradient="stl")`.
        `local.closed_form_objective()` fits exactly where the model has a closed form.
      flow_family: optionally a richer family (`flows.local_flow_family(latent_dim)`), fitted
        from the same start, for the flow's approximation gap.
      flow_objective: its inner objective; default as `objective` with its `make_proposal`.
      flow_optimizer: its inner optimizer; default `optimizer` (a flow often wants a smaller step).
      num_samples: $K$ for $\log \hat p(x)$.
      chunk_size: samples at a time for $\log \hat p(x)$ (bounds memory).
      elbo_samples: samples per ELBO estimate.
      marginal_proposal: the importance-sampling proposal: `"local"` ($q^*$), `"flow"`
        ($q^*_{\text{flow}}$), `"amortized"` ($q_\psi$), or `"best"` (the flow's $q^*$ when
        there is one, else $q^*$).
      batch_size: points fitted together under `vmap`.

    Returns:
      A `Gaps`.
    """
    _checks.check_key(key)
    num_steps = _checks.check_positive_int(num_steps, "num_steps")
    num_samples = _checks.check_positive_int(num_samples, "num_samples")
    elbo_samples = _checks.check_positive_int(elbo_samples, "elbo_samples")
    batch_size = _checks.check_positive_int(batch_size, "batch_size")
    chunk_size = _checks.check_optional_positive_int(chunk_size, "chunk_size")
    for name in ("log_joint", "proposal"):
        if not callable(getattr(model, name, None)):
            raise TypeError(
                f"inference_gaps needs a model with `{name}` (its log joint and its encoder's proposal(x)); "
                f"{type(model).__name__} has none."
            )
    if not isinstance(family, local_lib.Family) or (flow_family is not None and not isinstance(flow_family, local_lib.Family)):
        raise TypeError("`family` and `flow_family` must be `local.Family` values (local.GAUSSIAN, flows.local_flow_family(...)).")
    if marginal_proposal not in MARGINAL_PROPOSALS:
        raise ValueError(f"`marginal_proposal` must be one of {', '.join(map(repr, MARGINAL_PROPOSALS))}; got {marginal_proposal!r}.")
    if marginal_proposal == "flow" and flow_family is None:
        raise ValueError("marginal_proposal='flow' needs a `flow_family`.")
    if marginal_proposal == "best":
        marginal_proposal = "flow" if flow_family is not None else "local"
    data = jnp.asarray(data)
    if data.ndim < 1 or data.shape[0] < 1:
        raise ValueError(f"`data` must have shape (N, ...) with N >= 1, got {data.shape}.")
    num_points = int(data.shape[0])
    optimizer = _default_optimizer(num_steps) if optimizer is None else optimizer
    default_objective = lambda fam: local_lib.objective("elbo", make_proposal=fam.make_proposal, num_samples=8, gradient="stl")
    fits = {"local": (family, objective or default_objective(family), optimizer)}
    if flow_family is not None:
        fits["flow"] = (flow_family, flow_objective or default_objective(flow_family), flow_optimizer or optimizer)
    indices = jnp.arange(num_points, dtype=jnp.uint32)
    graphdef, state, rebuild = _as_argument(model)

    @jax.jit
    def fit_all(state, data):
        model = rebuild(state)

        def fit_one(args):
            index, x = args
            point_key = jax.random.fold_in(key, index)
            proposal = model.proposal(x)
            out = {}
            for salt, (name, (fam, obj, opt)) in enumerate(fits.items()):
                result = local_lib.optimize_local(
                    jax.random.fold_in(point_key, salt), model, x, fam.init_from(proposal),
                    objective=obj, optimizer=opt, num_steps=num_steps,
                )
                out[name] = (result.phi, result.objective)
            return out

        return jax.lax.map(fit_one, (indices, data), batch_size=min(batch_size, num_points))

    fitted = fit_all(state, data)

    @jax.jit
    def evaluate_all(state, data, fitted):
        model = rebuild(state)

        def evaluate_one(args):
            index, x, fitted_point = args
            point_key = jax.random.fold_in(key, index)
            proposals = {"amortized": model.proposal(x)}
            for name, (fam, _, _) in fits.items():
                proposals[name] = fam.make_proposal(fitted_point[name][0])
            elbo_key = jax.random.fold_in(point_key, 2)
            weights = {
                name: log_weights(elbo_key, x, model.log_joint, q, num_samples=elbo_samples)
                for name, q in proposals.items()
            }
            is_weights = log_weights(
                jax.random.fold_in(point_key, 3), x, model.log_joint, proposals[marginal_proposal],
                num_samples=num_samples, chunk_size=chunk_size,
            )
            log_px, log_px_se = _log_marginal_and_se(is_weights)
            values = {"log_marginal": (log_px, log_px_se)}
            root_m = math.sqrt(elbo_samples)
            sd = lambda a: jnp.std(a, ddof=1) if elbo_samples > 1 else jnp.nan
            for name, w in weights.items():
                values[f"elbo_{name}"] = (jnp.mean(w), sd(w) / root_m)
            values["approximation_gap"] = (
                log_px - values["elbo_local"][0], jnp.hypot(log_px_se, values["elbo_local"][1])
            )
            paired = weights["local"] - weights["amortized"]
            values["amortization_gap"] = (jnp.mean(paired), sd(paired) / root_m)
            if "flow" in weights:
                values["flow_approximation_gap"] = (
                    log_px - values["elbo_flow"][0], jnp.hypot(log_px_se, values["elbo_flow"][1])
                )
            return values

        return jax.lax.map(evaluate_one, (indices, data, fitted))

    values = jax.device_get(evaluate_all(state, data, fitted))
    per_point = {name: np.asarray(v[0], np.float64) for name, v in values.items()}
    monte_carlo_se = {name: np.asarray(v[1], np.float64) for name, v in values.items()}
    means, standard_errors = {}, {}
    for name, v in per_point.items():
        means[name] = float(v.mean())
        standard_errors[name] = float(v.std(ddof=1) / np.sqrt(v.size)) if v.size > 1 else float("nan")
    traces = {name: np.asarray(fitted[name][1], np.float64).mean(0) for name in fits}
    return Gaps(
        log_marginal=per_point["log_marginal"],
        elbo_local=per_point["elbo_local"],
        elbo_amortized=per_point["elbo_amortized"],
        approximation_gap=per_point["approximation_gap"],
        amortization_gap=per_point["amortization_gap"],
        elbo_flow=per_point.get("elbo_flow"),
        flow_approximation_gap=per_point.get("flow_approximation_gap"),
        monte_carlo_se=monte_carlo_se,
        means=means,
        standard_errors=standard_errors,
        local_objective=traces["local"],
        flow_objective=traces.get("flow"),
        settings={
            "num_points": num_points, "num_samples": num_samples, "elbo_samples": elbo_samples,
            "num_steps": num_steps, "marginal_proposal": marginal_proposal,
        },
    )


def _check_gaps(result) -> None:
    if not isinstance(result, Gaps):
        raise TypeError(f"Expected the `Gaps` that `inference_gaps` returns, got {type(result).__name__}.")


def to_dict(result: Gaps) -> dict[str, Any]:
    """The summary as plain Python (for JSON): `{name: {"mean", "se"}}` and the settings."""
    _check_gaps(result)
    summary = {name: {"mean": result.means[name], "se": result.standard_errors[name]} for name, _ in _ROWS if name in result.means}
    return {"gaps": summary, "settings": dict(result.settings)}


def format_table(result: Gaps) -> str:
    """A plain-text table of the means ± standard errors over points (nats)."""
    _check_gaps(result)
    settings = result.settings
    header = (
        f"inference gaps (Cremer et al. 2018) on {settings['num_points']} points; log p(x) by importance sampling "
        f"with K={settings['num_samples']} from q = {settings['marginal_proposal']}, ELBOs with "
        f"{settings['elbo_samples']} samples, local fits of {settings['num_steps']} steps"
    )
    rows = [(label, result.means[name], result.standard_errors[name]) for name, label in _ROWS if name in result.means]
    width = max(len(label) for label, _, _ in rows)
    lines = [header, f"{'':{width}s}  {'mean':>9s}   {'± SE':>6s}  (nats)"]
    for label, mean, se in rows:
        lines.append(f"{label:{width}s}  {mean:9.3f}   ± {se:5.3f}")
    return "\n".join(lines)


def plot(result: Gaps, path) -> Any:
    """A PNG at `path`: the gaps as bars (means ± SE over points), and each point's gaps; returns the path.

    Drawn on a bare `matplotlib.figure.Figure` (no pyplot), so it neither needs a display nor
    changes the backend of a running notebook.
    """
    from pathlib import Path

    from matplotlib.figure import Figure

    _check_gaps(result)
    names = [("approximation_gap", "approximation\n(Gaussian q*)"), ("amortization_gap", "amortization")]
    if result.flow_approximation_gap is not None:
        names.append(("flow_approximation_gap", "approximation\n(flow q*)"))
    fig = Figure(figsize=(10, 4))
    bars, points = fig.subplots(1, 2)
    positions = np.arange(len(names))
    labels = [label for _, label in names]
    bars.bar(
        positions, [result.means[n] for n, _ in names], yerr=[result.standard_errors[n] for n, _ in names],
        color=[f"C{i}" for i in range(len(names))], capsize=4,
    )
    bars.set_ylabel("nats (mean ± SE over points)")
    bars.set_title(f"Inference gaps, {result.settings['num_points']} points")
    rng = np.random.default_rng(0)
    for i, (name, _) in enumerate(names):
        values = getattr(result, name)
        points.scatter(i + 0.08 * rng.standard_normal(values.size), values, s=8, alpha=0.6, color=f"C{i}")
    points.set_ylabel("nats, per point")
    points.set_title("per point")
    for ax in (bars, points):
        ax.set_xticks(positions, labels)
        ax.axhline(0.0, color="grey", lw=0.8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path
