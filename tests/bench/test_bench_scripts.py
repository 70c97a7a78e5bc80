"""The benchmark scripts' smoke runs (``--quick``), so they cannot rot: each runs end to end at a
small size into a temporary folder and writes the JSON and the report it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# about a minute in all: .ci/run runs them after the test suite (GATEWAY_BENCH_SMOKE=1 pytest -m bench)
pytestmark = [pytest.mark.bench, pytest.mark.skipif(os.environ.get("GATEWAY_BENCH_SMOKE") != "1",
                                                    reason="benchmark smoke runs: set GATEWAY_BENCH_SMOKE=1")]


def _run(*args: str, timeout: float = 600) -> None:
    subprocess.run([sys.executable, *args], cwd=ROOT, check=True, timeout=timeout)


@pytest.mark.slow
def test_compare_smoke_run_measures_every_system_and_query(tmp_path: Path) -> None:
    out = tmp_path / "results" / "compare.json"
    _run("bench/compare.py", "--quick", "--no-smartnoise", "--repeats", "1", "--workdir", str(tmp_path), "--out",
         str(out))
    size = json.loads(out.read_text())["sizes"][0]
    assert size["rows"] == 20_000 and size["unavailable"] == {}
    assert len(size["queries"]) == 7
    errors = []
    for q in size["queries"]:
        offered = {"raw DuckDB", "our site"} | ({"OpenDP Context"} if q["query"] != "survival by stage" else set())
        assert set(q["systems"]) == offered
        ours = q["systems"]["our site"]
        assert ours["median_ms"] > 0
        # survival: latency only; a median's accuracy is an interval, not a standard error
        assert q["query"] in ("survival by stage", "median") or ours["reported_std_error"] > 0
        errors += [acc["relative_rmse"] for acc in ours["accuracy"].values()]
    assert all(e < 0.5 for e in errors) and any(e > 0 for e in errors)  # noisy, and yet near the exact answer
    assert size["peak_memory_bytes"]["our site"] > 0 and size["peak_memory_bytes"]["raw DuckDB"] > 0
    _run("bench/report.py", "--results", str(out.parent), "--out", str(tmp_path / "RESULTS.md"))
    report = (tmp_path / "RESULTS.md").read_text()
    assert "Smoke run" in report and "## Targets" in report
    assert (out.parent / "latency_vs_rows.png").stat().st_size > 0


@pytest.mark.slow
def test_federated_smoke_run_pools_every_split(tmp_path: Path) -> None:
    out = tmp_path / "federated.json"
    _run("bench/federated.py", "--quick", "--sites", "2", "--workdir", str(tmp_path), "--out", str(out))
    results = json.loads(out.read_text())["results"]
    assert {r["query"] for r in results} == {"count, filtered", "group-by count", "mean", "survival by stage"}
    curves = [r for r in results if r["query"] == "survival by stage"]
    assert all(0 < r["pooled_relative_rmse"] < 0.1 for r in results if r not in curves)
    # a curve's mean absolute error over the grid: noisy, yet far below a curve that is wrong (0.1 and more)
    assert curves and all(0 < r["pooled_curve_error"] < 0.05 and 0 < r["context_curve_error"] < 0.05 for r in curves)


@pytest.mark.slow
def test_fanout_smoke_run_reaches_site_broker_and_stand_ins(tmp_path: Path) -> None:
    out = tmp_path / "fanout.json"
    _run("bench/fanout.py", "--quick", "--clients", "2", "--standins", "2", "--seconds", "1", "--workdir",
         str(tmp_path), "--out", str(out))
    data = json.loads(out.read_text())
    assert data["site"]["runs"][0]["qps"] > 0 and data["site"]["runs"][0]["errors"] == 0
    assert data["broker"]["runs"][0]["qps"] > 0 and data["broker"]["runs"][0]["errors"] == 0
    row = data["broker_overhead"][0]
    assert row["sites"] == 2 and row["broker"]["median_ms"] >= row["delay_ms"]  # the stand-ins' delay is real
