"""The site's query pipeline: one way through, no gRPC, one policy snapshot.

A query travels parse -> check (access, epsilon limits, scopes) -> price -> ledger (replay by
query_id, stored answer, read-only precheck) -> engine -> mechanism -> charge -> response. Each
step takes what the one before produced and none reaches back; the policy is read once, by the
caller, and passed down, so a reload in the middle of a request cannot mix two policies.

The charge comes last: one durable transaction re-checks the budget, charges every scope, stores
the noisy answer and anchors the release's audit record (built from ``trace``), and only once that
record is durable in the audit log too does the answer leave the process. A query that loses a
race for the last budget is refused, its noisy value discarded unseen.

The gRPC edge (:mod:`.service`) keeps identity, guarding, audit and metrics.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from fractions import Fraction

from .._engine import Engine
from .._mechanisms import Noise, plan_query, predicted, release
from .._proto.gateway.v1 import gateway_pb2 as pb
from .._querysql import product_of_keys
from .._scopes import budget_scopes
from .._sqlfront import parse_sql_cached
from .._wire import from_structured, rows_to_wire, to_scalar
from ..auth import Identity
from ..errors import (
    DeadlineExceeded,
    InvalidQuery,
    NotFound,
    PermissionDenied,
    PolicyViolation,
    QueryIdConflict,
    Unavailable,
)
from ..ledger import BudgetState, Ledger, QueryIdInUse, Scope
from ..policy import BudgetRule, Dataset, Policy, to_fraction, window_of_index
from ..query import Query, check_query
from ..templates import resolve_template

QUERY_ID_MAX = 128
# what one estimate (with up to three released components of about 60 bytes each, and a label of up
# to 80) and one group key take on the wire, at most
ESTIMATE_BYTES, KEY_BYTES = 400, 48
DOUBLE_BYTES = 8  # each further number of a vector estimate (packed repeated double)
MAX_ANSWER_BYTES = 3 * 2**20


@dataclass(frozen=True)
class Checked:
    """A query held against the policy: allowed, priced in epsilon, with the budgets it draws on."""

    query: Query
    dataset: Dataset
    epsilon: Fraction
    scopes: tuple[Scope, ...]
    canonical: str
    canonical_hash: str


@dataclass(frozen=True)
class Answered:
    """What the pipeline hands the edge: the response, the budgets as they stand after it.

    ``audited``: its audit record is written already (a fresh release's is, with its charge).
    """

    response: pb.QueryResponse
    budgets: tuple[tuple[Scope, BudgetState], ...] = ()
    audited: bool = False


# -- parse and check --------------------------------------------------------------------------------

def parse(request: pb.QueryRequest, policy: Policy, identity: Identity) -> Query:
    """The request's body (structured, SQL or template call) as a query, not yet checked."""
    body = request.WhichOneof("body")
    if body == "structured":
        return from_structured(request.structured)
    if body == "sql":
        return parse_sql_cached(request.sql)
    if body == "template":
        template = policy.templates.get(request.template.name)
        params: dict[str, object] = {k: to_scalar(v) for k, v in request.template.params.items()}
        for name, value in params.items():  # list parameters travel as comma-separated text
            spec = template.params.get(name) if template is not None else None
            if spec is not None and spec.type.startswith("list[") and isinstance(value, str):
                params[name] = tuple(x.strip() for x in value.split(","))
        return resolve_template(policy, request.template.name, params, identity.project,
                                usable_datasets(policy, identity))
    raise InvalidQuery("the request has no query: set structured, sql or template")


def access_rule(policy: Policy, identity: Identity, dataset: str) -> BudgetRule:
    """The budget rule through which ``identity`` may query ``dataset``, or :class:`PermissionDenied`."""
    rule = policy.budget_rule(identity.project, dataset)
    if rule is None:
        raise PermissionDenied(f"project {identity.project!r} has no access to dataset {dataset!r} at this "
                               "site; ask its privacy officer")
    if not rule.allows_role(identity.role):
        raise PermissionDenied(f"role {identity.role!r} may not query dataset {dataset!r} for project "
                               f"{identity.project!r}")
    return rule


def _check_answer_size(checked: Checked) -> None:
    """Refuse, before any work, an answer too large to deliver (gRPC messages stop at 4 MiB)."""
    groups = math.prod(len(checked.dataset.columns[c].group_keys) for c in checked.query.group_by)
    per_group = sum(ESTIMATE_BYTES + DOUBLE_BYTES * kind.vector_doubles(
        checked.dataset.columns[a.column] if a.column is not None else None)
        for a, kind in zip(checked.query.aggregates, checked.query.kinds(), strict=True))
    size = groups * (per_group + len(checked.query.group_by) * KEY_BYTES)
    if size > MAX_ANSWER_BYTES:
        raise InvalidQuery(f"the answer would be about {size / 2**20:.1f} MiB ({groups} groups x "
                           f"{len(checked.query.aggregates)} aggregates), over the {MAX_ANSWER_BYTES / 2**20:.0f} MiB "
                           "a site sends; group by fewer columns or ask for fewer aggregates (or, for a "
                           "vector such as a survival curve, ask the privacy officer for a coarser grid)")


def may_query(policy: Policy, identity: Identity, dataset: str) -> BudgetRule:
    """The rule through which ``identity`` may query ``dataset``.

    An unknown dataset's error lists only the datasets the caller may query, so a project without
    access learns no names.
    """
    if dataset not in policy.datasets:
        usable = usable_datasets(policy, identity)
        raise NotFound(f"unknown dataset {dataset!r}; you may query: {', '.join(usable) or 'no dataset at this site'}")
    return access_rule(policy, identity, dataset)


def requested_epsilon(request: pb.QueryRequest, policy: Policy, dataset: str, kinds: Sequence[str] = ()) -> Fraction:
    """The epsilon the request asks for (0: the policy default), within the policy's per-query limits.

    The limits are the strictest of the dataset's and those of each aggregate kind in ``kinds``.
    """
    limits = policy.epsilon_limits(dataset, kinds)
    if limits.min > limits.max:
        raise PolicyViolation("aggregates", f"the aggregates {', '.join(kinds)} cannot be asked together on "
                                            f"{dataset!r}: their epsilon limits exclude each other (min "
                                            f"{float(limits.min):g} > max {float(limits.max):g}); ask for them in "
                                            "separate queries")
    if request.delta != 0:
        raise InvalidQuery("delta must be 0: this site uses pure epsilon-DP")
    if not math.isfinite(request.epsilon) or request.epsilon < 0:
        raise InvalidQuery("epsilon must be a positive finite number (or 0 for the policy default)")
    if request.epsilon == 0:
        return limits.default
    epsilon = to_fraction(request.epsilon)
    where = f"dataset {dataset!r}"
    if limits is not policy.epsilon_limits(dataset):  # a kind's own limits are in force: say which
        where += f" with {', '.join(kinds)} (datasets.{dataset}.aggregates.<kind>.epsilon)"
    if epsilon > limits.max:
        raise PolicyViolation("epsilon", f"requested {request.epsilon:g} exceeds the per-query maximum "
                                         f"{float(limits.max):g} for {where}; ask for at most that")
    if epsilon < limits.min:
        raise PolicyViolation("epsilon", f"requested {request.epsilon:g} is below the per-query minimum "
                                         f"{float(limits.min):g} for {where}; ask for at least that")
    return epsilon


def check(request: pb.QueryRequest, query: Query, identity: Identity, policy: Policy, now: datetime) -> Checked:
    """Hold a query whose shape :func:`check_query` accepted against the rest of ``policy``.

    That is: the templates-only rule, access, the epsilon limits, and the budgets it draws on.
    """
    dataset = policy.datasets[query.dataset]
    cohorts = [f.cohort.dataset for f in query.filters if f.cohort is not None]
    for name in (query.dataset, *cohorts):  # a cohort reads its dataset too: the same rules hold there
        if policy.datasets[name].templates_only and request.WhichOneof("body") != "template":
            raise PolicyViolation("body", f"dataset {name!r} may only be queried through approved "
                                          f"templates; see ListDatasets for them")
    rule = access_rule(policy, identity, query.dataset)
    epsilon = requested_epsilon(request, policy, query.dataset, sorted({a.function for a in query.aggregates}))
    for name in cohorts:
        requested_epsilon(request, policy, name)  # within the cohort's dataset's limits as well
    scopes = budget_scopes(policy, identity.project, query.dataset, rule, now)
    return Checked(query, dataset, epsilon, scopes, query.canonical(epsilon), query.canonical_hash(epsilon))


# -- the pipeline -----------------------------------------------------------------------------------

class Pipeline:
    """Answers checked queries: ledger, engine, mechanism and charge, in that order."""

    def __init__(self, ledger: Ledger, noise: Noise) -> None:
        self.ledger = ledger
        self.noise = noise

    def run(self, request: pb.QueryRequest, identity: Identity, policy: Policy, engine: Engine, now: datetime,
            trace: dict[str, object], expired: Callable[[], bool] = lambda: False) -> Answered:
        """Answer one request under one policy snapshot; ``trace`` collects what the audit records.

        ``expired`` tells whether the caller has gone (cancelled, or past its deadline): the engine
        stops its statement, and nothing is charged for an answer nobody can receive.
        """
        parsed = dataclasses.replace(parse(request, policy, identity), single_site=request.single_site)
        may_query(policy, identity, parsed.dataset)  # before any message can describe the dataset
        for f in parsed.filters:  # and every dataset a cohort comes from
            if f.cohort is not None:
                may_query(policy, identity, f.cohort.dataset)
        query = check_query(parsed, policy)
        trace["dataset"] = query.dataset
        checked = check(request, query, identity, policy, now)
        trace.update(canonical_hash=checked.canonical_hash, canonical_query=checked.canonical,
                     population=checked.dataset.population_name, epsilon_requested=float(checked.epsilon))
        _check_answer_size(checked)
        plan = plan_query(checked.query, checked.dataset, checked.epsilon)
        response = pb.QueryResponse(
            dataset=checked.query.dataset, group_by=list(checked.query.group_by),
            aggregates=[a.label for a in checked.query.aggregates], canonical_hash=checked.canonical_hash,
            canonical_query=checked.canonical, served_by=policy.site, epsilon_charged=float(checked.epsilon),
            suppression_min_count=policy.suppression.min_count, notes=notes_for(checked.query, checked.dataset))
        if request.dry_run:
            groups = product_of_keys([checked.dataset.columns[c].group_keys for c in checked.query.group_by])
            response.rows.extend(rows_to_wire(predicted(plan, groups), checked.query.group_by))
            response.dry_run, response.query_id = True, request.query_id
            return _named(self._with_budgets(response, checked.scopes), parsed)
        query_id = valid_query_id(request.query_id)
        response.query_id = trace["query_id"] = query_id
        stored = self._stored(identity.project, query_id, checked)
        if stored is not None:
            return _named(self._replay(stored, query_id, checked.scopes), parsed)
        self.ledger.precheck(checked.epsilon, checked.scopes)  # refuse before touching data
        exact = engine.run(checked.query, expired)  # a failure here has charged nothing
        rows = release(plan, exact.groups, exact.components, self.noise, policy.suppression.min_count)
        response.rows.extend(rows_to_wire(rows, checked.query.group_by))
        if expired():
            raise DeadlineExceeded("the call ended (deadline or cancel) before its answer was ready; nothing was "
                                   "charged; retry with a longer deadline")
        record = {**trace, "outcome": "ok", "epsilon_charged": response.epsilon_charged}  # the release's audit record
        try:
            trace["charge_id"], after = self.ledger.charge_with_states(
                identity.project, query_id, checked.canonical_hash, checked.epsilon, checked.scopes,
                response.SerializeToString(), record=record)
        except QueryIdInUse:  # the same query_id was answered concurrently: give that answer
            found = self.ledger.find(identity.project, query_id)
            if found is None or found.canonical_hash != checked.canonical_hash:
                raise Unavailable(f"query_id {query_id!r} is being answered right now; retry shortly") from None
            return _named(self._replay(found.answer, query_id, checked.scopes), parsed)
        return _named(self._with_budgets(response, checked.scopes, audited=True, states=after), parsed)

    def _stored(self, project: str, query_id: str, checked: Checked) -> bytes | None:
        """A stored answer: to this query_id (a retry), or to the same canonical query (free)."""
        found, answer = self.ledger.lookup(project, query_id, checked.canonical_hash)  # one read
        if found is not None:
            if found.canonical_hash != checked.canonical_hash:
                raise QueryIdConflict(f"query_id {query_id!r} was already used for a different query; "
                                      "use a new query_id for a new query")
            return found.answer
        return answer

    def _replay(self, stored: bytes, query_id: str, scopes: tuple[Scope, ...]) -> Answered:
        response = pb.QueryResponse.FromString(stored)
        response.query_id, response.cached, response.epsilon_charged = query_id, True, 0.0
        return self._with_budgets(response, scopes)

    def _with_budgets(self, response: pb.QueryResponse, scopes: tuple[Scope, ...], audited: bool = False,
                      states: tuple[BudgetState, ...] | None = None) -> Answered:
        """The response with the budgets' states: ``states`` as the charge left them, or read now."""
        if states is None:
            states = tuple(self.ledger.state(scope) for scope in scopes)
        budgets = tuple(zip(scopes, states, strict=True))
        # the project's own budget only: a shared cap's remaining would tell what other projects spent
        response.budget_remaining = float(min(state.remaining for scope, state in budgets if not scope.shared))
        return Answered(response, budgets, audited)


def _named(answered: Answered, query: Query) -> Answered:
    """The answer with the caller's output names (set after it is stored: a stored answer holds none)."""
    answered.response.names.clear()
    answered.response.names.update(query.names)
    return answered


# -- the other calls --------------------------------------------------------------------------------

def usable_datasets(policy: Policy, identity: Identity) -> list[str]:
    """The datasets ``identity`` may query (ListDatasets lists only these)."""
    names = []
    for name in policy.datasets:
        rule = policy.budget_rule(identity.project, name)
        if rule is not None and rule.allows_role(identity.role):
            names.append(name)
    return names


def project_budgets(ledger: Ledger, policy: Policy, identity: Identity, dataset: str,
                    now: datetime) -> list[tuple[Scope, BudgetRule, BudgetState]]:
    """The caller's project budget on ``dataset``'s population, or on every population it may use.

    One entry per population; its scope names the dataset asked about (or the population's first
    usable dataset).
    """
    names = [dataset] if dataset else list(policy.datasets)
    found: dict[str, tuple[Scope, BudgetRule, BudgetState]] = {}
    for name in names:
        if dataset:
            rule = may_query(policy, identity, name)
        else:
            maybe = policy.budget_rule(identity.project, name)
            if maybe is None or not maybe.allows_role(identity.role):
                continue
            rule = maybe
        population = policy.datasets[name].population_name
        if population not in found:
            scope = budget_scopes(policy, identity.project, name, rule, now)[0]
            found[population] = (scope, rule, ledger.state(scope))
    return list(found.values())


def configured_budgets(ledger: Ledger, policy: Policy, now: datetime) -> list[tuple[str, str, BudgetState]]:
    """Every configured project's budget on every population it may use: (population, project, state).

    A budget rule names projects by pattern, so "configured" means: each project a rule names
    literally (no ``*``, ``?`` or ``[``) and each project with a charge in the ledger, on each
    population where some rule grants it a budget. A pattern's other projects appear once they spend.
    """
    literal = {r.project for r in policy.budgets if not any(c in r.project for c in "*?[")}
    found = []
    for project in sorted(literal | set(ledger.projects())):
        seen: set[str] = set()
        for name, dataset in policy.datasets.items():
            rule = policy.budget_rule(project, name)
            if rule is None or dataset.population_name in seen:
                continue
            seen.add(dataset.population_name)
            scope = budget_scopes(policy, project, name, rule, now)[0]
            found.append((dataset.population_name, project, ledger.state(scope)))
    return found


def legacy_scopes(policy: Policy) -> Callable[[str, int], tuple[str, int, int | None] | None]:
    """How a 0.1.x ledger's spend rows map to population scopes and absolute windows under ``policy``.

    Those rows were per dataset and period index; see :meth:`gateway.ledger.SqliteLedger.migrate`.
    """
    def convert(key: str, index: int) -> tuple[str, int, int | None] | None:
        kind, _, rest = key.partition(":")
        if kind == "project":
            project, _, dataset = rest.rpartition(":")
            rule = policy.budget_rule(project, dataset) if dataset in policy.datasets else None
            if rule is None:
                return None
            new, period = f"project:{project}:{policy.datasets[dataset].population_name}", rule.period
        elif kind == "dataset" and rest in policy.datasets:
            population = policy.datasets[rest].population_name
            cap = policy.population_cap(population)
            if cap is None:
                return None
            new, period = f"population:{population}", cap.period
        else:
            return None
        return (new, *window_of_index(period, policy.period_start, index))
    return convert


def notes_for(query: Query, dataset: Dataset) -> list[str]:
    """What a reader of the answer should know about its groups and aggregates."""
    notes = [note for agg, kind in zip(query.aggregates, query.kinds(), strict=True) if (note := kind.note(
        agg, dataset.columns[agg.column] if agg.column is not None else None))]
    excluding = [c for c in query.group_by if not dataset.columns[c].other_groups]
    if not excluding:
        return notes
    return [f"rows whose {' or '.join(excluding)} is missing or not one of its public keys are in no group "
            "(not counted here)", *notes]


def valid_query_id(raw: str) -> str:
    """The caller's query_id (1-128 printable ASCII characters), or a fresh one when none is given."""
    if not raw:
        return "server-" + secrets.token_hex(12)
    if len(raw) > QUERY_ID_MAX or not raw.isprintable() or not raw.isascii():
        raise InvalidQuery(f"query_id must be 1-{QUERY_ID_MAX} printable ASCII characters")
    return raw
