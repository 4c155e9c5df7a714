r"""Block-wise 8-bit storage of optimizer state (Dettmers et al., ICLR 2022).

A state array is stored as one 8-bit code per element and one float32 scale
per block of ``block_size`` consecutive elements along its last axis:

.. math::
    x \approx q[c] \cdot s_b, \qquad s_b = \max_{i \in b} |x_i|,

where :math:`q` is a fixed table of 256 values in [-1, 1] (signed, for first
moments) or [0, 1] (unsigned, for second moments and variances). The tables
are *dynamic*: each decade below the block maximum gets its own run of
linearly spaced values, the top decade the most, so small entries keep a
relative precision that a linear 8-bit grid would lose. Blocks run along the
last axis and the codes have the array's own shape, so a state array is
sharded exactly like its parameter; a block straddles devices only when a
device's share of the last axis is not a multiple of the block size.

Arithmetic never happens on codes: a step decodes to float32, runs the
transformation's own per-leaf rule, and encodes the result.

References:
  Dettmers, Lewis, Shleifer, Zettlemoyer. *8-bit Optimizers via Block-wise
  Quantization*. ICLR 2022. https://arxiv.org/abs/2110.02861
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayesopt_jax._src import buffers
from bayesopt_jax._src.types import Array

CODES = 256
DECADES = 7


F32 = jnp.float32


def _decade(count: int, level: int) -> np.ndarray:
    """``count`` values spread evenly over the decade ``[10**-level, 10**(1 - level)]``.

    Each value is the midpoint of one of ``count`` equal parts of the decade.
    """
    edges = np.linspace(0.1, 1.0, count + 1)
    return 10.0 ** (1 - level) * (edges[:-1] + edges[1:]) / 2


@functools.cache
def code_map(signed: bool) -> np.ndarray:
    """The 256 values a code stands for, sorted, in float64.

    Unsigned: 1, runs of 128, 64, ..., 2 values over the decades 1..7 below
    1, and one value in decade 8 — but no 0: a second moment rounded to 0
    would turn a small first moment into a step of ``m / eps`` (the
    zero-point problem of Li et al., 2023); the smallest code rounds it up
    instead, which only shortens such a step. An all-zero block is still
    exact (its scale is 0). Signed: 0, ±1, and for each sign runs of 64, 32,
    ..., 2 values over decades 1..6, plus one positive value in decade 7.
    """
    if signed:
        runs = [_decade(2 ** (7 - level), level) for level in range(1, DECADES)]
        positive = np.concatenate([[1.0], *runs, _decade(1, DECADES)])
        negative = -np.concatenate([[1.0], *runs])
        values = np.concatenate([negative, [0.0], positive])
    else:
        runs = [_decade(2 ** (8 - level), level) for level in range(1, DECADES + 1)]
        values = np.concatenate([[1.0], *runs, _decade(1, DECADES + 1)])
    values = np.sort(values)
    assert values.size == CODES and np.all(np.diff(values) > 0)
    return values


@functools.cache
def _tables(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """The code map in float32 and the midpoints between neighbours (the decision points)."""
    values = code_map(signed)
    return values.astype(np.float32), ((values[:-1] + values[1:]) / 2).astype(np.float32)


# The encoder finds an entry's code without a search. A float32 y in [-1, 1]
# falls in one of the buckets its top 16 bits name (sign, exponent, 7 mantissa
# bits; every |y| below 2**-30 in one bucket). Each bucket holds at most one
# decision point (checked when the table is built), so the code of y is the
# number of decision points below the bucket plus one if that point is below y.
_TOP_MIN = (127 - 30) << 7  # top 16 bits of 2**-30
_TOP_MAX = 0x3F80  # top 16 bits of 1.0
_BUCKETS = _TOP_MAX - _TOP_MIN + 2  # per sign; bucket 0 holds |y| < 2**-30


@functools.cache
def _buckets(signed: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per bucket, the number of decision points below it; the decision points padded with +inf."""
    _, mids = _tables(signed)
    top = np.arange(_BUCKETS)
    bits = np.where(top == 0, 0, (top - 1 + _TOP_MIN) << 16).astype(np.uint32)
    low = bits.view(np.float32)
    high = (bits | 0xFFFF).view(np.float32)
    high[0] = np.nextafter(np.float32(2.0**-30), np.float32(0))
    below = []
    for lo, hi in ((low, high), (-high, -low)):  # the y of each bucket: [lo, hi]
        first = np.searchsorted(mids, lo, side="left")
        if np.any(np.searchsorted(mids, hi, side="right") - first > 1):
            raise AssertionError("a bucket holds two decision points")
        below.append(first)
    return np.concatenate(below).astype(np.int32), np.append(mids, np.float32(np.inf))


