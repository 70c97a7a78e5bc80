"""The demo network over TLS (``gateway demo --tls``, ``start_network(tls=True)``): real processes on
development certificates, sites that accept only the broker's client certificate."""

from __future__ import annotations

import pytest

from gateway.client import Client
from gateway.demo.network import start_network
from gateway.errors import PermissionDenied, Unavailable
from tests.helpers.cli import run_cli

SQL = "SELECT stage, count(*) FROM patients GROUP BY stage"


@pytest.mark.slow
def test_demo_with_tls_runs_its_tour_and_says_so():
    result = run_cli("demo", "--tls", "--sites", "2", "--patients", "2000", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "TLS on DEVELOPMENT certificates" in result.stdout and "plaintext" not in result.stdout
    assert "Patients per stage" in result.stdout and "refused (RESOURCE_EXHAUSTED)" in result.stdout


@pytest.mark.slow
def test_tls_network_answers_over_tls_and_its_sites_refuse_all_but_the_broker(tmp_path):
    net = start_network(tmp_path / "net", n_sites=2, patients=2000, tls=True)
    try:
        assert net.broker is not None and net.certs is not None
        with Client(net.broker.target, token=net.token(), proof_key=net.proof_key, tls=net.client_tls) as c:
            assert c.query(SQL, epsilon=0.2).sites == ["north", "south"]
        with Client(net.broker.target, token=net.token(), proof_key=net.proof_key, retries=0, timeout=5) as c, \
                pytest.raises(Unavailable):
            c.query(SQL, epsilon=0.2)  # plaintext to a TLS broker
        site = net.sites["north"].target
        with Client(site, token=net.token(), proof_key=net.proof_key, tls=net.certs.tls("south"), retries=0) as c, \
                pytest.raises(PermissionDenied, match="client certificate"):
            c.query(SQL, epsilon=0.2)  # a certificate of the network's CA, but not the broker's
        with Client(site, token=net.token(), proof_key=net.proof_key, tls=net.client_tls, retries=0, timeout=5) as c, \
                pytest.raises(Unavailable):
            c.query(SQL, epsilon=0.2)  # no client certificate at all
    finally:
        net.stop()
