"""The researcher's client for asyncio: :class:`Client` with the calls of :class:`gateway.client.Client`.

Example::

    from gateway.aio import Client

    async with Client("127.0.0.1:50051", token=token, proof_key="proof-key.pem") as gw:
        counts, curves = await asyncio.gather(
            gw.query("SELECT stage, count(*) AS n FROM patients GROUP BY stage", epsilon=0.5),
            gw.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5))

Same requests, proofs of possession, retries (``UNAVAILABLE`` with the same ``query_id``, so a retry
never pays twice), typed errors, results and warnings as the synchronous client: both are built on
:mod:`gateway._calls`; only the sending (``grpc.aio``) and the waiting (``asyncio.sleep``) differ.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar, cast

import grpc
import polars as pl

from ._binned import HistogramResult, QuantilesResult, SiteQuantilesResult, check_levels
from ._calls import (
    Caller,
    Plan,
    Progress,
    ServerStatus,
    StructuredSpec,
    check_method,
    check_plan,
    epsilon_search,
    finish,
    histogram_spec,
    plan_from,
    query_request,
    regression_spec,
    server_status,
    site_quantiles_spec,
    survival_spec,
)
from ._proto.gateway.v1 import gateway_pb2 as pb
from ._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from ._regression_result import RegressionResult
from ._transport import Tls, open_aio_channel
from .errors import PolicyViolation
from .proof import ProofKey
from .results import (
    Dataset,
    HistoryResult,
    QueryResult,
    SurvivalResult,
    budget_frame,
    dataset_from_wire,
)

__all__ = ["Client"]

T = TypeVar("T")


class Client:
    """Talks gateway.v1 to one target (a site or a broker) from asyncio code.

    The arguments are those of :class:`gateway.client.Client`. Use it as ``async with``, or
    ``await client.close()``.
    """

    def __init__(self, target: str, token: str | None = None, tls: Tls | None = None,
                 timeout: float = 60.0, retries: int = 3,
                 proof_key: ProofKey | bytes | str | Path | None = None, sign_for: Sequence[str] = (),
                 require_all_sites: bool = False, progress: bool | None = None) -> None:
        self.target, self.token, self.timeout, self.retries = target, token, timeout, retries
        self.require_all_sites = require_all_sites
        self.progress = progress  # a waiting line on stderr: None = when a terminal or a notebook watches
        self._caller = Caller(token, proof_key, retries, sign_for)
        self._channel = open_aio_channel(target, tls)
        self._stub = pb_grpc.GatewayStub(self._channel)
        self._component: str | None = None  # "site" or "broker", once Status has said (method="auto")

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the channel (calls in flight are cancelled)."""
        await self._channel.close()

    async def datasets(self) -> list[Dataset]:
        """The datasets this caller may query (see :meth:`gateway.client.Client.datasets`)."""
        response = await self._call(self._stub.ListDatasets, pb.ListDatasetsRequest())
        return [dataset_from_wire(d) for d in response.datasets]

    async def budget(self, dataset: str = "") -> pl.DataFrame:
        """The caller's budget per population (see :meth:`gateway.client.Client.budget`)."""
        return budget_frame(await self._call(self._stub.GetBudget, pb.GetBudgetRequest(dataset=dataset)))

    async def status(self) -> ServerStatus:
        """Who serves; from a broker, each site's health (see :meth:`gateway.client.Client.status`)."""
        return server_status(await self._call(self._stub.Status, pb.StatusRequest()))

    async def plan(self, sql: str | None = None, *, structured: StructuredSpec | None = None,
                   template: str | None = None, params: Mapping[str, Any] | None = None,
                   epsilon: float | None = None, half_width: float | None = None) -> Plan:
        """What a query would buy and cost, charging nothing (see :meth:`gateway.client.Client.plan`)."""
        check_plan(epsilon, half_width)

        async def price(eps: float) -> pb.QueryResponse:
            request = query_request(sql, structured, template, params, eps, True, None, ())
            answer: pb.QueryResponse = await self._call(self._stub.Query, request)
            return answer

        if epsilon is not None:
            return plan_from(await price(epsilon))
        first = await price(0.0)
        limits = {d.name: d.epsilon_max for d in await self.datasets()}
        search = epsilon_search(half_width or 0.0, limits.get(first.dataset, first.epsilon_charged))
        try:
            eps = next(search)
            while True:
                eps = search.send(plan_from(await price(eps)))
        except StopIteration as done:
            return cast(Plan, done.value)

    async def history(self, limit: int = 50) -> HistoryResult:
        """The project's own past answers, newest first (see :meth:`gateway.client.Client.history`)."""
        return HistoryResult(await self._call(self._stub.History, pb.HistoryRequest(limit=limit)))

    async def query(self, sql: str | None = None, *, structured: StructuredSpec | None = None,
                    template: str | None = None, params: Mapping[str, Any] | None = None, epsilon: float = 0.0,
                    dry_run: bool = False, query_id: str | None = None, sites: Sequence[str] = (),
                    require_all_sites: bool | None = None, single_site: bool = False) -> QueryResult:
        """Run one query (see :meth:`gateway.client.Client.query`)."""
        request = query_request(sql, structured, template, params, epsilon, dry_run, query_id, sites)
        request.single_site = single_site
        return finish(await self._call(self._stub.Query, request), self._require(require_all_sites))

    async def survival(self, dataset: str, *, time: str, event: str, by: str | Sequence[str] | None = None,
                       epsilon: float = 0.0, filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                       query_id: str | None = None, sites: Sequence[str] = (),
                       require_all_sites: bool | None = None) -> SurvivalResult:
        """Kaplan-Meier survival per group (see :meth:`gateway.client.Client.survival`)."""
        request = query_request(None, survival_spec(dataset, time, event, by, filters), None, None, epsilon,
                                dry_run, query_id, sites)
        result = finish(await self._call(self._stub.Query, request), self._require(require_all_sites), time)
        assert isinstance(result, SurvivalResult)
        return result

    async def histogram(self, dataset: str, column: str, *, by: str | Sequence[str] | None = None,
                        epsilon: float = 0.0, filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                        query_id: str | None = None, sites: Sequence[str] = (),
                        require_all_sites: bool | None = None) -> HistogramResult:
        """A histogram per group (see :meth:`gateway.client.Client.histogram`)."""
        request = query_request(None, histogram_spec(dataset, column, by, filters), None, None, epsilon, dry_run,
                                query_id, sites)
        result = finish(await self._call(self._stub.Query, request), self._require(require_all_sites),
                        wrap=lambda response: HistogramResult(response, column))
        assert isinstance(result, HistogramResult)
        return result

    async def quantiles(self, dataset: str, column: str, qs: Sequence[float] = (0.25, 0.5, 0.75), *,
                        by: str | Sequence[str] | None = None, epsilon: float = 0.0, method: str = "auto",
                        filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                        query_id: str | None = None, sites: Sequence[str] = (),
                        require_all_sites: bool | None = None) -> QuantilesResult | SiteQuantilesResult:
        """Quantiles per group (see :meth:`gateway.client.Client.quantiles`, and its ``method``)."""
        levels = check_levels(qs)
        chosen = check_method(method)
        single = await self._single_site(chosen, levels)
        while True:
            spec = (site_quantiles_spec(dataset, column, levels, by, filters) if single
                    else histogram_spec(dataset, column, by, filters))
            request = query_request(None, spec, None, None, epsilon, dry_run, query_id, sites)
            request.single_site = single
            try:
                response = await self._call(self._stub.Query, request)
                break
            except PolicyViolation:
                if not (single and chosen == "auto"):
                    raise
                single = False  # the site's policy refuses its quantiles, charging nothing: the histogram's
        made = SiteQuantilesResult if single else QuantilesResult
        result = finish(response, self._require(require_all_sites), wrap=lambda answer: made(answer, column, levels))
        assert isinstance(result, QuantilesResult | SiteQuantilesResult)
        return result

    async def _single_site(self, method: str, levels: Sequence[float]) -> bool:
        """Whether quantiles by ``method`` are asked of one site (``auto``: one level, and the target is a site).

        Several levels split the mechanism's epsilon, and then one histogram's quantiles are as
        accurate or more (``bench/quantile_accuracy.py``).
        """
        if method == "auto":
            if len(set(levels)) > 1:
                return False
            if self._component is None:
                self._component = (await self.status()).component
            return self._component == "site"
        return method == "exponential"

    async def regression(self, dataset: str, *, y: str, x: str | Sequence[str],
                         by: str | Sequence[str] | None = None, epsilon: float = 0.0,
                         filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                         query_id: str | None = None, sites: Sequence[str] = (),
                         require_all_sites: bool | None = None) -> RegressionResult:
        """Least squares of ``y`` on ``x`` per group (see :meth:`gateway.client.Client.regression`)."""
        request = query_request(None, regression_spec(dataset, y, x, by, filters), None, None, epsilon, dry_run,
                                query_id, sites)
        result = finish(await self._call(self._stub.Query, request), self._require(require_all_sites),
                        wrap=RegressionResult)
        assert isinstance(result, RegressionResult)
        return result

    def _require(self, given: bool | None) -> bool:
        return self.require_all_sites if given is None else given

    async def _call(self, method: Callable[..., Awaitable[T]], request: Any) -> T:
        attempt, learned = 0, False
        while True:
            self._caller.sign(request)  # a fresh proof per attempt: each is used once
            try:
                with Progress(self.progress, len(self._caller.sites)):
                    return await method(request, metadata=self._caller.metadata, timeout=self.timeout)
            except grpc.RpcError as err:
                wait, learned, error = self._caller.after(err, attempt, learned)
                if wait is None:
                    raise error from None
                if wait:
                    await asyncio.sleep(wait)
                    attempt += 1
