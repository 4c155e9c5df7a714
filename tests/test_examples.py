"""Smoke tests: every example runs end to end on tiny settings."""

import importlib.util
import json
import signal
import subprocess
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


# Each test trains an example in a subprocess: the full suite only.
pytestmark = pytest.mark.training


def test_train_digits_smoke(tmp_path):
    pytest.importorskip("flax")
    pytest.importorskip("sklearn")
    mod = _load("train_digits")
    names = list(mod.optimizer_zoo(3e-3, num_data=1000))
    assert names[-2:] == ["variational_sigma_filter", "variational_newton"]
    results = mod.main(
        [
            "--epochs",
            "2",
            "--hidden",
            "32",
            "--samples",
            "4",
            "--no-progress",
            "--out",
            str(tmp_path),
        ]
    )
    assert [r["optimizer"] for r in results] == names
    for r in results:
        # Two epochs must already beat chance (10 classes) by a wide margin.
        assert r["test_accuracy"] > 0.5, r
        assert r["epoch_losses"][-1] < r["epoch_losses"][0]
        assert 0 <= r["ood_auroc"] <= 1
    for r in results[-2:]:  # each posterior's model average, beside its mean
        average = r["average"]
        assert average["test_accuracy"] > 0.5 and 0 <= average["ood_auroc"] <= 1
        assert np.isfinite(average["test_nll"])
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


# --------------------------------------------------------------------------
# the language-model example (run as a program: it sets up its own devices)
# --------------------------------------------------------------------------

LM_TINY = [
    "--steps", "6", "--batch-size", "4", "--seq-len", "32", "--d-model", "32",
    "--heads", "2", "--layers", "2", "--warmup", "2", "--eval-every", "3",
    "--checkpoint-every", "2", "--val-batches", "2", "--sample-length", "16",
    "--no-progress", "--devices", "2",
]  # fmt: skip


def _run_lm(out, *extra, expect_rc=0):
    pytest.importorskip("flax")
    pytest.importorskip("orbax.checkpoint")
    cmd = [sys.executable, str(EXAMPLES / "train_lm.py"), *LM_TINY, "--out", str(out), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == expect_rc, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _lm_record(out):
    return {r["optimizer"]: r for r in json.loads((out / "results.json").read_text())["results"]}


def test_train_lm_smoke_two_devices(tmp_path):
    _run_lm(tmp_path)
    record = json.loads((tmp_path / "results.json").read_text())
    assert record["devices"] == 2 and record["processes"] == 1
    results = _lm_record(tmp_path)
    assert list(results) == ["adamw", "sigma_filter", "variational_sigma_filter"]
    layers = 2
    for r in results.values():
        # 16 arrays per block (two norms, q/k/v/out kernels and biases, two MLP
        # layers), the two embeddings, the final norm and the output layer.
        assert r["parameter_arrays"] == 16 * layers + 6
        # Six steps already beat predicting every byte uniformly (log 256 nats).
        assert r["val_loss"] < np.log(256) and np.isfinite(r["train_loss_last50"])
        assert len(r["history"]["train_loss"]) == 6 and len(r["history"]["val"]) == 2
        assert r["sample"].startswith("def ")
    # ZeRO: every state array that mirrors a parameter is split over the two
    # devices (all dimensions here are even), so a device holds half of it.
    adamw = results["adamw"]
    mirrored = 8.0  # two float32 moments per parameter
    assert mirrored <= adamw["state_bytes_per_param"] < mirrored + 0.01
    assert adamw["state_bytes_per_param_per_device"] < 0.5 * mirrored + 0.01
    assert (tmp_path / "loss_curves.png").stat().st_size > 1000

    # The same run on a cluster of two processes (one device each, gloo over
    # loopback) is bit for bit the single-process run: a sum of two per-device
    # gradients does not depend on the order it is taken in. One optimizer
    # suffices: the variational filter's step holds the σ-filter's and adds
    # the keyed training draw, the part most likely to differ between processes.
    one = ["variational_sigma_filter"]
    _run_lm(tmp_path / "cluster", "--processes", "2", "--optimizers", *one)
    assert json.loads((tmp_path / "cluster" / "results.json").read_text())["processes"] == 2
    cluster = _lm_record(tmp_path / "cluster")
    assert list(cluster) == one
    for name in one:
        r = results[name]
        for key in ("params_fingerprint", "state_fingerprint", "history"):
            assert cluster[name][key] == r[key], (name, key)


def test_train_lm_variational_newton_and_a_tempered_posterior(tmp_path):
    """``variational_newton`` trains the LM; ``--temperature T`` divides N by T, which
    widens its draws (v = 1/(N(h + δ + 1/σ)) grows by T) and nothing else."""
    opts = ["--optimizers", "variational_newton"]
    _run_lm(tmp_path / "t1", *opts)
    _run_lm(tmp_path / "t100", *opts, "--temperature", "100")
    one, hot = _lm_record(tmp_path / "t1"), _lm_record(tmp_path / "t100")
    for r in (one, hot):
        r = r["variational_newton"]
        assert r["val_loss"] < np.log(256) and np.isfinite(r["train_loss_last50"])
    # the draws differ, so the trajectories do
    assert one["variational_newton"]["history"] != hot["variational_newton"]["history"]


def test_train_lm_resume_after_kill_is_bit_exact(tmp_path):
    # The variational filter: its state holds every kind of buffer a resume
    # must restore (ZeRO-split moments and σ, the step count, the noise key).
    opts = ["--optimizers", "variational_sigma_filter", "--steps", "8"]
    _run_lm(tmp_path / "whole", *opts)
    # Killed (SIGKILL) after step 5: checkpoints exist for step 2 and maybe 4.
    _run_lm(tmp_path / "cut", *opts, "--crash-at", "5", expect_rc=-signal.SIGKILL)
    assert not (tmp_path / "cut" / "results.json").exists()
    resumed = _run_lm(tmp_path / "cut", *opts, "--resume")
    step = int(resumed.stdout.split("resumed at step ")[1].split()[0])
    assert step in (2, 4)  # so steps up to 5 were lost and are run again
    whole, cut = _lm_record(tmp_path / "whole"), _lm_record(tmp_path / "cut")
    for name in whole:
        for key in ("params_fingerprint", "state_fingerprint", "history", "sample"):
            assert cut[name][key] == whole[name][key], (name, key)
