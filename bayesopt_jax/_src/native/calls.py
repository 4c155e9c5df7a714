"""The native kernels' calls: which leaves they take, grouping, sharding and batching rules,
and the calls themselves (:func:`update`, :func:`update_stored`, :func:`step`)."""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import custom_batching
from jax.experimental.custom_partitioning import (
    ArrayMapping,
    SdyShardingRule,
    custom_partitioning,
)
from jax.sharding import NamedSharding, PartitionSpec
from jaxlib.mlir import ir

from bayesopt_jax._src import quantize
from bayesopt_jax._src.native.loading import (
    RULES,
    SAMPLE_TARGET,
    step_target,
    stored_target,
    update_target,
)


def on_cpu(kernel: Any, pure: Any, *args: Any) -> Any:
    """``kernel(*args)`` when lowering for the CPU, ``pure(*args)`` elsewhere.

    Where the CPU is the only backend, ``pure`` is not even traced (tracing
    both branches of ``lax.platform_dependent`` doubles the tracing time of
    a large tree).
    """
    if jax.default_backend() == "cpu":
        return kernel(*args)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=pure)


def is_native_leaf(*arrays: Any) -> bool:
    """Whether these leaves (gradient, state, parameters) are all float32 of one shape."""
    if not all(hasattr(a, "dtype") for a in arrays):
        return False  # state in a storage format (codes and scales)
    shape = jnp.shape(arrays[0])
    return all(
        jnp.result_type(a) == jnp.float32 and jnp.shape(a) == shape and jnp.size(a) > 0
        for a in arrays
    )


def is_stored_leaf(g: Any, states: list) -> bool:
    """Whether a float32 gradient's state is all in 8-bit storage the stored kernel runs.

    Every state buffer stored (:func:`.quantize.as_stored`), codes shaped
    like the gradient, one scale shape for all (the same blocks), at least
    one axis.
    """
    if not hasattr(g, "dtype") or jnp.result_type(g) != jnp.float32:
        return False
    shape = jnp.shape(g)
    qs = [quantize.as_stored(x) for x in states]
    if not shape or jnp.size(g) == 0 or not qs or any(q is None for q in qs):
        return False
    scale = jnp.shape(qs[0].scale)
    return all(q.shape == shape and jnp.shape(q.scale) == scale for q in qs) and len(scale) == len(
        shape
    )


def _local_update(static, scalars, *leaves):
    """A rule's update kernel on whole (or per-device) arrays: the new state."""
    rule = static[0]
    groups = 1 + RULES[rule].states
    k = len(leaves) // groups
    call = jax.ffi.ffi_call(
        update_target(rule),
        # Each result has its input's type, sharding and varying axes included.
        [jax.typeof(x) for x in leaves[k:]],
        input_output_aliases={1 + k + i: i for i in range(k * (groups - 1))},
        vmap_method="sequential",
    )
    return list(call(scalars, *leaves))


def _local_step(static, scalars, step, *leaves):
    """A rule's step kernel on whole (or per-device) arrays: ``(p, *state)``."""
    rule, decay = static
    groups = 2 + RULES[rule].states
    k = len(leaves) // groups
    outs = [*leaves[:k], *leaves[2 * k :]]
    call = jax.ffi.ffi_call(
        step_target(rule),
        [jax.typeof(x) for x in outs],
        input_output_aliases={
            **{2 + i: i for i in range(k)},
            **{2 + 2 * k + i: k + i for i in range(len(outs) - k)},
        },
        vmap_method="sequential",
    )
    return list(call(scalars, step, *leaves, decay=np.asarray(decay, np.int64)))


def _local_update_stored(static, scalars, values, mids, below, *leaves):
    """A rule's update kernel over 8-bit state: ``(u, codes0, scale0, ...)``."""
    rule = static[0]
    k = len(leaves) // (1 + 2 * RULES[rule].states)
    gs = leaves[:k]
    call = jax.ffi.ffi_call(
        stored_target(rule),
        [jax.typeof(x) for x in leaves],  # u like g, then codes and scales
        input_output_aliases={4 + k + i: k + i for i in range(len(leaves) - k)},
        vmap_method="sequential",
    )
    last = np.asarray([jnp.shape(g)[-1] for g in gs], np.int64)
    top_min = np.int64(quantize.kernel_tables()[3])
    return list(call(scalars, values, mids, below, *leaves, last=last, top_min=top_min))


