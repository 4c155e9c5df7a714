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
from bounds import check_trajectory, rejects, track
from conftest import grad_stream
from helpers import run_updates

import bayesopt_jax as bj


def _momentum(updates, mu):
    trace, out = np.zeros_like(updates[0]), []
    for u in updates:
        trace = mu * trace + u
        out.append(trace)
    return out


# name: (ours, Optax's, the float64 transcription of the update before -lr,
#        the same with a parameter that is slightly off)
SAME = {
    "adam": (
        lambda: bj.adam(1e-2, 0.9, 0.99, 1e-8, 1e-9),
        lambda: optax.adam(1e-2, 0.9, 0.99, 1e-8, 1e-9),
        lambda g, p, d=0.0: ref.adam(g, 0.9, 0.99 + d, 1e-8, 1e-9),
    ),
    "nadam": (
        lambda: bj.adam(1e-2, nesterov=True),
        lambda: optax.adam(1e-2, nesterov=True),
        lambda g, p, d=0.0: ref.adam(g, 0.9 + d, nesterov=True),
    ),
    "adamw": (
        lambda: bj.adamw(1e-2, weight_decay=0.1),
        lambda: optax.adamw(1e-2, weight_decay=0.1),
        lambda g, p, d=0.0: [u + (0.1 + d) * p for u in ref.adam(g)],
    ),
    "amsgrad_corrected": (
        lambda: bj.amsgrad(1e-2, max_of="corrected"),
        lambda: optax.amsgrad(1e-2),
        lambda g, p, d=0.0: ref.amsgrad(g, 0.9, 0.999 + d, max_of="corrected"),
    ),
    "adamax": (
        lambda: bj.adamax(2e-3),
        lambda: optax.adamax(2e-3),
        lambda g, p, d=0.0: ref.adamax(g, 0.9 + d),
        2e-3,
    ),
    "rmsprop_eps_in_sqrt": (
        lambda: bj.rmsprop(1e-2, 0.9, 1e-8, eps_in_sqrt=True),
        lambda: optax.rmsprop(1e-2, 0.9, 1e-8),
        lambda g, p, d=0.0: ref.rms(g, 0.9 + d, 1e-8, eps_in_sqrt=True),
    ),
    "rmsprop_centered_momentum_eps_in_sqrt": (
        lambda: bj.rmsprop(1e-2, 0.9, 1e-4, eps_in_sqrt=True, centered=True, momentum=0.9),
        lambda: optax.rmsprop(1e-2, 0.9, 1e-4, centered=True, momentum=0.9),
        lambda g, p, d=0.0: _momentum(
            ref.rms(g, 0.9, 1e-4, eps_in_sqrt=True, centered=True), 0.9 + d
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(SAME))
def test_same_as_optax(x64, rng, name):
    ours, theirs, transcription, *lr = SAME[name]
    lr = lr[0] if lr else 1e-2
    grads = grad_stream(rng, steps=200)
    params = jnp.asarray(rng.normal(size=5))
    got, _ = run_updates(ours(), grads, params)
    want, _ = run_updates(theirs(), grads, params)
    exact = [-lr * u for u in transcription(track(grads), track(np.asarray(params)))]
    check_trajectory(got, exact, "ours")
    check_trajectory(want, exact, "optax")
    wrong = [-lr * u for u in transcription(track(grads), track(np.asarray(params)), 1e-9)]
    assert rejects(got, wrong)


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


def test_float32_within_the_float32_rounding_bound(rng):
    """In float32, our Adam and Optax's stay within float32's bound of the transcription."""
    grads = grad_stream(rng, shape=(64,), steps=100, dtype=np.float32)
    got, _ = run_updates(bj.scale_by_adam(), grads)
    theirs, _ = run_updates(optax.scale_by_adam(), grads)
    want = ref.adam(track(grads, np.float32))
    check_trajectory(got, want, "ours")
    check_trajectory(theirs, want, "optax")
    assert rejects(got, ref.adam(track(grads, np.float32), b1=0.9 + 1e-5))
