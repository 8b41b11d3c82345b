r"""Estimators of $\log p(x)$ and its lower bounds, all reductions of one log-weights core.

For one data point $x$, a model's log joint $\log p(x, z)$ and a proposal $q(z)$, draw
$z_k \sim q$ for $k = 1..K$ and form the log-weights

$$\ell_k = \log w_k = \log p(x, z_k) - \log q(z_k).$$

Every estimator here is a reduction of $\ell_{1:K}$:

| estimator | reduction |
|---|---|
| `elbo` | $\frac1K \sum_k \ell_k$ |
| `iwae_bound`, `importance_log_marginal` | $\log \frac1K \sum_k e^{\ell_k}$ |
| `naive_mc_log_marginal` | the same, with $q$ the prior or a uniform distribution |

**One number read two ways.** $\hat p(x) = \frac1K\sum_k w_k$ is an unbiased estimate of
$p(x)$: $\mathbb{E}_q[w_k] = \int p(x, z)\,dz = p(x)$. Its logarithm is therefore, by Jensen's
inequality ($\log$ is concave), a downward-biased estimate of $\log p(x)$:
$\mathbb{E}[\log \hat p(x)] \le \log \mathbb{E}[\hat p(x)] = \log p(x)$. Read as an estimate of
$\log p(x)$ it is `importance_log_marginal`; read as an objective to maximise it is the IWAE bound
$\mathcal{L}_K$ of Burda et al. (2016), which rises with $K$ toward $\log p(x)$. At $K = 1$ it is
the ELBO's one-sample estimate.

**Naive Monte Carlo is importance sampling with a poor proposal.** Drawing from the prior gives
$\ell_k = \log p(x \mid z_k)$ and $\hat p(x) = \frac1K \sum_k p(x \mid z_k)$; drawing uniformly
from a finite support $S$ gives $\hat p(x) = |S| \cdot \frac1K \sum_k p(x, z_k)$. Both are
unbiased, but the prior (or the uniform) rarely lands where $p(z \mid x)$ has its mass, so most
weights are negligible and a rare sample dominates: the estimate jumps.

**Chunking.** `chunk_size=c` draws and reduces the $K$ samples $c$ at a time: a `lax.map`
summarises each chunk (its log-sum-exp, its sum) and the summaries are combined pairwise, so
peak memory grows with $c$, not with $K$. Sample $k$'s key is `fold_in(key, k)` on every path,
so the same key gives the same samples and, up to float rounding, the same value for any
`chunk_size`; and the first $K$
samples of a $K' > K$ draw are exactly the $K$-sample draw (so one `log_weights` call at the
largest $K$ serves a whole sweep over $K$). This holds for Threefry keys, JAX's default; with
`impl="rbg"` keys JAX's draws under `vmap` differ from single ones, so the samples then depend
on `chunk_size` (see `elbojax._keys`). Each chunk is
rematerialised (`jax.checkpoint`) on the backward pass, so gradients keep the same memory
bound (at the price of recomputing each chunk's forward pass once). The running sums are kept
in at least float32: 16-bit log-weights (float16, bfloat16) give a float32 estimate, since a
16-bit sum stops growing (bfloat16 keeps 8 bits of a sum of hundreds of nats).

**Non-finite log-weights.** A log-weight of $-\infty$ (a sample where $p(x, z) = 0$) is a weight
of 0: it contributes nothing to the log-sum-exp reductions (`iwae_bound`, `importance_log_marginal`,
`naive_mc_log_marginal`), whose value stays finite while one weight is positive, and so does the
gradient under every `gradient=` (VIMCO's signals: see `gradients.vimco_signals`), provided
`log_joint`'s own derivative is finite there (write the $-\infty$ with `jnp.where`, not as
`log(0)`). If all are $-\infty$ the result is $-\infty$, not NaN. The ELBO, a mean of log-weights, is $-\infty$ as soon as one is (see `elbo` for its
score-function gradient). A NaN log-weight propagates to the result (NaN), so that a bug in a
`log_joint` is never averaged away.

Shapes: `x` is one data point (any shape or pytree; batch with `jax.vmap`); `log_joint(x, z)`
returns a scalar for ONE sample `z`; every estimator returns a scalar, `log_weights` a `(K,)`.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from elbojax import _checks
from elbojax._keys import fold_in_many
from elbojax import gradients as grads
from elbojax.proposals import as_proposal, closed_form_entropy, closed_form_kl
from elbojax.reductions import LogWeightSummary, combine, summarize, summary_logsumexp, widened


class _Problem(NamedTuple):
    """The checked arguments shared by every estimator."""

    key: jax.Array
    x: Any
    log_joint: Callable  # or the log-likelihood, for `elbo_analytic_kl`
    proposal: Any
    num_samples: int
    chunk_size: int | None
    guard: str | None  # set for a discrete proposal: differentiating its log q must raise


def _prepare(key, x, fn, fn_name, proposal, proposal_name, num_samples, chunk_size, gradient="reparam", asker=None):
    """Check every argument at trace time and bundle them.

    `asker` names what needs a reparameterizable proposal at once (in its error message), for an
    estimator with no `gradient` argument; `"stl"` and `"dreg"` need one too."""
    _checks.check_key(key)
    num_samples = _checks.check_positive_int(num_samples, "num_samples")
    chunk_size = _checks.check_optional_positive_int(chunk_size, "chunk_size")
    _checks.check_callable(fn, fn_name)
    proposal = as_proposal(proposal, proposal_name)
    z, log_q = jax.eval_shape(lambda: proposal.sample_and_log_prob(seed=key, sample_shape=()))
    _checks.check_scalar_log_prob(log_q, proposal_name)
    _checks.check_scalar_output(fn, (x, z), fn_name)
    score_free = gradient in ("stl", "dreg")
    asker = asker or (f"gradient={gradient!r}" if score_free else None)
    guard = None
    if not grads.is_reparameterizable(proposal, z):
        message = grads.not_reparameterizable_message(proposal, asker or f"gradient={gradient!r}")
        if asker:
            raise ValueError(message)
        guard = message
    if score_free and (message := grads.score_free_message(proposal, gradient)):
        raise ValueError(message)
    return _Problem(key, x, fn, proposal, num_samples, chunk_size, guard)


# ----------------------------------------------------------------------------------------------
# Drawing samples in chunks. Sample k always comes from `fold_in(key, k)`.
# ----------------------------------------------------------------------------------------------


def _sample_keys(problem: _Problem, start, count: int):
    """The keys of samples `start .. start + count - 1`: `fold_in(key, k)` for each."""
    indices = start + jnp.arange(count, dtype=jnp.uint32)
    return fold_in_many(problem.key, indices)  # = vmap(fold_in)(key, indices), one fused pass


def _draw(problem: _Problem, start, count: int):
    """Samples `start .. start + count - 1`: `z` (leading axis `count`) and `log q(z)` `(count,)`."""
    draw_one = lambda k: problem.proposal.sample_and_log_prob(seed=k, sample_shape=())
    return jax.vmap(draw_one)(_sample_keys(problem, start, count))


def _draw_points(problem: _Problem, start, count: int):
    """`(points, z, log q)` of samples `start .. start + count - 1`: `points` is `z`, or for a
    proposal that samples in log space (`gradients.in_log_space`) its log-space points, from which
    the estimators that re-evaluate log q read it (`gradients.log_prob_at`)."""
    if not grads.in_log_space(problem.proposal):
        z, log_q = _draw(problem, start, count)
        return z, z, log_q
    draw_one = lambda k: problem.proposal.sample_log_space(seed=k, sample_shape=())
    points = jax.vmap(draw_one)(_sample_keys(problem, start, count))
    return points, grads.value_at(problem.proposal, points), problem.proposal.log_prob_from_log_space(points)


def _log_joint(problem: _Problem, z):
    """`log_joint(x, z_k)` for a batch of samples, shape `(count,)`."""
    return jax.vmap(problem.log_joint, in_axes=(None, 0))(problem.x, z)


def _chunks(num_samples: int, chunk_size: int | None) -> tuple[int, int, int]:
    """(chunk, number of full chunks, remainder) for K samples."""
    chunk = num_samples if chunk_size is None else min(chunk_size, num_samples)
    num_full, remainder = divmod(num_samples, chunk)
    return chunk, num_full, remainder


def _fold_chunks(chunk_fn, combine_fn, problem: _Problem):
    """Reduce `chunk_fn(start, count)` over the chunks with `combine_fn`.

    The chunks' summaries come from a rematerialised `lax.map` (one chunk's samples in memory at
    a time, also in the backward pass) and are combined pairwise, in a tree: a running total
    carried through the chunks gathered one rounding per chunk, and in float32 the ELBO of
    K = 20000 log-weights near -1e5 moved by 1.7 nats between chunks of 10 and one chunk.
    """
    chunk, num_full, remainder = _chunks(problem.num_samples, problem.chunk_size)
    if num_full == 1:
        accumulated = chunk_fn(0, chunk)
    else:
        starts = jnp.arange(num_full, dtype=jnp.uint32) * chunk
        accumulated = _pairwise(combine_fn, jax.lax.map(jax.checkpoint(lambda start: chunk_fn(start, chunk)), starts))
    if remainder:
        accumulated = combine_fn(accumulated, chunk_fn(num_full * chunk, remainder))
    return accumulated


def _pairwise(combine_fn, stacked):
    """`combine_fn` over the leading axis of `stacked` (a pytree of `(n, ...)` leaves), as a tree of
    depth log2(n): neighbours are combined at once (vmapped), an odd one out waits a level."""
    size = jax.tree.leaves(stacked)[0].shape[0]
    while size > 1:
        half = size // 2
        merged = jax.vmap(combine_fn)(jax.tree.map(lambda a: a[:half], stacked), jax.tree.map(lambda a: a[half : 2 * half], stacked))
        if size % 2:
            merged = jax.tree.map(lambda m, a: jnp.concatenate([m, a[2 * half :]]), merged, stacked)
        stacked, size = merged, half + size % 2
    return jax.tree.map(lambda a: a[0], stacked)


def _map_chunks(chunk_fn, problem: _Problem):
    """Concatenate `chunk_fn(start, count)`, each of leading size `count`, into `(K, ...)`."""
    chunk, num_full, remainder = _chunks(problem.num_samples, problem.chunk_size)
    if num_full == 1 and remainder == 0:
        return chunk_fn(0, chunk)
    starts = jnp.arange(num_full, dtype=jnp.uint32) * chunk
    full = jax.lax.map(jax.checkpoint(lambda start: chunk_fn(start, chunk)), starts)
    full = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:]), full)
    if not remainder:
        return full
    rest = chunk_fn(num_full * chunk, remainder)
    return jax.tree.map(lambda a, b: jnp.concatenate([a, b]), full, rest)


def _is_single_chunk(problem: _Problem) -> bool:
    return problem.chunk_size is None or problem.chunk_size >= problem.num_samples


def _with_sums(a, b):
    """Combine `(LogWeightSummary, sum, sum, ...)` accumulators."""
    return (combine(a[0], b[0]),) + tuple(x + y for x, y in zip(a[1:], b[1:]))


def _summary_and_sums(chunk_fn):
    """Wrap a chunk function returning `(log_weights, per-sample terms...)` into summaries and sums."""

    def summarized(start, count):
        log_weights, *terms = chunk_fn(start, count)
        return (summarize(log_weights),) + tuple(jnp.sum(widened(t)) for t in terms)

    return summarized


# ----------------------------------------------------------------------------------------------
# Per-chunk log-weights under each gradient estimator.
# ----------------------------------------------------------------------------------------------


def _pathwise_log_weights(problem: _Problem, gradient: str):
    """Log-weights whose autodiff is the reparameterisation (or, for "stl", the STL) gradient."""

    def chunk_fn(start, count):
        if gradient == "stl":
            points, z, _ = _draw_points(problem, start, count)
            log_q = jax.vmap(lambda point: grads.path_only_log_prob_at(problem.proposal, point))(points)
            return _log_joint(problem, z) - log_q
        z, log_q = _draw(problem, start, count)
        if problem.guard is not None:
            log_q = grads.forbid_pathwise(log_q, problem.guard)
        return _log_joint(problem, z) - log_q

    return chunk_fn


def _score_log_weights(problem: _Problem):
    r"""Log-weights at fixed samples, and each sample's score term $\log q - \overline{\log q}$."""

    def chunk_fn(start, count):
        points = grads.stop_gradient_tree(_draw_points(problem, start, count)[0])
        z = grads.value_at(problem.proposal, points)
        log_q = jax.vmap(lambda point: grads.log_prob_at(problem.proposal, point))(points)
        log_weights = _log_joint(problem, z) - log_q
        score = log_q - jax.lax.stop_gradient(log_q)  # value 0, gradient: the score
        return log_weights, score

    return chunk_fn


