"""A real site that has served and charged queries, and a console over its state dir.

The console reads the state dir of a site that is still serving; its officers sign in with tokens
signed by a key generated for the test session, as the site's researchers do.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from starlette.testclient import TestClient

from gateway.auth import ROLE_CLAIM, AuthConfig, Verifier
from gateway.console import Console, build_app
from gateway.console._readers import PolicyReader
from gateway.console._sessions import SignInLinks
from gateway.errors import BudgetExhausted
from gateway.site import RunningSite
from tests.helpers.policies import write_policy
from tests.helpers.servers import client
from tests.helpers.tokens import DROP, claims, sign


@dataclass
class Served:
    """A serving site after a few queries: tight spent 0.8 of 1 (one refusal), onc-test spent 0.5."""

    site: RunningSite
    policy: Path
    state_dir: Path


def run_queries(site: RunningSite, token: Callable[..., str]) -> None:
    with client(site, token, project="tight", subject="dr-who") as c:
        c.query("SELECT stage, count(*) FROM patients GROUP BY stage", epsilon=0.4)
        c.query("SELECT count(*) FROM treatments", epsilon=0.4)
        with pytest.raises(BudgetExhausted):
            c.query("SELECT count(*) FROM patients WHERE sex = 'F'", epsilon=0.4)
    with client(site, token, project="onc-test", subject="alice") as c:
        c.query("SELECT avg(age_at_diagnosis) FROM patients", epsilon=0.5)


@pytest.fixture
def served(start_site: Callable[..., RunningSite], token: Callable[..., str], tmp_path: Path,
           site_data: Path) -> Served:
    policy = write_policy(tmp_path, site_data)
    site = start_site(policy=policy)
    run_queries(site, token)
    return Served(site, policy, site.state.state_dir)


@pytest.fixture
def officer_verifier(keys: tuple[Path, Path]) -> Verifier:
    """The site's verifier as the console builds it: officers' tokens need no project claim."""
    return Verifier(dataclasses.replace(AuthConfig.from_files([keys[1]]), required_claims=("sub", ROLE_CLAIM)))


@pytest.fixture
def officer_token(keys: tuple[Path, Path]) -> Callable[..., str]:
    private = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)

    def mint(role: str = "officer", subject: str = "priya", **overrides: Any) -> str:
        return sign(private, payload=claims(sub=subject, role=role, project=DROP, **overrides))
    return mint


@pytest.fixture
def make_console(served: Served, officer_verifier: Verifier) -> Callable[..., Console]:
    def make(links: SignInLinks | None = None, verifier: Verifier | None = officer_verifier,
             **fields: Any) -> Console:
        return Console(PolicyReader(served.policy), served.state_dir, verifier, links, **fields)
    return make


@pytest.fixture
def browse(make_console: Callable[..., Console]) -> Callable[..., TestClient]:
    """A web client of a new console (``follow_redirects=False``: tests see each redirect)."""
    def open_client(console: Console | None = None) -> TestClient:
        return TestClient(build_app(console or make_console(SignInLinks())), follow_redirects=False)
    return open_client


def form_token(page: str) -> str:
    found = re.search(r'name="form_token" value="([^"]+)"', page)
    assert found, "no form token in the page"
    return found.group(1)


def sign_in(web: TestClient, token: str) -> Any:
    """Post ``token`` through the sign-in form as a browser would; returns the response."""
    page = web.get("/sign-in")
    return web.post("/sign-in", data={"form_token": form_token(page.text), "token": token})
