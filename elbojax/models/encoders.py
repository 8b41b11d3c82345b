r"""Amortised Gaussian proposals $q_\phi(z \mid x)$: an MLP maps one input to a diagonal Gaussian."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import distrax
import jax
import jax.numpy as jnp
from flax import nnx

from elbojax import _checks
from elbojax._keys import normal
from elbojax.diagnostics import kl_per_dimension
from elbojax.models._layers import LOG_2PI, MLP, ONE_POINT, check_choice, check_shape, linear

SCALE_TRANSFORMS = ("exp", "softplus")


class GaussianMLPEncoder(nnx.Module):
    r"""$q_\phi(z \mid x) = \mathcal{N}\big(\mu_\phi(x), \mathrm{diag}\,\sigma_\phi(x)^2\big)$ from an MLP.

    $h = $ MLP$(x)$ (affine layers each followed by `activation`), then two affine heads:
    $\mu = W_\mu h + b_\mu$ and $\sigma = t(W_\sigma h + b_\sigma)$, with $t = \exp$ (the IWAE
    paper's choice, the default) or $t = \mathrm{softplus}$ (`scale_transform="softplus"`,
    which grows linearly rather than exponentially for large outputs). Kernels are
    Glorot-uniform and biases zero, as in the IWAE code. The defaults are the IWAE paper's
    784-200-200-(2x50) tanh encoder once `data_dim=784, latent_dim=50`.

    The class is any conditional diagonal Gaussian: `TwoLayerVAE` uses it for $q(z_2 \mid z_1)$
    and for the generative layer $p(z_1 \mid z_2)$ too (there "data" is the conditioning input).

    Args:
      data_dim: size of the input $x$ (one data point has shape `(data_dim,)`).
      latent_dim: size of $z$.
      hidden: widths of the hidden layers; `()` for an affine encoder.
      activation: the elementwise non-linearity after each hidden layer.
      scale_transform: `"exp"` or `"softplus"`, the map from the scale head to $\sigma > 0$.
      rngs: the initialisation randomness (only used here, at construction).
      param_dtype: dtype of the parameters.

    Calling it on one `x` of shape `(data_dim,)` returns a `distrax.MultivariateNormalDiag`
    with event shape `(latent_dim,)`; `loc_and_scale(x)` returns $(\mu, \sigma)$.

    References:
      Kingma & Welling 2014, https://arxiv.org/abs/1312.6114; Burda, Grosse & Salakhutdinov
      2016, https://arxiv.org/abs/1509.00519 (architecture and initialisation).
    """

    def __init__(
        self,
        data_dim: int,
        latent_dim: int,
        hidden: Sequence[int] = (200, 200),
        activation: Callable = jnp.tanh,
        *,
        scale_transform: str = "exp",
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        self.data_dim = _checks.check_positive_int(data_dim, "data_dim")
        self.latent_dim = _checks.check_positive_int(latent_dim, "latent_dim")
        self.scale_transform = check_choice(scale_transform, SCALE_TRANSFORMS, "scale_transform")
        self.trunk = MLP(self.data_dim, hidden, activation, rngs=rngs, param_dtype=param_dtype)
        self.loc_head = linear(self.trunk.out_dim, self.latent_dim, rngs=rngs, param_dtype=param_dtype)
        self.scale_head = linear(self.trunk.out_dim, self.latent_dim, rngs=rngs, param_dtype=param_dtype)

    def loc_and_scale(self, x):
        r"""$(\mu_\phi(x), \sigma_\phi(x))$, each of shape `(latent_dim,)`, for one `x` of shape `(data_dim,)`."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        h = self.trunk(x)
        raw_scale = self.scale_head(h)
        scale = jnp.exp(raw_scale) if self.scale_transform == "exp" else jax.nn.softplus(raw_scale)
        return self.loc_head(h), scale

    def __call__(self, x) -> distrax.MultivariateNormalDiag:
        r"""$q_\phi(z \mid x)$ for one `x` of shape `(data_dim,)`."""
        return MultivariateNormalDiag(*self.loc_and_scale(x))


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
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
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
            if shape == loc.shape:
                return jnp.sum(kl_per_dimension(loc, scale, other_loc, other_scale), axis=-1)
        return super().kl_divergence(other_dist, **kwargs)

    def _sample_n(self, key, n):
        """What `sample` draws: the same noise as `sample_and_log_prob` for the same key and shape."""
        noise = normal(key, (n,) + self.batch_shape + self.event_shape, self.loc.dtype)
        return self.loc + self.scale_diag * noise
