"""elbojax.models: hand-computed values on tiny fixed networks, the likelihoods against distrax and
scipy, the priors against hand mixtures, and every pathwise estimator through nnx.split/merge."""

import functools
import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

import elbojax as ej
from elbojax.models import (
    VAE,
    BernoulliMLPDecoder,
    GaussianMLPDecoder,
    GaussianMLPEncoder,
    HierarchicalProposal,
    MixturePrior,
    StandardNormalPrior,
    TwoLayerVAE,
    VampPrior,
    bernoulli_log_likelihood,
    bias_from_data_mean,
    gaussian_log_likelihood,
)
from elbojax.proposals import closed_form_kl

F64 = jnp.float64
RTOL = 1e-12

# ------------------------------------------------------------------------------------------------
# Tiny networks with explicitly set parameters, and their numpy transcriptions.
# ------------------------------------------------------------------------------------------------


def _set_linear(layer, kernel, bias):
    layer.kernel.set_value(jnp.asarray(kernel, F64))
    layer.bias.set_value(jnp.asarray(bias, F64))


def _params(rng, n_in, n_out):
    return rng.normal(size=(n_in, n_out)) * 0.8, rng.normal(size=n_out) * 0.3


def _set_mlp(mlp, rng):
    """Set every layer of an `MLP`; return its [(W, b)] for the numpy forward pass."""
    weights = []
    for layer in mlp.layers:
        w, b = _params(rng, layer.in_features, layer.out_features)
        _set_linear(layer, w, b)
        weights.append((w, b))
    return weights


def _np_trunk(weights, h):
    for w, b in weights:
        h = np.tanh(h @ w + b)
    return h


def _fixed_encoder(rng, data_dim, latent_dim, hidden=(2,), scale_transform="exp"):
    """A `GaussianMLPEncoder` with set parameters, and a numpy function x -> (loc, scale)."""
    enc = GaussianMLPEncoder(
        data_dim, latent_dim, hidden, scale_transform=scale_transform, rngs=nnx.Rngs(0), param_dtype=F64
    )
    trunk = _set_mlp(enc.trunk, rng)
    (w_mu, b_mu), (w_s, b_s) = (_params(rng, enc.trunk.out_dim, latent_dim) for _ in range(2))
    _set_linear(enc.loc_head, w_mu, b_mu)
    _set_linear(enc.scale_head, w_s, b_s)
    transform = np.exp if scale_transform == "exp" else lambda a: np.logaddexp(0.0, a)

    def np_encoder(x):
        h = _np_trunk(trunk, np.asarray(x, np.float64))
        return h @ w_mu + b_mu, transform(h @ w_s + b_s)

    return enc, np_encoder


def _fixed_bernoulli_decoder(rng, latent_dim, data_dim, hidden=(2,)):
    dec = BernoulliMLPDecoder(latent_dim, data_dim, hidden, rngs=nnx.Rngs(0), param_dtype=F64)
    trunk = _set_mlp(dec.trunk, rng)
    w, b = _params(rng, dec.trunk.out_dim, data_dim)
    _set_linear(dec.logits_head, w, b)
    return dec, lambda z: _np_trunk(trunk, np.asarray(z, np.float64)) @ w + b


def _np_bernoulli(x, logits):
    """The textbook x log p + (1 - x) log(1 - p), with log p = log_expit(l), log(1 - p) = log_expit(-l)."""
    x = np.asarray(x, np.float64)
    return float(np.sum(x * special.log_expit(logits) + (1.0 - x) * special.log_expit(-logits)))


def _np_diag_normal(z, loc, scale):
    standardized = (np.asarray(z, np.float64) - loc) / scale
    return float(np.sum(-0.5 * standardized**2 - np.log(scale) - 0.5 * np.log(2 * np.pi)))


def _jit(fn, *args, **kwargs):
    """`jax.jit(fn)(*args)`: one compilation is much cheaper than many eager small operations."""
    return jax.jit(fn, **kwargs)(*args)


def _np_mixture(z, log_weights, locs, scales):
    terms = [lw + _np_diag_normal(z, m, s) for lw, m, s in zip(log_weights, locs, scales)]
    return float(special.logsumexp(terms))


X3 = np.array([1.0, 0.0, 1.0])
Z2 = np.array([0.3, -1.2])

# Small randomly initialised float32 models for the estimator tests.
DATA_DIM = 6
X6 = jnp.array([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])


@functools.cache  # built once per kind; tests only read them (nnx.clone one to change it)
def _model(kind):
    r = nnx.Rngs(0)
    if kind == "two_layer":
        return TwoLayerVAE(DATA_DIM, (3, 2), hidden_q=((5,), (4,)), hidden_p=((4,), (5,)), rngs=r)
    enc = GaussianMLPEncoder(DATA_DIM, 2, (5,), rngs=r)
    prior = StandardNormalPrior(2) if kind == "standard" else VampPrior(enc, 3, rngs=r)
    return VAE(enc, BernoulliMLPDecoder(2, DATA_DIM, (5,), rngs=r), prior)


