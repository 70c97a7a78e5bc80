"""The table of aggregate kinds, and variance/stddev added through it: exact through a site and a
broker, and honest intervals with real noise."""

from __future__ import annotations

import math
import statistics
from fractions import Fraction

import pytest

from gateway._sqlfront import parse_sql
from gateway.aggregates import KINDS, Declared, kind_of
from gateway.answers import Part
from gateway.client import Client
from gateway.errors import InvalidQuery, PermissionDenied
from tests.helpers.data import exact
from tests.helpers.policies import example_policy, with_dataset, write_policy
from tests.helpers.servers import ExactNoise, client

AGE = "least(greatest(age_at_diagnosis, 18), 99)"
BMI = "least(greatest(round(bmi * 10), 150), 500) / 10"


# --- the table ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS.values(), ids=list(KINDS))
def test_every_kind_spends_exactly_its_share_of_epsilon(kind) -> None:
    assert sum((spec.share for spec in kind.components), Fraction(0)) == 1
    assert all(spec.share > 0 for spec in kind.components)
    assert len({spec.name for spec in kind.components}) == len(kind.components)


@pytest.mark.parametrize("kind", KINDS.values(), ids=list(KINDS))
def test_every_sql_spelling_parses_to_its_kind(kind) -> None:
    for sql_name in kind.sql_names:
        arg = "*" if kind.columns == 0 else ", ".join(["bmi"] * kind.columns + ["0.5"] * len(kind.parameters))
        query = parse_sql(f"SELECT {sql_name}({arg}) FROM patients")
        assert query.aggregates[0].function == kind.name


def test_unknown_kind_names_what_is_supported() -> None:
    with pytest.raises(InvalidQuery, match=r"unknown aggregate 'mode'; supported: count, sum\(column\), "
                                           r"mean\(column\), variance\(column\), stddev\(column\), "
                                           r"survival\(time, event\), histogram\(column\), "
                                           r"quantile\(column, 0.9\), median\(column\) or regression\(y, x1, x2\)"):
        kind_of("mode")


def _parts(**values: tuple[float, float]) -> dict[str, Part]:
    return {name: Part(name, v, se, 1.96 * se, math.nan) for name, (v, se) in values.items()}


def test_variance_post_processing_is_the_sample_variance_of_the_parts() -> None:
    data = [3.0, 5.0, 8.0, 13.0]
    parts = _parts(sum=(sum(data), 0.0), sum_squares=(sum(x * x for x in data), 0.0), count=(4.0, 0.0))
    value = KINDS["variance"].estimate(parts, Declared((0.0, 20.0)), clamp=True)
    assert value.value == pytest.approx(statistics.variance(data))
    assert value.std_error == 0.0
    sd = KINDS["stddev"].estimate(parts, Declared((0.0, 20.0)), clamp=True)
    assert sd.value == pytest.approx(statistics.stdev(data))


def test_variance_is_kept_within_what_the_bounds_allow() -> None:
    # noise can make the raw estimate negative or larger than ((U - L) / 2)^2: both are clamped and flagged
    negative = KINDS["variance"].estimate(_parts(sum=(100.0, 5.0), sum_squares=(400.0, 50.0), count=(20.0, 1.0)),
                                          Declared((0.0, 10.0)), clamp=True)
    assert negative.value == 0.0 and negative.clamped and negative.ci_low == 0.0
    huge = KINDS["variance"].estimate(_parts(sum=(0.0, 5.0), sum_squares=(1e6, 50.0), count=(20.0, 1.0)),
                                      Declared((0.0, 10.0)), clamp=True)
    assert huge.value == 25.0 and huge.clamped and huge.ci_high == 25.0
    nothing = KINDS["stddev"].estimate(_parts(sum=(0.0, 5.0), sum_squares=(0.0, 50.0), count=(0.4, 1.0)),
                                       Declared((0.0, 10.0)), clamp=True)
    assert nothing.clamped and 0.0 <= nothing.ci_low <= nothing.value <= nothing.ci_high <= 5.0


def test_pooling_adds_parts_and_their_noise_variances() -> None:
    a = _parts(sum=(10.0, 3.0), count=(2.0, 4.0))
    b = _parts(sum=(20.0, 4.0), count=(3.0, 3.0))
    pooled = KINDS["mean"].pool([a, b])
    assert (pooled["sum"].value, pooled["sum"].std_error) == (30.0, 5.0)
    assert (pooled["count"].value, pooled["count"].std_error) == (5.0, 5.0)
    # a mean's sum is of distances from the bounds' midpoint, 50
    assert KINDS["mean"].estimate(pooled, Declared((0.0, 100.0)), clamp=False).value == 56.0


