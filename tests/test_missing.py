"""Partially observed data: masked bounds against the marginal model, imputation against the exact conditional."""

import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import elbojax as ej
from elbojax import exact, missing, models, train
from helpers import KLOfXOnly, assert_within_se, keys

SE_LIMIT = 4.0  # Monte Carlo claims: within 4 standard errors, fixed keys
MASK = np.array([True, False, True, True, False, True, False])  # 3 of 7 entries missing


@jax.jit
def _linear_gaussian(seed):
    """A float64 linear Gaussian (D = 7, d = 2) and one point from it, in one compiled call."""
    model = exact.LinearGaussian.random(jax.random.key(seed), data_dim=7, latent_dim=2, dtype=jnp.float64)
    return model, model.sample(jax.random.key(seed + 1), 1)[0][0]


@functools.lru_cache(maxsize=None)
def _vae(likelihood="bernoulli", missing_aware=False):
    """A small VAE, D = 12, d = 3, one hidden layer of 8 (built once, under jit: eager NNX set-up is slow)."""

    def build():
        rngs = nnx.Rngs(0)
        encoder_cls = missing.MissingAwareEncoder if missing_aware else models.GaussianMLPEncoder
        decoder_cls = models.BernoulliMLPDecoder if likelihood == "bernoulli" else models.GaussianMLPDecoder
        return models.VAE(encoder_cls(12, 3, (8,), rngs=rngs), decoder_cls(3, 12, (8,), rngs=rngs), models.StandardNormalPrior(3))

    return nnx.jit(build)()


# ------------------------------------------------------------------------------------------------
# Nothing missing: exactly the unmasked model.
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
def test_nothing_missing_is_the_unmasked_model_to_the_bit(likelihood):
    vae = _vae(likelihood)
    x = (jax.random.uniform(jax.random.key(0), (12,)) > 0.5).astype(jnp.float32)
    full = jnp.ones(12, bool)
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, key):
        vae = nnx.merge(graphdef, state)
        z = vae.proposal(x).sample(seed=key)
        joints = (missing.masked_log_joint(vae, full)(x, z), vae.log_joint(x, z))
        if likelihood == "gaussian":  # the bounds only reduce the log joint: once is enough
            return (joints,)
        elbos = (
            missing.masked_elbo(key, x, full, vae, num_samples=4),
            ej.elbo(key, x, vae.log_joint, vae.proposal(x), num_samples=4),
        )
        iwaes = (
            missing.masked_iwae_bound(key, x, full, vae, num_samples=4),
            ej.iwae_bound(key, x, vae.log_joint, vae.proposal(x), num_samples=4),
        )
        return joints, elbos, iwaes

    for masked, unmasked in run(state, jax.random.key(1)):
        assert masked == unmasked, (masked, unmasked)


def test_a_missing_entry_with_an_extreme_scale_leaks_nothing_into_the_gradient():
    """float32, log_scale = -95 at the missing entry: exp(95) overflows there, which must not reach
    the value or the gradient (0 * inf = NaN through the mask)."""
    x, mean = jnp.array([0.5, 0.25]), jnp.array([0.5, 0.0])
    log_scale, observed = jnp.array([0.0, -95.0]), jnp.array([True, False])
    value, (grad_mean, grad_log_scale) = jax.value_and_grad(missing.masked_gaussian_log_likelihood, argnums=(1, 2))(x, mean, log_scale, observed)
    np.testing.assert_allclose(value, -0.5 * np.log(2 * np.pi), rtol=1e-6)
    assert grad_mean.tolist() == [0.0, 0.0] and grad_log_scale.tolist() == [-1.0, 0.0]


