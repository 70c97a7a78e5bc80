"""Pooling the sites' answers (gateway.broker.pooling), on messages built by hand.

The broker never sees a row: it adds the parts each site released (counts, sums, sums of squares),
adds their noise variances, and post-processes the pooled parts as the table of aggregate kinds
says. These tests give it answers whose pooled values are easy to work out on paper.
"""

from __future__ import annotations

import math
import random
import statistics

import pytest

from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway.answers import Z95
from gateway.broker.pooling import dataset_differences, pool

AGE = (18.0, 99.0)


# --- building the sites' answers --------------------------------------------------------------------


def estimate(function: str, label: str | None = None, bounds: tuple[float, float] | None = None,
             value: float = math.nan, std_error: float = math.nan, suppressed: bool = False,
             **parts: tuple[float, float]) -> pb.Estimate:
    """One site's estimate of kind ``function``, released as ``parts``: name=(value, std_error).

    Its own ``value`` and ``std_error`` are what the site reported; pooling must not need them.
    """
    message = pb.Estimate(aggregate=label or function, function=function, value=value, std_error=std_error,
                          mechanism="discrete_laplace", epsilon=0.5, suppressed=suppressed,
                          components=[pb.Component(name=name, values=[v], std_error=se, ci_half_width=Z95 * se,
                                                   noise_scale=se / math.sqrt(2))
                                      for name, (v, se) in parts.items()])
    if bounds is not None:
        message.has_bounds, message.lower, message.upper = True, bounds[0], bounds[1]
    return message


def row(*estimates: pb.Estimate, sex: str | None = None) -> pb.ResultRow:
    """A result row: the estimates of one group (``sex``), or of the whole dataset without a group-by."""
    keys = [] if sex is None else [pb.GroupKey(column="sex", value=pb.Value(string_value=sex))]
    return pb.ResultRow(keys=keys, estimates=list(estimates))


def answer(*rows: pb.ResultRow, dry_run: bool = False, epsilon_charged: float = 0.5, cached: bool = False,
           budget_remaining: float = 9.5) -> pb.QueryResponse:
    """One site's answer to the same query (grouped by sex when its rows have keys)."""
    grouped = any(r.keys for r in rows)
    return pb.QueryResponse(dataset="patients", group_by=["sex"] if grouped else [], aggregates=["count"],
                            rows=list(rows), dry_run=dry_run, epsilon_charged=epsilon_charged, cached=cached,
                            budget_remaining=budget_remaining, canonical_hash="c0ffee",
                            canonical_query='{"dataset":"patients"}', served_by="a site")


def count(value: float, std_error: float, suppressed: bool = False) -> pb.Estimate:
    if suppressed:  # a site withholds a suppressed cell's value and parts
        return estimate("count", value=math.nan, std_error=std_error, suppressed=True)
    return estimate("count", value=value, std_error=std_error, count=(value, std_error))


def pooled_cell(*site_estimates: pb.Estimate) -> pb.Estimate:
    """The pooled estimate of one cell that each site (s0, s1, ...) answered with one estimate."""
    answered = [(f"s{i}", answer(row(e))) for i, e in enumerate(site_estimates)]
    return pool(answered, "broker").rows[0].estimates[0]


# --- counts, sums, means --------------------------------------------------------------------------


def test_counts_add_and_their_std_errors_add_in_quadrature() -> None:
    got = pooled_cell(count(100, 3.0), count(200, 4.0))
    assert (got.value, got.std_error) == (300, 5.0)  # sqrt(3^2 + 4^2)
    assert got.ci_half_width == pytest.approx(Z95 * 5.0)
    assert (got.ci_low, got.ci_high) == pytest.approx((300 - Z95 * 5.0, 300 + Z95 * 5.0))
    assert got.mechanism == "pooled(discrete_laplace)" and got.function == "count" and got.aggregate == "count"
    assert math.isnan(got.noise_scale)  # no single mechanism's scale describes a sum of sites' noise
    assert not got.suppressed and not got.clamped


