"""The broker: one gateway.v1 endpoint in front of every site (DESIGN §2).

It fans each call out to the sites concurrently with a deadline, forwarding the caller's bearer
token and ``query_id`` (so a retry never charges a site twice), and pools the noisy answers:
counts and sums add with their variances; a mean is the ratio of the pooled noisy sums and
counts with a delta-method interval. It sees no row and holds no budget.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ._proto.gateway.v1 import gateway_pb2 as pb
from ._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from ._server import is_loopback
from ._sqlfront import parse_sql
from ._wire import to_structured
from .accuracy import Z95, ratio_estimate
from .errors import GatewayError, InvalidQuery
from .metrics import BrokerMetrics

log = logging.getLogger("gateway.broker")
# a caller's mistake that every site reports the same way is returned as it is, not as "sites missing"
_CALLER_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                  grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.RESOURCE_EXHAUSTED,
                  grpc.StatusCode.ALREADY_EXISTS}
_REASONS = {grpc.StatusCode.DEADLINE_EXCEEDED: "deadline", grpc.StatusCode.UNAVAILABLE: "unavailable",
            grpc.StatusCode.RESOURCE_EXHAUSTED: "budget_exhausted",
            grpc.StatusCode.PERMISSION_DENIED: "permission_denied",
            grpc.StatusCode.UNAUTHENTICATED: "unauthenticated"}


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SiteTls(_Model):
    """How the broker reaches a site over TLS (with cert and key: mTLS)."""

    ca: str
    cert: str | None = None
    key: str | None = None
    server_name: str | None = None


class SiteEntry(_Model):
    """One site the broker fans out to."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
    address: str
    tls: SiteTls | None = None


class BrokerConfig(_Model):
    """The broker's configuration file."""

    name: str = "broker"
    sites: tuple[SiteEntry, ...] = Field(min_length=1)
    deadline_seconds: float = Field(default=10.0, gt=0, le=600)
    min_sites: int = Field(default=1, ge=1)


