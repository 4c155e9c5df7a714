"""The native CPU kernels: loading, registration with XLA, and their calls.

The kernel layer knows rules, not optimizers: a rule (``"adam"``,
``"amsgrad"``, ``"sigma"``, ``"sigma_momentum"``) is a fixed per-element
arithmetic over a gradient and 2 or 3 state buffers, configured by a float32
scalars operand laid out as ``kernels.cc`` states it. :func:`update` runs a
rule over many leaves and returns the new state; :func:`step` also applies
the updates to the parameters; :func:`update_stored` runs a rule over state
in block-wise 8-bit storage (:mod:`bayesopt_jax._src.quantize`): decode,
rule and encode in one pass, returning the updates and the new codes and
scales. Which transformation uses which rule, with which scalars,
is decided by the transformations (see :mod:`bayesopt_jax._src.engine`).

The shared library is compiled when the package is installed (``setup.py``
runs :mod:`bayesopt_jax._src.native.build`); if that failed or was skipped,
or ``BAYESOPT_JAX_NATIVE=0`` is set, :func:`available` is ``False`` and every
transformation uses its pure-JAX path. The library is built for the
architecture's baseline and carries a copy of its loops per instruction set
(x86-64: AVX-512, AVX2+FMA, baseline); the best copy the CPU runs is chosen
when it loads, or the one named by ``BAYESOPT_JAX_NATIVE_ISA``. All copies
give the same bits.

On first use every kernel is checked against a float64 NumPy transcription of
its rule (:mod:`.transcriptions`) on a small problem, on this process's own CPU
device only, so every process of a multi-process run reaches the same
decision; a disagreement beyond the rounding bound, or any error, turns the
kernels off with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
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
from bayesopt_jax._src.native import rules, transcriptions

HERE = Path(__file__).resolve().parent
ABI_VERSION = 6  # kernels.cc's BJ_ABI_VERSION


RULES = rules.RULES  # the rule table, declared once (rules.py)
STREAM_TARGET = "bayesopt_jax_stream_f32"


def update_target(rule: str) -> str:
    return f"bayesopt_jax_{rule}_update_f32"


def step_target(rule: str) -> str:
    return f"bayesopt_jax_{rule}_step_f32"


def stored_target(rule: str) -> str:
    return f"bayesopt_jax_{rule}_update_q8"


UPDATE_TARGETS = tuple(update_target(r) for r in RULES)
STEP_TARGETS = tuple(step_target(r) for r in RULES)
STORED_TARGETS = tuple(stored_target(r) for r in RULES)
TARGETS = UPDATE_TARGETS + STEP_TARGETS + STORED_TARGETS


def library_path() -> Path | None:
    """The compiled library next to this file, if there is one."""
    found = sorted(HERE.glob("_kernels*.so")) + sorted(HERE.glob("_kernels*.dylib"))
    return found[0] if found else None


_LIBRARY: list[Any] = []


@functools.cache
def _load() -> str | None:
    """Loads and registers the library; returns why not, or ``None`` on success."""
    if os.environ.get("BAYESOPT_JAX_NATIVE", "1") == "0":
        return "disabled by BAYESOPT_JAX_NATIVE=0"
    path = library_path()
    if path is None:
        return "the native library was not built at install time"
    try:
        lib = ctypes.cdll.LoadLibrary(str(path))
        if lib.bj_native_abi_version() != ABI_VERSION:
            return f"{path.name} is from another version of bayesopt_jax; reinstall"
        lib.bj_native_rules.restype = ctypes.c_char_p
        if why := rules.table_mismatch(lib.bj_native_rules().decode()):
            return f"{path.name}: {why}; reinstall"
        lib.bj_native_isa.restype = ctypes.c_char_p
        lib.bj_native_isas.restype = ctypes.c_char_p
        lib.bj_native_isas.argtypes = [ctypes.c_int]
        lib.bj_native_select.argtypes = [ctypes.c_char_p]
        _LIBRARY.append(lib)
        want = os.environ.get("BAYESOPT_JAX_NATIVE_ISA", "auto")
        if why := select_isa(want):
            return why
        for name, rule in RULES.items():
            for target, handler in [
                (update_target(name), f"Bj{rule.symbol}UpdateF32"),
                (step_target(name), f"Bj{rule.symbol}StepF32"),
                (stored_target(name), f"Bj{rule.symbol}UpdateQ8"),
            ]:
                capsule = jax.ffi.pycapsule(getattr(lib, handler))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        jax.ffi.register_ffi_target(
            STREAM_TARGET, jax.ffi.pycapsule(lib.BjStreamF32), platform="cpu"
        )
    except (OSError, AttributeError, RuntimeError, ValueError) as err:
        return f"could not load {path.name}: {err}"
    return None


def select_isa(name: str) -> str | None:
    """Makes the kernels use the copy for instruction set ``name`` ("auto": the best).

    Returns why not, or ``None``. Affects calls made from now on.
    """
    code = _LIBRARY[0].bj_native_select(name.encode())
    if code == -1:
        return f"BAYESOPT_JAX_NATIVE_ISA={name!r} is not one of {all_isas()} or 'auto'"
    if code == -2:
        return f"this CPU cannot run the {name!r} copy of the kernels (it runs {supported_isas()})"
    return None


def all_isas() -> list[str]:
    """Every instruction-set copy the library was built with, best first."""
    return _names(_LIBRARY[0].bj_native_isas(0)) if _LIBRARY else []


def _names(raw: bytes) -> list[str]:
    return raw.decode().split(",")


def supported_isas() -> list[str]:
    """The copies this CPU can run, best first (empty when the library is not loaded)."""
    return _names(_LIBRARY[0].bj_native_isas(1)) if _LIBRARY else []


def isa() -> str | None:
    """The instruction-set copy in use, or ``None`` when the library is not loaded."""
    if not _LIBRARY:
        _load()
    return _LIBRARY[0].bj_native_isa().decode() if _LIBRARY else None


_SELF_TEST_RESULT: list[str | None] = []


def available() -> bool:
    """Whether the native kernels are built, loaded and agree with their transcriptions."""
    if not _SELF_TEST_RESULT:
        why = _load()
        if why is None:
            why = _self_test()
            if why is not None:
                warnings.warn(
                    f"bayesopt_jax: native CPU kernels disabled, pure-JAX path used: {why}",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _SELF_TEST_RESULT.append(why)
    return _SELF_TEST_RESULT[0] is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (``None`` when it is ``True``)."""
    available()
    return _SELF_TEST_RESULT[0]