# ------------------------------------------------------------------------------------------------
# Likelihoods
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.int32, bool])
def test_fused_bernoulli_equals_distrax_on_binary_x(x64, dtype):
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=50) * 8.0)
    x = rng.integers(0, 2, size=50)
    fused = bernoulli_log_likelihood(jnp.asarray(x.astype(dtype)), logits)
    reference = distrax.Independent(distrax.Bernoulli(logits=logits), 1).log_prob(jnp.asarray(x, F64))
    assert fused.dtype == F64
    np.testing.assert_allclose(fused, reference, rtol=RTOL)
    np.testing.assert_allclose(fused, _np_bernoulli(x, np.asarray(logits)), rtol=RTOL)


def test_fused_bernoulli_is_exact_for_huge_logits(x64):
    logits = jnp.array([-800.0, 800.0, -40.0, 40.0])
    x = jnp.array([1.0, 0.0, 0.0, 1.0])
    # log sigma(-800) = -800 and log(1 - sigma(800)) = -800 exactly; the others are -log1p(e^-40).
    expected = -1600.0 - 2 * math.log1p(math.exp(-40.0))
    np.testing.assert_allclose(bernoulli_log_likelihood(x, logits), expected, rtol=RTOL)


def test_fused_bernoulli_propagates_a_nan_in_x():
    """A NaN entry is neither 1 nor 0: the log-likelihood is NaN, as distrax's (it was read as 0)."""
    logits = jnp.array([0.3, 2.0, -1.0])
    x = jnp.array([1.0, jnp.nan, 0.0])
    assert np.isnan(distrax.Independent(distrax.Bernoulli(logits=logits), 1).log_prob(x))
    assert np.isnan(bernoulli_log_likelihood(x, logits)) and np.isnan(jax.jit(bernoulli_log_likelihood)(x, logits))
    assert np.isnan(jax.grad(bernoulli_log_likelihood, argnums=1)(x, logits)[1])


def test_fused_bernoulli_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"`logits` must have shape \(3,\) \(the shape of `x`\), got \(2, 3\)"):
        bernoulli_log_likelihood(jnp.ones(3), jnp.zeros((2, 3)))


def test_gaussian_log_likelihood_matches_scipy(x64):
    rng = np.random.default_rng(2)
    x, mean, log_scale = rng.normal(size=(3, 7))
    np.testing.assert_allclose(
        gaussian_log_likelihood(x, mean, log_scale), _np_diag_normal(x, mean, np.exp(log_scale)), rtol=RTOL
    )
    np.testing.assert_allclose(  # one shared scale
        gaussian_log_likelihood(x, mean, jnp.asarray(-0.5)), _np_diag_normal(x, mean, np.exp(-0.5)), rtol=RTOL
    )
    with pytest.raises(ValueError, match=r"`log_scale` must broadcast to the shape of `x` \(7,\), got \(2, 7\)"):
        gaussian_log_likelihood(x, mean, np.zeros((2, 7)))
    with pytest.raises(ValueError, match=r"`mean` must have shape \(7,\)"):
        gaussian_log_likelihood(x, mean[:3], log_scale)


def test_bias_from_data_mean_is_the_clipped_logit(x64):
    mean = np.array([0.0, 1.0, 0.5, 0.25, 0.9995])
    p = np.clip(mean, 1e-3, 1 - 1e-3)
    np.testing.assert_allclose(bias_from_data_mean(mean), np.log(p / (1 - p)), rtol=RTOL)
    np.testing.assert_allclose(bias_from_data_mean(mean, clip=0.1)[:2], [np.log(1 / 9), np.log(9)], rtol=RTOL)
    with pytest.raises(ValueError, match=r"`clip` must lie in \(0, 0.5\), got 0.5"):
        bias_from_data_mean(mean, clip=0.5)


def test_bias_from_data_mean_stays_finite_for_a_tiny_clip_in_float32():
    # 1 - 1e-8 rounds to 1 in float32, whose logit is inf; the bias is bounded by the clip's logit.
    bias = bias_from_data_mean(jnp.array([0.0, 1.0, 0.5], jnp.float32), clip=1e-8)
    assert bias.dtype == jnp.float32
    np.testing.assert_allclose(bias, [-np.log(1e8 - 1), np.log(1e8 - 1), 0.0], rtol=1e-6)


@pytest.mark.parametrize(
    "mean, match",
    [
        (np.array([0.2, np.nan]), r"got nan at index \(1,\) \(1 of 2 values\)\.$"),
        (np.array([0.0, 255.0, 3.0]), r"got 255.0 at index \(1,\) \(2 of 3 values\)\. Grey levels 0..255 must be divided by 255"),
        (np.array([-0.1, 0.5]), r"got -0.1 at index \(0,\)"),
    ],
)
def test_bias_from_data_mean_refuses_means_outside_the_unit_interval(mean, match):
    with pytest.raises(ValueError, match=r"`mean` must be per-pixel means in \[0, 1\], " + match):
        bias_from_data_mean(mean)


