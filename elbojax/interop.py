r"""NumPyro models and guides, and TFP joint distributions, as elbojax problems.

Every estimator in elbojax takes a `log_joint(x, z)` and a `proposal`. The two adapters here
produce both from the way NumPyro and TensorFlow Probability users already write their models,
so that every estimator, gradient estimator (`gradient="reparam" | "stl" | "dreg" | "score" |
"vimco"`) and diagnostic applies unchanged.

**NumPyro.** `from_numpyro(model, guide, *args, **kwargs)` binds the arguments both are called
with (as `SVI.init` and `svi.update` do), the observed data among them (`obs=` sites):

    adapter = from_numpyro(model, guide, data)
    params = adapter.init_params(jax.random.key(0))          # {name: value}, every param site
    bound = ej.iwae_bound(key, None, adapter.log_joint, adapter.proposal(params), num_samples=8)

* The latent `z` is the dict `{site name: value}` of the guide's latent sample sites; the model
  must sample exactly those (plus its `obs=` sites), with the same shapes.
* `adapter.log_joint(x, z)` is $\log p(x, z)$ as `numpyro.infer.util.log_density` computes it
  (every sample site's log-density, times its `scale`, summed). `x` is `None` for the data
  bound at construction, or a dict `{observed site: value}` of the same shapes that replaces
  those values (so one adapter can be vmapped over data sets when the guide does not read the
  data).
* `adapter.proposal(params)` is $q(z)$, the guide run with its `param` sites set from `params`
  (a dict, constrained values: what `numpyro.param` returns and `SVI.get_params` gives).
  Gradients flow to `params`. To optimise in unconstrained space, as SVI does, differentiate
  with respect to `u` in `adapter.proposal(adapter.constrain(u))`, `u = adapter.unconstrain(params)`.
* Sampling is pathwise where every latent guide site has `has_rsample`; otherwise the proposal
  reports `reparameterization_type = "NOT_REPARAMETERIZED"`, elbojax refuses `"stl"`/`"dreg"`
  and a pathwise gradient with respect to the guide, and the value at such sites carries no
  gradient (as in NumPyro's own ELBOs).
* A model with `param` sites (its own, a decoder say, or ones it shares with the guide) is
  evaluated with `adapter.log_joint_with(params)`, which returns a `log_joint(x, z)` closed over
  them.
* An amortised guide (one that reads the data) sees the data bound at construction: build the
  adapter inside the function you vmap over data points (construction only traces). A
  replacing `x` of another shape is refused: NumPyro would broadcast it into a wrong number.
* The autoguides that sample the model's sites by name (`AutoNormal`, `AutoDelta`) work:
  `from_numpyro` sets one up with a concrete call, as `SVI.init` does, before its abstract
  trace. Those that sample one flattened auxiliary latent (`AutoDiagonalNormal`,
  `AutoMultivariateNormal`, ...) are refused with a clear error.

**TFP.** `from_tfp_joint(joint, observed={name: value})` takes a `JointDistributionNamed`,
`JointDistributionSequential` or `JointDistributionCoroutine` (auto-batched or not).
`z` holds the unobserved nodes: a dict by name, the pinned distribution's own structure (a
`StructTuple` or list, in the joint's order; a `JointDistributionNamed` takes a dict only, as
TFP does, since its graph order need not be the dict's), or a bare array when one node is
latent; so a
surrogate posterior built for `joint.experimental_pin(**observed)` can be the proposal as it is
(through `elbojax.TFPProposal`). `adapter.proposal(surrogate)` checks the surrogate's samples
against the latent nodes and returns it adapted.

Limitations: the NumPyro adapter evaluates the whole model for one `z`, so subsampling plates
are out of scope (their `scale` is applied as `log_density` does, with a fixed subsample), and so
is enumeration of discrete sites (`infer={"enumerate": ...}`): sample them in the guide and use
`gradient="score"` or `"vimco"`. NumPyro's `RenyiELBO` splits its bound over a plate that
encloses every site (a sum of per-point bounds); `log_joint` is the whole model's, so for such a
model the elbojax way to the same per-point bounds is a `jax.vmap` over the data points.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from elbojax import _checks
from elbojax.proposals import as_proposal

__all__ = ["from_numpyro", "from_tfp_joint", "NumPyroAdapter", "NumPyroProposal", "TFPJointAdapter"]

FULLY_REPARAMETERIZED = "FULLY_REPARAMETERIZED"
NOT_REPARAMETERIZED = "NOT_REPARAMETERIZED"


# ----------------------------------------------------------------------------------------------
# NumPyro
# ----------------------------------------------------------------------------------------------


def _numpyro():
    """NumPyro's handlers and `log_density`, imported on first use (NumPyro is optional)."""
    try:
        from numpyro import handlers
        from numpyro.infer.util import log_density
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "`from_numpyro` needs NumPyro (`pip install numpyro`, or elbojax's `peers` extra)."
        ) from error
    return handlers, log_density


