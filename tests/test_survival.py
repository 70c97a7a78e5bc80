"""Kaplan-Meier survival (the ``survival`` kind and :mod:`gateway.survival`) against lifelines.

The gateway counts each row at the first time of the policy's grid t0 < t1 < ... < tm at or after
its own (a time past tm censored there), so its curve is the Kaplan-Meier curve of the rows with
their times moved up to the grid: with no noise it must equal lifelines' on those rows, curve,
band, median and the median's interval, and on integer months with a monthly grid lifelines' on
the raw rows. Through a
site with exact (test-only) noise, and through a real broker over four sites against the union of
their rows. Then the noise: the variance the curve reports for it matches the spread of noisy
curves (OpenDP's noise, as the site draws it); refusals are clear and cost nothing; sites with
different grids are not pooled.
"""

from __future__ import annotations

import math
import random
import re
import statistics
import sys
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import duckdb
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from lifelines import KaplanMeierFitter
from lifelines.utils import median_survival_times

from gateway import _mechanisms as mechanisms
from gateway._engine import Engine
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._sqlfront import parse_sql
from gateway.aggregates import KINDS
from gateway.demo.synth import synthesize
from gateway.errors import InvalidQuery, NotFound, PolicyViolation
from gateway.plot import PlotUnavailable
from gateway.policy import Bins, Column, Parameter, Template, load_policy
from gateway.query import check_query
from gateway.render import query_json, query_table
from gateway.survival import kaplan_meier
from tests.helpers.data import exact
from tests.helpers.policies import example_policy, with_column, with_dataset, with_policy, write_policy
from tests.helpers.servers import ExactNoise, client

GRID = tuple(float(t) for t in range(121))  # the example policies' grid: monthly to 120 months
SURVIVAL_SQL = "SELECT stage, survival(survival_months, death) FROM patients GROUP BY stage"
STAGES = ("I", "II", "III", "IV")


# --- references: the documented binning in plain Python, and lifelines ----------------------------------

def binned(rows: Sequence[tuple[float | None, int | None]], edges: Sequence[float]) -> tuple[list[int], list[int]]:
    """Events and censorings at each grid time, as the policy documents them (no SQL involved)."""
    events, censored = [0] * len(edges), [0] * len(edges)
    for time, event in rows:
        if time is None or math.isnan(time) or event not in (0, 1):
            continue
        if time > edges[-1]:
            censored[-1] += 1
            continue
        i = next(i for i, edge in enumerate(edges) if time <= edge)
        (events if event == 1 else censored)[i] += 1
    return events, censored


def snapped(rows: Sequence[tuple[float, int]], edges: Sequence[float]) -> tuple[list[float], list[int]]:
    """The rows with each time moved up to its bin's end (past the grid: censored at its end)."""
    times, events = [], []
    for time, event in rows:
        if time > edges[-1]:
            times.append(edges[-1])
            events.append(0)
        else:
            times.append(next(t for t in edges if time <= t))
            events.append(event)
    return times, events


class Lifelines:
    """lifelines' Kaplan-Meier of (times, events), read at given times."""

    def __init__(self, times: Sequence[float], events: Sequence[int]) -> None:
        self.fit = KaplanMeierFitter().fit(list(times), list(events))

    def at(self, times: Sequence[float]) -> tuple[list[float], list[float], list[float]]:
        """(survival, band low, band high) at ``times``: the step function's value there."""
        band = self.fit.confidence_interval_
        curve = self.fit.survival_function_at_times(list(times)).to_list()
        lows = [float(band[band.index <= t].iloc[-1, 0]) for t in times]
        highs = [float(band[band.index <= t].iloc[-1, 1]) for t in times]
        return curve, lows, highs

    def median(self, last: float) -> tuple[float, float, float]:
        """(median, its interval's ends), NaN where lifelines' is past ``last`` (the grid's end)."""
        bounds = median_survival_times(self.fit.confidence_interval_).iloc[0].to_list()
        return tuple(v if v <= last else math.nan for v in (self.fit.median_survival_time_, *bounds))  # type: ignore[return-value]


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == pytest.approx(b, rel=1e-9, abs=1e-12)


