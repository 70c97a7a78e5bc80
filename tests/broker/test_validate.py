"""The broker's checks of a site's answer before pooling (gateway.broker._validate), on messages built by hand.

Each case corrupts one field of an answer a site could have sent and names the phrase of the
reason the broker gives; an honest answer of any kind passes. End to end, with a real lying
site in front of the broker, see test_faults.py.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway.answers import Z95
from gateway.broker._validate import check_answer, invalid_answers
from gateway.errors import InvalidAnswer

AGE = (18.0, 99.0)
REQUEST = pb.QueryRequest(query_id="q-1", structured=pb.StructuredQuery(
    dataset="patients", group_by=["sex"],
    aggregates=[pb.Aggregate(function="count"), pb.Aggregate(function="mean", column="age_at_diagnosis")]))


def _component(name: str, value: float, std_error: float) -> pb.Component:
    return pb.Component(name=name, values=[value], std_error=std_error, ci_half_width=Z95 * std_error,
                        noise_scale=std_error / math.sqrt(2))


def _row(sex: str, count: float, total: float, dry_run: bool = False) -> pb.ResultRow:
    counted = pb.Estimate(aggregate="count", function="count", value=count, std_error=2.8, ci_low=count - 5,
                          ci_high=count + 5, ci_half_width=5, mechanism="discrete_laplace", epsilon=0.25,
                          components=[_component("count", count, 2.8)])
    mean = pb.Estimate(aggregate="mean(age_at_diagnosis)", function="mean", value=total / count, std_error=0.4,
                       ci_low=total / count - 0.8, ci_high=total / count + 0.8, ci_half_width=0.8,
                       mechanism="ratio(discrete_laplace)", epsilon=0.25, has_bounds=True, lower=AGE[0],
                       upper=AGE[1], components=[_component("sum", total, 560.0), _component("count", count, 5.6)])
    if dry_run:
        for e in (counted, mean):
            e.value = e.ci_low = e.ci_high = math.nan
            del e.components[:]
        mean.std_error = mean.ci_half_width = math.nan  # a mean's accuracy is not known before it runs
    return pb.ResultRow(keys=[pb.GroupKey(column="sex", value=pb.Value(string_value=sex))],
                        estimates=[counted, mean])


def honest(dry_run: bool = False) -> pb.QueryResponse:
    """What a site answers to :data:`REQUEST`."""
    return pb.QueryResponse(dataset="patients", group_by=["sex"], aggregates=["count", "mean(age_at_diagnosis)"],
                            rows=[_row("F", 2040, 122_400, dry_run), _row("M", 1960, 113_680, dry_run)],
                            epsilon_charged=0.5, budget_remaining=9.5, dry_run=dry_run, canonical_hash="c0ffee",
                            served_by="a site", suppression_min_count=5)


def _more_rows(r: pb.QueryResponse, n: int) -> None:
    for i in range(n):
        row = r.rows.add()
        row.CopyFrom(r.rows[0])
        row.keys[0].value.string_value = f"x{i}"


def _set(path: str, value: object) -> Callable[[pb.QueryResponse], None]:
    """A corruption that sets the field at ``path`` (dots; numbers index repeated fields) to ``value``."""
    def corrupt(r: pb.QueryResponse) -> None:
        *parents, last = path.split(".")
        target: Any = r
        for part in parents:
            target = target[int(part)] if part.isdigit() else getattr(target, part)
        if last.isdigit():
            target[int(last)] = value
        else:
            setattr(target, last, value)
    return corrupt


CASES: dict[str, tuple[Callable[[pb.QueryResponse], None], str]] = {
    "a NaN component": (_set("rows.0.estimates.0.components.0.values.0", math.nan), "component count is nan"),
    "an infinite component": (_set("rows.1.estimates.1.components.0.values.0", math.inf), "component sum is inf"),
    "an absurd component": (_set("rows.0.estimates.1.components.0.values.0", -1e300), "component sum is -1e+300"),
    "a negative std_error": (_set("rows.0.estimates.0.components.0.std_error", -1.0),
                             "component count's std_error is -1.0"),
    "a NaN std_error": (_set("rows.0.estimates.0.components.0.std_error", math.nan),
                        "component count's std_error is nan"),
    "an infinite value": (_set("rows.0.estimates.1.value", math.inf), "its value is inf"),
    "an infinite interval": (_set("rows.0.estimates.1.ci_high", math.inf), "its ci_high is inf"),
    "a NaN epsilon charged": (_set("epsilon_charged", math.nan), "its epsilon_charged is nan"),
    "a negative epsilon charged": (_set("epsilon_charged", -0.5), "its epsilon_charged is -0.5"),
    "an infinite budget": (_set("budget_remaining", math.inf), "its budget_remaining is inf"),
    "a negative estimate epsilon": (_set("rows.0.estimates.0.epsilon", -1.0), "its epsilon is -1.0"),
    "no bounds on a mean": (_set("rows.0.estimates.1.has_bounds", False), "column bounds are missing"),
    "inverted bounds": (_set("rows.0.estimates.1.lower", 200.0), "column bounds are [200.0, 99.0]"),
    "no components": (lambda r: r.rows[0].estimates[1].ClearField("components"),
                      "it releases components [], not ['count', 'sum']"),
    "a component too many": (lambda r: r.rows[0].estimates[0].components.append(_component("sum", 1, 1)),
                             "it releases components ['count', 'sum'], not ['count']"),
    "two values in a component": (lambda r: r.rows[0].estimates[0].components[0].values.append(1.0),
                                  "component count has 2 values for its shape []"),
    "a vector shape on a scalar kind": (lambda r: r.rows[0].estimates[0].components[0].shape.append(1),
                                        "component count has the shape [1], not []"),
    "an unknown kind": (_set("rows.0.estimates.0.function", "mode"), "unknown aggregate kind 'mode'"),
    "a quantile level out of range": (_set("rows.0.estimates.0.level", 1.5), "its quantile level is 1.5"),
    "a quantile level that is no number": (_set("rows.0.estimates.0.level", math.nan), "its quantile level is nan"),
    "kinds that differ by row": (_set("rows.1.estimates.0.function", "sum"), "kinds differ from the first row's"),
    "a lost estimate": (lambda r: r.rows[1].estimates.pop(), "row 2: its estimates are ['count']"),
    "a relabelled estimate": (_set("rows.0.estimates.0.aggregate", "sum"), "its estimates are ['sum'"),
    "no rows": (lambda r: r.ClearField("rows"), "it has 0 rows"),
    "10,001 rows": (lambda r: _more_rows(r, 9_999), "it has 10001 rows"),
    "two rows without a group-by": (lambda r: r.ClearField("group_by"), "it has 2 rows for 0 group-by columns"),
    "a group twice": (_set("rows.1.keys.0.value.string_value", "F"), "row 2: its group appears twice"),
    "a key of another column": (_set("rows.0.keys.0.column", "stage"), "its keys are for ['stage'], not ['sex']"),
    "a key without a value": (lambda r: r.rows[0].keys[0].ClearField("value"), "a group key has no value"),
    "no aggregates": (lambda r: r.ClearField("aggregates"), "it has 0 aggregates"),
    "a dry run not asked for": (_set("dry_run", True), "it answers a dry run"),
}
def _grouped_by_stage(r: pb.QueryResponse) -> None:
    r.group_by[0] = "stage"
    for row in r.rows:
        row.keys[0].column = "stage"


def _mean_of_bmi(r: pb.QueryResponse) -> None:
    r.aggregates[1] = "mean(bmi)"
    for row in r.rows:
        row.estimates[1].aggregate = "mean(bmi)"


SHAPES: dict[str, tuple[Callable[[pb.QueryResponse], None], str]] = {
    "another dataset": (_set("dataset", "treatments"), "dataset 'treatments', not 'patients'"),
    "other groups": (_grouped_by_stage, "its groups are by ['stage'], not ['sex']"),
    "other aggregates": (_mean_of_bmi,
                         "its aggregates are ['count', 'mean(bmi)'], not ['count', 'mean(age_at_diagnosis)']"),
}


def test_an_honest_answer_passes() -> None:
    assert invalid_answers([("a", honest()), ("b", honest())], REQUEST) == {}
    priced = pb.QueryRequest()
    priced.CopyFrom(REQUEST)
    priced.dry_run = True
    assert invalid_answers([("a", honest(dry_run=True))], priced) == {}


def test_a_suppressed_cell_with_its_components_passes() -> None:
    """A site withholds a suppressed cell's value, not its released components (the broker pools them)."""
    answer = honest()
    for e in answer.rows[0].estimates:
        e.value = e.ci_low = e.ci_high = math.nan
        e.suppressed = True
    check_answer(answer, dry_run=False)


