"""The σ-filter: RMSProp and Adam read as Bayesian filtering of the parameters.

Per parameter the filter keeps the evidence ``s`` (an EMA of squared
gradients, the diagonal of the expected Fisher) and the posterior variance
``σ`` of the belief about where the parameter should move:

    s_t = β s_{t-1} + (1-β) g_t²,      ŝ_t = s_t / (1-β^t)
    σ_t = 1/(ŝ_t + 1/σ_{t-1}) + η²     (prior variance inflated by η² per step)
    u_t = σ_t ⊙ d_t                    (d = g, or the debiased EMA of g if b1 > 0)

Its fixed point σ*(ŝ) = η²/2 + η·sqrt(η²/4 + 1/ŝ) is ≈ η/√ŝ for small η
(RMSProp with learning rate η) and ≈ η² for large η (SGD with learning rate η²).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from bayesopt_jax._src import allocation, buffers, engine, native, numerics, validation
from bayesopt_jax._src.native import rules
from bayesopt_jax._src.types import Array, PyTree, ScalarOrSchedule

DEFAULT_EPS = 1e-16


def sigma_star(evidence: Array, eta: Array | float) -> Array:
    r"""The fixed point of the σ recursion for constant evidence ``ŝ``.

    .. math::
        \sigma^*(\hat s) = \frac{\eta^2}{2} + \eta \sqrt{\frac{\eta^2}{4} + \frac{1}{\hat s}}

    Args:
      evidence: :math:`\hat s > 0` (array).
      eta: :math:`\eta \ge 0`.

    Returns:
      :math:`\sigma^*`, elementwise, in ``evidence``'s dtype.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import sigma_star
      >>> s = jnp.array([1e-4])
      >>> bool(jnp.allclose(sigma_star(s, 1e-3), 1e-3 / jnp.sqrt(s), rtol=1e-3))  # RMSProp regime
      True
    """
    evidence = jnp.asarray(evidence)
    eta = jnp.asarray(eta, numerics.real_dtype(numerics.compute_dtype(evidence.dtype)))
    eta2 = eta * eta
    return eta2 / 2 + eta * jnp.sqrt(eta2 / 4 + 1 / evidence)


def sigma_star_full(G: Array, eta: Array | float) -> Array:
    r"""Matrix fixed point :math:`\Sigma^* = \frac{\eta^2}{2} I + \eta (G^{-1} + \frac{\eta^2}{4} I)^{1/2}`.

    Computed from the eigendecomposition of the symmetric positive
    semi-definite ``G``: it shares ``G``'s eigenvectors and applies
    :func:`sigma_star` to each eigenvalue. Eigenvalues that rounding pushes
    to zero or below are floored at the dtype's smallest normal number, so
    an ill-conditioned ``G`` gives a large but finite variance along its
    null directions rather than NaN.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import sigma_star, sigma_star_full
      >>> S = sigma_star_full(jnp.diag(jnp.array([1.0, 4.0])), 0.1)
      >>> bool(jnp.allclose(jnp.diag(S), sigma_star(jnp.array([1.0, 4.0]), 0.1)))
      True
    """
    lam, V = jnp.linalg.eigh(G)
    lam = jnp.maximum(lam, jnp.finfo(lam.dtype).tiny)
    return (V * sigma_star(lam, eta)) @ V.T


def eta_at(eta: ScalarOrSchedule, count: Array) -> Array:
    return eta(count) if callable(eta) else eta


def check_sigma_args(
    where,
    eta,
    beta,
    b1,
    eps,
    sigma_init=None,
    sigma_max=None,
    max_ratio=None,
    *,
    filter_start=False,
):
    """The σ-filters' arguments; ``filter_start``: σ starts at its fixed point when
    ``sigma_init`` is ``None``, which needs a constant η > 0."""
    if not callable(eta):
        validation.check_nonnegative("eta", eta, where)
    if filter_start and sigma_init is None and not callable(eta):
        validation.check_range(
            "eta", eta, low=0.0, low_inclusive=False, where=where + " (with sigma_init=None)"
        )
    validation.check_decay("beta", beta, where)
    validation.check_decay("b1", b1, where)
    validation.check_range("eps", eps, low=0.0, low_inclusive=False, where=where)
    if sigma_init is not None:
        validation.check_range("sigma_init", sigma_init, low=0.0, low_inclusive=False, where=where)
    if sigma_max is not None:
        validation.check_range("sigma_max", sigma_max, low=0.0, low_inclusive=False, where=where)
    if max_ratio is not None:
        validation.check_range("max_ratio", max_ratio, low=1.0, where=where)


def filter_rule(sigma_init, sigma_max, max_ratio) -> Callable[..., Array]:
    """The filter's σ step ``(prev, ŝ, η, t) -> σ_t``, with its start and guards.

    Shared by :func:`scale_by_sigma_filter` and the variational σ-filter.
    """

    def new_sigma(prev, s_hat, e, count):
        sig_new = prev / (1 + s_hat * prev) + e * e
        if sigma_init is None or max_ratio is not None:
            star = sigma_star(s_hat, e)
        if sigma_init is None:
            sig_new = jnp.where(count == 1, star, sig_new)
        if max_ratio is not None:
            capped = jnp.minimum(sig_new, jnp.asarray(max_ratio, s_hat.dtype) * star)
            sig_new = jnp.where(e > 0, capped, sig_new)
        if sigma_max is not None:
            sig_new = jnp.minimum(sig_new, jnp.asarray(sigma_max, s_hat.dtype))
        return sig_new

    return new_sigma


def evidence_and_direction(g, m, s, debias, *, beta, b1, bias_correction, eps):
    """Shared by the filter and the fixed point: new moments, ŝ (floored) and d."""
    c = numerics.compute_dtype(g.dtype)
    rc = numerics.real_dtype(c)
    gc = numerics.to_compute(g)
    s_new = numerics.ema(numerics.abs_sq(gc), s.astype(rc), beta)
    s_hat = s_new / debias(beta, c) if bias_correction else s_new
    s_hat = s_hat + jnp.asarray(eps, rc)
    if m is None:
        return s_new, s_hat, None, numerics.to_compute_again(g)
    m_new = numerics.ema(gc, m.astype(c), b1)
    d = m_new / debias(b1, c) if bias_correction else m_new
    return s_new, s_hat, m_new, d


class ScaleBySigmaFilterState(NamedTuple):
    """State of :func:`scale_by_sigma_filter` and :func:`scale_by_sigma_fixed_point`.

    Attributes:
      count: number of updates so far (int32, saturating).
      mu: EMA of gradients when ``b1`` is not a plain 0, otherwise ``None``.
      nu: the evidence ``s``, an EMA of squared gradient magnitudes.
      sigma: the posterior variance σ after the last update (0 before the
        first update when ``sigma_init=None``).
    """

    count: Array
    mu: PyTree
    nu: PyTree
    sigma: PyTree


class StateDtypes(NamedTuple):
    """Storage of the filter's buffers: dtypes, or formats such as :class:`~bayesopt_jax.Blockwise8`."""

    mu: Any = None
    nu: Any = None
    sigma: Any = None

    def check(self, where: str) -> None:
        for name, dtype in zip(("mu_dtype", "nu_dtype", "sigma_dtype"), self, strict=True):
            allocation.check_state_dtype(name, dtype, where)


