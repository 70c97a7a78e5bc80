"""The broker: one gateway.v1 endpoint in front of every site (DESIGN §2).

It verifies the caller's token itself (the sites' issuer keys) and that the caller holds the key
the token is bound to, before any work; then fans each call out to the sites concurrently with a
deadline, forwarding the caller's bearer token, the request as the caller signed it (so each
site can check its proof; ``query_id`` included, so a retry never charges a site twice) and to
each site only the proof of possession addressed to it. It pools the noisy answers:
counts and sums add with their variances; a mean is the ratio of the pooled noisy sums and
counts with a delta-method interval; survival counts add time by time and the curve is drawn from
their sums. It sees no row and holds no budget. A request for single-site quantiles
(``single_site``: one exponential-mechanism draw per site, which cannot be pooled) is refused
before any site is asked.

Every answer names the sites that did not answer, with why: a query's and a budget's
``missing_sites``. ``Status`` lists every configured site with its health now (a status call to
each), its version and the broker's record of its last failure and last success
(:mod:`._status`), for operators.

Faults at a site cost the broker nothing but that site's answer: each call ends by its deadline
(a site that accepts connections and never answers is missing with reason ``deadline``), all
calls end when the caller goes, an answer that pooling cannot trust is left out with reason
``invalid_answer`` (:mod:`._validate`), and a site that restarts is reached again within
``reconnect_seconds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass, replace
from typing import Any

import grpc
from grpc_health.v1.health import HealthServicer

from .._logging import event
from .._proto.gateway.v1 import gateway_pb2 as pb
from .._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from .._server import drain_then_stop, make_server, target_of
from .._sqlfront import parse_sql_cached
from .._transport import Tls
from .._version import __version__
from .._wire import to_structured
from ..auth import Verifier, authorization_header
from ..errors import (
    DeadlineExceeded,
    FailedPrecondition,
    GatewayBug,
    GatewayError,
    InvalidAnswer,
    InvalidQuery,
    ProofRequired,
    Unavailable,
    bounded,
    error_from_rpc,
)
from ..metrics import BrokerMetrics
from ..proof import ANY_SERVER, ProofChecker, check_possession
from ._fanout import Fanout
from ._status import Seen, SiteRecord
from ._validate import invalid_answers
from .config import BrokerConfig
from .pooling import dataset_differences, pool

log = logging.getLogger("gateway.broker")
# A site's answer: at most 3 MiB of rows (the site refuses larger ones before any work) and its
# canonical query (the request is at most 4 MiB); anything larger is a fault at that site.
SITE_ANSWER_MAX = 8 * 2**20


@dataclass(frozen=True)
class _Outcome:
    site: str
    response: Any = None
    error: GatewayError | GatewayBug | None = None
    label: str = "ok"  # its gateway_broker_site_requests_total outcome
    seconds: float = 0.0  # from the fan-out's start to this site's end

    @property
    def reason(self) -> str:
        """Why the site is missing: the error's short reason, ``error`` for a bug there."""
        return self.error.short if isinstance(self.error, GatewayError) else "error"

    @property
    def message(self) -> str:
        return str(self.error.message) if self.error is not None else ""


