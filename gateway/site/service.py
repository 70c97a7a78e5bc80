"""The site gateway: the only component that touches rows (DESIGN §2).

A query travels one way: request -> parsed query -> policy check -> ledger charge -> engine ->
mechanism -> response. The charge is committed before noise is drawn; a failure before noise
refunds it; once noise is drawn the answer is stored with the charge, so a retry with the same
``query_id`` gets the same answer for free.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import TypeVar

import grpc

from .. import _mechanisms as mechanisms
from .._engine import product_of_keys
from .._proto.gateway.v1 import gateway_pb2 as pb
from .._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from .._sqlfront import parse_sql
from .._transport import Tls
from .._wire import from_structured, rows_to_wire, to_scalar
from ..answers import Scalar
from ..audit import AuditLog
from ..auth import Identity, Verifier
from ..errors import (
    INTERNAL_MESSAGE,
    BudgetExhausted,
    GatewayError,
    InternalBug,
    InvalidQuery,
    PermissionDenied,
    PolicyViolation,
    QueryIdConflict,
    Unavailable,
)
from ..ledger import QueryIdInUse, Scope, SqliteLedger
from ..metrics import SiteMetrics
from ..policy import BudgetRule, Dataset, period_window, to_fraction
from ..query import Query as ParsedQuery
from ..query import check_query, dataset_of
from ..templates import resolve_template
from ._datasets import dataset_to_wire
from ._reload import Live, PolicyWatcher, load_live

log = logging.getLogger("gateway.site")
T = TypeVar("T")
_QUERY_ID_MAX = 128


@dataclass
class SiteState:
    """Everything a site process holds: live policy, ledger, audit log, metrics, verifier."""

    live: Live
    ledger: SqliteLedger
    audit: AuditLog
    metrics: SiteMetrics
    verifier: Verifier
    state_dir: Path
    noise: mechanisms.Noise = field(default_factory=mechanisms.Noise)
    allowed_peers: tuple[str, ...] = ()


class SiteService(pb_grpc.GatewayServicer):
    """gateway.v1 served by one site."""

    def __init__(self, state: SiteState) -> None:
        self.state = state

    # -- calls ---------------------------------------------------------------------------------

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        return _guarded(context, lambda: self._list_datasets(context))

    def _list_datasets(self, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        identity = self._identify(context)
        policy = self.state.live.loaded.policy
        datasets = [dataset_to_wire(name, ds, policy) for name, ds in policy.datasets.items()
                    if _usable(policy.budget_rule(identity.project, name), identity)]
        return pb.ListDatasetsResponse(datasets=datasets, served_by=policy.site)

    def GetBudget(self, request: pb.GetBudgetRequest, context: grpc.ServicerContext) -> pb.GetBudgetResponse:
        return _guarded(context, lambda: self._get_budget(request, context))

    def _get_budget(self, request: pb.GetBudgetRequest, context: grpc.ServicerContext) -> pb.GetBudgetResponse:
        identity = self._identify(context)
        policy = self.state.live.loaded.policy
        names = [request.dataset] if request.dataset else list(policy.datasets)
        budgets = []
        for name in names:
            try:
                dataset_of(policy, name)
                rule = self._rule(identity, name)
            except GatewayError:
                if request.dataset:
                    raise
                continue
            scope = self._scopes(identity.project, name, rule)[0]
            budgets.append(self._budget_message(identity.project, scope, rule.period))
        return pb.GetBudgetResponse(budgets=budgets, served_by=policy.site)

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        started = time.perf_counter()
        record: dict[str, object] = {"event": "query", "dry_run": request.dry_run}
        dataset = "_unknown"
        try:
            identity = self._identify(context)
            record.update(subject=identity.subject, project=identity.project, role=identity.role)
            response = self._query(request, identity, record)
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

    # -- the query pipeline ---------------------------------------------------------------------

    def _query(self, request: pb.QueryRequest, identity: Identity, record: dict[str, object]) -> pb.QueryResponse:
        live = self.state.live
        policy = live.loaded.policy
        query = check_query(self._parse(request, identity), policy)
        record["dataset"] = query.dataset
        dataset = policy.datasets[query.dataset]
        if dataset.templates_only and request.WhichOneof("body") != "template":
            raise PolicyViolation("body", f"dataset {query.dataset!r} may only be queried through approved "
                                          f"templates; see ListDatasets for them")
        rule = self._rule(identity, query.dataset)
        epsilon = self._epsilon(request, query.dataset)
        canonical_hash = query.canonical_hash(epsilon)
        record.update(canonical_hash=canonical_hash, epsilon_requested=float(epsilon))
        plan = mechanisms.plan_query(query, dataset, epsilon)
        scopes = self._scopes(identity.project, query.dataset, rule)
        base = pb.QueryResponse(dataset=query.dataset, group_by=list(query.group_by),
                                aggregates=[a.label for a in query.aggregates], canonical_hash=canonical_hash,
                                canonical_query=query.canonical(epsilon), served_by=policy.site)
        if request.dry_run:
            groups = _groups(query, dataset)
            base.rows.extend(rows_to_wire(mechanisms.predicted(plan, groups), query.group_by))
            base.dry_run, base.epsilon_charged = True, float(epsilon)
            base.budget_remaining = self._remaining(scopes)
            base.query_id = request.query_id
            return base
        query_id = _query_id(request.query_id)
        base.query_id = query_id
        record["query_id"] = query_id
        orphan = self._existing(identity.project, query_id, canonical_hash, scopes)
        if isinstance(orphan, pb.QueryResponse):
            return orphan
        if orphan is None:
            stored = self.state.ledger.find_answer(identity.project, canonical_hash)
            if stored is not None:
                return self._replay(stored, query_id, scopes)
            self._precheck(epsilon, scopes)  # refuse before touching data when the budget cannot pay
        exact = live.engine.run(query)  # a failure here has charged nothing
        rows = mechanisms.release(plan, exact.groups, exact.components, self.state.noise, policy.suppression.min_count)
        base.rows.extend(rows_to_wire(rows, query.group_by))
        base.epsilon_charged = float(epsilon)
        answer = base.SerializeToString()
        # The one durable transaction: check the budget, charge it and store the answer, before the
        # answer leaves the process. Refused here (a concurrent query spent the budget), the noisy
        # value is discarded unseen.
        if orphan is None:
            try:
                record["charge_id"] = self.state.ledger.charge(identity.project, query_id, canonical_hash, epsilon,
                                                               scopes, answer=answer)
            except QueryIdInUse:  # the same query_id was answered concurrently: give that answer
                found = self.state.ledger.find(identity.project, query_id)
                if found is None or found.answer is None or found.canonical_hash != canonical_hash:
                    raise Unavailable(f"query_id {query_id!r} is being answered right now; retry shortly") from None
                return self._replay(found.answer, query_id, scopes)
        else:
            self.state.ledger.release(orphan, answer)
        self._publish(identity.project, query.dataset, scopes[0])
        base.budget_remaining = self._remaining(scopes)
        return base

    def _precheck(self, epsilon: Fraction, scopes: list[Scope]) -> None:
        for scope in scopes:
            state = self.state.ledger.state(scope)
            if state.spent + epsilon > scope.limit:
                raise BudgetExhausted(scope.dataset, epsilon, state.remaining, scope.resets_at, scope.label)

    def _parse(self, request: pb.QueryRequest, identity: Identity) -> ParsedQuery:
        body = request.WhichOneof("body")
        if body == "structured":
            return from_structured(request.structured)
        if body == "sql":
            return parse_sql(request.sql)
        if body == "template":
            params = {k: to_scalar(v) for k, v in request.template.params.items()}
            lists = {k: tuple(x.strip() for x in v.split(",")) for k, v in params.items()
                     if isinstance(v, str) and self._is_list_param(request.template.name, k)}
            return resolve_template(self.state.live.loaded.policy, request.template.name, {**params, **lists},
                                    identity.project)
        raise InvalidQuery("the request has no query: set structured, sql or template")

    def _is_list_param(self, template: str, param: str) -> bool:
        tpl = self.state.live.loaded.policy.templates.get(template)
        spec = tpl.params.get(param) if tpl else None
        return spec is not None and spec.type.startswith("list[")

    def _existing(self, project: str, query_id: str, canonical_hash: str,
                  scopes: list[Scope]) -> int | pb.QueryResponse | None:
        """A retry of ``query_id``: the stored answer, an orphaned charge to adopt, or None if new."""
        found = self.state.ledger.find(project, query_id)
        if found is None:
            return None
        if found.canonical_hash != canonical_hash:
            raise QueryIdConflict(f"query_id {query_id!r} was already used for a different query; "
                                  "use a new query_id for a new query")
        if found.status == "released" and found.answer is not None:
            return self._replay(found.answer, query_id, scopes)
        if found.status == "reserved" and found.orphaned and self.state.ledger.adopt(found.charge_id):
            return found.charge_id
        raise Unavailable(f"query_id {query_id!r} is being answered right now; retry shortly")

    def _replay(self, stored: bytes, query_id: str, scopes: list[Scope]) -> pb.QueryResponse:
        response = pb.QueryResponse.FromString(stored)
        response.query_id, response.cached, response.epsilon_charged = query_id, True, 0.0
        response.budget_remaining = self._remaining(scopes)
        return response

    # -- policy and budget helpers --------------------------------------------------------------

    def _identify(self, context: grpc.ServicerContext) -> Identity:
        if self.state.allowed_peers:
            names = [n.decode() for n in context.auth_context().get("x509_common_name", [])]
            if not set(names) & set(self.state.allowed_peers):
                log.warning("rejected peer %s (certificate names %s)", context.peer(), names)
                raise PermissionDenied("this site does not accept calls from your client certificate")
        metadata = dict(context.invocation_metadata())
        return self.state.verifier.verify(str(metadata.get("authorization", "")) or None)

    def _rule(self, identity: Identity, dataset: str) -> BudgetRule:
        rule = self.state.live.loaded.policy.budget_rule(identity.project, dataset)
        if rule is None:
            raise PermissionDenied(f"project {identity.project!r} has no access to dataset {dataset!r} at this "
                                   "site; ask its privacy officer")
        if not rule.allows_role(identity.role):
            raise PermissionDenied(f"role {identity.role!r} may not query dataset {dataset!r} for project "
                                   f"{identity.project!r}")
        return rule

    def _epsilon(self, request: pb.QueryRequest, dataset: str) -> Fraction:
        limits = self.state.live.loaded.policy.epsilon_limits(dataset)
        if request.delta != 0:
            raise InvalidQuery("delta must be 0: this site uses pure epsilon-DP")
        if not math.isfinite(request.epsilon) or request.epsilon < 0:
            raise InvalidQuery("epsilon must be a positive finite number (or 0 for the policy default)")
        if request.epsilon == 0:
            return limits.default
        epsilon = to_fraction(request.epsilon)
        if epsilon > limits.max:
            raise PolicyViolation("epsilon", f"requested {request.epsilon:g} exceeds the per-query maximum "
                                             f"{float(limits.max):g} for dataset {dataset!r}; ask for at most that")
        return epsilon

    def _scopes(self, project: str, dataset: str, rule: BudgetRule) -> list[Scope]:
        policy = self.state.live.loaded.policy
        now = datetime.now(UTC)
        index, resets = period_window(rule.period, policy.period_start, now)
        scopes = [Scope(f"project:{project}:{dataset}", dataset, rule.epsilon, index, resets)]
        cap = policy.dataset_caps.get(dataset)
        if cap is not None:
            cap_index, cap_resets = period_window(cap.period, policy.period_start, now)
            scopes.append(Scope(f"dataset:{dataset}", dataset, cap.epsilon, cap_index, cap_resets,
                                "all projects (dataset-wide cap)"))
        return scopes

    def _remaining(self, scopes: list[Scope]) -> float:
        return float(min(self.state.ledger.state(s).remaining for s in scopes))

    def _budget_message(self, project: str, scope: Scope, period: str) -> pb.Budget:
        state = self.state.ledger.state(scope)
        self.state.metrics.set_budget(scope.dataset, project, float(state.limit), float(state.spent))
        return pb.Budget(dataset=scope.dataset, project=project, limit=float(state.limit), spent=float(state.spent),
                         remaining=float(state.remaining), period=period, resets_at=scope.resets_at,
                         site=self.state.live.loaded.policy.site, limit_exact=_exact(state.limit),
                         spent_exact=_exact(state.spent), remaining_exact=_exact(state.remaining))

    def _publish(self, project: str, dataset: str, scope: Scope) -> None:
        state = self.state.ledger.state(scope)
        self.state.metrics.set_budget(dataset, project, float(state.limit), float(state.spent))

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


def _usable(rule: BudgetRule | None, identity: Identity) -> bool:
    return rule is not None and rule.allows_role(identity.role)


def _groups(query: ParsedQuery, dataset: Dataset) -> tuple[tuple[Scalar, ...], ...]:
    return product_of_keys([dataset.columns[c].public_keys for c in query.group_by])


def _query_id(raw: str) -> str:
    if not raw:
        return "server-" + secrets.token_hex(12)
    if len(raw) > _QUERY_ID_MAX or not raw.isprintable() or not raw.isascii():
        raise InvalidQuery(f"query_id must be 1-{_QUERY_ID_MAX} printable ASCII characters")
    return raw


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


@dataclass
class RunningSite:
    """A started site: its gRPC server, bound port, state and policy watcher."""

    server: grpc.Server
    port: int
    state: SiteState
    watcher: PolicyWatcher

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving (in-flight calls get ``grace`` seconds), then close ledger, audit and engine. Idempotent."""
        if self.watcher.stopped.is_set():
            return
        self.watcher.stopped.set()
        self.server.stop(grace).wait()
        self.watcher.close_retired()
        self.state.ledger.close()
        self.state.audit.close()
        self.state.live.engine.close()


def build_site_server(options: SiteOptions, metrics: SiteMetrics | None = None,
                      noise: mechanisms.Noise | None = None) -> RunningSite:
    """Load the policy, open ledger and audit in the state dir, and start serving.

    ``noise`` exists for test fixtures only (e.g. exact answers); the command line never sets it.
    """
    from .._server import make_server

    options.state_dir.mkdir(parents=True, exist_ok=True)
    for stale in options.state_dir.glob("engine-*.duckdb*"):
        stale.unlink(missing_ok=True)
    live = load_live(options.policy, options.state_dir)
    state = SiteState(live=live, ledger=SqliteLedger(options.state_dir / "ledger.sqlite"),
                      audit=AuditLog(options.state_dir / "audit.jsonl"), metrics=metrics or SiteMetrics(),
                      verifier=options.verifier, state_dir=options.state_dir, noise=noise or mechanisms.Noise(),
                      allowed_peers=options.allowed_peers)
    server, port, _health = make_server(SiteService(state), options.host, options.port, options.tls)
    watcher = PolicyWatcher(state, options.policy, options.reload_interval)
    watcher.start()
    log.info("site %s serving on %s:%s", live.loaded.policy.site, options.host, port)
    return RunningSite(server, port, state, watcher)
