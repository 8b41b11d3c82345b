r"""`flat_matmul`: $x W$ over every leading axis as one 2-D matrix product, under any number of `vmap`s.

**Why.** elbojax's models are written for one data point and one latent sample; the estimators
`vmap` over samples and the training objective `vmap`s over the batch. A dense layer inside both
sees its input as `(B, K, n)`, and `jax.grad` then computes the weight gradient
$\partial W = \sum_{b,k} x_{bk}^\top g_{bk}$ as a `dot_general` that contracts *two* axes. XLA
on CPU canonicalises such a product by physically transposing the `(B, K, m)` cotangent (and the
`(B, K, n)` input) before the matrix product. On the IWAE paper's MNIST model (K = 50, batch 100)
those copies made a hand-written training step 13-26% slower (three runs) than the same step written with
the samples flattened to `(B K, n)` by hand (`benchmarks/training_speed.py`).

`flat_matmul` is a JAX primitive whose batching rule folds every new batch axis into its leading
axes, so that after any number of `vmap`s it is still one product
`x.reshape(-1, n) @ W`, forward and backward: the weight gradient is
`x.reshape(-1, n).T @ g.reshape(-1, m)`, one contraction over one axis, with no transposed copy.
Its meaning is exactly that of `x @ W` (a batch axis of `x` is a leading axis of the product), so
`grad`, `vmap`, `jvp`, per-example gradients (`vmap` of `grad`), Hessians and `jit` all give the
same values as `x @ W`; only the program XLA receives differs. A batched `W` (a `vmap` over
different weights) falls back to an ordinary batched product.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import ad, batching, mlir

_flat_matmul_p = Primitive("elbojax_flat_matmul")


def flat_matmul(x, kernel):
    r"""$y_{\dots j} = \sum_i x_{\dots i} W_{ij}$: `x @ kernel` as one product over all leading axes.

    Args:
      x: `(..., n)`, at least one axis.
      kernel: $W$, `(n, m)`, the dtype of `x`.

    Returns:
      `(..., m)`, equal to `x @ kernel`.
    """
    x, kernel = jnp.asarray(x), jnp.asarray(kernel)
    if kernel.ndim != 2 or x.ndim < 1 or x.shape[-1] != kernel.shape[0]:
        raise ValueError(f"flat_matmul needs x (..., n) and kernel (n, m); got x {x.shape} and kernel {kernel.shape}.")
    if x.dtype != kernel.dtype:
        raise TypeError(f"flat_matmul needs one dtype; got x {x.dtype} and kernel {kernel.dtype} (promote them first).")
    return _flat_matmul_p.bind(x, kernel)


def _as_rows(x):
    """`(..., n) -> (N, n)`: a free reshape of the leading axes of a row-major array."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])  # not -1: a zero-size axis has no inference


def _expanded(x, kernel):
    """What the primitive computes: the 2-D product, reshaped back (used to evaluate and to lower)."""
    return jnp.dot(_as_rows(x), kernel).reshape(x.shape[:-1] + (kernel.shape[1],))


def _abstract_eval(x, kernel):
    # The input's abstract value with the output's shape (the same rank and dtype).
    return x.update(shape=x.shape[:-1] + (kernel.shape[1],), weak_type=x.weak_type and kernel.weak_type)


def _batch(args, dims):
    x, kernel = args
    x_dim, kernel_dim = dims
    if kernel_dim is None:  # not mapped
        # One kernel for the whole batch: the batch axis becomes one more leading axis of x.
        return _flat_matmul_p.bind(jnp.moveaxis(x, x_dim, 0), kernel), 0
    return jax.vmap(_expanded, in_axes=(x_dim, kernel_dim))(x, kernel), 0


def _transpose_x(cotangent, x, kernel):
    """d/dx: `g @ W.T`, again one flattened product."""
    return flat_matmul(cotangent, kernel.T)


def _transpose_kernel(cotangent, x, kernel):
    """d/dW: `x_rows.T @ g_rows`, one contraction over the flattened leading axis."""
    return lax.dot_general(_as_rows(x), _as_rows(cotangent), (((0,), (0,)), ((), ())))


_flat_matmul_p.def_impl(_expanded)
_flat_matmul_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(_flat_matmul_p, mlir.lower_fun(_expanded, multiple_results=False))
batching.primitive_batchers[_flat_matmul_p] = _batch
ad.defbilinear(_flat_matmul_p, _transpose_x, _transpose_kernel)
