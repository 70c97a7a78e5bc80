"""Contract tests for gateway.auth: Verifier, AuthConfig.from_files, dev keys/tokens, parse_ttl."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed25519, rsa

from gateway.auth import (
    DEV_AUDIENCE,
    DEV_ISSUER,
    AuthConfig,
    Identity,
    Verifier,
    authorization_header,
    dump_jwks,
    generate_dev_key,
    key_id,
    mint_dev_token,
    parse_ttl,
)
from gateway.errors import Unauthenticated
from tests.helpers.tokens import (
    DROP,
    b64url,
    b64url_decode,
    claims,
    craft,
    hs256,
    private_pem,
    public_pem,
    sign,
    tamper_signature,
    write_public,
)

EXPECTED = Identity("alice", "proj-1", "researcher")
DAY = 86400


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ed_key() -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.generate()


@pytest.fixture
def verifier(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> Verifier:
    return Verifier(AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)]))


# -- accepted tokens ----------------------------------------------------------------------------


def test_dev_key_and_dev_token_round_trip(tmp_path: Path) -> None:
    priv_path, pub_path = generate_dev_key(tmp_path / "keys")
    assert priv_path == tmp_path / "keys" / "dev-signing-key.pem"
    assert pub_path == tmp_path / "keys" / "dev-signing-key.pub.pem"
    assert priv_path.stat().st_mode & 0o777 == 0o600
    config = AuthConfig.from_files([pub_path])
    public = serialization.load_pem_public_key(pub_path.read_bytes())
    assert list(config.keys) == [key_id(public)]  # type: ignore[arg-type]
    token = mint_dev_token(priv_path.read_bytes(), "alice", "proj-1")
    assert jwt.get_unverified_header(token) == {"alg": "ES256", "kid": key_id(public), "typ": "JWT"}  # type: ignore[arg-type]
    assert Verifier(config).verify(f"Bearer {token}") == EXPECTED
    admin = mint_dev_token(priv_path.read_bytes(), "bob", "proj-2", role="officer")
    assert Verifier(config).verify(f"bearer {admin}") == Identity("bob", "proj-2", "officer")


def test_verify_strips_whitespace_around_token(verifier: Verifier, ec_key: ec.EllipticCurvePrivateKey) -> None:
    assert verifier.verify(f"Bearer   {sign(ec_key, 'ES256')}  ") == EXPECTED


@pytest.mark.parametrize("kind", ["rsa", "ed25519"])
def test_rsa_and_ed25519_keys_via_pem(tmp_path: Path, kind: str, rsa_key: rsa.RSAPrivateKey,
                                      ed_key: ed25519.Ed25519PrivateKey) -> None:
    private: Any = rsa_key if kind == "rsa" else ed_key
    config = AuthConfig.from_files([write_public(tmp_path, kind, private)])
    assert list(config.keys) == [key_id(private.public_key())]
    token = mint_dev_token(private_pem(private), "alice", "proj-1")
    expected_alg = "RS256" if kind == "rsa" else "EdDSA"
    assert jwt.get_unverified_header(token)["alg"] == expected_alg
    assert Verifier(config).verify(f"Bearer {token}") == EXPECTED
    assert Verifier(config).verify(f"Bearer {sign(private, expected_alg)}") == EXPECTED


def test_rsa_pss_and_es384_accepted(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1())
    verifier = Verifier(AuthConfig.from_files([write_public(tmp_path, "rsa", rsa_key),
                                               write_public(tmp_path, "p384", p384)]))
    assert verifier.verify(f"Bearer {sign(rsa_key, 'PS256')}") == EXPECTED
    assert verifier.verify(f"Bearer {sign(p384, 'ES384')}") == EXPECTED


def test_jwks_file_from_dump_jwks(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey,
                                  ed_key: ed25519.Ed25519PrivateKey) -> None:
    pem_config = AuthConfig.from_files([write_public(tmp_path, "ec", ec_key), write_public(tmp_path, "rsa", rsa_key),
                                        write_public(tmp_path, "ed", ed_key)])
    document = json.loads(dump_jwks(pem_config.keys))
    kids = [key_id(k.public_key()) for k in (ec_key, rsa_key, ed_key)]
    assert [k["kid"] for k in document["keys"]] == kids
    assert [k["kty"] for k in document["keys"]] == ["EC", "RSA", "OKP"]
    assert all("d" not in k for k in document["keys"])  # no private parts
    jwks_path = tmp_path / "trusted.jwks.json"
    jwks_path.write_text(dump_jwks(pem_config.keys))
    config = AuthConfig.from_files(jwks_file=jwks_path)
    assert sorted(config.keys) == sorted(kids)
    verifier = Verifier(config)
    for private, alg in ((ec_key, "ES256"), (rsa_key, "RS256"), (ed_key, "EdDSA")):
        assert verifier.verify(f"Bearer {sign(private, alg)}") == EXPECTED
    # a token with one key's kid but signed by another trusted key is still rejected
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {sign(ec_key, 'ES256', kid=key_id(rsa_key.public_key()))}")


def test_pem_and_jwks_combined(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey,
                               ed_key: ed25519.Ed25519PrivateKey) -> None:
    jwks_path = tmp_path / "jwks.json"
    jwks_path.write_text(dump_jwks({"ed-kid": ed_key.public_key()}))
    config = AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)], jwks_file=jwks_path)
    assert sorted(config.keys) == sorted([key_id(ec_key.public_key()), "ed-kid"])
    verifier = Verifier(config)
    assert verifier.verify(f"Bearer {sign(ed_key, 'EdDSA', kid='ed-kid')}") == EXPECTED
    assert verifier.verify(f"Bearer {sign(ec_key, 'ES256')}") == EXPECTED


def test_token_without_kid_only_with_exactly_one_key(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey,
                                                     ed_key: ed25519.Ed25519PrivateKey) -> None:
    token = sign(ec_key, "ES256", kid=None)
    assert "kid" not in jwt.get_unverified_header(token)
    single = Verifier(AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)]))
    assert single.verify(f"Bearer {token}") == EXPECTED
    double = Verifier(AuthConfig.from_files([write_public(tmp_path, "ec", ec_key),
                                             write_public(tmp_path, "ed", ed_key)]))
    with pytest.raises(Unauthenticated):
        double.verify(f"Bearer {token}")
    assert double.verify(f"Bearer {sign(ec_key, 'ES256')}") == EXPECTED


def test_expired_within_leeway_is_accepted(verifier: Verifier, ec_key: ec.EllipticCurvePrivateKey) -> None:
    now = int(time.time())
    token = sign(ec_key, "ES256", claims(iat=now - 300, nbf=now - 300, exp=now - 10))
    assert verifier.verify(f"Bearer {token}") == EXPECTED


def test_nbf_within_leeway_is_accepted(verifier: Verifier, ec_key: ec.EllipticCurvePrivateKey) -> None:
    now = int(time.time())
    token = sign(ec_key, "ES256", claims(nbf=now + 10))
    assert verifier.verify(f"Bearer {token}") == EXPECTED


def test_custom_issuer_and_audience(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    config = AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)], issuer="https://idp.example",
                                   audience="site-a")
    verifier = Verifier(config)
    assert verifier.verify(f"Bearer {sign(ec_key, 'ES256', claims(iss='https://idp.example', aud='site-a'))}") \
        == EXPECTED
    assert verifier.verify(f"Bearer {sign(ec_key, 'ES256', claims(iss='https://idp.example', aud=['x', 'site-a']))}") \
        == EXPECTED
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {sign(ec_key, 'ES256')}")  # dev issuer/audience no longer trusted


# -- rejected tokens ----------------------------------------------------------------------------

GENERIC_WORDS = ("audience", "issuer", "signature", "kid", "key id", "algorithm", "nbf", "exp ", "claim",
                 "project", "role", "sub", "hmac", "none", "decode", "padding", "json")


def _bad_tokens(ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey) -> dict[str, str]:
    """Token-level failures: every one must yield the same generic message."""
    now = int(time.time())
    kid = key_id(ec_key.public_key())
    good = sign(ec_key, "ES256")
    header, payload, signature = good.split(".")
    tampered_payload = json.loads(b64url_decode(payload))
    tampered_payload["project"] = "someone-elses-project"
    other = ec.generate_private_key(ec.SECP256R1())
    return {
        "expired": sign(ec_key, "ES256", claims(iat=now - 600, nbf=now - 600, exp=now - 60)),
        "nbf in future": sign(ec_key, "ES256", claims(nbf=now + 120)),
        "wrong issuer": sign(ec_key, "ES256", claims(iss="evil-issuer")),
        "wrong audience": sign(ec_key, "ES256", claims(aud="other-service")),
        "missing aud": sign(ec_key, "ES256", claims(aud=DROP)),
        "missing iss": sign(ec_key, "ES256", claims(iss=DROP)),
        "missing exp": sign(ec_key, "ES256", claims(exp=DROP)),
        "missing sub": sign(ec_key, "ES256", claims(sub=DROP)),
        "missing project": sign(ec_key, "ES256", claims(project=DROP)),
        "missing role": sign(ec_key, "ES256", claims(role=DROP)),
        "empty project": sign(ec_key, "ES256", claims(project="")),
        "blank project": sign(ec_key, "ES256", claims(project="   ")),
        "empty role": sign(ec_key, "ES256", claims(role="")),
        "non-string project": sign(ec_key, "ES256", claims(project=42)),
        "tampered payload": f"{header}.{b64url(json.dumps(tampered_payload).encode())}.{signature}",
        "tampered signature": tamper_signature(good),
        "missing signature": f"{header}.{payload}.",
        "alg none": craft({"alg": "none", "typ": "JWT", "kid": kid}, claims()),
        "alg none without kid": craft({"alg": "none", "typ": "JWT"}, claims()),
        "alg None capitalised": craft({"alg": "None", "typ": "JWT", "kid": kid}, claims()),
        "hs256 with public pem": hs256(public_pem(ec_key), claims(), kid),
        "rs256 header on ec key": craft({"alg": "RS256", "typ": "JWT", "kid": kid}, claims(), b"\x00" * 64),
        "unknown kid": sign(ec_key, "ES256", kid="0123456789abcdef"),
        "other key, trusted kid": sign(other, "ES256", kid=kid),
        "untrusted rsa key": sign(rsa_key, "RS256"),
        "garbage": "not-a-jwt",
        "garbage dots": "a.b.c",
        "header not json": f"{b64url(b'nope')}.{payload}.{signature}",
        "header is a list": f"{b64url(b'[1,2]')}.{payload}.{signature}",
        "payload not json": f"{header}.{b64url(b'nope')}.{signature}",
        "string exp": sign(ec_key, "ES256", claims(exp=str(now + 300))),
        "boolean exp": sign(ec_key, "ES256", claims(exp=True)),
        "string iat": sign(ec_key, "ES256", claims(iat=str(now))),
        "string nbf": sign(ec_key, "ES256", claims(nbf=str(now))),
        "boolean nbf": sign(ec_key, "ES256", claims(nbf=True)),
        "infinite exp": sign(ec_key, "ES256", claims(exp=math.inf)),
        "huge exp": sign(ec_key, "ES256", claims(exp=10**400)),
        "lifetime over 24h": sign(ec_key, "ES256", claims(iat=now, exp=now + DAY + 1)),
        "lifetime over 24h without iat": sign(ec_key, "ES256", claims(iat=DROP, exp=now + DAY + 60)),
    }


BAD_TOKEN_CASES = ["expired", "nbf in future", "wrong issuer", "wrong audience", "missing aud", "missing iss",
                   "missing exp", "missing sub", "missing project", "missing role", "empty project",
                   "blank project", "empty role", "non-string project", "tampered payload", "tampered signature",
                   "missing signature", "alg none", "alg none without kid", "alg None capitalised",
                   "hs256 with public pem", "rs256 header on ec key", "unknown kid", "other key, trusted kid",
                   "untrusted rsa key", "garbage", "garbage dots", "header not json", "header is a list",
                   "payload not json", "string exp", "boolean exp", "string iat", "string nbf", "boolean nbf",
                   "infinite exp", "huge exp", "lifetime over 24h", "lifetime over 24h without iat"]


@pytest.fixture(scope="module")
def bad_tokens(ec_key: ec.EllipticCurvePrivateKey, rsa_key: rsa.RSAPrivateKey) -> dict[str, str]:
    tokens = _bad_tokens(ec_key, rsa_key)
    assert sorted(tokens) == sorted(BAD_TOKEN_CASES)
    return tokens


def _generic_message(verifier: Verifier) -> str:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify("Bearer not-a-jwt")
    return info.value.message


@pytest.mark.parametrize("case", BAD_TOKEN_CASES)
def test_bad_token_rejected_with_generic_message(verifier: Verifier, bad_tokens: dict[str, str], case: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    generic = _generic_message(verifier)
    caplog.clear()
    caplog.set_level(logging.DEBUG, logger="gateway.auth")
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(f"Bearer {bad_tokens[case]}")
    assert type(info.value) is Unauthenticated
    assert info.value.message == generic
    assert str(info.value) == generic
    assert info.value.__cause__ is None  # the reason is not chained onto what the caller sees
    assert info.value.__suppress_context__ is True
    warnings = [r for r in caplog.records if r.name == "gateway.auth"]
    assert [r.levelno for r in warnings] == [logging.WARNING]
    assert warnings[0].getMessage().startswith("rejected token: ")


def test_generic_message_reveals_no_check(verifier: Verifier) -> None:
    generic = _generic_message(verifier)
    assert not [w for w in GENERIC_WORDS if w in generic.lower()]


def test_hs256_with_rsa_public_pem_rejected(tmp_path: Path, rsa_key: rsa.RSAPrivateKey) -> None:
    verifier = Verifier(AuthConfig.from_files([write_public(tmp_path, "rsa", rsa_key)]))
    generic = _generic_message(verifier)
    for kid in (key_id(rsa_key.public_key()), None):
        with pytest.raises(Unauthenticated) as info:
            verifier.verify(f"Bearer {hs256(public_pem(rsa_key), claims(), kid)}")
        assert info.value.message == generic


@pytest.mark.parametrize("authorization", ["", None, "Basic x", "Basic dXNlcjpwYXNz", "Bearer", "Bearer ",
                                           "Bearer    ", "Token abc", "Bearerabc"])
def test_missing_or_malformed_header_rejected(verifier: Verifier, authorization: str | None) -> None:
    with pytest.raises(Unauthenticated) as info:
        verifier.verify(authorization)
    assert type(info.value) is Unauthenticated
    assert not [w for w in GENERIC_WORDS if w in info.value.message.lower()]


def test_header_problems_share_messages(verifier: Verifier) -> None:
    """Header-format failures say only that the header is missing or malformed, never more."""
    def message(value: str | None) -> str:
        with pytest.raises(Unauthenticated) as info:
            verifier.verify(value)
        return info.value.message

    assert message("") == message(None)
    assert message("Basic x") == message("Bearer ") == message("Bearer") == message("Token abc")


# -- logging ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("case", "reason"), [
    ("expired", "ExpiredSignatureError"),
    ("nbf in future", "ImmatureSignatureError"),
    ("wrong audience", "InvalidAudienceError"),
    ("wrong issuer", "InvalidIssuerError"),
    ("missing project", "MissingRequiredClaimError"),
    ("empty project", "MissingRequiredClaimError"),
    ("tampered signature", "InvalidSignatureError"),
    ("other key, trusted kid", "InvalidSignatureError"),
    ("alg none", "InvalidAlgorithmError"),
    ("hs256 with public pem", "InvalidAlgorithmError"),
    ("unknown kid", "unknown key id '0123456789abcdef'"),
    ("garbage", "DecodeError"),
    ("string exp", "exp must be a JSON number, not str"),
    ("string iat", "iat must be a JSON number, not str"),
    ("boolean nbf", "nbf must be a JSON number, not bool"),
    ("lifetime over 24h", "token lifetime over the maximum: exp is more than 86400 s after iat"),
    ("lifetime over 24h without iat", "token lifetime over the maximum: exp is more than 86400 s after now"),
])
def test_log_records_specific_reason(verifier: Verifier, bad_tokens: dict[str, str], caplog: pytest.LogCaptureFixture,
                                     case: str, reason: str) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.auth")
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {bad_tokens[case]}")
    records = [r for r in caplog.records if r.name == "gateway.auth"]
    assert len(records) == 1
    assert records[0].levelno == logging.WARNING
    assert reason in records[0].getMessage()


def test_log_mentions_audience(verifier: Verifier, bad_tokens: dict[str, str],
                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.auth")
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {bad_tokens['wrong audience']}")
    assert [r.levelname for r in caplog.records if r.name == "gateway.auth"] == ["WARNING"]
    assert "audience" in caplog.text.lower()


def test_accepted_token_logs_no_warning(verifier: Verifier, ec_key: ec.EllipticCurvePrivateKey,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway.auth")
    verifier.verify(f"Bearer {sign(ec_key, 'ES256')}")
    assert [r for r in caplog.records if r.name == "gateway.auth" and r.levelno >= logging.WARNING] == []


# -- dev tokens ---------------------------------------------------------------------------------


def test_mint_dev_token_ttl_and_extra(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    verifier = Verifier(AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)]))
    pem = private_pem(ec_key)
    token = mint_dev_token(pem, "alice", "proj-1", ttl=timedelta(minutes=15))
    payload = jwt.decode(token, options={"verify_signature": False})
    assert payload["exp"] - payload["iat"] == 900
    assert (payload["iss"], payload["aud"], payload["dev"]) == (DEV_ISSUER, DEV_AUDIENCE, True)
    expired = mint_dev_token(pem, "alice", "proj-1", ttl=timedelta(seconds=-120))
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {expired}")
    other_aud = mint_dev_token(pem, "alice", "proj-1", audience="elsewhere")
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {other_aud}")
    overridden = mint_dev_token(pem, "alice", "proj-1", extra={"role": "officer"})
    assert verifier.verify(f"Bearer {overridden}") == Identity("alice", "proj-1", "officer")


def test_mint_dev_token_rejects_unsupported_key() -> None:
    pem = private_pem(dsa.generate_private_key(1024))
    with pytest.raises(ValueError, match="unsupported private key type"):
        mint_dev_token(pem, "alice", "proj-1")


# -- parse_ttl ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "expected"), [
    ("90s", timedelta(seconds=90)),
    ("15m", timedelta(minutes=15)),
    ("1h", timedelta(hours=1)),
    ("7d", timedelta(days=7)),
    ("1s", timedelta(seconds=1)),
    ("100d", timedelta(days=100)),
])
def test_parse_ttl_accepts(text: str, expected: timedelta) -> None:
    assert parse_ttl(text) == expected


@pytest.mark.parametrize("text", ["0h", "0s", "00m", "1x", "", "h", "s", "-1h", "+1h", "1.5h", " 1h", "1h ", "1H",
                                  "1 h", "1hh", "1", "10"])
def test_parse_ttl_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad ttl"):
        parse_ttl(text)


# -- AuthConfig.from_files ----------------------------------------------------------------------


def test_from_files_without_keys_raises() -> None:
    with pytest.raises(ValueError, match="no trusted keys configured"):
        AuthConfig.from_files()
    with pytest.raises(ValueError, match="no trusted keys configured"):
        AuthConfig.from_files([], None)


def test_from_files_defaults(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    config = AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)])
    assert (config.issuer, config.audience, config.leeway_seconds) == (DEV_ISSUER, DEV_AUDIENCE, 30)
    assert config.required_claims == ("sub", "project", "role")
    assert key_id(ec_key.public_key()) == hashlib.sha256(
        ec_key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)).hexdigest()[:16]


@pytest.mark.parametrize("content", [b"hello world\n", b"",
                                     b"-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_from_files_non_key_pem_raises_value_error(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "not-a-key.pem"
    path.write_bytes(content)
    with pytest.raises(ValueError):
        AuthConfig.from_files([path])


def test_from_files_private_key_pem_raises_value_error(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    path = tmp_path / "private.pem"
    path.write_bytes(private_pem(ec_key))
    with pytest.raises(ValueError):
        AuthConfig.from_files([path])


def test_from_files_unsupported_key_type_raises_value_error(tmp_path: Path) -> None:
    path = write_public(tmp_path, "dsa", dsa.generate_private_key(1024))
    with pytest.raises(ValueError, match="unsupported key"):
        AuthConfig.from_files([path])


def test_from_files_rejects_unusable_ec_curve(tmp_path: Path) -> None:
    path = write_public(tmp_path, "k1", ec.generate_private_key(ec.SECP256K1()))
    with pytest.raises(ValueError):
        AuthConfig.from_files([path])


@pytest.mark.parametrize("content", ["hello world", "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_from_files_non_json_jwks_raises_value_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        AuthConfig.from_files(jwks_file=path)


@pytest.mark.parametrize("content", ["{}", '{"keys": []}', '{"keys": 5}', "[1, 2]",
                                     '{"keys": [{"kty": "EC", "kid": "x"}]}'])
def test_from_files_non_key_jwks_raises_value_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "jwks.json"
    path.write_text(content)
    with pytest.raises(ValueError):
        AuthConfig.from_files(jwks_file=path)


def test_from_files_jwks_key_without_kid_raises_value_error(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey) -> None:
    jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key()))
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    with pytest.raises(ValueError, match="every JWKS key needs a kid"):
        AuthConfig.from_files(jwks_file=path)


@pytest.mark.parametrize("kind", ["oct", "private"])
def test_from_files_jwks_rejects_non_public_keys(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey,
                                                 kind: str) -> None:
    if kind == "oct":
        jwk: dict[str, Any] = {"kty": "oct", "k": b64url(b"shared-secret"), "kid": "k1"}
    else:
        jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key))
        jwk["kid"] = "k1"
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [jwk]}))
    with pytest.raises(ValueError):
        AuthConfig.from_files(jwks_file=path)


def test_cached_token_is_still_rejected_once_it_expires(tmp_path):
    private, public = generate_dev_key(tmp_path / "k")
    keys = AuthConfig.from_files([public]).keys
    verifier = Verifier(AuthConfig(keys, leeway_seconds=0))
    token = mint_dev_token(private.read_bytes(), "alice", "onc-1", ttl=timedelta(seconds=1))
    assert verifier.verify(f"Bearer {token}").project == "onc-1"
    assert verifier.verify(f"Bearer {token}").project == "onc-1"  # served from the cache
    time.sleep(1.6)
    with pytest.raises(Unauthenticated):
        verifier.verify(f"Bearer {token}")


# -- token lifetime and claim types ---------------------------------------------------------------


@pytest.mark.parametrize(("iat", "exp", "accepted"), [
    (0, 12 * 3600, True), (0, 12 * 3600 + 1, False), (-3600, 11 * 3600, True), (-3600, 11 * 3600 + 1, False),
    (None, 11 * 3600, True), (None, 12 * 3600 + 120, False),
])
def test_max_lifetime_from_iat_or_from_now(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey, iat: int | None,
                                           exp: int, accepted: bool) -> None:
    config = AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)], max_lifetime=timedelta(hours=12))
    now = int(time.time())
    token = sign(ec_key, "ES256", claims(iat=DROP if iat is None else now + iat, exp=now + exp))
    if accepted:
        assert Verifier(config).verify(f"Bearer {token}") == EXPECTED
    else:
        with pytest.raises(Unauthenticated):
            Verifier(config).verify(f"Bearer {token}")


def test_the_default_lifetime_is_24_hours(verifier: Verifier, ec_key: ec.EllipticCurvePrivateKey) -> None:
    now = int(time.time())
    assert verifier.config.max_lifetime == timedelta(hours=24)
    assert verifier.verify(f"Bearer {sign(ec_key, 'ES256', claims(iat=now, exp=now + DAY))}") == EXPECTED


@pytest.mark.parametrize("lifetime", [timedelta(0), timedelta(seconds=-1)])
def test_a_max_lifetime_must_be_positive(tmp_path: Path, ec_key: ec.EllipticCurvePrivateKey,
                                         lifetime: timedelta) -> None:
    with pytest.raises(ValueError, match="lifetime"):
        AuthConfig.from_files([write_public(tmp_path, "ec", ec_key)], max_lifetime=lifetime)


@pytest.mark.parametrize("case", ["float exp without iat", "float iat and exp", "integer nbf beyond a float"])
def test_times_may_be_any_json_number(verifier: Verifier, ec_key: ec.EllipticCurvePrivateKey, case: str) -> None:
    now = time.time()
    times = {"float exp without iat": {"iat": DROP, "exp": now + 600.25},
             "float iat and exp": {"iat": now - 0.5, "nbf": now - 0.5, "exp": now + 300.5},
             "integer nbf beyond a float": {"nbf": -(10**400)}}[case]
    token = sign(ec_key, "ES256", claims(**times))
    assert verifier.verify(f"Bearer {token}") == EXPECTED
    assert verifier.verify(f"Bearer {token}") == EXPECTED  # and from the verified-token cache


# -- one authorization header ---------------------------------------------------------------------


@pytest.mark.parametrize(("metadata", "expected"), [
    ([], None), ([("x-other", "a")], None), ([("authorization", "Bearer a")], "Bearer a"),
    ([("x-other", "a"), ("authorization", "Bearer a"), ("x-more", "b")], "Bearer a"),
])
def test_authorization_header_of_metadata(metadata: list[tuple[str, str]], expected: str | None) -> None:
    assert authorization_header(metadata) == expected


@pytest.mark.parametrize("values", [("Bearer a", "Bearer a"), ("Bearer a", "Bearer b"), ("Bearer a", "")])
def test_two_authorization_headers_are_refused(values: tuple[str, str]) -> None:
    with pytest.raises(Unauthenticated, match="send one authorization header"):
        authorization_header([("authorization", v) for v in values])


def test_a_verifier_that_does_not_require_a_project_accepts_a_token_without_one(keys) -> None:
    import dataclasses

    from cryptography.hazmat.primitives import serialization

    from gateway.auth import ROLE_CLAIM, AuthConfig, Verifier
    from gateway.errors import Unauthenticated
    from tests.helpers.tokens import DROP, claims, sign

    private = serialization.load_pem_private_key(keys[0].read_bytes(), password=None)
    officer = sign(private, payload=claims(role="officer", project=DROP))
    relaxed = Verifier(dataclasses.replace(AuthConfig.from_files([keys[1]]), required_claims=("sub", ROLE_CLAIM)))
    identity = relaxed.verify(f"Bearer {officer}")
    assert (identity.subject, identity.project, identity.role) == ("alice", "", "officer")
    with pytest.raises(Unauthenticated):
        Verifier(AuthConfig.from_files([keys[1]])).verify(f"Bearer {officer}")  # the site's: a project is required
