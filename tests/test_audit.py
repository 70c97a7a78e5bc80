"""Unit tests for gateway.audit: the hash-chained log, its durability, repair at start, verification and tail."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import GENESIS, Anchor, AuditLog, AuditLogError, tail, verify
from gateway.errors import AuditUnavailable, InternalBug
from tests.helpers.faults import full_disk


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    return tmp_path / "audit.log"


@pytest.fixture
def five(log_path: Path) -> Iterator[Path]:
    """A log of five records with fields event='query', i=0..4."""
    log = AuditLog(log_path)
    for i in range(5):
        log.append(event="query", i=i, project="onc-x", outcome="ok")
    log.close()
    yield log_path


def lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


def rewrite(path: Path, new_lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in new_lines), encoding="utf-8")


def test_append_and_verify(five: Path) -> None:
    result = verify(five)
    assert (result.ok, result.records, result.problem) == (True, 5, None)
    records = [json.loads(line) for line in lines(five)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["i"] for r in records] == [0, 1, 2, 3, 4]
    assert records[0]["prev"] == GENESIS
    assert [r["prev"] for r in records[1:]] == [r["hash"] for r in records[:-1]]
    assert len({r["hash"] for r in records}) == 5
    assert all(r["event"] == "query" and r["project"] == "onc-x" and isinstance(r["time"], float) for r in records)


def test_empty_and_missing_logs(tmp_path: Path) -> None:
    empty = tmp_path / "empty.log"
    AuditLog(empty).close()
    assert empty.read_text() == ""
    assert (verify(empty).ok, verify(empty).records) == (True, 0)
    missing = tmp_path / "missing.log"
    result = verify(missing)
    assert (result.ok, result.records) == (False, 0)
    assert result.problem == f"cannot read {missing}: No such file or directory"
    assert tail(missing) == []


def test_unicode_and_nested_fields_survive(log_path: Path) -> None:
    log = AuditLog(log_path)
    log.append(event="query", reason="ünïcödé ✓ 🚀 \x00 'quote' \"dq\"\n", nested={"a": [1, 2.5, None, True]})
    log.close()
    assert verify(log_path).ok
    [record] = tail(log_path)
    assert record["reason"] == "ünïcödé ✓ 🚀 \x00 'quote' \"dq\"\n"
    assert record["nested"] == {"a": [1, 2.5, None, True]}


def test_modified_field_is_detected(five: Path) -> None:
    text = lines(five)
    record = json.loads(text[2])
    record["outcome"] = "denied"
    text[2] = json.dumps(record, sort_keys=True)
    rewrite(five, text)
    result = verify(five)
    assert (result.ok, result.records) == (False, 2)
    assert result.problem == "line 3: record was modified (hash mismatch)"


def test_modified_hash_is_detected(five: Path) -> None:
    text = lines(five)
    record = json.loads(text[4])
    record["hash"] = "f" * 64
    text[4] = json.dumps(record, sort_keys=True)
    rewrite(five, text)
    assert verify(five).problem == "line 5: record was modified (hash mismatch)"
    assert verify(five).records == 4


def test_added_field_is_detected(five: Path) -> None:
    text = lines(five)
    record = json.loads(text[0])
    record["note"] = "harmless?"
    text[0] = json.dumps(record, sort_keys=True)
    rewrite(five, text)
    assert verify(five).problem == "line 1: record was modified (hash mismatch)"


def test_deleted_line_is_detected(five: Path) -> None:
    text = lines(five)
    del text[2]
    rewrite(five, text)
    result = verify(five)
    assert (result.ok, result.records) == (False, 2)
    assert result.problem == "line 3: chain broken (record removed, reordered or inserted)"


def test_deleted_first_line_is_detected(five: Path) -> None:
    rewrite(five, lines(five)[1:])
    assert verify(five).problem == "line 1: chain broken (record removed, reordered or inserted)"
    assert verify(five).records == 0


def test_swapped_lines_are_detected(five: Path) -> None:
    text = lines(five)
    text[1], text[3] = text[3], text[1]
    rewrite(five, text)
    result = verify(five)
    assert (result.ok, result.records) == (False, 1)
    assert result.problem == "line 2: chain broken (record removed, reordered or inserted)"


def test_inserted_copy_is_detected(five: Path) -> None:
    text = lines(five)
    text.insert(3, text[2])
    rewrite(five, text)
    assert verify(five).problem == "line 4: chain broken (record removed, reordered or inserted)"
    assert verify(five).records == 3


def test_inserted_forged_line_is_detected_at_the_next_record(five: Path) -> None:
    """A forger who recomputes the forged record's own hash still breaks the link to the record after it."""
    from gateway.audit import _digest

    text = lines(five)
    before = json.loads(text[1])
    forged: dict[str, Any] = {"event": "query", "i": 99, "project": "onc-x", "outcome": "ok",
                              "seq": before["seq"] + 1, "prev": before["hash"], "time": before["time"]}
    forged["hash"] = _digest(before["hash"], forged)
    text.insert(2, json.dumps(forged, sort_keys=True))
    rewrite(five, text)
    result = verify(five)
    assert (result.ok, result.records) == (False, 3)
    assert result.problem == "line 4: chain broken (record removed, reordered or inserted)"


