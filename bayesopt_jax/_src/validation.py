"""Construction-time checks of hyperparameters.

Only concrete Python or NumPy numbers are checked. Arrays that are being traced
(for example hyperparameters injected by ``optax.inject_hyperparams``) and
schedules (callables) pass through untouched: they cannot be inspected without
a host round trip, and under ``jit`` they have no value yet.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def _concrete(value: Any) -> float | None:
    """Returns ``value`` as a float when it is a concrete real scalar."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray | np.generic) and np.ndim(value) == 0:
        dtype = np.asarray(value).dtype
        if jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer):
            return float(value)
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        if value.ndim == 0 and value.is_fully_addressable:
            return float(value)
    return None


def _describe(low, high, low_inclusive, high_inclusive) -> str:
    """The allowed values in words: "a number in [0, 1)", "a finite number ≥ 0", ..."""
    if low is not None and high is not None:
        lo = "[" if low_inclusive else "("
        hi = "]" if high_inclusive else ")"
        return f"a number in {lo}{low:g}, {high:g}{hi}"
    if low is not None:
        return f"a finite number {'≥' if low_inclusive else '>'} {low:g}"
    if high is not None:
        return f"a finite number {'≤' if high_inclusive else '<'} {high:g}"
    return "a finite number"


def check_number(name: str, value: Any, where: str = "") -> None:
    """Raises ``ValueError`` unless ``value`` is a real number, a numeric array or a tracer."""
    if isinstance(value, jax.Array | np.ndarray | np.generic):
        dtype = np.asarray(value).dtype if not isinstance(value, jax.Array) else value.dtype
        # jnp.issubdtype also knows the ml_dtypes floats (bfloat16, float8_*).
        if jnp.issubdtype(dtype, jnp.number) and not jnp.issubdtype(dtype, jnp.complexfloating):
            return
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        return
    prefix = f"{where}: " if where else ""
    raise ValueError(
        f"{prefix}`{name}` must be a real number or an array, got {value!r} "
        f"({type(value).__name__})."
    )


def check_range(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    where: str = "",
) -> None:
    """Raises ``ValueError`` naming ``name`` when ``value`` is not a number, or out of range.

    Non-finite values (NaN, ±inf) are always rejected. Only concrete values
    are range-checked; traced ones pass.
    """
    check_number(name, value, where)
    x = _concrete(value)
    if x is None:
        return
    prefix = f"{where}: " if where else ""
    ok = np.isfinite(x)
    if ok and low is not None:
        ok = x >= low if low_inclusive else x > low
    if ok and high is not None:
        ok = x <= high if high_inclusive else x < high
    if not ok:
        allowed = _describe(low, high, low_inclusive, high_inclusive)
        raise ValueError(f"{prefix}`{name}` must be {allowed}, got {value!r}.")


def check_decay(name: str, value: Any, where: str = "") -> None:
    """A decay rate (``b1``, ``b2``, ``beta``, ``decay``) must lie in [0, 1)."""
    check_range(name, value, low=0.0, high=1.0, high_inclusive=False, where=where)


def check_nonnegative(name: str, value: Any, where: str = "") -> None:
    check_range(name, value, low=0.0, where=where)


def check_learning_rate(value: float | jax.Array | Callable[[Any], Any], where: str = "") -> None:
    """A learning rate is a non-negative number or a schedule (callable)."""
    if callable(value):
        return
    check_nonnegative("learning_rate", value, where=where)


def check_update(where: str, updates: Any, state: Any, params: Any) -> None:
    """Checks an ``update`` call's trees before any arithmetic (static: shapes only).

    ``params`` (when given) must have the gradients' structure and every leaf
    its gradient's shape; so must every part of ``state`` that has the
    gradients' structure (moments, σ, momentum). Raises ``ValueError`` naming
    ``where``, the leaf path and both shapes.
    """
    leaves, treedef = jax.tree_util.tree_flatten_with_path(updates)
    if not leaves:
        return  # nothing to check (say, a branch masked out by ``optax.masked``)
    if params is not None:
        try:
            p_leaves = treedef.flatten_up_to(params)
        except (ValueError, TypeError):
            raise ValueError(
                f"{where}: `params` does not have the structure of the gradients.\n"
                f"  gradients: {treedef}\n  params:    {jax.tree.structure(params)}"
            ) from None
        _same_shapes(where, leaves, p_leaves, "`params`")
    bare = jax.tree_util.treedef_is_leaf(treedef)
    for field, part in _state_parts(state):
        if jax.tree.structure(part, is_leaf=_one_leaf) != treedef:
            continue
        if (
            bare
            and not _one_leaf(part)
            and not (
                jax.numpy.issubdtype(jax.numpy.result_type(part), jax.numpy.inexact)
                and np.ndim(part) == np.ndim(leaves[0][1])
            )
        ):
            continue  # a single-array model: only same-rank float buffers mirror it, not counts
        _same_shapes(where, leaves, treedef.flatten_up_to(part), f"the state's `{field}`")


