"""Train a Flax NNX MLP on scikit-learn's digits with every optimizer of bayesopt_jax.

The digits data set ships with scikit-learn (1,797 8x8 images, no download).
For each optimizer the script trains the same MLP from the same
initialisation, prints a results table (final train loss, test loss and
accuracy, time per step) and saves the training-loss curves as a PNG.

    python examples/train_digits.py                      # all optimizers
    python examples/train_digits.py --optimizers adam sigma_filter --epochs 10
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bayesopt_jax as bj


def optimizer_zoo(lr: float, state_dtype=None) -> dict[str, optax.GradientTransformation]:
    """Every optimizer of the library, at hyperparameters a user would start from.

    ``state_dtype`` (e.g. ``jnp.bfloat16``) sets the moment dtypes of the
    optimizers that take ``mu_dtype``/``nu_dtype`` (adam, adamw, amsgrad).
    """
    dt = dict(mu_dtype=state_dtype, nu_dtype=state_dtype)
    zoo = {
        "adam": bj.adam(lr, **dt),
        "adamw": bj.adamw(lr, weight_decay=1e-4, **dt),
        "amsgrad": bj.amsgrad(lr, **dt),
        "adamax": bj.adamax(2 * lr),
        "rmsprop": bj.rmsprop(lr, decay=0.99),
        "adagrad": bj.adagrad(30 * lr),
    }
    if hasattr(bj, "sigma_filter"):
        zoo["sigma_filter"] = bj.sigma_filter(lr, b1=0.9)
        zoo["sigma_fixed_point"] = bj.sigma_fixed_point(lr, b1=0.9)
    return zoo


class MLP(nnx.Module):
    def __init__(self, sizes: list[int], *, rngs: nnx.Rngs):
        self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in itertools.pairwise(sizes)])

    def __call__(self, x):
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)


def load_digits(seed: int, test_fraction: float = 0.25):
    from sklearn.datasets import load_digits as _load

    data = _load()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def loss_fn(model, x, y):
    logits = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


@nnx.jit
def train_step(model, optimizer, x, y):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def evaluate(model, x, y):
    logits = model(x)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return nll, acc


def train_one(name, tx, data, args, progress):
    (xtr, ytr), (xte, yte) = data
    model = MLP([64, *args.hidden, 10], rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(xtr) // args.batch_size
    losses = []
    # Warm-up compile outside the timed region.
    train_step(model, optimizer, xtr[: args.batch_size], ytr[: args.batch_size])
    model = MLP([64, *args.hidden, 10], rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step_time = 0.0
    for _epoch in range(args.epochs):
        perm = rng.permutation(len(xtr))
        epoch_loss = []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            t0 = time.perf_counter()
            loss = train_step(model, optimizer, xtr[idx], ytr[idx])
            loss = float(loss)
            step_time += time.perf_counter() - t0
            epoch_loss.append(loss)
            progress.update(1)
        losses.append(float(np.mean(epoch_loss)))
    train_nll, _ = evaluate(model, xtr, ytr)
    test_nll, test_acc = evaluate(model, xte, yte)
    n_steps = args.epochs * steps_per_epoch
    return {
        "optimizer": name,
        "train_loss": float(train_nll),
        "test_nll": float(test_nll),
        "test_accuracy": float(test_acc),
        "ms_per_step": 1e3 * step_time / n_steps,
        "epoch_losses": losses,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="learning rate / η")
    parser.add_argument("--hidden", type=int, nargs="*", default=[128, 128])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("outputs/train_digits"))
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--state-dtype",
        choices=["float32", "bfloat16", "8bit"],
        default="float32",
        help="moment storage of adam, adamw and amsgrad (arithmetic stays float32); "
        "8bit: block-wise 8-bit codes",
    )
    args = parser.parse_args(argv)

    state_dtype = bj.Blockwise8() if args.state_dtype == "8bit" else jnp.dtype(args.state_dtype)
    zoo = optimizer_zoo(args.lr, state_dtype)
    names = args.optimizers or list(zoo)
    unknown = sorted(set(names) - set(zoo))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(zoo)}")
    data = load_digits(args.seed)
    total = len(names) * args.epochs * (len(data[0][0]) // args.batch_size)

    try:
        from tqdm import tqdm

        progress = tqdm(total=total, disable=args.no_progress, unit="step")
    except ImportError:  # tqdm is optional
        progress = type("P", (), {"update": lambda self, n: None, "close": lambda self: None})()

    results = []
    for name in names:
        if hasattr(progress, "set_description"):
            progress.set_description(name)
        results.append(train_one(name, zoo[name], data, args, progress))
    progress.close()

    header = f"{'optimizer':<18} {'train loss':>10} {'test NLL':>9} {'test acc':>9} {'ms/step':>8}"
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['optimizer']:<18} {r['train_loss']:>10.4f} {r['test_nll']:>9.4f} "
            f"{r['test_accuracy']:>9.4f} {r['ms_per_step']:>8.3f}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in results:
        ax.plot(np.arange(1, args.epochs + 1), r["epoch_losses"], label=r["optimizer"])
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (cross-entropy)")
    ax.set_title(f"MLP on sklearn digits, lr/η = {args.lr:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "loss_curves.png", dpi=120)
    print(f"saved {args.out / 'loss_curves.png'} and {args.out / 'results.json'}")
    print(f"JAX backend: {jax.default_backend()}")
    return results


if __name__ == "__main__":
    main()
