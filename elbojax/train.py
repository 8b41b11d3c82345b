r"""The training step: pure, jitted, `(state, batch, indices) -> (state, info)`.

The model is any Flax NNX module with `log_joint(x, z)` and `proposal(x)` (a `VAE` of
`elbojax.models`, or your own). Outside `jax.jit` it is split once into a static `graphdef` and
its parameters (a plain nested dict, `nnx.to_pure_dict`, which JAX flattens in C++ at the `jit`
boundary: an `nnx.State` there cost the one-sample ELBO step about 20% per call); inside,
`nnx.merge(graphdef, params)` rebuilds it, the per-data-point objective
(any estimator of `elbojax`, with any gradient estimator) is vmapped over the batch, and an optax
optimizer updates the parameters.

**Randomness is a function of position, not of history.** The step's key is
`fold_in(key(seed), step)` and each example's key is `fold_in(step_key, global_index)`, where
`global_index` is the example's index in the training set. A resumed run, or the same batch cut
across several devices, therefore draws exactly the same samples.

**Non-finite steps are skipped, never applied.** If the loss or any gradient is NaN or infinite
(checked through the gradient's global norm, which also catches a norm that overflows), the
update is discarded: the parameters and the optimizer state stay as they were,
and the skip is counted (`TrainState.num_skipped`, `TrainState.skipped_in_a_row`); the host loop
stops a run after too many in a row. The scanned form (`make_multi_step`) checks the gradients
once per call instead of once per step: it runs the steps unchecked, and only if a loss or the
state it ends with is not finite does it run them again from the state it was given, checking
every step (see there). A finite gradient can still make a non-finite update (an infinite
learning rate): a single step (`make_step`, `step.in_loop`) checks only the loss and the
gradient and applies it, while `make_multi_step` also checks the state its checked steps end
with and undoes the whole call if it is not finite. So in `fit`, which runs `make_multi_step`,
a NaN never reaches the parameters.

`objective(...)` builds the batch objective: the ELBO (closed-form or sampled KL) or the IWAE
bound, with any gradient estimator, KL annealing, $\beta$ and free bits. `make_multi_step` runs
several steps in one call with `lax.scan` (the per-call overhead dominates small steps such as
the one-sample ELBO). `fit` is the host loop (batches, checkpoints, metrics, resumption) and
`evaluate` the test-set evaluation, both on one device or over a mesh (`elbojax.distributed`).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from elbojax import _checks, distributed
from elbojax._keys import fold_in_many
from elbojax.estimators import elbo, expectation, iwae_bound

KLWeight = Union[float, Callable[[jax.Array], jax.Array]]
"""A constant, or a schedule `step -> weight` (any optax schedule), for KL annealing."""

# A key no estimator reaches: estimators draw sample k from fold_in(key, k), k < K.
_KL_SAMPLE_INDEX = 2**31 - 1


class Terms(NamedTuple):
    r"""What an objective returns for a batch (batch means, scalars).

    Attributes:
      objective: what the step maximises (the bound, weighted as asked).
      kl: $\mathrm{KL}(q_\phi(z \mid x) \,\|\, p(z))$: closed form where the pair has one, else a
        one-sample estimate; NaN for a model without `log_prior`. Reported, never differentiated.
      kl_weight: the weight $a$ on the KL term at this step ($\beta$ times the annealing schedule).
    """

    objective: jax.Array
    kl: jax.Array
    kl_weight: jax.Array


Objective = Callable[[jax.Array, Any, jax.Array, jax.Array], Terms]
"""`objective(keys, model, batch, step) -> Terms`: keys `(B,)`, one per example; batch `(B, ...)`."""


def per_point_objective(per_point: Callable[[jax.Array, Any, jax.Array], jax.Array]) -> Objective:
    """An `Objective` from your own `per_point(key, model, x) -> scalar` bound (mean over the batch).

    For a bound that `objective` does not name: e.g.
    `per_point_objective(lambda k, m, x: elbojax.renyi_bound(k, x, m.log_joint, m.proposal(x), alpha=0.5, num_samples=5))`.
    The KL is not reported (NaN).
    """

    def batch_objective(keys, model, batch, step):
        values = jax.vmap(per_point, in_axes=(0, None, 0))(keys, model, batch)
        if jnp.shape(values)[1:] != ():
            raise ValueError(
                f"`per_point(key, model, x)` must return a scalar (one bound for one data point), "
                f"got shape {jnp.shape(values)[1:]}."
            )
        nan = jnp.full((), jnp.nan, values.dtype)
        return Terms(jnp.mean(values), nan, jnp.ones((), values.dtype))

    return batch_objective


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree; checkpoint it whole).

    Attributes:
      step: `int32[]`, the number of steps taken (skipped ones included): the step's position.
      params: the model's `nnx.Param` state as a plain nested dict of arrays
        (`nnx.to_pure_dict`); `nnx.merge(graphdef, params)` gives the model back.
      opt_state: the optax state (its moments are dicts of the same structure).
      num_skipped: `int32[]`, steps skipped because the loss or a gradient was not finite, or
        undone with their whole call by `make_multi_step` because the update was not.
      skipped_in_a_row: `int32[]`, the current run of consecutive skipped steps.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    num_skipped: jax.Array
    skipped_in_a_row: jax.Array


class StepInfo(NamedTuple):
    """What one step reports (scalars).

    Attributes:
      objective: the batch mean of the objective (higher is better).
      kl: the batch mean of the KL (see `Terms`).
      kl_weight: the weight on the KL term at this step.
      grad_norm: the global norm of the gradient; NaN where it was not computed (the steps of
        `make_multi_step` when its one check per call passed).
      finite: whether the step was applied (loss and gradients finite, and in `make_multi_step`
        the state its call ended with).
    """

    objective: jax.Array
    kl: jax.Array
    kl_weight: jax.Array
    grad_norm: jax.Array
    finite: jax.Array


def _check_kl_weight(kl_weight, beta) -> bool:
    """Whether the KL term is weighted at all (statically: a schedule, or a constant other than 1)."""
    if not callable(kl_weight):
        _check_weight(kl_weight, "kl_weight")
    _check_weight(beta, "beta")
    if not callable(kl_weight):
        _check_weight(float(beta) * float(kl_weight), "beta * kl_weight")
    return callable(kl_weight) or float(kl_weight) != 1.0 or float(beta) != 1.0


def _check_weight(value, name: str) -> float:
    """A finite number >= 0 that the training dtype can hold (1e39 is inf in float32)."""
    value = _checks.check_finite_nonnegative(value, name)
    largest = float(jnp.finfo(jnp.result_type(float)).max)
    if value > largest:
        raise ValueError(f"`{name}` must be at most {largest:.4g} (the largest {jnp.result_type(float).name}), got {value:g}.")
    return value


def _require(model, names, why: str) -> None:
    missing = [name for name in names if not callable(getattr(model, name, None))]
    if missing:
        raise ValueError(f"{why} needs a model with {', '.join(f'`{m}`' for m in missing)}; {type(model).__name__} has none.")


def _weighted_log_joint(model, proposal, weight):
    r"""$\log p(x \mid z) + a \log p(z) + (1 - a) \log q(z)$: its log-weight is $\log p(x \mid z) + a(\log p(z) - \log q(z))$.

    Handing the estimators this log joint weights the KL part of every log-weight by $a$ and
    leaves the estimators themselves unchanged; every gradient estimator stays unbiased for the
    weighted bound (the extra $\log q$ term is differentiated like any other parameter of the joint).
    """

    def log_joint(x, z):
        return model.log_likelihood(x, z) + weight * model.log_prior(z) + (1.0 - weight) * proposal.log_prob(z)

    return log_joint


def _analytic_kl(model, x, proposal, **kwargs):
    """`model.analytic_kl(x, ...)`, handing it the proposal already computed where it takes one
    (`models.VAE` does): a second encoder pass would be differentiated a second time."""
    if "proposal" in inspect.signature(model.analytic_kl).parameters:
        kwargs["proposal"] = proposal
    return model.analytic_kl(x, **kwargs)


def _takes(fn, name: str) -> bool:
    """Whether `fn` takes the keyword argument `name` (by name, or through `**kwargs`)."""
    parameters = inspect.signature(fn).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)


def _reported_kl(model, x, proposal, key):
    """Closed-form KL where the model has it, else a one-sample estimate; NaN without `log_prior`."""
    if getattr(model, "has_analytic_kl", False) and callable(getattr(model, "analytic_kl", None)):
        return _analytic_kl(model, x, proposal)
    if not callable(getattr(model, "log_prior", None)):
        return jnp.full((), jnp.nan)
    z, log_q = proposal.sample_and_log_prob(seed=jax.random.fold_in(key, _KL_SAMPLE_INDEX))
    return log_q - model.log_prior(z)


def objective(
    name: str = "iwae",
    *,
    num_samples: int = 5,
    gradient: str = "reparam",
    chunk_size: int | None = None,
    kl: str = "auto",
    kl_weight: KLWeight = 1.0,
    beta: float = 1.0,
    free_bits: float | None = None,
) -> Objective:
    r"""A training objective by name, with its gradient estimator, KL annealing, $\beta$ and free bits.

    With $a = \beta \cdot \mathrm{kl\_weight}(\mathrm{step})$:

    * `"elbo"` with the KL in closed form (`kl="analytic"`, or `"auto"` where the model has it):
      $\frac1K \sum_k \log p(x \mid z_k) - a\,\mathrm{KL}(q \,\|\, p)$; with free bits $\lambda$
      (Kingma et al. 2016, eq. 15) the KL term is $a \sum_j \max(\lambda, \overline{\mathrm{KL}}_j)$,
      $\overline{\mathrm{KL}}_j$ the batch mean of latent dimension $j$'s KL.
    * `"elbo"` by Monte Carlo: $\frac1K \sum_k \log w_k$, and `"iwae"`:
      $\log \frac1K \sum_k w_k$, where the KL part of each log-weight is weighted,
      $\log w_k = \log p(x \mid z_k) + a\,(\log p(z_k) - \log q(z_k))$, as IWAE reproductions warm
      up. At $a = 1$ these are the plain bounds.

    Args:
      name: `"elbo"` or `"iwae"`.
      num_samples: $K$.
      gradient: any gradient estimator the estimator accepts (`elbojax.elbo`, `elbojax.iwae_bound`).
      chunk_size: passed to the estimator.
      kl: `"auto"`, `"analytic"` or `"monte_carlo"`, for the ELBO (the model's `kl_mode` decides
        `"auto"`); IWAE takes only `"auto"`.
      kl_weight: a constant or a schedule `step -> weight` (e.g.
        `optax.linear_schedule(0.0, 1.0, 10_000)` for a linear warm-up).
      beta: a constant factor on the KL term ($\beta$-VAE, Higgins et al. 2017).
      free_bits: $\lambda$ in nats per latent dimension; the analytic-KL ELBO only.

    Returns:
      `objective(keys, model, batch, step) -> Terms`. The model needs `log_joint(x, z)` and
      `proposal(x)`; weighting the KL also needs `log_likelihood(x, z)` and `log_prior(z)`, and the
      closed-form KL `analytic_kl(x)` (all of which `elbojax.models.VAE` has).
    """
    estimators = {"elbo": elbo, "iwae": iwae_bound}
    if name not in estimators:
        raise ValueError(f"`name` must be one of {sorted(estimators)}, got {name!r}.")
    _checks.check_positive_int(num_samples, "num_samples")
    if kl not in ("auto", "analytic", "monte_carlo"):
        raise ValueError(f"`kl` must be 'auto', 'analytic' or 'monte_carlo', got {kl!r}.")
    if name == "iwae" and kl != "auto":
        raise ValueError(f"kl={kl!r} applies to the ELBO only; the IWAE bound has no separate KL term.")
    weighted = _check_kl_weight(kl_weight, beta)
    if free_bits is not None:
        _check_weight(free_bits, "free_bits")
        if name != "elbo" or kl == "monte_carlo" or gradient != "reparam":
            raise ValueError(
                "Free bits apply to the ELBO with the KL in closed form only (name='elbo', kl='auto' or "
                f"'analytic', gradient='reparam'); got name={name!r}, kl={kl!r}, gradient={gradient!r}."
            )
    schedule = kl_weight if callable(kl_weight) else (lambda step: kl_weight)

    def analytic_kl_mode(model) -> bool:
        if name != "elbo":
            return False
        kl_mode = getattr(model, "kl_mode", None)
        mode = kl_mode(kl, gradient=gradient) if kl_mode is not None else ("monte_carlo" if kl == "auto" else kl)
        if mode == "analytic" and gradient != "reparam":  # a model without `kl_mode` says nothing
            raise ValueError(
                f"kl='analytic' (the closed-form KL) has only the reparameterisation gradient; got "
                f"gradient={gradient!r}. Use kl='monte_carlo' for another gradient estimator."
            )
        if mode == "analytic":
            _require(model, ("log_likelihood", "analytic_kl"), "The analytic-KL ELBO")
            if free_bits is not None and not _takes(model.analytic_kl, "per_dimension"):
                raise ValueError(
                    f"Free bits need the KL per latent dimension, `analytic_kl(x, per_dimension=True)`; "
                    f"{type(model).__name__}.analytic_kl takes no `per_dimension`."
                )
            return True
        if free_bits is not None:
            raise ValueError(f"Free bits need the KL in closed form, and {type(model).__name__} has none here (kl_mode is {mode!r}).")
        return False

    def batch_objective(keys, model, batch, step):
        weight = jnp.asarray(beta * schedule(step), jnp.result_type(float))
        if analytic_kl_mode(model):
            return analytic_elbo(keys, model, batch, weight)
        if weighted:
            _require(model, ("log_likelihood", "log_prior"), "Weighting the KL (kl_weight, beta)")

        def point(key, x):
            proposal = model.proposal(x)
            log_joint = _weighted_log_joint(model, proposal, weight) if weighted else model.log_joint
            value = estimators[name](
                key, x, log_joint, proposal, num_samples=num_samples, gradient=gradient, chunk_size=chunk_size
            )
            return value, jax.lax.stop_gradient(_reported_kl(model, x, proposal, key))

        values, kls = jax.vmap(point)(keys, batch)
        return Terms(jnp.mean(values), jnp.mean(kls), weight)

    def analytic_elbo(keys, model, batch, weight):
        def point(key, x):
            proposal = model.proposal(x)
            reconstruction = expectation(
                key, x, model.log_likelihood, proposal, num_samples=num_samples, chunk_size=chunk_size
            )
            per_dimension = {"per_dimension": True} if free_bits is not None else {}  # `analytic_kl(x)` suffices otherwise
            return reconstruction, _analytic_kl(model, x, proposal, **per_dimension)

        reconstructions, kls = jax.vmap(point)(keys, batch)
        if free_bits is None:
            return Terms(jnp.mean(reconstructions - weight * kls), jnp.mean(kls), weight)
        mean_kl = jnp.mean(kls, axis=0)  # (latent_dim,): the batch mean per dimension
        kl_term = jnp.sum(jnp.maximum(free_bits, mean_kl))
        return Terms(jnp.mean(reconstructions) - weight * kl_term, jnp.sum(mean_kl), weight)

    return batch_objective


def _check_params_only(model: nnx.Module) -> None:
    """Refuse a module with variables other than `nnx.Param`s: a training state holds those only."""
    others = nnx.to_flat_state(nnx.state(model, nnx.Not(nnx.Param)))
    if len(others):
        names = ", ".join(f"{'/'.join(map(str, path))} ({type(variable).__name__})" for path, variable in others)
        raise ValueError(
            f"The training state holds the model's `nnx.Param`s only, and {type(model).__name__} has other "
            f"variables: {names}. Make them `nnx.Param`s (trained), or constants (plain arrays, not variables)."
        )


def init(model: nnx.Module, optimizer: optax.GradientTransformation):
    """Split `model` into `(graphdef, TrainState)`; the graphdef is static, the state a pytree.

    The parameters are kept as a plain nested dict (`nnx.to_pure_dict`), not an `nnx.State`:
    a jitted step flattens its arguments on every call, and JAX flattens dicts in C++ but an
    `nnx.State` in Python (measured: about 0.5 ms of a 3 ms ELBO step on 2 CPU cores).
    """
    _check_params_only(model)
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    zero = jnp.zeros((), jnp.int32)
    return graphdef, TrainState(zero, params, optimizer.init(params), zero, zero)


def make_step(graphdef, optimizer: optax.GradientTransformation, objective_fn: Objective, *, seed: int):
    """Build the pure step `(state, batch, indices) -> (state, info)` (not jitted: jit or scan it).

    Args:
      graphdef: from `init`.
      optimizer: any optax transformation (with its schedule).
      objective_fn: `objective_fn(keys, model, batch, step) -> Terms`, from `objective(...)` or
        `per_point_objective(...)`.
      seed: the run's seed.

    The step takes `batch` of shape `(B, ...)` and `indices`, `int[B]`, the examples' global
    indices in the training set; it maximises `objective_fn(...).objective`.

    The returned step is compiled best as the body of its own `jax.jit`. For the body of a
    loop (`lax.scan`, `fori_loop`) use `step.in_loop`, the same step built for a loop carry
    (`make_multi_step` re-runs a call's steps with it when its check fails). The two differ only
    in how a skipped step keeps the old state. In a loop the update waits for the check (a
    `lax.cond`) and a skip passes the carry through, which is updated in place. At a `jit`
    boundary the update is applied first and, if the check fails, replaced by the old state,
    re-selected as new arrays: the caller's buffers are not donated, so a conditional that
    passed them through would make XLA copy the whole state on every call (measured: 0.3 ms of
    a 3 ms ELBO step on 2 CPU cores). Applying first also lets each leaf's update run while the
    backward pass is still computing the other leaves' gradients, where a `lax.cond` waits for
    the whole gradient and its check (the one-sample ELBO step of the IWAE model per call, 121
    paired rounds: 1.070 -> 1.045 of the hand-written step, 1.014 unchecked). Inside a scan that
    form would cost a copy of the carry per step, hence the two.

    `step.unchecked` applies every update without checking the gradient (`finite` reflects the
    loss only, `grad_norm` is NaN): the body of `make_multi_step`'s first pass, which checks the
    state the steps end with instead.
    """
    base_key = jax.random.key(_checks.check_seed(seed))

    def loss(params, step_key, batch, indices, step):
        model = nnx.merge(graphdef, params)
        keys = fold_in_many(step_key, indices, name="indices")  # = vmap(fold_in)(step_key, indices), one fused pass
        terms = objective_fn(keys, model, batch, step)
        return -terms.objective, terms

    def step(state: TrainState, batch, indices):
        return one_step(state, batch, indices, form="call")

    def in_loop(state: TrainState, batch, indices):
        return one_step(state, batch, indices, form="loop")

    def unchecked(state: TrainState, batch, indices):
        return one_step(state, batch, indices, form="unchecked")

    def one_step(state: TrainState, batch, indices, form: str):
        if jnp.ndim(batch) < 1 or jnp.shape(batch)[0] < 1:
            raise ValueError(f"`batch` must have shape (B, ...) with B >= 1 examples, got {jnp.shape(batch)}.")
        if jnp.ndim(indices) != 1 or jnp.shape(indices)[0] != jnp.shape(batch)[0]:
            raise ValueError(
                f"`indices` must have shape ({jnp.shape(batch)[0]},), one per example of `batch`, "
                f"got {jnp.shape(indices)}."
            )
        step_key = fold_in_many(base_key, state.step)  # = fold_in(base_key, step), one fused pass
        (value, terms), grads = jax.value_and_grad(loss, has_aux=True)(state.params, step_key, batch, indices, state.step)

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        if form == "unchecked":  # no pass over the gradient: `make_multi_step` checks the state it ends with
            grad_norm = jnp.full((), jnp.nan, jnp.result_type(value))
            finite = jnp.isfinite(value)
            params, opt_state = update(None)
        else:
            grad_norm = _global_norm(grads)
            # A NaN or infinite gradient entry makes the norm non-finite: one reduction checks them all.
            finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)
            if form == "loop":  # a loop carry: the skip passes it through (see the docstring)
                params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
            else:
                # At a jit boundary the update is applied first and undone when the check fails:
                # each leaf's update then overlaps the rest of the backward pass instead of
                # waiting for the whole gradient and its check (see the docstring).
                old = (state.params, state.opt_state)
                params, opt_state = _unless_replaced(
                    finite, update(None), lambda: jax.tree.map(lambda leaf: _reselected(leaf, finite), old)
                )
        new_state = TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
            skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
        )
        return new_state, StepInfo(terms.objective, terms.kl, terms.kl_weight, grad_norm, finite)

    step.in_loop = in_loop
    step.unchecked = unchecked
    return step


def _global_norm(tree, *, small: int = 1024) -> jax.Array:
    r"""$\sqrt{\sum_i g_i^2}$ over every leaf: one dot product per leaf, the small leaves joined.

    The same number as `optax.tree.norm` (to rounding), but faster on CPU, where each XLA
    operation costs a few microseconds however small:

    * `vdot` is one pass, where XLA splits each large `reduce` in two (a `reduce-window` for
      precision, then a `reduce`): 1.054 -> 1.016 of the floor on W3 inside a scan;
    * the leaves of fewer than `small` entries (the biases) are joined into one vector first, one
      product instead of one each;
    * each leaf passes an `optimization_barrier` first. Without it XLA shares the squares
      $g_i^2$ with Adam's second-moment update when both are in one computation (the update
      applied before the check, `make_step`) and writes them out as an array of their own:
      an extra pass over the gradient.
    """
    leaves = [jax.lax.optimization_barrier(leaf) for leaf in jax.tree.leaves(tree)]
    joined = [leaf.ravel() for leaf in leaves if leaf.size < small]
    vectors = [leaf for leaf in leaves if leaf.size >= small] + ([jnp.concatenate(joined)] if joined else [])
    return jnp.sqrt(sum(jnp.vdot(v, v).real for v in vectors))


def _unless_replaced(ok, result, replacement: Callable[[], Any]):
    """`result` if `ok`, else `replacement()`, computed only then.

    A `while_loop` taken zero times or once: its carry takes over `result`'s buffers, where a
    `lax.cond` returning `result` would copy every leaf of it.
    """
    return jax.lax.while_loop(lambda carry: ~carry[0], lambda carry: (jnp.bool_(True), replacement()), (ok, result))[1]


def _reselected(leaf, finite):
    """`leaf` itself, as a new array: `where(finite, 0, leaf)` where `finite` is False (XLA cannot fold it)."""
    if not (jnp.issubdtype(leaf.dtype, jnp.number) or leaf.dtype == jnp.bool_):
        return leaf  # e.g. a PRNG key in an optimizer's state: passed through (and copied)
    return jnp.where(finite, jnp.zeros_like(leaf), leaf)


def make_multi_step(step, *, check: str = "call"):
    r"""Run `step` over stacked batches `(S, B, ...)` and indices `(S, B)` in one `lax.scan`.

    With `check="call"` (the default, for a step from `make_step`) the gradients are checked
    once per call, not once per step. The $S$ steps first run unchecked (`step.unchecked`:
    the update applied without a pass over the gradient); if every loss is finite and so is
    the state they end with (parameters and optimizer state), that is the result. Otherwise
    the same $S$ steps run again from the state the call was given, each checked and skipped
    as `make_step` does (`step.in_loop`), with the same keys (a function of position) and so
    the same draws. The pass over the gradient that a per-step check needs cost 6-8% of the
    one-sample ELBO step of the IWAE model on 2 CPU cores (medians of 21 paired rounds: 1.057
    of the hand-written floor checked per step, 0.979 checked per call); the one pass over the
    state per call is spread over its $S$ steps. The re-run branch is compiled too, so the
    first call compiles about twice as long.

    This relies on a non-finite gradient leaving its mark: in the optimizer state or the
    parameters, which it does in every optax optimizer that does not clean gradients itself
    (a NaN or infinity in the moments of Adam, RMSProp, Adamax or in SGD's step stays
    there). With one that handles them itself (`optax.zero_nans()`, `optax.apply_if_finite`),
    such a step is applied or skipped as that optimizer says, and not counted as skipped here;
    the parameters stay finite either way. In the steps that ran unchecked,
    `StepInfo.grad_norm` is NaN. `check="step"` checks every step, with its gradient norm.

    The two forms can differ on one kind of step: a gradient whose entries are all finite but
    whose global norm overflows (float32 entries from about 1e18). A per-step check skips it,
    by design (its norm is not finite, and at about 2e19 Adam's squared moments overflow too,
    which would leave an infinite state behind); the once-per-call check applies it when the
    state it gives is finite, and re-runs the call, checked, when it is not.

    A checked step skips a non-finite loss or gradient, but a finite gradient can still give a
    non-finite update (an infinite learning rate, parameters near the largest float). With a
    step from `make_step`, either check form therefore also checks the state the checked steps
    end with; if it is not finite, the whole call is undone: the state it was given comes back
    with every one of its $S$ steps counted as skipped (`StepInfo.finite` all False), so that
    no NaN reaches the parameters and `fit` stops after `max_skipped_in_a_row` such steps.

    A step without `unchecked` (your own) is scanned as it is, using `step.in_loop` where it
    has one.
    """
    if check not in ("call", "step"):
        raise ValueError(f"`check` must be 'call' or 'step', got {check!r}.")
    body = getattr(step, "in_loop", step)
    ours = hasattr(step, "unchecked")  # a step from `make_step`: its state is a `TrainState`
    unchecked = step.unchecked if ours and check == "call" else None

    def scan(fn, state, batches, indices):
        return jax.lax.scan(lambda s, xs: fn(s, *xs), state, (batches, indices))

    def checked(state, batches, indices):
        result = scan(body, state, batches, indices)
        if not ours:
            return result
        ok = _all_finite((result[0].params, result[0].opt_state))
        return _unless_replaced(ok, result, lambda: _call_skipped(state, result[1], ok))

    def multi_step(state: TrainState, batches, indices):
        if ours:  # a step of your own may stack its batches otherwise
            _check_stacked(batches, indices)
        if unchecked is None:
            return checked(state, batches, indices)
        fast = scan(unchecked, state, batches, indices)
        ok = jnp.all(fast[1].finite) & _all_finite((fast[0].params, fast[0].opt_state))
        return _unless_replaced(ok, fast, lambda: checked(state, batches, indices))

    return multi_step


def _check_stacked(batches, indices) -> None:
    """At trace time: `batches` `(S, B, ...)` and `indices` `(S, B)`, one batch per step."""
    expected = jnp.shape(indices)
    for leaf in jax.tree.leaves(batches):
        if len(expected) != 2 or jnp.ndim(leaf) < 2 or jnp.shape(leaf)[:2] != expected:
            raise ValueError(
                "A multi-step call takes its steps' batches stacked, `batches` (S, B, ...) and `indices` "
                f"(S, B); got batches {jnp.shape(leaf)} and indices {expected}."
            )


def _call_skipped(state: TrainState, info: StepInfo, ok):
    """`state` after a call whose $S$ steps were all skipped (`info`: the call's `(S,)` infos).

    Computed only where `ok` is False; the parameters and optimizer state are re-selected with it
    (`_reselected`), so that XLA does not copy the state inside the loop that holds this branch.
    """
    num_steps = info.finite.shape[0]
    params, opt_state = jax.tree.map(lambda leaf: _reselected(leaf, ok), (state.params, state.opt_state))
    skipped = state._replace(
        params=params,
        opt_state=opt_state,
        step=state.step + num_steps,
        num_skipped=state.num_skipped + num_steps,
        skipped_in_a_row=state.skipped_in_a_row + num_steps,
    )
    return skipped, info._replace(finite=jnp.zeros_like(info.finite))


def _all_finite(tree) -> jax.Array:
    """Whether every floating entry of `tree` is finite: one integer `min` of `isfinite` per leaf.

    Not `isfinite(max(abs(leaf)))`: on CPU, XLA's `max` over 4096 entries or more skips a NaN
    (its fast min/max), so one NaN entry of a large kernel or of its Adam moments went unseen.
    Not a sum either: a sum of large but finite Adam moments could overflow and send a finite call
    to its re-run. The `uint8` minimum is exact, and the fastest of the exact forms measured
    (about 0.16 ms for the IWAE model's parameters and Adam moments on 2 CPU cores).
    """
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact) and jnp.size(leaf)]
    flags = (jnp.min(jnp.isfinite(leaf).astype(jnp.uint8)) == 1 for leaf in leaves)
    return functools.reduce(jnp.logical_and, flags, jnp.bool_(True))


# ------------------------------------------------------------------------------------------------
# The host loop: batches, checkpoints, metrics, progress.
# ------------------------------------------------------------------------------------------------


class TrainingStopped(RuntimeError):
    """`fit` stopped: `max_skipped_in_a_row` steps in a row were skipped (non-finite); the last good state is checkpointed."""


class Terminated(KeyboardInterrupt):
    """`fit` received SIGTERM (a batch scheduler's stop, `kill PID`) and checkpointed its last finished call.

    A `KeyboardInterrupt`, since it is handled as Ctrl-C is: the work since the last checkpoint is
    kept, and the run resumes from it exactly.
    """


class FitConfig(NamedTuple):
    """Settings of `fit` (all plain Python values).

    Attributes:
      seed: the run's seed (batch order, binarization and every sample derive from it).
      batch_size: examples per step.
      num_steps: train until `TrainState.step` reaches this.
      steps_per_call: steps per jitted `lax.scan` call.
      checkpoint_every: save every this many steps (a multiple of `steps_per_call`), and at the end.
      keep_checkpoints: how many checkpoints to keep.
      max_skipped_in_a_row: stop the run after this many consecutive non-finite steps.
      binarize: `"dynamic"` (fresh Bernoulli(pixel/255) per batch, from uint8 grey levels) or
        `"none"` (the data are used as given: binary for a Bernoulli likelihood, finite for a
        Gaussian one, as the model's `likelihood` says).
    """

    seed: int = 0
    batch_size: int = 100
    num_steps: int = 1000
    steps_per_call: int = 10
    checkpoint_every: int = 200
    keep_checkpoints: int = 3
    max_skipped_in_a_row: int = 10
    binarize: str = "dynamic"


def _likelihood_of(graphdef, params) -> str:
    """The model's likelihood name (`VAE.likelihood`); models that do not say are Bernoulli ones."""
    return getattr(nnx.merge(graphdef, params), "likelihood", "bernoulli")


def _check_config(config: FitConfig, num_examples: int) -> None:
    from elbojax import data

    for name in ("batch_size", "num_steps", "steps_per_call", "checkpoint_every", "keep_checkpoints", "max_skipped_in_a_row"):
        _checks.check_positive_int(getattr(config, name), name)
    data.check_seed(config.seed)
    if config.checkpoint_every % config.steps_per_call:
        raise ValueError(
            f"`checkpoint_every` ({config.checkpoint_every}) must be a multiple of `steps_per_call` "
            f"({config.steps_per_call}): checkpoints fall on the boundaries of the scanned calls."
        )
    if config.binarize not in ("dynamic", "none"):
        raise ValueError(f"`binarize` must be 'dynamic' or 'none', got {config.binarize!r}.")
    if config.batch_size > num_examples:
        raise ValueError(f"`batch_size` ({config.batch_size}) exceeds the number of examples ({num_examples}).")


def _batches_for(images, config: FitConfig, first_step: int, count: int, mesh, observed=None):
    """The batches of steps first..first+count-1 as global arrays `(count, B, D)` and indices `(count, B)`.

    Split along the example axis over `mesh`; this process reads and binarizes only the rows
    its own devices hold (with exactly the draws of the whole batch).
    """
    from elbojax import data

    num_examples = images.shape[0]
    per_epoch = num_examples // config.batch_size
    positions = [divmod(step, per_epoch) for step in range(first_step, first_step + count)]
    indices = np.stack([data.batch_indices(config.seed, epoch, num_examples, config.batch_size)[position] for epoch, position in positions])

    def fetch(block):
        steps, rows = block[0], block[1]
        out = []
        for (epoch, position), index in zip(positions[steps], indices[steps]):
            batch = images[index[rows]].reshape(len(index[rows]), -1)
            if config.binarize == "dynamic":
                batch = data.dynamic_binarize(batch, seed=config.seed, epoch=epoch, step=position, rows=rows, batch_size=config.batch_size)
            if observed is not None:
                batch = np.where(observed[index[rows]], batch, np.nan)
            out.append(batch)
        return np.asarray(np.stack(out), np.float32)[(slice(None), slice(None), *block[2:])]

    data_dim = int(np.prod(images.shape[1:]))
    batches = distributed.shard_rows((count, config.batch_size, data_dim), mesh, fetch, axis=1)
    global_indices = distributed.shard_rows((count, config.batch_size), mesh, lambda block: indices[block].astype(np.int32), axis=1)
    return batches, global_indices


def fit(
    graphdef,
    state: TrainState,
    optimizer,
    objective_fn: Objective,
    images,
    *,
    run_dir,
    config: FitConfig = FitConfig(),
    progress: bool = True,
    mesh=None,
    observed=None,
) -> TrainState:
    """Train until `config.num_steps`, resuming from the latest checkpoint in `run_dir` if there is one.

    Checkpoints (orbax) are written every `config.checkpoint_every` steps and at the end, keeping
    the last `config.keep_checkpoints`; metrics go to `run_dir/metrics.jsonl`, one line per call
    (the objective and KL are means over the call's applied steps, `null` if every one was skipped
    or the value is not reported).
    Because every key and batch is a function of the step, a run interrupted at any point (even
    killed) and resumed reaches the same parameters as an uninterrupted one, on any number of
    devices. Ctrl-C, or SIGTERM (what a batch scheduler sends before it kills a job), first
    checkpoints the last finished call, so that no work is lost (in a single-process run).

    Args:
      graphdef, state: from `init` (the state is the starting point when there is no checkpoint,
        and the structure to restore into when there is).
      optimizer: the optax optimizer `state` was made with.
      objective_fn: the objective, e.g. `objective("iwae", num_samples=5)`.
      images: `(N, ...)`: uint8 grey levels for `binarize="dynamic"`, else the data as the
        likelihood takes them (binary or real floats).
      run_dir: the run's folder.
      config: a `FitConfig`.
      progress: show a tqdm progress bar with the running bound.
      mesh: a `jax.sharding.Mesh` with a `"data"` axis (`elbojax.distributed.data_mesh`): the
        state is replicated on its devices and each batch split over its `"data"` axis;
        `config.batch_size` must be a multiple of that axis's size. Default: the first device.
      observed: optional `bool (N, D)`, or `(D,)` for the same entries in every example, True
        where an entry was observed: the others reach the
        objective as NaN (after binarization), which only an objective that accepts missing
        entries may take (`elbojax.missing.objective`). Float `images` may also carry NaN at
        their missing entries themselves, with such an objective.

    Returns:
      The final `TrainState` (replicated on the mesh).

    Raises:
      ValueError: before any step, for data outside the likelihood's support or beyond float32,
        a bad config, or a fresh run whose starting state is not finite.
      TrainingStopped: `config.max_skipped_in_a_row` steps in a row were skipped (a
        `RuntimeError`; the last good state is checkpointed first).
      KeyboardInterrupt: Ctrl-C; `Terminated`, a `KeyboardInterrupt`, for SIGTERM (while `fit`
        runs in the main thread and SIGTERM has its default action; a handler of your own is
        left in place). Both after the checkpoint.
    """
    import json
    import time

    import orbax.checkpoint as ocp
    from tqdm import tqdm  # text bars (tqdm.auto wants ipywidgets in notebooks)

    from elbojax import data

    images = np.asarray(images)
    _check_config(config, images.shape[0])
    accepts_missing = getattr(objective_fn, "accepts_missing", False)
    if observed is not None:
        observed = np.asarray(observed)
        if observed.shape == (int(np.prod(images.shape[1:])),):  # one mask for every example
            observed = np.broadcast_to(observed, (images.shape[0],) + observed.shape)
        if not accepts_missing:
            raise ValueError("`observed` marks missing entries, which this objective cannot take; use elbojax.missing.objective(...).")
        if observed.dtype != np.bool_ or observed.shape != (images.shape[0], int(np.prod(images.shape[1:]))):
            raise ValueError(f"`observed` must be bool of shape {(images.shape[0], int(np.prod(images.shape[1:])))} (or one example's), got {observed.dtype} {observed.shape}.")
    if config.binarize == "none":
        present = images[~np.isnan(images)] if accepts_missing and data.is_float(images.dtype) else images
        data.check_for_likelihood(present, _likelihood_of(graphdef, state.params), "images")
        _check_fits_float32(images, "images")  # NaN (missing) entries are not its concern
    elif images.dtype != np.uint8:
        raise TypeError(f"binarize='dynamic' needs uint8 grey levels, got dtype {images.dtype}; pass binarize='none' for data that are already binary.")
    mesh = distributed.data_mesh(1) if mesh is None else mesh
    distributed.check_divisible(config.batch_size, mesh, "`batch_size`")
    primary = distributed.is_primary()

    run_dir = Path(run_dir)
    manager = ocp.CheckpointManager(
        (run_dir / "checkpoints").absolute(),
        options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, enable_async_checkpointing=False),
    )
    resuming = manager.latest_step() is not None
    if not resuming:
        _check_finite_start(state)
    state = distributed.replicate(state, mesh)
    if resuming:
        state = restore(manager, state)  # into the mesh's shardings

    replicated = distributed.replicated(mesh)
    batch_sharding = distributed.row_sharding(mesh, 3, axis=1)
    multi_step = jax.jit(
        make_multi_step(make_step(graphdef, optimizer, objective_fn, seed=config.seed)),
        in_shardings=(replicated, batch_sharding, distributed.row_sharding(mesh, 2, axis=1)),
        out_shardings=(replicated, replicated),
    )
    start = int(state.step)
    metrics_path = run_dir / "metrics.jsonl"
    if primary:
        _truncate_metrics(metrics_path, start)
    distributed.barrier("elbojax-fit-start")
    bar = tqdm(total=config.num_steps, initial=start, disable=not (progress and primary), desc="training", unit="step")
    recorded = state  # the latest state whose call is in the metrics: what Ctrl-C or SIGTERM checkpoints
    restore_sigterm = _sigterm_as_interrupt()
    try:
        with open(metrics_path, "a") if primary else _Discard() as metrics:
            while int(state.step) < config.num_steps:
                first = int(state.step)
                # Calls end on multiples of `steps_per_call` (so checkpoints fall on multiples of
                # `checkpoint_every`), also after a resume from a step that is not one: the end of a
                # shorter run, later extended.
                count = min(config.steps_per_call - first % config.steps_per_call, config.num_steps - first)
                batches, indices = _batches_for(images, config, first, count, mesh, observed)
                began = time.perf_counter()
                skipped_before = int(state.skipped_in_a_row)
                state, info = multi_step(state, batches, indices)
                info = distributed.to_host(info)
                objective_mean = _applied_mean(info.objective, info.finite)
                record = {
                    "step": int(state.step), "objective": objective_mean, "kl": _applied_mean(info.kl, info.finite),
                    "kl_weight": float(info.kl_weight[-1]), "num_skipped": int(state.num_skipped),
                    "seconds": time.perf_counter() - began,
                }
                metrics.write(json.dumps(record) + "\n")
                metrics.flush()
                recorded = state
                bar.update(count)
                bar.set_postfix(bound="skipped" if objective_mean is None else f"{objective_mean:.2f}")
                step = int(state.step)
                longest = _longest_skipped_run(info.finite, skipped_before)
                if longest >= config.max_skipped_in_a_row:
                    _save(manager, step, state)
                    raise TrainingStopped(
                        f"Stopped at step {step}: {longest} steps in a row had a non-finite "
                        "loss, gradient or update (skipped, parameters untouched). Lower the learning rate or check "
                        f"the data and the model; the last good state is checkpointed in {run_dir / 'checkpoints'}."
                    )
                if step % config.checkpoint_every == 0 or step == config.num_steps:
                    _save(manager, step, state)
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM (`Terminated`): keep the work done since the last checkpoint
        step = int(recorded.step)
        if jax.process_count() == 1 and step > (manager.latest_step() or 0):  # several processes would all have to save
            _save(manager, step, recorded)
            how = "terminated" if isinstance(stop, Terminated) else "interrupted"
            print(f"\n{how}: checkpointed step {step} in {run_dir / 'checkpoints'}; resume to go on.", file=sys.stderr)
        raise
    finally:
        restore_sigterm()
        bar.close()
        manager.close()
    return state


def _check_finite_start(state: TrainState) -> None:
    """At the host boundary: a fresh run's starting parameters and optimizer state are finite.

    A NaN there would make every step non-finite: all skipped, and the run stopped, for a
    reason that is not the data's or the learning rate's.
    """
    flat = jax.tree_util.tree_flatten_with_path((state.params, state.opt_state))[0]
    for path, leaf in flat:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.inexact):  # counts, PRNG keys, ...
            continue
        leaf = np.asarray(distributed.to_host(leaf))
        if not np.isfinite(leaf).all():
            where = "params" if path[0].idx == 0 else "opt_state"
            raise ValueError(
                f"The starting state holds NaN or infinite entries ({where}{jax.tree_util.keystr(path[1:])}, "
                f"{int((~np.isfinite(leaf)).sum())} of {leaf.size}); no step could be applied from it. "
                "Check the model's initialisation (e.g. the output bias)."
            )


def _check_fits_float32(x: np.ndarray, name: str) -> None:
    """Data reach the device as float32: a finite value beyond its range would arrive as inf."""
    if x.dtype.kind == "f" and x.dtype.itemsize > 4:
        with np.errstate(over="ignore"):
            overflows = np.isinf(x.astype(np.float32)) & np.isfinite(x)
        if overflows.any():
            index = tuple(int(i) for i in np.argwhere(overflows)[0])
            raise ValueError(
                f"`{name}` must fit float32 (training and evaluation run in float32, largest "
                f"{np.finfo(np.float32).max:.4g}); got {x[index]!s} at index {index} "
                f"({int(overflows.sum())} of {x.size} values)."
            )


def _applied_mean(values, finite) -> float | None:
    """The mean of `values` over the steps whose update was applied (`finite`); None (JSON's
    `null`) if none was, or if the value is not reported (a NaN KL: a model without `log_prior`)."""
    kept = np.asarray(values)[np.asarray(finite, bool)]
    mean = float(kept.mean()) if kept.size else float("nan")
    return mean if np.isfinite(mean) else None


def _longest_skipped_run(finite, skipped_before: int) -> int:
    """The longest run of skipped steps in a call, counting the `skipped_before` that ended the last
    one: a run that ends inside a call stops training too, however the steps are grouped. Only a run
    that this call extends counts (a resumed stopped run whose steps are now applied goes on)."""
    longest, run = 0, skipped_before
    for applied in np.asarray(finite, bool):
        run = 0 if applied else run + 1
        longest = max(longest, run)
    return longest


def _save(manager, step: int, state: TrainState) -> None:
    """Checkpoint `state` as step `step`, refusing non-finite parameters or optimizer state.

    `make_multi_step` never returns such a state (a call whose steps end non-finite is undone),
    so this guards the checkpoints, the last good one included, against a bug rather than
    against the data.
    """
    import orbax.checkpoint as ocp

    leaves = [leaf for leaf in jax.tree.leaves((state.params, state.opt_state)) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    if not all(np.isfinite(leaf).all() for leaf in distributed.to_host(leaves)):
        raise RuntimeError(
            f"Refusing to checkpoint step {step}: the parameters or optimizer state hold NaN or "
            f"infinite entries; the checkpoints in {manager.directory} are kept as they are."
        )
    with _ctrl_c_held():
        manager.save(step, args=ocp.args.StandardSave(state), force=True)
        manager.wait_until_finished()


def _raise_terminated(signum, frame):
    raise Terminated(f"signal {signum} (SIGTERM)")


def _sigterm_as_interrupt() -> Callable[[], None]:
    """Until the returned function is called, SIGTERM raises `Terminated`, which `fit` handles as Ctrl-C.

    Batch schedulers (SLURM, Kubernetes) send SIGTERM some seconds before they kill a job; by
    default it ended the process at once, losing the steps since the last checkpoint. Only
    where SIGTERM has its default action, in the main thread: a handler of the caller's own
    (a notebook kernel's, say) is left in place.
    """
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        return lambda: None
    signal.signal(signal.SIGTERM, _raise_terminated)

    def restore() -> None:
        if signal.getsignal(signal.SIGTERM) is _raise_terminated:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    return restore


@contextlib.contextmanager
def _ctrl_c_held():
    """Ctrl-C, and SIGTERM while `fit` handles it, wait until the block ends, then raise.

    For a checkpoint being written: interrupted, orbax left it unfinished and could not write it
    again (the Ctrl-C handler of `fit` failed with an OSError, and the steps since the previous
    checkpoint were lost). Only the signals whose handler is Python's own (`KeyboardInterrupt`)
    or `fit`'s (`Terminated`), in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    raised = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: _raise_terminated}
    held = {signum: handler for signum, handler in raised.items() if signal.getsignal(signum) is handler}
    caught = []
    for signum in held:
        signal.signal(signum, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for signum, handler in held.items():
            signal.signal(signum, handler)
    if caught:
        held[caught[0]](caught[0], None)  # raises, as the signal would have


class _Discard:
    """A metrics file for the processes that do not write one."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def write(self, text):
        pass

    def flush(self):
        pass


def _truncate_metrics(path, step: int) -> None:
    """Drop metrics past `step` (written after the checkpoint a resumed run restarts from)."""
    import json

    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    steps = [_record_step(line, json) for line in lines]
    kept = [line for line, at in zip(lines, steps) if at is not None and at <= step]
    if len(kept) != len(lines):  # also drops a line cut short by a kill (or a full disk) mid-write
        from elbojax import data

        data._write_atomically(path, "".join(line + "\n" for line in kept).encode())  # a kill now loses nothing


def _record_step(line: str, json) -> int | None:
    """The step of one metrics line, or None if the line is not a whole record."""
    try:
        record = json.loads(line)
        return int(record["step"])
    except (ValueError, TypeError, KeyError):
        return None


class CheckpointMismatch(ValueError):
    """A checkpoint whose tree is not the model's and optimizer's (`restore`)."""


def _leaf_shapes(tree) -> dict[str, tuple[int, ...]]:
    """`{path: shape}` of a pytree's leaves as stored (paths as `a/0/b`; a typed PRNG key as its
    key data), the older layout's last `value` level dropped."""
    def name(entry):
        return str(next(getattr(entry, a) for a in ("key", "name", "idx") if hasattr(entry, a)))

    def stored_shape(leaf):
        if jnp.issubdtype(getattr(leaf, "dtype", np.float32), jax.dtypes.prng_key):
            return jax.eval_shape(jax.random.key_data, leaf).shape
        return tuple(leaf.shape)

    shapes = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        names = [name(entry) for entry in path]
        shapes["/".join(names[:-1] if names[-1:] == ["value"] else names)] = stored_shape(leaf)
    return shapes


def check_checkpoint(manager, state: TrainState, step: int | None = None) -> None:
    """Raise a `CheckpointMismatch` if checkpoint `step` (default: the latest; none is fine) of an
    orbax `manager` does not hold `state`'s leaves with their shapes. Only its metadata is read.

    `restore` checks this first: orbax, asked to restore arrays of other shapes, fails deep
    inside its asynchronous reads (a hundred lines of tracebacks); the command line checks it
    before a resumed run writes anything to its folder."""
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None or step not in manager.all_steps():
        return
    item = Path(manager.directory) / str(step) / "default"  # the layout of `fit`'s managers
    if not item.is_dir():  # a manager that names its steps otherwise: orbax alone checks
        return
    handler = ocp.StandardCheckpointHandler()
    try:
        stored = handler.metadata(item)
    finally:
        handler.close()
    stored, expected = _leaf_shapes(getattr(stored, "tree", stored)), _leaf_shapes(state)
    differences = [f"{path}: {stored[path]} stored, {shape} expected" if path in stored else f"{path}: not stored, {shape} expected"
                   for path, shape in expected.items() if stored.get(path) != shape]
    differences += [f"{path}: {shape} stored, not in this model" for path, shape in stored.items() if path not in expected]
    if differences:
        raise CheckpointMismatch(
            f"The checkpoint of step {step} in {manager.directory} does not fit this model and optimizer "
            f"(a different architecture, latent size or optimizer?): {'; '.join(differences[:3])}"
            + (f"; and {len(differences) - 3} more" if len(differences) > 3 else "") + "."
        )


def restore(manager, state: TrainState, step: int | None = None) -> TrainState:
    """Checkpoint `step` (default: the latest) of an orbax `manager`, in the layout of `state`.

    `state` (from `init`, possibly replicated on a mesh) gives the structure, shapes, dtypes
    and shardings to restore into. Checkpoints written while the parameters were an
    `nnx.State` (every leaf under a `value` key, as elbojax wrote them until the parameters
    became plain dicts) are read as well, and come back in the current layout. A checkpoint of
    another model or optimizer raises a `CheckpointMismatch` (a `ValueError`) with orbax's
    account of what differs.
    """
    import orbax.checkpoint as ocp

    step = manager.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"No checkpoint to restore in {manager.directory}.")
    if step not in manager.all_steps():
        raise FileNotFoundError(f"No checkpoint of step {step} in {manager.directory}; it has steps {sorted(manager.all_steps())}.")
    check_checkpoint(manager, state, step)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except ValueError as error:  # orbax: the tree on disk is not this one
        params_structure = jax.tree.structure(abstract.params)
        is_params_like = lambda node: isinstance(node, dict) and jax.tree.structure(node) == params_structure
        under_value = lambda node: jax.tree.map(lambda leaf: {"value": leaf}, node) if is_params_like(node) else node
        older = jax.tree.map(under_value, abstract, is_leaf=is_params_like)  # the parameters and optimizer moments
        try:
            restored = manager.restore(step, args=ocp.args.StandardRestore(older))
        except ValueError:  # neither layout
            raise CheckpointMismatch(
                f"The checkpoint of step {step} in {manager.directory} does not fit this model and optimizer "
                f"(a different architecture, latent size or optimizer?). Orbax says: {error}"
            ) from None
    return jax.tree.unflatten(jax.tree.structure(abstract), jax.tree.leaves(restored))


# ------------------------------------------------------------------------------------------------
# Evaluation
# ------------------------------------------------------------------------------------------------


class Evaluation(NamedTuple):
    """Test-set numbers, averaged over data points (nats unless said otherwise).

    Attributes:
      log_likelihood: mean importance-sampled $\\log \\hat p(x)$ with K samples.
      log_likelihood_se: its standard error over data points.
      bits_per_dim: $-\\log \\hat p(x) / (D \\ln 2)$ for binary data (a Bernoulli likelihood,
        a probability); NaN for a density (a Gaussian likelihood), whose log-density has no
        meaning in bits without discretized data.
      elbo: mean ELBO (Monte Carlo, `elbo_samples` per point).
      kl: mean $\\mathrm{KL}(q(z \\mid x) \\,\\|\\, p(z))$: closed form where the model has it,
        else a Monte Carlo estimate with `elbo_samples` samples (NaN without `log_prior`).
      kl_per_dimension: `(d,)`, the same per latent dimension where the KL has a closed form
        and a diagonal Gaussian prior (else NaN).
      active_units: the number of dimensions whose $E_q[z]$ varies over $x$ by more than 0.01
        (Burda et al. 2016); of the first stochastic layer for a hierarchical proposal; -1
        where the proposal has no mean.
      latent_dim: the number of dimensions of $E_q[z]$ (-1 where it has no closed form).
      num_samples: the K used for the log-likelihood.
      num_points: how many data points.
      log_likelihood_per_point: `(N,)`, $\\log \\hat p(x_i)$ of each point (for paired comparisons
        of models on the same points and keys).
    """

    log_likelihood: float
    log_likelihood_se: float
    bits_per_dim: float
    elbo: float
    kl: float
    kl_per_dimension: Any
    active_units: int
    latent_dim: int
    num_samples: int
    num_points: int
    log_likelihood_per_point: Any = None


def _proposal_mean(q):
    """E_q[z] where it has a closed form (for a hierarchical proposal, of its first layer q(z1 | x)); else NaN."""
    first = getattr(q, "first", q)
    try:
        return first.mean()
    except (AttributeError, NotImplementedError):  # no mean, or none in closed form (a flow)
        return jnp.full((1,), jnp.nan)


def evaluate(
    graphdef,
    params,
    data,
    *,
    seed: int = 0,
    num_samples: int = 5000,
    chunk_size: int = 500,
    elbo_samples: int = 100,
    mesh=None,
) -> Evaluation:
    """Evaluate a model on `data` `(N, D)`: log-likelihood, ELBO, KL, active units.

    The K-sample importance estimate is chunked (`chunk_size` samples at a time) and mapped over
    data points with `lax.map`, which bounds memory and, on CPU, is faster than vmapping the
    whole set at once (the evaluation is memory-bound). With a `mesh` (one with a `"data"` axis),
    the points are split over that axis (each device maps over its own share; the set is padded
    to a multiple of the axis's size and the padding dropped). Point i's key is
    `fold_in(key(seed), i)` on any mesh.
    """
    from jax.sharding import PartitionSpec

    from elbojax import data as data_lib
    from elbojax import diagnostics
    from elbojax.estimators import importance_log_marginal

    seed = _checks.check_seed(seed)
    num_samples = _checks.check_positive_int(num_samples, "num_samples")
    elbo_samples = _checks.check_positive_int(elbo_samples, "elbo_samples")
    data = np.asarray(data)
    likelihood = _likelihood_of(graphdef, params)
    data_lib.check_for_likelihood(data, likelihood, "data")
    _check_fits_float32(data, "data")
    if data.ndim != 2 or data.shape[0] < 1:
        raise ValueError(f"`data` must have shape (N, D) with N >= 1, got {data.shape}.")
    mesh = distributed.data_mesh(1) if mesh is None else mesh
    distributed.data_axis_size(mesh)  # a mesh without a "data" axis is refused here
    base = jax.random.key(seed)

    def per_point(params, index, x):
        model = nnx.merge(graphdef, params)
        key = jax.random.fold_in(base, index)
        q = model.proposal(x)
        log_px = importance_log_marginal(key, x, model.log_joint, q, num_samples=num_samples, chunk_size=chunk_size)
        # Keys no estimator reaches (sample k of the log-likelihood is fold_in(key, k), k < K).
        elbo_key, kl_key = jax.random.fold_in(key, _KL_SAMPLE_INDEX - 1), jax.random.fold_in(key, _KL_SAMPLE_INDEX - 2)
        bound = elbo(elbo_key, x, model.log_joint, q, num_samples=elbo_samples)
        per_dim = jnp.full((1,), jnp.nan)
        if getattr(model, "has_analytic_kl", False):
            kl = _analytic_kl(model, x, q)
            if _takes(model.analytic_kl, "per_dimension"):  # `analytic_kl(x)` alone is enough
                try:
                    per_dim = _analytic_kl(model, x, q, per_dimension=True)
                except ValueError:  # a closed form, but not a diagonal Gaussian pair
                    pass
        elif callable(getattr(model, "log_prior", None)):
            kl = expectation(kl_key, x, lambda x, z: q.log_prob(z) - model.log_prior(z), q, num_samples=elbo_samples)
        else:
            kl = jnp.nan
        loc = _proposal_mean(q)
        return log_px, bound, kl, per_dim, loc

    def shard(params, indices, xs):  # one device's points, one at a time
        return jax.lax.map(lambda args: per_point(params, *args), (indices, xs))

    points = PartitionSpec(distributed.DATA_AXIS)
    run = jax.jit(jax.shard_map(shard, mesh=mesh, in_specs=(PartitionSpec(), points, points), out_specs=points))
    num_points = data.shape[0]
    shares = distributed.data_axis_size(mesh)
    padded = -(-num_points // shares) * shares
    rows = np.concatenate([data, np.zeros((padded - num_points, data.shape[1]), data.dtype)]).astype(np.float32)
    xs = distributed.shard_rows(rows.shape, mesh, lambda block: rows[block])
    indices = distributed.shard_rows((padded,), mesh, lambda block: np.arange(padded, dtype=np.uint32)[block])
    outputs = distributed.to_host(run(distributed.replicate(params, mesh), indices, xs))
    log_px, bounds, kls, per_dim, locs = (np.asarray(out[:num_points], np.float64) for out in outputs)
    per_dim_mean = per_dim.mean(0)
    active = diagnostics.active_units(locs).count if np.all(np.isfinite(locs)) and num_points > 1 else -1
    return Evaluation(
        log_likelihood=float(log_px.mean()),
        log_likelihood_se=float(log_px.std(ddof=1) / np.sqrt(log_px.size)) if log_px.size > 1 else float("nan"),
        bits_per_dim=float(-log_px.mean() / (data.shape[1] * np.log(2.0))) if likelihood == "bernoulli" else float("nan"),
        elbo=float(bounds.mean()),
        kl=float(kls.mean()),
        kl_per_dimension=per_dim_mean,
        active_units=int(active),
        latent_dim=int(locs.shape[1]) if np.isfinite(locs).any() else -1,
        num_samples=num_samples,
        num_points=int(num_points),
        log_likelihood_per_point=log_px,
    )