def _self_test() -> str | None:
    try:
        return self_test()
    except Exception as err:  # any failure means "do not use"
        return f"{type(err).__name__}: {err}"


_ENABLED = [True]


def use_native() -> bool:
    """Whether transformations traced now should take the native path."""
    return _ENABLED[-1] and available()


@contextlib.contextmanager
def pure_jax() -> Iterator[None]:
    """Within this block, transformations being traced use the pure-JAX path."""
    _ENABLED.append(False)
    try:
        yield
    finally:
        _ENABLED.pop()


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


def _stored_partitionable() -> Any:
    """:func:`_local_update_stored` made partitionable under a sharded ``jit``.

    Gradient, update and codes of a leaf share its sharding; the scales take
    it along the leading axes and along the last axis too when each device's
    share of it is whole blocks (:func:`.quantize.whole_blocks`). Otherwise
    the leaf is gathered along its last axis, so that no block is split.
    """
    fn = custom_partitioning(_local_update_stored, static_argnums=(0,))
    n_tables = 4

    def slots(static):
        return RULES[static[0]].states

    def rule(static, mesh, operand_types, result_types):
        del mesh, result_types
        ranks = [len(ir.RankedTensorType(t).shape) for t in operand_types[n_tables:]]
        k = len(ranks) // (1 + 2 * slots(static))
        leaf = [ArrayMapping(*[f"l{i}_d{d}" for d in range(ranks[i])]) for i in range(k)]
        scale = [
            ArrayMapping(*[f"l{i}_d{d}" for d in range(ranks[i] - 1)], f"l{i}_blocks")
            for i in range(k)
        ]
        table_ranks = [len(ir.RankedTensorType(t).shape) for t in operand_types[:n_tables]]
        tables = [[f"table{j}_d{d}" for d in range(r)] for j, r in enumerate(table_ranks)]
        return SdyShardingRule(
            operand_mappings=(
                *(ArrayMapping(*names) for names in tables),
                *leaf,
                *(leaf + scale) * slots(static),
            ),
            result_mappings=(*leaf, *(leaf + scale) * slots(static)),
            need_replication_factors=tuple(n for names in tables for n in names),
        )

    def partition(static, mesh, arg_shapes, result_shape):
        k = (len(arg_shapes) - n_tables) // (1 + 2 * slots(static))
        shardings = []
        for i in range(k):
            g, scale = arg_shapes[n_tables + i], arg_shapes[n_tables + 2 * k + i]
            sharding = g.sharding
            if not isinstance(sharding, NamedSharding):
                shardings.append(NamedSharding(mesh, PartitionSpec()))
                continue
            spec = list(sharding.spec) + [None] * (len(g.shape) - len(sharding.spec))
            last = spec[-1]
            axes = () if last is None else (last,) if isinstance(last, str) else tuple(last)
            devices = int(np.prod([mesh.shape[a] for a in axes]))
            if not quantize.whole_blocks(g.shape[-1], scale.shape[-1], devices):
                spec[-1] = None
            shardings.append(NamedSharding(mesh, PartitionSpec(*spec)))
        replicated = NamedSharding(mesh, PartitionSpec())
        leaves = [*shardings, *shardings * (2 * slots(static))]
        return (
            mesh,
            functools.partial(_local_update_stored, static),
            leaves,
            (*[replicated] * n_tables, *leaves),
        )

    fn.def_partition(partition=partition, sharding_rule=rule)
    return fn


