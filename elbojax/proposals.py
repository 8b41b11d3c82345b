r"""What elbojax accepts as a proposal $q(z)$, and the few distributions it adds.

A proposal is any object with distrax's interface::

    z, log_q = proposal.sample_and_log_prob(seed=key, sample_shape=())
    log_q = proposal.log_prob(z)

Every distrax distribution qualifies as it is. TensorFlow Probability's JAX substrate names the
first method `experimental_sample_and_log_prob`; `as_proposal` wraps such a distribution in a
thin adapter. The sample `z` may be an array or any pytree of arrays.

`elbo_analytic_kl` also needs a closed-form $\mathrm{KL}(q \,\|\, p)$ and `elbo_entropy` a
closed-form $\mathbb{H}(q)$: `closed_form_kl` and `closed_form_entropy` ask the distribution
for them and raise a `ValueError` that says which pair has none.
"""

from __future__ import annotations

import math
from typing import Any

import distrax
import jax
import jax.numpy as jnp

from elbojax import _checks
from elbojax._keys import normal
from elbojax.diagnostics import _fused_kl_per_dimension

LOG_2PI = math.log(2.0 * math.pi)


@jax.tree_util.register_pytree_node_class
class TFPProposal:
    """Adapts a TFP-on-JAX distribution to distrax's `sample_and_log_prob` interface.

    Args:
      distribution: a `tensorflow_probability.substrates.jax` distribution.
    """

    def __init__(self, distribution: Any):
        self.distribution = distribution

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        return self.distribution.experimental_sample_and_log_prob(
            seed=seed, sample_shape=sample_shape
        )

    def log_prob(self, value):
        return self.distribution.log_prob(value)

    def entropy(self):
        return self.distribution.entropy()

    def kl_divergence(self, other):
        other = other.distribution if isinstance(other, TFPProposal) else other
        return self.distribution.kl_divergence(other)

    def __repr__(self):
        return f"TFPProposal({self.distribution!r})"

    def tree_flatten(self):
        return (self.distribution,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        return cls(*children)


@jax.tree_util.register_pytree_node_class
class FiniteUniform:
    r"""The uniform distribution over a finite set of points, $q(z) = 1/|S|$ for $z \in S$.

    Used by naive Monte Carlo in its classic form,
    $\hat p(x) = |S| \cdot \frac{1}{K}\sum_k p(x, z_k)$ with $z_k \sim \mathrm{Uniform}(S)$.

    Args:
      support: array of shape `(S, *event_shape)`; row `s` is the point $z = $ `support[s]`.

    `log_prob(z)` returns $-\log |S|$ without checking that `z` is in the support: membership
    is a value, and values cannot be checked inside `jax.jit`.
    """

    def __init__(self, support):
        support = jnp.asarray(support)
        if support.ndim < 1 or support.shape[0] < 1:
            raise ValueError(
                f"`support` must have shape (S, *event_shape) with S >= 1, got {support.shape}."
            )
        self.support = support

    @property
    def num_points(self) -> int:
        return self.support.shape[0]

    def _log_q(self, shape):
        dtype = self.support.dtype if jnp.issubdtype(self.support.dtype, jnp.floating) else float
        return jnp.full(shape, -jnp.log(self.num_points), dtype=jnp.result_type(dtype))

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        sample_shape = (int(sample_shape),) if _checks.is_int(sample_shape) else tuple(sample_shape)
        index = jax.random.randint(seed, sample_shape, 0, self.num_points)
        return self.support[index], self._log_q(sample_shape)

    def sample(self, *, seed, sample_shape=()):
        return self.sample_and_log_prob(seed=seed, sample_shape=sample_shape)[0]

    def log_prob(self, value):
        event_shape = self.support.shape[1:]
        shape = jnp.shape(value)
        if len(shape) < len(event_shape) or shape[len(shape) - len(event_shape):] != event_shape:
            raise ValueError(
                f"`value` must end in the support's event shape {event_shape} (the support is "
                f"{self.support.shape}: (S, *event_shape)), got shape {shape}."
            )
        return self._log_q(shape[: len(shape) - len(event_shape)])

    def entropy(self):
        return -self._log_q(())

    def __repr__(self):
        return f"FiniteUniform(num_points={self.num_points}, event_shape={self.support.shape[1:]})"

    def tree_flatten(self):
        return (self.support,), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        obj = object.__new__(cls)
        obj.support = children[0]
        return obj


def as_proposal(distribution: Any, name: str = "proposal"):
    """Return `distribution` in distrax's interface, or raise a `TypeError` that says why not.

    distrax distributions (and anything with `sample_and_log_prob` and `log_prob`) pass through
    unchanged; TFP-on-JAX distributions are wrapped in `TFPProposal`.
    """
    if hasattr(distribution, "sample_and_log_prob") and hasattr(distribution, "log_prob"):
        return distribution
    if hasattr(distribution, "experimental_sample_and_log_prob"):
        return TFPProposal(distribution)
    raise TypeError(
        f"`{name}` must be a distribution with `sample_and_log_prob(seed=..., sample_shape=...)` "
        f"and `log_prob` (a distrax distribution), or a TFP-on-JAX distribution; got "
        f"{type(distribution).__name__}."
    )


def _describe(distribution) -> str:
    inner = getattr(distribution, "distribution", None)
    return type(inner if isinstance(distribution, TFPProposal) else distribution).__name__


def closed_form_kl(proposal, prior):
    r"""$\mathrm{KL}(q \,\|\, p)$ in closed form, or a `ValueError` naming the pair that has none."""
    try:
        return proposal.kl_divergence(prior)
    except (NotImplementedError, AttributeError, TypeError) as error:
        raise ValueError(
            f"No closed-form KL(q || prior) for q = {_describe(proposal)} and prior = "
            f"{_describe(prior)} ({error}). Use `elbo` (Monte Carlo KL) or `elbo_entropy` instead."
        ) from None


def closed_form_entropy(proposal):
    r"""$\mathbb{H}(q)$ in closed form, or a `ValueError` naming the distribution that has none."""
    try:
        return proposal.entropy()
    except (NotImplementedError, AttributeError, TypeError) as error:
        raise ValueError(
            f"No closed-form entropy for q = {_describe(proposal)} ({error}). "
            "Use `elbo` (Monte Carlo) instead."
        ) from None


class MultivariateNormalDiag(distrax.MultivariateNormalDiag):
    r"""A `distrax.MultivariateNormalDiag` (a subclass, the same name) with a direct `sample_and_log_prob`.

    $z = \mu + \sigma \odot \epsilon$, $\epsilon \sim \mathcal N(0, I)$, and
    $\log q(z) = -\sum_j \big(\tfrac12 \epsilon_j^2 + \log \sigma_j + \tfrac12 \log 2\pi\big)$, written
    from the noise. distrax draws through a bijector with an extra sample axis; under the
    estimators' two `vmap`s its gradient reduced over that axis in a slow kernel (on the IWAE
    model, about 6% of a K = 50 training step on CPU). The noise comes from `elbojax._keys.normal`,
    which hashes half as many Threefry blocks as `jax.random.normal` (two draws per block): the
    same distribution, other numbers than distrax's for the same key (`sample` draws the same
    noise as `sample_and_log_prob`); measured 1.5-5% faster on the IWAE model's K = 50 training
    step and K = 5000 evaluation on 2 CPU cores. `kl_divergence` to another diagonal Gaussian
    is one fused sum (below). Every other method is distrax's.
    """

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        if isinstance(seed, int):
            seed = jax.random.PRNGKey(seed)
        shape = _checks.sample_shape(sample_shape)  # an int (Python, NumPy, 0-d JAX) or a sequence
        loc, scale = self.loc, self.scale_diag
        noise = normal(seed, shape + self.batch_shape + self.event_shape, loc.dtype)
        log_prob = -jnp.sum(0.5 * noise**2 + jnp.log(scale) + 0.5 * LOG_2PI, axis=-1)
        return loc + scale * noise, log_prob

    def kl_divergence(self, other_dist, **kwargs):
        r"""$\mathrm{KL}(q \,\|\, p)$; against a diagonal Gaussian $p$, the sum of `kl_per_dimension`.

        $\sum_j \tfrac12 \big(\tfrac{m_j - \mu_j}{\sigma_j}\big)^2 + \tfrac12 (e^{2\delta_j} - 1) - \delta_j$,
        $\delta_j = \log s_j - \log \sigma_j$: one elementwise expression and one sum, where
        distrax's general form (through the scale operators) takes three sums, and `expm1`
        keeps nearly collapsed dimensions accurate. The one-sample ELBO training step of the IWAE
        model reports this KL each step: 0.3-1.3% faster per call in 4 of 4 runs of 61 paired
        rounds (2 CPU cores). Any other $p$ (or shapes that do not broadcast to this one's) goes
        to distrax.
        """
        if isinstance(other_dist, distrax.MultivariateNormalDiag) and not kwargs:
            loc, scale = self.loc, self.scale_diag
            other_loc, other_scale = other_dist.loc, other_dist.scale_diag
            try:
                shape = jnp.broadcast_shapes(loc.shape, other_loc.shape, other_scale.shape)
            except ValueError:
                shape = None  # distrax says what is wrong
            # The same event shape (as distrax requires): a (1,) prior broadcast over d dimensions
            # would be another prior.
            if shape == loc.shape and tuple(other_dist.event_shape) == tuple(self.event_shape):
                return jnp.sum(_fused_kl_per_dimension(loc, scale, other_loc, other_scale), axis=-1)
        return super().kl_divergence(other_dist, **kwargs)

    def _sample_n(self, key, n):
        """What `sample` draws: the same noise as `sample_and_log_prob` for the same key and shape."""
        noise = normal(key, (n,) + self.batch_shape + self.event_shape, self.loc.dtype)
        return self.loc + self.scale_diag * noise
