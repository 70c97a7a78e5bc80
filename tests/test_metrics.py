"""Metrics end to end: a real Prometheus scrapes a real site; the shipped alert rules pass promtool."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from gateway.client import Client
from gateway.errors import GatewayError
from gateway.metrics import SiteMetrics, serve_metrics

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS, PROMTOOL = shutil.which("prometheus"), shutil.which("promtool")
# CI installs Prometheus (.ci/run); elsewhere these tests skip with a reason instead of failing
needs_prometheus = pytest.mark.skipif(not (PROMETHEUS and PROMTOOL) and not os.environ.get("CI"),
                                      reason="Prometheus not installed (apt-get install prometheus)")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _prom_query(port: int, expr: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    with urllib.request.urlopen(url, timeout=5) as reply:
        return json.loads(reply.read())["data"]["result"]


@needs_prometheus
def test_alert_rules_and_config_are_valid():
    folder = ROOT / "deploy" / "prometheus"
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"],
                 ["test", "rules", "alerts_test.yml"]):
        result = subprocess.run([PROMTOOL or "promtool", *args], cwd=folder, capture_output=True, text=True,
                                timeout=60, check=False)
        assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.slow
@needs_prometheus
def test_prometheus_scrapes_budget_and_query_metrics(start_site, token, tmp_path):
    registry = CollectorRegistry()
    metrics = SiteMetrics(registry)
    site = start_site(metrics=metrics)
    metrics_port = serve_metrics(0, registry)
    with Client(site.target, token=token(project="tight", subject="alice-secret"), retries=0) as c:
        for year in (2011, 2012, 2013):
            c.query(f"SELECT count(*) FROM patients WHERE diagnosis_year = {year}", epsilon=0.3,
                    query_id=f"qid-{year}")
        c.query("SELECT count(*) FROM patients WHERE diagnosis_year = 2011", epsilon=0.3)  # stored answer
        with pytest.raises(GatewayError):
            c.query("SELECT count(*) FROM patients WHERE diagnosis_year = 2014", epsilon=0.3)
    exposition = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    assert "alice-secret" not in exposition and "qid-2011" not in exposition  # no user or query ids in labels

    prom_port = _free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                      "scrape_configs:\n  - job_name: site\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    proc = subprocess.Popen([PROMETHEUS or "prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        remaining: list[dict] = []
        while time.monotonic() < deadline:
            try:
                remaining = _prom_query(prom_port, 'gateway_budget_epsilon_remaining{project="tight"}')
            except OSError:
                remaining = []
            if remaining:
                break
            time.sleep(0.5)
        assert remaining, "Prometheus never scraped the budget gauge"
        assert float(remaining[0]["value"][1]) == pytest.approx(0.1)
        assert remaining[0]["metric"]["dataset"] == "patients"
        limit = _prom_query(prom_port, 'gateway_budget_epsilon_limit{project="tight",dataset="patients"}')
        assert float(limit[0]["value"][1]) == 1.0
        outcomes = {r["metric"]["outcome"]: float(r["value"][1])
                    for r in _prom_query(prom_port, 'gateway_queries_total{dataset="patients"}')}
        assert outcomes == {"ok": 3.0, "cached": 1.0, "budget_exhausted": 1.0}
        count = _prom_query(prom_port, 'sum(gateway_query_duration_seconds_count{dataset="patients"})')
        assert float(count[0]["value"][1]) == 5.0
    finally:
        proc.terminate()
        proc.wait(timeout=30)
