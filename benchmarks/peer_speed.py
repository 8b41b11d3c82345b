r"""elbojax against NumPyro, TensorFlow Probability (JAX) and a hand-written JAX floor (issue #5, section 2).

**Goal: elbojax within 1.05x of the hand-written floor, and ahead of every peer, on each workload.**

The workloads, model and data are those of `training_speed.py` (see `_workloads.py`): the IWAE
paper's MNIST VAE (784-200-200-(2x50) tanh encoder, N(0, I_50) prior, 50-200-200-784 tanh
Bernoulli decoder), 100 real binarized MNIST digits, float32, Adam:

* **W1**: the importance-sampled log-likelihood $\log \hat p(x)$, K = 5000, of 100 test digits;
* **W2**: one IWAE training step, K = 50, batch 100;
* **W3**: one single-sample ELBO training step, batch 100.

Contestants, each written the way its library's documentation writes it, all starting from the
same parameters:

* **hand-written JAX** (the floor) and **elbojax**: as in `training_speed.py` (elbojax's
  `train.make_step` and, for W1, the log-likelihood part of `train.evaluate`:
  `importance_log_marginal`, `chunk_size=500`, `lax.map`ped over points).
* **NumPyro**: a `model`/`guide` pair with the networks as Flax NNX modules declared through
  `numpyro.contrib.module.nnx_module` (NumPyro's way of using NNX), the data in a
  `numpyro.plate`, `dist.Normal` latents and `dist.Bernoulli(logits=...)` observations; trained
  with `SVI(...).update` (jitted) and `optax.adam`. W2: `RenyiELBO(alpha=0, num_particles=50)`,
  which is the IWAE bound, computed per data point because NumPyro's `RenyiELBO` keeps the data
  plate independent. W3: `Trace_ELBO()`. W1: NumPyro has no importance-sampling estimate of
  log p(x) of its own (`numpyro.infer.util.log_likelihood` gives log p(x | z) at given samples,
  not the marginal), so W1 is the same `RenyiELBO(alpha=0, num_particles=5000).loss`, evaluated
  without gradient: $-\mathrm{loss}/N$ is the mean $\log \hat p(x)$. Its particles are vmapped
  over all points at once (NumPyro's default), unchunked.
* **TFP (JAX)**: `tfp.vi.monte_carlo_variational_loss(target_log_prob_fn, surrogate_posterior,
  importance_sample_size=K)` with `tfd.MultivariateNormalDiag` for q (batch shape `(B,)`), and
  `tfd.Independent(tfd.Bernoulli(logits=...), 1)` plus a standard normal prior in the target;
  W3 with the default `importance_sample_size=1`; W1 the same loss with K = 5000 over all points
  at once. The networks are the floor's plain JAX functions (TFP has no module system), and the
  step is `jax.value_and_grad` + `optax.adam`, jitted.

Each workload runs in a fresh process of its own, as `../shared/PERFORMANCE.md` measured
(`_workloads.run_isolated`); `--workload W3` times one workload in this process. A peer whose
import fails is skipped with a message. By default each training workload is one
step per jitted call; `--scan` adds the per-step cost inside a `lax.scan` of 50 steps. Every
contestant's first call (trace, compile, one run) is timed; then the contestants take turns, round
by round; the table gives the median over rounds of each round's median time per step, data points
per second, and the ratio to the hand-written floor.

Correctness, checked on every run: the draws differ between libraries, so each contestant's
batch-mean bound must lie within six standard deviations of the floor's (over independent
draws); W1 within 1 nat of the floor's value.

Usage::

    python benchmarks/peer_speed.py            # several minutes on 2 CPU cores
    python benchmarks/peer_speed.py --quick    # tiny sizes, the same code path, < 1 minute

Writes `peer_speed.png` and `peer_speed.json` to `--out` (default `benchmarks/results/`).
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report
import _workloads as w  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from flax import nnx  # noqa: E402

ELBOJAX, FLOOR, NUMPYRO, TFP = "elbojax", "hand-written JAX", "NumPyro", "TFP (JAX)"
GOAL = 1.05


def _linear(kernel, bias) -> nnx.Linear:
    layer = nnx.Linear(kernel.shape[0], kernel.shape[1], rngs=nnx.Rngs(0))
    layer.kernel.set_value(kernel)
    layer.bias.set_value(bias)
    return layer


class Encoder(nnx.Module):
    """The encoder as a batch-agnostic NNX module: `x (..., D) -> (loc, scale)`, from the floor's parameters."""

    def __init__(self, params):
        self.trunk = nnx.List([_linear(*layer) for layer in params["encoder"]])
        self.loc = _linear(*params["loc"])
        self.log_scale = _linear(*params["log_scale"])

    def __call__(self, x):
        for layer in self.trunk:
            x = jnp.tanh(layer(x))
        return self.loc(x), jnp.exp(self.log_scale(x))