def _pathwise_summary(problem: _Problem, gradient: str = "reparam", power: float = 1.0) -> LogWeightSummary:
    """Running summary of `power` times the pathwise log-weights, chunk by chunk."""
    weights_fn = _pathwise_log_weights(problem, gradient)
    return _fold_chunks(lambda start, count: summarize(power * weights_fn(start, count)), combine, problem)


def _log_mean_weight(problem: _Problem):
    r"""$\log \frac1K \sum_k w_k$: the reduction behind IWAE, IS and naive Monte Carlo."""
    return summary_logsumexp(_pathwise_summary(problem)) - math.log(problem.num_samples)


def log_weights(key, x, log_joint, proposal, *, num_samples: int, chunk_size: int | None = None):
    r"""The log-weights $\ell_k = \log p(x, z_k) - \log q(z_k)$, $z_k \sim q$: the core of every estimator.

    Args:
      key: a JAX PRNG key; sample $k$ is drawn with `jax.random.fold_in(key, k)`.
      x: one data point.
      log_joint: `log_joint(x, z) -> scalar`, $\log p(x, z)$ for one sample `z`.
      proposal: $q(z)$, a distrax distribution (or TFP-on-JAX; see `as_proposal`).
      num_samples: $K \ge 1$.
      chunk_size: draw the samples this many at a time (bounds peak memory); `None` for all at once.

    Returns:
      Array of shape `(num_samples,)`; differentiable by reparameterisation.
    """
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    return _map_chunks(_pathwise_log_weights(problem, "reparam"), problem)


