"""Diagnostics against known answers: ESS, Pareto k-hat, gradient SNR, KL per dimension, active units.

Every diagnostic is called through `jax.jit` (compiled once per shape and dtype, and shared by
the tests): that is how it is used, and it is much cheaper than compiling each eager operation.
"""

import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elbojax as ej
from elbojax import diagnostics, exact, reductions
from helpers import keys, mean_and_standard_error

ess = jax.jit(diagnostics.effective_sample_size)
k_hat = jax.jit(diagnostics.pareto_k_hat)
snr = jax.jit(diagnostics.gradient_snr, static_argnames="axis")
pooled_snr = jax.jit(diagnostics.pooled_gradient_snr, static_argnames="axis")
kl = jax.jit(diagnostics.kl_per_dimension)
units = jax.jit(diagnostics.active_units)

# ----------------------------------------------------------------------------------------------
# Effective sample size and Pareto k-hat on the Gaussian toy
# ----------------------------------------------------------------------------------------------


def test_effective_sample_size_is_the_one_from_reductions():
    assert diagnostics.effective_sample_size is reductions.effective_sample_size


def test_effective_sample_size_extremes():
    np.testing.assert_allclose(ess(jnp.full(50, -3.0)), 50.0, rtol=1e-6)
    # (1 + 49 e^-40)^2 / (1 + 49 e^-80) = 1 + 4e-16: one weight dominates.
    np.testing.assert_allclose(ess(jnp.full(50, -40.0).at[7].set(0.0)), 1.0, rtol=1e-6)


@jax.jit
def _toy_ess_and_k_hat(shift, scale_factor):
    """ESS and k-hat of 8 sets of K = 10^4 log-weights for the Gaussian toy (D = 20), with
    q = N(m + shift, (scale_factor * s)^2 I) around the exact posterior N(m, s^2 I), s^2 = 1/2."""
    model = exact.GaussianToy.random(jax.random.key(0), dim=20)
    x = model.sample(jax.random.key(1), 1)[0][0]
    posterior = model.posterior(x)
    q = distrax.MultivariateNormalDiag(posterior.loc + shift, scale_factor * posterior.scale_diag)
    draw = lambda key: ej.log_weights(key, x, model.log_joint, q, num_samples=10_000)
    log_weights = jax.vmap(draw)(keys(2, 8))
    return jax.vmap(diagnostics.effective_sample_size)(log_weights), jax.vmap(diagnostics.pareto_k_hat)(log_weights)


def test_proposal_near_the_posterior_has_high_ess_and_small_k_hat():
    # With q the posterior N(m, I/2) shifted by d in each of D dims, log w - log p(x) is exactly
    # N(-D d^2, 2 D d^2): log-normal weights, with E[w]^2 / E[w^2] = exp(-2 D d^2), so ESS / K
    # tends to exp(-0.4) for d = 0.1; and the tail is light (k = 0 asymptotically).
    sizes, k_hats = _toy_ess_and_k_hat(0.1, 1.0)
    mean, standard_error = mean_and_standard_error(sizes / 10_000)
    assert abs(mean - math.exp(-0.4)) < 4 * standard_error + 1e-3, (mean, standard_error)  # + O(1/K) bias
    assert np.all(k_hats < 0.5), k_hats


def test_proposal_narrower_than_the_posterior_has_large_k_hat():
    # q with half the posterior's scale in 20 dims: unbounded weights (asymptotic shape
    # 1 - 0.5^2 = 0.75), far heavier before the asymptote; the ESS collapses too.
    sizes, k_hats = _toy_ess_and_k_hat(0.0, 0.5)
    assert np.all(k_hats > 0.7), k_hats
    assert np.all(sizes < 0.01 * 10_000), sizes


# ----------------------------------------------------------------------------------------------
# Pareto k-hat
# ----------------------------------------------------------------------------------------------