# --- the post-processing, on its own ------------------------------------------------------------------

@pytest.mark.parametrize("edges", [
    GRID[:37],                                   # monthly to three years
    (0.0, 3.0, 6.0, 12.0, 24.0, 36.0),           # uneven
    (-2.0, 0.5, 1.0, 7.5),                       # starting below zero, fractional edges
], ids=["monthly", "uneven", "fractional"])
def test_without_noise_curve_band_and_median_equal_lifelines_on_the_binned_rows(edges) -> None:
    rng = random.Random(11)
    rows = [(round(rng.uniform(-3, 45), rng.choice((0, 1))), rng.choice((0, 1, 1))) for _ in range(400)]
    events, censored = binned(rows, edges)
    curve = kaplan_meier(edges, events, censored, noise_variance=0.0)
    want = Lifelines(*snapped(rows, edges))
    survival, lows, highs = want.at(edges)
    assert all(same(a, b) for a, b in zip(curve.survival, survival, strict=True))
    assert all(same(a, b) for a, b in zip(curve.ci_low, lows, strict=True))
    assert all(same(a, b) for a, b in zip(curve.ci_high, highs, strict=True))
    assert all(same(a, b) for a, b in zip((curve.median, curve.median_low, curve.median_high),
                                          want.median(edges[-1]), strict=True))
    assert not curve.clamped and curve.noise_std_error == (0.0,) * len(survival)


def test_integer_months_on_a_monthly_grid_are_lifelines_on_the_raw_rows(site_data: Path) -> None:
    rows = exact(site_data, "SELECT survival_months, death FROM patients WHERE stage = 'III'")
    curve = kaplan_meier(GRID, *binned(rows, GRID), noise_variance=0.0)
    want = Lifelines([t for t, _ in rows], [e for _, e in rows])
    assert curve.survival == pytest.approx(want.at(GRID)[0], rel=1e-12)
    assert (curve.median, curve.median_low, curve.median_high) == want.median(GRID[-1])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(-40, 300), st.integers(-40, 300)), min_size=1, max_size=40),
       st.floats(0, 400))
def test_whatever_the_noise_the_curve_is_monotone_and_within_0_1(counts, variance) -> None:
    events, censored = [float(d) for d, _ in counts], [float(c) for _, c in counts]
    edges = [float(t) for t in range(len(counts))]
    curve = kaplan_meier(edges, events, censored, variance)
    assert all(b <= a for a, b in zip(curve.survival, curve.survival[1:], strict=False))
    for s, low, high, n, d in zip(curve.survival, curve.ci_low, curve.ci_high, curve.at_risk, curve.events,
                                  strict=True):
        assert 0 <= low <= s <= high <= 1
        assert 0 <= d <= n
    if not curve.clamped:  # nothing was clamped or fitted: the released counts are the curve's
        assert curve.events == tuple(events) and curve.at_risk == _suffix_sums(events, censored)


def _suffix_sums(events: list[float], censored: list[float]) -> tuple[float, ...]:
    return tuple(sum(events[i:]) + sum(censored[i:]) for i in range(len(events)))


def test_noise_variance_is_the_spread_of_noisy_curves(site_data: Path) -> None:
    """400 noisy releases of one site's exact counts, drawn by the site's own noise source: the
    variance the curve reports for the noise must match the spread of the noisy curves around the
    exact one (a 2x error in the std error is a ratio of 4 or 1/4)."""
    rows = exact(site_data, "SELECT survival_months, death FROM patients WHERE stage IN ('III', 'IV')")
    events, censored = binned(rows, GRID)
    component = mechanisms.Component("counts", 1, Fraction(1), mechanisms.scale_for(1, Fraction(1)), 1, (2, 121))
    exact_curve = kaplan_meier(GRID, events, censored, 0.0)
    draws = 400
    noisy = mechanisms.Noise().apply(component, tuple(events + censored) * draws)
    variance = component.std_error ** 2
    deviations: dict[int, list[float]] = {12: [], 36: [], 60: []}
    reported: dict[int, list[float]] = {12: [], 36: [], 60: []}
    for k in range(draws):
        vector = noisy[k * 242:(k + 1) * 242]
        curve = kaplan_meier(GRID, vector[:121], vector[121:], variance)
        for month, found in deviations.items():
            found.append(curve.survival[month] - exact_curve.survival[month])
            reported[month].append(curve.noise_std_error[month] ** 2)
    for month, found in deviations.items():
        ratio = statistics.fmean(d * d for d in found) / statistics.fmean(reported[month])
        assert 0.75 < ratio < 1.33, (month, ratio)


