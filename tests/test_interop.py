"""The NumPyro and TFP adapters, against NumPyro's own densities and bounds and exact answers (float64)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.infer import RenyiELBO
from numpyro.infer.util import log_density
from scipy import stats
from tensorflow_probability.substrates import jax as tfp

import elbojax as ej
from elbojax.interop import from_numpyro, from_tfp_joint
from helpers import SE_LIMIT, assert_within_se, keys, mean_and_standard_error

tfd = tfp.distributions

# ----------------------------------------------------------------------------------------------
# A linear-Gaussian NumPyro model with two latent sites: mu ~ N(0, 2^2), b ~ N(0, I_2),
# y_i ~ N(mu + b[group_i], 1). Its log p(y) and posterior are known in closed form, and the
# structured guide q(mu) q(b | mu) contains the exact posterior (given mu, the groups' b are
# independent a posteriori).
# ----------------------------------------------------------------------------------------------

GROUP = np.array([0, 0, 0, 1, 1, 1])
Y = np.array([0.3, 1.1, 0.7, -0.8, -1.6, -0.2])
DESIGN = np.column_stack([np.ones(6), np.eye(2)[GROUP]])  # y = DESIGN @ (mu, b0, b1) + noise
PRIOR_COV = np.diag([4.0, 1.0, 1.0])


def model(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([2]).to_event(1))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("y", dist.Normal(mu + b[GROUP], 1.0), obs=y)


def guide(y):
    mu_loc = numpyro.param("mu_loc", jnp.zeros(()))
    mu_scale = numpyro.param("mu_scale", jnp.ones(()), constraint=constraints.positive)
    mu = numpyro.sample("mu", dist.Normal(mu_loc, mu_scale))
    b_loc = numpyro.param("b_loc", jnp.zeros(2))
    b_slope = numpyro.param("b_slope", jnp.zeros(2))
    b_scale = numpyro.param("b_scale", jnp.ones(2), constraint=constraints.positive)
    numpyro.sample("b", dist.Normal(b_loc + b_slope * mu, b_scale).to_event(1))


def exact_log_marginal(y):
    return stats.multivariate_normal(np.zeros(len(y)), DESIGN @ PRIOR_COV @ DESIGN.T + np.eye(len(y))).logpdf(y)


def exact_posterior_params(y):
    """The guide's parameters at which q(mu) q(b | mu) is the exact posterior."""
    cov = np.linalg.inv(np.linalg.inv(PRIOR_COV) + DESIGN.T @ DESIGN)
    mean = cov @ DESIGN.T @ y
    slope = cov[1:, 0] / cov[0, 0]
    conditional_cov = cov[1:, 1:] - np.outer(cov[1:, 0], cov[0, 1:]) / cov[0, 0]
    assert np.allclose(conditional_cov, np.diag(np.diag(conditional_cov)))
    return {
        "mu_loc": jnp.asarray(mean[0]),
        "mu_scale": jnp.asarray(np.sqrt(cov[0, 0])),
        "b_loc": jnp.asarray(mean[1:] - slope * mean[0]),
        "b_slope": jnp.asarray(slope),
        "b_scale": jnp.asarray(np.sqrt(np.diag(conditional_cov))),
    }


def off_posterior_params(y):
    params = exact_posterior_params(y)
    return {
        "mu_loc": params["mu_loc"] + 0.4,
        "mu_scale": params["mu_scale"] * 1.3,
        "b_loc": params["b_loc"] - jnp.array([0.3, -0.2]),
        "b_slope": params["b_slope"] * 0.5,
        "b_scale": params["b_scale"] * jnp.array([0.8, 1.2]),
    }


@pytest.fixture
def adapted(x64):
    y = jnp.asarray(Y)
    return from_numpyro(model, guide, y), y


