"""Prometheus metrics with stable names (DESIGN §10). Labels are bounded: dataset, project, outcome, site.

Every metric set takes a registry (default: the global one) so tests build fresh registries.
No metric carries a query id, user id or any data value.

The metrics tell the truth from the first scrape: a site publishes the budget of every configured
project on every population as soon as it starts (read from its ledger; see
:func:`gateway.site._reload.publish_budgets`), and every counter's label values that alerts and
dashboards look for exist at 0 before anything happens, so the first rejected policy reload or
the first internal error is an increase an alert can see. Each name means one thing: a site's
handling time is ``gateway_query_duration_seconds``, the broker's fan-out time is
``gateway_broker_query_duration_seconds``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

from ._version import __version__
from .errors import ERRORS

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
QUERY_OUTCOMES: tuple[str, ...] = tuple(dict.fromkeys(
    ("ok", "cached", "dry_run", "error", *(cls.outcome for cls in ERRORS))))
"""Every ``outcome`` of ``gateway_queries_total``: answered (ok, cached, dry_run), refused (the error
classes' outcomes: ``unavailable`` for a disk that refuses the ledger or audit log,
``failed_precondition`` for a site that cannot serve the query in its state, such as a missing data
file), or ``error`` (a bug)."""
UNKNOWN_DATASET = "_unknown"  # a call refused before its dataset is known (no credentials, bad SQL)
RELOAD_RESULTS = ("ok", "rejected")
SITE_OUTCOMES = ("ok", "unavailable", "deadline_exceeded", "invalid_answer", "cancelled")
"""The broker's per-site outcomes initialised at 0 (others, a site's status code in lower case, appear when seen)."""


def _build_info(registry: CollectorRegistry, component: str) -> None:
    Info("gateway_build", "The gateway's version and which component this process is",
         registry=registry).info({"version": __version__, "component": component})


class SiteMetrics:
    """The site gateway's metrics."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        labels = ("dataset", "project")  # dataset: the population's name (datasets of one population share it)
        self.budget_limit = Gauge("gateway_budget_epsilon_limit", "Privacy budget limit (epsilon) per period",
                                  labels, registry=registry)
        self.budget_spent = Gauge("gateway_budget_epsilon_spent", "Privacy budget spent (epsilon) this period",
                                  labels, registry=registry)
        self.budget_remaining = Gauge("gateway_budget_epsilon_remaining",
                                      "Privacy budget remaining (epsilon) this period", labels, registry=registry)
        cap = ("dataset",)  # the population's name; a cap spans all projects
        self.cap_limit = Gauge("gateway_population_cap_epsilon_limit",
                               "A population's cap over all projects together (epsilon) per period", cap,
                               registry=registry)
        self.cap_spent = Gauge("gateway_population_cap_epsilon_spent",
                               "Spent by all projects together against a population's cap (epsilon) this period",
                               cap, registry=registry)
        self.cap_remaining = Gauge("gateway_population_cap_epsilon_remaining",
                                   "A population's cap remaining for all projects together (epsilon) this period",
                                   cap, registry=registry)
        self.queries = Counter("gateway_queries", "Queries by dataset and outcome", ("dataset", "outcome"),
                               registry=registry)
        self.duration = Histogram("gateway_query_duration_seconds", "A site's query handling time", ("dataset",),
                                  registry=registry, buckets=_BUCKETS)
        self.policy_reloads = Counter("gateway_policy_reloads", "Policy reload attempts by result", ("result",),
                                      registry=registry)
        for result in RELOAD_RESULTS:
            self.policy_reloads.labels(result)
        _build_info(registry, "site")
        self._published: set[tuple[str, str]] = set()
        self._caps: set[str] = set()
        self._lock = threading.Lock()

    def set_budget(self, dataset: str, project: str, limit: float, spent: float) -> None:
        """Publish one project's budget on one population (``dataset``: the population's name)."""
        with self._lock:
            self._set(dataset, project, limit, spent)

    def _set(self, dataset: str, project: str, limit: float, spent: float) -> None:
        self.budget_limit.labels(dataset, project).set(limit)
        self.budget_spent.labels(dataset, project).set(spent)
        self.budget_remaining.labels(dataset, project).set(max(0.0, limit - spent))
        self._published.add((dataset, project))

    def publish_budgets(self, budgets: Iterable[tuple[str, str, float, float]]) -> None:
        """Publish exactly these budgets, (population, project, limit, spent): others are removed."""
        fresh = list(budgets)
        with self._lock:
            for key in self._published - {(b[0], b[1]) for b in fresh}:
                for gauge in (self.budget_limit, self.budget_spent, self.budget_remaining):
                    gauge.remove(*key)
                self._published.discard(key)
            for population, project, limit, spent in fresh:
                self._set(population, project, limit, spent)

    def set_cap(self, population: str, limit: float, spent: float) -> None:
        """Publish one population's cap over all projects."""
        with self._lock:
            self._set_cap(population, limit, spent)

    def _set_cap(self, population: str, limit: float, spent: float) -> None:
        self.cap_limit.labels(population).set(limit)
        self.cap_spent.labels(population).set(spent)
        self.cap_remaining.labels(population).set(max(0.0, limit - spent))
        self._caps.add(population)

    def publish_caps(self, caps: Iterable[tuple[str, float, float]]) -> None:
        """Publish exactly these caps, (population, limit, spent): a cap the policy dropped is removed."""
        fresh = list(caps)
        with self._lock:
            for population in self._caps - {c[0] for c in fresh}:
                for gauge in (self.cap_limit, self.cap_spent, self.cap_remaining):
                    gauge.remove(population)
                self._caps.discard(population)
            for population, limit, spent in fresh:
                self._set_cap(population, limit, spent)

    def init_datasets(self, datasets: Iterable[str]) -> None:
        """Create every outcome of ``datasets`` (and of ``_unknown``) at 0; a dataset once seen is kept."""
        for dataset in (*datasets, UNKNOWN_DATASET):
            for outcome in QUERY_OUTCOMES:
                self.queries.labels(dataset, outcome)
            self.duration.labels(dataset)


class BrokerMetrics:
    """The broker's metrics."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.site_requests = Counter("gateway_broker_site_requests", "Broker calls to sites by outcome",
                                     ("site", "outcome"), registry=registry)
        self.duration = Histogram("gateway_broker_query_duration_seconds",
                                  "The broker's query time: fan-out to the sites, waiting and pooling",
                                  registry=registry, buckets=_BUCKETS)
        _build_info(registry, "broker")

    def init_sites(self, sites: Iterable[str]) -> None:
        """Create the outcomes alerts look for, at 0, for every configured site."""
        for site in sites:
            for outcome in SITE_OUTCOMES:
                self.site_requests.labels(site, outcome)


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY, host: str = "127.0.0.1") -> int:
    """Expose ``/metrics`` over HTTP; returns the bound port (pass 0 for any free port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
