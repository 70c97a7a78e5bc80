"""Contract tests for gateway.ledger (SqliteLedger): exact arithmetic, atomicity, durability, concurrency."""

from __future__ import annotations

import json
import logging
import multiprocessing
import shutil
import sqlite3
import tempfile
import threading
from fractions import Fraction
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from gateway.audit import Anchor, AuditLog, tail, verify
from gateway.errors import BudgetExhausted, FailedPrecondition, InternalBug, Unavailable
from gateway.ledger import VERSION, BudgetState, QueryIdInUse, Scope, SqliteLedger, Window, anchored_records, anchors

CAP_LABEL = "all projects (dataset-wide cap)"


def window(period: int, length: int = 1) -> Window:
    """Window number ``period`` of ``length`` seconds, asked about at its start."""
    return Window(period * length, (period + 1) * length, period * length)


def project_scope(project: str = "p1", limit: Fraction | str | int = 1, period: int = 0,
                  dataset: str = "ds") -> Scope:
    return Scope(f"project:{project}:{dataset}", dataset, Fraction(limit), window(period))


def cap_scope(limit: Fraction | str | int = 1, dataset: str = "ds") -> Scope:
    """A cap that never resets."""
    return Scope(f"population:{dataset}", dataset, Fraction(limit), Window(0, None, 0), CAP_LABEL)


@pytest.fixture
def ledger(tmp_path: Path):
    led = SqliteLedger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


# -- exact arithmetic ---------------------------------------------------------------------------


def test_ten_tenths_fill_one_exactly_and_eleventh_is_refused(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    for i in range(10):
        ledger.charge("p1", f"q{i}", f"h{i}", Fraction("0.1"), [scope], b"a")
    assert ledger.state(scope) == BudgetState(Fraction(1), Fraction(1), "1970-01-01T00:00:01Z")
    assert ledger.state(scope).remaining == 0
    tiny = Fraction("1e-9")
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "q10", "h10", tiny, [scope], b"a")
    err = info.value
    assert type(err) is BudgetExhausted
    assert err.requested == Fraction(1, 10**9)
    assert err.remaining == 0
    assert err.dataset == "ds"
    assert err.resets_at == "1970-01-01T00:00:01Z"
    assert "requested epsilon 1e-09" in err.message
    assert "remaining 0" in err.message
    assert "short by 1e-09" in err.message
    assert "1970-01-01T00:00:01Z" in err.message
    # the refused charge left nothing behind
    assert ledger.find("p1", "q10") is None
    assert ledger.state(scope).spent == 1
    assert ledger.total_spent() == 1


def test_point_one_plus_point_two_fills_point_three_exactly(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=Fraction("0.3"))
    ledger.charge("p1", "a", "ha", Fraction("0.1"), [scope], b"a")
    ledger.charge("p1", "b", "hb", Fraction("0.2"), [scope], b"a")
    state = ledger.state(scope)
    assert state.spent == Fraction(3, 10)
    assert state.remaining == 0
    with pytest.raises(BudgetExhausted):
        ledger.charge("p1", "c", "hc", Fraction(1, 10**12), [scope], b"a")


def test_exhausted_message_reports_partial_remaining(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    ledger.charge("p1", "a", "h", Fraction("0.75"), [scope], b"a")
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction("0.5"), [scope], b"a")
    assert info.value.requested == Fraction(1, 2)
    assert info.value.remaining == Fraction(1, 4)
    assert "requested epsilon 0.5, remaining 0.25 (short by 0.25)" in info.value.message


@pytest.mark.parametrize("epsilon", [Fraction(0), Fraction(-1, 10)])
def test_non_positive_charge_is_an_internal_bug(ledger: SqliteLedger, epsilon: Fraction) -> None:
    scope = project_scope()
    with pytest.raises(InternalBug):
        ledger.charge("p1", "q", "h", epsilon, [scope], b"a")
    assert ledger.find("p1", "q") is None
    assert ledger.state(scope).spent == 0


# -- answers stored with their charge, find ----------------------------------------------------------------------


