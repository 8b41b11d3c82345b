"""The `elbojax` command line: `elbojax train`, `elbojax evaluate RUN` and `elbojax impute RUN`.

Thin by design: it parses flags (before JAX starts its backend), builds a model from
`elbojax.models`, and calls `elbojax.train.fit` and `elbojax.train.evaluate`. A run folder holds
`config.json`, `environment.json` (package versions, git revision, command), `metrics.jsonl`,
`checkpoints/`, `evaluation.json` and the plots; `load_run`
brings a trained model back in Python with one call.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import sys
from pathlib import Path

# What a resumed run must share with its checkpoint (the parameters' and optimizer state's structure).
RESUME_FIXED_KEYS = ("data", "model", "latent_dim", "hidden", "prior", "prior_components", "decoder", "optimizer")
# The data sets on files, and their loaders in `elbojax.data`; "embedded" ships in the package.
_LOADERS = {"mnist": "load_mnist", "fashion-mnist": "load_fashion_mnist", "binarized-mnist": "load_binarized_mnist"}
DATA_CHOICES = ("embedded", *_LOADERS)
DEFAULT_STEPS = 3000
OPTIMIZERS = ("adam", "adamw", "adamax", "rmsprop", "sgd")
SCHEDULES = ("constant", "cosine", "exponential")
GAP_POINTS, GAP_STEPS = 50, 300  # evaluate --gaps
FLOAT32_MAX = 3.4028234663852886e38  # learning rate, beta and free bits become float32 in the step


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elbojax", description="Train and evaluate VAEs with elbojax's estimators.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser(
        "train", help="train a VAE (defaults: IWAE K=5 on the embedded MNIST subset, well within two minutes on 2 CPU cores)",
        description="Every flag can also come from a JSON --config file (keys are the flag names with "
        "underscores, as in a run's config.json); flags given on the command line win.",
    )
    run = train.add_argument_group("run")
    run.add_argument("--config", type=Path, default=None, help="a JSON file of settings (e.g. a run's config.json)")
    run.add_argument("--run-dir", type=_user_path, default=Path("runs/default"), help="the run folder (default: runs/default)")
    run.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint (settings not given come from its config.json)")
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--no-progress", action="store_true")
    data = train.add_argument_group("data")
    data.add_argument("--data", choices=DATA_CHOICES, default="embedded")
    data.add_argument("--data-dir", type=Path, default=None, help="folder with the data files (default: $ELBOJAX_DATA_DIR or ~/.cache/elbojax); kept in the run's config.json")
    data.add_argument("--download", action="store_true", help="download missing data files into --data-dir")
    model = train.add_argument_group("model")
    model.add_argument("--model", choices=("vae", "two-layer"), default="vae", help="vae: one stochastic layer; two-layer: the IWAE paper's 784-200-200-100 / 100-100-100-50 model (and back)")
    model.add_argument("--latent-dim", type=int, default=16)
    model.add_argument("--hidden", type=str, default="200,200", help="hidden widths, comma-separated (default 200,200)")
    model.add_argument("--prior", choices=("standard", "mixture", "vamp"), default="standard", help="N(0, I), a learned Gaussian mixture, or the VampPrior")
    model.add_argument("--prior-components", type=int, default=10, help="components of the mixture / VampPrior pseudo-inputs (default 10)")
    model.add_argument("--decoder", choices=("bernoulli", "gaussian"), default="bernoulli", help="bernoulli: dynamically binarized pixels; gaussian: grey levels / 255, learned variance")
    objective = train.add_argument_group("objective")
    objective.add_argument("--objective", choices=("elbo", "iwae"), default="iwae")
    objective.add_argument("--num-samples", "-k", type=int, default=5, help="K, samples per data point (default 5)")
    objective.add_argument("--gradient", choices=("reparam", "stl", "dreg", "score", "vimco"), default="reparam")
    objective.add_argument("--kl", choices=("auto", "analytic", "monte_carlo"), default="auto", help="the ELBO's KL: closed form where the model has it (auto), or sampled")
    objective.add_argument("--kl-warmup", type=int, default=0, help="anneal the KL weight linearly from 0 to 1 over this many steps (default 0: off)")
    objective.add_argument("--beta", type=float, default=1.0, help="weight on the KL term (beta-VAE; default 1)")
    objective.add_argument("--free-bits", type=float, default=None, help="free bits per latent dimension, in nats (analytic-KL ELBO only)")
    optimization = train.add_argument_group("optimization")
    optimization.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    optimization.add_argument("--learning-rate", type=float, default=1e-3)
    optimization.add_argument("--schedule", choices=SCHEDULES, default="constant", help="learning-rate schedule after the warm-up: constant, cosine decay to 0, or exponential decay to 0.1x")
    optimization.add_argument("--lr-warmup", type=int, default=0, help="linear learning-rate warm-up steps (default 0)")
    optimization.add_argument("--batch-size", type=int, default=100)
    optimization.add_argument("--steps", type=int, default=None, help="train until this step (default 3000; on --resume, the run's own unless given)")
    optimization.add_argument("--steps-per-call", type=int, default=50)
    optimization.add_argument("--checkpoint-every", type=int, default=500)
    _add_device_flags(train.add_argument_group("devices (see README: Scaling out)"))
    evaluation = train.add_argument_group("evaluation")
    evaluation.add_argument("--eval-samples", type=int, default=5000, help="K for the test log-likelihood (default 5000)")
    evaluation.add_argument("--eval-points", type=int, default=500, help="test points to evaluate at the end, evenly spaced through the test set (default 500; 0 for all)")

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on its test set")
    evaluate.add_argument("run_dir", type=_user_path)
    evaluate.add_argument("--data-dir", type=Path, default=None, help="folder with the data files (default: the run's own, from its config.json)")
    evaluate.add_argument("--eval-samples", type=int, default=5000)
    evaluate.add_argument("--eval-points", type=int, default=0, help="test points, evenly spaced through the test set (default 0: all)")
    evaluate.add_argument("--gaps", action="store_true", help="also the approximation and amortization gaps (Cremer et al. 2018): a table, gaps.png and gaps.json")
    evaluate.add_argument("--gap-points", type=int, default=None, help=f"test points for the gaps, evenly spaced (default {GAP_POINTS})")
    evaluate.add_argument("--gap-steps", type=int, default=None, help=f"optimizer steps of each point's local fit (default {GAP_STEPS})")
    evaluate.add_argument("--gap-flow", action="store_true", help="also fit a coupling flow per point: how much a richer q shrinks the approximation gap")
    _add_device_flags(evaluate.add_argument_group("devices"))

    impute = commands.add_parser("impute", help="hide part of test digits and complete them with a trained run (importance resampling)")
    impute.add_argument("run_dir", type=_user_path)
    impute.add_argument("--data-dir", type=Path, default=None, help="folder with the data files (default: the run's own, from its config.json)")
    impute.add_argument("--hide", choices=("top", "bottom", "left", "right"), default="top", help="the half of each digit to hide (default top)")
    impute.add_argument("--points", type=int, default=8, help="test digits to complete, evenly spaced through the test set (default 8)")
    impute.add_argument("--imputations", type=int, default=6, help="completions per digit (default 6)")
    impute.add_argument("--num-samples", "-k", type=int, default=1000, help="K, importance samples per digit (default 1000)")
    impute.add_argument("--seed", type=int, default=0)
    return parser


def _add_device_flags(group) -> None:
    group.add_argument("--devices", type=str, default=None, help="devices per process: a number, or 'all' (default: 1, or all of each process's devices in a multi-process run); the batch is split over them")
    group.add_argument("--coordinator", type=str, default=None, help="host:port of process 0, for a multi-process run (or $JAX_COORDINATOR_ADDRESS)")
    group.add_argument("--num-processes", type=int, default=None, help="processes in a multi-process run (or $JAX_NUM_PROCESSES)")
    group.add_argument("--process-id", type=int, default=None, help="this process, 0..num-processes-1 (or $JAX_PROCESS_ID)")
    group.add_argument("--distributed-timeout", type=int, default=60, help="seconds to wait for every process to join (default 60)")


def _start_devices(args):
    """Fix the device count and join a multi-process run, before JAX starts its backend; the mesh."""
    import os

    import jax

    from elbojax import distributed

    if args.distributed_timeout < 1:
        raise SystemExit(f"elbojax: --distributed-timeout must be >= 1, got {args.distributed_timeout}")
    if args.devices is None or args.devices == "all":
        per_process = None
    else:
        try:
            per_process = int(args.devices)
        except ValueError:
            raise SystemExit(f"elbojax: --devices must be a positive integer or 'all', got {args.devices!r}") from None
        if per_process < 1:
            raise SystemExit(f"elbojax: --devices must be >= 1, got {per_process}")
    if per_process is not None and per_process > 1:
        try:  # on CPU, the number of devices; accelerators ignore it
            jax.config.update("jax_num_cpu_devices", per_process)
        except RuntimeError as error:
            raise SystemExit(f"elbojax: --devices must be set before JAX starts its backend (run elbojax in a fresh process): {error}") from None
    multi_process = args.coordinator is not None or args.num_processes is not None or args.process_id is not None or any(
        name in os.environ for name in distributed.ENVIRONMENT
    )
    try:
        if multi_process:
            distributed.initialize(args.coordinator, args.num_processes, args.process_id, timeout=args.distributed_timeout)
            if per_process is not None and len(jax.local_devices()) != per_process:
                raise ValueError(
                    f"--devices {per_process}, but this process has {len(jax.local_devices())} devices; a multi-process "
                    "run uses every device of every process (leave --devices out)"
                )
            return distributed.data_mesh()
        return distributed.data_mesh(1 if args.devices is None else per_process)
    except (ValueError, RuntimeError) as error:
        raise SystemExit(f"elbojax: {error}") from None


def _train_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["train"]


def _parse(argv):
    """Parse the command line. For `train`, settings from `--config` fill in what the flags leave
    unset, and on `--resume` the run's own config.json fills in what both leave unset;
    `args.given` names the settings given (on the command line or in `--config`)."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command != "train":
        return args
    train = _train_parser(parser)
    actions = _setting_actions(train)
    settings = {}
    if args.config is not None:
        settings = _settings(_read_json(args.config, f"--config {args.config}"), actions, f"--config {args.config}")
        train.set_defaults(**settings)
        args = parser.parse_args(argv)
    typed = _given_flags(argv)  # on the command line itself, not from --config
    given = typed | set(settings)
    saved = args.run_dir / "config.json"
    if args.resume and saved.exists():  # (without one, _resolve_run says so)
        run_settings = _settings(_read_json(saved, str(saved)), actions, str(saved))
        # Not --steps: left out, a resumed run keeps its own length (_config_from, _resolve_run).
        train.set_defaults(**{name: value for name, value in run_settings.items() if name not in given and name != "steps"})
        args = parser.parse_args(argv)
    args.given = given
    args.typed = typed
    args.from_config = given - typed  # the --config file's settings, reported as such when refused or ignored
    return args


