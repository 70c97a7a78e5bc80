"""Unit tests for gateway.audit: the hash-chained audit log, its verification and tail."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.audit import GENESIS, AuditLog, tail, verify


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
