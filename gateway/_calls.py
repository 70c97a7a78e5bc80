"""What the synchronous and the asyncio client share: requests, signing, retries and answers.

A client call is: build the request (:func:`query_request`), then per attempt sign it
(:meth:`Caller.sign`), send it, and on an error ask :meth:`Caller.after` whether to call again
(learn the sites to sign for, once per call; back off and retry ``UNAVAILABLE`` with the same
``query_id``, so a retry never pays twice) or raise the typed error. The answer becomes a
:class:`~gateway.results.QueryResult` through :func:`finish`, which warns about missing sites or
refuses the answer when the caller required every site. Only the sending differs between
:mod:`gateway.client` and :mod:`gateway.aio`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import grpc
import polars as pl

from ._proto.gateway.v1 import gateway_pb2 as pb
from ._wire import to_value
from .errors import (
    GatewayBug,
    GatewayError,
    IncompleteAnswer,
    MissingSitesWarning,
    ProofRequired,
    Unavailable,
    error_from_rpc,
)
from .proof import ANY_SERVER, ProofKey
from .results import QueryResult, SurvivalResult

StructuredSpec = Mapping[str, Any]


STATUS_SCHEMA: dict[str, Any] = {"site": pl.String, "health": pl.String, "version": pl.String,
                                  "latency_seconds": pl.Float64,
                                  "last_error_reason": pl.String, "last_error": pl.String,
                                  "last_error_at": pl.Datetime("ms", "UTC"), "last_ok_at": pl.Datetime("ms", "UTC")}


@dataclass(frozen=True)
class ServerStatus:
    """Who serves (``component``: ``site`` or ``broker``) at which version; from a broker, its sites.

    ``sites``: one row per configured site: ``health`` (``serving``, or why not, e.g.
    ``unavailable``), its ``version``, ``latency_seconds``, and the last failure (reason, message,
    time) and last success of any call the broker made to it since it started.
    """

    served_by: str
    version: str
    component: str
    sites: pl.DataFrame


def server_status(response: pb.StatusResponse) -> ServerStatus:
    """The status answer as a :class:`ServerStatus`."""
    def at(text: str) -> datetime | None:
        return datetime.fromisoformat(text) if text else None
    rows = [{"site": s.site, "health": s.health, "version": s.version, "latency_seconds": s.latency_seconds,
             "last_error_reason": s.last_error_reason, "last_error": s.last_error,
             "last_error_at": at(s.last_error_at), "last_ok_at": at(s.last_ok_at)} for s in response.sites]
    return ServerStatus(response.served_by, response.version, response.component,
                        pl.DataFrame(rows, schema=STATUS_SCHEMA))


class Caller:
    """One client's credentials and retry policy, and the site names it has learned to sign for."""

    def __init__(self, token: str | None, proof_key: ProofKey | bytes | str | Path | None, retries: int,
                 sign_for: Sequence[str]) -> None:
        self.token, self.retries = token, retries
        self.proof_key = load_proof_key(proof_key) if token else None
        # names the proofs are addressed to: given (pinned: never widened by a server's answer), or learned
        self.sites: set[str] = set(sign_for)
        self.pinned = bool(sign_for)

    @property
    def metadata(self) -> list[tuple[str, str]]:
        """The call metadata: the bearer token."""
        return [("authorization", f"Bearer {self.token}")] if self.token else []

    def sign(self, request: Any) -> None:
        """Attach a fresh proof per site to ``request`` (each proof is used once: one per attempt).

        A request that names its sites gets proofs for those only: a broker never holds a proof for
        a site the caller left out.
        """
        if self.proof_key is not None and self.token:
            chosen = set(getattr(request, "sites", ()) or ())
            names = sorted(self.sites & chosen if chosen else self.sites)
            self.proof_key.attach(request, self.token, names or [ANY_SERVER])

    def after(self, err: grpc.RpcError, attempt: int, learned: bool) -> tuple[float | None, bool, GatewayError |
                                                                                GatewayBug]:
        """After a failed attempt: (seconds to wait before calling again, or None to raise; learned; the error)."""
        error = error_from_rpc(err)
        if (isinstance(error, ProofRequired) and not learned and not self.pinned
                and not set(error.sites) <= self.sites):
            # the target told us whom to sign for (once per call). A target the caller does not trust
            # could name another site: pass sign_for to fix the names (see docs/threat-model.md)
            self.sites |= set(error.sites)
            return 0.0, True, error
        if isinstance(error, Unavailable) and attempt < self.retries:
            return 0.2 * 2 ** attempt, learned, error
        return None, learned, error


def load_proof_key(given: ProofKey | bytes | str | Path | None) -> ProofKey:
    """The proof key given, or the file named by ``$GATEWAY_PROOF_KEY``."""
    if isinstance(given, ProofKey):
        return given
    if isinstance(given, bytes):
        return ProofKey.from_pem(given)
    path = given if given is not None else os.environ.get("GATEWAY_PROOF_KEY")
    if not path:
        raise ValueError("a token needs the proof key it is bound to: pass proof_key=PATH or set GATEWAY_PROOF_KEY "
                         "(see 'gateway token mint --proof-key')")
    return ProofKey.load(Path(path))


