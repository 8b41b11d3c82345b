"""Rainforth et al. (2018) / Tucker et al. (2019) on the Gaussian toy: as K grows the plain IWAE
encoder gradient's SNR falls, DReG's does not, and the decoder's rises."""

import jax
import jax.numpy as jnp

import elbojax as ej
from elbojax import exact


def _pooled_snr(gradient, num_samples, toy, data, encoder, num_draws=400):
    def batch_bound(params, key):
        encoder_params, prior_mean = params
        model = exact.GaussianToy(prior_mean)

        def one(k, x):
            q = toy.encoder(encoder_params, x)
            return ej.iwae_bound(k, x, model.log_joint, q, num_samples=num_samples, gradient=gradient)

        return jnp.mean(jax.vmap(one)(jax.random.split(key, data.shape[0]), data))

    draws = jax.jit(jax.vmap(lambda k: jax.grad(batch_bound)((encoder, toy.mean), k)))(
        jax.random.split(jax.random.key(3), num_draws)
    )
    return float(ej.pooled_gradient_snr(draws[0])), float(ej.pooled_gradient_snr(draws[1]))


def test_snr_against_k():
    toy = exact.GaussianToy.random(jax.random.key(0), dim=20)
    data, _ = toy.sample(jax.random.key(1), 8)
    weight, bias = toy.optimal_encoder_params()
    k_w, k_b = jax.random.split(jax.random.key(2))
    encoder = (weight + 0.01 * jax.random.normal(k_w, weight.shape), bias + 0.01 * jax.random.normal(k_b, bias.shape))

    iwae_1, iwae_100 = _pooled_snr("reparam", 1, toy, data, encoder), _pooled_snr("reparam", 100, toy, data, encoder)
    dreg_1, dreg_100 = _pooled_snr("dreg", 1, toy, data, encoder), _pooled_snr("dreg", 100, toy, data, encoder)
    assert iwae_100[0] < 0.5 * iwae_1[0], (iwae_1, iwae_100)  # encoder: falls (~1/sqrt(K))
    assert dreg_100[0] > dreg_1[0], (dreg_1, dreg_100)  # DReG encoder: does not fall
    assert dreg_100[0] > 3 * iwae_100[0], (dreg_100, iwae_100)
    assert iwae_100[1] > 3 * iwae_1[1], (iwae_1, iwae_100)  # decoder: rises (~sqrt(K))
