"""Shared fixtures: real DuckDB files, real keys and JWTs, real gRPC site servers on port 0."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry

from gateway import _mechanisms as mechanisms
from gateway._proto.gateway.v1 import gateway_pb2_grpc as pb_grpc
from gateway.auth import AuthConfig, Verifier, generate_dev_key, mint_dev_token
from gateway.broker import BrokerConfig, SiteEntry, build_broker_server
from gateway.demo.synth import synthesize
from gateway.metrics import BrokerMetrics, SiteMetrics
from gateway.site import RunningSite, SiteOptions, build_site_server

ROOT = Path(__file__).resolve().parent.parent
PATIENTS = 4000

# Extra budget rules for tests, placed before the example rules so they win.
TEST_BUDGETS = """budgets:
  - project: "stats"
    epsilon: 1000000
    period: never
  - project: "tight"
    epsilon: 1
    period: never
  - project: "nurses"
    epsilon: 5
    roles: [analyst]
  - project: "patients-only"
    datasets: [patients]
    epsilon: 5
"""


class ExactNoise(mechanisms.Noise):
    """TEST ONLY: releases exact aggregates, to check SQL results. Never reachable from policy or CLI."""

    mechanism = "exact(test-only)"

    def apply(self, component: mechanisms.Component, exact: tuple[int, ...]) -> list[int]:
        return list(exact)


def write_policy(folder: Path, data: Path, site: str = "north", text: str | None = None) -> Path:
    """Copy the example policy for ``site`` into ``folder`` with the test budgets and a data path."""
    source = text if text is not None else (ROOT / "policies" / f"{site}.yaml").read_text()
    source = source.replace(f"data/{site}.duckdb", str(data)).replace("budgets:", TEST_BUDGETS, 1)
    path = folder / f"{site}.yaml"
    path.write_text(source)
    return path


@pytest.fixture(scope="session")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return generate_dev_key(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="session")
def token(keys: tuple[Path, Path]) -> Callable[..., str]:
    def mint(project: str = "onc-test", role: str = "researcher", subject: str = "alice") -> str:
        return mint_dev_token(keys[0].read_bytes(), subject, project, role)
    return mint


@pytest.fixture(scope="session")
def site_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "north.duckdb"
    synthesize("north", PATIENTS, path, seed=7)
    return path


@pytest.fixture
def start_site(tmp_path: Path, keys: tuple[Path, Path], site_data: Path) -> Iterator[Callable[..., RunningSite]]:
    started: list[RunningSite] = []

    def start(noise: mechanisms.Noise | None = None, policy: Path | None = None, state_dir: Path | None = None,
              reload_interval: float = 0.2, metrics: SiteMetrics | None = None) -> RunningSite:
        folder = tmp_path / f"site{len(started)}"
        folder.mkdir()
        policy = policy or write_policy(folder, site_data)
        options = SiteOptions(policy, state_dir or folder / "state", Verifier(AuthConfig.from_files([keys[1]])),
                              reload_interval=reload_interval)
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
        channel = grpc.insecure_channel(f"127.0.0.1:{site.port}")
        channels.append(channel)
        return pb_grpc.GatewayStub(channel)

    yield make
    for channel in channels:
        channel.close()


def copy_data(src: Path, dst: Path) -> Path:
    """A private copy of a DuckDB file (tests that change data must not touch the shared one)."""
    shutil.copy(src, dst)
    return dst


@pytest.fixture
def start_broker(tmp_path):
    started = []

    def start(sites, **config):
        entries = [SiteEntry(name=name, address=f"127.0.0.1:{site.port}") for name, site in sites.items()]
        broker = build_broker_server(BrokerConfig(sites=tuple(entries), **config),
                                     metrics=BrokerMetrics(CollectorRegistry()))
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop(grace=0)
