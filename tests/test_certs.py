"""Development certificates (``gateway certs dev``, gateway.demo.certs) in use: a site served with them
requires the broker's client certificate, the broker reaches it over mTLS, a researcher reaches the broker
over TLS; and ``gateway health`` checks those servers the way a container's health check does."""

from __future__ import annotations

import datetime as dt
import stat

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from gateway._transport import Tls
from gateway.auth import AuthConfig, Verifier
from gateway.broker import BrokerConfig, SiteEntry, build_broker_server
from gateway.client import Client
from gateway.demo.certs import make_dev_certs
from gateway.errors import PermissionDenied, Unavailable
from gateway.metrics import BrokerMetrics, SiteMetrics
from gateway.site import SiteOptions, build_site_server
from tests.helpers.cli import run_cli
from tests.helpers.policies import write_policy

SQL = "SELECT stage, count(*) FROM patients GROUP BY stage"


@pytest.fixture
def certs(tmp_path):
    return make_dev_certs(tmp_path / "certs", ["north", "south", "broker"])


@pytest.fixture
def mtls_site(tmp_path, certs, keys, site_data):
    """Site north as `site serve --tls-cert --tls-key --client-ca --allow-peer broker` starts it."""
    folder = tmp_path / "north"
    folder.mkdir()
    site = build_site_server(
        SiteOptions(write_policy(folder, site_data), folder / "state", Verifier(AuthConfig.from_files([keys[1]])),
                    tls=certs.tls("north"), allowed_peers=("broker",)),
        SiteMetrics(CollectorRegistry()))
    yield site
    site.stop(grace=0)


def test_dev_certificates_carry_a_site_broker_and_client_network_over_tls_and_mtls(certs, mtls_site, keys, token):
    broker = build_broker_server(
        BrokerConfig(sites=(SiteEntry(name="north", address=f"localhost:{mtls_site.port}", tls=certs.tls("broker")),)),
        Verifier(AuthConfig.from_files([keys[1]])), tls=Tls(cert=certs.cert("broker"), key=certs.key("broker")),
        metrics=BrokerMetrics(CollectorRegistry()))
    try:
        with Client(broker.target, token=token(), tls=certs.trust()) as c:
            result = c.query(SQL, epsilon=0.2)
        assert result.sites == ["north"] and len(result.to_polars()) == 4
        # the site accepts no other certificate of the same CA, and no caller without one
        with Client(f"localhost:{mtls_site.port}", token=token(), tls=certs.tls("south"), retries=0) as c, \
                pytest.raises(PermissionDenied, match="client certificate"):
            c.query(SQL)
        with Client(f"localhost:{mtls_site.port}", token=token(), tls=certs.trust(), retries=0, timeout=5) as c, \
                pytest.raises(Unavailable):
            c.query(SQL)
        # a researcher must trust the development CA: without it the broker's certificate is refused
        with Client(broker.target, token=token(), tls=Tls(certs.cert("south")), retries=0, timeout=5) as c, \
                pytest.raises(Unavailable):
            c.query(SQL)
    finally:
        broker.stop(grace=0)


def test_each_certificate_names_its_server_and_localhost_and_the_broker_by_its_common_name(certs):
    cert = x509.load_pem_x509_certificate(certs.cert("broker").read_bytes())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "broker"
    assert "DEVELOPMENT" in cert.subject.rfc4514_string() and "DEVELOPMENT" in cert.issuer.rfc4514_string()
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["broker", "localhost"]
    assert [str(a) for a in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1", "::1"]
    assert cert.not_valid_after_utc - dt.datetime.now(dt.UTC) < dt.timedelta(days=91)


def test_keys_are_private_every_file_says_development_and_no_ca_key_is_written(certs):
    files = sorted(p.name for p in certs.folder.iterdir())
    assert files == ["DEVELOPMENT-ONLY.txt", "dev-broker.key", "dev-broker.pem", "dev-ca.pem", "dev-north.key",
                     "dev-north.pem", "dev-south.key", "dev-south.pem"]
    for name in ("north", "south", "broker"):
        assert stat.S_IMODE(certs.key(name).stat().st_mode) == 0o600
    assert "DEVELOPMENT ONLY" in (certs.folder / "DEVELOPMENT-ONLY.txt").read_text()


def test_an_existing_set_is_never_replaced_and_names_must_be_host_names(certs, tmp_path):
    before = certs.ca.read_bytes()
    with pytest.raises(FileExistsError, match=r"dev-ca\.pem"):
        make_dev_certs(certs.folder, ["north", "broker"])
    assert certs.ca.read_bytes() == before
    for names, reason in ((["north", "north"], "given twice"), (["ca"], "CA's own"), (["no_pe"], "host name"),
                          (["../x"], "host name")):
        with pytest.raises(ValueError, match=reason):
            make_dev_certs(tmp_path / "other", names)


def test_certs_dev_command_labels_its_output_and_refuses_to_overwrite(tmp_path):
    out = tmp_path / "certs"
    first = run_cli("certs", "dev", "--out", str(out), "--sites", "north,south", "--broker", "network-broker")
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("DEVELOPMENT-ONLY certificates (not for production)")
    assert "--allow-peer network-broker" in first.stdout and (out / "dev-network-broker.key").exists()
    again = run_cli("certs", "dev", "--out", str(out))
    assert again.returncode == 2 and "already holds dev-ca.pem" in again.stderr and "Traceback" not in again.stderr


def test_health_command_checks_an_mtls_site_with_a_certificate_of_its_ca(certs, mtls_site):
    target = f"localhost:{mtls_site.port}"
    ok = run_cli("health", "--target", target, "--ca", str(certs.ca), "--cert", str(certs.cert("north")),
                 "--key", str(certs.key("north")))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"{target}: SERVING"
    # the flags' environment variables, as the container image sets them
    env = {"GATEWAY_HEALTH_TARGET": target, "GATEWAY_HEALTH_CA": str(certs.ca),
           "GATEWAY_HEALTH_CERT": str(certs.cert("north")), "GATEWAY_HEALTH_KEY": str(certs.key("north"))}
    assert run_cli("health", env=env).returncode == 0
    no_cert = run_cli("health", "--target", target, "--ca", str(certs.ca), "--timeout", "3")
    assert no_cert.returncode == 1 and "not healthy: UNAVAILABLE" in no_cert.stderr


def test_health_command_fails_when_nothing_listens(tmp_path):
    result = run_cli("health", "--target", "127.0.0.1:1", "--timeout", "2")
    assert result.returncode == 1 and "not healthy" in result.stderr and "Traceback" not in result.stderr
