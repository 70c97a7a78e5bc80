"""The privacy guarantee a site's policy gives one patient, in numbers an officer can check.

Pure epsilon-DP under basic composition, for the add/remove-one-patient relation: every answer a
site releases about a population is charged to that population's budgets, so the privacy loss
about one patient is at most what those budgets let be spent. Per window of a budget:

- across all projects together: the population cap, if the policy sets one; without one, each
  project is bounded but their total is not (any project name a budget rule matches adds its own);
- for one project: the largest budget a rule gives it on the population's datasets.

Windows are absolute time (an edit takes effect at the end of the window in force), so a span of
time intersects at most ``ceil(span / period) + 1`` windows, and the loss over the span is at most
that many times the per-window figure. A budget that never resets bounds the loss for good.
Each site's guarantee is its own: a patient treated at several sites can lose that much at each.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from fractions import Fraction

from .policy import Policy

SPANS = (("any 365 days", 365), ("any 5 years", 5 * 365))


@dataclass(frozen=True)
class Bound:
    """At most ``epsilon`` per window of ``period`` (``never``: for good); None: not bounded."""

    epsilon: Fraction | None
    period: str

    def windows(self, days: int) -> int:
        """How many windows a span of ``days`` days can intersect."""
        return 1 if self.period == "never" else math.ceil(days / int(self.period.removesuffix("d"))) + 1

    def over(self, days: int) -> Fraction | None:
        """The bound over any span of ``days`` days (windows it can intersect, times the per-window bound)."""
        return None if self.epsilon is None else self.epsilon * self.windows(days)

    def describe(self) -> str:
        """E.g. ``epsilon 10 per 365-day window; 20 over any 365 days; 60 over any 5 years``."""
        if self.epsilon is None:
            return "not bounded by this site (no population cap)"
        if self.period == "never":
            return f"epsilon {_fmt(self.epsilon)} in all (the budget never resets)"
        spans = "; ".join(f"{_fmt(self.epsilon * self.windows(days))} over {name}" for name, days in SPANS)
        return f"epsilon {_fmt(self.epsilon)} per {self.period.removesuffix('d')}-day window; {spans}"


@dataclass(frozen=True)
class PopulationGuarantee:
    """What a site can release about one patient of a population."""

    population: str
    datasets: tuple[str, ...]
    all_projects: Bound
    per_project: dict[str, Bound]  # budget rule pattern -> its bound


def guarantees(policy: Policy) -> list[PopulationGuarantee]:
    """The guarantee for every population of ``policy``."""
    out = []
    for population, datasets in policy.populations().items():
        cap = policy.population_cap(population)
        all_projects = Bound(cap.epsilon, cap.period) if cap else Bound(None, "never")
        per_project: dict[str, Bound] = {}
        for rule in policy.budgets:
            if any(fnmatch.fnmatchcase(d, pattern) for d in datasets for pattern in rule.datasets):
                current = per_project.get(rule.project)
                if current is None or _larger(Bound(rule.epsilon, rule.period), current):
                    per_project[rule.project] = Bound(rule.epsilon, rule.period)
        out.append(PopulationGuarantee(population, datasets, all_projects, per_project))
    return out


def describe(policy: Policy) -> list[str]:
    """The guarantee as lines of text (``policy explain`` prints them)."""
    lines = [f"site {policy.site}: the most this site can release about one patient (pure epsilon-DP, one patient "
             "added or removed)"]
    for g in guarantees(policy):
        lines.append(f"population {g.population} (datasets {', '.join(g.datasets)}):")
        lines.append(f"  all projects together: {g.all_projects.describe()}")
        for project, bound in g.per_project.items():
            lines.append(f"  projects matching {project!r}, each: {bound.describe()}")
    lines.append("a patient treated at several sites: each site's bound applies at each site")
    return lines


def _larger(a: Bound, b: Bound) -> bool:
    """Whether ``a`` allows more over five years than ``b``."""
    return (a.over(SPANS[-1][1]) or Fraction(0)) > (b.over(SPANS[-1][1]) or Fraction(0))


def _fmt(value: Fraction) -> str:
    return f"{float(value):g}"