def test_numpyro_adapter_finds_the_sites(adapted):
    adapter, _ = adapted
    assert adapter.latent_sites == ("mu", "b")
    assert adapter.observed_sites == ("y",)
    assert adapter.param_sites == ("mu_loc", "mu_scale", "b_loc", "b_slope", "b_scale")
    params = jax.jit(adapter.init_params)(jax.random.key(0))
    assert set(params) == set(adapter.param_sites)
    np.testing.assert_array_equal(params["b_scale"], np.ones(2))
    # constrain / unconstrain are inverse maps, as SVI's.
    back = jax.jit(lambda p: adapter.constrain(adapter.unconstrain(p)))(off_posterior_params(Y))
    for name, value in off_posterior_params(Y).items():
        np.testing.assert_allclose(back[name], value, rtol=1e-12, atol=1e-14)


def test_numpyro_log_joint_equals_log_density_and_the_closed_form(adapted):
    adapter, y = adapted

    @jax.jit
    def values(z, other):
        return (
            adapter.log_joint(None, z),
            log_density(model, (y,), {}, z)[0],
            # x replaces the bound observations, so one adapter serves a vmap over data sets.
            adapter.log_joint({"y": other}, z),
            log_density(model, (other,), {}, z)[0],
            # Construction only traces, so it works inside jit and vmap (an amortised guide's way).
            jax.vmap(lambda data: from_numpyro(model, guide, data).log_joint(None, z))(jnp.stack([y, other])),
        )

    z = {"mu": jnp.asarray(0.4), "b": jnp.array([0.5, -0.9])}
    ours, theirs, ours_other, theirs_other, per_data_set = values(z, jnp.asarray(Y[::-1]))
    np.testing.assert_allclose(ours, theirs, rtol=1e-13)
    np.testing.assert_allclose(ours_other, theirs_other, rtol=1e-13)
    np.testing.assert_allclose(per_data_set, [ours, ours_other], rtol=1e-13)
    by_hand = (
        stats.norm(0, 2).logpdf(0.4)
        + stats.norm(0, 1).logpdf([0.5, -0.9]).sum()
        + stats.norm(0.4 + np.array([0.5, -0.9])[GROUP], 1).logpdf(Y).sum()
    )
    np.testing.assert_allclose(ours, by_hand, rtol=1e-13)


def test_numpyro_proposal_is_the_guide(adapted):
    adapter, y = adapted

    @jax.jit
    def draws(params, key):
        q = adapter.proposal(params)
        z, log_q = q.sample_and_log_prob(seed=key)
        zs, log_qs = q.sample_and_log_prob(seed=key, sample_shape=(3, 2))
        return z, log_q, log_density(guide, (y,), {}, {**params, **z})[0], q.log_prob(z), zs, log_qs, q.log_prob(zs)

    z, log_q, guide_density, log_prob, zs, log_qs, log_probs = draws(off_posterior_params(Y), jax.random.key(0))
    assert adapter.proposal(off_posterior_params(Y)).reparameterization_type == "FULLY_REPARAMETERIZED"
    assert z["mu"].shape == () and z["b"].shape == (2,)
    np.testing.assert_allclose(log_q, guide_density, rtol=1e-12)
    np.testing.assert_allclose(log_prob, log_q, rtol=1e-12)
    assert zs["mu"].shape == (3, 2) and zs["b"].shape == (3, 2, 2) and log_qs.shape == (3, 2)
    np.testing.assert_allclose(log_probs, log_qs, rtol=1e-12)



def test_numpyro_proposal_takes_an_int_seed_as_distrax_does(adapted):
    """With a sample shape, an int seed reached `jax.random.split` raw (a TypeError)."""
    adapter, _ = adapted
    q = adapter.proposal(off_posterior_params(Y))
    for sample_shape, shape in (((), ()), (3, (3,)), (np.int64(3), (3,)), ((3, 2), (3, 2))):
        z, log_q = q.sample_and_log_prob(seed=0, sample_shape=sample_shape)
        z_key, log_q_key = q.sample_and_log_prob(seed=jax.random.PRNGKey(0), sample_shape=sample_shape)
        assert log_q.shape == shape
        np.testing.assert_array_equal(log_q, log_q_key)
        np.testing.assert_array_equal(z["b"], z_key["b"])


NUM_SAMPLES = 4