def _reference_k_hat(log_weights):
    """A plain float64 NumPy transcription of the PSIS paper's steps, with dynamic sizes."""
    log_weights = np.sort(np.asarray(log_weights, np.float64))
    log_weights = log_weights - log_weights[-1]
    num_samples = log_weights.size
    tail_length = math.ceil(min(num_samples / 5, 3 * math.sqrt(num_samples)))
    cutoff = max(log_weights[-tail_length - 1], np.log(np.finfo(np.float64).tiny))
    tail = np.exp(log_weights[log_weights > cutoff]) - np.exp(cutoff)  # ascending
    n = tail.size
    if n < 5:
        return np.inf
    m = 30 + math.isqrt(n)
    first_quartile = tail[math.floor(n / 4 + 0.5) - 1]
    theta = np.array([(math.sqrt(m / (j - 0.5)) - 1) / (3 * first_quartile) - 1 / tail[-1] for j in range(1, m + 1)])
    shapes = np.array([np.mean(np.log1p(t * tail)) for t in theta])
    log_lik = n * (np.log(theta / shapes) - shapes - 1)
    weights = np.exp(log_lik - log_lik.max())
    weights /= weights.sum()
    keep = weights >= 10 * np.finfo(np.float64).eps
    theta_bar = np.sum(weights[keep] * theta[keep]) / np.sum(weights[keep])
    shape = np.mean(np.log1p(theta_bar * tail))
    return (n * shape + 10 * 0.5) / (n + 10)


def _reference_cases():
    """Log-weights of K = 100 (one compilation), M = 20 fitted."""
    rng = np.random.default_rng(0)
    return {
        "normal": rng.normal(size=100),
        "pareto": 0.8 * rng.exponential(size=100),
        # Ties at the cutoff: 12 distinct values above 8 copies of the 21st largest, -1.
        "ties": np.concatenate([-5 - np.arange(80.0), np.full(8, -1.0), -np.linspace(0, 0.9, 12)]),
        # Only 3 weights above the cutoff: too few to fit, +inf.
        "few": np.concatenate([-5 - np.arange(79.0), np.full(18, -1.0), [0.0, -0.1, -0.2]]),
        # Weights below the smallest normal float times the largest: the cutoff is floored.
        "floored": np.concatenate([-np.linspace(0, 50, 10), np.full(90, -1000.0)]),
        # The same with a narrow tail: divided by the floored u, the exceedances reached 1 / tiny
        # and the grid's theta rounded to 0 (NaN). Zero weights floor it too.
        "floored, narrow": np.concatenate([-np.linspace(0, 4, 10), np.full(90, -1000.0)]),
        "zero weights": np.concatenate([-np.linspace(0, 4, 10), np.full(90, -np.inf)]),
    }


def test_pareto_k_hat_matches_a_plain_transcription_of_the_paper(x64):
    for name, log_weights in _reference_cases().items():
        expected = _reference_k_hat(log_weights)
        assert np.isfinite(expected) == (name != "few")
        got = k_hat(jnp.asarray(log_weights))
        assert got.dtype == jnp.float64
        np.testing.assert_allclose(got, expected, rtol=1e-10, err_msg=name)
        if name == "normal":  # float32 in, float32 out, to float32 accuracy
            single = k_hat(jnp.asarray(log_weights, jnp.float32))
            assert single.dtype == jnp.float32
            np.testing.assert_allclose(single, expected, atol=1e-5)


def test_pareto_k_hat_is_shift_invariant_far_outside_float_range(x64):
    log_weights = jnp.asarray(_reference_cases()["normal"])
    for shift in (1e4, -1e4):  # weights of e^10000 and e^-10000
        np.testing.assert_allclose(k_hat(log_weights + shift), k_hat(log_weights), rtol=1e-9)


def test_pareto_k_hat_recovers_a_known_pareto_shape():
    # log w = xi * E with E ~ Exp(1) makes w Pareto with tail index 1/xi: its exceedances over any
    # threshold are generalised Pareto with shape exactly xi. K = 10^4 fits M = 300 weights, and
    # the prior moves the expectation to (300 xi + 5) / 310. 64 repeats give a standard error of
    # about 0.01; tolerance 4 of them, plus 0.005 for the Zhang-Stephens estimator's own bias at
    # M = 300 (measured over 1024 repeats: +0.002 +- 0.002 at xi = 0.3, -0.002 +- 0.003 at 0.7).
    shapes = np.array([0.3, 0.7])
    exponentials = np.random.default_rng(1).exponential(size=(64, 10_000))
    log_weights = jnp.asarray(shapes[:, None, None] * exponentials, jnp.float32)  # (2, 64, K)
    k_hats = jax.jit(jax.vmap(jax.vmap(diagnostics.pareto_k_hat)))(log_weights)
    for shape, estimates in zip(shapes, np.asarray(k_hats)):
        mean, standard_error = mean_and_standard_error(estimates)
        assert abs(mean - (300 * shape + 5) / 310) < 4 * standard_error + 0.005, (shape, mean, standard_error)