def _one_leaf(x: Any) -> bool:
    """Whether ``x`` is a node that stands for one state array (say, 8-bit storage).

    Such a node class sets ``stands_for_one_array = True`` and has a ``shape``:
    the checks compare that shape and never look inside.
    """
    return getattr(type(x), "stands_for_one_array", False) is True


def _same_shapes(where: str, leaves, others, what: str) -> None:
    for (path, g), o in zip(leaves, others, strict=True):
        if g is None or o is None or not hasattr(o, "shape"):
            continue
        shape = tuple(o.shape) if _one_leaf(o) else np.shape(o)
        if np.shape(g) != shape:
            raise ValueError(
                f"{where}: at {jax.tree_util.keystr(path) or 'the root'}, the gradient has shape "
                f"{tuple(np.shape(g))} but {what} has shape {tuple(np.shape(o))}; was the "
                "optimizer initialised for other parameters?"
            )


def _state_parts(state: Any):
    """(field name, value) for every field of the named tuples in ``state``."""
    if _one_leaf(state):
        return  # one state array: its parts mirror nothing
    if isinstance(state, tuple) and hasattr(state, "_fields"):
        skip = getattr(state, "not_per_parameter", ())  # fields a state declares are no mirrors
        for name in state._fields:
            if name in skip:
                continue
            value = getattr(state, name)
            yield name, value
            yield from _state_parts(value)
    elif isinstance(state, tuple | list):
        for item in state:
            yield from _state_parts(item)


def check_choice(name: str, value: Any, choices: tuple[Any, ...], where: str = "") -> None:
    if value not in choices:
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}`{name}` must be one of {choices}, got {value!r}.")


def check_dtype(name: str, value: Any, where: str = "") -> None:
    """``None`` or something that names a floating-point dtype."""
    if value is None:
        return
    try:
        dt = jax.numpy.dtype(value)
    except TypeError as err:
        raise ValueError(f"{where}: `{name}` is not a dtype: {value!r}.") from err
    if not jax.numpy.issubdtype(dt, jax.numpy.inexact):
        raise ValueError(f"{where}: `{name}` must be a floating dtype, got {dt}.")


def is_static_zero(value: Any) -> bool:
    """True for a plain Python/NumPy zero (not for arrays or tracers).

    Used to skip allocating a buffer (e.g. momentum) that a plain ``0.0``
    makes useless. Injected hyperparameters arrive as arrays and so always get
    the buffer, which keeps the state structure the same for every value.
    """
    x = _concrete(value) if not isinstance(value, jax.Array) else None
    return x == 0.0


def key_data(key: Any, where: str) -> jax.Array:
    """``key`` (an int seed, a typed PRNG key, or raw uint32[2] data) as raw threefry key data."""
    if isinstance(key, int | jnp.integer) and not isinstance(key, bool):
        return jax.random.key_data(jax.random.key(int(key)))
    if isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"{where}: `key` must be a single PRNG key, got shape {key.shape}.")
        return jax.random.key_data(key)
    arr = jnp.asarray(key)
    if arr.shape == () and jnp.issubdtype(arr.dtype, jnp.integer):
        return jax.random.key_data(
            jax.random.key(arr)
        )  # an int seed as an array (inject_hyperparams)
    if arr.dtype != jnp.uint32 or arr.shape != (2,):
        raise ValueError(
            f"{where}: `key` must be an int seed, a PRNG key from jax.random.key, or "
            f"raw threefry key data (uint32[2]); got {type(key).__name__} "
            f"{getattr(arr, 'dtype', '')}{list(getattr(arr, 'shape', ()))}."
        )
    return arr
