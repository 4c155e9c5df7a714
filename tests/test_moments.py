"""The composable pieces: bias_correction, amsgrad_max, and the buffer helpers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bounds import check, check_trajectory, power, rejects, track
from conftest import grad_stream
from helpers import run_updates

import bayesopt_jax as bj
from bayesopt_jax._src import buffers, numerics


@pytest.mark.parametrize("decay", [0.0, 0.5, 0.9, 0.999])
def test_bias_correction_after_raw_ema_is_debiased_ema(x64, rng, decay):
    grads = grad_stream(rng, steps=60)
    tx = optax.chain(optax.ema(decay, debias=False), bj.bias_correction(decay))
    got, _ = run_updates(tx, grads)
    # The recursion m_t = d·m + (1-d)·g divided by 1 - d^t, with its rounding bound ...
    want = _debiased_ema(track(grads), decay)
    check_trajectory(got, want)
    assert rejects(got, _debiased_ema(track(grads), decay + 1e-9)) or decay == 0.0
    # ... is the closed form: a normalised weighted average (to the same bound).
    for t in (1, 10, len(grads)):
        w = np.array([(1 - decay) * decay ** (t - k) for k in range(1, t + 1)])
        closed = (w[:, None] * np.array(grads[:t])).sum(0) / w.sum()
        check(closed, want[t - 1], f"closed form, step {t}")
    # ... and equals Optax's built-in debiased EMA.
    theirs, _ = run_updates(optax.ema(decay, debias=True), grads)
    check_trajectory(theirs, want, "optax.ema")


def _debiased_ema(grads, decay):
    m, out = np.zeros_like(grads[0]), []
    for t, g in enumerate(grads, start=1):
        m = decay * m + (1 - decay) * g
        out.append(m / (1 - power(decay, t, g)))
    return out


def test_bias_correction_with_saturated_count_is_finite():
    tx = bj.bias_correction(0.9)
    state = bj.BiasCorrectionState(count=jnp.asarray(jnp.iinfo(jnp.int32).max, jnp.int32))
    u, state = tx.update(jnp.ones(3), state)
    np.testing.assert_array_equal(u, 1.0)
    assert int(state.count) == jnp.iinfo(jnp.int32).max


def test_amsgrad_max_is_running_max_for_any_sign(x64, rng):
    grads = grad_stream(rng, steps=50)
    grads = [g - 5.0 for g in grads]  # mostly negative inputs
    got, _ = run_updates(bj.amsgrad_max(), grads)
    np.testing.assert_array_equal(np.array(got), np.maximum.accumulate(np.array(grads), axis=0))


def test_amsgrad_from_pieces_matches_corrected_convention(x64, rng):
    """Composing the pieces on the second moment gives Optax's AMSGrad maximum."""
    grads = grad_stream(rng, steps=80, scale=5.0) + grad_stream(rng, steps=80, scale=0.1)
    pieces = optax.chain(optax.ema(0.99, debias=False), bj.bias_correction(0.99), bj.amsgrad_max())
    got, _ = run_updates(pieces, [g * g for g in grads])
    _, state = run_updates(bj.scale_by_amsgrad(b2=0.99, max_of="corrected"), grads)
    # Both are max_t of the debiased EMA of g², within its rounding bound.
    tracked = track(grads)
    want = _debiased_ema([g * g for g in tracked], 0.99)
    running = want[0]
    for w in want[1:]:
        running = np.maximum(running, w)
    check(got[-1], running, "pieces")
    check(state.nu_max, running, "scale_by_amsgrad")


def test_zeros_like_is_finite_and_typed():
    x = jnp.array([jnp.inf, -jnp.inf, jnp.nan, 1.0], jnp.bfloat16)
    z = buffers.zeros_like(x, jnp.float32)
    assert z.dtype == jnp.float32
    np.testing.assert_array_equal(z, 0.0)
    zc = buffers.zeros_like(jnp.ones(2, jnp.complex64), jnp.float32)
    assert zc.dtype == jnp.float32
    assert buffers.zeros_like(jnp.zeros((0, 3))).shape == (0, 3)


def test_zeros_like_keeps_sharding_under_jit():
    devices = np.array(jax.devices()[:8]).reshape(4, 2)
    if devices.size < 8:
        pytest.skip("needs 8 devices")
    mesh = jax.sharding.Mesh(devices, ("data", "model"))
    spec = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    x = jax.device_put(jnp.ones((8, 4)), spec)
    z = jax.jit(buffers.zeros_like)(x)
    assert z.sharding.is_equivalent_to(spec, 2)
    state = jax.jit(bj.adam(1e-3).init)({"w": x})
    for leaf in jax.tree.leaves(state[0].mu) + jax.tree.leaves(state[0].nu):
        assert leaf.sharding.is_equivalent_to(spec, 2)


def test_tree_map_multi_rejects_mismatch():
    with pytest.raises(ValueError):
        buffers.tree_map_multi(lambda a, b: (a, b), 2, {"a": 1.0}, {"b": 2.0})


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64])
def test_to_compute_again_has_to_computes_bits(dtype):
    # The second spelling of the gradient clip must give the same bits for
    # every kind of value: zeros of both signs, subnormals, the clip limit and
    # its neighbours, huge finite values, infinities and NaN.
    if dtype == jnp.float64 and not jax.config.jax_enable_x64:
        pytest.skip("float64 needs jax_enable_x64")
    info = jnp.finfo(dtype)
    c = numerics.compute_dtype(dtype)
    limit = np.asarray(numerics.clip_limit(c), c)
    around = np.array(
        [np.nextafter(limit, np.asarray(0, c)), limit, np.nextafter(limit, np.asarray(np.inf, c))]
    )
    values = np.concatenate(
        [
            [0.0, -0.0, float(info.smallest_subnormal), -float(info.tiny), 1.0, -3.5],
            around,
            -around,
            [float(info.max), -float(info.max), np.inf, -np.inf, np.nan],
        ]
    )
    g = jnp.asarray(values.astype(np.float64)).astype(dtype)
    want = np.asarray(numerics.to_compute(g))
    got = np.asarray(numerics.to_compute_again(g))
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got.view(np.uint8), want.view(np.uint8))
    # and the clip itself is real: beyond the limit both give the limit.
    assert np.abs(want[np.isfinite(want)]).max() <= limit
