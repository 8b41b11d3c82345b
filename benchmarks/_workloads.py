r"""Shared pieces of `training_speed.py` and `peer_speed.py`: sizes, data, models, the floor, timing.

The three workloads of `../shared/PERFORMANCE.md`, on the IWAE paper's MNIST architecture
(encoder 784-200-200-(2x50) tanh with a diagonal Gaussian q, prior N(0, I), decoder
50-200-200-784 tanh with Bernoulli logits; Burda et al. 2016, https://arxiv.org/abs/1509.00519):

* **W1**: the importance-sampled log-likelihood $\log \hat p(x)$, K = 5000, of 100 test digits
  (no gradient);
* **W2**: one IWAE training step, K = 50, batch 100, Adam (forward, gradients, update);
* **W3**: one single-sample ELBO training step, batch 100, Adam.

The data are real MNIST digits from the package (`elbojax.data.load_embedded_mnist`), binarized
once with a fixed seed (`static_binarize`).

**The floor** is a hand-written JAX + optax version of the same computation, written the fast way
(see PERFORMANCE.md): one `(B, K, d)` Gaussian draw; the decoder applied to the samples
flattened to one `(B K, d)` matrix; the Bernoulli log-likelihood in the fused form
`-softplus(where(x, -l, l))`; the evaluation mapped over data points with `lax.map` (one point's
samples at a time, in chunks), because it is memory-bound.

Flattening the samples is new since PERFORMANCE.md (measured here, 2026-11-22): with `(B, K, d)`
inputs, the decoder's weight gradients are products that contract two axes, and XLA on CPU
transposes the `(B, K, 784)` cotangent before each; the flattened step was 11-20% faster (three runs) on
W2. elbojax gets the same programme from `vmap`ped per-sample code through its `flat_matmul`
layers (`elbojax/models/_flat_matmul.py`).
It runs on a plain dict of the elbojax model's own parameters, so every contestant starts from
the same numbers.

**Timing.** `time_alternating` calls every contestant once (its first call: tracing, compiling
and one run, reported as the compile time), then runs rounds in which the contestants take turns,
in an order that rotates from round to round; each call is timed on its own with its result
blocked, and the reported time is the median over rounds of each round's median.

**One process per workload.** `run_isolated` runs each workload in a fresh Python process of its
own, as `../shared/PERFORMANCE.md` did. In one process, the large temporaries of W1 and W2 leave
glibc's heap in a state where each later call of a small step maps fresh pages and page-faults
on them: a W3 call then took 1.6-2.1 ms instead of 1.3-1.4 (every contestant, by amounts that
differ from run to run; `allocator_speed.py` measures it). `--workload W` times one workload in
the calling process.
"""

from __future__ import annotations

import os
import sys

# --quick only checks that the scripts run: compile with less LLVM optimisation (the compiles,
# not the runs, are what a tiny quick run spends its time on). Must precede the first jax import.
if "--quick" in sys.argv or os.environ.get("ELBOJAX_QUICK") == "1":
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import functools
import inspect
import json
import math
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from elbojax import data as data_lib
from elbojax import models, train
from elbojax._keys import normal as elbojax_normal
from elbojax.estimators import importance_log_marginal

LOG_2PI = math.log(2.0 * math.pi)
WORKLOADS = {
    "W1": "log-likelihood, K={eval_samples}, {eval_points} points (no gradient)",
    "W2": "IWAE K={num_samples} training step, batch {batch_size}, Adam",
    "W3": "ELBO K=1 training step, batch {batch_size}, Adam",
}
MODES = {"call": "one step per jitted call", "scan": "per step inside a lax.scan of {steps_per_call} steps"}


class Sizes(NamedTuple):
    """The sizes of the benchmark (the IWAE paper's, or tiny ones for `--quick`)."""

    data_dim: int
    hidden: int
    latent_dim: int
    batch_size: int
    num_samples: int  # K of the IWAE step (W2)
    eval_points: int  # data points of W1
    eval_samples: int  # K of W1
    chunk_size: int  # samples per chunk in W1 (elbojax's `evaluate` default is 500)
    steps_per_call: int  # steps per lax.scan call


