"""Differential privacy on exact aggregates: pricing, OpenDP noise, and honest accuracy.

The hot path (DESIGN §6): DuckDB computes bounded, clamped exact aggregates; here OpenDP's
vetted discrete Laplace measurement (``make_laplace`` on an integer vector with L1 distance)
adds the noise, with input distance = the L1 sensitivity derived from the policy's bounds and
``max_rows_per_unit`` (never from data). Each measurement's privacy map is checked against the
epsilon it is charged, and measurements are built once per (scale) and reused.

Sensitivities, for the add/remove-one-patient neighbouring relation, k = max rows per patient:
  count vector over public groups: k;  sum of a column whose scaled, rounded values are clamped as
  integers to ``Column.fixed_bounds`` [l, u] (the declared bounds times 10^d, rounded inward):
  k * max(|l|, |u|);  mean = noisy sum / noisy count, half of its epsilon each.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache

from .accuracy import Z95, discrete_laplace_half_width, discrete_laplace_std, ratio_estimate
from .errors import InternalBug
from .policy import Dataset
from .query import Aggregate, Query, Scalar

os.environ.setdefault("RUST_BACKTRACE", "0")  # a set RUST_BACKTRACE=1 makes every OpenDP call slow
os.environ["RUST_BACKTRACE"] = "0"

import opendp.prelude as dp

dp.enable_features("contrib")

_I64_SAFE = 1 << 62


@dataclass(frozen=True)
class Component:
    """One noisy integer vector: a count, or a fixed-point sum in units of 1/``unit``."""

    kind: str
    sensitivity: int
    epsilon: Fraction
    scale: float
    unit: int

    @property
    def std_error(self) -> float:
        """Standard deviation of the noise, in the estimate's units."""
        return discrete_laplace_std(self.scale) / self.unit

    @property
    def half_width(self) -> float:
        """Half-width of the noise's central 95% interval, in the estimate's units."""
        return discrete_laplace_half_width(self.scale) / self.unit


@dataclass(frozen=True)
class AggregatePlan:
    """How one aggregate is released: its components and (for sum/mean) its clamping bounds."""

    aggregate: Aggregate
    components: tuple[Component, ...]
    bounds: tuple[float, float] | None
    epsilon: Fraction


@dataclass(frozen=True)
class Plan:
    """The priced release plan of a query; ``epsilon`` is what the ledger charges."""

    aggregates: tuple[AggregatePlan, ...]
    epsilon: Fraction


@dataclass(frozen=True)
class Estimate:
    """One released value with its accuracy. Only post-processing of noisy values lives here."""

    aggregate: str
    value: float
    std_error: float
    noise_scale: float
    ci_low: float
    ci_high: float
    ci_half_width: float
    mechanism: str
    epsilon: Fraction
    suppressed: bool = False
    clamped: bool = False
    numerator: float = math.nan
    denominator: float = math.nan
    numerator_std_error: float = math.nan
    denominator_std_error: float = math.nan


@dataclass(frozen=True)
class Row:
    """One public group (empty keys without group-by) and its estimates."""

    keys: tuple[Scalar, ...]
    estimates: tuple[Estimate, ...]


def plan_query(query: Query, dataset: Dataset, epsilon: Fraction) -> Plan:
    """Split ``epsilon`` evenly over the aggregates (a mean splits its share over sum and count)."""
    if epsilon <= 0:
        raise InternalBug("plan_query needs a positive epsilon")
    share = epsilon / len(query.aggregates)
    k = dataset.max_rows_per_unit
    plans = []
    for agg in query.aggregates:
        if agg.function == "count":
            plans.append(AggregatePlan(agg, (_component("count", k, share, 1),), None, share))
            continue
        assert agg.column is not None
        column = dataset.columns[agg.column]
        unit = column.unit
        # the engine clamps each scaled integer to exactly column.fixed_bounds: no row adds more than this
        sensitivity = k * column.max_contribution
        if agg.function == "sum":
            parts: tuple[Component, ...] = (_component("sum", sensitivity, share, unit),)
        else:
            parts = (_component("sum", sensitivity, share / 2, unit), _component("count", k, share / 2, 1))
        low, high = column.fixed_bounds
        plans.append(AggregatePlan(agg, parts, (low / unit, high / unit), share))
    return Plan(tuple(plans), epsilon)


def _component(kind: str, sensitivity: int, epsilon: Fraction, unit: int) -> Component:
    return Component(kind, sensitivity, epsilon, scale_for(sensitivity, epsilon), unit)