def elbo(
    key,
    x,
    log_joint,
    proposal,
    *,
    num_samples: int = 1,
    chunk_size: int | None = None,
    gradient: str = "reparam",
    baseline=None,
):
    r"""The Monte Carlo evidence lower bound, the mean of the log-weights.

    $$\widehat{\mathrm{ELBO}} = \frac1K \sum_{k=1}^K \log \frac{p(x, z_k)}{q(z_k)},\qquad z_k \sim q,$$

    an unbiased estimate of $\mathrm{ELBO}(q) = \log p(x) - \mathrm{KL}(q \,\|\, p(z \mid x))$.

    Args:
      key, x, log_joint, proposal, num_samples, chunk_size: as `log_weights`; `num_samples`
        defaults to 1.
      gradient: what `jax.grad` returns (the value is the same): `"reparam"` (pathwise),
        `"stl"` (sticking the landing) or `"score"` (REINFORCE; the only choice for a discrete
        proposal). See `elbojax.gradients`.
      baseline: for `gradient="score"` only: a scalar subtracted from every sample's learning
        signal (e.g. a moving average or a learned $b_\psi(x)$). Without it, and with $K > 1$,
        each sample's baseline is the mean of the other samples' log-weights.

    Returns:
      A scalar; $-\infty$ if any $\ell_k = -\infty$ (the Monte Carlo ELBO is then $-\infty$).

    With `gradient="score"`, a sample with $\ell_k = -\infty$ gets no learning signal (0, not
    $-\infty$) and is left out of the other samples' leave-one-out baselines (fewer than two samples
    left: no baseline), so the gradient stays finite: the pathwise terms $\nabla \ell_k$ of every
    sample plus the score terms of the others. An ELBO of $-\infty$ has no finite gradient; this one
    does not push $q$ away from where $p(x, z) = 0$ (the reparameterised gradient does not either).

    References:
      Kingma & Welling, *Auto-Encoding Variational Bayes*, 2014, https://arxiv.org/abs/1312.6114
    """
    grads.check_gradient(gradient, grads.ELBO_GRADIENTS, "elbo")
    _check_baseline(baseline, gradient)
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size, gradient)
    if gradient != "score":
        summary = _pathwise_summary(problem, gradient)
        return summary.total / num_samples

    def chunk_fn(start, count):
        log_weights, score = _score_log_weights(problem)(start, count)
        # A sample with log-weight -inf has no learning signal (0 * -inf would be NaN); NaN stays.
        kept = jnp.logical_not(jnp.isneginf(log_weights))
        signal = jax.lax.stop_gradient(jnp.where(kept, log_weights, jnp.zeros_like(log_weights)))
        kept = kept.astype(log_weights.dtype)
        return log_weights, signal * score, kept * score, signal, kept

    summary, signal_times_score, score, kept_total, num_kept = _fold_chunks(
        _summary_and_sums(chunk_fn), _with_sums, problem
    )
    if baseline is not None:
        correction = signal_times_score - jax.lax.stop_gradient(baseline) * score
    elif num_samples > 1:
        # Leave-one-out over the N kept samples: b_k = (T - l_k) / (N - 1), so
        # l_k - b_k = (N l_k - T) / (N - 1); with N < 2 there is no other sample: no baseline.
        leave_one_out = (num_kept * signal_times_score - kept_total * score) / jnp.maximum(num_kept - 1, 1)
        correction = jnp.where(num_kept > 1, leave_one_out, signal_times_score)
    else:
        correction = signal_times_score
    return (summary.total + correction) / num_samples


