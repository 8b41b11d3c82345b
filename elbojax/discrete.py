r"""Discrete latents: exact enumeration, and the Concrete (Gumbel-softmax) relaxations.

A discrete latent has no pathwise gradient, so a Monte Carlo ELBO needs another way to
differentiate with respect to the proposal. There are three remedies, in order of preference:
sum over the latent, estimate the gradient by the score function, or relax the latent.

| the latent | use | value | gradient | cost per data point |
|---|---|---|---|---|
| one categorical with $C$ classes, or $d \le 20$ bits | enumeration: `enumerated_elbo`, `enumerated_elbo_bernoulli`, `enumerated_log_marginal` | exact | exact | $C$ (or $2^d$) calls of `log_joint` |
| a categorical next to a continuous latent | `enumerated_mixed_elbo`: sum over $c$, sample $w$ | unbiased | unbiased, pathwise in $w$ | $C \cdot K$ calls |
| too many configurations to sum | `elbojax.elbo(..., gradient="score")`, `elbojax.iwae_bound(..., gradient="vimco")` with a `distrax.Categorical`/`Bernoulli` proposal | unbiased | unbiased, high variance | $K$ calls |
| too many configurations, and a model that accepts relaxed values | `RelaxedOneHotCategorical`, `RelaxedBernoulli` as proposal and prior | a *different* bound | pathwise, low variance, biased for the discrete model | $K$ calls |

**Enumerate** whenever the sum is affordable. The expectation over the discrete latent is then
summed instead of sampled (Rao-Blackwellisation): no key, zero variance, and `jax.grad` gives the
exact gradient for the model and for the proposal alike. With a continuous latent beside the
discrete one, sum over the discrete part and reparameterise the rest.

**Score function / VIMCO** when the sum is too large. They estimate the gradient of the discrete
objective without bias; their variance, reduced by the leave-one-out baselines of
`elbojax.gradients`, is the price.

**Relax** when the variance of the score function is too high and the model can take a point
of the simplex (or of $(0, 1)$) in place of a one-hot vector (or a bit). The Concrete
distribution replaces the argmax of the Gumbel-max trick by a softmax at temperature
$\tau$; its samples are reparameterisable and its density is known, so a relaxed proposal with a
relaxed prior of the same family gives a true ELBO of a *relaxed* model, optimised with the
pathwise gradient (Maddison et al. 2017). That is not the ELBO of the discrete model: the bias
vanishes as $\tau \to 0$, while the variance of the gradient grows. Report the discrete bound
(enumerated, or with a score-function estimator) at evaluation time.

**Straight-through** (`straight_through`, `straight_through_bernoulli`) feeds the model the
exact discrete sample (the argmax of the same Gumbel perturbation) and back-propagates the
relaxed sample's gradient. The forward value is an exact sample, the gradient is biased and there is no
density for the hard value: use it where the model needs a hard value, not for a relaxed ELBO.

**Relaxed objectives at low temperature.** At small $\tau$ a coordinate of a relaxed sample can
underflow to exactly 0 (or a binary one round to exactly 0 or 1), especially in float32. The
proposal's own log-density stays finite, because `sample_and_log_prob` computes it from the
sample's logarithm (or logit), never from the rounded value. So do the estimators that evaluate
$\log q$ again at their samples (`"stl"`, `"dreg"`, `"score"`, `"vimco"`, `partial_iwae_bound`):
these distributions expose the point they sample through (`sample_log_space`,
`log_prob_from_log_space`; see `elbojax.gradients.in_log_space`), and the estimators read $\log q$
from it. But a prior's `log_prob(z)` has only `z`. Then work in log space: a proposal and prior
on the logarithm of the sample, TFP's `ExpRelaxedOneHotCategorical(τ, logits=...)` (through
`elbojax.as_proposal`) or, for a binary Concrete, `distrax.Logistic(logits / τ, 1 / τ)` on its
logit, with the decoder applying `exp` (or `jax.nn.sigmoid`). The change of variables is the
same for $q$ and $p$, so every log ratio, hence the ELBO, is unchanged (the ExpConcrete of
Maddison et al. 2017, appendix).

Shapes: `x` is one data point; `log_joint(x, z)` returns a scalar for ONE `z`; every objective here
returns a scalar. Batch with `jax.vmap`.

References:
  Jang, Gu & Poole, *Categorical Reparameterization with Gumbel-Softmax*, ICLR 2017,
  https://arxiv.org/abs/1611.01144;
  Maddison, Mnih & Teh, *The Concrete Distribution: A Continuous Relaxation of Discrete Random
  Variables*, ICLR 2017, https://arxiv.org/abs/1611.00712;
  Kingma, Rezende, Mohamed & Welling, *Semi-Supervised Learning with Deep Generative Models*,
  NeurIPS 2014, https://arxiv.org/abs/1406.5298 (the sum over a discrete label beside a
  continuous latent);
  Bengio, Léonard & Courville, *Estimating or Propagating Gradients Through Stochastic Neurons
  for Conditional Computation*, 2013, https://arxiv.org/abs/1308.3432 (straight-through).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elbojax import _checks
from elbojax.estimators import elbo

MAX_ENUMERATED_BITS = 20
"""The most Bernoulli bits `enumerated_elbo_bernoulli` sums over: $2^{20} \\approx 10^6$ calls of `log_joint`."""


# ----------------------------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------------------------


def _float_array(value: Any, name: str) -> jax.Array:
    """`value` as a floating-point array (integers are promoted), or a `TypeError`."""
    array = jnp.asarray(value)
    if jnp.issubdtype(array.dtype, jnp.integer):
        return array.astype(jnp.result_type(float))
    if not jnp.issubdtype(array.dtype, jnp.floating):
        raise TypeError(f"`{name}` must be a floating-point array, got dtype {array.dtype}.")
    return array


def _log_normalized(logits: jax.Array) -> jax.Array:
    """`log_softmax(logits)`, with logits of +inf taken as the limit: equal mass on those classes
    (`log_softmax` gives NaN there, from inf - inf)."""
    top = jnp.isposinf(logits)
    # A NaN logit stays NaN in the limit too (it would have become -inf: a silent finite ELBO).
    limit = jnp.where(top, jnp.zeros_like(logits), jnp.where(jnp.isnan(logits), logits, jnp.full_like(logits, -jnp.inf)))
    return jax.nn.log_softmax(jnp.where(jnp.any(top), limit, logits))


def _finite_logits(logits: Any) -> jax.Array:
    """A relaxed distribution's logits: floating point, and finite when they are concrete."""
    logits = _float_array(logits, "logits")
    if not isinstance(logits, jax.core.Tracer) and not np.isfinite(np.asarray(logits)).all():
        raise ValueError("`logits` of a relaxed distribution must be finite (an infinite logit makes its density NaN).")
    return logits


