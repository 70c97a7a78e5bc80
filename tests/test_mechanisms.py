"""Statistical checks of the noise (gateway._mechanisms): the released noise has the scale and
intervals the response reports, and the gateway's noise scale is never below what OpenDP's own
polars Context picks."""

from __future__ import annotations

import itertools
import math
import statistics
from pathlib import Path

import duckdb
import opendp.prelude as dp_
import polars as pl
import pytest

from gateway.client import Client
from tests.helpers.servers import ExactNoise

GROUPED = "SELECT diagnosis_year, stage, sex, count(*), sum(survival_months) FROM patients " \
          "WHERE age_at_diagnosis >= {a} GROUP BY diagnosis_year, stage, sex"


def test_noise_matches_reported_scale_and_interval(start_site, token):
    """~1200 residuals per aggregate: their spread must match std_error (a 2x error fails) and
    the reported 95% intervals must cover the exact value about 95% of the time."""
    noisy_site, exact_site = start_site(), start_site(noise=ExactNoise())
    ratios, coverage = {}, {}
    with Client(noisy_site.target, token=token(project="stats")) as noisy, \
            Client(exact_site.target, token=token(project="stats")) as truth:
        residuals: dict[str, list[float]] = {"count": [], "sum(survival_months)": []}
        covered: dict[str, list[bool]] = {"count": [], "sum(survival_months)": []}
        reported: dict[str, float] = {}
        for a in range(18, 28):
            sql = GROUPED.format(a=a)
            got, want = noisy.query(sql, epsilon=0.5).response, truth.query(sql, epsilon=0.5).response
            for g_row, w_row in zip(got.rows, want.rows, strict=True):
                for g, w in zip(g_row.estimates, w_row.estimates, strict=True):
                    if math.isnan(w.value) or w.suppressed or g.suppressed:
                        continue
                    residuals[g.aggregate].append(g.value - w.value)
                    covered[g.aggregate].append(g.ci_low <= w.value <= g.ci_high)
                    reported[g.aggregate] = g.std_error
    for name, values in residuals.items():
        assert len(values) > 500
        ratios[name] = statistics.pstdev(values) / reported[name]
        coverage[name] = sum(covered[name]) / len(covered[name])
        assert abs(statistics.fmean(values)) < 4 * reported[name] / math.sqrt(len(values)), name
    assert all(0.8 < r < 1.25 for r in ratios.values()), ratios
    assert all(0.925 < c < 0.985 for c in coverage.values()), coverage


def test_mean_interval_covers(start_site, token):
    noisy_site, exact_site = start_site(), start_site(noise=ExactNoise())
    hits, narrow_hits, total = 0, 0, 0
    with Client(noisy_site.target, token=token(project="stats")) as noisy, \
            Client(exact_site.target, token=token(project="stats")) as truth:
        for a, op in itertools.product(range(18, 58), (">=", "<")):
            sql = f"SELECT stage, mean(age_at_diagnosis) FROM patients WHERE age_at_diagnosis {op} {a} GROUP BY stage"
            got, want = noisy.query(sql, epsilon=0.2).response, truth.query(sql, epsilon=0.2).response
            for g, w in zip(got.rows, want.rows, strict=True):
                e, t = g.estimates[0], w.estimates[0]
                if not e.suppressed and not t.suppressed:
                    hits += e.ci_low <= t.value <= e.ci_high
                    # the same interval at half its width about the estimate: what a noise scale 2x too small gives
                    narrow_hits += abs(t.value - e.value) <= (e.ci_high - e.ci_low) / 4
                    total += 1
    assert total > 240
    # 95% nominal. The answers share their data (nested filters), so misses come in runs: measured, the
    # interval covers 0.94-0.96 and half of it 0.71-0.78; 0.87 between them leaves several deviations each way
    assert 0.87 < hits / total <= 1.0
    assert narrow_hits / total < 0.87


# --- cross-check against OpenDP's polars Context -------------------------------------------------

def _context_scale(frame: pl.DataFrame, k: int, build, margins) -> list[float]:
    dp_.enable_features("contrib")
    context = dp_.Context.compositor(data=frame.lazy(), privacy_unit=dp_.unit_of(contributions=k),
                                     privacy_loss=dp_.loss_of(epsilon=1.0), split_evenly_over=1, margins=margins)
    return [float(s) for s in build(context.query()).summarize()["scale"].to_list()]


