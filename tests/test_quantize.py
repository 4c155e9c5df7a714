"""Block-wise 8-bit state storage: the code maps, encoding against a float64 reference, Adam on it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from registry import make_eight_bit, slow_except, with_eight_bit

import bayesopt_jax as bj
from bayesopt_jax._src import quantize

# every optimizer with 8-bit state; the pure-path variational_newton (slowest to
# compile) in the full suite only
EIGHT_BIT = slow_except(
    with_eight_bit(), [n for n in with_eight_bit() if n != "variational_newton"]
)

U = 2.0**-24  # float32 unit roundoff


@pytest.mark.parametrize("signed", [True, False])
def test_code_maps(signed):
    values = quantize.code_map(signed)
    assert values.size == 256 and np.all(np.diff(values) > 0)
    assert values[-1] == 1.0 and (values[0] == -1.0 if signed else values[0] > 0)
    # Every decade below 1 has its own run; the top decade the most values.
    mags = np.abs(values[values != 0])
    per_decade = [np.sum((mags < 10.0**-k) & (mags >= 10.0 ** -(k + 1))) for k in range(7)]
    assert per_decade == sorted(per_decade, reverse=True) and per_decade[-1] >= 1
    assert (0.0 in values) == signed  # no zero code for second moments


def _index(q):
    """The stored codes as indices into the sorted code map."""
    return np.asarray(q.codes).astype(np.int64) + (128 if q.signed else 0)


def _reference(x, block, signed):
    """Float64 encode/decode with the same code map: (codes, scales, decoded, distance)."""
    values = quantize.code_map(signed)
    mids = (values[:-1] + values[1:]) / 2
    x = np.asarray(x, np.float64)
    n = x.shape[-1]
    nb = -(-n // block)  # runs of equal length, at most `block`
    run = -(-n // nb)
    padded = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, nb * run - n)])
    xb = padded.reshape(*x.shape[:-1], nb, run)
    scale = np.abs(xb).max(-1)
    normal = xb / np.where(scale > 0, scale, 1.0)[..., None]
    codes = np.searchsorted(mids, normal, side="left")
    # how far each normalised entry is from the nearest decision point
    to_mid = np.min(np.abs(normal[..., None] - mids), axis=-1)
    dist = np.abs(values[codes] - normal)
    trim = lambda a: a.reshape(*x.shape[:-1], -1)[..., :n]  # noqa: E731
    return trim(codes), scale, trim(normal), trim(to_mid), trim(dist)


@pytest.mark.parametrize("signed", [True, False])
def test_encoder_index_is_the_search_over_the_decision_points(signed):
    # The encoder reads a table indexed by each float32's top bits; it must
    # give exactly the count of float32 decision points below the value, for
    # every float32 in [-1, 1]. Checked where a mistake would show: at every
    # decision point and its float32 neighbours, at the edges of every bucket
    # the table uses, at zeros and subnormals, and at a million values spread
    # over 40 decades. An integer comparison: no rounding, on any host.
    _, mids = quantize._tables(signed)
    f32 = np.float32
    near = np.concatenate([mids, np.nextafter(mids, f32(-2)), np.nextafter(mids, f32(2))])
    top = np.arange((127 - 40) << 7, 0x3F81, dtype=np.uint32) << 16
    edges = np.concatenate([top.view(f32), (top | 0xFFFF).view(f32)])
    special = np.array([0.0, 2.0**-30, 2.0**-149, 1e-38, 1.0, np.nextafter(f32(1), f32(0))], f32)
    rng = np.random.default_rng(0)
    spread = (10.0 ** rng.uniform(-40, 0, 10**6)).astype(f32)
    y = np.concatenate([near, edges, special, spread])
    y = np.concatenate([y, -y])
    y = y[np.abs(y) <= 1]
    got = np.asarray(jax.jit(quantize._nearest, static_argnums=1)(jnp.asarray(y), signed))
    np.testing.assert_array_equal(got, np.searchsorted(mids, y, side="left"))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape,block", [((3, 700), 256), ((1000,), 64), ((5, 16), 16)])
def test_encode_matches_float64_reference(signed, shape, block):
    rng = np.random.default_rng(0)
    # magnitudes over 12 decades, so every run of the map is used
    x = rng.normal(size=shape) * 10.0 ** rng.uniform(-10, 2, size=shape)
    if not signed:
        x = np.abs(x)
    x32 = x.astype(np.float32)
    q = quantize.encode(jnp.asarray(x32), quantize.Blockwise8(block), signed)
    codes, scale, _, to_mid, dist = _reference(x32, block, signed)
    np.testing.assert_array_equal(np.asarray(q.scale), scale.astype(np.float32))  # an entry: exact
    # The float32 encoder computes x·(1/s) (two roundings, ≤ 2u|x/s| + u²)
    # and compares with the float32 midpoints (each within u of the float64
    # one, all ≤ 1): codes can differ only within 3u of a decision point, and
    # then by one.
    got = _index(q)
    clear = to_mid > 3 * U
    np.testing.assert_array_equal(got[clear], codes[clear])
    assert np.all(np.abs(got - codes) <= 1)
    # Decoding: the table entry rounded to float32 times the scale (two
    # roundings). Error against x: the distance to the chosen code, which is
    # the float64 nearest code's plus at most 3u near a decision point.
    dec = np.asarray(quantize.decode(q), np.float64)
    s = np.repeat(scale, q.block_size, axis=-1)[..., : shape[-1]]
    bound = s * (dist + 3 * U) + 2.0000001 * U * np.abs(dec)
    err = np.abs(dec - x32)
    assert np.all(err <= bound)
    # The bound rejects a real error: one code off, away from decision points.
    moved_codes = np.clip(got + 1, 0, 255) - (128 if signed else 0)
    wrong = quantize.Quantized(jnp.asarray(moved_codes.astype(q.codes.dtype)), q.scale)
    err_wrong = np.abs(np.asarray(quantize.decode(wrong), np.float64) - x32)
    values = quantize.code_map(signed)
    gap_up = values[np.minimum(got + 1, 255)] - values[got]
    # (where the gap to the next code exceeds the rounding terms: 16u)
    moved = (got < 255) & (s > 0) & (dist < gap_up / 4) & (gap_up > 16 * U)
    assert moved.mean() > 0.15 and np.all(err_wrong[moved] > bound[moved])


def test_zero_blocks_and_nonfinite_entries():
    fmt = quantize.Blockwise8(16)
    x = np.zeros((3, 32), np.float32)
    x[1, 3] = 2.0
    x[2, 20] = np.nan
    dec = np.asarray(quantize.decode(quantize.encode(jnp.asarray(x), fmt, True)))
    np.testing.assert_array_equal(dec[0], 0.0)  # an all-zero block is exact
    assert dec[1, 3] == 2.0 and np.all(dec[1, :3] == 0) and np.all(dec[1, 16:] == 0)
    assert np.all(np.isnan(dec[2, 16:])) and np.all(dec[2, :16] == 0)  # NaN stays visible
    for shape in [(), (1,), (0,), (4, 0), (2, 17)]:
        z = quantize.zeros(jax.ShapeDtypeStruct(shape, jnp.float32), fmt, False)
        assert z.codes.shape == shape and np.all(np.asarray(quantize.decode(z)) == 0)


def test_format_argument_is_checked():
    with pytest.raises(ValueError, match="block_size"):
        quantize.Blockwise8(4)
    with pytest.raises(ValueError, match="mu_dtype"):
        bj.scale_by_adam(mu_dtype="int8")
    with pytest.raises(ValueError, match=r"nu_dtype.*complex"):
        bj.adam(1e-3, nu_dtype=quantize.Blockwise8()).init({"z": jnp.ones(3, jnp.complex64)})


def test_block_size_takes_any_integer_type():
    for size in (np.int64(256), np.int32(64), np.uint16(16)):
        fmt = quantize.Blockwise8(size)
        assert type(fmt.block_size) is int and fmt == quantize.Blockwise8(int(size))
        assert hash(fmt) == hash(quantize.Blockwise8(int(size)))  # usable as a static argument
    for bad in (True, 16.0, np.float64(32), 15, np.int64(8)):
        with pytest.raises(ValueError, match="block_size"):
            quantize.Blockwise8(bad)


@pytest.mark.parametrize("value", [0.0, 1e-3, -2.5, 3e38])
@pytest.mark.parametrize("shape", [(), (1,), (300,), (5, 257), (0, 300), (0, 0), (2, 0, 5)])
def test_constant_storage_is_the_encoder_of_the_constant(shape, value):
    """zeros/full are built without the encoder; they must be what it gives, code and scale."""
    fmt = quantize.Blockwise8(128)
    for signed in (True, False):
        if value < 0 and not signed:
            continue
        x = jnp.full(shape, value, jnp.float32)
        expect = quantize.encode(x, fmt, signed)
        for got in (
            quantize.full(x, value, fmt, signed),
            jax.jit(lambda y, s=signed: quantize.full(y, value, fmt, s))(x),
        ):
            assert got.codes.dtype == expect.codes.dtype and got.scale.dtype == jnp.float32
            np.testing.assert_array_equal(np.asarray(got.codes), np.asarray(expect.codes))
            np.testing.assert_array_equal(np.asarray(got.scale), np.asarray(expect.scale))


@pytest.mark.parametrize("name", EIGHT_BIT)
def test_bare_array_parameters_with_stored_state(name):
    """A single array as the parameters: the state's 8-bit nodes are one buffer, not two."""
    tx = make_eight_bit(name, quantize.Blockwise8())
    p = jnp.linspace(-1.0, 1.0, 3 * 64 * 128).reshape(3, 64, 128)
    s, s_ref = tx.init(p), tx.init({"w": p})
    for step in range(3):
        g = jnp.cos(p * (step + 1))
        u, s = tx.update(g, s, p)
        u_ref, s_ref = tx.update({"w": g}, s_ref, {"w": p})
        # the same arithmetic as the same array inside a dict, bit for bit
        assert u.shape == p.shape and bool(jnp.all(jnp.isfinite(u)))
        np.testing.assert_array_equal(np.asarray(u), np.asarray(u_ref["w"]))
    # The check still refuses gradients of another shape, naming the stored buffer's shape.
    with pytest.raises(ValueError, match=r"\(3, 64, 128\)"):
        tx.update(jnp.ones((3, 64, 64)), s, jnp.ones((3, 64, 64)))


