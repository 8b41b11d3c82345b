"""`elbojax train` / `elbojax evaluate` end to end on a tiny setting, resumption, and bad flags."""

import json

import jax.numpy as jnp
import numpy as np
import pytest

from elbojax import cli

TINY = ["--steps", "20", "--steps-per-call", "10", "--checkpoint-every", "10", "--eval-points", "20",
        "--eval-samples", "50", "--latent-dim", "2", "--hidden", "32", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli.main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


def test_train_writes_a_complete_run_folder(run, capsys):
    for name in ("config.json", "metrics.jsonl", "evaluation.json", "training_curve.png", "reconstructions.png", "samples.png", "latent_space.png"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert np.isfinite(evaluation["log_likelihood"]) and evaluation["num_points"] == 20
    assert evaluation["elbo"] < evaluation["log_likelihood"] + 5 * evaluation["log_likelihood_se"]


def test_resume_continues_and_load_run_gives_the_model(run):
    assert cli.main(["train", "--run-dir", str(run), "--resume", *TINY[:1], "30", *TINY[2:]]) == 0
    assert json.loads((run / "config.json").read_text())["steps"] == 30
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
    model = cli.load_run(run)
    assert model.log_joint(jnp.zeros(784), jnp.zeros(2)).shape == ()


def test_evaluate_command(run, capsys):
    assert cli.main(["evaluate", str(run), "--eval-points", "10", "--eval-samples", "50"]) == 0
    assert "test log-likelihood (K=50)" in capsys.readouterr().out


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--latent-dim", "3", "--resume"], r"cannot resume .*latent_dim: checkpoint 2, flags 3"),
        ([], r"already holds a run; pass --resume"),
    ],
)
def test_incompatible_or_accidental_reuse_of_a_run_folder(run, flags, message):
    args = [a for a in TINY if a not in ("--latent-dim", "2")] if "--latent-dim" in flags else TINY
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--run-dir", str(run), *args, *flags])


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-samples", "0"], r"--num-samples must be >= 1, got 0"),
        (["--hidden", "a,b"], r"--hidden must be comma-separated positive integers, got 'a,b'"),
        (["--steps-per-call", "5", "--checkpoint-every", "7"], r"--checkpoint-every \(7\) must be a multiple of --steps-per-call \(5\)"),
        (["--learning-rate", "-1"], r"--learning-rate must be > 0"),
    ],
)
def test_bad_flags(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), *flags])


def test_resume_without_a_run(tmp_path):
    with pytest.raises(SystemExit, match=r"--resume given but .*config.json does not exist"):
        cli.main(["train", "--run-dir", str(tmp_path / "none"), "--resume"])


def test_evaluate_needs_a_run_folder(tmp_path):
    with pytest.raises(SystemExit, match=r"is not a run folder"):
        cli.main(["evaluate", str(tmp_path)])
