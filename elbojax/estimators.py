r"""Estimators of $\log p(x)$ and its lower bounds, all reductions of one log-weights core.

For one data point $x$, a model's log joint $\log p(x, z)$ and a proposal $q(z)$, draw
$z_k \sim q$ for $k = 1..K$ and form the log-weights

$$\ell_k = \log w_k = \log p(x, z_k) - \log q(z_k).$$

Every estimator here is a reduction of $\ell_{1:K}$:

| estimator | reduction |
|---|---|
| `elbo` | $\frac1K \sum_k \ell_k$ |
| `iwae_bound`, `importance_log_marginal` | $\log \frac1K \sum_k e^{\ell_k}$ |
| `naive_mc_log_marginal` | the same, with $q$ the prior or a uniform distribution |

**One number read two ways.** $\hat p(x) = \frac1K\sum_k w_k$ is an unbiased estimate of
$p(x)$: $\mathbb{E}_q[w_k] = \int p(x, z)\,dz = p(x)$. Its logarithm is therefore, by Jensen's
inequality ($\log$ is concave), a downward-biased estimate of $\log p(x)$:
$\mathbb{E}[\log \hat p(x)] \le \log \mathbb{E}[\hat p(x)] = \log p(x)$. Read as an estimate of
$\log p(x)$ it is `importance_log_marginal`; read as an objective to maximise it is the IWAE bound
$\mathcal{L}_K$ of Burda et al. (2016), which rises with $K$ toward $\log p(x)$. At $K = 1$ it is
the ELBO's one-sample estimate.

**Naive Monte Carlo is importance sampling with a poor proposal.** Drawing from the prior gives
$\ell_k = \log p(x \mid z_k)$ and $\hat p(x) = \frac1K \sum_k p(x \mid z_k)$; drawing uniformly
from a finite support $S$ gives $\hat p(x) = |S| \cdot \frac1K \sum_k p(x, z_k)$. Both are
unbiased, but the prior (or the uniform) rarely lands where $p(z \mid x)$ has its mass, so most
weights are negligible and a rare sample dominates: the estimate jumps.

**Chunking.** `chunk_size=c` draws and reduces the $K$ samples $c$ at a time inside a
`lax.scan` with a running log-sum-exp and a running sum, so peak memory grows with $c$, not
with $K$. Sample $k$'s key is `fold_in(key, k)` on every path, so the same key gives the same
samples and, up to float rounding, the same value for any `chunk_size`. Each chunk is
rematerialised (`jax.checkpoint`) on the backward pass, so gradients keep the same memory
bound (at the price of recomputing each chunk's forward pass once).

**Non-finite log-weights.** A log-weight of $-\infty$ (a sample where $p(x, z) = 0$) simply
contributes nothing; if all are $-\infty$ the result is $-\infty$, not NaN. A NaN log-weight
propagates to the result (NaN), so that a bug in a `log_joint` is never averaged away.

Shapes: `x` is one data point (any shape or pytree; batch with `jax.vmap`); `log_joint(x, z)`
returns a scalar for ONE sample `z`; every estimator returns a scalar, `log_weights` a `(K,)`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from elbojax import _checks
from elbojax.proposals import as_proposal, closed_form_entropy, closed_form_kl
from elbojax.reductions import LogWeightSummary, combine, summarize, summary_logsumexp

# A per-sample term: (z, log q(z)) -> scalar. The log-weight is log p(x, z) - log q(z).
TermFn = Callable[[Any, jax.Array], jax.Array]


def _sample_terms(key, proposal, term_fn: TermFn, start, count: int) -> jax.Array:
    """Terms of samples `start .. start + count - 1`; sample k is drawn with `fold_in(key, k)`."""
    indices = start + jnp.arange(count, dtype=jnp.uint32)
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, indices)

    def one(sample_key):
        z, log_q = proposal.sample_and_log_prob(seed=sample_key, sample_shape=())
        return term_fn(z, log_q)

    return jax.vmap(one)(keys)


def _chunks(num_samples: int, chunk_size: int | None) -> tuple[int, int, int]:
    """(chunk, number of full chunks, remainder) for K samples."""
    chunk = num_samples if chunk_size is None else min(chunk_size, num_samples)
    num_full, remainder = divmod(num_samples, chunk)
    return chunk, num_full, remainder


def _all_terms(key, proposal, term_fn, num_samples, chunk_size) -> jax.Array:
    """The `(K,)` terms, computed `chunk_size` samples at a time."""
    chunk, num_full, remainder = _chunks(num_samples, chunk_size)
    if num_full == 1 and remainder == 0:
        return _sample_terms(key, proposal, term_fn, 0, chunk)
    starts = jnp.arange(num_full, dtype=jnp.uint32) * chunk
    full = jax.lax.map(
        jax.checkpoint(lambda start: _sample_terms(key, proposal, term_fn, start, chunk)), starts
    ).reshape(-1)
    if not remainder:
        return full
    rest = _sample_terms(key, proposal, term_fn, num_full * chunk, remainder)
    return jnp.concatenate([full, rest])


def _summary(key, proposal, term_fn, num_samples, chunk_size) -> LogWeightSummary:
    """Running log-sum-exp and sum of the K terms, `chunk_size` samples at a time."""
    chunk, num_full, remainder = _chunks(num_samples, chunk_size)

    def chunk_summary(start, count):
        return summarize(_sample_terms(key, proposal, term_fn, start, count))

    summary = chunk_summary(0, chunk)
    if num_full > 1:

        @jax.checkpoint
        def step(carry, start):
            return combine(carry, chunk_summary(start, chunk)), None

        starts = jnp.arange(1, num_full, dtype=jnp.uint32) * chunk
        summary, _ = jax.lax.scan(step, summary, starts)
    if remainder:
        summary = combine(summary, chunk_summary(num_full * chunk, remainder))
    return summary


def _prepare(key, x, fn, fn_name, proposal, proposal_name, num_samples, chunk_size):
    """Check every argument at trace time; return the proposal in distrax's interface."""
    _checks.check_key(key)
    _checks.check_positive_int(num_samples, "num_samples")
    _checks.check_optional_positive_int(chunk_size, "chunk_size")
    _checks.check_callable(fn, fn_name)
    proposal = as_proposal(proposal, proposal_name)
    z, _ = jax.eval_shape(lambda: proposal.sample_and_log_prob(seed=key, sample_shape=()))
    _checks.check_scalar_output(fn, (x, z), fn_name)
    return proposal