def query_request(sql: str | None, structured: StructuredSpec | None, template: str | None,
                  params: Mapping[str, Any] | None, epsilon: float, dry_run: bool, query_id: str | None,
                  sites: Sequence[str]) -> pb.QueryRequest:
    """The request for one query, given as exactly one of SQL, a structured mapping or a template call."""
    if sum(x is not None for x in (sql, structured, template)) != 1:
        raise ValueError("give exactly one of sql, structured or template")
    request = pb.QueryRequest(query_id=query_id or uuid.uuid4().hex, epsilon=epsilon, dry_run=dry_run,
                              sites=list(sites))
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
    return request


def survival_spec(dataset: str, time: str, event: str, by: str | Sequence[str] | None,
                  filters: Sequence[tuple[str, str, Any]]) -> StructuredSpec:
    """The structured query of a Kaplan-Meier curve per group of ``by``."""
    group_by = [by] if isinstance(by, str) else list(by or ())
    return {"dataset": dataset, "aggregates": [("survival", time, event)], "group_by": group_by,
            "filters": list(filters)}


def histogram_spec(dataset: str, column: str, by: str | Sequence[str] | None,
                   filters: Sequence[tuple[str, str, Any]]) -> StructuredSpec:
    """The structured query of a histogram of ``column`` per group of ``by`` (quantiles derive from it)."""
    group_by = [by] if isinstance(by, str) else list(by or ())
    return {"dataset": dataset, "aggregates": [("histogram", column)], "group_by": group_by,
            "filters": list(filters)}


QUANTILE_METHODS = ("auto", "histogram", "exponential")


def check_method(method: str) -> str:
    """A quantile method the clients know, or ValueError before any call."""
    if method not in QUANTILE_METHODS:
        raise ValueError(f"method must be one of {', '.join(QUANTILE_METHODS)}, got {method!r}: 'histogram' pools "
                         "noisy histograms (with intervals, through a broker too), 'exponential' asks one site for "
                         "OpenDP's quantile mechanism, 'auto' picks 'exponential' at a site and 'histogram' at a "
                         "broker")
    return method


def site_quantiles_spec(dataset: str, column: str, levels: Sequence[float], by: str | Sequence[str] | None,
                        filters: Sequence[tuple[str, str, Any]]) -> StructuredSpec:
    """The structured query of single-site quantiles: one quantile per distinct level (each its own draw)."""
    group_by = [by] if isinstance(by, str) else list(by or ())
    return {"dataset": dataset, "aggregates": [("quantile", column, {"q": q}) for q in dict.fromkeys(levels)],
            "group_by": group_by, "filters": list(filters)}


def regression_spec(dataset: str, y: str, x: Sequence[str], by: str | Sequence[str] | None,
                    filters: Sequence[tuple[str, str, Any]]) -> StructuredSpec:
    """The structured query of a regression of ``y`` on the features ``x`` per group of ``by``."""
    features = [x] if isinstance(x, str) else list(x)
    group_by = [by] if isinstance(by, str) else list(by or ())
    return {"dataset": dataset, "aggregates": [("regression", y, *features)], "group_by": group_by,
            "filters": list(filters)}


def finish(response: pb.QueryResponse, require_all_sites: bool, survival_time: str | None = None,
           stacklevel: int = 3, wrap: Callable[[pb.QueryResponse], QueryResult] | None = None) -> QueryResult:
    """The answer as a result (``wrap`` makes it: a histogram's, say).

    Sites missing from it give a :class:`MissingSitesWarning`, or :class:`IncompleteAnswer` when the
    caller required them all.
    """
    result = QueryResult(response) if survival_time is None else SurvivalResult(response, survival_time)
    if wrap is not None:
        result = wrap(response)
    missing = result.missing_sites
    if missing:
        listed = "; ".join(f"{site} ({why})" for site, why in missing.items())
        pooled = ", ".join(response.sites)
        if require_all_sites:
            raise IncompleteAnswer(
                f"the answer lacks site(s) {listed}; pooled from {pooled} only, which charged for it. Call again "
                f"with query_id={response.query_id!r} to ask the missing sites without paying twice at the others; "
                "the partial answer is this error's .result", missing, response.query_id, result)
        warnings.warn(MissingSitesWarning(f"the answer lacks site(s) {listed}: it is pooled from {pooled} only "
                                          "(pass require_all_sites=True to refuse such answers)", missing),
                      stacklevel=stacklevel)
    return result