def iwae_bound(
    key,
    x,
    log_joint,
    proposal,
    *,
    num_samples: int,
    chunk_size: int | None = None,
    gradient: str = "reparam",
    baseline=None,
):
    r"""The importance-weighted bound $\mathcal{L}_K$ (IWAE), computed stably.

    $$\mathcal{L}_K = \log \frac1K \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k)},\qquad z_k \sim q,$$

    $\mathbb{E}[\mathcal{L}_1] = \mathrm{ELBO} \le \mathbb{E}[\mathcal{L}_K] \le
    \mathbb{E}[\mathcal{L}_{K+1}] \le \log p(x)$, and $\mathcal{L}_K \to \log p(x)$ as
    $K \to \infty$. The value equals `importance_log_marginal` (see the module docs).

    Args:
      key, x, log_joint, proposal, num_samples, chunk_size: as `log_weights`.
      gradient: what `jax.grad` returns (the value is the same): `"reparam"`, `"stl"`
        (IWAE-STL: biased for IWAE, Tucker et al. 2019), `"dreg"` (doubly reparameterised),
        `"score"` or `"vimco"` (for discrete proposals). See `elbojax.gradients`. With
        `chunk_size` smaller than K, `"dreg"` and `"vimco"` make a first pass without gradient
        for the normalised weights, then a second one for the surrogate.
      baseline: for `gradient="score"` only: a scalar subtracted from the learning signal
        $\mathcal{L}_K$.

    Returns:
      A scalar.

    References:
      Burda, Grosse & Salakhutdinov, *Importance Weighted Autoencoders*, ICLR 2016,
      https://arxiv.org/abs/1509.00519
    """
    grads.check_gradient(gradient, grads.IWAE_GRADIENTS, "iwae_bound")
    _check_baseline(baseline, gradient)
    if gradient == "vimco" and _checks.check_positive_int(num_samples, "num_samples") < 2:
        raise ValueError(f"gradient='vimco' needs `num_samples` >= 2 (a leave-one-out baseline), got {num_samples}.")
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size, gradient)
    log_k = math.log(num_samples)
    if gradient in ("reparam", "stl"):
        summary = _pathwise_summary(problem, gradient)
        return summary_logsumexp(summary) - log_k
    if gradient == "dreg":
        return _iwae_dreg(problem)
    if gradient == "score":
        summary, score = _fold_chunks(_summary_and_sums(_score_log_weights(problem)), _with_sums, problem)
        bound = summary_logsumexp(summary) - log_k
        signal = jax.lax.stop_gradient(bound - (0.0 if baseline is None else baseline))
        # Every weight 0: the bound is -inf and there is no learning signal (-inf * 0 would be NaN).
        signal = jnp.where(jnp.isneginf(bound), jnp.zeros_like(signal), signal)
        return bound + signal * score
    return _iwae_vimco(problem)


