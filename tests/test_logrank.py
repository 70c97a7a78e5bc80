"""The log-rank test between a survival answer's groups (:mod:`gateway.logrank`), noise accounted for.

Without noise the statistic is lifelines' ``logrank_test`` / ``multivariate_logrank_test`` on the
rows with their times moved up to the grid, directly and through a site. With noise, over many
simulated federations of four sites under the null (noised by OpenDP's sampler, as sites do), the
bootstrap p-value rejects at 5% in 2-8% of them at epsilon 0.1 and 1, where the chi-square p-value
of the same statistic rejects far more often, and where a bootstrap with half (twice) the noise
rejects too often (too rarely): the calibration is what makes the test sound, and it needs the
right noise. A clear difference in hazards is found at epsilon 1; one group, empty groups, bins
with nobody at risk, withheld cells, dry runs and more groups than it compares give a clear
answer, and many groups over a fine grid are simulated in bounded memory.
"""

from __future__ import annotations

import math
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from lifelines.statistics import logrank_test, multivariate_logrank_test
from scipy.stats import chi2

from gateway import _mechanisms as mechanisms
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway.answers import discrete_laplace_std
from gateway.logrank import DRAWS, MAX_GROUPS, _discrete_laplace, _site_sources, logrank, logrank_of, statistic
from gateway.render import query_json, query_table
from tests.helpers.data import exact
from tests.helpers.policies import write_policy
from tests.helpers.servers import ExactNoise, client

GRID = tuple(float(t) for t in range(121))  # the example policies' grid: monthly to 120 months


def binned(times: Sequence[float], events: Sequence[int], edges: Sequence[float]) -> tuple[list[int], list[int]]:
    """Events and censorings at each grid time (a time counts at the first grid time at or after it)."""
    d, c = [0] * len(edges), [0] * len(edges)
    for t, e in zip(times, events, strict=True):
        if t > edges[-1]:
            c[-1] += 1
        else:
            (d if e else c)[int(np.searchsorted(edges, t))] += 1
    return d, c


def snapped(times: Sequence[float], events: Sequence[int], edges: Sequence[float]) -> tuple[list[float], list[int]]:
    """The rows with their times moved up to the grid (past its end: censored at its end)."""
    out_t, out_e = [], []
    for t, e in zip(times, events, strict=True):
        if t > edges[-1]:
            out_t.append(edges[-1])
            out_e.append(0)
        else:
            out_t.append(edges[int(np.searchsorted(edges, t))])
            out_e.append(e)
    return out_t, out_e


def cohort(rng: np.random.Generator, n: int, scale: float) -> tuple[list[float], list[int]]:
    """Exponential deaths with uniform censoring: (times, events)."""
    death, censor = rng.exponential(scale, n), rng.uniform(0, 40, n)
    return list(np.minimum(death, censor)), [int(x) for x in death <= censor]


# --- without noise: lifelines --------------------------------------------------------------------------------

@pytest.mark.parametrize("groups", [2, 3, 5])
@pytest.mark.parametrize("edges", [tuple(range(0, 37, 3)), GRID[:25], (0.0, 1.5, 4.0, 10.0, 30.0)],
                         ids=["quarterly", "monthly", "uneven"])
def test_without_noise_the_statistic_is_lifelines_on_the_snapped_rows(groups, edges) -> None:
    rng = np.random.default_rng(groups * 100 + len(edges))
    rows = [cohort(rng, int(rng.integers(20, 200)), 15 + 5 * g) for g in range(groups)]
    events, censored = zip(*(binned(t, e, edges) for t, e in rows), strict=True)
    snaps = [snapped(t, e, edges) for t, e in rows]
    if groups == 2:
        want = logrank_test(snaps[0][0], snaps[1][0], snaps[0][1], snaps[1][1])
    else:
        times = [t for ts, _ in snaps for t in ts]
        labels = [g for g, (ts, _) in enumerate(snaps) for _ in ts]
        want = multivariate_logrank_test(times, labels, [e for _, es in snaps for e in es])
    got = logrank(events, censored, [[(0.0, 1.0)]] * groups)
    assert got.statistic == pytest.approx(want.test_statistic, abs=1e-6, rel=1e-9)
    assert got.df == groups - 1
    # without noise, the bootstrap of the standard statistic is the chi-square's p-value, up to its draws
    assert got.p_value == pytest.approx(want.p_value, abs=0.03)