def test_nothing_missing_on_the_linear_gaussian_and_the_two_layer_vae_to_the_bit(x64):
    model, x = _linear_gaussian(0)
    two_layer = nnx.jit(lambda: models.TwoLayerVAE(12, (4, 2), hidden_q=((6,), (4,)), hidden_p=((4,), (6,)), rngs=nnx.Rngs(0)))()
    graphdef, state = nnx.split(two_layer)
    binary = (jnp.arange(12) % 3 == 0).astype(jnp.float32)

    @jax.jit
    def run(state):
        z = jnp.array([0.3, -1.2])
        two_layer = nnx.merge(graphdef, state)
        sample = two_layer.proposal(binary).sample(seed=jax.random.key(0))
        return (
            (missing.masked_log_joint(model, jnp.ones(7, bool))(x, z), model.log_joint(x, z)),
            (missing.masked_log_joint(two_layer, jnp.ones(12, bool))(binary, sample), two_layer.log_joint(binary, sample)),
        )

    for masked, unmasked in run(state):
        assert masked == unmasked, (masked, unmasked)


# ------------------------------------------------------------------------------------------------
# Entries missing: the bounds of the marginal model of the observed entries.
# ------------------------------------------------------------------------------------------------


def test_masked_bounds_equal_the_marginal_models_bounds_on_the_linear_gaussian(x64):
    """The marginal of a factor analyser over the observed rows is the factor analyser of those rows.

    Same key and proposal, hence the same samples: the masked ELBO and IWAE bound equal the
    marginal model's to float rounding. At the marginal model's exact posterior every log-weight
    is log p(x_obs), so the masked IWAE bound equals the exact log p(x_obs) for every key; and the
    masked ELBO's Monte Carlo mean matches the closed-form ELBO of the marginal model.
    """
    model, x = _linear_gaussian(2)
    mean, scale = np.array([0.4, -0.3]), np.array([0.7, 1.2])

    def run(key):
        marginal = missing.marginal_linear_gaussian(model, MASK)
        x_obs = x[MASK]
        x_with_nan = jnp.where(MASK, x, jnp.nan)  # the missing values are never read
        q = distrax.MultivariateNormalDiag(mean, scale)
        masked_joint = missing.masked_log_joint(model, MASK)
        return (
            missing.masked_elbo(key, x_with_nan, MASK, model, num_samples=8, proposal=q),
            ej.elbo(key, x_obs, marginal.log_joint, q, num_samples=8),
            missing.masked_iwae_bound(key, x_with_nan, MASK, model, num_samples=8, proposal=q),
            ej.iwae_bound(key, x_obs, marginal.log_joint, q, num_samples=8),
            ej.iwae_bound(key, x, masked_joint, marginal.posterior(x_obs), num_samples=8),
            marginal.log_marginal(x_obs),
            marginal.elbo_diag_gaussian(x_obs, mean, scale),
        )

    masked_elbo, marginal_elbo, masked_iwae, marginal_iwae, at_posterior, log_p_obs, closed_form = jax.jit(jax.vmap(run))(keys(3, 2000))
    np.testing.assert_allclose(masked_elbo, marginal_elbo, rtol=1e-13)
    np.testing.assert_allclose(masked_iwae, marginal_iwae, rtol=1e-13)
    np.testing.assert_allclose(at_posterior, log_p_obs, rtol=1e-12)
    assert_within_se(masked_elbo, closed_form[0], "masked ELBO", limit=SE_LIMIT)
    assert np.all(np.asarray(masked_elbo).mean() < log_p_obs[0])


def test_missing_values_reach_neither_the_bound_nor_its_gradient():
    """NaN at the missing entries: the value is that of any other filling, and the gradient is finite."""
    vae = _vae("gaussian")
    x = jax.random.normal(jax.random.key(0), (12,))
    mask = jnp.arange(12) % 4 != 0
    graphdef, state = nnx.split(vae, nnx.Param)

    def bound(state, x):
        return missing.masked_iwae_bound(jax.random.key(1), x, mask, nnx.merge(graphdef, state), num_samples=3)

    filled = jnp.stack([jnp.where(mask, x, jnp.nan), jnp.where(mask, x, 123.0)])
    values, grads = jax.jit(jax.vmap(jax.value_and_grad(bound), in_axes=(None, 0)))(state, filled)
    assert values[0] == values[1]
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


# ------------------------------------------------------------------------------------------------
# Imputation.
# ------------------------------------------------------------------------------------------------


