"""Local (per-data-point) variational inference, checked against the linear Gaussian's closed forms."""

import functools

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from elbojax import exact, local


@functools.partial(jax.jit, static_argnames=("dtype", "num_points"))
def _linear_gaussian(dtype=jnp.float64, num_points=4):
    # Jitted: built eagerly, op by op, the model and the data cost seconds of dispatch on a busy CPU.
    model = exact.LinearGaussian.random(jax.random.key(0), data_dim=6, latent_dim=3, dtype=dtype)
    return model, model.sample(jax.random.key(1), num_points)[0]


def _best_diagonal_gaussian(model, x):
    r"""The closed-form q* = argmin KL(q || p(z|x)) over diagonal Gaussians: mean mu, variances 1 / diag(Lambda)."""
    precision = jnp.linalg.inv(model.posterior_covariance)
    return model.posterior_mean(x), 1.0 / jnp.sqrt(jnp.diag(precision)), precision


@jax.jit
def _references(model, data):
    """Per point: q*'s mean and scale, its closed-form ELBO, log p(x), and KL(q* || posterior) two ways."""

    def one(x):
        mean, scale, precision = _best_diagonal_gaussian(model, x)
        kl_by_distrax = distrax.MultivariateNormalDiag(mean, scale).kl_divergence(model.posterior(x))
        kl_by_hand = 0.5 * (jnp.sum(jnp.log(jnp.diag(precision))) - jnp.linalg.slogdet(precision)[1])
        return mean, scale, model.elbo_diag_gaussian(x, mean, scale), model.log_marginal(x), kl_by_distrax, kl_by_hand

    return jax.vmap(one)(data)


@jax.jit
def _closed_form(model, data, phi):
    """The closed-form ELBO of each point's fitted diagonal Gaussian."""
    return jax.vmap(lambda x, p: model.elbo_diag_gaussian(x, p.loc, jnp.exp(p.log_scale)))(data, phi)


@jax.jit
def _step_size(model):
    # Gradient ascent on the closed-form ELBO converges for a step below 2 / (largest curvature):
    # the curvature in the mean is the posterior precision, in the log-scales 2 at the optimum.
    precision = jnp.linalg.inv(model.posterior_covariance)
    return 1.0 / jnp.maximum(jnp.linalg.eigvalsh(precision).max(), 2.0)


def test_closed_form_local_optimum_is_the_best_diagonal_gaussian_and_its_gap_is_the_kl(x64):
    """Exact claim, float64: deterministic gradient ascent on the closed-form ELBO converges to machine precision."""
    model, data = _linear_gaussian()
    start = local.DiagonalGaussian(jnp.zeros((4, 3)), jnp.zeros((4, 3)))
    optimizer = optax.sgd(_step_size(model))
    fit = jax.jit(
        lambda key, data, phi: local.optimize_local_batch(
            key, model, data, phi, objective=local.closed_form_objective(), optimizer=optimizer, num_steps=1500
        )
    )
    result = fit(jax.random.key(2), data, start)
    assert result.objective.shape == (4, 1500) and result.phi.loc.dtype == jnp.float64
    assert np.all(result.num_skipped == 0)
    mean, scale, best_elbo, log_marginal, kl_by_distrax, kl_by_hand = _references(model, data)
    np.testing.assert_allclose(result.phi.loc, mean, rtol=0, atol=1e-10)
    np.testing.assert_allclose(jnp.exp(result.phi.log_scale), scale, rtol=1e-10)
    gap = log_marginal - _closed_form(model, data, result.phi)
    np.testing.assert_allclose(gap, kl_by_distrax, rtol=0, atol=1e-10)
    np.testing.assert_allclose(gap, kl_by_hand, rtol=0, atol=1e-10)
    np.testing.assert_allclose(result.objective[:, -1], best_elbo, rtol=0, atol=1e-10)
    assert np.all(gap > 1e-2)  # the posterior is correlated: the mean-field family cannot reach it
    # Same shapes, new values: no recompilation.
    fit(jax.random.key(3), data + 1.0, start)
    assert fit._cache_size() == 1


