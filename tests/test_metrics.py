"""Metrics end to end: a real Prometheus scrapes a real site; the shipped alert rules pass promtool.

The metrics tell the truth from the first scrape: a restarted site publishes every configured
budget from its ledger before any call, counters exist at 0, each name means one thing, and every
name the shipped alerts and dashboard use is one the code exports.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from gateway import __version__
from gateway.client import Client
from gateway.errors import GatewayError
from gateway.metrics import QUERY_OUTCOMES, BrokerMetrics, SiteMetrics, serve_metrics
from gateway.policy import load_policy
from tests.helpers.policies import dump_policy, example_policy, with_dataset, with_policy, write_policy
from tests.helpers.servers import client, wait_for

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
                    for r in _prom_query(prom_port, 'gateway_queries_total{dataset="patients"} > 0')}
        assert outcomes == {"ok": 3.0, "cached": 1.0, "budget_exhausted": 1.0}
        count = _prom_query(prom_port, 'sum(gateway_query_duration_seconds_count{dataset="patients"})')
        assert float(count[0]["value"][1]) == 5.0
    finally:
        proc.terminate()
        proc.wait(timeout=30)


# -- budgets from the ledger at start and after reloads ----------------------------------------------

COUNT = "SELECT count(*) FROM patients WHERE diagnosis_year = {}"
DEPLOY = ROOT / "deploy"


def _gauges(registry: CollectorRegistry) -> dict[tuple[str, str], tuple[float, float, float]]:
    """(population, project) -> (limit, spent, remaining) as the registry exports them."""
    values: dict[str, dict[tuple[str, str], float]] = {}
    for family in registry.collect():
        if family.name.startswith("gateway_budget_epsilon_"):
            values[family.name] = {(s.labels["dataset"], s.labels["project"]): s.value for s in family.samples}
    limits = values["gateway_budget_epsilon_limit"]
    return {key: (limits[key], values["gateway_budget_epsilon_spent"][key],
                  values["gateway_budget_epsilon_remaining"][key]) for key in limits}


@pytest.fixture
def two_populations(tmp_path, site_data) -> Path:
    """The north policy with ``treatments`` a population of its own (so a project has two budgets)."""
    return write_policy(tmp_path, site_data, policy=with_dataset(example_policy(), "treatments",
                                                                 population="treatments"))


def _spend_then_restart(start_site, token, policy: Path, state: Path) -> tuple[CollectorRegistry, object]:
    first = start_site(policy=policy, state_dir=state)
    with client(first, token, project="tight") as c:
        for year in (2011, 2012, 2013):
            c.query(COUNT.format(year), epsilon=0.1, query_id=f"t{year}")
    with client(first, token, project="onc-lung") as c:
        c.query("SELECT count(*) FROM treatments", epsilon=0.25)
    first.stop()
    registry = CollectorRegistry()
    return registry, start_site(policy=policy, state_dir=state, metrics=SiteMetrics(registry))


def test_a_restarted_site_publishes_every_configured_budget_from_its_ledger_before_any_call(
        start_site, token, tmp_path, two_populations):
    registry, _site = _spend_then_restart(start_site, token, two_populations, tmp_path / "state")
    gauges = _gauges(registry)
    assert gauges[("patients", "tight")] == pytest.approx((1.0, 0.3, 0.7))
    assert gauges[("treatments", "onc-lung")] == pytest.approx((10.0, 0.25, 9.75))  # spent under a pattern rule
    assert gauges[("patients", "onc-lung")] == (10.0, 0.0, 10.0)  # its other population
    assert gauges[("patients", "demo")] == (3.0, 0.0, 3.0)  # a literal project that never spent
    assert ("patients", "patients-only") in gauges and ("treatments", "patients-only") not in gauges
    assert not [p for _, p in gauges if any(c in p for c in "*?[")]  # a pattern is not a project
    assert {p for _, p in gauges} == {"stats", "tight", "nurses", "patients-only", "demo", "onc-lung"}


def _caps(registry: CollectorRegistry) -> dict[str, tuple[float, float, float]]:
    """population -> (limit, spent, remaining) of its cap over all projects, as the registry exports it."""
    def values(name: str) -> dict[str, float]:
        return {s.labels["dataset"]: s.value for f in registry.collect() if f.name == name for s in f.samples}
    limits = values("gateway_population_cap_epsilon_limit")
    spent = values("gateway_population_cap_epsilon_spent")
    remaining = values("gateway_population_cap_epsilon_remaining")
    return {key: (limits[key], spent[key], remaining[key]) for key in limits}


def test_a_restarted_site_publishes_each_population_cap_from_its_ledger_across_projects(
        start_site, token, tmp_path, two_populations):
    registry, _site = _spend_then_restart(start_site, token, two_populations, tmp_path / "state")
    caps = _caps(registry)
    assert set(caps) == {"patients"}  # treatments, a population of its own, has no cap
    assert caps["patients"] == pytest.approx((100.0, 0.3, 99.7))  # tight's 0.3; onc-lung spent on treatments


def test_a_query_updates_the_cap_and_a_reload_that_drops_the_cap_removes_it(start_site, token, tmp_path, site_data):
    policy = write_policy(tmp_path, site_data)
    registry = CollectorRegistry()
    site = start_site(policy=policy, metrics=SiteMetrics(registry))
    assert _caps(registry) == {"patients": (100.0, 0.0, 100.0)}
    for project in ("tight", "onc-lung"):
        with client(site, token, project=project) as c:
            c.query(COUNT.format(2011), epsilon=0.25)
    assert _caps(registry)["patients"] == pytest.approx((100.0, 0.5, 99.5))  # both projects, before any refresh
    dump_policy(with_policy(load_policy(policy).policy, population_caps={}, dataset_caps={}), policy)
    wait_for(lambda: registry.get_sample_value("gateway_policy_reloads_total", {"result": "ok"}) == 1)
    assert _caps(registry) == {}


def test_counters_exist_at_zero_from_the_start_and_build_info_names_the_version(start_site):
    registry = CollectorRegistry()
    start_site(metrics=SiteMetrics(registry))
    assert registry.get_sample_value("gateway_policy_reloads_total", {"result": "rejected"}) == 0.0
    assert registry.get_sample_value("gateway_policy_reloads_total", {"result": "ok"}) == 0.0
    for dataset in ("patients", "treatments", "_unknown"):
        for outcome in QUERY_OUTCOMES:
            assert registry.get_sample_value("gateway_queries_total", {"dataset": dataset, "outcome": outcome}) == 0
    assert {"ok", "error", "unavailable", "budget_exhausted", "denied", "invalid"} <= set(QUERY_OUTCOMES)
    assert registry.get_sample_value("gateway_build_info", {"version": __version__, "component": "site"}) == 1.0


def test_a_reload_publishes_the_new_budgets_and_removes_those_no_rule_grants(start_site, token, tmp_path, site_data):
    policy = write_policy(tmp_path, site_data)
    registry = CollectorRegistry()
    site = start_site(policy=policy, metrics=SiteMetrics(registry))
    with client(site, token, project="tight") as c:
        c.query(COUNT.format(2011), epsilon=0.1)
    old = load_policy(policy).policy
    rules = tuple(r for r in old.budgets if r.project not in ("tight", "demo"))
    raised = tuple(r.model_copy(update={"epsilon": Fraction(7)}) if r.project == "nurses" else r for r in rules)
    dump_policy(with_policy(old, budgets=raised), policy)
    wait_for(lambda: registry.get_sample_value("gateway_policy_reloads_total", {"result": "ok"}) == 1)
    gauges = _gauges(registry)
    assert ("patients", "tight") not in gauges and ("patients", "demo") not in gauges  # spent, but no rule now
    assert gauges[("patients", "nurses")] == (7.0, 0.0, 7.0)
    assert registry.get_sample_value("gateway_queries_total", {"dataset": "patients", "outcome": "ok"}) == 1.0


def test_the_broker_has_its_own_duration_and_its_site_outcomes_at_zero(start_site, start_broker, token):
    registry = CollectorRegistry()
    broker = start_broker({"north": start_site(name="north")}, metrics=BrokerMetrics(registry))
    for outcome in ("ok", "unavailable", "deadline_exceeded", "invalid_answer"):
        assert registry.get_sample_value("gateway_broker_site_requests_total",
                                         {"site": "north", "outcome": outcome}) == 0.0
    with client(broker, token) as c:
        c.query(COUNT.format(2011), epsilon=0.1)
    assert registry.get_sample_value("gateway_broker_query_duration_seconds_count") == 1.0
    assert registry.get_sample_value("gateway_query_duration_seconds_count", {"dataset": "_broker"}) is None
    assert registry.get_sample_value("gateway_build_info", {"version": __version__, "component": "broker"}) == 1.0


# -- the shipped alerts and dashboard name what the code exports --------------------------------------

def _exported_names(start_site, start_broker) -> set[str]:
    site_registry, broker_registry = CollectorRegistry(), CollectorRegistry()
    site = start_site(name="north", metrics=SiteMetrics(site_registry))
    start_broker({"north": site}, metrics=BrokerMetrics(broker_registry))
    return {sample.name for registry in (site_registry, broker_registry)
            for family in registry.collect() for sample in family.samples}


def _names_in(expr: str) -> set[str]:
    return set(re.findall(r"\bgateway_[a-z0-9_]+", expr))


def test_every_metric_the_dashboard_and_the_alerts_query_is_exported(start_site, start_broker):
    exported = _exported_names(start_site, start_broker)
    dashboard = json.loads((DEPLOY / "grafana" / "gateway-budgets.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel.get("targets", [])]
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    exprs += [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    names = set().union(*map(_names_in, exprs))
    assert names, "no metric names found: the parsing is broken"
    assert "gateway_build_info" in names and "gateway_broker_query_duration_seconds_bucket" in names
    assert names - exported == set()
    assert _names_in("rate(gateway_no_such_metric_total[5m])") - exported  # the check can fail


def test_every_alert_rule_has_a_promtool_test_that_expects_it_to_fire():
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())
    alerts = {rule["alert"] for group in rules["groups"] for rule in group["rules"]}
    tests = yaml.safe_load((DEPLOY / "prometheus" / "alerts_test.yml").read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
              if case["exp_alerts"]}
    quiet = {case["alertname"] for test in tests for case in test.get("alert_rule_test", [])
             if not case["exp_alerts"]}
    assert alerts - tested == set(), "alerts no promtool test expects to fire"
    assert alerts - quiet == set(), "alerts no promtool test expects to stay quiet"


@pytest.mark.slow
@needs_prometheus
def test_prometheus_scraping_a_freshly_restarted_site_sees_the_ledger_budgets(start_site, token, tmp_path,
                                                                            two_populations):
    registry, site = _spend_then_restart(start_site, token, two_populations, tmp_path / "state")
    metrics_port = serve_metrics(0, registry)
    prom_port = _free_port()
    proc = _prometheus(tmp_path, metrics_port, prom_port)
    try:
        scraped = _wait_for_series(prom_port, "gateway_budget_epsilon_spent")
        spent = {(r["metric"]["dataset"], r["metric"]["project"]): float(r["value"][1]) for r in scraped}
        assert spent[("patients", "tight")] == pytest.approx(0.3)
        assert spent[("treatments", "onc-lung")] == pytest.approx(0.25)
        assert spent[("patients", "demo")] == 0.0
        rejected = _prom_query(prom_port, 'gateway_policy_reloads_total{result="rejected"}')
        assert [float(r["value"][1]) for r in rejected] == [0.0]
        # the same figures as the ledger tells each project through GetBudget
        for project in ("tight", "onc-lung"):
            with client(site, token, project=project) as c:
                told = c.budget()
            for population, value in zip(told["population"], told["spent"], strict=True):
                assert spent[(population, project)] == pytest.approx(value)
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _prometheus(tmp_path: Path, metrics_port: int, prom_port: int) -> subprocess.Popen[bytes]:
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                      "scrape_configs:\n  - job_name: site\n    static_configs:\n"
                      f"      - targets: ['127.0.0.1:{metrics_port}']\n")
    return subprocess.Popen([PROMETHEUS or "prometheus", f"--config.file={config}",
                             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{prom_port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def _wait_for_series(prom_port: int, expr: str) -> list[dict]:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            found = _prom_query(prom_port, expr)
        except OSError:
            found = []
        if found:
            return found
        time.sleep(0.5)
    raise AssertionError(f"Prometheus never scraped {expr}")
