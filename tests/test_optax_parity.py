"""With Optax's arguments, every name we share with Optax follows Optax's trajectory.

Both trajectories are checked against one float64 transcription of the
update, within the rounding bound. Where a keyword selects PyTorch's
convention instead (``eps_in_sqrt=False``, ``max_of="raw"``), the test shows
that the difference is real.
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


def _momentum(updates, mu, nesterov=False):
    trace, out = np.zeros_like(updates[0]), []
    for u in updates:
        trace = mu * trace + u
        out.append(u + mu * trace if nesterov else trace)
    return out


# A decay schedule whose values are exact in every precision, so that the
# transcription can use them as numbers: 1/8, 1/16 from step 50, 1/32 from 120.
_DECAY = optax.piecewise_constant_schedule(0.125, {50: 0.5, 120: 0.5})


def _decay_at(t):
    """The decay applied at the update with step count t (0-based)."""
    return 0.125 * (0.5 if t >= 50 else 1.0) * (0.5 if t >= 120 else 1.0)


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
    "adamw_scheduled_decay": (
        lambda: bj.adamw(1e-2, weight_decay=_DECAY),
        lambda: optax.adamw(1e-2, weight_decay=_DECAY),
        lambda g, p, d=0.0: [u + (_decay_at(t) + d) * p for t, u in enumerate(ref.adam(g))],
    ),
    "adagrad": (
        lambda: bj.adagrad(0.1),
        lambda: optax.adagrad(0.1),
        lambda g, p, d=0.0: ref.rss(g, 0.1 + d, 1e-7, eps_in_sqrt=True),
        0.1,
    ),
    "amsgrad_reddi": (
        lambda: bj.amsgrad(1e-2, bias_correction_mu=False, bias_correction_nu=False),
        lambda: optax.amsgrad(1e-2, bias_correction_mu=False, bias_correction_nu=False),
        lambda g, p, d=0.0: ref.amsgrad(g, 0.9, 0.999 + d, 1e-8, 0.0, "corrected", False, False),
    ),
    "amsgrad": (
        lambda: bj.amsgrad(1e-2),
        lambda: optax.amsgrad(1e-2),
        lambda g, p, d=0.0: ref.amsgrad(g, 0.9, 0.999 + d, max_of="corrected"),
    ),
    "adamax": (
        lambda: bj.adamax(2e-3),
        lambda: optax.adamax(2e-3),
        lambda g, p, d=0.0: ref.adamax(g, 0.9 + d),
        2e-3,
    ),
    "rmsprop": (
        lambda: bj.rmsprop(1e-2, 0.9, 1e-8),
        lambda: optax.rmsprop(1e-2, 0.9, 1e-8),
        lambda g, p, d=0.0: ref.rms(g, 0.9 + d, 1e-8, eps_in_sqrt=True),
    ),
    "rmsprop_all_options": (
        lambda: bj.rmsprop(1e-2, 0.9, 1e-4, 0.5, False, False, 0.8, True, True),
        lambda: optax.rmsprop(1e-2, 0.9, 1e-4, 0.5, False, False, 0.8, True, True),
        lambda g, p, d=0.0: _momentum(
            ref.rms(g, 0.9, 1e-4, False, True, False, 0.5 + d), 0.8, nesterov=True
        ),
    ),
    "rmsprop_centered_momentum": (
        lambda: bj.rmsprop(1e-2, 0.9, 1e-4, centered=True, momentum=0.9),
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
        (
            lambda: bj.adagrad(0.1, 0.0, 1e-2, eps_in_sqrt=False),
            lambda: optax.adagrad(0.1, 0.0, 1e-2),
        ),
        (
            lambda: bj.rmsprop(1e-2, 0.9, 1e-2, eps_in_sqrt=False),
            lambda: optax.rmsprop(1e-2, 0.9, 1e-2),
        ),
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
