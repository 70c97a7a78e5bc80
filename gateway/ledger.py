"""The privacy budget ledger: durable, atomic check-and-charge that cannot overspend (DESIGN §7).

:class:`Ledger` is the small interface a site needs (the seam a PostgreSQL ledger for several
site replicas would implement); :class:`SqliteLedger` is the embedded default (SQLite, WAL,
``synchronous=FULL``). Amounts are exact fractions stored as text, so ten charges of 0.1 fill a
budget of 1 exactly. A charge is made once the noisy answer exists: one transaction checks every
scope, charges them all and stores the answer with the charge, so a retry with the same query_id
gets that answer for free. :func:`check_affordable` is the one affordability test.

The same transaction anchors the release's audit record (DESIGN §7: the record is durable
together with the release): the record is sealed into the audit chain before the commit, its seq,
hash and text are stored with the charge, and the charge returns once the record is durable in the
audit log too. A crash in between loses nothing (the audit log restores anchored records it lacks
from :func:`anchored_records` at start), and :func:`anchors` lets ``gateway audit verify`` see a
truncated or recomputed chain. A disk that refuses a write is :class:`~.errors.Unavailable`.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

from .audit import Anchor, AuditLog, Entry, Seal
from .errors import BudgetExhausted, FailedPrecondition, InternalBug, Unavailable

T = TypeVar("T")
log = logging.getLogger("gateway.ledger")


@dataclass(frozen=True)
class Window:
    """The budget window a policy puts a request in: [start, end) in epoch seconds, and the request's time.

    ``end`` is None for a budget that never resets.
    """

    start: int
    end: int | None
    at: int


@dataclass(frozen=True)
class Scope:
    """One budget: its key, limit, and the window the policy puts this request in.

    Keys are ``project:<p>:<population>`` and ``population:<population>``; the ledger may keep an
    earlier window in force (see :func:`_in_force`).
    """

    key: str
    dataset: str  # the dataset a refusal names
    limit: Fraction
    window: Window
    label: str = "project"
    shared: bool = False  # drawn on by every project: its spend is not told to any one of them


@dataclass(frozen=True)
class BudgetState:
    """A budget's value: exact limit and spent in the window in force; ``remaining`` never goes below zero."""

    limit: Fraction
    spent: Fraction
    resets_at: str = ""

    @property
    def remaining(self) -> Fraction:
        """What may still be spent in this window."""
        return max(Fraction(0), self.limit - self.spent)


@dataclass(frozen=True)
class ChargeRecord:
    """A charge as stored: what it was for and the answer released with it."""

    charge_id: int
    project: str
    query_id: str
    canonical_hash: str
    epsilon: Fraction
    answer: bytes


def check_affordable(scope: Scope, state: BudgetState, epsilon: Fraction) -> None:
    """Refuse (:class:`BudgetExhausted`) a charge of ``epsilon`` on ``scope`` in the state it is in.

    A shared scope's refusal does not say what remains: that would tell one project what all the
    others have spent.
    """
    if state.spent + epsilon > scope.limit:
        remaining = None if scope.shared else state.remaining
        raise BudgetExhausted(scope.dataset, epsilon, remaining, state.resets_at, scope.label)


