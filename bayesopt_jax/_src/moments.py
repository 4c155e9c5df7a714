"""The small composable transformations of moments: bias correction, running maxima, traces."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesopt_jax._src import buffers, numerics, validation
from bayesopt_jax._src.types import Array, PyTree


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
        return BiasCorrectionState(count=buffers.zero_count())

    def update_fn(updates, state, params=None):
        updates = buffers.as_arrays(updates)
        del params
        count = optax.safe_increment(state.count)

        def leaf(x):
            c = numerics.compute_dtype(x.dtype)
            return (x.astype(c) / numerics.debias_factor(decay, count, c)).astype(x.dtype)

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
        return AmsgradMaxState(count=buffers.zero_count(), nu_max=buffers.tree_zeros_like(params))

    def update_fn(updates, state, params=None):
        updates = buffers.as_arrays(updates)
        del params
        buffers.check_tree_match("amsgrad_max", updates, state.nu_max, "nu_max")
        count = optax.safe_increment(state.count)

        def leaf(x, prev):
            new = running_max(x.astype(prev.dtype), prev, count)
            return new.astype(x.dtype), new

        out, nu_max = buffers.tree_map_multi(leaf, 2, updates, state.nu_max)
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
        return optax.TraceState(trace=buffers.tree_zeros_like(params))

    def update_fn(updates, state, params=None):
        updates = buffers.as_arrays(updates)
        del params
        buffers.check_tree_match("trace", updates, state.trace, "trace")

        def leaf(g, t):
            c = numerics.compute_dtype(jnp.promote_types(g.dtype, t.dtype))
            gc = g.astype(c)
            new = gc + decay * t.astype(c)
            out = gc + decay * new if nesterov else new
            return numerics.store(out, g.dtype), numerics.store(new, t.dtype)

        out, new_trace = buffers.tree_map_multi(leaf, 2, updates, state.trace)
        return out, optax.TraceState(trace=new_trace)

    return optax.GradientTransformation(init_fn, update_fn)
