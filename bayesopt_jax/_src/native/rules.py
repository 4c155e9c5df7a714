"""The native rules' Python side, declared once: names, scalars, state buffers.

Each rule of ``kernels.cc`` has one entry here: the class of its scalars
operand (a NamedTuple whose field order is the order the C++ rule reads
them), the number of state buffers it updates, which of them are signed
(the first moment; the others are >= 0, which the 8-bit storage and the
rounding bounds use), and its handlers' C++ symbol. The library exports its
own table (:func:`parse_table`), and loading refuses a library whose table
differs from this one.

Adding a rule: one ``BJ_RULE`` line in ``kernels.cc`` (with the rule's
struct), one entry here, its float64 transcription in
:mod:`bayesopt_jax._src.native.transcriptions`, and a transformation whose
``prepare`` names it (see the architecture page of the documentation).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class AdamScalars(NamedTuple):
    """Scalars of the ``adam`` rule: ``u = (m'·r1)/(sqrt(v'·r2) + eps)``."""

    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    r1: Any  # 1/(1 - b1^t), 1 where not corrected
    r2: Any  # 1/(1 - b2^t), 1 where not corrected
    eps: Any
    clip: Any  # gradients are clipped to ±clip (finite values only)


class AmsgradScalars(NamedTuple):
    """Scalars of the ``amsgrad`` rule: Adam's, and which maximum is kept."""

    b1: Any
    one_minus_b1: Any
    b2: Any
    one_minus_b2: Any
    r1: Any
    r2: Any
    eps: Any
    clip: Any
    raw: Any  # 1: the maximum of the raw v (PyTorch), 0: of the corrected one (Optax)


class SigmaScalars(NamedTuple):
    """Scalars of the ``sigma`` and ``sigma_momentum`` rules (the σ-filter)."""

    beta: Any
    one_minus_beta: Any
    rs: Any  # 1/(1 - beta^t)
    floor: Any  # eps added to ŝ
    eta: Any
    eta2: Any
    first: Any  # 1 at a step that starts σ at its fixed point
    ratio_on: Any
    kappa: Any  # max_ratio
    max_on: Any
    sigma_max: Any
    fixed_point: Any
    clip: Any
    b1: Any
    one_minus_b1: Any
    rm: Any  # 1/(1 - b1^t)


class VariationalScalars(
    NamedTuple(
        "VariationalScalars",
        [(name, Any) for name in SigmaScalars._fields]
        + [("gamma", Any), ("one_minus_gamma", Any), ("rp", Any)],
    )
):
    """Scalars of the ``variational`` and ``variational_momentum`` rules: the σ-filter's,
    then the curvature EMA's ``r ← γ r + (1-γ)(g - m̂_{t-1})²``: ``gamma`` (γ,
    ``hess_decay``), ``one_minus_gamma`` and ``rp = 1/(1 - b1^(t-1))`` (debiases
    m before this step; 0 at the first step, 1 where not corrected)."""

    __slots__ = ()

    @property
    def filter(self) -> SigmaScalars:
        return SigmaScalars(*self[: len(SigmaScalars._fields)])


class Rule(NamedTuple):
    """One native rule: its scalars' class, its state buffers (and which are signed)."""

    scalars: type
    states: int
    signed: tuple[int, ...]  # the state buffers that may be negative

    @property
    def n_scalars(self) -> int:
        return len(self.scalars._fields)


RULES = {
    "adam": Rule(AdamScalars, 2, (0,)),
    "amsgrad": Rule(AmsgradScalars, 3, (0,)),
    "sigma": Rule(SigmaScalars, 2, ()),
    "sigma_momentum": Rule(SigmaScalars, 3, (0,)),
    "variational": Rule(VariationalScalars, 3, ()),
    "variational_momentum": Rule(VariationalScalars, 4, (0,)),
}


def pack(scalars: NamedTuple) -> jax.Array:
    """A rule's scalars as the float32 operand the kernels read, in field order."""
    return jnp.stack([jnp.asarray(x, jnp.float32) for x in scalars])


def unpack(rule: str, operand: Any) -> NamedTuple:
    """The operand (an array or a sequence) as the rule's named scalars."""
    cls = RULES[rule].scalars
    return cls(*(operand[i] for i in range(len(cls._fields))))


def table() -> str:
    """This side's table in the library's format: ``name:states:scalars`` joined by ``;``."""
    return ";".join(f"{n}:{r.states}:{r.n_scalars}" for n, r in RULES.items())


def parse_table(text: str) -> dict[str, tuple[int, int]]:
    """The library's exported table as ``{name: (states, scalars)}``."""
    out = {}
    for entry in filter(None, text.split(";")):
        name, states, scalars, *_ = entry.split(":")
        out[name] = (int(states), int(scalars))
    return out


def parse_handlers(text: str) -> dict[str, tuple[str, ...]]:
    """The handler symbols the library names for each rule: ``(update, step, 8-bit)``."""
    out = {}
    for entry in filter(None, text.split(";")):
        name, _, _, handlers = entry.split(":")
        out[name] = tuple(handlers.split(","))
    return out


def table_mismatch(text: str) -> str | None:
    """How the library's table differs from :data:`RULES`, or ``None``."""
    theirs = parse_table(text)
    ours = {n: (r.states, r.n_scalars) for n, r in RULES.items()}
    if theirs == ours:
        return None
    diff = sorted(set(theirs.items()) ^ set(ours.items()))
    return f"its rule table differs from this package's: {diff}"