def test_likelihoods_and_priors_take_python_lists():
    np.testing.assert_allclose(bernoulli_log_likelihood([1.0, 0.0], [0.0, 0.0]), 2 * np.log(0.5), rtol=1e-6)
    np.testing.assert_allclose(gaussian_log_likelihood([1.0, 2.0], [0.0, 0.0], 0.0), -2.5 - np.log(2 * np.pi), rtol=1e-6)
    np.testing.assert_allclose(StandardNormalPrior(2).log_prob([0.0, 0.0]), -np.log(2 * np.pi), rtol=1e-6)
    np.testing.assert_allclose(bias_from_data_mean([0.2, 0.5]), [np.log(0.25), 0.0], rtol=1e-6)


def test_output_bias_initialises_the_decoder_to_the_data_mean():
    mean = np.array([0.0, 0.1, 0.5, 0.8, 1.0])
    bias = bias_from_data_mean(mean)
    dec = BernoulliMLPDecoder(2, 5, (3,), rngs=nnx.Rngs(0), output_bias=bias)
    np.testing.assert_allclose(dec.logits_head.bias[...], bias, rtol=1e-6)
    dec.logits_head.kernel.set_value(jnp.zeros_like(dec.logits_head.kernel[...]))
    np.testing.assert_allclose(jax.nn.sigmoid(dec(jnp.ones(2))), np.clip(mean, 1e-3, 1 - 1e-3), rtol=1e-5)
    with pytest.raises(ValueError, match=r"`output_bias` must have shape \(5,\), got \(4,\)"):
        BernoulliMLPDecoder(2, 5, (3,), rngs=nnx.Rngs(0), output_bias=bias[:4])


# ------------------------------------------------------------------------------------------------
# Encoders, decoders and the VAE on fixed networks, against numpy
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale_transform", ["exp", "softplus"])
def test_encoder_log_prob_matches_numpy(x64, scale_transform):
    rng = np.random.default_rng(3)
    enc, np_encoder = _fixed_encoder(rng, 3, 2, hidden=(4, 2), scale_transform=scale_transform)
    loc, scale = np_encoder(X3)
    assert isinstance(jax.eval_shape(enc, X3), distrax.MultivariateNormalDiag)
    log_q = _jit(lambda x, z: enc(x).log_prob(z), X3, Z2)
    np.testing.assert_allclose(log_q, _np_diag_normal(Z2, loc, scale), rtol=RTOL)


def test_vae_log_joint_and_proposal_match_numpy(x64):
    rng = np.random.default_rng(4)
    enc, np_encoder = _fixed_encoder(rng, 3, 2)
    dec, np_logits = _fixed_bernoulli_decoder(rng, 2, 3)
    vae = VAE(enc, dec, StandardNormalPrior(2), likelihood="bernoulli")
    values = _jit(
        lambda x, z: (vae.log_likelihood(x, z), vae.log_joint(x, z), vae.proposal(x).log_prob(z), vae.decode_mean(z)),
        X3, Z2,
    )
    log_lik = _np_bernoulli(X3, np_logits(Z2))
    expected = (log_lik, log_lik + _np_diag_normal(Z2, 0.0, 1.0), _np_diag_normal(Z2, *np_encoder(X3)),
                special.expit(np_logits(Z2)))
    for value, hand in zip(values, expected):
        np.testing.assert_allclose(value, hand, rtol=RTOL)


@pytest.mark.parametrize("fixed_scale", [None, 0.3])
def test_gaussian_vae_log_joint_matches_numpy(x64, fixed_scale):
    rng = np.random.default_rng(5)
    enc, _ = _fixed_encoder(rng, 3, 2)
    dec = GaussianMLPDecoder(2, 3, (2,), rngs=nnx.Rngs(0), fixed_scale=fixed_scale, param_dtype=F64)
    trunk = _set_mlp(dec.trunk, rng)
    w_mu, b_mu = _params(rng, 2, 3)
    _set_linear(dec.mean_head, w_mu, b_mu)
    h = _np_trunk(trunk, Z2)
    if fixed_scale is None:
        w_s, b_s = _params(rng, 2, 3)
        _set_linear(dec.log_scale_head, w_s, b_s)
        scale = np.exp(h @ w_s + b_s)
    else:
        scale = np.full(3, fixed_scale)
    vae = VAE(enc, dec, StandardNormalPrior(2))
    x = np.array([0.2, -1.0, 0.7])
    expected = _np_diag_normal(x, h @ w_mu + b_mu, scale) + _np_diag_normal(Z2, 0.0, 1.0)
    log_joint, mean = _jit(lambda x, z: (vae.log_joint(x, z), vae.decode_mean(z)), x, Z2)
    np.testing.assert_allclose(log_joint, expected, rtol=RTOL)
    np.testing.assert_allclose(mean, h @ w_mu + b_mu, rtol=RTOL)


# ------------------------------------------------------------------------------------------------
# Priors
# ------------------------------------------------------------------------------------------------


