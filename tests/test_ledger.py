"""Contract tests for gateway.ledger (SqliteLedger): exact arithmetic, atomicity, durability, concurrency."""

from __future__ import annotations

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

from gateway.errors import BudgetExhausted, InternalBug
from gateway.ledger import BudgetState, QueryIdInUse, Scope, SqliteLedger

CAP_LABEL = "all projects (dataset-wide cap)"


def project_scope(project: str = "p1", limit: Fraction | str | int = 1, period: int = 0,
                  dataset: str = "ds") -> Scope:
    return Scope(f"project:{project}:{dataset}", dataset, Fraction(limit), period, "2030-01-01T00:00:00Z")


def cap_scope(limit: Fraction | str | int = 1, period: int = 0, dataset: str = "ds") -> Scope:
    return Scope(f"dataset:{dataset}", dataset, Fraction(limit), period, "", CAP_LABEL)


@pytest.fixture
def ledger(tmp_path: Path):
    led = SqliteLedger(tmp_path / "ledger.sqlite")
    yield led
    led.close()


# -- exact arithmetic ---------------------------------------------------------------------------


def test_ten_tenths_fill_one_exactly_and_eleventh_is_refused(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    for i in range(10):
        ledger.charge("p1", f"q{i}", f"h{i}", Fraction("0.1"), [scope])
    assert ledger.state(scope) == BudgetState(Fraction(1), Fraction(1))
    assert ledger.state(scope).remaining == 0
    tiny = Fraction("1e-9")
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "q10", "h10", tiny, [scope])
    err = info.value
    assert type(err) is BudgetExhausted
    assert err.requested == Fraction(1, 10**9)
    assert err.remaining == 0
    assert err.dataset == "ds"
    assert err.resets_at == "2030-01-01T00:00:00Z"
    assert "requested epsilon 1e-09" in err.message
    assert "remaining 0" in err.message
    assert "short by 1e-09" in err.message
    assert "2030-01-01T00:00:00Z" in err.message
    # the refused charge left nothing behind
    assert ledger.find("p1", "q10") is None
    assert ledger.state(scope).spent == 1
    assert ledger.total_spent() == 1


def test_point_one_plus_point_two_fills_point_three_exactly(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=Fraction("0.3"))
    ledger.charge("p1", "a", "ha", Fraction("0.1"), [scope])
    ledger.charge("p1", "b", "hb", Fraction("0.2"), [scope])
    state = ledger.state(scope)
    assert state.spent == Fraction(3, 10)
    assert state.remaining == 0
    with pytest.raises(BudgetExhausted):
        ledger.charge("p1", "c", "hc", Fraction(1, 10**12), [scope])


def test_exhausted_message_reports_partial_remaining(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    ledger.charge("p1", "a", "h", Fraction("0.75"), [scope])
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction("0.5"), [scope])
    assert info.value.requested == Fraction(1, 2)
    assert info.value.remaining == Fraction(1, 4)
    assert "requested epsilon 0.5, remaining 0.25 (short by 0.25)" in info.value.message


@pytest.mark.parametrize("epsilon", [Fraction(0), Fraction(-1, 10)])
def test_non_positive_charge_is_an_internal_bug(ledger: SqliteLedger, epsilon: Fraction) -> None:
    scope = project_scope()
    with pytest.raises(InternalBug):
        ledger.charge("p1", "q", "h", epsilon, [scope])
    assert ledger.find("p1", "q") is None
    assert ledger.state(scope).spent == 0


# -- refund, release, find ----------------------------------------------------------------------


