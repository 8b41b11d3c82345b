"""`elbojax train` / `elbojax evaluate` end to end on a tiny setting, resumption, and bad flags."""

import json
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from elbojax import cli
from helpers import interrupt_fetching

TINY = ["--steps", "20", "--steps-per-call", "10", "--checkpoint-every", "10", "--eval-points", "20",
        "--eval-samples", "50", "--latent-dim", "2", "--hidden", "32", "--no-progress"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    assert cli.main(["train", "--run-dir", str(run_dir), *TINY]) == 0
    return run_dir


def test_train_writes_a_complete_run_folder(run, capsys):
    for name in ("config.json", "environment.json", "metrics.jsonl", "evaluation.json", "training_curve.png", "reconstructions.png", "samples.png", "latent_space.png"):
        assert (run / name).exists(), name
    assert sorted(p.name for p in (run / "checkpoints").iterdir() if p.name.isdigit()) == ["10", "20"]
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert np.isfinite(evaluation["log_likelihood"]) and evaluation["num_points"] == 20
    assert evaluation["elbo"] < evaluation["log_likelihood"] + 5 * evaluation["log_likelihood_se"]
    (environment,) = json.loads((run / "environment.json").read_text())
    assert environment["packages"]["jax"] == jax.__version__ and environment["command"][:2] == ["elbojax", "train"]
    assert "git_revision" in environment
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["kl"]) and r["kl"] > 0 and r["kl_weight"] == 1.0 for r in records)


def test_resume_continues_and_load_run_gives_the_model(run):
    assert cli.main(["train", "--run-dir", str(run), "--resume", *TINY[:1], "30", *TINY[2:]]) == 0
    assert json.loads((run / "config.json").read_text())["steps"] == 30
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20, 30]
    model = cli.load_run(run)
    assert model.log_joint(jnp.zeros(784), jnp.zeros(2)).shape == ()
    assert len(json.loads((run / "environment.json").read_text())) == 2  # the start, then the resume


def test_resume_keeps_the_runs_own_length_and_settings(run, capsys):
    """A plain --resume neither shortens the run to the default length nor takes other flags."""
    steps = json.loads((run / "config.json").read_text())["steps"]
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--beta", "3", *TINY[2:]]) == 0
    assert json.loads((run / "config.json").read_text())["steps"] == steps
    assert "ignoring --beta" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"--steps 10 is before the run's last checkpoint"):
        cli.main(["train", "--run-dir", str(run), "--resume", "--steps", "10", *TINY[2:]])


def test_a_plain_resume_takes_the_runs_own_model_settings(run, capsys):
    """Settings left off the command line come from the run's config.json, not the flags' defaults."""
    quick = ["--no-progress", "--eval-points", "5", "--eval-samples", "10"]
    assert cli.main(["train", "--run-dir", str(run), "--resume", *quick]) == 0
    assert json.loads((run / "config.json").read_text())["latent_dim"] == 2
    # Given flags are recognised however they are spelled: --flag=value and abbreviations.
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--beta=3", "--lr-warm", "5", "--latent-dim=2", *quick]) == 0
    assert "ignoring --beta, --lr-warmup\n" in capsys.readouterr().out
    config = _config_file(run.parent, {"lr_warmup": 7})  # from a --config file: said so
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--beta=3", "--config", config, *quick]) == 0
    assert f"ignoring --beta, --lr-warmup (set in --config {config})\n" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"cannot resume .*latent_dim: checkpoint 2, flags 3"):
        cli.main(["train", "--run-dir", str(run), "--resume", "--latent-d=3", *quick])
    with pytest.raises(SystemExit, match=r"cannot resume .*hidden: checkpoint \[32\], flags \[8\]"):
        cli.main(["train", "--run-dir", str(run), "--resume", "--config", _config_file(run.parent, {"hidden": [8]}), *quick])
    # An ignored flag is not checked against the run's own settings (steps per call against its
    # checkpoint interval, free bits against its IWAE objective): it is ignored, as it says.
    saved = json.loads((run / "config.json").read_text())
    bigger = str(saved["checkpoint_every"] * 2)
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--steps-per-call", bigger, "--free-bits", "0.5", *quick]) == 0
    assert "ignoring --free-bits, --steps-per-call" in capsys.readouterr().out


