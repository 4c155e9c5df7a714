"""Bayesian model averaging with the σ-filter's posterior on scikit-learn's digits.

Trains an MLP with ``sigma_filter`` (plain JAX + Optax), then compares on the
test set the mean parameters against posterior averages drawn with
``sample_posterior`` at three scales: the raw σ (far too wide), the Laplace
scale from ``laplace_scale`` and a temperature calibrated on a held-out
validation split with ``calibrate_posterior_scale``. Also reports the
expected calibration error and the predictive entropy on noise images, and
saves a reliability diagram.

    python examples/uncertainty.py --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bayesopt_jax as bj

sys.path.insert(0, str(Path(__file__).resolve().parent))
import itertools

from train_digits import load_digits


def init_mlp(key, sizes):
    params = {}
    for i, (a, b) in enumerate(itertools.pairwise(sizes)):
        key, sub = jax.random.split(key)
        params[f"w{i}"] = jax.random.normal(sub, (a, b)) * jnp.sqrt(2.0 / a)
        params[f"b{i}"] = jnp.zeros(b)
    return params


def logits_fn(params, x):
    n = len(params) // 2
    for i in range(n):
        x = x @ params[f"w{i}"] + params[f"b{i}"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def log_probs(params, x):
    return jax.nn.log_softmax(logits_fn(params, x))


def bma_log_probs(draws, x):
    lp = jax.lax.map(lambda p: log_probs(p, x), draws)  # [K, n, C]
    return jax.scipy.special.logsumexp(lp, axis=0) - jnp.log(lp.shape[0])


def reliability(lp, y, bins=10):
    """Per confidence bin: (fraction of points, mean confidence, accuracy)."""
    p = np.exp(np.asarray(lp))
    conf, pred = p.max(1), p.argmax(1)
    rows = []
    for lo in np.linspace(0, 1, bins, endpoint=False):
        sel = (conf > lo) & (conf <= lo + 1 / bins)
        if sel.any():
            rows.append(
                (float(sel.mean()), float(conf[sel].mean()), float((pred[sel] == y[sel]).mean()))
            )
    return rows


def metrics(lp, y, bins=10):
    lp = np.asarray(lp)
    nll = float(-lp[np.arange(len(y)), y].mean())
    acc = float((lp.argmax(1) == y).mean())
    ece = sum(w * abs(a - c) for w, c, a in reliability(lp, y, bins))
    return {"nll": nll, "accuracy": acc, "ece": float(ece)}


def plot_reliability(rows, y, path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 5))
    ax.plot([0, 1], [0, 1], color="gray", lw=1, ls=":", label="perfect calibration")
    for label, (lp, _) in rows.items():
        curve = reliability(lp, y)
        ax.plot([c for _, c, _ in curve], [a for _, _, a in curve], marker="o", label=label)
    ax.set_xlabel("confidence (max predicted probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("Reliability diagram, digits test split")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def entropy(lp):
    lp = np.asarray(lp)
    return float(-(np.exp(lp) * lp).sum(1).mean())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--eta", type=float, default=3e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/uncertainty"))
    args = ap.parse_args(argv)

    (xtr, ytr), (xte, yte) = load_digits(args.seed)
    n_val = len(xtr) // 5
    xval, yval, xtr, ytr = xtr[:n_val], ytr[:n_val], xtr[n_val:], ytr[n_val:]
    params = init_mlp(jax.random.key(args.seed), [64, 128, 128, 10])
    tx = bj.sigma_filter(args.eta, b1=0.9)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            return -jnp.mean(jnp.take_along_axis(log_probs(p, x), y[:, None], 1))

        g = jax.grad(loss)(params)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    rng = np.random.default_rng(args.seed)
    steps = len(xtr) // args.batch_size
    for _ in range(args.epochs):
        perm = rng.permutation(len(xtr))
        for i in range(steps):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            params, state = step(params, state, xtr[idx], ytr[idx])

    key = jax.random.key(args.seed + 1)
    noise = jnp.asarray(rng.uniform(0, 1, size=(500, 64)), jnp.float32)
    laplace = bj.laplace_scale(state, num_data=len(xtr), batch_size=args.batch_size, params=params)

    def val_loglik(p):
        return jnp.take_along_axis(log_probs(p, xval), jnp.asarray(yval)[:, None], 1)[:, 0]

    temps = [0.01, 0.03, 0.1, 0.3, 1.0, 3.0]
    best_t, _ = bj.calibrate_posterior_scale(
        key, params, state, val_loglik, temps, num_samples=args.samples, base_scale=laplace
    )
    rows = {"mean parameters": (log_probs(params, xte), log_probs(params, noise))}
    for label, scale in [
        ("BMA, raw σ", 1.0),
        ("BMA, Laplace scale", laplace),
        (f"BMA, calibrated (T={best_t:g})", jax.tree.map(lambda s: best_t * s, laplace)),
    ]:
        if label.startswith("BMA, calibrated") and best_t == 0.0:
            continue
        draws = bj.sample_posterior(key, params, state, args.samples, scale=scale)
        rows[label] = (bma_log_probs(draws, xte), bma_log_probs(draws, noise))

    results = {}
    print(f"{'predictor':<32} {'test NLL':>9} {'test acc':>9} {'ECE':>7} {'noise entropy':>14}")
    for label, (lp, lp_noise) in rows.items():
        m = metrics(lp, yte)
        m["noise_entropy"] = entropy(lp_noise)
        results[label] = m
        print(
            f"{label:<32} {m['nll']:>9.4f} {m['accuracy']:>9.4f} {m['ece']:>7.4f} "
            f"{m['noise_entropy']:>14.4f}"
        )
    print(f"calibrated temperature: {best_t:g} (0 means the mean parameters were best)")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot_reliability(rows, yte, args.out / "reliability.png")
    print(f"saved {args.out / 'results.json'} and {args.out / 'reliability.png'}")
    return results, best_t


if __name__ == "__main__":
    main()