# --- through a site and a broker, with exact (test-only) noise ------------------------------------------------

def test_a_site_gives_lifelines_curve_median_and_numbers_at_risk(start_site, token, site_data: Path) -> None:
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        result = c.survival("patients", time="survival_months", event="death", by="stage", epsilon=1)
    frame, medians = result.frame, result.medians
    assert frame.columns == ["stage", "time", "survival", "ci_low", "ci_high", "at_risk", "events"]
    assert medians.columns == ["stage", "median", "ci_low", "ci_high"]
    for stage in STAGES:
        rows = exact(site_data, f"SELECT survival_months, death FROM patients WHERE stage = '{stage}'")
        want = Lifelines([t for t, _ in rows], [e for _, e in rows])
        got = frame.filter(frame["stage"] == stage)
        assert got["time"].to_list() == list(GRID)
        assert got["survival"].to_list() == pytest.approx(want.at(GRID)[0], rel=1e-12)
        assert got["at_risk"].to_list() == [sum(t >= month for t, _ in rows) for month in GRID]
        assert got["events"].to_list() == [sum(e == 1 and t == month for t, e in rows) for month in GRID]
        # the band is Greenwood's and then some: the variance the (here absent) noise would add
        _, lows, highs = want.at(GRID)
        assert all(a <= b + 1e-12 for a, b in zip(got["ci_low"].to_list(), lows, strict=True))
        assert all(a >= b - 1e-12 for a, b in zip(got["ci_high"].to_list(), highs, strict=True))
        median = medians.filter(medians["stage"] == stage).row(0, named=True)["median"]
        assert (math.nan if median is None else median) == pytest.approx(want.median(GRID[-1])[0], nan_ok=True)


@pytest.fixture(scope="module")
def four_sites(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Four sites' own synthetic registries (different case mixes)."""
    folder = tmp_path_factory.mktemp("four")
    return {name: synthesize(name, 1500, folder / f"{name}.duckdb", seed=i).path
            for i, name in enumerate(("north", "south", "east", "west"))}


def test_four_sites_pooled_through_a_broker_are_lifelines_on_the_union(start_site, start_broker, token, tmp_path,
                                                                       four_sites) -> None:
    sites = {}
    for name, data in four_sites.items():
        (tmp_path / name).mkdir()
        sites[name] = start_site(noise=ExactNoise(), policy=write_policy(tmp_path / name, data, site=name))
    with client(start_broker(sites), token) as c:
        result = c.survival("patients", time="survival_months", event="death", by="stage", epsilon=1)
    assert sorted(result.sites) == sorted(four_sites)
    assert result.response.rows[0].estimates[0].mechanism == "pooled(kaplan_meier(exact(test-only)))"
    for stage in STAGES:
        rows = [row for data in four_sites.values()
                for row in exact(data, f"SELECT survival_months, death FROM patients WHERE stage = '{stage}'")]
        want = Lifelines([t for t, _ in rows], [e for _, e in rows])
        got = result.frame.filter(result.frame["stage"] == stage)
        assert got["survival"].to_list() == pytest.approx(want.at(GRID)[0], rel=1e-12)
        assert got["at_risk"][0] == len(rows)
        median = result.medians.filter(result.medians["stage"] == stage).row(0, named=True)
        assert (median["median"] or math.nan) == pytest.approx(want.median(GRID[-1])[0], nan_ok=True)


def test_sql_and_structured_forms_are_one_query_and_the_second_is_free(start_site, token) -> None:
    site = start_site()
    with client(site, token) as c:
        first = c.query(SURVIVAL_SQL, epsilon=0.5)
        again = c.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5)
    assert first.response.canonical_hash == again.response.canonical_hash
    assert again.cached and again.epsilon_charged == 0
    assert first.response.aggregates == ["survival(survival_months, death)"]
    assert any("censored" in note for note in first.notes)


