"""Two experiments of Kingma & Ba (2015), scaled down to scikit-learn's digits.

1. **Logistic regression** (the paper's Figure 1, left, on MNIST): a linear
   softmax classifier trained with minibatches of 128 and a step size decayed
   as α/√t, comparing Adam, AdaGrad, RMSProp and SGD with Nesterov momentum.
   Each optimizer's α is picked by a grid search on the final training loss,
   as the paper tuned its hyperparameters.
2. **Bias-correction ablation** (the paper's Figure 4, on a variational
   autoencoder): a small autoencoder of digits trained with Adam for
   β1 ∈ {0, 0.9}, β2 ∈ {0.99, 0.999, 0.9999} and a range of step sizes, with
   and without the bias correction; the loss after 10 and after 100 epochs.

    python examples/kingma_ba.py                 # both, about a minute on 2 CPU cores
    python examples/kingma_ba.py --epochs-logreg 10 --epochs-ae 5 20

Every run of a grid is one ``jax.vmap`` lane of a single compiled training
loop: hyperparameters are traced arrays (the library's factories accept them).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bayesopt_jax as bj

LOGREG_LRS = [1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0, 10.0]


def load(seed: int = 0):
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    return x[perm], y[perm]


def batches(n: int, batch: int, epochs: int, seed: int) -> np.ndarray:
    """Indices [steps, batch]: each epoch a fresh permutation, last partial batch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n // batch
    return np.concatenate(
        [rng.permutation(n)[: per_epoch * batch].reshape(per_epoch, batch) for _ in range(epochs)]
    )


# --------------------------------------------------------------------------
# 1. logistic regression
# --------------------------------------------------------------------------


def logreg_optimizer(name: str, lr):
    schedule = lambda t: lr / jnp.sqrt(t + 1.0)  # noqa: E731  α_t = α/√t, t from 1
    return {
        "Adam": lambda: bj.adam(schedule),
        # The paper's AdaGrad and RMSProp: accumulators from 0, ε outside the root.
        "AdaGrad": lambda: bj.adagrad(
            schedule, initial_accumulator_value=0.0, eps=1e-10, eps_in_sqrt=False
        ),
        "RMSProp": lambda: bj.rmsprop(schedule, decay=0.99, eps_in_sqrt=False),
        "SGDNesterov": lambda: optax.sgd(schedule, momentum=0.9, nesterov=True),
    }[name]()


def run_logreg(x, y, epochs: int, batch: int, seed: int):
    idx = jnp.asarray(batches(len(x), batch, epochs, seed))
    x, y = jnp.asarray(x), jnp.asarray(y)
    steps_per_epoch = len(x) // batch

    def nll(params, xb, yb):
        logits = xb @ params["w"] + params["b"]
        return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

    def train(name, lr):
        tx = logreg_optimizer(name, lr)
        params = {"w": jnp.zeros((64, 10)), "b": jnp.zeros(10)}

        def step(carry, ib):
            p, s = carry
            g = jax.grad(nll)(p, x[ib], y[ib])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        def epoch(carry, ids):
            carry, _ = jax.lax.scan(step, carry, ids)
            return carry, nll(carry[0], x, y)  # full training-set NLL after the epoch

        ids = idx.reshape(epochs, steps_per_epoch, batch)
        _, curve = jax.lax.scan(epoch, (params, tx.init(params)), ids)
        return curve

    results = {}
    for name in ["Adam", "AdaGrad", "RMSProp", "SGDNesterov"]:
        curves = jax.jit(jax.vmap(lambda lr, name=name: train(name, lr)))(jnp.asarray(LOGREG_LRS))
        curves = np.asarray(curves)
        finals = np.where(np.isfinite(curves[:, -1]), curves[:, -1], np.inf)
        best = int(np.argmin(finals))
        results[name] = {
            "best_lr": LOGREG_LRS[best],
            "curve": curves[best].tolist(),
            "final_nll_by_lr": dict(zip(map(str, LOGREG_LRS), finals.tolist(), strict=True)),
        }
    return results


# --------------------------------------------------------------------------
# 2. bias-correction ablation on an autoencoder
# --------------------------------------------------------------------------

AE_LOG_LRS = [-4.0, -3.5, -3.0, -2.5, -2.0, -1.5, -1.0]
AE_B2 = [0.99, 0.999, 0.9999]
AE_B1 = [0.0, 0.9]


def init_ae(key, sizes=(64, 32, 8, 32, 64)):
    params = []
    for a, b in itertools.pairwise(sizes):
        key, sub = jax.random.split(key)
        params.append({"w": jax.random.normal(sub, (a, b)) / np.sqrt(a), "b": jnp.zeros(b)})
    return params


def ae_loss(params, xb):
    h = xb
    for layer in params[:-1]:
        h = jax.nn.softplus(h @ layer["w"] + layer["b"])
    logits = h @ params[-1]["w"] + params[-1]["b"]
    # Bernoulli reconstruction log-likelihood of pixel intensities in [0, 1], per image.
    return optax.sigmoid_binary_cross_entropy(logits, xb).sum(-1).mean()


