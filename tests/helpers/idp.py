"""An identity provider's JWKS endpoint on a loopback port, in a thread, whose keys a test rotates.

It serves ``GET /jwks`` with the public halves of the keys it publishes, counts every fetch, and
can be stopped and started again on the same port (the provider going down and coming back).
A test can also make it misbehave: another status, another body, a ``Cache-Control`` header, a
delay before answering, or a body dripped out slowly.
"""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from tests.helpers.tokens import claims


class IdentityProvider:
    """A JWKS endpoint (``url``) publishing the keys given to :meth:`publish`; ``fetches`` counts GETs."""

    def __init__(self) -> None:
        self.keys: dict[str, Any] = {}  # kid -> private key (only the public half is served)
        self.status = 200
        self.body: bytes | None = None  # served instead of the key set when set
        self.cache_control: str | None = None
        self.delay = 0.0  # seconds before answering
        self.drip = 0.0  # seconds between bytes of the body
        self.location: str | None = None  # a Location header (for redirects)
        self._fetches = 0
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/jwks"

    @property
    def fetches(self) -> int:
        with self._lock:
            return self._fetches

    def publish(self, keys: dict[str, Any]) -> None:
        """Serve exactly these keys (kid -> private key) from now on."""
        self.keys = dict(keys)

    def document(self) -> bytes:
        """The JWKS document served now."""
        out = []
        for kid, private in self.keys.items():
            jwk = json.loads(jwt.algorithms.get_default_algorithms()[algorithm(private)].to_jwk(private.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig"})
        return json.dumps({"keys": out}).encode()

    def sign(self, kid: str, **overrides: Any) -> str:
        """A token with the dev claims (and ``overrides``) signed by the key published as ``kid``."""
        private = self.keys[kid]
        return jwt.encode(claims(**overrides), private, algorithm=algorithm(private), headers={"kid": kid})

    def start(self) -> IdentityProvider:
        """Listen (again) on ``port`` (a fresh port the first time)."""
        provider = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                with provider._lock:
                    provider._fetches += 1
                time.sleep(provider.delay)
                body = provider.body if provider.body is not None else provider.document()
                self.send_response(provider.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                if provider.cache_control:
                    self.send_header("Cache-Control", provider.cache_control)
                if provider.location:
                    self.send_header("Location", provider.location)
                self.end_headers()
                try:
                    if provider.drip:
                        for byte in body:
                            self.wfile.write(bytes([byte]))
                            self.wfile.flush()
                            time.sleep(provider.drip)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up, as it should with a slow provider

            def log_message(self, format: str, *args: Any) -> None:  # silence: a test needs no access log
                pass

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        self.port = server.server_address[1]
        self._server = server
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop listening: the provider is down (connections are refused)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def algorithm(private: Any) -> str:
    """The algorithm a key of this type signs with here."""
    if isinstance(private, rsa.RSAPrivateKey):
        return "RS256"
    if isinstance(private, ed25519.Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(private, ec.EllipticCurvePrivateKey):
        return "ES256"
    raise TypeError(f"unsupported key {type(private).__name__}")