def test_exact_conditional_agrees_with_the_precision_form(x64):
    model, x = _linear_gaussian(4)
    mean, cov = jax.jit(lambda model, x: missing.linear_gaussian_conditional(model, x, MASK))(model, x)
    weight, bias, noise, x = (np.asarray(a) for a in (model.weight, model.bias, model.noise_variance, x))
    precision = np.linalg.inv(weight @ weight.T + np.diag(noise))
    mis, obs = np.flatnonzero(~MASK), np.flatnonzero(MASK)
    cov_precision = np.linalg.inv(precision[np.ix_(mis, mis)])
    mean_precision = bias[mis] - cov_precision @ precision[np.ix_(mis, obs)] @ (x[obs] - bias[obs])
    np.testing.assert_allclose(cov, cov_precision, rtol=1e-10)
    np.testing.assert_allclose(mean, mean_precision, rtol=1e-10)


def test_imputations_follow_the_exact_conditional_in_mean_and_covariance(x64):
    """3000 independent importance-resampling runs (K = 1000 each, one imputation per run).

    The proposal is the marginal model's posterior, shifted by half a standard deviation and
    widened by 1.5, so the weights matter. The imputations' mean and their centred products
    (x_i - mu_i)(x_j - mu_j) must lie within 4 standard errors of the exact conditional mean and
    covariance. At K = 1000 the resampling bias (O(1/K)) is far below these errors.
    """
    model, x = _linear_gaussian(5)

    @jax.jit
    def run(key_array):
        marginal = missing.marginal_linear_gaussian(model, MASK)
        sd = jnp.sqrt(jnp.diag(marginal.posterior_covariance))
        q = distrax.MultivariateNormalDiag(marginal.posterior_mean(x[MASK]) + 0.5 * sd, 1.5 * sd)
        impute = lambda k: missing.impute(k, x, MASK, model, num_samples=1000, proposal=q)
        return jax.vmap(impute)(key_array), missing.linear_gaussian_conditional(model, x, MASK)

    result, (exact_mean, exact_cov) = run(keys(6, 3000))
    draws = np.asarray(result.samples[:, 0, ~MASK])  # (3000, 3)
    np.testing.assert_array_equal(result.samples[:, 0, MASK], np.broadcast_to(x[MASK], (3000, MASK.sum())))
    assert_within_se(draws, exact_mean, "imputed mean", limit=SE_LIMIT)
    centred = draws - np.asarray(exact_mean)
    products = (centred[:, :, None] * centred[:, None, :]).reshape(3000, -1)
    assert_within_se(products, np.asarray(exact_cov).reshape(-1), "imputed covariance", limit=SE_LIMIT)
    assert 100 < float(np.median(result.effective_sample_size)) < 1000
    # Each run's self-normalised mean, with its own standard error.
    z_scores = (np.asarray(result.mean[:, ~MASK]) - np.asarray(exact_mean)) / np.asarray(result.mean_standard_error[:, ~MASK])
    assert_within_se(z_scores, np.zeros(3), "SNIS imputation z-scores", limit=SE_LIMIT)


def test_imputation_bias_shrinks_with_the_number_of_proposals(x64):
    """With the prior as proposal, the self-normalised estimate of E[x_mis | x_obs] is biased at small K.

    4000 independent estimates at each K: at K = 2 the bias is many standard errors from 0; at
    K = 128 it is at least 8 times smaller (the theory says O(1/K): 64 times).
    """
    model, x = _linear_gaussian(7)

    def biases(num_samples):
        @jax.jit
        def run(key_array):
            prior = distrax.MultivariateNormalDiag(jnp.zeros(2, jnp.float64), jnp.ones(2, jnp.float64))
            estimates = jax.vmap(lambda k: missing.impute(k, x, MASK, model, num_samples=num_samples, proposal=prior).mean)(key_array)
            return estimates[:, ~MASK] - missing.linear_gaussian_conditional(model, x, MASK)[0]

        estimates = np.asarray(run(keys(num_samples, 4000)))
        return estimates.mean(0), estimates.std(0, ddof=1) / np.sqrt(estimates.shape[0])

    bias_2, se_2 = biases(2)
    bias_128, _ = biases(128)
    worst = np.argmax(np.abs(bias_2) / se_2)
    assert np.abs(bias_2[worst]) > 8 * se_2[worst], (bias_2, se_2)
    assert np.linalg.norm(bias_128) < np.linalg.norm(bias_2) / 8, (bias_2, bias_128)


