r"""The variational online-Newton step: one leaf's arithmetic.

The mean and the precision of a diagonal Gaussian :math:`q = \mathcal N(m, v)`,
:math:`v = 1/(\lambda(h+\delta))`, move by the natural-gradient step of the
tempered evidence lower bound

.. math::
    \mathcal L(q) = \lambda\,\mathbb E_q[\bar\ell(\theta)]
    + \mathrm{KL}\big(q \,\|\, \mathcal N(0, 1/(\lambda\delta))\big),

with :math:`\bar\ell` the mean loss per example and λ the effective number of
examples (``num_data``). Per weight, with ĝ the batch gradient at a draw and
ĥ an estimate of the diagonal of the expected Hessian of :math:`\bar\ell`
under q:

.. math::
    g_t &= \beta_1 g_{t-1} + (1-\beta_1)\hat g_t, \\
    h_t &= \gamma h_{t-1} + (1-\gamma)\hat h_t
          + \tfrac12 (1-\gamma)^2 \frac{(h_{t-1}-\hat h_t)^2}{h_{t-1}+\delta}, \\
    m_t &= m_{t-1} - \alpha_t\,\frac{g_t/(1-\beta_1^t) + \delta\,m_{t-1}}{h_t+\delta}.

The third term of the precision update is the second-order correction of the
improved Bayesian learning rule (Lin et al., 2020), which keeps
:math:`h + \delta` positive whatever the sign of ĥ. With the
reparameterisation estimate :math:`\hat h = \hat g\,\varepsilon/\sqrt{v}` this
is IVON's Algorithm 1 (Shen et al., 2024) with ``lr·(h₀+δ)`` = α.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from bayesopt_jax._src import numerics
from bayesopt_jax._src.types import Array


def precision_step(h: Array, h_hat: Array, gamma: Any, delta: Array) -> Array:
    """The curvature h after one observation ĥ (the improved learning rule's update).

    ``delta`` is what the precision adds to h (the prior's δ, and 1/σ for a
    proximal step; infinite before a proximal step's first evidence, where the
    correction vanishes). h and ĥ are finite; the result is kept finite.
    """
    c = h.dtype
    one_minus = jnp.asarray(1 - gamma, c)
    gap = h - h_hat
    total = h + delta
    ratio = jnp.where(jnp.isinf(total), 0, gap / jnp.where(jnp.isinf(total), 1, total))
    correction = jnp.asarray(0.5, c) * one_minus * one_minus * gap * ratio
    return numerics.clip_finite(numerics.ema(h_hat, h, gamma) + correction)


def mean_step(m_hat: Array, p: Array, h: Array, alpha: Array, delta: Array, pull: Array) -> Array:
    """The mean's step ``α (ĝ + δ₀ p)/(h + δ)`` (to be subtracted); δ₀ ≤ δ is the zero-centred part."""
    return alpha * (m_hat + pull * p) / (h + delta)
