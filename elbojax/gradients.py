r"""Gradient estimators as surrogates: the value stays the objective, only `jax.grad` changes.

Each estimator is a way of writing the objective so that reverse-mode autodiff returns the
estimator we want. Everything is done at the sample $z$ and at $\log q$, never by naming
parameter sets, so parameters may be shared between model and proposal (a VampPrior uses the
encoder) and the proposal can be any distribution.

| `gradient=` | objectives | proposal parameters $\phi$ get | model parameters $\theta$ get |
|---|---|---|---|
| `"reparam"` | all | the pathwise gradient | $\nabla_\theta$ of the objective |
| `"stl"` | `elbo`, `iwae_bound`, `renyi_bound`, `combination_iwae_bound` | the pathwise gradient without the score term of $\log q$ (Roeder et al. 2017); unbiased for the ELBO, but for IWAE this is IWAE-STL, which is **biased** (Tucker et al. 2019), and so are Rényi ($\alpha \ne 1$) and CIWAE ($\beta < 1$) | unchanged |
| `"dreg"` | `iwae_bound` | $\sum_k \tilde w_k^2\, \frac{\partial \ell_k}{\partial z_k}\frac{\partial z_k}{\partial\phi}$ (Tucker et al. 2019) | $\sum_k \tilde w_k \nabla_\theta \log p(x, z_k)$ |
| `"score"` | `elbo`, `iwae_bound` | REINFORCE, with a baseline (below) | unchanged |
| `"vimco"` | `iwae_bound` | REINFORCE with VIMCO's multi-sample leave-one-out baseline (Mnih & Rezende 2016) | unchanged |

Here $\ell_k = \log p(x, z_k) - \log q(z_k)$ and $\tilde w_k = e^{\ell_k} / \sum_j e^{\ell_j}$.
STL and DReG drop the score term because its mean, $\mathbb{E}_q[\nabla_\phi \log q_\phi(z)]$,
is 0; that holds only where the support of $q_\phi$ does not move with $\phi$, so a `Uniform`,
a `Pareto` and the other families whose support a parameter sets are refused for them
(`score_free_message`).

**Building blocks.**

* `path_only_log_prob(q, z)` $= \log q(z) - \log q(\bar z) + \overline{\log q(\bar z)}$ (a bar is
  `stop_gradient`): the value of $\log q(z)$ and exactly its path gradient. The score terms
  cancel because they are the same float operations on the same values; nothing about the
  distribution's internals is assumed (stop-gradient over a distrax distribution's pytree is not
  enough: `MultivariateNormalDiag` keeps bound methods of its bijectors as static data).
* `scale_cotangent(z, s)`: the identity on the way forward; on the way back the cotangent of
  `z` is multiplied by `s`. DReG's surrogate $\sum_k \bar{\tilde w}_k [\log p(x, \tilde z_k) -
  \log q_{\text{path}}(\tilde z_k)]$ with $\tilde z_k$ = `scale_cotangent(z_k, w_k)` gives the
  model $\sum_k \tilde w_k \nabla_\theta \log p$ and the proposal $\sum_k \tilde w_k^2 \cdot$
  (path), in one backward pass.
* `forbid_pathwise(log_q, message)`: the identity, but differentiating through it raises. Used on
  $\log q$ of a discrete proposal: differentiating a reparameterised objective with respect to
  the proposal's parameters would silently drop the score term, so it is an error instead; the
  model's parameters (whose gradient is right) can still be differentiated.

**Score-function baselines.** For the ELBO, sample $k$'s learning signal is $\ell_k - b_k$, with
$b_k$ the mean of the *other* samples' log-weights when $K > 1$ (leave-one-out, unbiased), or
the `baseline=` value you pass (a moving average or a learned $b_\psi(x)$ kept in your training
state; it must not depend on $z_{1:K}$). For `iwae_bound`, the signal is $\hat{\mathcal L}_K - b$
with `baseline=` $b$ (0 if none): a per-sample leave-one-out for the IWAE bound is what VIMCO does.
A sample of weight 0 ($\ell_k = -\infty$) gets no learning signal in the ELBO's estimator and
is left out of the others' leave-one-out baselines (the value, the ELBO, is then $-\infty$; see
`elbo`); `vimco_signals` says what VIMCO does with zero weights. For `iwae_bound` (and PIWAE)
the value and, under every estimator, the gradient stay finite while at least one weight is
positive (DReG's and PIWAE's surrogates skip the zero-weight terms, where $0 \cdot (-\infty)$
would be NaN). With every weight 0 the value is $-\infty$; DReG and PIWAE then give a gradient
of 0, the ELBO's score estimator a finite one, and the other IWAE gradients NaN (the derivative
of $\log 0$).

To train a learned baseline, regress it on the (stop-gradient) value the estimator returns:

    value = elbojax.elbo(key, x, log_joint, q, gradient="score", baseline=b_psi(x))
    loss = -value + (jax.lax.stop_gradient(value) - b_psi(x)) ** 2

The estimator holds the baseline fixed inside its surrogate, so the first term trains the model
and proposal and the second trains $\psi$ (Mnih & Gregor 2014).

References:
  Roeder, Wu & Duvenaud, *Sticking the Landing*, NeurIPS 2017, https://arxiv.org/abs/1703.09194;
  Tucker, Lawson, Gu & Maddison, *Doubly Reparameterized Gradient Estimators for Monte Carlo
  Objectives*, ICLR 2019, https://arxiv.org/abs/1810.04152;
  Williams, *Simple statistical gradient-following algorithms*, 1992;
  Mnih & Gregor, *Neural Variational Inference and Learning*, ICML 2014, https://arxiv.org/abs/1402.0030;
  Mnih & Rezende, *Variational Inference for Monte Carlo Objectives*, ICML 2016,
  https://arxiv.org/abs/1602.06725
"""

