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
    ``bmi DOUBLE`` in 15..50, rounded to 1 decimal.

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

import hashlib
import pathlib
import time
from dataclasses import dataclass

import duckdb
import numpy as np
import numpy.typing as npt
import polars as pl

__all__ = ["SITE_PROFILES", "SiteProfile", "SynthSummary", "synthesize"]

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

SEXES: tuple[str, ...] = ("F", "M")
PRIMARY_SITES: tuple[str, ...] = (
    "breast",
    "lung",
    "colorectal",
    "prostate",
    "melanoma",
    "lymphoma",
    "pancreas",
    "other",
)
STAGES: tuple[str, ...] = ("I", "II", "III", "IV")
VITAL_STATUSES: tuple[str, ...] = ("alive", "deceased")
TREATMENT_TYPES: tuple[str, ...] = (
    "surgery",
    "chemotherapy",
    "radiotherapy",
    "immunotherapy",
    "hormone",
)

MIN_YEAR = 2010
MAX_YEAR = 2024
FOLLOW_UP_END_YEAR = 2025  # follow-up runs to the end of this year
MAX_SURVIVAL_MONTHS = 180
MAX_TREATMENT_DAY = 1800
MIN_AGE, MAX_AGE = 18, 99
MIN_BMI, MAX_BMI = 15.0, 50.0
MIN_COST, MAX_COST = 100.0, 250_000.0
HEAVY_TAIL_MIN_ROWS, HEAVY_TAIL_MAX_ROWS = 20, 40

_BREAST, _PROSTATE = PRIMARY_SITES.index("breast"), PRIMARY_SITES.index("prostate")
_SURGERY = TREATMENT_TYPES.index("surgery")

# Per-primary-site clinical shape, shared by all sites (rows follow PRIMARY_SITES).
# Age offsets relative to the site mean: prostate/pancreas older, lymphoma and
# melanoma younger, so age is plausible per cancer type.
_AGE_OFFSET = np.array([-4.0, 4.0, 3.0, 7.0, -8.0, -12.0, 5.0, 0.0])
_AGE_SD = np.array([11.0, 9.0, 10.0, 7.0, 14.0, 16.0, 9.0, 13.0])
# Weight loss is typical at diagnosis for lung/pancreas; obesity is a risk
# factor for breast/colorectal.
_BMI_OFFSET = np.array([1.0, -1.5, 1.0, 0.5, 0.0, -0.5, -2.0, 0.0])
# Multipliers on the site's stage weights: pancreas and lung present late,
# screened cancers (breast, prostate) and visible ones (melanoma) early.
_STAGE_MULT = np.array(
    [
        [1.6, 1.3, 0.8, 0.45],  # breast
        [0.6, 0.6, 1.1, 2.0],  # lung
        [0.9, 1.1, 1.2, 0.9],  # colorectal
        [1.3, 1.4, 0.7, 0.6],  # prostate
        [1.8, 1.1, 0.7, 0.5],  # melanoma
        [0.8, 1.0, 1.1, 1.2],  # lymphoma
        [0.3, 0.5, 1.2, 2.6],  # pancreas
        [1.0, 1.0, 1.0, 1.0],  # other
    ]
)
# Monthly death hazard by stage, scaled per primary site (pancreas worst).
_STAGE_HAZARD = np.array([0.002, 0.005, 0.015, 0.045])
_SITE_HAZARD = np.array([0.7, 1.6, 1.0, 0.5, 0.8, 0.9, 3.0, 1.1])
_AGE_HAZARD_PER_YEAR = 0.035  # log-hazard slope per year of age around 65
_LOSS_TO_FOLLOW_UP_MEAN_MONTHS = 240.0
# More advanced disease means more lines of therapy.
_STAGE_TREATMENT_MULT = np.array([0.8, 1.0, 1.1, 1.25])
# Treatment-type mix per primary site (columns follow TREATMENT_TYPES).
_TYPE_BY_SITE = np.array(
    [
        [0.30, 0.25, 0.20, 0.05, 0.20],  # breast
        [0.20, 0.35, 0.25, 0.18, 0.02],  # lung
        [0.35, 0.40, 0.15, 0.08, 0.02],  # colorectal
        [0.25, 0.08, 0.30, 0.02, 0.35],  # prostate
        [0.40, 0.05, 0.10, 0.43, 0.02],  # melanoma
        [0.03, 0.60, 0.17, 0.18, 0.02],  # lymphoma
        [0.20, 0.55, 0.15, 0.08, 0.02],  # pancreas
        [0.30, 0.35, 0.20, 0.10, 0.05],  # other
    ]
)
# Stage reshapes the mix: surgery for early disease, systemic therapy for late.
_TYPE_BY_STAGE = np.array(
    [
        [1.6, 0.6, 0.9, 0.4, 1.0],
        [1.2, 1.0, 1.1, 0.7, 1.0],
        [0.8, 1.3, 1.2, 1.1, 1.0],
        [0.3, 1.4, 0.9, 1.6, 1.0],
    ]
)
# Flattened (primary site x stage) -> treatment-type weights, row = site * 4 + stage.
_TYPE_WEIGHTS = (_TYPE_BY_SITE[:, None, :] * _TYPE_BY_STAGE[None, :, :]).reshape(-1, 5)
_TYPE_DAY_MEAN = np.array([25.0, 90.0, 120.0, 200.0, 150.0])  # days after previous line
_DAYS_PER_LINE = 45.0  # later rows of a patient happen later on average
_CYCLE_P = np.array([0.0, 0.4, 0.3, 0.45, 0.6])  # cycles = 1 + Binomial(11, p)
_COST_MEDIAN = np.array([22_000.0, 4_000.0, 5_000.0, 15_000.0, 600.0])
_COST_SIGMA = np.array([0.6, 0.6, 0.5, 0.6, 0.8])
_COST_CYCLE_EXPONENT = 0.7  # per-cycle cost with some economies of scale


