"""Compiles the native kernels into a shared library (used by ``setup.py``).

Runs without importing ``bayesopt_jax`` or ``jax``: it needs only a C++17
compiler and the XLA FFI headers that ship inside ``jaxlib``. Run it by hand
to rebuild an editable checkout::

    python bayesopt_jax/_src/native/build.py
"""

from __future__ import annotations

import importlib.util
import os
import platform
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCES = [HERE / "kernels.cc"]
LIBRARY_STEM = "_kernels"

# -ffp-contract=off: only the explicit fmaf calls fuse, so the rounding of
# every operation is the one written in the source; -fno-math-errno lets sqrt
# vectorize; -fno-trapping-math lets the loops compute both sides of a select
# (no program here reads floating-point exception flags; results are the same).
FLAGS = [
    "-std=c++17",
    "-O3",
    "-fPIC",
    "-shared",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=off",
]
# No -march: the library is built for the architecture's baseline, so a wheel
# built on one machine loads on every CPU of its architecture; the source
# carries its own AVX2 and AVX-512 copies of the loops and picks one at load
# time from the CPU's features. x86: where a copy has 256-bit or wider
# vectors, use 256 bits (GCC's tuning for some AMD cores otherwise stays at
# 128 bits).
X86_FLAGS = ["-mprefer-vector-width=256"]


def include_dir() -> Path:
    """The XLA FFI headers inside the installed ``jaxlib``."""
    spec = importlib.util.find_spec("jaxlib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("jaxlib is not installed: the XLA FFI headers are missing")
    path = Path(next(iter(spec.submodule_search_locations))) / "include"
    if not (path / "xla" / "ffi" / "api" / "ffi.h").exists():
        raise RuntimeError(f"no XLA FFI headers under {path}")
    return path


def compiler() -> str:
    """The C++ compiler: ``$CXX``, else ``c++``/``g++``/``clang++`` on the PATH."""
    for name in [os.environ.get("CXX"), "c++", "g++", "clang++"]:
        if name and shutil.which(shlex.split(name)[0]):
            return name
    raise RuntimeError("no C++ compiler found (set CXX)")


def library_name() -> str:
    return LIBRARY_STEM + (sysconfig.get_config_var("EXT_SUFFIX") or ".so")


def build(output: Path | None = None, defines: tuple[str, ...] = ()) -> Path:
    """Compiles the kernels to ``output`` (default: next to the sources).

    ``defines``: preprocessor names to set (``BJ_BENCHMARK_KERNELS`` adds the
    benchmark's bandwidth probe, for the benchmark's own copy of the library).
    """
    output = Path(output) if output is not None else HERE / library_name()
    output.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        *shlex.split(compiler()),
        *FLAGS,
        *(X86_FLAGS if platform.machine().lower() in ("x86_64", "amd64") else []),
        f"-I{include_dir()}",
        *(f"-D{name}" for name in defines),
        *map(str, SOURCES),
        "-o",
        str(output),
    ]
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    return output


if __name__ == "__main__":
    try:
        print(build(Path(sys.argv[1]) if len(sys.argv) > 1 else None))
    except subprocess.CalledProcessError as err:
        sys.exit(f"build failed:\n{err.stderr}")