def _log_weight_term(x, log_joint) -> TermFn:
    return lambda z, log_q: log_joint(x, z) - log_q


def _log_mean_weight(key, x, log_joint, proposal, num_samples, chunk_size):
    r"""$\log \frac1K \sum_k w_k$: the reduction behind IWAE, IS and naive Monte Carlo."""
    summary = _summary(key, proposal, _log_weight_term(x, log_joint), num_samples, chunk_size)
    return summary_logsumexp(summary) - math.log(num_samples)


def log_weights(key, x, log_joint, proposal, *, num_samples: int, chunk_size: int | None = None):
    r"""The log-weights $\ell_k = \log p(x, z_k) - \log q(z_k)$, $z_k \sim q$: the core of every estimator.

    Args:
      key: a JAX PRNG key; sample $k$ is drawn with `jax.random.fold_in(key, k)`.
      x: one data point.
      log_joint: `log_joint(x, z) -> scalar`, $\log p(x, z)$ for one sample `z`.
      proposal: $q(z)$, a distrax distribution (or TFP-on-JAX; see `as_proposal`).
      num_samples: $K \ge 1$.
      chunk_size: draw the samples this many at a time (bounds peak memory); `None` for all at once.

    Returns:
      Array of shape `(num_samples,)`.
    """
    proposal = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    return _all_terms(key, proposal, _log_weight_term(x, log_joint), num_samples, chunk_size)


def elbo(key, x, log_joint, proposal, *, num_samples: int = 1, chunk_size: int | None = None):
    r"""The Monte Carlo evidence lower bound, the mean of the log-weights.

    $$\widehat{\mathrm{ELBO}} = \frac1K \sum_{k=1}^K \log \frac{p(x, z_k)}{q(z_k)},\qquad z_k \sim q,$$

    an unbiased estimate of $\mathrm{ELBO}(q) = \log p(x) - \mathrm{KL}(q \,\|\, p(z \mid x))$.
    With reparameterisable $q$, `jax.grad` gives the pathwise (reparameterisation) gradient.

    Args: as `log_weights`; `num_samples` defaults to 1.

    Returns:
      A scalar.

    References:
      Kingma & Welling, *Auto-Encoding Variational Bayes*, 2014, https://arxiv.org/abs/1312.6114
    """
    proposal = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    summary = _summary(key, proposal, _log_weight_term(x, log_joint), num_samples, chunk_size)
    return summary.total / num_samples


def iwae_bound(key, x, log_joint, proposal, *, num_samples: int, chunk_size: int | None = None):
    r"""The importance-weighted bound $\mathcal{L}_K$ (IWAE), computed stably.

    $$\mathcal{L}_K = \log \frac1K \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k)},\qquad z_k \sim q,$$

    $\mathbb{E}[\mathcal{L}_1] = \mathrm{ELBO} \le \mathbb{E}[\mathcal{L}_K] \le
    \mathbb{E}[\mathcal{L}_{K+1}] \le \log p(x)$, and $\mathcal{L}_K \to \log p(x)$ as
    $K \to \infty$. The value equals `importance_log_marginal` (see the module docs).

    Args: as `log_weights`.

    Returns:
      A scalar.

    References:
      Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016,
      https://arxiv.org/abs/1509.00519
    """
    proposal = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    return _log_mean_weight(key, x, log_joint, proposal, num_samples, chunk_size)