def test_zhang_stephens_fit_agrees_with_maximum_likelihood(x64):
    # Two consistent estimators of the same shape; on 3000 generalised Pareto draws they differ
    # by far less than either's sampling error (about 0.03). Compared before the PSIS prior.
    scipy_stats = pytest.importorskip("scipy.stats")
    fit = jax.jit(diagnostics._gpd_shape)
    for shape in (0.2, 0.9):
        sample = np.sort(scipy_stats.genpareto.rvs(shape, scale=2.0, size=3000, random_state=0))
        adjusted = fit(jnp.asarray(sample), jnp.asarray(sample.size))
        zhang_stephens = ((sample.size + 10) * adjusted - 5) / sample.size
        maximum_likelihood = scipy_stats.genpareto.fit(sample, floc=0)[0]
        assert abs(zhang_stephens - maximum_likelihood) < 5e-3, (shape, zhang_stephens, maximum_likelihood)


def test_pareto_k_hat_special_values():
    normal = jnp.asarray(np.random.default_rng(2).normal(size=100), jnp.float32)
    assert k_hat(jnp.zeros(100)) == jnp.inf  # no weight above the cutoff
    assert k_hat(jnp.full(100, -jnp.inf)) == jnp.inf  # all weights zero
    assert k_hat(jnp.tile(jnp.array([0.0, -1.0, -2.0, -3.0]), 25)) == jnp.inf  # a discrete proposal
    assert jnp.isnan(k_hat(normal.at[3].set(jnp.nan)))
    assert k_hat(normal.at[3].set(jnp.inf)) == jnp.inf
    assert np.isfinite(k_hat(normal.at[3].set(-jnp.inf)))  # one zero weight is just a weight
    assert jax.jit(jax.grad(diagnostics.pareto_k_hat))(normal).tolist() == [0.0] * 100
    # K = 5000, as in `train.evaluate`: XLA's `max` over 4096 entries or more skips a NaN on CPU.
    large = jnp.asarray(np.random.default_rng(3).normal(size=5000), jnp.float32)
    for weights in (large.at[17].set(jnp.nan), jnp.full(5000, jnp.nan), large.at[:4999].set(jnp.nan)):
        assert jnp.isnan(jax.jit(diagnostics.pareto_k_hat)(weights))
    assert jax.jit(diagnostics.pareto_k_hat)(large.at[17].set(jnp.inf)) == jnp.inf


def test_pareto_k_hat_argument_errors():
    assert np.isfinite(k_hat(jnp.arange(21.0)))  # the smallest K with a tail of 5
    with pytest.raises(ValueError, match=r"K >= 21 log-weights; got K = 20"):
        k_hat(jnp.zeros(20))
    with pytest.raises(ValueError, match=r"must have shape \(K,\) .* got shape \(4, 100\)"):
        k_hat(jnp.zeros((4, 100)))
    with pytest.raises(TypeError, match=r"must be floating point, got dtype int32"):
        k_hat(jnp.zeros(100, jnp.int32))


# ----------------------------------------------------------------------------------------------
# Gradient signal-to-noise ratio
# ----------------------------------------------------------------------------------------------


def test_gradient_snr_exact_values_and_zero_variance():
    # "w": draws (1, 0) and (3, 0): means (2, 0), variances (2, 0). "b": 2 and 2.
    draws = {"w": jnp.array([[1.0, 0.0], [3.0, 0.0]]), "b": (jnp.array([2.0, 2.0]),)}
    ratios = snr(draws)
    assert jax.tree.structure(ratios) == jax.tree.structure({"w": 0, "b": (0,)})
    np.testing.assert_allclose(ratios["w"], [math.sqrt(2.0), 0.0], rtol=1e-6)  # 2 / sqrt(2); no signal
    assert ratios["b"][0] == jnp.inf  # a non-zero gradient without noise
    np.testing.assert_allclose(pooled_snr(draws), 2.0, rtol=1e-6)  # ||(2, 0, 2)|| / sqrt(2 + 0 + 0)
    # Identical draws whose sum is inexact (0.1 + 0.1 + 0.1 != 0.3) still have zero variance.
    assert snr(jnp.full((3, 2), 0.1)).tolist() == [jnp.inf, jnp.inf]
    assert pooled_snr(jnp.zeros((3, 2))) == 0.0
    assert pooled_snr(jnp.full((3, 2), -0.1)) == jnp.inf
    assert jnp.isnan(snr(jnp.array([1.0, jnp.nan])))


