r"""Partially observed data: bounds on $\log p(x_{\mathrm{obs}})$, training with missing entries, imputation.

A data point $x$ comes with an **observation mask** $m$: a bool array of $x$'s shape, `True`
where the entry is observed, `False` where it is missing. When the likelihood factorises over
the entries given the latent, $p(x \mid z) = \prod_i p(x_i \mid z)$, the missing entries
integrate out of the model by leaving them out of the sum:

$$p(x_{\mathrm{obs}}, z) = \int p(x, z)\, dx_{\mathrm{mis}} = p(z) \prod_{i:\, m_i} p(x_i \mid z).$$

`masked_log_joint(model, mask)` is this log joint of the *marginal* model of the observed
entries, so every estimator of elbojax applied to it (`elbo`, `iwae_bound`,
`importance_log_marginal`, `renyi_bound`, any gradient estimator) bounds or estimates
$\log p(x_{\mathrm{obs}})$; `masked_elbo` and `masked_iwae_bound` are the two common ones. With
nothing missing it is the model's own `log_joint`, to the bit. Ignoring *why* an entry is missing
is right when the missingness does not depend on the missing values (missing at random,
Little & Rubin 2002), e.g. pixels hidden by a fixed pattern or at random; it is not when it does
(say, dark pixels drop out more often).

**What the encoder sees.** $q(z \mid x_{\mathrm{obs}})$ must depend on the observed entries only.
An encoder gets $x$ with the missing entries **set to 0** (zero imputation, as in Nazabal et al.
2020 and Mattei & Frellsen 2019): it keeps the encoder's input size, so a VAE trained on complete
data proposes for incomplete data unchanged (that is how a trained run imputes), and for binarised
MNIST 0 is the background. Its drawback is that the encoder cannot tell a missing entry from an
observed 0; `MissingAwareEncoder` also reads the mask (the zero-filled $x$ concatenated with $m$;
see also Collier et al. 2020), which costs a $2D$-wide first layer. An encoder says which it
wants through its `reads_missing` attribute (`True`: it gets NaN at the missing entries and
finds the mask itself); wrappers pass their encoder's on (`flows.FlowEncoder`,
`ConditionalVAE.given(y)`).

**Training on data with missing entries: NaN marks them.** `objective(...)` is a training
objective for `elbojax.train.make_step` whose batch holds NaN where an entry is missing:
`mark_missing(x, mask)` makes such data. NaN rather than a separate mask because that is how
incomplete data arrive (NumPy, pandas), and because the batch stays one array, so the step's
signature, the batching, the sharding over devices and the per-example keys are all unchanged.
Only these functions read NaN as "missing" (`NaNMasked`, `objective`); everywhere else in elbojax
a NaN still propagates, so a bug is never mistaken for a missing value.

**Imputation.** `impute` draws the missing entries from $p(x_{\mathrm{mis}} \mid x_{\mathrm{obs}})$
by sampling importance resampling with the encoder as proposal (as Mattei & Frellsen 2019 do):
$z_{1:K} \sim q(z \mid x_{\mathrm{obs}})$, weights $p(x_{\mathrm{obs}}, z_k) / q(z_k \mid
x_{\mathrm{obs}})$, a $z_j$ resampled by weight, then $x_{\mathrm{mis}} \sim p(x_{\mathrm{mis}}
\mid z_j)$. It also returns the self-normalised estimate of $\mathbb{E}[x_{\mathrm{mis}} \mid
x_{\mathrm{obs}}]$ and the effective sample size. Both are **biased at finite K** (by $O(1/K)$ for
the mean; see `elbojax.snis`): report $K$ and the ESS with them.

Models: `elbojax.models.VAE` (Bernoulli or Gaussian decoder), `TwoLayerVAE`,
`models.ConditionalVAE.given(y)`, and the exact `LinearGaussian` and `GaussianToy` are understood
by `factorized`; for your own model build a `Factorized`.

Shapes: ONE data point `x` and its `mask`, both of shape `(D,)`; batch with `jax.vmap`.

References:
  Little & Rubin, *Statistical Analysis with Missing Data*, 2nd ed., 2002 (ignorability);
  Mattei & Frellsen, *MIWAE: Deep Generative Modelling and Imputation of Incomplete Data Sets*,
  ICML 2019, https://arxiv.org/abs/1812.02633;
  Nazabal, Olmos, Ghahramani & Valera, *Handling Incomplete Heterogeneous Data using VAEs*,
  Pattern Recognition 2020, https://arxiv.org/abs/1807.03653;
  Collier, Nazabal & Williams, *VAEs in the Presence of Missing Data*, 2020,
  https://arxiv.org/abs/2006.05301;
  Rubin, *Using the SIR algorithm to simulate posterior distributions*, 1988.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import distrax
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elbojax import _checks, data, exact, snis
from elbojax.estimators import elbo, iwae_bound
from elbojax.models._layers import LOG_2PI, check_shape
from elbojax.models.encoders import GaussianMLPEncoder
from elbojax.models.likelihoods import check_gaussian_arguments, signed_logits, softplus
from elbojax.models.conditional import _LabelConditioned
from elbojax.models.hierarchical import TwoLayerVAE
from elbojax.proposals import MultivariateNormalDiag

_NUMPY_TYPES = (np.ndarray, np.generic)


# ----------------------------------------------------------------------------------------------
# Masks.
# ----------------------------------------------------------------------------------------------


def _check_mask(mask, shape: tuple[int, ...], name: str = "mask", hint: str = "ONE data point; batch with jax.vmap") -> jax.Array:
    """Require a bool mask of `shape`; return it as an array. Trace-time only (shape and dtype)."""
    dtype = getattr(mask, "dtype", None)
    if dtype is None:
        dtype = np.asarray(mask).dtype
    if dtype != np.bool_:
        raise TypeError(
            f"`{name}` must be a bool array (True = observed, False = missing), got dtype {dtype}. "
            "Convert it with `mask.astype(bool)`, or use `~np.isnan(x)` for data with NaN at the missing entries."
        )
    got = tuple(jnp.shape(mask))
    if got != tuple(shape):
        raise ValueError(
            f"`{name}` must have the shape of `x`, {tuple(shape)} ({hint}), got {got}."
        )
    return jnp.asarray(mask)


def _float(x) -> jax.Array:
    x = jnp.asarray(x)
    return x if jnp.issubdtype(x.dtype, jnp.floating) else x.astype(jnp.result_type(float))


def nan_mask(x) -> jax.Array:
    """The mask of NaN-marked data: `True` where `x` is not NaN (observed). Shape of `x`."""
    x = jnp.asarray(x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        return jnp.ones(x.shape, bool)
    return ~jnp.isnan(x)


def mark_missing(x, mask):
    """`x` as floats with NaN at the missing entries (`mask` False): data for `objective` and `NaNMasked`.

    Works on a batch or one point (any shape), with NumPy arrays (returns NumPy) or JAX arrays.

    Args:
      x: the data, any shape.
      mask: bool, the shape of `x`, or of one point of a batch `x` (the same entries missing in
        every row); `True` = observed.
    """
    if isinstance(mask, (list, tuple)):
        mask = np.asarray(mask)
    mask_shape = tuple(np.shape(mask))
    if mask_shape and tuple(np.shape(x))[1:] == mask_shape:  # exactly one point's shape, not a suffix of it
        broadcast = np.broadcast_to if isinstance(mask, _NUMPY_TYPES) else jnp.broadcast_to
        mask = broadcast(mask, np.shape(x))  # one point's mask, for every row of the batch
    if isinstance(x, _NUMPY_TYPES) and isinstance(mask, _NUMPY_TYPES):
        _check_mask(mask, np.shape(x), hint="or of one row of a batch `x`")
        x = np.asarray(x)
        x = x if data.is_float(x.dtype) else x.astype(np.float32)
        return np.where(mask, x, np.nan).astype(x.dtype)
    mask = _check_mask(mask, jnp.shape(x), hint="or of one row of a batch `x`")
    x = _float(x)
    return jnp.where(mask, x, jnp.nan)


def hidden_region_mask(region: str = "top", shape: tuple[int, int] = (28, 28)) -> np.ndarray:
    """A flat observation mask that hides one half of an image: `True` = observed.

    Args:
      region: the hidden half: `"top"`, `"bottom"`, `"left"` or `"right"`. For an odd size the
        middle row (column) belongs to the bottom (right) half.
      shape: `(height, width)` of the image, at least 2 along the axis that is halved.

    Returns:
      `bool[height * width]` (row-major, the layout of a flattened MNIST digit).
    """
    regions = ("top", "bottom", "left", "right")
    if region not in regions:
        raise ValueError(f"`region` must be one of {', '.join(map(repr, regions))}; got {region!r}.")
    if len(tuple(shape)) != 2:
        raise ValueError(f"`shape` must be (height, width), got {shape!r}.")
    height, width = (_checks.check_positive_int(n, f"shape[{i}]") for i, n in enumerate(shape))
    halved, size = ("height", height) if region in ("top", "bottom") else ("width", width)
    if size < 2:
        raise ValueError(f"Hiding the {region} half needs a {halved} of 2 or more, got shape {tuple(shape)}.")
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    hidden = {
        "top": rows < height // 2, "bottom": rows >= height // 2,
        "left": cols < width // 2, "right": cols >= width // 2,
    }[region]
    return ~hidden.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Masked likelihoods.
# ----------------------------------------------------------------------------------------------


def masked_bernoulli_log_likelihood(x, logits, mask):
    r"""$\sum_{i:\, m_i} \log \mathrm{Bernoulli}(x_i; \sigma(\ell_i))$: `bernoulli_log_likelihood` over the observed entries.

    $$\log p(x_{\mathrm{obs}} \mid \ell) = -\sum_i m_i\, \mathrm{softplus}(\pm \ell_i)$$
    (the sign as in `elbojax.models.bernoulli_log_likelihood`). Missing entries contribute
    exactly 0 to the value and the gradient, whatever `x` holds there (NaN included); a NaN at an
    observed entry makes the result NaN, as in `bernoulli_log_likelihood` (a wrong mask must not
    pass unseen). With every entry observed it equals `bernoulli_log_likelihood(x, logits)` to the bit.

    Args:
      x: one binary data point, any shape (read as `x > 0.5`).
      logits: $\ell$, the shape of `x`.
      mask: bool, the shape of `x`; `True` = observed.

    Returns:
      A scalar.
    """
    shape = jnp.shape(x)
    check_shape(logits, shape, "logits", " (the shape of `x`)")
    mask = _check_mask(mask, shape)
    x = jnp.where(mask, x, jnp.zeros((), jnp.asarray(x).dtype))  # a NaN at an observed entry stays: NaN
    return -jnp.sum(jnp.where(mask, softplus(signed_logits(x, logits)), 0.0))


def masked_gaussian_log_likelihood(x, mean, log_scale, mask):
    r"""$\sum_{i:\, m_i} \log \mathcal{N}(x_i; \mu_i, \sigma_i^2)$: `gaussian_log_likelihood` over the observed entries.

    $$\log p(x_{\mathrm{obs}} \mid \mu, \sigma) = -\sum_i m_i \Big[\tfrac12 \Big(\frac{x_i -
      \mu_i}{\sigma_i}\Big)^2 + \log \sigma_i + \tfrac12 \log 2\pi\Big].$$
    Missing entries contribute exactly 0 to the value and the gradient (a NaN there included);
    with every entry observed it equals `gaussian_log_likelihood(x, mean, log_scale)` to the bit.

    Args:
      x: one data point, any shape.
      mean: $\mu$, the shape of `x`.
      log_scale: $\log\sigma$, the shape of `x` or broadcastable to it.
      mask: bool, the shape of `x`; `True` = observed.

    Returns:
      A scalar.
    """
    shape = check_gaussian_arguments(x, mean, log_scale)
    mask = jnp.ravel(_check_mask(mask, shape))
    # Fill before the arithmetic, so that a NaN at a missing entry reaches neither value nor
    # gradient, and neither does an overflow there (exp(-log_scale) = inf, then 0 * inf = NaN).
    x = jnp.where(mask, jnp.ravel(x), 0.0)
    mean = jnp.where(mask, jnp.ravel(mean), 0.0)
    log_scale = jnp.where(mask, jnp.ravel(jnp.broadcast_to(log_scale, shape)), 0.0)
    standardized = (x - mean) * jnp.exp(-log_scale)
    terms = 0.5 * standardized**2 + log_scale + 0.5 * LOG_2PI
    return -jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)


# ----------------------------------------------------------------------------------------------
# Models whose likelihood factorises.
# ----------------------------------------------------------------------------------------------


class Factorized(NamedTuple):
    r"""A model whose likelihood factorises over the entries of $x$, in the pieces this module uses.

    Build one for your own model (or let `factorized` build it for elbojax's models).

    Attributes:
      masked_log_likelihood: `(x, z, mask) -> scalar`, $\sum_{i:\,m_i} \log p(x_i \mid z)$ (use
        `masked_bernoulli_log_likelihood` / `masked_gaussian_log_likelihood`).
      log_prior: `z -> scalar`, $\log p(z)$.
      sample: `(key, z) -> x`, one draw from $p(x \mid z)$, the shape of `x`.
      mean: `z -> x`, $\mathbb{E}[x \mid z]$.
      data_shape: the shape of one `x`.
      proposal: `x_in -> distribution`, the encoder $q(z \mid x)$ (`x_in` as `reads_missing`
        says), or `None` for a model without one (then pass a proposal yourself).
      reads_missing: `True` if `proposal` takes NaN at the missing entries (and reads the mask
        from them); `False` (default) if it takes zeros there.
    """

    masked_log_likelihood: Callable
    log_prior: Callable
    sample: Callable
    mean: Callable
    data_shape: tuple
    proposal: Callable | None = None
    reads_missing: bool = False


def _standard_normal_log_prob(z):
    return -0.5 * jnp.sum(LOG_2PI + z**2, axis=-1)


def _linear_gaussian(model: exact.LinearGaussian) -> Factorized:
    def loc(z):
        return z @ model.weight.T + model.bias

    def masked_log_likelihood(x, z, mask):
        # The arithmetic of `LinearGaussian.log_likelihood`, term by term, so that the full mask is exact.
        _checks.check_array_shape(x, (model.data_dim,), "x")
        _checks.check_array_shape(z, (model.latent_dim,), "z")
        mask = _check_mask(mask, (model.data_dim,))
        x = jnp.where(mask, x, 0.0)
        terms = LOG_2PI + jnp.log(model.noise_variance) + (x - loc(z)) ** 2 / model.noise_variance
        return -0.5 * jnp.sum(jnp.where(mask, terms, 0.0), axis=-1)

    def sample(key, z):
        noise = jax.random.normal(key, (model.data_dim,), model.weight.dtype)
        return loc(z) + jnp.sqrt(model.noise_variance) * noise

    return Factorized(masked_log_likelihood, _standard_normal_log_prob, sample, loc, (model.data_dim,))


def _gaussian_toy(model: exact.GaussianToy) -> Factorized:
    def masked_log_likelihood(x, z, mask):
        _checks.check_array_shape(x, (model.dim,), "x")
        _checks.check_array_shape(z, (model.dim,), "z")
        mask = _check_mask(mask, (model.dim,))
        x = jnp.where(mask, x, 0.0)
        return -0.5 * jnp.sum(jnp.where(mask, LOG_2PI + (x - z) ** 2, 0.0))

    def log_prior(z):
        return -0.5 * jnp.sum(LOG_2PI + (z - model.mean) ** 2)

    def sample(key, z):
        return z + jax.random.normal(key, (model.dim,), model.mean.dtype)

    return Factorized(masked_log_likelihood, log_prior, sample, lambda z: z, (model.dim,))


def _bernoulli_parts(logits_fn: Callable, data_dim: int):
    def masked_log_likelihood(x, z, mask):
        check_shape(x, (data_dim,), "x", " (ONE data point; batch with jax.vmap)")
        return masked_bernoulli_log_likelihood(x, logits_fn(z), mask)

    def sample(key, z):
        logits = logits_fn(z)
        return jax.random.bernoulli(key, jax.nn.sigmoid(logits)).astype(logits.dtype)

    return masked_log_likelihood, sample, lambda z: jax.nn.sigmoid(logits_fn(z))


def _gaussian_parts(decoder: Callable, data_dim: int):
    def masked_log_likelihood(x, z, mask):
        check_shape(x, (data_dim,), "x", " (ONE data point; batch with jax.vmap)")
        return masked_gaussian_log_likelihood(x, *decoder(z), mask)

    def sample(key, z):
        mean, log_scale = decoder(z)
        return mean + jnp.exp(log_scale) * jax.random.normal(key, mean.shape, mean.dtype)

    return masked_log_likelihood, sample, lambda z: decoder(z)[0]


def _reads_missing(model) -> bool:
    own = getattr(model, "reads_missing", None)
    if own is not None:
        return bool(own)
    return bool(getattr(getattr(model, "encoder", None), "reads_missing", False))


def factorized(model) -> Factorized:
    r"""The pieces of `model` that masked bounds and imputation need, as a `Factorized`.

    Understood: a `Factorized` (returned as is); `elbojax.exact.LinearGaussian` and `GaussianToy`
    (no proposal); `elbojax.models.TwoLayerVAE`; and any VAE-like model with `decoder(z)`, a
    `likelihood` of `"bernoulli"` or `"gaussian"`, `log_prior(z)`, `data_dim` and `proposal(x)`
    (`models.VAE`, `models.ConditionalVAE.given(y)`).

    Raises:
      TypeError: for any other model (build a `Factorized` for it).
    """
    if isinstance(model, Factorized):
        return model
    if isinstance(model, exact.LinearGaussian):
        return _linear_gaussian(model)
    if isinstance(model, exact.GaussianToy):
        return _gaussian_toy(model)
    if isinstance(model, _LabelConditioned):  # it has the pieces, but each needs the label
        if callable(getattr(model, "given", None)):
            raise TypeError(
                f"Masked bounds need one label for a {type(model).__name__}: pass `model.given(y)` "
                "(a model of p(x | y) with `log_joint` and `proposal`), not the model itself."
            )
        raise TypeError(
            f"Masked bounds do not cover a {type(model).__name__}: its label is a latent variable of "
            "its own. Build an elbojax.missing.Factorized for it."
        )
    if isinstance(model, TwoLayerVAE):
        logits = lambda z: model.p_x(model._unpack(z)[0])
        masked_ll, sample, mean = _bernoulli_parts(logits, model.data_dim)
        return Factorized(masked_ll, model.log_prior, sample, mean, (model.data_dim,), model.proposal, _reads_missing(model))
    decoder = getattr(model, "decoder", None)
    likelihood = getattr(model, "likelihood", None)
    data_dim = getattr(model, "data_dim", None)
    if callable(decoder) and likelihood in ("bernoulli", "gaussian") and callable(getattr(model, "log_prior", None)) and _checks.is_int(data_dim):
        parts = _bernoulli_parts if likelihood == "bernoulli" else _gaussian_parts
        data_dim = int(data_dim)
        masked_ll, sample, mean = parts(decoder, data_dim)
        return Factorized(masked_ll, model.log_prior, sample, mean, (data_dim,), getattr(model, "proposal", None), _reads_missing(model))
    raise TypeError(
        f"Masked bounds need a model whose likelihood factorises over the entries of x; elbojax does not "
        f"know how {type(model).__name__} does. Pass an elbojax.models.VAE (or any model with `decoder`, "
        "`likelihood` 'bernoulli'/'gaussian', `log_prior` and `data_dim`), a LinearGaussian, a GaussianToy, "
        "or build an elbojax.missing.Factorized."
    )


# ----------------------------------------------------------------------------------------------
# Masked log joints, proposals and bounds.
# ----------------------------------------------------------------------------------------------


def masked_log_likelihood(model, mask) -> Callable:
    r"""`log_likelihood(x, z)` $= \sum_{i:\, m_i} \log p(x_i \mid z)$, for `elbojax.elbo_analytic_kl` and the like.

    Args:
      model: a model `factorized` understands.
      mask: bool `(D,)`, `True` = observed (may be traced: vmap over points and masks together).
    """
    parts = factorized(model)
    mask = _check_mask(mask, parts.data_shape)
    return lambda x, z: parts.masked_log_likelihood(x, z, mask)


def masked_log_joint(model, mask) -> Callable:
    r"""`log_joint(x, z)` $= \log p(z) + \sum_{i:\, m_i} \log p(x_i \mid z) = \log p(x_{\mathrm{obs}}, z)$.

    The log joint of the marginal model of the observed entries: hand it to any estimator, with a
    proposal $q(z \mid x_{\mathrm{obs}})$ (`masked_proposal`), to bound $\log p(x_{\mathrm{obs}})$.
    With `mask` all `True` it equals `model.log_joint` to the bit.

    Args:
      model: a model `factorized` understands.
      mask: bool `(D,)`, `True` = observed.

    Returns:
      `log_joint(x, z) -> scalar`; the values of `x` at missing entries are never read.

    Examples:
      >>> bound = elbojax.iwae_bound(key, x, missing.masked_log_joint(vae, mask),
      ...                            missing.masked_proposal(vae, x, mask), num_samples=50)
    """
    parts = factorized(model)
    mask = _check_mask(mask, parts.data_shape)
    return lambda x, z: parts.masked_log_likelihood(x, z, mask) + parts.log_prior(z)


def encoder_input(x, mask, *, reads_missing: bool = False) -> jax.Array:
    """What an encoder sees for a partly observed `x`: 0 at the missing entries, or NaN if it `reads_missing`.

    Args:
      x: one data point (or a batch), any shape.
      mask: bool, the shape of `x`.
      reads_missing: fill with NaN (for a `MissingAwareEncoder`) instead of 0.
    """
    mask = _check_mask(mask, jnp.shape(x))
    x = _float(x)
    return jnp.where(mask, x, jnp.nan if reads_missing else 0.0)


def masked_proposal(model, x, mask):
    r"""The model's encoder $q(z \mid x_{\mathrm{obs}})$ for one partly observed `x`.

    The encoder gets `x` with its missing entries set to 0 (or NaN for an encoder that
    `reads_missing`, such as `MissingAwareEncoder`); see the module notes.

    Args:
      model: a model `factorized` understands, with a proposal (e.g. `models.VAE`).
      x: one data point `(D,)`.
      mask: bool `(D,)`, `True` = observed.
    """
    parts = factorized(model)
    if parts.proposal is None:
        raise TypeError(f"{type(model).__name__} has no encoder (`proposal`); pass a proposal yourself.")
    return parts.proposal(encoder_input(x, _check_mask(mask, jnp.shape(x)), reads_missing=parts.reads_missing))


def masked_elbo(key, x, mask, model, *, num_samples: int = 1, proposal=None, gradient: str = "reparam", chunk_size=None):
    r"""The ELBO of the observed entries, a lower bound on $\log p(x_{\mathrm{obs}})$.

    $$\frac1K \sum_k \log \frac{p(x_{\mathrm{obs}}, z_k)}{q(z_k \mid x_{\mathrm{obs}})},\qquad
      z_k \sim q(z \mid x_{\mathrm{obs}}):$$
    `elbojax.elbo` with `masked_log_joint(model, mask)` and `masked_proposal(model, x, mask)`.

    Args:
      key: a JAX PRNG key.
      x: one data point `(D,)` (its missing entries are never read).
      mask: bool `(D,)`, `True` = observed.
      model: a model `factorized` understands.
      num_samples, gradient, chunk_size: as `elbojax.elbo`.
      proposal: a distribution over $z$ to use instead of the model's encoder (required for a
        model without one, such as `LinearGaussian`).

    Returns:
      A scalar.

    References:
      Nazabal et al. 2020, https://arxiv.org/abs/1807.03653
    """
    mask = _check_mask(mask, jnp.shape(x))
    proposal = masked_proposal(model, x, mask) if proposal is None else proposal
    return elbo(
        key, encoder_input(x, mask), masked_log_joint(model, mask), proposal,
        num_samples=num_samples, gradient=gradient, chunk_size=chunk_size,
    )


def masked_iwae_bound(key, x, mask, model, *, num_samples: int, proposal=None, gradient: str = "reparam", chunk_size=None):
    r"""The IWAE bound of the observed entries, $\mathcal{L}_K \le \log p(x_{\mathrm{obs}})$ (the MIWAE bound).

    $$\log \frac1K \sum_k \frac{p(x_{\mathrm{obs}}, z_k)}{q(z_k \mid x_{\mathrm{obs}})},\qquad
      z_k \sim q(z \mid x_{\mathrm{obs}}):$$
    `elbojax.iwae_bound` with `masked_log_joint` and `masked_proposal`. Arguments as `masked_elbo`
    (`gradient` as `elbojax.iwae_bound`).

    References:
      Mattei & Frellsen, *MIWAE*, ICML 2019, https://arxiv.org/abs/1812.02633
    """
    mask = _check_mask(mask, jnp.shape(x))
    proposal = masked_proposal(model, x, mask) if proposal is None else proposal
    return iwae_bound(
        key, encoder_input(x, mask), masked_log_joint(model, mask), proposal,
        num_samples=num_samples, gradient=gradient, chunk_size=chunk_size,
    )


# ----------------------------------------------------------------------------------------------
# NaN-marked data: the model as training sees it.
# ----------------------------------------------------------------------------------------------


class NaNMasked:
    r"""`model` seen through NaN-marked data: every method reads NaN entries of `x` as missing.

    `log_joint(x, z)` is $\log p(x_{\mathrm{obs}}, z)$ with the mask `~isnan(x)`, `proposal(x)` is
    the encoder on the zero-filled `x` (see the module notes), `log_likelihood`, `log_prior`,
    `analytic_kl`, `has_analytic_kl` and `kl_mode` follow, so this object is a model for
    `elbojax.train.objective` (that is what `objective` does) and for any estimator:
    `elbojax.renyi_bound(key, x, view.log_joint, view.proposal(x), ...)` bounds
    $\log p(x_{\mathrm{obs}})$. A plain wrapper, built inside the loss (not an NNX module).

    Args:
      model: a model `factorized` understands, with a proposal (e.g. `models.VAE`).
    """

    def __init__(self, model):
        self.model = model
        self._parts = factorized(model)
        if self._parts.proposal is None:
            raise TypeError(f"NaNMasked needs a model with an encoder (`proposal`); {type(model).__name__} has none.")

    @property
    def data_dim(self) -> int:
        return self._parts.data_shape[0]

    def _mask(self, x):
        check_shape(x, self._parts.data_shape, "x", " (ONE data point; batch with jax.vmap)")
        return nan_mask(x)

    def _encoder_input(self, x):
        return encoder_input(x, self._mask(x), reads_missing=self._parts.reads_missing)

    def proposal(self, x):
        r"""$q(z \mid x_{\mathrm{obs}})$ for one NaN-marked `x`."""
        return self._parts.proposal(self._encoder_input(x))

    def log_likelihood(self, x, z):
        r"""$\sum_{i:\, x_i \ne \mathrm{NaN}} \log p(x_i \mid z)$."""
        return self._parts.masked_log_likelihood(x, z, self._mask(x))

    def log_prior(self, z):
        return self._parts.log_prior(z)

    def log_joint(self, x, z):
        r"""$\log p(x_{\mathrm{obs}}, z)$, the observed entries being those that are not NaN."""
        return self.log_likelihood(x, z) + self.log_prior(z)

    @property
    def has_analytic_kl(self) -> bool:
        return bool(getattr(self.model, "has_analytic_kl", False))

    def analytic_kl(self, x, *, per_dimension: bool = False, proposal=None):
        r"""$\mathrm{KL}(q(z \mid x_{\mathrm{obs}}) \,\|\, p(z))$ in closed form (the model's, on the encoder's input).

        Hands the model only what its `analytic_kl` takes (`analytic_kl(x)` is enough, as for
        `train.objective`); `per_dimension=True` of a model without it is a `ValueError`.
        """
        from elbojax.train import _takes

        own = self.model.analytic_kl
        extra = {}
        if per_dimension:
            if not _takes(own, "per_dimension"):
                raise ValueError(f"{type(self.model).__name__}.analytic_kl gives no KL per dimension (no `per_dimension`).")
            extra["per_dimension"] = True
        if proposal is not None and _takes(own, "proposal"):  # `proposal(x)`, computed once by the caller
            extra["proposal"] = proposal
        return own(self._encoder_input(x), **extra)

    def kl_mode(self, kl: str = "auto", *, gradient: str = "reparam") -> str:
        from elbojax.models.vae import resolve_kl

        own = getattr(self.model, "kl_mode", None)
        if callable(own):
            return own(kl, gradient=gradient)
        # As `train.objective` decides for a model without `kl_mode`: Monte Carlo unless asked.
        if kl == "auto":
            return "monte_carlo"
        has_closed_form = callable(getattr(self.model, "analytic_kl", None))
        return resolve_kl(kl, gradient, has_closed_form, type(self.model).__name__, "(it has no `analytic_kl`)")


def objective(name: str = "iwae", **kwargs):
    r"""A training objective for batches with NaN at the missing entries (`elbojax.train.make_step`).

    `elbojax.train.objective(name, **kwargs)` applied to `NaNMasked(model)`: each point's bound is
    on $\log p(x_{\mathrm{obs}})$ (the ELBO, or the IWAE bound, which is then the MIWAE bound of
    Mattei & Frellsen 2019), with every option of `train.objective` (gradient estimators, KL
    annealing, $\beta$, free bits, the closed-form KL). A fully observed batch trains exactly as
    `train.objective` does.

    Args:
      name: `"elbo"` or `"iwae"`.
      **kwargs: as `elbojax.train.objective` (`num_samples`, `gradient`, `kl`, `kl_weight`, ...).

    Returns:
      `objective(keys, model, batch, step) -> Terms`, with the attribute `accepts_missing = True`
      (for a training loop that checks its data). The batch: `(B, D)` floats, NaN = missing
      (`mark_missing`).

    Examples:
      >>> objective_fn = missing.objective("iwae", num_samples=5)
      >>> step = jax.jit(train.make_step(graphdef, optimizer, objective_fn, seed=0))
      >>> state, info = step(state, missing.mark_missing(batch, mask), indices)
    """
    from elbojax import train

    base = train.objective(name, **kwargs)

    def batch_objective(keys, model, batch, step):
        return base(keys, NaNMasked(model), batch, step)

    batch_objective.accepts_missing = True
    return batch_objective


class MissingAwareEncoder(nnx.Module):
    r"""$q_\phi(z \mid x_{\mathrm{obs}})$ from the zero-filled $x$ and the mask: an MLP on $[x \odot m,\, m]$.

    A `GaussianMLPEncoder` with $2D$ inputs: the first $D$ the data with 0 at the missing entries,
    the last $D$ the mask as 0/1, so that a missing entry differs from an observed 0. It reads the mask from NaN in `x` (`reads_missing = True`): a fully observed `x`
    gives the mask of all ones. Its `data_dim` is $D$, so `models.VAE` accepts it as an encoder.

    Args:
      data_dim: $D$.
      latent_dim, hidden, activation, scale_transform, rngs, param_dtype: as `GaussianMLPEncoder`.

    References:
      Collier, Nazabal & Williams, *VAEs in the Presence of Missing Data*, 2020,
      https://arxiv.org/abs/2006.05301
    """

    reads_missing = True

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
        self.inner = GaussianMLPEncoder(
            2 * self.data_dim, self.latent_dim, hidden, activation,
            scale_transform=scale_transform, rngs=rngs, param_dtype=param_dtype,
        )

    def loc_and_scale(self, x):
        r"""$(\mu, \sigma)$ for one `x` `(data_dim,)` with NaN at the missing entries."""
        check_shape(x, (self.data_dim,), "x", " (ONE data point; batch with jax.vmap)")
        x = _float(x)
        observed = ~jnp.isnan(x)
        return self.inner.loc_and_scale(jnp.concatenate([jnp.where(observed, x, 0.0), observed.astype(x.dtype)]))

    def __call__(self, x) -> distrax.MultivariateNormalDiag:
        # elbojax's subclass, as `GaussianMLPEncoder` returns: the same draws as the local fits'
        # (`local.diagonal_gaussian`), which `gaps` pairs with it.
        return MultivariateNormalDiag(*self.loc_and_scale(x))


# ----------------------------------------------------------------------------------------------
# Imputation.
# ----------------------------------------------------------------------------------------------


class Imputation(NamedTuple):
    r"""Imputations of one partly observed data point (observed entries are copied from `x`).

    Attributes:
      samples: `(M, D)`, `x` with its missing entries drawn from $p(x_{\mathrm{mis}} \mid z_j)$ at
        resampled $z_j$: approximate draws from $p(x_{\mathrm{mis}} \mid x_{\mathrm{obs}})$.
      means: `(M, D)`, the same with $\mathbb{E}[x_{\mathrm{mis}} \mid z_j]$ instead of a draw
        (for pictures: pixel probabilities rather than noisy bits). Both are NaN at the missing
        entries if a log-weight is NaN (the resampled $z_j$ would mean nothing).
      mean: `(D,)`, the self-normalised estimate $\sum_k \bar w_k\, \mathbb{E}[x_{\mathrm{mis}}
        \mid z_k]$ of $\mathbb{E}[x_{\mathrm{mis}} \mid x_{\mathrm{obs}}]$ (all $K$ samples, no
        resampling noise).
      mean_standard_error: `(D,)`, its delta-method standard error (0 at observed entries).
      effective_sample_size: Kish's ESS of the $K$ importance weights, a scalar in $[1, K]$
        (0 when every weight is 0).
      log_weights: `(K,)`, $\log p(x_{\mathrm{obs}}, z_k) - \log q(z_k \mid x_{\mathrm{obs}})$.
    """

    samples: jax.Array
    means: jax.Array
    mean: jax.Array
    mean_standard_error: jax.Array
    effective_sample_size: jax.Array
    log_weights: jax.Array


def impute(
    key,
    x,
    mask,
    model,
    *,
    num_samples: int,
    num_imputations: int = 1,
    method: str = "multinomial",
    proposal=None,
    chunk_size: int | None = None,
) -> Imputation:
    r"""Draw the missing entries of `x` from $p(x_{\mathrm{mis}} \mid x_{\mathrm{obs}})$ by importance resampling.

    1. $z_{1:K} \sim q(z \mid x_{\mathrm{obs}})$ (the encoder on the zero-filled `x`, or `proposal`);
    2. $\ell_k = \log p(x_{\mathrm{obs}}, z_k) - \log q(z_k \mid x_{\mathrm{obs}})$
       (`masked_log_joint`);
    3. resample $M$ indices $j$ with probabilities $\bar w_k \propto e^{\ell_k}$ (`snis.resample`);
    4. $x_{\mathrm{mis}} \sim p(x_{\mathrm{mis}} \mid z_j)$, the missing entries of a draw from
       the factorised likelihood.

    As $K \to \infty$ the draws are exact; at finite $K$ they are biased towards what the
    proposal believes (the SIR distribution), and `mean` is biased by $O(1/K)$. Report $K$ and
    `effective_sample_size`: an ESS near 1 means one $z$ made every imputation.

    Keys: `jax.random.split(key, 3)` for the proposals, the resampling and the likelihood draws.

    Args:
      key: a JAX PRNG key.
      x: one data point `(D,)`; its missing entries are never read (NaN is fine).
      mask: bool `(D,)`, `True` = observed.
      model: a model `factorized` understands.
      num_samples: $K$, proposals per data point.
      num_imputations: $M$, imputations returned.
      method: `"multinomial"` or `"systematic"` resampling.
      proposal: a distribution over $z$ instead of the model's encoder (required for a model
        without one).
      chunk_size: as `elbojax.log_weights`.

    Returns:
      An `Imputation`.

    References:
      Mattei & Frellsen, *MIWAE*, ICML 2019, https://arxiv.org/abs/1812.02633;
      Rubin 1988 (sampling importance resampling).
    """
    _checks.check_key(key)
    parts = factorized(model)
    check_shape(x, parts.data_shape, "x", " (ONE data point; batch with jax.vmap)")
    mask = _check_mask(mask, parts.data_shape)
    num_imputations = _checks.check_positive_int(num_imputations, "num_imputations")
    if proposal is None and parts.proposal is None:
        raise TypeError(f"{type(model).__name__} has no encoder (`proposal`): pass `proposal=`, a distribution over z.")
    proposal = masked_proposal(parts, x, mask) if proposal is None else proposal
    x_filled = encoder_input(x, mask)
    draw_key, resample_key, noise_key = jax.random.split(key, 3)
    z, log_weights = snis.importance_samples(
        draw_key, x_filled, masked_log_joint(parts, mask), proposal, num_samples=num_samples, chunk_size=chunk_size
    )
    indices = snis.resample(resample_key, log_weights, num_imputations, method=method)
    means = jax.vmap(parts.mean)(z)  # (K, D)
    estimate = snis.posterior_expectation(means, log_weights)
    chosen = jax.tree.map(lambda a: a[indices], z)
    draws = jax.vmap(parts.sample)(jax.random.split(noise_key, num_imputations), chosen)
    complete = lambda values: jnp.where(mask, x_filled.astype(values.dtype), values)
    poisoned = jnp.isnan(estimate.effective_sample_size)  # a NaN log-weight: the indices mean nothing
    return Imputation(
        samples=complete(snis.nan_if(poisoned, draws)),
        means=complete(snis.nan_if(poisoned, means[indices])),
        mean=complete(estimate.mean),
        mean_standard_error=jnp.where(mask, 0.0, estimate.standard_error),
        effective_sample_size=estimate.effective_sample_size,
        log_weights=log_weights,
    )


# ----------------------------------------------------------------------------------------------
# Exact references on the linear Gaussian (concrete masks only).
# ----------------------------------------------------------------------------------------------


def _concrete_mask(mask, data_dim: int) -> np.ndarray:
    if isinstance(mask, jax.core.Tracer):
        raise TypeError("This function needs a concrete mask (it selects rows, which fixes shapes); got a traced one.")
    _check_mask(mask, (data_dim,))
    return np.asarray(mask)


def marginal_linear_gaussian(model: exact.LinearGaussian, mask) -> exact.LinearGaussian:
    r"""The linear Gaussian of the observed entries: rows `mask` of $W$, $b$ and $\psi$.

    $x_{\mathrm{obs}} = W_{\mathrm{obs}} z + b_{\mathrm{obs}} + \varepsilon_{\mathrm{obs}}$: the
    marginal of a factor analyser is a factor analyser, so its `log_marginal`, `posterior` and
    `elbo_diag_gaussian` are the exact references for masked bounds.

    Args:
      model: an `elbojax.exact.LinearGaussian`.
      mask: concrete bool `(D,)`, `True` = observed.
    """
    rows = np.flatnonzero(_concrete_mask(mask, model.data_dim))
    return exact.LinearGaussian(model.weight[rows], model.bias[rows], model.noise_variance[rows])


def linear_gaussian_conditional(model: exact.LinearGaussian, x, mask):
    r"""The exact $p(x_{\mathrm{mis}} \mid x_{\mathrm{obs}})$ of a linear Gaussian: its mean and covariance.

    With $\Sigma = WW^\top + \mathrm{diag}\,\psi$ and $\mu = b$ (the marginal $p(x)$),
    $$\mathbb{E}[x_{\mathrm{mis}} \mid x_{\mathrm{obs}}] = \mu_{\mathrm{mis}} + \Sigma_{\mathrm{mis},
      \mathrm{obs}} \Sigma_{\mathrm{obs},\mathrm{obs}}^{-1} (x_{\mathrm{obs}} - \mu_{\mathrm{obs}}),
      \quad \mathrm{Cov} = \Sigma_{\mathrm{mis},\mathrm{mis}} - \Sigma_{\mathrm{mis},\mathrm{obs}}
      \Sigma_{\mathrm{obs},\mathrm{obs}}^{-1} \Sigma_{\mathrm{obs},\mathrm{mis}}.$$

    Args:
      model: an `elbojax.exact.LinearGaussian`.
      x: one data point `(D,)`.
      mask: concrete bool `(D,)`, `True` = observed (at least one entry missing).

    Returns:
      `(mean, covariance)` of shapes `(M,)` and `(M, M)`, $M$ the number of missing entries, in
      the order of `np.flatnonzero(~mask)`.
    """
    mask = _concrete_mask(mask, model.data_dim)
    _checks.check_array_shape(x, (model.data_dim,), "x")
    obs, mis = np.flatnonzero(mask), np.flatnonzero(~mask)
    if mis.size == 0:
        raise ValueError("`mask` hides no entry: there is nothing to impute.")
    cov = model.weight @ model.weight.T + jnp.diag(model.noise_variance)
    if obs.size == 0:
        return model.bias, cov
    gain = jnp.linalg.solve(cov[np.ix_(obs, obs)], cov[np.ix_(obs, mis)]).T  # (M, O)
    mean = model.bias[mis] + gain @ (jnp.asarray(x)[obs] - model.bias[obs])
    return mean, cov[np.ix_(mis, mis)] - gain @ cov[np.ix_(obs, mis)]
