"""Attack: a malicious site replays what it receives (token, proof, request) elsewhere.

The broker relays the caller's token to every site. A site in the broker's configuration that is
hostile (or anyone reading a site's inbound traffic) captures it and tries to spend the victim's
budget at another site, directly or through the broker, with the same query or another one, with
the captured proof or one of its own making. Each attempt must fail UNAUTHENTICATED, move no
budget, and be recorded in the target site's audit log.
"""

from __future__ import annotations

import threading
from concurrent import futures

import grpc
import pytest

from gateway import audit
from gateway._proto.gateway.v1 import gateway_pb2 as pb
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.client import Client
from gateway.proof import ProofKey
from tests.helpers.servers import signed, wait_for


class Eavesdropper(pb_grpc.GatewayServicer):
    """The hostile site: keeps every request and its metadata, and answers nothing useful."""

    def __init__(self) -> None:
        self.captured: list[tuple[pb.QueryRequest, list[tuple[str, str]]]] = []
        self.lock = threading.Lock()

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        with self.lock:
            self.captured.append((request, list(context.invocation_metadata())))
        context.abort(grpc.StatusCode.UNAVAILABLE, "down for maintenance")


@pytest.fixture
def network(start_site, start_broker, token):
    honest = start_site(name="north", rejection_interval=0)  # every rejection its own audit record
    spy = Eavesdropper()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_GatewayServicer_to_server(spy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class Evil:
        target = f"127.0.0.1:{port}"

    broker = start_broker({"north": honest, "evil": Evil})  # type: ignore[dict-item]
    with Client(broker.target, token=token(), retries=0) as researcher:
        researcher.query("SELECT count(*) FROM patients", epsilon=0.5, query_id="victim-1")
    assert spy.captured, "the hostile site saw the researcher's call"
    yield honest, broker, spy
    server.stop(0)


def _spent(site) -> float:
    return float(site.state.ledger.total_spent())


def _captured(spy):
    request, metadata = spy.captured[-1]
    return request, [(k, v) for k, v in metadata if k == "authorization"]


def test_what_a_site_receives_holds_only_its_own_proof(network):
    _honest, _broker, spy = network
    request, metadata = _captured(spy)
    assert list(request.proofs) == ["evil"]  # the broker relays each site only its own proof
    assert metadata and metadata[0][1].startswith("Bearer ")


@pytest.mark.parametrize("attack", ["same query", "another query", "proof relabelled", "own proof key",
                                    "no proof", "dry run"])
def test_a_captured_token_is_useless_at_another_site(network, stub_for, attack):
    honest, _broker, spy = network
    request, metadata = _captured(spy)
    replay = pb.QueryRequest()
    replay.CopyFrom(request)
    bearer = metadata[0][1].removeprefix("Bearer ")
    if attack == "another query":
        replay.sql, replay.query_id, replay.epsilon = "SELECT count(*) FROM patients WHERE sex = 'F'", "evil-2", 1.0
    elif attack == "proof relabelled":
        replay.proofs["north"] = replay.proofs.pop("evil")
    elif attack == "own proof key":  # a proof for north, signed with a key the attacker made
        signed(replay, bearer, ["north"], key=ProofKey.generate())
    elif attack == "no proof":
        replay.proofs.clear()
    elif attack == "dry run":
        replay.dry_run = True
    records = audit.verify(honest.state.audit.path).records
    spent = _spent(honest)
    with pytest.raises(grpc.RpcError) as err:
        stub_for(honest).Query(replay, metadata=metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert _spent(honest) == spent
    wait_for(lambda: audit.verify(honest.state.audit.path).records == records + 1)
    log = audit.tail(honest.state.audit.path, 1)[0]
    assert log["event"] == "unauthenticated" and log["unauthenticated_rejections"] == 1


@pytest.mark.parametrize("attack", ["same query", "another query"])
def test_a_captured_token_is_useless_through_the_broker(network, attack):
    honest, broker, spy = network
    request, metadata = _captured(spy)
    replay = pb.QueryRequest()
    replay.CopyFrom(request)
    if attack == "another query":
        replay.sql, replay.query_id = "SELECT count(*) FROM patients WHERE sex = 'M'", "evil-3"
    replay.sites.append("north")
    spent, records = _spent(honest), audit.verify(honest.state.audit.path).records
    with grpc.insecure_channel(broker.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.GatewayStub(channel).Query(replay, metadata=metadata, timeout=10)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
    assert _spent(honest) == spent
    assert audit.verify(honest.state.audit.path).records == records  # the broker never called the site


def test_a_proof_is_used_once_and_for_one_request(start_site, stub_for, token):
    """Someone reading a site's inbound traffic replays a call to the same site."""
    site = start_site(name="north", rejection_interval=0)
    bearer = token()
    metadata = [("authorization", f"Bearer {bearer}")]
    stub = stub_for(site)
    call = signed(pb.QueryRequest(query_id="q-1", sql="SELECT count(*) FROM patients", epsilon=0.25), bearer,
                  ["north"])
    stub.Query(call, metadata=metadata, timeout=10)
    spent = _spent(site)
    with pytest.raises(grpc.RpcError) as again:
        stub.Query(call, metadata=metadata, timeout=10)
    assert again.value.code() == grpc.StatusCode.UNAUTHENTICATED and "already used" in again.value.details()
    other = pb.QueryRequest()
    other.CopyFrom(call)
    other.query_id, other.epsilon = "q-2", 1.0
    with pytest.raises(grpc.RpcError) as changed:
        stub.Query(other, metadata=metadata, timeout=10)
    assert changed.value.code() == grpc.StatusCode.UNAUTHENTICATED and "another request" in changed.value.details()
    assert _spent(site) == spent
    wait_for(lambda: [r["outcome"] for r in audit.tail(site.state.audit.path, 2)] == ["unauthenticated"] * 2)


class NameFisher(pb_grpc.GatewayServicer):
    """A hostile server posing as a site: it asks the client to sign for another site's name."""

    def __init__(self, wanted: str) -> None:
        self.wanted, self.received = wanted, []

    def Query(self, request: pb.QueryRequest, context: grpc.ServicerContext) -> pb.QueryResponse:
        from gateway.errors import ProofRequired

        self.received.append(request)
        context.abort_with_status(ProofRequired([self.wanted]).to_status())


def test_a_client_that_knows_whom_it_calls_signs_for_no_one_else(token) -> None:
    fisher = NameFisher("south")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GatewayServicer_to_server(fisher, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with Client(f"127.0.0.1:{port}", token=token(), retries=0, sign_for=["north"]) as c, \
                pytest.raises(Exception, match="proof"):
            c.query("SELECT count(*) FROM patients", epsilon=0.5)
    finally:
        server.stop(0)
    assert fisher.received and all(set(r.proofs) == {"north"} for r in fisher.received)  # never a proof for south


def test_a_request_naming_its_sites_carries_proofs_for_those_only(start_site, start_broker, token) -> None:
    spy = Eavesdropper()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_GatewayServicer_to_server(spy, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()

    class Evil:
        target = f"127.0.0.1:{port}"

    try:
        broker = start_broker({"north": start_site(name="north"), "evil": Evil})  # type: ignore[dict-item]
        with Client(broker.target, token=token(), retries=0) as c:
            c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="everyone")  # learns both names
            signed_for = []
            original = c._stub.Query

            def recording(request, **kwargs):
                signed_for.append(sorted(request.proofs))
                return original(request, **kwargs)

            c._stub.Query = recording
            c.query("SELECT count(*) FROM patients", epsilon=0.25, query_id="north-only", sites=["north"])
        assert signed_for == [["north"]]  # the broker never holds a proof for the site left out
    finally:
        server.stop(0)
