"""The table of aggregate kinds: everything the gateway knows about each kind, in one place.

Each kind declares its check against the policy, the noisy components it releases (what the
engine computes in SQL, their shape — one value per group, or a vector over a grid the policy
declares —, the most one row can add to each, as an L1 norm, from which the mechanism derives the
sensitivity, and each component's share of the aggregate's epsilon), how released components
become an estimate (a scalar, or a vector such as a survival curve), and how a broker pools them.
The SQL front-end, engine, mechanisms, site, broker and client all read this table; none of them
compares kind names.

Free of OpenDP, DuckDB and pydantic (policy types are imported for type checking only), so the
broker and the client can import it. Adding a kind means adding a class here and to :data:`KINDS`.
A query asked of one site directly (``single_site``) releases its medians and quantiles by the
kinds of :data:`SINGLE_SITE` instead (the exponential mechanism over the declared edges;
:func:`kind_for`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import TYPE_CHECKING, ClassVar, Literal

from .answers import Z95, Part, Value, Vector, noise_half_width, symmetric
from .errors import InvalidQuery, PolicyViolation
from .quantiles import histogram_note, histogram_vector, quantile_of
from .survival import kaplan_meier, split_counts

if TYPE_CHECKING:
    from .policy import Column
    from .query import Aggregate

# What the engine knows how to compute per group: rows, non-missing values of the column, the sum
# of the column's clamped fixed-point values, or the sum of those values, or of their squares, after
# subtracting the bounds' midpoint (which makes what one row can add about half as large; a mean's
# "midpoint_sum" centres on the exact midpoint, in half units, so post-processing can add it back);
# or, over the time column's declared grid, rows with an event per bin and then rows censored per bin;
# or, over a column's declared bins, rows per bin (a histogram). Or, for a regression over several
# columns, the upper triangle of ZᵀZ for Z = [1, x1..xp, y], each variable standardised into [-1, 1]
# on a fixed-point grid of REGRESSION_UNIT steps per half-range.
# Or, for a quantile at one site (the exponential mechanism over the declared edges t0 < ... < tm),
# rows per cell of the line the edges cut: below t0, at t0, between t0 and t1, ..., at tm, above tm
# (2(m + 1) + 1 cells), from which the mechanism scores each edge.
ComponentSql = Literal["rows", "values", "sum", "midpoint_sum", "centered_sum", "centered_squares", "survival_bins",
                       "histogram_bins", "regression_products", "candidate_cells"]
REGRESSION_UNIT = 1 << 12  # a standardised value is an integer in [-2^12, 2^12]; a product at most 2^24
MAX_FEATURES = 10


@dataclass(frozen=True)
class ComponentSpec:
    """One noisy component of a kind: its name, how the engine computes it, its share of epsilon.

    A component is one measurement: all its values (over groups, and over bins for a vector) are
    noised together, with the L1 sensitivity k x :meth:`row_bound`.
    """

    name: str
    sql: ComponentSql
    share: Fraction

    def shape(self, column: Column | None, arity: int = 1) -> tuple[int, ...]:
        """Its values per group: () for one; (2, n) for survival's events and censorings at n grid times.

        For a histogram, (n - 1,) over its n edges; for a regression over ``arity`` columns, (m,):
        the entries of the upper triangle of ZᵀZ.
        """
        return self.shape_over(len(column.grid) if column is not None else 0, arity)

    def shape_over(self, edges: int, arity: int = 1) -> tuple[int, ...]:
        """Its shape over a grid of ``edges`` edges (a broker knows the grid from an answer, not a column).

        (2, edges) for survival; (edges - 1,) for a histogram's bins between the edges; the entries of
        ZᵀZ's upper triangle for a regression over ``arity`` columns; () for a scalar.
        """
        if self.sql == "survival_bins":
            return (2, edges)
        if self.sql == "histogram_bins":
            return (edges - 1,)
        if self.sql == "candidate_cells":
            return (2 * edges + 1,)
        if self.sql == "regression_products":
            return (regression_entries(arity),)
        return ()

    def size(self, column: Column | None, arity: int = 1) -> int:
        """How many values it has per group."""
        return math.prod(self.shape(column, arity))

    def row_bound(self, column: Column | None, arity: int = 1) -> int:
        """The largest L1 norm of what one row adds to this component (in one group), in fixed-point units.

        A row adds 1 to a count, and 1 to exactly one bin of a survival vector or a histogram; to each
        entry of a regression's ZᵀZ a product of two standardised values, at most REGRESSION_UNIT^2.
        """
        if self.sql in ("rows", "values", "survival_bins", "histogram_bins", "candidate_cells"):
            return 1
        if self.sql == "regression_products":
            return regression_entries(arity) * REGRESSION_UNIT ** 2
        assert column is not None
        if self.sql == "sum":
            return column.max_contribution
        if self.sql == "midpoint_sum":  # |2 x value - (low + high)| <= high - low, in half units
            low, high = column.fixed_bounds
            return high - low
        centered = column.max_centered_contribution
        return centered if self.sql == "centered_sum" else centered * centered

    def unit(self, column: Column | None) -> int:
        """Fixed-point units per 1 of the component's value."""
        if self.sql in ("rows", "values", "survival_bins", "histogram_bins", "candidate_cells"):
            return 1
        if self.sql == "regression_products":
            return REGRESSION_UNIT ** 2
        assert column is not None
        if self.sql == "midpoint_sum":
            return 2 * column.unit
        return column.unit ** 2 if self.sql == "centered_squares" else column.unit


