"""Flax integration: nnx.Optimizer and TrainState, unchanged, for every optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from bounds import U32, check_tree, trajectory_bound
from registry import OPTIMIZERS, make, names

import bayesopt_jax as bj

nnx = pytest.importorskip("flax.nnx")
train_state = pytest.importorskip("flax.training.train_state")

NAMES = names()  # the inner loop runs the representatives (registry.INNER_LOOP)


def _data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(128, 6)).astype(np.float32)
    w = rng.normal(size=(6, 3)).astype(np.float32)
    y = np.argmax(x @ w + 0.1 * rng.normal(size=(128, 3)), axis=-1)
    return jnp.asarray(x), jnp.asarray(y)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(6, 16, rngs=rngs)
        self.l2 = nnx.Linear(16, 3, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.tanh(self.l1(x)))


def _nnx_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()


def _train_nnx(tx, steps=60):
    x, y = _data()
    model = MLP(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(steps)]
    return losses, model, optimizer


@pytest.mark.parametrize("name", NAMES)
def test_nnx_optimizer_trains(name):
    losses, _, optimizer = _train_nnx(make(name, **_lr_kwargs(name)))
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert int(optimizer.step[...]) == 60


def _lr(name):
    return "learning_rate" if "learning_rate" in OPTIMIZERS[name][1] else "eta"


def _lr_kwargs(name):
    # variational_newton's learning rate is a fraction of a Newton step (1: a whole one)
    return {_lr(name): 1.0 if name == "variational_newton" else 3e-2}


@pytest.mark.parametrize("name", NAMES)
def test_train_state_trains(name):
    x, y = _data()
    model = MLP(nnx.Rngs(0))
    graphdef, params = nnx.split(model, nnx.Param)

    def apply_fn(p, x):
        return nnx.merge(graphdef, p)(x)

    state = train_state.TrainState.create(
        apply_fn=apply_fn, params=params, tx=make(name, **_lr_kwargs(name))
    )

    @jax.jit
    def step(state):
        def loss_fn(p):
            logits = state.apply_fn(p, x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return state.apply_gradients(grads=grads), loss

    losses = []
    for _ in range(60):
        state, loss = step(state)
        losses.append(float(loss))
    assert losses[-1] < 0.7 * losses[0], losses[::10]
    assert int(state.step) == 60


def test_extra_args_reach_the_chain_through_nnx_optimizer():
    """reduce_on_plateau needs ``value=``; nnx.Optimizer.update forwards it."""
    x, y = _data()
    model = MLP(nnx.Rngs(0))
    tx = optax.chain(bj.adam(1e-2), optax.contrib.reduce_on_plateau(patience=2, factor=0.5))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, value):
        grads = nnx.grad(_nnx_loss)(model, x, y)
        optimizer.update(model, grads, value=value)

    for _ in range(8):  # a loss that never improves
        step(model, optimizer, jnp.asarray(1.0))
    scale = float(optax.tree.get(nnx.to_pure_dict(nnx.state(optimizer, nnx.OptState)), "scale"))
    assert scale < 1.0


def test_sigma_filter_posterior_from_an_nnx_optimizer():
    """posterior_variance and sample_posterior read the state an nnx.Optimizer holds."""
    losses, model, optimizer = _train_nnx(bj.sigma_filter(3e-2, b1=0.9))
    assert losses[-1] < losses[0]

    # nnx keeps the optax state's structure with its arrays inside Variables.
    def unwrap(tree):
        return jax.tree.map(
            lambda v: v.get_value(), tree, is_leaf=lambda x: isinstance(x, nnx.Variable)
        )

    opt_state = unwrap(optimizer.opt_state)
    params = unwrap(nnx.state(model, nnx.Param))
    var = bj.posterior_variance(opt_state)
    assert jax.tree.structure(var) == jax.tree.structure(params)
    for v in jax.tree.leaves(var):
        assert bool(jnp.all(v > 0))
    draws = bj.sample_posterior(jax.random.key(0), params, opt_state, 3, scale=1e-3)
    for d, p in zip(jax.tree.leaves(draws), jax.tree.leaves(params), strict=True):
        assert d.shape == (3, *p.shape)


def _mlp_params():
    """The MLP's initial parameters as a plain dict (nnx.Linear: x @ kernel + bias)."""
    model = MLP(nnx.Rngs(0))
    return {
        layer: {
            "bias": jnp.asarray(getattr(model, layer).bias[...]),
            "kernel": jnp.asarray(getattr(model, layer).kernel[...]),
        }
        for layer in ("l1", "l2")
    }


