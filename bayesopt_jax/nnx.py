"""Flax NNX integration: a fused-step ``nnx.Optimizer`` and training at posterior draws.

Importing this module needs Flax (``pip install "bayesopt_jax[examples]"``);
the rest of bayesopt_jax does not.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flax import nnx

from bayesopt_jax._src.fused import fused_step
from bayesopt_jax._src.posterior import training_sample

__all__ = ["FusedOptimizer", "value_and_grad_at_sample"]


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


def value_and_grad_at_sample(
    loss_fn: Callable[..., Any],
    model: Any,
    optimizer: nnx.Optimizer,
    *args: Any,
    has_aux: bool = False,
    **kwargs: Any,
) -> tuple[Any, Any]:
    """``nnx.value_and_grad(loss_fn)(model, *args)`` at this step's posterior draw.

    For an optimizer built on :func:`~bayesopt_jax.variational_sigma_filter`:
    the model's ``optimizer.wrt`` variables are set to
    :func:`~bayesopt_jax.training_sample` of the optimizer state, the loss
    and gradients are computed there, and the mean is put back before
    returning, so ``optimizer.update(model, grads)`` moves the mean. Use it
    where ``nnx.value_and_grad`` would be used, inside ``nnx.jit`` or not.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import bayesopt_jax as bj
      >>> from bayesopt_jax.nnx import value_and_grad_at_sample
      >>> model = nnx.Linear(3, 1, rngs=nnx.Rngs(0))
      >>> tx = bj.variational_sigma_filter(1e-2, num_data=64, batch_size=8, key=0)
      >>> optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
      >>> x, y = jnp.ones((8, 3)), jnp.zeros((8, 1))
      >>> @nnx.jit
      ... def train_step(model, optimizer):
      ...     loss_fn = lambda m: ((m(x) - y) ** 2).mean()
      ...     loss, grads = value_and_grad_at_sample(loss_fn, model, optimizer)
      ...     optimizer.update(model, grads)
      ...     return loss
      >>> first = train_step(model, optimizer)
      >>> for _ in range(100):
      ...     last = train_step(model, optimizer)
      >>> bool(last < first)
      True
    """
    mean = nnx.as_pure(nnx.state(model, optimizer.wrt))
    sample = training_sample(mean, nnx.as_pure(optimizer.opt_state))
    nnx.update(model, sample)
    try:
        out = nnx.value_and_grad(loss_fn, has_aux=has_aux)(model, *args, **kwargs)
    finally:
        nnx.update(model, mean)
    return out