@functools.cache
def _block_non_reparameterized():
    """A NumPyro messenger that stops the gradient at latent sites without `has_rsample`.

    The same rule as NumPyro's own ELBOs: such a sample carries no pathwise gradient, so its
    value (and every site downstream of it) is treated as a constant.
    """
    from numpyro.primitives import Messenger

    class BlockNonReparameterized(Messenger):
        def postprocess_message(self, msg):
            if msg["type"] == "sample" and not msg["is_observed"] and not msg["fn"].has_rsample:
                msg["value"] = jax.lax.stop_gradient(msg["value"])
                msg["intermediates"] = []  # computed from the value before it was stopped

    return BlockNonReparameterized


class _Shapes(NamedTuple):
    """The static structure of a value: its treedef and the shape of every leaf."""

    treedef: Any
    shapes: tuple

    @classmethod
    def of(cls, value):
        leaves, treedef = jax.tree.flatten(value)
        return cls(treedef, tuple(tuple(jnp.shape(leaf)) for leaf in leaves))

    def describe(self) -> str:
        if self.treedef == jax.tree.structure(0):
            return f"shape {self.shapes[0]}"
        return f"structure {self.treedef} with leaf shapes {list(self.shapes)}"


class _Site(NamedTuple):
    kind: str  # "sample" or "param"
    shapes: _Shapes  # of the value (a sample) or of the parameter's (constrained) value
    observed: bool = False
    has_rsample: bool = True
    model_shape: tuple = ()  # a sample site's distribution shape, batch + event
    constraint: Any = None  # a param site's constraint
    auxiliary: bool = False  # a guide's auxiliary sample site (`infer={"is_auxiliary": True}`)


def _sites(trace) -> dict[str, _Site]:
    """Static facts about the sample and param sites of a NumPyro trace."""
    sites = {}
    for name, site in trace.items():
        if site["type"] == "sample":
            sites[name] = _Site(
                "sample",
                _Shapes.of(site["value"]),
                observed=bool(site["is_observed"]),
                has_rsample=bool(site["fn"].has_rsample),
                model_shape=tuple(site["fn"].shape(tuple(site["kwargs"].get("sample_shape", ())))),
                auxiliary=bool((site.get("infer") or {}).get("is_auxiliary", False)),
            )
        elif site["type"] == "param":
            sites[name] = _Site("param", _Shapes.of(site["value"]), constraint=site["kwargs"].get("constraint"))
    return sites


def _names(names) -> str:
    return ", ".join(repr(name) for name in names)


def _site_log_prob(site):
    """A sample site's summed log-density, as NumPyro's ELBOs compute it (with `scale`)."""
    if site["intermediates"]:
        log_prob = site["fn"].log_prob(site["value"], site["intermediates"])
    else:
        log_prob = site["fn"].log_prob(site["value"])
    if site["scale"] is not None:
        log_prob = site["scale"] * log_prob
    return jnp.sum(log_prob)


def _check_mapping(value, name: str, what: str) -> dict:
    if not isinstance(value, Mapping):
        raise TypeError(f"`{name}` must be a dict {what}, got {type(value).__name__}.")
    return dict(value)


