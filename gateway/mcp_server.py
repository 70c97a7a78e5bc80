"""A Model Context Protocol tool server for LLM analysis agents (``gateway mcp``).

An agent that turns a researcher's question into analyses gets five tools — list the datasets,
price a query, run it, read the budget, read the history — served over stdio with the official
``mcp`` SDK (the ``gateway[mcp]`` extra). Every call goes through one :class:`~gateway.client.Client`
under the researcher's own token and proof key, so the sites charge and refuse it exactly as they
would the researcher: the server adds no privilege and holds no budget of its own.

An agent that may issue queries without end is the averaging and differencing attacker budgets
exist for. The budget itself stops it; ``max_epsilon_per_session`` stops it sooner: the epsilon
this server may spend in one run (one agent session), so that one run cannot drain a project's
budget. The cap reserves each query's requested epsilon before the call and keeps what was
charged after it, so concurrent calls cannot overshoot it together.

Every query tool takes an explicit epsilon (no policy default chosen silently) and gets a fresh
query id. A refusal (budget exhausted, an invalid query, permission denied) comes back as a tool
error carrying the gateway's message, never a traceback.
"""

from __future__ import annotations

import math
import threading
import uuid
import warnings
from collections.abc import Callable
from dataclasses import asdict
from datetime import date, datetime
from typing import Any, TypeVar

import polars as pl
from mcp.server.mcpserver import MCPServer
from mcp.server.mcpserver.exceptions import ToolError

from ._regression_result import RegressionResult
from ._sqlfront import SUPPORTED
from ._version import __version__
from .aggregates import KINDS
from .client import Client
from .errors import GatewayError, MissingSitesWarning
from .results import QueryResult, SurvivalResult

NOISE = ("Every answer is a differentially private estimate: noisy on purpose. Each estimate comes "
         "with std_error and a 95% interval [ci_low, ci_high]; report the interval, never the estimate "
         "alone as if exact. suppressed=true means the group was too small to release (estimate is null).")
SHAPES = ("The SQL is one aggregate SELECT over one dataset, nothing else (no joins, no raw rows): "
          f"{SUPPORTED}. Example: SELECT stage, count(*) AS n, avg(age_at_diagnosis) AS mean_age "
          "FROM patients WHERE sex = 'F' GROUP BY stage.")
COST = ("Every run spends epsilon from the researcher's privacy budget, which does not come back: ask "
        "one query that answers the question rather than many, and price it first with price_query.")
T = TypeVar("T")
INSTRUCTIONS = (f"Federated queries across cancer research sites under a privacy budget. {NOISE} {SHAPES} "
                f"{COST} Start with list_datasets to see the datasets, their columns and epsilon limits.")


class Session:
    """The epsilon one server run may still spend (``cap`` None: only the budget limits it)."""

    def __init__(self, cap: float | None) -> None:
        if cap is not None and not cap > 0:
            raise ValueError("--max-epsilon-per-session must be positive")
        self.cap, self.spent, self._reserved = cap, 0.0, 0.0
        self._lock = threading.Lock()

    def reserve(self, epsilon: float) -> None:
        """Hold ``epsilon`` for one query, or refuse it when the session cap would be exceeded."""
        with self._lock:
            if self.cap is not None and self.spent + self._reserved + epsilon > self.cap + 1e-12:
                left = max(self.cap - self.spent - self._reserved, 0.0)
                raise ToolError(f"SESSION_CAP_EXCEEDED: this session may spend epsilon {self.cap:g} in all "
                                f"(--max-epsilon-per-session); it has spent {self.spent:g}, {left:g} is left and "
                                f"the query asks for {epsilon:g}. Answer with what you have, or ask the "
                                "researcher to start a new session.")
            self._reserved += epsilon

    def settle(self, reserved: float, charged: float) -> None:
        """Release a reservation, keeping what the gateway actually charged (0 when refused)."""
        with self._lock:
            self._reserved -= reserved
            self.spent += charged


