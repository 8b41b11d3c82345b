r"""Models conditioned on a label: the conditional VAE, and the semi-supervised M2 model.

**Conditional VAE** (Sohn, Lee & Yan 2015): $p_\theta(x, z \mid y) = p(z)\, p_\theta(x \mid z, y)$
with the proposal $q_\phi(z \mid x, y)$; the label $y$ (one of $C$ classes) enters the encoder
and the decoder as a one-hot vector concatenated to their input. For a fixed $y$ it is a latent
variable model of $x$, so every bound of elbojax applies to `cvae.given(y)` and bounds
$\log p(x \mid y)$:

    view = cvae.given(y)                                   # y: an int class, or one-hot (C,)
    bound = elbojax.iwae_bound(key, x, view.log_joint, view.proposal(x), num_samples=50)

`cvae.sample(key, y, n)` draws class-conditional samples.

**M2** (Kingma, Rezende, Mohamed & Welling 2014): the label is a latent variable,
$p(x, y, w) = p(y)\, p(w)\, p_\theta(x \mid y, w)$ with $p(y)$ uniform over $C$ classes,
$p(w) = \mathcal{N}(0, I)$, and $q_\phi(y, w \mid x) = q_\phi(y \mid x)\, q_\phi(w \mid x, y)$,
where $q_\phi(y \mid x)$ is a classifier. A labelled pair has the bound
$$\mathcal{L}(x, y) = \mathbb{E}_{q(w \mid x, y)}\big[\log p(x \mid y, w) + \log p(y) +
  \log p(w) - \log q(w \mid x, y)\big] \le \log p(x, y)$$
(eq. 6), an unlabelled $x$ the bound with $y$ enumerated (eq. 7),
$$\mathcal{U}(x) = \sum_{c} q(c \mid x)\big[\mathcal{L}(x, c) - \log q(c \mid x)\big] \le \log p(x),$$
which is `elbojax.enumerated_mixed_elbo` with $c$ summed and $w$ sampled. Trained on both, plus
$\alpha \log q(y \mid x)$ on the labelled pairs (eq. 9) so that the classifier also learns from
the labels directly (`semi_supervised_objective`).

**Training data with labels.** `elbojax.train.make_step` and `train.fit` take one array per
batch; `pack_labels(images, labels, C)` appends the one-hot label to each flattened image (as
0/255 for uint8 grey levels, which dynamic binarisation keeps exactly: a grey level of 255 is
always 1 and 0 always 0). A label of $-1$ packs as all zeros: an unlabelled point, for M2.
`objective` (conditional VAE) and `semi_supervised_objective` (M2) read such batches.

Shapes: ONE data point `x` `(D,)` and ONE label `y` (an integer class of shape `()`, or a
one-hot vector `(C,)`); batch with `jax.vmap`.

References:
  Sohn, Lee & Yan, *Learning Structured Output Representation using Deep Conditional Generative
  Models*, NeurIPS 2015;
  Kingma, Rezende, Mohamed & Welling, *Semi-Supervised Learning with Deep Generative Models*,
  NeurIPS 2014, https://arxiv.org/abs/1406.5298
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from elbojax import _checks
from elbojax.diagnostics import _fused_kl_per_dimension
from elbojax.discrete import _expected_log_ratio, enumerated_mixed_elbo
from elbojax.estimators import elbo
from elbojax.models._layers import MLP, ONE_POINT, check_shape, linear
from elbojax.models.vae import LIKELIHOODS, _resolve_likelihood, resolve_kl
from elbojax.proposals import closed_form_kl


def label_vector(y, num_classes: int, dtype=jnp.float32) -> jax.Array:
    """One label as a vector `(C,)`: an integer class (shape `()`) becomes one-hot; a `(C,)` vector is kept.

    A `(C,)` vector is used as it comes (a one-hot label; a soft label works the same way). A
    concrete integer class must lie in `0..C-1` (`jax.nn.one_hot` would make any other the
    all-zero vector); a traced one cannot be checked.
    """
    given = None if isinstance(y, jax.core.Tracer) else np.asarray(y)  # the value, when it is known
    y = jnp.asarray(y)
    if y.shape == () and jnp.issubdtype(y.dtype, jnp.integer):
        if given is not None and not 0 <= int(given) < num_classes:
            raise ValueError(f"`y` must be a class in 0..{num_classes - 1}, got {int(given)}.")
        return jax.nn.one_hot(y, num_classes, dtype=dtype)
    if y.shape == (num_classes,) and (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer) or y.dtype == bool):
        return y.astype(dtype)
    raise ValueError(
        f"`y` must be one label: an integer class of shape () or a one-hot vector of shape ({num_classes},); "
        f"got shape {y.shape} and dtype {y.dtype} (ONE label; batch with jax.vmap)."
    )


def _probe_analytic_kl(proposal_fn: Callable, prior, data_dim: int) -> bool:
    """Whether `KL(proposal_fn(x) || prior.distribution())` has a closed form (asked abstractly)."""
    if not hasattr(prior, "distribution"):
        return False
    found = []

    def probe(x):
        try:
            closed_form_kl(proposal_fn(x), prior.distribution())
        except ValueError:
            found.append(False)
        else:
            found.append(True)

    jax.eval_shape(probe, jax.ShapeDtypeStruct((data_dim,), jnp.float32))
    return found[0]


def _kl(proposal, prior, per_dimension: bool):
    if not per_dimension:
        return closed_form_kl(proposal, prior.distribution())
    prior_distribution = prior.distribution()
    parts = [getattr(d, name, None) for d in (proposal, prior_distribution) for name in ("loc", "scale_diag")]
    if any(part is None for part in parts):
        raise ValueError(
            "The KL per dimension needs a diagonal Gaussian proposal and prior (with `loc` and `scale_diag`), "
            f"got {type(proposal).__name__} and {type(prior_distribution).__name__}."
        )
    return _fused_kl_per_dimension(*parts)


def _check_conditional_sizes(encoder, decoder, prior, num_classes: int, encoder_name: str) -> None:
    data_dim, latent_dim = decoder.data_dim, encoder.latent_dim
    sizes = {
        f"{encoder_name}.data_dim (D + C)": (encoder.data_dim, data_dim + num_classes),
        "decoder.latent_dim (d + C)": (decoder.latent_dim, latent_dim + num_classes),
        "prior.latent_dim (d)": (prior.latent_dim, latent_dim),
    }
    wrong = {name: got for name, (got, want) in sizes.items() if got != want}
    if wrong:
        expected = {name: want for name, (_, want) in sizes.items()}
        raise ValueError(
            f"With D = decoder.data_dim = {data_dim}, d = {encoder_name}.latent_dim = {latent_dim} and "
            f"C = num_classes = {num_classes}, the sizes must be {expected}; got {wrong}."
        )


# ----------------------------------------------------------------------------------------------
# The conditional VAE.
# ----------------------------------------------------------------------------------------------


class _LabelConditioned(nnx.Module):
    """What the conditional VAE and M2 share: an encoder on $[x, y]$, a decoder on $[z, y]$, a prior on $z$."""

    def __init__(self, encoder, decoder, prior, *, num_classes: int, likelihood: str | None = None):
        self.num_classes = _checks.check_positive_int(num_classes, "num_classes")
        self.likelihood = _resolve_likelihood(decoder, likelihood)
        _check_conditional_sizes(encoder, decoder, prior, self.num_classes, "encoder")
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior

    @property
    def data_dim(self) -> int:
        return self.decoder.data_dim

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def _label(self, y, dtype):
        return label_vector(y, self.num_classes, dtype)

    def proposal(self, x, y):
        r"""$q_\phi(z \mid x, y)$ for one `x` `(D,)` and one label `y`."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        x = jnp.asarray(x)
        dtype = x.dtype if jnp.issubdtype(x.dtype, jnp.floating) else jnp.result_type(float)
        return self.encoder(jnp.concatenate([x.astype(dtype), self._label(y, dtype)]))

    def decoder_output(self, z, y):
        """The likelihood's parameters for one `z` `(d,)` and one label `y` (logits, or `(mean, log_scale)`)."""
        check_shape(z, (self.latent_dim,), "z", " (ONE latent sample)")
        z = jnp.asarray(z)
        return self.decoder(jnp.concatenate([z, self._label(y, z.dtype)]))

    def log_prior(self, z):
        r"""$\log p(z)$ for one `z` of shape `(latent_dim,)`: a scalar."""
        check_shape(z, (self.latent_dim,), "z", " (ONE latent sample)")
        return self.prior.log_prob(z)

    def decode_mean(self, z, y):
        r"""$\mathbb{E}[x \mid z, y]$, shape `(D,)`."""
        return LIKELIHOODS[self.likelihood].mean(self.decoder_output(z, y))

    def sample(self, key, y, num_samples: int):
        r"""Class-conditional samples: `(z, means)` with $z \sim p(z)$ `(n, d)` and $\mathbb{E}[x \mid z, y]$ `(n, D)`."""
        z = self.prior.sample(key, num_samples)
        return z, jax.vmap(lambda z_i: self.decode_mean(z_i, y))(z)


