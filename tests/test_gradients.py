"""Every gradient estimator checked against an exact gradient (float64; Monte Carlo within 4 SE)."""

import itertools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elbojax as ej
from elbojax import exact, snis
from helpers import SE_LIMIT, assert_within_se, keys, mean_and_se_along_draws, truncated_model



@pytest.fixture
def linear_gaussian(x64):
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=5, latent_dim=3, dtype=jnp.float64)
    x = model.sample(jax.random.key(1), 1)[0][0]
    # (proposal mean, proposal log-scale, model bias): phi and theta together.
    params = (model.posterior_mean(x) + jnp.array([0.4, -0.3, 0.2]), jnp.log(jnp.array([0.5, 0.9, 1.2])), model.bias)
    return model, x, params


def _with_bias(model, bias):
    return exact.LinearGaussian(model.weight, bias, model.noise_variance)


def _flatten(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


ELBO_CASES = {
    "reparam": dict(gradient="reparam", num_samples=1),
    "stl": dict(gradient="stl", num_samples=1),
    "score": dict(gradient="score", num_samples=1),
    "score_leave_one_out": dict(gradient="score", num_samples=4),
    "score_external_baseline": dict(gradient="score", num_samples=1, baseline=-12.0),
}


@pytest.mark.parametrize("case", list(ELBO_CASES))
def test_elbo_gradient_estimators_are_unbiased(linear_gaussian, case):
    model, x, params = linear_gaussian
    kwargs = ELBO_CASES[case]

    def estimate(p, key):
        mean, log_scale, bias = p
        q = distrax.MultivariateNormalDiag(mean, jnp.exp(log_scale))
        return ej.elbo(key, x, _with_bias(model, bias).log_joint, q, **kwargs)

    def closed_form(p):
        mean, log_scale, bias = p
        return _with_bias(model, bias).elbo_diag_gaussian(x, mean, jnp.exp(log_scale))

    draws = jax.jit(jax.vmap(lambda k: _flatten(jax.grad(estimate)(params, k))))(keys(2, 6000))
    # The value is the ELBO whatever the gradient estimator.
    value = estimate(params, jax.random.key(3))
    reparam_value = ej.elbo(jax.random.key(3), x, model.log_joint, distrax.MultivariateNormalDiag(params[0], jnp.exp(params[1])), num_samples=kwargs["num_samples"])
    np.testing.assert_allclose(value, reparam_value, rtol=1e-12)
    assert_within_se(draws, _flatten(jax.grad(closed_form)(params)), case)


@pytest.mark.parametrize("form", ["analytic_kl", "entropy"])
def test_other_elbo_forms_have_unbiased_pathwise_gradients(linear_gaussian, form):
    model, x, params = linear_gaussian

    def estimate(p, key):
        mean, log_scale, bias = p
        m = _with_bias(model, bias)
        q = distrax.MultivariateNormalDiag(mean, jnp.exp(log_scale))
        if form == "analytic_kl":
            return ej.elbo_analytic_kl(key, x, m.log_likelihood, q, m.prior)
        return ej.elbo_entropy(key, x, m.log_joint, q)

    def closed_form(p):
        mean, log_scale, bias = p
        return _with_bias(model, bias).elbo_diag_gaussian(x, mean, jnp.exp(log_scale))

    draws = jax.jit(jax.vmap(lambda k: _flatten(jax.grad(estimate)(params, k))))(keys(4, 4000))
    assert_within_se(draws, _flatten(jax.grad(closed_form)(params)), form)


def _iwae_gradients(model, x, params, gradient, num_samples, key_array, **kwargs):
    def estimate(p, key):
        mean, log_scale, bias = p
        q = distrax.MultivariateNormalDiag(mean, jnp.exp(log_scale))
        return ej.iwae_bound(key, x, _with_bias(model, bias).log_joint, q, num_samples=num_samples, gradient=gradient, **kwargs)

    return jax.jit(jax.vmap(lambda k: _flatten(jax.grad(estimate)(params, k))))(key_array)


def test_dreg_decoder_gradient_equals_iwae_exactly_on_the_same_samples(linear_gaussian):
    model, x, params = linear_gaussian
    same_keys = keys(5, 50)
    plain = _iwae_gradients(model, x, params, "reparam", 8, same_keys)
    for chunk_size in (None, 3):
        dreg = _iwae_gradients(model, x, params, "dreg", 8, same_keys, chunk_size=chunk_size)
        # The last 5 entries are the model's bias: identical. The proposal's differ (by design).
        np.testing.assert_allclose(dreg[:, 6:], plain[:, 6:], rtol=0, atol=1e-10)
        assert np.abs(dreg[:, :6] - plain[:, :6]).max() > 1e-3


@pytest.mark.parametrize("gradient", ["dreg", "score", "vimco"])
def test_iwae_gradient_estimators_agree_in_mean_with_plain_iwae(linear_gaussian, gradient):
    model, x, params = linear_gaussian
    reference = _iwae_gradients(model, x, params, "reparam", 8, keys(6, 8000))
    other = _iwae_gradients(model, x, params, gradient, 8, keys(7, 8000))
    (m1, se1), (m2, se2) = mean_and_se_along_draws(reference), mean_and_se_along_draws(other)
    assert np.all(np.abs(m1 - m2) < SE_LIMIT * np.hypot(se1, se2)), (gradient, m1, m2, np.hypot(se1, se2))


def test_iwae_stl_is_biased_for_iwae(linear_gaussian):
    """Tucker et al. 2019: IWAE-STL's proposal gradient is biased for K > 1 (shown, not hidden)."""
    model, x, params = linear_gaussian
    reference = _iwae_gradients(model, x, params, "reparam", 8, keys(8, 8000))
    stl = _iwae_gradients(model, x, params, "stl", 8, keys(9, 8000))
    (m1, se1), (m2, se2) = mean_and_se_along_draws(reference), mean_and_se_along_draws(stl)
    z = np.abs(m1 - m2) / np.hypot(se1, se2)
    assert z[:6].max() > 8, z  # the proposal's gradient: clearly biased
    assert np.all(z[6:] < SE_LIMIT), z  # the model's: unchanged


@pytest.mark.parametrize("gradient", ["stl", "dreg"])
def test_stl_and_dreg_vanish_at_the_exact_posterior(x64, gradient):
    """On the Gaussian toy with q = p(z|x), every draw of the proposal gradient is exactly zero."""
    toy = exact.GaussianToy.random(jax.random.key(0), dim=20, dtype=jnp.float64)
    x = toy.sample(jax.random.key(1), 1)[0][0]
    post = toy.posterior(x)
    params = (post.mean(), jnp.log(post.stddev()))

    def estimate(p, key, grad_kind):
        q = distrax.MultivariateNormalDiag(p[0], jnp.exp(p[1]))
        if gradient == "stl" and grad_kind != "reparam":
            return ej.elbo(key, x, toy.log_joint, q, num_samples=3, gradient="stl")
        return ej.iwae_bound(key, x, toy.log_joint, q, num_samples=5, gradient=grad_kind)

    grads = jax.jit(jax.vmap(lambda k: _flatten(jax.grad(estimate)(params, k, gradient))))(keys(2, 20))
    np.testing.assert_allclose(grads, 0.0, atol=1e-10)
    if gradient == "dreg":  # IWAE-STL too
        stl = jax.jit(jax.vmap(lambda k: _flatten(jax.grad(lambda p: ej.iwae_bound(k, x, toy.log_joint, distrax.MultivariateNormalDiag(p[0], jnp.exp(p[1])), num_samples=5, gradient="stl"))(params))))(keys(2, 20))
        np.testing.assert_allclose(stl, 0.0, atol=1e-10)
    plain = jax.jit(jax.vmap(lambda k: _flatten(jax.grad(estimate)(params, k, "reparam"))))(keys(2, 20))
    assert np.abs(plain).max() > 0.1


# ------------------------------------------------------------------------------------------------
# Discrete latents: a categorical proposal on the Gaussian mixture, checked by enumeration.
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def mixture(x64):
    model = exact.GaussianMixture.random(jax.random.key(0), num_components=3, dim=2, separation=1.5, dtype=jnp.float64)
    x = model.sample(jax.random.key(1), 1)[0][0]
    logits = jnp.array([0.3, -0.2, 0.1])  # q far from the posterior
    return model, x, logits


def _exact_expected_iwae(model, x, logits, num_samples):
    """E_q[L_K] by enumerating all C^K sample tuples."""
    log_q = jax.nn.log_softmax(logits)
    total = 0.0
    for tup in itertools.product(range(model.num_components), repeat=num_samples):
        z = jnp.array(tup)
        lw = jax.vmap(lambda c: model.log_joint(x, c))(z) - log_q[z]
        total = total + jnp.exp(jnp.sum(log_q[z])) * (jax.nn.logsumexp(lw) - np.log(num_samples))
    return total


def _discrete_gradients(model, x, logits, objective, key_array, **kwargs):
    def estimate(lg, key):
        return objective(key, x, model.log_joint, distrax.Categorical(logits=lg), **kwargs)

    return jax.jit(jax.vmap(lambda k: jax.grad(estimate)(logits, k)))(key_array)


def test_discrete_score_gradients_are_unbiased_and_baselines_reduce_variance(mixture):
    model, x, logits = mixture
    exact_grad = jax.grad(lambda lg: _exact_expected_iwae(model, x, lg, 1))(logits)  # K=1: the ELBO
    plain = _discrete_gradients(model, x, logits, ej.elbo, keys(2, 20000), num_samples=4, gradient="score", baseline=0.0)
    loo = _discrete_gradients(model, x, logits, ej.elbo, keys(3, 20000), num_samples=4, gradient="score")
    assert_within_se(plain, exact_grad, "score")
    assert_within_se(loo, exact_grad, "score + leave-one-out")
    assert np.var(np.asarray(loo), 0).sum() < 0.5 * np.var(np.asarray(plain), 0).sum()


def test_vimco_and_iwae_score_are_unbiased_for_the_expected_iwae_bound(mixture):
    model, x, logits = mixture
    exact_grad = jax.grad(lambda lg: _exact_expected_iwae(model, x, lg, 3))(logits)
    vimco = _discrete_gradients(model, x, logits, ej.iwae_bound, keys(4, 20000), num_samples=3, gradient="vimco")
    score = _discrete_gradients(model, x, logits, ej.iwae_bound, keys(5, 20000), num_samples=3, gradient="score")
    vimco_chunked = _discrete_gradients(model, x, logits, ej.iwae_bound, keys(4, 50), num_samples=3, gradient="vimco", chunk_size=2)
    np.testing.assert_allclose(vimco_chunked, vimco[:50], rtol=1e-10, atol=1e-12)
    assert_within_se(vimco, exact_grad, "vimco")
    assert_within_se(score, exact_grad, "iwae score")
    assert np.var(np.asarray(vimco), 0).sum() < np.var(np.asarray(score), 0).sum()


def test_pathwise_gradient_of_a_discrete_proposal_is_an_error(mixture):
    model, x, logits = mixture
    value = lambda lg, g="reparam": ej.elbo(jax.random.key(0), x, model.log_joint, distrax.Categorical(logits=lg), num_samples=2, gradient=g)
    assert np.isfinite(value(logits))  # the value alone is fine
    with pytest.raises(ValueError, match=r"gradient='reparam' needs a reparameterizable proposal, but Categorical cannot"):
        jax.grad(value)(logits)
    for g in ("stl",):
        with pytest.raises(ValueError, match=rf"gradient='{g}' needs a reparameterizable proposal"):
            value(logits, g)
    with pytest.raises(ValueError, match=r"gradient='dreg' needs a reparameterizable proposal"):
        ej.iwae_bound(jax.random.key(0), x, model.log_joint, distrax.Categorical(logits=logits), num_samples=2, gradient="dreg")
    with pytest.raises(ValueError, match=r"needs a reparameterizable proposal"):
        jax.grad(lambda lg: ej.elbo_analytic_kl(jax.random.key(0), x, model.log_likelihood, distrax.Categorical(logits=lg), model.prior))(logits)
    # Differentiating only the model's parameters through a discrete sample is right, and allowed.
    grad_means = jax.grad(lambda m: ej.elbo(jax.random.key(0), x, exact.GaussianMixture(model.logits, m, model.scales).log_joint, distrax.Categorical(logits=logits)))(model.means)
    assert np.all(np.isfinite(grad_means))


def test_a_mixture_proposal_refuses_a_pathwise_gradient():
    """distrax's MixtureSameFamily draws its component discretely: no pathwise gradient reaches the
    mixture weights, so differentiating the proposal must be an error, not a silent zero."""
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=3, latent_dim=1)
    x = jnp.ones(3)

    def value(logits, gradient="reparam"):
        q = distrax.Independent(distrax.MixtureSameFamily(
            distrax.Categorical(logits=logits), distrax.Normal(jnp.array([-1.0, 1.0]), jnp.ones(2))), 0)
        mixture = distrax.MixtureSameFamily(distrax.Categorical(logits=logits), distrax.MultivariateNormalDiag(jnp.array([[-1.0], [1.0]]), jnp.ones((2, 1))))
        return ej.elbo(jax.random.key(1), x, model.log_joint, mixture, num_samples=4, gradient=gradient), q

    assert np.isfinite(value(jnp.zeros(2))[0])
    with pytest.raises(ValueError, match=r"needs a reparameterizable proposal, but MixtureSameFamily cannot"):
        jax.grad(lambda lg: value(lg)[0])(jnp.zeros(2))
    score = jax.grad(lambda lg: value(lg, "score")[0])(jnp.zeros(2))  # the score function is fine
    assert np.all(np.isfinite(score))
    assert not ej.gradients.is_reparameterizable(value(jnp.zeros(2))[1], jnp.zeros(()))  # also when wrapped