FULL = Sizes(data_dim=784, hidden=200, latent_dim=50, batch_size=100, num_samples=50,
             eval_points=100, eval_samples=5000, chunk_size=500, steps_per_call=50)
QUICK = Sizes(data_dim=784, hidden=32, latent_dim=4, batch_size=10, num_samples=5,
              eval_points=8, eval_samples=200, chunk_size=50, steps_per_call=4)
LEARNING_RATE = 1e-3


def is_quick(flag: bool) -> bool:
    return flag or os.environ.get("ELBOJAX_QUICK") == "1"


def describe(workload: str, sizes: Sizes) -> str:
    return WORKLOADS[workload].format(**sizes._asdict())


# ------------------------------------------------------------------------------------------------
# Data and the elbojax model
# ------------------------------------------------------------------------------------------------


class Digits(NamedTuple):
    batch: jax.Array  # (B, D) float32 0/1: training digits for W2 and W3
    eval_data: jax.Array  # (N, D) float32 0/1: test digits for W1
    train_mean: np.ndarray  # (D,) mean grey level / 255 of the training digits (decoder bias)


def digits(sizes: Sizes, seed: int = 0) -> Digits:
    """Real MNIST digits from the package, binarized once with a fixed seed."""
    dataset = data_lib.load_embedded_mnist()
    train_images = dataset.train.images.reshape(len(dataset.train.images), -1)
    test_images = dataset.test.images.reshape(len(dataset.test.images), -1)
    batch = data_lib.static_binarize(train_images[: sizes.batch_size], seed=seed)
    eval_data = data_lib.static_binarize(test_images[: sizes.eval_points], seed=seed + 1)
    return Digits(jnp.asarray(batch), jnp.asarray(eval_data), train_images.mean(0) / 255.0)


def make_vae(sizes: Sizes, train_mean, seed: int = 0) -> models.VAE:
    """elbojax's own VAE of the IWAE paper's architecture (output bias from the data mean)."""
    rngs = nnx.Rngs(seed)
    hidden = (sizes.hidden, sizes.hidden)
    encoder = models.GaussianMLPEncoder(sizes.data_dim, sizes.latent_dim, hidden, rngs=rngs)
    decoder = models.BernoulliMLPDecoder(
        sizes.latent_dim, sizes.data_dim, hidden, rngs=rngs, output_bias=models.bias_from_data_mean(train_mean)
    )
    return models.VAE(encoder, decoder, models.StandardNormalPrior(sizes.latent_dim))


def floor_params(vae: models.VAE) -> dict:
    """The VAE's parameters as a plain dict of `(kernel, bias)` pairs, for the hand-written code."""
    pure = nnx.to_pure_dict(nnx.state(vae, nnx.Param))
    pair = lambda layer: (layer["kernel"], layer["bias"])
    trunk = lambda part: [pair(part["trunk"]["layers"][i]) for i in sorted(part["trunk"]["layers"])]
    enc, dec = pure["encoder"], pure["decoder"]
    return {
        "encoder": trunk(enc),
        "loc": pair(enc["loc_head"]),
        "log_scale": pair(enc["scale_head"]),
        "decoder": trunk(dec),
        "logits": pair(dec["logits_head"]),
    }


# ------------------------------------------------------------------------------------------------
# The floor: hand-written JAX + optax, the fast way
# ------------------------------------------------------------------------------------------------


def _tanh_trunk(layers, h):
    for kernel, bias in layers:
        h = jnp.tanh(h @ kernel + bias)
    return h


def encode(params, x):
    """`(loc, log_scale)` of q(z | x) for `x` of shape `(..., D)`."""
    h = _tanh_trunk(params["encoder"], x)
    (w_loc, b_loc), (w_scale, b_scale) = params["loc"], params["log_scale"]
    return h @ w_loc + b_loc, h @ w_scale + b_scale


