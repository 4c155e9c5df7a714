"""Data-parallel helpers."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import jax
import optax

from bayesopt_jax._src import quantize


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

    Examples:
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


def _sharding_of(leaf: Any, path: str) -> jax.sharding.Sharding:
    sharding = getattr(leaf, "sharding", None)
    if sharding is None:
        raise ValueError(
            f"state_shardings: params leaf {path} has no sharding; pass jax.Arrays or "
            "jax.ShapeDtypeStruct(shape, dtype, sharding=...) leaves."
        )
    return sharding


def _replicated_like(shardings: list[jax.sharding.Sharding]) -> jax.sharding.Sharding:
    for s in shardings:
        if isinstance(s, jax.sharding.NamedSharding):
            return jax.sharding.NamedSharding(s.mesh, jax.sharding.PartitionSpec())
    if shardings:
        devices = sorted(shardings[0].device_set, key=lambda d: d.id)
        if len(devices) == 1:
            return jax.sharding.SingleDeviceSharding(devices[0])
        mesh = jax.sharding.Mesh(devices, ("devices",))
        return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.sharding.SingleDeviceSharding(jax.devices()[0])


def state_shardings(tx: optax.GradientTransformation, params: Any) -> Any:
    """The sharding of every leaf of ``tx.init(params)``, computed without allocating it.

    State leaves that mirror a parameter (moments, maxima, σ) get that
    parameter's sharding; every other leaf (step counters, the full-matrix
    σ-filter's matrices) is replicated over the parameters' mesh. The result
    is what ``jax.jit(tx.init, out_shardings=...)`` and
    ``jax.jit(step, out_shardings=...)`` expect, and what the library's own
    ``init`` produces under ``jit`` for sharded parameters.

    To shard the state further than the parameters (ZeRO-style: state split
    over the data axis while parameters are replicated), map over this tree
    and the abstract state from ``jax.eval_shape(tx.init, params)``.

    Args:
      tx: any ``optax.GradientTransformation`` (chains and wrappers included).
      params: the parameters, as ``jax.Array`` leaves or
        ``jax.ShapeDtypeStruct`` leaves with a ``sharding``.

    Returns:
      A pytree of ``jax.sharding.Sharding`` with the structure of the state.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax.sharding import NamedSharding, PartitionSpec as P
      >>> import bayesopt_jax as bj
      >>> mesh = jax.sharding.Mesh(jax.devices()[:1], ("data",))
      >>> p = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32,
      ...                                sharding=NamedSharding(mesh, P("data")))}
      >>> s = bj.state_shardings(bj.adam(1e-3), p)
      >>> s[0].mu["w"].spec, s[0].count.spec
      (P('data',), P())
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    shardings = [_sharding_of(x, jax.tree_util.keystr(k)) for k, x in leaves_with_path]
    param_shardings = jax.tree.unflatten(treedef, shardings)
    replicated = _replicated_like(shardings)
    abstract = jax.eval_shape(tx.init, params)

    def mirror(leaf, sharding):
        if isinstance(
            leaf, optax.MaskedNode
        ):  # optax.masked, kahan_summation's full-precision leaves
            return leaf
        stored = quantize.as_stored(leaf)
        if stored is not None:
            return quantize.like(quantize.stored_shardings(stored, sharding), leaf)
        return sharding

    return optax.tree_map_params(
        tx,
        mirror,
        abstract,
        param_shardings,
        transform_non_params=lambda _: replicated,
        is_leaf=lambda x: (
            isinstance(x, jax.sharding.Sharding | optax.MaskedNode) or quantize.is_stored(x)
        ),
    )
