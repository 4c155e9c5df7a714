"""The Adam family as Optax gradient transformations.

Each factory validates its hyperparameters, then returns
``optax.GradientTransformation(init, update)`` whose state is a NamedTuple with
Optax's field names (``count``, ``mu``, ``nu``, ``nu_max``, ...). All
arithmetic happens per leaf in :func:`~bayesopt_jax._src.moments.compute_dtype`
(at least float32); updates come out in the gradient's dtype, state in its own.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesopt_jax._src import moments, native, validation

Array = jax.Array
PyTree = Any


def _check_adam_args(where: str, b1, b2, eps, eps_root, mu_dtype=None, nu_dtype=None):
    validation.check_decay("b1", b1, where)
    validation.check_decay("b2", b2, where)
    validation.check_nonnegative("eps", eps, where)
    validation.check_nonnegative("eps_root", eps_root, where)
    validation.check_dtype("mu_dtype", mu_dtype, where)
    validation.check_dtype("nu_dtype", nu_dtype, where)


def _init_moments(params, mu_dtype, nu_dtype):
    mu = moments.tree_zeros_like(params, mu_dtype)
    nu = moments.tree_zeros_like(params, nu_dtype, real=True)
    return mu, nu


def _first_moment(g, m, b1, bc1, count, *, nesterov: bool):
    """New EMA of ``g`` and the (optionally Nesterov) bias-corrected estimate.

    Nesterov follows Dozat (2016), as PyTorch's NAdam with a constant momentum
    schedule (``momentum_decay=1e9``) and Optax's ``nesterov=True``:
    and Optax's ``nesterov=True``:
    ``m̂ = b1·m_t/(1-b1^{t+1}) + (1-b1)·g_t/(1-b1^t)``.
    """
    m_new = moments.ema(g, m.astype(g.dtype), b1)
    if bc1 is None:
        m_hat = m_new
        if nesterov:
            dt = moments.real_dtype(g.dtype)
            m_hat = jnp.asarray(b1, dt) * m_new + jnp.asarray(1 - b1, dt) * g
    elif nesterov:
        dt = moments.real_dtype(g.dtype)
        bc1_next = moments.debias_factor(b1, optax.safe_increment(count), g.dtype)
        m_hat = jnp.asarray(b1, dt) * m_new / bc1_next + jnp.asarray(1 - b1, dt) * g / bc1
    else:
        m_hat = m_new / bc1
    return m_new, m_hat


def _native_moments(config, leaf, count, gs, ms, vs) -> list[tuple]:
    """Adam's ``(u, m, v)`` for float32 leaves, by one native call on CPU.

    Off the CPU, and for differentiation (``custom_jvp``), ``leaf`` (the
    pure-JAX path) gives the same values, to within a few roundings (see
    :func:`~bayesopt_jax.fused_step` for the bound).
    """

    def pure(count, gs, ms, vs):
        debias = moments.Debias(count)
        return [leaf(g, m, v, count, debias) for g, m, v in zip(gs, ms, vs, strict=True)]

    @jax.custom_jvp
    def kernel(count, gs, ms, vs):
        sc = native.scalars(config, count)
        ms, vs = native.adam_moments(sc, gs, ms, vs)
        # What XLA makes of m_hat / (sqrt(v_hat) + eps) with scalar denominators.
        us = [
            (m * sc[native.INV_BC1]) / (jnp.sqrt(v * sc[native.INV_BC2]) + sc[native.EPS])
            for m, v in zip(ms, vs, strict=True)
        ]
        return list(zip(us, ms, vs, strict=True))

    kernel.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    return native.on_cpu(kernel, pure, count, gs, ms, vs)


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam`.

    Attributes:
      count: number of updates so far (int32, saturating).
      mu: EMA of gradients (dtype ``mu_dtype`` or the parameters').
      nu: EMA of squared gradient magnitudes (real; ``nu_dtype`` or the parameters').
    """

    count: Array
    mu: PyTree
    nu: PyTree


