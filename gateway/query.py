"""The query model: immutable structured queries, their policy check and canonical form.

Every way of asking (structured message, SQL string, approved template) becomes one
:class:`Query`. :func:`check_query` holds it against the site policy; :meth:`Query.canonical`
gives the normalised text (sorted filters and value lists, ``=``/``!=`` folded into IN/NOT IN)
whose SHA-256 is used for caching, idempotency and the audit log.

A cohort filter keeps the patients who have (``in``) or have not (``not in``) at least one row
matching conditions in another dataset of the same population: the privacy unit ``IN (SELECT
<unit> FROM <dataset> WHERE ...)``. It decides, per patient, from that patient's own rows only,
so the query's sensitivity does not change.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

from .aggregates import Kind, kind_for, kind_of, supported_aggregates
from .answers import Scalar
from .errors import InvalidQuery, NotFound, PolicyViolation

if TYPE_CHECKING:  # the client imports this module: no pydantic at run time
    from .policy import Column, Dataset, Policy

OPERATORS = ("in", "not in", "<", "<=", ">", ">=", "between")
_FOLD = {"=": "in", "==": "in", "!=": "not in", "<>": "not in"}
MAX_CELLS = 10_000
MAX_LIST = 1_000
MAX_FILTERS = 64
MAX_VALUES = 10_000
MAX_AGGREGATES = 32
MAX_COHORTS = 8
_INT64 = 1 << 63


@dataclass(frozen=True)
class Aggregate:
    """One aggregate: a kind from :data:`gateway.aggregates.KINDS` over its columns, with parameters."""

    function: str
    column: str | None = None
    more_columns: tuple[str, ...] = ()
    params: tuple[tuple[str, Scalar], ...] = ()

    @property
    def columns(self) -> tuple[str, ...]:
        """Every column the aggregate names, in order."""
        return ((self.column,) if self.column is not None else ()) + self.more_columns

    @property
    def label(self) -> str:
        """The name the aggregate carries in answers, e.g. ``mean(age_at_diagnosis)``."""
        if not self.columns and not self.params:
            return self.function
        params = "; " + ", ".join(f"{k}={v!r}" for k, v in self.params) if self.params else ""
        return f"{self.function}({', '.join(self.columns)}{params})"


@dataclass(frozen=True)
class Cohort:
    """The patients with at least one row of ``dataset`` that matches every one of ``filters``."""

    dataset: str
    filters: tuple[Filter, ...] = ()
    selects: str = ""  # the column the SQL form selects ("" from the structured form): the privacy unit

    def normalised(self) -> Cohort:
        """Same cohort, its filters in normal form."""
        return Cohort(self.dataset, _normal_filters(self.filters), self.selects)

    def describe(self) -> dict[str, object]:
        """The cohort in the canonical form's terms."""
        return {"dataset": self.dataset, "filters": [_filter_text(f) for f in self.filters]}


@dataclass(frozen=True)
class Filter:
    """A condition on a filter-role column; values are always bound, never spliced into SQL.

    With ``cohort``, the condition is membership (``op`` ``in`` / ``not in``) of the privacy unit
    in that cohort, and ``values`` is empty.
    """

    column: str
    op: str
    values: tuple[Scalar, ...]
    cohort: Cohort | None = None


@dataclass(frozen=True)
class Query:
    """A parsed aggregate query over one dataset."""

    dataset: str
    aggregates: tuple[Aggregate, ...]
    group_by: tuple[str, ...] = ()
    filters: tuple[Filter, ...] = ()
    # The caller's names for output columns (SQL ``AS``): an aggregate's label or a group column,
    # and its alias. Presentation only: not compared, not in the canonical form, so an alias never
    # changes the price, the cached answer or the idempotency of a query.
    names: tuple[tuple[str, str], ...] = field(default=(), compare=False)
    # asked of one site directly (QueryRequest.single_site): medians and quantiles by the exponential
    # mechanism (:data:`gateway.aggregates.SINGLE_SITE`); another release, so another canonical form
    single_site: bool = False

    def normalised(self) -> Query:
        """Same meaning, normal form: folded operators, sorted distinct IN lists, sorted filters."""
        return Query(self.dataset, self.aggregates, self.group_by, _normal_filters(self.filters), self.names,
                     self.single_site)

    def kinds(self) -> tuple[Kind, ...]:
        """Each aggregate's kind, as this query releases it (at one site asked directly, or otherwise)."""
        return tuple(kind_for(a.function, self.single_site) for a in self.aggregates)

    def canonical(self, epsilon: Fraction) -> str:
        """Stable text of the normalised query and its resolved privacy loss.

        ``single_site`` appears only when set: every other query keeps the text its stored answers have.
        """
        q = self.normalised()
        text: dict[str, object] = {
            "dataset": q.dataset,
            "aggregates": [a.label for a in q.aggregates],
            "group_by": list(q.group_by),
            "filters": [_filter_text(f) for f in q.filters],
            "epsilon": f"{epsilon.numerator}/{epsilon.denominator}",
        }
        if q.single_site:
            text["single_site"] = True
        return json.dumps(text, separators=(",", ":"), sort_keys=True)

    def canonical_hash(self, epsilon: Fraction) -> str:
        """Hex SHA-256 of :meth:`canonical`."""
        return hashlib.sha256(self.canonical(epsilon).encode()).hexdigest()


