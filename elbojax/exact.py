r"""Tractable models with exact $\log p(x)$ and exact posteriors, to prove estimators right.

Each model is an immutable pytree (pass it through `jax.jit`, differentiate with respect to
its arrays) with

* `prior`: $p(z)$, a distrax distribution;
* `log_joint(x, z)`: $\log p(x, z)$ for one data point and one latent sample (a scalar);
* `log_likelihood(x, z)`: $\log p(x \mid z)$;
* `log_marginal(x)`: the exact $\log p(x)$;
* `posterior(x)`: the exact $p(z \mid x)$, a distrax distribution usable as a proposal;
* `sample(key, num_points)`: `(x, z)` drawn from the model.

Shapes are checked at trace time: a wrong `x` or `z` raises a `ValueError` that names both.
"""

from __future__ import annotations

import dataclasses
import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np

from elbojax import _checks

_LOG_2PI = math.log(2.0 * math.pi)


def _pytree_dataclass(cls):
    cls = dataclasses.dataclass(frozen=True)(cls)
    fields = [f.name for f in dataclasses.fields(cls)]
    return jax.tree_util.register_dataclass(cls, data_fields=fields, meta_fields=[])


def _diag_normal_log_prob(x, mean, variance):
    r"""$\sum_i \log \mathcal{N}(x_i; \mu_i, \sigma^2_i)$, summed over the last axis."""
    return -0.5 * jnp.sum(_LOG_2PI + jnp.log(variance) + (x - mean) ** 2 / variance, axis=-1)


# --------------------------------------------------------------------------------------------
# Linear Gaussian / factor analysis
# --------------------------------------------------------------------------------------------


