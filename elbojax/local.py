r"""Local (non-amortised) variational inference: per-data-point parameters $\phi_i$ fitted by optax.

Stochastic variational inference (Hoffman et al. 2013) gives every data point $x_i$ its own
variational parameters $\phi_i$ and maximises a bound $\mathcal{L}(\theta, \phi_i; x_i)$ over
$\phi_i$ with the model $\theta$ fixed:

$$\phi_i^* = \arg\max_{\phi_i} \mathcal{L}(\theta, \phi_i; x_i), \qquad
  \mathcal{L} = \mathrm{ELBO}(q_{\phi_i}) = \log p_\theta(x_i) - \mathrm{KL}(q_{\phi_i} \,\|\, p_\theta(z \mid x_i))$$

(or the IWAE bound, or any other bound of elbojax). An encoder $q_\psi(z \mid x)$ amortises that
search with one network; its output is a good starting point (semi-amortised inference, Kim et
al. 2018, here without differentiating through the refinement), and the difference
$\mathrm{ELBO}(q^*) - \mathrm{ELBO}(q_\psi)$ is the amortisation gap of Cremer et al. (2018)
(`elbojax.gaps`).

**The pieces.**

* `phi` is any pytree of floating-point arrays, turned into a proposal by a `make_proposal(phi)`
  function: `DiagonalGaussian(loc, log_scale)` with `diagonal_gaussian` is the mean-field family;
  `elbojax.flows.local_flow_family` gives a normalising flow.
* A *local objective* is `objective(key, model, x, phi) -> scalar` (higher is better), where
  `model` is anything with `log_joint(x, z)` (an `elbojax.models.VAE`, an `elbojax.exact` model,
  your own). `objective("elbo" | "iwae", ...)` wraps the estimators with any gradient estimator;
  `closed_form_objective()` is the exact ELBO of a diagonal Gaussian for a model that has one
  (`exact.LinearGaussian.elbo_diag_gaussian`), for tests and exact claims.
* `optimize_local(key, model, x, phi, ...)` runs `num_steps` optax steps on $\phi$ in a
  `lax.scan` (one data point; `optimize_local_batch` vmaps it over a batch).
* `svi_init` / `make_svi_step` train a model *without an encoder*: for each batch, fit the
  $\phi_i$ (warm-started from the previous visit of the same point, or from a fixed start), then
  take one optax step on $\theta$ along $\nabla_\theta \mathcal{L}(\theta, \phi_i^*; x_i)$ with
  $\phi_i^*$ held fixed. At an exact optimum this is the gradient of
  $\max_\phi \mathcal{L}(\theta, \phi)$ (the envelope theorem: $\partial_\phi \mathcal{L} = 0$ there).

**Randomness is a function of position.** Inner step $t$ of point $i$ draws from
`fold_in(fold_in(key, index_i), t)`; the same key and index give the same fit on any batch
composition or device count.

**Non-finite steps are skipped.** An inner step whose objective or gradient is not finite leaves
$\phi$ and the optimizer state unchanged and is counted (`LocalResult.num_skipped`). The check
is on the gradient's global norm, so a finite gradient whose norm overflows (float32 entries
from about 1e18) is skipped too, as `train.make_step` does.

References:
  Hoffman, Blei, Wang & Paisley, *Stochastic Variational Inference*, JMLR 2013,
  https://arxiv.org/abs/1206.7051;
  Cremer, Li & Duvenaud, *Inference Suboptimality in Variational Autoencoders*, ICML 2018,
  https://arxiv.org/abs/1801.03558;
  Kim, Wiseman, Miller, Sontag & Rush, *Semi-Amortized Variational Autoencoders*, ICML 2018,
  https://arxiv.org/abs/1802.02550
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import distrax
import jax
import jax.numpy as jnp
import optax
from flax import nnx

from elbojax import _checks
from elbojax._keys import fold_in_many
from elbojax.estimators import elbo, iwae_bound
from elbojax.proposals import MultivariateNormalDiag

LocalObjective = Callable[[jax.Array, Any, Any, Any], jax.Array]
"""`objective(key, model, x, phi) -> scalar`: the bound to maximise for one data point (higher is better)."""

# The inner loop's step t draws from fold_in(point_key, t), t < num_steps; the outer (model) step
# of `make_svi_step` draws from this index, which no inner loop reaches.
_OUTER_INDEX = 2**31 - 1


# ------------------------------------------------------------------------------------------------
# The mean-field Gaussian family.
# ------------------------------------------------------------------------------------------------


class DiagonalGaussian(NamedTuple):
    r"""The parameters of $q(z) = \mathcal{N}(\mu, \mathrm{diag}\, e^{2s})$ for one data point.

    Attributes:
      loc: $\mu$, shape `(latent_dim,)`.
      log_scale: $s = \log \sigma$, shape `(latent_dim,)` (unconstrained, so optax can step it).
    """

    loc: jax.Array
    log_scale: jax.Array


def _check_diagonal_gaussian(phi, name: str = "phi") -> None:
    if not isinstance(phi, DiagonalGaussian):
        raise TypeError(
            f"`{name}` must be a `DiagonalGaussian(loc, log_scale)` for this family, got {type(phi).__name__}."
        )
    loc_shape, scale_shape = jnp.shape(phi.loc), jnp.shape(phi.log_scale)
    if len(loc_shape) != 1 or loc_shape != scale_shape:
        raise ValueError(
            f"`{name}.loc` and `{name}.log_scale` must both have shape (latent_dim,) for ONE data point; "
            f"got {loc_shape} and {scale_shape} (a batch of parameters goes through optimize_local_batch)."
        )
    for field in ("loc", "log_scale"):
        if not jnp.issubdtype(jnp.result_type(getattr(phi, field)), jnp.floating):
            raise TypeError(f"`{name}.{field}` must be floating point, got {jnp.result_type(getattr(phi, field))}.")


def diagonal_gaussian(phi: DiagonalGaussian) -> distrax.MultivariateNormalDiag:
    r"""$q_\phi = \mathcal{N}(\mu, \mathrm{diag}\, e^{2s})$ from `DiagonalGaussian(loc, log_scale)`.

    The `make_proposal` of the mean-field family (`GAUSSIAN`). The same class as the encoders'
    $q_\psi(z \mid x)$ (`proposals.MultivariateNormalDiag`), so that for one key both draw the
    same noise $\epsilon$: `gaps.inference_gaps` pairs their ELBOs on common random numbers.
    """
    _check_diagonal_gaussian(phi)
    return MultivariateNormalDiag(phi.loc, jnp.exp(phi.log_scale))


def diagonal_gaussian_from(proposal) -> DiagonalGaussian:
    r"""`DiagonalGaussian` parameters of a diagonal-Gaussian proposal (e.g. an encoder's $q_\psi(z \mid x)$).

    Args:
      proposal: a distribution with `loc` and `scale_diag` (`distrax.MultivariateNormalDiag`,
        what `models.GaussianMLPEncoder` returns) for one data point.
    """
    loc, scale = getattr(proposal, "loc", None), getattr(proposal, "scale_diag", None)
    if loc is None or scale is None:
        raise TypeError(
            "Starting the diagonal-Gaussian family from a proposal needs one with `loc` and `scale_diag` "
            f"(a distrax.MultivariateNormalDiag), got {type(proposal).__name__}."
        )
    return DiagonalGaussian(loc, jnp.log(scale))


class Family(NamedTuple):
    r"""A variational family for local inference.

    Attributes:
      make_proposal: `make_proposal(phi) -> distribution` for one data point's parameters.
      init_from: `init_from(proposal) -> phi`: the parameters that start the family at a
        diagonal-Gaussian proposal (the encoder's $q_\psi(z \mid x)$), so a local fit refines it.
    """

    make_proposal: Callable[[Any], Any]
    init_from: Callable[[Any], Any]


GAUSSIAN = Family(diagonal_gaussian, diagonal_gaussian_from)
"""The mean-field family: `DiagonalGaussian` parameters, started at the encoder's own $\\mu, \\sigma$."""


# ------------------------------------------------------------------------------------------------
# Local objectives.
# ------------------------------------------------------------------------------------------------


def _require_log_joint(model) -> None:
    if not callable(getattr(model, "log_joint", None)):
        raise TypeError(f"`model` must have a `log_joint(x, z)` method; {type(model).__name__} has none.")


def objective(
    name: str = "elbo",
    *,
    make_proposal: Callable[[Any], Any] = diagonal_gaussian,
    num_samples: int = 1,
    gradient: str = "reparam",
    chunk_size: int | None = None,
) -> LocalObjective:
    r"""A Monte Carlo local objective: `elbojax.elbo` or `elbojax.iwae_bound` of $q = $ `make_proposal(phi)`.

    $$\mathcal{L}(\phi; x) = \frac1K \sum_k \log \frac{p(x, z_k)}{q_\phi(z_k)} \;(\text{"elbo"}) \quad\text{or}\quad
      \log \frac1K \sum_k \frac{p(x, z_k)}{q_\phi(z_k)} \;(\text{"iwae"}),\qquad z_k \sim q_\phi.$$

    Args:
      name: `"elbo"` or `"iwae"`.
      make_proposal: `phi -> distribution` (default: the mean-field `diagonal_gaussian`).
      num_samples: $K$.
      gradient: any gradient estimator the estimator takes (`"reparam"`, `"stl"`, `"dreg"`,
        ...). `"stl"` (sticking the landing) has zero variance where $q$ equals the posterior
        and lower variance near any optimum: a good choice for local fits.
      chunk_size: passed to the estimator.

    Returns:
      `objective(key, model, x, phi) -> scalar`, for `model` with `log_joint(x, z)`.
    """
    estimators = {"elbo": elbo, "iwae": iwae_bound}
    if name not in estimators:
        raise ValueError(f"`name` must be 'elbo' or 'iwae', got {name!r}.")
    _checks.check_callable(make_proposal, "make_proposal")
    num_samples = _checks.check_positive_int(num_samples, "num_samples")
    estimator = estimators[name]

    def local_objective(key, model, x, phi):
        _require_log_joint(model)
        return estimator(
            key, x, model.log_joint, make_proposal(phi), num_samples=num_samples, gradient=gradient, chunk_size=chunk_size
        )

    return local_objective


def closed_form_objective() -> LocalObjective:
    r"""The exact ELBO of a diagonal Gaussian, for models that have it in closed form.

    $\mathcal{L}(\phi; x) = $ `model.elbo_diag_gaussian(x, loc, exp(log_scale))`
    (`exact.LinearGaussian` has it): no Monte Carlo noise, so a local fit converges to the exact
    optimum $q^*$ and claims about it can be checked to float64 precision. `key` is ignored.

    Returns:
      `objective(key, model, x, phi) -> scalar` for `phi` a `DiagonalGaussian`.
    """

    def local_objective(key, model, x, phi):
        del key
        if not callable(getattr(model, "elbo_diag_gaussian", None)):
            raise TypeError(
                f"closed_form_objective needs a model with `elbo_diag_gaussian(x, mean, scale)` (e.g. "
                f"exact.LinearGaussian); {type(model).__name__} has none. Use local.objective('elbo') instead."
            )
        _check_diagonal_gaussian(phi)
        return model.elbo_diag_gaussian(x, phi.loc, jnp.exp(phi.log_scale))

    return local_objective


# ------------------------------------------------------------------------------------------------
# The inner loop.
# ------------------------------------------------------------------------------------------------


class LocalResult(NamedTuple):
    """What `optimize_local` returns (for a batch, every field gains a leading batch axis).

    Attributes:
      phi: the fitted parameters, the same structure as the starting `phi`.
      objective: `(num_steps,)`, the objective's value at each step, before that step's update
        (a Monte Carlo estimate for a Monte Carlo objective): the trace shows convergence.
      num_skipped: `int32[]`, inner steps skipped because the objective or a gradient was not finite.
    """

    phi: Any
    objective: jax.Array
    num_skipped: jax.Array


def _global_norm(tree):
    """The Euclidean norm of all leaves, leaf by leaf.

    Not `optax.tree.norm`: it rebuilds the tree with scalar leaves, which a pytree model that
    checks its shapes (`exact.LinearGaussian`) refuses.
    """
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def _check_optimizer(optimizer, name: str) -> None:
    if not (callable(getattr(optimizer, "init", None)) and callable(getattr(optimizer, "update", None))):
        raise TypeError(f"`{name}` must be an optax GradientTransformation (e.g. optax.adam(1e-2)), got {type(optimizer).__name__}.")


def _check_phi_leaves(phi, name: str = "phi") -> None:
    leaves = jax.tree.leaves(phi)
    if not leaves:
        raise ValueError(f"`{name}` has no arrays to optimise (an empty pytree).")
    for path, leaf in jax.tree_util.tree_leaves_with_path(phi):
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise TypeError(
                f"Every leaf of `{name}` must be a floating-point array (optax steps it); "
                f"{name}{jax.tree_util.keystr(path)} has dtype {dtype}."
            )


def _check_objective_output(objective_fn, key, model, x, phi) -> None:
    out = jax.eval_shape(lambda p: objective_fn(key, model, x, p), phi)
    if getattr(out, "shape", None) != () or not jnp.issubdtype(getattr(out, "dtype", jnp.int32), jnp.floating):
        raise ValueError(
            "`objective(key, model, x, phi)` must return one floating-point scalar for ONE data point, got "
            f"{getattr(out, 'shape', type(out).__name__)} {getattr(out, 'dtype', '')}."
        )


def optimize_local(
    key,
    model,
    x,
    phi,
    *,
    objective: LocalObjective,
    optimizer: optax.GradientTransformation,
    num_steps: int,
) -> LocalResult:
    r"""Maximise a local objective over one data point's $\phi$ with the model fixed: $\phi^* \approx \arg\max_\phi \mathcal{L}(\phi; x)$.

    Runs `num_steps` optax steps in a `lax.scan`; step $t$ draws its samples from
    `fold_in(key, t)`. Start from the encoder's output (`Family.init_from(model.proposal(x))`)
    for semi-amortised refinement, or from a fixed start for plain SVI. Jit-able and vmap-able
    (`optimize_local_batch`). Gradients flow to $\phi$ only: the model is held fixed.

    With a Monte Carlo objective the iterates do not settle exactly: they fluctuate around $\phi^*$
    with a spread of the order of the step size times the gradient noise, so use a decaying step
    size (e.g. `optax.adam(optax.cosine_decay_schedule(3e-2, num_steps))`), more samples, or
    `gradient="stl"`; with `closed_form_objective` plain gradient ascent converges to $\phi^*$
    to machine precision.

    Args:
      key: a JAX PRNG key for this data point.
      model: anything the objective takes (a model with `log_joint(x, z)`).
      x: one data point.
      phi: the starting parameters, a pytree of floating-point arrays.
      objective: `objective(key, model, x, phi) -> scalar`, e.g. `local.objective("elbo")`.
      optimizer: an optax transformation (it *minimises*; the loop hands it $-\nabla_\phi \mathcal{L}$).
      num_steps: $M \ge 1$ inner steps.

    Returns:
      A `LocalResult`: the final `phi`, the objective trace `(num_steps,)` and the count of
      skipped non-finite steps.
    """
    _checks.check_key(key)
    num_steps = _checks.check_positive_int(num_steps, "num_steps")
    _checks.check_callable(objective, "objective")
    _check_optimizer(optimizer, "optimizer")
    _check_phi_leaves(phi)
    _check_objective_output(objective, key, model, x, phi)

    def loss(p, step_key):
        value = objective(step_key, model, x, p)
        return -value, value

    def step(carry, t):
        p, opt_state, skipped = carry
        (_, value), grads = jax.value_and_grad(loss, has_aux=True)(p, jax.random.fold_in(key, t))
        finite = jnp.isfinite(value) & jnp.isfinite(_global_norm(grads))
        updates, new_opt_state = optimizer.update(grads, opt_state, p)
        new_p = optax.apply_updates(p, updates)
        keep = lambda new, old: jnp.where(finite, new, old)
        p = jax.tree.map(keep, new_p, p)
        opt_state = jax.tree.map(keep, new_opt_state, opt_state)
        return (p, opt_state, skipped + (~finite).astype(jnp.int32)), value

    init = (phi, optimizer.init(phi), jnp.zeros((), jnp.int32))
    (phi, _, skipped), trace = jax.lax.scan(step, init, jnp.arange(num_steps, dtype=jnp.uint32))
    return LocalResult(phi, trace, skipped)


def _batch_size_of(tree, name: str) -> int:
    sizes = {jnp.shape(leaf)[0] if jnp.ndim(leaf) else None for leaf in jax.tree.leaves(tree)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"Every leaf of `{name}` must have the same leading (batch) axis; got leading sizes "
            f"{sorted(str(s) for s in sizes)}."
        )
    return sizes.pop()


def point_keys(key, indices):
    """`fold_in(key, index)` for every index, shape `(B,)`: the per-point keys of the batched functions.

    `indices` must be integers (a `TypeError` otherwise, at trace time).
    """
    return fold_in_many(key, jnp.asarray(indices), name="indices")


def optimize_local_batch(
    key,
    model,
    data,
    phi,
    *,
    objective: LocalObjective,
    optimizer: optax.GradientTransformation,
    num_steps: int,
    indices=None,
) -> LocalResult:
    r"""`optimize_local` for a batch, under `jax.vmap`: point $i$'s fit uses `fold_in(key, indices[i])`.

    Each point has its own optimizer state (independent problems). Pass the points' global
    indices (e.g. their positions in the data set) so a point's fit does not depend on the batch
    it came in.

    Args:
      key: one PRNG key.
      model, objective, optimizer, num_steps: as `optimize_local`.
      data: `(B, ...)`, the points (any pytree with a leading batch axis).
      phi: the starting parameters with a leading batch axis `B` on every leaf.
      indices: `int[B]`; default `arange(B)`.

    Returns:
      A `LocalResult` whose fields have a leading axis `B`.
    """
    _checks.check_key(key)
    num_points = _batch_size_of(data, "data")
    if _batch_size_of(phi, "phi") != num_points:
        raise ValueError(
            f"`phi` must have one row per data point: leading axis {num_points} (the batch of `data`), got "
            f"{_batch_size_of(phi, 'phi')}."
        )
    indices = jnp.arange(num_points) if indices is None else indices
    if jnp.shape(indices) != (num_points,):
        raise ValueError(f"`indices` must have shape ({num_points},), one per data point, got {jnp.shape(indices)}.")
    fit = lambda k, x, p: optimize_local(k, model, x, p, objective=objective, optimizer=optimizer, num_steps=num_steps)
    return jax.vmap(fit)(point_keys(key, indices), data, phi)


# ------------------------------------------------------------------------------------------------
# SVI: training a model without an encoder.
# ------------------------------------------------------------------------------------------------


class SVIState(NamedTuple):
    """What SVI training carries from step to step (a pytree; checkpoint it whole).

    Attributes:
      step: `int32[]`, steps taken (skipped ones included).
      params: the model's parameters: its `nnx.Param` state for a Flax NNX module, else the model
        itself (a pytree such as an `exact` model).
      opt_state: the optax state of the model's optimizer.
      local: the table of every data point's $\\phi_i$ (leaves `(N, ...)`), warm-starting each
        point from its last visit; `None` to start every batch from `local_init`.
      local_init: one point's starting $\\phi$ (leaves without the `N` axis).
      num_skipped: `int32[]`, model steps skipped because the objective or a gradient was not finite.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    local: Any
    local_init: Any
    num_skipped: jax.Array


class SVIInfo(NamedTuple):
    """What one SVI step reports (batch means, scalars).

    Attributes:
      objective: the objective at the fitted $\\phi_i^*$, before the model update (what the model step ascends).
      initial_objective: the objective at the inner loop's first step (where $\\phi_i$ started).
      inner_skipped: inner steps skipped (non-finite), summed over the batch.
      grad_norm: the global norm of the model gradient.
      finite: whether the model update was applied.
    """

    objective: jax.Array
    initial_objective: jax.Array
    inner_skipped: jax.Array
    grad_norm: jax.Array
    finite: jax.Array


def _split(model):
    if isinstance(model, nnx.Module):
        from elbojax.train import _check_params_only

        _check_params_only(model)
        return nnx.split(model, nnx.Param)
    return None, model


def merge(graphdef, params):
    """The model from `svi_init`'s `graphdef` and an `SVIState.params`: `nnx.merge` for NNX modules, else `params` itself."""
    return params if graphdef is None else nnx.merge(graphdef, params)


def svi_init(model, optimizer: optax.GradientTransformation, phi_init, *, num_points: int | None = None):
    r"""Set up SVI training of `model` (no encoder needed): `(graphdef, SVIState)`.

    Args:
      model: a Flax NNX module (its `nnx.Param`s are trained) or a pytree of arrays (all trained),
        with `log_joint(x, z)` (and whatever the objective asks of it).
      optimizer: the optax optimizer of the model parameters.
      phi_init: one data point's starting $\phi$ (e.g. `DiagonalGaussian(zeros(d), zeros(d))`:
        the standard normal).
      num_points: $N$, the size of the training set, to keep a table of every point's $\phi_i$
        and warm-start each point from its previous fit; `None` starts every batch from `phi_init`.

    Returns:
      `(graphdef, state)`; `graphdef` is `None` for a pytree model.
    """
    _check_optimizer(optimizer, "optimizer")
    _check_phi_leaves(phi_init, "phi_init")
    graphdef, params = _split(model)
    local = None
    if num_points is not None:
        num_points = _checks.check_positive_int(num_points, "num_points")
        local = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_points,) + jnp.shape(a)), phi_init)
    zero = jnp.zeros((), jnp.int32)
    return graphdef, SVIState(zero, params, optimizer.init(params), local, phi_init, zero)


