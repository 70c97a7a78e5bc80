"""Federation: a broker over real site gateways (in-process servers and separate processes)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from fractions import Fraction
from pathlib import Path

import grpc
import pytest
from conftest import ExactNoise

from gateway.broker import load_broker_config
from gateway.client import Client
from gateway.demo.network import start_network
from gateway.errors import BudgetExhausted, InvalidQuery, Unavailable
from gateway.ledger import SqliteLedger


def test_pooled_counts_and_means_are_exact_combinations(start_site, start_broker, token):
    sites = {f"s{i}": start_site(noise=ExactNoise()) for i in range(3)}
    broker = start_broker(sites)
    with Client(f"127.0.0.1:{broker.port}", token=token()) as c:
        result = c.query("SELECT stage, count(*), sum(survival_months), mean(age_at_diagnosis) FROM patients "
                         "GROUP BY stage", epsilon=0.9)
        with Client(f"127.0.0.1:{sites['s0'].port}", token=token()) as single:
            one = single.query("SELECT stage, count(*), sum(survival_months), mean(age_at_diagnosis) "
                               "FROM patients GROUP BY stage", epsilon=0.9).to_polars()
    pooled = result.to_polars()
    assert pooled["count"].to_list() == [3 * v for v in one["count"].to_list()]
    assert pooled["sum(survival_months)"].to_list() == [3 * v for v in one["sum(survival_months)"].to_list()]
    assert pooled["mean(age_at_diagnosis)"].to_list() == pytest.approx(one["mean(age_at_diagnosis)"].to_list())
    assert result.sites == ["s0", "s1", "s2"] and result.missing_sites == {}
    assert result.per_site()["site"].unique(maintain_order=True).to_list() == ["s0", "s1", "s2"]
    est = result.response.rows[0].estimates[0]
    site_se = result.response.site_answers[0].rows[0].estimates[0].std_error
    assert est.mechanism.startswith("pooled(") and est.std_error == pytest.approx(math.sqrt(3) * site_se)


def test_pooled_intervals_cover_the_true_pooled_value(start_site, start_broker, token):
    """Over many independent queries, pooled 95% intervals hold the exact pooled value ~95% of the time
    (intervals 2x too narrow would cover ~68%)."""
    noisy = start_broker({f"s{i}": start_site() for i in range(3)})
    exact = start_broker({f"s{i}": start_site(noise=ExactNoise()) for i in range(3)})
    hits = {"count": [], "mean(age_at_diagnosis)": []}
    with Client(f"127.0.0.1:{noisy.port}", token=token(project="stats")) as n, \
            Client(f"127.0.0.1:{exact.port}", token=token(project="stats")) as x:
        for a in range(18, 78):
            sql = (f"SELECT stage, sex, count(*), mean(age_at_diagnosis) FROM patients "
                   f"WHERE age_at_diagnosis >= {a} GROUP BY stage, sex")
            got, truth = n.query(sql, epsilon=0.3).response, x.query(sql, epsilon=0.3).response
            for g_row, t_row in zip(got.rows, truth.rows, strict=True):
                for g, t in zip(g_row.estimates, t_row.estimates, strict=True):
                    if g.suppressed or t.suppressed or math.isnan(t.value):
                        continue
                    hits[g.aggregate].append(g.ci_low <= t.value <= g.ci_high)
    for name, values in hits.items():
        assert len(values) > 250, name
        rate = sum(values) / len(values)
        assert 0.9 < rate <= 0.995, (name, rate)


def test_missing_sites_are_labelled_and_min_sites_enforced(start_site, start_broker, token):
    sites = {f"s{i}": start_site() for i in range(3)}
    sites["s2"].stop(grace=0)  # a site that is down before the query
    lenient = start_broker(sites, min_sites=2, deadline_seconds=3)
    strict = start_broker(sites, min_sites=3, deadline_seconds=3)
    with Client(f"127.0.0.1:{lenient.port}", token=token(), retries=0) as c:
        result = c.query("SELECT count(*) FROM patients", epsilon=0.2, query_id="partial-1")
    assert result.sites == ["s0", "s1"] and list(result.missing_sites) == ["s2"]
    assert result.missing_sites["s2"].startswith("unavailable")
    with Client(f"127.0.0.1:{strict.port}", token=token(), retries=0) as c, pytest.raises(Unavailable) as err:
        c.query("SELECT count(*) FROM patients", epsilon=0.2, query_id="partial-2")
    assert "only 2 site(s) answered, at least 3 needed" in err.value.message and "s2: unavailable" in err.value.message


def test_caller_errors_come_back_typed_and_unknown_sites_rejected(start_site, start_broker, token):
    broker = start_broker({f"s{i}": start_site() for i in range(2)})
    with Client(f"127.0.0.1:{broker.port}", token=token(project="tight"), retries=0) as c:
        with pytest.raises(InvalidQuery, match="JOIN"):
            c.query("SELECT count(*) FROM patients p JOIN treatments t ON p.patient_id = t.patient_id")
        with pytest.raises(InvalidQuery, match="unknown site"):
            c.query("SELECT count(*) FROM patients", sites=["nowhere"])
        one = c.query("SELECT count(*) FROM patients", epsilon=0.5, sites=["s1"])
        assert one.sites == ["s1"]
        c.query("SELECT count(*) FROM patients WHERE sex = 'F'", epsilon=1.0, sites=["s0"])
        with pytest.raises(BudgetExhausted, match="s0: privacy budget exhausted") as refused:
            c.query("SELECT count(*) FROM patients WHERE sex = 'M'", epsilon=0.5, sites=["s0"])
        # through the broker too, the error arrives with its fields
        assert (refused.value.requested, refused.value.remaining) == (Fraction(1, 2), 0)
        budgets = c.budget("patients")
    assert sorted(budgets["site"].to_list()) == ["s0", "s1"]
    assert dict(zip(budgets["site"], budgets["spent"], strict=True)) == {"s0": 1.0, "s1": 0.5}


GATEWAY = [sys.executable, "-m", "gateway.cli"]


def _site_spent(net, site: str, project: str = "demo") -> Fraction:
    ledger = SqliteLedger(net.workdir / "state" / site / "ledger.sqlite")
    try:
        return ledger.total_spent()
    finally:
        ledger.close()


def test_slow_site_past_deadline_then_retry_charges_once(tmp_path, token):
    net = start_network(tmp_path / "net", n_sites=3, patients=2000, deadline_seconds=2)
    try:
        assert net.broker is not None
        slow = net.sites["east"].popen
        slow.send_signal(signal.SIGSTOP)  # a site that hangs: the broker must not wait past its deadline
        with Client(net.broker.target, token=net.token(), retries=0, timeout=30) as c:
            started = time.monotonic()
            partial = c.query("SELECT stage, count(*) FROM patients GROUP BY stage", epsilon=0.5,
                              query_id="slow-1")
            assert time.monotonic() - started < 10
            assert partial.missing_sites["east"].startswith("deadline")
            slow.send_signal(signal.SIGCONT)
            time.sleep(1.0)
            retry = c.query("SELECT stage, count(*) FROM patients GROUP BY stage", epsilon=0.5, query_id="slow-1")
        assert retry.sites == ["north", "south", "east"] and retry.missing_sites == {}
        for site in ("north", "south"):  # answered the first time; the retry got their stored answers
            answer = next(a for a in retry.response.site_answers if a.site == site)
            assert answer.cached
        assert {s: _site_spent(net, s) for s in ("north", "south", "east")} == \
            {"north": Fraction(1, 2), "south": Fraction(1, 2), "east": Fraction(1, 2)}
    finally:
        net.stop()


def test_site_killed_during_queries_and_broker_restart_retry_charges_once(tmp_path):
    net = start_network(tmp_path / "net", n_sites=3, patients=2000, deadline_seconds=5)
    try:
        assert net.broker is not None
        with Client(net.broker.target, token=net.token(), retries=0) as c:
            c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="k-1")
            net.sites["west" if "west" in net.sites else "east"].popen.send_signal(signal.SIGKILL)
            partial = c.query("SELECT count(*) FROM patients WHERE sex = 'F'", epsilon=0.25, query_id="k-2")
        assert list(partial.missing_sites) == ["east"] and partial.missing_sites["east"].startswith("unavailable")
        # the broker dies; a new one over the same sites answers the retry from the sites' stored answers
        net.broker.popen.send_signal(signal.SIGKILL)
        net.broker.popen.wait()
        port_file = tmp_path / "broker2.port"
        broker2 = subprocess.Popen([*GATEWAY, "broker", "serve", "--config", str(net.workdir / "broker.yaml"),
                                    "--port", "0", "--port-file", str(port_file)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            while not (port_file.exists() and port_file.read_text()):
                assert broker2.poll() is None
                time.sleep(0.05)
            with Client(f"127.0.0.1:{port_file.read_text()}", token=net.token(), retries=0) as c:
                again = c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="k-1")
            assert again.cached and again.epsilon_charged == 0
            assert again.response.rows[0].estimates[0].value == pytest.approx(
                sum(a.rows[0].estimates[0].value for a in again.response.site_answers))
        finally:
            broker2.send_signal(signal.SIGTERM)
            broker2.wait(timeout=30)
        assert _site_spent(net, "north") == Fraction(1, 2)  # k-1 and k-2, each once
    finally:
        net.stop()


def test_cli_json_through_broker(tmp_path):
    net = start_network(tmp_path / "net", n_sites=2, patients=2000)
    try:
        assert net.broker is not None
        env = {**os.environ, "GATEWAY_TOKEN": net.token()}
        out = subprocess.run([*GATEWAY, "query", "--target", net.broker.target, "--sql",
                              "SELECT sex, count(*) FROM patients GROUP BY sex", "--json"],
                             capture_output=True, text=True, env=env, timeout=60, check=False)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["sites"] == ["north", "south"] and answer["missing_sites"] == []
        assert [r["sex"] for r in answer["rows"]] == ["F", "M"]
        assert set(answer["rows"][0]["count"]) >= {"value", "std_error", "ci95"}
        budget = subprocess.run([*GATEWAY, "budget", "--target", net.broker.target], capture_output=True,
                                text=True, env=env, timeout=60, check=False)
        assert budget.returncode == 0 and "north" in budget.stdout and "south" in budget.stdout
    finally:
        net.stop()


def test_broker_config_validation(tmp_path):
    path = tmp_path / "broker.yaml"
    path.write_text("sites:\n  - {name: a, address: '10.0.0.5:50051'}\n")
    with pytest.raises(ValueError, match="needs tls"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: '127.0.0.1:1'}\nmin_sites: 2\n")
    with pytest.raises(ValueError, match="min_sites"):
        load_broker_config(path)
    path.write_text("sites: []\n")
    with pytest.raises(ValueError, match="sites"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: '127.0.0.1:1', colour: red}\n")
    with pytest.raises(ValueError, match="Extra inputs"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {ca: ca.pem, colour: red}}\n")
    with pytest.raises(ValueError, match="colour"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {ca: ca.pem, cert: b.pem}}\n")
    with pytest.raises(ValueError, match="both cert and key"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {cert: b.pem, key: b.key}}\n")
    with pytest.raises(ValueError, match="tls needs ca"):
        load_broker_config(path)
    path.write_text("sites:\n  - {name: a, address: 'h:1', tls: {ca: pki/ca.pem, cert: b.pem, key: /abs/b.key}}\n")
    tls = load_broker_config(path).sites[0].tls
    assert tls is not None
    assert (tls.ca, tls.cert, tls.key) == (tmp_path / "pki" / "ca.pem", tmp_path / "b.pem", Path("/abs/b.key"))


def test_unreachable_broker_is_typed(token):
    with Client("127.0.0.1:1", token=token(), retries=1, timeout=2) as c, pytest.raises(Unavailable):
        c.query("SELECT count(*) FROM patients")
    assert Unavailable.code == grpc.StatusCode.UNAVAILABLE


def test_site_killed_during_a_query_then_restarted_charges_once(tmp_path):
    """A query is in flight to a hung site, which is then killed and restarted on its state dir: the
    client's retry with the same query_id is answered and the site's ledger holds exactly one charge.
    (The charge-while-killed case is covered by the SIGKILL stream test in test_cli.py.)"""
    net = start_network(tmp_path / "net", n_sites=2, patients=2000, deadline_seconds=2)
    try:
        assert net.broker is not None
        victim = net.sites["south"].popen
        with Client(net.broker.target, token=net.token(), retries=0, timeout=30) as c:
            victim.send_signal(signal.SIGSTOP)
            partial = c.query("SELECT sex, count(*) FROM patients GROUP BY sex", epsilon=0.5, query_id="d-1")
            assert partial.missing_sites["south"].startswith("deadline")
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            restarted = net.restart_site("south")
            # the broker was configured with the old port: ask the restarted site directly, as a client retry would
            with Client(restarted.target, token=net.token(), retries=0) as direct:
                retry = direct.query("SELECT sex, count(*) FROM patients GROUP BY sex", epsilon=0.5,
                                     query_id="d-1")
        assert len(retry.to_polars()) == 2
        assert _site_spent(net, "south") == Fraction(1, 2)
        assert _site_spent(net, "north") == Fraction(1, 2)
    finally:
        net.stop()


def test_list_datasets_says_where_sites_differ(start_site, start_broker, token, tmp_path, site_data):
    from conftest import write_policy

    same = start_broker({"a": start_site(), "b": start_site()})
    text = (Path(__file__).parent.parent / "policies" / "north.yaml").read_text()
    changed = text.replace("bounds: [18, 99]", "bounds: [0, 120]").replace("keys: {range: [18, 99]}",
                                                                          "keys: {range: [0, 120]}")
    folder = tmp_path / "changed"
    folder.mkdir()
    differ = start_broker({"a": start_site(), "b": start_site(policy=write_policy(folder, site_data, text=changed))})
    with Client(f"127.0.0.1:{same.port}", token=token()) as c:
        agreed = {d.name: d for d in c.datasets()}
    with Client(f"127.0.0.1:{differ.port}", token=token()) as c:
        listed = {d.name: d for d in c.datasets()}
    assert list(agreed["patients"].sites) == ["a", "b"] and list(agreed["patients"].differences) == []
    differences = list(listed["patients"].differences)
    assert "column age_at_diagnosis bounds: a [18, 99]; b [0, 120]" in differences
    assert any(line.startswith("column age_at_diagnosis keys: a 82 keys (18..99") for line in differences)
    assert list(listed["treatments"].differences) == []