def test_a_batch_larger_than_the_data_writes_no_run(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(SystemExit, match=r"--batch-size \(20000\) exceeds the 10000 training examples"):
        cli.main(["train", "--run-dir", str(run_dir), *TINY, "--batch-size", "20000"])
    assert not (run_dir / "config.json").exists()


def test_the_data_folder_is_the_runs_own_unless_given(tmp_path, monkeypatch):
    """config.json keeps --data-dir, so evaluate, impute and load_run find the data; --data-dir overrides it."""
    folders = []
    load_dataset = cli._load_dataset  # what the commands and load_run all load through
    # "mnist" is read from the embedded subset (--data embedded refuses --data-dir: it has no files).
    monkeypatch.setattr(cli, "_load_dataset", lambda name, data_dir, download: folders.append(data_dir) or load_dataset("embedded", None, False))
    run_dir, data_dir = tmp_path / "r", tmp_path / "data"
    assert cli.main(["train", "--run-dir", str(run_dir), *TINY, "--steps", "10", "--eval-points", "5", "--eval-samples", "10", "--data", "mnist", "--data-dir", str(data_dir)]) == 0
    assert json.loads((run_dir / "config.json").read_text())["data_dir"] == str(data_dir.absolute())
    folders.clear()
    assert cli.main(["evaluate", str(run_dir), "--eval-points", "5", "--eval-samples", "10"]) == 0
    assert cli.main(["evaluate", str(run_dir), "--eval-points", "5", "--eval-samples", "10", "--data-dir", str(tmp_path / "moved")]) == 0
    assert cli.main(["impute", str(run_dir), "--points", "1", "--imputations", "1", "-k", "10", "--data-dir", str(tmp_path / "moved")]) == 0
    cli.load_run(run_dir)
    assert [None if f is None else str(f) for f in folders] == [str(data_dir.absolute()), str(tmp_path / "moved"), str(tmp_path / "moved"), str(data_dir.absolute())]


def test_an_incompatible_model_and_objective_write_no_run(tmp_path):
    run_dir = tmp_path / "r"
    with pytest.raises(SystemExit, match=r"kl='analytic' needs a closed-form KL"):
        cli.main(["train", "--run-dir", str(run_dir), *TINY, "--objective", "elbo", "--kl", "analytic", "--prior", "mixture"])
    with pytest.raises(SystemExit, match=r"Free bits need the KL in closed form"):
        cli.main(["train", "--run-dir", str(run_dir), *TINY, "--objective", "elbo", "--free-bits", "0.1", "--prior", "vamp"])
    assert not (run_dir / "config.json").exists()


def test_a_plain_resume_evaluates_as_the_run_did(run):
    """The evaluation settings are the run's own (config.json) unless given (it used K = 5000 on 500 points)."""
    saved = json.loads((run / "config.json").read_text())
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--no-progress"]) == 0
    evaluation = json.loads((run / "evaluation.json").read_text())
    assert (evaluation["num_samples"], evaluation["num_points"]) == (saved["eval_samples"], saved["eval_points"])
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--no-progress", "--eval-points", "3"]) == 0
    assert json.loads((run / "evaluation.json").read_text())["num_points"] == 3
    assert json.loads((run / "config.json").read_text())["eval_points"] == 3


def test_evaluate_command(run, capsys):
    assert cli.main(["evaluate", str(run), "--eval-points", "10", "--eval-samples", "50"]) == 0
    assert "test log-likelihood (K=50)" in capsys.readouterr().out


def test_impute_completes_hidden_halves(run, capsys):
    assert cli.main(["impute", str(run), "--points", "3", "--imputations", "2", "-k", "50", "--hide", "top"]) == 0
    out = capsys.readouterr().out
    assert "effective sample size per digit" in out and (run / "completions_top.png").stat().st_size > 5_000
    record = json.loads((run / "completions_top.json").read_text())
    assert len(record["effective_sample_size"]) == 3 and all(1 <= e <= 50 + 1e-3 for e in record["effective_sample_size"])
    with pytest.raises(SystemExit, match=r"--points must be >= 1"):
        cli.main(["impute", str(run), "--points", "0"])
    for seed in ("-1", str(2**32)):  # were the streams of seeds 2**32 - 1 and 0
        with pytest.raises(SystemExit, match=r"--seed must be in \[0, 2\*\*32\)"):
            cli.main(["impute", str(run), "--seed", seed])


def test_evaluate_reports_the_inference_gaps(run, capsys):
    assert cli.main(["evaluate", str(run), "--eval-points", "5", "--eval-samples", "50", "--gaps", "--gap-points", "4", "--gap-steps", "20"]) == 0
    out = capsys.readouterr().out
    assert "amortization" in out.lower() and (run / "gaps.png").stat().st_size > 5_000
    record = json.loads((run / "gaps.json").read_text())["gaps"]
    assert {"approximation_gap", "amortization_gap"} <= set(record)
    assert record["amortization_gap"]["mean"] > -3 * record["amortization_gap"]["se"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--latent-dim", "3", "--resume"], r"cannot resume .*latent_dim: checkpoint 2, flags 3"),
        (["--optimizer", "sgd", "--resume"], r"cannot resume .*optimizer: checkpoint 'adam', flags 'sgd'"),
        (["--prior", "mixture", "--resume"], r"cannot resume .*prior: checkpoint 'standard', flags 'mixture'"),
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
        (["--learning-rate", "inf"], r"--learning-rate must be > 0 and finite in float32 .*got inf"),
        (["--learning-rate", "1e39"], r"--learning-rate must be > 0 and finite in float32 .*got 1e\+39"),
        (["--beta", "inf"], r"--beta must be >= 0 and finite in float32"),
        (["--objective", "elbo", "--free-bits", "1e39"], r"--free-bits must be >= 0 and finite in float32"),
        (["--free-bits", "0.5"], r"Free bits apply to the ELBO with the KL in closed form only"),
        (["--objective", "elbo", "--kl", "monte_carlo", "--free-bits", "0.5"], r"Free bits apply to the ELBO"),
        (["--beta", "-1"], r"--beta must be >= 0"),
        (["--kl-warmup", "-5"], r"--kl-warmup must be >= 0"),
        (["--model", "two-layer", "--prior", "vamp"], r"--model two-layer has its own hierarchical prior"),
        (["--model", "two-layer", "--latent-dim", "2"], r"--model two-layer has the IWAE paper's fixed sizes .*--latent-dim apply"),
        (["--model", "two-layer", "--hidden", "8"], r"--hidden apply to --model vae only"),
        # Accepted, recorded in config.json and ignored, before:
        (["--prior-components", "7"], r"--prior-components applies to --prior mixture or vamp .*this run's prior is standard"),
        (["--model", "two-layer", "--prior-components", "7"], r"--prior-components applies .*the two-layer model's own"),
        (["--data-dir", "/nonexistent"], r"--data embedded is shipped inside the package; --data-dir and --download apply to --data mnist"),
        (["--download"], r"--data-dir and --download apply to --data mnist"),
        # An OverflowError traceback in the first step, the run folder already written:
        (["--lr-warmup", "3000000000"], r"--lr-warmup must be < 2\*\*31 \(steps are counted in int32\), got 3000000000"),
        (["--kl-warmup", str(2**31)], r"--kl-warmup must be < 2\*\*31"),
        (["--steps", str(2**31)], r"--steps must be < 2\*\*31"),
        (["--seed", "-1"], r"--seed must be in \[0, 2\*\*32\), got -1"),
        (["--seed", str(2**32 + 7)], r"--seed must be in \[0, 2\*\*32\)"),
    ],
)
def test_bad_flags(tmp_path, flags, message):
    """Refused before anything is written (a negative seed used to crash after the run folder was)."""
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), *flags])
    assert not (tmp_path / "r").exists()


