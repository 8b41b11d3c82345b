r"""The VAE: an encoder $q_\phi(z \mid x)$, a decoder $p_\theta(x \mid z)$ and a prior $p(z)$ in one module.

`VAE` only ties the parts together; the bounds are elbojax's own functions, which take the
model's `log_joint` and `proposal(x)` unchanged::

    graphdef, state = nnx.split(vae)

    @jax.jit
    def loss(state, key, x):                      # x: one data point; batch with jax.vmap
        vae = nnx.merge(graphdef, state)
        return -elbojax.iwae_bound(key, x, vae.log_joint, vae.proposal(x),
                                   num_samples=50, gradient="dreg")

    grads = jax.grad(loss)(state, key, x)

Keys are passed at call time; the modules hold no random state after construction.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from elbojax.estimators import elbo as mc_elbo
from elbojax.diagnostics import _fused_kl_per_dimension
from elbojax.estimators import elbo_analytic_kl
from elbojax.models._layers import ONE_POINT, ONE_SAMPLE, check_choice, check_shape
from elbojax.models.likelihoods import bernoulli_log_likelihood, gaussian_log_likelihood
from elbojax.proposals import closed_form_kl

KL_CHOICES = ("auto", "analytic", "monte_carlo")


class _Likelihood(NamedTuple):
    log_prob: object  # (x, decoder output) -> scalar
    mean: object  # decoder output -> E[x | z]


LIKELIHOODS = {
    "bernoulli": _Likelihood(bernoulli_log_likelihood, jax.nn.sigmoid),
    "gaussian": _Likelihood(lambda x, out: gaussian_log_likelihood(x, *out), lambda out: out[0]),
}


def resolve_kl(
    kl: str, gradient: str, has_closed_form: bool, model: str,
    why_none: str = "(e.g. a mixture or VampPrior prior)",
) -> str:
    """Which ELBO `kl` asks for: `"analytic"` (closed-form KL) or `"monte_carlo"`.

    `"auto"` is analytic where the pair has a closed form and the gradient is the plain
    reparameterisation one (`elbo_analytic_kl` offers no other), Monte Carlo otherwise.
    `why_none` says, in the error for `kl="analytic"`, why the pair has no closed form.
    """
    check_choice(kl, KL_CHOICES, "kl")
    if kl == "auto":
        return "analytic" if has_closed_form and gradient == "reparam" else "monte_carlo"
    if kl == "analytic" and gradient != "reparam":
        raise ValueError(
            f"kl='analytic' (elbojax.elbo_analytic_kl) has only the reparameterisation gradient; got "
            f"gradient={gradient!r}. Use kl='monte_carlo' for {model}.elbo(..., gradient={gradient!r})."
        )
    if kl == "analytic" and not has_closed_form:
        raise ValueError(
            f"kl='analytic' needs a closed-form KL(q || prior), and {model} has none for its proposal "
            f"and prior {why_none}; use kl='auto' or 'monte_carlo'."
        )
    return kl


def _resolve_likelihood(decoder, likelihood: str | None) -> str:
    """The likelihood's name: the one given, else the decoder's own; a contradiction is an error."""
    declared = getattr(decoder, "likelihood", None)
    if likelihood is None and declared is None:
        raise ValueError(
            f"{type(decoder).__name__} does not declare its likelihood; pass likelihood='bernoulli' or 'gaussian'."
        )
    likelihood = check_choice(declared if likelihood is None else likelihood, tuple(LIKELIHOODS), "likelihood")
    if declared is not None and declared != likelihood:
        raise ValueError(
            f"likelihood={likelihood!r} contradicts the decoder: {type(decoder).__name__} gives a "
            f"{declared!r} likelihood."
        )
    return likelihood


_INTERFACES = (  # what VAE reads of each part, and what to pass instead
    ("encoder", ("data_dim", "latent_dim"), "a GaussianMLPEncoder"),
    ("decoder", ("__call__",), "a BernoulliMLPDecoder or GaussianMLPDecoder"),
    ("prior", ("latent_dim", "log_prob"), "a StandardNormalPrior, MixturePrior or VampPrior"),
)


def _check_sizes(encoder, decoder, prior) -> None:
    parts = {"encoder": encoder, "decoder": decoder, "prior": prior}
    for name, attributes, instead in _INTERFACES:
        missing = [a for a in attributes if not hasattr(parts[name], a)]
        if missing:
            raise TypeError(
                f"`{name}` must be {instead} (or a module with {', '.join(attributes)}); got "
                f"{type(parts[name]).__name__}, which has no {', '.join(missing)}."
            )
    latent = {
        "encoder.latent_dim": encoder.latent_dim,
        "decoder.latent_dim": getattr(decoder, "latent_dim", encoder.latent_dim),
        "prior.latent_dim": prior.latent_dim,
    }
    if len(set(latent.values())) != 1:
        raise ValueError(f"The latent sizes must agree, got {latent}.")
    data_dim = getattr(decoder, "data_dim", encoder.data_dim)
    if data_dim != encoder.data_dim:
        raise ValueError(
            f"The data sizes must agree, got encoder.data_dim={encoder.data_dim} and decoder.data_dim={data_dim}."
        )


class VAE(nnx.Module):
    r"""A VAE: $p_\theta(x, z) = p(z)\, p_\theta(x \mid z)$ with the amortised proposal $q_\phi(z \mid x)$.

    Args:
      encoder: a `GaussianMLPEncoder` (or any module with `data_dim`, `latent_dim` and
        `__call__(x)` returning a distrax distribution for one `x`).
      decoder: a `BernoulliMLPDecoder`, a `GaussianMLPDecoder`, or any module mapping one `z`
        to the likelihood's parameters (logits for `"bernoulli"`, `(mean, log_scale)` for
        `"gaussian"`).
      prior: a `StandardNormalPrior`, `MixturePrior` or `VampPrior` (anything with
        `latent_dim`, `log_prob(z)`, `sample(key, n)` and `distribution()`).
      likelihood: `"bernoulli"` or `"gaussian"`; `None` takes the decoder's own
        (`decoder.likelihood`). A name that contradicts the decoder's is a `ValueError`.

    Every method works on ONE data point `x` of shape `(data_dim,)` and ONE latent `z` of shape
    `(latent_dim,)`; batch with `jax.vmap`.

    The ELBO's KL term: `has_analytic_kl` says whether $\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))$
    has a closed form (distrax is asked: yes for the standard normal prior, no for the mixtures),
    and `elbo(key, x, kl="auto")` uses it when it does (`kl_mode()` says which it picked).
    """

    def __init__(self, encoder, decoder, prior, likelihood: str | None = None):
        _check_sizes(encoder, decoder, prior)
        self.likelihood = _resolve_likelihood(decoder, likelihood)
        self.encoder = encoder
        self.decoder = decoder
        self.prior = prior

    @property
    def data_dim(self) -> int:
        return self.encoder.data_dim

    @property
    def latent_dim(self) -> int:
        return self.encoder.latent_dim

    def proposal(self, x):
        r"""$q_\phi(z \mid x)$ for one `x` of shape `(data_dim,)`: a distrax distribution."""
        return self.encoder(x)

    def log_likelihood(self, x, z):
        r"""$\log p_\theta(x \mid z)$ for one `x` `(data_dim,)` and one `z` `(latent_dim,)`: a scalar."""
        check_shape(x, (self.data_dim,), "x", ONE_POINT)
        return LIKELIHOODS[self.likelihood].log_prob(x, self.decoder(z))

    def log_prior(self, z):
        r"""$\log p(z)$ for one `z` of shape `(latent_dim,)`: a scalar."""
        check_shape(z, (self.latent_dim,), "z", ONE_SAMPLE)
        return self.prior.log_prob(z)

    def log_joint(self, x, z):
        r"""$\log p_\theta(x, z) = \log p_\theta(x \mid z) + \log p(z)$: a scalar."""
        return self.log_likelihood(x, z) + self.log_prior(z)

    def analytic_kl(self, x, *, per_dimension: bool = False, proposal=None):
        r"""$\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))$ in closed form, for one `x` of shape `(data_dim,)`.

        Args:
          x: one data point.
          per_dimension: return the KL of each latent dimension, shape `(latent_dim,)`, instead
            of their sum (free bits need it). Needs a diagonal Gaussian $q$ and prior
            (`elbojax.diagnostics.kl_per_dimension`).
          proposal: `self.proposal(x)` if the caller has it already. Pass it when the same loss
            also samples from $q$: a second encoder pass is a second backward pass too (about 20%
            of an ELBO training step on the IWAE model).

        Raises:
          ValueError: where the pair has no closed form (`has_analytic_kl` is False), or
            `per_dimension` is asked of a prior that is not a diagonal Gaussian.
        """
        proposal = self.proposal(x) if proposal is None else proposal
        prior = self.prior.distribution()
        if not per_dimension:
            return closed_form_kl(proposal, prior)
        parts = [getattr(d, name, None) for d in (proposal, prior) for name in ("loc", "scale_diag")]
        if any(part is None for part in parts):
            raise ValueError(
                "The KL per dimension needs a diagonal Gaussian proposal and prior (with `loc` and "
                f"`scale_diag`), got {type(proposal).__name__} and {type(prior).__name__}."
            )
        q_loc, q_scale, p_loc, p_scale = parts
        return _fused_kl_per_dimension(q_loc, q_scale, p_loc, p_scale)

    def decode_mean(self, z):
        r"""$\mathbb{E}[x \mid z]$ for one `z`: the pixel probabilities (Bernoulli) or the mean (Gaussian)."""
        return LIKELIHOODS[self.likelihood].mean(self.decoder(z))

    def sample_prior(self, key, num_samples: int):
        r"""`(z, means)`: `z` `(num_samples, latent_dim)` from $p(z)$, and `means` `(num_samples, data_dim)`.

        `means[i]` $= \mathbb{E}[x \mid z_i]$: pixel probabilities (Bernoulli) or the mean (Gaussian).
        """
        z = self.prior.sample(key, num_samples)
        return z, jax.vmap(self.decode_mean)(z)

    def reconstruct(self, key, x):
        r"""$\mathbb{E}[x \mid z]$ at one $z \sim q_\phi(z \mid x)$, shape `(data_dim,)`."""
        return self.decode_mean(self.proposal(x).sample(seed=key))

    @property
    def has_analytic_kl(self) -> bool:
        r"""Whether $\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))$ has a closed form (distrax is asked, abstractly)."""
        if not hasattr(self.prior, "distribution"):
            return False
        found = []

        def probe(x):
            proposal, prior = self.proposal(x), self.prior.distribution()
            try:
                closed_form_kl(proposal, prior)
            except ValueError:
                found.append(False)
            else:
                found.append(True)

        jax.eval_shape(probe, jax.ShapeDtypeStruct((self.data_dim,), jnp.float32))
        return found[0]

    def kl_mode(self, kl: str = "auto", *, gradient: str = "reparam") -> str:
        """What `elbo(..., kl=kl, gradient=gradient)` computes: `"analytic"` or `"monte_carlo"`."""
        return resolve_kl(kl, gradient, kl != "monte_carlo" and self.has_analytic_kl, "VAE")

    def elbo(
        self,
        key,
        x,
        *,
        num_samples: int = 1,
        kl: str = "auto",
        gradient: str = "reparam",
        chunk_size: int | None = None,
    ):
        r"""The ELBO of one data point, with the KL in closed form where it has one.

        * `kl="analytic"`: $\frac1K\sum_k \log p_\theta(x \mid z_k) - \mathrm{KL}(q \,\|\, p)$
          (`elbojax.elbo_analytic_kl`); a `ValueError` if the pair has no closed form.
        * `kl="monte_carlo"`: $\frac1K\sum_k \log p_\theta(x, z_k) - \log q_\phi(z_k \mid x)$
          (`elbojax.elbo`).
        * `kl="auto"`: analytic when `has_analytic_kl` and `gradient="reparam"`, else Monte Carlo;
          `kl_mode()` says which.

        Args:
          key: a JAX PRNG key.
          x: one data point, shape `(data_dim,)`.
          num_samples: $K$.
          kl: `"auto"`, `"analytic"` or `"monte_carlo"`.
          gradient: `"reparam"`, or `"stl"` / `"score"` (Monte Carlo only); see `elbojax.elbo`.
          chunk_size: as `elbojax.elbo`.

        Returns:
          A scalar (the bound; higher is better).
        """
        mode = self.kl_mode(kl, gradient=gradient)
        if mode == "analytic":
            return elbo_analytic_kl(
                key, x, self.log_likelihood, self.proposal(x), self.prior.distribution(),
                num_samples=num_samples, chunk_size=chunk_size,
            )
        return mc_elbo(
            key, x, self.log_joint, self.proposal(x),
            num_samples=num_samples, chunk_size=chunk_size, gradient=gradient,
        )
