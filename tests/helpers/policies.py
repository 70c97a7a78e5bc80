"""Policies for tests: the shipped example policies, edited as loaded models and written back as YAML.

A test that needs a different policy edits the loaded model (``with_column``, ``with_dataset``,
``with_epsilon``) rather than the YAML text: the edit names the dataset and column it changes,
and a misspelt field or an inconsistent edit fails at once (each edit is validated again, as the
loader would) instead of silently matching nothing. Tests of the YAML loader itself (line numbers,
syntax, unknown keys) write text on purpose and do not use these.
"""

from __future__ import annotations

from fractions import Fraction
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel

from gateway.policy import BudgetRule, Policy, load_policy

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "policies"

TEST_BUDGETS = (
    BudgetRule(project="stats", epsilon=Fraction(1_000_000), period="never"),  # for statistical tests
    BudgetRule(project="tight", epsilon=Fraction(1), period="never"),  # ten queries at 0.1
    BudgetRule(project="nurses", epsilon=Fraction(5), roles=("analyst",)),
    BudgetRule(project="patients-only", datasets=("patients",), epsilon=Fraction(5)),
)
"""Budget rules for tests, placed before the example rules so they win."""

M = TypeVar("M", bound=BaseModel)


@cache
def example_policy(site: str = "north") -> Policy:
    """The shipped example policy of ``site`` (``policies/<site>.yaml``), as loaded."""
    return load_policy(EXAMPLES / f"{site}.yaml").policy


def with_dataset(policy: Policy, dataset: str, **changes: Any) -> Policy:
    """``policy`` with fields of one dataset replaced, e.g. ``templates_only=True``."""
    datasets = {**policy.datasets, dataset: _edited(policy.datasets[dataset], changes)}
    return _edited(policy, {"datasets": datasets})


def with_column(policy: Policy, dataset: str, column: str, **changes: Any) -> Policy:
    """``policy`` with fields of one column replaced, e.g. ``bounds=(0, 120)``."""
    columns = dict(policy.datasets[dataset].columns)
    columns[column] = _edited(columns[column], changes)
    return with_dataset(policy, dataset, columns=columns)


def with_policy(policy: Policy, **changes: Any) -> Policy:
    """``policy`` with top-level fields replaced, e.g. ``population_caps={}``."""
    return _edited(policy, changes)


def with_epsilon(policy: Policy, **changes: Any) -> Policy:
    """``policy`` with its per-query epsilon limits changed, e.g. ``max=Fraction(2)``."""
    return _edited(policy, {"epsilon": _edited(policy.epsilon, changes)})


def with_slow_dataset(policy: Policy) -> Policy:
    """``policy`` with a dataset ``slow``: ``patients`` read from the view ``slow_patients`` (see
    :func:`tests.helpers.data.slow_copy`), a population of its own."""
    patients = policy.datasets["patients"]
    slow = _edited(patients, {"source": _edited(patients.source, {"table": "slow_patients"}), "population": "slow"})
    return with_policy(policy, datasets={**policy.datasets, "slow": slow})


def for_tests(policy: Policy, data: Path) -> Policy:
    """``policy`` with every dataset read from the DuckDB file ``data`` and :data:`TEST_BUDGETS` first."""
    for name, dataset in policy.datasets.items():
        policy = with_dataset(policy, name, source=_edited(dataset.source, {"database": str(data)}))
    return _edited(policy, {"budgets": TEST_BUDGETS + tuple(policy.budgets)})


def write_policy(folder: Path, data: Path, site: str = "north", policy: Policy | None = None) -> Path:
    """Write ``policy`` (default: the example policy of ``site``) :func:`for_tests` as ``folder/<site>.yaml``."""
    return dump_policy(for_tests(policy or example_policy(site), data), folder / f"{site}.yaml")


def dump_policy(policy: Policy, path: Path) -> Path:
    """Write ``policy`` to ``path`` as YAML that ``load_policy`` reads back to an equal policy."""
    # JSON mode writes fractions as "1/10" and datetimes as ISO strings, both of which the loader reads
    data = policy.model_dump(mode="json", exclude_defaults=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _edited(model: M, changes: dict[str, Any]) -> M:
    # model_copy(update=...) checks nothing (a misspelt field or a wrong type would pass): validate the result
    edited = model.model_copy(update=changes)
    return type(model).model_validate({name: value for name, value in edited})