def test_mixture_prior_equals_the_hand_mixture(x64):
    prior = MixturePrior(2, 3, rngs=nnx.Rngs(0), param_dtype=F64)
    rng = np.random.default_rng(6)
    logits, locs, log_scales = rng.normal(size=3), rng.normal(size=(3, 2)) * 2, rng.normal(size=(3, 2)) * 0.5
    prior.logits.set_value(jnp.asarray(logits))
    prior.locs.set_value(jnp.asarray(locs))
    prior.log_scales.set_value(jnp.asarray(log_scales))
    log_weights = logits - special.logsumexp(logits)
    zs = rng.normal(size=(4, 5, 2)) * 2
    expected = np.array([[_np_mixture(z, log_weights, locs, np.exp(log_scales)) for z in row] for row in zs])
    ours, distrax_value = _jit(lambda z: (prior.log_prob(z), prior.distribution().log_prob(z)), zs)
    np.testing.assert_allclose(ours, expected, rtol=RTOL)
    np.testing.assert_allclose(distrax_value, expected, rtol=RTOL)
    assert jax.eval_shape(lambda: prior.sample(jax.random.key(0), 7)).shape == (7, 2)


def test_vamp_prior_equals_the_hand_mixture_of_encoder_gaussians(x64):
    rng = np.random.default_rng(7)
    enc, np_encoder = _fixed_encoder(rng, 3, 2)
    prior = VampPrior(enc, 4, rngs=nnx.Rngs(0), param_dtype=F64)
    pseudo_inputs = rng.uniform(size=(4, 3))
    prior.pseudo_inputs.set_value(jnp.asarray(pseudo_inputs))
    components = [np_encoder(u) for u in pseudo_inputs]
    locs, scales = (np.array(c) for c in zip(*components))
    zs = rng.normal(size=(6, 2))
    expected = [_np_mixture(z, np.full(4, -math.log(4)), locs, scales) for z in zs]
    ours, distrax_value = _jit(lambda z: (prior.log_prob(z), prior.distribution().log_prob(z)), zs)
    np.testing.assert_allclose(ours, expected, rtol=RTOL)
    np.testing.assert_allclose(distrax_value, expected, rtol=RTOL)
    assert jax.eval_shape(lambda: prior.sample(jax.random.key(0), 5)).shape == (5, 2)


def test_a_vae_part_without_its_interface_is_a_type_error_naming_it():
    """A distrax prior (as `elbo_analytic_kl` takes) was an AttributeError on `latent_dim`."""
    rngs = nnx.Rngs(0)
    encoder, decoder = GaussianMLPEncoder(4, 2, (3,), rngs=rngs), BernoulliMLPDecoder(2, 4, (3,), rngs=rngs)
    with pytest.raises(TypeError, match=r"`prior` must be a StandardNormalPrior, MixturePrior or VampPrior .*MultivariateNormalDiag, which has no latent_dim"):
        VAE(encoder, decoder, distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2)))
    with pytest.raises(TypeError, match=r"`encoder` must be a GaussianMLPEncoder .*NoneType, which has no data_dim, latent_dim"):
        VAE(None, decoder, StandardNormalPrior(2))
    with pytest.raises(TypeError, match=r"`decoder` must be .*int, which has no __call__"):
        VAE(encoder, 3, StandardNormalPrior(2))


@pytest.mark.parametrize(
    "setting, error, match",
    [
        ({"init_std": float("nan")}, ValueError, r"`init_std` must be finite and >= 0, got nan"),
        ({"init_std": -1.0}, ValueError, r"`init_std` must be finite and >= 0, got -1.0"),
        ({"init_mean": float("inf")}, ValueError, r"`init_mean` must be finite, got inf"),
        ({"init_mean": jnp.array([0.0, jnp.nan, 0.0, 0.0])}, ValueError, r"`init_mean` must be finite, got \["),
        ({"init_mean": "0"}, TypeError, r"`init_mean` must be a real number or array, got '0'"),
        # Stored as (2, 3, 4) pseudo-inputs, or a bare broadcasting error: now named here.
        ({"init_mean": np.zeros((2, 3, 4))}, ValueError, r"`init_mean` must broadcast to the pseudo-inputs' shape \(num_components, data_dim\) = \(3, 4\) .*got shape \(2, 3, 4\)"),
        ({"init_std": np.full(5, 0.1)}, ValueError, r"`init_std` must broadcast .* = \(3, 4\) .*got shape \(5,\)"),
    ],
)
def test_vamp_prior_refuses_pseudo_input_settings_that_are_not_finite(setting, error, match):
    encoder = GaussianMLPEncoder(4, 2, (3,), rngs=nnx.Rngs(0))
    with pytest.raises(error, match=match):  # NaN pseudo-inputs made every log_prob NaN
        VampPrior(encoder, 3, rngs=nnx.Rngs(1), **setting)
    # A 0-d JAX number and one value per pixel are fine.
    assert VampPrior(encoder, 3, rngs=nnx.Rngs(1), init_mean=jnp.full(4, 0.1), init_std=jnp.array(0.02)).pseudo_inputs.shape == (3, 4)