class Decoder(nnx.Module):
    """The decoder as a batch-agnostic NNX module: `z (..., d) -> logits (..., D)`."""

    def __init__(self, params):
        self.trunk = nnx.List([_linear(*layer) for layer in params["decoder"]])
        self.logits = _linear(*params["logits"])

    def __call__(self, z):
        for layer in self.trunk:
            z = jnp.tanh(layer(z))
        return self.logits(z)


def numpyro_builder(s: w.Setup):
    try:
        import numpyro
        from numpyro import distributions as dist
        from numpyro.contrib.module import nnx_module
        from numpyro.infer import SVI, RenyiELBO, Trace_ELBO
    except ImportError as error:
        print(f"NumPyro is not installed ({error}): skipped")
        return None
    params = w.floor_params(s.vae)
    encoder_module, decoder_module = Encoder(params), Decoder(params)
    sizes = s.sizes

    def model(batch):
        decoder = nnx_module("decoder", decoder_module)
        with numpyro.plate("data", batch.shape[0]):
            z = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([sizes.latent_dim]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decoder(z)).to_event(1), obs=batch)

    def guide(batch):
        encoder = nnx_module("encoder", encoder_module)
        loc, scale = encoder(batch)
        with numpyro.plate("data", batch.shape[0]):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    @functools.cache
    def build(workload, mode):
        key = jax.random.key(0)
        if workload == "W1":
            elbo = RenyiELBO(alpha=0.0, num_particles=sizes.eval_samples)
            svi = SVI(model, guide, optax.adam(w.LEARNING_RATE), elbo)
            param_map = svi.get_params(svi.init(key, s.digits.eval_data))
            fn = jax.jit(lambda p, k, data: -elbo.loss(k, p, model, guide, data) / data.shape[0])
            return w.Entry(fn, (param_map, key, s.digits.eval_data), lambda out: out)
        elbo = RenyiELBO(alpha=0.0, num_particles=sizes.num_samples) if workload == "W2" else Trace_ELBO()
        svi = SVI(model, guide, optax.adam(w.LEARNING_RATE), elbo)
        state = svi.init(key, s.digits.batch)
        per_point = lambda loss: -loss / sizes.batch_size  # NumPyro's losses sum over the plate
        if mode == "call":
            return w.Entry(jax.jit(svi.update), (state, s.digits.batch), lambda out: per_point(out[1]))
        scanned = jax.jit(lambda st, batches: jax.lax.scan(svi.update, st, batches))
        return w.Entry(scanned, (state, s.batches), lambda out: per_point(out[1][0]))

    return build


