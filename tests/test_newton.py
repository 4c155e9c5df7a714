"""The variational online-Newton mode: IVON's published update, and Bayesian linear regression."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bounds import check, power, rejects, track
from reference import sigma_filter

import bayesopt_jax as bj
from bayesopt_jax._src import native, variational

N = 500


def _ivon_transcription(steps, grads, noises, *, lr, wd, h0, beta1, beta2, ess, p0, correction=1.0):
    """Algorithm 1 of Shen et al. (2024), IVON, in float64 with rounding bounds (float32).

    Per weight, with the gradient ĝ at θ = m + σε and σ = 1/√(λ(h + δ)):
    ĥ = ĝ·(θ − m)/σ², g ← β₁g + (1−β₁)ĝ, h ← β₂h + (1−β₂)ĥ + ½(1−β₂)²(h − ĥ)²/(h + δ),
    ḡ = g/(1 − β₁ᵗ), m ← m − α(ḡ + δm)/(h + δ). Returns (m, g, h) after every step.
    """
    unit = track(np.ones_like(p0), np.float32)
    m = track(p0, np.float32)
    g = 0.0 * unit
    h = h0 * unit
    out = []
    for t in range(1, steps + 1):
        g_hat, eps = track(grads[t - 1], np.float32), track(noises[t - 1], np.float32)
        sigma = 1 / np.sqrt(ess * (h + wd))
        h_hat = g_hat * (sigma * eps) / (sigma * sigma)
        g = beta1 * g + (1 - beta1) * g_hat
        h = (
            beta2 * h + (1 - beta2) * h_hat
            + correction * (0.5 * (1 - beta2) ** 2) * (h - h_hat) ** 2 / (h + wd)
        )  # fmt: skip
        g_bar = g / (1 - power(beta1, t, unit))
        m = m - lr * (g_bar + wd * m) / (h + wd)
        out.append((m, g, h))
    return out


@pytest.mark.parametrize("beta2", [0.999, 0.9])
def test_ivon_configuration_matches_published_update(rng, beta2):
    """curvature="reparam", weight_decay = prior_precision: IVON's Algorithm 1, step by step."""
    lr, wd, h0, beta1 = 0.2 * (0.5 + 1e-4), 1e-4, 0.5, 0.9
    tx = bj.variational_newton(
        lr, num_data=N, batch_size=None, key=3, curvature="reparam", prior_precision=wd,
        weight_decay=None, hess_init=h0, hess_decay=beta2, b1=beta1, proximal_eta=None,
    )  # fmt: skip
    p = jnp.asarray(rng.normal(size=7) * 0.3, jnp.float32)
    p0 = np.asarray(p)
    state = tx.init(p)
    grads, noises, got = [], [], []
    steps = 12
    for _ in range(steps):
        inner = state[0]
        noises.append(np.asarray(variational.noise_tree(inner)))
        # a gradient that depends on the draw, as in training, with a varied scale
        sample = np.asarray(bj.training_sample(p, state))
        grads.append((sample - 0.2) * np.linspace(0.5, 3, 7) + rng.normal(size=7) * 0.1)
        u, state = tx.update(jnp.asarray(grads[-1], jnp.float32), state, p)
        p = optax.apply_updates(p, u)
        got.append((np.asarray(p), np.asarray(state[0].mu), np.asarray(state[0].hess)))
    want = _ivon_transcription(
        steps, grads, noises, lr=lr, wd=wd, h0=h0, beta1=beta1, beta2=beta2, ess=N, p0=p0
    )
    for t, ((gm, gg, gh), (wm, wg, wh)) in enumerate(zip(got, want, strict=True), start=1):
        check(gg, wg, f"gradient EMA, step {t}")
        check(gh, wh, f"h, step {t}")
        check(gm, wm, f"mean, step {t}")
    # The bounds see a missing positivity correction (its size grows with (1-β₂)²)
    # and a learning rate off by one part in 10³.
    if beta2 == 0.9:
        with np.errstate(invalid="ignore"):  # without it, h + δ turns negative
            bare = _ivon_transcription(
                steps,
                grads,
                noises,
                lr=lr,
                wd=wd,
                h0=h0,
                beta1=beta1,
                beta2=beta2,
                ess=N,
                p0=p0,
                correction=0.0,
            )
        assert rejects([x[2] for x in got], [x[2] for x in bare])
    stale = _ivon_transcription(
        steps, grads, noises, lr=lr * (1 + 1e-3), wd=wd, h0=h0, beta1=beta1, beta2=beta2,
        ess=N, p0=p0,
    )  # fmt: skip
    assert rejects([x[0] for x in got], [x[0] for x in stale])


