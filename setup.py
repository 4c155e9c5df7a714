"""Builds the optional native CPU kernels; everything else is in pyproject.toml.

If the kernels cannot be compiled (no C++ compiler, no XLA headers), the
installation goes on without them and bayesopt_jax uses its pure-JAX path.
Set ``BAYESOPT_JAX_BUILD_NATIVE=0`` to skip the build.
"""

import os
import runpy
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent
NATIVE = HERE / "bayesopt_jax" / "_src" / "native"


class BuildNative(build_ext):
    """Compiles the kernels with bayesopt_jax's own build script, never failing the install."""

    def build_extension(self, ext):
        if os.environ.get("BAYESOPT_JAX_BUILD_NATIVE", "1") == "0":
            print("bayesopt_jax: native kernels skipped (BAYESOPT_JAX_BUILD_NATIVE=0)")
            return
        build = runpy.run_path(str(NATIVE / "build.py"))
        target = Path(self.get_ext_fullpath(ext.name))
        target.unlink(missing_ok=True)  # never ship a stale library from an earlier build
        try:
            build["build"](target)
            print(
                f"bayesopt_jax: native kernels built ({target.name}; AVX2/AVX-512 copies chosen at "
                "load time); `python -m bayesopt_jax` shows whether they are used",
                file=sys.stderr,
            )
        except Exception as err:  # any failure leaves the pure-JAX path
            detail = getattr(err, "stderr", "") or err
            print(
                f"bayesopt_jax: native kernels not built, the pure-JAX path will be used: {detail}",
                file=sys.stderr,
            )


setup(
    ext_modules=[
        Extension(
            "bayesopt_jax._src.native._kernels",
            sources=["bayesopt_jax/_src/native/kernels.cc"],
            optional=True,
        )
    ],
    cmdclass={"build_ext": BuildNative},
)
