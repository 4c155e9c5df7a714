"""Reading the σ-filter's posterior: its variance, draws from it, scales for it.

Works on the state of any chain or Optax wrapper that holds exactly one
σ-filter state (:class:`~bayesopt_jax.ScaleBySigmaFilterState` or
:class:`~bayesopt_jax.ScaleByVariationalSigmaFilterState`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesopt_jax._src import numerics, quantize, validation, variational
from bayesopt_jax._src.sigma import ScaleBySigmaFilterState
from bayesopt_jax._src.types import Array, PyTree
from bayesopt_jax._src.variational import ScaleByVariationalSigmaFilterState

_STATES = (ScaleBySigmaFilterState, ScaleByVariationalSigmaFilterState)


def _sigma_states(opt_state):
    found = jax.tree.leaves(opt_state, is_leaf=lambda x: isinstance(x, _STATES))
    return [x for x in found if isinstance(x, _STATES)]


def _one_state(opt_state, where):
    states = _sigma_states(opt_state)
    if len(states) != 1:
        raise ValueError(
            f"{where}: expected exactly one σ-filter state (ScaleBySigmaFilterState or "
            f"ScaleByVariationalSigmaFilterState) inside opt_state, found {len(states)}."
        )
    return states[0]


def posterior_variance(opt_state: PyTree) -> PyTree:
    """The variance that :func:`sample_posterior` draws with at ``scale=1``, shaped like the parameters.

    For :func:`~bayesopt_jax.sigma_filter` / :func:`~bayesopt_jax.sigma_fixed_point`
    it is the filter's σ (learning-rate units, see :func:`sample_posterior`).
    For :func:`~bayesopt_jax.variational_sigma_filter` it is the data-set
    posterior variance :math:`v = 1/(N(h+\\delta))`, the variance the next
    :func:`training_sample` draws with.

    ``opt_state`` is the σ-filter's state itself, or the state of any chain
    or Optax wrapper that holds exactly one of them (``inject_hyperparams``,
    ``apply_if_finite``, ``MultiSteps``, ``masked``, ...). Under ``masked``,
    masked-out leaves come back as ``optax.MaskedNode``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import bayesopt_jax as bj
      >>> tx = optax.apply_if_finite(bj.sigma_filter(1e-2), 3)
      >>> s = tx.init({"w": jnp.zeros(2)})
      >>> _, s = tx.update({"w": jnp.ones(2)}, s)
      >>> bj.posterior_variance(s)["w"].shape
      (2,)
    """
    state = _one_state(opt_state, "posterior_variance")
    if isinstance(state, ScaleByVariationalSigmaFilterState):
        return variational.variance_tree(state)
    return quantize.decoded(state.sigma)


def training_sample(params: PyTree, opt_state: PyTree) -> PyTree:
    r"""The parameters to take this step's gradient at: :math:`\bar\theta + \sqrt v \odot \varepsilon_t`.

    The one extra line of a variational σ-filter training loop: the noise
    :math:`\varepsilon_t` is determined by the optimizer state (its key and
    step count), so no key is passed and the following ``update`` sees the
    same draw. Replicas that hold the same state draw the same noise (see
    :func:`~bayesopt_jax.variational_sigma_filter` for data-parallel use).
    On the CPU, float32 leaves are drawn in a native kernel: the same random
    bits, with ε within a few float32 units of the pure path's (its erf⁻¹
    is its own; both are tested against float64 erf⁻¹).

    Args:
      params: the mean parameters :math:`\bar\theta`.
      opt_state: the state of :func:`~bayesopt_jax.variational_sigma_filter`,
        or of any chain or wrapper holding one
        :class:`~bayesopt_jax.ScaleByVariationalSigmaFilterState`.

    Returns:
      A pytree like ``params``, in ``params``' dtypes.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> import bayesopt_jax as bj
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = bj.variational_sigma_filter(0.05, num_data=1000, batch_size=10, key=0)
      >>> state = tx.init(params)
      >>> loss = lambda p: jnp.sum(p["w"] ** 2)
      >>> for _ in range(300):
      ...     sample = bj.training_sample(params, state)  # the one extra line
      ...     grads = jax.grad(loss)(sample)
      ...     updates, state = tx.update(grads, state, params)
      ...     params = optax.apply_updates(params, updates)
      >>> bool(jnp.abs(params["w"]).max() < 0.1)
      True
    """
    state = _one_state(opt_state, "training_sample")
    if not isinstance(state, ScaleByVariationalSigmaFilterState):
        raise ValueError(
            "training_sample: the optimizer state holds a plain σ-filter; training at "
            "posterior samples needs bj.variational_sigma_filter (or "
            "bj.scale_by_variational_sigma_filter)."
        )
    return variational.perturb(params, state)


def _scale_tree(scale: Any, params: PyTree) -> PyTree:
    """A scalar scale broadcast to the parameters' structure; a pytree unchanged."""
    if jax.tree_util.treedef_is_leaf(jax.tree.structure(scale)):
        return jax.tree.map(lambda _: scale, params)
    return scale