def _normal_filters(filters: tuple[Filter, ...]) -> tuple[Filter, ...]:
    normal = []
    for f in filters:
        op = _FOLD.get(f.op, f.op)
        values = f.values
        if op in ("in", "not in"):
            values = tuple(sorted(set(values), key=_sort_key))
        normal.append(Filter(f.column, op, values, f.cohort.normalised() if f.cohort is not None else None))
    # the order plain filters always had (stored answers are found by this text), cohorts after their peers
    normal.sort(key=lambda f: (f.column, f.op, [_sort_key(v) for v in f.values],
                               json.dumps(f.cohort.describe(), sort_keys=True) if f.cohort is not None else ""))
    return tuple(dict.fromkeys(normal))


def _filter_text(f: Filter) -> list[object]:
    """A filter in the canonical form (a plain filter's text is unchanged by cohorts' arrival)."""
    text: list[object] = [f.column, f.op, [_typed(v) for v in f.values]]
    return [*text, f.cohort.describe()] if f.cohort is not None else text


def _sort_key(value: Scalar) -> tuple[str, str]:
    return (type(value).__name__, repr(value))


def _typed(value: Scalar) -> list[str]:
    return [type(value).__name__, repr(value)]


def dataset_of(policy: Policy, name: str) -> Dataset:
    """The policy's dataset ``name``, or :class:`NotFound` listing the ones that exist."""
    try:
        return policy.datasets[name]
    except KeyError:
        known = ", ".join(sorted(policy.datasets))
        raise NotFound(f"unknown dataset {name!r}; this site offers: {known}") from None


def check_query(query: Query, policy: Policy) -> Query:
    """Validate ``query`` against ``policy``; return it normalised with values coerced to column types."""
    dataset = dataset_of(policy, query.dataset)
    if not query.aggregates:
        raise InvalidQuery(f"a query needs at least one aggregate: {supported_aggregates()}")
    # the sizes first: each is one comparison, before any work that grows with them
    if len(query.aggregates) > MAX_AGGREGATES:
        raise InvalidQuery(f"the query has {len(query.aggregates)} aggregates; at most {MAX_AGGREGATES} are allowed")
    cohorts = [f.cohort for f in query.filters if f.cohort is not None]
    total = len(query.filters) + sum(len(c.filters) for c in cohorts)
    if total > MAX_FILTERS:
        raise InvalidQuery(f"the query has {total} filters; at most {MAX_FILTERS} are allowed")
    if len(cohorts) > MAX_COHORTS:
        raise InvalidQuery(f"the query has {len(cohorts)} cohort filters; at most {MAX_COHORTS} are allowed")
    if len(set(query.aggregates)) != len(query.aggregates):
        raise InvalidQuery("an aggregate is repeated; ask for each aggregate once")
    for agg in query.aggregates:
        _check_aggregate(agg, dataset, query.dataset)
    query.kinds()  # with single_site, every aggregate has a single-site release (medians and quantiles)
    if len(set(query.group_by)) != len(query.group_by):
        raise InvalidQuery("a group-by column is repeated")
    cells = 1
    for name in query.group_by:
        cells *= len(_column(dataset, name, "group_by", query.dataset).group_keys)
    if cells > MAX_CELLS:
        raise InvalidQuery(f"the group-by has {cells} groups; at most {MAX_CELLS} are allowed")
    filters = tuple(_check_cohort(f, dataset, query.dataset, policy) if f.cohort is not None
                    else _check_filter(f, dataset, query.dataset) for f in query.filters)
    values = sum(len(f.values) for f in filters) + sum(len(g.values) for f in filters if f.cohort is not None
                                                        for g in f.cohort.filters)
    if values > MAX_VALUES:
        raise InvalidQuery(f"the filters hold {values} values; at most {MAX_VALUES} are allowed in one query")
    return Query(query.dataset, query.aggregates, query.group_by, filters, query.names, query.single_site).normalised()


def _check_aggregate(agg: Aggregate, dataset: Dataset, name: str) -> None:
    if agg.function not in dataset.aggregates:
        allowed = ", ".join(dataset.aggregates)
        raise PolicyViolation("aggregate", f"{agg.function!r} is not allowed on {name!r} by the site's policy "
                                           f"(datasets.{name}.aggregates); allowed: {allowed}")
    kind_of(agg.function).check(agg, lambda column, role: _column(dataset, column, role, name))