def test_three_sums_add_and_keep_their_column_bounds() -> None:
    sums = [estimate("sum", "sum(age_at_diagnosis)", AGE, sum=(v, se)) for v, se in ((1000, 2.0), (2000, 3.0),
                                                                                      (500, 6.0))]
    got = pooled_cell(*sums)
    assert (got.value, got.std_error) == (3500, 7.0)  # sqrt(4 + 9 + 36)
    assert got.aggregate == "sum(age_at_diagnosis)"
    assert (got.has_bounds, got.lower, got.upper) == (True, *AGE)


def test_pooled_components_say_what_was_added() -> None:
    got = pooled_cell(count(100, 3.0), count(200, 4.0))
    [component] = got.components
    assert (component.name, list(component.values), component.std_error) == ("count", [300.0], 5.0)
    assert component.ci_half_width == pytest.approx(Z95 * 5.0)
    assert math.isnan(component.noise_scale)


def test_a_pooled_mean_is_the_ratio_of_pooled_sums_and_counts() -> None:
    # site means 50 (of 10 patients) and 70 (of 30): the pooled mean is 65, not (50 + 70) / 2. Their
    # sums are of distances from the bounds' midpoint m: 10 x (50 - m) and 30 x (70 - m).
    m = sum(AGE) / 2
    a = estimate("mean", "mean(age_at_diagnosis)", AGE, value=50, sum=(10 * (50 - m), 20.0), count=(10, 2.0))
    b = estimate("mean", "mean(age_at_diagnosis)", AGE, value=70, sum=(30 * (70 - m), 30.0), count=(30, 3.0))
    got = pooled_cell(a, b)
    assert got.value == pytest.approx(65)
    # delta method: se(m + S / N) = sqrt(se(S)^2 + (S / N)^2 se(N)^2) / N, with the pooled parts' std errors
    sum_se, count_se = math.hypot(20, 30), math.hypot(2, 3)
    se = math.sqrt(sum_se ** 2 + (65 - m) ** 2 * count_se ** 2) / 40
    assert got.std_error == pytest.approx(se)
    # these parts do not say their noise's lattice: the interval falls back to the normal approximation
    assert (got.ci_low, got.ci_high) == pytest.approx((65 - Z95 * se, 65 + Z95 * se))
    assert [(c.name, list(c.values)) for c in got.components] == [("sum", [40 * (65 - m)]), ("count", [40.0])]
    assert [c.std_error for c in got.components] == pytest.approx([sum_se, count_se])


def test_a_pooled_mean_outside_its_bounds_is_clamped_into_them_with_its_interval() -> None:
    # pooled parts that say 120 for an age bounded by [18, 99]: the mean is 99, flagged, and the
    # interval (around 120 before clamping) is cut at the bound where the true mean must lie
    a = estimate("mean", bounds=AGE, sum=(1150, 10.0), count=(10, 1.0))
    b = estimate("mean", bounds=AGE, sum=(1250, 10.0), count=(10, 1.0))
    got = pooled_cell(a, b)
    assert got.value == AGE[1] and got.clamped
    assert AGE[0] <= got.ci_low <= got.ci_high == AGE[1]


def test_a_pooled_count_under_one_gives_a_mean_of_the_bounds_midpoint() -> None:
    a = estimate("mean", bounds=AGE, sum=(40, 10.0), count=(-2, 2.0))
    b = estimate("mean", bounds=AGE, sum=(30, 10.0), count=(2, 2.0))
    got = pooled_cell(a, b)
    assert got.value == (18 + 99) / 2 and got.std_error == (99 - 18) / 2
    assert got.clamped


# --- survival: vectors over a grid --------------------------------------------------------------------

GRID = (0.0, 12.0, 24.0)


