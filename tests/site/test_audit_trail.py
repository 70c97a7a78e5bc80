"""An audit trail a privacy officer can read: each query's time, who asked, the canonical query as
text, dataset and population, the epsilon charged, the outcome and why; policy reloads, accepted or
refused, with what changed; and `gateway audit tail` filtered by project, outcome, event and time."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from fractions import Fraction

import pytest

from gateway import audit
from gateway.errors import BudgetExhausted
from gateway.policy import load_policy
from tests.helpers.cli import run_cli
from tests.helpers.policies import dump_policy, with_policy, write_policy
from tests.helpers.servers import client, wait_for


def test_a_query_record_says_who_asked_what_on_which_population_for_what_cost(start_site, token) -> None:
    site = start_site()
    with client(site, token, project="tight", subject="dr-who") as c:
        answer = c.query("SELECT stage, count(*) FROM patients WHERE sex = 'F' GROUP BY stage", epsilon=0.6)
        with pytest.raises(BudgetExhausted):
            c.query("SELECT count(*) FROM treatments", epsilon=0.6)
    ok, refused = audit.tail(site.state.audit.path, 2)
    assert ok["event"] == "query" and ok["outcome"] == "ok" and ok["epsilon_charged"] == pytest.approx(0.6)
    assert (ok["project"], ok["subject"], ok["dataset"], ok["population"]) == ("tight", "dr-who", "patients",
                                                                             "patients")
    assert ok["canonical_query"] == answer.response.canonical_query  # the query as text, not only its hash
    assert json.loads(ok["canonical_query"])["group_by"] == ["stage"]
    stamped = datetime.fromisoformat(ok["at"].replace("Z", "+00:00"))
    assert stamped.tzinfo is not None and abs(stamped.timestamp() - ok["time"]) < 0.001
    assert refused["outcome"] == "budget_exhausted" and refused["status"] == "RESOURCE_EXHAUSTED"
    assert refused["population"] == "patients" and "requested epsilon 0.6" in refused["reason"]
    assert "epsilon_charged" not in refused or refused["epsilon_charged"] == 0


def test_policy_reloads_are_records_with_what_changed_or_why_not(start_site, tmp_path, site_data) -> None:
    policy = write_policy(tmp_path, site_data)
    site = start_site(policy=policy)
    good = load_policy(policy).policy
    dump_policy(with_policy(good, population_caps={"patients": {"epsilon": Fraction(50), "period": "365d"}}), policy)
    wait_for(lambda: any(r.get("event") == "policy_reload" for r in audit.tail(site.state.audit.path, 10)))
    policy.write_text(policy.read_text() + "\nunknown_key: 1\n")
    wait_for(lambda: sum(r.get("event") == "policy_reload" for r in audit.tail(site.state.audit.path, 10)) == 2)
    accepted, refused = [r for r in audit.tail(site.state.audit.path, 10) if r.get("event") == "policy_reload"]
    assert accepted["outcome"] == "accepted" and accepted["policy"] == str(policy)
    assert any("population_caps" in change for change in accepted["changes"])
    assert refused["outcome"] == "refused" and "unknown_key" in refused["reason"]
    assert audit.verify(site.state.audit.path).ok


def test_audit_tail_filters_and_reads_well(start_site, token) -> None:
    site = start_site()
    with client(site, token, project="tight") as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.1)
        c.query("SELECT count(*) FROM patients", epsilon=0.1)  # the stored answer: cached
    with client(site, token, project="onc-test") as c:
        c.query("SELECT count(*) FROM patients WHERE sex = 'M'", epsilon=0.1)
    state = str(site.state.state_dir)
    mine = run_cli("audit", "tail", state, "--project", "tight", "--json")
    assert [json.loads(line)["outcome"] for line in mine.stdout.splitlines()] == ["ok", "cached"]
    cached = run_cli("audit", "tail", state, "--outcome", "cached", "--since", "1h", "--json")
    assert [json.loads(line)["project"] for line in cached.stdout.splitlines()] == ["tight"]
    assert run_cli("audit", "tail", state, "--until", "2020-01-01").stdout == ""  # all records are later
    lines = run_cli("audit", "tail", state, "-n", "1").stdout.splitlines()
    assert len(lines) == 1 and "onc-test/alice" in lines[0] and "patients (patients)" in lines[0]
    assert "epsilon 0.1" in lines[0] and lines[0].startswith(datetime.now(UTC).strftime("%Y-%m-%d"))
    bad = run_cli("audit", "tail", state, "--since", "yesterday-ish")
    assert bad.returncode == 2 and "neither an ISO date/time" in bad.stderr and "Traceback" not in bad.stderr
