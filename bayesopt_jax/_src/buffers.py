"""State buffers that follow the parameters' layout, and the tree plumbing of the rules.

Buffers are made on the parameters' sharding (also under ``jit``), so a state
is sharded as its parameters are; the tree helpers check and map the
``(updates, state)`` trees of an ``update`` call.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from bayesopt_jax._src.numerics import leaf_dtype, real_dtype
from bayesopt_jax._src.types import Array, PyTree


def concrete_layout(x: Any) -> tuple[tuple[int, ...], Any, Any] | None:
    """``(shape, dtype, sharding)`` of a concrete array or a ``ShapeDtypeStruct``; else None.

    The sharding is None where the buffer should be left uncommitted.
    """
    if isinstance(x, jax.ShapeDtypeStruct):
        return x.shape, x.dtype, getattr(x, "sharding", None)
    if isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer):
        # An uncommitted array (say, from jnp.ones) gets an uncommitted buffer:
        # committing it would change the jit cache key of the next step.
        return x.shape, x.dtype, x.sharding if getattr(x, "committed", True) else None
    return None


def zeros_like(x: Array, dtype: Any = None) -> Array:
    """Zeros shaped like ``x`` that follow ``x``'s sharding, also under ``jit``.

    For a concrete array (or a ``jax.ShapeDtypeStruct``) the zeros are made
    directly on its sharding: one cheap operation, so a first ``init`` on
    hundreds of new shapes costs what ``jnp.zeros_like`` costs. Under a
    trace, ``jnp.zeros_like`` of the argument would be a constant, and XLA's
    sharding propagation is free to place a constant anywhere (typically
    replicated); computing the zeros *from* ``x`` ties them to ``x``'s
    sharding, and ``where`` first removes non-finite values so that
    ``inf * 0`` cannot leak a NaN.
    """
    layout = concrete_layout(x)
    if layout is not None:
        shape, x_dtype, sharding = layout
        dtype = jnp.dtype(x_dtype) if dtype is None else jnp.dtype(dtype)
        return jnp.zeros(shape, dtype, device=sharding)
    x = jnp.asarray(x)
    dtype = x.dtype if dtype is None else jnp.dtype(dtype)
    finite = jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))
    zero = finite * jnp.zeros((), x.dtype)
    if jnp.iscomplexobj(zero) and not jnp.issubdtype(dtype, jnp.complexfloating):
        zero = jnp.real(zero)
    return zero.astype(dtype)


def full_like(x: Array, value: Any, dtype: Any = None) -> Array:
    """``value`` broadcast like ``x``, following ``x``'s sharding (see :func:`zeros_like`)."""
    layout = concrete_layout(x)
    if layout is not None:
        shape, x_dtype, sharding = layout
        dtype = jnp.dtype(x_dtype) if dtype is None else jnp.dtype(dtype)
        return jnp.full(shape, jnp.asarray(value).astype(dtype), dtype, device=sharding)
    z = zeros_like(x, dtype)
    return z + jnp.asarray(value).astype(z.dtype)


def _state_dtype(x: Any, dtype: Any, real: bool) -> Any:
    """The buffer dtype for leaf ``x``: ``dtype`` if given, else the leaf's (made real if asked)."""
    if dtype is not None:
        return dtype
    dt = leaf_dtype(x)
    return real_dtype(dt) if real else dt


def tree_zeros_like(tree: PyTree, dtype: Any = None, *, real: bool = False) -> PyTree:
    """:func:`zeros_like` on every leaf; ``real=True`` gives real buffers for complex leaves."""
    return jax.tree.map(lambda x: zeros_like(x, _state_dtype(x, dtype, real)), tree)


def tree_full_like(tree: PyTree, value: Any, dtype: Any = None, *, real: bool = False) -> PyTree:
    """:func:`full_like` on every leaf (``real`` as in :func:`tree_zeros_like`)."""
    return jax.tree.map(lambda x: full_like(x, value, _state_dtype(x, dtype, real)), tree)


def zero_count() -> Array:
    """A fresh int32 step counter (saturates via :func:`optax.safe_increment`)."""
    return jnp.zeros([], jnp.int32)


def as_arrays(tree: PyTree) -> PyTree:
    """``tree`` with Python and NumPy scalars turned into arrays (as Optax's math does implicitly)."""
    if all(isinstance(x, jax.Array) for x in jax.tree.leaves(tree)):
        return tree
    return jax.tree.map(jnp.asarray, tree)


def check_tree_match(
    where: str,
    tree: PyTree,
    reference: PyTree,
    ref_name: str,
    is_leaf: Callable[[Any], bool] | None = None,
) -> None:
    """Raises ``ValueError`` when ``tree`` does not have ``reference``'s structure.

    ``is_leaf`` marks the nodes of ``reference`` that stand for one leaf
    (state stored in a format of several arrays).
    """
    got = jax.tree.structure(tree)
    expected = jax.tree.structure(reference, is_leaf=is_leaf)
    if got != expected:
        raise ValueError(
            f"{where}: the updates tree does not match the optimizer state ({ref_name}).\n"
            f"  expected structure: {expected}\n"
            f"  got structure:      {got}\n"
            "Was the state initialised with a different parameter tree?"
        )


def tree_map_multi(
    fn: Callable[..., Sequence[Any]],
    num_outputs: int,
    tree: PyTree,
    *rest: PyTree,
) -> tuple[PyTree, ...]:
    """Maps ``fn`` (returning ``num_outputs`` values) over leaves; returns that many trees.

    ``rest`` must have ``tree``'s structure (or be ``None`` to pass ``None``).
    """
    leaves, treedef = jax.tree.flatten(tree)
    others = [[None] * len(leaves) if r is None else treedef.flatten_up_to(r) for r in rest]
    outs = [fn(*args) for args in zip(leaves, *others, strict=True)]
    if not outs:
        return tuple(treedef.unflatten([]) for _ in range(num_outputs))
    return tuple(treedef.unflatten(list(col)) for col in zip(*outs, strict=True))


def state_class(init: Callable[[Any], Any]) -> type:
    """The class of the state ``init`` makes, read without running it (``jax.eval_shape``).

    Optax does not export every state class at its top level (those with a
    count, a scheduled decay's); reading them from what its public functions
    return keeps our states interchangeable with Optax's without importing a
    private module.
    """
    return type(jax.eval_shape(init, jax.ShapeDtypeStruct((1,), jnp.float32)))