def _check_vector_logits(logits: Any, name: str) -> jax.Array:
    logits = _float_array(logits, name)
    if logits.ndim != 1 or logits.shape[0] < 1:
        raise ValueError(f"`{name}` must have shape (C,) with C >= 1, one logit per class; got {logits.shape}.")
    return logits


def _check_temperature(temperature: Any, dtype) -> jax.Array:
    """A positive scalar temperature in `dtype`; its sign is checked whenever it is not traced."""
    shape = jnp.shape(temperature)
    if shape != ():
        raise ValueError(f"`temperature` must be a scalar, got shape {shape}.")
    kind = jnp.result_type(temperature)
    if not (jnp.issubdtype(kind, jnp.integer) or jnp.issubdtype(kind, jnp.floating)):
        raise TypeError(f"`temperature` must be a real number, got dtype {kind}.")
    if not isinstance(temperature, jax.core.Tracer) and not 0 < float(temperature) < math.inf:
        raise ValueError(f"`temperature` must be finite and > 0, got {float(temperature)}.")
    return jnp.asarray(temperature).astype(dtype)


def _check_value_shape(value, event_shape: tuple[int, ...], name: str) -> None:
    shape = tuple(jnp.shape(value))
    if len(shape) < len(event_shape) or shape[len(shape) - len(event_shape) :] != event_shape:
        raise ValueError(
            f"`value` for {name}.log_prob must have shape (*sample_shape, *event_shape) with "
            f"event_shape = logits.shape = {event_shape}; got {shape}."
        )


