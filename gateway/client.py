"""A typed Python client for a site gateway or a broker (same API, same calls).

Example::

    from gateway.client import Client

    with Client("127.0.0.1:50051", token=os.environ["GATEWAY_TOKEN"], proof_key="proof-key.pem") as gw:
        result = gw.query(sql="SELECT stage, count(*) FROM patients GROUP BY stage", epsilon=0.5)
        print(result.to_polars())          # stage, count, count_std_error, count_ci_low, count_ci_high
        print(result.epsilon_charged, result.cached, result.budget_remaining)
        print(gw.budget())

Every gRPC error becomes the typed :class:`~gateway.errors.GatewayError` subclass the server raised,
with its fields (e.g. :class:`~gateway.errors.BudgetExhausted` with ``requested`` and ``remaining``);
an internal error at a server is a :class:`~gateway.errors.GatewayBug`. ``UNAVAILABLE`` is retried
with the same ``query_id``, so a retry never pays twice.

Tokens are bound to the caller's proof key, and every call carries a fresh proof of possession per
site that sees it (:mod:`gateway.proof`): the client signs them, learning the sites' names from the
first answer that asks for them.

Survival in a few lines (a Kaplan-Meier curve per stage over the grid the policy declares)::

    curves = gw.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5)
    print(curves.frame)        # stage, time, survival, ci_low, ci_high, at_risk, events
    print(curves.medians)      # stage, median, ci_low, ci_high
    curves.plot("survival.png")   # needs the plot extra: pip install 'gateway[plot]'
"""

from __future__ import annotations

import math
import os
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import grpc
import polars as pl

from ._proto.gateway.v1 import gateway_pb2 as pb
from ._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from ._transport import Tls, open_channel
from ._wire import parts_from_wire, to_value
from .errors import ProofRequired, Unavailable, error_from_rpc
from .proof import ANY_SERVER, ProofKey
from .survival import numbers_at_risk, split_counts

T = TypeVar("T")
StructuredSpec = Mapping[str, Any]


class QueryResult:
    """An answer: estimates per group with their accuracy, the privacy loss charged, and provenance."""

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

    def to_polars(self) -> pl.DataFrame:
        """One row per group: group columns, then per aggregate its estimate, std_error, ci_low, ci_high."""
        return _frame(self.response.group_by, self.response.rows)

    def per_site(self) -> pl.DataFrame:
        """Each site's own answer (from a broker), with a ``site`` column."""
        frames = [_frame(self.response.group_by, a.rows).with_columns(pl.lit(a.site).alias("site"))
                  for a in self.response.site_answers]
        return pl.concat(frames, how="diagonal") if frames else pl.DataFrame()


class SurvivalResult(QueryResult):
    """A survival answer: per group, the Kaplan-Meier curve over the policy's time grid and its median.

    :attr:`frame` (also :meth:`to_polars`) has the group columns, then ``time`` (each time of the
    policy's grid), ``survival``, its pointwise 95% band ``ci_low``/``ci_high`` (Greenwood's variance
    plus the noise's), and the noisy ``at_risk`` (still at risk just after the grid's previous
    time) and ``events`` (after the previous time, up to ``time``). :attr:`medians` has the group
    columns, ``median``, ``ci_low`` and ``ci_high`` (None where the curve or its band does not
    reach 0.5 on the grid). A suppressed group's values are None.
    """

    def __init__(self, response: pb.QueryResponse, time: str = "time") -> None:
        super().__init__(response)
        self.time = time

    @property
    def group_by(self) -> list[str]:
        """The group columns."""
        return list(self.response.group_by)

    @property
    def frame(self) -> pl.DataFrame:
        """One row per group and grid time (see the class docstring)."""
        records = []
        for row in self.response.rows:
            keys, e = _keys(row), row.estimates[0]
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
        schema = _key_schema(self.response) | dict.fromkeys(
            ("time", "survival", "ci_low", "ci_high", "at_risk", "events"), pl.Float64)
        return pl.DataFrame(records, schema=schema)

    @property
    def medians(self) -> pl.DataFrame:
        """Median survival per group with its 95% interval."""
        records = [{**_keys(row), "median": _finite(row.estimates[0].value), "ci_low": _finite(row.estimates[0].ci_low),
                    "ci_high": _finite(row.estimates[0].ci_high)} for row in self.response.rows]
        schema = _key_schema(self.response) | dict.fromkeys(("median", "ci_low", "ci_high"), pl.Float64)
        return pl.DataFrame(records, schema=schema)

    def to_polars(self) -> pl.DataFrame:
        """The curves: :attr:`frame`."""
        return self.frame

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


