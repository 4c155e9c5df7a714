"""Trajectories of our optimizers against ``torch.optim`` in float64.

Both sides minimise the same non-quadratic loss from the same start, with
gradients computed by each framework's own autodiff, and must agree at every
one of 300 steps within a forward error bound of the trajectory:

    E_{t+1} = |J_t|·E_t + |∂z'/∂g|·e_g + K·u·(2|z_t| + |z_{t+1}|)

(:func:`bounds.trajectory_bound`), where ``z`` is the parameters and the
optimizer's float state, ``J_t`` the Jacobian of one step, the last term the
rounding of one step (at most ``K = 20`` rounded operations on each
component) and ``e_g = 8u·(|aθ| + 3|c|)`` the rounding of the gradient. Each
side is within ``E_t`` of the exact trajectory, so they differ by at most
``2·E_t``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bounds import U64, record_ratio, trajectory_bound

import bayesopt_jax as bj

torch = pytest.importorskip("torch")

STEPS = 300


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


# name: (ours at a learning rate, torch's, the learning rate)
CASES = {
    "adam": (
        lambda lr: bj.adam(lr, 0.9, 0.99, 1e-8),
        lambda ps: torch.optim.Adam(ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8),
        3e-2,
    ),
    "adam_nesterov": (
        lambda lr: bj.adam(lr, 0.9, 0.99, 1e-8, nesterov=True),
        lambda ps: torch.optim.NAdam(ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8, momentum_decay=1e9),
        3e-2,
    ),
    "adamw": (
        lambda lr: bj.adamw(lr, 0.9, 0.999, 1e-8, weight_decay=0.1),
        lambda ps: torch.optim.AdamW(ps, lr=3e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1),
        3e-2,
    ),
    "amsgrad_raw": (
        lambda lr: bj.amsgrad(lr, 0.9, 0.99, 1e-8, max_of="raw"),
        lambda ps: torch.optim.Adam(ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8, amsgrad=True),
        3e-2,
    ),
    "adamw_amsgrad": (
        lambda lr: optax.chain(
            bj.scale_by_amsgrad(0.9, 0.99, 1e-8, max_of="raw"),
            bj.add_decoupled_weight_decay(0.05),
            optax.scale_by_learning_rate(lr),
        ),
        lambda ps: torch.optim.AdamW(
            ps, lr=3e-2, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.05, amsgrad=True
        ),
        3e-2,
    ),
    "adamax": (
        lambda lr: bj.adamax(lr, 0.9, 0.999, 1e-8),
        lambda ps: torch.optim.Adamax(ps, lr=2e-2, betas=(0.9, 0.999), eps=1e-8),
        2e-2,
    ),
    "adagrad": (
        lambda lr: bj.adagrad(lr, initial_accumulator_value=0.1, eps=1e-10, eps_in_sqrt=False),
        lambda ps: torch.optim.Adagrad(ps, lr=0.1, initial_accumulator_value=0.1, eps=1e-10),
        0.1,
    ),
    "rmsprop": (
        lambda lr: bj.rmsprop(lr, decay=0.99, eps=1e-8, eps_in_sqrt=False),
        lambda ps: torch.optim.RMSprop(ps, lr=1e-2, alpha=0.99, eps=1e-8),
        1e-2,
    ),
    "rmsprop_centered_momentum": (
        lambda lr: bj.rmsprop(
            lr, decay=0.9, eps=1e-6, eps_in_sqrt=False, centered=True, momentum=0.9
        ),
        lambda ps: torch.optim.RMSprop(
            ps, lr=5e-3, alpha=0.9, eps=1e-6, centered=True, momentum=0.9
        ),
        5e-3,
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_trajectory_matches_torch(x64, name):
    ours, theirs, lr = CASES[name]
    a, c, theta0 = _problem()
    want = _torch_traj(theirs, a, c, theta0)
    got = _jax_traj(ours(lr), a, c, theta0)
    # The loss must actually have been optimised (a trajectory that went
    # nowhere would agree trivially).
    assert np.abs(got[-1] - theta0).max() > 0.1
    bound = 2 * _error_bound(ours(lr), a, c, theta0)
    ratio = np.abs(got - want) / bound
    record_ratio(float(ratio.max()))
    assert ratio.max() <= 1, (
        f"{name}: error/bound {ratio.max():.3g} at step {ratio.max(1).argmax() + 1}"
    )
    # ... and the bound is sharp enough to see a learning rate off by 1e-9.
    other = _jax_traj(ours(lr * (1 + 1e-9)), a, c, theta0)
    assert np.any(np.abs(other - want) > bound)


def _error_bound(tx, a, c, theta0):
    """E_t of the module docstring for the parameters, at each step."""
    a, c = jnp.asarray(a), jnp.asarray(c)

    def grad(p, _):
        return a * p + 3 * c * jnp.cos(3 * p)

    def grad_error(p, _):
        return 8 * U64 * (jnp.abs(a * p) + 3 * jnp.abs(c))

    bounds = trajectory_bound(tx, jnp.asarray(theta0), grad, grad_error, [None] * STEPS)
    return np.array([p for p, _ in bounds])
