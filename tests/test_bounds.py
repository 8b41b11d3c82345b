"""Rényi, MIWAE, CIWAE and PIWAE: limits, exactness at the posterior, and PIWAE's gradient routing."""

import decimal

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import elbojax as ej
from elbojax import exact
from helpers import truncated_model


@pytest.fixture
def problem(x64):
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=5, latent_dim=3, dtype=jnp.float64)
    x = model.sample(jax.random.key(1), 1)[0][0]
    q = distrax.MultivariateNormalDiag(model.posterior_mean(x) + 0.4, jnp.array([0.5, 0.9, 1.2]))
    return model, x, q


def test_renyi_limits_and_monotonicity(problem):
    model, x, q = problem
    key = jax.random.key(2)
    renyi = lambda a, **kw: ej.renyi_bound(key, x, model.log_joint, q, alpha=a, num_samples=16, **kw)
    np.testing.assert_allclose(renyi(0.0), ej.iwae_bound(key, x, model.log_joint, q, num_samples=16), rtol=1e-12)
    elbo = ej.elbo(key, x, model.log_joint, q, num_samples=16)
    np.testing.assert_allclose(renyi(1.0), elbo, rtol=1e-12)
    np.testing.assert_allclose(renyi(1.0 - 1e-7), elbo, rtol=1e-5)
    values = [float(renyi(a)) for a in (-2.0, -0.5, 0.0, 0.5, 0.99, 2.0, 5.0)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), values
    np.testing.assert_allclose(renyi(0.5, chunk_size=5), renyi(0.5), rtol=1e-12)


def test_combination_iwae_endpoints_and_mixture(problem):
    model, x, q = problem
    key = jax.random.key(3)
    ciwae = lambda b: ej.combination_iwae_bound(key, x, model.log_joint, q, beta=b, num_samples=16, chunk_size=6)
    iwae = ej.iwae_bound(key, x, model.log_joint, q, num_samples=16)
    elbo = ej.elbo(key, x, model.log_joint, q, num_samples=16)
    np.testing.assert_allclose(ciwae(0.0), iwae, rtol=1e-12)
    np.testing.assert_allclose(ciwae(1.0), elbo, rtol=1e-12)
    np.testing.assert_allclose(ciwae(0.3), 0.3 * elbo + 0.7 * iwae, rtol=1e-12)
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\], got 1.5"):
        ciwae(1.5)


def test_combination_iwae_endpoints_with_zero_weights(x64):
    """With some weights 0, beta = 0 is still IWAE and the ELBO is -inf; with all 0, beta = 1 is
    -inf (both were NaN: 0 * -inf)."""
    key, q = jax.random.key(0), distrax.Normal(0.0, 1.0)
    ciwae = lambda log_joint, b: ej.combination_iwae_bound(key, 1.0, log_joint, q, beta=b, num_samples=16, chunk_size=5)
    assert np.isneginf(ej.log_weights(key, 1.0, truncated_model(0.3), q, num_samples=16)).any()
    np.testing.assert_allclose(ciwae(truncated_model(0.3), 0.0), ej.iwae_bound(key, 1.0, truncated_model(0.3), q, num_samples=16), rtol=1e-12)
    assert ciwae(truncated_model(0.3), 0.5) == -np.inf and ciwae(truncated_model(0.3), 1.0) == -np.inf
    nowhere = lambda x, z: jnp.where(z > 1e9, 0.0, -jnp.inf)
    assert ciwae(nowhere, 1.0) == -np.inf and ciwae(nowhere, 0.0) == -np.inf


def test_multi_iwae_is_the_mean_of_group_iwae_bounds(problem):
    model, x, q = problem
    key = jax.random.key(4)
    value = ej.multi_iwae_bound(key, x, model.log_joint, q, num_groups=4, num_samples=8)
    groups = [ej.iwae_bound(jax.random.fold_in(key, m), x, model.log_joint, q, num_samples=8) for m in range(4)]
    np.testing.assert_allclose(value, np.mean(groups), rtol=1e-12)
    assert abs(float(value) - float(ej.iwae_bound(key, x, model.log_joint, q, num_samples=32))) > 1e-6