@_pytree_dataclass
class LinearGaussian:
    r"""Factor analysis: $z \sim \mathcal{N}(0, I_d)$, $x \mid z \sim \mathcal{N}(Wz + b, \mathrm{diag}\,\psi)$.

    Exact marginal $p(x) = \mathcal{N}(b,\, WW^\top + \mathrm{diag}\,\psi)$ and posterior
    $p(z \mid x) = \mathcal{N}(\Sigma W^\top \Psi^{-1}(x - b),\, \Sigma)$ with
    $\Sigma = (I + W^\top \Psi^{-1} W)^{-1}$.

    Attributes:
      weight: $W$, shape `(data_dim, latent_dim)`.
      bias: $b$, shape `(data_dim,)`.
      noise_variance: $\psi > 0$, shape `(data_dim,)`.
    """

    weight: jax.Array
    bias: jax.Array
    noise_variance: jax.Array

    def __post_init__(self):
        # Leaves may be replaced by tracers or sentinels inside JAX transformations: check only
        # when they are arrays with shapes.
        shapes = [getattr(a, "shape", None) for a in (self.weight, self.bias, self.noise_variance)]
        if all(isinstance(s, tuple) for s in shapes):
            if len(shapes[0]) != 2 or shapes[1] != shapes[0][:1] or shapes[2] != shapes[0][:1]:
                raise ValueError(
                    "LinearGaussian expects weight (D, d), bias (D,), noise_variance (D,); got "
                    f"{shapes[0]}, {shapes[1]}, {shapes[2]}."
                )

    @classmethod
    def random(cls, key, *, data_dim: int, latent_dim: int, dtype=jnp.float32) -> "LinearGaussian":
        """A model with $W_{ij} \\sim \\mathcal{N}(0, 1/d)$, $b_i \\sim \\mathcal{N}(0, 1)$, $\\psi_i \\in [0.1, 1]$."""
        data_dim = _checks.check_positive_int(data_dim, "data_dim")
        latent_dim = _checks.check_positive_int(latent_dim, "latent_dim")
        k_w, k_b, k_psi = jax.random.split(key, 3)
        weight = jax.random.normal(k_w, (data_dim, latent_dim), dtype) / math.sqrt(latent_dim)
        bias = jax.random.normal(k_b, (data_dim,), dtype)
        noise_variance = jax.random.uniform(k_psi, (data_dim,), dtype, 0.1, 1.0)
        return cls(weight, bias, noise_variance)

    @property
    def data_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def latent_dim(self) -> int:
        return self.weight.shape[1]

    @property
    def prior(self) -> distrax.Distribution:
        zeros = jnp.zeros(self.latent_dim, self.weight.dtype)
        return distrax.MultivariateNormalDiag(zeros, jnp.ones_like(zeros))

    def _check(self, x=None, z=None):
        if x is not None:
            _checks.check_array_shape(x, (self.data_dim,), "x")
        if z is not None:
            _checks.check_array_shape(z, (self.latent_dim,), "z")

    def log_likelihood(self, x, z):
        r"""$\log \mathcal{N}(x; Wz + b, \mathrm{diag}\,\psi)$ for one `x` `(D,)` and one `z` `(d,)`."""
        self._check(x, z)
        # `z @ W.T` (not `W @ z`): vmapped over samples it becomes one (K, d) x (d, D) matrix
        # product; the other form measured 3x slower under vmap on CPU.
        return _diag_normal_log_prob(x, z @ self.weight.T + self.bias, self.noise_variance)

    def log_joint(self, x, z):
        r"""$\log p(x, z) = \log \mathcal{N}(x; Wz + b, \Psi) + \log \mathcal{N}(z; 0, I)$."""
        prior = -0.5 * jnp.sum(_LOG_2PI + z**2, axis=-1)
        return self.log_likelihood(x, z) + prior

    def marginal(self) -> distrax.Distribution:
        r"""$p(x) = \mathcal{N}(b, WW^\top + \mathrm{diag}\,\psi)$."""
        cov = self.weight @ self.weight.T + jnp.diag(self.noise_variance)
        return distrax.MultivariateNormalTri(self.bias, jnp.linalg.cholesky(cov))

    def log_marginal(self, x):
        r"""The exact $\log p(x)$ for one `x` of shape `(D,)`."""
        self._check(x)
        return self.marginal().log_prob(x)

    @property
    def posterior_covariance(self):
        r"""$\Sigma = (I + W^\top \Psi^{-1} W)^{-1}$, shape `(d, d)`; the same for every $x$."""
        eye = jnp.eye(self.latent_dim, dtype=self.weight.dtype)
        precision = eye + (self.weight.T / self.noise_variance) @ self.weight
        return jax.scipy.linalg.cho_solve((jnp.linalg.cholesky(precision), True), eye)

    def _posterior_mean(self, x, cov):
        return cov @ (self.weight.T @ ((x - self.bias) / self.noise_variance))

    def posterior_mean(self, x):
        r"""$\Sigma W^\top \Psi^{-1}(x - b)$, shape `(d,)`."""
        self._check(x)
        return self._posterior_mean(x, self.posterior_covariance)

    def posterior(self, x) -> distrax.Distribution:
        """The exact posterior $p(z \\mid x)$, a full-covariance Gaussian."""
        self._check(x)
        cov = self.posterior_covariance
        return distrax.MultivariateNormalTri(self._posterior_mean(x, cov), jnp.linalg.cholesky(cov))

    def elbo_diag_gaussian(self, x, mean, scale):
        r"""The exact ELBO of $q = \mathcal{N}(m, \mathrm{diag}\, s^2)$, in closed form.

        $$\mathrm{ELBO}(q) = -\tfrac12 \sum_i \Big[\log 2\pi\psi_i + \frac{(x - Wm - b)_i^2 +
          (W \mathrm{diag}(s^2) W^\top)_{ii}}{\psi_i}\Big]
          - \tfrac12 \sum_j (\log 2\pi + m_j^2 + s_j^2) + \sum_j \tfrac12\log(2\pi e s_j^2).$$

        Args:
          x: `(D,)`. mean, scale: `(d,)`, `scale > 0`.
        """
        self._check(x, mean)
        _checks.check_array_shape(scale, (self.latent_dim,), "scale")
        residual = x - (mean @ self.weight.T + self.bias)
        spread = (self.weight**2) @ (scale**2)
        expected_log_lik = -0.5 * jnp.sum(
            _LOG_2PI + jnp.log(self.noise_variance) + (residual**2 + spread) / self.noise_variance
        )
        expected_log_prior = -0.5 * jnp.sum(_LOG_2PI + mean**2 + scale**2)
        entropy = jnp.sum(0.5 * (_LOG_2PI + 1.0) + jnp.log(scale))
        return expected_log_lik + expected_log_prior + entropy

    def sample(self, key, num_points: int):
        """Draw `(x, z)` with shapes `(num_points, D)` and `(num_points, d)`."""
        num_points = _checks.check_positive_int(num_points, "num_points")
        k_z, k_x = jax.random.split(key)
        dtype = self.weight.dtype
        z = jax.random.normal(k_z, (num_points, self.latent_dim), dtype)
        noise = jax.random.normal(k_x, (num_points, self.data_dim), dtype)
        return z @ self.weight.T + self.bias + jnp.sqrt(self.noise_variance) * noise, z


