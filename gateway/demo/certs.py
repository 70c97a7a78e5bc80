"""DEVELOPMENT-ONLY certificates: a throwaway CA and certificates for the sites and the broker of a test network.

``gateway certs dev`` and ``gateway demo --tls`` write them. Every certificate has the name it is
made for as its common name (so a site's ``--allow-peer BROKER`` matches the broker's) and as a
DNS name, plus ``localhost``, ``127.0.0.1`` and ``::1``, and may serve and be presented as a client
certificate: the broker presents its own to the sites (mTLS), and a server's health check inside
its own container presents the server's (a site that requires client certificates asks for one
before its health service answers). The CA's private key is never written: to add a name, make a
new set.

Every file name starts with ``dev-``, a ``DEVELOPMENT-ONLY.txt`` beside them says what they are,
and private keys are written 0600. Production certificates come from your own CA.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .._transport import Tls

VALID_DAYS = 90
ORGANIZATION = "gateway DEVELOPMENT ONLY"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_NAME = re.compile(rf"^{_LABEL}(?:\.{_LABEL})*$")  # a DNS name: it goes into the certificate's names
_NOTICE = """\
DEVELOPMENT ONLY. These certificates were made by `gateway certs dev` for a test network.
They are signed by a throwaway CA whose private key was never written, they name localhost and
127.0.0.1 as well as each server, and every key here is unencrypted. Do not use them for a
network that holds real patient data: use certificates from your organization's CA.
"""


@dataclass(frozen=True)
class DevCerts:
    """Where one set of development certificates lies: the CA and each name's certificate and key."""

    folder: Path
    names: tuple[str, ...]
    not_after: dt.datetime

    @property
    def ca(self) -> Path:
        """The CA certificate every end trusts (``--client-ca`` at a site, ``--ca`` at a client)."""
        return self.folder / "dev-ca.pem"

    def cert(self, name: str) -> Path:
        """``name``'s certificate."""
        return self.folder / f"dev-{self._known(name)}.pem"

    def key(self, name: str) -> Path:
        """``name``'s private key (0600)."""
        return self.folder / f"dev-{self._known(name)}.key"

    def tls(self, name: str) -> Tls:
        """``name``'s own TLS material: its certificate and key, trusting the development CA for the peer."""
        return Tls(self.ca, self.cert(name), self.key(name))

    def trust(self) -> Tls:
        """TLS for a client that only checks the server (a researcher's client)."""
        return Tls(self.ca)

    def _known(self, name: str) -> str:
        if name not in self.names:
            raise KeyError(f"no development certificate for {name!r} (made for {', '.join(self.names)})")
        return name


def check_names(names: list[str]) -> None:
    """Raise ValueError unless every name can be a DNS name and a file name, once each."""
    for name in names:
        if not _NAME.match(name) or len(name) > 253:
            raise ValueError(f"{name!r} is not a host name (letters, digits, '-' and '.'): certificates name "
                             "their server by it")
        if name == "ca":
            raise ValueError("'ca' is the CA's own file name: choose another name")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"each name once: {', '.join(repeated)} given twice")


def make_dev_certs(folder: Path, names: list[str], *, days: int = VALID_DAYS,
                   now: dt.datetime | None = None) -> DevCerts:
    """Write a development CA certificate and a certificate and key for each of ``names`` to ``folder``.

    Refuses (FileExistsError) to replace any file already there: servers running on the old set
    would stop trusting each other.
    """
    check_names(names)
    certs = DevCerts(folder, tuple(names), _now(now) + dt.timedelta(days=days))
    targets = [certs.ca, *(p for n in names for p in (certs.cert(n), certs.key(n)))]
    existing = [p.name for p in targets if p.exists()]
    if existing:
        raise FileExistsError(f"{folder} already holds {', '.join(existing)}: remove them or choose another --out "
                              "(the servers of a network must share one CA)")
    folder.mkdir(parents=True, exist_ok=True)
    start = _now(now) - dt.timedelta(minutes=5)  # clocks of a test network differ a little
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = _name("gateway DEVELOPMENT CA")
    ca = (_builder(ca_name, ca_name, ca_key.public_key(), start, certs.not_after)
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                       crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))
    certs.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name in names:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (_builder(_name(name), ca_name, key.public_key(), start, certs.not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.SubjectAlternativeName(_alt_names(name)), critical=False)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                      ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                               critical=False)
                .sign(ca_key, hashes.SHA256()))
        _write_private(certs.key(name), key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
        certs.cert(name).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "DEVELOPMENT-ONLY.txt").write_text(_NOTICE)
    return certs


def _now(now: dt.datetime | None) -> dt.datetime:
    return now if now is not None else dt.datetime.now(dt.UTC)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, ORGANIZATION),
                      x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _builder(subject: x509.Name, issuer: x509.Name, public_key: ec.EllipticCurvePublicKey,
             start: dt.datetime, end: dt.datetime) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public_key)
            .serial_number(x509.random_serial_number()).not_valid_before(start).not_valid_after(end)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False))


def _alt_names(name: str) -> list[x509.GeneralName]:
    hosts = dict.fromkeys([name, "localhost"])  # once each, in order
    return [*(x509.DNSName(h) for h in hosts),
            x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.IPAddress(ipaddress.ip_address("::1"))]


def _write_private(path: Path, data: bytes) -> None:
    """Create ``path`` 0600 from the start: the key is never readable by others, not even for a moment."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