def test_refund_gives_back_exactly_and_query_id_can_be_reused(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    ledger.charge("p1", "keep", "hk", Fraction(1, 3), [scope])
    cid = ledger.charge("p1", "q", "h", Fraction(1, 7), [scope])
    assert ledger.state(scope).spent == Fraction(1, 3) + Fraction(1, 7)
    ledger.refund(cid)
    assert ledger.state(scope).spent == Fraction(1, 3)
    assert ledger.total_spent() == Fraction(1, 3)
    assert ledger.find("p1", "q") is None
    again = ledger.charge("p1", "q", "h", Fraction(1, 5), [scope])
    assert again != cid
    record = ledger.find("p1", "q")
    assert record is not None
    assert (record.charge_id, record.status, record.epsilon) == (again, "reserved", Fraction(1, 5))
    assert ledger.state(scope).spent == Fraction(1, 3) + Fraction(1, 5)


def test_refund_restores_every_scope(ledger: SqliteLedger) -> None:
    proj, cap = project_scope(limit=1, period=2), cap_scope(limit=2, period=5)
    cid = ledger.charge("p1", "q", "h", Fraction(2, 3), [proj, cap])
    assert ledger.state(proj).spent == ledger.state(cap).spent == Fraction(2, 3)
    ledger.refund(cid)
    assert ledger.state(proj).spent == 0
    assert ledger.state(cap).spent == 0


def test_release_stores_answer_and_find_reports_it(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    cid = ledger.charge("p1", "q", "canon", Fraction(1, 4), [scope])
    record = ledger.find("p1", "q")
    assert record is not None
    assert record.charge_id == cid
    assert record.project == "p1"
    assert record.query_id == "q"
    assert record.canonical_hash == "canon"
    assert record.epsilon == Fraction(1, 4)
    assert record.status == "reserved"
    assert record.answer is None
    assert record.orphaned is False
    assert ledger.find_answer("p1", "canon") is None  # reserved charges have no answer yet

    ledger.release(cid, b"\x00answer-bytes\xff")
    record = ledger.find("p1", "q")
    assert record is not None
    assert record.status == "released"
    assert record.answer == b"\x00answer-bytes\xff"
    assert ledger.find_answer("p1", "canon") == b"\x00answer-bytes\xff"
    assert ledger.find_answer("p2", "canon") is None  # answers are per project
    assert ledger.find_answer("p1", "other") is None
    assert ledger.find("p1", "nope") is None
    assert ledger.find("p2", "q") is None
    # a released charge still counts
    assert ledger.state(scope).spent == Fraction(1, 4)
    assert ledger.total_spent() == Fraction(1, 4)


def test_find_answer_returns_first_released(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    first = ledger.charge("p1", "q1", "canon", Fraction(1, 10), [scope])
    second = ledger.charge("p1", "q2", "canon", Fraction(1, 10), [scope])
    ledger.release(second, b"second")
    assert ledger.find_answer("p1", "canon") == b"second"
    ledger.release(first, b"first")
    assert ledger.find_answer("p1", "canon") == b"first"


def test_released_charge_cannot_be_refunded_or_released_again(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    cid = ledger.charge("p1", "q", "h", Fraction(1, 2), [scope])
    ledger.release(cid, b"a")
    with pytest.raises(InternalBug):
        ledger.refund(cid)
    with pytest.raises(InternalBug):
        ledger.release(cid, b"b")
    assert ledger.state(scope).spent == Fraction(1, 2)
    record = ledger.find("p1", "q")
    assert record is not None and (record.status, record.answer) == ("released", b"a")


def test_refunded_charge_cannot_be_refunded_or_released(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    other = ledger.charge("p1", "other", "h", Fraction(1, 3), [scope])
    cid = ledger.charge("p1", "q", "h", Fraction(1, 2), [scope])
    ledger.refund(cid)
    with pytest.raises(InternalBug):
        ledger.refund(cid)
    with pytest.raises(InternalBug):
        ledger.release(cid, b"x")
    with pytest.raises(InternalBug):
        ledger.refund(999_999)
    assert ledger.state(scope).spent == Fraction(1, 3)
    assert ledger.find("p1", "other") is not None and other != cid


def test_same_project_query_id_twice_raises_query_id_in_use(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    ledger.charge("p1", "q", "h", Fraction(1, 10), [scope])
    with pytest.raises(QueryIdInUse):
        ledger.charge("p1", "q", "h", Fraction(1, 10), [scope])
    record = ledger.find("p1", "q")
    assert record is not None
    ledger.release(record.charge_id, b"a")
    with pytest.raises(QueryIdInUse):  # also once the first has been released
        ledger.charge("p1", "q", "other-hash", Fraction(1, 10), [scope])
    assert ledger.state(scope).spent == Fraction(1, 10)


def test_different_projects_may_reuse_query_id(ledger: SqliteLedger) -> None:
    s1, s2 = project_scope("p1"), project_scope("p2")
    c1 = ledger.charge("p1", "q", "h", Fraction(1, 10), [s1])
    c2 = ledger.charge("p2", "q", "h", Fraction(2, 10), [s2])
    assert c1 != c2
    r1, r2 = ledger.find("p1", "q"), ledger.find("p2", "q")
    assert r1 is not None and r2 is not None
    assert (r1.charge_id, r1.epsilon) == (c1, Fraction(1, 10))
    assert (r2.charge_id, r2.epsilon) == (c2, Fraction(1, 5))
    assert ledger.state(s1).spent == Fraction(1, 10)
    assert ledger.state(s2).spent == Fraction(1, 5)


def test_refund_succeeds_even_if_renamed_query_id_is_taken(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    cid = ledger.charge("p1", "q", "h", Fraction(1, 10), [scope])
    ledger.charge("p1", f"q#refunded#{cid}", "h2", Fraction(1, 10), [scope])
    ledger.refund(cid)
    assert ledger.state(scope).spent == Fraction(1, 10)


# -- multiple scopes and periods ------------------------------------------------------------------


def test_charge_fitting_project_but_not_cap_charges_neither(ledger: SqliteLedger) -> None:
    proj1, proj2, cap = project_scope("p1", limit=1), project_scope("p2", limit=1), cap_scope(limit=Fraction("0.5"))
    ledger.charge("p2", "a", "h", Fraction("0.4"), [proj2, cap])
    assert ledger.state(cap).spent == Fraction(2, 5)
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction("0.2"), [proj1, cap])
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
    ledger.charge("p1", "b", "h", Fraction("0.1"), [proj1, cap])
    assert ledger.state(proj1).spent == Fraction(1, 10)
    assert ledger.state(cap).spent == Fraction(1, 2)


def test_charge_fitting_cap_but_not_project_charges_neither(ledger: SqliteLedger) -> None:
    proj, cap = project_scope("p1", limit=Fraction("0.3")), cap_scope(limit=10)
    ledger.charge("p1", "a", "h", Fraction("0.3"), [proj, cap])
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction("0.1"), [proj, cap])
    assert "for project on dataset 'ds'" in info.value.message
    assert ledger.state(proj).spent == Fraction(3, 10)
    assert ledger.state(cap).spent == Fraction(3, 10)


def test_new_period_starts_from_zero(ledger: SqliteLedger) -> None:
    p0, p1 = project_scope(limit=1, period=0), project_scope(limit=1, period=1)
    ledger.charge("p1", "a", "h", Fraction(1), [p0])
    with pytest.raises(BudgetExhausted):
        ledger.charge("p1", "b", "h", Fraction(1, 100), [p0])
    assert ledger.state(p1) == BudgetState(Fraction(1), Fraction(0))
    ledger.charge("p1", "b", "h", Fraction(3, 4), [p1])
    assert ledger.state(p1).spent == Fraction(3, 4)
    assert ledger.state(p0).spent == 1
    assert ledger.state(project_scope(limit=1, period=2)).spent == 0


def test_remaining_never_negative_when_limit_lowered(ledger: SqliteLedger) -> None:
    ledger.charge("p1", "a", "h", Fraction(1), [project_scope(limit=1)])
    lowered = project_scope(limit=Fraction(1, 2))
    assert ledger.state(lowered) == BudgetState(Fraction(1, 2), Fraction(1))
    assert ledger.state(lowered).remaining == 0
    with pytest.raises(BudgetExhausted) as info:
        ledger.charge("p1", "b", "h", Fraction(1, 10), [lowered])
    assert info.value.remaining == 0


def test_duplicate_scope_cannot_overspend(ledger: SqliteLedger) -> None:
    scope = project_scope(limit=1)
    with pytest.raises(InternalBug, match="same budget twice"):
        ledger.charge("p1", "q", "h", Fraction(6, 10), [scope, scope])
    assert ledger.state(scope).spent == 0


# -- durability ---------------------------------------------------------------------------------


def test_charges_survive_reopen(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    scope, cap = project_scope(limit=1), cap_scope(limit=2)
    first = SqliteLedger(path)
    released = first.charge("p1", "a", "ha", Fraction(1, 3), [scope, cap])
    first.release(released, b"answer-a")
    refunded = first.charge("p1", "b", "hb", Fraction(1, 5), [scope, cap])
    first.refund(refunded)
    reserved = first.charge("p1", "c", "hc", Fraction(1, 6), [scope, cap])
    first.close()

    second = SqliteLedger(path)
    try:
        assert second.state(scope).spent == Fraction(1, 2)
        assert second.state(cap).spent == Fraction(1, 2)
        assert second.total_spent() == Fraction(1, 2)
        rec_a, rec_c = second.find("p1", "a"), second.find("p1", "c")
        assert rec_a is not None and (rec_a.charge_id, rec_a.status, rec_a.answer) == (released, "released",
                                                                                       b"answer-a")
        assert rec_c is not None and (rec_c.charge_id, rec_c.status) == (reserved, "reserved")
        assert second.find("p1", "b") is None
        assert second.find_answer("p1", "ha") == b"answer-a"
        with pytest.raises(BudgetExhausted):
            second.charge("p1", "d", "hd", Fraction(1, 2) + Fraction(1, 10**9), [scope, cap])
        second.charge("p1", "d", "hd", Fraction(1, 2), [scope, cap])
        assert second.state(scope).spent == 1
    finally:
        second.close()


def test_orphaned_reserved_charge_is_adopted_once(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    scope = project_scope(limit=1)
    crashed = SqliteLedger(path)
    cid = crashed.charge("p1", "q", "h", Fraction(1, 4), [scope])
    mine = crashed.find("p1", "q")
    assert mine is not None and mine.orphaned is False
    crashed.close()

    fresh = SqliteLedger(path)
    try:
        record = fresh.find("p1", "q")
        assert record is not None
        assert (record.charge_id, record.status, record.orphaned) == (cid, "reserved", True)
        assert fresh.adopt(cid) is True
        assert fresh.adopt(cid) is False  # already ours
        adopted = fresh.find("p1", "q")
        assert adopted is not None and adopted.orphaned is False
        assert fresh.state(scope).spent == Fraction(1, 4)  # adoption does not charge again
        fresh.release(cid, b"done")
        assert fresh.adopt(cid) is False  # released charges cannot be adopted
        assert fresh.adopt(424242) is False
        assert fresh.find_answer("p1", "h") == b"done"
    finally:
        fresh.close()


def test_refunded_charge_cannot_be_adopted(tmp_path: Path) -> None:
    path = tmp_path / "ledger.sqlite"
    first = SqliteLedger(path)
    cid = first.charge("p1", "q", "h", Fraction(1, 4), [project_scope()])
    first.refund(cid)
    first.close()
    second = SqliteLedger(path)
    try:
        assert second.adopt(cid) is False
    finally:
        second.close()


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

LIMITS = {"project:a:ds": Fraction(1), "project:b:ds": Fraction(3, 4), "dataset:ds": Fraction(3, 2)}
PERIODS = range(3)


class LedgerMachine(RuleBasedStateMachine):
    """Random charges/refunds/releases; the ledger must match an exact Fraction model after every step."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = tempfile.mkdtemp(prefix="ledger-prop-")
        self.ledger = SqliteLedger(Path(self.dir) / "ledger.sqlite")
        # charge_id -> (epsilon, [(key, period)], status)
        self.charges: dict[int, tuple[Fraction, list[tuple[str, int]], str]] = {}
        self.count = 0

    def teardown(self) -> None:
        self.ledger.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def model_spent(self, key: str, period: int) -> Fraction:
        return sum((eps for eps, scopes, status in self.charges.values()
                    if status != "refunded" and (key, period) in scopes), Fraction(0))

    @rule(project=st.sampled_from(["a", "b"]), with_cap=st.booleans(),
          project_period=st.sampled_from(PERIODS), cap_period=st.sampled_from(PERIODS),
          epsilon=st.fractions(min_value=Fraction(1, 20), max_value=Fraction(1, 2), max_denominator=20))
    def charge(self, project: str, with_cap: bool, project_period: int, cap_period: int,
               epsilon: Fraction) -> None:
        pkey = f"project:{project}:ds"
        scopes = [Scope(pkey, "ds", LIMITS[pkey], project_period, "")]
        if with_cap:
            scopes.append(Scope("dataset:ds", "ds", LIMITS["dataset:ds"], cap_period, "", CAP_LABEL))
        over = [s for s in scopes if self.model_spent(s.key, s.period_index) + epsilon > s.limit]
        self.count += 1
        query_id = f"q{self.count}"
        try:
            cid = self.ledger.charge(project, query_id, f"h{self.count}", epsilon, scopes)
        except BudgetExhausted as err:
            assert over, f"refused although every scope had room for {epsilon}"
            first = over[0]
            assert err.requested == epsilon
            assert err.remaining == max(Fraction(0), first.limit - self.model_spent(first.key, first.period_index))
            assert self.ledger.find(project, query_id) is None
            return
        assert not over, f"accepted {epsilon} although {over[0].key}@{over[0].period_index} had no room"
        assert cid not in self.charges
        self.charges[cid] = (epsilon, [(s.key, s.period_index) for s in scopes], "reserved")

    def pick(self, pick: int, reserved: bool) -> int | None:
        ids = sorted(cid for cid, (_, _, status) in self.charges.items() if (status == "reserved") == reserved)
        return ids[pick % len(ids)] if ids else None

    @rule(pick=st.integers(0, 1000))
    def refund(self, pick: int) -> None:
        cid = self.pick(pick, reserved=True)
        if cid is None:
            return
        self.ledger.refund(cid)
        eps, scopes, _ = self.charges[cid]
        self.charges[cid] = (eps, scopes, "refunded")

    @rule(pick=st.integers(0, 1000))
    def release(self, pick: int) -> None:
        cid = self.pick(pick, reserved=True)
        if cid is None:
            return
        self.ledger.release(cid, f"answer-{cid}".encode())
        eps, scopes, _ = self.charges[cid]
        self.charges[cid] = (eps, scopes, "released")

    @rule(pick=st.integers(0, 1000))
    def refund_settled_is_refused(self, pick: int) -> None:
        cid = self.pick(pick, reserved=False)
        if cid is None:
            return
        with pytest.raises(InternalBug):
            self.ledger.refund(cid)

    @invariant()
    def spent_matches_model(self) -> None:
        for key, limit in LIMITS.items():
            for period in PERIODS:
                state = self.ledger.state(Scope(key, "ds", limit, period, ""))
                expected = self.model_spent(key, period)
                assert state.spent == expected, (key, period, state.spent, expected)
                assert 0 <= state.spent <= limit
                assert state.remaining == limit - expected
        total = sum((eps for eps, _, status in self.charges.values() if status != "refunded"), Fraction(0))
        assert self.ledger.total_spent() == total


LedgerMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=10, deadline=None,
                                           suppress_health_check=[HealthCheck.too_slow])
TestLedgerProperty = LedgerMachine.TestCase


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
            led.charge("p1", f"t{i}", "h", Fraction("0.1"), [scope])
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
        assert led.state(scope) == BudgetState(Fraction(1), Fraction(1))
        assert led.total_spent() == 1
    finally:
        led.close()


# The worker runs as ``exec(_WORKER, globals)`` in each spawned child, so the child imports only the
# ledger and not this module (which would pull in pytest and hypothesis: ~1 s per child).
_WORKER = """
from fractions import Fraction
from pathlib import Path

from gateway.errors import BudgetExhausted
from gateway.ledger import Scope, SqliteLedger

led = SqliteLedger(Path(PATH))
scope = Scope("project:p1:ds", "ds", Fraction("1.0"), 0, "")
ok = exhausted = 0
errors = []
BARRIER.wait()
for j in range(ATTEMPTS):
    try:
        led.charge("p1", f"w{WORKER}-{j}", "h", Fraction("0.1"), [scope])
        ok += 1
    except BudgetExhausted:
        exhausted += 1
    except Exception as err:
        errors.append(f"{type(err).__name__}: {err}")
led.close()
RESULTS.put((WORKER, ok, exhausted, errors))
"""


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
        assert led.state(scope) == BudgetState(Fraction(1), Fraction(1))
        assert led.total_spent() == 1
        rows = led._conn().execute("SELECT COUNT(*) FROM charges WHERE status = 'reserved'").fetchone()
        assert rows == (10,)
    finally:
        led.close()