def _against_renyi_elbo(adapter, y):
    """Per key: elbojax's IWAE bound, NumPyro's on the same draws, and NumPyro's RenyiELBO(0, K).

    elbojax draws sample k with `fold_in(key, k)`; NumPyro's log-weight of that draw is its
    one-particle RenyiELBO with the guide's sites set to it. `RenyiELBO(alpha=0, K)` itself
    draws its own particles (from a key independent of elbojax's).
    """
    one_particle, renyi = RenyiELBO(alpha=0, num_particles=1), RenyiELBO(alpha=0, num_particles=NUM_SAMPLES)

    def per_key(params, key):
        q = adapter.proposal(params)
        draws, _ = jax.vmap(lambda k: q.sample_and_log_prob(seed=jax.random.fold_in(key, k)))(jnp.arange(NUM_SAMPLES))
        log_weights = jax.vmap(
            lambda z: -one_particle.loss(jax.random.key(0), params, model, handlers.substitute(guide, data=z), y)
        )(draws)
        return dict(
            iwae=ej.iwae_bound(key, None, adapter.log_joint, q, num_samples=NUM_SAMPLES),
            numpyro_same_draws=ej.logmeanexp(log_weights),
            renyi=-renyi.loss(jax.random.split(key)[1], params, model, guide, y),
        )

    return jax.jit(lambda params, keys: jax.lax.map(lambda key: per_key(params, key), keys))


def test_numpyro_iwae_equals_renyi_elbo(adapted):
    """IWAE = NumPyro's alpha = 0 Renyi bound: on the same draws exactly, and in expectation.

    At the exact posterior every log-weight is log p(y), so every estimate, NumPyro's
    RenyiELBO(0, K) included, equals it on every draw.
    """
    adapter, y = adapted
    compare = _against_renyi_elbo(adapter, y)
    at_posterior = compare(exact_posterior_params(Y), keys(3, 2000))
    for name, values in at_posterior.items():
        np.testing.assert_allclose(values, exact_log_marginal(Y), rtol=1e-12, err_msg=name)

    off = compare(off_posterior_params(Y), keys(4, 2000))
    np.testing.assert_allclose(off["iwae"], off["numpyro_same_draws"], rtol=1e-12)
    (ours, ours_se), (theirs, theirs_se) = mean_and_standard_error(off["iwae"]), mean_and_standard_error(off["renyi"])
    assert abs(ours - theirs) < SE_LIMIT * math.hypot(ours_se, theirs_se), (ours, theirs, ours_se, theirs_se)
    assert ours - exact_log_marginal(Y) < -SE_LIMIT * ours_se  # a bound, a loose one off the posterior


def test_numpyro_gradients_flow_to_the_guide_parameters(adapted):
    """Reparam and DReG agree in mean (paired, on the same draws); at the exact posterior DReG vanishes."""
    adapter, _ = adapted

    @jax.jit
    def gradients(params, draw_keys):
        def one(key):
            out = {}
            for gradient in ("reparam", "dreg"):
                objective = lambda p: ej.iwae_bound(
                    key, None, adapter.log_joint, adapter.proposal(p), num_samples=NUM_SAMPLES, gradient=gradient
                )
                grads = jax.grad(objective)(params)
                out[gradient] = jnp.concatenate([jnp.ravel(grads[name]) for name in adapter.param_sites])
            return out

        return jax.lax.map(one, draw_keys)

    off = gradients(off_posterior_params(Y), keys(11, 500))
    assert np.all(np.isfinite(off["reparam"]))
    assert np.all(np.abs(off["reparam"]).max(0) > 1e-3)
    assert_within_se(off["dreg"] - off["reparam"], 0.0, "dreg - reparam")
    at_posterior = gradients(exact_posterior_params(Y), keys(12, 500))
    np.testing.assert_allclose(at_posterior["dreg"], 0.0, atol=1e-11)
    assert np.abs(at_posterior["reparam"]).max() > 1e-3  # the plain estimator does not vanish


