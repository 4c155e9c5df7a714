"""Data parallel: pmap, shard_map, sharded jit, ZeRO-style state, several processes."""

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import reference as ref
from bounds import U32, U64, check, check_tree, trajectory_bound, tree_rejects
from helpers import abstract_of, mesh_4x2
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from registry import OPTIMIZERS, lr_name, make, names

import bayesopt_jax as bj

NAMES = names()  # the inner loop runs the representatives (registry.INNER_LOOP)
STEPS = 12
ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")


def _problem(rng, n=64, d=6, k=3):
    x = rng.normal(size=(STEPS, n, d))
    y = rng.normal(size=(STEPS, n, k))
    params = {"w": rng.normal(size=(d, k)) * 0.3, "b": np.zeros(k), "s": np.array(0.5)}
    return params, x, y


def _loss(params, x, y):
    pred = jnp.tanh(x @ params["w"] + params["b"]) * params["s"]
    return jnp.mean((pred - y) ** 2)


def _single_device(tx, params, xs, ys):
    @jax.jit
    def step(p, s, x, y):
        u, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    for x, y in zip(xs, ys, strict=True):
        params, state = step(params, state, x, y)
    return params, state


def _replicate(tree, n):
    return jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *jnp.shape(a))), tree)


def _bound(tx, params, xs, ys):
    """Forward error bound of the 12 steps, for parameters and state (``bounds.trajectory_bound``).

    The gradient of the batch mean is a sum of ``n`` per-example gradients,
    added in another order when the batch is split over devices: each order
    is within ``(n - 1)·u·Σ|∇ℓ_i|/n`` of the exact mean, plus 40 roundings of
    one example's gradient at its own magnitude.
    """
    n = xs.shape[1]
    u = U64 if xs.dtype == np.float64 else U32

    def grad(p, batch):
        return jax.grad(_loss)(p, *batch)

    def grad_error(p, batch):
        per_example = jax.vmap(lambda x, y: jax.grad(_loss)(p, x[None], y[None]))(*batch)
        return jax.tree.map(lambda g: (n + 40) * u * jnp.abs(g).mean(0), per_example)

    return trajectory_bound(tx, params, grad, grad_error, list(zip(xs, ys, strict=True)), unit=u)[
        -1
    ]


@functools.cache
def _bound_for(name, d=6, k=3):
    """:func:`_bound` for ``make(name)`` on ``_problem(default_rng(0), d=d, k=k)`` (shared)."""
    with jax.enable_x64(True):
        params, xs, ys = _problem(np.random.default_rng(0), d=d, k=k)
        return _bound(make(name), params, xs, ys)


def _assert_close(got, want, bound, where=""):
    check_tree(got, want, bound, where)


def _lr_times(name, factor):
    key = lr_name(name)
    return {key: OPTIMIZERS[name][1][key] * factor}


@pytest.mark.parametrize("name", NAMES)
def test_pmap_equals_one_device_on_the_concatenated_batch(x64, rng, name):
    params, xs, ys = _problem(rng)
    tx = make(name)
    want, want_state = _single_device(tx, params, xs, ys)

    n = 8
    tx_dp = optax.chain(bj.cross_replica_mean("batch"), tx)

    @functools.partial(jax.pmap, axis_name="batch")
    def step(p, s, x, y):
        u, s = tx_dp.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    p = _replicate(params, n)
    s = jax.pmap(tx_dp.init)(p)
    for x, y in zip(xs, ys, strict=True):
        p, s = step(p, s, x.reshape(n, -1, x.shape[-1]), y.reshape(n, -1, y.shape[-1]))

    # Replicas never diverge: every leaf, parameters and state, bit-identical.
    for leaf in jax.tree.leaves((p, s)):
        leaf = np.asarray(leaf)
        for r in range(1, n):
            np.testing.assert_array_equal(leaf[r], leaf[0])
    p_bound, s_bound = _bound_for(name)
    _assert_close(jax.tree.map(lambda a: a[0], p), want, p_bound, "params")
    _assert_close(jax.tree.map(lambda a: a[0], s[1]), want_state, s_bound, "state")
    # The bound is sharp: a learning rate (η) off by one part in 1e9 is outside it.
    other, _ = _single_device(make(name, **_lr_times(name, 1 + 1e-9)), params, xs, ys)
    assert tree_rejects(other, want, p_bound)


