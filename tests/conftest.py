"""Shared fixtures. Float64 is switched on per test and restored, so float32 tests stay float32."""

import jax
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

