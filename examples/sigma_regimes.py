"""The σ-filter's regimes: its fixed point, its full-matrix form, and its trajectories.

1. σ*(ŝ) = η²/2 + η·sqrt(η²/4 + 1/ŝ) against its two asymptotes, η/√ŝ (RMSProp
   with learning rate η, where ŝη² ≪ 1) and η² (SGD with learning rate η²,
   where ŝη² ≫ 1), for several η.
2. The full-matrix fixed point Σ*(G) for random evidence matrices G: the
   script checks its defining equation Σ* = (G + Σ*⁻¹)⁻¹ + η²I with explicit
   float64 inverses, checks that it commutes with G, and plots eig(Σ*)
   against σ*(eig(G)) — the scalar fixed point applied in G's eigenbasis.
3. Trajectories on a noisy, ill-conditioned quadratic (curvatures 100 and 1):
   ``sigma_filter`` at a small and a large η against RMSProp with learning
   rate η and SGD with learning rate η² (its two asymptotes).

    python examples/sigma_regimes.py
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("MPLBACKEND", "Agg")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import bayesopt_jax as bj

ETAS = [1e-3, 1e-2, 1e-1, 1.0]


def fixed_point_curves(etas=ETAS):
    s = np.logspace(-6, 8, 300)
    out = {}
    for eta in etas:
        star = np.asarray(bj.sigma_star(jnp.asarray(s), eta))
        out[eta] = {
            "s": s,
            "star": star,
            "rmsprop": eta / np.sqrt(s),
            "sgd": np.full_like(s, eta**2),
        }
        # relative distance to the nearer asymptote, at both ends of the range
        out[eta]["rel_err_small_s"] = float(abs(star[0] / (eta / np.sqrt(s[0])) - 1))
        out[eta]["rel_err_large_s"] = float(abs(star[-1] / eta**2 - 1))
    return out


def full_matrix_check(rng, dims=(2, 5, 10), eta=0.1):
    """Σ*(G) for random G: residual of its defining equation, and its spectrum."""
    points, residual, commutator = [], 0.0, 0.0
    for d in dims:
        for _ in range(5):
            a = rng.normal(size=(d, d)) * 10.0 ** rng.uniform(-2, 2, size=d)
            G = a @ a.T / d
            with jax.enable_x64(True):  # a float64 comparison
                S = np.asarray(bj.sigma_star_full(jnp.asarray(G), eta), np.float64)
            # Σ* = (G + Σ*⁻¹)⁻¹ + η² I, checked with explicit float64 inverses
            rhs = np.linalg.inv(G + np.linalg.inv(S)) + eta**2 * np.eye(d)
            residual = max(residual, float(np.max(np.abs(rhs - S)) / np.max(np.abs(S))))
            commutator = max(
                commutator, float(np.max(np.abs(G @ S - S @ G)) / np.max(np.abs(G @ S)))
            )
            lam = np.linalg.eigvalsh(G)
            points += list(zip(lam, np.linalg.eigvalsh(S)[::-1], strict=True))
    return points, residual, commutator


def quadratic_runs(steps: int, eta_small: float, eta_large: float, noise: float, seed: int):
    h = jnp.array([100.0, 1.0])
    x0 = jnp.array([1.0, 1.0])
    key = jax.random.key(seed)
    noises = noise * jax.random.normal(key, (steps, 2))

    def run(tx):
        def step(carry, n):
            x, s = carry
            g = h * x + n  # stochastic gradient of f(x) = ½ Σ h_i x_i²
            u, s = tx.update(g, s, x)
            x = optax.apply_updates(x, u)
            return (x, s), (x, 0.5 * jnp.sum(h * x * x))

        _, (xs, fs) = jax.lax.scan(step, (x0, tx.init(x0)), noises)
        return np.asarray(xs), np.asarray(fs)

    def rmsprop(lr):  # bias-corrected like the σ-filter's evidence, same decay
        return optax.chain(bj.scale_by_rms(0.999, 1e-8, bias_correction=True), optax.scale(-lr))

    configs = {}
    for eta in (eta_small, eta_large):
        configs[f"sigma_filter η={eta:g}"] = bj.sigma_filter(eta)
        configs[f"RMSProp lr={eta:g}"] = rmsprop(eta)
        configs[f"SGD lr={eta**2:g}"] = optax.sgd(eta**2)
    return {name: run(tx) for name, tx in configs.items()}


def plot(curves, points, runs, out: Path):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4.5))
    for k, (eta, c) in enumerate(curves.items()):
        ax.loglog(c["s"], c["star"], color=f"C{k}", label=f"σ*, η={eta:g}")
        ax.loglog(c["s"], c["rmsprop"], ":", color=f"C{k}", lw=1)
        ax.loglog(c["s"], c["sgd"], "--", color=f"C{k}", lw=1)
    ax.set_ylim(1e-7, 1e4)
    ax.set_xlabel("evidence ŝ (EMA of g²)")
    ax.set_ylabel("σ*")
    ax.set_title("Fixed point: RMSProp η/√ŝ (dotted) and SGD η² (dashed)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "fixed_point.png", dpi=120)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4.5))
    lam = np.array([p[0] for p in points])
    sig = np.array([p[1] for p in points])
    grid = np.logspace(np.log10(max(lam.min(), 1e-8)), np.log10(lam.max()), 200)
    ax.loglog(
        grid,
        np.asarray(bj.sigma_star(jnp.asarray(grid), 0.1)),
        color="k",
        lw=1,
        label="σ*(λ), η=0.1",
    )
    ax.loglog(lam, sig, "o", ms=4, label="eigenvalues of Σ*(G)")
    ax.set_xlabel("eigenvalue λ of G")
    ax.set_ylabel("eigenvalue of Σ*")
    ax.set_title("Full-matrix fixed point, random G")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "full_matrix.png", dpi=120)
    plt.close(fig)

    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, (xs, fs) in runs.items():
        ls = "-" if name.startswith("sigma") else ("--" if name.startswith("RMS") else ":")
        a1.semilogy(fs, ls, lw=1, label=name)
        a2.plot(xs[:, 0], xs[:, 1], ls, lw=1, label=name)
    a1.set_xlabel("step")
    a1.set_ylabel("f(x)")
    a1.set_title("Noisy quadratic, curvatures 100 and 1")
    a1.legend(fontsize=8)
    a2.set_xlabel("x₁ (curvature 100)")
    a2.set_ylabel("x₂ (curvature 1)")
    a2.set_title("paths from (1, 1)")
    fig.tight_layout()
    fig.savefig(out / "quadratic.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--eta-small", type=float, default=1e-2)
    ap.add_argument("--eta-large", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path("outputs/sigma_regimes"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    curves = fixed_point_curves()
    print("σ*(ŝ) vs its asymptotes (relative gap at ŝ = 1e-6 / 1e8):")
    for eta, c in curves.items():
        print(
            f"  η={eta:<6g} RMSProp side {c['rel_err_small_s']:.2e}   SGD side {c['rel_err_large_s']:.2e}"
        )

    points, residual, commutator = full_matrix_check(np.random.default_rng(args.seed))
    print(
        f"full matrix, 15 random G (d = 2, 5, 10, condition up to ~1e11): max relative residual "
        f"of Σ* = (G + Σ*⁻¹)⁻¹ + η²I {residual:.2e}, of GΣ* = Σ*G {commutator:.2e}"
    )

    runs = quadratic_runs(args.steps, args.eta_small, args.eta_large, args.noise, args.seed)
    tail = max(1, args.steps // 10)
    print(f"noisy quadratic, mean f over the last {tail} of {args.steps} steps:")
    summary = {}
    for name, (_, fs) in runs.items():
        summary[name] = {
            "final_f": float(np.mean(fs[-tail:])),
            "f_at_100": float(fs[min(99, len(fs) - 1)]),
        }
        print(
            f"  {name:<22} f(step 100) {summary[name]['f_at_100']:.3e}   final {summary[name]['final_f']:.3e}"
        )

    plot(curves, points, runs, args.out)
    result = {
        "asymptote_gaps": {
            str(k): [v["rel_err_small_s"], v["rel_err_large_s"]] for k, v in curves.items()
        },
        "full_matrix_residual": residual,
        "full_matrix_commutator": commutator,
        "quadratic": summary,
    }
    (args.out / "results.json").write_text(json.dumps(result, indent=2))
    print(f"saved fixed_point.png, full_matrix.png, quadratic.png and results.json in {args.out}")
    return result


if __name__ == "__main__":
    main()
