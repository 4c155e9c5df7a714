"""What XLA compiles an optimizer step into, per parameter: loops, bytes, temporaries.

For each optimizer, one ``jit``-compiled step (``update`` + ``apply_updates``,
parameters and state donated) on one float32 array of ``--size`` elements is
compiled on the pure-JAX path, and its optimized HLO is read:

* ``loops``: the elementwise loops over the parameter's elements (top-level
  instructions of the entry computation with the parameter's shape);
* ``B/param``: bytes each loop reads and writes per element, summed (4 per
  full-size operand or result), against the minimum the update needs (every
  state buffer and the parameter read and written once, the gradient read
  once);
* ``temporaries``: full-size results that are not outputs of the step, each
  an extra buffer written and read again;
* ``div/sqrt``: divisions, square roots and other transcendental operations
  per element, counted in the loops' bodies.

Usage: ``python benchmarks/hlo_audit.py [--size N] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import bayesopt_jax as bj
from bayesopt_jax._src import native

OPTIMIZERS = {
    "optax.adam": lambda: optax.adam(1e-3),
    "bj.adam": lambda: bj.adam(1e-3),
    "bj.adamw": lambda: bj.adamw(1e-3, weight_decay=1e-2),
    "bj.amsgrad": lambda: bj.amsgrad(1e-3),
    "bj.adamax": lambda: bj.adamax(2e-3),
    "bj.rmsprop": lambda: bj.rmsprop(1e-3),
    "bj.adagrad": lambda: bj.adagrad(1e-2),
    "bj.sigma_filter": lambda: bj.sigma_filter(1e-3),
    "bj.sigma_filter b1=0.9": lambda: bj.sigma_filter(1e-3, b1=0.9),
    "bj.sigma_fixed_point b1=0.9": lambda: bj.sigma_fixed_point(1e-3, b1=0.9),
}
_EXPENSIVE = ("divide", "sqrt", "rsqrt", "exponential", "log", "power", "tanh")
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%(\S+)\s*=\s*(\S+)\s+(\S+?)\((.*?)\)(.*)$")


def compiled_text(tx: optax.GradientTransformation, size: int) -> str:
    params = {"w": jnp.ones((size,), jnp.float32)}
    grads = {"w": jnp.full((size,), 1e-3, jnp.float32)}
    state = tx.init(params)

    def step(p, s, g):
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    with native.pure_jax():
        lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, state, grads)
        return lowered.compile().as_text()


def _computations(text: str) -> dict[str, list[str]]:
    comps, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^(?:ENTRY\s+)?%(\S+)\s.*\{\s*$", line)
        if head:
            name = "ENTRY" if line.startswith("ENTRY") else head.group(1)
            comps[name] = []
        elif line.startswith("}"):
            name = None
        elif name is not None:
            comps[name].append(line)
    return comps


def audit(text: str, size: int, state_buffers: int) -> dict:
    full = f"f32[{size}]"
    comps = _computations(text)
    entry = comps["ENTRY"]
    root = next(line for line in entry if line.strip().startswith("ROOT"))
    outputs = set(re.findall(r"%([\w.\-]+)", root.split("tuple(", 1)[-1]))
    shapes, loops, temporaries, nbytes, expensive = {}, 0, 0, 0, 0
    for line in entry:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op, operands, rest = m.groups()
        shapes[name] = shape.split("{")[0]
        if op in ("parameter", "tuple", "bitcast", "get-tuple-element", "constant"):
            continue
        if shapes[name] != full:
            continue
        loops += 1
        ins = [o for o in re.findall(r"%([\w.\-]+)", operands) if shapes.get(o) == full]
        nbytes += 4 * (len(ins) + 1)
        if name not in outputs:
            temporaries += 1
        called = re.search(r"calls=%([\w.\-]+)", rest)
        body = comps.get(called.group(1), []) if called else [line]
        expensive += sum(
            1
            for b in body
            if (bm := _INSTR.match(b))
            and bm.group(3) in _EXPENSIVE
            and bm.group(2).split("{")[0] == full
        )
    return {
        "loops": loops,
        "bytes_per_param": nbytes,
        "minimum_bytes_per_param": 4 * (2 * (state_buffers + 1) + 1),
        "temporaries": temporaries,
        "expensive_ops": expensive,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=1 << 20)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--optimizers", nargs="+", choices=list(OPTIMIZERS), default=list(OPTIMIZERS))
    args = ap.parse_args(argv)
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, one float32 array of {args.size}"
    )
    print(
        f"{'optimizer':<30} {'loops':>5} {'B/param':>8} {'minimum':>8} {'temps':>6} {'div/sqrt':>8}"
    )
    report = {}
    for name in args.optimizers:
        tx = OPTIMIZERS[name]()
        state = tx.init({"w": jnp.ones((8,), jnp.float32)})
        buffers = sum(1 for x in jax.tree.leaves(state) if jnp.ndim(x) == 1)
        row = audit(compiled_text(tx, args.size), args.size, buffers)
        report[name] = row
        print(
            f"{name:<30} {row['loops']:>5} {row['bytes_per_param']:>8} "
            f"{row['minimum_bytes_per_param']:>8} {row['temporaries']:>6} {row['expensive_ops']:>8}"
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
