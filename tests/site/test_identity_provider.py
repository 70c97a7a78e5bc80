"""A real site whose token keys come from an identity provider's JWKS URL, and the one-header rule.

The provider is a real HTTP server on a loopback port whose keys rotate (:mod:`tests.helpers.idp`);
the site is the real gRPC server with its ledger and audit log. Refresh intervals are shortened so
that recovery and rotation happen within the test.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from gateway import audit
from gateway._jwks import JwksRefresh
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway.auth import DEV_AUDIENCE, DEV_ISSUER, AuthConfig, Verifier
from gateway.proof import ProofKey
from tests.helpers.idp import IdentityProvider
from tests.helpers.servers import signed, wait_for
from tests.helpers.tokens import claims, sign

FAST = JwksRefresh(default_ttl=60, min_ttl=0.2, max_ttl=60, min_interval=0.3, timeout=1.0)
COUNT = pb.QueryRequest(sql="SELECT count(*) FROM patients", epsilon=0.1)


def on_site() -> dict[str, object]:
    """Claims for the test project, bound to the session's proof key."""
    jkt = ProofKey.load(Path(os.environ["GATEWAY_PROOF_KEY"])).jkt
    return {"project": "onc-test", "iss": DEV_ISSUER, "aud": DEV_AUDIENCE, "cnf": {"jkt": jkt}}


def _call(stub, token: str, request: pb.QueryRequest = COUNT) -> tuple[grpc.StatusCode, str]:
    sent = pb.QueryRequest()
    sent.CopyFrom(request)
    try:
        stub.Query(signed(sent, token, ["north"]), metadata=[("authorization", f"Bearer {token}")], timeout=10)
    except grpc.RpcError as err:
        return err.code(), err.details() or ""
    return grpc.StatusCode.OK, ""


@pytest.fixture
def idp():
    provider = IdentityProvider()
    provider.publish({"k1": ec.generate_private_key(ec.SECP256R1())})
    provider.start()
    yield provider
    provider.stop()


def test_a_site_started_with_the_provider_down_refuses_as_unavailable_then_serves_rotated_keys(
        start_site, stub_for, idp, caplog):
    idp.stop()
    site = start_site(verifier=Verifier(AuthConfig({}, jwks_url=idp.url, jwks_refresh=FAST)),  # starts anyway
                      rejection_interval=0)  # every refusal its own audit record
    assert "identity provider unreachable" in caplog.text
    stub = stub_for(site)
    code, details = _call(stub, idp.sign("k1", **on_site()))
    assert code == grpc.StatusCode.UNAVAILABLE
    assert details == f"identity provider unreachable: cannot fetch keys from {idp.url}; retry later"
    assert site.state.ledger.total_spent() == 0

    idp.start()  # back on the same port
    wait_for(lambda: _call(stub, idp.sign("k1", **on_site()))[0] == grpc.StatusCode.OK, timeout=10)
    assert idp.fetches == 1

    forger = ec.generate_private_key(ec.SECP256R1())
    for i in range(50):  # forged key ids: refused, and no fetch storm
        assert _call(stub, sign(forger, "ES256", claims(**on_site(), jti=str(i)), kid=f"forged-{i}")) == \
            (grpc.StatusCode.UNAUTHENTICATED, "invalid or expired credentials; get a fresh token")
    assert idp.fetches <= 2

    before = idp.fetches
    idp.publish({"k1": idp.keys["k1"], "k2": ec.generate_private_key(ec.SECP256R1())})  # the provider rotates
    wait_for(lambda: _call(stub, idp.sign("k2", **on_site()))[0] == grpc.StatusCode.OK, timeout=10)
    assert idp.fetches == before + 1
    assert _call(stub, idp.sign("k1", **on_site()))[0] == grpc.StatusCode.OK
    spent = site.state.ledger.total_spent()
    assert spent > 0
    def refusals() -> Counter[str]:
        counted: Counter[str] = Counter()
        for r in audit.tail(site.state.audit.path, 1000):
            counted.update(r.get("reasons", {}))
        return counted
    wait_for(lambda: sum(refusals().values()) >= 51)  # refusals without valid credentials are written behind
    assert refusals()["identity provider unreachable"] >= 1 and refusals()["invalid or expired credentials"] >= 50


def test_two_authorization_headers_are_refused_at_the_site(start_site, stub_for, token):
    site = start_site(rejection_interval=0)
    stub = stub_for(site)
    for metadata in ([("authorization", f"Bearer {token()}"), ("authorization", f"Bearer {token()}")],
                     [("authorization", "Bearer not-a-jwt"), ("authorization", f"Bearer {token()}")],
                     [("authorization", f"Bearer {token()}"), ("authorization", "Bearer not-a-jwt")]):
        for method, request in ((stub.Query, COUNT), (stub.ListDatasets, pb.ListDatasetsRequest()),
                                (stub.GetBudget, pb.GetBudgetRequest())):
            with pytest.raises(grpc.RpcError) as err:
                method(request, metadata=metadata, timeout=10)
            assert (err.value.code(), err.value.details()) == (grpc.StatusCode.UNAUTHENTICATED,
                                                               "send one authorization header")
    assert site.state.ledger.total_spent() == 0
    wait_for(lambda: len(audit.tail(site.state.audit.path, 100)) == 3)  # each refused query is audited
    assert [r["reasons"] for r in audit.tail(site.state.audit.path, 100)] == [{"send one authorization header": 1}] * 3
    assert _call(stub, token())[0] == grpc.StatusCode.OK  # one header: served