def test_the_command_line_shows_the_median_and_gives_the_curve_as_json(start_site, token) -> None:
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        response = c.query(SURVIVAL_SQL, epsilon=1).response
    table = query_table(response)
    assert "median 41 [" in table.splitlines()[4] and "median not reached [" in table.splitlines()[2]
    cell = query_json(response)["rows"][3]["survival(survival_months, death)"]
    assert cell["value"] == 11 and cell["vector"]["edges"] == list(GRID) and len(cell["vector"]["values"]) == 121
    assert cell["vector"]["ci95_lows"][12] <= cell["vector"]["values"][12] <= cell["vector"]["ci95_highs"][12]


def test_an_approved_template_asks_for_survival(start_site, token, site_data, tmp_path) -> None:
    template = Template(sql="SELECT stage, survival(survival_months, death) FROM patients "
                            "WHERE primary_site IN :sites GROUP BY stage",
                        params={"sites": Parameter(type="list[string]", default=("lung",))})
    policy = with_policy(example_policy(), templates={**example_policy().templates, "survival_by_stage": template})
    site = start_site(noise=ExactNoise(), policy=write_policy(tmp_path, site_data, policy=policy))
    with client(site, token) as c:
        result = c.query(template="survival_by_stage", params={"sites": ["lung", "pancreas"]}, epsilon=1)
    rows = exact(site_data, "SELECT survival_months, death FROM patients "
                            "WHERE stage = 'IV' AND primary_site IN ('lung', 'pancreas')")
    curve = result.response.rows[3].estimates[0]
    assert list(curve.values) == pytest.approx(kaplan_meier(GRID, *binned(rows, GRID), 0.0).survival)


def test_a_boolean_event_column_is_read_as_0_and_1(start_site, token, site_data: Path, tmp_path: Path) -> None:
    data = tmp_path / "boolean.duckdb"
    with duckdb.connect(str(data)) as con:
        con.execute(f"ATTACH '{site_data}' AS src (READ_ONLY)")
        con.execute("CREATE TABLE patients AS SELECT * REPLACE (death::BOOLEAN AS death) FROM src.patients")
        con.execute("CREATE TABLE treatments AS SELECT * FROM src.treatments")
    site = start_site(noise=ExactNoise(), policy=write_policy(tmp_path, data))
    with client(site, token) as c:
        got = c.survival("patients", time="survival_months", event="death", epsilon=1).frame
    rows = exact(site_data, "SELECT survival_months, death FROM patients")
    assert got["survival"].to_list() == pytest.approx(kaplan_meier(GRID, *binned(rows, GRID), 0).survival)