def test_truncated_last_line_is_detected(five: Path) -> None:
    five.write_text(five.read_text(encoding="utf-8")[:-20], encoding="utf-8")
    result = verify(five)
    assert (result.ok, result.records) == (False, 4)
    assert result.problem == "line 5: not an audit record"


@pytest.mark.parametrize("junk", ["not json", "{", "42", "null", '"text"', '{"seq": 3}'])
def test_junk_line_is_not_an_audit_record(five: Path, junk: str) -> None:
    text = lines(five)
    text.insert(2, junk)
    rewrite(five, text)
    assert verify(five).problem == "line 3: not an audit record"
    assert verify(five).records == 2


# regression: verify used to crash with TypeError from list.pop('hash') on a JSON array line
@pytest.mark.parametrize("junk", ["[]", "[1, 2, 3]", '["hash"]'])
def test_json_array_line_is_not_an_audit_record(five: Path, junk: str) -> None:
    text = lines(five)
    text.insert(2, junk)
    rewrite(five, text)
    assert verify(five).problem == "line 3: not an audit record"


def test_blank_lines_are_ignored(five: Path) -> None:
    text = lines(five)
    text.insert(2, "")
    text.append("   ")
    rewrite(five, text)
    assert (verify(five).ok, verify(five).records) == (True, 5)


def test_reopening_continues_the_chain(log_path: Path) -> None:
    first = AuditLog(log_path)
    for i in range(3):
        first.append(event="query", i=i)
    first.close()
    second = AuditLog(log_path)
    for i in range(3, 5):
        second.append(event="query", i=i)
    second.close()
    third = AuditLog(log_path)
    third.close()
    assert (verify(log_path).ok, verify(log_path).records) == (True, 5)
    records = [json.loads(line) for line in lines(log_path)]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[3]["prev"] == records[2]["hash"]


def test_tail(five: Path) -> None:
    assert [r["i"] for r in tail(five, 2)] == [3, 4]
    assert [r["i"] for r in tail(five, 1)] == [4]
    assert [r["i"] for r in tail(five, 5)] == [0, 1, 2, 3, 4]
    assert [r["i"] for r in tail(five, 100)] == [0, 1, 2, 3, 4]
    assert [r["i"] for r in tail(five)] == [0, 1, 2, 3, 4]
    assert tail(five, 1)[0]["hash"] == json.loads(lines(five)[-1])["hash"]


def test_tail_zero_returns_nothing(five: Path) -> None:
    # regression: tail sliced with [-n:], and [-0:] is the whole list
    assert tail(five, 0) == []


def test_concurrent_appends_keep_a_valid_chain(log_path: Path) -> None:
    log = AuditLog(log_path)
    threads_n, per_thread = 8, 50
    barrier = threading.Barrier(threads_n)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(per_thread):
                log.append(event="query", worker=worker, i=i)
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    assert errors == []
    result = verify(log_path)
    assert (result.ok, result.records, result.problem) == (True, threads_n * per_thread, None)
    records = [json.loads(line) for line in lines(log_path)]
    assert [r["seq"] for r in records] == list(range(1, threads_n * per_thread + 1))
    for w in range(threads_n):
        assert [r["i"] for r in records if r["worker"] == w] == list(range(per_thread))