def test_charge_stores_answer_and_find_reports_it(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    cid = ledger.charge("p1", "q", "canon", Fraction(1, 4), [scope], b"\x00answer-bytes\xff")
    record = ledger.find("p1", "q")
    assert record is not None
    assert record.charge_id == cid
    assert record.project == "p1"
    assert record.query_id == "q"
    assert record.canonical_hash == "canon"
    assert record.epsilon == Fraction(1, 4)
    assert record.answer == b"\x00answer-bytes\xff"
    assert ledger.find_answer("p1", "canon") == b"\x00answer-bytes\xff"
    assert ledger.find_answer("p2", "canon") is None  # answers are per project
    assert ledger.find_answer("p1", "other") is None
    assert ledger.find("p1", "nope") is None
    assert ledger.find("p2", "q") is None
    assert ledger.state(scope).spent == Fraction(1, 4)
    assert ledger.total_spent() == Fraction(1, 4)


def test_precheck_is_read_only_and_refuses_like_charge(ledger: SqliteLedger) -> None:
    scope, cap = project_scope(limit=1), cap_scope(limit="0.5")
    ledger.precheck(Fraction(1, 2), [scope, cap])
    assert ledger.state(scope).spent == 0 and ledger.total_spent() == 0
    ledger.charge("p1", "a", "h", Fraction(2, 5), [scope, cap], b"a")
    with pytest.raises(BudgetExhausted) as pre:
        ledger.precheck(Fraction(1, 5), [scope, cap])
    with pytest.raises(BudgetExhausted) as charged:
        ledger.charge("p1", "b", "h", Fraction(1, 5), [scope, cap], b"b")
    assert pre.value.message == charged.value.message  # one affordability test behind both
    assert (pre.value.remaining, pre.value.scope) == (Fraction(1, 10), CAP_LABEL)


def test_find_answer_returns_first_released(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    ledger.charge("p1", "q1", "canon", Fraction(1, 10), [scope], b"first")
    ledger.charge("p1", "q2", "canon", Fraction(1, 10), [scope], b"second")
    assert ledger.find_answer("p1", "canon") == b"first"


def test_lookup_answers_find_then_find_answer_in_one_read(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    assert ledger.lookup("p1", "q1", "canon") == (None, None)
    ledger.charge("p1", "q1", "canon", Fraction(1, 10), [scope], b"first")
    ledger.charge("p1", "q2", "canon", Fraction(1, 10), [scope], b"second")
    for query_id in ("q1", "q2"):  # a retry gets its own charge, never the other's answer
        record, answer = ledger.lookup("p1", query_id, "canon")
        assert record == ledger.find("p1", query_id) and answer is None
    assert ledger.lookup("p1", "q2", "other")[0] == ledger.find("p1", "q2")  # a conflict is the caller's to see
    assert ledger.lookup("p1", "new", "canon") == (None, b"first")  # the same query again: the first answer
    assert ledger.lookup("p2", "q1", "canon") == (None, None)  # answers are per project
    assert ledger.lookup("p1", "new", "other") == (None, None)


def test_charge_with_states_reports_each_scope_as_the_charge_left_it(ledger: SqliteLedger) -> None:
    scope, cap = project_scope(limit=1), cap_scope(limit="0.5")
    ledger.charge("p1", "a", "h", Fraction(1, 10), [scope, cap], b"a")
    charge_id, states = ledger.charge_with_states("p1", "b", "h2", Fraction(1, 5), [scope, cap], b"b")
    assert ledger.find("p1", "b").charge_id == charge_id
    assert states == (ledger.state(scope), ledger.state(cap))
    assert [s.spent for s in states] == [Fraction(3, 10), Fraction(3, 10)]
    with pytest.raises(BudgetExhausted):  # refused like charge, and nothing changes
        ledger.charge_with_states("p1", "c", "h3", Fraction(1, 4), [scope, cap], b"c")
    assert ledger.state(cap).spent == Fraction(3, 10)


def test_same_project_query_id_twice_raises_query_id_in_use(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    ledger.charge("p1", "q", "h", Fraction(1, 10), [scope], b"a")
    with pytest.raises(QueryIdInUse):
        ledger.charge("p1", "q", "h", Fraction(1, 10), [scope], b"a")
    with pytest.raises(QueryIdInUse):  # also for another query
        ledger.charge("p1", "q", "other-hash", Fraction(1, 10), [scope], b"a")
    assert ledger.state(scope).spent == Fraction(1, 10)


def test_different_projects_may_reuse_query_id(ledger: SqliteLedger) -> None:
    s1, s2 = project_scope("p1"), project_scope("p2")
    c1 = ledger.charge("p1", "q", "h", Fraction(1, 10), [s1], b"a")
    c2 = ledger.charge("p2", "q", "h", Fraction(2, 10), [s2], b"a")
    assert c1 != c2
    r1, r2 = ledger.find("p1", "q"), ledger.find("p2", "q")
    assert r1 is not None and r2 is not None
    assert (r1.charge_id, r1.epsilon) == (c1, Fraction(1, 10))
    assert (r2.charge_id, r2.epsilon) == (c2, Fraction(1, 5))
    assert ledger.state(s1).spent == Fraction(1, 10)
    assert ledger.state(s2).spent == Fraction(1, 5)


def test_charge_fitting_project_but_not_cap_charges_neither(ledger: SqliteLedger) -> None:
    proj1, proj2, cap = project_scope("p1", limit=1), project_scope("p2", limit=1), cap_scope(limit=Fraction("0.5"))
    ledger.charge("p2", "a", "h", Fraction("0.4"), [proj2, cap], b"a")
    assert ledger.state(cap).spent == Fraction(2, 5)
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction("0.2"), [proj1, cap], b"a")
    assert info.value.requested == Fraction(1, 5)
    assert info.value.remaining == Fraction(1, 10)
    assert CAP_LABEL in info.value.message
    assert "this budget never resets" in info.value.message
    # atomic: neither the project scope nor the cap moved, no charge row exists
    assert ledger.state(proj1).spent == 0
    assert ledger.state(proj2).spent == Fraction(2, 5)
    assert ledger.state(cap).spent == Fraction(2, 5)
    assert ledger.find("p1", "b") is None
    assert ledger.total_spent() == Fraction(2, 5)
    # the query_id was not consumed: a smaller charge under it fits both
    ledger.charge("p1", "b", "h", Fraction("0.1"), [proj1, cap], b"a")
    assert ledger.state(proj1).spent == Fraction(1, 10)
    assert ledger.state(cap).spent == Fraction(1, 2)


def test_charge_fitting_cap_but_not_project_charges_neither(ledger: SqliteLedger) -> None:
    proj, cap = project_scope("p1", limit=Fraction("0.3")), cap_scope(limit=10)
    ledger.charge("p1", "a", "h", Fraction("0.3"), [proj, cap], b"a")
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction("0.1"), [proj, cap], b"a")
    assert "for project on dataset 'ds'" in info.value.message
    assert ledger.state(proj).spent == Fraction(3, 10)
    assert ledger.state(cap).spent == Fraction(3, 10)


def test_new_period_starts_from_zero(ledger: SqliteLedger) -> None:
    p0, p1 = project_scope(limit=1, period=0), project_scope(limit=1, period=1)
    ledger.charge("p1", "a", "h", Fraction(1), [p0], b"a")
    with pytest.raises(BudgetExhausted):
        ledger.charge("p1", "b", "h", Fraction(1, 100), [p0], b"a")
    assert ledger.state(p1) == BudgetState(Fraction(1), Fraction(0), "1970-01-01T00:00:02Z")
    ledger.charge("p1", "b", "h", Fraction(3, 4), [p1], b"a")
    assert ledger.state(p1).spent == Fraction(3, 4)
    # the earlier window's spend is kept as it was
    assert ledger._conn().execute("SELECT spent FROM spend WHERE scope = ? AND period = 0",
                                  (p0.key,)).fetchone() == ("1/1",)
    assert ledger.state(project_scope(limit=1, period=2)).spent == 0


def test_remaining_never_negative_when_limit_lowered(ledger: SqliteLedger) -> None:
    ledger.charge("p1", "a", "h", Fraction(1), [project_scope(limit=1)], b"a")
    lowered = project_scope(limit=Fraction(1, 2))
    assert ledger.state(lowered) == BudgetState(Fraction(1, 2), Fraction(1), "1970-01-01T00:00:01Z")
    assert ledger.state(lowered).remaining == 0
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction(1, 10), [lowered], b"a")
    assert info.value.remaining == 0


def test_duplicate_scope_cannot_overspend(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    with pytest.raises(InternalBug, match="same budget twice"):
        ledger.charge("p1", "q", "h", Fraction(6, 10), [scope, scope], b"a")
    assert ledger.state(scope).spent == 0


# -- durability ---------------------------------------------------------------------------------


def test_charges_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    scope, cap = project_scope(limit=1), cap_scope(limit=2)
    first = SqliteLedger(path)
    charged = first.charge("p1", "a", "ha", Fraction(1, 3), [scope, cap], b"answer-a")
    first.charge("p1", "c", "hc", Fraction(1, 6), [scope, cap], b"answer-c")
    first.close()

    second = SqliteLedger(path)
    try:
        assert second.state(scope).spent == Fraction(1, 2)
        assert second.state(cap).spent == Fraction(1, 2)
        assert second.total_spent() == Fraction(1, 2)
        rec_a = second.find("p1", "a")
        assert rec_a is not None and (rec_a.charge_id, rec_a.answer) == (charged, b"answer-a")
        assert second.find_answer("p1", "ha") == b"answer-a"
        with pytest.raises(BudgetExhausted):
            second.charge("p1", "d", "hd", Fraction(1, 2) + Fraction(1, 10**9), [scope, cap], b"d")
        second.charge("p1", "d", "hd", Fraction(1, 2), [scope, cap], b"d")
        assert second.state(scope).spent == 1
    finally:
        second.close()


def test_charges_reserved_by_an_older_version_stay_spent_and_free_their_query_id(tmp_path: Path) -> None:
    # a ledger written by 0.1.x, whose process died between charging and storing the answer
    path = tmp_path / "ledger.sqlite"
    SqliteLedger(path).close()
    raw = sqlite3.connect(path)
    raw.execute("INSERT INTO spend (scope, period, spent) VALUES ('project:p1:ds', 0, '1/4')")
    raw.execute("INSERT INTO charges (project, query_id, canonical_hash, epsilon, scopes, status, owner, answer,"
                " created) VALUES ('p1', 'q', 'h', '1/4', 'project:p1:ds@0', 'reserved', 'dead', NULL, 0)")
    raw.commit()
    raw.close()
    for _ in range(2):  # the migration runs at every open and is idempotent
        led = SqliteLedger(path)
        try:
            assert led.find("p1", "q") is None  # the query_id is free for a retry
            assert led.state(project_scope(limit=1)).spent == Fraction(1, 4)  # the spend stays
            assert led.total_spent() == Fraction(1, 4)
        finally:
            led.close()
    led = SqliteLedger(path)
    try:
        led.charge("p1", "q", "h", Fraction(1, 4), [project_scope(limit=1)], b"retried")
        assert led.state(project_scope(limit=1)).spent == Fraction(1, 2)
    finally:
        led.close()


def test_wal_and_full_sync_on_every_connection(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    led = SqliteLedger(path)
    try:
        con = led._conn()
        assert con.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert con.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
        other: list[tuple[object, object]] = []

        def in_thread() -> None:
            c = led._conn()
            other.append((c.execute("PRAGMA journal_mode").fetchone()[0],
                          c.execute("PRAGMA synchronous").fetchone()[0]))

        t = threading.Thread(target=in_thread)
        t.start()
        t.join()
        assert other == [("wal", 2)]
        assert len(led._all) == 2  # the thread got its own connection
    finally:
        led.close()
    raw = sqlite3.connect(path)  # WAL is a property of the file
    try:
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    finally:
        raw.close()


# -- property test against a pure-Python model --------------------------------------------------

LIMITS = {"project:a:ds": Fraction(1), "project:b:ds": Fraction(3, 4), "population:ds": Fraction(3, 2)}
LENGTH = {"project:a:ds": 1, "project:b:ds": 1, "population:ds": 2}  # the cap's windows are twice as long


class LedgerMachine(RuleBasedStateMachine):
    """Random charges over projects and a cap while time moves on; the ledger must match an exact
    Fraction model of the spend in each budget's current window after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ledger-prop-")
        self.ledger = SqliteLedger(Path(self.dir) / "ledger.sqlite")
        self.clock = 0
        self.charges: list[tuple[Fraction, list[tuple[str, int]]]] = []  # epsilon, [(key, window start)]
        self.count = 0

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def scope(self, key: str) -> Scope:
        length = LENGTH[key]
        start = self.clock // length * length
        return Scope(key, "ds", LIMITS[key], Window(start, start + length, self.clock))

    def model_spent(self, key: str) -> Fraction:
        start = self.scope(key).window.start
        return sum((eps for eps, scopes in self.charges if (key, start) in scopes), Fraction(0))

    @rule(ticks=st.integers(0, 2))
    def time_passes(self, ticks: int) -> None:
        self.clock += ticks

    @rule(project=st.sampled_from(["a", "b"]), with_cap=st.booleans(),
          epsilon=st.fractions(min_value=Fraction(1, 20), max_value=Fraction(1, 2), max_denominator=20))
    def charge(self, project: str, with_cap: bool, epsilon: Fraction) -> None:
        scopes = [self.scope(f"project:{project}:ds")] + ([self.scope("population:ds")] if with_cap else [])
        over = [s for s in scopes if self.model_spent(s.key) + epsilon > s.limit]
        self.count += 1
        query_id = f"q{self.count}"
        try:
            self.ledger.charge(project, query_id, f"h{self.count}", epsilon, scopes, b"answer")
        except BudgetExhausted as err:
            assert over, f"refused although every scope had room for {epsilon}"
            assert err.requested == epsilon
            assert err.remaining == max(Fraction(0), over[0].limit - self.model_spent(over[0].key))
            assert self.ledger.find(project, query_id) is None
            return
        assert not over, f"accepted {epsilon} although {over[0].key} had no room"
        self.charges.append((epsilon, [(s.key, s.window.start) for s in scopes]))
        assert self.ledger.find(project, query_id) is not None

    @invariant()
    def spent_matches_model(self) -> None:
        for key, limit in LIMITS.items():
            state = self.ledger.state(self.scope(key))
            expected = self.model_spent(key)
            assert state.spent == expected, (key, self.clock, state.spent, expected)
            assert 0 <= state.spent <= limit
            assert state.remaining == limit - expected
        assert self.ledger.total_spent() == sum((eps for eps, _ in self.charges), Fraction(0))


LedgerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=10, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestLedgerProperty = pytest.mark.slow(LedgerMachine.TestCase)


# -- concurrency --------------------------------------------------------------------------------


def test_64_threads_on_one_ledger_never_overspend(tmp_path: Path) -> None:
    led = SqliteLedger(tmp_path / "ledger.sqlite")
    scope = project_scope(limit=Fraction("1.0"))
    barrier = threading.Barrier(64)
    outcomes: list[str] = []
    lock = threading.Lock()

    def attempt(i: int) -> None:
        barrier.wait()
        try:
            led.charge("p1", f"t{i}", "h", Fraction("0.1"), [scope], b"a")
            result = "ok"
        except BudgetExhausted:
            result = "exhausted"
        except Exception as err:  # recorded and asserted on below
            result = f"error: {type(err).__name__}: {err}"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(64)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert sorted(set(outcomes)) == ["exhausted", "ok"], outcomes
        assert outcomes.count("ok") == 10
        assert outcomes.count("exhausted") == 54
        assert led.state(scope) == BudgetState(Fraction(1), Fraction(1), "1970-01-01T00:00:01Z")
        assert led.total_spent() == 1
    finally:
        led.close()


# The worker runs as ``exec(_WORKER, globals)`` in each spawned child, so the child imports only the
# ledger and not this module (which would pull in pytest and hypothesis: ~1 s per child).
_WORKER = """
from fractions import Fraction
from pathlib import Path

from gateway.errors import BudgetExhausted
from gateway.ledger import Scope, SqliteLedger, Window

led = SqliteLedger(Path(PATH))
scope = Scope("project:p1:ds", "ds", Fraction("1.0"), Window(0, 1, 0))
ok = exhausted = 0
errors = []
BARRIER.wait()
for j in range(ATTEMPTS):
    try:
        led.charge("p1", f"w{WORKER}-{j}", "h", Fraction("0.1"), [scope], b"a")
        ok += 1
    except BudgetExhausted:
        exhausted += 1
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
led.close()
RESULTS.put((WORKER, ok, exhausted, errors))
"""


@pytest.mark.slow
def test_8_processes_on_one_file_never_overspend(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    SqliteLedger(path).close()  # create the schema up front
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(8)
    results = ctx.Queue()
    procs = [ctx.Process(target=exec, args=(_WORKER, {"PATH": str(path), "WORKER": w, "ATTEMPTS": 8,
                                                      "BARRIER": barrier, "RESULTS": results}))
             for w in range(8)]
    for p in procs:
        p.start()
    got = [results.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted(w for w, *_ in got) == list(range(8))
    assert [e for *_, e in got if e] == []
    assert sum(ok for _, ok, _, _ in got) == 10
    assert sum(ex for _, _, ex, _ in got) == 54
    led = SqliteLedger(path)
    try:
        scope = project_scope(limit=Fraction("1.0"))
        assert led.state(scope) == BudgetState(Fraction(1), Fraction(1), "1970-01-01T00:00:01Z")
        assert led.total_spent() == 1
        rows = led._conn().execute("SELECT COUNT(*) FROM charges WHERE status = 'released'").fetchone()
        assert rows == (10,)
    finally:
        led.close()


# -- the audit anchor ------------------------------------------------------------------------------

def _audited(tmp_path: Path) -> tuple[SqliteLedger, AuditLog]:
    audit = AuditLog(tmp_path / "audit.jsonl", anchored=lambda seq: anchored_records(tmp_path / "ledger.sqlite", seq))
    return SqliteLedger(tmp_path / "ledger.sqlite", audit), audit


def test_a_charge_anchors_its_audit_record_in_its_transaction(tmp_path: Path) -> None:
    led, audit = _audited(tmp_path)
    try:
        audit.append(event="query", outcome="invalid")
        charge_id = led.charge("p1", "q1", "h1", Fraction(1, 4), [project_scope()], b"answer",
                               record={"event": "query", "outcome": "ok", "query_id": "q1"})
        records = tail(tmp_path / "audit.jsonl")  # durable on return, with the charge
        assert [r["outcome"] for r in records] == ["invalid", "ok"] and records[1]["charge_id"] == charge_id
        row = led._conn().execute("SELECT audit_seq, audit_hash, audit_record FROM charges WHERE id = ?",
                                  (charge_id,)).fetchone()
        assert row[:2] == (2, records[1]["hash"]) and json.loads(row[2]) == records[1]
        assert anchored_records(tmp_path / "ledger.sqlite", 1) == [row[2]]
        assert anchored_records(tmp_path / "ledger.sqlite", 2) == []
        assert list(anchors(tmp_path / "ledger.sqlite")) == [Anchor(2, records[1]["hash"], charge_id)]
    finally:
        led.close()
        audit.close()
    assert verify(tmp_path / "audit.jsonl", anchors(tmp_path / "ledger.sqlite")).anchors == 1


def test_a_refused_charge_seals_no_record(tmp_path: Path) -> None:
    led, audit = _audited(tmp_path)
    try:
        with pytest.raises(BudgetExhausted):
            led.charge("p1", "q1", "h1", Fraction(2), [project_scope(limit=1)], b"a", record={"event": "query"})
        led.charge("p1", "q2", "h2", Fraction(1, 2), [project_scope(limit=1)], b"a", record={"event": "query"})
        with pytest.raises(QueryIdInUse):
            led.charge("p1", "q2", "h2", Fraction(1, 2), [project_scope(limit=1)], b"a", record={"event": "query"})
    finally:
        led.close()
        audit.close()
    assert [r["charge_id"] for r in tail(tmp_path / "audit.jsonl")] == [1]


def test_charges_committed_together_are_anchored_in_one_unbroken_chain(tmp_path: Path) -> None:
    led, audit = _audited(tmp_path)
    scope = project_scope(limit=Fraction(100))
    barrier = threading.Barrier(32)
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            barrier.wait()
            for i in range(5):
                if i % 2:
                    audit.append(event="query", outcome="invalid", worker=worker)
                led.charge("p1", f"w{worker}-{i}", "h", Fraction(1, 10), [scope], b"a",
                           record={"event": "query", "outcome": "ok", "worker": worker, "i": i})
        except BaseException as err:  # pragma: no cover - reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(32)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    led.close()
    audit.close()
    assert errors == []
    result = verify(tmp_path / "audit.jsonl", anchors(tmp_path / "ledger.sqlite"))
    assert (result.ok, result.records, result.anchors) == (True, 32 * 7, 32 * 5)


_V2_SCHEMA = """
CREATE TABLE charges (id INTEGER PRIMARY KEY, project TEXT NOT NULL, query_id TEXT NOT NULL,
    canonical_hash TEXT NOT NULL, epsilon TEXT NOT NULL, scopes TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'released', 'refunded')), owner TEXT NOT NULL, answer BLOB,
    created REAL NOT NULL, UNIQUE (project, query_id));
CREATE INDEX charges_canonical ON charges (project, canonical_hash, status);
CREATE TABLE spend (scope TEXT NOT NULL, period INTEGER NOT NULL, spent TEXT NOT NULL, PRIMARY KEY (scope, period));
CREATE TABLE windows (scope TEXT PRIMARY KEY, start INTEGER NOT NULL, finish INTEGER);
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
INSERT INTO meta VALUES ('version', '2');
INSERT INTO spend VALUES ('project:p1:ds', 0, '1/4');
INSERT INTO windows VALUES ('project:p1:ds', 0, 1);
INSERT INTO charges (project, query_id, canonical_hash, epsilon, scopes, status, owner, answer, created)
    VALUES ('p1', 'old', 'h-old', '1/4', 'project:p1:ds@0', 'released', '', x'6f6c64', 0);
"""


def test_a_version_2_ledger_is_migrated_to_anchor_audit_records(tmp_path: Path, caplog) -> None:
    """A ledger as 0.2 wrote it: no anchor columns. Its charges stay, without anchors; new ones are anchored."""
    path = tmp_path / "ledger.sqlite"
    raw = sqlite3.connect(path)
    raw.executescript(_V2_SCHEMA)
    raw.close()
    assert anchored_records(path, 0) == [] and list(anchors(path)) == []  # readable before the migration
    with caplog.at_level(logging.WARNING, logger="gateway.ledger"):
        led, audit = _audited(tmp_path)
    try:
        assert led.version == VERSION == 3
        assert any("migrated to version 3" in r.getMessage() for r in caplog.records)
        old = led.find("p1", "old")
        assert old is not None and old.answer == b"old" and led.state(project_scope()).spent == Fraction(1, 4)
        led.charge("p1", "new", "h-new", Fraction(1, 4), [project_scope()], b"new", record={"event": "query"})
        assert [a.charge_id for a in anchors(path)] == [2]
    finally:
        led.close()
        audit.close()
    again = SqliteLedger(path)  # idempotent
    assert again.version == 3
    again.close()
    assert verify(tmp_path / "audit.jsonl", anchors(path)).anchors == 1


def test_a_ledger_written_by_a_newer_version_refuses_to_open(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    SqliteLedger(path).close()
    raw = sqlite3.connect(path)
    raw.execute("UPDATE meta SET value = '99' WHERE key = 'version'")
    raw.commit()
    raw.close()
    with pytest.raises(FailedPrecondition, match=r"ledger .* was written by a newer gateway \(ledger version 99; "
                                                  r"this one reads up to 3\)"):
        SqliteLedger(path)


def test_a_failing_disk_under_the_ledger_is_unavailable_never_a_bug() -> None:
    from gateway.ledger import _storage_error

    for err in (sqlite3.OperationalError("database or disk is full"), sqlite3.OperationalError("disk I/O error"),
                sqlite3.DatabaseError("database disk image is malformed"), OSError(28, "No space left on device")):
        mapped = _storage_error(err, Path("ledger.sqlite"))
        assert isinstance(mapped, Unavailable) and "nothing was charged" in mapped.message
    for err in (sqlite3.IntegrityError("UNIQUE constraint failed"), ValueError("x"), BudgetExhausted(
            "ds", Fraction(1), Fraction(0))):
        assert _storage_error(err, Path("ledger.sqlite")) is err