def _iwae_dreg(problem: _Problem):
    """IWAE with the DReG surrogate; see `elbojax.gradients`."""
    fixed_lse = None
    if not _is_single_chunk(problem):
        fixed_lse = jax.lax.stop_gradient(summary_logsumexp(_pathwise_summary(problem)))

    def chunk_fn(start, count):
        points, z, log_q = _draw_points(problem, start, count)
        # In at least float32, as the chunked path's `fixed_lse` is: 16-bit weights would not sum to 1.
        log_weights = widened(jax.lax.stop_gradient(_log_joint(problem, z) - log_q))
        lse = jax.nn.logsumexp(log_weights) if fixed_lse is None else fixed_lse
        # Every weight 0: weights of 0 (no gradient), not exp(-inf + inf) = NaN.
        weights = jnp.exp(log_weights - jnp.where(jnp.isneginf(lse), jnp.zeros_like(lse), lse))
        scaled = jax.vmap(grads.scale_cotangent)(points, weights)  # the sample's cotangent, times its weight
        log_q_path = jax.vmap(lambda point: grads.path_only_log_prob_at(problem.proposal, point))(scaled)
        terms = weights * (_log_joint(problem, grads.value_at(problem.proposal, scaled)) - log_q_path)
        # A zero weight (log-weight -inf) contributes nothing: 0 * -inf would make the value NaN.
        # The masked entries get a zero cotangent, and 0 * weight is 0: the gradient is unchanged.
        surrogate = jnp.sum(widened(jnp.where(weights != 0, terms, jnp.zeros_like(terms))))
        return summarize(log_weights), surrogate

    summary, surrogate = _fold_chunks(chunk_fn, _with_sums, problem)
    bound = summary_logsumexp(summary) - math.log(problem.num_samples)
    return bound + (surrogate - jax.lax.stop_gradient(surrogate))


