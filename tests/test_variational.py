"""The variational σ-filter: sampled variance, noise, keys, replicas, a known posterior."""

from __future__ import annotations

import contextlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bounds import U32, check, power, rejects, track
from conftest import grad_stream
from helpers import mesh_4x2

import bayesopt_jax as bj
from bayesopt_jax._src import native, variational

N, B, DELTA = 500, 10, 0.3


def _tx(**kw):
    args = dict(num_data=N, batch_size=B, key=7, prior_precision=DELTA, b1=0.9)
    return bj.scale_by_variational_sigma_filter(1e-2, **{**args, **kw})


def _previous_mean(m, t, b1, unit_like):
    """m̂_{t-1} = m_{t-1} / (1 - b1^(t-1)), 0 before the first step."""
    return m * 0.0 if t == 1 else m / (1 - power(b1, t - 1, unit_like))


def _evidence_variance(grads, beta, unit_like):
    """v_t = 1/(N (B ŝ_t + δ)) after the gradients, transcribed in float64."""
    s = 0.0
    for g in grads:
        s = beta * s + (1 - beta) * g * g
    t = len(grads)
    s_hat = s * (B / (1 - power(beta, t, unit_like)))
    return 1 / (N * (s_hat + DELTA))


@pytest.mark.parametrize("beta", [0.999, 0.9])
def test_sampled_variance_matches_formula_float64(x64, rng, beta):
    grads = grad_stream(rng, steps=25)
    tx = _tx(beta=beta, curvature="evidence")
    state = tx.init(jnp.zeros(5))
    v0 = np.asarray(bj.posterior_variance(state))
    check(v0, 1 / (N * (track(np.zeros(5)) + DELTA)), "prior before any evidence")
    for g in grads:
        _, state = tx.update(jnp.asarray(g), state)
    got = np.asarray(bj.posterior_variance(state))
    tracked = track(grads)
    want = _evidence_variance(tracked, beta, tracked[0])
    check(got, want, "v")
    # The bound is sharp enough to see a batch size of B + 1e-9·B or a δ off by 1e-9.
    assert rejects(got, want * (1 + 1e-9))


@pytest.mark.parametrize("curvature", ["variance", "reparam"])
def test_curvature_matches_formula_float64(x64, rng, curvature):
    """The default gradient-variance curvature and the reparameterisation one, transcribed.

    variance: h = B·r/(1−γ^t)/(1 + (1−b1)/(1+b1)), r the EMA of (g − m̂_{t−1})²;
    reparam:  h = max(r/(1−γ^t), 0), r the EMA of ε(g − m̂_{t−1})/√v_{t−1}.
    """
    gam, b1 = 0.9, 0.9
    grads = grad_stream(rng, steps=15)
    tx = _tx(curvature=curvature, hess_decay=gam, b1=b1)
    state = tx.init(jnp.zeros(5))
    unit = track(np.ones(5))
    r = track(np.zeros(5))
    m = track(np.zeros(5))
    h = track(np.zeros(5))
    for t, g in enumerate(grads, start=1):
        gt = track(g)
        diff = gt - _previous_mean(m, t, b1, unit)
        if curvature == "variance":
            x = diff * diff
        else:
            eps = track(np.asarray(variational.noise_tree(state)))
            x = eps * diff / np.sqrt(1 / (N * (h + DELTA)))
        r = gam * r + (1 - gam) * x
        m = b1 * m + (1 - b1) * gt
        h = r / (1 - power(gam, t, unit))
        if curvature == "variance":
            h = h * (B / (1 + (1 - b1) / (1 + b1)))
        else:
            h = np.maximum(h, 0.0 * unit)
        _, state = tx.update(jnp.asarray(g), state)
        check(np.asarray(state.hess), r, "r")
        check(np.asarray(variational.curvature_tree(state)), h, "h")
    got = np.asarray(bj.posterior_variance(state))
    want = 1 / (N * (h + DELTA))
    check(got, want, "v")
    assert rejects(got, want * (1 + 1e-9))