def test_numpyro_model_parameters_go_through_log_joint_with(x64):
    def shifted_model(y):
        shift = numpyro.param("shift", jnp.asarray(0.5))
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu + shift, 1.0), obs=y)

    def simple_guide(y):
        loc = numpyro.param("loc", jnp.zeros(()))
        numpyro.sample("mu", dist.Normal(loc, 0.5))

    y = jnp.asarray(Y)
    adapter = from_numpyro(shifted_model, simple_guide, y)
    assert adapter.param_sites == ("loc", "shift")
    with pytest.raises(ValueError, match=r"param sites \(its own, or shared with the guide: 'shift'\).*log_joint_with"):
        adapter.log_joint(None, {"mu": jnp.asarray(0.1)})

    @jax.jit
    def check(params, z):
        objective = lambda p: ej.iwae_bound(
            jax.random.key(1), None, adapter.log_joint_with(p), adapter.proposal(p), num_samples=3
        )
        ours = adapter.log_joint_with(params)(None, z)
        return ours, log_density(shifted_model, (y,), {}, {**params, **z})[0], jax.grad(objective)(params)

    ours, theirs, grads = check({"loc": jnp.asarray(0.2), "shift": jnp.asarray(0.5)}, {"mu": jnp.asarray(0.1)})
    np.testing.assert_allclose(ours, theirs, rtol=1e-13)
    assert grads["shift"] != 0 and grads["loc"] != 0


def test_numpyro_discrete_guide_needs_a_score_gradient(x64):
    def coin_model(y):
        z = numpyro.sample("z", dist.Bernoulli(0.3))
        numpyro.sample("y", dist.Normal(2.0 * z - 1.0, 1.0), obs=y)

    def coin_guide(y):
        probs = numpyro.param("probs", jnp.asarray(0.5), constraint=constraints.unit_interval)
        numpyro.sample("z", dist.Bernoulli(probs))

    adapter = from_numpyro(coin_model, coin_guide, jnp.asarray(0.4))
    joint = np.array([0.7 * stats.norm(-1, 1).pdf(0.4), 0.3 * stats.norm(1, 1).pdf(0.4)])
    posterior = {"probs": jnp.asarray(joint[1] / joint.sum())}
    assert adapter.proposal(posterior).reparameterization_type == "NOT_REPARAMETERIZED"
    objective = lambda p, gradient: ej.iwae_bound(
        jax.random.key(0), None, adapter.log_joint, adapter.proposal(p), num_samples=5, gradient=gradient
    )
    # Under jit the errors come at trace time (elbojax's own guards), before anything runs.
    with pytest.raises(ValueError, match="gradient='dreg' needs a reparameterizable proposal"):
        jax.jit(objective, static_argnums=1)(posterior, "dreg")
    with pytest.raises(ValueError, match="needs a reparameterizable proposal"):
        jax.jit(jax.grad(objective), static_argnums=1)(posterior, "reparam")
    vimco = jax.jit(jax.value_and_grad(lambda p: objective(p, "vimco")))
    value, grad = vimco(posterior)
    np.testing.assert_allclose(value, np.log(joint.sum()), rtol=1e-12)  # q = the posterior: exact
    assert np.isfinite(grad["probs"]) and abs(vimco({"probs": jnp.asarray(0.5, jnp.float64)})[1]["probs"]) > 0


def _with_extra_site(fn, name, distribution):
    def wrapped(y):
        fn(y)
        numpyro.sample(name, distribution)

    return wrapped


def test_numpyro_mismatched_model_and_guide_raise(x64):
    y = jnp.asarray(Y)
    with pytest.raises(ValueError, match="Guide site 'c' is not a sample site of the model"):
        from_numpyro(model, _with_extra_site(guide, "c", dist.Normal(0.0, 1.0)), y)
    with pytest.raises(ValueError, match=r"Model site\(s\) 'tau' are neither observed nor sampled by the guide"):
        from_numpyro(_with_extra_site(model, "tau", dist.Normal(0.0, 1.0)), guide, y)
    with pytest.raises(ValueError, match="Guide site 'y' is observed in the model"):
        from_numpyro(model, _with_extra_site(guide, "y", dist.Normal(0.0, 1.0).expand([6]).to_event(1)), y)

    def wide_guide(y):
        numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("b", dist.Normal(jnp.zeros(3), 1.0).to_event(1))  # the model's b[GROUP] still works

    with pytest.raises(ValueError, match=r"Site 'b' has shape \(2,\) in the model but \(3,\) in the guide"):
        from_numpyro(model, wide_guide, y)


