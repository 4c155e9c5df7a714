"""The fused optimizer step: parameters and state updated in place in one call.

Optax's two calls, ``tx.update`` then ``optax.apply_updates``, materialize the
updates and read them again. :func:`fused_step` does both at once: for this
package's :func:`~bayesopt_jax.adam` and :func:`~bayesopt_jax.adamw` on the
CPU it is a single native call that reads p, g, m, v and writes p, m, v in
place (28 bytes per float32 parameter); for any other optimizer, device or
dtype it is exactly ``update`` followed by ``apply_updates``.
"""

from __future__ import annotations

import weakref
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesopt_jax._src import native

PyTree = Any


class AdamStepSpec(NamedTuple):
    """How :func:`fused_step` runs an ``adam``/``adamw`` chain natively.

    The chain is ``(scale_by_adam, [weight decay,] scale_by_learning_rate)``.
    """

    config: native.AdamConfig | None
    weight_decay: float | None
    mask: Any
    learning_rate: optax.GradientTransformation


# Keyed by the chain's update function, so that the optimizer object itself
# stays an ordinary ``optax.GradientTransformation``.
_SPECS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def register(tx: optax.GradientTransformation, spec: AdamStepSpec) -> optax.GradientTransformation:
    """Marks ``tx`` (built by an alias) as runnable by :func:`fused_step`."""
    _SPECS[tx.update] = spec
    return tx


