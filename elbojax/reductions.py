r"""Stable reductions of log-weights: log-mean-exp, a running log-sum-exp, the Kish ESS.

A set of log-weights $\ell_1, \dots, \ell_K$ is summarised by three numbers that combine
across chunks without keeping the set:

* the running maximum $m$ (held without gradient; the result does not depend on it),
* $s = \sum_k e^{\ell_k - \tilde m}$ with $\tilde m = m$ where finite and 0 otherwise,
* the plain sum $t = \sum_k \ell_k$.

Then $\log\sum_k e^{\ell_k} = \tilde m + \log s$ and $\frac1K\sum_k \ell_k = t / K$.
All $\ell_k = -\infty$ gives $s = 0$ and a log-sum-exp of $-\infty$, never NaN. A NaN
log-weight makes $s$, $t$ and so the result NaN: $e^{\mathrm{NaN} - \tilde m}$ enters the sum, so it
propagates and never vanishes. The maximum itself need not be NaN (XLA's CPU reduction skips NaN
when it reduces 4096 entries or more); nothing relies on it.

`Expm1Summary` adds $e = \sum_k \operatorname{expm1}(\ell_k - \tilde m)$ and the count $K$, so that
$\log\frac1K\sum_k e^{\ell_k} = \tilde m + \operatorname{log1p}(e / K)$ keeps its relative precision
when the $\ell_k$ are all close together (there $\log s - \log K$ rounds to 0): the Rényi bound
near $\alpha = 1$ divides that number by $1 - \alpha$.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from elbojax import _checks


class LogWeightSummary(NamedTuple):
    r"""Running summary of a set of log-weights (all fields are scalars of the weights' dtype).

    Attributes:
      max: the largest log-weight seen so far, without gradient; $-\infty$ for none.
      scaled_sum_exp: $\sum_k \exp(\ell_k - \tilde m)$, with $\tilde m$ = `max` where finite, else 0.
      total: $\sum_k \ell_k$.
    """

    max: jax.Array
    scaled_sum_exp: jax.Array
    total: jax.Array


def _finite_or_zero(m):
    return jnp.where(jnp.isfinite(m), m, jnp.zeros_like(m))


def widened(values: jax.Array) -> jax.Array:
    """`values` in at least float32: a 16-bit sum stops growing (bfloat16 keeps 8 bits), so the
    estimators reduce 16-bit log-weights in float32 and return a float32 estimate."""
    return values.astype(jnp.promote_types(values.dtype, jnp.float32))


def summarize(log_weights: jax.Array) -> LogWeightSummary:
    """Summarise a 1-D array of log-weights (shape `(K,)`), in at least float32 (`widened`)."""
    log_weights = widened(log_weights)
    m = jax.lax.stop_gradient(jnp.max(log_weights))
    scaled = jnp.sum(jnp.exp(log_weights - _finite_or_zero(m)))
    return LogWeightSummary(m, scaled, jnp.sum(log_weights))


def combine(a: LogWeightSummary, b: LogWeightSummary) -> LogWeightSummary:
    """Summary of the union of two sets of log-weights."""
    m = jnp.maximum(a.max, b.max)
    shift = _finite_or_zero(m)
    # Each factor is exp(m_old - m_new) <= 1. Clipping the exponent at 0 only acts where an old
    # maximum was -inf (its scaled sum is 0) or the new one is +inf, and keeps 0 * inf out.
    scale_a = jnp.exp(jnp.minimum(_finite_or_zero(a.max) - shift, 0.0))
    scale_b = jnp.exp(jnp.minimum(_finite_or_zero(b.max) - shift, 0.0))
    return LogWeightSummary(
        m, a.scaled_sum_exp * scale_a + b.scaled_sum_exp * scale_b, a.total + b.total
    )


def summary_logsumexp(summary: LogWeightSummary) -> jax.Array:
    r"""$\log \sum_k e^{\ell_k}$ from a summary."""
    return _finite_or_zero(summary.max) + jnp.log(summary.scaled_sum_exp)


class Expm1Summary(NamedTuple):
    r"""A `LogWeightSummary` with what keeps $\log\frac1K\sum_k e^{\ell_k}$ precise for close $\ell_k$.

    Attributes:
      summary: the `LogWeightSummary` of the same log-weights.
      scaled_sum_expm1: $e = \sum_k \operatorname{expm1}(\ell_k - \tilde m)$, with $\tilde m$ the
        summary's shift; in $[-K, 0]$ unless a log-weight is $+\infty$ or NaN.
      count: $K$, a scalar of the weights' dtype.
    """

    summary: LogWeightSummary
    scaled_sum_expm1: jax.Array
    count: jax.Array


def summarize_expm1(log_weights: jax.Array) -> Expm1Summary:
    """Summarise a 1-D array of log-weights (shape `(K,)`), with the expm1 sum and the count."""
    log_weights = widened(log_weights)
    summary = summarize(log_weights)
    expm1_sum = jnp.sum(jnp.expm1(log_weights - _finite_or_zero(summary.max)))
    return Expm1Summary(summary, expm1_sum, jnp.asarray(log_weights.shape[0], log_weights.dtype))


def combine_expm1(a: Expm1Summary, b: Expm1Summary) -> Expm1Summary:
    r"""Summary of the union of two sets of log-weights.

    Moving a sum from shift $\tilde m_a$ to $\tilde m$ is
    $\sum_k \operatorname{expm1}(\ell_k - \tilde m) = e^{\delta} e_a + K_a \operatorname{expm1}(\delta)$,
    $\delta = \tilde m_a - \tilde m \le 0$: both terms are $\le 0$, so nothing cancels.
    """
    summary = combine(a.summary, b.summary)
    shift = _finite_or_zero(summary.max)

    def moved(part: Expm1Summary):
        # delta is clipped at 0 exactly where `combine` clips it (a set whose terms are all -1 or inf).
        delta = jnp.minimum(_finite_or_zero(part.summary.max) - shift, 0.0)
        return jnp.exp(delta) * part.scaled_sum_expm1 + part.count * jnp.expm1(delta)

    return Expm1Summary(summary, moved(a) + moved(b), a.count + b.count)


def summary_logmeanexp(summary: Expm1Summary) -> jax.Array:
    r"""$\log \frac1K \sum_k e^{\ell_k}$ from an `Expm1Summary`, precise also for close log-weights.

    $\tilde m + \operatorname{log1p}(e / K)$ while $e / K > -\tfrac12$ (the terms are close to the
    maximum; $\operatorname{log1p}$ keeps the small result's relative precision), else
    $\tilde m + \log(s / K)$ (a few terms dominate; $s / K < \tfrac12$ is far from 1). The two are
    the same number up to rounding, so the result is continuous in the $\ell_k$.
    """
    shift = _finite_or_zero(summary.summary.max)
    mean_expm1 = summary.scaled_sum_expm1 / summary.count
    mean_exp = summary.summary.scaled_sum_exp / summary.count
    close = mean_expm1 > -0.5
    # Each branch sees a harmless input where it is not taken, so its gradient there is 0, not NaN.
    near = jnp.log1p(jnp.where(close, mean_expm1, jnp.zeros_like(mean_expm1)))
    far = jnp.log(jnp.where(close, jnp.ones_like(mean_exp), mean_exp))
    return shift + jnp.where(close, near, far)


def logmeanexp(a: jax.Array, axis: int | tuple[int, ...] | None = None, keepdims: bool = False):
    r"""Stable $\log \frac1n \sum_i e^{a_i}$ over `axis` (all axes when `None`).

    Args:
      a: array of log-values.
      axis: the axis or axes to reduce.
      keepdims: keep the reduced axes with size 1.

    Returns:
      `logsumexp(a, axis) - log n`, where `n` is the number of reduced entries. All $-\infty$
      gives $-\infty$ (not NaN).
    """
    a = jnp.asarray(a)
    axes = tuple(range(a.ndim)) if axis is None else _checked_axes(axis, a.shape)
    axis = None if axis is None else axes
    count = math.prod(a.shape[ax] for ax in axes)
    if count == 0:
        raise ValueError(f"`logmeanexp` needs at least one entry along axis {axis}, got shape {a.shape}.")
    return jax.nn.logsumexp(a, axis=axis, keepdims=keepdims) - math.log(count)


def _checked_axes(axis, shape) -> tuple[int, ...]:
    """`axis` (an int or a sequence of ints) as a tuple of axes of `shape`, each in 0..ndim-1."""
    axes = (axis,) if _checks.is_int(axis) else tuple(axis) if isinstance(axis, (tuple, list)) else None
    if axes is None or not all(_checks.is_int(ax) for ax in axes):
        raise TypeError(f"`axis` must be None, an int or a tuple of ints, got {axis!r}.")
    ndim = len(shape)
    if not all(-ndim <= ax < ndim for ax in axes):
        raise ValueError(f"`axis` {axis!r} is out of range for an array of shape {tuple(shape)}.")
    return tuple(int(ax) % ndim for ax in axes)


def effective_sample_size(log_weights: jax.Array, axis: int = -1) -> jax.Array:
    r"""Kish's effective sample size of the self-normalised weights.

    $$\mathrm{ESS} = \frac{\left(\sum_k w_k\right)^2}{\sum_k w_k^2}
      = \exp\!\big(2\,\mathrm{LSE}(\ell) - \mathrm{LSE}(2\ell)\big),\qquad w_k = e^{\ell_k},$$

    between 1 (one weight dominates) and $K$ (equal weights). Computed from the weights relative
    to the largest (`exp_shifted`), so it is exact for log-weights far outside float range and
    unchanged by a shift of them.

    Args:
      log_weights: array whose `axis` holds the $K$ log-weights.
      axis: the sample axis.

    Returns:
      The ESS, with `axis` reduced. 0 where every weight is zero (all log-weights $-\infty$);
      the number of $+\infty$ log-weights where there are any (they dominate the others).

    References:
      Kish, *Survey Sampling*, 1965; Owen, *Monte Carlo theory, methods and examples*, ch. 9.
    """
    log_weights = jnp.asarray(log_weights)
    if not _checks.is_int(axis):
        raise TypeError(f"`axis` must be an int (the sample axis of `log_weights`), got {axis!r}.")
    if log_weights.ndim == 0:
        raise ValueError(
            "`log_weights` must have at least one axis, the K log-weights along `axis` (shape (K,) "
            f"for one data point); got shape {log_weights.shape}."
        )
    if not -log_weights.ndim <= axis < log_weights.ndim:
        raise ValueError(
            f"`axis` {axis} is out of range for `log_weights` of shape {log_weights.shape} "
            "(the axis that holds the K log-weights)."
        )
    if log_weights.shape[axis] < 1:
        raise ValueError(f"`log_weights` must hold K >= 1 log-weights along `axis` {axis}, got shape {log_weights.shape}.")
    # w / max(w): the largest is 1, so neither sum overflows; in float32 for 16-bit log-weights
    # (float16's total ** 2 overflows once the ESS passes 256).
    exps = exp_shifted(widened(log_weights), axis)
    total, total_sq = jnp.sum(exps, axis=axis), jnp.sum(exps * exps, axis=axis)
    # Both sums are 0 when every weight is: the ESS is 0 then, with a zero gradient (no 0 / 0).
    return total * total / jnp.where(total_sq == 0, jnp.ones_like(total_sq), total_sq)


def exp_shifted(log_weights, axis: int) -> jax.Array:
    r"""$e^{\ell_k - m}$ with $m = \max_k \ell_k$ along `axis` (0 where every $\ell_k = -\infty$).

    Weights relative to the largest: the ratios of self-normalised weights and the ESS do not
    depend on $m$, so it is held fixed under differentiation. Exactly invariant to a shift of
    $\ell$, unlike $e^{\ell_k - \mathrm{LSE}(\ell)}$, whose rounded log-sum-exp loses the
    digits of large log-weights (float32 at $\ell \approx -10^7$: four equal weights got
    0.368 each).
    """
    largest = jax.lax.stop_gradient(jnp.max(log_weights, axis=axis, keepdims=True))
    exps = jnp.exp(log_weights - jnp.where(jnp.isfinite(largest), largest, jnp.zeros_like(largest)))
    # A +inf log-weight: the +inf ones share the weight, 1 each relative to the largest (not inf - inf).
    return jnp.where(jnp.isposinf(largest), jnp.isposinf(log_weights).astype(exps.dtype), exps)