def _iwae_vimco(problem: _Problem):
    """IWAE with VIMCO's leave-one-out learning signals; see `elbojax.gradients`."""
    score_fn = _score_log_weights(problem)
    if _is_single_chunk(problem):
        log_weights, score = score_fn(0, problem.num_samples)
        log_weights = widened(log_weights)  # a float32 bound, as the chunked path's
        bound = jax.nn.logsumexp(log_weights) - math.log(problem.num_samples)
        return bound + jnp.sum(grads.vimco_signals(log_weights) * score)
    signals = grads.vimco_signals(_map_chunks(lambda s, c: score_fn(s, c)[0], problem))

    def chunk_fn(start, count):
        log_weights, score = score_fn(start, count)
        return log_weights, jax.lax.dynamic_slice(signals, (start,), (count,)) * score

    summary, weighted_score = _fold_chunks(_summary_and_sums(chunk_fn), _with_sums, problem)
    return summary_logsumexp(summary) - math.log(problem.num_samples) + weighted_score


def _check_baseline(baseline, gradient):
    if baseline is None:
        return
    if gradient != "score":
        raise ValueError(f"`baseline` is only used with gradient='score', got gradient={gradient!r}.")
    if isinstance(baseline, (bool, np.bool_)) or not isinstance(baseline, (numbers.Real, jax.Array, np.ndarray)):
        raise TypeError(f"`baseline` must be a real number or a scalar array, got {baseline!r} of type {type(baseline).__name__}.")
    if jnp.shape(baseline) != ():
        raise ValueError(f"`baseline` must be a scalar (one per data point), got shape {jnp.shape(baseline)}.")
    if not (jnp.issubdtype(jnp.result_type(baseline), jnp.floating) or jnp.issubdtype(jnp.result_type(baseline), jnp.integer)):
        raise TypeError(f"`baseline` must be a real number, got dtype {jnp.result_type(baseline)}.")


