"""Shared fixtures. Float64 is switched on per test and restored, so float32 tests stay float32.

The suite compiles thousands of small programs and runs few large ones, so it compiles them with
XLA's backend (LLVM) optimisation off, about a quarter less time in all (the values are the same;
set XLA_FLAGS with your own `--xla_backend_optimization_level` to test another level). The
subprocesses the tests start inherit it.
"""

import os

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

import jax  # noqa: E402
import pytest


@pytest.fixture
def x64():
    """Run one test with `jax_enable_x64`, restoring the previous setting afterwards."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", previous)