class ConditionalVAE(_LabelConditioned):
    r"""A conditional VAE: $p_\theta(x, z \mid y) = p(z)\, p_\theta(x \mid z, y)$ and $q_\phi(z \mid x, y)$.

    The encoder reads $[x, \mathrm{onehot}(y)]$ and the decoder $[z, \mathrm{onehot}(y)]$, so they
    are the ordinary MLPs of `elbojax.models` with $C$ more inputs::

        cvae = ConditionalVAE(GaussianMLPEncoder(784 + 10, 16, rngs=rngs),
                              BernoulliMLPDecoder(16 + 10, 784, rngs=rngs),
                              StandardNormalPrior(16), num_classes=10)

    Args:
      encoder: a module with `data_dim` $= D + C$, `latent_dim` $= d$ and `__call__(xy)` returning
        a distrax distribution (a `GaussianMLPEncoder`).
      decoder: a module with `latent_dim` $= d + C$, `data_dim` $= D$ mapping $[z, y]$ to the
        likelihood's parameters (`BernoulliMLPDecoder`, `GaussianMLPDecoder`).
      prior: $p(z)$ over $d$ dimensions (`StandardNormalPrior`, `MixturePrior`, `VampPrior` of
        the right input size).
      num_classes: $C$.
      likelihood: as `VAE` (`None` takes the decoder's).

    `given(y)` is the model of $x$ for a fixed label, with `log_joint(x, z)` and `proposal(x)`
    for the estimators; `sample(key, y, n)` draws from $p(x \mid y)$.

    References:
      Sohn, Lee & Yan, NeurIPS 2015; Kingma et al. 2014 (M1+M2's conditional generator).
    """

    def log_likelihood(self, x, z, y):
        r"""$\log p_\theta(x \mid z, y)$: a scalar."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        return LIKELIHOODS[self.likelihood].log_prob(x, self.decoder_output(z, y))

    def log_joint(self, x, z, y):
        r"""$\log p_\theta(x, z \mid y) = \log p_\theta(x \mid z, y) + \log p(z)$: a scalar."""
        return self.log_likelihood(x, z, y) + self.log_prior(z)

    def analytic_kl(self, x, y, *, per_dimension: bool = False, proposal=None):
        r"""$\mathrm{KL}(q_\phi(z \mid x, y) \,\|\, p(z))$ in closed form (see `VAE.analytic_kl`)."""
        return _kl(self.proposal(x, y) if proposal is None else proposal, self.prior, per_dimension)

    @property
    def has_analytic_kl(self) -> bool:
        """Whether the KL of `q(z | x, y)` to the prior has a closed form."""
        return _probe_analytic_kl(lambda x: self.proposal(x, 0), self.prior, self.data_dim)

    def given(self, y) -> "GivenLabel":
        """The model of $x$ for the label `y`: `log_joint(x, z)` $= \\log p(x, z \\mid y)$, `proposal(x)`, ..."""
        return GivenLabel(self, y)


class GivenLabel:
    r"""A conditional model at a fixed label $y$: a model of $x$ alone, for every estimator and `elbojax.missing`.

    `log_joint(x, z)` $= \log p(x, z \mid y)$ and `proposal(x)` $= q(z \mid x, y)$, so
    `elbojax.iwae_bound(key, x, view.log_joint, view.proposal(x), num_samples=K)` is a lower
    bound on $\log p(x \mid y)$; `decoder(z)`, `likelihood`, `log_prior` and `data_dim` make it a
    model `elbojax.missing` understands (masked bounds and imputation given the label).
    `train.objective` accepts it too (a fixed label for the whole batch).

    Args:
      model: a `ConditionalVAE`.
      y: an integer class (shape `()`) or a one-hot vector `(C,)`; may be traced.
    """

    def __init__(self, model: ConditionalVAE, y):
        self.model = model
        self.y = y
        label_vector(y, model.num_classes)  # checks the label now

    @property
    def likelihood(self) -> str:
        return self.model.likelihood

    @property
    def data_dim(self) -> int:
        return self.model.data_dim

    @property
    def latent_dim(self) -> int:
        return self.model.latent_dim

    @property
    def reads_missing(self) -> bool:
        """The encoder's (`elbojax.missing`): `True` if it takes NaN at the missing entries of `x`."""
        return bool(getattr(self.model.encoder, "reads_missing", False))

    def decoder(self, z):
        return self.model.decoder_output(z, self.y)

    def proposal(self, x):
        return self.model.proposal(x, self.y)

    def log_likelihood(self, x, z):
        return self.model.log_likelihood(x, z, self.y)

    def log_prior(self, z):
        return self.model.log_prior(z)

    def log_joint(self, x, z):
        return self.model.log_joint(x, z, self.y)

    def decode_mean(self, z):
        return self.model.decode_mean(z, self.y)

    def analytic_kl(self, x, *, per_dimension: bool = False, proposal=None):
        return self.model.analytic_kl(x, self.y, per_dimension=per_dimension, proposal=proposal)

    @property
    def has_analytic_kl(self) -> bool:
        return self.model.has_analytic_kl

    def kl_mode(self, kl: str = "auto", *, gradient: str = "reparam") -> str:
        return resolve_kl(kl, gradient, kl != "monte_carlo" and self.has_analytic_kl, "ConditionalVAE")

    def sample_prior(self, key, num_samples: int):
        return self.model.sample(key, self.y, num_samples)

    def reconstruct(self, key, x):
        return self.decode_mean(self.proposal(x).sample(seed=key))