def importance_log_marginal(
    key, x, log_joint, proposal, *, num_samples: int, chunk_size: int | None = None
):
    r"""$\log \hat p(x)$, the log of the unbiased importance-sampling estimate of $p(x)$.

    $$\hat p(x) = \frac1K \sum_{k=1}^K \frac{p(x, z_k)}{q(z_k)},\qquad
      \mathbb{E}_q[\hat p(x)] = p(x).$$

    The same number as `iwae_bound`: unbiased for $p(x)$, hence (Jensen) biased downward for
    $\log p(x)$, with a bias that shrinks like $O(1/K)$ when the weights have finite variance.
    The variance of $\hat p(x)$ is finite only if $\int p(x, z)^2 / q(z)\,dz < \infty$: $q$
    must have heavier tails than the posterior (for Gaussians, a covariance above half the
    posterior's in every direction).

    Args: as `log_weights`.

    Returns:
      A scalar.
    """
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    return _log_mean_weight(problem)


def naive_mc_log_marginal(
    key, x, log_joint, prior, *, num_samples: int, chunk_size: int | None = None
):
    r"""Naive Monte Carlo $\log \hat p(x)$: importance sampling from the prior or a uniform.

    With `prior` the model's prior $p(z)$,
    $$\hat p(x) = \frac1K \sum_k p(x \mid z_k),\quad z_k \sim p(z);$$
    with `prior` a `FiniteUniform` over a finite support $S$ (the classic form),
    $$\hat p(x) = |S| \cdot \frac1K \sum_k p(x, z_k),\quad z_k \sim \mathrm{Uniform}(S).$$
    Both are `importance_log_marginal` with that distribution as the proposal, because
    $p(x, z)/p(z) = p(x \mid z)$ and $p(x, z)/(1/|S|) = |S|\,p(x, z)$. Unbiased for $p(x)$, but
    the samples ignore $x$: when the posterior is narrow, nearly every weight is negligible
    and the estimate is dominated by rare lucky samples (high variance, long flat stretches,
    sudden jumps). It is here as the baseline that motivates a good proposal.

    Args:
      key, x, log_joint, num_samples, chunk_size: as `log_weights`.
      prior: the distribution samples come from: the model's prior, or
        `elbojax.FiniteUniform(support)` for a finite latent space.

    Returns:
      A scalar.
    """
    problem = _prepare(key, x, log_joint, "log_joint", prior, "prior", num_samples, chunk_size)
    return _log_mean_weight(problem)


def _mean_of(problem: _Problem):
    r"""$\frac1K\sum_k f(x, z_k)$ for the problem's function $f$, by reparameterisation."""

    def chunk_fn(start, count):
        z, log_q = _draw(problem, start, count)
        values = _log_joint(problem, z)
        if problem.guard is not None:  # the sampled expectation has no pathwise gradient in q
            values = values + 0.0 * grads.forbid_pathwise(log_q, problem.guard)
        return summarize(values)

    return _fold_chunks(chunk_fn, combine, problem).total / problem.num_samples


