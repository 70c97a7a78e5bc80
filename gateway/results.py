"""What the client hands a researcher: answers as frames, datasets as typed objects, budgets as a frame.

An answer's frames keep one schema whatever the answer holds: every aggregate has its estimate,
``std_error``, ``ci_low``, ``ci_high`` and ``suppressed`` columns even when no cell is suppressed,
and each site's answer from a broker has the same columns as the pooled one, so code written
against one answer works on the next. SQL ``AS`` aliases name the columns (the server returns them
beside the answer: an alias is presentation and changes neither the price nor the stored answer).

Shared by :mod:`gateway.client` and :mod:`gateway.aio`; imports no server library.
"""

from __future__ import annotations

import html
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import polars as pl

from ._proto.gateway.v1 import gateway_pb2 as pb
from ._wire import parts_from_wire
from .errors import MissingSitesWarning
from .logrank import LogRank, logrank_of
from .survival import numbers_at_risk, split_counts

_STATS = ("std_error", "ci_low", "ci_high")
LONG_COLUMNS = ("aggregate", "estimate", "std_error", "ci_low", "ci_high", "suppressed", "clamped")


class QueryResult:
    """An answer: estimates per group with their accuracy, the privacy loss charged, and provenance.

    ``to_polars()`` is wide (one row per group), ``to_long()`` tidy (one row per group and
    aggregate), ``to_pandas()`` the wide frame for pandas (``pip install 'gateway[pandas]'``).
    """

    def __init__(self, response: pb.QueryResponse) -> None:
        self.response = response

    @property
    def epsilon_charged(self) -> float:
        """Privacy loss charged for this answer (0 when served from the store)."""
        return self.response.epsilon_charged

    @property
    def cached(self) -> bool:
        """True when this is a stored answer to an identical earlier query (charged nothing)."""
        return self.response.cached

    @property
    def budget_remaining(self) -> float:
        """The project's remaining budget on the dataset's population after this query."""
        return self.response.budget_remaining

    @property
    def notes(self) -> list[str]:
        """What a reader of the answer should know (e.g. which rows no group holds)."""
        return list(self.response.notes)

    @property
    def query_id(self) -> str:
        """The idempotency key the answer is stored under."""
        return self.response.query_id

    @property
    def sites(self) -> list[str]:
        """Sites whose answers are pooled in this result (from a broker)."""
        return list(self.response.sites) or [self.response.served_by]

    @property
    def missing_sites(self) -> dict[str, str]:
        """Sites that did not answer, with why (from a broker)."""
        return {m.site: f"{m.reason}: {m.message}" for m in self.response.missing_sites}

    @property
    def names(self) -> dict[str, str]:
        """Output column of each aggregate label and group column (its SQL alias, or itself)."""
        given = dict(self.response.names)
        return {c: given.get(c, c) for c in (*self.response.group_by, *self.response.aggregates)}

    @property
    def aggregates(self) -> list[str]:
        """The aggregates' output names, in the query's order."""
        names = self.names
        return [names[a] for a in self.response.aggregates]

    @property
    def group_by(self) -> list[str]:
        """The group columns' output names."""
        names = self.names
        return [names[c] for c in self.response.group_by]

    def to_polars(self) -> pl.DataFrame:
        """One row per group (wide).

        Columns: the group columns, then per aggregate its estimate (named for the aggregate) and
        its ``_std_error``, ``_ci_low``, ``_ci_high`` and ``_suppressed`` columns.
        """
        return self._wide(self.response.rows)

    def to_long(self) -> pl.DataFrame:
        """One row per group and aggregate (tidy: ready to plot or facet).

        Columns: the group columns, ``aggregate``, ``estimate``, ``std_error``, ``ci_low``,
        ``ci_high``, ``suppressed``, ``clamped``.
        """
        return self._long(self.response.rows)

    def to_pandas(self) -> Any:
        """:meth:`to_polars` as a ``pandas.DataFrame`` (needs ``pip install 'gateway[pandas]'``)."""
        _need_pandas()
        return self.to_polars().to_pandas()

    def per_site(self, long: bool = False) -> pl.DataFrame:
        """Each site's own answer (from a broker) with a leading ``site`` column.

        The columns are those of :meth:`to_polars` (with ``long``, of :meth:`to_long`) whatever
        each site suppressed.
        """
        build = self._long if long else self._wide
        frames = [build(a.rows).select(pl.lit(a.site).alias("site"), pl.all()) for a in self.response.site_answers]
        return pl.concat(frames) if frames else build([]).select(pl.lit("").alias("site"), pl.all()).clear()

    def _key_schema(self) -> dict[str, Any]:
        names = self.names
        return {names.get(c, c): t for c, t in _key_schema(self.response).items()}

    def _wide(self, rows: Sequence[pb.ResultRow]) -> pl.DataFrame:
        names = self.names
        schema = self._key_schema()
        for label in self.response.aggregates:
            name = names[label]
            schema |= {name: pl.Float64} | {f"{name}_{s}": pl.Float64 for s in _STATS}
            schema[f"{name}_suppressed"] = pl.Boolean
        records = []
        for row in rows:
            record = self._keys(row)
            for e in row.estimates:
                name = names.get(e.aggregate, e.aggregate)
                record |= {name: _finite(e.value), f"{name}_std_error": _finite(e.std_error),
                           f"{name}_ci_low": _finite(e.ci_low), f"{name}_ci_high": _finite(e.ci_high),
                           f"{name}_suppressed": e.suppressed}
            records.append(record)
        return pl.DataFrame(records, schema=schema, strict=False)  # mixed keys become text

    def _long(self, rows: Sequence[pb.ResultRow]) -> pl.DataFrame:
        names = self.names
        schema = self._key_schema() | {"aggregate": pl.Utf8} | dict.fromkeys(LONG_COLUMNS[1:5], pl.Float64) | {
            "suppressed": pl.Boolean, "clamped": pl.Boolean}
        records = [self._keys(row) | {"aggregate": names.get(e.aggregate, e.aggregate), "estimate": _finite(e.value),
                                      "std_error": _finite(e.std_error), "ci_low": _finite(e.ci_low),
                                      "ci_high": _finite(e.ci_high), "suppressed": e.suppressed,
                                      "clamped": e.clamped}
                   for row in rows for e in row.estimates]
        return pl.DataFrame(records, schema=schema, strict=False)  # mixed keys become text

    def _keys(self, row: pb.ResultRow) -> dict[str, Any]:
        names = self.names
        return {names.get(c, c): v for c, v in _keys(row).items()}

    def _summary(self) -> str:
        r = self.response
        what = "dry run: would charge" if r.dry_run else "charged"
        text = (f"{r.dataset}: {len(r.rows)} row(s) of {', '.join(self.aggregates)}"
                f"{' by ' + ', '.join(self.group_by) if r.group_by else ''}; epsilon {what} "
                f"{r.epsilon_charged:g}, budget remaining {r.budget_remaining:g}"
                f"{' (stored answer, no charge)' if r.cached else ''}; sites: {', '.join(self.sites)}")
        missing = "; ".join(f"{site} ({why})" for site, why in self.missing_sites.items())
        return text + (f"; MISSING: {missing}" if missing else "")

    def __repr__(self) -> str:
        notes = "".join(f"\nnote: {n}" for n in self.notes)
        return f"<{type(self).__name__} {self._summary()}>\n{self.to_polars()}{notes}"

    def _repr_html_(self) -> str:
        notes = "".join(f"<li>{html.escape(n)}</li>" for n in self.notes)
        frame = self.to_polars()._repr_html_()
        return (f"<div><p><b>{type(self).__name__}</b> {html.escape(self._summary())}</p>{frame}"
                + (f"<ul>{notes}</ul>" if notes else "") + "</div>")