def importance_log_marginal(
    key, x, log_joint, proposal, *, num_samples: int, chunk_size: int | None = None
):
    r"""$\log \hat p(x)$, the log of the unbiased importance-sampling estimate of $p(x)$.

    $$\hat p(x) = \frac1K \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k)},\qquad
      \mathbb{E}_q[\hat p(x)] = p(x).$$

    The same number as `iwae_bound`: unbiased for $p(x)$, hence (Jensen) biased downward for
    $\log p(x)$, with a bias that shrinks like $O(1/K)$ when the weights have finite variance.
    The variance of $\hat p(x)$ is finite only if $\int p(x, z)^2 / q(z)\,dz < \infty$: $q$
    must have heavier tails than the posterior (for Gaussians, a covariance above half the
    posterior's in every direction).

    Args: as `log_weights`.

    Returns:
      A scalar.
    """
    proposal = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    return _log_mean_weight(key, x, log_joint, proposal, num_samples, chunk_size)


def naive_mc_log_marginal(
    key, x, log_joint, prior, *, num_samples: int, chunk_size: int | None = None
):
    r"""Naive Monte Carlo $\log \hat p(x)$: importance sampling from the prior or a uniform.

    With `prior` the model's prior $p(z)$,
    $$\hat p(x) = \frac1K \sum_k p(x \mid z_k),\quad z_k \sim p(z);$$
    with `prior` a `FiniteUniform` over a finite support $S$ (the classic form),
    $$\hat p(x) = |S| \cdot \frac1K \sum_k p(x, z_k),\quad z_k \sim \mathrm{Uniform}(S).$$
    Both are `importance_log_marginal` with that distribution as the proposal, because
    $p(x, z)/p(z) = p(x \mid z)$ and $p(x, z)/(1/|S|) = |S|\,p(x, z)$. Unbiased for $p(x)$, but
    the samples ignore $x$: when the posterior is narrow, nearly every weight is negligible
    and the estimate is dominated by rare lucky samples (high variance, long flat stretches,
    sudden jumps). It is here as the baseline that motivates a good proposal.

    Args:
      key, x, log_joint, num_samples, chunk_size: as `log_weights`.
      prior: the distribution samples come from: the model's prior, or
        `elbojax.FiniteUniform(support)` for a finite latent space.

    Returns:
      A scalar.
    """
    prior = _prepare(key, x, log_joint, "log_joint", prior, "prior", num_samples, chunk_size)
    return _log_mean_weight(key, x, log_joint, prior, num_samples, chunk_size)


def elbo_analytic_kl(
    key,
    x,
    log_likelihood,
    proposal,
    prior,
    *,
    num_samples: int = 1,
    chunk_size: int | None = None,
):
    r"""The ELBO as expected reconstruction minus a closed-form KL.

    $$\mathrm{ELBO} = \mathbb{E}_{q(z)}[\log p(x \mid z)] - \mathrm{KL}(q(z) \,\|\, p(z)),$$

    the expectation by Monte Carlo over $K$ samples, the KL exactly. Lower variance than `elbo`
    when the KL is a large part of the bound.

    Args:
      key, x, num_samples, chunk_size: as `log_weights`.
      log_likelihood: `log_likelihood(x, z) -> scalar`, $\log p(x \mid z)$ for one sample.
      proposal: $q(z)$.
      prior: $p(z)$; the pair `(proposal, prior)` must have a registered closed-form KL
        (e.g. two distrax Normals or MultivariateNormals), else a `ValueError`.

    Returns:
      A scalar.

    References:
      Kingma & Welling 2014, eq. (10), https://arxiv.org/abs/1312.6114
    """
    proposal = _prepare(
        key, x, log_likelihood, "log_likelihood", proposal, "proposal", num_samples, chunk_size
    )
    prior = as_proposal(prior, "prior")
    kl = closed_form_kl(proposal, prior)
    summary = _summary(
        key, proposal, lambda z, log_q: log_likelihood(x, z), num_samples, chunk_size
    )
    return summary.total / num_samples - kl


def elbo_entropy(
    key, x, log_joint, proposal, *, num_samples: int = 1, chunk_size: int | None = None
):
    r"""The ELBO as expected log joint plus the closed-form entropy of $q$.

    $$\mathrm{ELBO} = \mathbb{E}_{q(z)}[\log p(x, z)] + \mathbb{H}(q),$$

    the expectation by Monte Carlo over $K$ samples, the entropy exactly (a `ValueError` if
    `proposal` has no closed-form entropy).

    Args: as `log_weights`; `num_samples` defaults to 1.

    Returns:
      A scalar.

    References:
      Titsias & Lázaro-Gredilla, *Doubly Stochastic Variational Bayes*, ICML 2014.
    """
    proposal = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    entropy = closed_form_entropy(proposal)
    summary = _summary(key, proposal, lambda z, log_q: log_joint(x, z), num_samples, chunk_size)
    return summary.total / num_samples + entropy
