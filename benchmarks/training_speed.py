r"""What elbojax's training step and evaluation cost against hand-written JAX (issue #4, section 5).

**Goal: elbojax within 5% of the fastest contestant on each workload** (ratio <= 1.05 in every
table below).

The model is the IWAE paper's MNIST architecture: encoder 784-200-200-(2x50) tanh with a diagonal
Gaussian q, prior N(0, I_50), decoder 50-200-200-784 tanh with Bernoulli logits (Burda et al.
2016, https://arxiv.org/abs/1509.00519). The data are 100 real MNIST digits shipped in the package,
binarized once with a fixed seed. Three workloads (those of `../shared/PERFORMANCE.md`):

* **W1**: the importance-sampled log-likelihood $\log \hat p(x)$ with K = 5000 of 100 test digits,
  no gradient;
* **W2**: one IWAE training step, K = 50, batch 100, Adam (forward, gradients, update);
* **W3**: one single-sample ELBO training step, batch 100, Adam.

Contestants:

* **elbojax**: `elbojax.models.VAE` and `train.make_step(graphdef, optimizer,
  train.objective(...), seed=0)`, jitted (W2: `objective("iwae", num_samples=50)`; W3:
  `objective("elbo", num_samples=1, kl="monte_carlo")`, the same computation as the others); for
  W1 the log-likelihood part of `train.evaluate`: `importance_log_marginal` with `chunk_size=500`,
  `lax.map`ped over data points.
* **elbojax, kl=auto** (W3 only, for information): elbojax's default ELBO for this model, with
  the KL in closed form; not a candidate for "the fastest", since it computes something else
  (left out of `--quick`).
* **elbojax, unchecked** (W2 and W3, one step per call, for information): the same step's
  `step.unchecked` form, which applies the update without checking that the gradient is finite.
  elbojax's step skips a non-finite update (issue #4); the hand-written step does not check, so
  this row shows what that check costs a single step. Inside a scan, `make_multi_step` already
  runs the steps unchecked and checks the state once per call.
* **hand-written JAX**: the same computation in plain JAX + optax, written the fast way (one
  `(B, K, d)` draw; the decoder on the samples as one `(B K, d)` matrix; the fused Bernoulli `-softplus(where(x, -l, l))`; W1 `lax.map`ped over points
  with the same chunks), on the same parameters. See `_workloads.py`.

Each training workload is measured twice: **one step per jitted call** (the call's result
blocked), and **per step inside a `lax.scan`** of `--steps-per-call` steps per call (50), which
removes the per-call overhead. Every contestant's first call (trace, compile, one run) is timed
and reported; then the contestants take turns, round by round, and the table gives the median over
rounds of each round's median time per call, divided by the steps per call; data points per second;
and the ratio to the fastest.

Correctness, checked on every run: on the same parameters and the same draws, elbojax's W2 and W3
bounds and gradient norms equal the hand-written ones to float tolerance (the hand-written loss
is fed elbojax's own noise); and every contestant's reported bound lies within a few standard
deviations of the hand-written bound over independent draws (W1: within 1 nat).

Each workload runs in a fresh process of its own, as `../shared/PERFORMANCE.md` measured (see
`_workloads.py`: in one process, the earlier workloads' large temporaries made every later W3
call page-fault); `--workload W3` times one workload in this process.

Usage::

    python benchmarks/training_speed.py           # a few minutes on 2 CPU cores
    python benchmarks/training_speed.py --quick   # tiny sizes, the same code path, < 1 minute

Writes `training_speed.png` and `training_speed.json` to `--out` (default `benchmarks/results/`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _report
import _workloads as w  # noqa: E402

ELBOJAX, DEFAULT_KL, UNCHECKED, FLOOR = (
    "elbojax", "elbojax, kl=auto (closed-form KL)", "elbojax, unchecked (no finite check)", "hand-written JAX"
)
GOAL = 1.05


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: check that the script runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--rounds", type=int, default=5, help="alternated rounds (at least 3)")
    parser.add_argument("--steps-per-call", type=int, default=None, help="steps per lax.scan call (default 50)")
    args = w.parse_arguments(parser)
    quick = w.is_quick(args.quick)
    sizes = w.QUICK if quick else w.FULL
    if args.steps_per_call:
        sizes = sizes._replace(steps_per_call=args.steps_per_call)
    rounds = max(3, args.rounds)
    if args.results_to:  # a child of `run_isolated`: time one workload, hand the result back
        w.write_json(args.results_to, time_workloads(sizes, rounds, quick, (args.workload,)))
        return

    _report.capture(args.out, "training_speed", "python benchmarks/training_speed.py " + " ".join(sys.argv[1:]), quick=quick)
    print(w.machine())
    print(f"IWAE-paper VAE {sizes.data_dim}-{sizes.hidden}-{sizes.hidden}-{sizes.latent_dim}, float32"
          + (" (QUICK: tiny sizes)" if quick else ""))
    if args.workload:
        results = time_workloads(sizes, rounds, quick, (args.workload,))
    else:
        child = ["--rounds", str(rounds)] + (["--quick"] if quick else []) + ["--steps-per-call", str(sizes.steps_per_call)]
        results = w.run_isolated(__file__, child)
    s = w.setup(sizes)
    exact = w.check_elbojax_against_floor(s, w.elbojax_builder(s))
    print("\nsame parameters, same draws (elbojax's noise fed to the hand-written loss): equal")
    for workload, row in exact.items():
        print(f"  {workload}: bound {row['elbojax_bound']:.4f} vs {row['floor_bound']:.4f}; "
              f"gradient norm {row['elbojax_grad_norm']:.4f} vs {row['floor_grad_norm']:.4f}")

    print(f"\ngoal: elbojax within {GOAL:.2f}x of the fastest contestant")
    goal = {}
    for workload, modes in results.items():
        for mode, rows in modes.items():
            ratio = rows[ELBOJAX]["ratio"]
            goal[f"{workload} {mode}"] = {"ratio": ratio, "met": ratio <= GOAL}
            print(f"  {workload} ({mode}): {ratio:.3f}  {'met' if ratio <= GOAL else 'NOT met'}")

    args.out.mkdir(parents=True, exist_ok=True)
    figure = args.out / "training_speed.png"
    w.plot(results, figure, "elbojax vs hand-written JAX", "ratio to the fastest")
    record = {
        "machine": w.machine(), "quick": quick, "sizes": sizes._asdict(), "rounds": rounds,
        "one_process_per_workload": not args.workload,
        "same_draws_check": exact, "results": results, "goal": {"max_ratio": GOAL, "workloads": goal},
    }
    w.write_json(args.out / "training_speed.json", record)
    print(f"\nwrote {figure} and {args.out / 'training_speed.json'}")


def time_workloads(sizes, rounds: int, quick: bool, workloads) -> dict:
    """Time every contestant on `workloads`, in this process (`run_workloads`' result)."""
    s = w.setup(sizes)
    builders = {FLOOR: w.floor_builder(s), ELBOJAX: w.elbojax_builder(s)}
    builders[UNCHECKED] = w.elbojax_builder(s, workloads=("W2", "W3"), unchecked=True)  # for information
    if not quick:  # for information only; left out of --quick to keep it short
        builders[DEFAULT_KL] = w.elbojax_builder(s, kl="auto", workloads=("W3",))
    return w.run_workloads(
        builders, sizes, rounds=rounds, calls=w.calls_per_round(quick), workloads=workloads,
        references=w.reference_bounds(s, FLOOR), informational=(UNCHECKED, DEFAULT_KL),
    )


if __name__ == "__main__":
    _report.run(main)
