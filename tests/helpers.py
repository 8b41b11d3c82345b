"""Small helpers shared by the tests."""

import jax
import jax.numpy as jnp
import numpy as np


def keys(seed: int, n: int):
    """`n` independent keys."""
    return jax.random.split(jax.random.key(seed), n)


def mean_and_standard_error(values):
    """Sample mean and its standard error (numpy floats)."""
    values = np.asarray(values, dtype=np.float64)
    return values.mean(), values.std(ddof=1) / np.sqrt(values.size)


SE_LIMIT = 4.0


def mean_and_se_along_draws(draws):
    """Mean and standard error over the leading (draws) axis."""
    draws = np.asarray(draws, np.float64)
    return draws.mean(0), draws.std(0, ddof=1) / np.sqrt(draws.shape[0])


def assert_within_se(draws, expected, name, limit=SE_LIMIT):
    """Every component of the draws' mean lies within `limit` standard errors of `expected`."""
    mean, se = mean_and_se_along_draws(draws)
    z = np.abs(mean - np.asarray(expected)) / np.maximum(se, 1e-12)
    assert np.all(z < limit), (name, mean, np.asarray(expected), se)


def truncated_model(theta):
    """z > 0 only: log p(x, z) = log 2 + log N(z; 0, 1) + log N(x; z + theta, 1), and -inf for z <= 0
    (samples of weight 0 where a proposal puts mass on z <= 0)."""
    def log_joint(x, z):
        value = jnp.log(2.0) + jax.scipy.stats.norm.logpdf(z) + jax.scipy.stats.norm.logpdf(x - z - theta)
        return jnp.where(z > 0, value, -jnp.inf)
    return log_joint