def test_rows_with_missing_or_invalid_times_and_events_are_left_out(tmp_path: Path) -> None:
    """NaN and NULL times, NULL events and events other than 0 or 1 count nowhere; infinity is past the end."""
    rows = [(1.0, 1), (2.0, 0), (float("nan"), 1), (None, 1), (3.0, None), (4.0, 2), (5.0, -1), (float("inf"), 1),
            (-float("inf"), 1), (0.5, 1)]
    (tmp_path / "t.yaml").write_text(
        "site: t\nepsilon: {default: 1, max: 1}\ndatasets:\n  d:\n    source: {database: t.duckdb, table: d}\n"
        "    privacy_unit: pid\n    max_rows_per_unit: 1\n    aggregates: [survival]\n    columns:\n"
        "      t: {type: float, roles: [aggregate], bounds: [0, 10], precision: 1, bins: {width: 2.5, max: 10}}\n"
        "      e: {type: integer, roles: [event]}\n")
    with duckdb.connect(str(tmp_path / "t.duckdb")) as con:
        con.execute("CREATE TABLE d (pid BIGINT, t DOUBLE, e INTEGER)")
        con.executemany("INSERT INTO d VALUES (?, ?, ?)", [(i, t, e) for i, (t, e) in enumerate(rows)])
    loaded = load_policy(tmp_path / "t.yaml")
    engine = Engine(loaded)
    try:
        (vector,) = engine.run(check_query(parse_sql("SELECT survival(t, e) FROM d"), loaded.policy)).components
    finally:
        engine.close()
    # grid 0, 2.5, 5, 7.5, 10: -inf counts at 0; 1.0 and 0.5 (events) and 2.0 (censored) at 2.5; +inf is
    # censored at 10
    assert vector == (1, 2, 0, 0, 0, 0, 1, 0, 0, 1)


# --- refusals -------------------------------------------------------------------------------------------

NO_SURVIVAL = with_dataset(example_policy(), "patients", aggregates=("count", "mean"))
NO_GRID = with_column(example_policy(), "patients", "survival_months", bins=None)
NO_AGE_BINS = with_column(example_policy(), "patients", "age_at_diagnosis", bins=None)


@pytest.mark.parametrize(("policy", "spec", "error", "message"), [
    (None, ("survival", "nope", "death"), InvalidQuery,
     "unknown column 'nope' in dataset 'patients'; columns usable for aggregate: age_at_diagnosis, bmi, "
     "survival_months"),
    (None, ("survival", "survival_months", "nope"), InvalidQuery,
     "unknown column 'nope' in dataset 'patients'; columns usable for event: death"),
    (None, ("survival", "survival_months", "age_at_diagnosis"), PolicyViolation,
     "age_at_diagnosis: column may not be used for event (its roles: filter, group_by, aggregate); an event "
     "column is one the policy declares with the event role: an integer, 1 for the event and 0 for censored"),
    (None, ("survival", "stage", "death"), PolicyViolation,
     "stage: column may not be used for aggregate (its roles: filter, group_by)"),
    (NO_AGE_BINS, ("survival", "age_at_diagnosis", "death"), PolicyViolation,
     "age_at_diagnosis: survival needs a time grid on its time column, and the policy declares none for this "
     "column (bins: {width: ..., max: ...}); ask the site's privacy officer"),
    (NO_GRID, ("survival", "survival_months", "death"), PolicyViolation, "survival needs a time grid"),
    (NO_SURVIVAL, ("survival", "survival_months", "death"), PolicyViolation,
     "aggregate: 'survival' is not allowed on 'patients' by the site's policy (datasets.patients.aggregates); "
     "allowed: count, mean"),
    (None, ("survival", "survival_months"), InvalidQuery, "survival needs 2 columns, e.g. survival(time, event)"),
    (None, ("survival", "survival_months", "death", "bmi"), InvalidQuery, "survival needs 2 columns"),
])
def test_refusals_say_why_and_cost_nothing(start_site, token, site_data, tmp_path, policy, spec, error,
                                           message) -> None:
    site = start_site(policy=write_policy(tmp_path, site_data, policy=policy) if policy is not None else None)
    with client(site, token) as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.1)
        spent = site.state.ledger.total_spent()
        with pytest.raises(error) as info:
            c.query(structured={"dataset": "patients", "aggregates": [spec]}, epsilon=0.5)
    assert message in info.value.message
    assert info.value.code.name == ("INVALID_ARGUMENT" if error is InvalidQuery else "PERMISSION_DENIED")
    assert site.state.ledger.total_spent() == spent


