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
import numpy as np


def _concrete(value: Any) -> float | None:
    """Returns ``value`` as a float when it is a concrete real scalar."""
    if isinstance(value, bool):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if isinstance(value, np.ndarray | np.generic) and np.ndim(value) == 0:
        if np.issubdtype(np.asarray(value).dtype, np.floating) or np.issubdtype(
            np.asarray(value).dtype, np.integer
        ):
            return float(value)
    if isinstance(value, jax.Array) and not isinstance(value, jax.core.Tracer):
        if value.ndim == 0 and value.is_fully_addressable:
            return float(value)
    return None


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
    """Raises ``ValueError`` naming ``name`` when a concrete ``value`` is out of range.

    Non-finite values (NaN, ±inf) are always rejected.
    """
    x = _concrete(value)
    if x is None:
        return
    lo = "[" if low_inclusive else "("
    hi = "]" if high_inclusive else ")"
    allowed = f"{lo}{'-inf' if low is None else low}, {'inf' if high is None else high}{hi}"
    prefix = f"{where}: " if where else ""
    ok = np.isfinite(x)
    if ok and low is not None:
        ok = x >= low if low_inclusive else x > low
    if ok and high is not None:
        ok = x <= high if high_inclusive else x < high
    if not ok:
        raise ValueError(f"{prefix}`{name}` must lie in {allowed}, got {value!r}.")


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