# The filter's state buffers, in the order of its rule's arguments: the
# gradient mean (signed; off without momentum), the evidence, σ.
SLOTS = (
    engine.Slot("mu", signed=True, dtype_arg="mu_dtype", optional=True),
    engine.Slot("nu", dtype_arg="nu_dtype"),
    engine.Slot("sigma", dtype_arg="sigma_dtype"),
)


def init_sigma_state(params, b1, sigma_init, dtypes=None, where="scale_by_sigma_filter"):
    dtypes = StateDtypes() if dtypes is None else dtypes
    mu_slot, nu_slot, sigma_slot = SLOTS
    mu = None if validation.is_static_zero(b1) else mu_slot.allocate(params, dtypes.mu, where)
    sigma = sigma_slot.allocate(params, dtypes.sigma, where, value=sigma_init)
    nu = nu_slot.allocate(params, dtypes.nu, where)
    return ScaleBySigmaFilterState(count=buffers.zero_count(), mu=mu, nu=nu, sigma=sigma)


class Guards(NamedTuple):
    """How σ is formed from the filter step: the start and the caps (see :func:`filter_rule`)."""

    sigma_init: Any = None
    sigma_max: Any = None
    max_ratio: Any = None
    fixed_point: bool = False


def filter_scalars(
    guards, eta_t, count, beta, b1, bias_correction, eps, *more_statics
) -> rules.SigmaScalars | None:
    """The native σ-filter rules' scalars for these settings, or ``None`` (no native path).

    Formed as the pure path forms them. ``eta`` may be traced (a schedule);
    the rest, and ``more_statics``, must be Python numbers.
    """
    statics = [beta, b1, eps, *more_statics]
    statics += [x for x in (guards.max_ratio, guards.sigma_max) if x is not None]
    if not engine.python_numbers(*statics) or not native.use_native():
        return None
    f32 = jnp.float32
    debias = numerics.Debias(count)
    momentum = not validation.is_static_zero(b1)
    # Reciprocals of the corrections: the kernel multiplies (within the
    # rounding bound of the pure path's division; see tests/test_native.py).
    rs = 1 / debias(beta, f32) if bias_correction else 1.0
    rm = 1 / debias(b1, f32) if bias_correction and momentum else 1.0
    e = jnp.asarray(eta_t, f32)
    first = (count == 1) if guards.sigma_init is None else False
    ratio_on = (e > 0) if guards.max_ratio is not None else False
    return rules.SigmaScalars(
        beta=beta, one_minus_beta=1 - beta, rs=rs, floor=eps, eta=e, eta2=e * e, first=first,
        ratio_on=ratio_on, kappa=guards.max_ratio or 0.0, max_on=guards.sigma_max is not None,
        sigma_max=guards.sigma_max or 0.0, fixed_point=guards.fixed_point,
        clip=numerics.clip_limit(f32), b1=b1, one_minus_b1=1 - b1, rm=rm,
    )  # fmt: skip


