"""The elementwise engine: one executor for every per-leaf transformation.

A transformation declares its state buffers (:class:`Slot`: signed or
not, the argument that sets their storage) and states its per-leaf
arithmetic once, in pure JAX, as ``leaf(g, *slots) -> (u, *new_slots)``;
that is the reference and the path on GPUs and TPUs. If a native CPU rule
computes the same thing (see :mod:`bayesopt_jax._src.native`), the
transformation also names it with its named scalars. :func:`apply` then
runs the float32 leaves through the native kernel in a few multi-threaded
calls and every other leaf (other dtypes, other devices, traced
hyperparameters) through the pure statement. The two together are the
transformation's contract, :class:`Elementwise`.

Transformations carry a *description* of themselves on their ``update``
function (an attribute; the object stays an ordinary
``optax.GradientTransformation``, as Optax's own wrappers expect):
:class:`Elementwise` for a rule, :class:`Chain`, :class:`WeightDecay` and
:class:`ScalarScale` for the parts of a chain. :func:`~bayesopt_jax.fused_step`
reads the description of the chain it is given to run a whole step in one
call; nothing is registered anywhere.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import optax

from bayesopt_jax._src import allocation, buffers, native, quantize
from bayesopt_jax._src.native import rules
from bayesopt_jax._src.types import PyTree

_ATTRIBUTE = "__bayesopt_jax_description__"


class Kernel(NamedTuple):
    """A native rule, its scalars for this step, and how u follows.

    ``scalars`` is the rule's NamedTuple of scalars
    (:mod:`bayesopt_jax._src.native.rules`); the kernels read them as one
    float32 operand in field order (:attr:`operand`). The update kernel
    writes the new state only; ``finish(scalars, g, *new_state)`` (the state
    buffers the rule has, in order) forms the update from it in pure JAX, so
    that XLA fuses it into the loop that applies the update and no buffer of
    updates is written and read.

    With ``reads_inputs``, the step's :attr:`Prepared.inputs` (the
    parameters, per-leaf scalars) enter the update only through ``finish``,
    which is then ``finish(scalars, args, g, *new_state, *inputs)`` with
    ``args`` the step's :attr:`Prepared.args`: the kernel updates the state
    and XLA forms u. Such a rule has no fused step (its u is not the rule's).
    """

    rule: str
    scalars: NamedTuple
    finish: Callable[..., jax.Array]
    reads_inputs: bool = False

    @property
    def operand(self) -> jax.Array:
        return rules.pack(self.scalars)


class Slot(NamedTuple):
    """One state buffer of an elementwise transformation: a tree with one array per parameter.

    Attributes:
      field: the attribute of the transformation's state that holds the tree.
      signed: whether its values may be negative (a first moment). Signed
        buffers keep complex parameters complex and use the 8-bit format's
        signed code table; unsigned ones (second moments, variances) are
        real and use the unsigned table.
      dtype_arg: the factory argument that sets its dtype or storage format
        (``"mu_dtype"``, ...), named in error messages; ``None`` where the
        buffer always has the parameters' dtype.
      optional: whether the tree may be ``None`` (the buffer is off for the
        transformation's settings, such as ``mu`` without momentum).
    """

    field: str
    signed: bool = False
    dtype_arg: str | None = None
    optional: bool = False

    def allocate(self, params: PyTree, dtype: Any, where: str, value: Any = None) -> PyTree:
        """This buffer for ``params``: zeros (or ``value``) in ``dtype`` or a storage format."""
        name = self.dtype_arg or self.field
        return allocation.state_like(
            params, dtype, signed=self.signed, name=name, where=where, value=value
        )


class Prepared(NamedTuple):
    """One step of an elementwise transformation, ready to run over the leaves.

    Attributes:
      make_leaf: ``args -> leaf``, the per-leaf pure-JAX function
        ``leaf(g, *slots, *inputs) -> (u, *new_slots)``, one argument and one
        result per :class:`Slot` of the transformation, in order (a buffer
        that is ``None`` is passed and returned as ``None``).
      args: the step's traced values that ``make_leaf`` needs (step count,
        scheduled hyperparameters); passed explicitly so that the native
        path can be differentiated through the pure one.
      kernel: the native rule computing the same thing, or ``None``. Its
        state buffers are the slots that are not ``None``, in order.
      fields: the state's other fields after the step (``count``, ...); the
        new state is the old one with these and the new slots replaced.
      inputs: trees the leaves read but do not update (one array per
        parameter, or ``None``), after the slots; a step with inputs runs on
        the pure path unless its kernel ``reads_inputs`` (in ``finish``).
    """

    make_leaf: Callable[[Any], Callable[..., Sequence[Any]]]
    args: Any
    kernel: Kernel | None
    fields: dict[str, Any]
    inputs: tuple = ()


class Elementwise(NamedTuple):
    """The contract of an elementwise transformation, and its description.

    ``slots`` declares its state buffers (their storage: signed or not, the
    argument that sets their dtype); ``prepare(state) -> Prepared`` gives
    one step's per-leaf rule, its arguments and its native rule. The
    engine reads the slots from the state, runs the rule over every leaf
    (:func:`apply`) and writes them back (:meth:`rebuild`);
    :func:`~bayesopt_jax.fused_step` runs the same contract in one kernel.
    """

    slots: tuple[Slot, ...]
    prepare: Callable[[Any], Prepared]

    def read(self, state: Any) -> tuple:
        """The slots' trees in ``state``, in order (``None`` where a buffer is off).

        An optional slot may be absent from the state class (RMSProp's ``mu``
        when not centred); a required one must be there.
        """
        return tuple(
            getattr(state, slot.field, None) if slot.optional else getattr(state, slot.field)
            for slot in self.slots
        )

    def rebuild(self, state: Any, prepared: Prepared, new_slots: Sequence[Any]) -> Any:
        """``state`` after the step: the new slots and ``prepared.fields`` replaced."""
        present = {
            slot.field: tree
            for slot, tree in zip(self.slots, new_slots, strict=True)
            if hasattr(state, slot.field)
        }
        return state._replace(**prepared.fields, **present)

    def checked_against(self, state: Any) -> tuple[PyTree, str]:
        """The first buffer that is always there: the tree the gradients must match."""
        slot = next(s for s in self.slots if not s.optional)
        return getattr(state, slot.field), slot.field


class WeightDecay(NamedTuple):
    """Description of a decoupled weight decay with a constant rate."""

    weight_decay: float
    mask: Any


class ScalarScale(NamedTuple):
    """Description of a transformation that multiplies every update by one scalar.

    Its ``update`` applied to the scalar 1 gives that scalar and the new state.
    """


class Chain(NamedTuple):
    """Description of a chain: its transformations, in order."""

    parts: tuple


def describe(tx: optax.GradientTransformation, description: Any) -> Any:
    """Attaches ``description`` to ``tx`` (on its ``update`` function) and returns ``tx``."""
    setattr(tx.update, _ATTRIBUTE, description)
    return tx


def description(tx: Any) -> Any:
    """What :func:`describe` attached to ``tx``, or ``None``."""
    return getattr(getattr(tx, "update", None), _ATTRIBUTE, None)


def chain(*txs: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
    """``optax.chain(*txs)``, described as the chain of ``txs``."""
    return describe(optax.chain(*txs), Chain(tuple(txs)))


def elementwise(
    where: str,
    slots: Sequence[Slot],
    init: Callable[[PyTree], Any],
    prepare: Callable[[Any], Prepared],
) -> optax.GradientTransformation:
    """A transformation from its state buffers, its ``init`` and its per-step ``prepare``.

    ``init`` allocates each slot (with :meth:`Slot.allocate`); ``update``
    checks the gradients against the first slot that is always there, runs
    :func:`apply` and rebuilds the state. The result is an ordinary
    ``optax.GradientTransformation`` carrying its :class:`Elementwise`
    contract as its description.
    """
    contract = Elementwise(tuple(slots), prepare)

    def update_fn(updates, state, params=None):
        del params
        updates = buffers.as_arrays(updates)
        tree, name = contract.checked_against(state)
        buffers.check_tree_match(where, updates, tree, name, quantize.is_stored)
        prepared = prepare(state)
        u, new_slots = apply(prepared, updates, contract.read(state))
        return u, contract.rebuild(state, prepared, new_slots)

    return describe(optax.GradientTransformation(init, update_fn), contract)


def apply(prepared: Prepared, grads: PyTree, slots: Sequence[Any]) -> tuple[PyTree, tuple]:
    """Runs one step over every leaf: ``(updates, new slot trees)``.

    ``slots`` are the state's buffer trees (``None`` where off). Float32
    leaves whose state is float32 too go through the native kernel when
    there is one and it is in use, and so do float32 leaves whose state is
    all in 8-bit storage (the kernel decodes, runs the rule and encodes);
    the rest through the pure statement.
    """
    gs, treedef = jax.tree.flatten(grads)
    n_slots = len(slots)
    cols = [None if s is None else treedef.flatten_up_to(s) for s in (*slots, *prepared.inputs)]
    present = [j for j, col in enumerate(cols[:n_slots]) if col is not None]
    rows = [(g, *(None if col is None else col[i] for col in cols)) for i, g in enumerate(gs)]
    kernel = prepared.kernel
    use = (
        kernel is not None
        and (kernel.reads_inputs or all(x is None for x in prepared.inputs))
        and native.use_native()
    )
    fast = [
        i
        for i, row in enumerate(rows)
        if use
        and not any(quantize.is_stored(x) for x in row)
        and native.is_native_leaf(row[0], *(row[1 + j] for j in present))
    ]
    stored = [
        i
        for i, row in enumerate(rows)
        if use
        and not kernel.reads_inputs  # the stored kernels form u in C++: the rule's u
        and i not in fast
        and native.is_stored_leaf(row[0], [row[1 + j] for j in present])
    ]
    outs: list[Any] = [None] * len(rows)
    fast_set = set(fast) | set(stored)
    if len(fast_set) < len(rows):
        leaf = _decoding(prepared.make_leaf(prepared.args))
        for i, row in enumerate(rows):
            if i not in fast_set:
                outs[i] = tuple(leaf(*row))
    if fast:
        picked_g = [rows[i][0] for i in fast]
        picked_s = [[rows[i][1 + j] for i in fast] for j in present]
        picked_in = [[rows[i][1 + n_slots + k] for i in fast] for k in range(len(prepared.inputs))]
        us, new = _native(prepared, n_slots, present, picked_g, picked_s, picked_in)
        for n, i in enumerate(fast):
            out: list[Any] = [us[n]] + [None] * n_slots
            for slot, j in enumerate(present):
                out[1 + j] = new[slot][n]
            outs[i] = tuple(out)
    if stored:
        picked_g = [rows[i][0] for i in stored]
        picked_s = [[rows[i][1 + j] for i in stored] for j in present]
        us, new = _native_stored(prepared, n_slots, present, picked_g, picked_s)
        for n, i in enumerate(stored):
            out = [us[n]] + [None] * n_slots
            for slot, j in enumerate(present):
                out[1 + j] = quantize.like(new[slot][n], rows[i][1 + j])
            outs[i] = tuple(out)
    trees = [treedef.unflatten([o[k] for o in outs]) for k in range(1 + n_slots)]
    new_slots = tuple(None if cols[j] is None else trees[1 + j] for j in range(n_slots))
    return trees[0], new_slots


def _decoding(leaf: Callable[..., Sequence[Any]]) -> Callable[..., tuple]:
    """``leaf`` for rows whose state may be in a storage format (:mod:`.quantize`).

    Stored state is decoded to float32 before the rule runs and the rule's
    new state is encoded back in the same format; plain arrays pass through.
    """

    def run(g, *state):
        if not any(quantize.is_stored(x) for x in state):
            return tuple(leaf(g, *state))
        u, *new = leaf(g, *quantize.decoded(list(state)))
        return (u, *quantize.encoded_like(new, list(state[: len(new)])))

    return run


def _pure(prepared: Prepared, n_slots: int, present: list[int], wrap: Callable = lambda leaf: leaf):
    """The pure statement over a kernel's leaves, with the kernel's signature (its derivative)."""

    def pure(scalars, args, gs, states, inputs=()):
        del scalars
        leaf = wrap(prepared.make_leaf(args))
        us, new = [], [[] for _ in present]
        for i, g in enumerate(gs):
            row: list[Any] = [None] * (n_slots + len(prepared.inputs))
            for slot, j in enumerate(present):
                row[j] = states[slot][i]
            for k, col in enumerate(inputs):
                row[n_slots + k] = col[i]
            out = leaf(g, *row)
            us.append(out[0])
            for slot, j in enumerate(present):
                new[slot].append(out[1 + j])
        return us, new

    return pure


def _native(
    prepared: Prepared,
    n_slots: int,
    present: list[int],
    gs: list,
    states: list[list],
    inputs: list[list],
):
    """The native update of these leaves; its derivative is the pure path's.

    ``inputs`` (one list per input tree) reach ``finish`` where the kernel
    ``reads_inputs``; otherwise they are all ``None`` and not passed.
    """
    pure = _pure(prepared, n_slots, present)
    reads = prepared.kernel.reads_inputs
    inputs = inputs if reads else []

    @jax.custom_jvp
    def kernel(scalars, args, gs, states, inputs):
        new = native.update(prepared.kernel.rule, scalars, gs, states)
        finish, named = prepared.kernel.finish, rules.unpack(prepared.kernel.rule, scalars)
        us = []
        for i, g in enumerate(gs):
            state = tuple(col[i] for col in new)
            if reads:
                us.append(finish(named, args, g, *state, *(col[i] for col in inputs)))
            else:
                us.append(finish(named, g, *state))
        return us, new

    kernel.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    operand = prepared.kernel.operand
    return native.on_cpu(kernel, pure, operand, prepared.args, gs, states, inputs)


def _native_stored(
    prepared: Prepared, n_slots: int, present: list[int], gs: list, states: list[list]
):
    """The native update of leaves whose state is in 8-bit storage; its derivative is the pure path's."""
    states = [[quantize.as_stored(x) for x in col] for col in states]
    pure = _pure(prepared, n_slots, present, _decoding)

    @jax.custom_jvp
    def kernel(scalars, args, gs, states):
        del args
        return native.update_stored(prepared.kernel.rule, scalars, gs, states)

    kernel.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    return native.on_cpu(kernel, pure, prepared.kernel.operand, prepared.args, gs, states)


def python_numbers(*values: Any) -> bool:
    """Whether every value is a plain Python number (what the kernels' scalars need)."""
    return all(isinstance(x, int | float) and not isinstance(x, bool) for x in values)
