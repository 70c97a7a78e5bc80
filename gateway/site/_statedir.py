"""The site's state dir (ledger, audit log, bounded snapshots): private, and held by one process.

Two site processes on one state dir would share one ledger and one answer store (a site could
answer with another site's stored answer) and break the audit chain, so a process holds an
exclusive lock on the dir for as long as it serves, and a second one refuses to start, naming the
holder. The dir is 0700 and its files 0600: the bounded snapshots are row-level copies of data.
"""

from __future__ import annotations

import fcntl
import os
import socket
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

from ..errors import FailedPrecondition

LEDGER, AUDIT, LOCK = "ledger.sqlite", "audit.jsonl", "lock"


class StateDirError(FailedPrecondition):
    """The state dir cannot be used as it is (held by another process, ledger missing or unreadable)."""


class StateDir:
    """A state dir this process holds until :meth:`release`."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd: int | None = fd

    @property
    def ledger(self) -> Path:
        return self.path / LEDGER

    @property
    def audit(self) -> Path:
        return self.path / AUDIT

    def secure(self) -> None:
        """Make every file in the dir private to its owner (0600)."""
        for item in self.path.iterdir():
            if item.is_file():
                item.chmod(0o600)

    def release(self) -> None:
        """Let another process take the dir (idempotent)."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def hold_state_dir(path: Path, init: bool = False) -> StateDir:
    """Create (0700) and lock ``path`` for this process; refuse a dir another process holds.

    A ledger missing next to an audit log with history means budgets would restart from zero:
    refused unless ``init`` says to begin a new ledger.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 300).decode("utf-8", errors="replace").strip() or "another process"
        os.close(fd)
        raise StateDirError(f"state dir {path} is in use by {holder}; stop that site, or give this one its own "
                            "--state-dir") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since "
                 f"{datetime.now(UTC).isoformat(timespec='seconds')}".encode())
    held = StateDir(path, fd)
    ledger, audit = held.ledger, held.audit
    if not ledger.exists() and audit.exists() and audit.stat().st_size > 0 and not init:
        held.release()
        raise StateDirError(f"the ledger {ledger} is missing while the audit log {audit} has a history: a new "
                            "ledger would start every budget from zero. Restore the ledger from a backup, or "
                            "start with --init to begin a new one")
    for item in (ledger, audit):  # created private, before SQLite or the audit log open them
        os.close(os.open(item, os.O_WRONLY | os.O_CREAT, 0o600))
    return held


@contextmanager
def readable_ledger(path: Path) -> Iterator[None]:
    """Turn SQLite's refusal of a damaged ledger file into one clear line."""
    try:
        yield
    except sqlite3.DatabaseError as err:
        raise StateDirError(f"the ledger {path} cannot be read ({err}); restore it from a backup") from None