def test_monte_carlo_refinement_of_a_suboptimal_encoder_reaches_the_optimum_within_tolerance(x64):
    """Semi-amortised refinement with the Monte Carlo ELBO (STL gradient, K = 4) from a poor start.

    The iterates of a stochastic optimizer fluctuate around q* with a spread of order (step size) x
    (gradient noise); the cosine decay takes the step to zero, and the ELBO is flat at q* (the
    deficit is quadratic in the error). Measured on these 4 points and 4 seeds: mean errors up to
    0.013 (posterior standard deviations about 0.4), relative scale errors up to 0.015, deficits up to 4e-4 nats;
    the tolerances are about 3 times those.
    """
    model, data = _linear_gaussian()
    mean, scale, best_elbo, *_ = _references(model, data)
    start = local.DiagonalGaussian(mean + 1.0, jnp.zeros_like(mean))  # a poor "encoder" output
    optimizer = optax.adam(optax.cosine_decay_schedule(5e-2, 1000))
    objective = local.objective("elbo", num_samples=4, gradient="stl")

    @jax.jit
    def refine(keys):
        fits = jax.vmap(
            lambda key: local.optimize_local_batch(key, model, data, start, objective=objective, optimizer=optimizer, num_steps=1000)
        )(keys)
        return fits, jax.vmap(lambda phi: _closed_form(model, data, phi))(fits.phi), _closed_form(model, data, start)

    result, fitted_elbo, start_elbo = refine(jax.random.split(jax.random.key(4), 4))
    deficit = best_elbo[None] - fitted_elbo
    assert np.all(deficit >= -1e-12)  # q* is the maximum
    assert np.all(deficit < 1.5e-3), deficit
    np.testing.assert_allclose(result.phi.loc, np.broadcast_to(mean, result.phi.loc.shape), rtol=0, atol=0.04)
    np.testing.assert_allclose(jnp.exp(result.phi.log_scale), np.broadcast_to(scale, result.phi.loc.shape), rtol=0.05)
    assert np.all(fitted_elbo > start_elbo[None] + 1.0)  # the refinement moved far from its start


class FactorAnalysis(nnx.Module):
    """A trainable linear Gaussian (noise on a log scale), with the closed-form ELBO of `exact.LinearGaussian`."""

    def __init__(self, data_dim, latent_dim, *, rngs, dtype=jnp.float64):
        self.weight = nnx.Param(jax.random.normal(rngs.params(), (data_dim, latent_dim), dtype) * 0.3)
        self.bias = nnx.Param(jnp.zeros(data_dim, dtype))
        self.log_noise = nnx.Param(jnp.zeros(data_dim, dtype))

    def exact(self):
        return exact.LinearGaussian(self.weight[...], self.bias[...], jnp.exp(self.log_noise[...]))

    def log_joint(self, x, z):
        return self.exact().log_joint(x, z)

    def elbo_diag_gaussian(self, x, mean, scale):
        return self.exact().elbo_diag_gaussian(x, mean, scale)


def test_svi_model_step_is_the_gradient_of_the_optimised_bound(x64):
    """With the inner loop converged, the model step follows d/dtheta max_phi ELBO (the envelope theorem).

    The reference differentiates the closed-form ELBO through the analytic optimum phi*(theta),
    a total derivative; the SVI step holds phi* fixed. They agree because dELBO/dphi = 0 at phi*.
    """
    _, data = _linear_gaussian(num_points=8)
    model = FactorAnalysis(6, 3, rngs=nnx.Rngs(0))
    learning_rate = 0.1
    graphdef, state = local.svi_init(model, optax.sgd(learning_rate), local.DiagonalGaussian(jnp.zeros(3), jnp.zeros(3)), num_points=8)
    step = local.make_svi_step(
        graphdef, optax.sgd(learning_rate), objective=local.closed_form_objective(),
        inner_optimizer=optax.sgd(0.05), num_inner_steps=3000, seed=0,
    )
    indices = jnp.array([5, 1, 6])

    def optimised_bound(params):
        linear_gaussian = nnx.merge(graphdef, params).exact()
        return jnp.mean(_references(linear_gaussian, data[indices])[2])

    @jax.jit
    def run(state):
        new_state, info = step(state, data[indices], indices)
        value, grads = jax.value_and_grad(optimised_bound)(state.params)
        posterior_means = jax.vmap(nnx.merge(graphdef, state.params).exact().posterior_mean)(data[indices])
        return new_state, info, value, grads, posterior_means

    new_state, info, value, grads, posterior_means = run(state)
    expected = jax.tree.map(lambda p, g: p + learning_rate * g, state.params, grads)
    np.testing.assert_allclose(info.objective, value, rtol=1e-10)
    for got, want in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(expected)):
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-10)
    assert bool(info.finite) and int(new_state.step) == 1
    # The visited rows of the table hold phi*; the others are untouched.
    np.testing.assert_allclose(new_state.local.loc[indices], posterior_means, atol=1e-9)
    untouched = np.setdiff1d(np.arange(8), np.asarray(indices))
    np.testing.assert_array_equal(new_state.local.loc[untouched], 0.0)


