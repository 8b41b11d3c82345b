r"""Keys and normal draws from Threefry-2x32, written as elementwise arithmetic XLA fuses.

**`fold_in_many`**: `jax.random.fold_in` over many data at once, the same keys in one fused pass.
elbojax derives every key by `fold_in`: each example's from the step key and its index, each
sample's from its example's key and `k`. `jax.random.fold_in` hashes with Threefry-2x32, which
JAX lowers on CPU as a rolled loop of five iterations, each about sixteen small XLA operations;
a `vmap` of it costs about 80 kernel launches whatever its size. In the single-sample ELBO
training step of the IWAE model, the per-example and per-sample keys added two such loops, about
160 launches a step (counted in the compiled programme).

`fold_in_many` computes the identical keys (Threefry-2x32 of the counter pair `(0, data)` under
the key, as `jax.random.fold_in` does; tested bit for bit) with the twenty rounds written out as
elementwise `uint32` arithmetic, which XLA fuses into one pass. Keys of another implementation
(`impl="rbg"`, ...) go to `jax.random.fold_in`. With those, draws are valid but the estimators'
reproducibility contract does not hold: JAX's rbg bits under `vmap` differ from a single draw's,
so the samples depend on `chunk_size` and a `vmap` over data points differs from a Python loop
(Threefry keys, the default, keep it).

**`normal`**: standard normal `float32` draws with half of `jax.random.normal`'s hashing. Each
Threefry-2x32 block (one counter pair in, two 32-bit words out) gives two draws here; JAX's
default generator (`jax_threefry_partitionable`) hashes one block per number and keeps the
exclusive-or of its two words. The words become numbers as in JAX: 23 random mantissa bits give
$u$ uniform on $[-1 + 2^{-24}, 1)$ and $z = \sqrt 2 \, \mathrm{erf}^{-1}(u)$. The numbers differ
from `jax.random.normal`'s for the same key (same distribution, different stream).

Reference: Salmon, Moraes, Dror & Shaw, *Parallel random numbers: as easy as 1, 2, 3*, SC 2011.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = np.uint32(0x1BD11BDA)


def _threefry2x32(key1, key2, x1, x2):
    """Threefry-2x32 with 20 rounds on `uint32` arrays (broadcasting): the pair of output words."""
    keys = (key1, key2, key1 ^ key2 ^ _PARITY)
    x1, x2 = x1 + keys[0], x2 + keys[1]
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x1 = x1 + x2
            x2 = (x2 << np.uint32(r)) | (x2 >> np.uint32(32 - r))
            x2 = x1 ^ x2
        x1 = x1 + keys[(i + 1) % 3]
        x2 = x2 + keys[(i + 2) % 3] + np.uint32(i + 1)
    return x1, x2


def fold_in_many(key, data, *, name: str = "data"):
    """`jax.random.fold_in(key, d)` for every entry `d` of `data`: keys of shape `data.shape`.

    Args:
      key: one PRNG key (a typed key, or a raw `uint32[2]` key).
      data: integers of any shape, read as `uint32` (as `jax.random.fold_in` reads them).
        Floating-point or boolean data raise a `TypeError` at trace time (a float would be
        truncated, so 0.2 and 0.9 would give the same key).
    """
    data = jnp.asarray(data)
    _check_integer_data(data, name)
    data = data.astype(jnp.uint32)
    words = _threefry_words(key, "fold_in_many")
    if words is None:
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, data.ravel()).reshape(data.shape)
    y1, y2 = _threefry2x32(words[0], words[1], jnp.zeros_like(data), data)
    folded = jnp.stack([y1, y2], axis=-1)
    return jax.random.wrap_key_data(folded, impl=jax.random.key_impl(key)) if _is_typed(key) else folded


def _check_integer_data(data, name: str) -> None:
    if not jnp.issubdtype(data.dtype, jnp.integer):
        raise TypeError(
            f"`{name}` must be an integer array (indices folded into a PRNG key), got dtype {data.dtype}."
        )


def _is_typed(key) -> bool:
    return jnp.issubdtype(jnp.asarray(key).dtype, jax.dtypes.prng_key)


def _threefry_words(key, caller: str):
    """The `uint32[2]` words of one Threefry key (typed or raw), or None for another implementation."""
    typed = _is_typed(key)
    if typed and str(jax.random.key_impl(key)) != "threefry2x32":
        return None
    words = jax.random.key_data(key) if typed else jnp.asarray(key)
    if words.shape != (2,) or words.dtype != jnp.uint32:
        raise ValueError(f"{caller} takes one key, got key data of shape {words.shape} and dtype {words.dtype}.")
    return words


def normal(key, shape=(), dtype=jnp.float32):
    r"""Standard normal draws of `shape`: two per Threefry block (see the module docstring).

    Args:
      key: one PRNG key (a typed key, or a raw `uint32[2]` key).
      shape: the shape of the draws.
      dtype: `float32` takes the fast path; any other floating dtype, or a key of another
        implementation, goes to `jax.random.normal` (its numbers).

    Returns:
      `dtype[shape]`. Block $i$ hashes the counter pair $(0, i)$ under the key; its first word
      gives draw $i$ and its second draw $\lceil n/2 \rceil + i$ of the flattened $n$ draws.
    """
    shape, dtype = tuple(shape), jnp.dtype(dtype)
    words = _threefry_words(key, "normal")
    if words is None or dtype != jnp.float32:
        return jax.random.normal(key, shape, dtype)
    size = math.prod(shape)
    counters = lax.iota(jnp.uint32, (size + 1) // 2)
    first, second = _threefry2x32(words[0], words[1], jnp.zeros_like(counters), counters)
    bits = jnp.concatenate([first, second])[:size].reshape(shape)
    # 23 mantissa bits under the exponent of 1.0: a float in [1, 2), then [0, 1), then [low, 1).
    one = np.array(1.0, np.float32).view(np.uint32)
    unit = lax.bitcast_convert_type((bits >> np.uint32(9)) | one, jnp.float32) - np.float32(1.0)
    low = np.nextafter(np.float32(-1.0), np.float32(0.0))
    uniform = lax.max(low, unit * (np.float32(1.0) - low) + low)
    return np.float32(math.sqrt(2.0)) * lax.erf_inv(uniform)