def _keys(row: pb.ResultRow) -> dict[str, Any]:
    return {k.column: getattr(k.value, k.value.WhichOneof("kind") or "string_value") for k in row.keys}


def _key_schema(response: pb.QueryResponse) -> dict[str, Any]:
    """Polars types of the group columns, from the first row's keys (strings when there are none)."""
    kinds = {"int_value": pl.Int64, "double_value": pl.Float64, "bool_value": pl.Boolean}
    first = response.rows[0].keys if response.rows else []
    return {k.column: kinds.get(k.value.WhichOneof("kind") or "", pl.Utf8) for k in first} or {
        column: pl.Utf8 for column in response.group_by}


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _frame(group_by: Sequence[str], rows: Sequence[pb.ResultRow]) -> pl.DataFrame:
    records = []
    for row in rows:
        record: dict[str, Any] = _keys(row)
        for e in row.estimates:
            record[e.aggregate] = None if math.isnan(e.value) else e.value
            record[f"{e.aggregate}_std_error"] = e.std_error
            record[f"{e.aggregate}_ci_low"] = None if math.isnan(e.ci_low) else e.ci_low
            record[f"{e.aggregate}_ci_high"] = None if math.isnan(e.ci_high) else e.ci_high
            if e.suppressed:
                record[f"{e.aggregate}_suppressed"] = True
        records.append(record)
    return pl.DataFrame(records)


class Client:
    """Talks gateway.v1 to one target (a site or a broker).

    ``token``: the caller's JWT; ``proof_key``: the private key it is bound to (a
    :class:`~gateway.proof.ProofKey`, PEM bytes or a PEM file's path; default: the file named by
    ``$GATEWAY_PROOF_KEY``). ``sign_for``: the names of the sites the target calls (a site: its own),
    when known; otherwise the first call learns them (one extra round trip).
    """

    def __init__(self, target: str, token: str | None = None, tls: Tls | None = None,
                 timeout: float = 60.0, retries: int = 3,
                 proof_key: ProofKey | bytes | str | Path | None = None, sign_for: Sequence[str] = ()) -> None:
        self.target, self.token, self.timeout, self.retries = target, token, timeout, retries
        self._proof_key = _proof_key(proof_key) if token else None
        # names the proofs are addressed to: given (saves the first call's round trip), or learned
        self._sites: set[str] = set(sign_for)
        self._channel = open_channel(target, tls)
        self._stub = pb_grpc.GatewayStub(self._channel)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def datasets(self) -> list[pb.Dataset]:
        """The datasets this caller may query, with columns, roles, bounds and costs."""
        return list(self._call(self._stub.ListDatasets, pb.ListDatasetsRequest()).datasets)

    def budget(self, dataset: str = "") -> pl.DataFrame:
        """The caller's budget per population (and per site, through a broker).

        ``dataset`` narrows it to that dataset's population; ``datasets`` lists the datasets that
        share each budget (they hold the same patients).
        """
        response = self._call(self._stub.GetBudget, pb.GetBudgetRequest(dataset=dataset))
        return pl.DataFrame([{"site": b.site, "population": b.population or b.dataset, "dataset": b.dataset,
                              "datasets": ", ".join(b.datasets) or b.dataset, "project": b.project,
                              "limit": b.limit, "spent": b.spent, "remaining": b.remaining, "period": b.period,
                              "resets_at": b.resets_at or None} for b in response.budgets],
                            schema={"site": pl.Utf8, "population": pl.Utf8, "dataset": pl.Utf8, "datasets": pl.Utf8,
                                    "project": pl.Utf8, "limit": pl.Float64, "spent": pl.Float64,
                                    "remaining": pl.Float64, "period": pl.Utf8, "resets_at": pl.Utf8})

    def query(self, sql: str | None = None, *, structured: StructuredSpec | None = None,
              template: str | None = None, params: Mapping[str, Any] | None = None, epsilon: float = 0.0,
              dry_run: bool = False, query_id: str | None = None, sites: Sequence[str] = ()) -> QueryResult:
        """Run one query, given as SQL, a structured mapping or an approved template with params.

        ``structured`` looks like ``{"dataset": "patients", "aggregates": ["count", ("mean", "age")],
        "group_by": ["stage"], "filters": [("sex", "=", "F")]}``; a cohort filter is
        ``("patient_id", "in", {"dataset": "treatments", "filters": [("treatment_type", "=", "surgery")]})``
        (or ``"not in"``). ``epsilon=0`` uses the policy default.
        """
        request = pb.QueryRequest(query_id=query_id or uuid.uuid4().hex, epsilon=epsilon, dry_run=dry_run,
                                  sites=list(sites))
        if sum(x is not None for x in (sql, structured, template)) != 1:
            raise ValueError("give exactly one of sql, structured or template")
        if sql is not None:
            request.sql = sql
        elif template is not None:
            request.template.name = template
            for key, value in (params or {}).items():
                request.template.params[key].CopyFrom(to_value(",".join(map(str, value))
                                                      if isinstance(value, list | tuple) else value))
        else:
            assert structured is not None
            request.structured.CopyFrom(structured_message(structured))
        return QueryResult(self._call(self._stub.Query, request))

    def survival(self, dataset: str, *, time: str, event: str, by: str | Sequence[str] | None = None,
                 epsilon: float = 0.0, filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                 query_id: str | None = None, sites: Sequence[str] = ()) -> SurvivalResult:
        """Kaplan-Meier survival of ``dataset`` over the policy's time grid on ``time``, per group of ``by``.

        ``event`` is the event column (1: the event, 0: censored). Its SQL form is
        ``SELECT stage, survival(time, event) FROM dataset GROUP BY stage``.
        """
        group_by = [by] if isinstance(by, str) else list(by or ())
        spec = {"dataset": dataset, "aggregates": [("survival", time, event)], "group_by": group_by,
                "filters": list(filters)}
        return SurvivalResult(self.query(structured=spec, epsilon=epsilon, dry_run=dry_run, query_id=query_id,
                                         sites=sites).response, time)

    def _call(self, method: Callable[..., T], request: Any) -> T:
        metadata = [("authorization", f"Bearer {self.token}")] if self.token else []
        attempt, learned = 0, False
        while True:
            if self._proof_key is not None and self.token:  # a fresh proof per attempt: each is used once
                self._proof_key.attach(request, self.token, sorted(self._sites) or [ANY_SERVER])
            try:
                return method(request, metadata=metadata, timeout=self.timeout)
            except grpc.RpcError as err:
                error = error_from_rpc(err)
                if isinstance(error, ProofRequired) and not learned and not set(error.sites) <= self._sites:
                    self._sites |= set(error.sites)  # the target told us whom to sign for: once per call
                    learned = True
                    continue
                if isinstance(error, Unavailable) and attempt < self.retries:
                    time.sleep(0.2 * 2 ** attempt)
                    attempt += 1
                    continue
                raise error from None