def _partitionable(local: Any, n_replicated: int, mappings: Any, shardings: Any) -> Any:
    """``local(static, *operands)`` made partitionable: under a sharded ``jit`` each device
    runs it on its shards. Single-device and ``shard_map``/``pmap`` bodies call ``local``
    directly.

    The first ``n_replicated`` operands (scalars, code tables) are replicated.
    For the others, ``mappings(static, ranks)`` names each operand's and each
    result's factors (a list of names per array; a name shared by two arrays
    is one sharded dimension), and ``shardings(static, mesh, shapes)`` gives
    the operands' and the results' shardings from the operands' shapes.
    """
    fn = custom_partitioning(local, static_argnums=(0,))

    def rule(static, mesh, operand_types, result_types):
        del mesh, result_types
        ranks = [len(ir.RankedTensorType(t).shape) for t in operand_types]
        fixed = [[f"fixed{j}_d{d}" for d in range(r)] for j, r in enumerate(ranks[:n_replicated])]
        operands, results = mappings(static, ranks[n_replicated:])
        return SdyShardingRule(
            operand_mappings=tuple(ArrayMapping(*names) for names in (*fixed, *operands)),
            result_mappings=tuple(ArrayMapping(*names) for names in results),
            need_replication_factors=tuple(n for names in fixed for n in names),
        )

    def partition(static, mesh, arg_shapes, result_shape):
        del result_shape
        operands, results = shardings(static, mesh, arg_shapes[n_replicated:])
        replicated = NamedSharding(mesh, PartitionSpec())
        return (
            mesh,
            functools.partial(local, static),
            results,
            (*[replicated] * n_replicated, *operands),
        )

    fn.def_partition(partition=partition, sharding_rule=rule)
    return fn


def _leaf_names(i: int, rank: int) -> list[str]:
    return [f"l{i}_d{d}" for d in range(rank)]