@pytest.mark.parametrize(
    "bound",
    [
        lambda k, x, m, q: ej.renyi_bound(k, x, m.log_joint, q, alpha=0.5, num_samples=6),
        lambda k, x, m, q: ej.combination_iwae_bound(k, x, m.log_joint, q, beta=0.5, num_samples=6),
        lambda k, x, m, q: ej.multi_iwae_bound(k, x, m.log_joint, q, num_groups=3, num_samples=4),
        lambda k, x, m, q: ej.partial_iwae_bound(k, x, m.log_joint, q, num_groups=3, num_samples=4),
    ],
    ids=["renyi", "ciwae", "miwae", "piwae"],
)
def test_every_bound_is_exact_at_the_posterior(x64, bound):
    toy = exact.GaussianToy.random(jax.random.key(0), dim=4, dtype=jnp.float64)
    x = toy.sample(jax.random.key(1), 1)[0][0]
    values = jax.vmap(lambda k: bound(k, x, toy, toy.posterior(x)))(jax.random.split(jax.random.key(2), 5))
    np.testing.assert_allclose(values, toy.log_marginal(x), atol=1e-10)


def test_piwae_routes_iwae_to_the_model_and_miwae_to_the_proposal(problem):
    """Exact, on the same samples: model gradient = IWAE over all MK, proposal gradient = MIWAE."""
    model, x, q = problem
    key = jax.random.key(5)
    M, K = 3, 4
    params = (q.mean(), jnp.log(q.stddev()), model.bias)

    def objective(which):
        def f(p):
            mean, log_scale, bias = p
            m = exact.LinearGaussian(model.weight, bias, model.noise_variance)
            qq = distrax.MultivariateNormalDiag(mean, jnp.exp(log_scale))
            if which == "piwae":
                return ej.partial_iwae_bound(key, x, m.log_joint, qq, num_groups=M, num_samples=K)
            if which == "miwae":
                return ej.multi_iwae_bound(key, x, m.log_joint, qq, num_groups=M, num_samples=K)
            # IWAE over the same M K samples (group m's keys fold_in(key, m), then fold_in(., k)).
            lw = jnp.concatenate([ej.log_weights(jax.random.fold_in(key, g), x, m.log_joint, qq, num_samples=K) for g in range(M)])
            return jax.nn.logsumexp(lw) - jnp.log(M * K)
        return f

    value = objective("piwae")(params)
    np.testing.assert_allclose(value, objective("iwae_all")(params), rtol=1e-12)
    g_piwae = jax.grad(objective("piwae"))(params)
    g_iwae = jax.grad(objective("iwae_all"))(params)
    g_miwae = jax.grad(objective("miwae"))(params)
    np.testing.assert_allclose(g_piwae[2], g_iwae[2], rtol=1e-10)  # model: IWAE
    np.testing.assert_allclose(g_piwae[0], g_miwae[0], rtol=1e-10)  # proposal: MIWAE
    np.testing.assert_allclose(g_piwae[1], g_miwae[1], rtol=1e-10)
    assert np.abs(np.asarray(g_iwae[0]) - np.asarray(g_miwae[0])).max() > 1e-4  # they do differ


def test_bound_argument_errors(problem):
    model, x, q = problem
    with pytest.raises(TypeError, match=r"`alpha` must be a real number, got '0.5'"):
        ej.renyi_bound(jax.random.key(0), x, model.log_joint, q, alpha="0.5", num_samples=2)
    with pytest.raises(TypeError, match=r"`alpha` must be a static real number, got a traced value"):
        jax.jit(lambda a: ej.renyi_bound(jax.random.key(0), x, model.log_joint, q, alpha=a, num_samples=2))(0.5)
    # NumPy and 0-d JAX scalars are the numbers they hold.
    as_float = ej.renyi_bound(jax.random.key(0), x, model.log_joint, q, alpha=0.5, num_samples=2)
    for alpha in (np.float32(0.5), jnp.asarray(0.5)):
        assert ej.renyi_bound(jax.random.key(0), x, model.log_joint, q, alpha=alpha, num_samples=2) == as_float
    assert ej.combination_iwae_bound(jax.random.key(0), x, model.log_joint, q, beta=np.float64(0.3), num_samples=2) == (
        ej.combination_iwae_bound(jax.random.key(0), x, model.log_joint, q, beta=0.3, num_samples=2))
    with pytest.raises(ValueError, match=r"`num_groups` must be an int >= 1, got 0"):
        ej.multi_iwae_bound(jax.random.key(0), x, model.log_joint, q, num_groups=0, num_samples=2)
    with pytest.raises(ValueError, match=r"`gradient` for `renyi_bound` must be one of 'reparam', 'stl'"):
        ej.renyi_bound(jax.random.key(0), x, model.log_joint, q, alpha=0.5, num_samples=2, gradient="dreg")


