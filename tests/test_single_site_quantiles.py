"""Medians and quantiles asked of one site directly: OpenDP's quantile mechanism over the declared bin edges.

With ``single_site`` a site selects each quantile among the policy's bin edges by the exponential
mechanism (OpenDP's report noisy max with exponential noise) on OpenDP's quantile scores. Checked here:

- the scores the site derives from the engine's exact counts per cell are those OpenDP's
  ``make_quantile_score_candidates`` computes from the rows themselves (regular and explicit
  edges, ties at edges, values past the bounds, missing values), and one patient's k rows move
  every score by at most the sensitivity the measurement is calibrated to (and by exactly it);
- the draws follow the exponential mechanism at the charged epsilon: the mean rank error of 4,000
  draws is within 5 standard errors of its exact expectation (computed from the mechanism's
  definition: report noisy max with exponential noise), and the expectation at twice or half
  the epsilon is over 20 standard errors away (a factor 2 fails); at least 95% of draws lie within
  the published 95% rank-error bound; and the estimate is near the exact quantile;
- end to end at a real site: an edge, no interval, the bound, one charge and a free replay; with
  exact (test-only) selection the best edge of the rows; the client's ``method`` choices, and
  ``auto`` asking for the histogram where the site's policy refuses the mechanism (uncharged);
- refusals: a broker refuses the flag (FAILED_PRECONDITION) and no site is charged; the flag on
  any other kind is INVALID_ARGUMENT, uncharged; a relay cannot add or strip the flag without
  breaking the proof of possession.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import random
from fractions import Fraction
from pathlib import Path

import duckdb
import grpc
import numpy as np
import opendp.prelude as dp
import pytest

from gateway import _mechanisms as mechanisms
from gateway._binned import QuantilesResult, SiteQuantilesResult
from gateway._engine import Engine
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._sqlfront import parse_sql
from gateway.aggregates import SINGLE_SITE, rank_error_95
from gateway.aio import Client as AioClient
from gateway.errors import FailedPrecondition, InvalidQuery, PolicyViolation
from gateway.policy import Bins, load_policy
from gateway.policy import Column as PolicyColumn
from gateway.proof import request_digest
from gateway.query import Query, check_query
from tests.helpers.cli import run_cli
from tests.helpers.data import exact
from tests.helpers.policies import example_policy, with_dataset, write_policy
from tests.helpers.servers import ExactNoise, client, signed
from tests.privacy.audit import noisy_max_probabilities

AGE_EDGES = tuple(float(a) for a in range(18, 101))  # the example policies' age bins: one per year


def single(sql: str) -> Query:
    """The SQL's query, asked of one site directly."""
    return dataclasses.replace(parse_sql(sql), single_site=True)


def cells_of(values: list[int], edges: list[int]) -> list[int]:
    """Rows per cell of the line ``edges`` cut: below the first, at it, between it and the next, ..., above."""
    cells = [0] * (2 * len(edges) + 1)
    for v in values:
        below = sum(e < v for e in edges)
        cells[2 * below + 1 if below < len(edges) and edges[below] == v else 2 * below] += 1
    return cells


def opendp_scores(values: list[int], edges: list[int], q: float) -> tuple[list[int], int]:
    """OpenDP's own quantile scores of ``edges`` on the rows, and its sensitivity for one row."""
    score = dp.t.make_quantile_score_candidates(dp.vector_domain(dp.atom_domain(T=int)), dp.symmetric_distance(),
                                                edges, q)
    return list(score(values)), int(score.map(1))


# -- the scores ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bins", [Bins(width=2.5, max=10), Bins(edges=(-1, 0, 2.5, 7, 10))],
                         ids=["regular", "explicit"])
@pytest.mark.parametrize("q", [0.5, 0.25, 0.9, 0.3])
def test_the_engine_s_counts_give_opendp_s_quantile_scores(tmp_path: Path, bins: Bins, q: float) -> None:
    raw = [-5.0, 0.0, 0.0, 2.49, 2.5, 2.5, 2.5, 4.2, 7.0, 9.99, 10.0, 10.0, 1e300, None, float("nan"),
           float("inf"), -float("inf"), 5.555, 7.004, 11.0]
    data = tmp_path / "d.duckdb"
    with duckdb.connect(str(data)) as con:
        con.execute("CREATE TABLE patients (patient_id INTEGER, x DOUBLE)")
        con.executemany("INSERT INTO patients VALUES (?, ?)", list(enumerate(raw)))
    column = PolicyColumn(type="float", roles=("aggregate",), bounds=(-2, 10), bins=bins)
    policy = with_dataset(example_policy(), "patients", columns={"x": column}, aggregates=("quantile",))
    loaded = load_policy(write_policy(tmp_path, data, policy=policy))
    engine = Engine(loaded)
    try:
        result = engine.run(check_query(single(f"SELECT quantile(x, {q}) FROM patients"), loaded.policy))
    finally:
        engine.close()
    (cells,) = result.components
    # the rows as the site reads them: in fixed point at the column's precision, clamped to its bounds
    low, high = column.fixed_bounds
    rows = [min(max(round(v * column.unit) if math.isfinite(v) else int(math.copysign(high * 10, v)), low), high)
            for v in raw if v is not None and not math.isnan(v)]
    edges = list(column.fixed_grid)
    assert list(cells) == cells_of(rows, edges)
    level = mechanisms.exact_level(q)
    ours = mechanisms.quantile_scores(cells, level)
    theirs, per_row = opendp_scores(rows, edges, q)
    ratio = per_row // max(level.numerator, level.denominator - level.numerator)  # OpenDP's grain of q
    assert theirs == [ratio * s for s in ours]