class Ledger(Protocol):
    """What a site needs from a budget ledger; implementations must be atomic and durable."""

    def precheck(self, epsilon: Fraction, scopes: Sequence[Scope]) -> None:
        """Read only: refuse a charge of ``epsilon`` that some scope cannot pay now."""
        ...

    def charge(self, project: str, query_id: str, canonical_hash: str, epsilon: Fraction,
               scopes: Sequence[Scope], answer: bytes, record: Mapping[str, object] | None = None) -> int:
        """Atomically check every scope has ``epsilon`` left, charge them all and store ``answer``.

        ``record`` is the release's audit record: the same transaction seals it into the audit chain
        (its ``charge_id`` added) and stores it with the charge. Durable on return, and so is the
        record. Raises :class:`BudgetExhausted`, :class:`QueryIdInUse` when the project already has
        a charge under ``query_id``, :class:`~.errors.Unavailable` when storage fails (nothing
        charged), or :class:`~.errors.AuditUnavailable` with ``recorded`` when the charge is
        committed but its record is not yet written (the answer must not be released).
        """
        ...

    def charge_with_states(self, project: str, query_id: str, canonical_hash: str, epsilon: Fraction,
                           scopes: Sequence[Scope], answer: bytes, record: Mapping[str, object] | None = None
                           ) -> tuple[int, tuple[BudgetState, ...]]:
        """:meth:`charge`, also returning each scope's state just after the charge (as its transaction saw it)."""
        ...

    def find(self, project: str, query_id: str) -> ChargeRecord | None:
        """The charge a project made under ``query_id``, if any."""
        ...

    def lookup(self, project: str, query_id: str, canonical_hash: str) -> tuple[ChargeRecord | None, bytes | None]:
        """:meth:`find` and, when it finds nothing, :meth:`find_answer`, in one read: (charge, answer)."""
        ...

    def find_answer(self, project: str, canonical_hash: str) -> bytes | None:
        """The first answer released to the same canonical query by the same project, if any."""
        ...

    def state(self, scope: Scope) -> BudgetState:
        """Limit and spent of one scope in its current period."""
        ...

    def projects(self) -> list[str]:
        """Every project with a charge that still counts, sorted."""
        ...

    def history(self, project: str, limit: int) -> list[tuple[str, float, Fraction, bytes]]:
        """The project's newest released answers: (query_id, when, epsilon, answer), newest first."""
        ...

    def close(self) -> None:
        """Finish pending writes and release the store."""
        ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY,
    project TEXT NOT NULL,
    query_id TEXT NOT NULL,
    canonical_hash TEXT NOT NULL,
    epsilon TEXT NOT NULL,
    scopes TEXT NOT NULL,
    status TEXT NOT NULL CHECK (status IN ('reserved', 'released', 'refunded')),
    owner TEXT NOT NULL,
    answer BLOB,
    created REAL NOT NULL,
    audit_seq INTEGER,  -- the anchor: the release's audit record, its seq and hash (since version 3)
    audit_hash TEXT,
    audit_record TEXT,
    UNIQUE (project, query_id)
);
CREATE INDEX IF NOT EXISTS charges_canonical ON charges (project, canonical_hash, status);
CREATE TABLE IF NOT EXISTS spend (
    scope TEXT NOT NULL,
    period INTEGER NOT NULL,  -- the start of the window, epoch seconds (before version 2: a period index)
    spent TEXT NOT NULL,
    PRIMARY KEY (scope, period)
);
CREATE TABLE IF NOT EXISTS windows (  -- the window in force per scope: it ends when it ends, whatever edits
    scope TEXT PRIMARY KEY,
    start INTEGER NOT NULL,
    finish INTEGER  -- NULL: never
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""
VERSION = 3  # 2: spend per absolute window and population scopes; 3: charges anchor their audit records
LEDGER_UNAVAILABLE = ("the site cannot write its budget ledger (its disk is full or failing); nothing was charged "
                      "or released; retry later with the same query_id")


class QueryIdInUse(Exception):
    """Another charge with this (project, query_id) already exists."""


class SqliteLedger:
    """The embedded ledger: one SQLite file in WAL mode with full sync.

    With ``audit``, every charge given a record anchors it in that audit log (see the module).
    """

    def __init__(self, path: Path, audit: AuditLog | None = None) -> None:
        self.path = path
        self.audit = audit
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._guard = threading.Lock()
        con = self._conn()
        con.executescript(_SCHEMA)
        _migrate_reserved_charges(con)
        _add_audit_anchors(con)
        row = con.execute("SELECT value FROM meta WHERE key = 'version'").fetchone()
        if row is None:  # a new ledger is current; one with spend and no version was written by 0.1.x
            old = con.execute("SELECT 1 FROM spend LIMIT 1").fetchone() is not None
            self.version = 1 if old else VERSION
            if not old:
                con.execute("INSERT INTO meta (key, value) VALUES ('version', ?)", (str(VERSION),))
        else:
            self.version = int(row[0])
        if self.version > VERSION:
            raise FailedPrecondition(f"the ledger {path} was written by a newer gateway (ledger version "
                                     f"{self.version}; this one reads up to {VERSION}); run that version")
        # group commit: one writer thread applies every pending write in one transaction (one fsync)
        self._pending: list[_Write[Any]] = []
        self._wake = threading.Condition()
        self._closed = False
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    def _conn(self) -> sqlite3.Connection:
        con: sqlite3.Connection | None = getattr(self._local, "con", None)
        if con is None:
            con = sqlite3.connect(self.path, isolation_level=None, timeout=30, check_same_thread=False)
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            con.execute("PRAGMA busy_timeout=30000")
            self._local.con = con
            with self._guard:
                self._all.append(con)
        return con

    def close(self) -> None:
        """Finish pending writes, stop the writer and close every connection this ledger opened."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._writer.join(timeout=30)
        with self._guard:
            for con in self._all:
                con.close()
            self._all.clear()

    def _write(self, apply: Callable[[sqlite3.Connection], T], record: Mapping[str, object] | None = None
               ) -> _Write[T]:
        """Run ``apply`` in the next group transaction; returns once that transaction is durable.

        ``apply`` returns a charge id when given a ``record`` to anchor with that charge.
        """
        op: _Write[T] = _Write(apply, record if self.audit is not None else None)
        with self._wake:
            if self._closed:
                raise InternalBug("the ledger is closed")
            self._pending.append(op)
            self._wake.notify()
        op.done.wait()
        if op.error is not None:
            raise op.error
        return op

    def _write_loop(self) -> None:
        while True:
            with self._wake:
                while not self._pending and not self._closed:
                    self._wake.wait()
                batch, self._pending = self._pending, []
                if not batch and self._closed:
                    return
            self._commit(batch)

    def _commit(self, batch: list[_Write[Any]]) -> None:
        con = self._conn()
        seal: Seal | None = None
        committed = False
        try:
            con.execute("BEGIN IMMEDIATE")
            for op in batch:  # each write succeeds or fails on its own, inside the shared transaction
                con.execute("SAVEPOINT op")
                try:
                    op.result = op.apply(con)
                except Exception as err:  # handed to the caller of this write
                    con.execute("ROLLBACK TO op")
                    op.error = _storage_error(err, self.path)
                con.execute("RELEASE op")
            seal = self._anchor(con, [op for op in batch if op.error is None and op.record is not None])
            con.execute("COMMIT")
            committed = True
        except Exception as err:  # the transaction itself failed: nothing in it is durable
            try:
                if con.in_transaction:
                    con.execute("ROLLBACK")
            except sqlite3.Error:
                log.exception("ledger %s: rollback failed", self.path)
            for op in batch:
                op.error = op.error or _storage_error(err, self.path)
        finally:
            if seal is not None:
                seal.resolve(committed)
        for op in batch:
            op.done.set()

    def _anchor(self, con: sqlite3.Connection, ops: list[_Write[Any]]) -> Seal | None:
        """Seal the records of this transaction's charges into the audit chain and store each with its charge.

        Sealing comes after every budget check, so only a failed commit can void the records.
        """
        if not ops or self.audit is None:
            return None
        seal = self.audit.seal([{**(op.record or {}), "charge_id": op.result} for op in ops])
        try:
            for op, entry in zip(ops, seal.entries, strict=True):
                con.execute("UPDATE charges SET audit_seq = ?, audit_hash = ?, audit_record = ? WHERE id = ?",
                            (entry.seq, entry.hash, entry.text, op.result))
                op.entry = entry
        except BaseException:
            seal.resolve(False)
            raise
        return seal

    def precheck(self, epsilon: Fraction, scopes: Sequence[Scope]) -> None:
        """See :meth:`Ledger.precheck`."""
        with _storage(self.path):
            con = self._conn()
            states = [_state(con, scope) for scope in scopes]
        for scope, state in zip(scopes, states, strict=True):
            check_affordable(scope, state, epsilon)

    def charge(self, project: str, query_id: str, canonical_hash: str, epsilon: Fraction,
               scopes: Sequence[Scope], answer: bytes, record: Mapping[str, object] | None = None) -> int:
        """See :meth:`Ledger.charge`."""
        return self.charge_with_states(project, query_id, canonical_hash, epsilon, scopes, answer, record)[0]

    def charge_with_states(self, project: str, query_id: str, canonical_hash: str, epsilon: Fraction,
                           scopes: Sequence[Scope], answer: bytes, record: Mapping[str, object] | None = None
                           ) -> tuple[int, tuple[BudgetState, ...]]:
        """See :meth:`Ledger.charge_with_states`."""
        if epsilon <= 0:
            raise InternalBug("a charge must be positive")
        if len({s.key for s in scopes}) != len(scopes):
            raise InternalBug("a charge names the same budget twice")
        if self.version != VERSION:
            raise InternalBug("the ledger was written by an older version and is not migrated yet")

        after: list[BudgetState] = []

        def apply(con: sqlite3.Connection) -> int:
            if con.execute("SELECT 1 FROM charges WHERE project = ? AND query_id = ?",
                           (project, query_id)).fetchone():
                raise QueryIdInUse(query_id)
            windows = [_in_force(con, scope) for scope in scopes]
            states = [_state(con, scope, window) for scope, window in zip(scopes, windows, strict=True)]
            for scope, state in zip(scopes, states, strict=True):
                check_affordable(scope, state, epsilon)
            after[:] = [BudgetState(s.limit, s.spent + epsilon, s.resets_at) for s in states]
            for scope, (start, end), state in zip(scopes, windows, states, strict=True):
                _add(con, scope.key, start, epsilon, state.spent)  # spent as just read, in this transaction
                con.execute("INSERT INTO windows (scope, start, finish) VALUES (?, ?, ?) ON CONFLICT (scope) DO"
                            " UPDATE SET start = excluded.start, finish = excluded.finish", (scope.key, start, end))
            cur = con.execute(
                "INSERT INTO charges (project, query_id, canonical_hash, epsilon, scopes, status, owner, answer,"
                " created) VALUES (?, ?, ?, ?, ?, 'released', '', ?, ?)",
                (project, query_id, canonical_hash, _text(epsilon),
                 ";".join(f"{s.key}@{w[0]}" for s, w in zip(scopes, windows, strict=True)), answer, time.time()))
            assert cur.lastrowid is not None
            return cur.lastrowid

        op = self._write(apply, record)
        if op.entry is not None:
            op.entry.wait()  # the answer may leave only with its audit record
        assert op.result is not None
        return op.result, tuple(after)

    def migrate(self, convert: Callable[[str, int], tuple[str, int, int | None] | None], at: int) -> int:
        """Migrate a ledger written by 0.1.x (spend per dataset and period index) to the current version.

        ``convert(key, period_index)`` gives the new scope key and that period's window [start, end)
        in epoch seconds, or None to leave a row alone (a dataset the policy no longer has). Spend
        of several old keys under one new key (a population's datasets) adds up; a window holding
        ``at`` becomes the one in force. Returns the number of rows moved.
        """
        def apply(con: sqlite3.Connection) -> int:
            moved = 0
            for key, period, spent in con.execute("SELECT scope, period, spent FROM spend").fetchall():
                target = convert(key, int(period))
                if target is None:
                    continue
                new_key, start, end = target
                con.execute("DELETE FROM spend WHERE scope = ? AND period = ?", (key, period))
                _add(con, new_key, start, Fraction(spent))
                if start <= at and (end is None or at < end):
                    con.execute("INSERT OR REPLACE INTO windows (scope, start, finish) VALUES (?, ?, ?)",
                                (new_key, start, end))
                moved += 1
            con.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('version', ?)", (str(VERSION),))
            return moved

        moved = self._write(apply).result
        assert moved is not None
        self.version = VERSION
        log.warning("ledger migrated to version %d: %d budget row(s) moved to population scopes and windows",
                    VERSION, moved)
        return moved

    def find(self, project: str, query_id: str) -> ChargeRecord | None:
        """See :meth:`Ledger.find`."""
        with _storage(self.path):
            row = self._conn().execute(
                "SELECT id, canonical_hash, epsilon, answer FROM charges WHERE project = ? AND query_id = ?"
                " AND status = 'released'", (project, query_id)).fetchone()
        if row is None:
            return None
        return ChargeRecord(row[0], project, query_id, row[1], Fraction(row[2]), bytes(row[3] or b""))

    def lookup(self, project: str, query_id: str, canonical_hash: str) -> tuple[ChargeRecord | None, bytes | None]:
        """See :meth:`Ledger.lookup`."""
        with _storage(self.path):
            rows = self._conn().execute(
                "SELECT 0, id, canonical_hash, epsilon, answer FROM charges WHERE project = ? AND query_id = ?"
                " AND status = 'released' UNION ALL SELECT * FROM (SELECT 1, id, canonical_hash, epsilon, answer"
                " FROM charges WHERE project = ? AND canonical_hash = ? AND status = 'released' ORDER BY id LIMIT 1)",
                (project, query_id, project, canonical_hash)).fetchall()
        for which, charge_id, found_hash, epsilon, answer in rows:
            if which == 0:
                return ChargeRecord(charge_id, project, query_id, found_hash, Fraction(epsilon),
                                    bytes(answer or b"")), None
        return None, next((bytes(row[4]) for row in rows), None)

    def find_answer(self, project: str, canonical_hash: str) -> bytes | None:
        """See :meth:`Ledger.find_answer`."""
        with _storage(self.path):
            row = self._conn().execute(
                "SELECT answer FROM charges WHERE project = ? AND canonical_hash = ? AND status = 'released'"
                " ORDER BY id LIMIT 1", (project, canonical_hash)).fetchone()
        return None if row is None else bytes(row[0])

    def state(self, scope: Scope) -> BudgetState:
        """See :meth:`Ledger.state`."""
        with _storage(self.path):
            return _state(self._conn(), scope)

    def projects(self) -> list[str]:
        """See :meth:`Ledger.projects`."""
        with _storage(self.path):
            rows = self._conn().execute(
                "SELECT DISTINCT project FROM charges WHERE status != 'refunded' ORDER BY project").fetchall()
        return [str(r[0]) for r in rows]

    def history(self, project: str, limit: int) -> list[tuple[str, float, Fraction, bytes]]:
        """The project's newest released answers: (query_id, when, epsilon, answer), newest first."""
        with _storage(self.path):
            rows = self._conn().execute(
                "SELECT query_id, created, epsilon, answer FROM charges WHERE project = ? AND status = 'released'"
                " AND answer IS NOT NULL ORDER BY id DESC LIMIT ?", (project, limit)).fetchall()
        return [(str(q), float(t), Fraction(e), bytes(a)) for q, t, e, a in rows]

    def total_spent(self) -> Fraction:
        """Sum of every charge that still counts (for audits and tests)."""
        rows = self._conn().execute("SELECT epsilon FROM charges WHERE status != 'refunded'").fetchall()
        return sum((Fraction(r[0]) for r in rows), Fraction(0))


@dataclass(frozen=True)
class SpentWindow:
    """What a scope has spent in its budget window in force (for checking a policy edit against it)."""

    scope: str
    start: int
    finish: int | None
    spent: Fraction


def spent_in_force(path: Path, at: int) -> list[SpentWindow]:
    """Every scope's spend in its window in force at ``at``, read-only (a running site may hold the ledger)."""
    if not path.is_file():
        raise FileNotFoundError(f"no ledger at {path}")
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = con.execute(
            "SELECT w.scope, w.start, w.finish, s.spent FROM windows w JOIN spend s"
            " ON s.scope = w.scope AND s.period = w.start WHERE w.finish IS NULL OR w.finish > ?", (at,)).fetchall()
    finally:
        con.close()
    return [SpentWindow(str(scope), int(start), None if finish is None else int(finish), Fraction(spent))
            for scope, start, finish, spent in rows]


def _migrate_reserved_charges(con: sqlite3.Connection) -> None:
    """Migration for ledgers written by versions that charged before drawing noise (0.1.x).

    Those kept a charge ``reserved`` until its answer was stored; one left by a crash released
    nothing. It stays spent (the conservative choice), and its query_id is freed, so a retry is
    answered as a new query. Idempotent; char(1) cannot occur in a caller's printable query_id.
    """
    cur = con.execute("UPDATE charges SET query_id = query_id || char(1) || 'abandoned' || id"
                      " WHERE status = 'reserved' AND instr(query_id, char(1)) = 0")
    if cur.rowcount:
        log.warning("ledger: %d charge(s) reserved by an older version stay spent; their query ids are freed",
                    cur.rowcount)


class _Write(Generic[T]):
    """One pending write for the group-commit thread (a charge carries the audit record it anchors)."""

    def __init__(self, apply: Callable[[sqlite3.Connection], T], record: Mapping[str, object] | None = None) -> None:
        self.apply = apply
        self.record = record
        self.entry: Entry | None = None  # the record, once sealed into the audit chain
        self.done = threading.Event()
        self.result: T | None = None
        self.error: Exception | None = None


def _add_audit_anchors(con: sqlite3.Connection) -> None:
    """Migration to version 3: charges anchor their audit records. Idempotent; runs at every open.

    Older charges have no anchor (NULL): their records were written before anchoring existed.
    """
    columns = {row[1] for row in con.execute("PRAGMA table_info(charges)")}
    if "audit_seq" not in columns:
        con.execute("BEGIN IMMEDIATE")
        for column, kind in (("audit_seq", "INTEGER"), ("audit_hash", "TEXT"), ("audit_record", "TEXT")):
            con.execute(f"ALTER TABLE charges ADD COLUMN {column} {kind}")
        con.execute("UPDATE meta SET value = ? WHERE key = 'version' AND value = '2'", (str(VERSION),))
        con.execute("COMMIT")
        log.warning("ledger migrated to version %d: charges now anchor their audit records", VERSION)
    con.execute("CREATE INDEX IF NOT EXISTS charges_audit ON charges (audit_seq) WHERE audit_seq IS NOT NULL")


def anchored_records(path: Path, after: int) -> list[str]:
    """The audit records anchored in the ledger at ``path`` after seq ``after``, in seq order (see the module)."""
    con = sqlite3.connect(path)
    try:
        if not _has_anchors(con):
            return []
        rows = con.execute("SELECT audit_record FROM charges WHERE audit_seq > ? ORDER BY audit_seq",
                           (after,)).fetchall()
        return [str(row[0]) for row in rows]
    finally:
        con.close()


def anchors(path: Path) -> Iterator[Anchor]:
    """Every anchor in the ledger at ``path`` (read only), in seq order: what ``gateway audit verify`` checks."""
    con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    try:
        if not _has_anchors(con):
            return
        for seq, digest, charge_id in con.execute(
                "SELECT audit_seq, audit_hash, id FROM charges WHERE audit_seq IS NOT NULL ORDER BY audit_seq"):
            yield Anchor(int(seq), str(digest), int(charge_id))
    finally:
        con.close()


def _has_anchors(con: sqlite3.Connection) -> bool:
    return "audit_seq" in {row[1] for row in con.execute("PRAGMA table_info(charges)")}


@contextmanager
def _storage(path: Path) -> Iterator[None]:
    """Turn a failing disk under the ledger into :class:`~.errors.Unavailable`."""
    try:
        yield
    except Exception as err:
        raise _storage_error(err, path) from err


def _storage_error(err: Exception, path: Path) -> Exception:
    """The error a caller gets for ``err``: Unavailable when the ledger's storage failed, else ``err`` itself."""
    if not isinstance(err, OSError | sqlite3.DatabaseError) or isinstance(
            err, sqlite3.IntegrityError | sqlite3.ProgrammingError | sqlite3.InterfaceError):
        return err  # the caller's error, or a bug in what we asked of SQLite: not the disk
    log.error("ledger %s: %s: %s", path, type(err).__name__, err)
    return Unavailable(LEDGER_UNAVAILABLE)


def _in_force(con: sqlite3.Connection, scope: Scope) -> tuple[int, int | None]:
    """The window in force for ``scope`` at its request time: the stored one until it ends, then the policy's.

    An edit of the policy's period or start never frees spend made in the window in force; it takes
    effect at that window's end (a window that never ends keeps its spend for good).
    """
    row = con.execute("SELECT start, finish FROM windows WHERE scope = ?", (scope.key,)).fetchone()
    if row is not None and (row[1] is None or scope.window.at < row[1]):
        return int(row[0]), row[1]
    start = scope.window.start if row is None else max(scope.window.start, int(row[1]))
    return start, scope.window.end


def read_in_force(con: sqlite3.Connection, scope: Scope) -> tuple[BudgetState, int]:
    """A scope's state and the start of its window in force, read on the caller's (e.g. read-only) connection."""
    window = _in_force(con, scope)
    return _state(con, scope, window), window[0]


def _state(con: sqlite3.Connection, scope: Scope, window: tuple[int, int | None] | None = None) -> BudgetState:
    start, end = window if window is not None else _in_force(con, scope)
    resets = "" if end is None else datetime.fromtimestamp(end, UTC).isoformat().replace("+00:00", "Z")
    return BudgetState(scope.limit, _spent(con, scope.key, start), resets)


def _spent(con: sqlite3.Connection, key: str, period: int) -> Fraction:
    row = con.execute("SELECT spent FROM spend WHERE scope = ? AND period = ?", (key, period)).fetchone()
    return Fraction(row[0]) if row else Fraction(0)


def _add(con: sqlite3.Connection, key: str, period: int, amount: Fraction, spent: Fraction | None = None) -> None:
    """Add ``amount`` to a scope's spend in a window (``spent``: its spend there, when just read)."""
    new = (_spent(con, key, period) if spent is None else spent) + amount
    if new < 0:
        raise InternalBug(f"budget {key} would go negative")
    con.execute("INSERT INTO spend (scope, period, spent) VALUES (?, ?, ?)"
                " ON CONFLICT (scope, period) DO UPDATE SET spent = excluded.spent", (key, period, _text(new)))


def _text(value: Fraction) -> str:
    return f"{value.numerator}/{value.denominator}"
