"""Train a Flax NNX MLP on scikit-learn's digits with every optimizer of bayesopt_jax.

The digits data set ships with scikit-learn (1,797 8x8 images, no download).
For each optimizer the script trains the same MLP from the same
initialisation, prints a results table (final train loss, test loss and
accuracy, an out-of-distribution AUROC, time per step) and saves the
training-loss curves as a PNG. ``variational_sigma_filter`` and
``variational_newton`` run with their defaults (only the data and batch
sizes given) and take each gradient at a draw from their posterior; each
has a second row, the model average over 32 posterior draws. The AUROC is that of the predictive entropy separating
the test digits from 500 uniform-noise images (1 = always tells them apart).

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
from bayesopt_jax.nnx import value_and_grad_at_sample

# the variational optimizers: gradients at a posterior draw, and a model-average row
VARIATIONAL = ("variational_sigma_filter", "variational_newton")
# learning rate (or η) of each optimizer relative to --lr
LR_FACTOR = {"adamax": 2, "adagrad": 30}


def optimizer_zoo(
    lr: float, state_dtype=None, *, num_data: int | None = None, batch_size: int = 64
) -> dict[str, optax.GradientTransformation]:
    """Every optimizer of the library, at hyperparameters a user would start from.

    ``state_dtype`` (e.g. ``jnp.bfloat16``) sets the moment dtypes of the
    optimizers that take ``mu_dtype``/``nu_dtype`` (adam, adamw, amsgrad).
    With ``num_data``, the two variational optimizers are added with their defaults.
    """
    dt = dict(mu_dtype=state_dtype, nu_dtype=state_dtype)
    zoo = {
        "adam": bj.adam(lr, **dt),
        "adamw": bj.adamw(lr, weight_decay=1e-4, **dt),
        "amsgrad": bj.amsgrad(lr, **dt),
        "adamax": bj.adamax(LR_FACTOR["adamax"] * lr),
        "rmsprop": bj.rmsprop(lr, decay=0.99),
        "adagrad": bj.adagrad(LR_FACTOR["adagrad"] * lr),
        "sigma_filter": bj.sigma_filter(lr, b1=0.9),
        "sigma_fixed_point": bj.sigma_fixed_point(lr, b1=0.9),
    }
    if num_data is not None:
        sizes = dict(num_data=num_data, batch_size=batch_size)
        zoo["variational_sigma_filter"] = bj.variational_sigma_filter(**sizes)
        zoo["variational_newton"] = bj.variational_newton(**sizes)
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
def train_step_at_sample(model, optimizer, x, y):
    """The same step with the gradient taken at the optimizer's posterior draw."""
    loss, grads = value_and_grad_at_sample(loss_fn, model, optimizer, x, y)
    optimizer.update(model, grads)
    return loss


@nnx.jit
def evaluate(model, x, y):
    logits = model(x)
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    acc = jnp.mean(jnp.argmax(logits, -1) == y)
    return nll, acc


@nnx.jit
def log_probs(model, x):
    return jax.nn.log_softmax(model(x))


def entropy_auroc(lp_test: np.ndarray, lp_ood: np.ndarray) -> float:
    """AUROC of the predictive entropy, OOD (positive) against test (negative) inputs."""
    from sklearn.metrics import roc_auc_score

    ent = lambda lp: -(np.exp(lp) * lp).sum(1)  # noqa: E731
    scores = np.r_[ent(lp_test), ent(lp_ood)]
    return float(roc_auc_score(np.r_[np.zeros(len(lp_test)), np.ones(len(lp_ood))], scores))


def model_average(model, optimizer, xs, samples: int, seed: int) -> list[np.ndarray]:
    """log of the mean predictive over ``samples`` posterior draws, for each input array."""
    mean = nnx.as_pure(nnx.state(model, nnx.Param))
    draws = bj.sample_posterior(
        jax.random.key(seed), mean, nnx.as_pure(optimizer.opt_state), samples
    )
    total = [[] for _ in xs]
    for k in range(samples):
        nnx.update(model, jax.tree.map(lambda d, k=k: d[k], draws))
        for acc, x in zip(total, xs, strict=True):
            acc.append(np.asarray(log_probs(model, x), np.float64))
    nnx.update(model, mean)
    return [np.logaddexp.reduce(np.stack(a), axis=0) - np.log(samples) for a in total]