def test_parameters_and_wrong_sql_are_refused(start_site, token) -> None:
    site = start_site()
    request = pb.QueryRequest(query_id="p1", epsilon=0.5, structured=pb.StructuredQuery(
        dataset="patients", aggregates=[pb.Aggregate(function="survival", column="survival_months",
                                                     more_columns=["death"], params={"bins": pb.Value(int_value=12)})]))
    with client(site, token) as c:
        with pytest.raises(InvalidQuery, match=r"survival takes no parameters, e.g. survival\(time, event\)"):
            c._call(c._stub.Query, request)
        with pytest.raises(InvalidQuery, match=r"unsupported select item 'SURVIVAL\(survival_months\)': survival "
                                               r"takes 2 column\(s\), e.g. survival\(time, event\)"):
            c.query("SELECT survival(survival_months) FROM patients")
        with pytest.raises(NotFound):
            c.survival("visits", time="t", event="e")
        assert site.state.ledger.total_spent() == 0


def test_an_answer_too_large_for_its_grid_is_refused_before_any_work(start_site, token, site_data, tmp_path):
    fine = with_column(example_policy(), "patients", "survival_months", bins=Bins(width=Fraction(1, 5), max=180),
                       precision=1)
    site = start_site(policy=write_policy(tmp_path, site_data, policy=fine))
    with client(site, token) as c, pytest.raises(InvalidQuery, match="coarser grid"):
        c.query("SELECT age_at_diagnosis, survival(survival_months, death) FROM patients GROUP BY age_at_diagnosis")
    assert site.state.ledger.total_spent() == 0


@pytest.mark.parametrize(("bins", "reason"), [
    ({"width": 0, "max": 12}, "need width > 0 and max > min"),
    ({"width": 1, "max": 0}, "need width > 0 and max > min"),
    ({"width": 5, "max": 12}, "max - min (12) is not a whole number of widths (5)"),
    ({"width": 1}, "give width and max"),
    ({"edges": [0, 12, 6]}, "edges must be at least two numbers, strictly increasing"),
    ({"edges": [0]}, "edges must be at least two numbers, strictly increasing"),
    ({"edges": [0, 12], "width": 1}, "give either edges"),
    ({"width": 0.1, "max": 120}, "at most 1000 are allowed"),
    ({"width": 0.5, "max": 12}, "bin edge 0.5 is not a multiple of 1 (precision 0)"),
    ({"width": "inf", "max": 12}, "must be a number"),
])
def test_a_grid_the_software_cannot_use_is_refused_when_the_policy_loads(bins, reason) -> None:
    with pytest.raises(ValueError, match=re.escape(reason)):
        Column(type="integer", roles=("aggregate",), bounds=(0, 180), bins=bins)


def test_a_grid_needs_an_aggregate_column_and_an_event_an_integer_one() -> None:
    with pytest.raises(ValueError, match="bins apply to a column with the aggregate role"):
        Column(type="integer", roles=("filter",), bins={"width": 1, "max": 12})
    with pytest.raises(ValueError, match=r"an event column .* must be an integer column"):
        Column(type="string", roles=("event",))
    assert Column(type="float", roles=("aggregate",), bounds=(0, 10), bins={"edges": [0, 0.5, 10]},
                  precision=1).grid == (0.0, 0.5, 10.0)


# --- sites that disagree, and pictures -----------------------------------------------------------------

def test_sites_with_different_grids_are_not_pooled(start_site, start_broker, token, site_data, tmp_path) -> None:
    quarterly = with_column(example_policy(), "patients", "survival_months", bins=Bins(width=3, max=120))
    south = write_policy(tmp_path, site_data, site="south", policy=with_policy(quarterly, site="south"))
    broker = start_broker({"north": start_site(name="north"), "south": start_site(policy=south)})
    with client(broker, token) as c:
        result = c.survival("patients", time="survival_months", event="death", epsilon=0.5)
    assert result.response.rows[0].estimates[0].suppressed
    assert result.medians["median"].to_list() == [None]
    assert any("the sites declare different grids" in note for note in result.notes)
    assert {a.site: len(a.rows[0].estimates[0].values) for a in result.response.site_answers} == {"north": 121,
                                                                                                  "south": 41}


