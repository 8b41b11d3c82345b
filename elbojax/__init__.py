"""elbojax: ELBO estimators as pure JAX functions.

Every estimator takes ONE data point and returns a scalar; batch with `jax.vmap`.
"""

from elbojax import exact
from elbojax.estimators import (
    elbo,
    elbo_analytic_kl,
    elbo_entropy,
    importance_log_marginal,
    iwae_bound,
    log_weights,
    naive_mc_log_marginal,
)
from elbojax.proposals import FiniteUniform, TFPProposal, as_proposal
from elbojax.reductions import effective_sample_size, logmeanexp

__version__ = "0.1.0"

__all__ = [
    "FiniteUniform",
    "TFPProposal",
    "as_proposal",
    "effective_sample_size",
    "elbo",
    "elbo_analytic_kl",
    "elbo_entropy",
    "exact",
    "importance_log_marginal",
    "iwae_bound",
    "log_weights",
    "logmeanexp",
    "naive_mc_log_marginal",
]
