"""The broker as a network service: Status lists each site with its health, version and last error,
and GetBudget names the sites that did not answer (real sites on loopback, one of them down)."""

from __future__ import annotations

import json
import warnings
from datetime import UTC, datetime

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway import __version__
from gateway.client import Client
from gateway.errors import MissingSitesWarning, Unauthenticated, Unavailable
from gateway.metrics import BrokerMetrics
from tests.helpers.cli import run_cli
from tests.helpers.servers import client


@pytest.fixture
def network(start_site, start_broker):
    """A broker over north and south, both up, and east, which served once and then went down."""
    sites = {name: start_site(name=name) for name in ("north", "south", "east")}
    registry = CollectorRegistry()
    broker = start_broker(sites, metrics=BrokerMetrics(registry), deadline_seconds=3)
    return broker, sites, registry


def test_status_lists_each_site_with_its_health_version_and_last_error(network, token):
    broker, sites, _ = network
    before = datetime.now(UTC)
    with client(broker, token) as c:
        c.budget()  # every site answers once
        sites["east"].stop(grace=0)
        status = c.status()
    assert (status.served_by, status.component, status.version) == ("broker", "broker", __version__)
    rows = {r["site"]: r for r in status.sites.to_dicts()}
    assert list(rows) == ["north", "south", "east"]  # in the order of the configuration
    for name in ("north", "south"):
        assert rows[name]["health"] == "serving" and rows[name]["version"] == __version__
        assert rows[name]["last_error_reason"] == "" and rows[name]["last_error_at"] is None
        assert rows[name]["last_ok_at"] >= before.replace(microsecond=0)
        assert 0 < rows[name]["latency_seconds"] < 3
    east = rows["east"]
    assert (east["health"], east["version"], east["last_error_reason"]) == ("unavailable", "", "unavailable")
    assert east["last_error"] and east["last_error_at"] >= east["last_ok_at"] >= before.replace(microsecond=0)


def test_a_site_that_never_answered_has_no_last_success_and_the_record_keeps_its_last_error(network, token):
    broker, sites, _ = network
    sites["east"].stop(grace=0)
    with client(broker, token) as c:
        with pytest.warns(MissingSitesWarning):
            c.budget()
        first = {r["site"]: r for r in c.status().sites.to_dicts()}["east"]
        second = {r["site"]: r for r in c.status().sites.to_dicts()}["east"]
    assert first["last_ok_at"] is None and first["health"] == "unavailable"
    assert second["last_error_at"] >= first["last_error_at"]  # each failed call is noted


def test_a_site_reports_itself(start_site, token):
    site = start_site(name="north")
    with client(site, token) as c:
        status = c.status()
    assert (status.served_by, status.component, status.version, status.sites.height) == ("north", "site",
                                                                                          __version__, 0)


def test_status_without_valid_credentials_is_refused_before_any_site_is_called(network, keys):
    broker, _, registry = network
    with Client(broker.target, token="not-a-token", retries=0) as c, pytest.raises(Unauthenticated):
        c.status()
    calls = sum(s.value for f in registry.collect() if f.name == "gateway_broker_site_requests"
                for s in f.samples if s.name.endswith("_total"))
    assert calls == 0


def test_budget_through_the_broker_names_the_sites_that_did_not_answer(network, token):
    broker, sites, _ = network
    sites["east"].stop(grace=0)
    with client(broker, token) as c, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = c.budget()
    assert set(frame["site"]) == {"north", "south"}
    [warning] = [w.message for w in caught if isinstance(w.message, MissingSitesWarning)]
    assert list(warning.missing) == ["east"] and warning.missing["east"].startswith("unavailable: ")
    assert "east (unavailable: " in str(warning)


def test_budget_with_no_site_answering_is_an_error_not_an_empty_list(start_site, start_broker, token):
    site = start_site(name="north")
    broker = start_broker({"north": site}, deadline_seconds=3)
    site.stop(grace=0)
    with client(broker, token) as c, pytest.raises(Unavailable) as err:
        c.budget()
    assert err.value.code == grpc.StatusCode.UNAVAILABLE and "north: unavailable" in err.value.message


@pytest.mark.slow
def test_the_command_line_lists_missing_budgets_and_exits_1_on_a_site_not_serving(network, token, proof_key):
    broker, sites, _ = network
    sites["east"].stop(grace=0)
    env = {"GATEWAY_TOKEN": token()}
    budget = run_cli("budget", "--target", broker.target, "--json", env=env)
    assert budget.returncode == 0, budget.stderr
    answer = json.loads(budget.stdout)
    [missing] = answer["missing_sites"]  # as in a query's answer
    assert (missing["site"], missing["reason"]) == ("east", "unavailable") and missing["message"]
    assert {b["site"] for b in answer["budgets"]} == {"north", "south"}
    table = run_cli("budget", "--target", broker.target, env=env)
    assert "warning: no budget from site(s) east (unavailable): they did not answer" in table.stderr
    status = run_cli("status", "--target", broker.target, env=env)
    assert status.returncode == 1, status.stderr
    lines = status.stdout.splitlines()
    assert lines[0] == f"broker broker, version {__version__}"
    assert lines[2].split() == ["site", "health", "version", "latency_seconds", "last_ok_at", "last_error_at",
                                "last_error"]
    assert lines[4].split()[:3] == ["north", "serving", __version__]
    assert lines[6].split()[:3] == ["east", "unavailable", "-"] and "unavailable:" in lines[6]
    as_json = json.loads(run_cli("status", "--target", broker.target, "--json", env=env).stdout)
    assert [s["health"] for s in as_json["sites"]] == ["serving", "serving", "unavailable"]
