"""Small-cell suppression across sites: each site's cell by its own rule, the pooled cell by the
pooled noisy count against the sites' thresholds. Suppression is policy intent (post-processing
of noisy values), not a privacy guarantee: a site still sends a suppressed cell's noisy parts so
that a broker can pool them, and the broker never shows them."""

from __future__ import annotations

import math
from pathlib import Path

import duckdb

from gateway.client import Client
from tests.helpers.servers import ExactNoise

SQL = ("SELECT diagnosis_year, primary_site, count(*), mean(age_at_diagnosis) FROM patients "
       "WHERE age_at_diagnosis >= 85 GROUP BY diagnosis_year, primary_site")


def _exact_counts(site_data: Path) -> dict[tuple[int, str], int]:
    with duckdb.connect(str(site_data), read_only=True) as con:
        rows = con.execute("SELECT diagnosis_year, primary_site, count(*) FROM patients WHERE age_at_diagnosis >= 85"
                           " GROUP BY ALL").fetchall()
    return {(y, s): n for y, s, n in rows}


def _cells(response) -> dict[tuple[int, str], object]:
    return {(r.keys[0].value.int_value, r.keys[1].value.string_value): r.estimates for r in response.rows}


def test_the_pooled_cell_is_judged_by_the_pooled_count(start_site, start_broker, token, site_data) -> None:
    counts = _exact_counts(site_data)
    small = next(k for k, n in counts.items() if 2 <= n <= 4)  # under 5 at each site, 6-12 pooled over 3
    tiny = next(k for k, n in counts.items() if n == 1)  # 3 pooled: still under 5
    broker = start_broker({f"s{i}": start_site(noise=ExactNoise(), name=f"s{i}") for i in range(3)})
    with Client(broker.target, token=token()) as c:
        response = c.query(SQL, epsilon=0.9).response
    assert response.suppression_min_count == 5
    pooled = _cells(response)
    count, mean = pooled[small]
    assert not count.suppressed and count.value == 3 * counts[small]
    assert not mean.suppressed and math.isfinite(mean.value)
    assert all(e.suppressed and math.isnan(e.value) and not e.components for e in pooled[tiny])
    for answer in response.site_answers:  # each site's own cell: by its own rule, and no parts shown
        shown = _cells(answer)
        assert all(e.suppressed and math.isnan(e.value) and not e.components for e in shown[small])
        assert all(e.suppressed and not e.components for e in shown[tiny])


def test_a_site_alone_suppresses_its_small_cells(start_site, token, site_data) -> None:
    counts = _exact_counts(site_data)
    small = next(k for k, n in counts.items() if 2 <= n <= 4)
    site = start_site(noise=ExactNoise())
    with Client(site.target, token=token()) as c:
        result = c.query(SQL, epsilon=0.9)
    count, _mean = _cells(result.response)[small]
    assert count.suppressed and math.isnan(count.value)
    assert [p.name for p in count.components] == ["count"]  # the noisy parts travel, for a broker to pool
    frame = result.to_polars()
    row = frame.filter((frame["diagnosis_year"] == small[0]) & (frame["primary_site"] == small[1]))
    assert row["count"][0] is None


def test_a_row_without_a_count_is_not_suppressed(start_site, token, site_data) -> None:
    counts = _exact_counts(site_data)
    small = next(k for k, n in counts.items() if 2 <= n <= 4)
    site = start_site(noise=ExactNoise())
    with Client(site.target, token=token()) as c:
        response = c.query(SQL.replace("count(*), mean(age_at_diagnosis)", "sum(survival_months)"),
                           epsilon=0.9).response
    (total,) = _cells(response)[small]
    assert not total.suppressed and math.isfinite(total.value)