@contextlib.contextmanager
def _naming_the_config_file(args):
    """A refused setting that came from the --config file, not the command line, is said to:
    "--latent-dim must be >= 1, got 0 (set in --config F)" (it read as a flag never typed)."""
    try:
        yield
    except SystemExit as error:
        named = {flag.replace("-", "_") for flag in re.findall(r"--([a-z][a-z-]*)", str(error.code))}
        if not isinstance(error.code, str) or not named & args.from_config:
            raise
        raise SystemExit(f"{error.code} (set in --config {args.config})") from None


def _user_path(text: str) -> Path:
    """A folder flag's value with "~" expanded, also where no shell does it (`--run-dir=~/runs`,
    a --config file, a run's config.json)."""
    return Path(os.path.expanduser(text))


def _setting_actions(train: argparse.ArgumentParser) -> dict:
    """`train`'s flags that are settings (what a --config file or a run's config.json may hold)."""
    return {action.dest: action for action in train._actions if action.dest not in ("help", "config")}


def _read_json(path: Path, source: str):
    """The JSON in `path`, or a one-line error that says what is wrong with the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SystemExit(f"elbojax: {source} does not exist") from None
    except IsADirectoryError:
        raise SystemExit(f"elbojax: {source} is a folder, not a JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SystemExit(f"elbojax: {source} is not valid JSON: {error}") from None
    except OSError as error:
        raise SystemExit(f"elbojax: {source} cannot be read: {error}") from None


def _run_config(run_dir: Path) -> dict:
    """A run folder's config.json, checked like a --config file and completed as the flags would
    be (their defaults for a setting it lacks): what `evaluate`, `impute` and `--resume` use."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise SystemExit(f"elbojax: {run_dir} is not a run folder (no config.json)")
    raw = _read_json(path, str(path))
    parser = _parser()
    train = _train_parser(parser)
    settings = _settings(raw, _setting_actions(train), str(path))
    missing = [key for key in ("data", "latent_dim", "hidden", "seed") if key not in settings]
    if missing:
        raise SystemExit(f"elbojax: {path} is not a run's config.json: it lacks {missing}")
    train.set_defaults(**settings)
    args = parser.parse_args(["train", "--resume"])  # --resume: its cross-setting checks passed when it started
    args.given = set()
    try:
        return _config_from(args)
    except SystemExit as error:
        raise SystemExit(f"elbojax: {path}: {str(error.code).removeprefix('elbojax: ')}") from None