def _partitionable(local: Any, n_scalars: int, groups: Any) -> Any:
    """``local`` made partitionable: under a sharded ``jit`` each device runs it on its shards.

    The kernels are elementwise over leaves, so leaf i of every group shares
    one sharding and nothing is communicated; the ``n_scalars`` leading
    operands are replicated. ``groups(static)`` gives the number of leaf
    groups in and out. Single-device and ``shard_map``/``pmap`` bodies call
    ``local`` directly.
    """
    fn = custom_partitioning(local, static_argnums=(0,))

    def leaf_factors(i: int, rank: int) -> ArrayMapping:
        return ArrayMapping(*[f"l{i}_d{d}" for d in range(rank)])

    def rule(static, mesh, operand_types, result_types):
        del mesh, result_types
        in_groups, out_groups = groups(static)
        ranks = [len(ir.RankedTensorType(t).shape) for t in operand_types[n_scalars:]]
        k = len(ranks) // in_groups
        per_leaf = [leaf_factors(i, ranks[i]) for i in range(k)]
        names = [f"scalars{j}" for j in range(n_scalars)]
        return SdyShardingRule(
            operand_mappings=(*(ArrayMapping(n) for n in names), *(per_leaf * in_groups)),
            result_mappings=tuple(per_leaf * out_groups),
            need_replication_factors=tuple(names),
        )

    def partition(static, mesh, arg_shapes, result_shape):
        in_groups, out_groups = groups(static)
        k = (len(arg_shapes) - n_scalars) // in_groups
        leaf_shardings = [arg_shapes[n_scalars + i].sharding for i in range(k)]
        replicated = NamedSharding(mesh, PartitionSpec())
        arg_shardings = (*[replicated] * n_scalars, *(leaf_shardings * in_groups))
        return (
            mesh,
            functools.partial(local, static),
            leaf_shardings * out_groups,
            arg_shardings,
        )

    fn.def_partition(partition=partition, sharding_rule=rule)
    return fn


def _update_groups(static):
    n = RULES[static[0]].states
    return 1 + n, n


def _step_groups(static):
    n = RULES[static[0]].states
    return 2 + n, 1 + n