class BrokerService(pb_grpc.GatewayServicer):
    """gateway.v1 served by the broker."""

    def __init__(self, config: BrokerConfig, metrics: BrokerMetrics, verifier: Verifier) -> None:
        self.config, self.metrics, self.verifier = config, metrics, verifier
        self._proofs = ProofChecker()
        self._fanout = Fanout(config.sites, SITE_ANSWER_MAX, config.reconnect_seconds)
        self.record = SiteRecord()

    def close(self) -> None:
        """Close the channels to the sites, ending any call still in flight."""
        self._fanout.close()

    def _authenticate(self, context: grpc.ServicerContext, request: Any, names: Sequence[str]) -> None:
        """Verify the caller's token, and that it holds the token's key, before any work.

        An outsider learns nothing about the network. A caller lacking a proof for some of ``names``
        learns the names to sign for (:class:`ProofRequired`).
        """
        try:
            identity = self.verifier.verify(authorization_header(context.invocation_metadata()))
            proofs: Mapping[str, str] = request.proofs
            if not proofs:
                check_possession(self._proofs, identity, request, self.config.name)  # raises
            # one proof shows the caller holds the key; each site checks its own
            self._proofs.check(proofs.get(ANY_SERVER, next(iter(proofs.values()))), request, identity.ath,
                               identity.jkt, None)
            if any(name not in proofs for name in names):
                raise ProofRequired(list(names))
        except GatewayError as err:
            context.abort_with_status(err.to_status())

    def _all_sites(self, request: Any, context: grpc.ServicerContext) -> list[str]:
        names = self._names(())
        self._authenticate(context, request, names)
        return names

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        outcomes = self._fan("ListDatasets", request, context, self._all_sites(request, context))
        answered = self._answered_or_abort(outcomes, context)
        versions: dict[str, dict[str, pb.Dataset]] = {}
        for outcome in answered:
            for ds in outcome.response.datasets:
                versions.setdefault(ds.name, {})[outcome.site] = ds
        datasets = []
        for by_site in versions.values():
            merged = pb.Dataset()
            merged.CopyFrom(next(iter(by_site.values())))
            del merged.sites[:]
            merged.sites.extend(by_site)
            merged.differences.extend(dataset_differences(by_site))
            datasets.append(merged)
        return pb.ListDatasetsResponse(datasets=datasets, served_by=self.config.name)

    def GetBudget(self, request: pb.GetBudgetRequest, context: grpc.ServicerContext) -> pb.GetBudgetResponse:
        """Each answering site's budgets of the caller's project, and the sites that did not answer, with why."""
        outcomes = self._fan("GetBudget", request, context, self._all_sites(request, context))
        budgets = []
        for outcome in self._answered_or_abort(outcomes, context):
            for b in outcome.response.budgets:
                b.site = outcome.site  # the name the broker knows the site by, as in `sites`
                budgets.append(b)
        return pb.GetBudgetResponse(budgets=budgets, served_by=self.config.name, missing_sites=_missing(outcomes))

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        """Every configured site: whether it answers now, its version, and the broker's record of it."""
        outcomes = self._fan("Status", request, context, self._all_sites(request, context))
        sites = [self.record.status(o.site, _seen(o), o.response.version if o.response is not None else "", o.seconds)
                 for o in outcomes]
        return pb.StatusResponse(served_by=self.config.name, version=__version__, component="broker", sites=sites)

    def History(self, request: pb.HistoryRequest, context: grpc.ServicerContext) -> pb.HistoryResponse:
        """Each site's history of the caller's project, merged newest first (at most ``limit`` per site)."""
        outcomes = self._fan("History", request, context, self._all_sites(request, context))
        entries = []
        for outcome in self._answered_or_abort(outcomes, context):
            for entry in outcome.response.entries:
                entry.site = outcome.site  # the name the broker knows the site by, as in `sites`
                entries.append(entry)
        entries.sort(key=lambda e: e.at, reverse=True)
        return pb.HistoryResponse(entries=entries, served_by=self.config.name)

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        started = time.perf_counter()
        response: pb.QueryResponse | None = None
        try:
            response = self._query(request, context)
            return response
        finally:
            self.metrics.duration.observe(time.perf_counter() - started)
            _log_query(request, response, context, started)

    def _query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        try:
            names = self._names(request.sites)
        except GatewayError:
            names = []  # unknown sites: said only to a caller who shows it holds the token's key
        self._authenticate(context, request, names)  # before the SQL is parsed or any site is named
        try:
            if request.single_site:  # before any site is asked: nothing is charged anywhere
                raise FailedPrecondition("single-site quantiles cannot be pooled (each is one draw of the exponential "
                                         "mechanism at one site); ask the site directly, or ask this broker without "
                                         "single_site for quantiles pooled from the sites' histograms")
            names = self._names(request.sites)
            if not request.query_id:
                raise InvalidQuery("query_id is required through a broker (the gateway client sets one)",
                                   "query_id")
            shape = request  # what the answers must look like (checked before pooling)
            output_names: dict[str, str] | None = None  # the caller's output names, when the broker can read them
            if request.WhichOneof("body") == "sql":
                # a caller's SQL mistake is answered once here, not by every site; the sites get the SQL
                # as the caller signed it
                parsed = parse_sql_cached(request.sql)
                shape = pb.QueryRequest(dry_run=request.dry_run, structured=to_structured(parsed))
                output_names = dict(parsed.names)
        except GatewayError as err:
            context.abort_with_status(err.to_status())
        outcomes = self._fan("Query", request, context, names, check=lambda found: _poolable(found, shape))
        answered = [o for o in outcomes if o.response is not None]
        if len(answered) < min(self.config.min_sites, len(names)) or not answered:
            self._abort_missing(outcomes, context, len(answered))
        try:
            response = pool([(o.site, o.response) for o in answered], self.config.name)
        except (ValueError, ArithmeticError) as err:  # answers each well formed, yet not poolable together
            log.warning("the sites' answers could not be pooled: %s", err)
            context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                          f"the answers of {', '.join(o.site for o in answered)} could not be pooled together "
                          f"({str(err)[:200]}); ask the network's operator")
        response.query_id = request.query_id
        response.names.update(output_names if output_names is not None else _agreed_names(answered))
        response.missing_sites.extend(_missing(outcomes))
        return response

    def _names(self, requested: Sequence[str]) -> list[str]:
        known = [s.name for s in self.config.sites]
        unknown = sorted(set(requested) - set(known))
        if unknown:
            raise InvalidQuery(f"unknown site(s) {', '.join(unknown)}; this network has: {', '.join(known)}")
        return [n for n in known if n in requested] if requested else known

    def _fan(self, method: str, request: Any, context: grpc.ServicerContext, names: list[str],
             check: Callable[[list[_Outcome]], list[_Outcome]] | None = None) -> list[_Outcome]:
        """Call ``method`` at each named site; ``check`` may turn answers it cannot use into failures."""
        metadata = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
        remaining = context.time_remaining()
        timeout = min(self.config.deadline_seconds, remaining) if remaining is not None else \
            self.config.deadline_seconds
        # asynchronous calls on one loop (._fanout), not a thread each: every call ends by its own
        # deadline however many queries wait on a silent site, and all of them end when the caller goes
        calls = self._fanout.call(method, {name: _for_site(request, name) for name in names}, metadata, timeout)
        if not context.add_callback(calls.cancel):
            calls.cancel()  # the caller had gone already
        try:
            results = calls.result()
        except futures.CancelledError:
            results = [(name, None, futures.CancelledError(), timeout) for name in names]
        outcomes = [replace(_outcome(name, response, error), seconds=seconds)
                    for name, response, error, seconds in results]
        if check is not None:
            outcomes = check(outcomes)
        for outcome in outcomes:
            self.metrics.site_requests.labels(outcome.site, outcome.label).inc()
            if outcome.label != "cancelled":  # the caller went: nothing learned about the site
                self.record.note(_seen(outcome))
        return outcomes

    def _answered_or_abort(self, outcomes: list[_Outcome], context: grpc.ServicerContext) -> list[_Outcome]:
        answered = [o for o in outcomes if o.response is not None]
        if not answered:
            self._abort_missing(outcomes, context, 0)
        return answered

    def _abort_missing(self, outcomes: list[_Outcome], context: grpc.ServicerContext, answered: int) -> None:
        failed = [o for o in outcomes if o.response is None]
        mistakes = [o for o in failed if isinstance(o.error, GatewayError) and o.error.caller_mistake]
        unreached = [o for o in failed if isinstance(o.error, Unavailable | DeadlineExceeded)]
        if (answered == 0 and mistakes and len({type(o.error) for o in mistakes}) == 1
                and len(mistakes) + len(unreached) == len(failed)):
            # a caller's mistake that every site that answered reports the same way is returned as it
            # is, details kept, even when other sites were down: retrying cannot mend it, and a site
            # that comes back would refuse it too
            first = mistakes[0].error
            assert isinstance(first, GatewayError)
            first.message = f"{mistakes[0].site}: {first.message}" + "".join(
                f"; {o.site} did not answer ({o.reason})" for o in unreached)
            context.abort_with_status(first.to_status())
        listed = "; ".join(f"{o.site}: {o.reason} ({o.message})" for o in failed)
        # a retry mends an unreachable site, never a caller's mistake: only then is this UNAVAILABLE
        transient = bool(unreached) and not mistakes
        context.abort(grpc.StatusCode.UNAVAILABLE if transient else grpc.StatusCode.FAILED_PRECONDITION,
                      bounded(f"only {answered} site(s) answered, at least {self.config.min_sites} needed; {listed}"
                              + ("; retrying with the same query_id is safe" if transient else "")))