# ----------------------------------------------------------------------------------------------
# Exact enumeration.
# ----------------------------------------------------------------------------------------------


def _expected_log_ratio(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
    r"""$\sum_i q_i(\log p_i - \log q_i)$ with $q_i = e^{\log q_i}$, a term with $q_i = 0$ counting as 0.

    $0 \cdot (\log p_i - \log q_i)$ is the limit $0$ even where $\log q_i = -\infty$ or
    $\log p_i = -\infty$; both `where`s keep those infinities out of the backward pass too. A NaN
    $\log p_i$ still propagates, so that a bug in `log_joint` is never hidden by $q_i = 0$.
    """
    q = jnp.exp(log_q)
    counted = (q != 0) | jnp.isnan(log_p)  # a NaN q counts too: NaN logits make the result NaN
    safe_log_q = jnp.where(q != 0, log_q, 0.0)
    log_ratio = jnp.where(counted, log_p - safe_log_q, 0.0)
    return jnp.sum(q * log_ratio)


def _log_joint_at_every_class(x, log_joint, num_categories: int) -> jax.Array:
    """`log_joint(x, c)` for `c = 0 .. C-1` (integer scalars), shape `(C,)`."""
    _checks.check_callable(log_joint, "log_joint")
    classes = jnp.arange(num_categories)
    _checks.check_scalar_output(log_joint, (x, classes[0]), "log_joint")
    return jax.vmap(log_joint, in_axes=(None, 0))(x, classes)


def enumerated_log_marginal(x, log_joint: Callable, num_categories: int) -> jax.Array:
    r"""The exact $\log p(x) = \log \sum_{c=0}^{C-1} p(x, c)$ of a model with one categorical latent.

    Computed as a log-sum-exp, so it is stable; if every $\log p(x, c)$ is $-\infty$ the result
    is $-\infty$.

    Args:
      x: one data point.
      log_joint: `log_joint(x, c) -> scalar`, $\log p(x, c)$ for one integer class `c` (an
        integer array of shape `()`), e.g. `elbojax.exact.GaussianMixture.log_joint`.
      num_categories: $C \ge 1$, a static int.

    Returns:
      A scalar.
    """
    num_categories = _checks.check_positive_int(num_categories, "num_categories")
    return jax.nn.logsumexp(_log_joint_at_every_class(x, log_joint, num_categories))


def enumerated_elbo(x, log_joint: Callable, proposal_logits) -> jax.Array:
    r"""The exact ELBO of a categorical proposal, summed over the $C$ classes instead of sampled.

    $$\mathrm{ELBO}(q) = \sum_{c=0}^{C-1} q(c)\,\big[\log p(x, c) - \log q(c)\big]
      = \log p(x) - \mathrm{KL}\big(q \,\|\, p(c \mid x)\big),\qquad
      q = \mathrm{softmax}(\text{proposal\_logits}).$$

    No key: the value is exact, and `jax.grad` gives the exact gradient with respect to both the
    proposal's logits and the model's parameters (closed over by `log_joint`). Classes with
    $q(c) = 0$ (a logit of $-\infty$) contribute exactly 0, and no NaN, to the value and the
    gradient; logits of $+\infty$ are the limit, $q$ uniform over those classes. With
    $q = p(c \mid x)$ the ELBO equals $\log p(x)$.

    Args:
      x: one data point.
      log_joint: `log_joint(x, c) -> scalar` for one integer class `c` of shape `()`.
      proposal_logits: `(C,)`, the unnormalised $\log q(c)$.

    Returns:
      A scalar.
    """
    proposal_logits = _check_vector_logits(proposal_logits, "proposal_logits")
    log_p = _log_joint_at_every_class(x, log_joint, proposal_logits.shape[0])
    return _expected_log_ratio(_log_normalized(proposal_logits), log_p)


def _bit_configurations(num_bits: int) -> jax.Array:
    """All $2^d$ configurations of $d$ bits, shape `(2**d, d)`; row $i$ holds the binary digits of $i$."""
    index = jnp.arange(2**num_bits)[:, None]
    return (index >> jnp.arange(num_bits)) & 1


def enumerated_elbo_bernoulli(x, log_joint: Callable, proposal_logits) -> jax.Array:
    r"""The exact ELBO of $d$ independent Bernoulli bits, summed over all $2^d$ configurations.

    $$\mathrm{ELBO}(q) = \sum_{z \in \{0, 1\}^d} q(z)\,\big[\log p(x, z) - \log q(z)\big],\qquad
      q(z) = \prod_{j=1}^d \sigma(a_j)^{z_j}\,\sigma(-a_j)^{1 - z_j},$$

    with $a$ = `proposal_logits`. Exact, with exact gradients; a bit with $a_j = \pm\infty$ is
    deterministic and its impossible configurations contribute exactly 0. The cost is $2^d$ calls
    of `log_joint`, all at once (vmapped), so $d$ is capped at `MAX_ENUMERATED_BITS` = 20.

    Args:
      x: one data point.
      log_joint: `log_joint(x, z) -> scalar` for one configuration `z`, an integer array of
        shape `(d,)` holding 0s and 1s (the dtype of a `distrax.Bernoulli` sample, so the same
        `log_joint` serves a Monte Carlo estimator with that proposal).
      proposal_logits: `(d,)`, $a_j = \log q(z_j = 1) - \log q(z_j = 0)$.

    Returns:
      A scalar.

    Raises:
      ValueError: if $d$ > `MAX_ENUMERATED_BITS`: use `elbojax.elbo(..., gradient="score")`,
        `elbojax.iwae_bound(..., gradient="vimco")` or `RelaxedBernoulli` instead.
    """
    proposal_logits = _float_array(proposal_logits, "proposal_logits")
    if proposal_logits.ndim != 1 or proposal_logits.shape[0] < 1:
        raise ValueError(
            f"`proposal_logits` must have shape (d,) with d >= 1, one logit per bit; got {proposal_logits.shape}."
        )
    num_bits = proposal_logits.shape[0]
    if num_bits > MAX_ENUMERATED_BITS:
        raise ValueError(
            f"enumerated_elbo_bernoulli sums over all 2**d configurations of the d bits: d = {num_bits} "
            f"would take {2**num_bits:,} calls of `log_joint` (at most {MAX_ENUMERATED_BITS} bits are "
            "enumerated). For more bits use elbojax.elbo(..., gradient='score'), "
            "elbojax.iwae_bound(..., gradient='vimco') or a RelaxedBernoulli proposal."
        )
    _checks.check_callable(log_joint, "log_joint")
    configurations = _bit_configurations(num_bits).astype(jnp.result_type(int))
    _checks.check_scalar_output(log_joint, (x, configurations[0]), "log_joint")
    # where, not z * log sigma(a): with a = -inf, 0 * log sigma(a) would be 0 * -inf = NaN.
    log_q_bits = jnp.where(
        configurations == 1, jax.nn.log_sigmoid(proposal_logits), jax.nn.log_sigmoid(-proposal_logits)
    )
    log_p = jax.vmap(log_joint, in_axes=(None, 0))(x, configurations)
    return _expected_log_ratio(jnp.sum(log_q_bits, axis=1), log_p)


def enumerated_mixed_elbo(
    key,
    x,
    log_joint: Callable,
    categorical_logits,
    continuous_proposal_fn: Callable,
    *,
    num_samples: int = 1,
    chunk_size: int | None = None,
    gradient: str = "reparam",
) -> jax.Array:
    r"""The ELBO of a categorical latent $c$ and a continuous $w$: $c$ summed, $w$ sampled.

    With $q(c, w) = q(c)\, q(w \mid c)$,
    $$\mathrm{ELBO} = \sum_{c=0}^{C-1} q(c)\Big[\mathbb{E}_{q(w \mid c)}\big[\log p(x, c, w)
      - \log q(w \mid c)\big] - \log q(c)\Big],$$
    the inner expectation estimated for every class by `elbojax.elbo` with $K$ samples
    $w_k \sim q(w \mid c)$. This is the unlabelled objective of the M2 model of Kingma et al.
    (2014), where $c$ is a class (or any discrete attribute) and $w$ the rest. The estimate is
    unbiased; its gradient is exact in $q(c)$'s logits given the inner estimates, and pathwise
    (or as `gradient` says) in $w$. When $q(c) = p(c \mid x)$ and $q(w \mid c) = p(w \mid x, c)$,
    every sample gives $\log p(x)$ exactly.

    Every class gets its own key, `jax.random.fold_in(key, c)`, so the $C$ inner estimates are
    independent. A class with $q(c) = 0$ contributes exactly 0.

    Args:
      key: a JAX PRNG key.
      x: one data point.
      log_joint: `log_joint(x, (c, w)) -> scalar`, $\log p(x, c, w)$ for one integer class `c`
        (shape `()`) and one sample `w` of $q(w \mid c)$.
      categorical_logits: `(C,)`, the unnormalised $\log q(c)$.
      continuous_proposal_fn: `continuous_proposal_fn(c)` returns $q(w \mid c)$ for one integer
        class `c` (a traced scalar: index arrays with it, or pass `jax.nn.one_hot(c, C)` to an
        encoder), as a distribution `elbojax.elbo` accepts, reparameterisable unless `gradient`
        is `"score"`.
      num_samples: $K \ge 1$ samples of $w$ for each class.
      chunk_size, gradient: passed to `elbojax.elbo` for every class (`"reparam"`, `"stl"` or
        `"score"` for $w$).

    Returns:
      A scalar.

    References:
      Kingma, Rezende, Mohamed & Welling, *Semi-Supervised Learning with Deep Generative
      Models*, NeurIPS 2014, eq. (7), https://arxiv.org/abs/1406.5298
    """
    _checks.check_key(key)
    categorical_logits = _check_vector_logits(categorical_logits, "categorical_logits")
    _checks.check_callable(log_joint, "log_joint")
    _checks.check_callable(continuous_proposal_fn, "continuous_proposal_fn")

    def inner_elbo(c):
        log_joint_given_c = lambda x_, w: log_joint(x_, (c, w))
        return elbo(
            jax.random.fold_in(key, c),
            x,
            log_joint_given_c,
            continuous_proposal_fn(c),
            num_samples=num_samples,
            chunk_size=chunk_size,
            gradient=gradient,
        )

    inner = jax.vmap(inner_elbo)(jnp.arange(categorical_logits.shape[0]))
    return _expected_log_ratio(_log_normalized(categorical_logits), inner)


# ----------------------------------------------------------------------------------------------
# Relaxations.
# ----------------------------------------------------------------------------------------------


def _concrete_log_density(logits, temperature, log_value):
    r"""Maddison et al.'s Concrete log-density at $x = e^{y}$, from $y = \log x$; one term per simplex.

    $$\log p(x) = \log (n-1)! + (n-1)\log\tau + \sum_k \big(l_k - (\tau + 1)\, y_k\big)
      - n \log \sum_k e^{l_k - \tau y_k}.$$
    """
    num = logits.shape[-1]
    return (
        math.lgamma(num)
        + (num - 1) * jnp.log(temperature)
        + jnp.sum(logits - (temperature + 1) * log_value, axis=-1)
        - num * jax.nn.logsumexp(logits - temperature * log_value, axis=-1)
    )


def _binary_concrete_log_density(logits, temperature, logit_value):
    r"""The binary Concrete log-density at $x = \sigma(y)$, from its logit $y$, elementwise.

    $y$ is Logistic with location $a/\tau$ and scale $1/\tau$; the change of variables
    $x = \sigma(y)$ adds $-\log x - \log(1 - x) = \mathrm{softplus}(-y) + \mathrm{softplus}(y)$:
    $$\log p(x) = \log\tau + (a - \tau y) - 2\,\mathrm{softplus}(a - \tau y)
      + \mathrm{softplus}(y) + \mathrm{softplus}(-y).$$
    """
    centred = logits - temperature * logit_value
    return (
        jnp.log(temperature)
        + centred
        - 2 * jax.nn.softplus(centred)
        + jax.nn.softplus(logit_value)
        + jax.nn.softplus(-logit_value)
    )


def _sum_trailing(values, num_axes: int):
    return jnp.sum(values, axis=tuple(range(values.ndim - num_axes, values.ndim)))


class _Relaxed:
    """Pytree plumbing shared by the relaxed distributions: `logits` and `temperature` are leaves."""

    logits: jax.Array
    temperature: jax.Array

    def tree_flatten(self):
        return (self.logits, self.temperature), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        del aux
        obj = object.__new__(cls)
        obj.logits, obj.temperature = children
        return obj


@jax.tree_util.register_pytree_node_class
class RelaxedOneHotCategorical(_Relaxed):
    r"""The Concrete (Gumbel-softmax) relaxation of a one-hot categorical, at temperature $\tau$.

    $$z = \mathrm{softmax}\big((l + g) / \tau\big),\qquad g_k \sim \mathrm{Gumbel}(0, 1),$$
    a reparameterisable point of the simplex; as $\tau \to 0$ it tends to the one-hot vector of
    $\mathrm{argmax}_k (l_k + g_k)$, an exact sample of $\mathrm{Categorical}(\mathrm{softmax}(l))$
    (the Gumbel-max trick). Its density with respect to the Lebesgue measure on the first $n - 1$
    coordinates (Maddison et al. 2017, Sec. 3) is
    $$p_{l, \tau}(z) = (n-1)!\,\tau^{n-1} \prod_{k=1}^n
      \frac{e^{l_k} z_k^{-\tau - 1}}{\sum_{i=1}^n e^{l_i} z_i^{-\tau}}.$$

    The whole `logits` array is ONE latent: `logits` of shape `(C,)` is one relaxed categorical,
    of shape `(m, C)` is $m$ independent ones (as in a Gumbel-softmax VAE), and `log_prob` sums
    over all of them, so that the distribution is a proposal for `elbojax.elbo`/`iwae_bound`.
    Pair it with a relaxed prior, `RelaxedOneHotCategorical(prior_logits, prior_temperature)`,
    inside `log_joint`: the result is the ELBO of the relaxed model, which is not the discrete
    model's (see the module docs).

    `sample_and_log_prob` computes the sample in log space, $\log z = $
    `log_softmax((logits + g) / τ)`, and the log-density from $\log z$, so it stays finite when a
    coordinate of $z$ underflows to 0 at low temperature; `log_prob(z)` has only $z$ and takes
    its logarithm. The logits must be finite (checked when they are concrete, not under
    `jax.jit`: a $-\infty$ logit makes the density NaN).

    Args:
      logits: `(..., C)` with $C \ge 2$, the unnormalised log-probabilities $l$ of each
        categorical; integers are promoted to float.
      temperature: $\tau > 0$, a scalar; it may be traced (annealed inside `jax.jit` without
        recompiling) and differentiated.

    References:
      Maddison, Mnih & Teh, ICLR 2017, https://arxiv.org/abs/1611.00712;
      Jang, Gu & Poole, ICLR 2017, https://arxiv.org/abs/1611.01144
    """

    def __init__(self, logits, temperature):
        logits = _finite_logits(logits)
        if logits.ndim < 1 or logits.shape[-1] < 2:
            raise ValueError(
                "`logits` must have shape (..., C) with C >= 2 classes (the last axis is the "
                f"simplex); got {logits.shape}."
            )
        self.logits = logits
        self.temperature = _check_temperature(temperature, logits.dtype)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.logits.shape)

    @property
    def num_categories(self) -> int:
        return self.logits.shape[-1]

    def _log_sample(self, seed, sample_shape):
        gumbel = jax.random.gumbel(seed, sample_shape + self.event_shape, self.logits.dtype)
        return jax.nn.log_softmax((self.logits + gumbel) / self.temperature, axis=-1)

    def _log_density(self, log_value):
        per_simplex = _concrete_log_density(self.logits, self.temperature, log_value)
        return _sum_trailing(per_simplex, len(self.event_shape) - 1)

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        """`z` of shape `(*sample_shape, *logits.shape)` and its log-density, shape `sample_shape`."""
        log_sample = self._log_sample(seed, _checks.sample_shape(sample_shape))
        return jnp.exp(log_sample), self._log_density(log_sample)

    def sample(self, *, seed, sample_shape=()):
        return jnp.exp(self._log_sample(seed, _checks.sample_shape(sample_shape)))

    # The log-space protocol (`elbojax.gradients.in_log_space`): the point is log z.
    def sample_log_space(self, *, seed, sample_shape=()):
        r"""$\log z$ of the sample `sample` draws with `seed`."""
        return self._log_sample(seed, _checks.sample_shape(sample_shape))

    def value_from_log_space(self, log_value):
        return jnp.exp(log_value)

    def log_prob_from_log_space(self, log_value):
        r"""The Concrete log-density at $z = e^{\log z}$, read from $\log z$ (finite where $z$ underflows)."""
        return self._log_density(log_value)

    def log_prob(self, value):
        """The Concrete log-density at `value` of shape `(*sample_shape, *logits.shape)`."""
        _check_value_shape(value, self.event_shape, type(self).__name__)
        return self._log_density(jnp.log(value))

    def __repr__(self):
        return f"RelaxedOneHotCategorical(event_shape={self.event_shape}, temperature={self.temperature})"



