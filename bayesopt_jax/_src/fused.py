"""The fused optimizer step: parameters and state updated in place in one call.

Optax's two calls, ``tx.update`` then ``optax.apply_updates``, materialize the
updates and read them again. :func:`fused_step` does both at once: for a
chain of this package whose rule has a native CPU kernel (``adam``,
``adamw``, ``amsgrad``, ``sigma_filter``, ``sigma_fixed_point``) it is a
single native call per group of leaves that reads p, g and the state and
writes p and the state in place; for any other optimizer, device or dtype it
is exactly ``update`` followed by ``apply_updates``. The chain is read from
the description it carries (see :mod:`bayesopt_jax._src.engine`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bayesopt_jax._src import engine, native
from bayesopt_jax._src.types import PyTree


class _Plan(NamedTuple):
    """A chain ``(elementwise rule, [weight decay,] scalar scale)`` that one kernel runs."""

    rule: engine.Elementwise
    decay: engine.WeightDecay | None
    scale: optax.GradientTransformation


def _plan(tx: Any) -> _Plan | str:
    """The chain's plan, or why it has none (a sentence)."""
    chain = engine.description(tx)
    if not isinstance(chain, engine.Chain):
        return (
            "the transformation is not a chain built by bayesopt_jax (bj.adam, bj.adamw, "
            "bj.amsgrad, bj.sigma_filter, bj.sigma_fixed_point, bj.variational_sigma_filter)"
        )
    if len(chain.parts) not in (2, 3):
        return f"the chain has {len(chain.parts)} parts; a fused step takes rule, [decay,] scale"
    first, *middle, last = chain.parts
    rule = engine.description(first)
    decay = engine.description(middle[0]) if middle else None
    if not isinstance(rule, engine.Elementwise):
        return "the chain's first part is not an elementwise rule of bayesopt_jax"
    if not isinstance(engine.description(last), engine.ScalarScale):
        return "the chain's last part is not a scale by the learning rate"
    if middle and not isinstance(decay, engine.WeightDecay):
        return "the chain's middle part is not a decoupled weight decay with a constant rate"
    return _Plan(rule, decay, last)


def _two_call(tx, grads, state, params):
    updates, state = tx.update(grads, state, params)
    return optax.apply_updates(params, updates), state


