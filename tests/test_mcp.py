"""``gateway mcp``: the tool server for LLM analysis agents, driven by the mcp SDK's own stdio client.

Each test starts a real site, runs ``gateway mcp --target ...`` as a subprocess and talks to it as an
agent would; charges are checked in the site's ledger, not in what the tools say.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Awaitable, Callable
from fractions import Fraction
from typing import Any

import pytest
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

from gateway import cli
from tests.helpers.cli import GATEWAY

COUNT_BY_STAGE = "SELECT stage, count(*) AS n FROM patients GROUP BY stage"

def _agent(target: str, token: str, *extra: str) -> Callable[[Callable[[ClientSession], Awaitable[Any]]], Any]:
    """Run one coroutine against a fresh ``gateway mcp`` process (as an agent's host would start it)."""
    params = StdioServerParameters(command=GATEWAY[0], args=[*GATEWAY[1:], "mcp", "--target", target, *extra],
                                   env={"GATEWAY_TOKEN": token, "GATEWAY_PROOF_KEY": os.environ["GATEWAY_PROOF_KEY"]})

    async def run(body: Callable[[ClientSession], Awaitable[Any]]) -> Any:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            return await body(session)

    return lambda body: asyncio.run(asyncio.wait_for(run(body), 60))


async def _call(session: ClientSession, tool: str, **arguments: Any) -> Any:
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    structured = result.structured_content
    assert structured is not None
    return structured.get("result", structured)  # a list comes wrapped as {"result": [...]}


async def _refusal(session: ClientSession, tool: str, **arguments: Any) -> str:
    result = await session.call_tool(tool, arguments)
    assert result.is_error
    text: str = result.content[0].text  # type: ignore[union-attr]
    assert "Traceback" not in text
    return text.removeprefix(f"Error executing tool {tool}: ")  # the SDK's prefix; the rest is ours


@pytest.mark.slow  # a server process
def test_tools_teach_the_shapes_and_the_noise_price_and_run_charge_exactly_as_the_client(start_site, token):
    site = start_site()

    async def body(session: ClientSession) -> dict[str, Any]:
        tools = {t.name: t for t in (await session.list_tools()).tools}
        out: dict[str, Any] = {"tools": tools, "datasets": await _call(session, "list_datasets")}
        out["price"] = await _call(session, "price_query", sql=COUNT_BY_STAGE, epsilon=0.25)
        out["spent_after_price"] = site.state.ledger.total_spent()
        out["no_epsilon"] = await session.call_tool("run_query", {"sql": COUNT_BY_STAGE})
        out["answer"] = await _call(session, "run_query", sql=COUNT_BY_STAGE, epsilon=0.25)
        out["budget"] = await _call(session, "get_budget", dataset="patients")
        out["history"] = await _call(session, "get_history", limit=5)
        out["invalid"] = await _refusal(session, "run_query", sql="SELECT * FROM patients", epsilon=0.25)
        return out

    out = _agent(site.target, token())(body)
    tools = out["tools"]
    assert set(tools) == {"list_datasets", "price_query", "run_query", "get_budget", "get_history"}
    for name in ("price_query", "run_query"):
        description = tools[name].description
        assert "noisy" in description and "95% interval" in description and "ci_low" in description
        assert "GROUP BY" in description and "FROM <dataset>" in description and "no joins" in description
    assert "epsilon" in tools["run_query"].input_schema["required"]  # no silent policy default

    assert "patients" in {d["name"] for d in out["datasets"]}
    price = out["price"]
    assert price["epsilon"] == 0.25 and price["charged"] == 0 and price["ci95_half_widths"]["count"] > 0
    assert price["queries_affordable"] >= 1 and out["spent_after_price"] == 0  # a dry run charges nothing

    assert out["no_epsilon"].is_error  # the schema refuses a run without an epsilon
    answer = out["answer"]
    assert answer["epsilon_charged"] == 0.25 and answer["query_id"].startswith("mcp-")
    assert answer["missing_sites"] == {}
    row = answer["rows"][0]
    assert {"stage", "aggregate", "estimate", "std_error", "ci_low", "ci_high", "suppressed"} <= set(row)
    assert row["aggregate"] == "n" and row["ci_low"] <= row["estimate"] <= row["ci_high"]
    assert site.state.ledger.total_spent() == Fraction(1, 4)  # after the refused query too: it charged nothing

    (budget,) = out["budget"]["budgets"]
    assert budget["spent"] == 0.25 and budget["remaining"] == answer["budget_remaining"]
    (entry,) = out["history"]
    assert entry["query_id"] == answer["query_id"] and entry["epsilon_charged"] == 0.25
    assert [r["estimate"] for r in entry["answer"]] == [r["estimate"] for r in answer["rows"]]

    assert out["invalid"].startswith("INVALID_QUERY") and "supported: SELECT" in out["invalid"]


@pytest.mark.slow  # a server process
def test_an_exhausted_budget_comes_back_as_a_tool_error_with_the_numbers(start_site, token):
    site = start_site()

    async def body(session: ClientSession) -> str:
        for year in (2010, 2011):
            sql = f"SELECT count(*) FROM patients WHERE diagnosis_year = {year}"
            await _call(session, "run_query", sql=sql, epsilon=0.5)
        return await _refusal(session, "run_query", sql=COUNT_BY_STAGE, epsilon=0.1)

    message = _agent(site.target, token(project="tight"))(body)
    assert message.startswith("BUDGET_EXHAUSTED") and "0.1" in message
    assert site.state.ledger.total_spent() == 1


@pytest.mark.slow  # a server process
def test_the_session_cap_refuses_the_query_that_would_exceed_it_before_the_site_sees_it(start_site, token):
    site = start_site()

    async def body(session: ClientSession) -> tuple[dict[str, Any], str, dict[str, Any]]:
        first = await _call(session, "run_query", sql=COUNT_BY_STAGE, epsilon=0.25)
        refused = await _refusal(session, "run_query", sql=COUNT_BY_STAGE, epsilon=0.25)
        budget = await _call(session, "get_budget")
        return first, refused, budget

    first, refused, budget = _agent(site.target, token(), "--max-epsilon-per-session", "0.4")(body)
    assert first["session_epsilon_left"] == pytest.approx(0.15)
    assert refused.startswith("SESSION_CAP_EXCEEDED") and "0.4" in refused
    assert budget["session_cap"] == 0.4 and budget["session_spent"] == 0.25
    assert site.state.ledger.total_spent() == Fraction(1, 4)


@pytest.mark.slow  # a server process
def test_the_budget_tool_names_the_sites_that_did_not_answer(start_site, start_broker, token):
    sites = {name: start_site(name=name) for name in ("north", "south")}
    broker = start_broker(sites, deadline_seconds=3)
    sites["south"].stop(grace=0)

    async def body(session: ClientSession) -> dict[str, Any]:
        return await _call(session, "get_budget")

    budget = _agent(broker.target, token())(body)
    assert {b["site"] for b in budget["budgets"]} == {"north"}
    assert list(budget["missing_sites"]) == ["south"] and budget["missing_sites"]["south"].startswith("unavailable")


def test_without_the_extra_gateway_mcp_says_how_to_install_it(monkeypatch, capsys):
    for name in [m for m in sys.modules if m.startswith("mcp.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mcp", None)  # as if the mcp package were not installed
    monkeypatch.delitem(sys.modules, "gateway.mcp_server", raising=False)
    assert cli.main(["mcp", "--target", "127.0.0.1:1", "--token", "t"]) == cli.EXIT_USAGE
    err = capsys.readouterr().err
    assert err.strip() == "gateway: error: gateway mcp needs the mcp extra: pip install 'gateway[mcp]'"
