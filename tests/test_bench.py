"""Smoke test: the benchmark harness runs and reports consistent ratios."""

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench.py"


def test_bench_harness_smoke(tmp_path):
    spec = importlib.util.spec_from_file_location("bench", BENCH)
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench"] = bench
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    report = bench.main(["--trees", "tiny", "--repeats", "3", "--json", str(out)])
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