# ----------------------------------------------------------------------------------------------
# Labelled batches.
# ----------------------------------------------------------------------------------------------


def pack_labels(images, labels, num_classes: int) -> np.ndarray:
    """Append each point's one-hot label to its flattened image: `(N, D + C)`, for `train.fit` and `make_step`.

    Args:
      images: `(N, ...)`: uint8 grey levels (the label columns are 0/255, which
        `binarize="dynamic"` keeps exactly) or binary/real values (label columns 0/1, same dtype;
        bool becomes float32).
      labels: `int[N]` in `0 .. C-1`, or `-1` for an unlabelled point (all-zero label columns).
      num_classes: $C$.

    Returns:
      A NumPy array `(N, D + C)`.
    """
    num_classes = _checks.check_positive_int(num_classes, "num_classes")
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim < 1 or labels.shape != images.shape[:1]:
        raise ValueError(f"`labels` must have shape (N,) = {images.shape[:1]}, one per image; got {labels.shape}.")
    if labels.dtype.kind not in "iu":
        raise TypeError(f"`labels` must be integers (-1 for unlabelled), got dtype {labels.dtype}.")
    if labels.size and (labels.min() < -1 or labels.max() >= num_classes):
        raise ValueError(f"`labels` must lie in -1 .. {num_classes - 1} (-1 = unlabelled); got {labels.min()} .. {labels.max()}.")
    flat = images.reshape(images.shape[0], -1)
    if flat.dtype == bool:
        flat = flat.astype(np.float32)
    one_hot = (labels[:, None] == np.arange(num_classes)[None, :]).astype(flat.dtype)
    if flat.dtype == np.uint8:
        one_hot = one_hot * np.uint8(255)
    return np.concatenate([flat, one_hot], axis=1)


