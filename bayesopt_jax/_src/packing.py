"""Packed trees: many arrays stored as a few contiguous buffers, one per dtype.

A step over a tree of many small arrays pays a fixed cost per array (every
buffer passed into and out of a ``jit`` call, every loop XLA emits, every
leaf of a kernel call). Packing the parameters once, and so the gradients
and the optimizer state with them, makes that cost a few buffers' worth;
inside ``jit``, :func:`unpack` gives the model its usual tree.

Every elementwise optimizer of the package gives the same result on a
packed tree as on the tree itself, element for element; a weight-decay
``mask`` applies to whole buffers, so pack what decays and what does not
separately (``{"decay": pack(w), "keep": pack(b)}`` with the mask
``{"decay": True, "keep": False}``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bayesopt_jax._src.types import PyTree


class _Slot(NamedTuple):
    buffer: int
    offset: int
    shape: tuple[int, ...]


class Layout(NamedTuple):
    """Where each leaf of a tree lives in the packed buffers (static)."""

    treedef: Any
    slots: tuple[_Slot, ...]
    dtypes: tuple[Any, ...]
    sizes: tuple[int, ...]


@jax.tree_util.register_pytree_node_class
class Packed:
    """A tree stored as one flat buffer per dtype; :func:`unpack` gives the tree back.

    A pytree whose leaves are the buffers, so optimizers, ``jit``,
    ``jax.grad`` and checkpoints see a few arrays.
    """

    def __init__(self, buffers: tuple, layout: Layout):
        self.buffers = tuple(buffers)
        self.layout = layout

    def tree_flatten(self):
        return self.buffers, self.layout

    @classmethod
    def tree_unflatten(cls, layout, buffers):
        return cls(tuple(buffers), layout)

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{jnp.dtype(d).name}[{n}]"
            for d, n in zip(self.layout.dtypes, self.layout.sizes, strict=True)
        )
        return f"Packed({len(self.layout.slots)} leaves in {parts})"


def pack(tree: PyTree) -> Packed:
    """Packs every array leaf of ``tree`` into one flat buffer per dtype.

    Args:
      tree: a pytree of arrays (e.g. a model's parameters).

    Returns:
      A :class:`Packed` with one buffer per dtype, in order of first
      appearance; :func:`unpack` returns ``tree``'s structure, shapes and
      values exactly.

    Examples:
      >>> import jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3)}
      >>> packed = bj.pack(params)
      >>> [b.shape for b in packed.buffers]
      [(9,)]
      >>> bj.unpack(packed)["w"].shape
      (2, 3)
    """
    leaves, treedef = jax.tree.flatten(tree)
    dtypes: list[Any] = []
    sizes: list[int] = []
    parts: list[list] = []
    slots = []
    for leaf in leaves:
        leaf = jnp.asarray(leaf)
        dt = leaf.dtype
        if dt not in dtypes:
            dtypes.append(dt)
            sizes.append(0)
            parts.append([])
        b = dtypes.index(dt)
        slots.append(_Slot(b, sizes[b], tuple(leaf.shape)))
        sizes[b] += int(np.prod(leaf.shape, dtype=np.int64))
        parts[b].append(leaf.reshape(-1))
    buffers = tuple(
        jnp.concatenate(p) if p else jnp.zeros((0,), d) for p, d in zip(parts, dtypes, strict=True)
    )
    return Packed(buffers, Layout(treedef, tuple(slots), tuple(dtypes), tuple(sizes)))


def unpack(packed: Packed) -> PyTree:
    """The tree that :func:`pack` packed: each leaf a slice of its buffer, reshaped.

    Inside ``jit`` the slices are views XLA fuses into their consumers, and
    ``jax.grad`` with respect to the :class:`Packed` gives a :class:`Packed`
    of gradients (one buffer per dtype).
    """
    layout = packed.layout
    leaves = [
        jax.lax.slice(
            packed.buffers[s.buffer], (s.offset,), (s.offset + math.prod(s.shape),)
        ).reshape(s.shape)
        for s in layout.slots
    ]
    return layout.treedef.unflatten(leaves)
