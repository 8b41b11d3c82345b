"""Discrete latents: enumeration against exact answers (float64), the relaxations against TFP and
numerical integration, straight-through exactly one-hot. Monte Carlo claims within 4 SE.

Each test compiles once (one `jax.jit` around everything it computes; one test runs eagerly on
purpose) and builds its reference in numpy: eager JAX compiles every primitive separately, which
would dominate the runtime.
"""

import itertools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tensorflow_probability.substrates import jax as tfp

import elbojax as ej
from elbojax import discrete, exact
from helpers import SE_LIMIT, assert_within_se, keys, mean_and_se_along_draws

tfd = tfp.distributions


def _np_log_softmax(logits):
    logits = np.asarray(logits, np.float64)
    shifted = logits - logits.max()
    return shifted - np.log(np.sum(np.exp(shifted)))


# ------------------------------------------------------------------------------------------------
# Enumerating a categorical latent, on the Gaussian mixture.
# ------------------------------------------------------------------------------------------------

_MEANS = np.array([[0.0, 1.0], [1.5, -0.5], [-1.0, -1.2], [0.8, 0.9]])
_SCALES = np.array([[1.0, 0.7], [0.8, 1.2], [1.1, 0.9], [0.6, 1.0]])
_PRIOR = np.array([0.2, 0.3, 0.1, 0.4])


@pytest.fixture
def mixture(x64):
    model = exact.GaussianMixture(jnp.log(_PRIOR), jnp.asarray(_MEANS), jnp.asarray(_SCALES))
    x = jnp.array([0.6, 0.2])
    logits = jnp.array([0.3, -0.2, 0.1, 1.0])  # q far from the posterior
    return model, x, logits


def _np_mixture_log_joint(x):
    """log pi_c + log N(x; mu_c, sigma_c^2), shape (C,), in numpy."""
    x = np.asarray(x)
    log_lik = -0.5 * np.sum(np.log(2 * np.pi * _SCALES**2) + (x - _MEANS) ** 2 / _SCALES**2, axis=1)
    return np.log(_PRIOR) + log_lik


def _np_log_marginal(x):
    log_p = _np_mixture_log_joint(x)
    return log_p.max() + np.log(np.sum(np.exp(log_p - log_p.max())))


def _np_enumerated_elbo(x, logits):
    log_q = _np_log_softmax(logits)
    return np.sum(np.exp(log_q) * (_np_mixture_log_joint(x) - log_q))


def test_enumerated_elbo_equals_the_hand_sum_and_log_p_at_the_exact_posterior(mixture):
    model, x, logits = mixture
    xs = jnp.array([[0.6, 0.2], [-2.0, 1.0], [3.0, -0.5]])

    @jax.jit
    def run():
        at_posterior = lambda xi: discrete.enumerated_elbo(xi, model.log_joint, model.posterior(xi).logits)
        return (
            discrete.enumerated_elbo(x, model.log_joint, logits),
            jax.vmap(at_posterior)(xs),
            jax.vmap(lambda xi: discrete.enumerated_log_marginal(xi, model.log_joint, 4))(xs),
            jax.vmap(model.log_marginal)(xs),
        )

    value, at_posterior, log_marginal, model_log_marginal = run()
    np.testing.assert_allclose(value, _np_enumerated_elbo(x, logits), rtol=1e-13)
    assert value < _np_log_marginal(x) - 0.1  # a KL away from log p(x)
    reference = [_np_log_marginal(xi) for xi in xs]
    for result in (at_posterior, log_marginal, model_log_marginal):
        np.testing.assert_allclose(result, reference, rtol=0, atol=1e-12)


def test_enumerated_elbo_takes_plus_infinite_logits_as_their_limit(mixture):
    """+inf logits (all of q on those classes, equally) gave NaN, value and gradient."""
    model, x, _ = mixture
    log_p = _np_mixture_log_joint(x)
    one = jnp.array([jnp.inf, 0.0, -1.0, 2.0])
    two = jnp.array([jnp.inf, 0.0, jnp.inf, 2.0])
    for logits, expected in ((one, log_p[0]), (two, 0.5 * (log_p[0] + log_p[2]) + np.log(2.0))):
        value, grad = jax.value_and_grad(lambda l: discrete.enumerated_elbo(x, model.log_joint, l))(logits)
        np.testing.assert_allclose(value, expected, rtol=1e-12)
        assert np.all(np.isfinite(grad))


def test_enumerated_elbo_is_the_zero_variance_mean_of_the_sampled_elbo(mixture):
    model, x, logits = mixture

    @jax.jit
    def run(key_array):
        sampled = jax.vmap(lambda k: ej.elbo(k, x, model.log_joint, distrax.Categorical(logits=logits)))(key_array)
        return sampled, discrete.enumerated_elbo(x, model.log_joint, logits)

    sampled, enumerated = run(keys(0, 4000))
    assert np.std(sampled) > 0.1  # the Monte Carlo estimate varies, around the enumerated value
    assert_within_se(sampled, enumerated, "sampled vs enumerated")


