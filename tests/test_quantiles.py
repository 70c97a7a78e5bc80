"""Histograms, medians and quantiles over the bins a policy declares (:mod:`gateway.quantiles`).

Against exact, non-private references on synthetic data: with exact (test-only) noise a site's
histogram is the documented binning of the rows in plain Python, and through a real broker over
four sites the binning of their union. With OpenDP's noise: exact sample quantiles fall inside the
reported intervals, and by simulation the intervals cover the true quantile about 95% of the time
(an interval half as wide fails). Refusals are clear, carry the right status and cost nothing.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from statistics import NormalDist

import duckdb
import pytest

from gateway import _mechanisms as mechanisms
from gateway._binned import HistogramResult, QuantilesResult
from gateway._engine import Engine
from gateway._sqlfront import parse_sql
from gateway.aio import Client as AioClient
from gateway.demo.synth import synthesize
from gateway.errors import InvalidQuery, PolicyViolation
from gateway.policy import Bins, Parameter, Template, load_policy
from gateway.policy import Column as PolicyColumn
from gateway.quantiles import quantiles_of
from gateway.query import check_query
from gateway.render import query_json, query_table
from tests.helpers.data import exact
from tests.helpers.policies import example_policy, with_column, with_dataset, with_policy, write_policy
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


def interpolated(counts: Sequence[float], edges: Sequence[float], q: float) -> float:
    """The q-quantile of exact per-bin counts, rows spread evenly within each bin (the documented rule)."""
    total, below = sum(counts), 0.0
    for i, c in enumerate(counts):
        if c > 0 and below + c >= q * total:
            return edges[i] + (q * total - below) / c * (edges[i + 1] - edges[i])
        below += c
    return edges[-1]


def test_sql_median_and_quantile_at_a_site_are_the_documented_interpolation(start_site, token, site_data) -> None:
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        result = c.query("SELECT stage, median(age_at_diagnosis) AS m, quantile(age_at_diagnosis, 0.9) "
                         "FROM patients GROUP BY stage", epsilon=1)
    frame = result.to_polars()
    assert result.response.aggregates == ["median(age_at_diagnosis)", "quantile(age_at_diagnosis; q=0.9)"]
    for stage in STAGES:
        rows = [a for (a,) in exact(site_data, f"SELECT age_at_diagnosis FROM patients WHERE stage = '{stage}'")]
        got = frame.filter(frame["stage"] == stage).row(0, named=True)
        counts = binned(rows, AGE_EDGES)
        assert got["m"] == pytest.approx(interpolated(counts, AGE_EDGES, 0.5), rel=1e-12)
        assert got["quantile(age_at_diagnosis; q=0.9)"] == pytest.approx(interpolated(counts, AGE_EDGES, 0.9))
        # an integer age a is in the bin [a, a + 1): the exact sample quantile is the interpolated one's floor
        assert math.floor(got["m"]) == sample_quantile(rows, 0.5)
        assert got["m_ci_low"] <= got["m"] <= got["m_ci_high"]


def test_with_opendp_noise_exact_quantiles_fall_in_the_intervals(start_site, token, site_data) -> None:
    site = start_site()
    rows = [a for (a,) in exact(site_data, "SELECT age_at_diagnosis FROM patients")]
    with client(site, token) as c:
        result = c.quantiles("patients", "age_at_diagnosis", qs=(0.1, 0.25, 0.5, 0.75, 0.9), epsilon=0.5)
        assert result.epsilon_charged == 0.5  # five quantiles, one histogram, one epsilon
    for row in result.frame.iter_rows(named=True):
        truth = sample_quantile(rows, row["q"])
        # an integer age a fills [a, a + 1): the interval covers some point of the true value's bin
        assert row["ci_low"] <= truth + 1 and truth <= row["ci_high"], row
        assert row["ci_high"] - row["ci_low"] < 10


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four sites' own synthetic registries (different case mixes)."""
    folder = tmp_path_factory.mktemp("four")
    return {name: synthesize(name, 1000, folder / f"{name}.duckdb", seed=20 + i).path
            for i, name in enumerate(("north", "south", "east", "west"))}


