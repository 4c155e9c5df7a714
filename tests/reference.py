"""Float64 NumPy transcriptions of the update rules, written from the equations.

Each function takes a list of gradient arrays (one per step) and returns the
list of updates (before the learning rate). They are deliberately naive loops
with no shared code with the package, so they serve as an independent check.
"""

from __future__ import annotations

import numpy as np


def _sq(g):
    return np.real(g * np.conj(g))


def adam(grads, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, bias_correction=True, nesterov=False):
    m = np.zeros_like(grads[0])
    v = np.zeros_like(np.real(grads[0]))
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * _sq(g)
        if bias_correction:
            if nesterov:
                m_hat = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t)
            else:
                m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
        else:
            m_hat = b1 * m + (1 - b1) * g if nesterov else m
            v_hat = v
        out.append(m_hat / (np.sqrt(v_hat + eps_root) + eps))
    return out


def amsgrad(grads, b1=0.9, b2=0.999, eps=1e-8, eps_root=0.0, max_of="raw", bias_correction=True):
    m = np.zeros_like(grads[0])
    v = np.zeros_like(grads[0])
    vmax = np.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        if not bias_correction:
            vmax = np.maximum(vmax, v)
            out.append(m / (np.sqrt(vmax + eps_root) + eps))
            continue
        m_hat = m / (1 - b1**t)
        if max_of == "raw":
            vmax = np.maximum(vmax, v)
            denom = np.sqrt(vmax / (1 - b2**t) + eps_root) + eps
        else:
            vmax = np.maximum(vmax, v / (1 - b2**t))
            denom = np.sqrt(vmax + eps_root) + eps
        out.append(m_hat / denom)
    return out


def adamax(grads, b1=0.9, b2=0.999, eps=1e-8):
    m = np.zeros_like(grads[0])
    u = np.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        m = b1 * m + (1 - b1) * g
        u = np.maximum(b2 * u, np.abs(g) + eps)
        out.append(m / (1 - b1**t) / u)
    return out


def rms(grads, decay=0.9, eps=1e-8, eps_in_sqrt=False, bias_correction=False, centered=False):
    v = np.zeros_like(grads[0])
    m = np.zeros_like(grads[0])
    out = []
    for t, g in enumerate(grads, start=1):
        v = decay * v + (1 - decay) * g * g
        m = decay * m + (1 - decay) * g
        c = 1 - decay**t if bias_correction else 1.0
        s = v / c
        if centered:
            s = np.maximum(s - (m / c) ** 2, 0.0)  # documented clip at 0
        denom = np.sqrt(s + eps) if eps_in_sqrt else np.sqrt(s) + eps
        out.append(g / denom)
    return out


def rss(grads, initial_accumulator_value=0.0, eps=1e-10):
    a = np.full_like(grads[0], initial_accumulator_value)
    out = []
    for g in grads:
        a = a + g * g
        out.append(g / (np.sqrt(a) + eps))
    return out


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
        s_hat = (s / (1 - beta**t) if bias_correction else s) + eps
        star = eta**2 / 2 + eta * np.sqrt(eta**2 / 4 + 1 / s_hat)
        if sig is None:
            sig = star
        else:
            sig = 1 / (s_hat + 1 / sig) + eta**2
        if max_ratio is not None and eta > 0:
            sig = np.minimum(sig, max_ratio * star)
        if b1 > 0:
            m = b1 * m + (1 - b1) * g
            d = m / (1 - b1**t) if bias_correction else m
        else:
            d = g
        ups.append(sig * d)
        sigs.append(sig.copy())
    return ups, sigs


def sigma_filter_full(grads, eta, beta, sigma_init):
    """The full-matrix σ-filter with explicit inverses (float64)."""
    d = grads[0].size
    G = np.zeros((d, d))
    S = np.eye(d) * sigma_init
    ups = []
    for t, g in enumerate(grads, start=1):
        G = beta * G + (1 - beta) * np.outer(g, g)
        G_hat = G / (1 - beta**t)
        S = np.linalg.inv(G_hat + np.linalg.inv(S)) + eta**2 * np.eye(d)
        ups.append(S @ g)
    return ups, S