@pytest.mark.parametrize("name", EIGHT_BIT)
@pytest.mark.parametrize("shape", [(0, 300), (0, 0), (2, 0, 5), (0,)])
def test_empty_arrays_with_stored_state(name, shape):
    tx = make_eight_bit(name, quantize.Blockwise8())
    p = {"empty": jnp.zeros(shape), "w": jnp.ones(5)}
    s = tx.init(p)
    u, s = tx.update(p, s, p)
    u2, _ = jax.jit(tx.update)(p, s, p)
    new_p, _ = bj.fused_step(tx, p, s, p)
    assert u["empty"].shape == u2["empty"].shape == new_p["empty"].shape == shape
    assert jax.tree.structure(jax.eval_shape(tx.init, p)) == jax.tree.structure(s)


def _adam_reference_step(g, m, v, count, b1=0.9, b2=0.999, eps=1e-8):
    """One Adam step in float64 from (decoded) float32 state."""
    g, m, v = (np.asarray(a, np.float64) for a in (g, m, v))
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    u = (m / (1 - b1**count)) / (np.sqrt(v / (1 - b2**count)) + eps)
    return u, m, v


@pytest.mark.parametrize("amsgrad", [False, True])
def test_adam_on_stored_moments_is_the_rule_on_decoded_moments(amsgrad):
    """A step decodes, runs Adam's own rule in float32, and encodes: checked against float64."""
    rng = np.random.default_rng(1)
    fmt = quantize.Blockwise8(64)
    tx = (
        bj.scale_by_amsgrad(mu_dtype=fmt, nu_dtype=fmt)
        if amsgrad
        else bj.scale_by_adam(mu_dtype=fmt, nu_dtype=fmt)
    )
    params = {"w": jnp.zeros((8, 200), jnp.float32)}
    state = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(5):
        g = {
            "w": jnp.asarray(
                rng.normal(size=(8, 200)) * 10.0 ** rng.uniform(-4, 1, (8, 200)), jnp.float32
            )
        }
        before = state
        u, state = update(g, state)
    m0 = np.asarray(quantize.decode(before.mu["w"]))
    v0 = np.asarray(quantize.decode(before.nu["w"]))
    u_ref, m_ref, v_ref = _adam_reference_step(g["w"], m0, v0, 5)
    if amsgrad:
        vmax0 = np.asarray(quantize.decode(before.nu_max["w"]), np.float64)
        vmax = np.maximum(vmax0, v_ref / (1 - 0.999**5))
        u_ref = (m_ref / (1 - 0.9**5)) / (np.sqrt(vmax) + 1e-8)
    # Adam's float32 rule: a handful of roundings per term, relative to the
    # magnitudes b1|m| + (1-b1)|g| the first moment is summed from (it can
    # cancel) over the root term (v has no cancellation; the max only grows it).
    m_terms = 0.9 * np.abs(m0) + 0.1 * np.abs(np.asarray(g["w"], np.float64))
    terms = m_terms / (1 - 0.9**5) / (np.sqrt(v_ref / (1 - 0.999**5)) + 1e-8)
    assert np.all(np.abs(np.asarray(u["w"]) - u_ref) <= 16 * U * terms + 1e-30)
    # The new moments are the float64 ones encoded (the reference encoder).
    for got, ref, signed in [(state.mu["w"], m_ref, True), (state.nu["w"], v_ref, False)]:
        codes, _, _, to_mid, _ = _reference(ref.astype(np.float32), 64, signed)
        clear = to_mid > 64 * U  # the float32 rule's rounding moves x/s by ≤ ~8u
        np.testing.assert_array_equal(_index(got)[clear], codes[clear])