def test_empirical_bayes_prior_float64(x64, rng):
    """prior_precision=None: δ₀ from the initial scale, then the evidence fixed point.

    One step is N·δ_new = P / Σ(θ̄² + v) with v = 1/(N(h + δ)) (MacKay, 1992); with
    h and θ̄ held fixed, iterating it converges to the root of
    α·(Σθ̄² + Σ 1/(N h + α)) = P, found independently by bisection.
    """
    from scipy.optimize import brentq

    params = {"w": jnp.asarray(rng.normal(size=(4, 5)) * 0.3), "b": jnp.zeros(5)}
    tx = bj.scale_by_variational_sigma_filter(num_data=N, batch_size=B, prior_precision=None)
    state = tx.init(params)
    w = np.asarray(params["w"])
    d0 = np.asarray(state.prior_precision)  # leaves in order: b, w
    pooled = 25 / (w**2).sum()
    check(d0, track(np.array([pooled, 20 / (w**2).sum()])) / N, "δ₀")
    with pytest.raises(ValueError, match="params"):
        tx.update(jax.tree.map(jnp.ones_like, params), state)
    params["b"] = jnp.asarray(rng.normal(size=5) * 0.1)  # an all-zero leaf has no finite root
    h = {"b": np.abs(rng.normal(size=5)), "w": np.abs(rng.normal(size=(4, 5)))}
    h["w"][0] = 0.0  # no data: the prior alone
    delta = np.asarray(d0, np.float64)
    for step in range(400):
        new = variational.empirical_bayes_prior(
            params, jax.tree.map(jnp.asarray, h), jnp.asarray(delta), N
        )
        for i, k in enumerate(("b", "w") if step < 3 else ()):
            theta = track(np.asarray(params[k]))
            terms = theta * theta + 1 / (N * (track(h[k]) + track(delta[i])))
            total = terms[(0,) * theta.value.ndim]
            for idx in list(np.ndindex(theta.shape))[1:]:  # any order: positive terms
                total = total + terms[idx]
            check(np.asarray(new)[i], theta.value.size / (N * total), f"one step, {k}")
        delta = np.asarray(new)
    for i, k in enumerate(("b", "w")):
        theta, hk = np.asarray(params[k]), h[k]

        def balance(a, theta=theta, hk=hk):
            return a * ((theta**2).sum() + (1 / (N * hk + a)).sum()) - theta.size

        root = brentq(balance, 1e-6, 1e9, xtol=1e-14, rtol=1e-14)
        # contraction factor per step < 1 at the root; 400 steps leave < 1e-8 relative
        assert abs(N * delta[i] / root - 1) < 1e-8, (k, N * delta[i], root)


def test_mean_step_is_the_sigma_filter_and_infinite_data_is_no_noise(rng):
    """Given the gradients, the update is exactly sigma_filter's; N → ∞ samples the mean.

    Pure against pure (the same per-leaf code), and native against native
    (the variational rule calls the σ-filter's element): bit for bit. The
    native and pure paths are compared in tests/test_native.py and
    tests/test_variational_native.py.
    """
    grads = grad_stream(rng, steps=20, dtype=np.float32)
    params = jnp.array([-1.0, -0.5, 0.25, 0.5, 1.0])  # nonzero: √v·ε ≈ 3e-15 is below half an ulp
    vtx = bj.variational_sigma_filter(1e-2, num_data=N, batch_size=B, key=3)
    ftx = bj.sigma_filter(1e-2, b1=0.9)
    for pure in (True, False):
        vs, fs = vtx.init(params), ftx.init(params)
        with native.pure_jax() if pure else contextlib.nullcontext():
            for g in grads:
                uv, vs = vtx.update(jnp.asarray(g), vs, params)
                uf, fs = ftx.update(jnp.asarray(g), fs, params)
                np.testing.assert_array_equal(np.asarray(uv), np.asarray(uf))
    huge = bj.variational_sigma_filter(1e-2, num_data=1e30, batch_size=B, key=3)
    s = huge.init(params)
    np.testing.assert_array_equal(np.asarray(bj.training_sample(params, s)), np.asarray(params))