def test_enumerated_elbo_gradients_are_exact(mixture):
    model, x, logits = mixture
    with_means = lambda means: exact.GaussianMixture(model.logits, means, model.scales)

    @jax.jit
    def run():
        elbo_of = lambda lg, means: discrete.enumerated_elbo(x, with_means(means).log_joint, lg)
        log_q = jax.nn.log_softmax(logits)
        log_p = lambda means: jax.vmap(lambda c: with_means(means).log_joint(x, c))(jnp.arange(4))
        hand_sum = lambda means: jnp.sum(jnp.exp(log_q) * (log_p(means) - log_q))
        return (
            jax.grad(elbo_of, argnums=(0, 1))(logits, model.means),
            jax.grad(hand_sum)(model.means),
            jax.grad(elbo_of)(model.posterior(x).logits, model.means),
        )

    (grad_logits, grad_means), hand_sum_grad_means, grad_at_posterior = run()
    # d/dl_j sum_c q_c (log p_c - log q_c) = q_j (log p_j - log q_j - ELBO), by hand in numpy.
    log_q = _np_log_softmax(logits)
    by_hand = np.exp(log_q) * (_np_mixture_log_joint(x) - log_q - _np_enumerated_elbo(x, logits))
    np.testing.assert_allclose(grad_logits, by_hand, rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(grad_means, hand_sum_grad_means, rtol=1e-12, atol=1e-15)
    assert np.abs(grad_means).max() > 0.01
    np.testing.assert_allclose(grad_at_posterior, 0.0, atol=1e-12)  # the ELBO is stationary at p(c | x)


def test_classes_with_zero_probability_contribute_zero_not_nan(mixture):
    model, x, _ = mixture
    logits = jnp.array([0.3, -jnp.inf, 0.1, 1.0])
    impossible = lambda x_, c: jnp.where(c == 1, -jnp.inf, model.log_joint(x_, c))  # p(x, 1) = 0 too
    with_nan = lambda x_, c: jnp.where(c == 1, jnp.nan, model.log_joint(x_, c))

    @jax.jit
    def run():
        value_and_grad = jax.value_and_grad(lambda lg, lj: discrete.enumerated_elbo(x, lj, lg))
        return (
            value_and_grad(logits, model.log_joint),
            value_and_grad(logits, impossible),
            discrete.enumerated_elbo(x, impossible, jnp.zeros(4)),
            discrete.enumerated_elbo(x, with_nan, logits),
            discrete.enumerated_log_marginal(x, lambda x_, c: jnp.full((), -jnp.inf, x_.dtype), 4),
        )

    possible, forbidden, reached_but_forbidden, nan_value, all_impossible = run()
    support = np.array([0, 2, 3])
    log_q = _np_log_softmax(np.asarray(logits)[support])
    log_p = _np_mixture_log_joint(x)[support]
    value = np.sum(np.exp(log_q) * (log_p - log_q))
    for result, grad in (possible, forbidden):
        np.testing.assert_allclose(result, value, rtol=1e-13)
        assert np.all(np.isfinite(grad)) and grad[1] == 0.0
        np.testing.assert_allclose(grad[support], np.exp(log_q) * (log_p - log_q - value), rtol=1e-12)
    assert reached_but_forbidden == -np.inf  # q reaches a class the model forbids
    assert np.isnan(nan_value)  # a NaN log_joint is never hidden by q(c) = 0
    assert all_impossible == -np.inf


def test_enumeration_argument_errors(mixture):
    model, x, logits = mixture
    with pytest.raises(ValueError, match=r"`proposal_logits` must have shape \(C,\) with C >= 1, one logit per class; got \(2, 2\)"):
        discrete.enumerated_elbo(x, model.log_joint, jnp.zeros((2, 2)))
    with pytest.raises(TypeError, match=r"`log_joint` must be callable"):
        discrete.enumerated_elbo(x, "log_joint", logits)
    with pytest.raises(ValueError, match=r"`log_joint\(x, z\)` must return one floating-point scalar"):
        discrete.enumerated_elbo(x, lambda x_, c: jnp.zeros(3), logits)
    with pytest.raises(ValueError, match=r"`num_categories` must be an int >= 1, got 0"):
        discrete.enumerated_log_marginal(x, model.log_joint, 0)
    with pytest.raises(TypeError, match=r"`num_categories` must be an int >= 1, got 2.0"):
        discrete.enumerated_log_marginal(x, model.log_joint, 2.0)


# ------------------------------------------------------------------------------------------------
# Enumerating Bernoulli bits.
# ------------------------------------------------------------------------------------------------

_H = np.array([0.5, -1.0, 0.2])
_J = np.array([[0.0, 1.2, -0.7], [1.2, 0.0, 0.4], [-0.7, 0.4, 0.0]])
_W = np.array([[1.0, -0.5, 2.0], [0.3, 0.8, -1.0]])


def _bits_log_joint(x, z):
    """A coupled (not factorised) model of 3 bits: h.z + z^T J z / 2 + log N(x; W z, I)."""
    z = z.astype(x.dtype)
    return _H @ z + 0.5 * z @ _J @ z - 0.5 * jnp.sum((x - _W @ z) ** 2 + jnp.log(2 * jnp.pi))


def _np_brute_force(x, logits):
    """(ELBO, d ELBO / d logits) over the 8 configurations, in numpy; q(z) = 0 terms skipped."""
    x, logits = np.asarray(x), np.asarray(logits)
    p_one = np.where(logits == np.inf, 1.0, 1 / (1 + np.exp(-logits)))
    value, grad = 0.0, np.zeros(3)
    for bits in itertools.product([0, 1], repeat=3):
        z = np.array(bits, np.float64)
        q = np.prod(np.where(z == 1, p_one, 1 - p_one))
        if q > 0:
            log_ratio = _H @ z + 0.5 * z @ _J @ z - 0.5 * np.sum((x - _W @ z) ** 2 + np.log(2 * np.pi)) - np.log(q)
            value += q * log_ratio
            grad += q * (z - p_one) * log_ratio  # d q / d a_j = q (z_j - sigma(a_j)); E[d log q] = 0
    return value, grad


def test_bernoulli_enumeration_matches_brute_force(x64):
    x = jnp.array([0.7, -1.3])
    logits = jnp.array([0.4, -1.1, 2.0])
    pinned = logits.at[1].set(jnp.inf)  # a deterministic bit

    @jax.jit
    def run(key_array):
        value_and_grad = jax.value_and_grad(lambda lg: discrete.enumerated_elbo_bernoulli(x, _bits_log_joint, lg))
        # The same log_joint, with distrax.Bernoulli samples, in a Monte Carlo ELBO.
        q = distrax.Independent(distrax.Bernoulli(logits=logits), 1)
        sampled = jax.vmap(lambda k: ej.elbo(k, x, _bits_log_joint, q))(key_array)
        configurations = jnp.array(list(itertools.product([0, 1], repeat=3)))
        log_marginal = jax.nn.logsumexp(jax.vmap(lambda z: _bits_log_joint(x, z))(configurations))
        return value_and_grad(logits), value_and_grad(pinned), sampled, log_marginal

    (value, grad), (pinned_value, pinned_grad), sampled, log_marginal = run(keys(0, 4000))
    reference_value, reference_grad = _np_brute_force(x, logits)
    np.testing.assert_allclose(value, reference_value, rtol=1e-13)
    np.testing.assert_allclose(grad, reference_grad, rtol=1e-12)
    assert value < log_marginal - 0.1
    assert_within_se(sampled, value, "sampled Bernoulli ELBO")
    reference_value, reference_grad = _np_brute_force(x, pinned)
    np.testing.assert_allclose(pinned_value, reference_value, rtol=1e-13)
    assert np.all(np.isfinite(pinned_grad)) and pinned_grad[1] == 0.0
    np.testing.assert_allclose(pinned_grad, reference_grad, rtol=1e-12, atol=1e-15)


def test_bernoulli_enumeration_is_log_p_at_a_factorised_exact_posterior(x64):
    # log p(x, z) = b.z - 3: the posterior is prod_j Bernoulli(sigmoid(b_j)), log p(x) = -3 + sum softplus(b).
    b = jnp.array([1.5, -0.3, 0.0, -2.2, 0.8])
    value = jax.jit(lambda lg: discrete.enumerated_elbo_bernoulli(None, lambda _, z: b @ z - 3.0, lg))(b)
    np.testing.assert_allclose(value, -3.0 + np.sum(np.log1p(np.exp(np.asarray(b)))), rtol=0, atol=1e-12)


def test_bernoulli_enumeration_refuses_too_many_bits():
    log_joint = lambda x, z: jnp.sum(z) * 1.0
    with pytest.raises(ValueError, match=r"sums over all 2\*\*d configurations of the d bits: d = 21 would take 2,097,152 calls"):
        discrete.enumerated_elbo_bernoulli(None, log_joint, jnp.zeros(21))
    with pytest.raises(ValueError, match=r"`proposal_logits` must have shape \(d,\) with d >= 1, one logit per bit; got \(0,\)"):
        discrete.enumerated_elbo_bernoulli(None, log_joint, jnp.zeros(0))
    with pytest.raises(ValueError, match=r"one logit per bit; got \(2, 3\)"):
        discrete.enumerated_elbo_bernoulli(None, log_joint, jnp.zeros((2, 3)))


# ------------------------------------------------------------------------------------------------
# A categorical and a continuous latent: a mixture of factor analysers.
# ------------------------------------------------------------------------------------------------


class _MixtureOfLinearGaussians:
    r"""c ~ Cat(pi), w ~ N(0, I), x | c, w ~ N(W_c w + b_c, diag psi_c): component c is an exact.LinearGaussian."""

    def __init__(self, seed, num_components=3, data_dim=4, latent_dim=2):
        rng = np.random.default_rng(seed)
        self.weights = jnp.asarray(rng.normal(size=(num_components, data_dim, latent_dim)))
        self.biases = jnp.asarray(rng.normal(size=(num_components, data_dim)))
        self.noise = jnp.asarray(rng.uniform(0.1, 1.0, size=(num_components, data_dim)))
        self.log_pi = jnp.asarray(_np_log_softmax(rng.normal(size=num_components)))
        self.num_components = num_components

    def component(self, c):
        return exact.LinearGaussian(self.weights[c], self.biases[c], self.noise[c])

    def log_joint(self, x, latent):
        c, w = latent
        return self.log_pi[c] + self.component(c).log_joint(x, w)

    def posterior_class_logits(self, x):
        """log pi_c + log p_c(x), shape (C,): the unnormalised log p(c | x)."""
        return self.log_pi + jax.vmap(lambda c: self.component(c).log_marginal(x))(jnp.arange(self.num_components))

    def log_marginal(self, x):
        return jax.nn.logsumexp(self.posterior_class_logits(x))


@pytest.fixture
def mixture_of_factor_analysers(x64):
    return _MixtureOfLinearGaussians(seed=3), jnp.array([0.4, -1.0, 1.7, 0.2])


def test_mixed_enumeration_is_log_p_at_the_exact_posterior_for_every_key(mixture_of_factor_analysers):
    model, x = mixture_of_factor_analysers

    @jax.jit
    def run(key_array):
        exact_logits = model.posterior_class_logits(x)  # q(c) = p(c | x)
        posterior = lambda c: model.component(c).posterior(x)  # q(w | c) = p_c(w | x)
        mixed = lambda k, lg, **kw: discrete.enumerated_mixed_elbo(k, x, model.log_joint, lg, posterior, **kw)
        return (
            jax.vmap(lambda k: mixed(k, exact_logits, num_samples=3))(key_array),
            jax.vmap(lambda k: jax.grad(lambda lg: mixed(k, lg))(exact_logits))(key_array[:5]),
            model.log_marginal(x),
        )

    values, grads, log_marginal = run(keys(5, 20))
    np.testing.assert_allclose(values, log_marginal, rtol=0, atol=1e-10)
    np.testing.assert_allclose(grads, 0.0, atol=1e-10)  # stationary in q(c), for every key


def test_mixed_enumeration_is_unbiased_with_unbiased_gradients(mixture_of_factor_analysers):
    model, x = mixture_of_factor_analysers
    params = (
        jnp.array([0.5, -0.4, 0.2]),
        jnp.array([[0.3, -0.2], [0.0, 0.5], [-0.6, 0.1]]),
        jnp.log(jnp.array([[0.6, 1.1], [0.9, 0.4], [1.3, 0.7]])),
    )

    def estimate(p, key):
        logits, means, log_scales = p
        q_w = lambda c: distrax.MultivariateNormalDiag(means[c], jnp.exp(log_scales[c]))
        return discrete.enumerated_mixed_elbo(key, x, model.log_joint, logits, q_w, num_samples=2)

    def closed_form(p):
        """sum_c q(c) [log pi_c + ELBO_c(q(w | c)) - log q(c)], each ELBO_c exact."""
        logits, means, log_scales = p
        log_q = jax.nn.log_softmax(logits)
        inner = jax.vmap(lambda c: model.component(c).elbo_diag_gaussian(x, means[c], jnp.exp(log_scales[c])))(jnp.arange(3))
        return jnp.sum(jnp.exp(log_q) * (model.log_pi + inner - log_q))

    flat = lambda tree: jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])

    @jax.jit
    def run(key_array):
        draws = jax.vmap(lambda k: (estimate(params, k), flat(jax.grad(estimate)(params, k))))(key_array)
        return draws, closed_form(params), flat(jax.grad(closed_form)(params)), model.log_marginal(x)

    (values, grads), exact_value, exact_grad, log_marginal = run(keys(7, 3000))
    assert exact_value < log_marginal - 0.1
    assert_within_se(values, exact_value, "mixed ELBO")
    assert_within_se(grads, exact_grad, "mixed ELBO gradient")