def survival(events: list[float], censored: list[float], std_error: float, grid: tuple[float, ...] = GRID,
             suppressed: bool = False) -> pb.Estimate:
    """One site's survival estimate, released as its vector of counts (events, then censorings)."""
    return pb.Estimate(aggregate="survival(t, e)", function="survival", mechanism="kaplan_meier(discrete_laplace)",
                       epsilon=0.5, edges=grid, shape=[len(grid)], values=[math.nan] * len(grid),
                       suppressed=suppressed,
                       components=[pb.Component(name="counts", values=events + censored, shape=[2, len(grid)],
                                                std_error=std_error, ci_half_width=Z95 * std_error,
                                                noise_scale=std_error / math.sqrt(2))])


def test_survival_vectors_add_element_by_element_and_the_curve_is_the_pooled_counts() -> None:
    # 100 patients in all: at 12 months 10 of 100 die (S 0.9), then 40 are censored; at 24 months
    # 25 of the 50 left die (S 0.45), 25 are censored at the grid's end
    got = pooled_cell(survival([0, 6, 10], [0, 30, 10], 3.0), survival([0, 4, 15], [0, 10, 15], 4.0))
    [component] = got.components
    assert (list(component.values), list(component.shape)) == ([0, 10, 25, 0, 40, 25], [2, 3])
    assert component.std_error == 5.0
    assert list(got.values) == pytest.approx([1.0, 0.9, 0.45])
    assert list(got.shape) == [3] and list(got.edges) == list(GRID)
    assert all(low <= s <= high for low, s, high in zip(got.ci_lows, got.values, got.ci_highs, strict=True))
    assert got.value == 24 and got.mechanism == "pooled(kaplan_meier(discrete_laplace))"


def test_sites_on_different_grids_are_withheld_with_a_note() -> None:
    answered = [("s0", answer(row(survival([0, 6, 10], [0, 30, 10], 3.0)))),
                ("s1", answer(row(survival([1, 2, 3, 4], [0, 0, 0, 9], 3.0, grid=(0.0, 6.0, 12.0, 24.0)))))]
    pooled = pool(answered, "broker")
    got = pooled.rows[0].estimates[0]
    assert got.suppressed and not got.components and all(math.isnan(v) for v in got.values)
    assert pooled.notes[-1].startswith("survival(t, e): the sites declare different grids (s0 0..24 (3 times, ")
    assert [len(a.rows[0].estimates[0].components) for a in pooled.site_answers] == [1, 1]


def _spread_parts(values: list[float], center: float) -> dict[str, tuple[float, float]]:
    """Exact variance parts of ``values`` (sums taken about ``center``, as the sites do; no noise)."""
    return {"sum": (sum(v - center for v in values), 0.0),
            "sum_squares": (sum((v - center) ** 2 for v in values), 0.0), "count": (len(values), 0.0)}


@pytest.mark.parametrize("function", ["variance", "stddev"])
def test_variance_and_stddev_pool_their_parts_not_their_values(function: str) -> None:
    a, b = [20.0, 25.0, 31.0], [60.0, 64.0, 71.0, 80.0]
    both = pooled_cell(estimate(function, bounds=AGE, **_spread_parts(a, 58.5)),
                       estimate(function, bounds=AGE, **_spread_parts(b, 58.5)))
    union = statistics.variance(a + b) if function == "variance" else statistics.stdev(a + b)
    assert both.value == pytest.approx(union)  # far above either site's own spread
    assert [c.name for c in both.components] == ["sum", "sum_squares", "count"]


# --- suppression, dry runs ------------------------------------------------------------------------


@pytest.mark.parametrize("suppressed_at", [0, 1])
def test_a_cell_suppressed_at_any_site_is_suppressed_when_pooled(suppressed_at: int) -> None:
    cells = [count(100, 3.0), count(200, 4.0)]
    cells[suppressed_at] = count(3, 4.0, suppressed=True)
    got = pooled_cell(*cells)
    assert got.suppressed
    assert all(math.isnan(x) for x in (got.value, got.ci_low, got.ci_high, got.std_error, got.ci_half_width))
    assert list(got.components) == []


