"""Data-parallel helpers."""

from __future__ import annotations

import math
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


def state_shardings(
    tx: optax.GradientTransformation,
    params: Any,
    *,
    split_over: str | tuple[str, ...] | None = None,
) -> Any:
    """The sharding of every leaf of ``tx.init(params)``, computed without allocating it.

    State leaves that mirror a parameter (moments, maxima, σ) get that
    parameter's sharding; every other leaf (step counters, the full-matrix
    σ-filter's matrices) is replicated over the parameters' mesh. The result
    is what ``jax.jit(tx.init, out_shardings=...)`` and
    ``jax.jit(step, out_shardings=...)`` expect, and what the library's own
    ``init`` produces under ``jit`` for sharded parameters.

    With ``split_over``, the state is sharded further than the parameters
    (ZeRO stage 1, Rajbhandari et al., 2020: optimizer state split over the
    data axis while the parameters are replicated there). Each array that
    mirrors a parameter is also split over that mesh axis along its first
    dimension that is not sharded yet and whose length the axis size
    divides; arrays with no such dimension keep the parameter's sharding. A
    block-wise 8-bit array (:class:`bayesopt_jax.Blockwise8`) is split only
    where every block stays whole on one device: along a leading axis, or
    along its last axis when each device's share is a whole number of
    blocks. The update is elementwise, so XLA computes each state shard where
    it lives and gathers only the updates.

    Args:
      tx: any ``optax.GradientTransformation`` (chains and wrappers included).
      params: the parameters, as ``jax.Array`` leaves or
        ``jax.ShapeDtypeStruct`` leaves with a ``sharding``.
      split_over: a mesh axis name (or a tuple of names) of the parameters'
        ``NamedSharding`` mesh to split the mirroring state arrays over;
        ``None`` (default) gives them the parameters' shardings exactly.

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
      >>> q = {"w": jax.ShapeDtypeStruct((4, 2), jnp.float32,
      ...                                sharding=NamedSharding(mesh, P()))}
      >>> bj.state_shardings(bj.adam(1e-3), q, split_over="data")[0].nu["w"].spec
      P('data', None)
    """
    leaves_with_path, treedef = jax.tree_util.tree_flatten_with_path(params)
    shardings = [_sharding_of(x, jax.tree_util.keystr(k)) for k, x in leaves_with_path]
    param_shardings = jax.tree.unflatten(treedef, shardings)
    replicated = _replicated_like(shardings)
    abstract = jax.eval_shape(tx.init, params)

    split = None if split_over is None else _split_axis(split_over, shardings)

    def mirror(leaf, sharding):
        if isinstance(
            leaf, optax.MaskedNode
        ):  # optax.masked, kahan_summation's full-precision leaves
            return leaf
        stored = quantize.as_stored(leaf)
        if stored is not None:
            out = quantize.stored_shardings(stored, sharding)
            if split is not None:
                out = _split_stored(stored, out, *split)
            return quantize.like(out, leaf)
        if split is not None:
            return _split(leaf.shape, sharding, *split)
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


def _split_axis(
    split_over: str | tuple[str, ...], shardings: list[jax.sharding.Sharding]
) -> tuple[tuple[str, ...], int]:
    """``split_over`` as a tuple of mesh axis names, and the number of devices along them."""
    names = (split_over,) if isinstance(split_over, str) else tuple(split_over)
    meshes = {s.mesh for s in shardings if isinstance(s, jax.sharding.NamedSharding)}
    if len(meshes) != 1 or not all(isinstance(s, jax.sharding.NamedSharding) for s in shardings):
        raise ValueError(
            f"state_shardings: `split_over`={split_over!r} needs every parameter to have a "
            "NamedSharding over one mesh."
        )
    (mesh,) = meshes
    if not names or any(n not in mesh.shape for n in names):
        raise ValueError(
            f"state_shardings: `split_over`={split_over!r} names no axis of the parameters' "
            f"mesh {dict(mesh.shape)}."
        )
    return names, math.prod(mesh.shape[n] for n in names)


def _padded_spec(sharding: jax.sharding.NamedSharding, ndim: int) -> list[Any]:
    return list(sharding.spec) + [None] * (ndim - len(sharding.spec))


def _free_axis(
    shape: tuple[int, ...], spec: list[Any], axes: Any, names: tuple[str, ...], devices: int
) -> int | None:
    """The first of ``axes`` not sharded yet whose length ``devices`` divides (None if none,
    or if the array is already sharded over ``names``)."""
    used = {n for e in spec if e is not None for n in ((e,) if isinstance(e, str) else e)}
    if used & set(names):
        return None
    return next((a for a in axes if spec[a] is None and shape[a] % devices == 0), None)


def _with(sharding: jax.sharding.NamedSharding, spec: list[Any], axis: int, names: tuple[str, ...]):
    spec = list(spec)
    spec[axis] = names[0] if len(names) == 1 else names
    return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))


def _split(
    shape: tuple[int, ...], sharding: jax.sharding.Sharding, names: tuple[str, ...], devices: int
) -> jax.sharding.Sharding:
    """``sharding``, also split over ``names`` along the first free dimension they divide."""
    spec = _padded_spec(sharding, len(shape))
    axis = _free_axis(shape, spec, range(len(shape)), names, devices)
    return sharding if axis is None else _with(sharding, spec, axis, names)


def _split_stored(
    q: quantize.Quantized, shardings: quantize.Quantized, names: tuple[str, ...], devices: int
) -> quantize.Quantized:
    """Codes and scales of ``q`` split along the same axis, every block whole on one device."""
    shape = q.shape
    if not shape:
        return shardings
    codes_spec = _padded_spec(shardings.codes, len(shape))
    whole = quantize.whole_blocks(shape[-1], q.scale.shape[-1], devices)
    axes = range(len(shape) if whole else len(shape) - 1)
    axis = _free_axis(shape, codes_spec, axes, names, devices)
    if axis is None:
        return shardings
    scale_spec = _padded_spec(shardings.scale, len(shape))
    return quantize.Quantized(
        _with(shardings.codes, codes_spec, axis, names),
        _with(shardings.scale, scale_spec, axis, names),
    )