def load_broker_config(path: Path) -> BrokerConfig:
    """Parse and validate a broker config file; raises ValueError with every problem."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        config = BrokerConfig.model_validate(data)
    except (OSError, yaml.YAMLError) as err:
        raise ValueError(f"{path}: {err}") from None
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
        raise ValueError(f"{path}: {problems}") from None
    names = [s.name for s in config.sites]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: site names must be distinct")
    if config.min_sites > len(config.sites):
        raise ValueError(f"{path}: min_sites is larger than the number of sites")
    for site in config.sites:
        if site.tls is None and not is_loopback(site.address.rsplit(":", 1)[0]):
            raise ValueError(f"{path}: site {site.name} needs tls: plaintext is for loopback only")
    return config


@dataclass(frozen=True)
class _Outcome:
    site: str
    response: Any = None
    code: grpc.StatusCode | None = None
    message: str = ""


class BrokerService(pb_grpc.GatewayServicer):
    """gateway.v1 served by the broker."""

    def __init__(self, config: BrokerConfig, metrics: BrokerMetrics, base_dir: Path) -> None:
        self.config, self.metrics = config, metrics
        self._pool = futures.ThreadPoolExecutor(max_workers=max(4, 4 * len(config.sites)))
        self._stubs = {s.name: pb_grpc.GatewayStub(_channel(s, base_dir)) for s in config.sites}

    def close(self) -> None:
        """Stop the fan-out threads."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def ListDatasets(self, request: pb.ListDatasetsRequest, context: grpc.ServicerContext) -> pb.ListDatasetsResponse:
        outcomes = self._fan("ListDatasets", request, context, self._names(()))
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
        outcomes = self._fan("GetBudget", request, context, self._names(()))
        budgets = []
        for outcome in self._answered_or_abort(outcomes, context):
            for b in outcome.response.budgets:
                b.site = outcome.site  # the name the broker knows the site by, as in `sites`
                budgets.append(b)
        return pb.GetBudgetResponse(budgets=budgets, served_by=self.config.name)

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        started = time.perf_counter()
        try:
            return self._query(request, context)
        finally:
            self.metrics.duration.labels("_broker").observe(time.perf_counter() - started)

    def _query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        try:
            names = self._names(request.sites)
        except GatewayError as err:
            context.abort(err.code, err.message)
        forwarded = pb.QueryRequest()
        forwarded.CopyFrom(request)
        del forwarded.sites[:]
        if request.WhichOneof("body") == "sql":
            # parse once here instead of at every site; sites check the structured query against policy
            try:
                forwarded.structured.CopyFrom(to_structured(parse_sql(request.sql)))
            except GatewayError as err:
                context.abort(err.code, err.message)
        forwarded.query_id = request.query_id or f"broker-{uuid.uuid4().hex}"
        outcomes = self._fan("Query", forwarded, context, names)
        answered = [o for o in outcomes if o.response is not None]
        if len(answered) < min(self.config.min_sites, len(names)) or not answered:
            self._abort_missing(outcomes, context, len(answered))
        response = pool(answered, self.config.name)
        response.query_id = forwarded.query_id
        response.missing_sites.extend(pb.MissingSite(site=o.site, reason=_REASONS.get(o.code, "error") if o.code
                                                     else "error", message=o.message)
                                      for o in outcomes if o.response is None)
        return response

    def _names(self, requested: Sequence[str]) -> list[str]:
        known = [s.name for s in self.config.sites]
        unknown = sorted(set(requested) - set(known))
        if unknown:
            raise InvalidQuery(f"unknown site(s) {', '.join(unknown)}; this network has: {', '.join(known)}")
        return [n for n in known if n in requested] if requested else known

    def _fan(self, method: str, request: Any, context: grpc.ServicerContext, names: list[str]) -> list[_Outcome]:
        metadata = [(k, v) for k, v in context.invocation_metadata() if k == "authorization"]
        remaining = context.time_remaining()
        timeout = min(self.config.deadline_seconds, remaining) if remaining is not None else \
            self.config.deadline_seconds
        calls = {name: self._pool.submit(_call, getattr(self._stubs[name], method), request, metadata, timeout)
                 for name in names}
        outcomes = []
        for name, future in calls.items():
            outcome = _Outcome(name, *future.result())
            self.metrics.site_requests.labels(name, "ok" if outcome.code is None else outcome.code.name.lower()).inc()
            outcomes.append(outcome)
        return outcomes

    def _answered_or_abort(self, outcomes: list[_Outcome], context: grpc.ServicerContext) -> list[_Outcome]:
        answered = [o for o in outcomes if o.response is not None]
        if not answered:
            self._abort_missing(outcomes, context, 0)
        return answered

    def _abort_missing(self, outcomes: list[_Outcome], context: grpc.ServicerContext, answered: int) -> None:
        failed = [o for o in outcomes if o.response is None]
        codes = {o.code for o in failed}
        if len(codes) == 1 and failed and failed[0].code in _CALLER_ERRORS and answered == 0:
            first = failed[0]
            assert first.code is not None
            context.abort(first.code, f"{first.site}: {first.message}")
        listed = "; ".join(f"{o.site}: {_REASONS.get(o.code, 'error') if o.code else 'error'} ({o.message})"
                           for o in failed)
        transient = codes & {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}
        context.abort(grpc.StatusCode.UNAVAILABLE if transient else grpc.StatusCode.FAILED_PRECONDITION,
                      f"only {answered} site(s) answered, at least {self.config.min_sites} needed; {listed}"
                      + ("; retrying with the same query_id is safe" if transient else ""))


def dataset_differences(by_site: dict[str, pb.Dataset]) -> list[str]:
    """Where the sites' declarations of one dataset differ: columns, roles, bounds, keys, aggregates, costs."""
    described = {site: _describe(ds) for site, ds in by_site.items()}
    aspects = sorted({aspect for d in described.values() for aspect in d})
    lines = []
    for aspect in aspects:
        values = {site: d.get(aspect, "absent") for site, d in described.items()}
        if len(set(values.values())) > 1:
            lines.append(f"{aspect}: " + "; ".join(f"{site} {value}" for site, value in values.items()))
    return lines


def _describe(ds: pb.Dataset) -> dict[str, str]:
    out = {"aggregates": ", ".join(ds.aggregates), "max rows per patient": str(ds.max_rows_per_unit),
           "epsilon per query": f"default {ds.epsilon_default:g}, max {ds.epsilon_max:g}"}
    for col in ds.columns:
        out[f"column {col.name}"] = f"{col.type} ({', '.join(col.roles)})"
        if col.has_bounds:
            out[f"column {col.name} bounds"] = f"[{col.lower:g}, {col.upper:g}]"
        if col.public_keys:
            keys = [getattr(k, k.WhichOneof("kind") or "string_value") for k in col.public_keys]
            digest = hashlib.sha256(repr(keys).encode()).hexdigest()[:8]
            out[f"column {col.name} keys"] = f"{len(keys)} keys ({keys[0]}..{keys[-1]}, #{digest})"
    return out


def _call(method: Callable[..., Any], request: Any, metadata: list[tuple[str, str]],
          timeout: float) -> tuple[Any, grpc.StatusCode | None, str]:
    try:
        return method(request, metadata=metadata, timeout=timeout), None, ""
    except grpc.RpcError as err:
        return None, err.code(), err.details() or err.code().name


