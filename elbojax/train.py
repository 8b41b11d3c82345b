r"""The training step: pure, jitted, `(state, batch, indices) -> (state, info)`.

The model is any Flax NNX module with `log_joint(x, z)` and `proposal(x)` (a `VAE` of
`elbojax.models`, or your own). Outside `jax.jit` it is split once into a static `graphdef` and
its parameters; inside, `nnx.merge(graphdef, params)` rebuilds it, the per-data-point objective
(any estimator of `elbojax`, with any gradient estimator) is vmapped over the batch, and an optax
optimizer updates the parameters.

**Randomness is a function of position, not of history.** The step's key is
`fold_in(key(seed), step)` and each example's key is `fold_in(step_key, global_index)`, where
`global_index` is the example's index in the training set. A resumed run, or the same batch cut
across several devices, therefore draws exactly the same samples.

**Non-finite steps are skipped, never applied.** If the loss or any gradient is NaN or infinite,
the parameters and the optimizer state are left as they were, and the skip is counted
(`TrainState.num_skipped`, `TrainState.skipped_in_a_row`); the host loop stops a run after too
many in a row. A NaN never reaches the parameters.

`make_multi_step` runs several steps in one call with `lax.scan` (the per-call overhead
dominates small steps such as the one-sample ELBO).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elbojax import _checks
from elbojax.estimators import elbo, iwae_bound

Objective = Callable[[jax.Array, Any, jax.Array], jax.Array]
"""`objective(key, model, x) -> scalar`: the bound for ONE data point (higher is better)."""


class TrainState(NamedTuple):
    """Everything a training run carries from step to step (a pytree; checkpoint it whole).

    Attributes:
      step: `int32[]`, the number of steps taken (skipped ones included): the step's position.
      params: the model's `nnx.Param` state.
      opt_state: the optax state.
      num_skipped: `int32[]`, steps skipped because the loss or a gradient was not finite.
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
      objective: the batch mean of the bound (higher is better).
      grad_norm: the global norm of the gradient.
      finite: whether the step was applied (loss and gradients finite).
    """

    objective: jax.Array
    grad_norm: jax.Array
    finite: jax.Array


def objective(name: str = "iwae", *, num_samples: int = 5, gradient: str = "reparam", chunk_size=None) -> Objective:
    """A per-data-point objective by name: `"elbo"` or `"iwae"`, with its gradient estimator.

    Args:
      name: `"elbo"` (Monte Carlo ELBO) or `"iwae"` (the IWAE bound).
      num_samples: $K$.
      gradient: any gradient estimator the estimator accepts (see `elbojax.gradients`).
      chunk_size: passed to the estimator.
    """
    estimators = {"elbo": elbo, "iwae": iwae_bound}
    if name not in estimators:
        raise ValueError(f"`name` must be one of {sorted(estimators)}, got {name!r}.")
    _checks.check_positive_int(num_samples, "num_samples")
    estimator = estimators[name]

    def per_point(key, model, x):
        return estimator(
            key, x, model.log_joint, model.proposal(x), num_samples=num_samples, gradient=gradient, chunk_size=chunk_size
        )

    return per_point


def init(model: nnx.Module, optimizer: optax.GradientTransformation):
    """Split `model` into `(graphdef, TrainState)`; the graphdef is static, the state a pytree."""
    graphdef, params = nnx.split(model, nnx.Param)
    zero = jnp.zeros((), jnp.int32)
    return graphdef, TrainState(zero, params, optimizer.init(params), zero, zero)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def make_step(graphdef, optimizer: optax.GradientTransformation, per_point: Objective, *, seed: int):
    """Build the pure step `(state, batch, indices) -> (state, info)` (not jitted: jit or scan it).

    Args:
      graphdef: from `init`.
      optimizer: any optax transformation (with its schedule).
      per_point: `objective(key, model, x) -> scalar`, e.g. from `objective(...)`.
      seed: the run's seed.

    The step takes `batch` of shape `(B, ...)` and `indices`, `int[B]`, the examples' global
    indices in the training set; it maximises the batch mean of the objective.
    """
    base_key = jax.random.key(seed)

    def loss(params, step_key, batch, indices):
        model = nnx.merge(graphdef, params)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(step_key, indices.astype(jnp.uint32))
        bounds = jax.vmap(per_point, in_axes=(0, None, 0))(keys, model, batch)
        return -jnp.mean(bounds)

    def step(state: TrainState, batch, indices):
        if jnp.ndim(indices) != 1 or jnp.shape(indices)[0] != jnp.shape(batch)[0]:
            raise ValueError(
                f"`indices` must have shape ({jnp.shape(batch)[0]},), one per example of `batch`, "
                f"got {jnp.shape(indices)}."
            )
        step_key = jax.random.fold_in(base_key, state.step)
        value, grads = jax.value_and_grad(loss)(state.params, step_key, batch, indices)
        finite = jnp.isfinite(value) & _all_finite(grads)
        safe_grads = jax.tree.map(lambda g: jnp.where(finite, g, jnp.zeros_like(g)), grads)
        updates, new_opt_state = optimizer.update(safe_grads, state.opt_state, state.params)
        new_params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        skipped = (~finite).astype(jnp.int32)
        new_state = TrainState(
            step=state.step + 1,
            params=keep(new_params, state.params),
            opt_state=keep(new_opt_state, state.opt_state),
            num_skipped=state.num_skipped + skipped,
            skipped_in_a_row=jnp.where(finite, 0, state.skipped_in_a_row + 1),
        )
        return new_state, StepInfo(-value, optax.tree.norm(grads), finite)

    return step


def make_multi_step(step):
    """Run `step` over stacked batches `(S, B, ...)` and indices `(S, B)` in one `lax.scan`."""

    def multi_step(state: TrainState, batches, indices):
        return jax.lax.scan(lambda s, xs: step(s, *xs), state, (batches, indices))

    return multi_step
