"""Reliability: bad hyperparameters, non-finite and extreme gradients, low precision."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
from bounds import check, output, rejects, track
from registry import OPTIMIZERS, make

import bayesopt_jax as bj
from bayesopt_jax._src import numerics

NAMES = sorted(OPTIMIZERS)

# --------------------------------------------------------------------------
# bad hyperparameters: every numeric argument of every optimizer
# --------------------------------------------------------------------------

DECAYS = {"b1", "b2", "beta", "decay", "momentum"}
BAD_VALUES = {
    **{k: [1.0, -0.1, 1.5, math.nan] for k in DECAYS},
    "learning_rate": [-1e-3, math.inf, math.nan],
    "eta": [-1e-3, math.inf],
    "eps": [-1e-8, math.nan],
    "eps_root": [-1e-8, math.inf],
    "weight_decay": [-1e-4, math.nan],
    "initial_accumulator_value": [-0.1],
    "initial_scale": [-0.1, math.nan],
    "max_ratio": [0.5, math.inf],
}
CASES = [
    (name, arg, bad) for name in NAMES for arg in OPTIMIZERS[name][1] for bad in BAD_VALUES[arg]
]


@pytest.mark.parametrize("name,arg,bad", CASES, ids=[f"{n}-{a}-{b}" for n, a, b in CASES])
def test_every_bad_hyperparameter_is_rejected_at_construction(name, arg, bad):
    with pytest.raises(ValueError, match=rf"`{arg}` must be a (finite )?number.*got"):
        make(name, **{arg: bad})


@pytest.mark.parametrize(
    "factory,kwargs,arg",
    [
        (bj.sigma_filter, dict(eta=0.0), "eta"),
        (bj.scale_by_sigma_filter, dict(eta=1e-2, sigma_init=0.0), "sigma_init"),
        (bj.scale_by_sigma_filter, dict(eta=1e-2, sigma_max=-1.0), "sigma_max"),
        (bj.sigma_filter, dict(eta=1e-2, eps=0.0), "eps"),
        (bj.scale_by_sigma_filter_full, dict(eta=1e-2, sigma_init=-1.0), "sigma_init"),
        (bj.scale_by_sigma_filter_full, dict(eta=-1.0), "eta"),
        (bj.amsgrad, dict(learning_rate=1e-3, max_of="largest"), "max_of"),
        (bj.scale_by_adam, dict(nu_dtype=jnp.int8), "nu_dtype"),
    ],
)
def test_special_bad_arguments(factory, kwargs, arg):
    with pytest.raises(ValueError, match=f"`{arg}`"):
        factory(**kwargs)


# --------------------------------------------------------------------------
# non-finite gradients without the wrapper: visible, never swallowed
# --------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_gradient_shows_in_the_update(name, bad):
    """Without ``apply_if_finite`` a bad step is visible, as in Optax and PyTorch."""
    tx = make(name)
    params = jnp.zeros(3)
    state = tx.init(params)
    _, state = tx.update(jnp.array([0.1, -0.2, 0.3]), state, params)
    u, _ = tx.update(jnp.array([bad, 0.1, 0.1]), state, params)
    assert not bool(jnp.isfinite(u[0]))


# --------------------------------------------------------------------------
# extreme scales
# --------------------------------------------------------------------------


def _streams(dtype):
    huge = 1e30 if dtype != jnp.float16 else 6e4
    tiny = 1e-30 if dtype != jnp.float16 else 6e-8
    small = 1e-6 if dtype != jnp.float16 else 1e-4

    def const(v, n):
        return [np.full(4, v)] * n

    return {
        "zeros": const(0.0, 20),
        "tiny": const(tiny, 20),
        "huge": const(huge, 20),
        "alternating_huge": [np.full(4, huge * (-1) ** t) for t in range(20)],
        "zeros_then_small": const(0.0, 200) + const(small, 20),
        "huge_then_normal": const(huge, 3) + const(0.1, 30),
        "mixed_elements": [np.array([huge, tiny, 0.0, -1.0])] * 20,
    }


def _bound(name, kwargs, gmax, dtype):
    """A step bound each algorithm guarantees, given the largest |g| seen so far."""
    if name == "variational_newton":
        # |u| = α|m̂ + δ₀θ̄|/(h + δ + 1/σ) ≤ α σ|m̂| at θ̄ = 0 (h ≥ 0): the σ-filter's step, times α
        eta = OPTIMIZERS[name][0].keywords["proximal_eta"]
        return kwargs["learning_rate"] * 2.0 * (eta**2 * gmax + 40 * eta)
    if "sigma" in name:
        kappa = kwargs.get("max_ratio", 1.0 if name == "sigma_fixed_point" else 2.0)
        eta = kwargs["eta"]
        # σ ≤ κ σ*(ŝ) ≤ κ (η² + η/√ŝ) and |d|/√ŝ is bounded like Adam's ratio.
        return kappa * (eta**2 * gmax + 40 * eta)
    lr = kwargs["learning_rate"]
    if name == "rmsprop_centered_momentum":
        # the centred variance can vanish: |g|/√eps per step, summed by momentum
        return lr * gmax / kwargs["eps"] / (1 - kwargs["momentum"])
    # Adam-type ratios |m̂|/√v̂ (and AdaGrad's, RMSProp's g/√v) stay below 40 here.
    if dtype == jnp.float16:
        # a float16 second moment saturates at 65504 (|g| ≳ 256) while the first
        # moment does not: the ratio can then grow like |g|/256.
        return 40 * lr * max(1.0, gmax / 256)
    return 40 * lr


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_extreme_gradients_keep_state_finite_and_steps_bounded(name, dtype):
    tx = make(name)
    kwargs = OPTIMIZERS[name][1]
    params = jnp.zeros(4, dtype)
    limit = math.sqrt(float(jnp.finfo(jnp.float32).max)) / 2
    update = jax.jit(tx.update)
    state0 = tx.init(params)
    dtypes0 = [x.dtype for x in jax.tree.leaves(state0)]
    for stream, grads in _streams(dtype).items():
        state, gmax = state0, 0.0
        for t, g in enumerate(grads):
            g = jnp.asarray(g, dtype)
            gmax = max(gmax, min(float(jnp.max(jnp.abs(g.astype(jnp.float32)))), limit))
            u, state = update(g, state, params)
            where = f"{stream}, step {t}"
            assert u.dtype == dtype, where
            u64 = np.asarray(u, np.float64)
            assert np.all(np.isfinite(u64)), (where, u64)
            for leaf in jax.tree.leaves(state):
                assert np.all(np.isfinite(np.asarray(leaf, np.float64))), (where, leaf)
            tol = 1 + 2 * float(jnp.finfo(dtype).eps)
            assert np.abs(u64).max() <= _bound(name, kwargs, gmax, dtype) * tol, (where, u64)
        assert [x.dtype for x in jax.tree.leaves(state)] == dtypes0


def test_clipping_is_exact_below_the_bound():
    g = jnp.array([1e18, -3e18, 1e-30, 0.0, jnp.nan, -jnp.inf], jnp.float32)
    out = numerics.to_compute(g)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(g))
    big = jnp.array([1e30, -1e25], jnp.float32)
    limit = np.float32(math.sqrt(float(jnp.finfo(jnp.float32).max)) / 2)
    np.testing.assert_array_equal(np.asarray(numerics.to_compute(big)), [limit, -limit])


def test_store_saturates_only_narrower_dtypes():
    x = jnp.array([1e5, -1e6, 3.0, jnp.inf, jnp.nan], jnp.float32)
    np.testing.assert_array_equal(
        np.asarray(numerics.store(x, jnp.float16), np.float32),
        [65504.0, -65504.0, 3.0, np.inf, np.nan],
    )
    np.testing.assert_array_equal(np.asarray(numerics.store(x, jnp.float32)), np.asarray(x))


# --------------------------------------------------------------------------
# low precision
# --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16], ids=str)
@pytest.mark.parametrize("name", NAMES)
def test_low_precision_state_keeps_its_dtype(name, dtype):
    tx = make(name)
    params = {"w": jnp.ones((3, 2), dtype), "s": jnp.array(1.0, dtype)}
    state = tx.init(params)
    float_leaves = [
        x for x in jax.tree.leaves(_buffers(state)) if jnp.issubdtype(x.dtype, jnp.floating)
    ]
    assert float_leaves and all(x.dtype == dtype for x in float_leaves)
    g = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    for _ in range(3):
        u, state = jax.jit(tx.update)(g, state, params)
    assert all(x.dtype == dtype for x in jax.tree.leaves(u))
    assert [x.dtype for x in jax.tree.leaves(state)] == [
        x.dtype for x in jax.tree.leaves(tx.init(params))
    ]


def _buffers(state):
    """The state without the variational filter's scalar hyperparameters (N, δ, B/(1-β^t))."""

    def strip(x):
        if isinstance(x, bj.ScaleByVariationalSigmaFilterState):
            return x._replace(num_data=None, prior_precision=None, curvature_scale=None)
        return x

    is_state = lambda x: isinstance(x, bj.ScaleByVariationalSigmaFilterState)  # noqa: E731
    return jax.tree.map(strip, state, is_leaf=is_state)