def decode(params, z):
    """Bernoulli logits `(..., D)` for `z` of shape `(..., d)`."""
    kernel, bias = params["logits"]
    return _tanh_trunk(params["decoder"], z) @ kernel + bias


def bernoulli_log_likelihood(x, logits):
    """The fused form, summed over the last axis: `-softplus(-l)` where x = 1, `-softplus(l)` where x = 0.

    softplus(s) written with selects, `where(s > 0, s, 0) + log1p(exp(where(s > 0, -s, s)))`:
    about 40% faster, forward and backward, than `jax.nn.softplus` on CPU (measured; see
    `elbojax.models.likelihoods.softplus`).
    """
    s = jnp.where(x > 0.5, -logits, logits)
    positive = s > 0
    return -jnp.sum(jnp.where(positive, s, 0.0) + jnp.log1p(jnp.exp(jnp.where(positive, -s, s))), axis=-1)


def floor_log_weights(params, x, eps):
    r"""$\ell_k = \log p(x, z_k) - \log q(z_k \mid x)$ with $z_k = \mu + \sigma \epsilon_k$.

    `x`: `(..., D)`; `eps`: `(..., K, d)` standard normal noise. Returns `(..., K)`.
    """
    loc, log_scale = encode(params, x)
    z = loc[..., None, :] + jnp.exp(log_scale)[..., None, :] * eps
    log_q = -jnp.sum(0.5 * eps**2 + 0.5 * LOG_2PI + log_scale[..., None, :], axis=-1)
    log_prior = -jnp.sum(0.5 * z**2 + 0.5 * LOG_2PI, axis=-1)
    # The decoder on all samples as one (B K, d) matrix: see the module notes.
    logits = decode(params, z.reshape(-1, z.shape[-1])).reshape(z.shape[:-1] + (-1,))
    return bernoulli_log_likelihood(x[..., None, :], logits) + log_prior - log_q


def floor_bounds(params, key, batch, num_samples):
    """The per-point IWAE bound (the ELBO's one-sample estimate at K = 1), one `(B, K, d)` draw."""
    latent_dim = params["loc"][1].shape[0]
    eps = jax.random.normal(key, (batch.shape[0], num_samples, latent_dim))
    return jax.nn.logsumexp(floor_log_weights(params, batch, eps), axis=-1) - math.log(num_samples)


class OptaxState(NamedTuple):
    """The state of a hand-written optax training loop: step counter, parameters, optimizer state."""

    step: jax.Array
    params: Any
    opt_state: Any


def init_optax_state(params, optimizer) -> OptaxState:
    return OptaxState(jnp.zeros((), jnp.int32), params, optimizer.init(params))