@pytest.mark.parametrize("case", list(CASES))
def test_a_malformed_answer_is_refused_with_what_is_wrong(case: str) -> None:
    corrupt, phrase = CASES[case]
    answer = honest()
    corrupt(answer)
    with pytest.raises(InvalidAnswer) as err:
        check_answer(answer, dry_run=False)
    assert phrase in err.value.message
    assert invalid_answers([("good", honest()), ("bad", answer)], REQUEST) == {"bad": err.value.message}


@pytest.mark.parametrize("case", list(SHAPES))
def test_an_answer_to_another_question_is_refused(case: str) -> None:
    corrupt, phrase = SHAPES[case]
    answer = honest()
    corrupt(answer)
    check_answer(answer, dry_run=False)  # well formed: only the request tells it is not the answer asked for
    problems = invalid_answers([("bad", answer), ("good", honest())], REQUEST)
    assert list(problems) == ["bad"] and phrase in problems["bad"]


def test_a_template_calls_answers_are_held_to_the_shape_most_sites_give() -> None:
    """The broker cannot resolve a template: the sites' answers decide, and a tie goes to the first site."""
    template = pb.QueryRequest(query_id="t-1", template=pb.TemplateCall(name="by_sex"))
    odd = honest()
    odd.dataset = "treatments"
    assert invalid_answers([("a", odd), ("b", honest()), ("c", honest())], template) == {
        "a": "it answers about dataset 'treatments', not 'patients'"}
    assert list(invalid_answers([("a", odd), ("b", honest())], template)) == ["b"]
    assert invalid_answers([("a", honest()), ("b", odd), ("c", honest())], template).keys() == {"b"}


def test_a_malformed_answer_takes_no_part_in_the_vote() -> None:
    template = pb.QueryRequest(query_id="t-2", template=pb.TemplateCall(name="by_sex"))
    broken = honest()
    broken.dataset = "treatments"
    broken.rows[0].estimates[0].components[0].values[0] = math.nan
    problems = invalid_answers([("a", broken), ("b", honest())], template)
    assert list(problems) == ["a"] and "component count is nan" in problems["a"]