def test_mixed_enumeration_draws_independent_samples_for_each_class(x64):
    """Class c's samples come from fold_in(key, c): the C inner estimates are independent.

    With q(w | c) = N(0.5, 1) and log p(x, c, w) = log N(w; 0, 1) for every c, each log-weight is
    1/8 - w/2 (mean -1/8, minus the KL; variance 1/4), so with q(c) uniform over 4 classes the estimate has variance
    sum_c q_c^2 / 4 = 1/16 if the classes' samples are independent (1/4 if they were shared).
    """
    log_joint = lambda x, latent: -0.5 * (latent[1] ** 2 + jnp.log(2 * jnp.pi))
    q_w = lambda c: distrax.Normal(jnp.float64(0.5), jnp.float64(1.0))
    values = jax.jit(jax.vmap(lambda k: discrete.enumerated_mixed_elbo(k, None, log_joint, jnp.zeros(4), q_w)))(keys(8, 4000))
    np.testing.assert_allclose(np.mean(values), -0.125 + np.log(4), atol=4 * 0.25 / np.sqrt(4000))
    np.testing.assert_allclose(np.var(values), 1 / 16, rtol=0.1)


def test_mixed_enumeration_argument_errors(mixture_of_factor_analysers):
    model, x = mixture_of_factor_analysers
    q_w = lambda c: distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match=r"`categorical_logits` must have shape \(C,\) with C >= 1, one logit per class; got \(\)"):
        discrete.enumerated_mixed_elbo(jax.random.key(0), x, model.log_joint, 0.0, q_w)
    with pytest.raises(TypeError, match=r"`continuous_proposal_fn` must be callable"):
        discrete.enumerated_mixed_elbo(jax.random.key(0), x, model.log_joint, jnp.zeros(3), q_w(0))
    with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key"):
        discrete.enumerated_mixed_elbo(0, x, model.log_joint, jnp.zeros(3), q_w)
    with pytest.raises(ValueError, match=r"`num_samples` must be an int >= 1, got 0"):
        discrete.enumerated_mixed_elbo(jax.random.key(0), x, model.log_joint, jnp.zeros(3), q_w, num_samples=0)