def test_four_sites_pooled_through_a_broker_are_the_histogram_of_the_union(start_site, start_broker, token,
                                                                           tmp_path, four_sites) -> None:
    sites = {}
    for name, data in four_sites.items():
        (tmp_path / name).mkdir()
        sites[name] = start_site(noise=ExactNoise(), policy=write_policy(tmp_path / name, data, site=name))
    with client(start_broker(sites), token) as c:
        histogram = c.histogram("patients", "age_at_diagnosis", by="stage", epsilon=1)
        median = c.query("SELECT stage, median(age_at_diagnosis) FROM patients GROUP BY stage", epsilon=1)
    assert sorted(histogram.sites) == sorted(four_sites)
    assert median.response.rows[0].estimates[0].mechanism == "pooled(median(exact(test-only)))"
    medians = median.to_polars()
    for stage in STAGES:
        rows = [a for data in four_sites.values()
                for (a,) in exact(data, f"SELECT age_at_diagnosis FROM patients WHERE stage = '{stage}'")]
        want = binned(rows, AGE_EDGES)
        got = histogram.frame.filter(histogram.frame["stage"] == stage)
        assert got["count"].to_list() == want
        pooled = medians.filter(medians["stage"] == stage)["median(age_at_diagnosis)"][0]
        assert pooled == pytest.approx(interpolated(want, AGE_EDGES, 0.5), rel=1e-12)
        quartiles = histogram.quantiles((0.25, 0.75))
        upper = quartiles.filter((quartiles["stage"] == stage) & (quartiles["q"] == 0.75))["value"][0]
        assert upper == pytest.approx(interpolated(want, AGE_EDGES, 0.75), rel=1e-12)


def test_values_outside_the_bins_are_clamped_and_missing_ones_left_out(tmp_path: Path) -> None:

    data = tmp_path / "d.duckdb"
    with duckdb.connect(str(data)) as con:
        con.execute("CREATE TABLE patients AS SELECT * FROM (VALUES (1, -5.0), (2, 0.0), (3, 2.49), (4, 2.5), "
                    "(5, 9.99), (6, 10.0), (7, 1e300), (8, NULL), (9, 'NaN'::DOUBLE), (10, 'inf'::DOUBLE)) "
                    "t(patient_id, x)")
    policy = with_dataset(example_policy(), "patients", columns={"x": PolicyColumn(
        type="float", roles=("aggregate",), bounds=(0, 10), bins=Bins(width=2.5, max=10))},
        aggregates=("histogram",))
    loaded = load_policy(write_policy(tmp_path, data, policy=policy))
    engine = Engine(loaded)
    try:
        result = engine.run(check_query(parse_sql("SELECT histogram(x) FROM patients"), loaded.policy))
    finally:
        engine.close()
    # bins [0, 2.5), [2.5, 5), [5, 7.5), [7.5, 10]: -5 and 0 and 2.49 in the first; 10, 1e300 and inf in the last
    assert result.components[0] == (3, 1, 0, 4)


def test_several_quantiles_of_one_histogram_cost_one_epsilon_in_the_client(start_site, token) -> None:
    site = start_site()
    with client(site, token) as c:
        result = c.quantiles("patients", "age_at_diagnosis", qs=(0.1, 0.5, 0.9), by="sex", epsilon=0.3)
        assert result.frame.columns == ["sex", "q", "value", "ci_low", "ci_high"]
        assert result.frame.height == 6 and result.epsilon_charged == pytest.approx(0.3)
        assert site.state.ledger.total_spent() == pytest.approx(0.3)
        again = c.histogram("patients", "age_at_diagnosis", by="sex", epsilon=0.3)
    assert again.cached and again.epsilon_charged == 0  # the same histogram, stored


