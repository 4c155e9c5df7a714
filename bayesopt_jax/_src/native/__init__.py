"""The native CPU kernels: loading, registration with XLA, and their calls.

The shared library is compiled when the package is installed (``setup.py``
runs :mod:`bayesopt_jax._src.native.build`); if that failed or was skipped,
or ``BAYESOPT_JAX_NATIVE=0`` is set, :func:`available` is ``False`` and every
transformation uses its pure-JAX path. The library is built for the
architecture's baseline and carries a copy of its loops per instruction set
(x86-64: AVX-512, AVX2+FMA, baseline); the best copy the CPU runs is chosen
when it loads, or the one named by ``BAYESOPT_JAX_NATIVE_ISA``. All copies
give the same bits.

On first use the library is checked against the pure-JAX path on a small
problem, on this process's own CPU device only, so every process of a
multi-process run reaches the same decision; a disagreement beyond the
rounding bound, or any error, turns it off with a warning.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

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

from bayesopt_jax._src import moments

HERE = Path(__file__).resolve().parent
MOMENTS_TARGET = "bayesopt_jax_adam_moments_f32"
STEP_TARGET = "bayesopt_jax_adam_step_f32"
STREAM_TARGET = "bayesopt_jax_stream_f32"
ABI_VERSION = 3

# Slots of the float32 scalars operand (the Scalar enum of adam_kernels.cc).
B1, C1, B2, C2, INV_BC1, INV_BC2, EPS, NEG_LR, WEIGHT_DECAY, CLIP = range(10)
NUM_SCALARS = 10


def library_path() -> Path | None:
    """The compiled library next to this file, if there is one."""
    found = sorted(HERE.glob("_adam_kernels*.so")) + sorted(HERE.glob("_adam_kernels*.dylib"))
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
        lib.bj_native_isa.restype = ctypes.c_char_p
        lib.bj_native_isas.restype = ctypes.c_char_p
        lib.bj_native_isas.argtypes = [ctypes.c_int]
        lib.bj_native_select.argtypes = [ctypes.c_char_p]
        _LIBRARY.append(lib)
        want = os.environ.get("BAYESOPT_JAX_NATIVE_ISA", "auto")
        if why := select_isa(want):
            return why
        jax.ffi.register_ffi_target(
            MOMENTS_TARGET, jax.ffi.pycapsule(lib.BjAdamMomentsF32), platform="cpu"
        )
        jax.ffi.register_ffi_target(
            STEP_TARGET, jax.ffi.pycapsule(lib.BjAdamStepF32), platform="cpu"
        )
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


_IN_SELF_TEST = [False]


def available() -> bool:
    """Whether the native kernels are built, loaded and agree with pure JAX."""
    if _IN_SELF_TEST[0]:
        return True
    if not _SELF_TEST_RESULT:
        why = _load()
        if why is None:
            _IN_SELF_TEST[0] = True
            try:
                why = _self_test()
            finally:
                _IN_SELF_TEST[0] = False
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
    # Imported here: adam imports this module.
    from bayesopt_jax._src import fused

    try:
        return fused.self_test()
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


class AdamConfig(NamedTuple):
    """The static hyperparameters of an Adam update that the kernels handle."""

    b1: float
    b2: float
    eps: float
    bias_correction: bool


def _number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def adam_config(
    b1: Any, b2: Any, eps: Any, eps_root: Any, *, nesterov: bool, bias_correction: bool
) -> AdamConfig | None:
    """The kernel configuration for these hyperparameters, or ``None`` if unsupported.

    Supported: Python-number ``b1``, ``b2``, ``eps``, ``eps_root == 0`` and no
    Nesterov look-ahead. Traced or injected hyperparameters take the pure path.
    """
    if nesterov or not all(_number(x) for x in (b1, b2, eps, eps_root)) or eps_root != 0:
        return None
    return AdamConfig(float(b1), float(b2), float(eps), bool(bias_correction))


def is_native_leaf(*arrays: Any) -> bool:
    """Whether these leaves (gradient, moments, parameters) are all float32 of one shape."""
    shape = jnp.shape(arrays[0])
    return all(
        jnp.result_type(a) == jnp.float32 and jnp.shape(a) == shape and jnp.size(a) > 0
        for a in arrays
    )


def scalars(
    config: AdamConfig,
    count: jax.Array,
    *,
    neg_lr: Any = 0.0,
    weight_decay: Any = 0.0,
) -> jax.Array:
    """The kernels' float32 scalars operand, computed as the pure-JAX path computes them."""
    f32 = jnp.float32
    if config.bias_correction:
        debias = moments.Debias(count)
        inv_bc1 = 1 / debias(config.b1, f32)
        inv_bc2 = 1 / debias(config.b2, f32)
    else:
        inv_bc1 = inv_bc2 = 1.0
    # ``1 - b`` is rounded once from the Python value, as moments.ema does.
    values = [
        config.b1,
        1 - config.b1,
        config.b2,
        1 - config.b2,
        inv_bc1,
        inv_bc2,
        config.eps,
        neg_lr,
        weight_decay,
        moments.clip_limit(f32),
    ]
    return jnp.stack([jnp.asarray(x, f32) for x in values])


