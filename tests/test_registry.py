"""The test registry's capabilities against what the package does: the per-feature lists that
the other tests derive from it must be true."""

import inspect

import jax
import jax.numpy as jnp
import optax
import pytest
from helpers import contract as contract_of
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


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_eight_bit_capability_is_what_the_slots_declare(name):
    """The registry's storage arguments are the ones the transformation's state slots name."""
    declared = {slot.dtype_arg for slot in contract_of(make(name)).slots if slot.dtype_arg}
    assert declared == set(CAPABILITIES[name].eight_bit)


@pytest.mark.parametrize("name", sorted(n for n, c in CAPABILITIES.items() if c.native))
def test_signed_slots_are_the_native_rules(name):
    """A slot declared signed is stored with the signed 8-bit table; the native rule's kernels
    and bounds assume the same buffers signed. The two declarations must agree."""
    from bayesopt_jax._src.native import rules

    tx = make(name)
    contract = contract_of(tx)
    state = tx.init(PARAMS)[0]
    slots = zip(contract.slots, contract.read(state), strict=True)
    present = [s for s, tree in slots if tree is not None]
    kernel = contract.prepare(state).kernel
    if kernel is None:
        pytest.skip("the native kernels are not in use here")
    assert tuple(j for j, s in enumerate(present) if s.signed) == rules.RULES[kernel.rule].signed
    # and init allocates them so: signed 8-bit codes for exactly those slots
    stored = make_eight_bit(name, bj.Blockwise8()).init(PARAMS)[0]
    for slot in present:
        codes = getattr(stored, slot.field)["w"].codes
        assert (codes.dtype == jnp.int8) == slot.signed, slot
