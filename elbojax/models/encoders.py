r"""Amortised Gaussian proposals $q_\phi(z \mid x)$: an MLP maps one input to a diagonal Gaussian."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import distrax
import jax
import jax.numpy as jnp
from flax import nnx

from elbojax import _checks
from elbojax.models._layers import MLP, ONE_POINT, check_choice, check_shape, linear
from elbojax.proposals import MultivariateNormalDiag  # noqa: F401 (also importable from here, as before)

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


