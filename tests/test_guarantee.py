"""The stated guarantee: the most a site can release about one patient, computed from the policy."""

from __future__ import annotations

import subprocess
import sys
from fractions import Fraction

from gateway.guarantee import Bound, guarantees
from gateway.policy import BudgetRule, DatasetCap
from tests.helpers.policies import EXAMPLES, example_policy, with_dataset, with_policy


def test_a_capped_population_is_bounded_across_all_projects_and_over_time() -> None:
    (g,) = guarantees(example_policy())
    assert (g.population, g.datasets) == ("patients", ("patients", "treatments"))
    assert g.all_projects == Bound(Fraction(100), "365d")
    # absolute windows: any 365 days meet at most 2 windows, any 5 years at most 6
    assert (g.all_projects.over(365), g.all_projects.over(5 * 365)) == (200, 600)
    assert g.per_project == {"onc-*": Bound(Fraction(10), "365d"), "demo": Bound(Fraction(3), "never")}
    assert g.per_project["demo"].over(5 * 365) == 3


def test_without_a_cap_the_total_over_projects_is_not_bounded() -> None:
    uncapped = with_policy(example_policy(), population_caps={})
    (g,) = guarantees(uncapped)
    assert g.all_projects.epsilon is None and g.all_projects.over(365) is None
    assert "not bounded" in g.all_projects.describe()


def test_datasets_of_another_population_have_their_own_guarantee() -> None:
    policy = with_dataset(example_policy(), "treatments", population="episodes")
    policy = with_policy(policy, population_caps={"patients": DatasetCap(epsilon=Fraction(50), period="30d")},
                         budgets=(BudgetRule(project="x", datasets=("treatments",), epsilon=Fraction(4)),
                                  *policy.budgets))
    by_name = {g.population: g for g in guarantees(policy)}
    assert by_name["patients"].all_projects.over(365) == 50 * 14  # 365 days meet at most 14 30-day windows
    assert by_name["episodes"].all_projects.epsilon is None
    assert by_name["episodes"].per_project["x"] == Bound(Fraction(4), "365d")
    assert "x" not in by_name["patients"].per_project


def test_policy_explain_states_it() -> None:
    out = subprocess.run([sys.executable, "-m", "gateway.cli", "policy", "explain", str(EXAMPLES / "north.yaml"),
                          "--project", "onc-lung"], capture_output=True, text=True, check=True).stdout
    assert "population patients (datasets patients, treatments):" in out
    assert "all projects together: epsilon 100 per 365-day window; 200 over any 365 days; 600 over any 5 years" in out