def _local_moments(static, scalars, *leaves):
    """The moments kernel on whole (or per-device) arrays."""
    k = len(leaves) // 3
    call = jax.ffi.ffi_call(
        MOMENTS_TARGET,
        # Each result has its input's type, sharding and varying axes included.
        [jax.typeof(x) for x in leaves[k:]],
        input_output_aliases={1 + k + i: i for i in range(2 * k)},
        vmap_method="sequential",
    )
    return list(call(scalars, *leaves))


def _local_step(static, scalars, *leaves):
    """The fused-step kernel on whole (or per-device) arrays."""
    k = len(leaves) // 4
    shapes = [jax.typeof(x) for x in leaves[:k]] * 3
    call = jax.ffi.ffi_call(
        STEP_TARGET,
        shapes,
        input_output_aliases={
            **{1 + i: i for i in range(k)},
            **{1 + 2 * k + i: k + i for i in range(2 * k)},
        },
        vmap_method="sequential",
    )
    return list(call(scalars, *leaves, decay=np.asarray(static, np.int64)))


def _elementwise(local: Any, in_groups: int, out_groups: int) -> Any:
    """``local`` made partitionable: under a sharded ``jit`` each device runs it on its shards.

    The kernels are elementwise over leaves, so leaf i of every group shares
    one sharding and nothing is communicated; the scalars are replicated.
    Single-device and ``shard_map``/``pmap`` bodies call ``local`` directly.
    """
    fn = custom_partitioning(local, static_argnums=(0,))

    def leaf_factors(i: int, rank: int) -> ArrayMapping:
        return ArrayMapping(*[f"l{i}_d{d}" for d in range(rank)])

    def rule(static, mesh, operand_types, result_types):
        del static, mesh, result_types
        ranks = [len(ir.RankedTensorType(t).shape) for t in operand_types[1:]]
        k = len(ranks) // in_groups
        per_leaf = [leaf_factors(i, ranks[i]) for i in range(k)]
        return SdyShardingRule(
            operand_mappings=(ArrayMapping("scalars"), *(per_leaf * in_groups)),
            result_mappings=tuple(per_leaf * out_groups),
            need_replication_factors=("scalars",),
        )

    def partition(static, mesh, arg_shapes, result_shape):
        k = (len(arg_shapes) - 1) // in_groups
        leaf_shardings = [arg_shapes[1 + i].sharding for i in range(k)]
        arg_shardings = (NamedSharding(mesh, PartitionSpec()), *(leaf_shardings * in_groups))
        return (
            mesh,
            functools.partial(local, static),
            leaf_shardings * out_groups,
            arg_shardings,
        )

    fn.def_partition(partition=partition, sharding_rule=rule)
    return fn


_moments_call = _elementwise(_local_moments, in_groups=3, out_groups=2)
_step_call = _elementwise(_local_step, in_groups=4, out_groups=3)


def _batchable(call: Any, static: Any) -> Any:
    """``call(static, ...)`` with a ``vmap`` rule (``custom_partitioning`` has none).

    The kernels are elementwise, so a batch of leaves is just more elements:
    one call covers it when the scalars are shared, one call per example
    (``lax.map``) when they are batched too.
    """

    @custom_batching.custom_vmap
    def fn(scalars, *leaves):
        return call(static, scalars, *leaves)

    @fn.def_vmap
    def rule(axis_size, in_batched, scalars, *leaves):
        leaves = [
            x if batched else jnp.broadcast_to(x, (axis_size, *x.shape))
            for x, batched in zip(leaves, in_batched[1:], strict=True)
        ]
        if in_batched[0]:
            out = jax.lax.map(lambda a: fn(a[0], *a[1]), (scalars, leaves))
        else:
            out = fn(scalars, *leaves)
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


def adam_moments(scalars: jax.Array, gs: list, ms: list, vs: list) -> tuple[list, list]:
    """The new ``(m, v)`` of every leaf, updated in place, in a few calls."""
    new_ms, new_vs = [], []
    for part in _groups(len(gs)):
        k = len(gs[part])
        out = _batchable(_moments_call, ())(scalars, *gs[part], *ms[part], *vs[part])
        new_ms += out[:k]
        new_vs += out[k:]
    return new_ms, new_vs


def adam_step(
    scalars: jax.Array, ps: list, gs: list, ms: list, vs: list, decay: list[bool]
) -> tuple[list, list, list]:
    """The new ``(p, m, v)`` of every leaf, all updated in place, in a few calls."""
    new_ps, new_ms, new_vs = [], [], []
    for part in _groups(len(ps)):
        k = len(ps[part])
        static = tuple(int(d) for d in decay[part])
        out = _batchable(_step_call, static)(scalars, *ps[part], *gs[part], *ms[part], *vs[part])
        new_ps += out[:k]
        new_ms += out[k : 2 * k]
        new_vs += out[2 * k :]
    return new_ps, new_ms, new_vs
