"""Conditional models: the conditional VAE's bounds on log p(x | y), packed labels, and M2's enumerated bound."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import elbojax as ej
from elbojax import data, exact, missing, models, snis, train
from elbojax.models import conditional
from helpers import keys

D, C, d = 3, 2, 2  # the tiny fixed network: data, classes, latent


def _set(layer: nnx.Linear, kernel, bias):
    layer.kernel.set_value(jnp.asarray(kernel, layer.kernel[...].dtype))
    layer.bias.set_value(jnp.asarray(bias, layer.bias[...].dtype))


# Encoder heads act on [x, onehot(y)] (5 inputs), the decoder on [z, onehot(y)] (4 inputs).
LOC_KERNEL = np.array([[0.5, -0.2], [0.1, 0.3], [-0.4, 0.2], [1.0, 0.0], [0.0, -1.0]])
LOC_BIAS = np.array([0.05, -0.1])
SCALE_KERNEL = np.array([[0.1, 0.0], [0.0, -0.2], [0.3, 0.1], [-0.5, 0.2], [0.2, 0.4]])
SCALE_BIAS = np.array([-0.3, 0.1])
DECODER_KERNEL = np.array([[0.8, -0.5, 0.3], [-0.2, 0.6, 0.9], [1.5, -1.0, 0.0], [-0.7, 0.4, 1.2]])
DECODER_BIAS = np.array([0.1, -0.2, 0.05])


def _tiny_cvae(likelihood="bernoulli"):
    return nnx.jit(functools.partial(_build_tiny_cvae, likelihood))()  # eager NNX set-up is slow


def _build_tiny_cvae(likelihood):
    rngs = nnx.Rngs(0)
    encoder = models.GaussianMLPEncoder(D + C, d, (), rngs=rngs, param_dtype=jnp.float64)
    if likelihood == "bernoulli":
        decoder = models.BernoulliMLPDecoder(d + C, D, (), rngs=rngs, param_dtype=jnp.float64)
        _set(decoder.logits_head, DECODER_KERNEL, DECODER_BIAS)
    else:
        decoder = models.GaussianMLPDecoder(d + C, D, (), rngs=rngs, param_dtype=jnp.float64, fixed_scale=0.7)
        _set(decoder.mean_head, DECODER_KERNEL, DECODER_BIAS)
    _set(encoder.loc_head, LOC_KERNEL, LOC_BIAS)
    _set(encoder.scale_head, SCALE_KERNEL, SCALE_BIAS)
    return models.ConditionalVAE(encoder, decoder, models.StandardNormalPrior(d), num_classes=C)


def _by_hand_log_weights(x, y, z):
    """log p(x | z, y) + log p(z) - log q(z | x, y) for the tiny Bernoulli network, in NumPy."""
    onehot = np.eye(C)[y]
    xy = np.concatenate([x, onehot])
    loc, scale = xy @ LOC_KERNEL + LOC_BIAS, np.exp(xy @ SCALE_KERNEL + SCALE_BIAS)
    log_weights = []
    for z_k in np.asarray(z):
        logits = np.concatenate([z_k, onehot]) @ DECODER_KERNEL + DECODER_BIAS
        p = 1.0 / (1.0 + np.exp(-logits))
        log_lik = np.sum(x * np.log(p) + (1 - x) * np.log1p(-p))
        log_prior = np.sum(-0.5 * (z_k**2 + np.log(2 * np.pi)))
        log_q = np.sum(-0.5 * ((z_k - loc) / scale) ** 2 - np.log(scale) - 0.5 * np.log(2 * np.pi))
        log_weights.append(log_lik + log_prior - log_q)
    return np.array(log_weights)


@functools.lru_cache(maxsize=None)
def _small_models():
    """A conditional VAE and an M2 on D = 6, C = 3, d = 2 (built once, under jit)."""

    def build():
        rngs = nnx.Rngs(2)
        cvae = models.ConditionalVAE(
            models.GaussianMLPEncoder(9, 2, (5,), rngs=rngs), models.BernoulliMLPDecoder(5, 6, (5,), rngs=rngs),
            models.StandardNormalPrior(2), num_classes=3,
        )
        m2 = models.SemiSupervisedVAE(
            models.MLPClassifier(6, 3, (5,), rngs=rngs), models.GaussianMLPEncoder(9, 2, (5,), rngs=rngs),
            models.BernoulliMLPDecoder(5, 6, (5,), rngs=rngs), models.StandardNormalPrior(2), num_classes=3,
        )
        return cvae, m2

    return nnx.jit(build)()


def _packed_batch(labels):
    images = (np.random.default_rng(1).random((len(labels), 6)) > 0.5).astype(np.float32)
    return images, jnp.asarray(conditional.pack_labels(images, np.asarray(labels), 3))


def test_conditional_bounds_equal_hand_computed_values_on_a_tiny_network(x64):
    cvae = _tiny_cvae()
    graphdef, state = nnx.split(cvae)
    x = np.array([1.0, 0.0, 1.0])
    num = 6

    @jax.jit
    def run(state, key, y):
        view = nnx.merge(graphdef, state).given(y)
        z, _ = snis.importance_samples(key, x, view.log_joint, view.proposal(x), num_samples=num)
        return (
            z,
            ej.iwae_bound(key, x, view.log_joint, view.proposal(x), num_samples=num),
            ej.elbo(key, x, view.log_joint, view.proposal(x), num_samples=num),
        )

    for y in (0, 1):
        z, iwae, elbo = run(state, jax.random.key(y), jnp.asarray(y))
        log_weights = _by_hand_log_weights(x, y, z)
        np.testing.assert_allclose(iwae, np.log(np.mean(np.exp(log_weights))), rtol=1e-12)
        np.testing.assert_allclose(elbo, np.mean(log_weights), rtol=1e-12)
        # A one-hot label is the same label.
        _, iwae_one_hot, _ = run(state, jax.random.key(y), jnp.eye(C)[y])
        np.testing.assert_allclose(iwae_one_hot, iwae, rtol=1e-14)
    assert run(state, jax.random.key(0), jnp.asarray(0))[1] != run(state, jax.random.key(0), jnp.asarray(1))[1]


def test_affine_gaussian_conditional_vae_given_a_label_is_a_linear_gaussian(x64):
    """p(x | z, y) = N(W z + V onehot(y) + b, 0.7^2 I): the linear Gaussian with bias b + V onehot(y).

    So the log joint given y is the linear Gaussian's, and importance sampling from that model's
    exact posterior returns the exact log p(x | y) for every key.
    """
    cvae = _tiny_cvae("gaussian")
    graphdef, state = nnx.split(cvae)
    x = jnp.array([0.3, -1.1, 0.8])

    @jax.jit
    def run(state, key, y):
        view = nnx.merge(graphdef, state).given(y)
        linear = exact.LinearGaussian(
            jnp.asarray(DECODER_KERNEL[:d].T), jnp.asarray(DECODER_BIAS) + jnp.asarray(DECODER_KERNEL)[d + y], jnp.full(D, 0.49)
        )
        z = jax.random.normal(key, (d,), jnp.float64)
        return (
            view.log_joint(x, z),
            linear.log_joint(x, z),
            ej.importance_log_marginal(key, x, view.log_joint, linear.posterior(x), num_samples=5),
            linear.log_marginal(x),
            ej.iwae_bound(key, x, view.log_joint, view.proposal(x), num_samples=64),
        )

    for y in (0, 1):
        joint, linear_joint, at_posterior, log_p, iwae = jax.vmap(run, in_axes=(None, 0, None))(state, keys(y, 200), y)
        np.testing.assert_allclose(joint, linear_joint, rtol=1e-12)
        np.testing.assert_allclose(at_posterior, log_p, rtol=1e-12)
        assert np.mean(iwae) < log_p[0]


def test_class_conditional_samples_and_masked_bounds_given_a_label():
    cvae, _ = _small_models()
    graphdef, state = nnx.split(cvae)
    x = jnp.array([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    mask = jnp.array([True, True, False, True, False, True])

    @jax.jit
    def run(state):
        cvae = nnx.merge(graphdef, state)
        samples = jax.vmap(lambda y: cvae.sample(jax.random.key(0), y, 4)[1])(jnp.arange(3))
        view = cvae.given(2)
        full = (missing.masked_log_joint(view, jnp.ones(6, bool))(x, jnp.ones(2)), view.log_joint(x, jnp.ones(2)))
        imputation = missing.impute(jax.random.key(1), x, mask, view, num_samples=10, num_imputations=2)
        return samples, full, imputation

    samples, (masked, unmasked), imputation = run(state)
    assert samples.shape == (3, 4, 6) and np.all((samples > 0) & (samples < 1))
    assert not np.allclose(samples[0], samples[1])  # the label changes the samples
    assert masked == unmasked
    np.testing.assert_array_equal(imputation.samples[:, mask], np.broadcast_to(x[mask], (2, 4)))


def test_pack_labels_survives_dynamic_binarization():
    images = np.random.default_rng(0).integers(0, 256, size=(5, 2, 3), dtype=np.uint8)
    labels = np.array([0, 2, -1, 1, 2])
    packed = conditional.pack_labels(images, labels, 3)
    assert packed.shape == (5, 9) and packed.dtype == np.uint8
    expected = np.array([[1, 0, 0], [0, 0, 1], [0, 0, 0], [0, 1, 0], [0, 0, 1]])
    np.testing.assert_array_equal(packed[:, 6:], 255 * expected)
    binary = data.dynamic_binarize(packed, seed=0, epoch=0, step=3)
    np.testing.assert_array_equal(binary[:, 6:], expected)  # 255 is always 1, 0 always 0
    x, y = conditional.unpack_labels(jnp.asarray(binary[1]), 3)
    assert x.shape == (6,) and np.array_equal(y, [0, 0, 1])
    floats = conditional.pack_labels(images.astype(np.float32) / 255, labels, 3)
    np.testing.assert_array_equal(floats[:, 6:], expected)
    with pytest.raises(ValueError, match=r"`labels` must lie in -1 \.\. 2 \(-1 = unlabelled\); got -1 \.\. 3"):
        conditional.pack_labels(images, np.array([0, 1, 3, -1, 0]), 3)
    with pytest.raises(ValueError, match=r"`labels` must have shape \(N,\) = \(5,\)"):
        conditional.pack_labels(images, labels[:4], 3)
    with pytest.raises(TypeError, match=r"`labels` must be integers"):
        conditional.pack_labels(images, labels.astype(float), 3)


def test_conditional_objective_is_the_mean_bound_given_each_label_and_trains():
    cvae, _ = _small_models()
    labels = [0, 1, 2, 2]
    images, packed = _packed_batch(labels)
    batch_keys = keys(3, 4)
    objective_fn = conditional.objective("iwae", num_samples=3)
    graphdef, state = train.init(cvae, optimizer := optax.adam(1e-2))

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)
        by_hand = jax.vmap(
            lambda k, x, y: ej.iwae_bound(k, x, model.given(y).log_joint, model.given(y).proposal(x), num_samples=3)
        )(batch_keys, jnp.asarray(images), jnp.asarray(labels))
        analytic = conditional.objective("elbo")(batch_keys, model, packed, 0)
        return objective_fn(batch_keys, model, packed, 0).objective, by_hand.mean(), analytic

    value, by_hand, analytic = run(state.params)
    np.testing.assert_allclose(value, by_hand, rtol=1e-6)
    assert np.isfinite(float(analytic.objective)) and float(analytic.kl) > 0
    new_state, info = jax.jit(train.make_step(graphdef, optimizer, objective_fn, seed=0))(state, packed, jnp.arange(4))
    assert bool(info.finite)
    assert not np.allclose(jax.tree.leaves(new_state.params)[0], jax.tree.leaves(state.params)[0])


def test_m2_unlabelled_bound_is_the_explicit_sum_over_classes(x64):
    """U(x) = sum_c q(c | x) [L(x, c) - log q(c | x)], class c with key fold_in(key, c): the same samples."""
    graphdef, state = nnx.split(_small_models()[1])
    state = jax.tree.map(lambda a: a.astype(jnp.float64), state)
    x = jnp.array([1.0, 1.0, 0.0, 1.0, 0.0, 0.0])

    @jax.jit
    def run(state, key):
        m2 = nnx.merge(graphdef, state)
        per_class = [m2.labelled_bound(jax.random.fold_in(key, c), x, c, num_samples=4) for c in range(3)]
        return (
            m2.unlabelled_bound(key, x, num_samples=4),
            jnp.stack(per_class),
            m2.class_bounds(key, x, num_samples=4),
            jax.nn.log_softmax(m2.classifier_logits(x)),
        )

    for key in keys(4, 3):
        unlabelled, per_class, class_bounds, log_q = run(state, key)
        np.testing.assert_allclose(class_bounds, per_class, rtol=1e-13)
        explicit = np.sum(np.exp(log_q) * (np.asarray(per_class) - log_q))
        np.testing.assert_allclose(unlabelled, explicit, rtol=1e-13)
        assert unlabelled < np.max(per_class) - np.min(log_q)


def test_m2_objective_mixes_labelled_and_unlabelled_rows_and_trains():
    _, m2 = _small_models()
    labels = [1, -1, 0, -1, 2]
    images, packed = _packed_batch(labels)
    batch_keys = keys(5, 5)
    alpha = 2.5
    objective_fn = conditional.semi_supervised_objective(alpha=alpha, num_samples=2)
    graphdef, state = train.init(m2, optimizer := optax.adam(1e-2))

    @jax.jit
    def run(params):
        model = nnx.merge(graphdef, params)

        def row(key, x, label):
            log_q = jax.nn.log_softmax(model.classifier_logits(x))
            labelled = model.labelled_bound(jax.random.fold_in(key, label), x, label, num_samples=2) + alpha * log_q[label]
            return labelled, model.unlabelled_bound(key, x, num_samples=2)

        labelled, unlabelled = jax.vmap(row)(batch_keys, jnp.asarray(images), jnp.maximum(jnp.asarray(labels), 0))
        by_hand = jnp.where(jnp.asarray(labels) >= 0, labelled, unlabelled).mean()
        return objective_fn(batch_keys, model, packed, 0).objective, by_hand, jax.vmap(model.classify)(jnp.asarray(images))

    value, by_hand, predicted = run(state.params)
    np.testing.assert_allclose(value, by_hand, rtol=1e-6)
    assert predicted.shape == (5,) and predicted.dtype == jnp.int32
    new_state, info = jax.jit(train.make_step(graphdef, optimizer, objective_fn, seed=0))(state, packed, jnp.arange(5))
    assert bool(info.finite)
    assert not np.allclose(new_state.params["classifier"]["head"]["kernel"][...], state.params["classifier"]["head"]["kernel"][...])


def test_argument_errors():
    rngs = nnx.Rngs(0)
    with pytest.raises(ValueError, match=r"the sizes must be .*got \{'decoder.latent_dim \(d \+ C\)': 2\}"):
        models.ConditionalVAE(
            models.GaussianMLPEncoder(5, 2, (), rngs=rngs), models.BernoulliMLPDecoder(2, 3, (), rngs=rngs),
            models.StandardNormalPrior(2), num_classes=2,
        )
    cvae, m2 = _small_models()
    x = jnp.zeros(6)
    with pytest.raises(ValueError, match=r"`y` must be one label: an integer class of shape \(\) or a one-hot vector of shape \(3,\); got shape \(2,\)"):
        cvae.proposal(x, jnp.array([0.0, 1.0]))
    with pytest.raises(ValueError, match=r"`y` must be one label.*got shape \(\) and dtype float32"):
        cvae.given(1.0)
    for bad in (3, -1, np.int64(10)):  # jax.nn.one_hot made each the all-zero label, silently
        with pytest.raises(ValueError, match=rf"`y` must be a class in 0..2, got {int(bad)}"):
            cvae.given(bad)
        with pytest.raises(ValueError, match=r"`y` must be a class in 0..2"):
            cvae.log_joint(x, jnp.zeros(2), bad)
    with pytest.raises(ValueError, match=r"`x` must have shape \(6,\)"):
        cvae.proposal(jnp.zeros(7), 0)
    with pytest.raises(TypeError, match=r"conditional.objective trains a ConditionalVAE, got SemiSupervisedVAE"):
        conditional.objective("elbo")(keys(0, 2), m2, jnp.zeros((2, 9)), 0)
    with pytest.raises(TypeError, match=r"semi_supervised_objective trains a SemiSupervisedVAE, got ConditionalVAE"):
        conditional.semi_supervised_objective(alpha=1.0)(keys(0, 2), cvae, jnp.zeros((2, 9)), 0)
    with pytest.raises(ValueError, match=r"`batch row` must have shape \(9,\)"):
        conditional.objective("elbo")(keys(0, 2), cvae, jnp.zeros((2, 8)), 0)
    with pytest.raises(ValueError, match=r"`alpha` must be a finite number >= 0, got -1"):
        conditional.semi_supervised_objective(alpha=-1.0)
    with pytest.raises(ValueError, match=r"classifier.num_classes \(4\) must equal num_classes \(3\)"):
        models.SemiSupervisedVAE(
            models.MLPClassifier(6, 4, (), rngs=rngs), models.GaussianMLPEncoder(9, 2, (), rngs=rngs),
            models.BernoulliMLPDecoder(5, 6, (), rngs=rngs), models.StandardNormalPrior(2), num_classes=3,
        )


def test_class_conditional_samples_picture(tmp_path):
    from elbojax import plots

    images = np.random.default_rng(0).random((3, 4, 784))
    path = plots.class_conditional_samples(images, class_names=["a", "b", "c"], path=tmp_path / "g.png")
    assert path.exists() and path.stat().st_size > 1000
    with pytest.raises(ValueError, match=r"`class_names` must name the 3 classes, got 2"):
        plots.class_conditional_samples(images, class_names=["a", "b"])
    with pytest.raises(ValueError, match=r"`images` must have shape \(C, M, D\)"):
        plots.class_conditional_samples(images[0])


def test_analytic_kl_is_accepted_where_the_conditional_vae_has_one():
    """kl="analytic" asks for the closed form the conditional VAE has (as "auto" picks it), not a refusal."""
    cvae, _ = _small_models()
    assert cvae.given(0).kl_mode("analytic") == cvae.given(0).kl_mode("auto") == "analytic"
    assert conditional._Packed(cvae).kl_mode("analytic") == "analytic"
    assert cvae.given(0).kl_mode("monte_carlo") == "monte_carlo"
    _, packed = _packed_batch([0, 1, 2, 2])
    analytic = conditional.objective("elbo", kl="analytic")(keys(3, 4), cvae, packed, 0)
    auto = conditional.objective("elbo")(keys(3, 4), cvae, packed, 0)
    np.testing.assert_allclose(analytic.objective, auto.objective, rtol=1e-6)