def _joint_with_a_mixture(theta):
    return distrax.Joint({"a": distrax.Normal(0.0, 1.0), "b": distrax.MixtureOfTwo(jax.nn.sigmoid(theta), distrax.Normal(-1.0, 1.0), distrax.Normal(1.0, 1.0))})


def _tfp_nested_joint(theta):
    from tensorflow_probability.substrates import jax as tfp

    tfd = tfp.distributions
    inner = tfd.JointDistributionNamed({"c": tfd.Bernoulli(logits=theta, dtype=jnp.float32), "d": tfd.Normal(0.0, 1.0)})
    return tfd.JointDistributionSequential([tfd.Normal(0.0, 1.0), inner])


def _mixture_2d(theta, shift=0.0):
    components = distrax.MultivariateNormalDiag(jnp.array([[-1.0, 0.0], [1.0, 0.0]]) + shift, jnp.ones((2, 2)))
    return distrax.MixtureSameFamily(distrax.Categorical(logits=jnp.stack([0.0, theta])), components)


def _hierarchical(theta, mixture_in: str):
    from elbojax.models import HierarchicalProposal

    gaussian = lambda z1: distrax.MultivariateNormalDiag(z1, jnp.ones(2))
    if mixture_in == "first":
        return HierarchicalProposal(_mixture_2d(theta), gaussian)
    return HierarchicalProposal(distrax.MultivariateNormalDiag(jnp.full(2, theta), jnp.ones(2)), lambda z1: _mixture_2d(theta, z1))


