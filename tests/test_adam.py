"""The Adam-family transformations against float64 NumPy transcriptions."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import reference as ref
from bounds import check, check_trajectory, output, rejects, track
from conftest import grad_stream
from helpers import run_updates

import bayesopt_jax as bj


@pytest.mark.parametrize(
    "b1,b2,eps,eps_root,bias_correction,nesterov",
    [
        (0.9, 0.999, 1e-8, 0.0, True, False),
        (0.5, 0.9, 1e-3, 1e-6, True, False),
        (0.0, 0.99, 1e-8, 0.0, True, False),
        (0.9, 0.999, 1e-8, 0.0, True, True),
        (0.8, 0.95, 1e-6, 0.0, False, False),
        (0.8, 0.95, 1e-6, 0.0, False, True),
    ],
)
def test_scale_by_adam_matches_reference(
    x64, rng, b1, b2, eps, eps_root, bias_correction, nesterov
):
    grads = grad_stream(rng, steps=200)
    tx = bj.scale_by_adam(b1, b2, eps, eps_root, bias_correction=bias_correction, nesterov=nesterov)
    got, state = run_updates(tx, grads)
    want = ref.adam(track(grads), b1, b2, eps, eps_root, bias_correction, nesterov)
    check_trajectory(got, want)
    assert int(state.count) == 200
    # The bound is sharp: b1 off by one part in a billion is rejected.
    wrong = ref.adam(track(grads), b1 + 1e-9, b2, eps, eps_root, bias_correction, nesterov)
    assert rejects(got, wrong)


@pytest.mark.parametrize("max_of", ["raw", "corrected"])
@pytest.mark.parametrize("bc_mu,bc_nu", [(True, True), (False, False), (True, False)])
def test_scale_by_amsgrad_conventions(x64, rng, max_of, bc_mu, bc_nu):
    # Large early gradients, then small ones: the running max matters.
    grads = grad_stream(rng, steps=40, scale=10.0) + grad_stream(rng, steps=160, scale=0.1)
    tx = bj.scale_by_amsgrad(0.9, 0.99, 1e-8, 0.0, None, bc_mu, bc_nu, max_of=max_of)
    got, _ = run_updates(tx, grads)
    want = ref.amsgrad(track(grads), 0.9, 0.99, 1e-8, 0.0, max_of, bc_mu, bc_nu)
    check_trajectory(got, want)
    assert rejects(
        got, ref.amsgrad(track(grads), 0.9, 0.99 + 1e-9, 1e-8, 0.0, max_of, bc_mu, bc_nu)
    )


def test_amsgrad_conventions_really_differ(x64, rng):
    grads = grad_stream(rng, steps=20, scale=10.0) + grad_stream(rng, steps=80, scale=0.1)
    reddi = dict(bias_correction_mu=False, bias_correction_nu=False)
    outs = [
        run_updates(bj.scale_by_amsgrad(**kw), grads)[0][-1]
        for kw in [dict(max_of="raw"), dict(max_of="corrected"), reddi]
    ]
    for a, b in itertools.combinations(outs, 2):
        assert np.max(np.abs(a - b) / np.abs(b)) > 1e-3


@pytest.mark.parametrize("b1,b2,eps", [(0.9, 0.999, 1e-8), (0.5, 0.9, 1e-3), (0.0, 0.99, 0.0)])
def test_scale_by_adamax_matches_reference(x64, rng, b1, b2, eps):
    grads = grad_stream(rng, steps=200)
    got, _ = run_updates(bj.scale_by_adamax(b1, b2, eps), grads)
    check_trajectory(got, ref.adamax(track(grads), b1, b2, eps))
    assert rejects(got, ref.adamax(track(grads), b1 + 1e-9, b2, eps))


@pytest.mark.parametrize(
    "decay,eps,eps_in_sqrt,bias_correction,centered",
    list(itertools.product([0.9, 0.99], [1e-8, 1e-2], [False, True], [False, True], [False, True])),
)
def test_scale_by_rms_matches_reference(
    x64, rng, decay, eps, eps_in_sqrt, bias_correction, centered
):
    grads = grad_stream(rng, steps=100)
    init = 0.25 if decay == 0.9 else 0.0  # initial_scale is a real starting value
    tx = bj.scale_by_rms(decay, eps, init, eps_in_sqrt, bias_correction, centered=centered)
    got, state = run_updates(tx, grads)
    want = ref.rms(track(grads), decay, eps, eps_in_sqrt, bias_correction, centered, init)
    # At t = 1 with centering and bias correction, v̂ - m̂² is 0 in exact
    # arithmetic: the bound then covers rounding noise divided by √eps.
    check_trajectory(got, want)
    assert rejects(
        got,
        ref.rms(track(grads), decay + 1e-9, eps, eps_in_sqrt, bias_correction, centered, init),
    )
    # Optax's state classes: mu only when centered, count only with bias correction.
    assert ("mu" in state._fields) == centered
    assert ("count" in state._fields) == bias_correction


@pytest.mark.parametrize("eps_in_sqrt", [True, False])
@pytest.mark.parametrize("init,eps", [(0.0, 1e-10), (0.1, 1e-7), (1.0, 0.0)])
def test_scale_by_rss_matches_reference(x64, rng, init, eps, eps_in_sqrt):
    grads = grad_stream(rng, steps=200)
    if init == 0.0:  # a zero gradient on a fresh accumulator: Optax's 0, PyTorch's 0/eps
        grads[0][0] = 0.0
    got, _ = run_updates(bj.scale_by_rss(init, eps, eps_in_sqrt=eps_in_sqrt), grads)
    check_trajectory(got, ref.rss(track(grads), init, eps, eps_in_sqrt))
    assert rejects(got, ref.rss(track(grads), init + 1e-9, eps * (1 + 1e-3), eps_in_sqrt))


def test_first_adam_step_is_sign_and_zero_gradient_is_zero():
    g = np.array([1e-3, -5.0, 0.0], np.float32)
    u, _ = run_updates(bj.scale_by_adam(), [g])
    # g/(|g| + eps): ±(1 - 1e-5) and ±(1 - 2e-9) in exact arithmetic, 0 for g = 0.
    check(u[0], ref.adam(track([g], np.float32))[0])
    assert u[0][2] == 0.0


def test_complex_parameters(x64, rng):
    """Second moments from |g|², first moments complex (as Optax and PyTorch)."""
    grads = [
        (rng.normal(size=4) + 1j * rng.normal(size=4)).astype(np.complex128) for _ in range(50)
    ]
    params = jnp.zeros(4, jnp.complex128)
    got, state = run_updates(bj.scale_by_adam(), grads, params)
    check_trajectory(got, ref.adam(track(grads)))
    assert state.mu.dtype == jnp.complex128
    assert state.nu.dtype == jnp.float64
    for tx in [bj.scale_by_amsgrad(), bj.scale_by_rms(centered=True), bj.scale_by_rss()]:
        got, _ = run_updates(tx, grads, params)
        assert got[-1].dtype == np.complex128
        assert np.all(np.isfinite(got[-1]))
    # RMS of a complex stream matches the |g|² transcription.
    got, _ = run_updates(bj.scale_by_rss(), grads, params)
    check_trajectory(got, ref.rss(track(grads), 0.1, 1e-7, eps_in_sqrt=True))


@pytest.mark.parametrize("param_dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("state_dtype", [None, jnp.bfloat16, jnp.float32])
def test_state_and_update_dtypes(rng, param_dtype, state_dtype):
    params = {"w": jnp.zeros((3, 2), param_dtype), "b": jnp.zeros(2, param_dtype)}
    tx = bj.scale_by_adam(mu_dtype=state_dtype, nu_dtype=state_dtype)
    state = tx.init(params)
    expect = param_dtype if state_dtype is None else state_dtype
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), p.dtype), params)
    upd = jax.jit(tx.update)
    for _ in range(3):
        u, state = upd(grads, state)
    for leaf in jax.tree.leaves(state.mu) + jax.tree.leaves(state.nu):
        assert leaf.dtype == expect
    for leaf in jax.tree.leaves(u):
        assert leaf.dtype == param_dtype
        assert bool(jnp.all(jnp.isfinite(leaf)))


def test_low_precision_arithmetic_is_float32():
    """fp16 gradients whose squares underflow in fp16 still give Adam's first step."""
    g = jnp.array([1e-5, -3e-5], jnp.float16)  # g² ~ 1e-10 underflows in fp16
    tx = bj.scale_by_adam(nu_dtype=jnp.float32)
    u, state = tx.update(g, tx.init(jnp.zeros(2, jnp.float16)))
    assert u.dtype == jnp.float16
    # g/(|g| + eps) computed in float32, then rounded once to fp16.
    want = output(ref.adam(track([np.asarray(g, np.float32)], np.float32))[0], np.float16)
    check(np.asarray(u, np.float32), want)
    assert float(state.nu[0]) > 0
    # eps is applied in float32 arithmetic, so it does not underflow to 0 in fp16:
    tx = bj.scale_by_rms(decay=0.0, eps=1e-8)
    u, _ = tx.update(jnp.zeros(2, jnp.float16), tx.init(jnp.zeros(2, jnp.float16)))
    assert bool(jnp.all(u == 0))