def test_imputation_with_a_vae_keeps_the_observed_entries_and_draws_bits():
    vae = _vae("bernoulli")
    x = (jnp.arange(12) % 2).astype(jnp.float32)
    mask = jnp.arange(12) >= 6
    result = jax.jit(lambda k: missing.impute(k, jnp.where(mask, x, jnp.nan), mask, vae, num_samples=20, num_imputations=5))(jax.random.key(0))
    assert result.samples.shape == (5, 12) and result.means.shape == (5, 12) and result.mean.shape == (12,)
    np.testing.assert_array_equal(result.samples[:, 6:], np.broadcast_to(x[6:], (5, 6)))
    assert set(np.unique(result.samples[:, :6])) <= {0.0, 1.0}
    assert np.all((result.means[:, :6] > 0) & (result.means[:, :6] < 1))
    assert 1.0 <= float(result.effective_sample_size) <= 20.0


# ------------------------------------------------------------------------------------------------
# Training on NaN-marked data.
# ------------------------------------------------------------------------------------------------


def test_objective_on_nan_marked_batches_is_the_mean_masked_bound_and_trains():
    vae = _vae("bernoulli")
    batch = (jax.random.uniform(jax.random.key(0), (6, 12)) > 0.5).astype(jnp.float32)
    mask = jax.random.uniform(jax.random.key(1), (6, 12)) > 0.3
    marked = missing.mark_missing(np.asarray(batch), np.asarray(mask))
    assert np.isnan(marked).sum() == (~np.asarray(mask)).sum()
    objective_fn = missing.objective("iwae", num_samples=3)
    assert objective_fn.accepts_missing
    graphdef, state = train.init(vae, optimizer := optax.adam(1e-2))
    batch_keys = keys(2, 6)

    @jax.jit
    def values(params):
        model = nnx.merge(graphdef, params)
        per_point = jax.vmap(lambda k, x, m: missing.masked_iwae_bound(k, x, m, model, num_samples=3))(batch_keys, batch, mask)
        return (
            objective_fn(batch_keys, model, jnp.asarray(marked), 0).objective,
            per_point.mean(),
            objective_fn(batch_keys, model, batch, 0).objective,
            train.objective("iwae", num_samples=3)(batch_keys, model, batch, 0).objective,
            missing.objective("elbo", kl="analytic")(batch_keys, model, jnp.asarray(marked), 0),
        )

    masked, by_hand, complete, unmasked, analytic = values(state.params)
    np.testing.assert_allclose(masked, by_hand, rtol=1e-6)
    assert complete == unmasked  # nothing missing: train.objective exactly
    step = jax.jit(train.make_step(graphdef, optimizer, objective_fn, seed=0))
    new_state, info = step(state, jnp.asarray(marked), jnp.arange(6))
    assert bool(info.finite) and np.isfinite(float(info.objective)) and np.isfinite(float(info.kl))
    assert not np.allclose(jax.tree.leaves(new_state.params)[0], jax.tree.leaves(state.params)[0])
    assert np.isfinite(float(analytic.objective)) and float(analytic.kl) > 0


def test_a_nan_at_an_observed_entry_is_nan_not_an_observed_zero():
    """A wrong mask (NaN marked observed) must not pass unseen: NaN, as `bernoulli_log_likelihood` gives.
    A NaN at a missing entry is what the mask is for: it contributes nothing."""
    x, logits = jnp.array([1.0, jnp.nan, 0.0]), jnp.array([0.3, -0.4, 1.2])
    assert np.isnan(missing.masked_bernoulli_log_likelihood(x, logits, jnp.ones(3, bool)))
    assert np.isnan(models.bernoulli_log_likelihood(x, logits))
    observed = jnp.array([True, False, True])
    value, grad = jax.value_and_grad(missing.masked_bernoulli_log_likelihood, argnums=1)(x, logits, observed)
    expected = models.bernoulli_log_likelihood(x[::2], logits[::2])
    assert value == expected and np.isfinite(grad).all() and grad[1] == 0.0