def test_a_run_stopped_by_non_finite_steps_is_a_clear_error(tmp_path):
    """The stop's message, without a traceback, and what to do about it on the command line."""
    flags = TINY[2:]  # all but --steps 20
    with pytest.raises(SystemExit, match=r"elbojax: Stopped at step \d+: .* for a lower --learning-rate, start a new run"):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), *flags, "--steps", "400", "--learning-rate", "1e30"])


def test_a_two_layer_runs_own_config_is_a_valid_config(tmp_path):
    """Its config.json records the one-layer sizes' defaults: those are not refused, other sizes are."""
    own = _config_file(tmp_path, {"model": "two-layer", "latent_dim": 16, "hidden": [200, 200]})
    cli._config_from(cli._parse(["train", "--config", own, "--run-dir", str(tmp_path / "again")]))
    other = _config_file(tmp_path, {"model": "two-layer", "latent_dim": 4})
    with pytest.raises(SystemExit, match=r"--latent-dim apply to --model vae only"):
        cli._config_from(cli._parse(["train", "--config", other, "--run-dir", str(tmp_path / "again")]))


def test_evaluation_points_are_spread_over_the_test_set():
    """Binarized MNIST's test file is sorted by class: the first 500 points are all zeros."""
    chosen = cli.spread(10_000, 500)
    assert len(set(chosen.tolist())) == 500 and chosen[0] == 0 and chosen[-1] == 9_999
    assert np.diff(chosen).max() <= 21
    np.testing.assert_array_equal(cli.spread(5, 10), np.arange(5))
    labels = np.repeat(np.arange(10), 1_000)  # sorted by class, as the file is
    assert set(labels[cli.spread(10_000, 500)].tolist()) == set(range(10))


