"""Every optimizer and transformation of the package, with injectable arguments."""

import functools
from typing import NamedTuple

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
    "variational_newton": (
        functools.partial(
            bj.variational_newton, num_data=1000, batch_size=10, key=0, proximal_eta=1e-2
        ),
        dict(learning_rate=0.5, beta=0.999),
    ),
    "sigma_fixed_point": (
        functools.partial(bj.sigma_fixed_point, b1=0.9),
        dict(eta=1e-2, beta=0.999, eps=1e-16),
    ),
}


# What each entry can do, the one place the per-feature lists come from:
# native: fused_step runs it as one native call on float32 CPU arrays;
# eight_bit: its state-dtype arguments that take a storage format (Blockwise8);
# optax / torch: the name of the counterpart in Optax / torch.optim, if any.
class Capabilities(NamedTuple):
    native: bool
    eight_bit: tuple[str, ...]
    optax: str | None
    torch: str | None


ADAM_STATE = ("mu_dtype", "nu_dtype")
SIGMA_STATE = ("mu_dtype", "nu_dtype", "sigma_dtype")
CAPABILITIES = {
    "adam": Capabilities(True, ADAM_STATE, "adam", "Adam"),
    "adam_nesterov": Capabilities(False, ADAM_STATE, "adam", "NAdam"),
    "adamw": Capabilities(True, ADAM_STATE, "adamw", "AdamW"),
    "amsgrad": Capabilities(True, ADAM_STATE, "amsgrad", None),
    "amsgrad_raw": Capabilities(True, ADAM_STATE, None, "Adam"),
    "amsgrad_reddi": Capabilities(True, ADAM_STATE, None, None),
    "adamax": Capabilities(False, (), "adamax", "Adamax"),
    "adagrad": Capabilities(False, (), "adagrad", None),
    "adagrad_torch": Capabilities(False, (), None, "Adagrad"),
    "rmsprop": Capabilities(False, (), "rmsprop", None),
    "rmsprop_torch_momentum": Capabilities(False, (), None, "RMSprop"),
    "rmsprop_centered_momentum": Capabilities(False, (), "rmsprop", None),
    "sigma_filter": Capabilities(True, SIGMA_STATE, None, None),
    "sigma_filter_momentum": Capabilities(True, SIGMA_STATE, None, None),
    "variational_sigma_filter": Capabilities(True, SIGMA_STATE, None, None),
    "variational_newton": Capabilities(False, SIGMA_STATE, None, None),
    "sigma_fixed_point": Capabilities(True, SIGMA_STATE, None, None),
}
assert CAPABILITIES.keys() == OPTIMIZERS.keys(), "every optimizer states its capabilities"


def with_native() -> list[str]:
    return sorted(n for n, c in CAPABILITIES.items() if c.native)


def with_eight_bit() -> list[str]:
    return sorted(n for n, c in CAPABILITIES.items() if c.eight_bit)


def make_eight_bit(name, fmt, **overrides):
    """The optimizer with every state buffer that can be in ``fmt``'s storage stored so."""
    return make(name, **{arg: fmt for arg in CAPABILITIES[name].eight_bit}, **overrides)


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


def slow_except(all_names, keep) -> list:
    """``all_names`` for ``parametrize``: those outside ``keep`` carry the ``slow`` marker."""
    return [n if n in keep else pytest.param(n, marks=pytest.mark.slow) for n in all_names]


def names() -> list:
    """Every name of :data:`OPTIMIZERS`, sorted; outside :data:`INNER_LOOP` marked ``slow``."""
    return slow_except(sorted(OPTIMIZERS), INNER_LOOP)


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