def test_numpyro_wrong_params_latents_and_data_raise(adapted):
    adapter, _ = adapted
    params = off_posterior_params(Y)
    with pytest.raises(ValueError, match=r"each of the guide's param sites \('mu_loc', .*\); missing: 'b_slope'\."):
        adapter.proposal({k: v for k, v in params.items() if k != "b_slope"})
    with pytest.raises(ValueError, match=r"; unknown \(not param sites of the model or guide\): 'scale'\."):
        adapter.proposal({**params, "scale": jnp.ones(())})
    with pytest.raises(ValueError, match=r"`params\['b_loc'\]` must have shape \(2,\).*got shape \(3,\)"):
        adapter.proposal({**params, "b_loc": jnp.zeros(3)})
    with pytest.raises(TypeError, match="`params` must be a dict"):
        adapter.proposal(list(params.values()))
    z = {"mu": jnp.asarray(0.1), "b": jnp.zeros(2)}
    with pytest.raises(ValueError, match=r"exactly the guide's latent sites 'mu', 'b'; missing 'b'"):
        adapter.log_joint(None, {"mu": z["mu"]})
    with pytest.raises(ValueError, match=r"`z\['b'\]` must have shape \(2,\) \(one sample\), got shape \(4, 2\)"):
        adapter.log_joint(None, {**z, "b": jnp.zeros((4, 2))})
    with pytest.raises(TypeError, match="`x` must be a dict"):
        adapter.log_joint(jnp.asarray(Y), z)
    with pytest.raises(ValueError, match=r"may only replace the model's observed sites 'y'; got 'mu'"):
        adapter.log_joint({"mu": 1.0}, z)
    # NumPyro broadcasts a wrong shape into a wrong number: one value for the plate counted it len(Y) times.
    with pytest.raises(ValueError, match=r"`x\['y'\]` must have the shape \(%d,\) of the data bound by `from_numpyro`, got shape \(\)" % len(Y)):
        adapter.log_joint({"y": jnp.asarray(0.5)}, z)
    np.testing.assert_allclose(adapter.log_joint({"y": jnp.asarray(Y)}, z), adapter.log_joint(None, z))


def test_numpyro_autoguide_is_adapted(x64):
    """An AutoNormal guide sets itself up on its first call: under the adapter's abstract trace it
    kept tracers, and `init_params` raised UnexpectedTracerError."""
    from numpyro.infer.autoguide import AutoNormal

    data = jnp.array([0.5, -1.2, 2.0])

    def model(data):
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        with numpyro.plate("N", data.shape[0]):
            numpyro.sample("obs", dist.Normal(mu, 1.0), obs=data)

    adapter = from_numpyro(model, AutoNormal(model), data)
    params = adapter.init_params(jax.random.key(0))
    z, log_q = adapter.proposal(params).sample_and_log_prob(seed=jax.random.key(1), sample_shape=(4,))
    hand = stats.norm(params["mu_auto_loc"], params["mu_auto_scale"]).logpdf(np.asarray(z["mu"]))
    np.testing.assert_allclose(log_q, hand, rtol=1e-10)


# ----------------------------------------------------------------------------------------------
# TFP joint distributions: mu ~ N(0, 2^2), y ~ N(mu, 1) three times, in each of TFP's three forms.
# ----------------------------------------------------------------------------------------------

Y_TFP = np.array([0.5, 1.5, 1.0])


def _tfp_joint(kind):
    zero, two, one = (jnp.asarray(v, jnp.float64) for v in (0.0, 2.0, 1.0))
    if kind == "named":
        return tfd.JointDistributionNamed(dict(mu=tfd.Normal(zero, two), y=lambda mu: tfd.Sample(tfd.Normal(mu, one), 3))), "y"
    if kind == "sequential":  # TFP names the nodes after the lambdas' arguments; the last one 'x'
        return tfd.JointDistributionSequential([tfd.Normal(zero, two), lambda mu: tfd.Sample(tfd.Normal(mu, one), 3)]), "x"

    def coroutine():
        mu = yield tfd.JointDistributionCoroutine.Root(tfd.Normal(zero, two, name="mu"))
        yield tfd.Sample(tfd.Normal(mu, one), 3, name="y")

    return tfd.JointDistributionCoroutine(coroutine), "y"


