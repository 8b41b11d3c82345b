"""Training objectives: KL annealing, beta and free bits, checked against the bound written out by hand."""

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import elbojax as ej
from elbojax import models, train

from helpers import KLOfXOnly, assert_within_se, keys as split_keys

DATA_DIM, LATENT_DIM = 8, 3


def _vae(prior="standard", param_dtype=jnp.float32):
    rngs = nnx.Rngs(3)
    encoder = models.GaussianMLPEncoder(DATA_DIM, LATENT_DIM, (10,), rngs=rngs, param_dtype=param_dtype)
    decoder = models.BernoulliMLPDecoder(LATENT_DIM, DATA_DIM, (10,), rngs=rngs, param_dtype=param_dtype)
    priors = {
        "standard": lambda: models.StandardNormalPrior(LATENT_DIM),
        "mixture": lambda: models.MixturePrior(LATENT_DIM, 3, rngs=rngs, param_dtype=param_dtype),
    }
    return models.VAE(encoder, decoder, priors[prior]())


def _batch(n=5):
    return (jax.random.uniform(jax.random.key(11), (n, DATA_DIM)) < 0.4).astype(jnp.float32)


def _keys(n=5):
    return split_keys(12, n)


def _by_hand_iwae(model, keys, batch, weight, num_samples):
    """log mean_k exp(log p(x|z_k) + a (log p(z_k) - log q(z_k))) from three calls of `log_weights`."""

    def point(key, x):
        q = model.proposal(x)
        minus_log_q = ej.log_weights(key, x, lambda x, z: 0.0, q, num_samples=num_samples)
        log_lik = ej.log_weights(key, x, model.log_likelihood, q, num_samples=num_samples) - minus_log_q
        log_prior = ej.log_weights(key, x, model.log_joint, q, num_samples=num_samples) - minus_log_q - log_lik
        return ej.logmeanexp(log_lik + weight * (log_prior + minus_log_q))

    return jnp.mean(jax.vmap(point)(keys, batch))


@pytest.mark.parametrize("kl_weight, beta, step, weight", [
    (0.25, 1.0, 0, 0.25),
    (1.0, 0.5, 0, 0.5),
    (optax.linear_schedule(0.0, 1.0, 10), 1.0, 5, 0.5),
    (optax.linear_schedule(0.0, 1.0, 10), 2.0, 30, 2.0),
])
def test_annealed_iwae_weights_the_kl_part_of_each_log_weight(x64, kl_weight, beta, step, weight):
    model = _vae(param_dtype=jnp.float64)
    batch, keys = _batch().astype(jnp.float64), _keys()
    objective_fn = train.objective("iwae", num_samples=7, kl_weight=kl_weight, beta=beta)
    terms = objective_fn(keys, model, batch, jnp.asarray(step))
    np.testing.assert_allclose(terms.kl_weight, weight, rtol=1e-12)
    np.testing.assert_allclose(terms.objective, _by_hand_iwae(model, keys, batch, weight, 7), rtol=1e-10)


def test_unit_weight_through_the_weighted_path_is_the_plain_bound(x64):
    model = _vae(param_dtype=jnp.float64)
    batch, keys = _batch().astype(jnp.float64), _keys()
    plain = train.objective("iwae", num_samples=6)(keys, model, batch, jnp.asarray(0))
    forced = train.objective("iwae", num_samples=6, kl_weight=lambda step: 1.0)(keys, model, batch, jnp.asarray(0))
    np.testing.assert_allclose(forced.objective, plain.objective, rtol=1e-12)
    expected = jnp.mean(jax.vmap(lambda k, x: ej.iwae_bound(k, x, model.log_joint, model.proposal(x), num_samples=6))(keys, batch))
    np.testing.assert_allclose(plain.objective, expected, rtol=1e-12)
    kl = jnp.mean(jax.vmap(model.analytic_kl)(batch))
    np.testing.assert_allclose(plain.kl, kl, rtol=1e-12)


