"""Mechanisms: pricing a query, and OpenDP noise on the engine's exact aggregates.

The hot path (DESIGN §6): DuckDB computes bounded, clamped exact aggregates; here OpenDP's
vetted discrete Laplace measurement (``make_laplace`` on an integer vector with L1 distance)
adds the noise, with input distance = the L1 sensitivity derived from the policy's bounds and
``max_rows_per_unit`` (never from data). Each measurement's privacy map is checked against the
epsilon it is charged, and measurements are built once per (scale) and reused.

Sensitivities, for the add/remove-one-patient neighbouring relation, k = max rows per patient: each
component of an aggregate kind (:mod:`gateway.aggregates`) declares the most one row adds to it
(the L1 norm of what it adds, for a vector component); the sensitivity is k times that. For a sum,
a row adds its scaled, rounded value clamped as an integer to ``Column.fixed_bounds`` [l, u]: at
most max(|l|, |u|); for a count, 1; for survival's per-bin event and censoring counts, 1 to one of
them; for a histogram's (and a quantile's) per-bin counts, 1 to one bin. A component is one
measurement over all its values (groups, and bins), so a patient's rows spread over several groups
or bins still move it by at most the sensitivity in L1. How released
components become estimates (a mean's ratio, a survival curve) is the kind's post-processing.

A quantile asked of one site directly (``QueryRequest.single_site``) is not noised but selected:
OpenDP's report noisy max (``make_noisy_max`` under pure DP: exponential noise on the scores, which
is permute-and-flip, an exponential mechanism never less accurate than the classic one) picks
one of the declared edges by OpenDP's quantile score, |(1 - q) #(x < c) - q #(x > c)| in units of
1/den for q = num/den (:func:`quantile_scores`, the formula of OpenDP's
``make_quantile_score_candidates``, computed from the engine's exact counts per cell so that no
row leaves the engine). One row moves every score by at most max(num, den - num), one patient by
k times that: the L-infinity sensitivity the measurement's privacy map is checked at. With a
group-by each group gets its own draw, each calibrated to the whole share of epsilon: the map is
linear in the distance, so a patient whose k rows lie in several groups loses at most that share
in all of them together.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from .aggregates import Declared, Kind, rank_error_95
from .answers import Estimate, Part, Row, Scalar, discrete_laplace_half_width, discrete_laplace_std
from .errors import InternalBug, InvalidQuery
from .policy import Column, Dataset
from .query import Aggregate, Query

os.environ.setdefault("RUST_BACKTRACE", "0")  # a set RUST_BACKTRACE=1 makes every OpenDP call slow
os.environ["RUST_BACKTRACE"] = "0"

import opendp.prelude as dp

dp.enable_features("contrib")

_I64_SAFE = 1 << 62
# Exact values stay below 2^62 (policy and engine checks); noise at a scale up to 2^56 leaves that
# headroom with probability 1 - 2^-90: P(|X| > t) ~ exp(-t / scale).
_MAX_SCALE = float(1 << 56)


@dataclass(frozen=True)
class Component:
    """One noisy integer vector (``shape`` values per group), in fixed-point units of 1/``unit``."""

    name: str
    sensitivity: int
    epsilon: Fraction
    scale: float
    unit: int
    shape: tuple[int, ...] = ()
    # a selecting component (the exponential mechanism): its quantile level q, exactly; None when noised
    level: Fraction | None = None

    @property
    def size(self) -> int:
        """Values per group."""
        return math.prod(self.shape)

    @property
    def released(self) -> int:
        """Values released per group: one selected index for a selecting component, else every value."""
        return 1 if self.level is not None else self.size

    def scores(self, cells: Sequence[int]) -> list[list[int]]:
        """Each group's scores of the edges, from its exact counts per cell (a selecting component's)."""
        assert self.level is not None
        return [quantile_scores(cells[g:g + self.size], self.level) for g in range(0, len(cells), self.size)]

    @property
    def std_error(self) -> float:
        """Standard deviation of the noise, in the estimate's units."""
        return discrete_laplace_std(self.scale) / self.unit

    @property
    def half_width(self) -> float:
        """Half-width of the noise's central 95% interval, in the estimate's units."""
        return discrete_laplace_half_width(self.scale) / self.unit

    def part(self, noisy: Sequence[float]) -> Part:
        """One group's released values of this component as a part of its estimate."""
        if self.level is not None:  # the selected edge's index; the noise's scale is on the scores, in ranks
            return Part(self.name, float(noisy[0]), math.nan, math.nan, self.scale / self.unit)
        sources = ((self.scale / self.unit, 1 / self.unit),)
        if not self.shape:
            return Part(self.name, noisy[0] / self.unit, self.std_error, self.half_width, self.scale / self.unit,
                        sources=sources)
        return Part(self.name, math.nan, self.std_error, self.half_width, self.scale / self.unit,
                    tuple(v / self.unit for v in noisy), self.shape, sources)