@jax.tree_util.register_pytree_node_class
class RelaxedBernoulli(_Relaxed):
    r"""The binary Concrete relaxation of independent Bernoulli bits, at temperature $\tau$.

    $$z = \sigma\big((a + L) / \tau\big),\qquad L = \log U - \log(1 - U) \sim \mathrm{Logistic}(0, 1),$$
    a reparameterisable point of $(0, 1)$ for each bit; as $\tau \to 0$ it tends to the bit
    $[a + L > 0]$, an exact $\mathrm{Bernoulli}(\sigma(a))$ sample. The density of each bit
    (Maddison et al. 2017, Sec. 3) is
    $$p_{a, \tau}(z) = \frac{\tau\, e^{a}\, z^{-\tau-1} (1 - z)^{-\tau-1}}
      {\big(e^{a} z^{-\tau} + (1 - z)^{-\tau}\big)^2}.$$

    The whole `logits` array is ONE latent of independent bits (shape `()` for one bit, `(d,)`
    for $d$), and `log_prob` sums over them. `sample_and_log_prob` computes the log-density from
    the logit $y = (a + L)/\tau$ of the sample, so it stays finite when $\sigma(y)$ rounds to
    exactly 0 or 1 at low temperature (float32 does for $|y| \gtrsim 17$); `log_prob(z)` has only
    $z$. For a relaxed objective at such temperatures, put `distrax.Logistic(logits / τ, 1 / τ)`
    on the logit and apply `jax.nn.sigmoid` in the model (see the module docs).

    Args:
      logits: any shape, $a = \log \frac{q(1)}{q(0)}$ of each bit, finite (checked when
        concrete); integers are promoted to float.
      temperature: $\tau > 0$, a scalar; may be traced and differentiated.

    References:
      Maddison, Mnih & Teh, ICLR 2017, https://arxiv.org/abs/1611.00712
    """

    def __init__(self, logits, temperature):
        self.logits = _finite_logits(logits)
        self.temperature = _check_temperature(temperature, self.logits.dtype)

    @property
    def event_shape(self) -> tuple[int, ...]:
        return tuple(self.logits.shape)

    def _logit_sample(self, seed, sample_shape):
        noise = jax.random.logistic(seed, sample_shape + self.event_shape, self.logits.dtype)
        return (self.logits + noise) / self.temperature

    def _log_density(self, logit_value):
        per_bit = _binary_concrete_log_density(self.logits, self.temperature, logit_value)
        return _sum_trailing(per_bit, len(self.event_shape))

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        """`z` of shape `(*sample_shape, *logits.shape)` and its log-density, shape `sample_shape`."""
        logit_sample = self._logit_sample(seed, _checks.sample_shape(sample_shape))
        return jax.nn.sigmoid(logit_sample), self._log_density(logit_sample)

    def sample(self, *, seed, sample_shape=()):
        return jax.nn.sigmoid(self._logit_sample(seed, _checks.sample_shape(sample_shape)))

    # The log-space protocol (`elbojax.gradients.in_log_space`): the point is the logit of z.
    def sample_log_space(self, *, seed, sample_shape=()):
        r"""The logit $y$ of the sample `sample` draws with `seed` ($z = \sigma(y)$)."""
        return self._logit_sample(seed, _checks.sample_shape(sample_shape))

    def value_from_log_space(self, logit_value):
        return jax.nn.sigmoid(logit_value)

    def log_prob_from_log_space(self, logit_value):
        r"""The binary Concrete log-density at $z = \sigma(y)$, read from $y$ (finite where $z$ rounds to 0 or 1)."""
        return self._log_density(logit_value)

    def log_prob(self, value):
        """The binary Concrete log-density at `value` in $(0, 1)$, shape `(*sample_shape, *logits.shape)`."""
        _check_value_shape(value, self.event_shape, type(self).__name__)
        return self._log_density(jnp.log(value) - jnp.log1p(-value))

    def __repr__(self):
        return f"RelaxedBernoulli(event_shape={self.event_shape}, temperature={self.temperature})"


