"""JWT authentication with PyJWT (DESIGN §9).

Tokens are verified against configured public keys (PEM files or a JWKS file); algorithms are
pinned to asymmetric ones per key type, so ``alg: none`` and HMAC-with-a-public-key cannot pass.
``exp``, ``nbf``, ``iss`` and ``aud`` are checked with a small leeway; ``sub``, ``project`` and
``role`` must be present. Callers learn only "invalid credentials"; the log says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from .errors import Unauthenticated
from .proof import token_hash

log = logging.getLogger("gateway.auth")

DEV_ISSUER = "gateway-dev"
DEV_AUDIENCE = "gateway"
PROJECT_CLAIM = "project"
ROLE_CLAIM = "role"
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey


@dataclass(frozen=True)
class Identity:
    """Who is calling: token subject, the project whose budget they spend, and their role."""

    subject: str
    project: str
    role: str
    # the thumbprint of the key the token is bound to (``cnf.jkt``), and the token's hash for proofs
    jkt: str | None = field(default=None, compare=False)
    ath: str = field(default="", compare=False, repr=False)


@dataclass(frozen=True)
class AuthConfig:
    """Trusted keys (by key id) and the issuer/audience every token must carry."""

    keys: Mapping[str, PublicKey]
    issuer: str = DEV_ISSUER
    audience: str = DEV_AUDIENCE
    leeway_seconds: int = 30
    required_claims: tuple[str, ...] = field(default=("sub", PROJECT_CLAIM, ROLE_CLAIM))

    @classmethod
    def from_files(cls, pem_files: Sequence[Path] = (), jwks_file: Path | None = None,
                   issuer: str = DEV_ISSUER, audience: str = DEV_AUDIENCE) -> AuthConfig:
        """Load trusted public keys from PEM files (key id = thumbprint) and/or a JWKS file."""
        keys: dict[str, PublicKey] = {}
        for path in pem_files:
            key = serialization.load_pem_public_key(path.read_bytes())
            keys[key_id(_usable_key(key, path))] = _usable_key(key, path)
        if jwks_file is not None:
            try:
                jwks = jwt.PyJWKSet.from_json(jwks_file.read_text()).keys
            except (jwt.PyJWTError, AttributeError, TypeError, ValueError) as err:
                raise ValueError(f"{jwks_file}: not a usable JWKS key set ({err})") from None
            for jwk in jwks:
                if not jwk.key_id:
                    raise ValueError(f"{jwks_file}: every JWKS key needs a kid")
                keys[jwk.key_id] = _usable_key(jwk.key, jwks_file)
        if not keys:
            raise ValueError("no trusted keys configured")
        return cls(keys, issuer, audience)


def _usable_key(key: object, source: Path) -> PublicKey:
    """Only public keys of a type and curve we pin an algorithm for may be trusted."""
    if not isinstance(key, PublicKey) or not _algorithms(key):
        raise ValueError(f"{source}: unsupported key (use an RSA, EC P-256/384/521 or Ed25519 public key)")
    return key


def key_id(key: PublicKey) -> str:
    """A stable key id: the first 16 hex digits of the SHA-256 of the DER public key."""
    der = key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return hashlib.sha256(der).hexdigest()[:16]


def _algorithms(key: PublicKey) -> list[str]:
    if isinstance(key, rsa.RSAPublicKey):
        return ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512"]
    if isinstance(key, ec.EllipticCurvePublicKey):
        return {"secp256r1": ["ES256"], "secp384r1": ["ES384"], "secp521r1": ["ES512"]}.get(key.curve.name, [])
    return ["EdDSA"]


class Verifier:
    """Verifies bearer tokens into :class:`Identity` values."""

    def __init__(self, config: AuthConfig, cache_size: int = 1024) -> None:
        self.config = config
        # token text -> (identity, exp, nbf): a token's signature and claims never change, so a
        # verified token is re-checked only against the clock (saves an ECDSA verify per call)
        self._verified: OrderedDict[str, tuple[Identity, float, float]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def verify(self, authorization: str | None) -> Identity:
        """Check an ``authorization`` metadata value; raise :class:`Unauthenticated` on any failure."""
        if not authorization:
            raise Unauthenticated("missing credentials: send 'authorization: Bearer <token>' metadata")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthenticated("malformed credentials: expected 'authorization: Bearer <token>'")
        token = token.strip()
        cached = self._cached(token)
        if cached is not None:
            return cached
        try:
            claims = self._decode(token)
            identity = Identity(str(claims["sub"]), str(claims[PROJECT_CLAIM]), str(claims[ROLE_CLAIM]),
                                _bound_key(claims), token_hash(token))
        except (jwt.PyJWTError, ValueError, TypeError) as err:
            log.warning("rejected token: %s: %s", type(err).__name__, err)
            raise Unauthenticated("invalid or expired credentials; get a fresh token") from None
        with self._lock:
            self._verified[token] = (identity, float(claims["exp"]), float(claims.get("nbf", 0)))
            while len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)
        return identity

    def _cached(self, token: str) -> Identity | None:
        with self._lock:
            entry = self._verified.get(token)
            if entry is None:
                return None
            identity, exp, nbf = entry
            now, leeway = time.time(), self.config.leeway_seconds
            if now > exp + leeway or now < nbf - leeway:
                del self._verified[token]
                return None  # decode again: it rejects the token and logs why
            self._verified.move_to_end(token)
            return identity

    def _decode(self, token: str) -> dict[str, Any]:
        header = jwt.get_unverified_header(token)
        kid = header.get("kid")
        if kid is None and len(self.config.keys) == 1:
            kid = next(iter(self.config.keys))
        key = self.config.keys.get(str(kid))
        if key is None:
            raise jwt.InvalidKeyError(f"unknown key id {kid!r}")
        allowed = _algorithms(key)
        if header.get("alg") not in allowed:
            raise jwt.InvalidAlgorithmError(f"algorithm {header.get('alg')!r} not allowed for this key")
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=allowed, audience=self.config.audience, issuer=self.config.issuer,
            leeway=self.config.leeway_seconds,
            options={"require": ["exp", "iss", "aud", *self.config.required_claims]})
        for claim in self.config.required_claims:
            if not isinstance(claims.get(claim), str) or not claims[claim].strip():
                raise jwt.MissingRequiredClaimError(claim)
        return claims


def _bound_key(claims: Mapping[str, Any]) -> str | None:
    """``cnf.jkt``: the thumbprint of the key the token is bound to (None for a bearer-only token)."""
    cnf = claims.get("cnf")
    if cnf is None:
        return None
    if not isinstance(cnf, dict) or not isinstance(cnf.get("jkt"), str) or not 20 <= len(cnf["jkt"]) <= 100:
        raise jwt.InvalidTokenError("cnf must be an object with a jkt thumbprint")
    return str(cnf["jkt"])


def generate_dev_key(out_dir: Path) -> tuple[Path, Path]:
    """Write a DEVELOPMENT-ONLY EC P-256 signing key pair; returns (private, public) PEM paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    private = ec.generate_private_key(ec.SECP256R1())
    priv_path, pub_path = out_dir / "dev-signing-key.pem", out_dir / "dev-signing-key.pub.pem"
    priv_path.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
    priv_path.chmod(0o600)
    pub_path.write_bytes(private.public_key().public_bytes(serialization.Encoding.PEM,
                                                           serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv_path, pub_path


def mint_dev_token(private_pem: bytes, subject: str, project: str, role: str = "researcher",
                   ttl: timedelta = timedelta(hours=1), issuer: str = DEV_ISSUER,
                   audience: str = DEV_AUDIENCE, extra: Mapping[str, Any] | None = None,
                   proof_jkt: str | None = None) -> str:
    """Sign a DEVELOPMENT token with a local private key (production tokens come from your IdP).

    ``proof_jkt``: bind the token to the caller's proof key (its thumbprint, ``ProofKey.jkt``);
    sites accept only bound tokens, with a proof per call (:mod:`gateway.proof`).
    """
    key = serialization.load_pem_private_key(private_pem, password=None)
    if isinstance(key, ec.EllipticCurvePrivateKey):
        alg = "ES256"
    elif isinstance(key, rsa.RSAPrivateKey):
        alg = "RS256"
    elif isinstance(key, ed25519.Ed25519PrivateKey):
        alg = "EdDSA"
    else:
        raise ValueError("unsupported private key type (use EC P-256, RSA or Ed25519)")
    now = datetime.now(UTC)
    claims: dict[str, Any] = {"sub": subject, PROJECT_CLAIM: project, ROLE_CLAIM: role, "iss": issuer,
                              "aud": audience, "iat": now, "nbf": now, "exp": now + ttl, "dev": True}
    if proof_jkt is not None:
        claims["cnf"] = {"jkt": proof_jkt}
    claims.update(extra or {})
    return jwt.encode(claims, key, algorithm=alg, headers={"kid": key_id(key.public_key())})


def parse_ttl(text: str) -> timedelta:
    """``90s``, ``15m``, ``1h`` or ``7d`` as a duration."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if len(text) < 2 or text[-1] not in units or not text[:-1].isdigit() or int(text[:-1]) <= 0:
        raise ValueError(f"bad ttl {text!r}: use e.g. 90s, 15m, 1h, 7d")
    return timedelta(seconds=int(text[:-1]) * units[text[-1]])


def dump_jwks(keys: Mapping[str, PublicKey]) -> str:
    """A JWKS document for the given keys (for handing to another site's config)."""
    out = []
    for kid, key in keys.items():
        jwk = json.loads(jwt.algorithms.get_default_algorithms()[_algorithms(key)[0]].to_jwk(key))
        jwk["kid"] = kid
        out.append(jwk)
    return json.dumps({"keys": out}, indent=2)
