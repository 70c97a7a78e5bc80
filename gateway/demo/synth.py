"""Deterministic synthetic cancer-registry data for one federated site.

Contract
--------
``synthesize(site, patients, out, seed)`` writes a fresh DuckDB file at ``out``
(any existing file and its ``.wal`` are removed first; parent directories are
created) containing exactly two tables:

``patients`` (one row per patient)
    ``patient_id BIGINT`` unique, 1..N;
    ``sex VARCHAR`` in {'F','M'};
    ``age_at_diagnosis INTEGER`` in 18..99;
    ``primary_site VARCHAR`` in {'breast','lung','colorectal','prostate',
    'melanoma','lymphoma','pancreas','other'} (prostate only M, breast mostly F);
    ``stage VARCHAR`` in {'I','II','III','IV'};
    ``diagnosis_year INTEGER`` in 2010..2024;
    ``vital_status VARCHAR`` in {'alive','deceased'};
    ``survival_months INTEGER`` in 0..180 (months to death or last follow-up;
    follow-up never extends past the end of 2025);
    ``bmi DOUBLE`` in 15..50, rounded to 1 decimal;
    ``death INTEGER`` 1 when the patient died at ``survival_months`` (``vital_status``
    'deceased'), 0 when censored there (alive at last follow-up): the event indicator of
    a survival analysis. Censoring is loss to follow-up or the end of 2025.

``treatments`` (several rows per patient, heavy tail: ~1% have 20..40 rows)
    ``treatment_id BIGINT`` unique, 1..T;
    ``patient_id BIGINT`` referencing ``patients``;
    ``treatment_type VARCHAR`` in {'surgery','chemotherapy','radiotherapy',
    'immunotherapy','hormone'};
    ``days_from_diagnosis INTEGER`` in 0..1800;
    ``cost_usd DOUBLE`` in 100..250000, rounded to cents;
    ``cycles INTEGER`` in 1..12 (always 1 for surgery).

Output is a pure function of ``(site, patients, seed)``: the random generator
is seeded through SHA-256 (never Python's randomised ``hash()``), so identical
inputs give identical table contents on every run and machine, while different
sites or seeds give different data. Known sites (``SITE_PROFILES``) have
hand-written, clearly different case mixes; any other site name gets a
profile derived deterministically from the name.
"""

from __future__ import annotations

import pathlib
import time
from dataclasses import dataclass

import duckdb
import numpy as np
import polars as pl

from .profiles import (
    _AGE_HAZARD_PER_YEAR,
    _AGE_OFFSET,
    _AGE_SD,
    _BMI_OFFSET,
    _BREAST,
    _COST_CYCLE_EXPONENT,
    _COST_MEDIAN,
    _COST_SIGMA,
    _CYCLE_P,
    _DAYS_PER_LINE,
    _LOSS_TO_FOLLOW_UP_MEAN_MONTHS,
    _PROSTATE,
    _SITE_HAZARD,
    _STAGE_HAZARD,
    _STAGE_MULT,
    _STAGE_TREATMENT_MULT,
    _SURGERY,
    _TYPE_DAY_MEAN,
    _TYPE_WEIGHTS,
    FOLLOW_UP_END_YEAR,
    HEAVY_TAIL_MAX_ROWS,
    HEAVY_TAIL_MIN_ROWS,
    MAX_AGE,
    MAX_BMI,
    MAX_COST,
    MAX_SURVIVAL_MONTHS,
    MAX_TREATMENT_DAY,
    MIN_AGE,
    MIN_BMI,
    MIN_COST,
    PRIMARY_SITES,
    SEXES,
    SITE_PROFILES,
    STAGES,
    TREATMENT_TYPES,
    VITAL_STATUSES,
    BoolArray,
    FloatArray,
    IntArray,
    SiteProfile,
    _digest_int,
    _profile,
)

__all__ = ["SITE_PROFILES", "SiteProfile", "SynthSummary", "synthesize"]


@dataclass(frozen=True)
class SynthSummary:
    """What ``synthesize`` wrote: row counts, file path and wall-clock seconds."""

    site: str
    patients: int
    treatment_rows: int
    path: pathlib.Path
    seconds: float


def _sample_rows(
    rng: np.random.Generator, weights: FloatArray, rows: IntArray
) -> IntArray:
    """Draw one category per element, using row ``rows[i]`` of a weight matrix."""
    cum = np.cumsum(weights / weights.sum(axis=1, keepdims=True), axis=1)
    u = rng.random(len(rows))
    # Count thresholds below u; clamp guards the float round-off at cum[-1].
    codes: IntArray = (u[:, None] >= cum[rows]).sum(axis=1, dtype=np.int64)
    last = int(cum.shape[1]) - 1
    codes[codes > last] = last
    return codes


def _labels(name: str, values: tuple[str, ...], codes: IntArray) -> pl.Series:
    """String column from integer codes (a gather, so no Python-level loop)."""
    return pl.Series(name, values, dtype=pl.String).gather(codes)


