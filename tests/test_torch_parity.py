"""Trajectories of our optimizers against ``torch.optim`` in float64.

Both sides minimise the same non-quadratic loss from the same start, with
gradients computed by each framework's own autodiff, and must agree to about
1e-12 relative at every one of 300 steps.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bayesopt_jax as bj

torch = pytest.importorskip("torch")

STEPS = 300
RTOL = 1e-12


def _problem(seed=0, n=16):
    rng = np.random.default_rng(seed)
    # Curvature a - 9 c sin(3θ) stays positive, so the dynamics contract and
    # rounding differences cannot be amplified into a spurious mismatch.
    a = rng.uniform(1.0, 3.0, size=n)
    c = rng.uniform(-0.1, 0.1, size=n)
    theta0 = rng.normal(size=n) * 2.0
    return a, c, theta0


def _torch_traj(make_opt, a, c, theta0):
    # PyTorch keeps some scalar state (NAdam's momentum product) in the default
    # dtype; make it float64 so both sides compute in double precision.
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return _torch_traj64(make_opt, a, c, theta0)
    finally:
        torch.set_default_dtype(previous)


def _torch_traj64(make_opt, a, c, theta0):
    p = torch.tensor(theta0, dtype=torch.float64, requires_grad=True)
    at, ct = torch.tensor(a), torch.tensor(c)
    opt = make_opt([p])
    traj = []
    for _ in range(STEPS):
        opt.zero_grad()
        loss = (0.5 * at * p**2 + ct * torch.sin(3 * p)).sum()
        loss.backward()
        opt.step()
        traj.append(p.detach().numpy().copy())
    return np.array(traj)


def _jax_traj(tx, a, c, theta0):
    a, c = jnp.asarray(a), jnp.asarray(c)

    def loss(p):
        return jnp.sum(0.5 * a * p**2 + c * jnp.sin(3 * p))

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = jnp.asarray(theta0)
    s = tx.init(p)
    traj = []
    for _ in range(STEPS):
        p, s = step(p, s)
        traj.append(np.asarray(p))
    return np.array(traj)


CASES = {
    "adam": (
        lambda: bj.adam(3e-2, 0.9, 0.99, 1e-8),
        lambda ps: torch.optim.Adam(ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8),
    ),
    "adam_nesterov": (
        lambda: bj.adam(3e-2, 0.9, 0.99, 1e-8, nesterov=True),
        lambda ps: torch.optim.NAdam(ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8, momentum_decay=1e9),
    ),
    "adamw": (
        lambda: bj.adamw(3e-2, 0.9, 0.999, 1e-8, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
    ),
    "amsgrad_raw": (
        lambda: bj.amsgrad(3e-2, 0.9, 0.99, 1e-8, max_of="raw"),
        lambda ps: torch.optim.Adam(ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8, amsgrad=True),
    ),
    "adamw_amsgrad": (
        lambda: optax.chain(
            bj.scale_by_amsgrad(0.9, 0.99, 1e-8),
            bj.add_decoupled_weight_decay(0.05),
            optax.scale_by_learning_rate(3e-2),
        ),
        lambda ps: torch.optim.AdamW(
            ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, amsgrad=True
        ),
    ),
    "adamax": (
        lambda: bj.adamax(2e-2, 0.9, 0.999, 1e-8),
        lambda ps: torch.optim.Adamax(ps, lr=2e-2, betas=(0.9, 0.999), eps=1e-8),
    ),
    "adagrad": (
        lambda: bj.adagrad(0.1, initial_accumulator_value=0.1, eps=1e-10),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, eps=1e-10),
    ),
    "rmsprop": (
        lambda: bj.rmsprop(1e-2, decay=0.99, eps=1e-8),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, alpha=0.99, eps=1e-8),
    ),
    "rmsprop_centered_momentum": (
        lambda: bj.rmsprop(5e-3, decay=0.9, eps=1e-6, centered=True, momentum=0.9),
        lambda ps: torch.optim.RMSprop(
            ps, lr=5e-3, alpha=0.9, eps=1e-6, centered=True, momentum=0.9
        ),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_torch(x64, name):
    ours, theirs = CASES[name]
    a, c, theta0 = _problem()
    want = _torch_traj(theirs, a, c, theta0)
    got = _jax_traj(ours(), a, c, theta0)
    # The loss must actually have been optimised (a trajectory that went
    # nowhere would agree trivially).
    assert np.abs(got[-1] - theta0).max() > 0.1
    # Relative error, with entries that cross zero measured against 1% of the
    # parameters' O(1) scale instead of against their own tiny magnitude.
    rel = np.abs(got - want) / np.maximum(np.abs(want), 1e-2)
    assert rel.max() < RTOL, f"{name}: max relative error {rel.max():.3e}"
    norm_rel = np.linalg.norm(got - want, axis=1) / np.linalg.norm(want, axis=1)
    assert norm_rel.max() < RTOL