@pytest.mark.parametrize("path", ["native", "pure"])
def test_default_mode_matches_its_equations(path, rng):
    """The default mode, transcribed in float64 with float32 rounding bounds, over 10 steps.

    σ_t from the σ-filter's equations (``reference.sigma_filter`` with the
    filter's guard κ = 2), r_t = γr + (1−γ)(g − m̂_{t−1})² (the state) and
    h_t = B r_t/(1 + (1−b₁)/(1+b₁)) (ĥ ≥ 0: no positivity correction), and the
    step θ̄ ← θ̄ − α(m̂_t + δ₀θ̄)/(h_t + δ + 1/σ_t); the draw's variance
    1/(N(h + 1/σ + δ)). ``"native"``: the state by the variational σ-filter's
    native rule, the step formed by XLA from it (the CPU's path where the
    kernels are built); ``"pure"``: the pure statement. Both meet the same bounds.
    """
    if path == "native" and not bj.native_available():
        pytest.skip("the native kernels are not built")
    n, batch = 300, 16
    alpha, delta, delta0, gam, b1, eta = 1.0, 0.01, 1e-3, 0.99, 0.9, 3e-3
    tx = bj.variational_newton(num_data=n, batch_size=batch, key=5)
    p = jnp.asarray(rng.normal(size=6) * 0.3, jnp.float32)
    state = tx.init(p)
    update = jax.jit(tx.update)

    def scope():
        return native.pure_jax() if path == "pure" else contextlib.nullcontext()

    with scope():
        text = update.lower(p, state, p).as_text()
    assert ("bayesopt_jax_variational_momentum_update" in text) == (path == "native")
    steps = 10
    grads = [rng.normal(size=6) * np.linspace(0.01, 1, 6) for _ in range(steps)]
    tracked = [track(g, np.float32) for g in grads]
    _, sigmas = sigma_filter(tracked, eta, beta=0.999, b1=b1, max_ratio=2.0)
    unit = track(np.ones(6), np.float32)
    theta = track(np.asarray(p), np.float32)
    m = 0.0 * unit
    r = 0.0 * unit
    scale = batch / (1 + (1 - b1) / (1 + b1))
    for t, g in enumerate(tracked, start=1):
        m_prev = m / (1 - power(b1, t - 1, unit)) if t > 1 else 0.0 * unit
        r = gam * r + (1 - gam) * (g - m_prev) ** 2
        h = scale * r
        m = b1 * m + (1 - b1) * g
        m_hat = m / (1 - power(b1, t, unit))
        prox = 1 / sigmas[t - 1]
        step = alpha * (m_hat + delta0 * theta) / (h + delta + prox)
        theta = theta - step
        with scope():
            u, state = update(jnp.asarray(grads[t - 1], jnp.float32), state, p)
        p = optax.apply_updates(p, u)
        check(np.asarray(state[0].sigma), sigmas[t - 1], f"σ, step {t}")
        check(np.asarray(state[0].hess), r, f"r, step {t}")
        check(np.asarray(p), theta, f"mean, step {t}")
    v = 1 / (n * (h + prox + delta))
    check(np.asarray(bj.posterior_variance(state)), v, "v")
    assert rejects(np.asarray(bj.posterior_variance(state)), 1 / (n * (h + delta)))
    # a last step 5% too long, and one without the proximal precision
    assert rejects(np.asarray(p), theta - 0.05 * step)
    assert rejects(np.asarray(p), theta + step - step * (h + delta + prox) / (h + delta))


def _blr_problem(seed):
    """y = X w + noise (σ_y = 1): N examples of 4 features with different scales."""
    r = np.random.default_rng(seed)
    n, d = 2000, 4
    x = r.normal(size=(n, d)) * np.array([0.5, 1.0, 1.5, 2.0])
    w_true = np.array([1.0, -0.5, 0.25, 0.1])
    y = x @ w_true + r.normal(size=n)
    return x, y