@dataclass(frozen=True)
class AggregatePlan:
    """How one aggregate is released: its kind, its components and its column's effective bounds."""

    aggregate: Aggregate
    kind: Kind
    components: tuple[Component, ...]
    declared: Declared
    epsilon: Fraction
    rank_error_95: float = math.nan  # a selecting kind's public 95% bound on its rank error

    def mechanism(self, base: str) -> str:
        """The mechanism's name as answers report it, e.g. ``ratio(discrete_laplace)``."""
        return self.kind.mechanism.format(base)


@dataclass(frozen=True)
class Plan:
    """The priced release plan of a query; ``epsilon`` is what the ledger charges."""

    aggregates: tuple[AggregatePlan, ...]
    epsilon: Fraction


def plan_query(query: Query, dataset: Dataset, epsilon: Fraction) -> Plan:
    """Split ``epsilon`` evenly over the aggregates, and each aggregate's share over its components.

    A component's sensitivity is k (max rows per patient) times the most one row can add to it,
    from the column's fixed-point bounds: never from the data.
    """
    if epsilon <= 0:
        raise InternalBug("plan_query needs a positive epsilon")
    share = epsilon / len(query.aggregates)
    k = dataset.max_rows_per_unit
    plans = []
    for agg, kind in zip(query.aggregates, query.kinds(), strict=True):
        column: Column | None = dataset.columns[agg.column] if agg.column is not None else None
        arity = len(agg.columns)
        if kind.selects:
            assert column is not None
            components: tuple[Component, ...] = (_selecting(kind, agg, column, k, share),)
        else:
            sensitivities = [k * spec.row_bound(column, arity) for spec in kind.components]
            for spec, sensitivity in zip(kind.components, sensitivities, strict=True):
                _check_noise_fits(agg, spec.name, sensitivity, share * spec.share, epsilon)
            components = tuple(_component(spec.name, sensitivity, share * spec.share, spec.unit(column),
                                          spec.shape(column, arity))
                               for spec, sensitivity in zip(kind.components, sensitivities, strict=True))
        bounds = _bounds(column) if column is not None and column.bounds is not None else None
        # only a kind released over the grid carries it: a mean of a binned column is pooled whatever its bins
        edges = (column.grid if column is not None and not kind.bounds_of_every_column
                 and any(spec.shape(column) for spec in kind.components) else ())
        every = tuple(_bounds(dataset.columns[c]) for c in agg.columns) if kind.bounds_of_every_column else ()
        level = kind.level(agg)
        declared = Declared(bounds, edges, 0.5 if level is None else level, every)
        first = components[0]
        rank = rank_error_95(first.scale / first.unit, len(edges)) if first.level is not None else math.nan
        plans.append(AggregatePlan(agg, kind, components, declared, share, rank))
    return Plan(tuple(plans), epsilon)


def exact_level(q: float) -> Fraction:
    """A quantile's level as the exact fraction the scores use: q to 1/10,000 (OpenDP's default grain)."""
    return min(max(Fraction(str(q)).limit_denominator(10_000), Fraction(1, 10_000)), Fraction(9_999, 10_000))