class SurvivalResult(QueryResult):
    """A survival answer: per group, the Kaplan-Meier curve over the policy's time grid and its median.

    :attr:`frame` (also :meth:`to_polars`) has the group columns, then ``time`` (each time of the
    policy's grid), ``survival``, its pointwise 95% band ``ci_low``/``ci_high`` (Greenwood's variance
    plus the noise's), and the noisy ``at_risk`` (still at risk just after the grid's previous
    time) and ``events`` (after the previous time, up to ``time``). :attr:`medians` has the group
    columns, ``median``, ``ci_low`` and ``ci_high`` (None where the curve or its band does not
    reach 0.5 on the grid). A suppressed group's values are None. :attr:`logrank` tests whether the
    groups' survival differs, with a p-value calibrated for the noise (:mod:`gateway.logrank`).
    """

    def __init__(self, response: pb.QueryResponse, time: str = "time") -> None:
        super().__init__(response)
        self.time = time

    @property
    def frame(self) -> pl.DataFrame:
        """One row per group and grid time (see the class docstring)."""
        records = []
        for row in self.response.rows:
            keys, e = self._keys(row), row.estimates[0]
            bins = len(e.edges)
            nothing: list[float | None] = [None] * bins  # a dry run, or a withheld cell
            at_risk, events = nothing, nothing
            counts = parts_from_wire(e).get("counts")
            if counts is not None and not e.suppressed:
                risk, deaths, _ = numbers_at_risk(*split_counts(counts.values))
                at_risk, events = list(risk), list(deaths)
            values = [[_finite(v) for v in vector] if len(vector) == bins else nothing
                      for vector in (e.values, e.ci_lows, e.ci_highs)]
            records += [{**keys, "time": time, "survival": values[0][i], "ci_low": values[1][i],
                         "ci_high": values[2][i], "at_risk": at_risk[i], "events": events[i]}
                        for i, time in enumerate(e.edges)]
        schema = self._key_schema() | dict.fromkeys(
            ("time", "survival", "ci_low", "ci_high", "at_risk", "events"), pl.Float64)
        return pl.DataFrame(records, schema=schema, strict=False)  # mixed keys become text

    @property
    def medians(self) -> pl.DataFrame:
        """Median survival per group with its 95% interval."""
        records = [{**self._keys(row), "median": _finite(row.estimates[0].value),
                    "ci_low": _finite(row.estimates[0].ci_low), "ci_high": _finite(row.estimates[0].ci_high)}
                   for row in self.response.rows]
        schema = self._key_schema() | dict.fromkeys(("median", "ci_low", "ci_high"), pl.Float64)
        return pl.DataFrame(records, schema=schema, strict=False)  # mixed keys become text

    @cached_property
    def logrank(self) -> LogRank:
        """The log-rank test between the groups (each row: a combination of the group-by keys).

        ``statistic`` (chi-square), ``df`` (groups - 1), ``p_value`` from a parametric bootstrap
        under the null with the answer's own noise (``draws`` draws, seeded by the answer, so the
        same answer gives the same p-value), ``method``, and a ``note`` (why there is no test with
        one group; which withheld groups are left out). Post-processing: it costs no budget.
        """
        return logrank_of(self.response)

    def to_polars(self) -> pl.DataFrame:
        """The curves: :attr:`frame`."""
        return self.frame

    def __repr__(self) -> str:
        test = f"\n{self.logrank}" if len(self.response.rows) > 1 and not self.response.dry_run else ""
        return super().__repr__() + test

    def plot(self, path: str | Path, title: str | None = None) -> Path:
        """Write the curves as a PNG (one per group, shaded bands, numbers at risk); returns ``path``.

        Needs matplotlib: ``pip install 'gateway[plot]'``.
        """
        from .plot import survival_plot

        if not self.response.rows or not self.response.rows[0].estimates[0].edges:
            raise ValueError("this answer holds no curve to plot (a dry run?)")
        head = self.response.rows[0].estimates[0]
        return survival_plot(self.frame, self.medians, self.group_by, head.edges[0], Path(path),
                             title or head.aggregate, self.time)


