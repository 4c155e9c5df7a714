"""The native library runs on every x86-64 CPU and gives the same bits on each.

The library is built without ``-march``; its loops exist once per
instruction set (AVX-512, AVX2+FMA, baseline) and the copy is chosen when it
loads. Every copy performs the same correctly rounded IEEE operations, so
all copies this CPU can run must agree bit for bit. A wheel built here must
also import and compute under emulated older CPUs: Haswell (AVX2, no
AVX-512) and Sandy Bridge (AVX only: the baseline copy).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import numpy as np
import pytest
import reference
from bounds import check, track

import bayesopt_jax as bj
from bayesopt_jax._src import native

ROOT = Path(__file__).resolve().parent.parent
needs_native = pytest.mark.skipif(
    not bj.native_available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)

# The computation compared across instruction sets and CPUs: two-call adam
# and fused adamw on a tree with ordinary, tiny, huge and non-finite entries.
PROGRAM = textwrap.dedent(
    """
    import jax, jax.numpy as jnp, numpy as np
    import bayesopt_jax as bj

    def run():
        rng = np.random.default_rng(0)
        params = {"a": rng.normal(size=70_001).astype(np.float32),
                  "b": rng.normal(size=(3, 5)).astype(np.float32)}
        grads = {k: (v * 1e-2 + 1e-3).astype(np.float32) for k, v in params.items()}
        grads["a"][:8] = [0.0, -0.0, 1e-30, 3e38, -3e38, np.inf, -np.inf, np.nan]
        out = {}
        for name, tx in {"adam": bj.adam(1e-3), "adamw": bj.adamw(1e-3, weight_decay=0.1)}.items():
            p, s = params, tx.init(params)
            two_call = jax.jit(lambda p, s: (lambda u, s: (jax.tree.map(jnp.add, p, u), s))(*tx.update(grads, s, p)))
            fused = jax.jit(lambda p, s: bj.fused_step(tx, grads, s, p))
            for step in (two_call, fused, two_call, fused):
                p, s = step(p, s)
            for k, v in p.items():
                out[f"{name}/{k}"] = np.asarray(v)
        return out
    """
)


def _run_program():
    namespace: dict = {}
    exec(PROGRAM, namespace)
    return namespace["run"]()


@needs_native
def test_every_instruction_set_copy_gives_the_same_bits():
    isas = native.supported_isas()
    assert isas[-1] == "baseline" and native.isa() == isas[0]
    results = {}
    try:
        for isa in isas:
            assert native.select_isa(isa) is None
            assert native.isa() == isa
            results[isa] = _run_program()
    finally:
        native.select_isa("auto")
    first = results[isas[0]]
    for isa in isas[1:]:
        for key, value in first.items():
            assert value.tobytes() == results[isa][key].tobytes(), (isa, key)


@pytest.mark.subprocess
def test_an_unknown_or_unsupported_instruction_set_is_reported():
    if native.library_path() is None:
        pytest.skip("the native library was not built")
    code = "import bayesopt_jax as bj, json; print(json.dumps(bj.native_status()))"
    env = {**os.environ, "BAYESOPT_JAX_NATIVE_ISA": "sse9"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "BAYESOPT_JAX_NATIVE_ISA='sse9' is not one of" in out.stdout
    assert '"used": false' in out.stdout
    missing = [i for i in ("avx512", "avx2") if i not in native.supported_isas()]
    if missing and native.all_isas() != ["baseline"]:
        env["BAYESOPT_JAX_NATIVE_ISA"] = missing[0]
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert f"cannot run the '{missing[0]}' copy" in out.stdout


def _qemu() -> str | None:
    return shutil.which("qemu-x86_64")


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    """A wheel built here, installed into a fresh venv: ``(python, venv)``."""
    import platform

    if sys.platform != "linux" or platform.machine() != "x86_64":
        pytest.skip("qemu-user runs Linux x86-64 binaries")
    if _qemu() is None:
        pytest.skip("qemu-user is not installed (Debian: apt-get install qemu-user)")
    tmp_path = tmp_path_factory.mktemp("wheel")
    wheels = tmp_path / "wheels"
    build = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
         "-w", str(wheels), "-q"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    (wheel,) = wheels.glob("bayesopt_jax-*.whl")
    import zipfile

    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names), names
    assert any(n.startswith("bayesopt_jax/_src/native/_kernels") for n in names), names
    # A fresh venv with only the wheel; its dependencies come from this
    # environment's site-packages through a .pth line (no network).
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "-q",
         str(wheel)],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return python, venv


@needs_native
@pytest.mark.parametrize(
    "cpu,isa",
    # Haswell: AVX2 and FMA, no AVX-512. Sandy Bridge: AVX only (what jaxlib
    # needs), so the library runs its baseline copy with software fmaf.
    [("Haswell", "avx2"), ("SandyBridge", "baseline")],
)
@pytest.mark.emulated
def test_a_wheel_built_here_runs_on_older_cpus(wheel_venv, tmp_path, cpu, isa):
    """The wheel, in a fresh venv, under ``qemu-x86_64 -cpu CPU``: same results as here."""
    python, venv = wheel_venv
    script = tmp_path / "run.py"
    script.write_text(
        PROGRAM
        + textwrap.dedent(
            f"""
            import json, sys
            import bayesopt_jax as bj
            assert bj.__file__.startswith({str(venv)!r}), bj.__file__
            np.savez({str(tmp_path / "emulated.npz")!r}, **run())
            print(json.dumps(bj.native_status()))
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTHONPATH")}
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [_qemu(), "-cpu", cpu, str(python), str(script)],
        capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, (
        f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    )
    status = proc.stdout.strip().splitlines()[-1]
    assert '"used": true' in status and f'"isa": "{isa}"' in status, status
    # The host's numbers: same program, native path, this CPU's copy of the loops.
    here = _run_program()
    there = dict(np.load(tmp_path / "emulated.npz"))
    identical = all(here[k].tobytes() == there[k].tobytes() for k in here)
    print(f"{cpu} ({isa}) vs host ({native.isa()}): bit-identical = {identical}")
    # The kernels agree bit for bit by construction; XLA compiles the rest of
    # the step for each CPU: both sides within the rounding bound of the four
    # float32 steps (Tracked transcription), on the finite, unclipped entries.
    for name, wd in (("adam", 0.0), ("adamw", 0.1)):
        for k in ("a", "b"):
            got, want = there[f"{name}/{k}"], here[f"{name}/{k}"]
            np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
            rng = np.random.default_rng(0)
            params = {"a": rng.normal(size=70_001).astype(np.float32)}
            params["b"] = rng.normal(size=(3, 5)).astype(np.float32)
            g = (params[k] * 1e-2 + 1e-3).astype(np.float32)
            keep = np.ones(g.shape, bool)
            if k == "a":
                keep[:8] = False
            p = track(params[k][keep], np.float32)
            for u in reference.adam(track([g[keep]] * 4, np.float32)):
                p = p - 1e-3 * (u + wd * p) if wd else p - 1e-3 * u
            check(got[keep], p, f"{cpu} {name}/{k}")
            check(want[keep], p, f"host {name}/{k}")


@pytest.mark.subprocess
def test_the_sdist_ships_the_license_and_the_kernel_source(tmp_path):
    import tarfile

    out = subprocess.run(
        [sys.executable, "-c",
         f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (sdist,) = tmp_path.glob("bayesopt_jax-*.tar.gz")
    names = tarfile.open(sdist).getnames()
    assert any(n.endswith("/LICENSE") for n in names), names
    assert any(n.endswith("native/kernels.cc") for n in names), names
