"""Data-parallel training and evaluation: 4 CPU devices and 2 processes give what 1 device gives.

Each configuration runs in a subprocess, because the device count and `jax.distributed` must be
set before JAX starts its backend. XLA's threads are kept to one per process (2 cores are shared).
"""

import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

from elbojax import cli, distributed

TINY = ["--steps", "20", "--steps-per-call", "10", "--checkpoint-every", "10", "--batch-size", "20",
        "--eval-points", "10", "--eval-samples", "20", "--latent-dim", "2", "--hidden", "16", "--no-progress"]
ENV = dict(os.environ, XLA_FLAGS="--xla_cpu_multi_thread_eigen=false --xla_backend_optimization_level=0", JAX_PLATFORMS="cpu")
for name in distributed.ENVIRONMENT:
    ENV.pop(name, None)


def _python(code: str, timeout: int = 300) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout, env=ENV)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result.stdout


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(run_dir: Path) -> np.ndarray:
    model = cli.load_run(run_dir)
    from flax import nnx

    return np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(nnx.state(model, nnx.Param))])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """One device; four devices then resumed on one; two processes of one device each, stopped and resumed."""
    root = tmp_path_factory.mktemp("distributed")
    short = [a if a != "20" or i != 1 else "10" for i, a in enumerate(TINY)]

    def two_processes(*flags):
        port = _free_port()
        two = [
            subprocess.Popen(
                [sys.executable, "-m", "elbojax.cli", "train", "--run-dir", str(root / "two_processes"), *flags,
                 "--coordinator", f"127.0.0.1:{port}", "--num-processes", "2", "--process-id", str(i), "--distributed-timeout", "120"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
            )
            for i in range(2)
        ]
        outputs = [p.communicate(timeout=400) for p in two]
        for p, (out, err) in zip(two, outputs):
            assert p.returncode == 0, out[-2000:] + err[-4000:]
        return outputs

    two_processes(*short)  # to step 10, checkpointed by both processes
    outputs = two_processes("--resume", *TINY)  # both restore it and go on to step 20
    _python(f"""
        from elbojax import cli
        root = {str(root)!r}
        tiny = {TINY!r}
        short = {short!r}
        # --devices 4 first: the device count is fixed when JAX starts its backend.
        cli.main(["train", "--run-dir", root + "/four_then_one", "--devices", "4", *short])
        cli.main(["train", "--run-dir", root + "/one", "--devices", "1", *tiny])
        cli.main(["train", "--run-dir", root + "/four_then_one", "--devices", "1", "--resume", *tiny])
    """)
    return root, outputs


def test_four_devices_then_one_train_like_one(runs):
    """Steps 1-10 on 4 devices, then resumed from their checkpoint on 1: the parameters of 1 device throughout."""
    root, _ = runs
    np.testing.assert_allclose(_params(root / "four_then_one"), _params(root / "one"), rtol=1e-4, atol=1e-5)
    starts = json.loads((root / "four_then_one" / "environment.json").read_text())
    devices = [start["command"][start["command"].index("--devices") + 1] for start in starts]
    assert devices == ["4", "1"]
    steps = [json.loads(line)["step"] for line in (root / "four_then_one" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]


def test_two_processes_train_like_one(runs):
    root, outputs = runs
    np.testing.assert_allclose(_params(root / "two_processes"), _params(root / "one"), rtol=1e-4, atol=1e-5)
    # Process 0 alone reports and writes the run's files; both took part in the checkpoints.
    assert "test log-likelihood" in outputs[0][0] and "test log-likelihood" not in outputs[1][0]
    evaluation = json.loads((root / "two_processes" / "evaluation.json").read_text())
    reference = json.loads((root / "one" / "evaluation.json").read_text())
    np.testing.assert_allclose(evaluation["log_likelihood_per_point"], reference["log_likelihood_per_point"], rtol=1e-4)
    assert len(json.loads((root / "two_processes" / "environment.json").read_text())) == 2  # start and resume
    steps = [json.loads(line)["step"] for line in (root / "two_processes" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [10, 20]


def test_sharded_evaluation_equals_one_device():
    out = _python("""
        import jax, json, numpy as np
        jax.config.update("jax_num_cpu_devices", 4)
        from flax import nnx
        from elbojax import distributed, models, train
        rngs = nnx.Rngs(0)
        vae = models.VAE(models.GaussianMLPEncoder(6, 2, (8,), rngs=rngs), models.BernoulliMLPDecoder(2, 6, (8,), rngs=rngs), models.StandardNormalPrior(2))
        graphdef, params = nnx.split(vae, nnx.Param)
        data = (np.random.default_rng(0).random((7, 6)) < 0.5).astype(np.float32)   # 7 points: padded to 8
        one = train.evaluate(graphdef, params, data, num_samples=64, chunk_size=16, elbo_samples=8)
        four = train.evaluate(graphdef, params, data, num_samples=64, chunk_size=16, elbo_samples=8, mesh=distributed.data_mesh(4))
        print(json.dumps([one.log_likelihood_per_point.tolist(), four.log_likelihood_per_point.tolist(), one.kl, four.kl, one.active_units, four.active_units]))
    """)
    one, four, kl_one, kl_four, active_one, active_four = json.loads(out.strip().splitlines()[-1])
    assert len(one) == len(four) == 7
    np.testing.assert_allclose(four, one, rtol=1e-6)
    np.testing.assert_allclose(kl_four, kl_one, rtol=1e-6)
    assert active_one == active_four


def test_bad_device_settings(tmp_path):
    with pytest.raises(ValueError, match=r"Asked for 64 devices, but JAX sees"):
        distributed.data_mesh(64)
    class FourDevices:
        shape, axis_names, size = {"data": 4}, ("data",), 4

    class TwoByTwo:  # a mesh of the user's own: the batch is split over "data" only
        shape, axis_names, size = {"data": 2, "model": 2}, ("data", "model"), 4

    with pytest.raises(ValueError, match=r"`batch_size` \(10\) must be a multiple of the number of devices along the mesh's 'data' axis \(4\)"):
        distributed.check_divisible(10, FourDevices, "`batch_size`")
    distributed.check_divisible(10, TwoByTwo, "`batch_size`")  # refused before: 10 is not a multiple of 4 devices
    with pytest.raises(ValueError, match=r"The mesh must have a 'data' axis, .*got axes \('batch',\)"):
        distributed.check_divisible(10, jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("batch",)), "`batch_size`")
    with pytest.raises(ValueError, match=r"missing: coordinator, num_processes, process_id"):
        distributed.initialize()
    with pytest.raises(ValueError, match=r"'host:port'"):
        distributed.initialize("localhost", 2, 0)
    with pytest.raises(ValueError, match=r"`process_id` must lie in 0..1 for 2 processes, got 2"):
        distributed.initialize("127.0.0.1:1234", 2, 2)
    with pytest.raises(SystemExit, match=r"--devices must be a positive integer or 'all'"):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--devices", "two"])
    # Counts are ints, numpy's included; a float is not truncated (2.7 processes became 2).
    with pytest.raises(TypeError, match=r"`num_processes` must be an int, got 2.7"):
        distributed.initialize("127.0.0.1:1234", 2.7, 0)
    # A timeout of 0 or less waited forever (process 0 printed "waiting up to -1 s"); 2.5 was a "could not join".
    for timeout, error in ((0, ValueError), (-1, ValueError), (2.5, TypeError), ("3", TypeError)):
        with pytest.raises(error, match=r"`timeout` must be an int >= 1"):
            distributed.initialize("127.0.0.1:1234", 2, 0, timeout=timeout)
    with pytest.raises(SystemExit, match=r"--distributed-timeout must be >= 1, got 0"):
        cli.main(["train", "--run-dir", str(tmp_path / "r"), "--coordinator", "127.0.0.1:1234", "--num-processes", "2",
                  "--process-id", "0", "--distributed-timeout", "0"])
    with pytest.raises(TypeError, match=r"`num_devices` must be an int >= 1, got True"):
        distributed.data_mesh(True)
    assert distributed.data_mesh(np.int64(1)).size == 1
    with pytest.raises(ValueError, match=r"The size of axis 0 \(5\) must be a multiple of the number of devices along the mesh.s .data. axis \(4\)"):
        distributed.shard_rows((5, 3), FourDevices, lambda index: None)


def test_an_ipv6_coordinator_is_found():
    """'[::1]:port' is the usual form; its brackets are not part of the host (it was never found)."""
    assert distributed._host_and_port("[::1]:1234") == ("::1", 1234)
    assert distributed._host_and_port("node-3.cluster:80") == ("node-3.cluster", 80)
    try:
        listener = socket.socket(socket.AF_INET6)
        listener.bind(("::1", 0))
    except OSError:
        pytest.skip("no IPv6 loopback here")
    with listener:
        listener.listen()
        host, port = distributed._host_and_port(f"[::1]:{listener.getsockname()[1]}")
        distributed._wait_for_coordinator(host, port, 5.0, 1, 2)  # returns once it connects


def test_a_missing_coordinator_is_an_error_not_a_hang():
    """Process 1 of 2 with nobody listening: a clear error within the timeout."""
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "elbojax.cli", "train", "--run-dir", "/nonexistent/never", "--coordinator", f"127.0.0.1:{_free_port()}",
         "--num-processes", "2", "--process-id", "1", "--distributed-timeout", "5"],
        capture_output=True, text=True, timeout=120, env=ENV,
    )
    assert result.returncode != 0
    assert "found no coordinator at 127.0.0.1" in result.stderr, result.stderr[-3000:]
    assert time.monotonic() - began < 90