@dataclass(frozen=True)
class _Cohort:
    """Patient-level arrays; the treatment generator needs some of them."""

    sex: IntArray
    age: IntArray
    primary: IntArray
    stage: IntArray
    year: IntArray
    deceased: BoolArray
    survival: IntArray
    bmi: FloatArray


def _sample_cohort(rng: np.random.Generator, p: SiteProfile, n: int) -> _Cohort:
    """Draw all patient attributes, vectorised."""
    site_w = np.asarray(p.primary_site_weights, dtype=np.float64)
    primary = rng.choice(len(PRIMARY_SITES), size=n, p=site_w / site_w.sum()).astype(
        np.int64
    )
    stage_w = _STAGE_MULT * np.asarray(p.stage_weights, dtype=np.float64)
    stage = _sample_rows(rng, stage_w, primary)
    sex = _sample_sex(rng, p, primary)
    age_raw = rng.normal(p.age_mean + _AGE_OFFSET[primary], _AGE_SD[primary])
    age = np.clip(np.rint(age_raw), MIN_AGE, MAX_AGE).astype(np.int64)
    year = rng.integers(p.year_min, p.year_max + 1, size=n, dtype=np.int64)
    deceased, survival = _sample_survival(rng, primary, stage, age, year)
    bmi_raw = rng.normal(p.bmi_mean + _BMI_OFFSET[primary], 5.0)
    bmi = np.round(np.clip(bmi_raw, MIN_BMI, MAX_BMI), 1).astype(np.float64)
    return _Cohort(sex, age, primary, stage, year, deceased, survival, bmi)


def _sample_sex(
    rng: np.random.Generator, p: SiteProfile, primary: IntArray
) -> IntArray:
    """0 = F, 1 = M; prostate is always M, breast ~1% M as in real registries."""
    p_male = np.full(len(primary), 1.0 - p.female_share)
    p_male[primary == _BREAST] = 0.01
    p_male[primary == _PROSTATE] = 1.0
    return (rng.random(len(primary)) < p_male).astype(np.int64)


def _sample_survival(
    rng: np.random.Generator,
    primary: IntArray,
    stage: IntArray,
    age: IntArray,
    year: IntArray,
) -> tuple[BoolArray, IntArray]:
    """Exponential death time vs. censoring at loss to follow-up or end of 2025."""
    n = len(primary)
    hazard = (
        _STAGE_HAZARD[stage]
        * _SITE_HAZARD[primary]
        * np.exp(_AGE_HAZARD_PER_YEAR * (age - 65))
    )
    death = rng.exponential(1.0 / hazard)
    # Diagnosis month is only needed to bound follow-up, so it is not stored.
    month = rng.integers(0, 12, size=n)
    admin_cap = (FOLLOW_UP_END_YEAR - year) * 12 + (12 - month)
    lost = rng.exponential(_LOSS_TO_FOLLOW_UP_MEAN_MONTHS, size=n)
    censor = np.minimum(np.minimum(admin_cap, lost), MAX_SURVIVAL_MONTHS)
    deceased = death <= censor
    months = np.floor(np.where(deceased, death, censor))
    return deceased, np.clip(months, 0, MAX_SURVIVAL_MONTHS).astype(np.int64)


def _treatment_counts(
    rng: np.random.Generator, p: SiteProfile, stage: IntArray
) -> IntArray:
    """Rows per patient: 1 + Poisson around the site mean, plus a 20..40 heavy tail."""
    n = len(stage)
    counts = 1 + rng.poisson((p.treatments_mean - 1.0) * _STAGE_TREATMENT_MULT[stage])
    heavy = rng.random(n) < p.heavy_tail_share
    counts[heavy] = rng.integers(
        HEAVY_TAIL_MIN_ROWS, HEAVY_TAIL_MAX_ROWS + 1, size=int(heavy.sum())
    )
    return counts.astype(np.int64)


def _treatments_frame(
    rng: np.random.Generator, p: SiteProfile, c: _Cohort
) -> pl.DataFrame:
    """Treatment rows in patient order; attributes depend on type, site and stage."""
    counts = _treatment_counts(rng, p, c.stage)
    owner = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    total = len(owner)
    kind = _sample_rows(rng, _TYPE_WEIGHTS, _type_row(c, owner))
    days = _treatment_days(rng, c, owner, kind, counts)
    cycles = np.where(kind == _SURGERY, 1, 1 + rng.binomial(11, _CYCLE_P[kind])).astype(
        np.int64
    )
    noise = rng.lognormal(0.0, _COST_SIGMA[kind])
    cost_raw = _COST_MEDIAN[kind] * cycles**_COST_CYCLE_EXPONENT * noise
    cost = np.round(np.clip(cost_raw, MIN_COST, MAX_COST), 2)
    return pl.DataFrame(
        [
            pl.Series("treatment_id", np.arange(1, total + 1, dtype=np.int64)),
            pl.Series("patient_id", owner + 1),
            _labels("treatment_type", TREATMENT_TYPES, kind),
            pl.Series("days_from_diagnosis", days.astype(np.int32)),
            pl.Series("cost_usd", cost),
            pl.Series("cycles", cycles.astype(np.int32)),
        ]
    )