def _sigma_reference_step(g, m, s, sig, count, *, eta, beta, b1, kappa, eps=1e-8):
    """One σ-filter step (with the ``max_ratio`` cap) in float64 from decoded float32 state."""
    g, m, s, sig = (np.asarray(a, np.float64) for a in (g, m, s, sig))
    s = beta * s + (1 - beta) * g * g
    s_hat = s / (1 - beta**count) + eps
    star = eta**2 / 2 + eta * np.sqrt(eta**2 / 4 + 1 / s_hat)
    sig = np.minimum(sig / (1 + s_hat * sig) + eta**2, kappa * star)
    m = b1 * m + (1 - b1) * g
    return sig * m / (1 - b1**count), m, s, sig


def test_sigma_filter_on_stored_state_is_the_rule_on_decoded_state():
    """Evidence, momentum and σ all in 8 bits: each step is the σ-filter on the decoded values."""
    rng = np.random.default_rng(4)
    fmt = quantize.Blockwise8(64)
    kw = dict(eta=1e-2, beta=0.99, b1=0.9)
    tx = bj.scale_by_sigma_filter(
        kw["eta"], kw["beta"], b1=kw["b1"], sigma_init=1e-3, max_ratio=2.0,
        mu_dtype=fmt, nu_dtype=fmt, sigma_dtype=fmt,
    )  # fmt: skip
    params = {"w": jnp.zeros((4, 300), jnp.float32)}
    state = tx.init(params)
    # sigma_init is stored exactly (code 1, scale sigma_init).
    np.testing.assert_array_equal(np.asarray(quantize.decode(state.sigma["w"])), np.float32(1e-3))
    update = jax.jit(tx.update)
    for _ in range(6):
        g = {"w": jnp.asarray(rng.normal(size=(4, 300)) * 10.0 ** rng.uniform(-3, 1, (4, 300)))}
        before = state
        u, state = update(g, state)
    m0, s0, sig0 = (np.asarray(quantize.decode(x["w"])) for x in before[1:])
    u_ref, m_ref, s_ref, sig_ref = _sigma_reference_step(g["w"], m0, s0, sig0, 6, kappa=2.0, **kw)
    # float32 rule: σ to ~12u relative (a sqrt, divisions, the cap), d to a
    # few u of the terms b1|m| + (1-b1)|g| it is summed from.
    d_terms = (0.9 * np.abs(m0) + 0.1 * np.abs(np.asarray(g["w"], np.float64))) / (1 - 0.9**6)
    bound = 16 * U * sig_ref * d_terms
    assert np.all(np.abs(np.asarray(u["w"]) - u_ref) <= bound + 1e-30)
    assert not np.all(np.abs(np.asarray(u["w"]) - u_ref * (1 + 1 / 128)) <= bound)
    for got, ref, signed in [
        (state.mu["w"], m_ref, True),
        (state.nu["w"], s_ref, False),
        (state.sigma["w"], sig_ref, False),
    ]:
        codes, _, _, to_mid, _ = _reference(ref.astype(np.float32), 64, signed)
        clear = to_mid > 64 * U
        assert clear.mean() > 0.9
        np.testing.assert_array_equal(_index(got)[clear], codes[clear])
    # The posterior readers see the decoded σ.
    np.testing.assert_array_equal(
        np.asarray(bj.posterior_variance(state)["w"]), np.asarray(quantize.decode(state.sigma["w"]))
    )