def _settings(settings, actions: dict, source: str) -> dict:
    """Settings from a JSON object (a --config file or a run's config.json), as the flags would parse them."""
    if not isinstance(settings, dict):
        raise SystemExit(f"elbojax: {source} must hold a JSON object of settings, got {type(settings).__name__}")
    unknown = sorted(set(settings) - set(actions))
    if unknown:
        raise SystemExit(f"elbojax: {source} has unknown settings {unknown}; known: {sorted(actions)}")
    parsed = {}
    for name, value in settings.items():
        action = actions[name]
        if name == "hidden" and isinstance(value, list):
            value = ",".join(str(v) for v in value)
        if name == "devices" and value is not None and not isinstance(value, str):  # the flag is a string for "all"
            if not isinstance(value, int) or isinstance(value, bool):
                raise SystemExit(f"elbojax: {source}: devices must be a positive integer or 'all', got {value!r}")
            value = str(value)  # {"devices": 2} as --devices 2
        value = _setting(action, name, value, source)
        if action.choices is not None and value not in action.choices:
            raise SystemExit(f"elbojax: {source}: {name} must be one of {list(action.choices)}, got {value!r}")
        parsed[name] = value
    return parsed


def _given_flags(argv) -> set[str]:
    """The `train` settings named on the command line (not defaults, not --config), however
    spelled: `--flag value`, `--flag=value`, an abbreviation or a short option."""
    parser = _parser()
    for action in _train_parser(parser)._actions:
        action.default = argparse.SUPPRESS  # so only what the command line sets is in the namespace
    return set(vars(parser.parse_args(argv))) - {"command"}


def _setting(action: argparse.Action, name: str, value, source: str):
    """A JSON setting as the flag would parse it; JSON of the wrong kind is an error, never coerced."""
    def wrong(kind: str):
        raise SystemExit(f"elbojax: {source}: {name} must be {kind}, got {value!r}")

    if value is None:
        return None if action.default is None else wrong("set (it has no null value)")
    if isinstance(action, argparse._StoreTrueAction):
        return value if isinstance(value, bool) else wrong("true or false")
    if action.type is int:
        return int(value) if isinstance(value, int) and not isinstance(value, bool) else wrong("an integer")
    if action.type is float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            wrong("a number")
        try:
            return float(value)
        except OverflowError:  # an integer beyond float's range: refused by the range checks of _config_from
            return math.inf if value > 0 else -math.inf
    if action.type is not None:
        return action.type(value) if isinstance(value, str) else wrong("a string")
    return value