def _kernel(guards, eta_t, count, beta, b1, bias_correction, eps):
    """The native "sigma"/"sigma_momentum" rule for these settings, or ``None``."""
    scalars = filter_scalars(guards, eta_t, count, beta, b1, bias_correction, eps)
    if scalars is None:
        return None
    if not validation.is_static_zero(b1):
        return engine.Kernel("sigma_momentum", scalars, finish_momentum)
    return engine.Kernel("sigma", scalars, finish)


def finish(sc, g, s, sig):
    """u = σ·g (g clipped as the kernel clips it) from the kernel's new state."""
    return sig * numerics.to_compute_again(g)


def finish_momentum(sc: rules.SigmaScalars, g, m, s, sig):
    """u = σ·m/(1-b1^t) from the kernel's new state."""
    return sig * (m * sc.rm)


def filter_leaf(args, new_sigma, beta, b1, bias_correction, eps) -> Callable[..., tuple]:
    """The filter's per-leaf rule ``leaf(g, m, s, σ) -> (u, m, s, σ)`` for ``args = (count, η_t)``.

    The one statement of the σ-filter's step, shared by the filter, the fixed
    point (through ``new_sigma``) and the variational filter.
    """
    count, eta_t = args
    debias = numerics.Debias(count)

    def leaf(g, m, s, sig):
        s_new, s_hat, m_new, d = evidence_and_direction(
            g, m, s, debias, beta=beta, b1=b1, bias_correction=bias_correction, eps=eps
        )
        e = jnp.asarray(eta_t, s_hat.dtype)
        sig_new = new_sigma(sig.astype(s_hat.dtype), s_hat, e, count)
        m_out = None if m_new is None else numerics.store(m_new, m.dtype)
        u = numerics.store(sig_new * d, g.dtype)
        return u, m_out, numerics.store(s_new, s.dtype), numerics.store(sig_new, sig.dtype)

    return leaf