def _check_params(params, required: dict[str, _Site], allowed: set[str], owner: str) -> dict:
    """`params` restricted to the `required` sites, with names and structures checked."""
    params = _check_mapping(params, "params", "{param site name: value}")
    missing = [site for site in required if site not in params]
    unknown = [site for site in params if site not in allowed]
    if missing or unknown:
        problems = ([f"missing: {_names(missing)}"] if missing else []) + (
            [f"unknown (not param sites of the model or guide): {_names(unknown)}"] if unknown else []
        )
        others = [site for site in allowed if site not in required]
        also = f", and may hold the other param sites ({_names(others)})" if others else ""
        raise ValueError(
            f"`params` must hold a value for each of the {owner}'s param sites ({_names(required)}){also}; "
            f"{'; '.join(problems)}."
        )
    for site_name, site in required.items():
        got = _Shapes.of(params[site_name])
        if got != site.shapes:
            raise ValueError(
                f"`params[{site_name!r}]` must have {site.shapes.describe()} (its value in "
                f"the {owner}), got {got.describe()}."
            )
    return {site: params[site] for site in required}


class NumPyroProposal:
    r"""A NumPyro guide with its parameters set, as an elbojax proposal $q(z)$.

    Built by `NumPyroAdapter.proposal(params)`. `z` is the dict of the guide's latent sites.

    `sample_and_log_prob(seed=key, sample_shape=())` runs the guide once under `seed`
    (`sample_shape` draws are independent runs); `log_prob(z)` runs it with its latent sites
    set to `z` (leading batch dimensions are vmapped over). The log-density is the sum over the
    latent sites of `fn.log_prob(value)` times the site's `scale`, as in NumPyro's ELBOs.
    """

    def __init__(self, guide, args, kwargs, params, latent: dict[str, _Site]):
        self._guide = guide
        self._args = args
        self._kwargs = kwargs
        self.params = params
        self._latent = latent

    @property
    def reparameterization_type(self) -> str:
        """`"FULLY_REPARAMETERIZED"` when every latent guide site has `has_rsample`."""
        if all(site.has_rsample for site in self._latent.values()):
            return FULLY_REPARAMETERIZED
        return NOT_REPARAMETERIZED

    def _run(self, key, values=None, block=True):
        handlers, _ = _numpyro()
        guide = handlers.substitute(self._guide, data={**self.params, **(values or {})})
        guide = handlers.trace(handlers.seed(guide, rng_seed=key))
        if block:
            with _block_non_reparameterized()():
                return guide.get_trace(*self._args, **self._kwargs)
        return guide.get_trace(*self._args, **self._kwargs)

    def _sample_one(self, key):
        trace = self._run(key)
        z = {name: trace[name]["value"] for name in self._latent}
        return z, sum((_site_log_prob(trace[name]) for name in self._latent), start=0.0)

    def sample_and_log_prob(self, *, seed, sample_shape=()):
        """`(z, log q(z))`: `z` a dict of the latent sites, each with leading `sample_shape`."""
        if isinstance(seed, int):  # as distrax accepts
            seed = jax.random.PRNGKey(seed)
        shape = _checks.sample_shape(sample_shape)
        if not shape:
            return self._sample_one(seed)
        keys = jax.random.split(seed, math.prod(shape))
        z, log_q = jax.vmap(self._sample_one)(keys)
        return jax.tree.map(lambda a: a.reshape(shape + a.shape[1:]), (z, log_q))

    def sample(self, *, seed, sample_shape=()):
        return self.sample_and_log_prob(seed=seed, sample_shape=sample_shape)[0]

    def log_prob(self, value):
        """$\\log q(z)$ for `z` a dict of the latent sites (with optional leading batch dimensions)."""
        z = _check_latents(value, self._latent, "z", allow_batch=True)
        batch_shape = _batch_shape(z, self._latent)
        if batch_shape:
            flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[len(batch_shape):]), z)
            return jax.vmap(self._log_prob_one)(flat).reshape(batch_shape)
        return self._log_prob_one(z)

    def _log_prob_one(self, z):
        trace = self._run(0, values=z, block=False)
        return sum((_site_log_prob(trace[name]) for name in self._latent), start=0.0)

    def __repr__(self):
        return f"NumPyroProposal(latent sites: {_names(self._latent)})"


