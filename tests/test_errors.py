"""Bad input raises at trace time with a message naming the argument, what was expected and what came;
non-finite log-weights behave as documented inside jit."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elbojax as ej
from elbojax import exact

ESTIMATORS = [ej.log_weights, ej.elbo, ej.iwae_bound, ej.importance_log_marginal, ej.naive_mc_log_marginal]


@pytest.fixture(scope="module")
def toy():
    model = exact.GaussianToy.random(jax.random.key(0), dim=4)
    x = model.sample(jax.random.key(1), 1)[0][0]
    return model, x


def _call(estimator, model, x, **kwargs):
    kwargs.setdefault("num_samples", 3)
    return estimator(jax.random.key(0), x, model.log_joint, model.prior, **kwargs)


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "num_samples, error, match",
    [
        (0, ValueError, r"`num_samples` must be an int >= 1, got 0"),
        (-2, ValueError, r"`num_samples` must be an int >= 1, got -2"),
        (2.5, TypeError, r"`num_samples` must be an int >= 1, got 2.5 of type float"),
        (True, TypeError, r"`num_samples` must be an int >= 1, got True of type bool"),
        ("10", TypeError, r"`num_samples` must be an int >= 1, got '10' of type str"),
    ],
)
def test_bad_num_samples(toy, estimator, num_samples, error, match):
    with pytest.raises(error, match=match):
        _call(estimator, *toy, num_samples=num_samples)


def test_traced_num_samples_is_a_clear_type_error(toy):
    model, x = toy
    with pytest.raises(TypeError, match=r"`num_samples` must be a static Python int"):
        jax.jit(lambda n: _call(ej.iwae_bound, model, x, num_samples=n))(3)


def test_numpy_integer_num_samples_is_accepted(toy):
    assert _call(ej.iwae_bound, *toy, num_samples=np.int64(3)).shape == ()


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize("chunk_size", [0, -1, 1.5])
def test_bad_chunk_size(toy, estimator, chunk_size):
    with pytest.raises((ValueError, TypeError), match=r"`chunk_size` must be an int >= 1"):
        _call(estimator, *toy, chunk_size=chunk_size)


def test_key_must_be_a_prng_key(toy):
    model, x = toy
    with pytest.raises(TypeError, match=r"`key` must be a JAX PRNG key .* got int"):
        ej.iwae_bound(0, x, model.log_joint, model.prior, num_samples=2)
    with pytest.raises(ValueError, match=r"`key` must be a single PRNG key of shape \(\), got a key array of shape \(2,\)"):
        ej.iwae_bound(jax.random.split(jax.random.key(0)), x, model.log_joint, model.prior, num_samples=2)
    with pytest.raises(TypeError, match=r"dtype float32 and shape \(2,\)"):
        ej.iwae_bound(jnp.zeros(2), x, model.log_joint, model.prior, num_samples=2)


def test_log_joint_must_return_a_scalar(toy):
    model, x = toy
    per_dimension = lambda x, z: -0.5 * (x - z) ** 2  # forgot the sum
    with pytest.raises(ValueError, match=r"`log_joint\(x, z\)` must return one floating-point scalar .* got shape \(4,\)"):
        ej.iwae_bound(jax.random.key(0), x, per_dimension, model.prior, num_samples=2)
    with pytest.raises(ValueError, match=r"`log_likelihood\(x, z\)` must return one floating-point scalar"):
        ej.elbo_analytic_kl(jax.random.key(0), x, per_dimension, model.prior, model.prior)


def test_log_joint_must_be_callable(toy):
    model, x = toy
    with pytest.raises(TypeError, match=r"`log_joint` must be callable, got Array"):
        ej.elbo(jax.random.key(0), x, x, model.prior)


def test_proposal_without_sample_and_log_prob(toy):
    model, x = toy
    with pytest.raises(TypeError, match=r"`proposal` must be a distribution with `sample_and_log_prob.* got tuple"):
        ej.elbo(jax.random.key(0), x, model.log_joint, (jnp.zeros(4), jnp.ones(4)))
    with pytest.raises(TypeError, match=r"`prior` must be a distribution"):
        ej.naive_mc_log_marginal(jax.random.key(0), x, model.log_joint, "normal", num_samples=2)


@pytest.mark.parametrize(
    "make_model, bad_x, expected",
    [
        (lambda: exact.GaussianToy.random(jax.random.key(0), dim=4), jnp.zeros(5), r"`x` must have shape \(4,\), got \(5,\)"),
        (lambda: exact.LinearGaussian.random(jax.random.key(0), data_dim=6, latent_dim=2), jnp.zeros((2, 6)), r"`x` must have shape \(6,\), got \(2, 6\)"),
        (lambda: exact.GaussianMixture.random(jax.random.key(0), num_components=3, dim=2), jnp.zeros(3), r"`x` must have shape \(2,\), got \(3,\)"),
    ],
)
def test_wrong_x_shape_for_an_exact_model(make_model, bad_x, expected):
    model = make_model()
    with pytest.raises(ValueError, match=expected):
        ej.iwae_bound(jax.random.key(0), bad_x, model.log_joint, model.prior, num_samples=2)
    with pytest.raises(ValueError, match=expected):
        model.log_marginal(bad_x)


def test_wrong_latent_shape_for_an_exact_model():
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=6, latent_dim=2)
    x = jnp.zeros(6)
    wrong_q = distrax.MultivariateNormalDiag(jnp.zeros(3), jnp.ones(3))
    with pytest.raises(ValueError, match=r"`z` must have shape \(2,\), got \(3,\)"):
        ej.elbo(jax.random.key(0), x, model.log_joint, wrong_q)


def test_model_construction_checks_shapes():
    with pytest.raises(ValueError, match=r"weight \(D, d\), bias \(D,\).* got \(3, 2\), \(4,\), \(3,\)"):
        exact.LinearGaussian(jnp.zeros((3, 2)), jnp.zeros(4), jnp.ones(3))
    with pytest.raises(ValueError, match=r"logits \(C,\), means \(C, D\)"):
        exact.GaussianMixture(jnp.zeros(2), jnp.zeros((3, 2)), jnp.ones((3, 2)))


def test_no_closed_form_kl_is_a_clear_error(toy):
    model, x = toy
    categorical_prior = distrax.Categorical(logits=jnp.zeros(3))
    with pytest.raises(ValueError, match=r"No closed-form KL\(q \|\| prior\) for q = MultivariateNormalDiag and prior = Categorical"):
        ej.elbo_analytic_kl(jax.random.key(0), x, model.log_likelihood, model.prior, categorical_prior)


def test_no_closed_form_entropy_is_a_clear_error(toy):
    model, x = toy
    squashed = distrax.Transformed(distrax.MultivariateNormalDiag(jnp.zeros(4), jnp.ones(4)), distrax.Block(distrax.Tanh(), 1))
    with pytest.raises(ValueError, match=r"No closed-form entropy for q = Transformed"):
        ej.elbo_entropy(jax.random.key(0), x, model.log_joint, squashed)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_all_minus_inf_log_weights_give_minus_inf_not_nan(toy, chunk_size):
    model, x = toy
    impossible = lambda x, z: jnp.asarray(-jnp.inf, z.dtype) + 0.0 * jnp.sum(z)

    @jax.jit
    def run():
        kwargs = dict(num_samples=5, chunk_size=chunk_size)
        return (
            ej.iwae_bound(jax.random.key(0), x, impossible, model.prior, **kwargs),
            ej.elbo(jax.random.key(0), x, impossible, model.prior, **kwargs),
            ej.log_weights(jax.random.key(0), x, impossible, model.prior, **kwargs),
        )

    iwae, elbo, lw = run()
    ess = ej.effective_sample_size(lw)
    assert iwae == -jnp.inf and elbo == -jnp.inf
    assert np.all(lw == -np.inf)
    assert ess == 0.0


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_some_minus_inf_log_weights_are_ignored(toy, chunk_size):
    """Samples where p(x, z) = 0 contribute zero weight; the others still count."""
    model, x = toy

    def truncated(x, z):  # p(x, z) = 0 where z_0 < 0: log-weight -inf there
        return jnp.where(z[0] < 0, -jnp.inf, model.log_joint(x, z))

    def both(c):
        lw = ej.log_weights(jax.random.key(0), x, truncated, model.prior, num_samples=9)
        value = ej.iwae_bound(jax.random.key(0), x, truncated, model.prior, num_samples=9, chunk_size=c)
        return lw, value

    lw, value = jax.jit(both, static_argnums=0)(chunk_size)
    finite = np.asarray(lw)[np.isfinite(lw)]
    assert 0 < finite.size < 9
    np.testing.assert_allclose(value, np.log(np.exp(finite.astype(np.float64)).sum() / 9), rtol=1e-5)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_a_nan_log_weight_propagates(toy, chunk_size):
    """One NaN sample makes every estimate NaN: a bug in log_joint is never averaged away."""
    model, x = toy

    def buggy(x, z):
        return jnp.where(z[0] > 0, jnp.nan, model.log_joint(x, z))

    @jax.jit
    def run():
        kwargs = dict(num_samples=8, chunk_size=chunk_size)
        return (
            ej.iwae_bound(jax.random.key(0), x, buggy, model.prior, **kwargs),
            ej.elbo(jax.random.key(0), x, buggy, model.prior, **kwargs),
        )

    for value in run():
        assert np.isnan(value)


def _jit_too(fn):
    """Run `fn` eagerly and under `jax.jit`: the checks are at trace time, so both raise."""
    return [fn, jax.jit(fn)]


@pytest.mark.parametrize("estimator", ESTIMATORS, ids=lambda f: f.__name__)
@pytest.mark.parametrize(
    "proposal",
    [
        distrax.MultivariateNormalDiag(jnp.zeros((1, 4)), jnp.ones((1, 4))),  # batch shape (1,): was (K, K)
        distrax.Normal(jnp.zeros(4), jnp.ones(4)),  # batch shape (4,): was a broadcasting error
    ],
    ids=["mvn_batch_1", "normal_batch_4"],
)
def test_proposal_with_a_batch_shape_is_a_clear_error(toy, estimator, proposal):
    model, x = toy
    call = lambda: estimator(jax.random.key(0), x, model.log_joint, proposal, num_samples=4)
    for run in _jit_too(call):
        with pytest.raises(ValueError, match=r"`(proposal|prior)` must give one floating-point scalar log-density per sample.*shape \((1|4),\).*distrax\.Independent\(\.\.\., 1\)"):
            run()


def test_proposal_with_a_batch_shape_in_the_bounds_and_closed_forms(toy):
    model, x = toy
    q = distrax.Normal(jnp.zeros(4), 2 * jnp.ones(4))
    key = jax.random.key(0)
    calls = [
        lambda: ej.renyi_bound(key, x, model.log_joint, q, alpha=0.5, num_samples=4),
        lambda: ej.elbo_analytic_kl(key, x, model.log_likelihood, q, distrax.Normal(jnp.zeros(4), jnp.ones(4)), num_samples=4),
        lambda: ej.elbo_entropy(key, x, model.log_joint, distrax.Normal(jnp.zeros(4), 1.0), num_samples=4),
    ]
    for call in calls:
        for run in _jit_too(call):
            with pytest.raises(ValueError, match=r"`proposal` must give one floating-point scalar log-density per sample"):
                run()


def test_closed_form_kl_with_a_batched_prior_is_a_clear_error(toy):
    model, x = toy
    batched_prior = distrax.MultivariateNormalDiag(jnp.zeros((2, 4)), jnp.ones((2, 4)))
    call = lambda: ej.elbo_analytic_kl(jax.random.key(0), x, model.log_likelihood, model.prior, batched_prior, num_samples=4)
    for run in _jit_too(call):
        with pytest.raises(ValueError, match=r"closed-form KL\(proposal \|\| prior\) must be a scalar, got shape \(2,\)"):
            run()


@pytest.mark.parametrize("alpha", [float("nan"), float("inf"), -float("inf")])
def test_renyi_alpha_must_be_finite(toy, alpha):
    model, x = toy
    call = lambda: ej.renyi_bound(jax.random.key(0), x, model.log_joint, model.prior, alpha=alpha, num_samples=4)
    for run in _jit_too(call):
        with pytest.raises(ValueError, match=r"`alpha` must be a finite number, got (nan|inf|-inf)"):
            run()


def test_messages_name_the_argument_the_caller_gave():
    """Each named another argument: `data` for float `indices`, `num` for `num_resampled`,
    `num_samples` for `elbo_samples`."""
    import optax
    from flax import nnx

    from elbojax import models, snis, train

    rngs = nnx.Rngs(0)
    model = models.VAE(models.GaussianMLPEncoder(6, 2, (4,), rngs=rngs), models.BernoulliMLPDecoder(2, 6, (4,), rngs=rngs), models.StandardNormalPrior(2))
    graphdef, state = train.init(model, optax.adam(1e-3))
    step = train.make_step(graphdef, optax.adam(1e-3), train.objective("elbo"), seed=0)
    with pytest.raises(TypeError, match=r"`indices` must be an integer array"):
        step(state, jnp.zeros((2, 6)), jnp.array([0.5, 1.0]))
    with pytest.raises(ValueError, match=r"`elbo_samples` must be an int >= 1, got 0"):
        train.evaluate(graphdef, state.params, np.zeros((2, 6), np.float32), num_samples=4, chunk_size=4, elbo_samples=0)
    with pytest.raises(ValueError, match=r"`num_resampled` must be an int >= 1, got 0"):
        snis.importance_resample(jax.random.key(0), None, lambda x, z: -(z**2), distrax.Normal(0.0, 1.0), num_samples=4, num_resampled=0)


def test_empty_data_is_refused_not_averaged_into_nan():
    """N = 0 gave NaN logits from em_step, a NaN mean log-likelihood, an objective of NaN (a
    skipped step) from make_step, and an ESS of 0 from an empty set of log-weights."""
    import optax
    from flax import nnx

    from elbojax import models, train

    mixture = exact.GaussianMixture.random(jax.random.key(0), num_components=3, dim=2)
    empty = jnp.zeros((0, 2))
    with pytest.raises(ValueError, match=r"`data` must have shape \(N, 2\) with N >= 1, got \(0, 2\)"):
        mixture.em_step(empty)
    with pytest.raises(ValueError, match=r"with N >= 1, got \(0, 2\)"):
        mixture.mean_log_marginal(empty)
    with pytest.raises(ValueError, match=r"with N >= 1"):
        exact.fit_em(mixture, empty, num_steps=2)
    rngs = nnx.Rngs(0)
    model = models.VAE(models.GaussianMLPEncoder(6, 2, (4,), rngs=rngs), models.BernoulliMLPDecoder(2, 6, (4,), rngs=rngs), models.StandardNormalPrior(2))
    graphdef, state = train.init(model, optax.adam(1e-3))
    step = train.make_step(graphdef, optax.adam(1e-3), train.objective("elbo"), seed=0)
    with pytest.raises(ValueError, match=r"`batch` must have shape \(B, ...\) with B >= 1 examples, got \(0, 6\)"):
        jax.jit(step)(state, jnp.zeros((0, 6)), jnp.zeros(0, jnp.int32))
    with pytest.raises(ValueError, match=r"K >= 1 log-weights along `axis` -1, got shape \(3, 0\)"):
        ej.effective_sample_size(jnp.zeros((3, 0)))


def test_small_arguments_are_refused_with_what_was_expected():
    """Each was JAX's own error (or, for a NaN threshold, a silent count of 0)."""
    from elbojax import diagnostics, discrete, distributed
    from elbojax.models import likelihoods

    means = jnp.arange(6.0).reshape(3, 2)
    for threshold, error, match in (("0.01", TypeError, "real number >= 0, got '0.01'"),
                                    (float("nan"), ValueError, "finite number >= 0, got nan"),
                                    (-1.0, ValueError, "finite number >= 0, got -1.0"),
                                    (True, TypeError, "real number >= 0, got True")):
        with pytest.raises(error, match=match):
            diagnostics.active_units(means, threshold)
    assert int(diagnostics.active_units(means, np.float32(0.5)).count) == 2
    assert int(jax.jit(diagnostics.active_units)(means, 0.5).count) == 2  # a traced threshold still works

    with pytest.raises(ValueError, match=r"C >= 1 categories on the last axis, got shape \(2, 0\)"):
        discrete.straight_through(jnp.zeros((2, 0)))

    model = exact.GaussianToy.random(jax.random.key(0), dim=2)
    score = lambda baseline: ej.elbo(jax.random.key(0), jnp.zeros(2), model.log_joint, model.prior,
                                     num_samples=2, gradient="score", baseline=baseline)
    for baseline, match in (("0", "real number or a scalar array, got '0'"), (True, "got True of type bool"),
                            (jnp.array(True), "real number, got dtype bool")):
        with pytest.raises(TypeError, match=match):
            score(baseline)
    assert np.isfinite(score(np.float32(0.5)))

    mesh = distributed.data_mesh(1)
    for ndim, axis, error, match in ((2, 2, ValueError, r"`axis` must be an int in \[-2, 2\)"), (0, 0, ValueError, "`ndim` must be an int >= 1"),
                                     (2, "0", TypeError, r"`axis` must be an int"), (2.0, 0, TypeError, "`ndim` must be an int >= 1")):
        with pytest.raises(error, match=match):
            distributed.row_sharding(mesh, ndim, axis)
    for axis in (2, 1.0):  # checked before `shape[axis]` is read (an IndexError or TypeError from a tuple before)
        with pytest.raises((ValueError, TypeError), match=r"`axis` must be an int in \[-2, 2\)"):
            distributed.shard_rows((4, 3), mesh, lambda index: None, axis=axis)

    with pytest.raises(TypeError, match="static real number in \\(0, 0.5\\)"):
        jax.jit(lambda c: likelihoods.bias_from_data_mean(jnp.full(3, 0.5), clip=c))(0.01)
    with pytest.raises(TypeError, match="got '0.01' of type str"):
        likelihoods.bias_from_data_mean(jnp.full(3, 0.5), clip="0.01")
    np.testing.assert_allclose(likelihoods.bias_from_data_mean(jnp.array([0.0, 0.5]), clip=np.float32(0.25)),
                               [np.log(1 / 3), 0.0], rtol=1e-6)