def test_gradient_snr_matches_numpy_on_any_axis(x64):
    draws = np.random.default_rng(3).normal(size=(7, 3, 4)) + 0.3
    expected = np.abs(draws.mean(0)) / draws.std(0, ddof=1)
    pooled = np.linalg.norm(draws.mean(0)) / np.sqrt(np.sum(draws.var(0, ddof=1)))
    np.testing.assert_allclose(snr(jnp.asarray(draws)), expected, rtol=1e-12)
    np.testing.assert_allclose(pooled_snr(jnp.asarray(draws)), pooled, rtol=1e-12)
    moved = jnp.moveaxis(jnp.asarray(draws), 0, 2)
    np.testing.assert_allclose(snr(moved, axis=2), expected, rtol=1e-12)
    np.testing.assert_allclose(pooled_snr(moved, axis=-1), pooled, rtol=1e-12)


def test_gradient_snr_of_16_bit_draws_is_computed_in_float32():
    """float16 draws with a spread above ~256: the squared deviations overflowed (SNR 0, pooled NaN)."""
    draws = np.random.default_rng(0).normal(size=(50, 3)) * np.array([300.0, 1000.0, 20.0]) + 400.0
    expected = np.abs(draws.mean(0)) / draws.std(0, ddof=1)
    pooled = np.linalg.norm(draws.mean(0)) / np.sqrt(np.sum(draws.var(0, ddof=1)))
    for dtype in (jnp.float16, jnp.bfloat16):
        rounded = np.asarray(jnp.asarray(draws, dtype), np.float64)
        np.testing.assert_allclose(snr(jnp.asarray(draws, dtype)), np.abs(rounded.mean(0)) / rounded.std(0, ddof=1), rtol=1e-5)
        np.testing.assert_allclose(pooled_snr(jnp.asarray(draws, dtype)), pooled, rtol=2e-2)
    np.testing.assert_allclose(snr(jnp.asarray(draws, jnp.float32)), expected, rtol=1e-5)


def test_gradient_snr_of_normal_draws_with_known_mean_and_std():
    # Draws N(2, 4^2): SNR = 0.5. With N = 10^4 draws each estimate has standard deviation
    # sqrt((1 + SNR^2 / 2) / N) = 0.011 (delta method); tolerance 0.045, 4 of them.
    rng = np.random.default_rng(4)
    draws = {"w": 2.0 + 4.0 * rng.normal(size=(10_000, 3, 2)), "b": 2.0 + 4.0 * rng.normal(size=10_000)}
    draws = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), draws)
    ratios = snr(draws)
    assert ratios["w"].shape == (3, 2) and ratios["b"].shape == ()
    for leaf in jax.tree.leaves(ratios):
        np.testing.assert_allclose(leaf, 0.5, atol=0.045)
    # Pooled over the 7 parameters: 2 sqrt(7) / sqrt(7 * 16) = 0.5 too, with a standard deviation
    # of about 0.004 (the noise of 7 parameters averages out); tolerance 0.02.
    np.testing.assert_allclose(pooled_snr(draws), 0.5, atol=0.02)
    # Parameters the objective does not use (zero in every draw) leave the pooled SNR unchanged.
    np.testing.assert_allclose(pooled_snr(dict(draws, unused=jnp.zeros((10_000, 50)))), pooled_snr(draws), rtol=1e-6)
    # vmap over the parameters gives the same SNRs.
    flat = draws["w"].reshape(10_000, 6)
    np.testing.assert_allclose(jax.jit(jax.vmap(diagnostics.gradient_snr, in_axes=1))(flat), snr(flat), rtol=1e-6)


