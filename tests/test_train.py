"""The pure training step: it raises the bound, skips non-finite steps, and is a function of position."""

import signal

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import elbojax as ej
from elbojax import exact, models, train
from helpers import interrupt_fetching


class LinearVAE(nnx.Module):
    """A linear-Gaussian VAE: q(z|x) = N(Ax + a, diag exp(2s)), p(x|z) = N(Wz + b, I), p(z) = N(0, I)."""

    def __init__(self, data_dim, latent_dim, *, rngs):
        self.encoder = nnx.Linear(data_dim, 2 * latent_dim, rngs=rngs)
        self.decoder = nnx.Linear(latent_dim, data_dim, rngs=rngs)
        self.latent_dim = latent_dim

    def proposal(self, x):
        stats = self.encoder(x)
        return distrax.MultivariateNormalDiag(stats[: self.latent_dim], jnp.exp(stats[self.latent_dim :]))

    def log_joint(self, x, z):
        mean = self.decoder(z)
        return -0.5 * jnp.sum((x - mean) ** 2 + jnp.log(2 * jnp.pi)) - 0.5 * jnp.sum(z**2 + jnp.log(2 * jnp.pi))


@pytest.fixture(scope="module")
def setup():
    truth = exact.LinearGaussian(
        jax.random.normal(jax.random.key(0), (6, 2)), jnp.zeros(6), jnp.ones(6)
    )
    data, _ = truth.sample(jax.random.key(1), 64)
    return data


def _fresh(objective_name="iwae", gradient="reparam", lr=1e-2):
    model = LinearVAE(6, 2, rngs=nnx.Rngs(0))
    optimizer = optax.adam(lr)
    graphdef, state = train.init(model, optimizer)
    per_point = train.objective(objective_name, num_samples=4, gradient=gradient)
    return graphdef, state, train.make_step(graphdef, optimizer, per_point, seed=7)


@pytest.mark.parametrize("objective_name, gradient", [("elbo", "reparam"), ("iwae", "dreg")])
def test_training_raises_the_bound(setup, objective_name, gradient):
    data = setup
    _, state, step = _fresh(objective_name, gradient)
    multi = jax.jit(train.make_multi_step(step))
    indices = jnp.arange(64).reshape(8, 8)
    batches = data[indices]
    first = None
    for _ in range(40):
        state, info = multi(state, batches, indices)
        first = info.objective[0] if first is None else first
    assert int(state.step) == 320 and int(state.num_skipped) == 0
    assert float(info.objective.mean()) > float(first) + 2.0, (first, info.objective)


