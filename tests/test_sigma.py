"""The σ-filter against float64 transcriptions, closed forms and its hazards."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from bounds import U32, U64, Tracked, check, check_trajectory, power, rejects, track
from conftest import grad_stream
from helpers import run_updates

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
    want_u, want_s = ref.sigma_filter(track(grads), eta, beta, b1, sigma_init, bias_correction)
    got_u, got_s = [], []
    for g in grads:
        u, state = upd(jnp.asarray(g), state)
        got_u.append(np.asarray(u))
        got_s.append(np.asarray(state.sigma))
    check_trajectory(got_s, want_s, "σ")
    check_trajectory(got_u, want_u, "u")
    wrong, _ = ref.sigma_filter(track(grads), eta, beta + 1e-9, b1, sigma_init, bias_correction)
    assert rejects(got_u, wrong)


@pytest.mark.parametrize("max_ratio", [1.0, 2.0])
def test_guarded_filter_matches_reference(x64, rng, max_ratio):
    # Zeros, then gradients: the guard is active at the transition.
    grads = [np.zeros(5)] * 30 + grad_stream(rng, steps=100, scale=1e-3)
    tx = bj.scale_by_sigma_filter(1e-2, 0.99, max_ratio=max_ratio)
    got, _ = run_updates(tx, grads)
    want, _ = ref.sigma_filter(track(grads), 1e-2, 0.99, max_ratio=max_ratio)
    check_trajectory(got, want)
    assert rejects(
        got, ref.sigma_filter(track(grads), 1e-2, 0.99, max_ratio=max_ratio * (1 + 1e-9))[0]
    )


CONVERGENCE_STEPS = 300_000
CONVERGENCE_G = np.array([0.05, 0.1, 1.0, 30.0])


def _sigma_star(s, eta):
    return eta**2 / 2 + eta * np.sqrt(eta**2 / 4 + 1 / s)


@pytest.mark.parametrize("eta", [1e-3, 0.1, 10.0])
@pytest.mark.parametrize("sigma_init", [1e-6, 1.0, 1e3])
def test_converges_to_closed_form_fixed_point(x64, eta, sigma_init):
    g = CONVERGENCE_G
    tx = bj.scale_by_sigma_filter(eta, beta=0.9, sigma_init=sigma_init)
    # Constant |g|: ŝ = g² exactly (bias-corrected). The slowest coordinate
    # relaxes on a time scale of about 1/(2η√ŝ) steps, hence many steps.
    run = jax.jit(
        lambda s: jax.lax.fori_loop(
            0, CONVERGENCE_STEPS, lambda _, s: tx.update(jnp.asarray(g), s)[1], s
        )
    )
    state = run(tx.init(jnp.zeros(4)))
    s_hat = g**2 + 1e-16
    star = _sigma_star(s_hat, eta)
    # Near σ* the step σ ↦ 1/(ŝ + 1/σ) + η² contracts by ρ = 1/(1 + ŝσ*)²; a
    # step makes at most 6 roundings of σ*, so the rounding floor is
    # 6u·σ*/(1 - ρ). What is left of the start after n steps is bounded by
    # the same recursion run in NumPy (a few σ* at most after 30 relaxation times).
    rho = 1 / (1 + s_hat * star) ** 2
    floor = 6 * U64 * star / (1 - rho)
    sig = np.full(4, sigma_init)
    for _ in range(2000):  # the transient; after it the contraction bound applies
        sig = 1 / (s_hat + 1 / sig) + eta**2
    remainder = np.abs(sig - star) * np.max(
        np.abs(1 / (1 + s_hat * np.minimum(sig, star)) ** 2)
    ) ** (CONVERGENCE_STEPS - 2000)
    err = np.abs(np.asarray(state.sigma) - star)
    assert np.all(err <= 4 * (floor + remainder)), (err, floor, remainder)
    assert np.any(
        np.abs(np.asarray(state.sigma) - _sigma_star(s_hat, eta * (1 + 1e-6)))
        > 4 * (floor + remainder)
    )
    check(bj.sigma_star(jnp.asarray(s_hat), eta), _sigma_star(track(s_hat), eta), "sigma_star")


def test_regimes_small_and_large_eta(x64):
    s = np.logspace(-6, 6, 25)
    # σ* - η/√ŝ = η²/2 + η(√(η²/4 + 1/ŝ) - 1/√ŝ), between 0 and η²/2 + η³√ŝ/8.
    small = 1e-9
    got = np.asarray(bj.sigma_star(jnp.asarray(s), small))
    exact = _sigma_star(track(s), small)
    check(got, exact)
    gap = got - small / np.sqrt(s)
    assert np.all(np.abs(gap) <= small**2 / 2 + small**3 * np.sqrt(s) / 8 + 4 * exact.error)
    # σ* - η² = η·(1/ŝ)/(√(η²/4 + 1/ŝ) + η/2), between 0 and 1/ŝ.
    large = 1e5
    got = np.asarray(bj.sigma_star(jnp.asarray(s), large))
    exact = _sigma_star(track(s), large)
    check(got, exact)
    assert np.all(np.abs(got - large**2) <= 1 / s + 4 * exact.error)
    # The fixed-point optimizer is RMSProp (η/√ŝ) and SGD (η²) in those regimes:
    # with a constant g, ŝ = g² and u = σ*(ŝ)·g.
    g = np.array([0.5, -2.0, 3.0])
    grads = [g] * 5
    for eta in [1e-4, 1e3]:
        u, _ = run_updates(bj.scale_by_sigma_fixed_point(eta, beta=0.9), grads)
        s_hat = track(g, np.float32) * track(g, np.float32) + 1e-16
        want = _sigma_star(s_hat, eta) * track(g, np.float32)
        check(u[-1], want, f"eta={eta}")
        if eta < 1:
            assert np.all(
                np.abs(want.value - eta * np.sign(g))
                <= np.abs(g) * (eta**2 / 2 + eta**3 * np.abs(g) / 8)
            )
        else:
            assert np.all(np.abs(want.value - eta**2 * g) <= np.abs(g) / g**2)


def test_fixed_point_optimizer_matches_reference(x64, rng):
    grads = grad_stream(rng, steps=100)
    for eta, b1 in [(1e-2, 0.0), (0.5, 0.9)]:
        got, state = run_updates(bj.scale_by_sigma_fixed_point(eta, 0.99, b1=b1), grads)
        tracked = track(grads)
        m = np.zeros_like(tracked[0])
        s = np.zeros_like(tracked[0])
        want = []
        for t, g in enumerate(tracked, start=1):
            s = 0.99 * s + (1 - 0.99) * g * g
            s_hat = s / (1 - power(0.99, t, g)) + 1e-16
            star = _sigma_star(s_hat, eta)
            m = b1 * m + (1 - b1) * g
            d = m / (1 - power(b1, t, g)) if b1 else g
            want.append(star * d)
        check_trajectory(got, want, f"eta={eta}, b1={b1}")
        check(state.sigma, star, "σ")


def test_eta_zero_accumulates_precision_exactly(x64, rng):
    grads = grad_stream(rng, steps=300)
    tx = bj.scale_by_sigma_filter(0.0, beta=0.9, sigma_init=2.0)
    _, state = run_updates(tx, grads)
    tracked = track(grads)
    s, sigma = np.zeros_like(tracked[0]), np.full_like(tracked[0], 2.0)
    for t, g in enumerate(tracked, start=1):
        s = 0.9 * s + (1 - 0.9) * g * g
        sigma = 1 / (s / (1 - power(0.9, t, g)) + 1e-16 + 1 / sigma)
    check(state.sigma, sigma)
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
    # β = 0: ŝ = g² = 1 (+ eps); η_k = 1e-2·0.5^k, held in float32.
    one = track(np.ones(1), np.float32)
    for k in range(4):
        check(sig[k], _sigma_star(one + 1e-16, 1e-2 * 0.5**k)[0], f"step {k}")


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
        S = np.asarray(run(jnp.eye(d)))
        want = np.asarray(bj.sigma_star_full(jnp.asarray(G), eta))
        # The closed form from an eigendecomposition: backward error 3d·u·‖G‖
        # in G, carried through f(λ) = η²/2 + η√(η²/4 + 1/λ), whose Fréchet
        # derivative is bounded by max|f'| over G's spectrum; plus d·u·‖Σ*‖ to
        # assemble V·f(Λ)·Vᵀ.
        lam = np.linalg.eigvalsh(G)
        f_prime = eta / (2 * lam**2 * np.sqrt(eta**2 / 4 + 1 / lam))
        exact = np.diag(_sigma_star(lam, eta))
        e_star = 3 * d * U64 * lam.max() * f_prime.max() + d * U64 * np.linalg.norm(exact, 2)
        # Near Σ* the step contracts by ρ = max 1/(1 + λσ*)² (Σ* and G commute);
        # each step makes one step's rounding, so the iteration settles within
        # step/(1 - ρ) of Σ*. 20,000 steps are > 60 relaxation times here.
        rho = np.max(1 / (1 + lam * _sigma_star(lam, eta)) ** 2)
        assert rho**20_000 < 1e-25
        A = G + np.linalg.inv(want)
        step = 3 * d * U64 * (np.linalg.cond(want) + np.linalg.cond(A)) * np.linalg.norm(want, 2)
        floor = step / (1 - rho)
        assert np.abs(S - want).max() <= 4 * (floor + e_star)
        # ... which satisfies the defining equation Σ = (G + Σ⁻¹)⁻¹ + η² I up to
        # (1 + ρ)·(the error of Σ*) plus the rounding of evaluating it.
        residual = np.linalg.inv(A) + eta**2 * np.eye(d) - want
        assert np.abs(residual).max() <= 4 * ((1 + rho) * e_star + step)
        # A slightly different η is another matrix, outside these bounds.
        other = np.asarray(bj.sigma_star_full(jnp.asarray(G), eta * (1 + 1e-6)))
        assert np.abs(S - other).max() > 4 * (floor + e_star)


def test_full_filter_matches_reference(x64, rng):
    grads = grad_stream(rng, shape=(7,), steps=80)
    tx = bj.scale_by_sigma_filter_full(0.05, beta=0.95, sigma_init=0.5)
    got, state = run_updates(tx, grads)
    want, S = ref.sigma_filter_full(grads, 0.05, 0.95, 0.5, unit=U64)
    check_trajectory(got, want)
    check(state.sigma, S, "Σ")
    assert rejects(got, ref.sigma_filter_full(grads, 0.05 * (1 + 1e-6), 0.95, 0.5, unit=U64)[0])


@pytest.mark.slow  # a float64 run of the full-matrix filter
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
    # Both against the diagonal recursion with its elementwise bound, and the
    # full one's normwise bound (the larger of the two: it makes more roundings).
    want_diag, _ = ref.sigma_filter(track(grads), 0.1, 0.9, sigma_init=0.7, eps=1e-300)
    want_full, S = ref.sigma_filter_full(grads, 0.1, 0.9, 0.7, unit=U64)
    for t, g in enumerate(grads):
        gt = {"a": jnp.asarray(g[:2]), "b": jnp.asarray(g[2:])}
        uf, fs = full.update(gt, fs)
        ud, ds = diag.update(jnp.asarray(g), ds)
        check(ud, want_diag[t], f"diagonal, step {t + 1}")
        check(np.concatenate([uf["a"], uf["b"]]), want_full[t], f"full, step {t + 1}")
        check(want_diag[t].value, want_full[t], f"diagonal vs full, step {t + 1}")
    check(fs.sigma, S, "Σ")
    off = np.asarray(fs.sigma - np.diag(np.diag(fs.sigma)))
    assert np.abs(off).max() <= 4 * S.error.max()


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
    # A constant gradient keeps σ at σ*(g²): the float32 recursion, bounded.
    for key, g in grads.items():
        if isinstance(sig[key], optax.MaskedNode):
            continue
        _, want = ref.sigma_filter(
            track([np.asarray(g)] * 3, np.float32), 1e-2, 0.999, max_ratio=2.0
        )
        check(sig[key], want[-1], key)
        check(want[-1].value, _sigma_star(track(np.asarray(g) ** 2, np.float32) + 1e-16, 1e-2), key)
    samples = bj.sample_posterior(jax.random.key(0), params, state, num_samples=4)
    assert samples["w"].shape == (4, 3)
    assert samples["b"].shape == (4, 2)


def test_posterior_variance_errors_without_filter():
    with pytest.raises(ValueError, match="found 0"):
        bj.posterior_variance(bj.adam(1e-3).init(jnp.zeros(2)))


def test_sample_posterior_moments():
    params = {"w": jnp.array([1.0, -2.0, 3.0])}
    tx = bj.scale_by_sigma_filter(0.0, sigma_init=1.0, beta=0.0)
    _, state = tx.update({"w": jnp.array([1.0, 2.0, 0.0])}, tx.init(params))
    sigma = np.asarray(state.sigma["w"])  # 1/(1+g²): 0.5, 0.2, 1.0
    g = track(np.array([1.0, 2.0, 0.0]), np.float32)
    check(sigma, 1 / (g * g + 1e-16 + 1 / track(np.ones(3), np.float32)))
    n = 20000
    draws = bj.sample_posterior(jax.random.key(1), params, state, num_samples=n, scale=0.5)["w"]
    # Sampling error, not rounding: the mean within 4 standard errors; the
    # sample variance has relative standard deviation √(2/(n-1)) = 0.01, so 5 of them.
    np.testing.assert_allclose(draws.mean(0), params["w"], atol=4 * np.sqrt(0.5 * sigma.max() / n))
    np.testing.assert_allclose(draws.var(0), 0.5 * sigma, rtol=5 * np.sqrt(2 / (n - 1)))
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
    # var = 1/(N·B·ŝ + λ) with ŝ = g² = 1; scale = var/σ, σ = 1/(ŝ + 1).
    s_hat = track(np.ones(1), np.float32) + 1e-16
    sigma = 1 / (s_hat + 1)
    var = 1 / (1000 * s_hat + 2.0)
    check(scale["w"] * state.sigma["w"], (var / sigma) * sigma)


def test_filter_eta_schedule_equals_injected_eta(x64, rng):
    """A schedule for η gives the same run as setting η by hand every step."""
    sched = optax.linear_schedule(0.1, 0.01, transition_steps=20)
    grads = grad_stream(rng, steps=30)
    got, _ = run_updates(bj.scale_by_sigma_filter(sched, 0.9), grads)
    tx = optax.inject_hyperparams(bj.scale_by_sigma_filter)(eta=0.1, beta=0.9)
    state = tx.init(jnp.zeros(5))
    injected = []
    for t, g in enumerate(grads):
        state.hyperparams["eta"] = sched(t)
        u, state = tx.update(jnp.asarray(g), state)
        injected.append(np.asarray(u))
    # Both against the recursion with η_t = sched(t); inject_hyperparams keeps
    # η in float32, so η carries a float32 rounding (its error term below).
    tracked = track(grads)
    s_, sig, want = np.zeros_like(tracked[0]), None, []
    for t, g in enumerate(tracked, start=1):
        eta = Tracked(float(sched(t - 1)), 2 * U32 * float(sched(t - 1)), U64)
        s_ = 0.9 * s_ + (1 - 0.9) * g * g
        s_hat = s_ / (1 - power(0.9, t, g)) + 1e-16
        star = eta * eta / 2 + eta * np.sqrt(eta * eta / 4 + 1 / s_hat)
        sig = star if sig is None else 1 / (s_hat + 1 / sig) + eta * eta
        want.append(sig * g)
    check_trajectory(got, want, "schedule")
    check_trajectory(injected, want, "injected")
