"""Signing in and out of the console: a pasted token, the one-time link, the session cookie.

See :mod:`._sessions` for what a session is. Every refusal is a page that says what to do; a
failed token sign-in is counted (too many in a minute are refused for a while) and logged with
why, while the page says only that the token is not valid here.
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl

import jwt
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from ..errors import Unauthenticated, Unavailable
from ._pages import Pages
from ._readers import utc
from ._sessions import same_token

if TYPE_CHECKING:
    from .app import Console

log = logging.getLogger("gateway.console")
MAX_FORM_BYTES = 16 * 1024
MAX_TOKEN_CHARS = 8192
FORM_COOKIE = "console_form"
LINK_SUBJECT = "sign-in link"


class SignIn:
    """The sign-in and sign-out handlers of one console."""

    def __init__(self, console: Console, pages: Pages) -> None:
        self.console, self.pages = console, pages

    async def form(self, request: Request, status: int = 200, problem: str = "") -> Response:
        """The sign-in page (with ``problem`` said at its top and ``status``, after a refused attempt)."""
        if status == 200 and self.pages.session(request) is not None:
            return RedirectResponse("/budgets", 303)
        form_token = request.cookies.get(FORM_COOKIE) or secrets.token_urlsafe(24)
        response = self.pages.render(request, "sign_in.html", status, current="sign-in", form_token=form_token,
                                     token_sign_in=self.console.verifier is not None,
                                     link_sign_in=self.console.links is not None, problem=problem)
        response.set_cookie(FORM_COOKIE, form_token, max_age=600, path="/", secure=self.console.secure,
                            httponly=True, samesite="strict")
        return response

    async def submit(self, request: Request) -> Response:
        """A pasted token: checked by the site's verifier, and its role must be an officer role."""
        form = await read_form(request)
        token = form.get("token", "").strip().removeprefix("Bearer ").strip()
        refused = await self._refused(request, form, token)
        if refused is not None:
            return refused
        verifier = self.console.verifier
        assert verifier is not None  # _refused says so without one
        try:
            identity = verifier.verify(f"Bearer {token}")
        except Unavailable:
            return self.pages.error(request, 503, "The identity provider cannot be reached",
                                    "The site's identity provider has not answered yet, so no token can be checked. "
                                    "Try again in a minute.")
        except Unauthenticated:
            self.console.sessions.failed_sign_in()
            return await self.form(request, 401, "The token is not valid here, or it has expired: get a fresh "
                                                 "token from your identity provider.")
        roles = self.console.policy.current()[0].policy.officer_roles
        if identity.role not in roles:
            self.console.sessions.failed_sign_in()
            log.warning("console: sign-in refused: %s has role %r, not an officer role", identity.subject,
                        identity.role)
            return await self.form(request, 403, f"Role {identity.role!r} may not use this console; the policy's "
                                                 f"officer roles are: {', '.join(roles) or 'none'}.")
        expires = jwt.decode(token, options={"verify_signature": False})["exp"]  # verified just now
        return self._start(identity.subject, identity.role, "token", float(expires))

    async def _refused(self, request: Request, form: dict[str, str], token: str) -> Response | None:
        """The page refusing a sign-in before its token is checked, if it must be refused."""
        if not same_token(form.get("form_token"), request.cookies.get(FORM_COOKIE)):
            return await self.form(request, 403, "This form has expired or was not sent from this console; "
                                                 "sign in again.")
        if self.console.verifier is None:
            return await self.form(request, 400, "Token sign-in is not configured on this console; use the "
                                                 "one-time link printed when it started.")
        if self.console.sessions.throttled():
            return self.pages.error(request, 429, "Too many failed sign-ins",
                                    "Too many sign-ins failed in the last minute. Wait a minute and try again.")
        if not token or len(token) > MAX_TOKEN_CHARS:
            return await self.form(request, 400, "Paste the token your identity provider issued to you.")
        return None

    async def link(self, request: Request) -> Response:
        """The one-time sign-in link printed at start (loopback only)."""
        code = request.query_params.get("code", "")
        links = self.console.links
        if links is None or len(code) > 100 or not links.redeem(code):
            return self.pages.error(request, 403, "This sign-in link does not work",
                                    "A sign-in link works once, for ten minutes. Sign in with a token, or restart "
                                    "the console for a new link.")
        return self._start(LINK_SUBJECT, "officer", "link", None)

    def _start(self, subject: str, role: str, via: str, until: float | None) -> Response:
        cookie, session = self.console.sessions.start(subject, role, via, until)
        log.info("console: %s (role %s) signed in with a %s, until %s", subject, role, via, utc(session.expires))
        response = RedirectResponse("/budgets", 303)
        response.set_cookie(self.console.cookie, cookie, max_age=max(1, int(session.expires - time.time())),
                            path="/", secure=self.console.secure, httponly=True, samesite="strict")
        response.delete_cookie(FORM_COOKIE, path="/")
        return response

    async def sign_out(self, request: Request) -> Response:
        """End the session (its form token must come with the form)."""
        form = await read_form(request)
        session = self.pages.session(request)
        if session is not None and not same_token(form.get("form_token"), session.form_token):
            return self.pages.error(request, 403, "Not signed out", "The sign-out form was not sent from this "
                                                                    "console's pages.")
        self.console.sessions.end(request.cookies.get(self.console.cookie))
        response = RedirectResponse("/sign-in", 303)
        response.delete_cookie(self.console.cookie, path="/", secure=self.console.secure, httponly=True,
                               samesite="strict")
        return response


async def read_form(request: Request) -> dict[str, str]:
    """A small url-encoded form posted by this console's own pages (another site's post is refused)."""
    if request.headers.get("sec-fetch-site", "same-origin") not in ("same-origin", "none"):
        raise HTTPException(403, "Forms are accepted only from this console's own pages.")
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/x-www-form-urlencoded":
        raise HTTPException(415, "Send the form as application/x-www-form-urlencoded.")
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_FORM_BYTES:
            raise HTTPException(413, f"A form may hold at most {MAX_FORM_BYTES // 1024} KiB.")
    try:
        return dict(parse_qsl(body.decode("utf-8"), keep_blank_values=True, max_num_fields=10))
    except (UnicodeDecodeError, ValueError):
        raise HTTPException(400, "The form could not be read.") from None