def test_a_nan_never_becomes_a_plausible_answer():
    """Each gave a finite, plausible-looking result from a NaN input (inside jit, where nothing can raise)."""
    import distrax
    from flax import nnx

    from elbojax import diagnostics, discrete, missing, models, snis

    # A NaN logit beside a +inf one: the +inf limit made the NaN class -inf, and the ELBO finite.
    log_joint = lambda x, c: jnp.array([-1.0, -2.0, -3.0])[c]
    assert np.isnan(jax.jit(lambda l: discrete.enumerated_elbo(None, log_joint, l))(jnp.array([jnp.inf, jnp.nan, 0.0])))

    # A NaN log-weight: resampled samples and imputations were finite draws picked by meaningless indices.
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=4, latent_dim=2)
    broken = exact.LinearGaussian(model.weight, model.bias, model.noise_variance.at[0].set(jnp.nan))
    q = distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2))
    mask = jnp.array([True, True, False, False])
    imputation = jax.jit(lambda m: missing.impute(jax.random.key(1), jnp.ones(4), mask, m, num_samples=50,
                                                   num_imputations=3, proposal=q))(broken)
    assert np.all(np.isnan(imputation.samples[:, 2:])) and np.all(np.isnan(imputation.means[:, 2:]))
    np.testing.assert_array_equal(imputation.samples[:, :2], np.ones((3, 2)))  # observed entries stay observed
    healthy = jax.jit(lambda m: missing.impute(jax.random.key(1), jnp.ones(4), mask, m, num_samples=50,
                                                num_imputations=3, proposal=q))(model)
    assert np.all(np.isfinite(healthy.samples)) and np.all(np.isfinite(healthy.means))
    resampled = jax.jit(lambda m: snis.importance_resample(jax.random.key(2), jnp.ones(4), m.log_joint, q,
                                                           num_samples=20, num_resampled=4))(broken)
    assert np.all(np.isnan(resampled.samples)) and resampled.indices.dtype == jnp.int32

    # A NaN posterior mean: its dimension was counted as inactive.
    means = jnp.arange(30.0).reshape(10, 3).at[4, 1].set(jnp.nan)
    assert int(jax.jit(diagnostics.active_units)(means).count) == -1
    assert int(jax.jit(diagnostics.active_units)(means.at[4, 1].set(0.0)).count) == 3

    # NaN classifier logits: argmax named class 0.
    rngs = nnx.Rngs(0)
    classifier = models.MLPClassifier(4, 3, (5,), rngs=rngs)
    m2 = models.SemiSupervisedVAE(classifier, models.GaussianMLPEncoder(7, 2, (5,), rngs=rngs),
                                  models.BernoulliMLPDecoder(5, 4, (5,), rngs=rngs), models.StandardNormalPrior(2), num_classes=3)
    assert 0 <= int(m2.classify(jnp.ones(4))) < 3
    classifier.head.bias.set_value(jnp.full(3, jnp.nan))
    assert int(m2.classify(jnp.ones(4))) == -1