def test_piwae_with_zero_weights_routes_like_iwae_and_miwae(x64):
    """Samples of weight 0 (z <= 0) contribute nothing: the value is the IWAE bound over all MK (was
    NaN: 0 * -inf), the model gets IWAE's gradient, the proposal MIWAE's over the groups with a
    positive weight (a group of zero weights has an MIWAE term of -inf and gives nothing)."""
    x, M, K = 1.0, 4, 2
    params = (jnp.asarray(-0.3), jnp.asarray(0.1), jnp.asarray(0.3))  # mean, log-scale, theta
    proposal = lambda p: distrax.Normal(p[0], jnp.exp(p[1]))
    group_log_weights = lambda key, p: jnp.stack(
        [ej.log_weights(jax.random.fold_in(key, m), x, truncated_model(p[2]), proposal(p), num_samples=K) for m in range(M)]
    )
    empty_groups = lambda key: int(np.isneginf(np.asarray(group_log_weights(key, params))).all(axis=1).sum())
    some_zero = next(k for k in map(jax.random.key, range(100)) if empty_groups(k) == 0 and np.isneginf(np.asarray(group_log_weights(k, params))).any())
    one_empty = next(k for k in map(jax.random.key, range(100)) if empty_groups(k) == 1)
    for key in (some_zero, one_empty):
        lw = np.asarray(group_log_weights(key, params))
        positive = ~np.isneginf(lw).all(axis=1)

        def iwae_all(p):
            return jax.nn.logsumexp(group_log_weights(key, p)) - jnp.log(M * K)

        def miwae_of_positive_groups(p):
            return jnp.sum(jax.nn.logsumexp(group_log_weights(key, p)[positive], axis=1)) / M

        piwae = lambda p: ej.partial_iwae_bound(key, x, truncated_model(p[2]), proposal(p), num_groups=M, num_samples=K)
        value, grad = jax.value_and_grad(piwae)(params)
        np.testing.assert_allclose(value, np.log(np.mean(np.exp(lw))), rtol=1e-12)
        np.testing.assert_allclose(grad[2], jax.grad(iwae_all)(params)[2], rtol=1e-10)
        g_miwae = jax.grad(miwae_of_positive_groups)(params)
        np.testing.assert_allclose(grad[:2], g_miwae[:2], rtol=1e-10, atol=1e-12)
        assert np.all(np.isfinite(grad))
    far = (jnp.asarray(-8.0),) + params[1:]  # every weight 0: the value is -inf, and no gradient
    value, grad = jax.value_and_grad(lambda p: ej.partial_iwae_bound(some_zero, x, truncated_model(p[2]), proposal(p), num_groups=M, num_samples=K))(far)
    assert value == -np.inf
    np.testing.assert_array_equal(grad, 0.0)


