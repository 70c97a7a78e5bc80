"""The site's gRPC edge: identity, guarding, audit and metrics around the query pipeline.

Every call is authenticated here (token, and with mTLS the peer's certificate name); a query is
then handed to :class:`~.pipeline.Pipeline` with one snapshot of the live policy, and the edge
records the outcome in the audit log and the metrics. A caller's mistake becomes its rich gRPC
status; anything else is logged here and answered INTERNAL, with no detail.

No answer or refusal leaves without its durable audit record (a fresh release's is written with
its charge): when the record cannot be written the call is answered UNAVAILABLE instead. Calls
without valid credentials are the exception: they are counted per source and recorded at most
once per interval (:class:`~._rejections.RejectionCounter`), so an outsider cannot fill the disk.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import grpc
from grpc_health.v1.health import HealthServicer

from .. import _mechanisms as mechanisms
from .._engine import NO_LIMITS, EngineLimits
from .._logging import event
from .._proto.gateway.v1 import gateway_pb2 as pb
from .._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from .._server import drain_then_stop, make_server, target_of
from .._transport import Tls
from .._version import __version__
from ..audit import AuditLog, iso_time
from ..auth import Identity, Verifier, authorization_header
from ..errors import INTERNAL_MESSAGE, AuditUnavailable, GatewayError, InternalBug, InvalidQuery, PermissionDenied
from ..ledger import VERSION as LEDGER_VERSION
from ..ledger import Ledger, SqliteLedger, anchored_records
from ..metrics import SiteMetrics
from ..proof import ProofCarrier, ProofChecker, check_possession
from ._datasets import dataset_to_wire
from ._rejections import RejectionCounter
from ._reload import Live, PolicyWatcher, load_live, publish_metrics
from ._statedir import StateDir, hold_state_dir, readable_ledger
from .pipeline import Answered, Pipeline, legacy_scopes, project_budgets, usable_datasets

log = logging.getLogger("gateway.site")
MAX_HISTORY = 1000
T = TypeVar("T")


@dataclass
class SiteState:
    """Everything a site process holds: live policy, ledger, audit log, metrics, verifier."""

    live: Live
    ledger: Ledger
    audit: AuditLog
    metrics: SiteMetrics
    verifier: Verifier
    state_dir: Path
    noise: mechanisms.Noise = field(default_factory=mechanisms.Noise)
    allowed_peers: tuple[str, ...] = ()
    proofs: ProofChecker = field(default_factory=ProofChecker)
    rejections: RejectionCounter = field(default_factory=RejectionCounter)
    engine_limits: EngineLimits = NO_LIMITS


class SiteService(pb_grpc.GatewayServicer):
    """gateway.v1 served by one site."""

    def __init__(self, state: SiteState) -> None:
        self.state = state
        self.pipeline = Pipeline(state.ledger, state.noise)

    # -- calls ---------------------------------------------------------------------------------

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        return _guarded(context, lambda: self._list_datasets(request, context))

    def _list_datasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext
                       ) -> pb.ListDatasetsResponse:
        identity = self._identify(context, request)
        policy = self.state.live.loaded.policy
        datasets = [dataset_to_wire(name, policy.datasets[name], policy) for name in usable_datasets(policy, identity)]
        return pb.ListDatasetsResponse(datasets=datasets, served_by=policy.site)

    def GetBudget(self, request: pb.GetBudgetRequest, context: grpc.ServicerContext) -> pb.GetBudgetResponse:
        return _guarded(context, lambda: self._get_budget(request, context))

    def History(self, request: pb.HistoryRequest, context: grpc.ServicerContext) -> pb.HistoryResponse:
        return _guarded(context, lambda: self._history(request, context))

    def Status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        return _guarded(context, lambda: self._status(request, context))

    def _status(self, request: pb.StatusRequest, context: grpc.ServicerContext) -> pb.StatusResponse:
        """Who serves and at which version (to a caller with valid credentials only)."""
        self._identify(context, request)
        return pb.StatusResponse(served_by=self.state.live.loaded.policy.site, version=__version__, component="site")

    def _history(self, request: pb.HistoryRequest, context: grpc.ServicerContext) -> pb.HistoryResponse:
        """The caller's project's own released answers, newest first (never another project's)."""
        identity = self._identify(context, request)
        site = self.state.live.loaded.policy.site
        entries = []
        for query_id, when, epsilon, stored in self.state.ledger.history(identity.project, history_limit(request)):
            answer = pb.QueryResponse.FromString(stored)
            answer.query_id = query_id
            entries.append(pb.HistoryEntry(query_id=query_id, at=iso_time(when), epsilon_charged=float(epsilon),
                                           dataset=answer.dataset, canonical_query=answer.canonical_query,
                                           answer=answer, site=site))
        return pb.HistoryResponse(entries=entries, served_by=site)

    def _get_budget(self, request: pb.GetBudgetRequest, context: grpc.ServicerContext) -> pb.GetBudgetResponse:
        identity = self._identify(context, request)
        policy = self.state.live.loaded.policy
        budgets = []
        for scope, rule, state in project_budgets(self.state.ledger, policy, identity, request.dataset,
                                                  datetime.now(UTC)):
            population = policy.datasets[scope.dataset].population_name
            self.state.metrics.set_budget(population, identity.project, float(state.limit), float(state.spent))
            budgets.append(pb.Budget(dataset=scope.dataset, project=identity.project, limit=float(state.limit),
                                     spent=float(state.spent), remaining=float(state.remaining), period=rule.period,
                                     resets_at=state.resets_at, site=policy.site, limit_exact=_exact(state.limit),
                                     spent_exact=_exact(state.spent), remaining_exact=_exact(state.remaining),
                                     population=population, datasets=policy.populations()[population]))
        return pb.GetBudgetResponse(budgets=budgets, served_by=policy.site)

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        started = time.perf_counter()
        for due in self.state.rejections.due(time.time()):
            self._record_rejections(due)
        try:
            identity = self._identify(context, request)
        except GatewayError as err:
            self._unidentified(context, err, started)
        record: dict[str, object] = {"event": "query", "dry_run": request.dry_run, "subject": identity.subject,
                                     "project": identity.project, "role": identity.role}
        try:
            answered = self._query(request, identity, record, context)
        except GatewayError as err:
            self._refuse(context, record, err, started)
        except Exception:
            log.exception("query failed")
            self._refuse(context, record, None, started)
        response = answered.response
        outcome = "dry_run" if response.dry_run else "cached" if response.cached else "ok"
        record.update(outcome=outcome, epsilon_charged=response.epsilon_charged)
        if not answered.audited:
            try:
                self.state.audit.append(record)
            except AuditUnavailable as err:  # no answer leaves without its record
                self._count(response.dataset, err.outcome, started)
                record.update(outcome=err.outcome, status=err.code.name, reason=err.message[:300])
                _log_query(record, started)
                context.abort_with_status(err.to_status())
        self._count(response.dataset, outcome, started)
        _log_query(record, started)
        return response

    def _unidentified(self, context: grpc.ServicerContext, err: GatewayError, started: float) -> NoReturn:
        """Refuse a call without valid credentials: counted per source in the audit, not recorded one by one."""
        reason = re.split(r"[:;(]", err.message, maxsplit=1)[0].strip()[:60]
        for due in self.state.rejections.add(_source(context.peer()), reason, time.time()):
            self._record_rejections(due)
        self._count("_unknown", err.outcome, started)
        context.abort_with_status(err.to_status())
        raise InternalBug("abort returned")

    def _refuse(self, context: grpc.ServicerContext, record: dict[str, object], err: GatewayError | None,
                started: float) -> NoReturn:
        """Record a refusal (``err``; None: a bug, answered INTERNAL) and send it; UNAVAILABLE if unrecorded."""
        dataset = str(record.get("dataset", "_unknown"))
        if err is None:
            record.update(outcome="error", status="INTERNAL")
            try:
                self.state.audit.append(record)
            except AuditUnavailable:
                log.error("the audit record of an internal error could not be written")
            self._count(dataset, "error", started)
            _log_query(record, started)
            context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
            raise InternalBug("abort returned")
        record.update(outcome=err.outcome, status=err.code.name, reason=err.message[:300])
        if not (isinstance(err, AuditUnavailable) and err.recorded):  # else its release record is queued already
            try:
                self.state.audit.append(record)
            except AuditUnavailable as unwritten:
                err = unwritten
                record.update(outcome=err.outcome, status=err.code.name, reason=err.message[:300])
        self._count(dataset, err.outcome, started)
        _log_query(record, started)
        context.abort_with_status(err.to_status())
        raise InternalBug("abort returned")

    def _query(self, request: pb.QueryRequest, identity: Identity, record: dict[str, object],
               context: grpc.ServicerContext) -> Answered:
        live = self.state.live  # the one policy snapshot this request sees
        answered = self.pipeline.run(request, identity, live.loaded.policy, live.engine, datetime.now(UTC), record,
                                     expired=lambda: _gone(context))
        for scope, state in answered.budgets:  # the project's own budget, then the population's cap
            population = live.loaded.policy.datasets[scope.dataset].population_name
            if scope.shared:
                self.state.metrics.set_cap(population, float(state.limit), float(state.spent))
            else:
                self.state.metrics.set_budget(population, identity.project, float(state.limit), float(state.spent))
        return answered

    # -- policy and budget helpers --------------------------------------------------------------

    def _identify(self, context: grpc.ServicerContext, request: ProofCarrier) -> Identity:
        """The caller, once its token, its proof for this very call and its certificate check out."""
        if self.state.allowed_peers:
            names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
            if not set(names) & set(self.state.allowed_peers):
                log.warning("rejected peer %s (certificate names %s)", context.peer(), names)
                raise PermissionDenied("this site does not accept calls from your client certificate")
        identity = self.state.verifier.verify(authorization_header(context.invocation_metadata()))
        check_possession(self.state.proofs, identity, request, self.state.live.loaded.policy.site)
        return identity

    def _count(self, dataset: str, outcome: str, started: float) -> None:
        known = dataset if dataset in self.state.live.loaded.policy.datasets else "_unknown"
        self.state.metrics.queries.labels(known, outcome).inc()
        self.state.metrics.duration.labels(known).observe(time.perf_counter() - started)

    def _record_rejections(self, record: dict[str, Any]) -> None:
        try:
            self.state.audit.append(record, wait=False)
        except AuditUnavailable:
            log.warning("audit log closed: %d rejection(s) without credentials not recorded",
                        record["unauthenticated_rejections"])


_LOGGED = ("outcome", "dataset", "project", "subject", "role", "query_id", "dry_run", "epsilon_charged", "status",
           "reason", "canonical_hash")


def _log_query(record: dict[str, object], started: float) -> None:
    """The ``query`` event: accepted or refused and why (what the audit records, less the canonical query)."""
    outcome = str(record.get("outcome"))
    accepted = outcome in ("ok", "cached", "dry_run")
    level = logging.INFO if accepted or outcome not in ("unavailable", "error") else logging.WARNING
    fields = {k: record[k] for k in _LOGGED if k in record}
    event(log, "query", f"query {'accepted' if accepted else 'refused'}: {outcome}", level,
          accepted=accepted, duration_ms=round((time.perf_counter() - started) * 1000, 1), **fields)


def history_limit(request: pb.HistoryRequest) -> int:
    """How many entries a History call asks for: 50 by default, at most 1000."""
    if request.limit > MAX_HISTORY:
        raise InvalidQuery(f"limit {request.limit} is more than the {MAX_HISTORY} entries History returns at once",
                           "limit")
    return request.limit or 50


def _guarded(context: grpc.ServicerContext, call: Callable[[], T]) -> T:
    """Run a read-only call, turning gateway errors into their status and anything else into INTERNAL."""
    try:
        return call()
    except GatewayError as err:
        context.abort_with_status(err.to_status())
    except Exception:
        log.exception("call failed")
        context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
    raise InternalBug("abort returned")


def _source(peer: str) -> str:
    """Where a call came from, without its port: ``ipv4:10.0.0.7``, ``ipv6:[::1]``, ``unix``."""
    kind, _, rest = peer.partition(":")
    return f"{kind}:{rest.rsplit(':', 1)[0]}" if kind in ("ipv4", "ipv6") else kind or "unknown"


def _gone(context: grpc.ServicerContext) -> bool:
    """Whether the caller can no longer receive an answer (cancelled, or past its deadline)."""
    remaining = context.time_remaining()
    return not context.is_active() or (remaining is not None and remaining <= 0)


def _exact(value: Fraction) -> str:
    return str(value.numerator) if value.denominator == 1 else f"{value.numerator}/{value.denominator}"


@dataclass(frozen=True)
class SiteOptions:
    """How to run one site gateway."""

    policy: Path
    state_dir: Path
    verifier: Verifier
    host: str = "127.0.0.1"
    port: int = 0
    tls: Tls | None = None
    allowed_peers: tuple[str, ...] = ()
    reload_interval: float = 2.0
    init: bool = False  # begin a new ledger although the audit log has a history
    rejection_interval: float = 60.0  # calls without credentials: at most one audit record per source per interval
    engine_limits: EngineLimits = NO_LIMITS  # the operator's limits on DuckDB's memory and threads


@dataclass
class RunningSite:
    """A started site: its gRPC server, bound port, state and policy watcher."""

    server: grpc.Server
    port: int
    state: SiteState
    watcher: PolicyWatcher
    host: str = "127.0.0.1"
    held: StateDir | None = None
    workers: futures.Executor | None = None
    health: HealthServicer | None = None

    @property
    def target(self) -> str:
        """Where clients reach it: ``HOST:PORT`` (IPv6 hosts in brackets)."""
        return target_of(self.host, self.port)

    def stop(self, grace: float = 5.0, drain: float = 0.0) -> None:
        """Stop serving, then close ledger, audit and engine. Idempotent.

        Health turns NOT_SERVING first; the site keeps answering for ``drain`` seconds (probes and
        load balancers see it and move traffic away), then refuses new calls and gives those in
        flight ``grace`` seconds.
        """
        if self.watcher.stopped.is_set():
            return
        self.watcher.stopped.set()
        drain_then_stop(self.server, self.health, drain, grace)
        if self.workers is not None:
            self.workers.shutdown(wait=False)
        self.watcher.close_retired()
        self.state.ledger.close()
        for record in self.state.rejections.drain():
            self.state.audit.append(record, wait=False)
        self.state.audit.close()
        self.state.live.engine.close()
        if self.held is not None:
            self.held.release()


def build_site_server(options: SiteOptions, metrics: SiteMetrics | None = None,
                      noise: mechanisms.Noise | None = None) -> RunningSite:
    """Load the policy, open ledger and audit in the state dir, and start serving.

    ``noise`` exists for test fixtures only (e.g. exact answers); the command line never sets it.
    """
    held = hold_state_dir(options.state_dir, options.init)
    audit: AuditLog | None = None
    ledger: SqliteLedger | None = None
    try:
        for stale in options.state_dir.glob("engine-*.duckdb*"):
            stale.unlink(missing_ok=True)
        live = load_live(options.policy, options.state_dir, options.engine_limits)
        with readable_ledger(held.ledger):
            # the audit log first: it restores release records the ledger anchored and the log lacks
            audit = AuditLog(held.audit, anchored=lambda seq: anchored_records(held.ledger, seq))
            ledger = SqliteLedger(held.ledger, audit)
            if ledger.version < LEDGER_VERSION:  # written by 0.1.x: spend per dataset and period index
                ledger.migrate(legacy_scopes(live.loaded.policy), int(time.time()))
        held.secure()
    except BaseException:
        if ledger is not None:
            ledger.close()
        if audit is not None:
            audit.close()
        held.release()
        raise
    state = SiteState(live=live, ledger=ledger, audit=audit, metrics=metrics or SiteMetrics(),
                      verifier=options.verifier, state_dir=options.state_dir, noise=noise or mechanisms.Noise(),
                      allowed_peers=options.allowed_peers, rejections=RejectionCounter(options.rejection_interval),
                      engine_limits=options.engine_limits)
    publish_metrics(state)  # before the first call: a scrape right after a restart sees every budget
    server, port, health, workers = make_server(SiteService(state), options.host, options.port, options.tls)
    watcher = PolicyWatcher(state, options.policy, options.reload_interval)
    watcher.start()
    log.debug("site %s serving on %s:%s", live.loaded.policy.site, options.host, port)
    return RunningSite(server, port, state, watcher, options.host, held, workers, health)
