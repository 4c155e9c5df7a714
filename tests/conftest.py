"""Test configuration: 8 simulated host devices, strict warnings, float64 helper."""

import os

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

# The kinds of test the inner loop (``pytest -n 2``) leaves out; the README's full
# command (``pytest -n 2 -m ""``, what CI runs) selects them too. Every test of a
# kind also carries ``slow``, the marker the default run deselects.
KINDS = {
    "subprocess": "starts a Python process (a build, a fresh interpreter)",
    "emulated": "runs code under an emulated older CPU (qemu-user)",
    "browser": "drives a headless browser",
    "multiprocess": "forms a cluster of processes (jax.distributed)",
    "optax_suite": "runs Optax's own test files with our functions",
    "training": "trains an example or runs a benchmark harness",
}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: left out of the inner loop; run by -m ''")
    for kind, what in KINDS.items():
        config.addinivalue_line("markers", f"{kind}: {what} (implies slow)")


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(config, items):
    for item in items:
        if any(item.get_closest_marker(kind) for kind in KINDS):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def x64():
    """Runs the test with 64-bit types enabled (float64 parity tests)."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def grad_stream(rng, shape=(5,), steps=50, scale=1.0, dtype=np.float64):
    """A reproducible stream of gradients with varied magnitudes and signs."""
    out = []
    for _ in range(steps):
        g = rng.normal(size=shape) * scale * np.exp(rng.normal(size=shape))
        out.append(g.astype(dtype))
    return out
