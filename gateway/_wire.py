"""Conversions between the wire messages (gateway.v1) and the core's values.

Client-safe: it loads no OpenDP, DuckDB, sqlglot, pydantic or YAML.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from ._proto.gateway.v1 import gateway_pb2 as pb
from .answers import Estimate, Part, Row, Scalar
from .errors import InvalidQuery
from .query import Aggregate, Cohort, Filter, Query


def to_scalar(value: pb.Value) -> Scalar:
    """A wire value as a Python scalar; an unset value is an error."""
    kind = value.WhichOneof("kind")
    if kind is None:
        raise InvalidQuery("a value is empty: set int_value, double_value or string_value")
    if kind == "bool_value":
        raise InvalidQuery("boolean values are not supported by any column type")
    scalar: Scalar = getattr(value, kind)
    if isinstance(scalar, float) and not math.isfinite(scalar):
        raise InvalidQuery("values must be finite numbers")
    return scalar


def to_value(scalar: object) -> pb.Value:
    """A Python scalar as a wire value."""
    if isinstance(scalar, bool):
        return pb.Value(bool_value=scalar)
    if isinstance(scalar, int):
        return pb.Value(int_value=scalar)
    if isinstance(scalar, float):
        return pb.Value(double_value=scalar)
    return pb.Value(string_value=str(scalar))


def from_structured(message: pb.StructuredQuery) -> Query:
    """A structured query message as a :class:`Query` (checked against policy later)."""
    if not message.dataset:
        raise InvalidQuery("structured query needs a dataset")
    aggregates = tuple(Aggregate(a.function.strip().lower(), a.column or None, tuple(a.more_columns),
                                 tuple(sorted((k, to_scalar(v)) for k, v in a.params.items())))
                       for a in message.aggregates)
    return Query(message.dataset, aggregates, tuple(message.group_by), tuple(_filter(f) for f in message.filters))


def _filter(message: pb.Filter, depth: int = 0) -> Filter:
    cohort = None
    if message.HasField("cohort"):
        if depth:
            raise InvalidQuery("a cohort's conditions cannot hold another cohort")
        if not message.cohort.dataset:
            raise InvalidQuery("a cohort filter needs the cohort's dataset")
        cohort = Cohort(message.cohort.dataset, tuple(_filter(f, depth + 1) for f in message.cohort.filters))
    return Filter(message.column, message.op.strip().lower(), tuple(to_scalar(v) for v in message.values), cohort)


def _filter_to_wire(f: Filter) -> pb.Filter:
    message = pb.Filter(column=f.column, op=f.op, values=[to_value(v) for v in f.values])
    if f.cohort is not None:
        message.cohort.dataset = f.cohort.dataset
        message.cohort.filters.extend(_filter_to_wire(g) for g in f.cohort.filters)
    return message


def to_structured(query: Query) -> pb.StructuredQuery:
    """A :class:`Query` as a structured query message."""
    return pb.StructuredQuery(
        dataset=query.dataset,
        aggregates=[pb.Aggregate(function=a.function, column=a.column or "", more_columns=a.more_columns,
                                 params={k: to_value(v) for k, v in a.params}) for a in query.aggregates],
        group_by=list(query.group_by),
        filters=[_filter_to_wire(f) for f in query.filters])


def rows_to_wire(rows: Iterable[Row], group_by: tuple[str, ...]) -> list[pb.ResultRow]:
    """Answer rows as wire rows."""
    return [pb.ResultRow(keys=[pb.GroupKey(column=c, value=to_value(k)) for c, k in zip(group_by, row.keys,
                                                                                          strict=True)],
                         estimates=[estimate_to_wire(e) for e in row.estimates]) for row in rows]


def estimate_to_wire(e: Estimate) -> pb.Estimate:
    """One estimate as a wire message, with the parts it was computed from."""
    message = pb.Estimate(aggregate=e.aggregate, function=e.function, value=e.value, std_error=e.std_error,
                          noise_scale=e.noise_scale, ci_low=e.ci_low, ci_high=e.ci_high,
                          ci_half_width=e.ci_half_width, suppressed=e.suppressed, clamped=e.clamped,
                          mechanism=e.mechanism, epsilon=float(e.epsilon),
                          components=[part_to_wire(p) for p in e.parts], edges=e.edges, level=e.level,
                          rank_error_95=e.rank_error_95 if math.isfinite(e.rank_error_95) else 0.0)
    if e.bounds is not None:
        message.has_bounds, message.lower, message.upper = True, e.bounds[0], e.bounds[1]
    message.column_bounds[:] = [b for pair in e.column_bounds for b in pair]
    if e.vector is not None:
        message.values[:], message.shape[:] = e.vector.values, e.vector.shape
        message.std_errors[:], message.ci_lows[:], message.ci_highs[:] = (e.vector.std_errors, e.vector.ci_lows,
                                                                          e.vector.ci_highs)
    return message


def part_to_wire(p: Part) -> pb.Component:
    """One released part as a wire component (a scalar's one value, or a vector's values and shape)."""
    lattice = p.sources[0][1] if len(p.sources) == 1 else 0.0
    return pb.Component(name=p.name, values=list(p.values) if p.shape else [p.value], shape=p.shape,
                        std_error=p.std_error, ci_half_width=p.half_width, noise_scale=p.noise_scale, lattice=lattice)


def parts_from_wire(message: pb.Estimate) -> dict[str, Part]:
    """The released parts of an estimate, by component name (scalars, or vectors with their shape)."""
    parts = {}
    for c in message.components:
        # one site's noise, known exactly: its scale and its lattice (a pooled part's is not kept)
        known = c.lattice > 0 and math.isfinite(c.lattice) and c.noise_scale > 0 and math.isfinite(c.noise_scale)
        sources = ((c.noise_scale, c.lattice),) if known else ()
        if c.shape:
            parts[c.name] = Part(c.name, math.nan, c.std_error, c.ci_half_width, c.noise_scale, tuple(c.values),
                                 tuple(c.shape), sources)
        else:
            parts[c.name] = Part(c.name, c.values[0] if c.values else math.nan, c.std_error, c.ci_half_width,
                                 c.noise_scale, sources=sources)
    return parts


def bounds_from_wire(message: pb.Estimate) -> tuple[float, float] | None:
    """The column bounds an estimate was clamped to, if it has them."""
    return (message.lower, message.upper) if message.has_bounds else None


def column_bounds_from_wire(message: pb.Estimate) -> tuple[tuple[float, float], ...]:
    """Each column's bounds, for kinds over several bounded columns (empty otherwise)."""
    flat = list(message.column_bounds)
    return tuple(zip(flat[0::2], flat[1::2], strict=True))