def run_ablation(x, epochs_checkpoints: list[int], batch: int, seed: int):
    epochs = max(epochs_checkpoints)
    idx = jnp.asarray(batches(len(x), batch, epochs, seed))
    x = jnp.asarray(x)
    steps_per_epoch = len(x) // batch
    init = init_ae(jax.random.key(seed))

    def train(lr, b1, b2, *, bias_correction):
        tx = optax.chain(
            bj.scale_by_adam(b1, b2, 1e-8, bias_correction=bias_correction),
            optax.scale_by_learning_rate(lr),
        )

        def step(carry, ib):
            p, s = carry
            g = jax.grad(ae_loss)(p, x[ib])
            u, s = tx.update(g, s, p)
            return (optax.apply_updates(p, u), s), None

        def epoch(carry, ids):
            carry, _ = jax.lax.scan(step, carry, ids)
            return carry, ae_loss(carry[0], x)

        ids = idx.reshape(epochs, steps_per_epoch, batch)
        _, curve = jax.lax.scan(epoch, (init, tx.init(init)), ids)
        return curve

    grid = [(10.0**lg, b1, b2) for b1 in AE_B1 for b2 in AE_B2 for lg in AE_LOG_LRS]
    lrs, b1s, b2s = (jnp.asarray(v) for v in zip(*grid, strict=True))
    results = []
    for bc in (True, False):
        fn = jax.jit(jax.vmap(lambda lr, b1, b2, bc=bc: train(lr, b1, b2, bias_correction=bc)))
        curves = np.asarray(fn(lrs, b1s, b2s))
        for (lr, b1, b2), curve in zip(grid, curves, strict=True):
            results.append(
                {
                    "bias_correction": bc,
                    "lr": lr,
                    "b1": b1,
                    "b2": b2,
                    **{f"loss_epoch_{e}": float(curve[e - 1]) for e in epochs_checkpoints},
                }
            )
    return results


# --------------------------------------------------------------------------
# plots and report
# --------------------------------------------------------------------------


def plot(logreg, ablation, checkpoints, out: Path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, r in logreg.items():
        curve = r["curve"]
        ax.plot(np.arange(1, len(curve) + 1), curve, label=f"{name} (α={r['best_lr']:g})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training NLL")
    ax.set_title("Logistic regression on digits, α/√t")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "logreg.png", dpi=120)
    plt.close(fig)

    fig, axes = plt.subplots(
        len(AE_B1), len(checkpoints), figsize=(5 * len(checkpoints), 7), squeeze=False
    )
    for i, b1 in enumerate(AE_B1):
        for j, e in enumerate(checkpoints):
            ax = axes[i, j]
            for k, b2 in enumerate(AE_B2):
                for bc, ls in ((True, "-"), (False, "--")):
                    rows = [
                        r
                        for r in ablation
                        if r["b1"] == b1 and r["b2"] == b2 and r["bias_correction"] == bc
                    ]
                    loss = [r[f"loss_epoch_{e}"] for r in rows]
                    loss = [v if np.isfinite(v) else np.nan for v in loss]
                    label = f"β2={b2}" + ("" if bc else ", no correction")
                    ax.plot(AE_LOG_LRS, loss, ls, color=f"C{k}", marker="o", ms=3, label=label)
            ax.set_title(f"β1={b1}, after {e} epochs")
            ax.set_xlabel("log10(step size)")
            ax.set_ylabel("training loss (nats / image)")
            ax.set_ylim(top=min(ax.get_ylim()[1], 60))
    axes[0, 0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "bias_correction.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs-logreg", type=int, default=45)
    ap.add_argument("--epochs-ae", type=int, nargs="+", default=[10, 100])
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/kingma_ba"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    x, y = load(args.seed)

    logreg = run_logreg(x, y, args.epochs_logreg, args.batch_size, args.seed)
    print(f"Logistic regression, {args.epochs_logreg} epochs, batch {args.batch_size}, α/√t")
    print(f"{'optimizer':<12} {'best α':>7} {'final NLL':>10}")
    for name, r in logreg.items():
        print(f"{name:<12} {r['best_lr']:>7g} {r['curve'][-1]:>10.4f}")

    checkpoints = sorted(args.epochs_ae)
    ablation = run_ablation(x, checkpoints, args.batch_size, args.seed)
    last = checkpoints[-1]
    print(f"\nAutoencoder, Adam: best loss over step sizes (nats/image), epoch {checkpoints}")
    print(
        f"{'β1':>4} {'β2':>7} {'correction':>11} "
        + " ".join(f"{'ep ' + str(e):>9}" for e in checkpoints)
        + f" {'α at ep ' + str(last):>10}"
    )
    summary = []
    for b1 in AE_B1:
        for b2 in AE_B2:
            for bc in (True, False):
                rows = [
                    r
                    for r in ablation
                    if r["b1"] == b1 and r["b2"] == b2 and r["bias_correction"] == bc
                ]
                best = {}
                for e in checkpoints:
                    vals = [r[f"loss_epoch_{e}"] for r in rows]
                    vals = [v if np.isfinite(v) else np.inf for v in vals]
                    best[e] = min(vals)
                lr_best = rows[
                    int(
                        np.argmin(
                            [
                                r[f"loss_epoch_{last}"]
                                if np.isfinite(r[f"loss_epoch_{last}"])
                                else np.inf
                                for r in rows
                            ]
                        )
                    )
                ]["lr"]
                diverged = sum(not np.isfinite(r[f"loss_epoch_{last}"]) for r in rows)
                summary.append(
                    {
                        "b1": b1,
                        "b2": b2,
                        "bias_correction": bc,
                        "best": best,
                        "best_lr": lr_best,
                        "diverged_runs": diverged,
                    }
                )
                print(
                    f"{b1:>4} {b2:>7} {'yes' if bc else 'no':>11} "
                    + " ".join(f"{best[e]:>9.3f}" for e in checkpoints)
                    + f" {lr_best:>10.2g}"
                )

    plot(logreg, ablation, checkpoints, args.out)
    (args.out / "results.json").write_text(
        json.dumps({"logreg": logreg, "ablation": ablation, "ablation_summary": summary}, indent=2)
    )
    print(f"saved {args.out / 'logreg.png'}, {args.out / 'bias_correction.png'} and results.json")
    return logreg, ablation, summary


if __name__ == "__main__":
    main()
