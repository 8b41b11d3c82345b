"""Self-normalised importance sampling: weights, expectations against exact posteriors, resampling."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elbojax as ej
from elbojax import exact, snis
from helpers import assert_within_se, keys

SE_LIMIT = 4.0  # Monte Carlo claims: within 4 standard errors, fixed keys


@jax.jit
def _model_and_point(seed):
    """A float64 linear Gaussian (D = 5, d = 2) and one point drawn from it, in one compiled call."""
    model = exact.LinearGaussian.random(jax.random.key(seed), data_dim=5, latent_dim=2, dtype=jnp.float64)
    return model, model.sample(jax.random.key(seed + 1), 1)[0][0]


def test_normalized_weights_are_stable_and_handle_zero_weights(x64):
    probabilities = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    with np.errstate(divide="ignore"):
        log_weights = jnp.asarray(np.log(probabilities) + 1e4)  # far outside exp's range
    weights = jax.jit(snis.normalized_weights)(log_weights)
    np.testing.assert_allclose(weights, probabilities, rtol=1e-11, atol=0)
    assert weights[-1] == 0.0
    all_zero = snis.normalized_weights(jnp.full(3, -jnp.inf))
    np.testing.assert_array_equal(all_zero, 0.0)
    assert np.all(np.isnan(snis.normalized_weights(jnp.array([0.0, jnp.nan, 1.0]))))


def test_weights_and_ess_do_not_depend_on_a_shift_and_all_zero_weights_have_zero_gradients():
    """float32 log-weights shifted by -1e5 or -1e7: still 0.25 each and an ESS of 4 (were 0.368
    each, summing to 1.47, and an ESS of 1: exp(l - LSE(l)) lost the digits of the rounded LSE).
    When every weight is 0 the value is 0 and so is the gradient (was NaN, from LSE's backward)."""
    for offset in (-1e5, -1e7):
        np.testing.assert_allclose(snis.normalized_weights(jnp.full(4, offset, jnp.float32)), 0.25, rtol=1e-6)
        np.testing.assert_allclose(ej.effective_sample_size(jnp.full((2, 4), offset, jnp.float32)), [4.0, 4.0], rtol=1e-6)
    log_weights = jnp.log(jnp.array([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(
        jax.jacobian(snis.normalized_weights)(log_weights), jax.jacobian(jax.nn.softmax)(log_weights), rtol=1e-5, atol=1e-7
    )
    ess_of = lambda l: ej.effective_sample_size(l)
    np.testing.assert_allclose(jax.grad(ess_of)(log_weights), jax.grad(lambda l: jnp.exp(2 * jax.nn.logsumexp(l) - jax.nn.logsumexp(2 * l)))(log_weights), rtol=1e-5)
    nothing = jnp.full(4, -jnp.inf)
    f = jnp.arange(4.0)[:, None]
    for fn in (lambda l: snis.normalized_weights(l)[0], ess_of, lambda l: snis.posterior_expectation(f, l).mean[0]):
        assert fn(nothing) == 0.0
        np.testing.assert_array_equal(jax.grad(fn)(nothing), 0.0)


def test_posterior_expectation_small_example_and_zero_weight_values_are_not_used():
    estimate = jax.jit(snis.posterior_expectation)(jnp.array([[1.0], [3.0]]), jnp.log(jnp.array([1.0, 3.0])))
    np.testing.assert_allclose(estimate.mean, [2.5], rtol=1e-6)
    np.testing.assert_allclose(estimate.effective_sample_size, 1.6, rtol=1e-6)
    # sqrt(0.25^2 (1 - 2.5)^2 + 0.75^2 (3 - 2.5)^2)
    np.testing.assert_allclose(estimate.standard_error, [np.sqrt(0.0625 * 2.25 + 0.5625 * 0.25)], rtol=1e-6)
    with_infinite = jax.jit(snis.posterior_expectation)(jnp.array([1.0, jnp.inf, 3.0]), jnp.array([0.0, -jnp.inf, jnp.log(3.0)]))
    np.testing.assert_allclose(with_infinite.mean, 2.5, rtol=1e-6)
    assert np.isfinite(with_infinite.standard_error)


def test_a_zero_weight_with_an_infinite_value_leaves_the_gradient_finite(x64):
    """d mean / d l_k = w_k (f_k - mean), 0 for the zero weight: its infinite f must not make every
    entry NaN through 0 * inf in the backward pass (it did)."""
    log_weights, f_values = jnp.array([0.0, -jnp.inf, 1.0]), jnp.array([1.0, jnp.inf, 3.0])
    estimate = lambda lw: snis.posterior_expectation(f_values, lw)
    weights = jax.nn.softmax(log_weights)
    mean = float(estimate(log_weights).mean)
    grad = jax.grad(lambda lw: estimate(lw).mean)(log_weights)
    np.testing.assert_allclose(grad, [weights[0] * (1.0 - mean), 0.0, weights[2] * (3.0 - mean)], rtol=1e-12)
    assert np.isfinite(jax.grad(lambda lw: estimate(lw).standard_error)(log_weights)).all()


def test_importance_samples_are_the_draws_of_log_weights(x64):
    model, x = _model_and_point(0)

    @jax.jit
    def run(key):
        q = distrax.MultivariateNormalDiag(model.posterior_mean(x) + 0.2, jnp.full(2, 0.9))
        z, log_weights = snis.importance_samples(key, x, model.log_joint, q, num_samples=37, chunk_size=10)
        reference = ej.log_weights(key, x, model.log_joint, q, num_samples=37)
        return z, log_weights, reference, jax.vmap(model.log_joint, (None, 0))(x, z) - q.log_prob(z)

    z, log_weights, reference, by_hand = run(jax.random.key(2))
    assert z.shape == (37, 2) and log_weights.shape == (37,)
    # The same draws; the values agree up to float rounding (chunked and unchunked code differ).
    np.testing.assert_allclose(log_weights, reference, rtol=1e-14)
    np.testing.assert_allclose(log_weights, by_hand, rtol=1e-13)


def test_posterior_expectations_match_the_exact_posterior_within_their_standard_errors(x64):
    """f(z) = (z, z^2) under p(z | x) of a linear Gaussian, from a shifted, widened proposal.

    K = 4000 per estimate; 200 independent estimates. Each one's deviation from the exact value,
    divided by its own delta-method standard error, must be a z-score: mean within 4 SE of 0,
    spread between 0.8 and 1.25 (the delta method's SE is itself an estimate).
    """
    model, x = _model_and_point(3)

    @jax.jit
    def run(key_array):
        mean, cov = model.posterior_mean(x), model.posterior_covariance
        sd = jnp.sqrt(jnp.diag(cov))
        q = distrax.MultivariateNormalDiag(mean + 0.3 * sd, 1.3 * sd)

        def estimate(key):
            z, log_weights = snis.importance_samples(key, x, model.log_joint, q, num_samples=4000)
            return snis.posterior_expectation(jnp.concatenate([z, z**2], axis=1), log_weights)

        return jax.vmap(estimate)(key_array), jnp.concatenate([mean, mean**2 + jnp.diag(cov)])

    estimates, exact_values = run(keys(5, 200))
    z_scores = np.asarray((estimates.mean - exact_values) / estimates.standard_error)
    assert_within_se(z_scores, np.zeros(4), "SNIS z-scores", limit=SE_LIMIT)
    assert np.all((z_scores.std(0) > 0.8) & (z_scores.std(0) < 1.25)), z_scores.std(0)
    one = jax.tree.map(lambda a: a[0], estimates)
    assert np.all(np.abs(one.mean - exact_values) < SE_LIMIT * one.standard_error)
    assert 1000 < float(one.effective_sample_size) < 4000


def test_multinomial_resampling_frequencies_match_the_weights():
    probabilities = np.array([0.1, 0.2, 0.3, 0.4, 0.0])
    with np.errstate(divide="ignore"):
        log_weights = jnp.asarray(np.log(probabilities) - 500.0)
    num = 20_000
    indices = jax.jit(lambda k: snis.resample(k, log_weights, num))(jax.random.key(0))
    assert indices.shape == (num,) and indices.dtype == jnp.int32
    frequencies = np.bincount(np.asarray(indices), minlength=5) / num
    se = np.sqrt(probabilities * (1 - probabilities) / num)
    assert np.all(np.abs(frequencies[:4] - probabilities[:4]) < SE_LIMIT * se[:4]), frequencies
    assert frequencies[4] == 0.0


def test_a_zero_standard_error_has_a_zero_gradient():
    """K = 1, or equal values: SE 0, and its gradient was NaN (sqrt's derivative at 0)."""
    for f, log_weights in ((jnp.ones((1, 1)), jnp.zeros(1)), (jnp.full((3, 1), 2.0), jnp.array([0.0, 1.0, -1.0]))):
        se = lambda l, f=f: snis.posterior_expectation(f, l).standard_error.sum()
        assert se(log_weights) == 0.0
        np.testing.assert_array_equal(jax.grad(se)(log_weights), 0.0)
    f, log_weights = jnp.array([[1.0], [3.0]]), jnp.array([0.0, 0.5])
    se = lambda l: snis.posterior_expectation(f, l).standard_error.sum()
    by_hand = lambda l: jnp.sqrt(jnp.sum(jax.nn.softmax(l) ** 2 * (f[:, 0] - jnp.sum(jax.nn.softmax(l) * f[:, 0])) ** 2))
    np.testing.assert_allclose(jax.grad(se)(log_weights), jax.grad(by_hand)(log_weights), rtol=1e-5)


def test_systematic_resampling_never_picks_a_trailing_zero_weight():
    """In float32 the last point (u + num - 1) / num rounds to exactly 1 when u is near 1 (about
    one key in 2200 at num = 10000); it fell past the end, and the clip gave the last sample,
    of weight 0 here."""
    num = 10_000
    candidates = jax.random.split(jax.random.key(0), 20_000)
    u = jax.vmap(lambda k: jax.random.uniform(k, (), jnp.float32))(candidates)
    rounding = candidates[jnp.nonzero(u + (num - 1) >= num)[0]]
    assert rounding.shape[0] >= 3  # the keys that reach the end
    log_weights = jnp.log(jnp.array([1.0, 1.0, 0.0]))
    for key in rounding[:3]:
        counts = np.bincount(np.asarray(snis.resample(key, log_weights, num, method="systematic")), minlength=3)
        np.testing.assert_array_equal(counts, [5000, 5000, 0])


def test_systematic_resampling_counts_are_floor_or_ceil_and_unbiased():
    probabilities = np.array([0.05, 0.0, 0.33, 0.12, 0.5])
    with np.errstate(divide="ignore"):
        log_weights = jnp.asarray(np.log(probabilities))
    num = 7
    indices = jax.jit(jax.vmap(lambda k: snis.resample(k, log_weights, num, method="systematic")))(keys(1, 4000))
    counts = np.stack([np.bincount(row, minlength=5) for row in np.asarray(indices)])
    expected = num * probabilities
    assert np.all((counts >= np.floor(expected)) & (counts <= np.ceil(expected)))
    assert np.all(np.diff(np.asarray(indices), axis=1) >= 0)  # sorted
    assert np.all(counts[:, 1] == 0)
    assert_within_se(counts, expected, "systematic counts", limit=SE_LIMIT)


def test_importance_resample_returns_the_chosen_proposals(x64):
    model, x = _model_and_point(6)

    @jax.jit
    def run(key):
        q = distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2))
        result = snis.importance_resample(key, x, model.log_joint, q, num_samples=50, num_resampled=9)
        return result, snis.importance_samples(jax.random.split(key)[0], x, model.log_joint, q, num_samples=50)

    result, (z, log_weights) = run(jax.random.key(8))
    np.testing.assert_allclose(result.log_weights, log_weights, rtol=1e-14)
    np.testing.assert_array_equal(result.samples, z[result.indices])
    np.testing.assert_allclose(result.effective_sample_size, ej.effective_sample_size(log_weights), rtol=1e-12)


def test_argument_errors_at_trace_time():
    log_weights = jnp.zeros(4)
    with pytest.raises(ValueError, match=r"`log_weights` must have shape \(K,\) with K >= 1.*got shape \(2, 2\)"):
        jax.jit(snis.normalized_weights)(jnp.zeros((2, 2)))
    with pytest.raises(TypeError, match=r"`log_weights` must be a floating-point array, got dtype int32"):
        snis.normalized_weights(jnp.zeros(3, jnp.int32))
    with pytest.raises(ValueError, match=r"`f_values` must have shape \(K, \.\.\.\) with K = 4.*got \(3, 2\)"):
        jax.jit(snis.posterior_expectation)(jnp.zeros((3, 2)), log_weights)
    with pytest.raises(ValueError, match=r"`method` must be one of 'multinomial', 'systematic'; got 'stratified'"):
        snis.resample(jax.random.key(0), log_weights, 3, method="stratified")
    with pytest.raises(ValueError, match=r"`num` must be an int >= 1, got 0"):
        snis.resample(jax.random.key(0), log_weights, 0)
    with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key"):
        snis.resample(0, log_weights, 3)


@pytest.mark.parametrize("num", [3, 5000])  # 5000: XLA's CPU max over >= 4096 entries skips NaN
def test_a_nan_log_weight_makes_the_expectation_nan(num):
    """Was mean 0 and standard error 0: NaN weights failed `weights > 0` and were dropped."""
    log_weights = jnp.zeros(num).at[1].set(jnp.nan)
    f_values = jnp.arange(2.0 * num).reshape(num, 2)
    estimate = jax.jit(snis.posterior_expectation)(f_values, log_weights)
    assert np.all(np.isnan(estimate.mean)) and np.all(np.isnan(estimate.standard_error))
    assert np.isnan(estimate.effective_sample_size)
    # A zero weight still keeps an infinite f value out, next to a NaN log-weight or not.
    with_zero = snis.posterior_expectation(jnp.array([1.0, jnp.inf, 3.0]), jnp.array([0.0, -jnp.inf, jnp.log(3.0)]))
    assert np.isfinite(with_zero.mean) and np.isfinite(with_zero.standard_error)


def test_resample_with_a_nan_log_weight_gives_indices_in_range_and_a_nan_ess():
    """The documented behaviour: the indices mean nothing but are valid; the ESS says so."""
    log_weights = jnp.array([0.0, jnp.nan, 0.0, -1.0])
    for method in snis.RESAMPLING_METHODS:
        indices = jax.jit(snis.resample, static_argnums=2, static_argnames="method")(jax.random.key(0), log_weights, 8, method=method)
        assert indices.dtype == jnp.int32 and np.all((0 <= indices) & (indices < 4))
    assert np.isnan(ej.effective_sample_size(log_weights))


def test_effective_sample_size_needs_a_sample_axis():
    for fn in (snis.effective_sample_size, ej.effective_sample_size):
        with pytest.raises(ValueError, match=r"`log_weights` must have .*got shape \(\)"):
            fn(jnp.array(1.0))
        with pytest.raises(ValueError, match=r"`log_weights` must have .*got shape \(\)"):
            jax.jit(fn)(jnp.array(1.0))
    np.testing.assert_allclose(snis.effective_sample_size(jnp.zeros(4)), 4.0, rtol=1e-6)


def test_importance_samples_refuse_a_pathwise_gradient_through_a_discrete_proposal():
    """As `elbojax.log_weights` does: the gradient was -grad log q alone, with no score term."""
    logits = jnp.array([0.2, -0.3, 0.5])
    log_joint = lambda x, z: -0.5 * (z - 1.0) ** 2
    loss = lambda l, fn: fn(jax.random.key(0), None, log_joint, distrax.Categorical(logits=l), num_samples=3)
    with pytest.raises(ValueError, match=r"needs a reparameterizable proposal"):
        jax.grad(lambda l: loss(l, ej.log_weights).sum())(logits)
    with pytest.raises(ValueError, match=r"importance_samples` / `importance_resample` have no pathwise gradient through Categorical"):
        jax.grad(lambda l: loss(l, snis.importance_samples)[1].sum())(logits)
    with pytest.raises(ValueError, match=r"no pathwise gradient through Categorical"):
        jax.grad(lambda l: snis.importance_resample(jax.random.key(0), None, log_joint, distrax.Categorical(logits=l), num_samples=3, num_resampled=2).log_weights.sum())(logits)
