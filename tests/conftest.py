"""Shared fixtures. Float64 is switched on per test and restored, so float32 tests stay float32.

The suite compiles thousands of small programs and runs few large ones, so it compiles them with
XLA's backend (LLVM) optimisation off, about a quarter less time in all (the values are the same;
set XLA_FLAGS with your own `--xla_backend_optimization_level` to test another level). The
subprocesses the tests start inherit it.

Many tests compile the same programs again (the same tiny model and step, built afresh; each
command-line run in its own process), so the whole run shares one persistent JAX compilation
cache: a temporary folder made for this run by the first process (pytest's controller, whose
environment the xdist workers and every subprocess inherit) and removed at its end. It starts
empty, so each run still compiles everything once. Set JAX_COMPILATION_CACHE_DIR to choose your own.
"""

import atexit
import os
import shutil
import tempfile

if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):  # before JAX starts its backend
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache = tempfile.mkdtemp(prefix="elbojax-tests-jax-cache-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")  # most compile in well under 1 s

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

