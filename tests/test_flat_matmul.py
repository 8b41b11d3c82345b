"""`flat_matmul` and the models' `Linear`: the same numbers as `x @ W` under every transformation,
one 2-D product after nested `vmap`s, and the encoder's direct `sample_and_log_prob`."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elbojax import models
from elbojax.models._flat_matmul import flat_matmul
from elbojax.models._layers import Linear
from elbojax.models.encoders import MultivariateNormalDiag

B, K, N, M = 3, 4, 5, 6


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _arrays():
    k = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k[0], (B, K, N), jnp.float64)
    kernel = jax.random.normal(k[1], (N, M), jnp.float64)
    bias = jax.random.normal(k[2], (M,), jnp.float64)
    return x, kernel, bias


def _per_sample(matmul, bias):
    """A scalar function of one sample `(N,)`, the way the models are written."""
    return lambda kernel, x: jnp.sum(jnp.tanh(matmul(x, kernel) + bias) ** 2)


def _twice_vmapped(f):
    return jax.vmap(jax.vmap(f, (None, 0)), (None, 0))


TRANSFORMS = {
    "value under two vmaps": lambda f, kernel, x: _twice_vmapped(f)(kernel, x),
    "grad of two vmaps": lambda f, kernel, x: jax.grad(lambda w: jnp.sum(_twice_vmapped(f)(w, x)))(kernel),
    "jit of grad": lambda f, kernel, x: jax.jit(jax.grad(lambda w: jnp.sum(_twice_vmapped(f)(w, x))))(kernel),
    "per-example grads (vmap of grad)": lambda f, kernel, x: jax.vmap(jax.vmap(jax.grad(f), (None, 0)), (None, 0))(kernel, x),
    "grad in x": lambda f, kernel, x: jax.vmap(jax.vmap(jax.grad(f, argnums=1), (None, 0)), (None, 0))(kernel, x),
    "jvp": lambda f, kernel, x: jax.jvp(lambda w: _twice_vmapped(f)(w, x), (kernel,), (jnp.ones_like(kernel),))[1],
    "hessian": lambda f, kernel, x: jax.hessian(f)(kernel, x[0, 0]),
    "batched kernels": lambda f, kernel, x: jax.vmap(f)(jnp.stack([kernel, 2 * kernel, -kernel]), x[:, 0]),
    "grad through batched kernels": lambda f, kernel, x: jax.grad(
        lambda w: jnp.sum(jax.vmap(f)(jnp.stack([w, 2 * w, -w]), x[:, 0]))
    )(kernel),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
def test_flat_matmul_equals_matmul_under_every_transformation(name):
    x, kernel, bias = _arrays()
    transform = TRANSFORMS[name]
    ours = transform(_per_sample(flat_matmul, bias), kernel, x)
    plain = transform(_per_sample(lambda x, w: x @ w, bias), kernel, x)
    assert ours.shape == plain.shape
    np.testing.assert_allclose(ours, plain, rtol=1e-12, atol=1e-12)


def test_flat_matmul_is_one_2d_product_after_two_vmaps():
    """The weight gradient contracts one flattened axis: no dot_general contracts two axes."""
    x, kernel, bias = _arrays()
    loss = lambda w: jnp.sum(_twice_vmapped(_per_sample(flat_matmul, bias))(w, x))
    text = jax.jit(jax.grad(loss)).lower(kernel).as_text()
    dots = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
    assert len(dots) == 2  # forward and weight gradient (x carries no gradient here)
    for line in dots:
        assert "contracting_dims = [1] x [0]" in line or "contracting_dims = [0] x [0]" in line, line
        assert f"tensor<{B * K}x" in line, line  # the B*K samples as one axis

    plain = lambda w: jnp.sum(_twice_vmapped(_per_sample(lambda x, w: x @ w, bias))(w, x))
    plain_text = jax.jit(jax.grad(plain)).lower(kernel).as_text()
    assert "contracting_dims = [0, 1] x [0, 1]" in plain_text  # what it avoids


@pytest.mark.parametrize("x_shape, kernel_shape", [((3, 0), (0, 5)), ((2, 3, 4), (4, 0)), ((0, 4), (4, 5))])
def test_flat_matmul_handles_zero_size_axes(x_shape, kernel_shape):
    x, kernel = jnp.ones(x_shape), jnp.ones(kernel_shape)
    np.testing.assert_array_equal(flat_matmul(x, kernel), x @ kernel)
    grads = jax.grad(lambda x, w: flat_matmul(x, w).sum(), argnums=(0, 1))(x, kernel)
    expected = jax.grad(lambda x, w: (x @ w).sum(), argnums=(0, 1))(x, kernel)
    for got, want in zip(grads, expected):
        np.testing.assert_array_equal(got, want)


def test_flat_matmul_errors():
    with pytest.raises(ValueError, match=r"x \(\.\.\., n\) and kernel \(n, m\); got x \(3, 4\) and kernel \(5, 6\)"):
        flat_matmul(jnp.ones((3, 4)), jnp.ones((5, 6)))
    with pytest.raises(TypeError, match="one dtype"):
        flat_matmul(jnp.ones((3, 4), jnp.float32), jnp.ones((4, 6), jnp.float64))


def test_linear_equals_nnx_linear():
    ours, theirs = Linear(N, M, rngs=nnx.Rngs(0)), nnx.Linear(N, M, rngs=nnx.Rngs(0))
    x, _, _ = _arrays()
    np.testing.assert_allclose(ours(x), theirs(x), rtol=1e-6)
    assert nnx.to_pure_dict(nnx.state(ours)).keys() == nnx.to_pure_dict(nnx.state(theirs)).keys()
    # A layer set up for flax's own path (here a precision) still gives the product.
    precise = Linear(N, M, precision=jax.lax.Precision.HIGHEST, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(precise(x), theirs(x), rtol=1e-6)


@pytest.mark.parametrize("sample_shape", [(), (7,), (2, 3)])
def test_encoder_distribution_draws_what_distrax_draws(sample_shape):
    loc = jnp.array([0.5, -1.0, 2.0], jnp.float64)
    scale = jnp.array([0.3, 1.5, 0.9], jnp.float64)
    ours, theirs = MultivariateNormalDiag(loc, scale), distrax.MultivariateNormalDiag(loc, scale)
    key = jax.random.key(3)
    z, log_q = ours.sample_and_log_prob(seed=key, sample_shape=sample_shape)
    z_ref, log_q_ref = theirs.sample_and_log_prob(seed=key, sample_shape=sample_shape)
    np.testing.assert_allclose(z, z_ref, rtol=1e-13)
    np.testing.assert_allclose(log_q, log_q_ref, rtol=1e-13)
    np.testing.assert_allclose(log_q, theirs.log_prob(z), rtol=1e-13)
    # The gradient in (loc, scale) is the reparameterisation gradient of distrax's draw.
    grad = lambda dist: jax.grad(
        lambda p: jnp.sum(dist(*p).sample_and_log_prob(seed=key, sample_shape=sample_shape)[0] ** 2)
    )((loc, scale))
    for a, b in zip(grad(MultivariateNormalDiag), grad(distrax.MultivariateNormalDiag)):
        np.testing.assert_allclose(a, b, rtol=1e-12)


def test_encoder_returns_the_fast_distribution():
    encoder = models.GaussianMLPEncoder(4, 2, (3,), rngs=nnx.Rngs(0))
    q = encoder(jnp.ones(4))
    assert isinstance(q, MultivariateNormalDiag) and isinstance(q, distrax.MultivariateNormalDiag)
    z, log_q = q.sample_and_log_prob(seed=0)  # an int seed, as distrax accepts
    np.testing.assert_allclose(log_q, q.log_prob(z), rtol=1e-5)