def test_noise_statistics():
    """(θ̃ − θ̄)/√v is standard normal and fresh every step."""
    params = {"a": jnp.zeros((300, 200)), "b": jnp.ones(40_000)}
    tx = bj.variational_sigma_filter(1e-2, num_data=N, batch_size=B, key=11)
    state = tx.init(params)
    z_prev = None
    for _ in range(3):
        sample = bj.training_sample(params, state)
        var = bj.posterior_variance(state)
        z = np.concatenate(
            [
                np.ravel((np.asarray(sample[k]) - np.asarray(params[k])) / np.sqrt(var[k]))
                for k in params
            ]
        ).astype(np.float64)
        n = z.size
        # Sampling error: mean within 5 standard errors 1/√n, variance within 5
        # relative standard deviations √(2/(n−1)), plus the float32 rounding of
        # θ̄ + √v·ε and its division (a few ulp of |θ̄|/√v, 1 for the "b" leaf).
        rounding = 8 * U32 * np.sqrt(1 / np.min(np.asarray(var["b"])))
        assert abs(z.mean()) <= 5 / np.sqrt(n) + rounding
        assert abs(z.var() - 1) <= 5 * np.sqrt(2 / (n - 1)) + 2 * rounding
        if z_prev is not None:  # successive steps independent: correlation within 5/√n
            assert abs(np.mean(z * z_prev)) <= 5 / np.sqrt(n) + rounding
        z_prev = z
        grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1), params)
        _, state = tx.update(grads, state, params)