def sample_posterior(
    key: Array,
    params: PyTree,
    opt_state: PyTree,
    num_samples: int | None = None,
    *,
    scale: float | Array = 1.0,
) -> PyTree:
    r"""Draws parameters from the diagonal Gaussian posterior of the σ-filter.

    .. math::
        \theta^{(k)} = \theta + \sqrt{c\,\sigma}\ \odot \varepsilon^{(k)},
        \qquad \varepsilon^{(k)} \sim \mathcal N(0, I)

    **The scale c.** σ is the filter's belief about where the *next step*
    should land, in learning-rate units: it is built from the curvature of one
    batch-mean loss at a time and re-inflated by η² every step, so read as a
    posterior over weights given the whole data set it is far too wide (and
    for parameters that never saw a gradient it is bounded only by the
    guards). A principled variance comes from the same evidence ŝ the filter
    tracks. For a loss that is a mean over batches of B examples, gradient
    noise gives :math:`\hat s \approx F/B`, with F the per-example Fisher
    information; a data set of N examples has Fisher :math:`NF \approx NB\hat s`,
    so with a Gaussian prior of precision λ the diagonal Laplace posterior
    variance is :math:`1/(NB\hat s + \lambda)`. :func:`laplace_scale` returns
    the c that gives this variance, optionally tempered by T. Because the
    derivation rests on approximations (a diagonal, empirical Fisher),
    :func:`calibrate_posterior_scale` chooses T on held-out data, and keeps
    the mean parameters when no T helps.

    Args:
      key: a PRNG key.
      params: the mean (the trained parameters).
      opt_state: any optimizer state holding one σ-filter state.
      num_samples: ``None`` for one draw shaped like ``params``, or k for a
        leading axis of size k on every leaf.
      scale: c, a number or a pytree like ``params`` (e.g. from :func:`laplace_scale`).

    Returns:
      A pytree like ``params`` (with a leading sample axis if ``num_samples``).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> tx = bj.sigma_filter(0.1)
      >>> p = {"w": jnp.zeros(3)}
      >>> _, s = tx.update({"w": jnp.ones(3)}, tx.init(p))
      >>> bj.sample_posterior(jax.random.key(0), p, s, num_samples=5)["w"].shape
      (5, 3)
    """
    sigma = posterior_variance(opt_state)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    sigma = jax.tree.map(
        lambda p, s: jnp.zeros_like(p) if is_masked(s) else s, params, sigma, is_leaf=is_masked
    )
    scale = _scale_tree(scale, params)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(key, max(len(leaves), 1))
    sig_leaves = treedef.flatten_up_to(sigma)
    scale_leaves = treedef.flatten_up_to(scale)
    out = []
    for k, p, s, c in zip(keys, leaves, sig_leaves, scale_leaves, strict=False):
        shape = p.shape if num_samples is None else (num_samples, *p.shape)
        eps = jax.random.normal(k, shape, numerics.compute_dtype(p.dtype))
        std = jnp.sqrt(jnp.asarray(c) * s.astype(eps.dtype))
        out.append((p.astype(eps.dtype) + std * eps).astype(p.dtype))
    return treedef.unflatten(out)


