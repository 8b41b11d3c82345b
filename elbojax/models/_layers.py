"""Building blocks shared by the models: the MLP trunk, trace-time shape checks, a Gaussian density."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from jax import lax
from flax import nnx

from elbojax import _checks
from elbojax.models._flat_matmul import flat_matmul
from elbojax.proposals import LOG_2PI  # noqa: F401 (the models' modules import it from here)

# Glorot-uniform kernels and zero biases: the initialisation of the IWAE code (nnet.Linear.random).
KERNEL_INIT = nnx.initializers.glorot_uniform()

ONE_POINT = " (ONE data point; batch with jax.vmap)"
ONE_SAMPLE = " (ONE latent sample; elbojax vmaps over samples)"


def check_shape(array, expected: tuple[int, ...], name: str, note: str = "") -> None:
    """Raise a `ValueError` unless `jnp.shape(array) == expected`; the message shows both."""
    shape = tuple(jnp.shape(array))
    if shape != tuple(expected):
        raise ValueError(f"`{name}` must have shape {tuple(expected)}{note}, got {shape}.")


def check_last_axis(array, size: int, name: str) -> None:
    """Require shape `(..., size)`."""
    shape = tuple(jnp.shape(array))
    if not shape or shape[-1] != size:
        raise ValueError(f"`{name}` must have shape (..., {size}), got {shape}.")


def check_widths(hidden: Sequence[int], name: str = "hidden") -> tuple[int, ...]:
    """`hidden` as a tuple of positive ints (an empty tuple means no hidden layer)."""
    if isinstance(hidden, int) or not isinstance(hidden, Sequence):
        raise TypeError(f"`{name}` must be a sequence of layer widths such as (200, 200), got {hidden!r}.")
    return tuple(_checks.check_positive_int(width, f"{name}[{i}]") for i, width in enumerate(hidden))


def check_choice(value, choices: tuple[str, ...], name: str) -> str:
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, choices))}; got {value!r}.")
    return value


def diag_normal_log_density(x, mean, log_scale):
    r"""$\sum_i \log \mathcal{N}(x_i; \mu_i, e^{2 s_i})$ over the last axis, broadcasting the rest."""
    standardized = (x - mean) * jnp.exp(-log_scale)
    return -jnp.sum(0.5 * standardized**2 + log_scale + 0.5 * LOG_2PI, axis=-1)


def flat_map(fn: Callable, batch_shape: tuple[int, ...], *arrays):
    """Apply `fn` (written for one item) over the leading `batch_shape` of every array."""
    if not batch_shape:
        return fn(*arrays)
    size = math.prod(batch_shape)
    flat = [a.reshape((size,) + a.shape[len(batch_shape):]) for a in arrays]
    out = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda a: a.reshape(batch_shape + a.shape[1:]), out)


class Linear(nnx.Linear):
    """`nnx.Linear` (the same parameters and initialisers) whose product is `flat_matmul`.

    $y = x W + b$ for `x` of shape `(..., in_features)`. Under the estimators' `vmap` over samples
    and the objective's `vmap` over data points, the product stays one 2-D matrix product, and so
    does its weight gradient (see `elbojax.models._flat_matmul` for why that matters on CPU).
    Checkpoints are interchangeable with `nnx.Linear`'s: the state is the same.
    """

    def __call__(self, inputs, out_sharding=None):
        if (out_sharding is not None or self.dot_general is not lax.dot_general or self.precision is not None
                or self.preferred_element_type is not None):  # anything but the plain product: flax's own path
            return super().__call__(inputs, out_sharding=out_sharding)
        kernel = self.kernel[...]
        bias = self.bias[...] if self.bias is not None else None
        inputs, kernel, bias = self.promote_dtype((inputs, kernel, bias), dtype=self.dtype)
        y = flat_matmul(inputs, kernel)
        return y if bias is None else y + bias


class MLP(nnx.Module):
    """Affine layers, each followed by `activation`: `in_dim -> hidden[0] -> ... -> hidden[-1]`.

    With `hidden=()` it is the identity and `out_dim == in_dim`.
    """

    def __init__(
        self, in_dim: int, hidden: Sequence[int], activation: Callable, *, rngs: nnx.Rngs, param_dtype=jnp.float32
    ):
        widths = (_checks.check_positive_int(in_dim, "in_dim"),) + check_widths(hidden)
        if not callable(activation):
            raise TypeError(f"`activation` must be callable (e.g. jnp.tanh), got {type(activation).__name__}.")
        self.layers = nnx.List(
            [
                Linear(n_in, n_out, kernel_init=KERNEL_INIT, param_dtype=param_dtype, rngs=rngs)
                for n_in, n_out in zip(widths, widths[1:])
            ]
        )
        self.activation = activation
        self.out_dim = widths[-1]

    def __call__(self, h):
        for layer in self.layers:
            h = self.activation(layer(h))
        return h


def linear(in_dim: int, out_dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32) -> Linear:
    """An output head with the IWAE initialisation."""
    return Linear(in_dim, out_dim, kernel_init=KERNEL_INIT, param_dtype=param_dtype, rngs=rngs)


def set_bias(layer: nnx.Linear, bias, name: str) -> None:
    """Overwrite `layer`'s bias (shape checked), keeping the parameter dtype."""
    check_shape(bias, (layer.out_features,), name)
    layer.bias.set_value(jnp.asarray(bias, layer.bias[...].dtype))