def test_a_site_without_noise_gives_lifelines_test_between_stages(start_site, token, site_data: Path) -> None:
    site = start_site(noise=ExactNoise())
    with client(site, token) as c:
        result = c.survival("patients", time="survival_months", event="death", by="stage", epsilon=1)
    rows = exact(site_data, "SELECT survival_months, death, stage FROM patients WHERE stage IN ('I','II','III','IV')")
    times, events = snapped([t for t, _, _ in rows], [e for _, e, _ in rows], GRID)
    want = multivariate_logrank_test(times, [s for _, _, s in rows], events)
    test = result.logrank
    assert test.statistic == pytest.approx(want.test_statistic, abs=1e-6, rel=1e-9)
    assert test.df == 3 and test.groups == (("I",), ("II",), ("III",), ("IV",))
    assert 0 < test.p_value <= 1 / (DRAWS + 1) and test.draws == DRAWS  # the stages differ plainly
    assert result.logrank is test  # computed once per result
    table = query_table(result.response)
    assert "survival(survival_months, death): log-rank between 4 groups: chi-square" in table
    assert "p <= 0.0005" in table
    json = query_json(result.response)["logrank"]["survival(survival_months, death)"]
    assert json["df"] == 3 and json["statistic"] == pytest.approx(want.test_statistic, rel=1e-9)


# --- with noise: the null's rejection rate -------------------------------------------------------------------

def federation(rng: np.random.Generator, sizes: Sequence[int], hazard: Sequence[float],
               censoring: Sequence[Sequence[float]], sites: int) -> tuple[np.ndarray, np.ndarray]:
    """Each site's exact (events, censorings), shaped (sites, groups, times): every group has ``hazard``."""
    shape = (sites, len(sizes), len(hazard))
    events, censored = np.zeros(shape, dtype=np.int64), np.zeros(shape, dtype=np.int64)
    alive = np.stack([rng.multinomial(n, [1 / sites] * sites) for n in sizes], axis=1)
    last = len(hazard) - 1
    for j, h in enumerate(hazard):
        events[:, :, j] = died = rng.binomial(alive, h)
        q = np.array([c[j] for c in censoring])
        censored[:, :, j] = lost = alive - died if j == last else rng.binomial(alive - died, q)
        alive = alive - died - lost
    return events, censored


def released(events: np.ndarray, censored: np.ndarray, scale: float, rng: np.random.Generator
             ) -> tuple[np.ndarray, np.ndarray]:
    """What the broker pools: each site's counts with discrete Laplace noise at ``scale``, summed over sites.

    The noise is the bootstrap's own sampler, seeded, so that the rates below are reproducible;
    ``test_the_null_draws_noise_is_opendps_discrete_laplace`` holds it to OpenDP's, which sites use.
    """
    noisy_d = events + _discrete_laplace(rng, scale, 1.0, events.shape)  # one draw per site and count
    noisy_c = censored + _discrete_laplace(rng, scale, 1.0, censored.shape)
    return noisy_d.sum(0), noisy_c.sum(0)


def rejection_rates(epsilon: float, sizes: Sequence[int], censoring: Sequence[Sequence[float]], runs: int,
                    seed: int, assumed: float = 1.0, draws: int = 199) -> tuple[float, float]:
    """(bootstrap, chi-square) rejection rates at 5% over ``runs`` federations of 4 sites under the null.

    The bootstrap is told the noise's scale times ``assumed`` (1: the truth).
    """
    rng = np.random.default_rng(seed)
    scale = 1 / epsilon  # one row per patient: sensitivity 1
    hazard = [0.06] * len(censoring[0])
    bootstrap = naive = 0
    for run in range(runs):
        d, c = released(*federation(rng, sizes, hazard, censoring, 4), scale, rng)
        test = logrank(d, c, [[(scale * assumed, 1.0)] * 4] * len(sizes), draws=draws, seed=run)
        bootstrap += test.p_value <= 0.05
        naive += chi2.sf(test.statistic, test.df) <= 0.05
    return bootstrap / runs, naive / runs


