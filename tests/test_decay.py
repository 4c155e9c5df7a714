"""Decoupled weight decay and its masks."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bounds import check, track

import bayesopt_jax as bj


def _params():
    return {
        "dense": {"kernel": jnp.full((2, 2), 2.0), "bias": jnp.full(2, 3.0)},
        "scale": jnp.ones(1),
    }


def _zeros(p):
    return jax.tree.map(jnp.zeros_like, p)


def test_adds_wd_times_params():
    p = _params()
    tx = bj.add_decoupled_weight_decay(0.25)
    u, _ = tx.update(_zeros(p), tx.init(p), p)
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(p), strict=True):
        check(a, 0 + 0.25 * track(np.asarray(b), np.float32))


@pytest.mark.parametrize(
    "mask",
    [
        {"dense": {"kernel": True, "bias": False}, "scale": False},
        lambda params: jax.tree_util.tree_map_with_path(
            lambda path, _: path[-1].key == "kernel", params
        ),
    ],
    ids=["pytree", "callable"],
)
def test_masks(mask):
    p = _params()
    tx = bj.add_decoupled_weight_decay(0.5, mask=mask)
    u, _ = tx.update(_zeros(p), tx.init(p), p)
    np.testing.assert_array_equal(u["dense"]["kernel"], 1.0)  # 0.5 · 2.0, exact in binary
    np.testing.assert_array_equal(u["dense"]["bias"], 0.0)
    np.testing.assert_array_equal(u["scale"], 0.0)


def test_adamw_decay_is_scaled_by_learning_rate():
    p = _params()
    tx = bj.adamw(learning_rate=0.1, weight_decay=0.5)
    u, _ = tx.update(_zeros(p), tx.init(p), p)
    # zero gradient: Adam's part is exactly 0, decay part is -lr * wd * p
    for a, b in zip(jax.tree.leaves(u), jax.tree.leaves(p), strict=True):
        check(a, -0.1 * (0 + 0.5 * track(np.asarray(b), np.float32)))


def test_needs_params():
    tx = bj.add_decoupled_weight_decay(0.1)
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.zeros(2), tx.init(jnp.zeros(2)))


def test_bf16_params_keep_dtype():
    p = jnp.ones(3, jnp.bfloat16)
    tx = bj.adamw(1e-2)
    u, _ = tx.update(jnp.ones(3, jnp.bfloat16), tx.init(p), p)
    assert u.dtype == jnp.bfloat16
    assert optax.apply_updates(p, u).dtype == jnp.bfloat16
