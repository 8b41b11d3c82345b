"""Flax NNX models whose `log_joint` and `proposal(x)` plug into every elbojax estimator.

Encoders, decoders and priors are NNX modules that take `rngs` only at construction and build
distrax distributions (or likelihood parameters) for ONE data point; `VAE` and `TwoLayerVAE` tie
them together. The likelihood functions, `Linear` and `flat_matmul` are exported for users who
write their own `log_joint`: under the estimators' `vmap`s, a dense layer built on `flat_matmul`
stays one matrix product, forward and backward (see `elbojax.models._flat_matmul`).
"""

from elbojax.models import conditional
from elbojax.models.conditional import ConditionalVAE, MLPClassifier, SemiSupervisedVAE
from elbojax.models._flat_matmul import flat_matmul
from elbojax.models._layers import Linear
from elbojax.models.decoders import BernoulliMLPDecoder, GaussianMLPDecoder
from elbojax.models.encoders import GaussianMLPEncoder
from elbojax.models.hierarchical import HierarchicalProposal, TwoLayerVAE
from elbojax.models.likelihoods import (
    bernoulli_log_likelihood,
    bias_from_data_mean,
    gaussian_log_likelihood,
)
from elbojax.models.priors import MixturePrior, StandardNormalPrior, VampPrior
from elbojax.models.vae import VAE

__all__ = [
    "BernoulliMLPDecoder",
    "bernoulli_log_likelihood",
    "bias_from_data_mean",
    "conditional",
    "ConditionalVAE",
    "flat_matmul",
    "GaussianMLPDecoder",
    "GaussianMLPEncoder",
    "gaussian_log_likelihood",
    "HierarchicalProposal",
    "Linear",
    "MixturePrior",
    "MLPClassifier",
    "SemiSupervisedVAE",
    "StandardNormalPrior",
    "TwoLayerVAE",
    "VAE",
    "VampPrior",
]
