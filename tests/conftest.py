"""Test configuration: 8 simulated host devices, strict warnings, float64 helper."""

import os

# Must happen before JAX is imported anywhere in the test session.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest


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
