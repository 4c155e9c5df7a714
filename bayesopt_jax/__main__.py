"""``python -m bayesopt_jax``: the facts a bug report needs, one per line."""

from __future__ import annotations

import platform
import sys
from importlib import metadata


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    """The diagnostic text: versions, backend, devices and the native kernels' state."""
    import jax

    import bayesopt_jax as bj

    lines = [
        f"bayesopt_jax {bj.__version__} ({bj.__file__})",
        f"python {sys.version.split()[0]} on {platform.platform()} ({platform.machine()})",
    ]
    lines += [f"{p} {_version(p)}" for p in ("jax", "jaxlib", "optax", "chex", "numpy", "flax")]
    lines.append(f"backend: {jax.default_backend()}")
    devices = jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    lines.append(f"devices: {len(devices)} ({', '.join(kinds)}); processes: {jax.process_count()}")
    status = bj.native_status()
    lines.append(
        f"native kernels built: {status['built']}"
        + (f" ({status['library']})" if status["library"] else "")
    )
    lines.append(f"native kernels loaded: {status['loaded']}")
    lines.append(f"native kernels used: {status['used']}")
    lines.append(
        f"native instruction set: {status['isa'] or '-'} (this CPU runs: "
        f"{', '.join(status['isas']) or '-'})"
    )
    if status["reason"]:
        lines.append(f"why not used: {status['reason']}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
