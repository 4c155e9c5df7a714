"""The variational σ-filter: the filter's step, taken at draws from a data-set posterior.

Per parameter the state keeps the σ-filter's moments (``mu``, ``nu``, ``sigma``)
and defines a Gaussian posterior over the weights of the whole data set,

    q(θ) = N(θ̄, v),   v = 1 / (N (h + δ)),

with N the number of training examples, δ the prior precision per example
and h a per-example curvature estimate: ``B ŝ`` from the filter's own
evidence (``curvature="evidence"``), or an EMA of the reparameterisation
estimate ``ε g / √v`` (``curvature="reparam"``). Each step draws
``θ̃ = θ̄ + √v ⊙ ε`` (:func:`training_sample`), the user takes the gradient
there, and the update moves the mean by the filter's ``σ_t ⊙ d_t``. The
noise ε of step t is a function of the state's key and step count alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesopt_jax._src import moments, quantize, sigma, validation

Array = jax.Array
PyTree = Any
ScalarOrSchedule = float | Array | Callable[[Array], Array]

CURVATURES = ("evidence", "reparam")


class ScaleByVariationalSigmaFilterState(NamedTuple):
    """State of :func:`scale_by_variational_sigma_filter`.

    Attributes:
      count: number of updates so far (int32, saturating).
      key: raw ``uint32`` data of the PRNG key the training noise derives from
        (constant; the noise of step t is drawn from ``fold_in(key, count)``).
      mu: EMA of gradients when ``b1`` is not a plain 0, otherwise ``None``.
      nu: the evidence ``s``, an EMA of squared gradients.
      sigma: the filter's step variance σ (learning-rate units).
      hess: the curvature EMA h for ``curvature="reparam"``, otherwise ``None``.
      num_data: N as a scalar (float64 under ``jax_enable_x64``, else float32).
      prior_precision: δ as a scalar (same dtype).
      evidence_scale: ``B / (1 - β^t)`` (0 before the first update), which
        turns ``nu`` into the per-example curvature ``B ŝ``.
    """

    count: Array
    key: Array
    mu: PyTree
    nu: PyTree
    sigma: PyTree
    hess: PyTree
    num_data: Array
    prior_precision: Array
    evidence_scale: Array


def _is_masked(x: Any) -> bool:
    return isinstance(x, optax.MaskedNode)


def decoded_state(
    state: ScaleByVariationalSigmaFilterState,
) -> ScaleByVariationalSigmaFilterState:
    """``state`` with its filter buffers in float32 where they are stored in 8 bits."""
    return state._replace(
        mu=quantize.decoded(state.mu),
        nu=quantize.decoded(state.nu),
        sigma=quantize.decoded(state.sigma),
    )


def _leaf_variance(nu, hess, state):
    """v = 1 / (N (h + δ)) for one leaf, in the leaf's compute dtype."""
    c = moments.real_dtype(moments.compute_dtype(nu.dtype))
    if hess is None:
        h = jnp.asarray(state.evidence_scale, c) * nu.astype(c)
    else:
        h = hess.astype(c)
    prec = jnp.asarray(state.num_data, c) * (h + jnp.asarray(state.prior_precision, c))
    return 1 / prec