def test_keys_same_key_same_sample_and_checkpoint_resumes(tmp_path):
    params = {"w": jnp.arange(6.0).reshape(2, 3), "b": jnp.zeros(3)}
    grads = jax.tree.map(lambda p: 0.1 * jnp.ones_like(p), params)

    def run(key, steps):
        tx = bj.variational_sigma_filter(1e-2, num_data=N, batch_size=B, key=key)
        s = tx.init(params)
        for _ in range(steps):
            _, s = tx.update(grads, s, params)
        return tx, s

    _, a = run(5, 2)
    _, b = run(jax.random.key(5), 2)
    _, raw = run(jax.random.key_data(jax.random.key(5)), 2)
    _, other = run(6, 2)
    sa = bj.training_sample(params, a)
    for s in (b, raw):
        for x, y in zip(
            jax.tree.leaves(sa), jax.tree.leaves(bj.training_sample(params, s)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert not np.array_equal(
        np.asarray(sa["w"]), np.asarray(bj.training_sample(params, other)["w"])
    )
    # the next draw differs from this one (the stream advances with the count)
    tx, s3 = run(5, 3)
    assert not np.array_equal(np.asarray(sa["w"]), np.asarray(bj.training_sample(params, s3)["w"]))
    # a state saved and loaded draws the same sample and continues the same stream
    bj.save_npz(tmp_path / "s.npz", a)
    back = bj.load_npz(tmp_path / "s.npz", tx.init(params))
    np.testing.assert_array_equal(
        np.asarray(bj.training_sample(params, back)["w"]), np.asarray(sa["w"])
    )
    _, back = tx.update(grads, back, params)
    np.testing.assert_array_equal(
        np.asarray(bj.training_sample(params, back)["w"]),
        np.asarray(bj.training_sample(params, s3)["w"]),
    )


def _step_fn(tx, loss, axis_name=None):
    def step(p, s, x, y):
        sample = bj.training_sample(p, s)
        g = jax.grad(loss)(sample, x, y)
        if axis_name is not None:
            g = jax.lax.pmean(g, axis_name)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, sample

    return step


def _loss(p, x, y):
    return jnp.mean((jnp.tanh(x @ p["w"]) @ p["v"] - y) ** 2)


def test_pmap_replicas_draw_the_same_sample_and_stay_identical(rng):
    n_dev = 8
    params = {"w": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32), "v": jnp.ones(6)}
    tx = bj.variational_sigma_filter(1e-2, num_data=64, batch_size=8, key=1)
    p = jax.tree.map(lambda a: jnp.broadcast_to(a, (n_dev, *a.shape)), params)
    s = jax.pmap(tx.init)(p)
    step = jax.pmap(_step_fn(tx, _loss, "i"), axis_name="i")
    single_sample = jax.jit(bj.training_sample)
    for _ in range(4):
        x = jnp.asarray(rng.normal(size=(n_dev, 8, 4)), jnp.float32)
        y = jnp.asarray(rng.normal(size=(n_dev, 8)), jnp.float32)
        want = single_sample(jax.tree.map(lambda a: a[0], p), jax.tree.map(lambda a: a[0], s))
        p, s, sample = step(p, s, x, y)
        for leaf, w in zip(jax.tree.leaves(sample), jax.tree.leaves(want), strict=True):
            leaf = np.asarray(leaf)
            assert all(np.array_equal(leaf[0], leaf[r]) for r in range(n_dev))
            np.testing.assert_array_equal(leaf[0], np.asarray(w))
        for leaf in jax.tree.leaves((p, s)):
            leaf = np.asarray(leaf)
            assert all(np.array_equal(leaf[0], leaf[r]) for r in range(n_dev))


def test_sharded_jit_sample_does_not_depend_on_layout(rng):
    mesh = mesh_4x2()
    P = jax.sharding.PartitionSpec
    shard = {"w": P("data", "model"), "v": P("model")}
    params = {"w": jnp.asarray(rng.normal(size=(8, 6)), jnp.float32), "v": jnp.ones(6)}
    placed = jax.tree.map(
        lambda a, spec: jax.device_put(a, jax.sharding.NamedSharding(mesh, spec)), params, shard
    )
    tx = bj.variational_sigma_filter(1e-2, num_data=64, batch_size=8, key=2)
    s_placed = jax.jit(tx.init)(placed)
    x = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(16, 6)), jnp.float32)

    def loss(p, x, y):
        return jnp.mean((jnp.tanh(x @ p["w"]) * p["v"] - y) ** 2)

    step = jax.jit(_step_fn(tx, loss))
    sample = jax.jit(bj.training_sample)
    for _ in range(3):
        # the same state, once laid out over the mesh and once on one device
        local = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), (placed, s_placed))
        a, b = sample(placed, s_placed), sample(*local)
        for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(w))
        placed, s_placed, _ = step(placed, s_placed, x, y)
    assert placed["w"].sharding.is_equivalent_to(jax.sharding.NamedSharding(mesh, shard["w"]), 2)


@pytest.mark.parametrize(
    "wrap",
    [
        lambda tx: optax.chain(optax.clip(1.0), tx),
        lambda tx: optax.apply_if_finite(tx, 3),
        lambda tx: optax.MultiSteps(tx, 2),
        lambda tx: optax.masked(tx, {"w": True, "b": False}),
    ],
    ids=["chain", "apply_if_finite", "multisteps", "masked"],
)
def test_found_through_wrappers(wrap):
    params = {"w": jnp.ones(3), "b": jnp.ones(2)}
    tx = wrap(bj.variational_sigma_filter(1e-2, num_data=N, batch_size=B, key=0))
    state = tx.init(params)
    grads = {"w": jnp.full(3, 0.5), "b": jnp.full(2, 0.25)}
    for _ in range(2):
        sample = bj.training_sample(params, state)
        _, state = tx.update(grads, state, params)
    var = bj.posterior_variance(state)
    for k in params:
        if isinstance(var[k], optax.MaskedNode):
            np.testing.assert_array_equal(np.asarray(sample[k]), np.asarray(params[k]))
        else:
            assert not np.array_equal(np.asarray(sample[k]), np.asarray(params[k]))
            assert var[k].shape == params[k].shape
    draws = bj.sample_posterior(jax.random.key(0), params, state, num_samples=3)
    assert draws["w"].shape == (3, 3)