@pytest.mark.parametrize("name", ["adam", "amsgrad", "sigma_filter_momentum"])
def test_shard_map_equals_one_device(x64, rng, name):
    params, xs, ys = _problem(rng)
    tx = make(name)
    want, _ = _single_device(tx, params, xs, ys)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    tx_dp = optax.chain(bj.cross_replica_mean("data"), tx)

    @jax.jit
    @functools.partial(
        jax.shard_map, mesh=mesh, in_specs=(P(), P(), P("data"), P("data")), out_specs=P()
    )
    def step(p, s, x, y):
        # ``p`` is replicated (invariant over "data"); the gradient of a local
        # loss with respect to it would already be summed over devices. Taking
        # it with respect to a device-varying copy gives each device its own
        # gradient, and cross_replica_mean averages them.
        g = jax.grad(_loss)(jax.lax.pcast(p, "data", to="varying"), x, y)
        u, s = tx_dp.update(g, s, p)
        return optax.apply_updates(p, u), s

    p, s = params, tx_dp.init(params)
    for x, y in zip(xs, ys, strict=True):
        p, s = step(p, s, x, y)
    _assert_close(p, want, _bound_for(name)[0])


@pytest.mark.parametrize("name", NAMES)
def test_sharded_jit_data_parallel_equals_one_device(x64, rng, name):
    """Batch split over 8 devices, parameters replicated: XLA inserts the reduction."""
    params, xs, ys = _problem(rng)
    tx = make(name)
    want, want_state = _single_device(tx, params, xs, ys)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
    rep, batch = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    @jax.jit
    def step(p, s, x, y):
        u, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    p = jax.device_put(params, rep)
    s = jax.jit(tx.init)(p)
    for x, y in zip(xs, ys, strict=True):
        p, s = step(p, s, jax.device_put(x, batch), jax.device_put(y, batch))
    p_bound, s_bound = _bound_for(name)
    _assert_close(p, want, p_bound, "params")
    _assert_close(s, want_state, s_bound, "state")
    for leaf in jax.tree.leaves((p, s)):
        assert leaf.sharding.is_fully_replicated


def _sharded_params(mesh):
    specs = {"w": P("data", "model"), "b": P("model"), "s": P(), "v": P(None, "data")}
    values = {
        "w": jnp.linspace(-1, 1, 32, dtype=jnp.float32).reshape(8, 4),
        "b": jnp.arange(4, dtype=jnp.float32),
        "s": jnp.array(0.5, jnp.float32),
        "v": jnp.ones((3, 8), jnp.float32),
    }
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in values.items()}


def _sharded_loss(p):
    return jnp.sum(jnp.sin(p["w"])) + jnp.sum(p["b"] ** 2) + p["s"] ** 2 + jnp.sum(p["v"] ** 3)


def _assert_shardings(state, expected, *, eager=False):
    leaves = jax.tree.leaves(state)
    shards = jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    assert len(leaves) == len(shards)
    for leaf, sharding in zip(leaves, shards, strict=True):
        if eager and sharding.is_fully_replicated and not leaf.committed:
            continue  # an eager scalar (step count) is uncommitted: it goes where it is used
        assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)


@pytest.mark.parametrize("name", NAMES)
def test_state_follows_parameter_sharding(name):
    mesh = mesh_4x2()
    params = _sharded_params(mesh)
    tx = make(name)
    abstract = abstract_of(params)
    expected = bj.state_shardings(tx, abstract)
    # Every parameter-shaped state leaf takes the sharding of its parameter.
    _assert_shardings(tx.init(params), expected, eager=True)
    _assert_shardings(jax.jit(tx.init)(params), expected)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(_sharded_loss)(p), s, p)
        return optax.apply_updates(p, u), s

    p, s = params, jax.jit(tx.init)(params)
    for _ in range(3):
        p, s = step(p, s)
        _assert_shardings(s, expected)
        for k in params:
            assert p[k].sharding.is_equivalent_to(params[k].sharding, p[k].ndim)


def test_full_matrix_state_is_replicated_on_request():
    """The full-matrix filter's matrices mirror no parameter: replicated over the mesh."""
    mesh = mesh_4x2()
    params = _sharded_params(mesh)
    tx = bj.scale_by_sigma_filter_full(1e-2)
    expected = bj.state_shardings(tx, params)
    for leaf in jax.tree.leaves(expected, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)):
        assert leaf.is_fully_replicated and leaf.mesh == mesh
    state = jax.jit(tx.init, out_shardings=expected)(params)
    u, state = jax.jit(tx.update, out_shardings=(None, expected))(
        jax.grad(_sharded_loss)(params), state
    )
    _assert_shardings(state, expected)
    want_u, _ = tx.update(
        *jax.tree.map(np.asarray, (jax.grad(_sharded_loss)(params), tx.init(params)))
    )
    # Both within the float32 rounding bound of the full-matrix recursion.
    from jax.flatten_util import ravel_pytree

    g = np.asarray(
        ravel_pytree(jax.tree.map(np.asarray, jax.grad(_sharded_loss)(params)))[0], np.float64
    )
    want, _ = ref.sigma_filter_full([g], 1e-2, 0.999, 1.0, unit=U32)
    check(np.asarray(ravel_pytree(jax.tree.map(np.asarray, u))[0]), want[0], "sharded")
    check(np.asarray(ravel_pytree(want_u)[0]), want[0], "unsharded")


