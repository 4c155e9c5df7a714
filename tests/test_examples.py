"""Smoke tests: every example runs end to end on tiny settings."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_train_digits_smoke(tmp_path):
    pytest.importorskip("flax")
    pytest.importorskip("sklearn")
    mod = _load("train_digits")
    names = list(mod.optimizer_zoo(3e-3))
    results = mod.main(["--epochs", "2", "--hidden", "32", "--no-progress", "--out", str(tmp_path)])
    assert [r["optimizer"] for r in results] == names
    for r in results:
        # Two epochs must already beat chance (10 classes) by a wide margin.
        assert r["test_accuracy"] > 0.5, r
        assert r["epoch_losses"][-1] < r["epoch_losses"][0]
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000
    assert (tmp_path / "results.json").exists()


def test_uncertainty_smoke(tmp_path):
    pytest.importorskip("sklearn")
    mod = _load("uncertainty")
    results = mod.main(["--epochs", "2", "--samples", "4", "--out", str(tmp_path)])
    assert set(results) == {"Adam", "σ-filter, mean", "σ-filter, model average"}
    for m in results.values():
        # two epochs already beat the uniform predictor (accuracy 0.1, NLL log 10)
        assert m["accuracy"] > 0.6 and m["nll"] < np.log(10)
        assert 0.0 <= m["ood_auroc"] <= 1.0 and 0.0 <= m["ece"] <= 1.0
    assert json.loads((tmp_path / "results.json").read_text()) == results
    for name in ("reliability.png", "entropy.png"):
        assert (tmp_path / name).stat().st_size > 1000


def test_kingma_ba_smoke(tmp_path):
    pytest.importorskip("sklearn")
    mod = _load("kingma_ba")
    logreg, ablation, summary = mod.main(
        ["--epochs-logreg", "3", "--epochs-ae", "1", "2", "--out", str(tmp_path)]
    )
    assert set(logreg) == {"Adam", "AdaGrad", "RMSProp", "SGDNesterov"}
    for r in logreg.values():
        # three epochs of the best step size already beat the uniform predictor, log(10)
        assert r["curve"][-1] < 2.302 and r["best_lr"] in mod.LOGREG_LRS
    assert len(ablation) == 2 * len(mod.AE_B1) * len(mod.AE_B2) * len(mod.AE_LOG_LRS)
    assert len(summary) == 2 * len(mod.AE_B1) * len(mod.AE_B2)
    for name in ("logreg.png", "bias_correction.png", "results.json"):
        assert (tmp_path / name).stat().st_size > 500


def test_sigma_regimes_smoke(tmp_path):
    mod = _load("sigma_regimes")
    result = mod.main(["--steps", "200", "--out", str(tmp_path)])
    for small, large in result["asymptote_gaps"].values():
        assert small < 1e-3 and large < 1e-2  # σ* meets both asymptotes at the range ends
    assert result["full_matrix_residual"] < 1e-8
    assert result["full_matrix_commutator"] < 1e-8
    assert all(np.isfinite(r["final_f"]) for r in result["quadratic"].values())
    for name in ("fixed_point.png", "full_matrix.png", "quadratic.png"):
        assert (tmp_path / name).stat().st_size > 1000
