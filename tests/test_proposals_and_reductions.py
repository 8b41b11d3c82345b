"""The proposal adapters (TFP, FiniteUniform) and the stable reductions."""

import decimal
import re

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from tensorflow_probability.substrates import jax as tfp

import elbojax as ej
from elbojax import exact
from elbojax.reductions import combine, combine_expm1, summarize, summarize_expm1, summary_logmeanexp, summary_logsumexp

tfd = tfp.distributions


def test_tfp_distribution_is_accepted_through_the_adapter():
    model = exact.GaussianToy.random(jax.random.key(0), dim=5)
    x = model.sample(jax.random.key(1), 1)[0][0]
    post = tfd.MultivariateNormalDiag((x + model.mean) / 2, jnp.full(5, np.sqrt(0.5)))
    assert isinstance(ej.as_proposal(post), ej.TFPProposal)
    value = jax.jit(lambda k: ej.iwae_bound(k, x, model.log_joint, post, num_samples=6, chunk_size=4))(jax.random.key(2))
    np.testing.assert_allclose(value, model.log_marginal(x), rtol=1e-5)
    # The closed-form KL and entropy go through the adapter and agree with distrax's.
    prior = tfd.MultivariateNormalDiag(model.mean, jnp.ones(5))
    adapted = ej.as_proposal(post)
    np.testing.assert_allclose(adapted.kl_divergence(prior), model.posterior(x).kl_divergence(model.prior), rtol=1e-5)
    np.testing.assert_allclose(adapted.entropy(), model.posterior(x).entropy(), rtol=1e-6)
    for value in (
        ej.elbo_analytic_kl(jax.random.key(3), x, model.log_likelihood, post, prior, num_samples=3),
        ej.elbo_entropy(jax.random.key(3), x, model.log_joint, post, num_samples=3),
    ):
        assert value.shape == () and np.isfinite(value)


def test_distrax_passes_through_unchanged():
    q = distrax.Normal(0.0, 1.0)
    assert ej.as_proposal(q) is q


