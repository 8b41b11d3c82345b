"""Small helpers shared by the tests."""

import jax
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