def laplace_scale(
    opt_state: PyTree,
    num_data: int,
    batch_size: int,
    *,
    beta: float = 0.999,
    temperature: float = 1.0,
    prior_precision: float | None = None,
    params: PyTree | None = None,
) -> PyTree:
    r"""Per-parameter scale c that turns σ into a diagonal Laplace posterior variance.

    .. math::
        c\,\sigma = \frac{T}{N B\, \hat s + \lambda}

    with :math:`\hat s` the filter's bias-corrected evidence, N the number
    of training examples, B the batch size, λ a Gaussian prior precision and
    T a temperature (see :func:`sample_posterior` for the derivation). The
    prior term keeps parameters that never saw a gradient (ŝ = 0) at the
    prior variance 1/λ instead of an infinite one. By default λ is set per
    leaf by moment matching (empirical Bayes): :math:`1/\lambda` is the mean
    of :math:`\theta^2` over the leaf, i.e. a zero-mean Gaussian prior as wide
    as the trained weights of that layer.

    Args:
      opt_state: any optimizer state holding one σ-filter state.
      num_data: N, the number of training examples.
      batch_size: B, the number of examples averaged in each gradient.
      beta: the filter's evidence decay (for the bias correction of ŝ).
      temperature: T > 0; 1 is the Laplace approximation.
      prior_precision: λ > 0, or ``None`` for the per-leaf moment-matched λ
        (then ``params`` is required).
      params: the trained parameters (for ``prior_precision=None``).

    Returns:
      A pytree like the parameters, to pass as ``scale=`` to :func:`sample_posterior`.

    Examples:
      >>> import jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> tx = bj.sigma_filter(0.1, beta=0.0)
      >>> _, s = tx.update({"w": jnp.array([2.0, 0.0])}, tx.init({"w": jnp.zeros(2)}))
      >>> c = bj.laplace_scale(s, num_data=10, batch_size=5, beta=0.0, prior_precision=1.0)
      >>> [round(x, 4) for x in (c["w"] * bj.posterior_variance(s)["w"]).tolist()]  # 1/201, 1/1
      [0.005, 1.0]
    """
    where = "laplace_scale"
    validation.check_range("num_data", num_data, low=1.0, where=where)
    validation.check_range("batch_size", batch_size, low=1.0, where=where)
    validation.check_decay("beta", beta, where)
    validation.check_range("temperature", temperature, low=0.0, low_inclusive=False, where=where)
    if prior_precision is None:
        if params is None:
            raise ValueError(f"{where}: `params` is required when `prior_precision` is None.")
        precision = jax.tree.map(
            lambda p: 1 / jnp.maximum(jnp.mean(numerics.abs_sq(jnp.asarray(p))), 1e-12), params
        )
    else:
        validation.check_range(
            "prior_precision", prior_precision, low=0.0, low_inclusive=False, where=where
        )
        precision = None
    state = _one_state(opt_state, where)
    if isinstance(state, ScaleByVariationalSigmaFilterState):
        raise ValueError(
            f"{where}: the variational σ-filter's posterior_variance is already the "
            "data-set posterior; sample it with scale=1 (no Laplace scale needed)."
        )

    def leaf(s, sig, lam):
        if isinstance(s, optax.MaskedNode):
            return s
        c = numerics.compute_dtype(s.dtype)
        bc = numerics.debias_factor(beta, jnp.maximum(state.count, 1), c)
        lam = prior_precision if lam is None else lam
        var = temperature / (num_data * batch_size * s.astype(c) / bc + lam)
        sig = sig.astype(c)
        return jnp.where(sig > 0, var / jnp.where(sig > 0, sig, 1), 0)

    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    nu, sigma = quantize.decoded(state.nu), quantize.decoded(state.sigma)
    if precision is None:
        return jax.tree.map(lambda s, sig: leaf(s, sig, None), nu, sigma, is_leaf=is_masked)
    return jax.tree.map(leaf, nu, sigma, precision, is_leaf=is_masked)


def calibrate_posterior_scale(
    key: Array,
    params: PyTree,
    opt_state: PyTree,
    log_likelihood: Callable[[PyTree], Array],
    scales: Any,
    *,
    num_samples: int = 16,
    base_scale: Any = 1.0,
) -> tuple[Any, Array]:
    r"""Picks the posterior scale that maximises held-out log predictive likelihood.

    For each candidate ``c`` in ``scales`` it draws ``num_samples`` parameter
    sets with variance :math:`c \cdot \text{base\_scale} \cdot \sigma` and
    scores the Bayesian model average
    :math:`\log \frac1K \sum_k p(y \mid x, \theta^{(k)})`, summed over the
    held-out examples. ``c = 0`` (the mean parameters) is always a candidate,
    so averaging is only chosen when it helps.

    Args:
      key: PRNG key (the same draws are reused for every candidate).
      params: as in :func:`sample_posterior`.
      opt_state: as in :func:`sample_posterior`.
      log_likelihood: maps parameters to per-example log-likelihoods on the
        held-out set (shape ``[n]``).
      scales: candidate multipliers (positive numbers).
      num_samples: K.
      base_scale: a number or pytree multiplied in (e.g. :func:`laplace_scale`).

    Returns:
      ``(best_scale, scores)`` where ``scores[i]`` is the held-out log
      predictive for ``[0.0, *scales][i]``.
    """
    candidates = [0.0, *list(scales)]
    base_scale = _scale_tree(base_scale, params)
    scores = []
    for c in candidates:
        if c == 0.0:
            scores.append(jnp.sum(log_likelihood(params)))
            continue
        sc = jax.tree.map(lambda b, c=c: c * b, base_scale)
        draws = sample_posterior(key, params, opt_state, num_samples, scale=sc)
        ll = jax.lax.map(log_likelihood, draws)  # [K, n]
        bma = jax.scipy.special.logsumexp(ll, axis=0) - jnp.log(num_samples)
        scores.append(jnp.sum(bma))
    scores = jnp.stack(scores)
    return candidates[int(jnp.argmax(scores))], scores