def test_finite_uniform():
    support = jnp.array([[0.0, 1.0], [2.0, 3.0], [4.0, 5.0]])
    u = ej.FiniteUniform(support)
    z, log_q = u.sample_and_log_prob(seed=jax.random.key(0), sample_shape=(2000,))
    assert z.shape == (2000, 2) and log_q.shape == (2000,)
    np.testing.assert_allclose(log_q, -np.log(3), rtol=1e-6)
    counts = np.bincount(np.asarray(z[:, 0] // 2).astype(int), minlength=3)
    assert counts.min() > 600  # roughly uniform over the three points
    np.testing.assert_allclose(u.log_prob(support), -np.log(3), rtol=1e-6)
    np.testing.assert_allclose(u.entropy(), np.log(3), rtol=1e-6)
    with pytest.raises(ValueError, match=r"`support` must have shape \(S, \*event_shape\) with S >= 1, got \(0,\)"):
        ej.FiniteUniform(jnp.zeros((0,)))


def test_logmeanexp_matches_numpy_and_is_stable():
    a = np.array([[1.0, 2.0, 3.0], [-1000.0, -1001.0, -1002.0]])
    expected = np.log(np.mean(np.exp(a - a.max(1, keepdims=True)), 1)) + a.max(1)
    np.testing.assert_allclose(ej.logmeanexp(jnp.asarray(a), axis=1), expected, rtol=1e-6)
    np.testing.assert_allclose(ej.logmeanexp(jnp.asarray(a[0])), np.log(np.mean(np.exp(a[0]))), rtol=1e-6)
    assert ej.logmeanexp(jnp.full(4, -jnp.inf)) == -jnp.inf
    assert ej.logmeanexp(jnp.ones((2, 3)), axis=(0, 1), keepdims=True).shape == (1, 1)
    np.testing.assert_allclose(ej.logmeanexp(jnp.asarray(a), axis=np.int64(-1)), expected, rtol=1e-6)  # numpy ints too
    with pytest.raises(ValueError, match=r"`axis` 5 is out of range for an array of shape \(2, 3\)"):
        ej.logmeanexp(jnp.asarray(a), axis=5)
    with pytest.raises(TypeError, match=r"`axis` must be None, an int or a tuple of ints, got 1.0"):
        ej.logmeanexp(jnp.asarray(a), axis=1.0)


def test_effective_sample_size():
    np.testing.assert_allclose(ej.effective_sample_size(jnp.zeros(10)), 10.0, rtol=1e-6)
    np.testing.assert_allclose(ej.effective_sample_size(jnp.array([0.0, -jnp.inf, -jnp.inf])), 1.0, rtol=1e-6)
    w = np.array([1.0, 2.0, 3.0, 4.0])
    np.testing.assert_allclose(ej.effective_sample_size(jnp.log(w) + 500.0), w.sum() ** 2 / (w**2).sum(), rtol=1e-5)
    batched = ej.effective_sample_size(jnp.zeros((3, 7)))
    np.testing.assert_allclose(batched, 7.0 * np.ones(3), rtol=1e-6)


@pytest.mark.parametrize(
    "values",
    [
        [0.5, -2.0, 3.0, 1.0, -0.5, 2.5],
        [-jnp.inf, -jnp.inf, 1.0, -jnp.inf, -jnp.inf, 0.0],
        [-1e4, -1e4 - 1, -1e4 - 2, -1e4 + 3, -1e4, -1e4],
        [-jnp.inf] * 6,
    ],
)
def test_running_summary_equals_one_shot_logsumexp(values):
    a = jnp.asarray(values, jnp.float32)
    running = summarize(a[:2])
    for start in (2, 4):
        running = combine(running, summarize(a[start : start + 2]))
    np.testing.assert_allclose(summary_logsumexp(running), jax.nn.logsumexp(a), rtol=1e-6)
    np.testing.assert_allclose(running.total, jnp.sum(a), rtol=1e-6)


def test_a_nan_log_weight_makes_the_log_sum_exp_nan_also_when_max_skips_it():
    """XLA's CPU max over >= 4096 entries skips NaN; the NaN still reaches the sum."""
    for num in (10, 5000):
        for fill in (0.0, -jnp.inf):
            a = jnp.full(num, fill).at[7].set(jnp.nan)
            assert np.isnan(summary_logsumexp(jax.jit(summarize)(a))), (num, fill)
            assert np.isnan(summary_logmeanexp(jax.jit(summarize_expm1)(a))), (num, fill)


@pytest.mark.parametrize(
    "values",
    [
        [0.5, -2.0, 3.0, 1.0, -0.5, 2.5],
        [-jnp.inf, -jnp.inf, 1.0, -jnp.inf, -jnp.inf, 0.0],
        [1e-7, 2e-7, -1e-7, 3e-7, 0.0, 1.5e-7],
        [-jnp.inf, -jnp.inf, 1e-8, 2e-8, 3e-8, -1e-8],
        [-1e4, -1e4 - 1, -1e4 - 2, -1e4 + 3, -1e4, -1e4],
        [-jnp.inf] * 6,
    ],
)
def test_expm1_summary_log_mean_exp_is_precise_and_combines(x64, values):
    """Against 50-digit decimal arithmetic on the same inputs; the result keeps its relative precision
    even when it is tiny next to log K (the plain log-sum-exp minus log K rounds to 0 there)."""
    with decimal.localcontext() as context:
        context.prec = 50
        v = np.asarray(values, np.float64)
        total = sum((decimal.Decimal(float(x)).exp() for x in v if np.isfinite(x)), decimal.Decimal(0))
        expected = float((total / len(v)).ln()) if total > 0 else -np.inf
    for dtype, rtol in ((jnp.float64, 1e-13), (jnp.float32, 1e-5)):
        a = jnp.asarray(values, dtype)
        running = summarize_expm1(a[:2])
        for start in (2, 4):
            running = combine_expm1(running, summarize_expm1(a[start : start + 2]))
        for summary in (summarize_expm1(a), running):
            got = summary_logmeanexp(summary)
            assert got.dtype == dtype
            if np.isneginf(expected):
                assert got == -np.inf
            else:
                np.testing.assert_allclose(got, expected, rtol=rtol, atol=0, err_msg=str(dtype))


def test_effective_sample_size_checks_its_axis():
    from elbojax import reductions

    with pytest.raises(ValueError, match=r"`log_weights` must have .*got shape \(\)"):
        jax.jit(reductions.effective_sample_size)(jnp.array(1.0))
    with pytest.raises(ValueError, match=r"`axis` 2 is out of range for `log_weights` of shape \(3, 4\)"):
        reductions.effective_sample_size(jnp.zeros((3, 4)), axis=2)
    with pytest.raises(TypeError, match=r"`axis` must be an int"):
        reductions.effective_sample_size(jnp.zeros((3, 4)), axis=0.5)
    np.testing.assert_allclose(reductions.effective_sample_size(jnp.zeros((3, 4)), axis=0), np.full(4, 3.0), rtol=1e-6)
    np.testing.assert_allclose(reductions.effective_sample_size(jnp.zeros((3, 4)), axis=-2), np.full(4, 3.0), rtol=1e-6)


def test_every_elbo_form_keeps_a_float32_proposal_float32_under_x64(x64):
    """distrax's Gaussian entropy is float64 under x64 whatever its parameters' dtype, so
    `elbo_entropy` of a float32 proposal came back float64 while `elbo` stayed float32."""
    log_joint = lambda x, z: -0.5 * jnp.sum(z**2)
    for q in (
        ej.proposals.MultivariateNormalDiag(jnp.zeros(2, jnp.float32), jnp.ones(2, jnp.float32)),
        distrax.MultivariateNormalDiag(jnp.zeros(2, jnp.float32), jnp.ones(2, jnp.float32)),
    ):
        for estimator in (ej.elbo, ej.elbo_entropy):
            assert estimator(jax.random.key(0), None, log_joint, q, num_samples=2).dtype == jnp.float32


def test_the_ess_of_infinite_log_weights_counts_them():
    """+inf - +inf made every weight NaN; the +inf weights dominate: the ESS is how many there are."""
    ess = ej.reductions.effective_sample_size
    assert float(ess(jnp.array([0.0, jnp.inf, 1.0]))) == 1.0
    assert float(ess(jnp.array([jnp.inf, -jnp.inf, jnp.inf, 2.0]))) == 2.0
    np.testing.assert_array_equal(ej.snis.normalized_weights(jnp.array([jnp.inf, 0.0, jnp.inf])), [0.5, 0.0, 0.5])


def test_finite_uniform_log_prob_checks_the_event_shape():
    q = ej.proposals.FiniteUniform(jnp.zeros((5, 2, 3)))
    assert q.log_prob(jnp.zeros((7, 2, 3))).shape == (7,)
    for shape in [(3,), (7, 3), (2, 2)]:
        with pytest.raises(ValueError, match=rf"`value` must end in the support's event shape \(2, 3\) .* got shape {re.escape(str(shape))}"):
            q.log_prob(jnp.zeros(shape))
    z, log_q = q.sample_and_log_prob(seed=jax.random.key(0), sample_shape=np.int64(3))
    assert z.shape == (3, 2, 3) and log_q.shape == (3,)


def test_the_models_proposals_take_a_numpy_or_jax_int_sample_shape():
    """As distrax does; `tuple(np.int64(3))` raised a TypeError."""
    x = jnp.ones(10)
    encoder = ej.models.GaussianMLPEncoder(10, 3, (8,), rngs=nnx.Rngs(0))
    two_layer = ej.models.TwoLayerVAE(10, (4, 3), hidden_q=((8,), (8,)), hidden_p=((8,), (8,)), rngs=nnx.Rngs(0))
    for q in (encoder(x), two_layer.proposal(x)):
        expected = q.sample_and_log_prob(seed=jax.random.key(1), sample_shape=3)
        for sample_shape in (np.int64(3), jnp.asarray(3), (np.int64(3),)):
            got = q.sample_and_log_prob(seed=jax.random.key(1), sample_shape=sample_shape)
            assert got[1].shape == (3,)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
                np.testing.assert_array_equal(a, b)
