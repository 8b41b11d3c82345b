r"""Priors $p(z)$ over a latent vector of size `latent_dim`, as Flax NNX modules.

Each prior offers

* `log_prob(z)`: $\log p(z)$ for `z` of shape `(..., latent_dim)`, returning shape `(...)`,
  written directly (a logsumexp over components for the mixtures) so that it is cheap inside a
  `log_joint` evaluated for thousands of samples;
* `sample(key, num_samples)`: `(num_samples, latent_dim)` draws;
* `distribution()`: the same prior as a distrax distribution (for `elbo_analytic_kl` and for
  anything else that wants one). `log_prob` agrees with `distribution().log_prob`.

A mixture prior has no closed-form KL against a Gaussian $q$, so with it the ELBO's KL term is
estimated by Monte Carlo (see `VAE.elbo`).
"""

from __future__ import annotations

import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elbojax import _checks
from elbojax.models._layers import LOG_2PI, check_last_axis, diag_normal_log_density
from elbojax.models.encoders import GaussianMLPEncoder


def _mixture_log_prob(z, log_weights, locs, log_scales):
    r"""$\log \sum_c \pi_c \mathcal{N}(z; \mu_c, \mathrm{diag}\,\sigma_c^2)$ for `z` `(..., d)`; components `(C, d)`."""
    component = diag_normal_log_density(z[..., None, :], locs, log_scales)  # (..., C)
    return jax.nn.logsumexp(component + log_weights, axis=-1)


def _diag_mixture(logits, locs, scales) -> distrax.MixtureSameFamily:
    return distrax.MixtureSameFamily(
        mixture_distribution=distrax.Categorical(logits=logits),
        components_distribution=distrax.MultivariateNormalDiag(locs, scales),
    )


class StandardNormalPrior(nnx.Module):
    r"""$p(z) = \mathcal{N}(0, I_d)$; no parameters. Has a closed-form KL against a diagonal Gaussian $q$.

    Args:
      latent_dim: $d$.
    """

    def __init__(self, latent_dim: int):
        self.latent_dim = _checks.check_positive_int(latent_dim, "latent_dim")

    def log_prob(self, z):
        r"""$-\tfrac12 \sum_i (z_i^2 + \log 2\pi)$ for `z` of shape `(..., latent_dim)`."""
        z = jnp.asarray(z)
        check_last_axis(z, self.latent_dim, "z")
        return -0.5 * jnp.sum(z**2 + LOG_2PI, axis=-1)

    def sample(self, key, num_samples: int):
        """`(num_samples, latent_dim)` standard normal draws."""
        num_samples = _checks.check_positive_int(num_samples, "num_samples")
        return jax.random.normal(key, (num_samples, self.latent_dim))

    def distribution(self) -> distrax.MultivariateNormalDiag:
        """$\\mathcal{N}(0, I)$ as a `distrax.MultivariateNormalDiag` (default float dtype)."""
        zeros = jnp.zeros(self.latent_dim)
        return distrax.MultivariateNormalDiag(zeros, jnp.ones_like(zeros))


