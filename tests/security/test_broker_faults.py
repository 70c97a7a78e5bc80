"""The broker survives faulty sites: one that accepts connections and never answers, one that speaks
garbage, one whose well-formed answers make no sense, and one restarted in the middle of a query.

Each fault is a real server on a loopback port (tests.helpers.faults); the other sites are real.
The caller always gets an answer from the healthy sites, or a status that lists why each site is
missing, never INTERNAL or UNKNOWN; what the faulty site sent never reaches the pooled answer.
"""

from __future__ import annotations

import math
import random
import threading
import time
from concurrent import futures

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.client import Client
from gateway.errors import FailedPrecondition, Unavailable
from gateway.metrics import BrokerMetrics
from tests.helpers.data import slow_copy
from tests.helpers.faults import LyingSite, RawServer
from tests.helpers.policies import example_policy, with_slow_dataset, write_policy
from tests.helpers.servers import ExactNoise, signed, wait_for

GROUPED = "SELECT stage, count(*), mean(age_at_diagnosis) FROM patients GROUP BY stage"
GARBAGE = {
    "random bytes": random.Random(8).randbytes(4096),
    "HTTP/1.1": b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
}


def _new_threads(before: set[threading.Thread]) -> list[str]:
    """Threads started since ``before`` and still alive, other than the sites' own workers and gRPC's asyncio
    poller (one per process, started by the first ``grpc.aio`` call: the broker's fan-out runs on grpc.aio)."""
    return [t.name for t in threading.enumerate() if t not in before and not t.name.startswith("SiteService")
            and not t.name.endswith("(_poll_wrapper)")]


# --- a site that accepts connections and never answers ---------------------------------------------


def test_a_silent_site_is_missing_by_the_deadline_however_many_queries_wait_on_it(start_site, start_broker,
                                                                                   token) -> None:
    """16 concurrent queries (more than a thread per site call could serve) each end by the deadline, with
    the silent site missing; none waits for another's call to the silent site."""
    good = start_site(name="good")
    with Client(good.target, token=token(), retries=0) as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.1)  # the site's own threads are running
    with RawServer(reply=None) as silent:
        before = set(threading.enumerate())
        broker = start_broker({"good": good, "silent": silent}, deadline_seconds=2)

        def ask(i: int) -> tuple[float, dict[str, str], list[str]]:
            with Client(broker.target, token=token(), retries=0) as c:
                started = time.monotonic()
                result = c.query("SELECT count(*) FROM patients", epsilon=0.1, query_id=f"silent-{i}")
                return time.monotonic() - started, result.missing_sites, result.sites

        with futures.ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(ask, range(16)))
        assert silent.connections  # the broker did connect, and was never answered
        for seconds, missing, sites in answers:
            assert sites == ["good"] and list(missing) == ["silent"]
            assert missing["silent"].startswith("deadline")
            assert seconds < 2 + 1.0  # the deadline, not a multiple of it
        broker.stop(grace=0)
        wait_for(lambda: not _new_threads(before), timeout=5)  # the broker left no thread behind


def test_stopping_the_broker_ends_calls_waiting_on_a_silent_site(start_site, start_broker, token) -> None:
    good = start_site(name="good")
    with RawServer(reply=None) as silent:
        broker = start_broker({"good": good, "silent": silent}, deadline_seconds=60)
        bearer = token()
        request = signed(pb.QueryRequest(sql="SELECT count(*) FROM patients", epsilon=0.1, query_id="stop-1"),
                         bearer, ["good", "silent"])
        with grpc.insecure_channel(broker.target) as channel:
            call = pb_grpc.GatewayStub(channel).Query.future(
                request, metadata=[("authorization", f"Bearer {bearer}")], timeout=60)
            wait_for(lambda: bool(silent.connections))
            started = time.monotonic()
            broker.stop(grace=0)
            stopping = time.monotonic() - started
            with pytest.raises(grpc.RpcError) as err:
                call.result(timeout=5)  # the caller learns at once, not after the 60 s deadline
    assert stopping < 2.0
    assert err.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)


# --- a site that speaks garbage --------------------------------------------------------------------


@pytest.mark.parametrize("garbage", list(GARBAGE))
def test_a_site_that_speaks_garbage_is_missing_as_unavailable(start_site, start_broker, token, garbage) -> None:
    good = start_site(name="good")
    with RawServer(reply=GARBAGE[garbage]) as raw:
        broker = start_broker({"raw": raw, "good": good}, deadline_seconds=5)
        alone = start_broker({"raw": raw}, deadline_seconds=5)
        with Client(broker.target, token=token(), retries=0) as c:
            result = c.query("SELECT count(*) FROM patients", epsilon=0.1)
        with Client(alone.target, token=token(), retries=0) as c, pytest.raises(Unavailable) as err:
            c.query("SELECT count(*) FROM patients", epsilon=0.1)
    assert result.sites == ["good"] and result.missing_sites["raw"].startswith("unavailable")
    assert "only 0 site(s) answered" in err.value.message and "raw: unavailable" in err.value.message


