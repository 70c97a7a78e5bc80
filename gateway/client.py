"""A typed Python client for a site gateway or a broker (same API, same calls).

Example::

    from gateway.client import Client

    with Client("127.0.0.1:50051", token=os.environ["GATEWAY_TOKEN"], proof_key="proof-key.pem") as gw:
        result = gw.query(sql="SELECT stage, count(*) AS n FROM patients GROUP BY stage", epsilon=0.5)
        result                             # a summary and the table (a notebook shows it as HTML)
        result.to_polars()                 # stage, n, n_std_error, n_ci_low, n_ci_high, n_suppressed
        result.to_long()                   # stage, aggregate, estimate, std_error, ci_low, ci_high, ...
        print(result.epsilon_charged, result.cached, result.budget_remaining)
        print(gw.budget())

Every gRPC error becomes the typed :class:`~gateway.errors.GatewayError` subclass the server raised,
with its fields (e.g. :class:`~gateway.errors.BudgetExhausted` with ``requested`` and ``remaining``);
an internal error at a server is a :class:`~gateway.errors.GatewayBug`. ``UNAVAILABLE`` is retried
with the same ``query_id``, so a retry never pays twice.

A pooled answer that lacks sites (``missing_sites``: a site was down, or its budget ran out) warns
with :class:`~gateway.errors.MissingSitesWarning`; ``require_all_sites=True`` (per call, or as the
client's default) refuses it with :class:`~gateway.errors.IncompleteAnswer` instead. The same
calls, awaitable, are in :mod:`gateway.aio`.

Tokens are bound to the caller's proof key, and every call carries a fresh proof of possession per
site that sees it (:mod:`gateway.proof`): the client signs them, learning the sites' names from the
first answer that asks for them.

Survival in a few lines (a Kaplan-Meier curve per stage over the grid the policy declares)::

    curves = gw.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5)
    print(curves.frame)        # stage, time, survival, ci_low, ci_high, at_risk, events
    print(curves.medians)      # stage, median, ci_low, ci_high
    print(curves.logrank)      # do the stages differ? statistic, df, p_value (calibrated for the noise)
    curves.plot("survival.png")   # needs the plot extra: pip install 'gateway[plot]'

Medians and histograms over the bins the policy declares (all the quantiles of one call cost one
epsilon)::

    ages = gw.histogram("patients", "age_at_diagnosis", by="stage", epsilon=0.5)
    ages.frame                 # stage, bin_low, bin_high, count, ci_low, ci_high
    ages.plot("ages.png")
    gw.quantiles("patients", "age_at_diagnosis", qs=(0.25, 0.5, 0.75), epsilon=0.5).frame  # q, value, ci

A linear regression pooled over the sites (least squares from each site's noisy sufficient
statistics; standard errors include the noise)::

    fit = gw.regression("patients", y="survival_months", x=["age_at_diagnosis", "bmi"], epsilon=0.5)
    print(fit.frame)           # term, estimate, std_error, ci_low, ci_high (the intercept first)
    print(fit.n, fit.r_squared)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
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
    structured_message,
    survival_spec,
)
from ._proto.gateway.v1 import gateway_pb2 as pb
from ._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from ._regression_result import RegressionResult
from ._transport import Tls, open_channel
from .errors import PolicyViolation
from .proof import ProofKey
from .results import (
    Column,
    Dataset,
    HistoryResult,
    QueryResult,
    SurvivalResult,
    Template,
    budget_frame,
    dataset_from_wire,
)

__all__ = ["Client", "Column", "Dataset", "HistogramResult", "QuantilesResult", "QueryResult", "RegressionResult",
           "ServerStatus", "SiteQuantilesResult", "StructuredSpec", "SurvivalResult", "Template", "Tls",
           "structured_message"]

T = TypeVar("T")


class Client:
    """Talks gateway.v1 to one target (a site or a broker).

    ``token``: the caller's JWT; ``proof_key``: the private key it is bound to (a
    :class:`~gateway.proof.ProofKey`, PEM bytes or a PEM file's path; default: the file named by
    ``$GATEWAY_PROOF_KEY``). ``sign_for``: the names of the sites the target calls (a site: its own),
    when known; otherwise the first call learns them (one extra round trip).
    ``progress``: a line on stderr while a call waits over a second (how long, how many sites); by
    default when a terminal or a notebook is watching. ``require_all_sites``:
    the default of :meth:`query`'s.
    """

    def __init__(self, target: str, token: str | None = None, tls: Tls | None = None,
                 timeout: float = 60.0, retries: int = 3,
                 proof_key: ProofKey | bytes | str | Path | None = None, sign_for: Sequence[str] = (),
                 require_all_sites: bool = False, progress: bool | None = None) -> None:
        self.target, self.token, self.timeout, self.retries = target, token, timeout, retries
        self.require_all_sites = require_all_sites
        self.progress = progress  # a waiting line on stderr: None = when a terminal or a notebook watches
        self._caller = Caller(token, proof_key, retries, sign_for)
        self._channel = open_channel(target, tls)
        self._stub = pb_grpc.GatewayStub(self._channel)
        self._component: str | None = None  # "site" or "broker", once Status has said (method="auto")

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the channel."""
        self._channel.close()

    def datasets(self) -> list[Dataset]:
        """The datasets this caller may query, with columns, roles, bounds, costs and sites."""
        return [dataset_from_wire(d) for d in self._call(self._stub.ListDatasets, pb.ListDatasetsRequest()).datasets]

    def budget(self, dataset: str = "") -> pl.DataFrame:
        """The caller's budget per population (and per site, through a broker).

        ``dataset`` narrows it to that dataset's population; ``datasets`` lists the datasets that
        share each budget (they hold the same patients); ``resets_at`` is a UTC datetime (None:
        never).
        """
        return budget_frame(self._call(self._stub.GetBudget, pb.GetBudgetRequest(dataset=dataset)))

    def status(self) -> ServerStatus:
        """Who serves and at which version; from a broker, each site's health, version and last error."""
        return server_status(self._call(self._stub.Status, pb.StatusRequest()))

    def history(self, limit: int = 50) -> HistoryResult:
        """The project's own past answers, newest first, with when, what and what each cost.

        Per site, through a broker: ``.frame`` (site, at, query_id, dataset, epsilon_charged,
        canonical_query) and ``.results`` (each answer as it was released, by site and query id).
        """
        return HistoryResult(self._call(self._stub.History, pb.HistoryRequest(limit=limit)))

    def query(self, sql: str | None = None, *, structured: StructuredSpec | None = None,
              template: str | None = None, params: Mapping[str, Any] | None = None, epsilon: float = 0.0,
              dry_run: bool = False, query_id: str | None = None, sites: Sequence[str] = (),
              require_all_sites: bool | None = None, single_site: bool = False) -> QueryResult:
        """Run one query, given as SQL, a structured mapping or an approved template with params.

        ``structured`` looks like ``{"dataset": "patients", "aggregates": ["count", ("mean", "age")],
        "group_by": ["stage"], "filters": [("sex", "=", "F")]}``; a cohort filter is
        ``("patient_id", "in", {"dataset": "treatments", "filters": [("treatment_type", "=", "surgery")]})``
        (or ``"not in"``). ``epsilon=0`` uses the policy default. An answer lacking sites warns
        (:class:`~gateway.errors.MissingSitesWarning`), or with ``require_all_sites`` raises
        :class:`~gateway.errors.IncompleteAnswer`. ``single_site``: medians and quantiles by OpenDP's
        quantile mechanism at the one site asked (see :meth:`quantiles`; a broker refuses it).
        """
        request = query_request(sql, structured, template, params, epsilon, dry_run, query_id, sites)
        request.single_site = single_site
        return finish(self._call(self._stub.Query, request), self._require(require_all_sites))

    def plan(self, sql: str | None = None, *, structured: StructuredSpec | None = None, template: str | None = None,
             params: Mapping[str, Any] | None = None, epsilon: float | None = None,
             half_width: float | None = None) -> Plan:
        """What a query would buy and cost, charging nothing (dry runs).

        With ``epsilon``: the 95% half-width each aggregate would have. With ``half_width``: the
        smallest epsilon at which every aggregate whose accuracy is known ahead (counts, sums) is
        that precise. Either way, how many such queries the remaining budget pays for.
        """
        check_plan(epsilon, half_width)

        def price(eps: float) -> pb.QueryResponse:
            request = query_request(sql, structured, template, params, eps, True, None, ())
            answer: pb.QueryResponse = self._call(self._stub.Query, request)
            return answer

        if epsilon is not None:
            return plan_from(price(epsilon))
        first = price(0.0)  # the policy's default: which dataset, and its per-query maximum
        limits = {d.name: d.epsilon_max for d in self.datasets()}
        search = epsilon_search(half_width or 0.0, limits.get(first.dataset, first.epsilon_charged))
        try:
            eps = next(search)
            while True:
                eps = search.send(plan_from(price(eps)))
        except StopIteration as done:
            return cast(Plan, done.value)

    def survival(self, dataset: str, *, time: str, event: str, by: str | Sequence[str] | None = None,
                 epsilon: float = 0.0, filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                 query_id: str | None = None, sites: Sequence[str] = (),
                 require_all_sites: bool | None = None) -> SurvivalResult:
        """Kaplan-Meier survival of ``dataset`` over the policy's time grid on ``time``, per group of ``by``.

        ``event`` is the event column (1: the event, 0: censored). Its SQL form is
        ``SELECT stage, survival(time, event) FROM dataset GROUP BY stage``. The result's ``logrank``
        tests whether the groups differ (post-processing of the same answer: no further budget).
        """
        request = query_request(None, survival_spec(dataset, time, event, by, filters), None, None, epsilon,
                                dry_run, query_id, sites)
        result = finish(self._call(self._stub.Query, request), self._require(require_all_sites), time)
        assert isinstance(result, SurvivalResult)
        return result

    def histogram(self, dataset: str, column: str, *, by: str | Sequence[str] | None = None,
                  epsilon: float = 0.0, filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                  query_id: str | None = None, sites: Sequence[str] = (),
                  require_all_sites: bool | None = None) -> HistogramResult:
        """Rows per bin of the policy's declared bins on ``column``, per group of ``by`` (noisy, with intervals).

        Its SQL form is ``SELECT stage, histogram(column) FROM dataset GROUP BY stage``; the frame has
        ``[by...,] bin_low, bin_high, count, ci_low, ci_high``; ``.quantiles(qs)`` and ``.plot(path)``
        cost nothing more.
        """
        request = query_request(None, histogram_spec(dataset, column, by, filters), None, None, epsilon, dry_run,
                                query_id, sites)
        result = finish(self._call(self._stub.Query, request), self._require(require_all_sites),
                        wrap=lambda response: HistogramResult(response, column))
        assert isinstance(result, HistogramResult)
        return result

    def quantiles(self, dataset: str, column: str, qs: Sequence[float] = (0.25, 0.5, 0.75), *,
                  by: str | Sequence[str] | None = None, epsilon: float = 0.0, method: str = "auto",
                  filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                  query_id: str | None = None, sites: Sequence[str] = (),
                  require_all_sites: bool | None = None) -> QuantilesResult | SiteQuantilesResult:
        """Quantiles of ``column`` per group of ``by``, over the policy's bins on it.

        The frame has ``[by...,] q, value, ci_low, ci_high``. ``method``:

        - ``"histogram"``: from one noisy histogram; the interval holds the sampling variability and
          the noise, and all the levels ``qs`` cost one epsilon (the quantiles are computed from the
          released histogram here). Through a broker the sites' histograms are pooled.
        - ``"exponential"``: one site selects each quantile among the bin edges by OpenDP's quantile
          mechanism (the exponential mechanism): far more accurate at one site for small epsilon
          (median error 2.0 against 13 over 200 patients at epsilon 0.1), but with no interval on the
          value (``ci_low``/``ci_high`` are empty) and a ``rank_error_95`` column instead; the epsilon
          is split evenly over the distinct levels. A broker refuses it: one draw per site cannot be
          pooled (:class:`~gateway.errors.FailedPrecondition`).
        - ``"auto"`` (default): ``"exponential"`` for one level asked of a site, else ``"histogram"``
          (through a broker, or for several levels, whose split epsilon makes the mechanism no more
          accurate than one histogram: 21 against 16 years of error for the quartiles over 200
          patients at epsilon 0.1). The server's Status says whether it is a site, asked once per
          client. Where the site's policy refuses its quantiles (``quantile`` not among the
          dataset's aggregates, or not at this epsilon), ``"auto"`` asks for the histogram instead:
          a refusal charges nothing.

        Levels outside (0, 1), more than 99, or an unknown method are refused before any call.
        """
        levels = check_levels(qs)
        chosen = check_method(method)
        single = self._single_site(chosen, levels)
        while True:
            spec = (site_quantiles_spec(dataset, column, levels, by, filters) if single
                    else histogram_spec(dataset, column, by, filters))
            request = query_request(None, spec, None, None, epsilon, dry_run, query_id, sites)
            request.single_site = single
            try:
                response = self._call(self._stub.Query, request)
                break
            except PolicyViolation:
                if not (single and chosen == "auto"):
                    raise
                # the site's policy refuses its quantiles (not listed, or not at this epsilon), and a
                # refusal charges nothing: auto asks for the histogram, as it did before the mechanism
                single = False
        made = SiteQuantilesResult if single else QuantilesResult
        result = finish(response, self._require(require_all_sites), wrap=lambda answer: made(answer, column, levels))
        assert isinstance(result, QuantilesResult | SiteQuantilesResult)
        return result

    def _single_site(self, method: str, levels: Sequence[float]) -> bool:
        """Whether quantiles by ``method`` are asked of one site (``auto``: one level, and the target is a site).

        Several levels split the mechanism's epsilon, and then one histogram's quantiles are as
        accurate or more (``bench/quantile_accuracy.py``).
        """
        if method == "auto":
            if len(set(levels)) > 1:
                return False
            if self._component is None:
                self._component = self.status().component
            return self._component == "site"
        return method == "exponential"

    def regression(self, dataset: str, *, y: str, x: str | Sequence[str], by: str | Sequence[str] | None = None,
                   epsilon: float = 0.0, filters: Sequence[tuple[str, str, Any]] = (), dry_run: bool = False,
                   query_id: str | None = None, sites: Sequence[str] = (),
                   require_all_sites: bool | None = None) -> RegressionResult:
        """Least squares of ``y`` on the features ``x`` (1 to 10 numeric columns), with an intercept, by ``by``.

        Through a broker the sites' statistics are pooled first. Rows missing any of the variables
        are left out; values are clamped to the policy's bounds. Its SQL form is
        ``SELECT regression(y, x1, x2) FROM dataset``.
        """
        request = query_request(None, regression_spec(dataset, y, x, by, filters), None, None, epsilon, dry_run,
                                query_id, sites)
        result = finish(self._call(self._stub.Query, request), self._require(require_all_sites), wrap=RegressionResult)
        assert isinstance(result, RegressionResult)
        return result

    def _require(self, given: bool | None) -> bool:
        return self.require_all_sites if given is None else given

    def _call(self, method: Callable[..., T], request: Any) -> T:
        attempt, learned = 0, False
        while True:
            self._caller.sign(request)  # a fresh proof per attempt: each is used once
            try:
                with Progress(self.progress, len(self._caller.sites)):
                    return method(request, metadata=self._caller.metadata, timeout=self.timeout)
            except grpc.RpcError as err:
                wait, learned, error = self._caller.after(err, attempt, learned)
                if wait is None:
                    raise error from None
                if wait:
                    time.sleep(wait)
                    attempt += 1
