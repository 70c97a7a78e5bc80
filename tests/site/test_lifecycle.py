"""A site process's lifecycle as an operator sees it: JSON events on stderr, and on SIGTERM health
NOT_SERVING first, the site still answering through the drain, calls in flight finishing, exit 0."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from concurrent.futures import Future

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.client import Client
from tests.helpers.cli import GATEWAY, wait_for_port_file
from tests.helpers.data import slow_copy
from tests.helpers.policies import example_policy, with_slow_dataset, write_policy

SLOW_SUM = "SELECT sum(age_at_diagnosis) FROM slow"  # seconds of DuckDB work (see slow_copy)
DRAIN = 3.0


def _health(target: str) -> str:
    with grpc.insecure_channel(target) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


@pytest.mark.slow
def test_sigterm_turns_health_not_serving_first_and_calls_in_flight_finish(tmp_path, keys, token, site_data):
    data = slow_copy(site_data, tmp_path / "slow.duckdb", copies=500, work=200)
    policy = write_policy(tmp_path, data, policy=with_slow_dataset(example_policy()))
    port_file, stderr_path = tmp_path / "port", tmp_path / "stderr.log"
    with stderr_path.open("w") as stderr:  # a file: a pipe nobody reads would fill
        proc = subprocess.Popen([*GATEWAY, "site", "serve", "--policy", str(policy), "--port", "0",
                                 "--state-dir", str(tmp_path / "state"), "--trusted-key", str(keys[1]),
                                 "--port-file", str(port_file), "--drain-seconds", str(DRAIN),
                                 "--stop-grace", "60"], stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    try:
        target = wait_for_port_file(proc, port_file)
        assert _health(target) == "SERVING"
        with Client(target, token=token(project="stats"), retries=0, sign_for=["north"], timeout=120) as c:
            in_flight: Future[object] = Future()

            def ask() -> None:
                try:
                    in_flight.set_result(c.query(SLOW_SUM, epsilon=0.1))
                except Exception as err:  # handed to the test thread
                    in_flight.set_exception(err)

            threading.Thread(target=ask, daemon=True).start()
            time.sleep(0.5)
            assert not in_flight.done(), "the slow query finished before SIGTERM: the test shows nothing"
            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            deadline = signalled + DRAIN / 2
            while _health(target) != "NOT_SERVING":
                assert time.monotonic() < deadline, "health still SERVING after SIGTERM"
                time.sleep(0.05)
            assert time.monotonic() - signalled < DRAIN  # NOT_SERVING while the site still serves
            assert len(c.datasets()) >= 1  # a new call during the drain is still answered
            in_flight.result(timeout=120)  # the call in flight is answered, not cut off
        assert proc.wait(timeout=120) == 0
        assert time.monotonic() - signalled >= DRAIN
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    events = [json.loads(line) for line in stderr_path.read_text().splitlines() if line.strip()]  # every line JSON
    names = [e["event"] for e in events]
    assert names[-1] == "stopped" and names.index("started") < names.index("stopping")  # the query may end between
    started = events[names.index("started")]
    assert started["site"] == "north" and "slow" in started["datasets"] and started["tls"] is False
    assert started["drain_seconds"] == DRAIN and started["version"]
    queries = [e for e in events if e["event"] == "query"]
    assert [(q["dataset"], q["outcome"], q["project"]) for q in queries] == [("slow", "ok", "stats")]
    assert events[names.index("stopping")]["signal"] == "SIGTERM"