def test_data_errors_and_a_run_without_a_checkpoint_are_clear_errors(run, tmp_path):
    """A missing data file names --download; evaluate and impute on a run killed before its
    first checkpoint say so (they were tracebacks)."""
    with pytest.raises(SystemExit, match=r"elbojax: --data mnist: Data file .* not found.*\(on the command line: add --download, or give --data-dir FOLDER\)"):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--data", "mnist", "--data-dir", str(tmp_path / "empty")])
    corrupt = tmp_path / "corrupt"
    (corrupt / "binarized_mnist").mkdir(parents=True)
    for split in ("train", "valid", "test"):
        (corrupt / "binarized_mnist" / f"binarized_mnist_{split}.amat").write_text("0 1\n")
    with pytest.raises(SystemExit, match=r"elbojax: --data binarized-mnist: .*sha256.*download=True.* \(on the command line: add --download"):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--data", "binarized-mnist", "--data-dir", str(corrupt)])
    # evaluate and impute have no --download (and `elbojax train --download` was refused with the
    # default embedded data): they name --data-dir and the loader that downloads.
    on_files = _copy_run(run, tmp_path / "on_files", lambda c: {**c, "data": "mnist", "data_dir": str(tmp_path / "empty")})
    for command in ("evaluate", "impute"):
        with pytest.raises(SystemExit, match=r"elbojax: this run's data \(mnist\): Data file .* not found.*\(give --data-dir FOLDER, or fetch the files once: "
                                              r"python -c \"from elbojax import data; data.load_mnist\(download=True\)\"\)$"):
            cli.main([command, str(on_files)])
    run_dir = tmp_path / "early"
    run_dir.mkdir()
    (run_dir / "config.json").write_text((run / "config.json").read_text())  # a run killed before its first checkpoint
    for command in (["evaluate", str(run_dir)], ["impute", str(run_dir)]):
        with pytest.raises(SystemExit, match=r"has no checkpoint yet .*--resume"):
            cli.main(command)


def test_an_unknown_choice_is_an_argparse_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--optimizer", "lion"])
    assert exit_info.value.code == 2 and "invalid choice: 'lion'" in capsys.readouterr().err


def test_resume_without_a_run(tmp_path):
    with pytest.raises(SystemExit, match=r"--resume given but .*config.json does not exist"):
        cli.main(["train", "--run-dir", str(tmp_path / "none"), "--resume"])


def test_evaluate_needs_a_run_folder(tmp_path):
    with pytest.raises(SystemExit, match=r"is not a run folder"):
        cli.main(["evaluate", str(tmp_path)])


def _config_file(tmp_path, settings):
    path = tmp_path / "settings.json"
    path.write_text(settings if isinstance(settings, str) else json.dumps(settings))
    return str(path)


