"""Every optimizer and transformation of the package, with injectable arguments."""

import functools

import pytest

import bayesopt_jax as bj

# name -> (factory, keyword arguments with numeric values, which all must be
# injectable with optax.inject_hyperparams)
OPTIMIZERS = {
    "adam": (bj.adam, dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0)),
    "adam_nesterov": (
        functools.partial(bj.adam, nesterov=True),
        dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8),
    ),
    "adamw": (
        bj.adamw,
        dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, weight_decay=1e-2),
    ),
    "amsgrad": (bj.amsgrad, dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0)),
    "amsgrad_raw": (
        functools.partial(bj.amsgrad, max_of="raw"),
        dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8),
    ),
    "amsgrad_reddi": (
        functools.partial(bj.amsgrad, bias_correction_mu=False, bias_correction_nu=False),
        dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8),
    ),
    "adamax": (bj.adamax, dict(learning_rate=2e-3, b1=0.9, b2=0.999, eps=1e-8)),
    "adagrad": (bj.adagrad, dict(learning_rate=1e-2, initial_accumulator_value=0.1, eps=1e-7)),
    "adagrad_torch": (
        functools.partial(bj.adagrad, eps_in_sqrt=False),
        dict(learning_rate=1e-2, initial_accumulator_value=0.0, eps=1e-10),
    ),
    "rmsprop": (bj.rmsprop, dict(learning_rate=1e-2, decay=0.9, eps=1e-8, initial_scale=0.0)),
    "rmsprop_torch_momentum": (
        functools.partial(bj.rmsprop, eps_in_sqrt=False),
        dict(learning_rate=1e-2, decay=0.99, eps=1e-8, momentum=0.0),
    ),
    "rmsprop_centered_momentum": (
        functools.partial(bj.rmsprop, centered=True, nesterov=True),
        dict(learning_rate=1e-2, decay=0.9, eps=1e-8, momentum=0.9),
    ),
    "sigma_filter": (bj.sigma_filter, dict(eta=1e-2, beta=0.999, eps=1e-16, max_ratio=2.0)),
    "sigma_filter_momentum": (
        functools.partial(bj.sigma_filter, b1=0.9),
        dict(eta=1e-2, beta=0.999),
    ),
    "variational_sigma_filter": (
        functools.partial(bj.variational_sigma_filter, num_data=1000, batch_size=10, key=0),
        dict(eta=1e-2, beta=0.999),
    ),
    "sigma_fixed_point": (
        functools.partial(bj.sigma_fixed_point, b1=0.9),
        dict(eta=1e-2, beta=0.999, eps=1e-16),
    ),
}


# The inner loop's representatives, one of each kind: Adam (a native rule, two
# buffers), AMSGrad in PyTorch's convention (three buffers), centred RMSProp
# with Nesterov momentum (no native rule, a momentum chain), the σ-filter with
# momentum, and the variational filter (its draw). Tests that sweep the
# registry run the others in the full suite only (marked ``slow``).
INNER_LOOP = (
    "adam",
    "amsgrad_raw",
    "rmsprop_centered_momentum",
    "sigma_filter_momentum",
    "variational_sigma_filter",
)
assert set(INNER_LOOP) <= set(OPTIMIZERS)


def names() -> list:
    """Every name of :data:`OPTIMIZERS`, sorted, for ``parametrize``; outside the inner loop's
    representatives each carries the ``slow`` marker."""
    return [
        n if n in INNER_LOOP else pytest.param(n, marks=pytest.mark.slow)
        for n in sorted(OPTIMIZERS)
    ]


def lr_name(name):
    """The argument that plays the learning rate (η for the σ-filter)."""
    return "learning_rate" if "learning_rate" in OPTIMIZERS[name][1] else "eta"


def make(name, **overrides):
    factory, kwargs = OPTIMIZERS[name]
    return factory(**{**kwargs, **overrides})


def momentum_after_lr(name):
    """``(decay, nesterov)`` of a momentum applied after the learning rate, else None.

    ``rmsprop`` follows Optax's chain ``(scale_by_rms, learning_rate, trace)``:
    once the learning rate reaches 0 its steps decay with the trace instead of
    vanishing.
    """
    factory, kwargs = OPTIMIZERS[name]
    if "rmsprop" not in name or kwargs.get("momentum") is None:
        return None
    return kwargs["momentum"], getattr(factory, "keywords", {}).get("nesterov", False)