from __future__ import annotations

import functools
import math

import distrax
import jax
import jax.numpy as jnp

from elbojax.proposals import TFPProposal

ELBO_GRADIENTS = ("reparam", "stl", "score")
IWAE_GRADIENTS = ("reparam", "stl", "dreg", "score", "vimco")
PATHWISE = ("reparam", "stl", "dreg")


def check_gradient(gradient, allowed: tuple[str, ...], objective: str) -> str:
    if gradient not in allowed:
        raise ValueError(
            f"`gradient` for `{objective}` must be one of {', '.join(map(repr, allowed))}; got {gradient!r}."
        )
    return gradient


def stop_gradient_tree(tree):
    """`jax.lax.stop_gradient` on every leaf of a pytree."""
    return jax.tree.map(jax.lax.stop_gradient, tree)


def path_only_log_prob(proposal, z):
    r"""$\log q(z)$ with its path gradient only: $\log q(z) - \log q(\bar z) + \overline{\log q(\bar z)}$."""
    return _path_only(proposal.log_prob, z)


def path_only_log_prob_at(proposal, point):
    """`path_only_log_prob` of the sample at `point` (see `value_at`), read from `point`: for a
    proposal `in_log_space`, from its log-space point, where its log-density stays computable."""
    return _path_only(lambda p: log_prob_at(proposal, p), point)


def _path_only(log_prob, point):
    at_stopped = log_prob(stop_gradient_tree(point))
    return log_prob(point) - at_stopped + jax.lax.stop_gradient(at_stopped)


def in_log_space(proposal) -> bool:
    r"""Whether `proposal` samples through a log-space point $u$ with $z = g(u)$ and a density read
    from $u$ (`sample_log_space`, `value_from_log_space`, `log_prob_from_log_space`): the relaxed
    distributions of `elbojax.discrete`, whose $z$ rounds to 0 or 1 at low temperature where its
    log-density is no longer computable from $z$. The estimators that re-evaluate $\log q$ at
    their samples (`"stl"`, `"dreg"`, `"score"`, `"vimco"`, PIWAE) then do so at $u$.
    """
    return callable(getattr(proposal, "log_prob_from_log_space", None))


def value_at(proposal, point):
    """The sample at `point`: `point` itself, or $g(u)$ for a proposal `in_log_space`."""
    return proposal.value_from_log_space(point) if in_log_space(proposal) else point


def log_prob_at(proposal, point):
    r"""$\log q$ of the sample at `point` (see `value_at`), read from `point`."""
    return proposal.log_prob_from_log_space(point) if in_log_space(proposal) else proposal.log_prob(point)


@jax.custom_vjp
def scale_cotangent(z, scale):
    """Identity on `z`; the backward pass multiplies `z`'s cotangent by `scale` (no gradient to `scale`)."""
    del scale
    return z