def _tfp_posterior():
    precision = 1 / 4 + len(Y_TFP)
    return jnp.asarray(Y_TFP.sum() / precision), jnp.asarray(precision**-0.5)


def _surrogate(kind, loc, scale):
    """A surrogate in the structure each joint's pinned form uses (and a bare Normal)."""
    if kind == "named":
        return tfd.JointDistributionNamed(dict(mu=tfd.Normal(loc, scale)))
    if kind == "sequential":
        return tfd.JointDistributionSequential([tfd.Normal(loc, scale)])
    if kind == "coroutine":
        root = tfd.JointDistributionCoroutine.Root
        return tfd.JointDistributionCoroutine(lambda: (yield root(tfd.Normal(loc, scale, name="mu"))))
    return tfd.Normal(loc, scale)


@pytest.mark.parametrize("kind", ["named", "sequential", "coroutine"])
def test_tfp_log_joint_equals_joint_log_prob_and_exact_log_p(x64, kind):
    joint, observed_name = _tfp_joint(kind)
    adapter = from_tfp_joint(joint, observed={observed_name: jnp.asarray(Y_TFP)})
    assert adapter.latent_names == ("mu",) and adapter.observed_names == (observed_name,)

    @jax.jit
    def values(mu, y, other, loc, scale):
        ours = (adapter.log_joint(None, {"mu": mu}), adapter.log_joint(None, mu), adapter.log_joint({observed_name: other}, mu))
        theirs = (joint.log_prob(**{"mu": mu, observed_name: y}), joint.log_prob(**{"mu": mu, observed_name: other}))
        # At the exact posterior, a surrogate in the pinned joint's own structure makes IS exact.
        q = adapter.proposal(_surrogate(kind, loc, scale))
        return ours, theirs, ej.importance_log_marginal(jax.random.key(0), None, adapter.log_joint, q, num_samples=5)

    (ours, bare, ours_other), (theirs, theirs_other), estimate = values(
        jnp.asarray(0.3), jnp.asarray(Y_TFP), jnp.asarray(Y_TFP[::-1] + 1.0), *_tfp_posterior()
    )
    for value in (ours, bare):
        np.testing.assert_allclose(value, theirs, rtol=1e-13)
    np.testing.assert_allclose(ours_other, theirs_other, rtol=1e-13)
    np.testing.assert_allclose(theirs, stats.norm(0, 2).logpdf(0.3) + stats.norm(0.3, 1).logpdf(Y_TFP).sum(), rtol=1e-13)
    exact = stats.multivariate_normal(np.zeros(3), 4 * np.ones((3, 3)) + np.eye(3)).logpdf(Y_TFP)
    np.testing.assert_allclose(estimate, exact, rtol=1e-12)
    for structure in (kind, "bare"):  # its own structure, or a bare array for the one latent node
        assert isinstance(adapter.proposal(_surrogate(structure, *_tfp_posterior())), ej.TFPProposal)


def test_tfp_gradients_flow_to_the_surrogate(x64):
    joint, _ = _tfp_joint("named")
    adapter = from_tfp_joint(joint, observed={"y": jnp.asarray(Y_TFP)})

    def objective(params, gradient):
        surrogate = _surrogate("named", params[0], jnp.exp(params[1]))
        return ej.iwae_bound(jax.random.key(4), None, adapter.log_joint, surrogate, num_samples=5, gradient=gradient)

    @jax.jit
    def gradients(params):
        return jax.grad(objective)(params, "dreg"), jax.grad(objective)(params, "reparam")

    loc, scale = _tfp_posterior()
    dreg, reparam = gradients((loc, jnp.log(scale)))
    np.testing.assert_allclose(dreg, 0.0, atol=1e-12)  # DReG vanishes at the exact posterior
    assert max(np.abs(reparam)) > 1e-3
    dreg, reparam = gradients((loc + 0.5, jnp.log(scale) + 0.3))
    assert all(np.abs(g) > 1e-3 for g in dreg + reparam)