def _check_table(local, local_init) -> None:
    if jax.tree.structure(local) != jax.tree.structure(local_init):
        raise ValueError(
            "`state.local` must have the structure of `state.local_init` (one phi per data point); got "
            f"{jax.tree.structure(local)} and {jax.tree.structure(local_init)}."
        )
    for table, one in zip(jax.tree.leaves(local), jax.tree.leaves(local_init)):
        if jnp.ndim(table) != jnp.ndim(one) + 1 or jnp.shape(table)[1:] != jnp.shape(one):
            raise ValueError(
                f"Every leaf of `state.local` must have shape (N, *phi_shape); got {jnp.shape(table)} for a phi "
                f"leaf of shape {jnp.shape(one)}."
            )


def make_svi_step(
    graphdef,
    optimizer: optax.GradientTransformation,
    *,
    objective: LocalObjective,
    inner_optimizer: optax.GradientTransformation,
    num_inner_steps: int,
    seed: int,
):
    r"""Build the pure SVI step `(state, batch, indices) -> (state, SVIInfo)` (not jitted: jit or scan it).

    For a batch $\{x_i\}$ with global indices $\{n_i\}$:

    1. $\phi_i \leftarrow$ `state.local[n_i]` (warm start) or `state.local_init`;
    2. $\phi_i^* = $ `optimize_local(...)` with $\theta$ fixed, `num_inner_steps` steps;
    3. $\theta \leftarrow \theta + \text{optax step along } \nabla_\theta \frac1B \sum_i \mathcal{L}(\theta, \mathrm{sg}(\phi_i^*); x_i)$
       (not differentiated through the inner loop), skipped if not finite;
    4. `state.local[n_i]` $\leftarrow \phi_i^*$ when warm-starting.

    With a table (`num_points` given), every $n_i$ must lie in $[0, N)$: an index outside it
    cannot raise inside `jit`, so it starts from NaN and the step is skipped (`finite` False).

    Keys: the step key is `fold_in(key(seed), step)`, point $i$'s `fold_in(step_key, n_i)`; its
    inner step $t$ uses `fold_in(point_key, t)` and the model step `fold_in(point_key, 2**31 - 1)`.

    Args:
      graphdef: from `svi_init`.
      optimizer: the model's optax optimizer (the one `svi_init` was given).
      objective: `objective(key, model, x, phi) -> scalar`, for both loops.
      inner_optimizer: the optax optimizer of each $\phi_i$ (a fresh state at every visit).
      num_inner_steps: inner steps per visit ($\ge 1$); with warm starts a few dozen per visit
        add up over epochs.
      seed: the run's seed.

    References:
      Hoffman, Blei, Wang & Paisley 2013, https://arxiv.org/abs/1206.7051
    """
    _check_optimizer(optimizer, "optimizer")
    _check_optimizer(inner_optimizer, "inner_optimizer")
    _checks.check_callable(objective, "objective")
    num_inner_steps = _checks.check_positive_int(num_inner_steps, "num_inner_steps")
    base_key = jax.random.key(_checks.check_seed(seed))

    def step(state: SVIState, batch, indices):
        num_points = _batch_size_of(batch, "batch")
        if jnp.ndim(indices) != 1 or jnp.shape(indices)[0] != num_points:
            raise ValueError(f"`indices` must have shape ({num_points},), one per example of `batch`, got {jnp.shape(indices)}.")
        if not jnp.issubdtype(jnp.result_type(indices), jnp.integer):
            raise TypeError(f"`indices` must be integers (the examples' positions in the data set), got {jnp.result_type(indices)}.")
        _check_phi_leaves(state.local_init, "state.local_init")
        if state.local is not None:
            _check_table(state.local, state.local_init)
            # An index outside [0, N) (a negative one too) reads a NaN warm start: the step is then
            # skipped and reported (`finite` False), not fitted from another point's row (JAX's
            # indexing would clamp or wrap it), and its row is not written.
            num_rows = jnp.shape(jax.tree.leaves(state.local)[0])[0]
            rows = jnp.where((indices >= 0) & (indices < num_rows), indices, num_rows)
            start = jax.tree.map(lambda table: table.at[rows].get(mode="fill", fill_value=jnp.nan), state.local)
        else:
            start = jax.tree.map(lambda a: jnp.broadcast_to(a, (num_points,) + jnp.shape(a)), state.local_init)

        step_key = jax.random.fold_in(base_key, state.step)
        keys = point_keys(step_key, indices)
        model = merge(graphdef, state.params)
        fit = lambda k, x, p: optimize_local(
            k, model, x, p, objective=objective, optimizer=inner_optimizer, num_steps=num_inner_steps
        )
        result = jax.vmap(fit)(keys, batch, start)
        phi_star = jax.lax.stop_gradient(result.phi)
        outer_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, _OUTER_INDEX)

        def loss(params):
            m = merge(graphdef, params)
            values = jax.vmap(lambda k, x, p: objective(k, m, x, p))(outer_keys, batch, phi_star)
            return -jnp.mean(values)

        value, grads = jax.value_and_grad(loss)(state.params)
        grad_norm = _global_norm(grads)
        finite = jnp.isfinite(value) & jnp.isfinite(grad_norm)

        def update(_):
            updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
            return optax.apply_updates(state.params, updates), opt_state

        params, opt_state = jax.lax.cond(finite, update, lambda _: (state.params, state.opt_state), None)
        local = state.local
        if local is not None:
            local = jax.tree.map(lambda table, phi: table.at[rows].set(phi.astype(table.dtype), mode="drop"), local, result.phi)
        new_state = SVIState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            local=local,
            local_init=state.local_init,
            num_skipped=state.num_skipped + (~finite).astype(jnp.int32),
        )
        info = SVIInfo(-value, jnp.mean(result.objective[:, 0]), jnp.sum(result.num_skipped), grad_norm, finite)
        return new_state, info

    return step