@pytest.mark.parametrize("curvature", ["variance", "evidence", "reparam"])
def test_variational_filter_on_stored_state_is_its_rule_on_decoded_state(curvature):
    """The variational σ-filter with m, s, σ in 8 bits: every step, draw and
    variance is the float32 filter's on the decoded buffers."""
    from bayesopt_jax._src import variational

    fmt = quantize.Blockwise8(32)
    kw = dict(num_data=1000, batch_size=10, key=3, curvature=curvature, max_ratio=2.0)
    tx8 = bj.scale_by_variational_sigma_filter(
        1e-2, mu_dtype=fmt, nu_dtype=fmt, sigma_dtype=fmt, **kw
    )
    tx32 = bj.scale_by_variational_sigma_filter(1e-2, **kw)
    params, grads = _problem()
    state = tx8.init(params)
    assert all(quantize.is_stored(x) for x in (state.mu["w"], state.nu["w"], state.sigma["w"]))
    for g in grads:
        # Both run the same float32 operations, op by op, on the same values
        # (the decoded buffers), so they agree bit for bit on any host.
        plain = variational.decoded_state(state)
        for a, b in [
            (bj.training_sample(params, state), bj.training_sample(params, plain)),
            (bj.posterior_variance(state), bj.posterior_variance(plain)),
        ]:
            _same(a, b)
        u8, state = tx8.update(g, state)
        u32, new32 = tx32.update(g, plain)
        _same(u8, u32)
        # The new buffers are the float32 filter's, encoded.
        for stored, want in [
            (state.mu, new32.mu),
            (state.nu, new32.nu),
            (state.sigma, new32.sigma),
        ]:
            for k in params:
                np.testing.assert_array_equal(
                    _index(stored[k]), _index(quantize.reencode(want[k], stored[k]))
                )
        if curvature == "reparam":
            _same(state.hess, new32.hess)
        elif curvature == "variance":
            for k in params:
                np.testing.assert_array_equal(
                    _index(state.hess[k]), _index(quantize.reencode(new32.hess[k], state.hess[k]))
                )
    # m, s, σ (and the variance curvature) in 8 bits, the reparam buffer in float32.
    n = sum(p.size for p in jax.tree.leaves(params))
    per_param = sum(x.nbytes for x in jax.tree.leaves(state) if x.ndim) / n
    fixed = (state.key.nbytes + state.prior_precision.nbytes) / n  # one key, one δ per leaf
    stored = {"variance": 4, "evidence": 3, "reparam": 3}[curvature]
    extra = 4 if curvature == "reparam" else 0
    assert per_param <= stored * (1 + 4 / 32) + extra + fixed + 1e-9