def test_tfp_errors(x64):
    joint, _ = _tfp_joint("named")
    with pytest.raises(ValueError, match=r"names nodes the joint does not have: 'x'; its nodes are 'mu', 'y'"):
        from_tfp_joint(joint, observed={"x": jnp.zeros(3)})
    with pytest.raises(ValueError, match="must name some but not all"):
        from_tfp_joint(joint, observed={"mu": 0.0, "y": jnp.zeros(3)})
    with pytest.raises(TypeError, match="must be a TFP-on-JAX joint distribution"):
        from_tfp_joint(tfd.Normal(0.0, 1.0), observed={"y": 0.0})
    adapter = from_tfp_joint(joint, observed={"y": jnp.zeros(3, jnp.float32)})
    with pytest.raises(ValueError, match=r"node 'mu' shape \(\), got shape \(2,\)"):
        adapter.proposal(tfd.Normal(jnp.zeros(2), 1.0))
    with pytest.raises(ValueError, match=r"exactly the latent nodes 'mu'; missing 'mu'; not latent nodes: 'nu'"):
        adapter.log_joint(None, {"nu": 0.0})
    batched = tfd.JointDistributionNamed(dict(mu=tfd.Normal(0.0, 1.0), y=lambda mu: tfd.Normal(mu * jnp.ones(3), 1.0)))
    with pytest.raises(ValueError, match=r"joint has a batch shape"):
        ej.elbo(jax.random.key(0), None, from_tfp_joint(batched, {"y": jnp.zeros(3)}).log_joint, tfd.Normal(0.0, 1.0))


def test_tfp_log_joint_refuses_latents_and_observations_of_the_wrong_shape(x64):
    """TFP broadcasts a wrong shape into a wrong number: a 1-d surrogate for a 2-d latent gave an
    IWAE bound of -4.83 against the exact -3.78, with no error."""
    joint = tfd.JointDistributionNamed(dict(
        z=tfd.Independent(tfd.Normal(jnp.zeros(2), 1.0), 1), y=lambda z: tfd.Independent(tfd.Normal(z, 1.0), 1)))
    adapter = from_tfp_joint(joint, observed={"y": jnp.array([1.0, 2.0])})
    np.testing.assert_allclose(adapter.log_joint(None, jnp.zeros(2)), joint.log_prob(z=jnp.zeros(2), y=jnp.array([1.0, 2.0])))
    with pytest.raises(ValueError, match=r"`z\['z'\]` must have shape \(2,\) \(the node's event shape: one sample\), got \(1,\)"):
        ej.iwae_bound(jax.random.key(0), None, adapter.log_joint, tfd.Independent(tfd.Normal(jnp.zeros(1), 1.0), 1), num_samples=3)
    with pytest.raises(ValueError, match=r"`x\['y'\]` must have shape \(2,\) \(the shape of the observed value given to `from_tfp_joint`\), got \(3,\)"):
        adapter.log_joint({"y": jnp.zeros(3)}, jnp.zeros(2))


def test_tfp_named_joint_refuses_a_list_of_latents(x64):
    """A Named joint's node order is TFP's graph order, not the dict's: a list was zipped to it
    silently (log p -7.97 against -8.96 here), where TFP itself refuses a list."""
    joint = tfd.JointDistributionNamed(dict(a=tfd.Normal(0.0, 1.0), b=tfd.Normal(0.0, 2.0), y=lambda b: tfd.Normal(b, 1.0)))
    adapter = from_tfp_joint(joint, observed={"y": jnp.asarray(0.3)})
    a, b = jnp.asarray(0.7), jnp.asarray(-1.1)
    np.testing.assert_allclose(adapter.log_joint(None, {"a": a, "b": b}), joint.log_prob(a=a, b=b, y=0.3))
    with pytest.raises(TypeError, match=r"`z` must be a dict \{latent node: value\} for a JointDistributionNamed"):
        adapter.log_joint(None, [a, b])
    surrogate = tfd.JointDistributionSequential([tfd.Normal(0.0, 1.0), tfd.Normal(0.0, 1.0)])
    with pytest.raises(TypeError, match=r"a sample of `surrogate`"):
        adapter.proposal(surrogate)