def test_vamp_prior_pseudo_inputs_take_param_dtype():
    """`init_mean` and `init_std` decided their dtype (a per-pixel float64 NumPy mean made a
    float32 prior float64 under x64; bfloat16 was refused as "not a real number")."""
    encoder = GaussianMLPEncoder(4, 2, (3,), rngs=nnx.Rngs(0))
    for init_mean, param_dtype in ((np.full(4, 0.1, np.float32), jnp.bfloat16), (jnp.asarray(0.1, jnp.float16), jnp.float32),
                                   (jnp.full((3, 4), 0.1, jnp.bfloat16), jnp.float32)):
        prior = VampPrior(encoder, 3, rngs=nnx.Rngs(1), init_mean=init_mean, param_dtype=param_dtype)
        assert prior.pseudo_inputs.dtype == param_dtype and prior.pseudo_inputs.shape == (3, 4)


def test_vamp_prior_shares_the_encoder_parameters():
    vae = nnx.clone(_model("vamp"))  # a copy: this test changes it
    enc = vae.encoder
    assert vae.prior.encoder is enc
    graphdef, state = nnx.split(vae)
    paths = {"/".join(map(str, path)) for path, _ in nnx.to_flat_state(state)}
    assert "prior/pseudo_inputs" in paths and not any(p.startswith("prior/encoder") for p in paths)
    log_prior = jax.jit(lambda state, z: nnx.merge(graphdef, state).prior.log_prob(z))
    z = jnp.array([0.1, -0.4])
    before = log_prior(state, z)
    enc.loc_head.bias.set_value(enc.loc_head.bias[...] + 1.0)  # the encoder alone
    assert log_prior(nnx.state(vae), z) != before


# ------------------------------------------------------------------------------------------------
# The hierarchical proposal and the two-layer model
# ------------------------------------------------------------------------------------------------


def _fixed_two_layer(rng):
    """TwoLayerVAE 3 -> (z1: 2) -> (z2: 2) with set parameters, and numpy functions for each layer."""
    model = TwoLayerVAE(3, (2, 2), hidden_q=((3,), (2,)), hidden_p=((2,), (3,)), rngs=nnx.Rngs(0), param_dtype=F64)
    np_q1 = _fixed_encoder(rng, 3, 2, hidden=(3,))
    np_q2 = _fixed_encoder(rng, 2, 2, hidden=(2,))
    np_p1 = _fixed_encoder(rng, 2, 2, hidden=(2,))
    np_px = _fixed_bernoulli_decoder(rng, 2, 3, hidden=(3,))
    model.q_z1, model.q_z2, model.p_z1, model.p_x = np_q1[0], np_q2[0], np_p1[0], np_px[0]
    return model, np_q1[1], np_q2[1], np_p1[1], np_px[1]


def test_hierarchical_proposal_is_the_sum_of_its_layers(x64):
    model, np_q1, np_q2, _, _ = _fixed_two_layer(np.random.default_rng(8))
    graphdef, state = nnx.split(model)
    z1, z2 = np.array([0.4, -0.3]), np.array([1.1, 0.2])

    def sum_of_z2(state, x, key):
        return jnp.sum(nnx.merge(graphdef, state).proposal(x).sample(seed=key)["z2"])

    @jax.jit
    def evaluate(state, x, z, key):
        q = nnx.merge(graphdef, state).proposal(x)
        assert isinstance(q, HierarchicalProposal)
        one = q.sample_and_log_prob(seed=key)
        many = q.sample_and_log_prob(seed=key, sample_shape=(4, 3))
        return q.log_prob(z), one, q.log_prob(one[0]), many, q.log_prob(many[0]), jax.grad(sum_of_z2)(state, x, key)

    log_q, (z_one, log_q_one), log_q_one_again, (z_many, log_q_many), log_q_many_again, grads = evaluate(
        state, X3, {"z1": z1, "z2": z2}, jax.random.key(0)
    )
    np.testing.assert_allclose(log_q, _np_diag_normal(z1, *np_q1(X3)) + _np_diag_normal(z2, *np_q2(z1)), rtol=RTOL)
    assert jax.tree.map(jnp.shape, z_one) == {"z1": (2,), "z2": (2,)} and log_q_one.shape == ()
    assert jax.tree.map(jnp.shape, z_many) == {"z1": (4, 3, 2), "z2": (4, 3, 2)} and log_q_many.shape == (4, 3)
    np.testing.assert_allclose(log_q_one, log_q_one_again, rtol=1e-10)
    np.testing.assert_allclose(log_q_many, log_q_many_again, rtol=1e-10)
    # Each z2 comes from q(z2 | z1) at its own z1 (the joint density by hand at every draw) ...
    z1_many, z2_many = np.reshape(z_many["z1"], (-1, 2)), np.reshape(z_many["z2"], (-1, 2))
    by_hand = [_np_diag_normal(a, *np_q1(X3)) + _np_diag_normal(b, *np_q2(a)) for a, b in zip(z1_many, z2_many)]
    np.testing.assert_allclose(np.ravel(log_q_many), by_hand, rtol=1e-10)
    # ... with its own noise (the standardised z2 differ across the 12 draws) ...
    noise = np.array([(b - np_q2(a)[0]) / np_q2(a)[1] for a, b in zip(z1_many, z2_many)])
    assert len(np.unique(np.round(noise[:, 0], 9))) == 12
    # ... and reparameterised: q(z1 | x)'s parameters reach z2 through the sampled z1.
    grads = nnx.to_pure_dict(grads)
    for part in ("q_z1", "q_z2"):
        assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads[part])) > 0, part