def scale_by_adam(
    b1: float | Array = 0.9,
    b2: float | Array = 0.999,
    eps: float | Array = 1e-8,
    eps_root: float | Array = 0.0,
    *,
    bias_correction: bool = True,
    nesterov: bool = False,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Rescales updates by Adam's bias-corrected moment estimates.

    .. math::
        m_t &= b_1 m_{t-1} + (1-b_1) g_t, \qquad v_t = b_2 v_{t-1} + (1-b_2) |g_t|^2 \\
        \hat m_t &= m_t / (1 - b_1^t), \qquad \hat v_t = v_t / (1 - b_2^t) \\
        u_t &= \hat m_t / (\sqrt{\hat v_t + \epsilon_{root}} + \epsilon)

    With ``nesterov=True`` the first moment is looked ahead (Dozat, 2016):
    :math:`\hat m_t = b_1 m_t / (1-b_1^{t+1}) + (1-b_1) g_t / (1-b_1^t)`.
    With ``bias_correction=False`` both divisions by :math:`1-b^t` are dropped.

    Agrees with ``torch.optim.Adam`` (and, for ``nesterov=True``, with
    ``torch.optim.NAdam`` with ``momentum_decay=1e9``, which makes its momentum schedule constant) and with ``optax.scale_by_adam``.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added to the denominator outside the square root, >= 0.
      eps_root: added inside the square root, >= 0 (useful when
        differentiating through the update).
      bias_correction: divide the moments by :math:`1-b^t`.
      nesterov: use Nesterov's look-ahead first moment.
      mu_dtype: dtype of ``mu`` (default: the parameters').
      nu_dtype: dtype of ``nu`` (default: the parameters' real dtype).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdamState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_adam
      >>> tx = scale_by_adam()
      >>> state = tx.init(jnp.zeros(3))
      >>> u, state = tx.update(jnp.array([1e-3, -2.0, 0.0]), state)
      >>> u.round(4)  # the first step is the sign of the gradient
      Array([ 1., -1.,  0.], dtype=float32)

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
      https://arxiv.org/abs/1412.6980 ;
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR workshop 2016.
      https://openreview.net/forum?id=OM0jvwB8jIp57ZJjtNEZ
    """
    _check_adam_args("scale_by_adam", b1, b2, eps, eps_root, mu_dtype, nu_dtype)

    def init_fn(params):
        mu, nu = _init_moments(params, mu_dtype, nu_dtype)
        return ScaleByAdamState(count=moments.zero_count(), mu=mu, nu=nu)

    config = native.adam_config(
        b1, b2, eps, eps_root, nesterov=nesterov, bias_correction=bias_correction
    )

    def leaf(g, m, v, count, debias):
        c = moments.compute_dtype(g.dtype)
        gc = moments.to_compute(g)
        bc1 = debias(b1, c) if bias_correction else None
        m_new, m_hat = _first_moment(gc, m, b1, bc1, count, nesterov=nesterov)
        v_new = moments.ema(moments.abs_sq(gc), v.astype(moments.real_dtype(c)), b2)
        v_hat = v_new / debias(b2, c) if bias_correction else v_new
        u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
        return (
            moments.store(u, g.dtype),
            moments.store(m_new, m.dtype),
            moments.store(v_new, v.dtype),
        )

    def update_fn(updates, state, params=None):
        del params
        moments.check_tree_match("scale_by_adam", updates, state.mu, "mu")
        count = optax.safe_increment(state.count)
        gs, treedef = jax.tree.flatten(updates)
        ms, vs = treedef.flatten_up_to(state.mu), treedef.flatten_up_to(state.nu)
        leaves = list(zip(gs, ms, vs, strict=True))
        native_ok = config is not None and native.use_native()
        fast = [i for i, gmv in enumerate(leaves) if native_ok and native.is_native_leaf(*gmv)]
        native_set = set(fast)
        debias = moments.Debias(count)
        outs = [
            None if i in native_set else leaf(*gmv, count, debias) for i, gmv in enumerate(leaves)
        ]
        if fast:
            picked = ([leaves[i][j] for i in fast] for j in range(3))
            for i, out in zip(fast, _native_moments(config, leaf, count, *picked), strict=True):
                outs[i] = out
        u, mu, nu = (treedef.unflatten([out[j] for out in outs]) for j in range(3))
        return u, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_amsgrad`.

    Attributes:
      count: number of updates so far (int32, saturating).
      mu: EMA of gradients.
      nu: EMA of squared gradient magnitudes.
      nu_max: running maximum of ``nu`` (``max_of="raw"``) or of its
        bias-corrected value (``max_of="corrected"``).
    """

    count: Array
    mu: PyTree
    nu: PyTree
    nu_max: PyTree


_MAX_OF = ("raw", "corrected")


def scale_by_amsgrad(
    b1: float | Array = 0.9,
    b2: float | Array = 0.999,
    eps: float | Array = 1e-8,
    eps_root: float | Array = 0.0,
    *,
    max_of: str = "raw",
    bias_correction: bool = True,
    mu_dtype: Any = None,
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam with a non-decreasing second moment (AMSGrad), in all three conventions.

    With :math:`m_t, v_t` as in :func:`scale_by_adam`:

    - ``max_of="raw"`` (PyTorch ``amsgrad=True``):
      :math:`n_t = \max(n_{t-1}, v_t)`, :math:`u_t = \hat m_t / (\sqrt{n_t/(1-b_2^t) + \epsilon_{root}} + \epsilon)`.
    - ``max_of="corrected"`` (Optax's ``scale_by_amsgrad``):
      :math:`n_t = \max(n_{t-1}, \hat v_t)`, :math:`u_t = \hat m_t / (\sqrt{n_t + \epsilon_{root}} + \epsilon)`.
    - ``bias_correction=False`` (Reddi et al., 2018): no :math:`1-b^t` anywhere,
      :math:`n_t = \max(n_{t-1}, v_t)`, :math:`u_t = m_t / (\sqrt{n_t + \epsilon_{root}} + \epsilon)`
      (``max_of`` is then irrelevant).

    The raw and corrected maxima differ: :math:`1-b_2^t` grows with
    :math:`t`, so an early raw maximum is divided by an ever larger number in
    the raw convention but frozen in the corrected one.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      max_of: ``"raw"`` or ``"corrected"`` (see above).
      bias_correction: divide the moments by :math:`1-b^t`.
      mu_dtype: dtype of ``mu`` (default: the parameters').
      nu_dtype: dtype of ``nu`` and ``nu_max`` (default: the parameters' real dtype).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAmsgradState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_amsgrad
      >>> tx = scale_by_amsgrad(max_of="raw")
      >>> s = tx.init(jnp.zeros(1))
      >>> _, s = tx.update(jnp.array([4.0]), s)
      >>> _, s = tx.update(jnp.array([0.0]), s)
      >>> bool(s.nu_max[0] >= s.nu[0])
      True

    References:
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
      https://openreview.net/forum?id=ryQu7f-RZ
    """
    where = "scale_by_amsgrad"
    _check_adam_args(where, b1, b2, eps, eps_root, mu_dtype, nu_dtype)
    validation.check_choice("max_of", max_of, _MAX_OF, where)

    def init_fn(params):
        mu, nu = _init_moments(params, mu_dtype, nu_dtype)
        nu_max = moments.tree_zeros_like(params, nu_dtype, real=True)
        return ScaleByAmsgradState(count=moments.zero_count(), mu=mu, nu=nu, nu_max=nu_max)

    def update_fn(updates, state, params=None):
        del params
        moments.check_tree_match(where, updates, state.mu, "mu")
        count = optax.safe_increment(state.count)
        debias = moments.Debias(count)

        def leaf(g, m, v, n):
            c = moments.compute_dtype(g.dtype)
            rc = moments.real_dtype(c)
            gc = moments.to_compute(g)
            bc1 = debias(b1, c) if bias_correction else None
            m_new, m_hat = _first_moment(gc, m, b1, bc1, count, nesterov=False)
            v_new = moments.ema(moments.abs_sq(gc), v.astype(rc), b2)
            if not bias_correction:
                n_new = jnp.maximum(n.astype(rc), v_new)
                v_eff = n_new
            elif max_of == "raw":
                n_new = jnp.maximum(n.astype(rc), v_new)
                v_eff = n_new / debias(b2, c)
            else:
                n_new = jnp.maximum(n.astype(rc), v_new / debias(b2, c))
                v_eff = n_new
            u = m_hat / (jnp.sqrt(v_eff + eps_root) + eps)
            return (
                moments.store(u, g.dtype),
                moments.store(m_new, m.dtype),
                moments.store(v_new, v.dtype),
                moments.store(n_new, n.dtype),
            )

        u, mu, nu, nu_max = moments.tree_map_multi(
            leaf, 4, updates, state.mu, state.nu, state.nu_max
        )
        return u, ScaleByAmsgradState(count=count, mu=mu, nu=nu, nu_max=nu_max)

    return optax.GradientTransformation(init_fn, update_fn)


def scale_by_adamax(
    b1: float | Array = 0.9,
    b2: float | Array = 0.999,
    eps: float | Array = 1e-8,
) -> optax.GradientTransformation:
    r"""Rescales updates by AdaMax's exponentially weighted infinity norm.

    .. math::
        m_t = b_1 m_{t-1} + (1-b_1) g_t, \qquad
        \nu_t = \max(b_2 \nu_{t-1}, |g_t| + \epsilon), \qquad
        u_t = \frac{m_t}{(1-b_1^t)\, \nu_t}

    Agrees with ``torch.optim.Adamax`` and ``optax.scale_by_adamax``.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the infinity norm, in [0, 1).
      eps: added to ``|g|`` so the denominator is never 0, >= 0.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByAdamState`
      (``nu`` holds the infinity norm).

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_adamax
      >>> tx = scale_by_adamax(eps=0.0)
      >>> s = tx.init(jnp.zeros(2))
      >>> u, s = tx.update(jnp.array([2.0, -0.5]), s)
      >>> [round(x, 4) for x in u.tolist()]
      [1.0, -1.0]

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015,
      section 7.1. https://arxiv.org/abs/1412.6980
    """
    where = "scale_by_adamax"
    validation.check_decay("b1", b1, where)
    validation.check_decay("b2", b2, where)
    validation.check_nonnegative("eps", eps, where)

    def init_fn(params):
        mu, nu = _init_moments(params, None, None)
        return ScaleByAdamState(count=moments.zero_count(), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        moments.check_tree_match(where, updates, state.mu, "mu")
        count = optax.safe_increment(state.count)
        debias = moments.Debias(count)

        def leaf(g, m, v):
            c = moments.compute_dtype(g.dtype)
            gc = moments.to_compute(g)
            bc1 = debias(b1, c)
            m_new, m_hat = _first_moment(gc, m, b1, bc1, count, nesterov=False)
            b2c = jnp.asarray(b2, moments.real_dtype(c))
            v_new = jnp.maximum(b2c * v.astype(b2c.dtype), jnp.abs(gc) + eps)
            u = m_hat / v_new
            return (
                moments.store(u, g.dtype),
                moments.store(m_new, m.dtype),
                moments.store(v_new, v.dtype),
            )

        u, mu, nu = moments.tree_map_multi(leaf, 3, updates, state.mu, state.nu)
        return u, ScaleByAdamState(count=count, mu=mu, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms`.

    Attributes:
      count: number of updates so far (int32, saturating; used by bias correction).
      mu: EMA of gradients (``centered=True``), otherwise ``None``.
      nu: EMA of squared gradient magnitudes.
    """

    count: Array
    mu: PyTree
    nu: PyTree


def scale_by_rms(
    decay: float | Array = 0.9,
    eps: float | Array = 1e-8,
    *,
    eps_in_sqrt: bool = False,
    bias_correction: bool = False,
    centered: bool = False,
) -> optax.GradientTransformation:
    r"""Divides updates by the root mean square of recent gradients (RMSProp).

    .. math::
        \nu_t &= d\,\nu_{t-1} + (1-d)\,|g_t|^2, \qquad
        \mu_t = d\,\mu_{t-1} + (1-d)\,g_t \ \ (\text{centered}) \\
        s_t &= \hat\nu_t - |\hat\mu_t|^2 \ (\text{centered}) \ \text{or}\ \hat\nu_t \\
        u_t &= g_t / (\sqrt{s_t} + \epsilon) \quad\text{or}\quad g_t / \sqrt{s_t + \epsilon}
        \ (\texttt{eps\_in\_sqrt=True})

    where the hats divide by :math:`1-d^t` only with ``bias_correction=True``.
    With the defaults (``eps_in_sqrt=False``, no bias correction) this is
    ``torch.optim.RMSprop`` with ``alpha=decay``. Optax's ``scale_by_rms``
    defaults to ``eps_in_sqrt=True``, so it differs from ours by default. The
    centered variance is clipped at 0 so rounding can never produce a NaN.

    Args:
      decay: the EMA decay (PyTorch's ``alpha``), in [0, 1).
      eps: stabiliser, >= 0.
      eps_in_sqrt: add ``eps`` inside the square root.
      bias_correction: divide the averages by :math:`1-d^t`.
      centered: subtract the squared mean gradient (Graves, 2013).

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByRmsState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_rms
      >>> tx = scale_by_rms(decay=0.0, eps=0.0)
      >>> s = tx.init(jnp.zeros(2))
      >>> u, s = tx.update(jnp.array([3.0, -0.25]), s)
      >>> u
      Array([ 1., -1.], dtype=float32)

    References:
      Hinton, Srivastava & Swersky, *Neural Networks for Machine Learning*,
      lecture 6e (2012). https://www.cs.toronto.edu/~tijmen/csc321/slides/lecture_slides_lec6.pdf ;
      Graves, *Generating Sequences With Recurrent Neural Networks* (2013).
      https://arxiv.org/abs/1308.0850
    """
    where = "scale_by_rms"
    validation.check_decay("decay", decay, where)
    validation.check_nonnegative("eps", eps, where)

    def init_fn(params):
        mu = moments.tree_zeros_like(params) if centered else None
        nu = moments.tree_zeros_like(params, real=True)
        return ScaleByRmsState(count=moments.zero_count(), mu=mu, nu=nu)

    def update_fn(updates, state, params=None):
        del params
        moments.check_tree_match(where, updates, state.nu, "nu")
        count = optax.safe_increment(state.count)
        debias = moments.Debias(count)

        def leaf(g, v, m):
            c = moments.compute_dtype(g.dtype)
            rc = moments.real_dtype(c)
            gc = moments.to_compute(g)
            v_new = moments.ema(moments.abs_sq(gc), v.astype(rc), decay)
            bc = debias(decay, c) if bias_correction else None
            s = v_new if bc is None else v_new / bc
            m_new = None
            if centered:
                m_new = moments.ema(gc, m.astype(c), decay)
                m_hat = m_new if bc is None else m_new / bc
                s = jnp.maximum(s - moments.abs_sq(m_hat), 0)
            denom = jnp.sqrt(s + eps) if eps_in_sqrt else jnp.sqrt(s) + eps
            u = gc / denom
            m_out = None if m_new is None else moments.store(m_new, m.dtype)
            return moments.store(u, g.dtype), moments.store(v_new, v.dtype), m_out

        u, nu, mu = moments.tree_map_multi(
            leaf, 3, updates, state.nu, state.mu if centered else None
        )
        return u, ScaleByRmsState(count=count, mu=mu if centered else None, nu=nu)

    return optax.GradientTransformation(init_fn, update_fn)


class ScaleByRssState(NamedTuple):
    """State of :func:`scale_by_rss`.

    Attributes:
      sum_of_squares: accumulated squared gradient magnitudes.
    """

    sum_of_squares: PyTree


def scale_by_rss(
    initial_accumulator_value: float | Array = 0.0,
    eps: float | Array = 1e-10,
) -> optax.GradientTransformation:
    r"""Divides updates by the root of the sum of all squared gradients (AdaGrad).

    .. math::
        a_0 = a_{init}, \qquad a_t = a_{t-1} + |g_t|^2, \qquad u_t = g_t / (\sqrt{a_t} + \epsilon)

    This is ``torch.optim.Adagrad`` (with ``lr_decay=0``). Optax's
    ``scale_by_rss`` puts ``eps`` inside the square root and returns 0 where
    the accumulator is 0, so its first steps differ from ours.

    Args:
      initial_accumulator_value: starting value of the accumulator, >= 0.
      eps: added outside the square root, >= 0.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByRssState`.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_rss
      >>> tx = scale_by_rss(eps=0.0)
      >>> s = tx.init(jnp.zeros(1))
      >>> _, s = tx.update(jnp.array([3.0]), s)
      >>> u, s = tx.update(jnp.array([4.0]), s)
      >>> u  # 4 / sqrt(9 + 16)
      Array([0.8], dtype=float32)

    References:
      Duchi, Hazan & Singer, *Adaptive Subgradient Methods for Online Learning
      and Stochastic Optimization*, JMLR 12 (2011).
      https://jmlr.org/papers/v12/duchi11a.html
    """
    where = "scale_by_rss"
    validation.check_nonnegative("initial_accumulator_value", initial_accumulator_value, where)
    validation.check_nonnegative("eps", eps, where)

    def init_fn(params):
        acc = jax.tree.map(
            lambda p: moments.full_like(
                p, initial_accumulator_value, moments.real_dtype(jnp.asarray(p).dtype)
            ),
            params,
        )
        return ScaleByRssState(sum_of_squares=acc)

    def update_fn(updates, state, params=None):
        del params
        moments.check_tree_match(where, updates, state.sum_of_squares, "sum_of_squares")

        def leaf(g, a):
            c = moments.compute_dtype(g.dtype)
            gc = moments.to_compute(g)
            rc = moments.real_dtype(c)
            # A sum never shrinks: saturate it rather than let it overflow to inf.
            a_new = jnp.minimum(a.astype(rc) + moments.abs_sq(gc), jnp.finfo(rc).max)
            u = gc / (jnp.sqrt(a_new) + eps)
            return moments.store(u, g.dtype), moments.store(a_new, a.dtype)

        u, acc = moments.tree_map_multi(leaf, 2, updates, state.sum_of_squares)
        return u, ScaleByRssState(sum_of_squares=acc)

    return optax.GradientTransformation(init_fn, update_fn)
