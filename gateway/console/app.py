"""The console's web app: read-only pages for one site's privacy officer (Starlette, Jinja2, no script).

Pages: budgets (every project on every population, and population caps: limit, spent, remaining,
period, a burn-down chart with its table), the audit trail (filters, search, pages, whether the
chain verifies), the live policy (what each project may do and what it costs) and the policy
reloads with their diffs. Every page but sign-in needs a session (:mod:`._sessions`). Every
response carries security headers: a content security policy that allows no script and no
framing, and ``no-store`` for pages (they show audit data). Nothing here writes to the state dir.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.templating import Jinja2Templates

from ..auth import Verifier
from ._filters import BadParameter
from ._pages import Pages
from ._readers import AuditReader, ConsoleDataError, PolicyReader
from ._sessions import Sessions, SignInLinks
from ._signin import SignIn

log = logging.getLogger("gateway.console")
HERE = Path(__file__).parent
HEADERS = {
    "content-security-policy": "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
    "x-frame-options": "DENY",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
}
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]


@dataclass
class Console:
    """What the pages read from and who may see them."""

    policy: PolicyReader
    state_dir: Path
    verifier: Verifier | None  # None: token sign-in is off (a loopback console with only its link)
    links: SignInLinks | None  # None: no sign-in link (a console not bound to loopback)
    secure: bool = False  # served over TLS: cookies are Secure
    sessions: Sessions = field(default_factory=Sessions)
    audit: AuditReader = field(init=False)

    def __post_init__(self) -> None:
        self.audit = AuditReader(self.state_dir)

    @property
    def cookie(self) -> str:
        """The session cookie's name (``__Host-`` over TLS: the browser keeps it to this host and path /)."""
        return "__Host-console_session" if self.secure else "console_session"


def build_app(console: Console) -> Starlette:
    """The console's ASGI app."""
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.filters["eps"] = lambda value: f"{float(value):.4g}"
    templates.env.filters["pct"] = lambda value: f"{100 * float(value):.0f}%"
    pages = Pages(console, templates)
    sign_in = SignIn(console, pages)

    async def bad_parameter(request: Request, exc: Exception) -> Response:
        return pages.error(request, 400, "Bad request", str(exc))

    async def data_error(request: Request, exc: Exception) -> Response:
        return pages.error(request, 503, "The site's state cannot be read", str(exc))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        if exc.status_code == 303:  # no session: sign in first
            return RedirectResponse("/sign-in", 303)
        titles = {404: "Not found", 405: "Method not allowed", 413: "Too large", 415: "Unsupported form"}
        return pages.error(request, exc.status_code, titles.get(exc.status_code, "Request refused"), exc.detail)

    async def server_error(request: Request, exc: Exception) -> Response:
        log.exception("console: %s %s failed", request.method, request.url.path)
        return pages.error(request, 500, "Something went wrong", "The console could not show this page; its log "
                                                                   "says why.")

    routes = [
        Route("/", pages.home), Route("/budgets", pages.budgets), Route("/audit", pages.audit),
        Route("/policy", pages.policy), Route("/reloads", pages.reloads),
        Route("/sign-in", sign_in.form, methods=["GET"]), Route("/sign-in", sign_in.submit, methods=["POST"]),
        Route("/sign-in/link", sign_in.link), Route("/sign-out", sign_in.sign_out, methods=["POST"]),
        Mount("/static", StaticFiles(directory=str(HERE / "static")), name="static"),
    ]
    app = Starlette(routes=routes, exception_handlers={
        BadParameter: bad_parameter, ConsoleDataError: data_error, HTTPException: http_error,
        Exception: server_error})
    app.add_middleware(SecurityHeaders)
    return app


class SecurityHeaders:
    """Adds :data:`HEADERS` to every response, and ``no-store`` to every page (not to the stylesheet)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        static = str(scope.get("path", "")).startswith("/static/")

        async def with_headers(message: MutableMapping[str, Any]) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers += [(k.encode(), v.encode()) for k, v in HEADERS.items()]
                if not static:
                    headers.append((b"cache-control", b"no-store"))
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)