def test_a_missing_aware_encoder_reads_the_mask_inside_a_flow_encoder_and_a_conditional_vae():
    """`FlowEncoder(MissingAwareEncoder)` and `ConditionalVAE(MissingAwareEncoder).given(y)` pass
    the NaN-marked `x` on to the encoder, which reads the mask; they are not fed zeros."""
    from elbojax import flows

    data_dim, latent_dim, num_classes = 6, 2, 3
    x = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    mask = jnp.array([True, False, True, True, False, True])
    marked = jnp.where(mask, x, jnp.nan)

    def build():
        rngs = nnx.Rngs(0)
        aware = missing.MissingAwareEncoder(data_dim, latent_dim, (8,), rngs=rngs)
        decoder = models.BernoulliMLPDecoder(latent_dim, data_dim, (8,), rngs=rngs)
        flow = models.VAE(flows.FlowEncoder(aware, num_layers=2, hidden=(4,), rngs=rngs), decoder, models.StandardNormalPrior(latent_dim))
        conditional = models.ConditionalVAE(
            missing.MissingAwareEncoder(data_dim + num_classes, latent_dim, (8,), rngs=rngs),
            models.BernoulliMLPDecoder(latent_dim + num_classes, data_dim, (8,), rngs=rngs),
            models.StandardNormalPrior(latent_dim), num_classes=num_classes,
        )
        return flow, conditional

    flow, conditional = nnx.jit(build)()
    view = conditional.given(1)
    for model in (flow, view):
        assert missing.factorized(model).reads_missing
    # The flow starts as the identity (zero last layers), so its base is the whole proposal.
    base = missing.masked_proposal(flow, x, mask).distribution
    np.testing.assert_array_equal(base.mean(), flow.encoder.base(marked).mean())
    assert not np.allclose(base.mean(), flow.encoder.base(jnp.where(mask, x, 0.0)).mean())
    np.testing.assert_array_equal(missing.masked_proposal(view, x, mask).mean(), view.proposal(marked).mean())
    assert np.isfinite(missing.masked_elbo(jax.random.key(0), x, mask, flow, num_samples=3))
    # The conditional model itself needs its label (the errors were about z's shape, or a missing `y`).
    for use in (lambda: missing.masked_log_joint(conditional, mask),
                lambda: missing.masked_elbo(jax.random.key(0), x, mask, conditional, num_samples=2)):
        with pytest.raises(TypeError, match=r"need one label for a ConditionalVAE: pass `model.given\(y\)`"):
            use()


def test_missing_aware_encoder_reads_the_mask_from_nan():
    graphdef, state = nnx.split(_vae("bernoulli", missing_aware=True))
    x = jnp.linspace(0.0, 1.0, 12)
    mask = jnp.arange(12) < 9

    @jax.jit
    def run(state):
        vae = nnx.merge(graphdef, state)
        inner = vae.encoder.inner.loc_and_scale
        proposal = missing.masked_proposal(vae, x, mask)
        return (
            (proposal.loc, proposal.scale_diag),
            inner(jnp.concatenate([jnp.where(mask, x, 0.0), mask.astype(jnp.float32)])),
            vae.encoder.loc_and_scale(x),  # no NaN: the mask of all ones
            inner(jnp.concatenate([x, jnp.ones(12)])),
        )

    masked, by_hand, complete, complete_by_hand = run(state)
    np.testing.assert_array_equal(masked[0], by_hand[0])
    np.testing.assert_array_equal(masked[1], by_hand[1])
    np.testing.assert_array_equal(complete[0], complete_by_hand[0])
    assert missing.factorized(_vae("bernoulli", missing_aware=True)).reads_missing


def test_hidden_region_mask():
    top = missing.hidden_region_mask("top")
    assert top.shape == (784,) and top.dtype == bool
    assert not top[: 14 * 28].any() and top[14 * 28 :].all()
    left = missing.hidden_region_mask("left", (4, 6)).reshape(4, 6)
    assert not left[:, :3].any() and left[:, 3:].all()
    with pytest.raises(ValueError, match=r"`region` must be one of 'top', 'bottom', 'left', 'right'; got 'middle'"):
        missing.hidden_region_mask("middle")
    # An odd height: the middle row is the bottom half's; a height of 1 has no halves (top hid nothing).
    np.testing.assert_array_equal(missing.hidden_region_mask("bottom", (3, 1)), [True, False, False])
    with pytest.raises(ValueError, match=r"Hiding the top half needs a height of 2 or more, got shape \(1, 4\)"):
        missing.hidden_region_mask("top", (1, 4))
    assert missing.hidden_region_mask("left", (1, 4)).tolist() == [False, False, True, True]