def _type_row(c: _Cohort, owner: IntArray) -> IntArray:
    """Row index into the flattened (primary site x stage) type-weight matrix."""
    return c.primary[owner] * len(STAGES) + c.stage[owner]


def _treatment_days(
    rng: np.random.Generator,
    c: _Cohort,
    owner: IntArray,
    kind: IntArray,
    counts: IntArray,
) -> IntArray:
    """Days after diagnosis: later lines later, never past death/last follow-up."""
    starts = np.cumsum(counts) - counts
    line = np.arange(len(owner), dtype=np.int64) - starts[owner]
    days = line * _DAYS_PER_LINE + rng.exponential(_TYPE_DAY_MEAN[kind])
    # Treatment cannot follow death or last contact; redraw uniformly inside
    # the observed window instead of clipping, which would pile rows at the edge.
    limit = np.minimum(c.survival[owner] * 30 + 29, MAX_TREATMENT_DAY)
    inside = rng.random(len(owner)) * (limit + 1)
    days = np.where(days > limit, np.floor(inside), np.floor(days))
    return np.clip(days, 0, limit).astype(np.int64)


def _patients_frame(c: _Cohort) -> pl.DataFrame:
    """Patient table in contract column order and dtypes (Int64->BIGINT, Int32->INTEGER)."""
    n = len(c.primary)
    return pl.DataFrame(
        [
            pl.Series("patient_id", np.arange(1, n + 1, dtype=np.int64)),
            _labels("sex", SEXES, c.sex),
            pl.Series("age_at_diagnosis", c.age.astype(np.int32)),
            _labels("primary_site", PRIMARY_SITES, c.primary),
            _labels("stage", STAGES, c.stage),
            pl.Series("diagnosis_year", c.year.astype(np.int32)),
            _labels("vital_status", VITAL_STATUSES, c.deceased.astype(np.int64)),
            pl.Series("survival_months", c.survival.astype(np.int32)),
            pl.Series("bmi", c.bmi.astype(np.float64)),
            pl.Series("death", c.deceased.astype(np.int32)),
        ]
    )


class _ArrowStream:
    """A polars frame offered to DuckDB through the Arrow C stream interface only.

    Registered as is, a polars frame makes DuckDB convert it with pyarrow; through this interface
    DuckDB reads the frame's Arrow data directly, and pyarrow need not be installed.
    """

    def __init__(self, frame: pl.DataFrame) -> None:
        self._frame = frame

    def __arrow_c_stream__(self, requested_schema: object | None = None) -> object:
        return self._frame.__arrow_c_stream__(requested_schema)


def _write_duckdb(out: pathlib.Path, tables: dict[str, pl.DataFrame]) -> None:
    """Replace ``out`` with a DuckDB file holding one table per frame (bulk load)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.unlink(missing_ok=True)
    # A stale WAL next to a fresh file would be replayed into it by DuckDB.
    out.with_name(out.name + ".wal").unlink(missing_ok=True)
    con = duckdb.connect(str(out))
    try:
        for name, frame in tables.items():
            con.register("_synth_frame", _ArrowStream(frame))
            con.execute(f'CREATE TABLE "{name}" AS SELECT * FROM _synth_frame')
            con.unregister("_synth_frame")
    finally:
        con.close()


def synthesize(
    site: str, patients: int, out: pathlib.Path, seed: int = 0
) -> SynthSummary:
    """Write deterministic synthetic ``patients``/``treatments`` tables for ``site``.

    Same ``(site, patients, seed)`` -> identical table contents. ``site`` picks a
    profile from ``SITE_PROFILES`` or derives one from the name. ``out`` is
    overwritten (with any ``out.wal``) and its parent directories are created.
    Raises ``ValueError`` for an empty site name or a negative patient count.
    """
    if not site:
        raise ValueError("site name must be non-empty")
    if patients < 0:
        raise ValueError("patients must be >= 0")
    started = time.perf_counter()
    out = pathlib.Path(out)
    profile = _profile(site)
    rng = np.random.default_rng(_digest_int("gateway.synth.data", seed, site))
    cohort = _sample_cohort(rng, profile, patients)
    treatments = _treatments_frame(rng, profile, cohort)
    _write_duckdb(out, {"patients": _patients_frame(cohort), "treatments": treatments})
    return SynthSummary(
        site=site,
        patients=patients,
        treatment_rows=treatments.height,
        path=out,
        seconds=time.perf_counter() - started,
    )
