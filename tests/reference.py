"""Float64 NumPy transcriptions of the update rules, written from the equations.

Each function takes a list of gradient arrays (one per step) and returns the
list of updates (before the learning rate). They are deliberately naive loops
with no shared code with the package, so they serve as an independent check.

They also run on :class:`bounds.Tracked` gradients, which carry a bound on
the rounding error of each result along (``b**t`` is written
``power(b, t, g)`` for that).
"""

from __future__ import annotations

import numpy as np
from bounds import Tracked, power


def _sq(g):
    return np.real(g * np.conj(g))


def adam(grads, *args, **kwargs):
    """All updates as a list (see :func:`adam_steps`)."""
    return list(adam_steps(grads, *args, **kwargs))


def adam_steps(
    grads, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bias_correction=True, nesterov=False
):
    """Yields the updates one step at a time (``grads`` may be fed lazily)."""
    m = np.zeros_like(grads[0])
    v = np.zeros_like(np.real(grads[0]))
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * _sq(g)
        if bias_correction:
            if nesterov:
                m_hat = b1 * m / (1 - power(b1, t + 1, g)) + (1 - b1) * g / (1 - power(b1, t, g))
            else:
                m_hat = m / (1 - power(b1, t, g))
            v_hat = v / (1 - power(b2, t, g))
        else:
            m_hat = b1 * m + (1 - b1) * g if nesterov else m
            v_hat = v
        yield m_hat / (np.sqrt(v_hat + eps_root) + eps)


def amsgrad(grads, *args, **kwargs):
    """All updates as a list (see :func:`amsgrad_steps`)."""
    return list(amsgrad_steps(grads, *args, **kwargs))


def amsgrad_steps(
    grads,
    b1=0.9,
    b2=0.999,
    eps=1e-8,
    eps_root=0.0,
    max_of="corrected",
    bias_correction_mu=True,
    bias_correction_nu=True,
):
    """Yields the updates one step at a time (``grads`` may be fed lazily)."""
    m = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    vmax = np.zeros_like(grads[0])
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - power(b1, t, g)) if bias_correction_mu else m
        c = 1 - power(b2, t, g) if bias_correction_nu else 1.0
        if max_of == "raw":
            vmax = np.maximum(vmax, v)
            denom = np.sqrt(vmax / c + eps_root) + eps
        else:
            vmax = np.maximum(vmax, v / c)
            denom = np.sqrt(vmax + eps_root) + eps
        yield m_hat / denom


def adamax(grads, *args, **kwargs):
    """All updates as a list (see :func:`adamax_steps`)."""
    return list(adamax_steps(grads, *args, **kwargs))


def adamax_steps(grads, b1=0.9, b2=0.999, eps=1e-8):
    """Yields the updates one step at a time (``grads`` may be fed lazily)."""
    m = np.zeros_like(grads[0])
    u = np.zeros_like(grads[0])
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g) + eps)
        yield m / (1 - power(b1, t, g)) / u


def rms(grads, *args, **kwargs):
    """All updates as a list (see :func:`rms_steps`)."""
    return list(rms_steps(grads, *args, **kwargs))


def rms_steps(
    grads,
    decay=0.9,
    eps=1e-8,
    eps_in_sqrt=False,
    bias_correction=False,
    centered=False,
    initial_scale=0.0,
):
    """Yields the updates one step at a time (``grads`` may be fed lazily)."""
    v = np.full_like(grads[0], initial_scale)
    m = np.zeros_like(grads[0])
    for t, g in enumerate(grads, start=1):
        v = decay * v + (1 - decay) * g * g
        m = decay * m + (1 - decay) * g
        c = 1 - power(decay, t, g) if bias_correction else 1.0
        s = v / c
        if centered:
            s = np.maximum(s - (m / c) ** 2, 0.0)  # documented clip at 0
        denom = np.sqrt(s + eps) if eps_in_sqrt else np.sqrt(s) + eps
        yield g / denom


def rss(grads, *args, **kwargs):
    """All updates as a list (see :func:`rss_steps`)."""
    return list(rss_steps(grads, *args, **kwargs))