def _proof_key(given: ProofKey | bytes | str | Path | None) -> ProofKey:
    if isinstance(given, ProofKey):
        return given
    if isinstance(given, bytes):
        return ProofKey.from_pem(given)
    path = given if given is not None else os.environ.get("GATEWAY_PROOF_KEY")
    if not path:
        raise ValueError("a token needs the proof key it is bound to: pass proof_key=PATH or set GATEWAY_PROOF_KEY "
                         "(see 'gateway token mint --proof-key')")
    return ProofKey.load(Path(path))


def structured_message(spec: StructuredSpec) -> pb.StructuredQuery:
    """Build a structured query message from a plain mapping (see :meth:`Client.query`).

    An aggregate is a kind's name (``"count"``) or a tuple of the name and its columns
    (``("mean", "age")``, ``("survival", "survival_months", "death")``).
    """
    message = pb.StructuredQuery(dataset=spec["dataset"], group_by=list(spec.get("group_by", ())))
    for agg in spec.get("aggregates", ()):
        function, *columns = (agg,) if isinstance(agg, str) else agg
        message.aggregates.add(function=function, column=columns[0] if columns else "", more_columns=columns[1:])
    for f in spec.get("filters", ()):
        message.filters.append(_filter_message(*f))
    return message


def _filter_message(column: str, op: str, value: Any) -> pb.Filter:
    """``(column, op, value)``; a cohort is ``("patient_id", "in", {"dataset": "treatments", "filters": [...]})``."""
    if isinstance(value, Mapping):
        cohort = pb.Cohort(dataset=value["dataset"], filters=[_filter_message(*f) for f in value.get("filters", ())])
        return pb.Filter(column=column, op=op, cohort=cohort)
    values = value if isinstance(value, list | tuple) else [value]
    return pb.Filter(column=column, op=op, values=[to_value(v) for v in values])
