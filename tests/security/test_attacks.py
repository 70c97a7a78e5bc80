"""The attack matrix against a real site: forged and stolen credentials, callers without access,
and queries built to exhaust the site. Every attack must be refused with its precise status, move
no budget, and leave a record of the refusal in the site's audit log.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import audit
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.auth import key_id
from gateway.client import structured_message
from gateway.proof import ProofKey
from tests.helpers.servers import signed, wait_for
from tests.helpers.tokens import DROP, claims, craft, hs256, load_private, sign, tamper_signature

SITE = "north"
COUNT = "SELECT count(*) FROM patients"
UNAUTHENTICATED, DENIED, INVALID = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
                                    grpc.StatusCode.INVALID_ARGUMENT)
GENERIC = "invalid or expired credentials; get a fresh token"


def _session_key() -> ProofKey:
    return ProofKey.load(Path(os.environ["GATEWAY_PROOF_KEY"]))


def _bound(**overrides: Any) -> dict[str, Any]:
    """Claims of a valid token for the test project, bound to the session's proof key."""
    return claims(**{"project": "onc-test", "cnf": {"jkt": _session_key().jkt}, **overrides})


# Each forged token: how to make it from the trusted signing key and the trusted public key's path.
FORGED: dict[str, Callable[[Any, Path], str]] = {
    "expired": lambda k, _: sign(k, "ES256", _bound(exp=int(time.time()) - 300)),
    "not yet valid": lambda k, _: sign(k, "ES256", _bound(nbf=int(time.time()) + 300)),
    "wrong issuer": lambda k, _: sign(k, "ES256", _bound(iss="someone-else")),
    "wrong audience": lambda k, _: sign(k, "ES256", _bound(aud="other-service")),
    "no subject": lambda k, _: sign(k, "ES256", _bound(sub=DROP)),
    "no project": lambda k, _: sign(k, "ES256", _bound(project=DROP)),
    "no role": lambda k, _: sign(k, "ES256", _bound(role=DROP)),
    "no expiry": lambda k, _: sign(k, "ES256", _bound(exp=DROP)),
    "empty project": lambda k, _: sign(k, "ES256", _bound(project=" ")),
    "malformed cnf": lambda k, _: sign(k, "ES256", _bound(cnf="jkt")),
    "tampered signature": lambda k, _: tamper_signature(sign(k, "ES256", _bound())),
    "alg none": lambda k, _: craft({"alg": "none", "typ": "JWT"}, _bound()),
    "hmac with the public key": lambda k, pub: hs256(pub.read_bytes(), _bound()),
    "unknown kid": lambda k, _: sign(k, "ES256", _bound(), kid="not-a-known-key"),
    "another key under a trusted kid": lambda k, _: sign(ec.generate_private_key(ec.SECP256R1()), "ES256", _bound(),
                                                         kid=key_id(k.public_key())),
    "not a jwt": lambda k, _: "not-a-jwt",
    "three empty parts": lambda k, _: "..",
}


@pytest.fixture
def site(start_site, token):
    """A site that has already charged one query, so that 'no budget moved' is tested against a non-zero spend."""
    running = start_site(name=SITE, rejection_interval=0)  # every rejection its own audit record
    bearer = token()
    _call(running, signed(pb.QueryRequest(query_id="first", sql=COUNT, epsilon=0.1), bearer, [SITE]), bearer)
    assert running.state.ledger.total_spent() > 0
    return running


def _call(site, request, bearer: str | None, metadata: list[tuple[str, str]] | None = None) -> Any:
    if metadata is None:
        metadata = [("authorization", f"Bearer {bearer}")] if bearer else []
    with grpc.insecure_channel(site.target) as channel:
        return pb_grpc.GatewayStub(channel).Query(request, timeout=15, metadata=metadata)


def _refused(site, request, bearer: str | None, code: grpc.StatusCode,
             metadata: list[tuple[str, str]] | None = None) -> str:
    """The attack's refusal: its code, no budget moved, one audit record saying so. Returns the message."""
    spent, records = site.state.ledger.total_spent(), audit.verify(site.state.audit.path).records
    with pytest.raises(grpc.RpcError) as err:
        _call(site, request, bearer, metadata)
    details = err.value.details() or ""
    assert err.value.code() == code, details
    assert "Traceback" not in details
    assert site.state.ledger.total_spent() == spent
    # a refusal without valid credentials is counted per source (here: recorded at once, written behind)
    wait_for(lambda: audit.verify(site.state.audit.path).records == records + 1)
    assert audit.verify(site.state.audit.path).ok
    last = audit.tail(site.state.audit.path, 1)[0]
    if code == UNAUTHENTICATED:
        assert last["event"] == "unauthenticated" and last["unauthenticated_rejections"] == 1
    else:
        assert last["status"] == code.name
    return details


@pytest.mark.parametrize("forgery", list(FORGED))
def test_forged_tokens_are_refused_without_saying_why(site, keys, forgery) -> None:
    forged = FORGED[forgery](load_private(keys[0]), keys[1])
    request = pb.QueryRequest(query_id=f"forged-{forgery}", sql=COUNT, epsilon=0.1)
    details = _refused(site, signed(request, forged, [SITE]), forged, UNAUTHENTICATED)
    assert details == GENERIC  # never which check failed


def test_the_same_claims_validly_signed_pass(site, keys) -> None:
    """The control for the matrix above: only the forgery makes the difference."""
    good = sign(load_private(keys[0]), "ES256", _bound())
    request = pb.QueryRequest(query_id="control", sql=COUNT + " WHERE sex = 'F'", epsilon=0.1)
    answer = _call(site, signed(request, good, [SITE]), good)
    assert answer.epsilon_charged == pytest.approx(0.1)