def _nearest(normal: Array, signed: bool) -> Array:
    """Index of the nearest code for float32 ``normal`` in [-1, 1]: the count of decision points below.

    Equal to ``searchsorted(mids, normal, side="left")`` for every float32,
    with one table read per entry instead of a binary search's eight.
    """
    below, mids = _buckets(signed)
    bits = jax.lax.bitcast_convert_type(normal, jnp.uint32)
    sign = (bits >> 31).astype(jnp.int32)
    top = ((bits & 0x7FFFFFFF) >> 16).astype(jnp.int32)
    first = jnp.asarray(below)[sign * _BUCKETS + jnp.clip(top - _TOP_MIN + 1, 0, _BUCKETS - 1)]
    return first + (jnp.asarray(mids)[first] < normal)


@functools.cache
def kernel_tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """The encoder's and decoder's tables as the native kernels take them.

    ``values`` float32 ``[2, 256]`` and ``mids`` ``[2, 256]`` (decision
    points padded with +inf), ``below`` int32 ``[2, 2 * buckets]``; row 0 is
    the unsigned map, row 1 the signed one. And the top 16 bits of the
    smallest nonzero bucket's lower edge.
    """
    rows = [(_tables(signed)[0], *_buckets(signed)) for signed in (False, True)]
    values, below, mids = (np.stack(col) for col in zip(*rows, strict=True))
    return values, mids, below, _TOP_MIN


@dataclasses.dataclass(frozen=True)
class Blockwise8:
    """State storage format: 8-bit codes with one float32 scale per block of the last axis.

    Pass it where a state dtype goes (``mu_dtype=``, ``nu_dtype=``): first
    moments use the signed code map, second moments the unsigned one. A
    stored moment costs ``1 + 4 / block_size`` bytes per parameter.

    Args:
      block_size: elements per scale along the last axis (≥ 16). Smaller
        blocks follow local magnitudes more closely and cost more scales.
    """

    block_size: int = 256

    def __post_init__(self):
        size = self.block_size
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 16:
            raise ValueError(f"Blockwise8: `block_size` must be an int >= 16, got {size!r}.")
        # any integer type (NumPy's too) is kept as a Python int: hashable, comparable, static
        object.__setattr__(self, "block_size", int(size))


class Quantized(NamedTuple):
    """A state array in :class:`Blockwise8` storage.

    Attributes:
      codes: one 8-bit code per entry, in the array's shape: ``int8`` for the
        signed code map, ``uint8`` for the unsigned one.
      scale: float32, shape ``shape[:-1] + (blocks,)`` (``(1,)`` for a
        scalar): the last axis is cut into ``blocks`` runs of equal length
        (the last run shorter), each with its own scale.

    Everything else (which code map, the run length) follows from those
    dtypes and shapes, so the state is a plain pytree of two arrays that
    every JAX, Optax, Flax and Orbax utility handles.
    """

    codes: Any
    scale: Any

    # one state array, not a tree of two (for the tree checks of ``validation``)
    stands_for_one_array = True

    @property
    def signed(self) -> bool:
        return jnp.dtype(self.codes.dtype) == jnp.int8

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def block_size(self) -> int:
        return _run_length(self.shape, self.scale.shape[-1])


def _blocks(shape: tuple[int, ...], block_size: int) -> int:
    """How many scales the last axis gets: enough for runs of at most ``block_size``."""
    n = shape[-1] if shape else 1
    return max(1, math.ceil(n / block_size))


def _run_length(shape: tuple[int, ...], blocks: int) -> int:
    """The length of each run when the last axis is cut into ``blocks`` runs."""
    n = shape[-1] if shape else 1
    return max(1, math.ceil(n / blocks))


def _blocked(x: Array, blocks: int) -> tuple[Array, int]:
    """``x`` reshaped to ``(..., blocks, run)``, the last axis zero-padded; and the pad."""
    x = jnp.atleast_1d(x)
    run = _run_length(x.shape, blocks)
    pad = blocks * run - x.shape[-1]
    if pad:
        x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, pad)])
    return x.reshape(*x.shape[:-1], blocks, run), pad


def _unblocked(xb: Array) -> Array:
    """``(..., blocks, run)`` back to ``(..., blocks * run)`` (sizes spelt out: a leading axis may be 0)."""
    return xb.reshape(*xb.shape[:-2], xb.shape[-2] * xb.shape[-1])