# ------------------------------------------------------------------------------------------------
# Relaxations.
# ------------------------------------------------------------------------------------------------

_LOGITS = np.array([[1.0, -0.5, 0.2, -2.0], [0.0, 0.3, -1.0, 0.5]])  # two independent categoricals


@jax.jit
def _relaxed_against_tfp(temperature):
    logits = jnp.asarray(_LOGITS)  # float64 under the x64 fixture
    q = discrete.RelaxedOneHotCategorical(logits, temperature)
    z, log_q = q.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(500,))
    tfp_q = tfd.RelaxedOneHotCategorical(temperature, logits=logits).log_prob(z).sum(-1)
    b = discrete.RelaxedBernoulli(logits, temperature)
    u, log_b = b.sample_and_log_prob(seed=jax.random.key(1), sample_shape=(500,))
    tfp_b = tfd.RelaxedBernoulli(temperature, logits=logits).log_prob(u).sum((-2, -1))
    return (z, log_q, q.log_prob(z), tfp_q), (u, log_b, b.log_prob(u), tfp_b)


@pytest.mark.parametrize("temperature", [0.3, 1.0, 2.5])
def test_relaxed_samples_and_log_densities_match_tfp(x64, temperature):
    (z, log_q, our_log_prob, tfp_log_prob), (u, log_b, our_bits_log_prob, tfp_bits_log_prob) = _relaxed_against_tfp(temperature)
    assert z.shape == (500, 2, 4) and log_q.shape == (500,)
    assert np.all(z >= 0) and np.all(z <= 1)
    np.testing.assert_allclose(z.sum(-1), 1.0, rtol=0, atol=1e-14)
    np.testing.assert_allclose(log_q, tfp_log_prob, rtol=1e-10)
    np.testing.assert_allclose(our_log_prob, log_q, rtol=1e-10)

    assert u.shape == (500, 2, 4) and log_b.shape == (500,)
    assert np.all(u > 0) and np.all(u < 1)
    np.testing.assert_allclose(our_bits_log_prob, tfp_bits_log_prob, rtol=1e-12)
    # Computed from the logit, the sampled log-density stays exact where u rounds next to 1
    # (where `log_prob(u)`, like TFP's, needs 1 - u); elsewhere the two agree.
    inside = np.all(np.minimum(u, 1 - u) > 1e-6, axis=(-2, -1))
    assert inside.mean() > 0.5
    np.testing.assert_allclose(our_bits_log_prob[inside], log_b[inside], rtol=1e-9)


