"""Tamper-evident, durable audit log: one JSON record per line, each carrying the previous record's hash.

Every query, accepted or rejected, is recorded (DESIGN §9); calls rejected without credentials are
counted per source, not recorded one by one (the site's edge does that). Records hold who asked
what (canonical query hash), the outcome and the privacy loss charged; never a value, row or exact
aggregate. :func:`verify` recomputes the chain (editing, removing or reordering a record breaks
it) and checks it against the ledger's anchors, which expose a truncated or recomputed chain.

How records become durable:

- Records are sequenced (seq, prev, hash) in memory, in order. One writer thread writes everything
  queued with one ``write`` and one ``fsync`` (a group commit: concurrent appenders share it), and an
  appender returns once its record is durable. A failed write or fsync is cut off the file again
  (truncated to the last durable size): a record is in the file whole or not at all, and no seq is
  in the file twice.
- A release's record is sealed into the chain by the ledger, inside the transaction that charges
  it (:meth:`AuditLog.seal`); the ledger stores its seq, hash and text with the charge (the
  anchor), and the answer leaves the process only once the record is durable here too.
- Sealing waits until everything queued before it is anchored, so the unwritten tail of the chain
  is always anchored records followed by others. When a write fails, the anchored records are
  kept and written when the disk allows (the ledger holds them: the charge happened); every other
  unwritten record is dropped, its caller told UNAVAILABLE, and its seq is given to the next
  record, as it never reached the file.
- At start, a torn last line (a crash mid-write) is cut, and anchored records that the file lacks
  (a crash between the ledger's commit and the write) are restored from the ledger; an
  ``audit_repaired`` record says what was done. Any other unreadable line refuses the start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import takewhile
from pathlib import Path
from typing import Any

from .errors import AuditUnavailable, FailedPrecondition, InternalBug

GENESIS = "0" * 64
_CHAIN_KEYS = frozenset({"seq", "time", "at", "prev", "hash"})  # the log sets these
log = logging.getLogger("gateway.audit")

NOT_WRITTEN = ("the site cannot write its audit log (its disk is full or failing), so it answers nothing and "
               "charged nothing; retry later with the same query_id")
KEPT = ("the site could not write the audit record of this answer (its disk is full or failing), so the answer "
        "was not released; it is charged and kept: retry later with the same query_id to receive it at no "
        "further cost")


class AuditLogError(FailedPrecondition):
    """The audit log cannot be used as it is: an unreadable line, or records the ledger anchors are missing."""


def iso_time(timestamp: float) -> str:
    """A record's time for people: ISO 8601 in UTC, to the millisecond (``2026-11-23T23:20:01.123Z``)."""
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _digest(prev: str, body: Mapping[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + text).encode()).hexdigest()


class Entry:
    """One sequenced record, queued until it is durable; :meth:`wait` for that."""

    __slots__ = ("anchored", "done", "error", "hash", "held", "line", "prev", "seq")

    def __init__(self, seq: int, prev: str, digest: str, text: str, anchored: bool = False,
                 held: bool = False) -> None:
        self.seq, self.prev, self.hash = seq, prev, digest
        self.line = (text + "\n").encode()
        self.anchored = anchored  # the ledger holds it: never dropped
        self.held = held  # sealed, its ledger transaction not yet resolved: not written yet
        self.done = threading.Event()
        self.error: str | None = None

    @property
    def text(self) -> str:
        """The record as one line of JSON (what the ledger stores with the charge)."""
        return self.line[:-1].decode()

    def wait(self) -> None:
        """Return once the record is durable; raise :class:`AuditUnavailable` if it could not be written."""
        self.done.wait()
        if self.error is not None:
            raise AuditUnavailable(KEPT if self.anchored else NOT_WRITTEN, recorded=self.anchored)


class Seal:
    """Records sealed into the chain for one ledger transaction: :meth:`resolve` them once it ends."""

    def __init__(self, owner: AuditLog, entries: list[Entry]) -> None:
        self._owner = owner
        self.entries = entries

    def resolve(self, committed: bool) -> None:
        """The transaction committed (the records are anchored: write them) or failed (void them)."""
        self._owner._resolve(self.entries, committed)


