"""Smoke tests: every example runs end to end on tiny settings."""

import importlib.util
import sys
from pathlib import Path

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
    results, best_t = mod.main(["--epochs", "2", "--samples", "4", "--out", str(tmp_path)])
    mean = results["mean parameters"]
    assert mean["accuracy"] > 0.6
    assert best_t >= 0.0
    # The raw σ is far wider than a posterior over weights: it must hurt.
    assert results["BMA, raw σ"]["nll"] > mean["nll"]
    assert (tmp_path / "results.json").exists()
