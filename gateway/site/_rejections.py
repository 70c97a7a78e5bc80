"""Audit records for calls rejected without valid credentials: counted per source, not one each.

An outsider sending thousands of tokenless calls a second must not fill the disk, so the edge
records such rejections at most once per source per interval, each record saying how many calls
it stands for (DESIGN §9: every rejection is still in the audit, as a count).
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

MAX_REASONS = 8  # distinct reasons kept per record; more are counted as "other"


class RejectionCounter:
    """Audit records for calls rejected without valid credentials: at most one per source per ``interval``.

    A source's first rejection is recorded at once; later ones in its interval are counted and go
    into its next record, written with its next rejection after the interval, by :meth:`due` or
    by :meth:`drain` at shutdown. Each record says how many calls it stands for
    (``unauthenticated_rejections``), their first and last time and reasons. Sources beyond
    ``max_sources`` share one entry (``other``), so an outsider fills neither disk nor memory.
    """

    def __init__(self, interval: float = 60.0, max_sources: int = 64) -> None:
        self.interval = interval
        self.max_sources = max_sources
        self._lock = threading.Lock()
        self._sources: dict[str, _Pending] = {}

    def add(self, source: str, reason: str, now: float) -> list[dict[str, Any]]:
        """Count one rejection; the records due now (this source's, and others' whose interval ended)."""
        with self._lock:
            if source not in self._sources and len(self._sources) >= self.max_sources:
                source = "other"
            pending = self._sources.setdefault(source, _Pending())
            pending.count += 1
            pending.first = pending.first or now
            pending.last = now
            known = reason in pending.reasons or len(pending.reasons) < MAX_REASONS
            pending.reasons[reason if known else "other"] += 1
            return self._due(now)

    def due(self, now: float) -> list[dict[str, Any]]:
        """The records of sources whose interval has ended with rejections still uncounted in the log."""
        with self._lock:
            return self._due(now)

    def drain(self) -> list[dict[str, Any]]:
        """Records for every rejection not yet in the log (at shutdown)."""
        with self._lock:
            records = [p.record(s) for s, p in self._sources.items() if p.count]
            self._sources.clear()
            return records

    def _due(self, now: float) -> list[dict[str, Any]]:
        records = []
        for source, pending in list(self._sources.items()):
            if now - pending.written < self.interval:
                continue
            if pending.count:
                records.append(pending.record(source))
                self._sources[source] = _Pending(written=now)
            else:
                del self._sources[source]  # quiet for a whole interval: forget it
        return records


@dataclass
class _Pending:
    """Rejections of one source since its last record."""

    written: float = float("-inf")
    count: int = 0
    first: float = 0.0
    last: float = 0.0
    reasons: Counter[str] = field(default_factory=Counter)

    def record(self, source: str) -> dict[str, Any]:
        return {"event": "unauthenticated", "outcome": "unauthenticated", "source": source,
                "unauthenticated_rejections": self.count, "first": round(self.first, 3),
                "last": round(self.last, 3), "reasons": dict(self.reasons)}