def test_state_shardings_names_the_unsharded_leaf():
    with pytest.raises(ValueError, match=r"\['b'\]"):
        bj.state_shardings(bj.adam(1e-3), {"a": jnp.ones(2), "b": np.ones(2)})


def test_split_over_is_checked_and_leaves_keys_replicated():
    mesh = mesh_4x2()
    rep = {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=NamedSharding(mesh, P()))}
    with pytest.raises(ValueError, match="`split_over`='rows'"):
        bj.state_shardings(bj.adam(1e-3), rep, split_over="rows")
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with pytest.raises(ValueError, match=r"`split_over`='data'.*NamedSharding"):
        bj.state_shardings(
            bj.adam(1e-3),
            {"w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=one)},
            split_over="data",
        )
    # The variational filter's 2-word key and its counters mirror no
    # parameter: they stay replicated, although "model" (2) divides the key.
    tx = bj.variational_sigma_filter(1e-2, num_data=100, batch_size=10)
    state = bj.state_shardings(tx, rep, split_over="model")[0]
    assert state.key.is_fully_replicated and state.count.is_fully_replicated
    assert state.mu["w"].is_equivalent_to(NamedSharding(mesh, P("model")), 2)
    # A tuple of axes splits over all of them at once (8 devices, 8 rows).
    state = bj.state_shardings(tx, rep, split_over=("data", "model"))[0]
    for buffer in (state.mu, state.nu, state.sigma):
        assert buffer["w"].is_equivalent_to(NamedSharding(mesh, P(("data", "model"))), 2)


@pytest.mark.parametrize("name", ["adam", "amsgrad", "sigma_filter_momentum", "rmsprop"])
def test_zero_style_state_sharded_over_data_axis(x64, rng, name):
    """Parameters sharded over ``model`` only, state split over ``data`` as well."""
    params, xs, ys = _problem(rng, d=8, k=4)
    tx = make(name)
    want, want_state = _single_device(tx, params, xs, ys)

    mesh = mesh_4x2()
    param_specs = {"w": P(None, "model"), "b": P("model"), "s": P()}
    p_shard = {k: NamedSharding(mesh, v) for k, v in param_specs.items()}
    p = {k: jax.device_put(v, p_shard[k]) for k, v in params.items()}
    abstract_p = abstract_of(p)
    s_shard = bj.state_shardings(tx, abstract_p, split_over="data")
    # ZeRO layout: w's state rows split over "data" (8 / 4); b is already
    # sharded along its one axis and s is a scalar, so they keep their
    # parameter's sharding; counters stay replicated.
    want_specs = {"w": P("data", "model"), "b": P("model"), "s": P()}
    mirrors = optax.tree_map_params(
        tx,
        lambda _: True,
        jax.eval_shape(tx.init, abstract_p),
        transform_non_params=lambda _: False,
    )
    flat = jax.tree.leaves(s_shard, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    paths = [jax.tree_util.keystr(k) for k, _ in jax.tree_util.tree_leaves_with_path(mirrors)]
    for path, mirror, sharding in zip(paths, jax.tree.leaves(mirrors), flat, strict=True):
        want_spec = want_specs[path.split("'")[1]] if mirror else P()
        assert sharding.is_equivalent_to(NamedSharding(mesh, want_spec), 2), (path, sharding)
    batch = NamedSharding(mesh, P("data"))

    @functools.partial(jax.jit, out_shardings=(p_shard, s_shard), donate_argnums=(0, 1))
    def step(p, s, x, y):
        u, s = tx.update(jax.grad(_loss)(p, x, y), s, p)
        return optax.apply_updates(p, u), s

    s = jax.jit(tx.init, out_shardings=s_shard)(p)
    assert any("data" in leaf.sharding.spec for leaf in jax.tree.leaves(s) if leaf.ndim), (
        "the ZeRO layout should split some buffer over data"
    )
    for x, y in zip(xs, ys, strict=True):
        p, s = step(p, s, jax.device_put(x, batch), jax.device_put(y, batch))
    _assert_shardings(s, s_shard)
    p_bound, s_bound = _bound_for(name, d=8, k=4)
    _assert_close(p, want, p_bound, "params")
    _assert_close(s, want_state, s_bound, "state")


def test_posterior_samples_do_not_depend_on_sharding():
    mesh = mesh_4x2()
    params = _sharded_params(mesh)
    tx = bj.sigma_filter(1e-2, b1=0.9)
    state = tx.init(params)
    for _ in range(3):
        _, state = tx.update(jax.grad(_sharded_loss)(params), state, params)
    key = jax.random.key(0)
    sharded = jax.jit(bj.sample_posterior, static_argnums=3)(key, params, state, 2)
    local = jax.tree.map(lambda a: jnp.asarray(np.asarray(a)), (params, state))
    plain = jax.jit(bj.sample_posterior, static_argnums=3)(key, *local, 2)
    for a, b in zip(jax.tree.leaves(sharded), jax.tree.leaves(plain), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    var = bj.posterior_variance(state)
    for k in params:
        assert var[k].sharding.is_equivalent_to(params[k].sharding, params[k].ndim)


def _example():
    """examples/data_parallel.py as a module (its data, model and loss)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "data_parallel", ROOT / "examples" / "data_parallel.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run_example(tmp_path, *args):
    cmd = [
        sys.executable,
        str(ROOT / "examples" / "data_parallel.py"),
        "--processes", "2",
        "--devices-per-process", "2",
        "--timeout", "240",
        "--out", str(tmp_path),
        *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


STEPS_X64, HIDDEN_X64 = 12, 4


@pytest.mark.multiprocess
def test_two_processes_match_one_process(tmp_path):
    """A real 2-process JAX cluster (gloo on loopback), every optimizer, float64."""
    pytest.importorskip("sklearn")
    _run_example(tmp_path, "--steps", str(STEPS_X64), "--hidden", str(HIDDEN_X64), "--x64")
    names = json.loads((tmp_path / "results.json").read_text())
    assert len(names) == 8
    ex = _example()
    with jax.enable_x64(True):
        x_all, y_all = ex.load_data(np.float64)
        order = ex.batch_indices(0, STEPS_X64, 64, len(x_all))
        batches = [(x_all[i], y_all[i]) for i in order]
        params = ex.init_params(jax.random.key(0), HIDDEN_X64, np.float64)

        def grad(p, batch):
            return jax.grad(ex.loss_fn)(p, *batch)

        def grad_error(p, batch):
            # 64 per-example gradients summed in another order, plus 40
            # roundings of one example's gradient (see _bound).
            per = jax.vmap(lambda x, y: jax.grad(ex.loss_fn)(p, x[None], y[None]))(*batch)
            return jax.tree.map(lambda g: (64 + 40) * U64 * jnp.abs(g).mean(0), per)

        for name in names:
            single = np.load(tmp_path / f"{name}_single_p0.npz")
            p0 = np.load(tmp_path / f"{name}_cluster_p0.npz")
            p1 = np.load(tmp_path / f"{name}_cluster_p1.npz")
            for k in single.files:
                np.testing.assert_array_equal(p0[k], p1[k], err_msg=f"{name} {k}")
            tx = ex.make_optimizer(name, 3e-3)
            bound = trajectory_bound(tx, params, grad, grad_error, batches)[-1][0]
            check_tree(dict(p0), dict(single), bound, name)
            # The run trained: the parameters moved by more than the bound.
            assert tree_rejects(dict(p0), jax.tree.map(np.asarray, params), bound)


@pytest.mark.parametrize("parallel", ["jit", "pmap"])
@pytest.mark.multiprocess
def test_two_processes_float32_bit_identical_with_native_kernels(tmp_path, parallel):
    """float32, the native kernels where built: every process holds the same bits."""
    pytest.importorskip("sklearn")
    names = ["adam", "adamw", "sigma_filter", "amsgrad"]
    _run_example(
        tmp_path, "--steps", "8", "--hidden", "16", "--parallel", parallel, "--no-reference",
        "--optimizers", *names,
    )  # fmt: skip
    native = [json.loads((tmp_path / f"native_cluster_p{i}.json").read_text()) for i in (0, 1)]
    assert native[0] == native[1], native
    assert native[0]["available"] == bj.native_available(), native
    init = _example().init_params(jax.random.key(0), 16, np.float32)
    for name in names:
        p0 = np.load(tmp_path / f"{name}_cluster_p0.npz")
        p1 = np.load(tmp_path / f"{name}_cluster_p1.npz")
        for k in p0.files:
            assert p0[k].dtype == np.float32
            assert p0[k].tobytes() == p1[k].tobytes(), f"{parallel} {name} {k}: processes differ"
        assert any(not np.array_equal(p0[k], np.asarray(init[k])) for k in p0.files)
