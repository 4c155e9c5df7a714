"""The native 8-bit kernels: one pass of decode, rule and encode over block-wise 8-bit state.

The claim: the kernel stores exactly what the float32 kernel's new state
(the same compiled rule) encodes to, bit for bit, and its update is the
rule's update up to the rounding of the final products and quotients. Both
sides of every comparison run on this host, so the equalities hold on any
host; the one tolerance (on the update) is a relative bound from counting
roundings.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import mesh_4x2
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from registry import CAPABILITIES, make_eight_bit, with_native

import bayesopt_jax as bj
from bayesopt_jax._src import native, quantize

U = 2.0**-24
needs_native = pytest.mark.skipif(
    not bj.native_available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
STORED = native.STORED_TARGETS

FMT = bj.Blockwise8(64)
# Every optimizer of the registry with a native rule and 8-bit state: ``OPTIMIZERS[name](d)``
# is it with every state buffer that can be stored in ``d`` (None: float32 state).
OPTIMIZERS = {
    name: functools.partial(make_eight_bit, name)
    for name in with_native()
    if CAPABILITIES[name].eight_bit
}
SHAPES = {"w": (7, 300), "b": (1000,), "c": (3, 5), "k": (2, 3, 130)}


def fresh(fn):
    """A new function object: JAX caches traces per function, and the paths trace differently."""
    return lambda *args: fn(*args)


def lowered(fn, *args) -> str:
    return jax.jit(fresh(fn)).lower(*args).as_text()


def params_and_grads(rng, shapes=SHAPES, scale=1e-3):
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    # magnitudes over 8 decades, so every run of the code maps is used
    grads = {
        k: (rng.normal(size=s) * 10.0 ** rng.uniform(-8, 0, size=s) * scale).astype(np.float32)
        for k, s in shapes.items()
    }
    return params, grads


def stored_state(tx, params, grads, steps=3):
    """A state after a few pure-JAX steps (so that every buffer is nonzero)."""
    state = tx.init(params)
    with native.pure_jax():
        step = jax.jit(fresh(tx.update))
        for t in range(steps):
            _, state = step(jax.tree.map(lambda g: g * (1 + t), grads), state, params)
    return state


def stored_leaves(state):
    return jax.tree.leaves(state, is_leaf=quantize.is_stored)


@needs_native
@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_the_kernel_stores_the_encoding_of_the_float32_rule(name, rng):
    tx8, tx32 = OPTIMIZERS[name](FMT), OPTIMIZERS[name](None)
    params, grads = params_and_grads(rng)
    grads["w"][0, :8] = [0.0, -0.0, 1e-30, 3e30, -3e30, np.inf, -np.inf, np.nan]
    state8 = stored_state(tx8, params, grads)
    assert lowered(tx8.update, grads, state8, params).count("_update_q8") >= 1
    u8, new8 = jax.jit(fresh(tx8.update))(grads, state8, params)
    # The float32 optimizer from the decoded state: the same compiled rule.
    decoded = jax.tree.map(
        lambda x: quantize.decode(x) if quantize.is_stored(x) else x,
        state8,
        is_leaf=quantize.is_stored,
    )
    u32, new32 = jax.jit(fresh(tx32.update))(grads, decoded, params)
    encoded = jax.tree.map(
        lambda q, x: quantize.reencode(x, q) if quantize.is_stored(q) else x,
        new8,
        new32,
        is_leaf=quantize.is_stored,
    )
    got, want = stored_leaves(new8), stored_leaves(encoded)
    assert len(got) == len(want) and any(quantize.is_stored(q) for q in got)
    for a, b in zip(got, want, strict=True):
        if quantize.is_stored(a):
            np.testing.assert_array_equal(np.asarray(a.codes), np.asarray(b.codes))
            bits = [np.asarray(q.scale, np.float32).view(np.uint32) for q in (a, b)]
            np.testing.assert_array_equal(*bits)  # NaN scales too
        else:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # The update is a function of the new state made of products, quotients,
    # square roots and sums of non-negative terms (m·r/(√(v·r)+ε), σ·m·r):
    # no cancellation, at most 8 roundings in either path, so the two agree
    # to 16u relative. A one-code change of the state moves u by at least
    # 1/128 of it in the top decade (checked below): far outside.
    for k in SHAPES:
        a, b = np.asarray(u8[k], np.float64), np.asarray(u32[k], np.float64)
        finite = np.isfinite(b)
        np.testing.assert_array_equal(np.isfinite(a), finite)
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        assert np.all(np.abs(a - b)[finite] <= 16 * U * np.abs(b)[finite] + 1e-38)


@needs_native
def test_the_update_bound_rejects_a_one_code_change(rng):
    tx8 = OPTIMIZERS["adam"](FMT)
    params, grads = params_and_grads(rng, {"w": (4, 256)})
    state8 = stored_state(tx8, params, grads)
    u, _ = jax.jit(fresh(tx8.update))(grads, state8, params)
    mu = state8[0].mu["w"]
    top = np.asarray(mu.codes).astype(np.int64) + 128 >= 200  # upper part of the map
    moved = quantize.Quantized(
        jnp.asarray(np.where(top, np.asarray(mu.codes) - 1, mu.codes).astype(np.int8)), mu.scale
    )
    state_moved = (state8[0]._replace(mu={"w": moved}), *state8[1:])
    u_moved, _ = jax.jit(fresh(tx8.update))(grads, state_moved, params)
    a, b = np.asarray(u["w"], np.float64), np.asarray(u_moved["w"], np.float64)
    assert top.sum() > 20 and np.all(np.abs(a - b)[top] > 16 * U * np.abs(a)[top])


@needs_native
def test_mixed_storage_and_scalars_take_the_pure_path(rng):
    params, grads = params_and_grads(rng, {"w": (4, 64)})
    mixed = bj.adam(1e-3, mu_dtype=FMT)  # nu in float32: no kernel for the mix
    state = mixed.init(params)
    text = lowered(mixed.update, grads, state, params)
    assert "_update_q8" not in text
    scalar = {"s": np.float32(0.5)}
    tx8 = OPTIMIZERS["adam"](FMT)
    assert "_update_q8" not in lowered(tx8.update, scalar, tx8.init(scalar), scalar)


def test_a_nan_makes_its_block_non_finite_in_every_reduction():
    # XLA's CPU reduction may drop NaNs in a float maximum over a large
    # array; the scale is taken on the bits, so the NaN stays visible.
    x = np.ones(70_001, np.float32)
    x[7], x[100], x[200], x[70_000] = np.nan, np.inf, np.nan, np.nan
    q = jax.jit(lambda x: quantize.encode(x, quantize.Blockwise8(16), True))(x)
    scale = np.asarray(q.scale)
    assert np.isnan(scale[[0, 12, 4375]]).all() and np.isinf(scale[6])
    assert np.isfinite(np.delete(scale, [0, 6, 12, 4375])).all()
    dec = np.asarray(quantize.decode(q))
    assert not np.isfinite(dec[:16]).any() and not np.isfinite(dec[96:112]).any()
    assert np.isfinite(dec[16:96]).all()


def _put(mesh, specs, tree):
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in tree.items()}


@pytest.mark.slow  # eight-device layouts; the float32 kernel's are in the inner loop
@needs_native
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_sharded_jit_runs_the_kernel_per_shard_and_equals_one_device(rng):
    mesh = mesh_4x2()
    # w: 128 columns over 2 devices = 64 each, whole blocks of 64: split.
    # v: 100 columns over 2 devices: blocks of 50 would straddle; gathered.
    shapes = {"w": (8, 128), "v": (4, 100), "b": (256,)}
    specs = {"w": P("data", "model"), "v": P(None, "model"), "b": P("data")}
    tx = OPTIMIZERS["sigma_filter_momentum"](FMT)
    params, grads = params_and_grads(rng, shapes)
    state = stored_state(tx, params, grads)
    one_u, one_s = jax.jit(fresh(tx.update))(grads, state, params)
    p_sh, g_sh = _put(mesh, specs, params), _put(mesh, specs, grads)
    s_sh = jax.device_put(state, bj.state_shardings(tx, p_sh))
    step = jax.jit(fresh(tx.update))
    compiled = step.lower(g_sh, s_sh, p_sh).compile().as_text()
    assert "_update_q8" in compiled
    # w's kernel sees its own 2 x 64 shard
    assert "f32[2,64]" in compiled
    u, s = step(g_sh, s_sh, p_sh)
    for a, b in zip(jax.tree.leaves((u, s)), jax.tree.leaves((one_u, one_s)), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert u["w"].sharding.is_equivalent_to(p_sh["w"].sharding, 2)


@needs_native
def test_vmap_and_every_instruction_set_copy_give_the_same_bits(rng):
    tx = OPTIMIZERS["amsgrad"](FMT)
    params, grads = params_and_grads(rng, {"w": (3, 4, 200)})
    state = stored_state(tx, params, grads)
    want = jax.jit(fresh(tx.update))(grads, state, params)
    # vmap over the leading axis: each row its own blocks (scales are per row)
    rows = jax.vmap(lambda g, s, p: tx.update(g, s, p))
    row_state = jax.vmap(tx.init)(params)
    assert "_update_q8" in lowered(rows, grads, row_state, params)
    got_rows = jax.jit(rows)(grads, row_state, params)
    with native.pure_jax():
        pure_rows = jax.jit(jax.vmap(lambda g, s, p: tx.update(g, s, p)))(grads, row_state, params)
    for a, b in zip(jax.tree.leaves(got_rows[1]), jax.tree.leaves(pure_rows[1]), strict=True):
        if a.dtype in (jnp.int8, jnp.uint8):  # from zero state: one step of g, exact or near
            assert np.mean(np.asarray(a) == np.asarray(b)) > 0.99
    for isa in native.supported_isas():
        assert native.select_isa(isa) is None
        try:
            got = jax.jit(lambda g, s, p: tx.update(g, s, p))(grads, state, params)
        finally:
            native.select_isa("auto")
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes(), isa


@needs_native
def test_training_with_donated_state_matches_the_pure_path_closely(rng):
    # 30 steps of 8-bit Adam on a least-squares problem, native vs pure: the
    # paths round the rule differently, so codes may part near decision
    # points; the losses must stay within 1% of each other.
    a = rng.normal(size=(64, 256)).astype(np.float32)
    y = rng.normal(size=(64,)).astype(np.float32)
    tx = OPTIMIZERS["adam"](FMT)

    def run():
        p = {"w": jnp.zeros((256,), jnp.float32)}
        s = tx.init(p)
        loss = lambda p: jnp.mean((a @ p["w"] - y) ** 2)  # noqa: E731

        @jax.jit
        def step(p, s):
            g = jax.grad(loss)(p)
            u, s = tx.update(g, s, p)
            return optax.apply_updates(p, u), s

        for _ in range(30):
            p, s = step(p, s)
        return float(loss(p))

    native_loss = run()
    with native.pure_jax():
        pure_loss = run()
    start = float(np.mean(y**2))
    assert native_loss < 0.9 * start and abs(native_loss - pure_loss) <= 0.01 * pure_loss


@needs_native
def test_the_self_test_catches_a_stored_kernel_that_stores_other_codes(monkeypatch):
    # The kernel's codes are moved by one wherever they can be: a kernel that
    # rounds to a neighbouring code must be turned off by the self-test.
    real = native.update_stored

    def one_code_off(rule, scalars, gs, states):
        us, new = real(rule, scalars, gs, states)
        moved = [
            [
                quantize.Quantized(jnp.where(q.codes < 100, q.codes + 1, q.codes), q.scale)
                for q in col
            ]
            for col in new
        ]
        return us, moved

    monkeypatch.setattr(native.calls, "update_stored", one_code_off)
    message = native.self_test()
    assert message is not None and "8-bit kernel stores other codes" in message
    monkeypatch.undo()
    assert native.self_test() is None