def test_suppression_is_per_cell() -> None:
    a = answer(row(count(100, 3.0), sex="F"), row(count(2, 3.0, suppressed=True), sex="M"))
    b = answer(row(count(200, 4.0), sex="F"), row(count(50, 4.0), sex="M"))
    female, male = pool([("a", a), ("b", b)], "broker").rows
    assert not female.estimates[0].suppressed and female.estimates[0].value == 300
    assert male.estimates[0].suppressed


def test_a_dry_run_pools_the_predicted_accuracy_and_no_value() -> None:
    # a dry run releases nothing: no value, no parts, only each site's predicted std error
    a = answer(row(estimate("count", std_error=3.0)), dry_run=True)
    b = answer(row(estimate("count", std_error=4.0)), dry_run=True)
    pooled = pool([("a", a), ("b", b)], "broker")
    got = pooled.rows[0].estimates[0]
    assert pooled.dry_run
    assert got.std_error == 5.0 and got.ci_half_width == pytest.approx(Z95 * 5.0)
    assert math.isnan(got.value) and math.isnan(got.ci_low) and math.isnan(got.ci_high)
    assert list(got.components) == []


# --- groups ---------------------------------------------------------------------------------------


def test_a_group_missing_at_one_site_is_pooled_over_the_sites_that_have_it() -> None:
    # site b's policy has no public key "M" for sex: its answer has no such row
    a = answer(row(count(100, 3.0), sex="F"), row(count(80, 3.0), sex="M"))
    b = answer(row(count(200, 4.0), sex="F"))
    female, male = pool([("a", a), ("b", b)], "broker").rows
    assert (female.estimates[0].value, female.estimates[0].std_error) == (300, 5.0)
    assert (male.estimates[0].value, male.estimates[0].std_error) == (80, 3.0)
    assert male.keys[0].value.string_value == "M"


def test_groups_are_matched_by_their_keys_not_their_position() -> None:
    a = answer(row(count(100, 3.0), sex="F"), row(count(80, 3.0), sex="M"))
    b = answer(row(count(20, 4.0), sex="M"), row(count(200, 4.0), sex="F"))
    rows = pool([("a", a), ("b", b)], "broker").rows
    assert [(r.keys[0].value.string_value, r.estimates[0].value) for r in rows] == [("F", 300), ("M", 100)]


# --- the response around the rows -----------------------------------------------------------------


def test_each_sites_answer_is_kept_beside_the_pooled_one() -> None:
    a = answer(row(count(100, 3.0), sex="F"), epsilon_charged=0.5, budget_remaining=9.5, cached=True)
    b = answer(row(count(200, 4.0), sex="F"), epsilon_charged=0.5, budget_remaining=2.0, cached=False)
    pooled = pool([("north", a), ("south", b)], "the-broker")
    assert list(pooled.sites) == ["north", "south"]
    assert [s.site for s in pooled.site_answers] == ["north", "south"]
    assert [list(s.rows) for s in pooled.site_answers] == [list(a.rows), list(b.rows)]
    assert [(s.epsilon_charged, s.budget_remaining, s.cached) for s in pooled.site_answers] == \
        [(0.5, 9.5, True), (0.5, 2.0, False)]


def test_the_pooled_response_describes_the_query_and_the_tightest_budget() -> None:
    a = answer(row(count(100, 3.0), sex="F"), budget_remaining=9.5, cached=True)
    b = answer(row(count(200, 4.0), sex="F"), budget_remaining=2.0, cached=True)
    pooled = pool([("north", a), ("south", b)], "the-broker")
    assert (pooled.dataset, list(pooled.group_by), list(pooled.aggregates)) == ("patients", ["sex"], ["count"])
    assert (pooled.canonical_hash, pooled.canonical_query) == (a.canonical_hash, a.canonical_query)
    assert pooled.served_by == "the-broker" and not pooled.dry_run
    assert pooled.epsilon_charged == 0.5 and pooled.budget_remaining == 2.0
    assert pooled.cached  # every site answered from its stored answers
    fresh = pool([("north", a), ("south", answer(row(count(200, 4.0), sex="F"), cached=False))], "the-broker")
    assert not fresh.cached