SCENARIOS = {
    "2 equal groups": ([300, 300], [[0.03] * 24] * 2),
    "3 groups, unequal sizes and censoring": ([150, 400, 300], [[0.03] * 24, [0.15] * 24, [0.0] * 24]),
}


@pytest.mark.parametrize("epsilon", [0.1, 1.0])
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_under_the_null_the_calibrated_test_rejects_at_its_level_and_the_chi_square_does_not(epsilon,
                                                                                              scenario) -> None:
    sizes, censoring = SCENARIOS[scenario]
    calibrated, naive = rejection_rates(epsilon, sizes, censoring, runs=600, seed=int(epsilon * 10))
    # 600 runs: the rate's standard error at 5% is 0.9 points, so [2%, 8%] holds a right test
    assert 0.02 <= calibrated <= 0.08, calibrated
    # measured (calibrated, chi-square): 2 groups 0.042, 0.807 at epsilon 0.1 and 0.033, 0.175 at 1;
    # 3 groups 0.042, 0.960 and 0.038, 0.395
    assert naive > 0.08, naive  # the chi-square p-value of the same statistic fails the same check


def test_where_censoring_differs_sharply_the_level_is_kept_only_roughly() -> None:
    """The weak point, measured: one group loses 30% a month to censoring early on, at epsilon 0.5.

    Its censoring is estimated from noisy counts; the test rejected 7-10% of true nulls at 5% here
    over several seeds (4.6% with the true censoring hazards), the chi-square p-value 60-65%.
    """
    censoring = [[0.3] * 4 + [0.01] * 20, [0.01] * 24]
    calibrated, naive = rejection_rates(0.5, [300, 300], censoring, runs=400, seed=5)
    assert 0.03 <= calibrated <= 0.11, calibrated
    assert naive > 0.4, naive


@pytest.mark.parametrize(("assumed", "epsilon"), [(0.5, 0.1), (0.5, 1.0), (2.0, 1.0)])
def test_a_bootstrap_with_the_wrong_noise_misses_the_level(assumed, epsilon) -> None:
    """Half the noise rejects a true null too often, twice the noise too rarely: the scale matters."""
    sizes, censoring = SCENARIOS["2 equal groups"]
    calibrated, _ = rejection_rates(epsilon, sizes, censoring, runs=300, seed=7, assumed=assumed)
    assert calibrated > 0.08 if assumed < 1 else calibrated < 0.02, calibrated


def test_the_null_draws_noise_is_opendps_discrete_laplace() -> None:
    """The bootstrap's sampler against OpenDP's on the same scale: spread and tails."""
    rng = np.random.default_rng(3)
    for scale in (0.5, 2.0, 10.0):
        ours = _discrete_laplace(rng, scale, 1.0, (100_000,))
        theirs = np.asarray(mechanisms.measurement(scale)([0] * 100_000), dtype=float)
        assert ours.std() == pytest.approx(discrete_laplace_std(scale), rel=0.02)
        assert theirs.std() == pytest.approx(ours.std(), rel=0.03)
        tail = 2 * scale
        assert np.mean(np.abs(ours) > tail) == pytest.approx(np.mean(np.abs(theirs) > tail), abs=0.005)
        assert np.all(ours == np.round(ours))  # on the integers, as the counts' noise is
        # four sites' noises at once (negative binomials) are the sum of four of OpenDP's
        four = _discrete_laplace(rng, scale, 1.0, (30_000,), terms=4)
        summed = np.asarray(mechanisms.measurement(scale)([0] * 120_000), dtype=float).reshape(4, -1).sum(0)
        assert four.std() == pytest.approx(2 * discrete_laplace_std(scale), rel=0.03)
        assert np.mean(np.abs(four) > 2 * tail) == pytest.approx(np.mean(np.abs(summed) > 2 * tail), abs=0.01)