@pytest.mark.parametrize("build, part", [
    (lambda t: distrax.MixtureOfTwo(jax.nn.sigmoid(t), distrax.Normal(-1.0, 1.0), distrax.Normal(1.0, 1.0)), "MixtureOfTwo"),
    (lambda t: distrax.Independent(distrax.Quantized(distrax.Normal(jnp.full(1, t), 1.0)), 1), r"Independent \(its Quantized\)"),
    (lambda t: distrax.Bernoulli(logits=t, dtype=jnp.float32), "Bernoulli"),
    # Point masses at the bounds: the pathwise gradient came out 0.158 +- 0.002, exactly 0.205.
    (lambda t: distrax.Independent(distrax.ClippedNormal(jnp.full(1, t), 0.7, -1.0, 1.0), 1), r"Independent \(its ClippedNormal\)"),
    (_joint_with_a_mixture, r"Joint \(its MixtureOfTwo\)"),
    (_tfp_nested_joint, "JointDistributionSequential"),
    (lambda t: _hierarchical(t, "first"), r"HierarchicalProposal \(its MixtureSameFamily\)"),
    (lambda t: _hierarchical(t, "conditional"), r"HierarchicalProposal \(its MixtureSameFamily\)"),
], ids=["mixture-of-two", "quantized", "float-bernoulli", "clipped", "distrax-joint", "tfp-nested-joint", "hierarchical-first", "hierarchical-conditional"])
def test_proposals_whose_samples_carry_no_pathwise_gradient_refuse_one(build, part):
    """Float samples that carry no gradient to a parameter (a component or a bit drawn
    discretely, a rounded draw) must refuse a pathwise gradient, not give a silently wrong one
    (before: MixtureOfTwo's gradient came out 0.0002 +- 0.0011 against the exact -0.090; a
    mixture inside a `HierarchicalProposal` layer was not seen, 0.0008 against the exact 2.0)."""
    log_joint = lambda x, z: -0.5 * sum(jnp.sum(leaf**2) for leaf in jax.tree.leaves(z))
    value = lambda t, gradient="reparam": ej.elbo(jax.random.key(1), jnp.zeros(()), log_joint, build(t), num_samples=4, gradient=gradient)
    assert np.isfinite(value(0.3))
    with pytest.raises(ValueError, match=rf"needs a reparameterizable proposal, but {part} cannot"):
        jax.grad(value)(0.3)
    assert np.isfinite(jax.grad(lambda t: value(t, "score"))(0.3))