def test_hierarchical_proposal_log_prob_checks_each_layer():
    """A wrong-size z1 was reported as a wrong `x`, a wrong-size z2 as a broadcasting TypeError."""
    model = TwoLayerVAE(6, (3, 2), hidden_q=((4,), (4,)), hidden_p=((4,), (4,)), rngs=nnx.Rngs(0))
    q = model.proposal(jnp.ones(6))
    with pytest.raises(ValueError, match=r"`value\['z1'\]` must have shape sample_shape \+ \(3,\) .*got \(4,\)"):
        q.log_prob({"z1": jnp.zeros(4), "z2": jnp.zeros(2)})
    with pytest.raises(ValueError, match=r"`value\['z2'\]` must have shape sample_shape \+ \(2,\) .*got \(2, 5\)"):
        q.log_prob({"z1": jnp.zeros((2, 3)), "z2": jnp.zeros((2, 5))})
    assert q.log_prob({"z1": jnp.zeros((2, 3)), "z2": jnp.zeros((2, 2))}).shape == (2,)


def test_two_layer_log_joint_matches_numpy(x64):
    model, _, _, np_p1, np_px = _fixed_two_layer(np.random.default_rng(9))
    z1, z2 = np.array([0.4, -0.3]), np.array([1.1, 0.2])
    expected = _np_bernoulli(X3, np_px(z1)) + _np_diag_normal(z1, *np_p1(z2)) + _np_diag_normal(z2, 0.0, 1.0)
    np.testing.assert_allclose(_jit(model.log_joint, X3, {"z1": z1, "z2": z2}), expected, rtol=RTOL)
    samples, means = jax.eval_shape(lambda: model.sample_prior(jax.random.key(0), 5))
    assert jax.tree.map(lambda a: a.shape, samples) == {"z1": (5, 2), "z2": (5, 2)} and means.shape == (5, 3)
    assert jax.eval_shape(lambda: model.reconstruct(jax.random.key(0), X3)).shape == (3,)


def test_two_layer_takes_an_int_seed_and_numpy_sizes():
    model = TwoLayerVAE(DATA_DIM, np.array([3, 2]), hidden_q=((5,), (4,)), hidden_p=((4,), (5,)), rngs=nnx.Rngs(0))
    z, log_q = model.proposal(X6).sample_and_log_prob(seed=7)  # an int seed, as distrax accepts
    again, _ = model.proposal(X6).sample_and_log_prob(seed=jax.random.PRNGKey(7))
    assert z["z1"].shape == (3,) and z["z2"].shape == (2,) and log_q.shape == ()
    np.testing.assert_array_equal(z["z1"], again["z1"])
    with pytest.raises(ValueError, match=r"`latent_dims` must be a tuple or list of two entries"):
        TwoLayerVAE(DATA_DIM, (3, 2, 1), rngs=nnx.Rngs(0))


def test_two_layer_defaults_are_the_iwae_architecture():
    model = nnx.eval_shape(lambda: TwoLayerVAE(rngs=nnx.Rngs(0)))  # shapes only, nothing computed
    widths = lambda m: [(layer.in_features, layer.out_features) for layer in m.trunk.layers]
    assert widths(model.q_z1) == [(784, 200), (200, 200)] and model.q_z1.latent_dim == 100
    assert widths(model.q_z2) == [(100, 100), (100, 100)] and model.q_z2.latent_dim == 50
    assert widths(model.p_z1) == [(50, 100), (100, 100)] and model.p_z1.latent_dim == 100
    assert widths(model.p_x) == [(100, 200), (200, 200)] and model.p_x.data_dim == 784


# ------------------------------------------------------------------------------------------------
# Every pathwise estimator under jit through nnx.split / nnx.merge
# ------------------------------------------------------------------------------------------------

PARTS = {"standard": ("encoder", "decoder"), "vamp": ("encoder", "decoder", "prior"),
         "two_layer": ("q_z1", "q_z2", "p_z1", "p_x")}
# Every pathwise estimator for the plain VAE. Fewer for the others (each case costs seconds of
# compilation): with a VampPrior the encoder's parameters are also the prior's, so the stop-gradient
# surgery of STL and DReG must keep their gradient through log p(z); the two-layer model's latent is a
# dict, which each of reparam, STL and DReG must carry through.
CASES = {
    "standard": [("iwae_bound", g) for g in ("reparam", "stl", "dreg")] + [("elbo", g) for g in ("reparam", "stl")],
    "vamp": [("iwae_bound", "dreg"), ("elbo", "stl")],
    "two_layer": [("iwae_bound", "reparam"), ("iwae_bound", "dreg"), ("elbo", "stl")],
}


