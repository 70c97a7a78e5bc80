"""Who is signed in to the console: one-time sign-in links, server-side sessions, form tokens.

There are no default credentials. An officer signs in with a token from the site's identity
provider (checked by the site's verifier, carrying one of the policy's ``officer_roles``), or,
on a loopback console, with the one-time link printed at start (single use, expires in minutes).
Either gives a server-side session: the cookie holds only a random id (the server keeps its
SHA-256), lives at most :data:`SESSION_SECONDS` and never beyond the token's ``exp``, and signing
out ends it on the server. Forms that change who is signed in carry a per-form token compared in
constant time (the cookies are also ``SameSite=Strict``), so another site cannot post them.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass

SESSION_SECONDS = 30 * 60
LINK_SECONDS = 10 * 60
MAX_SESSIONS = 1000
SIGN_IN_FAILURES_PER_MINUTE = 20  # over all callers: pasted tokens are checked, not guessed at


@dataclass(frozen=True)
class Session:
    """A signed-in officer: who, with which role, how they signed in, until when, and their form token."""

    subject: str
    role: str
    via: str  # "token" or "link"
    expires: float
    form_token: str


def _digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class SignInLinks:
    """One-time sign-in codes: each is good once, for :data:`LINK_SECONDS`."""

    def __init__(self, seconds: float = LINK_SECONDS) -> None:
        self.seconds = seconds
        self._codes: list[tuple[str, float]] = []  # (digest, expiry)
        self._lock = threading.Lock()

    def issue(self) -> str:
        """A new code (only its digest is kept)."""
        code = secrets.token_urlsafe(32)
        with self._lock:
            self._codes.append((_digest(code), time.monotonic() + self.seconds))
        return code

    def redeem(self, code: str) -> bool:
        """True once for a code issued here and not expired; it is spent either way."""
        wanted, now = _digest(code), time.monotonic()
        with self._lock:
            found = None
            for item in self._codes:  # every code is compared, in constant time each
                if hmac.compare_digest(item[0], wanted):
                    found = item
            if found is None:
                return False
            self._codes.remove(found)
            self._codes = [item for item in self._codes if item[1] > now]
            return found[1] > now


class Sessions:
    """Server-side sessions by the SHA-256 of their cookie's random id."""

    def __init__(self, seconds: float = SESSION_SECONDS, limit: int = MAX_SESSIONS) -> None:
        self.seconds, self.limit = seconds, limit
        self._sessions: OrderedDict[str, Session] = OrderedDict()
        self._failures: deque[float] = deque()
        self._lock = threading.Lock()

    def start(self, subject: str, role: str, via: str, until: float | None = None) -> tuple[str, Session]:
        """A new session (ending at ``until``, epoch seconds, if sooner) and its cookie value."""
        now = time.time()
        expires = min(now + self.seconds, until if until is not None else now + self.seconds)
        session = Session(subject, role, via, expires, secrets.token_urlsafe(24))
        cookie = secrets.token_urlsafe(32)
        with self._lock:
            self._sessions[_digest(cookie)] = session
            while len(self._sessions) > self.limit:
                self._sessions.popitem(last=False)
        return cookie, session

    def get(self, cookie: str | None) -> Session | None:
        """The live session a cookie names (None: none, or expired)."""
        if not cookie or len(cookie) > 100:
            return None
        key = _digest(cookie)
        with self._lock:
            session = self._sessions.get(key)
            if session is not None and session.expires <= time.time():
                del self._sessions[key]
                return None
            return session

    def end(self, cookie: str | None) -> None:
        """Sign the session's officer out (idempotent)."""
        if cookie:
            with self._lock:
                self._sessions.pop(_digest(cookie), None)

    def failed_sign_in(self) -> bool:
        """Count a failed sign-in; True when too many failed in the last minute (refuse for a while)."""
        now = time.monotonic()
        with self._lock:
            while self._failures and self._failures[0] < now - 60:
                self._failures.popleft()
            self._failures.append(now)
            return len(self._failures) > SIGN_IN_FAILURES_PER_MINUTE

    def throttled(self) -> bool:
        """Whether sign-in is refused for now after too many failures."""
        now = time.monotonic()
        with self._lock:
            return sum(1 for t in self._failures if t >= now - 60) > SIGN_IN_FAILURES_PER_MINUTE


def same_token(given: str | None, expected: str | None) -> bool:
    """Whether a form's token is the one expected (constant time; both must be present)."""
    return bool(given) and bool(expected) and hmac.compare_digest(str(given), str(expected))
