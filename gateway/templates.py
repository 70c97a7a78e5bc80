"""Approved query templates: named, parameterised SQL a privacy officer lists in the policy."""

from __future__ import annotations

import fnmatch
from collections.abc import Collection, Mapping

import yaml

from ._sqlfront import ParamValue, parse_sql
from ._yamlfile import line_index
from .answers import Scalar
from .errors import GatewayError, InvalidQuery, NotFound, PermissionDenied
from .policy import LoadedPolicy, Parameter, Policy, Template
from .query import Filter, Query, check_query

_SAMPLE: dict[str, ParamValue] = {"integer": 0, "float": 0.0, "string": "x", "list[integer]": (0,),
                                  "list[float]": (0.0,), "list[string]": ("x",)}


def resolve_template(policy: Policy, name: str, params: Mapping[str, object], project: str,
                     datasets: Collection[str] | None = None) -> Query:
    """The query a template call stands for, with typed parameters (defaults filled in).

    An unknown name's error lists only the templates ``project`` may run (on ``datasets``, the
    datasets it may query, when given).
    """
    template = policy.templates.get(name)
    mine = sorted(t for t, spec in policy.templates.items()
                  if any(fnmatch.fnmatchcase(project, p) for p in spec.projects)
                  and (datasets is None or template_dataset(spec.sql) in datasets))
    if template is None:
        raise NotFound(f"unknown template {name!r}; your templates here: {', '.join(mine) or 'none'}")
    if not any(fnmatch.fnmatchcase(project, p) for p in template.projects):
        raise PermissionDenied(f"project {project!r} may not run template {name!r}")
    unknown = set(params) - set(template.params)
    if unknown:
        raise InvalidQuery(f"template {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                           f"its parameters: {', '.join(template.params) or 'none'}")
    values: dict[str, ParamValue] = {}
    for pname, spec in template.params.items():
        if pname in params:
            values[pname] = _typed(pname, spec, params[pname])
        elif spec.default is not None:
            values[pname] = _typed(pname, spec, spec.default)
        else:
            raise InvalidQuery(f"template {name!r} needs parameter {pname!r} ({spec.type})")
    return parse_sql(template.sql, values)


def template_dataset(sql: str) -> str:
    """The dataset a template's SQL reads (the word after FROM), without parsing it."""
    words = sql.replace("\n", " ").split()
    lowered = [w.lower() for w in words]
    return words[lowered.index("from") + 1] if "from" in lowered[:-1] else ""


def _typed(name: str, spec: Parameter, value: object) -> ParamValue:
    if spec.type.startswith("list["):
        items = value if isinstance(value, list | tuple) else (value,)
        inner = spec.type[5:-1]
        if not items:
            raise InvalidQuery(f"parameter {name!r} needs at least one value")
        return tuple(_scalar(name, inner, v) for v in items)
    return _scalar(name, spec.type, value)


def _scalar(name: str, kind: str, value: object) -> Scalar:
    if kind == "string" and isinstance(value, str):
        return value
    if kind == "integer" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float" and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise InvalidQuery(f"parameter {name!r} must be {kind}, got {value!r}")


def validate_templates(loaded: LoadedPolicy) -> list[str]:
    """Problems (``file:line: field: reason``) with the policy's templates, checked against its datasets."""
    problems = []
    for name, template in loaded.policy.templates.items():
        try:
            query = parse_sql(template.sql, _samples(template))
            # stand-in values can make a valid BETWEEN look reversed: check structure, not value order
            filters = tuple(Filter(f.column, f.op, (f.values[0], f.values[0])) if f.op == "between" else f
                            for f in query.filters)
            check_query(Query(query.dataset, query.aggregates, query.group_by, filters), loaded.policy)
        except GatewayError as err:
            problems.append(f"{loaded.path}:{_line_of(loaded, name)}: templates.{name}.sql: {err.message}")
    return problems


def _samples(template: Template) -> dict[str, ParamValue]:
    return {n: _typed(n, p, p.default) if p.default is not None else _SAMPLE[p.type]
            for n, p in template.params.items()}


def _line_of(loaded: LoadedPolicy, name: str) -> int:
    node = yaml.compose(loaded.path.read_text(encoding="utf-8"), Loader=yaml.SafeLoader)
    lines = line_index(node)
    return lines.get(("templates", name, "sql"), lines.get(("templates", name), 1))