def test_straight_through_and_continuous_distrax_proposals_stay_pathwise():
    """distrax's straight-through wrapper asks for its biased gradient by name; continuous
    distributions and their wrappers are reparameterizable."""
    straight = distrax.straight_through_wrapper(distrax.OneHotCategorical)(logits=jnp.zeros(3), dtype=jnp.float32)
    wrapped = distrax.Independent(distrax.Transformed(distrax.Normal(jnp.zeros(2), 1.0), distrax.Tanh()), 1)
    joint = distrax.Joint({"a": distrax.Normal(0.0, 1.0), "b": distrax.Beta(2.0, 3.0)})
    for q in (straight, wrapped, joint):
        sample = jax.eval_shape(lambda q=q: q.sample(seed=jax.random.key(0)))
        assert ej.gradients.is_reparameterizable(q, sample), type(q).__name__


def test_gradient_argument_errors(mixture):
    model, x, logits = mixture
    q = distrax.Categorical(logits=logits)
    with pytest.raises(ValueError, match=r"`gradient` for `elbo` must be one of 'reparam', 'stl', 'score'; got 'dreg'"):
        ej.elbo(jax.random.key(0), x, model.log_joint, q, gradient="dreg")
    with pytest.raises(ValueError, match=r"`baseline` is only used with gradient='score', got gradient='vimco'"):
        ej.iwae_bound(jax.random.key(0), x, model.log_joint, q, num_samples=3, gradient="vimco", baseline=1.0)
    with pytest.raises(ValueError, match=r"gradient='vimco' needs `num_samples` >= 2"):
        ej.iwae_bound(jax.random.key(0), x, model.log_joint, q, num_samples=1, gradient="vimco")
    with pytest.raises(ValueError, match=r"`baseline` must be a scalar"):
        ej.elbo(jax.random.key(0), x, model.log_joint, q, gradient="score", baseline=jnp.zeros(2))


