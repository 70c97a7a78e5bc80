"""Conversions between the wire messages (gateway.v1) and the core's values."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from ._proto.gateway.v1 import gateway_pb2 as pb
from .errors import InvalidQuery
from .policy import Dataset, Policy
from .query import Aggregate, Filter, Query, Scalar

if TYPE_CHECKING:  # the broker uses this module and must not load OpenDP
    from .dp import Estimate, Row


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
    aggregates = tuple(Aggregate(a.function.strip().lower(), a.column or None) for a in message.aggregates)
    filters = tuple(Filter(f.column, f.op.strip().lower(), tuple(to_scalar(v) for v in f.values))
                    for f in message.filters)
    return Query(message.dataset, aggregates, tuple(message.group_by), filters)


def to_structured(query: Query) -> pb.StructuredQuery:
    """A :class:`Query` as a structured query message."""
    return pb.StructuredQuery(
        dataset=query.dataset,
        aggregates=[pb.Aggregate(function=a.function, column=a.column or "") for a in query.aggregates],
        group_by=list(query.group_by),
        filters=[pb.Filter(column=f.column, op=f.op, values=[to_value(v) for v in f.values]) for f in query.filters])


def rows_to_wire(rows: Iterable[Row], group_by: tuple[str, ...]) -> list[pb.ResultRow]:
    """Answer rows as wire rows."""
    return [pb.ResultRow(keys=[pb.GroupKey(column=c, value=to_value(k)) for c, k in zip(group_by, row.keys,
                                                                                          strict=True)],
                         estimates=[estimate_to_wire(e) for e in row.estimates]) for row in rows]


def estimate_to_wire(e: Estimate) -> pb.Estimate:
    """One estimate as a wire message."""
    return pb.Estimate(aggregate=e.aggregate, value=e.value, std_error=e.std_error, noise_scale=e.noise_scale,
                       ci_low=e.ci_low, ci_high=e.ci_high, ci_half_width=e.ci_half_width, suppressed=e.suppressed,
                       clamped=e.clamped, mechanism=e.mechanism, epsilon=float(e.epsilon), numerator=e.numerator,
                       denominator=e.denominator, numerator_std_error=e.numerator_std_error,
                       denominator_std_error=e.denominator_std_error)


def dataset_to_wire(name: str, dataset: Dataset, policy: Policy) -> pb.Dataset:
    """A dataset's public description (no data, only what the policy declares)."""
    limits = policy.epsilon_limits(name)
    columns = []
    for cname, col in dataset.columns.items():
        message = pb.Column(name=cname, type=col.type, roles=list(col.roles), description=col.description,
                            public_keys=[to_value(k) for k in col.public_keys])
        if col.bounds is not None:
            message.has_bounds, message.lower, message.upper = True, col.bounds[0], col.bounds[1]
        columns.append(message)
    templates = [pb.Template(name=t, description=tpl.description, sql=tpl.sql,
                             parameters=[pb.TemplateParameter(name=p, type=spec.type, required=spec.default is None)
                                         for p, spec in tpl.params.items()])
                 for t, tpl in policy.templates.items() if _template_dataset(tpl.sql) == name]
    return pb.Dataset(name=name, description=dataset.description, privacy_unit=dataset.privacy_unit,
                      max_rows_per_unit=dataset.max_rows_per_unit, columns=columns,
                      aggregates=list(dataset.aggregates), epsilon_default=float(limits.default),
                      epsilon_max=float(limits.max), templates=templates, templates_only=dataset.templates_only,
                      sites=[policy.site])


def _template_dataset(sql: str) -> str:
    words = sql.replace("\n", " ").split()
    lowered = [w.lower() for w in words]
    return words[lowered.index("from") + 1] if "from" in lowered[:-1] else ""