def variance_tree(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """The sampled variance v for every leaf (``MaskedNode`` where masked out)."""
    state = decoded_state(state)
    hess = state.hess if state.hess is not None else jax.tree.map(lambda _: None, state.nu)
    return jax.tree.map(
        lambda n, h: n if _is_masked(n) else _leaf_variance(n, h, state),
        state.nu,
        hess,
        is_leaf=lambda x: _is_masked(x) or x is None,
    )


def noise_tree(state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """The standard normal ε of the coming step, one array per (unmasked) leaf.

    Depends only on ``state.key`` and ``state.count``: the same state gives
    the same noise, on any device layout (JAX's threefry is partitionable).
    """
    leaves, treedef = jax.tree.flatten(decoded_state(state).nu)
    key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
    keys = jax.random.split(key, max(len(leaves), 1))
    out = [
        jax.random.normal(k, x.shape, moments.real_dtype(moments.compute_dtype(x.dtype)))
        for k, x in zip(keys, leaves, strict=False)
    ]
    return treedef.unflatten(out)


def perturb(params: PyTree, state: ScaleByVariationalSigmaFilterState) -> PyTree:
    """``θ̄ + √v ⊙ ε`` with the state's variance and coming noise, in ``params``' dtypes."""

    def leaf(v, e, p):
        if _is_masked(v):
            return p
        c = e.dtype
        return (jnp.asarray(p).astype(c) + jnp.sqrt(v) * e).astype(jnp.asarray(p).dtype)

    state = decoded_state(state)  # once, for both trees below
    return jax.tree.map(leaf, variance_tree(state), noise_tree(state), params, is_leaf=_is_masked)


def scale_by_variational_sigma_filter(
    eta: ScalarOrSchedule,
    num_data: int,
    batch_size: int | None = None,
    *,
    key: int | Array = 0,
    prior_precision: float = 0.5,
    curvature: str = "evidence",
    hess_decay: float = 0.99,
    hess_init: float = 0.0,
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
) -> optax.GradientTransformation:
    r"""The σ-filter trained at draws from its data-set posterior (variational mode).

    The state defines, per parameter, a Gaussian posterior over the weights
    given all N training examples and a Gaussian prior of precision
    :math:`N\delta`:

    .. math::
        q_t(\theta) = \mathcal N(\bar\theta_t, v_t), \qquad
        v_t = \frac{1}{N\,(h_t + \delta)}

    with :math:`h_t` a per-example curvature estimate. Each step the gradient
    is taken at a draw :math:`\tilde\theta_t = \bar\theta_{t-1} + \sqrt{v_{t-1}}
    \odot \varepsilon_t` (:func:`~bayesopt_jax.training_sample`), and the
    mean moves by the σ-filter's step on that gradient
    (:func:`scale_by_sigma_filter`):

    .. math::
        s_t &= \beta s_{t-1} + (1-\beta) g_t^2, \quad
        \hat s_t = s_t / (1-\beta^t) + \epsilon, \quad
        \sigma_t = \frac{1}{\hat s_t + 1/\sigma_{t-1}} + \eta^2, \quad
        u_t = \sigma_t\, d_t \\
        h_t &= B\,(\hat s_t - \epsilon) \quad (\texttt{curvature="evidence"}) \\
        h_t &= \gamma h_{t-1} + (1-\gamma)\hat h_t
               + \tfrac12 (1-\gamma)^2 \frac{(h_{t-1} - \hat h_t)^2}{h_{t-1} + \delta},
        \quad \hat h_t = \frac{\varepsilon_t\, g_t}{\sqrt{v_{t-1}}}
        \quad (\texttt{curvature="reparam"})

    B is the batch size (ŝ estimates the per-example Fisher information over
    B near a minimum); γ is ``hess_decay``. The reparameterisation estimate
    :math:`\hat h` is unbiased for the expected diagonal Hessian under
    :math:`q` (Stein's lemma) and its update, with the correction term that
    keeps :math:`h + \delta > 0`, is IVON's (Shen et al., 2024). The noise
    :math:`\varepsilon_t` is a function of ``key`` and the step count only,
    so ``training_sample`` and ``update`` regenerate the same draw and a
    checkpointed state resumes the same noise stream. The derivation and the
    measurements behind the defaults are in the σ-filter documentation.

    With :math:`N \to \infty` the draws coincide with the mean and this is
    :func:`scale_by_sigma_filter` with the same arguments. The prior enters
    the posterior variance only; its gradient :math:`\delta\bar\theta` is not
    added to the step (see the documentation for weight decay).

    Args:
      eta: :math:`\eta \ge 0` (learning-rate units) or a schedule.
      num_data: N > 0, the number of training examples (IVON's ``ess``).
      batch_size: B ≥ 1, examples per gradient; required for
        ``curvature="evidence"``.
      key: an int seed, a ``jax.random.key`` or raw threefry key data.
      prior_precision: δ > 0, the prior precision per example.
      curvature: ``"evidence"`` (from ``nu``, no extra state) or
        ``"reparam"`` (one more buffer).
      hess_decay: γ in [0, 1) for ``curvature="reparam"``.
      hess_init: :math:`h_0 \ge 0` for ``curvature="reparam"``.
      beta: decay of the evidence EMA, in [0, 1).
      b1: decay of the gradient EMA (0.9: an Adam-like direction).
      sigma_init: initial σ, or ``None`` for the fixed point of the first evidence.
      bias_correction: debias the EMAs.
      eps: evidence floor > 0.
      sigma_max: optional absolute cap on σ.
      max_ratio: optional cap σ ≤ κ·σ*(ŝ) (see :func:`scale_by_sigma_filter`).
      mu_dtype: storage of ``m``: ``None`` (the parameter's dtype), a dtype,
        or :class:`~bayesopt_jax.Blockwise8` (8-bit codes, one scale per
        block; the rule, the variance and the draws use the decoded float32
        values).
      nu_dtype: storage of the evidence ``s``, likewise.
      sigma_dtype: storage of σ, likewise. (The ``"reparam"`` curvature
        buffer stays in the parameter's dtype.)

    Returns:
      An ``optax.GradientTransformation`` with state
      :class:`ScaleByVariationalSigmaFilterState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> tx = bj.scale_by_variational_sigma_filter(0.1, num_data=100, batch_size=10)
      >>> s = tx.init({"w": jnp.zeros(3)})
      >>> round(float(bj.posterior_variance(s)["w"][0]), 6)  # the prior 1/(Nδ) before any evidence
      0.02

    References:
      Shen et al., *Variational Learning is Effective for Large Deep
      Networks*, ICML 2024 (IVON); Khan et al., *Fast and Scalable Bayesian
      Deep Learning by Weight-Perturbation in Adam*, ICML 2018 (VOGN); Zhang
      et al., *Noisy Natural Gradient as Variational Inference*, ICML 2018
      (Noisy Adam); Aitchison, *Bayesian filtering unifies adaptive and
      non-adaptive neural network optimization methods*, NeurIPS 2020.
    """
    where = "scale_by_variational_sigma_filter"
    sigma.check_sigma_args(where, eta, beta, b1, eps, sigma_init, sigma_max, max_ratio)
    validation.check_range("num_data", num_data, low=0.0, low_inclusive=False, where=where)
    validation.check_range(
        "prior_precision", prior_precision, low=0.0, low_inclusive=False, where=where
    )
    validation.check_choice("curvature", curvature, CURVATURES, where)
    if curvature == "evidence":
        if batch_size is None:
            raise ValueError(f'{where}: `batch_size` is required with curvature="evidence".')
        validation.check_range("batch_size", batch_size, low=1.0, where=where)
    validation.check_decay("hess_decay", hess_decay, where)
    validation.check_nonnegative("hess_init", hess_init, where)
    if sigma_init is None and not callable(eta):
        validation.check_range(
            "eta", eta, low=0.0, low_inclusive=False, where=where + " (with sigma_init=None)"
        )
    key_data = validation.key_data(key, where)
    dtypes = sigma.StateDtypes(mu_dtype, nu_dtype, sigma_dtype)
    dtypes.check(where)
    new_sigma = sigma.filter_rule(sigma_init, sigma_max, max_ratio)
    reparam = curvature == "reparam"

    def init_fn(params):
        for leaf in jax.tree.leaves(params):
            if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
                raise ValueError(
                    f"{where}: parameters must be real floating point, got a "
                    f"{jnp.asarray(leaf).dtype} leaf."
                )
        base = sigma._init_sigma_state(params, b1, sigma_init, dtypes, where)
        hess = None
        if reparam:
            hess = jax.tree.map(lambda p: moments.full_like(p, hess_init), params)
        f = jnp.result_type(float)  # float64 under jax_enable_x64, else float32
        return ScaleByVariationalSigmaFilterState(
            count=base.count,
            key=jnp.array(key_data),
            mu=base.mu,
            nu=base.nu,
            sigma=base.sigma,
            hess=hess,
            num_data=jnp.asarray(num_data, f),
            prior_precision=jnp.asarray(prior_precision, f),
            evidence_scale=jnp.zeros((), f),
        )

    def update_fn(updates, stored, params=None):
        del params
        state = decoded_state(stored)
        moments.check_tree_match(where, updates, state.nu, "nu")
        count = optax.safe_increment(state.count)
        debias = moments.Debias(count)
        eta_t = sigma.eta_at(eta, state.count)
        if reparam:
            noise = noise_tree(state)
            var = variance_tree(state)
        else:
            noise = var = None

        def leaf(g, m, s, sig, h, e, v):
            s_new, s_hat, m_new, d = sigma.evidence_and_direction(
                g, m, s, debias, beta=beta, b1=b1, bias_correction=bias_correction, eps=eps
            )
            et = jnp.asarray(eta_t, s_hat.dtype)
            sig_new = new_sigma(sig.astype(s_hat.dtype), s_hat, et, count)
            m_out = None if m_new is None else moments.store(m_new, m.dtype)
            u = moments.store(sig_new * d, g.dtype)
            h_out = None
            if h is not None:
                c = s_hat.dtype
                hc = h.astype(c)
                h_hat = e * moments.to_compute(g).astype(c) / jnp.sqrt(v)
                gam = jnp.asarray(hess_decay, c)
                one = jnp.asarray(1 - hess_decay, c)
                dlt = jnp.asarray(prior_precision, c)
                h_new = gam * hc + one * h_hat + 0.5 * one * one * (hc - h_hat) ** 2 / (hc + dlt)
                h_out = moments.store(h_new, h.dtype)
            return u, m_out, moments.store(s_new, s.dtype), moments.store(sig_new, sig.dtype), h_out

        u, mu, nu, sig, hess = moments.tree_map_multi(
            leaf, 5, updates, state.mu, state.nu, state.sigma, state.hess, noise, var
        )
        f = state.evidence_scale.dtype
        scale = jnp.asarray(batch_size if batch_size is not None else 0.0, f)
        if bias_correction:
            scale = scale / moments.debias_factor(beta, count, f)
        return u, ScaleByVariationalSigmaFilterState(
            count=count,
            key=state.key,
            mu=None if state.mu is None else quantize.encoded_like(mu, stored.mu),
            nu=quantize.encoded_like(nu, stored.nu),
            sigma=quantize.encoded_like(sig, stored.sigma),
            hess=None if state.hess is None else hess,
            num_data=state.num_data,
            prior_precision=state.prior_precision,
            evidence_scale=scale,
        )

    return optax.GradientTransformation(init_fn, update_fn)
