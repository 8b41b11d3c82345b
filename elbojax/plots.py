"""The pictures a person wants after training: curves, reconstructions, samples, the latent space.

Each function writes one PNG (a bare matplotlib `Figure`, so pyplot's state and a notebook's
inline backend are left alone) and returns its path. The model is any
`elbojax.models.VAE`-like module with `proposal(x)`, `reconstruct(key, x)` and
`sample_prior(key, n)` for 28 x 28 images.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np


class _Figures:
    """`subplots` on a bare `matplotlib.figure.Figure`: no pyplot state, no backend switch (a
    notebook's inline plotting keeps working), nothing to close."""

    @staticmethod
    def subplots(*args, figsize=None, **kwargs):
        from matplotlib.figure import Figure

        fig = Figure(figsize=figsize)
        return fig, fig.subplots(*args, **kwargs)


def _pyplot():
    return _Figures


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _compiled(model, fn, *args):
    """`fn(model, *args)` as one compiled call, the model's state an argument.

    Called eagerly, each operation of the model would be compiled on its own: seconds for a
    handful of images."""
    from flax import nnx

    graphdef, state = nnx.split(model)
    return jax.jit(lambda state, *args: fn(nnx.merge(graphdef, state), *args))(state, *args)


def _grid(images, columns: int):
    """Tile `(n, 784)` images into one `(rows*28, columns*28)` array."""
    images = np.asarray(images).reshape(-1, 28, 28)
    rows = -(-images.shape[0] // columns)
    canvas = np.zeros((rows * 28, columns * 28))  # empty cells white under gray_r
    for i, image in enumerate(images):
        r, c = divmod(i, columns)
        canvas[r * 28 : (r + 1) * 28, c * 28 : (c + 1) * 28] = image
    return canvas


def _metrics_record(line: str) -> dict | None:
    """One line of `metrics.jsonl`, or None for a line that is not a whole record (the last line
    of a run killed while writing it, which a resume drops)."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def training_curve(run_dir: Path) -> Path | None:
    """The training objective and the KL per step from `metrics.jsonl` (and the KL weight when annealed).

    None (no plot) for a run folder without metrics, or with none recorded yet.
    """
    plt = _pyplot()
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        return None
    records = [record for record in map(_metrics_record, metrics.read_text().splitlines()) if record is not None]
    if not records:
        return None
    steps = [r["step"] for r in records]
    value = lambda record, name: float("nan") if record.get(name) is None else record[name]  # null: all skipped
    kls = [value(r, "kl") for r in records]
    marker = "o" if len(records) < 20 else None  # a single record is a point: a line alone would not show it
    fig, (bound_ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 4))
    bound_ax.plot(steps, [value(r, "objective") for r in records], marker=marker)
    bound_ax.set_ylabel("training objective (nats, batch mean)")
    bound_ax.set_title("Training curve")
    kl_ax.plot(steps, kls, color="C1", marker=marker)
    kl_ax.set_ylabel("KL(q || p) (nats, batch mean)")
    kl_ax.set_title("KL term")
    weights = [r.get("kl_weight", 1.0) for r in records]
    if any(w != 1.0 for w in weights):
        weight_ax = kl_ax.twinx()
        weight_ax.plot(steps, weights, color="C2", linestyle="--", marker=marker)
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
    count = x.shape[0]  # fewer test points than `count`: one column each
    keys = jax.random.split(jax.random.key(seed), count)
    recon = _compiled(model, lambda model, keys, x: jax.vmap(model.reconstruct)(keys, x), keys, x)
    fig, ax = plt.subplots(figsize=(max(count, 3), 2.2))
    ax.imshow(_grid(np.concatenate([np.asarray(x), np.asarray(recon)]), count), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title("test inputs (top) and reconstructions (bottom)")
    ax.axis("off")
    path = run_dir / "reconstructions.png"
    return _save(fig, path)


def samples(run_dir: Path, model, *, seed: int, count: int = 64) -> Path:
    """E[x | z] for z drawn from the prior."""
    plt = _pyplot()
    _, means = _compiled(model, lambda model, key: model.sample_prior(key, count), jax.random.key(seed + 1))
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


def latent_space(run_dir: Path, model, test, labels) -> Path | None:
    """E_q[z] of the test points: the two coordinates if the latent is 2-D, else a PCA projection.

    None (no plot) for a proposal without a closed-form mean, such as a flow."""
    plt = _pyplot()
    try:
        means = np.asarray(_compiled(model, lambda model, x: jax.vmap(lambda x: _proposal_mean(model.proposal(x)))(x), jnp.asarray(test)))
    except NotImplementedError:  # e.g. a flow proposal: distrax has no closed-form mean
        return None
    if means.shape[1] == 2:
        points, axes = means, ("z1", "z2")
    elif means.shape[1] == 1:  # a 1-D latent: z1 against the label (or on a line)
        other = np.zeros(len(means)) if labels is None else np.asarray(labels, float)
        points, axes = np.column_stack([means[:, 0], other]), ("z1", "class" if labels is not None else "")
    else:
        centred = means - means.mean(0)
        _, _, vt = np.linalg.svd(centred, full_matrices=False)
        points = centred @ vt[:2].T  # fewer than 2 components with fewer than 2 points: padded with 0
        points = np.pad(points, ((0, 0), (0, 2 - points.shape[1])))
        axes = ("principal component 1", "principal component 2")
    fig, ax = plt.subplots(figsize=(6, 5))
    colours, num_classes = {}, 0
    if labels is not None:  # class c has colour c whichever classes the points happen to include
        num_classes = max(10, int(np.max(labels)) + 1)
        colours = {"c": labels, "cmap": "tab10" if num_classes == 10 else "tab20", "vmin": -0.5, "vmax": num_classes - 0.5}
    scatter = ax.scatter(points[:, 0], points[:, 1], s=6, **colours)
    if labels is not None:
        fig.colorbar(scatter, ax=ax, label="class", ticks=range(num_classes))
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
    written = [
        training_curve(run_dir),
        reconstructions(run_dir, model, test, seed=seed),
        samples(run_dir, model, seed=seed),
        latent_space(run_dir, model, test, labels),
    ]
    return [path for path in written if path is not None]


# ------------------------------------------------------------------------------------------------
# Partly observed digits and class-conditional samples (elbojax.missing, elbojax.models.conditional).
# These build a `matplotlib.figure.Figure` without pyplot (so a notebook's backend is left alone):
# with `path` they write a PNG and return its path, without it they return the figure.
# ------------------------------------------------------------------------------------------------

_MISSING_TINT = np.array([0.55, 0.75, 1.0])  # the colour of a hidden pixel


def _figure_out(fig, path):
    fig.tight_layout()
    if path is None:
        return fig
    path = Path(path)
    fig.savefig(path, dpi=110)
    return path


def _rgb(image, mask, tint: float):
    """A grey-level image `(h, w)` in [0, 1] (1 = ink) as RGB, the pixels where `mask` is False tinted."""
    grey = np.repeat((1.0 - np.clip(image, 0.0, 1.0))[..., None], 3, axis=-1)
    tinted = (1.0 - tint) * grey + tint * _MISSING_TINT
    return np.where(mask[..., None], grey, tinted)


def completions(truth, mask, completed, *, effective_sample_size=None, path=None, title=None, image_shape=(28, 28)):
    """Partly hidden images completed by a model, several completions each, next to the truth.

    One row per image: the truth, what the model saw (hidden pixels in blue), then the
    completions, whose imputed pixels are tinted light blue. With `effective_sample_size`, each
    row is labelled with its importance sampler's ESS (`elbojax.missing.impute`).

    Args:
      truth: `(n, D)` the complete images, values in [0, 1].
      mask: `(n, D)` or `(D,)` bool, `True` = observed.
      completed: `(n, M, D)` the completions (e.g. `Imputation.means` or `.samples`).
      effective_sample_size: optional `(n,)`.
      path: where to write the PNG; `None` returns the `matplotlib.figure.Figure`.
      title: the figure's title.
      image_shape: `(height, width)` of one image.

    Returns:
      `path`, or the figure.
    """
    from matplotlib.figure import Figure

    truth = np.asarray(truth, np.float64)
    completed = np.asarray(completed, np.float64)
    if truth.ndim != 2 or completed.ndim != 3 or completed.shape[0] != truth.shape[0] or completed.shape[2] != truth.shape[1]:
        raise ValueError(f"`truth` must be (n, D) and `completed` (n, M, D); got {truth.shape} and {completed.shape}.")
    num, num_completions = completed.shape[:2]
    mask = np.broadcast_to(np.asarray(mask, bool), truth.shape)
    shape = tuple(image_shape)
    columns = 2 + num_completions
    fig = Figure(figsize=(0.9 * columns + 0.6, 0.95 * num + 0.5))
    axes = fig.subplots(num, columns, squeeze=False)
    for row in range(num):
        hidden = mask[row].reshape(shape)
        panels = [_rgb(truth[row].reshape(shape), np.ones(shape, bool), 0.0), _rgb(truth[row].reshape(shape) * hidden, hidden, 1.0)]
        panels += [_rgb(completed[row, m].reshape(shape), hidden, 0.25) for m in range(num_completions)]
        for col, panel in enumerate(panels):
            ax = axes[row, col]
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_visible(True)
                spine.set_color("0.8")
        if effective_sample_size is not None:
            axes[row, 0].set_ylabel(f"ESS {float(np.asarray(effective_sample_size)[row]):.1f}", fontsize=7)
    for col, name in enumerate(["truth", "observed"] + [f"completion {m + 1}" for m in range(num_completions)]):
        axes[0, col].set_title(name, fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    return _figure_out(fig, path)


def class_conditional_samples(images, *, class_names=None, path=None, title=None, image_shape=(28, 28)):
    """Samples of a class-conditional model as a grid: one row per class.

    Args:
      images: `(C, M, D)`, `M` samples (e.g. $\\mathbb{E}[x \\mid z, y]$) of each of `C` classes,
        values in [0, 1] (1 = ink).
      class_names: optional `C` row labels (default: 0 .. C-1).
      path: where to write the PNG; `None` returns the `matplotlib.figure.Figure`.
      title: the figure's title.
      image_shape: `(height, width)` of one image.

    Returns:
      `path`, or the figure.
    """
    from matplotlib.figure import Figure

    images = np.asarray(images, np.float64)
    if images.ndim != 3:
        raise ValueError(f"`images` must have shape (C, M, D), got {images.shape}.")
    num_classes, num_samples, _ = images.shape
    height, width = image_shape
    canvas = images.reshape(num_classes, num_samples, height, width).transpose(0, 2, 1, 3).reshape(num_classes * height, num_samples * width)
    names = [str(c) for c in range(num_classes)] if class_names is None else [str(n) for n in class_names]
    if len(names) != num_classes:
        raise ValueError(f"`class_names` must name the {num_classes} classes, got {len(names)}.")
    fig = Figure(figsize=(0.55 * num_samples + 0.8, 0.55 * num_classes + 0.5))
    ax = fig.subplots()
    ax.imshow(canvas, cmap="gray_r", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_yticks((np.arange(num_classes) + 0.5) * height, names)
    ax.set_xticks([])
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    return _figure_out(fig, path)
