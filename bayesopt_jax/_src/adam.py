"""The Adam family as Optax gradient transformations.

Each factory validates its hyperparameters, then returns
``optax.GradientTransformation(init, update)``. Signatures, defaults and state
classes are those of the Optax function of the same name; what is added
(state dtypes, PyTorch's conventions) is keyword-only. All
arithmetic happens per leaf in :func:`~bayesopt_jax._src.moments.compute_dtype`
(at least float32); updates come out in the gradient's dtype, state in its own.
"""

from __future__ import annotations

import functools
from typing import Any

import jax.numpy as jnp
import optax

from bayesopt_jax._src import allocation, buffers, engine, native, numerics, validation
from bayesopt_jax._src.native import rules
from bayesopt_jax._src.types import Array


def _check_adam_args(where: str, b1, b2, eps, eps_root, mu_dtype=None, nu_dtype=None):
    validation.check_decay("b1", b1, where)
    validation.check_decay("b2", b2, where)
    validation.check_nonnegative("eps", eps, where)
    validation.check_nonnegative("eps_root", eps_root, where)
    allocation.check_state_dtype("mu_dtype", mu_dtype, where)
    allocation.check_state_dtype("nu_dtype", nu_dtype, where)


# The state buffers of the family (see engine.Slot): the first moment is signed.
_MU = engine.Slot("mu", signed=True, dtype_arg="mu_dtype")
_NU = engine.Slot("nu", dtype_arg="nu_dtype")
_NU_MAX = engine.Slot("nu_max", dtype_arg="nu_dtype")


def _init_moments(params, mu_dtype, nu_dtype, where="scale_by_adam"):
    return _MU.allocate(params, mu_dtype, where), _NU.allocate(params, nu_dtype, where)


def _first_moment(g, m, b1, bc1, count, *, nesterov: bool):
    """New EMA of ``g`` and the (optionally Nesterov) bias-corrected estimate.

    Nesterov follows Dozat (2016), as PyTorch's NAdam with a constant momentum
    schedule (``momentum_decay=1e9``) and Optax's ``nesterov=True``:
    and Optax's ``nesterov=True``:
    ``m̂ = b1·m_t/(1-b1^{t+1}) + (1-b1)·g_t/(1-b1^t)``.
    """
    m_new = numerics.ema(g, m.astype(g.dtype), b1)
    if bc1 is None:
        m_hat = m_new
        if nesterov:
            dt = numerics.real_dtype(g.dtype)
            m_hat = jnp.asarray(b1, dt) * m_new + jnp.asarray(1 - b1, dt) * g
    elif nesterov:
        dt = numerics.real_dtype(g.dtype)
        bc1_next = numerics.debias_factor(b1, optax.safe_increment(count), g.dtype)
        m_hat = jnp.asarray(b1, dt) * m_new / bc1_next + jnp.asarray(1 - b1, dt) * g / bc1
    else:
        m_hat = m_new / bc1
    return m_new, m_hat


def _stored(*pairs) -> tuple:
    """Each computed value stored in the dtype of the buffer it replaces (``(value, like)`` pairs)."""
    return tuple(numerics.store(x, like.dtype) for x, like in pairs)


def _kernel_ready(b1, b2, eps, eps_root) -> bool:
    """Whether the native rules can take these hyperparameters (Python numbers, no eps_root)."""
    return engine.python_numbers(b1, b2, eps, eps_root) and eps_root == 0 and native.use_native()


def _moment_scalars(b1, b2, count, correct1, correct2) -> dict[str, Any]:
    """The scalars the Adam-type rules share, formed as the pure path forms them.

    ``1 - b`` rounded once from the Python value (:func:`numerics.ema`),
    ``r = 1/(1-b^t)`` from :class:`numerics.Debias` (1 where not corrected).
    """
    debias = numerics.Debias(count)
    r1 = 1 / debias(b1, jnp.float32) if correct1 else 1.0
    r2 = 1 / debias(b2, jnp.float32) if correct2 else 1.0
    return dict(b1=b1, one_minus_b1=1 - b1, b2=b2, one_minus_b2=1 - b2, r1=r1, r2=r2)