@jax.jit
def _concrete_masses(temperature):
    # Binary: z = sigmoid(y), dz = z (1 - z) dy, on a grid in y (the logistic tails beyond are < 1e-6).
    y = jnp.linspace(-36.0, 36.0, 200_001)
    z = jax.nn.sigmoid(y)
    density = jnp.exp(discrete.RelaxedBernoulli(jnp.array([0.7]), temperature).log_prob(z[:, None])) * z * (1 - z)
    binary = jnp.trapezoid(density, y)
    # Three classes: z = softmax(u, v, 0) has |d(z1, z2) / d(u, v)| = z1 z2 z3.
    grid = jnp.arange(-40.0, 40.0, 0.1)
    u, v = jnp.meshgrid(grid, grid)
    log_z = jax.nn.log_softmax(jnp.stack([u, v, jnp.zeros_like(u)], -1), axis=-1)
    q = discrete.RelaxedOneHotCategorical(jnp.array([0.5, -1.0, 0.2]), temperature)
    categorical = jnp.sum(jnp.exp(q.log_prob(jnp.exp(log_z)) + log_z.sum(-1))) * 0.1**2
    return binary, categorical


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_concrete_densities_integrate_to_one(x64, temperature):
    binary, categorical = _concrete_masses(temperature)
    np.testing.assert_allclose(binary, 1.0, atol=2e-6)
    np.testing.assert_allclose(categorical, 1.0, atol=1e-6)


def test_relaxation_bias_shrinks_with_the_temperature(x64):
    """E[f . z] over relaxed samples approaches the discrete E[f . onehot(c)] as tau = 2, 1, 0.5, 0.1 falls."""
    logits, f = jnp.array([1.0, -0.5, 0.3, -1.5]), jnp.array([2.0, -1.0, 0.5, 3.0])
    bit_logits, g = jnp.array([0.8, -1.2]), jnp.array([1.0, -2.0])
    temperatures = jnp.array([2.0, 1.0, 0.5, 0.1])

    @jax.jit
    def run():
        # The same noise at every temperature, so that differences of biases are measured precisely.
        one = lambda t: (
            discrete.RelaxedOneHotCategorical(logits, t).sample(seed=jax.random.key(0), sample_shape=(100_000,)) @ f,
            discrete.RelaxedBernoulli(bit_logits, t).sample(seed=jax.random.key(1), sample_shape=(100_000,)) @ g,
        )
        return jax.vmap(one)(temperatures)

    exact_values = (np.exp(_np_log_softmax(logits)) @ np.asarray(f), (1 / (1 + np.exp(-np.asarray(bit_logits)))) @ np.asarray(g))
    for draws, exact_value, kind in zip(run(), exact_values, ("categorical", "bernoulli")):
        errors = np.asarray(draws) - exact_value  # (temperature, sample)
        biases = np.abs(errors.mean(1))
        assert biases[0] > 20 * mean_and_se_along_draws(errors[0])[1], (kind, biases)  # a real bias at tau = 2
        for hotter, colder in zip(errors, errors[1:]):
            # |bias| falls by more than 4 standard errors of the paired difference.
            assert abs(hotter.mean()) - abs(colder.mean()) > SE_LIMIT * mean_and_se_along_draws(hotter - colder)[1], (kind, biases)
        assert biases[-1] < 0.05 * biases[0], (kind, biases)


