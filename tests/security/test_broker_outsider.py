"""The broker verifies tokens itself, before any work: an outsider learns nothing about the network
(not the sites' names, addresses or errors) and makes the broker parse nothing and call no site."""

from __future__ import annotations

import grpc
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from prometheus_client import CollectorRegistry

from gateway._jwks import JwksRefresh
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.auth import AuthConfig, Verifier, generate_dev_key, mint_dev_token
from gateway.broker import BrokerConfig, SiteEntry, build_broker_server
from gateway.metrics import BrokerMetrics
from gateway.proof import ProofKey
from tests.helpers.idp import IdentityProvider
from tests.helpers.servers import signed

NESTED = "SELECT count(*) FROM patients WHERE " + "(" * 400 + "age_at_diagnosis > 1" + ")" * 400


@pytest.fixture
def broker(start_site, keys):
    metrics = BrokerMetrics(CollectorRegistry())
    site = start_site(name="secret-site-name")
    running = build_broker_server(BrokerConfig(name="net", sites=(SiteEntry(name="secret-site-name",
                                                                            address=site.target),)),
                                  Verifier(AuthConfig.from_files([keys[1]])), metrics=metrics)
    yield running, metrics
    running.stop(grace=0)


def site_calls(metrics: BrokerMetrics) -> float:
    return sum(sample.value for family in metrics.site_requests.collect() for sample in family.samples
               if sample.name.endswith("_total"))


def _calls(stub):
    return [(stub.Query, pb.QueryRequest(sql="SELECT count(*) FROM patients")),
            (stub.Query, pb.QueryRequest(sql=NESTED)),
            (stub.Query, pb.QueryRequest(sql="SELECT count(*) FROM patients", sites=["nowhere"])),
            (stub.ListDatasets, pb.ListDatasetsRequest()), (stub.GetBudget, pb.GetBudgetRequest()),
            (stub.Status, pb.StatusRequest())]  # the network's sites and versions are no outsider's business


@pytest.mark.parametrize("credentials", ["none", "foreign key", "garbage", "two headers", "stolen token",
                                         "stolen token, thief's proof"])
def test_an_outsider_learns_nothing_about_the_network(broker, token, tmp_path, credentials) -> None:
    running, metrics = broker
    foreign = mint_dev_token(generate_dev_key(tmp_path / "other")[0].read_bytes(), "mallory", "onc-x", "researcher")
    stolen = token()  # a valid token, without the key it is bound to
    metadata = {"none": [], "foreign key": [("authorization", f"Bearer {foreign}")],
                "garbage": [("authorization", "Bearer not-a-jwt")],
                "two headers": [("authorization", f"Bearer {token()}"), ("authorization", f"Bearer {token()}")],
                }.get(credentials, [("authorization", f"Bearer {stolen}")])
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GatewayStub(channel)
        for method, request in _calls(stub):
            if credentials == "stolen token, thief's proof":
                signed(request, stolen, key=ProofKey.generate())
            elif credentials != "stolen token":
                signed(request, token())
            with pytest.raises(grpc.RpcError) as err:
                method(request, metadata=metadata, timeout=10)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            details = err.value.details() or ""
            assert "secret-site-name" not in details and "127.0.0.1" not in details and "nowhere" not in details
    assert site_calls(metrics) == 0  # no site was called for any of it


def test_a_researcher_still_gets_through(broker, token) -> None:
    running, metrics = broker
    bearer = token()
    with grpc.insecure_channel(running.target) as channel:
        stub = pb_grpc.GatewayStub(channel)
        request = pb.QueryRequest(query_id="q-1", sql="SELECT count(*) FROM patients", epsilon=0.1)
        with pytest.raises(grpc.RpcError) as err:  # the caller holds the key: it learns whom to sign for
            stub.Query(signed(request, bearer), metadata=[("authorization", f"Bearer {bearer}")], timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED and "secret-site-name" in err.value.details()
        answer = stub.Query(signed(request, bearer, ["secret-site-name"]),
                            metadata=[("authorization", f"Bearer {bearer}")], timeout=10)
    assert list(answer.sites) == ["secret-site-name"]
    assert site_calls(metrics) == 1


@pytest.fixture
def idp_down():
    provider = IdentityProvider()
    provider.publish({"k1": ec.generate_private_key(ec.SECP256R1())})
    provider.start()
    provider.stop()  # a port that refuses connections: the provider is down
    return provider, Verifier(AuthConfig({}, jwks_url=provider.url, jwks_refresh=JwksRefresh(min_interval=30)))


def test_with_its_identity_provider_down_the_broker_says_unavailable_and_calls_no_site(start_site, idp_down):
    idp, verifier = idp_down
    metrics = BrokerMetrics(CollectorRegistry())
    running = build_broker_server(BrokerConfig(name="net", sites=(SiteEntry(name="secret-site-name",
                                                                            address=start_site().target),)),
                                  verifier, metrics=metrics)
    token = idp.sign("k1", project="onc-test")
    try:
        with grpc.insecure_channel(running.target) as channel:
            stub = pb_grpc.GatewayStub(channel)
            for method, request in _calls(stub):
                with pytest.raises(grpc.RpcError) as err:
                    method(request, metadata=[("authorization", f"Bearer {token}")], timeout=10)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert err.value.details().startswith("identity provider unreachable: cannot fetch keys from ")
                assert "secret-site-name" not in err.value.details()
        assert site_calls(metrics) == 0
    finally:
        running.stop(grace=0)