def test_one_patient_moves_every_score_by_at_most_the_sensitivity_and_can_reach_it() -> None:
    rng = random.Random(5)
    edges = [0, 10, 20, 30, 40]
    reached = set()
    for _ in range(400):
        q, k = rng.choice((0.5, 0.1, 0.9, 0.37)), rng.randint(1, 4)
        level = mechanisms.exact_level(q)
        sensitivity = k * max(level.numerator, level.denominator - level.numerator)
        rows = [rng.randint(-5, 45) for _ in range(rng.randint(0, 40))]
        patient = [rng.choice((-10, 0, 10, 15, 50)) for _ in range(k)]
        before = mechanisms.quantile_scores(cells_of(rows, edges), level)
        after = mechanisms.quantile_scores(cells_of(rows + patient, edges), level)
        moved = max(abs(a - b) for a, b in zip(after, before, strict=True))
        assert moved <= sensitivity
        reached.add(moved == sensitivity)
    assert reached == {True, False}


# -- the draws ----------------------------------------------------------------------------------------

def _component(epsilon: Fraction, q: float = 0.5, k: int = 1) -> mechanisms.Component:
    level = mechanisms.exact_level(q)
    sensitivity = k * max(level.numerator, level.denominator - level.numerator)
    return mechanisms.Component("choice", sensitivity, epsilon, mechanisms.selection_scale_for(sensitivity, epsilon),
                                level.denominator, (2 * 101 + 1,), level)