def train_one(name, tx, data, args, progress, ood):
    (xtr, ytr), (xte, yte) = data
    step_fn = train_step_at_sample if name in VARIATIONAL else train_step
    model = MLP([64, *args.hidden, 10], rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(args.seed)
    steps_per_epoch = len(xtr) // args.batch_size
    losses = []
    # Warm-up compile outside the timed region.
    step_fn(model, optimizer, xtr[: args.batch_size], ytr[: args.batch_size])
    model = MLP([64, *args.hidden, 10], rngs=nnx.Rngs(args.seed))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    step_time = 0.0
    for _epoch in range(args.epochs):
        perm = rng.permutation(len(xtr))
        epoch_loss = []
        for i in range(steps_per_epoch):
            idx = perm[i * args.batch_size : (i + 1) * args.batch_size]
            t0 = time.perf_counter()
            loss = step_fn(model, optimizer, xtr[idx], ytr[idx])
            loss = float(loss)
            step_time += time.perf_counter() - t0
            epoch_loss.append(loss)
            progress.update(1)
        losses.append(float(np.mean(epoch_loss)))
    train_nll, _ = evaluate(model, xtr, ytr)
    test_nll, test_acc = evaluate(model, xte, yte)
    n_steps = args.epochs * steps_per_epoch
    auroc = entropy_auroc(np.asarray(log_probs(model, xte)), np.asarray(log_probs(model, ood)))
    out = {
        "optimizer": name,
        "train_loss": float(train_nll),
        "test_nll": float(test_nll),
        "test_accuracy": float(test_acc),
        "ood_auroc": auroc,
        "ms_per_step": 1e3 * step_time / n_steps,
        "epoch_losses": losses,
    }
    if name in VARIATIONAL:
        lp_tr, lp_te, lp_ood = model_average(
            model, optimizer, [xtr, xte, ood], args.samples, args.seed + 1
        )
        out["average"] = {
            "train_loss": float(-lp_tr[np.arange(len(ytr)), ytr].mean()),
            "test_nll": float(-lp_te[np.arange(len(yte)), yte].mean()),
            "test_accuracy": float((lp_te.argmax(1) == yte).mean()),
            "ood_auroc": entropy_auroc(lp_te, lp_ood),
        }
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizers", nargs="*", default=None, help="names (default: all)")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--lr",
        type=float,
        default=3e-3,
        help="learning rate / η (adamax: 2×, adagrad: 30×; the variational optimizers keep their defaults)",
    )
    parser.add_argument("--samples", type=int, default=32, help="draws in the model average")
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
    data = load_digits(args.seed)
    n_train = len(data[0][0])
    zoo = optimizer_zoo(args.lr, state_dtype, num_data=n_train, batch_size=args.batch_size)
    if args.state_dtype != "float32":
        for name in VARIATIONAL:  # their 8-bit storage is a keyword of their own (Memory guide)
            zoo.pop(name)
    names = args.optimizers or list(zoo)
    unknown = sorted(set(names) - set(zoo))
    if unknown:
        parser.error(f"unknown optimizers {unknown}; choose from {sorted(zoo)}")
    ood = np.random.default_rng(args.seed).uniform(0, 1, size=(500, 64)).astype(np.float32)
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
        results.append(train_one(name, zoo[name], data, args, progress, ood))
    progress.close()

    header = (
        f"{'optimizer':<26} {'train loss':>10} {'test NLL':>9} {'test acc':>9} "
        f"{'OOD AUROC':>9} {'ms/step':>8}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        print(
            f"{r['optimizer']:<26} {r['train_loss']:>10.4f} {r['test_nll']:>9.4f} "
            f"{r['test_accuracy']:>9.4f} {r['ood_auroc']:>9.4f} {r['ms_per_step']:>8.3f}"
        )
        if "average" in r:
            a = r["average"]
            label = f"  model average ({args.samples})"
            print(
                f"{label:<26} {a['train_loss']:>10.4f} {a['test_nll']:>9.4f} "
                f"{a['test_accuracy']:>9.4f} {a['ood_auroc']:>9.4f} {'':>8}"
            )
    print("OOD AUROC: predictive entropy, test digits against 500 uniform-noise images.")

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    for r in results:
        name = r["optimizer"]
        if name in VARIATIONAL:
            rate = "defaults; loss at the draws"
        else:
            rate = f"{LR_FACTOR.get(name, 1) * args.lr:g}"
        ax.plot(np.arange(1, args.epochs + 1), r["epoch_losses"], label=f"{name} ({rate})")
    ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("mean training loss (cross-entropy)")
    ax.set_title("MLP on sklearn digits (learning rate or η in brackets)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(args.out / "loss_curves.png", dpi=120)
    print(f"saved {args.out / 'loss_curves.png'} and {args.out / 'results.json'}")
    print(f"JAX backend: {jax.default_backend()}")
    return results


if __name__ == "__main__":
    main()
