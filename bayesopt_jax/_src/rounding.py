r"""Exact low-precision parameter updates: Kahan-compensated summation and stochastic rounding.

A bfloat16 parameter has 8 significant bits: an update smaller than half its
spacing (:math:`|u| < 2^{-9}|\theta|`) is rounded away by
``optax.apply_updates``, so late in training, with small learning rates,
bf16 weights stop moving. The two transformations here go last in a chain;
they read the parameters and emit the update that ``optax.apply_updates``
(unchanged) adds to land on a better bf16 value:

- :func:`kahan_summation` carries the rounding error of each step in a
  compensation buffer of the parameter's dtype and adds it back to the next
  update (Kahan, 1965; Zamirai et al., 2020). :math:`\theta + c` tracks the
  float32 sum of the updates to about 16 significant bits, for 2 bytes per
  parameter instead of a 4-byte float32 master copy.
- :func:`stochastic_rounding` rounds :math:`\theta + u` to one of its two
  bf16 neighbours with probabilities that make the result unbiased, so
  small updates move the weights on average. No buffer; the state is a key.

Only parameters of a floating dtype narrower than 32 bits are treated;
float32/64 and integer leaves pass their update through unchanged.

References:
  Kahan, *Further remarks on reducing truncation errors*, CACM 8(1), 1965.
  Zamirai, Zhang, Aberger, De Sa, *Revisiting BFloat16 Training*, 2020.
  https://arxiv.org/abs/2010.06192
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from bayesopt_jax._src import buffers, validation
from bayesopt_jax._src.types import Array, PyTree

_F32 = jnp.float32


def is_low_precision(x: Any) -> bool:
    """Whether a parameter leaf has a floating dtype narrower than 32 bits (bf16, f16, ...)."""
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.floating) and jnp.finfo(dtype).bits < 32


def _applied(p: Array, u: Array) -> Array:
    """What ``optax.apply_updates`` makes of ``p`` and ``u`` (the same expression)."""
    return jnp.asarray(p + u).astype(p.dtype)


def _update_to(p: Array, target: Array, dtype: Any) -> Array:
    """The update (in ``dtype``) that moves ``p`` to the representable ``target``.

    The difference of two nearby values of ``p``'s dtype is exact in that
    dtype and in float32 (Sterbenz), so ``apply_updates`` then lands on
    ``target`` exactly; for jumps larger than ``|p|`` it may round, which the
    callers account for by reading back :func:`_applied`.
    """
    return (target.astype(_F32) - p.astype(_F32)).astype(dtype)


def _check_params(params: Any, where: str) -> None:
    if params is None:
        raise ValueError(f"{where}: `params` is required (pass them to update).")


class KahanSummationState(NamedTuple):
    """State of :func:`kahan_summation`.

    Attributes:
      compensation: per low-precision parameter, the part of the summed
        updates its rounding has not yet applied (in the parameter's dtype);
        ``optax.MaskedNode()`` for the other leaves.
    """

    compensation: PyTree


def kahan_summation() -> optax.GradientTransformation:
    r"""Applies updates to bfloat16/float16 parameters without losing the small ones.

    Per low-precision parameter :math:`\theta` with compensation :math:`c`
    (both of the parameter's dtype), in float32:

    .. math::
        y = u + c, \qquad
        \theta' = \mathrm{round}(\theta + y), \qquad
        c' = \mathrm{round}\big(y - (\theta' - \theta)\big), \qquad
        u_{\text{out}} = \theta' - \theta,

    where :math:`\theta'` is what ``optax.apply_updates(θ, u_out)`` yields.
    So :math:`\theta + c` follows the exact sum of the updates: each step
    loses only the rounding of :math:`c` (relative :math:`2^{-9}` of a value
    below half the spacing of :math:`\theta`), not of :math:`\theta`. Put it
    last in a chain, after the learning rate; other leaves pass through.
    A non-finite update reaches the parameter (as without this
    transformation) but never the compensation, which is then reset to 0.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`KahanSummationState`;
      ``update`` needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import bayesopt_jax as bj
      >>> tx = optax.chain(optax.sgd(1e-4), bj.kahan_summation())
      >>> params = jnp.ones(3, jnp.bfloat16)
      >>> state = tx.init(params)
      >>> for _ in range(100):  # each step is -1e-4: 40x below bf16's spacing at 1
      ...     u, state = tx.update(jnp.ones(3, jnp.bfloat16), state, params)
      ...     params = optax.apply_updates(params, u)
      >>> total = params[0].astype(float) + state[1].compensation[0].astype(float)
      >>> float(params[0]), round(float(total), 3)  # without it: 1.0 after any number of steps
      (0.98828125, 0.99)

    References:
      Kahan, *Further remarks on reducing truncation errors*, CACM 8(1), 1965;
      Zamirai et al., *Revisiting BFloat16 Training*, 2020. https://arxiv.org/abs/2010.06192
    """
    where = "kahan_summation"

    def init_fn(params):
        return KahanSummationState(
            jax.tree.map(
                lambda p: buffers.zeros_like(p) if is_low_precision(p) else optax.MaskedNode(),
                params,
            )
        )

    def leaf(u, c, p):
        if not is_low_precision(p):
            return u, c
        y = u.astype(_F32) + c.astype(_F32)
        target = (p.astype(_F32) + y).astype(p.dtype)
        u_out = _update_to(p, target, u.dtype)
        moved = _applied(p, u_out).astype(_F32) - p.astype(_F32)
        c_new = y - moved
        c_new = jnp.where(jnp.isfinite(c_new), c_new, 0).astype(c.dtype)
        return u_out, c_new

    def update_fn(updates, state, params=None):
        _check_params(params, where)
        buffers.check_tree_match(where, updates, params, "params")
        u, c = buffers.tree_map_multi(leaf, 2, updates, state.compensation, params)
        return u, KahanSummationState(c)

    return optax.GradientTransformation(init_fn, update_fn)


def stochastic_round(x: Array, dtype: Any, bits: Array) -> Array:
    r"""``x`` (float32) rounded to ``dtype`` up or down at random, unbiased.

    With :math:`\ell \le x \le h` the two neighbours of ``x`` in ``dtype``,
    the result is :math:`h` with probability :math:`(x-\ell)/(h-\ell)`, decided
    by 24 random bits of ``bits`` (uint32, shaped like ``x``), so
    :math:`\mathbb{E}[\text{result}] = x` up to :math:`2^{-24}(h-\ell)`.
    Representable and non-finite values come back as they are; values
    beyond ``dtype``'s range overflow to ±inf, values next to its largest
    finite number round to it, as with round-to-nearest.
    """
    x = x.astype(_F32)
    near = x.astype(dtype)
    nf = near.astype(_F32)
    up = nf < x
    other = jnp.nextafter(near, jnp.where(up, jnp.inf, -jnp.inf).astype(dtype))
    of = other.astype(_F32)
    lo, hi = jnp.where(up, nf, of), jnp.where(up, of, nf)
    lo_d, hi_d = jnp.where(up, near, other), jnp.where(up, other, near)
    frac = (x - lo) / (hi - lo)
    uniform = (bits >> 8).astype(_F32) * _F32(2.0**-24)
    out = jnp.where(uniform < frac, hi_d, lo_d)
    return jnp.where((nf == x) | ~jnp.isfinite(nf) | ~jnp.isfinite(of), near, out)


class StochasticRoundingState(NamedTuple):
    """State of :func:`stochastic_rounding`.

    Attributes:
      count: steps taken (int32, saturating); step ``t`` draws from
        ``fold_in(key, t)``.
      key: raw threefry key data (uint32[2]).
    """

    count: Array
    key: Array


def stochastic_rounding(key: int | Array = 0) -> optax.GradientTransformation:
    r"""Rounds each bfloat16/float16 parameter update stochastically (unbiased).

    Per low-precision parameter, :math:`\theta' = \mathrm{SR}(\theta + u)`
    computed in float32 (see :func:`stochastic_round`), and the emitted update
    is :math:`\theta' - \theta`, which ``optax.apply_updates`` applies
    exactly. :math:`\mathbb{E}[\theta'] = \theta + u`: an update far below
    the spacing of :math:`\theta` moves it by one spacing with the matching
    small probability. The random bits of step ``t`` come from
    ``fold_in(key, t)`` split over the leaves, so a step is reproducible, a
    restored checkpoint continues the same stream, and replicas holding the
    same state round identically. Put it last in a chain; other leaves pass
    through.

    Args:
      key: an int seed, a ``jax.random.key``, or raw uint32[2] key data.

    Returns:
      An ``optax.GradientTransformation`` with state
      :class:`StochasticRoundingState`; ``update`` needs ``params``.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import bayesopt_jax as bj
      >>> tx = optax.chain(optax.sgd(1e-4), bj.stochastic_rounding(key=0))
      >>> params = jnp.ones(10_000, jnp.bfloat16)
      >>> state = tx.init(params)
      >>> for _ in range(100):
      ...     u, state = tx.update(jnp.ones_like(params), state, params)
      ...     params = optax.apply_updates(params, u)
      >>> round(float(params.astype(jnp.float32).mean()), 3)  # 1 - 100 * 1e-4 on average
      0.99

    References:
      Zamirai et al., *Revisiting BFloat16 Training*, 2020. https://arxiv.org/abs/2010.06192 ;
      Gupta et al., *Deep Learning with Limited Numerical Precision*, ICML 2015.
    """
    where = "stochastic_rounding"
    data = validation.key_data(key, where)

    def init_fn(params):
        del params
        return StochasticRoundingState(buffers.zero_count(), jnp.array(data))

    def update_fn(updates, state, params=None):
        _check_params(params, where)
        buffers.check_tree_match(where, updates, params, "params")
        step_key = jax.random.fold_in(jax.random.wrap_key_data(state.key), state.count)
        u_leaves, treedef = jax.tree.flatten(updates)
        p_leaves = treedef.flatten_up_to(params)
        keys = jax.random.split(step_key, max(len(u_leaves), 1))
        out = []
        for i, (u, p) in enumerate(zip(u_leaves, p_leaves, strict=True)):
            if u is None or not is_low_precision(p):
                out.append(u)
                continue
            bits = jax.random.bits(keys[i], jnp.shape(p), jnp.uint32)
            target = stochastic_round(p.astype(_F32) + u.astype(_F32), p.dtype, bits)
            out.append(_update_to(p, target, u.dtype))
        count = optax.safe_increment(state.count)
        return treedef.unflatten(out), StochasticRoundingState(count, state.key)

    return optax.GradientTransformation(init_fn, update_fn)
