"""One budget per patient, whatever the dataset, and periods that an edit cannot reset.

Datasets describing the same patients (the same population: by default the same privacy-unit
column; the example policies name it) draw on one budget per project and one site-wide cap.
Spend is recorded against windows of absolute time: an edit of `period` or `period_start` takes
effect when the window in force ends and never frees spend made in it.
"""

from __future__ import annotations

import sqlite3
from datetime import UTC, datetime
from fractions import Fraction

import pytest

from gateway.client import Client
from gateway.errors import BudgetExhausted
from gateway.ledger import VERSION, SqliteLedger
from gateway.policy import DatasetCap, load_policy, window_bounds
from tests.helpers.policies import dump_policy, example_policy, for_tests, with_policy, write_policy


def test_datasets_of_one_population_share_one_budget(start_site, token) -> None:
    site = start_site()
    with Client(site.target, token=token(project="tight"), retries=0) as c:  # 1 in all, never resets
        c.query("SELECT count(*) FROM patients", epsilon=0.75)
        with pytest.raises(BudgetExhausted) as refused:  # treatments holds the same patients
            c.query("SELECT count(*) FROM treatments", epsilon=0.5)
        budgets = c.budget()
    assert refused.value.remaining == Fraction(1, 4) and "population 'patients'" in refused.value.message
    assert budgets.height == 1  # one budget, for the population, not one per dataset
    assert budgets.row(0, named=True)["spent"] == 0.75


def test_the_population_cap_bounds_all_projects_on_every_dataset(start_site, token, site_data, tmp_path) -> None:
    folder = tmp_path / "cap"
    folder.mkdir()
    capped = with_policy(example_policy(), population_caps={"patients": DatasetCap(epsilon=Fraction(2))})
    site = start_site(policy=write_policy(folder, site_data, policy=capped))
    with Client(site.target, token=token(project="stats"), retries=0) as a, \
            Client(site.target, token=token(project="onc-x"), retries=0) as b:
        a.query("SELECT count(*) FROM patients", epsilon=1)
        b.query("SELECT count(*) FROM treatments", epsilon=1)
        with pytest.raises(BudgetExhausted, match="all projects on population 'patients'"):
            a.query("SELECT count(*) FROM treatments WHERE cycles > 2", epsilon=0.5)


def test_editing_the_period_never_frees_spend_in_the_window_in_force(start_site, token, site_data) -> None:
    site = start_site(reload_interval=3600)
    example = example_policy()
    shorter = with_policy(example, budgets=tuple(r.model_copy(update={"period": "30d"}) if r.project == "onc-*"
                                                 else r for r in example.budgets))
    moved = with_policy(shorter, period_start=datetime(2026, 11, 20, tzinfo=UTC))
    with Client(site.target, token=token(project="onc-lung"), retries=0) as c:  # 10 per 365 days
        for year in range(2010, 2020):
            c.query(f"SELECT count(*) FROM patients WHERE diagnosis_year = {year}", epsilon=1)
        with pytest.raises(BudgetExhausted):
            c.query("SELECT count(*) FROM patients WHERE diagnosis_year = 2020", epsilon=1)
        for edited in (shorter, moved):
            dump_policy(for_tests(edited, site_data), site.watcher.path)
            assert site.watcher.reload()
            with pytest.raises(BudgetExhausted) as refused:  # still spent: the 365-day window goes on
                c.query("SELECT count(*) FROM patients WHERE diagnosis_year = 2021", epsilon=1)
            assert refused.value.remaining == 0
            assert refused.value.resets_at == "2027-01-01T00:00:00Z"


def _old_ledger(path, rows: list[tuple[str, int, str]]) -> None:
    """A ledger as 0.1.x wrote it: spend per dataset and period index, no version."""
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE spend (scope TEXT NOT NULL, period INTEGER NOT NULL, spent TEXT NOT NULL,"
                " PRIMARY KEY (scope, period))")
    con.executemany("INSERT INTO spend VALUES (?, ?, ?)", rows)
    con.commit()
    con.close()


def test_a_ledger_from_0_1_keeps_its_spend_under_populations(start_site, token, tmp_path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    index = (datetime.now(UTC) - datetime(2026, 1, 1, tzinfo=UTC)).days // 365  # the current 365-day period
    _old_ledger(state / "ledger.sqlite", [
        ("project:onc-lung:patients", index, "3"), ("project:onc-lung:treatments", index, "4"),
        ("project:onc-lung:patients", index - 1, "9"), ("dataset:patients", index, "50"),
        ("project:onc-lung:gone", index, "1")])
    site = start_site(state_dir=state)
    with Client(site.target, token=token(project="onc-lung"), retries=0) as c:
        budget = c.budget().row(0, named=True)
        assert budget["spent"] == 7  # 3 on patients + 4 on treatments: the same patients
        for year in range(2010, 2013):
            c.query(f"SELECT count(*) FROM treatments WHERE cycles = {year - 2009}", epsilon=1)
        with pytest.raises(BudgetExhausted) as refused:  # 7 + 3 = the 10 of onc-*: the old spend counts
            c.query("SELECT count(*) FROM patients", epsilon=0.5)
        assert refused.value.remaining == 0
    ledger = site.state.ledger
    assert isinstance(ledger, SqliteLedger) and ledger.version == VERSION
    rows = dict(((k, p), v) for k, p, v in ledger._conn().execute("SELECT scope, period, spent FROM spend"))
    policy = load_policy(site.watcher.path).policy
    start, _end = window_bounds("365d", policy.period_start, datetime.now(UTC))
    assert rows[("population:patients", start)] == "53/1"  # the old dataset cap's 50 (and 3 spent since)
    assert rows[("project:onc-lung:gone", index)] == "1"  # a dataset the policy no longer has: left alone