def _hidden(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"elbojax: --hidden must be comma-separated positive integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise SystemExit(f"elbojax: --hidden must be comma-separated positive integers, got {text!r}")
    return widths


def _config_from(args) -> dict:
    if args.steps is None:
        args.steps = DEFAULT_STEPS
        args.steps_given = False
    else:
        args.steps_given = True
    positive = ("num_samples", "latent_dim", "batch_size", "steps", "steps_per_call", "checkpoint_every", "eval_samples", "prior_components")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"elbojax: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    for name in ("kl_warmup", "lr_warmup"):
        if getattr(args, name) < 0:
            raise SystemExit(f"elbojax: --{name.replace('_', '-')} must be >= 0, got {getattr(args, name)}")
    for name in ("steps", "kl_warmup", "lr_warmup"):  # compared with the step counter, an int32
        if getattr(args, name) >= 2**31:
            raise SystemExit(f"elbojax: --{name.replace('_', '-')} must be < 2**31 (steps are counted in int32), got {getattr(args, name)}")
    if args.eval_points < 0:
        raise SystemExit(f"elbojax: --eval-points must be >= 0 (0 for all), got {args.eval_points}")
    _check_seed_flag(args.seed)
    # The checks across settings are for a new run: a resumed one keeps its own settings, which
    # passed them when it started (a given flag that differs is ignored or refused by _resolve_run).
    if not args.resume and args.checkpoint_every % args.steps_per_call:
        raise SystemExit(f"elbojax: --checkpoint-every ({args.checkpoint_every}) must be a multiple of --steps-per-call ({args.steps_per_call})")
    for name, bound in (("learning_rate", "> 0"), ("beta", ">= 0"), ("free_bits", ">= 0")):
        value = getattr(args, name)
        if value is not None and not (math.isfinite(value) and value <= FLOAT32_MAX and (value > 0 if bound == "> 0" else value >= 0)):
            raise SystemExit(f"elbojax: --{name.replace('_', '-')} must be {bound} and finite in float32 (at most {FLOAT32_MAX:.4g}), got {value}")
    if not args.resume and args.model == "two-layer" and (args.prior != "standard" or args.decoder != "bernoulli"):
        raise SystemExit("elbojax: --model two-layer has its own hierarchical prior and a Bernoulli decoder; leave --prior and --decoder at their defaults")
    # Refused only when set to something else: a two-layer run's own config.json records the defaults.
    defaults = {action.dest: action.default for action in _train_parser(_parser())._actions}
    sizes = sorted(name for name in ("latent_dim", "hidden")
                   if name in getattr(args, "given", set()) and _differs(name, getattr(args, name), defaults[name]))
    if not args.resume and args.model == "two-layer" and sizes:
        raise SystemExit("elbojax: --model two-layer has the IWAE paper's fixed sizes (latents 100 and 50; "
                         f"784-200-200-100 / 100-100-100-50 and back); {', '.join('--' + s.replace('_', '-') for s in sizes)} "
                         "apply to --model vae only")
    # Typed, not from a --config file (another run's config.json records them all).
    given_and_set = lambda name: name in getattr(args, "typed", set()) and _differs(name, getattr(args, name), defaults[name])
    if not args.resume and given_and_set("prior_components") and (args.model == "two-layer" or args.prior == "standard"):
        prior = "the two-layer model's own" if args.model == "two-layer" else "standard"
        raise SystemExit(f"elbojax: --prior-components applies to --prior mixture or vamp (of --model vae); this run's prior is {prior}")
    if args.data == "embedded" and (given_and_set("data_dir") or args.download):  # on --resume too: the run's data
        raise SystemExit(f"elbojax: --data embedded is shipped inside the package; --data-dir and --download apply to --data {', '.join(_LOADERS)}")
    config = {name: getattr(args, name) for name in (
        "data", "model", "objective", "num_samples", "gradient", "kl", "kl_warmup", "beta", "free_bits",
        "latent_dim", "prior", "prior_components", "decoder", "optimizer", "learning_rate", "schedule",
        "lr_warmup", "batch_size", "steps", "seed", "steps_per_call", "checkpoint_every",
        "eval_samples", "eval_points",
    )}
    config["hidden"] = _hidden(args.hidden)
    # Absolute, so that `evaluate RUN` and `load_run` find the data from anywhere; None: the default folder.
    config["data_dir"] = None if args.data_dir is None else os.path.abspath(os.path.expanduser(args.data_dir))
    # Incompatible choices are refused now, before any data are loaded.
    try:
        if not args.resume:
            _objective(config)
    except ValueError as error:
        raise SystemExit(f"elbojax: {error}") from None
    return config


def _differs(name: str, value, default) -> bool:
    return _hidden(value) != _hidden(default) if name == "hidden" else value != default


def _objective(config: dict):
    import optax

    from elbojax import train

    warmup = config.get("kl_warmup", 0)
    return train.objective(
        config["objective"], num_samples=config["num_samples"], gradient=config["gradient"],
        kl=config.get("kl", "auto"), beta=config.get("beta", 1.0), free_bits=config.get("free_bits"),
        kl_weight=optax.linear_schedule(0.0, 1.0, warmup) if warmup else 1.0,
    )


def _learning_rate(config: dict):
    """The learning-rate schedule of `config`: a linear warm-up from 0, then constant, cosine or exponential decay."""
    import optax

    rate, steps, warmup = config["learning_rate"], config["steps"], config.get("lr_warmup", 0)
    decay_steps = max(steps - warmup, 1)
    after = {
        "constant": lambda: optax.constant_schedule(rate),
        "cosine": lambda: optax.cosine_decay_schedule(rate, decay_steps),
        "exponential": lambda: optax.exponential_decay(rate, decay_steps, 0.1),
    }[config.get("schedule", "constant")]()
    return optax.join_schedules([optax.linear_schedule(0.0, rate, warmup), after], [warmup]) if warmup else after


def _optimizer(config: dict):
    """The optax optimizer of `config` with its learning-rate schedule."""
    import optax

    make = {"adam": optax.adam, "adamw": optax.adamw, "adamax": optax.adamax, "rmsprop": optax.rmsprop, "sgd": optax.sgd}
    return make[config.get("optimizer", "adam")](_learning_rate(config))


def _load_dataset(name: str, data_dir, download: bool):
    """The data set `name` (its loader's own errors: `FileNotFoundError`, `ValueError`, ...)."""
    from elbojax import data

    if name == "embedded":
        return data.load_embedded_mnist()
    return getattr(data, _LOADERS[name])(data_dir, download=download)


def _load_data(name: str, data_dir, download: bool, command: str = "train"):
    """`_load_dataset` for the command line: its errors as one line, with the remedy `command` has."""
    try:
        return _load_dataset(name, data_dir, download)
    except (OSError, ValueError) as error:  # missing, corrupt or truncated files; a failed download
        # The loaders' remedies (a missing or corrupt file) name their Python argument.
        hint = ""
        if "download=True" in str(error):
            hint = (" (on the command line: add --download, or give --data-dir FOLDER)" if command == "train" else
                    f" (give --data-dir FOLDER, or fetch the files once: python -c \"from elbojax import data; data.{_LOADERS[name]}(download=True)\")")
        source = f"--data {name}" if command == "train" else f"this run's data ({name})"
        raise SystemExit(f"elbojax: {source}: {error}{hint}") from None


def _data_dir_for(args, config: dict):
    """The data folder of `evaluate` or `impute`: --data-dir, else the run's own; refused for embedded data."""
    if args.data_dir is not None and config["data"] == "embedded":
        raise SystemExit(f"elbojax: --data-dir applies to runs on {', '.join(_LOADERS)}; this run's data are the embedded subset, shipped in the package")
    return args.data_dir or config.get("data_dir")


def _test_data(images, config: dict):
    """Test images as the likelihood takes them. Bernoulli: one fixed Bernoulli(grey / 255) sample
    (seed 0), the distribution the model was trained on; already-binary data as they are.
    Gaussian: grey / 255."""
    import numpy as np

    from elbojax import data

    flat = images.reshape(images.shape[0], -1)
    if flat.dtype == np.bool_:
        return flat.astype(np.float32)
    if config.get("decoder", "bernoulli") == "gaussian":
        return flat.astype(np.float32) / 255.0
    return data.static_binarize(flat, seed=0)


def build_model(config: dict, train_images):
    """The model of `config`, its decoder's output bias set from the training data's mean."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from elbojax import models

    flat = train_images.reshape(train_images.shape[0], -1)
    data_dim = flat.shape[1]
    mean = jnp.asarray(flat.mean(0) / (255.0 if flat.dtype == np.uint8 else 1.0), jnp.float32)
    rngs = nnx.Rngs(config["seed"])
    if config.get("model", "vae") == "two-layer":
        return models.TwoLayerVAE(data_dim, rngs=rngs, output_bias=models.bias_from_data_mean(mean))
    latent, hidden = config["latent_dim"], tuple(config["hidden"])
    encoder = models.GaussianMLPEncoder(data_dim, latent, hidden, jnp.tanh, rngs=rngs)
    if config.get("decoder", "bernoulli") == "gaussian":
        decoder = models.GaussianMLPDecoder(latent, data_dim, tuple(reversed(hidden)), jnp.tanh, rngs=rngs)
    else:
        decoder = models.BernoulliMLPDecoder(
            latent, data_dim, tuple(reversed(hidden)), jnp.tanh, rngs=rngs, output_bias=models.bias_from_data_mean(mean),
        )
    components = config.get("prior_components", 10)
    prior = {
        "standard": lambda: models.StandardNormalPrior(latent),
        "mixture": lambda: models.MixturePrior(latent, components, rngs=rngs),
        "vamp": lambda: models.VampPrior(encoder, components, rngs=rngs),
    }[config.get("prior", "standard")]()
    return models.VAE(encoder, decoder, prior)


PACKAGES = ("elbojax", "jax", "jaxlib", "flax", "optax", "distrax", "orbax-checkpoint", "numpy")


def _git_revision() -> str | None:
    """The git revision of elbojax's source tree (with "-dirty" for uncommitted changes), or None."""
    import subprocess

    source = Path(__file__).resolve().parent
    git = lambda *command: subprocess.run(["git", "-C", str(source), *command], capture_output=True, text=True, timeout=10)
    try:
        # Only a checkout that tracks this source: an installed copy inside another project's
        # repository (a virtual environment in a project folder) is not tracked by it.
        if git("ls-files", "--error-unmatch", Path(__file__).name).returncode != 0:
            return None  # an installed wheel, not a checkout
        revision = git("rev-parse", "HEAD")
        status = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.TimeoutExpired):
        return None
    if revision.returncode != 0:
        return None  # a checkout without a commit yet
    return revision.stdout.strip() + ("-dirty" if status.stdout.strip() else "")


