"""Checkpoints: a resumed run is bit-identical to an uninterrupted one (npz and Orbax)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import abstract_of, mesh_4x2
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from registry import make, names

import bayesopt_jax as bj

NAMES = names()  # the inner loop runs the representatives (registry.INNER_LOOP)


def _params(dtype=jnp.float32):
    return {
        "w": jnp.linspace(-1.0, 1.0, 32, dtype=dtype).reshape(8, 4),
        "b": jnp.arange(4, dtype=dtype) / 4,
        "s": jnp.array(0.5, dtype),
    }


def _loss(p):
    return (
        jnp.sum(jnp.sin(3 * p["w"].astype(jnp.float32)))
        + jnp.sum(p["b"].astype(jnp.float32) ** 2)
        + p["s"].astype(jnp.float32) ** 4
    )


def _runner(tx):
    @jax.jit
    def step(p, s):
        g = jax.grad(_loss)(p)
        u, s = tx.update(jax.tree.map(lambda a, b: a.astype(b.dtype), g, p), s, p)
        return optax.apply_updates(p, u), s

    def run(p, s, n):
        for _ in range(n):
            p, s = step(p, s)
        return p, s

    return run


def _assert_bit_identical(a, b):
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(la, lb, strict=True):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("name", NAMES)
def test_npz_resume_is_bit_identical(tmp_path, name, dtype):
    tx = make(name)
    params = _params(dtype)
    run = _runner(tx)
    p, s = run(params, tx.init(params), 4)
    bj.save_npz(tmp_path / "params.npz", p)
    bj.save_npz(tmp_path / "state.npz", s)
    p_back = bj.load_npz(tmp_path / "params.npz", params)
    s_back = bj.load_npz(tmp_path / "state.npz", tx.init(params))
    _assert_bit_identical(s_back, s)
    resumed = run(p_back, s_back, 4)
    straight = run(params, tx.init(params), 8)
    _assert_bit_identical(resumed, straight)


def test_npz_names_what_differs(tmp_path):
    tx = bj.adam(1e-3)
    bj.save_npz(tmp_path / "s.npz", tx.init(_params()))
    with pytest.raises(ValueError, match=r"\['extra'\]"):
        bj.load_npz(tmp_path / "s.npz", tx.init({**_params(), "extra": jnp.ones(2)}))
    with pytest.raises(ValueError, match="bfloat16"):
        bj.load_npz(tmp_path / "s.npz", tx.init(_params(jnp.bfloat16)))
    with np.load(tmp_path / "s.npz", allow_pickle=False) as data:  # no pickled objects inside
        assert all(data[k].dtype != object for k in data.files)


def _sharded_params():
    mesh = mesh_4x2()
    specs = {"w": P("data", "model"), "b": P("model"), "s": P()}
    return {k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in _params().items()}


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (simulated) devices")
@pytest.mark.parametrize("name", NAMES)
def test_sharded_npz_resume_restores_shardings(tmp_path, name):
    tx = make(name)
    params = _sharded_params()
    run = _runner(tx)
    p, s = run(params, jax.jit(tx.init)(params), 3)
    bj.save_npz(tmp_path / "p.npz", p)
    bj.save_npz(tmp_path / "s.npz", s)
    abstract = abstract_of(params)
    shardings = bj.state_shardings(tx, abstract)
    target = jax.tree.map(
        lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
        jax.eval_shape(tx.init, abstract),
        shardings,
    )
    p_back = bj.load_npz(tmp_path / "p.npz", abstract)
    s_back = bj.load_npz(tmp_path / "s.npz", target)
    for leaf, sh in zip(
        jax.tree.leaves(s_back),
        jax.tree.leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding)),
        strict=True,
    ):
        assert leaf.sharding.is_equivalent_to(sh, leaf.ndim)
    _assert_bit_identical(run(p_back, s_back, 3), run(p, s, 3))


def _orbax():
    return pytest.importorskip("orbax.checkpoint")


@pytest.mark.parametrize("name", NAMES)
def test_orbax_resume_is_bit_identical(tmp_path, name):
    ocp = _orbax()
    tx = make(name)
    params = _sharded_params() if jax.device_count() >= 8 else _params()
    run = _runner(tx)
    p, s = run(params, jax.jit(tx.init)(params), 3)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
        ckpt.wait_until_finished()
        abstract = abstract_of(params)
        target = {
            "params": abstract,
            "opt_state": jax.tree.map(
                lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                jax.eval_shape(tx.init, abstract),
                bj.state_shardings(tx, abstract),
            ),
        }
        back = ckpt.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(back["opt_state"]) == jax.tree.structure(s)
    _assert_bit_identical(back["opt_state"], s)
    _assert_bit_identical(run(back["params"], back["opt_state"], 3), run(p, s, 3))