@dataclass(frozen=True)
class SiteProfile:
    """Case mix of one site; weights are relative and normalised on use.

    ``stage_weights`` follow ``STAGES``; ``primary_site_weights`` follow
    ``PRIMARY_SITES``. ``treatments_mean`` is the mean number of treatment rows
    per (non heavy-tail) patient; ``heavy_tail_share`` patients get 20..40 rows.
    """

    stage_weights: tuple[float, float, float, float]
    primary_site_weights: tuple[float, float, float, float, float, float, float, float]
    age_mean: float
    female_share: float
    treatments_mean: float
    year_min: int = MIN_YEAR
    year_max: int = MAX_YEAR
    bmi_mean: float = 27.5
    heavy_tail_share: float = 0.01

    def __post_init__(self) -> None:
        """Reject profiles that would break the table contracts."""
        if len(self.stage_weights) != len(STAGES) or min(self.stage_weights) < 0:
            raise ValueError("stage_weights: need 4 non-negative weights")
        if (
            len(self.primary_site_weights) != len(PRIMARY_SITES)
            or min(self.primary_site_weights) < 0
        ):
            raise ValueError("primary_site_weights: need 8 non-negative weights")
        if sum(self.stage_weights) <= 0 or sum(self.primary_site_weights) <= 0:
            raise ValueError("weights must not all be zero")
        if not MIN_YEAR <= self.year_min <= self.year_max <= MAX_YEAR:
            raise ValueError(f"year range must lie within {MIN_YEAR}..{MAX_YEAR}")
        if (
            not 0.0 <= self.female_share <= 1.0
            or not 0.0 <= self.heavy_tail_share <= 1.0
        ):
            raise ValueError("shares must lie in [0, 1]")
        if self.treatments_mean < 1.0:
            raise ValueError("treatments_mean must be >= 1 (every patient has a row)")


@dataclass(frozen=True)
class SynthSummary:
    """What ``synthesize`` wrote: row counts, file path and wall-clock seconds."""

    site: str
    patients: int
    treatment_rows: int
    path: pathlib.Path
    seconds: float