def test_bad_arguments_name_the_argument():
    f = bj.variational_sigma_filter
    for kwargs, arg in [
        (dict(num_data=0, batch_size=1), "num_data"),
        (dict(num_data=10, batch_size=0), "batch_size"),
        (dict(num_data=10, batch_size=None), "batch_size"),
        (dict(num_data=10, batch_size=1, prior_precision=0.0), "prior_precision"),
        (dict(num_data=10, batch_size=1, curvature="hessian"), "curvature"),
        (dict(num_data=10, batch_size=1, hess_decay=1.0), "hess_decay"),
        (dict(num_data=10, batch_size=1, key=jnp.zeros(3)), "key"),
        (dict(num_data=10, batch_size=1, key=jax.random.split(jax.random.key(0), 2)), "key"),
    ]:
        with pytest.raises(ValueError, match=arg):
            f(1e-2, **kwargs)
    f(1e-2, num_data=10, batch_size=None, curvature="reparam")  # no batch size needed there
    with pytest.raises(TypeError, match="num_data"):
        f()  # the one argument without a default
    plain = bj.sigma_filter(1e-2)
    with pytest.raises(ValueError, match="variational_sigma_filter"):
        bj.training_sample(jnp.zeros(2), plain.init(jnp.zeros(2)))
    with pytest.raises(ValueError, match="scale=1"):
        bj.laplace_scale(
            f(1e-2, num_data=10, batch_size=1).init(jnp.zeros(2)), 10, 1, prior_precision=1.0
        )
    with pytest.raises(ValueError, match="real floating"):
        f(1e-2, num_data=10, batch_size=1).init(jnp.zeros(2, jnp.complex64))


def test_nnx_helper_equals_the_plain_loop():
    from flax import nnx

    from bayesopt_jax.nnx import value_and_grad_at_sample

    model = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
    tx = bj.variational_sigma_filter(1e-2, num_data=64, batch_size=8, key=3)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    x = jnp.arange(24.0).reshape(8, 3) / 10
    y = jnp.ones((8, 2))
    params = {"kernel": model.kernel[...], "bias": model.bias[...]}
    state = tx.init(params)

    def train_step(model, optimizer):  # eager like the loop below (nnx.jit: the docstring)
        loss, grads = value_and_grad_at_sample(lambda m: ((m(x) - y) ** 2).mean(), model, optimizer)
        optimizer.update(model, grads)
        return loss

    def loss(p):
        return ((x @ p["kernel"] + p["bias"] - y) ** 2).mean()

    for _ in range(5):
        got = train_step(model, optimizer)
        sample = bj.training_sample(params, state)
        want, g = jax.value_and_grad(loss)(sample)
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        # the same operations, both run eagerly: bit-identical
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    np.testing.assert_array_equal(np.asarray(model.kernel[...]), np.asarray(params["kernel"]))
    np.testing.assert_array_equal(np.asarray(model.bias[...]), np.asarray(params["bias"]))


_N, _D, _B, _TAU = 200, 3, 10, 0.5


def _regression():
    """N = 200 examples, 3 features of scales 0.5, 1, 2, noise sd τ = 0.5: X, y, H, θ⋆, F."""
    rng = np.random.default_rng(0)
    X = rng.normal(size=(_N, _D)) * np.array([0.5, 1.0, 2.0])
    y = X @ np.array([1.0, -2.0, 0.5]) + _TAU * rng.normal(size=_N)
    H = X.T @ X / (_N * _TAU**2)
    mle = np.linalg.solve(X.T @ X, X.T @ y)
    per_example = X * (y - X @ mle)[:, None] / _TAU**2
    return X, y, H, mle, per_example.T @ per_example / _N


