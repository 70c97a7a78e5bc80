"""What the console shows, read without ever holding up the running site.

The ledger is opened read-only (a ``mode=ro`` URI, one short read per page): in WAL mode a reader
never blocks the site's writer, and a read-only connection cannot take a write lock. The audit log
is read up to its last whole line (the site may be appending to it) and its chain verified
against the ledger's anchors. The policy is the file the site serves, re-read when it changes; an
edit that does not load leaves the last good policy shown with the reason, as the site keeps
serving its last good policy.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any

from .._scopes import budget_scopes, cap_scope
from ..audit import Anchor, Verification, verify_lines
from ..ledger import Scope, read_in_force
from ..policy import LoadedPolicy, Policy, PolicyFileError, load_policy

LEDGER, AUDIT = "ledger.sqlite", "audit.jsonl"  # in a site's state dir (gateway.site._statedir, not imported: it
# would load the site's server and OpenDP into the console)


class ConsoleDataError(Exception):
    """The state dir cannot be read as it is (ledger missing or damaged); the message says what to do."""


@dataclass(frozen=True)
class BudgetRow:
    """One budget in its window in force: a project's on a population, or a population's cap over all projects."""

    project: str  # "" for a population's cap over all projects
    population: str
    datasets: tuple[str, ...]
    limit: Fraction
    spent: Fraction
    period: str
    window_start: int
    resets_at: str  # RFC 3339, "" when the budget never resets
    spending: tuple[tuple[float, Fraction], ...]  # (epoch seconds, epsilon charged) in the window, oldest first

    @property
    def remaining(self) -> Fraction:
        """What may still be spent in this window (never below zero)."""
        return max(Fraction(0), self.limit - self.spent)

    @property
    def used(self) -> float:
        """The share of the limit spent, 0..1."""
        return min(1.0, float(self.spent / self.limit)) if self.limit else 1.0


@contextmanager
def read_only(path: Path) -> Iterator[sqlite3.Connection]:
    """A read-only connection to the ledger at ``path`` (the site may be writing it)."""
    if not path.is_file():
        raise ConsoleDataError(f"no ledger at {path}: is this a site's state dir, and has the site started once?")
    try:
        con = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error as err:
        raise ConsoleDataError(f"the ledger {path} cannot be opened ({err})") from None
    try:
        con.execute("PRAGMA query_only = ON")
        yield con
    except sqlite3.DatabaseError as err:
        raise ConsoleDataError(f"the ledger {path} cannot be read ({err})") from None
    finally:
        con.close()


def budgets(state_dir: Path, policy: Policy, now: datetime) -> list[BudgetRow]:
    """Every budget the policy configures, as the ledger has it now, with the charges in each window.

    Projects are those a rule names literally and those with a charge; each on every population a
    rule grants it (as the site's budget gauges), then each population's cap over all projects.
    """
    with read_only(state_dir / LEDGER) as con:
        con.execute("BEGIN")  # one snapshot for the whole page
        charged = {str(r[0]) for r in con.execute("SELECT DISTINCT project FROM charges WHERE status != 'refunded'")}
        literal = {r.project for r in policy.budgets if not any(c in r.project for c in "*?[")}
        scopes: list[tuple[str, str, str, Scope]] = []
        for project in sorted(literal | charged):
            seen: set[str] = set()
            for name, dataset in policy.datasets.items():
                rule = policy.budget_rule(project, name)
                if rule is not None and dataset.population_name not in seen:
                    seen.add(dataset.population_name)
                    scope = budget_scopes(policy, project, name, rule, now)[0]
                    scopes.append((project, dataset.population_name, rule.period, scope))
        for population, names in policy.populations().items():
            cap = policy.population_cap(population)
            cap, capped = policy.population_cap(population), cap_scope(policy, names[0], now)
            if cap is not None and capped is not None:
                scopes.append(("", population, cap.period, capped))
        states = [(project, population, period, scope, *read_in_force(con, scope))
                  for project, population, period, scope in scopes]
        earliest = min((start for *_, start in states), default=0)
        charges = con.execute("SELECT created, epsilon, scopes FROM charges WHERE status != 'refunded' AND"
                              " created >= ? ORDER BY id", (earliest,)).fetchall()
        con.execute("COMMIT")
    by_scope: dict[str, list[tuple[float, Fraction]]] = {}
    for created, epsilon, keys in charges:
        for key in str(keys).split(";"):
            by_scope.setdefault(key, []).append((float(created), Fraction(epsilon)))
    populations = policy.populations()
    return [BudgetRow(project, population, populations[population], state.limit, state.spent, period, start,
                      state.resets_at, tuple(by_scope.get(f"{scope.key}@{start}", ())))
            for project, population, period, scope, state, start in states]


def charged_projects(state_dir: Path) -> list[str]:
    """Every project with a charge that still counts (none when the site has no ledger yet)."""
    if not (state_dir / LEDGER).is_file():
        return []
    with read_only(state_dir / LEDGER) as con:
        return [str(r[0]) for r in con.execute(
            "SELECT DISTINCT project FROM charges WHERE status != 'refunded' ORDER BY project")]


# -- the audit log -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class AuditSnapshot:
    """The audit log's whole records, oldest first, and whether its chain (and the ledger's anchors) verify."""

    records: tuple[dict[str, Any], ...]
    verification: Verification


class AuditReader:
    """Reads a live site's audit log; re-reads and re-verifies only when the log or the anchors changed."""

    def __init__(self, state_dir: Path) -> None:
        self.log, self.ledger = state_dir / AUDIT, state_dir / LEDGER
        self._lock = threading.Lock()
        self._cached: tuple[object, AuditSnapshot] | None = None

    def snapshot(self) -> AuditSnapshot:
        """The log as it is now (see the module)."""
        anchors = self._anchors()
        last_anchor = anchors[-1].seq if anchors else 0
        key = (_stamp(self.log), len(anchors), last_anchor)  # any edit of the log changes its stamp
        with self._lock:
            if self._cached is not None and self._cached[0] == key:
                return self._cached[1]
        lines = self._lines()
        for _ in range(40):  # a release is anchored in the ledger a moment before its record reaches the log
            if _last_seq(lines) >= last_anchor:
                break
            time.sleep(0.025)
            key, lines = (_stamp(self.log), *key[1:]), self._lines()
        records = tuple(r for r in map(_record, lines) if r is not None)
        snapshot = AuditSnapshot(records, verify_lines(lines, anchors))
        with self._lock:
            self._cached = (key, snapshot)
        return snapshot

    def _lines(self) -> list[str]:
        try:
            data = self.log.read_bytes()
        except FileNotFoundError:
            return []
        except OSError as err:
            raise ConsoleDataError(f"the audit log {self.log} cannot be read ({err.strerror})") from None
        whole = data[:data.rfind(b"\n") + 1]  # a line without its newline is still being written
        return [line for line in whole.decode("utf-8", errors="replace").splitlines() if line.strip()]

    def _anchors(self) -> list[Anchor]:
        if not self.ledger.is_file():
            return []
        with read_only(self.ledger) as con:
            columns = {row[1] for row in con.execute("PRAGMA table_info(charges)")}
            if "audit_seq" not in columns:
                return []
            return [Anchor(int(seq), str(digest), int(charge)) for seq, digest, charge in con.execute(
                "SELECT audit_seq, audit_hash, id FROM charges WHERE audit_seq IS NOT NULL ORDER BY audit_seq")]


