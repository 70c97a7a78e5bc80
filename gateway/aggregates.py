"""The table of aggregate kinds: everything the gateway knows about each kind, in one place.

Each kind declares its check against the policy, the noisy components it releases (what the
engine computes in SQL, the most one row can add to each — from which the mechanism derives the
sensitivity — and each component's share of the aggregate's epsilon), how released components
become an estimate, and how a broker pools them. The SQL front-end, engine, mechanisms, site,
broker and client all read this table; none of them compares kind names.

Free of OpenDP, DuckDB and pydantic (policy types are imported for type checking only), so the
broker and the client can import it. Adding a kind means adding a class here and to :data:`KINDS`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, ClassVar, Literal

from .answers import Z95, Part, Value, ratio_estimate, symmetric
from .errors import InvalidQuery

if TYPE_CHECKING:
    from .policy import Column
    from .query import Aggregate

# What the engine knows how to compute per group: rows, non-missing values of the column, the sum
# of the column's clamped fixed-point values, or the sum of those values, or of their squares, after
# subtracting the bounds' midpoint (which makes what one row can add about half as large).
ComponentSql = Literal["rows", "values", "sum", "centered_sum", "centered_squares"]


@dataclass(frozen=True)
class ComponentSpec:
    """One noisy component of a kind: its name, how the engine computes it, its share of epsilon."""

    name: str
    sql: ComponentSql
    share: Fraction

    def row_bound(self, column: Column | None) -> int:
        """The largest |value| one row adds to this component, in fixed-point units."""
        if self.sql in ("rows", "values"):
            return 1
        assert column is not None
        if self.sql == "sum":
            return column.max_contribution
        centered = column.max_centered_contribution
        return centered if self.sql == "centered_sum" else centered * centered

    def unit(self, column: Column | None) -> int:
        """Fixed-point units per 1 of the component's value."""
        if self.sql in ("rows", "values"):
            return 1
        assert column is not None
        return column.unit ** 2 if self.sql == "centered_squares" else column.unit


class Kind:
    """An aggregate kind. Subclasses set the class attributes and :meth:`estimate`."""

    name: ClassVar[str]
    sql_names: ClassVar[tuple[str, ...]]
    example: ClassVar[str]
    columns: ClassVar[int] = 1
    components: ClassVar[tuple[ComponentSpec, ...]]
    mechanism: ClassVar[str] = "{}"

    def check(self, agg: Aggregate, column_for: Callable[[str], Column]) -> None:
        """Refuse ``agg`` unless it has this kind's shape; ``column_for`` checks each column's role."""
        if self.columns == 0 and agg.columns:
            raise InvalidQuery(f"{self.name} takes no column: use {self.example} (each row of the dataset counts)")
        if len(agg.columns) != self.columns:
            needs = "a column" if self.columns == 1 else f"{self.columns} columns"
            raise InvalidQuery(f"{self.name} needs {needs}, e.g. {self.example}")
        if agg.params:
            raise InvalidQuery(f"{self.name} takes no parameters, e.g. {self.example}")
        for name in agg.columns:
            column_for(name)

    def estimate(self, parts: Mapping[str, Part], bounds: tuple[float, float] | None, clamp: bool) -> Value:
        """The estimate that post-processing of the released ``parts`` gives.

        ``bounds`` are the column's clamping bounds; with ``clamp`` the estimate is kept inside
        what the bounds make possible (a site does; a broker keeps the sites' pooled value).
        """
        raise NotImplementedError

    def predict(self, parts: Mapping[str, Part]) -> tuple[float, float]:
        """(std error, 95% half-width) known before running: a single component's; otherwise unknown."""
        if len(self.components) == 1:
            part = parts[self.components[0].name]
            return part.std_error, part.half_width
        return math.nan, math.nan

    def pool(self, sites: Sequence[Mapping[str, Part]]) -> dict[str, Part]:
        """Several sites' parts as one: each component adds over sites, and so do noise variances."""
        return {spec.name: Part.pooled([site[spec.name] for site in sites]) for spec in self.components}


class Count(Kind):
    """Rows (each patient counts at most max_rows_per_unit times)."""

    name, sql_names, example, columns = "count", ("count",), "count(*)", 0
    components = (ComponentSpec("count", "rows", Fraction(1)),)

    def estimate(self, parts: Mapping[str, Part], bounds: tuple[float, float] | None, clamp: bool) -> Value:
        part = parts["count"]
        return symmetric(part.value, part.std_error, part.half_width)


class Sum(Kind):
    """The sum of a column's values clamped to its bounds."""

    name, sql_names, example = "sum", ("sum",), "sum(column)"
    components = (ComponentSpec("sum", "sum", Fraction(1)),)

    def estimate(self, parts: Mapping[str, Part], bounds: tuple[float, float] | None, clamp: bool) -> Value:
        part = parts["sum"]
        return symmetric(part.value, part.std_error, part.half_width)


