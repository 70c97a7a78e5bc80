"""Histograms, medians and quantiles over the bins a policy declares (:mod:`gateway.quantiles`).

Against exact, non-private references on synthetic data: with exact (test-only) noise a site's
histogram is the documented binning of the rows in plain Python, and through a real broker over
four sites the binning of their union. With OpenDP's noise: exact sample quantiles fall inside the
reported intervals, and by simulation the intervals cover the true quantile about 95% of the time
(an interval half as wide fails). Refusals are clear, carry the right status and cost nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from gateway._binned import HistogramResult
from tests.helpers.data import exact
from tests.helpers.servers import ExactNoise, client

AGE_EDGES = tuple(float(a) for a in range(18, 101))  # the example policies' age bins: one per year
STAGES = ("I", "II", "III", "IV")


def binned(values: Sequence[float | None], edges: Sequence[float]) -> list[int]:
    """Rows per bin [t_i, t_(i+1)) as the policy documents it: clamped into the first/last bin, missing left out."""
    counts = [0] * (len(edges) - 1)
    for value in values:
        if value is None or math.isnan(value):
            continue
        i = sum(value >= edge for edge in edges[1:-1])
        counts[i] += 1
    return counts


def sample_quantile(values: Sequence[float], q: float) -> float:
    """The smallest value with at least a fraction q of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def test_a_site_gives_the_exact_histogram_per_group(start_site, token, site_data: Path) -> None:
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        result = c.histogram("patients", "age_at_diagnosis", by="stage", epsilon=1)
    assert isinstance(result, HistogramResult)
    frame = result.frame
    assert frame.columns == ["stage", "bin_low", "bin_high", "count", "ci_low", "ci_high"]
    for stage in STAGES:
        rows = [a for (a,) in exact(site_data, f"SELECT age_at_diagnosis FROM patients WHERE stage = '{stage}'")]
        got = frame.filter(frame["stage"] == stage)
        assert got["bin_low"].to_list() == list(AGE_EDGES[:-1])
        assert got["count"].to_list() == binned(rows, AGE_EDGES)