def _record(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


def _last_seq(lines: list[str]) -> int:
    record = _record(lines[-1]) if lines else None
    seq = record.get("seq") if record else 0
    return seq if isinstance(seq, int) else 0


# -- the policy --------------------------------------------------------------------------------------

class PolicyReader:
    """The site's policy file, re-read when it changes; the last good policy stays shown after a bad edit."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._stamp = _stamp(path)
        self._good: LoadedPolicy = load_policy(path)  # the console does not start on a policy that does not load
        self._problem: str | None = None

    def current(self) -> tuple[LoadedPolicy, str | None]:
        """The policy to show and, when the file on disk does not load, why (one line)."""
        with self._lock:
            stamp = _stamp(self.path)
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._good, self._problem = load_policy(self.path), None
                except PolicyFileError as err:
                    self._problem = err.problems[0] if err.problems else "the policy file does not load"
            return self._good, self._problem


def _stamp(path: Path) -> tuple[int, int]:
    """(mtime_ns, size) of the file, (0, 0) when missing: a cheap change detector."""
    try:
        stat = path.stat()
    except OSError:
        return (0, 0)
    return (stat.st_mtime_ns, stat.st_size)


def utc(epoch: float) -> str:
    """An epoch time as an ISO time in UTC, to the second."""
    return datetime.fromtimestamp(epoch, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