@pytest.mark.parametrize(
    "settings, message",
    [
        ({"num_sample": 3}, r"unknown settings \['num_sample'\]"),
        ({"steps": "many"}, r"steps must be an integer, got 'many'"),
        ({"steps": 1.5}, r"steps must be an integer, got 1.5"),
        ({"no_progress": "false"}, r"no_progress must be true or false, got 'false'"),
        ({"beta": True}, r"beta must be a number, got True"),
        ({"optimizer": "lion"}, r"optimizer must be one of .*got 'lion'"),
        ("{not json", r"is not valid JSON"),
        ("[1, 2]", r"must hold a JSON object"),
    ],
)
def test_bad_config_files(tmp_path, settings, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--config", _config_file(tmp_path, settings)])


def test_missing_config_file(tmp_path):
    with pytest.raises(SystemExit, match=r"does not exist"):
        cli.main(["train", "--config", str(tmp_path / "none.json")])


def test_a_resume_named_in_a_config_file_with_a_home_path(run, tmp_path, monkeypatch):
    """`--config` with run_dir "~/..." and `--resume`: the run's own settings come in and the
    run folder stays the home folder's (not a relative folder named "~")."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "config.json").write_text((run / "config.json").read_text())
    args = cli._parse(["train", "--config", _config_file(tmp_path, {"run_dir": "~/mine"}), "--resume"])
    assert args.run_dir == tmp_path / "mine" and args.latent_dim == 2 and args.hidden == "32"


def test_a_config_file_fills_in_what_the_flags_leave(tmp_path, monkeypatch):
    """A run's own config.json is a valid --config; flags on the command line win over it."""
    settings = {"objective": "elbo", "num_samples": 2, "hidden": [16, 8], "kl_warmup": 100, "beta": 0.5,
                "optimizer": "adamax", "schedule": "cosine", "lr_warmup": 5, "free_bits": 0.1}
    seen = {}
    monkeypatch.setattr(cli, "_train", lambda args: seen.update(_config=cli._config_from(args)) or 0)
    assert cli.main(["train", "--config", _config_file(tmp_path, settings), "--num-samples", "3", "--run-dir", str(tmp_path / "r")]) == 0
    config = seen["_config"]
    assert config["objective"] == "elbo" and config["num_samples"] == 3 and config["hidden"] == [16, 8]
    assert (config["kl_warmup"], config["beta"], config["optimizer"], config["free_bits"]) == (100, 0.5, "adamax", 0.1)
    # Warm-up from 0 to the rate over 5 steps, then cosine decay to 0 at the last step.
    rate = cli._learning_rate(dict(config, learning_rate=1.0, steps=105))
    np.testing.assert_allclose([rate(0), rate(5), rate(55), rate(105)], [0.0, 1.0, 0.5, 0.0], atol=1e-6)
    assert cli._optimizer(config).init({"w": jnp.zeros(2)}) is not None


@pytest.mark.parametrize("flags", [
    ["--model", "two-layer", "--objective", "iwae", "--kl-warmup", "10"],
    ["--decoder", "gaussian", "--prior", "vamp", "--prior-components", "3", "--objective", "elbo", "--beta", "0.5"],
    ["--objective", "elbo", "--free-bits", "0.1", "--prior", "standard", "--optimizer", "rmsprop", "--schedule", "exponential"],
])
def test_other_models_and_objectives_train_end_to_end(tmp_path, flags):
    run_dir = tmp_path / "r"
    tiny = TINY if "two-layer" not in flags else TINY[:-5] + TINY[-1:]  # its sizes are fixed: no --latent-dim, --hidden
    assert cli.main(["train", "--run-dir", str(run_dir), *tiny, "--eval-samples", "10", "--eval-points", "10", *flags]) == 0
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    evaluation = json.loads((run_dir / "evaluation.json").read_text(), parse_constant=refuse)  # NaN is null
    assert np.isfinite(evaluation["log_likelihood"]) and np.isfinite(evaluation["kl"])
    assert (evaluation["bits_per_dim"] is None) == ("gaussian" in flags)
    model = cli.load_run(run_dir)
    assert type(model).__name__ == ("TwoLayerVAE" if "two-layer" in flags else "VAE")


def test_plausible_slips_are_one_line_errors(run, tmp_path, monkeypatch):
    """Each was a traceback, or (checkpoints without config.json) a new run silently taking over
    another's checkpoints."""
    with pytest.raises(SystemExit, match=r"--config .* is a folder, not a JSON file"):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--config", str(run)])
    with pytest.raises(SystemExit, match=r"--config .* is not valid JSON"):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--config", str(run / "samples.png")])
    for name, text, message in (("cut", '{"data": "embedded", "lat', r"config.json is not valid JSON"),
                                ("foreign", '{"name": "other tool"}', r"config.json has unknown settings \['name'\]"),
                                ("partial", '{"data": "embedded"}', r"is not a run's config.json: it lacks \['latent_dim'")):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text(text)
        for command in ("evaluate", "impute"):
            with pytest.raises(SystemExit, match=message):
                cli.main([command, str(folder)])
    with pytest.raises(SystemExit, match=r"--run-dir .*config.json is a file"):
        cli.main(["train", "--run-dir", str(run / "config.json"), *TINY])
    taken = tmp_path / "checkpoints_only"
    (taken / "checkpoints" / "10").mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"holds checkpoints but no config.json"):
        cli.main(["train", "--run-dir", str(taken), *TINY])
    assert not (taken / "config.json").exists()
    # In Python, load_run raises the loader's own error, not SystemExit.
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "data": "mnist",
                                                    "data_dir": str(tmp_path / "no_data")}))
    with pytest.raises(FileNotFoundError):
        cli.load_run(moved)
    # "~" in a --config file's run_dir is the home folder, as on a command line.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    with pytest.raises(SystemExit, match=r"--run-dir .*home/file is a file"):
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "file").write_text("")
        cli.main(["train", "--config", _config_file(tmp_path, {"run_dir": "~/file"}), *TINY])