def _max_magnitude(xb: Array) -> Array:
    """``max |x|`` over the last axis, NaN where a NaN is (with the largest NaN's bits).

    Taken on the bits: for non-negative floats the order of the bit patterns
    as integers is the order of the values, and every NaN's is above
    infinity's. A float maximum would do on paper, but XLA's CPU reduction
    drops NaNs in some fusions; an integer one is exact everywhere (and is
    what the native kernels compute, so the scales agree bit for bit).
    """
    bits = jax.lax.bitcast_convert_type(xb, jnp.uint32) & jnp.uint32(0x7FFFFFFF)
    return jax.lax.bitcast_convert_type(jnp.max(bits, axis=-1), jnp.float32)


def _encode(x: Array, signed: bool, blocks: int) -> Quantized:
    shape = jnp.shape(x)
    xb, pad = _blocked(jnp.asarray(x, jnp.float32), blocks)
    scale = _max_magnitude(xb)
    # One reciprocal per block and a product per entry, written out so that
    # every backend and the native kernels round alike (XLA would turn a
    # division by the broadcast scale into this product on some paths only).
    inverse = 1.0 / jnp.where(scale > 0, scale, 1.0)
    normal = xb * inverse[..., None]
    index = _nearest(normal, signed)
    index = jnp.where(jnp.isfinite(scale)[..., None], index, 0)
    codes = (index - 128).astype(jnp.int8) if signed else index.astype(jnp.uint8)
    codes = _unblocked(codes)
    if pad:
        codes = codes[..., : codes.shape[-1] - pad]
    return Quantized(codes.reshape(shape), scale)


def encode(x: Array, fmt: Blockwise8, signed: bool) -> Quantized:
    """``x`` (any float dtype) in block-wise 8-bit storage, each entry rounded to the nearest code.

    The last axis is cut into ``ceil(n / block_size)`` runs of equal length.
    A block whose entries are all zero gets scale 0. A non-finite entry makes
    its block's scale non-finite, and the whole block decodes to non-finite
    values (a NaN stays visible; it is never rounded to a finite code).
    """
    return _encode(x, signed, _blocks(tuple(jnp.shape(x)), fmt.block_size))


def decode(q: Quantized) -> Array:
    """The float32 array ``q`` stands for: ``code_map[codes] * scale`` per block."""
    values, _ = _tables(q.signed)
    index = q.codes.astype(jnp.int32) + (128 if q.signed else 0)
    xb, pad = _blocked(jnp.asarray(values)[index], q.scale.shape[-1])
    out = _unblocked(xb * q.scale[..., None])
    if pad:
        out = out[..., : out.shape[-1] - pad]
    return out.reshape(q.shape)


def decoded(tree: Any) -> Any:
    """``tree`` with every stored state array replaced by its float32 values."""
    return jax.tree.map(
        lambda x: decode(as_stored(x)) if is_stored(x) else x, tree, is_leaf=is_stored
    )


def reencode(x: Array, like: Quantized) -> Quantized:
    """``x`` encoded with the code map and blocks of ``like``."""
    return _encode(x, like.signed, like.scale.shape[-1])


def encoded_like(tree: Any, stored: Any) -> Any:
    """``tree`` (float32 values) stored as ``stored`` is: stored arrays re-encoded, the rest as is."""

    def leaf(old, x):
        q = as_stored(old)
        return x if q is None else like(reencode(x, q), old)

    return jax.tree.map(leaf, stored, tree, is_leaf=is_stored)


def zeros(x: Any, fmt: Blockwise8, signed: bool) -> Quantized:
    """Storage of zeros shaped like ``x`` (an array or ``ShapeDtypeStruct``), sharded like it."""
    return full(x, 0.0, fmt, signed)