def test_straight_through_is_exactly_one_hot_with_the_relaxed_gradient():
    logits, f = jnp.array([1.0, -0.5, 0.3, -1.5]), jnp.array([2.0, -1.0, 0.5, 3.0])
    bit_logits = jnp.array([0.8, -1.2, 0.0])

    def objective(lg, key, hard, kind):
        if kind == "categorical":
            z = discrete.RelaxedOneHotCategorical(lg, 0.5).sample(seed=key)
            return (discrete.straight_through(z) if hard else z) @ f
        u = discrete.RelaxedBernoulli(lg, 0.5).sample(seed=key)
        return (discrete.straight_through_bernoulli(u) if hard else u) @ f[:3]

    @jax.jit
    def run(key_array):
        # float32, and tau = 0.1 as well: coordinates underflow to exactly 0 there.
        sample = lambda t: discrete.RelaxedOneHotCategorical(logits, t).sample(seed=jax.random.key(0), sample_shape=(20_000,))
        samples = [sample(2.0), sample(0.1)]
        bits = discrete.RelaxedBernoulli(bit_logits, 0.1).sample(seed=jax.random.key(2), sample_shape=(20_000,))
        grads = [
            jax.vmap(lambda k: jax.grad(objective)(lg, k, hard, kind))(key_array)
            for lg, kind in ((logits, "categorical"), (bit_logits, "bernoulli"))
            for hard in (True, False)
        ]
        return samples, [discrete.straight_through(z) for z in samples], bits, discrete.straight_through_bernoulli(bits), grads

    samples, hards, bits, hard_bits, grads = run(keys(1, 50))
    for z, hard in zip(samples, hards):
        assert hard.dtype == z.dtype == jnp.float32 and hard.shape == z.shape
        assert set(np.unique(np.asarray(hard))) == {0.0, 1.0} and np.all(np.asarray(hard).sum(-1) == 1.0)
        np.testing.assert_array_equal(hard, np.eye(4, dtype=np.float32)[np.argmax(z, -1)])
        # The forward value is an exact categorical sample (Gumbel-max), at any temperature.
        assert_within_se(np.asarray(hard), np.exp(_np_log_softmax(logits)), "straight-through frequencies")
    assert np.any(samples[1] == 0.0)
    assert set(np.unique(np.asarray(hard_bits))) == {0.0, 1.0} and hard_bits.dtype == bits.dtype
    np.testing.assert_array_equal(hard_bits, (np.asarray(bits) > 0.5).astype(np.float32))
    assert_within_se(np.asarray(hard_bits), 1 / (1 + np.exp(-np.asarray(bit_logits))), "straight-through bits")
    # The gradient is the relaxed sample's, exactly.
    np.testing.assert_array_equal(grads[0], grads[1])
    np.testing.assert_array_equal(grads[2], grads[3])
    assert np.abs(grads[0]).max() > 0.1 and np.abs(grads[2]).max() > 0.1


def test_relaxed_distributions_as_proposals_with_a_relaxed_prior(x64):
    """The relaxed ELBO (Maddison et al.): with q = prior and a constant likelihood, every log-weight is that constant."""
    logits, bit_logits = jnp.array([1.0, -0.5, 0.3]), jnp.array([0.8, -1.2])

    @jax.jit
    def run():
        results = []
        for q in (discrete.RelaxedOneHotCategorical(logits, 0.7), discrete.RelaxedBernoulli(bit_logits, 0.7)):
            prior = type(q)(q.logits, q.temperature)
            log_joint = lambda x, z, prior=prior: prior.log_prob(z) - 1.25
            key = jax.random.key(0)
            results += [
                ej.log_weights(key, None, log_joint, q, num_samples=50),
                ej.elbo(key, None, log_joint, q, num_samples=5, gradient="stl"),
                ej.iwae_bound(key, None, log_joint, q, num_samples=5, gradient="dreg"),
            ]
        # The log-space route of the module docs: TFP's ExpConcrete (through as_proposal), distrax's Logistic.
        in_log_space = (
            tfd.ExpRelaxedOneHotCategorical(0.7, logits=logits),
            distrax.Independent(distrax.Logistic(bit_logits / 0.7, 1 / 0.7), 1),
        )
        for q in in_log_space:
            log_joint = lambda x, y, prior=q: prior.log_prob(y) - 1.25
            results.append(ej.elbo(jax.random.key(0), None, log_joint, q, num_samples=5, gradient="stl"))
        return results

    for result in run():
        np.testing.assert_allclose(result, -1.25, rtol=1e-12)

    # A learned proposal against a relaxed prior, the temperature traced: annealing does not recompile.
    prior = discrete.RelaxedOneHotCategorical(jnp.zeros(3), 0.5)
    decoder = jnp.array([1.0, -2.0, 0.5])
    traces = []

    @jax.jit
    def step(lg, temperature, key):
        traces.append(None)
        log_joint = lambda x, z: prior.log_prob(z) + z @ decoder
        proposal = lambda lg: discrete.RelaxedOneHotCategorical(lg, temperature)
        objective = lambda lg: ej.iwae_bound(key, None, log_joint, proposal(lg), num_samples=4)
        return jax.value_and_grad(objective)(lg)

    for temperature in (1.0, 0.6):
        value, grad = step(logits, temperature, jax.random.key(1))
        assert np.isfinite(value) and np.all(np.isfinite(grad)) and np.abs(grad).max() > 0
    assert len(traces) == 1