def test_an_approved_template_asks_for_a_quantile_with_its_level_as_a_parameter(start_site, token, site_data,
                                                                                tmp_path) -> None:
    template = Template(sql="SELECT sex, quantile(age_at_diagnosis, :q) FROM patients GROUP BY sex",
                        params={"q": Parameter(type="float", default=0.9)})
    policy = with_policy(example_policy(), templates={**example_policy().templates, "age_quantile": template})
    site = start_site(noise=ExactNoise(), policy=write_policy(tmp_path, site_data, policy=policy))
    with client(site, token) as c:
        result = c.query(template="age_quantile", params={"q": 0.25}, epsilon=1)
        with pytest.raises(InvalidQuery, match="strictly between 0 and 1"):
            c.query(template="age_quantile", params={"q": 2.0}, epsilon=1)
    rows = [a for (a,) in exact(site_data, "SELECT age_at_diagnosis FROM patients WHERE sex = 'F'")]
    assert result.response.aggregates == ["quantile(age_at_diagnosis; q=0.25)"]
    assert result.response.rows[0].estimates[0].value == pytest.approx(
        interpolated(binned(rows, AGE_EDGES), AGE_EDGES, 0.25))


def test_the_command_line_shows_the_median_and_gives_the_bins_as_json(start_site, token, site_data) -> None:
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        response = c.query("SELECT histogram(age_at_diagnosis), quantile(age_at_diagnosis, 0.75) FROM patients",
                           epsilon=1).response
    histogram, quartile = response.rows[0].estimates
    table = query_table(response)
    assert f"median {histogram.value:g} [" in table.splitlines()[2]
    assert f"{quartile.value:.2f} [{quartile.ci_low:.2f}, {quartile.ci_high:.2f}]" in table.splitlines()[2]
    assert any("82 declared bins 18..100" in line for line in table.splitlines())
    cell = query_json(response)["rows"][0]["histogram(age_at_diagnosis)"]
    assert cell["vector"]["edges"] == list(AGE_EDGES) and cell["vector"]["shape"] == [82]
    assert sum(cell["vector"]["values"]) == exact(site_data, "SELECT count(*) FROM patients")[0][0]


def test_plot_writes_a_png_with_one_panel_per_group(start_site, token, tmp_path) -> None:
    site = start_site()
    with client(site, token) as c:
        result = c.histogram("patients", "age_at_diagnosis", by="sex", epsilon=1)
    path = result.plot(tmp_path / "ages.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_the_asyncio_client_offers_the_same_calls(start_site, token) -> None:
    site = start_site()

    async def session() -> tuple[QuantilesResult, HistogramResult]:
        async with AioClient(site.target, token=token()) as gw:
            quantiles = await gw.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=1, method="histogram")
            histogram = await gw.histogram("patients", "age_at_diagnosis", epsilon=1)
        return quantiles, histogram

    quantiles, histogram = asyncio.run(session())
    assert histogram.cached  # the same histogram as the quantiles': stored, free
    assert quantiles.frame["value"][0] == histogram.quantiles((0.5,))["value"][0]
    assert histogram.frame.height == 82


def test_sql_and_structured_forms_are_one_query_and_the_second_is_free(start_site, token) -> None:
    site = start_site()
    with client(site, token) as c:
        first = c.query("SELECT sex, quantile(age_at_diagnosis, 0.9) FROM patients GROUP BY sex", epsilon=0.5)
        again = c.query(structured={"dataset": "patients", "group_by": ["sex"],
                                    "aggregates": [("quantile", "age_at_diagnosis", {"q": 0.9})]}, epsilon=0.5)
        with pytest.raises(InvalidQuery, match="strictly between 0 and 1"):
            c.query(structured={"dataset": "patients", "aggregates": [("quantile", "age_at_diagnosis", {"q": -1})]},
                    epsilon=0.5)
        with pytest.raises(InvalidQuery, match="histogram takes no parameters"):
            c.query(structured={"dataset": "patients", "aggregates": [("histogram", "age_at_diagnosis", {"q": 0.5})]},
                    epsilon=0.5)
    assert first.response.canonical_hash == again.response.canonical_hash
    assert again.cached and again.epsilon_charged == 0
    assert any("interpolated within the bins" in note for note in first.notes)