def test_renyi_near_alpha_one_keeps_float32_precision():
    """(1/(1-a)) log mean w^(1-a) against 40-digit decimal arithmetic on the same float32
    log-weights. As a -> 1 the plain form (lse - log K) / (1 - a) loses every digit (a = 1 - 1e-7
    gave 0.0 for 1.44; a = 0.999 was off by 7e-5)."""
    key, K = jax.random.key(0), 1000
    log_joint = lambda x, z: -0.5 * (x - z) ** 2 - 0.5 * z**2 - 1.8378770664093453 + 3.0
    q = distrax.Normal(0.3, 0.8)
    lw = [decimal.Decimal(float(v)) for v in np.asarray(ej.log_weights(key, 1.0, log_joint, q, num_samples=K))]
    for alpha in (-2.0, 0.0, 0.5, 0.9, 0.999, 0.99999, 0.9999999, 1.0 - 1e-9, 1.0, 1.0 + 1e-7, 1.001, 3.0):
        with decimal.localcontext() as context:
            context.prec = 40
            p = decimal.Decimal(1.0 - alpha)
            expected = float(sum(lw) / K if p == 0 else (sum((p * v).exp() for v in lw) / K).ln() / p)
        for chunk_size in (None, 300):
            value = ej.renyi_bound(key, 1.0, log_joint, q, alpha=alpha, num_samples=K, chunk_size=chunk_size)
            assert value.dtype == jnp.float32
            np.testing.assert_allclose(value, expected, rtol=0, atol=1e-6, err_msg=f"alpha={alpha}, chunk_size={chunk_size}")


def test_renyi_gradient_is_that_of_the_closed_formula(problem):
    """Both evaluation branches (close and spread-out log-weights): the gradient of
    (1/p) log mean exp(p l_k) on the same samples, in float64."""
    model, x, q = problem
    key = jax.random.key(6)
    params = (q.mean(), jnp.log(q.stddev()), model.bias)

    def renyi(p, alpha, **kwargs):
        m = exact.LinearGaussian(model.weight, p[2], model.noise_variance)
        return ej.renyi_bound(key, x, m.log_joint, distrax.MultivariateNormalDiag(p[0], jnp.exp(p[1])), alpha=alpha, num_samples=16, **kwargs)

    def closed(p, alpha):
        m = exact.LinearGaussian(model.weight, p[2], model.noise_variance)
        lw = ej.log_weights(key, x, m.log_joint, distrax.MultivariateNormalDiag(p[0], jnp.exp(p[1])), num_samples=16)
        return (jax.nn.logsumexp((1 - alpha) * lw) - jnp.log(16.0)) / (1 - alpha)

    for alpha in (-2.0, 0.5, 0.999):
        expected = jax.grad(closed)(params, alpha)
        for kwargs in ({}, {"chunk_size": 5}):
            got = jax.grad(renyi)(params, alpha, **kwargs)
            for a, b in zip(got, expected):
                np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)


def test_piwae_gradient_stays_finite_when_groups_are_far_apart():
    """Groups whose log-sum-exps differ by more than ~88 nats in float32: the proposal's gradient is
    still MIWAE's and the model's IWAE's over all samples (was NaN: the ratio exp(lse - lse_m)/M of
    the two weightings overflowed, times a model weight that underflowed to 0)."""
    M, K, c = 2, 2, 500.0
    log_joint = lambda theta: (lambda x, z: -c * jnp.sum((z - theta) ** 2))
    proposal = lambda p: distrax.MultivariateNormalDiag(p[0], jnp.exp(p[1]))
    params = (jnp.zeros(1), jnp.zeros(1), jnp.zeros(1))  # mean, log-scale, theta
    x = jnp.zeros(1)

    def group_log_weights(key, p):
        return jnp.stack([ej.log_weights(jax.random.fold_in(key, m), x, log_joint(p[2]), proposal(p), num_samples=K) for m in range(M)])

    keys = [k for k in map(jax.random.key, range(20)) if abs(float(np.diff(jax.nn.logsumexp(group_log_weights(k, params), axis=1))[0])) > 100]
    assert len(keys) >= 3
    for key in keys[:3]:
        piwae = jax.grad(lambda p: ej.partial_iwae_bound(key, x, log_joint(p[2]), proposal(p), num_groups=M, num_samples=K))(params)
        miwae = jax.grad(lambda p: ej.multi_iwae_bound(key, x, log_joint(p[2]), proposal(p), num_groups=M, num_samples=K))(params)
        iwae = jax.grad(lambda p: jax.nn.logsumexp(group_log_weights(key, p)) - jnp.log(M * K))(params)
        assert all(np.all(np.isfinite(g)) for g in piwae)
        np.testing.assert_allclose(piwae[0], miwae[0], rtol=1e-4)
        np.testing.assert_allclose(piwae[1], miwae[1], rtol=1e-4)
        np.testing.assert_allclose(piwae[2], iwae[2], rtol=1e-4)
