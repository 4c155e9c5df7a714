"""The variational σ-filter: the filter's step, taken at draws from a data-set posterior.

Per parameter the state keeps the σ-filter's moments (``mu``, ``nu``, ``sigma``)
and defines a Gaussian posterior over the weights of the whole data set,

    q(θ) = N(θ̄, v),   v = 1 / (N (h + δ)),

with N the number of training examples, δ the prior precision per example
(one per leaf; fixed, or learned by empirical Bayes) and h ≥ 0 a
per-example curvature estimate: by default the variance of a single
example's gradient at the draws, ``B·EMA[(g − m̂)²]`` (``"variance"``); or
an EMA of the reparameterisation estimate ``ε (g − m̂) / √v``
(``"reparam"``); or ``B ŝ`` from the filter's own evidence
(``"evidence"``). Each step draws
``θ̃ = θ̄ + √v ⊙ ε`` (:func:`training_sample`), the user takes the gradient
there, and the update moves the mean by the filter's ``σ_t ⊙ d_t``. The
noise ε of step t is a function of the state's key and step count alone.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesopt_jax._src import (
    buffers,
    draws,
    engine,
    native,
    newton,
    numerics,
    quantize,
    sigma,
    validation,
)
from bayesopt_jax._src.native import rules
from bayesopt_jax._src.types import Array, PyTree, ScalarOrSchedule

CURVATURES = ("variance", "reparam", "evidence")
MEAN_STEPS = ("filter", "newton")
NEWTON_CURVATURES = ("variance", "reparam")
DEFAULT_ETA = 3e-3
DEFAULT_HESS_DECAY = 0.99
DEFAULT_PRIOR_PRECISION = 2.0
DEFAULT_HESS_INIT = 0.5
# variational_newton's defaults (the σ-filter documentation says how they were chosen)
NEWTON_LEARNING_RATE = 1.0
NEWTON_PRIOR_PRECISION = 0.01
NEWTON_WEIGHT_DECAY = 1e-3
NEWTON_PROXIMAL_ETA = 3e-3


class ScaleByVariationalSigmaFilterState(NamedTuple):
    """State of :func:`scale_by_variational_sigma_filter`.

    Attributes:
      count: number of updates so far (int32, saturating).
      key: raw ``uint32`` data of the PRNG key the training noise derives from
        (constant; the noise of step t derives from ``fold_in(key, count)``, see
        :func:`noise_tree`).
      mu: EMA of gradients when ``b1`` is not a plain 0, otherwise ``None``.
      nu: the evidence ``s``, an EMA of squared gradients.
      sigma: the filter's step variance σ (learning-rate units).
      hess: the curvature EMA r (not debiased) for ``curvature="variance"``
        or ``"reparam"``, otherwise ``None``.
      num_data: N as a scalar (float64 under ``jax_enable_x64``, else float32).
      prior_precision: δ per example, a vector with one entry per parameter
        leaf (in ``jax.tree.leaves`` order of ``nu``); learned from the data
        when the transformation was built with ``prior_precision=None``.
      curvature_scale: the factor that turns the stored curvature buffer
        into the per-example curvature h (0 before the first update):
        ``B/(1 - γ^t)/(1 + (1 - b1)/(1 + b1))`` for the ``"variance"``
        ``hess``, ``1/(1 - γ^t)`` for the ``"reparam"`` one, ``B/(1 - β^t)``
        for ``nu``.
    """

    count: Array
    key: Array
    mu: PyTree
    nu: PyTree
    sigma: PyTree
    hess: PyTree
    num_data: Array
    prior_precision: Array
    curvature_scale: Array

    # one value per leaf, not an array per parameter (for the tree checks)
    not_per_parameter = ("prior_precision",)


class ScaleByVariationalNewtonState(ScaleByVariationalSigmaFilterState):
    """State of ``mean_step="newton"``: the same fields, read differently.

    For ``curvature="variance"``, ``hess`` is r, the EMA of (g − m̂_{t−1})²
    (not debiased; it starts at ``hess_init/curvature_scale``), and
    ``curvature_scale`` is B/(1 + (1 − b1)/(1 + b1)), constant: h =
    ``curvature_scale``·r, as in the variational σ-filter's state. For
    ``"reparam"``, ``hess`` is h itself (``curvature_scale`` is 1). Where the
    step has a proximal part (``proximal_eta``), ``nu`` and ``sigma`` are the
    σ-filter's evidence and σ, and 1/σ is added to the per-example
    precision: v = 1/(N(h + 1/σ + δ)). Otherwise both are ``None``.
    σ is 0 until the first update (the filter starts at the fixed point of its
    first evidence), so v is 0 then: the first draw is the mean itself.
    """

    __slots__ = ()


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def _is_leaf(x: Any) -> bool:
    return _is_masked(x) or x is None


def decoded_state(
    state: ScaleByVariationalSigmaFilterState,
) -> ScaleByVariationalSigmaFilterState:
    """``state`` with its filter buffers in float32 where they are stored in 8 bits."""
    return state._replace(
        mu=quantize.decoded(state.mu),
        nu=quantize.decoded(state.nu),
        sigma=quantize.decoded(state.sigma),
        hess=quantize.decoded(state.hess),
    )


def _curvature_buffer(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    return state.hess if state.hess is not None else state.nu


def _shape_buffer(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """The buffer whose leaves set the noise's shapes and dtypes: the evidence where there is one."""
    return state.nu if state.nu is not None else state.hess


