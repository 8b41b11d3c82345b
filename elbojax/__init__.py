"""elbojax: ELBO estimators as pure JAX functions.

Every estimator takes ONE data point and returns a scalar; batch with `jax.vmap`.
"""

from elbojax import data, diagnostics, discrete, distributed, exact, gradients, interop, models
from elbojax import missing, runtime, snis
from elbojax import flows, gaps, local
from elbojax.bounds import (
    combination_iwae_bound,
    multi_iwae_bound,
    partial_iwae_bound,
    renyi_bound,
)
from elbojax.diagnostics import (
    ActiveUnits,
    active_units,
    gradient_snr,
    kl_per_dimension,
    pareto_k_hat,
    pooled_gradient_snr,
)
from elbojax.discrete import (
    RelaxedBernoulli,
    RelaxedOneHotCategorical,
    enumerated_elbo,
    enumerated_elbo_bernoulli,
    enumerated_log_marginal,
    enumerated_mixed_elbo,
    straight_through,
    straight_through_bernoulli,
)
from elbojax.estimators import (
    elbo,
    elbo_analytic_kl,
    elbo_entropy,
    expectation,
    importance_log_marginal,
    iwae_bound,
    log_weights,
    naive_mc_log_marginal,
)
from elbojax.proposals import FiniteUniform, TFPProposal, as_proposal
from elbojax.reductions import effective_sample_size, logmeanexp

__version__ = "0.1.0"

__all__ = [
    "active_units",
    "ActiveUnits",
    "as_proposal",
    "combination_iwae_bound",
    "data",
    "diagnostics",
    "discrete",
    "distributed",
    "effective_sample_size",
    "elbo",
    "elbo_analytic_kl",
    "elbo_entropy",
    "expectation",
    "enumerated_elbo",
    "enumerated_elbo_bernoulli",
    "enumerated_log_marginal",
    "enumerated_mixed_elbo",
    "exact",
    "FiniteUniform",
    "flows",
    "gaps",
    "gradient_snr",
    "gradients",
    "importance_log_marginal",
    "interop",
    "iwae_bound",
    "kl_per_dimension",
    "local",
    "log_weights",
    "logmeanexp",
    "missing",
    "models",
    "multi_iwae_bound",
    "naive_mc_log_marginal",
    "pareto_k_hat",
    "partial_iwae_bound",
    "pooled_gradient_snr",
    "RelaxedBernoulli",
    "RelaxedOneHotCategorical",
    "renyi_bound",
    "runtime",
    "snis",
    "straight_through",
    "straight_through_bernoulli",
    "TFPProposal",
]
