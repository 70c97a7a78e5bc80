"""Transport security (gateway._transport): broker to site over mutual TLS, with the site accepting only
the broker's certificate name."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from prometheus_client import CollectorRegistry

from gateway._transport import Tls
from gateway.auth import AuthConfig, Verifier
from gateway.broker import BrokerConfig, SiteEntry, build_broker_server
from gateway.client import Client
from gateway.errors import PermissionDenied, Unavailable
from gateway.metrics import BrokerMetrics, SiteMetrics
from gateway.site import SiteOptions, build_site_server
from tests.helpers.policies import write_policy


def _cert(folder: Path, name: str, issuer_key=None, issuer_name=None, ca=False, server=False):
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer_name or subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if server:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                           serialization.PrivateFormat.PKCS8,
                                                           serialization.NoEncryption()))
    return key, subject


@pytest.fixture
def pki(tmp_path):
    ca_key, ca_name = _cert(tmp_path, "ca", ca=True)
    _cert(tmp_path, "site", ca_key, ca_name, server=True)
    _cert(tmp_path, "broker", ca_key, ca_name)
    _cert(tmp_path, "intruder", ca_key, ca_name)
    return tmp_path


def test_broker_reaches_site_over_mtls_and_site_checks_peer_name(pki, tmp_path, keys, token, site_data):
    folder = tmp_path / "site"
    folder.mkdir()
    site = build_site_server(
        SiteOptions(write_policy(folder, site_data), folder / "state", Verifier(AuthConfig.from_files([keys[1]])),
                    tls=Tls(pki / "ca.pem", pki / "site.pem", pki / "site.key"), allowed_peers=("broker",)),
        SiteMetrics(CollectorRegistry()))
    broker = build_broker_server(
        BrokerConfig(sites=(SiteEntry(name="north", address=f"localhost:{site.port}",
                                      tls=Tls(pki / "ca.pem", pki / "broker.pem", pki / "broker.key")),)),
        Verifier(AuthConfig.from_files([keys[1]])), metrics=BrokerMetrics(CollectorRegistry()))
    try:
        with Client(broker.target, token=token()) as c:
            result = c.query("SELECT stage, count(*) FROM patients GROUP BY stage", epsilon=0.2)
        assert result.sites == ["north"] and len(result.to_polars()) == 4
        intruder = Tls(pki / "ca.pem", pki / "intruder.pem", pki / "intruder.key", server_name="localhost")
        with Client(f"localhost:{site.port}", token=token(), tls=intruder, retries=0) as c, \
                pytest.raises(PermissionDenied, match="client certificate"):
            c.query("SELECT count(*) FROM patients")
        no_cert = Tls(pki / "ca.pem", server_name="localhost")
        with Client(f"localhost:{site.port}", token=token(), tls=no_cert, retries=0, timeout=5) as c, \
                pytest.raises(Unavailable):
            c.query("SELECT count(*) FROM patients")
    finally:
        broker.stop(grace=0)
        site.stop(grace=0)