@dataclass(frozen=True)
class Declared:
    """What the policy declares that post-processing uses (public values, never data).

    ``bounds``: the aggregated column's clamping bounds; ``edges``: its grid (survival's times, a
    histogram's bin edges); ``level``: a quantile's q, from the query; ``column_bounds``: for a kind
    over several bounded columns (regression), each one's bounds.
    A site reads them from its policy, a broker from the sites' answers.
    """

    bounds: tuple[float, float] | None = None
    edges: tuple[float, ...] = ()
    level: float = 0.5  # a quantile's q (public: the query's)
    column_bounds: tuple[tuple[float, float], ...] = ()


def regression_entries(variables: int) -> int:
    """Entries of the upper triangle of ZᵀZ for Z = [1, and ``variables`` columns]."""
    return (variables + 1) * (variables + 2) // 2


class Kind:
    """An aggregate kind. Subclasses set the class attributes and :meth:`estimate`."""

    name: ClassVar[str]
    sql_names: ClassVar[tuple[str, ...]]
    example: ClassVar[str]
    columns: ClassVar[int] = 1
    max_columns: ClassVar[int] = 0  # more than ``columns`` columns may be given, up to this many
    # whether answers carry the bounds of every column (Declared.column_bounds), not just the first's
    bounds_of_every_column: ClassVar[bool] = False
    # the role each column needs, in order (the first column is the one bounds and grids come from)
    roles: ClassVar[tuple[str, ...]] = ("aggregate",)
    components: ClassVar[tuple[ComponentSpec, ...]]
    mechanism: ClassVar[str] = "{}"
    # what an answer's scalar value is, when the kind's main result is a vector (e.g. "median")
    summary: ClassVar[str] = ""
    # its sums are of distances from the bounds' midpoint: sites' sums add only under the same bounds
    midpoint: ClassVar[bool] = False
    # the component whose noise over a group's count is, to first order, the estimate's (a mean's sum)
    per_count: ClassVar[str] = ""
    # the names of the numeric parameters the kind takes after its columns (a quantile's q)
    parameters: ClassVar[tuple[str, ...]] = ()
    # the test between an answer's groups that post-processing gives, if any (survival: gateway.logrank)
    group_test: ClassVar[str] = ""
    # its one component is not noised but selects one of the declared edges (the exponential mechanism)
    selects: ClassVar[bool] = False

    def check(self, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
        """Refuse ``agg`` unless it has this kind's shape; ``column_for(name, role)`` checks a column's role."""
        if self.columns == 0 and agg.columns:
            raise InvalidQuery(f"{self.name} takes no column: use {self.example} (each row of the dataset counts)")
        if not self.takes(len(agg.columns)):
            needs = "a column" if self.columns == 1 else f"{self.columns} columns"
            raise InvalidQuery(f"{self.name} needs {needs}, e.g. {self.example}")
        if agg.params and not self.parameters:
            raise InvalidQuery(f"{self.name} takes no parameters, e.g. {self.example}")
        for name, role in zip(agg.columns, self.roles, strict=False):
            column_for(name, role)

    def takes(self, count: int) -> bool:
        """Whether the kind can be asked over ``count`` columns."""
        return count == self.columns or self.columns <= count <= self.max_columns

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        """The estimate that post-processing of the released ``parts`` gives.

        ``declared`` holds the column's clamping bounds and grid; with ``clamp`` the estimate is
        kept inside what the bounds make possible (a site does; a broker keeps the sites' pooled
        value).
        """
        raise NotImplementedError

    def level(self, agg: Aggregate) -> float | None:
        """The quantile ``agg`` asks for (None: the kind is no quantile)."""
        return None

    def vector_doubles(self, column: Column | None) -> int:
        """How many numbers one group's answer carries beyond a scalar estimate's (for answer sizes)."""
        return 0

    def note(self, agg: Aggregate, column: Column | None) -> str:
        """What a reader of an answer with ``agg`` should know about it ('' when nothing)."""
        return ""

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

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        part = parts["count"]
        return symmetric(part.value, part.std_error, part.half_width)


class Sum(Kind):
    """The sum of a column's values clamped to its bounds."""

    name, sql_names, example = "sum", ("sum",), "sum(column)"
    components = (ComponentSpec("sum", "sum", Fraction(1)),)

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        part = parts["sum"]
        return symmetric(part.value, part.std_error, part.half_width)


class Mean(Kind):
    """A noisy sum of the values' distances from the bounds' midpoint over a noisy count.

    Centred on the midpoint m = (L + U) / 2, one row moves the sum by at most (U - L) / 2 instead
    of max(|L|, |U|): for ages in [0, 120], half the noise. The mean's error is, to first order,
    (sum's noise - (mean - m) x count's noise) / n: the sum's noise dominates and the count's is
    weighed by the mean's distance from the midpoint. The sum gets 3/5 of the epsilon and the count
    2/5, the split that minimises that error's variance when the mean may lie anywhere within the
    bounds with equal chance (an epsilon ratio of 3^(1/3) = 1.44, rounded to 3:2: 9% less variance
    than an even split; 13% more in the worst case, a mean at a bound). The split is fixed by the
    kind, never chosen from data. The interval is that first-order error's exact 95% interval
    (:func:`~gateway.answers.noise_half_width`), intersected with the bounds.
    """

    name, sql_names, example = "mean", ("avg", "mean"), "mean(column)"
    components = (ComponentSpec("sum", "midpoint_sum", Fraction(3, 5)),
                  ComponentSpec("count", "values", Fraction(2, 5)))
    mechanism = "ratio({})"
    midpoint, per_count = True, "sum"

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        total, count = parts["sum"], parts["count"]
        if declared.bounds is None:
            raise ValueError("a mean needs its column's bounds")
        low, high = declared.bounds
        middle = (low + high) / 2
        if count.value < 1:  # nothing is known beyond the bounds: the midpoint, half the range as error
            return Value(middle, (high - low) / 2, (high - low) / 2, low, high, True)
        raw = middle + total.value / count.value
        value = min(max(raw, low), high) if clamp else raw
        offset, n = value - middle, count.value
        se = math.sqrt(total.std_error ** 2 + offset ** 2 * count.std_error ** 2) / n
        half = noise_half_width([(1 / n, total), (-offset / n, count)])
        return Value(value, se, half, max(low, value - half), min(high, value + half), value != raw)


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

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        value, se, half, clamped, top = _variance(parts, declared.bounds)
        return Value(value, se, half, max(0.0, value - half), min(top, value + half), clamped)


class StdDev(Kind):
    """Sample standard deviation: the square root of :class:`Variance`, its interval transformed."""

    name, sql_names, example = "stddev", ("stddev", "stddev_samp"), "stddev(column)"
    components = Variance.components
    mechanism = "stddev({})"

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        variance, se, half, clamped, top = _variance(parts, declared.bounds)
        value = math.sqrt(variance)
        # delta method for the standard error; the interval is the variance's, square-rooted
        sd_se = se / (2 * value) if value > 0 else math.sqrt(se)
        low, high = math.sqrt(max(0.0, variance - half)), math.sqrt(min(top, variance + half))
        return Value(value, sd_se, Z95 * sd_se, low, high, clamped)


def _variance(parts: Mapping[str, Part],
              bounds: tuple[float, float] | None) -> tuple[float, float, float, bool, float]:
    """The variance's estimate and accuracy.

    (variance clamped to what the bounds allow, delta-method std error, the first-order error's
    exact 95% half-width, clamped?, largest possible)
    """
    s1, s2, n = parts["sum"], parts["sum_squares"], parts["count"]
    top = ((bounds[1] - bounds[0]) / 2) ** 2 if bounds is not None else math.inf
    if n.value < 2:  # nothing is known beyond the bounds
        middle = top / 2 if math.isfinite(top) else 0.0
        error = middle if math.isfinite(top) else math.inf
        return middle, error, error, True, top
    count = n.value
    raw = (s2.value - s1.value ** 2 / count) / (count - 1)
    d_s2 = 1 / (count - 1)
    d_s1 = -2 * s1.value / (count * (count - 1))
    d_n = (s1.value / count) ** 2 / (count - 1) - raw / (count - 1)
    se = math.sqrt((d_s2 * s2.std_error) ** 2 + (d_s1 * s1.std_error) ** 2 + (d_n * n.std_error) ** 2)
    half = noise_half_width([(d_s2, s2), (d_s1, s1), (d_n, n)])
    value = min(max(raw, 0.0), top)
    return value, se, half, value != raw, top


class Survival(Kind):
    """Kaplan-Meier survival over the time column's declared grid, with median survival.

    One component, one measurement: per group, the rows with an event at each grid time, then the
    rows censored there (a time counts at the first grid time at or after it; past the grid's end
    it is censored there). A row adds 1 to exactly one of those 2n counts, so one patient's k rows
    move the vector by at most k in L1: the pair needs no split of epsilon. The curve, its band,
    the numbers at risk and the median are post-processing (:mod:`gateway.survival`); the
    estimate's value is the median survival time.
    """

    name, sql_names, example, columns = "survival", ("survival",), "survival(time, event)", 2
    roles = ("aggregate", "event")
    components = (ComponentSpec("counts", "survival_bins", Fraction(1)),)
    mechanism = "kaplan_meier({})"
    summary = "median"
    group_test = "log-rank"

    def check(self, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
        super().check(agg, column_for)
        time = column_for(agg.columns[0], "aggregate")
        if time.bins is None:
            raise PolicyViolation(agg.columns[0], "survival needs a time grid on its time column, and the policy "
                                                  "declares none for this column (bins: {width: ..., max: ...}); "
                                                  "ask the site's privacy officer")

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        counts = parts["counts"]
        events, censored = split_counts(counts.values)
        curve = kaplan_meier(declared.edges, events, censored, counts.std_error ** 2)
        vector = Vector(curve.survival, curve.std_error, curve.ci_low, curve.ci_high, (len(curve.times),))
        return Value(curve.median, math.nan, math.nan, curve.median_low, curve.median_high, curve.clamped, vector)

    def predict(self, parts: Mapping[str, Part]) -> tuple[float, float]:
        """Unknown before running: the median's accuracy depends on the counts."""
        return math.nan, math.nan

    def vector_doubles(self, column: Column | None) -> int:
        assert column is not None
        times = len(column.grid)
        return 2 * times + 4 * times + times  # the counts, the curve with its errors and band, the grid

    def note(self, agg: Aggregate, column: Column | None) -> str:
        assert column is not None
        time, event = agg.columns
        return (f"{agg.label}: Kaplan-Meier at the {len(column.grid)} times of the declared grid "
                f"{column.grid[0]:g}..{column.grid[-1]:g}; each {time} counts at the first grid time at or after it, "
                f"and past {column.grid[-1]:g} is censored there; rows whose {time} is missing or whose {event} is "
                "missing or neither 0 nor 1 are left out; the value is the median survival time")


class Histogram(Kind):
    """Rows per bin of the column's declared bins (one measurement: a row adds 1 to one bin).

    The bins are [t0, t1), [t1, t2), ..., [t(m-1), tm] over the edges the policy declares; a value
    below t0 counts in the first bin and one above tm in the last (clamped, as sums clamp to the
    bounds); a missing value counts nowhere. The estimate's vector is the noisy counts (clipped at
    0) with the noise's 95% interval; its value is the median (:mod:`gateway.quantiles`).
    """

    name, sql_names, example = "histogram", ("histogram",), "histogram(column)"
    components = (ComponentSpec("counts", "histogram_bins", Fraction(1)),)
    mechanism = "histogram({})"
    summary = "median"

    def check(self, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
        super().check(agg, column_for)
        _needs_bins(self, agg, column_for)

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        counts = parts["counts"]
        median = quantile_of(declared.edges, counts.values, counts.std_error ** 2, 0.5)
        return Value(median.value, math.nan, math.nan, median.ci_low, median.ci_high, median.clamped,
                     histogram_vector(counts.values, counts.std_error, counts.half_width))

    def predict(self, parts: Mapping[str, Part]) -> tuple[float, float]:
        """The counts' noise is known; the median's accuracy depends on the counts."""
        return math.nan, math.nan

    def vector_doubles(self, column: Column | None) -> int:
        assert column is not None
        return 5 * len(column.grid)  # the counts, then the shown counts with their errors and intervals

    def note(self, agg: Aggregate, column: Column | None) -> str:
        assert column is not None
        return histogram_note(agg.label, agg.columns[0], column.grid)


class Quantile(Kind):
    """The q-quantile of a column from its noisy histogram over the declared bins (:mod:`gateway.quantiles`).

    One measurement (the histogram); the quantile, interpolated within its bin, and its interval,
    from a band on the cumulative counts that holds the sampling variability and the noise, are
    post-processing. Several quantiles of one histogram cost one epsilon through
    ``Client.quantiles``; in SQL each quantile is its own aggregate and its own measurement.
    """

    name, sql_names, example = "quantile", ("quantile",), "quantile(column, 0.9)"
    components = Histogram.components
    mechanism = "quantile({})"
    parameters: ClassVar[tuple[str, ...]] = ("q",)

    def check(self, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
        super().check(agg, column_for)
        q = dict(agg.params).get("q")
        number = isinstance(q, int | float) and not isinstance(q, bool)
        if [k for k, _ in agg.params] != ["q"] or not number or not 0 < q < 1:  # type: ignore[operator]
            raise InvalidQuery(f"quantile needs q, a number strictly between 0 and 1, e.g. {self.example}; got "
                               f"{', '.join(f'{k}={v!r}' for k, v in agg.params) or 'none'}")
        _needs_bins(self, agg, column_for)

    def level(self, agg: Aggregate) -> float:
        """The quantile's level q."""
        return float(dict(agg.params)["q"])

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        counts = parts["counts"]
        found = quantile_of(declared.edges, counts.values, counts.std_error ** 2, declared.level)
        return Value(found.value, math.nan, math.nan, found.ci_low, found.ci_high, found.clamped)

    def predict(self, parts: Mapping[str, Part]) -> tuple[float, float]:
        """Unknown before running: the quantile's accuracy depends on the counts."""
        return math.nan, math.nan

    def vector_doubles(self, column: Column | None) -> int:
        assert column is not None
        return 2 * len(column.grid)  # the counts (a broker pools them) and the grid

    def note(self, agg: Aggregate, column: Column | None) -> str:
        assert column is not None
        return histogram_note(agg.label, agg.columns[0], column.grid, quantile=True)


class Median(Quantile):
    """The median: :class:`Quantile` at q = 0.5."""

    name, sql_names, example = "median", ("median",), "median(column)"
    mechanism = "median({})"
    parameters = ()

    def check(self, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
        Kind.check(self, agg, column_for)
        _needs_bins(self, agg, column_for)

    def level(self, agg: Aggregate) -> float:
        return 0.5


class SiteQuantile(Quantile):
    """A quantile at one site by OpenDP's quantile mechanism (``QueryRequest.single_site``).

    An exponential mechanism (OpenDP's report noisy max with exponential noise: permute-and-flip)
    selects one of the declared edges t0 < ... < tm, scored by OpenDP's quantile score: for edge c,
    |(1 - q) #(x < c) - q #(x > c)|, the distance of c's rank from the target rank, smaller being
    better. The site releases nothing but the selected edge; the engine computes the rows per cell
    of the line the edges cut (``candidate_cells``: one row adds 1 to one cell), from which
    :mod:`gateway._mechanisms` derives the scores. One row moves every score by at most
    max(q, 1 - q) ranks, one patient by k times that. The estimate is the edge itself; it carries no
    interval on the value (the mechanism gives none, and none is made up from data) but the public
    bound on its rank error that holds with 95% probability (:func:`rank_error_95`). At one site and
    small epsilon it is far more accurate than the histogram's quantile
    (``bench/quantile_accuracy.py``); a broker cannot pool it, so a broker refuses the request. A
    group with no rows scores every edge 0: its edge is drawn uniformly, and says nothing.
    """

    components = (ComponentSpec("choice", "candidate_cells", Fraction(1)),)
    selects = True

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        index = parts["choice"].value
        if not (math.isfinite(index) and 0 <= index < len(declared.edges)):  # a dry run's, or none
            return Value(math.nan, math.nan, math.nan, math.nan, math.nan)
        return Value(declared.edges[int(index)], math.nan, math.nan, math.nan, math.nan)

    def vector_doubles(self, column: Column | None) -> int:
        assert column is not None
        return len(column.grid)  # the edges

    def pool(self, sites: Sequence[Mapping[str, Part]]) -> dict[str, Part]:
        raise ValueError("a single-site quantile is one draw of the exponential mechanism: it cannot be pooled")

    def note(self, agg: Aggregate, column: Column | None) -> str:
        assert column is not None
        return (f"{agg.label}: at this site only, by OpenDP's quantile mechanism (the exponential mechanism over the "
                f"{len(column.grid)} declared bin edges {column.grid[0]:g}..{column.grid[-1]:g} of {agg.columns[0]}): "
                "the value is the edge it selected; there is no interval on the value (ci_low and ci_high are "
                "empty: the mechanism gives none), but with 95% probability the edge's rank misses the target "
                "rank by at most rank_error_95 rows more than the best edge's does; rows whose "
                f"{agg.columns[0]} is missing are left out, and values are clamped to the column's bounds")


class SiteMedian(SiteQuantile):
    """The median at one site: :class:`SiteQuantile` at q = 0.5."""

    name, sql_names, example = Median.name, Median.sql_names, Median.example
    parameters = ()

    def check(self, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
        KINDS["median"].check(agg, column_for)

    def level(self, agg: Aggregate) -> float:
        return 0.5


def rank_error_95(scale: float, candidates: int) -> float:
    """With 95% probability, how many ranks more than the best edge's the selected edge's rank misses by.

    The utility theorem of the exponential mechanism, which report noisy max with exponential noise
    (permute-and-flip; McKenna and Sheldon 2020) satisfies too: at noise ``scale`` s (in ranks;
    s = 2 Δ / epsilon for scores of sensitivity Δ = k max(q, 1 - q) ranks) the selected edge's
    score is worse than the best edge's by more than s (ln |C| + t) with probability at most e^-t,
    over |C| ``candidates``; t = ln 20 for 95%. Public: it depends on epsilon, k, q and the number
    of edges, never on data.
    """
    return scale * math.log(20 * candidates)


def _needs_bins(kind: Kind, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
    """Refuse a column without declared bins: the software needs them; it is no permission refusal."""
    if column_for(agg.columns[0], "aggregate").bins is None:
        raise InvalidQuery(f"{kind.name} needs bins declared on column {agg.columns[0]!r}, and the policy declares "
                           "none: the bins come from the site's privacy officer, never from the data (bins: "
                           "{width: ..., max: ...} or {edges: [...]} on the column); ask the officer to declare "
                           "them, or use mean(column)")


class Regression(Kind):
    """Linear least squares of a response on 1 to :data:`MAX_FEATURES` features, with an intercept.

    One component, one measurement: per group, the upper triangle of ZᵀZ for Z = [1, x1..xp, y],
    each variable clamped to its bounds and standardised into [-1, 1] (centred on the bounds'
    midpoint, divided by half their range) on a grid of :data:`REGRESSION_UNIT` steps, over the rows
    where every one of the variables has a value. One row adds at most 1 (in standardised units) to
    each of the (p + 2)(p + 3)/2 entries: that is its L1 bound. The fit, its standard errors (the
    sampling variance and the noise's) and intervals are post-processing (:mod:`gateway.regression`);
    the estimate's vector is the coefficients, intercept first, and its value R^2.

    At most 10 features: the sensitivity, and so the noise on every entry, grows with the square of
    the number of variables (78 entries at 10 features, 21 at 4), so past about ten features the
    coefficients of a center-sized dataset are mostly noise at the epsilons policies allow.
    """

    name, sql_names, example, columns = "regression", ("regression",), "regression(y, x1, x2)", 2
    max_columns = MAX_FEATURES + 1
    roles = ("aggregate", "aggregate")
    components = (ComponentSpec("products", "regression_products", Fraction(1)),)
    mechanism = "least_squares({})"
    summary = "r_squared"
    bounds_of_every_column = True

    def check(self, agg: Aggregate, column_for: Callable[[str, str], Column]) -> None:
        if not self.takes(len(agg.columns)) or agg.params:
            raise InvalidQuery(f"regression takes the response and then 1 to {MAX_FEATURES} features, "
                               f"e.g. {self.example} (the response y on x1 and x2), and no parameters")
        y, *features = agg.columns
        if y in features:
            raise InvalidQuery(f"the response {y!r} is also among the features; name it once, first")
        repeated = sorted({x for x in features if features.count(x) > 1})
        if repeated:
            raise InvalidQuery(f"feature {repeated[0]!r} is named twice; name each feature once")
        for name in agg.columns:
            column_for(name, "aggregate")

    def estimate(self, parts: Mapping[str, Part], declared: Declared, clamp: bool) -> Value:
        from .regression import fit  # numpy: the site and the broker post-process; the client only reads

        products = parts["products"]
        result = fit(products.values, products.std_error, declared.column_bounds)
        vector = Vector(result.estimate, result.std_error, result.ci_low, result.ci_high, (len(result.estimate),))
        return Value(result.r_squared, math.nan, math.nan, math.nan, math.nan, result.projected, vector)

    def predict(self, parts: Mapping[str, Part]) -> tuple[float, float]:
        """Unknown before running: the coefficients' accuracy depends on the data."""
        return math.nan, math.nan

    def vector_doubles(self, column: Column | None) -> int:
        most = MAX_FEATURES + 1
        return regression_entries(most) + 4 * most + 2 * most  # statistics, fit with errors and intervals, bounds

    def note(self, agg: Aggregate, column: Column | None) -> str:
        y, *features = agg.columns
        return (f"{agg.label}: least squares of {y} on {', '.join(features)} with an intercept, over the rows "
                "where every one of them has a value, each clamped to its bounds; the standard errors include "
                "the noise; the value is R^2")


KINDS: dict[str, Kind] = {kind.name: kind for kind in (Count(), Sum(), Mean(), Variance(), StdDev(), Survival(),
                                                       Histogram(), Quantile(), Median(), Regression())}
BY_SQL_NAME: dict[str, Kind] = {sql: kind for kind in KINDS.values() for sql in kind.sql_names}
# how a kind is released when one site is asked directly for it (QueryRequest.single_site)
SINGLE_SITE: dict[str, Kind] = {kind.name: kind for kind in (SiteQuantile(), SiteMedian())}


def sql_forms() -> list[str]:
    """Every SQL spelling of every kind, e.g. ``count(*)``, ``avg(col)``, ``mean(col)``."""
    return [f"{sql}(col{''.join(', ' + p for p in kind.parameters)})" if kind.columns == 1 else kind.example
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


def kind_for(function: str, single_site: bool = False) -> Kind:
    """The kind named ``function`` as released at one site asked directly (``single_site``) or otherwise.

    With ``single_site`` only medians and quantiles have a release of their own; any other kind is
    :class:`InvalidQuery`.
    """
    kind = kind_of(function)
    if not single_site:
        return kind
    found = SINGLE_SITE.get(kind.name)
    if found is None:
        forms = ", ".join(k.example for k in SINGLE_SITE.values())
        raise InvalidQuery(f"single_site applies to medians and quantiles only ({forms}), and {function} is "
                           "neither; ask for it in a query without single_site")
    return found