def _train(tx, p0, steps, record):
    """``steps`` variational steps on batches of B drawn with replacement; ``record(state)`` per step."""
    X, y = (jnp.asarray(a) for a in _regression()[:2])
    idx = jnp.asarray(np.random.default_rng(1).integers(0, _N, size=(steps, _B)))

    def loss(th, i):
        return jnp.mean((y[i] - X[i] @ th) ** 2) / (2 * _TAU**2)

    def body(carry, i):
        p, s = carry
        g = jax.grad(loss)(bj.training_sample(p, s), i)
        u, s = tx.update(g, s, p)
        return (p - u, s), record(s)

    return jax.jit(lambda c: jax.lax.scan(body, c, idx))((p0, tx.init(p0)))


def test_bayesian_linear_regression_posterior(x64):
    r"""A linear-Gaussian model, whose posterior is Gaussian and known exactly.

    Data: N = 200 examples, 3 features of scales 0.5, 1, 2, noise sd τ = 0.5,
    per-example loss :math:`(y_i - x_i^\top\theta)^2/(2\tau^2)` averaged over
    batches of B = 10 drawn with replacement, prior precision Nδ (δ = 1e-4).
    The exact posterior has precision :math:`A = X^\top X/\tau^2 + N\delta I`
    and mean :math:`A^{-1}X^\top y/\tau^2`; the best diagonal Gaussian (in
    KL(q‖p)) has the same mean and variances :math:`1/A_{jj}`.

    **Variance.** The filter's evidence estimates the second moment of the
    batch gradient at the draws. Near the optimum that is
    :math:`F/B + H V H` with F the per-example gradient covariance (the
    empirical Fisher of the data at the mode) and V = diag(v), so the sampled
    variance tends to :math:`v^\star = 1/(N(F_{jj} + B (HVH)_{jj} + \delta))`
    — for this well-specified model F ≈ H and B(HVH)_jj ≈ B/N·H_jj, and
    :math:`v^\star` is within a few percent of :math:`1/A_{jj}` (printed by the
    assertion). Its fluctuation is that of an EMA with β = 0.999 (effective
    sample size (1+β)/(1−β) = 1999) of squared near-Gaussian batch means
    (relative variance 2 plus the excess kurtosis over B, ≤ 0.6 here): a
    relative standard deviation √(2.6/1999) = 0.036. We allow 5 of them.

    **Mean.** Linearised around the mode with the step sizes P = diag(σ)
    held fixed, :math:`\bar\theta_{t+1} - \theta^\star = (I - PH)(\bar\theta_t
    - \theta^\star) - P\xi_t` with noise covariance
    :math:`Q = F/B + HVH`; the stationary covariance S solves the discrete
    Lyapunov equation :math:`S = M S M^\top + P Q P`, M = I − PH. The update
    applies no prior gradient, so θ⋆ is the maximum-likelihood estimate,
    :math:`|\theta^\star - \mu|` computed exactly. Allowed: 5√S_jj +
    |θ⋆ − μ|_j + the transient, bounded by the product over the steps of
    :math:`\|I - P_t H\|_\infty` (H is diagonally dominant here) times
    :math:`\|\theta^\star\|_\infty`.
    """
    from scipy.linalg import solve_discrete_lyapunov

    delta, eta, steps, beta = 1e-4, 5e-5, 120_000, 0.999
    n, d, b, tau = _N, _D, _B, _TAU
    X, y, H, mle, F = _regression()
    A = X.T @ X / tau**2 + n * delta * np.eye(d)
    mu = np.linalg.solve(A, X.T @ y / tau**2)
    tx = bj.scale_by_variational_sigma_filter(
        eta, num_data=n, batch_size=b, key=0, prior_precision=delta, b1=0.0, curvature="evidence"
    )
    (p, state), sigmas = _train(tx, jnp.zeros(d), steps, lambda s: s.sigma)
    p, v = np.asarray(p), np.asarray(bj.posterior_variance(state))

    V = np.diag(v)
    v_star = 1 / (n * (np.diag(F) + b * np.diag(H @ V @ H) + delta))
    exact = 1 / np.diag(A)
    rel = np.abs(v / v_star - 1)
    assert np.all(rel <= 5 * np.sqrt(2.6 / ((1 + beta) / (1 - beta)))), (v, v_star, exact)
    # (and the diagonal of the exact posterior is within the Fisher/Hessian gap)
    assert np.all(np.abs(v / exact - 1) <= np.abs(v_star / exact - 1) + 0.18), (v, exact)

    P = np.diag(np.asarray(state.sigma))
    M = np.eye(d) - P @ H
    S = solve_discrete_lyapunov(M, P @ (F / b + H @ V @ H) @ P)
    # Transient: e_{t+1} = (I - P_t H) e_t + noise; H is diagonally dominant
    # here, so ‖I - P_t H‖_∞ = max_j 1 - σ_j (H_jj - Σ_{k≠j}|H_jk|) < 1 and
    # the start's error decays at least like the product of these norms.
    off = np.sum(np.abs(H), 1) - np.abs(np.diag(H))
    norms = np.max(1 - np.asarray(sigmas) * (np.diag(H) - off), axis=1)
    transient = np.exp(np.sum(np.log(norms))) * np.max(np.abs(mle))
    allowed = 5 * np.sqrt(np.diag(S)) + np.abs(mle - mu) + transient
    assert np.all(np.abs(p - mu) <= allowed), (p, mu, allowed, np.sqrt(exact))
    # ... which is a small fraction of the posterior standard deviation: the
    # mean is the posterior mean to within it (a wrong mean, e.g. the prior's
    # pull missing or doubled with δ = 1, would be off by many of these).
    assert np.all(allowed <= 0.6 * np.sqrt(exact)), (allowed, np.sqrt(exact))


