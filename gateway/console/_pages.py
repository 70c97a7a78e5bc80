"""The console's read-only pages: budgets, audit trail, policy, reloads (each needs a session)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.templating import Jinja2Templates

from ..guarantee import describe
from ..policy import Policy
from ._charts import burn_down
from ._filters import AuditFilter, BadParameter, paginate
from ._readers import budgets, charged_projects, utc
from ._sessions import Session

if TYPE_CHECKING:
    from .app import Console


class Pages:
    """Renders the pages of one console."""

    def __init__(self, console: Console, templates: Jinja2Templates) -> None:
        self.console, self.templates = console, templates

    def render(self, request: Request, name: str, status: int = 200, **context: Any) -> Response:
        """``name`` rendered with what every page shows (site, session, a policy file that does not load)."""
        loaded, problem = self.console.policy.current()
        return self.templates.TemplateResponse(request, name, {
            "site": loaded.policy.site, "session": self.session(request), "policy_problem": problem, **context},
            status_code=status)

    def error(self, request: Request, status: int, title: str, message: str) -> Response:
        """A page that says what went wrong and what to do, with ``status``."""
        return self.render(request, "error.html", status, title=title, message=message, current="")

    def session(self, request: Request) -> Session | None:
        """The caller's live session, if any."""
        return self.console.sessions.get(request.cookies.get(self.console.cookie))

    def signed_in(self, request: Request) -> Session:
        """The caller's session; without one, the caller is sent to sign in."""
        session = self.session(request)
        if session is None:
            raise HTTPException(303, headers={"location": "/sign-in"})
        return session

    async def home(self, request: Request) -> Response:
        return RedirectResponse("/budgets", 303)

    async def budgets(self, request: Request) -> Response:
        self.signed_in(request)
        _no_parameters(request, "budgets")
        loaded, _ = self.console.policy.current()
        now = datetime.now(UTC)
        rows = budgets(self.console.state_dir, loaded.policy, now)
        charts = [burn_down(row, now.timestamp()) for row in rows]
        return self.render(request, "budgets.html", current="budgets", rows=list(zip(rows, charts, strict=True)),
                           now=utc(now.timestamp()))

    async def audit(self, request: Request) -> Response:
        self.signed_in(request)
        chosen = AuditFilter.parse(request.query_params.multi_items())
        snapshot = self.console.audit.snapshot()
        page = paginate(snapshot.records, chosen)
        values = {name: sorted({r[name] for r in snapshot.records if isinstance(r.get(name), str)})
                  for name in ("project", "event", "outcome")}
        return self.render(request, "audit.html", current="audit", chosen=chosen, page=page, values=values,
                           verification=snapshot.verification, total=len(snapshot.records))

    async def policy(self, request: Request) -> Response:
        self.signed_in(request)
        _no_parameters(request, "policy")
        loaded, _ = self.console.policy.current()
        policy = loaded.policy
        return self.render(request, "policy.html", current="policy", policy=policy, path=loaded.path,
                           guarantee=describe(policy), populations=policy.populations(),
                           projects=project_access(policy, charged_projects(self.console.state_dir)))

    async def reloads(self, request: Request) -> Response:
        self.signed_in(request)
        _no_parameters(request, "reloads")
        reloads = [r for r in self.console.audit.snapshot().records if r.get("event") == "policy_reload"]
        reloads.reverse()
        return self.render(request, "reloads.html", current="reloads", reloads=reloads)


def _no_parameters(request: Request, page: str) -> None:
    if request.query_params:
        raise BadParameter(f"the {page} page takes no parameters")


def project_access(policy: Policy, charged: list[str]) -> list[tuple[str, list[tuple[str, Any, Any]]]]:
    """Per project a rule names literally, or that has spent: each dataset it may query, its rule and limits."""
    projects = sorted({r.project for r in policy.budgets if not any(c in r.project for c in "*?[")} | set(charged))
    return [(project, [(name, rule, policy.epsilon_limits(name)) for name in policy.datasets
                       if (rule := policy.budget_rule(project, name)) is not None])
            for project in projects]
