"""bayesopt_jax: the Adam family and its Bayesian reading as Optax transformations."""

from bayesopt_jax._src.adam import (
    ScaleByAdamState,
    ScaleByAmsgradState,
    ScaleByRmsState,
    ScaleByRssState,
    scale_by_adam,
    scale_by_adamax,
    scale_by_amsgrad,
    scale_by_rms,
    scale_by_rss,
)
from bayesopt_jax._src.alias import (
    adagrad,
    adam,
    adamax,
    adamw,
    amsgrad,
    rmsprop,
    sigma_filter,
    sigma_fixed_point,
    variational_newton,
    variational_sigma_filter,
)
from bayesopt_jax._src.checkpoint import load_npz, save_npz
from bayesopt_jax._src.decay import add_decoupled_weight_decay
from bayesopt_jax._src.fused import fused_step, fusion_reason, native_available, native_status
from bayesopt_jax._src.moments import (
    AmsgradMaxState,
    BiasCorrectionState,
    amsgrad_max,
    bias_correction,
)
from bayesopt_jax._src.packing import Packed, pack, unpack
from bayesopt_jax._src.parallel import cross_replica_mean, state_shardings
from bayesopt_jax._src.posterior import (
    calibrate_posterior_scale,
    curvature_report,
    laplace_scale,
    posterior_variance,
    sample_posterior,
    training_sample,
)
from bayesopt_jax._src.quantize import Blockwise8, Quantized
from bayesopt_jax._src.rounding import (
    KahanSummationState,
    StochasticRoundingState,
    kahan_summation,
    stochastic_round,
    stochastic_rounding,
)
from bayesopt_jax._src.sigma import (
    ScaleBySigmaFilterFullState,
    ScaleBySigmaFilterState,
    scale_by_sigma_filter,
    scale_by_sigma_filter_full,
    scale_by_sigma_fixed_point,
    sigma_star,
    sigma_star_full,
)
from bayesopt_jax._src.variational import (
    ScaleByVariationalNewtonState,
    ScaleByVariationalSigmaFilterState,
    scale_by_variational_sigma_filter,
)

__version__ = "0.1.0"

__all__ = [
    "AmsgradMaxState",
    "BiasCorrectionState",
    "Blockwise8",
    "KahanSummationState",
    "Packed",
    "Quantized",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleBySigmaFilterFullState",
    "ScaleBySigmaFilterState",
    "ScaleByVariationalNewtonState",
    "ScaleByVariationalSigmaFilterState",
    "StochasticRoundingState",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decoupled_weight_decay",
    "amsgrad",
    "amsgrad_max",
    "bias_correction",
    "calibrate_posterior_scale",
    "cross_replica_mean",
    "curvature_report",
    "fused_step",
    "fusion_reason",
    "kahan_summation",
    "laplace_scale",
    "load_npz",
    "native_available",
    "native_status",
    "pack",
    "posterior_variance",
    "rmsprop",
    "sample_posterior",
    "save_npz",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_sigma_filter",
    "scale_by_sigma_filter_full",
    "scale_by_sigma_fixed_point",
    "scale_by_variational_sigma_filter",
    "sigma_filter",
    "sigma_fixed_point",
    "sigma_star",
    "sigma_star_full",
    "state_shardings",
    "stochastic_round",
    "stochastic_rounding",
    "training_sample",
    "unpack",
    "variational_newton",
    "variational_sigma_filter",
]