def unpack_labels(packed, num_classes: int):
    """Split one packed point `(D + C,)` into `(x, y)`: `x` `(D,)` and the label vector `(C,)` (zeros if unlabelled)."""
    packed = jnp.asarray(packed)
    if packed.ndim != 1 or packed.shape[0] <= num_classes:
        raise ValueError(
            f"A packed point must have shape (D + C,) with C = {num_classes} label columns (ONE point; batch "
            f"with jax.vmap), got {packed.shape}."
        )
    return packed[:-num_classes], packed[-num_classes:]


class _Packed:
    """A `ConditionalVAE` read on packed points `[x, onehot(y)]`: the model `train.objective` sees."""

    def __init__(self, model: ConditionalVAE):
        if not isinstance(model, ConditionalVAE):
            raise TypeError(f"conditional.objective trains a ConditionalVAE, got {type(model).__name__}.")
        self.model = model

    def _split(self, xy):
        check_shape(xy, (self.model.data_dim + self.model.num_classes,), "batch row", " (an image and its one-hot label, `pack_labels`)")
        return unpack_labels(xy, self.model.num_classes)

    def proposal(self, xy):
        return self.model.proposal(*self._split(xy))

    def log_likelihood(self, xy, z):
        x, y = self._split(xy)
        return self.model.log_likelihood(x, z, y)

    def log_prior(self, z):
        return self.model.log_prior(z)

    def log_joint(self, xy, z):
        x, y = self._split(xy)
        return self.model.log_joint(x, z, y)

    def analytic_kl(self, xy, *, per_dimension: bool = False, proposal=None):
        x, y = self._split(xy)
        return self.model.analytic_kl(x, y, per_dimension=per_dimension, proposal=proposal)

    @property
    def has_analytic_kl(self) -> bool:
        return self.model.has_analytic_kl

    def kl_mode(self, kl: str = "auto", *, gradient: str = "reparam") -> str:
        return resolve_kl(kl, gradient, kl != "monte_carlo" and self.has_analytic_kl, "ConditionalVAE")