def test_a_dry_run_prices_a_histogram_and_charges_nothing(start_site, token) -> None:
    site = start_site()
    with client(site, token) as c:
        plan = c.histogram("patients", "age_at_diagnosis", by="stage", epsilon=0.4, dry_run=True)
    assert plan.response.dry_run and plan.epsilon_charged == pytest.approx(0.4)
    assert plan.frame["count"].null_count() == plan.frame.height == 4 * 82
    assert plan.quantiles((0.5,))["value"].null_count() == 4
    assert site.state.ledger.total_spent() == 0


# --- refusals ---------------------------------------------------------------------------------------------

NO_MEDIAN = with_dataset(example_policy(), "patients", aggregates=("count", "mean", "histogram"))
NO_BINS = with_column(example_policy(), "patients", "bmi", bins=None)


@pytest.mark.parametrize(("policy", "sql", "error", "message"), [
    (None, "SELECT quantile(age_at_diagnosis, 1.5) FROM patients", InvalidQuery,
     "quantile needs q, a number strictly between 0 and 1"),
    (None, "SELECT quantile(age_at_diagnosis, 0) FROM patients", InvalidQuery, "strictly between 0 and 1"),
    (None, "SELECT quantile(age_at_diagnosis, bmi) FROM patients", InvalidQuery,
     "the q of quantile must be a number written in the query (e.g. 0.9), got 'bmi'"),
    (None, "SELECT quantile(age_at_diagnosis, '0.5') FROM patients", InvalidQuery, "must be a number"),
    (None, "SELECT quantile(age_at_diagnosis) FROM patients", InvalidQuery, "quantile takes 1 column(s) and q"),
    (NO_BINS, "SELECT median(bmi) FROM patients", InvalidQuery,
     "median needs bins declared on column 'bmi', and the policy declares none: the bins come from the site's "
     "privacy officer, never from the data"),
    (NO_BINS, "SELECT histogram(bmi) FROM patients", InvalidQuery, "histogram needs bins declared on column 'bmi'"),
    (None, "SELECT median(stage) FROM patients", PolicyViolation, "stage: column may not be used for aggregate"),
    (NO_MEDIAN, "SELECT median(age_at_diagnosis) FROM patients", PolicyViolation,
     "'median' is not allowed on 'patients' by the site's policy (datasets.patients.aggregates)"),
    (None, "SELECT " + ", ".join(f"quantile(age_at_diagnosis, {q / 100})" for q in range(1, 34)) + " FROM patients",
     InvalidQuery, "the query has 33 aggregates; at most 32 are allowed"),
    (None, "SELECT histogram(bmi) FROM patients GROUP BY age_at_diagnosis, diagnosis_year, sex", InvalidQuery,
     "MiB a site sends; group by fewer columns"),
    (None, "SELECT quantile(bmi, 0.5), quantile(bmi, 0.6) FROM patients GROUP BY age_at_diagnosis, "
           "diagnosis_year, sex, vital_status", InvalidQuery, "MiB a site sends; group by fewer columns"),
])
def test_refusals_say_why_and_cost_nothing(start_site, token, site_data, tmp_path, policy, sql, error,
                                           message) -> None:
    site = start_site(policy=write_policy(tmp_path, site_data, policy=policy) if policy is not None else None)
    with client(site, token) as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.1)
        spent = site.state.ledger.total_spent()
        with pytest.raises(error) as info:
            c.query(sql, epsilon=0.5)
    assert message in info.value.message
    assert info.value.code.name == ("INVALID_ARGUMENT" if error is InvalidQuery else "PERMISSION_DENIED")
    assert site.state.ledger.total_spent() == spent


@pytest.mark.parametrize("qs", [(), (0.5, 1.0), (0.0,), (float("nan"),), tuple(i / 200 for i in range(1, 101))])
def test_bad_quantile_levels_are_refused_before_any_call(start_site, token, qs) -> None:
    site = start_site()
    with client(site, token) as c, pytest.raises(ValueError, match="quantile level"):
        c.quantiles("patients", "age_at_diagnosis", qs=qs, epsilon=0.5)
    assert site.state.ledger.total_spent() == 0


