r"""Data parallelism with JAX's own SPMD machinery: a one-axis mesh, replicated parameters, sharded batches.

elbojax writes no communication layer. A `jax.sharding.Mesh` with one axis, `"data"`, holds the
devices (one CPU, eight GPUs, a TPU slice, or the devices of several processes); the training
state is replicated on all of them, each global batch is split along its example axis, and the
step is jitted with these shardings, so XLA inserts the all-reduce of the gradient (the batch
mean of the objective). Because every sample's key is `fold_in(step_key, global_index)`, the
same global batch gives the same samples on any number of devices: N devices reach the
parameters of one device, up to the order of floating-point sums.

Several processes (hosts): call `initialize` first (before anything else touches JAX). Each
process then builds only its own rows of a global batch (`shard_rows` calls back for the rows
its devices hold), checkpoints are written by orbax from every process, and metrics and plots
by process 0 alone (`is_primary`).

On CPU the device count must be fixed before JAX starts its backend:
`jax.config.update("jax_num_cpu_devices", N)` (or `XLA_FLAGS=--xla_force_host_platform_device_count=N`);
`elbojax train --devices N` does it for you.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from elbojax import _checks

DATA_AXIS = "data"

ENVIRONMENT = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")
"""The environment variables `initialize` reads where its arguments are not given."""


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: int = 60,
) -> None:
    """Join a multi-process run: `jax.distributed.initialize`, with checks and a bounded wait.

    Arguments not given come from `JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES` and
    `JAX_PROCESS_ID`. On CPU the processes' collectives run over gloo (TCP). Call it before
    anything else uses JAX.

    Args:
      coordinator: `"host:port"` of process 0, which listens there.
      num_processes: how many processes take part (>= 1).
      process_id: this process, in `0 .. num_processes - 1`.
      timeout: seconds to wait for all processes to join, an int >= 1; a missing process or
        coordinator ends the wait after that, never a hang.

    Raises:
      TypeError, ValueError: a missing, mistyped or inconsistent argument.
      RuntimeError: this process (not 0) found no coordinator, or could not join, within `timeout`.
        Process 0 waiting for a process that never joins is ended by JAX itself (SIGABRT, with
        DEADLINE_EXCEEDED in its log), which no Python code can catch.
    """
    timeout = _checks.check_positive_int(timeout, "timeout")
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _from_environment(num_processes, "JAX_NUM_PROCESSES", "num_processes")
    process_id = _from_environment(process_id, "JAX_PROCESS_ID", "process_id")
    missing = [name for name, value in (("coordinator", coordinator), ("num_processes", num_processes), ("process_id", process_id)) if value is None]
    if missing:
        raise ValueError(
            f"A multi-process run needs the coordinator's address, the number of processes and this "
            f"process's id; missing: {', '.join(missing)} (pass them, or set {', '.join(ENVIRONMENT)})."
        )
    host, port = _host_and_port(coordinator)
    if num_processes < 1:
        raise ValueError(f"`num_processes` must be >= 1, got {num_processes}.")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"`process_id` must lie in 0..{num_processes - 1} for {num_processes} processes, got {process_id}.")
    if process_id != 0:
        _wait_for_coordinator(host, port, timeout, process_id, num_processes)
    else:
        print(
            f"elbojax: process 0 of {num_processes} is coordinating at {coordinator}; waiting up to {timeout} s "
            "for the others (JAX ends this process with DEADLINE_EXCEEDED if one never joins).",
            file=sys.stderr, flush=True,
        )
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(
            coordinator, num_processes=num_processes, process_id=process_id, initialization_timeout=timeout
        )
    except Exception as error:  # jaxlib raises XlaRuntimeError (DEADLINE_EXCEEDED, UNAVAILABLE, ...)
        raise RuntimeError(
            f"Process {process_id} of {num_processes} could not join the run at {coordinator} within "
            f"{timeout} s: {error}. Check that every process was started with the same coordinator "
            "and number of processes, and that process 0 is running."
        ) from error


def _host_and_port(coordinator: str) -> tuple[str, int]:
    """`'host:port'` or `'[IPv6 address]:port'` as `(host, port)`, the host without brackets."""
    host, _, port = coordinator.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not host or not port.isdigit():
        raise ValueError(f"`coordinator` must be 'host:port' (or '[IPv6 address]:port'), got {coordinator!r}.")
    return host, int(port)


def _wait_for_coordinator(host: str, port: int, timeout: float, process_id: int, num_processes: int) -> None:
    """Wait until process 0 listens at host:port (JAX itself aborts the process, rather than raise, when it does not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=2):
                return
        except OSError as error:
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"Process {process_id} of {num_processes} found no coordinator at {host}:{port} within "
                    f"{timeout} s ({error}). Start process 0 with the same --coordinator, or check the address."
                ) from None
            time.sleep(0.5)


def _from_environment(value, variable: str, name: str) -> int | None:
    if value is not None:
        if not _checks.is_int(value):
            raise TypeError(f"`{name}` must be an int, got {value!r} of type {type(value).__name__}.")
        return int(value)
    text = os.environ.get(variable)
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"${variable} must be an integer ({name}), got {text!r}.") from None