def test_log_ratios_are_the_same_in_log_space(x64):
    """The documented low-temperature route, ExpConcrete (TFP) and Logistic (distrax), gives the same log q - log p."""
    logits, prior_logits = jnp.array([1.0, -0.5, 0.3]), jnp.array([0.0, 0.2, -0.4])

    @jax.jit
    def run():
        q, p = discrete.RelaxedOneHotCategorical(logits, 0.6), discrete.RelaxedOneHotCategorical(prior_logits, 0.4)
        z, log_q = q.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(100,))
        y = jnp.log(z)
        exp_concrete = lambda lg, t: tfd.ExpRelaxedOneHotCategorical(t, logits=lg).log_prob(y)
        categorical = (log_q - p.log_prob(z), exp_concrete(logits, 0.6) - exp_concrete(prior_logits, 0.4))

        q, p = discrete.RelaxedBernoulli(logits, 0.6), discrete.RelaxedBernoulli(prior_logits, 0.4)
        u, log_q = q.sample_and_log_prob(seed=jax.random.key(1), sample_shape=(100,))
        y = jnp.log(u) - jnp.log1p(-u)
        logistic = lambda lg, t: distrax.Independent(distrax.Logistic(lg / t, 1 / t), 1).log_prob(y)
        return categorical, (log_q - p.log_prob(u), logistic(logits, 0.6) - logistic(prior_logits, 0.4))

    for ours, in_log_space in run():
        np.testing.assert_allclose(ours, in_log_space, rtol=1e-9)


def test_sampled_log_densities_stay_finite_when_float32_samples_round():
    """At tau = 0.1 in float32, samples hit exactly 0 (or 1); the log-density, from log space, does not care."""
    logits = jnp.array([3.0, -2.0, 0.5, -4.0])
    key = jax.random.key(0)
    # Eagerly: under jit, XLA would rewrite a log(exp(y)) into y and hide a density computed from z.
    z, log_q = discrete.RelaxedOneHotCategorical(logits, 0.1).sample_and_log_prob(seed=key, sample_shape=(5000,))
    u, log_b = discrete.RelaxedBernoulli(logits, 0.1).sample_and_log_prob(seed=key, sample_shape=(5000,))
    assert z.dtype == jnp.float32 and np.any(z == 0) and np.all(np.isfinite(log_q))
    assert np.any((u == 0) | (u == 1)) and np.all(np.isfinite(log_b))


def test_relaxation_argument_errors():
    with pytest.raises(ValueError, match=r"`temperature` must be finite and > 0, got 0.0"):
        discrete.RelaxedOneHotCategorical(jnp.zeros(3), 0.0)
    for relaxed in (discrete.RelaxedOneHotCategorical, discrete.RelaxedBernoulli):  # log q was NaN
        with pytest.raises(ValueError, match=r"`temperature` must be finite and > 0, got inf"):
            relaxed(jnp.zeros(3), float("inf"))
        with pytest.raises(ValueError, match=r"`logits` of a relaxed distribution must be finite"):
            relaxed(jnp.array([0.0, -jnp.inf, 1.0]), 1.0)
        under_jit = jax.jit(lambda l, relaxed=relaxed: relaxed(l, 0.5).sample_and_log_prob(seed=jax.random.key(0))[1])
        assert np.isfinite(under_jit(jnp.zeros(3)))  # traced logits pass (not checkable there)
    with pytest.raises(ValueError, match=r"`temperature` must be a scalar, got shape \(3,\)"):
        discrete.RelaxedBernoulli(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"`logits` must have shape \(..., C\) with C >= 2 classes .* got \(1,\)"):
        discrete.RelaxedOneHotCategorical(jnp.zeros(1), 1.0)
    expected = r"`value` for RelaxedOneHotCategorical.log_prob must have shape \(\*sample_shape, \*event_shape\) with event_shape = logits.shape = \(2, 3\); got \(4, 3\)"
    with pytest.raises(ValueError, match=expected):
        discrete.RelaxedOneHotCategorical(jnp.zeros((2, 3)), 1.0).log_prob(jnp.full((4, 3), 1 / 3))
    with pytest.raises(TypeError, match=r"`straight_through` needs a floating-point relaxed sample, got dtype int32"):
        discrete.straight_through(jnp.array([0, 1, 0], dtype=jnp.int32))
    with pytest.raises(ValueError, match=r"RelaxedBernoulli.log_prob must have shape .* = \(2,\); got \(\)"):
        discrete.RelaxedBernoulli(jnp.zeros(2), 1.0).log_prob(0.5)
    with pytest.raises(ValueError, match=r"`temperature` must be a scalar, got shape \(2,\)"):
        jax.jit(lambda t: discrete.RelaxedBernoulli(jnp.zeros(2), t).sample(seed=jax.random.key(0)))(jnp.ones(2))


