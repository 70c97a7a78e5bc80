"""The privacy officer's web console (``gateway console serve``): one site's budgets, audit, policy, reloads.

Read-only, server-rendered pages (:mod:`.app`) over the site's state dir and policy file, never
blocking the running site (:mod:`._readers`). Officers sign in with a token from the site's
identity provider carrying one of the policy's ``officer_roles``, or, on loopback, with a one-time
link printed at start (:mod:`._sessions`). Needs the ``console`` extra (Starlette, Jinja2, uvicorn).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path

from .._server import is_loopback, target_of
from ..auth import Verifier
from ._readers import PolicyReader
from ._sessions import SignInLinks
from .app import Console, build_app

__all__ = ["Console", "ConsoleServer", "build_app", "open_console"]


@dataclass
class ConsoleServer:
    """A console bound to its socket, not yet serving: its URL and, on loopback, its one-time sign-in link."""

    console: Console
    sock: socket.socket
    url: str
    tls: tuple[Path, Path] | None

    @property
    def port(self) -> int:
        """The bound port."""
        return int(self.sock.getsockname()[1])

    def sign_in_link(self) -> str | None:
        """A new one-time sign-in link (None when the console is not on loopback)."""
        links = self.console.links
        return None if links is None else f"{self.url}/sign-in/link?code={links.issue()}"

    def serve(self) -> None:
        """Serve until SIGINT or SIGTERM (uvicorn's own handling: in-flight pages finish)."""
        import uvicorn

        config = uvicorn.Config(build_app(self.console), log_level="warning", lifespan="off", server_header=False,
                                proxy_headers=False, access_log=False,
                                ssl_certfile=str(self.tls[0]) if self.tls else None,
                                ssl_keyfile=str(self.tls[1]) if self.tls else None)
        uvicorn.Server(config).run(sockets=[self.sock])


def open_console(policy: Path, state_dir: Path, verifier: Verifier | None, host: str = "127.0.0.1",
                 port: int = 0, tls: tuple[Path, Path] | None = None) -> ConsoleServer:
    """Check the setup and bind the console's socket.

    Raises ValueError when it may not serve as asked: a non-loopback address without TLS, or no way
    to sign in (no token keys, and not on loopback where the one-time link works). A policy that
    does not load raises :class:`~gateway.policy.PolicyFileError`.
    """
    loopback = is_loopback(host)
    if not loopback and tls is None:
        raise ValueError(f"{host} is not a loopback address: the console serves other hosts only over TLS "
                         "(give --tls-cert and --tls-key)")
    if verifier is None and not loopback:
        raise ValueError("no token keys: officers on other hosts sign in with a token; pass --trusted-key, --jwks "
                         "or --jwks-url")
    if not state_dir.is_dir():
        raise ValueError(f"no state dir at {state_dir}: give the --state-dir the site serves with")
    reader = PolicyReader(policy)
    console = Console(reader, state_dir, verifier, SignInLinks() if loopback else None, secure=tls is not None)
    bind = host.strip("[]")
    family = socket.AF_INET6 if ":" in bind else socket.AF_INET
    sock = socket.create_server(("localhost" if bind == "localhost" else bind, port), family=family)
    bound = int(sock.getsockname()[1])
    url = f"{'https' if tls else 'http'}://{target_of(bind, bound)}"
    return ConsoleServer(console, sock, url, tls)
