"""The type aliases every module uses, defined once."""

from __future__ import annotations

from typing import Any

import jax
import optax

Array = jax.Array
PyTree = Any  # a pytree of arrays (parameters, gradients, states)
ScalarOrSchedule = optax.ScalarOrSchedule  # a number, a scalar array, or ``step -> value``