def _as_dict(state):
    leaves = [jnp.asarray(v) for v in jax.tree.leaves(state)]
    return {
        "l1": {"bias": leaves[0], "kernel": leaves[1]},
        "l2": {"bias": leaves[2], "kernel": leaves[3]},
    }


def _mlp_loss(p, x, y):
    h = jnp.tanh(x @ p["l1"]["kernel"] + p["l1"]["bias"])
    logits = h @ p["l2"]["kernel"] + p["l2"]["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def _mlp_bounds(tx, x, y, steps):
    """bounds.trajectory_bound of full-batch training of the MLP in float32."""
    n = x.shape[0]

    def grad(p, _):
        return jax.grad(_mlp_loss)(p, x, y)

    def grad_error(p, _):
        # the mean of n per-example gradients in any order, plus 40 roundings of each
        per = jax.vmap(lambda a, b: jax.grad(_mlp_loss)(p, a[None], b[None]))(x, y)
        return jax.tree.map(lambda g: (n + 40) * U32 * jnp.abs(g).mean(0), per)

    return trajectory_bound(tx, _mlp_params(), grad, grad_error, [None] * steps, unit=U32)


@pytest.mark.slow  # a training loop
def test_fused_optimizer_follows_nnx_optimizer():
    from bayesopt_jax._src import native
    from bayesopt_jax.nnx import FusedOptimizer

    x, y = _data()

    def train(optimizer_cls, tx, steps=40):
        model = MLP(nnx.Rngs(0))
        optimizer = optimizer_cls(model, tx, wrt=nnx.Param)
        graphdef, state = nnx.split((model, optimizer))

        def step(state):
            model, optimizer = nnx.merge(graphdef, state)
            loss, grads = nnx.value_and_grad(_nnx_loss)(model, x, y)
            optimizer.update(model, grads)
            return nnx.state((model, optimizer)), loss

        jitted = jax.jit(step)
        text = jitted.lower(state).as_text()
        losses = []
        for _ in range(steps):
            state, loss = jitted(state)
            losses.append(float(loss))
        model, optimizer = nnx.merge(graphdef, state)
        return losses, nnx.state(model, nnx.Param), int(optimizer.step[...]), text

    cases = [
        (lambda: bj.adamw(1e-2, weight_decay=1e-2), bj.native_available()),  # one native call
        (lambda: bj.amsgrad(1e-2), bj.native_available()),  # one native call
    ]
    for tx_factory, expect_kernel in cases:
        fused = train(FusedOptimizer, tx_factory())
        plain = train(nnx.Optimizer, tx_factory())
        assert fused[2] == plain[2] == 40
        assert fused[0][-1] < 0.7 * fused[0][0]
        # Both within the forward error bound of the same 40 float32 steps.
        bounds = _mlp_bounds(tx_factory(), x, y, 40)
        leaves = lambda t: [np.asarray(v) for v in jax.tree.leaves(t)]  # noqa: E731
        check_tree(leaves(fused[1]), leaves(plain[1]), leaves(bounds[-1][0]))
        assert any(t in fused[3] for t in native.STEP_TARGETS) == expect_kernel
        assert not any(t in plain[3] for t in native.STEP_TARGETS)
