"""The pictures a person wants after training: curves, reconstructions, samples, the latent space.

Each function writes one PNG with matplotlib's Agg backend and returns its path. The model is any
`elbojax.models.VAE`-like module with `proposal(x)`, `reconstruct(key, x)` and
`sample_prior(key, n)` for 28 x 28 images.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def _grid(images, columns: int):
    """Tile `(n, 784)` images into one `(rows*28, columns*28)` array."""
    images = np.asarray(images).reshape(-1, 28, 28)
    rows = -(-images.shape[0] // columns)
    canvas = np.ones((rows * 28, columns * 28))
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = image
    return canvas


def training_curve(run_dir: Path) -> Path:
    """The training objective and the KL per step from `metrics.jsonl` (and the KL weight when annealed)."""
    plt = _pyplot()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r["step"] for r in records]
    kls = [r.get("kl", float("nan")) for r in records]
    fig, (bound_ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 4))
    bound_ax.plot(steps, [r["objective"] for r in records])
    bound_ax.set_ylabel("training objective (nats, batch mean)")
    bound_ax.set_title("Training curve")
    kl_ax.plot(steps, kls, color="C1")
    kl_ax.set_ylabel("KL(q || p) (nats, batch mean)")
    kl_ax.set_title("KL term")
    weights = [r.get("kl_weight", 1.0) for r in records]
    if any(w != 1.0 for w in weights):
        weight_ax = kl_ax.twinx()
        weight_ax.plot(steps, weights, color="C2", linestyle="--")
        weight_ax.set_ylabel("KL weight (dashed)")
    for ax in (bound_ax, kl_ax):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = run_dir / "training_curve.png"
    return _save(fig, path)


def reconstructions(run_dir: Path, model, test, *, seed: int, count: int = 10) -> Path:
    """Inputs (top row) next to their reconstructions E[x | z], z ~ q(z | x) (bottom row)."""
    plt = _pyplot()
    x = jnp.asarray(test[:count])
    recon = jax.vmap(model.reconstruct)(jax.random.split(jax.random.key(seed), x.shape[0]), x)
    fig, ax = plt.subplots(figsize=(count, 2.2))
    ax.imshow(_grid(np.concatenate([np.asarray(x), np.asarray(recon)]), count), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("test inputs (top) and reconstructions (bottom)")
    ax.axis("off")
    path = run_dir / "reconstructions.png"
    return _save(fig, path)


def samples(run_dir: Path, model, *, seed: int, count: int = 64) -> Path:
    """E[x | z] for z drawn from the prior."""
    plt = _pyplot()
    _, means = model.sample_prior(jax.random.key(seed + 1), count)
    fig, ax = plt.subplots(figsize=(6, 6))
    ax.imshow(_grid(means, 8), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("samples: E[x | z], z ~ p(z)")
    ax.axis("off")
    path = run_dir / "samples.png"
    return _save(fig, path)


def _proposal_mean(proposal):
    """E_q[z]; for a hierarchical proposal, the mean of its first layer, E_q[z1]."""
    first = getattr(proposal, "first", None)
    return (first if first is not None else proposal).mean()


def latent_space(run_dir: Path, model, test, labels) -> Path:
    """E_q[z] of the test points: the two coordinates if the latent is 2-D, else a PCA projection."""
    plt = _pyplot()
    means = np.asarray(jax.vmap(lambda x: _proposal_mean(model.proposal(x)))(jnp.asarray(test)))
    if means.shape[1] == 2:
        points, axes = means, ("z1", "z2")
    else:
        centred = means - means.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points, axes = centred @ vt[:2].T, ("principal component 1", "principal component 2")
    fig, ax = plt.subplots(figsize=(6, 5))
    scatter = ax.scatter(points[:, 0], points[:, 1], c=labels if labels is not None else None, cmap="tab10", s=6)
    if labels is not None:
        fig.colorbar(scatter, ax=ax, label="digit")
    ax.set_xlabel(axes[0])
    ax.set_ylabel(axes[1])
    ax.set_title("latent space: E_q[z | x] of test points")
    path = run_dir / "latent_space.png"
    return _save(fig, path)


def write_run_plots(run_dir, graphdef, params, test, labels, *, seed: int = 0) -> list[Path]:
    """All four plots of a run; returns their paths."""
    from flax import nnx

    run_dir = Path(run_dir)
    model = nnx.merge(graphdef, params)
    return [
        training_curve(run_dir),
        reconstructions(run_dir, model, test, seed=seed),
        samples(run_dir, model, seed=seed),
        latent_space(run_dir, model, test, labels),
    ]