def test_gradient_snr_argument_errors():
    with pytest.raises(ValueError, match=r"needs at least 2 draws along axis 0 to estimate a variance, got 1"):
        snr({"w": jnp.zeros((1, 3))})
    with pytest.raises(ValueError, match=r"leaf \['a'\] has 4, leaf \['b'\] has 5"):
        pooled_snr({"a": jnp.zeros((4, 2)), "b": jnp.zeros((5,))})
    with pytest.raises(ValueError, match=r"leaf \['b'\] has shape \(\), which has no axis 0"):
        snr({"a": jnp.zeros((4, 2)), "b": jnp.zeros(())})
    with pytest.raises(TypeError, match=r"leaf \['a'\] must be floating point, got dtype int32"):
        snr({"a": jnp.zeros((4, 2), jnp.int32)})
    with pytest.raises(ValueError, match=r"needs at least one array of gradient draws"):
        pooled_snr({})
    with pytest.raises(TypeError, match=r"`axis` of `gradient_snr` must be a static Python int"):
        jax.jit(diagnostics.gradient_snr)(jnp.zeros((4, 2)), 0)


# ----------------------------------------------------------------------------------------------
# KL per dimension
# ----------------------------------------------------------------------------------------------


@jax.jit
def _distrax_kls(mean, scale, prior_mean, prior_scale):
    """distrax's per-dimension KL and the KL of the two MultivariateNormalDiags."""
    per_dimension = distrax.Normal(mean, scale).kl_divergence(distrax.Normal(prior_mean, prior_scale))
    prior = distrax.MultivariateNormalDiag(prior_mean, prior_scale)
    return per_dimension, distrax.MultivariateNormalDiag(mean, scale).kl_divergence(prior)


def test_kl_per_dimension_matches_distrax(x64):
    rng = np.random.default_rng(5)
    mean, scale = rng.normal(size=6), np.exp(rng.normal(size=6))
    standard, other = (np.zeros(6), np.ones(6)), (rng.normal(size=6), np.exp(rng.normal(size=6)))
    for prior in (standard, other, (np.full(6, 0.5), np.full(6, 2.0))):
        per_dimension, total = _distrax_kls(mean, scale, *prior)
        got = kl(mean, scale, *prior)
        assert got.shape == (6,) and got.dtype == jnp.float64
        np.testing.assert_allclose(got, per_dimension, rtol=1e-12)
        np.testing.assert_allclose(jnp.sum(got), total, rtol=1e-12)
    # The defaults are the standard normal; a scalar prior broadcasts.
    np.testing.assert_allclose(kl(mean, scale), kl(mean, scale, *standard), rtol=1e-15)
    np.testing.assert_allclose(kl(mean, scale, 0.5, 2.0), kl(mean, scale, np.full(6, 0.5), np.full(6, 2.0)), rtol=1e-15)


def test_kl_per_dimension_known_values():
    got = kl(jnp.array([0.0, 1.0, 0.0, 3.0]), jnp.array([1.0, 1.0, math.e, 2.0]), 0.0, jnp.array([1.0, 1.0, 1.0, 2.0]))
    # q = p; a unit shift; a scale of e, (e^2 - 1) / 2 - 1; a shift of 1.5 prior scales.
    np.testing.assert_allclose(got, [0.0, 0.5, 0.5 * (math.e**2 - 1) - 1, 0.5 * 1.5**2], rtol=1e-6, atol=0)


def test_kl_per_dimension_of_a_zero_or_negative_scale():
    """As documented: a zero proposal scale is the limit +inf, a negative one NaN."""
    got = kl(jnp.zeros(2), jnp.array([0.0, -1.0]), 0.0, 1.0)
    assert got[0] == np.inf and np.isnan(got[1])


def test_kl_per_dimension_under_vmap():
    rng = np.random.default_rng(6)
    means = jnp.asarray(rng.normal(size=(5, 6)), jnp.float32)
    scales = jnp.asarray(np.exp(rng.normal(size=(5, 6))), jnp.float32)
    batched = jax.jit(jax.vmap(diagnostics.kl_per_dimension))(means, scales)
    assert batched.shape == (5, 6)
    for n in range(5):
        np.testing.assert_allclose(batched[n], kl(means[n], scales[n]), rtol=1e-6)