def _scale_cotangent_fwd(z, scale):
    return z, scale


def _scale_cotangent_bwd(scale, cotangent):
    scaled = jax.tree.map(lambda c: (c * scale).astype(c.dtype), cotangent)
    return scaled, jnp.zeros_like(scale)


scale_cotangent.defvjp(_scale_cotangent_fwd, _scale_cotangent_bwd)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def forbid_pathwise(log_q, message: str):
    """Identity; differentiating through it raises `ValueError(message)` at trace time."""
    del message
    return log_q


@forbid_pathwise.defjvp
def _forbid_pathwise_jvp(message, primals, tangents):
    del primals, tangents
    raise ValueError(message)


def is_reparameterizable(proposal, sample) -> bool:
    """False for proposals whose samples cannot carry a pathwise gradient.

    Args:
      proposal: the proposal.
      sample: one sample of it, or its abstract shape (`jax.eval_shape` of a draw).

    A sample with an integer or boolean leaf is discrete; a TFP distribution also says so
    through its `reparameterization_type`.
    """
    return _declared_reparameterized(proposal) and not _has_discrete_leaf(sample)


# distrax distributions whose samples carry no pathwise gradient to some parameter: discrete
# draws (also with a float dtype), a component chosen discretely (mixtures), rounding, or
# clipping (point masses at the bounds: the pathwise gradient misses the boundary terms, and
# `ClippedNormal` and `ClippedLogistic` are `Clipped`).
_NOT_PATHWISE = tuple(
    getattr(distrax, name)
    for name in ("Bernoulli", "Categorical", "CategoricalUniform", "Clipped", "EpsilonGreedy", "Greedy", "MixtureOfTwo",
                 "MixtureSameFamily", "Multinomial", "OneHotCategorical", "Quantized", "Softmax")
    if hasattr(distrax, name)
)


def _declared_reparameterized(proposal) -> bool:
    """What the proposal says of its samples' pathwise gradient.

    A TFP distribution says it with `reparameterization_type` (every node of a joint's dict or
    list, nested joints flattened). distrax says nothing, so its distributions whose samples carry
    no gradient to some parameter count as not reparameterizable: the discrete ones (a
    `Bernoulli` with a float dtype draws floats, but still discretely), the mixtures
    (`MixtureSameFamily`, `MixtureOfTwo`, `CategoricalUniform` draw the component discretely, so
    the samples carry no gradient to the mixture weights), `Quantized` (rounded samples) and
    `Clipped` (point masses at the bounds, whose boundary terms a pathwise gradient misses: it
    came out 0.158 +- 0.002 where the exact derivative is 0.205). A pathwise gradient through them
    would be silently wrong. The check looks inside `Transformed`, `Independent` (any distrax
    distribution with a `distribution`), every member of a `Joint`, and every part a composite
    proposal lists in its `pathwise_parts()` (both layers of `models.HierarchicalProposal`). distrax's `straight_through_wrapper` classes pass: their
    biased gradient is asked for by name.
    """
    return _not_pathwise_part(_unwrapped(proposal)) is None


def _unwrapped(proposal):
    return proposal.distribution if isinstance(proposal, TFPProposal) else proposal


def _inner_parts(distribution) -> list:
    """What `distribution` is made of: a distrax `Joint`'s members, a composite proposal's
    `pathwise_parts()` (`models.HierarchicalProposal`: every part must be pathwise), or the
    distrax distribution it wraps; `[]` for none."""
    if isinstance(distribution, distrax.Joint):
        return jax.tree.leaves(distribution.distributions, is_leaf=lambda d: isinstance(d, distrax.Distribution))
    parts = getattr(distribution, "pathwise_parts", None)
    if callable(parts):
        return list(parts())
    wrapped = getattr(distribution, "distribution", None)
    if isinstance(distribution, distrax.Distribution) and isinstance(wrapped, distrax.Distribution):
        return [wrapped]
    return []


def _first_part(finder, parts):
    return next((part for part in map(finder, parts) if part is not None), None)