def _decay_flags(decay: engine.WeightDecay | None, params: PyTree) -> list[bool] | None:
    """Per-leaf weight-decay flags, or ``None`` if the mask is not static."""
    leaves = jax.tree.leaves(params)
    if decay is None:
        return [False] * len(leaves)
    if decay.mask is None:
        return [True] * len(leaves)
    mask = decay.mask(params) if callable(decay.mask) else decay.mask
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
    *,
    strict: bool = False,
) -> tuple[PyTree, optax.OptState]:
    r"""Applies one optimizer step: ``(new_params, new_state)`` in one call.

    .. math::
        (u_t, s_t) = \text{tx.update}(g_t, s_{t-1}, \theta_{t-1}), \qquad
        \theta_t = \theta_{t-1} + u_t

    For :func:`~bayesopt_jax.adam`, :func:`~bayesopt_jax.adamw`,
    :func:`~bayesopt_jax.amsgrad`, :func:`~bayesopt_jax.sigma_filter`,
    :func:`~bayesopt_jax.sigma_fixed_point` and
    :func:`~bayesopt_jax.variational_sigma_filter` (with a fixed prior) with Python-number
    hyperparameters (η, the learning rate and schedules may be anything),
    ``eps_root=0``, no Nesterov, float32 parameters and state, a static
    ``mask``, and the native kernels built (see
    :func:`~bayesopt_jax.native_available`), it runs on the CPU as
    multi-threaded calls over all leaves (64 leaves per call) that update
    parameters and state in place: for Adam 28 bytes per parameter, where
    ``update`` + ``apply_updates`` need 36. Donate params and state to
    ``jit`` to avoid copies. Everything else, and every other device, runs
    ``tx.update`` then ``optax.apply_updates``.

    Exactness: the kernel performs, per element, the float32 operations of
    the rule as the pure path states them (for Adam
    :math:`m' = \mathrm{fma}(m, b_1, (1-b_1)g)`,
    :math:`v' = \mathrm{fma}(v, b_2, (1-b_2)g^2)`,
    :math:`u = (m' c_1)/(\sqrt{v' c_2} + \epsilon)` with
    :math:`c_i = 1/(1-b_i^t)`), then :math:`u \mathrel{+}= \lambda\theta`
    (an FMA, AdamW) and :math:`\theta' = \mathrm{fma}(u, -\alpha, \theta)`,
    with ``g`` first clipped to finite magnitudes below ``sqrt(max)/2`` as
    in the pure path. XLA regroups the pure path's operations depending on
    the surrounding code, so the two agree to within a few float32 rounding
    units of each result's terms (4 for Adam, e.g. :math:`|b_1 m| + |(1-b_1) g|`
    for :math:`m'`; the counts for AMSGrad and the σ-filter are in the test
    suite), with identical non-finite entries.

    Args:
      tx: any ``optax.GradientTransformation``.
      grads: gradients, with the structure of ``params``.
      state: ``tx``'s state.
      params: the current parameters.
      strict: raise ``ValueError`` with the reason (as :func:`fusion_reason`
        gives it) instead of running the two calls when the step cannot be
        fused.

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
    plan = _fusion_plan(tx, grads, state, params)
    if isinstance(plan, str):
        if strict:
            raise ValueError(f"fused_step(strict=True): not fused: {plan}.")
        return _two_call(tx, grads, state, params)
    plan, treedef, present, decay = plan
    ps, gs = treedef.flatten_up_to(params), treedef.flatten_up_to(grads)

    def pure(state, ps, gs):
        p, s = _two_call(tx, treedef.unflatten(gs), state, treedef.unflatten(ps))
        return jax.tree.leaves(p), s

    @jax.custom_jvp
    def kernel(state, ps, gs):
        rule_state, *middle, scale_state = state
        prepared = plan.rule.prepare(rule_state)
        # The scalar the chain multiplies by (-lr, or -1), as the chain forms it.
        factor, scale_state = plan.scale.update(jnp.ones((), jnp.float32), scale_state)
        wd = 0.0 if plan.decay is None else plan.decay.weight_decay
        factor_and_decay = jnp.stack([jnp.asarray(factor, jnp.float32), jnp.float32(wd)])
        slots = plan.rule.read(rule_state)
        states = [treedef.flatten_up_to(slots[j]) for j in present]
        new_ps, new = native.step(
            prepared.kernel.rule, prepared.kernel.operand, factor_and_decay, ps, gs, states, decay
        )
        trees: list[Any] = [None] * len(slots)
        for slot, j in enumerate(present):
            trees[j] = treedef.unflatten(new[slot])
        return new_ps, (plan.rule.rebuild(rule_state, prepared, trees), *middle, scale_state)

    kernel.defjvp(lambda primals, tangents: jax.jvp(pure, primals, tangents))
    new_ps, new_state = native.on_cpu(kernel, pure, state, ps, gs)
    return treedef.unflatten(new_ps), new_state


def _fusion_plan(tx, grads, state, params):
    """``(plan, treedef, present, decay flags)`` for a fused step, or why there is none."""
    plan = _plan(tx)
    if isinstance(plan, str):
        return plan
    if not native.use_native():
        return f"the native kernels are not in use ({native.unavailable_reason() or 'pure_jax()'})"
    prepared = plan.rule.prepare(state[0])
    if prepared.kernel is None:
        return (
            "this configuration of the rule has no native kernel (hyperparameters must be "
            "Python numbers, eps_root=0, no Nesterov; AdaMax, RMSProp and AdaGrad have none)"
        )
    if prepared.kernel.reads_inputs:
        return (
            "this rule's update reads the parameters (the kernel updates its state and "
            "XLA forms the update), so it runs as two calls"
        )
    slots = plan.rule.read(state[0])
    present = [j for j, tree in enumerate(slots) if tree is not None]
    ps, treedef = jax.tree.flatten(params)
    if not ps:
        return "there are no parameters"
    try:
        gs = treedef.flatten_up_to(grads)
        cols = [treedef.flatten_up_to(slots[j]) for j in present]
    except (ValueError, TypeError):
        return "the gradients or the state do not have the parameters' structure"
    decay = _decay_flags(plan.decay, params)
    if decay is None:
        return "the weight-decay mask is not a static tree of booleans"
    for i, (p, g) in enumerate(zip(ps, gs, strict=True)):
        if not native.is_native_leaf(p, g, *(col[i] for col in cols)):
            return (
                f"leaf {i} is not a float32 array of the CPU with float32 gradient and state "
                f"(shape {jnp.shape(p)}, dtype {jnp.result_type(p)}; 8-bit or other-dtype state, "
                "other devices and traced hyperparameters run the two calls)"
            )
    return plan, treedef, present, decay


def fusion_reason(
    tx: optax.GradientTransformation, grads: PyTree, state: optax.OptState, params: PyTree
) -> str | None:
    """Why :func:`fused_step` would run ``update`` + ``apply_updates`` here; ``None`` if it fuses.

    Args:
      tx: the optimizer, as for :func:`fused_step`.
      grads: the gradients.
      state: ``tx``'s state.
      params: the current parameters.

    Returns:
      ``None`` when the step runs as one native call per group of leaves,
      otherwise a sentence naming the first condition that fails.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> import bayesopt_jax as bj
      >>> p = {"w": jnp.ones(3)}
      >>> sgd = optax.sgd(0.1)
      >>> print(bj.fusion_reason(sgd, p, sgd.init(p), p)[:39])
      the transformation is not a chain built
      >>> try:
      ...     bj.fused_step(sgd, p, sgd.init(p), p, strict=True)
      ... except ValueError as err:
      ...     print(str(err)[:38])
      fused_step(strict=True): not fused: th
    """
    plan = _fusion_plan(tx, grads, state, params)
    return plan if isinstance(plan, str) else None


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