def full(x: Any, value: Any, fmt: Blockwise8, signed: bool) -> Quantized:
    """Storage of ``value`` everywhere, shaped and sharded like ``x`` (exact: code ±1, scale |value|).

    What :func:`encode` gives for the full array, built without running the
    encoder over it: every block holds the same values, so one encoded entry
    gives every code and every scale (a first ``init`` of many shapes then
    costs what ``jnp.full`` costs, eagerly and under ``jit``).
    """
    try:
        code, magnitude = _one_entry(float(value), signed)
    except (TypeError, jax.errors.ConcretizationTypeError):  # a traced value: encode it all
        return encode(buffers.full_like(x, value, jnp.float32), fmt, signed)
    shape = tuple(jnp.shape(x))
    blocks = _blocks(shape, fmt.block_size)
    scale_shape = (*shape[:-1], blocks) if shape else (1,)
    layout = buffers.concrete_layout(x)
    if layout is not None and (layout[2] is None or _splits_like_arrays(layout[2])):
        sharding = layout[2]
        at = Quantized(None, None)
        if sharding is not None:
            spec = jax.ShapeDtypeStruct(shape, code.dtype), jax.ShapeDtypeStruct(scale_shape, F32)
            at = stored_shardings(Quantized(*spec), sharding)
        # Made by NumPy and placed: no XLA program to compile per new shape.
        return Quantized(
            _placed(np.full(shape, code), at.codes),
            _placed(np.full(scale_shape, magnitude), at.scale),
        )
    # Under a trace: computed from x, so that both arrays follow x's sharding.
    codes = buffers.full_like(x, code, code.dtype)
    if shape and shape[-1] >= blocks:  # the first `blocks` entries of the last axis, as a pattern
        scale = buffers.full_like(jnp.asarray(x)[..., :blocks], magnitude, F32)
    else:
        scale = jnp.full(scale_shape, magnitude, F32)
    return Quantized(codes, scale)


def _placed(x: np.ndarray, sharding: Any) -> Array:
    """``x`` on ``sharding`` (uncommitted on the default device where that is ``None``)."""
    return jnp.asarray(x) if sharding is None else jax.device_put(x, sharding)


def _splits_like_arrays(sharding: Any) -> bool:
    """Whether :func:`stored_shardings` can place a state's scales for ``sharding``."""
    return isinstance(sharding, jax.sharding.NamedSharding | jax.sharding.SingleDeviceSharding)


@functools.cache
def _one_entry(value: float, signed: bool) -> tuple[np.ndarray, np.float32]:
    """The code and the scale that :func:`encode` gives a block of ``value`` alone."""
    with jax.ensure_compile_time_eval():
        one = _encode(jnp.full((1,), value, F32), signed, 1)
        return np.asarray(one.codes)[0], np.float32(one.scale[0])


def whole_blocks(n: int, blocks: int, devices: int) -> bool:
    """Whether a last axis of ``n`` in ``blocks`` runs splits into ``devices`` equal shares of whole runs."""
    if devices <= 1:
        return True
    return n % devices == 0 and (n // devices) % _run_length((n,), blocks) == 0


def stored_shardings(q: Quantized, sharding: jax.sharding.Sharding) -> Quantized:
    """The shardings of ``q``'s arrays when the array it stores has ``sharding``.

    The codes take that sharding. The scales take it too along the leading
    axes; along the last axis they are split the same way when each device's
    share of that axis is a whole number of blocks, and replicated otherwise
    (the step is then still correct, but a block spans devices).
    """
    if not isinstance(sharding, jax.sharding.NamedSharding) or not q.shape:
        scale = sharding
    else:
        spec = list(sharding.spec) + [None] * (len(q.shape) - len(sharding.spec))
        last = spec[-1]
        names = () if last is None else (last,) if isinstance(last, str) else tuple(last)
        devices = math.prod(sharding.mesh.shape[n] for n in names)
        if not whole_blocks(q.shape[-1], q.scale.shape[-1], devices):
            spec[-1] = None  # blocks would straddle devices
        scale = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return Quantized(sharding, scale)


def as_stored(x: Any) -> Quantized | None:
    """``x`` as :class:`Quantized` if it is one state array in storage, else ``None``.

    Containers that rebuild pytrees as mappings (Flax NNX's ``State`` does
    that with the nodes inside an ``nnx.Optimizer``'s state) turn the
    NamedTuple into a mapping with the keys ``codes`` and ``scale``; that is
    recognised by its keys and dtypes.
    """
    if isinstance(x, Quantized):
        return x
    if isinstance(x, Mapping) and set(x.keys()) == {"codes", "scale"}:
        codes, scale = x["codes"], x["scale"]
        if (
            getattr(codes, "dtype", None) in (jnp.int8, jnp.uint8)
            and getattr(scale, "dtype", None) == jnp.float32
        ):
            return Quantized(codes, scale)
    return None


def is_stored(x: Any) -> bool:
    """Whether ``x`` is one state array in a storage format (a node that stands for one leaf)."""
    return as_stored(x) is not None


def like(q: Quantized, container: Any) -> Any:
    """``q`` in the container type ``container`` came in (see :func:`as_stored`)."""
    if isinstance(container, Quantized):
        return q
    return jax.tree.unflatten(jax.tree.structure(container), [q.codes, q.scale])


def is_format(dtype: Any) -> bool:
    """Whether a state-dtype argument names a storage format rather than a dtype."""
    return isinstance(dtype, Blockwise8)