def test_kl_per_dimension_shape_errors():
    with pytest.raises(ValueError, match=r"`proposal_scale` must have the shape of `proposal_mean`, \(3,\), got \(4,\)"):
        kl(jnp.zeros(3), jnp.ones(4))
    with pytest.raises(ValueError, match=r"`prior_scale` must be broadcastable to the proposal's shape \(3,\), got shape \(2,\)"):
        kl(jnp.zeros(3), jnp.ones(3), 0.0, jnp.ones(2))
    with pytest.raises(ValueError, match=r"`prior_mean` must be broadcastable to .* \(3,\), got shape \(2, 3\)"):
        kl(jnp.zeros(3), jnp.ones(3), jnp.zeros((2, 3)))


# ----------------------------------------------------------------------------------------------
# Active units
# ----------------------------------------------------------------------------------------------


def test_active_units_on_a_constructed_batch():
    # Columns alternate offset + a, offset - a over an even N: each variance is exactly a^2.
    signs = np.tile([1.0, -1.0], 500)[:, None]  # (1000, 1)
    amplitudes = np.array([0.0, 1.0, 0.0, 0.05, 0.2, 0.003])
    offsets = np.array([0.0, 0.0, 3.0, -1.0, 0.5, 0.0])
    posterior_means = jnp.asarray(offsets + signs * amplitudes, jnp.float32)  # (1000, 6)
    result = units(posterior_means)
    assert isinstance(result, diagnostics.ActiveUnits)
    assert int(result.count) == 2  # dims 1 (variance 1) and 4 (0.04)
    np.testing.assert_allclose(result.variance, amplitudes**2, rtol=1e-6, atol=1e-12)
    # The threshold is a value, not a shape: traced, it does not recompile.
    assert int(units(posterior_means, 1e-3).count) == 3  # dim 3 (0.0025) too
    assert int(units(posterior_means, 2.0).count) == 0


def test_active_units_argument_errors():
    with pytest.raises(ValueError, match=r"shape \(N, d\) with N >= 2 .* got shape \(6,\)"):
        units(jnp.zeros(6))
    with pytest.raises(ValueError, match=r"got shape \(1, 6\)"):
        units(jnp.zeros((1, 6)))
    with pytest.raises(ValueError, match=r"`threshold` must be a scalar, got shape \(6,\)"):
        units(jnp.zeros((4, 6)), jnp.full(6, 0.01))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_pareto_k_hat_of_16_bit_log_weights_is_the_float32_fit(dtype):
    """The fit ran in 16 bits: NaN for one of 64 rows of bfloat16 Exponential log-weights (rounding
    gave theta and k(theta) opposite signs), and up to 0.094 from the float32 fit of the same values."""
    rows = (0.7 * jax.random.exponential(jax.random.key(4), (64, 1000))).astype(dtype)
    ours = jax.vmap(diagnostics.pareto_k_hat)(rows)
    reference = jax.vmap(diagnostics.pareto_k_hat)(rows.astype(jnp.float32))
    assert ours.dtype == dtype and bool(jnp.all(jnp.isfinite(ours)))
    np.testing.assert_allclose(np.asarray(ours, np.float32), reference, atol=2 * float(jnp.finfo(dtype).eps))


def test_kl_per_dimension_is_inf_for_an_infinite_proposal_scale_or_a_zero_prior_scale():
    np.testing.assert_array_equal(diagnostics.kl_per_dimension(jnp.zeros(2), jnp.array([jnp.inf, 1.0])), [jnp.inf, 0.0])
    np.testing.assert_array_equal(diagnostics.kl_per_dimension(jnp.zeros(2), jnp.ones(2), prior_scale=jnp.array([0.0, 1.0])), [jnp.inf, 0.0])


def test_pareto_k_hat_of_a_float32_tail_spanning_the_float_range_is_large_not_nan():
    """Scaled by their first quartile alone, the largest exceedance overflowed (NaN)."""
    log_weights = np.concatenate([np.full(80, -1000.0), np.full(5, -87.30), -np.linspace(0, 87, 15)])
    got = k_hat(jnp.asarray(log_weights, jnp.float32))
    assert np.isfinite(got) and got > 0.7
