"""The console end to end in a real browser: headless Chromium driven by Playwright against a real
``gateway console serve`` process reading a serving site's state dir.

Every page is visited, and a screenshot of each is kept under ``$GATEWAY_SCREENSHOTS`` (default:
``.screenshots/console`` in the repository, which git ignores). Chromium is the Debian package
``chromium`` (Playwright's own browser download is not used); without it these tests are skipped.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.console.conftest import Served
from tests.helpers.cli import GATEWAY

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parents[2]
SHOTS = Path(os.environ.get("GATEWAY_SCREENSHOTS", ROOT / ".screenshots" / "console"))

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not CHROMIUM.exists(), reason="no headless Chromium at /usr/bin/chromium "
                                                               "(install the Debian package chromium)")]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 900}, java_script_enabled=False)
    yield context.new_page()
    context.close()


@pytest.fixture
def console(served: Served, keys: tuple[Path, Path]) -> Iterator[tuple[str, str]]:
    """A ``gateway console serve`` process on a free loopback port: its URL and its one-time link."""
    proc = subprocess.Popen([*GATEWAY, "console", "serve", "--policy", str(served.policy), "--state-dir",
                             str(served.state_dir), "--port", "0", "--trusted-key", str(keys[1])],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        said = [proc.stdout.readline() for _ in range(2)]
        assert said[0].startswith(f"console of site {served.site.state.live.loaded.policy.site} on http://"), said
        url = said[0].split(" on ")[1].split()[0]
        link = said[1].rsplit(" ", 1)[1].strip()
        assert link.startswith(f"{url}/sign-in/link?code="), said
        yield url, link
    finally:
        proc.terminate()
        proc.wait(timeout=20)


def shot(page: Any, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def test_every_page_in_chromium_after_the_one_time_link(page: Any, console: tuple[str, str]) -> None:
    url, link = console
    page.goto(link)
    assert page.url == f"{url}/budgets"
    assert page.get_by_role("heading", level=1).inner_text() == "Budgets"
    tight = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="tight"))
    assert tight.get_by_role("cell").all_inner_texts()[1:4] == ["1", "0.8", "0.2"]
    assert page.get_by_role("img", name="Remaining budget of tight on patients").is_visible()
    page.get_by_text("The charges as a table (2)").first.click()
    assert page.get_by_role("table", name="Charges on this budget in the window in force").first.is_visible()
    shot(page, "budgets")

    page.get_by_role("link", name="Audit trail").click()
    assert "Chain intact" in page.locator("#chain").inner_text()
    page.get_by_label("Project").fill("tight")
    page.get_by_label("Outcome").select_option("budget_exhausted")
    page.get_by_role("button", name="Filter").click()
    assert page.locator("#count").inner_text().startswith("1 of ")
    assert "requested epsilon 0.4" in page.get_by_role("table", name="Audit records, newest first").inner_text()
    shot(page, "audit")

    page.get_by_role("link", name="Policy").click()
    assert page.get_by_role("heading", name="What each project may do, and what it costs").is_visible()
    shot(page, "policy")

    page.get_by_role("link", name="Reloads").click()
    assert page.get_by_role("heading", level=1).inner_text() == "Policy reloads"
    shot(page, "reloads")

    page.get_by_role("button", name="Sign out").click()
    assert page.url == f"{url}/sign-in"
    page.goto(f"{url}/audit")
    assert page.url == f"{url}/sign-in"
    response = page.goto(link)
    assert response.status == 403 and "does not work" in page.get_by_role("heading", level=1).inner_text()
    shot(page, "link-used")


def test_an_officer_signs_in_with_a_token_in_chromium(page: Any, console: tuple[str, str],
                                                      officer_token: Callable[..., str]) -> None:
    url, _ = console
    page.goto(f"{url}/budgets")
    assert page.url == f"{url}/sign-in"
    page.get_by_label("Token").fill(officer_token(role="researcher"))
    page.get_by_role("button", name="Sign in").click()
    assert "Role 'researcher' may not use this console" in page.get_by_role("alert").inner_text()
    shot(page, "sign-in-refused")
    page.get_by_label("Token").fill(officer_token())
    page.get_by_role("button", name="Sign in").click()
    assert page.url == f"{url}/budgets"
    assert "Signed in: priya (officer)" in page.get_by_role("banner").inner_text()


def test_the_keyboard_reaches_the_skip_link_first_and_it_moves_to_the_content(page: Any,
                                                                            console: tuple[str, str]) -> None:
    url, link = console
    page.goto(link)
    page.keyboard.press("Tab")
    focused = page.evaluate("document.activeElement.textContent")
    assert focused == "Skip to main content"
    page.keyboard.press("Enter")
    assert page.url.endswith("#main")
    for path in ("/budgets", "/audit", "/policy", "/reloads"):
        page.goto(f"{url}{path}")
        unlabelled = page.locator("input:not([type=hidden]):not([id]), select:not([id]), textarea:not([id])")
        assert unlabelled.count() == 0, path
        assert page.locator("html").get_attribute("lang") == "en"


def test_the_console_shows_new_charges_while_the_site_serves(page: Any, console: tuple[str, str], served: Served,
                                                            token: Callable[..., str]) -> None:
    from tests.helpers.servers import client

    _, link = console
    page.goto(link)
    before = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="onc-test"))
    assert before.get_by_role("cell").all_inner_texts()[2] == "0.5"
    with client(served.site, token, project="onc-test") as c:
        c.query("SELECT count(*) FROM patients", epsilon=0.25)
    started = time.monotonic()
    page.reload()
    after = page.get_by_role("row").filter(has=page.get_by_role("rowheader", name="onc-test"))
    assert after.get_by_role("cell").all_inner_texts()[2] == "0.75"
    assert time.monotonic() - started < 10