@pytest.mark.parametrize("kind", ["standard", "vamp", "two_layer"])
def test_estimators_differentiate_through_split_and_merge(kind):
    """The house training step: split outside, merge inside a plain jax.jit, vmap over the batch."""
    graphdef, state = nnx.split(_model(kind))

    def loss(state, key, x_batch, bound, gradient):
        model = nnx.merge(graphdef, state)
        estimator = getattr(ej, bound)
        one = lambda k, x: estimator(k, x, model.log_joint, model.proposal(x), num_samples=4, gradient=gradient)
        return -jnp.mean(jax.vmap(one)(jax.random.split(key, x_batch.shape[0]), x_batch))

    @jax.jit
    def step(state, key, x_batch):  # every case in one compilation, to keep the test fast
        return {case: jax.value_and_grad(loss)(state, key, x_batch, *case) for case in CASES[kind]}

    results = step(state, jax.random.key(0), jnp.stack([X6, 1.0 - X6]))
    for case, (value, grads) in results.items():
        grads = nnx.to_pure_dict(grads)
        assert np.isfinite(value), case
        assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(grads)), case
        for part in PARTS[kind]:
            assert sum(float(jnp.sum(jnp.abs(leaf))) for leaf in jax.tree.leaves(grads[part])) > 0, (case, part)
    # The value is the objective whatever the gradient estimator.
    for bound in ("iwae_bound", "elbo"):
        values = [float(v) for (b, _), (v, _) in results.items() if b == bound]
        np.testing.assert_allclose(values, values[0], rtol=1e-6)
    # A new key and new data reuse the compiled step.
    step(state, jax.random.key(1), jnp.stack([X6, X6]))
    assert step._cache_size() == 1


# ------------------------------------------------------------------------------------------------
# VAE.elbo: analytic or Monte Carlo KL
# ------------------------------------------------------------------------------------------------


def test_elbo_auto_uses_the_analytic_kl_for_the_standard_normal_prior(x64):
    rng = np.random.default_rng(10)
    enc, np_encoder = _fixed_encoder(rng, 3, 2)
    vae = VAE(enc, _fixed_bernoulli_decoder(rng, 2, 3)[0], StandardNormalPrior(2))
    assert vae.has_analytic_kl and vae.kl_mode() == "analytic"

    @jax.jit
    def evaluate(key, x):
        q, prior = vae.proposal(x), vae.prior.distribution()
        return {
            "auto": vae.elbo(key, x, num_samples=5),
            "analytic": vae.elbo(key, x, num_samples=5, kl="analytic"),
            "elbo_analytic_kl": ej.elbo_analytic_kl(key, x, vae.log_likelihood, q, prior, num_samples=5),
            "kl": closed_form_kl(q, prior),
            "monte_carlo": vae.elbo(key, x, num_samples=5, kl="monte_carlo"),
            "auto_stl": vae.elbo(key, x, num_samples=5, gradient="stl"),
            "elbo": ej.elbo(key, x, vae.log_joint, q, num_samples=5),
        }

    values = evaluate(jax.random.key(3), X3)
    np.testing.assert_allclose(values["auto"], values["elbo_analytic_kl"], rtol=RTOL)
    np.testing.assert_allclose(values["analytic"], values["elbo_analytic_kl"], rtol=RTOL)
    # ... whose KL is the textbook KL(N(mu, sigma^2) || N(0, I)).
    loc, scale = np_encoder(X3)
    np.testing.assert_allclose(values["kl"], 0.5 * np.sum(scale**2 + loc**2 - 1.0 - 2.0 * np.log(scale)), rtol=RTOL)
    # kl="monte_carlo", and "auto" with STL (which elbo_analytic_kl does not offer), are elbojax.elbo.
    assert vae.kl_mode(gradient="stl") == "monte_carlo"
    np.testing.assert_allclose(values["monte_carlo"], values["elbo"], rtol=RTOL)
    np.testing.assert_allclose(values["auto_stl"], values["elbo"], rtol=RTOL)
    assert abs(values["monte_carlo"] - values["analytic"]) > 1e-6  # the two paths really differ


def test_elbo_auto_uses_monte_carlo_for_the_vamp_prior():
    vae = _model("vamp")
    assert not vae.has_analytic_kl and vae.kl_mode() == "monte_carlo"
    ours, expected = _jit(
        lambda key, x: (vae.elbo(key, x, num_samples=3),
                        ej.elbo(key, x, vae.log_joint, vae.proposal(x), num_samples=3)),
        jax.random.key(4), X6,
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"kl='analytic' needs a closed-form KL\(q \|\| prior\), and VAE has none"):
        _jit(lambda key, x: vae.elbo(key, x, kl="analytic"), jax.random.key(4), X6)
    with pytest.raises(ValueError, match=r"No closed-form KL\(q \|\| prior\) for q = MultivariateNormalDiag and "
                                         r"prior = MixtureSameFamily"):  # the estimator itself says why
        _jit(lambda key, x: ej.elbo_analytic_kl(key, x, vae.log_likelihood, vae.proposal(x), vae.prior.distribution()), jax.random.key(4), X6)


