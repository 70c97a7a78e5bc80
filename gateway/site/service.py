"""The site's gRPC edge: identity, guarding, audit and metrics around the query pipeline.

Every call is authenticated here (token, and with mTLS the peer's certificate name); a query is
then handed to :class:`~.pipeline.Pipeline` with one snapshot of the live policy, and the edge
records the outcome in the audit log and the metrics. A caller's mistake becomes its rich gRPC
status; anything else is logged here and answered INTERNAL, with no detail.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import grpc

from .. import _mechanisms as mechanisms
from .._proto.gateway.v1 import gateway_pb2 as pb
from .._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from .._server import make_server, target_of
from .._transport import Tls
from ..audit import AuditLog
from ..auth import Identity, Verifier, authorization_header
from ..errors import INTERNAL_MESSAGE, GatewayError, InternalBug, PermissionDenied
from ..ledger import VERSION as LEDGER_VERSION
from ..ledger import Ledger, SqliteLedger
from ..metrics import SiteMetrics
from ..proof import ProofCarrier, ProofChecker, check_possession
from ._datasets import dataset_to_wire
from ._reload import Live, PolicyWatcher, load_live
from ._statedir import StateDir, hold_state_dir, readable_ledger
from .pipeline import Pipeline, legacy_scopes, project_budgets, usable_datasets

log = logging.getLogger("gateway.site")
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
        record: dict[str, object] = {"event": "query", "dry_run": request.dry_run}
        dataset = "_unknown"
        try:
            identity = self._identify(context, request)
            record.update(subject=identity.subject, project=identity.project, role=identity.role)
            response = self._query(request, identity, record, context)
            dataset = response.dataset
            outcome = "dry_run" if response.dry_run else "cached" if response.cached else "ok"
        except GatewayError as err:
            outcome = err.outcome
            dataset = str(record.get("dataset", "_unknown"))
            record.update(outcome=outcome, status=err.code.name, reason=err.message[:300])
            self._finish(record, dataset, outcome, started)
            context.abort_with_status(err.to_status())
        except Exception:
            log.exception("query failed")
            record.update(outcome="error", status="INTERNAL")
            self._finish(record, str(record.get("dataset", "_unknown")), "error", started)
            context.abort(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
        record.update(outcome=outcome, epsilon_charged=response.epsilon_charged)
        self._finish(record, dataset, outcome, started)
        return response

    def _query(self, request: pb.QueryRequest, identity: Identity, record: dict[str, object],
               context: grpc.ServicerContext) -> pb.QueryResponse:
        live = self.state.live  # the one policy snapshot this request sees
        answered = self.pipeline.run(request, identity, live.loaded.policy, live.engine, datetime.now(UTC), record,
                                     expired=lambda: _gone(context))
        for scope, state in answered.budgets[:1]:  # the project's own budget
            population = live.loaded.policy.datasets[scope.dataset].population_name
            self.state.metrics.set_budget(population, identity.project, float(state.limit), float(state.spent))
        return answered.response

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

    def _finish(self, record: dict[str, object], dataset: str, outcome: str, started: float) -> None:
        known = dataset if dataset in self.state.live.loaded.policy.datasets else "_unknown"
        self.state.metrics.queries.labels(known, outcome).inc()
        self.state.metrics.duration.labels(known).observe(time.perf_counter() - started)
        try:
            self.state.audit.append(**record)
        except (OSError, ValueError):
            log.exception("audit append failed")


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

    @property
    def target(self) -> str:
        """Where clients reach it: ``HOST:PORT`` (IPv6 hosts in brackets)."""
        return target_of(self.host, self.port)

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds), then close ledger, audit and engine. Idempotent."""
        if self.watcher.stopped.is_set():
            return
        self.watcher.stopped.set()
        self.server.stop(grace).wait()
        if self.workers is not None:
            self.workers.shutdown(wait=False)
        self.watcher.close_retired()
        self.state.ledger.close()
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
    try:
        for stale in options.state_dir.glob("engine-*.duckdb*"):
            stale.unlink(missing_ok=True)
        live = load_live(options.policy, options.state_dir)
        with readable_ledger(held.ledger):
            ledger = SqliteLedger(held.ledger)
            if ledger.version < LEDGER_VERSION:  # written by 0.1.x: spend per dataset and period index
                ledger.migrate(legacy_scopes(live.loaded.policy), int(time.time()))
        held.secure()
    except BaseException:
        held.release()
        raise
    state = SiteState(live=live, ledger=ledger,
                      audit=AuditLog(held.audit), metrics=metrics or SiteMetrics(),
                      verifier=options.verifier, state_dir=options.state_dir, noise=noise or mechanisms.Noise(),
                      allowed_peers=options.allowed_peers)
    server, port, _health, workers = make_server(SiteService(state), options.host, options.port, options.tls)
    watcher = PolicyWatcher(state, options.policy, options.reload_interval)
    watcher.start()
    log.info("site %s serving on %s:%s", live.loaded.policy.site, options.host, port)
    return RunningSite(server, port, state, watcher, options.host, held, workers)
