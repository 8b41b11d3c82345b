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