# --- dataset_differences ------------------------------------------------------------------------------


def dataset(aggregates: tuple[str, ...] = ("count", "sum", "mean"), age: tuple[float, float] = AGE,
            ages: range = range(18, 100), stages: tuple[str, ...] = ("I", "II", "III", "IV"), with_bmi: bool = True,
            max_rows_per_unit: int = 1, epsilon: tuple[float, float] = (0.5, 1.0)) -> pb.Dataset:
    """One site's description of ``patients``, as a site lists it."""
    columns = [
        pb.Column(name="age", type="integer", roles=["filter", "group_by", "aggregate"], has_bounds=True,
                  lower=age[0], upper=age[1], public_keys=[pb.Value(int_value=a) for a in ages]),
        pb.Column(name="stage", type="string", roles=["filter", "group_by"],
                  public_keys=[pb.Value(string_value=s) for s in stages]),
    ]
    if with_bmi:
        columns.append(pb.Column(name="bmi", type="float", roles=["aggregate"], has_bounds=True, lower=15,
                                 upper=50))
    return pb.Dataset(name="patients", privacy_unit="patient_id", max_rows_per_unit=max_rows_per_unit,
                      columns=columns, aggregates=list(aggregates), epsilon_default=epsilon[0],
                      epsilon_max=epsilon[1])


def test_sites_that_declare_a_dataset_alike_have_no_differences() -> None:
    assert dataset_differences({"a": dataset(), "b": dataset(), "c": dataset()}) == []


def test_different_bounds_are_one_line_naming_each_site() -> None:
    differences = dataset_differences({"a": dataset(), "b": dataset(age=(0, 120)), "c": dataset()})
    assert differences == ["column age bounds: a [18, 99]; b [0, 120]; c [18, 99]"]


def test_different_public_keys_are_one_line_with_count_ends_and_digest() -> None:
    [line] = dataset_differences({"a": dataset(), "b": dataset(ages=range(0, 121))})
    assert line.startswith("column age keys: a 82 keys (18..99, #")
    assert "; b 121 keys (0..120, #" in line


def test_keys_in_another_order_differ_by_their_digest() -> None:
    [line] = dataset_differences({"a": dataset(), "b": dataset(stages=("I", "III", "II", "IV"))})
    first, second = line.removeprefix("column stage keys: ").split("; ")
    assert first.startswith("a 4 keys (I..IV, #") and second.startswith("b 4 keys (I..IV, #")
    assert first.removeprefix("a ") != second.removeprefix("b ")


def test_different_aggregates_rows_and_epsilon_are_reported() -> None:
    differences = dataset_differences({"a": dataset(), "b": dataset(aggregates=("count",), max_rows_per_unit=5,
                                                                     epsilon=(0.25, 1.0))})
    assert differences == ["aggregates: a count, sum, mean; b count",
                           "epsilon per query: a default 0.5, max 1; b default 0.25, max 1",
                           "max rows per patient: a 1; b 5"]


def test_a_column_one_site_lacks_is_reported_absent_there() -> None:
    differences = dataset_differences({"a": dataset(), "b": dataset(with_bmi=False)})
    assert differences == ["column bmi: a float (aggregate); b absent", "column bmi bounds: a [15, 50]; b absent"]


def test_noisy_pooled_means_always_lie_within_the_bounds() -> None:
    """At a small epsilon the pooled noisy sum over the pooled noisy count can say anything (once, an
    age of 4,622 years); the answer stays inside [18, 99], and so does its interval."""
    rng = random.Random(11)
    for _ in range(300):
        parts = [estimate("mean", bounds=AGE, sum=(rng.gauss(600, 400), 400.0), count=(rng.gauss(10, 8), 8.0))
                 for _ in range(4)]
        got = pooled_cell(*parts)
        assert AGE[0] <= got.value <= AGE[1]
        assert AGE[0] <= got.ci_low <= got.value <= got.ci_high <= AGE[1]