class MixturePrior(nnx.Module):
    r"""A learned mixture of diagonal Gaussians, $p(z) = \sum_c \pi_c \mathcal{N}(z; \mu_c, \mathrm{diag}\,\sigma_c^2)$.

    Parameters: `logits` `(C,)` with $\pi = \mathrm{softmax}$(`logits`), initially 0 (equal
    weights); `locs` `(C, d)`, initially $\mathcal{N}(0, 1)$ draws (distinct components);
    `log_scales` `(C, d)` with $\sigma = \exp$(`log_scales`), initially 0.

    Args:
      latent_dim: $d$.
      num_components: $C$.
      rngs: the initialisation randomness (for `locs`).
      param_dtype: dtype of the parameters.
    """

    def __init__(self, latent_dim: int, num_components: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.latent_dim = _checks.check_positive_int(latent_dim, "latent_dim")
        self.num_components = _checks.check_positive_int(num_components, "num_components")
        shape = (self.num_components, self.latent_dim)
        self.logits = nnx.Param(jnp.zeros(self.num_components, param_dtype))
        self.locs = nnx.Param(jax.random.normal(rngs.params(), shape, param_dtype))
        self.log_scales = nnx.Param(jnp.zeros(shape, param_dtype))

    def log_prob(self, z):
        """$\\log p(z)$ for `z` of shape `(..., latent_dim)`, by a logsumexp over the components."""
        z = jnp.asarray(z)
        check_last_axis(z, self.latent_dim, "z")
        return _mixture_log_prob(z, jax.nn.log_softmax(self.logits[...]), self.locs[...], self.log_scales[...])

    def sample(self, key, num_samples: int):
        """`(num_samples, latent_dim)` draws: a component, then its Gaussian."""
        num_samples = _checks.check_positive_int(num_samples, "num_samples")
        return self.distribution().sample(seed=key, sample_shape=num_samples)

    def distribution(self) -> distrax.MixtureSameFamily:
        """The prior as a `distrax.MixtureSameFamily` of `MultivariateNormalDiag` components."""
        return _diag_mixture(self.logits[...], self.locs[...], jnp.exp(self.log_scales[...]))


def _broadcasts_to(shape: tuple[int, ...], target: tuple[int, ...]) -> bool:
    """Whether an array of `shape` broadcasts to `target` without changing it."""
    try:
        return np.broadcast_shapes(shape, target) == target
    except ValueError:
        return False


class VampPrior(nnx.Module):
    r"""The VampPrior, the encoder's mixture at learned pseudo-inputs: $p(z) = \frac1K \sum_{k=1}^K q_\phi(z \mid u_k)$.

    The components are the encoder's Gaussians at $K$ learned pseudo-inputs $u_k$ (parameter
    `pseudo_inputs`, shape `(K, data_dim)`), so the prior shares the encoder's parameters
    $\phi$: it holds a reference to the encoder, and `nnx.split` of a `VAE` holding both keeps
    one copy of $\phi$. Gradients of the ELBO reach $\phi$ through both $q$ and the prior.

    The pseudo-inputs start as $\mathcal{N}$(`init_mean`, `init_std`$^2$) draws (the authors'
    code draws them around $\pm 0.05$ with std 0.01; initialising them from $K$ training points,
    `prior.pseudo_inputs.set_value(x_train[:K])`, was the paper's other option). They are left
    unconstrained: the authors' code passes them through a hardtanh to $[0, 1]$, which would
    zero the gradient of any pseudo-input pixel outside that range.

    Args:
      encoder: the VAE's `GaussianMLPEncoder` (anything with `data_dim`, `latent_dim` and
        `loc_and_scale(x) -> (loc, scale)` for one `x`).
      num_components: $K$.
      rngs: the initialisation randomness (for the pseudo-inputs).
      init_mean, init_std: of the pseudo-inputs' initial values: numbers, or arrays that broadcast
        to `(num_components, data_dim)` (one per pixel, say).
      param_dtype: dtype of the pseudo-inputs (whatever the dtype of `init_mean` and `init_std`).

    References:
      Tomczak & Welling, *VAE with a VampPrior*, AISTATS 2018, https://arxiv.org/abs/1705.07120
    """

    def __init__(
        self,
        encoder: GaussianMLPEncoder,
        num_components: int,
        *,
        rngs: nnx.Rngs,
        init_mean: float = 0.05,
        init_std: float = 0.01,
        param_dtype=jnp.float32,
    ):
        for attribute in ("data_dim", "latent_dim", "loc_and_scale"):
            if not hasattr(encoder, attribute):
                raise TypeError(
                    f"`encoder` must have `data_dim`, `latent_dim` and `loc_and_scale` (a "
                    f"GaussianMLPEncoder); {type(encoder).__name__} has no `{attribute}`."
                )
        self.encoder = encoder
        self.latent_dim = encoder.latent_dim
        self.num_components = _checks.check_positive_int(num_components, "num_components")
        shape = (self.num_components, encoder.data_dim)
        for name, value, least in (("init_mean", init_mean, -math.inf), ("init_std", init_std, 0.0)):
            values = np.asarray(value)  # a number, one per pixel, or one per pseudo-input pixel
            if not jnp.issubdtype(values.dtype, jnp.number) or jnp.issubdtype(values.dtype, jnp.complexfloating):
                raise TypeError(f"`{name}` must be a real number or array, got {value!r}.")
            if not _broadcasts_to(values.shape, shape):
                raise ValueError(
                    f"`{name}` must broadcast to the pseudo-inputs' shape (num_components, data_dim) = {shape} "
                    f"(a number, or one per pixel), got shape {values.shape}."
                )
            if not (np.all(np.isfinite(values)) and np.all(values >= least)):
                raise ValueError(f"`{name}` must be finite{' and >= 0' if least == 0 else ''}, got {value}.")
        noise = jax.random.normal(rngs.params(), shape, param_dtype)
        # In `param_dtype`, whatever the dtype of `init_mean` and `init_std`.
        self.pseudo_inputs = nnx.Param(jnp.asarray(init_mean, param_dtype) + jnp.asarray(init_std, param_dtype) * noise)

    def components(self):
        r"""$(\mu_\phi(u_k), \sigma_\phi(u_k))_{k=1}^K$, each of shape `(K, latent_dim)`."""
        return jax.vmap(self.encoder.loc_and_scale)(self.pseudo_inputs[...])

    def log_prob(self, z):
        r"""$\log \frac1K \sum_k q_\phi(z \mid u_k)$ for `z` of shape `(..., latent_dim)`.

        The components do not depend on `z`: vmapped over samples (as the estimators do) the
        encoder runs once on the pseudo-inputs, not once per sample.
        """
        z = jnp.asarray(z)
        check_last_axis(z, self.latent_dim, "z")
        locs, scales = self.components()
        log_weights = jnp.full(self.num_components, -math.log(self.num_components), locs.dtype)
        return _mixture_log_prob(z, log_weights, locs, jnp.log(scales))

    def sample(self, key, num_samples: int):
        """`(num_samples, latent_dim)` draws: a uniform pseudo-input $u_k$, then $z \\sim q_\\phi(z \\mid u_k)$."""
        num_samples = _checks.check_positive_int(num_samples, "num_samples")
        return self.distribution().sample(seed=key, sample_shape=num_samples)

    def distribution(self) -> distrax.MixtureSameFamily:
        """The prior as a `distrax.MixtureSameFamily` with equal weights."""
        locs, scales = self.components()
        return _diag_mixture(jnp.zeros(self.num_components, locs.dtype), locs, scales)
