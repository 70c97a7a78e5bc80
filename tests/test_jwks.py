"""Keys from an identity provider's JWKS URL: fetched at start, cached, rotated, never stormed.

Every test talks to a real HTTP server on a loopback port (:mod:`tests.helpers.idp`) and counts
the fetches it really received. Refresh intervals are shortened (tenths of a second) so that
rotation and recovery happen within a test; the defaults are checked on their own.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from gateway._jwks import JwksRefresh, check_url
from gateway.auth import AuthConfig, Identity, Verifier
from gateway.errors import Unauthenticated, Unavailable
from tests.helpers.idp import IdentityProvider
from tests.helpers.servers import wait_for
from tests.helpers.tokens import b64url, claims, hs256, sign

EXPECTED = Identity("alice", "proj-1", "researcher")
GENERIC = "invalid or expired credentials; get a fresh token"
FAST = JwksRefresh(default_ttl=60, min_ttl=0.2, max_ttl=60, min_interval=0.3, timeout=1.0)


@pytest.fixture
def idp() -> Iterator[IdentityProvider]:
    provider = IdentityProvider()
    provider.publish({"k1": ec.generate_private_key(ec.SECP256R1())})
    provider.start()
    yield provider
    provider.stop()


def verifier_for(idp: IdentityProvider, rules: JwksRefresh = FAST) -> Verifier:
    return Verifier(AuthConfig({}, jwks_url=idp.url, jwks_refresh=rules))


def unavailable_message(idp: IdentityProvider) -> str:
    return f"identity provider unreachable: cannot fetch keys from {idp.url}; retry later"


def refused(verifier: Verifier, token: str) -> str:
    with pytest.raises(Unauthenticated) as err:
        verifier.verify(f"Bearer {token}")
    return err.value.message


def in_threads(count: int, work: Any) -> list[Any]:
    """``work(i)`` for i < count, all started together; what each returned (or raised)."""
    results: list[Any] = [None] * count
    barrier = threading.Barrier(count)

    def one(i: int) -> None:
        barrier.wait()
        try:
            results[i] = work(i)
        except Exception as err:  # the caller asserts on it
            results[i] = err

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    return results


# -- fetch at start, cache, rotation --------------------------------------------------------------


def test_keys_are_fetched_once_at_start_and_then_served_from_the_cache(idp: IdentityProvider) -> None:
    verifier = verifier_for(idp)
    assert idp.fetches == 1
    for i in range(20):
        assert verifier.verify(f"Bearer {idp.sign('k1', jti=str(i))}") == EXPECTED
    assert idp.fetches == 1


def test_a_rotated_key_is_fetched_once_and_concurrent_callers_share_that_fetch(idp: IdentityProvider) -> None:
    verifier = verifier_for(idp)
    old = idp.sign("k1")
    assert verifier.verify(f"Bearer {old}") == EXPECTED
    idp.publish({"k1": idp.keys["k1"], "k2": ec.generate_private_key(ec.SECP256R1())})
    time.sleep(FAST.min_interval + 0.05)
    idp.delay = 0.3  # every caller arrives while the one fetch is still running
    results = in_threads(16, lambda i: verifier.verify(f"Bearer {idp.sign('k2', jti=str(i))}"))
    assert results == [EXPECTED] * 16  # none was turned away by the rate limit: they waited for the fetch
    assert idp.fetches == 2
    assert verifier.verify(f"Bearer {idp.sign('k1', jti='again')}") == EXPECTED  # the old key still works
    assert idp.fetches == 2


@pytest.mark.parametrize("since_last_fetch", ["just fetched", "interval passed"])
def test_two_hundred_unknown_key_ids_cause_at_most_one_fetch(idp: IdentityProvider, since_last_fetch: str) -> None:
    rules = JwksRefresh() if since_last_fetch == "just fetched" else FAST  # the defaults: 30 s between fetches
    verifier = verifier_for(idp, rules)
    if since_last_fetch == "interval passed":
        time.sleep(FAST.min_interval + 0.05)
    forger = ec.generate_private_key(ec.SECP256R1())
    tokens = [sign(forger, "ES256", kid=f"forged-{i}") for i in range(200)]
    results = in_threads(8, lambda t: [refused(verifier, token) for token in tokens[t::8]])
    assert [m for batch in results for m in batch] == [GENERIC] * 200
    assert idp.fetches - 1 <= (0 if since_last_fetch == "just fetched" else 1)
    assert verifier.verify(f"Bearer {idp.sign('k1')}") == EXPECTED


def test_a_key_the_provider_drops_is_refused_once_a_refresh_sees_it_gone(idp: IdentityProvider) -> None:
    idp.cache_control = "max-age=0"  # fresh for min_ttl only
    verifier = verifier_for(idp)
    token, retired = idp.sign("k1"), idp.keys["k1"]
    assert verifier.verify(f"Bearer {token}") == EXPECTED  # now also in the verified-token cache
    idp.publish({"k2": ec.generate_private_key(ec.SECP256R1())})  # k1 retired (e.g. compromised)
    time.sleep(FAST.min_interval + 0.05)

    def dropped() -> bool:
        try:
            verifier.verify(f"Bearer {token}")  # a stale key set is refreshed in the background
        except Unauthenticated:
            return True
        return False

    wait_for(dropped, timeout=5)
    assert refused(verifier, sign(retired, "ES256", kid="k1")) == GENERIC
    assert verifier.verify(f"Bearer {idp.sign('k2')}") == EXPECTED


@pytest.mark.parametrize(("cache_control", "refetched"), [("max-age=1", True), (None, False), ("max-age=3600", False)])
def test_cache_control_max_age_says_when_keys_go_stale(idp: IdentityProvider, cache_control: str | None,
                                                       refetched: bool) -> None:
    idp.cache_control = cache_control
    verifier = verifier_for(idp, JwksRefresh(default_ttl=30, min_ttl=0.2, max_ttl=30, min_interval=0.1, timeout=1))
    time.sleep(1.3)
    assert verifier.verify(f"Bearer {idp.sign('k1')}") == EXPECTED  # stale or not, served from the cache
    if refetched:
        wait_for(lambda: idp.fetches == 2, timeout=5)
    else:
        time.sleep(0.3)
        assert idp.fetches == 1


@pytest.mark.parametrize(("header", "ttl"), [
    (None, 300), ("", 300), ("max-age=600", 600), ("public, max-age=600, must-revalidate", 600),
    ('max-age="600"', 600), ("MAX-AGE=600", 600), ("max-age=5", 60), ("max-age=0", 60), ("max-age=999999", 3600),
    ("no-store", 60), ("no-cache, max-age=600", 60), ("max-age=soon", 300), ("max-age=-5", 300),
    ("max-age=1e9", 300), ("s-maxage=10", 300),
])
def test_max_age_is_honoured_within_bounds(header: str | None, ttl: float) -> None:
    assert JwksRefresh().ttl(header) == ttl


# -- the provider unreachable or misbehaving --------------------------------------------------------


def test_provider_down_at_start_gives_unavailable_until_it_comes_back(idp: IdentityProvider,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    idp.stop()
    caplog.set_level(logging.WARNING, logger="gateway.auth.jwks")
    verifier = verifier_for(idp)  # starts anyway
    assert f"identity provider unreachable: cannot fetch keys from {idp.url}" in caplog.text
    assert "UNAVAILABLE" in caplog.text
    token = idp.sign("k1")
    with pytest.raises(Unavailable) as err:
        verifier.verify(f"Bearer {token}")
    assert type(err.value) is Unavailable and err.value.message == unavailable_message(idp)
    idp.start()  # back, on the same port

    def works() -> bool:
        try:
            return verifier.verify(f"Bearer {token}") == EXPECTED
        except Unavailable:
            return False

    wait_for(works, timeout=5)
    assert idp.fetches == 1


def test_calls_while_the_provider_fails_make_at_most_one_fetch_per_interval(idp: IdentityProvider) -> None:
    idp.status = 503
    verifier = verifier_for(idp, JwksRefresh(min_interval=30))
    results = in_threads(8, lambda i: [_outcome(verifier, idp.sign("k1", jti=f"{i}-{j}")) for j in range(25)])
    assert [o for batch in results for o in batch] == ["UNAVAILABLE"] * 200
    assert idp.fetches == 1  # the one at start


def _outcome(verifier: Verifier, token: str) -> str:
    try:
        verifier.verify(f"Bearer {token}")
    except (Unauthenticated, Unavailable) as err:
        return err.code.name
    return "OK"


def test_a_failed_refresh_keeps_the_cached_keys(idp: IdentityProvider, caplog: pytest.LogCaptureFixture) -> None:
    idp.cache_control = "max-age=0"
    verifier = verifier_for(idp)
    idp.stop()
    time.sleep(FAST.min_interval + 0.05)  # stale, and a fetch may start
    caplog.set_level(logging.WARNING, logger="gateway.auth.jwks")
    assert verifier.verify(f"Bearer {idp.sign('k1', jti='a')}") == EXPECTED
    wait_for(lambda: "keeping the 1 cached key(s)" in caplog.text, timeout=5)
    assert f"could not refresh token keys from {idp.url}" in caplog.text
    assert verifier.verify(f"Bearer {idp.sign('k1', jti='b')}") == EXPECTED
    forger = ec.generate_private_key(ec.SECP256R1())
    assert refused(verifier, sign(forger, "ES256", kid="k9")) == GENERIC  # unknown kid: still just refused


def _oversized(idp: IdentityProvider) -> bytes:
    document = json.loads(idp.document())
    document["padding"] = "x" * 4096
    return json.dumps(document).encode()


BAD_ANSWERS: dict[str, tuple[dict[str, Any], str]] = {
    "server error": ({"status": 500}, "HTTP 500"),
    "not found": ({"status": 404}, "HTTP 404"),
    "not json": ({"body": b"<html>login</html>"}, "not JSON"),
    "a json list": ({"body": b"[1, 2]"}, "not a JWKS document"),
    "no keys list": ({"body": b'{"keys": {}}'}, "not a JWKS document"),
    "empty key set": ({"body": b'{"keys": []}'}, "unusable JWKS document"),
    "deep nesting": ({"body": b"[" * 1020 + b"]" * 1020}, "not JSON"),
    "oversized": ({"body": _oversized}, "byte limit"),
    "redirect": ({"status": 302, "location": "http://127.0.0.1:1/elsewhere"}, "redirected"),
    "slow answer": ({"delay": 2.5}, "timed out"),
    "dripped body": ({"drip": 0.1}, "longer than"),
}


@pytest.mark.parametrize("case", list(BAD_ANSWERS))
def test_a_bad_answer_is_a_failed_fetch_with_its_reason_logged(idp: IdentityProvider, case: str,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    changes, reason = BAD_ANSWERS[case]
    for name, value in changes.items():
        setattr(idp, name, value(idp) if callable(value) else value)
    caplog.set_level(logging.WARNING, logger="gateway.auth.jwks")
    started = time.monotonic()
    verifier = verifier_for(idp, JwksRefresh(min_interval=30, timeout=1.0, max_bytes=2048))
    assert time.monotonic() - started < 3.0  # the fetch's deadline holds even for a dripping server
    assert reason in caplog.text
    with pytest.raises(Unavailable) as err:
        verifier.verify(f"Bearer {idp.sign('k1')}")
    assert err.value.message == unavailable_message(idp)


def test_keys_the_gateway_does_not_verify_with_are_skipped(idp: IdentityProvider,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    good = idp.keys["k1"]
    enc = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    k1curve = ec.generate_private_key(ec.SECP256K1())
    private_jwk = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(good))  # a provider leaking its private key
    document = json.loads(idp.document())
    rsa_enc = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(enc.public_key()))
    no_kid = json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()).public_key()))
    document["keys"] += [
        {**rsa_enc, "kid": "enc", "use": "enc"},
        {**rsa_enc, "kid": "oaep", "alg": "RSA-OAEP"},
        {"kty": "oct", "k": b64url(b"shared-secret"), "kid": "oct"},
        {**private_jwk, "kid": "private"},
        {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(k1curve.public_key())), "kid": "k1curve"},
        no_kid,
        {"kty": "EC", "kid": "broken"},
    ]
    idp.body = json.dumps(document).encode()
    caplog.set_level(logging.INFO, logger="gateway.auth.jwks")
    verifier = verifier_for(idp, JwksRefresh(min_interval=30))
    assert verifier.verify(f"Bearer {idp.sign('k1')}") == EXPECTED
    assert "skipped keys" in caplog.text and "enc (RSA, use enc)" in caplog.text
    assert refused(verifier, sign(enc, "RS256", kid="enc")) == GENERIC
    assert refused(verifier, hs256(b"shared-secret", claims(), kid="oct")) == GENERIC
    assert refused(verifier, sign(good, "ES256", kid="private")) == GENERIC
    assert refused(verifier, sign(k1curve, "ES256K", kid="k1curve")) == GENERIC
    assert idp.fetches == 1


def test_a_provider_with_no_usable_key_is_a_failed_fetch(idp: IdentityProvider,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    enc = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    idp.body = json.dumps({"keys": [{**json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(enc.public_key())),
                                     "kid": "enc", "use": "enc"}]}).encode()
    caplog.set_level(logging.WARNING, logger="gateway.auth.jwks")
    verifier = verifier_for(idp)
    assert "no usable signing key" in caplog.text
    with pytest.raises(Unavailable):
        verifier.verify(f"Bearer {idp.sign('k1')}")


def test_pem_keys_and_a_jwks_url_together(idp: IdentityProvider, tmp_path: Any) -> None:
    from tests.helpers.tokens import write_public

    local = ec.generate_private_key(ec.SECP256R1())
    config = AuthConfig.from_files([write_public(tmp_path, "local", local)], jwks_url=idp.url)
    verifier = Verifier(config)
    assert verifier.verify(f"Bearer {sign(local, 'ES256')}") == EXPECTED
    assert verifier.verify(f"Bearer {idp.sign('k1')}") == EXPECTED
    assert refused(verifier, sign(local, "ES256", kid=None)) == GENERIC  # no kid: ambiguous with a provider


def test_a_token_without_kid_is_refused_with_a_provider(idp: IdentityProvider) -> None:
    verifier = verifier_for(idp)
    assert refused(verifier, sign(idp.keys["k1"], "ES256", kid=None)) == GENERIC
    assert idp.fetches == 1


# -- configuration ----------------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["https://idp.example.org/realms/onc/protocol/openid-connect/certs",
                                 "https://idp.example.org:8443/jwks", "http://127.0.0.1:8080/jwks",
                                 "http://[::1]:8080/jwks", "http://localhost/jwks", "http://127.8.9.10/jwks"])
def test_jwks_url_accepted(url: str) -> None:
    assert check_url(url) == url
    assert AuthConfig({}, jwks_url=url).jwks_url == url  # the config fetches nothing; the Verifier does


@pytest.mark.parametrize("url", ["http://idp.example.org/jwks", "http://10.0.0.5/jwks", "ftp://idp.example.org/jwks",
                                 "file:///etc/passwd", "https://", "idp.example.org/jwks", "",
                                 "https://user:secret@idp.example.org/jwks", "http://[::1/jwks"])
def test_jwks_url_refused(url: str) -> None:
    with pytest.raises(ValueError, match="JWKS URL"):
        check_url(url)
    with pytest.raises(ValueError, match="JWKS URL"):
        AuthConfig({}, jwks_url=url)


@pytest.mark.parametrize("rules", [{"min_interval": 0}, {"timeout": -1}, {"max_bytes": 0}, {"min_ttl": 600},
                                   {"max_ttl": 10}, {"default_ttl": float("nan")}])
def test_refresh_rules_are_checked(rules: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="JWKS refresh"):
        JwksRefresh(**rules)


def test_no_keys_and_no_url_is_refused() -> None:
    with pytest.raises(ValueError, match="no trusted keys configured"):
        AuthConfig({})


def test_an_unknown_kid_with_a_rsa_key_under_a_known_kid_is_refused(idp: IdentityProvider) -> None:
    verifier = verifier_for(idp)
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    assert refused(verifier, sign(other, "RS256", kid="k1")) == GENERIC  # k1 is an EC key: RS256 is not pinned
