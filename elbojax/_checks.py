"""Trace-time argument checks shared by the public functions.

Everything here runs on static information (Python values, shapes and dtypes), so it works
under `jax.jit` and raises before anything is compiled. Values inside traced arrays cannot be
checked here; the host boundary (loaders, training loops, the command line) checks those.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from elbojax.data import check_seed  # noqa: F401 (shared here; `data` itself stays numpy-only)


def is_int(value: Any) -> bool:
    """Whether `value` is a static integer (a Python or NumPy int; `bool` is not one)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def sample_shape(value: Any) -> tuple[int, ...]:
    """A distribution's `sample_shape` as a tuple of ints: an int (Python, NumPy or a concrete 0-d
    JAX integer, as distrax takes them) or a sequence of them."""
    if np.ndim(value) == 0:
        return (operator.index(value),)
    return tuple(operator.index(size) for size in value)


def check_positive_int(value: Any, name: str) -> int:
    """Return `value` as an `int` if it is a static integer >= 1, else raise."""
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a static Python int (it fixes array shapes), got a traced "
            f"value {value}. Mark it static, e.g. `jax.jit(f, static_argnames='{name}')`."
        )
    if not is_int(value):
        raise TypeError(f"`{name}` must be an int >= 1, got {value!r} of type {type(value).__name__}.")
    if value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value}.")
    return int(value)


def check_finite_nonnegative(value: Any, name: str) -> float:
    """Return `value` as a `float` if it is a static real number >= 0 and finite, else raise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number >= 0, got {value!r} of type {type(value).__name__}.")
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"`{name}` must be a finite number >= 0, got {value}.")
    return float(value)


def static_real(value: Any, name: str, expected: str):
    """`value` as a Python real number (a NumPy or concrete 0-d JAX scalar is unwrapped), or a
    `TypeError` saying that `name` must be `expected` (`bool` and traced values are refused)."""
    if isinstance(value, (jax.Array, np.ndarray)) and jnp.shape(value) == () and not isinstance(value, jax.core.Tracer):
        value = value.item()
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be {expected}, got {value!r} of type {type(value).__name__}.")
    return value


def check_finite_positive(value: Any, name: str) -> float:
    """Return `value` as a `float` if it is a static real number > 0 and finite, else raise.

    NumPy and 0-d JAX scalars pass (`np.float32(0.5)`); `bool` does not.
    """
    value = static_real(value, name, "a real number > 0")
    if not (np.isfinite(value) and value > 0):
        raise ValueError(f"`{name}` must be a finite number > 0, got {value}.")
    return float(value)


def check_finite_real(value: Any, name: str) -> float:
    """Return `value` as a `float` if it is a static, finite real number, else raise.

    NumPy and concrete 0-d JAX scalars pass; `bool` and traced values do not.
    """
    if isinstance(value, jax.core.Tracer):
        raise TypeError(
            f"`{name}` must be a static real number, got a traced value {value}. Mark it static, "
            f"e.g. `jax.jit(f, static_argnames='{name}')`."
        )
    value = static_real(value, name, "a real number")
    if not np.isfinite(value):
        raise ValueError(f"`{name}` must be a finite number, got {value}.")
    return float(value)


def check_optional_positive_int(value: Any, name: str) -> int | None:
    """Like `check_positive_int`, but `None` passes through."""
    return None if value is None else check_positive_int(value, name)


def check_key(key: Any, name: str = "key") -> None:
    """Require one JAX PRNG key: a typed key of shape `()` or a raw `uint32[2]` key."""
    dtype = getattr(key, "dtype", None)
    shape = getattr(key, "shape", None)
    if dtype is None:
        raise TypeError(
            f"`{name}` must be a JAX PRNG key (e.g. `jax.random.key(0)`), got {type(key).__name__}."
        )
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape != ():
            raise ValueError(
                f"`{name}` must be a single PRNG key of shape (), got a key array of shape "
                f"{shape}. Batch over keys with `jax.vmap`."
            )
        return
    if dtype == jnp.uint32 and shape == (2,):
        return
    raise TypeError(
        f"`{name}` must be a single JAX PRNG key (`jax.random.key(0)`, or a raw uint32[2] from "
        f"`jax.random.PRNGKey(0)`), got an array of dtype {dtype} and shape {shape}."
    )


def check_callable(fn: Any, name: str) -> None:
    if not callable(fn):
        raise TypeError(f"`{name}` must be callable, got {type(fn).__name__}.")


def check_scalar_output(fn, args, name: str) -> None:
    """Trace `fn(*args)` abstractly and require a scalar floating-point result."""
    out = jax.eval_shape(fn, *args)
    shape = getattr(out, "shape", None)
    dtype = getattr(out, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        got = f"shape {shape} and dtype {dtype}" if shape is not None else type(out).__name__
        raise ValueError(
            f"`{name}(x, z)` must return one floating-point scalar for ONE latent sample z "
            f"(elbojax vmaps it over samples), got {got}."
        )


def check_array_shape(array: Any, expected: tuple[int, ...], name: str) -> None:
    """Require `jnp.shape(array) == expected`, with a message that shows both."""
    shape = jnp.shape(array)
    if tuple(shape) != tuple(expected):
        raise ValueError(f"`{name}` must have shape {tuple(expected)}, got {tuple(shape)}.")


def check_scalar_log_prob(log_prob: Any, name: str) -> None:
    """Require the `log q(z)` of ONE sample (a shape-dtype struct) to be a floating-point scalar.

    A distribution with a batch shape gives one log-density per batch element; the estimators
    vmap over samples themselves and would silently broadcast those into wrong weights.
    """
    shape = tuple(getattr(log_prob, "shape", ()))
    dtype = getattr(log_prob, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"`{name}` must give one floating-point scalar log-density per sample "
            f"(`{name}.sample_and_log_prob(seed=key)` -> (z, scalar log q(z))), got a log q(z) of shape "
            f"{shape} and dtype {dtype}: it has a batch shape. For a vector of independent components "
            f"use `distrax.Independent(..., 1)` or `distrax.MultivariateNormalDiag` (event shape, not "
            f"batch shape); elbojax vmaps over samples itself."
        )


def check_scalar_closed_form(value: Any, what: str, hint: str) -> None:
    """Require a closed-form KL or entropy (an array, its shape known at trace time) to be a scalar."""
    shape = tuple(jnp.shape(value))
    if shape != ():
        raise ValueError(f"The closed-form {what} must be a scalar, got shape {shape}. {hint}")