def test_two_moments_cost_about_two_bytes_per_parameter():
    params = {"w": jnp.zeros((1024, 1024)), "b": jnp.zeros(1024)}
    fmt = quantize.Blockwise8(256)
    state = bj.adam(1e-3, mu_dtype=fmt, nu_dtype=fmt).init(params)
    n = sum(x.size for x in jax.tree.leaves(params))
    stored = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
    assert stored / n <= 2.1
    assert stored / n == pytest.approx(2 * (1 + 4 / 256), abs=1e-3)


def test_eight_bit_adam_trains_like_float32_adam():
    """A least-squares fit: 8-bit moments reach the float32 loss within a few percent."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(256, 32)), jnp.float32)
    w_true = jnp.asarray(rng.normal(size=(32, 64)), jnp.float32)
    y = x @ w_true

    def run(tx):
        params = {"w": jnp.zeros((32, 64))}
        state = tx.init(params)

        @jax.jit
        def step(params, state):
            loss, g = jax.value_and_grad(lambda p: jnp.mean((x @ p["w"] - y) ** 2))(params)
            u, state = tx.update(g, state, params)
            return optax.apply_updates(params, u), state, loss

        for _ in range(300):
            params, state, loss = step(params, state)
        return float(loss)

    fmt = quantize.Blockwise8(64)
    full, eight = run(bj.adam(3e-2)), run(bj.adam(3e-2, mu_dtype=fmt, nu_dtype=fmt))
    start = float(jnp.mean(y**2))
    assert full < 1e-2 * start and eight < 1e-2 * start


def _fmt_adam(**kw):
    fmt = quantize.Blockwise8(32)
    return bj.adamw(1e-2, weight_decay=1e-3, mu_dtype=fmt, nu_dtype=fmt, **kw)


def _problem():
    rng = np.random.default_rng(3)
    params = {"w": jnp.asarray(rng.normal(size=(16, 64)), jnp.float32), "b": jnp.zeros(64)}
    grads = [
        jax.tree.map(lambda p, r=rng: jnp.asarray(r.normal(size=p.shape), jnp.float32), params)
        for _ in range(4)
    ]
    return params, grads


def _run(tx, params, grads, step=None):
    state = tx.init(params)
    for g in grads:
        if step is None:
            u, state = tx.update(g, state, params)
            params = optax.apply_updates(params, u)
        else:
            params, state = step(g, state, params)
    return params, state


def _same(a, b):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_stored_state_under_jit_fused_step_and_checkpoints(tmp_path):
    tx = _fmt_adam()
    params, grads = _problem()
    p1, _ = _run(tx, params, grads)
    p2, s2 = _run(tx, params, grads, jax.jit(lambda g, s, p: bj.fused_step(tx, g, s, p)))
    # The same float32 arithmetic on every path: the fused step falls back to
    # the two-call path for stored state, jit changes nothing.
    np.testing.assert_allclose(np.asarray(p1["w"]), np.asarray(p2["w"]), rtol=0, atol=4 * U * 16)
    bj.save_npz(tmp_path / "s.npz", s2)
    back = bj.load_npz(tmp_path / "s.npz", tx.init(params))
    _same(back, s2)
    assert isinstance(back[0].mu["w"], quantize.Quantized)


def test_stored_state_with_optax_wrappers():
    params, grads = _problem()
    fmt = quantize.Blockwise8(32)
    # apply_if_finite leaves stored state untouched on a NaN gradient.
    tx = optax.apply_if_finite(bj.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt), 3)
    state = tx.init(params)
    _, state = tx.update(grads[0], state, params)
    bad = jax.tree.map(lambda g: g.at[0].set(jnp.nan), grads[1])
    _, after = tx.update(bad, state, params)
    _same(after.inner_state, state.inner_state)
    # inject_hyperparams and MultiSteps keep the state structure.
    tx = optax.inject_hyperparams(bj.adam)(learning_rate=1e-2, mu_dtype=fmt, nu_dtype=fmt)
    _run(tx, params, grads)
    tx = optax.MultiSteps(bj.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt), 2)
    p, _ = _run(tx, params, grads)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(p))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def _mesh_4x2():
    return jax.sharding.Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("a", "b"))


def _assert_blocks_whole(state):
    """Every device holds whole blocks: its slice of the codes is exactly its scales' blocks."""
    stored = [
        x for x in jax.tree.leaves(state, is_leaf=quantize.is_stored) if quantize.is_stored(x)
    ]
    assert stored
    for q in (q for q in stored if q.shape):  # a scalar is one block on every device
        n, run = q.shape[-1], q.block_size
        codes = q.codes.sharding.devices_indices_map(q.shape)
        scale = q.scale.sharding.devices_indices_map(q.scale.shape)
        for device, index in codes.items():
            lead, last = index[:-1], index[-1].indices(n)
            s_lead, s_last = scale[device][:-1], scale[device][-1].indices(q.scale.shape[-1])
            assert [x.indices(k) for x, k in zip(lead, q.shape, strict=False)] == [
                x.indices(k) for x, k in zip(s_lead, q.scale.shape, strict=False)
            ]
            assert last[0] == s_last[0] * run and last[1] == min(s_last[1] * run, n), (q, device)


