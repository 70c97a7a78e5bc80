"""Tamper-evident audit log: one JSON record per line, each carrying the previous record's hash.

Every query, accepted or rejected, is appended (DESIGN §9). Records hold who asked what
(canonical query hash), the outcome and the privacy loss charged; never a value, row or exact
aggregate. :func:`verify` recomputes the chain; editing, removing or reordering a record breaks it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GENESIS = "0" * 64


def _digest(prev: str, body: dict[str, Any]) -> str:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((prev + text).encode()).hexdigest()


class AuditLog:
    """Appends hash-chained records to ``path`` (thread-safe, flushed per record)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._prev, self._seq = GENESIS, 0
        for record in _records(path):
            self._prev, self._seq = record.get("hash", GENESIS), int(record.get("seq", 0))
        self._file = path.open("a", encoding="utf-8")

    def append(self, **fields: Any) -> None:
        """Append one record; ``fields`` must hold no patient values."""
        with self._lock:
            body = {"seq": self._seq + 1, "time": round(time.time(), 3), "prev": self._prev, **fields}
            digest = _digest(self._prev, body)
            self._file.write(json.dumps({**body, "hash": digest}, sort_keys=True) + "\n")
            self._file.flush()
            self._prev, self._seq = digest, self._seq + 1

    def close(self) -> None:
        """Flush to disk and close."""
        with self._lock:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()


def _records(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if line.strip():
                yield json.loads(line)


@dataclass(frozen=True)
class Verification:
    """Result of :func:`verify`: how many records are intact and the first problem, if any."""

    records: int
    problem: str | None

    @property
    def ok(self) -> bool:
        """True when the whole chain verified."""
        return self.problem is None


def verify(path: Path) -> Verification:
    """Recompute the hash chain of an audit log file."""
    prev, count = GENESIS, 0
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as err:
        return Verification(0, f"cannot read {path}: {err.strerror}")
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            claimed = record.pop("hash") if isinstance(record, dict) else None
        except (json.JSONDecodeError, KeyError):
            claimed = None
        if claimed is None:
            return Verification(count, f"line {number}: not an audit record")
        if record.get("prev") != prev or record.get("seq") != count + 1:
            return Verification(count, f"line {number}: chain broken (record removed, reordered or inserted)")
        if _digest(prev, record) != claimed:
            return Verification(count, f"line {number}: record was modified (hash mismatch)")
        prev, count = claimed, count + 1
    return Verification(count, None)


def tail(path: Path, n: int = 20) -> list[dict[str, Any]]:
    """The last ``n`` records."""
    return list(_records(path))[-n:] if n > 0 else []
