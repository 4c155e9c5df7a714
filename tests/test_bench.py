"""Smoke test: the benchmark harness runs and reports consistent ratios."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "bench.py"


@pytest.mark.training
def test_bench_harness_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(
        ["--trees", "tiny", "--repeats", "3", "--init-arrays", "4", "--json", str(out)]
    )
    assert json.loads(out.read_text())["trees"]["tiny"]["params"] == 64 + 64 + 1
    rows = report["trees"]["tiny"]["rows"]
    assert set(bench.OPTIMIZERS) <= set(rows)
    for name, r in rows.items():
        assert r["step_s"] > 0, name
        # the call floor moves no bytes, so it has no roofline fraction
        assert (r["roofline_fraction"] is None) == (r["ideal_B"] == 0), name
        assert r["roofline_fraction"] is None or r["roofline_fraction"] > 0, name
        assert abs(r["vs_optax"] - r["step_s"] / rows["optax.adam"]["step_s"]) < 1e-12
    assert report["roofline_bytes_per_s"] > 0
    # The state column is measured from the allocated state (scales and counters included).
    assert rows["bj.adam"]["state_B"] == pytest.approx((129 * 8 + 4) / 129)
    assert rows["bj.adam 8bit state"]["state_B"] < rows["bj.adam"]["state_B"] / 2
    for mode, cells in report["first_init"].items():
        assert set(cells) == set(bench.INIT_OPTIMIZERS), mode
        for name, c in cells.items():
            assert c["s"] > 0, (mode, name)
            assert abs(c["vs_optax_adam"] - c["s"] / cells["optax.adam"]["s"]) < 1e-12


def _uncertainty_compare():
    spec = importlib.util.spec_from_file_location(
        "uncertainty_compare", ROOT / "benchmarks" / "uncertainty_compare.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.training
def test_uncertainty_compare_smoke(tmp_path):
    """The comparison harness end to end on the table task (JAX methods; IVON when installed)."""
    pytest.importorskip("sklearn")
    mod = _uncertainty_compare()
    methods = ["adam", "vsf"]
    try:
        import ivon  # noqa: F401

        methods.append("ivon")
    except ImportError:
        pass
    report = mod.main(
        ["--tasks", "cancer", "--seeds", "2", "--epochs", "2", "--samples", "4",
         "--methods", *methods, "--out", str(tmp_path)]
    )  # fmt: skip
    rows = report["cancer"]["per_seed"]
    assert set(rows) == {"adam/mean"} | {
        f"{m}/{p}" for m in methods[1:] for p in ("mean", "average")
    }
    for per_seed in rows.values():
        assert len(per_seed) == 2
        for r in per_seed:
            assert np.isfinite(r["nll"]) and all(
                0 <= r[k] <= 1 for k in ("acc", "ece", "auroc_noise", "auroc_scaled")
            )
    assert set(report["cancer"]["paired"]) == set(methods[1:])
    curv = report["cancer"]["curvature"]["per_seed"]
    assert len(curv) == 2 and set(curv[0]["at_mean"]) == {
        f"['l{i}']['{k}']" for i in range(3) for k in "bw"
    }
    assert json.loads((tmp_path / "results.json").read_text())["cancer"]["paired"]


def test_auroc_and_ggn_diagonal_against_their_definitions(x64):
    """The harness's AUROC and its exact GGN diagonal, each against a direct construction."""
    mod = _uncertainty_compare()
    # The AUROC is the Mann-Whitney statistic: check it against its definition.
    # Both sides sum 2000 terms in [0, 1] in float64: within 2000·2⁻⁵³ < 1e-12.
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=50), rng.normal(0.5, 1, size=40)
    want = np.mean((b[None, :] > a[:, None]) + 0.5 * (b[None, :] == a[:, None]))
    assert abs(mod.auroc(a, b) - want) <= 1e-12
    # GGN diagonal: Σ_i diag(J_iᵀ (diag p_i − p_i p_iᵀ) J_i), here from the full
    # Jacobian of all logits over the raveled parameters and the softmax
    # cross-entropy's Hessian in the logits (jax.hessian), in float64.
    import jax
    import jax.flatten_util

    params = mod.init_params(("mlp", (5, 4, 3)), 0)
    x = rng.normal(size=(7, 5))
    flat, unravel = jax.flatten_util.ravel_pytree(params)
    jac = jax.jacobian(lambda f: mod.logits_fn(unravel(f), x))(flat)  # (7, 3, P)
    z = mod.logits_fn(params, x)
    total = np.zeros(flat.size)
    for i in range(len(x)):
        lam = jax.hessian(lambda zi: -jax.nn.log_softmax(zi)[0])(z[i])  # any label: same Λ
        total += np.diag(np.asarray(jac[i].T @ lam @ jac[i]))
    got = np.asarray(jax.flatten_util.ravel_pytree(mod.ggn_diagonal(params, x, chunk=3))[0])
    # Both sum a handful of float64 products of O(1) terms: agreement to 1e-12 of
    # the largest entry is ~1e4 roundings; a dropped −(Σ p J)² term is O(1).
    assert np.max(np.abs(got - total)) <= 1e-12 * np.max(total), (got, total)


def test_hlo_audit_reads_the_compiled_step(tmp_path):
    spec = importlib.util.spec_from_file_location("hlo_audit", ROOT / "benchmarks" / "hlo_audit.py")
    audit = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(audit)
    names = ["optax.adam", "bj.sigma_filter b1=0.9"]
    report = audit.main(
        ["--size", "4099", "--optimizers", *names, "--json", str(tmp_path / "a.json")]
    )
    assert json.loads((tmp_path / "a.json").read_text()) == report
    # Adam keeps 2 state buffers, the filter with momentum 3 (mu, nu, sigma).
    assert report["optax.adam"]["minimum_bytes_per_param"] == 4 * (2 * 3 + 1)
    assert report["bj.sigma_filter b1=0.9"]["minimum_bytes_per_param"] == 4 * (2 * 4 + 1)
    for name, row in report.items():
        # No compiled program can move less than reading and writing every
        # buffer once; and Adam's update needs a square root and a division.
        assert row["loops"] >= 1, name
        assert row["bytes_per_param"] >= row["minimum_bytes_per_param"], name
        assert row["expensive_ops"] >= 2, name


@pytest.mark.training
def test_memory_accuracy_smoke(tmp_path):
    """The 8-bit / bf16 accuracy harness end to end on digits, two epochs."""
    pytest.importorskip("sklearn")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(
        "memory_accuracy", ROOT / "benchmarks" / "memory_accuracy.py"
    )
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    configs = ["adam fp32", "adam 8bit", "bf16 kahan"]
    results = mod.main(
        ["--data", "digits", "--seeds", "1", "--epochs", "2", "--out", str(tmp_path),
         "--configs", *configs]
    )  # fmt: skip
    by = {r["config"]: r for r in results}
    assert set(by) == set(configs) and set(configs) <= set(mod.CONFIGS)
    for r in results:
        assert np.isfinite(r["test_nll"]) and np.isfinite(r["train_nll"]), r
        assert 0 <= r["frozen_late"] <= 1
    # Bytes per parameter from the arrays themselves (the MLP's rows are 128
    # or 10 wide: 1 byte per entry + one float32 scale per row per moment).
    assert by["adam fp32"]["state_bytes_per_param"] == 8.0
    assert 2.0 < by["adam 8bit"]["state_bytes_per_param"] <= 2.2
    assert by["bf16 kahan"]["param_bytes_per_param"] == 2.0
    assert by["bf16 kahan"]["state_bytes_per_param"] == 10.0
    assert (tmp_path / "results.json").exists()
