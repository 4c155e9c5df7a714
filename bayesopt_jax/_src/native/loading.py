"""Loading the native library: finding it, checking its ABI and rule table, choosing the
instruction-set copy, and registering its handlers with XLA."""

from __future__ import annotations

import ctypes
import functools
import os
from pathlib import Path
from typing import Any

import jax

from bayesopt_jax._src.native import rules

HERE = Path(__file__).resolve().parent
ABI_VERSION = 8  # kernels.cc's BJ_ABI_VERSION


RULES = rules.RULES  # the rule table, declared once (rules.py)


def update_target(rule: str) -> str:
    return f"bayesopt_jax_{rule}_update_f32"


def step_target(rule: str) -> str:
    return f"bayesopt_jax_{rule}_step_f32"


def stored_target(rule: str) -> str:
    return f"bayesopt_jax_{rule}_update_q8"


SAMPLE_TARGET = "bayesopt_jax_variational_sample_f32"

UPDATE_TARGETS = tuple(update_target(r) for r in RULES)
STEP_TARGETS = tuple(step_target(r) for r in RULES)
STORED_TARGETS = tuple(stored_target(r) for r in RULES)
TARGETS = UPDATE_TARGETS + STEP_TARGETS + STORED_TARGETS + (SAMPLE_TARGET,)


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
        lib.bj_native_sample_handler.restype = ctypes.c_char_p
        handlers = rules.parse_handlers(lib.bj_native_rules().decode())
        for name in RULES:
            targets = (update_target(name), step_target(name), stored_target(name))
            for target, handler in zip(targets, handlers[name], strict=True):
                capsule = jax.ffi.pycapsule(getattr(lib, handler))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
        sample = lib.bj_native_sample_handler().decode()
        capsule = jax.ffi.pycapsule(getattr(lib, sample))
        jax.ffi.register_ffi_target(SAMPLE_TARGET, capsule, platform="cpu")
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
