"""Loading a policy into a live engine, reloading it when the file changes, and publishing its budgets.

The budget gauges (each project's budget, each population's cap over all projects) are read from
the ledger at start, after every reload and every ``BUDGET_REFRESH_SECONDS`` (a window that resets
while nobody queries shows its new budget), so a restart never makes a budget series vanish and a
budget alert resolve.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from .._engine import NO_LIMITS, Engine, EngineLimits, file_stamp
from .._logging import event
from .._scopes import cap_scope
from ..audit import AuditLog
from ..errors import GatewayError
from ..ledger import BudgetState, Ledger
from ..metrics import SiteMetrics
from ..policy import LoadedPolicy, Policy, PolicyFileError, load_policy
from ..render import diff
from ..templates import validate_templates
from .pipeline import configured_budgets

log = logging.getLogger("gateway.site")
RETIRE_SECONDS = 30.0
BUDGET_REFRESH_SECONDS = 60.0


@dataclass(frozen=True)
class Live:
    """The policy in force and the engine serving it; swapped whole on reload."""

    loaded: LoadedPolicy
    engine: Engine


class HasLive(Protocol):
    """What the watcher swaps: the site's live policy and engine."""

    live: Live
    metrics: SiteMetrics
    state_dir: Path
    audit: AuditLog
    ledger: Ledger
    engine_limits: EngineLimits


def publish_metrics(state: HasLive) -> None:
    """Publish the live policy's datasets (outcomes at 0) and every configured budget, read from the ledger."""
    policy = state.live.loaded.policy
    state.metrics.init_datasets(policy.datasets)
    try:
        budgets = configured_budgets(state.ledger, policy, datetime.now(UTC))
    except GatewayError as err:  # the ledger cannot be read: the gauges keep their last values
        log.warning("budget gauges not refreshed: %s", err.message)
        return
    state.metrics.publish_budgets((population, project, float(b.limit), float(b.spent))
                                  for population, project, b in budgets)
    try:
        caps = configured_caps(state.ledger, policy, datetime.now(UTC))
    except GatewayError as err:
        log.warning("population cap gauges not refreshed: %s", err.message)
        return
    state.metrics.publish_caps((population, float(c.limit), float(c.spent)) for population, c in caps)


def configured_caps(ledger: Ledger, policy: Policy, now: datetime) -> list[tuple[str, BudgetState]]:
    """Every population cap the policy sets, as it stands in the ledger: (population, state)."""
    found = []
    for population, datasets in policy.populations().items():
        scope = cap_scope(policy, datasets[0], now)
        if scope is not None:
            found.append((population, ledger.state(scope)))
    return found


def load_live(path: Path, state_dir: Path, limits: EngineLimits = NO_LIMITS) -> Live:
    """Load and fully validate a policy and prepare its data; raises on any problem."""
    loaded = load_policy(path)
    problems = validate_templates(loaded)
    if problems:
        raise PolicyFileError(problems)
    engine = Engine(loaded, state_dir, limits=limits)
    try:
        engine.prepare_all()
    except GatewayError:
        engine.close()
        raise
    return Live(loaded, engine)


class PolicyWatcher(threading.Thread):
    """Reloads the policy file when it changes; an invalid edit is logged, counted and ignored."""

    def __init__(self, state: HasLive, path: Path, interval: float) -> None:
        super().__init__(name="policy-watcher", daemon=True)
        self.state, self.path, self.interval = state, path, interval
        self.stopped = threading.Event()
        self._seen = file_stamp(path)
        self._retired: list[tuple[float, Engine]] = []

    def run(self) -> None:
        published = time.monotonic()
        while not self.stopped.wait(self.interval):
            self.close_retired(older_than=RETIRE_SECONDS)
            stamp = file_stamp(self.path)
            if stamp != self._seen:
                self._seen = stamp
                self.reload()
                published = time.monotonic()
            elif time.monotonic() - published >= BUDGET_REFRESH_SECONDS:
                publish_metrics(self.state)
                published = time.monotonic()

    def close_retired(self, older_than: float = 0.0) -> None:
        """Close engines replaced by a reload at least ``older_than`` seconds ago."""
        now = time.monotonic()
        for item in [r for r in self._retired if now - r[0] >= older_than]:
            self._retired.remove(item)
            item[1].close()

    def _record(self, **fields: object) -> None:
        """A policy reload in the audit trail (the officer's record of what went live, or did not)."""
        try:
            self.state.audit.append(event="policy_reload", policy=str(self.path), wait=False, **fields)
        except GatewayError as err:  # the log is closed or the disk refuses: the reload itself stands
            log.warning("policy reload not recorded in the audit log: %s", err.message)

    def reload(self) -> bool:
        """Try to load the file now; True when the new policy is live."""
        try:
            live = load_live(self.path, self.state.state_dir, self.state.engine_limits)
        except Exception as err:  # any failure keeps the last good policy live
            self.state.metrics.policy_reloads.labels("rejected").inc()
            reason = str(err).splitlines()[0][:500] if str(err) else type(err).__name__
            event(log, "policy_reload", f"policy reload rejected, keeping the last good policy: {err}",
                  logging.ERROR, policy=str(self.path), outcome="rejected", reason=reason)
            self._record(outcome="refused", reason=reason)
            return False
        old, self.state.live = self.state.live, live
        self.state.metrics.policy_reloads.labels("ok").inc()
        publish_metrics(self.state)
        changes = diff(old.loaded.policy, live.loaded.policy)[:200]
        event(log, "policy_reload", f"policy reloaded from {self.path} ({len(changes)} change(s))",
              policy=str(self.path), outcome="accepted", changes=changes)
        self._record(outcome="accepted", changes=changes)
        self._retired.append((time.monotonic(), old.engine))  # in-flight queries may still use it
        return True
