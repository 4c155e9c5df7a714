"""Precomputes the playground's trajectories with bayesopt_jax.

    python docs/playground/make_data.py      # writes docs/playground/data.json

For every test function and optimizer, every point of the hyperparameter
grid is one ``jax.vmap`` lane of a single compiled ``lax.scan``.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bayesopt_jax as bj

STEPS = 150
LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1]
B1S = [0.0, 0.5, 0.9, 0.99]
B2S = [0.9, 0.99, 0.999]

# name: (f, start, view box [xmin, xmax, ymin, ymax]); the same formulas are in index.html
FUNCTIONS = {
    "rosenbrock": (lambda x, y: (1 - x) ** 2 + 100 * (y - x**2) ** 2, (-1.2, 1.0), [-2, 2, -1, 3]),
    "ill-conditioned quadratic": (
        lambda x, y: 0.5 * (25 * x**2 + 0.25 * y**2),
        (1.0, 1.5),
        [-2, 2, -2, 2],
    ),
    "saddle": (
        lambda x, y: 0.5 * x**2 - 0.5 * y**2 + 0.025 * y**4,
        (1.5, 0.01),
        [-2, 2, -4.5, 4.5],
    ),
}
OPTIMIZERS = {
    "adam": lambda lr, b1, b2: bj.adam(lr, b1, b2),
    "amsgrad": lambda lr, b1, b2: bj.amsgrad(lr, b1, b2),
    "sigma_filter": lambda lr, b1, b2: bj.sigma_filter(lr, b2, b1=b1),
}


def trajectories(f, start, make):
    def run(lr, b1, b2):
        tx = make(lr, b1, b2)
        p = jnp.asarray(start, jnp.float32)
        grad = jax.grad(lambda p: f(p[0], p[1]))

        def step(carry, _):
            p, s = carry
            u, s = tx.update(grad(p), s, p)
            p = optax.apply_updates(p, u)
            return (p, s), p

        _, path = jax.lax.scan(step, (p, tx.init(p)), None, length=STEPS)
        return jnp.concatenate([p[None], path])

    grid = list(itertools.product(LRS, B1S, B2S))
    lr, b1, b2 = (jnp.asarray(v, jnp.float32) for v in zip(*grid, strict=True))
    paths = np.asarray(jax.jit(jax.vmap(run))(lr, b1, b2))
    return {f"{a}|{b}|{c}": path for (a, b, c), path in zip(grid, paths, strict=True)}


def main():
    data = {"steps": STEPS, "lr": LRS, "b1": B1S, "b2": B2S, "functions": {}}
    for fname, (f, start, box) in FUNCTIONS.items():
        entry = {"start": start, "box": box, "paths": {}}
        for oname, make in OPTIMIZERS.items():
            paths = trajectories(f, start, make)
            # non-finite points (a divergent run) are cut off; 4 decimals are plenty to draw
            entry["paths"][oname] = {
                k: [
                    [round(float(x), 4), round(float(y), 4)]
                    for x, y in v
                    if np.isfinite([x, y]).all()
                ]
                for k, v in paths.items()
            }
        data["functions"][fname] = entry
    out = Path(__file__).with_name("data.json")
    out.write_text(json.dumps(data, separators=(",", ":")))
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