def _not_pathwise_part(distribution):
    """The (innermost) part of `distribution` whose samples carry no pathwise gradient, or None."""
    if isinstance(distribution, _NOT_PATHWISE):
        straight_through = type(distribution).__name__.startswith(("StraighThrough", "StraightThrough"))
        return None if straight_through else distribution
    inner = _inner_parts(distribution)
    if inner:
        return _first_part(_not_pathwise_part, inner)
    kind = getattr(distribution, "reparameterization_type", None)
    if kind is None or all("FULLY_REPARAMETERIZED" in str(k).upper() for k in jax.tree.leaves(kind)):
        return None
    return distribution


def _has_discrete_leaf(sample) -> bool:
    return not all(jnp.issubdtype(leaf.dtype, jnp.inexact) for leaf in jax.tree.leaves(sample))


def _part_name(proposal, find) -> str:
    """The proposal's type, and the part `find` finds in it if that is not the proposal itself."""
    inner = _unwrapped(proposal)
    part = find(inner)
    return type(inner).__name__ + (f" (its {type(part).__name__})" if part is not None and part is not inner else "")


def not_reparameterizable_message(proposal, asker: str) -> str:
    """Why `asker` (e.g. `"gradient='dreg'"`) cannot have `proposal`, and what to use instead."""
    name = _part_name(proposal, _not_pathwise_part)
    return (
        f"{asker} needs a reparameterizable proposal, but "
        f"{name} cannot be reparameterized (its samples are discrete, chosen discretely, rounded or "
        "clipped, or its reparameterization_type is not FULLY_REPARAMETERIZED). "
        "Use a score-function gradient (elbo(..., gradient='score'), iwae_bound(..., gradient='score' "
        "or 'vimco'); the other estimators have none), enumerate the latent (elbojax.discrete), or a relaxation."
    )


# The families (distrax or TFP, by name) whose support one of their parameters sets.
_MOVING_SUPPORT = {
    "Uniform": "[low, high]",
    "Triangular": "[low, high]",
    "PERT": "[low, high]",
    "Bates": "[low, high]",
    "TruncatedNormal": "[low, high]",
    "TruncatedCauchy": "[low, high]",
    "Pareto": "[scale, inf)",
    "HalfCauchy": "[loc, inf)",
    "HalfStudentT": "[loc, inf)",
    "GeneralizedPareto": "from loc (and to loc - scale / concentration for a negative concentration)",
    "GeneralizedExtremeValue": "bounded at loc - scale / concentration",
}


def _moving_support_part(distribution):
    """The (innermost) part of `distribution` whose support its parameters set (`_MOVING_SUPPORT`:
    a `Uniform` on [low, high], a `Pareto` on [scale, inf), ...), or None. TFP's wrappers
    (`Independent`, `TransformedDistribution`) are looked inside too."""
    if type(distribution).__name__ in _MOVING_SUPPORT:
        return distribution
    wrapped = getattr(distribution, "distribution", None)
    inner = _inner_parts(distribution) or ([wrapped] if callable(getattr(wrapped, "log_prob", None)) else [])
    return _first_part(_moving_support_part, inner)


def score_free_message(proposal, gradient: str) -> str | None:
    r"""Why `gradient` (`"stl"` or `"dreg"`) would be biased for `proposal`, or None if nothing says so.

    STL and DReG drop the score term $\nabla_\phi \log q_\phi(z)$ because its mean is 0, which
    holds only where the support of $q_\phi$ does not move with $\phi$. For a `Uniform` on
    $[a, b]$ it is $-\nabla_\phi \log(b - a)$: STL was off by $-1/b$ exactly; for a `Pareto` of
    concentration $\alpha$ on $[s, \infty)$ it is $\alpha / s$. The pathwise gradient itself
    (`"reparam"`) stays right.

    The families whose support a parameter sets are refused by name (`Uniform`, `Triangular`,
    `PERT`, `Bates`, `TruncatedNormal`, `TruncatedCauchy`, `Pareto`, `HalfCauchy`,
    `HalfStudentT`, `GeneralizedPareto`, `GeneralizedExtremeValue`, also inside TFP's wrappers),
    even where that parameter is a constant: elbojax cannot tell. What it cannot see is a
    bounded distribution moved by a learned bijector (a `Beta` scaled by a learned factor):
    there the caller must know that the support is fixed.
    """
    part = _moving_support_part(_unwrapped(proposal))
    if part is None:
        return None
    return (
        f"gradient={gradient!r} drops the score term of log q, whose mean is 0 only where the "
        f"proposal's support does not move with its parameters; {_part_name(proposal, _moving_support_part)} "
        f"has its support {_MOVING_SUPPORT[type(part).__name__]} set by its parameters, and where they are "
        "learned the gradient would be biased. Use gradient='reparam' (unbiased either way)."
    )


