"""Proof of possession: what one site receives is useless at any other site and for any other call.

A bearer token alone could be replayed: the broker relays the caller's token to every site, so a
malicious site (or anyone reading a site's inbound traffic) could present it at another site and
spend the caller's budget there. So tokens are *bound* to a key the caller holds, as in DPoP
(RFC 9449): the token carries ``cnf.jkt``, the RFC 7638 thumbprint of the caller's public key.
With every call the caller signs, for each site that will see the call, a short-lived proof: a
JWS (header ``typ: gateway-pop+jwt`` and the public key as ``jwk``) over

- ``site``: the name of the site it is for (a site's name is its policy's ``site``),
- ``htm``: the method (``Query``, ``ListDatasets``, ``GetBudget``),
- ``rqh``: the digest of the request as the caller sent it (:func:`request_digest`: the query, its
  ε, δ, ``dry_run``, ``query_id`` and ``single_site``, so no relay can add or strip that flag),
- ``ath``: the hash of the access token,
- ``iat`` and a random ``jti``.

A site accepts a call only with a proof addressed to it, signed by the token's key, for this
token, this method and this very request, issued within :data:`MAX_AGE` seconds, and never seen
before (a replay cache holds each ``jti`` until the proof is too old to pass anyway). A broker
checks that the caller holds the key, then relays to each site only that site's proof. Without
the private key, which never leaves the caller, nothing a site sees can be used elsewhere or for
another query. Proofs live in the request's ``proofs`` map (not in metadata: with dozens of sites
they would outgrow gRPC's 8 KiB metadata limit).

This module is shared by the client (signing) and the servers (checking); it needs PyJWT and
``cryptography`` only.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from google.protobuf.message import Message

from .errors import ProofRequired, Unauthenticated, Unavailable

PROOF_TYPE = "gateway-pop+jwt"
MAX_AGE = 120  # seconds a proof is accepted after it was signed (clock skew included)
FUTURE_LEEWAY = 30  # seconds a proof's iat may lie in the future (clock skew)
ANY_SERVER = ""  # proofs[""]: for whichever server receives the call, before the caller knows its name
_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384"}
MAX_PROOF_LENGTH = 4096


def b64url(data: bytes) -> str:
    """Base64url without padding (JOSE's encoding)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def thumbprint(jwk: Mapping[str, Any]) -> str:
    """The RFC 7638 SHA-256 thumbprint of a public JWK (EC or OKP), base64url without padding."""
    members = {"EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}.get(str(jwk.get("kty")))
    if members is None or any(not isinstance(jwk.get(m), str) for m in members):
        raise ValueError("unsupported or incomplete public key (EC P-256/P-384 or Ed25519 JWK expected)")
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    return b64url(hashlib.sha256(canonical.encode()).digest())


def token_hash(token: str) -> str:
    """``ath``: base64url of the SHA-256 of the access token (RFC 9449 §4.2)."""
    return b64url(hashlib.sha256(token.encode("ascii", "replace")).digest())


def request_digest(request: Message) -> str:
    """Hex SHA-256 of a request as its caller sent it.

    That is its deterministic protobuf encoding without ``proofs`` (and without a broker request's
    ``sites``, which only choose where it goes).
    """
    bare = type(request)()
    bare.CopyFrom(request)
    bare.ClearField("proofs")
    if "sites" in bare.DESCRIPTOR.fields_by_name:
        bare.ClearField("sites")
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()


def method_of(request: Message) -> str:
    """The method a request message belongs to (``QueryRequest`` -> ``Query``)."""
    return type(request).__name__.removesuffix("Request")


class ProofKey:
    """The caller's proof key: an EC P-256/P-384 or Ed25519 private key that signs proofs."""

    def __init__(self, private: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> None:
        if isinstance(private, ec.EllipticCurvePrivateKey):
            if private.curve.name not in _ALGORITHMS:
                raise ValueError(f"unsupported curve {private.curve.name} (use P-256, P-384 or Ed25519)")
            self.algorithm = _ALGORITHMS[private.curve.name]
        elif isinstance(private, ed25519.Ed25519PrivateKey):
            self.algorithm = "EdDSA"
        else:
            raise ValueError("unsupported proof key (use an EC P-256, P-384 or Ed25519 private key)")
        self._private = private
        self.jwk: dict[str, Any] = json.loads(jwt.algorithms.get_default_algorithms()[self.algorithm]
                                              .to_jwk(private.public_key()))
        self.jkt = thumbprint(self.jwk)

    @classmethod
    def generate(cls) -> ProofKey:
        """A fresh EC P-256 key."""
        return cls(ec.generate_private_key(ec.SECP256R1()))

    @classmethod
    def from_pem(cls, pem: bytes) -> ProofKey:
        """A key from an unencrypted PKCS#8 PEM."""
        private = serialization.load_pem_private_key(pem, password=None)
        if not isinstance(private, ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey):
            raise ValueError("unsupported proof key (use an EC P-256, P-384 or Ed25519 private key)")
        return cls(private)

    @classmethod
    def load(cls, path: Path) -> ProofKey:
        """A key from a PEM file (see :meth:`create`)."""
        try:
            return cls.from_pem(path.read_bytes())
        except OSError as err:
            raise ValueError(f"cannot read proof key {path}: {err.strerror}") from None
        except ValueError as err:
            raise ValueError(f"{path}: not a usable proof key ({err})") from None

    @classmethod
    def create(cls, path: Path) -> ProofKey:
        """Generate a key and write it to ``path`` (0600, refusing to overwrite)."""
        key = cls.generate()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as out:
            out.write(key.pem())
        return key

    @classmethod
    def load_or_create(cls, path: Path) -> tuple[ProofKey, bool]:
        """The key in ``path``, created first when the file does not exist; and whether it was created."""
        if path.exists():
            return cls.load(path), False
        return cls.create(path), True

    def pem(self) -> bytes:
        """The private key as unencrypted PKCS#8 PEM (keep it like a password)."""
        return self._private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())

    def sign(self, site: str, request: Message, token: str, now: float | None = None) -> str:
        """A proof for ``site`` over ``request`` (see the module docstring)."""
        claims: dict[str, Any] = {"site": site, "htm": method_of(request), "rqh": request_digest(request),
                                  "ath": token_hash(token), "iat": int(time.time() if now is None else now),
                                  "jti": secrets.token_urlsafe(16)}
        return jwt.encode(claims, self._private, algorithm=self.algorithm,
                          headers={"typ": PROOF_TYPE, "jwk": self.jwk})

    def attach(self, request: Message, token: str, sites: list[str]) -> None:
        """Put one proof per site into ``request.proofs`` (replacing any there)."""
        proofs = request.proofs  # type: ignore[attr-defined]
        proofs.clear()
        for site in sites:
            proofs[site] = self.sign(site, request, token)


class ProofChecker:
    """Checks proofs: signature, binding to the token and the request, age, and (at a site) replays."""

    def __init__(self, max_age: int = MAX_AGE, cache_limit: int = 200_000, per_key_limit: int = 20_000) -> None:
        self.max_age, self.cache_limit, self.per_key_limit = max_age, cache_limit, per_key_limit
        self._seen: OrderedDict[str, tuple[float, str]] = OrderedDict()  # jti -> (when it may go, key)
        self._per_key: Counter[str] = Counter()  # proofs remembered per key: one caller cannot fill the cache
        self._lock = threading.Lock()

    def check(self, proof: str, request: Message, ath: str, jkt: str | None, site: str | None,
              now: float | None = None) -> None:
        """Raise :class:`Unauthenticated` unless ``proof`` binds this call to the token's key.

        ``site``: the receiving site's name, which the proof must be addressed to; its ``jti`` is
        then remembered, and refused if seen before. ``None`` (a broker, or a proof that only shows
        the caller holds the key) accepts any address and remembers nothing.
        """
        if jkt is None:
            raise Unauthenticated("this token is not bound to a proof key (no cnf.jkt claim); ask your identity "
                                  "provider for a key-bound (DPoP) token, or mint one with "
                                  "'gateway token mint --proof-key FILE'")
        now = time.time() if now is None else now
        claims = self._verified_claims(proof, jkt)
        problems = []
        if site is not None and claims.get("site") != site:
            problems.append("is addressed to another server")
        if claims.get("htm") != method_of(request):
            problems.append("is for another method")
        if claims.get("ath") != ath:
            problems.append("is for another token")
        if claims.get("rqh") != request_digest(request):
            problems.append("is for another request")
        iat = claims.get("iat")
        if not isinstance(iat, int) or isinstance(iat, bool):
            problems.append("has no numeric iat")
        elif iat > now + FUTURE_LEEWAY:
            problems.append("is issued in the future (check the client's clock)")
        elif iat < now - self.max_age:
            problems.append(f"is older than {self.max_age} s (sign a fresh one per call)")
        jti = claims.get("jti")
        if not isinstance(jti, str) or not 16 <= len(jti) <= 128:
            problems.append("has no usable jti")
        if problems:
            raise Unauthenticated(f"proof of possession rejected: the proof {'; '.join(problems)}")
        assert isinstance(iat, int) and isinstance(jti, str)
        if site is not None:
            self._remember(jti, iat + self.max_age + FUTURE_LEEWAY, now, jkt)

    def _verified_claims(self, proof: str, jkt: str) -> dict[str, Any]:
        if len(proof) > MAX_PROOF_LENGTH:
            raise Unauthenticated("proof of possession rejected: too long")
        try:
            header = jwt.get_unverified_header(proof)
            jwk = header.get("jwk")
            if header.get("typ") != PROOF_TYPE or not isinstance(jwk, dict):
                raise ValueError(f"not a {PROOF_TYPE} with a jwk header")
            if "d" in jwk:
                raise ValueError("the proof's jwk holds a private key")
            if thumbprint(jwk) != jkt:
                raise ValueError("signed with a key other than the token's")
            key = jwt.PyJWK.from_dict(jwk)
            algorithm = {"P-256": "ES256", "P-384": "ES384", "Ed25519": "EdDSA"}.get(str(jwk.get("crv")))
            if algorithm is None or header.get("alg") != algorithm:
                raise ValueError(f"algorithm {header.get('alg')!r} does not fit the key")
            claims: dict[str, Any] = jwt.decode(proof, key.key, algorithms=[algorithm],
                                                options={"verify_aud": False, "verify_iss": False,
                                                                                "verify_iat": False})
        except (jwt.PyJWTError, ValueError, TypeError, KeyError) as err:
            raise Unauthenticated(f"proof of possession rejected: {_plain(err)}") from None
        return claims

    def _remember(self, jti: str, forget_at: float, now: float, key: str) -> None:
        with self._lock:
            while self._seen and next(iter(self._seen.values()))[0] < now:
                _, (_, old_key) = self._seen.popitem(last=False)
                self._per_key[old_key] -= 1
                if not self._per_key[old_key]:
                    del self._per_key[old_key]
            if jti in self._seen:
                raise Unauthenticated("proof of possession rejected: this proof was already used "
                                      "(sign a fresh one per call)")
            if self._per_key[key] >= self.per_key_limit:
                raise Unavailable(f"more than {self.per_key_limit} calls with this key in {self.max_age} s; slow down "
                                  "and retry shortly")
            if len(self._seen) >= self.cache_limit:
                raise Unavailable("too many calls in flight to check for replays; retry shortly")
            self._seen[jti] = (forget_at, key)  # iat + a constant: entries arrive nearly in expiry order
            self._per_key[key] += 1


class ProofCarrier(Protocol):
    """A request message with a ``proofs`` map (every gateway.v1 request)."""

    @property
    def proofs(self) -> Mapping[str, str]: ...


class BoundIdentity(Protocol):
    """What the checks need of a verified token: its key binding and hash."""

    @property
    def jkt(self) -> str | None: ...

    @property
    def ath(self) -> str: ...


def check_possession(checker: ProofChecker, identity: BoundIdentity, request: Any, site: str) -> None:
    """A site's check: the call carries a valid, fresh, unused proof addressed to ``site``.

    Without one, a caller that shows it holds the token's key (a valid proof addressed elsewhere, or
    to :data:`ANY_SERVER`) learns the name to sign for (:class:`ProofRequired`); anyone else learns
    only that a proof is needed.
    """
    proofs: Mapping[str, str] = request.proofs
    own = proofs.get(site)
    if own is not None:
        checker.check(own, request, identity.ath, identity.jkt, site)
        return
    if not proofs:
        if identity.jkt is None:
            checker.check("", request, identity.ath, None, None)  # raises: the token is not bound
        raise Unauthenticated("this call carries no proof of possession: sign one per call with the key "
                              "your token is bound to (the gateway client does this)")
    other = proofs.get(ANY_SERVER, next(iter(proofs.values())))
    checker.check(other, request, identity.ath, identity.jkt, None)
    raise ProofRequired([site], f"this site is {site!r}: sign the proof of possession for that name")


def _plain(err: Exception) -> str:
    text = str(err) or type(err).__name__
    return text[:200]