_update_call = _partitionable(_local_update, 1, _update_groups)
_step_call = _partitionable(_local_step, 2, _step_groups)


_stored_call = _stored_partitionable()


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


def stream(y: jax.Array, xs: list, a: float) -> list:
    """Every ``x`` becomes ``a·x + y`` in place (a bandwidth probe for the benchmarks)."""
    call = jax.ffi.ffi_call(
        STREAM_TARGET,
        [jax.typeof(x) for x in xs],
        input_output_aliases={1 + i: i for i in range(len(xs))},
    )
    return list(call(y, *xs, a=np.float32(a)))


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


def self_test() -> str | None:
    """Checks every kernel against its transcription; returns what differs, or ``None``.

    Runs once, when the native path is first needed, on this process's
    first CPU device and on arrays it creates itself, so that in a
    multi-process run (``jax.distributed``) every process runs the same
    check on its own device and reaches the same decision. For every rule
    and every branch of it (see :func:`.transcriptions.cases`), a few leaves (one large
    enough to be split across threads) with ordinary, tiny, huge and
    non-finite gradients go through the update kernel (the state) and the
    step kernel (state and parameters, weight decay on two of the three
    leaves); every result must be within
    64 float32 rounding units of its terms' magnitude of the float64 value,
    with the same non-finite entries. The same leaves with their state in
    8-bit storage go through the 8-bit kernel: its updates are checked the
    same way, and its codes and scales must equal the encoding (a NumPy
    transcription of the encoder) of the float32 kernel's new state.
    """
    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    rng = np.random.default_rng(0)
    values, mids, _, _ = quantize.kernel_tables()
    factor, wd = -1e-3, 0.1
    decay = [True, False, True]
    for rule, sc in transcriptions.cases():
        ps, gs, states = transcriptions.inputs(rule, rng)
        k = len(ps)

        def program(sc, fw, ps, gs, states, stored, decoded, rule=rule):
            new = update(rule, sc, gs, states)
            new_ps, stepped = step(rule, sc, fw, ps, gs, states, decay)
            us, stored_new = update_stored(rule, sc, gs, stored)
            return new, new_ps, stepped, us, stored_new, update(rule, sc, gs, decoded)

        # The same leaves with the state in 8-bit storage (blocks of 16),
        # encoded in NumPy, so that the program holds only kernel calls.
        signed = RULES[rule].signed
        encoded = [
            [
                transcriptions.stored(x, values[int(j in signed)], mids[int(j in signed)], 16)
                for x in col
            ]
            for j, col in enumerate(states)
        ]
        stored = [
            [
                quantize.Quantized(
                    (idx - (128 if j in signed else 0)).astype(
                        np.int8 if j in signed else np.uint8
                    ),
                    sc_,
                )
                for idx, sc_, _ in col
            ]
            for j, col in enumerate(encoded)
        ]
        decoded = [[dec for _, _, dec in col] for col in encoded]
        fw = np.asarray([factor, wd], np.float32)
        operands = (sc, fw, ps, gs, states, stored, decoded)
        # Lowered and compiled explicitly, so that this also works when the
        # first use happens while another function is being traced.
        jitted = jax.jit(program, in_shardings=cpu, out_shardings=cpu)
        new, new_ps, stepped, us, stored_new, plain = jitted.lower(*operands).compile()(*operands)
        got = [
            [
                (np.asarray(q.codes).astype(np.int64) + (128 if j in signed else 0), q.scale)
                for q in col
            ]
            for j, col in enumerate(stored_new)
        ]
        want = [
            [
                transcriptions.stored(
                    np.asarray(x), values[int(j in signed)], mids[int(j in signed)], 16
                )[:2]
                for x in col
            ]
            for j, col in enumerate(plain)
        ]
        for i in range(k):
            why = transcriptions.check_leaf(
                i, rule, sc, fw, ps, gs, states, new, new_ps, stepped, decay
            )
            if why is None:
                why = transcriptions.check_stored_leaf(i, rule, sc, gs, decoded, us, got, want)
            if why is not None:
                return why
    return None
