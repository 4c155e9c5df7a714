"""Flax NNX integration: an ``nnx.Optimizer`` whose update is one fused step.

Importing this module needs Flax (``pip install "bayesopt_jax[examples]"``);
the rest of bayesopt_jax does not.
"""

from __future__ import annotations

from typing import Any

from flax import nnx

from bayesopt_jax._src.fused import fused_step

__all__ = ["FusedOptimizer"]


class FusedOptimizer(nnx.Optimizer):
    """``nnx.Optimizer`` that updates parameters and state with :func:`~bayesopt_jax.fused_step`.

    Built and used exactly like ``nnx.Optimizer``. ``update(model, grads)``
    runs ``fused_step(tx, grads, opt_state, params)``: for
    :func:`~bayesopt_jax.adam` and :func:`~bayesopt_jax.adamw` on the CPU
    that is one in-place native call, for anything else
    ``tx.update`` + ``optax.apply_updates`` as in ``nnx.Optimizer``. Keyword
    arguments for the transformation (``value=`` for
    ``optax.contrib.reduce_on_plateau`` and the like) take the two-call path.
    ``update`` returns ``None``: the updates are never materialized.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from flax import nnx
      >>> import bayesopt_jax as bj
      >>> from bayesopt_jax.nnx import FusedOptimizer
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> optimizer = FusedOptimizer(model, bj.adamw(1e-2), wrt=nnx.Param)
      >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
      >>> @nnx.jit
      ... def train_step(model, optimizer):
      ...     loss, grads = nnx.value_and_grad(lambda m: ((m(x) - y) ** 2).mean())(model)
      ...     optimizer.update(model, grads)
      ...     return loss
      >>> first = train_step(model, optimizer)
      >>> for _ in range(50):
      ...     last = train_step(model, optimizer)
      >>> bool(last < first), int(optimizer.step[...])
      (True, 51)
    """

    def update(self, model: Any, grads: Any, /, **kwargs: Any) -> None:
        if kwargs:
            super().update(model, grads, **kwargs)
            return
        params = nnx.as_pure(nnx.state(model, self.wrt, graph=self.graph))
        grads = nnx.as_pure(nnx.state(grads, self.wrt, graph=self.graph))
        opt_state = nnx.as_pure(self.opt_state)
        new_params, new_opt_state = fused_step(self.tx, grads, opt_state, params)
        nnx.update(model, new_params)
        nnx.update(self.opt_state, nnx.state(new_opt_state, graph=self.graph))
        self.step[...] += 1
