r"""More multi-sample bounds, each a reduction of the same log-weights $\ell_k = \log p(x, z_k) - \log q(z_k)$.

| function | value | reference |
|---|---|---|
| `renyi_bound(..., alpha)` | $\frac{1}{1-\alpha}\log\frac1K\sum_k e^{(1-\alpha)\ell_k}$; $\alpha = 0$ is IWAE, $\alpha \to 1$ the ELBO | Li & Turner 2016 |
| `multi_iwae_bound(..., num_groups)` | $\frac1M\sum_{m=1}^M \log\frac1K\sum_k e^{\ell_{mk}}$ (MIWAE) | Rainforth et al. 2018 |
| `combination_iwae_bound(..., beta)` | $\beta\,\frac1K\sum_k\ell_k + (1-\beta)\log\frac1K\sum_k e^{\ell_k}$ (CIWAE), on the same samples | Rainforth et al. 2018 |
| `partial_iwae_bound(..., num_groups)` | the IWAE bound over all $MK$ samples; the model's gradient is IWAE's, the proposal's is MIWAE's (PIWAE) | Rainforth et al. 2018 |

**Names.** Rainforth et al.'s MIWAE ("multiply importance weighted") is *not* the MIWAE of
Mattei & Frellsen (2019) for missing data; to keep them apart, elbojax calls this one
`multi_iwae_bound` and never uses the bare acronym as a name.

**Groups.** In `multi_iwae_bound` and `partial_iwae_bound`, group $m$ draws its $K$ samples with
the key `fold_in(key, m)` exactly as `iwae_bound` would, so group $m$'s IWAE term equals
`iwae_bound(fold_in(key, m), ...)`.

References:
  Li & Turner, *Rényi Divergence Variational Inference*, NeurIPS 2016, https://arxiv.org/abs/1602.02311;
  Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, *Tighter Variational Bounds are Not
  Necessarily Better*, ICML 2018, https://arxiv.org/abs/1802.04537
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from elbojax import _checks
from elbojax._keys import fold_in_many
from elbojax import gradients as grads
from elbojax.estimators import (
    _draw_points,
    _fold_chunks,
    _log_joint,
    _pathwise_log_weights,
    _pathwise_summary,
    _prepare,
    elbo,
    iwae_bound,
)
from elbojax.reductions import combine_expm1, summarize_expm1, summary_logmeanexp, summary_logsumexp, widened


def renyi_bound(
    key,
    x,
    log_joint,
    proposal,
    *,
    alpha: float,
    num_samples: int,
    chunk_size: int | None = None,
    gradient: str = "reparam",
):
    r"""The Rényi variational bound $\mathcal{L}_\alpha$ (Li & Turner 2016), Monte Carlo form.

    $$\hat{\mathcal L}_\alpha = \frac{1}{1-\alpha}\log \frac1K \sum_{k=1}^K
      \left(\frac{p(x, z_k)}{q(z_k)}\right)^{1-\alpha},\qquad z_k \sim q.$$

    $\alpha = 0$ gives `iwae_bound`, $\alpha = 1$ (the limit) the ELBO, both on the same
    samples; for fixed samples it is non-increasing in $\alpha$ (a power mean of the weights).
    The exact $\mathcal L_\alpha$ lies below $\log p(x)$ for $\alpha > 0$ and above it for
    $\alpha < 0$. The $K$-sample estimate is biased from $\mathcal L_\alpha$ (less so as $K$
    grows): downward for $\alpha < 1$ and upward for $\alpha > 1$ (Jensen's inequality turns
    with the sign of $1/(1-\alpha)$). For $\alpha \ge 0$ it is a lower bound on $\log p(x)$ in
    expectation either way: below `iwae_bound` on the same samples for $\alpha \le 1$ (whose
    mean lies below $\log p(x)$), and below the ELBO estimate for $\alpha \ge 1$.

    **Near $\alpha = 1$.** With $x_k = (1-\alpha)\ell_k$, the log-mean-exp is read from
    $\sum_k \operatorname{expm1}(x_k - \max_j x_j)$ while those terms are small
    (`reductions.summary_logmeanexp`), so dividing by $1 - \alpha$ does not magnify rounding: the
    value tends to the ELBO continuously as $\alpha \to 1$, also in float32 (where
    $\log\sum_k e^{x_k} - \log K$ rounds to 0 for $1 - \alpha \approx 10^{-7}$).

    Args:
      key, x, log_joint, proposal, num_samples, chunk_size: as `elbojax.log_weights`.
      alpha: a Python float.
      gradient: `"reparam"` or `"stl"` (biased for $\alpha \ne 1$, as IWAE-STL is: its
        dropped score term is weighted by the normalised weights; unbiased at $\alpha = 1$, the ELBO).

    Returns:
      A scalar.
    """
    alpha = _checks.check_finite_real(alpha, "alpha")
    grads.check_gradient(gradient, ("reparam", "stl"), "renyi_bound")
    if alpha == 1.0:
        return elbo(key, x, log_joint, proposal, num_samples=num_samples, chunk_size=chunk_size, gradient=gradient)
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size, gradient)
    power = 1.0 - alpha
    weights_fn = _pathwise_log_weights(problem, gradient)
    summary = _fold_chunks(lambda start, count: summarize_expm1(power * weights_fn(start, count)), combine_expm1, problem)
    return summary_logmeanexp(summary) / power


def combination_iwae_bound(
    key,
    x,
    log_joint,
    proposal,
    *,
    beta: float,
    num_samples: int,
    chunk_size: int | None = None,
    gradient: str = "reparam",
):
    r"""CIWAE (Rainforth et al. 2018): a convex combination of the ELBO and IWAE on the same samples.

    $$\mathrm{CIWAE}_\beta = \beta\,\frac1K\sum_k \ell_k + (1-\beta)\,\log\frac1K\sum_k e^{\ell_k},
      \qquad 0 \le \beta \le 1.$$

    Args:
      key, x, log_joint, proposal, num_samples, chunk_size: as `elbojax.log_weights`.
      beta: the ELBO's weight, a Python float in $[0, 1]$.
      gradient: `"reparam"` or `"stl"` (biased for $\beta < 1$, as IWAE-STL is; unbiased at
        $\beta = 1$, the ELBO).

    Returns:
      A scalar.
    """
    beta = _checks.check_finite_real(beta, "beta")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"`beta` must be in [0, 1], got {beta}.")
    grads.check_gradient(gradient, ("reparam", "stl"), "combination_iwae_bound")
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size, gradient)
    summary = _pathwise_summary(problem, gradient)
    iwae = summary_logsumexp(summary) - math.log(problem.num_samples)
    # A term of weight 0 is left out, not multiplied by 0: the ELBO is -inf when one weight is 0
    # (beta = 0 is then still IWAE), IWAE when all are (beta = 1 is then still the ELBO, -inf).
    terms = ([beta * summary.total / problem.num_samples] if beta > 0.0 else []) + ([(1.0 - beta) * iwae] if beta < 1.0 else [])
    return sum(terms[1:], terms[0])


def _group_keys(key, num_groups: int):
    _checks.check_key(key)
    return fold_in_many(key, jnp.arange(num_groups, dtype=jnp.uint32))


def multi_iwae_bound(
    key,
    x,
    log_joint,
    proposal,
    *,
    num_groups: int,
    num_samples: int,
    chunk_size: int | None = None,
    gradient: str = "reparam",
):
    r"""Rainforth et al.'s MIWAE: the average of $M$ independent IWAE bounds of $K$ samples each.

    $$\mathrm{MIWAE}_{M,K} = \frac1M \sum_{m=1}^M \log \frac1K \sum_{k=1}^K w_{mk}.$$

    $M = 1$ is IWAE, $K = 1$ the ELBO with $M$ samples. Trading $K$ for $M$ loosens the bound but
    raises the signal-to-noise ratio of the proposal's gradient. (Not the missing-data MIWAE of
    Mattei & Frellsen 2019.)

    Args:
      key, x, log_joint, proposal, chunk_size: as `elbojax.iwae_bound`.
      num_groups: $M \ge 1$.
      num_samples: $K \ge 1$, samples per group.
      gradient: any `iwae_bound` gradient estimator, applied within each group.

    Returns:
      A scalar.
    """
    num_groups = _checks.check_positive_int(num_groups, "num_groups")
    bounds = jax.vmap(
        lambda k: iwae_bound(k, x, log_joint, proposal, num_samples=num_samples, chunk_size=chunk_size, gradient=gradient)
    )(_group_keys(key, num_groups))
    return jnp.mean(bounds)


def partial_iwae_bound(key, x, log_joint, proposal, *, num_groups: int, num_samples: int):
    r"""PIWAE (Rainforth et al. 2018): the model trains on IWAE, the proposal on MIWAE, same samples.

    With $M$ groups of $K$ samples ($MK$ in all), the **value** is the IWAE bound over all $MK$
    samples, $\log \frac{1}{MK}\sum_{m,k} w_{mk}$ (the model's objective, and the tighter of
    the two). Under `jax.grad`, parameters reached through $\log p(x, z)$ directly (the model's)
    get the gradient of that IWAE bound, while the proposal's parameters, reached through the
    sample $z$ and $\log q$, get the gradient of $\mathrm{MIWAE}_{M,K}$:
    $$\nabla_\theta: \sum_{mk} \tilde w_{mk} \nabla_\theta \log p(x, z_{mk}),\qquad
      \nabla_\phi: \frac1M\sum_m \sum_k \tilde w^{(m)}_{mk} \nabla_\phi \ell_{mk},$$
    with $\tilde w$ normalised over all $MK$ samples and $\tilde w^{(m)}$ within group $m$. The
    routing is done at $z$ (its cotangent is rescaled) and at $\log q$, so parameters may be
    shared. Not chunked: the normalised weights need every group at once. A sample with
    $\ell_{mk} = -\infty$ contributes nothing; a group whose weights are all 0 contributes nothing
    to the proposal's gradient (its MIWAE term is $-\infty$, with no gradient to follow).

    Args:
      key, x, log_joint, proposal: as `elbojax.iwae_bound`; the proposal must be reparameterizable.
      num_groups: $M \ge 1$.
      num_samples: $K \ge 1$, samples per group.

    Returns:
      A scalar.
    """
    num_groups = _checks.check_positive_int(num_groups, "num_groups")
    group_keys = _group_keys(key, num_groups)
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, None, asker="partial_iwae_bound")

    def draw_group(group_key):
        return _draw_points(problem._replace(key=group_key), 0, problem.num_samples)

    points, z, log_q = jax.vmap(draw_group)(group_keys)  # leading axes (M, K)
    log_joint_mk = jax.vmap(lambda z_m: _log_joint(problem, z_m))
    log_weights = widened(jax.lax.stop_gradient(log_joint_mk(z) - log_q))  # (M, K), in at least float32
    lse_all = jax.nn.logsumexp(log_weights)
    lse_group = jax.nn.logsumexp(log_weights, axis=1, keepdims=True)
    # A group whose weights are all 0 gives the proposal nothing (weights 0, not exp(-inf + inf)).
    empty_group = jnp.isneginf(lse_group)
    lse_group = jnp.where(empty_group, jnp.zeros_like(lse_group), lse_group)
    model_weights = jnp.exp(log_weights - jnp.where(jnp.isneginf(lse_all), 0.0, lse_all))  # IWAE over all M K
    proposal_weights = jnp.exp(log_weights - lse_group) / num_groups  # MIWAE
    # Two evaluations of log p route the gradients: at the stopped sample it carries only the
    # model's direct gradient, weighted (w - w^(m)/M); at the live sample its path gradient and the
    # model's, weighted w^(m)/M, sum to the right weights without ever dividing one weight by the
    # other (their ratio exp(lse - lse_m)/M overflows for a group ~88 nats below the best in float32).
    points_fixed = jax.tree.map(jax.lax.stop_gradient, points)
    direct_terms = (model_weights - proposal_weights) * log_joint_mk(grads.value_at(problem.proposal, points_fixed))
    log_q_path = jax.vmap(jax.vmap(lambda point: grads.path_only_log_prob_at(problem.proposal, point)))(points)
    path_terms = proposal_weights * (log_joint_mk(z) - log_q_path)
    log_q_fixed = jax.vmap(jax.vmap(lambda point: grads.log_prob_at(problem.proposal, point)))(points_fixed)
    score = log_q_fixed - jax.lax.stop_gradient(log_q_fixed)
    # A zero weight (log-weight -inf) contributes nothing: 0 * -inf would make the value NaN.
    positive = ~jnp.isneginf(log_weights)
    model_terms = jnp.where(positive, direct_terms + path_terms, jnp.zeros_like(direct_terms))
    surrogate = jnp.sum(model_terms) - jnp.sum(proposal_weights * score)
    bound = lse_all - math.log(num_groups * problem.num_samples)
    return bound + (surrogate - jax.lax.stop_gradient(surrogate))
