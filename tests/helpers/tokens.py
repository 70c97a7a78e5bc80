"""A kit for forging JWTs: signed with any key, with any claims, or built by hand.

Tokens a real identity provider would never issue (wrong issuer, ``alg: none``, an HMAC keyed
with the public key, another key under a trusted key id, a flipped signature bit) are built
here once, so the verifier's tests and the site's tests attack it the same way.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization

from gateway.auth import DEV_AUDIENCE, DEV_ISSUER, key_id

DROP: Any = object()
"""A :func:`claims` override that removes the claim, e.g. ``claims(exp=DROP)``."""

OWN_KID: Any = object()
"""The default ``kid`` of :func:`sign`: the signing key's own key id."""


def claims(**overrides: Any) -> dict[str, Any]:
    """Claims the dev verifier accepts (alice, proj-1, researcher, valid for 5 minutes), with ``overrides``."""
    now = int(time.time())
    base: dict[str, Any] = {"sub": "alice", "project": "proj-1", "role": "researcher", "iss": DEV_ISSUER,
                            "aud": DEV_AUDIENCE, "iat": now, "nbf": now, "exp": now + 300}
    base.update(overrides)
    return {k: v for k, v in base.items() if v is not DROP}


def sign(private: Any, alg: str = "ES256", payload: dict[str, Any] | None = None, kid: Any = OWN_KID) -> str:
    """``payload`` (default :func:`claims`) signed by ``private`` with ``alg``.

    ``kid``: the header's key id; by default the signing key's own, ``None`` for no key id.
    """
    headers = {}
    if kid is OWN_KID:
        headers["kid"] = key_id(private.public_key())
    elif kid is not None:
        headers["kid"] = kid
    return jwt.encode(payload if payload is not None else claims(), private, algorithm=alg, headers=headers)


def craft(header: dict[str, Any], payload: dict[str, Any], signature: bytes = b"") -> str:
    """A token built by hand from its three parts (no library checks what goes in)."""
    h = b64url(json.dumps(header, separators=(",", ":")).encode())
    p = b64url(json.dumps(payload, separators=(",", ":")).encode())
    return f"{h}.{p}.{b64url(signature)}"


def hs256(secret: bytes, payload: dict[str, Any], kid: str | None = None) -> str:
    """An HS256 token keyed with ``secret``: with a public key's PEM, the classic algorithm confusion attack."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})).encode())
    body = b64url(json.dumps(payload).encode())
    signature = hmac.new(secret, f"{header}.{body}".encode(), hashlib.sha256).digest()
    return f"{header}.{body}.{b64url(signature)}"


def tamper_signature(token: str) -> str:
    """``token`` with one bit of its signature flipped."""
    header, payload, signature = token.split(".")
    raw = bytearray(b64url_decode(signature))
    raw[5] ^= 0x01
    return f"{header}.{payload}.{b64url(bytes(raw))}"


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def public_pem(private: Any) -> bytes:
    return private.public_key().public_bytes(serialization.Encoding.PEM,
                                             serialization.PublicFormat.SubjectPublicKeyInfo)


def private_pem(private: Any) -> bytes:
    return private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption())


def write_public(folder: Path, name: str, private: Any) -> Path:
    """The public half of ``private`` as ``folder/<name>.pub.pem``, for ``AuthConfig.from_files``."""
    path = folder / f"{name}.pub.pem"
    path.write_bytes(public_pem(private))
    return path


def load_private(path: Path) -> Any:
    """A private key from an unencrypted PEM file (e.g. the one ``generate_dev_key`` writes)."""
    return serialization.load_pem_private_key(path.read_bytes(), password=None)