class Mean(Kind):
    """Noisy sum over noisy count, half of the epsilon each; a delta-method interval."""

    name, sql_names, example = "mean", ("avg", "mean"), "mean(column)"
    components = (ComponentSpec("sum", "sum", Fraction(1, 2)), ComponentSpec("count", "values", Fraction(1, 2)))
    mechanism = "ratio({})"

    def estimate(self, parts: Mapping[str, Part], bounds: tuple[float, float] | None, clamp: bool) -> Value:
        total, count = parts["sum"], parts["count"]
        low, high = bounds if bounds is not None else (-math.inf, math.inf)
        if count.value >= 1 and not clamp:
            low, high = -math.inf, math.inf
        value, se, clamped = ratio_estimate(total.value, count.value, total.std_error, count.std_error, low, high)
        return Value(value, se, Z95 * se, max(low, value - Z95 * se), min(high, value + Z95 * se), clamped)


class Variance(Kind):
    """Sample variance from noisy sum, sum of squares and count, a third of the epsilon each.

    Sum and squares are of the values minus the bounds' midpoint: the variance does not change,
    and a row adds at most half the range (squared: a quarter of its square) instead of the
    largest |bound|.
    """

    name, sql_names, example = "variance", ("variance", "var_samp"), "variance(column)"
    components = (ComponentSpec("sum", "centered_sum", Fraction(1, 3)),
                  ComponentSpec("sum_squares", "centered_squares", Fraction(1, 3)),
                  ComponentSpec("count", "values", Fraction(1, 3)))
    mechanism = "variance({})"

    def estimate(self, parts: Mapping[str, Part], bounds: tuple[float, float] | None, clamp: bool) -> Value:
        value, se, clamped, top = _variance(parts, bounds)
        return Value(value, se, Z95 * se, max(0.0, value - Z95 * se), min(top, value + Z95 * se), clamped)


class StdDev(Kind):
    """Sample standard deviation: the square root of :class:`Variance`, its interval transformed."""

    name, sql_names, example = "stddev", ("stddev", "stddev_samp"), "stddev(column)"
    components = Variance.components
    mechanism = "stddev({})"

    def estimate(self, parts: Mapping[str, Part], bounds: tuple[float, float] | None, clamp: bool) -> Value:
        variance, se, clamped, top = _variance(parts, bounds)
        value = math.sqrt(variance)
        # delta method for the standard error; the interval is the variance's, square-rooted
        sd_se = se / (2 * value) if value > 0 else math.sqrt(se)
        low, high = math.sqrt(max(0.0, variance - Z95 * se)), math.sqrt(min(top, variance + Z95 * se))
        return Value(value, sd_se, Z95 * sd_se, low, high, clamped)


def _variance(parts: Mapping[str, Part], bounds: tuple[float, float] | None) -> tuple[float, float, bool, float]:
    """(variance clamped to what the bounds allow, delta-method std error, clamped?, largest possible)."""
    s1, s2, n = parts["sum"], parts["sum_squares"], parts["count"]
    top = ((bounds[1] - bounds[0]) / 2) ** 2 if bounds is not None else math.inf
    if n.value < 2:  # nothing is known beyond the bounds
        middle = top / 2 if math.isfinite(top) else 0.0
        return middle, middle if math.isfinite(top) else math.inf, True, top
    count = n.value
    raw = (s2.value - s1.value ** 2 / count) / (count - 1)
    d_s2 = 1 / (count - 1)
    d_s1 = -2 * s1.value / (count * (count - 1))
    d_n = (s1.value / count) ** 2 / (count - 1) - raw / (count - 1)
    se = math.sqrt((d_s2 * s2.std_error) ** 2 + (d_s1 * s1.std_error) ** 2 + (d_n * n.std_error) ** 2)
    value = min(max(raw, 0.0), top)
    return value, se, value != raw, top


KINDS: dict[str, Kind] = {kind.name: kind for kind in (Count(), Sum(), Mean(), Variance(), StdDev())}
BY_SQL_NAME: dict[str, Kind] = {sql: kind for kind in KINDS.values() for sql in kind.sql_names}


def sql_forms() -> list[str]:
    """Every SQL spelling of every kind, e.g. ``count(*)``, ``avg(col)``, ``mean(col)``."""
    return [kind.example if kind.columns == 0 else f"{sql}({', '.join(['col'] * kind.columns)})"
            for kind in KINDS.values() for sql in kind.sql_names]


def supported_aggregates() -> str:
    """The kinds as a reader would write them: ``count, sum(column), ... or stddev(column)``."""
    names = [kind.example.replace("(*)", "") if kind.columns == 0 else kind.example for kind in KINDS.values()]
    return ", ".join(names[:-1]) + " or " + names[-1]


def kind_of(function: str) -> Kind:
    """The kind named ``function``, or :class:`InvalidQuery` listing the kinds there are."""
    kind = KINDS.get(function)
    if kind is None:
        raise InvalidQuery(f"unknown aggregate {function!r}; supported: {supported_aggregates()}")
    return kind
