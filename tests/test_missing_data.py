"""Missing data is never a silent wrong answer: NaN in a numeric column is missing, like NULL, in
sums, in the counts behind means, in filters and in group keys (DuckDB orders NaN above every
number, so unhandled it was clamped to the upper bound and matched every `>` filter)."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb
import pytest
from pydantic import ValidationError

from gateway.client import Client
from gateway.policy import Column
from tests.helpers.servers import ExactNoise

POLICY = """\
site: lung
epsilon: {default: 0.5, max: 1.0}
suppression: {min_count: 0}
datasets:
  lung:
    source: {database: lung.duckdb, table: lung}
    privacy_unit: patient_id
    max_rows_per_unit: 1
    aggregates: [count, sum, mean, variance, stddev]
    columns:
      sex: {type: string, roles: [filter, group_by], keys: [F, M]}
      inst: {type: integer, roles: [filter, group_by], keys: [1, 2, 3]}
      ecog: {type: float, roles: [filter, group_by, aggregate], bounds: [0, 4], precision: 0, keys: [0, 1, 2, 3, 4]}
      age: {type: float, roles: [filter, aggregate], bounds: [18, 99], precision: 1}
budgets:
  - {project: "*", epsilon: 1000, period: never}
"""
# patient_id, sex, inst, ecog, age: NaN and NULL in several places
ROWS = [
    (1, "F", 1, 0.0, 60.0), (2, "F", 1, 1.0, float("nan")), (3, "M", 2, float("nan"), 70.0),
    (4, "M", 2, 2.0, 80.0), (5, "F", None, float("nan"), float("nan")), (6, None, 3, 1.0, 50.0),
    (7, "M", 3, None, 65.0), (8, "F", 1, 3.0, 99.0),
]


@pytest.fixture
def lung_site(start_site, tmp_path: Path):
    folder = tmp_path / "lung"
    folder.mkdir()
    with duckdb.connect(str(folder / "lung.duckdb")) as con:
        con.execute("CREATE TABLE lung (patient_id BIGINT, sex VARCHAR, inst INTEGER, ecog DOUBLE, age DOUBLE)")
        con.executemany("INSERT INTO lung VALUES (?, ?, ?, ?, ?)", ROWS)
    (folder / "lung.yaml").write_text(POLICY)
    return start_site(noise=ExactNoise(), policy=folder / "lung.yaml")


def _present(values: list[float | None]) -> list[float]:
    return [v for v in values if v is not None and not math.isnan(v)]


@pytest.fixture
def ask(lung_site, token):
    """Exact answers (test-only noise) from the lung site, as a polars frame."""
    def run(sql: str):
        with Client(lung_site.target, token=token(), retries=0) as c:
            return c.query(sql, epsilon=1).to_polars()
    return run


def test_nan_is_missing_in_means_sums_and_their_counts(ask) -> None:
    ecog, age = _present([r[3] for r in ROWS]), _present([r[4] for r in ROWS])
    got = ask("SELECT count(*), mean(ecog), sum(ecog), mean(age) FROM lung").row(0, named=True)
    assert got["count"] == len(ROWS)  # every patient is a row, whatever is missing
    assert got["sum(ecog)"] == sum(ecog)
    assert got["mean(ecog)"] == pytest.approx(sum(ecog) / len(ecog))  # 1.4, not pulled up to the bound 4
    assert got["mean(age)"] == pytest.approx(sum(age) / len(age))


def test_nan_matches_no_comparison_filter(ask) -> None:
    above = [r for r in ROWS if r[3] is not None and not math.isnan(r[3]) and r[3] > 1]
    assert ask("SELECT count(*) FROM lung WHERE ecog > 1")["count"][0] == len(above)
    kept = [r for r in ROWS if r[3] is not None and not math.isnan(r[3]) and r[3] not in (0.0, 1.0)]
    assert ask("SELECT count(*) FROM lung WHERE ecog NOT IN (0, 1)")["count"][0] == len(kept)


def test_a_grouped_answer_says_which_rows_it_excludes(lung_site, token) -> None:
    with Client(lung_site.target, token=token(), retries=0) as c:
        grouped = c.query("SELECT sex, inst, count(*) FROM lung GROUP BY sex, inst", epsilon=1)
        whole = c.query("SELECT count(*) FROM lung", epsilon=1)
    assert grouped.notes == ["rows whose sex or inst is missing or not one of its public keys are in no group "
                             "(not counted here)"]
    assert whole.notes == []


def test_nan_and_null_group_keys_fall_in_no_public_group(ask) -> None:
    frame = ask("SELECT ecog, count(*) FROM lung GROUP BY ecog").sort("ecog")
    want = {k: sum(1 for r in ROWS if r[3] == k) for k in (0.0, 1.0, 2.0, 3.0, 4.0)}
    assert dict(zip(frame["ecog"].to_list(), frame["count"].to_list(), strict=True)) == want
    assert sum(want.values()) == len(ROWS) - 3  # two NaN and one NULL ecog are in no group


def test_variance_ignores_missing_values(ask) -> None:
    age = _present([r[4] for r in ROWS])
    mean = sum(age) / len(age)
    want = sum((a - mean) ** 2 for a in age) / (len(age) - 1)
    assert ask("SELECT variance(age) FROM lung")["variance(age)"][0] == pytest.approx(want)


def test_a_policy_may_release_missing_and_other_groups_noised_like_any_group(start_site, token, tmp_path) -> None:
    folder = tmp_path / "groups"
    folder.mkdir()
    with duckdb.connect(str(folder / "lung.duckdb")) as con:
        con.execute("CREATE TABLE lung (patient_id BIGINT, sex VARCHAR, inst INTEGER, ecog DOUBLE, age DOUBLE)")
        con.executemany("INSERT INTO lung VALUES (?, ?, ?, ?, ?)", ROWS)
    plain = "inst: {type: integer, roles: [filter, group_by], keys: [1, 2, 3]}"
    assert plain in POLICY
    (folder / "lung.yaml").write_text(POLICY.replace(
        plain, "inst: {type: integer, roles: [filter, group_by], keys: [1, 2], other_groups: true}"))
    exact_site, noisy_site = (start_site(noise=ExactNoise(), policy=folder / "lung.yaml"),
                              start_site(policy=folder / "lung.yaml"))
    sql = "SELECT inst, count(*) FROM lung GROUP BY inst"
    with Client(exact_site.target, token=token(), retries=0) as c:
        result = c.query(sql, epsilon=1)
    got = dict(zip(result.to_polars()["inst"].to_list(), result.to_polars()["count"].to_list(), strict=True))
    assert got == {"1": 3, "2": 2, "(missing)": 1, "(other)": 2}  # inst 3 is not a public key here
    assert result.notes == []  # nothing is left out
    with Client(noisy_site.target, token=token(), retries=0) as c:
        noisy = c.query(sql, epsilon=1).response
    assert [r.keys[0].value.WhichOneof("kind") for r in noisy.rows] == ["int_value"] * 2 + ["string_value"] * 2
    assert len({r.estimates[0].noise_scale for r in noisy.rows}) == 1  # the extra groups are noised alike


@pytest.mark.parametrize(("column", "reason"), [
    ({"type": "string", "roles": ("filter",), "other_groups": True}, "other_groups applies to a group_by column"),
    ({"type": "string", "roles": ("group_by",), "keys": ("a", "(other)")}, "reserved group names"),
])
def test_other_groups_are_declared_sensibly(column, reason) -> None:
    with pytest.raises(ValidationError, match=reason):
        Column(**column)