def _sharded_step_matches_one_device(tx, params, grads, put, shardings):
    """Three steps on one device, then one step each way from that state: same rule, same codes."""
    _, before = _run(tx, params, grads[:3])
    u1, s1 = jax.jit(tx.update)(grads[3], before)
    u8, s8 = jax.jit(tx.update, out_shardings=(None, shardings))(
        put(grads[3]), jax.device_put(before, shardings)
    )
    _assert_blocks_whole(s8)
    # Same rule, possibly other contractions: the Adam bound (16u of the
    # terms), and the same codes away from decision points.
    for k in params:
        m0 = np.asarray(quantize.decode(before.mu[k]), np.float64)
        v1 = np.asarray(quantize.decode(s1.nu[k]), np.float64)
        g = np.abs(np.asarray(grads[3][k], np.float64))
        terms = (0.9 * np.abs(m0) + 0.1 * g) / (1 - 0.9**4) / (np.sqrt(v1 / (1 - 0.999**4)) + 1e-8)
        assert np.all(np.abs(np.asarray(u8[k]) - np.asarray(u1[k])) <= 32 * U * terms * 1.1)
        v0 = np.asarray(quantize.decode(before.nu[k]), np.float64)
        _, m_ref, v_ref = _adam_reference_step(grads[3][k], m0, v0, 4)
        for a, b, ref in [(s1.mu[k], s8.mu[k], m_ref), (s1.nu[k], s8.nu[k], v_ref)]:
            ref = np.atleast_1d(ref.astype(np.float32))
            _, _, _, to_mid, _ = _reference(ref, a.block_size, a.signed)
            clear = to_mid > 64 * U  # each path within ~8u of the float64 value
            index_a, index_b = np.atleast_1d(_index(a)), np.atleast_1d(_index(b))
            np.testing.assert_array_equal(index_a[clear], index_b[clear])


