"""A dataset's public description as the site sends it in ListDatasets (only what the policy declares)."""

from __future__ import annotations

from .._proto.gateway.v1 import gateway_pb2 as pb
from .._wire import to_value
from ..policy import Dataset, Policy
from ..templates import template_dataset


def dataset_to_wire(name: str, dataset: Dataset, policy: Policy) -> pb.Dataset:
    """A dataset's public description (no data, only what the policy declares)."""
    limits = policy.epsilon_limits(name)
    columns = []
    for cname, col in dataset.columns.items():
        message = pb.Column(name=cname, type=col.type, roles=list(col.roles), description=col.description,
                            public_keys=[to_value(k) for k in col.group_keys], bins=col.grid)
        if col.bounds is not None:
            message.has_bounds, message.lower, message.upper = True, col.bounds[0], col.bounds[1]
        columns.append(message)
    templates = [pb.Template(name=t, description=tpl.description, sql=tpl.sql,
                             parameters=[pb.TemplateParameter(name=p, type=spec.type, required=spec.default is None)
                                         for p, spec in tpl.params.items()])
                 for t, tpl in policy.templates.items() if template_dataset(tpl.sql) == name]
    return pb.Dataset(name=name, description=dataset.description, privacy_unit=dataset.privacy_unit,
                      max_rows_per_unit=dataset.max_rows_per_unit, columns=columns,
                      aggregates=list(dataset.aggregates), epsilon_default=float(limits.default),
                      epsilon_max=float(limits.max), templates=templates, templates_only=dataset.templates_only,
                      sites=[policy.site])
