"""With q = the exact posterior every log-weight equals log p(x): the bounds are tight (float64)."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elbojax as ej
from elbojax import exact
from helpers import keys, mean_and_standard_error

TIGHT_ESTIMATORS = [ej.elbo, ej.iwae_bound, ej.importance_log_marginal]


def _models():
    """(name, model, data) for each tractable model, built in float64."""
    lg = exact.LinearGaussian.random(jax.random.key(0), data_dim=6, latent_dim=3, dtype=jnp.float64)
    toy = exact.GaussianToy.random(jax.random.key(1), dim=20, dtype=jnp.float64)
    gmm = exact.GaussianMixture.random(
        jax.random.key(2), num_components=4, dim=2, dtype=jnp.float64
    )
    return [
        ("linear_gaussian", lg, lg.sample(jax.random.key(10), 5)[0]),
        ("gaussian_toy", toy, toy.sample(jax.random.key(11), 5)[0]),
        ("gaussian_mixture", gmm, gmm.sample(jax.random.key(12), 5)[0]),
    ]


@pytest.mark.parametrize("estimator", TIGHT_ESTIMATORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_exact_posterior_makes_every_sample_equal_log_marginal(x64, estimator, chunk_size):
    for name, model, data in _models():

        def estimate(key, x):
            return estimator(
                key, x, model.log_joint, model.posterior(x), num_samples=8, chunk_size=chunk_size
            )

        per_key = jax.jit(jax.vmap(jax.vmap(estimate, (0, None)), (None, 0)))(keys(3, 16), data)
        truth = jax.vmap(model.log_marginal)(data)
        assert per_key.dtype == jnp.float64
        np.testing.assert_allclose(per_key, np.broadcast_to(truth[:, None], per_key.shape), rtol=0, atol=1e-10, err_msg=name)


def test_exact_posterior_log_weights_are_constant(x64):
    for name, model, data in _models():

        @jax.jit
        def weights_and_truth(x):
            lw = ej.log_weights(jax.random.key(4), x, model.log_joint, model.posterior(x), num_samples=50)
            return lw, model.log_marginal(x), ej.effective_sample_size(lw)

        lw, truth, ess = weights_and_truth(data[0])
        assert lw.shape == (50,)
        np.testing.assert_allclose(lw, truth, rtol=0, atol=1e-10, err_msg=name)
        # And the weights are then all equal: the Kish ESS is K.
        np.testing.assert_allclose(ess, 50.0, rtol=1e-10)


def test_analytic_kl_and_entropy_forms_are_unbiased_at_the_posterior(x64):
    """Not zero-variance (E_q[log p(x|z)] is estimated), but their mean is log p(x)."""
    model = exact.GaussianToy.random(jax.random.key(1), dim=20, dtype=jnp.float64)
    x = model.sample(jax.random.key(5), 1)[0][0]
    q = model.posterior(x)
    truth = float(model.log_marginal(x))
    analytic = jax.vmap(
        lambda k: ej.elbo_analytic_kl(k, x, model.log_likelihood, q, model.prior, num_samples=4)
    )(keys(6, 4000))
    entropy = jax.vmap(lambda k: ej.elbo_entropy(k, x, model.log_joint, q, num_samples=4))(
        keys(7, 4000)
    )
    for values in (analytic, entropy):
        mean, se = mean_and_standard_error(values)
        assert se > 0  # genuinely random
        assert abs(mean - truth) < 4 * se, (mean, truth, se)


def test_closed_form_elbo_is_log_marginal_minus_kl_to_posterior(x64):
    """ELBO(q) = log p(x) - KL(q || p(z|x)), with the KL computed by distrax independently."""
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=6, latent_dim=3, dtype=jnp.float64)
    x = model.sample(jax.random.key(1), 1)[0][0]
    mean = model.posterior_mean(x) + jnp.array([0.3, -0.2, 0.5])
    scale = jnp.array([0.4, 0.9, 1.3])
    kl = distrax.MultivariateNormalDiag(mean, scale).kl_divergence(model.posterior(x))
    np.testing.assert_allclose(
        model.elbo_diag_gaussian(x, mean, scale), model.log_marginal(x) - kl, rtol=0, atol=1e-10
    )


def test_linear_gaussian_marginal_and_posterior_match_bayes_rule(x64):
    """log p(x) = log p(x, z) - log p(z | x) for every z, and p(x) is the textbook Gaussian."""
    from scipy.stats import multivariate_normal

    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=6, latent_dim=3, dtype=jnp.float64)
    x = model.sample(jax.random.key(1), 1)[0][0]
    cov = np.asarray(model.weight) @ np.asarray(model.weight).T + np.diag(model.noise_variance)
    expected = multivariate_normal(np.asarray(model.bias), cov).logpdf(np.asarray(x))
    np.testing.assert_allclose(model.log_marginal(x), expected, rtol=1e-12)
    zs = jax.random.normal(jax.random.key(2), (10, 3), jnp.float64) * 2
    bayes = jax.vmap(lambda z: model.log_joint(x, z) - model.posterior(x).log_prob(z))(zs)
    np.testing.assert_allclose(bayes, expected, rtol=1e-12)


def test_gaussian_toy_marginal_and_posterior_match_bayes_rule(x64):
    """log p(x) = log N(x; mu, 2I) (scipy) = log p(x, z) - log p(z | x) for any z."""
    from scipy.stats import multivariate_normal

    toy = exact.GaussianToy.random(jax.random.key(1), dim=20, dtype=jnp.float64)
    x, z = toy.sample(jax.random.key(2), 3)
    expected = multivariate_normal(np.asarray(toy.mean), 2 * np.eye(20)).logpdf(np.asarray(x))
    np.testing.assert_allclose(jax.vmap(toy.log_marginal)(x), expected, rtol=1e-12)
    bayes = toy.log_joint(x[0], z[1]) - toy.posterior(x[0]).log_prob(z[1])
    np.testing.assert_allclose(bayes, expected[0], rtol=1e-12)


def test_gaussian_mixture_marginal_is_the_sum_over_components(x64):
    model = exact.GaussianMixture.random(jax.random.key(2), num_components=4, dim=2, dtype=jnp.float64)
    x = model.sample(jax.random.key(3), 1)[0][0]
    joint = np.array([float(model.log_joint(x, jnp.array(c))) for c in range(4)])
    np.testing.assert_allclose(model.log_marginal(x), np.log(np.exp(joint).sum()), rtol=1e-12)
    np.testing.assert_allclose(
        jnp.exp(model.posterior(x).logits), np.exp(joint) / np.exp(joint).sum(), rtol=1e-12
    )


def test_em_never_decreases_the_log_likelihood(x64):
    truth = exact.GaussianMixture.random(jax.random.key(0), num_components=3, dim=2, dtype=jnp.float64)
    data, _ = truth.sample(jax.random.key(1), 300)
    start = exact.GaussianMixture.random(jax.random.key(9), num_components=3, dim=2, separation=1.0, dtype=jnp.float64)
    fitted, history = exact.fit_em(start, data, num_steps=40)
    history = np.asarray(history)
    assert history.shape == (41,)
    assert np.all(np.diff(history) >= -1e-10), np.diff(history).min()
    assert history[-1] > history[0] + 0.1  # it actually learned
    # The E-step's q = exact posterior makes the ELBO equal log p(x) (tight bound).
    x = data[0]
    value = ej.elbo(jax.random.key(2), x, fitted.log_joint, fitted.posterior(x), num_samples=5)
    np.testing.assert_allclose(value, fitted.log_marginal(x), atol=1e-10)


def test_em_works_in_float32():
    truth = exact.GaussianMixture.random(jax.random.key(0), num_components=3, dim=2)
    data, _ = truth.sample(jax.random.key(1), 300)
    start = exact.GaussianMixture.random(jax.random.key(9), num_components=3, dim=2, separation=1.0)
    _, history = exact.fit_em(start, data, num_steps=30)
    assert history.dtype == jnp.float32
    assert np.all(np.diff(np.asarray(history)) >= -1e-4)


def test_em_step_with_an_empty_component_gives_no_nan(x64):
    """A component far from every point gets weight 0 (logit -inf), not NaN means."""
    model = exact.GaussianMixture(jnp.zeros(2), jnp.array([[0.0, 0.0], [1e4, 1e4]]), jnp.ones((2, 2)))
    data = jax.random.normal(jax.random.key(0), (50, 2), jnp.float64)
    updated = model.em_step(data)
    assert np.all(np.isfinite(updated.means)) and np.all(np.isfinite(updated.scales))
    assert updated.logits[1] == -np.inf
    np.testing.assert_allclose(updated.mean_log_marginal(data), updated.mean_log_marginal(data))
    assert np.isfinite(updated.mean_log_marginal(data))


def test_gaussian_toy_requires_a_1d_mean():
    for bad in (jnp.zeros((3, 1)), jnp.array(0.0)):
        with pytest.raises(ValueError, match=r"GaussianToy expects mean \(D,\)"):
            exact.GaussianToy(bad)
        with pytest.raises(ValueError, match=r"GaussianToy expects mean \(D,\)"):
            jax.jit(exact.GaussianToy)(bad)
    toy = jax.jit(exact.GaussianToy)(jnp.zeros(3))  # a pytree through jit, as before
    assert toy.dim == 3


def test_gaussian_mixture_component_index_is_an_in_range_integer():
    from elbojax import discrete

    gm = exact.GaussianMixture.random(jax.random.key(2), num_components=3, dim=2)
    x0 = gm.sample(jax.random.key(3), 1)[0][0]
    for fn in (gm.log_joint, gm.log_likelihood):
        for bad in (jnp.array(True), jnp.array(1.0), 1.0):
            with pytest.raises(TypeError, match=r"`z` must be an integer component index"):
                fn(x0, bad)
            with pytest.raises(TypeError, match=r"`z` must be an integer component index"):
                jax.jit(fn)(x0, bad)
        for z in (-1, 3, 7):
            for z_array in (jnp.array(z), jnp.array(z, jnp.int8)):
                assert fn(x0, z_array) == -jnp.inf
                assert jax.jit(fn)(x0, z_array) == -jnp.inf
        np.testing.assert_allclose(fn(x0, 2), jax.jit(fn)(x0, jnp.array(2, jnp.uint8)), rtol=1e-6)
        assert np.isfinite(fn(x0, jnp.uint8(2)))
    # Out-of-range classes add nothing: enumerating more classes than C keeps log p(x) exact.
    np.testing.assert_allclose(discrete.enumerated_log_marginal(x0, gm.log_joint, 5), gm.log_marginal(x0), rtol=1e-6)
    np.testing.assert_allclose(
        jax.jit(lambda x: discrete.enumerated_log_marginal(x, gm.log_joint, 5))(x0), gm.log_marginal(x0), rtol=1e-6
    )
    # No NaN gradient from the masked branch.
    grads = jax.grad(lambda m: jnp.exp(m.log_joint(x0, jnp.array(7))))(gm)
    assert all(bool(jnp.all(leaf == 0)) for leaf in jax.tree.leaves(grads))
