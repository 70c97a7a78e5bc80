"""The broker's view of its sites for the Status call: each site's last failure and last success.

Every call the broker makes to a site (queries, budgets, datasets, history, status) is noted here
as it ends, so an operator asking for the status sees why a site was left out of answers before,
not only whether it answers now. A call the caller cancelled says nothing about the site and is
not noted. Kept in memory: a restarted broker starts with a clean record.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from .._proto.gateway.v1 import gateway_pb2 as pb
from ..audit import iso_time


@dataclass(frozen=True)
class Seen:
    """How one call to a site ended: ``reason`` is empty for success, else a MissingSite reason."""

    site: str
    reason: str = ""
    message: str = ""


class SiteRecord:
    """The last success and the last failure of the broker's calls to each site (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ok: dict[str, float] = {}
        self._error: dict[str, tuple[float, str, str]] = {}

    def note(self, seen: Seen, at: float | None = None) -> None:
        """Note how one call to a site ended."""
        when = time.time() if at is None else at
        with self._lock:
            if seen.reason:
                self._error[seen.site] = (when, seen.reason, seen.message[:500])
            else:
                self._ok[seen.site] = when

    def status(self, site: str, now: Seen, version: str, seconds: float) -> pb.SiteStatus:
        """``site``'s status: ``now``, how the status call just made ended, and its record."""
        with self._lock:
            ok, error = self._ok.get(site), self._error.get(site)
        status = pb.SiteStatus(site=site, health=now.reason or "serving", version=version,
                               latency_seconds=round(seconds, 4), last_ok_at=iso_time(ok) if ok else "")
        if error is not None:
            status.last_error_at, status.last_error_reason, status.last_error = iso_time(error[0]), error[1], error[2]
        return status