def _adam_finish(sc: rules.AdamScalars, g, m, v):
    """Adam's update from the kernel's new moments: what XLA makes of m̂/(√v̂ + ε)."""
    return (m * sc.r1) / (jnp.sqrt(v * sc.r2) + sc.eps)


def _amsgrad_finish(sc: rules.AmsgradScalars, g, m, v, n):
    """AMSGrad's update from the kernel's new state."""
    n_eff = jnp.where(sc.raw != 0, n * sc.r2, n)
    return (m * sc.r1) / (jnp.sqrt(n_eff) + sc.eps)


# Optax's own state classes: a state made here is interchangeable with one made
# by the Optax function of the same name (``optax.tree.get``/``set``,
# checkpoints, equality).
ScaleByAdamState = optax.ScaleByAdamState
ScaleByAmsgradState = optax.ScaleByAmsgradState
ScaleByRmsState = optax.ScaleByRmsState
ScaleByRssState = optax.ScaleByRssState


# Optax's own functions, kept as imported: the state classes below are read from
# what they return (a caller may later replace the names in ``optax``, as the
# Optax test suite run with ours does).
_OPTAX_FACTORIES = {"rms": optax.scale_by_rms, "stddev": optax.scale_by_stddev}


@functools.cache
def _optax_state_class(kind: str) -> type:
    """The state class of Optax's ``scale_by_{kind}(bias_correction=True)``
    (see :func:`.buffers.state_class`)."""
    return buffers.state_class(_OPTAX_FACTORIES[kind](bias_correction=True).init)


