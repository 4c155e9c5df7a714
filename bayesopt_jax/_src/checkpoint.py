"""Optimizer state to and from a plain NumPy ``.npz`` file (no pickle).

Orbax (``orbax-checkpoint``) is the checkpoint library of choice for large
and multi-host runs; these two functions cover the single-host case with
nothing but NumPy, and keep what a naive ``np.savez`` loses: dtypes NumPy
cannot describe (bfloat16 and the other ``ml_dtypes``), the tree structure
(checked against the tree you restore into), and shardings.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np

from bayesopt_jax._src.types import PyTree

_PATHS = "__paths__"
_DTYPES = "__dtypes__"


def _leaves(tree: PyTree) -> tuple[list[str], list[Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [jax.tree_util.keystr(k) for k, _ in flat], [x for _, x in flat]


def save_npz(path: str | os.PathLike, tree: PyTree) -> None:
    """Writes every leaf of ``tree`` (e.g. an optimizer state) to ``path`` as ``.npz``.

    Each leaf is stored as its raw bytes with its dtype name and tree path
    beside it, so any dtype JAX has (bfloat16 included) round-trips exactly.
    Leaves must be fully addressable (single-host); use Orbax across hosts.

    Args:
      path: the file to write (NumPy appends ``.npz`` if it is missing).
      tree: a pytree of arrays (``None`` and empty subtrees are fine).

    Examples:
      >>> import tempfile, os, jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> tx = bj.adam(1e-3)
      >>> params = {"w": jnp.ones(3, jnp.bfloat16)}
      >>> state = tx.update(params, tx.init(params))[1]
      >>> f = os.path.join(tempfile.mkdtemp(), "opt.npz")
      >>> bj.save_npz(f, state)
      >>> back = bj.load_npz(f, tx.init(params))
      >>> back[0].mu["w"].dtype, int(back[0].count)
      (dtype(bfloat16), 1)
    """
    paths, leaves = _leaves(tree)
    arrays: dict[str, np.ndarray] = {}
    dtypes = []
    for i, (p, x) in enumerate(zip(paths, leaves, strict=True)):
        if isinstance(x, jax.Array) and not x.is_fully_addressable:
            raise ValueError(
                f"save_npz: leaf {p} is not fully addressable (multi-host); "
                "save it with orbax-checkpoint instead."
            )
        a = np.asarray(x)
        dtypes.append(jax.numpy.dtype(a.dtype).name)
        arrays[f"leaf{i}"] = np.ascontiguousarray(a).view(f"V{a.dtype.itemsize}").reshape(a.shape)
    arrays[_PATHS] = np.array(paths, dtype=np.str_)
    arrays[_DTYPES] = np.array(dtypes, dtype=np.str_)
    np.savez(path, **arrays)


def load_npz(path: str | os.PathLike, like: PyTree) -> PyTree:
    """Reads a tree written by :func:`save_npz` into the structure of ``like``.

    Args:
      path: the ``.npz`` file.
      like: a tree with the expected structure, shapes and dtypes: the output
        of ``tx.init(params)``, or ``jax.eval_shape(tx.init, params)``. Leaves
        that carry a ``sharding`` (arrays, or ``jax.ShapeDtypeStruct`` with
        ``sharding=``) are restored with it, e.g. from
        :func:`~bayesopt_jax.state_shardings`.

    Returns:
      The restored tree, of ``jax.Array`` leaves.

    Raises:
      ValueError: if the file's tree paths, shapes or dtypes differ from ``like``'s.
    """
    paths, leaves = _leaves(like)
    _, treedef = jax.tree.flatten(like)
    with np.load(path, allow_pickle=False) as data:
        saved_paths = [str(p) for p in data[_PATHS]]
        if saved_paths != paths:
            missing = sorted(set(paths) - set(saved_paths))
            extra = sorted(set(saved_paths) - set(paths))
            raise ValueError(
                f"load_npz: {os.fspath(path)} holds a different tree.\n"
                f"  expected leaves missing from the file: {missing}\n"
                f"  leaves in the file that were not expected: {extra}"
                + ("" if missing or extra else "\n  (same leaves, different order)")
            )
        out = []
        for i, (p, ref, name) in enumerate(zip(paths, leaves, data[_DTYPES], strict=True)):
            a = data[f"leaf{i}"].view(jax.numpy.dtype(str(name)))
            want_dtype = jax.numpy.dtype(ref.dtype)
            if a.dtype != want_dtype or a.shape != tuple(ref.shape):
                raise ValueError(
                    f"load_npz: leaf {p} is {a.dtype}{list(a.shape)} in the file, "
                    f"expected {want_dtype}{list(ref.shape)}."
                )
            sharding = getattr(ref, "sharding", None)
            if sharding is None:
                out.append(jax.numpy.asarray(a))
            else:
                out.append(jax.make_array_from_callback(a.shape, sharding, lambda idx, a=a: a[idx]))
    return jax.tree.unflatten(treedef, out)