def _check_latents(z, latent: dict[str, _Site], name: str, allow_batch: bool = False) -> dict:
    """`z` as a dict with exactly the latent sites; each value's trailing shape is the site's."""
    z = _check_mapping(z, name, "{latent site name: value}")
    if set(z) != set(latent):
        missing = [site for site in latent if site not in z]
        extra = [site for site in z if site not in latent]
        raise ValueError(
            f"`{name}` must hold exactly the guide's latent sites {_names(latent)}"
            + (f"; missing {_names(missing)}" if missing else "")
            + (f"; not latent sites: {_names(extra)}" if extra else "")
            + "."
        )
    for site_name, site in latent.items():
        got = _Shapes.of(z[site_name])
        event = site.shapes.shapes[0]
        shape = got.shapes[0] if len(got.shapes) == 1 else None
        ok = shape is not None and (
            shape == event or (allow_batch and len(shape) > len(event) and shape[len(shape) - len(event):] == event)
        )
        if not ok:
            batch = " (with optional leading batch dimensions)" if allow_batch else " (one sample)"
            raise ValueError(f"`{name}[{site_name!r}]` must have shape {event}{batch}, got {got.describe()}.")
    return z


def _batch_shape(z: dict, latent: dict[str, _Site]) -> tuple:
    batch_shapes = {
        site_name: jnp.shape(z[site_name])[: jnp.ndim(z[site_name]) - len(site.shapes.shapes[0])]
        for site_name, site in latent.items()
    }
    distinct = set(batch_shapes.values())
    if len(distinct) > 1:
        raise ValueError(f"The latent sites of `z` must share one batch shape, got {batch_shapes}.")
    return distinct.pop()