def _two_call(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _decay_flags(spec: AdamStepSpec, params: PyTree) -> list[bool] | None:
    """Per-leaf weight-decay flags, or ``None`` if the mask is not static."""
    leaves = jax.tree.leaves(params)
    if spec.weight_decay is None:
        return [False] * len(leaves)
    if spec.mask is None:
        return [True] * len(leaves)
    mask = spec.mask(params) if callable(spec.mask) else spec.mask
    try:
        # A mask may be a prefix of the parameter tree: broadcast it down.
        full = jax.tree.map(lambda flag, sub: jax.tree.map(lambda _: flag, sub), mask, params)
    except ValueError:
        return None
    flags = jax.tree.leaves(full)
    if len(flags) != len(leaves) or not all(isinstance(f, bool | np.bool_) for f in flags):
        return None
    return [bool(f) for f in flags]


def fused_step(
    tx: optax.GradientTransformation,
    grads: PyTree,
    state: optax.OptState,
    params: PyTree,
) -> tuple[PyTree, optax.OptState]:
    r"""Applies one optimizer step: ``(new_params, new_state)`` in one call.

    .. math::
        (u_t, s_t) = \text{tx.update}(g_t, s_{t-1}, \theta_{t-1}), \qquad
        \theta_t = \theta_{t-1} + u_t

    For :func:`~bayesopt_jax.adam` and :func:`~bayesopt_jax.adamw` with
    Python-number ``b1``, ``b2``, ``eps``, ``weight_decay``, ``eps_root=0``,
    no Nesterov, float32 parameters and state, a static ``mask``, and the
    native kernels built (see :func:`~bayesopt_jax.native_available`), it
    runs on the CPU as multi-threaded calls over all leaves (64 leaves per
    call) that update parameters and moments in place: 28 bytes per
    parameter, where ``update`` + ``apply_updates`` need 36. Donate params
    and state to ``jit`` to avoid copies. Everything else, and every other
    device, runs ``tx.update`` then ``optax.apply_updates``.

    Exactness: the kernel performs, per element, the float32 operations
    :math:`m' = \mathrm{fma}(m, b_1, (1-b_1)g)`,
    :math:`v' = \mathrm{fma}(v, b_2, (1-b_2)g^2)`,
    :math:`u = (m' c_1)/(\sqrt{v' c_2} + \epsilon)` with
    :math:`c_i = 1/(1-b_i^t)`, :math:`u \mathrel{+}= \lambda\theta` (as an FMA, AdamW),
    :math:`\theta' = \mathrm{fma}(u, -\alpha, \theta)`, with ``g`` first
    clipped to finite magnitudes below ``sqrt(max)/2`` as in the pure path.
    The pure-JAX path computes the same formulas, but XLA regroups them
    depending on the surrounding code, so the two agree to within 4 float32
    rounding units of each result's terms (e.g. :math:`|b_1 m| + |(1-b_1) g|`
    for :math:`m'`), with identical non-finite entries; the test suite
    checks this bound for both paths in several contexts.

    Args:
      tx: any ``optax.GradientTransformation``.
      grads: gradients, with the structure of ``params``.
      state: ``tx``'s state.
      params: the current parameters.

    Returns:
      ``(new_params, new_state)``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> import bayesopt_jax as bj
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = bj.adam(0.1)
      >>> state = tx.init(params)
      >>> step = jax.jit(lambda p, s: bj.fused_step(tx, jax.grad(lambda q: (q["w"] ** 2).sum())(p), s, p))
      >>> for _ in range(100):
      ...     params, state = step(params, state)
      >>> bool(jnp.abs(params["w"]).max() < 0.1)
      True
    """
    spec = _SPECS.get(getattr(tx, "update", None))
    if spec is None or spec.config is None or not native.use_native():
        return _two_call(tx, grads, state, params)
    adam_state = state[0]
    ps, treedef = jax.tree.flatten(params)
    try:
        gs = treedef.flatten_up_to(grads)
        ms = treedef.flatten_up_to(adam_state.mu)
        vs = treedef.flatten_up_to(adam_state.nu)
    except (ValueError, TypeError):
        return _two_call(tx, grads, state, params)
    decay = _decay_flags(spec, params)
    if (
        not ps
        or decay is None
        or not all(native.is_native_leaf(*leaves) for leaves in zip(ps, gs, ms, vs, strict=True))
    ):
        return _two_call(tx, grads, state, params)

    def pure(state, ps, gs):
        p, s = _two_call(tx, treedef.unflatten(gs), state, treedef.unflatten(ps))
        return jax.tree.leaves(p), s

    @jax.custom_jvp
    def kernel(state, ps, gs):
        adam_state, *middle, lr_state = state
        count = optax.safe_increment(adam_state.count)
        # -lr exactly as optax.scale_by_learning_rate forms it, and its new state.
        neg_lr, lr_state = spec.learning_rate.update(jnp.ones((), jnp.float32), lr_state)
        sc = native.scalars(
            spec.config, count, neg_lr=neg_lr, weight_decay=spec.weight_decay or 0.0
        )
        ms = treedef.flatten_up_to(adam_state.mu)
        vs = treedef.flatten_up_to(adam_state.nu)
        new_ps, new_ms, new_vs = native.adam_step(sc, ps, gs, ms, vs, decay)
        adam_state = adam_state._replace(
            count=count, mu=treedef.unflatten(new_ms), nu=treedef.unflatten(new_vs)
        )
        return new_ps, (adam_state, *middle, lr_state)

    kernel.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    new_ps, new_state = native.on_cpu(kernel, pure, state, ps, gs)
    return treedef.unflatten(new_ps), new_state


def native_available() -> bool:
    """Whether the native CPU kernels are built, loaded and in use.

    They are compiled when the package is installed (a C++17 compiler is
    needed; set ``BAYESOPT_JAX_BUILD_NATIVE=0`` to skip) and checked against
    the pure-JAX path on first use. Setting
    ``BAYESOPT_JAX_NATIVE=0`` before import turns them off. When this is
    ``False``, :func:`~bayesopt_jax.scale_by_adam` and :func:`fused_step`
    run their pure-JAX path, with identical results.

    Returns:
      ``True`` if the kernels are used on the CPU.

    Examples:
      >>> import bayesopt_jax as bj
      >>> isinstance(bj.native_available(), bool)
      True
    """
    return native.available()


def native_status() -> dict[str, Any]:
    """What the native CPU kernels are doing in this process, and why.

    Runs the one-time check of :func:`native_available` if it has not run.

    Returns:
      A dict with ``built`` (a library was compiled at install time),
      ``library`` (its path), ``loaded`` (it loaded and registered with
      XLA), ``used`` (transformations take the native path on the CPU),
      ``isa`` (the instruction-set copy of the loops in use: ``"avx512"``,
      ``"avx2"`` or ``"baseline"``), ``isas`` (the copies this CPU can run)
      and ``reason`` (why ``used`` is ``False``, else ``None``).

    Examples:
      >>> import bayesopt_jax as bj
      >>> status = bj.native_status()
      >>> status["used"] == bj.native_available()
      True
      >>> status["used"] or status["reason"] is not None
      True
    """
    used = native.available()
    path = native.library_path()
    return {
        "built": path is not None,
        "library": None if path is None else str(path),
        "loaded": native.isa() is not None,
        "used": used,
        "isa": native.isa(),
        "isas": native.supported_isas(),
        "reason": native.unavailable_reason(),
    }


def self_test() -> str | None:
    """Checks the kernels against the pure-JAX path; returns what differs, or ``None``.

    Runs once, when the native path is first needed, on this process's
    first CPU device and on arrays it creates itself, so that in a
    multi-process run (``jax.distributed``) every process runs the same
    check on its own device and reaches the same decision. A few leaves
    (one large enough to be split across threads) with ordinary, tiny, huge
    and non-finite gradients go through both ``tx.update`` and
    :func:`fused_step` of ``adamw`` with a mask, four steps of one fixed
    gradient. With a fixed gradient the moments add terms of one sign and
    every bias-corrected step has magnitude at most ``lr·(1 + wd·|θ|)``, so
    each result is within about ten roundings of its terms on both paths:
    ``|a - b| ≤ 16·eps·(|b| + 8·lr)`` for parameters (whose steps may cancel
    the parameter) and ``16·eps·|b|`` for moments, with the same non-finite
    entries.
    """
    from bayesopt_jax._src import alias  # the aliases import this module

    cpu = jax.sharding.SingleDeviceSharding(jax.local_devices(backend="cpu")[0])
    rng = np.random.default_rng(0)
    sizes = [(70_001,), (3, 5), (1,)]
    params = [rng.normal(size=s).astype(np.float32) for s in sizes]
    grads = [rng.normal(size=s).astype(np.float32) * 1e-3 for s in sizes]
    specials = np.array([0.0, -0.0, 1e-30, 3e38, -3e38, np.inf, -np.inf, np.nan], np.float32)
    grads[0][: specials.size] = specials
    tx = alias.adamw(1e-3, weight_decay=0.1, mask=[True, False, True])

    def run(native_on: bool):
        def program(p, g):  # a fresh function per run: jit caches traces per function
            s = tx.init(p)
            for _ in range(2):  # four steps: two-call and fused, twice
                u, s = tx.update(g, s, p)
                p = optax.apply_updates(p, u)
                p, s = fused_step(tx, g, s, p)
            return p, s

        # Lowered and compiled explicitly, so that this also works when the
        # first use happens while another function is being traced.
        jitted = jax.jit(program, in_shardings=cpu, out_shardings=cpu)
        if native_on:
            compiled = jitted.lower(params, grads).compile()
        else:
            with native.pure_jax():
                compiled = jitted.lower(params, grads).compile()
        return compiled(params, grads)

    got, want = run(True), run(False)
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_leaves_with_path(got)]
    eps = float(np.finfo(np.float32).eps)
    n_params = len(params)
    for i, (where, a, b) in enumerate(
        zip(paths, jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    ):
        if a.dtype != b.dtype or a.shape != b.shape:
            return f"the kernels return another type at {where}"
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        finite = np.isfinite(b)
        if not np.array_equal(np.isfinite(a), finite) or not np.array_equal(
            a[~finite], b[~finite], equal_nan=True
        ):
            return f"the kernels give other non-finite entries at {where}"
        bound = 16 * eps * (np.abs(b[finite]) + (8 * 1e-3 if i < n_params else 0.0))
        if not np.all(np.abs(a[finite] - b[finite]) <= bound):
            return f"the kernels differ from the pure-JAX path at {where}"
    return None