# --- power ---------------------------------------------------------------------------------------------------

def test_a_clear_hazard_difference_is_found_at_epsilon_1() -> None:
    rng = np.random.default_rng(11)
    months = 24
    events = np.zeros((4, 2, months), dtype=np.int64)
    censored = np.zeros_like(events)
    for g, hazard in enumerate((0.04, 0.07)):  # a hazard ratio of 1.75
        d, c = federation(rng, [300], [hazard] * months, [[0.02] * months], 4)
        events[:, g], censored[:, g] = d[:, 0], c[:, 0]
    d, c = released(events, censored, 1.0, rng)
    test = logrank(d, c, [[(1.0, 1.0)] * 4] * 2)
    assert test.p_value < 0.01, test


# --- edge cases ----------------------------------------------------------------------------------------------

def test_one_group_is_no_test_and_says_why() -> None:
    test = logrank([[5, 3, 1]], [[1, 0, 10]], [[(1.0, 1.0)]])
    assert math.isnan(test.statistic) and math.isnan(test.p_value) and test.df == 0
    assert "one group" in test.note and "no test" in str(test)


def test_an_empty_group_and_times_with_nobody_at_risk_give_a_finite_test() -> None:
    events = [[10, 5, 0, 0], [12, 3, 0, 0], [0, 0, 0, 0]]  # nobody left after the second time; a group is empty
    censored = [[2, 83, 0, 0], [5, 80, 0, 0], [0, 0, 0, 0]]
    exact_two = statistic(np.array(events[:2], float), np.array(censored[:2], float))
    test = logrank(events, censored, [[(0.0, 1.0)]] * 3)
    assert test.statistic == pytest.approx(float(exact_two))  # the empty group adds nothing, but a degree of freedom
    assert test.df == 2 and 0 < test.p_value <= 1
    noisy = logrank([[-3, 40, -2], [4, -1, 2]], [[-5, 2, 1], [0, -8, -3]], [[(2.0, 1.0)]] * 2)
    assert math.isfinite(noisy.statistic) and noisy.statistic >= 0 and 0 < noisy.p_value <= 1


@pytest.mark.parametrize("bad", [math.nan, math.inf, 1e300])
def test_counts_no_registry_could_hold_give_no_test_not_a_crash(bad) -> None:
    test = logrank([[5, bad, 1], [4, 2, 2]], [[1, 0, 10], [3, 3, 3]], [[(1.0, 1.0)]] * 2)
    assert math.isnan(test.p_value) and "not numbers of patients" in test.note


def test_more_groups_than_it_compares_give_no_test_not_a_hang() -> None:
    groups = MAX_GROUPS + 1
    test = logrank([[5, 3, 1]] * groups, [[1, 0, 10]] * groups, [[(1.0, 1.0)]] * groups)
    assert math.isnan(test.p_value) and f"{groups} groups" in test.note and len(test.groups) == groups


def test_many_groups_over_a_fine_grid_are_simulated_in_bounded_memory() -> None:
    """20 groups over 400 times: 1,999 draws at once would hold arrays of 128 MB each; in batches, 16 MB."""
    rng = np.random.default_rng(2)
    d, c = released(*federation(rng, [60] * 20, [0.005] * 400, [[0.002] * 400] * 20, 2), 1.0, rng)
    tracemalloc.start()
    try:
        test = logrank(d, c, [[(1.0, 1.0)] * 2] * 20)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert test.df == 19 and 0 < test.p_value <= 1
    assert peak < 200 * 2**20, peak