class NumPyroAdapter:
    """A NumPyro model and guide, with their arguments bound, in elbojax's terms.

    Built by `from_numpyro`; see the module docs.

    Attributes:
      latent_sites: the guide's latent sample sites, the keys of `z`.
      observed_sites: the model's observed sample sites, the keys `x` may replace.
      param_sites: every `param` site, the guide's first, then the model's own.
    """

    def __init__(self, model, guide, args, kwargs, guide_sites, model_sites):
        self._model = model
        self._guide = guide
        self._args = args
        self._kwargs = kwargs
        self._latent = {n: s for n, s in guide_sites.items() if s.kind == "sample"}
        self._guide_params = {n: s for n, s in guide_sites.items() if s.kind == "param"}
        # A param site of the model's, shared with the guide or not: `log_joint_with` sets it (one
        # dict for both, as in SVI), so a shared one is not left at its initial value in the model.
        self._model_params = {n: s for n, s in model_sites.items() if s.kind == "param"}
        self._params = {**self._guide_params, **self._model_params}
        self.latent_sites = tuple(self._latent)
        self.observed_sites = tuple(n for n, s in model_sites.items() if s.kind == "sample" and s.observed)
        self._observed_shapes = {n: model_sites[n].shapes for n in self.observed_sites}
        self.param_sites = tuple(self._params)

    def init_params(self, key) -> dict[str, Any]:
        """Initial values of every param site, guide's and model's (as `SVI.init` draws them).

        Args:
          key: a JAX PRNG key, for initial values given as functions of a key.

        Returns:
          `{param site name: value}`, constrained values.
        """
        handlers, _ = _numpyro()
        guide_key, model_key = jax.random.split(key)
        guide_trace = handlers.trace(handlers.seed(self._guide, rng_seed=guide_key)).get_trace(
            *self._args, **self._kwargs
        )
        params = {n: guide_trace[n]["value"] for n in self._guide_params}
        latent = {n: guide_trace[n]["value"] for n in self._latent}
        model = handlers.seed(handlers.substitute(self._model, data={**params, **latent}), rng_seed=model_key)
        model_trace = handlers.trace(model).get_trace(*self._args, **self._kwargs)
        params.update({n: model_trace[n]["value"] for n in self._model_params})
        strong = lambda leaf: jnp.asarray(leaf, dtype=jnp.asarray(leaf).dtype)  # not weakly typed
        return {n: jax.tree.map(strong, v) for n, v in params.items()}

    def proposal(self, params) -> NumPyroProposal:
        """$q(z)$: the guide with its param sites set from `params` (a dict; gradients flow to it).

        `params` may also hold the model's own param sites (one dict for both, as in SVI).
        """
        guide_params = _check_params(params, self._guide_params, set(self._params), "guide")
        return NumPyroProposal(self._guide, self._args, self._kwargs, guide_params, self._latent)

    def log_joint(self, x, z):
        r"""$\log p(x, z)$, as `numpyro.infer.util.log_density` computes it.

        Args:
          x: `None` for the observed values bound at construction, or a dict
            `{observed site: value}` replacing some of them.
          z: dict `{latent site: value}`, one sample.

        Returns:
          A scalar.
        """
        if self._model_params:
            raise ValueError(
                f"The model has param sites (its own, or shared with the guide: {_names(self._model_params)}): use "
                "`adapter.log_joint_with(params)` as the `log_joint`."
            )
        return self._log_joint({}, x, z)

    def log_joint_with(self, params) -> Callable[[Any, Any], jax.Array]:
        """`log_joint(x, z)` with the model's own param sites set from `params` (a dict)."""
        model_params = _check_params(params, self._model_params, set(self._params), "model")
        return functools.partial(self._log_joint, model_params)

    def _log_joint(self, model_params, x, z):
        handlers, log_density = _numpyro()
        z = _check_latents(z, self._latent, "z")
        model = self._model
        if x is not None:
            x = _check_mapping(
                x, "x", "{observed site: value}, or None for the data bound by `from_numpyro`"
            )
            unknown = [name for name in x if name not in self.observed_sites]
            if unknown:
                raise ValueError(
                    f"`x` may only replace the model's observed sites {_names(self.observed_sites)}; "
                    f"got {_names(unknown)}."
                )
            for name, value in x.items():  # NumPyro would broadcast a wrong shape into a wrong number
                bound, given = self._observed_shapes[name], _Shapes.of(value)
                if given != bound:
                    raise ValueError(
                        f"`x[{name!r}]` must have the {bound.describe()} of the data bound by `from_numpyro`, "
                        f"got {given.describe()}."
                    )
            model = handlers.condition(model, data=x)
        model = handlers.seed(model, rng_seed=0)  # every latent site is set; plates may ask for a key
        value, _ = log_density(model, self._args, self._kwargs, {**model_params, **z})
        return value

    def constrain(self, unconstrained) -> dict[str, Any]:
        """Map unconstrained parameter values to each param site's constraint (as SVI does)."""
        return self._transform(unconstrained, inverse=False)

    def unconstrain(self, params) -> dict[str, Any]:
        """The inverse of `constrain`."""
        return self._transform(params, inverse=True)

    def _transform(self, params, inverse):
        from numpyro.distributions import constraints
        from numpyro.distributions.transforms import biject_to

        params = _check_mapping(params, "params", "{param site name: value}")
        unknown = [name for name in params if name not in self._params]
        if unknown:
            raise ValueError(f"Not param sites of the model or guide: {_names(unknown)}; expected {_names(self._params)}.")
        out = {}
        for name, value in params.items():
            transform = biject_to(self._params[name].constraint or constraints.real)
            out[name] = jax.tree.map(transform.inv if inverse else transform, value)
        return out

    def __repr__(self):
        return (
            f"NumPyroAdapter(latent_sites={self.latent_sites}, observed_sites={self.observed_sites}, "
            f"param_sites={self.param_sites})"
        )


