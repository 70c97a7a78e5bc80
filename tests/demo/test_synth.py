"""Contract tests for gateway.demo.synth (deterministic synthetic registry data)."""

from __future__ import annotations

import pathlib
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest

from gateway.demo.synth import SITE_PROFILES, SiteProfile, SynthSummary, synthesize
from tests.helpers.data import exact

PATIENT_SCHEMA = [
    ("patient_id", "BIGINT"),
    ("sex", "VARCHAR"),
    ("age_at_diagnosis", "INTEGER"),
    ("primary_site", "VARCHAR"),
    ("stage", "VARCHAR"),
    ("diagnosis_year", "INTEGER"),
    ("vital_status", "VARCHAR"),
    ("survival_months", "INTEGER"),
    ("bmi", "DOUBLE"),
    ("death", "INTEGER"),
]
TREATMENT_SCHEMA = [
    ("treatment_id", "BIGINT"),
    ("patient_id", "BIGINT"),
    ("treatment_type", "VARCHAR"),
    ("days_from_diagnosis", "INTEGER"),
    ("cost_usd", "DOUBLE"),
    ("cycles", "INTEGER"),
]
CATEGORIES = {
    ("patients", "sex"): {"F", "M"},
    ("patients", "primary_site"): {
        "breast",
        "lung",
        "colorectal",
        "prostate",
        "melanoma",
        "lymphoma",
        "pancreas",
        "other",
    },
    ("patients", "stage"): {"I", "II", "III", "IV"},
    ("patients", "vital_status"): {"alive", "deceased"},
    ("treatments", "treatment_type"): {
        "surgery",
        "chemotherapy",
        "radiotherapy",
        "immunotherapy",
        "hormone",
    },
}
RANGES = {
    ("patients", "age_at_diagnosis"): (18, 99),
    ("patients", "diagnosis_year"): (2010, 2024),
    ("patients", "survival_months"): (0, 180),
    ("patients", "bmi"): (15, 50),
    ("patients", "death"): (0, 1),
    ("treatments", "days_from_diagnosis"): (0, 1800),
    ("treatments", "cost_usd"): (100, 250_000),
    ("treatments", "cycles"): (1, 12),
}

Query = Callable[[str], list[tuple[Any, ...]]]


def _query(path: pathlib.Path) -> Query:
    """Run one SQL statement read-only against a synthesized file."""
    return partial(exact, path)


def _tables(path: pathlib.Path) -> dict[str, list[tuple[Any, ...]]]:
    """Full, ordered contents of both tables, for exact equality checks."""
    q = _query(path)
    return {
        "patients": q("SELECT * FROM patients ORDER BY patient_id"),
        "treatments": q("SELECT * FROM treatments ORDER BY treatment_id"),
    }


@pytest.fixture(scope="module")
def north(tmp_path_factory: pytest.TempPathFactory) -> tuple[SynthSummary, Query]:
    """One 20k-patient 'north' file shared by the read-only checks."""
    out = tmp_path_factory.mktemp("north") / "north.duckdb"
    summary = synthesize("north", 20_000, out, seed=7)
    return summary, _query(out)


def test_same_inputs_give_identical_tables(tmp_path: pathlib.Path) -> None:
    a = synthesize("south", 5_000, tmp_path / "a.duckdb", seed=3)
    b = synthesize("south", 5_000, tmp_path / "b.duckdb", seed=3)
    assert a.treatment_rows == b.treatment_rows
    assert _tables(a.path) == _tables(b.path)


@pytest.mark.parametrize(("site", "seed"), [("south", 4), ("north", 3)])
def test_other_seed_or_site_gives_different_tables(
    tmp_path: pathlib.Path, site: str, seed: int
) -> None:
    base = synthesize("south", 5_000, tmp_path / "base.duckdb", seed=3)
    other = synthesize(site, 5_000, tmp_path / "other.duckdb", seed=seed)
    base_t, other_t = _tables(base.path), _tables(other.path)
    assert base_t["patients"] != other_t["patients"]
    assert base_t["treatments"] != other_t["treatments"]