def test_bayesian_linear_regression_default_curvature(x64):
    r"""The default estimator on a linear-Gaussian model: its curvature and posterior variance.

    Same data as above, every argument at its default but η (small, so that
    the mean sits at the maximum-likelihood estimate θ⋆ and the gradients'
    statistics are those at θ⋆). Prior δ = 1 per example (the default): the
    exact posterior precision is :math:`A = X^\top X/\tau^2 + N I`.

    **Curvature.** The default curvature is
    :math:`h = B\,\mathrm{EMA}[(g_t - \hat m_{t-1})^2] / (1 + (1-b_1)/(1+b_1))`.
    With :math:`\hat m_{t-1}` an EMA of earlier, independent gradients, the
    expected square is :math:`\operatorname{diag}Q\,(1 + (1-b_1)/(1+b_1))` with
    :math:`Q = F/B + HVH` the covariance of a batch-mean gradient at the draws
    (batches drawn with replacement: exactly F/B from the data, F the
    per-example gradient covariance at θ⋆; HVH from the draw). So
    :math:`E[h] = F_{jj} + B (HVH)_{jj}`. We compare its time average over the
    last T = 100 000 steps: the squares have relative variance ≤ 2.6 (2 for a
    Gaussian, plus the excess kurtosis of a mean of B products of Gaussians,
    ≤ 6/B) and are correlated over at most twice the momentum's memory, so
    the average's relative standard deviation is ≤ √(2.6·2/T) = 0.0072; we
    allow 5 of them (3.6%). That rejects a missing batch size (×10) and a
    missing momentum correction (5.3%).

    **Posterior.** For this well-specified model F ≈ H (the Hessian of the
    per-example loss), so the sampled variance is within the F/H gap (and the
    B·HVH term) of the exact posterior's diagonal 1/A_jj; the data share
    H/(H + δ) that :func:`bayesopt_jax.curvature_report` gives is reported.
    """
    eta, steps, burn = 5e-5, 120_000, 20_000
    n, d, b = _N, _D, _B
    _, _, H, mle, F = _regression()
    delta = variational.DEFAULT_PRIOR_PRECISION
    A = n * H + n * delta * np.eye(d)
    tx = bj.scale_by_variational_sigma_filter(eta, num_data=n, batch_size=b, key=0)

    def record(s):
        return variational.curvature_tree(s), bj.posterior_variance(s)

    # start at θ⋆: no transient in the mean
    (_, state), (hs, vs) = _train(tx, jnp.asarray(mle), steps, record)
    h_avg = np.asarray(hs)[burn:].mean(0)
    v_avg = np.asarray(vs)[burn:].mean(0)
    want = np.diag(F) + b * np.diag(H @ np.diag(v_avg) @ H)
    assert np.all(np.abs(h_avg / want - 1) <= 5 * np.sqrt(2.6 * 2 / (steps - burn))), (h_avg, want)
    assert not np.all(np.abs(h_avg * (1 + 0.1 / 1.9) / want - 1) <= 0.036)  # the bound's power

    exact = 1 / np.diag(A)
    v_star = 1 / (n * (want + delta))
    report = bj.curvature_report(state, n * np.diag(H))
    share = report[""]["data_share"]
    assert np.all(np.abs(v_avg / exact - 1) <= np.abs(v_star / exact - 1) + 0.036), (
        v_avg,
        exact,
        f"data share of the precision: {share:.2f}",
    )
    # the data supply half or more of the precision here, and the rank order is exact
    print(f"h/want {h_avg / want}, v/exact {v_avg / exact}, data share {share:.2f}")
    assert 0.5 <= share <= 1, share
    assert report[""]["rank_correlation"] == 1.0