def test_scan_equals_single_steps_and_keys_follow_position(setup):
    data = setup
    _, state, step = _fresh()
    indices = jnp.arange(16).reshape(2, 8)
    scanned, _ = jax.jit(train.make_multi_step(step))(state, data[indices], indices)
    single = jax.jit(step)
    one_by_one = state
    for s in range(2):
        one_by_one, _ = single(one_by_one, data[indices[s]], indices[s])
    for a, b in zip(jax.tree.leaves(scanned.params), jax.tree.leaves(one_by_one.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # The batch order within a step does not matter: each example's key is its global index.
    perm = jnp.array([3, 1, 0, 2, 7, 6, 5, 4])
    a, _ = single(state, data[indices[0]], indices[0])
    b, _ = single(state, data[indices[0]][perm], indices[0][perm])
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["call", "in_loop"])
def test_a_non_finite_step_is_skipped_and_counted(setup, form):
    data = setup
    _, state, step = _fresh()
    step = step if form == "call" else step.in_loop  # the two ways a skip keeps the old state
    bad = data[:8].at[3, 0].set(jnp.nan)
    new_state, info = jax.jit(step)(state, bad, jnp.arange(8))
    assert not bool(info.finite)
    assert int(new_state.num_skipped) == 1 and int(new_state.skipped_in_a_row) == 1
    for a, b in zip(jax.tree.leaves(new_state.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(new_state.opt_state))
    good_state, info = jax.jit(step)(new_state, data[:8], jnp.arange(8))
    assert bool(info.finite) and int(good_state.skipped_in_a_row) == 0 and int(good_state.num_skipped) == 1


def test_a_skipped_step_inside_the_scan_leaves_the_carry_as_it_was(setup):
    data = setup
    _, state, step = _fresh()
    indices = jnp.arange(24).reshape(3, 8)
    batches = data[indices].at[1, 3, 0].set(jnp.nan)  # the middle step's loss is NaN
    scanned, info = jax.jit(train.make_multi_step(step))(state, batches, indices)
    assert info.finite.tolist() == [True, False, True] and int(scanned.num_skipped) == 1
    single = jax.jit(step)
    by_hand = state
    for s in (0, 2):  # the good steps only, each at its own position
        by_hand, _ = single(by_hand._replace(step=jnp.int32(s)), batches[s], indices[s])
    for a, b in zip(jax.tree.leaves((scanned.params, scanned.opt_state)), jax.tree.leaves((by_hand.params, by_hand.opt_state))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _marked_objective():
    """The ELBO less 1e-3 sqrt(c W_00^2) (W the decoder's kernel): c = 0 for an example whose first
    entry is 7, where the value stays finite but the gradient of W_00 is NaN (0 / 0), and only
    that one entry of the whole gradient."""
    elbo = train.objective("elbo", num_samples=4)

    def batch_objective(keys, model, batch, step):
        terms = elbo(keys, model, batch, step)
        c = jnp.where(batch[:, 0] == 7.0, 0.0, 1.0)
        penalty = jnp.mean(jnp.sqrt(c * model.decoder.kernel[0, 0] ** 2))
        return terms._replace(objective=terms.objective - 1e-3 * penalty)

    return batch_objective


@pytest.mark.parametrize("data_dim, latent_dim", [(6, 2), (96, 48)])
def test_the_scan_checks_once_per_call_and_catches_a_non_finite_gradient_of_a_finite_loss(setup, data_dim, latent_dim):
    # (96, 48): a 48 x 96 decoder kernel, 4608 entries. On CPU, XLA's `max` over 4096 entries or
    # more skips a NaN (fast min/max), so a check built on it missed the one NaN entry here.
    data = setup if data_dim == 6 else jax.random.normal(jax.random.key(2), (64, data_dim))
    model = LinearVAE(data_dim, latent_dim, rngs=nnx.Rngs(0))
    optimizer = optax.adam(1e-2)
    graphdef, state = train.init(model, optimizer)
    step = train.make_step(graphdef, optimizer, _marked_objective(), seed=7)
    indices = jnp.arange(24).reshape(3, 8)
    # The last step: a finite loss with a NaN gradient. Only the check of the state the unchecked
    # steps end with can see it (a NaN in the parameters would make any later loss NaN too).
    batches = data[indices].at[2, 3, 0].set(7.0)
    kept, info = jax.jit(step)(state, batches[2], indices[2])
    assert np.isfinite(info.objective) and not np.isfinite(info.grad_norm) and not bool(info.finite)
    # The one-step call applies the update first and undoes it: the state is the old one, exactly.
    assert int(kept.num_skipped) == 1
    for a, b in zip(jax.tree.leaves((kept.params, kept.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)
    scanned, info = jax.jit(train.make_multi_step(step))(state, batches, indices)
    assert info.finite.tolist() == [True, True, False] and int(scanned.num_skipped) == 1
    assert np.all(np.isfinite(np.asarray(info.grad_norm)[:2]))  # the checked re-run reports the norms
    single = jax.jit(step)
    by_hand = state
    for s in (0, 1):
        by_hand, _ = single(by_hand._replace(step=jnp.int32(s)), batches[s], indices[s])
    for a, b in zip(jax.tree.leaves((scanned.params, scanned.opt_state)), jax.tree.leaves((by_hand.params, by_hand.opt_state))):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_the_once_per_call_check_and_the_per_step_check_agree_when_all_is_finite(setup):
    data = setup
    _, state, step = _fresh()
    indices = jnp.arange(24).reshape(3, 8)
    once, info_once = jax.jit(train.make_multi_step(step))(state, data[indices], indices)
    every, info_every = jax.jit(train.make_multi_step(step, check="step"))(state, data[indices], indices)
    for a, b in zip(jax.tree.leaves(once), jax.tree.leaves(every)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(info_once.objective, info_every.objective, rtol=1e-6)
    assert np.all(np.isnan(info_once.grad_norm)) and np.all(np.isfinite(info_every.grad_norm))
    assert np.all(info_once.finite) and np.all(info_every.finite)
    with pytest.raises(ValueError, match=r"`check` must be 'call' or 'step', got 'never'"):
        train.make_multi_step(step, check="never")


def test_step_argument_errors(setup):
    data = setup
    _, state, step = _fresh()
    with pytest.raises(ValueError, match=r"`indices` must have shape \(8,\), one per example of `batch`, got \(4,\)"):
        step(state, data[:8], jnp.arange(4))
    with pytest.raises(ValueError, match=r"`name` must be one of \['elbo', 'iwae'\], got 'vae'"):
        train.objective("vae")


# ------------------------------------------------------------------------------------------------
# fit: checkpoints and resumption
# ------------------------------------------------------------------------------------------------

IMAGES = np.random.default_rng(0).integers(0, 256, size=(64, 6), dtype=np.uint8)
CONFIG = train.FitConfig(seed=3, batch_size=8, num_steps=40, steps_per_call=5, checkpoint_every=10, keep_checkpoints=2)


def _fit(run_dir, num_steps):
    graphdef, state, _ = _fresh()
    per_point = train.objective("iwae", num_samples=4)
    return train.fit(graphdef, state, optax.adam(1e-2), per_point, IMAGES, run_dir=run_dir, config=CONFIG._replace(num_steps=num_steps), progress=False)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_while_a_checkpoint_is_written_waits_for_it(tmp_path, monkeypatch, signum):
    """Interrupted, orbax left the checkpoint unfinished and could not write it again: fit's
    Ctrl-C handler failed with an OSError and the steps since the last checkpoint were lost."""
    import os

    import orbax.checkpoint as ocp

    real_save, saves = ocp.CheckpointManager.save, []

    def save_with_signal(self, step, *args, **kwargs):
        saves.append(step)
        if len(saves) == 2:
            os.kill(os.getpid(), signum)  # as the second checkpoint starts
        return real_save(self, step, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, "save", save_with_signal)
    with pytest.raises(train.Terminated if signum == signal.SIGTERM else KeyboardInterrupt):
        _fit(tmp_path / "r", 40)
    assert saves == [10, 20]  # written once each, then the interruption
    monkeypatch.setattr(ocp.CheckpointManager, "save", real_save)
    manager = ocp.CheckpointManager((tmp_path / "r" / "checkpoints").absolute())
    assert manager.latest_step() == 20
    manager.close()
    assert int(_fit(tmp_path / "r", 40).step) == 40  # and it resumes from it


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path):
    whole = _fit(tmp_path / "whole", 40)
    _fit(tmp_path / "split", 20)
    resumed = _fit(tmp_path / "split", 40)
    assert int(resumed.step) == 40
    _assert_same_params(resumed, whole)
    lines = (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 8  # 4 calls of 5 steps, then 4 more after the resume
    kept = sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir())
    assert kept == ["30", "40"], kept  # the last two


@pytest.mark.parametrize("signum", [None, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_checkpoints_the_last_recorded_call_and_the_resume_is_exact(tmp_path, monkeypatch, capsys, signum):
    """Interrupted during the fourth call (steps 15-20; the last checkpoint is step 10): step 15 is
    checkpointed, so no work is lost, and the resumed run equals the uninterrupted one. SIGTERM,
    which a batch scheduler sends before it kills a job, ended the process at once: the steps
    since step 10 were lost."""
    import json

    whole = _fit(tmp_path / "whole", 40)
    restore_fetching = interrupt_fetching(monkeypatch, call=4, signum=signum)
    with pytest.raises(train.Terminated if signum else KeyboardInterrupt):
        _fit(tmp_path / "split", 40)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # fit's handler is gone
    assert f"{'terminated' if signum else 'interrupted'}: checkpointed step 15" in capsys.readouterr().err
    assert sorted(int(p.name) for p in (tmp_path / "split" / "checkpoints").iterdir()) == [10, 15]
    restore_fetching()
    resumed = _fit(tmp_path / "split", 40)
    _assert_same_params(resumed, whole)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(5, 45, 5))


def test_a_sigterm_handler_of_the_callers_own_is_left_in_place(tmp_path, monkeypatch):
    """`fit` turns SIGTERM into `Terminated` only where it has its default action."""
    caught = []

    def own(signum, frame):
        caught.append(signum)

    previous = signal.signal(signal.SIGTERM, own)
    try:
        interrupt_fetching(monkeypatch, call=2, signum=signal.SIGTERM)
        assert int(_fit(tmp_path / "r", 20).step) == 20  # not stopped
        assert caught == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is own
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_a_metrics_line_cut_short_by_a_kill_does_not_block_the_resume(tmp_path):
    """A line cut off mid-write (a kill, a full disk) made every later resume fail with a
    JSONDecodeError; it is dropped with the lines past the checkpoint."""
    import json

    _fit(tmp_path / "split", 20)
    with open(tmp_path / "split" / "metrics.jsonl", "a") as metrics:
        metrics.write('{"step": 25, "objective": -8.1')
    _fit(tmp_path / "split", 30)
    steps = [json.loads(line)["step"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15, 20, 25, 30]


def test_a_run_extended_from_a_step_between_calls_keeps_its_checkpoints(tmp_path):
    """A 23-step run (calls of 5: its last is 3 steps) extended to 45: the first call after the
    resume is 2 steps long, so that checkpoints fall on multiples of `checkpoint_every` again."""
    def fit(run_dir, num_steps):
        graphdef, state, _ = _fresh()
        config = CONFIG._replace(num_steps=num_steps, keep_checkpoints=10)
        return train.fit(graphdef, state, optax.adam(1e-2), train.objective("iwae", num_samples=4), IMAGES, run_dir=run_dir, config=config, progress=False)

    fit(tmp_path / "split", 23)
    assert _finished_checkpoints(tmp_path / "split" / "checkpoints") and sorted(_finished_checkpoints(tmp_path / "split" / "checkpoints")) == [10, 20, 23]
    extended = fit(tmp_path / "split", 45)
    assert sorted(_finished_checkpoints(tmp_path / "split" / "checkpoints")) == [10, 20, 23, 30, 40, 45]
    _assert_same_params(extended, fit(tmp_path / "whole", 45))


def test_an_optimizer_state_with_a_prng_key_trains_checkpoints_and_resumes(tmp_path):
    """`optax.noisy_sgd` keeps a typed PRNG key in its state, which numpy cannot hold (`fit` failed
    placing it on the devices); a resumed run still equals an uninterrupted one."""
    def fit(run_dir, num_steps):
        graphdef, state, _ = _fresh()
        optimizer = optax.noisy_sgd(1e-2, key=0)
        _, state = train.init(nnx.merge(graphdef, state.params), optimizer)
        per_point = train.objective("iwae", num_samples=4)
        return train.fit(graphdef, state, optimizer, per_point, IMAGES, run_dir=run_dir, config=CONFIG._replace(num_steps=num_steps), progress=False)

    fit(tmp_path / "split", 20)
    resumed = fit(tmp_path / "split", 30)
    whole = fit(tmp_path / "whole", 30)
    assert int(resumed.step) == 30
    _assert_same_params(resumed, whole)


def test_a_checkpoint_in_the_older_nnx_state_layout_resumes(tmp_path):
    """Checkpoints written when `TrainState.params` was an `nnx.State` (each leaf under a `value` key) still load."""
    import orbax.checkpoint as ocp

    whole = _fit(tmp_path / "whole", 40)
    halfway = _fit(tmp_path / "new", 20)
    graphdef, _, _ = _fresh()
    structure = jax.tree.structure(halfway.params)
    is_params = lambda node: isinstance(node, dict) and jax.tree.structure(node) == structure
    as_nnx_state = lambda node: nnx.split(nnx.merge(graphdef, node), nnx.Param)[1] if is_params(node) else node
    older = jax.tree.map(as_nnx_state, halfway, is_leaf=is_params)  # params and the Adam moments
    assert isinstance(older.params, nnx.State) and isinstance(older.opt_state[0].mu, nnx.State)
    manager = ocp.CheckpointManager((tmp_path / "old" / "checkpoints").absolute())
    manager.save(20, args=ocp.args.StandardSave(older))
    manager.wait_until_finished()
    on_disk = [path for path, _ in jax.tree_util.tree_flatten_with_path(manager.item_metadata(20))[0]]
    assert all(path[-1].key == "value" for path in on_disk if path[0].key in ("params", "opt_state") and len(path) > 3)
    rngs = nnx.Rngs(0)  # another model: a VAE of `elbojax.models` on the same data
    _, other = train.init(models.VAE(models.GaussianMLPEncoder(6, 2, (4,), rngs=rngs), models.BernoulliMLPDecoder(2, 6, (4,), rngs=rngs), models.StandardNormalPrior(2)), optax.adam(1e-2))
    with pytest.raises(ValueError, match="does not fit this model and optimizer"):
        train.restore(manager, other)
    manager.close()

    resumed = _fit(tmp_path / "old", 40)
    assert int(resumed.step) == 40 and type(resumed.params) is dict
    _assert_same_params(resumed, whole)
    # A checkpoint of another model is refused (with orbax's account of what differs); a missing step too.
    manager = ocp.CheckpointManager((tmp_path / "old" / "checkpoints").absolute())
    with pytest.raises(ValueError, match="does not fit this model and optimizer"):
        train.restore(manager, other, 40)
    with pytest.raises(FileNotFoundError, match=r"No checkpoint of step 20 in .*; it has steps \[30, 40\]"):
        train.restore(manager, halfway, 20)
    manager.close()


def _finished_checkpoints(folder):
    """Steps of the finished checkpoints (orbax writes into `N.orbax-checkpoint-tmp*` first)."""
    return [int(p.name) for p in folder.glob("*") if p.name.isdigit()] if folder.exists() else []


@pytest.mark.slow
def test_a_run_killed_with_sigkill_resumes(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    run_dir = tmp_path / "killed"
    script = f"""
import sys; sys.path.insert(0, {str(Path(__file__).parent)!r})
import test_train
test_train._fit({str(run_dir)!r}, 10**7)
"""
    process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    checkpoints = run_dir / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline:
        done = _finished_checkpoints(checkpoints)
        if done and max(done) >= 30:
            break
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    latest = max(_finished_checkpoints(checkpoints))
    target = latest + 20
    resumed = _fit(run_dir, target)
    whole = _fit(tmp_path / "whole", target)
    assert int(resumed.step) == target
    _assert_same_params(resumed, whole)


def test_fit_refuses_bad_data_and_config(tmp_path):
    graphdef, state, _ = _fresh()
    per_point = train.objective("elbo", num_samples=1)
    floats = IMAGES.astype(np.float32) / 255.0
    with pytest.raises(ValueError, match=r"images"):
        train.fit(graphdef, state, optax.adam(1e-2), per_point, floats, run_dir=tmp_path, config=CONFIG._replace(binarize="none"), progress=False)
    with pytest.raises(TypeError, match=r"binarize='dynamic' needs uint8 grey levels, got dtype float32"):
        train.fit(graphdef, state, optax.adam(1e-2), per_point, floats, run_dir=tmp_path, config=CONFIG, progress=False)
    with pytest.raises(ValueError, match=r"`checkpoint_every` \(7\) must be a multiple of `steps_per_call` \(5\)"):
        train.fit(graphdef, state, optax.adam(1e-2), per_point, IMAGES, run_dir=tmp_path, config=CONFIG._replace(checkpoint_every=7), progress=False)


def test_fit_refuses_a_non_finite_starting_state(tmp_path):
    graphdef, state, _ = _fresh()
    bias = state.params["decoder"]["bias"]
    state = state._replace(params={**state.params, "decoder": {**state.params["decoder"], "bias": bias.at[2].set(jnp.nan)}})
    per_point = train.objective("elbo", num_samples=1)
    with pytest.raises(ValueError, match=r"The starting state holds NaN or infinite entries \(params\['decoder'\]\['bias'\], 1 of 6\)"):
        train.fit(graphdef, state, optax.adam(1e-2), per_point, IMAGES, run_dir=tmp_path, config=CONFIG, progress=False)
    assert not (tmp_path / "metrics.jsonl").exists()  # refused before any step


def test_data_beyond_float32_are_refused_at_the_host_boundary(tmp_path):
    rngs = nnx.Rngs(0)
    gaussian = models.VAE(models.GaussianMLPEncoder(6, 2, (8,), rngs=rngs), models.GaussianMLPDecoder(2, 6, (8,), rngs=rngs), models.StandardNormalPrior(2))
    graphdef, state = train.init(gaussian, optax.adam(1e-2))
    real = np.random.default_rng(1).normal(size=(64, 6))
    real[5, 3] = 1e39  # finite in float64, inf on the device
    with pytest.raises(ValueError, match=r"`images` must fit float32 .* got 1e\+39 at index \(5, 3\)"):
        train.fit(graphdef, state, optax.adam(1e-2), train.objective("elbo", num_samples=1), real, run_dir=tmp_path, config=CONFIG._replace(binarize="none"), progress=False)
    with pytest.raises(ValueError, match=r"`data` must fit float32"):
        train.evaluate(graphdef, state.params, real, num_samples=4)


def test_a_multi_step_call_needs_stacked_batches(setup):
    _, state, step = _fresh()
    multi = jax.jit(train.make_multi_step(step))
    with pytest.raises(ValueError, match=r"takes its steps' batches stacked, `batches` \(S, B, ...\) and `indices` \(S, B\); got batches \(8, 6\) and indices \(8,\)"):
        multi(state, setup[:8], jnp.arange(8))
    with pytest.raises(ValueError, match=r"got batches \(2, 8, 6\) and indices \(3, 8\)"):
        multi(state, setup[:16].reshape(2, 8, 6), jnp.arange(24).reshape(3, 8))


def test_a_step_of_your_own_may_stack_its_batches_its_own_way(setup):
    """The stacking check is for `make_step`'s steps; a custom step's per-step leaves of shape (S,)
    and `indices=None` are scanned as they are."""
    def own_step(total, batch, indices):
        assert indices is None
        return total + batch["scale"] * jnp.sum(batch["x"]), total

    batches = {"x": setup[:16].reshape(2, 8, 6), "scale": jnp.array([1.0, 2.0])}
    total, _ = jax.jit(train.make_multi_step(own_step))(jnp.zeros(()), batches, None)
    np.testing.assert_allclose(total, jnp.sum(setup[:8]) + 2 * jnp.sum(setup[8:16]), rtol=1e-5)


def test_init_refuses_variables_that_are_not_params():
    class WithBuffer(LinearVAE):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.running_mean = nnx.Variable(jnp.zeros(6))

    with pytest.raises(ValueError, match=r"WithBuffer has other variables: running_mean \(Variable\)"):
        train.init(WithBuffer(6, 2, rngs=nnx.Rngs(0)), optax.adam(1e-2))


def test_fit_stops_after_too_many_non_finite_steps(tmp_path):
    graphdef, state, _ = _fresh(lr=1e30)  # diverges at once
    per_point = train.objective("elbo", num_samples=1)
    with pytest.raises(train.TrainingStopped, match=r"steps in a row had a non-finite loss, gradient or update"):
        train.fit(graphdef, state, optax.sgd(1e30), per_point, IMAGES, run_dir=tmp_path, config=CONFIG._replace(max_skipped_in_a_row=3, num_steps=400), progress=False)
    # What it checkpointed as the last good state is finite.
    import orbax.checkpoint as ocp

    manager = ocp.CheckpointManager((tmp_path / "checkpoints").absolute())
    last = train.restore(manager, state)
    manager.close()
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves((last.params, last.opt_state)))


def test_metrics_average_the_applied_steps_of_a_call(tmp_path):
    """One skipped step (NaN at step 2 of a 5-step call) leaves the call's metrics the mean of its
    four applied steps (it made the whole line NaN); a call with every step skipped writes null."""
    import json

    graphdef, state, _ = _fresh()
    base = train.objective("elbo", num_samples=1)

    def marked(keys, model, batch, step):
        terms = base(keys, model, batch, step)
        return terms._replace(objective=jnp.where((step == 2) | (step >= 5), jnp.nan, terms.objective))

    train.fit(graphdef, state, optax.adam(1e-2), marked, IMAGES, run_dir=tmp_path,
              config=CONFIG._replace(num_steps=10, checkpoint_every=5, max_skipped_in_a_row=10), progress=False)
    first, second = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first["num_skipped"] == 1 and np.isfinite(first["objective"])
    assert second["num_skipped"] == 6 and second["objective"] is None and second["kl"] is None


def test_fit_stops_after_a_run_of_skipped_steps_that_ends_inside_a_call(tmp_path):
    """NaN at steps 2-6 of a 10-step call with a limit of 3: the run stops (it went on, since only
    the streak at the call's end was looked at), counting a streak carried in from the call before."""
    graphdef, state, _ = _fresh()
    base = train.objective("elbo", num_samples=1)

    def nan_at(first, last):
        def marked(keys, model, batch, step):
            terms = base(keys, model, batch, step)
            return terms._replace(objective=jnp.where((step >= first) & (step <= last), jnp.nan, terms.objective))
        return marked

    config = CONFIG._replace(num_steps=20, steps_per_call=10, checkpoint_every=10, max_skipped_in_a_row=3)
    with pytest.raises(train.TrainingStopped, match=r"Stopped at step 10: 5 steps in a row"):
        train.fit(graphdef, state, optax.adam(1e-2), nan_at(2, 6), IMAGES, run_dir=tmp_path / "inside", config=config, progress=False)
    # Two skipped steps at the end of one call and one at the start of the next make three.
    with pytest.raises(train.TrainingStopped, match=r"Stopped at step 10: 3 steps in a row"):
        train.fit(graphdef, state, optax.adam(1e-2), nan_at(3, 5), IMAGES, run_dir=tmp_path / "across",
                  config=config._replace(steps_per_call=5, checkpoint_every=5), progress=False)
    finished = train.fit(graphdef, state, optax.adam(1e-2), nan_at(3, 4), IMAGES, run_dir=tmp_path / "short",
                         config=config._replace(steps_per_call=5, checkpoint_every=5), progress=False)
    assert int(finished.step) == 20 and int(finished.num_skipped) == 2
    # A stopped run resumed with a healthy objective goes on: its streak is not extended.
    with pytest.raises(train.TrainingStopped, match=r"Stopped at step 5: 2 steps in a row"):
        train.fit(graphdef, state, optax.adam(1e-2), nan_at(3, 4), IMAGES, run_dir=tmp_path / "resumed",
                  config=config._replace(steps_per_call=5, checkpoint_every=5, max_skipped_in_a_row=2), progress=False)
    resumed = train.fit(graphdef, state, optax.adam(1e-2), base, IMAGES, run_dir=tmp_path / "resumed",
                        config=config._replace(steps_per_call=5, checkpoint_every=5, max_skipped_in_a_row=2), progress=False)
    assert int(resumed.step) == 20 and int(resumed.num_skipped) == 2


def test_metrics_lines_are_strict_json_when_the_kl_is_not_reported(tmp_path):
    """An objective that does not report the KL (NaN) wrote a bare NaN, which is not JSON."""
    import json

    graphdef, state, _ = _fresh()
    per_point = train.per_point_objective(lambda k, m, x: ej.iwae_bound(k, x, m.log_joint, m.proposal(x), num_samples=2))
    train.fit(graphdef, state, optax.adam(1e-2), per_point, IMAGES, run_dir=tmp_path, config=CONFIG._replace(num_steps=10), progress=False)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    records = [json.loads(line, parse_constant=refuse) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kl"] for r in records] == [None, None] and all(np.isfinite(r["objective"]) for r in records)


@pytest.mark.parametrize("check", ["call", "step"])
def test_a_call_whose_finite_gradients_give_a_non_finite_update_is_undone(setup, check):
    """An infinite learning rate: every gradient is finite, the first update is not. No check of
    the gradient sees it; the check of the state the call ends with does, and undoes the call."""
    data = setup
    model = LinearVAE(6, 2, rngs=nnx.Rngs(0))
    optimizer = optax.sgd(float("inf"))
    graphdef, state = train.init(model, optimizer)
    step = train.make_step(graphdef, optimizer, train.objective("elbo", num_samples=2), seed=7)
    indices = jnp.arange(24).reshape(3, 8)
    new_state, info = jax.jit(train.make_multi_step(step, check=check))(state, data[indices], indices)
    assert info.finite.tolist() == [False] * 3
    assert (int(new_state.step), int(new_state.num_skipped), int(new_state.skipped_in_a_row)) == (3, 3, 3)
    for a, b in zip(jax.tree.leaves((new_state.params, new_state.opt_state)), jax.tree.leaves((state.params, state.opt_state))):
        np.testing.assert_array_equal(a, b)


def test_evaluate_reports_consistent_numbers(setup):
    rngs = nnx.Rngs(0)
    vae = models.VAE(models.GaussianMLPEncoder(6, 2, (8,), rngs=rngs), models.BernoulliMLPDecoder(2, 6, (8,), rngs=rngs), models.StandardNormalPrior(2))
    graphdef, params = nnx.split(vae, nnx.Param)
    binary = (np.asarray(setup) > 0).astype(np.float32)[:6]
    result = train.evaluate(graphdef, params, binary, num_samples=400, chunk_size=64, elbo_samples=50)
    assert result.num_points == 6 and result.num_samples == 400 and result.latent_dim == 2
    assert result.elbo < result.log_likelihood  # a bound below the (near-exact) estimate
    expected_kl = np.mean([float(vae.analytic_kl(jnp.asarray(x))) for x in binary])
    np.testing.assert_allclose(result.kl, expected_kl, rtol=1e-5)
    assert result.kl_per_dimension.shape == (2,) and np.isclose(result.kl, result.kl_per_dimension.sum())
    np.testing.assert_allclose(result.bits_per_dim, -result.log_likelihood / (6 * np.log(2)))
    assert 0 <= result.active_units <= 2 and result.log_likelihood_se > 0
    with pytest.raises(ValueError, match=r"`data` must be binary"):
        train.evaluate(graphdef, params, np.full((2, 6), 0.5, np.float32))
    # A model with only log_joint and proposal: no KL to report, the rest as usual.
    graphdef, state, _ = _fresh()
    plain = train.evaluate(graphdef, state.params, binary, num_samples=100, chunk_size=50, elbo_samples=10)
    assert np.isnan(plain.kl) and np.isfinite(plain.log_likelihood) and plain.latent_dim == 2
    # A density (Gaussian likelihood) has no bits per dimension without discretized data.
    gaussian = models.VAE(models.GaussianMLPEncoder(6, 2, (8,), rngs=rngs), models.GaussianMLPDecoder(2, 6, (8,), rngs=rngs), models.StandardNormalPrior(2))
    real = train.evaluate(*nnx.split(gaussian, nnx.Param), np.asarray(setup)[:6], num_samples=100, chunk_size=50, elbo_samples=10)
    assert np.isfinite(real.log_likelihood) and np.isnan(real.bits_per_dim)


def test_evaluate_requires_an_integer_seed():
    graphdef, state, _ = _fresh()
    data = np.zeros((2, 6), np.float32)
    for bad in (1.5, True, "0", None):
        with pytest.raises(TypeError, match=r"`seed` must be an int"):
            train.evaluate(graphdef, state.params, data, seed=bad, num_samples=4, chunk_size=4, elbo_samples=2)
    # Seeds outside one 32-bit word shared a stream with another (key(-1) is key(2**32 - 1)).
    for bad in (-1, 2**32):
        with pytest.raises(ValueError, match=r"`seed` must be an int"):
            train.evaluate(graphdef, state.params, data, seed=bad, num_samples=4, chunk_size=4, elbo_samples=2)
        with pytest.raises(ValueError, match=r"`seed` must be an int"):
            train.make_step(graphdef, optax.adam(1e-3), train.objective("elbo"), seed=bad)
    with pytest.raises(TypeError, match=r"`seed` must be an int >= 0, got 2.5"):
        train.make_step(graphdef, optax.adam(1e-3), train.objective("elbo"), seed=2.5)
