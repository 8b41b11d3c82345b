r"""Observation log-likelihoods $\log p(x \mid z)$ from a decoder's output, written for speed.

For one data point `x` and the decoder's output for one latent sample, each function returns a
scalar: the log-density summed over every element of `x`. Use them in your own `log_joint`.

**Why the Bernoulli form matters.** The textbook
$\sum_i x_i \ell_i - \mathrm{softplus}(\ell_i)$, and `distrax.Independent(distrax.Bernoulli(
logits), 1).log_prob(x)`, make XLA materialise several arrays of the decoder's output size for
every sample. Measured on the IWAE paper's MNIST model (K = 50, batch 100, CPU), a training step
written with distrax ran at about 2.5x the hand-written time, and replacing only the Bernoulli
`log_prob` by `bernoulli_log_likelihood` below (one fused elementwise pass) brought it to 1.04x. If
you pass your own distributions, this is where the time goes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from elbojax import _checks
from elbojax.models._layers import check_shape, diag_normal_log_density


def softplus(s):
    r"""$\mathrm{softplus}(s) = \log(1 + e^s) = \max(s, 0) + \log(1 + e^{-|s|})$, with selects.

    Written as `where(s > 0, s, 0) + log1p(exp(where(s > 0, -s, s)))`: stable for any $s$, and
    equal to `jax.nn.softplus` in value and in its first and second derivatives, at $s = 0$ too
    (tested; `maximum` and `abs` would give the gradient 0 there instead of $\sigma(0) = 1/2$).
    Measured on CPU, forward and backward over a `(5000, 784)` decoder output: about 40% faster
    than `jax.nn.softplus`, whose `logaddexp` gradient XLA fuses less well.
    """
    positive = s > 0
    return jnp.where(positive, s, 0) + jnp.log1p(jnp.exp(jnp.where(positive, -s, s)))


def bernoulli_log_likelihood(x, logits):
    r"""$\log p(x \mid \ell) = -\sum_i \mathrm{softplus}(\pm \ell_i)$: the Bernoulli log-likelihood of binary `x`.

    $$\log \mathrm{Bernoulli}(x_i; \sigma(\ell_i)) =
      \begin{cases} \log \sigma(\ell_i) = -\mathrm{softplus}(-\ell_i) & x_i = 1\\
      \log(1 - \sigma(\ell_i)) = -\mathrm{softplus}(\ell_i) & x_i = 0, \end{cases}$$

    computed as `-sum(softplus(where(x > 0.5, -logits, logits)))` (with `softplus` above): exact and stable for binary
    `x` (for any logit, however large), and one fused pass (see the module notes on speed). A NaN
    in `x` makes the result NaN (it is not read as 0): a missing entry goes through
    `elbojax.missing`, which masks it, and anything else is a bug that must not vanish.

    Args:
      x: one binary data point, any shape, dtype bool, integer or float. Values are read as
        `x > 0.5`: a grey level is thresholded, not treated as a fractional target (values cannot
        be checked under `jax.jit`; binarise your data first).
      logits: $\ell$, the decoder's output, the same shape as `x`.

    Returns:
      A scalar.
    """
    x, logits = jnp.asarray(x), jnp.asarray(logits)
    check_shape(logits, jnp.shape(x), "logits", " (the shape of `x`)")
    return -jnp.sum(softplus(signed_logits(x, logits)))


def signed_logits(x, logits):
    r"""$s_i = -\ell_i$ where $x_i > 0.5$, else $\ell_i$, so that $\log p(x_i \mid \ell_i) = -\mathrm{softplus}(s_i)$.

    A NaN in a float `x` gives NaN there (value and gradient): it is neither 1 nor 0.
    """
    signed = jnp.where(x > 0.5, -logits, logits)
    if jnp.issubdtype(jnp.result_type(x), jnp.inexact):
        signed = signed + jnp.where(jnp.isnan(x), jnp.nan, 0.0).astype(signed.dtype)
    return signed


def check_gaussian_arguments(x, mean, log_scale) -> tuple[int, ...]:
    """At trace time: `mean` has the shape of `x` and `log_scale` broadcasts to it. Returns that shape."""
    shape = jnp.shape(x)
    check_shape(mean, shape, "mean", " (the shape of `x`)")
    try:
        broadcast = jnp.broadcast_shapes(jnp.shape(log_scale), shape)
    except ValueError:
        broadcast = None
    if broadcast != shape:
        raise ValueError(f"`log_scale` must broadcast to the shape of `x` {shape}, got {jnp.shape(log_scale)}.")
    return shape


def gaussian_log_likelihood(x, mean, log_scale):
    r"""$\sum_i \log \mathcal{N}(x_i; \mu_i, \sigma_i^2)$ with $\log \sigma_i$ = `log_scale`.

    $$\log p(x \mid \mu, \sigma) = -\sum_i \Big[\tfrac12 \Big(\frac{x_i - \mu_i}{\sigma_i}\Big)^2
      + \log \sigma_i + \tfrac12 \log 2\pi\Big].$$

    Args:
      x: one data point, any shape.
      mean: $\mu$, the shape of `x`.
      log_scale: $\log \sigma$, the shape of `x` or any shape that broadcasts to it (a scalar for
        one shared scale).

    Returns:
      A scalar.
    """
    x, mean, log_scale = jnp.asarray(x), jnp.asarray(mean), jnp.asarray(log_scale)
    shape = check_gaussian_arguments(x, mean, log_scale)
    return diag_normal_log_density(jnp.ravel(x), jnp.ravel(mean), jnp.ravel(jnp.broadcast_to(log_scale, shape)))


def bias_from_data_mean(mean, *, clip: float = 1e-3):
    r"""Output-layer bias $b_i = \log \frac{p_i}{1 - p_i}$ with $p_i$ = `mean` clipped to `[clip, 1 - clip]`.

    With this bias a Bernoulli decoder whose hidden contribution is zero predicts the training
    mean of every pixel, which speeds up early training. The IWAE code
    (`datasets.get_train_bias_np`) uses the same formula with `clip = 0.001`; the clip keeps
    the bias finite for pixels that are always 0 (or 1) in the training set.

    Args:
      mean: the per-pixel mean of the (binary) training data, any shape, values in `[0, 1]`
        (checked when concrete: NaN, or grey levels not divided by 255, are a `ValueError`).
      clip: in `(0, 0.5)`. The bias lies within $\pm\log\frac{1 - c}{c}$, finite in any dtype.

    Returns:
      An array of the shape of `mean` (floating point), to pass as `output_bias`.

    References:
      Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016,
      https://arxiv.org/abs/1509.00519 (code: github.com/yburda/iwae).
    """
    clip = _checks.static_real(clip, "clip", "a static real number in (0, 0.5) (the bias is computed once, outside `jit`)")
    if not 0.0 < clip < 0.5:
        raise ValueError(f"`clip` must lie in (0, 0.5), got {clip}.")
    mean = jnp.asarray(mean, dtype=jnp.result_type(float, jnp.asarray(mean)))
    if not isinstance(mean, jax.core.Tracer):
        _check_probabilities(mean)
    p = jnp.clip(mean, clip, 1.0 - clip)
    # In float32 a small clip's 1 - clip rounds to 1, whose logit is inf: bound the bias by the
    # clip's logit, computed in Python's float64 (for other clips this moves it by an ulp at most).
    largest = math.log1p(-clip) - math.log(clip)
    return jnp.clip(jnp.log(p) - jnp.log1p(-p), -largest, largest)


def _check_probabilities(mean) -> None:
    mean = np.asarray(mean)
    bad = ~((mean >= 0) & (mean <= 1))  # NaN is bad too
    if bad.any():
        index = tuple(int(i) for i in np.argwhere(bad)[0])
        hint = " Grey levels 0..255 must be divided by 255 first." if np.any(mean > 1) else ""
        raise ValueError(
            f"`mean` must be per-pixel means in [0, 1], got {mean[index]!s} at index {index} "
            f"({int(bad.sum())} of {mean.size} values).{hint}"
        )
