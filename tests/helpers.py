"""Small utilities shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def run_updates(tx, grads, params=None):
    """Feeds a list of gradients through ``tx``; returns the updates as NumPy arrays."""
    params = jnp.zeros_like(jnp.asarray(grads[0])) if params is None else params
    state = tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        u, state = update(jnp.asarray(g), state, params)
        out.append(np.asarray(u))
    return out, state


def mesh_4x2():
    """A ("data", "model") mesh over the 8 simulated devices."""
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def abstract_of(tree):
    """``jax.ShapeDtypeStruct`` leaves carrying each array's shape, dtype and sharding."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)