# --- a site whose well-formed answers make no sense ------------------------------------------------


def _first_component(response: pb.QueryResponse, value: float) -> None:
    response.rows[0].estimates[0].components[0].values[0] = value


def _many_rows(response: pb.QueryResponse) -> None:
    # over MAX_CELLS (10,000) yet under the 8 MiB a broker receives, so that its checks see it
    template = response.rows[0]
    for i in range(15_000):
        row = response.rows.add()
        row.CopyFrom(template)
        row.keys[0].value.string_value = f"stage {i}"


def _no_components(response: pb.QueryResponse) -> None:
    for row in response.rows:
        for e in row.estimates:
            del e.components[:]


def _kinds_swapped(response: pb.QueryResponse) -> None:
    """The mean's estimates made into well-formed sums (its sum component kept): pooled, they would add up."""
    for row in response.rows:
        mean = row.estimates[1]
        mean.function = "sum"
        kept = [c for c in mean.components if c.name == "sum"]
        del mean.components[:]
        mean.components.extend(kept)


CORRUPTIONS = {
    "a NaN component": (lambda r: _first_component(r, math.nan), "component count is nan"),
    "an infinite component": (lambda r: _first_component(r, math.inf), "component count is inf"),
    "an absurd component": (lambda r: _first_component(r, 1e300), "component count is 1e+300"),
    "an infinite value": (lambda r: setattr(r.rows[1].estimates[1], "value", -math.inf), "its value is -inf"),
    "another dataset": (lambda r: setattr(r, "dataset", "treatments"), "dataset 'treatments', not 'patients'"),
    "15,000 more rows": (_many_rows, "15004 rows"),
    "no components": (_no_components, "releases components [], not ['count']"),
    "another kind": (_kinds_swapped, "aggregate kinds are ['count', 'sum'], not ['count', 'mean']"),
    "a lost estimate": (lambda r: r.rows[2].estimates.pop(), "row 3: its estimates are ['count']"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_nonsensical_answer_is_not_pooled(start_site, start_broker, token, corruption) -> None:
    """The lying site comes first in the broker's configuration: pooling takes its groups and kinds from
    the first answer, so it must not be that one. Sites release exact values, so the pooled answer
    must be exactly the good site's."""
    corrupt, phrase = CORRUPTIONS[corruption]
    good = start_site(noise=ExactNoise(), name="good")
    registry = CollectorRegistry()
    with LyingSite(start_site(noise=ExactNoise(), name="liar"), corrupt) as liar:
        broker = start_broker({"liar": liar, "good": good}, metrics=BrokerMetrics(registry))
        with Client(broker.target, token=token(), retries=0) as c:
            result = c.query(GROUPED, epsilon=0.5)
        with Client(good.target, token=token(), retries=0) as c:
            alone = c.query(GROUPED, epsilon=0.5)
    assert result.sites == ["good"] and list(result.missing_sites) == ["liar"]
    assert result.missing_sites["liar"].startswith("invalid_answer: its answer cannot be pooled")
    assert phrase in result.missing_sites["liar"]
    pooled, own = result.to_polars(), alone.to_polars()
    assert pooled["stage"].to_list() == own["stage"].to_list() == ["I", "II", "III", "IV"]
    assert pooled["count"].to_list() == own["count"].to_list()
    assert pooled["mean(age_at_diagnosis)"].to_list() == pytest.approx(own["mean(age_at_diagnosis)"].to_list())
    assert registry.get_sample_value("gateway_broker_site_requests_total",
                                     {"site": "liar", "outcome": "invalid_answer"}) == 1


def test_an_answer_larger_than_any_site_sends_is_refused_unread(start_site, start_broker, token) -> None:
    """A site sends at most 3 MiB of rows and its canonical query; 9 MiB is refused by gRPC before it is
    parsed, and the site is missing for a transport reason (never called a budget refusal)."""
    with LyingSite(start_site(name="liar"), lambda r: r.notes.append("x" * 9 * 2**20)) as liar:
        broker = start_broker({"liar": liar, "good": start_site(name="good")})
        with Client(broker.target, token=token(), retries=0) as c:
            result = c.query(GROUPED, epsilon=0.5)
    assert result.sites == ["good"]
    assert result.missing_sites["liar"].startswith("transport: RESOURCE_EXHAUSTED")


def test_only_nonsensical_answers_fail_the_query_with_a_precondition_naming_each(start_site, start_broker,
                                                                                 token) -> None:
    with LyingSite(start_site(name="liar"), _no_components) as liar:
        broker = start_broker({"liar": liar})
        with Client(broker.target, token=token(), retries=0) as c, pytest.raises(FailedPrecondition) as err:
            c.query(GROUPED, epsilon=0.5)
    assert "only 0 site(s) answered" in err.value.message and "liar: invalid_answer" in err.value.message


def test_honest_answers_of_every_kind_and_dry_runs_pass_the_checks(start_site, start_broker, token) -> None:
    """The checks refuse nothing a real site sends: every aggregate kind, suppressed cells, dry runs."""
    broker = start_broker({"a": start_site(name="a"), "b": start_site(name="b")})
    sql = ("SELECT sex, stage, count(*), sum(survival_months), mean(bmi), variance(age_at_diagnosis), "
           "stddev(bmi) FROM patients WHERE diagnosis_year = 2024 GROUP BY sex, stage")
    with Client(broker.target, token=token(), retries=0) as c:
        answered = c.query(sql, epsilon=1.0)
        priced = c.query(sql, epsilon=1.0, dry_run=True)
        templated = c.query(template="stage_distribution", params={"from_year": 2015}, epsilon=0.5)
    for result in (answered, priced, templated):
        assert result.sites == ["a", "b"] and result.missing_sites == {}


# --- a site restarted in the middle of a query -----------------------------------------------------


@pytest.mark.slow
def test_a_site_restarted_mid_query_is_reached_again_within_two_seconds(start_site, start_broker, token,
                                                                        tmp_path, site_data) -> None:
    """Site b is stopped while it runs a query (a DuckDB statement of seconds) and stays down for 5 s
    while the broker answers from a alone; b charged nothing for the query it was stopped in.

    While b is down its port accepts and hangs up, so that the test sees each of the broker's attempts
    to reconnect; b is restarted on that port just after one, when the broker has its full backoff to
    wait: gRPC's own (by then about 4 s, growing to 2 minutes) would fail the 2 s bound every time."""
    policy = with_slow_dataset(example_policy())
    folders = {name: tmp_path / name for name in ("a", "b")}
    for folder in folders.values():
        folder.mkdir()
    a = start_site(policy=write_policy(folders["a"], slow_copy(site_data, folders["a"] / "d.duckdb", 1, 1),
                                       policy=policy), name="a")
    b_policy = write_policy(folders["b"], slow_copy(site_data, folders["b"] / "d.duckdb", 500, 200), policy=policy)
    b = start_site(policy=b_policy, state_dir=folders["b"] / "state", name="b")
    broker = start_broker({"a": a, "b": b}, deadline_seconds=30)
    with Client(broker.target, token=token(), retries=0, timeout=60) as c:
        assert c.query("SELECT count(*) FROM patients", epsilon=0.1).sites == ["a", "b"]
        with futures.ThreadPoolExecutor(1) as pool:
            slow = pool.submit(c.query, "SELECT sum(age_at_diagnosis) FROM slow", epsilon=0.1)
            time.sleep(1.0)  # b is inside its statement
            b.stop(grace=0)
            interrupted = slow.result(timeout=30)
        with RawServer(port=b.port, hang_up=True) as stand_in:
            down = time.monotonic()
            while time.monotonic() - down < 5:
                assert c.query("SELECT count(*) FROM patients WHERE sex = 'F'", epsilon=0.1).sites == ["a"]
                time.sleep(0.25)
            attempts = len(stand_in.accepted)
            wait_for(lambda: len(stand_in.accepted) > attempts, timeout=30)
        restarted = start_site(policy=b_policy, state_dir=folders["b"] / "state", port=b.port, name="b")
        up = time.monotonic()
        while c.query("SELECT count(*) FROM patients WHERE sex = 'M'", epsilon=0.1).sites != ["a", "b"]:
            assert time.monotonic() - up < 30, "the restarted site was not reached again"
            time.sleep(0.02)
        reached = time.monotonic() - up
    print(f"restarted site reached again after {reached:.2f} s ({attempts} attempts while it was down)")
    assert reached < 2.0
    assert interrupted.sites == ["a"] and interrupted.missing_sites["b"].startswith("unavailable")
    with Client(restarted.target, token=token(), retries=0) as c:
        assert c.budget("slow")["spent"][0] == 0