def test_the_draws_follow_the_exponential_mechanism_at_the_charged_epsilon() -> None:
    rng = random.Random(11)
    values = [min(max(round(rng.gauss(50, 10)), 0), 100) for _ in range(200)]
    edges = list(range(101))
    component = _component(Fraction(1, 10))
    cells = cells_of(values, edges)
    scores = mechanisms.quantile_scores(cells, component.level or Fraction(1, 2))
    draws = 4000
    chosen = mechanisms.Noise().select(component, tuple(cells) * draws)  # one draw per (identical) group
    errors = [(scores[i] - min(scores)) / component.unit for i in chosen]  # rank error beyond the best edge's

    def moments(scale: float) -> tuple[float, float]:
        p = noisy_max_probabilities(scores, scale)
        assert p.sum() == pytest.approx(1, abs=1e-6)
        error = (np.asarray(scores) - min(scores)) / component.unit
        mean = float((p * error).sum())
        return mean, math.sqrt(float((p * error ** 2).sum()) - mean ** 2)

    mean, sd = moments(component.scale)
    standard_error = sd / math.sqrt(draws)
    observed = sum(errors) / draws
    assert abs(observed - mean) < 5 * standard_error, (observed, mean, standard_error)
    for wrong in (component.scale / 2, component.scale * 2):  # epsilon twice or half what is charged
        assert abs(moments(wrong)[0] - mean) > 20 * standard_error
    bound = rank_error_95(component.scale / component.unit, len(edges))
    assert sum(e <= bound for e in errors) >= 0.95 * draws
    # and near the exact median: within a couple of years of age (bench: RMSE 2.0 at this size and epsilon)
    median = sorted(values)[len(values) // 2]
    assert math.sqrt(sum((edges[i] - median) ** 2 for i in chosen) / draws) < 3.5


def test_the_published_rank_bound_is_the_utility_theorem_s() -> None:
    component = _component(Fraction(1, 2), q=0.9, k=3)
    # scale 2 k max(q, 1 - q) / epsilon ranks; bound = scale ln(20 |C|)
    assert component.scale / component.unit == pytest.approx(2 * 3 * 0.9 / 0.5)
    assert rank_error_95(component.scale / component.unit, 83) == pytest.approx(10.8 * math.log(20 * 83))


# -- at a site ---------------------------------------------------------------------------------------

def test_a_site_selects_an_edge_gives_no_interval_and_charges_once(start_site, token, site_data) -> None:
    site = start_site()
    rows = sorted(a for (a,) in exact(site_data, "SELECT age_at_diagnosis FROM patients"))
    with client(site, token) as c:
        result = c.quantiles("patients", "age_at_diagnosis", qs=(0.5, 0.9), epsilon=1, method="exponential",
                             query_id="ssq-1")
        again = c.quantiles("patients", "age_at_diagnosis", qs=(0.5, 0.9), epsilon=1, method="exponential",
                            query_id="ssq-1")
        # the same aggregates without the flag are another release: not the stored answer, charged anew
        plain = c.query(structured={"dataset": "patients", "aggregates": [
            ("quantile", "age_at_diagnosis", {"q": 0.5}), ("quantile", "age_at_diagnosis", {"q": 0.9})]}, epsilon=1)
    assert isinstance(result, SiteQuantilesResult)
    assert result.frame.columns == ["q", "value", "ci_low", "ci_high", "rank_error_95"]
    assert result.epsilon_charged == 1
    assert again.cached and again.epsilon_charged == 0 and again.frame.equals(result.frame)
    assert not plain.cached and plain.response.rows[0].estimates[0].mechanism == "quantile(discrete_laplace)"
    assert site.state.ledger.total_spent() == pytest.approx(2)
    for row in result.frame.iter_rows(named=True):
        assert row["value"] in AGE_EDGES and row["ci_low"] is None and row["ci_high"] is None
        # two levels: half the epsilon each; k = 1; 83 edges
        assert row["rank_error_95"] == pytest.approx(2 * max(row["q"], 1 - row["q"]) / 0.5 * math.log(20 * 83))
        level = mechanisms.exact_level(row["q"])
        scores = mechanisms.quantile_scores(cells_of(rows, [int(e) for e in AGE_EDGES]), level)
        chosen = scores[AGE_EDGES.index(row["value"])]
        assert (chosen - min(scores)) / level.denominator <= row["rank_error_95"]
    estimate = result.response.rows[0].estimates[0]
    assert estimate.mechanism == "quantile(report_noisy_max_exponential)"
    assert any("no interval on the value" in note for note in result.notes)


def test_exact_selection_is_the_best_edge_of_the_rows_per_group(start_site, token, site_data) -> None:
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        result = c.query("SELECT sex, median(age_at_diagnosis), quantile(age_at_diagnosis, 0.25) FROM patients "
                         "GROUP BY sex", epsilon=1, single_site=True)
    for row in result.to_polars().iter_rows(named=True):
        ages = [a for (a,) in exact(site_data, f"SELECT age_at_diagnosis FROM patients WHERE sex = '{row['sex']}'")]
        for label, q in (("median(age_at_diagnosis)", 0.5), ("quantile(age_at_diagnosis; q=0.25)", 0.25)):
            scores, _ = opendp_scores(ages, [int(e) for e in AGE_EDGES], q)
            assert row[label] == AGE_EDGES[scores.index(min(scores))]


def test_a_dry_run_reports_the_rank_bound_and_charges_nothing(start_site, token) -> None:
    site = start_site()
    with client(site, token) as c:
        plan = c.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.1, method="exponential",
                           dry_run=True)
    assert plan.frame["value"].to_list() == [None]
    assert plan.frame["rank_error_95"][0] == pytest.approx(2 * 0.5 / 0.1 * math.log(20 * 83))
    assert site.state.ledger.total_spent() == 0


def test_auto_uses_the_mechanism_for_one_level_at_a_site_else_histograms(start_site, start_broker, token) -> None:
    site = start_site()
    with client(site, token) as c:
        assert isinstance(c.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.5), SiteQuantilesResult)
        # several levels would split the mechanism's epsilon: one histogram serves them all
        assert isinstance(c.quantiles("patients", "age_at_diagnosis", epsilon=0.5), QuantilesResult)
    broker = start_broker({"north": start_site(name="north")})
    with client(broker, token) as c:
        pooled = c.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.5)
    assert isinstance(pooled, QuantilesResult)
    assert pooled.frame["ci_low"][0] is not None


def test_auto_asks_for_the_histogram_where_the_site_s_policy_refuses_its_quantiles(start_site, token, site_data,
                                                                                    tmp_path) -> None:
    policy = example_policy()
    allowed = {kind: rule for kind, rule in policy.datasets["patients"].aggregates.items()
               if kind not in ("median", "quantile")}
    site = start_site(policy=write_policy(tmp_path, site_data, policy=with_dataset(policy, "patients",
                                                                                   aggregates=allowed)))
    with client(site, token) as c:
        result = c.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.5)
        with pytest.raises(PolicyViolation):  # asked for by name, the mechanism's refusal stands
            c.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.5, method="exponential")

    async def session() -> QuantilesResult | SiteQuantilesResult:
        async with AioClient(site.target, token=token()) as gw:
            return await gw.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.5)

    again = asyncio.run(session())
    for answer in (result, again):
        assert isinstance(answer, QuantilesResult) and answer.frame["ci_low"][0] is not None
    assert again.cached  # the same histogram: its stored answer
    assert site.state.ledger.total_spent() == pytest.approx(0.5)  # one histogram; no refusal charged