def objective(name: str = "elbo", **kwargs):
    r"""A training objective for a `ConditionalVAE` on packed batches `(B, D + C)` (`pack_labels`).

    `elbojax.train.objective(name, **kwargs)` with each point's bound on $\log p(x \mid y)$; every
    option of `train.objective` applies (gradient estimators, KL annealing, $\beta$, free bits,
    the closed-form KL). Every row needs a label.

    Args:
      name: `"elbo"` or `"iwae"`.
      **kwargs: as `elbojax.train.objective`.

    Returns:
      `objective(keys, model, batch, step) -> Terms`.
    """
    from elbojax import train

    base = train.objective(name, **kwargs)

    def batch_objective(keys, model, batch, step):
        return base(keys, _Packed(model), batch, step)

    return batch_objective


# ----------------------------------------------------------------------------------------------
# M2.
# ----------------------------------------------------------------------------------------------


class MLPClassifier(nnx.Module):
    r"""$q_\phi(y \mid x) = \mathrm{softmax}(\ell_\phi(x))$: an MLP returning the $C$ logits for one `x`.

    Args:
      data_dim: $D$.
      num_classes: $C$.
      hidden: widths of the hidden layers.
      activation: the non-linearity after each hidden layer.
      rngs: the initialisation randomness.
      param_dtype: dtype of the parameters.
    """

    def __init__(
        self,
        data_dim: int,
        num_classes: int,
        hidden: Sequence[int] = (200,),
        activation: Callable = jnp.tanh,
        *,
        rngs: nnx.Rngs,
        param_dtype=jnp.float32,
    ):
        self.data_dim = _checks.check_positive_int(data_dim, "data_dim")
        self.num_classes = _checks.check_positive_int(num_classes, "num_classes")
        self.trunk = MLP(self.data_dim, hidden, activation, rngs=rngs, param_dtype=param_dtype)
        self.head = linear(self.trunk.out_dim, self.num_classes, rngs=rngs, param_dtype=param_dtype)

    def __call__(self, x):
        """The logits `(C,)` for one `x` `(D,)`."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        return self.head(self.trunk(x))


class SemiSupervisedVAE(_LabelConditioned):
    r"""Kingma et al.'s M2: $p(y)\,p(w)\,p_\theta(x \mid y, w)$ with $q_\phi(y \mid x)\,q_\phi(w \mid x, y)$.

    $y$ is one of $C$ classes with a uniform prior, $w$ the continuous rest ("style"). The latent
    of one sample is the pair `(c, w)`: `log_joint(x, (c, w))` $= \log p(x \mid c, w) + \log p(w)
    - \log C$, the signature `elbojax.enumerated_mixed_elbo` takes, with `continuous_proposal(x)`
    giving $c \mapsto q(w \mid x, c)$ and `classifier_logits(x)` the logits of $q(y \mid x)$.

    Args:
      classifier: $q_\phi(y \mid x)$, a module mapping one `x` `(D,)` to `C` logits
        (`MLPClassifier`).
      encoder: $q_\phi(w \mid x, y)$ on $[x, \mathrm{onehot}(y)]$: `data_dim` $= D + C$ (a
        `GaussianMLPEncoder`).
      decoder: $p_\theta(x \mid y, w)$ on $[w, \mathrm{onehot}(y)]$: `latent_dim` $= d + C$.
      prior: $p(w)$ over $d$ dimensions.
      num_classes: $C$.
      likelihood: as `VAE`.

    References:
      Kingma, Rezende, Mohamed & Welling, *Semi-Supervised Learning with Deep Generative Models*,
      NeurIPS 2014, https://arxiv.org/abs/1406.5298
    """

    def __init__(self, classifier, encoder, decoder, prior, *, num_classes: int, likelihood: str | None = None):
        super().__init__(encoder, decoder, prior, num_classes=num_classes, likelihood=likelihood)
        if getattr(classifier, "num_classes", self.num_classes) != self.num_classes:
            raise ValueError(f"classifier.num_classes ({classifier.num_classes}) must equal num_classes ({self.num_classes}).")
        if getattr(classifier, "data_dim", decoder.data_dim) != decoder.data_dim:
            raise ValueError(f"classifier.data_dim ({classifier.data_dim}) must equal decoder.data_dim ({decoder.data_dim}).")
        self.classifier = classifier

    def classifier_logits(self, x):
        r"""The logits of $q_\phi(y \mid x)$, shape `(C,)`, for one `x` `(D,)`."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        return self.classifier(x)

    def classify(self, x):
        r"""$\arg\max_c q_\phi(c \mid x)$: the predicted class of one `x` (an int32 scalar); -1 if a
        logit is NaN (`argmax` would name a class: the first NaN, or class 0)."""
        logits = self.classifier_logits(x)
        return jnp.where(jnp.any(jnp.isnan(logits)), -1, jnp.argmax(logits)).astype(jnp.int32)

    def continuous_proposal(self, x) -> Callable:
        r"""$c \mapsto q_\phi(w \mid x, c)$ for one `x`; `c` an integer class or a one-hot `(C,)`."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        return lambda c: self.proposal(x, c)

    def log_class_prior(self):
        r"""$\log p(y) = -\log C$ (uniform)."""
        return -math.log(self.num_classes)

    def log_joint(self, x, latent):
        r"""$\log p(x, c, w) = \log p_\theta(x \mid c, w) + \log p(w) + \log p(c)$ for `latent = (c, w)`."""
        c, w = latent
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        output = self.decoder_output(w, c)
        return LIKELIHOODS[self.likelihood].log_prob(x, output) + self.log_prior(w) + self.log_class_prior()

    def labelled_bound(self, key, x, y, *, num_samples: int = 1, gradient: str = "reparam", chunk_size: int | None = None):
        r"""$\mathcal{L}(x, y) \le \log p(x, y)$ (eq. 6): `elbojax.elbo` of $\log p(x, y, w)$ with $q(w \mid x, y)$.

        Args:
          key: a JAX PRNG key.
          x: one data point `(D,)`.
          y: its label, an integer class or one-hot `(C,)`.
          num_samples, gradient, chunk_size: as `elbojax.elbo` (over $w$).
        """
        return elbo(
            key, x, lambda x_, w: self.log_joint(x_, (y, w)), self.continuous_proposal(x)(y),
            num_samples=num_samples, gradient=gradient, chunk_size=chunk_size,
        )

    def class_bounds(self, key, x, *, num_samples: int = 1, gradient: str = "reparam", chunk_size: int | None = None):
        r"""$\mathcal{L}(x, c)$ for every class, shape `(C,)`; class $c$ with key `fold_in(key, c)`.

        The keys of `enumerated_mixed_elbo`, so `unlabelled_bound` is
        $\sum_c q(c \mid x)[\,\text{these} - \log q(c \mid x)]$ exactly.
        """
        classes = jnp.arange(self.num_classes)
        bound = lambda c: self.labelled_bound(
            jax.random.fold_in(key, c), x, c, num_samples=num_samples, gradient=gradient, chunk_size=chunk_size
        )
        return jax.vmap(bound)(classes)

    def unlabelled_bound(self, key, x, *, num_samples: int = 1, gradient: str = "reparam", chunk_size: int | None = None):
        r"""$\mathcal{U}(x) = \sum_c q(c \mid x)[\mathcal{L}(x, c) - \log q(c \mid x)] \le \log p(x)$ (eq. 7).

        `elbojax.enumerated_mixed_elbo` with the classifier's logits: the class summed exactly,
        $w$ sampled ($K$ samples per class).
        """
        return enumerated_mixed_elbo(
            key, x, self.log_joint, self.classifier_logits(x), self.continuous_proposal(x),
            num_samples=num_samples, chunk_size=chunk_size, gradient=gradient,
        )



def semi_supervised_objective(*, alpha: float, num_samples: int = 1, gradient: str = "reparam", chunk_size: int | None = None):
    r"""M2's training objective on packed batches `(B, D + C)`, some rows labelled (`pack_labels`).

    For each row, with $q(c \mid x)$ the classifier,
    $$J(x) = \begin{cases} \mathcal{L}(x, y) + \alpha \log q(y \mid x) & \text{labelled},\\
      \mathcal{U}(x) = \sum_c q(c \mid x)[\mathcal{L}(x, c) - \log q(c \mid x)] & \text{unlabelled}
      \ (\text{all-zero label columns}),\end{cases}$$
    averaged over the batch (Kingma et al. 2014, eq. 9). The $C$ class bounds are computed once
    per row (`SemiSupervisedVAE.class_bounds`) and serve both cases, so a row costs $C \cdot K$
    decoder calls whether it is labelled or not.

    **$\alpha$.** Kingma et al. weigh $\mathbb{E}_{\text{labelled}}[\log q(y \mid x)]$ by
    $\alpha_{\mathrm{paper}} = 0.1 N$ against a bound summed over all $N$ points; per point, with
    batches drawn uniformly, that is `alpha` $= 0.1 N / N_{\text{labelled}}$ here.

    Args:
      alpha: the weight of $\log q(y \mid x)$ on each labelled row, a number >= 0.
      num_samples: $K$ samples of $w$ per class.
      gradient, chunk_size: as `elbojax.elbo` (over $w$).

    Returns:
      `objective(keys, model, batch, step) -> Terms` for a `SemiSupervisedVAE` (the KL is not
      reported: NaN).
    """
    alpha = _checks.check_finite_nonnegative(alpha, "alpha")
    _checks.check_positive_int(num_samples, "num_samples")

    def batch_objective(keys, model, batch, step):
        from elbojax.train import Terms

        if not isinstance(model, SemiSupervisedVAE):
            raise TypeError(f"semi_supervised_objective trains a SemiSupervisedVAE, got {type(model).__name__}.")
        num_classes = model.num_classes

        def point(key, packed):
            check_shape(packed, (model.data_dim + num_classes,), "batch row", " (an image and its one-hot label, `pack_labels`)")
            x, y = unpack_labels(packed, num_classes)
            bounds = model.class_bounds(key, x, num_samples=num_samples, gradient=gradient, chunk_size=chunk_size)
            log_q = jax.nn.log_softmax(model.classifier_logits(x))
            unlabelled = _expected_log_ratio(log_q, bounds)
            label = jnp.argmax(y)
            labelled = bounds[label] + alpha * log_q[label]
            return jnp.where(jnp.sum(y) > 0.5, labelled, unlabelled)

        values = jax.vmap(point)(keys, batch)
        return Terms(jnp.mean(values), jnp.full((), jnp.nan, values.dtype), jnp.ones((), values.dtype))

    return batch_objective
