"""Packed trees: pack/unpack, gradients and optimizers on a few buffers."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bayesopt_jax as bj

SHAPES = {"w": (7, 5), "b": (5,), "s": (), "e": (3, 0), "v": (2, 3, 4)}


def tree(rng):
    out = {k: jnp.asarray(rng.normal(size=s), jnp.float32) for k, s in SHAPES.items()}
    out["h"] = jnp.asarray(rng.normal(size=(4,)), jnp.bfloat16)
    out["i"] = jnp.arange(6, dtype=jnp.int32).reshape(2, 3)
    return out


def bits(t):
    return [
        (np.asarray(x).dtype, np.asarray(x).shape, np.asarray(x).tobytes())
        for x in jax.tree.leaves(t)
    ]


def test_unpack_returns_the_tree_exactly(rng):
    params = tree(rng)
    packed = bj.pack(params)
    # one buffer per dtype, in order of first appearance (leaves in key order)
    assert [b.dtype for b in packed.buffers] == [jnp.float32, jnp.bfloat16, jnp.int32]
    assert [b.size for b in packed.buffers] == [35 + 5 + 1 + 0 + 24, 4, 6]
    assert bits(bj.unpack(packed)) == bits(params)
    assert bits(jax.jit(bj.unpack)(packed)) == bits(params)
    assert "Packed(" in repr(packed)


def test_gradients_of_a_packed_tree_are_the_packed_gradients(rng):
    params = {k: v for k, v in tree(rng).items() if v.dtype == jnp.float32}

    def loss(p):
        return sum(jnp.sum(jnp.sin(x) * (i + 1)) for i, x in enumerate(jax.tree.leaves(p)))

    packed = bj.pack(params)
    g_packed = jax.jit(jax.grad(lambda q: loss(bj.unpack(q))))(packed)
    assert isinstance(g_packed, bj.Packed) and g_packed.layout == packed.layout
    # each gradient element is the same cos(x)·(i+1), wherever it is stored
    assert bits(bj.unpack(g_packed)) == bits(jax.jit(jax.grad(loss))(params))


@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: bj.adam(1e-2),
        lambda: bj.adamw(1e-2, weight_decay=0.1),
        lambda: bj.amsgrad(1e-2),
        lambda: bj.sigma_filter(1e-2, b1=0.9),
        lambda: bj.sigma_fixed_point(1e-2),
    ],
)
def test_an_elementwise_optimizer_gives_the_same_elements_packed(make_tx, rng):
    # The native rule computes each element by one fixed sequence of float32
    # operations, whatever buffer holds it: packed and unpacked agree bit for bit.
    if not bj.native_available():
        pytest.skip("needs the native kernels (XLA may compile the two layouts differently)")
    tx = make_tx()
    params = {k: v for k, v in tree(rng).items() if v.dtype == jnp.float32 and v.size}
    grads = [jax.tree.map(lambda x, i=i: jnp.cos(x * (i + 1)), params) for i in range(3)]

    @jax.jit
    def run_tree(p):
        s = tx.init(p)
        for g in grads:
            p, s = bj.fused_step(tx, g, s, p)
            u, s = tx.update(g, s, p)
            p = optax.apply_updates(p, u)
        return p

    @jax.jit
    def run_packed(q):
        s = tx.init(q)
        for g in grads:
            q, s = bj.fused_step(tx, bj.pack(g), s, q)
            u, s = tx.update(bj.pack(g), s, q)
            q = optax.apply_updates(q, u)
        return q

    assert bits(bj.unpack(run_packed(bj.pack(params)))) == bits(run_tree(params))


def test_a_mask_over_packs_decays_only_what_it_names(rng):
    w = {"a": jnp.ones((3, 2)), "b": jnp.ones((4,))}
    params = {"decay": bj.pack(w), "keep": bj.pack({"bias": jnp.ones(2)})}
    tx = bj.adamw(0.1, weight_decay=0.5, mask={"decay": True, "keep": False})
    zeros = jax.tree.map(jnp.zeros_like, params)
    u, _ = tx.update(zeros, tx.init(params), params)
    np.testing.assert_array_equal(np.asarray(u["decay"].buffers[0]), np.full(10, -0.05, np.float32))
    np.testing.assert_array_equal(np.asarray(u["keep"].buffers[0]), np.zeros(2, np.float32))
