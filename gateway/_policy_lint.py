"""Warnings about a policy that loads but likely does not say what its officer meant.

A budget rule whose dataset pattern matches no dataset grants nothing, silently; a role pattern
that is a misspelling of a usual role grants nothing to the callers it was meant for. Each warning
is ``file:line: field: warning: ...``, with a "did you mean" where a name is close to one that
exists. An aggregate kind's own epsilon max that is not below the dataset's changes nothing; a
histogram, median or quantile allowed on a dataset without bins is always refused. ``gateway
policy check`` prints them (``--strict`` fails on them).
"""

from __future__ import annotations

import difflib
import fnmatch
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import yaml

from ._yamlfile import line_index
from .aggregates import KINDS
from .ledger import spent_in_force
from .policy import LoadedPolicy, Policy

USUAL_ROLES = ("researcher", "analyst", "officer")


def policy_warnings(loaded: LoadedPolicy) -> list[str]:
    """Every warning about ``loaded``, in line order."""
    policy = loaded.policy
    lines = line_index(yaml.compose(loaded.path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader))
    found: list[tuple[int, str]] = []

    def warn(keys: tuple[str, ...], text: str) -> None:
        line = lines.get(keys, lines.get(keys[:-1], 1))
        found.append((line, f"{loaded.path}:{line}: {'.'.join(keys)}: warning: {text}"))

    names = list(policy.datasets)
    for i, rule in enumerate(policy.budgets):
        for j, pattern in enumerate(rule.datasets):
            if not any(fnmatch.fnmatchcase(name, pattern) for name in names):
                warn(("budgets", str(i), "datasets", str(j)),
                     f"{pattern!r} matches no dataset, so this rule grants nothing on it{_close(pattern, names)}; "
                     f"datasets: {', '.join(names)}")
        for j, pattern in enumerate(rule.roles):
            if any(ch in pattern for ch in "*?[") or pattern in USUAL_ROLES:
                continue
            close = difflib.get_close_matches(pattern, USUAL_ROLES, n=1, cutoff=0.75)
            if close:
                warn(("budgets", str(i), "roles", str(j)),
                     f"role {pattern!r} looks like a misspelling of {close[0]!r}; a rule applies only to tokens whose "
                     "role claim matches it exactly")
        earlier = next((k for k, other in enumerate(policy.budgets[:i]) if other.project == "*"
                        and other.datasets == ("*",) and other.roles == ("*",)), None)
        if earlier is not None:
            warn(("budgets", str(i), "project"),
                 f"never applies: rule {earlier} (project '*' on every dataset and role) matches first")
    for name, template in policy.templates.items():
        for j, pattern in enumerate(template.projects):
            if pattern != "*" and not any(fnmatch.fnmatchcase(pattern, rule.project) or
                                          fnmatch.fnmatchcase(rule.project, pattern) for rule in policy.budgets):
                warn(("templates", name, "projects", str(j)),
                     f"no budget rule covers project {pattern!r}, so it cannot run this template")
    _kind_warnings(policy, warn)
    return [text for _, text in sorted(found, key=lambda item: item[0])]


def _kind_warnings(policy: Policy, warn: Callable[[tuple[str, ...], str], None]) -> None:
    """A kind's own limit that can never bind, and a binned kind allowed where no column has bins."""
    for name, dataset in policy.datasets.items():
        limits = dataset.epsilon or policy.epsilon
        for kind, rule in dataset.aggregates.items():
            own = rule.epsilon
            if own is not None and own.max is not None and own.max >= limits.max:
                warn(("datasets", name, "aggregates", kind, "epsilon", "max"),
                     f"{kind}'s max {float(own.max):g} is not below the dataset's {float(limits.max):g}: it changes "
                     "nothing (a kind's limits only tighten the dataset's)")
            needs_bins = any(spec.sql == "histogram_bins" for spec in KINDS[kind].components)
            if needs_bins and not any(column.bins is not None for column in dataset.columns.values()):
                warn(("datasets", name, "aggregates", kind),
                     f"{kind} is allowed, but no column of {name!r} declares bins, so every {kind} query is refused; "
                     "declare bins on a column with the aggregate role")


def _close(name: str, known: list[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def spent_warnings(loaded: LoadedPolicy, ledger: Path, now: float | None = None) -> list[str]:
    """Budgets the policy sets below what is already spent in the window in force (from the site's ledger).

    Such an edit is allowed (it never frees spend), but the project can spend nothing more until
    the window ends; the officer should know before it goes live.
    """
    policy, at = loaded.policy, int(time.time() if now is None else now)
    out = []
    for window in spent_in_force(ledger, at):
        kind, _, rest = window.scope.partition(":")
        if kind == "project":
            project, _, population = rest.rpartition(":")
            datasets = policy.populations().get(population, ())
            rule = next((r for d in datasets if (r := policy.budget_rule(project, d)) is not None), None)
            limit, what = (rule.epsilon if rule else None), f"project {project!r} on population {population!r}"
        elif kind == "population":
            cap = policy.population_cap(rest)
            limit, what = (cap.epsilon if cap else None), f"the cap over all projects on population {rest!r}"
        else:
            continue
        until = "never" if window.finish is None else datetime.fromtimestamp(window.finish, UTC).isoformat()
        spent = f"{float(window.spent):g}"
        if limit is None and kind == "project":
            out.append(f"{loaded.path}: warning: {what} has spent {spent} in the window in force but no budget rule "
                       f"grants it anything now: it can spend nothing more (the spend stays until {until})")
        elif limit is not None and limit < window.spent:
            out.append(f"{loaded.path}: warning: {what}: the new limit {float(limit):g} is below the {spent} already "
                       f"spent in the window in force: nothing more can be spent until it ends ({until})")
    return out
