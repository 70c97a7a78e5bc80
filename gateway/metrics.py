"""Prometheus metrics with stable names (DESIGN §10). Labels are bounded: dataset, project, outcome.

Every metric set takes a registry (default: the global one) so tests build fresh registries.
No metric carries a query id, user id or any data value.
"""

from __future__ import annotations

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, start_http_server


class SiteMetrics:
    """The site gateway's metrics."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        labels = ("dataset", "project")
        self.budget_limit = Gauge("gateway_budget_epsilon_limit", "Privacy budget limit (epsilon) per period",
                                  labels, registry=registry)
        self.budget_spent = Gauge("gateway_budget_epsilon_spent", "Privacy budget spent (epsilon) this period",
                                  labels, registry=registry)
        self.budget_remaining = Gauge("gateway_budget_epsilon_remaining",
                                      "Privacy budget remaining (epsilon) this period", labels, registry=registry)
        self.queries = Counter("gateway_queries", "Queries by dataset and outcome", ("dataset", "outcome"),
                               registry=registry)
        self.duration = Histogram("gateway_query_duration_seconds", "Query handling time", ("dataset",),
                                  registry=registry,
                                  buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.policy_reloads = Counter("gateway_policy_reloads", "Policy reload attempts by result", ("result",),
                                      registry=registry)

    def set_budget(self, dataset: str, project: str, limit: float, spent: float) -> None:
        """Publish one project's budget on one dataset."""
        self.budget_limit.labels(dataset, project).set(limit)
        self.budget_spent.labels(dataset, project).set(spent)
        self.budget_remaining.labels(dataset, project).set(max(0.0, limit - spent))


class BrokerMetrics:
    """The broker's metrics."""

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        self.site_requests = Counter("gateway_broker_site_requests", "Broker calls to sites by outcome",
                                     ("site", "outcome"), registry=registry)
        # label "_broker": the broker does not parse SQL bodies into datasets for its own metrics
        self.duration = Histogram("gateway_query_duration_seconds", "Query handling time", ("dataset",),
                                  registry=registry)


def serve_metrics(port: int, registry: CollectorRegistry = REGISTRY, host: str = "127.0.0.1") -> int:
    """Expose ``/metrics`` over HTTP; returns the bound port (pass 0 for any free port)."""
    server, _thread = start_http_server(port, addr=host, registry=registry)
    return int(server.server_port)