def build_server(client: Client, max_epsilon_per_session: float | None = None) -> MCPServer:
    """The tool server for ``client``; ``max_epsilon_per_session`` caps what one run may spend."""
    session = Session(max_epsilon_per_session)
    server: MCPServer = MCPServer("gateway", instructions=INSTRUCTIONS, version=__version__)

    @server.tool(description=f"The datasets this researcher may query: columns with their roles and bounds, "
                             f"the aggregates allowed, the default and maximum epsilon per query, approved "
                             f"templates and the sites that hold each. {SHAPES}")
    def list_datasets() -> list[dict[str, Any]]:
        return [_object(asdict(d)) for d in _guarded(client.datasets)]

    @server.tool(description=f"Price a query without running it (a dry run: charges nothing). Give epsilon to "
                             f"learn the 95% interval half-width each aggregate would have, or target_half_width "
                             f"to learn the smallest epsilon that buys it; either way how many such queries the "
                             f"remaining budget pays for. {NOISE} {SHAPES}")
    def price_query(sql: str, epsilon: float | None = None,
                    target_half_width: float | None = None) -> dict[str, Any]:
        plan = _guarded(lambda: client.plan(sql, epsilon=epsilon, half_width=target_half_width))
        return _object({"epsilon": plan.epsilon, "ci95_half_widths": plan.half_widths,
                           "budget_remaining": plan.remaining, "queries_affordable": plan.queries,
                           "feasible": plan.feasible, "charged": 0.0})

    @server.tool(description=f"Run a query, spending `epsilon` (required, > 0; at most the dataset's "
                             f"epsilon_max) from the budget. Returns tidy rows (group columns, aggregate, "
                             f"estimate, std_error, ci_low, ci_high, suppressed, clamped), the epsilon charged, "
                             f"the budget remaining and any sites missing from a pooled answer. {NOISE} {SHAPES} "
                             f"{COST}")
    def run_query(sql: str, epsilon: float) -> dict[str, Any]:
        if not (math.isfinite(epsilon) and epsilon > 0):
            raise ToolError("INVALID_ARGUMENT: epsilon must be a positive number (price_query tells what it buys)")
        session.reserve(epsilon)
        charged = 0.0
        try:
            result = _guarded(lambda: client.query(sql, epsilon=epsilon, query_id=f"mcp-{uuid.uuid4()}"))
            charged = result.epsilon_charged
        finally:
            session.settle(epsilon, charged)
        out = _answer(result)
        if session.cap is not None:
            out["session_epsilon_left"] = max(session.cap - session.spent, 0.0)
        return out

    @server.tool(description="The researcher's privacy budget per population (and per site through a broker): "
                             "total, spent, remaining and when it resets, the sites that did not answer, plus what "
                             "this session may still spend.")
    def get_budget(dataset: str = "") -> dict[str, Any]:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", MissingSitesWarning)
            frame = _guarded(lambda: client.budget(dataset))
        missing = {site: why for w in caught if isinstance(w.message, MissingSitesWarning)
                   for site, why in w.message.missing.items()}  # sites whose budget is not in the list
        return _object({"budgets": frame.to_dicts(), "missing_sites": missing, "session_cap": session.cap,
                        "session_spent": session.spent})

    @server.tool(description=f"The project's own past answers, newest first: when, which site, the query, the "
                             f"epsilon each cost and the answer as released (tidy rows). Reuse a past answer "
                             f"instead of paying again for the same question. {NOISE}")
    def get_history(limit: int = 20) -> list[dict[str, Any]]:
        past = _guarded(lambda: client.history(limit))
        answers = past.results
        return [_object({**entry, "answer": _rows(answers[(entry["site"], entry["query_id"])])})
                for entry in past.frame.to_dicts()]

    return server


def serve_stdio(client: Client, max_epsilon_per_session: float | None = None) -> None:
    """Serve the tools over stdin/stdout until the agent closes them."""
    # the answer reports its missing sites itself; a warning on stderr would reach no one
    warnings.simplefilter("ignore", MissingSitesWarning)
    build_server(client, max_epsilon_per_session).run("stdio")


def _guarded(call: Callable[[], T]) -> T:
    """Run ``call``; a gateway refusal or a bad argument becomes a tool error with its message."""
    try:
        return call()
    except GatewayError as err:
        raise ToolError(f"{err.reason_code}: {err.message}") from None
    except ValueError as err:
        raise ToolError(f"INVALID_ARGUMENT: {err}") from None


def _answer(result: QueryResult) -> dict[str, Any]:
    return _object({"query_id": result.query_id, "rows": _rows(result), "epsilon_charged": result.epsilon_charged,
                       "budget_remaining": result.budget_remaining, "sites": result.sites,
                       "missing_sites": result.missing_sites, "notes": result.notes})


def _rows(result: QueryResult) -> list[dict[str, Any]]:
    frame: pl.DataFrame = result.frame if isinstance(result, SurvivalResult) else result.to_long()
    if _a_fit(result):  # SELECT regression(y, x...) alone: the coefficients, not only R^2
        frame = RegressionResult(result.response).frame
    return frame.to_dicts()


def _a_fit(result: QueryResult) -> bool:
    """Whether the answer is one regression (its estimates carry each column's bounds)."""
    rows = result.response.rows
    kind = KINDS.get(rows[0].estimates[0].function) if rows and rows[0].estimates else None
    return len(result.response.aggregates) == 1 and kind is not None and kind.bounds_of_every_column


def _object(value: dict[str, Any]) -> dict[str, Any]:
    return {str(k): _json_safe(v) for k, v in value.items()}


def _json_safe(value: Any) -> Any:
    """``value`` with NaN as null, datetimes as RFC 3339 and tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    if isinstance(value, date):
        return value.isoformat()
    if isinstance(value, dict):
        return _object(value)
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value
