r"""Self-normalised importance sampling: posterior expectations and resampling from log-weights.

With $z_k \sim q$ and log-weights $\ell_k = \log p(x, z_k) - \log q(z_k)$ (`elbojax.log_weights`,
or `importance_samples` here, which also returns the $z_k$), the normalised weights
$$\bar w_k = \frac{e^{\ell_k}}{\sum_j e^{\ell_j}}$$
turn the $K$ samples into a weighted approximation of the posterior $p(z \mid x)$, whatever the
model: its normalising constant $p(x)$ cancels. Then

* `posterior_expectation(f_values, log_weights)`: $\hat\mu = \sum_k \bar w_k f(z_k)$, with a
  standard error and the effective sample size;
* `resample(key, log_weights, num)`: indices drawn with probabilities $\bar w_k$ (multinomial or
  systematic), i.e. sampling importance resampling (SIR, Rubin 1988): approximate draws from
  $p(z \mid x)$;
* `importance_resample(...)`: both steps on a model's `log_joint` and a proposal.

**Biased at finite $K$.** $\hat\mu$ is a ratio of two unbiased estimates, so it is biased, with
a bias of order $1/K$ (Owen 2013, ch. 9): $\mathbb{E}[\hat\mu] - \mu = O(1/K)$, consistent as
$K \to \infty$. Resampled draws are exact posterior samples only in that limit; at finite $K$ they
follow the SIR distribution, which lies between $q$ and the posterior. Report $K$ with the result,
and look at the effective sample size (Kish):
$$\mathrm{ESS} = \frac{1}{\sum_k \bar w_k^2} \in [1, K];$$
an ESS of a few means that a few samples carry the estimate and the error bars are not to be
trusted.

**Standard error.** The delta-method estimate of the variance of $\hat\mu$ (Owen 2013, eq. 9.9),
$$\widehat{\mathrm{Var}}(\hat\mu) = \sum_k \bar w_k^2 \big(f(z_k) - \hat\mu\big)^2,$$
is itself a self-normalised estimate: it is reliable when the ESS is large.

**Non-finite log-weights.** A log-weight of $-\infty$ gets weight 0 (its sample is never
resampled and its $f$ value is not used); if all are $-\infty$ every weight is 0, the expectation
is 0 with an ESS of 0 (check the ESS), and `resample`'s indices are meaningless. A NaN log-weight
makes every weight NaN, and so the expectation, its standard error and the ESS NaN; `resample`
still returns valid indices, which mean nothing (check that the ESS is not NaN: nothing is
checked on the host inside `jit`).

Shapes: `log_weights` `(K,)` for ONE data point (batch with `jax.vmap`); `f_values` `(K, ...)`.

References:
  Rubin, *Using the SIR algorithm to simulate posterior distributions*, Bayesian Statistics 3, 1988;
  Owen, *Monte Carlo theory, methods and examples*, 2013, ch. 9 (self-normalised importance
  sampling, its bias, variance and effective sample size), https://artowen.su.domains/mc/;
  Kitagawa, *Monte Carlo filter and smoother for non-Gaussian nonlinear state space models*,
  J. Comput. Graph. Stat., 1996 (systematic resampling); Douc, Cappé & Moulines, *Comparison of
  resampling schemes for particle filtering*, 2005, https://arxiv.org/abs/cs/0507025
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elbojax import _checks
from elbojax import gradients as grads
from elbojax.estimators import _draw, _log_joint, _map_chunks, _prepare
from elbojax.reductions import effective_sample_size, exp_shifted, widened

RESAMPLING_METHODS = ("multinomial", "systematic")


def _check_log_weights(log_weights, name: str = "log_weights") -> jax.Array:
    log_weights = jnp.asarray(log_weights)
    if not jnp.issubdtype(log_weights.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating-point array, got dtype {log_weights.dtype}.")
    if log_weights.ndim != 1 or log_weights.shape[0] < 1:
        raise ValueError(
            f"`{name}` must have shape (K,) with K >= 1, the log-weights of ONE data point "
            f"(batch with jax.vmap); got shape {log_weights.shape}."
        )
    return log_weights


def normalized_weights(log_weights) -> jax.Array:
    r"""The self-normalised weights $\bar w_k = e^{\ell_k} / \sum_j e^{\ell_j}$, computed stably.

    Args:
      log_weights: `(K,)`, the log-weights $\ell_k$ (any scale: only differences matter).

    Returns:
      `(K,)`, non-negative and summing to 1; all zeros if every $\ell_k = -\infty$; all NaN if
      one is NaN.
    """
    log_weights = widened(_check_log_weights(log_weights))  # 16-bit weights would not sum to 1
    exps = exp_shifted(log_weights, axis=0)  # exactly invariant to a shift of the log-weights
    total = jnp.sum(exps)
    return exps / jnp.where(total == 0, jnp.ones_like(total), total)  # all 0, zero gradient, if every weight is 0


class SNISEstimate(NamedTuple):
    r"""A self-normalised importance-sampling estimate of $\mathbb{E}_{p(z \mid x)}[f(z)]$.

    Attributes:
      mean: $\hat\mu = \sum_k \bar w_k f(z_k)$, the shape of one $f$ value.
      standard_error: $\big(\sum_k \bar w_k^2 (f(z_k) - \hat\mu)^2\big)^{1/2}$ elementwise, the
        delta-method standard error (Owen 2013, eq. 9.9); same shape as `mean`.
      effective_sample_size: Kish's $1 / \sum_k \bar w_k^2$, a scalar in $[1, K]$ (0 when every
        weight is 0).
    """

    mean: jax.Array
    standard_error: jax.Array
    effective_sample_size: jax.Array


def posterior_expectation(f_values, log_weights) -> SNISEstimate:
    r"""The self-normalised importance-sampling estimate of a posterior expectation, with its error.

    $$\hat\mu = \sum_{k=1}^K \bar w_k\, f(z_k) \approx \mathbb{E}_{p(z \mid x)}[f(z)],\qquad
      \bar w_k = \frac{e^{\ell_k}}{\sum_j e^{\ell_j}},$$

    biased by $O(1/K)$ and consistent (see the module notes). Samples with $\bar w_k = 0$ do not
    enter (their $f$ values may be anything, even infinite). A NaN log-weight makes the mean, the
    standard error and the ESS NaN.

    Args:
      f_values: `(K, ...)`, $f(z_k)$ for each sample (e.g. `jax.vmap(f)(z)`), floating point.
      log_weights: `(K,)`, the samples' log-weights $\ell_k$ (`elbojax.log_weights`,
        `importance_samples`).

    Returns:
      A `SNISEstimate` (`mean`, `standard_error` of shape `f_values.shape[1:]`, and the ESS).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from elbojax import snis
      >>> est = snis.posterior_expectation(jnp.array([[1.0], [3.0]]), jnp.log(jnp.array([1.0, 3.0])))
      >>> round(float(est.mean[0]), 4), round(float(est.effective_sample_size), 4)
      (2.5, 1.6)

    References:
      Owen, *Monte Carlo theory, methods and examples*, 2013, ch. 9.
    """
    log_weights = _check_log_weights(log_weights)
    f_values = jnp.asarray(f_values)
    if not jnp.issubdtype(f_values.dtype, jnp.floating):
        raise TypeError(f"`f_values` must be a floating-point array, got dtype {f_values.dtype}.")
    num = log_weights.shape[0]
    if f_values.ndim < 1 or f_values.shape[0] != num:
        raise ValueError(
            f"`f_values` must have shape (K, ...) with K = {num}, one value per log-weight; got "
            f"{f_values.shape}."
        )
    weights = normalized_weights(log_weights).astype(jnp.result_type(f_values.dtype, log_weights.dtype))
    weights = weights.reshape((num,) + (1,) * (f_values.ndim - 1))
    used = weights != 0  # NaN weights are used, so that a NaN log-weight makes the result NaN
    # An unused f is replaced before any product: 0 * inf would be NaN in the gradient.
    f_values = jnp.where(used, f_values, jnp.zeros((), f_values.dtype))
    mean = jnp.sum(weights * f_values, axis=0)
    squared = jnp.where(used, (weights * (f_values - mean)) ** 2, 0.0)
    variance = jnp.sum(squared, axis=0)
    # sqrt's derivative at 0 is infinite (times a zero cotangent: NaN); the SE of 0 (one sample,
    # one weight, or equal values) gets a zero gradient, its one-sided limit along those directions.
    # A NaN variance stays NaN (`variance > 0` would have made it 0).
    zero = variance == 0
    safe_variance = jnp.where(zero, jnp.ones_like(variance), variance)
    standard_error = jnp.where(zero, jnp.zeros_like(variance), jnp.sqrt(safe_variance))
    return SNISEstimate(mean, standard_error, effective_sample_size(log_weights))


def resample(key, log_weights, num: int, *, method: str = "multinomial") -> jax.Array:
    r"""`num` indices into the $K$ samples, drawn with probabilities $\bar w_k$.

    * `"multinomial"`: independent draws, $P(\text{index} = k) = \bar w_k$ (the Gumbel-max
      trick on the log-weights, so any scale works).
    * `"systematic"` (Kitagawa 1996): one uniform $u \sim U[0, 1)$, the points
      $(u + i) / \mathrm{num}$, $i = 0..\mathrm{num}-1$, read through the cumulative weights;
      sample $k$ is then chosen $\lfloor \mathrm{num}\,\bar w_k \rfloor$ or
      $\lceil \mathrm{num}\,\bar w_k \rceil$ times, with expectation $\mathrm{num}\,\bar w_k$: the
      same mean as multinomial with less variance. The indices come out sorted.

    Samples with weight 0 are never chosen (unless every weight is 0: then the indices mean
    nothing; check the ESS). A NaN log-weight also gives indices in range that mean nothing (the
    multinomial draw then picks a NaN sample, the systematic one the last sample): check that the
    ESS, `reductions.effective_sample_size(log_weights)`, is not NaN. The indices are not checked
    inside `jit`.

    Args:
      key: a JAX PRNG key.
      log_weights: `(K,)`.
      num: how many indices, a static int >= 1.
      method: `"multinomial"` or `"systematic"`.

    Returns:
      `int32[num]`, indices in `0 .. K-1`.

    References:
      Kitagawa 1996; Douc, Cappé & Moulines 2005, https://arxiv.org/abs/cs/0507025
    """
    _checks.check_key(key)
    log_weights = widened(_check_log_weights(log_weights))  # a 16-bit cumulative sum stops growing
    num = _checks.check_positive_int(num, "num")
    if method not in RESAMPLING_METHODS:
        raise ValueError(f"`method` must be one of {', '.join(map(repr, RESAMPLING_METHODS))}; got {method!r}.")
    if method == "multinomial":
        return jax.random.categorical(key, log_weights, shape=(num,)).astype(jnp.int32)
    cumulative = jnp.cumsum(normalized_weights(log_weights))
    positions = (jax.random.uniform(key, (), cumulative.dtype) + jnp.arange(num, dtype=cumulative.dtype)) / num
    # Scaled by the last cumulative weight (1 up to rounding), and kept strictly below it: (u + i)/num
    # rounds to exactly 1 for u near 1 in float32, and a point at the total would fall past the
    # last sample of positive weight (onto the samples of weight 0 after it).
    total = cumulative[-1]
    positions = jnp.minimum(positions * total, jnp.nextafter(total, jnp.zeros_like(total)))
    indices = jnp.searchsorted(cumulative, positions, side="right")
    return jnp.clip(indices, 0, log_weights.shape[0] - 1).astype(jnp.int32)


def importance_samples(key, x, log_joint, proposal, *, num_samples: int, chunk_size: int | None = None):
    r"""The samples $z_k \sim q$ and their log-weights $\ell_k = \log p(x, z_k) - \log q(z_k)$.

    The same draws as `elbojax.log_weights` with the same key (sample $k$ from
    `fold_in(key, k)`), so the log-weights equal `elbojax.log_weights(key, ...)` exactly.

    Args:
      key, x, log_joint, proposal, num_samples, chunk_size: as `elbojax.log_weights`.

    Returns:
      `(z, log_weights)`: `z` with a leading axis of size $K$ (a pytree if the proposal's samples
      are), `log_weights` `(K,)`.
    """
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)

    def chunk_fn(start, count):
        z, log_q = _draw(problem, start, count)
        if problem.guard is not None:  # a discrete proposal: no pathwise gradient, as in `elbojax.log_weights`
            log_q = grads.forbid_pathwise(log_q, _pathwise_refusal(problem.proposal))
        return z, _log_joint(problem, z) - log_q

    return _map_chunks(chunk_fn, problem)


def _pathwise_refusal(proposal) -> str:
    return (
        f"The log-weights of `importance_samples` / `importance_resample` have no pathwise gradient "
        f"through {type(proposal).__name__}: its samples are not a differentiable function of its "
        "parameters. Differentiate `elbojax.iwae_bound(..., gradient='score')` or another "
        "score-function estimator instead, or stop the gradient at the proposal."
    )


class Resampled(NamedTuple):
    r"""What `importance_resample` returns.

    Attributes:
      samples: `(num_resampled, ...)`, approximate draws from $p(z \mid x)$ (a pytree like $z$);
        NaN (its floating-point leaves) if a log-weight is NaN.
      indices: `int32[num_resampled]`, which of the $K$ proposals each is.
      log_weights: `(K,)`, the log-weights of all $K$ proposals.
      effective_sample_size: Kish's ESS of the $K$ weights, a scalar.
    """

    samples: Any
    indices: jax.Array
    log_weights: jax.Array
    effective_sample_size: jax.Array


def importance_resample(
    key,
    x,
    log_joint,
    proposal,
    *,
    num_samples: int,
    num_resampled: int = 1,
    method: str = "multinomial",
    chunk_size: int | None = None,
) -> Resampled:
    r"""Sampling importance resampling (SIR): $K$ proposals, `num_resampled` of them kept by weight.

    Draws $z_{1:K} \sim q$ (with `jax.random.split(key)[0]`, as `importance_samples`), then
    `resample`s with the other half of the key. As $K \to \infty$ the kept samples are draws
    from $p(z \mid x)$; at finite $K$ they are biased towards $q$ (see the module notes).

    Args:
      key, x, log_joint, proposal, num_samples, chunk_size: as `elbojax.log_weights`.
      num_resampled: how many samples to keep (with replacement).
      method: `"multinomial"` or `"systematic"` (see `resample`).

    Returns:
      A `Resampled`.

    References:
      Rubin 1988; Owen 2013, ch. 9.
    """
    _checks.check_key(key)
    num_resampled = _checks.check_positive_int(num_resampled, "num_resampled")
    draw_key, resample_key = jax.random.split(key)
    z, log_weights = importance_samples(draw_key, x, log_joint, proposal, num_samples=num_samples, chunk_size=chunk_size)
    indices = resample(resample_key, log_weights, num_resampled, method=method)
    ess = effective_sample_size(log_weights)
    samples = jax.tree.map(lambda a: nan_if(jnp.isnan(ess), a[indices]), z)
    return Resampled(samples, indices, log_weights, ess)


def nan_if(condition, values):
    """`values`, or NaN where `condition` holds (integer values are returned unchanged).

    A NaN log-weight makes the resampled indices meaningless (`resample`): the samples they pick
    are NaN then, not a plausible-looking draw.
    """
    if not jnp.issubdtype(jnp.result_type(values), jnp.inexact):
        return values
    return jnp.where(condition, jnp.full_like(values, jnp.nan), values)