@pytest.mark.parametrize("stolen", ["no proof", "thief's own proof key", "proof for another site",
                                    "proof for another request", "unbound token", "no credentials",
                                    "basic scheme"])
def test_stolen_or_unbound_credentials_are_refused(site, token, keys, stolen) -> None:
    bearer = token()
    request = pb.QueryRequest(query_id=f"stolen-{stolen}", sql=COUNT, epsilon=0.1)
    metadata = None
    if stolen == "thief's own proof key":
        signed(request, bearer, [SITE], key=ProofKey.generate())
    elif stolen == "proof for another site":
        signed(request, bearer, ["south"])
        request.proofs[SITE] = request.proofs.pop("south")
    elif stolen == "proof for another request":
        other = pb.QueryRequest(query_id="other", sql=COUNT, epsilon=1.0)
        signed(other, bearer, [SITE])
        request.proofs[SITE] = other.proofs[SITE]
    elif stolen == "unbound token":
        bearer = sign(load_private(keys[0]), "ES256", claims(project="onc-test"))
        signed(request, bearer, [SITE])
    elif stolen == "no credentials":
        bearer = None
    elif stolen == "basic scheme":
        metadata = [("authorization", "Basic YWxpY2U6c2VjcmV0")]
    _refused(site, request, bearer, UNAUTHENTICATED, metadata)


@pytest.mark.parametrize(("who", "sql"), [
    ({"project": "unknown-project"}, COUNT),
    ({"project": "nurses", "role": "researcher"}, COUNT),
    ({"project": "patients-only"}, "SELECT count(*) FROM treatments"),
    ({"project": "outsider"}, "SELECT sum(secret_column) FROM patients"),
])
def test_callers_without_access_are_denied(site, token, who, sql) -> None:
    bearer = token(**who)
    request = signed(pb.QueryRequest(query_id="denied", sql=sql, epsilon=0.1), bearer, [SITE])
    details = _refused(site, request, bearer, DENIED)
    assert "secret_column" not in details and "age_at_diagnosis" not in details


WHERE = "SELECT count(*) FROM patients WHERE "
EXHAUSTING: dict[str, tuple[pb.QueryRequest, grpc.StatusCode, str]] = {
    "400 nested parentheses": (pb.QueryRequest(sql=WHERE + "(" * 400 + "age_at_diagnosis > 1" + ")" * 400),
                               INVALID, "nested too deeply"),
    "400 NOTs": (pb.QueryRequest(sql=WHERE + "NOT " * 400 + "age_at_diagnosis IN (1)"), INVALID, "nested too deeply"),
    "4,000 filters": (pb.QueryRequest(sql=WHERE + " AND ".join(f"age_at_diagnosis != {i}" for i in range(4000))),
                      INVALID, "longer than"),
    "65 structured filters": (pb.QueryRequest(structured=structured_message(
        {"dataset": "patients", "aggregates": ["count"],
         "filters": [("age_at_diagnosis", "!=", i) for i in range(65)]})), INVALID, "65 filters"),
    "an IN list of 20,000 values": (pb.QueryRequest(structured=structured_message(
        {"dataset": "patients", "aggregates": ["count"],
         "filters": [("age_at_diagnosis", "in", list(range(20_000)))]})), INVALID, "values"),
    "40 aggregates": (pb.QueryRequest(structured=structured_message(
        {"dataset": "patients", "aggregates": [(f"kind{i}", "bmi") for i in range(40)]})), INVALID, "40 aggregates"),
    "a million cells": (pb.QueryRequest(sql="SELECT diagnosis_year, age_at_diagnosis, primary_site, count(*), "
                                            "sum(bmi), mean(bmi), variance(bmi), stddev(bmi) FROM patients "
                                            "GROUP BY diagnosis_year, age_at_diagnosis, primary_site"),
                        INVALID, ""),
    "20,000 characters of SQL": (pb.QueryRequest(sql="x" * 20_000), INVALID, "longer than"),
    "a chain of 1,200 ANDs": (pb.QueryRequest(sql=WHERE + " AND ".join(["a=1"] * 1200)), INVALID,
                              "nested too deeply"),
    "3,000 subscripts": (pb.QueryRequest(sql=WHERE + "age_at_diagnosis > 1" + "[1]" * 3000), INVALID,
                         "brackets and braces"),
    "epsilon NaN": (pb.QueryRequest(sql=COUNT, epsilon=math.nan), INVALID, "epsilon"),
    "epsilon infinite": (pb.QueryRequest(sql=COUNT, epsilon=math.inf), INVALID, "epsilon"),
    "epsilon negative": (pb.QueryRequest(sql=COUNT, epsilon=-1), INVALID, "epsilon"),
    "delta on a pure-DP policy": (pb.QueryRequest(sql=COUNT, delta=1e-6), INVALID, "delta"),
    "a 200-character query id": (pb.QueryRequest(sql=COUNT), INVALID, "query_id"),
    "over the per-query maximum": (pb.QueryRequest(sql=COUNT, epsilon=50), DENIED, "per-query maximum"),
}


@pytest.mark.parametrize("attack", list(EXHAUSTING))
def test_queries_built_to_exhaust_the_site_are_refused_before_any_work(site, token, attack, caplog) -> None:
    template, code, phrase = EXHAUSTING[attack]
    request = pb.QueryRequest()
    request.CopyFrom(template)
    request.query_id = "q" * 200 if "query id" in attack else f"attack-{len(attack)}"
    if not request.epsilon and "epsilon" not in attack:
        request.epsilon = 0.1
    bearer = token()
    details = _refused(site, signed(request, bearer, [SITE]), bearer, code)
    assert phrase in details
    assert "Traceback" not in caplog.text  # a caller's mistake is not logged as a bug
