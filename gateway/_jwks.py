"""Token signing keys from an identity provider's JWKS URL, cached and rotated (DESIGN §9).

Hospitals' identity providers (OIDC) publish their signing keys at a JWKS URL and rotate them.
:class:`RemoteKeys` fetches that document when the server starts and keeps the keys:

- They go stale after the response's ``Cache-Control: max-age``, clamped to
  ``[min_ttl, max_ttl]`` (``default_ttl`` without one). A call that finds them stale starts a
  refresh in the background and is verified with the cached keys meanwhile. A failed refresh
  keeps the cached keys and logs a warning: an outage of the provider does not lock out
  researchers whose keys are known. A key the provider drops is refused once a refresh sees it gone.
- A token naming a key id that is not cached (the provider has rotated) makes the call wait for
  a fetch: at most one fetch runs at a time, and every call that needs it waits for that one
  (single flight). A fetch *starts* at most once per ``min_interval``, whatever the number of
  distinct unknown key ids, so forged key ids cannot make a site hammer its provider; a token
  whose key id is still unknown is simply not verified.
- While no key set has ever been fetched (the server started with the provider unreachable),
  every lookup raises :class:`~gateway.errors.Unavailable`, and a fetch is retried at most once
  per ``min_interval`` until the provider answers.

The URL must be https (http only for a loopback host: development and tests). Redirects are not
followed, and a fetch has an overall deadline and a size limit. PyJWT's ``PyJWKSet`` parses the
document. PyJWT's ``PyJWKClient`` (2.15) is not used: it fetches while holding the one lock that
every lookup takes (a slow provider stalls every call), reads a response of any size, stops
serving its keys once their TTL has passed and a refresh fails, ignores ``Cache-Control`` and
accepts http to any host.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import jwt

from ._version import __version__
from .errors import Unavailable

log = logging.getLogger("gateway.auth.jwks")
K = TypeVar("K")


@dataclass(frozen=True)
class JwksRefresh:
    """How keys from a JWKS URL are cached and refreshed (seconds; bytes)."""

    default_ttl: float = 300.0  # without Cache-Control max-age
    min_ttl: float = 60.0
    max_ttl: float = 3600.0  # a key the provider drops (e.g. compromised) is refused within this
    min_interval: float = 30.0  # fetches start at most this often, whatever the unknown key ids
    timeout: float = 5.0  # the whole fetch, connection to last byte
    max_bytes: int = 512 * 1024  # real key sets are a few KiB

    def __post_init__(self) -> None:
        for name in ("default_ttl", "min_ttl", "max_ttl", "min_interval", "timeout"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise ValueError(f"JWKS refresh: {name} must be a positive number of seconds, got {value!r}")
        if not self.min_ttl <= self.default_ttl <= self.max_ttl:
            raise ValueError("JWKS refresh: need min_ttl <= default_ttl <= max_ttl")
        if self.max_bytes <= 0:
            raise ValueError("JWKS refresh: max_bytes must be positive")

    def ttl(self, cache_control: str | None) -> float:
        """How long a key set stays fresh: its ``max-age`` (0 for no-store/no-cache) within the bounds."""
        max_age: float | None = None
        for directive in (cache_control or "").split(","):
            name, _, value = directive.strip().partition("=")
            if name.lower() in ("no-store", "no-cache"):
                max_age = 0
                break
            if name.lower() == "max-age" and value.strip('"').isdigit():
                max_age = int(value.strip('"'))
        chosen = self.default_ttl if max_age is None else max_age
        return min(max(chosen, self.min_ttl), self.max_ttl)


def check_url(url: str) -> str:
    """``url`` if keys may be fetched from it: https, or http to a loopback host; else ValueError."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
    except ValueError as err:
        raise ValueError(f"bad JWKS URL {url!r}: {err}") from None
    if parts.scheme not in ("https", "http") or not host:
        raise ValueError(f"bad JWKS URL {url!r}: use https://HOST/PATH")
    if parts.scheme == "http" and not _loopback(host):
        raise ValueError(f"refusing JWKS URL {url!r}: keys must come over https (http only for a loopback host)")
    if parts.username or parts.password:
        raise ValueError(f"refusing JWKS URL {url!r}: no credentials in the URL")
    return url


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _FetchError(Exception):
    """A fetch failed; the message says why (for the log, never for a caller)."""


