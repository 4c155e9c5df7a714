r"""Counter-based Gaussian draws: the noise of a step as a function of (key, step, position).

The variational σ-filter perturbs every parameter at every step. Drawing
that noise with ``jax.random.normal`` per array costs a threefry call per
leaf (20 rounds per pair of words, and a separate program per array for
XLA to compile). Here one threefry call per step gives three 32-bit words
per leaf, and each entry's bits are a keyed hash of its position in the
leaf:

.. math::
    b = f\big(f(f(c \oplus k_0) \oplus k_1) \oplus k_2\big), \qquad
    \varepsilon = \sqrt 2\, \operatorname{erf}^{-1}(u(b)),

with :math:`c` the entry's row-major index, :math:`f` the 32-bit
``lowbias32`` mixer (two multiply-xorshift rounds; Wellons, *Prospecting
for Hash Functions*, 2018) and :math:`u(b) \in (-1, 1)` the top 23 bits of
:math:`b` placed at the centres of :math:`2^{23}` equal cells, symmetric
about 0. The inverse error function is XLA's, as ``jax.random.normal``
uses it. The result depends on nothing but the key, the step and the
entry's index: any sharding, any device count and a resumed run give the
same draws, and the per-entry work is elementwise arithmetic that XLA fuses
into the loop that uses it.

Exactness: the 32-bit words are integer arithmetic, identical everywhere;
the Gaussian value is one float32 (or float64) erf⁻¹ evaluation of an
exactly representable u, so two backends differ only by their erf⁻¹.

The native CPU kernel behind :func:`~bayesopt_jax.training_sample` (``Sample``
in ``native/kernels.cc``) computes the same bits and u from each entry's
index in the kernel and its own float32 erf⁻¹ (Giles' polynomials, as XLA's,
through a vectorizable logarithm): its ε and this module's are each within
a few float32 units of float64 √2·erf⁻¹(u), the bound the tests hold both to.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bayesopt_jax._src.types import Array

WORDS = 3  # key words per leaf
_U = jnp.uint32
_M1, _M2 = 0x7FEB352D, 0x846CA68B  # lowbias32's multipliers
_ROWS_SALT = 0x9E3779B9  # the golden ratio in 32 bits: spreads a row group into the last word


def step_words(key_data: Array, count: Array, leaves: int) -> Array:
    """``(leaves, 3)`` uint32 words for this step, from one threefry draw.

    ``key_data`` is a raw threefry key (two uint32 words), ``count`` the step.
    """
    key = jax.random.fold_in(jax.random.wrap_key_data(key_data), count)
    return jax.random.bits(key, (max(leaves, 1), WORDS), jnp.uint32)


def mix(x: Array) -> Array:
    """``lowbias32``: a bijection of uint32 with good avalanche (two multiply-xorshift rounds)."""
    x = x ^ (x >> 16)
    x = x * _U(_M1)
    x = x ^ (x >> 15)
    x = x * _U(_M2)
    return x ^ (x >> 16)


def _positions(shape: tuple[int, ...]) -> tuple[Array, Array | None]:
    """Each entry's row-major index mod ``2**32`` and, for leaves of ``2**32`` entries or more,
    the group of rows it falls in (``None`` when there is one group).

    The pair is injective: a group holds ``2**32 // row`` rows, so the index
    within a group fits 32 bits (a row itself must, or this raises).
    """
    size = math.prod(shape)
    if size < 2**32:
        return jax.lax.iota(_U, size).reshape(shape), None
    row = math.prod(shape[1:])
    if row >= 2**32:
        raise ValueError(
            f"counter-based draws: an array of shape {shape} has rows of {row} entries; "
            "rows below 2**32 entries are supported."
        )
    per_group = 2**32 // row
    r = jax.lax.broadcasted_iota(_U, shape, 0)
    c = jax.lax.iota(_U, row).reshape(shape[1:])
    return (r % _U(per_group)) * _U(row) + c, r // _U(per_group)


def bits(words: Array, shape: tuple[int, ...]) -> Array:
    """The uint32 bits of every entry of an array of ``shape`` for one leaf's ``words``."""
    pos, group = _positions(tuple(shape))
    last = words[2] if group is None else words[2] ^ (group * _U(_ROWS_SALT))
    return mix(mix(mix(pos ^ words[0]) ^ words[1]) ^ last)


def uniform_pm1(b: Array, dtype: Any) -> Array:
    """``u in (-1, 1)``: the top 23 bits of ``b`` as the centres of 2**23 equal cells.

    ``u = (2k + 1) / 2**23 - 1`` for ``k = b >> 9``: exact in float32, never
    ±1 (so erf⁻¹ stays finite), and ``-u`` is as likely as ``u``.
    """
    k = (b >> 9).astype(jnp.int32)
    return ((2 * k + 1).astype(dtype) * dtype(2.0**-23) - 1).astype(dtype)


def normal(words: Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> Array:
    """Standard normal draws of ``shape`` for one leaf's ``words`` (float32 or float64)."""
    return normal_from_uniform(uniform_pm1(bits(words, shape), jnp.dtype(dtype).type))


def normal_from_uniform(u: Array) -> Array:
    """``√2 erf⁻¹(u)``: the standard normal quantile of ``(u + 1)/2``, in ``u``'s dtype."""
    return jnp.asarray(math.sqrt(2.0), u.dtype) * jax.lax.erf_inv(u)


def uniform_reference(words: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """NumPy transcription of the uniform ``u`` behind :func:`normal` (float64), for arrays
    below 2**32 entries; the tests apply an independent erf⁻¹ to it."""
    w = [np.uint64(int(x)) for x in np.asarray(words, np.uint32)]
    mask = np.uint64(0xFFFFFFFF)

    def f(x):
        x = x ^ (x >> np.uint64(16))
        x = (x * np.uint64(_M1)) & mask
        x = x ^ (x >> np.uint64(15))
        x = (x * np.uint64(_M2)) & mask
        return x ^ (x >> np.uint64(16))

    c = np.arange(math.prod(shape), dtype=np.uint64)
    b = f(f(f(c ^ w[0]) ^ w[1]) ^ w[2])
    k = (b >> np.uint64(9)).astype(np.float64)
    return ((2 * k + 1) * 2.0**-23 - 1).reshape(shape)
