r"""Decoders $p_\theta(x \mid z)$: an MLP maps one latent sample to the parameters of the likelihood.

A decoder returns the likelihood's parameters, not a distribution object, so that the
log-likelihood can be the fused form of `elbojax.models.likelihoods` (see there why that matters).
Each decoder names its likelihood in the class attribute `likelihood`, which `VAE` reads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax.numpy as jnp
from flax import nnx

from elbojax import _checks
from elbojax.models._layers import MLP, ONE_SAMPLE, check_shape, linear, set_bias


class BernoulliMLPDecoder(nnx.Module):
    r"""Bernoulli logits $\ell_\theta(z)$ for binary data, $p_\theta(x_i = 1 \mid z) = \sigma(\ell_i)$ independently.

    $h = $ MLP$(z)$, then $\ell = W h + b$. Kernels are Glorot-uniform; the output bias $b$ is
    zero, or `output_bias` (e.g. `bias_from_data_mean(train_mean)`, as the IWAE code does).
    The defaults are the IWAE paper's 50-200-200-784 tanh decoder with `latent_dim=50,
    data_dim=784`.

    Args:
      latent_dim: size of $z$.
      data_dim: size of $x$.
      hidden: widths of the hidden layers.
      activation: the non-linearity after each hidden layer.
      rngs: the initialisation randomness.
      output_bias: optional initial output bias, shape `(data_dim,)`.
      param_dtype: dtype of the parameters.

    Calling it on one `z` of shape `(latent_dim,)` returns the logits, shape `(data_dim,)`;
    score them with `bernoulli_log_likelihood(x, logits)`.
    """

    likelihood = "bernoulli"

    def __init__(
        self,
        latent_dim: int,
        data_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: Callable = jnp.tanh,
        *,
        rngs: nnx.Rngs,
        output_bias=None,
        param_dtype=jnp.float32,
    ):
        self.latent_dim = _checks.check_positive_int(latent_dim, "latent_dim")
        self.data_dim = _checks.check_positive_int(data_dim, "data_dim")
        self.trunk = MLP(self.latent_dim, hidden, activation, rngs=rngs, param_dtype=param_dtype)
        self.logits_head = linear(self.trunk.out_dim, self.data_dim, rngs=rngs, param_dtype=param_dtype)
        if output_bias is not None:
            set_bias(self.logits_head, output_bias, "output_bias")

    def __call__(self, z):
        """The logits, shape `(data_dim,)`, for one `z` of shape `(latent_dim,)`."""
        check_shape(z, (self.latent_dim,), "z", ONE_SAMPLE)
        return self.logits_head(self.trunk(z))


class GaussianMLPDecoder(nnx.Module):
    r"""$p_\theta(x \mid z) = \mathcal{N}\big(\mu_\theta(z), \mathrm{diag}\,\sigma^2\big)$ for real-valued data.

    $h = $ MLP$(z)$, $\mu = W_\mu h + b_\mu$, and either a learned $\log\sigma_\theta(z) = W_\sigma h
    + b_\sigma$ (as the IWAE code's continuous decoder, whose $\sigma$ is the exp of an affine
    head) or, with `fixed_scale`, the same $\sigma$ for every pixel and every $z$.

    Args:
      latent_dim, data_dim, hidden, activation, rngs, param_dtype: as `BernoulliMLPDecoder`.
      fixed_scale: `None` to learn $\sigma(z)$; a positive float for a fixed $\sigma$.
      output_bias: optional initial bias of the mean head (e.g. the training mean).

    Calling it on one `z` returns `(mean, log_scale)`: `mean` of shape `(data_dim,)` and
    `log_scale` of shape `(data_dim,)` (learned) or `()` (fixed); score them with
    `gaussian_log_likelihood(x, mean, log_scale)`.
    """

    likelihood = "gaussian"

    def __init__(
        self,
        latent_dim: int,
        data_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: Callable = jnp.tanh,
        *,
        rngs: nnx.Rngs,
        fixed_scale: float | None = None,
        output_bias=None,
        param_dtype=jnp.float32,
    ):
        self.latent_dim = _checks.check_positive_int(latent_dim, "latent_dim")
        self.data_dim = _checks.check_positive_int(data_dim, "data_dim")
        if fixed_scale is not None:  # None: learned
            fixed_scale = _checks.check_finite_positive(fixed_scale, "fixed_scale")
        self.fixed_log_scale = None if fixed_scale is None else math.log(fixed_scale)
        self.trunk = MLP(self.latent_dim, hidden, activation, rngs=rngs, param_dtype=param_dtype)
        self.mean_head = linear(self.trunk.out_dim, self.data_dim, rngs=rngs, param_dtype=param_dtype)
        self.log_scale_head = (
            None if fixed_scale is not None
            else linear(self.trunk.out_dim, self.data_dim, rngs=rngs, param_dtype=param_dtype)
        )
        if output_bias is not None:
            set_bias(self.mean_head, output_bias, "output_bias")

    def __call__(self, z):
        """`(mean, log_scale)` for one `z` of shape `(latent_dim,)`."""
        check_shape(z, (self.latent_dim,), "z", ONE_SAMPLE)
        h = self.trunk(z)
        mean = self.mean_head(h)
        if self.log_scale_head is None:
            return mean, jnp.asarray(self.fixed_log_scale, mean.dtype)
        return mean, self.log_scale_head(h)
