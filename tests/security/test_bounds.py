"""Nothing is charged for an answer the caller can no longer receive, the site stops working on it,
and a broker refuses what a site would (each bound on a query's size is an attack in
tests/security/test_attacks.py)."""

from __future__ import annotations

import time

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway import _mechanisms as mechanisms
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.client import Client
from gateway.errors import DeadlineExceeded, InvalidQuery
from gateway.metrics import SiteMetrics
from tests.helpers.data import slow_copy
from tests.helpers.policies import example_policy, with_slow_dataset, write_policy
from tests.helpers.servers import signed, wait_for

NESTED = "SELECT count(*) FROM patients WHERE " + "(" * 400 + "age_at_diagnosis > 1" + ")" * 400
CHAIN = "SELECT count(*) FROM patients WHERE " + " AND ".join(["a=1"] * 1200)  # found by the fuzzer


@pytest.mark.parametrize("sql", [NESTED, CHAIN], ids=["parentheses", "chain"])
def test_the_broker_refuses_deep_nesting_too(start_site, start_broker, token, sql) -> None:
    broker = start_broker({"s0": start_site(name="s0")})
    with Client(broker.target, token=token(), retries=0) as c, pytest.raises(InvalidQuery, match="nested too deeply"):
        c.query(sql, epsilon=0.1)


class SlowNoise(mechanisms.Noise):
    """TEST ONLY: real noise, drawn slowly, so that the caller's deadline passes first."""

    def apply(self, component: mechanisms.Component, exact: tuple[int, ...]) -> list[int]:
        time.sleep(0.6)
        return super().apply(component, exact)


def test_an_answer_the_caller_gave_up_on_is_not_charged(start_site, token) -> None:
    site = start_site(noise=SlowNoise())
    with Client(site.target, token=token(), retries=0, timeout=0.3) as c, pytest.raises(DeadlineExceeded):
        c.query("SELECT count(*) FROM patients", epsilon=0.1)
    time.sleep(1.0)  # the site finishes its work after the caller left
    assert site.state.ledger.total_spent() == 0
    with Client(site.target, token=token(), retries=0) as c:
        assert c.query("SELECT count(*) FROM patients", epsilon=0.1).epsilon_charged == pytest.approx(0.1)


SLOW_SUM = "SELECT sum(age_at_diagnosis) FROM slow"


def _slow_site(start_site, tmp_path, site_data):
    """A site with a dataset ``slow`` on which a sum takes seconds of DuckDB work (a view, see slow_copy)."""
    data = slow_copy(site_data, tmp_path / "slow.duckdb", copies=500, work=200)
    folder = tmp_path / "slow-site"
    folder.mkdir()
    registry = CollectorRegistry()
    policy = write_policy(folder, data, policy=with_slow_dataset(example_policy()))
    return start_site(policy=policy, metrics=SiteMetrics(registry)), registry


def _ended(registry: CollectorRegistry, outcome: str) -> float:
    """How many queries on ``slow`` the site has finished handling with ``outcome``."""
    return registry.get_sample_value("gateway_queries_total", {"dataset": "slow", "outcome": outcome}) or 0.0


@pytest.mark.slow
def test_a_statement_whose_caller_gave_up_is_interrupted_and_charges_nothing(start_site, token, tmp_path,
                                                                            site_data) -> None:
    """A deadline or a cancel frees the site's worker well before the statement would have ended
    (bound: half the uninterrupted time; the interrupt itself takes tens of milliseconds)."""
    site, registry = _slow_site(start_site, tmp_path, site_data)
    with Client(site.target, token=token(project="stats"), retries=0) as c:
        started = time.monotonic()
        c.query(SLOW_SUM, epsilon=0.1)
        uninterrupted = time.monotonic() - started
    freed = {}
    with grpc.insecure_channel(site.target) as channel:
        stub = pb_grpc.GatewayStub(channel)
        bearer = token()
        metadata = [("authorization", f"Bearer {bearer}")]
        for case in ("deadline", "cancel"):
            request = signed(pb.QueryRequest(sql=SLOW_SUM, epsilon=0.1, query_id=f"gone-{case}"), bearer,
                             [site.state.live.loaded.policy.site])
            before = _ended(registry, "deadline")
            started = time.monotonic()
            call = stub.Query.future(request, metadata=metadata, timeout=0.5 if case == "deadline" else 30)
            if case == "cancel":
                time.sleep(0.5)
                assert call.cancel()
            else:
                with pytest.raises(grpc.RpcError) as err:
                    call.result()
                assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            wait_for(lambda b=before: _ended(registry, "deadline") > b, timeout=2 * uninterrupted)
            freed[case] = time.monotonic() - started
    print(f"uninterrupted {uninterrupted:.2f} s; freed after {freed}")
    for case, seconds in freed.items():
        assert seconds < uninterrupted / 2, (case, seconds, uninterrupted)
    with Client(site.target, token=token(), retries=0) as c:
        spent = c.budget("slow")["spent"][0]
    assert spent == 0  # neither the deadline's nor the cancel's query moved the budget
    assert _ended(registry, "error") == 0