def _copy_run(run, folder, edit=None, metrics=True):
    """A copy of `run`'s config and checkpoints (and metrics), its config.json edited by `edit`."""
    import shutil

    shutil.copytree(run / "checkpoints", folder / "checkpoints")
    if metrics:
        shutil.copy(run / "metrics.jsonl", folder / "metrics.jsonl")
    config = json.loads((run / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(edit(config) if edit else config))
    return folder


QUICK_EVAL = ["--eval-points", "3", "--eval-samples", "10"]


def test_a_hand_edited_run_config_is_completed_and_checked(run, tmp_path):
    """evaluate and --resume read a run's config.json as the flags would: a setting it lacks takes
    the flag's default, a string width is parsed, a bad value is one line naming the file (each
    was a KeyError, TypeError or ValueError traceback)."""
    lean = _copy_run(run, tmp_path / "lean", lambda c: {k: v for k, v in c.items() if k not in ("learning_rate", "steps")}, metrics=False)
    assert cli.main(["evaluate", str(lean), *QUICK_EVAL]) == 0  # and no metrics.jsonl: no training curve, the rest
    assert (lean / "evaluation.json").exists() and (lean / "samples.png").exists() and not (lean / "training_curve.png").exists()
    text = _copy_run(run, tmp_path / "text", lambda c: {**c, "hidden": "32"})
    assert cli.main(["evaluate", str(text), *QUICK_EVAL]) == 0
    for folder in (lean, text):  # and load_run reads them the same way (KeyError, and hidden ('3', '2'), before)
        assert cli.load_run(folder).log_joint(jnp.zeros(784), jnp.zeros(2)).shape == ()
    zero = _copy_run(run, tmp_path / "zero", lambda c: {**c, "latent_dim": 0})
    with pytest.raises(SystemExit, match=r"elbojax: .*zero/config.json: --latent-dim must be >= 1, got 0"):
        cli.main(["evaluate", str(zero), *QUICK_EVAL])
    with pytest.raises(ValueError, match=r"zero/config.json: --latent-dim must be >= 1, got 0"):
        cli.load_run(zero)
    other = _copy_run(run, tmp_path / "other", lambda c: {**c, "latent_dim": 3})
    records = lambda: {path.name: path.read_text() for path in other.glob("*.json")}
    before = records()
    for command in (["evaluate", str(other), *QUICK_EVAL], ["train", "--run-dir", str(other), "--resume", "--steps", "40", "--no-progress", *QUICK_EVAL]):
        # Told from the checkpoint's metadata, before orbax's asynchronous reads fail (a hundred
        # lines of tracebacks) and before a resume rewrites the run's records (it did).
        with pytest.raises(SystemExit, match=r"elbojax: .*other: .*does not fit .*encoder/loc_head/bias: \(2,\) stored, \(3,\) expected"):
            cli.main(command)
    assert records() == before


def test_data_dir_and_download_are_refused_for_an_embedded_run_on_every_command(run, tmp_path):
    """A resume accepted them and recorded the folder in config.json; evaluate and impute ignored
    --data-dir without a word."""
    folder = _copy_run(run, tmp_path / "embedded")
    before = (folder / "config.json").read_text()
    for flags in (["--data-dir", str(tmp_path)], ["--download"]):
        with pytest.raises(SystemExit, match=r"--data embedded is shipped inside the package; --data-dir and --download apply to --data mnist"):
            cli.main(["train", "--run-dir", str(folder), "--resume", "--steps", "40", "--no-progress", *flags])
    assert (folder / "config.json").read_text() == before
    for command in ("evaluate", "impute"):
        with pytest.raises(SystemExit, match=r"--data-dir applies to runs on mnist, fashion-mnist, binarized-mnist; this run's data are the embedded subset"):
            cli.main([command, str(folder), "--data-dir", str(tmp_path)])


def test_a_damaged_environment_record_stops_a_resume_before_anything_is_rewritten(run, tmp_path):
    folder = _copy_run(run, tmp_path / "damaged")
    (folder / "environment.json").write_text("{broken")
    before = (folder / "config.json").read_text()
    with pytest.raises(SystemExit, match=r"elbojax: .*environment.json is not valid JSON"):
        cli.main(["train", "--run-dir", str(folder), "--resume", "--steps", "40", "--no-progress", *QUICK_EVAL])
    assert (folder / "config.json").read_text() == before


def test_a_run_folder_under_a_file_is_a_clear_error(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(SystemExit, match=r"--run-dir .*afile/sub cannot be made: .*afile is a file"):
        cli.main(["train", "--run-dir", str(tmp_path / "afile" / "sub"), *TINY])


def test_prior_components_do_not_block_the_resume_of_a_standard_prior_run(run, capsys):
    assert cli.main(["train", "--run-dir", str(run), "--resume", "--prior-components", "3", "--no-progress", *QUICK_EVAL]) == 0
    assert "ignoring --prior-components" in capsys.readouterr().out


def test_gap_flags_need_gaps_and_the_flow_needs_two_latent_dimensions(run, tmp_path):
    for flags, given in ((["--gap-flow"], "--gap-flow sets"), (["--gap-points", "4", "--gap-steps", "5"], "--gap-points, --gap-steps set")):
        with pytest.raises(SystemExit, match=rf"elbojax: {given} up the gaps; add --gaps"):
            cli.main(["evaluate", str(run), *flags])
    one = tmp_path / "one"
    one.mkdir()
    (one / "config.json").write_text(json.dumps({**json.loads((run / "config.json").read_text()), "latent_dim": 1}))
    with pytest.raises(SystemExit, match=r"--gap-flow fits a coupling flow, which needs a latent of 2 or more dimensions; this run's has 1"):
        cli.main(["evaluate", str(one), "--gaps", "--gap-flow"])  # refused before any work (it was a traceback after it)


def test_the_git_revision_is_elbojax_own_not_an_enclosing_repository(tmp_path, monkeypatch):
    import shutil
    import subprocess

    if shutil.which("git") is None:
        pytest.skip("no git")
    project = tmp_path / "project"
    for folder in ("venv/lib/elbojax", "libs/elbojax"):
        (project / folder).mkdir(parents=True)
        (project / folder / "cli.py").write_text("")
    git = lambda *args: subprocess.run(["git", "-C", str(project), *args], check=True, capture_output=True)
    git("init", "-q")
    git("add", "libs")  # the virtual environment is not tracked
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "x")
    monkeypatch.setattr(cli, "__file__", str(project / "venv" / "lib" / "elbojax" / "cli.py"))
    assert cli._git_revision() is None  # an installed copy inside another project's repository
    monkeypatch.setattr(cli, "__file__", str(project / "libs" / "elbojax" / "cli.py"))
    head = subprocess.run(["git", "-C", str(project), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert cli._git_revision() == head  # a tracked checkout, also inside a larger repository


@pytest.mark.parametrize("signum", [None, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_during_training_is_a_resumable_stop_without_a_traceback(tmp_path, monkeypatch, capsys, signum):
    restore_fetching = interrupt_fetching(monkeypatch, call=2, signum=signum)
    run_dir = tmp_path / "r"
    with pytest.raises(SystemExit) as stop:
        cli.main(["train", "--run-dir", str(run_dir), *TINY[:2], "--steps-per-call", "5", "--checkpoint-every", "10", *TINY[6:]])
    assert stop.value.code == (143 if signum else 130)  # 128 + the signal, as a shell reports it
    err = capsys.readouterr().err
    assert "checkpointed step 5" in err and f"elbojax train --run-dir {run_dir} --resume" in err
    assert f"elbojax: {'terminated' if signum else 'interrupted'}; continue" in err and "Traceback" not in err
    restore_fetching()
    assert cli.main(["train", "--run-dir", str(run_dir), "--resume", "--no-progress", *QUICK_EVAL]) == 0
    assert [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [5, 10, 15, 20]


def test_the_command_exits_with_130_on_ctrl_c_at_once():
    """`console_main` (the `elbojax` command) ends an interrupted command with os._exit(130): after
    a JIT compilation interrupted by Ctrl-C, the interpreter's ordinary exit crashed (status 139)."""
    code = (
        "import sys; from elbojax import cli\n"
        "def interrupted(argv=None):\n"
        "    raise KeyboardInterrupt if sys.argv[1] == 'raw' else SystemExit(int(sys.argv[1]))\n"
        "cli.main = interrupted\n"
        "cli.console_main()\n"
    )
    for how, status in (("raw", 130), ("130", 130), ("143", 143)):  # 143: SIGTERM during training
        result = subprocess.run([sys.executable, "-c", code, how], capture_output=True, text=True, timeout=120)
        assert result.returncode == status and "Traceback" not in result.stderr, (how, result.stderr[-2000:])
        assert ("elbojax: interrupted" in result.stderr) == (how == "raw")
    ok = subprocess.run([sys.executable, "-m", "elbojax.cli", "train", "--steps", "0"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 1 and "--steps must be >= 1" in ok.stderr  # other exits are as before


def test_a_config_file_gives_devices_as_a_number_or_a_string(tmp_path):
    """`{"devices": 2}` was refused ("must be a string"): the flag is a string only for "all"."""
    config = tmp_path / "config.json"
    for value, parsed in ((2, "2"), ("2", "2"), ("all", "all")):
        config.write_text(json.dumps({"devices": value}))
        assert cli._parse(["train", "--run-dir", str(tmp_path / "r"), "--config", str(config)]).devices == parsed
    config.write_text(json.dumps({"devices": True}))
    with pytest.raises(SystemExit, match=r"config.json: devices must be a positive integer or 'all', got True"):
        cli._parse(["train", "--run-dir", str(tmp_path / "r"), "--config", str(config)])


def test_a_refused_setting_from_a_config_file_says_so(tmp_path):
    """It read as a flag that was never typed ("--latent-dim must be >= 1")."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"latent_dim": 0, "hidden": "8,x", "seed": 1}))
    base = ["train", "--run-dir", str(tmp_path / "r"), "--config", str(config)]
    with pytest.raises(SystemExit, match=rf"--latent-dim must be >= 1, got 0 \(set in --config {config}\)$"):
        cli.main(base)
    with pytest.raises(SystemExit, match=rf"--hidden must be comma-separated positive integers, got '8,x' \(set in --config {config}\)$"):
        cli.main([*base, "--latent-dim", "2"])
    with pytest.raises(SystemExit, match=r"--latent-dim must be >= 1, got -1$"):  # typed: as before
        cli.main([*base, "--latent-dim", "-1"])
    with pytest.raises(SystemExit, match=r"--steps must be >= 1, got 0$"):  # typed, the file's settings being fine
        cli.main([*base, "--latent-dim", "2", "--hidden", "8", "--steps", "0"])
    assert not (tmp_path / "r").exists()


def test_a_config_files_settings_that_would_do_nothing_are_not_refused(tmp_path):
    """Another run's config.json records every setting; only typed flags that would do nothing are refused."""
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"prior_components": 7, "data_dir": str(tmp_path)}))
    args = cli._parse(["train", "--run-dir", str(tmp_path / "r"), "--config", str(config)])
    assert cli._config_from(args)["prior_components"] == 7