def test_a_learned_baseline_trains_by_regression_on_the_returned_value(linear_gaussian):
    """The README's recipe: the estimator holds the baseline fixed; the regression term trains it."""
    model, x, params = linear_gaussian
    q = distrax.MultivariateNormalDiag(params[0], jnp.exp(params[1]))

    def loss(baseline):
        value = ej.elbo(jax.random.key(0), x, model.log_joint, q, gradient="score", baseline=baseline)
        return -value + (jax.lax.stop_gradient(value) - baseline) ** 2, value

    (_, value), grad = jax.value_and_grad(loss, has_aux=True)(jnp.asarray(-3.0))
    np.testing.assert_allclose(grad, -2 * (value - (-3.0)), rtol=1e-12)


# ------------------------------------------------------------------------------------------------
# Zero importance weights (log-weight -inf): finite values and gradients, checked against numpy.
# ------------------------------------------------------------------------------------------------


def _vimco_reference(log_weights):
    """VIMCO's signals in float64 numpy, from the definition; the documented conventions: no
    baseline for a sample whose leave-one-out bound is -inf, no signal where every weight is 0."""
    lw = np.asarray(log_weights, np.float64)
    num = lw.size
    with np.errstate(divide="ignore", invalid="ignore"):
        bound = np.log(np.mean(np.exp(lw)))
        if np.isneginf(bound):
            return np.zeros(num)
        out = []
        for k in range(num):
            others = np.delete(lw, k)
            baseline = np.log((np.exp(others).sum() + np.exp(others.mean())) / num)
            out.append(bound - (0.0 if np.isneginf(baseline) else baseline))
    return np.array(out)


