"""Federation: the broker service (gateway.broker.service) over real site gateways, in-process servers
and separate processes. Pooling itself, message by message, is in test_pooling.py."""

from __future__ import annotations

import json
import math
import signal
import subprocess
import time
from fractions import Fraction

import pytest

from gateway.client import Client
from gateway.demo.network import start_network
from gateway.errors import BudgetExhausted, InvalidQuery, Unavailable
from gateway.ledger import SqliteLedger
from gateway.policy import KeyRange
from gateway.render import query_table
from tests.helpers.cli import GATEWAY, run_cli, wait_for_port_file
from tests.helpers.policies import example_policy, with_column, write_policy
from tests.helpers.servers import ExactNoise


def test_pooled_counts_and_means_are_exact_combinations(start_site, start_broker, token):
    sites = {f"s{i}": start_site(noise=ExactNoise(), name=f"s{i}") for i in range(3)}
    broker = start_broker(sites)
    with Client(broker.target, token=token()) as c:
        result = c.query("SELECT stage, count(*), sum(survival_months), mean(age_at_diagnosis) FROM patients "
                         "GROUP BY stage", epsilon=0.9)
        with Client(sites["s0"].target, token=token()) as single:
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


def test_a_broker_dry_run_gives_the_pooled_accuracy_of_counts_and_means(start_site, start_broker, token):
    """Through the broker a dry run tells a count's exact pooled 95% half-width, and a mean's as its
    pooled sum's noise over the group's count (it was 'noise scale nan')."""
    sites = {f"s{i}": start_site(name=f"s{i}") for i in range(4)}
    broker = start_broker(sites)
    sql = "SELECT count(*), mean(age_at_diagnosis) FROM patients"
    with Client(broker.target, token=token()) as c:
        result = c.query(sql, epsilon=0.5, dry_run=True)
        spent = c.budget()
    count, mean = result.response.rows[0].estimates
    site_count = result.response.site_answers[0].rows[0].estimates[0]
    scale = site_count.components[0].noise_scale
    # the exact quantile of the sum of the four sites' discrete Laplace noises, brute force
    a = math.exp(-1 / scale)
    pmf = [(1 - a) / (1 + a) * a ** abs(d) for d in range(-400, 401)]
    total = [1.0]
    for _ in range(4):
        total = [sum(total[i - j] * pmf[j] for j in range(len(pmf)) if 0 <= i - j < len(total))
                 for i in range(len(total) + len(pmf) - 1)]
    middle = len(total) // 2
    exact = next(t for t in range(middle) if sum(total[middle - t:middle + t + 1]) >= 0.95)
    assert count.ci_half_width == exact
    assert math.isnan(count.value) and math.isnan(mean.value)
    pooled_sum = {c.name: c for c in mean.components}["sum"]
    assert all(math.isnan(v) for c in mean.components for v in c.values)  # noise only, no value
    assert pooled_sum.ci_half_width > site_count.ci_half_width
    rendered = query_table(result.response)
    assert f"± {pooled_sum.ci_half_width:.4g} / n (95%" in rendered and "nan" not in rendered
    assert spent["spent"].sum() == 0  # a dry run charges nothing


@pytest.mark.slow
def test_pooled_intervals_cover_the_true_pooled_value(start_site, start_broker, token):
    """Over many independent queries, pooled 95% intervals hold the exact pooled value ~95% of the time
    (intervals 2x too narrow would cover ~68%)."""
    noisy = start_broker({f"s{i}": start_site(name=f"s{i}") for i in range(3)})
    exact = start_broker({f"s{i}": start_site(noise=ExactNoise(), name=f"s{i}") for i in range(3)})
    hits = {"count": [], "mean(age_at_diagnosis)": []}
    with Client(noisy.target, token=token(project="stats")) as n, \
            Client(exact.target, token=token(project="stats")) as x:
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
    sites = {f"s{i}": start_site(name=f"s{i}") for i in range(3)}
    sites["s2"].stop(grace=0)  # a site that is down before the query
    lenient = start_broker(sites, min_sites=2, deadline_seconds=3)
    strict = start_broker(sites, min_sites=3, deadline_seconds=3)
    with Client(lenient.target, token=token(), retries=0) as c:
        result = c.query("SELECT count(*) FROM patients", epsilon=0.2, query_id="partial-1")
    assert result.sites == ["s0", "s1"] and list(result.missing_sites) == ["s2"]
    assert result.missing_sites["s2"].startswith("unavailable")
    with Client(strict.target, token=token(), retries=0) as c, pytest.raises(Unavailable) as err:
        c.query("SELECT count(*) FROM patients", epsilon=0.2, query_id="partial-2")
    assert "only 2 site(s) answered, at least 3 needed" in err.value.message and "s2: unavailable" in err.value.message


def test_caller_errors_come_back_typed_and_unknown_sites_rejected(start_site, start_broker, token):
    broker = start_broker({f"s{i}": start_site(name=f"s{i}") for i in range(2)})
    with Client(broker.target, token=token(project="tight"), retries=0) as c:
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


def _site_spent(net, site: str, project: str = "demo") -> Fraction:
    ledger = SqliteLedger(net.workdir / "state" / site / "ledger.sqlite")
    try:
        return ledger.total_spent()
    finally:
        ledger.close()


