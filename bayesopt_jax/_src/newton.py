r"""The variational online-Newton step: one leaf's arithmetic.

The mean m and the precision of a diagonal Gaussian :math:`q = \mathcal N(m, v)`
move by the natural-gradient step of the evidence lower bound

.. math::
    \mathcal L(q) = N\,\mathbb E_q[\bar\ell(\theta)]
    + \mathrm{KL}\big(q \,\|\, p_t\big),

with :math:`\bar\ell` the mean loss per example and N the number of examples
(``num_data``). The prior :math:`p_t` has two parts: a zero-centred Gaussian
of precision :math:`N\delta_0` per weight, and a part centred at the current
mean of precision :math:`N(\delta - \delta_0) + N/\sigma_t`, where
:math:`\sigma_t` is the σ-filter's variance (learning-rate units; absent
without ``proximal_eta``). The second part does not pull the mean anywhere;
it is the belief a filter carries from one step to the next. Per weight,
with ĝ the batch gradient at a draw and ĥ an estimate of the diagonal of the
expected Hessian (or Fisher) of :math:`\bar\ell` under q:

.. math::
    g_t &= \beta_1 g_{t-1} + (1-\beta_1)\hat g_t, \\
    h_t &= \gamma h_{t-1} + (1-\gamma)\hat h_t
          + \tfrac12 (1-\gamma)^2 \frac{(h_{t-1}-\hat h_t)^2}{h_{t-1}+\delta+1/\sigma_{t-1}}, \\
    m_t &= m_{t-1} - \alpha_t\,\frac{g_t/(1-\beta_1^t) + \delta_0\,m_{t-1}}{h_t+\delta+1/\sigma_t},
    \qquad v_t = \frac{1}{N\,(h_t + \delta + 1/\sigma_t)} .

The third term of the precision update is the second-order correction of the
improved Bayesian learning rule (Lin et al., 2020), which keeps the precision
positive whatever the sign of ĥ; it is applied to the signed reparameterisation
estimate. The variance estimate :math:`\hat h = B'(\hat g - \hat m_{t-1})^2`
is never negative, so h stays a convex combination of non-negative terms and
needs no correction: there h is ``B'·r``, r the squared deviation's EMA that the
variational σ-filter keeps (and its native rule updates). Without the proximal part, with δ₀ = δ and
the reparameterisation estimate :math:`\hat h = \hat g\,\varepsilon/\sqrt{v}`,
this is IVON's Algorithm 1 (Shen et al., 2024), its learning rate being
α = ``lr·(h₀+δ)``. Where the data's curvature is small beside 1/σ, the mean
moves by :math:`\alpha\sigma_t \hat m_t`, the σ-filter's step, and the draws'
variance is σ/N: the step size read as a posterior variance.
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