def test_a_kind_keeps_to_its_own_epsilon_limits(start_site, token, site_data, tmp_path) -> None:
    rules = {**{kind: {} for kind in example_policy().datasets["patients"].aggregates},
             "median": {"epsilon": {"max": "1/4", "default": "1/10"}}}
    policy = with_dataset(example_policy(), "patients", aggregates=rules)
    site = start_site(policy=write_policy(tmp_path, site_data, policy=policy))
    with client(site, token) as c:
        assert c.query("SELECT count(*) FROM patients", epsilon=0.8).epsilon_charged == pytest.approx(0.8)
        with pytest.raises(PolicyViolation) as info:
            c.query("SELECT count(*), median(age_at_diagnosis) FROM patients", epsilon=0.8)
        assert "exceeds the per-query maximum 0.25 for dataset 'patients' with count, median" in info.value.message
        assert info.value.code.name == "PERMISSION_DENIED"
        assert c.query("SELECT median(age_at_diagnosis) FROM patients").epsilon_charged == pytest.approx(0.1)
        assert c.query("SELECT count(*) FROM patients WHERE sex = 'F'").epsilon_charged == pytest.approx(0.5)


# --- the interval: coverage by simulation -----------------------------------------------------------------

@pytest.mark.parametrize("epsilon", [1.0, 0.1])
def test_intervals_cover_the_true_quantile_about_95_percent_and_half_as_wide_would_not(epsilon) -> None:
    """Normal(50, 10) patients, 1,000 per sample, bins of width 1 over [0, 100]: the true quantiles are known.

    400 samples give a coverage within about +-2.2% of the truth (1 sd): [0.91, 0.99] holds a correct
    95% interval; an interval half as wide covers about 68% and fails.
    """
    rng = random.Random(11)
    edges = tuple(float(t) for t in range(101))
    qs = (0.1, 0.5, 0.9)
    truth = {q: NormalDist(50, 10).inv_cdf(q) for q in qs}
    hits = dict.fromkeys(qs, 0)
    narrow = dict.fromkeys(qs, 0)
    scale = mechanisms.scale_for(1, Fraction(str(epsilon)))
    variance = mechanisms.Component("counts", 1, Fraction(str(epsilon)), scale, 1, (100,)).std_error ** 2
    runs = 400
    for _ in range(runs):
        values = [rng.gauss(50, 10) for _ in range(1000)]
        noisy = list(mechanisms.measurement(scale)(binned(values, edges)))
        for found in quantiles_of(edges, noisy, variance, qs):
            hits[found.q] += found.ci_low <= truth[found.q] <= found.ci_high
            half = (found.ci_high - found.ci_low) / 4
            middle = (found.ci_high + found.ci_low) / 2
            narrow[found.q] += middle - half <= truth[found.q] <= middle + half
    for q in qs:
        assert 0.91 <= hits[q] / runs <= 0.99, (q, hits[q] / runs)
        assert narrow[q] / runs < 0.85, (q, narrow[q] / runs)


def test_a_scalar_of_a_binned_column_carries_no_grid_and_pools_whatever_the_bins(start_site, start_broker, token,
                                                                                  site_data, tmp_path) -> None:
    (tmp_path / "south").mkdir()
    coarse = with_column(example_policy("south"), "patients", "age_at_diagnosis", bins=Bins(width=10, min=10, max=100))
    sites = {"north": start_site(noise=ExactNoise()),
             "south": start_site(noise=ExactNoise(), policy=write_policy(tmp_path / "south", site_data, site="south",
                                                                          policy=coarse))}
    with client(start_broker(sites), token) as c:
        result = c.query("SELECT mean(age_at_diagnosis), histogram(age_at_diagnosis) FROM patients", epsilon=1)
    mean, histogram = result.response.rows[0].estimates
    assert not mean.edges and not mean.suppressed and math.isfinite(mean.value)
    assert histogram.suppressed and any("different grids" in note for note in result.notes)
