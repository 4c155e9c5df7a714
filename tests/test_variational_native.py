"""The variational σ-filter's native path: its update rule and its in-kernel draw, against
the pure path, float64 transcriptions and SciPy's erf⁻¹, within counted bounds."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_paths_agree, contract
from scipy import special

import bayesopt_jax as bj
from bayesopt_jax._src import draws, native, posterior, variational
from bayesopt_jax._src.native import transcriptions

U32 = 2.0**-24  # float32 unit roundoff
EPS32 = float(np.finfo(np.float32).eps)

needs_native = pytest.mark.skipif(
    not bj.native_available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)


erfinv_bound = transcriptions.erfinv_bound  # the float32 bound of Giles' erf⁻¹ (test_draws.py)


def _words(seed: int, leaves: int) -> jnp.ndarray:
    return draws.step_words(jax.random.key_data(jax.random.key(seed)), jnp.int32(seed), leaves)


@needs_native
def test_the_kernel_draws_the_pure_paths_uniforms_and_erfinv_within_its_bound():
    """With p = 0, N = 1, δ = 1 and no curvature, v = 1 and the kernel returns ε itself.

    Its uniform u is the integer transcription's (so the bits are the pure
    path's), and ε is within Giles' float32 bound of float64 √2·erf⁻¹(u): a
    wrong index, word or bit would move ε by far more (checked below).
    """
    shapes = [(2**21,), (3, 5), (1,), (70_001,)]  # one leaf cut into many chunks
    words = _words(3, len(shapes))
    ps = [jnp.zeros(s, jnp.float32) for s in shapes]
    out = native.sample(
        jnp.array([1.0, 0.0], jnp.float32), jnp.ones(len(shapes), jnp.float32), words, ps, ps
    )
    for i, shape in enumerate(shapes):
        u = draws.uniform_reference(np.asarray(words[i]), shape)
        ref = math.sqrt(2) * special.erfinv(u)
        got = np.asarray(out[i], np.float64)
        bound = erfinv_bound(u) * np.abs(ref)
        assert np.all(np.abs(got - ref) <= bound), shape
        if i == 0:
            # both polynomials are used, and the tails are reached
            assert np.mean(np.abs(u) > 1 - math.exp(-5)) > 1e-3 and np.abs(got).max() > 4.5
            # The bound rejects another entry's draw and another leaf's words.
            assert not np.all(np.abs(np.roll(got, 1) - ref) <= bound)
            other = draws.uniform_reference(np.asarray(words[3]), shape)
            assert not np.all(np.abs(math.sqrt(2) * special.erfinv(other) - ref) <= bound)


def _trained_state(params, tx, steps, seed=0):
    rng = np.random.default_rng(seed)
    state = tx.init(params)
    for _ in range(steps):
        g = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 0.1, p.dtype), params)
        _, state = tx.update(g, state, params)
    return state


@needs_native
@pytest.mark.parametrize("curvature", ["variance", "evidence", "reparam", "newton"])
def test_native_and_pure_training_samples_agree_within_the_bound(curvature, rng):
    """θ̃ = p + √v·ε by the kernel and by the pure statement.

    Both compute h, v and p + √v·ε in the same order (at most 8 roundings:
    the pure path's XLA may regroup them; 10 with ``variational_newton``'s
    proximal precision h + 1/σ), relative u each of |p| + √v|ε|, and ε
    within its erf⁻¹ bound on each side: |Δ| ≤ k·u(|p| + √v|ε|) + √v|ε|·2B(u).
    """
    params = {
        "w": jnp.asarray(rng.normal(size=(64, 50)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(50,)), jnp.float32),
        "half": jnp.asarray(rng.normal(size=(9,)), jnp.bfloat16),  # the pure path
    }
    if curvature == "newton":
        tx = bj.variational_newton(num_data=500, batch_size=8, key=11)
        roundings = 10
    else:
        tx = bj.variational_sigma_filter(
            3e-3, num_data=500, batch_size=8, curvature=curvature, key=11
        )
        roundings = 8
    state = _trained_state(params, tx, 4)
    vs = posterior._one_state(state, "test")
    got = jax.jit(bj.training_sample)(params, state)
    with native.pure_jax():
        want = jax.jit(lambda p, s: bj.training_sample(p, s))(params, state)
    np.testing.assert_array_equal(np.asarray(got["half"]), np.asarray(want["half"]))
    var = variational.variance_tree(vs)
    words = draws.step_words(vs.key, vs.count, 3)
    names = sorted(params)  # the flattening order of a dict
    for name in ("w", "b"):
        u = draws.uniform_reference(np.asarray(words[names.index(name)]), params[name].shape)
        noise = np.sqrt(np.asarray(var[name], np.float64)) * np.abs(
            math.sqrt(2) * special.erfinv(u)
        )
        p = np.abs(np.asarray(params[name], np.float64))
        bound = roundings * U32 * (p + noise) + noise * 2 * erfinv_bound(u)
        a, b = (np.asarray(x[name], np.float64) for x in (got, want))
        assert np.all(np.abs(a - b) <= bound), name
        assert np.any(a != np.asarray(params[name]))  # the draw moved the weights
        # The bound rejects the previous step's draw.
        prev = draws.uniform_reference(
            np.asarray(draws.step_words(vs.key, vs.count - 1, 3)[names.index(name)]),
            params[name].shape,
        )
        wrong = np.asarray(params[name], np.float64) + np.sqrt(
            np.asarray(var[name], np.float64)
        ) * (math.sqrt(2) * special.erfinv(prev))
        assert not np.all(np.abs(a - wrong) <= bound)


@needs_native
def test_the_native_draw_is_the_same_on_every_layout():
    """Sharded over 8 devices, in a pmap replica and under vmap: the unsharded draw, bit
    for bit (the kernel indexes each whole leaf; a sharded jit gathers its operands)."""
    rng = np.random.default_rng(5)
    params = {
        "w": jnp.asarray(rng.normal(size=(64, 40)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(16,)), jnp.float32),
    }
    tx = bj.variational_sigma_filter(1e-3, num_data=1000, batch_size=10, key=2)
    state = _trained_state(params, tx, 3)
    ref = jax.jit(bj.training_sample)(params, state)
    mesh = jax.make_mesh((4, 2), ("a", "b"))
    layout = {
        (64, 40): jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")),
        (16,): jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a")),
    }

    def put(x):
        shape = getattr(x, "shape", None)
        return jax.device_put(x, layout[shape]) if shape in layout else x

    sharded = jax.jit(bj.training_sample)(jax.tree.map(put, params), jax.tree.map(put, state))
    stack = lambda t: jax.tree.map(lambda x: jnp.stack([x] * 8), t)  # noqa: E731
    replicas = jax.pmap(bj.training_sample)(stack(params), stack(state))
    batched = jax.vmap(bj.training_sample, in_axes=(0, None))(
        jax.tree.map(lambda x: jnp.stack([x, -x]), params), state
    )
    for name in params:
        r = np.asarray(ref[name])
        np.testing.assert_array_equal(np.asarray(sharded[name]), r)
        np.testing.assert_array_equal(np.asarray(replicas[name]), np.stack([r] * 8))
        np.testing.assert_array_equal(np.asarray(batched[name][0]), r)
        # the second example: its own weights, the same noise
        # noise = θ̃ − θ from either example, each θ̃ rounded once (u|θ̃|): 2u·max|θ̃| apart
        noise = r - np.asarray(params[name])
        got = np.asarray(batched[name][1]) - (-np.asarray(params[name]))
        np.testing.assert_allclose(got, noise, rtol=0, atol=4 * EPS32 * np.abs(r).max())


@needs_native
def test_the_native_draw_has_the_pure_statements_derivative():
    params = {"w": jnp.linspace(-1.0, 1.0, 12, dtype=jnp.float32)}
    tx = bj.variational_sigma_filter(1e-3, num_data=100, batch_size=4)
    state = _trained_state(params, tx, 2)

    def loss(p):
        return jnp.sum(bj.training_sample(p, state)["w"] ** 2)

    got = jax.grad(loss)(params)["w"]
    # d/dp Σ(p + √v ε)² = 2 θ̃ (the draw's scale does not depend on p); differentiated,
    # the kernel's value is the pure statement's (as for every native rule).
    with native.pure_jax():
        want = 2 * np.asarray(bj.training_sample(params, state)["w"])
    np.testing.assert_array_equal(np.asarray(got), want)


# The update rule: native against pure. Per path, in float32 units u of each
# result's terms (the transcription on magnitudes): the σ-filter's states
# 19u (tests/test_native.py), the curvature r: m̂ = m·rp or m/pd 2u, g − m̂ 3u,
# its square 7u, ·(1−γ) 8u, + γr 9u (either order of the fused multiply-add);
# so two paths differ by at most 2·19 = 38u in every state and in p.
BOUND_UNITS = 38


def _random_state(tx, params, rng, count):
    state = tx.init(params)
    vs = state[0]
    fields = {}
    for name in ("mu", "nu", "sigma", "hess"):
        if getattr(vs, name) is None:
            continue
        signed, scale = (True, 1e-2) if name == "mu" else (False, 1e-4)
        fields[name] = {
            k: np.asarray(
                (rng.normal(size=p.shape) if signed else rng.random(size=p.shape) + 0.01) * scale,
                np.float32,
            )
            for k, p in params.items()
        }
    return (vs._replace(count=jnp.int32(count), **fields), *state[1:])


@needs_native
@pytest.mark.parametrize("b1", [0.9, 0.0])
@pytest.mark.parametrize("count", [0, 5])
@pytest.mark.parametrize("how", ["two-call", "fused"])
def test_the_variational_rule_agrees_with_the_pure_path(b1, count, how, rng):
    params = {
        "big": jnp.asarray(rng.normal(size=(300, 250)), jnp.float32),
        "small": jnp.asarray(rng.normal(size=(7,)), jnp.float32),
    }
    grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape) * 1e-2, p.dtype), params)
    grads["small"] = grads["small"].at[:4].set(jnp.array([0.0, 3e38, jnp.inf, jnp.nan]))
    tx = bj.variational_sigma_filter(1e-3, num_data=1000, batch_size=16, b1=b1)
    state = _random_state(tx, params, rng, count)

    def step(g, s, p):
        if how == "fused":
            return bj.fused_step(tx, g, s, p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    assert bj.fusion_reason(tx, grads, state, params) is None
    rule = "variational_momentum" if b1 else "variational"
    text = jax.jit(step).lower(grads, state, params).as_text()
    assert f"bayesopt_jax_{rule}_" in text
    got = jax.jit(step)(grads, state, params)
    with native.pure_jax():
        want = jax.jit(lambda g, s, p: step(g, s, p))(grads, state, params)
    prepared = contract(tx).prepare(state[0])
    sc = [float(x) for x in np.asarray(prepared.kernel.operand)]
    fields = [f for f in ("mu", "nu", "sigma", "hess") if getattr(state[0], f) is not None]
    for key in params:
        args = [np.asarray(getattr(state[0], f)[key], np.float64) for f in fields]
        args = [np.abs(a) for a in args]
        g = np.abs(np.asarray(grads[key], np.float64))
        with np.errstate(all="ignore"):
            mags = transcriptions.MAGNITUDES[rule](sc, g, *args)
        p_mag = np.abs(np.asarray(params[key], np.float64)) + mags[0]
        assert_paths_agree(got, want, fields, key, p_mag, mags[1:], BOUND_UNITS)
    # Everything else in the state is computed once, by the same code.
    for f in ("count", "curvature_scale", "prior_precision", "key"):
        np.testing.assert_array_equal(getattr(got[1][0], f), getattr(want[1][0], f))


@needs_native
def test_the_variational_bound_is_not_vacuous(rng):
    # γ off by one part in 10⁴ moves r by far more than 38 units of its terms.
    params = {"w": jnp.asarray(rng.normal(size=(200, 30)), jnp.float32)}
    grads = jax.tree.map(lambda p: p * 1e-2, params)
    good = bj.variational_sigma_filter(1e-3, num_data=1000, batch_size=16, hess_decay=0.99)
    bad = bj.variational_sigma_filter(
        1e-3, num_data=1000, batch_size=16, hess_decay=0.99 * (1 + 1e-4)
    )
    state = _random_state(good, params, rng, 5)
    a = jax.jit(good.update)(grads, state, params)[1][0].hess["w"]
    b = jax.jit(bad.update)(grads, state, params)[1][0].hess["w"]
    prepared = contract(good).prepare(state[0])
    sc = [float(x) for x in np.asarray(prepared.kernel.operand)]
    args = [
        np.abs(np.asarray(getattr(state[0], f)["w"], np.float64))
        for f in ("mu", "nu", "sigma", "hess")
    ]
    mags = transcriptions.MAGNITUDES["variational_momentum"](
        sc, np.abs(np.asarray(grads["w"], np.float64)), *args
    )
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    assert np.any(diff > BOUND_UNITS * EPS32 * mags[4])


@needs_native
def test_the_self_test_checks_the_draw_kernel(monkeypatch):
    # A reference that derives its uniforms from other words: the kernel then
    # "disagrees" far beyond the bound, and the self-test must say so.
    real = draws.uniform_reference
    monkeypatch.setattr(
        draws, "uniform_reference", lambda w, shape: real(np.asarray(w) ^ np.uint32(1), shape)
    )
    message = native.self_test()
    assert message is not None and "sample kernel" in message
    monkeypatch.undo()
    assert native.self_test() is None