def _sigma_transformation(where, guards, eta, beta, b1, bias_correction, eps, dtypes):
    """The shared skeleton: evidence, direction, σ by ``guards``, u = σ d."""
    if guards.fixed_point:

        def new_sigma(prev, s_hat, e, count):
            del prev, count
            return sigma_star(s_hat, e)

    else:
        new_sigma = filter_rule(guards.sigma_init, guards.sigma_max, guards.max_ratio)

    def init_fn(params):
        return init_sigma_state(params, b1, guards.sigma_init, dtypes, where)

    def make_leaf(args):
        return filter_leaf(args, new_sigma, beta, b1, bias_correction, eps)

    def prepare(state):
        count = optax.safe_increment(state.count)
        eta_t = eta_at(eta, state.count)
        kernel = _kernel(guards, eta_t, count, beta, b1, bias_correction, eps)
        return engine.Prepared(make_leaf, (count, eta_t), kernel, {"count": count})

    return engine.elementwise(where, SLOTS, init_fn, prepare)


def scale_by_sigma_filter(
    eta: ScalarOrSchedule,
    beta: float | Array = 0.999,
    *,
    b1: float | Array = 0.0,
    sigma_init: float | Array | None = None,
    bias_correction: bool = True,
    eps: float | Array = DEFAULT_EPS,
    sigma_max: float | Array | None = None,
    max_ratio: float | Array | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    sigma_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""The diagonal σ-filter: a per-parameter posterior variance scales the gradient.

    .. math::
        s_t &= \beta s_{t-1} + (1-\beta) |g_t|^2, \qquad
        \hat s_t = s_t / (1-\beta^t) + \epsilon \\
        \sigma_t &= \frac{1}{\hat s_t + 1/\sigma_{t-1}} + \eta^2
                  = \frac{\sigma_{t-1}}{1 + \hat s_t \sigma_{t-1}} + \eta^2 \\
        u_t &= \sigma_t\, d_t, \qquad d_t = g_t \ (b_1 = 0)\ \text{or}\
               \frac{m_t}{1-b_1^t},\ m_t = b_1 m_{t-1} + (1-b_1) g_t

    ``sigma_init=None`` starts at the fixed point of the first evidence,
    :math:`\sigma_1 = \sigma^*(\hat s_1)` (see :func:`sigma_star`). With
    :math:`\eta = 0` the precision accumulates exactly,
    :math:`\sigma_t^{-1} = \sigma_{t-1}^{-1} + \hat s_t` (an online natural
    gradient step with a 1/t learning rate), which needs ``sigma_init > 0``.

    This transformation applies the raw equations; only the evidence floor
    ``eps`` (which keeps every value finite when :math:`\hat s = 0`) is on by
    default. Guards, both off by default:

    - ``max_ratio`` κ ≥ 1: :math:`\sigma_t \le \kappa\,\sigma^*(\hat s_t)` when
      :math:`\eta > 0`. Exact wherever the filter is within a factor κ of its
      own equilibrium; it removes the hazard of σ having grown (by η² a step,
      or from a fixed point of ~zero evidence) while no gradient arrived,
      which otherwise gives steps of about :math:`1/((1-\beta)|g|)`. With it,
      a step is at most :math:`\kappa(\eta^2 |d| + \eta |d| / \sqrt{\hat s})`,
      i.e. κ times an RMSProp step. :func:`~bayesopt_jax.sigma_filter` turns
      it on.
    - ``sigma_max``: an absolute cap on σ (in learning-rate units).

    The update does not descend by itself: follow it with a negative learning
    rate, or use :func:`~bayesopt_jax.sigma_filter`.

    Args:
      eta: :math:`\eta \ge 0`, the prior standard deviation added per step, or
        a schedule of the step count (a decaying η is growing confidence).
      beta: decay of the evidence EMA, in [0, 1).
      b1: decay of the gradient EMA; a plain 0 keeps no first moment.
      sigma_init: :math:`\sigma_0 > 0`, or ``None`` for the fixed point of the
        first evidence.
      bias_correction: divide ``s`` (and ``m``) by :math:`1-\beta^t` (:math:`1-b_1^t`).
      eps: evidence floor > 0 added to :math:`\hat s`.
      sigma_max: optional absolute cap on σ.
      max_ratio: optional κ ≥ 1 for the cap relative to the fixed point.
      mu_dtype: storage of ``m``: ``None`` (the parameter's dtype), a dtype,
        or :class:`~bayesopt_jax.Blockwise8` (8-bit codes, one scale per
        block; the rule runs in float32 on the decoded values).
      nu_dtype: storage of the evidence ``s``, likewise.
      sigma_dtype: storage of σ, likewise.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySigmaFilterState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_sigma_filter, sigma_star
      >>> tx = scale_by_sigma_filter(eta=0.1, beta=0.0)
      >>> s = tx.init(jnp.zeros(1))
      >>> for _ in range(200):  # constant |g| = 2: σ converges to σ*(4)
      ...     u, s = tx.update(jnp.array([2.0]), s)
      >>> bool(jnp.allclose(s.sigma, sigma_star(jnp.array([4.0]), 0.1)))
      True

    References:
      Aitchison, *Bayesian filtering unifies adaptive and non-adaptive neural
      network optimization methods*, NeurIPS 2020. https://arxiv.org/abs/1807.07540 ;
      Plumerault, *Why is the Adam Optimizer Working so Well?* (2026), the
      derivation this implements.
    """
    where = "scale_by_sigma_filter"
    check_sigma_args(where, eta, beta, b1, eps, sigma_init, sigma_max, max_ratio, filter_start=True)

    dtypes = StateDtypes(mu_dtype, nu_dtype, sigma_dtype)
    dtypes.check(where)
    guards = Guards(sigma_init, sigma_max, max_ratio)
    return _sigma_transformation(where, guards, eta, beta, b1, bias_correction, eps, dtypes)


def scale_by_sigma_fixed_point(
    eta: ScalarOrSchedule,
    beta: float | Array = 0.999,
    *,
    b1: float | Array = 0.0,
    bias_correction: bool = True,
    eps: float | Array = DEFAULT_EPS,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    sigma_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Scales the gradient by the closed-form fixed point of the σ-filter.

    .. math::
        \hat s_t = \frac{s_t}{1-\beta^t} + \epsilon, \qquad
        \sigma_t = \frac{\eta^2}{2} + \eta\sqrt{\frac{\eta^2}{4} + \frac{1}{\hat s_t}}, \qquad
        u_t = \sigma_t\, d_t

    It moves smoothly from RMSProp (:math:`\sigma \approx \eta/\sqrt{\hat s}`
    when :math:`\eta^2 \hat s \ll 4`) to SGD with learning rate :math:`\eta^2`
    (when :math:`\eta^2 \hat s \gg 4`). Because ŝ includes the current
    gradient, a step is at most :math:`\eta^2|d| + \eta |d|/\sqrt{\hat s}`: no
    hazard after long runs of zero gradients.

    Args:
      eta: :math:`\eta \ge 0` or a schedule of the step count.
      beta: decay of the evidence EMA, in [0, 1).
      b1: decay of the gradient EMA; a plain 0 keeps no first moment.
      bias_correction: divide the EMAs by :math:`1-\beta^t`, :math:`1-b_1^t`.
      eps: evidence floor > 0.
      mu_dtype: storage of ``m``, as in :func:`scale_by_sigma_filter`.
      nu_dtype: storage of ``s``, likewise.
      sigma_dtype: storage of σ, likewise.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySigmaFilterState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_sigma_fixed_point
      >>> tx = scale_by_sigma_fixed_point(eta=100.0, beta=0.0)  # SGD regime
      >>> u, _ = tx.update(jnp.array([3.0]), tx.init(jnp.zeros(1)))
      >>> bool(jnp.allclose(u, 100.0**2 * 3.0, rtol=1e-3))
      True
    """
    where = "scale_by_sigma_fixed_point"
    check_sigma_args(where, eta, beta, b1, eps)

    dtypes = StateDtypes(mu_dtype, nu_dtype, sigma_dtype)
    dtypes.check(where)
    guards = Guards(fixed_point=True)
    return _sigma_transformation(where, guards, eta, beta, b1, bias_correction, eps, dtypes)


def full_posterior_step(sigma: Array, G_hat: Array, eta: Array | float) -> Array:
    r"""One full-matrix step :math:`(\hat G + \Sigma^{-1})^{-1} + \eta^2 I` without inverses.

    See :func:`scale_by_sigma_filter_full` for the factorisation used.
    """
    eye = jnp.eye(sigma.shape[0], dtype=sigma.dtype)
    L = jnp.linalg.cholesky(sigma)
    M = eye + L.T @ G_hat @ L
    C = jnp.linalg.cholesky((M + M.T) / 2)
    K = jax.scipy.linalg.solve_triangular(C, L.T, lower=True)
    e = jnp.asarray(eta, sigma.dtype)
    return K.T @ K + e * e * eye


class ScaleBySigmaFilterFullState(NamedTuple):
    """State of :func:`scale_by_sigma_filter_full`.

    Attributes:
      count: number of updates so far.
      nu: the evidence matrix ``G`` (d × d, d = number of parameters).
      sigma: the posterior covariance ``Σ`` (d × d).
    """

    count: Array
    nu: Array
    sigma: Array


def scale_by_sigma_filter_full(
    eta: ScalarOrSchedule,
    beta: float | Array = 0.999,
    *,
    sigma_init: float | Array = 1.0,
) -> optax.GradientTransformation:
    r"""The full-matrix σ-filter over the raveled parameter vector (small models).

    .. math::
        G_t &= \beta G_{t-1} + (1-\beta) g_t g_t^\top, \qquad \hat G_t = G_t / (1-\beta^t) \\
        \Sigma_t &= (\hat G_t + \Sigma_{t-1}^{-1})^{-1} + \eta^2 I, \qquad u_t = \Sigma_t g_t

    with :math:`\Sigma_0 = \sigma_{init} I`. No inverse is formed: with
    :math:`\Sigma_{t-1} = L L^\top` and :math:`I + L^\top \hat G_t L = C C^\top`
    (both Cholesky factorisations; the second matrix has eigenvalues ≥ 1, so
    it is well conditioned), :math:`(\hat G_t + \Sigma_{t-1}^{-1})^{-1} = K^\top K`
    with :math:`K = C^{-1} L^\top`, symmetric positive semi-definite by
    construction. Cost: :math:`O(d^3)` per step and :math:`2 d^2` floats of
    state; meant for d up to a few thousand. Real parameters only.

    Its fixed point for constant :math:`G` is :func:`sigma_star_full`.

    Args:
      eta: :math:`\eta \ge 0` or a schedule of the step count.
      beta: decay of the evidence EMA, in [0, 1).
      sigma_init: :math:`\sigma_{init} > 0`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleBySigmaFilterFullState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_sigma_filter_full
      >>> tx = scale_by_sigma_filter_full(eta=0.0, beta=0.0, sigma_init=1.0)
      >>> u, s = tx.update({"a": jnp.array([1.0, 0.0])}, tx.init({"a": jnp.zeros(2)}))
      >>> s.sigma.round(4).tolist()  # precision 1 + g gᵀ along the first axis
      [[0.5, 0.0], [0.0, 1.0]]
    """
    where = "scale_by_sigma_filter_full"
    check_sigma_args(where, eta, beta, 0.0, 1.0, sigma_init)

    def init_fn(params):
        flat, _ = ravel_pytree(params)
        c = numerics.compute_dtype(flat.dtype)
        d = flat.shape[0]
        eye = jnp.eye(d, dtype=c)
        return ScaleBySigmaFilterFullState(
            count=buffers.zero_count(),
            nu=jnp.zeros((d, d), c),
            sigma=eye * jnp.asarray(sigma_init, c),
        )

    def update_fn(updates, state, params=None):
        del params
        flat, unravel = ravel_pytree(updates)
        if flat.shape[0] != state.nu.shape[0]:
            raise ValueError(
                f"{where}: the updates have {flat.shape[0]} entries but the state was "
                f"initialised for {state.nu.shape[0]}."
            )
        count = optax.safe_increment(state.count)
        c = state.nu.dtype
        g = numerics.to_compute(flat).astype(c)
        b = jnp.asarray(beta, c)
        G = b * state.nu + jnp.asarray(1 - beta, c) * jnp.outer(g, g)
        G_hat = G / numerics.debias_factor(beta, count, c)
        sigma = full_posterior_step(state.sigma, G_hat, eta_at(eta, state.count))
        u = unravel((sigma @ g).astype(flat.dtype))
        return u, ScaleBySigmaFilterFullState(count=count, nu=G, sigma=sigma)

    return optax.GradientTransformation(init_fn, update_fn)
