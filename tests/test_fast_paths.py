"""The fast paths give exactly what the plain ones do: `fold_in_many` is `jax.random.fold_in`,
`_keys.normal` is standard normal from JAX's own Threefry-2x32 words, a model's KL can reuse a
proposal, and the likelihoods' `softplus` is `jax.nn.softplus`; and the training step's compiled
form copies no state where it need not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from elbojax import models
from elbojax._keys import fold_in_many, normal

DATA = np.array([0, 1, 2, 7, 99, 2**16, 2**31 - 1, 2**31, 2**32 - 2, 2**32 - 1], dtype=np.uint32)


def _reference(key, data):
    keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, jnp.asarray(data).ravel())
    return keys.reshape(np.shape(data) + keys.shape[1:])  # raw uint32 keys keep their trailing 2


@pytest.mark.parametrize("seed", [0, 1, 12345, 2**31 - 1])
def test_fold_in_many_is_fold_in_bit_for_bit(seed):
    key = jax.random.key(seed)
    ours, theirs = fold_in_many(key, DATA), _reference(key, DATA)
    np.testing.assert_array_equal(jax.random.key_data(ours), jax.random.key_data(theirs))
    # The keys draw the same numbers.
    draw = jax.vmap(lambda k: jax.random.normal(k, (3,)))
    np.testing.assert_array_equal(draw(ours), draw(theirs))


def test_fold_in_many_any_shape_jit_vmap_and_x64():
    key = jax.random.key(5)
    data = jnp.arange(12, dtype=jnp.int32).reshape(3, 4)
    np.testing.assert_array_equal(
        jax.random.key_data(jax.jit(fold_in_many)(key, data)), jax.random.key_data(_reference(key, data))
    )
    keys = jax.random.split(key, 4)
    ours = jax.vmap(lambda k: jax.random.key_data(fold_in_many(k, jnp.arange(3))))(keys)
    theirs = jax.vmap(lambda k: jax.random.key_data(_reference(k, jnp.arange(3))))(keys)
    np.testing.assert_array_equal(ours, theirs)
    with jax.enable_x64(True):
        np.testing.assert_array_equal(
            jax.random.key_data(fold_in_many(key, jnp.arange(5))), jax.random.key_data(_reference(key, jnp.arange(5)))
        )


def test_fold_in_many_raw_and_other_implementations():
    raw = jax.random.PRNGKey(3)  # a legacy uint32[2] key
    np.testing.assert_array_equal(fold_in_many(raw, DATA), _reference(raw, DATA))
    rbg = jax.random.key(1, impl="rbg")  # not Threefry: jax.random.fold_in itself
    np.testing.assert_array_equal(jax.random.key_data(fold_in_many(rbg, DATA)), jax.random.key_data(_reference(rbg, DATA)))
    with pytest.raises(ValueError, match="one key"):
        fold_in_many(jax.random.split(jax.random.key(0), 2), DATA)


def _normal_reference(key, size):
    """`normal(key, (size,))` from JAX's own Threefry-2x32 (`jax.extend`) and scipy's erfinv, in float64."""
    from jax.extend.random import threefry_2x32
    from scipy.special import erfinv

    blocks = (size + 1) // 2
    counters = np.concatenate([np.zeros(blocks, np.uint32), np.arange(blocks, dtype=np.uint32)])
    words = np.asarray(threefry_2x32(jax.random.key_data(key), jnp.asarray(counters)))[:size]  # first words, then second
    unit = (words >> 9).astype(np.float64) / 2.0**23  # the 23 mantissa bits: [0, 1)
    low = float(np.nextafter(np.float32(-1.0), np.float32(0.0)))
    return np.sqrt(2.0) * erfinv(np.maximum(low, unit * (1.0 - low) + low))


@pytest.mark.parametrize("size", [1, 2, 7, 50, 1001])
def test_normal_is_jax_threefry_words_through_erfinv(size):
    key = jax.random.key(size)
    ours = np.asarray(normal(key, (size,)))
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, _normal_reference(key, size), rtol=2e-5, atol=2e-6)


def test_normal_is_standard_normal():
    n = 2**18
    z = np.asarray(normal(jax.random.key(11), (n,)), np.float64)
    assert abs(z.mean()) < 4 / np.sqrt(n)  # four standard errors
    assert abs(z.var() - 1.0) < 4 * np.sqrt(2.0 / n)
    from scipy import stats

    assert stats.kstest(z, "norm").pvalue > 1e-4
    # The two words of a block are independent draws: no correlation between the two halves.
    first, second = z[: n // 2], z[n // 2 :]
    assert abs(np.corrcoef(first, second)[0, 1]) < 4 / np.sqrt(n // 2)


def test_normal_shapes_keys_and_transforms():
    key = jax.random.key(4)
    assert normal(key, ()).shape == () and normal(key, (0,)).shape == (0,)
    np.testing.assert_array_equal(normal(key, (2, 3, 5)).ravel(), normal(key, (30,)))
    np.testing.assert_array_equal(normal(jax.random.key_data(key), (9,)), normal(key, (9,)))  # a raw key
    np.testing.assert_array_equal(jax.jit(normal, static_argnums=1)(key, (9,)), normal(key, (9,)))
    keys = jax.random.split(key, 3)
    batched = jax.vmap(lambda k: normal(k, (5,)))(keys)
    for k, row in zip(keys, batched):
        np.testing.assert_array_equal(row, normal(k, (5,)))
    assert not np.allclose(batched[0], batched[1])
    # Another dtype, or a key of another implementation: jax.random.normal's numbers.
    np.testing.assert_array_equal(normal(key, (4,), jnp.float16), jax.random.normal(key, (4,), jnp.float16))
    rbg = jax.random.key(1, impl="rbg")
    np.testing.assert_array_equal(normal(rbg, (4,)), jax.random.normal(rbg, (4,)))
    with pytest.raises(ValueError, match="one key"):
        normal(jax.random.split(key, 2), (3,))


def test_encoder_draws_with_fast_normal_and_sample_agrees():
    encoder = models.GaussianMLPEncoder(6, 3, (4,), rngs=nnx.Rngs(0))
    q = encoder(jnp.linspace(0.0, 1.0, 6))
    key = jax.random.key(2)
    z, log_q = q.sample_and_log_prob(seed=key, sample_shape=(5,))
    np.testing.assert_allclose((z - q.loc) / q.scale_diag, normal(key, (5, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(q.sample(seed=key, sample_shape=(5,)), z)  # `sample` draws the same
    np.testing.assert_allclose(log_q, q.log_prob(z), rtol=1e-5)


def test_analytic_kl_reuses_a_given_proposal():
    vae = models.VAE(
        models.GaussianMLPEncoder(6, 2, (4,), rngs=nnx.Rngs(0)),
        models.BernoulliMLPDecoder(2, 6, (4,), rngs=nnx.Rngs(1)),
        models.StandardNormalPrior(2),
    )
    x = jnp.array([0.0, 1.0, 1.0, 0.0, 1.0, 0.0])
    q = vae.proposal(x)
    np.testing.assert_allclose(vae.analytic_kl(x, proposal=q), vae.analytic_kl(x), rtol=1e-6)
    np.testing.assert_allclose(
        vae.analytic_kl(x, proposal=q, per_dimension=True), vae.analytic_kl(x, per_dimension=True), rtol=1e-6
    )
    # The proposal handed in is the one used (here a different one gives a different KL).
    other = vae.proposal(1.0 - x)
    assert not np.allclose(vae.analytic_kl(x, proposal=other), vae.analytic_kl(x))


def test_encoder_gaussian_kl_is_distraxs_in_one_sum(x64):
    import distrax

    from elbojax.models.encoders import MultivariateNormalDiag

    k = jax.random.split(jax.random.key(3), 4)
    loc, scale = jax.random.normal(k[0], (3, 5)), jnp.exp(jax.random.normal(k[1], (3, 5)))
    q = MultivariateNormalDiag(loc, scale)
    for p in (
        distrax.MultivariateNormalDiag(jax.random.normal(k[2], (5,)), jnp.exp(jax.random.normal(k[3], (5,)))),
        distrax.MultivariateNormalDiag(jnp.zeros(5), jnp.ones(5)),
        MultivariateNormalDiag(loc[::-1], scale[::-1]),
    ):
        ours = q.kl_divergence(p)
        assert ours.shape == (3,)
        np.testing.assert_allclose(ours, distrax.MultivariateNormalDiag(loc, scale).kl_divergence(p), rtol=1e-12)
    np.testing.assert_allclose(q.kl_divergence(q), 0.0, atol=1e-15)
    # A prior with a larger batch, and a Gaussian that is not diagonal: distrax's own answer.
    wide = distrax.MultivariateNormalDiag(jnp.zeros((2, 3, 5)), jnp.ones((2, 3, 5)))
    assert q.kl_divergence(wide).shape == (2, 3)
    full = distrax.MultivariateNormalTri(jnp.zeros(5), jnp.eye(5) * 2.0)
    np.testing.assert_allclose(
        q.kl_divergence(full), distrax.MultivariateNormalDiag(loc, scale).kl_divergence(full), rtol=1e-12
    )


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_softplus_matches_jax_in_value_gradient_and_curvature(dtype):
    from elbojax.models.likelihoods import softplus

    with jax.enable_x64(dtype == jnp.float64):
        s = jnp.array([-1e4, -80.0, -3.0, -1e-7, 0.0, 1e-7, 0.5, 2.0, 40.0, 1e4], dtype)
        rtol = 1e-6 if dtype == jnp.float32 else 1e-13
        for ours, theirs in (
            (softplus, jax.nn.softplus),
            (jax.grad(softplus), jax.grad(jax.nn.softplus)),  # sigma(s); 1/2 at s = 0
            (jax.grad(jax.grad(softplus)), jax.grad(jax.grad(jax.nn.softplus))),
        ):
            # atol: at s = 40 the curvature is 4e-18, which ours resolves and jax.nn.softplus rounds to 0.
            np.testing.assert_allclose(jax.vmap(ours)(s), jax.vmap(theirs)(s), rtol=rtol, atol=1e-15)


def _state_copies(hlo: str, shapes, computation: str) -> int:
    """How many `copy` ops of a parameter-shaped f32 array sit in the named part of compiled HLO
    (`"entry"`: the ENTRY computation; `"loop"`: every other computation, the scan's body among them)."""
    import re

    entry_start = hlo.index("\nENTRY")
    entry_end = hlo.index("\n}", entry_start)
    part = hlo[entry_start:entry_end] if computation == "entry" else hlo[:entry_start] + hlo[entry_end:]
    names = {"f32[" + ",".join(map(str, shape)) + "]" for shape in shapes}
    return sum(1 for shape in re.findall(r"= (f32\[[\d,]*\])\S* copy\(", part) if shape in names)


def test_the_training_step_copies_no_state_per_call_or_per_scanned_step():
    """A skipped step keeps the state without making XLA copy it on every call or loop iteration."""
    import optax

    from elbojax import train

    vae = models.VAE(
        models.GaussianMLPEncoder(12, 3, (10,), rngs=nnx.Rngs(0)),
        models.BernoulliMLPDecoder(3, 12, (11,), rngs=nnx.Rngs(1)),
        models.StandardNormalPrior(3),
    )
    optimizer = optax.adam(1e-3)
    graphdef, state = train.init(vae, optimizer)
    step = train.make_step(graphdef, optimizer, train.objective("elbo", num_samples=1), seed=0)
    shapes = {leaf.shape for leaf in jax.tree.leaves(state.params) if leaf.ndim == 2}  # the kernels
    batch, indices = jnp.zeros((4, 12)), jnp.arange(4)
    call = jax.jit(step).lower(state, batch, indices).compile().as_text()
    assert _state_copies(call, shapes, "entry") == 0
    passed_through = jax.jit(step.in_loop).lower(state, batch, indices).compile().as_text()
    assert _state_copies(passed_through, shapes, "entry") > 0  # what the re-selecting skip avoids
    batches, stacked = jnp.zeros((3, 4, 12)), jnp.arange(12).reshape(3, 4)
    scan = jax.jit(train.make_multi_step(step, check="step")).lower(state, batches, stacked)
    assert _state_copies(scan.compile().as_text(), shapes, "loop") == 0
    re_selecting = jax.jit(train.make_multi_step(lambda *args: step(*args))).lower(state, batches, stacked)
    assert _state_copies(re_selecting.compile().as_text(), shapes, "loop") > 0  # what `in_loop` avoids


def test_the_steps_gradient_norm_is_optaxs_and_flags_what_is_not_finite(x64):
    import optax

    from elbojax.train import _global_norm

    # "a" and "c" are large enough for a product of their own; "b"'s leaves are joined.
    keys = jax.random.split(jax.random.key(0), 2)
    tree = {
        "a": jax.random.normal(keys[0], (40, 30)),
        "b": [jnp.arange(3.0), jnp.float64(-2.5), jnp.ones((7, 5))],
        "c": jax.random.normal(keys[1], (1024,)),
    }
    np.testing.assert_allclose(_global_norm(tree), optax.tree.norm(tree), rtol=1e-14)
    np.testing.assert_allclose(jax.jit(_global_norm)(tree), optax.tree.norm(tree), rtol=1e-14)
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not np.isfinite(_global_norm({**tree, "a": tree["a"].at[3, 2].set(bad)}))
        assert not np.isfinite(_global_norm({**tree, "b": [tree["b"][0].at[1].set(bad), *tree["b"][1:]]}))
    assert not np.isfinite(_global_norm({"big": jnp.full((4,), 1e30, jnp.float32)}))  # its square overflows
    kernel = jnp.ones((784, 200), jnp.float32)  # large enough that XLA's CPU `max` would skip a NaN
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        assert not np.isfinite(jax.jit(_global_norm)({"w": kernel.at[300, 7].set(bad), "b": jnp.ones(200)}))


def test_the_once_per_call_state_check_flags_any_non_finite_entry_and_nothing_else():
    from elbojax.train import _all_finite

    tree = {"a": jnp.ones((7, 5)), "b": [jnp.arange(3.0), jnp.int32(4)], "key": jax.random.key(0)}
    assert bool(_all_finite(tree))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for position in ((0, 0), (3, 2), (6, 4)):
            assert not bool(_all_finite({**tree, "a": tree["a"].at[position].set(bad)})), (bad, position)
    assert bool(_all_finite({"big": jnp.full((1000,), 3e38, jnp.float32)}))  # large moments: no false alarm
    # A kernel of the IWAE model: XLA's `max` over 4096 entries or more skips a NaN on CPU.
    kernel = jnp.ones((784, 200), jnp.float32)
    assert bool(_all_finite(kernel)) and bool(jax.jit(_all_finite)(kernel))
    for bad in (jnp.nan, jnp.inf, -jnp.inf):
        for position in ((0, 0), (300, 7), (783, 199)):
            assert not bool(jax.jit(_all_finite)(kernel.at[position].set(bad))), (bad, position)
