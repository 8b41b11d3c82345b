"""Monte Carlo claims, each checked against an exact answer within 4 standard errors.

Fixed keys make every test deterministic; 4 standard errors make a false alarm from honest noise
about 6e-5 per comparison, while every estimator bug we could think of (a missing -log q, a
mean instead of a log-mean-exp, a wrong log K, samples reused across k) moves the mean by many.
"""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elbojax as ej
from elbojax import exact
from helpers import keys, mean_and_standard_error


@pytest.fixture(scope="module")
def linear_gaussian():
    with jax.enable_x64(True):
        model = exact.LinearGaussian.random(jax.random.key(0), data_dim=6, latent_dim=3, dtype=jnp.float64)
        x = model.sample(jax.random.key(1), 1)[0][0]
    return model, x


def _mismatched_q(model, x, shift=0.4, scale=0.8):
    return model.posterior_mean(x) + shift, jnp.full(model.latent_dim, scale)


def test_elbo_identity_for_a_mismatched_q(x64, linear_gaussian):
    """E[ELBO-hat] = log p(x) - KL(q || p(z|x)), in all three forms."""
    model, x = linear_gaussian
    mean, scale = _mismatched_q(model, x)
    q = distrax.MultivariateNormalDiag(mean, scale)
    kl = float(q.kl_divergence(model.posterior(x)))
    target = float(model.log_marginal(x)) - kl
    assert kl > 0.5  # mismatched enough for a wrong estimator to show
    np.testing.assert_allclose(model.elbo_diag_gaussian(x, mean, scale), target, atol=1e-10)

    forms = {
        "sampled": lambda k: ej.elbo(k, x, model.log_joint, q, num_samples=8),
        "analytic_kl": lambda k: ej.elbo_analytic_kl(k, x, model.log_likelihood, q, model.prior, num_samples=8),
        "entropy": lambda k: ej.elbo_entropy(k, x, model.log_joint, q, num_samples=8),
    }
    for name, form in forms.items():
        mean_value, se = mean_and_standard_error(jax.jit(jax.vmap(form))(keys(2, 4000)))
        assert abs(mean_value - target) < 4 * se, (name, mean_value, target, se)


def test_importance_estimate_of_p_x_is_unbiased(x64, linear_gaussian):
    """mean of exp(log p-hat - log p(x)) is 1, with K = 10 and an over-dispersed proposal.

    q has 2.25x the posterior covariance (well above the 1/2 needed for finite variance) and a
    shifted mean, so the weights are far from constant and the check has teeth.
    """
    model, x = linear_gaussian
    post = model.posterior(x)
    q = distrax.MultivariateNormalTri(post.mean() + 0.3, 1.5 * jnp.linalg.cholesky(post.covariance()))
    log_px = model.log_marginal(x)

    def ratio(k):
        return jnp.exp(ej.importance_log_marginal(k, x, model.log_joint, q, num_samples=10) - log_px)

    ratios = jax.jit(jax.vmap(ratio))(keys(3, 20000))
    mean_value, se = mean_and_standard_error(ratios)
    assert np.std(ratios) > 0.2, np.std(ratios)  # the weights genuinely vary
    assert abs(mean_value - 1.0) < 4 * se, (mean_value, se)
    # log p-hat itself is biased low (Jensen): its mean is clearly below log p(x).
    log_mean, log_se = mean_and_standard_error(np.log(ratios))
    assert log_mean + 4 * log_se < 0.0


def test_naive_mc_from_a_finite_uniform_is_unbiased(x64):
    """The classic |S| * mean(p(x, z)) form on the mixture's categorical latent."""
    model = exact.GaussianMixture.random(jax.random.key(0), num_components=5, dim=2, dtype=jnp.float64)
    x = model.sample(jax.random.key(1), 1)[0][0]
    uniform = ej.FiniteUniform(jnp.arange(5))
    log_px = model.log_marginal(x)

    def ratio(k):
        return jnp.exp(ej.naive_mc_log_marginal(k, x, model.log_joint, uniform, num_samples=3) - log_px)

    ratios = jax.jit(jax.vmap(ratio))(keys(4, 20000))
    mean_value, se = mean_and_standard_error(ratios)
    assert np.std(ratios) > 0.2, np.std(ratios)
    assert abs(mean_value - 1.0) < 4 * se, (mean_value, se)


def test_iwae_rises_with_k_stays_below_and_approaches_log_p_x(linear_gaussian):
    model, x64_point = linear_gaussian
    model = jax.tree.map(lambda a: a.astype(jnp.float32), model)
    x = x64_point.astype(jnp.float32)
    q = distrax.MultivariateNormalDiag(*_mismatched_q(model, x, shift=0.6, scale=0.6))
    log_px = float(model.log_marginal(x))
    ks = [1, 4, 16, 64, 256]
    means, ses = [], []
    for i, k_samples in enumerate(ks):
        bound = jax.jit(jax.vmap(lambda k: ej.iwae_bound(k, x, model.log_joint, q, num_samples=k_samples)))
        m, se = mean_and_standard_error(bound(keys(10 + i, 2000)))
        means.append(m)
        ses.append(se)
    gaps = [log_px - m for m in means]
    for i in range(len(ks) - 1):
        rise = means[i + 1] - means[i]
        assert rise > 4 * np.hypot(ses[i], ses[i + 1]), (ks[i], means)
    for m, se in zip(means, ses):
        assert m < log_px + 4 * se
    assert gaps[0] > 1.0  # a loose ELBO to start from
    assert gaps[-1] < 0.1 * gaps[0]  # and most of the gap closed at K = 256


def test_naive_mc_has_far_larger_variance_than_importance_sampling():
    """At K = 100 on the D = 20 Gaussian toy, var(naive) / var(IS with a near-posterior q) > 100."""
    model = exact.GaussianToy.random(jax.random.key(0), dim=20)
    x = model.sample(jax.random.key(1), 1)[0][0]
    post = model.posterior(x)
    near = distrax.MultivariateNormalDiag(post.mean() + 0.05, post.stddev() * 1.05)

    def spread(estimator, proposal):
        f = jax.jit(jax.vmap(lambda k: estimator(k, x, model.log_joint, proposal, num_samples=100)))
        return float(np.var(np.asarray(f(keys(20, 2000)))))

    naive = spread(ej.naive_mc_log_marginal, model.prior)
    good = spread(ej.importance_log_marginal, near)
    assert naive / good > 100, (naive, good)