def test_elbo_rejects_bad_kl_choices():
    vae, two_layer = _model("standard"), _model("two_layer")
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"`kl` must be one of 'auto', 'analytic', 'monte_carlo'; got 'exact'"):
        vae.elbo(key, X6, kl="exact")
    with pytest.raises(ValueError, match=r"kl='analytic' .* only the reparameterisation gradient; got gradient='stl'"):
        vae.elbo(key, X6, kl="analytic", gradient="stl")
    with pytest.raises(ValueError, match=r"and TwoLayerVAE has none for its proposal and prior \(both are hierarchical"):
        two_layer.elbo(key, X6, kl="analytic")
    assert not two_layer.has_analytic_kl and two_layer.kl_mode() == "monte_carlo"
    ours, expected = _jit(
        lambda key, x: (two_layer.elbo(key, x, num_samples=2),
                        ej.elbo(key, x, two_layer.log_joint, two_layer.proposal(x), num_samples=2)),
        key, X6,
    )
    np.testing.assert_allclose(ours, expected, rtol=1e-6)


# ------------------------------------------------------------------------------------------------
# Sampling and clear errors
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["standard", "vamp"])
def test_sample_prior_and_reconstruct_shapes(kind):
    vae = _model(kind)
    (z, means), reconstruction = _jit(
        lambda key, x: (vae.sample_prior(key, 4), vae.reconstruct(key, x)), jax.random.key(0), X6
    )
    assert z.shape == (4, 2) and means.shape == (4, DATA_DIM) and reconstruction.shape == (DATA_DIM,)
    assert np.all((means > 0) & (means < 1)) and np.all((reconstruction > 0) & (reconstruction < 1))
    assert len(np.unique(np.asarray(z)[:, 0])) == 4


def test_wrong_shapes_raise_at_trace_time():
    vae, two_layer = _model("standard"), _model("two_layer")
    batch = jnp.zeros((2, DATA_DIM))
    with pytest.raises(ValueError, match=r"`x` must have shape \(6,\) \(ONE data point; batch with jax.vmap\), got"):
        jax.jit(vae.proposal)(batch)
    with pytest.raises(ValueError, match=r"`x` must have shape \(6,\) \(ONE data point"):
        jax.jit(vae.log_joint)(batch, jnp.zeros(2))
    with pytest.raises(ValueError, match=r"`z` must have shape \(2,\) \(ONE latent sample"):
        jax.jit(vae.log_joint)(X6, jnp.zeros(3))
    with pytest.raises(ValueError, match=r"`z` must have shape \(2,\) \(ONE latent sample"):
        jax.jit(vae.log_prior)(jnp.zeros((4, 2)))
    with pytest.raises(ValueError, match=r"`z` must be a dict \{'z1': \(3,\), 'z2': \(2,\)\}"):
        jax.eval_shape(two_layer.log_joint, X6, jnp.zeros(5))
    with pytest.raises(ValueError, match=r"`z\['z2'\]` must have shape \(2,\)"):
        jax.eval_shape(two_layer.log_joint, X6, {"z1": jnp.zeros(3), "z2": jnp.zeros(3)})
    with pytest.raises(ValueError, match=r"`value` must be a dict with keys 'z1' and 'z2'"):
        jax.eval_shape(lambda x, z: two_layer.proposal(x).log_prob(z), X6, jnp.zeros(5))


def test_constructors_check_their_arguments():
    r = nnx.Rngs(0)
    enc = GaussianMLPEncoder(6, 2, (5,), rngs=r)
    with pytest.raises(ValueError, match=r"The latent sizes must agree"):
        VAE(enc, BernoulliMLPDecoder(3, 6, (5,), rngs=r), StandardNormalPrior(2))
    with pytest.raises(ValueError, match=r"The data sizes must agree"):
        VAE(enc, BernoulliMLPDecoder(2, 7, (5,), rngs=r), StandardNormalPrior(2))
    with pytest.raises(ValueError, match=r"likelihood='gaussian' contradicts the decoder"):
        VAE(enc, BernoulliMLPDecoder(2, 6, (5,), rngs=r), StandardNormalPrior(2), likelihood="gaussian")
    with pytest.raises(ValueError, match=r"`scale_transform` must be one of 'exp', 'softplus'; got 'relu'"):
        GaussianMLPEncoder(6, 2, scale_transform="relu", rngs=r)
    with pytest.raises(TypeError, match=r"`hidden` must be a sequence of layer widths"):
        GaussianMLPEncoder(6, 2, 200, rngs=r)
    with pytest.raises(ValueError, match=r"`hidden\[1\]` must be an int >= 1, got 0"):
        BernoulliMLPDecoder(2, 6, (5, 0), rngs=r)
    with pytest.raises(ValueError, match=r"`fixed_scale` must be a finite number > 0, got 0.0"):
        GaussianMLPDecoder(2, 6, rngs=r, fixed_scale=0.0)
    with pytest.raises(ValueError, match=r"`fixed_scale` must be a finite number > 0, got inf"):  # log p was -inf
        GaussianMLPDecoder(2, 6, rngs=r, fixed_scale=float("inf"))
    with pytest.raises(TypeError, match=r"`fixed_scale` must be a real number > 0, got True"):  # was sigma = 1
        GaussianMLPDecoder(2, 6, rngs=r, fixed_scale=True)
    assert GaussianMLPDecoder(2, 6, rngs=r, fixed_scale=np.float32(0.5)).fixed_log_scale == np.log(0.5)  # was refused