def from_numpyro(model: Callable, guide: Callable, /, *args, **kwargs) -> NumPyroAdapter:
    r"""Adapt a NumPyro model and guide, called with `*args, **kwargs`, to elbojax.

    Args:
      model: a NumPyro model; its observed sites take their `obs=` values from the arguments.
      guide: a NumPyro guide over the model's latent sites.
      *args, **kwargs: what both are called with (as for `SVI`), the data among them.

    Returns:
      A `NumPyroAdapter` with `log_joint(x, z)`, `proposal(params)`, `init_params(key)`,
      `log_joint_with(params)`, `constrain`/`unconstrain`; see the module docs.

    Both are traced once, abstractly, to find the sites; a `ValueError` names a guide site
    missing from the model (or observed there, or of another shape), a latent model site that
    the guide does not sample, or an observed site in the guide.

    Example::

        adapter = from_numpyro(model, guide, data)
        params = adapter.init_params(jax.random.key(0))
        loss = lambda p, key: -ej.iwae_bound(
            key, None, adapter.log_joint, adapter.proposal(p), num_samples=8, gradient="dreg")
        grads = jax.grad(loss)(params, jax.random.key(1))
    """
    handlers, _ = _numpyro()
    for name, fn in (("model", model), ("guide", guide)):
        if not callable(fn):
            raise TypeError(f"`{name}` must be a NumPyro model (a callable), got {type(fn).__name__}.")
    found = {}
    if getattr(guide, "prototype_trace", False) is None:
        # A NumPyro autoguide sets itself up on its first call and keeps what it traced: under the
        # abstract trace below it would keep tracers. Set it up here, concretely, as `SVI.init` does.
        handlers.seed(guide, rng_seed=0)(*args, **kwargs)

    def trace_both(key):
        guide_key, model_key = jax.random.split(key)
        guide_trace = handlers.trace(handlers.seed(guide, rng_seed=guide_key)).get_trace(*args, **kwargs)
        found["guide"] = _sites(guide_trace)
        latent = {n: s["value"] for n, s in guide_trace.items() if s["type"] == "sample" and not s["is_observed"]}
        model_with_z = handlers.seed(handlers.substitute(model, data=latent), rng_seed=model_key)
        found["model"] = _sites(handlers.trace(model_with_z).get_trace(*args, **kwargs))

    jax.eval_shape(lambda: trace_both(jax.random.key(0)))  # traced: nothing runs or compiles
    guide_sites, model_sites = found["guide"], found["model"]
    _check_model_and_guide(guide_sites, model_sites)
    return NumPyroAdapter(model, guide, args, kwargs, guide_sites, model_sites)


def _check_model_and_guide(guide_sites: dict[str, _Site], model_sites: dict[str, _Site]) -> None:
    latent = {n: s for n, s in guide_sites.items() if s.kind == "sample"}
    observed_in_guide = [n for n, s in latent.items() if s.observed]
    if observed_in_guide:
        raise ValueError(
            f"The guide observes {_names(observed_in_guide)}: a guide samples latent sites only "
            "(observations belong in the model)."
        )
    auxiliary = [n for n, s in latent.items() if s.auxiliary]
    if auxiliary:
        raise ValueError(
            f"The guide samples the auxiliary site(s) {_names(auxiliary)} (as AutoDiagonalNormal, "
            "AutoMultivariateNormal and other flattening autoguides do) and maps them to the model's "
            "sites deterministically, which has no density over the model's sites here. Use AutoNormal "
            "or AutoDelta, or a guide that samples the model's sites by name."
        )
    if not latent:
        raise ValueError("The guide samples no latent site: there is nothing to propose.")
    model_samples = {n: s for n, s in model_sites.items() if s.kind == "sample"}
    for name, site in latent.items():
        if name not in model_samples:
            raise ValueError(
                f"Guide site {name!r} is not a sample site of the model (the model samples "
                f"{_names(model_samples)}). Name the guide's sites after the model's."
            )
        if model_samples[name].observed:
            raise ValueError(f"Guide site {name!r} is observed in the model: the guide must not sample it.")
        shape = site.shapes.shapes[0]
        if model_samples[name].model_shape != shape:
            raise ValueError(
                f"Site {name!r} has shape {model_samples[name].model_shape} in the model but "
                f"{shape} in the guide; they must agree (use `.to_event` / plates alike in both)."
            )
    uncovered = [n for n, s in model_samples.items() if not s.observed and n not in latent]
    if uncovered:
        raise ValueError(
            f"Model site(s) {_names(uncovered)} are neither observed nor sampled by the guide. "
            "The guide must sample every latent site of the model (or bind its data with `obs=`)."
        )


# ----------------------------------------------------------------------------------------------
# TensorFlow Probability (on JAX)
# ----------------------------------------------------------------------------------------------


