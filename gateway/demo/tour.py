"""``gateway demo``: synthetic registries, site gateways and a broker on loopback, a short tour."""

from __future__ import annotations

import importlib.util
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path

import polars as pl

from ..client import Client
from ..errors import GatewayError
from ..render import budget_table, query_table
from .network import SITES, LocalNetwork, start_network


def _say(text: str = "") -> None:
    print(text, flush=True)


def run_demo(n_sites: int, patients: int, keep_running: bool, tls: bool = False) -> int:
    """Start the network (each site and the broker in its own process), run the tour; returns the exit code.

    ``tls``: on development certificates, TLS to the broker and mTLS from the broker to every site.
    """
    started = time.perf_counter()
    signal.signal(signal.SIGTERM, _exit_on_signal)  # SIGTERM, like Ctrl-C, stops the child processes too
    work = Path(tempfile.mkdtemp(prefix="gateway-demo-"))
    network: LocalNetwork | None = None
    try:
        network = start_network(work, n_sites, patients, tls=tls)
        assert network.broker is not None
        transport = ("TLS on DEVELOPMENT certificates, the sites accepting only the broker's client certificate"
                     if tls else "plaintext, development only")
        _say(f"Demo network on loopback ({transport}): {n_sites} site gateway(s) with {patients} "
             f"synthetic patients each and a broker, ready in {time.perf_counter() - started:.1f}s")
        for name, site in network.sites.items():
            _say(f"  site {name:<6} {site.target}")
        _say(f"  broker       {network.broker.target}")
        token = network.token()
        with Client(network.broker.target, token=token, proof_key=network.proof_key,
                    tls=network.client_tls) as client:
            _tour(client)
        if keep_running:
            _keep_running(network, token)
        _say(f"\nDemo finished in {time.perf_counter() - started:.1f}s; all processes stopped.")
        return 0
    finally:
        if network is not None:
            network.stop()
        shutil.rmtree(work, ignore_errors=True)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _tour(client: Client) -> None:
    _say("\n1. Datasets this project may query, and where:")
    for ds in client.datasets():
        _say(f"   {ds.name}: at {', '.join(ds.sites)}; aggregates {', '.join(ds.aggregates)}; "
             f"epsilon per query {ds.epsilon_default:g} (max {ds.epsilon_max:g})")
        for line in ds.differences:
            _say(f"     differs between sites: {line}")
    sql = "SELECT stage, count(*) FROM patients GROUP BY stage"
    _say(f"\n2. Patients per stage at each site and pooled (noisy counts, 95% intervals):\n   {sql}")
    result = client.query(sql, epsilon=0.3)
    for answer in result.response.site_answers:
        cells = ", ".join(f"{row.keys[0].value.string_value} {row.estimates[0].value:.0f}" for row in answer.rows)
        _say(f"   {answer.site:<6} {cells}")
    _say(_indent(query_table(result.response)))
    _step(client, "3. Mean age at diagnosis by stage, pooled over all sites:",
          "SELECT stage, count(*), mean(age_at_diagnosis) FROM patients GROUP BY stage", 0.5)
    _step(client, "4. Treatment episodes and mean cost by type (each patient counts at most 5 rows):",
          "SELECT treatment_type, count(*), mean(cost_usd) FROM treatments GROUP BY treatment_type", 0.5)
    _survival(client)
    _regression(client)
    _step(client, "7. Question 2 asked again: the stored answers, at no cost:", sql, 0.3)
    _say("\n8. Pricing a question before asking it (dry run, nothing charged):")
    _say(_indent(query_table(client.query("SELECT sex, count(*) FROM patients WHERE diagnosis_year >= 2020 "
                                          "GROUP BY sex", epsilon=1, dry_run=True).response)))
    _say("\n9. Spending the rest of the budget until a question is refused:")
    try:
        for year in range(2010, 2025):
            question = (f"SELECT vital_status, count(*) FROM patients WHERE diagnosis_year = {year} "
                        "GROUP BY vital_status")
            client.query(question, epsilon=1)
            _say(f"   {question}: charged 1 at every site")
    except GatewayError as err:
        _say(f"   refused ({err.code.name}): {err.message[:300]}")
    _say("\n10. The project's remaining budget at every site:")
    _say(_indent(budget_table(client.budget())))