def test_annealed_analytic_elbo_and_free_bits(x64):
    model = _vae(param_dtype=jnp.float64)
    batch, keys = _batch().astype(jnp.float64), _keys()
    step = jnp.asarray(0)
    reconstruction = jax.vmap(lambda k, x: ej.expectation(k, x, model.log_likelihood, model.proposal(x), num_samples=3))(keys, batch)
    kl_dims = jax.vmap(lambda x: model.analytic_kl(x, per_dimension=True))(batch)
    np.testing.assert_allclose(kl_dims.sum(1), jax.vmap(model.analytic_kl)(batch), rtol=1e-12)

    weighted = train.objective("elbo", num_samples=3, kl_weight=0.3)(keys, model, batch, step)
    np.testing.assert_allclose(weighted.objective, jnp.mean(reconstruction - 0.3 * kl_dims.sum(1)), rtol=1e-12)
    plain = train.objective("elbo", num_samples=3)(keys, model, batch, step)
    elbos = jax.vmap(lambda k, x: model.elbo(k, x, num_samples=3))(keys, batch)
    np.testing.assert_allclose(plain.objective, jnp.mean(elbos), rtol=1e-12)

    # Free bits: each dimension's batch-mean KL is raised to at least lambda.
    mean_kl = kl_dims.mean(0)
    floor = float(np.median(mean_kl))
    free = train.objective("elbo", num_samples=3, free_bits=floor, beta=2.0)(keys, model, batch, step)
    expected = jnp.mean(reconstruction) - 2.0 * jnp.sum(jnp.maximum(floor, mean_kl))
    np.testing.assert_allclose(free.objective, expected, rtol=1e-12)
    np.testing.assert_allclose(free.kl, mean_kl.sum(), rtol=1e-12)
    # Below every dimension's KL, free bits change nothing; above all of them, the KL has no gradient.
    none_free = train.objective("elbo", num_samples=3, free_bits=0.0)(keys, model, batch, step)
    np.testing.assert_allclose(none_free.objective, plain.objective, rtol=1e-12)
    graphdef, params = nnx.split(model, nnx.Param)

    def encoder_grad(objective_fn):
        value = lambda p: objective_fn(keys, nnx.merge(graphdef, p), batch, step).objective
        return jax.grad(value)(params)["encoder"]

    all_free = encoder_grad(train.objective("elbo", num_samples=3, free_bits=float(mean_kl.max()) + 1.0))
    reconstruction_only = encoder_grad(lambda *args: train.Terms(jnp.mean(reconstruction_of(*args)), 0.0, 1.0))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-12), all_free, reconstruction_only)


def reconstruction_of(keys, model, batch, step):
    return jax.vmap(lambda k, x: ej.expectation(k, x, model.log_likelihood, model.proposal(x), num_samples=3))(keys, batch)


@pytest.mark.parametrize("name, gradient", [("iwae", "dreg"), ("elbo", "stl"), ("iwae", "score")])
def test_gradient_estimators_stay_unbiased_under_annealing(name, gradient):
    """The weighted log-joint keeps the unbiased estimators unbiased (IWAE-STL is biased even at a = 1)."""
    model = _vae()
    graphdef, params = nnx.split(model, nnx.Param)
    x = _batch(1)
    draws = split_keys(21, 3000)

    def grads(gradient):
        objective_fn = train.objective(name, num_samples=4, gradient=gradient, kl_weight=0.3)

        def one(key):
            value = lambda p: objective_fn(key[None], nnx.merge(graphdef, p), x, jnp.asarray(0)).objective
            return jax.grad(value)(params)["encoder"]

        flat, _ = jax.flatten_util.ravel_pytree(jax.jit(jax.vmap(one))(draws))
        return flat.reshape(len(draws), -1)

    difference = grads(gradient) - grads("reparam")
    assert_within_se(difference, np.zeros(difference.shape[1]), f"{name} {gradient} minus reparam", limit=4.5)


def test_step_reports_kl_and_weight():
    model = _vae()
    optimizer = optax.adam(1e-2)
    graphdef, state = train.init(model, optimizer)
    step = jax.jit(train.make_step(graphdef, optimizer, train.objective("iwae", num_samples=3, kl_weight=optax.linear_schedule(0.0, 1.0, 4)), seed=0))
    weights = []
    for _ in range(3):
        state, info = step(state, _batch(), jnp.arange(5))
        weights.append(float(info.kl_weight))
        assert np.isfinite(info.kl) and float(info.kl) > 0
    np.testing.assert_allclose(weights, [0.0, 0.25, 0.5], rtol=1e-6)


