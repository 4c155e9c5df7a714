"""Kahan-compensated and stochastically rounded updates of low-precision parameters."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
import registry
from registry import slow_except

import bayesopt_jax as bj

U32 = 2.0**-24  # float32 unit roundoff
U_BF16 = 2.0**-9  # bfloat16 unit roundoff (8 significant bits)


def _neighbours(x, dtype):
    """The two values of ``dtype`` around each float64 ``x`` (equal when representable)."""
    x = np.asarray(x, np.float64)
    near = x.astype(dtype)
    nf = near.astype(np.float64)
    other = np.nextafter(near, np.where(nf < x, np.inf, -np.inf).astype(dtype))
    of = other.astype(np.float64)
    return np.minimum(nf, of), np.maximum(nf, of), nf == x


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_stochastic_round_picks_a_neighbour_with_the_unbiased_probability(dtype):
    np_dtype = ml_dtypes.bfloat16 if dtype == jnp.bfloat16 else np.float16
    rng = np.random.default_rng(0)
    values = np.float32(rng.normal(size=6) * 10.0 ** rng.uniform(-3, 3, 6))
    n = 1 << 16
    for i, v in enumerate(values):
        lo, hi, exact = _neighbours(v, np_dtype)
        assert not exact
        bits = jax.random.bits(jax.random.key(i), (n,), jnp.uint32)
        got = np.asarray(bj.stochastic_round(jnp.full(n, v), dtype, bits), np.float64)
        assert np.all((got == lo) | (got == hi))
        p = (np.float64(v) - lo) / (hi - lo)
        frac = np.mean(got == hi)
        # binomial: 6 standard deviations (+ the 2^-24 resolution of the draw)
        assert abs(frac - p) <= 6 * np.sqrt(p * (1 - p) / n) + 2.0**-24
    # A biased rounding (always down, or to nearest) is rejected: its frac is
    # 0 or 1, while 6 sd at n = 2^16 is at most 0.012.
    special = [1.0, -2.5, 0.0, jnp.inf, -jnp.inf, jnp.nan]
    special = jnp.array(special + ([7e4] if dtype == jnp.float16 else []), jnp.float32)
    bits = jnp.full(special.shape, 0xFFFFFFFF, jnp.uint32)
    got = np.asarray(bj.stochastic_round(special, dtype, bits), np.float64)
    with np.errstate(over="ignore"):
        expect = np.asarray(special, np.float64).astype(np_dtype).astype(np.float64)
    np.testing.assert_array_equal(got, expect)  # representable, non-finite, f16 overflow


def _run(tx, params, updates, step=None):
    state = tx.init(params)
    update = jax.jit(tx.update) if step is None else step
    history = []
    for u in updates:
        out, state = update(u, state, params)
        params = optax.apply_updates(params, out)
        history.append(state)
    return params, state, history


def test_kahan_summation_tracks_the_exact_sum_of_the_updates():
    """θ + c equals θ₀ + Σu up to the bf16 roundings of c (bound from the observed magnitudes)."""
    rng = np.random.default_rng(1)
    shape = (2000,)
    p0 = np.float64(rng.normal(size=shape).astype(ml_dtypes.bfloat16))
    updates = [
        jnp.asarray(rng.normal(size=shape) * 10.0 ** rng.uniform(-6, -2, shape), jnp.float32)
        for _ in range(300)
    ]
    params = jnp.asarray(p0, jnp.bfloat16)
    tx = bj.kahan_summation()
    final, _, history = _run(tx, params, updates)
    assert final.dtype == jnp.bfloat16
    exact = p0 + np.sum([np.float64(u) for u in updates], axis=0)
    # Per step: y = u + c (one float32 rounding), c' = y - moved (one float32
    # rounding, moved is exact), c' stored in bf16 (one rounding, 2^-9 |c'|).
    bound = np.zeros(shape)
    c_prev = np.zeros(shape)
    for u, s in zip(updates, history, strict=True):
        c = np.float64(np.asarray(s.compensation, np.float32))
        bound += U_BF16 * np.abs(c) + U32 * (np.abs(np.float64(u)) + np.abs(c_prev) + 2 * np.abs(c))
        c_prev = c
    total = np.float64(np.asarray(final, np.float32)) + c_prev
    err = np.abs(total - exact)
    assert np.all(err <= bound * 1.01 + 1e-30)
    # θ alone is within half a spacing of that (plus the bound).
    spacing = np.abs(np.spacing(np.asarray(final, np.float32).astype(ml_dtypes.bfloat16)))
    assert np.all(np.abs(np.float64(np.asarray(final, np.float32)) - exact) <= bound + spacing)
    # Plain bf16 updates lose most of this motion: the bound rejects them.
    plain = params
    for u in updates:
        plain = optax.apply_updates(plain, u)
    plain_err = np.abs(np.float64(np.asarray(plain, np.float32)) - exact)
    assert np.mean(plain_err > bound + spacing) > 0.5


def test_stochastic_rounding_moves_small_updates_on_average():
    n, steps, lr = 20_000, 100, 1e-4
    params = jnp.ones(n, jnp.bfloat16)
    updates = [jnp.full(n, -lr, jnp.float32)] * steps
    final, state, _ = _run(bj.stochastic_rounding(key=3), params, updates)
    plain = params
    for u in updates:
        plain = optax.apply_updates(plain, u)
    assert np.all(np.asarray(plain, np.float32) == 1.0)  # the stall
    # Each step moves an entry by one spacing (≤ 2^-7 here) with probability
    # |u|/spacing: variance ≤ steps · spacing² / 4 per entry, independent.
    mean = np.mean(np.asarray(final, np.float64))
    sd = np.sqrt(steps * (2.0**-7) ** 2 / 4 / n)
    assert abs(mean - (1 - steps * lr)) <= 6 * sd  # 6 sd = 1.7e-3 vs a stall of 1e-2
    # Reproducible from the key and the count; another key, other bits.
    again, _, _ = _run(bj.stochastic_rounding(key=3), params, updates)
    np.testing.assert_array_equal(np.asarray(final), np.asarray(again))
    other, _, _ = _run(bj.stochastic_rounding(key=4), params, updates)
    assert np.any(np.asarray(final) != np.asarray(other))
    assert int(state.count) == steps


def _mixed_problem():
    rng = np.random.default_rng(5)
    params = {
        "w": jnp.asarray(rng.normal(size=(32, 16)), jnp.bfloat16),
        "b": jnp.zeros(16, jnp.bfloat16),
        "scale": jnp.ones(16, jnp.float32),
    }
    x = jnp.asarray(rng.normal(size=(64, 32)), jnp.float32)
    y = jnp.asarray(rng.normal(size=(64, 16)), jnp.float32)

    def loss(p):
        out = (x @ p["w"].astype(jnp.float32) + p["b"].astype(jnp.float32)) * p["scale"]
        return jnp.mean((out - y) ** 2)

    return params, loss


# Every optimizer of the registry, each with all its state in 8-bit storage
# where it can be, and one of Optax's own.
OPTIMIZERS = {
    **{name: functools.partial(registry.make, name) for name in registry.OPTIMIZERS},
    **{
        f"{name}_8bit": functools.partial(registry.make_eight_bit, name, bj.Blockwise8(16))
        for name in registry.with_eight_bit()
    },
    "optax_lion": lambda: optax.lion(1e-4),
}


# The inner loop trains three of them: a native rule, 8-bit state, Optax's own.
INNER = ("adam", "adam_8bit", "optax_lion")


@pytest.mark.parametrize(
    "name",
    slow_except(sorted(OPTIMIZERS), INNER),
)
@pytest.mark.parametrize("rounding", ["kahan", "stochastic"])
def test_every_optimizer_trains_bf16_parameters(name, rounding):
    params, loss = _mixed_problem()
    last = bj.kahan_summation() if rounding == "kahan" else bj.stochastic_rounding(1)
    tx = optax.chain(OPTIMIZERS[name](), last)
    ref_tx = OPTIMIZERS[name]()
    state, ref_state = tx.init(params), ref_tx.init(params)

    @jax.jit
    def step(p, s, rp, rs):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        ru, rs = ref_tx.update(jax.grad(loss)(rp), rs, rp)
        return optax.apply_updates(p, u), s, optax.apply_updates(rp, ru), rs

    ref = params
    for _ in range(30):
        params, state, ref, ref_state = step(params, state, ref, ref_state)
    assert jax.tree.map(lambda a: a.dtype, params) == jax.tree.map(lambda a: a.dtype, ref)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(params))
    assert float(loss(params)) < float(loss(_mixed_problem()[0]))
    if rounding == "kahan":
        assert state[1].compensation["scale"] == optax.MaskedNode()


@pytest.mark.slow  # every wrapper and a checkpoint round trip; the inner loop has one of each kind elsewhere
def test_rounding_with_optax_wrappers_and_checkpoints(tmp_path):
    params, loss = _mixed_problem()
    grads = [jax.grad(loss)(params)] * 4
    for last in (bj.kahan_summation(), bj.stochastic_rounding(2)):
        # apply_if_finite: a NaN gradient changes neither parameters nor state.
        tx = optax.apply_if_finite(optax.chain(bj.adam(1e-3), last), 2)
        state = tx.init(params)
        _, state = tx.update(grads[0], state, params)
        bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[1])
        u, after = tx.update(bad, state, params)
        assert all(bool(jnp.all(x == 0)) for x in jax.tree.leaves(u))
        for a, b in zip(
            jax.tree.leaves(after.inner_state), jax.tree.leaves(state.inner_state), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        # MultiSteps and inject_hyperparams keep working.
        tx = optax.MultiSteps(optax.chain(bj.adam(1e-3), last), 2)
        p, _, _ = _run(tx, params, grads)
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
        tx = optax.chain(optax.inject_hyperparams(bj.adam)(learning_rate=1e-3), last)
        _run(tx, params, grads)
        # npz: resuming from a checkpoint continues bit for bit.
        tx = optax.chain(bj.adam(1e-3), last)
        p_all, s_all, _ = _run(tx, params, grads)
        p_half, s_half, _ = _run(tx, params, grads[:2])
        bj.save_npz(tmp_path / "s.npz", s_half)
        s_back = bj.load_npz(tmp_path / "s.npz", tx.init(params))
        update = jax.jit(tx.update)
        for g in grads[2:]:
            u, s_back = update(g, s_back, p_half)
            p_half = optax.apply_updates(p_half, u)
        for a, b in zip(
            jax.tree.leaves((p_all, s_all)), jax.tree.leaves((p_half, s_back)), strict=True
        ):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="params"):
        bj.kahan_summation().update(jnp.ones(2), bj.kahan_summation().init(jnp.ones(2)))
    with pytest.raises(ValueError, match="params"):
        tx = bj.stochastic_rounding()
        tx.update(jnp.ones(2), tx.init(jnp.ones(2)))
    with pytest.raises(ValueError, match="key"):
        bj.stochastic_rounding(key=jnp.ones(3))


@pytest.mark.slow  # five layouts of eight devices
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_rounding_is_independent_of_the_sharding():
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))
    params, loss = _mixed_problem()
    spec = {"w": P("a", "b"), "b": P("b"), "scale": P()}
    put = lambda t: {k: jax.device_put(v, NamedSharding(mesh, spec[k])) for k, v in t.items()}  # noqa: E731
    grads = [jax.grad(loss)(params)] * 3
    for last in (bj.kahan_summation(), bj.stochastic_rounding(7)):
        tx = optax.chain(bj.adam(1e-2), last)
        one, _, _ = _run(tx, params, grads)
        many, _, _ = _run(tx, put(params), [put(g) for g in grads])
        # Every operation is elementwise (and threefry is partitionable), so
        # the layout cannot change a bit... except Adam's rule, which is also
        # elementwise: the same float32 operations on each entry.
        for k in params:
            np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(many[k]))
        # state_shardings: the compensation follows its parameter (float32
        # leaves hold no buffer), the key and count are replicated.
        shardings = bj.state_shardings(tx, put(params))
        state = jax.jit(tx.init, out_shardings=shardings)(put(params))
        _, state = jax.jit(tx.update, out_shardings=(None, shardings))(
            put(grads[0]), state, put(params)
        )
        if isinstance(state[1], bj.KahanSummationState):
            assert state[1].compensation["w"].sharding.spec == P("a", "b")
            assert state[1].compensation["scale"] == optax.MaskedNode()
        else:
            assert state[1].key.sharding.is_fully_replicated
    # The same holds for optax.masked (MaskedNode in the state).
    tx = optax.masked(bj.adam(1e-2), {"w": True, "b": False, "scale": True})
    shardings = bj.state_shardings(tx, put(params))
    assert shardings.inner_state[0].mu["w"].spec == P("a", "b")
    assert shardings.inner_state[0].mu["b"] == optax.MaskedNode()