def test_the_same_answer_gives_the_same_p_value() -> None:
    rng = np.random.default_rng(5)
    d, c = released(*federation(rng, [100, 100], [0.1] * 10, [[0.05] * 10] * 2, 4), 2.0, rng)
    sources = [[(2.0, 1.0)] * 4] * 2
    first, again = logrank(d, c, sources), logrank(d.copy(), c.copy(), sources)
    assert first == again
    assert logrank(d, c, sources, seed=1).p_value != first.p_value or first.p_value == 1.0


def _response(rows: Sequence[tuple[str, list[float], bool]], sites: Sequence[tuple[str, float]] = ()
              ) -> pb.QueryResponse:
    """A survival answer: rows of (stage, 2m counts, withheld); ``sites``: (name, scale) answers behind a pool."""
    response = pb.QueryResponse(group_by=["stage"], aggregates=["survival(t, e)"])
    for stage, counts, withheld in rows:
        e = pb.Estimate(aggregate="survival(t, e)", function="survival", suppressed=withheld,
                        edges=[0.0, 12.0, 24.0], noise_scale=math.nan if sites else 2.0)
        if not withheld:
            e.components.add(name="counts", values=counts, shape=[2, 3], std_error=1.0, noise_scale=2.0,
                             lattice=0.0 if sites else 1.0)
        response.rows.add(keys=[pb.GroupKey(column="stage", value=pb.Value(string_value=stage))], estimates=[e])
    for name, scale in sites:
        answer = response.site_answers.add(site=name)
        for row in response.rows:
            answer.rows.add(keys=row.keys, estimates=[pb.Estimate(function="survival", noise_scale=scale)])
    return response


def test_withheld_groups_are_left_out_and_named() -> None:
    counts = [[20, 10, 5, 3, 2, 60], [30, 15, 8, 2, 1, 44], [1, 0, 0, 0, 0, 2]]
    response = _response([("I", counts[0], False), ("II", counts[1], False), ("III", counts[2], True)])
    test = logrank_of(response)
    assert test.groups == (("I",), ("II",)) and test.left_out == (("III",),)
    assert test.df == 1 and "III" in test.note
    only_one = logrank_of(_response([("I", counts[0], False), ("III", counts[2], True)]))
    assert math.isnan(only_one.statistic) and "withheld" in only_one.note and "one group" in only_one.note


def test_a_pooled_answer_takes_each_sites_noise_from_the_sites_answers() -> None:
    response = _response([("I", [20, 10, 5, 3, 2, 60], False), ("II", [30, 15, 8, 2, 1, 44], False)],
                         sites=[("north", 2.0), ("south", 4.0)])
    assert _site_sources(response, response.rows[0], 0, 1.0) == [(2.0, 1.0), (4.0, 1.0)]
    del response.site_answers[1].rows[1]  # south has no stage II
    assert _site_sources(response, response.rows[1], 0, 1.0) == [(2.0, 1.0)]
    assert logrank_of(response).df == 1


def test_a_dry_run_has_no_test() -> None:
    response = _response([("I", [0] * 6, False), ("II", [0] * 6, False)])
    response.dry_run = True
    assert "dry run" in logrank_of(response).note


# --- through a broker, with the sites' real noise ------------------------------------------------------------

def test_a_pooled_answer_carries_the_test_in_the_same_call(start_site, start_broker, token, tmp_path,
                                                           site_data: Path) -> None:
    south = write_policy(tmp_path, site_data, site="south")
    broker = start_broker({"north": start_site(name="north"), "south": start_site(policy=south)})
    with client(broker, token) as c:
        result = c.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5)
        again = c.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5)
    assert again.cached and again.logrank == result.logrank  # the stored answer, the same p-value
    assert result.logrank.df == 3 and result.logrank.p_value <= 0.001  # the stages differ plainly
    sources = _site_sources(result.response, result.response.rows[0], 0, 1.0)
    assert sources == [(pytest.approx(2.0), 1.0)] * 2  # each site's scale at epsilon 0.5, on the integers
    assert "log-rank between 4 groups" in repr(result)
