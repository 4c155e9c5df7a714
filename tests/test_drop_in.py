"""Every name we share with Optax is a drop-in for Optax's.

Same parameters in the same order with the same defaults (what we add is
keyword-only), the same state: Optax's classes, structure, shapes and dtypes,
so ``optax.tree.get``/``set``, ``inject_hyperparams`` and checkpoints written
by Optax work unchanged; ``init`` accepts what Optax's accepts (abstract
``ShapeDtypeStruct`` inputs, integer leaves).
"""

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import bayesopt_jax as bj

SHARED = [
    "adam",
    "adamw",
    "amsgrad",
    "adamax",
    "adagrad",
    "rmsprop",
    "scale_by_adam",
    "scale_by_amsgrad",
    "scale_by_adamax",
    "scale_by_rms",
    "scale_by_rss",
]


@pytest.mark.parametrize("name", SHARED)
def test_signature_is_optax_then_keyword_only_additions(name):
    theirs = list(inspect.signature(getattr(optax, name)).parameters.values())
    ours = list(inspect.signature(getattr(bj, name)).parameters.values())
    assert [p.name for p in ours[: len(theirs)]] == [p.name for p in theirs]
    for a, b in zip(ours, theirs, strict=False):
        assert a.kind == b.kind, (name, a.name)
        assert a.default == b.default, (name, a.name, a.default, b.default)
    for extra in ours[len(theirs) :]:
        assert extra.kind == inspect.Parameter.KEYWORD_ONLY, (name, extra.name)


def _params():
    return {
        "w": jnp.ones((3, 2), jnp.float32),
        "b": jnp.zeros((2,), jnp.bfloat16),
        "nested": [jnp.full((4,), 2.0, jnp.float32), jnp.ones((), jnp.float32)],
    }


# (name, positional arguments, keyword arguments), used for both libraries.
CONFIGS = [
    ("adam", (1e-2,), {}),
    ("adam", (1e-2, 0.9, 0.99, 1e-8, 0.0, jnp.bfloat16), {"nesterov": True}),
    ("adamw", (1e-2,), {}),
    ("adamw", (1e-2,), {"weight_decay": optax.linear_schedule(1e-2, 0.0, 10)}),
    ("adamw", (1e-2,), {"mask": {"w": True, "b": False, "nested": [True, False]}}),
    ("amsgrad", (1e-2,), {}),
    ("amsgrad", (1e-2,), {"bias_correction_mu": False, "bias_correction_nu": False}),
    ("adamax", (2e-3,), {}),
    ("adagrad", (1e-2,), {}),
    ("rmsprop", (1e-2,), {}),
    ("rmsprop", (1e-2,), {"momentum": 0.9, "nesterov": True}),
    ("rmsprop", (1e-2,), {"centered": True}),
    ("rmsprop", (1e-2,), {"centered": True, "bias_correction": True, "momentum": 0.0}),
    ("rmsprop", (1e-2,), {"bias_correction": True, "initial_scale": 0.5}),
    ("scale_by_adam", (), {}),
    ("scale_by_amsgrad", (), {}),
    ("scale_by_adamax", (), {}),
    ("scale_by_rms", (), {}),
    ("scale_by_rms", (), {"bias_correction": True}),
    ("scale_by_rss", (), {}),
]
IDS = [f"{n}-{i}" for i, (n, _, _) in enumerate(CONFIGS)]


def _same_state(ours, theirs):
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)
    # Same classes all the way down (tree structure compares node types too,
    # this also names the first offending one).
    kinds = [type(x) for x in jax.tree.leaves(ours, is_leaf=lambda x: x is not ours)]
    assert kinds == [type(x) for x in jax.tree.leaves(theirs, is_leaf=lambda x: x is not theirs)]
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
        assert a.shape == b.shape
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


@pytest.mark.parametrize("name,args,kwargs", CONFIGS, ids=IDS)
def test_state_is_optaxs(name, args, kwargs):
    params = _params()
    ours = getattr(bj, name)(*args, **kwargs)
    theirs = getattr(optax, name)(*args, **kwargs)
    _same_state(ours.init(params), theirs.init(params))
    # ... and it stays Optax's after a step (with Optax's gradient arguments).
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, s_ours = ours.update(grads, ours.init(params), params)
    _, s_theirs = theirs.update(grads, theirs.init(params), params)
    assert jax.tree.structure(s_ours) == jax.tree.structure(s_theirs)


@pytest.mark.parametrize("name,args,kwargs", CONFIGS, ids=IDS)
def test_state_made_by_optax_is_accepted(name, args, kwargs):
    """An Optax state (say, from an Optax checkpoint) drives our update, and vice versa."""
    params = _params()
    ours = getattr(bj, name)(*args, **kwargs)
    theirs = getattr(optax, name)(*args, **kwargs)
    grads = jax.tree.map(lambda p: jnp.full_like(p, -0.25), params)
    u1, s1 = ours.update(grads, theirs.init(params), params)
    u2, s2 = ours.update(grads, ours.init(params), params)
    for a, b in zip(jax.tree.leaves((u1, s1)), jax.tree.leaves((u2, s2)), strict=True):
        np.testing.assert_array_equal(np.asarray(a, np.float64), np.asarray(b, np.float64))


@pytest.mark.parametrize("name,args,kwargs", CONFIGS, ids=IDS)
def test_init_on_shape_dtype_structs(name, args, kwargs):
    """Abstract inputs give the state that concrete ones give, eagerly and under jit."""
    params = _params()
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype), params)
    tx = getattr(bj, name)(*args, **kwargs)
    concrete = tx.init(params)
    _same_state(tx.init(abstract), concrete)
    shapes = jax.eval_shape(tx.init, abstract)
    for a, b in zip(jax.tree.leaves(shapes), jax.tree.leaves(concrete), strict=True):
        assert (a.shape, a.dtype) == (b.shape, b.dtype)


@pytest.mark.parametrize("name", ["adam", "adamw", "amsgrad", "adamax", "adagrad", "rmsprop"])
def test_integer_leaves_are_initialised_as_optax_does(name):
    params = {"a": 1, "b": jnp.arange(3), "c": jnp.ones(2)}
    ours = getattr(bj, name)(1e-2).init(params)
    theirs = getattr(optax, name)(1e-2).init(params)
    _same_state(ours, theirs)


def test_optax_tree_set_and_inject_hyperparams_see_optax_states():
    params = _params()
    state = bj.adam(1e-2).init(params)
    theirs = optax.adam(1e-2).init(params)
    new = optax.tree.set(state, count=jnp.asarray(7, jnp.int32))
    assert int(optax.tree.get(new, "count")) == 7
    assert jax.tree.structure(new) == jax.tree.structure(theirs)
    for name, kwargs in [("rmsprop", {}), ("adamw", {}), ("amsgrad", {})]:
        injected = optax.inject_hyperparams(getattr(bj, name))(learning_rate=1e-2, **kwargs)
        plain = getattr(bj, name)(1e-2, **kwargs)
        assert jax.tree.structure(injected.init(params).inner_state) == jax.tree.structure(
            plain.init(params)
        )


def test_adamw_default_decay_is_optaxs_and_torchs_is_one_keyword_away():
    params = jnp.ones(2)
    zero = jnp.zeros(2)
    u, _ = bj.adamw(1.0).update(zero, bj.adamw(1.0).init(params), params)
    np.testing.assert_allclose(u, -1e-4 * params, rtol=1e-6)
    u, _ = bj.adamw(1.0, weight_decay=1e-2).update(zero, bj.adamw(1.0).init(params), params)
    np.testing.assert_allclose(u, -1e-2 * params, rtol=1e-6)