class AuditLog:
    """Appends hash-chained records to ``path``, durably and in order (thread-safe).

    ``anchored(seq)`` gives the text of every record the ledger anchored after ``seq``, in seq order:
    those the file lacks are restored at open. A failed write is tried again every
    ``retry_interval`` seconds while anchored records wait for it (and at once on any new record).
    """

    def __init__(self, path: Path, anchored: Callable[[int], Sequence[str]] | None = None,
                 retry_interval: float = 1.0) -> None:
        self.path = path
        scan = _scan(path)
        restored = _restorable(path, scan, anchored(scan.seq) if anchored is not None else ())
        self._cond = threading.Condition()
        self._queue: deque[Entry] = deque()  # sequenced, not yet durable, in seq order
        self._seq, self._prev = scan.seq, scan.hash  # the chain's head (sequenced)
        self._durable = (scan.seq, scan.hash)
        self._size = scan.size  # bytes of durable records: where the next write goes (writer thread only)
        self._stale = scan.cut > 0  # bytes past _size may be in the file: cut them before writing
        self._sealing = False
        self._closed = False
        self._failure: str | None = None  # set while anchored records wait for a write that failed
        self._failures = 0
        self._retry = retry_interval
        self.syncs = 0  # fsyncs of records so far: fewer than records when appenders share them
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            self._repair(scan, restored)
        except BaseException:
            os.close(self._fd)
            raise
        self._writer = threading.Thread(target=self._write_loop, name="audit-writer", daemon=True)
        self._writer.start()

    def _repair(self, scan: _Scan, restored: Sequence[str]) -> None:
        """Cut a torn tail, restore anchored records and say so, before anything else is written."""
        entries = []
        for text in restored:
            record = json.loads(text)
            entries.append(Entry(record["seq"], record["prev"], record["hash"], text, anchored=True))
            self._seq, self._prev = record["seq"], record["hash"]
        if scan.cut:
            log.warning("audit log %s: cut a torn last line (%d bytes) left by an interrupted write", self.path,
                        scan.cut)
        if restored:
            log.warning("audit log %s: restored %d release record(s) from the ledger that the process had not "
                        "written before it stopped", self.path, len(restored))
        if scan.cut or restored:
            entries.append(self._sequence({"event": "audit_repaired", "file": self.path.name,
                                           "bytes_cut": scan.cut, "records_restored": len(restored)}))
        data = (b"\n" if scan.unterminated else b"") + b"".join(e.line for e in entries)
        if data or self._stale:
            error = self._write_bytes(data)
            if error is not None:
                raise AuditLogError(f"cannot write the audit log {self.path} ({error})")
            self._durable = (self._seq, self._prev)
        _sync_dir(self.path.parent)  # a new log's directory entry is durable too

    # -- appending ---------------------------------------------------------------------------------

    def append(self, record: Mapping[str, Any] | None = None, /, *, wait: bool = True, **fields: Any) -> None:
        """Append one record, ``record`` and ``fields`` (no patient values); with ``wait``, return once it is durable.

        Raises :class:`AuditUnavailable` when it could not be written (it never will be).
        """
        with self._cond:
            while self._sealing and not self._closed:
                self._cond.wait()
            if self._closed:
                raise AuditUnavailable("the site is shutting down; retry with the same query_id")
            entry = self._sequence({**(record or {}), **fields})
            self._queue.append(entry)
            self._cond.notify_all()
        if wait:
            entry.wait()

    def seal(self, records: Sequence[Mapping[str, Any]]) -> Seal:
        """Sequence the records of releases a ledger transaction is about to commit.

        Nothing else is sequenced until :meth:`Seal.resolve`. Waits first until every record
        queued before them is anchored (written, or held by the ledger), so they never follow a
        record that could be dropped; raises :class:`AuditUnavailable` (nothing charged) when the
        log cannot be written.
        """
        with self._cond:
            while self._sealing and not self._closed:
                self._cond.wait()
            self._sealing = True
            try:
                self._await_anchored_queue()
                entries = [self._sequence(record, held=True) for record in records]
            except BaseException:
                self._sealing = False
                self._cond.notify_all()
                raise
            self._queue.extend(entries)
        return Seal(self, entries)

    def _await_anchored_queue(self) -> None:
        failures = self._failures
        self._cond.notify_all()  # the writer: write what is queued now (again, if it failed)
        while True:
            if self._closed or self._failures > failures:
                raise AuditUnavailable(NOT_WRITTEN)
            if all(e.anchored for e in self._queue) and (self._failure is None or not self._queue):
                return
            self._cond.wait()

    def _resolve(self, entries: list[Entry], committed: bool) -> None:
        with self._cond:
            if committed:
                for entry in entries:
                    entry.held, entry.anchored = False, True
            elif entries:  # they are the tail: nothing was sequenced after them
                for entry in entries:
                    self._queue.remove(entry)
                    entry.error = "its ledger transaction failed"
                    entry.done.set()
                self._seq, self._prev = entries[0].seq - 1, entries[0].prev
                if not self._queue:
                    self._failure = None  # nothing is left waiting for the failed write
            self._sealing = False
            self._cond.notify_all()

    def _sequence(self, fields: Mapping[str, Any], held: bool = False) -> Entry:
        """Give ``fields`` the next place in the chain (caller holds the lock)."""
        if _CHAIN_KEYS & fields.keys():
            raise InternalBug(f"an audit record may not set {sorted(_CHAIN_KEYS & fields.keys())}")
        now = round(time.time(), 3)
        body = {**fields, "seq": self._seq + 1, "time": now, "at": iso_time(now), "prev": self._prev}
        digest = _digest(self._prev, body)
        entry = Entry(self._seq + 1, self._prev, digest, json.dumps({**body, "hash": digest}, sort_keys=True),
                      held=held)
        self._seq, self._prev = entry.seq, digest
        return entry

    # -- writing -------------------------------------------------------------------------------------

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            error = self._write_bytes(b"".join(entry.line for entry in batch))
            with self._cond:
                if error is None:
                    self._written(batch)
                else:
                    self._failed(batch, error)
                self._cond.notify_all()
                if error is not None and self._closed:
                    return

    def _next_batch(self) -> list[Entry] | None:
        with self._cond:
            if self._failure is not None and not self._closed:
                self._cond.wait(self._retry)  # a new record, a seal or close tries again at once
            while not self._ready() and not self._closed:
                self._cond.wait()
            if not self._ready():
                return None
            return list(takewhile(lambda entry: not entry.held, self._queue))

    def _ready(self) -> bool:
        return bool(self._queue) and not self._queue[0].held

    def _write_bytes(self, data: bytes) -> str | None:
        """Append ``data`` whole and fsync it; on failure cut the file back to its durable size."""
        try:
            if self._stale:
                os.ftruncate(self._fd, self._size)
                self._stale = False
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            os.fsync(self._fd)
        except OSError as err:
            self._stale = True
            with contextlib.suppress(OSError):  # else: cut before the next write
                os.ftruncate(self._fd, self._size)
                os.fsync(self._fd)
                self._stale = False
            return err.strerror or type(err).__name__
        self._size += len(data)
        self.syncs += 1
        return None

    def _written(self, batch: list[Entry]) -> None:
        for entry in batch:
            self._queue.popleft()
            entry.error = None
            entry.done.set()
        self._durable = (batch[-1].seq, batch[-1].hash)
        self._failure = None

    def _failed(self, batch: list[Entry], error: str) -> None:
        """Keep anchored (and held) records to write later; drop the rest, which all follow them."""
        self._failures += 1
        kept = deque(entry for entry in self._queue if entry.anchored or entry.held)
        dropped = [entry for entry in self._queue if not (entry.anchored or entry.held)]
        for entry in [*batch, *dropped]:
            entry.error = error
            entry.done.set()
        self._queue = kept
        self._seq, self._prev = (kept[-1].seq, kept[-1].hash) if kept else self._durable
        retried, self._failure = self._failure is not None, error if kept else None
        report = log.debug if retried and not dropped else log.error
        report("audit log %s: cannot write (%s): %d record(s) dropped (their calls are answered UNAVAILABLE), "
               "%d release record(s) kept to write when the disk allows", self.path, error, len(dropped), len(kept))

    # -- the rest ------------------------------------------------------------------------------------

    def fileno(self) -> int:
        """The descriptor records are written to (tests make it fail, as a full disk would)."""
        return self._fd

    def close(self) -> None:
        """Write what is queued and close (idempotent). Kept release records the disk refused stay in the ledger."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._writer.join()
        with self._cond:
            left = list(self._queue)
            for entry in left:
                entry.error = entry.error or "the log was closed"
                entry.done.set()
        if left:
            log.error("audit log %s: closed with %d release record(s) unwritten; the ledger holds them and they "
                      "are restored at the next start", self.path, len(left))
        os.close(self._fd)


def _sync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# -- reading at start --------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Scan:
    """What a log file holds: its last record, the size of its whole records and a torn tail."""

    seq: int = 0
    hash: str = GENESIS
    size: int = 0  # bytes up to the end of the last whole record (or blank line)
    cut: int = 0  # bytes after it: a torn last line
    unterminated: bool = False  # the last record lacks its newline


def _parse(raw: bytes) -> tuple[int, str] | None:
    """(seq, hash) of one line holding an audit record, else None."""
    try:
        record = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(record, dict):
        return None
    seq, digest = record.get("seq"), record.get("hash")
    if not isinstance(seq, int) or isinstance(seq, bool) or not isinstance(digest, str):
        return None
    return seq, digest


def _scan(path: Path) -> _Scan:
    """Read ``path`` line by line; only its last line may be unreadable (torn), anything else refuses."""
    if not path.exists():
        return _Scan()
    last, size, offset = (0, GENESIS), 0, 0
    torn: tuple[int, int] | None = None  # (line number, offset) of an unreadable line
    unterminated = False
    with path.open("rb") as lines:
        for number, raw in enumerate(lines, start=1):
            start, offset = offset, offset + len(raw)
            if not raw.strip():
                if torn is None:
                    size = offset
                continue
            if torn is not None:  # an unreadable line with more after it: not a torn tail
                raise _unreadable(path, torn[0])
            parsed = _parse(raw)
            if parsed is None:
                torn = (number, start)
                continue
            last, size, unterminated = parsed, offset, not raw.endswith(b"\n")
    cut = offset - torn[1] if torn is not None else 0
    return _Scan(last[0], last[1], size, cut, unterminated and torn is None)


def _unreadable(path: Path, number: int) -> AuditLogError:
    return AuditLogError(f"the audit log {path} cannot be read: line {number} is not an audit record (only a torn "
                         f"last line is repaired at start); check it with `gateway audit verify {path}` and restore "
                         "the log from a backup")


def _restorable(path: Path, scan: _Scan, anchored: Iterable[str]) -> list[str]:
    """The anchored records to append after the file's last record; they must continue its chain."""
    restored: list[str] = []
    seq, prev = scan.seq, scan.hash
    for text in anchored:
        try:
            record = json.loads(text)
            claimed = record.pop("hash")
        except (json.JSONDecodeError, KeyError, AttributeError, TypeError):
            record, claimed = {}, None
        if record.get("seq") != seq + 1 or record.get("prev") != prev or _digest(prev, record) != claimed:
            raise AuditLogError(
                f"the audit log {path} ends at record {scan.seq}, but the ledger anchors release records after "
                f"it that do not continue its chain (first: {record.get('seq', '?')}): the log was truncated or "
                f"replaced. Restore it from a backup; `gateway audit verify {path.parent}` shows what is missing")
        restored.append(text)
        seq, prev = seq + 1, str(claimed)
    return restored


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