def test_svi_trains_a_model_without_an_encoder():
    """Monte Carlo SVI with warm starts raises the exact log-likelihood of a factor-analysis model."""
    truth, data = _linear_gaussian(dtype=jnp.float32, num_points=64)
    model = FactorAnalysis(6, 3, rngs=nnx.Rngs(1), dtype=jnp.float32)
    optimizer = optax.adam(3e-2)
    graphdef, state = local.svi_init(model, optimizer, local.DiagonalGaussian(jnp.zeros(3), jnp.zeros(3)), num_points=64)
    step = local.make_svi_step(
        graphdef, optimizer, objective=local.objective("elbo", num_samples=4, gradient="stl"),
        inner_optimizer=optax.adam(5e-2), num_inner_steps=15, seed=0,
    )
    num_steps, batch = 200, 16
    order = np.concatenate([np.random.default_rng(epoch).permutation(64) for epoch in range(num_steps * batch // 64)])
    indices = jnp.asarray(order.reshape(num_steps, batch))

    def log_likelihood(params):
        return jnp.mean(jax.vmap(nnx.merge(graphdef, params).exact().log_marginal)(data))

    @jax.jit
    def train(state):
        final, info = jax.lax.scan(lambda s, idx: step(s, data[idx], idx), state, indices)
        truth_log_likelihood = jnp.mean(jax.vmap(truth.log_marginal)(data))  # near the maximum
        return final, info, log_likelihood(state.params), log_likelihood(final.params), truth_log_likelihood

    state, info, initial, final, best = map(jax.device_get, train(state))
    assert np.all(info.finite) and int(state.num_skipped) == 0
    assert final > initial + 0.5 * (best - initial), (initial, final, best)
    # Warm starts: late visits start close to their optimum, the first ones far from it.
    late = np.mean(info.objective[-20:] - info.initial_objective[-20:])
    early = np.mean(info.objective[:4] - info.initial_objective[:4])
    assert late < 0.25 * early, (late, early)


def test_non_finite_inner_steps_are_skipped():
    def objective(key, model, x, phi):
        value = -jnp.sum((phi.loc - 1.0) ** 2)
        return jnp.where(phi.loc[0] > 0.5, jnp.nan, value)

    start = local.DiagonalGaussian(jnp.zeros(2), jnp.zeros(2))
    result = local.optimize_local(jax.random.key(0), None, jnp.zeros(1), start, objective=objective, optimizer=optax.sgd(0.2), num_steps=10)
    # 0 -> 0.4 -> 0.64 (NaN there): the step from 0.4 is applied, then every step from 0.64 is refused.
    np.testing.assert_allclose(result.phi.loc, [0.64, 0.64], rtol=1e-6)
    assert int(result.num_skipped) == 8 and np.all(np.isfinite(result.phi.loc))


def test_errors_name_what_was_expected():
    model, data = _linear_gaussian(dtype=jnp.float32)
    phi = local.DiagonalGaussian(jnp.zeros(3), jnp.zeros(3))
    fit = lambda **kw: local.optimize_local(
        jax.random.key(0), model, data[0], kw.pop("phi", phi),
        **{"objective": local.objective(), "optimizer": optax.adam(1e-2), "num_steps": 5, **kw},
    )
    with pytest.raises(ValueError, match="num_steps"):
        fit(num_steps=0)
    with pytest.raises(TypeError, match="num_steps"):
        fit(num_steps=2.5)
    with pytest.raises(TypeError, match="DiagonalGaussian"):
        fit(phi=(jnp.zeros(3), jnp.zeros(3)))
    with pytest.raises(ValueError, match=r"ONE data point"):
        fit(phi=local.DiagonalGaussian(jnp.zeros((2, 3)), jnp.zeros((2, 3))))
    with pytest.raises(ValueError, match=r"`z` must have shape \(3,\)"):
        fit(phi=local.DiagonalGaussian(jnp.zeros(4), jnp.zeros(4)))
    with pytest.raises(TypeError, match="floating-point"):
        fit(phi=local.DiagonalGaussian(jnp.zeros(3, jnp.int32), jnp.zeros(3)))
    with pytest.raises(TypeError, match="optax"):
        fit(optimizer="adam")
    with pytest.raises(ValueError, match="one floating-point scalar"):
        fit(objective=lambda key, model, x, phi: phi.loc)
    with pytest.raises(ValueError, match="'elbo' or 'iwae'"):
        local.objective("renyi")
    with pytest.raises(TypeError, match="elbo_diag_gaussian"):
        local.optimize_local(
            jax.random.key(0), exact.GaussianToy.random(jax.random.key(0), dim=3), data[0, :3], phi,
            objective=local.closed_form_objective(), optimizer=optax.adam(1e-2), num_steps=2,
        )
    with pytest.raises(ValueError, match="one row per data point"):
        local.optimize_local_batch(
            jax.random.key(0), model, data, local.DiagonalGaussian(jnp.zeros((3, 3)), jnp.zeros((3, 3))),
            objective=local.objective(), optimizer=optax.adam(1e-2), num_steps=2,
        )
    with pytest.raises(TypeError, match="scale_diag"):
        local.diagonal_gaussian_from(object())

    graphdef, state = local.svi_init(model, optax.sgd(0.1), phi, num_points=4)
    step = local.make_svi_step(graphdef, optax.sgd(0.1), objective=local.objective(), inner_optimizer=optax.sgd(0.1), num_inner_steps=2, seed=0)
    with pytest.raises(ValueError, match=r"`indices` must have shape \(2,\)"):
        step(state, data[:2], jnp.arange(3))
    with pytest.raises(ValueError, match=r"shape \(N, \*phi_shape\)"):
        step(state._replace(local=phi), data[:2], jnp.arange(2))
    # A pytree model (every leaf trained) goes through the step: its gradient norm is taken leaf by leaf.
    new_state, info = jax.jit(step)(state, data[:2], jnp.arange(2))
    assert bool(info.finite) and not np.allclose(new_state.params.bias, state.params.bias)
    # An index outside [0, N) skips the step, loudly: JAX's indexing clamped 4 to row 3 (and wrapped -1).
    for outside in (4, -1):
        new_state, info = jax.jit(step)(state, data[:2], jnp.array([0, outside]))
        assert not bool(info.finite) and int(new_state.num_skipped) == 1
        np.testing.assert_array_equal(new_state.params.bias, state.params.bias)
        for table, old_table in zip(jax.tree.leaves(new_state.local), jax.tree.leaves(state.local)):
            np.testing.assert_array_equal(table[1:], old_table[1:])
    with pytest.raises(ValueError, match="num_inner_steps"):
        local.make_svi_step(graphdef, optax.sgd(0.1), objective=local.objective(), inner_optimizer=optax.sgd(0.1), num_inner_steps=0, seed=0)
    with pytest.raises(ValueError, match=r"`seed` must be an int in \[0, 2\*\*32\), got 4294967296"):  # was seed 0's stream
        local.make_svi_step(graphdef, optax.sgd(0.1), objective=local.objective(), inner_optimizer=optax.sgd(0.1), num_inner_steps=1, seed=2**32)


def test_svi_init_refuses_variables_that_are_not_params():
    class WithStats(nnx.Module):
        def __init__(self):
            self.w = nnx.Param(jnp.zeros(3))
            self.mean = nnx.BatchStat(jnp.zeros(3))

    with pytest.raises(ValueError, match=r"WithStats has other variables: mean \(BatchStat\)"):
        local.svi_init(WithStats(), optax.sgd(0.1), local.DiagonalGaussian(jnp.zeros(3), jnp.zeros(3)), num_points=4)


def test_point_keys_and_batch_indices_must_be_integers():
    key = jax.random.key(0)
    for bad in (jnp.array([0.2, 0.9, 1.5]), jnp.array([True, False, True])):
        with pytest.raises(TypeError, match=r"`indices` must be an integer array"):
            local.point_keys(key, bad)
        with pytest.raises(TypeError, match=r"`indices` must be an integer array"):
            jax.jit(local.point_keys)(key, bad)
    np.testing.assert_array_equal(
        jax.random.key_data(local.point_keys(key, jnp.arange(3, dtype=jnp.uint32))),
        jax.random.key_data(jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.arange(3))),
    )
    model, data = _linear_gaussian(jnp.float32, 3)
    phi = local.DiagonalGaussian(jnp.zeros((3, 3)), jnp.zeros((3, 3)))
    kwargs = dict(objective=local.closed_form_objective(), optimizer=optax.sgd(1e-2), num_steps=2)
    with pytest.raises(TypeError, match=r"`indices` must be an integer array"):
        local.optimize_local_batch(key, model, data, phi, indices=jnp.arange(3.0), **kwargs)
    with pytest.raises(TypeError, match=r"`indices` must be an integer array"):
        jax.jit(lambda i: local.optimize_local_batch(key, model, data, phi, indices=i, **kwargs))(jnp.arange(3.0))