def tfp_builder(s: w.Setup):
    try:
        import tensorflow_probability.substrates.jax as tfp
    except ImportError as error:
        print(f"TensorFlow Probability (JAX substrate) is not installed ({error}): skipped")
        return None
    tfd = tfp.distributions
    sizes = s.sizes
    params = w.floor_params(s.vae)

    def losses(p, key, batch, importance_sample_size):
        """Minus the per-point bound, `(B,)`."""
        loc, log_scale = w.encode(p, batch)
        posterior = tfd.MultivariateNormalDiag(loc, jnp.exp(log_scale))
        prior = tfd.MultivariateNormalDiag(jnp.zeros(sizes.latent_dim), jnp.ones(sizes.latent_dim))

        def target_log_prob_fn(z):
            likelihood = tfd.Independent(tfd.Bernoulli(logits=w.decode(p, z)), reinterpreted_batch_ndims=1)
            return likelihood.log_prob(batch) + prior.log_prob(z)

        return tfp.vi.monte_carlo_variational_loss(
            target_log_prob_fn, posterior, importance_sample_size=importance_sample_size, seed=key
        )

    @functools.cache
    def build(workload, mode):
        if workload == "W1":
            fn = jax.jit(lambda p, k, data: -jnp.mean(losses(p, k, data, sizes.eval_samples)))
            return w.Entry(fn, (params, jax.random.key(0), s.digits.eval_data), lambda out: out)
        importance_sample_size = sizes.num_samples if workload == "W2" else 1
        optimizer = optax.adam(w.LEARNING_RATE)
        step = w.make_optax_step(lambda p, k, b: jnp.mean(losses(p, k, b, importance_sample_size)), optimizer)
        state = w.init_optax_state(params, optimizer)
        if mode == "call":
            return w.Entry(jax.jit(step), (state, s.digits.batch), lambda out: out[1])
        return w.Entry(jax.jit(w.scan_steps(step)), (state, s.batches), lambda out: out[1][0])

    return build


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (at least 3)")
    parser.add_argument("--scan", action="store_true", help="also time the steps inside a lax.scan")
    parser.add_argument("--steps-per-call", type=int, default=None, help="steps per lax.scan call (default 50)")
    args = w.parse_arguments(parser)
    quick = w.is_quick(args.quick)
    sizes = w.QUICK if quick else w.FULL
    if args.steps_per_call:
        sizes = sizes._replace(steps_per_call=args.steps_per_call)
    rounds = max(3, args.rounds)
    modes = ("call", "scan") if args.scan else ("call",)
    if args.results_to:  # a child of `run_isolated`: time one workload, hand the result back
        w.write_json(args.results_to, time_workloads(sizes, rounds, quick, modes, (args.workload,)))
        return

    _report.capture(args.out, "peer_speed", "python benchmarks/peer_speed.py " + " ".join(sys.argv[1:]), quick=quick)
    print(w.machine())
    print(f"IWAE-paper VAE {sizes.data_dim}-{sizes.hidden}-{sizes.hidden}-{sizes.latent_dim}, float32"
          + (" (QUICK: tiny sizes)" if quick else ""))
    versions = peer_versions()
    print("peers: " + (", ".join(f"{n} {v}" for n, v in versions.items()) or "none installed"))
    if args.workload:
        results = time_workloads(sizes, rounds, quick, modes, (args.workload,))
    else:
        child = ["--rounds", str(rounds), "--steps-per-call", str(sizes.steps_per_call)]
        child += (["--quick"] if quick else []) + (["--scan"] if args.scan else [])
        results = w.run_isolated(__file__, child)

    print(f"\ngoal: elbojax within {GOAL:.2f}x of the hand-written floor and ahead of every peer")
    goal = {}
    for workload, by_mode in results.items():
        for mode, rows in by_mode.items():
            ratio = rows[ELBOJAX]["ratio"]
            peers = {n: r["ratio"] for n, r in rows.items() if n not in (ELBOJAX, FLOOR)}
            ahead = all(ratio < peer for peer in peers.values())
            met = ratio <= GOAL and ahead
            goal[f"{workload} {mode}"] = {"ratio_to_floor": ratio, "ahead_of_every_peer": ahead, "met": met}
            peer_text = ", ".join(f"{n} {r:.2f}" for n, r in peers.items()) or "no peers"
            print(f"  {workload} ({mode}): elbojax {ratio:.3f} ({peer_text})  {'met' if met else 'NOT met'}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / "peer_speed.png"
    w.plot(results, figure, "elbojax vs peers", "ratio to the hand-written floor")
    record = {
        "machine": w.machine(), "peers": versions, "quick": quick, "sizes": sizes._asdict(), "rounds": rounds,
        "one_process_per_workload": not args.workload,
        "results": results, "goal": {"max_ratio_to_floor": GOAL, "workloads": goal},
    }
    w.write_json(args.out / "peer_speed.json", record)
    print(f"\nwrote {figure} and {args.out / 'peer_speed.json'}")


def peer_versions() -> dict:
    """The installed peers' versions (a peer whose import fails is left out)."""
    versions = {}
    for name, module in ((NUMPYRO, "numpyro"), (TFP, "tensorflow_probability")):
        try:
            versions[name] = __import__(module).__version__
        except Exception:  # noqa: BLE001 - any import failure means: not available here
            pass
    return versions


def time_workloads(sizes, rounds: int, quick: bool, modes, workloads) -> dict:
    """Time every contestant on `workloads`, in this process (`run_workloads`' result)."""
    s = w.setup(sizes)
    builders = {FLOOR: w.floor_builder(s), ELBOJAX: w.elbojax_builder(s)}
    for name, peer_builder in ((NUMPYRO, numpyro_builder), (TFP, tfp_builder)):
        build = peer_builder(s)  # None when the peer is not installed
        if build is not None:
            builders[name] = build
    return w.run_workloads(
        builders, sizes, rounds=rounds, calls=w.calls_per_round(quick), references=w.reference_bounds(s, FLOOR),
        reference=FLOOR, modes=modes, workloads=workloads,
    )


if __name__ == "__main__":
    _report.run(main)