def structured_message(spec: StructuredSpec) -> pb.StructuredQuery:
    """Build a structured query message from a plain mapping (see :meth:`gateway.client.Client.query`).

    An aggregate is a kind's name (``"count"``) or a tuple of the name and its columns
    (``("mean", "age")``, ``("survival", "survival_months", "death")``), and last its parameters
    as a mapping (``("quantile", "age", {"q": 0.9})``).
    """
    message = pb.StructuredQuery(dataset=spec["dataset"], group_by=list(spec.get("group_by", ())))
    for agg in spec.get("aggregates", ()):
        function, *columns = (agg,) if isinstance(agg, str) else agg
        params = columns.pop() if columns and isinstance(columns[-1], Mapping) else {}
        message.aggregates.add(function=function, column=columns[0] if columns else "", more_columns=columns[1:],
                               params={k: to_value(v) for k, v in params.items()})
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


@dataclass(frozen=True)
class Plan:
    """What a query would cost and buy (``Client.plan``): nothing is charged to find out.

    ``epsilon``: the privacy loss priced; ``half_widths``: each aggregate's 95% half-width at that
    epsilon (None where it depends on the answer, as a mean's does), the widest over groups;
    ``remaining``: the budget left on the dataset's population; ``queries``: how many such queries
    it pays for; ``feasible``: False when the target half-width needs more than the per-query maximum.
    """

    epsilon: float
    half_widths: dict[str, float | None]
    remaining: float
    queries: int
    feasible: bool = True


def check_plan(epsilon: float | None, half_width: float | None) -> None:
    """``Client.plan`` takes one question: what an epsilon buys, or what a half-width costs."""
    if (epsilon is None) == (half_width is None):
        raise ValueError("give epsilon (what does it buy?) or half_width (what does it cost?)")
    if half_width is not None and not half_width > 0:
        raise ValueError("half_width must be positive")


def plan_from(response: pb.QueryResponse, feasible: bool = True) -> Plan:
    """A :class:`Plan` from a dry run's answer."""
    widths: dict[str, float | None] = {}
    for row in response.rows:
        for e in row.estimates:
            known = None if math.isnan(e.ci_half_width) else e.ci_half_width
            previous = widths.get(e.aggregate)
            widths[e.aggregate] = known if previous is None and e.aggregate not in widths else (
                None if known is None or previous is None else max(previous, known))
    epsilon = response.epsilon_charged
    queries = math.floor(response.budget_remaining / epsilon + 1e-9) if epsilon > 0 else 0
    return Plan(epsilon, widths, response.budget_remaining, queries, feasible)


def widest(plan: Plan) -> float | None:
    """The widest known half-width of a plan (None when none is known ahead)."""
    known = [w for w in plan.half_widths.values() if w is not None]
    return max(known) if known else None


def epsilon_search(target: float, max_epsilon: float, min_epsilon: float = 0.001) -> Generator[float, Plan, Plan]:
    """The smallest epsilon (3 significant digits, rounded up) whose widest known half-width is ``target`` or less.

    A generator: it yields the epsilons to price and is sent their plans (the sync and asyncio
    clients drive it with their own dry runs).
    """
    best = yield max_epsilon
    if widest(best) is None:
        raise ValueError("no aggregate of this query has an accuracy known before it runs (a mean's depends on "
                         "the answer): plan it by epsilon instead")
    if (widest(best) or 0.0) > target:
        return dataclasses.replace(best, feasible=False)
    low, high = min_epsilon, max_epsilon
    for _ in range(40):
        middle = _up3(math.sqrt(low * high))
        if middle >= high or middle <= low:
            break
        plan = yield middle
        if (widest(plan) or 0.0) <= target:
            high, best = middle, plan
        else:
            low = middle
    return best


def _up3(value: float) -> float:
    """``value`` rounded up to 3 significant digits."""
    digits = 2 - math.floor(math.log10(value))
    scale = 10.0 ** digits
    return float(math.ceil(value * scale) / scale)


class Progress:
    """A line on stderr while a call waits (after ``after`` seconds): how long, and how many sites are asked.

    ``enabled``: True, False, or None for "when someone is watching" (stderr is a terminal, or the
    client runs in a notebook). The line is erased when the answer arrives.
    """

    def __init__(self, enabled: bool | None, sites: int, after: float = 1.0, every: float = 0.5) -> None:
        self.enabled = _watched() if enabled is None else enabled
        self.sites, self.after, self.every = sites, after, every
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._shown = False

    def __enter__(self) -> Progress:
        if self.enabled:
            self._thread = threading.Thread(target=self._run, name="gateway-progress", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread is not None:
            self._thread.join()
        if self._shown:
            sys.stderr.write("\r" + " " * 70 + "\r")
            sys.stderr.flush()

    def _run(self) -> None:
        started = time.monotonic()
        if self._done.wait(self.after):
            return
        while not self._done.is_set():
            where = f"{self.sites} sites" if self.sites > 1 else "the server"
            sys.stderr.write(f"\rwaiting for {where}... {time.monotonic() - started:.0f} s")
            sys.stderr.flush()
            self._shown = True
            self._done.wait(self.every)


def _watched() -> bool:
    """Whether a person is likely watching: a terminal on stderr, or an IPython kernel."""
    return sys.stderr.isatty() or "ipykernel" in sys.modules