def vimco_signals(log_weights: jax.Array) -> jax.Array:
    r"""VIMCO's per-sample learning signals $\hat{\mathcal L}_K - \hat{\mathcal L}_{K,-k}$, shape `(K,)`.

    $\hat{\mathcal L}_{K,-k}$ replaces $w_k$ by the geometric mean of the other weights:
    $$\hat{\mathcal L}_{K,-k} = \log \frac1K\Big(\sum_{j \ne k} w_j + \exp\big(\tfrac{1}{K-1}
      \textstyle\sum_{j\ne k} \ell_j\big)\Big).$$
    The leave-one-out log-sum-exps and sums come from exclusive prefix and suffix cumulative
    log-sum-exps and sums, so the cost is $O(K)$ and nothing is subtracted from a total: no
    cancellation, and no $-\infty - (-\infty)$ when a log-weight is $-\infty$.

    Zero weights: a sample with $\ell_k = -\infty$ gets a finite signal, and makes the geometric
    mean in every other sample's baseline 0. If every *other* weight is 0, the definition gives
    sample $k$ the baseline $-\infty$ and the signal $+\infty$ (whose gradient through a normalised
    proposal is $\infty - \infty$, NaN); instead, that sample gets no baseline: its signal is
    $\hat{\mathcal L}_K$, as with `gradient="score"` (the choice depends only on the other samples).
    If every weight is 0, every signal is 0 (the limit of equal log-weights) and the bound is
    $-\infty$. A NaN log-weight makes every signal NaN.

    Args:
      log_weights: `(K,)` log-weights, `K >= 2`, treated as constants.
    """
    log_weights = jnp.asarray(log_weights)
    if not jnp.issubdtype(log_weights.dtype, jnp.floating):
        raise TypeError(f"`log_weights` must be a floating-point array, got dtype {log_weights.dtype}.")
    if log_weights.ndim != 1 or log_weights.shape[0] < 2:
        raise ValueError(
            "`log_weights` must have shape (K,) with K >= 2 (a leave-one-out baseline needs another "
            f"sample), the log-weights of ONE data point; got shape {log_weights.shape}."
        )
    # In at least float32: leave-one-out differences of 16-bit log-weights near -50 lose every digit.
    log_weights = jax.lax.stop_gradient(log_weights.astype(jnp.promote_types(log_weights.dtype, jnp.float32)))
    # The signals do not change when a constant is added to every log-weight: measured from their
    # (finite) maximum, the bound and the baselines are small numbers whose difference keeps its
    # digits (at -1e4 in float32 they lost about 2, a 1e-1 error in the gradient at K = 100).
    top = jnp.max(log_weights)
    shift = jnp.where(jnp.isfinite(top), top, jnp.zeros_like(top))
    log_weights = log_weights - shift
    num = log_weights.shape[0]
    neg_inf = jnp.full((1,), -jnp.inf, log_weights.dtype)
    zero = jnp.zeros((1,), log_weights.dtype)
    prefix = jnp.concatenate([neg_inf, jax.lax.cumlogsumexp(log_weights)[:-1]])
    suffix = jnp.concatenate([jax.lax.cumlogsumexp(log_weights, reverse=True)[1:], neg_inf])
    leave_one_out_lse = jnp.logaddexp(prefix, suffix)
    prefix_sum = jnp.concatenate([zero, jax.lax.cumsum(log_weights)[:-1]])
    suffix_sum = jnp.concatenate([jax.lax.cumsum(log_weights, reverse=True)[1:], zero])
    leave_one_out_mean = (prefix_sum + suffix_sum) / (num - 1)
    bound = jax.nn.logsumexp(log_weights) - math.log(num)
    baselines = jnp.logaddexp(leave_one_out_lse, leave_one_out_mean) - math.log(num)
    # No baseline (0 in the log-weights' own terms) where every other weight is 0.
    baselines = jnp.where(jnp.isneginf(baselines), -shift, baselines)
    return jnp.where(jnp.isneginf(bound), jnp.zeros_like(baselines), bound - baselines)