def rss_steps(grads, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False):
    """Yields the updates one step at a time (``grads`` may be fed lazily).

    ``eps_in_sqrt=True`` is Optax's convention: ``g / sqrt(a + eps)``, and 0 where ``a`` is 0.
    """
    a = np.full_like(np.real(grads[0]), initial_accumulator_value)
    for g in grads:
        a = a + _sq(g)
        if eps_in_sqrt:
            # Where a = 0 exactly, g = 0 too: the 1 added there only avoids 0/0.
            empty = (np.asarray(getattr(a, "value", a)) == 0).astype(np.float64)
            yield g / np.sqrt(a + eps + empty)
        else:
            yield g / (np.sqrt(a) + eps)


def sigma_filter(
    grads, eta, beta=0.999, b1=0.0, sigma_init=None, bias_correction=True, eps=1e-16, max_ratio=None
):
    """The diagonal σ-filter, straight from the equations (returns updates, sigmas)."""
    s = np.zeros_like(grads[0])
    m = np.zeros_like(grads[0])
    sig = None if sigma_init is None else np.full_like(grads[0], sigma_init)
    ups, sigs = [], []
    for t, g in enumerate(grads, start=1):
        s = beta * s + (1 - beta) * g * g
        s_hat = (s / (1 - power(beta, t, g)) if bias_correction else s) + eps
        star = eta**2 / 2 + eta * np.sqrt(eta**2 / 4 + 1 / s_hat)
        if sig is None:
            sig = star
        else:
            sig = 1 / (s_hat + 1 / sig) + eta**2
        if max_ratio is not None and eta > 0:
            sig = np.minimum(sig, max_ratio * star)
        if b1 > 0:
            m = b1 * m + (1 - b1) * g
            d = m / (1 - power(b1, t, g)) if bias_correction else m
        else:
            d = g
        ups.append(sig * d)
        sigs.append(sig.copy())
    return ups, sigs


def _norm(A):
    return np.linalg.norm(A, 2) if np.ndim(A) == 2 else np.linalg.norm(A)


def sigma_filter_full(grads, eta, beta, sigma_init, unit=None):
    """The full-matrix σ-filter with explicit inverses (float64).

    With ``unit`` (the implementation's unit roundoff), also returns the
    updates and final Σ as :class:`bounds.Tracked` with a normwise
    first-order bound (every entry of an error is at most its 2-norm): per
    step, the rounding of one step at the reference state,
    ``3d·u·(κ(Σ) + κ(Ĝ + Σ⁻¹))·‖Σ'‖``, plus the errors of Σ and Ĝ carried
    through the step's derivatives ``X ↦ AXAᵀ`` with ``A = (I + ΣĜ)⁻¹`` and
    ``E ↦ -Σ'ᵀEΣ'``.
    """
    d = grads[0].size
    G = np.zeros((d, d))
    S = np.eye(d) * sigma_init
    ups = []
    e_G = e_S = 0.0
    tracked = []
    for t, g in enumerate(grads, start=1):
        G_old = G
        G = beta * G + (1 - beta) * np.outer(g, g)
        G_hat = G / (1 - beta**t)
        A = G_hat + np.linalg.inv(S)
        S_new = np.linalg.inv(A) + eta**2 * np.eye(d)
        if unit is not None:
            X = np.linalg.inv(A)
            e_G = beta * e_G + 3 * unit * (beta * _norm(G_old) + (1 - beta) * _norm(g) ** 2)
            e_G_hat = e_G / (1 - beta**t) + unit * (4 + abs(t * np.log(beta))) * _norm(G_hat)
            amp = _norm(np.linalg.inv(np.eye(d) + S @ G_hat)) ** 2
            local = 3 * d * unit * (np.linalg.cond(S) + np.linalg.cond(A)) * _norm(S_new)
            e_S = amp * e_S + _norm(X) ** 2 * e_G_hat + local + unit * eta**2
        S = S_new
        ups.append(S @ g)
        if unit is not None:
            e_u = e_S * _norm(g) + 2 * d * unit * _norm(S) * _norm(g)
            tracked.append(Tracked(S @ g, e_u, unit))
    if unit is not None:
        return tracked, Tracked(S, e_S, unit)
    return ups, S
