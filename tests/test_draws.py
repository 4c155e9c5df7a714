"""Counter-based Gaussian draws: exact bits against a NumPy transcription, the Gaussian
transform against SciPy's erf⁻¹ within its error bound, the statistics, and independence
from every layout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

import bayesopt_jax as bj
from bayesopt_jax._src import draws, posterior, variational
from bayesopt_jax._src.native import transcriptions


def _words(seed: int) -> jnp.ndarray:
    return draws.step_words(jax.random.key_data(jax.random.key(seed)), jnp.int32(seed), 4)[1]


@pytest.mark.parametrize("shape", [(), (1,), (7,), (3, 5, 2), (1000,)])
@pytest.mark.parametrize("seed", [0, 1, 12345])
def test_uniform_is_the_integer_transcription_bit_for_bit(shape, seed):
    words = _words(seed)
    u = draws.uniform_pm1(draws.bits(words, shape), np.float32)
    ref = draws.uniform_reference(np.asarray(words), shape)
    # Integer arithmetic and one exact float32 expression: identical on every host.
    np.testing.assert_array_equal(np.asarray(u, np.float64), ref)
    assert np.all(np.abs(ref) < 1)


def test_uniform_cells_are_symmetric_and_never_the_ends():
    k = np.array([0, 1, 2**22 - 1, 2**22, 2**23 - 1], np.uint32) << 9
    u = np.asarray(draws.uniform_pm1(jnp.asarray(k), np.float32), np.float64)
    expect = (2 * (k >> 9).astype(np.float64) + 1) * 2.0**-23 - 1
    np.testing.assert_array_equal(u, expect)
    assert u[0] == -u[-1] and u[2] == -u[3] and u[0] > -1 and u[-1] < 1


def test_gaussian_transform_within_the_bound_of_erfinv():
    """ε = √2 erf⁻¹(u) against SciPy in float64 over 2**20 cells spread over (−1, 1).

    Bound: XLA's float32 erf⁻¹ is Giles' polynomial approximation (relative
    error below 4e-7 on exact input), evaluated through w = −log((1−u)(1+u))
    whose float32 rounding (≤ 4 roundings, relative 4u each) is amplified by
    the condition number κ(u) = u·(erf⁻¹)'(u)/erf⁻¹(u); the product by √2
    adds 2 roundings. So |Δε|/|ε| ≤ 4e-7 + 8u(1 + κ).
    """
    k = np.unique(np.concatenate([np.arange(0, 2**23, 8), np.arange(2**23 - 64, 2**23)]))
    u = (2 * k + 1) * 2.0**-23 - 1
    eps = np.asarray(draws.normal_from_uniform(jnp.asarray(u, jnp.float32)), np.float64)
    ref = math.sqrt(2) * special.erfinv(u)
    # 4e-7 + 8u(1 + κ(u)), κ = u·(erf⁻¹)'(u)/erf⁻¹(u) (the native draw is held to the same)
    bound = transcriptions.erfinv_bound(u) * np.abs(ref)
    assert np.all(np.abs(eps - ref) <= bound)
    # The bound rejects a transform that forgets the √2 or takes Φ⁻¹ of the wrong argument.
    assert not np.all(np.abs(ref / math.sqrt(2) - ref) <= bound)
    assert not np.all(np.abs(stats.norm.ppf(np.abs(u)) * np.sign(u) - ref) <= bound)


def test_draws_are_standard_normal_and_independent():
    n = 2**20
    a = np.asarray(draws.normal(_words(0), (n,)), np.float64)
    b = np.asarray(draws.normal(_words(1), (n,)), np.float64)
    # Kolmogorov–Smirnov at the 0.1 % level: D ≤ 1.95/√n.
    assert stats.kstest(a, "norm").statistic < 1.95 / math.sqrt(n)
    se = 1 / math.sqrt(n)  # standard error of a mean or a correlation of n pairs
    assert abs(a.mean()) < 4 * se and abs(a.var() - 1) < 4 * math.sqrt(2) * se
    # Another key, the neighbouring entry, and the next step: uncorrelated within 4 SE.
    assert abs(np.corrcoef(a, b)[0, 1]) < 4 * se
    assert abs(np.corrcoef(a[:-1], a[1:])[0, 1]) < 4 * se
    # A random key's words for consecutive steps (what a training run sees)
    key = jax.random.key_data(jax.random.key(7))
    w = [draws.step_words(key, jnp.int32(t), 2)[0] for t in (5, 6)]
    s5, s6 = (np.asarray(draws.normal(x, (n,)), np.float64) for x in w)
    assert abs(np.corrcoef(s5, s6)[0, 1]) < 4 * se
    # 4-sigma events at the Gaussian rate (3.2 per 50 000 per tail-pair): the tails are not cut.
    tail = np.mean(np.abs(a) > 4)
    assert 0.5 * 6.3e-5 < tail < 2 * 6.3e-5


def test_rows_of_2_32_entries_or_more_are_refused():
    with pytest.raises(ValueError, match="rows"):
        jax.eval_shape(lambda w: draws.normal(w, (2, 2**32)), _words(0))
    # A leaf of ≥ 2**32 entries in rows below 2**32 is accepted (traced only).
    out = jax.eval_shape(lambda w: draws.normal(w, (3, 2**31)), _words(0))
    assert out.shape == (3, 2**31)


def test_variational_noise_is_a_function_of_key_step_and_position():
    params = {"a": jnp.zeros((6, 4)), "b": jnp.zeros((5,))}
    tx = bj.variational_sigma_filter(num_data=100, batch_size=10, key=3)
    vs = posterior._one_state(tx.init(params), "test")
    noise = variational.noise_tree(vs)
    words = draws.step_words(vs.key, vs.count, 2)
    for i, name in enumerate(["a", "b"]):
        ref = draws.uniform_reference(np.asarray(words[i]), params[name].shape)
        got = np.asarray(draws.uniform_pm1(draws.bits(words[i], params[name].shape), np.float32))
        np.testing.assert_array_equal(got, ref)
        np.testing.assert_array_equal(
            np.asarray(noise[name]), np.asarray(draws.normal(words[i], params[name].shape))
        )
    # Under jit with the leaves sharded over 8 devices: the same numbers.
    mesh = jax.make_mesh((8,), ("d",))
    sharded = jax.device_put(
        jnp.zeros((8, 4)), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
    )
    s8 = tx.init({"a": sharded, "b": jnp.zeros(5)})
    vs8 = posterior._one_state(s8, "test")
    n8 = jax.jit(variational.noise_tree)(vs8)
    np.testing.assert_array_equal(np.asarray(n8["a"]), np.asarray(draws.normal(words[0], (8, 4))))
