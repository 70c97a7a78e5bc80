"""``gateway console serve``: what it refuses before serving, and a console that reads while the site charges."""

from __future__ import annotations

import sqlite3
import threading
from fractions import Fraction

import pytest

from gateway.console._readers import read_only
from tests.console.conftest import sign_in
from tests.helpers.cli import run_cli
from tests.helpers.servers import client


@pytest.mark.parametrize(("extra", "says"), [
    (["--host", "0.0.0.0"], "0.0.0.0 is not a loopback address: the console serves other hosts only over TLS"),
    (["--host", "0.0.0.0", "--tls-cert", "c.pem", "--tls-key", "k.pem"], "no token keys"),
    (["--tls-cert", "c.pem"], "--tls-cert and --tls-key go together"),
])
def test_console_serve_refuses_what_it_may_not_serve(served, extra, says) -> None:
    done = run_cli("console", "serve", "--policy", str(served.policy), "--state-dir", str(served.state_dir),
                   "--port", "0", *extra, timeout=60)
    assert done.returncode == 2 and says in done.stderr and "Traceback" not in done.stderr


def test_console_serve_needs_a_state_dir_and_a_policy_that_loads(served, tmp_path) -> None:
    missing = run_cli("console", "serve", "--policy", str(served.policy), "--state-dir", str(tmp_path / "none"),
                      "--port", "0", timeout=60)
    assert missing.returncode == 2 and "no state dir at" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text("site: x\nunknown: 1\n")
    invalid = run_cli("console", "serve", "--policy", str(bad), "--state-dir", str(served.state_dir), "--port", "0",
                      timeout=60)
    assert invalid.returncode == 2 and "invalid policy" in invalid.stderr and "bad.yaml:" in invalid.stderr


def test_the_console_reads_the_ledger_read_only(served) -> None:
    with read_only(served.state_dir / "ledger.sqlite") as con, pytest.raises(sqlite3.OperationalError):
        con.execute("DELETE FROM spend")
    with read_only(served.state_dir / "ledger.sqlite") as con:
        assert con.execute("SELECT count(*) FROM charges").fetchone()[0] == 3


def test_pages_read_while_the_site_serves_and_charges_without_holding_it_up(served, browse, officer_token,
                                                                         token) -> None:
    web = browse()
    sign_in(web, officer_token())
    stop, statuses = threading.Event(), []

    def read_pages() -> None:
        while not stop.is_set():
            for path in ("/budgets", "/audit", "/reloads"):
                statuses.append(web.get(path).status_code)

    reader = threading.Thread(target=read_pages)
    reader.start()
    try:
        with client(served.site, token, project="stats") as c:
            for i in range(40):
                c.query(f"SELECT count(*) FROM patients WHERE age_at_diagnosis > {i}", epsilon=0.05)
    finally:
        stop.set()
        reader.join()
    assert statuses and set(statuses) == {200}
    page = web.get("/budgets").text
    assert ">stats</a>" in page
    with read_only(served.state_dir / "ledger.sqlite") as con:
        spent = con.execute("SELECT spent FROM spend WHERE scope = 'project:stats:patients'").fetchone()[0]
    assert Fraction(spent) == 40 * Fraction(5, 100)
    assert "Chain intact" in web.get("/audit").text


@pytest.mark.slow
def test_over_tls_the_console_serves_https_with_secure_host_only_cookies(served, keys, tmp_path,
                                                                         officer_token) -> None:
    import ssl
    import subprocess

    import httpx

    from gateway.demo.certs import make_dev_certs
    from tests.console.conftest import form_token
    from tests.helpers.cli import GATEWAY, wait_for_port_file

    certs = make_dev_certs(tmp_path / "certs", ["console"])
    port_file = tmp_path / "port"
    proc = subprocess.Popen([*GATEWAY, "console", "serve", "--policy", str(served.policy), "--state-dir",
                             str(served.state_dir), "--port", "0", "--port-file", str(port_file), "--trusted-key",
                             str(keys[1]), "--tls-cert", str(certs.cert("console")), "--tls-key",
                             str(certs.key("console"))], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        address = wait_for_port_file(proc, port_file)
        with httpx.Client(base_url=f"https://{address}", verify=ssl.create_default_context(cafile=certs.ca)) as web:
            page = web.get("/sign-in")
            assert page.status_code == 200 and "Secure" in page.headers["set-cookie"]
            signed = web.post("/sign-in", data={"form_token": form_token(page.text), "token": officer_token()})
            cookie = signed.headers["set-cookie"]
            assert signed.status_code == 303 and cookie.startswith("__Host-console_session=") and "Secure" in cookie
            assert web.get("/budgets").status_code == 200
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://{address}/sign-in", timeout=5)  # no plain HTTP beside it
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=20)
    assert out.startswith(f"console of site {served.site.state.live.loaded.policy.site} on https://")
    assert "sign-in link" in out  # loopback: the link is printed too


@pytest.mark.timeout(60)  # were the import to succeed, the console would serve until stopped
def test_without_the_console_extra_the_command_says_how_to_install_it(served, monkeypatch, capsys) -> None:
    import sys

    from gateway.cli import main

    for name in [m for m in sys.modules if m == "gateway.console" or m.startswith("gateway.console.")]:
        monkeypatch.delitem(sys.modules, name)
    for name in [m for m in sys.modules if m == "starlette" or m.startswith("starlette.")]:
        monkeypatch.setitem(sys.modules, name, None)  # as if Starlette were not installed
    monkeypatch.setitem(sys.modules, "starlette", None)
    code = main(["console", "serve", "--policy", str(served.policy), "--state-dir", str(served.state_dir),
                 "--port", "0"])
    assert code == 2
    assert "gateway console serve needs the console extra: pip install 'gateway[console]'" in capsys.readouterr().err
