"""How the variational σ-filter's defaults were chosen: a staged search on digits' validation split.

    pip install -e ".[compare]"
    python benchmarks/vsf_defaults.py --seeds 3

The tuning task is scikit-learn's digits with the MLP of
``benchmarks/uncertainty_compare.py`` (its split: 1079 training and 269
validation images per seed, 30 epochs, batch 64); nothing else takes part
in the choice. The other tasks of that benchmark (the breast-cancer table,
MNIST with a CNN) and the language model example confirm the defaults.

Stage 1 crosses the curvature estimate with the prior precision δ (η = 3e-3,
γ = 0.99); stage 2 varies η and then γ around the stage-1 choice. Each row
reports, as the mean over seeds, the validation NLL of the mean parameters
and of the 32-draw model average (the criterion: the average's), the
validation accuracy, the AUROC of predictive entropy against uniform noise,
and the worst rank correlation and the range of median ratios of
:func:`bayesopt_jax.curvature_report` against the exact GGN diagonal at the
final mean (seed 0). Writes ``--out``/vsf_defaults.json and prints Markdown.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent))
import uncertainty_compare as uc

import bayesopt_jax as bj

BASE = {"eta": 3e-3, "hess_decay": 0.99, "curvature": "variance", "prior_precision": 1.0}
STAGE1 = (
    [{"curvature": "variance", "prior_precision": d} for d in (0.2, 0.5, 1.0, 2.0, 4.0, 8.0, None)]
    + [{"curvature": "reparam", "prior_precision": d} for d in (0.2, 0.5, 1.0, 2.0, None)]
    + [{"curvature": "evidence", "prior_precision": 0.5}]  # the previous defaults' estimate
)
STAGE2 = [{"eta": e} for e in (1e-3, 1e-2)] + [{"hess_decay": g} for g in (0.9, 0.999)]


def run(data: dict, seed: int, cfg: dict, samples: int, batch_size: int, curvature: bool):
    xtr, ytr = data["train"]
    params = uc.init_params(data["model"], seed)
    tx = bj.variational_sigma_filter(
        cfg["eta"],
        num_data=len(xtr),
        batch_size=batch_size,
        key=seed,
        hess_decay=cfg["hess_decay"],
        curvature=cfg["curvature"],
        prior_precision=cfg["prior_precision"],
    )
    state = tx.init(params)

    @jax.jit
    def step(params, state, x, y):
        g = jax.grad(uc.loss_fn)(bj.training_sample(params, state), x, y)
        u, state = tx.update(g, state, params)
        return optax.apply_updates(params, u), state

    for idx in uc.batches(len(xtr), batch_size, data["epochs"], seed):
        params, state = step(params, state, xtr[idx], ytr[idx])
    draws = bj.sample_posterior(jax.random.key(10_000 + seed), params, state, samples)
    xv, yv = data["val"]
    lp_mean = np.asarray(uc.log_probs(params, xv), np.float64)
    lp_draws = np.asarray(jax.lax.map(lambda p: uc.log_probs(p, xv), draws), np.float64)
    lp_avg = np.logaddexp.reduce(lp_draws, axis=0) - np.log(samples)
    noise = data["ood"]["noise"]
    lp_noise = np.asarray(jax.lax.map(lambda p: uc.log_probs(p, noise), draws), np.float64)
    lp_noise = np.logaddexp.reduce(lp_noise, axis=0) - np.log(samples)
    out = {
        "val_nll_mean": float(-lp_mean[np.arange(len(yv)), yv].mean()),
        "val_nll_average": float(-lp_avg[np.arange(len(yv)), yv].mean()),
        "val_acc_average": float((lp_avg.argmax(1) == yv).mean()),
        "auroc_noise": uc.auroc(uc.entropy(lp_avg), uc.entropy(lp_noise)),
    }
    if curvature:
        report = bj.curvature_report(state, uc.ggn_diagonal(params, xtr))
        out["min_rank"] = min(r["rank_correlation"] for r in report.values())
        ratios = [r["median_ratio"] for r in report.values()]
        out["ratio_range"] = [min(ratios), max(ratios)]
        out["data_share_max"] = max(r["data_share"] for r in report.values())
    return out


def evaluate(cfg: dict, args) -> dict:
    def data(seed):
        d = uc.load_digits_split(seed)
        return d if args.epochs is None else {**d, "epochs": args.epochs}

    per_seed = [
        run(data(s), s, cfg, args.samples, args.batch_size, curvature=s == 0)
        for s in range(args.seeds)
    ]
    keys = ("val_nll_mean", "val_nll_average", "val_acc_average", "auroc_noise")
    row = {k: float(np.mean([r[k] for r in per_seed])) for k in keys}
    row.update({k: per_seed[0][k] for k in ("min_rank", "ratio_range", "data_share_max")})
    return row


def line(cfg: dict, row: dict) -> str:
    delta = "learned" if cfg["prior_precision"] is None else f"{cfg['prior_precision']:g}"
    lo, hi = row["ratio_range"]
    return (
        f"| {cfg['curvature']} | {delta} | {cfg['eta']:g} | {cfg['hess_decay']:g} | "
        f"{row['val_nll_mean']:.4f} | {row['val_nll_average']:.4f} | "
        f"{row['val_acc_average']:.4f} | {row['auroc_noise']:.3f} | {row['min_rank']:.2f} | "
        f"{lo:.2f}–{hi:.2f} | {row['data_share_max']:.3f} |"
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=None, help="override digits' 30 (smoke tests)")
    ap.add_argument("--stage1", type=int, default=None, help="only the first K stage-1 rows")
    ap.add_argument("--out", type=Path, default=Path("outputs/vsf_defaults"))
    args = ap.parse_args(argv)
    head = (
        "| curvature | δ | η | γ | val NLL mean | val NLL average | val acc average | "
        "AUROC noise | min rank | median ratios | max data share |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"
    )
    rows = []
    print(head, flush=True)
    for change in STAGE1[: args.stage1]:
        cfg = {**BASE, **change}
        rows.append((cfg, evaluate(cfg, args)))
        print(line(*rows[-1]), flush=True)
    best = min(rows, key=lambda r: r[1]["val_nll_average"])[0]
    for change in STAGE2 if args.stage1 is None else ():
        cfg = {**best, **change}
        rows.append((cfg, evaluate(cfg, args)))
        print(line(*rows[-1]), flush=True)
    chosen = min(rows, key=lambda r: r[1]["val_nll_average"])[0]
    print(f"\nlowest validation NLL of the average: {chosen}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vsf_defaults.json").write_text(
        json.dumps([{"config": c, **r} for c, r in rows], indent=2)
    )
    return rows


if __name__ == "__main__":
    main()