# --- through a site and a broker ---------------------------------------------------------------------

def test_variance_and_stddev_are_exact_through_a_site(start_site, token, site_data) -> None:
    site = start_site(noise=ExactNoise())
    with Client(site.target, token=token()) as c:
        got = c.query("SELECT stage, variance(age_at_diagnosis), stddev(bmi) FROM patients GROUP BY stage",
                      epsilon=0.9).to_polars().sort("stage")
    want = exact(site_data, f"SELECT stage, var_samp({AGE}), stddev_samp({BMI}) FROM patients "
                             "WHERE stage IS NOT NULL GROUP BY stage ORDER BY stage")
    assert got["stage"].to_list() == [w[0] for w in want]
    assert got["variance(age_at_diagnosis)"].to_list() == pytest.approx([w[1] for w in want], rel=1e-9)
    assert got["stddev(bmi)"].to_list() == pytest.approx([w[2] for w in want], rel=1e-9)


def test_stddev_pools_to_the_union_through_a_broker(start_site, start_broker, token, site_data) -> None:
    broker = start_broker({f"s{i}": start_site(noise=ExactNoise(), name=f"s{i}") for i in range(3)})
    with Client(broker.target, token=token()) as c:
        result = c.query("SELECT sex, stddev(age_at_diagnosis), variance(bmi) FROM patients GROUP BY sex",
                         epsilon=0.9)
    union = " UNION ALL ".join(["SELECT sex, age_at_diagnosis, bmi FROM patients"] * 3)
    want = exact(site_data, f"SELECT sex, stddev_samp({AGE}), var_samp({BMI}) FROM ({union}) "
                             "WHERE sex IS NOT NULL GROUP BY sex ORDER BY sex")
    got = result.to_polars().sort("sex")
    assert got["stddev(age_at_diagnosis)"].to_list() == pytest.approx([w[1] for w in want], rel=1e-9)
    assert got["variance(bmi)"].to_list() == pytest.approx([w[2] for w in want], rel=1e-9)
    estimate = result.response.rows[0].estimates[0]
    assert estimate.function == "stddev" and estimate.mechanism == "pooled(stddev(exact(test-only)))"
    assert [c.name for c in estimate.components] == ["sum", "sum_squares", "count"]


@pytest.mark.slow
def test_variance_and_stddev_intervals_match_the_noise(start_site, token) -> None:
    """200 standardised residuals per kind (the patients cap of 100 allows no more): their spread must
    be ~1 and the 95% intervals must cover the exact value about 95% of the time (a 2x error in
    the reported std_error fails both)."""
    noisy_site, exact_site = start_site(), start_site(noise=ExactNoise())
    z: dict[str, list[float]] = {"variance": [], "stddev": []}
    covered: dict[str, list[bool]] = {"variance": [], "stddev": []}
    with Client(noisy_site.target, token=token(project="stats")) as noisy, \
            Client(exact_site.target, token=token(project="stats")) as truth:
        for a in range(18, 43):
            for epsilon in (0.7, 0.8, 0.9, 1.0):
                sql = (f"SELECT sex, variance(age_at_diagnosis), stddev(age_at_diagnosis) FROM patients "
                       f"WHERE age_at_diagnosis >= {a} GROUP BY sex")
                got, want = noisy.query(sql, epsilon=epsilon).response, truth.query(sql, epsilon=epsilon).response
                for g_row, w_row in zip(got.rows, want.rows, strict=True):
                    for g, w in zip(g_row.estimates, w_row.estimates, strict=True):
                        z[g.function].append((g.value - w.value) / g.std_error)
                        covered[g.function].append(g.ci_low <= w.value <= g.ci_high)
    for name, residuals in sorted(z.items(), reverse=True):
        assert len(residuals) == 200
        spread, coverage = statistics.pstdev(residuals), sum(covered[name]) / len(covered[name])
        # 200 samples: spread ~1 +- 0.08, coverage 0.95 +- 0.016; a 2x error gives 0.5 or 2, and ~0.68
        assert 0.7 < spread < 1.4, (name, spread)
        assert 0.88 < coverage <= 0.995, (name, coverage)


def test_a_dataset_that_does_not_allow_a_kind_refuses_it(start_site, token, site_data, tmp_path) -> None:
    no_spread = with_dataset(example_policy(), "patients", aggregates=("count", "sum", "mean"))
    site = start_site(policy=write_policy(tmp_path, site_data, policy=no_spread))
    with client(site, token) as c, pytest.raises(PermissionDenied, match="'stddev' is not allowed on 'patients'"):
        c.query("SELECT stddev(bmi) FROM patients")