SITE_PROFILES: dict[str, SiteProfile] = {
    # Screening-heavy, older population: early stages, breast/prostate.
    "north": SiteProfile(
        stage_weights=(0.40, 0.30, 0.19, 0.11),
        primary_site_weights=(0.26, 0.12, 0.14, 0.18, 0.10, 0.05, 0.03, 0.12),
        age_mean=66.0,
        female_share=0.50,
        treatments_mean=3.2,
    ),
    # Late presentation, fewer resources: advanced stages, lung/pancreas.
    "south": SiteProfile(
        stage_weights=(0.16, 0.22, 0.28, 0.34),
        primary_site_weights=(0.18, 0.20, 0.14, 0.10, 0.04, 0.06, 0.08, 0.20),
        age_mean=63.0,
        female_share=0.47,
        treatments_mean=2.6,
        year_min=2014,
        bmi_mean=26.0,
    ),
    # Young tertiary referral centre: melanoma/lymphoma, many treatment lines.
    "east": SiteProfile(
        stage_weights=(0.28, 0.30, 0.25, 0.17),
        primary_site_weights=(0.20, 0.10, 0.10, 0.08, 0.18, 0.16, 0.04, 0.14),
        age_mean=58.0,
        female_share=0.55,
        treatments_mean=3.8,
        year_min=2012,
        bmi_mean=26.5,
    ),
    # Older, smoking-heavy region with a shorter registry history.
    "west": SiteProfile(
        stage_weights=(0.25, 0.27, 0.26, 0.22),
        primary_site_weights=(0.15, 0.24, 0.18, 0.14, 0.05, 0.05, 0.07, 0.12),
        age_mean=68.0,
        female_share=0.45,
        treatments_mean=3.0,
        year_max=2022,
        bmi_mean=28.5,
    ),
}


def _digest_int(*parts: object) -> int:
    """Stable 128-bit integer from the parts (process-independent, unlike hash())."""
    text = "\x1f".join(str(p) for p in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:16], "big")


def _derived_profile(site: str) -> SiteProfile:
    """Plausible profile for an unknown site, a pure function of its name."""
    rng = np.random.default_rng(_digest_int("gateway.synth.profile", site))
    # Dirichlet around a typical mix keeps every category present but varied.
    stage = rng.dirichlet(np.array([0.28, 0.27, 0.24, 0.21]) * 20.0)
    primary = rng.dirichlet(
        np.array([0.20, 0.15, 0.14, 0.12, 0.08, 0.07, 0.05, 0.19]) * 30.0
    )
    year_min = int(rng.integers(MIN_YEAR, MIN_YEAR + 5))
    return SiteProfile(
        stage_weights=_rounded4(stage),
        primary_site_weights=_rounded8(primary),
        age_mean=round(float(rng.uniform(58.0, 69.0)), 1),
        female_share=round(float(rng.uniform(0.42, 0.58)), 3),
        treatments_mean=round(float(rng.uniform(2.5, 3.8)), 2),
        year_min=year_min,
        year_max=int(rng.integers(max(year_min, MAX_YEAR - 4), MAX_YEAR + 1)),
        bmi_mean=round(float(rng.uniform(25.5, 29.0)), 1),
    )


def _rounded4(w: FloatArray) -> tuple[float, float, float, float]:
    """Four weights rounded for a readable, stable profile repr."""
    a, b, c, d = (round(float(x), 4) for x in w)
    return (a, b, c, d)


def _rounded8(
    w: FloatArray,
) -> tuple[float, float, float, float, float, float, float, float]:
    """Eight weights rounded for a readable, stable profile repr."""
    a, b, c, d, e, f, g, h = (round(float(x), 4) for x in w)
    return (a, b, c, d, e, f, g, h)


def _profile(site: str) -> SiteProfile:
    """Known profile by exact name, otherwise one derived from the name."""
    return SITE_PROFILES.get(site) or _derived_profile(site)


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
