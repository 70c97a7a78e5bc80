"""Shared fixtures: real DuckDB files, real keys and JWTs, real gRPC sites and brokers on port 0.

Shared code that is not a fixture lives in :mod:`tests.helpers`.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway import _mechanisms as mechanisms
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.auth import AuthConfig, Verifier, generate_dev_key, mint_dev_token
from gateway.broker import BrokerConfig, RunningBroker, SiteEntry, build_broker_server
from gateway.demo.synth import synthesize
from gateway.metrics import BrokerMetrics, SiteMetrics
from gateway.policy import load_policy
from gateway.proof import ProofKey
from gateway.site import RunningSite, SiteOptions, build_site_server
from tests.helpers.policies import dump_policy, with_policy, write_policy

PATIENTS = 4000


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_dev_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session", autouse=True)
def proof_key(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The researcher's proof key every test token is bound to; clients find it in $GATEWAY_PROOF_KEY."""
    path = tmp_path_factory.mktemp("proof") / "proof-key.pem"
    ProofKey.create(path)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("GATEWAY_PROOF_KEY", str(path))
        yield path


@pytest.fixture(scope="session")
def token(keys: tuple[Path, Path], proof_key: Path) -> Callable[..., str]:
    jkt = ProofKey.load(proof_key).jkt

    def mint(project: str = "onc-test", role: str = "researcher", subject: str = "alice") -> str:
        return mint_dev_token(keys[0].read_bytes(), subject, project, role, proof_jkt=jkt)
    return mint


@pytest.fixture(scope="session")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "north.duckdb"
    synthesize("north", PATIENTS, path, seed=7)
    return path


@pytest.fixture
def start_site(tmp_path: Path, keys: tuple[Path, Path], site_data: Path) -> Iterator[Callable[..., RunningSite]]:
    started: list[RunningSite] = []

    numbers = itertools.count()

    def start(noise: mechanisms.Noise | None = None, policy: Path | None = None, state_dir: Path | None = None,
              reload_interval: float = 0.2, metrics: SiteMetrics | None = None, host: str = "127.0.0.1",
              init: bool = False, name: str | None = None, verifier: Verifier | None = None,
              port: int = 0, rejection_interval: float = 60.0) -> RunningSite:
        """``name``: the site's name (its policy's ``site``), which a broker must know it by."""
        folder = tmp_path / f"site{next(numbers)}"  # counted, so a refused start leaves no gap to collide with
        folder.mkdir()
        policy = policy or write_policy(folder, site_data)
        if name is not None:
            policy = dump_policy(with_policy(load_policy(policy).policy, site=name), folder / f"{name}.yaml")
        verifier = verifier or Verifier(AuthConfig.from_files([keys[1]]))
        options = SiteOptions(policy, state_dir or folder / "state", verifier, host=host, port=port,
                              reload_interval=reload_interval, init=init, rejection_interval=rejection_interval)
        site = build_site_server(options, metrics or SiteMetrics(CollectorRegistry()), noise)
        started.append(site)
        return site

    yield start
    for site in started:
        site.stop(grace=0)


@pytest.fixture
def stub_for() -> Iterator[Callable[[RunningSite], pb_grpc.GatewayStub]]:
    channels: list[grpc.Channel] = []

    def make(site: RunningSite) -> pb_grpc.GatewayStub:
        channel = grpc.insecure_channel(site.target)
        channels.append(channel)
        return pb_grpc.GatewayStub(channel)

    yield make
    for channel in channels:
        channel.close()


@pytest.fixture
def start_broker(keys: tuple[Path, Path]) -> Iterator[Callable[..., RunningBroker]]:
    started: list[RunningBroker] = []

    def start(sites: dict[str, RunningSite], metrics: BrokerMetrics | None = None, **config: Any) -> RunningBroker:
        entries = [SiteEntry(name=name, address=site.target) for name, site in sites.items()]
        broker = build_broker_server(BrokerConfig(sites=tuple(entries), **config),
                                     Verifier(AuthConfig.from_files([keys[1]])),
                                     metrics=metrics or BrokerMetrics(CollectorRegistry()))
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop(grace=0)
