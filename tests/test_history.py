"""A project's own history: every answer it was charged for, newest first, with when, what, what it
cost and the answer as released; never another project's; through a broker per site; in the CLI."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import grpc
import pytest

from gateway import aio
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway.errors import InvalidQuery
from tests.helpers.cli import run_cli
from tests.helpers.servers import client, signed


def test_a_project_sees_its_own_answers_newest_first_and_nothing_else(start_site, token) -> None:
    site = start_site()
    with client(site, token, project="stats") as c:
        first = c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="h-1")
        c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="h-2")  # the stored answer: free
        c.query("SELECT sex, mean(age_at_diagnosis) FROM patients GROUP BY sex", epsilon=0.5, query_id="h-3")
        c.query("SELECT count(*) FROM patients", epsilon=0.5, dry_run=True)  # priced, never answered
        past = c.history()
    frame = past.frame
    assert frame["query_id"].to_list() == ["h-3", "h-1"]  # a cached repeat or a dry run was charged nothing
    assert frame["epsilon_charged"].to_list() == [0.5, 0.25]
    assert frame["dataset"].to_list() == ["patients", "patients"]
    assert json.loads(frame["canonical_query"][0])["group_by"] == ["sex"]
    assert all(datetime.now(UTC) - at < timedelta(minutes=1) for at in frame["at"].to_list())
    again = past.results[("north", "h-1")]
    assert again.response.rows[0].estimates[0].value == first.response.rows[0].estimates[0].value
    with client(site, token, project="onc-test") as other:
        assert other.history().frame.height == 0  # another project's history is its own


def test_through_a_broker_each_site_has_its_history(start_site, start_broker, token) -> None:
    broker = start_broker({"a": start_site(name="a"), "b": start_site(name="b")})
    with client(broker, token, project="stats") as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="fan-1")
        frame = c.history().frame
    assert sorted(frame["site"].to_list()) == ["a", "b"] and set(frame["query_id"]) == {"fan-1"}


def test_limits_and_bad_limits(start_site, token, stub_for) -> None:
    site = start_site()
    with client(site, token, project="stats") as c:
        for i in range(3):
            c.query(f"SELECT count(*) FROM patients WHERE age_at_diagnosis > {20 + i}", epsilon=0.1)
        assert c.history(limit=2).frame.height == 2
        with pytest.raises(InvalidQuery, match="more than the 1000 entries"):
            c.history(limit=5000)
    with pytest.raises(grpc.RpcError) as err:  # no proof of possession: nothing
        stub_for(site).History(pb.HistoryRequest(), metadata=[("authorization", f"Bearer {token()}")], timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    bearer = token(project="stats")
    answer = stub_for(site).History(signed(pb.HistoryRequest(), bearer, ["north"]),
                                    metadata=[("authorization", f"Bearer {bearer}")], timeout=10)
    assert len(answer.entries) == 3


def test_the_asyncio_client_and_the_cli(start_site, token) -> None:
    import asyncio

    site = start_site()
    with client(site, token, project="stats") as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="cli-1")

    async def ask() -> int:
        async with aio.Client(site.target, token=token(project="stats"), retries=0) as a:
            return (await a.history()).frame.height
    assert asyncio.run(ask()) == 1
    shown = run_cli("history", "--target", site.target, env={"GATEWAY_TOKEN": token(project="stats")})
    assert shown.returncode == 0, shown.stderr
    assert "cli-1" in shown.stdout and "epsilon 0.25" in shown.stdout and "1 answer(s)" in shown.stdout
    as_json = json.loads(run_cli("history", "--target", site.target, "--json",
                                 env={"GATEWAY_TOKEN": token(project="stats")}).stdout)
    assert as_json[0]["query_id"] == "cli-1" and as_json[0]["answer"]["epsilon_charged"] == 0.25
