"""State allocation: one buffer per parameter, in a dtype or a storage format.

Every transformation allocates its state here (``init``), so that a state
dtype argument (``mu_dtype=``, ``nu_dtype=``, ...) means the same everywhere:
``None`` for the parameter's own dtype, a floating dtype, or a storage format
such as :class:`~bayesopt_jax.Blockwise8` (the codec is :mod:`.quantize`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from bayesopt_jax._src import buffers, numerics, quantize, validation


def state_like(
    params: Any, dtype: Any, *, signed: bool, name: str, where: str, value: Any = None
) -> Any:
    """One state buffer per parameter: zeros (or ``value``) in ``dtype`` or a storage format.

    ``dtype`` is a dtype as Optax takes it (``None``: the parameter's own;
    real buffers for complex parameters unless ``signed``), or a format such
    as :class:`Blockwise8`, which stores real state only and so refuses
    complex parameters, naming the argument.
    """
    if not quantize.is_format(dtype):
        if value is None:
            return buffers.tree_zeros_like(params, dtype, real=not signed)
        return buffers.tree_full_like(params, value, dtype, real=not signed)

    def stored(p):
        if jnp.issubdtype(numerics.leaf_dtype(p), jnp.complexfloating):
            raise ValueError(
                f"{where}: `{name}`={dtype} stores real state; a parameter is complex."
            )
        return (
            quantize.zeros(p, dtype, signed)
            if value is None
            else quantize.full(p, value, dtype, signed)
        )

    return jax.tree.map(stored, params)


def check_state_dtype(name: str, dtype: Any, where: str) -> None:
    """``dtype`` must be ``None``, a floating dtype, or a storage format."""
    if not quantize.is_format(dtype):
        validation.check_dtype(name, dtype, where)
