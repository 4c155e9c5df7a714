"""Where Optax implements the same algorithm, we follow the same trajectory.

Where it does not (AdaGrad, RMSProp's default eps placement, AMSGrad's raw
maximum), the test shows that the difference is real and comes from the
documented convention alone.
"""

import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from conftest import grad_stream
from helpers import run_updates

import bayesopt_jax as bj

SAME = {
    "adam": (
        lambda: bj.adam(1e-2, 0.9, 0.99, 1e-8, 1e-9),
        lambda: optax.adam(1e-2, 0.9, 0.99, 1e-8, 1e-9),
    ),
    "nadam": (
        lambda: bj.adam(1e-2, nesterov=True),
        lambda: optax.adam(1e-2, nesterov=True),
    ),
    "adamw": (
        lambda: bj.adamw(1e-2, weight_decay=0.1),
        lambda: optax.adamw(1e-2, weight_decay=0.1),
    ),
    "amsgrad_corrected": (
        lambda: bj.amsgrad(1e-2, max_of="corrected"),
        lambda: optax.amsgrad(1e-2),
    ),
    "adamax": (lambda: bj.adamax(2e-3), lambda: optax.adamax(2e-3)),
    "rmsprop_eps_in_sqrt": (
        lambda: bj.rmsprop(1e-2, 0.9, 1e-8, eps_in_sqrt=True),
        lambda: optax.rmsprop(1e-2, 0.9, 1e-8),
    ),
    "rmsprop_centered_momentum_eps_in_sqrt": (
        lambda: bj.rmsprop(1e-2, 0.9, 1e-4, eps_in_sqrt=True, centered=True, momentum=0.9),
        lambda: optax.rmsprop(1e-2, 0.9, 1e-4, centered=True, momentum=0.9),
    ),
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_same_as_optax(x64, rng, name):
    ours, theirs = SAME[name]
    grads = grad_stream(rng, steps=200)
    params = jnp.asarray(rng.normal(size=5))
    got, _ = run_updates(ours(), grads, params)
    want, _ = run_updates(theirs(), grads, params)
    np.testing.assert_allclose(np.array(got), np.array(want), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize(
    "ours,theirs",
    [
        (lambda: bj.adagrad(0.1), lambda: optax.adagrad(0.1)),
        (lambda: bj.rmsprop(1e-2, 0.9, 1e-2), lambda: optax.rmsprop(1e-2, 0.9, 1e-2)),
        (lambda: bj.amsgrad(1e-2, max_of="raw"), lambda: optax.amsgrad(1e-2)),
    ],
)
def test_documented_differences_from_optax(x64, rng, ours, theirs):
    grads = grad_stream(rng, steps=30, scale=10.0) + grad_stream(rng, steps=30, scale=0.01)
    got, _ = run_updates(ours(), grads)
    want, _ = run_updates(theirs(), grads)
    assert np.max(np.abs(np.array(got) - np.array(want))) > 1e-6


def test_float32_at_least_as_accurate_as_optax(rng):
    """In float32, our Adam is as close to the float64 transcription as Optax's."""
    grads = grad_stream(rng, shape=(64,), steps=100, dtype=np.float32)
    got, _ = run_updates(bj.scale_by_adam(), grads)
    theirs, _ = run_updates(optax.scale_by_adam(), grads)
    want = np.array(ref.adam([g.astype(np.float64) for g in grads]))
    err_ours = np.abs(np.array(got) - want).max()
    err_optax = np.abs(np.array(theirs) - want).max()
    assert err_ours < 1e-5
    assert err_ours <= err_optax * 1.01
