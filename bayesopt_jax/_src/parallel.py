"""Data-parallel helpers."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import optax


def cross_replica_mean(axis_name: Hashable | tuple[Hashable, ...]) -> optax.GradientTransformation:
    r"""Averages updates over a named mapped axis (``pmap`` or ``shard_map``).

    .. math::
        u \leftarrow \frac{1}{R} \sum_{r=1}^{R} u^{(r)}

    Put it first in a chain so that every replica feeds the same mean
    gradient to the optimizer and the replicas' states stay identical.

    Args:
      axis_name: the mapped axis name (or a tuple of names) to average over.

    Returns:
      A stateless ``optax.GradientTransformation``; it must run inside a
      ``jax.pmap`` or ``jax.shard_map`` that binds ``axis_name``.

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from bayesopt_jax import cross_replica_mean
      >>> tx = cross_replica_mean("i")
      >>> n = jax.local_device_count()
      >>> g = jnp.arange(n, dtype=jnp.float32)
      >>> u = jax.pmap(lambda x: tx.update(x, tx.init(x))[0], axis_name="i")(g)
      >>> bool(jnp.allclose(u, g.mean()))
      True
    """

    def init_fn(params: Any) -> optax.EmptyState:
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        return jax.lax.pmean(updates, axis_name), state

    return optax.GradientTransformation(init_fn, update_fn)
