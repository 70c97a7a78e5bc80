"""Draw the README's picture of the officer's console: docs/images/console-budgets.png.

Synthetic data for one site (the example policy of north), a site serving it on loopback, a few
projects' queries (one refused for lack of budget), then `gateway console serve` on the site's
state dir, signed in with its one-time link, and the budgets page photographed in headless
Chromium (the Debian package `chromium`). Everything lives in a temporary folder.

    uv run --group dev python scripts/console_screenshot.py [--out docs/images/console-budgets.png]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from prometheus_client import CollectorRegistry

from gateway.auth import AuthConfig, Verifier, generate_dev_key, mint_dev_token
from gateway.client import Client
from gateway.demo.synth import synthesize
from gateway.errors import BudgetExhausted
from gateway.metrics import SiteMetrics
from gateway.proof import ProofKey
from gateway.site import SiteOptions, build_site_server

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
QUESTIONS = [  # (project, epsilon, SQL)
    ("onc-lung", 1.0, "SELECT stage, count(*) FROM patients GROUP BY stage"),
    ("onc-lung", 0.5, "SELECT avg(age_at_diagnosis) FROM patients WHERE stage = 'III'"),
    ("onc-lung", 1.0, "SELECT sex, count(*) FROM patients GROUP BY sex"),
    ("onc-breast", 0.5, "SELECT count(*) FROM patients WHERE sex = 'F'"),
    ("onc-breast", 1.0, "SELECT stage, avg(age_at_diagnosis) FROM patients GROUP BY stage"),
    ("demo", 1.0, "SELECT count(*) FROM treatments"),
    ("demo", 1.0, "SELECT stage, count(*) FROM patients GROUP BY stage"),
    ("demo", 0.5, "SELECT avg(age_at_diagnosis) FROM patients"),
    ("demo", 1.0, "SELECT sex, count(*) FROM patients GROUP BY sex"),  # refused: 0.5 left
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "console-budgets.png")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        (folder / "data").mkdir()
        synthesize("north", 5000, folder / "data" / "north.duckdb", seed=1)
        policy = folder / "north.yaml"
        shutil.copy(ROOT / "policies" / "north.yaml", policy)
        private, public = generate_dev_key(folder / "keys")
        proof = ProofKey.create(folder / "proof.pem")
        options = SiteOptions(policy, folder / "state", Verifier(AuthConfig.from_files([public])))
        site = build_site_server(options, SiteMetrics(CollectorRegistry()))
        try:
            for project, epsilon, sql in QUESTIONS:
                token = mint_dev_token(private.read_bytes(), "analyst-1", project, "researcher", proof_jkt=proof.jkt)
                with (Client(site.target, token=token, proof_key=proof, retries=0, sign_for=["north"]) as client,
                      contextlib.suppress(BudgetExhausted)):  # the last of demo's questions: over its budget
                    client.query(sql, epsilon=epsilon)
            _photograph(policy, folder / "state", args.out)
        finally:
            site.stop(grace=0)
    print(f"wrote {args.out}")
    return 0


def _photograph(policy: Path, state_dir: Path, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    console = subprocess.Popen([sys.executable, "-m", "gateway.cli", "console", "serve", "--policy", str(policy),
                                "--state-dir", str(state_dir), "--port", "0"], stdout=subprocess.PIPE, text=True)
    try:
        assert console.stdout is not None
        said = [console.stdout.readline() for _ in range(3)]
        link = next(line for line in said if line.startswith("one-time sign-in link")).rsplit(" ", 1)[1].strip()
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.goto(link)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        console.terminate()
        console.wait(timeout=20)


if __name__ == "__main__":
    sys.exit(main())