def test_the_asyncio_client_and_the_command_line_ask_for_it_too(start_site, token) -> None:
    site = start_site()

    async def session() -> QuantilesResult | SiteQuantilesResult:
        async with AioClient(site.target, token=token()) as gw:
            return await gw.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.2)

    asyncio_result = asyncio.run(session())
    assert isinstance(asyncio_result, SiteQuantilesResult) and asyncio_result.frame["value"][0] in AGE_EDGES
    shown = run_cli("query", "--target", site.target, "--single-site", "--epsilon", "0.2", "--json", "--sql",
                    "SELECT median(age_at_diagnosis) FROM patients", env={"GATEWAY_TOKEN": token()})
    assert shown.returncode == 0, shown.stderr
    cell = json.loads(shown.stdout)["rows"][0]["median(age_at_diagnosis)"]
    assert cell["value"] in AGE_EDGES and cell["ci95"] == [None, None]
    assert cell["rank_error_95"] == pytest.approx(2 * 0.5 / 0.2 * math.log(20 * 83))
    table = run_cli("query", "--target", site.target, "--single-site", "--epsilon", "0.2", "--sql",
                    "SELECT median(age_at_diagnosis) FROM patients", env={"GATEWAY_TOKEN": token()})
    assert "no interval; rank error ≤ 37 rows beyond the best edge's, 95%" in table.stdout, table.stdout
    assert site.state.ledger.total_spent() == pytest.approx(0.4)  # the table's call was the JSON's, stored


# -- refusals -----------------------------------------------------------------------------------------

def test_a_broker_refuses_single_site_quantiles_and_no_site_is_charged(start_site, start_broker, token) -> None:
    sites = {name: start_site(name=name) for name in ("north", "south")}
    with client(start_broker(sites), token) as c:
        with pytest.raises(FailedPrecondition) as info:
            c.quantiles("patients", "age_at_diagnosis", qs=(0.5,), epsilon=0.5, method="exponential")
        with pytest.raises(FailedPrecondition):
            c.query("SELECT median(age_at_diagnosis) FROM patients", epsilon=0.5, single_site=True)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert "single-site quantiles cannot be pooled" in info.value.message
    assert "ask the site directly" in info.value.message
    assert all(site.state.ledger.total_spent() == 0 for site in sites.values())


@pytest.mark.parametrize("sql", ["SELECT count(*) FROM patients", "SELECT histogram(age_at_diagnosis) FROM patients",
                                 "SELECT median(age_at_diagnosis), mean(age_at_diagnosis) FROM patients"])
def test_the_flag_on_another_kind_is_invalid_and_costs_nothing(start_site, token, sql) -> None:
    site = start_site()
    with client(site, token) as c, pytest.raises(InvalidQuery) as info:
        c.query(sql, epsilon=0.5, single_site=True)
    assert info.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "single_site applies to medians and quantiles only" in info.value.message
    assert site.state.ledger.total_spent() == 0


def test_unknown_methods_are_refused_before_any_call(start_site, token) -> None:
    site = start_site()
    with client(site, token) as c, pytest.raises(ValueError, match="method must be one of auto, histogram"):
        c.quantiles("patients", "age_at_diagnosis", method="laplace")
    assert site.state.ledger.total_spent() == 0


@pytest.mark.parametrize("relay", ["strips", "adds"])
def test_a_relay_cannot_add_or_strip_the_flag(start_site, stub_for, token, relay) -> None:
    site = start_site()
    request = pb.QueryRequest(query_id=f"relay-{relay}", sql="SELECT median(age_at_diagnosis) FROM patients",
                              epsilon=0.5, single_site=relay == "strips")
    signed_request = signed(request, token(), ("north",))
    before = request_digest(signed_request)
    signed_request.single_site = not signed_request.single_site
    assert request_digest(signed_request) != before
    with pytest.raises(grpc.RpcError) as info:
        stub_for(site).Query(signed_request, metadata=[("authorization", f"Bearer {token()}")])
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert site.state.ledger.total_spent() == 0


def test_the_single_site_kinds_are_the_median_and_the_quantile() -> None:
    assert sorted(SINGLE_SITE) == ["median", "quantile"]
    query = check_query(single("SELECT median(age_at_diagnosis) FROM patients"), example_policy())
    assert query.single_site and '"single_site":true' in query.canonical(Fraction(1))
    plain = check_query(parse_sql("SELECT median(age_at_diagnosis) FROM patients"), example_policy())
    assert "single_site" not in plain.canonical(Fraction(1))  # every other query keeps its stored answers' text
