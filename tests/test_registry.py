"""The test registry's capabilities against what the package does: the per-feature lists that
the other tests derive from it must be true."""

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest
from registry import CAPABILITIES, OPTIMIZERS, make, make_eight_bit

import bayesopt_jax as bj

PARAMS = {"w": jnp.linspace(-1.0, 1.0, 12).reshape(3, 4), "b": jnp.ones(5)}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_native_capability_is_what_fused_step_does(name):
    if not bj.native_available():
        pytest.skip(f"native kernels unavailable: {bj.native_status()['reason']}")
    tx = make(name)
    reason = bj.fusion_reason(tx, PARAMS, tx.init(PARAMS), PARAMS)
    assert (reason is None) == CAPABILITIES[name].native, reason


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_eight_bit_capability_is_what_init_accepts(name):
    factory, _ = OPTIMIZERS[name]
    accepted = inspect.signature(factory).parameters
    claimed = CAPABILITIES[name].eight_bit
    assert all(arg in accepted for arg in claimed)
    assert not [
        a for a in ("mu_dtype", "nu_dtype", "sigma_dtype") if a in accepted and a not in claimed
    ]
    if not claimed:
        return
    tx = make_eight_bit(name, bj.Blockwise8())
    state = tx.init(PARAMS)
    # No buffer shaped like a parameter is left in float: each one is stored in 8 bits.
    leaves = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, bj.Quantized))
    stored = [x for x in leaves if isinstance(x, bj.Quantized)]
    plain = [x.shape for x in leaves if not isinstance(x, bj.Quantized)]
    assert stored and not {(3, 4), (5,)} & set(plain), plain
    u, _ = tx.update(PARAMS, state, PARAMS)
    assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(u))


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_counterparts_exist(name):
    caps = CAPABILITIES[name]
    if caps.optax is not None:
        assert callable(getattr(optax, caps.optax))
    if caps.torch is not None:
        torch = pytest.importorskip("torch")
        assert callable(getattr(torch.optim, caps.torch))
