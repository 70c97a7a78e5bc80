"""The command line as a user runs it: real processes, real files, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
from fractions import Fraction
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import cli
from gateway._version import __version__
from gateway.auth import DEV_AUDIENCE, DEV_ISSUER
from gateway.client import Client
from gateway.errors import GatewayError
from gateway.ledger import SqliteLedger
from gateway.proof import ProofKey
from tests.helpers.cli import GATEWAY, run_cli, wait_for_port_file
from tests.helpers.idp import IdentityProvider
from tests.helpers.policies import write_policy


@pytest.mark.slow
def test_every_command_has_help():
    for args in (["--help"], ["demo", "--help"], ["data", "synth", "--help"], ["site", "serve", "--help"],
                 ["token", "keygen", "--help"], ["token", "mint", "--help"], ["query", "--help"],
                 ["budget", "--help"], ["policy", "check", "--help"], ["policy", "explain", "--help"],
                 ["policy", "diff", "--help"], ["audit", "verify", "--help"], ["audit", "tail", "--help"],
                 ["certs", "dev", "--help"], ["health", "--help"]):
        result = run_cli(*args)
        assert result.returncode == 0, (args, result.stderr)
        assert "usage:" in result.stdout


def test_version_flag_prints_the_package_version():
    result = run_cli("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"gateway {__version__}"


@pytest.mark.slow
def test_policy_check_reports_file_line_field(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: x\nepsilon: {default: 0.5, max: 1}\ndatasets:\n  p:\n    source: {parquet: a.parquet}\n"
                   "    privacy_unit: id\n    max_rows_per_unit: 1\n    colour: red\n    columns: {}\n")
    result = run_cli("policy", "check", str(bad), "policies/north.yaml")
    assert result.returncode == 1
    assert f"{bad}:8: datasets.p.colour: unknown key 'colour'" in result.stderr
    assert "policies/north.yaml: ok" in result.stdout
    assert run_cli("policy", "check", "policies/north.yaml").returncode == 0


@pytest.mark.slow
def test_synth_keygen_mint_and_user_errors(tmp_path):
    out = tmp_path / "x.duckdb"
    assert run_cli("data", "synth", "--site", "zeta", "--patients", "500", "--out", str(out)).returncode == 0
    assert out.is_file()
    assert run_cli("token", "keygen", "--out", str(tmp_path / "k")).returncode == 0
    minted = run_cli("token", "mint", "--key", str(tmp_path / "k" / "dev-signing-key.pem"), "--subject", "a",
                     "--project", "p", "--ttl", "5m")
    assert minted.returncode == 0 and minted.stdout.count(".") == 2 and "DEVELOPMENT" in minted.stderr
    bound = run_cli("token", "mint", "--key", str(tmp_path / "k" / "dev-signing-key.pem"), "--subject", "a",
                    "--project", "p", "--proof-key", str(tmp_path / "k" / "a-proof.pem"))
    assert bound.returncode == 0 and "created the proof key" in bound.stderr
    claims = jwt.decode(bound.stdout.strip(), options={"verify_signature": False})
    assert claims["cnf"]["jkt"] == ProofKey.load(tmp_path / "k" / "a-proof.pem").jkt
    assert (tmp_path / "k" / "a-proof.pem").stat().st_mode & 0o777 == 0o600
    for args, env in ((["token", "mint", "--key", str(tmp_path / "k" / "dev-signing-key.pem"), "--subject", "a",
                        "--project", "p"], {"GATEWAY_PROOF_KEY": ""}),
                      (["query", "--target", "127.0.0.1:1", "--token", "t", "--sql", "SELECT count(*) FROM patients"],
                       {"GATEWAY_PROOF_KEY": ""})):
        refused = run_cli(*args, env=env)
        assert refused.returncode == 2 and "proof key" in refused.stderr and "Traceback" not in refused.stderr
    for args in (["token", "mint", "--key", str(tmp_path / "missing.pem"), "--subject", "a", "--project", "p"],
                 ["token", "mint", "--key", str(tmp_path / "k" / "dev-signing-key.pem"), "--subject", "a",
                  "--project", "p", "--ttl", "forever"],
                 ["query", "--target", "127.0.0.1:1", "--sql", "SELECT count(*) FROM patients"],
                 ["audit", "verify", str(tmp_path / "none.jsonl")],
                 ["demo", "--sites", "9"]):
        result = run_cli(*args, env={"GATEWAY_TOKEN": ""})
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("gateway: error: ") and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1


def _serve(tmp_path: Path, policy: Path, public_key: Path, state: Path) -> tuple[subprocess.Popen[str], str]:
    """``gateway site serve`` in its own process, and its target once it listens."""
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    proc = subprocess.Popen([*GATEWAY, "site", "serve", "--policy", str(policy), "--port", "0", "--state-dir",
                             str(state), "--trusted-key", str(public_key), "--port-file", str(port_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, wait_for_port_file(proc, port_file)


@pytest.mark.slow
def test_site_serve_query_json_budget_and_sigterm(tmp_path, keys, token, site_data):
    policy = write_policy(tmp_path, site_data)
    proc, target = _serve(tmp_path, policy, keys[1], tmp_path / "state")
    try:
        env = {"GATEWAY_TOKEN": token()}
        result = run_cli("query", "--target", target, "--sql",
                     "SELECT stage, count(*), mean(age_at_diagnosis) FROM patients GROUP BY stage",
                     "--epsilon", "0.5", "--json", env=env)
        assert result.returncode == 0, result.stderr
        answer = json.loads(result.stdout)
        assert set(answer) >= {"rows", "epsilon_charged", "budget_remaining", "cached"}
        assert [r["stage"] for r in answer["rows"]] == ["I", "II", "III", "IV"]
        cell = answer["rows"][0]["mean(age_at_diagnosis)"]
        assert set(cell) >= {"value", "std_error", "ci95"} and cell["ci95"][0] <= cell["value"] <= cell["ci95"][1]
        assert answer["epsilon_charged"] == 0.5 and answer["cached"] is False
        table = run_cli("query", "--target", target, "--template", "stage_distribution", "--param",
                    "from_year=2018", env=env)
        assert table.returncode == 0 and "stage" in table.stdout and "epsilon charged: 0.5" in table.stdout
        budget = json.loads(run_cli("budget", "--target", target, "--json", env=env).stdout)
        patients = next(b for b in budget["budgets"] if b["dataset"] == "patients")
        assert patients["spent"] == 1.0 and patients["remaining"] == 9.0
        refused = run_cli("query", "--target", target, "--sql", "SELECT count(*) FROM nope", env=env)
        assert refused.returncode == 1 and "unknown dataset" in refused.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
    verify = run_cli("audit", "verify", str(tmp_path / "state" / "audit.jsonl"))
    # three queries; each CLI run first learns the site's name for its proofs (a call without valid
    # credentials): the first is recorded at once, the other two counted into one record at shutdown
    assert verify.returncode == 0 and "5 records" in verify.stdout


@pytest.mark.slow
def test_sigkill_loses_no_charge_and_no_answer_goes_uncharged(tmp_path, keys, token, site_data):
    """Kill -9 the site during a stream of queries, restart it, and audit the ledger."""
    policy = write_policy(tmp_path, site_data)
    state = tmp_path / "state"
    proc, target = _serve(tmp_path, policy, keys[1], state)
    received: dict[str, float] = {}
    stop = threading.Event()

    def stream() -> None:
        with Client(target, token=token(project="stats"), retries=0, timeout=10) as c:
            for i in range(100_000):
                if stop.is_set():
                    return
                try:
                    r = c.query(f"SELECT count(*) FROM patients WHERE age_at_diagnosis >= {18 + i % 80} "
                                f"AND diagnosis_year >= {2010 + i // 80}", epsilon=0.01, query_id=f"q{i}")
                except GatewayError:
                    return
                received[r.query_id] = r.epsilon_charged

    worker = threading.Thread(target=stream)
    worker.start()
    while len(received) < 40:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=10)
    stop.set()
    worker.join(timeout=30)
    ledger = SqliteLedger(state / "ledger.sqlite")
    try:
        for query_id, charged in received.items():
            record = ledger.find("stats", query_id)
            assert record is not None and record.answer and record.epsilon == Fraction(1, 100)  # charged and stored
            assert charged == 0.01
        spent = ledger.total_spent()
        charges = ledger._conn().execute("SELECT count(*) FROM charges WHERE status != 'refunded'").fetchone()[0]
        assert spent == Fraction(charges, 100) and charges >= len(received)
    finally:
        ledger.close()
    # restart: budgets survive, and retrying the query that was in flight charges nothing new
    proc, target = _serve(tmp_path, policy, keys[1], state)
    try:
        with Client(target, token=token(project="stats")) as c:
            before = c.budget("patients")["spent"][0]
            assert before == pytest.approx(float(spent))
            i = len(received)
            r = c.query(f"SELECT count(*) FROM patients WHERE age_at_diagnosis >= {18 + i % 80} "
                        f"AND diagnosis_year >= {2010 + i // 80}", epsilon=0.01, query_id=f"q{i}")
            after = c.budget("patients")["spent"][0]
            inflight_was_charged = charges > len(received)
            assert after == pytest.approx(before if inflight_was_charged else before + 0.01)
            assert r.epsilon_charged == pytest.approx(0.0 if inflight_was_charged and r.cached else 0.01)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0


@pytest.mark.parametrize(("flags", "message"), [
    (["--jwks-url", "http://idp.example.org/jwks"], "refusing JWKS URL 'http://idp.example.org/jwks': keys must "
                                                    "come over https (http only for a loopback host)"),
    (["--jwks-url", "https://idp.example.org/jwks", "--max-token-lifetime", "12x"],
     "invalid {} config: --max-token-lifetime: max_token_lifetime: bad ttl '12x'"),
    # with no config file the flag is named, else the file (the broker's names its sites)
    ([], "invalid {} config: {}: trusted_keys: no token keys: give trusted_keys (--trusted-key PEM), "
         "jwks or jwks_url"),
])
@pytest.mark.parametrize("server", ["site", "broker"])
def test_serve_refuses_bad_token_key_flags_in_one_line(tmp_path, capsys, flags, message, server):
    (tmp_path / "broker.yaml").write_text("name: net\nsites:\n  - name: north\n    address: 127.0.0.1:1\n")
    config = ["--policy", str(tmp_path / "p.yaml")] if server == "site" else ["--config", str(tmp_path / "broker.yaml")]
    assert cli.main([server, "serve", *config, *flags]) == 2
    stderr = capsys.readouterr().err
    where = "--trusted-key" if server == "site" else f"{tmp_path / 'broker.yaml'}:1"
    assert stderr.startswith(f"gateway: error: {message.format(server, where)}")
    assert len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "state").exists()


def _serve_with_idp(tmp_path: Path, policy: Path, url: str, state: Path) -> tuple[subprocess.Popen[str], str]:
    port_file = tmp_path / f"port-{time.monotonic_ns()}"
    proc = subprocess.Popen([*GATEWAY, "site", "serve", "--policy", str(policy), "--port", "0", "--state-dir",
                             str(state), "--jwks-url", url, "--max-token-lifetime", "12h", "--port-file",
                             str(port_file)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, wait_for_port_file(proc, port_file)


@pytest.mark.slow
def test_site_serve_with_a_jwks_url_and_a_maximum_token_lifetime(tmp_path, site_data):
    policy = write_policy(tmp_path, site_data)
    idp = IdentityProvider()
    idp.publish({"k1": ec.generate_private_key(ec.SECP256R1())})
    idp.start()
    now = int(time.time())
    jkt = ProofKey.load(Path(os.environ["GATEWAY_PROOF_KEY"])).jkt  # the key the CLI signs proofs with
    on_site = {"project": "onc-test", "iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "iat": now, "cnf": {"jkt": jkt}}
    query = ["query", "--sql", "SELECT count(*) FROM patients", "--epsilon", "0.1"]
    try:
        proc, target = _serve_with_idp(tmp_path, policy, idp.url, tmp_path / "up")
        try:
            ok = run_cli(*query, "--target", target, env={"GATEWAY_TOKEN": idp.sign("k1", **on_site,
                                                                                  exp=now + 11 * 3600)})
            assert ok.returncode == 0, ok.stderr
            too_long = run_cli(*query, "--target", target, env={"GATEWAY_TOKEN": idp.sign("k1", **on_site,
                                                                                        exp=now + 13 * 3600)})
            assert too_long.returncode == 1 and "invalid or expired credentials" in too_long.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=30) == 0
        assert idp.fetches == 1

        idp.stop()  # the provider is down when the next site starts
        proc, target = _serve_with_idp(tmp_path, policy, idp.url, tmp_path / "down")
        try:
            down = run_cli(*query, "--target", target, env={"GATEWAY_TOKEN": idp.sign("k1", **on_site,
                                                                                    exp=now + 3600)})
            assert down.returncode == 1
            assert f"identity provider unreachable: cannot fetch keys from {idp.url}" in down.stderr
        finally:
            proc.send_signal(signal.SIGTERM)
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert f"identity provider unreachable: cannot fetch keys from {idp.url}" in stderr  # said at start
    finally:
        idp.stop()


def test_every_option_of_every_command_says_what_it_is() -> None:
    import argparse

    missing = []

    def walk(parser: argparse.ArgumentParser, path: list[str]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    walk(sub, [*path, name])
            elif not isinstance(action, argparse._HelpAction | argparse._VersionAction) and not action.help:
                missing.append(" ".join([*path, action.option_strings[0] if action.option_strings else action.dest]))

    walk(cli._parser(), ["gateway"])
    assert missing == []


def test_datasets_lists_what_a_project_may_query(start_site, token) -> None:
    site = start_site()
    shown = run_cli("datasets", "--target", site.target, env={"GATEWAY_TOKEN": token()})
    assert shown.returncode == 0, shown.stderr
    assert "patients" in shown.stdout and "age_at_diagnosis" in shown.stdout and "bounds [18, 99]" in shown.stdout
    as_json = json.loads(run_cli("datasets", "--target", site.target, "--json",
                                 env={"GATEWAY_TOKEN": token()}).stdout)
    assert {d["name"] for d in as_json} == {"patients", "treatments"}
    outsider = run_cli("datasets", "--target", site.target, env={"GATEWAY_TOKEN": token(project="outsider")})
    assert outsider.returncode == 0 and "no dataset you may query" in outsider.stdout