# ------------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------------


def test_masks_of_the_wrong_type_or_shape_fail_at_trace_time():
    vae = _vae("bernoulli")
    x = jnp.zeros(12)
    key = jax.random.key(0)
    bound = jax.jit(lambda x, mask: missing.masked_iwae_bound(key, x, mask, vae, num_samples=2))
    with pytest.raises(TypeError, match=r"`mask` must be a bool array \(True = observed, False = missing\), got dtype float32"):
        bound(x, jnp.ones(12))
    with pytest.raises(TypeError, match=r"`mask` must be a bool array .* got dtype int32"):
        missing.masked_log_joint(vae, jnp.ones(12, jnp.int32))
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `x`, \(12,\) \(ONE data point; batch with jax.vmap\), got \(13,\)"):
        bound(x, jnp.ones(13, bool))
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `x`, \(12,\).*got \(4, 12\)"):
        bound(x, jnp.ones((4, 12), bool))
    with pytest.raises(ValueError, match=r"`mask` must have the shape of `x`"):
        missing.impute(key, x, jnp.ones(11, bool), vae, num_samples=3)
    with pytest.raises(TypeError, match=r"`mask` must be a bool array"):
        missing.mark_missing(np.zeros(3), np.ones(3))
    # One point's mask marks every row of a batch (the `missing.objective` docstring's use; was refused).
    batch, row_mask = np.arange(8.0).reshape(2, 4), np.array([True, False, True, True])
    for to in (np.asarray, jnp.asarray):
        np.testing.assert_array_equal(missing.mark_missing(to(batch), to(row_mask)), np.where(row_mask, batch, np.nan))
    with pytest.raises(ValueError, match=r"shape of `x`, \(2, 4\) \(or of one row of a batch `x`\), got \(3,\)"):
        missing.mark_missing(batch, np.ones(3, bool))
    with pytest.raises(ValueError, match=r"got \(\)"):  # a scalar mask is not one point's
        missing.mark_missing(np.ones(4), np.array(False))
    images = np.ones((2, 3, 4))  # a (4,) mask is neither x's shape nor one image's (3, 4): it was broadcast
    for to in (np.asarray, jnp.asarray):
        with pytest.raises(ValueError, match=r"got \(4,\)"):
            missing.mark_missing(to(images), to(np.array([True, False, True, False])))
    with pytest.raises(TypeError, match=r"`mask` must be a bool array"):
        missing.masked_bernoulli_log_likelihood(x, x, [1, 0] * 6)


def test_other_argument_errors():
    with pytest.raises(TypeError, match=r"likelihood factorises over the entries of x.*GaussianMixture"):
        missing.masked_log_joint(exact.GaussianMixture.random(jax.random.key(0), num_components=2, dim=3), jnp.ones(3, bool))
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=3, latent_dim=1)
    with pytest.raises(TypeError, match=r"LinearGaussian has no encoder \(`proposal`\): pass `proposal=`"):
        missing.impute(jax.random.key(0), jnp.zeros(3), jnp.ones(3, bool), model, num_samples=3)
    with pytest.raises(TypeError, match=r"LinearGaussian has no encoder"):
        missing.masked_elbo(jax.random.key(0), jnp.zeros(3), jnp.ones(3, bool), model)
    with pytest.raises(ValueError, match=r"`x` must have shape \(3,\), got \(4,\)"):
        missing.masked_log_joint(model, jnp.ones(3, bool))(jnp.zeros(4), jnp.zeros(1))
    with pytest.raises(ValueError, match=r"hides no entry"):
        missing.linear_gaussian_conditional(model, jnp.zeros(3), np.ones(3, bool))
    with pytest.raises(TypeError, match=r"needs a concrete mask"):
        jax.jit(lambda m: missing.marginal_linear_gaussian(model, m))(jnp.ones(3, bool))


