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
from bayesopt_jax._src.alias import adagrad, adam, adamax, adamw, amsgrad, rmsprop
from bayesopt_jax._src.decay import add_decoupled_weight_decay
from bayesopt_jax._src.moments import (
    AmsgradMaxState,
    BiasCorrectionState,
    amsgrad_max,
    bias_correction,
)
from bayesopt_jax._src.parallel import cross_replica_mean

__version__ = "0.1.0"

__all__ = [
    "AmsgradMaxState",
    "BiasCorrectionState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "adagrad",
    "adam",
    "adamax",
    "adamw",
    "add_decoupled_weight_decay",
    "amsgrad",
    "amsgrad_max",
    "bias_correction",
    "cross_replica_mean",
    "rmsprop",
    "scale_by_adam",
    "scale_by_adamax",
    "scale_by_amsgrad",
    "scale_by_rms",
    "scale_by_rss",
]