def test_curvature_report_against_scipy(rng):
    """Rank correlation (with ties) against scipy's Spearman; ratios from 1/v − Nδ."""
    from scipy.stats import spearmanr

    params = {"w": jnp.zeros((6, 7)), "b": jnp.zeros(3)}
    tx = bj.variational_sigma_filter(num_data=50, batch_size=5, key=0)
    state = tx.init(params)
    for _ in range(4):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        _, state = tx.update(g, state, params)
    ref = {"w": np.round(rng.gamma(1.0, size=(6, 7)), 1), "b": np.array([0.0, 2.0, 1.0])}
    ref["w"][0] = 0.0  # ties and zeros
    report = bj.curvature_report(state, ref)
    v = bj.posterior_variance(state)
    for k in params:
        prec = 1 / np.asarray(v[k], np.float64)
        r = report[f"['{k}']"]
        # Distinct precisions are far apart against float32 rounding (1e-6 relative), so
        # both routes (1/v here, N·h + N·δ in the report) give the same ranks on any host.
        levels = np.unique(prec)
        assert np.diff(levels).min() > 1e-5 * levels.max()
        assert abs(r["rank_correlation"] - spearmanr(prec.ravel(), ref[k].ravel())[0]) <= 1e-12
        data = prec - r["prior_precision"]  # N h, by another route than the report's
        pos = ref[k] > 0
        # 1/v in float32 then a float64 difference: relative 1e-6 of 1/v bounds both routes
        tol = 1e-6 * np.max(prec[pos] / ref[k][pos])
        assert abs(r["median_ratio"] - np.median(data[pos] / ref[k][pos])) <= tol
        assert 0 <= r["data_share"] <= 1


def test_abstract_init():
    """ShapeDtypeStruct parameters: the state's shapes without values; the learned prior refuses."""
    params = {
        "w": jax.ShapeDtypeStruct((3, 4), jnp.float32),
        "b": jax.ShapeDtypeStruct((4,), jnp.float32),
    }
    concrete = jax.tree.map(lambda s: jnp.ones(s.shape, s.dtype), params)
    tx = bj.variational_sigma_filter(num_data=10, batch_size=2)
    got = jax.tree.map(lambda x: (x.shape, x.dtype), tx.init(params))
    assert got == jax.tree.map(lambda x: (x.shape, x.dtype), tx.init(concrete))
    learned = bj.variational_sigma_filter(num_data=10, batch_size=2, prior_precision=None)
    with pytest.raises(ValueError, match="eval_shape"):
        learned.init(params)
    abstract = jax.eval_shape(learned.init, params)
    assert jax.tree.map(lambda x: x.shape, abstract) == jax.tree.map(
        lambda x: x.shape, learned.init(concrete)
    )