class _KLOfXOnly(KLOfXOnly, nnx.Module):
    pass


def test_a_complete_batch_trains_as_train_objective_does_for_a_model_with_analytic_kl_of_x():
    """`NaNMasked` passed `per_dimension=` to every `analytic_kl`, and refused kl='analytic' for a
    model without `kl_mode`; a NumPy `data_dim` was "a model elbojax does not know"."""
    model = _KLOfXOnly(_vae("bernoulli"), has_analytic_kl=False)  # `analytic_kl` alone is enough
    batch = (jax.random.uniform(jax.random.key(3), (4, 12)) > 0.5).astype(jnp.float32)
    keys_ = jax.random.split(jax.random.key(0), 4)
    for kl in ("auto", "analytic", "monte_carlo"):
        ours = missing.objective("elbo", kl=kl, num_samples=2)(keys_, model, batch, jnp.asarray(0))
        theirs = train.objective("elbo", kl=kl, num_samples=2)(keys_, model, batch, jnp.asarray(0))
        np.testing.assert_allclose(ours.objective, theirs.objective, rtol=1e-6)
        np.testing.assert_allclose(ours.kl, theirs.kl, rtol=1e-6)


def test_completions_picture(tmp_path):
    from elbojax import plots

    truth = np.random.default_rng(0).random((2, 784))
    mask = missing.hidden_region_mask("top")
    completed = np.random.default_rng(1).random((2, 3, 784))
    path = plots.completions(truth, mask, completed, effective_sample_size=np.array([3.5, 12.0]), path=tmp_path / "c.png")
    assert path.exists() and path.stat().st_size > 1000
    figure = plots.completions(truth, mask, completed)
    assert len(figure.axes) == 2 * (2 + 3)
    with pytest.raises(ValueError, match=r"`truth` must be \(n, D\) and `completed` \(n, M, D\)"):
        plots.completions(truth, mask, completed[0])


def test_fit_trains_on_images_with_missing_entries(tmp_path):
    """`fit(observed=...)`: dynamically binarized digits with missing pixels, through missing.objective."""
    from elbojax import data

    rngs = nnx.Rngs(0)
    vae = models.VAE(models.GaussianMLPEncoder(784, 2, (16,), rngs=rngs), models.BernoulliMLPDecoder(2, 784, (16,), rngs=rngs),
                     models.StandardNormalPrior(2))
    images = data.load_embedded_mnist().train.images[:200].reshape(200, 784)
    observed = np.random.default_rng(0).random((200, 784)) < 0.6
    optimizer = optax.adam(1e-2)
    graphdef, state = train.init(vae, optimizer)
    config = train.FitConfig(batch_size=20, num_steps=20, steps_per_call=10, checkpoint_every=10)
    state = train.fit(graphdef, state, optimizer, missing.objective("elbo"), images, run_dir=tmp_path / "r", config=config,
                      progress=False, observed=observed)
    assert int(state.step) == 20 and int(state.num_skipped) == 0
    with pytest.raises(ValueError, match=r"this objective cannot take"):
        train.fit(graphdef, state, optimizer, train.objective("elbo"), images, run_dir=tmp_path / "s", config=config, progress=False, observed=observed)
    with pytest.raises(ValueError, match=r"`observed` must be bool of shape \(200, 784\)"):
        train.fit(graphdef, state, optimizer, missing.objective("elbo"), images, run_dir=tmp_path / "t", config=config, progress=False, observed=observed[:5])
    # One example's mask (the README's `observed=mask`) is every example's (it was refused).
    _, fresh = train.init(vae, optimizer)
    one = missing.hidden_region_mask("top")
    runs = [
        train.fit(graphdef, fresh, optimizer, missing.objective("elbo"), images, run_dir=tmp_path / name, config=config._replace(num_steps=10),
                  progress=False, observed=mask)
        for name, mask in (("one", one), ("every", np.broadcast_to(one, images.shape)))
    ]
    for a, b in zip(jax.tree.leaves(runs[0].params), jax.tree.leaves(runs[1].params)):
        np.testing.assert_array_equal(a, b)