@dataclass(frozen=True)
class Column:
    """A column a caller may use: its type, roles, clamping bounds, public group keys and grid."""

    name: str
    type: str
    roles: tuple[str, ...]
    bounds: tuple[float, float] | None = None
    public_keys: tuple[Any, ...] = ()
    bins: tuple[float, ...] = ()
    description: str = ""


@dataclass(frozen=True)
class Template:
    """An approved, parameterised query: ``parameters`` maps each name to (type, required)."""

    name: str
    sql: str
    parameters: Mapping[str, tuple[str, bool]]
    description: str = ""


@dataclass(frozen=True)
class Dataset:
    """A dataset this caller may query, and at which sites (with how their declarations differ)."""

    name: str
    description: str
    privacy_unit: str
    max_rows_per_unit: int
    columns: tuple[Column, ...]
    aggregates: tuple[str, ...]
    epsilon_default: float
    epsilon_max: float
    templates: tuple[Template, ...] = ()
    templates_only: bool = False
    sites: tuple[str, ...] = ()
    differences: tuple[str, ...] = ()

    def column(self, name: str) -> Column:
        """The column called ``name`` (KeyError when there is none)."""
        for c in self.columns:
            if c.name == name:
                return c
        raise KeyError(f"{self.name} has no column {name!r}; it has {', '.join(c.name for c in self.columns)}")


def dataset_from_wire(ds: pb.Dataset) -> Dataset:
    """The typed form of one ``ListDatasets`` entry."""
    columns = tuple(Column(c.name, c.type, tuple(c.roles), (c.lower, c.upper) if c.has_bounds else None,
                           tuple(_value(v) for v in c.public_keys), tuple(c.bins), c.description)
                    for c in ds.columns)
    templates = tuple(Template(t.name, t.sql, {p.name: (p.type, p.required) for p in t.parameters}, t.description)
                      for t in ds.templates)
    return Dataset(ds.name, ds.description, ds.privacy_unit, ds.max_rows_per_unit, columns, tuple(ds.aggregates),
                   ds.epsilon_default, ds.epsilon_max, templates, ds.templates_only, tuple(ds.sites),
                   tuple(ds.differences))


