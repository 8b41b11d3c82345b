r"""The IWAE paper's model with two stochastic layers, and its hierarchical proposal.

Generative model: $p(z_2) = \mathcal{N}(0, I)$, $p_\theta(z_1 \mid z_2)$ and $p_\theta(x \mid z_1)$;
proposal: $q_\phi(z_1, z_2 \mid x) = q_\phi(z_1 \mid x)\, q_\phi(z_2 \mid z_1)$, sampled
ancestrally and reparameterised at both layers, so every pathwise gradient estimator
(`"reparam"`, `"stl"`, `"dreg"`) applies. A latent sample is the pytree `{"z1": (d1,), "z2": (d2,)}`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elbojax import _checks
from elbojax.estimators import elbo as mc_elbo
from elbojax.models._layers import LOG_2PI, ONE_POINT, ONE_SAMPLE, check_shape, diag_normal_log_density, flat_map
from elbojax.models.decoders import BernoulliMLPDecoder
from elbojax.models.encoders import GaussianMLPEncoder
from elbojax.models.likelihoods import bernoulli_log_likelihood
from elbojax.models.vae import resolve_kl


class HierarchicalProposal:
    r"""$q(z_1, z_2) = q(z_1)\, q(z_2 \mid z_1)$ with distrax's interface; samples are `{"z1": ..., "z2": ...}`.

    Args:
      first: $q(z_1)$, a distrax distribution with event shape `(d1,)`.
      conditional: `conditional(z1) -> ` $q(z_2 \mid z_1)$, a distrax distribution with event
        shape `(d2,)`, for ONE `z1` of shape `(d1,)` (e.g. a `GaussianMLPEncoder`).

    `sample_and_log_prob(seed=, sample_shape=)` draws $z_1 \sim q(z_1)$, then
    $z_2 \sim q(z_2 \mid z_1)$, both reparameterised when the two distributions are, and returns
    `({"z1": sample_shape + (d1,), "z2": sample_shape + (d2,)}, log_q` of shape `sample_shape)`.
    `log_prob(z)` $= \log q(z_1) + \log q(z_2 \mid z_1)$ for such a dict.

    It is a plain Python object, not a pytree: build it inside the jitted function (as
    `TwoLayerVAE.proposal(x)` does) rather than passing it in or returning it.
    """

    def __init__(self, first, conditional: Callable):
        self.first = first
        self.conditional = conditional

    def pathwise_parts(self) -> tuple:
        r"""$q(z_1)$ and $q(z_2 \mid z_1)$ (built abstractly, no computation), for the check that
        refuses a pathwise gradient through a proposal that cannot carry one (a mixture in a layer)."""
        return self.first, jax.eval_shape(self.conditional, self._z1_probe())

    def _z2_shape(self) -> tuple[int, ...]:
        """The shape of one $z_2$, from an abstract draw (any distribution that samples: a
        `distrax.Transformed` layer has no `event_shape` when built abstractly)."""
        draw = lambda z1: self.conditional(z1).sample(seed=jax.random.key(0))
        return tuple(jax.eval_shape(draw, self._z1_probe()).shape)

    def _z1_probe(self) -> jax.ShapeDtypeStruct:
        """One abstract $z_1$."""
        return jax.ShapeDtypeStruct(tuple(self.first.event_shape), self.first.dtype)

    def _conditional_sample(self, z1, key):
        return self.conditional(z1).sample_and_log_prob(seed=key)

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        if isinstance(seed, int):  # as distrax accepts
            seed = jax.random.PRNGKey(seed)
        sample_shape = _checks.sample_shape(sample_shape)  # an int (Python, NumPy, 0-d JAX) or a sequence
        key_first, key_second = jax.random.split(seed)
        z1, log_q1 = self.first.sample_and_log_prob(seed=key_first, sample_shape=sample_shape)
        keys = jax.random.split(key_second, sample_shape) if sample_shape else key_second
        z2, log_q2 = flat_map(self._conditional_sample, sample_shape, z1, keys)
        return {"z1": z1, "z2": z2}, log_q1 + log_q2

    def sample(self, *, seed, sample_shape=()):
        return self.sample_and_log_prob(seed=seed, sample_shape=sample_shape)[0]

    def log_prob(self, value):
        if not isinstance(value, dict) or set(value) != {"z1", "z2"}:
            raise ValueError(f"`value` must be a dict with keys 'z1' and 'z2', got {_describe(value)}.")
        z1, z2 = value["z1"], value["z2"]
        for name, event, got in (("z1", tuple(self.first.event_shape), jnp.shape(z1)), ("z2", self._z2_shape(), jnp.shape(z2))):
            if len(got) < len(event) or got[len(got) - len(event):] != event:
                raise ValueError(f"`value[{name!r}]` must have shape sample_shape + {event} (its layer's event shape), got {got}.")
        batch_shape = jnp.shape(z1)[:-1]
        if jnp.shape(z2)[:-1] != batch_shape:
            raise ValueError(f"'z1' and 'z2' must share their batch shape, got {jnp.shape(z1)} and {jnp.shape(z2)}.")
        log_q2 = flat_map(lambda a, b: self.conditional(a).log_prob(b), batch_shape, z1, z2)
        return self.first.log_prob(z1) + log_q2


def _describe(value) -> str:
    if isinstance(value, dict):
        return f"a dict with keys {sorted(value)}"
    return f"{type(value).__name__} of shape {jnp.shape(value)}" if hasattr(value, "shape") else type(value).__name__


class TwoLayerVAE(nnx.Module):
    r"""The IWAE paper's two-stochastic-layer VAE for binary data.

    $$p_\theta(x, z_1, z_2) = \mathcal{N}(z_2; 0, I)\; \mathcal{N}\big(z_1; \mu_\theta(z_2),
      \sigma_\theta(z_2)^2\big)\; \mathrm{Bernoulli}\big(x; \sigma(\ell_\theta(z_1))\big),$$
    $$q_\phi(z_1, z_2 \mid x) = \mathcal{N}\big(z_1; \mu_\phi(x), \sigma_\phi(x)^2\big)\;
      \mathcal{N}\big(z_2; \mu_\phi(z_1), \sigma_\phi(z_1)^2\big).$$

    Submodules (each Gaussian is a `GaussianMLPEncoder`, the last layer a `BernoulliMLPDecoder`):
    `q_z1` $= q(z_1 \mid x)$, `q_z2` $= q(z_2 \mid z_1)$, `p_z1` $= p(z_1 \mid z_2)$, `p_x` $= p(x \mid z_1)$.
    The defaults are the architecture of the paper's code: `latent_dims=(100, 50)`,
    $q$: 784-200-200-100 and 100-100-100-50, $p$: 50-100-100-100 and 100-200-200-784, tanh,
    Gaussian scales by exp.

    Args:
      data_dim: size of $x$.
      latent_dims: `(d1, d2)`.
      hidden_q: hidden widths of `(q_z1, q_z2)`.
      hidden_p: hidden widths of `(p_z1, p_x)`, in generative order.
      activation: the non-linearity of every hidden layer.
      rngs: the initialisation randomness.
      output_bias: optional initial bias of `p_x`'s logits (`bias_from_data_mean`).
      param_dtype: dtype of the parameters.

    A latent sample is `{"z1": (d1,), "z2": (d2,)}`; `proposal(x)` is a `HierarchicalProposal`.

    References:
      Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016, sec. 5,
      https://arxiv.org/abs/1509.00519 (code: github.com/yburda/iwae, `experiments.py`).
    """

    def __init__(
        self,
        data_dim: int = 784,
        latent_dims: tuple[int, int] = (100, 50),
        *,
        hidden_q: tuple[Sequence[int], Sequence[int]] = ((200, 200), (100, 100)),
        hidden_p: tuple[Sequence[int], Sequence[int]] = ((100, 100), (200, 200)),
        activation: Callable = jnp.tanh,
        rngs: nnx.Rngs,
        output_bias=None,
        param_dtype=jnp.float32,
    ):
        d1, d2 = _pair(latent_dims, "latent_dims")
        hidden_q1, hidden_q2 = _pair(hidden_q, "hidden_q")
        hidden_p1, hidden_px = _pair(hidden_p, "hidden_p")
        common = dict(activation=activation, rngs=rngs, param_dtype=param_dtype)
        self.q_z1 = GaussianMLPEncoder(data_dim, d1, hidden_q1, **common)
        self.q_z2 = GaussianMLPEncoder(d1, d2, hidden_q2, **common)
        self.p_z1 = GaussianMLPEncoder(d2, d1, hidden_p1, **common)
        self.p_x = BernoulliMLPDecoder(d1, data_dim, hidden_px, output_bias=output_bias, **common)

    @property
    def data_dim(self) -> int:
        return self.q_z1.data_dim

    @property
    def latent_dims(self) -> tuple[int, int]:
        return self.q_z1.latent_dim, self.q_z2.latent_dim

    def proposal(self, x) -> HierarchicalProposal:
        r"""$q_\phi(z_1 \mid x)\, q_\phi(z_2 \mid z_1)$ for one `x` of shape `(data_dim,)`."""
        return HierarchicalProposal(self.q_z1(x), self.q_z2)

    def _unpack(self, z):
        if not isinstance(z, dict) or set(z) != {"z1", "z2"}:
            raise ValueError(
                f"`z` must be a dict {{'z1': ({self.latent_dims[0]},), 'z2': ({self.latent_dims[1]},)}} "
                f"(one sample), got {_describe(z)}."
            )
        check_shape(z["z1"], (self.latent_dims[0],), "z['z1']", ONE_SAMPLE)
        check_shape(z["z2"], (self.latent_dims[1],), "z['z2']", ONE_SAMPLE)
        return z["z1"], z["z2"]

    def log_likelihood(self, x, z):
        r"""$\log p_\theta(x \mid z_1)$ for one `x` and one sample `z` (a dict): a scalar."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        z1, _ = self._unpack(z)
        return bernoulli_log_likelihood(x, self.p_x(z1))

    def log_prior(self, z):
        r"""$\log p(z_1, z_2) = \log p_\theta(z_1 \mid z_2) + \log \mathcal{N}(z_2; 0, I)$: a scalar."""
        z1, z2 = self._unpack(z)
        loc, scale = self.p_z1.loc_and_scale(z2)
        return diag_normal_log_density(z1, loc, jnp.log(scale)) - 0.5 * jnp.sum(z2**2 + LOG_2PI)

    def log_joint(self, x, z):
        r"""$\log p_\theta(x, z_1, z_2)$ for one `x` and one sample `z = {"z1": ..., "z2": ...}`: a scalar."""
        return self.log_likelihood(x, z) + self.log_prior(z)

    def decode_mean(self, z):
        r"""$\mathbb{E}[x \mid z_1] = \sigma(\ell_\theta(z_1))$, shape `(data_dim,)`."""
        z1, _ = self._unpack(z)
        return jax.nn.sigmoid(self.p_x(z1))

    def sample_prior(self, key, num_samples: int):
        r"""`(z, means)`: `z` drawn ancestrally from $p(z_2)\,p_\theta(z_1 \mid z_2)$, and $\mathbb{E}[x \mid z_1]$.

        `z` is a dict of `(num_samples, d1)` and `(num_samples, d2)` arrays; `means` has shape
        `(num_samples, data_dim)`.
        """
        num_samples = _checks.check_positive_int(num_samples, "num_samples")
        key_z2, key_z1 = jax.random.split(key)
        z2 = jax.random.normal(key_z2, (num_samples, self.latent_dims[1]))
        keys = jax.random.split(key_z1, num_samples)
        z1 = jax.vmap(lambda z2_k, k: self.p_z1(z2_k).sample(seed=k))(z2, keys)
        z = {"z1": z1, "z2": z2}
        return z, jax.vmap(self.decode_mean)(z)

    def reconstruct(self, key, x):
        r"""$\mathbb{E}[x \mid z_1]$ at one $z \sim q_\phi(z_1, z_2 \mid x)$, shape `(data_dim,)`."""
        return self.decode_mean(self.proposal(x).sample(seed=key))

    has_analytic_kl = False  # q(z1, z2 | x) against p(z1, z2): no closed form

    def kl_mode(self, kl: str = "auto", *, gradient: str = "reparam") -> str:
        """Always `"monte_carlo"`; `kl="analytic"` is a `ValueError` (no closed form)."""
        return resolve_kl(kl, gradient, False, "TwoLayerVAE", "(both are hierarchical: p(z1 | z2) and q(z2 | z1))")

    def elbo(self, key, x, *, num_samples: int = 1, kl: str = "auto", gradient: str = "reparam", chunk_size=None):
        r"""The Monte Carlo ELBO $\frac1K \sum_k \log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)$ (`elbojax.elbo`).

        Args: as `VAE.elbo`; `kl` may only be `"auto"` or `"monte_carlo"`.
        """
        self.kl_mode(kl, gradient=gradient)
        return mc_elbo(
            key, x, self.log_joint, self.proposal(x),
            num_samples=num_samples, chunk_size=chunk_size, gradient=gradient,
        )


def _pair(value, name: str):
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str) or len(value) != 2:
        raise ValueError(f"`{name}` must be a tuple or list of two entries (one per stochastic layer), got {value!r}.")
    return tuple(value)