class RemoteKeys(Generic[K]):
    """The signing keys published at a JWKS URL, by key id, cached and rotated as the module says.

    ``usable`` turns a parsed JWK's key into a trusted key, or None for one the verifier cannot
    pin an algorithm for (such keys are skipped, as are encryption keys and keys without a kid).
    """

    def __init__(self, url: str, rules: JwksRefresh, usable: Callable[[object], K | None]) -> None:
        self.url = check_url(url)
        self.rules = rules
        self._usable = usable
        self._keys: Mapping[str, K] = {}  # replaced whole, never changed in place: read without the lock
        self._loaded = False
        self._fresh_until = -math.inf
        self._last_start = -math.inf
        self._lock = threading.Lock()
        self._flight: threading.Event | None = None  # set when the running fetch ends

    def start(self) -> bool:
        """Fetch the keys once, waiting for the answer; whether a key set is now held.

        A failure is logged (with the fact that calls get UNAVAILABLE until the provider answers);
        the caller starts serving either way.
        """
        self._refresh(wait=True)
        return self._loaded

    def key(self, kid: str) -> K | None:
        """The key with this id, fetching (see the module) when it is not cached; None if unknown.

        Raises :class:`~gateway.errors.Unavailable` while no key set has ever been fetched.
        """
        found = self.held().get(kid)
        if found is not None:
            return found
        self._refresh(wait=True)  # joins the fetch held() may just have started
        if not self._loaded:
            raise Unavailable(f"identity provider unreachable: cannot fetch keys from {self.url}; retry later")
        return self._keys.get(kid)

    def held(self) -> Mapping[str, K]:
        """The key set held now, by key id; never waits, but a stale set starts a refresh in the background."""
        if time.monotonic() >= self._fresh_until:
            self._refresh(wait=False)
        return self._keys

    def _refresh(self, wait: bool) -> None:
        """Start a fetch unless one runs or one started under ``min_interval`` ago; wait for it if asked."""
        with self._lock:
            flight = self._flight
            if flight is None:
                now = time.monotonic()
                if now - self._last_start < self.rules.min_interval:
                    return
                self._last_start = now
                flight = self._flight = threading.Event()
                threading.Thread(target=self._fetch, args=(flight,), name="jwks-fetch", daemon=True).start()
        if wait:
            flight.wait(self.rules.timeout + 1.0)

    def _fetch(self, flight: threading.Event) -> None:
        try:
            body, cache_control = _download(self.url, self.rules.timeout, self.rules.max_bytes)
            keys = self._select(_parse(body))
            ttl = self.rules.ttl(cache_control)
        except Exception as err:  # any failure of this worker is a failed fetch, logged
            self._failed(err)
        else:
            self._keys, self._loaded = keys, True
            self._fresh_until = time.monotonic() + ttl
            log.info("fetched %d signing key(s) from %s (fresh for %.0f s): %s", len(keys), self.url, ttl,
                     ", ".join(sorted(keys)))
        finally:
            with self._lock:
                self._flight = None
            flight.set()

    def _failed(self, err: Exception) -> None:
        reason = str(err) if isinstance(err, _FetchError) else f"{type(err).__name__}: {err}"
        if self._loaded:
            log.warning("could not refresh token keys from %s (%s); keeping the %d cached key(s)", self.url,
                        reason, len(self._keys))
        else:
            log.warning("identity provider unreachable: cannot fetch keys from %s (%s); serving anyway, but "
                        "every call is refused as UNAVAILABLE until it answers (retried at most every %g s)",
                        self.url, reason, self.rules.min_interval)

    def _select(self, jwks: list[jwt.PyJWK]) -> dict[str, K]:
        keys: dict[str, K] = {}
        skipped: list[str] = []
        for jwk in jwks:
            signing = isinstance(jwk.key_id, str) and jwk.key_id and jwk.public_key_use in (None, "sig")
            key = self._usable(jwk.key) if signing else None
            if key is None:
                skipped.append(f"{jwk.key_id or 'no kid'} ({jwk.key_type}, use {jwk.public_key_use or '-'})")
            else:
                keys[str(jwk.key_id)] = key
        if skipped:
            log.info("%s: skipped keys the gateway does not verify with: %s", self.url, "; ".join(skipped))
        if not keys:
            raise _FetchError("no usable signing key (RSA, EC P-256/384/521 or Ed25519 public keys with a kid)")
        return keys


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Redirects are refused: the https-only check applies to the URL configured, not to where it points."""

    def redirect_request(self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str) -> None:
        raise _FetchError(f"redirected to {newurl} (HTTP {code}); configure the final URL")


def _download(url: str, timeout: float, max_bytes: int) -> tuple[bytes, str | None]:
    """The body and Cache-Control of a 200 answer at ``url``, within ``timeout`` and ``max_bytes``."""
    deadline = time.monotonic() + timeout
    opener = urllib.request.build_opener(_NoRedirects())
    request = urllib.request.Request(url, headers={"Accept": "application/json",
                                                   "User-Agent": f"gateway/{__version__}"})
    try:
        with opener.open(request, timeout=timeout) as response:
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise _FetchError(f"response of {length} bytes is over the {max_bytes}-byte limit")
            body = bytearray()
            while chunk := response.read1(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise _FetchError(f"response is over the {max_bytes}-byte limit")
                if time.monotonic() > deadline:
                    raise _FetchError(f"response took longer than {timeout:g} s")
            return bytes(body), response.headers.get("Cache-Control")
    except urllib.error.HTTPError as err:
        err.close()
        raise _FetchError(f"HTTP {err.code} {err.reason}") from None
    except urllib.error.URLError as err:
        raise _FetchError(f"{err.reason}") from None
    except (OSError, ValueError) as err:  # timeouts, resets, malformed HTTP
        raise _FetchError(f"{type(err).__name__}: {err}") from None


def _parse(body: bytes) -> list[jwt.PyJWK]:
    try:
        document = json.loads(body)
    except (ValueError, RecursionError):
        raise _FetchError("response is not JSON") from None
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise _FetchError("response is not a JWKS document (an object with a 'keys' list)")
    try:
        return jwt.PyJWKSet(document["keys"]).keys
    except jwt.PyJWTError as err:
        raise _FetchError(f"unusable JWKS document ({err})") from None
