"""JWT authentication with PyJWT (DESIGN §9).

Tokens are verified against configured public keys (PEM files, a JWKS file, or an identity
provider's JWKS URL, cached and rotated by :mod:`._jwks`); algorithms are pinned to asymmetric
ones per key type, so ``alg: none`` and HMAC-with-a-public-key cannot pass. ``exp``, ``nbf``,
``iss`` and ``aud`` are checked with a small leeway; ``exp``, ``iat`` and ``nbf`` must be JSON
numbers; a token may live at most ``max_lifetime`` (``exp - iat``, or ``exp - now`` without
``iat``); ``sub``, ``project`` and ``role`` must be present. Callers learn only "invalid
credentials"; the log says why. A call made while the identity provider's keys have never
been fetched is UNAVAILABLE, not UNAUTHENTICATED: the token may well be good.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from ._jwks import JwksRefresh, RemoteKeys, check_url
from .errors import Unauthenticated
from .proof import token_hash

log = logging.getLogger("gateway.auth")

DEV_ISSUER = "gateway-dev"
DEV_AUDIENCE = "gateway"
PROJECT_CLAIM = "project"
ROLE_CLAIM = "role"
DEFAULT_MAX_LIFETIME = timedelta(hours=24)
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
    """Trusted keys (by key id, and/or an identity provider's JWKS URL) and what every token must carry."""

    keys: Mapping[str, PublicKey]
    issuer: str = DEV_ISSUER
    audience: str = DEV_AUDIENCE
    leeway_seconds: int = 30
    required_claims: tuple[str, ...] = field(default=("sub", PROJECT_CLAIM, ROLE_CLAIM))
    max_lifetime: timedelta = DEFAULT_MAX_LIFETIME
    jwks_url: str | None = None  # https (http only to a loopback host); fetched when the Verifier starts
    jwks_refresh: JwksRefresh = field(default_factory=JwksRefresh)

    def __post_init__(self) -> None:
        if not self.keys and self.jwks_url is None:
            raise ValueError("no trusted keys configured (give PEM keys, a JWKS file or a JWKS URL)")
        if self.jwks_url is not None:
            check_url(self.jwks_url)
        if self.max_lifetime <= timedelta(0):
            raise ValueError("the maximum token lifetime must be positive")

    @classmethod
    def from_files(cls, pem_files: Sequence[Path] = (), jwks_file: Path | None = None,
                   issuer: str = DEV_ISSUER, audience: str = DEV_AUDIENCE, *, jwks_url: str | None = None,
                   max_lifetime: timedelta = DEFAULT_MAX_LIFETIME) -> AuthConfig:
        """Load trusted public keys from PEM files (key id = thumbprint) and/or a JWKS file; add a JWKS URL."""
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
        return cls(keys, issuer, audience, max_lifetime=max_lifetime, jwks_url=jwks_url)


def _usable_key(key: object, source: Path) -> PublicKey:
    """Only public keys of a type and curve we pin an algorithm for may be trusted."""
    usable = _public_key(key)
    if usable is None:
        raise ValueError(f"{source}: unsupported key (use an RSA, EC P-256/384/521 or Ed25519 public key)")
    return usable


def _public_key(key: object) -> PublicKey | None:
    return key if isinstance(key, PublicKey) and _algorithms(key) else None


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
    """Verifies bearer tokens into :class:`Identity` values.

    With a JWKS URL in the config, the keys are fetched here, once, before the first call (a
    provider that does not answer is logged, and calls get UNAVAILABLE until it does).
    """

    def __init__(self, config: AuthConfig, cache_size: int = 1024) -> None:
        self.config = config
        # token text -> (identity, exp, nbf, key): a token's signature and claims never change, so a
        # verified token is re-checked only against the clock and against the key still being
        # trusted (saves an ECDSA verify per call; a key the provider dropped stops its tokens)
        self._verified: OrderedDict[str, tuple[Identity, float, float, PublicKey]] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._remote: RemoteKeys[PublicKey] | None = None
        if config.jwks_url is not None:
            self._remote = RemoteKeys(config.jwks_url, config.jwks_refresh, _public_key)
            self._remote.start()

    def verify(self, authorization: str | None) -> Identity:
        """Check an ``authorization`` metadata value.

        Raises :class:`Unauthenticated` for any bad credentials, and
        :class:`~gateway.errors.Unavailable` while the identity provider's keys cannot be fetched.
        """
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
            claims, key = self._decode(token)
            identity = Identity(str(claims["sub"]), str(claims.get(PROJECT_CLAIM, "")), str(claims[ROLE_CLAIM]),
                                _bound_key(claims), token_hash(token))
        except (jwt.PyJWTError, ValueError, TypeError, OverflowError) as err:
            log.warning("rejected token: %s: %s", type(err).__name__, err)
            raise Unauthenticated("invalid or expired credentials; get a fresh token") from None
        # exp is bounded by the lifetime check and nbf by the clock, so both fit a float
        entry = (identity, float(claims["exp"]), float(max(claims.get("nbf", 0), 0)), key)
        with self._lock:
            self._verified[token] = entry
            while len(self._verified) > self._cache_size:
                self._verified.popitem(last=False)
        return identity

    def _cached(self, token: str) -> Identity | None:
        with self._lock:
            entry = self._verified.get(token)
            if entry is None:
                return None
            identity, exp, nbf, key = entry
            now, leeway = time.time(), self.config.leeway_seconds
            if now > exp + leeway or now < nbf - leeway or not self._still_trusted(key):
                del self._verified[token]
                return None  # decode again: it rejects the token and logs why
            self._verified.move_to_end(token)
            return identity

    def _still_trusted(self, key: PublicKey) -> bool:
        if self._remote is None:
            return True  # configured keys never change under a running verifier
        return any(k is key for k in (*self.config.keys.values(), *self._remote.held().values()))

    def _signing_key(self, kid: object) -> PublicKey:
        """The trusted key a token's ``kid`` names (fetching a rotated provider key: see :mod:`._jwks`)."""
        if kid is None:  # only unambiguous with exactly one configured key and no provider
            if len(self.config.keys) == 1 and self._remote is None:
                return next(iter(self.config.keys.values()))
            raise jwt.InvalidKeyError("token has no key id")
        key = self.config.keys.get(str(kid))
        if key is None and self._remote is not None:
            key = self._remote.key(str(kid))
        if key is None:
            raise jwt.InvalidKeyError(f"unknown key id {kid!r}")
        return key

    def _decode(self, token: str) -> tuple[dict[str, Any], PublicKey]:
        header = jwt.get_unverified_header(token)
        key = self._signing_key(header.get("kid"))
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
        _check_times(claims, self.config.max_lifetime)
        return claims, key


def _check_times(claims: Mapping[str, Any], max_lifetime: timedelta) -> None:
    """``exp``, ``iat``, ``nbf`` are JSON numbers (PyJWT takes ``"123"``); the token lives at most ``max_lifetime``."""
    for name in ("exp", "iat", "nbf"):
        if name in claims and not _is_number(claims[name]):
            raise jwt.InvalidTokenError(f"{name} must be a JSON number, not {type(claims[name]).__name__}")
    issued = claims.get("iat")
    start = issued if issued is not None else int(time.time())
    # compared, never subtracted: a huge integer exp cannot overflow a float here
    if claims["exp"] > start + int(max_lifetime.total_seconds()):
        since = "iat" if issued is not None else "now"
        raise jwt.InvalidTokenError(f"token lifetime over the maximum: exp is more than "
                                    f"{max_lifetime.total_seconds():.0f} s after {since}")


def _is_number(value: object) -> bool:
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))  # ints may not fit a float


def authorization_header(metadata: Iterable[tuple[str, str | bytes]]) -> str | None:
    """The one ``authorization`` value of a call's metadata (None without one); two are refused.

    gRPC delivers every copy of a repeated header: which one to believe must not be a guess.
    """
    values = [value for key, value in metadata if key == "authorization"]
    if len(values) > 1:
        raise Unauthenticated("send one authorization header")
    return str(values[0]) if values else None


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
