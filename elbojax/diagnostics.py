r"""Diagnostics for importance weights, gradient estimators and latent codes.

Each function is pure and checks its arguments at trace time, so it runs under `jax.jit`. The
weight diagnostics and the KL take the quantities of ONE data point (batch with `jax.vmap`);
the gradient SNR takes repeated draws of one gradient; `active_units` is a statistic of a
whole data set and takes the batch.

**Effective sample size** (`effective_sample_size`, Kish 1965). From the log-weights
$\ell_{1:K}$ of one data point,
$\mathrm{ESS} = (\sum_k w_k)^2 / \sum_k w_k^2 \in [1, K]$ (0 when every weight is 0): about $K$
when the weights are even, about 1 when one weight carries the estimate. It only sees the $K$ weights drawn, so a
proposal that misses a region of the posterior altogether can still show a high ESS.

**Pareto $\hat k$** (`pareto_k_hat`, Vehtari, Simpson, Gelman, Yao & Gabry,
https://arxiv.org/abs/1507.02646). Fits a generalised Pareto distribution to the largest
weights; its shape $\hat k$ estimates how heavy the tail of the weight distribution is, hence
how many moments the weights have ($k < 1/r$ means $r$ of them). Read it as

| $\hat k$ | the weights | importance sampling (`iwae_bound`, `importance_log_marginal`) |
|---|---|---|
| $< 0.5$ | finite variance | converges at the usual $1/\sqrt K$ rate: fine |
| $0.5$ – $0.7$ | infinite variance, finite mean | converges, slowly and noisily: usable |
| $> 0.7$ | so heavy that $K$ draws look like an infinite mean | unreliable: the value may be far from $\log p(x)$ whatever its Monte Carlo error looks like |

Yao, Vehtari, Simpson & Gelman (https://arxiv.org/abs/1802.02538) use the same number to judge
a variational approximation $q$ itself: $\hat k > 0.7$ says $q$ is too far from the posterior
(typically too narrow) for its expectations to be trusted.

**Gradient signal-to-noise ratio** (`gradient_snr`, `pooled_gradient_snr`, Rainforth et al.,
https://arxiv.org/abs/1802.04537). From repeated independent draws of a stochastic gradient,
$|\mathbb{E}\,g| / \mathrm{std}(g)$ per parameter. Below about 1 the noise hides the direction
of the expected gradient and stochastic optimisation crawls. Rainforth et al. show that for the
IWAE bound the SNR of the inference network's reparameterised gradient falls like
$1/\sqrt K$; compare `gradient="reparam"` with `"dreg"` or `"stl"` with this number.

**KL per latent dimension** (`kl_per_dimension`). For a diagonal Gaussian $q$ and prior, the
KL term of the ELBO splits into one closed-form term per dimension. A dimension whose KL is
about 0 for every data point carries no information about $x$: posterior collapse.

**Active units** (`active_units`, Burda, Grosse & Salakhutdinov,
https://arxiv.org/abs/1509.00519). A latent dimension is active if its posterior mean
$\mathbb{E}_{q(z \mid x)}[z_j]$ varies across the data set by more than a threshold (0.01 in
the paper). An inactive dimension tells the decoder (almost) nothing about $x$.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elbojax import _checks
from elbojax.reductions import effective_sample_size, widened

__all__ = [
    "ActiveUnits",
    "active_units",
    "effective_sample_size",
    "gradient_snr",
    "kl_per_dimension",
    "pareto_k_hat",
    "pooled_gradient_snr",
]


# ----------------------------------------------------------------------------------------------
# Pareto k-hat
# ----------------------------------------------------------------------------------------------

_MIN_TAIL = 5  # fewer tail weights than this and the fit is not attempted (as in the reference)
_MIN_NUM_SAMPLES = 21  # the smallest K whose tail holds 5 weights: ceil(21 / 5) = 5
_MIN_GRID_POINTS = 30  # the grid has 30 + floor(sqrt(M)) points (PSIS reference implementation)
_GRID_PRIOR = 3.0  # Zhang & Stephens' prior constant, in the spacing of the grid
_PRIOR_STRENGTH = 10.0  # the weakly informative prior on k: 10 pseudo-observations ...
_PRIOR_CENTRE = 0.5  # ... at k = 0.5
_NEGLIGIBLE = 10 * np.finfo(np.float64).eps  # grid weights below this are dropped (reference)


def _tail_length(num_samples: int) -> int:
    r"""$M = \lceil \min(K/5,\ 3\sqrt K) \rceil$, the number of largest weights fitted."""
    return math.ceil(min(num_samples / 5, 3 * math.sqrt(num_samples)))


def _gpd_shape(exceedances: jax.Array, tail_size: jax.Array) -> jax.Array:
    r"""Zhang & Stephens' estimate of the generalised Pareto shape, with the PSIS prior on it.

    Args:
      exceedances: shape `(M,)`, ascending; the first `M - tail_size` entries are 0 (not in the
        tail) and the rest positive.
      tail_size: $n$, the number of positive entries (an integer scalar, may be traced).

    Returns:
      $(n \hat k + 10 \cdot 0.5) / (n + 10)$, a scalar; meaningless (possibly NaN) when $n = 0$.
    """
    dtype = exceedances.dtype
    n = tail_size.astype(dtype)
    largest = exceedances[-1]
    first_quartile = exceedances[_first_quartile_index(exceedances.shape[0], tail_size)]
    # The grid has a static maximal size; the points past the n-dependent size are masked out.
    num_points = _MIN_GRID_POINTS + jnp.floor(jnp.sqrt(n))
    j = jnp.arange(1, _MIN_GRID_POINTS + math.isqrt(exceedances.shape[0]) + 1, dtype=dtype)
    theta = (jnp.sqrt(num_points / (j - 0.5)) - 1.0) / (_GRID_PRIOR * first_quartile) - 1.0 / largest
    # Entries outside the tail are 0 and add log1p(0) = 0 to every sum.
    shape = jnp.sum(jnp.log1p(theta[:, None] * exceedances), axis=1) / n
    profile = n * (jnp.log(theta / shape) - shape - 1.0)
    weights = jax.nn.softmax(jnp.where(j <= num_points, profile, -jnp.inf))
    weights = jnp.where(weights >= _NEGLIGIBLE, weights, 0.0)
    theta_mean = jnp.sum(weights * theta) / jnp.sum(weights)
    k_hat = jnp.sum(jnp.log1p(theta_mean * exceedances)) / n
    return (n * k_hat + _PRIOR_STRENGTH * _PRIOR_CENTRE) / (n + _PRIOR_STRENGTH)


def _first_quartile_index(length: int, tail_size: jax.Array) -> jax.Array:
    """The index of y_(floor(n/4 + 1/2)) in an ascending `(length,)` array whose n = `tail_size` positive entries come last."""
    return length - tail_size + (tail_size + 2) // 4 - 1


def pareto_k_hat(log_weights: jax.Array) -> jax.Array:
    r"""The Pareto-smoothed importance sampling diagnostic $\hat k$ for one data point.

    The $M = \lceil\min(K/5, 3\sqrt K)\rceil$ largest weights, as exceedances
    $y_i = w_{(K-M+i)} - u$ over the next largest weight $u = w_{(K-M)}$ (only those with
    $y_i > 0$; let $n \le M$ be their number), are fitted with a generalised Pareto
    distribution

    $$p(y \mid \sigma, k) = \frac1\sigma \Big(1 + \frac{k y}{\sigma}\Big)^{-1/k - 1},\qquad y > 0,$$

    by the empirical-Bayes estimator of Zhang & Stephens (2009). With $\theta = k / \sigma$,
    the profile estimate and log-likelihood are

    $$\hat k(\theta) = \frac1n \sum_i \log(1 + \theta y_i),\qquad
      L(\theta) = n\,\big[\log(\theta / \hat k(\theta)) - \hat k(\theta) - 1\big];$$

    $\theta$ is averaged over a grid with weights $\propto e^{L(\theta_j)}$,

    $$\theta_j = \frac{\sqrt{m / (j - \frac12)} - 1}{3\, y_{(\lfloor n/4 + 1/2 \rfloor)}}
      - \frac{1}{y_{(n)}},\quad j = 1..m,\quad m = 30 + \lfloor\sqrt n\rfloor,$$

    ($y_{(i)}$ ascending; grid weights below $10\epsilon_{64}$ are dropped, as in the PSIS
    reference implementation) and, with $\bar\theta$ that average, the weakly informative prior
    of Vehtari et al. shrinks the estimate toward 0.5:

    $$\hat k = \frac{n\, \hat k(\bar\theta) + 10 \cdot 0.5}{n + 10}.$$

    Only ratios of weights matter ($\hat k$ is invariant to scaling $y$): the weights are used
    as $e^{\ell_k - \max_j \ell_j}$ and the exceedances as
    $y_i / u = \mathrm{expm1}(\ell_{(K-M+i)} - \log u)$, so log-weights far outside the float
    range are fine. As in the reference implementation, $u$ is floored at the smallest normal
    float times the largest weight, and the exceedances are divided by their first quartile
    (computed in log space, and less where the largest would then overflow), so that the grid's
    $\theta_j$ stay of order one: divided by a floored $u$ alone they reached $1/\text{tiny}$
    and $\theta_j$ rounded to 0 (NaN).

    How to read it: $\hat k < 0.5$, the weights have finite variance and importance sampling is
    fine; $0.5 \le \hat k \le 0.7$, infinite variance, usable but slow to converge;
    $\hat k > 0.7$, unreliable. (Vehtari et al. 2024 refine the 0.7 to
    $\min(1 - 1/\log_{10} K,\ 0.7)$ for small $K$.)

    Args:
      log_weights: shape `(K,)`, the log-weights $\ell_k = \log p(x, z_k) - \log q(z_k)$ of one
        data point, e.g. from `elbojax.log_weights`; $K \ge 21$ (a tail of at least 5).

    Returns:
      $\hat k$, a scalar of the log-weights' dtype, without gradient. $+\infty$ when fewer than
      5 weights lie strictly above $u$ (all weights equal, ties from a discrete proposal, or all
      weights zero): the fit is impossible, as in the reference implementation; look at the ESS
      instead. NaN if a log-weight is NaN; $+\infty$ if one is $+\infty$.

    References:
      Vehtari, Simpson, Gelman, Yao & Gabry, *Pareto Smoothed Importance Sampling*, JMLR 2024,
      https://arxiv.org/abs/1507.02646;
      Zhang & Stephens, *A New and Efficient Estimation Method for the Generalized Pareto
      Distribution*, Technometrics 51(3), 2009.
    """
    log_weights = jnp.asarray(log_weights)
    if log_weights.ndim != 1:
        raise ValueError(
            f"`log_weights` must have shape (K,) (one data point; batch with `jax.vmap`), "
            f"got shape {log_weights.shape}."
        )
    if not jnp.issubdtype(log_weights.dtype, jnp.floating):
        raise TypeError(f"`log_weights` must be floating point, got dtype {log_weights.dtype}.")
    num_samples = log_weights.shape[0]
    if num_samples < _MIN_NUM_SAMPLES:
        raise ValueError(
            f"`pareto_k_hat` fits the largest min(K/5, 3 sqrt(K)) weights and needs at least "
            f"{_MIN_TAIL} of them, so K >= {_MIN_NUM_SAMPLES} log-weights; got K = {num_samples}."
        )
    tail_length = _tail_length(num_samples)
    dtype = log_weights.dtype
    # In at least float32: a 16-bit fit gave NaN (theta and k(theta) of opposite signs by rounding).
    log_weights = widened(jax.lax.stop_gradient(log_weights))

    # NaN if any log-weight is: on CPU, XLA's `max` over 4096 entries or more skips NaN.
    largest = jnp.where(jnp.any(jnp.isnan(log_weights)), jnp.nan, jnp.max(log_weights))
    shifted = log_weights - jnp.where(jnp.isfinite(largest), largest, 0.0)
    ordered = jnp.sort(shifted)
    # Flooring u at `tiny` (relative to the largest weight) keeps every y_i / u a finite float.
    log_threshold = jnp.maximum(ordered[-tail_length - 1], jnp.log(jnp.finfo(ordered.dtype).tiny))
    top = ordered[-tail_length:]
    in_tail = top > log_threshold
    tail_size = jnp.sum(in_tail)
    gaps = jnp.where(in_tail, top - log_threshold, 1.0)
    log_exceedances = gaps + jnp.log(-jnp.expm1(-gaps))  # log(y_i / u) = log(expm1(gap)), no overflow
    log_quartile = log_exceedances[_first_quartile_index(tail_length, tail_size)]
    # ... but never so far that the largest overflows (a tail spanning the whole float range).
    log_scale = jnp.maximum(log_quartile, log_exceedances[-1] - (jnp.log(jnp.finfo(ordered.dtype).max) - 2.0))
    exceedances = jnp.where(in_tail, jnp.exp(log_exceedances - log_scale), 0.0)

    k_hat = jnp.where(tail_size >= _MIN_TAIL, _gpd_shape(exceedances, tail_size), jnp.inf)
    # NaN stays NaN and +inf stays +inf; -inf (all weights zero) has an empty tail, so +inf.
    return jnp.where(jnp.isnan(largest) | (largest == jnp.inf), largest, k_hat).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Gradient signal-to-noise ratio
# ----------------------------------------------------------------------------------------------


def _check_draws(grads: Any, axis: Any, name: str) -> list:
    """Check a pytree of stacked gradient draws; return its leaves as arrays."""
    if not _checks.is_int(axis):
        raise TypeError(
            f"`axis` of `{name}` must be a static Python int, got {axis!r} of type "
            f"{type(axis).__name__}. Under `jax.jit`, mark it static (`static_argnames='axis'`)."
        )
    paths_and_leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
    if not paths_and_leaves:
        raise ValueError(f"`{name}` needs at least one array of gradient draws, got {grads!r}.")
    leaves, num_draws, first = [], None, None
    for path, leaf in paths_and_leaves:
        where = jax.tree_util.keystr(path) or "(the array)"
        leaf = jnp.asarray(leaf)
        if not jnp.issubdtype(leaf.dtype, jnp.floating):
            raise TypeError(f"`grads` leaf {where} must be floating point, got dtype {leaf.dtype}.")
        if not -leaf.ndim <= axis < leaf.ndim:
            raise ValueError(
                f"`grads` leaf {where} has shape {leaf.shape}, which has no axis {axis} to hold the draws."
            )
        if num_draws is None:
            num_draws, first = leaf.shape[axis], where
        elif leaf.shape[axis] != num_draws:
            raise ValueError(
                f"Every `grads` leaf must hold the same number of draws along axis {axis}: leaf "
                f"{first} has {num_draws}, leaf {where} has {leaf.shape[axis]}."
            )
        leaves.append(leaf)
    if num_draws < 2:
        raise ValueError(
            f"`{name}` needs at least 2 draws along axis {axis} to estimate a variance, got {num_draws}."
        )
    return leaves


def _mean_and_variance(draws: jax.Array, axis: int):
    """Sample mean and unbiased (ddof=1) variance along `axis`.

    Computed from the deviations from the first draw, so that identical draws give a variance of
    exactly 0 (the mean of N equal floats is not always that float); in at least float32, since
    16-bit squares overflow (float16 beyond 256) and 16-bit sums stop growing.
    """
    draws = widened(draws)
    first = jax.lax.index_in_dim(draws, 0, axis, keepdims=True)
    deviations = draws - first
    mean = jnp.squeeze(first, axis) + jnp.mean(deviations, axis=axis)
    return mean, jnp.var(deviations, axis=axis, ddof=1)


def _signal_to_noise(signal: jax.Array, noise: jax.Array) -> jax.Array:
    """`signal / noise` for `signal, noise >= 0`, with 0 / 0 = 0 and x / 0 = inf; NaN stays NaN."""
    zero_noise = noise == 0
    ratio = signal / jnp.where(zero_noise, 1.0, noise)
    return jnp.where(zero_noise, jnp.where(signal == 0, 0.0, jnp.inf), ratio)


def gradient_snr(grads: Any, axis: int = 0) -> Any:
    r"""Per-parameter signal-to-noise ratio of a stochastic gradient (Rainforth et al. 2018).

    $$\mathrm{SNR}_i = \frac{|\hat{\mathbb{E}}[g_i]|}{\hat\sigma[g_i]},\qquad
      \hat{\mathbb{E}}[g_i] = \frac1N \sum_{n=1}^N g_i^{(n)},\quad
      \hat\sigma^2[g_i] = \frac{1}{N - 1} \sum_{n=1}^N \big(g_i^{(n)} - \hat{\mathbb{E}}[g_i]\big)^2,$$

    from $N$ independent draws $g^{(n)}$ of the gradient estimator (e.g. `jax.grad` of an
    estimator under `jax.vmap` over keys).

    A parameter whose draws are all equal has zero variance: its SNR is $+\infty$ if the
    gradient is non-zero (no noise) and 0 if it is exactly 0 in every draw (no signal, e.g. a
    parameter the objective does not use). NaN draws give NaN.

    Args:
      grads: a pytree of arrays of gradient draws, each with the $N \ge 2$ draws along `axis`
        (the same $N$ for every leaf), e.g. `(N, *param_shape)` for `axis=0`.
      axis: the draws axis of every leaf; a static int.

    Returns:
      A pytree of the structure of `grads`, each leaf with `axis` removed (the parameter's shape).

    References:
      Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, *Tighter Variational Bounds are Not
      Necessarily Better*, ICML 2018, https://arxiv.org/abs/1802.04537
    """
    _check_draws(grads, axis, "gradient_snr")

    def snr(draws):
        mean, variance = _mean_and_variance(jnp.asarray(draws), axis)
        return _signal_to_noise(jnp.abs(mean), jnp.sqrt(variance))

    return jax.tree.map(snr, grads)


def pooled_gradient_snr(grads: Any, axis: int = 0) -> jax.Array:
    r"""One signal-to-noise ratio for all the parameters together.

    $$\mathrm{SNR} = \frac{\|\hat{\mathbb{E}}[g]\|_2}{\sqrt{\sum_i \hat\sigma^2[g_i]}},$$

    with the per-parameter means and ($N - 1$) variances of `gradient_snr`, $i$ over every
    entry of every leaf: the length of the mean gradient over the root of the expected squared
    distance of a draw from it.

    Why this and not the mean of the per-parameter SNRs: $1/\mathrm{SNR}^2$ is the mean squared
    error of one gradient draw relative to the squared length of the expected gradient, the
    number that governs a stochastic gradient step; it is one parameter's SNR when there is one
    parameter; parameters the objective does not use (zero in every draw) leave it unchanged,
    where they would drag a mean of SNRs toward 0; and it is finite unless every parameter is
    noiseless, where a mean of SNRs is $+\infty$ as soon as one is.

    Zero total variance gives $+\infty$ (non-zero mean) or 0 (every draw exactly 0).

    Args:
      grads, axis: as `gradient_snr`.

    Returns:
      A scalar.

    References:
      Rainforth et al. 2018, https://arxiv.org/abs/1802.04537 (per-parameter SNR).
    """
    leaves = _check_draws(grads, axis, "pooled_gradient_snr")
    squared_norm = 0.0
    total_variance = 0.0
    for draws in leaves:
        mean, variance = _mean_and_variance(draws, axis)
        squared_norm = squared_norm + jnp.sum(mean**2)
        total_variance = total_variance + jnp.sum(variance)
    return _signal_to_noise(jnp.sqrt(squared_norm), jnp.sqrt(total_variance))


# ----------------------------------------------------------------------------------------------
# Posterior collapse: KL per dimension, active units
# ----------------------------------------------------------------------------------------------


def kl_per_dimension(proposal_mean, proposal_scale, prior_mean=0.0, prior_scale=1.0) -> jax.Array:
    r"""$\mathrm{KL}(q \,\|\, p)$ per latent dimension for a diagonal Gaussian $q$ and prior $p$.

    $$\mathrm{KL}\big(\mathcal{N}(m_j, s_j^2) \,\big\|\, \mathcal{N}(\mu_j, \sigma_j^2)\big)
      = \frac12 \Big(\frac{m_j - \mu_j}{\sigma_j}\Big)^2 + \frac12\big(e^{2\delta_j} - 1\big)
        - \delta_j,\qquad \delta_j = \log s_j - \log \sigma_j,$$

    computed with `expm1`, which keeps the small values of nearly collapsed dimensions accurate.
    The sum over $j$ is the KL term of the ELBO. A dimension with KL near 0 for every data point
    has collapsed to the prior (posterior collapse).

    Args:
      proposal_mean: $m$, shape `(d,)` (any shape works; the result has it).
      proposal_scale: $s > 0$ (standard deviations), the shape of `proposal_mean`.
      prior_mean: $\mu$, broadcastable to `(d,)`; default 0.
      prior_scale: $\sigma > 0$, broadcastable to `(d,)`; default 1.

    Returns:
      Shape `(d,)`, each entry $\ge 0$ (in exact arithmetic). A zero proposal scale, an infinite
      one or a zero prior scale gives +inf (the limit), a negative scale NaN.
    """
    proposal_mean, proposal_scale, prior_mean, prior_scale = map(
        jnp.asarray, (proposal_mean, proposal_scale, prior_mean, prior_scale)
    )
    shape = proposal_mean.shape
    if proposal_scale.shape != shape:
        raise ValueError(
            f"`proposal_scale` must have the shape of `proposal_mean`, {shape}, got {proposal_scale.shape}."
        )
    for value, name in ((prior_mean, "prior_mean"), (prior_scale, "prior_scale")):
        try:
            broadcast = jnp.broadcast_shapes(value.shape, shape)
        except ValueError:
            broadcast = None
        if broadcast != shape:
            raise ValueError(
                f"`{name}` must be broadcastable to the proposal's shape {shape}, got shape {value.shape}."
            )
    kl, log_scale_ratio = _kl_terms(proposal_mean, proposal_scale, prior_mean, prior_scale)
    # An infinite proposal scale, or a zero prior scale: +inf, the limit (expm1(inf) - inf is NaN).
    return jnp.where(jnp.isposinf(log_scale_ratio), jnp.inf, kl)


def _kl_terms(proposal_mean, proposal_scale, prior_mean, prior_scale):
    """The per-dimension KL (NaN for an infinite scale ratio) and the log scale ratio."""
    log_scale_ratio = jnp.log(proposal_scale) - jnp.log(prior_scale)
    standardized = (proposal_mean - prior_mean) / prior_scale
    return 0.5 * standardized**2 + 0.5 * jnp.expm1(2.0 * log_scale_ratio) - log_scale_ratio, log_scale_ratio


def _fused_kl_per_dimension(proposal_mean, proposal_scale, prior_mean=0.0, prior_scale=1.0) -> jax.Array:
    """`kl_per_dimension` without its checks and its guard for infinite scale ratios: the form
    the training step differentiates (one fused pass; a finite step never meets the guard's case,
    and a non-finite one is skipped either way)."""
    return _kl_terms(proposal_mean, proposal_scale, prior_mean, prior_scale)[0]


class ActiveUnits(NamedTuple):
    r"""The result of `active_units`.

    Attributes:
      count: integer scalar, the number of dimensions with `variance > threshold`; -1 if a
        variance is NaN (a NaN posterior mean), never a count that leaves those dimensions out.
      variance: shape `(d,)`, $\mathrm{Var}_x\, \mathbb{E}_{q(z \mid x)}[z_j]$ over the data set.
    """

    count: jax.Array
    variance: jax.Array


def active_units(posterior_means: jax.Array, threshold=0.01) -> ActiveUnits:
    r"""Burda et al.'s active units: latent dimensions whose posterior mean varies with $x$.

    $$A_j = \mathrm{Var}_{x}\big(\mathbb{E}_{q(z \mid x)}[z_j]\big)
      = \frac1N \sum_{n=1}^N \Big(\mu_{nj} - \frac1N \sum_{n'} \mu_{n'j}\Big)^2,
      \qquad \text{dimension } j \text{ is active if } A_j > \text{threshold}.$$

    A data-set statistic, not a per-data-point one: it takes the whole batch. The variance is
    that of the data set as given (divided by $N$, not $N - 1$): the data set is the
    distribution of $x$ here, not a sample from it.

    Args:
      posterior_means: shape `(N, d)`, row $n$ the proposal's mean $\mathbb{E}_{q(z \mid x_n)}[z]$
        for data point $x_n$, $N \ge 2$.
      threshold: a scalar; 0.01 in the paper.

    Returns:
      `ActiveUnits(count, variance)`.

    References:
      Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016, sec. 5.2,
      https://arxiv.org/abs/1509.00519
    """
    posterior_means = jnp.asarray(posterior_means)
    if posterior_means.ndim != 2 or posterior_means.shape[0] < 2:
        raise ValueError(
            "`posterior_means` must have shape (N, d) with N >= 2 data points (one row per data "
            f"point; this diagnostic takes the whole data set), got shape {posterior_means.shape}."
        )
    if isinstance(threshold, (bool, np.bool_)) or not isinstance(threshold, (numbers.Real, jax.Array, np.ndarray)):
        raise TypeError(f"`threshold` must be a real number >= 0, got {threshold!r} of type {type(threshold).__name__}.")
    if jnp.shape(threshold) != ():
        raise ValueError(f"`threshold` must be a scalar, got shape {jnp.shape(threshold)}.")
    if not isinstance(threshold, jax.core.Tracer) and not (np.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"`threshold` must be a finite number >= 0, got {threshold}.")
    variance = jnp.var(posterior_means, axis=0)
    count = jnp.sum(variance > threshold)
    return ActiveUnits(jnp.where(jnp.any(jnp.isnan(variance)), -1, count).astype(count.dtype), variance)
