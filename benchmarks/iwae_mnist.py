r"""Table 1 of Burda et al. (2016), one stochastic layer, on a short CPU schedule.

Trains the IWAE paper's one-layer MNIST model (encoder 784-200-200-(2x50) tanh, diagonal
Gaussian q; prior N(0, I); decoder 50-200-200-784 tanh, Bernoulli logits, output bias from the
training mean) on dynamically binarized MNIST (60,000 training images) with

* **VAE**: the K-sample Monte Carlo ELBO $\frac1K \sum_k \log w_k$ (the paper's VAE with k samples),
* **IWAE**: the K-sample bound $\log \frac1K \sum_k w_k$, reparameterisation gradient,
* **IWAE-DReG**: the same bound with the doubly reparameterised gradient (Tucker et al. 2019),

for K = 1, 5, 50 (IWAE with K = 1 is the VAE with K = 1, as in the paper, and is not trained
twice), then reports the test log-likelihood $\log \hat p(x)$ with K = 5000 on a test subset (points
evenly spaced through the test set, `elbojax.cli.spread`; MNIST's first 5,000 test digits are the
cleaner half) with its standard error, the difference to the K = 1 VAE with its *paired* standard error (the same
test points and draws for every model, so the differences are far more precise than the
levels), and the active units (Burda et al.'s 0.01 criterion), next to the paper's numbers.

**The schedule.** The paper trains for 3,280 passes (for a GPU) with batch 20 and Adam
(lr $10^{-3} \cdot 10^{-i/7}$ in stage $i$, $\epsilon = 10^{-4}$). Here every model trains for the
same few epochs with batch 100 and Adam at $10^{-3}$ ($\epsilon = 10^{-4}$), so that the whole
table fits in about a quarter of an hour on 2 CPU cores; the levels are therefore far below the paper's
(about 86 nats), and only the ordering that separates early is claimed: IWAE rising with K, and
IWAE above the VAE at K = 50. The VAE rows are 0.4 nats apart in the paper and may not separate.

Every run is a resumable elbojax run folder under `--out/iwae_mnist_runs/`: an interrupted
benchmark picks up where it stopped, and a finished row is not trained again.

Data: the MNIST IDX files from `--data-dir` (default: `../shared/data` next to this repository
when it exists, else elbojax's data folder; `--download` fetches them).

Usage::

    python benchmarks/iwae_mnist.py                 # 10 epochs: about a minute per epoch for the whole table on 2 CPU cores
    python benchmarks/iwae_mnist.py --epochs 3      # shorter
    python benchmarks/iwae_mnist.py --quick         # tiny, embedded data, to check that it runs
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import _report
from elbojax import data, models, train
from elbojax.cli import spread

ROOT = Path(__file__).resolve().parent.parent

# Burda, Grosse & Salakhutdinov, ICLR 2016, Table 1, MNIST, one stochastic layer: test log p(x).
PAPER = {
    ("VAE", 1): -86.76, ("VAE", 5): -86.47, ("VAE", 50): -86.35,
    ("IWAE", 1): -86.76, ("IWAE", 5): -85.54, ("IWAE", 50): -84.78,
}


class Row(NamedTuple):
    name: str  # "VAE", "IWAE" or "IWAE-DReG"
    objective: str  # train.objective's name
    gradient: str
    num_samples: int

    @property
    def slug(self) -> str:
        return f"{self.name.lower()}-k{self.num_samples}"


def rows_for(sample_counts) -> list[Row]:
    rows = []
    for k in sample_counts:
        rows.append(Row("VAE", "elbo", "reparam", k))
        if k > 1:  # IWAE with K = 1 is the VAE with K = 1
            rows.append(Row("IWAE", "iwae", "reparam", k))
        rows.append(Row("IWAE-DReG", "iwae", "dreg", k))
    return rows


def build_model(train_images, latent_dim: int, hidden, seed: int) -> models.VAE:
    rngs = nnx.Rngs(seed)
    mean = jnp.asarray(train_images.reshape(train_images.shape[0], -1).mean(0) / 255.0, jnp.float32)
    encoder = models.GaussianMLPEncoder(784, latent_dim, hidden, jnp.tanh, rngs=rngs)
    decoder = models.BernoulliMLPDecoder(
        latent_dim, 784, tuple(reversed(hidden)), jnp.tanh, rngs=rngs, output_bias=models.bias_from_data_mean(mean)
    )
    return models.VAE(encoder, decoder, models.StandardNormalPrior(latent_dim))


def train_and_evaluate(row: Row, images, test, settings, out: Path, progress: bool) -> dict:
    """Train one row (resuming its run folder) and evaluate it; cached in the folder's result.json."""
    run_dir = out / "iwae_mnist_runs" / row.slug
    result_path = run_dir / "result.json"
    steps = settings.epochs * (images.shape[0] // settings.batch_size)
    if result_path.exists():
        cached = json.loads(result_path.read_text())
        same_points = cached.get("points") == "spread"  # results on the first N test points are not reused
        if same_points and cached["steps"] == steps and cached["eval_points"] == test.shape[0] and cached["eval_samples"] == settings.eval_samples:
            print(f"  cached: {result_path}")
            return cached
    done = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
    if done and max(done) > steps:  # a longer run's folder: resuming it would train nothing
        print(f"  {run_dir} holds a run of {max(done)} steps, more than {steps}: training this row from scratch")
        shutil.rmtree(run_dir)
        done = []
    resumed_from = max(done, default=0)
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = optax.adam(1e-3, eps=1e-4)
    graphdef, state = train.init(build_model(images, settings.latent_dim, settings.hidden, settings.seed), optimizer)
    objective_fn = train.objective(row.objective, num_samples=row.num_samples, gradient=row.gradient, kl="monte_carlo" if row.objective == "elbo" else "auto")
    config = train.FitConfig(
        seed=settings.seed, batch_size=settings.batch_size, num_steps=steps,
        steps_per_call=settings.steps_per_call, checkpoint_every=settings.checkpoint_every,
    )
    began = time.perf_counter()
    state = train.fit(graphdef, state, optimizer, objective_fn, images, run_dir=run_dir, config=config, progress=progress)
    train_seconds = time.perf_counter() - began
    began = time.perf_counter()
    evaluation = train.evaluate(graphdef, state.params, test, seed=settings.seed, num_samples=settings.eval_samples, elbo_samples=100)
    result = {
        "row": row.name, "num_samples": row.num_samples, "gradient": row.gradient, "steps": steps,
        "resumed_from_step": resumed_from,  # train_seconds covers the steps after it only
        "epochs": settings.epochs, "eval_points": int(test.shape[0]), "points": "spread", "eval_samples": settings.eval_samples,
        "log_likelihood": evaluation.log_likelihood, "log_likelihood_se": evaluation.log_likelihood_se,
        "elbo": evaluation.elbo, "kl": evaluation.kl, "active_units": evaluation.active_units,
        "train_seconds": train_seconds, "eval_seconds": time.perf_counter() - began,
        "per_point": np.asarray(evaluation.log_likelihood_per_point).tolist(),
    }
    result_path.write_text(json.dumps(result) + "\n")
    return result


class Settings(NamedTuple):
    epochs: int
    sample_counts: tuple
    batch_size: int = 100
    latent_dim: int = 50
    hidden: tuple = (200, 200)
    steps_per_call: int = 50
    checkpoint_every: int = 600
    eval_points: int = 1000
    eval_samples: int = 5000
    seed: int = 0


def load(args):
    """(training images uint8 (N, 784), binarized test subset float32 (M, 784), data description)."""
    if args.quick:
        dataset = data.load_embedded_mnist()
        description = "embedded MNIST subset (quick mode)"
    else:
        data_dir = args.data_dir
        if data_dir is None and (ROOT.parent / "shared" / "data" / "mnist").exists():
            data_dir = ROOT.parent / "shared" / "data"
        dataset = data.load_mnist(data_dir, download=args.download)
        description = f"MNIST, {dataset.train.images.shape[0]} training images, dynamically binarized"
    images = dataset.train.images.reshape(dataset.train.images.shape[0], -1)
    test = data.static_binarize(dataset.test.images.reshape(dataset.test.images.shape[0], -1), seed=0)
    return images, test, description


def paired(result: dict, reference: dict) -> tuple[float, float]:
    """Mean and standard error of the per-point difference to the reference row."""
    difference = np.asarray(result["per_point"]) - np.asarray(reference["per_point"])
    return float(difference.mean()), float(difference.std(ddof=1) / np.sqrt(difference.size))


def format_table(results: list[dict]) -> str:
    reference = next(r for r in results if r["row"] == "VAE" and r["num_samples"] == min(x["num_samples"] for x in results))
    header = (f"{'model':<10} {'K':>3} {'test log p(x), K=' + str(reference['eval_samples']):>24} "
              f"{'minus VAE K=' + str(reference['num_samples']) + ' (paired)':>26} {'active':>7} {'paper':>8} {'train':>8}")
    lines = [header, "-" * len(header)]
    for r in results:
        delta, delta_se = paired(r, reference)
        paper = PAPER.get((r["row"], r["num_samples"]))
        lines.append(
            f"{r['row']:<10} {r['num_samples']:>3} {r['log_likelihood']:>15.2f} ± {r['log_likelihood_se']:<6.2f} "
            f"{delta:>+17.2f} ± {delta_se:<6.2f} {r['active_units']:>7d} {'' if paper is None else f'{paper:.2f}':>8} "
            f"{r['train_seconds'] / 60:>6.1f} m"
        )
    return "\n".join(lines)


def checks(results: list[dict]) -> list[str]:
    """The orderings the short schedule should show, each with its paired z-score."""
    by = {(r["row"], r["num_samples"]): r for r in results}
    claims = []
    counts = sorted({r["num_samples"] for r in results})
    for low, high in zip(counts, counts[1:]):
        for name in ("IWAE", "IWAE-DReG"):
            a = by.get(("VAE", 1)) if (name, low) == ("IWAE", 1) else by.get((name, low))
            b = by.get((name, high))
            if a and b:
                delta, se = paired(b, a)
                claims.append(f"{name} K={high} above K={low}: {delta:+.2f} ± {se:.2f} nats ({delta / se:+.1f} SE)")
    top = counts[-1]
    for name in ("IWAE", "IWAE-DReG"):
        if (name, top) in by and ("VAE", top) in by:
            delta, se = paired(by[(name, top)], by[("VAE", top)])
            claims.append(f"{name} above VAE at K={top}: {delta:+.2f} ± {se:.2f} nats ({delta / se:+.1f} SE)")
    return claims


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = {(r["row"], r["num_samples"]): r for r in results}
    vae_k1 = by.get(("VAE", 1))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for i, name in enumerate(("VAE", "IWAE", "IWAE-DReG")):
        rows = sorted((r for r in results if r["row"] == name), key=lambda r: r["num_samples"])
        if name == "IWAE" and vae_k1 is not None:
            rows = [vae_k1, *rows]  # IWAE with K = 1 is the VAE with K = 1
        ks = [r["num_samples"] for r in rows]
        ax.errorbar(ks, [r["log_likelihood"] for r in rows], yerr=[r["log_likelihood_se"] for r in rows],
                    marker="o", capsize=3, color=f"C{i}", label=f"{name} (this run)")
    for i, name in enumerate(("VAE", "IWAE")):
        ks = sorted(k for (n, k) in PAPER if n == name)
        ax.plot(ks, [PAPER[(name, k)] for k in ks], linestyle=":", marker="x", color=f"C{i}", label=f"{name} (paper, 3,280 passes)")
    ax.set_xscale("log")
    ax.set_xlabel("K (training samples)")
    ax.set_ylabel("test log p(x), nats")
    ax.set_title(f"IWAE Table 1 on a short schedule ({results[0]['epochs']} epochs)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny settings on the embedded data, to check that it runs")
    parser.add_argument("--epochs", type=int, default=10, help="training epochs per model (default 10)")
    parser.add_argument("--eval-points", type=int, default=1000, help="test points (default 1000)")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--download", action="store_true")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    args.quick = args.quick or os.environ.get("ELBOJAX_QUICK") == "1"
    _report.capture(args.out, "iwae_mnist", "python benchmarks/iwae_mnist.py " + " ".join(sys.argv[1:]), quick=args.quick)
    if args.epochs < 1 or args.eval_points < 2:
        parser.error("--epochs must be >= 1 and --eval-points >= 2")

    if args.quick:
        settings = Settings(epochs=1, sample_counts=(2,), latent_dim=8, hidden=(32, 32), steps_per_call=10, checkpoint_every=10, eval_points=20, eval_samples=50)
    else:
        settings = Settings(epochs=args.epochs, sample_counts=(1, 5, 50), eval_points=args.eval_points)
    images, test, description = load(args)
    if args.quick:
        images = images[:200]
    test = test[spread(test.shape[0], settings.eval_points)]
    print(f"{description}; {settings.epochs} epoch(s) of {images.shape[0] // settings.batch_size} steps per model; "
          f"evaluation on {test.shape[0]} test points (binarized once, seed 0) with K = {settings.eval_samples}; "
          f"JAX {jax.__version__} on {jax.default_backend()}")
    results = []
    for row in rows_for(settings.sample_counts):
        print(f"{row.name} K={row.num_samples} ...", flush=True)
        results.append(train_and_evaluate(row, images, test, settings, args.out, progress=not args.no_progress))
    print()
    print(format_table(results))
    print()
    for claim in checks(results):
        print(claim)

    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "iwae_mnist.png")
    summary = {"description": description, "settings": settings._asdict(), "jax": jax.__version__,
               "results": [{k: v for k, v in r.items() if k != "per_point"} for r in results], "checks": checks(results)}
    (args.out / "iwae_mnist.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nwrote {args.out / 'iwae_mnist.png'} and {args.out / 'iwae_mnist.json'}")


if __name__ == "__main__":
    _report.run(main)
