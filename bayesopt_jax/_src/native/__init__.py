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
import warnings
from collections.abc import Iterator

from bayesopt_jax._src.native import calls, loading, rules, selftest, transcriptions
from bayesopt_jax._src.native.calls import (
    LEAVES_PER_CALL,
    check_rule,
    is_native_leaf,
    is_sample_leaf,
    is_stored_leaf,
    on_cpu,
    sample,
    step,
    update,
    update_stored,
)
from bayesopt_jax._src.native.loading import (
    _LIBRARY,
    ABI_VERSION,
    RULES,
    SAMPLE_TARGET,
    STEP_TARGETS,
    STORED_TARGETS,
    TARGETS,
    UPDATE_TARGETS,
    _load,
    all_isas,
    isa,
    library_path,
    select_isa,
    supported_isas,
)

__all__ = [
    "ABI_VERSION",
    "LEAVES_PER_CALL",
    "RULES",
    "SAMPLE_TARGET",
    "STEP_TARGETS",
    "STORED_TARGETS",
    "TARGETS",
    "UPDATE_TARGETS",
    "_LIBRARY",
    "_load",
    "all_isas",
    "available",
    "calls",
    "check_rule",
    "is_native_leaf",
    "is_sample_leaf",
    "is_stored_leaf",
    "isa",
    "library_path",
    "loading",
    "on_cpu",
    "pure_jax",
    "rules",
    "sample",
    "select_isa",
    "self_test",
    "selftest",
    "step",
    "supported_isas",
    "transcriptions",
    "unavailable_reason",
    "update",
    "update_stored",
    "use_native",
]

_SELF_TEST_RESULT: list[str | None] = []


def self_test() -> str | None:
    """Checks every kernel against its transcription (see :func:`.selftest.self_test`)."""
    return selftest.self_test()


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