def _environment(argv: list[str]) -> dict:
    """What produced a run: the command, the package versions, the git revision, the platform."""
    import platform
    import time
    from importlib import metadata

    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": ["elbojax", *argv],
        "python": platform.python_version(),
        "platform": platform.platform(),
        "packages": versions,
        "git_revision": _git_revision(),
    }


def _recorded_environments(run_dir: Path) -> list:
    """The sessions in `run_dir/environment.json` (none if it is absent); a damaged file is an error."""
    path = run_dir / "environment.json"
    if not path.exists():
        return []
    sessions = _read_json(path, str(path))
    if not isinstance(sessions, list):
        raise SystemExit(f"elbojax: {path} must hold a JSON list (one entry per start or resume), got {type(sessions).__name__}")
    return sessions


def _write_json(path: Path, record) -> None:
    """`record` as strict JSON (NaN and infinities as null), replacing `path` whole (never half-written)."""
    from elbojax import data

    data._write_atomically(path, (json.dumps(_strict(record), indent=2, allow_nan=False) + "\n").encode())


def _strict(value):
    """`value` with every non-finite float replaced by None (JSON's null)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {key: _strict(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_strict(item) for item in value]
    return value


def _resolve_run(args, config: dict) -> dict:
    """The run's settings: the flags' for a new run; the checkpoint's own on --resume (with a
    longer --steps and another --data-dir if given). Checks the run folder; writes nothing."""
    from elbojax import distributed

    run_dir: Path = args.run_dir
    saved = run_dir / "config.json"
    if run_dir.exists() and not run_dir.is_dir():
        raise SystemExit(f"elbojax: --run-dir {run_dir} is a file; give a folder (new or a run's)")
    blocked = next((parent for parent in run_dir.absolute().parents if parent.exists() and not parent.is_dir()), None)
    if blocked is not None:
        raise SystemExit(f"elbojax: --run-dir {run_dir} cannot be made: {blocked} is a file, not a folder")
    if not args.resume:
        if saved.exists():
            raise SystemExit(f"elbojax: {run_dir} already holds a run; pass --resume to continue it, or choose another --run-dir")
        if (run_dir / "checkpoints").is_dir() and any((run_dir / "checkpoints").iterdir()):
            raise SystemExit(
                f"elbojax: {run_dir} holds checkpoints but no config.json (written by `train.fit`?); a new run "
                "would take them over: choose another --run-dir"
            )
        return config
    if not saved.exists():
        raise SystemExit(f"elbojax: --resume given but {saved} does not exist; start a new run without --resume")
    previous = _run_config(run_dir)
    _recorded_environments(run_dir)  # a damaged one is refused now, before anything is rewritten
    fixed = [key for key in RESUME_FIXED_KEYS
             if key != "prior_components" or (previous["model"] == "vae" and previous["prior"] in ("mixture", "vamp"))]
    changed = [key for key in fixed if previous[key] != config[key]]
    if changed:
        details = ", ".join(f"{key}: checkpoint {previous.get(key)!r}, flags {config[key]!r}" for key in changed)
        raise SystemExit(f"elbojax: cannot resume {run_dir}: the model or optimizer differs from the checkpoint's ({details})")
    checkpoints = [int(p.name) for p in (run_dir / "checkpoints").glob("*") if p.name.isdigit()]
    if args.steps_given:
        if checkpoints and config["steps"] < max(checkpoints):
            raise SystemExit(f"elbojax: --steps {config['steps']} is before the run's last checkpoint (step {max(checkpoints)})")
        previous["steps"] = config["steps"]  # resuming may extend the run
    # The run's own unless given (_parse): the data folder, and the evaluation at the end (not training settings).
    for key in ("data_dir", "eval_samples", "eval_points"):
        previous[key] = config[key]
    ignored = [key for key in config if key in args.given and key not in ("steps", "data_dir", "eval_samples", "eval_points")
               and previous.get(key) != config[key]]
    if ignored and distributed.is_primary():
        named = lambda key: f"--{key.replace('_', '-')}" + (f" (set in --config {args.config})" if key in args.from_config else "")
        print(f"elbojax: resuming {run_dir} with its own settings; ignoring " + ", ".join(named(key) for key in ignored))
    return previous


def _write_run(args, config: dict) -> None:
    """config.json and environment.json, written by process 0 once every process has checked the folder."""
    from elbojax import distributed

    distributed.barrier("elbojax-run-checked")
    if distributed.is_primary():
        try:
            args.run_dir.mkdir(parents=True, exist_ok=True)
            sessions = _recorded_environments(args.run_dir) + [_environment(args.argv)]
            _write_json(args.run_dir / "config.json", config)
            _write_json(args.run_dir / "environment.json", sessions)
        except OSError as error:
            raise SystemExit(f"elbojax: cannot write the run folder {args.run_dir}: {error}") from None
    distributed.barrier("elbojax-run-prepared")


def _check_objective(model, objective_fn, data_dim: int) -> None:
    """Trace the objective on the model abstractly: an incompatible pair (e.g. a closed-form KL or
    free bits asked of a mixture prior) is refused before the run folder is written."""
    import jax
    import jax.numpy as jnp

    try:
        jax.eval_shape(lambda: objective_fn(jax.random.split(jax.random.key(0), 2), model, jnp.zeros((2, data_dim)), jnp.zeros((), jnp.int32)))
    except ValueError as error:
        raise SystemExit(f"elbojax: {error}") from None


def _fit_config(config: dict):
    from elbojax import train

    return train.FitConfig(
        seed=config["seed"], batch_size=config["batch_size"], num_steps=config["steps"],
        steps_per_call=config["steps_per_call"], checkpoint_every=config["checkpoint_every"],
        binarize="none" if config.get("decoder", "bernoulli") == "gaussian" else "dynamic",
    )


def _images_for_training(dataset, config: dict):
    """uint8 grey levels (binarized per batch), or grey / 255 floats for a Gaussian decoder."""
    import numpy as np

    images = dataset.train.images.reshape(dataset.train.images.shape[0], -1)
    if images.dtype == np.bool_:  # binarized MNIST is binary already: grey levels 0 / 255
        images = images.astype(np.uint8) * 255
    if config.get("decoder", "bernoulli") == "gaussian":
        images = images.astype(np.float32) / 255.0
    return images


def _print_evaluation(result) -> None:
    rows = [
        (f"test log-likelihood (K={result.num_samples})", f"{result.log_likelihood:.2f} ± {result.log_likelihood_se:.2f} nats"),
        ("bits per dimension", f"{result.bits_per_dim:.4f}"),
        ("ELBO", f"{result.elbo:.2f} nats"),
        ("KL(q || prior)", f"{result.kl:.2f} nats"),
        ("active units", f"{result.active_units} of {result.latent_dim}" if result.active_units >= 0 else "n/a (needs E_q[z] in closed form, finite, at 2 or more test points)"),
        ("test points", f"{result.num_points}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def spread(total: int, count: int):
    """`count` indices evenly spaced through `range(total)` (all of them if `count >= total`).

    The test points a run evaluates, plots and completes: a subset that stands for the whole test
    set whatever its order (binarized MNIST's test file is sorted by class, so its first 500
    points are all zeros).
    """
    import numpy as np

    if count >= total:
        return np.arange(total)
    return np.round(np.linspace(0, total - 1, count)).astype(int)


def _evaluate_and_report(run_dir: Path, graphdef, params, dataset, config: dict, eval_samples: int, eval_points: int, mesh=None):
    import numpy as np

    from elbojax import distributed, plots, train

    seed = config["seed"]
    test = _test_data(dataset.test.images, config)
    labels = dataset.test.labels
    if eval_points:
        chosen = spread(test.shape[0], eval_points)
        test, labels = test[chosen], (None if labels is None else labels[chosen])
    result = train.evaluate(graphdef, params, test, seed=seed, num_samples=eval_samples, mesh=mesh)
    if not distributed.is_primary():
        return result
    params = distributed.to_host(params)
    record = result._replace(
        kl_per_dimension=np.asarray(result.kl_per_dimension).tolist(),
        log_likelihood_per_point=np.asarray(result.log_likelihood_per_point).tolist(),
    )._asdict()
    _write_json(run_dir / "evaluation.json", record)  # e.g. bits_per_dim of a Gaussian decoder: null
    _print_evaluation(result)
    written = plots.write_run_plots(run_dir, graphdef, params, test, labels, seed=seed)
    print("plots: " + ", ".join(str(p) for p in written))
    return result


def load_run(run_dir, data_dir=None):
    """The trained model of a run folder (its latest checkpoint): an `elbojax.models.VAE` or `TwoLayerVAE`.
    Its data (for the model's sizes and output bias) come from `data_dir`, else the run's own folder."""
    run_dir = Path(run_dir).expanduser()
    if not (run_dir / "config.json").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder (no config.json).")
    try:  # completed and checked as `evaluate` reads it
        config = _run_config(run_dir)
    except SystemExit as error:  # the command line's one-line errors, as a library's exception
        raise ValueError(str(error.code).removeprefix("elbojax: ")) from None
    return _restore(run_dir, config, _load_dataset(config["data"], data_dir or config.get("data_dir"), False))


def _restore(run_dir: Path, config: dict, dataset, mesh=None):
    """The model of `config` with the parameters of the run's latest checkpoint (on `mesh`'s devices)."""
    import orbax.checkpoint as ocp
    from flax import nnx

    from elbojax import distributed, train

    model = build_model(config, _images_for_training(dataset, config))
    graphdef, state = train.init(model, _optimizer(config))
    if mesh is not None:
        state = distributed.replicate(state, mesh)
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    try:
        state = train.restore(manager, state)
    finally:
        manager.close()
    return nnx.merge(graphdef, state.params)


def _check_checkpoint_fits(run_dir: Path, state) -> None:
    import orbax.checkpoint as ocp

    from elbojax import train

    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    try:
        train.check_checkpoint(manager, state)
    except train.CheckpointMismatch as error:
        raise SystemExit(f"elbojax: {run_dir}: {error}") from None
    finally:
        manager.close()


def _restored_for_command(run_dir: Path, config: dict, dataset, mesh=None):
    """`_restore` for `evaluate` and `impute`: a run without a checkpoint yet is a clear error."""
    from elbojax import train as train_lib

    try:
        return _restore(run_dir, config, dataset, mesh)
    except FileNotFoundError:
        raise SystemExit(
            f"elbojax: {run_dir} has no checkpoint yet (it stopped before its first one); continue it "
            f"with `elbojax train --run-dir {run_dir} --resume`"
        ) from None
    except train_lib.CheckpointMismatch as error:  # a checkpoint that does not fit the model of its config.json
        raise SystemExit(f"elbojax: {run_dir}: {error}") from None


def _train(args) -> int:
    from elbojax import distributed, train

    with _naming_the_config_file(args):
        config = _config_from(args)
        mesh = _start_devices(args)
    config = _resolve_run(args, config)
    if config["batch_size"] % mesh.size:
        raise SystemExit(f"elbojax: the batch size ({config['batch_size']}) must be a multiple of the number of devices ({mesh.size})")
    dataset = _load_data(config["data"], config["data_dir"], args.download)
    images = _images_for_training(dataset, config)
    if config["batch_size"] > images.shape[0]:  # refused before the run folder is written
        raise SystemExit(f"elbojax: --batch-size ({config['batch_size']}) exceeds the {images.shape[0]} training examples of --data {config['data']}")
    model = build_model(config, images)
    try:
        objective_fn = _objective(config)
    except ValueError as error:  # an older run's config.json may hold a combination refused now
        raise SystemExit(f"elbojax: {error}") from None
    _check_objective(model, objective_fn, images.shape[1])
    optimizer = _optimizer(config)
    graphdef, state = train.init(model, optimizer)
    if args.resume:  # a checkpoint that does not fit is refused before the run folder changes
        _check_checkpoint_fits(args.run_dir, state)
    _write_run(args, config)
    if distributed.is_primary():
        devices = f"{mesh.size} {mesh.devices.flat[0].platform.upper()} device{'s' if mesh.size > 1 else ''}"
        print(f"training {config['objective'].upper()} (K={config['num_samples']}, gradient={config['gradient']}) on {config['data']}: "
              f"{images.shape[0]} examples, {config['steps']} steps, {devices} -> {args.run_dir}")
    try:
        state = train.fit(graphdef, state, optimizer, objective_fn, images, run_dir=args.run_dir, config=_fit_config(config), progress=not args.no_progress, mesh=mesh)
    except train.TrainingStopped as error:  # too many non-finite steps in a row
        raise SystemExit(f"elbojax: {error} A resumed run keeps its settings: for a lower --learning-rate, start a new run.") from None
    except train.CheckpointMismatch as error:  # on --resume: a checkpoint that does not fit the model of its config.json
        raise SystemExit(f"elbojax: {args.run_dir}: {error}") from None
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: fit has checkpointed the last finished call (single-process runs)
        terminated = isinstance(stop, train.Terminated)
        print(f"elbojax: {'terminated' if terminated else 'interrupted'}; continue with `elbojax train --run-dir {args.run_dir} --resume`", file=sys.stderr)
        raise SystemExit(143 if terminated else 130) from None
    _evaluate_and_report(args.run_dir, graphdef, state.params, dataset, config, args.eval_samples, args.eval_points, mesh)
    return 0


def _evaluate(args) -> int:
    from flax import nnx

    if args.eval_samples < 1 or args.eval_points < 0:
        raise SystemExit(f"elbojax: --eval-samples must be >= 1 and --eval-points >= 0, got {args.eval_samples} and {args.eval_points}")
    config = _run_config(args.run_dir)
    if args.gaps and config.get("model", "vae") != "vae":
        raise SystemExit("elbojax: --gaps needs a one-layer VAE (a diagonal Gaussian encoder); this run is a two-layer model")
    given = [flag for flag, value in (("--gap-points", args.gap_points), ("--gap-steps", args.gap_steps), ("--gap-flow", args.gap_flow or None)) if value is not None]
    if given and not args.gaps:
        raise SystemExit(f"elbojax: {', '.join(given)} set{'s' if len(given) == 1 else ''} up the gaps; add --gaps")
    args.gap_points = GAP_POINTS if args.gap_points is None else args.gap_points
    args.gap_steps = GAP_STEPS if args.gap_steps is None else args.gap_steps
    if args.gaps and (args.gap_points < 1 or args.gap_steps < 1):
        raise SystemExit("elbojax: --gap-points and --gap-steps must be >= 1")
    if args.gap_flow and config["latent_dim"] < 2:
        raise SystemExit(f"elbojax: --gap-flow fits a coupling flow, which needs a latent of 2 or more dimensions; this run's has {config['latent_dim']} (--gaps alone works)")
    dataset = _load_data(config["data"], _data_dir_for(args, config), False, "evaluate")
    mesh = _start_devices(args)
    graphdef, params = nnx.split(_restored_for_command(args.run_dir, config, dataset, mesh), nnx.Param)
    _evaluate_and_report(args.run_dir, graphdef, params, dataset, config, args.eval_samples, args.eval_points, mesh)
    if args.gaps:
        _report_gaps(args, nnx.merge(graphdef, params), _test_data(dataset.test.images, config), config)
    return 0


def _report_gaps(args, model, test, config: dict) -> None:
    """The inference gaps of the run's model on --gap-points test points (evenly spaced, `spread`)."""
    import jax

    from elbojax import distributed, flows, gaps

    flow_family = flows.local_flow_family(model.latent_dim) if args.gap_flow else None
    result = gaps.inference_gaps(
        jax.random.key(config["seed"]), model, test[spread(test.shape[0], args.gap_points)], num_steps=args.gap_steps,
        num_samples=args.eval_samples, flow_family=flow_family,
    )
    if not distributed.is_primary():
        return
    print()
    print(gaps.format_table(result))
    gaps.plot(result, args.run_dir / "gaps.png")
    _write_json(args.run_dir / "gaps.json", gaps.to_dict(result))
    print(f"wrote {args.run_dir / 'gaps.png'} and {args.run_dir / 'gaps.json'}")


