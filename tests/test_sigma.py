"""The σ-filter against float64 transcriptions, closed forms and its hazards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from conftest import grad_stream
from helpers import assert_trajectory_close, run_updates

import bayesopt_jax as bj
from bayesopt_jax._src.sigma import full_posterior_step


@pytest.mark.parametrize(
    "eta,beta,b1,sigma_init,bias_correction",
    [
        (1e-3, 0.999, 0.0, None, True),
        (1e-2, 0.9, 0.0, 0.5, True),
        (0.3, 0.99, 0.9, None, True),
        (3.0, 0.9, 0.5, 1e-3, True),
        (1e-2, 0.95, 0.9, 2.0, False),
        (0.0, 0.9, 0.0, 1.0, True),
    ],
)
def test_filter_matches_reference(x64, rng, eta, beta, b1, sigma_init, bias_correction):
    grads = grad_stream(rng, steps=150)
    tx = bj.scale_by_sigma_filter(
        eta, beta, b1=b1, sigma_init=sigma_init, bias_correction=bias_correction
    )
    params = jnp.zeros(5)
    state = tx.init(params)
    upd = jax.jit(tx.update)
    want_u, want_s = ref.sigma_filter(grads, eta, beta, b1, sigma_init, bias_correction)
    for t, g in enumerate(grads):
        u, state = upd(jnp.asarray(g), state)
        np.testing.assert_allclose(state.sigma, want_s[t], rtol=1e-12, err_msg=f"σ, step {t + 1}")
        np.testing.assert_allclose(u, want_u[t], rtol=1e-12, err_msg=f"u, step {t + 1}")


@pytest.mark.parametrize("max_ratio", [1.0, 2.0])
def test_guarded_filter_matches_reference(x64, rng, max_ratio):
    # Zeros, then gradients: the guard is active at the transition.
    grads = [np.zeros(5)] * 30 + grad_stream(rng, steps=100, scale=1e-3)
    tx = bj.scale_by_sigma_filter(1e-2, 0.99, max_ratio=max_ratio)
    got, _ = run_updates(tx, grads)
    want, _ = ref.sigma_filter(grads, 1e-2, 0.99, max_ratio=max_ratio)
    assert_trajectory_close(got, want, 1e-12)


@pytest.mark.parametrize("eta", [1e-3, 0.1, 10.0])
@pytest.mark.parametrize("sigma_init", [1e-6, 1.0, 1e3])
def test_converges_to_closed_form_fixed_point(x64, eta, sigma_init):
    g = np.array([0.05, 0.1, 1.0, 30.0])
    tx = bj.scale_by_sigma_filter(eta, beta=0.9, sigma_init=sigma_init)
    # Constant |g|: ŝ = g² exactly (bias-corrected). The slowest coordinate
    # relaxes on a time scale of about 1/(2η√ŝ) steps, hence many steps.
    run = jax.jit(
        lambda s: jax.lax.fori_loop(0, 300_000, lambda _, s: tx.update(jnp.asarray(g), s)[1], s)
    )
    state = run(tx.init(jnp.zeros(4)))
    star = eta**2 / 2 + eta * np.sqrt(eta**2 / 4 + 1 / g**2)
    np.testing.assert_allclose(state.sigma, star, rtol=1e-6)
    np.testing.assert_allclose(bj.sigma_star(jnp.asarray(g**2), eta), star, rtol=1e-12)


def test_regimes_small_and_large_eta(x64):
    s = jnp.logspace(-6, 6, 25)
    small = 1e-9  # η√ŝ ≤ 1e-6: the η²/2 term is negligible
    np.testing.assert_allclose(bj.sigma_star(s, small), small / jnp.sqrt(s), rtol=1e-5)
    large = 1e5
    np.testing.assert_allclose(bj.sigma_star(s, large), large**2, rtol=1e-2)
    # The fixed-point optimizer is RMSProp (η/√ŝ) and SGD (η²) in those regimes.
    grads = [np.array([0.5, -2.0, 3.0])] * 5
    u, _ = run_updates(bj.scale_by_sigma_fixed_point(1e-4, beta=0.9), grads)
    np.testing.assert_allclose(u[-1], 1e-4 * np.sign(grads[0]), rtol=1e-3)
    u, _ = run_updates(bj.scale_by_sigma_fixed_point(1e3, beta=0.9), grads)
    np.testing.assert_allclose(u[-1], 1e6 * grads[0], rtol=1e-3)


def test_fixed_point_optimizer_matches_reference(x64, rng):
    grads = grad_stream(rng, steps=100)
    for eta, b1 in [(1e-2, 0.0), (0.5, 0.9)]:
        got, state = run_updates(bj.scale_by_sigma_fixed_point(eta, 0.99, b1=b1), grads)
        m = np.zeros(5)
        s = np.zeros(5)
        for t, g in enumerate(grads, start=1):
            s = 0.99 * s + 0.01 * g * g
            s_hat = s / (1 - 0.99**t) + 1e-16
            star = eta**2 / 2 + eta * np.sqrt(eta**2 / 4 + 1 / s_hat)
            m = b1 * m + (1 - b1) * g
            d = m / (1 - b1**t) if b1 else g
            np.testing.assert_allclose(got[t - 1], star * d, rtol=1e-12)
        np.testing.assert_allclose(state.sigma, star, rtol=1e-12)


def test_eta_zero_accumulates_precision_exactly(x64, rng):
    grads = grad_stream(rng, steps=300)
    tx = bj.scale_by_sigma_filter(0.0, beta=0.9, sigma_init=2.0)
    _, state = run_updates(tx, grads)
    s, precision = np.zeros(5), np.full(5, 0.5)
    for t, g in enumerate(grads, start=1):
        s = 0.9 * s + 0.1 * g * g
        precision += s / (1 - 0.9**t) + 1e-16
    np.testing.assert_allclose(1 / state.sigma, precision, rtol=1e-12)
    # σ_t ≈ 1/(t·G): the 1/t natural-gradient learning rate.
    assert np.all(state.sigma < 2.0 / 10)


def test_eta_zero_requires_sigma_init():
    with pytest.raises(ValueError, match="`eta`"):
        bj.scale_by_sigma_filter(0.0)
    bj.scale_by_sigma_filter(0.0, sigma_init=1.0)  # fine


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        (dict(eta=-1e-3), "eta"),
        (dict(eta=1e-3, beta=1.0), "beta"),
        (dict(eta=1e-3, b1=-0.1), "b1"),
        (dict(eta=1e-3, eps=0.0), "eps"),
        (dict(eta=1e-3, sigma_init=0.0), "sigma_init"),
        (dict(eta=1e-3, sigma_max=-1.0), "sigma_max"),
        (dict(eta=1e-3, max_ratio=0.5), "max_ratio"),
    ],
)
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        bj.scale_by_sigma_filter(**kwargs)
    if arg in ("eta", "beta", "b1", "eps"):
        with pytest.raises(ValueError, match=f"`{arg}`"):
            bj.sigma_fixed_point(**kwargs)


def test_hazard_raw_recursion_and_guards():
    """Zero evidence, then a small gradient: the raw step explodes, the guard bounds it."""
    eta, beta = 3e-3, 0.999
    grads = [np.zeros(3, np.float32)] * 2000 + [np.full(3, 1e-3, np.float32)]
    raw, state = run_updates(bj.scale_by_sigma_filter(eta, beta), grads)
    assert np.all(np.isfinite(state.sigma))
    # Raw: σ started at σ*(eps) and kept growing; the first real step is huge.
    assert np.abs(raw[-1]).max() > 1e3 * eta
    for tx in [bj.sigma_filter(eta, beta), bj.sigma_filter(eta, beta, b1=0.9)]:
        got, state = run_updates(tx, grads)
        step = np.abs(got[-1]).max()
        # ≤ κ = 2 times an RMSProp step bound η|g|/sqrt((1-β)g²) (+ tiny η² term).
        assert step <= 2 * (eta / np.sqrt(1 - beta) + eta**2 * 1e-3) * 1.001
        assert np.all(np.isfinite(np.asarray(jax.tree.leaves(state)[-1])))
    fp, _ = run_updates(bj.sigma_fixed_point(eta, beta), grads)
    assert np.abs(fp[-1]).max() <= (eta / np.sqrt(1 - beta) + eta**2) * 1.001


def test_no_nan_for_zero_gradients_ever():
    for tx in [
        bj.scale_by_sigma_filter(1e-3),
        bj.scale_by_sigma_filter(1e-3, sigma_init=1.0, b1=0.9),
        bj.scale_by_sigma_fixed_point(1e-3, b1=0.9),
        bj.sigma_filter(),
    ]:
        got, state = run_updates(tx, [np.zeros(4, np.float32)] * 50)
        assert np.all(np.asarray(got) == 0)
        for leaf in jax.tree.leaves(state):
            assert np.all(np.isfinite(np.asarray(leaf)))


def test_eta_schedule_is_used():
    sched = optax.exponential_decay(1e-2, transition_steps=1, decay_rate=0.5)
    tx = bj.scale_by_sigma_fixed_point(sched, beta=0.0)
    state = tx.init(jnp.zeros(1))
    sig = []
    for _ in range(4):
        _, state = tx.update(jnp.ones(1), state)
        sig.append(float(state.sigma[0]))
    want = [float(bj.sigma_star(jnp.ones(1), 1e-2 * 0.5**k)[0]) for k in range(4)]
    np.testing.assert_allclose(sig, want, rtol=1e-6)


# ----------------------------------------------------------------- full matrix


def test_full_step_converges_to_matrix_fixed_point(x64, rng):
    d = 6
    A = rng.normal(size=(d, d))
    G = A @ A.T / d + 0.1 * np.eye(d)
    for eta in [1e-2, 0.5, 5.0]:
        run = jax.jit(
            lambda S, eta=eta: jax.lax.fori_loop(
                0, 20_000, lambda _, S: full_posterior_step(S, jnp.asarray(G), eta), S
            )
        )
        S = run(jnp.eye(d))
        want = bj.sigma_star_full(jnp.asarray(G), eta)
        np.testing.assert_allclose(S, want, rtol=1e-8, atol=1e-12)
        # ... which satisfies the defining equation Σ = (G + Σ⁻¹)⁻¹ + η² I.
        Sw = np.asarray(want)
        np.testing.assert_allclose(
            Sw, np.linalg.inv(G + np.linalg.inv(Sw)) + eta**2 * np.eye(d), rtol=1e-10
        )


def test_full_filter_matches_reference(x64, rng):
    grads = grad_stream(rng, shape=(7,), steps=80)
    tx = bj.scale_by_sigma_filter_full(0.05, beta=0.95, sigma_init=0.5)
    got, state = run_updates(tx, grads)
    want, S = ref.sigma_filter_full(grads, 0.05, 0.95, 0.5)
    assert_trajectory_close(got, want, 1e-9)
    np.testing.assert_allclose(state.sigma, S, rtol=1e-9)


def test_full_filter_with_diagonal_G_equals_diagonal_filter(x64, rng):
    # One non-zero coordinate per step keeps every g gᵀ, hence G, diagonal.
    grads = []
    for t in range(120):
        g = np.zeros(4)
        g[t % 4] = rng.normal() * 2
        grads.append(g)
    params = {"a": jnp.zeros(2), "b": jnp.zeros(2)}
    full = bj.scale_by_sigma_filter_full(0.1, beta=0.9, sigma_init=0.7)
    diag = bj.scale_by_sigma_filter(0.1, beta=0.9, sigma_init=0.7, eps=1e-300)
    fs, ds = full.init(params), diag.init(jnp.zeros(4))
    for g in grads:
        gt = {"a": jnp.asarray(g[:2]), "b": jnp.asarray(g[2:])}
        uf, fs = full.update(gt, fs)
        ud, ds = diag.update(jnp.asarray(g), ds)
        np.testing.assert_allclose(np.concatenate([uf["a"], uf["b"]]), ud, rtol=1e-10, atol=1e-300)
    np.testing.assert_allclose(np.diag(fs.sigma), ds.sigma, rtol=1e-10)
    off = fs.sigma - np.diag(np.diag(fs.sigma))
    assert np.abs(off).max() < 1e-12


def test_full_filter_rejects_wrong_size():
    tx = bj.scale_by_sigma_filter_full(0.1)
    s = tx.init(jnp.zeros(3))
    with pytest.raises(ValueError, match="entries"):
        tx.update(jnp.zeros(4), s)


# ----------------------------------------------------------------- posterior


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: tx,
        lambda tx: optax.chain(optax.clip(1.0), tx),
        lambda tx: optax.apply_if_finite(tx, 3),
        lambda tx: optax.MultiSteps(tx, 1),
        lambda tx: optax.inject_hyperparams(bj.sigma_filter)(eta=1e-2),
        lambda tx: optax.masked(tx, {"w": True, "b": False}),
    ],
    ids=["plain", "chain", "apply_if_finite", "multisteps", "inject", "masked"],
)
def test_posterior_variance_found_through_wrappers(wrap):
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    tx = wrap(bj.sigma_filter(1e-2))
    state = tx.init(params)
    grads = {"w": jnp.full(3, 0.5), "b": jnp.full(2, 0.25)}
    for _ in range(3):
        _, state = tx.update(grads, state, params)
    sig = bj.posterior_variance(state)
    np.testing.assert_allclose(sig["w"], bj.sigma_star(jnp.full(3, 0.25), 1e-2), rtol=1e-4)
    if not isinstance(sig["b"], optax.MaskedNode):
        np.testing.assert_allclose(sig["b"], bj.sigma_star(jnp.full(2, 1 / 16), 1e-2), rtol=1e-4)
    samples = bj.sample_posterior(jax.random.key(0), params, state, num_samples=4)
    assert samples["w"].shape == (4, 3)
    assert samples["b"].shape == (4, 2)


def test_posterior_variance_errors_without_filter():
    with pytest.raises(ValueError, match="found 0"):
        bj.posterior_variance(bj.adam().init(jnp.zeros(2)))


def test_sample_posterior_moments():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    tx = bj.scale_by_sigma_filter(0.0, sigma_init=1.0, beta=0.0)
    _, state = tx.update({"w": jnp.array([1.0, 2.0, 0.0])}, tx.init(params))
    sigma = np.asarray(state.sigma["w"])  # 1/(1+g²): 0.5, 0.2, 1.0
    np.testing.assert_allclose(sigma, [0.5, 0.2, 1.0], rtol=1e-6)
    n = 20000
    draws = bj.sample_posterior(jax.random.key(1), params, state, num_samples=n, scale=0.5)["w"]
    np.testing.assert_allclose(draws.mean(0), params["w"], atol=4 * np.sqrt(0.5 * sigma.max() / n))
    np.testing.assert_allclose(draws.var(0), 0.5 * sigma, rtol=0.05)
    one = bj.sample_posterior(jax.random.key(2), params, state)
    assert one["w"].shape == (3,)


def test_calibration_prefers_mean_when_noise_hurts_and_laplace_scale():
    # A 1-D Gaussian likelihood centred on the trained parameter: any noise
    # lowers the held-out log predictive of a single-sample average.
    params = {"w": jnp.array([0.0])}
    tx = bj.scale_by_sigma_filter(0.0, sigma_init=1.0, beta=0.0)
    _, state = tx.update({"w": jnp.array([1.0])}, tx.init(params))
    y = jnp.zeros(50)

    def loglik(p):
        return -0.5 * (y - p["w"][0]) ** 2 / 0.01

    best, scores = bj.calibrate_posterior_scale(
        jax.random.key(0), params, state, loglik, [1e-4, 1e-2, 1.0], num_samples=8
    )
    assert best == 0.0
    assert np.all(np.diff(np.asarray(scores)) < 0)
    scale = bj.laplace_scale(state, num_data=100, batch_size=10, beta=0.0, prior_precision=2.0)
    # var = 1/(N·B·ŝ + λ) with ŝ = g² = 1
    np.testing.assert_allclose(scale["w"] * state.sigma["w"], 1 / (1000 + 2.0), rtol=1e-6)


def test_filter_eta_schedule_equals_injected_eta(x64, rng):
    """A schedule for η gives the same run as setting η by hand every step."""
    sched = optax.linear_schedule(0.1, 0.01, transition_steps=20)
    grads = grad_stream(rng, steps=30)
    got, _ = run_updates(bj.scale_by_sigma_filter(sched, 0.9), grads)
    tx = optax.inject_hyperparams(bj.scale_by_sigma_filter)(eta=0.1, beta=0.9)
    state = tx.init(jnp.zeros(5))
    for t, g in enumerate(grads):
        state.hyperparams["eta"] = sched(t)
        u, state = tx.update(jnp.asarray(g), state)
        # inject_hyperparams keeps η in float32, hence the tolerance.
        np.testing.assert_allclose(u, got[t], rtol=1e-6)
