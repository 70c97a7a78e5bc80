"""The budgets a query draws on, as the policy sets them: the one place that names the ledger's scopes.

A project's budget on a population is ``project:<project>:<population>``; a population's cap over
all projects is ``population:<population>``. The site charges them and the console reads them.
"""

from __future__ import annotations

from datetime import datetime

from .ledger import Scope, Window
from .policy import BudgetRule, Policy, window_bounds


def budget_scopes(policy: Policy, project: str, dataset: str, rule: BudgetRule, now: datetime) -> tuple[Scope, ...]:
    """The budgets a query on ``dataset`` draws on.

    The project's budget on the dataset's population (every dataset describing the same patients
    draws on it), and the population's cap over all projects, if the policy sets one.
    """
    population = policy.datasets[dataset].population_name
    at = int(now.timestamp())
    start, end = window_bounds(rule.period, policy.period_start, now)
    scopes = [Scope(f"project:{project}:{population}", dataset, rule.epsilon, Window(start, end, at),
                    f"project {project!r} on population {population!r}")]
    cap = cap_scope(policy, dataset, now)
    return tuple(scopes) if cap is None else (*scopes, cap)


def cap_scope(policy: Policy, dataset: str, now: datetime) -> Scope | None:
    """The cap over all projects on ``dataset``'s population (None: the policy sets none); refusals name ``dataset``."""
    population = policy.datasets[dataset].population_name
    cap = policy.population_cap(population)
    if cap is None:
        return None
    start, end = window_bounds(cap.period, policy.period_start, now)
    return Scope(f"population:{population}", dataset, cap.epsilon,
                 Window(start, end, int(now.timestamp())), f"all projects on population {population!r} (site-wide cap)",
                 shared=True)