@lru_cache(maxsize=4096)
def scale_for(sensitivity: int, epsilon: Fraction) -> float:
    """The smallest float scale whose OpenDP privacy map at ``sensitivity`` is <= ``epsilon``."""
    scale = sensitivity / float(epsilon)
    for _ in range(64):
        if Fraction(measurement(scale).map(sensitivity)) <= epsilon:
            return scale
        scale = math.nextafter(scale, math.inf)
    raise InternalBug(f"no scale found for sensitivity {sensitivity} at epsilon {epsilon}")


@lru_cache(maxsize=4096)
def measurement(scale: float) -> dp.Measurement:
    """OpenDP's discrete Laplace on an i64 vector under L1 distance, cached per scale."""
    return dp.m.make_laplace(dp.vector_domain(dp.atom_domain(T="i64")), dp.l1_distance(T="i64"), scale=scale)


@lru_cache(maxsize=4096)
def _map_within(scale: float, sensitivity: int, epsilon: Fraction) -> bool:
    """OpenDP's privacy map of the cached measurement at ``sensitivity`` is at most ``epsilon``."""
    return Fraction(measurement(scale).map(sensitivity)) <= epsilon


class Noise:
    """The production noise source: OpenDP's sampler. Subclassed only by test fixtures."""

    mechanism = "discrete_laplace"

    def apply(self, component: Component, exact: tuple[int, ...]) -> list[int]:
        """Noisy copy of ``exact`` for ``component``."""
        if any(abs(v) >= _I64_SAFE for v in exact):
            raise InternalBug("an exact aggregate is outside the 64-bit range")
        if not _map_within(component.scale, component.sensitivity, component.epsilon):
            raise InternalBug("measurement privacy map exceeds the charged epsilon")
        return list(measurement(component.scale)(list(exact)))


def release(plan: Plan, groups: tuple[tuple[Scalar, ...], ...], exact: tuple[tuple[int, ...], ...],
            noise: Noise, min_count: int = 0) -> list[Row]:
    """Noise every component of ``exact`` (one vector per component) and build the answer rows."""
    noisy: list[list[int]] = []
    i = 0
    for agg in plan.aggregates:
        for component in agg.components:
            noisy.append(noise.apply(component, exact[i]))
            i += 1
    rows = []
    for g, keys in enumerate(groups):
        estimates, counts, i = [], [], 0
        for agg in plan.aggregates:
            values = [noisy[i + j][g] for j in range(len(agg.components))]
            estimates.append(_estimate(agg, values, noise.mechanism))
            if agg.components[-1].kind == "count":
                counts.append(values[-1])
            i += len(agg.components)
        if min_count and counts and counts[0] < min_count:
            estimates = [_suppressed(e) for e in estimates]
        rows.append(Row(keys, tuple(estimates)))
    return rows


def predicted(plan: Plan, groups: tuple[tuple[Scalar, ...], ...]) -> list[Row]:
    """Dry-run rows: the accuracy each estimate will have, with no value."""
    rows = []
    for keys in groups:
        estimates = []
        for agg in plan.aggregates:
            first = agg.components[0]
            exact = agg.aggregate.function != "mean"
            estimates.append(Estimate(
                agg.aggregate.label, math.nan, first.std_error if exact else math.nan, first.scale / first.unit,
                math.nan, math.nan, first.half_width if exact else math.nan, _mechanism_name(agg, "discrete_laplace"),
                agg.epsilon))
        rows.append(Row(keys, tuple(estimates)))
    return rows


def _mechanism_name(agg: AggregatePlan, base: str) -> str:
    return f"ratio({base})" if agg.aggregate.function == "mean" else base


def _estimate(agg: AggregatePlan, values: list[int], mechanism: str) -> Estimate:
    first = agg.components[0]
    label = agg.aggregate.label
    if agg.aggregate.function != "mean":
        value = values[0] / first.unit
        hw = first.half_width
        return Estimate(label, value, first.std_error, first.scale / first.unit, value - hw, value + hw, hw,
                        mechanism, agg.epsilon)
    assert agg.bounds is not None
    low, high = agg.bounds
    count_part = agg.components[1]
    total, count = values[0] / first.unit, values[1]
    name = _mechanism_name(agg, mechanism)
    value, se, clamped = ratio_estimate(total, count, first.std_error, count_part.std_error, low, high)
    return Estimate(label, value, se, first.scale / first.unit, max(low, value - Z95 * se),
                    min(high, value + Z95 * se), Z95 * se, name, agg.epsilon, clamped=clamped, numerator=total,
                    denominator=float(count), numerator_std_error=first.std_error,
                    denominator_std_error=count_part.std_error)


def _suppressed(e: Estimate) -> Estimate:
    return Estimate(e.aggregate, math.nan, e.std_error, e.noise_scale, math.nan, math.nan, e.ci_half_width,
                    e.mechanism, e.epsilon, suppressed=True, clamped=False)