def test_default_mode_on_bayesian_linear_regression():
    r"""The default mode's mean and curvature against the exact posterior of a linear model.

    Loss per example ℓᵢ = (yᵢ − xᵢᵀθ)²/2, so H = XᵀX/N and the mean's fixed point,
    E_q[∇ℓ̄] + δ₀θ̄ = 0, is exactly (H + δ₀)⁻¹Xᵀy/N: the posterior mean under the
    zero-centred part δ₀ of the prior (q's width does not move it, the loss being
    quadratic). With batches of B examples drawn with replacement, the batch
    gradient at a draw θ̃ ~ N(θ̄, V) has variance E_θ̃[C_jj(θ̃)]/B + (HVH)_jj, C the
    covariance of one example's gradient; E_θ̃[C_jj] = C_jj(θ̄) + mean_i x_ij²xᵢᵀVxᵢ
    − (HVH)_jj. The mean's own wandering adds B(H Cov(θ̄) H)_jj (taken from the
    chains' spread; about 2% of h at the small step used here). The curvature
    estimate's expectation is their sum, with V the variance the draws used (the
    state's 1/(N(h + 1/σ + δ)), averaged over the run), in float64 from the data.

    The defaults but α (0.02, so that the mean's wandering stays a small term; the
    fixed points do not depend on α); the chains start at the exact mean. The bound:
    16 independent chains (own keys and batches); time averages over the last
    3000 of 3500 steps within 6 standard errors of their spread across chains.
    It rejects the mean of the plain lower bound (δ₀ = δ) and a curvature that
    lacks the momentum's variance correction 1 + (1−b₁)/(1+b₁).
    """
    x, y = _blr_problem(0)
    n, d = x.shape
    batch = 20
    delta, delta0 = variational.NEWTON_PRIOR_PRECISION, variational.NEWTON_WEIGHT_DECAY
    tx = bj.variational_newton(0.02, num_data=n, batch_size=batch)
    hess = x.T @ x / n
    b = x.T @ y / n
    mean_star = np.linalg.solve(hess + delta0 * np.eye(d), b)
    p0 = jnp.asarray(mean_star, jnp.float32)
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def loss(p, idx):
        return 0.5 * jnp.mean((yj[idx] - xj[idx] @ p) ** 2)

    steps, burn = 3500, 500

    @jax.jit
    def chain(key_data, batch_key):
        state = tx.init(p0)
        state = (state[0]._replace(key=key_data), *state[1:])

        def step(carry, k):
            p, state = carry
            idx = jax.random.randint(k, (batch,), 0, n)
            g = jax.grad(loss)(bj.training_sample(p, state), idx)
            u, state = tx.update(g, state, p)
            p = optax.apply_updates(p, u)
            return (p, state), (
                p,
                state[0].hess * state[0].curvature_scale,
                bj.posterior_variance(state),
            )

        keys = jax.random.split(batch_key, steps)
        _, (ps, hs, vs) = jax.lax.scan(step, (p0, state), keys)
        return ps[burn:], hs[burn:].mean(0), vs[burn:].mean(0)

    chains = 16
    paths, curvs, variances = [], [], []
    for c in range(chains):
        kd = jax.random.key_data(jax.random.key(100 + c))
        ps, h, v = chain(kd, jax.random.key(200 + c))
        paths.append(np.asarray(ps, np.float64))
        curvs.append(np.asarray(h, np.float64))
        variances.append(np.asarray(v, np.float64))
    paths, curvs = np.array(paths), np.array(curvs)
    v = np.mean(variances, axis=0)  # the draws' variance, 1/(N(h + 1/σ + δ)), over the run
    means = paths.mean(1)
    wander = np.mean([np.cov(pc.T) for pc in paths], axis=0)  # Cov(θ̄) over time

    per = -x * (y - x @ mean_star)[:, None]  # one example's gradient at θ̄
    cov_diag = per.var(0)
    hvh = (hess**2) @ v
    h_star = (
        cov_diag + (x**2).T @ ((x**2) @ v) / n - hvh + batch * hvh
        + batch * np.diag(hess @ wander @ hess)
    )  # fmt: skip
    se_m = means.std(0, ddof=1) / np.sqrt(chains)
    se_h = curvs.std(0, ddof=1) / np.sqrt(chains)
    m_avg, h_avg = means.mean(0), curvs.mean(0)
    assert np.all(np.abs(m_avg - mean_star) <= 6 * se_m), (m_avg, mean_star, se_m)
    assert np.all(np.abs(h_avg - h_star) <= 6 * se_h), (h_avg, h_star, se_h)
    # the bounds are sharp enough to see a real error
    plain = np.linalg.solve(hess + delta * np.eye(d), b)
    assert np.any(np.abs(m_avg - plain) > 6 * se_m)
    inflation = 1 + (1 - 0.9) / (1 + 0.9)
    assert np.any(np.abs(h_avg - h_star * inflation) > 6 * se_h)


def test_newton_errors_name_the_argument():
    with pytest.raises(ValueError, match="mean_step"):
        bj.scale_by_variational_sigma_filter(num_data=10, batch_size=2, mean_step="adam")
    with pytest.raises(ValueError, match="curvature"):
        bj.variational_newton(num_data=10, batch_size=2, curvature="evidence")
    with pytest.raises(ValueError, match="batch_size"):
        bj.variational_newton(num_data=10, batch_size=None)
    with pytest.raises(ValueError, match="weight_decay"):
        bj.variational_newton(num_data=10, batch_size=2, prior_precision=0.1, weight_decay=0.2)
    with pytest.raises(ValueError, match="hess_init"):
        bj.variational_newton(num_data=10, batch_size=2, hess_init=-1.0)
    tx = bj.variational_newton(num_data=10, batch_size=2)
    s = tx.init({"w": jnp.zeros(2)})
    with pytest.raises(ValueError, match="params"):
        tx.update({"w": jnp.ones(2)}, s)


def test_the_native_newton_step_runs_as_two_calls_under_fused_step(rng):
    """The kernel updates the state and XLA forms the step, so ``fused_step`` does not fuse it
    and says why; its result is the two calls' (the same computation, bit for bit)."""
    p = {"w": jnp.asarray(rng.normal(size=(40, 30)), jnp.float32)}
    g = jax.tree.map(lambda x: 0.1 * jnp.cos(x), p)
    tx = bj.variational_newton(num_data=1000, batch_size=10)
    state = tx.init(p)
    if bj.native_available():
        assert "reads the parameters" in bj.fusion_reason(tx, g, state, p)
    fused = jax.jit(lambda g, s, p: bj.fused_step(tx, g, s, p))(g, state, p)

    def two(g, s, p):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    jax.tree.map(np.testing.assert_array_equal, fused, jax.jit(two)(g, state, p))
