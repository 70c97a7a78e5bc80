"""Proofs of possession (gateway.proof): what a proof binds, and every way a bad one is refused."""

from __future__ import annotations

import time

import jwt
import pytest

from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway.errors import ProofRequired, Unauthenticated, Unavailable
from gateway.proof import (
    MAX_AGE,
    PROOF_TYPE,
    ProofChecker,
    ProofKey,
    check_possession,
    request_digest,
    thumbprint,
    token_hash,
)


def test_thumbprint_matches_rfc_8037_example():
    jwk = {"crv": "Ed25519", "kty": "OKP", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}
    assert thumbprint(jwk) == "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
    with pytest.raises(ValueError):
        thumbprint({"kty": "RSA", "n": "x", "e": "AQAB"})


def test_the_digest_covers_the_query_and_not_the_routing():
    base = pb.QueryRequest(query_id="q", sql="SELECT count(*) FROM patients", epsilon=0.5)
    routed = pb.QueryRequest()
    routed.CopyFrom(base)
    routed.sites.append("north")
    routed.proofs["north"] = "x"
    assert request_digest(routed) == request_digest(base)
    for change in ({"epsilon": 0.6}, {"query_id": "r"}, {"dry_run": True}, {"delta": 1e-9},
                   {"sql": "SELECT count(*) FROM patients "}):
        other = pb.QueryRequest()
        other.CopyFrom(base)
        for key, value in change.items():
            setattr(other, key, value)
        assert request_digest(other) != request_digest(base), change


@pytest.fixture
def key():
    return ProofKey.generate()


REQUEST = pb.QueryRequest(query_id="q", sql="SELECT count(*) FROM patients", epsilon=0.5)


def _check(checker, proof, key, request=REQUEST, token="tok", site="north", now=None):
    checker.check(proof, request, token_hash(token), key.jkt, site, now=now)


def test_a_good_proof_passes_once(key):
    checker = ProofChecker()
    proof = key.sign("north", REQUEST, "tok")
    _check(checker, proof, key)
    with pytest.raises(Unauthenticated, match="already used"):
        _check(checker, proof, key)


@pytest.mark.parametrize(("case", "phrase"), [
    ("other site", "another server"), ("other token", "another token"), ("other request", "another request"),
    ("other method", "another method"), ("too old", "older than"), ("future", "future"),
    ("other key", "other than the token's"), ("tampered", "Signature verification failed"),
    ("no typ", "gateway-pop+jwt"), ("private jwk", "private key"), ("alg none", "algorithm"),
    ("garbage", "proof of possession rejected"), ("huge", "too long"), ("short jti", "jti"),
])
def test_bad_proofs_are_refused_with_a_reason(key, case, phrase):
    checker, now = ProofChecker(), time.time()
    proof = key.sign("north", REQUEST, "tok")
    kwargs = {}
    if case == "other site":
        proof = key.sign("south", REQUEST, "tok")
    elif case == "other token":
        kwargs["token"] = "another"
    elif case == "other request":
        kwargs["request"] = pb.QueryRequest(query_id="q", sql="SELECT count(*) FROM patients", epsilon=5)
    elif case == "other method":
        proof = key.sign("north", pb.ListDatasetsRequest(), "tok")
    elif case == "too old":
        proof = key.sign("north", REQUEST, "tok", now=now - MAX_AGE - 1)
    elif case == "future":
        proof = key.sign("north", REQUEST, "tok", now=now + 600)
    elif case == "other key":
        proof = ProofKey.generate().sign("north", REQUEST, "tok")
    elif case == "tampered":
        head, body, sig = proof.split(".")
        proof = f"{head}.{body}.{sig[:-4]}AAAA"
    elif case in ("no typ", "private jwk", "alg none", "short jti"):
        claims = jwt.decode(proof, options={"verify_signature": False})
        headers = {"typ": PROOF_TYPE, "jwk": key.jwk}
        if case == "no typ":
            headers["typ"] = "JWT"
        if case == "private jwk":
            headers["jwk"] = {**key.jwk, "d": "secret"}
        if case == "short jti":
            claims["jti"] = "1"
        private = key._private
        proof = jwt.encode(claims, None if case == "alg none" else private,
                           algorithm="none" if case == "alg none" else key.algorithm, headers=headers)
    elif case == "garbage":
        proof = "not.a.proof"
    elif case == "huge":
        proof = "a" * 10_000
    with pytest.raises(Unauthenticated) as err:
        _check(checker, proof, key, **kwargs)
    assert phrase in err.value.message


def test_an_unbound_token_is_refused(key):
    with pytest.raises(Unauthenticated, match="not bound"):
        ProofChecker().check(key.sign("north", REQUEST, "tok"), REQUEST, token_hash("tok"), None, "north")


def test_a_key_holder_without_the_sites_name_learns_it_and_no_one_else_does(key):
    class Caller:
        jkt, ath = key.jkt, token_hash("tok")

    request = pb.QueryRequest()
    request.CopyFrom(REQUEST)
    key.attach(request, "tok", [""])
    with pytest.raises(ProofRequired) as err:
        check_possession(ProofChecker(), Caller(), request, "north")
    assert err.value.sites == ["north"]
    ProofKey.generate().attach(request, "tok", [""])  # someone else's key: no name for them
    with pytest.raises(Unauthenticated) as refused:
        check_possession(ProofChecker(), Caller(), request, "north")
    assert not isinstance(refused.value, ProofRequired) and "north" not in refused.value.message


def test_the_replay_cache_is_bounded_and_forgets_old_proofs(key):
    checker = ProofChecker(cache_limit=3)
    now = time.time()
    for _ in range(3):
        _check(checker, key.sign("north", REQUEST, "tok", now=now), key, now=now)
    with pytest.raises(Unavailable):
        _check(checker, key.sign("north", REQUEST, "tok", now=now), key, now=now)
    later = now + MAX_AGE + 60  # the first three are too old to pass anyway: forgotten
    _check(checker, key.sign("north", REQUEST, "tok", now=later), key, now=later)


def test_keys_load_and_are_created_private(tmp_path):
    path = tmp_path / "proof.pem"
    created, made = ProofKey.load_or_create(path)
    assert made and path.stat().st_mode & 0o777 == 0o600
    again, made_again = ProofKey.load_or_create(path)
    assert not made_again and again.jkt == created.jkt
    (tmp_path / "bad.pem").write_text("nope")
    with pytest.raises(ValueError, match="not a usable proof key"):
        ProofKey.load(tmp_path / "bad.pem")


def test_one_key_cannot_fill_the_replay_cache_for_everyone(key):
    checker = ProofChecker(per_key_limit=2)
    now = time.time()
    for _ in range(2):
        _check(checker, key.sign("north", REQUEST, "tok", now=now), key, now=now)
    with pytest.raises(Unavailable, match="calls with this key"):
        _check(checker, key.sign("north", REQUEST, "tok", now=now), key, now=now)
    other = ProofKey.generate()  # another caller is not held back
    _check(checker, other.sign("north", REQUEST, "tok", now=now), other, now=now)
    later = now + MAX_AGE + 60  # the first caller's proofs have aged out: it may call again
    _check(checker, key.sign("north", REQUEST, "tok", now=later), key, now=later)
