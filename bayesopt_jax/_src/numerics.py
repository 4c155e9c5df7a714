"""The numerics every rule shares: the compute dtype, clipping, storing, EMAs and debiasing.

Everything elementwise in this package is computed in at least float32 (see
:func:`compute_dtype`) and cast back to the dtype of the gradient (updates) or
of the state buffer (moments) at the end, so bf16/fp16 training never
accumulates in half precision and ``eps`` never underflows.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from bayesopt_jax._src.types import Array


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype arithmetic happens in: ``dtype`` promoted to at least float32."""
    return jnp.promote_types(dtype, jnp.float32)


def real_dtype(dtype: Any) -> jnp.dtype:
    """The real counterpart of a complex dtype; other dtypes (integers too) are returned as they are."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        return jnp.finfo(dtype).dtype
    return dtype


def abs_sq(x: Array) -> Array:
    """``|x|²`` elementwise; real for complex input."""
    if jnp.iscomplexobj(x):
        return jnp.real(x) ** 2 + jnp.imag(x) ** 2
    return x * x


def clip_limit(dtype: Any) -> float:
    """The largest gradient magnitude :func:`to_compute` lets through: ``sqrt(max)/2``."""
    return math.sqrt(float(jnp.finfo(real_dtype(dtype)).max)) / 2


def to_compute(g: Array) -> Array:
    """``g`` in its compute dtype, finite magnitudes clipped below ``sqrt(max)/2``.

    Beyond that bound (about 9.2e18 in float32) the square of a gradient, and
    so every second moment, would overflow to ``inf`` and freeze the state.
    Adam-type updates depend on the gradient through ratios of its moments,
    so a clipped gradient gives the step the unclipped one would tend to.
    Non-finite entries pass through unchanged: a NaN or ``inf`` gradient stays
    visible in the update (``optax.apply_if_finite`` skips such steps).
    """
    c = compute_dtype(g.dtype)
    gc = jnp.asarray(g).astype(c)
    limit = clip_limit(c)
    if jnp.issubdtype(c, jnp.complexfloating):
        limit /= math.sqrt(2.0)
        clip = jax.lax.complex(jnp.clip(gc.real, -limit, limit), jnp.clip(gc.imag, -limit, limit))
    else:
        clip = jnp.clip(gc, -limit, limit)
    return jnp.where(jnp.isfinite(gc), clip, gc)


def to_compute_again(g: Array) -> Array:
    """:func:`to_compute`'s values, as a second, different expression.

    Where the clipped gradient feeds both a state loop and the update loop
    (RMSProp, AdaGrad, the σ-filter without momentum), one shared expression
    is common-subexpression-eliminated by XLA into a buffer of its own,
    written by one loop and read by the others: an extra pass over memory and
    a temporary the size of the parameters (2.4× the step time of the
    σ-filter on 16.8M float32 parameters on a 2-core CPU). Written
    differently, each copy fuses into the loop that uses it. Identical
    values, non-finite entries included.
    """
    c = compute_dtype(g.dtype)
    gc = jnp.asarray(g).astype(c)
    if jnp.issubdtype(c, jnp.complexfloating):
        return to_compute(g)
    limit = clip_limit(c)
    return jnp.where(jnp.isnan(gc) | jnp.isinf(gc), gc, jnp.clip(gc, -limit, limit))


def store(x: Array, dtype: Any) -> Array:
    """Casts ``x`` to a state dtype, saturating at its largest finite value.

    A float16 buffer would otherwise turn any value above 65504 into ``inf``
    and never recover. Values that were already ``inf`` or NaN stay so.
    """
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.floating) and jnp.issubdtype(x.dtype, jnp.floating):
        top = float(jnp.finfo(dtype).max)
        if top < float(jnp.finfo(x.dtype).max):
            x = jnp.where(jnp.isfinite(x), jnp.clip(x, -top, top), x)
    return x.astype(dtype)


def leaf_dtype(x: Any) -> jnp.dtype:
    """The dtype of a parameter leaf (an array, a ``ShapeDtypeStruct`` or a number)."""
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.asarray(x).dtype


def debias_factor(decay: Any, count: Array, dtype: Any) -> Array:
    """``1 - decay**count`` in ``dtype`` (at least float32).

    At the saturated int32 count this is 1 (never 0, never NaN) for any
    ``decay`` in [0, 1).
    """
    dtype = real_dtype(compute_dtype(dtype))
    # 1 - d**t = -expm1(t log d): accurate to about one ulp even where
    # d**t is close to 1 (early steps), unlike the direct subtraction.
    if isinstance(decay, int | float):
        log_decay = jnp.asarray(math.log(decay) if decay > 0 else -math.inf, dtype)
    else:
        log_decay = jnp.log(jnp.asarray(decay, dtype))
    return -jnp.expm1(count.astype(dtype) * log_decay)


class Debias:
    """:func:`debias_factor` at one step count, computed once per (decay, dtype).

    An update over a tree of many leaves would otherwise trace the same
    scalar computation once per leaf, which costs compile time.
    """

    def __init__(self, count: Array):
        self.count = count
        self._cache: dict[tuple[int, Any], tuple[Any, Array]] = {}

    def __call__(self, decay: Any, dtype: Any) -> Array:
        key = (id(decay), real_dtype(compute_dtype(dtype)))
        if key not in self._cache:
            # keep ``decay`` alive with its value so that its id stays unique
            self._cache[key] = (decay, debias_factor(decay, self.count, dtype))
        return self._cache[key][1]


def ema(new: Array, old: Array, decay: Any) -> Array:
    """``decay * old + (1 - decay) * new`` (both already in the compute dtype)."""
    dt = real_dtype(new.dtype)
    # ``1 - decay`` is formed before the cast, so a Python decay of 0.9 gives
    # the same float32 weight 0.1 as Optax and PyTorch do.
    return jnp.asarray(decay, dt) * old + jnp.asarray(1 - decay, dt) * new


def clip_finite(x: Array) -> Array:
    """``x`` with ±∞ (and overflowing values) clipped to a quarter of the dtype's largest value."""
    big = jnp.asarray(float(jnp.finfo(x.dtype).max) / 4, x.dtype)
    return jnp.clip(x, -big, big)