def _log_query(request: pb.QueryRequest, response: pb.QueryResponse | None, context: grpc.ServicerContext,
               started: float) -> None:
    """The broker's ``query`` event: which sites answered and which did not, or why it refused."""
    fields: dict[str, Any] = {"query_id": request.query_id, "dry_run": request.dry_run,
                              "duration_ms": round((time.perf_counter() - started) * 1000, 1)}
    if response is not None:
        missing = {m.site: m.reason for m in response.missing_sites}
        event(log, "query", f"query answered by {len(response.sites)} site(s), {len(missing)} missing",
              outcome="ok", accepted=True, dataset=response.dataset, sites=list(response.sites),
              missing_sites=missing, epsilon_charged=response.epsilon_charged, **fields)
        return
    code = context.code() if hasattr(context, "code") else None
    status = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    details = context.details() if hasattr(context, "details") else ""
    reason = details.decode(errors="replace") if isinstance(details, bytes) else str(details or "")
    # calls without credentials only at DEBUG: an outsider must not be able to flood the log
    level = logging.DEBUG if status == "UNAUTHENTICATED" else logging.WARNING if status in (
        "UNAVAILABLE", "INTERNAL", "UNKNOWN", "FAILED_PRECONDITION") else logging.INFO
    event(log, "query", f"query refused: {status}", level, outcome=status.lower(), accepted=False, status=status,
          reason=reason[:300], **fields)


