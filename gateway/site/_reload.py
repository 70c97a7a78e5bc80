"""Loading a policy into a live engine, and reloading it when the file changes."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .._engine import Engine, file_stamp
from ..audit import AuditLog
from ..errors import GatewayError
from ..metrics import SiteMetrics
from ..policy import LoadedPolicy, PolicyFileError, load_policy
from ..render import diff
from ..templates import validate_templates

log = logging.getLogger("gateway.site")
RETIRE_SECONDS = 30.0


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


def load_live(path: Path, state_dir: Path) -> Live:
    """Load and fully validate a policy and prepare its data; raises on any problem."""
    loaded = load_policy(path)
    problems = validate_templates(loaded)
    if problems:
        raise PolicyFileError(problems)
    engine = Engine(loaded, state_dir)
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
        while not self.stopped.wait(self.interval):
            self.close_retired(older_than=RETIRE_SECONDS)
            stamp = file_stamp(self.path)
            if stamp != self._seen:
                self._seen = stamp
                self.reload()

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
            live = load_live(self.path, self.state.state_dir)
        except Exception as err:  # any failure keeps the last good policy live
            log.error("policy reload rejected, keeping the last good policy: %s", err)
            self.state.metrics.policy_reloads.labels("rejected").inc()
            self._record(outcome="refused", reason=str(err).splitlines()[0][:500] if str(err) else type(err).__name__)
            return False
        old, self.state.live = self.state.live, live
        log.info("policy reloaded from %s", self.path)
        self.state.metrics.policy_reloads.labels("ok").inc()
        self._record(outcome="accepted", changes=diff(old.loaded.policy, live.loaded.policy)[:200])
        self._retired.append((time.monotonic(), old.engine))  # in-flight queries may still use it
        return True
