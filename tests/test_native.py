"""The native CPU kernels and the fused step.

The kernels claim to compute what the pure-JAX path computes, bit for bit,
in place and on each device's shards. These tests compare the two paths on
the same inputs (the pure path is traced inside ``native.pure_jax()``), and
the fused trajectory against the float64 NumPy transcription of Adam.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import textwrap
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference
import registry
from bounds import U32, check, check_tree, track, trajectory_bound
from helpers import assert_paths_agree, mesh_4x2
from helpers import contract as contract_of
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import bayesopt_jax as bj
from bayesopt_jax._src import engine, native
from bayesopt_jax._src.native import build
from bayesopt_jax._src.native import transcriptions as reference_rules

HAVE_COMPILER = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
needs_native = pytest.mark.skipif(
    not bj.native_available(), reason=f"native kernels unavailable: {native.unavailable_reason()}"
)
TARGETS = native.TARGETS


def uses_kernel(fn, *args) -> bool:
    text = jax.jit(fn).lower(*args).as_text()
    return any(t in text for t in TARGETS)


def bits(tree):
    """Every leaf as raw bytes (NaN payloads and signed zeros included)."""
    return [
        (np.asarray(x).dtype, np.asarray(x).shape, np.asarray(x).tobytes())
        for x in jax.tree.leaves(tree)
    ]


def assert_close(got, want, bound):
    """Same types and non-finite entries; finite entries within twice the forward error bound."""
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        a, b = np.asarray(a), np.asarray(b)
        assert a.dtype == b.dtype and a.shape == b.shape
        finite = np.isfinite(b)
        np.testing.assert_array_equal(a[~finite], b[~finite])
    check_tree(got, want, bound)


def cos_trajectory_bound(tx, p, steps):
    """:func:`bounds.trajectory_bound` of ``steps`` steps on the gradient ``cos(p)``."""
    return trajectory_bound(
        tx,
        p,
        lambda q, _: jax.tree.map(jnp.cos, q),
        lambda q, _: jax.tree.map(lambda x: 4 * U32 + 0 * x, q),
        [None] * steps,
        unit=U32,
    )[-1]


def both_paths(make_fn, *args):
    """Runs ``make_fn()`` jitted with the kernels and with the pure-JAX path."""
    got = jax.jit(make_fn())(*args)
    with native.pure_jax():
        want = jax.jit(make_fn())(*args)
    return got, want


def tree_with_specials(rng, shapes):
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = {
        k: (rng.normal(size=s) * 10.0 ** rng.integers(-6, 2, size=s)).astype(np.float32)
        for k, s in shapes.items()
    }
    big = max(grads, key=lambda k: grads[k].size)
    flat = grads[big].reshape(-1)
    flat[:10] = [0.0, -0.0, 1e-38, 1e-45, 3e38, -3e38, np.inf, -np.inf, np.nan, 1e20]
    return params, grads


SHAPES = {"big": (300, 257), "mat": (7, 5), "vec": (3,), "scalar": (), "one": (1,)}

ADAM = {"b1": 0.9, "b2": 0.999, "eps": 1e-8, "lr": 1e-3, "wd": 0.0}
# name: (factory, hyperparameters for the error bound: the largest lr and decay)
OPTIMIZERS = {
    "adam": (lambda: bj.adam(1e-3), ADAM),
    "adam b1=0": (
        lambda: bj.adam(3e-2, b1=0.0, b2=0.5, eps=1e-3),
        {"b1": 0.0, "b2": 0.5, "eps": 1e-3, "lr": 3e-2, "wd": 0.0},
    ),
    "adam schedule": (lambda: bj.adam(optax.linear_schedule(1e-2, 1e-4, 4)), ADAM | {"lr": 1e-2}),
    "adamw": (lambda: bj.adamw(1e-3, weight_decay=0.1), ADAM | {"wd": 0.1}),
    "adamw mask tree": (
        lambda: bj.adamw(
            1e-3,
            weight_decay=0.5,
            mask={"big": True, "mat": False, "vec": True, "scalar": False, "one": True},
        ),
        ADAM | {"wd": 0.5},
    ),
    "adamw mask fn": (
        lambda: bj.adamw(
            1e-3, weight_decay=0.5, mask=lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
        ),
        ADAM | {"wd": 0.5},
    ),
}


def test_the_kernels_are_built_and_used_where_a_compiler_exists():
    if not HAVE_COMPILER:
        pytest.skip("no C++ compiler on this machine")
    assert native.library_path() is not None, "the install step did not build the kernels"
    assert bj.native_available(), native.unavailable_reason()


def make_step(tx, how):
    def step(params, state, grads):
        if how == "fused":
            return bj.fused_step(tx, grads, state, params)
        u, state = tx.update(grads, state, params)
        return optax.apply_updates(params, u), state

    return step


EPS32 = float(np.finfo(np.float32).eps)


def assert_within_bound(got, want, params, grads, mu, nu, count, hyper, k=4):
    """One step's results agree within ``k`` rounding units of each result's terms.

    For every element, ``|got - want| <= k * eps32 * S`` with S the sum of
    magnitudes of the terms that formed it: ``|b1 m| + |(1-b1) g|`` for m,
    ``b2 v + (1-b2) g²`` for v, and ``|p| + lr (|m̂| / (sqrt(v̂) + eps) + wd |p|)``
    for p. Non-finite entries must be the same.
    """
    (p1, state1), (p2, state2) = got, want
    t = int(count) + 1
    b1, b2, eps, lr, wd = (hyper[k] for k in ("b1", "b2", "eps", "lr", "wd"))
    for key in params:
        g = np.clip(np.asarray(grads[key], np.float64), -9.2e18, 9.2e18)
        p0 = np.asarray(params[key], np.float64)
        s_m = np.abs(b1 * np.asarray(mu[key], np.float64)) + np.abs((1 - b1) * g)
        s_v = b2 * np.asarray(nu[key], np.float64) + (1 - b2) * g * g
        v_hat = np.asarray(state2[0].nu[key], np.float64) / (1 - b2**t)
        s_u = s_m / (1 - b1**t) / (np.sqrt(v_hat) + eps) + wd * np.abs(p0)
        s_p = np.abs(p0) + lr * s_u
        for name, a, b, scale in [
            ("p", p1[key], p2[key], s_p),
            ("m", state1[0].mu[key], state2[0].mu[key], s_m),
            ("v", state1[0].nu[key], state2[0].nu[key], s_v),
        ]:
            a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
            finite = np.isfinite(b) & np.isfinite(scale)
            np.testing.assert_array_equal(a[~finite], b[~finite], err_msg=f"{name}[{key}]")
            err = np.abs(a[finite] - b[finite]) / (EPS32 * scale[finite] + 1e-45)
            assert err.max(initial=0.0) <= k, (name, key, err.max())


def random_state(tx, params, rng, count=5):
    state = tx.init(params)
    mu = {k: (rng.normal(size=np.shape(p)) * 1e-2).astype(np.float32) for k, p in params.items()}
    nu = {k: (rng.random(size=np.shape(p)) * 1e-4).astype(np.float32) for k, p in params.items()}
    adam_state = state[0]._replace(count=jnp.int32(count), mu=mu, nu=nu)
    return (adam_state, *state[1:]), mu, nu


@needs_native
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("how", ["two-call", "fused"])
@pytest.mark.parametrize(
    "context", ["one step per call", "init in the same jit", "gradient computed in the same jit"]
)
def test_kernels_agree_with_the_pure_path_within_four_rounding_units(name, how, context, rng):
    # XLA rewrites the pure path depending on what surrounds it (it turns
    # divisions by a scalar into products, regroups them, folds constants and
    # contracts products into FMAs); the kernel rounds the operations as
    # written. So the two agree to a few roundings of each result's terms,
    # not always to the bit.
    params, grads = tree_with_specials(rng, SHAPES)
    make_tx, hyper = OPTIMIZERS[name]
    tx = make_tx()
    state, mu, nu = random_state(tx, params, rng)
    if context == "init in the same jit":
        state = tx.init(params)
        mu = nu = jax.tree.map(np.zeros_like, params)

    def make():
        step = make_step(tx, how)
        if context == "init in the same jit":
            return lambda p, s, g: step(p, tx.init(p), g)
        if context == "gradient computed in the same jit":
            return lambda p, s, g: step(p, s, jax.tree.map(lambda x: x * 0.37, g))
        return lambda p, s, g: step(p, s, g)

    assert uses_kernel(make(), params, state, grads)
    got, want = both_paths(make, params, state, grads)
    if context == "gradient computed in the same jit":
        grads = jax.tree.map(lambda x: np.asarray(jnp.asarray(x) * 0.37), grads)
    count = 0 if context == "init in the same jit" else 5
    assert_within_bound(got, want, params, grads, mu, nu, count, hyper)
    assert np.asarray(got[1][0].count) == count + 1
    # the specials went through: inf/NaN gradients reach the state, finite ones stay finite
    m = np.asarray(got[1][0].mu["big"]).reshape(-1)
    assert not np.isfinite(m[6:9]).any() and np.isfinite(m[:6]).all() and np.isfinite(m[9:]).all()


@needs_native
def test_the_bound_is_not_vacuous(rng):
    # A kernel that computed with b1 off by one part in a million would fail it.
    params, grads = tree_with_specials(rng, SHAPES)
    tx = bj.adam(1e-3)
    state, mu, nu = random_state(tx, params, rng)
    good = jax.jit(make_step(tx, "fused"))(params, state, grads)
    bad_tx = bj.adam(1e-3, b1=0.9 * (1 + 1e-6))
    bad = jax.jit(make_step(bad_tx, "fused"))(params, state, grads)
    assert_within_bound(good, good, params, grads, mu, nu, 5, ADAM)
    with pytest.raises(AssertionError):
        assert_within_bound(bad, good, params, grads, mu, nu, 5, ADAM)


@needs_native
def test_fused_adam_follows_the_float64_reference(rng, x64):
    # Single precision kernel against the float64 transcription of Adam.
    grads = [rng.normal(size=(40_000,)) * np.exp(rng.normal(size=(40_000,))) for _ in range(30)]
    lr = 1e-2
    with jax.enable_x64(False):
        tx = bj.adam(lr)
        p = jnp.zeros(40_000, jnp.float32)
        state = tx.init(p)
        step = jax.jit(lambda p, s, g: bj.fused_step(tx, g, s, p))
        assert uses_kernel(lambda p, s, g: bj.fused_step(tx, g, s, p), p, state, p)
        tracked = track(grads, np.float32)
        expected = track(np.zeros(40_000), np.float32)
        for g, u in zip(grads, reference.adam(tracked), strict=True):
            p, state = step(p, state, jnp.asarray(g, jnp.float32))
            expected = expected - lr * u
            check(np.asarray(p), expected)


@needs_native
@pytest.mark.parametrize(
    "make_tx, params_dtype",
    [
        (lambda: optax.sgd(0.1), jnp.float32),  # not one of ours
        (lambda: bj.adamax(1e-3), jnp.float32),  # ours, no kernel
        (lambda: bj.sigma_filter(1e-3, b1=jnp.asarray(0.9)), jnp.float32),  # traced b1
        (lambda: bj.amsgrad(1e-3, eps_root=1e-12), jnp.float32),
        (lambda: bj.adam(1e-3, nesterov=True), jnp.float32),
        (lambda: bj.adam(1e-3, eps_root=1e-12), jnp.float32),
        (lambda: bj.adam(1e-3, b1=jnp.asarray(0.9)), jnp.float32),  # traced hyperparameter
        (lambda: bj.adamw(1e-3, weight_decay=jnp.asarray(0.1)), jnp.float32),
        (lambda: bj.adam(1e-3, mu_dtype=jnp.bfloat16), jnp.float32),
        (lambda: bj.adam(1e-3), jnp.bfloat16),
        (lambda: optax.inject_hyperparams(bj.adam)(learning_rate=1e-3), jnp.float32),
    ],
)
def test_anything_else_takes_the_two_call_path(make_tx, params_dtype, rng):
    tx = make_tx()
    params = {"w": jnp.asarray(rng.normal(size=(6, 4)), params_dtype)}
    grads = jax.tree.map(lambda x: x * 0.1, params)
    state = tx.init(params)

    def fused_fn(p, s, g):
        return bj.fused_step(tx, g, s, p)

    def two_call(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    text = jax.jit(fused_fn).lower(params, state, grads).as_text()
    assert not any(t in text for t in native.STEP_TARGETS)
    assert bits(jax.jit(fused_fn)(params, state, grads)) == bits(
        jax.jit(two_call)(params, state, grads)
    )


@needs_native
def test_mixed_trees_use_the_kernel_for_float32_leaves_only(rng):
    tx = bj.adam(1e-3)
    params = {"f32": jnp.ones((50,)), "bf16": jnp.ones((50,), jnp.bfloat16)}
    grads = jax.tree.map(lambda x: x * 0.5, params)

    def make():
        def run(p, g):
            u, s = tx.update(g, tx.init(p), p)
            return optax.apply_updates(p, u), s

        return run

    assert uses_kernel(make(), params, grads)
    got, want = both_paths(make, params, grads)
    # one step from the initial state with a constant, exact gradient
    f32 = {"f32": params["f32"]}
    bound = trajectory_bound(
        tx,
        f32,
        lambda q, _: {"f32": grads["f32"]},
        lambda q, _: {"f32": 0 * q["f32"]},
        [None],
        unit=U32,
    )[-1]
    assert_close(got[0]["f32"], want[0]["f32"], bound[0]["f32"])
    for part in ("mu", "nu"):
        got_m, want_m = getattr(got[1][0], part)["f32"], getattr(want[1][0], part)["f32"]
        assert_close(got_m, want_m, getattr(bound[1][0], part)["f32"])
    assert bits(got[0]["bf16"]) == bits(want[0]["bf16"])
    assert got[0]["bf16"].dtype == jnp.bfloat16


@needs_native
def test_donated_parameters_and_moments_are_updated_in_place():
    tx = bj.adam(1e-3)
    params = {"w": jnp.ones((1000,)), "b": jnp.ones((3,))}
    grads = jax.tree.map(lambda x: x * 0.5, params)
    state = tx.init(params)
    step = jax.jit(lambda p, s, g: bj.fused_step(tx, g, s, p), donate_argnums=(0, 1))
    before = [
        x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state[0].mu, state[0].nu))
    ]
    params, state = step(params, state, grads)
    after = [x.unsafe_buffer_pointer() for x in jax.tree.leaves((params, state[0].mu, state[0].nu))]
    assert after == before


@needs_native
@pytest.mark.parametrize("explicit", [pytest.param(False, marks=pytest.mark.slow), True])
def test_sharded_jit_runs_the_kernel_on_each_shard(explicit, rng):
    mesh = mesh_4x2()
    if explicit:
        mesh = jax.make_mesh(
            (4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Explicit,) * 2
        )
    specs = {"w": P("data", "model"), "b": P("model"), "r": P()}
    shapes = {"w": (64, 32), "b": (32,), "r": (5,)}
    params = {
        k: jax.device_put(rng.normal(size=s).astype(np.float32), NamedSharding(mesh, specs[k]))
        for k, s in shapes.items()
    }
    tx = bj.adamw(1e-3, weight_decay=0.1)

    def make():
        def run(p):
            s = tx.init(p)
            for _ in range(2):
                g = jax.tree.map(jnp.cos, p)
                u, s = tx.update(g, s, p)
                p = optax.apply_updates(p, u)
                p, s = bj.fused_step(tx, g, s, p)
            return p, s

        return run

    compiled = jax.jit(make()).lower(params).compile().as_text()
    assert "all-gather" not in compiled and "all-reduce" not in compiled
    # each device's kernel sees its own shard: w is split 4 x 2
    assert "f32[16,16]" in compiled and any(t in compiled for t in TARGETS)
    got, want = both_paths(make, params)
    # four steps (two-call, fused, twice) of adamw on the gradient cos(p)
    local = {k: np.asarray(v) for k, v in params.items()}
    assert_close(got, want, cos_trajectory_bound(tx, local, 4))
    for k, shape in shapes.items():
        for out in (got[0][k], got[1][0].mu[k], got[1][0].nu[k]):
            assert out.sharding.is_equivalent_to(params[k].sharding, len(shape)), k


@needs_native
def test_shard_map_pmap_vmap_and_grad_agree_with_the_pure_path():
    mesh = jax.make_mesh((8,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))
    tx = bj.adamw(1e-2, weight_decay=0.1)
    p = jnp.arange(8 * 64.0, dtype=jnp.float32).reshape(8, 64) / 100

    def fresh():
        # a new function each time: JAX caches traces per function object
        def body(p, s):
            g = jnp.cos(p)
            u, s = tx.update(g, s, p)
            return bj.fused_step(tx, g, s, optax.apply_updates(p, u))

        return body

    state = tx.init(p)
    sspec = jax.tree.map(lambda x: P("d") if x.ndim else P(), state)
    per_row = jax.vmap(tx.init)(p)
    shared = tx.init(p[0])
    cases = {
        "shard_map": (
            lambda: jax.shard_map(
                fresh(), mesh=mesh, in_specs=(P("d"), sspec), out_specs=(P("d"), sspec)
            ),
            (p, state),
        ),
        "pmap": (
            lambda: jax.pmap(fresh(), axis_name="d"),
            (p.reshape(8, 1, 64), jax.vmap(lambda r: tx.init(r))(p.reshape(8, 1, 64))),
        ),
        "vmap, batched count": (lambda: jax.vmap(fresh()), (p, per_row)),
        "vmap, shared count": (lambda: jax.vmap(lambda q: fresh()(q, shared)), (p,)),
        "grad": (lambda: jax.grad(lambda q: jnp.sum(fresh()(q, state)[0] ** 2)), (p,)),
    }
    # Two steps of adamw on cos(p), elementwise: the bound serves every
    # layout of the same rows (reshaped to each output; step counts exact).
    bound = cos_trajectory_bound(tx, p, 2)
    p_bound = bound[0]

    def fit(bound, like):
        def one(b, g):
            b = np.asarray(b)
            return (
                b.reshape(np.shape(g)) if b.size == np.size(g) else np.broadcast_to(b, np.shape(g))
            )

        return jax.tree.map(one, bound, like)

    for name, (make, args) in cases.items():
        if name != "grad" and name != "pmap":
            assert uses_kernel(make(), *args), name
        got, want = both_paths(make, *args)
        if name == "grad":
            # d/dp Σ p_T² = 2 p_T·∂p_T/∂p: the kernel's derivative is the pure
            # path's, so the two differ through p_T (relative E/|p_T|) plus 20
            # roundings of the derivative itself.
            p_T = np.asarray(jax.jit(fresh())(p, state)[0])
            bound = np.abs(np.asarray(want)) * (p_bound / np.abs(p_T) + 20 * U32)
            assert_close(got, want, bound)
        else:
            assert_close(got, want, fit(bound, got))


@needs_native
def test_other_platforms_lower_without_the_kernel():
    tx = bj.adam(1e-3)
    p = {"w": jnp.ones((4, 3))}
    s = tx.init(p)

    def fresh():
        def step(p, s):
            u, s = tx.update(jax.tree.map(jnp.sin, p), s, p)
            return bj.fused_step(tx, u, s, p)

        return step

    # With an accelerator as default backend both branches are staged and
    # the platform picks one at lowering time.
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):
        traced = jax.jit(fresh()).trace(p, s)
        for platforms, has_kernel in [(("cuda",), False), (("tpu",), False), (("cpu",), True)]:
            text = traced.lower(lowering_platforms=platforms).as_text()
            assert any(t in text for t in TARGETS) == has_kernel, platforms
        got = jax.jit(fresh())(p, s)
    assert bits(got) == bits(jax.jit(fresh())(p, s))


@pytest.mark.parametrize("rule", list(native.RULES))
def test_the_self_test_catches_a_kernel_that_disagrees(rule, monkeypatch):
    # The transcription of one rule computes with its first scalar (b1 or
    # beta) off by one part in 10⁴: the kernel then "disagrees" by far more
    # than the bound, and the self-test must say so.
    if not bj.native_available():
        pytest.skip("native kernels unavailable")
    real = reference_rules.RULES[rule]

    def off_by_a_little(sc, *arrays):
        return real([sc[0] * (1 - 1e-4), *sc[1:]], *arrays)

    monkeypatch.setitem(reference_rules.RULES, rule, off_by_a_little)
    message = native.self_test()
    assert message is not None and "differs" in message and rule in message
    monkeypatch.undo()
    assert native.self_test() is None


@pytest.mark.subprocess
def test_without_a_library_everything_runs_the_pure_path():
    code = textwrap.dedent(
        """
        import jax, jax.numpy as jnp, optax, bayesopt_jax as bj
        from bayesopt_jax._src import native
        tx = bj.adam(1e-3)
        p = {"w": jnp.ones((5,))}
        s = tx.init(p)
        out = jax.jit(lambda p, s: bj.fused_step(tx, jax.tree.map(jnp.sin, p), s, p))(p, s)
        text = jax.jit(lambda p, s: bj.fused_step(tx, p, s, p)).lower(p, s).as_text()
        print(bj.native_available(), native.unavailable_reason(),
              any(t in text for t in native.STEP_TARGETS))
        """
    )
    env = {**os.environ, "BAYESOPT_JAX_NATIVE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "False disabled by BAYESOPT_JAX_NATIVE=0 False"


def test_a_missing_library_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(native.loading, "library_path", lambda: None)
    native._load.cache_clear()
    try:
        assert native._load() == "the native library was not built at install time"
    finally:
        native._load.cache_clear()
        native._load()


def test_build_fails_cleanly_without_a_compiler(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        build.build(tmp_path / "lib.so")


@pytest.mark.subprocess
@pytest.mark.skipif(not HAVE_COMPILER, reason="no C++ compiler")
def test_the_build_script_compiles_the_library(tmp_path):
    out = build.build(tmp_path / build.library_name())
    assert out.exists() and out.stat().st_size > 0


# Every native rule, native against pure, both forms. The bound is counted
# per path against exact arithmetic, in float32 rounding units u of each
# result's terms (the rule's transcription on the magnitudes of its terms,
# transcriptions.magnitudes). A correction 1/(1-b^t) costs 2u either way (the
# kernel multiplies by a rounded reciprocal: 2u; the pure path divides by a
# rounded 1-b^t: 2u).
#   Adam and AMSGrad: m 2u, v 3u, v·r2 6u, the maximum selects one of them,
#   sqrt halves and adds 1u (4u), + eps 5u, m·r1 5u, the division 11u; p = p
#   + factor·u adds 2u: 13u.
#   σ-filter: s 3u, ŝ = s·rs + floor 7u; the filter σ/(1 + ŝσ) + η²: 11u
#   (its condition in ŝ is ≤ 1); σ* = η²/2 + η·sqrt(η²/4 + 1/ŝ): 1/ŝ 8u,
#   the sum 9u, sqrt 5.5u, the product and the sum 7.5u; κσ* 8.5u; the caps
#   select; u = σ·d with d = m·rm (5u): 17u; p adds 2u: 19u.
#   Variational: the σ-filter's, and r = fma(r, γ, (1-γ)·dev²) with dev =
#   g - m·rp: m·rp 2u, dev 3u, dev² 7u, ·(1-γ) 8u, the fma 9u.
# Two paths differ by at most the sum: 2·13 = 26u (Adam, AMSGrad), 2·19 = 38u.
RULE_BOUND = {
    "adam": 26,
    "amsgrad": 26,
    "sigma": 38,
    "sigma_momentum": 38,
    "variational": 38,
    "variational_momentum": 38,
}
# The registry's optimizers with a native rule, and configurations of them
# the registry does not reach: a cap with σ started at a value, a schedule.
KERNEL_OPTIMIZERS = {
    **{name: functools.partial(registry.make, name) for name in registry.with_native()},
    "sigma_filter raw, capped": lambda: bj.sigma_filter(
        1e-2, beta=0.9, sigma_init=1e-3, max_ratio=None, sigma_max=5e-3
    ),
    "sigma_filter schedule": lambda: bj.sigma_filter(optax.linear_schedule(1e-2, 1e-3, 10)),
}
KERNEL_INNER = (*registry.INNER_LOOP, "sigma_filter raw, capped", "sigma_filter schedule")


def random_rule_state(tx, params, rng, count):
    """``tx``'s state at step ``count`` with random buffers: each slot the transformation
    declares signed gets normal values, the others positive ones."""
    state = tx.init(params)
    rule_state = state[0]
    fields = {}
    for slot in contract_of(tx).slots:
        if getattr(rule_state, slot.field) is None:
            continue
        name, signed = slot.field, slot.signed
        scale = 1e-2 if signed else 1e-4
        fields[name] = {
            k: (
                (rng.normal(size=np.shape(p)) if signed else rng.random(size=np.shape(p)) + 0.01)
                * scale
            ).astype(np.float32)
            for k, p in params.items()
        }
    rule_state = rule_state._replace(count=jnp.int32(count), **fields)
    return (rule_state, *state[1:])


def rule_magnitudes(tx, state, params, grads):
    """Each result's terms in float64: the rule's transcription on the magnitudes of its terms."""
    contract = contract_of(tx)
    prepared = contract.prepare(state[0])
    rule, sc = prepared.kernel.rule, [float(x) for x in np.asarray(prepared.kernel.operand)]
    factor = float(np.asarray(engine.description(tx).parts[-1].update(jnp.ones(()), state[-1])[0]))
    present = [s for s in contract.read(state[0]) if s is not None]
    out = {}
    for k in params:
        args = [np.asarray(s[k], np.float64) for s in present]
        g = np.asarray(grads[k], np.float64)
        with np.errstate(all="ignore"):
            mags = reference_rules.magnitudes(rule, sc, g, args)
        p_mag = np.abs(np.asarray(params[k], np.float64)) + abs(factor) * mags[0]
        out[k] = (p_mag, mags[1:])
    return rule, out


@needs_native
@pytest.mark.parametrize("name", registry.slow_except(list(KERNEL_OPTIMIZERS), KERNEL_INNER))
@pytest.mark.parametrize("how", ["two-call", "fused"])
@pytest.mark.parametrize("count", [0, 5])
def test_every_native_rule_agrees_with_the_pure_path(name, how, count, rng):
    params, grads = tree_with_specials(rng, SHAPES)
    tx = KERNEL_OPTIMIZERS[name]()
    state = random_rule_state(tx, params, rng, count)

    def make():
        return make_step(tx, how)

    assert uses_kernel(make(), params, state, grads)
    got, want = both_paths(make, params, state, grads)
    rule, mags = rule_magnitudes(tx, state, params, grads)
    k_units = RULE_BOUND[rule]
    contract = contract_of(tx)
    slots = zip(contract.slots, contract.read(state[0]), strict=True)
    present = [s.field for s, tree in slots if tree is not None]
    for key in params:
        p_mag, state_mags = mags[key]
        assert_paths_agree(got, want, present, key, p_mag, state_mags, k_units)
    assert int(got[1][0].count) == count + 1


@needs_native
def test_the_rule_bound_is_not_vacuous(rng):
    # η off by one part in 10⁴ moves σ by far more than 38 units.
    params, grads = tree_with_specials(rng, SHAPES)
    good_tx, bad_tx = bj.sigma_filter(1e-3), bj.sigma_filter(1e-3 * (1 + 1e-4))
    state = random_rule_state(good_tx, params, rng, 5)
    good = jax.jit(make_step(good_tx, "fused"))(params, state, grads)
    bad = jax.jit(make_step(bad_tx, "fused"))(params, state, grads)
    _, mags = rule_magnitudes(good_tx, state, params, grads)
    sig_mag = mags["big"][1][1]
    a = np.asarray(bad[1][0].sigma["big"], np.float64)
    b = np.asarray(good[1][0].sigma["big"], np.float64)
    finite = np.isfinite(b)
    assert np.any(np.abs(a - b)[finite] > 38 * EPS32 * sig_mag[finite])


def test_fusion_reason_names_the_failing_condition_and_strict_raises_it():
    p = {"w": jnp.linspace(-1.0, 1.0, 8), "b": jnp.zeros(2)}
    g = jax.tree.map(jnp.cos, p)

    def reason(tx, params=p, grads=g):
        return bj.fusion_reason(tx, grads, tx.init(params), params)

    assert "not a chain built by bayesopt_jax" in reason(optax.adam(0.1))
    assert "static tree of booleans" in reason(
        bj.adamw(0.1, mask={"w": jnp.array(True), "b": False})
    )
    half = jax.tree.map(lambda x: x.astype(jnp.bfloat16), p)
    with native.pure_jax():
        assert "not in use" in reason(bj.adam(0.1))
    if not bj.native_available():
        assert "not in use" in reason(bj.adam(0.1))
        return
    assert reason(bj.adam(0.1)) is None and reason(bj.adamw(0.1)) is None
    assert reason(bj.sigma_filter(0.1)) is None and reason(bj.amsgrad(0.1)) is None
    assert "no native kernel" in reason(bj.adam(0.1, nesterov=True))
    assert "no native kernel" in reason(bj.adam(0.1, eps_root=1e-8))
    assert "leaf 0" in reason(bj.adam(0.1), half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), g))
    assert "leaf 0" in reason(bj.adam(0.1, mu_dtype=bj.Blockwise8()))
    tx = bj.adam(0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"strict=True.*no native kernel"):
        bj.fused_step(tx, g, tx.init(p), p, strict=True)
    # strict=True changes nothing when the step fuses.
    tx = bj.adamw(0.1)
    s = tx.init(p)
    a = bj.fused_step(tx, g, s, p, strict=True)
    b = bj.fused_step(tx, g, s, p)
    jax.tree.map(np.testing.assert_array_equal, a, b)


def test_the_library_exports_the_rule_table_the_python_side_declares():
    from bayesopt_jax._src.native import rules

    assert rules.table_mismatch(rules.table()) is None
    for altered in [
        rules.table().replace("adam:2:8", "adam:2:9"),  # a scalar added on one side only
        rules.table() + ";extra:1:1",  # a rule the Python side does not know
        ";".join(rules.table().split(";")[1:]),  # one missing
    ]:
        assert "differs" in rules.table_mismatch(altered)
    # Every rule's scalars class names each scalar once and packs in field order.
    for name, rule in rules.RULES.items():
        values = rule.scalars(*(float(i) for i in range(rule.n_scalars)))
        np.testing.assert_array_equal(np.asarray(rules.pack(values)), np.arange(rule.n_scalars))
        assert rules.unpack(name, rules.pack(values)) == tuple(
            np.float32(i) for i in range(rule.n_scalars)
        )
    if native.library_path() is None or native._load() is not None:
        pytest.skip(f"native library not loaded: {native.unavailable_reason()}")
    exported = native._LIBRARY[0].bj_native_rules().decode()
    assert rules.parse_table(exported) == rules.parse_table(rules.table())