def test_objective_errors():
    with pytest.raises(ValueError, match="Free bits apply to the ELBO"):
        train.objective("iwae", free_bits=0.5)
    with pytest.raises(ValueError, match="Free bits apply to the ELBO"):
        train.objective("elbo", kl="monte_carlo", free_bits=0.5)
    with pytest.raises(ValueError, match="Free bits apply to the ELBO"):
        train.objective("elbo", gradient="stl", free_bits=0.5)
    with pytest.raises(ValueError, match="applies to the ELBO only"):
        train.objective("iwae", kl="analytic")
    with pytest.raises(ValueError, match="`beta` must be a finite number >= 0"):
        train.objective("elbo", beta=-1.0)
    with pytest.raises(ValueError, match="`kl_weight` must be a finite number >= 0"):
        train.objective("elbo", kl_weight=float("nan"))
    with pytest.raises(ValueError, match="`free_bits` must be a finite number >= 0"):
        train.objective("elbo", free_bits=-0.1)
    with pytest.raises(ValueError, match="`kl` must be"):
        train.objective("elbo", kl="closed")
    # At trace time: a model whose KL has no closed form, and a model without log_prior.
    mixture = _vae("mixture")
    with pytest.raises(ValueError, match="Free bits need the KL in closed form"):
        train.objective("elbo", free_bits=0.5)(_keys(), mixture, _batch(), jnp.asarray(0))

    class JointOnly(nnx.Module):
        def __init__(self, vae):
            self.vae = vae

        def proposal(self, x):
            return self.vae.proposal(x)

        def log_joint(self, x, z):
            return self.vae.log_joint(x, z)

    with pytest.raises(ValueError, match="needs a model with `log_likelihood`, `log_prior`"):
        train.objective("iwae", beta=0.5)(_keys(), JointOnly(_vae()), _batch(), jnp.asarray(0))
    terms = train.objective("iwae")(_keys(), JointOnly(_vae()), _batch(), jnp.asarray(0))
    assert np.isnan(terms.kl) and np.isfinite(terms.objective)


def test_weights_beyond_the_float32_range_are_refused():
    for kwargs, name in [(dict(beta=1e39), "beta"), (dict(kl_weight=1e39), "kl_weight"),
                         (dict(free_bits=1e39), "free_bits"), (dict(beta=1e20, kl_weight=1e20), "beta \\* kl_weight")]:
        with pytest.raises(ValueError, match=rf"`{name}` must be at most 3.403e\+38 \(the largest float32\)"):
            train.objective("elbo", **kwargs)


class _KLOnlyModel(KLOfXOnly, nnx.Module):
    pass


def test_a_custom_model_with_only_analytic_kl_of_x_trains_and_evaluates():
    vae = _vae()
    model = _KLOnlyModel(vae, has_analytic_kl=True)
    terms = train.objective("elbo", kl="analytic")(_keys(), model, _batch(), jnp.asarray(0))
    expected = train.objective("elbo", kl="analytic")(_keys(), vae, _batch(), jnp.asarray(0))
    np.testing.assert_allclose(terms.objective, expected.objective, rtol=1e-6)
    np.testing.assert_allclose(terms.kl, expected.kl, rtol=1e-6)
    result = train.evaluate(*nnx.split(model, nnx.Param), np.asarray(_batch()), num_samples=20, chunk_size=10, elbo_samples=5)
    np.testing.assert_allclose(result.kl, np.mean([vae.analytic_kl(x) for x in _batch()]), rtol=1e-5)
    assert np.isnan(result.kl_per_dimension).all()  # not offered: not reported
    for gradient in ["score", "stl", "bogus"]:  # the closed form has the reparameterisation gradient only
        with pytest.raises(ValueError, match=rf"kl='analytic' \(the closed-form KL\) has only the reparameterisation gradient; got gradient='{gradient}'"):
            train.objective("elbo", kl="analytic", gradient=gradient)(_keys(), model, _batch(), jnp.asarray(0))
    # Free bits need the KL per dimension, which `analytic_kl(x)` alone does not give (a bare TypeError).
    with pytest.raises(ValueError, match=r"Free bits need the KL per latent dimension, `analytic_kl\(x, per_dimension=True\)`; _KLOnlyModel.analytic_kl takes no"):
        train.objective("elbo", kl="analytic", free_bits=0.1)(_keys(), model, _batch(), jnp.asarray(0))


def test_mixture_prior_reports_a_sampled_kl():
    model = _vae("mixture")
    terms = train.objective("elbo", num_samples=2)(_keys(), model, _batch(), jnp.asarray(0))
    assert model.kl_mode() == "monte_carlo" and np.isfinite(terms.kl)


def test_per_point_objective_wraps_any_bound():
    model = _vae()
    batch, keys = _batch(), _keys()
    fn = train.per_point_objective(lambda k, m, x: ej.renyi_bound(k, x, m.log_joint, m.proposal(x), alpha=0.5, num_samples=4))
    terms = fn(keys, model, batch, jnp.asarray(0))
    expected = jnp.mean(jax.vmap(lambda k, x: ej.renyi_bound(k, x, model.log_joint, model.proposal(x), alpha=0.5, num_samples=4))(keys, batch))
    np.testing.assert_allclose(terms.objective, expected, rtol=1e-6)
    # A per-point value that is not a scalar was averaged over every axis (half the bound here).
    pair = train.per_point_objective(lambda k, m, x: jnp.stack([ej.iwae_bound(k, x, m.log_joint, m.proposal(x), num_samples=2), 0.0]))
    with pytest.raises(ValueError, match=r"must return a scalar \(one bound for one data point\), got shape \(2,\)"):
        pair(keys, model, batch, jnp.asarray(0))