@pytest.mark.parametrize(
    "log_weights",
    [
        [0.0, -1.0, -np.inf, 0.5],
        [-np.inf, 0.3, -np.inf, 1.0, 2.0],
        [1.0, -np.inf, -np.inf],  # every other weight 0: sample 0 has no baseline (not +inf)
        [-np.inf, -np.inf, -np.inf],  # every weight 0: no signal
        [0.5, -2.0, 3.0, 1.0, -0.5, 2.5],
    ],
)
def test_vimco_signals_with_zero_weights_match_the_definition(x64, log_weights):
    signals = jax.jit(ej.gradients.vimco_signals)(jnp.asarray(log_weights))
    np.testing.assert_allclose(signals, _vimco_reference(log_weights), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("offset", [-1e2, -1e4, 3e3])
def test_float32_vimco_signals_of_large_log_weights_keep_their_digits(offset):
    """The signals do not depend on a constant added to every log-weight; computed from the
    absolute numbers, at -1e4 and K = 100 they were off by 3% of their norm (cancellation)."""
    rng = np.random.default_rng(0)
    log_weights = (rng.standard_normal(100) + offset).astype(np.float32)
    wide = log_weights.astype(np.float64)  # the same float32 inputs, in float64,
    exact = _vimco_reference(wide - wide.max())  # shifted (exactly) so that numpy's exp does not underflow
    got = np.asarray(jax.jit(ej.gradients.vimco_signals)(jnp.asarray(log_weights)), np.float64)
    assert np.linalg.norm(got - exact) / np.linalg.norm(exact) < 1e-4


def test_vimco_signals_check_their_input():
    """K = 1 gave [nan]; integers an OverflowError; a (2, 2) array a concatenate error."""
    with pytest.raises(ValueError, match=r"shape \(K,\) with K >= 2 .* got shape \(1,\)"):
        ej.gradients.vimco_signals(jnp.zeros(1))
    with pytest.raises(ValueError, match=r"shape \(K,\) with K >= 2 .* got shape \(2, 2\)"):
        ej.gradients.vimco_signals(jnp.zeros((2, 2)))
    with pytest.raises(TypeError, match=r"`log_weights` must be a floating-point array, got dtype int32"):
        ej.gradients.vimco_signals(jnp.zeros(3, jnp.int32))
    np.testing.assert_allclose(ej.gradients.vimco_signals([0.0, 1.0]), _vimco_reference([0.0, 1.0]), rtol=1e-6)  # a list


@pytest.fixture
def impossible_class(x64):
    """A 4-class latent whose class 2 has p(x, z) = 0, and a categorical proposal that draws it."""
    log_p = jnp.array([-1.0, -2.0, -jnp.inf, 0.5])
    logits = jnp.array([0.3, -0.2, 0.1, 0.4])
    return (lambda x, z: log_p[z]), logits


def _score_references(log_joint, logits, key, num_samples):
    """Samples, log-weights and each sample's score d log q(z_k) / d logits, in float64 numpy."""
    z, log_weights = snis.importance_samples(key, jnp.zeros(()), log_joint, distrax.Categorical(logits=logits), num_samples=num_samples)
    z, log_weights = np.asarray(z), np.asarray(log_weights, np.float64)
    scores = np.eye(logits.shape[0])[z] - np.asarray(jax.nn.softmax(logits))
    return log_weights, scores


def test_vimco_and_score_iwae_with_a_zero_weight_match_numpy(impossible_class):
    log_joint, logits = impossible_class
    key, num = jax.random.key(7), 6

    def estimate(lg, gradient, **kwargs):
        return ej.iwae_bound(key, jnp.zeros(()), log_joint, distrax.Categorical(logits=lg), num_samples=num, gradient=gradient, **kwargs)

    log_weights, scores = _score_references(log_joint, logits, key, num)
    assert np.isneginf(log_weights).any() and np.isfinite(log_weights).any()
    bound = np.log(np.mean(np.exp(log_weights)))
    normalized = np.exp(log_weights - np.log(np.sum(np.exp(log_weights))))
    vimco = (_vimco_reference(log_weights) - normalized) @ scores
    for kwargs in ({}, {"chunk_size": 4}):
        value, grad = jax.value_and_grad(estimate)(logits, "vimco", **kwargs)
        np.testing.assert_allclose(value, bound, rtol=1e-12)
        np.testing.assert_allclose(grad, vimco, rtol=1e-10, atol=1e-12)
    value, grad = jax.value_and_grad(estimate)(logits, "score")
    np.testing.assert_allclose(value, bound, rtol=1e-12)
    np.testing.assert_allclose(grad, (bound - normalized) @ scores, rtol=1e-10, atol=1e-12)


def test_elbo_score_gradient_with_a_zero_weight_is_finite_and_leaves_that_sample_out(impossible_class):
    """The MC ELBO is -inf; the documented gradient: the pathwise terms of every sample, and the
    score terms of the others, with leave-one-out baselines over the samples of positive weight."""
    log_joint, logits = impossible_class
    key, num = jax.random.key(7), 6

    def estimate(lg, **kwargs):
        return ej.elbo(key, jnp.zeros(()), log_joint, distrax.Categorical(logits=lg), num_samples=num, gradient="score", **kwargs)

    log_weights, scores = _score_references(log_joint, logits, key, num)
    kept = np.isfinite(log_weights)
    assert 2 <= kept.sum() < num
    signal = np.where(kept, log_weights, 0.0)
    leave_one_out = np.where(kept, (signal.sum() - signal) / (kept.sum() - 1), 0.0)
    pathwise = -scores.sum(0)  # d l_k / d logits = -d log q(z_k) / d logits, for every sample
    for kwargs, baseline in (({}, leave_one_out), ({"chunk_size": 4}, leave_one_out), ({"baseline": 0.7}, np.where(kept, 0.7, 0.0))):
        value, grad = jax.value_and_grad(estimate)(logits, **kwargs)
        assert value == -np.inf
        np.testing.assert_allclose(grad, (pathwise + (signal - baseline) @ scores) / num, rtol=1e-10, atol=1e-12)


def test_score_estimators_with_one_or_no_positive_weight(x64):
    """Only class 0 is possible. One positive weight of two: VIMCO's baseline for it would be -inf
    (a signal of +inf, a NaN gradient): it has none instead. No positive weight: the value is -inf."""
    log_p = jnp.array([0.0, -jnp.inf, -jnp.inf, -jnp.inf])
    log_joint = lambda x, z: log_p[z]
    logits = jnp.array([0.3, -0.2, 0.1, 0.4])
    count = lambda key: int(np.isfinite(np.asarray(ej.log_weights(key, jnp.zeros(()), log_joint, distrax.Categorical(logits=logits), num_samples=2))).sum())
    one = next(k for k in map(jax.random.key, range(100)) if count(k) == 1)
    none = next(k for k in map(jax.random.key, range(100)) if count(k) == 0)

    def estimate(lg, key, objective, gradient):
        return objective(key, jnp.zeros(()), log_joint, distrax.Categorical(logits=lg), num_samples=2, gradient=gradient)

    log_weights, scores = _score_references(log_joint, logits, one, 2)
    bound = np.log(np.mean(np.exp(log_weights)))
    normalized = np.isfinite(log_weights).astype(float)
    vimco = _vimco_reference(log_weights)
    assert vimco[np.isfinite(log_weights)] == bound  # no baseline
    for gradient, signals in (("vimco", vimco), ("score", bound)):
        value, grad = jax.value_and_grad(estimate)(logits, one, ej.iwae_bound, gradient)
        np.testing.assert_allclose(value, bound, rtol=1e-12)
        np.testing.assert_allclose(grad, (signals - normalized) @ scores, rtol=1e-10, atol=1e-12)
    for objective, gradient in ((ej.iwae_bound, "vimco"), (ej.iwae_bound, "score"), (ej.elbo, "score")):
        assert estimate(logits, none, objective, gradient) == -np.inf, (objective, gradient)
    assert np.all(np.isfinite(jax.grad(estimate)(logits, none, ej.elbo, "score")))


def test_dreg_with_zero_weights_matches_numpy_and_iwae(x64):
    """Value: the IWAE bound (was NaN: 0 * -inf). Proposal: sum_k w_k^2 dl_k/dz_k dz_k/dphi; model:
    sum_k w_k d log p / d theta, the IWAE gradient; zero-weight samples contribute nothing."""
    x, key, num = 1.0, jax.random.key(3), 8
    params = (jnp.asarray(0.2), jnp.asarray(0.1), jnp.asarray(0.3))  # mean, log-scale, theta

    def estimate(p, gradient, **kwargs):
        mean, log_scale, theta = p
        return ej.iwae_bound(key, x, truncated_model(theta), distrax.Normal(mean, jnp.exp(log_scale)), num_samples=num, gradient=gradient, **kwargs)

    mean, log_scale, theta = map(float, params)
    z, log_weights = snis.importance_samples(key, x, truncated_model(theta), distrax.Normal(mean, np.exp(log_scale)), num_samples=num)
    z, log_weights = np.asarray(z), np.asarray(log_weights)
    assert np.isneginf(log_weights).any() and np.isfinite(log_weights).any()
    weights = np.exp(log_weights - np.log(np.sum(np.exp(log_weights))))
    path = -z + (x - z - theta) + (z - mean) / np.exp(2 * log_scale)  # d l / dz at fixed q
    expected = [np.sum(weights**2 * path), np.sum(weights**2 * path * (z - mean)), np.sum(weights * (x - z - theta))]
    reparam_value, reparam_grad = jax.value_and_grad(estimate)(params, "reparam")
    for kwargs in ({}, {"chunk_size": 3}):
        value, grad = jax.value_and_grad(estimate)(params, "dreg", **kwargs)
        np.testing.assert_allclose(value, reparam_value, rtol=1e-12)
        np.testing.assert_allclose(value, np.log(np.mean(np.exp(log_weights))), rtol=1e-12)
        np.testing.assert_allclose(grad, expected, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(grad[2], reparam_grad[2], rtol=1e-10)
    # Every weight 0 (all z <= 0): the value is -inf, and no gradient (was NaN).
    far = (jnp.asarray(-8.0),) + params[1:]
    for kwargs in ({}, {"chunk_size": 3}):
        value, grad = jax.value_and_grad(estimate)(far, "dreg", **kwargs)
        assert value == -np.inf
        np.testing.assert_array_equal(grad, 0.0)


def test_stl_and_dreg_refuse_a_proposal_whose_support_moves_with_its_parameters():
    """They drop the score term, whose mean is 0 only on a fixed support: for q = Uniform(0, b)
    it is -1/b, and STL came out -0.500 +- 0.001 where d ELBO / db = 0 (at b = 2, log p = -z).
    The pathwise gradient, which keeps it, is allowed and unbiased."""
    log_joint = lambda x, z: -z
    elbo = lambda b, gradient: ej.elbo(jax.random.key(0), jnp.zeros(()), log_joint, distrax.Uniform(0.0, b), num_samples=20_000, gradient=gradient)
    for gradient, estimator in (("stl", elbo), ("dreg", lambda b, g: ej.iwae_bound(jax.random.key(0), jnp.zeros(()), lambda x, z: -jnp.sum(z),
                                                                                     distrax.Independent(distrax.Uniform(jnp.zeros(1), b), 1), num_samples=2, gradient=g))):
        with pytest.raises(ValueError, match=rf"gradient='{gradient}' drops the score term .*(its )?Uniform\)? has its support \[low, high\] set by its parameters"):
            estimator(2.0, gradient)
    from tensorflow_probability.substrates import jax as tfp  # TFP's wrapper is looked inside too

    tfp_uniform = tfp.distributions.Independent(tfp.distributions.Uniform(jnp.zeros(2), jnp.full(2, 2.0)), 1)
    with pytest.raises(ValueError, match=r"gradient='stl' drops the score term .*Independent \(its Uniform\)"):
        ej.elbo(jax.random.key(0), jnp.zeros(()), lambda x, z: -jnp.sum(z), tfp_uniform, gradient="stl")
    grad = jax.jit(jax.grad(lambda b: elbo(b, "reparam")))(2.0)
    assert abs(grad) < 4 * (1 / 12) ** 0.5 / 20_000 ** 0.5  # sd of d(-z)/db = -u is sqrt(1/12); 4 standard errors


def test_stl_and_dreg_refuse_the_other_families_whose_support_a_parameter_sets(x64):
    """Only a type named "Uniform" was refused. For q = Pareto(alpha, s) on [s, inf) and
    p(z) = e^{-z}, STL gave d ELBO / ds = 6.50 where it is exactly 0.50; reparam is unbiased."""
    from tensorflow_probability.substrates import jax as tfp

    tfd, alpha = tfp.distributions, 3.0
    log_joint = lambda x, z: -jnp.sum(z)
    for q in (tfd.Pareto(alpha, 0.5), tfd.Independent(tfd.TruncatedNormal(jnp.zeros(2), 1.0, -1.0, 1.0), 1),
              tfd.HalfCauchy(0.0, 1.0), tfd.Triangular(0.0, 1.0, 0.5)):
        name = type(q.distribution if isinstance(q, tfd.Independent) else q).__name__
        with pytest.raises(ValueError, match=rf"gradient='stl' drops the score term .*{name}\)? has its support .* set by its parameters"):
            ej.elbo(jax.random.key(0), None, log_joint, q, gradient="stl")
        with pytest.raises(ValueError, match=rf"gradient='dreg' drops the score term .*{name}"):
            ej.iwae_bound(jax.random.key(0), None, log_joint, q, num_samples=2, gradient="dreg")
    # The exact gradient of ELBO(s) = -alpha s / (alpha - 1) + log(s / alpha) + 1 / alpha + 1 at s = 0.5.
    exact = -alpha / (alpha - 1) + 1 / 0.5
    keys = jax.random.split(jax.random.key(0), 20_000)
    grad = jax.vmap(jax.grad(lambda s, key: ej.elbo(key, None, log_joint, tfd.Pareto(alpha, s), num_samples=4)), in_axes=(None, 0))
    assert_within_se(grad(0.5, keys), exact, "reparam, Pareto")


def test_partial_iwae_names_itself_when_it_refuses_a_discrete_proposal():
    with pytest.raises(ValueError, match=r"^partial_iwae_bound needs a reparameterizable proposal, but Categorical"):
        ej.partial_iwae_bound(jax.random.key(0), jnp.zeros(()), lambda x, z: 0.0, distrax.Categorical(logits=jnp.zeros(3)), num_groups=2, num_samples=2)