def test_plot_writes_a_png_with_one_curve_per_group(start_site, token, tmp_path) -> None:
    site = start_site()
    with client(site, token) as c:
        result = c.survival("patients", time="survival_months", event="death", by="stage", epsilon=1)
    path = result.plot(tmp_path / "curves.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 20_000


def test_plot_without_matplotlib_says_how_to_get_it(start_site, token, tmp_path, monkeypatch) -> None:
    site = start_site()
    with client(site, token) as c:
        result = c.survival("patients", time="survival_months", event="death", epsilon=1)
    for name in [m for m in sys.modules if m.startswith("matplotlib")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(PlotUnavailable, match=r"pip install 'gateway\[plot\]'"):
        result.plot(tmp_path / "curves.png")
    assert not (tmp_path / "curves.png").exists()


def test_the_kind_releases_one_measurement_of_2m_counts() -> None:
    """Events and censorings are one vector: a row adds 1 to one of its 2n entries, so k rows move
    it by at most k in L1, and the pair spends the aggregate's whole epsilon."""
    kind = KINDS["survival"]
    (spec,) = kind.components
    column = example_policy().datasets["patients"].columns["survival_months"]
    assert spec.shape(column) == (2, 121) and spec.row_bound(column) == 1 and spec.share == 1
    dataset = with_dataset(example_policy(), "patients", max_rows_per_unit=3).datasets["patients"]
    plan = mechanisms.plan_query(check_query(parse_sql("SELECT survival(survival_months, death) FROM patients"),
                                             example_policy()), dataset, Fraction(1, 2))
    (component,) = plan.aggregates[0].components
    assert (component.sensitivity, component.epsilon, component.scale) == (3, Fraction(1, 2), 6.0)


# --- honest bands ---------------------------------------------------------------------------------------

CHECKED_MONTHS = (12, 36, 60)


def _coverage(misses: list[float]) -> tuple[float, float]:
    """(share of |error| / half-width <= 1, the same for a band half as wide)."""
    return sum(m <= 1 for m in misses) / len(misses), sum(m <= 0.5 for m in misses) / len(misses)


@pytest.mark.slow
@pytest.mark.parametrize(("epsilon", "sql"), [
    (Fraction(1), SURVIVAL_SQL),
    (Fraction(1, 10), "SELECT survival(survival_months, death) FROM patients"),
], ids=["eps=1-by-stage", "eps=0.1-all"])
def test_pooled_noise_band_covers_the_union_curve(four_sites, tmp_path, epsilon, sql) -> None:
    """200 releases of four sites' real engines and noise, pooled as the broker pools them: the
    band of the noise alone (the reported band's construction with the noise's variance only)
    must cover the exact curve of the union at 12, 36 and 60 months in 90-99% of (draw, group,
    month) cells, and a band half as wide clearly less often (under 85%; a normal error gives
    68%). At epsilon 0.1 the groups are all 6,000 patients: by stage (1,500 each) the noise is as
    large as the numbers at risk at 5 years, the band conservative there, and a band half as
    wide would not be caught. The reported band adds Greenwood's variance for the patients' own
    randomness; that the sum is right is checked against the true survival function below."""
    kind = KINDS["survival"]
    releases, exact_counts = [], []
    for name, data in four_sites.items():
        (tmp_path / name).mkdir()
        loaded = load_policy(write_policy(tmp_path / name, data, site=name))
        query = check_query(parse_sql(sql), loaded.policy)
        plan = mechanisms.plan_query(query, loaded.policy.datasets["patients"], epsilon)
        engine = Engine(loaded)
        try:
            result = engine.run(query)
        finally:
            engine.close()
        releases.append((plan, result))
        exact_counts.append(result.components[0])
    union = [sum(values) for values in zip(*exact_counts, strict=True)]
    misses: list[float] = []
    for _ in range(200):
        rows = [mechanisms.release(plan, result.groups, result.components, mechanisms.Noise())
                for plan, result in releases]
        for g in range(len(releases[0][1].groups)):
            pooled = kind.pool([{p.name: p for p in site_rows[g].estimates[0].parts} for site_rows in rows])["counts"]
            curve = kaplan_meier(GRID, *split(pooled.values), pooled.std_error ** 2)
            truth = kaplan_meier(GRID, *split(union[g * 242:(g + 1) * 242]), 0.0)
            for t in CHECKED_MONTHS:
                inside = curve.noise_ci_low[t] <= truth.survival[t] <= curve.noise_ci_high[t]
                if curve.survival[t] == 0:  # the band is [0, its upper end before]: no half of it to take
                    misses.append(0.0 if inside else math.inf)
                else:
                    misses.append(_miss(curve.survival[t], (curve.noise_std_error[t] / curve.survival[t]) ** 2,
                                        truth.survival[t]))
                    assert (misses[-1] <= 1) == inside
    covered, half = _coverage(misses)
    assert 0.9 < covered < 0.99, covered
    assert half < 0.85, half


def _miss(estimate: float, variance: float, truth: float) -> float:
    """How far ``truth`` is from ``estimate`` in half-widths of the log-log 95% band with Var(log S) =
    ``variance`` (<= 1: inside the band; <= 0.5: inside a band half as wide)."""
    if estimate == 1.0:  # the band is [exp(-1.96 sd), 1]
        return -math.log(truth) / (1.959964 * math.sqrt(variance)) if variance > 0 else math.inf
    if estimate == 0.0 or truth in (0.0, 1.0):
        return 0.0 if estimate == truth else math.inf
    theta, spread = math.log(-math.log(estimate)), 1.959964 * math.sqrt(variance) / -math.log(estimate)
    return abs(math.log(-math.log(truth)) - theta) / spread if spread > 0 else math.inf


def split(values: Sequence[float]) -> tuple[list[float], list[float]]:
    half = len(values) // 2
    return list(values[:half]), list(values[half:])


@pytest.mark.slow
@pytest.mark.parametrize("epsilon", [Fraction(1), Fraction(1, 10)], ids=["eps=1", "eps=0.1"])
def test_the_reported_band_covers_the_true_survival_function(epsilon) -> None:
    """The band's claim: 95% of bands cover the survival function the patients come from. 200
    fresh cohorts of 4 x 1500 patients (deaths and losses to follow-up in whole months, so the
    grid loses nothing), each site's counts noised by OpenDP as the site does, pooled: the band
    covers the true S at 12, 36 and 60 months in 90-99.5% of cells, and a band half as wide in
    clearly fewer (under 85%). At epsilon 0.1 the noise is most of the band's width, at 1 Greenwood's
    sampling variance is: both parts must be right."""
    rng = np.random.default_rng(20260101)
    hazard, loss = 0.02, 0.01
    component = mechanisms.Component("counts", 1, epsilon, mechanisms.scale_for(1, epsilon), 1, (2, 121))
    misses: list[float] = []
    for _ in range(200):
        counts = np.zeros(242)
        for _site in range(4):
            death = np.floor(rng.exponential(1 / hazard, 1500))
            censor = np.minimum(np.floor(rng.exponential(1 / loss, 1500)), 150)
            time, event = np.minimum(death, censor), death <= censor
            index = np.where(time > 120, 241, np.where(event, time, 121 + time)).astype(int)
            exact_counts = tuple(int(c) for c in np.bincount(index, minlength=242))
            counts += mechanisms.Noise().apply(component, exact_counts)
        curve = kaplan_meier(GRID, *split(list(counts)), 4 * component.std_error ** 2)
        for t in CHECKED_MONTHS:
            truth = math.exp(-hazard * (t + 1))  # P(floor(Exp) > t)
            assert curve.ci_low[t] <= curve.survival[t] <= curve.ci_high[t]
            misses.append(_miss(curve.survival[t], (curve.std_error[t] / curve.survival[t]) ** 2, truth))
    covered, half = _coverage(misses)
    assert 0.9 < covered < 0.995, covered
    assert half < 0.85, half