# -- durability: whole records, fsynced, grouped -------------------------------------------------

def seqs(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in lines(path)]


def test_appenders_that_arrive_together_share_one_fsync(log_path: Path) -> None:
    log = AuditLog(log_path)
    threads_n, per_thread = 16, 25
    barrier = threading.Barrier(threads_n)

    def work() -> None:
        barrier.wait()
        for i in range(per_thread):
            log.append(event="query", i=i)  # returns once durable

    threads = [threading.Thread(target=work) for _ in range(threads_n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    log.close()
    records = threads_n * per_thread
    assert verify(log_path).records == records
    assert log.syncs < records / 2  # one fsync each would be `records`


def test_records_queued_without_waiting_are_written_in_few_fsyncs(log_path: Path) -> None:
    log = AuditLog(log_path)
    for i in range(200):
        log.append(event="unauthenticated", i=i, wait=False)
    log.append(event="query")
    assert len(lines(log_path)) == 201  # durable on return: everything queued before it too
    assert log.syncs < 50
    log.close()


def test_a_record_that_cannot_be_written_is_refused_dropped_and_its_seq_given_to_the_next(log_path: Path) -> None:
    log = AuditLog(log_path)
    log.append(event="query", i=0)
    with full_disk(log):
        for i in (1, 2):
            with pytest.raises(AuditUnavailable) as refused:
                log.append(event="query", i=i, secret=f"dropped-{i}")
            assert refused.value.recorded is False and "disk is full or failing" in refused.value.message
        assert os.path.getsize(log_path) == len(lines(log_path)[0]) + 1  # nothing torn left behind
    log.append(event="query", i=3)
    log.close()
    assert seqs(log_path) == [1, 2]  # the dropped records' seqs were never in the file: given to the next
    assert "dropped" not in log_path.read_text()
    assert (verify(log_path).ok, verify(log_path).records) == (True, 2)


@pytest.mark.slow
def test_a_write_cut_short_by_the_file_size_limit_leaves_no_partial_record(tmp_path: Path) -> None:
    """A real partial write: RLIMIT_FSIZE lets 40 bytes of the record through, then EFBIG (in a child process)."""
    path = tmp_path / "audit.jsonl"
    script = textwrap.dedent(f"""
        import json, os, resource
        from pathlib import Path
        from gateway.audit import AuditLog
        from gateway.errors import AuditUnavailable
        log = AuditLog(Path({str(path)!r}))
        log.append(event="query", i=0)
        size = os.path.getsize({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (size + 40, resource.RLIM_INFINITY))
        try:
            log.append(event="query", i=1)
            refused = False
        except AuditUnavailable:
            refused = True
        after = os.path.getsize({str(path)!r})
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        log.append(event="query", i=2)
        log.close()
        print(json.dumps({{"refused": refused, "size": size, "after": after}}))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["refused"] and result["after"] == result["size"]  # the 40 bytes were cut off again
    assert "File too large" in done.stderr  # and logged
    assert [r["i"] for r in tail(path)] == [0, 2] and seqs(path) == [1, 2] and verify(path).ok


# -- releases: sealed by the ledger's transaction ----------------------------------------------------

def test_sealed_records_hold_back_other_records_until_their_transaction_ends(log_path: Path) -> None:
    log = AuditLog(log_path)
    seal = log.seal([{"event": "query", "charge_id": 1}, {"event": "query", "charge_id": 2}])
    assert [e.seq for e in seal.entries] == [1, 2]
    other = threading.Thread(target=lambda: log.append(event="query", i="after"))
    other.start()
    time.sleep(0.2)
    assert other.is_alive() and lines(log_path) == []  # neither sequenced behind the seal nor written
    seal.resolve(True)
    other.join(timeout=10)
    for entry in seal.entries:
        entry.wait()
    log.close()
    assert [r.get("charge_id", r.get("i")) for r in tail(log_path)] == [1, 2, "after"]
    assert [json.loads(e.text)["hash"] for e in seal.entries] == [r["hash"] for r in tail(log_path)[:2]]
    assert verify(log_path).ok


def test_a_seal_whose_transaction_failed_is_voided_and_its_seqs_given_to_the_next(log_path: Path) -> None:
    log = AuditLog(log_path)
    log.append(event="query", i=0)
    seal = log.seal([{"event": "query", "charge_id": 7}])
    seal.resolve(False)
    with pytest.raises(AuditUnavailable):
        seal.entries[0].wait()
    log.append(event="query", i=1)
    log.close()
    assert seqs(log_path) == [1, 2] and "charge_id" not in log_path.read_text() and verify(log_path).ok


def test_an_anchored_record_the_disk_refuses_is_kept_and_written_once_it_can_be(log_path: Path) -> None:
    log = AuditLog(log_path, retry_interval=0.05)
    log.append(event="query", i=0)
    with full_disk(log):
        seal = log.seal([{"event": "query", "charge_id": 1}])
        seal.resolve(True)  # the ledger committed the charge
        with pytest.raises(AuditUnavailable) as refused:
            seal.entries[0].wait()
        assert refused.value.recorded is True and "charged and kept" in refused.value.message
        with pytest.raises(AuditUnavailable):  # a record behind it is dropped, not queued
            log.append(event="query", i="dropped")
        with pytest.raises(AuditUnavailable) as before_charge:  # no new release is sealed (charged) meanwhile
            log.seal([{"event": "query", "charge_id": 2}])
        assert before_charge.value.recorded is False
        assert len(lines(log_path)) == 1
    deadline = time.monotonic() + 10
    while len(lines(log_path)) < 2:  # retried on its own once the disk allows
        assert time.monotonic() < deadline
        time.sleep(0.02)
    log.append(event="query", i=2)
    log.close()
    assert [r.get("charge_id", r.get("i")) for r in tail(log_path)] == [0, 1, 2]
    assert seqs(log_path) == [1, 2, 3] and verify(log_path).ok
    assert json.loads(lines(log_path)[1]) == json.loads(seal.entries[0].text)  # exactly what the ledger anchored


def test_records_may_not_set_the_chain_fields(log_path: Path) -> None:
    log = AuditLog(log_path)
    for key in ("seq", "prev", "hash", "time"):
        with pytest.raises(InternalBug):
            log.append(event="query", **{key: 1})
    log.append(event="query")
    log.close()
    assert verify(log_path).ok


# -- start: a torn tail, restored records, unreadable lines ------------------------------------------

@pytest.mark.parametrize("torn", [b'{"event": "query", "seq": 6, "pr', b"\x00" * 300, b'{"seq": 6}\n', b"garbage\n\n"])
def test_a_torn_last_line_is_cut_at_start_with_a_warning_and_a_record(five: Path, torn: bytes, caplog) -> None:
    with five.open("ab") as f:
        f.write(torn)
    with caplog.at_level(logging.WARNING, logger="gateway.audit"):
        log = AuditLog(five)
    assert any(str(five) in r.getMessage() and "torn" in r.getMessage() for r in caplog.records)
    log.append(event="query", i=5)
    log.close()
    records = tail(five, 2)
    assert records[0]["event"] == "audit_repaired" and records[0]["bytes_cut"] == len(torn)
    assert records[0]["records_restored"] == 0 and records[0]["seq"] == 6
    assert records[1]["i"] == 5 and verify(five).ok and verify(five).records == 7


def test_a_last_record_without_its_newline_is_kept(five: Path) -> None:
    five.write_bytes(five.read_bytes()[:-1])
    log = AuditLog(five)
    log.append(event="query", i=5)
    log.close()
    assert [r["i"] for r in tail(five)] == [0, 1, 2, 3, 4, 5] and verify(five).ok


@pytest.mark.parametrize("junk", ["not json", "[1]", '{"seq": 3}', "\x00\x00"])
def test_an_unreadable_line_before_the_end_refuses_to_open_in_one_line_naming_the_file(five: Path, junk: str) -> None:
    text = lines(five)
    text.insert(2, junk)
    rewrite(five, text)
    before = five.read_bytes()
    with pytest.raises(AuditLogError) as refused:
        AuditLog(five)
    assert str(refused.value).startswith(f"the audit log {five} cannot be read: line 3 is not an audit record")
    assert "\n" not in str(refused.value)
    assert five.read_bytes() == before  # left as it was, for the operator


def test_anchored_records_the_file_lacks_are_restored_at_open(five: Path, caplog) -> None:
    log = AuditLog(five)
    seal = log.seal([{"event": "query", "charge_id": 1}, {"event": "query", "charge_id": 2}])
    anchored = [e.text for e in seal.entries]
    seal.resolve(True)
    log.close()
    text = five.read_bytes()
    five.write_bytes(text[:text.index(anchored[0].encode()) + 50])  # the process died writing the first one
    with caplog.at_level(logging.WARNING, logger="gateway.audit"):
        reopened = AuditLog(five, anchored=lambda after: [t for t in anchored if json.loads(t)["seq"] > after])
    reopened.close()
    assert any("restored 2 release record(s)" in r.getMessage() for r in caplog.records)
    records = tail(five, 3)
    assert [r.get("charge_id") for r in records[:2]] == [1, 2]
    assert records[2]["event"] == "audit_repaired" and records[2]["records_restored"] == 2
    assert records[2]["bytes_cut"] == 50
    assert verify(five).ok and verify(five).records == 8


def test_anchored_records_that_do_not_continue_the_chain_refuse_to_open(five: Path) -> None:
    log = AuditLog(five)
    seal = log.seal([{"event": "query", "charge_id": 1}])
    seal.resolve(True)
    log.append(event="query", i="plain")
    log.close()
    anchored = [seal.entries[0].text]
    rewrite(five, lines(five)[:4])  # records 5 (plain) onward are gone: record 6 cannot follow record 4
    before = five.read_bytes()
    with pytest.raises(AuditLogError, match=r"ends at record 4, but the ledger anchors release records after it "
                                            r"that do not continue its chain \(first: 6\)"):
        AuditLog(five, anchored=lambda after: anchored)
    assert five.read_bytes() == before


# -- verification against the ledger's anchors -------------------------------------------------------

def anchored_log(path: Path) -> list[Anchor]:
    """A log of 6 records whose 2nd and 5th are anchored releases; their anchors."""
    log = AuditLog(path)
    found = []
    for i in range(6):
        if i in (1, 4):
            seal = log.seal([{"event": "query", "charge_id": i}])
            seal.resolve(True)
            seal.entries[0].wait()
            found.append(Anchor(seal.entries[0].seq, seal.entries[0].hash, i))
        else:
            log.append(event="query", i=i)
    log.close()
    return found


def test_verify_matches_every_anchor(log_path: Path) -> None:
    found = anchored_log(log_path)
    result = verify(log_path, found)
    assert (result.ok, result.records, result.anchors) == (True, 6, 2)


def test_verify_with_anchors_detects_records_cut_off_the_end(log_path: Path) -> None:
    found = anchored_log(log_path)
    rewrite(log_path, lines(log_path)[:3])
    assert verify(log_path).ok  # the chain alone cannot tell
    result = verify(log_path, found)
    assert (result.ok, result.anchors) == (False, 1)
    assert result.problem == "the log ends at record 3, but the ledger anchors record 5 (charge 4): records were " \
                             "cut off its end"


def test_verify_with_anchors_detects_a_recomputed_chain(log_path: Path) -> None:
    """Remove record 3 and recompute every seq and hash after it: a valid chain, but not the one anchored."""
    from gateway.audit import _digest

    found = anchored_log(log_path)
    records = [json.loads(line) for line in lines(log_path)]
    del records[2]
    prev = GENESIS
    for seq, record in enumerate(records, start=1):
        record.pop("hash")
        record.update(seq=seq, prev=prev)
        record["hash"] = prev = _digest(prev, record)
    rewrite(log_path, [json.dumps(r, sort_keys=True) for r in records])
    assert verify(log_path).ok
    result = verify(log_path, found)
    assert (result.ok, result.anchors, result.records) == (False, 1, 4)
    assert result.problem == "line 5: record 5 is not the one the ledger anchored with charge 4 (the chain was " \
                             "rewritten)"