class _HiddenLogSpace:
    """A relaxed distribution without the log-space protocol: the estimators see only z."""

    def __init__(self, distribution):
        self.distribution = distribution

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        return self.distribution.sample_and_log_prob(seed=seed, sample_shape=sample_shape)

    def log_prob(self, value):
        return self.distribution.log_prob(value)


def _relaxed_gradients(logits, temperature, make, wrap, num_samples):
    """Value and logits-gradient of every estimator that re-evaluates log q at its samples."""
    f = jnp.linspace(-1.0, 1.0, logits.shape[-1])
    log_joint = lambda x, z: jnp.sum(x * f * z - 0.5 * (z - 0.3) ** 2)  # finite at z = 0 and 1
    q = lambda lg: wrap(make(lg, temperature))
    key, x = jax.random.key(3), jnp.asarray(0.8, logits.dtype)
    estimators = {
        "elbo stl": lambda lg: ej.elbo(key, x, log_joint, q(lg), num_samples=num_samples, gradient="stl"),
        "elbo score": lambda lg: ej.elbo(key, x, log_joint, q(lg), num_samples=num_samples, gradient="score"),
        "iwae stl": lambda lg: ej.iwae_bound(key, x, log_joint, q(lg), num_samples=num_samples, gradient="stl"),
        "iwae dreg": lambda lg: ej.iwae_bound(key, x, log_joint, q(lg), num_samples=num_samples, gradient="dreg"),
        "iwae vimco": lambda lg: ej.iwae_bound(key, x, log_joint, q(lg), num_samples=num_samples, gradient="vimco"),
        "piwae": lambda lg: ej.partial_iwae_bound(key, x, log_joint, q(lg), num_groups=2, num_samples=num_samples),
    }
    return jax.jit(lambda lg: {name: jax.value_and_grad(fn)(lg) for name, fn in estimators.items()})(logits)


def test_relaxed_proposals_give_finite_gradients_where_samples_round_to_0_or_1(x64):
    """At a low temperature, relaxed samples round to exactly 0 or 1, where log q(z) is -inf or NaN:
    the estimators that re-evaluate log q (STL, DReG, score, VIMCO, PIWAE) read it from the
    log-space point instead. Where nothing rounds (float64, tau = 0.5) that is the same number."""
    for make in (discrete.RelaxedOneHotCategorical, discrete.RelaxedBernoulli):
        logits = jnp.array([0.4, -0.9, 0.1])
        ours = _relaxed_gradients(logits, 0.5, make, lambda q: q, 8)
        hidden = _relaxed_gradients(logits, 0.5, make, _HiddenLogSpace, 8)
        for name in ours:
            np.testing.assert_allclose(ours[name][0], hidden[name][0], rtol=1e-10, err_msg=f"{make.__name__} {name}")
            np.testing.assert_allclose(ours[name][1], hidden[name][1], rtol=1e-8, atol=1e-12, err_msg=f"{make.__name__} {name}")
    jax.config.update("jax_enable_x64", False)
    cases = (
        (discrete.RelaxedOneHotCategorical, jnp.array([0.4, -0.9, 0.1], jnp.float32), 0.03),
        (discrete.RelaxedBernoulli, jnp.linspace(-3.0, 3.0, 200, dtype=jnp.float32), 0.5),
    )
    for make, logits, temperature in cases:
        ours = _relaxed_gradients(logits, temperature, make, lambda q: q, 8)
        for name, (value, gradient) in ours.items():
            assert np.isfinite(value) and np.all(np.isfinite(gradient)), (make.__name__, name, value, gradient)
        # The protocol is what makes them finite: without it some are not.
        hidden = _relaxed_gradients(logits, temperature, make, _HiddenLogSpace, 8)
        assert not all(np.isfinite(v) and np.all(np.isfinite(g)) for v, g in hidden.values()), make.__name__


def test_relaxed_sample_shapes_are_ints_of_any_kind_as_in_distrax():
    """A NumPy or concrete 0-d JAX integer is a sample shape, as distrax takes it (it was refused)."""
    for q in (discrete.RelaxedBernoulli(jnp.zeros(3), 0.5), discrete.RelaxedOneHotCategorical(jnp.zeros(3), 0.5)):
        for shape, expected in ((np.int64(4), (4, 3)), (jnp.array(4), (4, 3)), ((2, np.int32(2)), (2, 2, 3))):
            assert q.sample(seed=jax.random.key(0), sample_shape=shape).shape == expected
            assert q.sample_and_log_prob(seed=jax.random.key(0), sample_shape=shape)[1].shape == expected[:-1]