def _survival(client: Client) -> None:
    """Kaplan-Meier survival by stage over the policies' monthly grid, pooled over the sites."""
    _say("\n5. Survival by stage, pooled over all sites (Kaplan-Meier from noisy deaths and censorings per "
         "month):\n   client.survival('patients', time='survival_months', event='death', by='stage', epsilon=0.5)")
    curves = client.survival("patients", time="survival_months", event="death", by="stage", epsilon=0.5)
    at = curves.frame.filter(pl.col("time").is_in([12.0, 60.0]))
    _say("   stage  median months [95% CI]   1-year survival      5-year survival")
    for row in curves.medians.iter_rows(named=True):
        years = [r for r in at.iter_rows(named=True) if r["stage"] == row["stage"]]
        cells = [f"{r['survival']:.2f} [{r['ci_low']:.2f}, {r['ci_high']:.2f}]" for r in years]
        _say(f"   {row['stage']:<6} {_months(row['median'], row['ci_low'], row['ci_high']):<25} "
             + "  ".join(f"{c:<19}" for c in cells))
    test = curves.logrank  # post-processing of the same counts: no budget
    least = test.p_value <= 1 / (test.draws + 1)  # as small as its draws can show
    _say(f"   do the stages differ? log-rank chi-square {test.statistic:.0f} on {test.df} df, p-value "
         f"{'<= ' if least else ''}{test.p_value:.2g} (calibrated for the noise; curves.logrank)")
    if importlib.util.find_spec("matplotlib") is None:
        return  # the picture needs the plot extra; the table says it all without it
    path = curves.plot(Path(tempfile.gettempdir()) / "gateway-demo-survival-by-stage.png",
                       title="Survival by stage, pooled over the sites (epsilon 0.5)")
    _say(f"   curves with 95% bands and numbers at risk: {path}")


def _regression(client: Client) -> None:
    """A linear regression pooled over the sites: coefficients with intervals that include the noise."""
    _say("\n6. Survival months on age at diagnosis and BMI, a linear regression pooled over all sites:\n"
         "   client.regression('patients', y='survival_months', x=['age_at_diagnosis', 'bmi'], epsilon=0.2)")
    fit = client.regression("patients", y="survival_months", x=["age_at_diagnosis", "bmi"], epsilon=0.2)
    _say("   term                 estimate   std error   95% CI")
    for row in fit.frame.iter_rows(named=True):
        _say(f"   {row['term']:<20} {row['estimate']:>8.3f}   {row['std_error']:>9.3f}   "
             f"[{row['ci_low']:.3f}, {row['ci_high']:.3f}]")
    _say(f"   n = {fit.n:.0f} patients with all three values (noisy), R^2 = {fit.r_squared:.3f}")


def _months(median: float | None, low: float | None, high: float | None) -> str:
    if median is None:
        return "not reached"
    return f"{median:g} [{'-' if low is None else f'{low:g}'}, {'not reached' if high is None else f'{high:g}'}]"


def _keep_running(network: LocalNetwork, token: str) -> None:
    assert network.broker is not None
    target = network.broker.target
    ca = f" --ca {network.certs.ca}" if network.certs else ""
    tls = f", tls=Tls(Path('{network.certs.ca}'))" if network.certs else ""
    _say("\nThe network stays up. A DEVELOPMENT token for project 'demo' (budget 3 per site, mostly spent by the "
         f"tour) and one for 'onc-demo' (budget 10), bound to the proof key this demo made:\n"
         f"  export GATEWAY_TOKEN={network.token('onc-demo')}\n  export GATEWAY_PROOF_KEY={network.proof_key}")
    _say(f"  gateway query --target {target}{ca} --sql 'SELECT stage, count(*) FROM patients GROUP BY stage'")
    _say(f"  gateway budget --target {target}{ca}")
    _say(f"  python -c \"from gateway.client import Client, Tls; from pathlib import Path; import os; "
         f"print(Client('{target}', token=os.environ['GATEWAY_TOKEN']{tls}).query("
         "'SELECT sex, count(*) FROM patients GROUP BY sex').to_polars())\"")
    _say("Press Ctrl-C to stop.")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # explicit: a background job may have SIGINT ignored
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0) and all(p.popen.poll() is None for p in network.sites.values()):
        pass


def _step(client: Client, title: str, sql: str, epsilon: float) -> None:
    _say(f"\n{title}\n   {sql}")
    _say(_indent(query_table(client.query(sql, epsilon=epsilon).response)))


def _indent(text: str) -> str:
    return "\n".join("   " + line for line in text.splitlines())


__all__ = ["SITES", "run_demo"]