def _column(dataset: Dataset, name: str, role: str, dataset_name: str) -> Column:
    column = dataset.columns.get(name)
    if column is None:
        known = ", ".join(sorted(c for c, col in dataset.columns.items() if role in col.roles))
        raise InvalidQuery(f"unknown column {name!r} in dataset {dataset_name!r}; "
                           f"columns usable for {role}: {known or 'none'}")
    if role not in column.roles:
        hint = _ROLE_HINTS.get(role, "")
        raise PolicyViolation(name, f"column may not be used for {role} (its roles: {', '.join(column.roles)}){hint}")
    return column


_ROLE_HINTS = {"event": "; an event column is one the policy declares with the event role: an integer, 1 for the "
                        "event and 0 for censored"}


def _check_filter(f: Filter, dataset: Dataset, name: str) -> Filter:
    column = _column(dataset, f.column, "filter", name)
    op = _FOLD.get(f.op.lower(), f.op.lower())
    if op not in OPERATORS:
        raise InvalidQuery(f"unsupported filter operator {f.op!r}; use =, !=, <, <=, >, >=, IN, NOT IN, BETWEEN")
    values = tuple(_coerce(v, column, f.column) for v in f.values)
    if op in ("in", "not in"):
        if not 1 <= len(values) <= MAX_LIST:
            raise InvalidQuery(f"{op.upper()} on {f.column!r} needs 1 to {MAX_LIST} values")
    elif op == "between":
        if len(values) != 2:
            raise InvalidQuery(f"BETWEEN on {f.column!r} needs exactly two values")
        if _order(values[0]) > _order(values[1]):
            raise InvalidQuery(f"BETWEEN on {f.column!r}: the low value is greater than the high value")
    elif len(values) != 1:
        raise InvalidQuery(f"{op} on {f.column!r} needs exactly one value")
    return Filter(f.column, op, values)


def _check_cohort(f: Filter, dataset: Dataset, name: str, policy: Policy) -> Filter:
    """A cohort filter: membership of the privacy unit in patients of the same population.

    Access to the cohort's dataset is the caller's to check (the site does, before this).
    """
    assert f.cohort is not None
    cohort = f.cohort
    op = _FOLD.get(f.op.lower(), f.op.lower())
    if op not in ("in", "not in") or f.values:
        raise InvalidQuery(f"a cohort filter is {dataset.privacy_unit} IN (SELECT ...) or NOT IN (SELECT ...), "
                           "with no other values")
    if f.column != dataset.privacy_unit:
        raise InvalidQuery(f"a cohort filter tests the privacy unit: {dataset.privacy_unit} IN (SELECT "
                           f"{dataset.privacy_unit} FROM ...), not {f.column!r}")
    inner = dataset_of(policy, cohort.dataset)
    if inner.population_name != dataset.population_name:
        raise PolicyViolation("cohort", f"dataset {cohort.dataset!r} holds other patients than {name!r} (population "
                                        f"{inner.population_name!r}, not {dataset.population_name!r}); a cohort "
                                        "comes from a dataset of the same population")
    if cohort.selects not in ("", inner.privacy_unit):
        raise InvalidQuery(f"a cohort selects the patient id of {cohort.dataset!r}: SELECT {inner.privacy_unit} "
                           f"FROM {cohort.dataset}, not {cohort.selects!r}")
    if any(g.cohort is not None for g in cohort.filters):
        raise InvalidQuery("a cohort's conditions cannot hold another cohort")
    filters = tuple(_check_filter(g, inner, cohort.dataset) for g in cohort.filters)
    return Filter(dataset.privacy_unit, op, (), Cohort(cohort.dataset, filters, inner.privacy_unit))


def _order(value: Scalar) -> tuple[int, float | str]:
    return (1, value) if isinstance(value, str) else (0, float(value))


def _coerce(value: object, column: Column, name: str) -> Scalar:
    if column.type == "string" and isinstance(value, str):
        if len(value) > 1000:
            raise InvalidQuery(f"a value for {name!r} is longer than 1000 characters")
        return value
    if column.type == "integer" and isinstance(value, int) and not isinstance(value, bool):
        if not -_INT64 <= value < _INT64:
            raise InvalidQuery(f"value for {name!r} is outside the 64-bit integer range")
        return value
    if column.type == "integer" and isinstance(value, float) and value.is_integer():
        if not -_INT64 <= value < _INT64:
            raise InvalidQuery(f"value for {name!r} is outside the 64-bit integer range")
        return int(value)
    if column.type == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:
            raise InvalidQuery(f"value for {name!r} is too large") from None
        if math.isfinite(number):
            return number + 0.0  # folds -0.0 into 0.0 so equal filters hash equally
    raise InvalidQuery(f"value {value!r} does not fit column {name!r} of type {column.type}")
