"""The audit trail under faults, through real site servers: a full disk, a crash, a torn log, a flood.

A release and its audit record are durable together; a record that cannot be written means no
answer (UNAVAILABLE), never INTERNAL and never a seq written twice; at start a torn tail is cut and
release records the ledger anchored are restored; calls without credentials are counted per source
(the counter's own rules are tested here too), so they cannot fill the disk.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import resource
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest

from gateway import audit
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway.audit import AuditLogError, _digest
from gateway.client import Client
from gateway.errors import GatewayError, InvalidQuery, Unavailable
from gateway.ledger import anchors
from gateway.site._rejections import RejectionCounter
from tests.helpers.cli import GATEWAY, run_cli, wait_for_port_file
from tests.helpers.faults import full_disk
from tests.helpers.policies import write_policy
from tests.helpers.servers import client

COUNT = "SELECT count(*) FROM patients WHERE age_at_diagnosis >= {}"


def spent(c: Client) -> float:
    return float(c.budget("patients")["spent"][0])


def verified(state: Path) -> audit.Verification:
    result = audit.verify(state / "audit.jsonl", anchors(state / "ledger.sqlite"))
    assert result.ok, result.problem
    return result


def seqs(state: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in (state / "audit.jsonl").read_text().splitlines()]


# -- a full disk at a running site -------------------------------------------------------------------

def test_an_answer_whose_record_cannot_be_written_is_not_released_and_a_retry_gets_it_free(start_site, token):
    site = start_site()
    state = site.state.state_dir
    with client(site, token) as c:
        c.query(COUNT.format(40), epsilon=0.5, query_id="before")
        with full_disk(site.state.audit):
            with pytest.raises(Unavailable) as refused:
                c.query(COUNT.format(50), epsilon=0.5, query_id="q")
            assert "not released" in str(refused.value) and "same query_id" in str(refused.value)
            assert spent(c) == 1.0  # charged (and the answer stored) in the ledger ...
            with pytest.raises(Unavailable) as later:  # ... but nothing new is charged while the log is full
                c.query(COUNT.format(60), epsilon=0.5, query_id="other")
            assert "charged nothing" in str(later.value)
            assert spent(c) == 1.0
        retried = c.query(COUNT.format(50), epsilon=0.5, query_id="q")
        assert retried.cached and retried.epsilon_charged == 0 and spent(c) == 1.0
    site.stop()
    records = audit.tail(state / "audit.jsonl")
    assert [(r["query_id"], r["outcome"]) for r in records] == [("before", "ok"), ("q", "ok"), ("q", "cached")]
    assert seqs(state) == [1, 2, 3]
    assert verified(state).anchors == 2


def test_refusals_and_stored_answers_are_unavailable_while_their_record_cannot_be_written(start_site, token):
    site = start_site()
    with client(site, token) as c:
        c.query(COUNT.format(40), epsilon=0.5, query_id="q")
        with full_disk(site.state.audit):
            for call in (lambda: c.query("SELECT count(*) FROM nope"),  # a refusal
                         lambda: c.query(COUNT.format(40), epsilon=0.5, query_id="q"),  # a stored answer
                         lambda: c.query(COUNT.format(45), epsilon=0.5, dry_run=True)):
                with pytest.raises(Unavailable):
                    call()
        assert spent(c) == 0.5
        counted = site.state.metrics.registry.get_sample_value
        # a full disk is its own outcome (its own alert), never an internal error
        assert counted("gateway_queries_total", {"dataset": "patients", "outcome": "unavailable"}) == 2
        assert counted("gateway_queries_total", {"dataset": "_unknown", "outcome": "unavailable"}) == 1
        assert not any(counted("gateway_queries_total", {"dataset": d, "outcome": "error"}) for d in
                       ("patients", "_unknown"))
        with pytest.raises(InvalidQuery):  # the disk is back: refusals are themselves again
            c.query("SELECT count(*) FROM patients WHERE x = 1")
    site.stop()
    assert [r["outcome"] for r in audit.tail(site.state.audit.path)] == ["ok", "invalid"]
    verified(site.state.state_dir)


def test_queries_that_lose_the_race_for_the_last_budget_are_recorded_as_refused_not_charged(start_site, token):
    site = start_site()
    with client(site, token) as c:
        for i in range(10):  # 9.5 of the 10 spent
            c.query(COUNT.format(20 + i), epsilon=1 if i < 9 else 0.5)
        barrier = threading.Barrier(8)

        def last_half(i: int) -> str:
            barrier.wait()
            try:
                c.query(COUNT.format(40 + i), epsilon=0.5)
                return "ok"
            except GatewayError as err:
                return type(err).__name__

        with ThreadPoolExecutor(8) as pool:
            outcomes = sorted(pool.map(last_half, range(8)))
        assert outcomes == ["BudgetExhausted"] * 7 + ["ok"]
    site.stop()
    records = audit.tail(site.state.audit.path, 100)
    refused = [r for r in records if r["outcome"] == "budget_exhausted"]
    assert len(refused) == 7 and sum(r["outcome"] == "ok" for r in records) == 11
    assert all("epsilon_charged" not in r and "charge_id" not in r for r in refused)
    assert verified(site.state.state_dir).anchors == 11


# -- calls without credentials -----------------------------------------------------------------------

def _tokenless(stub: Any, metadata: tuple[tuple[str, str], ...] = ()) -> grpc.StatusCode:
    try:
        stub.Query(pb.QueryRequest(sql="SELECT count(*) FROM patients"), metadata=metadata, timeout=10)
    except grpc.RpcError as err:
        return err.code()
    raise AssertionError("answered without credentials")


def test_2000_calls_without_credentials_append_a_few_records_whose_counts_add_up(start_site, stub_for):
    site = start_site()
    stub = stub_for(site)
    path = site.state.audit.path
    size = path.stat().st_size
    kinds = {"missing credentials": (), "malformed credentials": (("authorization", "Basic abc"),),
             "invalid or expired credentials": (("authorization", "Bearer not.a.token"),)}
    for i in range(2000):
        assert _tokenless(stub, list(kinds.values())[i % 3]) == grpc.StatusCode.UNAUTHENTICATED
    assert path.stat().st_size - size < 1000  # not ~364 B each
    site.stop()
    records = [r for r in audit.tail(path, 100) if r["event"] == "unauthenticated"]
    assert len(records) == 2  # the first at once, the other 1,999 at shutdown
    assert sum(r["unauthenticated_rejections"] for r in records) == 2000
    reasons = {k: sum(r["reasons"].get(k, 0) for r in records) for k in kinds}
    assert reasons == {"missing credentials": 667, "malformed credentials": 667, "invalid or expired credentials": 666}
    assert {r["source"] for r in records} == {"ipv4:127.0.0.1"}
    assert records[1]["first"] <= records[1]["last"] and verified(site.state.state_dir)


def test_calls_without_credentials_are_recorded_at_most_once_per_source_per_interval(start_site, stub_for):
    site = start_site(rejection_interval=0.25)
    stub = stub_for(site)
    started = time.monotonic()
    calls = 0
    while time.monotonic() - started < 1.2:
        _tokenless(stub)
        calls += 1
    elapsed = time.monotonic() - started
    site.stop()
    records = [r for r in audit.tail(site.state.audit.path, 100) if r["event"] == "unauthenticated"]
    assert len(records) <= elapsed / 0.25 + 2  # one per interval, and one at shutdown
    assert sum(r["unauthenticated_rejections"] for r in records) == calls
    assert all(b["first"] >= a["last"] for a, b in itertools.pairwise(records))


def test_authenticated_queries_are_still_recorded_one_by_one(start_site, token, stub_for):
    site = start_site()
    with client(site, token) as c:
        for i in range(30):
            with pytest.raises(GatewayError):
                c.query(f"SELECT count(*) FROM nope{i}")
        for i in range(5):
            c.query(COUNT.format(40 + i), epsilon=0.1)
    _tokenless(stub_for(site))
    site.stop()
    records = audit.tail(site.state.audit.path, 100)
    assert [r["event"] for r in records] == ["query"] * 35 + ["unauthenticated"]
    assert [r["outcome"] for r in records[:35]] == ["invalid"] * 30 + ["ok"] * 5


def test_rejections_are_recorded_once_per_source_per_interval_and_the_counts_add_up() -> None:
    counter = RejectionCounter(interval=10)
    records = []
    for i in range(1000):
        records += counter.add("ipv4:10.0.0.1", "missing credentials" if i % 4 else "invalid credentials", i / 50)
    records += counter.drain()
    assert len(records) == 3  # at 0 s, once 10 s had passed (at 10 s), and the rest at shutdown
    assert sum(r["unauthenticated_rejections"] for r in records) == 1000
    assert [r["first"] for r in records] == [0, 0.02, 10.02] and records[1]["last"] == 10.0
    assert sum(r["reasons"]["invalid credentials"] for r in records) == 250
    assert counter.drain() == []


def test_each_source_has_its_own_interval_and_sources_beyond_the_limit_share_one() -> None:
    counter = RejectionCounter(interval=10, max_sources=3)
    records = []
    for i in range(100):
        records += counter.add(f"ipv4:10.0.0.{i}", "missing credentials", 1.0)
    records += counter.drain()
    assert [r["source"] for r in records[:3]] == ["ipv4:10.0.0.0", "ipv4:10.0.0.1", "ipv4:10.0.0.2"]
    assert {r["source"] for r in records} == {"ipv4:10.0.0.0", "ipv4:10.0.0.1", "ipv4:10.0.0.2", "other"}
    assert len(records) == 5  # 4 at once, then other's remaining 96 at shutdown
    assert sum(r["unauthenticated_rejections"] for r in records) == 100


def test_a_record_names_at_most_a_few_reasons() -> None:
    counter = RejectionCounter(interval=10)
    [first] = counter.add("ipv4:10.0.0.1", "reason 0", 1.0)
    for i in range(1, 20):
        assert counter.add("ipv4:10.0.0.1", f"reason {i}", 1.0) == []
    [second] = counter.drain()
    assert first["reasons"] == {"reason 0": 1} and second["unauthenticated_rejections"] == 19
    assert len(second["reasons"]) == 9 and second["reasons"]["other"] == 11


def test_due_writes_a_quiet_source_s_count_once_its_interval_ends() -> None:
    counter = RejectionCounter(interval=10)
    assert len(counter.add("ipv4:10.0.0.1", "missing", 0)) == 1
    assert counter.add("ipv4:10.0.0.1", "missing", 1) == []
    assert counter.due(5) == []
    [late] = counter.due(10)
    assert late["unauthenticated_rejections"] == 1 and late["first"] == late["last"] == 1
    assert counter.due(30) == [] and counter.drain() == []


# -- start: a torn log, a crash before the record was written, a log behind the ledger ----------------

def test_a_restart_cuts_a_torn_tail_and_restores_the_release_record_the_log_lacks(start_site, token, tmp_path,
                                                                                 caplog):
    state = tmp_path / "state"
    site = start_site(state_dir=state)
    with client(site, token) as c:
        c.query(COUNT.format(40), epsilon=0.5, query_id="q1")
        c.query(COUNT.format(50), epsilon=0.5, query_id="q2")
    site.stop()
    log_file = state / "audit.jsonl"
    lines = log_file.read_text().splitlines(keepends=True)
    # as after a crash between the ledger's commit of q2 and the write of its record, mid-write
    log_file.write_text(lines[0] + lines[1][:70])
    with caplog.at_level(logging.WARNING, logger="gateway.audit"):
        site = start_site(state_dir=state)
    messages = [r.getMessage() for r in caplog.records]
    assert any(str(log_file) in m and "cut a torn last line (70 bytes)" in m for m in messages)
    assert any(str(log_file) in m and "restored 1 release record(s)" in m for m in messages)
    with client(site, token) as c:
        again = c.query(COUNT.format(50), epsilon=0.5, query_id="q2")
        assert again.cached and spent(c) == 1.0
    site.stop()
    records = audit.tail(log_file)
    assert [(r.get("query_id"), r["outcome"] if "outcome" in r else r["event"]) for r in records] == [
        ("q1", "ok"), ("q2", "ok"), (None, "audit_repaired"), ("q2", "cached")]
    assert records[1] == json.loads(lines[1])  # the very record that was anchored
    assert records[2]["bytes_cut"] == 70 and records[2]["records_restored"] == 1
    assert seqs(state) == [1, 2, 3, 4] and verified(state).anchors == 2


def test_a_log_that_lost_records_the_ledger_anchors_refuses_to_start_in_one_line(start_site, token, tmp_path):
    state = tmp_path / "state"
    site = start_site(state_dir=state)
    with client(site, token) as c:
        c.query(COUNT.format(40), epsilon=0.5)
        with pytest.raises(GatewayError):
            c.query("SELECT count(*) FROM nope")
        c.query(COUNT.format(50), epsilon=0.5)
    site.stop()
    log_file = state / "audit.jsonl"
    log_file.write_text(log_file.read_text().splitlines(keepends=True)[0])  # records 2 and 3 are gone
    with pytest.raises(AuditLogError) as refused:
        start_site(state_dir=state)
    message = str(refused.value)
    assert message.startswith(f"the audit log {log_file} ends at record 1, but the ledger anchors release records")
    assert "truncated or replaced" in message and "\n" not in message
    start_site(state_dir=tmp_path / "other")  # the refused start released the state dir's lock


def test_an_unreadable_audit_line_refuses_to_start_in_one_line(start_site, token, tmp_path):
    state = tmp_path / "state"
    site = start_site(state_dir=state)
    with client(site, token) as c:
        c.query(COUNT.format(40), epsilon=0.5)
        c.query(COUNT.format(50), epsilon=0.5)
    site.stop()
    log_file = state / "audit.jsonl"
    lines = log_file.read_text().splitlines(keepends=True)
    log_file.write_text(lines[0] + "\x00garbage\n" + lines[1])
    with pytest.raises(AuditLogError) as refused:
        start_site(state_dir=state)
    assert str(refused.value).startswith(f"the audit log {log_file} cannot be read: line 2 is not an audit record")
    assert "\n" not in str(refused.value)


# -- gateway audit verify | tail, given the state dir ------------------------------------------------

def test_audit_verify_of_a_state_dir_detects_a_cut_end_and_a_recomputed_chain(start_site, token, tmp_path):
    state = tmp_path / "state"
    site = start_site(state_dir=state)
    with client(site, token) as c:
        for i in range(3):
            c.query(COUNT.format(40 + i), epsilon=0.5)
            with pytest.raises(GatewayError):
                c.query("SELECT count(*) FROM nope")
    site.stop()
    log_file = state / "audit.jsonl"
    ok = run_cli("audit", "verify", str(state))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == (f"{log_file}: ok, 6 records, chain intact; 3 release record(s) match their "
                                 f"anchors in {state / 'ledger.sqlite'}")
    assert len(run_cli("audit", "tail", str(state), "-n", "2").stdout.splitlines()) == 2
    original = log_file.read_text()

    log_file.write_text("".join(original.splitlines(keepends=True)[:4]))  # the last release cut off
    cut = run_cli("audit", "verify", str(log_file))  # the ledger beside it is found
    assert cut.returncode == 1
    assert "TAMPERED: the log ends at record 4, but the ledger anchors record 5" in cut.stderr
    alone = run_cli("audit", "verify", str(log_file), "--ledger", str(tmp_path / "missing.sqlite"))
    assert alone.returncode == 2 and "no ledger at" in alone.stderr

    records = [json.loads(line) for line in original.splitlines()]
    del records[1]  # remove the first refusal, then recompute the chain after it
    prev = audit.GENESIS
    for seq, record in enumerate(records, start=1):
        record.pop("hash")
        record.update(seq=seq, prev=prev)
        record["hash"] = prev = _digest(prev, record)
    log_file.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    assert audit.verify(log_file).ok  # a consistent chain on its own
    forged = run_cli("audit", "verify", str(state))
    assert forged.returncode == 1
    assert "TAMPERED: line 3: record 3 is not the one the ledger anchored with charge 2 (the chain was " \
           "rewritten)" in forged.stderr


# -- a real full disk: a file size limit on a real site process ----------------------------------------

def _serve(tmp_path: Path, policy: Path, public_key: Path, state: Path) -> tuple[subprocess.Popen[str], str]:
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    stderr = (tmp_path / f"stderr-{time.monotonic_ns()}").open("w")  # a file: a pipe nobody reads would fill
    proc = subprocess.Popen([*GATEWAY, "site", "serve", "--policy", str(policy), "--port", "0", "--state-dir",
                             str(state), "--trusted-key", str(public_key), "--port-file", str(port_file)],
                            stdout=subprocess.DEVNULL, stderr=stderr, text=True)
    return proc, wait_for_port_file(proc, port_file)


def _limit_file_size(proc: subprocess.Popen[str], limit: int | None) -> None:
    """RLIMIT_FSIZE of the site process: a write past ``limit`` bytes of any file fails (EFBIG), as on a full disk."""
    resource.prlimit(proc.pid, resource.RLIMIT_FSIZE,
                     (resource.RLIM_INFINITY if limit is None else limit, resource.RLIM_INFINITY))


@pytest.mark.slow
def test_a_full_disk_is_unavailable_never_internal_charges_nothing_and_the_log_stays_whole(tmp_path, keys, token,
                                                                                         site_data):
    state = tmp_path / "state"
    proc, target = _serve(tmp_path, write_policy(tmp_path, site_data), keys[1], state)
    try:
        with Client(target, token=token(), retries=0, sign_for=["north"]) as c:
            c.query(COUNT.format(40), epsilon=0.1, query_id="before")
            size = (state / "audit.jsonl").stat().st_size
            _limit_file_size(proc, size + 100)  # the ledger's WAL is already larger: it fails too
            for i in range(5):
                with pytest.raises(Unavailable):  # never INTERNAL
                    c.query(COUNT.format(50 + i), epsilon=0.1, query_id=f"full{i}")
            with pytest.raises(Unavailable):
                c.query("SELECT count(*) FROM nope")
            assert (state / "audit.jsonl").stat().st_size == size  # partial records were cut off again
            _limit_file_size(proc, None)
            assert spent(c) == pytest.approx(0.1)  # nothing was charged meanwhile
            for i in range(5):
                again = c.query(COUNT.format(50 + i), epsilon=0.1, query_id=f"full{i}")
                assert not again.cached and again.epsilon_charged == pytest.approx(0.1)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    assert seqs(state) == list(range(1, 7)) and verified(state).anchors == 6


@pytest.mark.slow
def test_a_release_charged_when_only_the_log_is_full_survives_kill_9_and_is_served_free(tmp_path, keys, token,
                                                                                       site_data):
    state = tmp_path / "state"
    policy = write_policy(tmp_path, site_data)
    proc, target = _serve(tmp_path, policy, keys[1], state)
    try:
        with Client(target, token=token(), retries=0, sign_for=["north"]) as c:
            c.query(COUNT.format(40), epsilon=0.1, query_id="before")
            # grow the log past every other file in the state dir, so that a limit just above the log's
            # size leaves the ledger room and refuses only the log
            def refused(_: int) -> None:
                with pytest.raises(GatewayError):  # each refusal's record names the long dataset: ~700 B
                    c.query(f"SELECT count(*) FROM nope{'x' * 300}")

            with ThreadPoolExecutor(8) as pool:
                while (state / "audit.jsonl").stat().st_size < max(
                        p.stat().st_size for p in state.iterdir() if p.name != "audit.jsonl") + 65536:
                    list(pool.map(refused, range(100)))
            records = len(seqs(state))
            _limit_file_size(proc, (state / "audit.jsonl").stat().st_size + 100)
            with pytest.raises(Unavailable) as refused:
                c.query(COUNT.format(50), epsilon=0.1, query_id="kept")
            assert "charged and kept" in str(refused.value)
            assert spent(c) == pytest.approx(0.2)
            with pytest.raises(Unavailable) as next_one:
                c.query(COUNT.format(60), epsilon=0.1, query_id="refused")
            assert "charged nothing" in str(next_one.value)
            assert spent(c) == pytest.approx(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)  # dies with the kept record unwritten
        proc.wait(timeout=30)
    assert len(seqs(state)) == records
    proc, target = _serve(tmp_path, policy, keys[1], state)  # no limit now
    try:
        with Client(target, token=token(), retries=0, sign_for=["north"]) as c:
            again = c.query(COUNT.format(50), epsilon=0.1, query_id="kept")
            assert again.cached and again.epsilon_charged == 0 and spent(c) == pytest.approx(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    tail = audit.tail(state / "audit.jsonl", 3)
    assert [(r.get("query_id"), r.get("outcome", r["event"])) for r in tail] == [
        ("kept", "ok"), (None, "audit_repaired"), ("kept", "cached")]
    assert tail[1]["records_restored"] == 1
    assert seqs(state) == list(range(1, records + 4)) and verified(state).anchors == 2
    assert os.path.getsize(state / "audit.jsonl") > 0
