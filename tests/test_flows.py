"""Flow proposals: the change of variables by hand, the identity at initialisation, a non-Gaussian target, a VAE encoder."""

import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import elbojax as ej
from elbojax import flows, local, models, train

LOG_2PI = math.log(2 * math.pi)


def _perturb(module, key, scale=0.5):
    """Give every parameter (the zero last layers too) random values, so the flow is not the identity."""
    graphdef, state = nnx.split(module)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(key, len(leaves))
    leaves = [leaf + scale * jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


def test_one_coupling_layer_matches_the_change_of_variables_by_hand(x64):
    r"""d = 2, mask (keep z1): y1 = x1, y2 = x2 e^{s(x1)} + t(x1), so log q(y) = log q0(x) - s(y1)."""
    flow = _perturb(flows.CouplingFlow(2, 1, (8,), rngs=nnx.Rngs(0), param_dtype=jnp.float64), jax.random.key(1))
    base = distrax.MultivariateNormalDiag(jnp.array([0.3, -0.7]), jnp.array([0.8, 1.5]))
    ys = jax.random.normal(jax.random.key(2), (5, 2), jnp.float64) * 2.0

    @jax.jit
    def by_hand_and_by_flow(ys):
        def by_hand(y):
            shift, log_scale = flow.conditioner_outputs(0, jnp.array([y[0], 0.0]))
            x = jnp.array([y[0], (y[1] - shift[1]) * jnp.exp(-log_scale[1])])
            return base.log_prob(x) - log_scale[1], shift, log_scale

        hand, shifts, log_scales = jax.vmap(by_hand)(ys)
        return hand, jax.vmap(flow(base).log_prob)(ys), shifts, log_scales

    hand, by_flow, shifts, log_scales = by_hand_and_by_flow(ys)
    assert np.all(np.abs(log_scales[:, 1]) > 1e-2) and np.all(np.abs(shifts[:, 1]) > 1e-2)  # not the identity
    np.testing.assert_allclose(by_flow, hand, rtol=0, atol=1e-12)


def test_deep_conditioned_flow_matches_the_autodiff_jacobian_and_its_own_samples(x64):
    r"""log q(y) = log q0(f^{-1}(y)) + log |det d f^{-1}/dy|, the determinant from `jax.jacfwd` (d = 4, 2 layers, a context)."""
    flow = _perturb(
        flows.CouplingFlow(4, 2, (16,), context_dim=5, rngs=nnx.Rngs(0), param_dtype=jnp.float64), jax.random.key(1), 0.3
    )
    base = distrax.MultivariateNormalDiag(jnp.linspace(-1.0, 1.0, 4), jnp.linspace(0.5, 1.5, 4))
    context = jnp.linspace(-2.0, 2.0, 5)

    @jax.jit
    def check(key):
        q = flow(base, context)
        bijector = flow.bijector(context)
        samples, log_q = jax.vmap(lambda k: q.sample_and_log_prob(seed=k))(jax.random.split(key, 6))

        def by_jacobian(y):
            x = bijector.inverse(y)
            return base.log_prob(x) + jnp.linalg.slogdet(jax.jacfwd(bijector.inverse)(y))[1]

        return log_q, jax.vmap(q.log_prob)(samples), jax.vmap(by_jacobian)(samples), jax.vmap(base.log_prob)(samples)

    log_q, log_prob, by_jacobian, base_log_prob = check(jax.random.key(3))
    np.testing.assert_allclose(log_prob, by_jacobian, rtol=0, atol=1e-10)
    np.testing.assert_allclose(log_q, by_jacobian, rtol=0, atol=1e-10)  # sample_and_log_prob agrees with log_prob
    assert np.all(np.abs(log_prob - base_log_prob) > 1e-3)  # a genuine transformation


def test_at_initialisation_the_flow_is_its_base_gaussian():
    """Zero last layers: every coupling layer is the identity, so samples and densities are the base's."""
    flow_encoder = nnx.jit(
        lambda: flows.FlowEncoder(models.GaussianMLPEncoder(6, 4, (8,), rngs=nnx.Rngs(0)), num_layers=3, hidden=(8,), rngs=nnx.Rngs(1))
    )()
    encoder = flow_encoder.base
    x = jnp.linspace(0.0, 1.0, 6)

    @jax.jit
    def compare(key):
        q, q0 = flow_encoder(x), encoder(x)
        z, log_q = q.sample_and_log_prob(seed=key)
        z0, log_q0 = q0.sample_and_log_prob(seed=key)
        points = jax.random.normal(jax.random.fold_in(key, 1), (5, 4))
        return z, z0, log_q, log_q0, jax.vmap(q.log_prob)(points), jax.vmap(q0.log_prob)(points)

    z, z0, log_q, log_q0, log_prob, base_log_prob = compare(jax.random.key(2))
    np.testing.assert_allclose(z, z0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(log_q, log_q0, rtol=1e-6)
    np.testing.assert_allclose(log_prob, base_log_prob, rtol=1e-6)
    family = flows.local_flow_family(4, num_layers=2)
    np.testing.assert_allclose(
        jax.jit(lambda p: family.make_proposal(family.init_from(encoder(x))).log_prob(p))(z0), log_q0, rtol=1e-6
    )


class Banana:
    r"""$z_1 \sim \mathcal N(0, 1)$, $z_2 \mid z_1 \sim \mathcal N(b(z_1^2 - 1), s^2)$: normalised, so log p(x) = 0 ($x$ is ignored).

    `elbo_diag_gaussian` is the exact ELBO of $q = \mathcal N(m, \mathrm{diag}\, v)$, from the
    Gaussian moments $E z_1^2 = m_1^2 + v_1$ and $E z_1^4 = m_1^4 + 6 m_1^2 v_1 + 3 v_1^2$.
    """

    bend, noise = 1.0, 0.5

    def log_joint(self, x, z):
        mean2 = self.bend * (z[0] ** 2 - 1.0)
        return -0.5 * (LOG_2PI + z[0] ** 2) - 0.5 * (LOG_2PI + 2 * math.log(self.noise) + (z[1] - mean2) ** 2 / self.noise**2)

    def elbo_diag_gaussian(self, x, mean, scale):
        (m1, m2), (v1, v2) = mean, scale**2
        b, s = self.bend, self.noise
        second, fourth = m1**2 + v1, m1**4 + 6 * m1**2 * v1 + 3 * v1**2
        expected_square = v2 + (m2 + b) ** 2 - 2 * (m2 + b) * b * second + b**2 * fourth
        expected_log_joint = -0.5 * (LOG_2PI + second) - 0.5 * (LOG_2PI + 2 * math.log(s)) - expected_square / (2 * s**2)
        return expected_log_joint + jnp.sum(0.5 * (LOG_2PI + 1.0) + jnp.log(scale))


def test_a_local_flow_beats_the_best_diagonal_gaussian_on_a_banana():
    """The best diagonal Gaussian is found exactly (closed-form ELBO); the flow's ELBO beats it by many standard errors."""
    target, x = Banana(), jnp.zeros(())
    family = flows.local_flow_family(2, num_layers=4)
    start = local.DiagonalGaussian(jnp.zeros(2), jnp.zeros(2))
    flow_objective = local.objective("elbo", make_proposal=family.make_proposal, num_samples=8, gradient="stl")

    @jax.jit
    def fit():
        gaussian = local.optimize_local(
            jax.random.key(0), target, x, start, objective=local.closed_form_objective(),
            optimizer=optax.adam(optax.cosine_decay_schedule(5e-2, 1500)), num_steps=1500,
        ).phi
        best = target.elbo_diag_gaussian(x, gaussian.loc, jnp.exp(gaussian.log_scale))
        gaussian_q = local.diagonal_gaussian(gaussian)
        flow = local.optimize_local(
            jax.random.key(1), target, x, family.init_from(gaussian_q), objective=flow_objective,
            optimizer=optax.adam(optax.cosine_decay_schedule(1e-2, 600)), num_steps=600,
        )
        weights = ej.log_weights(jax.random.key(2), x, target.log_joint, family.make_proposal(flow.phi), num_samples=20_000)
        check = ej.log_weights(jax.random.key(3), x, target.log_joint, gaussian_q, num_samples=20_000)
        return best, weights, check, flow.objective

    best, weights, check, trace = fit()
    # The closed form is right: a Monte Carlo ELBO of the same Gaussian agrees within 4 SE.
    assert abs(check.mean() - best) < 4 * check.std() / np.sqrt(check.size)
    flow_elbo, flow_se = weights.mean(), weights.std() / np.sqrt(weights.size)
    assert best < -0.3  # the mean-field family is far from the banana (log p(x) = 0) ...
    assert flow_elbo - best > 10 * flow_se, (flow_elbo, best, flow_se)  # ... and the flow gets closer
    assert flow_elbo < 0.0 + 4 * flow_se  # and it is still a lower bound on log p(x) = 0
    assert trace.shape == (600,)


def test_flow_encoder_trains_inside_a_vae():
    """`FlowEncoder` replaces the Gaussian encoder: no closed-form KL, the Monte Carlo ELBO, a training step that moves the flow."""
    @nnx.jit  # built in one compiled call: eagerly, each initialiser compiles on its own
    def make_vae():
        base = models.GaussianMLPEncoder(12, 4, (16,), rngs=nnx.Rngs(0))
        encoder = flows.FlowEncoder(base, num_layers=2, hidden=(8,), rngs=nnx.Rngs(1))
        return models.VAE(encoder, models.BernoulliMLPDecoder(4, 12, (16,), rngs=nnx.Rngs(2)), models.StandardNormalPrior(4))

    vae = make_vae()
    assert (vae.data_dim, vae.latent_dim) == (12, 4)
    assert not vae.has_analytic_kl and vae.kl_mode() == "monte_carlo"
    batch = (jax.random.uniform(jax.random.key(0), (8, 12)) > 0.5).astype(jnp.float32)
    optimizer = optax.adam(1e-2)
    graphdef, state = train.init(vae, optimizer)
    step = jax.jit(train.make_step(graphdef, optimizer, train.objective("elbo", num_samples=2), seed=0))
    new_state, info = step(state, batch, jnp.arange(8))
    assert bool(info.finite) and np.isfinite(float(info.objective)) and np.isfinite(float(info.kl))
    old_out = state.params["encoder"]["flow"]["conditioners"][0]["out"]["kernel"][...]
    new_out = new_state.params["encoder"]["flow"]["conditioners"][0]["out"]["kernel"][...]
    assert np.all(old_out == 0) and np.any(new_out != 0)  # the zero last layer gets a gradient


def test_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="latent_dim` >= 2"):
        flows.CouplingFlow(1, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="num_layers"):
        flows.CouplingFlow(2, 0, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="hidden layer"):
        flows.CouplingFlow(2, 2, (), context_dim=3, rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match=r"`max_log_scale` must be a finite number > 0, got inf"):  # samples were NaN
        flows.CouplingFlow(2, 2, (4,), max_log_scale=float("inf"), rngs=nnx.Rngs(0))
    flows.CouplingFlow(2, 2, (4,), max_log_scale=np.float32(3.0), rngs=nnx.Rngs(0))  # was refused
    with pytest.raises(ValueError, match=r"`context_dim` must be an int >= 0 \(0: no context\), got -1"):  # was an MLIRError
        flows.CouplingFlow(2, 2, (4,), context_dim=-1, rngs=nnx.Rngs(0))
    with pytest.raises(TypeError, match=r"`context_dim` must be an int >= 0 \(0: no context\), got 2.5"):  # was silently 2
        flows.CouplingFlow(2, 2, (4,), context_dim=2.5, rngs=nnx.Rngs(0))
    flow = flows.CouplingFlow(2, 2, (4,), context_dim=3, rngs=nnx.Rngs(0))
    base = distrax.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2))
    with pytest.raises(ValueError, match="pass `context`"):
        flow(base)
    with pytest.raises(ValueError, match=r"`context` must have shape \(3,\)"):
        flow(base, jnp.zeros(4))
    with pytest.raises(ValueError, match=r"event shape \(2,\)"):
        flow(distrax.MultivariateNormalDiag(jnp.zeros(3), jnp.ones(3)), jnp.zeros(3))
    with pytest.raises(ValueError, match="no context"):
        flows.CouplingFlow(2, 2, (4,), rngs=nnx.Rngs(0)).bijector(jnp.zeros(3))
    with pytest.raises(TypeError, match="data_dim"):
        flows.FlowEncoder(object(), rngs=nnx.Rngs(0))
    family = flows.local_flow_family(2, num_layers=2, hidden=(4,))
    with pytest.raises(TypeError, match="FlowParams"):
        family.make_proposal(local.DiagonalGaussian(jnp.zeros(2), jnp.zeros(2)))
    phi = family.init_from(base)
    with pytest.raises(ValueError, match=r"shape \(2,\) for ONE data point"):
        family.make_proposal(phi._replace(base=local.DiagonalGaussian(jnp.zeros(3), jnp.zeros(3))))
    other = flows.local_flow_family(2, num_layers=3, hidden=(4,))
    with pytest.raises(ValueError, match="structure"):
        family.make_proposal(other.init_from(base))
    with pytest.raises(TypeError, match="scale_diag"):
        family.init_from(distrax.Normal(0.0, 1.0))