def _channel(site: SiteEntry, base_dir: Path) -> grpc.Channel:
    if site.tls is None:
        return grpc.insecure_channel(site.address)

    def read(name: str | None) -> bytes | None:
        return (base_dir / name).read_bytes() if name else None

    creds = grpc.ssl_channel_credentials(read(site.tls.ca), read(site.tls.key), read(site.tls.cert))
    options = [("grpc.ssl_target_name_override", site.tls.server_name)] if site.tls.server_name else []
    return grpc.secure_channel(site.address, creds, options=options)


def pool(answered: list[_Outcome], served_by: str) -> pb.QueryResponse:
    """Pool the sites' answers group by group (the sites' own answers are kept alongside)."""
    first: pb.QueryResponse = answered[0].response
    out = pb.QueryResponse(dataset=first.dataset, group_by=first.group_by, aggregates=first.aggregates,
                           canonical_hash=first.canonical_hash, canonical_query=first.canonical_query,
                           served_by=served_by, dry_run=first.dry_run)
    out.sites.extend(o.site for o in answered)
    out.epsilon_charged = max(o.response.epsilon_charged for o in answered)
    out.budget_remaining = min(o.response.budget_remaining for o in answered)
    out.cached = all(o.response.cached for o in answered)
    for o in answered:
        out.site_answers.add(site=o.site, rows=o.response.rows, epsilon_charged=o.response.epsilon_charged,
                             cached=o.response.cached, budget_remaining=o.response.budget_remaining)
    by_site = [{_key(r): r for r in o.response.rows} for o in answered]
    for row in first.rows:
        # a group is pooled over the sites that have it as a public key (policies may differ)
        cells = [rows[_key(row)] for rows in by_site if _key(row) in rows]
        pooled = out.rows.add(keys=row.keys)
        for j in range(len(row.estimates)):
            pooled.estimates.append(_pool_estimate([c.estimates[j] for c in cells], first.dry_run))
    return out


def _key(row: pb.ResultRow) -> tuple[bytes, ...]:
    return tuple(k.SerializeToString(deterministic=True) for k in row.keys)


def _pool_estimate(parts: list[pb.Estimate], dry_run: bool) -> pb.Estimate:
    head = parts[0]
    out = pb.Estimate(aggregate=head.aggregate, mechanism=f"pooled({head.mechanism})", epsilon=head.epsilon,
                      noise_scale=math.nan)
    if dry_run:
        out.value = out.ci_low = out.ci_high = math.nan
        out.std_error = math.sqrt(sum(p.std_error ** 2 for p in parts))
        out.ci_half_width = Z95 * out.std_error
        return out
    if any(p.suppressed for p in parts):
        out.value = out.ci_low = out.ci_high = out.std_error = out.ci_half_width = math.nan
        out.suppressed = True
        return out
    if math.isnan(head.numerator):  # counts and sums: values add, variances add
        out.value = sum(p.value for p in parts)
        out.std_error = math.sqrt(sum(p.std_error ** 2 for p in parts))
    else:  # means: ratio of pooled noisy sums and counts, bounds from the sites' clamping range
        total, count = sum(p.numerator for p in parts), sum(p.denominator for p in parts)
        total_se = math.sqrt(sum(p.numerator_std_error ** 2 for p in parts))
        count_se = math.sqrt(sum(p.denominator_std_error ** 2 for p in parts))
        # the broker does not clamp (it does not know the bounds); with no count left, the sites' range
        low, high = (min(p.ci_low for p in parts), max(p.ci_high for p in parts)) if count < 1 else (-math.inf,
                                                                                                      math.inf)
        out.value, out.std_error, out.clamped = ratio_estimate(total, count, total_se, count_se, low, high)
        out.numerator, out.denominator = total, count
        out.numerator_std_error, out.denominator_std_error = total_se, count_se
    out.ci_half_width = Z95 * out.std_error
    out.ci_low, out.ci_high = out.value - out.ci_half_width, out.value + out.ci_half_width
    return out


@dataclass
class RunningBroker:
    """A started broker."""

    server: grpc.Server
    port: int
    service: BrokerService

    def stop(self, grace: float = 5.0) -> None:
        """Stop serving and the fan-out pool."""
        self.server.stop(grace).wait()
        self.service.close()


def build_broker_server(config: BrokerConfig, base_dir: Path, host: str = "127.0.0.1", port: int = 0,
                        tls: Any = None, metrics: BrokerMetrics | None = None) -> RunningBroker:
    """Start a broker serving gateway.v1 on ``host:port`` (0: any free port)."""
    from ._server import make_server

    service = BrokerService(config, metrics or BrokerMetrics(), base_dir)
    server, bound, _health = make_server(service, host, port, tls)
    log.info("broker %s serving on %s:%s for sites %s", config.name, host, bound,
             ", ".join(s.name for s in config.sites))
    return RunningBroker(server, bound, service)