def data_mesh(num_devices: int | None = None) -> Mesh:
    """A one-axis mesh (`"data"`) over the first `num_devices` of `jax.devices()` (default: all).

    In a multi-process run `jax.devices()` lists every process's devices, ordered by process.
    """
    devices = jax.devices()
    if num_devices is None:
        num_devices = len(devices)
    num_devices = _checks.check_positive_int(num_devices, "num_devices")
    if num_devices > len(devices):
        raise ValueError(
            f"Asked for {num_devices} devices, but JAX sees {len(devices)} ({devices[0].platform}). On CPU, "
            "set the count before JAX starts: jax.config.update('jax_num_cpu_devices', N), or "
            "`elbojax train --devices N`."
        )
    if jax.process_count() > 1 and num_devices != len(devices):
        raise ValueError(f"A multi-process run uses every device of every process ({len(devices)}), got num_devices={num_devices}.")
    return Mesh(np.asarray(devices[:num_devices]), (DATA_AXIS,))


def is_primary() -> bool:
    """Whether this process writes the run's files (metrics, plots, config): process 0."""
    return jax.process_index() == 0


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array."""
    return NamedSharding(mesh, PartitionSpec())


def row_sharding(mesh: Mesh, ndim: int, axis: int = 0) -> NamedSharding:
    """Split axis `axis` of an `ndim`-dimensional array over the mesh's devices."""
    ndim, axis = _checked_axis(ndim, axis)
    spec = [None] * ndim
    spec[axis] = DATA_AXIS
    return NamedSharding(mesh, PartitionSpec(*spec))


def _checked_axis(ndim, axis) -> tuple[int, int]:
    if not _checks.is_int(ndim):
        raise TypeError(f"`ndim` must be an int >= 1 (the array's number of axes), got {ndim!r}.")
    if ndim < 1:
        raise ValueError(f"`ndim` must be an int >= 1 (the array's number of axes), got {ndim!r}.")
    ndim = int(ndim)
    if not _checks.is_int(axis):
        raise TypeError(f"`axis` must be an int in [-{ndim}, {ndim}) for a {ndim}-dimensional array, got {axis!r}.")
    if not -ndim <= axis < ndim:
        raise ValueError(f"`axis` must be an int in [-{ndim}, {ndim}) for a {ndim}-dimensional array, got {axis!r}.")
    return ndim, int(axis)


def data_axis_size(mesh: Mesh) -> int:
    """Into how many shares the mesh's `"data"` axis splits a batch (a mesh without one is refused).

    The whole mesh's size for `data_mesh`'s; for a mesh of your own with more axes, the batch is
    split over `"data"` and the same on the other axes.
    """
    shape = dict(getattr(mesh, "shape", {}))
    if DATA_AXIS not in shape:
        raise ValueError(
            f"The mesh must have a {DATA_AXIS!r} axis, over which batches are split "
            f"(elbojax.distributed.data_mesh makes one), got axes {tuple(getattr(mesh, 'axis_names', ()))}."
        )
    return int(shape[DATA_AXIS])


def check_divisible(size: int, mesh: Mesh, what: str) -> None:
    """A sharded axis must split evenly over the mesh's `"data"` axis."""
    shares = data_axis_size(mesh)
    if size % shares:
        raise ValueError(
            f"{what} ({size}) must be a multiple of the number of devices along the mesh's {DATA_AXIS!r} "
            f"axis ({shares}): each takes an equal share of it."
        )


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Place a pytree of host values (the same on every process) on every device of `mesh`."""
    sharding = replicated(mesh)

    def place(leaf):
        if isinstance(leaf, jax.Array) and leaf.sharding == sharding:
            return leaf
        if isinstance(leaf, jax.Array) and jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
            # A typed PRNG key (e.g. in `optax.noisy_sgd`'s state): numpy cannot hold it; its words can.
            return jax.random.wrap_key_data(place(jax.random.key_data(leaf)), impl=jax.random.key_impl(leaf))
        value = np.asarray(leaf)
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return jax.tree.map(place, tree)


def shard_rows(shape: tuple[int, ...], mesh: Mesh, fetch: Callable[[tuple], np.ndarray], axis: int = 0) -> jax.Array:
    """A global array split along `axis`, built from `fetch(index)` for this process's devices only.

    `fetch` gets a tuple of slices (one per dimension, as numpy indexing takes it) and returns
    that block of the global array: a process never reads the rows other processes hold.
    """
    _, axis = _checked_axis(len(shape), axis)  # before `shape[axis]` is read
    check_divisible(shape[axis], mesh, f"The size of axis {axis}")
    return jax.make_array_from_callback(tuple(shape), row_sharding(mesh, len(shape), axis), fetch)


def to_host(tree: Any) -> Any:
    """Numpy copies of a pytree of global arrays, gathered from every process where needed."""
    from jax.experimental import multihost_utils

    def fetch(leaf):
        if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable and not leaf.is_fully_replicated:
            return np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
        return np.asarray(leaf)

    return jax.tree.map(fetch, tree)


def barrier(name: str) -> None:
    """Wait for every process (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
