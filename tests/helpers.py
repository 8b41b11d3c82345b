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


def interrupt_fetching(monkeypatch, call: int, signum=None):
    """Make `train.fit`'s batch fetch raise KeyboardInterrupt (as Ctrl-C would) on its `call`-th
    call, or send this process the signal `signum` then.

    Returns a function that puts the real fetch back.
    """
    import os

    from elbojax import train

    real, calls = train._batches_for, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            if signum is None:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "_batches_for", interrupted)
    return lambda: monkeypatch.setattr(train, "_batches_for", real)


class KLOfXOnly:
    """A VAE seen through `analytic_kl(x)` alone, with no `kl_mode` and no `per_dimension` (as
    `train.objective` documents a custom model may be); `has_analytic_kl` only if asked. A mixin:
    subclass it with `nnx.Module` to train it."""

    def __init__(self, vae, *, has_analytic_kl: bool):
        self.vae = vae
        self.decoder, self.likelihood, self.data_dim = vae.decoder, vae.likelihood, np.int64(vae.data_dim)
        if has_analytic_kl:
            self.has_analytic_kl = True

    def proposal(self, x):
        return self.vae.proposal(x)

    def log_prior(self, z):
        return self.vae.log_prior(z)

    def log_likelihood(self, x, z):
        return self.vae.log_likelihood(x, z)

    def log_joint(self, x, z):
        return self.vae.log_joint(x, z)

    def analytic_kl(self, x):
        return self.vae.analytic_kl(x)