def quantile_scores(cells: Sequence[int], level: Fraction) -> list[int]:
    """OpenDP's quantile score of each edge, from the rows per cell the edges cut (smaller is better).

    ``cells`` (2E + 1 of them, for E edges) holds the rows below the first edge, at it, between it and
    the next, ..., at the last edge and above it. For edge i with lt rows below it and gt above,
    the score is |(den - num) lt - num gt| for q = num/den: den times the distance of the edge's
    rank from the target rank, as ``make_quantile_score_candidates`` computes it from the rows.
    """
    num, den = level.numerator, level.denominator
    total = sum(cells)
    scores, below = [], 0
    for i in range((len(cells) - 1) // 2):
        below += cells[2 * i]
        above = total - below - cells[2 * i + 1]
        scores.append(abs((den - num) * below - num * above))
        below += cells[2 * i + 1]
    return scores


def _selecting(kind: Kind, agg: Aggregate, column: Column, k: int, epsilon: Fraction) -> Component:
    """A single-site quantile's selecting component: scores in 1/den ranks, sensitivity k max(num, den - num)."""
    spec = kind.components[0]
    level = exact_level(kind.level(agg) or 0.5)
    sensitivity = k * max(level.numerator, level.denominator - level.numerator)
    return Component(spec.name, sensitivity, epsilon, selection_scale_for(sensitivity, epsilon), level.denominator,
                     spec.shape(column), level)


def _bounds(column: Column) -> tuple[float, float]:
    """A column's effective clamping bounds in its own units (its fixed-point bounds)."""
    low, high = column.fixed_bounds
    return low / column.unit, high / column.unit


def _check_noise_fits(agg: Aggregate, name: str, sensitivity: int, epsilon: Fraction, total: Fraction) -> None:
    """Refuse, before anything is charged, an aggregate whose noise could not fit 64-bit integers."""
    if sensitivity >= _I64_SAFE:
        raise InvalidQuery(f"{agg.label} is not available: one patient can add more to its {name} than the site "
                           "can noise in 64-bit integers; ask the privacy officer to narrow the column's bounds")
    if sensitivity / float(epsilon) > _MAX_SCALE:
        least = sensitivity / _MAX_SCALE * float(total / epsilon)
        raise InvalidQuery(f"epsilon {float(total):g} is too small for {agg.label}: its noise would not fit "
                           f"64-bit integers; ask for at least {least:.3g}")


def _component(name: str, sensitivity: int, epsilon: Fraction, unit: int, shape: tuple[int, ...]) -> Component:
    return Component(name, sensitivity, epsilon, scale_for(sensitivity, epsilon), unit, shape)


def _smallest_scale(start: float, mechanism: Callable[[float], dp.Measurement], sensitivity: int,
                    epsilon: Fraction) -> float:
    """The smallest float scale from ``start`` up whose OpenDP privacy map at ``sensitivity`` is <= ``epsilon``."""
    scale = start
    for _ in range(64):
        if Fraction(mechanism(scale).map(sensitivity)) <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf)
    raise InternalBug(f"no scale found for sensitivity {sensitivity} at epsilon {epsilon}")


@lru_cache(maxsize=4096)
def scale_for(sensitivity: int, epsilon: Fraction) -> float:
    """The smallest float scale whose OpenDP privacy map at ``sensitivity`` is <= ``epsilon``."""
    return _smallest_scale(sensitivity / float(epsilon), measurement, sensitivity, epsilon)


@lru_cache(maxsize=4096)
def measurement(scale: float) -> dp.Measurement:
    """OpenDP's discrete Laplace on an i64 vector under L1 distance, cached per scale."""
    return dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=scale)


@lru_cache(maxsize=4096)
def selection_scale_for(sensitivity: int, epsilon: Fraction) -> float:
    """The smallest float scale whose privacy map of :func:`selection` at ``sensitivity`` is <= ``epsilon``."""
    return _smallest_scale(2 * sensitivity / float(epsilon), selection, sensitivity, epsilon)


@lru_cache(maxsize=4096)
def selection(scale: float) -> dp.Measurement:
    """OpenDP's report noisy max (exponential noise) selecting the smallest u64 score under L-infinity distance."""
    return dp.m.make_noisy_max(dp.vector_domain(dp.atom_domain(T="u64")), dp.linf_distance(T="u64"),
                               dp.max_divergence(), scale=scale, negate=True)


@lru_cache(maxsize=4096)
def _map_within(scale: float, sensitivity: int, epsilon: Fraction) -> bool:
    """OpenDP's privacy map of the cached measurement at ``sensitivity`` is at most ``epsilon``."""
    return Fraction(measurement(scale).map(sensitivity)) <= epsilon


