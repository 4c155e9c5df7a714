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


def contract(tx):
    """The elementwise contract (``engine.Elementwise``) of an optimizer chain's first part."""
    from bayesopt_jax._src import engine

    found = engine.description(engine.description(tx).parts[0])
    assert isinstance(found, engine.Elementwise), found
    return found


def mesh_4x2():
    """A ("data", "model") mesh over the 8 simulated devices."""
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "model"))


def abstract_of(tree):
    """``jax.ShapeDtypeStruct`` leaves carrying each array's shape, dtype and sharding."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def assert_paths_agree(got, want, fields, key, p_mag, state_mags, units):
    """Native against pure for one leaf ``key`` of a ``(params, (rule_state, ...))`` step.

    Parameters and each state field in ``fields`` must agree within ``units``
    float32 rounding units of their terms' magnitudes (``p_mag``,
    ``state_mags``), plus the flush of subnormal results; non-finite entries
    must be identical.
    """
    eps, tiny = float(np.finfo(np.float32).eps), float(np.finfo(np.float32).tiny)
    pairs = [("p", got[0][key], want[0][key], p_mag)]
    pairs += [
        (f, getattr(got[1][0], f)[key], getattr(want[1][0], f)[key], m)
        for f, m in zip(fields, state_mags, strict=True)
    ]
    for what, a, b, scale in pairs:
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        finite = np.isfinite(b) & np.isfinite(scale)
        np.testing.assert_array_equal(a[~finite], b[~finite], err_msg=f"{what}[{key}]")
        err = np.abs(a[finite] - b[finite]) - 4 * tiny
        assert np.all(err <= units * eps * scale[finite]), (what, key)