def _node_names(joint) -> tuple[str, ...]:
    """The names of a TFP joint distribution's nodes, in its own order."""
    if hasattr(joint, "resolve_graph"):  # Named and Sequential
        return tuple(name for name, _ in joint.resolve_graph())
    event_shape = getattr(joint, "event_shape", None)
    if isinstance(event_shape, Mapping):
        return tuple(event_shape)
    if hasattr(event_shape, "_fields"):  # Coroutine: a StructTuple
        return tuple(event_shape._fields)
    raise TypeError(
        "`joint` must be a TFP-on-JAX joint distribution (JointDistributionNamed, "
        f"JointDistributionSequential or JointDistributionCoroutine), got {type(joint).__name__}."
    )


def _event_shapes(joint, names) -> dict[str, tuple]:
    event_shape = joint.event_shape
    if isinstance(event_shape, Mapping):
        shapes = dict(event_shape)
    elif hasattr(event_shape, "_asdict"):
        shapes = event_shape._asdict()
    else:
        shapes = dict(zip(names, event_shape))
    return {name: tuple(shape) for name, shape in shapes.items()}


def _check_node_shape(value, shape: tuple, name: str, what: str) -> None:
    """One node's value must have `shape` (TFP would broadcast a wrong one into a wrong number)."""
    if not all(isinstance(d, int) for d in shape):
        return  # a nested node (a joint inside the joint): TFP checks its parts
    got = jnp.shape(value)
    if got != shape:
        raise ValueError(f"`{name}` must have shape {shape} ({what}), got {got}.")


