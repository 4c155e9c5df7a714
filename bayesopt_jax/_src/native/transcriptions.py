"""Float64 NumPy transcriptions of the kernels' rules, for the kernels' self-test.

Each function states one rule of ``kernels.cc`` in float64 with the same
scalars operand, elementwise over NumPy arrays, and returns ``(u, *state)``.
Run on the absolute values of the signed inputs (gradient, first moment,
parameters) the same function gives the magnitude of every result's terms,
because every other quantity of the rules is non-negative: that is the scale
of the rounding bound in :func:`check_leaf`.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from bayesopt_jax._src import draws
from bayesopt_jax._src.native import rules

F32 = np.float32
CLIP = math.sqrt(float(np.finfo(F32).max)) / 2


def _clip(g):
    return np.where(np.isfinite(g), np.clip(g, -CLIP, CLIP), g)


def _max_nan(a, b):
    return np.where(np.isnan(a) | np.isnan(b), a + b, np.maximum(a, b))


def _min_nan(a, b):
    return np.where(np.isnan(a) | np.isnan(b), a + b, np.minimum(a, b))


def adam(sc, g, m, v):
    k = rules.AdamScalars(*sc)
    gc = _clip(g)
    m = m * k.b1 + gc * k.one_minus_b1
    v = v * k.b2 + gc * gc * k.one_minus_b2
    return (m * k.r1) / (np.sqrt(v * k.r2) + k.eps), m, v


def amsgrad(sc, g, m, v, n):
    k = rules.AmsgradScalars(*sc)
    gc = _clip(g)
    m = m * k.b1 + gc * k.one_minus_b1
    v = v * k.b2 + gc * gc * k.one_minus_b2
    n = _max_nan(n, v if k.raw else v * k.r2)
    v_eff = n * k.r2 if k.raw else n
    return (m * k.r1) / (np.sqrt(v_eff) + k.eps), m, v, n


def sigma(sc, g, *state):
    k = rules.SigmaScalars(*sc)
    beta, cb, rs, floor, eta, eta2 = k.beta, k.one_minus_beta, k.rs, k.floor, k.eta, k.eta2
    b1, c1, rm, kappa, smax = k.b1, k.one_minus_b1, k.rm, k.kappa, k.sigma_max
    if len(state) == 3:
        m, s, sig = state
    else:
        (s, sig), m = state, None
    gc = _clip(g)
    s = s * beta + gc * gc * cb
    s_hat = s * rs + floor
    d = gc
    if m is not None:
        m = m * b1 + gc * c1
        d = m * rm
    star = eta2 / 2 + eta * np.sqrt(eta2 / 4 + 1 / s_hat)
    sig = star if (k.first or k.fixed_point) else sig / (1 + s_hat * sig) + eta2
    if k.ratio_on:
        sig = _min_nan(sig, kappa * star)
    if k.max_on:
        sig = _min_nan(sig, smax)
    u = sig * d
    return (u, s, sig) if m is None else (u, m, s, sig)


def variational(sc, g, *state, magnitude=False):
    """The curvature EMA on ``g - m̂_{t-1}``, then the σ-filter; state ``([m,] s, σ, r)``.

    ``magnitude=True`` (with non-negative inputs) adds ``m̂`` instead, so that
    every result is the magnitude of its terms (see :func:`check_leaf`).
    """
    k = rules.VariationalScalars(*sc)
    *filter_state, r = state
    gc = _clip(g)
    dev = gc
    if len(filter_state) == 3:
        m = filter_state[0]
        m_prev = m * k.rp if k.rp != 0 else np.zeros_like(m)
        dev = _clip(gc + m_prev if magnitude else gc - m_prev)
    r = r * k.gamma + dev * dev * k.one_minus_gamma
    return (*sigma(list(k.filter), g, *filter_state), r)


RULES = {
    "adam": adam,
    "amsgrad": amsgrad,
    "sigma": sigma,
    "sigma_momentum": sigma,
    "variational": variational,
    "variational_momentum": variational,
}
assert RULES.keys() == rules.RULES.keys(), "a transcription per native rule"

# Each rule on the magnitudes of its inputs gives its results' magnitudes; a
# rule with a difference of signed terms states its magnitude form here.
MAGNITUDES = {
    "variational": functools.partial(variational, magnitude=True),
    "variational_momentum": functools.partial(variational, magnitude=True),
}


def _f32(*values) -> np.ndarray:
    return np.asarray(values, np.float64).astype(F32)


def cases() -> list[tuple[str, np.ndarray]]:
    """Scalars operands covering every branch of every rule."""
    b1, b2, t = 0.9, 0.999, 3
    bc1, bc2 = 1 - b1**t, 1 - b2**t
    adam_sc = _f32(b1, 1 - b1, b2, 1 - b2, 1 / bc1, 1 / bc2, 1e-8, CLIP)
    ams = [_f32(b1, 1 - b1, b2, 1 - b2, 1 / bc1, 1 / bc2, 1e-8, CLIP, raw) for raw in (0, 1)]
    beta, eta = 0.99, 1e-2
    rs, rm = 1 / (1 - beta**t), 1 / (1 - b1**t)

    def sig(first, ratio_on, max_on, fixed):
        return _f32(
            beta, 1 - beta, rs, 1e-16, eta, F32(eta) * F32(eta), first, ratio_on, 2.0,
            max_on, 0.5, fixed, CLIP, b1, 1 - b1, rm,
        )  # fmt: skip

    sigmas = [sig(0, 0, 0, 0), sig(1, 1, 0, 0), sig(0, 1, 1, 0), sig(0, 0, 0, 1)]
    cases = [("adam", adam_sc)] + [("amsgrad", sc) for sc in ams]
    cases += [(r, sc) for r in ("sigma", "sigma_momentum") for sc in sigmas]
    # the variational rules: at the first step (no previous mean) and later ones
    gamma, rp = 0.99, 1 / (1 - b1 ** (t - 1))
    variational = [
        np.concatenate([sigmas[1], _f32(gamma, 1 - gamma, 0.0)]),
        np.concatenate([sigmas[0], _f32(gamma, 1 - gamma, rp)]),
        np.concatenate([sigmas[2], _f32(0.0, 1.0, 1.0)]),
    ]
    cases += [(r, sc) for r in ("variational", "variational_momentum") for sc in variational]
    return cases


STATES = {name: rule.states for name, rule in rules.RULES.items()}


def inputs(rule: str, rng: np.random.Generator):
    """Parameters, gradients (with ordinary, tiny, huge and non-finite entries) and state."""
    sizes = [(70_001,), (3, 5), (1,)]
    n_states = STATES[rule]
    ps = [rng.normal(size=s).astype(F32) for s in sizes]
    gs = [(rng.normal(size=s) * 1e-3).astype(F32) for s in sizes]
    specials = np.array([0.0, -0.0, 1e-30, 3e38, -3e38, np.inf, -np.inf, np.nan], F32)
    gs[0][: specials.size] = specials
    states = []
    for j in range(n_states):
        if j in rules.RULES[rule].signed:
            states.append([(rng.normal(size=s) * 1e-3).astype(F32) for s in sizes])
        else:  # second moments, maxima and variances: positive
            states.append([(rng.random(size=s) * 1e-5 + 1e-7).astype(F32) for s in sizes])
    return ps, gs, states


def _mismatch(where: str, got, want, scale) -> str | None:
    got, want, scale = (np.asarray(x, np.float64) for x in (got, want, scale))
    finite = np.isfinite(want)
    if not np.array_equal(np.isfinite(got), finite) or not np.array_equal(
        got[~finite], want[~finite], equal_nan=True
    ):
        return f"the {where} kernel gives other non-finite entries"
    # Each result is a chain of at most ~20 float32 roundings of its terms
    # (a few more through a square root and the σ recursion): 64 units of
    # the terms' magnitude, plus the flush of results below the smallest
    # normal float32 (XLA's CPU threads flush subnormals to zero).
    tiny = float(np.finfo(F32).tiny)
    bound = 64 * float(np.finfo(F32).eps) * scale[finite] + 4 * tiny
    if not np.all(np.abs(got[finite] - want[finite]) <= bound):
        return f"the {where} kernel differs from its float64 transcription"
    return None


def magnitudes(rule, sc64, g, args):
    """The rule's results on the magnitudes of its terms (the rounding bound's scale)."""
    signed = rules.RULES[rule].signed
    fn = MAGNITUDES.get(rule, RULES[rule])
    return fn(sc64, np.abs(g), *[np.abs(a) if j in signed else a for j, a in enumerate(args)])


def check_leaf(i, rule, sc, fw, ps, gs, states, new, new_ps, stepped, decay):
    """Leaf ``i`` of both kernels' results against the transcription; what differs, or None."""
    fn = RULES[rule]
    sc64 = [float(x) for x in sc]
    factor, wd = (float(x) for x in fw)
    args = [np.asarray(st[i], np.float64) for st in states]
    g = np.asarray(gs[i], np.float64)
    p = np.asarray(ps[i], np.float64)
    with np.errstate(all="ignore"):
        want = fn(sc64, g, *args)
        mags = magnitudes(rule, sc64, g, args)
        u = want[0] + (wd * p if decay[i] else 0.0)
        p_want = p + factor * u
        p_mag = np.abs(p) + abs(factor) * (mags[0] + (wd * np.abs(p) if decay[i] else 0.0))
        checks = [("step", new_ps[i], p_want, p_mag)]
        for j in range(len(states)):
            checks += [
                ("update", new[j][i], want[1 + j], mags[1 + j]),
                ("step", stepped[j][i], want[1 + j], mags[1 + j]),
            ]
        for form, got, value, scale in checks:
            why = _mismatch(f"{rule} {form}", got, value, scale)
            if why is not None:
                return why
    return None


