"""The `elbojax` command line: `elbojax train` and `elbojax evaluate RUN`.

Thin by design: it parses flags (before JAX starts its backend), builds a model from
`elbojax.models`, and calls `elbojax.train.fit` and `elbojax.train.evaluate`. A run folder holds
`config.json`, `metrics.jsonl`, `checkpoints/`, `evaluation.json` and the plots; `load_run`
brings a trained model back in Python with one call.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ARCHITECTURE_KEYS = ("latent_dim", "hidden", "data")
DATA_CHOICES = ("embedded", "mnist", "fashion-mnist", "binarized-mnist")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elbojax", description="Train and evaluate VAEs with elbojax's estimators.")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train a VAE (defaults: IWAE K=5 on the embedded MNIST subset, about two minutes on 2 CPU cores)")
    train.add_argument("--run-dir", type=Path, default=Path("runs/default"), help="the run folder (default: runs/default)")
    train.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last checkpoint")
    train.add_argument("--data", choices=DATA_CHOICES, default="embedded")
    train.add_argument("--data-dir", type=Path, default=None, help="folder with the data files (default: $ELBOJAX_DATA_DIR or ~/.cache/elbojax)")
    train.add_argument("--download", action="store_true", help="download missing data files into --data-dir")
    train.add_argument("--objective", choices=("elbo", "iwae"), default="iwae")
    train.add_argument("--num-samples", "-k", type=int, default=5, help="K, samples per data point (default 5)")
    train.add_argument("--gradient", choices=("reparam", "stl", "dreg"), default="reparam")
    train.add_argument("--latent-dim", type=int, default=16)
    train.add_argument("--hidden", type=str, default="200,200", help="hidden widths, comma-separated (default 200,200)")
    train.add_argument("--batch-size", type=int, default=100)
    train.add_argument("--steps", type=int, default=3000)
    train.add_argument("--learning-rate", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--steps-per-call", type=int, default=50)
    train.add_argument("--checkpoint-every", type=int, default=500)
    train.add_argument("--eval-samples", type=int, default=5000, help="K for the test log-likelihood (default 5000)")
    train.add_argument("--eval-points", type=int, default=500, help="test points to evaluate at the end (default 500; 0 for all)")
    train.add_argument("--no-progress", action="store_true")

    evaluate = commands.add_parser("evaluate", help="evaluate a trained run on its test set")
    evaluate.add_argument("run_dir", type=Path)
    evaluate.add_argument("--eval-samples", type=int, default=5000)
    evaluate.add_argument("--eval-points", type=int, default=0, help="test points (default 0: all)")
    return parser


def _hidden(text: str) -> list[int]:
    try:
        widths = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise SystemExit(f"elbojax: --hidden must be comma-separated positive integers, got {text!r}") from None
    if not widths or min(widths) < 1:
        raise SystemExit(f"elbojax: --hidden must be comma-separated positive integers, got {text!r}")
    return widths


def _config_from(args) -> dict:
    positive = ("num_samples", "latent_dim", "batch_size", "steps", "steps_per_call", "checkpoint_every", "eval_samples")
    for name in positive:
        if getattr(args, name) < 1:
            raise SystemExit(f"elbojax: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.checkpoint_every % args.steps_per_call:
        raise SystemExit(f"elbojax: --checkpoint-every ({args.checkpoint_every}) must be a multiple of --steps-per-call ({args.steps_per_call})")
    if args.learning_rate <= 0:
        raise SystemExit(f"elbojax: --learning-rate must be > 0, got {args.learning_rate}")
    return {
        "data": args.data,
        "objective": args.objective,
        "num_samples": args.num_samples,
        "gradient": args.gradient,
        "latent_dim": args.latent_dim,
        "hidden": _hidden(args.hidden),
        "batch_size": args.batch_size,
        "steps": args.steps,
        "learning_rate": args.learning_rate,
        "seed": args.seed,
        "steps_per_call": args.steps_per_call,
        "checkpoint_every": args.checkpoint_every,
    }


def _load_data(name: str, data_dir, download: bool):
    from elbojax import data

    if name == "embedded":
        return data.load_embedded_mnist()
    loaders = {"mnist": data.load_mnist, "fashion-mnist": data.load_fashion_mnist, "binarized-mnist": data.load_binarized_mnist}
    return loaders[name](data_dir, download=download)


def _as_binary(images):
    """Test images as binary floats: one fixed Bernoulli(grey / 255) sample (seed 0), the same
    distribution the model was trained on; already-binary data as they are."""
    import numpy as np

    from elbojax import data

    flat = images.reshape(images.shape[0], -1)
    if flat.dtype == np.bool_:
        return flat.astype(np.float32)
    return data.static_binarize(flat, seed=0)


def build_model(config: dict, train_images):
    """The VAE of `config`, its decoder's output bias set from the training data's mean."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from elbojax import models

    flat = train_images.reshape(train_images.shape[0], -1)
    data_dim = flat.shape[1]
    mean = flat.mean(0) / (255.0 if flat.dtype == np.uint8 else 1.0)
    rngs = nnx.Rngs(config["seed"])
    encoder = models.GaussianMLPEncoder(data_dim, config["latent_dim"], tuple(config["hidden"]), jnp.tanh, rngs=rngs)
    decoder = models.BernoulliMLPDecoder(
        config["latent_dim"], data_dim, tuple(reversed(config["hidden"])), jnp.tanh, rngs=rngs,
        output_bias=models.bias_from_data_mean(jnp.asarray(mean, jnp.float32)),
    )
    return models.VAE(encoder, decoder, models.StandardNormalPrior(config["latent_dim"]), likelihood="bernoulli")