def test_summary_and_overwrite(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "nested" / "dir" / "site.duckdb"
    synthesize("east", 6_000, out)
    out.with_name(out.name + ".wal").write_bytes(b"")  # stale WAL must be removed
    summary = synthesize("east", 5_000, out)
    q = _query(out)
    assert summary.site == "east" and summary.patients == 5_000 and summary.path == out
    assert summary.seconds >= 0
    assert q("SELECT count(*) FROM patients") == [(5_000,)]
    assert q("SELECT count(*) FROM treatments") == [(summary.treatment_rows,)]
    assert sorted(r[0] for r in q("SHOW TABLES")) == ["patients", "treatments"]


@pytest.mark.parametrize(
    ("table", "schema"),
    [("patients", PATIENT_SCHEMA), ("treatments", TREATMENT_SCHEMA)],
)
def test_schema_exact(
    north: tuple[SynthSummary, Query], table: str, schema: list[tuple[str, str]]
) -> None:
    _, q = north
    rows = q(
        "SELECT column_name, data_type FROM information_schema.columns "
        f"WHERE table_name = '{table}' ORDER BY ordinal_position"
    )
    assert rows == schema


@pytest.mark.parametrize(("table", "column"), sorted(CATEGORIES))
def test_categorical_domains(
    north: tuple[SynthSummary, Query], table: str, column: str
) -> None:
    _, q = north
    values = {r[0] for r in q(f"SELECT DISTINCT {column} FROM {table}")}
    assert values == CATEGORIES[(table, column)]  # all present, nothing else (no NULLs)


@pytest.mark.parametrize(("table", "column"), sorted(RANGES))
def test_numeric_ranges(
    north: tuple[SynthSummary, Query], table: str, column: str
) -> None:
    _, q = north
    lo, hi = RANGES[(table, column)]
    [(mn, mx, nulls)] = q(
        f"SELECT min({column}), max({column}), count(*) - count({column}) FROM {table}"
    )
    assert lo <= mn <= mx <= hi
    assert nulls == 0


def test_rounding(north: tuple[SynthSummary, Query]) -> None:
    _, q = north
    assert q("SELECT count(*) FROM patients WHERE round(bmi, 1) <> bmi") == [(0,)]
    assert q(
        "SELECT count(*) FROM treatments WHERE round(cost_usd, 2) <> cost_usd"
    ) == [(0,)]


def test_keys_and_references(north: tuple[SynthSummary, Query]) -> None:
    summary, q = north
    assert q(
        "SELECT count(DISTINCT patient_id), min(patient_id), max(patient_id) FROM patients"
    ) == [(20_000, 1, 20_000)]
    assert q("SELECT count(DISTINCT treatment_id), count(*) FROM treatments") == [
        (summary.treatment_rows, summary.treatment_rows)
    ]
    orphans = q(
        "SELECT count(*) FROM treatments t ANTI JOIN patients p ON t.patient_id = p.patient_id"
    )
    assert orphans == [(0,)]
    untreated = q(
        "SELECT count(*) FROM patients p ANTI JOIN treatments t ON t.patient_id = p.patient_id"
    )
    assert untreated == [(0,)]


def test_clinical_plausibility(north: tuple[SynthSummary, Query]) -> None:
    _, q = north
    assert q(
        "SELECT count(*) FROM patients WHERE primary_site = 'prostate' AND sex = 'F'"
    ) == [(0,)]
    [(breast_f,)] = q(
        "SELECT avg((sex = 'F')::INT) FROM patients WHERE primary_site = 'breast'"
    )
    assert breast_f > 0.95
    assert q(
        "SELECT count(*) FROM treatments WHERE treatment_type = 'surgery' AND cycles <> 1"
    ) == [(0,)]
    age: dict[str, float] = dict(
        q("SELECT primary_site, avg(age_at_diagnosis) FROM patients GROUP BY ALL")
    )
    assert (
        age["prostate"] > age["melanoma"] + 5 and age["prostate"] > age["lymphoma"] + 5
    )
    iv: dict[str, float] = dict(
        q("SELECT primary_site, avg((stage = 'IV')::INT) FROM patients GROUP BY ALL")
    )
    assert iv["pancreas"] > iv["breast"] + 0.15 and iv["lung"] > iv["breast"] + 0.1
    surv: dict[str, float] = dict(
        q("SELECT stage, avg(survival_months) FROM patients GROUP BY ALL")
    )
    assert surv["I"] > surv["II"] > surv["III"] > surv["IV"]
    # Follow-up cannot run past the end of 2025.
    late = q("SELECT max(survival_months) FROM patients WHERE diagnosis_year = 2024")
    assert late[0][0] <= 24


def test_death_is_the_event_of_vital_status_with_a_realistic_censoring_pattern(
    north: tuple[SynthSummary, Query],
) -> None:
    _, q = north
    assert q("SELECT count(*) FROM patients WHERE death <> (vital_status = 'deceased')::INT") == [(0,)]
    [(died, late_censored, early_censored)] = q(
        "SELECT avg(death), avg((death = 0 AND diagnosis_year <= 2012)::INT), "
        "avg((death = 0 AND survival_months < 12)::INT) FROM patients"
    )
    assert 0.3 < died < 0.8  # both outcomes are common
    assert late_censored > 0 and early_censored > 0  # administrative censoring and loss to follow-up


def test_heavy_tail_of_treatment_rows(north: tuple[SynthSummary, Query]) -> None:
    _, q = north
    [(heavy, biggest, mean)] = q(
        "SELECT count(*) FILTER (WHERE n >= 20), max(n), avg(n) "
        "FROM (SELECT patient_id, count(*) AS n FROM treatments GROUP BY ALL)"
    )
    assert 100 <= heavy <= 320  # ~1% of 20k
    assert biggest <= 40
    assert 2.5 <= mean <= 4.5


def test_sites_differ_in_case_mix(tmp_path: pathlib.Path) -> None:
    def stage_iv_share(site: str) -> float:
        summary = synthesize(site, 20_000, tmp_path / f"{site}.duckdb")
        [(share,)] = _query(summary.path)(
            "SELECT avg((stage = 'IV')::INT) FROM patients"
        )
        return float(share)

    assert stage_iv_share("south") - stage_iv_share("north") > 0.1


def test_profiles_are_distinct() -> None:
    assert {"north", "south", "east", "west"} <= SITE_PROFILES.keys()
    profiles = list(SITE_PROFILES.values())
    assert len(set(profiles)) == len(profiles)
    assert all(isinstance(p, SiteProfile) for p in profiles)


def test_unknown_site_is_deterministic_and_distinct(tmp_path: pathlib.Path) -> None:
    a = synthesize("Hospital X", 5_000, tmp_path / "a.duckdb")
    b = synthesize("Hospital X", 5_000, tmp_path / "b.duckdb")
    c = synthesize("hospital-y", 5_000, tmp_path / "c.duckdb")
    a_tables = _tables(a.path)
    assert a_tables == _tables(b.path)
    assert a_tables["patients"] != _tables(c.path)["patients"]
    mix = "SELECT primary_site, count(*) FROM patients GROUP BY ALL ORDER BY 1"
    assert _query(a.path)(mix) != _query(c.path)(mix)


def test_invalid_arguments(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ValueError):
        synthesize("", 10, tmp_path / "x.duckdb")
    with pytest.raises(ValueError):
        synthesize("north", -1, tmp_path / "x.duckdb")