# -- verification ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Anchor:
    """A release's record as the ledger stored it with the charge: its seq and hash."""

    seq: int
    hash: str
    charge_id: int


@dataclass(frozen=True)
class Verification:
    """Result of :func:`verify`: how many records are intact, how many anchors matched, the first problem."""

    records: int
    problem: str | None
    anchors: int = 0

    @property
    def ok(self) -> bool:
        """True when the whole chain verified (and matched every anchor given)."""
        return self.problem is None


def verify(path: Path, anchors: Iterable[Anchor] | None = None) -> Verification:
    """Recompute the hash chain of an audit log file, and check it holds every anchored record.

    ``anchors`` (from the ledger, in seq order) expose what the chain alone cannot: records cut off
    its end, and a chain recomputed after an edit.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        return Verification(0, f"cannot read {path}: {getattr(err, 'strerror', None) or err}")
    return verify_lines(lines, anchors)


def verify_lines(lines: Iterable[str], anchors: Iterable[Anchor] | None = None) -> Verification:
    """:func:`verify` over lines already read (the console reads a live log up to its last whole line)."""
    pending = iter(anchors or ())
    anchor = next(pending, None)
    count = matched = 0
    try:
        for number, count, digest in _chain(lines):
            while anchor is not None and anchor.seq <= count:
                if anchor.seq < count or anchor.hash != digest:
                    raise _Broken(count - 1, f"line {number}: record {count} is not the one the ledger anchored "
                                             f"with charge {anchor.charge_id} (the chain was rewritten)")
                matched += 1
                anchor = next(pending, None)
        if anchor is not None:
            raise _Broken(count, f"the log ends at record {count}, but the ledger anchors record {anchor.seq} "
                                 f"(charge {anchor.charge_id}): records were cut off its end")
    except _Broken as broken:
        return Verification(broken.records, broken.problem, matched)
    return Verification(count, None, matched)


class _Broken(Exception):
    def __init__(self, records: int, problem: str) -> None:
        super().__init__(problem)
        self.records, self.problem = records, problem


def _chain(lines: Iterable[str]) -> Iterator[tuple[int, int, str]]:
    """(line number, seq, hash) of each record whose link and hash verify; :class:`_Broken` at the first bad one."""
    prev, count = GENESIS, 0
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            claimed = record.pop("hash") if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            claimed = None
        if claimed is None:
            raise _Broken(count, f"line {number}: not an audit record")
        if record.get("prev") != prev or record.get("seq") != count + 1:
            raise _Broken(count, f"line {number}: chain broken (record removed, reordered or inserted)")
        if _digest(prev, record) != claimed:
            raise _Broken(count, f"line {number}: record was modified (hash mismatch)")
        prev, count = claimed, count + 1
        yield number, count, claimed


def records(path: Path) -> list[dict[str, Any]]:
    """Every record of an audit log, oldest first."""
    return list(_records(path))


def tail(path: Path, n: int = 20) -> list[dict[str, Any]]:
    """The last ``n`` records."""
    return list(_records(path))[-n:] if n > 0 else []