def expectation(key, x, fn, proposal, *, num_samples: int = 1, chunk_size: int | None = None):
    r"""The Monte Carlo mean $\frac1K \sum_k f(x, z_k)$, $z_k \sim q$: an unbiased estimate of $\mathbb{E}_q[f(x, z)]$.

    The expected reconstruction $\mathbb{E}_q[\log p(x \mid z)]$ of `elbo_analytic_kl`, or any
    other expectation under the proposal. Samples and keys as in `log_weights` (sample $k$ from
    `fold_in(key, k)`); gradients are pathwise (a discrete proposal has none: differentiating
    with respect to it is an error).

    Args:
      key, x, proposal, num_samples, chunk_size: as `log_weights`.
      fn: `fn(x, z) -> scalar` for one sample.

    Returns:
      A scalar.
    """
    problem = _prepare(key, x, fn, "fn", proposal, "proposal", num_samples, chunk_size)
    return _mean_of(problem)


def elbo_analytic_kl(
    key,
    x,
    log_likelihood,
    proposal,
    prior,
    *,
    num_samples: int = 1,
    chunk_size: int | None = None,
):
    r"""The ELBO as expected reconstruction minus a closed-form KL.

    $$\mathrm{ELBO} = \mathbb{E}_{q(z)}[\log p(x \mid z)] - \mathrm{KL}(q(z) \,\|\, p(z)),$$

    the expectation by Monte Carlo over $K$ samples, the KL exactly. Lower variance than `elbo`
    when the KL is a large part of the bound. Gradients are pathwise.

    Args:
      key, x, num_samples, chunk_size: as `log_weights`.
      log_likelihood: `log_likelihood(x, z) -> scalar`, $\log p(x \mid z)$ for one sample.
      proposal: $q(z)$.
      prior: $p(z)$; the pair `(proposal, prior)` must have a registered closed-form KL
        (e.g. two distrax Normals or MultivariateNormals), else a `ValueError`.

    Returns:
      A scalar.

    References:
      Kingma & Welling 2014, eq. (10), https://arxiv.org/abs/1312.6114
    """
    problem = _prepare(key, x, log_likelihood, "log_likelihood", proposal, "proposal", num_samples, chunk_size)
    kl = closed_form_kl(problem.proposal, as_proposal(prior, "prior"))
    _checks.check_scalar_closed_form(
        kl,
        "KL(proposal || prior)",
        "The `prior` must have the proposal's event shape and no batch shape (e.g. "
        "`distrax.Independent(..., 1)` or `distrax.MultivariateNormalDiag` for independent components).",
    )
    return _mean_of(problem) - kl


def elbo_entropy(
    key, x, log_joint, proposal, *, num_samples: int = 1, chunk_size: int | None = None
):
    r"""The ELBO as expected log joint plus the closed-form entropy of $q$.

    $$\mathrm{ELBO} = \mathbb{E}_{q(z)}[\log p(x, z)] + \mathbb{H}(q),$$

    the expectation by Monte Carlo over $K$ samples, the entropy exactly (a `ValueError` if
    `proposal` has no closed-form entropy). Gradients are pathwise.

    Args: as `log_weights`; `num_samples` defaults to 1.

    Returns:
      A scalar.

    References:
      Titsias & Lázaro-Gredilla, *Doubly Stochastic Variational Bayes*, ICML 2014.
    """
    problem = _prepare(key, x, log_joint, "log_joint", proposal, "proposal", num_samples, chunk_size)
    entropy = closed_form_entropy(problem.proposal)
    _checks.check_scalar_closed_form(
        entropy,
        "entropy of `proposal`",
        "The proposal must have no batch shape (e.g. `distrax.Independent(..., 1)` or "
        "`distrax.MultivariateNormalDiag` for independent components).",
    )
    mean = _mean_of(problem)
    # distrax's Gaussian entropy is float64 under x64 whatever the proposal's dtype: keep the estimate's.
    return mean + jnp.asarray(entropy).astype(mean.dtype)