def _for_site(request: Any, site: str) -> Any:
    """The caller's request as a site receives it: only that site's proof, and no ``sites`` list."""
    forwarded = type(request)()
    forwarded.CopyFrom(request)
    forwarded.proofs.clear()
    forwarded.proofs[site] = request.proofs[site]
    if "sites" in forwarded.DESCRIPTOR.fields_by_name:
        del forwarded.sites[:]
    return forwarded


def _outcome(site: str, response: Any | None, failure: BaseException | None) -> _Outcome:
    """How one site's call ended: its response, or the error or cancellation that ended it."""
    if failure is None:
        return _Outcome(site, response)
    if isinstance(failure, grpc.RpcError):
        error = error_from_rpc(failure)
        if isinstance(error, ProofRequired):  # the site answers to another name than the broker knows it by
            error = FailedPrecondition(f"the site expects proofs addressed to {', '.join(error.sites)}; the "
                                       "broker's configuration must name it so")
        return _Outcome(site, error=error, label=failure.code().name.lower())
    return _Outcome(site, error=Unavailable("the call was cancelled: the caller has gone"), label="cancelled")


def _seen(outcome: _Outcome) -> Seen:
    return Seen(outcome.site) if outcome.response is not None else Seen(outcome.site, outcome.reason, outcome.message)


def _missing(outcomes: Iterable[_Outcome]) -> list[pb.MissingSite]:
    """The sites that did not answer, with why."""
    return [pb.MissingSite(site=o.site, reason=o.reason, message=o.message) for o in outcomes if o.response is None]


def _agreed_names(answered: Sequence[_Outcome]) -> dict[str, str]:
    """The output names every answering site reports (a template's aliases, which only sites can read)."""
    names = [dict(o.response.names) for o in answered]
    return names[0] if all(n == names[0] for n in names) else {}


def _poolable(outcomes: list[_Outcome], request: pb.QueryRequest) -> list[_Outcome]:
    """``outcomes`` with every answer that pooling cannot trust turned into a missing site (invalid_answer)."""
    problems = invalid_answers([(o.site, o.response) for o in outcomes if o.response is not None], request)
    for site, problem in problems.items():
        log.warning("site %s sent an answer that cannot be pooled: %s", site, problem)
    return [replace(o, response=None, error=InvalidAnswer(f"its answer cannot be pooled: {problems[o.site]}"),
                    label="invalid_answer") if o.site in problems else o for o in outcomes]


@dataclass
class RunningBroker:
    """A started broker."""

    server: grpc.Server
    port: int
    service: BrokerService
    host: str = "127.0.0.1"
    workers: futures.Executor | None = None
    health: HealthServicer | None = None

    @property
    def target(self) -> str:
        """Where clients reach it: ``HOST:PORT`` (IPv6 hosts in brackets)."""
        return target_of(self.host, self.port)

    def stop(self, grace: float = 5.0, drain: float = 0.0) -> None:
        """Stop serving, then end the calls to the sites and the worker threads.

        Health turns NOT_SERVING first; the broker keeps answering for ``drain`` seconds, then
        refuses new calls and gives those in flight ``grace`` seconds.
        """
        drain_then_stop(self.server, self.health, drain, grace)
        self.service.close()
        if self.workers is not None:
            self.workers.shutdown(wait=False)


def build_broker_server(config: BrokerConfig, verifier: Verifier, host: str = "127.0.0.1", port: int = 0,
                        tls: Tls | None = None, metrics: BrokerMetrics | None = None) -> RunningBroker:
    """Start a broker serving gateway.v1 on ``host:port`` (0: any free port)."""
    metrics = metrics or BrokerMetrics()
    metrics.init_sites(s.name for s in config.sites)
    service = BrokerService(config, metrics, verifier)
    server, bound, health, workers = make_server(service, host, port, tls)
    log.debug("broker %s serving on %s:%s for sites %s", config.name, host, bound,
              ", ".join(s.name for s in config.sites))
    return RunningBroker(server, bound, service, host, workers, health)
