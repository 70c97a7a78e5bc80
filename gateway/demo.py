"""``gateway demo``: synthetic registries, site gateways on loopback, dev tokens, a short tour."""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from pathlib import Path

from .auth import AuthConfig, Verifier, generate_dev_key, mint_dev_token
from .client import Client
from .errors import GatewayError
from .render import budget_table, query_table
from .site import RunningSite, SiteOptions, build_site_server
from .synth import synthesize

SITES = ("north", "south", "east", "west")
POLICIES = Path(__file__).resolve().parent.parent / "policies"


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(n_sites: int, patients: int, keep_running: bool) -> int:
    """Run the tour on ``n_sites`` loopback sites; returns the exit code."""
    started = time.perf_counter()
    logging.getLogger("gateway.server").setLevel(logging.ERROR)  # the demo says itself that it is loopback-only
    work = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    running: list[RunningSite] = []
    try:
        private, public = generate_dev_key(work / "keys")
        verifier = Verifier(AuthConfig.from_files([public]))
        for index, name in enumerate(SITES[:n_sites]):
            synthesize(name, patients, work / "data" / f"{name}.duckdb", seed=index)
            policy = work / f"{name}.yaml"
            shutil.copy(POLICIES / f"{name}.yaml", policy)
            running.append(build_site_server(SiteOptions(policy, work / "state" / name, verifier)))
        _say(f"Demo network: {n_sites} site gateway(s) on loopback (plaintext, development only) with "
             f"{patients} synthetic patients each (ready in {time.perf_counter() - started:.1f}s)")
        for name, site in zip(SITES, running, strict=False):
            _say(f"  site {name}: 127.0.0.1:{site.port}")
        token = mint_dev_token(private.read_bytes(), "demo-researcher", "demo")
        _tour(running, token)
        if keep_running:
            _say(f"\nThe network stays up. Token (development only):\n  export GATEWAY_TOKEN={token}")
            _say(f"  gateway query --target 127.0.0.1:{running[0].port} "
                 "--sql 'SELECT stage, count(*) FROM patients GROUP BY stage'")
            _say(f"  gateway budget --target 127.0.0.1:{running[0].port}\nPress Ctrl-C to stop.")
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
        _say(f"\nDemo finished in {time.perf_counter() - started:.1f}s.")
        return 0
    finally:
        for site in running:
            site.stop(grace=1)
        shutil.rmtree(work, ignore_errors=True)


def _tour(running: list[RunningSite], token: str) -> None:
    first = f"127.0.0.1:{running[0].port}"
    with Client(first, token=token) as client:
        _say("\n1. Datasets this project may query at site north:")
        for ds in client.datasets():
            _say(f"   {ds.name}: {len(ds.columns)} columns, aggregates {', '.join(ds.aggregates)}, "
                 f"epsilon per query {ds.epsilon_default:g} (max {ds.epsilon_max:g})")
        _step(client, "2. Patients per stage (noisy counts, 95% intervals):",
              "SELECT stage, count(*) FROM patients GROUP BY stage", 0.3)
        _step(client, "3. Mean age at diagnosis by stage:",
              "SELECT stage, mean(age_at_diagnosis) FROM patients GROUP BY stage", 0.5)
        _step(client, "4. Treatment episodes and mean cost by type (at most 5 rows per patient count):",
              "SELECT treatment_type, count(*), mean(cost_usd) FROM treatments GROUP BY treatment_type", 0.5)
        _step(client, "5. The same question as in 2, asked again: the stored answer, at no cost:",
              "SELECT stage, count(*) FROM patients GROUP BY stage", 0.3)
        _say("\n6. Pricing a question before asking it (dry run, nothing charged):")
        _say(_indent(query_table(client.query(
            "SELECT sex, count(*) FROM patients WHERE diagnosis_year >= 2020 GROUP BY sex", epsilon=1,
            dry_run=True).response)))
        _say("\n7. A question the remaining budget cannot pay for:")
        try:
            for year in range(2010, 2025):
                sql = f"SELECT vital_status, count(*) FROM patients WHERE diagnosis_year = {year} GROUP BY vital_status"
                client.query(sql, epsilon=1)
                _say(f"   {sql}: charged 1")
        except GatewayError as err:
            _say(f"   refused ({err.code.name}): {err.message}")
        _say("\n8. The project's remaining budget:")
        _say(_indent(budget_table(client.budget())))
    for site in running[1:]:
        with Client(f"127.0.0.1:{site.port}", token=token) as client:
            result = client.query("SELECT stage, count(*) FROM patients GROUP BY stage", epsilon=0.3)
            _say(f"\nSite {site.state.live.loaded.policy.site}, patients per stage:")
            _say(_indent(query_table(result.response)))


def _step(client: Client, title: str, sql: str, epsilon: float) -> None:
    _say(f"\n{title}\n   {sql}")
    _say(_indent(query_table(client.query(sql, epsilon=epsilon).response)))


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())
