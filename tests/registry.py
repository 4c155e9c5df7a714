"""Every optimizer and transformation of the package, with injectable arguments."""

import functools

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
    "amsgrad_corrected": (
        functools.partial(bj.amsgrad, max_of="corrected"),
        dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8),
    ),
    "amsgrad_reddi": (
        functools.partial(bj.amsgrad, bias_correction=False),
        dict(learning_rate=1e-2, b1=0.9, b2=0.999, eps=1e-8),
    ),
    "adamax": (bj.adamax, dict(learning_rate=2e-3, b1=0.9, b2=0.999, eps=1e-8)),
    "adagrad": (bj.adagrad, dict(learning_rate=1e-2, initial_accumulator_value=0.1, eps=1e-10)),
    "rmsprop": (bj.rmsprop, dict(learning_rate=1e-2, decay=0.99, eps=1e-8, momentum=0.0)),
    "rmsprop_centered_momentum": (
        functools.partial(bj.rmsprop, centered=True),
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


def lr_name(name):
    """The argument that plays the learning rate (η for the σ-filter)."""
    return "learning_rate" if "learning_rate" in OPTIMIZERS[name][1] else "eta"


def make(name, **overrides):
    factory, kwargs = OPTIMIZERS[name]
    return factory(**{**kwargs, **overrides})