@pytest.mark.slow
def test_slow_site_past_deadline_then_retry_charges_once(tmp_path, token):
    net = start_network(tmp_path / "net", n_sites=3, patients=2000, deadline_seconds=2)
    try:
        assert net.broker is not None
        slow = net.sites["east"].popen
        slow.send_signal(signal.SIGSTOP)  # a site that hangs: the broker must not wait past its deadline
        with Client(net.broker.target, token=net.token(), proof_key=net.proof_key, retries=0, timeout=30) as c:
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


@pytest.mark.slow
def test_site_killed_during_queries_and_broker_restart_retry_charges_once(tmp_path):
    net = start_network(tmp_path / "net", n_sites=3, patients=2000, deadline_seconds=5)
    try:
        assert net.broker is not None
        with Client(net.broker.target, token=net.token(), proof_key=net.proof_key, retries=0) as c:
            c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="k-1")
            net.sites["west" if "west" in net.sites else "east"].popen.send_signal(signal.SIGKILL)
            partial = c.query("SELECT count(*) FROM patients WHERE sex = 'F'", epsilon=0.25, query_id="k-2")
        assert list(partial.missing_sites) == ["east"] and partial.missing_sites["east"].startswith("unavailable")
        # the broker dies; a new one over the same sites answers the retry from the sites' stored answers
        net.broker.popen.send_signal(signal.SIGKILL)
        net.broker.popen.wait()
        port_file = tmp_path / "broker2.port"
        broker2 = subprocess.Popen([*GATEWAY, "broker", "serve", "--config", str(net.workdir / "broker.yaml"),
                                    "--trusted-key", str(net.public_key), "--port", "0", "--port-file",
                                    str(port_file)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            with Client(wait_for_port_file(broker2, port_file), token=net.token(), proof_key=net.proof_key,
                        retries=0) as c:
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


@pytest.mark.slow
def test_cli_json_through_broker(tmp_path):
    net = start_network(tmp_path / "net", n_sites=2, patients=2000)
    try:
        assert net.broker is not None
        env = {"GATEWAY_TOKEN": net.token(), "GATEWAY_PROOF_KEY": str(net.proof_key)}
        out = run_cli("query", "--target", net.broker.target, "--sql",
                      "SELECT sex, count(*) FROM patients GROUP BY sex", "--json", env=env, timeout=60)
        assert out.returncode == 0, out.stderr
        answer = json.loads(out.stdout)
        assert answer["sites"] == ["north", "south"] and answer["missing_sites"] == []
        assert [r["sex"] for r in answer["rows"]] == ["F", "M"]
        assert set(answer["rows"][0]["count"]) >= {"value", "std_error", "ci95"}
        budget = run_cli("budget", "--target", net.broker.target, env=env, timeout=60)
        assert budget.returncode == 0 and "north" in budget.stdout and "south" in budget.stdout
    finally:
        net.stop()


@pytest.mark.slow
def test_site_killed_during_a_query_then_restarted_charges_once(tmp_path):
    """A query is in flight to a hung site, which is then killed and restarted on its state dir: the
    client's retry with the same query_id is answered and the site's ledger holds exactly one charge.
    (The charge-while-killed case is covered by the SIGKILL stream test in test_cli.py.)"""
    net = start_network(tmp_path / "net", n_sites=2, patients=2000, deadline_seconds=2)
    try:
        assert net.broker is not None
        victim = net.sites["south"].popen
        with Client(net.broker.target, token=net.token(), proof_key=net.proof_key, retries=0, timeout=30) as c:
            victim.send_signal(signal.SIGSTOP)
            partial = c.query("SELECT sex, count(*) FROM patients GROUP BY sex", epsilon=0.5, query_id="d-1")
            assert partial.missing_sites["south"].startswith("deadline")
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=10)
            restarted = net.restart_site("south")
            # the broker was configured with the old port: ask the restarted site directly, as a client retry would
            with Client(restarted.target, token=net.token(), proof_key=net.proof_key, retries=0) as direct:
                retry = direct.query("SELECT sex, count(*) FROM patients GROUP BY sex", epsilon=0.5,
                                     query_id="d-1")
        assert len(retry.to_polars()) == 2
        assert _site_spent(net, "south") == Fraction(1, 2)
        assert _site_spent(net, "north") == Fraction(1, 2)
    finally:
        net.stop()


def test_list_datasets_says_where_sites_differ(start_site, start_broker, token, tmp_path, site_data):
    same = start_broker({"a": start_site(name="a"), "b": start_site(name="b")})
    wider = with_column(example_policy(), "patients", "age_at_diagnosis", bounds=(0, 120),
                        keys=KeyRange(range=(0, 120)))
    folder = tmp_path / "changed"
    folder.mkdir()
    differ = start_broker({"a": start_site(name="a"),
                           "b": start_site(policy=write_policy(folder, site_data, policy=wider), name="b")})
    with Client(same.target, token=token()) as c:
        agreed = {d.name: d for d in c.datasets()}
    with Client(differ.target, token=token()) as c:
        listed = {d.name: d for d in c.datasets()}
    assert list(agreed["patients"].sites) == ["a", "b"] and list(agreed["patients"].differences) == []
    differences = list(listed["patients"].differences)
    assert "column age_at_diagnosis bounds: a [18, 99]; b [0, 120]" in differences
    assert any(line.startswith("column age_at_diagnosis keys: a 82 keys (18..99") for line in differences)
    assert list(listed["treatments"].differences) == []