# --------------------------------------------------------------------------------------------
# Gaussian toy of Rainforth et al. (2018)
# --------------------------------------------------------------------------------------------


@_pytree_dataclass
class GaussianToy:
    r"""$z \sim \mathcal{N}(\mu, I_D)$, $x \mid z \sim \mathcal{N}(z, I_D)$ (Rainforth et al. 2018, D = 20).

    Exact $\log p(x) = \log \mathcal{N}(x; \mu, 2I)$ and
    $p(z \mid x) = \mathcal{N}\big(\tfrac{x + \mu}{2}, \tfrac12 I\big)$.

    Attributes:
      mean: $\mu$, shape `(D,)`.

    References:
      Rainforth, Kosiorek, Le, Maddison, Igl, Wood & Teh, *Tighter Variational Bounds are Not
      Necessarily Better*, ICML 2018, https://arxiv.org/abs/1802.04537
    """

    mean: jax.Array

    def __post_init__(self):
        # As in LinearGaussian: check only when the leaf is an array with a shape (not a tracer
        # sentinel of a JAX transformation).
        shape = getattr(self.mean, "shape", None)
        if isinstance(shape, tuple) and len(shape) != 1:
            raise ValueError(f"GaussianToy expects mean (D,), got shape {shape}.")

    @classmethod
    def random(cls, key, *, dim: int = 20, dtype=jnp.float32) -> "GaussianToy":
        """A toy with $\\mu \\sim \\mathcal{N}(0, I_D)$, as in the paper."""
        return cls(jax.random.normal(key, (_checks.check_positive_int(dim, "dim"),), dtype))

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    def _check(self, *arrays_and_names):
        for array, name in arrays_and_names:
            _checks.check_array_shape(array, (self.dim,), name)

    @property
    def prior(self) -> distrax.Distribution:
        return distrax.MultivariateNormalDiag(self.mean, jnp.ones_like(self.mean))

    def log_likelihood(self, x, z):
        r"""$\log \mathcal{N}(x; z, I)$."""
        self._check((x, "x"), (z, "z"))
        return -0.5 * jnp.sum(_LOG_2PI + (x - z) ** 2)

    def log_joint(self, x, z):
        r"""$\log \mathcal{N}(x; z, I) + \log \mathcal{N}(z; \mu, I)$."""
        return self.log_likelihood(x, z) - 0.5 * jnp.sum(_LOG_2PI + (z - self.mean) ** 2)

    def log_marginal(self, x):
        r"""$\log \mathcal{N}(x; \mu, 2I)$."""
        self._check((x, "x"))
        return _diag_normal_log_prob(x, self.mean, 2.0 * jnp.ones_like(self.mean))

    def posterior(self, x) -> distrax.Distribution:
        r"""$\mathcal{N}((x + \mu)/2, I/2)$."""
        self._check((x, "x"))
        return distrax.MultivariateNormalDiag((x + self.mean) / 2, jnp.full_like(x, math.sqrt(0.5)))

    def optimal_encoder_params(self):
        r"""$(A^*, b^*) = (I/2, \mu/2)$: the encoder below then has the posterior's mean."""
        return 0.5 * jnp.eye(self.dim, dtype=self.mean.dtype), 0.5 * self.mean

    def encoder(self, params, x) -> distrax.Distribution:
        r"""Rainforth et al.'s inference network $q(z \mid x) = \mathcal{N}(Ax + b, \tfrac23 I)$.

        Args:
          params: `(A, b)` with shapes `(D, D)` and `(D,)`.
          x: `(D,)`.
        """
        weight, bias = params
        self._check((x, "x"), (bias, "b"))
        _checks.check_array_shape(weight, (self.dim, self.dim), "A")
        return distrax.MultivariateNormalDiag(weight @ x + bias, jnp.full_like(bias, math.sqrt(2.0 / 3.0)))

    def sample(self, key, num_points: int):
        """Draw `(x, z)`, each of shape `(num_points, D)`."""
        num_points = _checks.check_positive_int(num_points, "num_points")
        k_z, k_x = jax.random.split(key)
        shape = (num_points, self.dim)
        z = self.mean + jax.random.normal(k_z, shape, self.mean.dtype)
        return z + jax.random.normal(k_x, shape, self.mean.dtype), z


