"""Every estimator composes with jit, vmap (over data and keys) and grad, in float32 and float64."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np

import elbojax as ej
from elbojax import exact
from helpers import keys

SCALAR_ESTIMATORS = {
    "elbo": lambda key, x, m, q: ej.elbo(key, x, m.log_joint, q, num_samples=4),
    "iwae_bound": lambda key, x, m, q: ej.iwae_bound(key, x, m.log_joint, q, num_samples=4),
    "importance_log_marginal": lambda key, x, m, q: ej.importance_log_marginal(key, x, m.log_joint, q, num_samples=4),
    "naive_mc_log_marginal": lambda key, x, m, q: ej.naive_mc_log_marginal(key, x, m.log_joint, m.prior, num_samples=4),
    "elbo_analytic_kl": lambda key, x, m, q: ej.elbo_analytic_kl(key, x, m.log_likelihood, q, m.prior, num_samples=4),
    "elbo_entropy": lambda key, x, m, q: ej.elbo_entropy(key, x, m.log_joint, q, num_samples=4),
}


def _check_all(dtype):
    model = exact.GaussianToy.random(jax.random.key(0), dim=5, dtype=dtype)
    data = model.sample(jax.random.key(1), 3)[0]

    for name, estimator in SCALAR_ESTIMATORS.items():

        def objective(mean, key, x):
            q = distrax.MultivariateNormalDiag(mean, jnp.ones_like(mean))
            return estimator(key, x, model, q)

        mean = jnp.zeros(5, dtype)
        eager = objective(mean, jax.random.key(2), data[0])
        jitted = jax.jit(objective)(mean, jax.random.key(2), data[0])
        assert eager.shape == () and eager.dtype == dtype, (name, eager.dtype)
        np.testing.assert_allclose(jitted, eager, rtol=1e-5, err_msg=name)

        over_data = jax.jit(jax.vmap(objective, (None, None, 0)))(mean, jax.random.key(2), data)
        over_keys = jax.jit(jax.vmap(objective, (None, 0, None)))(mean, keys(3, 4), data[0])
        assert over_data.shape == (3,) and over_keys.shape == (4,), name
        np.testing.assert_allclose(over_data[0], eager, rtol=1e-5, err_msg=name)
        assert len(np.unique(np.asarray(over_keys))) == 4, name  # different keys, different samples

        grad = jax.jit(jax.grad(objective))(mean, jax.random.key(2), data[0])
        assert grad.dtype == dtype and np.all(np.isfinite(grad)), name
        # Finite differences agree with the pathwise gradient (same key, so the same noise).
        eps = 1e-3 if dtype == jnp.float32 else 1e-6
        direction = jnp.ones(5, dtype) / jnp.sqrt(5.0).astype(dtype)
        numeric = (objective(mean + eps * direction, jax.random.key(2), data[0])
                   - objective(mean - eps * direction, jax.random.key(2), data[0])) / (2 * eps)
        np.testing.assert_allclose(jnp.dot(grad, direction), numeric, rtol=1e-2 if dtype == jnp.float32 else 1e-6, atol=1e-3, err_msg=name)


def test_float32():
    assert not jax.config.jax_enable_x64
    _check_all(jnp.float32)


def test_float64(x64):
    _check_all(jnp.float64)


def test_jit_does_not_retrace_on_new_data_or_keys():
    model = exact.GaussianToy.random(jax.random.key(0), dim=5)
    traces = []

    @jax.jit
    def bound(key, x):
        traces.append(1)
        return ej.iwae_bound(key, x, model.log_joint, model.posterior(x), num_samples=16, chunk_size=4)

    data = model.sample(jax.random.key(1), 3)[0]
    for i in range(3):
        bound(jax.random.key(i), data[i]).block_until_ready()
    assert len(traces) == 1


def test_raw_uint32_keys_work_too():
    model = exact.GaussianToy.random(jax.random.key(0), dim=5)
    x = model.sample(jax.random.key(1), 1)[0][0]
    value = ej.iwae_bound(jax.random.PRNGKey(0), x, model.log_joint, model.posterior(x), num_samples=3)
    np.testing.assert_allclose(value, model.log_marginal(x), rtol=1e-5)


def test_pytree_latents():
    """A proposal whose sample is a dict of arrays; log_joint receives the dict."""
    model = exact.GaussianToy.random(jax.random.key(0), dim=6)
    x = model.sample(jax.random.key(1), 1)[0][0]
    post = model.posterior(x)

    class SplitProposal:
        def __init__(self, inner):
            self.inner = inner

        def sample_and_log_prob(self, *, seed, sample_shape=()):
            z, log_q = self.inner.sample_and_log_prob(seed=seed, sample_shape=sample_shape)
            return {"head": z[..., :2], "tail": z[..., 2:]}, log_q

        def log_prob(self, z):
            return self.inner.log_prob(jnp.concatenate([z["head"], z["tail"]], -1))

    def log_joint(x, z):
        return model.log_joint(x, jnp.concatenate([z["head"], z["tail"]]))

    value = jax.jit(lambda k: ej.iwae_bound(k, x, log_joint, SplitProposal(post), num_samples=5, chunk_size=2))(jax.random.key(2))
    np.testing.assert_allclose(value, model.log_marginal(x), rtol=1e-5)


def test_proposal_can_be_passed_through_jit_as_an_argument():
    model = exact.GaussianToy.random(jax.random.key(0), dim=5)
    x = model.sample(jax.random.key(1), 1)[0][0]
    f = jax.jit(lambda key, q, m: ej.iwae_bound(key, x, m.log_joint, q, num_samples=4))
    np.testing.assert_allclose(f(jax.random.key(0), model.posterior(x), model), model.log_marginal(x), rtol=1e-5)