def _prepare_run(args, config: dict) -> dict:
    run_dir: Path = args.run_dir
    saved = run_dir / "config.json"
    if args.resume:
        if not saved.exists():
            raise SystemExit(f"elbojax: --resume given but {saved} does not exist; start a new run without --resume")
        previous = json.loads(saved.read_text())
        changed = [key for key in ARCHITECTURE_KEYS if previous.get(key) != config[key]]
        if changed:
            details = ", ".join(f"{key}: checkpoint {previous.get(key)!r}, flags {config[key]!r}" for key in changed)
            raise SystemExit(f"elbojax: cannot resume {run_dir}: the architecture differs from the checkpoint's ({details})")
        previous["steps"] = config["steps"]  # resuming may extend the run
        config = previous
    elif saved.exists():
        raise SystemExit(f"elbojax: {run_dir} already holds a run; pass --resume to continue it, or choose another --run-dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(config, indent=2) + "\n")
    return config


def _fit_config(config: dict):
    from elbojax import train

    return train.FitConfig(
        seed=config["seed"], batch_size=config["batch_size"], num_steps=config["steps"],
        steps_per_call=config["steps_per_call"], checkpoint_every=config["checkpoint_every"],
        binarize="dynamic",
    )


def _images_for_training(dataset):
    import numpy as np

    images = dataset.train.images.reshape(dataset.train.images.shape[0], -1)
    if images.dtype == np.bool_:  # binarized MNIST is binary already: grey levels 0 / 255
        images = images.astype(np.uint8) * 255
    return images


def _print_evaluation(result) -> None:
    rows = [
        (f"test log-likelihood (K={result.num_samples})", f"{result.log_likelihood:.2f} ± {result.log_likelihood_se:.2f} nats"),
        ("bits per dimension", f"{result.bits_per_dim:.4f}"),
        ("ELBO", f"{result.elbo:.2f} nats"),
        ("KL(q || prior)", f"{result.kl:.2f} nats"),
        ("active units", f"{result.active_units} of {len(result.kl_per_dimension)}"),
        ("test points", f"{result.num_points}"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


def _evaluate_and_report(run_dir: Path, graphdef, params, dataset, eval_samples: int, eval_points: int, seed: int):
    import numpy as np

    from elbojax import plots, train

    test = _as_binary(dataset.test.images)
    labels = dataset.test.labels
    if eval_points:
        test, labels = test[:eval_points], (None if labels is None else labels[:eval_points])
    result = train.evaluate(graphdef, params, test, seed=seed, num_samples=eval_samples)
    record = result._replace(kl_per_dimension=np.asarray(result.kl_per_dimension).tolist())._asdict()
    (run_dir / "evaluation.json").write_text(json.dumps(record, indent=2) + "\n")
    _print_evaluation(result)
    written = plots.write_run_plots(run_dir, graphdef, params, test, labels, seed=seed)
    print("plots: " + ", ".join(str(p) for p in written))
    return result


def load_run(run_dir):
    """The trained model of a run folder (its latest checkpoint), as an `elbojax.models.VAE`."""
    run_dir = Path(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    return _restore(run_dir, config, _load_data(config["data"], None, False))


def _restore(run_dir: Path, config: dict, dataset):
    """The model of `config` with the parameters of the run's latest checkpoint."""
    import jax
    import optax
    import orbax.checkpoint as ocp
    from flax import nnx

    from elbojax import train

    model = build_model(config, _images_for_training(dataset))
    graphdef, state = train.init(model, optax.adam(config["learning_rate"]))
    manager = ocp.CheckpointManager((run_dir / "checkpoints").absolute())
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
    manager.close()
    return nnx.merge(graphdef, state.params)


def _train(args) -> int:
    import optax

    from elbojax import train

    config = _prepare_run(args, _config_from(args))
    dataset = _load_data(config["data"], args.data_dir, args.download)
    images = _images_for_training(dataset)
    model = build_model(config, images)
    optimizer = optax.adam(config["learning_rate"])
    graphdef, state = train.init(model, optimizer)
    per_point = train.objective(config["objective"], num_samples=config["num_samples"], gradient=config["gradient"])
    print(f"training {config['objective'].upper()} (K={config['num_samples']}, gradient={config['gradient']}) on {config['data']}: "
          f"{images.shape[0]} examples, {config['steps']} steps -> {args.run_dir}")
    state = train.fit(graphdef, state, optimizer, per_point, images, run_dir=args.run_dir, config=_fit_config(config), progress=not args.no_progress)
    _evaluate_and_report(args.run_dir, graphdef, state.params, dataset, args.eval_samples, args.eval_points, config["seed"])
    return 0


def _evaluate(args) -> int:
    from flax import nnx

    config_path = args.run_dir / "config.json"
    if not config_path.exists():
        raise SystemExit(f"elbojax: {args.run_dir} is not a run folder (no config.json)")
    config = json.loads(config_path.read_text())
    dataset = _load_data(config["data"], None, False)
    graphdef, params = nnx.split(_restore(args.run_dir, config, dataset), nnx.Param)
    _evaluate_and_report(args.run_dir, graphdef, params, dataset, args.eval_samples, args.eval_points, config["seed"])
    return 0


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    return _train(args) if args.command == "train" else _evaluate(args)


if __name__ == "__main__":
    sys.exit(main())