def scale_by_adam(
    b1: float | Array = 0.9,
    b2: float | Array = 0.999,
    eps: float | Array = 1e-8,
    eps_root: float | Array = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    bias_correction: bool = True,
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
      mu_dtype: dtype of ``mu`` (default: the parameters'), or a storage
        format such as :class:`~bayesopt_jax.Blockwise8`.
      nesterov: use Nesterov's look-ahead first moment.
      bias_correction: divide the moments by :math:`1-b^t` (keyword-only
        addition; Optax always corrects).
      nu_dtype: dtype or storage format of ``nu`` (keyword-only addition; default: the
        parameters' real dtype).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAdamState``.

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
        return ScaleByAdamState(count=buffers.zero_count(), mu=mu, nu=nu)

    def make_leaf(count):
        debias = numerics.Debias(count)

        def leaf(g, m, v):
            c = numerics.compute_dtype(g.dtype)
            gc = numerics.to_compute(g)
            bc1 = debias(b1, c) if bias_correction else None
            m_new, m_hat = _first_moment(gc, m, b1, bc1, count, nesterov=nesterov)
            v_new = numerics.ema(numerics.abs_sq(gc), v.astype(numerics.real_dtype(c)), b2)
            v_hat = v_new / debias(b2, c) if bias_correction else v_new
            u = m_hat / (jnp.sqrt(v_hat + eps_root) + eps)
            return _stored((u, g), (m_new, m), (v_new, v))

        return leaf

    def prepare(state):
        count = optax.safe_increment(state.count)
        kernel = None
        if not nesterov and _kernel_ready(b1, b2, eps, eps_root):
            head = _moment_scalars(b1, b2, count, bias_correction, bias_correction)
            scalars = rules.AdamScalars(**head, eps=eps, clip=numerics.clip_limit(jnp.float32))
            kernel = engine.Kernel("adam", scalars, _adam_finish)
        return engine.Prepared(make_leaf, count, kernel, {"count": count})

    return engine.elementwise("scale_by_adam", (_MU, _NU), init_fn, prepare)


_MAX_OF = ("raw", "corrected")


def scale_by_amsgrad(
    b1: float | Array = 0.9,
    b2: float | Array = 0.999,
    eps: float | Array = 1e-8,
    eps_root: float | Array = 0.0,
    mu_dtype: Any = None,
    bias_correction_mu: bool = True,
    bias_correction_nu: bool = True,
    *,
    max_of: str = "corrected",
    nu_dtype: Any = None,
) -> optax.GradientTransformation:
    r"""Adam with a non-decreasing second moment (AMSGrad), in all three conventions.

    With :math:`m_t, v_t` as in :func:`scale_by_adam`, :math:`\hat m_t =
    m_t/(1-b_1^t)` (``bias_correction_mu``) and :math:`c_t = 1-b_2^t`
    (``bias_correction_nu``; 1 when it is off):

    - ``max_of="corrected"`` (default, ``optax.scale_by_amsgrad``):
      :math:`n_t = \max(n_{t-1}, v_t/c_t)`, :math:`u_t = \hat m_t / (\sqrt{n_t + \epsilon_{root}} + \epsilon)`.
    - ``max_of="raw"`` (``torch.optim.Adam(amsgrad=True)``):
      :math:`n_t = \max(n_{t-1}, v_t)`, :math:`u_t = \hat m_t / (\sqrt{n_t/c_t + \epsilon_{root}} + \epsilon)`.
    - ``bias_correction_mu=False, bias_correction_nu=False`` (Reddi et al.,
      2018): no :math:`1-b^t` anywhere; both maxima are then the same.

    The raw and corrected maxima differ: :math:`c_t` grows with :math:`t`,
    so an early raw maximum is divided by an ever larger number in the raw
    convention but frozen in the corrected one.

    Args:
      b1: decay of the first moment, in [0, 1).
      b2: decay of the second moment, in [0, 1).
      eps: added outside the square root, >= 0.
      eps_root: added inside the square root, >= 0.
      mu_dtype: dtype of ``mu`` (default: the parameters'), or a storage
        format such as :class:`~bayesopt_jax.Blockwise8`.
      bias_correction_mu: divide the first moment by :math:`1-b_1^t`.
      bias_correction_nu: divide the second moment by :math:`1-b_2^t`.
      max_of: ``"corrected"`` or ``"raw"`` (keyword-only addition, see above).
      nu_dtype: dtype or storage format of ``nu`` and ``nu_max`` (keyword-only addition;
        default: the parameters' real dtype).

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByAmsgradState``.

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
        mu, nu = _init_moments(params, mu_dtype, nu_dtype, where)
        nu_max = _NU_MAX.allocate(params, nu_dtype, where)
        return ScaleByAmsgradState(count=buffers.zero_count(), mu=mu, nu=nu, nu_max=nu_max)

    def make_leaf(count):
        debias = numerics.Debias(count)

        def leaf(g, m, v, n):
            c = numerics.compute_dtype(g.dtype)
            rc = numerics.real_dtype(c)
            gc = numerics.to_compute(g)
            bc1 = debias(b1, c) if bias_correction_mu else None
            m_new, m_hat = _first_moment(gc, m, b1, bc1, count, nesterov=False)
            v_new = numerics.ema(numerics.abs_sq(gc), v.astype(rc), b2)
            if max_of == "raw":
                n_new = jnp.maximum(n.astype(rc), v_new)
                v_eff = n_new / debias(b2, c) if bias_correction_nu else n_new
            else:
                v_hat = v_new / debias(b2, c) if bias_correction_nu else v_new
                n_new = jnp.maximum(n.astype(rc), v_hat)
                v_eff = n_new
            u = m_hat / (jnp.sqrt(v_eff + eps_root) + eps)
            return _stored((u, g), (m_new, m), (v_new, v), (n_new, n))

        return leaf

    def prepare(state):
        count = optax.safe_increment(state.count)
        kernel = None
        if _kernel_ready(b1, b2, eps, eps_root):
            head = _moment_scalars(b1, b2, count, bias_correction_mu, bias_correction_nu)
            raw = 1.0 if max_of == "raw" else 0.0
            clip = numerics.clip_limit(jnp.float32)
            scalars = rules.AmsgradScalars(**head, eps=eps, clip=clip, raw=raw)
            kernel = engine.Kernel("amsgrad", scalars, _amsgrad_finish)
        return engine.Prepared(make_leaf, count, kernel, {"count": count})

    return engine.elementwise(where, (_MU, _NU, _NU_MAX), init_fn, prepare)


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

    # Optax's state, both buffers in the parameters' dtype (no dtype arguments)
    slots = (engine.Slot("mu", signed=True), engine.Slot("nu"))

    def init_fn(params):
        mu, nu = (slot.allocate(params, None, where) for slot in slots)
        return ScaleByAdamState(count=buffers.zero_count(), mu=mu, nu=nu)

    def make_leaf(count):
        debias = numerics.Debias(count)

        def leaf(g, m, v):
            c = numerics.compute_dtype(g.dtype)
            gc = numerics.to_compute(g)
            bc1 = debias(b1, c)
            m_new, m_hat = _first_moment(gc, m, b1, bc1, count, nesterov=False)
            b2c = jnp.asarray(b2, numerics.real_dtype(c))
            v_new = jnp.maximum(b2c * v.astype(b2c.dtype), jnp.abs(gc) + eps)
            u = m_hat / v_new
            return _stored((u, g), (m_new, m), (v_new, v))

        return leaf

    def prepare(state):
        count = optax.safe_increment(state.count)
        return engine.Prepared(make_leaf, count, None, {"count": count})

    return engine.elementwise(where, slots, init_fn, prepare)


def scale_by_rms(
    decay: float | Array = 0.9,
    eps: float | Array = 1e-8,
    initial_scale: float | Array = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    centered: bool = False,
) -> optax.GradientTransformation:
    r"""Divides updates by the root mean square of recent gradients (RMSProp).

    .. math::
        \nu_0 &= \nu_{init}, \qquad \nu_t = d\,\nu_{t-1} + (1-d)\,|g_t|^2, \qquad
        \mu_t = d\,\mu_{t-1} + (1-d)\,g_t \ \ (\text{centered}) \\
        s_t &= \hat\nu_t - |\hat\mu_t|^2 \ (\text{centered}) \ \text{or}\ \hat\nu_t \\
        u_t &= g_t / \sqrt{s_t + \epsilon} \ \ (\texttt{eps\_in\_sqrt=True})
        \quad\text{or}\quad g_t / (\sqrt{s_t} + \epsilon)

    where the hats divide by :math:`1-d^t` only with ``bias_correction=True``.
    The defaults are Optax's. ``torch.optim.RMSprop`` is
    ``scale_by_rms(decay=0.99, eps_in_sqrt=False)`` (PyTorch's ``alpha`` is
    ``decay``). ``centered=True`` is ``optax.scale_by_stddev`` with the same
    arguments (Graves, 2013); its variance is clipped at 0, so rounding can
    never produce a NaN.

    Args:
      decay: the EMA decay (PyTorch's ``alpha``), in [0, 1).
      eps: stabiliser, >= 0.
      initial_scale: :math:`\nu_{init}`, >= 0.
      eps_in_sqrt: add ``eps`` inside the square root (Optax) or outside (PyTorch).
      bias_correction: divide the averages by :math:`1-d^t`.
      centered: subtract the squared mean gradient (keyword-only addition).

    Returns:
      An ``optax.GradientTransformation`` whose state is Optax's:
      ``optax.ScaleByRmsState`` (``nu``), with ``bias_correction``
      ``optax.ScaleByRmsWithCountState``; when ``centered``,
      ``optax.ScaleByRStdDevState`` or ``optax.ScaleByRStdDevWithCountState``.

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
    validation.check_nonnegative("initial_scale", initial_scale, where)

    def make_state(count, mu, nu):
        if centered:
            if bias_correction:
                return _optax_state_class("stddev")(count=count, mu=mu, nu=nu)
            return optax.ScaleByRStdDevState(mu=mu, nu=nu)
        if bias_correction:
            return _optax_state_class("rms")(count=count, nu=nu)
        return optax.ScaleByRmsState(nu=nu)

    # nu, then mu (centered only); both in the parameters' dtype
    slots = (engine.Slot("nu"), engine.Slot("mu", signed=True, optional=True))

    def init_fn(params):
        mu = slots[1].allocate(params, None, where) if centered else None
        nu = slots[0].allocate(params, None, where, value=initial_scale)
        return make_state(buffers.zero_count(), mu, nu)

    def make_leaf(count):
        debias = numerics.Debias(count) if bias_correction else None

        def leaf(g, v, m):
            c = numerics.compute_dtype(g.dtype)
            rc = numerics.real_dtype(c)
            gc = numerics.to_compute(g)
            v_new = numerics.ema(numerics.abs_sq(gc), v.astype(rc), decay)
            bc = debias(decay, c) if bias_correction else None
            s = v_new if bc is None else v_new / bc
            m_new = None
            if centered:
                m_new = numerics.ema(gc, m.astype(c), decay)
                m_hat = m_new if bc is None else m_new / bc
                s = jnp.maximum(s - numerics.abs_sq(m_hat), 0)
            denom = jnp.sqrt(s + eps) if eps_in_sqrt else jnp.sqrt(s) + eps
            u = numerics.to_compute_again(g) / denom
            m_out = None if m_new is None else numerics.store(m_new, m.dtype)
            return numerics.store(u, g.dtype), numerics.store(v_new, v.dtype), m_out

        return leaf

    def prepare(state):
        if not bias_correction:
            return engine.Prepared(make_leaf, None, None, {})
        count = optax.safe_increment(state.count)
        return engine.Prepared(make_leaf, count, None, {"count": count})

    return engine.elementwise(where, slots, init_fn, prepare)


def scale_by_rss(
    initial_accumulator_value: float | Array = 0.1,
    eps: float | Array = 1e-7,
    *,
    eps_in_sqrt: bool = True,
) -> optax.GradientTransformation:
    r"""Divides updates by the root of the sum of all squared gradients (AdaGrad).

    .. math::
        a_0 = a_{init}, \qquad a_t = a_{t-1} + |g_t|^2, \qquad
        u_t = g_t / \sqrt{a_t + \epsilon}\ \ (\texttt{eps\_in\_sqrt=True})
        \quad\text{or}\quad g_t / (\sqrt{a_t} + \epsilon)

    With ``eps_in_sqrt=True`` (Optax's ``scale_by_rss``, the default) the
    update is 0 wherever :math:`a_t = 0`. ``torch.optim.Adagrad``
    (``lr_decay=0``) is ``scale_by_rss(0.0, 1e-10, eps_in_sqrt=False)``.
    The accumulator saturates at the dtype's largest finite value instead of
    overflowing to infinity.

    Args:
      initial_accumulator_value: :math:`a_{init}`, >= 0.
      eps: stabiliser, >= 0.
      eps_in_sqrt: add ``eps`` inside the square root (Optax) or outside
        (PyTorch); keyword-only addition.

    Returns:
      An ``optax.GradientTransformation`` with state ``optax.ScaleByRssState``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from bayesopt_jax import scale_by_rss
      >>> tx = scale_by_rss(0.0, 0.0)
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

    slot = engine.Slot("sum_of_squares")  # in the parameters' real dtype

    def init_fn(params):
        return ScaleByRssState(slot.allocate(params, None, where, value=initial_accumulator_value))

    def leaf(g, a):
        c = numerics.compute_dtype(g.dtype)
        gc = numerics.to_compute(g)
        rc = numerics.real_dtype(c)
        # A sum never shrinks: saturate it rather than let it overflow to inf.
        a_new = jnp.minimum(a.astype(rc) + numerics.abs_sq(gc), jnp.finfo(rc).max)
        if eps_in_sqrt:
            # 0 where nothing has accumulated (Optax's convention); the
            # guarded denominator keeps derivatives finite there too.
            # A NaN accumulator is not "empty": it still shows in the update.
            empty = a_new == 0
            safe = jnp.where(empty, jnp.ones((), rc), a_new + eps)
            direction = numerics.to_compute_again(g) / jnp.sqrt(safe)
            u = jnp.where(empty, jnp.zeros((), gc.dtype), direction)
        else:
            u = numerics.to_compute_again(g) / (jnp.sqrt(a_new) + eps)
        return numerics.store(u, g.dtype), numerics.store(a_new, a.dtype)

    def prepare(state):
        del state
        return engine.Prepared(lambda args: leaf, None, None, {})

    return engine.elementwise(where, (slot,), init_fn, prepare)
