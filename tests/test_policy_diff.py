"""`gateway policy diff` says what an edit does to what can be spent."""

from __future__ import annotations

from datetime import UTC, datetime
from fractions import Fraction

from gateway.render import diff
from tests.helpers.policies import example_policy, with_dataset, with_epsilon, with_policy


def _edit_rule(policy, **changes):
    return with_policy(policy, budgets=tuple(r.model_copy(update=changes) if r.project == "onc-*" else r
                                             for r in policy.budgets))


def test_every_budget_affecting_edit_is_flagged_with_its_direction_and_timing() -> None:
    old = example_policy()
    new = _edit_rule(old, epsilon=Fraction(12), period="30d")
    new = with_epsilon(with_policy(new, period_start=datetime(2026, 6, 1, tzinfo=UTC)), max=Fraction(4, 5))
    new = with_dataset(new, "treatments", population="episodes")
    lines = diff(old, new)
    assert "budgets[0].epsilon: '10' -> '12'  [BUDGET: loosens]" in lines
    assert ("budgets[0].period: '365d' -> '30d'  [BUDGET: takes effect when the window in force ends; spend made in "
            "it is never freed]") in lines
    assert "epsilon.max: '1' -> '4/5'  [BUDGET: tightens (per query)]" in lines
    assert any(line.startswith("period_start:") and "takes effect when the window in force ends" in line
               for line in lines)
    assert any(line.startswith("datasets.treatments: population 'patients' -> 'episodes'  [BUDGET: the dataset "
                               "draws on another budget") for line in lines)
    assert lines[-1] == "5 edit(s) change what can be spent"


def test_an_edit_that_spends_nothing_is_not_flagged() -> None:
    old = example_policy()
    new = with_dataset(old, "patients", description="Patients, one row each.")
    lines = diff(old, new)
    assert lines == [f"datasets.patients.description: {old.datasets['patients'].description!r} -> "
                     "'Patients, one row each.'"]
    assert diff(old, old) == []


def test_a_kind_allowed_refused_or_given_its_own_limits_is_flagged() -> None:
    old = example_policy()
    kinds = {kind: {} for kind in old.datasets["patients"].aggregates}
    limited = with_dataset(old, "patients", aggregates={**kinds, "median": {"epsilon": {"max": "1/2"}}})
    tighter = with_dataset(old, "patients", aggregates={**kinds, "median": {"epsilon": {"max": "1/4"}}})
    without = with_dataset(old, "patients", aggregates=[k for k in kinds if k != "median"])
    assert diff(old, limited)[0].endswith("[BUDGET: tightens: median gets its own per-query limits]")
    assert diff(limited, old)[0].endswith("[BUDGET: loosens: median drops its own per-query limits]")
    assert diff(limited, tighter)[0] == ("datasets.patients.aggregates.median.epsilon.max: '1/2' -> '1/4'  "
                                         "[BUDGET: tightens]")
    assert diff(tighter, limited)[0].endswith("[BUDGET: loosens]")
    assert diff(old, without)[0].endswith("[BUDGET: tightens: refuses median]")
    assert diff(without, old)[0].endswith("[BUDGET: loosens: allows median]")