def _average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of ``x``, ties given the mean of the ranks they span."""
    order = np.argsort(x, kind="stable")
    xs = x[order]
    ranks = np.empty(len(x), np.float64)
    start = 0
    for end in np.r_[np.flatnonzero(np.diff(xs) != 0) + 1, len(x)]:
        ranks[order[start:end]] = 0.5 * (start + end - 1) + 1
        start = end
    return ranks


def rank_correlation(a: Any, b: Any) -> float:
    """Spearman's rank correlation of two equally long arrays (ties: mean ranks); NaN if constant."""
    ra = _average_ranks(np.ravel(np.asarray(a, np.float64)))
    rb = _average_ranks(np.ravel(np.asarray(b, np.float64)))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = np.sqrt((ra * ra).sum() * (rb * rb).sum())
    return float((ra * rb).sum() / denom) if denom > 0 else float("nan")


def curvature_report(opt_state: PyTree, reference: PyTree) -> dict[str, dict[str, float]]:
    r"""Holds the variational posterior's precision against a reference curvature, per leaf.

    The precision of :func:`~bayesopt_jax.variational_sigma_filter`'s
    posterior is :math:`1/v = N h + N\delta`: a data part N·h and a prior
    part N·δ. Given a reference for the data part of the same parameters
    (typically the exact diagonal of the generalised Gauss–Newton matrix of
    the training loss summed over the training set, at the current mean),
    this reports per leaf:

    * ``rank_correlation``: Spearman's rank correlation of 1/v with the
      reference;
    * ``median_ratio``: the median of :math:`N h / \text{reference}` over the
      entries where the reference is positive (1 is exact);
    * ``data_share``: the median of :math:`N h / (N h + N\delta)`, how much of
      the precision the data, rather than the prior, supply;
    * ``prior_precision``: N·δ of the leaf;
    * ``size``: its number of entries (a rank correlation of two entries
      is ±1 whatever the estimate).

    Args:
      opt_state: a state holding one
        :class:`~bayesopt_jax.ScaleByVariationalSigmaFilterState`.
      reference: a tree like the parameters, non-negative.

    Returns:
      ``{leaf path: {name: value}}``, computed in float64 NumPy.

    Examples:
      >>> import jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> tx = bj.variational_sigma_filter(num_data=10, batch_size=2)
      >>> s = tx.init({"w": jnp.zeros(3)})
      >>> bj.curvature_report(s, {"w": jnp.array([1.0, 2.0, 3.0])})["['w']"]["data_share"]
      0.0
    """
    state = _one_state(opt_state, "curvature_report")
    if not isinstance(state, ScaleByVariationalSigmaFilterState):
        raise ValueError(
            "curvature_report: needs the state of bj.variational_sigma_filter "
            "(its posterior has a data part and a prior part)."
        )
    n = float(state.num_data)
    h = variational.curvature_tree(state)
    delta = variational.prior_precision_tree(state)
    is_masked = lambda x: isinstance(x, optax.MaskedNode)  # noqa: E731
    paths = jax.tree_util.tree_flatten_with_path(h, is_leaf=is_masked)[0]
    refs = jax.tree.structure(h, is_leaf=is_masked).flatten_up_to(reference)
    deltas = jax.tree.structure(h, is_leaf=is_masked).flatten_up_to(delta)
    out = {}
    for (path, hl), ref, d in zip(paths, refs, deltas, strict=True):
        if is_masked(hl):
            continue
        data = n * np.ravel(np.asarray(hl, np.float64))
        prior = n * float(d)
        ref = np.ravel(np.asarray(ref, np.float64))
        pos = ref > 0
        out[jax.tree_util.keystr(path)] = {
            "rank_correlation": rank_correlation(data + prior, ref),
            "median_ratio": float(np.median(data[pos] / ref[pos])) if pos.any() else float("nan"),
            "data_share": float(np.median(data / (data + prior))),
            "prior_precision": prior,
            "size": int(data.size),
        }
    return out