def test_numpyro_a_param_site_shared_by_model_and_guide_is_set_in_the_model(x64):
    """Both declare `sigma`: the model's log density was evaluated at its initial value (1.0)
    whatever `params` said."""
    def shared_model(y):
        sigma = numpyro.param("sigma", jnp.asarray(1.0), constraint=constraints.positive)
        mu = numpyro.sample("mu", dist.Normal(0.0, 2.0))
        with numpyro.plate("data", y.shape[0]):
            numpyro.sample("y", dist.Normal(mu, sigma), obs=y)

    def shared_guide(y):
        sigma = numpyro.param("sigma", jnp.asarray(1.0), constraint=constraints.positive)
        loc = numpyro.param("m", jnp.zeros(()))
        numpyro.sample("mu", dist.Normal(loc, sigma))

    y = jnp.asarray(Y)
    adapter = from_numpyro(shared_model, shared_guide, y)
    params, z = {"sigma": jnp.asarray(2.0), "m": jnp.asarray(0.3)}, {"mu": jnp.asarray(0.1)}
    with pytest.raises(ValueError, match=r"param sites \(its own, or shared with the guide: 'sigma'\)"):
        adapter.log_joint(None, z)
    np.testing.assert_allclose(adapter.log_joint_with(params)(None, z), log_density(shared_model, (y,), {}, {**params, **z})[0], rtol=1e-13)


def test_numpyro_sample_shape_sites_and_flattening_autoguides(x64):
    from numpyro.infer.autoguide import AutoDiagonalNormal

    def shaped_model(y):
        z = numpyro.sample("z", dist.Normal(0.0, 1.0), sample_shape=(2,))
        numpyro.sample("y", dist.Normal(z.sum(), 1.0), obs=y)

    def shaped_guide(y):
        numpyro.sample("z", dist.Normal(numpyro.param("loc", jnp.zeros(2)), 1.0), sample_shape=())

    y = jnp.asarray(0.5)
    adapter = from_numpyro(shaped_model, shaped_guide, y)  # refused: "shape () in the model but (2,) in the guide"
    z = {"z": jnp.array([0.1, -0.2])}
    np.testing.assert_allclose(adapter.log_joint(None, z), log_density(shaped_model, (y,), {}, z)[0], rtol=1e-13)
    with pytest.raises(ValueError, match=r"auxiliary site\(s\) '_auto_latent' .* Use AutoNormal or AutoDelta"):
        from_numpyro(shaped_model, AutoDiagonalNormal(shaped_model), y)


def test_tfp_observed_values_must_end_in_their_event_shape(x64):
    """A scalar observation for a `Sample(Normal, 3)` node was broadcast into three copies of it."""
    joint = tfd.JointDistributionNamed(dict(mu=tfd.Normal(0.0, 1.0), y=lambda mu: tfd.Sample(tfd.Normal(mu, 1.0), 3)))
    for bad in (jnp.asarray(1.0), jnp.ones(1)):
        with pytest.raises(ValueError, match=r"`observed\['y'\]` must end in the node's event shape \(3,\), got shape"):
            from_tfp_joint(joint, observed={"y": bad})
    # A node that is a joint itself: its parts are TFP's to check (its value is no array).
    nested = tfd.JointDistributionSequential([
        tfd.Normal(0.0, 1.0),
        lambda mu: tfd.JointDistributionSequential([tfd.Normal(mu, 1.0), tfd.Sample(tfd.Normal(mu, 1.0), 3)]),
    ])
    adapter = from_tfp_joint(nested, observed={"x": [jnp.asarray(0.5), jnp.zeros(3)]})
    np.testing.assert_allclose(adapter.log_joint(None, jnp.asarray(0.2)), nested.log_prob([0.2, [0.5, jnp.zeros(3)]]))