def _check_seed_flag(seed: int) -> None:
    """--seed names one stream: JAX's keys and NumPy's seed sequences keep 32 bits of it."""
    if not 0 <= seed < 2**32:
        raise SystemExit(f"elbojax: --seed must be in [0, 2**32), got {seed}")


def _impute(args) -> int:
    """Complete test digits with a region hidden: `elbojax.missing.impute` per digit."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from elbojax import missing, plots

    for name in ("points", "imputations", "num_samples"):
        if getattr(args, name) < 1:
            raise SystemExit(f"elbojax: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    _check_seed_flag(args.seed)
    config = _run_config(args.run_dir)
    dataset = _load_data(config["data"], _data_dir_for(args, config), False, "impute")
    model = _restored_for_command(args.run_dir, config, dataset)
    test = _test_data(dataset.test.images, config)
    test = test[spread(test.shape[0], args.points)]
    mask = jnp.asarray(missing.hidden_region_mask(args.hide))
    if test.shape[1] != mask.size:
        raise SystemExit(f"elbojax: impute hides half of a 28 x 28 image; this run's data have {test.shape[1]} values per point")

    def complete(args_):
        key, x = args_
        result = missing.impute(key, x, mask, model, num_samples=args.num_samples, num_imputations=args.imputations)
        bound = missing.masked_iwae_bound(jax.random.fold_in(key, 2**31 - 1), x, mask, model, num_samples=args.num_samples)
        return result.means, result.effective_sample_size, bound

    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(args.seed), jnp.arange(test.shape[0], dtype=jnp.uint32))
    means, ess, bounds = jax.jit(lambda keys, xs: jax.lax.map(complete, (keys, xs)))(keys, jnp.asarray(test, jnp.float32))
    path = plots.completions(
        test, mask, means, effective_sample_size=ess, path=args.run_dir / f"completions_{args.hide}.png",
        title=f"{args.hide} half hidden; completions by importance resampling, K = {args.num_samples}",
    )
    ess, bounds = np.asarray(ess, np.float64), np.asarray(bounds, np.float64)
    record = {"hide": args.hide, "num_samples": args.num_samples, "seed": args.seed, "points": int(test.shape[0]),
              "effective_sample_size": ess.tolist(), "observed_log_likelihood_bound": bounds.tolist()}
    _write_json(args.run_dir / f"completions_{args.hide}.json", record)
    print(f"{test.shape[0]} test digits, {args.hide} half hidden, K = {args.num_samples} (imputations are biased at finite K; the ESS says how much to trust them)")
    print(f"effective sample size per digit: {', '.join(f'{e:.0f}' for e in ess)}")
    print(f"IWAE bound on log p(x_observed), mean: {bounds.mean():.2f} nats")
    print(f"wrote {path}")
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(argv)
    args.argv = argv
    return {"train": _train, "evaluate": _evaluate, "impute": _impute}[args.command](args)


def console_main() -> None:
    """The `elbojax` command: `main`, an interruption ending the process at once with status 130
    (Ctrl-C) or 143 (SIGTERM during training, 128 + 15 as a shell reports it).

    A JIT compilation interrupted by Ctrl-C goes on in XLA's threads, and the interpreter's
    ordinary exit then crashes in them (a segmentation fault, status 139; a plain JAX script
    does the same). By then `fit` has checkpointed and every file is closed, so `os._exit`
    loses nothing."""
    try:
        status = main()
    except KeyboardInterrupt:  # outside training's own handler: loading, compiling, the evaluation
        print("elbojax: interrupted", file=sys.stderr)
        status = 130
    except SystemExit as stop:
        if stop.code not in (130, 143):
            raise
        status = stop.code
    if status in (130, 143):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


if __name__ == "__main__":
    console_main()
