"""Decoupled weight decay (the "W" of AdamW)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import optax

from bayesopt_jax._src import buffers, engine, numerics, validation
from bayesopt_jax._src.types import PyTree

_OPTAX_ADD_DECAYED_WEIGHTS = optax.add_decayed_weights  # as imported (see adam.py)


@functools.cache
def _schedule_state() -> type:
    """Optax's state class for a scheduled decay (the step count), so that a chain's state
    matches ``optax.add_decayed_weights``'s leaf for leaf (see :func:`.buffers.state_class`)."""
    return buffers.state_class(_OPTAX_ADD_DECAYED_WEIGHTS(lambda count: 0.0).init)


def add_decoupled_weight_decay(
    weight_decay: float | jax.Array = 1e-4,
    mask: PyTree | Callable[[PyTree], PyTree] | None = None,
) -> optax.GradientTransformation:
    r"""Adds ``weight_decay * params`` to the incoming updates.

    .. math::
        u_t \leftarrow u_t + \lambda\, \theta_{t-1}

    Placed after an adaptive scaling and before the learning-rate step (as
    :func:`~bayesopt_jax.adamw` does), the decay is *decoupled* from the
    adaptive denominator and multiplied by the learning rate, which is the
    convention of ``torch.optim.AdamW`` and of Loshchilov & Hutter.

    Args:
      weight_decay: the decay rate :math:`\lambda`, >= 0: a number, a traced
        value, or a schedule of the step count (as ``optax.add_decayed_weights``).
      mask: a pytree of booleans with the parameters' structure (or a prefix
        of it), or a callable that maps the parameters to one; only leaves
        marked ``True`` are decayed. ``None`` decays every leaf.

    Returns:
      An ``optax.GradientTransformation``; it needs ``params`` in ``update``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import add_decoupled_weight_decay
      >>> params = {"w": jnp.ones(2), "b": jnp.ones(1)}
      >>> tx = add_decoupled_weight_decay(0.1, mask={"w": True, "b": False})
      >>> u, _ = tx.update({"w": jnp.zeros(2), "b": jnp.zeros(1)}, tx.init(params), params)
      >>> u["w"], u["b"]
      (Array([0.1, 0.1], dtype=float32), Array([0.], dtype=float32))

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
      https://arxiv.org/abs/1711.05101
    """
    scheduled = callable(weight_decay)
    if not scheduled:
        validation.check_nonnegative("weight_decay", weight_decay, "add_decoupled_weight_decay")

    def init_fn(params):
        del params
        if scheduled:
            return _schedule_state()(count=buffers.zero_count())
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        updates = buffers.as_arrays(updates)
        if params is None:
            raise ValueError(
                "add_decoupled_weight_decay: `params` is required; call "
                "`update(updates, state, params)`."
            )
        buffers.check_tree_match("add_decoupled_weight_decay", updates, params, "params")

        if scheduled:
            rate = weight_decay(state.count)
            state = _schedule_state()(count=optax.safe_increment(state.count))
        else:
            rate = weight_decay

        def leaf(u, p):
            c = numerics.compute_dtype(u.dtype)
            wd = jax.numpy.asarray(rate, numerics.real_dtype(c))
            return (u.astype(c) + wd * p.astype(c)).astype(u.dtype)

        return jax.tree.map(leaf, updates, params), state

    tx = optax.GradientTransformation(init_fn, update_fn)
    if mask is not None:
        tx = optax.masked(tx, mask)
    if engine.python_numbers(weight_decay):
        engine.describe(tx, engine.WeightDecay(float(weight_decay), mask))
    return tx