class Noise:
    """The production noise source: OpenDP's sampler. Subclassed only by test fixtures."""

    mechanism = "discrete_laplace"
    selection_mechanism = "report_noisy_max_exponential"

    def apply(self, component: Component, exact: tuple[int, ...]) -> list[int]:
        """Noisy copy of ``exact`` for ``component``."""
        if any(abs(v) >= _I64_SAFE for v in exact):
            raise InternalBug("an exact aggregate is outside the 64-bit range")
        if not _map_within(component.scale, component.sensitivity, component.epsilon):
            raise InternalBug("measurement privacy map exceeds the charged epsilon")
        return list(measurement(component.scale)(list(exact)))

    def select(self, component: Component, exact: tuple[int, ...]) -> list[int]:
        """One selected edge per group for a selecting component; ``exact`` holds each group's counts per cell."""
        if not _selection_within(component.scale, component.sensitivity, component.epsilon):
            raise InternalBug("selection privacy map exceeds the charged epsilon")
        chosen = selection(component.scale)
        return [int(chosen(scores)) for scores in component.scores(exact)]


@lru_cache(maxsize=4096)
def _selection_within(scale: float, sensitivity: int, epsilon: Fraction) -> bool:
    """OpenDP's privacy map of the cached selection at ``sensitivity`` is at most ``epsilon``."""
    return Fraction(selection(scale).map(sensitivity)) <= epsilon


def release(plan: Plan, groups: tuple[tuple[Scalar, ...], ...], exact: tuple[tuple[int, ...], ...],
            noise: Noise, min_count: int = 0) -> list[Row]:
    """Noise every component of ``exact`` (one vector per component) and build the answer rows.

    With ``min_count``, a group whose first noisy count is under it has its estimates withheld
    (post-processing of released values: it costs nothing and promises nothing).
    """
    noisy: list[list[int]] = []
    for component, vector in zip((c for agg in plan.aggregates for c in agg.components), exact, strict=True):
        noisy.append(noise.apply(component, vector) if component.level is None else noise.select(component, vector))
    rows = []
    for g, keys in enumerate(groups):
        estimates, counts, i = [], [], 0
        for agg in plan.aggregates:
            parts = {c.name: c.part(noisy[i + j][g * c.released:(g + 1) * c.released])
                     for j, c in enumerate(agg.components)}
            estimates.append(_estimate(agg, parts, noise.selection_mechanism if agg.kind.selects else noise.mechanism))
            counts += [p.value for p in parts.values() if p.name == "count"]
            i += len(agg.components)
        if min_count and counts and counts[0] < min_count:
            estimates = [e.withheld() for e in estimates]
        rows.append(Row(keys, tuple(estimates)))
    return rows


def predicted(plan: Plan, groups: tuple[tuple[Scalar, ...], ...]) -> list[Row]:
    """Dry-run rows: the accuracy each estimate will have, with no value.

    Each estimate carries its components' noise (values NaN), so that a broker can pool the noise
    and a reader can tell, say, a mean's accuracy for a group of n values.
    """
    estimates = []
    for agg in plan.aggregates:
        first = agg.components[0]
        parts = {c.name: c.part([math.nan] * c.size) for c in agg.components}
        std_error, half_width = agg.kind.predict(parts)
        base = Noise.selection_mechanism if agg.kind.selects else Noise.mechanism
        estimates.append(Estimate(agg.aggregate.label, agg.kind.name, math.nan, std_error, first.scale / first.unit,
                                  math.nan, math.nan, half_width, agg.mechanism(base), agg.epsilon,
                                  parts=tuple(parts.values()), bounds=agg.declared.bounds, edges=agg.declared.edges,
                                  level=agg.kind.level(agg.aggregate) or 0.0, column_bounds=agg.declared.column_bounds,
                                  rank_error_95=agg.rank_error_95))
    return [Row(keys, tuple(estimates)) for keys in groups]


def _estimate(agg: AggregatePlan, parts: dict[str, Part], mechanism: str) -> Estimate:
    first = agg.components[0]
    value = agg.kind.estimate(parts, agg.declared, clamp=True)
    return Estimate(agg.aggregate.label, agg.kind.name, value.value, value.std_error, first.scale / first.unit,
                    value.ci_low, value.ci_high, value.half_width, agg.mechanism(mechanism), agg.epsilon,
                    clamped=value.clamped, parts=tuple(parts.values()), bounds=agg.declared.bounds,
                    vector=value.vector, edges=agg.declared.edges, level=agg.kind.level(agg.aggregate) or 0.0,
                    column_bounds=agg.declared.column_bounds, rank_error_95=agg.rank_error_95)