def stored(x: np.ndarray, values: np.ndarray, mids: np.ndarray, block: int):
    """NumPy transcription of the 8-bit encoder (float32 arithmetic, as the kernels do it).

    ``values`` and ``mids`` are one row of the kernels' tables. Returns the
    indices into ``values``, the scales and the decoded float32 values.
    """
    n = x.shape[-1]
    blocks = max(1, -(-n // block))  # an empty last axis still has one (empty) block
    run = max(1, -(-n // blocks))
    pad = np.pad(x.astype(F32), [(0, 0)] * (x.ndim - 1) + [(0, blocks * run - n)])
    xb = pad.reshape(*x.shape[:-1], blocks, run)
    scale = ((xb.view(np.uint32) & np.uint32(0x7FFFFFFF)).max(-1)).view(F32)
    with np.errstate(all="ignore"):
        inverse = F32(1) / np.where(scale > 0, scale, F32(1))
        index = np.searchsorted(mids[:-1], xb * inverse[..., None], side="left")
    index = np.where(np.isfinite(scale)[..., None], index, 0)
    with np.errstate(all="ignore"):
        dec = values[index] * scale[..., None]
    trim = lambda a: a.reshape(*x.shape[:-1], blocks * run)[..., :n]  # noqa: E731
    return trim(index), scale, trim(dec)


def check_stored_leaf(i, rule, sc, gs, decoded, us, new, encoded) -> str | None:
    """Leaf ``i`` of the 8-bit kernel's results; what differs, or None.

    ``decoded``: the float32 values its stored state stood for; ``us`` and
    ``new``: the kernel's updates and new state as ``(indices, scales)``;
    ``encoded``: the float32 kernel's new state on ``decoded``, encoded by
    :func:`stored`. The rule is the same compiled arithmetic in both
    kernels and decoding and encoding are exact or correctly rounded, so the
    codes and scales must be equal; the updates follow the transcription as
    the float32 kernel's state does.
    """
    fn = RULES[rule]
    sc64 = [float(x) for x in sc]
    args = [np.asarray(st[i], np.float64) for st in decoded]
    g = np.asarray(gs[i], np.float64)
    with np.errstate(all="ignore"):
        want = fn(sc64, g, *args)
        mags = magnitudes(rule, sc64, g, args)
        why = _mismatch(f"{rule} 8-bit update", us[i], want[0], mags[0])
    if why is not None:
        return why
    for j in range(len(decoded)):
        (index, scale), (ref_index, ref_scale) = new[j][i], encoded[j][i]
        same_scales = np.array_equal(
            np.asarray(scale, F32).view(np.uint32), np.asarray(ref_scale, F32).view(np.uint32)
        )
        if not same_scales or not np.array_equal(index, ref_index):
            return f"the {rule} 8-bit kernel stores other codes or scales than the encoder"
    return None


def erfinv_bound(u: np.ndarray) -> np.ndarray:
    """Relative bound on a float32 ``√2·erf⁻¹(u)`` by Giles' polynomials: 4e-7 for the
    approximation, and 8 float32 units of the evaluation of ``w = −log((1−u)(1+u))`` and
    the final products, amplified by erf⁻¹'s condition number κ(u) = u·(erf⁻¹)'(u)/erf⁻¹(u)."""
    from scipy import special  # a dependency of JAX; imported when the self-test runs

    x = special.erfinv(u)
    kappa = np.abs(u) * (math.sqrt(math.pi) / 2) * np.exp(x**2) / np.abs(x)
    return 4e-7 + 8 * 2.0**-24 * (1 + kappa)


def check_normal(words: np.ndarray, shape: tuple[int, ...], got: np.ndarray) -> str | None:
    """A leaf of standard normal draws against float64 ``√2·erf⁻¹(u)`` of the uniforms ``u``
    that :mod:`bayesopt_jax._src.draws` derives from ``words``; what differs, or None."""
    from scipy import special

    u = draws.uniform_reference(words, shape)
    ref = math.sqrt(2) * special.erfinv(u)
    err = np.abs(np.asarray(got, np.float64) - ref)
    if not np.all(err <= erfinv_bound(u) * np.abs(ref)):
        return "the sample kernel's draws differ from √2·erf⁻¹ of their uniforms"
    return None