def _check_relaxed_sample(sample, name: str, min_ndim: int) -> jax.Array:
    sample = jnp.asarray(sample)
    if not jnp.issubdtype(sample.dtype, jnp.floating):
        raise TypeError(f"`{name}` needs a floating-point relaxed sample, got dtype {sample.dtype}.")
    if sample.ndim < min_ndim:
        raise ValueError(f"`{name}` needs a sample of shape (..., C) (the last axis is the simplex), got {sample.shape}.")
    return sample


def _hard_with_soft_gradient(hard, soft):
    # Forward: hard + 0, exactly `hard` (x - x = 0 for every finite x). Backward: soft's gradient.
    return hard + (soft - jax.lax.stop_gradient(soft))


def straight_through(sample) -> jax.Array:
    r"""Straight-through Gumbel-softmax: the one-hot argmax forward, the relaxed gradient backward.

    $$\mathrm{forward} = \mathrm{onehot}\big(\mathrm{argmax}_k\, z_k\big),\qquad
      \frac{\partial\,\mathrm{output}}{\partial z} = I.$$

    Applied to a `RelaxedOneHotCategorical` sample, the forward value is exactly one-hot and is
    an exact categorical sample ($\mathrm{argmax}_k z_k = \mathrm{argmax}_k (l_k + g_k)$, the
    Gumbel-max trick), whatever the temperature in exact arithmetic (in float32, up to $\tau$ of
    about $10^3$: beyond, the relaxed coordinates round to ties). The gradient is the relaxed sample's, so the
    gradient estimator is **biased**: it is not the gradient of any expectation under the
    discrete distribution (Bengio et al. 2013; Jang et al. 2017, Sec. 2.2). Use it where the
    model needs a hard one-hot input; there is no density for the hard value, so it does not
    belong in a relaxed ELBO's `log_prob`.

    Args:
      sample: `(..., C)`, relaxed samples on the simplex (floating point).

    Returns:
      An array of the shape and dtype of `sample`, exactly one-hot along the last axis.

    References:
      Jang, Gu & Poole, ICLR 2017, https://arxiv.org/abs/1611.01144;
      Bengio, Léonard & Courville 2013, https://arxiv.org/abs/1308.3432
    """
    sample = _check_relaxed_sample(sample, "straight_through", 1)
    if sample.shape[-1] < 1:
        raise ValueError(f"`straight_through` needs C >= 1 categories on the last axis, got shape {sample.shape}.")
    hard = jax.nn.one_hot(jnp.argmax(sample, axis=-1), sample.shape[-1], dtype=sample.dtype)
    return _hard_with_soft_gradient(hard, sample)


def straight_through_bernoulli(sample) -> jax.Array:
    r"""Straight-through binary Concrete: the bit $[z > 1/2]$ forward, the relaxed gradient backward.

    Applied to a `RelaxedBernoulli` sample, the forward value is exactly 0 or 1 and is an exact
    $\mathrm{Bernoulli}(\sigma(a))$ sample ($z > 1/2 \iff a + L > 0$; in float32 up to $\tau$ of
    about $10^3$, beyond which $\sigma$ rounds to exactly 1/2 too often: 0.66% of draws at
    $10^5$). The gradient is the relaxed sample's, so the estimator is **biased** (see `straight_through`).

    Args:
      sample: relaxed samples in $(0, 1)$, any shape (floating point).

    Returns:
      An array of the shape and dtype of `sample`, each entry exactly 0 or 1.
    """
    sample = _check_relaxed_sample(sample, "straight_through_bernoulli", 0)
    return _hard_with_soft_gradient((sample > 0.5).astype(sample.dtype), sample)