@pytest.mark.parametrize(
    "mu_dtype,nu_dtype", [(jnp.bfloat16, jnp.float32), (jnp.float32, jnp.bfloat16)]
)
def test_requested_state_dtypes_hold_over_steps(mu_dtype, nu_dtype):
    for tx in (
        bj.adam(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
        bj.amsgrad(1e-3, mu_dtype=mu_dtype, nu_dtype=nu_dtype),
    ):
        params = jnp.ones(4, jnp.float16)
        state = tx.init(params)
        for _ in range(3):
            u, state = jax.jit(tx.update)(jnp.full(4, 0.25, jnp.float16), state, params)
        assert optax.tree.get(state, "mu").dtype == mu_dtype
        assert optax.tree.get(state, "nu").dtype == nu_dtype
        assert u.dtype == jnp.float16


@pytest.mark.parametrize("name", NAMES)
def test_float16_zero_gradient_gives_zero_update(name):
    """eps = 1e-8 underflows to 0 in float16; arithmetic runs in float32, so 0/(0+eps) = 0."""
    assert float(jnp.asarray(1e-8, jnp.float16)) == 0.0
    tx = make(name)
    params = jnp.zeros(2, jnp.float16)
    u, _ = tx.update(jnp.zeros(2, jnp.float16), tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(u, np.float32), 0.0)


def test_float16_adam_keeps_eps_that_float16_cannot_hold(rng):
    """Gradients near 1e-7 (float16 subnormals): eps = 1e-8 changes the step by ~10%."""
    g16 = [(rng.uniform(0.5, 2.0, size=8) * 1e-7).astype(np.float16) for _ in range(30)]
    grads = [g.astype(np.float64) for g in g16]
    tx = bj.scale_by_adam(eps=1e-8, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    params = jnp.zeros(8, jnp.float16)
    state = tx.init(params)
    # computed in float32, each update rounded once to float16
    want = [output(w, np.float16) for w in reference.adam(track(grads, np.float32), eps=1e-8)]
    without_eps = reference.adam(grads, eps=0.0)
    for t, g in enumerate(g16):
        u, state = tx.update(jnp.asarray(g), state, params)
        assert u.dtype == jnp.float16
        check(np.asarray(u, np.float64), want[t], f"step {t + 1}")
    assert np.max(np.abs(want[-1].value / without_eps[-1] - 1)) > 0.05
    assert rejects(
        np.asarray(u, np.float64),
        output(reference.adam(track(grads, np.float32), eps=0.0)[-1], np.float16),
    )


NON_NUMBERS = ["0.001", b"1", [1e-3], None, True, 1e-3 + 0j]


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", NON_NUMBERS, ids=repr)
def test_a_non_number_is_rejected_at_construction(name, bad):
    arg = "learning_rate" if "learning_rate" in OPTIMIZERS[name][1] else "eta"
    with pytest.raises(ValueError, match=rf"`{arg}` must be a real number or an array, got "):
        make(name, **{arg: bad})


def test_infinite_learning_rate_message_says_what_is_meant():
    with pytest.raises(ValueError, match=r"`learning_rate` must be a finite number ≥ 0, got inf"):
        bj.adam(math.inf)


@pytest.mark.parametrize("name", NAMES)
def test_mismatched_trees_and_shapes_name_the_optimizer_leaf_and_shapes(name):
    tx = make(name)
    where = (
        name.split("_")[0]
        if "sigma" not in name
        else ("sigma_fixed_point" if "fixed" in name else name.removesuffix("_momentum"))
    )
    where = name if name == "variational_newton" else where
    params = {"w": jnp.ones((3, 2)), "b": jnp.ones(2)}
    state = tx.init(params)
    good = jax.tree.map(jnp.ones_like, params)
    # a leaf of another shape: in the gradient (state and params disagree with it)
    bad = {"w": jnp.ones((2, 3)), "b": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=rf"^{where}: at \['w'\], the gradient has shape \(2, 3\) but"
    ):
        tx.update(bad, state, params)
    # params of another structure
    with pytest.raises(ValueError, match=rf"^{where}: `params` does not have the structure"):
        tx.update(good, state, {"w": params["w"]})
    # params of another shape, gradient and state right
    with pytest.raises(
        ValueError, match=r"at \['b'\], the gradient has shape \(2,\) but `params` has shape \(1,\)"
    ):
        tx.update(good, state, {"w": params["w"], "b": jnp.ones(1)})


def test_rmsprop_momentum_none_is_no_momentum_as_in_optax():
    """``None`` (the default) has no buffer, ``0.0`` a zero-decay one: Optax's states, same steps."""
    params = jnp.ones(3)
    g = jnp.array([0.5, -1.0, 2.0])
    none, zero = bj.rmsprop(1e-2, momentum=None), bj.rmsprop(1e-2, momentum=0.0)
    a, sa = none.update(g, none.init(params), params)
    b, sb = zero.update(g, zero.init(params), params)
    np.testing.assert_array_equal(a, b)
    for momentum, state in [(None, sa), (0.0, sb)]:
        theirs = optax.rmsprop(1e-2, momentum=momentum).init(params)
        assert jax.tree.structure(state) == jax.tree.structure(theirs)
    injected = optax.inject_hyperparams(bj.rmsprop)(learning_rate=1e-2)
    assert jax.tree.structure(injected.init(params).inner_state) == jax.tree.structure(sa)