def _leaf_curvature(buf: Array, state: ScaleByVariationalSigmaFilterState) -> Array:
    """h ≥ 0, the per-example curvature, for one leaf in its compute dtype."""
    return _leaf_curvature_at(buf, state.curvature_scale)


def _leaf_curvature_at(buf: Array, scale: Array) -> Array:
    c = numerics.real_dtype(numerics.compute_dtype(buf.dtype))
    return jnp.maximum(jnp.asarray(scale, c) * buf.astype(c), 0)


def _leaf_variance(h: Array, delta: Array, num_data: Array) -> Array:
    """v = 1 / (N (h + δ)) for one leaf."""
    c = h.dtype
    return 1 / (jnp.asarray(num_data, c) * (h + jnp.asarray(delta, c)))


def curvature_tree(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """The per-example curvature h ≥ 0 behind the variance, one array per leaf."""
    state = decoded_state(state)
    return jax.tree.map(
        lambda b: b if _is_masked(b) else _leaf_curvature(b, state),
        _curvature_buffer(state),
        is_leaf=_is_masked,
    )


def _has_proximal(state: ScaleByVariationalSigmaFilterState) -> bool:
    return isinstance(state, ScaleByVariationalNewtonState) and state.sigma is not None


def _precision_leaf(h: Array, sig: Array) -> Array:
    """h + 1/σ, in h's compute dtype."""
    return h + 1 / sig.astype(h.dtype)


def precision_tree(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """The per-example precision less the prior's δ: h, plus 1/σ where the step is proximal."""
    h = curvature_tree(state)
    if not _has_proximal(state):
        return h
    return jax.tree.map(
        lambda a, b: a if _is_masked(a) else _precision_leaf(a, b),
        h,
        quantize.decoded(state.sigma),
        is_leaf=_is_masked,
    )


def _as_tree(vector: Array, like: PyTree) -> PyTree:
    """One entry of ``vector`` per array leaf of ``like`` (masked nodes kept)."""
    leaves, treedef = jax.tree.flatten(like)
    return treedef.unflatten([vector[i] for i in range(len(leaves))])


def _as_vector(tree: PyTree, dtype: Any) -> Array:
    leaves = [jnp.asarray(x, dtype) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves) if leaves else jnp.zeros((0,), dtype)


def prior_precision_tree(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """δ per leaf as a tree of scalars like the parameters (``MaskedNode`` where masked out)."""
    return _as_tree(state.prior_precision, _shape_buffer(decoded_state(state)))


def variance_tree(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """The sampled variance v for every leaf (``MaskedNode`` where masked out)."""
    return jax.tree.map(
        lambda h, d: h if _is_masked(h) else _leaf_variance(h, d, state.num_data),
        precision_tree(state),
        prior_precision_tree(state),
        is_leaf=_is_masked,
    )


def noise_tree(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """The standard normal ε of the coming step, one array per (unmasked) leaf.

    Depends only on ``state.key``, ``state.count`` and each entry's position:
    the same state gives the same noise on any device layout. One threefry
    draw per step gives every leaf its key words; each entry's value is a
    keyed hash of its index (:mod:`bayesopt_jax._src.draws`).
    """
    leaves, treedef = jax.tree.flatten(_shape_buffer(decoded_state(state)))
    words = draws.step_words(state.key, state.count, len(leaves))
    out = [
        draws.normal(words[i], x.shape, numerics.real_dtype(numerics.compute_dtype(x.dtype)))
        for i, x in enumerate(leaves)
    ]
    return treedef.unflatten(out)


def _sample_leaf(p, buf, scale, delta, num_data, words, noise_dtype, sig=None):
    """``θ̄ + √v ⊙ ε`` for one leaf, in ``p``'s dtype: the pure statement of the draw.

    v = 1/(N(h + δ)) with h = max(scale·buf, 0), plus 1/σ in the precision
    where ``sig`` (the proximal part's σ) is given.
    """
    h = _leaf_curvature_at(buf, scale)
    if sig is not None:
        h = _precision_leaf(h, sig)
    e = draws.normal(words, buf.shape, noise_dtype)
    p = jnp.asarray(p)
    return (p.astype(e.dtype) + jnp.sqrt(_leaf_variance(h, delta, num_data)) * e).astype(p.dtype)


def perturb(params: PyTree, state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """``θ̄ + √v ⊙ ε`` with the state's variance and coming noise, in ``params``' dtypes.

    On the CPU, float32 leaves go through the native kernel, which draws ε
    itself: the same bits and uniform ``u`` as :func:`noise_tree`, and ε
    within the float32 error of erf⁻¹ of the pure value (see
    :mod:`bayesopt_jax._src.draws`). Other leaves take the pure statement.
    The kernel reads the curvature buffer and, for a proximal step, σ.
    """
    state = decoded_state(state)
    bufs, treedef = jax.tree.flatten(_curvature_buffer(state), is_leaf=_is_masked)
    ps = treedef.flatten_up_to(params)
    nus = treedef.flatten_up_to(_shape_buffer(state))
    proximal = _has_proximal(state)
    sigs = treedef.flatten_up_to(state.sigma) if proximal else [None] * len(bufs)
    live = [i for i, b in enumerate(bufs) if not _is_masked(b)]  # one δ and words each
    words = draws.step_words(state.key, state.count, len(live))
    out = list(ps)
    fast = []
    use = native.use_native()
    for n, i in enumerate(live):
        noise_dtype = numerics.real_dtype(numerics.compute_dtype(nus[i].dtype))
        extra = (sigs[i],) if proximal else ()
        if use and noise_dtype == jnp.float32 and native.is_sample_leaf(ps[i], bufs[i], *extra):
            fast.append((n, i))
            continue
        out[i] = _sample_leaf(
            ps[i],
            bufs[i],
            state.curvature_scale,
            state.prior_precision[n],
            state.num_data,
            words[n],
            noise_dtype,
            sigs[i],
        )
    if fast:
        picked = [n for n, _ in fast]
        deltas = jnp.asarray(state.prior_precision, jnp.float32)
        if len(picked) < len(live):
            deltas, words = deltas[jnp.asarray(picked)], words[jnp.asarray(picked)]
        scalars = jnp.stack([jnp.asarray(state.num_data, jnp.float32),
                             jnp.asarray(state.curvature_scale, jnp.float32)])  # fmt: skip
        drawn = _native_sample(
            scalars,
            deltas,
            words,
            [ps[i] for _, i in fast],
            [bufs[i] for _, i in fast],
            [sigs[i] for _, i in fast] if proximal else None,
        )
        for (_, i), x in zip(fast, drawn, strict=True):
            out[i] = x
    return treedef.unflatten(out)


def _native_sample(scalars, deltas, words, ps, bufs, sigs):
    """The native draw of these leaves; its derivative is the pure statement's."""

    def pure(scalars, deltas, words, ps, bufs, sigs):
        sigs = [None] * len(ps) if sigs is None else sigs
        return [
            _sample_leaf(p, b, scalars[1], deltas[n], scalars[0], words[n], jnp.float32, sg)
            for n, (p, b, sg) in enumerate(zip(ps, bufs, sigs, strict=True))
        ]

    @jax.custom_jvp
    def kernel(scalars, deltas, words, ps, bufs, sigs):
        return native.sample(scalars, deltas, words, ps, bufs, sigs)

    kernel.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    return native.on_cpu(kernel, pure, scalars, deltas, words, ps, bufs, sigs)


def initial_prior_precision(params: PyTree, num_data: Any) -> Array:
    """δ₀ per leaf: the prior as wide as the leaf's initial values, ``1/(N·mean θ²)``.

    A leaf that is all zeros (a bias) takes the value pooled over all
    leaves; if every leaf is zero, δ₀ = 1/N (a unit prior variance).
    """
    f = jnp.result_type(float)
    leaves = jax.tree.leaves(params, is_leaf=_is_masked)
    live = [jnp.asarray(p) for p in leaves if not _is_masked(p)]
    total = sum((jnp.sum(numerics.abs_sq(p).astype(f)) for p in live), jnp.zeros((), f))
    size = sum(p.size for p in live)
    pooled = jnp.where(total > 0, size / jnp.where(total > 0, total, 1), 1.0)

    def leaf(p):
        if _is_masked(p):
            return p
        p = jnp.asarray(p)
        sq = jnp.sum(numerics.abs_sq(p).astype(f))
        prec = jnp.where(sq > 0, p.size / jnp.where(sq > 0, sq, 1), pooled)
        return (prec / jnp.asarray(num_data, f)).astype(f)

    return _as_vector([leaf(p) for p in leaves if not _is_masked(p)], f)


def empirical_bayes_prior(params: PyTree, h: PyTree, delta: Array, num_data: Any) -> Array:
    r"""One step of the evidence (type-II maximum likelihood) fixed point for δ, per leaf.

    .. math::
        N\delta_{\text{new}} = \frac{P}{\sum_j \big(\bar\theta_j^2 + v_j\big)},
        \qquad v_j = \frac{1}{N (h_j + \delta)}

    over the P entries of a leaf: the precision of a zero-mean Gaussian
    prior that maximises the Laplace approximation of the marginal
    likelihood (MacKay, 1992), which is also the prior variance that
    maximises the mean-field ELBO. A leaf with no entries, or a
    non-finite sum, keeps its δ. ``delta`` and the result are vectors, one
    entry per unmasked leaf.
    """

    def leaf(p, hl, d):
        if _is_masked(hl):
            return d
        c = hl.dtype
        n = jnp.asarray(num_data, c)
        v = _leaf_variance(hl, d, num_data)
        total = jnp.sum(numerics.abs_sq(jnp.asarray(p)).astype(c)) + jnp.sum(v)
        new = hl.size / (n * total)
        ok = jnp.isfinite(new) & (new > 0)
        return jnp.where(ok, new, jnp.asarray(d, c)).astype(jnp.asarray(d).dtype)

    out = jax.tree.map(leaf, params, h, _as_tree(delta, h), is_leaf=_is_masked)
    return _as_vector([x for x in jax.tree.leaves(out)], delta.dtype)


def _variance_kernel(guards, eta_t, count, prev_count, filter_args, hess_decay, finishes,
                     reads_inputs=False):  # fmt: skip
    """The native ``variational``/``variational_momentum`` rule (the σ-filter and the
    squared deviation's EMA r), or ``None`` where these settings have no native path.

    ``filter_args`` is ``(beta, b1, bias_correction, eps)``; ``finishes`` the
    finish functions without and with momentum (``None``: no kernel).
    """
    beta, b1, bias_correction, eps = filter_args
    sc = sigma.filter_scalars(guards, eta_t, count, beta, b1, bias_correction, eps, hess_decay)
    if sc is None:
        return None
    momentum = not validation.is_static_zero(b1)
    rp = 1.0
    if momentum and bias_correction:  # as the pure path's ``prev_debias``
        pd = numerics.debias_factor(b1, prev_count, jnp.float32)
        rp = jnp.where(pd > 0, 1 / jnp.where(pd > 0, pd, 1), 0)
    scalars = rules.VariationalScalars(*sc, gamma=hess_decay, one_minus_gamma=1 - hess_decay, rp=rp)
    finish = finishes[1] if momentum else finishes[0]
    if finish is None:
        return None
    rule = "variational_momentum" if momentum else "variational"
    return engine.Kernel(rule, scalars, finish, reads_inputs)


def _deviation(g, m, prev_debias, b1, bias_correction):
    """g − m̂_{t−1} (g alone without momentum), clipped like a gradient, in g's compute dtype.

    m̂_{t−1} is the debiased gradient mean before this step (0 at the first):
    the control variate of the curvature estimates.
    """
    c = numerics.real_dtype(numerics.compute_dtype(g.dtype))
    diff = numerics.to_compute(g).astype(c)
    if m is None:
        return diff
    m_prev = m.astype(c)
    if bias_correction:
        pd = prev_debias(b1, c)
        m_prev = jnp.where(pd > 0, m_prev / jnp.where(pd > 0, pd, 1), 0)
    return numerics.to_compute(diff - m_prev)  # |g - m̂| < sqrt(max)/2: no overflow


def _finish(sc: rules.VariationalScalars, g, s, sig, r):
    """u from the native ``variational`` rule's new state: the σ-filter's."""
    del r
    return sigma.finish(sc, g, s, sig)


def _finish_momentum(sc: rules.VariationalScalars, g, m, s, sig, r):
    del r
    return sigma.finish_momentum(sc, g, m, s, sig)


def scale_by_variational_sigma_filter(
    eta: ScalarOrSchedule = DEFAULT_ETA,
    *,
    num_data: int,
    batch_size: int | None,
    key: int | Array = 0,
    prior_precision: float | None = DEFAULT_PRIOR_PRECISION,
    curvature: str = "variance",
    hess_decay: float = DEFAULT_HESS_DECAY,
    beta: float | Array = 0.999,
    b1: float | Array = 0.9,
    sigma_init: float | Array | None = None,
    bias_correction: bool = True,
    eps: float | Array = sigma.DEFAULT_EPS,
    sigma_max: float | Array | None = None,
    max_ratio: float | Array | None = None,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
    sigma_dtype: Any = None,
    mean_step: str = "filter",
    hess_init: float = DEFAULT_HESS_INIT,
    weight_decay: float | None = None,
    proximal_eta: ScalarOrSchedule | None = None,
) -> optax.GradientTransformation:
    r"""The σ-filter trained at draws from its data-set posterior (variational mode).

    The state defines, per parameter, a Gaussian posterior over the weights
    given all N training examples and a zero-mean Gaussian prior of
    precision :math:`N\delta` per leaf:

    .. math::
        q_t(\theta) = \mathcal N(\bar\theta_t, v_t), \qquad
        v_t = \frac{1}{N\,(h_t + \delta)}

    with :math:`h_t \ge 0` the per-example curvature. Each step the gradient
    is taken at a draw :math:`\tilde\theta_t = \bar\theta_{t-1} + \sqrt{v_{t-1}}
    \odot \varepsilon_t` (:func:`~bayesopt_jax.training_sample`), and the
    mean moves by the σ-filter's step on that gradient
    (:func:`scale_by_sigma_filter`):

    .. math::
        s_t &= \beta s_{t-1} + (1-\beta) g_t^2, \quad
        \hat s_t = s_t / (1-\beta^t) + \epsilon, \quad
        \sigma_t = \frac{1}{\hat s_t + 1/\sigma_{t-1}} + \eta^2, \quad
        u_t = \sigma_t\, d_t \\
        r_t &= \gamma r_{t-1} + (1-\gamma)\,(g_t - \hat m_{t-1})^2, \quad
        h_t = \frac{B}{1 + \frac{1-b_1}{1+b_1}}\,\frac{r_t}{1-\gamma^t}
        \quad (\texttt{curvature="variance"}, \text{the default})

    with :math:`\hat m_{t-1}` the debiased gradient EMA before this step.
    For a batch of B examples drawn at random, the batch-mean gradient has
    covariance :math:`F/B` around its mean, F the covariance of one
    example's gradient (its empirical Fisher information, less the squared
    mean); subtracting :math:`\hat m_{t-1}`, an average of earlier and
    independent gradients, removes the mean and adds the known fraction
    :math:`(1-b_1)/(1+b_1)` of the variance, which the factor undoes. So
    :math:`h_t` estimates the diagonal of F at the draws, which for a
    likelihood model near its fit is the diagonal of the Fisher information,
    i.e. of the generalised Gauss–Newton matrix. The EMA is debiased, so no
    start value is remembered, and it forgets the early run at the rate γ.

    ``curvature="reparam"``: :math:`r_t` averages
    :math:`\varepsilon_t (g_t - \hat m_{t-1})/\sqrt{v_{t-1}}` instead and
    :math:`h_t = \max(r_t/(1-\gamma^t), 0)`; by Stein's lemma an unbiased
    estimate of the expected diagonal Hessian under q, but with a variance
    that grows with N/B (no batch size needed). ``curvature="evidence"``:
    :math:`h_t = B(\hat s_t - \epsilon)` (Noisy Adam's estimate; it includes
    the squared mean gradient and remembers the whole run).

    ``prior_precision=None`` learns δ per leaf by empirical Bayes: each step
    one iteration of the evidence fixed point
    :math:`N\delta = P / \sum_j (\bar\theta_j^2 + v_j)` over the leaf's P
    entries (:func:`empirical_bayes_prior`), started from the initial
    parameters' scale. The noise :math:`\varepsilon_t` is a function of
    ``key`` and the step count only, so ``training_sample`` and ``update``
    regenerate the same draw and a checkpointed state resumes the same
    noise stream. The derivation, the choice of the defaults and their
    measurements are in the σ-filter documentation.

    On the CPU, float32 leaves run a native kernel: the σ-filter's with the
    curvature EMA for ``"variance"`` (the σ-filter's alone for
    ``"evidence"``; ``"reparam"`` runs the pure statement), and
    :func:`~bayesopt_jax.fused_step` runs the whole step in one pass when the
    prior is fixed; :func:`~bayesopt_jax.training_sample` draws in the kernel
    too (same bits, ε within a few float32 units; see the architecture page).

    With :math:`N \to \infty` the draws coincide with the mean and this is
    :func:`scale_by_sigma_filter` with the same arguments. The prior enters
    the posterior variance only; its gradient :math:`\delta\bar\theta` is not
    added to the step (see the documentation for weight decay).

    Args:
      eta: :math:`\eta \ge 0` (learning-rate units) or a schedule.
      num_data: N > 0, the number of training examples (IVON's ``ess``).
      batch_size: B ≥ 1, examples per gradient (the data's scale for the
        ``"variance"`` and ``"evidence"`` curvatures); ``None`` only with
        ``curvature="reparam"``.
      key: an int seed, a ``jax.random.key`` or raw threefry key data.
      prior_precision: a fixed δ > 0 per example for every leaf, or ``None``
        to learn one per leaf (empirical Bayes).
      curvature: ``"variance"``, ``"reparam"`` or ``"evidence"``.
      hess_decay: γ in [0, 1), the decay of the curvature EMA.
      beta: decay of the evidence EMA, in [0, 1).
      b1: decay of the gradient EMA (0.9: an Adam-like direction).
      sigma_init: initial σ, or ``None`` for the fixed point of the first evidence.
      bias_correction: debias the filter's EMAs.
      eps: evidence floor > 0.
      sigma_max: optional absolute cap on σ.
      max_ratio: optional cap σ ≤ κ·σ*(ŝ) (see :func:`scale_by_sigma_filter`).
      mu_dtype: storage of ``m``: ``None`` (the parameter's dtype), a dtype,
        or :class:`~bayesopt_jax.Blockwise8` (8-bit codes, one scale per
        block; the rule, the variance and the draws use the decoded float32
        values).
      nu_dtype: storage of the evidence ``s``, likewise.
      sigma_dtype: storage of σ, likewise. (The ``"variance"`` curvature
        buffer is stored like the evidence, with ``nu_dtype``; the signed
        ``"reparam"`` one stays in the parameter's dtype.)
      mean_step: ``"filter"`` (the σ-filter's step, above) or ``"newton"``:
        the variational online-Newton step of :mod:`bayesopt_jax._src.newton`
        (see :func:`~bayesopt_jax.variational_newton`, which sets its
        defaults). With ``"newton"``, ``eta`` is the step's learning rate α,
        the curvature is ``"variance"`` or ``"reparam"`` (its EMA starts at
        ``hess_init`` and is not debiased), and ``beta``, ``sigma_init``,
        ``eps``, ``sigma_max``, ``max_ratio`` and ``bias_correction`` set the
        σ-filter of the proximal part; the state is a
        :class:`ScaleByVariationalNewtonState`.
      hess_init: ``"newton"`` only: h₀ ≥ 0, the curvature before any data.
      weight_decay: ``"newton"`` only: δ₀ ≤ δ, the part of the prior centred
        at zero (which pulls the mean); ``None``: all of it.
      proximal_eta: ``"newton"`` only: the σ-filter's η for the proximal
        part of the prior (precision 1/σ per example), or ``None`` for none.

    Returns:
      An ``optax.GradientTransformation`` with state
      :class:`ScaleByVariationalSigmaFilterState`. Its ``update`` needs
      ``params`` when the prior is learned.

    Examples:
      >>> import jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> tx = bj.scale_by_variational_sigma_filter(num_data=100, batch_size=10, prior_precision=None)
      >>> s = tx.init({"w": jnp.full(3, 0.5)})
      >>> # before any evidence: the prior, as wide as the initial weights
      >>> round(float(bj.posterior_variance(s)["w"][0]), 6)
      0.25

    References:
      Shen et al., *Variational Learning is Effective for Large Deep
      Networks*, ICML 2024 (IVON); Khan et al., *Fast and Scalable Bayesian
      Deep Learning by Weight-Perturbation in Adam*, ICML 2018 (VOGN); Zhang
      et al., *Noisy Natural Gradient as Variational Inference*, ICML 2018
      (Noisy Adam); MacKay, *A Practical Bayesian Framework for
      Backpropagation Networks*, Neural Computation 1992; Immer et al.,
      *Scalable Marginal Likelihood Estimation for Model Selection in Deep
      Learning*, ICML 2021; Aitchison, *Bayesian filtering unifies adaptive
      and non-adaptive neural network optimization methods*, NeurIPS 2020.
    """
    where = "scale_by_variational_sigma_filter"
    validation.check_choice("mean_step", mean_step, MEAN_STEPS, where)
    validation.check_range("num_data", num_data, low=0.0, low_inclusive=False, where=where)
    learned_prior = prior_precision is None
    if not learned_prior:
        validation.check_range(
            "prior_precision", prior_precision, low=0.0, low_inclusive=False, where=where
        )
    if mean_step == "newton":
        tx = _newton(
            where, eta, num_data, batch_size, key, prior_precision, curvature, hess_decay,
            b1, hess_init, weight_decay, mu_dtype, nu_dtype, sigma_dtype, proximal_eta,
            (beta, eps, sigma_init, sigma_max, max_ratio, bias_correction),
        )  # fmt: skip
        return _with_learned_prior(where, tx) if learned_prior else tx
    sigma.check_sigma_args(
        where, eta, beta, b1, eps, sigma_init, sigma_max, max_ratio, filter_start=True
    )
    validation.check_choice("curvature", curvature, CURVATURES, where)
    if curvature in ("evidence", "variance"):
        if batch_size is None:
            raise ValueError(f'{where}: `batch_size` is required with curvature="{curvature}".')
    if batch_size is not None:
        validation.check_range("batch_size", batch_size, low=1.0, where=where)
    validation.check_decay("hess_decay", hess_decay, where)
    key_data = validation.key_data(key, where)
    dtypes = sigma.StateDtypes(mu_dtype, nu_dtype, sigma_dtype)
    dtypes.check(where)
    new_sigma = sigma.filter_rule(sigma_init, sigma_max, max_ratio)
    guards = sigma.Guards(sigma_init, sigma_max, max_ratio)
    buffered = curvature in ("reparam", "variance")  # a curvature EMA of its own
    momentum = not validation.is_static_zero(b1)
    # The σ-filter's buffers, then the curvature EMA: a mean of squares for
    # "variance" (stored like the evidence), a signed mean for "reparam",
    # none for "evidence".
    if curvature == "variance":
        hess_slot = engine.Slot("hess", dtype_arg="nu_dtype")
    elif curvature == "reparam":
        hess_slot = engine.Slot("hess", signed=True)
    else:
        hess_slot = engine.Slot("hess", optional=True)
    slots = (*sigma.SLOTS, hess_slot)

    def kernel(count, eta_t, prev_count):
        """The native rule of this step, or ``None`` (``"reparam"`` draws in the rule: none)."""
        if curvature == "reparam":
            return None
        if curvature == "variance":
            return _variance_kernel(
                guards, eta_t, count, prev_count, (beta, b1, bias_correction, eps), hess_decay,
                (_finish, _finish_momentum),
            )  # fmt: skip
        sc = sigma.filter_scalars(guards, eta_t, count, beta, b1, bias_correction, eps)
        if sc is None:
            return None
        # "evidence": the σ-filter's step alone
        if momentum:
            return engine.Kernel("sigma_momentum", sc, sigma.finish_momentum)
        return engine.Kernel("sigma", sc, sigma.finish)

    def init_fn(params):
        _check_real_floating(params, learned_prior, where)
        base = sigma.init_sigma_state(params, b1, sigma_init, dtypes, where)
        hess = None
        if buffered:  # "reparam": float, whatever nu_dtype says (its slot names no dtype argument)
            hess = hess_slot.allocate(params, nu_dtype if hess_slot.dtype_arg else None, where)
        f = jnp.result_type(float)  # float64 under jax_enable_x64, else float32
        delta = _initial_delta(params, num_data, prior_precision)
        return ScaleByVariationalSigmaFilterState(
            count=base.count,
            key=jnp.array(key_data),
            mu=base.mu,
            nu=base.nu,
            sigma=base.sigma,
            hess=hess,
            num_data=jnp.asarray(num_data, f),
            prior_precision=delta,
            curvature_scale=jnp.zeros((), f),
        )

    def make_leaf(args):
        filter_args, prev_count = args
        filter_step = sigma.filter_leaf(filter_args, new_sigma, beta, b1, bias_correction, eps)
        # 1 - b1^(t-1): debiases the previous gradient mean (0 at the first step)
        prev_debias = numerics.Debias(prev_count)

        def leaf(g, m, s, sig, r, e, v):
            # The curvature EMA first: its control variate is m_{t-1}.
            r_out = None if r is None else numerics.store(_curvature_step(g, m, r, e, v), r.dtype)
            u, m_out, s_out, sig_out = filter_step(g, m, s, sig)
            return u, m_out, s_out, sig_out, r_out

        def _curvature_step(g, m, r, e, v):
            diff = _deviation(g, m, prev_debias, b1, bias_correction)
            h_hat = diff * diff if curvature == "variance" else e * diff / jnp.sqrt(v)
            return numerics.ema(h_hat, r.astype(diff.dtype), hess_decay)

        return leaf

    def prepare(state):
        count = optax.safe_increment(state.count)
        eta_t = sigma.eta_at(eta, state.count)
        noise = var = None
        if curvature == "reparam":  # one draw for all leaves, from the state before the step
            noise, var = noise_tree(state), variance_tree(state)
        f = state.curvature_scale.dtype
        if buffered:
            scale = 1 / numerics.debias_factor(hess_decay, count, f)
            if curvature == "variance":
                # m̂_{t-1} averages earlier, independent gradients with weights (1-b1) b1^k,
                # so E(g - m̂_{t-1})² = Var(g) (1 + (1 - b1)/(1 + b1)) at a stationary mean.
                inflation = 1 if state.mu is None else 1 + (1 - b1) / (1 + b1)
                scale = scale * batch_size / inflation
        else:
            scale = jnp.asarray(batch_size, f)
            if bias_correction:
                scale = scale / numerics.debias_factor(beta, count, f)

        return engine.Prepared(
            make_leaf,
            ((count, eta_t), state.count),
            kernel(count, eta_t, state.count),
            {"count": count, "curvature_scale": scale},
            inputs=(noise, var),
        )

    tx = engine.elementwise(where, slots, init_fn, prepare)
    return _with_learned_prior(where, tx) if learned_prior else tx


def _with_learned_prior(
    where: str, tx: optax.GradientTransformation
) -> optax.GradientTransformation:
    """``tx`` followed, each step, by one empirical-Bayes iteration of δ per leaf."""

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                f"{where}: `params` is required by update to learn the prior "
                "(prior_precision=None); pass them, or fix prior_precision."
            )
        u, new = tx.update(updates, state, params)
        h = precision_tree(new)
        delta = empirical_bayes_prior(params, h, state.prior_precision, state.num_data)
        return u, new._replace(prior_precision=delta)

    return optax.GradientTransformation(tx.init, update_fn)


def _check_real_floating(params: PyTree, learned_prior: bool, where: str) -> None:
    for leaf in jax.tree.leaves(params):
        if not jnp.issubdtype(numerics.leaf_dtype(leaf), jnp.floating):
            raise ValueError(
                f"{where}: parameters must be real floating point, got a "
                f"{numerics.leaf_dtype(leaf)} leaf."
            )
        if learned_prior and isinstance(leaf, jax.ShapeDtypeStruct):
            raise ValueError(
                f"{where}: prior_precision=None starts from the initial parameters' "
                "values, and a leaf is a ShapeDtypeStruct; for an abstract state use "
                "jax.eval_shape(tx.init, params), or fix prior_precision."
            )


def _initial_delta(params: PyTree, num_data: Any, prior_precision: float | None) -> Array:
    f = jnp.result_type(float)  # float64 under jax_enable_x64, else float32
    if prior_precision is None:
        return initial_prior_precision(params, num_data)
    return jnp.full((len(jax.tree.leaves(params)),), prior_precision, f)


def _newton(
    where, alpha, num_data, batch_size, key, prior_precision, curvature, hess_decay, b1,
    hess_init, weight_decay, mu_dtype, nu_dtype, sigma_dtype, proximal_eta, filter_args,
):  # fmt: skip
    """``mean_step="newton"``: the variational online-Newton step (:mod:`.newton`).

    State (:class:`ScaleByVariationalNewtonState`): the gradient EMA ``mu``,
    the curvature ``hess`` and, with a proximal part (``proximal_eta``), the
    σ-filter's ``nu`` and ``sigma``. With ``"variance"``, ``hess`` holds r,
    the EMA of (g − m̂_{t−1})², and h = ``curvature_scale``·r (the batch
    size over the momentum's inflation); with ``"reparam"`` it holds h
    (``curvature_scale`` 1). With the proximal part, momentum and the
    variance estimate, float32 leaves on the CPU run the variational
    σ-filter's native rule for (m, s, σ, r) and XLA forms the mean's step
    from the new state and the parameters in the loop that applies it; the
    rest runs the pure statement.
    """
    validation.check_choice(
        "curvature", curvature, NEWTON_CURVATURES, where + ' (mean_step="newton")'
    )
    if curvature == "variance" and batch_size is None:
        raise ValueError(f'{where}: `batch_size` is required with curvature="variance".')
    if batch_size is not None:
        validation.check_range("batch_size", batch_size, low=1.0, where=where)
    validation.check_decay("hess_decay", hess_decay, where)
    validation.check_decay("b1", b1, where)
    validation.check_range("hess_init", hess_init, low=0.0, where=where)
    if weight_decay is not None:
        validation.check_range("weight_decay", weight_decay, low=0.0, where=where)
        if (
            isinstance(weight_decay, int | float)
            and isinstance(prior_precision, int | float)
            and weight_decay > prior_precision
        ):
            raise ValueError(
                f"{where}: weight_decay ({weight_decay}) must not exceed prior_precision "
                f"({prior_precision}): it is the zero-centred part of the prior."
            )
    if not callable(alpha):
        validation.check_range("eta", alpha, low=0.0, low_inclusive=False, where=where)
    proximal = proximal_eta is not None
    beta, eps, sigma_init, sigma_max, max_ratio, bias_correction = filter_args
    if proximal:
        sigma.check_sigma_args(
            where, proximal_eta, beta, b1, eps, sigma_init, sigma_max, max_ratio,
            filter_start=True,
        )  # fmt: skip
    key_data = validation.key_data(key, where)
    learned_prior = prior_precision is None
    mu_slot = engine.Slot("mu", signed=True, dtype_arg="mu_dtype")
    hess_slot = (
        engine.Slot("hess", dtype_arg="nu_dtype")
        if curvature == "variance"
        else engine.Slot("hess", signed=True)  # h + δ > 0, h itself may dip below 0
    )
    # the σ-filter's evidence and σ: there only with a proximal part
    slots = (
        mu_slot,
        engine.Slot("nu", dtype_arg="nu_dtype", optional=True),
        engine.Slot("sigma", dtype_arg="sigma_dtype", optional=True),
        hess_slot,
    )
    new_sigma = sigma.filter_rule(sigma_init, sigma_max, max_ratio)
    guards = sigma.Guards(sigma_init, sigma_max, max_ratio)
    # E(g - m̂_{t-1})² = Var(g)(1 + (1 - b1)/(1 + b1)) for independent gradients
    batch_scale = 1.0 if batch_size is None else batch_size / (1 + (1 - b1) / (1 + b1))
    variance = curvature == "variance"
    native_ok = proximal and variance and not validation.is_static_zero(b1)

    def finish(sc, args, g, m, s, sig, r, p, delta, e, v):
        """The mean's step from the native rule's new state (m, s, σ, r) and the parameters."""
        del s, e, v
        alpha_t = args[2]
        f32 = jnp.float32
        d = jnp.asarray(delta, f32)
        h = jnp.asarray(batch_scale, f32) * r
        pull = d if weight_decay is None else jnp.asarray(weight_decay, f32)
        p32 = jnp.asarray(p).astype(f32)
        u = newton.mean_step(m * sc.rm, p32, h, jnp.asarray(alpha_t, f32), d + 1 / sig, pull)
        return numerics.store(u, g.dtype)

    def init_fn(params):
        _check_real_floating(params, learned_prior, where)
        f = jnp.result_type(float)
        hess_dtype = nu_dtype if hess_slot.dtype_arg else None
        nu = sig = None
        if proximal:
            base = sigma.init_sigma_state(
                params, b1, sigma_init, sigma.StateDtypes(mu_dtype, nu_dtype, sigma_dtype), where
            )
            nu, sig = base.nu, base.sigma
        return ScaleByVariationalNewtonState(
            count=jnp.zeros((), jnp.int32),
            key=jnp.array(key_data),
            mu=mu_slot.allocate(params, mu_dtype, where),
            nu=nu,
            sigma=sig,
            # h = curvature_scale · the stored value (r for "variance", h for "reparam")
            hess=hess_slot.allocate(params, hess_dtype, where, value=hess_init / batch_scale)
            if variance
            else hess_slot.allocate(params, hess_dtype, where, value=hess_init),
            num_data=jnp.asarray(num_data, f),
            prior_precision=_initial_delta(params, num_data, prior_precision),
            curvature_scale=jnp.asarray(batch_scale if variance else 1.0, f),
        )

    def make_leaf(args):
        count, prev_count, alpha_t, eta_t = args
        debias = numerics.Debias(count)
        prev_debias = numerics.Debias(prev_count)
        filter_step = None
        if proximal:
            filter_step = sigma.filter_leaf(
                (count, eta_t), new_sigma, beta, b1, bias_correction, eps
            )

        def leaf(g, m, s, sig, h, p, delta, e, v):
            # delta: the prior's whole precision per example (the variance's);
            # the part centred at zero, which pulls the mean, is ``weight_decay``
            # (all of it when None: the plain evidence lower bound).
            c = numerics.real_dtype(numerics.compute_dtype(g.dtype))
            gc = numerics.to_compute(g).astype(c)
            m_c, h_c = m.astype(c), h.astype(c)
            d = jnp.asarray(delta, c)
            s_out = sig_out = None
            prox_prev = prox = jnp.zeros((), c)
            if proximal:
                prox_prev = 1 / sig.astype(c)
                _, m_out, s_out, sig_out = filter_step(g, m, s, sig)
                m_new = m_out.astype(c)
                prox = 1 / sig_out.astype(c)
            else:
                m_new = numerics.ema(gc, m_c, b1)
            if variance:
                # ĥ = B'·(g − m̂_{t−1})² ≥ 0: h, an EMA of it, stays ≥ 0 with no
                # correction; the state keeps r = h/B' (the variational σ-filter's r)
                diff = _deviation(g, m, prev_debias, b1, bias_correction)
                r_new = numerics.ema(diff * diff, h_c, hess_decay)
                h_new = jnp.asarray(batch_scale, c) * r_new
            else:
                # v = 0 only before a proximal step's first evidence (σ = 0): no draw yet
                h_hat = jnp.where(v > 0, gc * e / jnp.sqrt(jnp.where(v > 0, v, 1)), 0)
                h_hat = numerics.clip_finite(h_hat)  # keeps h finite
                r_new = h_new = newton.precision_step(h_c, h_hat, hess_decay, d + prox_prev)
            m_hat = m_new / debias(b1, c) if bias_correction else m_new
            pull = d if weight_decay is None else jnp.asarray(weight_decay, c)
            u = newton.mean_step(
                m_hat, jnp.asarray(p).astype(c), h_new, jnp.asarray(alpha_t, c), d + prox, pull
            )
            return (
                numerics.store(u, g.dtype),
                numerics.store(m_new, m.dtype),
                s_out,
                sig_out,
                numerics.store(r_new, h.dtype),
            )

        return leaf

    def prepare(state, params=None):
        """One step: the native rule updates the state, XLA forms the step (see above)."""
        count = optax.safe_increment(state.count)
        alpha_t = alpha(state.count) if callable(alpha) else alpha
        eta_t = sigma.eta_at(proximal_eta, state.count) if proximal else None
        deltas = prior_precision_tree(state)
        noise = var = None
        if curvature == "reparam":
            noise, var = noise_tree(state), variance_tree(state)
        kernel = None
        if native_ok:
            kernel = _variance_kernel(
                guards, eta_t, count, state.count, (beta, b1, bias_correction, eps), hess_decay,
                (None, finish), reads_inputs=True,
            )  # fmt: skip
        return engine.Prepared(
            make_leaf,
            (count, state.count, alpha_t, eta_t),
            kernel,
            {"count": count},
            inputs=(params, deltas, noise, var),
        )

    contract = engine.Elementwise(slots, prepare)

    def update_fn(updates, state, params=None):
        if params is None:
            raise ValueError(
                f'{where}: `params` is required by update with mean_step="newton" '
                "(the prior's pull δ₀·θ̄ is part of the step)."
            )
        updates = buffers.as_arrays(updates)
        tree, name = contract.checked_against(state)
        buffers.check_tree_match(where, updates, tree, name, quantize.is_stored)
        prepared = prepare(state, params)
        u, new_slots = engine.apply(prepared, updates, contract.read(state))
        return u, contract.rebuild(state, prepared, new_slots)

    return engine.describe(optax.GradientTransformation(init_fn, update_fn), contract)