class TFPJointAdapter:
    """A TFP joint distribution with some nodes observed, in elbojax's terms.

    Built by `from_tfp_joint`; see the module docs.

    Attributes:
      joint: the joint distribution.
      latent_names: the unobserved nodes, the keys of `z`, in the joint's order.
      observed_names: the observed nodes, the keys `x` may replace.
    """

    def __init__(self, joint, observed: dict, names: tuple[str, ...]):
        self.joint = joint
        self._observed = observed
        self.observed_names = tuple(name for name in names if name in observed)
        self.latent_names = tuple(name for name in names if name not in observed)
        shapes = _event_shapes(joint, names)
        self._latent_shapes = {n: s for n, s in shapes.items() if n in self.latent_names}
        for name in self.observed_names:  # TFP would broadcast a wrong shape into a wrong number
            event = shapes[name]
            if not all(isinstance(d, int) for d in event):
                continue  # a joint inside the joint: TFP checks its parts
            got = jnp.shape(observed[name])
            if len(got) < len(event) or got[len(got) - len(event):] != event:
                raise ValueError(
                    f"`observed[{name!r}]` must end in the node's event shape {event}, got shape {got} "
                    "(TFP would broadcast it into copies of the observation)."
                )
        self._unordered = isinstance(getattr(joint, "model", None), Mapping)  # JointDistributionNamed

    def _as_named(self, z, name="z") -> dict:
        """`z` as `{node name: value}`, from a dict, a (Struct)namedtuple, a list or a bare array."""
        if isinstance(z, Mapping):
            values = dict(z)
        elif hasattr(z, "_asdict"):
            values = z._asdict()
        elif isinstance(z, (list, tuple)):
            if self._unordered:  # TFP refuses it too: a Named joint's node order is not the dict's
                raise TypeError(
                    f"`{name}` must be a dict {{latent node: value}} for a JointDistributionNamed (its nodes "
                    f"{_names(self.latent_names)} have no order a list could follow); got a {type(z).__name__}."
                )
            if len(z) != len(self.latent_names):
                raise ValueError(
                    f"`{name}` given as a sequence must have one value per latent node "
                    f"{_names(self.latent_names)}, in order; got {len(z)} values."
                )
            values = dict(zip(self.latent_names, z))
        elif len(self.latent_names) == 1:  # a bare array
            values = {self.latent_names[0]: z}
        else:
            raise TypeError(
                f"`{name}` must be a dict {{latent node: value}} (or the pinned joint's structure) "
                f"for the latent nodes {_names(self.latent_names)}; got {type(z).__name__}."
            )
        if set(values) != set(self.latent_names):
            missing = [n for n in self.latent_names if n not in values]
            extra = [n for n in values if n not in self.latent_names]
            raise ValueError(
                f"`{name}` must hold exactly the latent nodes {_names(self.latent_names)}"
                + (f"; missing {_names(missing)}" if missing else "")
                + (f"; not latent nodes: {_names(extra)}" if extra else "")
                + "."
            )
        return values

    def log_joint(self, x, z):
        r"""$\log p(x, z)$ = `joint.log_prob` at the observed values and `z`.

        Args:
          x: `None` for the observed values given to `from_tfp_joint`, or a dict
            `{observed node: value}` replacing some of them.
          z: the latent nodes, one sample (a dict by name, the pinned joint's structure, or an
            array when one node is latent).

        Returns:
          A scalar.
        """
        observed = self._observed
        if x is not None:
            x = _check_mapping(x, "x", "{observed node: value}, or None for the bound observations")
            unknown = [name for name in x if name not in self.observed_names]
            if unknown:
                raise ValueError(
                    f"`x` may only replace the observed nodes {_names(self.observed_names)}; got {_names(unknown)}."
                )
            for name, value in x.items():
                given = jnp.shape(self._observed[name])
                _check_node_shape(value, given, f"x[{name!r}]", "the shape of the observed value given to `from_tfp_joint`")
            observed = {**observed, **x}
        latents = self._as_named(z)
        for name, value in latents.items():
            _check_node_shape(value, self._latent_shapes[name], f"z[{name!r}]", "the node's event shape: one sample")
        log_prob = self.joint.log_prob(**observed, **latents)
        if jnp.ndim(log_prob) != 0:
            raise ValueError(
                f"`joint.log_prob` must be a scalar for one sample, got shape {jnp.shape(log_prob)}: "
                "the joint has a batch shape. Make the repeated nodes one event (`tfd.Sample`, "
                "`tfd.Independent`) or use an AutoBatched joint."
            )
        return log_prob

    def proposal(self, surrogate):
        """`surrogate` (a TFP or distrax distribution over the latent nodes), checked and adapted.

        Raises a `ValueError` if its samples are not the latent nodes with their event shapes.
        """
        proposal = as_proposal(surrogate, "surrogate")
        z, _ = jax.eval_shape(lambda: proposal.sample_and_log_prob(seed=jax.random.key(0), sample_shape=()))
        values = self._as_named(z, "a sample of `surrogate`")
        for name, shape in self._latent_shapes.items():
            got = _Shapes.of(values[name])
            if got.shapes != (shape,):
                raise ValueError(
                    f"A sample of `surrogate` must give node {name!r} shape {shape}, got {got.describe()}."
                )
        return proposal

    def __repr__(self):
        return f"TFPJointAdapter(latent_names={self.latent_names}, observed_names={self.observed_names})"


def from_tfp_joint(joint, observed: Mapping[str, Any]) -> TFPJointAdapter:
    r"""Adapt a TFP-on-JAX joint distribution with observed nodes to elbojax.

    Args:
      joint: a `JointDistributionNamed`, `JointDistributionSequential` or
        `JointDistributionCoroutine` (auto-batched or not) whose `log_prob` is a scalar.
      observed: `{node name: value}` for the observed nodes.

    Returns:
      A `TFPJointAdapter` with `log_joint(x, z)` and `proposal(surrogate)`.

    Example::

        adapter = from_tfp_joint(joint, observed={"y": data})
        bound = ej.iwae_bound(key, None, adapter.log_joint, surrogate, num_samples=8)
    """
    names = _node_names(joint)
    observed = _check_mapping(observed, "observed", "{node name: value}")
    unknown = [name for name in observed if name not in names]
    if unknown:
        raise ValueError(
            f"`observed` names nodes the joint does not have: {_names(unknown)}; its nodes are {_names(names)}."
        )
    if not observed or len(observed) == len(names):
        raise ValueError(
            f"`observed` must name some but not all of the joint's nodes {_names(names)}; got {_names(observed)}."
        )
    return TFPJointAdapter(joint, observed, names)
