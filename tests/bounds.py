"""Rounding-error bounds for comparing results with float64 references.

A :class:`Tracked` array is a float64 value together with a bound on the
rounding error that an implementation computing the same formula in a
given precision can make (running error analysis, Wilkinson 1963; Higham,
*Accuracy and Stability of Numerical Algorithms*, 2002, §3.3): every
operation adds one rounding of its own result, ``u·|result|``, to the
errors of its operands propagated to first order (for a sum their sum; for
a product ``|a|·e_b + |b|·e_a``; for a quotient ``(e_a + |a/b|·e_b)/|b|``;
for a square root ``e_a/(2√a)``). ``u`` is the unit roundoff of the
implementation's arithmetic: ``2^-53`` for float64, ``2^-24`` for float32.
Magnitudes enter as absolute values, so a sum whose terms cancel keeps the
error of its terms: exactly what a bare relative tolerance misses.

:func:`check` then asks ``|got - value| ≤ FACTOR·error``. ``FACTOR = 4``:
the implementation and the reference each stay within ``error`` of the
exact result, and either may round up to twice as many operations as the
transcription writes (XLA turns ``x/c`` into ``x·(1/c)``, regroups
``m/c/d``, computes ``1 - b^t`` as ``-expm1(t·log b)``). Fused
multiply-adds and other contractions only remove roundings. The bound is
first order in ``u``, which is exact up to terms of relative size ``u``.

The transcriptions in :mod:`reference` run unchanged on ``Tracked``
inputs; :func:`power` stands for ``b**t`` there, with the error of a
library ``pow`` (a few ulp, plus ``u·|t·log b|`` where it goes through
``exp(t·log b)``, plus ``t·u`` when ``b`` itself is held rounded, as a
float32 ``b`` is).

Set ``BAYESOPT_JAX_BOUND_REPORT`` to a directory to have every check write
its worst error/bound ratio there (one file per test process).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np

FACTOR = 4.0
U64 = 2.0**-53
U32 = 2.0**-24
U16 = 2.0**-11
UBF16 = 2.0**-8

UNITS = {
    np.dtype(np.float64): U64,
    np.dtype(np.complex128): U64,
    np.dtype(np.float32): U32,
    np.dtype(np.complex64): U32,
}


def unit_of(dtype: Any) -> float:
    """The unit roundoff of arithmetic in ``dtype`` (bf16/fp16 compute in float32)."""
    return UNITS.get(np.dtype(dtype), U32)


def _mag(x):
    return np.abs(x)


class Tracked:
    """A float64 (or complex128) value with a first-order rounding-error bound."""

    __array_priority__ = 1000

    def __init__(self, value, error=0.0, unit=U64):
        self.value = np.asarray(value, dtype=np.result_type(value, np.float64))
        self.error = np.broadcast_to(np.asarray(error, np.float64), self.value.shape).copy()
        self.unit = unit

    # -- construction helpers ------------------------------------------------

    def _coerce(self, other) -> Tracked:
        if isinstance(other, Tracked):
            return other
        value = np.asarray(other, np.result_type(other, np.float64))
        # A constant is held by the implementation rounded to its precision.
        return Tracked(
            value, self.unit * _mag(value) * (~_representable(value, self.unit)), self.unit
        )

    def _new(self, value, error, *others):
        unit = max([self.unit] + [o.unit for o in others])
        # complex products and sums round each component: at most √5·u·|v| (Brent et al. 2007)
        scale = 3.0 if np.iscomplexobj(value) else 1.0
        return Tracked(value, error + scale * unit * _mag(value), unit)

    @property
    def shape(self):
        return self.value.shape

    @property
    def dtype(self):
        return self.value.dtype

    def __len__(self):
        return len(self.value)

    def __getitem__(self, index):
        return Tracked(self.value[index], self.error[index], self.unit)

    def copy(self):
        return Tracked(self.value.copy(), self.error.copy(), self.unit)

    def __repr__(self):
        return f"Tracked({self.value!r}, error={self.error!r})"

    # -- arithmetic ----------------------------------------------------------

    def __add__(self, other):
        o = self._coerce(other)
        return self._new(self.value + o.value, self.error + o.error, o)

    __radd__ = __add__

    def __sub__(self, other):
        o = self._coerce(other)
        return self._new(self.value - o.value, self.error + o.error, o)

    def __rsub__(self, other):
        return self._coerce(other) - self

    def __neg__(self):
        return Tracked(-self.value, self.error, self.unit)

    def __mul__(self, other):
        o = self._coerce(other)
        err = _mag(self.value) * o.error + _mag(o.value) * self.error + self.error * o.error
        return self._new(self.value * o.value, err, o)

    __rmul__ = __mul__

    def __truediv__(self, other):
        o = self._coerce(other)
        return self._divide(o)

    def __rtruediv__(self, other):
        return self._coerce(other)._divide(self)

    def _divide(self, o: Tracked) -> Tracked:
        with np.errstate(divide="ignore", invalid="ignore"):
            value = self.value / o.value
            room = _mag(o.value) - o.error
            err = np.where(
                room > 0, (self.error + _mag(value) * o.error) / np.where(room > 0, room, 1), np.inf
            )
            err = np.where((self.error == 0) & (o.error == 0), 0.0, err)
        return self._new(value, err, o)

    def __pow__(self, k):
        if k == 2:
            return self * self
        raise NotImplementedError("only squares of tracked values")

    # -- NumPy functions -----------------------------------------------------

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if method != "__call__" or kwargs:
            return NotImplemented
        handler = _UFUNCS.get(ufunc)
        if handler is None:
            return NotImplemented
        first = next(x for x in inputs if isinstance(x, Tracked))
        return handler(*[first._coerce(x) for x in inputs])

    def __array_function__(self, func, types, args, kwargs):
        handler = _FUNCTIONS.get(func)
        if handler is None:
            return NotImplemented
        return handler(*args, **kwargs)


def _representable(value, unit) -> np.ndarray:
    """Whether ``value`` is held exactly in the precision with unit roundoff ``unit``."""
    if unit <= U64:
        return np.ones(np.shape(value), bool)
    return np.asarray(
        np.asarray(value, np.complex64 if np.iscomplexobj(value) else np.float32) == value
    )


def _sqrt(a: Tracked) -> Tracked:
    v = np.sqrt(a.value)
    lower = np.sqrt(np.maximum(a.value - a.error, 0.0))
    with np.errstate(divide="ignore", invalid="ignore"):
        err = np.where(a.error > 0, a.error / (v + lower), 0.0)
    return a._new(v, err)


def _maximum(a: Tracked, b: Tracked) -> Tracked:
    # max and min are 1-Lipschitz in each argument and exact.
    return Tracked(np.maximum(a.value, b.value), np.maximum(a.error, b.error), max(a.unit, b.unit))


def _minimum(a: Tracked, b: Tracked) -> Tracked:
    return Tracked(np.minimum(a.value, b.value), np.maximum(a.error, b.error), max(a.unit, b.unit))


def _absolute(a: Tracked) -> Tracked:
    return Tracked(np.abs(a.value), a.error, a.unit)


def _conjugate(a: Tracked) -> Tracked:
    return Tracked(np.conj(a.value), a.error, a.unit)


def _sin(a: Tracked) -> Tracked:
    # |sin' | ≤ |cos|, plus a few ulp of argument reduction and polynomial.
    return Tracked(
        np.sin(a.value), np.abs(np.cos(a.value)) * a.error + a.error**2 / 2 + 4 * a.unit, a.unit
    )


def _cos(a: Tracked) -> Tracked:
    return Tracked(
        np.cos(a.value), np.abs(np.sin(a.value)) * a.error + a.error**2 / 2 + 4 * a.unit, a.unit
    )


def _sign(a: Tracked) -> Tracked:
    return Tracked(np.sign(a.value), 0.0, a.unit)


_UFUNCS = {
    np.add: lambda a, b: a + b,
    np.subtract: lambda a, b: a - b,
    np.multiply: lambda a, b: a * b,
    np.true_divide: lambda a, b: a / b,
    np.negative: lambda a: -a,
    np.sqrt: _sqrt,
    np.maximum: _maximum,
    np.minimum: _minimum,
    np.absolute: _absolute,
    np.conjugate: _conjugate,
    np.sin: _sin,
    np.cos: _cos,
    np.sign: _sign,
}


def _zeros_like(a, dtype=None):
    return Tracked(np.zeros_like(a.value, dtype=dtype), 0.0, a.unit)


def _full_like(a, fill, dtype=None):
    return a._coerce(np.full_like(a.value, fill, dtype=np.result_type(a.value, fill)))


def _real(a):
    return Tracked(np.real(a.value), a.error, a.unit)


def _concatenate(arrays, axis=0):
    unit = max(x.unit for x in arrays)
    return Tracked(
        np.concatenate([x.value for x in arrays], axis),
        np.concatenate([x.error for x in arrays], axis),
        unit,
    )


_FUNCTIONS = {
    np.zeros_like: _zeros_like,
    np.full_like: _full_like,
    np.real: _real,
    np.concatenate: _concatenate,
}


# --------------------------------------------------------------------------


def track(arrays, dtype: Any = np.float64):
    """Exact inputs (e.g. gradients) for a computation done in ``dtype``'s precision.

    The values are taken as the implementation receives them: rounded to
    ``dtype`` first when it is narrower than float64.
    """
    unit = unit_of(dtype)

    def one(x):
        x = np.asarray(x)
        if np.dtype(dtype).itemsize < 8 and not np.iscomplexobj(x):
            x = x.astype(dtype)
        return Tracked(x.astype(np.result_type(x, np.float64)), 0.0, unit)

    if isinstance(arrays, list | tuple):
        return [one(x) for x in arrays]
    return one(arrays)


def power(base: float, t: int, like: Any = None):
    """``base**t`` (a bias correction); tracked when ``like`` is tracked."""
    value = float(base) ** t
    if not isinstance(like, Tracked):
        return value
    u = like.unit
    log_term = abs(t * math.log(base)) if base > 0 else 0.0
    # A base the implementation holds rounded (a float32 b) is off by up to
    # u·b, which b^t multiplies by t.
    held = 0.0 if _representable(np.asarray(base), u) else t
    return Tracked(value, u * (2 + log_term + held) * abs(value), u)


def output(x: Tracked, dtype: Any) -> Tracked:
    """``x`` as stored in ``dtype``: one more rounding (bf16/fp16 results)."""
    u = {np.dtype(np.float16): U16}.get(np.dtype(dtype), unit_of(dtype))
    if str(np.dtype(dtype)) == "bfloat16":
        u = UBF16
    return Tracked(x.value, x.error + u * np.abs(x.value), max(u, x.unit))


# --------------------------------------------------------------------------


def ratio(got, want: Tracked, factor: float = FACTOR) -> float:
    """The largest ``|got - value| / (factor·error)`` (0/0 counts as 0)."""
    got = np.asarray(got)
    got = got.astype(np.result_type(got, np.float64))
    diff = np.abs(got - want.value)
    bound = factor * want.error
    with np.errstate(divide="ignore", invalid="ignore"):
        r = np.where(diff == 0, 0.0, diff / bound)
    return float(np.max(r, initial=0.0))


def check(got, want: Tracked, where: str = "", factor: float = FACTOR) -> float:
    """Asserts ``|got - want.value| ≤ factor·want.error`` elementwise; returns the worst ratio."""
    got_arr = np.asarray(got)
    assert got_arr.shape == want.shape, f"{where}: shape {got_arr.shape} != {want.shape}"
    r = ratio(got_arr, want, factor)
    _record(r)
    if not r <= 1.0:
        got64 = got_arr.astype(np.result_type(got_arr, np.float64))
        diff = np.abs(got64 - want.value)
        i = np.unravel_index(
            np.argmax(np.where(diff == 0, 0, diff / (factor * want.error))), diff.shape
        )
        raise AssertionError(
            f"{where}: error {diff[i]:.3e} exceeds the rounding bound "
            f"{factor * want.error[i]:.3e} at {i} (got {got64[i]!r}, reference {want.value[i]!r}; "
            f"worst ratio {r:.3g})"
        )
    return r


def check_trajectory(got, want, where: str = "", factor: float = FACTOR) -> float:
    assert len(got) == len(want), f"{where}: {len(got)} steps, reference has {len(want)}"
    return max(
        check(a, b, f"{where} step {t + 1}", factor)
        for t, (a, b) in enumerate(zip(got, want, strict=True))
    )


def rejects(got, want, factor: float = FACTOR) -> bool:
    """Whether the bound rejects ``got`` somewhere (to show a bound is sharp)."""
    pairs = zip(got, want, strict=True) if isinstance(want, list) else [(got, want)]
    return any(ratio(a, b, factor) > 1.0 for a, b in pairs)


def record_ratio(r: float) -> None:
    """Reports an error/bound ratio computed outside :func:`check`."""
    _record(r)


def _record(r: float) -> None:
    folder = os.environ.get("BAYESOPT_JAX_BOUND_REPORT")
    if not folder:
        return
    test = os.environ.get("PYTEST_CURRENT_TEST", "?").split(" ")[0]
    with open(os.path.join(folder, f"ratios-{os.getpid()}.txt"), "a") as f:
        f.write(f"{test}\t{r!r}\n")


# --------------------------------------------------------------------------
# trajectories


def trajectory_bound(tx, params, grad_fn, grad_error_fn, batches, *, unit=U64, ops=20):
    """Forward error bound of a training trajectory, for every float leaf.

    With ``z`` the float leaves of ``(params, state)`` and ``g = grad_fn(params,
    batch)``, each step ``z' = step(z, g)`` is computed with at most ``ops``
    rounded operations per component, whose terms are bounded by
    ``2|z| + |z'|``; the gradient is computed with an error of at most
    ``grad_error_fn(params, batch)`` per entry. Errors made earlier travel
    through the step's exact Jacobians (autodiff of the float64 step), so a
    contracting step shrinks them:

        E' = |∂z'/∂z|·E + |∂z'/∂g|·e_g + ops·u·(2|z| + |z'|).

    Returns ``[(params_bound, state_bound), ...]`` after each step, trees
    shaped like ``(params, state)`` (zero for integer leaves). Any
    implementation of the same step is within ``E`` of the exact trajectory,
    so two of them differ by at most ``2·E``.
    """
    import jax
    import jax.numpy as jnp
    import optax

    params = jax.tree.map(jnp.asarray, params)
    split, join = _float_vector((params, tx.init(params)))
    g_leaves, g_def = jax.tree.flatten(params)

    def flat(tree):
        return jnp.concatenate([jnp.ravel(x) for x in jax.tree.leaves(tree)])

    def unflat(v):
        out, i = [], 0
        for x in g_leaves:
            out.append(v[i : i + x.size].reshape(x.shape))
            i += x.size
        return jax.tree.unflatten(g_def, out)

    def step(z, g, ints):
        """The new float vector; as auxiliary output, the new one and the integer leaves."""
        p, s = join(z, ints)
        u, s = tx.update(unflat(g), s, p)
        z_new, ints_new = split((optax.apply_updates(p, u), s))
        return z_new, (z_new, ints_new)

    @jax.jit
    def advance(z, ints, E, batch):
        p, _ = join(z, ints)
        g = flat(grad_fn(p, batch))
        e_g = flat(grad_error_fn(p, batch))
        (jz, jg), (z_new, ints_new) = jax.jacfwd(step, argnums=(0, 1), has_aux=True)(z, g, ints)
        E = _carry(jz, E) + _carry(jg, e_g) + ops * unit * (2 * jnp.abs(z) + jnp.abs(z_new))
        return z_new, ints_new, E

    z, ints = split((params, tx.init(params)))
    E = jnp.zeros_like(z)
    out = []
    for batch in batches:
        z, ints, E = advance(z, ints, E, batch)
        bound = join(E, [jnp.zeros_like(x) for x in ints])
        out.append(jax.tree.map(np.asarray, bound))
    return out


def update_bounds(tx, params, grads, grad_errors, *, unit=U32, ops=20):
    """Bounds on the updates of ``tx`` at fixed ``params`` over a gradient stream.

    As :func:`trajectory_bound`, with the parameters held fixed and the
    update ``u`` as the output. The rounding of ``u`` itself is at most
    ``ops`` roundings of its terms, bounded to first order by
    ``|u| + Σ_j |∂u/∂x_j|·|x_j|`` over its inputs ``x`` (gradient, state and
    parameters): that covers a cancelling sum such as AdamW's
    ``u_adam + λθ``.

    Returns ``[(update_bound, state_bound), ...]``.
    """
    import jax
    import jax.numpy as jnp

    params = jax.tree.map(jnp.asarray, params)
    state0 = tx.init(params)
    p_flat, unravel_p = _ravel(params)
    split, join = _float_vector(state0, p_flat.dtype)

    def step(z, g, p, ints):
        """``(u, new float state)``; as auxiliary output, those and the new integer leaves."""
        u, s = tx.update(unravel_p(g), join(z, ints), unravel_p(p))
        z_new, ints_new = split(s)
        u = _ravel(u)[0]
        return (u, z_new), (u, z_new, ints_new)

    @jax.jit
    def advance(z, ints, E, g, e_g):
        jac, (u, z_new, ints_new) = jax.jacfwd(step, argnums=(0, 1, 2), has_aux=True)(
            z, g, p_flat, ints
        )
        (uz, ug, up), (sz, sg, _) = jac
        terms = (
            jnp.abs(u)
            + _carry(uz, jnp.abs(z))
            + _carry(ug, jnp.abs(g))
            + _carry(up, jnp.abs(p_flat))
        )
        E_u = _carry(uz, E) + _carry(ug, e_g) + ops * unit * terms
        E = _carry(sz, E) + _carry(sg, e_g) + ops * unit * (2 * jnp.abs(z) + jnp.abs(z_new))
        return z_new, ints_new, E, E_u

    z, ints = split(state0)
    E = jnp.zeros_like(z)
    out = []
    for g, e_g in zip(grads, grad_errors, strict=True):
        z, ints, E, E_u = advance(z, ints, E, _ravel(g)[0], _ravel(e_g)[0])
        bound_s = join(E, [jnp.zeros_like(x) for x in ints])
        out.append((jax.tree.map(np.asarray, unravel_p(E_u)), jax.tree.map(np.asarray, bound_s)))
    return out


def _float_vector(template, dtype=None):
    """``split(tree) -> (z, ints)`` and ``join(z, ints) -> tree`` for trees shaped like
    ``template``: ``z`` concatenates the floating leaves, ``ints`` keeps the others."""
    import jax
    import jax.numpy as jnp

    leaves, treedef = jax.tree.flatten(template)
    floating = [jnp.issubdtype(x.dtype, jnp.inexact) for x in leaves]

    def split(tree):
        ls = jax.tree.leaves(tree)
        z = [jnp.ravel(x) for x, f in zip(ls, floating, strict=True) if f]
        z = jnp.concatenate(z) if z else jnp.zeros((0,), dtype or jnp.float32)
        return z, [x for x, f in zip(ls, floating, strict=True) if not f]

    def join(z, ints):
        out, i, k = [], 0, 0
        for x, f in zip(leaves, floating, strict=True):
            if f:
                out.append(z[i : i + x.size].reshape(x.shape))
                i += x.size
            else:
                out.append(ints[k])
                k += 1
        return jax.tree.unflatten(treedef, out)

    return split, join


def _ravel(tree):
    from jax.flatten_util import ravel_pytree

    return ravel_pytree(tree)


def _carry(J, E):
    """``|J|·E`` where ``0·∞`` counts as 0.

    An exactly known input (``E = 0``) contributes nothing. Autodiff gives NaN
    for ``∞·0`` products: the square root of a second moment that is exactly
    0 (a parameter whose gradient is exactly 0, such as the weights of a
    pixel that is 0 in every image) times a derivative that is structurally
    0. Such an entry counts as 0: the gradient is then exactly 0 in both
    implementations (every per-example term is 0, so its error bound is 0
    as well), and the entry moves only through terms counted elsewhere.
    """
    import jax.numpy as jnp

    J = jnp.nan_to_num(jnp.abs(J), nan=0.0, posinf=jnp.inf)
    return jnp.where((E[None, :] == 0) | (J == 0), 0.0, J * E[None, :]).sum(axis=1)


def check_tree(got, want, bound, where: str = "", factor: float = 2.0, *, record=True) -> float:
    """``|got - want| ≤ factor·bound`` leaf by leaf (two implementations: factor 2)."""
    import jax

    worst = 0.0
    for (path, a), b, e in zip(
        jax.tree_util.tree_leaves_with_path(got),
        jax.tree.leaves(want),
        jax.tree.leaves(bound),
        strict=True,
    ):
        key = f"{where}{jax.tree_util.keystr(path)}"
        a, b = np.asarray(a), np.asarray(b)
        if not np.issubdtype(a.dtype, np.inexact):
            np.testing.assert_array_equal(a, b, err_msg=key)
            continue
        diff = np.abs(a.astype(np.float64) - b.astype(np.float64))
        e = np.asarray(e)
        # An infinite bound (an undefined derivative) accepts only an exact match.
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.where(diff == 0, 0.0, np.where(np.isfinite(e), diff / (factor * e), np.inf))
        r = float(np.max(r, initial=0.0))
        assert r <= 1.0, f"{key}: error {diff.max():.3e} exceeds the bound (ratio {r:.3g})"
        worst = max(worst, r)
    if record:
        _record(worst)
    return worst


def tree_rejects(got, want, bound, factor: float = 2.0) -> bool:
    """Whether :func:`check_tree` would fail (to show a bound is sharp)."""
    try:
        check_tree(got, want, bound, factor=factor, record=False)
    except AssertionError:
        return True
    return False