def _put(mesh, spec):
    from jax.sharding import NamedSharding

    return lambda tree: {
        k: jax.device_put(v, NamedSharding(mesh, spec[k])) for k, v in tree.items()
    }


@pytest.mark.slow  # sharding layouts (the inner loop: tests/test_parallel.py)
def test_stored_state_sharded_like_the_parameters():
    from jax.sharding import PartitionSpec as P

    mesh = _mesh_4x2()
    params, grads = _problem()
    put = _put(mesh, {"w": P("a", "b"), "b": P("b")})
    sharded = put(params)
    fmt = quantize.Blockwise8(32)
    tx = bj.scale_by_adam(mu_dtype=fmt, nu_dtype=fmt)
    shardings = bj.state_shardings(tx, sharded)
    # Codes follow the parameter; the scales too, wherever a device's share
    # of the last axis is whole blocks (64 / 2 = 32 = one block here).
    state = jax.jit(tx.init, out_shardings=shardings)(sharded)
    assert state.mu["w"].codes.sharding.spec == P("a", "b")
    assert state.mu["w"].scale.sharding.spec == P("a", "b")
    _assert_blocks_whole(state)
    _sharded_step_matches_one_device(tx, params, grads, put, shardings)


@pytest.mark.slow  # sharding layouts (the inner loop: tests/test_parallel.py)
def test_zero_split_of_stored_state_keeps_blocks_whole():
    """``split_over``: state split over a data axis the parameters are replicated on."""
    from jax.sharding import PartitionSpec as P

    mesh = _mesh_4x2()
    params, grads = _problem()
    params["c"], params["s"] = jnp.ones(40), jnp.ones(())
    grads = [dict(g, c=g["b"][:40] * 2, s=g["b"][0]) for g in grads]
    put = _put(mesh, {"w": P(None, "b"), "b": P(), "c": P(), "s": P()})
    fmt = quantize.Blockwise8(16)
    tx = bj.scale_by_adam(mu_dtype=fmt, nu_dtype=fmt)
    shardings = bj.state_shardings(tx, put(params), split_over="a")
    specs = {k: (q.codes.spec, q.scale.spec) for k, q in shardings.mu.items()}
    # w: rows split over "a" (16 / 4), both arrays; b: 64 / 4 = 16 = one
    # block per device, split along its only axis; c: 40 / 4 = 10 is not
    # whole blocks, so it is not split (a block would straddle devices).
    assert specs["w"] == (P("a", "b"), P("a", "b"))
    assert specs["b"] == (P("a"), P("a"))
    assert not any("a" in str(spec) for spec in specs["c"] + specs["s"])
    state = jax.jit(tx.init, out_shardings=shardings)(put(params))
    _assert_blocks_whole(state)
    _sharded_step_matches_one_device(tx, params, grads, put, shardings)
    # Without the block rule, a leaf-by-leaf split puts c's codes in shares
    # of 10 while its 3 scales (runs of 14) cannot follow: the check sees it.
    straddling = quantize.Quantized(
        jax.device_put(state.mu["c"].codes, jax.sharding.NamedSharding(mesh, P("a"))),
        state.mu["c"].scale,
    )
    with pytest.raises(AssertionError):
        _assert_blocks_whole([straddling])