BUDGET_SCHEMA: dict[str, Any] = {"site": pl.Utf8, "population": pl.Utf8, "dataset": pl.Utf8, "datasets": pl.Utf8,
                 "project": pl.Utf8, "limit": pl.Float64, "spent": pl.Float64, "remaining": pl.Float64,
                 "period": pl.Utf8, "resets_at": pl.Datetime("us", "UTC")}


def budget_frame(response: pb.GetBudgetResponse) -> pl.DataFrame:
    """One row per budget; ``resets_at`` is a UTC datetime (None when the budget never resets).

    Sites that did not answer a broker are not in it: a :class:`~gateway.errors.MissingSitesWarning`
    names them, with why.
    """
    if response.missing_sites:
        missing = {m.site: f"{m.reason}: {m.message}" for m in response.missing_sites}  # as a query's
        warnings.warn(MissingSitesWarning("the budgets lack site(s) " + "; ".join(
            f"{site} ({why})" for site, why in missing.items()) + ": they did not answer", missing), stacklevel=3)
    return pl.DataFrame([{"site": b.site, "population": b.population or b.dataset, "dataset": b.dataset,
                          "datasets": ", ".join(b.datasets) or b.dataset, "project": b.project,
                          "limit": b.limit, "spent": b.spent, "remaining": b.remaining, "period": b.period,
                          "resets_at": datetime.fromisoformat(b.resets_at) if b.resets_at else None}
                         for b in response.budgets], schema=BUDGET_SCHEMA)


def _need_pandas() -> None:
    try:
        import pandas  # type: ignore[import-untyped]  # noqa: F401
        import pyarrow  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        raise ImportError("to_pandas() needs pandas and pyarrow: pip install 'gateway[pandas]' "
                          "(or 'gateway-client[pandas]'); to_polars() needs neither") from None


def _value(value: pb.Value) -> Any:
    return getattr(value, value.WhichOneof("kind") or "string_value")


def _keys(row: pb.ResultRow) -> dict[str, Any]:
    return {k.column: _value(k.value) for k in row.keys}


def _key_schema(response: pb.QueryResponse) -> dict[str, Any]:
    """Polars types of the group columns, from every row's keys (pooled and per site).

    A column whose keys are of one kind gets that type; mixed kinds (e.g. years and a policy's
    "(missing)" group) are text; no rows: text.
    """
    kinds = {"int_value": pl.Int64, "double_value": pl.Float64, "bool_value": pl.Boolean}
    seen: dict[str, set[str]] = {column: set() for column in response.group_by}
    rows = [*response.rows, *(row for answer in response.site_answers for row in answer.rows)]
    for row in rows:
        for k in row.keys:
            seen.setdefault(k.column, set()).add(k.value.WhichOneof("kind") or "")
    return {column: kinds.get(next(iter(found)), pl.Utf8) if len(found) == 1 else pl.Utf8
            for column, found in seen.items()}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


class HistoryResult:
    """A project's past answers (``Client.history``): a frame, and each answer as it was released."""

    def __init__(self, response: pb.HistoryResponse) -> None:
        self.response = response

    @property
    def frame(self) -> pl.DataFrame:
        """One row per answer, newest first.

        Columns: site, at (UTC datetime), query_id, dataset, epsilon_charged, canonical_query.
        """
        return pl.DataFrame(
            [{"site": e.site, "at": _utc(e.at), "query_id": e.query_id, "dataset": e.dataset,
              "epsilon_charged": e.epsilon_charged, "canonical_query": e.canonical_query}
             for e in self.response.entries],
            schema={"site": pl.Utf8, "at": pl.Datetime("us", "UTC"), "query_id": pl.Utf8, "dataset": pl.Utf8,
                    "epsilon_charged": pl.Float64, "canonical_query": pl.Utf8})

    @property
    def results(self) -> dict[tuple[str, str], QueryResult]:
        """Each answer as it was released, by (site, query_id)."""
        return {(e.site, e.query_id): QueryResult(e.answer) for e in self.response.entries}

    def __repr__(self) -> str:
        spent = sum(e.epsilon_charged for e in self.response.entries)
        return f"<HistoryResult: {len(self.response.entries)} answer(s), epsilon {spent:g} in all>\n{self.frame}"


def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