@pytest.fixture(scope="module")
def small_frames(site_data: Path) -> dict[str, pl.DataFrame]:
    with duckdb.connect(str(site_data), read_only=True) as con:
        patients = con.sql("SELECT stage, CAST(age_at_diagnosis AS BIGINT) AS age, "
                               "CAST(bmi * 10 AS BIGINT) AS bmi10 FROM patients LIMIT 500").pl()
        treatments = con.sql("SELECT treatment_type, CAST(cycles AS BIGINT) AS cycles FROM treatments "
                                 "LIMIT 500").pl()
    return {"patients": patients, "treatments": treatments}


STAGE = pl.DataFrame({"stage": ["I", "II", "III", "IV"]})
TYPES = pl.DataFrame({"treatment_type": ["surgery", "chemotherapy", "radiotherapy", "immunotherapy", "hormone"]})


SHAPES = [
    # (dataset, k, gateway SQL, OpenDP query builder, margins, unit of the gateway's scale)
    ("patients", 1, "SELECT count(*) FROM patients", lambda q: q.select(dp_.len(signed=True)), [], 1),
    ("patients", 1, "SELECT stage, count(*) FROM patients GROUP BY stage",
     lambda q: q.group_by("stage").agg(dp_.len(signed=True)).with_keys(STAGE), [], 1),
    ("patients", 1, "SELECT sum(age_at_diagnosis) FROM patients",
     lambda q: q.select(pl.col("age").fill_null(0).dp.sum((18, 99))), [dp_.polars.Margin(by=[], max_length=10**6)], 1),
    ("patients", 1, "SELECT stage, sum(age_at_diagnosis) FROM patients GROUP BY stage",
     lambda q: q.group_by("stage").agg(pl.col("age").fill_null(0).dp.sum((18, 99))).with_keys(STAGE),
     [dp_.polars.Margin(by=["stage"], max_length=10**6)], 1),
    # bmi is summed at fixed point (precision 1): OpenDP sees the same integers, bounds 150..500
    ("patients", 1, "SELECT sum(bmi) FROM patients",
     lambda q: q.select(pl.col("bmi10").fill_null(0).dp.sum((150, 500))), [dp_.polars.Margin(by=[], max_length=10**6)],
     10),
    # a mean's sum is of distances from the bounds' midpoint 58.5, doubled to stay integer (so in half
    # units: bounds -81..81), at 3/5 of the epsilon: OpenDP's sum of the same integers, at scale/(2 x 3/5)
    ("patients", 1, "SELECT mean(age_at_diagnosis) FROM patients",
     lambda q: q.select((2 * pl.col("age") - 117).fill_null(0).dp.sum((-81, 81))),
     [dp_.polars.Margin(by=[], max_length=10**6)], 2 * 3 / 5),
    ("treatments", 5, "SELECT count(*) FROM treatments", lambda q: q.select(dp_.len(signed=True)), [], 1),
    ("treatments", 5, "SELECT treatment_type, count(*) FROM treatments GROUP BY treatment_type",
     lambda q: q.group_by("treatment_type").agg(dp_.len(signed=True)).with_keys(TYPES), [], 1),
    ("treatments", 5, "SELECT sum(cycles) FROM treatments",
     lambda q: q.select(pl.col("cycles").fill_null(0).dp.sum((1, 12))), [dp_.polars.Margin(by=[], max_length=10**6)],
     1),
]


@pytest.mark.parametrize(("dataset", "k", "sql", "build", "margins", "unit"), SHAPES,
                         ids=[s[2] for s in SHAPES])
def test_gateway_scale_never_below_opendp_context(start_site, token, small_frames, dataset, k, sql, build, margins,
                                                  unit):
    site = start_site()
    with Client(site.target, token=token()) as c:
        estimate = c.query(sql, epsilon=1.0, dry_run=True).response.rows[0].estimates[0]
    opendp_scales = _context_scale(small_frames[dataset], k, build, margins)
    # a mean is released as (sum, count); the gateway reports the sum's scale
    opendp_scale = opendp_scales[0] / unit
    assert estimate.noise_scale >= opendp_scale * (1 - 1e-9), (estimate.noise_scale, opendp_scales)
    assert estimate.noise_scale <= opendp_scale * 1.01  # and not needlessly larger