def _elementwise(groups: Any) -> tuple[Any, Any]:
    """Mappings and shardings of a kernel elementwise over leaves: leaf i of every group in
    and out shares one sharding, and nothing is communicated. ``groups(static)`` gives the
    number of leaf groups in and out."""

    def mappings(static, ranks):
        in_groups, out_groups = groups(static)
        per_leaf = [_leaf_names(i, r) for i, r in enumerate(ranks[: len(ranks) // in_groups])]
        return per_leaf * in_groups, per_leaf * out_groups

    def shardings(static, mesh, shapes):
        del mesh
        in_groups, out_groups = groups(static)
        per_leaf = [x.sharding for x in shapes[: len(shapes) // in_groups]]
        return per_leaf * in_groups, per_leaf * out_groups

    return mappings, shardings


def _stored_layout() -> tuple[Any, Any]:
    """Mappings and shardings of the 8-bit kernel: gradient, update and codes of a leaf share
    its sharding; the scales take it along the leading axes, and along the last axis too when
    each device's share of it is whole blocks (:func:`.quantize.whole_blocks`). Otherwise the
    leaf is gathered along its last axis, so that no block is split."""

    def slots(static):
        return RULES[static[0]].states

    def mappings(static, ranks):
        k = len(ranks) // (1 + 2 * slots(static))
        leaf = [_leaf_names(i, ranks[i]) for i in range(k)]
        scale = [[*_leaf_names(i, ranks[i] - 1), f"l{i}_blocks"] for i in range(k)]
        arrays = [*leaf, *(leaf + scale) * slots(static)]
        return arrays, arrays

    def shardings(static, mesh, shapes):
        k = len(shapes) // (1 + 2 * slots(static))
        out = []
        for i in range(k):
            g, scale = shapes[i], shapes[2 * k + i]
            sharding = g.sharding
            if not isinstance(sharding, NamedSharding):
                out.append(NamedSharding(mesh, PartitionSpec()))
                continue
            spec = list(sharding.spec) + [None] * (len(g.shape) - len(sharding.spec))
            last = spec[-1]
            axes = () if last is None else (last,) if isinstance(last, str) else tuple(last)
            devices = int(np.prod([mesh.shape[a] for a in axes]))
            if not quantize.whole_blocks(g.shape[-1], scale.shape[-1], devices):
                spec[-1] = None
            out.append(NamedSharding(mesh, PartitionSpec(*spec)))
        arrays = [*out, *out * (2 * slots(static))]
        return arrays, arrays

    return mappings, shardings


def _update_groups(static):
    n = RULES[static[0]].states
    return 1 + n, n


def _step_groups(static):
    n = RULES[static[0]].states
    return 2 + n, 1 + n


_update_call = _partitionable(_local_update, 1, *_elementwise(_update_groups))
_step_call = _partitionable(_local_step, 2, *_elementwise(_step_groups))
_stored_call = _partitionable(_local_update_stored, 4, *_stored_layout())


def _batchable(call: Any, static: Any, n_scalars: int) -> Any:
    """``call(static, ...)`` with a ``vmap`` rule (``custom_partitioning`` has none).

    The kernels are elementwise, so a batch of leaves is just more elements:
    one call covers it when the scalars are shared, one call per example
    (``lax.map``) when they are batched too.
    """

    @custom_batching.custom_vmap
    def fn(*operands):
        return call(static, *operands)

    @fn.def_vmap
    def rule(axis_size, in_batched, *operands):
        scalars, leaves = operands[:n_scalars], operands[n_scalars:]
        leaves = [
            x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip(leaves, in_batched[n_scalars:], strict=True)
        ]
        if any(in_batched[:n_scalars]):
            scalars = [
                x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
                for x, batched in zip(scalars, in_batched[:n_scalars], strict=True)
            ]
            out = jax.lax.map(lambda a: fn(*a[0], *a[1]), (scalars, leaves))
        else:
            out = fn(*scalars, *leaves)
        return out, [True] * len(out)

    return fn


# XLA's compile time grows faster than linearly with the number of operands
# of one custom call (about 110 s for one call over 1,000 leaves, measured),
# so the leaves go in groups; each call is still multi-threaded.
LEAVES_PER_CALL = 64


def _groups(k: int) -> list[slice]:
    return [slice(i, min(k, i + LEAVES_PER_CALL)) for i in range(0, k, LEAVES_PER_CALL)]


def update(rule: str, scalars: jax.Array, gs: list, states: list[list]) -> list[list]:
    """Runs ``rule`` over every leaf: the new state (in place), in a few calls.

    ``states`` holds one list of leaves per state buffer of the rule. The
    updates are left to the caller, to be formed from the new state inside
    the loop that applies them (no buffer of updates is written and read).
    """
    check_rule(rule, scalars, states)
    if _eager(scalars, gs, states):
        # Outside ``jit`` the partitioning rule is not applied: run it under
        # ``jit`` so that sharded leaves keep their shardings.
        return _jitted_update(rule, scalars, gs, states)
    new = [[] for _ in states]
    for part in _groups(len(gs)):
        k = len(gs[part])
        operands = [x for group in (gs, *states) for x in group[part]]
        out = _batchable(_update_call, (rule,), 1)(scalars, *operands)
        for j in range(len(states)):
            new[j] += out[j * k : (j + 1) * k]
    return new


def update_stored(
    rule: str, scalars: jax.Array, gs: list, states: list[list[quantize.Quantized]]
) -> tuple[list, list[list[quantize.Quantized]]]:
    """Runs ``rule`` over leaves whose state is in 8-bit storage: the updates and the new state.

    ``states`` holds one list of :class:`~.quantize.Quantized` per state
    buffer of the rule (see :func:`is_stored_leaf`); codes and scales are
    updated in place.
    """
    check_rule(rule, scalars, states)
    if _eager(scalars, gs, states):
        return _jitted_update_stored(rule, scalars, gs, states)
    values, mids, below, _ = quantize.kernel_tables()
    tables = [jnp.asarray(values), jnp.asarray(mids), jnp.asarray(below)]
    us, new = [], [[] for _ in states]
    for part in _groups(len(gs)):
        k = len(gs[part])
        operands = [*gs[part]]
        for col in states:
            operands += [q.codes for q in col[part]] + [q.scale for q in col[part]]
        out = _batchable(_stored_call, (rule,), 4)(scalars, *tables, *operands)
        us += out[:k]
        for j in range(len(states)):
            codes = out[k + 2 * j * k : k + (2 * j + 1) * k]
            scales = out[k + (2 * j + 1) * k : k + (2 * j + 2) * k]
            new[j] += [quantize.Quantized(c, sc) for c, sc in zip(codes, scales, strict=True)]
    return us, new


def step(
    rule: str,
    scalars: jax.Array,
    factor_and_decay: jax.Array,
    ps: list,
    gs: list,
    states: list[list],
    decay: list[bool],
) -> tuple[list, list[list]]:
    """Runs ``rule`` and applies its update: ``p ← p + factor·(u + wd·p [where decay])``.

    ``factor_and_decay`` is float32 ``[factor, wd]``. Parameters and state
    are updated in place; returns the new parameters and state.
    """
    check_rule(rule, scalars, states)
    if _eager(scalars, factor_and_decay, ps, gs, states):
        return _jitted_step(rule, scalars, factor_and_decay, ps, gs, states, tuple(decay))
    new_ps, new = [], [[] for _ in states]
    for part in _groups(len(ps)):
        k = len(ps[part])
        static = (rule, tuple(int(d) for d in decay[part]))
        operands = [x for group in (ps, gs, *states) for x in group[part]]
        out = _batchable(_step_call, static, 2)(scalars, factor_and_decay, *operands)
        new_ps += out[:k]
        for j in range(len(states)):
            new[j] += out[(1 + j) * k : (2 + j) * k]
    return new_ps, new


def is_sample_leaf(p: Any, r: Any, *more: Any) -> bool:
    """Whether the sample kernel takes this leaf: float32 parameters and curvature (and σ,
    if given) of one shape, at least one and fewer than ``2**32`` entries (the draw's
    index is 32 bits)."""
    return is_native_leaf(p, r, *more) and jnp.size(p) < 2**32


def _local_sample(scalars, deltas, words, groups, *leaves):
    k = len(leaves) // groups
    call = jax.ffi.ffi_call(
        SAMPLE_TARGET,
        [jax.typeof(x) for x in leaves[:k]],
        # under vmap one call per example: each example's entries keep their indices
        vmap_method="sequential",
    )
    return list(call(scalars, deltas, words, *leaves))


def sample(
    scalars: jax.Array,
    deltas: jax.Array,
    words: jax.Array,
    ps: list,
    rs: list,
    sigmas: list | None = None,
) -> list:
    """The variational draw ``p + √v·ε`` over these leaves, ε drawn in the kernel.

    ``scalars`` is float32 ``[N, scale]``, ``deltas`` float32 with one δ per
    leaf, ``words`` uint32 ``(leaves, 3)`` (:func:`.draws.step_words`), ``rs``
    the curvature buffers (see :func:`is_sample_leaf`): v = 1/(N(scale·r + δ)).
    With ``sigmas`` (σ per leaf, the proximal part of ``variational_newton``),
    v = 1/(N(scale·r + 1/σ + δ)). The draw depends on each entry's index in
    its whole leaf, so under a sharded ``jit`` the leaves are gathered (XLA
    replicates the operands of a call it cannot partition); the pure path
    partitions.
    """
    out = []
    groups = (ps, rs) if sigmas is None else (ps, rs, sigmas)
    for part in _groups(len(ps)):
        leaves = [x for group in groups for x in group[part]]
        out += _local_sample(scalars, deltas[part], words[part], len(groups), *leaves)
    return out


def _eager(*trees: Any) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(trees))


_jitted_update = jax.jit(lambda *a: update(*a), static_argnums=0)
_jitted_update_stored = jax.jit(lambda *a: update_stored(*a), static_argnums=0)
_jitted_step = jax.jit(lambda *a: step(*a[:-1], list(a[-1])), static_argnums=(0, 6))


def check_rule(rule: str, scalars: jax.Array, states: list) -> None:
    if rule not in RULES:
        raise ValueError(f"no native rule {rule!r}; known: {sorted(RULES)}")
    want = RULES[rule]
    if len(states) != want.states or jnp.shape(scalars) != (want.n_scalars,):
        raise ValueError(
            f"rule {rule!r} takes {want.states} state buffers and {want.n_scalars} scalars, "
            f"got {len(states)} and shape {jnp.shape(scalars)}"
        )
