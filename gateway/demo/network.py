"""A local federated network on loopback: site gateway processes and a broker process.

Used by ``gateway demo``, the federation tests and the fan-out benchmark. Every process is a real
``gateway site serve`` / ``gateway broker serve``; :meth:`LocalNetwork.stop` leaves none behind.
With ``tls=True`` it runs as a network should, on DEVELOPMENT certificates (:mod:`.certs`): every
site requires the broker's client certificate (``--client-ca``, ``--allow-peer``), the broker
presents it (mTLS) and serves its callers over TLS.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from .._transport import Tls
from ..auth import generate_dev_key, mint_dev_token
from ..proof import ProofKey
from .certs import DevCerts, make_dev_certs
from .synth import synthesize

SITES = ("north", "south", "east", "west")
POLICIES = Path(__file__).resolve().parent / "policies"


@dataclass
class Process:
    """One started gateway process and the port it bound."""

    name: str
    popen: subprocess.Popen[bytes]
    args: list[str] = field(default_factory=list)
    port: int = 0

    @property
    def target(self) -> str:
        """``127.0.0.1:PORT``."""
        return f"127.0.0.1:{self.port}"


@dataclass
class LocalNetwork:
    """Sites and a broker under ``workdir``; create with :func:`start_network`."""

    workdir: Path
    private_key: Path
    public_key: Path
    proof_key: Path  # the researcher's key that this network's tokens are bound to
    sites: dict[str, Process] = field(default_factory=dict)
    broker: Process | None = None
    certs: DevCerts | None = None  # with TLS: the development certificates of every process
    broker_name: str = "broker"

    @property
    def client_tls(self) -> Tls | None:
        """What a researcher's client needs to reach the broker: trust in the development CA (None: plaintext)."""
        return None if self.certs is None else self.certs.trust()

    def token(self, project: str = "demo", subject: str = "demo-researcher", role: str = "researcher") -> str:
        """A DEVELOPMENT token accepted by every site of this network, bound to :attr:`proof_key`."""
        return mint_dev_token(self.private_key.read_bytes(), subject, project, role,
                              proof_jkt=ProofKey.load(self.proof_key).jkt)

    def restart_site(self, name: str) -> Process:
        """Start site ``name`` again on its state dir (after it died); it gets a new port."""
        old = self.sites[name]
        if old.popen.poll() is None:
            raise RuntimeError(f"site {name} is still running")
        process = _spawn(name, old.args, self.workdir / f"{name}.port", self.workdir / f"{name}.log")
        _wait_port(process, self.workdir / f"{name}.port", self.workdir / f"{name}.log")
        self.sites[name] = process
        return process

    def stop(self) -> None:
        """SIGTERM every process, then SIGKILL what has not exited after 15 s."""
        procs = [p.popen for p in [*self.sites.values(), *([self.broker] if self.broker else [])]]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 15
        for proc in procs:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _spawn(name: str, args: list[str], port_file: Path, log: Path) -> Process:
    port_file.unlink(missing_ok=True)
    env = {**os.environ, "GATEWAY_LOG_LEVEL": os.environ.get("GATEWAY_LOG_LEVEL", "ERROR")}
    with log.open("ab") as out:
        popen = subprocess.Popen([sys.executable, "-m", "gateway.cli", *args, "--port", "0", "--port-file",
                                  str(port_file)], stdout=out, stderr=out, env=env)
    return Process(name, popen, args)


def _wait_port(process: Process, port_file: Path, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not (port_file.exists() and port_file.read_text().strip()):
        if process.popen.poll() is not None:
            raise RuntimeError(f"{process.name} exited: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.name} did not start within {timeout:.0f}s")
        time.sleep(0.05)
    process.port = int(port_file.read_text())


def start_network(workdir: Path, n_sites: int = 4, patients: int = 20_000, broker: bool = True,
                  deadline_seconds: float = 10.0, min_sites: int = 1, seed: int = 0,
                  tls: bool = False) -> LocalNetwork:
    """Synthesize data, start ``n_sites`` site processes and (optionally) a broker over them.

    ``tls``: every connection over TLS, broker to site over mTLS, on development certificates
    written to ``workdir/certs``.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    private, public = generate_dev_key(workdir / "keys")
    proof_key = workdir / "keys" / "proof-key.pem"
    ProofKey.load_or_create(proof_key)
    network = LocalNetwork(workdir, private, public, proof_key)
    names = list(SITES[:n_sites]) if n_sites <= len(SITES) else [f"site{i}" for i in range(n_sites)]
    if tls:
        network.certs = make_dev_certs(workdir / "certs", [*names, network.broker_name])
    try:
        for index, name in enumerate(names):
            source = POLICIES / f"{name}.yaml" if name in SITES else POLICIES / "north.yaml"
            text = source.read_text().replace("site: north", f"site: {name}") if name not in SITES else \
                source.read_text()
            data = workdir / "data" / f"{name}.duckdb"
            if not data.exists():
                synthesize(name, patients, data, seed=seed + index)
            policy = workdir / f"{name}.yaml"
            policy.write_text(text.replace(f"data/{'north' if name not in SITES else name}.duckdb", str(data)))
            network.sites[name] = _spawn(name, ["site", "serve", "--policy", str(policy), "--state-dir",
                                                str(workdir / "state" / name), "--trusted-key", str(public),
                                                *_site_tls_args(network, name)],
                                         workdir / f"{name}.port", workdir / f"{name}.log")
        for name, process in network.sites.items():
            _wait_port(process, workdir / f"{name}.port", workdir / f"{name}.log")
        if broker:
            config = {"name": network.broker_name, "deadline_seconds": deadline_seconds, "min_sites": min_sites,
                      "sites": [{"name": n, "address": p.target, **_broker_tls_entry(network)}
                                for n, p in network.sites.items()]}
            (workdir / "broker.yaml").write_text(yaml.safe_dump(config))
            network.broker = _spawn("broker", ["broker", "serve", "--config", str(workdir / "broker.yaml"),
                                               "--trusted-key", str(public), *_broker_tls_args(network)],
                                    workdir / "broker.port", workdir / "broker.log")
            _wait_port(network.broker, workdir / "broker.port", workdir / "broker.log")
    except BaseException:
        network.stop()
        raise
    return network


def _site_tls_args(network: LocalNetwork, name: str) -> list[str]:
    """A site's TLS flags: its certificate, and only the broker's client certificate accepted."""
    if network.certs is None:
        return []
    certs = network.certs
    return ["--tls-cert", str(certs.cert(name)), "--tls-key", str(certs.key(name)), "--client-ca", str(certs.ca),
            "--allow-peer", network.broker_name]


def _broker_tls_entry(network: LocalNetwork) -> dict[str, dict[str, str]]:
    """A site's ``tls`` in the broker's config: trust the CA, present the broker's certificate."""
    if network.certs is None:
        return {}
    certs, name = network.certs, network.broker_name
    return {"tls": {"ca": str(certs.ca), "cert": str(certs.cert(name)), "key": str(certs.key(name))}}


def _broker_tls_args(network: LocalNetwork) -> list[str]:
    if network.certs is None:
        return []
    return ["--tls-cert", str(network.certs.cert(network.broker_name)),
            "--tls-key", str(network.certs.key(network.broker_name))]