def _memory_chains():
    fmt = quantize.Blockwise8(32)
    return {
        "adamw_8bit": _fmt_adam(),
        "sigma_filter_8bit": bj.sigma_filter(
            1e-2, b1=0.9, mu_dtype=fmt, nu_dtype=fmt, sigma_dtype=fmt
        ),
        "adam_8bit_kahan": optax.chain(
            bj.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt), bj.kahan_summation()
        ),
        "adam_8bit_stochastic": optax.chain(
            bj.adam(1e-2, mu_dtype=fmt, nu_dtype=fmt), bj.stochastic_rounding(5)
        ),
        "variational_8bit": bj.variational_sigma_filter(
            1e-2, num_data=1000, batch_size=10, mu_dtype=fmt, nu_dtype=fmt, sigma_dtype=fmt
        ),
    }


@pytest.mark.parametrize("name", sorted(_memory_chains()))
def test_orbax_resume_of_stored_state_is_bit_exact(tmp_path, name):
    ocp = pytest.importorskip("orbax.checkpoint")
    tx = _memory_chains()[name]
    params, grads = _problem()
    if "kahan" in name or "stochastic" in name:
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
        grads = [jax.tree.map(lambda g: g.astype(jnp.bfloat16), g) for g in grads]
    step = jax.jit(
        lambda g, s, p: (lambda u, s: (optax.apply_updates(p, u), s))(*tx.update(g, s, p))
    )
    p, s = _run(tx, params, grads[:2], step)
    with ocp.StandardCheckpointer() as ckpt:
        ckpt.save(tmp_path / "ckpt", {"params": p, "opt_state": s})
        ckpt.wait_until_finished()
        target = jax.eval_shape(lambda: {"params": params, "opt_state": tx.init(params)})
        back = ckpt.restore(tmp_path / "ckpt", target)
    assert jax.tree.structure(back["opt_state"]) == jax.tree.structure(s)
    _same(back["opt_state"], s)
    pa, sa, pb, sb = p, s, back["params"], back["opt_state"]
    for g in grads[2:]:
        pa, sa = step(g, sa, pa)
        pb, sb = step(g, sb, pb)
    _same((pa, sa), (pb, sb))


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
@pytest.mark.parametrize("name", ["adamw_8bit", "sigma_filter_8bit", "variational_8bit"])
def test_pmap_replicas_of_stored_state_stay_bit_identical(name):
    tx = _memory_chains()[name]
    params, grads = _problem()
    n = 8
    rep = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (n, *a.shape)), t)  # noqa: E731
    # Each replica sees its own gradient; the mean over replicas is the step's.
    tx_dp = optax.chain(bj.cross_replica_mean("i"), tx)

    @functools.partial(jax.pmap, axis_name="i")
    def step(g, s, p):
        u, s = tx_dp.update(g, s, p)
        return optax.apply_updates(p, u), s

    p = rep(params)
    s = jax.pmap(tx_dp.init)(p)
    rng = np.random.default_rng(6)
    for g in grads:
        noise = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=(n, *a.shape)), a.dtype), g)
        p, s = step(noise, s, p)
    for leaf in jax.tree.leaves((p, s)):
        leaf = np.asarray(leaf)
        for r in range(1, n):
            np.testing.assert_array_equal(leaf[r], leaf[0])
    assert isinstance(s[1][0].mu["w"], quantize.Quantized)
