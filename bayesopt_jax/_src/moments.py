"""Shared building blocks: moments, bias correction, running maxima, counters.

Everything elementwise in this package is computed in at least float32 (see
:func:`compute_dtype`) and cast back to the dtype of the gradient (updates) or
of the state buffer (moments) at the end, so bf16/fp16 training never
accumulates in half precision and ``eps`` never underflows.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesopt_jax._src import validation
from bayesopt_jax._src.types import Array, PyTree

# --------------------------------------------------------------------------
# dtypes
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# state buffers
# --------------------------------------------------------------------------


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


def leaf_dtype(x: Any) -> jnp.dtype:
    """The dtype of a parameter leaf (an array, a ``ShapeDtypeStruct`` or a number)."""
    return jnp.dtype(x.dtype) if hasattr(x, "dtype") else jnp.asarray(x).dtype


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


# --------------------------------------------------------------------------
# tree plumbing
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# scalar pieces
# --------------------------------------------------------------------------


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


# --------------------------------------------------------------------------
# composable transformations
# --------------------------------------------------------------------------


class BiasCorrectionState(NamedTuple):
    """State of :func:`bias_correction`.

    Attributes:
      count: number of updates seen so far (int32, saturating).
    """

    count: Array


def bias_correction(decay: Any) -> optax.GradientTransformation:
    r"""Divides its input by ``1 - decay**t`` (the EMA debiasing of Kingma & Ba).

    .. math::
        t \leftarrow t + 1, \qquad u_t = x_t / (1 - \text{decay}^t)

    Placed after an undebiased exponential moving average with the same
    decay, it removes the bias towards the zero initialisation.

    Args:
      decay: the decay rate of the moving average being corrected, in [0, 1).

    Returns:
      An ``optax.GradientTransformation``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from bayesopt_jax import bias_correction
      >>> tx = optax.chain(optax.ema(0.9, debias=False), bias_correction(0.9))
      >>> state = tx.init(jnp.zeros(2))
      >>> u, state = tx.update(jnp.array([1.0, 2.0]), state)
      >>> [round(x, 4) for x in u.tolist()]  # the first debiased average is the first input
      [1.0, 2.0]

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015,
      section 3. https://arxiv.org/abs/1412.6980
    """
    validation.check_decay("decay", decay, "bias_correction")

    def init_fn(params):
        del params
        return BiasCorrectionState(count=zero_count())

    def update_fn(updates, state, params=None):
        updates = as_arrays(updates)
        del params
        count = optax.safe_increment(state.count)

        def leaf(x):
            c = compute_dtype(x.dtype)
            return (x.astype(c) / debias_factor(decay, count, c)).astype(x.dtype)

        return jax.tree.map(leaf, updates), BiasCorrectionState(count=count)

    return optax.GradientTransformation(init_fn, update_fn)


class AmsgradMaxState(NamedTuple):
    """State of :func:`amsgrad_max`.

    Attributes:
      count: number of updates seen so far (int32, saturating).
      nu_max: the elementwise maximum of every input seen so far.
    """

    count: Array
    nu_max: PyTree


def running_max(x: Array, prev: Array, count: Array) -> Array:
    """``max(prev, x)`` except on the first step (``count == 1``), where it is ``x``."""
    return jnp.where(count <= 1, x, jnp.maximum(prev, x))


def amsgrad_max() -> optax.GradientTransformation:
    r"""Replaces its input by the elementwise running maximum of all inputs so far.

    .. math::
        \hat v^{\max}_1 = x_1, \qquad \hat v^{\max}_t = \max(\hat v^{\max}_{t-1}, x_t)

    The maximum starts from the first input (not from zero), so it is a true
    running maximum for inputs of any sign. Real inputs only.

    Returns:
      An ``optax.GradientTransformation``; its state is
      :class:`AmsgradMaxState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import amsgrad_max
      >>> tx = amsgrad_max()
      >>> s = tx.init(jnp.zeros(2))
      >>> _, s = tx.update(jnp.array([3.0, -1.0]), s)
      >>> u, s = tx.update(jnp.array([1.0, -2.0]), s)
      >>> u
      Array([ 3., -1.], dtype=float32)

    References:
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
      https://openreview.net/forum?id=ryQu7f-RZ
    """

    def init_fn(params):
        return AmsgradMaxState(count=zero_count(), nu_max=tree_zeros_like(params))

    def update_fn(updates, state, params=None):
        updates = as_arrays(updates)
        del params
        check_tree_match("amsgrad_max", updates, state.nu_max, "nu_max")
        count = optax.safe_increment(state.count)

        def leaf(x, prev):
            new = running_max(x.astype(prev.dtype), prev, count)
            return new.astype(x.dtype), new

        out, nu_max = tree_map_multi(leaf, 2, updates, state.nu_max)
        return out, AmsgradMaxState(count=count, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def trace(decay: Any, *, nesterov: bool = False) -> optax.GradientTransformation:
    r"""Heavy-ball momentum :math:`b_t = \mu b_{t-1} + u_t`, output :math:`b_t`.

    With ``nesterov=True`` the output is :math:`u_t + \mu b_t`. The same
    recursion and state (``optax.TraceState``) as ``optax.trace``, but the
    buffer follows the parameters' sharding also when ``init`` runs under
    ``jit``. Internal: used by :func:`rmsprop`.
    """

    def init_fn(params):
        return optax.TraceState(trace=tree_zeros_like(params))

    def update_fn(updates, state, params=None):
        updates = as_arrays(updates)
        del params
        check_tree_match("trace", updates, state.trace, "trace")

        def leaf(g, t):
            c = compute_dtype(jnp.promote_types(g.dtype, t.dtype))
            gc = g.astype(c)
            new = gc + decay * t.astype(c)
            out = gc + decay * new if nesterov else new
            return store(out, g.dtype), store(new, t.dtype)

        out, new_trace = tree_map_multi(leaf, 2, updates, state.trace)
        return out, optax.TraceState(trace=new_trace)

    return optax.GradientTransformation(init_fn, update_fn)