def test_second_look_at_the_sweep_fixes():
    """Regressions a review of this round's own fixes found, each reproduced before the fix."""
    import distrax

    from elbojax import discrete, distributed, gradients, missing, reductions
    from elbojax.models.hierarchical import HierarchicalProposal

    # float16: total ** 2 overflowed once the ESS passed 256 (inf).
    for num in (300, 1000):
        np.testing.assert_allclose(reductions.effective_sample_size(jnp.zeros(num, jnp.float16)), num, rtol=1e-3)

    # The public path_only_log_prob(q, z) is log q(z) for a relaxed q too (it read z as log z).
    q = discrete.RelaxedBernoulli(jnp.array([0.2]), 0.5)
    z = q.sample(seed=jax.random.key(0))
    np.testing.assert_allclose(gradients.path_only_log_prob(q, z), q.log_prob(z), rtol=1e-6)

    # A distrax.Transformed conditional layer: log_prob's shape check failed on its abstract event_shape.
    layered = HierarchicalProposal(
        distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2)),
        lambda z1: distrax.Transformed(distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2)),
                                       distrax.Block(distrax.ScalarAffine(z1, 2.0), 1)),
    )
    sample, log_q = layered.sample_and_log_prob(seed=jax.random.key(0))
    np.testing.assert_allclose(layered.log_prob(sample), log_q, rtol=1e-6)
    with pytest.raises(ValueError, match=r"`value\['z2'\]` must have shape sample_shape \+ \(2,\)"):
        layered.log_prob({"z1": sample["z1"], "z2": jnp.zeros(3)})

    # One row's mask as a Python list, like a whole-shape list.
    marked = missing.mark_missing(np.zeros((3, 4), np.float32), [True, False, True, True])
    assert np.isnan(marked[:, 1]).all() and not np.isnan(marked[:, [0, 2, 3]]).any()

    # NumPy integers for row_sharding's ndim and axis.
    assert tuple(distributed.row_sharding(distributed.data_mesh(1), np.int64(2), np.int32(-1)).spec) == (None, distributed.DATA_AXIS)


def test_the_fast_kl_path_refuses_a_prior_of_another_event_shape():
    """A (1,) prior was broadcast over the proposal's 3 dimensions (KL 6.25), where distrax refuses it."""
    from elbojax.proposals import MultivariateNormalDiag

    q = MultivariateNormalDiag(jnp.array([0.1, -0.2, 0.3]), jnp.array([0.5, 1.0, 2.0]))
    with pytest.raises(ValueError, match="event_shape"):
        q.kl_divergence(distrax.MultivariateNormalDiag(jnp.zeros(1), jnp.ones(1)))
    same = distrax.MultivariateNormalDiag(jnp.zeros(3), jnp.ones(3))
    np.testing.assert_allclose(q.kl_divergence(same), distrax.MultivariateNormalDiag(q.loc, q.scale_diag).kl_divergence(same), rtol=1e-5)
