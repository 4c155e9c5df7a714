"""Predictive uncertainty from the variational σ-filter on scikit-learn's digits.

Trains an MLP two ways in plain JAX + Optax: with ``optax.adam`` (the
baseline), and with ``variational_sigma_filter``, whose training loop takes
each gradient at ``training_sample(params, state)``, a draw from its own
posterior over the weights. On the test split it then compares Adam, the
σ-filter's mean parameters and its Bayesian model average (``sample_posterior``
at scale 1, temperature 1, no calibration): NLL, accuracy, expected
calibration error (15 bins) and the AUROC of predictive entropy separating
test digits from uniform-noise images (out of distribution). Saves a
reliability diagram and a histogram of the predictive entropies.

    python examples/uncertainty.py --epochs 30

``benchmarks/uncertainty_compare.py`` runs the same comparison over seeds,
on MNIST as well, with IVON alongside.
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


def reliability(lp, y, bins=15):
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


def metrics(lp, y, bins=15):
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


def entropies(lp):
    lp = np.asarray(lp, np.float64)
    return -(np.exp(lp) * lp).sum(1)


def auroc(in_dist, ood):
    """P(entropy of an OOD image > entropy of a test image), ties counted half."""
    a, b = np.asarray(in_dist)[:, None], np.asarray(ood)[None, :]
    return float(np.mean((b > a) + 0.5 * (b == a)))


def plot_entropies(rows, path):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(rows), figsize=(4 * len(rows), 3.2), sharey=True)
    bins = np.linspace(0, np.log(10), 30)
    for ax, (label, (lp, lp_noise)) in zip(np.atleast_1d(axes), rows.items(), strict=True):
        ax.hist(entropies(lp), bins=bins, alpha=0.6, density=True, label="test digits")
        ax.hist(entropies(lp_noise), bins=bins, alpha=0.6, density=True, label="noise images")
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("predictive entropy (nats)")
    np.atleast_1d(axes)[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def train(tx, params, xtr, ytr, args, *, at_samples):
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        def loss(p):
            return -jnp.mean(jnp.take_along_axis(log_probs(p, x), y[:, None], 1))

        # The variational mode's one extra line: the gradient at a posterior draw.
        where = bj.training_sample(params, state) if at_samples else params
        u, state = tx.update(jax.grad(loss)(where), state, params)
        return optax.apply_updates(params, u), state

    rng = np.random.default_rng(args.seed)
    steps = len(xtr) // args.batch_size
    for _ in range(args.epochs):
        perm = rng.permutation(len(xtr))
        for i in range(steps):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            params, state = step(params, state, xtr[idx], ytr[idx])
    return params, state


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--eta", type=float, default=None, help="the σ-filter's η (default: its own)")
    ap.add_argument(
        "--prior-precision", type=float, default=None, help="δ per example (default: its own)"
    )
    ap.add_argument(
        "--learned-prior", action="store_true", help="learn δ per array (empirical Bayes)"
    )
    ap.add_argument("--adam-lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/uncertainty"))
    args = ap.parse_args(argv)

    (xtr, ytr), (xte, yte) = load_digits(args.seed)
    n_val = len(xtr) // 5  # the validation split of the comparison benchmark, unused here
    xtr, ytr = xtr[n_val:], ytr[n_val:]
    init = init_mlp(jax.random.key(args.seed), [64, 128, 128, 10])
    rng = np.random.default_rng(args.seed)
    noise = jnp.asarray(rng.uniform(0, 1, size=(500, 64)), jnp.float32)

    adam_params, _ = train(optax.adam(args.adam_lr), init, xtr, ytr, args, at_samples=False)
    chosen = {} if args.eta is None else {"eta": args.eta}
    if args.learned_prior:
        chosen["prior_precision"] = None
    elif args.prior_precision is not None:
        chosen["prior_precision"] = args.prior_precision
    tx = bj.variational_sigma_filter(
        num_data=len(xtr), batch_size=args.batch_size, key=args.seed, **chosen
    )
    params, state = train(tx, init, xtr, ytr, args, at_samples=True)
    draws = bj.sample_posterior(jax.random.key(args.seed + 1), params, state, args.samples)

    rows = {
        "Adam": (log_probs(adam_params, xte), log_probs(adam_params, noise)),
        "σ-filter, mean": (log_probs(params, xte), log_probs(params, noise)),
        "σ-filter, model average": (bma_log_probs(draws, xte), bma_log_probs(draws, noise)),
    }
    results = {}
    print(f"{'predictor':<26} {'test NLL':>9} {'accuracy':>9} {'ECE':>7} {'OOD AUROC':>10}")
    for label, (lp, lp_noise) in rows.items():
        m = metrics(lp, yte)
        m["ood_auroc"] = auroc(entropies(lp), entropies(lp_noise))
        results[label] = m
        print(
            f"{label:<26} {m['nll']:>9.4f} {m['accuracy']:>9.4f} {m['ece']:>7.4f} "
            f"{m['ood_auroc']:>10.4f}"
        )
    sd = np.sqrt(
        np.concatenate([np.ravel(v) for v in jax.tree.leaves(bj.posterior_variance(state))])
    )
    print(
        f"posterior standard deviation: median {np.median(sd):.3g}, range [{sd.min():.3g}, {sd.max():.3g}]"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    plot_reliability(rows, yte, args.out / "reliability.png")
    plot_entropies(rows, args.out / "entropy.png")
    print(f"saved results.json, reliability.png and entropy.png in {args.out}")
    return results


if __name__ == "__main__":
    main()