def make_optax_step(loss: Callable, optimizer, seed: int = 0):
    """`(OptaxState, batch) -> (OptaxState, bound)`: one optimizer step on `loss(params, key, batch)`.

    The key is `fold_in(key(seed), step)`; the returned bound is `-loss` before the update.
    """
    base = jax.random.key(seed)

    def step(state: OptaxState, batch):
        value, grads = jax.value_and_grad(loss)(state.params, jax.random.fold_in(base, state.step), batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        return OptaxState(state.step + 1, optax.apply_updates(state.params, updates), opt_state), -value

    return step


def floor_loss(num_samples: int):
    """`loss(params, key, batch)`: minus the batch mean of the floor's bound."""
    return lambda params, key, batch: -jnp.mean(floor_bounds(params, key, batch, num_samples))


def scan_steps(step):
    """`(state, batches (S, B, ...)) -> (state, outputs)`: `step` over stacked batches in one `lax.scan`."""
    return lambda state, batches: jax.lax.scan(step, state, batches)


def floor_log_marginal(params, key, data, *, num_samples: int, chunk_size: int):
    r"""$\log \hat p(x)$ for each row of `data` `(N, D)`: `lax.map` over points, chunks inside each."""
    latent_dim = params["loc"][1].shape[0]
    num_chunks, remainder = divmod(num_samples, chunk_size)
    if remainder:
        raise ValueError(f"chunk_size ({chunk_size}) must divide num_samples ({num_samples}).")

    def one_point(args):
        index, x = args
        point_key = jax.random.fold_in(key, index)
        loc, log_scale = encode(params, x)
        scale = jnp.exp(log_scale)

        def chunk(carry, c):
            running_max, running_sum = carry
            eps = jax.random.normal(jax.random.fold_in(point_key, c), (chunk_size, latent_dim))
            z = loc + scale * eps
            log_q = -jnp.sum(0.5 * eps**2 + 0.5 * LOG_2PI + log_scale, axis=-1)
            log_prior = -jnp.sum(0.5 * z**2 + 0.5 * LOG_2PI, axis=-1)
            log_w = bernoulli_log_likelihood(x, decode(params, z)) + log_prior - log_q
            new_max = jnp.maximum(running_max, jnp.max(log_w))
            running_sum = running_sum * jnp.exp(running_max - new_max) + jnp.sum(jnp.exp(log_w - new_max))
            return (new_max, running_sum), None

        init = (jnp.array(-jnp.inf, jnp.float32), jnp.array(0.0, jnp.float32))
        (running_max, running_sum), _ = jax.lax.scan(chunk, init, jnp.arange(num_chunks, dtype=jnp.uint32))
        return running_max + jnp.log(running_sum) - math.log(num_samples)

    return jax.lax.map(one_point, (jnp.arange(data.shape[0], dtype=jnp.uint32), data))


def floor_bound_spread(params, batch, num_samples: int, *, num_keys: int = 8, seed: int = 123):
    """Mean and standard deviation, over `num_keys` draws, of the floor's batch-mean bound (no gradient)."""
    keys = jax.random.split(jax.random.key(seed), num_keys)
    values = jax.jit(jax.vmap(lambda k: jnp.mean(floor_bounds(params, k, batch, num_samples))))(keys)
    return float(jnp.mean(values)), float(jnp.std(values, ddof=1))


# ------------------------------------------------------------------------------------------------
# elbojax's own step and evaluation path
# ------------------------------------------------------------------------------------------------


def elbojax_objective(workload: str, sizes: Sizes, *, kl: str = "monte_carlo"):
    """`train.objective` for W2 (IWAE, K) or W3 (ELBO, K = 1).

    W3 takes `kl="monte_carlo"` by default: the same computation as the floor and the peers
    (NumPyro's `Trace_ELBO` and TFP's loss estimate the KL by sampling too). elbojax's own
    default for this model, `kl="auto"`, takes the KL in closed form; pass `kl="auto"` for it.
    """
    if workload == "W2":
        return train.objective("iwae", num_samples=sizes.num_samples, gradient="reparam")
    if "kl" in inspect.signature(train.objective).parameters:
        return train.objective("elbo", num_samples=1, gradient="reparam", kl=kl)
    return train.objective("elbo", num_samples=1, gradient="reparam")


def elbojax_log_marginal(graphdef, *, num_samples: int, chunk_size: int, seed: int = 0):
    """The log-likelihood part of `train.evaluate`: `importance_log_marginal`, chunked, `lax.map`ped over points.

    The same computation as `evaluate`'s, with the parameters passed as an argument (evaluate
    closes over them) and without its ELBO, KL and host-side summaries.
    """
    base = jax.random.key(seed)

    def per_point(params, index, x):
        model = nnx.merge(graphdef, params)
        key = jax.random.fold_in(base, index)
        return importance_log_marginal(
            key, x, model.log_joint, model.proposal(x), num_samples=num_samples, chunk_size=chunk_size
        )

    def log_marginals(params, data):
        indices = jnp.arange(data.shape[0], dtype=jnp.uint32)
        return jax.lax.map(lambda args: per_point(params, *args), (indices, data))

    return log_marginals


def elbojax_noise(seed: int, step: int, indices, num_samples: int, latent_dim: int):
    """The standard normal noise `(B, K, d)` that elbojax's step `step` draws (for the exactness check).

    Step key `fold_in(key(seed), step)`, example key `fold_in(step_key, index)`, sample key
    `fold_in(example_key, k)`, then `elbojax._keys.normal(sample_key, (d,))` in the encoder's
    Gaussian (two draws per Threefry block, not `jax.random.normal`'s numbers).
    """
    step_key = jax.random.fold_in(jax.random.key(seed), step)

    def one_example(index):
        example_key = jax.random.fold_in(step_key, index)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(example_key, jnp.arange(num_samples, dtype=jnp.uint32))
        return jax.vmap(lambda k: elbojax_normal(k, (latent_dim,)))(keys)

    return jax.vmap(one_example)(jnp.asarray(indices, jnp.uint32))


def check_elbojax_against_floor(s: "Setup", build, tolerance: float = 1e-3) -> dict:
    """elbojax's step and the floor agree on the same parameters and the same draws (float tolerance).

    `build` is `elbojax_builder(s)`; its jitted single-call steps for W2 and W3 are run once more
    (after the timing, so that no compile is added). The hand-written loss is fed the noise
    elbojax drew. Returns both batch-mean bounds and gradient norms; raises an `AssertionError`
    if they differ by more than `tolerance` relative.
    """
    params = floor_params(s.vae)
    batch = s.digits.batch
    report = {}
    for workload, num_samples in (("W2", s.sizes.num_samples), ("W3", 1)):
        entry = build(workload, "call")
        _, info = entry.fn(*entry.args)

        def loss(p, num_samples=num_samples):
            eps = elbojax_noise(0, 0, s.indices, num_samples, s.sizes.latent_dim)
            log_w = floor_log_weights(p, batch, eps)
            return -jnp.mean(jax.nn.logsumexp(log_w, axis=-1) - math.log(num_samples))

        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        ours, theirs = float(info.objective), float(-value)
        ours_norm, theirs_norm = float(info.grad_norm), float(optax.tree.norm(grads))
        for what, a, b in (("bound", ours, theirs), ("gradient norm", ours_norm, theirs_norm)):
            if abs(a - b) > tolerance * max(1.0, abs(b)):
                raise AssertionError(f"{workload}: elbojax's {what} {a} differs from the floor's {b} on the same draws")
        report[workload] = {
            "elbojax_bound": ours, "floor_bound": theirs, "elbojax_grad_norm": ours_norm, "floor_grad_norm": theirs_norm,
        }
    return report


# ------------------------------------------------------------------------------------------------
# Contestants shared by both scripts: elbojax and the floor
# ------------------------------------------------------------------------------------------------


class Setup(NamedTuple):
    """Everything the contestants share: sizes, data, the elbojax model and the stacked batches."""

    sizes: Sizes
    digits: Digits
    vae: models.VAE
    indices: jax.Array  # (B,) int32: the batch's global indices
    batches: jax.Array  # (S, B, D): the batch repeated for the scanned steps
    stacked_indices: jax.Array  # (S, B)


def setup(sizes: Sizes, seed: int = 0) -> Setup:
    d = digits(sizes, seed)
    vae = make_vae(sizes, d.train_mean, seed)
    steps, batch_size = sizes.steps_per_call, sizes.batch_size
    indices = jnp.arange(batch_size, dtype=jnp.int32)
    batches = jnp.asarray(np.broadcast_to(np.asarray(d.batch), (steps,) + d.batch.shape))
    return Setup(sizes, d, vae, indices, batches, jnp.tile(indices, (steps, 1)))


def elbojax_builder(s: Setup, *, kl: str = "monte_carlo", workloads=("W1", "W2", "W3"), unchecked: bool = False):
    """elbojax's own model and step (`train.make_step`, `train.make_multi_step`), and for W1 its
    evaluation path (`elbojax_log_marginal`).

    With `unchecked=True`, one step per call only: the step's `step.unchecked` form, which applies
    every update without the pass over the gradient that checks it is finite (the first pass of
    `make_multi_step`); it shows what the check costs a single step.
    """
    sizes = s.sizes

    @functools.cache
    def build(workload, mode):
        if workload not in workloads or (unchecked and (workload == "W1" or mode != "call")):
            return None
        if workload == "W1":
            graphdef, params = nnx.split(s.vae, nnx.Param)
            fn = jax.jit(elbojax_log_marginal(graphdef, num_samples=sizes.eval_samples, chunk_size=sizes.chunk_size))
            return Entry(fn, (params, s.digits.eval_data), jnp.mean)
        optimizer = optax.adam(LEARNING_RATE)
        graphdef, state = train.init(s.vae, optimizer)
        step = train.make_step(graphdef, optimizer, elbojax_objective(workload, sizes, kl=kl), seed=0)
        if mode == "call":
            fn = jax.jit(step.unchecked if unchecked else step)
            return Entry(fn, (state, s.digits.batch, s.indices), lambda out: out[1].objective)
        multi = jax.jit(train.make_multi_step(step))
        return Entry(multi, (state, s.batches, s.stacked_indices), lambda out: out[1].objective[0])

    return build


def floor_builder(s: Setup):
    """The hand-written JAX + optax floor, on the elbojax model's parameters."""
    sizes = s.sizes
    params = floor_params(s.vae)

    @functools.cache
    def build(workload, mode):
        if workload == "W1":
            fn = jax.jit(functools.partial(floor_log_marginal, num_samples=sizes.eval_samples, chunk_size=sizes.chunk_size))
            return Entry(fn, (params, jax.random.key(0), s.digits.eval_data), jnp.mean)
        optimizer = optax.adam(LEARNING_RATE)
        step = make_optax_step(floor_loss(sizes.num_samples if workload == "W2" else 1), optimizer)
        state = init_optax_state(params, optimizer)
        if mode == "call":
            return Entry(jax.jit(step), (state, s.digits.batch), lambda out: out[1])
        return Entry(jax.jit(scan_steps(step)), (state, s.batches), lambda out: out[1][0])

    return build


def reference_bounds(s: Setup, floor_name: str, w1_tolerance: float = 1.0) -> dict:
    """What each contestant's bound is checked against.

    W2 and W3: the mean of the floor's batch-mean bound over 8 independent draws, within six of
    its standard deviations (and at least 0.05 nats): every contestant draws its own samples, so
    only the distribution can agree. W1: the floor's own value (named `floor_name`), within
    `w1_tolerance` nats (with K in the thousands the estimate moves by far less between draws).
    """
    params = floor_params(s.vae)
    out = {"W1": (floor_name, w1_tolerance)}
    for workload, num_samples in (("W2", s.sizes.num_samples), ("W3", 1)):
        mean, std = floor_bound_spread(params, s.digits.batch, num_samples)
        out[workload] = (mean, max(6 * std, 0.05))
    return out


def calls_per_round(quick: bool) -> dict:
    if quick:
        return {("W1", "call"): 1, ("W2", "call"): 2, ("W2", "scan"): 1, ("W3", "call"): 2, ("W3", "scan"): 1}
    return {("W1", "call"): 1, ("W2", "call"): 5, ("W2", "scan"): 1, ("W3", "call"): 30, ("W3", "scan"): 3}


# ------------------------------------------------------------------------------------------------
# Timing, tables, plots
# ------------------------------------------------------------------------------------------------


class Timed(NamedTuple):
    first_call_s: float  # trace + compile + one run
    first_output: Any  # what the first call returned (for the correctness checks)
    median_s: float  # median over rounds of each round's median seconds per call
    round_medians: list


def time_alternating(contestants: dict[str, tuple[Callable, tuple]], *, rounds: int, calls: int) -> dict[str, Timed]:
    """Time each `fn(*args)` per call (result blocked), the contestants taking turns round by round.

    The order of the turns rotates from round to round, so that no contestant always runs first
    (or always right after the same neighbour).
    """
    first, outputs = {}, {}
    for name, (fn, args) in contestants.items():
        start = time.perf_counter()
        outputs[name] = jax.block_until_ready(fn(*args))
        first[name] = time.perf_counter() - start
    per_round = {name: [] for name in contestants}
    names = list(contestants)
    for round_index in range(rounds):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            fn, args = contestants[name]
            times = []
            for _ in range(calls):
                start = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times.append(time.perf_counter() - start)
            per_round[name].append(statistics.median(times))
    return {name: Timed(first[name], outputs[name], statistics.median(r), r) for name, r in per_round.items()}


class Entry(NamedTuple):
    """One contestant on one workload and mode: `fn(*args)` is timed; `bound(output)` reads the
    batch-mean bound (or mean log-likelihood) of the call's first step, for the correctness check."""

    fn: Callable
    args: tuple
    bound: Callable


def run_isolated(script: str, arguments: list[str]) -> dict:
    """Run `script` once per workload, each in a fresh process, and merge what they measured.

    Each child is `python script *arguments --workload W --results-to FILE`: it times workload
    `W` only, prints its table (passed on here, so that `_report.capture` keeps it) and writes its
    `run_workloads` result to `FILE`. A child that fails (a bound outside its tolerance among
    others) stops the run with its exit status.
    """
    print("each workload in a fresh process of its own")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        for workload in WORKLOADS:
            path = Path(folder, f"{workload}.json")
            command = [sys.executable, script, *arguments, "--workload", workload, "--results-to", str(path)]
            child = subprocess.run(command, stdout=subprocess.PIPE, text=True)
            print(child.stdout, end="", flush=True)
            if child.returncode != 0:
                raise SystemExit(f"{Path(script).name}: the {workload} process failed (exit status {child.returncode}).")
            results.update(json.loads(path.read_text()))
    return results


def parse_arguments(parser):
    """`parser.parse_args()` with `run_isolated`'s arguments added (`--workload` is public: one
    workload, in this process; `--results-to` is the children's) and checked."""
    import argparse

    parser.add_argument("--workload", choices=WORKLOADS, default=None,
                        help="time this workload only, in this process (default: each in a fresh process)")
    parser.add_argument("--results-to", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.results_to and not args.workload:
        parser.error("--results-to needs --workload")
    return args


def run_workloads(builders: dict[str, Callable], sizes: Sizes, *, rounds: int, calls: dict, references: dict,
                  reference: str | None = None, informational=(), modes=("call", "scan"), workloads=None) -> dict:
    """Time every contestant on W1 (one mode) and W2, W3 (one step per call, and scanned).

    Args:
      builders: `name -> build(workload, mode) -> Entry or None` (None: not run there).
      calls: `(workload, mode) -> calls per contestant per round`.
      references: `workload -> (value, tolerance)`: every contestant's bound must lie within
        `tolerance` nats of `value` (an `AssertionError` otherwise, after the table is printed).
      reference, informational: as `summarize`.
      modes: of the training workloads: `"call"` (one step per call) and/or `"scan"`.
      workloads: which of W1-W3 (default: all three).

    Returns:
      `results[workload][mode][name]`, the rows of `summarize` plus `bound`.
    """
    results, failures = {}, []
    for workload in workloads or WORKLOADS:
        results[workload] = {}
        for mode in ("call",) if workload == "W1" else modes:
            entries = {name: build(workload, mode) for name, build in builders.items()}
            entries = {name: entry for name, entry in entries.items() if entry is not None}
            contestants = {name: (entry.fn, entry.args) for name, entry in entries.items()}
            timed = time_alternating(contestants, rounds=rounds, calls=calls[workload, mode])
            steps = sizes.steps_per_call if mode == "scan" else 1
            points = sizes.eval_points if workload == "W1" else sizes.batch_size * steps
            rows = summarize(timed, steps=steps, points=points, reference=reference, informational=informational)
            value, tolerance = references[workload]
            if isinstance(value, str):  # another contestant's value is the reference
                value = float(entries[value].bound(timed[value].first_output))
            for name, entry in entries.items():
                rows[name]["bound"] = bound = float(entry.bound(timed[name].first_output))
                if not abs(bound - value) <= tolerance:
                    failures.append(f"{workload} ({mode}) {name}: bound {bound:.3f}, not {value:.3f} +- {tolerance:.3f}")
            label = describe(workload, sizes)
            if workload != "W1":
                label += "; " + MODES[mode].format(**sizes._asdict())
            print_table(f"{workload}: {label}", rows)
            results[workload][mode] = rows
    print(f"\ncorrectness ({', '.join(results)}): every contestant's bound within the stated tolerance of the reference: "
          + ("yes" if not failures else "NO"))
    for workload, (value, tolerance) in references.items():
        if workload not in results:
            continue
        what = f"{value}'s value" if isinstance(value, str) else f"{value:.3f} nats per point"
        print(f"  {workload}: reference {what}, tolerance {tolerance:.3f} nats")
    if failures:
        raise AssertionError("\n".join(failures))
    return results


def machine() -> str:
    processor = platform.processor() or platform.machine()
    return f"JAX {jax.__version__} on {jax.devices()[0].platform} ({processor}); {os.cpu_count()} CPUs"


def summarize(
    timed: dict[str, Timed], *, steps: int, points: int, reference: str | None = None, informational=()
) -> dict:
    """Per-step seconds, points per second, and the ratio to `reference` (default: the fastest).

    `steps` and `points` are per call. Contestants named in `informational` are reported but are
    not candidates for "the fastest". The compile time is estimated as the first call's time less
    the median call's.
    """
    per_step = {name: t.median_s / steps for name, t in timed.items()}
    candidates = [name for name in per_step if name not in informational]
    base = per_step[reference] if reference else min(per_step[name] for name in candidates)
    return {
        name: {
            "seconds_per_step": per_step[name],
            "points_per_second": points / timed[name].median_s,
            "ratio": per_step[name] / base,
            "first_call_seconds": timed[name].first_call_s,
            "compile_seconds": max(timed[name].first_call_s - timed[name].median_s, 0.0),
            "round_medians_seconds_per_call": timed[name].round_medians,
            "informational": name in informational,
        }
        for name in timed
    }


def print_table(title: str, rows: dict) -> None:
    print(f"\n{title}")
    print(f"{'contestant':<38}{'ms / step':>11}{'points / s':>12}{'ratio':>8}{'1st call s':>12}{'compile s':>11}")
    for name, row in rows.items():
        print(
            f"{name:<38}{row['seconds_per_step'] * 1e3:>11.2f}{row['points_per_second']:>12,.0f}"
            f"{row['ratio']:>8.3f}{row['first_call_seconds']:>12.2f}{row['compile_seconds']:>11.2f}"
        )


def plot(results: dict, path: Path, title: str, ratio_label: str) -> None:
    """One panel per workload: horizontal bars of ms per step, one group per mode, ratios written on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(w, mode) for w in results for mode in results[w]]
    ncols = min(3, len(panels))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.0 * nrows + 0.5), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (workload, mode) in zip(axes.flat, panels):
        rows = results[workload][mode]
        names = list(rows)
        values = [rows[n]["seconds_per_step"] * 1e3 for n in names]
        colors = [
            "grey" if "hand-written" in n else "tab:blue" if n.startswith("elbojax") else "tab:orange" for n in names
        ]
        bars = ax.barh(names, values, color=colors)
        for bar, name in zip(bars, names):
            y = bar.get_y() + bar.get_height() / 2
            ax.text(bar.get_width(), y, f" {rows[name]['ratio']:.2f}x", va="center", fontsize=8)
        ax.set_xlim(0, max(values) * 1.3)
        ax.invert_yaxis()
        ax.set_xlabel("ms per step (median)" if workload != "W1" else "ms per call (median)")
        ax.set_title(f"{workload} ({mode})", fontsize=10)
    fig.suptitle(f"{title} — lower is better; {ratio_label}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_json(path: Path, record: dict) -> None:
    path.write_text(json.dumps(record, indent=2, default=float))