# --------------------------------------------------------------------------------------------
# Gaussian mixture
# --------------------------------------------------------------------------------------------


@_pytree_dataclass
class GaussianMixture:
    r"""$z \sim \mathrm{Categorical}(\pi)$, $x \mid z \sim \mathcal{N}(\mu_z, \mathrm{diag}\,\sigma_z^2)$.

    Exact $\log p(x) = \log \sum_c \pi_c\, \mathcal{N}(x; \mu_c, \sigma_c^2)$ and posterior
    responsibilities $p(z = c \mid x) \propto \pi_c\, \mathcal{N}(x; \mu_c, \sigma_c^2)$, by
    enumeration of the $C$ components; `em_step` is one step of expectation-maximisation.

    Attributes:
      logits: unnormalised $\log \pi$, shape `(C,)`.
      means: $\mu$, shape `(C, D)`.
      scales: $\sigma > 0$, shape `(C, D)`.
    """

    logits: jax.Array
    means: jax.Array
    scales: jax.Array

    def __post_init__(self):
        shapes = [getattr(a, "shape", None) for a in (self.logits, self.means, self.scales)]
        if all(isinstance(s, tuple) for s in shapes):
            if len(shapes[0]) != 1 or len(shapes[1]) != 2 or shapes[1][:1] != shapes[0] or shapes[2] != shapes[1]:
                raise ValueError(
                    "GaussianMixture expects logits (C,), means (C, D), scales (C, D); got "
                    f"{shapes[0]}, {shapes[1]}, {shapes[2]}."
                )

    @classmethod
    def random(
        cls, key, *, num_components: int, dim: int, separation: float = 3.0, dtype=jnp.float32
    ) -> "GaussianMixture":
        """Components with means $\\sim \\mathcal{N}(0, \\text{separation}^2 I)$, unit scales, equal weights."""
        num_components = _checks.check_positive_int(num_components, "num_components")
        dim = _checks.check_positive_int(dim, "dim")
        means = separation * jax.random.normal(key, (num_components, dim), dtype)
        return cls(jnp.zeros(num_components, dtype), means, jnp.ones_like(means))

    @property
    def num_components(self) -> int:
        return self.logits.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def prior(self) -> distrax.Distribution:
        return distrax.Categorical(logits=self.logits)

    def component_log_likelihoods(self, x):
        r"""$\log \mathcal{N}(x; \mu_c, \sigma_c^2)$ for every component, shape `(C,)`."""
        _checks.check_array_shape(x, (self.dim,), "x")
        return _diag_normal_log_prob(x, self.means, self.scales**2)

    def _index(self, z):
        r"""Check `z` (an integer of shape `()`) at trace time; return `(inside, safe_z)`.

        `inside` says whether $0 \le z < C$; `safe_z` is `z` where inside, else 0, so that the
        gather never clamps and the masked branch stays finite (no NaN gradient).
        """
        _checks.check_array_shape(z, (), "z")
        dtype = jnp.result_type(z)
        if not jnp.issubdtype(dtype, jnp.integer):
            raise TypeError(
                f"`z` must be an integer component index in [0, {self.num_components}) of shape (), "
                f"got dtype {dtype}."
            )
        z = jnp.asarray(z)
        inside = z >= 0
        if np.iinfo(dtype).max >= self.num_components:  # else every value of the dtype is < C
            inside = inside & (z < np.array(self.num_components, dtype))
        return inside, jnp.where(inside, z, jnp.zeros_like(z))

    def log_likelihood(self, x, z):
        r"""$\log \mathcal{N}(x; \mu_z, \sigma_z^2)$ for one integer component index `z` (shape `()`).

        $-\infty$ for `z` outside $\{0, \dots, C-1\}$ (the model puts no mass there), never
        another component's value.
        """
        _checks.check_array_shape(x, (self.dim,), "x")
        inside, safe = self._index(z)
        value = _diag_normal_log_prob(x, self.means[safe], self.scales[safe] ** 2)
        return jnp.where(inside, value, -jnp.inf)

    def log_joint(self, x, z):
        r"""$\log \pi_z + \log \mathcal{N}(x; \mu_z, \sigma_z^2)$; $-\infty$ for `z` outside $\{0, \dots, C-1\}$ ($\pi_z = 0$)."""
        _, safe = self._index(z)
        return jax.nn.log_softmax(self.logits)[safe] + self.log_likelihood(x, z)  # -inf outside

    def _log_joint_all(self, x):
        return jax.nn.log_softmax(self.logits) + self.component_log_likelihoods(x)

    def log_marginal(self, x):
        r"""$\log \sum_c \pi_c\, \mathcal{N}(x; \mu_c, \sigma_c^2)$, exactly by enumeration."""
        return jax.nn.logsumexp(self._log_joint_all(x))

    def posterior(self, x) -> distrax.Distribution:
        """The responsibilities $p(z \\mid x)$ as a `distrax.Categorical`."""
        return distrax.Categorical(logits=jax.nn.log_softmax(self._log_joint_all(x)))

    def sample(self, key, num_points: int):
        """Draw `(x, z)` with shapes `(num_points, D)` and `(num_points,)`."""
        num_points = _checks.check_positive_int(num_points, "num_points")
        k_z, k_x = jax.random.split(key)
        z = jax.random.categorical(k_z, self.logits, shape=(num_points,))
        noise = jax.random.normal(k_x, (num_points, self.dim), self.means.dtype)
        return self.means[z] + self.scales[z] * noise, z

    def em_step(self, data, *, min_scale: float = 1e-3) -> "GaussianMixture":
        r"""One EM step on `data` of shape `(N, D)`; the log-likelihood never decreases.

        E-step: $q_n(z) = p(z \mid x_n)$, which makes the ELBO equal to $\log p(x_n)$.
        M-step: $\pi_c \propto \sum_n r_{nc}$, $\mu_c = \sum_n r_{nc} x_n / \sum_n r_{nc}$,
        $\sigma_c^2 = \sum_n r_{nc}(x_n - \mu_c)^2 / \sum_n r_{nc}$, floored at `min_scale**2`
        (a constrained maximisation, so the increase still holds).

        References:
          Dempster, Laird & Rubin 1977; Bishop, *PRML* 2006, sec. 9.2.2.
        """
        self._check_data(data)
        log_resp = jax.vmap(lambda x: self.posterior(x).logits)(data)
        resp = jnp.exp(log_resp)
        counts = jnp.sum(resp, axis=0)
        # A component no point is responsible for keeps weight 0 (logit -inf) instead of NaN.
        safe_counts = jnp.maximum(counts, jnp.finfo(counts.dtype).tiny)[:, None]
        means = (resp.T @ data) / safe_counts
        # Centred form, not E[x^2] - mu^2, which cancels catastrophically in float32.
        centred_sq = (data[:, None, :] - means[None]) ** 2
        variance = jnp.einsum("nc,ncd->cd", resp, centred_sq) / safe_counts
        scales = jnp.sqrt(jnp.maximum(variance, min_scale**2))
        return GaussianMixture(jnp.log(counts / data.shape[0]), means, scales)

    def mean_log_marginal(self, data):
        r"""$\frac1N \sum_n \log p(x_n)$ over `data` of shape `(N, D)`."""
        self._check_data(data)
        return jnp.mean(jax.vmap(self.log_marginal)(data))

    def _check_data(self, data) -> None:
        if jnp.ndim(data) != 2 or jnp.shape(data)[1] != self.dim or jnp.shape(data)[0] < 1:
            raise ValueError(f"`data` must have shape (N, {self.dim}) with N >= 1, got {jnp.shape(data)}.")


def fit_em(model: GaussianMixture, data, *, num_steps: int):
    """Run `num_steps` EM steps; return the fitted model and the mean log-likelihood before each step.

    Returns:
      `(model, history)` with `history` of shape `(num_steps + 1,)`: the mean $\\log p(x)$
      before the first step, after each, non-decreasing.
    """
    num_steps = _checks.check_positive_int(num_steps, "num_steps")

    def step(current, _):
        updated = current.em_step(data)
        return updated, updated.mean_log_marginal(data)

    fitted, history = jax.lax.scan(step, model, None, length=num_steps)
    return fitted, jnp.concatenate([model.mean_log_marginal(data)[None], history])
