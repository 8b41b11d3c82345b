"""The run plots on edge cases: a 1-D latent, a single test point, fewer points than a row."""

import numpy as np
import pytest
from flax import nnx

from elbojax import models, plots


def _vae(latent_dim):
    rngs = nnx.Rngs(0)
    return models.VAE(
        models.GaussianMLPEncoder(784, latent_dim, (8,), rngs=rngs),
        models.BernoulliMLPDecoder(latent_dim, 784, (8,), rngs=rngs),
        models.StandardNormalPrior(latent_dim),
    )


TEST = (np.random.default_rng(0).random((5, 784)) > 0.5).astype(np.float32)
LABELS = np.arange(5)


@pytest.mark.parametrize("latent_dim, points, labels", [(1, 5, LABELS), (1, 5, None), (3, 1, LABELS[:1]), (3, 5, None)])
def test_latent_space_of_a_1d_latent_or_a_single_point(tmp_path, latent_dim, points, labels):
    """A 1-D latent or a single point has fewer than two principal components (it raised IndexError)."""
    path = plots.latent_space(tmp_path, _vae(latent_dim), TEST[:points], labels)
    assert path.exists() and path.stat().st_size > 0


def test_reconstructions_of_fewer_points_than_a_row_take_one_column_each(tmp_path):
    """Three inputs: inputs on top, reconstructions below, three columns (it drew one row of six
    and a black block)."""
    grid = plots._grid(np.ones((6, 784)), 3)
    assert grid.shape == (56, 84) and grid.min() == 1.0
    assert plots._grid(np.ones((3, 784)), 2)[28:, 28:].max() == 0.0  # an empty cell is white under gray_r
    path = plots.reconstructions(tmp_path, _vae(2), TEST[:3], seed=0)
    assert path.exists()
    import matplotlib.image

    height, width = matplotlib.image.imread(path).shape[:2]
    assert width <= 1.5 * height  # a figure three columns wide, not ten


def test_training_curve_without_metrics_is_no_plot_and_a_single_record_shows(tmp_path):
    """No metrics.jsonl (a folder of config and checkpoints only): no curve, the other plots still
    come (it raised FileNotFoundError). One record is drawn as a marker (a line alone was invisible)."""
    assert plots.training_curve(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text("")
    assert plots.training_curve(tmp_path) is None
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "objective": -500.0, "kl": 3.0, "kl_weight": 1.0}\n')
    path = plots.training_curve(tmp_path)
    import matplotlib.image

    image = matplotlib.image.imread(path)[..., :3]
    blue = (np.abs(image - np.array([0.12, 0.47, 0.71])) < 0.08).all(-1)  # matplotlib's C0
    orange = (np.abs(image - np.array([1.0, 0.5, 0.05])) < 0.08).all(-1)  # C1
    assert blue.sum() > 20 and orange.sum() > 20


def test_a_metrics_line_cut_short_by_a_kill_is_left_out_of_the_curve(tmp_path):
    """`elbojax evaluate` died with a JSONDecodeError traceback on it (a resume drops such a line)."""
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "objective": -500.0, "kl": 3.0, "kl_weight": 1.0}\n{"step": 20, "objec')
    assert plots.training_curve(tmp_path).exists()
    (tmp_path / "metrics.jsonl").write_text('{"step": 10, "objec')
    assert plots.training_curve(tmp_path) is None  # nothing whole to draw


def test_a_class_keeps_its_colour_whichever_classes_are_plotted(tmp_path, monkeypatch):
    """The colours spanned the labels present: with classes 2, 5, 6 and 9 only, class 2 took
    class 0's colour, and the colour bar said "digit" for Fashion-MNIST too."""
    import matplotlib.axes
    import matplotlib.figure

    scattered, bars = [], []
    real_scatter, real_colorbar = matplotlib.axes.Axes.scatter, matplotlib.figure.Figure.colorbar
    monkeypatch.setattr(matplotlib.axes.Axes, "scatter", lambda self, *a, **k: scattered.append(k) or real_scatter(self, *a, **k))
    monkeypatch.setattr(matplotlib.figure.Figure, "colorbar", lambda self, *a, **k: bars.append(k) or real_colorbar(self, *a, **k))
    plots.latent_space(tmp_path, _vae(2), TEST[:4], np.array([9, 6, 2, 5]))
    assert (scattered[-1]["vmin"], scattered[-1]["vmax"], scattered[-1]["cmap"]) == (-0.5, 9.5, "tab10")
    assert bars[-1]["label"] == "class" and list(bars[-1]["ticks"]) == list(range(10))
